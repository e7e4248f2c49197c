// @openfeature/flagd-provider in RPC mode (flagd.evaluation.v2 + EventStream) against the
// sidecar's flagd listener.

import { FlagdProvider } from '@openfeature/flagd-provider';

import { openFeatureSuite } from './scenarios.mjs';

await openFeatureSuite({
  listener: 'flagd',
  events: true,
  provider: ({ host, port }) =>
    new FlagdProvider({
      host,
      port,
      resolverType: 'rpc',
      // Hang guards for a loaded machine, not latency targets.
      deadlineMs: 5_000,
      // After a stream error the provider waits this long before reconnecting (default 5 s).
      retryBackoffMaxMs: 1_000,
    }),
});
