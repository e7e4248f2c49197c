// The mock against the sidecar, answer for answer: random (seeded, reproducible) sequences of
// Stripe deliveries and admin calls go to both, and every answer, every flag, every audit record
// and every flag explanation must be the same. The contract scenarios pin what the sidecar does
// case by case; this looks for the cases nobody wrote down.
//
// A failing seed is printed; CORESDK_DIFFERENTIAL_SEED=<seed> replays it.

import assert from 'node:assert/strict';
import { createHmac } from 'node:crypto';
import { describe, test } from 'node:test';

import { ENV, Sidecar, STRIPE_SECRET } from '../../../tests/openfeature-node/sidecar.mjs';
import { MockSidecar, ProblemError, makeSettings } from '../dist/index.js';
import { clientFor } from './helpers.mjs';

const RUNS = 4;
const STEPS = 60;

/** mulberry32: a small seeded PRNG, so a failing run can be replayed. */
function prng(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

const STATUSES = ['incomplete', 'trialing', 'active', 'past_due', 'unpaid', 'paused', 'canceled', 'incomplete_expired', 'bogus'];
const SUBSCRIPTION_TYPES = [
  'customer.subscription.created',
  'customer.subscription.updated',
  'customer.subscription.paused',
  'customer.subscription.resumed',
  'customer.subscription.deleted',
];
const OTHER_TYPES = ['invoice.paid', 'invoice.payment_failed', 'subscription.upgraded', 'charge.refunded', 'payment.failed'];
const PLANS = [{ lookup_key: 'pro_monthly' }, { nickname: 'Basic' }, { lookup_key: 'enterprise-annual', nickname: 'Ent' }, {}];
const ENTITLEMENTS = ['sso', 'audit_log', 'bad key!', 'exports'];

/** One random step; `customers` are the run's customers (some mapped, some not). */
function randomStep(random, n, base, customers) {
  const pick = (list) => list[Math.floor(random() * list.length)];
  const roll = random();
  const customer = pick(customers);
  // A few seconds only, so that events often share a second and the tie rule decides.
  const created = base - Math.floor(random() * 6);
  const id = `evt_d${n.toString().padStart(3, '0')}_${Math.floor(random() * 1e6)}`;
  const event = (type, object, extra = {}) => ({ kind: 'webhook', event: { id, object: 'event', type, created, data: { object }, livemode: false, ...extra } });
  if (roll < 0.4) {
    const subscription = pick(['sub_a', 'sub_b', 'sub_c']);
    const object = {
      id: subscription,
      object: 'subscription',
      customer,
      status: pick(STATUSES),
      items: { data: [{ price: pick(PLANS) }] },
    };
    const extra = random() < 0.3 ? { data: { object, previous_attributes: { status: pick(STATUSES) } } } : {};
    return event(pick(SUBSCRIPTION_TYPES), object, extra);
  }
  if (roll < 0.6) return event(pick(OTHER_TYPES), { id: `in_${n}`, customer });
  if (roll < 0.7) {
    const keys = ENTITLEMENTS.filter(() => random() < 0.5);
    const data = keys.map((k, i) => (i % 2 ? { lookup_key: k } : { feature: { lookup_key: k } }));
    return event('entitlements.active_entitlement_summary.updated', { object: 'entitlements.active_entitlement_summary', customer, entitlements: { data } });
  }
  if (roll < 0.77) {
    return event('checkout.session.completed', {
      id: `cs_${n}`,
      customer,
      client_reference_id: pick(['tenant-x', 'tenant-y', 'bad tenant', '']),
    });
  }
  if (roll < 0.82) return event('invoice.paid', { id: `in_m${n}`, metadata: { tenant_id: pick(['meta-co', 'zero\u200bwidth']) } });
  if (roll < 0.88) return { kind: 'redeliver' };
  if (roll < 0.93) return { kind: 'map', customer, tenant: pick(['tenant-x', 'tenant-z', 'acme-corp']) };
  return { kind: 'set_flag', tenant: pick(['acme-corp', 'tenant-x', 'tenant-z']), key: pick(['pro_features', 'paywall_active', 'beta']), value: pick([true, false, 3, 'gold']) };
}

function sign(body) {
  const t = Math.floor(Date.now() / 1000);
  return `t=${t},v1=${createHmac('sha256', STRIPE_SECRET).update(`${t}.`).update(body).digest('hex')}`;
}

/** What an answer (or a problem) says, without what only the moment decides. */
async function outcome(call) {
  try {
    return { answer: await call() };
  } catch (error) {
    if (!(error instanceof ProblemError)) throw error;
    return { problem: error.problem };
  }
}

/** Audit records without their times (the two clocks differ) and the hashes that cover them. */
function comparableRecord(record) {
  const { parked_at_ms: parkedAt, since_ms: since, ...metadata } = record.metadata;
  if (parkedAt !== undefined) metadata.parked_at_ms = typeof parkedAt;
  if (since !== undefined) metadata.since_ms = typeof since;
  return { seq: record.seq, tenant: record.tenantId, actor: record.actor, event: record.event, outcome: record.outcome, metadata };
}

async function play(sdk, steps) {
  const answers = [];
  const bodies = [];
  for (const step of steps) {
    if (step.kind === 'webhook' || step.kind === 'redeliver') {
      const body = step.kind === 'webhook' ? Buffer.from(JSON.stringify(step.event)) : bodies[step.index];
      if (body === undefined) continue;
      if (step.kind === 'webhook') bodies.push(body);
      answers.push(await outcome(() => sdk.handleStripeWebhook(body, sign(body))));
    } else if (step.kind === 'map') {
      answers.push(await outcome(() => sdk.mapCustomer(step.customer, step.tenant, { actor: 'ops', reason: 'differential' })));
    } else if (step.kind === 'set_flag') {
      answers.push(await outcome(() => sdk.setFlag(step.tenant, step.key, step.value, { actor: 'admin', reason: 'differential' })));
    }
  }
  const tenants = ['acme-corp', 'globex', 'tenant-x', 'tenant-y', 'tenant-z', 'meta-co'];
  const flags = {};
  const explanations = {};
  for (const tenant of tenants) {
    flags[tenant] = await sdk.getFlags(tenant);
    for (const key of Object.keys(flags[tenant])) {
      if (!flags[tenant][key].isDefault) explanations[`${tenant}/${key}`] = await sdk.explainFlag(tenant, key);
    }
  }
  const records = (await sdk.auditQuery({ limit: 100_000 })).map(comparableRecord);
  const mappings = {};
  for (const customer of ['cus_acme_001', 'cus_new_1', 'cus_new_2']) mappings[customer] = await sdk.resolveCustomer(customer);
  return { answers, flags, explanations, records, mappings, verified: await sdk.auditVerify() };
}

describe('mock: the same answers as the sidecar', () => {
  const fixed = process.env.CORESDK_DIFFERENTIAL_SEED;
  const seeds = fixed ? [Number(fixed)] : Array.from({ length: RUNS }, () => Math.floor(Math.random() * 2 ** 31));
  for (const seed of seeds) {
    test(`random deliveries and admin calls (seed ${seed})`, async () => {
      const random = prng(seed);
      const base = Math.floor(Date.now() / 1000);
      const customers = ['cus_acme_001', 'cus_globex_001', 'cus_new_1', 'cus_new_2'];
      const steps = [];
      let webhooks = 0;
      for (let n = 0; n < STEPS; n += 1) {
        const step = randomStep(random, n, base, customers);
        if (step.kind === 'redeliver') step.index = Math.floor(random() * Math.max(webhooks, 1));
        if (step.kind === 'webhook') webhooks += 1;
        steps.push(step);
      }
      const sidecar = await Sidecar.start();
      let client;
      try {
        client = await clientFor(sidecar, { adminToken: ENV.CORESDK_ADMIN_TOKEN, problemTypeBase: ENV.CORESDK_PROBLEM_TYPE_BASE });
        const mock = new MockSidecar(makeSettings({ useMock: true, problemTypeBase: ENV.CORESDK_PROBLEM_TYPE_BASE }), { ...ENV });
        try {
          const expected = await play(client, steps);
          const actual = await play(mock, steps);
          assert.equal(expected.verified.ok, true);
          assert.deepEqual(actual.answers, expected.answers, `answers differ (seed ${seed})`);
          assert.deepEqual(actual.mappings, expected.mappings, `mappings differ (seed ${seed})`);
          assert.deepEqual(actual.flags, expected.flags, `flags differ (seed ${seed})`);
          assert.deepEqual(actual.records, expected.records, `audit records differ (seed ${seed})`);
          assert.deepEqual(actual.explanations, expected.explanations, `explanations differ (seed ${seed})`);
          assert.deepEqual(actual.verified, expected.verified);
        } finally {
          await mock.close();
        }
      } finally {
        await client?.close();
        await sidecar.close();
      }
    });
  }
});
