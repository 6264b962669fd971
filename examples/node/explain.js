#!/usr/bin/env node
'use strict';
// Explain images with vitlens from Node and print a JSON summary on stdout.
//
//   node explain.js --server localhost:50051 --image scene.png [--image more.png ...]
//       [--images N] [--model NAME] [--method rollout] [--option head_fusion=max ...]
//       [--grid tokens|input] [--relevance] [--top-k K] [--dtype float32|float16]
//       [--max-receive-mb MB] [--timeout-s S] [--values]
//
// --images N sends N images, cycling through the --image files. --option KEY=VALUE (repeatable)
// is a method option; VALUE is parsed as JSON when it parses (0.9, 3, true), else a string.
// --max-receive-mb raises the client's receive limit (default: gRPC's 4 MiB). --values adds
// each heatmap's values (row-major) to the summary.
//
// Exit status: 0 on success; 2 on bad usage; 3 when the call failed with a gRPC status: stdout
// then holds {"error": {code, codeName, message, details}}, details decoded from the
// grpc-status-details-bin trailer.

const fs = require('node:fs');
const { parseArgs } = require('node:util');
const { connect, decodeTensor, errorDetails, explain } = require('./vitlens-client');

const USAGE = 'usage: node explain.js --server HOST:PORT --image FILE [options] (see explain.js)';

function parseOption(text) {
  const eq = text.indexOf('=');
  if (eq <= 0) throw new Error(`--option wants KEY=VALUE, got '${text}'`);
  const raw = text.slice(eq + 1);
  let value;
  try {
    value = JSON.parse(raw);
  } catch {
    value = raw;
  }
  return [text.slice(0, eq), value];
}

function parse(argv) {
  const { values } = parseArgs({
    args: argv,
    options: {
      server: { type: 'string', default: 'localhost:50051' },
      image: { type: 'string', multiple: true, default: [] },
      images: { type: 'string' },
      model: { type: 'string', default: '' },
      method: { type: 'string', default: '' },
      option: { type: 'string', multiple: true, default: [] },
      grid: { type: 'string', default: 'tokens' },
      relevance: { type: 'boolean', default: false },
      'top-k': { type: 'string', default: '0' },
      dtype: { type: 'string', default: 'float32' },
      'max-receive-mb': { type: 'string' },
      'timeout-s': { type: 'string', default: '60' },
      values: { type: 'boolean', default: false },
    },
  });
  if (values.image.length === 0) throw new Error('give at least one --image');
  const files = values.image.map((file) => fs.readFileSync(file));
  const count = values.images === undefined ? files.length : Number(values.images);
  const mb = values['max-receive-mb'];
  return {
    server: values.server,
    request: {
      images: Array.from({ length: count }, (_, i) => files[i % files.length]),
      model: values.model,
      method: values.method,
      methodOptions: Object.fromEntries(values.option.map(parseOption)),
      grid: values.grid,
      relevance: values.relevance,
      topK: Number(values['top-k']),
      dtype: values.dtype,
    },
    maxReceiveMessageLength: mb === undefined ? undefined : Math.round(Number(mb) * 1024 * 1024),
    timeoutS: Number(values['timeout-s']),
    withValues: values.values,
  };
}

function tensorSummary(tensor, withValues) {
  if (!tensor) return null;
  const { dtype, shape, values } = decodeTensor(tensor);
  const summary = { dtype, shape, bytes: tensor.data.length };
  if (withValues) summary.values = Array.from(values);
  return summary;
}

function summarise(response, bytesReceived, seconds, withValues) {
  return {
    model: response.model,
    method: response.method,
    bytesReceived,
    seconds,
    serverSeconds: response.timing.totalSeconds,
    images: response.results.map((result) => ({
      id: result.id,
      top: result.predictions[0],
      explanations: result.explanations.map((explanation) => ({
        target: explanation.target,
        heatmap: tensorSummary(explanation.heatmap, withValues),
        relevance: tensorSummary(explanation.relevance, false),
      })),
    })),
  };
}

async function main() {
  let args;
  try {
    args = parse(process.argv.slice(2));
  } catch (err) {
    console.error(`${err.message}\n${USAGE}`);
    return 2;
  }
  const client = connect(args.server, { maxReceiveMessageLength: args.maxReceiveMessageLength });
  const started = process.hrtime.bigint();
  try {
    const { response, bytesReceived } = await explain(client, args.request, {
      timeoutS: args.timeoutS,
    });
    const seconds = Number(process.hrtime.bigint() - started) / 1e9;
    const summary = summarise(response, bytesReceived, seconds, args.withValues);
    console.log(JSON.stringify(summary, null, 2));
    return 0;
  } catch (err) {
    if (err.code === undefined) throw err; // not a gRPC status: a bug, let Node report it
    console.log(JSON.stringify({ error: errorDetails(err) }, null, 2));
    return 3;
  } finally {
    client.close();
  }
}

main().then((code) => {
  process.exitCode = code;
});
