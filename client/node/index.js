'use strict';
// classifyd client for Node.js: classifier.v1.Classifier over @grpc/grpc-js, loading the project's
// .proto at run time (no generated code). Every call returns a Promise; a failed call rejects with
// the gRPC error (err.code is the status code, e.g. grpc.status.INVALID_ARGUMENT, err.details the
// server's message).

const path = require('node:path');
const fs = require('node:fs');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_PATH = path.join(__dirname, '..', '..', 'protos', 'classifier', 'v1', 'classifier.proto');
const SERVICE_CONFIG_PATH = path.join(__dirname, '..', '..', 'deploy', 'client-service-config.json');
const DEFAULT_TARGET = '127.0.0.1:50051';
const DEFAULT_TIMEOUT_MS = 30000;
const MAX_MESSAGE = 64 * 1024 * 1024;

const definition = protoLoader.loadSync(PROTO_PATH, {
  keepCase: false, // fields in camelCase: topK, requestId, servingVersion, ...
  longs: Number,
  enums: String,
  defaults: true,
  oneofs: true,
});
const classifierV1 = grpc.loadPackageDefinition(definition).classifier.v1;
const TENSOR_DTYPES = { uint8: 'UINT8', float32: 'FLOAT32' };

/** The recommended service config (round_robin, retries on UNAVAILABLE, deadlines) as a JSON string. */
function recommendedServiceConfig() {
  return fs.readFileSync(SERVICE_CONFIG_PATH, 'utf8');
}

class ClassifierClient {
  /**
   * @param {string} target host:port, or a name resolver target such as dns:///classifyd-headless:50051
   * @param {object} [opts]
   * @param {number} [opts.timeoutMs] default deadline of each call (30 s)
   * @param {boolean} [opts.balanced] use the recommended service config (round_robin over every address)
   * @param {object} [opts.channelOptions] extra grpc-js channel options
   * @param {grpc.ChannelCredentials} [opts.credentials] default: insecure
   */
  constructor(target = DEFAULT_TARGET, opts = {}) {
    const channelOptions = {
      'grpc.max_send_message_length': MAX_MESSAGE,
      'grpc.max_receive_message_length': MAX_MESSAGE,
      ...(opts.balanced ? { 'grpc.service_config': recommendedServiceConfig() } : {}),
      ...(opts.channelOptions || {}),
    };
    this.timeoutMs = opts.timeoutMs ?? DEFAULT_TIMEOUT_MS;
    this.stub = new classifierV1.Classifier(target, opts.credentials || grpc.credentials.createInsecure(),
      channelOptions);
  }

  _call(method, request, timeoutMs) {
    const deadline = new Date(Date.now() + (timeoutMs ?? this.timeoutMs));
    return new Promise((resolve, reject) => {
      this.stub[method](request, { deadline }, (err, response) => (err ? reject(err) : resolve(response)));
    });
  }

  /**
   * Classify an encoded image (JPEG, PNG, WebP, BMP, GIF or TIFF).
   * @param {Buffer|Uint8Array} image the file's bytes
   * @param {object} [opts] model ('' = default), version (0 = newest), topK (0 = the model's default),
   *   requestId, timeoutMs
   * @returns {Promise<object>} ClassifyResponse: predictions [{index, label, score}], model, version, ...
   */
  classify(image, opts = {}) {
    return this._call('Classify', { ...requestFields(opts), image: Buffer.from(image) }, opts.timeoutMs);
  }

  /**
   * Classify raw pixels: a Uint8Array (0..255) or Float32Array (0..1) of shape [height, width] or
   * [height, width, channels], row-major.
   */
  classifyTensor(pixels, shape, opts = {}) {
    const dtype = pixels instanceof Float32Array ? 'float32' : pixels instanceof Uint8Array ? 'uint8' : null;
    if (!dtype) {
      return Promise.reject(new TypeError('pixels must be a Uint8Array or a Float32Array'));
    }
    const data = Buffer.from(pixels.buffer, pixels.byteOffset, pixels.byteLength); // little-endian on x86/ARM
    const tensor = { dtype: TENSOR_DTYPES[dtype], shape, data };
    return this._call('Classify', { ...requestFields(opts), tensor }, opts.timeoutMs);
  }

  /** Every model in the daemon's repository, with versions and their states. */
  async listModels(opts = {}) {
    return (await this._call('ListModels', {}, opts.timeoutMs)).models;
  }

  /** One model ('' = the default model). */
  getModel(name = '', opts = {}) {
    return this._call('GetModel', { model: name }, opts.timeoutMs);
  }

  close() {
    this.stub.close();
  }
}

function requestFields(opts) {
  return {
    model: opts.model || '',
    version: opts.version || 0,
    topK: opts.topK || 0,
    requestId: opts.requestId || '',
  };
}

/** One-shot helper: classify an image with a client that is closed afterwards. */
async function classify(image, opts = {}) {
  const client = new ClassifierClient(opts.target || DEFAULT_TARGET, opts);
  try {
    return await client.classify(image, opts);
  } finally {
    client.close();
  }
}

/** One-shot helper: list the models of the daemon at opts.target. */
async function listModels(opts = {}) {
  const client = new ClassifierClient(opts.target || DEFAULT_TARGET, opts);
  try {
    return await client.listModels(opts);
  } finally {
    client.close();
  }
}

module.exports = { ClassifierClient, classify, listModels, recommendedServiceConfig, status: grpc.status };
