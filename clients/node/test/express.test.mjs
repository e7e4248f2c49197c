// @coresdk/client/express with a real HTTP server, a body parser registered app-wide in either
// order, events signed by stripe-node, against the real sidecar and against the mock.

import assert from 'node:assert/strict';
import { once } from 'node:events';
import { after, before, describe, test } from 'node:test';

import express from 'express';

import { SidecarClient, makeSettings } from '../dist/index.js';
import { installStripeWebhook, keepRawBody, requireAccess, stripeWebhook } from '../dist/express.js';
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

/** Serves `app` on an ephemeral port; resolves to its base URL and a close(). */
async function serve(app) {
  const server = app.listen(0, '127.0.0.1');
  await once(server, 'listening');
  return {
    base: `http://127.0.0.1:${server.address().port}`,
    close: () => {
      server.closeAllConnections();
      return new Promise((resolveClose) => server.close(resolveClose));
    },
  };
}

/** The app's own routes beside the helpers: a JSON echo (the app-wide parser at work) and two gated routes. */
function appRoutes(app, sdk) {
  app.post('/api/echo', (req, res) => res.json({ parsed: req.body }));
  app.get('/api/reports', requireAccess(sdk, { require: ['advanced_analytics'] }), (_req, res) => {
    res.json({ tenant: res.locals.coresdk.tenantId, subject: res.locals.coresdk.subject });
  });
  app.get('/api/dashboard', requireAccess(sdk, { denyIf: ['paywall_active'] }), (_req, res) => {
    res.json({ tenant: res.locals.coresdk.tenantId });
  });
  app.get('/api/items/:id', requireAccess(sdk, { require: ['advanced_analytics'] }), (req, res) => {
    res.json({ id: req.params.id });
  });
}

// Each way an app may combine its JSON parser with the webhook route and still have the
// bytes verified as Stripe sent them. In the last two the app's parser reads the body (and
// answers a body over its own limit itself); in the others the route reads it first.
const APP_PARSER_READS_FIRST = new Set([
  'express.json({ verify: keepRawBody }) registered before the stripeWebhook router',
  'express.raw() registered app-wide before the stripeWebhook router',
]);
const WORKING_REGISTRATIONS = {
  'express.json() registered before installStripeWebhook': (app, sdk) => {
    app.use(express.json());
    installStripeWebhook(app, sdk);
  },
  'express.json() registered after installStripeWebhook': (app, sdk) => {
    installStripeWebhook(app, sdk);
    app.use(express.json());
  },
  'express.json({ verify: keepRawBody }) registered before the stripeWebhook router': (app, sdk) => {
    app.use(express.json({ verify: keepRawBody }));
    app.use(stripeWebhook(sdk));
  },
  'the stripeWebhook router mounted before express.json()': (app, sdk) => {
    app.use(stripeWebhook(sdk));
    app.use(express.json());
  },
  'express.raw() registered app-wide before the stripeWebhook router': (app, sdk) => {
    app.use(express.raw({ type: '*/*' }));
    app.use(stripeWebhook(sdk));
  },
};

for (const [backendName, makeBackend] of Object.entries(BACKENDS)) {
  describe(`Express helpers against the ${backendName}`, () => {
    let backend;
    before(async () => {
      backend = await makeBackend();
    });
    after(() => backend?.close());

    for (const [label, register] of Object.entries(WORKING_REGISTRATIONS)) {
      describe(label, () => {
        let web;
        before(async () => {
          const app = express();
          register(app, backend.sdk);
          appRoutes(app, backend.sdk);
          web = await serve(app);
        });
        after(() => web?.close());

        test('a signed event is verified over the bytes as sent, applied, and answered 200', async () => {
          const { sdk } = backend;
          const { customer, tenant } = await freshTenant(sdk, 'exp');
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

          // The same delivery again: acknowledged, changes nothing.
          const again = await deliver(`${web.base}${WEBHOOK}`, body, signed(body));
          assert.equal(again.status, 200);
          assert.equal((await again.json()).outcome, 'duplicate');
        });

        test('a forged or missing signature is a 400 problem and changes nothing', async () => {
          const { sdk } = backend;
          const { customer, tenant } = await freshTenant(sdk, 'exp');
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
          const { customer, tenant } = await freshTenant(sdk, 'exp');
          const body = prettyEvent('invoice.paid', customer);
          await assertProblem(await deliverGzipped(`${web.base}${WEBHOOK}`, body), 415, {
            reason: 'UNSUPPORTED_MEDIA_TYPE',
            instance: `POST ${WEBHOOK}`,
          });
          assert.equal(await sdk.isEnabled(tenant, 'pro_features'), false);
        });

        if (!APP_PARSER_READS_FIRST.has(label)) {
          test('a body over the 1 MiB limit is a 413 problem', async () => {
            const body = `{"padding":"${'x'.repeat(1024 * 1024)}"}`;
            await assertProblem(await deliver(`${web.base}${WEBHOOK}`, body, signed(body)), 413, {
              reason: 'PAYLOAD_TOO_LARGE',
              instance: `POST ${WEBHOOK}`,
            });
          });
        }

        test("the app's own routes still get their parsed JSON", async () => {
          const response = await fetch(`${web.base}/api/echo`, {
            method: 'POST',
            body: '{"hello": "world"}',
            headers: { 'content-type': 'application/json' },
            signal: AbortSignal.timeout(HTTP_TIMEOUT_MS),
          });
          const answer = await response.json();
          if (label.startsWith('express.raw()')) assert.equal(answer.parsed.type, 'Buffer');
          else assert.deepEqual(answer.parsed, { hello: 'world' });
        });
      });
    }

    // Parsers that consumed the body and kept something other than its bytes.
    const LOSSY_REGISTRATIONS = {
      'a plain express.json() registered before the stripeWebhook router': (app) => app.use(express.json()),
      "express.text() registered app-wide before the stripeWebhook router (a decoded string)": (app) =>
        app.use(express.text({ type: '*/*' })),
    };
    for (const [label, registerParser] of Object.entries(LOSSY_REGISTRATIONS)) {
      describe(label, () => {
        let web;
        before(async () => {
          const app = express();
          registerParser(app);
          app.use(stripeWebhook(backend.sdk));
          web = await serve(app);
        });
        after(() => web?.close());

        test('is a 500 problem naming the fix; the body is never verified from what the parser kept', async () => {
          const { sdk } = backend;
          const { customer, tenant } = await freshTenant(sdk, 'exp');
          const body = prettyEvent('invoice.paid', customer);
          const problem = await assertProblem(await deliver(`${web.base}${WEBHOOK}`, body, signed(body)), 500, {
            reason: 'RAW_BODY_UNAVAILABLE',
            instance: `POST ${WEBHOOK}`,
          });
          assert.match(problem.detail, /installStripeWebhook/);
          assert.match(problem.detail, /keepRawBody/);
          assert.equal(await sdk.isEnabled(tenant, 'pro_features'), false);
          assert.deepEqual(await sdk.auditQuery({ tenantId: tenant, eventPrefix: 'billing.' }), []);
        });
      });
    }

    describe('requireAccess', () => {
      let web;
      before(async () => {
        const app = express();
        app.use(express.json());
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
        await assertProblem(
          await fetch(url, { headers: { authorization: 'Basic dXNlcjpwYXNz' }, signal: AbortSignal.timeout(HTTP_TIMEOUT_MS) }),
          401,
          { reason: 'UNAUTHENTICATED', instance },
        );
        // A token of only U+0085 (a byte Node reads as that character) is none, as the sidecar trims it.
        await assertProblem(await get(url, '\x85'), 401, { reason: 'UNAUTHENTICATED', instance });
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

      test('a URL longer than the sidecar takes as a resource is still decided (cut to 256 bytes)', async () => {
        const { sdk } = backend;
        const { tenant } = await freshTenant(sdk, 'gate');
        const id = 'x'.repeat(4000);
        const problem = await assertProblem(await get(`${web.base}/api/items/${id}`, token(tenant)), 403, {
          reason: 'FEATURE_LOCKED',
        });
        assert.equal(problem.instance, `GET /api/items/${id}`.slice(0, 256));
        await sdk.setFlag(tenant, 'advanced_analytics', true, { actor: 'web-tests', reason: 'upgrade' });
        assert.deepEqual(await (await get(`${web.base}/api/items/${id}`, token(tenant))).json(), { id });
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
          const app = express();
          app.use(express.json());
          installStripeWebhook(app, clients.open);
          app.get('/open', requireAccess(clients.open, { require: ['advanced_analytics'] }), (_req, res) => {
            res.json({ failModeApplied: res.locals.coresdk.failModeApplied });
          });
          app.get('/closed', requireAccess(clients.closed, { require: ['advanced_analytics'] }), (_req, res) => res.json({}));
          app.get('/strict', requireAccess(clients.open, { require: ['advanced_analytics'], failMode: 'closed' }), (_req, res) => res.json({}));
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
          // Any bearer string: it would pass the `open` gate unverified.
          await assertProblem(await get(`${web.base}/strict`, 'not-a-token'), 503, { instance: 'GET /strict' });
        });
      });
    }

    test("an error the webhook route passes on is the app's error handler's, not a body error", async () => {
      // A client whose failure is no problem (a bug): the route passes it on with next(error).
      const failing = Object.create(backend.sdk, {
        handleStripeWebhook: { value: async () => Promise.reject(Object.assign(new Error('the app broke'), { status: 401 })) },
      });
      const app = express();
      installStripeWebhook(app, failing);
      app.use((error, _req, res, _next) => res.status(418).json({ appHandler: error.message }));
      const web = await serve(app);
      try {
        const body = prettyEvent('invoice.paid', 'cus_acme_001');
        const response = await deliver(`${web.base}${WEBHOOK}`, body, signed(body));
        assert.equal(response.status, 418);
        assert.deepEqual(await response.json(), { appHandler: 'the app broke' });
      } finally {
        await web.close();
      }
    });
  });
}
