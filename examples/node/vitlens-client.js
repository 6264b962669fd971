'use strict';
// A small vitlens client for Node: @grpc/grpc-js + @grpc/proto-loader over the repository's
// protos. It shows the three things a hand-written client must get right:
//
//   1. the receive limit: gRPC clients refuse replies above 4 MiB by default, and a batch of
//      input-resolution heatmaps with relevance matrices is larger (`connect`'s
//      maxReceiveMessageLength);
//   2. google.protobuf.Struct: proto-loader wants the wire shape {fields: {k: {stringValue: ...}}}
//      and silently drops a plain object, so `method_options` must go through `toStruct`;
//   3. error details: the google.rpc.Status in the `grpc-status-details-bin` trailer, with its
//      Any details unpacked (`errorDetails`).
//
// Field names are lowerCamelCase (proto-loader's default, keepCase: false), as in the proto3 JSON
// that buf curl and grpcurl print: `methodOptions`, `returnRelevance`, `fieldViolations`.

const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');

// The import root holding vitlens/v1/*.proto: the repository's protos/ by default; for an
// installed SDK, the wheel's copy (python -c "import vitlens.protos, pathlib;
// print(pathlib.Path(vitlens.protos.__file__).parent)").
const PROTOS_DIR = process.env.VITLENS_PROTOS || path.join(__dirname, '..', '..', 'protos');
// google/rpc/status.proto and error_details.proto, vendored (see ./protos/README.md).
const RPC_PROTOS_DIR = path.join(__dirname, 'protos');

// How messages become JS objects, for replies and error details alike. int64 fields (tensor
// shapes, Evaluate counters) become Numbers: exact below 2**53, far above any shape or count.
const CONVERSION = { longs: Number, enums: String, defaults: true, oneofs: true };

const DETAILS_KEY = 'grpc-status-details-bin';
const ANY_PREFIX = 'type.googleapis.com/';

let cached = null;

/** The service definition (proto-loader) and a protobufjs root for google.rpc error details. */
function load() {
  if (cached) return cached;
  const definition = protoLoader.loadSync('vitlens/v1/vitlens.proto', {
    ...CONVERSION,
    includeDirs: [PROTOS_DIR],
  });
  const Service = grpc.loadPackageDefinition(definition).vitlens.v1.VitlensService;
  const rpcRoot = protobuf.loadSync([
    path.join(RPC_PROTOS_DIR, 'google/rpc/status.proto'),
    path.join(RPC_PROTOS_DIR, 'google/rpc/error_details.proto'),
  ]);
  cached = { definition, Service, rpcRoot };
  return cached;
}

/**
 * A VitlensService client on a plaintext channel.
 *
 * maxReceiveMessageLength: the largest reply accepted, in bytes. Unset keeps gRPC's default,
 * 4 MiB (4194304): replies above it fail with RESOURCE_EXHAUSTED on the client.
 */
function connect(address, { maxReceiveMessageLength } = {}) {
  const { Service } = load();
  const options = {};
  if (maxReceiveMessageLength !== undefined) {
    options['grpc.max_receive_message_length'] = maxReceiveMessageLength;
  }
  return new Service(address, grpc.credentials.createInsecure(), options);
}

/** One google.protobuf.Value in proto-loader's wire shape. */
function toValue(value, where) {
  if (value === null) return { nullValue: 'NULL_VALUE' };
  if (Array.isArray(value)) {
    return { listValue: { values: value.map((item, i) => toValue(item, `${where}[${i}]`)) } };
  }
  switch (typeof value) {
    case 'string':
      return { stringValue: value };
    case 'boolean':
      return { boolValue: value };
    case 'number':
      if (!Number.isFinite(value)) throw new TypeError(`${where}: ${value} is not a JSON number`);
      return { numberValue: value };
    case 'object':
      return { structValue: toStruct(value, where) };
    default:
      throw new TypeError(`${where}: a ${typeof value} is not a JSON value`);
  }
}

/**
 * A plain JSON-like object as a google.protobuf.Struct: {fields: {k: Value}}.
 * toStruct({head_fusion: 'max', discard_ratio: 0.9}) ->
 *   {fields: {head_fusion: {stringValue: 'max'}, discard_ratio: {numberValue: 0.9}}}
 */
function toStruct(object, where = 'struct') {
  const fields = {};
  for (const [key, value] of Object.entries(object)) {
    fields[key] = toValue(value, `${where}.${key}`);
  }
  return { fields };
}

/**
 * An ExplainRequest: images are Buffers of encoded files (PNG, JPEG, ...); methodOptions is a
 * plain object, sent as a Struct; grid is 'tokens' or 'input'; topK > 0 explains the k most
 * probable classes of each image (else the predicted one).
 */
function explainRequest({
  images,
  model = '',
  method = '',
  methodOptions = {},
  grid = 'tokens',
  relevance = false,
  dtype = 'float32',
  topK = 0,
}) {
  return {
    model,
    method,
    images: images.map((encoded, i) => ({ encoded, id: `image-${i}` })),
    target: topK > 0 ? { topK } : { predicted: true },
    options: {
      grid: `OUTPUT_GRID_${grid.toUpperCase()}`,
      returnRelevance: relevance,
      outputDtype: `DTYPE_${dtype.toUpperCase()}`,
      methodOptions: toStruct(methodOptions, 'methodOptions'),
    },
  };
}

/**
 * Call a unary RPC; resolves to {response, bytesReceived} (the reply's serialized size), rejects
 * with grpc-js's error (err.code, err.details, err.metadata: the trailers).
 */
function unary(client, methodName, request, { timeoutS = 60 } = {}) {
  const method = load().Service.service[methodName];
  let bytesReceived = 0;
  const deserialize = (buffer) => {
    bytesReceived = buffer.length;
    return method.responseDeserialize(buffer);
  };
  return new Promise((resolve, reject) => {
    client.makeUnaryRequest(
      method.path,
      method.requestSerialize,
      deserialize,
      request,
      new grpc.Metadata(),
      { deadline: Date.now() + timeoutS * 1000 },
      (err, response) => (err ? reject(err) : resolve({ response, bytesReceived })),
    );
  });
}

/** Explain: `options` as for explainRequest; resolves to {response, bytesReceived}. */
function explain(client, options, callOptions) {
  return unary(client, 'Explain', explainRequest(options), callOptions);
}

/** float16 bits -> number (IEEE 754 half precision). */
function halfToNumber(bits) {
  const sign = bits & 0x8000 ? -1 : 1;
  const exponent = (bits >> 10) & 0x1f;
  const fraction = bits & 0x3ff;
  if (exponent === 0) return sign * 2 ** -14 * (fraction / 1024);
  if (exponent === 0x1f) return fraction ? NaN : sign * Infinity;
  return sign * 2 ** (exponent - 15) * (1 + fraction / 1024);
}

/**
 * A vitlens.v1.Tensor as {dtype, shape, values}: values is a Float32Array (row-major) for
 * DTYPE_FLOAT32 and DTYPE_FLOAT16, a Uint8Array for DTYPE_UINT8. `data` is little-endian, as is
 * every platform Node runs on.
 */
function decodeTensor({ dtype, shape, data }) {
  const count = shape.reduce((a, b) => a * b, 1);
  // Copy: the Buffer may sit at an unaligned offset of a larger one, and typed arrays need
  // their element alignment.
  const bytes = new Uint8Array(data);
  let values;
  if (dtype === 'DTYPE_FLOAT32') {
    values = new Float32Array(bytes.buffer, 0, count);
  } else if (dtype === 'DTYPE_FLOAT16') {
    const view = new DataView(bytes.buffer);
    values = Float32Array.from({ length: count }, (_, i) =>
      halfToNumber(view.getUint16(2 * i, true)),
    );
  } else if (dtype === 'DTYPE_UINT8') {
    values = bytes;
  } else {
    throw new TypeError(`unknown tensor dtype ${dtype}`);
  }
  return { dtype, shape, values };
}

/**
 * The status of a failed call as {code, codeName, message, details}, from the google.rpc.Status
 * in its `grpc-status-details-bin` trailer: each Any detail unpacked into its message's fields
 * plus '@type' (google.rpc.BadRequest -> {'@type': ..., fieldViolations: [{field, description}]}).
 * Details of a type not known here keep their bytes as base64 `value`. A status without the
 * trailer (one gRPC answered itself, e.g. the client's receive limit) has no details.
 */
function errorDetails(err) {
  const [raw] = err.metadata ? err.metadata.get(DETAILS_KEY) : [];
  if (!raw) {
    return { code: err.code, codeName: grpc.status[err.code], message: err.details, details: [] };
  }
  const { rpcRoot } = load();
  const status = rpcRoot.lookupType('google.rpc.Status').decode(raw);
  const details = status.details.map((any) => {
    const typeUrl = any.type_url; // protobufjs keeps Any's field names as in any.proto
    const name = typeUrl.startsWith(ANY_PREFIX) ? typeUrl.slice(ANY_PREFIX.length) : typeUrl;
    const type = rpcRoot.lookup(name);
    if (!(type instanceof protobuf.Type)) {
      return { '@type': typeUrl, value: Buffer.from(any.value).toString('base64') };
    }
    return { '@type': typeUrl, ...type.toObject(type.decode(any.value), CONVERSION) };
  });
  const { code, message } = status;
  return { code, codeName: grpc.status[code], message, details };
}

module.exports = {
  PROTOS_DIR,
  connect,
  decodeTensor,
  errorDetails,
  explain,
  explainRequest,
  load,
  toStruct,
  unary,
};
