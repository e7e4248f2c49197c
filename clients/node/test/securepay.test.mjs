// examples/securepay-node: run_checks.mjs as a user runs it, in a child process, in mock mode
// and against a real sidecar started with the example's tenants (examples/tenants.json).

import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';

import { ENV, Sidecar } from './helpers.mjs';
import { ROOT } from '../../../tests/openfeature-node/sidecar.mjs';

const EXAMPLE = join(ROOT, 'examples', 'securepay-node');
// Hang guard only: the checks wait for the start of a fresh second once.
const RUN_TIMEOUT_MS = 60_000;

/** Runs run_checks.mjs with only `env` (and PATH); resolves to its exit code and output. */
function runChecks(env) {
  return new Promise((resolveRun) => {
    execFile(
      process.execPath,
      ['run_checks.mjs'],
      { cwd: EXAMPLE, env: { PATH: process.env.PATH ?? '', ...env }, timeout: RUN_TIMEOUT_MS },
      (error, stdout, stderr) => {
        const code = error === null ? 0 : typeof error.code === 'number' ? error.code : null;
        resolveRun({ code, signal: error?.signal ?? null, output: `${stdout}${stderr}` });
      },
    );
  });
}

function assertAllPassed({ code, signal, output }) {
  assert.match(output, /^12\/12 passed$/m, output);
  assert.doesNotMatch(output, /\[FAIL\]/, output);
  assert.equal(signal, null, output);
  assert.equal(code, 0, output);
}

describe('examples/securepay-node run_checks.mjs', () => {
  before(() => {
    assert.ok(
      existsSync(join(EXAMPLE, 'node_modules', '@coresdk', 'client')),
      `${EXAMPLE}/node_modules is missing: run ./scripts/node-env (it builds the client and npm ci's the example)`,
    );
  });

  test('mock mode: 12/12 passed, exit 0', async () => {
    assertAllPassed(await runChecks({ CORESDK_USE_MOCK: 'true' }));
  });

  describe('against a real sidecar', () => {
    let sidecar;
    before(async () => {
      sidecar = await Sidecar.start();
    });
    after(() => sidecar?.close());

    const sharedSecrets = () => ({
      CORESDK_SIDECAR_ADDR: sidecar.addr,
      STRIPE_WEBHOOK_SECRET: ENV.STRIPE_WEBHOOK_SECRET,
      CORESDK_JWT_SECRET: ENV.CORESDK_JWT_SECRET,
    });

    test('12/12 passed, exit 0, and again on the same (durable) sidecar', async () => {
      assertAllPassed(await runChecks(sharedSecrets()));
      assertAllPassed(await runChecks(sharedSecrets()));
    });

    test('a webhook secret the sidecar does not share fails the checks, exit 1', async () => {
      const { code, output } = await runChecks({ ...sharedSecrets(), STRIPE_WEBHOOK_SECRET: 'whsec_not_the_sidecars' });
      assert.match(output, /\[FAIL\] Valid Stripe signature accepted/, output);
      assert.doesNotMatch(output, /^12\/12 passed$/m, output);
      assert.equal(code, 1, output);
    });
  });
});
