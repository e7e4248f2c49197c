// @openfeature/ofrep-provider (OFREP single-flag evaluation over HTTP) against the sidecar's
// OFREP listener. This server-side provider keeps no cache and does not poll: each evaluation
// is one POST /ofrep/v1/evaluate/flags/{key}, so a change is seen by the next evaluation, and
// there are no change or reconnect events to wait for.

import { OFREPProvider } from '@openfeature/ofrep-provider';

import { openFeatureSuite } from './scenarios.mjs';

await openFeatureSuite({
  listener: 'ofrep',
  events: false,
  provider: ({ host, port }) => new OFREPProvider({ baseUrl: `http://${host}:${port}` }),
});
