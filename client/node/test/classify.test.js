'use strict';
// Runs against a real classifyd started here: `<repo>/.venv/bin/python -m server --port 0 --port-file ...`
// (set CLASSIFYD_PYTHON to use another interpreter). Fixtures are held-out digits of scikit-learn's
// data set (tests/support/digits_data.py, samples 0, 6 and 8), which the default model labels in Chinese.

const { test, before, after } = require('node:test');
const assert = require('node:assert/strict');
const { spawn } = require('node:child_process');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const { ClassifierClient, classify, listModels, status } = require('..');

const REPO = path.resolve(__dirname, '..', '..', '..');
const PYTHON = process.env.CLASSIFYD_PYTHON || path.join(REPO, '.venv', 'bin', 'python');
const fixture = (name) => fs.readFileSync(path.join(__dirname, 'fixtures', name));
// held-out sample 6, an eight, as 8x8 grey pixels
const EIGHT = Uint8Array.from([
  0, 0, 16, 223, 207, 64, 0, 0, 0, 48, 239, 191, 175, 239, 0, 0, 0, 128, 175, 16, 112, 207, 0, 0,
  0, 16, 207, 223, 255, 16, 0, 0, 0, 0, 0, 223, 207, 223, 32, 0, 0, 0, 32, 191, 0, 143, 128, 0,
  0, 0, 48, 207, 64, 191, 96, 0, 0, 0, 0, 143, 223, 207, 16, 0,
]);

let daemon;
let target;
let client;

async function startDaemon() {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'classifyd-node-'));
  const portFile = path.join(dir, 'port');
  const env = { ...process.env, PYTHONPATH: [REPO, path.join(REPO, 'protos'), process.env.PYTHONPATH || ''].join(':') };
  const args = ['-m', 'server', '--models-dir', 'models', '--port', '0', '--port-file', portFile,
    '--device', 'cpu', '--no-watch'];
  const child = spawn(PYTHON, args, { cwd: REPO, env, stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr.on('data', (chunk) => { stderr += chunk; });
  const started = Date.now();
  while (!fs.existsSync(portFile)) {
    if (child.exitCode !== null) throw new Error(`daemon exited with ${child.exitCode}: ${stderr}`);
    if (Date.now() - started > 120000) throw new Error(`daemon did not start in 120 s: ${stderr}`);
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  return { child, port: Number(fs.readFileSync(portFile, 'utf8')) };
}

before(async () => {
  const started = await startDaemon();
  daemon = started.child;
  target = `127.0.0.1:${started.port}`;
  client = new ClassifierClient(target, { timeoutMs: 20000 });
});

after(async () => {
  client?.close();
  if (daemon && daemon.exitCode === null) {
    const exited = new Promise((resolve) => daemon.once('exit', resolve));
    daemon.kill('SIGTERM');
    await exited;
  }
});

test('classifies encoded digits with Chinese labels', async () => {
  for (const [file, label] of [['digit-8.png', '八'], ['digit-2.png', '二'], ['digit-0.png', '零']]) {
    const response = await client.classify(fixture(file), { topK: 3 });
    assert.equal(response.model, 'digits');
    assert.equal(response.version, 1);
    assert.equal(response.predictions.length, 3);
    assert.equal(response.predictions[0].label, label);
    assert.ok(response.predictions[0].score > 0.9);
    assert.ok(response.predictions[0].score >= response.predictions[1].score);
  }
});

test('classifies raw pixels', async () => {
  const response = await client.classifyTensor(EIGHT, [8, 8], { model: 'digits', topK: 1 });
  assert.deepEqual(response.predictions.map((p) => [p.index, p.label]), [[8, '八']]);
  const floats = Float32Array.from(EIGHT, (v) => v / 255);
  const again = await client.classifyTensor(floats, [8, 8, 1], { topK: 1 });
  assert.equal(again.predictions[0].label, '八');
});

test('one-shot helpers and model listing', async () => {
  const response = await classify(fixture('digit-2.png'), { target, requestId: 'node-1' });
  assert.equal(response.requestId, 'node-1');
  assert.equal(response.predictions[0].label, '二');
  const models = await listModels({ target });
  const digits = models.find((m) => m.name === 'digits');
  assert.ok(digits.isDefault);
  assert.equal(digits.numLabels, 10);
  assert.deepEqual(digits.versions.map((v) => [v.version, v.state]), [[1, 'READY']]);
  assert.equal((await client.getModel('')).name, 'digits');
});

test('errors carry the status code and the server message', async () => {
  await assert.rejects(client.classify(Buffer.from('not an image')), (err) => {
    assert.equal(err.code, status.INVALID_ARGUMENT);
    assert.match(err.details, /cannot decode image/);
    return true;
  });
  await assert.rejects(client.classify(fixture('digit-8.png'), { model: 'no-such-model' }), (err) => {
    assert.equal(err.code, status.NOT_FOUND);
    assert.match(err.details, /unknown model 'no-such-model'/);
    return true;
  });
  await assert.rejects(client.classifyTensor([1, 2, 3], [3]), TypeError);
});

test('the balanced channel uses the recommended service config', async () => {
  const balanced = new ClassifierClient(`ipv4:${target}`, { balanced: true });
  try {
    const response = await balanced.classify(fixture('digit-0.png'));
    assert.equal(response.predictions[0].label, '零');
  } finally {
    balanced.close();
  }
});
