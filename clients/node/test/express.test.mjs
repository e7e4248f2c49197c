// @coresdk/client/express with a real HTTP server, a body parser registered app-wide in either
// order, events signed by stripe-node, against the real sidecar and against the mock.

import assert from 'node:assert/strict';
import { once } from 'node:events';
import { after, before, describe, test } from 'node:test';

import express from 'express';

import { installStripeWebhook, keepRawBody, requireAccess, stripeWebhook } from '../dist/express.js';
import {
  BACKENDS,
  WEBHOOK,
  assertProblem,
  deliver,
  freshTenant,
  gateTests,
  get,
  prettyEvent,
  sidecarAwayTests,
  signed,
  token,
  webhookRouteTests,
} from './web.mjs';

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
        const ctx = {};
        before(async () => {
          const app = express();
          register(app, backend.sdk);
          appRoutes(app, backend.sdk);
          ctx.backend = backend;
          ctx.web = await serve(app);
        });
        after(() => ctx.web?.close());

        webhookRouteTests(ctx, {
          tenantLabel: 'exp',
          bodyLimit: !APP_PARSER_READS_FIRST.has(label),
          checkEcho: (answer) => {
            if (label.startsWith('express.raw()')) assert.equal(answer.parsed.type, 'Buffer');
            else assert.deepEqual(answer.parsed, { hello: 'world' });
          },
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
      const ctx = {};
      before(async () => {
        const app = express();
        app.use(express.json());
        appRoutes(app, backend.sdk);
        ctx.backend = backend;
        ctx.web = await serve(app);
      });
      after(() => ctx.web?.close());

      gateTests(ctx);

      test('a URL longer than the sidecar takes as a resource is still decided (cut to 256 bytes)', async () => {
        const { sdk } = backend;
        const { tenant } = await freshTenant(sdk, 'gate');
        const id = 'x'.repeat(4000);
        const problem = await assertProblem(await get(`${ctx.web.base}/api/items/${id}`, token(tenant)), 403, {
          reason: 'FEATURE_LOCKED',
        });
        assert.equal(problem.instance, `GET /api/items/${id}`.slice(0, 256));
        await sdk.setFlag(tenant, 'advanced_analytics', true, { actor: 'web-tests', reason: 'upgrade' });
        assert.deepEqual(await (await get(`${ctx.web.base}/api/items/${id}`, token(tenant))).json(), { id });
      });
    });

    if (backendName === 'sidecar') {
      sidecarAwayTests(async (clients) => {
        const app = express();
        app.use(express.json());
        installStripeWebhook(app, clients.open);
        app.get('/open', requireAccess(clients.open, { require: ['advanced_analytics'] }), (_req, res) => {
          res.json({ failModeApplied: res.locals.coresdk.failModeApplied });
        });
        app.get('/closed', requireAccess(clients.closed, { require: ['advanced_analytics'] }), (_req, res) => res.json({}));
        app.get('/strict', requireAccess(clients.open, { require: ['advanced_analytics'], failMode: 'closed' }), (_req, res) => res.json({}));
        return serve(app);
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
