#!/usr/bin/env node
'use strict';
// Usage: node example.js IMAGE... [--target host:port] [--top-k N] [--model NAME]
// Classifies each image and lists the daemon's models.

const fs = require('node:fs');
const { parseArgs } = require('node:util');
const { ClassifierClient } = require('./index');

async function main() {
  const { values, positionals } = parseArgs({
    allowPositionals: true,
    options: {
      target: { type: 'string', default: '127.0.0.1:50051' },
      'top-k': { type: 'string', default: '3' },
      model: { type: 'string', default: '' },
    },
  });
  const client = new ClassifierClient(values.target, { timeoutMs: 10000 });
  try {
    for (const file of positionals) {
      const response = await client.classify(fs.readFileSync(file), {
        model: values.model,
        topK: Number(values['top-k']),
      });
      console.log(`${file}: ${response.model} v${response.version} (batch ${response.batchSize})`);
      for (const p of response.predictions) {
        console.log(`  ${p.score.toFixed(4).padStart(8)} ${String(p.index).padStart(6)}  ${p.label}`);
      }
    }
    for (const model of await client.listModels()) {
      const versions = model.versions.map((v) => `${v.version}:${v.state}`).join(' ');
      console.log(`model ${model.name}${model.isDefault ? ' (default)' : ''}: ${versions}`);
    }
  } finally {
    client.close();
  }
}

main().catch((err) => {
  console.error(`error: ${err.details || err.message} (code ${err.code})`);
  process.exit(1);
});
