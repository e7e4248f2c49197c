// @coresdk/client/fastify with a real HTTP server, a JSON parser of the app's registered before
// or after the plugin, events signed by stripe-node, against the real sidecar and the mock.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';

import Fastify from 'fastify';

import { coresdk, requireAccess } from '../dist/fastify.js';
import {
  BACKENDS,
  HTTP_TIMEOUT_MS,
  WEBHOOK,
  assertProblem,
  deliver,
  gateTests,
  prettyEvent,
  sidecarAwayTests,
  signed,
  webhookRouteTests,
} from './web.mjs';

/**
 * The app's own JSON parser, replacing Fastify's built-in one app-wide, as apps do to add
 * options; it re-serialises nothing itself, but would hand the webhook a parsed object.
 */
function appJsonParser(app) {
  app.removeContentTypeParser('application/json');
  app.addContentTypeParser('application/json', { parseAs: 'string' }, (_request, body, done) => {
    try {
      done(null, JSON.parse(body));
    } catch (error) {
      error.statusCode = 400;
      done(error, undefined);
    }
  });
}

/** The app's own routes beside the plugin: a JSON echo and two gated routes. */
function appRoutes(app, sdk) {
  app.post('/api/echo', async (request) => ({ parsed: request.body }));
  app.get('/api/reports', { preHandler: requireAccess(sdk, { require: ['advanced_analytics'] }) }, async (request) => ({
    tenant: request.coresdk.tenantId,
    subject: request.coresdk.subject,
  }));
  app.get('/api/dashboard', { preHandler: requireAccess(sdk, { denyIf: ['paywall_active'] }) }, async (request) => ({
    tenant: request.coresdk.tenantId,
  }));
}

async function serve(app) {
  const base = await app.listen({ port: 0, host: '127.0.0.1' });
  return { base, close: () => app.close() };
}

const REGISTRATIONS = {
  "the app's JSON parser registered before the plugin": async (app, sdk) => {
    appJsonParser(app);
    await app.register(coresdk, { sdk });
  },
  "the app's JSON parser registered after the plugin": async (app, sdk) => {
    await app.register(coresdk, { sdk });
    appJsonParser(app);
  },
  "Fastify's built-in JSON parser, the plugin not awaited": async (app, sdk) => {
    app.register(coresdk, { sdk });
  },
};

for (const [backendName, makeBackend] of Object.entries(BACKENDS)) {
  describe(`Fastify plugin against the ${backendName}`, () => {
    let backend;
    before(async () => {
      backend = await makeBackend();
    });
    after(() => backend?.close());

    for (const [label, register] of Object.entries(REGISTRATIONS)) {
      describe(label, () => {
        const ctx = {};
        before(async () => {
          const app = Fastify();
          await register(app, backend.sdk);
          appRoutes(app, backend.sdk);
          ctx.backend = backend;
          ctx.web = await serve(app);
        });
        after(() => ctx.web?.close());

        webhookRouteTests(ctx, {
          tenantLabel: 'fst',
          checkEcho: (answer) => assert.deepEqual(answer, { parsed: { hello: 'world' } }),
        });
      });
    }

    describe('requireAccess', () => {
      const ctx = {};
      before(async () => {
        const app = Fastify();
        await app.register(coresdk, { sdk: backend.sdk, webhookPath: false });
        appRoutes(app, backend.sdk);
        ctx.backend = backend;
        ctx.web = await serve(app);
      });
      after(() => ctx.web?.close());

      gateTests(ctx);

      test('no webhook route when webhookPath is false', async () => {
        const body = prettyEvent('invoice.paid', 'cus_acme_001');
        assert.equal((await deliver(`${ctx.web.base}${WEBHOOK}`, body, signed(body))).status, 404);
      });
    });

    if (backendName === 'sidecar') {
      sidecarAwayTests(async (clients) => {
        const app = Fastify();
        await app.register(coresdk, { sdk: clients.open });
        app.get('/open', { preHandler: requireAccess(clients.open, { require: ['advanced_analytics'] }) }, async (request) => ({
          failModeApplied: request.coresdk.failModeApplied,
        }));
        app.get('/closed', { preHandler: requireAccess(clients.closed, { require: ['advanced_analytics'] }) }, async () => ({}));
        app.get('/strict', { preHandler: requireAccess(clients.open, { require: ['advanced_analytics'], failMode: 'closed' }) }, async () => ({}));
        return serve(app);
      });
    }

    test("an app hook's 4xx on the webhook route keeps its answer; only body errors become problems", async () => {
      const app = Fastify();
      // A rate limiter of the app's, inherited by the webhook route's scope.
      app.addHook('onRequest', async (request) => {
        if (request.headers['x-over-limit'] !== undefined) throw Object.assign(new Error('Rate limit exceeded'), { statusCode: 429 });
      });
      await app.register(coresdk, { sdk: backend.sdk });
      const web = await serve(app);
      try {
        const body = prettyEvent('invoice.paid', 'cus_acme_001');
        const limited = await fetch(`${web.base}${WEBHOOK}`, {
          method: 'POST',
          body,
          headers: { 'content-type': 'application/json', 'stripe-signature': signed(body), 'x-over-limit': '1' },
          signal: AbortSignal.timeout(HTTP_TIMEOUT_MS),
        });
        assert.equal(limited.status, 429, await limited.text());
        const big = `{"padding":"${'x'.repeat(1024 * 1024)}"}`;
        await assertProblem(await deliver(`${web.base}${WEBHOOK}`, big, signed(big)), 413, { reason: 'PAYLOAD_TOO_LARGE' });
      } finally {
        await web.close();
      }
    });
  });
}
