// Sidecar clients of a real sidecar for the Node client's tests; the sidecar itself is started
// by the OpenFeature tests' launcher (tests/openfeature-node/sidecar.mjs), one for both suites.

import { ENV, eventually } from '../../../tests/openfeature-node/sidecar.mjs';
import { makeSettings, SidecarClient } from '../dist/index.js';

export { ENV, eventually, within, Sidecar, sign, stripeEvent } from '../../../tests/openfeature-node/sidecar.mjs';

/** Settings for a client of `sidecar` with the suite's admin token and problem type base. */
export function settingsFor(sidecar, overrides = {}) {
  return makeSettings({
    sidecarAddr: sidecar.addr,
    adminToken: ENV.CORESDK_ADMIN_TOKEN,
    problemTypeBase: ENV.CORESDK_PROBLEM_TYPE_BASE,
    timeoutMs: 5_000,
    ...overrides,
  });
}

/** A client whose flag cache is current, ready for the hot path. */
export async function clientFor(sidecar, overrides = {}, options = {}) {
  const client = new SidecarClient(settingsFor(sidecar, overrides), options);
  try {
    await eventually(() => (client.cacheCurrent ? true : undefined), 'the flag cache never became current');
  } catch (error) {
    await client.close();
    throw error;
  }
  return client;
}

/** Collects what the client logs, to check that an outage is logged once. */
export function recordingLogger() {
  const lines = [];
  return {
    lines,
    warn: (message) => lines.push(['warn', message]),
    error: (message) => lines.push(['error', message]),
  };
}
