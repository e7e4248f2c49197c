// @coresdk/client/fastify with a real HTTP server, a JSON parser of the app's registered before
// or after the plugin, events signed by stripe-node, against the real sidecar and the mock.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';

import Fastify from 'fastify';

import { SidecarClient, makeSettings } from '../dist/index.js';
import { coresdk, requireAccess } from '../dist/fastify.js';
import {
  BACKENDS,
  ENV,
  HTTP_TIMEOUT_MS,
  assertProblem,
  deadAddress,
  deliver,
  deliverGzipped,
  freshTenant,
  get,
  prettyEvent,
  signed,
  token,
} from './web.mjs';

const WEBHOOK = '/webhooks/stripe';

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
        let web;
        before(async () => {
          const app = Fastify();
          await register(app, backend.sdk);
          appRoutes(app, backend.sdk);
          web = await serve(app);
        });
        after(() => web?.close());

        test('a signed event is verified over the bytes as sent, applied, and answered 200', async () => {
          const { sdk } = backend;
          const { customer, tenant } = await freshTenant(sdk, 'fst');
          const body = prettyEvent('invoice.paid', customer);
          const response = await deliver(`${web.base}${WEBHOOK}`, body, signed(body));
          const text = await response.text();
          assert.equal(response.status, 200, text);
          const answer = JSON.parse(text);
          assert.equal(answer.received, true);
          assert.equal(answer.event_id, JSON.parse(body).id);
          assert.equal(answer.tenant_id, tenant);
          assert.equal(answer.outcome, 'applied');
          assert.ok(answer.flag_changes.some((c) => c.key === 'pro_features' && c.value === true), text);
          assert.equal(await sdk.isEnabled(tenant, 'pro_features'), true);
        });

        test('a forged or missing signature is a 400 problem and changes nothing', async () => {
          const { sdk } = backend;
          const { customer, tenant } = await freshTenant(sdk, 'fst');
          const body = prettyEvent('invoice.paid', customer);
          await assertProblem(await deliver(`${web.base}${WEBHOOK}`, body, signed(body, 'whsec_forged')), 400, {
            reason: 'SIGNATURE_MISMATCH',
            typeEnds: '/invalid-signature',
          });
          await assertProblem(await deliver(`${web.base}${WEBHOOK}`, body, undefined), 400, {
            reason: 'SIGNATURE_MISSING',
          });
          assert.equal(await sdk.isEnabled(tenant, 'pro_features'), false);
        });

        test('a compressed delivery is a 415 problem, never inflated and verified', async () => {
          const { sdk } = backend;
          const { customer, tenant } = await freshTenant(sdk, 'fst');
          const body = prettyEvent('invoice.paid', customer);
          await assertProblem(await deliverGzipped(`${web.base}${WEBHOOK}`, body), 415, {
            reason: 'UNSUPPORTED_MEDIA_TYPE',
            instance: `POST ${WEBHOOK}`,
          });
          assert.equal(await sdk.isEnabled(tenant, 'pro_features'), false);
        });

        test('a body over the 1 MiB limit is a 413 problem', async () => {
          const body = `{"padding":"${'x'.repeat(1024 * 1024)}"}`;
          await assertProblem(await deliver(`${web.base}${WEBHOOK}`, body, signed(body)), 413, {
            reason: 'PAYLOAD_TOO_LARGE',
            instance: `POST ${WEBHOOK}`,
          });
        });

        test("the app's own routes still get their parsed JSON", async () => {
          const response = await fetch(`${web.base}/api/echo`, {
            method: 'POST',
            body: '{"hello": "world"}',
            headers: { 'content-type': 'application/json' },
            signal: AbortSignal.timeout(HTTP_TIMEOUT_MS),
          });
          assert.deepEqual(await response.json(), { parsed: { hello: 'world' } });
        });
      });
    }

    describe('requireAccess', () => {
      let web;
      before(async () => {
        const app = Fastify();
        await app.register(coresdk, { sdk: backend.sdk, webhookPath: false });
        appRoutes(app, backend.sdk);
        web = await serve(app);
      });
      after(() => web?.close());

      test('401 without a bearer token, 403 with the flag off, 200 with it on', async () => {
        const { sdk } = backend;
        const { tenant } = await freshTenant(sdk, 'gate');
        const url = `${web.base}/api/reports?range=30d`;
        const instance = 'GET /api/reports';
        await assertProblem(await get(url), 401, { reason: 'UNAUTHENTICATED', typeEnds: '/unauthenticated', instance });
        await assertProblem(await get(url, token(tenant, {}, 'another-secret-of-at-least-32-bytes!')), 401, { instance });
        await assertProblem(await get(url, token(tenant)), 403, {
          reason: 'FEATURE_LOCKED',
          typeEnds: '/feature-locked',
          instance,
        });
        await sdk.setFlag(tenant, 'advanced_analytics', true, { actor: 'web-tests', reason: 'upgrade' });
        const allowed = await get(url, token(tenant));
        assert.equal(allowed.status, 200);
        assert.deepEqual(await allowed.json(), { tenant, subject: `user@${tenant}` });
      });

      test('402 while a denyIf flag is on', async () => {
        const { sdk } = backend;
        const { tenant } = await freshTenant(sdk, 'gate');
        const url = `${web.base}/api/dashboard`;
        assert.equal((await get(url, token(tenant))).status, 200);
        await sdk.setFlag(tenant, 'paywall_active', true, { actor: 'web-tests', reason: 'payment failed' });
        await assertProblem(await get(url, token(tenant)), 402, {
          reason: 'PAYMENT_REQUIRED',
          typeEnds: '/payment-required',
          instance: 'GET /api/dashboard',
        });
      });

      test('no webhook route when webhookPath is false', async () => {
        const body = prettyEvent('invoice.paid', 'cus_acme_001');
        assert.equal((await deliver(`${web.base}${WEBHOOK}`, body, signed(body))).status, 404);
      });
    });

    if (backendName === 'sidecar') {
      describe('a sidecar that is away', () => {
        let web;
        let clients;
        before(async () => {
          const addr = await deadAddress();
          const client = (failMode) =>
            new SidecarClient(
              makeSettings({ sidecarAddr: addr, failMode, timeoutMs: 300, problemTypeBase: ENV.CORESDK_PROBLEM_TYPE_BASE }),
            );
          clients = { open: client('open'), closed: client('closed') };
          const app = Fastify();
          await app.register(coresdk, { sdk: clients.open });
          app.get('/open', { preHandler: requireAccess(clients.open, { require: ['advanced_analytics'] }) }, async (request) => ({
            failModeApplied: request.coresdk.failModeApplied,
          }));
          app.get('/closed', { preHandler: requireAccess(clients.closed, { require: ['advanced_analytics'] }) }, async () => ({}));
          app.get('/strict', { preHandler: requireAccess(clients.open, { require: ['advanced_analytics'], failMode: 'closed' }) }, async () => ({}));
          web = await serve(app);
        });
        after(async () => {
          await web?.close();
          await Promise.all(Object.values(clients ?? {}).map((c) => c.close()));
        });

        test('a webhook is a 503 problem (never decided by the fail mode), so Stripe retries', async () => {
          const body = prettyEvent('invoice.paid', 'cus_acme_001');
          await assertProblem(await deliver(`${web.base}${WEBHOOK}`, body, signed(body)), 503, {
            reason: 'SIDECAR_UNAVAILABLE',
          });
        });

        test('the gate lets the request through under fail mode open and answers 503 under closed', async () => {
          const open = await get(`${web.base}/open`, token('acme-corp'));
          assert.equal(open.status, 200);
          assert.deepEqual(await open.json(), { failModeApplied: true });
          await assertProblem(await get(`${web.base}/closed`, token('acme-corp')), 503, { instance: 'GET /closed' });
        });

        test("a gate with failMode 'closed' answers 503 under the client's fail mode open", async () => {
          await assertProblem(await get(`${web.base}/strict`, token('acme-corp')), 503, {
            reason: 'SIDECAR_UNAVAILABLE',
            instance: 'GET /strict',
          });
          await assertProblem(await get(`${web.base}/strict`, 'not-a-token'), 503, { instance: 'GET /strict' });
        });
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
