// @openfeature/flagd-provider in in-process mode (flagd.sync.v1 SyncFlags, evaluated locally
// by flagd-core with JSONLogic) against the sidecar's flagd-sync listener.

import { FlagdProvider } from '@openfeature/flagd-provider';

import { openFeatureSuite } from './scenarios.mjs';

await openFeatureSuite({
  listener: 'flagd-sync',
  events: true,
  provider: ({ host, port }) =>
    new FlagdProvider({
      host,
      port,
      resolverType: 'in-process',
      // Hang guards for a loaded machine, not latency targets.
      deadlineMs: 5_000,
      // After a stream error the provider waits this long before reconnecting (default 5 s).
      retryBackoffMaxMs: 1_000,
    }),
});
