// A call the sidecar refuses because its connection already runs as many calls as
// CORESDK_MAX_CONCURRENT_PER_CONNECTION allows was never started: the client retries it within
// its deadline instead of failing the app's request.

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';

import { GrpcCode, ProblemError } from '../dist/index.js';
import { clientFor, Sidecar } from './helpers.mjs';

const problem = (reason) => ({ type: 'about:blank', title: 't', status: 429, reason });

test('a refusal for the connection limit is retryable; other exhaustion is not', () => {
  assert.equal(new ProblemError(problem('TOO_MANY_CALLS_ON_CONNECTION'), GrpcCode.RESOURCE_EXHAUSTED).retryable, true);
  assert.equal(new ProblemError(problem('TOO_MANY_STREAMS'), GrpcCode.RESOURCE_EXHAUSTED).retryable, false);
});

/** Holds SQLite's write lock on `path` (through Python, which has sqlite3) until released. */
async function writeLock(path) {
  const python = process.env.CORESDK_TEST_PYTHON;
  assert.ok(python, 'CORESDK_TEST_PYTHON is not set: this test holds the write lock with Python (./scripts/test sets it)');
  const holder = spawn(
    python,
    ['-c', "import sqlite3,sys; c=sqlite3.connect(sys.argv[1], isolation_level=None, timeout=5); c.execute('BEGIN IMMEDIATE'); print('locked', flush=True); sys.stdin.read()", path],
    { stdio: ['pipe', 'pipe', 'inherit'] },
  );
  const [line] = await once(holder.stdout, 'data');
  assert.equal(String(line).trim(), 'locked');
  return {
    async release() {
      holder.stdin.end();
      await once(holder, 'exit');
    },
  };
}

/** ExplainFlag calls the sidecar refused for the connection's limit, from its metrics. */
async function refusedExplains(sidecar) {
  const answer = await fetch(`http://${sidecar.listeners.get('ops')}/metrics`);
  const text = await answer.text();
  return text
    .split('\n')
    .filter((line) => line.startsWith('grpc_server_handled_total{'))
    .filter((line) => line.includes('grpc_method="ExplainFlag"') && line.includes('grpc_code="ResourceExhausted"'))
    .reduce((sum, line) => sum + Number(line.slice(line.lastIndexOf(' ') + 1)), 0);
}

test('a call refused while its connection is busy is retried until served', async () => {
  const sidecar = await Sidecar.start({ listeners: ['ops'], env: { CORESDK_MAX_CONCURRENT_PER_CONNECTION: '1' } });
  const client = await clientFor(sidecar, { timeoutMs: 10_000 });
  try {
    const lock = await writeLock(sidecar.store.replace(/^sqlite:\/\//, ''));
    // The SetFlag waits in the sidecar for the write lock, holding the connection's one place.
    let written = false;
    const write = client.setFlag('acme-corp', 'paywall_active', true, { actor: 'ops' }).then((flag) => {
      written = true;
      return flag;
    });
    await sleep(500);
    assert.equal(written, false, 'the SetFlag waits for the write lock');
    const releasing = sleep(500).then(() => lock.release());
    // Refused at first (the connection is busy), retried, served once the write answered.
    const explained = await client.explainFlag('acme-corp', 'pro_features');
    assert.equal(explained.flag.key, 'pro_features');
    assert.ok((await refusedExplains(sidecar)) >= 1, 'the call was refused at least once, then retried');
    await releasing;
    assert.equal((await write).value, true);
  } finally {
    await client.close();
    await sidecar.close();
  }
});
