// The SecurePay walkthrough's 12 checks, run against the Express app in app.mjs over real HTTP.
//
//   CORESDK_USE_MOCK=true node run_checks.mjs     # the in-process mock
//   node run_checks.mjs                           # a sidecar at CORESDK_SIDECAR_ADDR
//
// Against a real sidecar, it must know the tenants cus_acme_001 → acme-corp, cus_globex_001 →
// globex, cus_initech_001 → initech (mock mode, or examples/tenants.json), and share
// STRIPE_WEBHOOK_SECRET and CORESDK_JWT_SECRET with this script. Test events are signed with
// stripe-node's own generateTestHeaderString; every run uses fresh event ids and sets up the
// state it checks, so it passes run after run against the same durable sidecar. The same
// checks as examples/securepay/run_checks.py. Exit status 0 only when all 12 pass.

import { once } from 'node:events';
import { setTimeout as sleep } from 'node:timers/promises';

import { SignJWT } from 'jose';
import Stripe from 'stripe';
import { CoreSDK } from '@coresdk/client';

import { createApp } from './app.mjs';

// Before the SDK is made: the mock reads the secrets from the environment too.
const SECRET = (process.env.STRIPE_WEBHOOK_SECRET ??= 'whsec_test_secret');
const JWT_SECRET = (process.env.CORESDK_JWT_SECRET ??= 'securepay-demo-jwt-secret-32-bytes-min');
// Event ids sort in the order this script sends them, this run's after an earlier run's: the
// sidecar orders events of the same second (and tie rank) by id (README: the tie rule), and
// these checks send several per second.
const RUN = (BigInt(Date.now()) * 1_000_000n + (process.hrtime.bigint() % 1_000_000n)).toString(16).padStart(16, '0');
let sent = 0;

/** A bearer token for a user of `tenant`, signed as the sidecar expects (HS256, CORESDK_JWT_SECRET). */
function token(tenant) {
  return new SignJWT({ tenant_id: tenant })
    .setProtectedHeader({ alg: 'HS256' })
    .setSubject(`user@${tenant}`)
    .setExpirationTime('10m')
    .sign(new TextEncoder().encode(JWT_SECRET));
}

function event(type, customer, { secondsAgo = 0, ...objectFields } = {}) {
  return JSON.stringify({
    id: `evt_${RUN}_${String(sent++).padStart(4, '0')}`,
    object: 'event',
    type,
    created: Math.floor(Date.now() / 1000) - secondsAgo,
    data: { object: { customer, ...objectFields } },
  });
}

function signed(body, secret = SECRET) {
  return Stripe.webhooks.generateTestHeaderString({ payload: body, secret });
}

async function main() {
  const sdk = CoreSDK.fromEnv();
  const server = createApp(sdk).listen(0, '127.0.0.1');
  await once(server, 'listening');
  const base = `http://127.0.0.1:${server.address().port}`;
  const results = [];
  try {
    const check = (label, ok) => {
      results.push(Boolean(ok));
      console.log(`  [${ok ? 'PASS' : 'FAIL'}] ${label}`);
    };
    const post = (body, signature) => {
      const headers = { 'content-type': 'application/json' };
      if (signature !== undefined) headers['stripe-signature'] = signature;
      return fetch(`${base}/webhooks/stripe`, { method: 'POST', body, headers, signal: AbortSignal.timeout(30_000) });
    };
    const postJson = async (body) => (await post(body, signed(body))).json();
    const get = async (path, bearer) =>
      fetch(`${base}${path}`, { headers: { authorization: `Bearer ${bearer}` }, signal: AbortSignal.timeout(30_000) });
    const audited = async (tenant, name) =>
      (await sdk.auditQuery({ tenantId: tenant, eventPrefix: name })).some((r) => r.event === name && r.tenantId === tenant);

    const mode = sdk.settings.useMock ? 'mock' : `sidecar at ${sdk.settings.sidecarAddr}`;
    console.log(`SecurePay Webhook Processor — Test Suite (${mode})`);
    console.log('==========================================');

    console.log('▸ Webhook Validation');
    let body = event('invoice.paid', 'cus_acme_001', { id: `in_${RUN}` });
    check('Valid Stripe signature accepted', (await post(body, signed(body))).status === 200);
    check('Invalid signature → 400 (replay/forgery blocked)', (await post(body, signed(body, 'whsec_forged'))).status === 400);
    const missing = await post(body, undefined);
    check(
      'Missing signature header → 400',
      missing.status === 400 && (missing.headers.get('content-type') ?? '').startsWith('application/problem+json'),
    );

    console.log('▸ invoice.paid — Feature Flag Activation');
    body = event('invoice.paid', 'cus_acme_001', { id: `in_${RUN}_2` });
    let answer = await postJson(body);
    check('invoice.paid enables pro_features for acme-corp', answer.tenant_id === 'acme-corp' && answer.outcome === 'applied');
    check('pro_features flag is ON after payment', await sdk.isEnabled('acme-corp', 'pro_features'));
    check('Audit event recorded: billing.invoice.paid', await audited('acme-corp', 'billing.invoice.paid'));

    console.log('▸ payment.failed — Paywall Enforcement');
    await postJson(event('invoice.paid', 'cus_globex_001')); // globex was paying before its payment failed
    answer = await postJson(event('payment.failed', 'cus_globex_001'));
    const turnedOff = (answer.flag_changes ?? []).some((c) => c.key === 'pro_features' && c.value === false);
    check('payment.failed disables pro_features for globex', answer.tenant_id === 'globex' && turnedOff);
    check(
      'pro_features flag is OFF after failure',
      !(await sdk.isEnabled('globex', 'pro_features')) && (await sdk.isEnabled('globex', 'paywall_active')),
    );
    check('Audit event recorded: billing.payment.failed', await audited('globex', 'billing.payment.failed'));

    console.log('▸ subscription.upgraded — Tier Promotion');
    const initech = await token('initech');
    // A durable sidecar remembers the last run's upgrade: start from a cancelled subscription,
    // so "before the upgrade" holds on every run against the same sidecar, not only the first.
    // Flags follow the newest event by `created`, and within one second a deletion is the last
    // word (the tie rule in the README). So: cancel at the start of a fresh second, later than
    // any earlier run's upgrade, and upgrade one second after the cancellation.
    await sleep(1000 - (Date.now() % 1000));
    await postJson(event('customer.subscription.deleted', 'cus_initech_001'));
    const before = await get('/api/analytics', initech);
    const beforeProblem = await before.json();
    await postJson(event('subscription.upgraded', 'cus_initech_001', { secondsAgo: -1 }));
    check('subscription.upgraded enables advanced_analytics', await sdk.isEnabled('initech', 'advanced_analytics'));
    check('/api/analytics returns 200 after upgrade', (await get('/api/analytics', initech)).status === 200);
    check(
      '/api/analytics returns 403 before upgrade',
      before.status === 403 && String(beforeProblem.type ?? '').endsWith('/feature-locked'),
    );
  } finally {
    server.close();
    await sdk.close();
  }

  const passed = results.filter(Boolean).length;
  console.log(`${passed}/${results.length} passed`);
  return passed === results.length && results.length === 12 ? 0 : 1;
}

try {
  process.exitCode = await main();
} catch (error) {
  // A check that could not even run (the sidecar away, the app failing) is a failed run.
  console.error(`run_checks: ${error instanceof Error ? error.message : error}`);
  process.exitCode = 1;
}
