// What the Express and Fastify helper tests share: the two backends every helper test runs
// against (the real sidecar binary, and the in-process mock), Stripe events whose bytes a
// re-serialisation would change, signed with stripe-node's own test signer, and tenants of
// their own so tests sharing one backend never meet; and the tests both frameworks' helpers must
// pass alike (the webhook route, the gate, a sidecar that is away).

import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { createServer } from 'node:net';
import { after, before, describe, test } from 'node:test';
import { gzipSync } from 'node:zlib';

import Stripe from 'stripe';

import { CoreSDK, SidecarClient, makeSettings } from '../dist/index.js';
import { ENV, Sidecar, clientFor } from './helpers.mjs';
import { token } from './suite.mjs';

export { ENV, token };

export const PROBLEM_JSON = 'application/problem+json';
/** Hang guard for one HTTP exchange, not a speed assertion. */
export const HTTP_TIMEOUT_MS = 30_000;

/** name → () => Promise<{ sdk, close }>: each helper suite runs once per backend. */
export const BACKENDS = {
  sidecar: async () => {
    const sidecar = await Sidecar.start();
    try {
      const sdk = await clientFor(sidecar);
      return {
        sdk,
        sidecar,
        close: async () => {
          await sdk.close();
          await sidecar.close();
        },
      };
    } catch (error) {
      await sidecar.close();
      throw error;
    }
  },
  mock: async () => {
    // The mock verifies signatures and tokens with the same secrets as the sidecar of ENV.
    const sdk = CoreSDK.fromEnv({ ...ENV, CORESDK_USE_MOCK: 'true' });
    return { sdk, sidecar: null, close: () => sdk.close() };
  },
};

/** Signs `payload` as Stripe does, with stripe-node's own helper. */
export function signed(payload, secret = ENV.STRIPE_WEBHOOK_SECRET) {
  return Stripe.webhooks.generateTestHeaderString({ payload: payload.toString(), secret });
}

/**
 * A Stripe event as Stripe formats one (indented, `id` not first) with a number whose text
 * JSON.parse → JSON.stringify changes (`1.50` → `1.5`): its signature holds only over these
 * exact bytes, so a helper that verified a re-serialised body would answer 400 instead of 200.
 */
export function prettyEvent(type, customer, { created = Math.floor(Date.now() / 1000) } = {}) {
  const body = `{
  "object": "event",
  "type": ${JSON.stringify(type)},
  "id": "evt_web_${randomUUID().replaceAll('-', '')}",
  "created": ${created},
  "data": {
    "object": { "amount_paid": 1.50, "currency": "eur", "customer": ${JSON.stringify(customer)} }
  }
}
`;
  assert.notEqual(JSON.stringify(JSON.parse(body)), body, 'the event must change when re-serialised');
  return body;
}

/** A fresh Stripe customer mapped to a fresh tenant. */
export async function freshTenant(sdk, label) {
  const unique = randomUUID().slice(0, 8);
  const customer = `cus_${label}_${unique}`;
  const tenant = `${label}-${unique}`;
  await sdk.mapCustomer(customer, tenant, { actor: 'web-tests', reason: 'test tenant' });
  return { customer, tenant };
}

/** POSTs a delivery to `url`; `signature` undefined sends none. */
export function deliver(url, body, signature) {
  const headers = { 'content-type': 'application/json; charset=utf-8' };
  if (signature !== undefined) headers['stripe-signature'] = signature;
  return fetch(url, { method: 'POST', body, headers, signal: AbortSignal.timeout(HTTP_TIMEOUT_MS) });
}

/** POSTs `body` gzip-compressed, signed over its uncompressed bytes (Stripe never does this). */
export function deliverGzipped(url, body) {
  const headers = { 'content-type': 'application/json', 'content-encoding': 'gzip', 'stripe-signature': signed(body) };
  return fetch(url, { method: 'POST', body: gzipSync(body), headers, signal: AbortSignal.timeout(HTTP_TIMEOUT_MS) });
}

export function get(url, bearer) {
  const headers = bearer === undefined ? {} : { authorization: `Bearer ${bearer}` };
  return fetch(url, { headers, signal: AbortSignal.timeout(HTTP_TIMEOUT_MS) });
}

/** Asserts `response` is an `application/problem+json` problem of `status` and returns it. */
export async function assertProblem(response, status, { reason, typeEnds, instance } = {}) {
  const text = await response.text();
  assert.equal(response.status, status, text);
  assert.match(response.headers.get('content-type') ?? '', /^application\/problem\+json(;|$)/, text);
  const problem = JSON.parse(text);
  assert.equal(problem.status, status, text);
  if (reason !== undefined) assert.equal(problem.reason, reason, text);
  if (typeEnds !== undefined) assert.ok(String(problem.type).endsWith(typeEnds), text);
  if (instance !== undefined) assert.equal(problem.instance, instance, text);
  return problem;
}

/** A TCP port nothing listens on (bound, then released), for a sidecar that is away. */
export async function deadAddress() {
  const server = createServer();
  await new Promise((resolveListen) => server.listen(0, '127.0.0.1', resolveListen));
  const { port } = server.address();
  await new Promise((resolveClose) => server.close(resolveClose));
  return `127.0.0.1:${port}`;
}

/** Where both frameworks' helpers put the webhook route by default. */
export const WEBHOOK = '/webhooks/stripe';

/**
 * The webhook route's tests, the same for every framework and registration: `ctx.web` (the
 * served app) and `ctx.backend` are set by the caller's `before`. `bodyLimit`: the route, not
 * an app parser, reads the body, so its 1 MiB limit answers. `checkEcho(answer)`: what the
 * app's own `/api/echo` route answered, its parser at work.
 */
export function webhookRouteTests(ctx, { tenantLabel, bodyLimit = true, checkEcho }) {
  test('a signed event is verified over the bytes as sent, applied, and answered 200', async () => {
    const { sdk } = ctx.backend;
    const { customer, tenant } = await freshTenant(sdk, tenantLabel);
    const body = prettyEvent('invoice.paid', customer);
    const response = await deliver(`${ctx.web.base}${WEBHOOK}`, body, signed(body));
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
    const again = await deliver(`${ctx.web.base}${WEBHOOK}`, body, signed(body));
    assert.equal(again.status, 200);
    assert.equal((await again.json()).outcome, 'duplicate');
  });

  test('a forged or missing signature is a 400 problem and changes nothing', async () => {
    const { sdk } = ctx.backend;
    const { customer, tenant } = await freshTenant(sdk, tenantLabel);
    const body = prettyEvent('invoice.paid', customer);
    await assertProblem(await deliver(`${ctx.web.base}${WEBHOOK}`, body, signed(body, 'whsec_forged')), 400, {
      reason: 'SIGNATURE_MISMATCH',
      typeEnds: '/invalid-signature',
    });
    await assertProblem(await deliver(`${ctx.web.base}${WEBHOOK}`, body, undefined), 400, {
      reason: 'SIGNATURE_MISSING',
    });
    assert.equal(await sdk.isEnabled(tenant, 'pro_features'), false);
  });

  test('a compressed delivery is a 415 problem, never inflated and verified', async () => {
    const { sdk } = ctx.backend;
    const { customer, tenant } = await freshTenant(sdk, tenantLabel);
    const body = prettyEvent('invoice.paid', customer);
    await assertProblem(await deliverGzipped(`${ctx.web.base}${WEBHOOK}`, body), 415, {
      reason: 'UNSUPPORTED_MEDIA_TYPE',
      instance: `POST ${WEBHOOK}`,
    });
    assert.equal(await sdk.isEnabled(tenant, 'pro_features'), false);
  });

  if (bodyLimit) {
    test('a body over the 1 MiB limit is a 413 problem', async () => {
      const body = `{"padding":"${'x'.repeat(1024 * 1024)}"}`;
      await assertProblem(await deliver(`${ctx.web.base}${WEBHOOK}`, body, signed(body)), 413, {
        reason: 'PAYLOAD_TOO_LARGE',
        instance: `POST ${WEBHOOK}`,
      });
    });
  }

  test("the app's own routes still get their parsed JSON", async () => {
    const response = await fetch(`${ctx.web.base}/api/echo`, {
      method: 'POST',
      body: '{"hello": "world"}',
      headers: { 'content-type': 'application/json' },
      signal: AbortSignal.timeout(HTTP_TIMEOUT_MS),
    });
    checkEcho(await response.json());
  });
}

/**
 * The gate's tests, the same for every framework: `ctx.web` serves `/api/reports` (requiring
 * `advanced_analytics`, answering `{ tenant, subject }`) and `/api/dashboard` (denied while
 * `paywall_active`), `ctx.backend` is the backend.
 */
export function gateTests(ctx) {
  test('401 without a bearer token, 403 with the flag off, 200 with it on', async () => {
    const { sdk } = ctx.backend;
    const { tenant } = await freshTenant(sdk, 'gate');
    const url = `${ctx.web.base}/api/reports?range=30d`;
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

  test('402 while a denyIf flag is on', async () => {
    const { sdk } = ctx.backend;
    const { tenant } = await freshTenant(sdk, 'gate');
    const url = `${ctx.web.base}/api/dashboard`;
    assert.equal((await get(url, token(tenant))).status, 200);
    await sdk.setFlag(tenant, 'paywall_active', true, { actor: 'web-tests', reason: 'payment failed' });
    await assertProblem(await get(url, token(tenant)), 402, {
      reason: 'PAYMENT_REQUIRED',
      typeEnds: '/payment-required',
      instance: 'GET /api/dashboard',
    });
  });
}

/**
 * What the helpers do while the sidecar is away, the same for every framework.
 * `serveApp(clients)` serves an app with the webhook route on `clients.open` and three gated
 * routes requiring `advanced_analytics`: `/open` (on `clients.open`, answering
 * `{ failModeApplied }`), `/closed` (on `clients.closed`) and `/strict` (on `clients.open`,
 * the gate's own `failMode: 'closed'`).
 */
export function sidecarAwayTests(serveApp) {
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
      web = await serveApp(clients);
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
