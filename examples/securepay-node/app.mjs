// SecurePay: the seed story's billing webhook processor, as an Express app on @coresdk/client.
//
//   CORESDK_USE_MOCK=true node app.mjs     # no sidecar needed; PORT (default 3000)
//   node app.mjs                           # the sidecar at CORESDK_SIDECAR_ADDR
//
// Stripe → POST /webhooks/stripe → the sidecar verifies the raw bytes, deduplicates, maps the
// customer to a tenant, flips flags and audits, in one step. The routes below are gated by
// those flags, with the tenant taken from a bearer token the sidecar verifies.

import { pathToFileURL } from 'node:url';

import express from 'express';
import { CoreSDK } from '@coresdk/client';
import { installStripeWebhook, problemErrorHandler, requireAccess } from '@coresdk/client/express';

/** The app, on `sdk` (default: `CoreSDK.fromEnv()`, so CORESDK_USE_MOCK=true gives the mock). */
export function createApp(sdk = CoreSDK.fromEnv()) {
  const app = express();
  // The app's own JSON API parses JSON everywhere; the webhook route still verifies the bytes
  // Stripe sent, because installStripeWebhook puts it ahead of this parser.
  app.use(express.json());
  installStripeWebhook(app, sdk);

  app.get('/api/analytics', requireAccess(sdk, { require: ['advanced_analytics'] }), (_req, res) => {
    res.json({ tenant: res.locals.coresdk.tenantId, data: { mrr: 12_400, churn: 0.021 } });
  });

  app.get('/api/dashboard', requireAccess(sdk, { denyIf: ['paywall_active'] }), (_req, res) => {
    res.json({ tenant: res.locals.coresdk.tenantId, status: 'active' });
  });

  app.use(problemErrorHandler());
  return app;
}

if (process.argv[1] !== undefined && import.meta.url === pathToFileURL(process.argv[1]).href) {
  const sdk = CoreSDK.fromEnv();
  const port = Number(process.env.PORT ?? 3000);
  const server = createApp(sdk).listen(port, () => console.log(`SecurePay listening on http://localhost:${port}`));
  const stop = () => server.close(() => sdk.close());
  process.once('SIGINT', stop);
  process.once('SIGTERM', stop);
}
