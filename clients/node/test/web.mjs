// What the Express and Fastify helper tests share: the two backends every helper test runs
// against (the real sidecar binary, and the in-process mock), Stripe events whose bytes a
// re-serialisation would change, signed with stripe-node's own test signer, and tenants of
// their own so tests sharing one backend never meet.

import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { createServer } from 'node:net';
import { gzipSync } from 'node:zlib';

import Stripe from 'stripe';

import { CoreSDK } from '../dist/index.js';
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
