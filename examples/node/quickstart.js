'use strict';
// node examples/node/quickstart.js localhost:50051 examples/grpcurl/scene.png
const fs = require('node:fs');
const { connect, decodeTensor, errorDetails, explain } = require('./vitlens-client');

async function main(address, imageFile) {
  // gRPC clients refuse replies above 4 MiB unless told otherwise.
  const client = connect(address, { maxReceiveMessageLength: 64 * 1024 * 1024 });
  const image = fs.readFileSync(imageFile);
  try {
    const { response } = await explain(client, {
      images: [image],
      method: 'rollout',
      methodOptions: { head_fusion: 'max', discard_ratio: 0.9 }, // sent as a Struct (toStruct)
      grid: 'input',
    });
    const [result] = response.results;
    const heatmap = decodeTensor(result.explanations[0].heatmap); // values: Float32Array
    const peak = heatmap.values.reduce((a, b) => Math.max(a, b));
    console.log(result.predictions[0].label, heatmap.shape.join('x'), peak);

    try {
      await explain(client, { images: [image], method: 'no_such_method' });
    } catch (err) {
      const { codeName, details } = errorDetails(err); // from grpc-status-details-bin
      console.log(codeName, details[0]['@type'], details[0].fieldViolations[0].field);
    }
  } finally {
    client.close();
  }
}

main(...process.argv.slice(2));
