// The mock against the sidecar, answer for answer: random (seeded, reproducible) sequences of
// Stripe deliveries and admin calls go to both, and every answer, every flag, every audit record
// and every flag explanation must be the same. The contract scenarios pin what the sidecar does
// case by case; this looks for the cases nobody wrote down.
//
// A failing seed is printed; CORESDK_DIFFERENTIAL_SEED=<seed> replays it.

import assert from 'node:assert/strict';
import { createHmac } from 'node:crypto';
import { describe, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';

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
  // Stripe's retry, or an operator's replay of the exported event.
  if (roll < 0.88) return { kind: 'redeliver', replay: random() < 0.4 };
  if (roll < 0.91) return { kind: 'map', customer, tenant: pick(['tenant-x', 'tenant-z', 'acme-corp']) };
  if (roll < 0.96) {
    return {
      kind: 'authorize',
      token: random() < 0.7 ? pick(TOKENS) : undefined,
      tenantId: random() < 0.5 ? pick(['acme-corp', 'tenant-x', 'globex']) : undefined,
      require: ['pro_features', 'advanced_analytics', 'sso'].filter(() => random() < 0.4),
      denyIf: random() < 0.5 ? ['paywall_active'] : [],
      resource: pick(['', 'GET /api/reports', 'POST /api/export']),
    };
  }
  if (roll < 0.975) return { kind: 'verify_token', token: pick(TOKENS) };
  if (roll < 0.985) return { kind: 'refused', header: pick(['', 't=1,v1=00', 'forged']) };
  return { kind: 'set_flag', tenant: pick(['acme-corp', 'tenant-x', 'tenant-z']), key: pick(['pro_features', 'paywall_active', 'beta']), value: pick([true, false, 3, 'gold']) };
}

/** An HS* JWT over `claims`, signed with `secret` (the sidecar's CORESDK_JWT_SECRET by default). */
function jwt(claims, { alg = 'HS256', secret = ENV.CORESDK_JWT_SECRET } = {}) {
  const digest = { HS256: 'sha256', HS384: 'sha384', HS512: 'sha512' }[alg] ?? 'sha256';
  const part = (object) => Buffer.from(JSON.stringify(object)).toString('base64url');
  const input = `${part({ alg, typ: 'JWT' })}.${part(claims)}`;
  return `${input}.${createHmac(digest, secret).update(input).digest('base64url')}`;
}

const NOW = Math.floor(Date.now() / 1000);
const TOKENS = [
  jwt({ sub: 'ann', tenant_id: 'acme-corp', exp: NOW + 3600, roles: 'admin billing', scope: 'read write', plan: 'pro' }),
  `Bearer ${jwt({ sub: 'bob', tenant_id: 'tenant-x', exp: NOW + 3600, roles: ['ops'] }, { alg: 'HS384' })}`,
  jwt({ sub: 'cy', tenant_id: 'globex', exp: NOW + 3600, nbf: NOW - 10, aud: 'x' }, { alg: 'HS512' }),
  jwt({ sub: 'dee', exp: NOW + 3600 }),
  jwt({ sub: 'eve', tenant_id: 'acme-corp', exp: NOW - 3600 }),
  jwt({ sub: 'fay', tenant_id: 'acme-corp' }),
  jwt({ sub: 'gus', tenant_id: 'acme-corp', exp: NOW + 3600 }, { secret: 'another-secret-that-is-long-enough-to-use' }),
  jwt({ sub: 'hal', tenant_id: 'bad tenant', exp: NOW + 3600 }),
  jwt({ sub: 'ivy', tenant_id: 42, exp: NOW + 3600 }),
  jwt({ sub: 'jo', tenant_id: 'acme-corp', exp: NOW + 3600, nbf: NOW + 3600 }),
  jwt({ sub: 'kai', tenant_id: 'acme-corp', exp: 'soon' }),
  `${Buffer.from('{"alg":"none","typ":"JWT"}').toString('base64url')}.${Buffer.from('{"sub":"x"}').toString('base64url')}.`,
  jwt({ sub: 'lu', tenant_id: 'acme-corp', exp: NOW + 3600 }, { alg: 'RS256' }),
  'not.a.token',
  'garbage',
  'eyJhbGciOiJIUzI1NiJ9.e30.',
  'eyJhbGciOiJIUzI1NiJ9.!!.x',
  '{}.e30.x',
  'e30.e30.x',
  'eyJhbGciOiJ4In0.e30.x',
  'eyJhbGciOiJIUzI1NiJ9.bm90anNvbg.x',
  'a.b.c.d',
  'Bearer ',
  `${jwt({ sub: 'mo', tenant_id: 'acme-corp', exp: NOW + 3600 }).slice(0, -2)}`,
  jwt({ sub: 'ned', tenant_id: 'acme-corp', exp: NOW + 3600, nbf: 'later' }),
  jwt({ sub: 'oz', tenant_id: 'acme-corp', exp: -5 }),
  jwt({ sub: 'pia', tenant_id: 'acme-corp', exp: NOW + 3600.7, iss: 5, aud: ['a', 'b'] }),
  jwt({ sub: 7, tenant_id: '', exp: NOW + 3600, roles: [1, 'r'], scp: ['a b', 'c'] }),
  jwt(['not', 'an', 'object']),
  jwt({ sub: 'quin', tenant_id: 'acme-corp', exp: NOW + 3600.5, nbf: null }),
  jwt({ sub: 'ray', tenant_id: 'acme-corp', exp: null }),
  // Shapes the sidecar's JWT library reads as a claim of the wrong type, or cannot read past at all.
  jwt({ sub: [], tenant_id: 'acme-corp', exp: NOW + 3600 }),
  jwt({ sub: { id: 1 }, tenant_id: 'acme-corp', exp: NOW + 3600 }),
  jwt({ sub: 'sam', tenant_id: 'acme-corp', exp: [] }),
  jwt({ sub: 'sam', tenant_id: 'acme-corp', exp: [NOW + 3600] }),
  jwt({ sub: 'sam', tenant_id: 'acme-corp', exp: NOW + 3600, nbf: {} }),
  jwt({ sub: 'sam', tenant_id: 'acme-corp', exp: NOW + 3600, nbf: { at: 1 } }),
];

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

const coalesced = (r) => r.event === 'auth.denied' || r.event === 'billing.webhook.refused';

/** The records of `sdk`, once it has written at least `wanted` of those it writes off the request path. */
async function recordsWith(sdk, wanted) {
  // The sidecar's writer commits those a moment after the call (a hang guard, not a timing).
  const deadline = Date.now() + 10_000;
  for (;;) {
    const records = (await sdk.auditQuery({ limit: 100_000 })).map(comparableRecord);
    if (records.filter(coalesced).length >= wanted || Date.now() > deadline) return records;
    await sleep(50);
  }
}

/** What both must agree on: the chain's hashes and the tree's root cover record times, which differ. */
function verdict({ ok, recordsChecked, firstBadSeq, reason, headSeq }) {
  return { ok, recordsChecked, firstBadSeq, reason, headSeq };
}

/**
 * Plays `steps` on `sdk`. `coalescedWanted[n]` is how many records written off the request path
 * the mock had after step n: the sidecar is let finish writing them before the next step, so
 * that both number the next records alike.
 */
async function play(sdk, steps, coalescedWanted = []) {
  const answers = [];
  const bodies = [];
  const coalescedAfter = [];
  for (const [n, step] of steps.entries()) {
    if (n > 0) coalescedAfter.push((await recordsWith(sdk, coalescedWanted[n - 1] ?? 0)).filter(coalesced).length);
    if (step.kind === 'webhook' || step.kind === 'redeliver') {
      const body = step.kind === 'webhook' ? Buffer.from(JSON.stringify(step.event)) : bodies[step.index];
      if (body === undefined) continue;
      if (step.kind === 'webhook') bodies.push(body);
      answers.push(await outcome(() => (step.replay ? sdk.replayEvent(body, { reason: 'differential' }) : sdk.handleStripeWebhook(body, sign(body)))));
    } else if (step.kind === 'map') {
      answers.push(await outcome(() => sdk.mapCustomer(step.customer, step.tenant, { actor: 'ops', reason: 'differential' })));
    } else if (step.kind === 'authorize') {
      answers.push(await outcome(() => sdk.authorize(step)));
    } else if (step.kind === 'verify_token') {
      answers.push(await outcome(() => sdk.verifyToken(step.token)));
    } else if (step.kind === 'refused') {
      const body = Buffer.from(JSON.stringify({ id: 'evt_forged', type: 'invoice.paid', created: NOW }));
      // Forged: the signature's first digit changed (never left as it was).
      const header = step.header === 'forged' ? sign(body).replace(/v1=([0-9a-f])/, (_, d) => `v1=${d === '0' ? '1' : '0'}`) : step.header;
      answers.push(await outcome(() => sdk.handleStripeWebhook(body, header)));
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
  const records = await recordsWith(sdk, coalescedWanted.at(-1) ?? 0);
  coalescedAfter.push(records.filter(coalesced).length);
  // The sidecar writes denials and refused deliveries off the request path, so where they fall
  // in the chain is its writer's timing: they are compared as a set, the rest in order.
  const ordered = records.filter((r) => !coalesced(r)).map(({ seq, ...rest }) => rest);
  const unordered = records
    .filter(coalesced)
    .map(({ seq, ...rest }) => JSON.stringify(rest))
    .sort();
  const mappings = {};
  for (const customer of ['cus_acme_001', 'cus_new_1', 'cus_new_2']) mappings[customer] = await sdk.resolveCustomer(customer);
  return { answers, flags, explanations, ordered, unordered, mappings, coalescedAfter, verified: verdict(await sdk.auditVerify({ full: true })) };
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
          const actual = await play(mock, steps);
          const expected = await play(client, steps, actual.coalescedAfter);
          assert.equal(expected.verified.ok, true);
          assert.deepEqual(actual.answers, expected.answers, `answers differ (seed ${seed})`);
          assert.deepEqual(actual.mappings, expected.mappings, `mappings differ (seed ${seed})`);
          assert.deepEqual(actual.flags, expected.flags, `flags differ (seed ${seed})`);
          assert.deepEqual(actual.ordered, expected.ordered, `audit records differ (seed ${seed})`);
          assert.deepEqual(actual.unordered, expected.unordered, `coalesced audit records differ (seed ${seed})`);
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

/** Both implementations, fresh: the sidecar's client and the mock, with the suite's settings. */
async function both(use, env = {}) {
  const sidecar = await Sidecar.start({ env });
  let client;
  const mock = new MockSidecar(makeSettings({ useMock: true, problemTypeBase: ENV.CORESDK_PROBLEM_TYPE_BASE }), { ...ENV, ...env });
  try {
    client = await clientFor(sidecar, { adminToken: ENV.CORESDK_ADMIN_TOKEN, problemTypeBase: ENV.CORESDK_PROBLEM_TYPE_BASE });
    await use(client, mock);
  } finally {
    await mock.close();
    await client?.close();
    await sidecar.close();
  }
}

test('mock: every token is answered as the sidecar answers it', async () => {
  await both(async (sidecar, mock) => {
    for (const [n, token] of TOKENS.entries()) {
      const ask = (sdk) => outcome(() => sdk.verifyToken(token));
      assert.deepEqual(await ask(mock), await ask(sidecar), `verifyToken, token ${n}`);
      for (const request of [
        { token, require: ['pro_features'], resource: 'GET /r' },
        { token, tenantId: 'acme-corp', denyIf: ['paywall_active'] },
        { token: ` ${token} `, tenantId: 'globex' },
      ]) {
        const decide = (sdk) => outcome(() => sdk.authorize(request));
        assert.deepEqual(await decide(mock), await decide(sidecar), `authorize ${JSON.stringify(request)}, token ${n}`);
      }
    }
    // Trimmed as Rust trims (White_Space: U+0085 is, U+FEFF is not); a bare string is no flag list.
    for (const request of [{ token: '\u0085' }, { token: '\uFEFF' }, { token: '\u0085', tenantId: 'acme-corp' }, { tenantId: 'acme-corp', require: 'pro_features' }, { tenantId: 'acme-corp', denyIf: 'paywall_active' }]) {
      const decide = (sdk) => outcome(() => sdk.authorize(request));
      assert.deepEqual(await decide(mock), await decide(sidecar), `authorize ${JSON.stringify(request)}`);
    }
    for (const request of [{}, { tenantId: 'bad tenant' }, { tenantId: 'acme-corp', require: ['bad key!'] }, { tenantId: 'a', resource: 'r'.repeat(257) }, { tenantId: 'a', denyIf: Array(33).fill('k') }]) {
      const decide = (sdk) => outcome(() => sdk.authorize(request));
      assert.deepEqual(await decide(mock), await decide(sidecar), `authorize ${JSON.stringify(request).slice(0, 80)}`);
    }
  });
});

test('mock: signed bodies that are not events are refused as the sidecar refuses them', async () => {
  const now = Math.floor(Date.now() / 1000);
  const bodies = [
    Buffer.from('not json'),
    Buffer.from('[1,2]'),
    Buffer.from([0x7b, 0x22, 0x69, 0x64, 0x22, 0x3a, 0x22, 0xff, 0x22, 0x7d]),
    Buffer.from('{"id":"evt_\\ud800","type":"invoice.paid","created":1}'),
    Buffer.from(JSON.stringify({ type: 'invoice.paid', created: now })),
    Buffer.from(JSON.stringify({ id: '', type: 'invoice.paid', created: now })),
    Buffer.from(JSON.stringify({ id: 'x'.repeat(256), type: 'invoice.paid', created: now })),
    Buffer.from(JSON.stringify({ id: 'é'.repeat(128), type: 'invoice.paid', created: now })),
    Buffer.from(JSON.stringify({ id: 'evt_t', type: 'invoice.paid' })),
    Buffer.from(JSON.stringify({ id: 'evt_t', type: 'invoice.paid', created: null })),
    Buffer.from(JSON.stringify({ id: 'evt_t', type: 'invoice.paid', created: '1' })),
    Buffer.from(JSON.stringify({ id: 'evt_t', type: 'invoice.paid', created: 1.5 })),
    Buffer.from(JSON.stringify({ id: 'evt_t', type: 'invoice.paid', created: -1 })),
    Buffer.from(JSON.stringify({ id: 'evt_t', type: 'invoice.paid', created: now + 301 })),
    Buffer.from(JSON.stringify({ id: 'evt_t2', type: 'invoice.paid', created: now + 300, data: { object: { customer: 'cus_acme_001' } } })),
    Buffer.from(JSON.stringify({ id: 'evt_t3', type: 'invoice.paid', created: 0, data: 'x', livemode: 'yes' })),
    Buffer.from(JSON.stringify({ id: 'evt_t4', type: 'invoice.paid', created: now, data: { object: { customer: { id: 'cus_acme_001' } } } })),
    Buffer.from(JSON.stringify({ id: 'evt_t5', type: 'invoice.paid', created: now, data: { object: { customer: { name: 'x' }, object: 'customer', id: 'cus_acme_001' } } })),
    Buffer.from(JSON.stringify({ id: 'evt_t6', type: 'invoice.paid', created: now, data: { object: { object: 'customer', id: 'cus_globex_001' } } })),
  ];
  const headers = (body) => [
    sign(body),
    `${sign(body)},v1=${'0'.repeat(64)}`,
    `v0=abc,${sign(body)}`,
    ` ${sign(body).replace(',', ' , ')} `,
    `t=${now},t=${now}`,
    `t=0${now},v1=${'a'.repeat(64)}`,
    `t=${now},v1=${'g'.repeat(64)}`,
    `t=${now},v1=`,
    `t=${now}`,
    `t=,v1=${'a'.repeat(64)}`,
    `t=99999999999999999999,v1=${'a'.repeat(64)}`,
    'garbage',
    // Trimmed as Rust trims: U+FEFF is no white space (a malformed header), U+0085 is (none).
    '\uFEFF',
    '\u0085',
    `\u0085${sign(body)}\u2028`,
    `\uFEFF${sign(body)}`,
    sign(body).replace(',', '\u00A0,\u3000'),
    sign(body).replace('=', '\u0085=\u0085'),
  ];
  // A JSON syntax error is worded by each implementation's own parser; the rest is the sidecar's.
  const shown = (answer) =>
    answer.problem?.detail?.includes('the body is not JSON')
      ? { ...answer, problem: { ...answer.problem, detail: 'the body is not JSON' } }
      : answer;
  await both(async (sidecar, mock) => {
    for (const body of bodies) {
      for (const header of headers(body)) {
        const deliver = async (sdk) => shown(await outcome(() => sdk.handleStripeWebhook(body, header)));
        const [fromMock, fromSidecar] = [await deliver(mock), await deliver(sidecar)];
        assert.deepEqual(fromMock, fromSidecar, `${body.toString('latin1').slice(0, 60)} with ${header}`);
      }
    }
    const replay = async (sdk, body, reason) => shown(await outcome(() => sdk.replayEvent(body, { reason })));
    for (const body of bodies) {
      assert.deepEqual(await replay(mock, body, 'export'), await replay(sidecar, body, 'export'), body.toString('latin1').slice(0, 60));
    }
    for (const reason of ['', '  ', 'r'.repeat(1025)]) {
      assert.deepEqual(await replay(mock, bodies[14], reason), await replay(sidecar, bodies[14], reason), `reason ${reason.length}`);
    }
  });
});

test('mock: application records, admin values and ids are taken or refused as the sidecar does', async () => {
  const record = (answer) => {
    if (answer.answer === undefined || answer.answer === null) return answer;
    const { seq, time, hash, prevHash, canonical, ...rest } = answer.answer;
    return { answer: rest };
  };
  const audits = [
    { event: 'app.export', outcome: 'ok', actor: 'u1', tenantId: 'acme-corp', metadata: { n: 1.5, big: 1e21, tiny: 1e-7, neg: -0, s: 'é\u2028"', list: [1, null, { b: 2, a: 1 }] } },
    { event: 'app.x', outcome: 'ok', actor: 'u1', metadata: { nan: NaN, inf: Infinity, date: new Date(0), skipped: undefined } },
    { event: 'app.x', outcome: 'ok', actor: 'u1', metadata: { big: 10n } },
    { event: 'app.x', outcome: 'ok', actor: 'u1', metadata: { blob: 'x'.repeat(5000) } },
    { event: 'Billing.x', outcome: 'ok', actor: 'u1' },
    { event: ' auth', outcome: 'ok', actor: 'u1' },
    { event: 'flagship.x', outcome: 'ok', actor: 'u1' },
    { event: 'app.x', outcome: 'ok', actor: ' Stripe-Webhook ' },
    { event: 'app.x', outcome: 'ok', actor: '\u0085' },
    { event: 'app.x', outcome: 'ok', actor: '\uFEFF' },
    { event: 'app.x', outcome: 'ok', actor: 'stripe-webhook\u0085' },
    // Rust's trim_start drops White_Space (U+0085 is, U+FEFF is not); eq_ignore_ascii_case and
    // to_ascii_lowercase fold A-Z only (the Kelvin sign U+212A is no K).
    { event: '\uFEFFbilling.x', outcome: 'ok', actor: 'u1' },
    { event: '\u0085billing.x', outcome: 'ok', actor: 'u1' },
    { event: '\u3000Auth.x', outcome: 'ok', actor: 'u1' },
    { event: '\u212Aapp.x', outcome: 'ok', actor: 'u1' },
    { event: 'app.x', outcome: 'ok', actor: 'stripe-webhoo\u212A' },
    { event: 'app.x', outcome: 'ok', actor: '\u00A0STRIPE-webhook\u2029' },
    { event: '', outcome: '', actor: '' },
    { event: 'app.x', outcome: 'ok', actor: 'a'.repeat(257), tenantId: 't'.repeat(129) },
    { event: 'app.x', outcome: 'ok', actor: 'u1', tenantId: 'bad\ttenant' },
  ];
  const flags = [
    ['acme-corp', 'beta', 3, 'ops'],
    ['acme-corp', 'beta', 2.5, 'ops'],
    ['acme-corp', 'beta', 1e21, 'ops'],
    // Shown as "-0", then, read back from the store as the old value, as "0".
    ['acme-corp', 'beta', -0, 'ops'],
    ['acme-corp', 'beta', 'gold', 'ops'],
    ['acme-corp', 'beta', { tiers: [1, 2], z: null, a: 'x' }, 'ops'],
    // Numbers inside JSON as serde_json writes them, on both sides of every switch of form.
    ['acme-corp', 'beta', [1e-5, 1e-6, -2.5e-6, 123456.789, 1e15 + 0.5, 2 ** 53, 2 ** 53 + 2, 1e16, 2 ** 60, 1e21, 1.5e300, -0, 5e-324], 'ops'],
    ['acme-corp', 'beta', { '\uffff': 1, '\u{1f600}': 2, é: 3, z: 4 }, 'ops'],
    ['acme-corp', 'beta', [true, 'x'], 'ops'],
    ['acme-corp', 'beta', null, 'ops'],
    ['acme-corp', 'beta', NaN, 'ops'],
    ['acme-corp', 'beta', true, ''],
    ['acme-corp', 'beta', true, 'ops', 'r'.repeat(1025)],
    ['acme-corp', 'pro_features', false, 'ops'],
    ['acme-corp', 'k'.repeat(129), true, 'ops'],
    ['', 'beta', true, 'ops'],
  ];
  await both(async (sidecar, mock) => {
    for (const [n, options] of audits.entries()) {
      const append = async (sdk) => record(await outcome(() => sdk.audit(options)));
      assert.deepEqual(await append(mock), await append(sidecar), `audit ${n}`);
    }
    for (const [tenant, key, value, actor, reason = 'why'] of flags) {
      const set = (sdk) => outcome(() => sdk.setFlag(tenant, key, value, { actor, reason }));
      assert.deepEqual(await set(mock), await set(sidecar), `setFlag ${key}=${String(value)} by ${actor}`);
    }
    for (const [customer, tenant] of [['cus_x', 'bad tenant'], ['cus x', 't'], ['cus_x', 'x'.repeat(129)], ['cus_acme_001', 'acme-corp']]) {
      const map = (sdk) => outcome(() => sdk.mapCustomer(customer, tenant, { actor: 'ops' }));
      assert.deepEqual(await map(mock), await map(sidecar), `mapCustomer ${customer} → ${tenant}`);
    }
    const records = async (sdk) => (await sdk.auditQuery({ limit: 1000 })).map(comparableRecord);
    assert.deepEqual(await records(mock), await records(sidecar));
    const explain = (sdk) => sdk.explainFlag('acme-corp', 'beta');
    assert.deepEqual(await explain(mock), await explain(sidecar));
  });
});

test('mock: refused deliveries are recorded with the identity they claim, as the sidecar records them', async () => {
  const filler = 'x'.repeat(1100);
  const bodies = [
    `{"id":"evt_claimed","object":"event","filler":"${filler}","type":"invoice.paid"}`,
    `{"type":"invoice.paid","data":{"id":"nested","deep":[{"id":"deeper"}]},"id":"evt_after_nested"}`,
    `{"filler":"${filler}","id":"evt_beyond_the_prefix"}`,
    `{"id":42,"id":"evt_second","type":["x"],"type":"t"}`,
    `{"id":"evt_${'é'.repeat(300)}","type":"invoice.paid"}`,
    `{"id":"evt_escaped\\u00e9\\"q","type":"a\\nb"}`,
    `{"id" : "evt_spaced" , "type" : "invoice.paid" }`,
    `["evt_array"]`,
    `not json "id":"evt_text"`,
    `{"id":"evt_cut_${'y'.repeat(1100)}"}`,
    `{"n":-1.5e3,"t":true,"f":false,"z":null,"id":"evt_after_scalars","type":"x"}`,
  ];
  const window0 = { CORESDK_DENY_AUDIT_WINDOW_S: '0' };
  await both(async (sidecar, mock) => {
    for (const body of bodies) {
      const deliver = (sdk) => outcome(() => sdk.handleStripeWebhook(Buffer.from(body), 'garbage'));
      assert.deepEqual(await deliver(mock), await deliver(sidecar), body.slice(0, 60));
    }
    const refused = async (sdk, wanted = 0) => {
      const deadline = Date.now() + 10_000;
      for (;;) {
        const records = await sdk.auditQuery({ eventPrefix: 'billing.webhook.refused' });
        if (records.length >= wanted || Date.now() > deadline) return records.map(comparableRecord).map(({ seq, ...r }) => r);
        await sleep(50);
      }
    };
    const fromMock = await refused(mock);
    assert.equal(fromMock.length, bodies.length);
    assert.deepEqual(fromMock, await refused(sidecar, bodies.length));
  }, window0);
});

test('mock: an effect too large for an audit record is bounded as the sidecar bounds it', async () => {
  const now = Math.floor(Date.now() / 1000);
  const keys = (prefix, n) => Array.from({ length: n }, (_, i) => ({ lookup_key: `${prefix}_feature_${String(i).padStart(3, '0')}` }));
  const summary = (id, created, data) =>
    Buffer.from(
      JSON.stringify({
        id,
        type: 'entitlements.active_entitlement_summary.updated',
        created,
        data: { object: { customer: 'cus_acme_001', entitlements: { data } } },
      }),
    );
  const bodies = [
    summary('evt_big_1', now - 5, keys('a', 150)),
    summary('evt_big_2', now - 2, keys('b', 120)),
    summary('evt_big_0', now - 9, keys('c', 90)),
    summary('evt_big_3', now, []),
  ];
  await both(async (sidecar, mock) => {
    for (const body of bodies) {
      const deliver = async (sdk) => {
        const answer = await outcome(() => sdk.handleStripeWebhook(body, sign(body)));
        return answer.answer ? { ...answer.answer, changes: answer.answer.flagChanges.length, flagChanges: undefined } : answer;
      };
      assert.deepEqual(await deliver(mock), await deliver(sidecar));
    }
    const records = async (sdk) => (await sdk.auditQuery({ eventPrefix: 'billing.entitlements' })).map(comparableRecord);
    const fromMock = await records(mock);
    assert.ok(fromMock.some((r) => Object.values(r.metadata).includes('[truncated]')), 'no record was large enough to be bounded');
    assert.deepEqual(fromMock, await records(sidecar));
    // A record's key order is the client's own: compared sorted.
    const flags = async (sdk) =>
      Object.values(await sdk.getFlags('acme-corp'))
        .map((f) => [f.key, f.value, f.version])
        .sort(([a], [b]) => (a < b ? -1 : 1));
    assert.deepEqual(await flags(mock), await flags(sidecar));
  });
});

test('mock: a flood of distinct denials costs the records the sidecar allows, and one overflow record', async () => {
  // One past the budget: a single held-back denial, whichever tick reports it.
  const tenants = Array.from({ length: 1001 }, (_, i) => `flood-${i}`);
  await both(async (sidecar, mock) => {
    for (const sdk of [mock, sidecar]) {
      for (const tenantId of tenants) await sdk.authorize({ tenantId, require: ['pro_features'] });
    }
    // Both report the held-back count on a once-a-second tick.
    const denials = async (sdk, wanted) => {
      const deadline = Date.now() + 10_000;
      for (;;) {
        const records = (await sdk.auditQuery({ eventPrefix: 'auth.denied', limit: 5000 })).map(comparableRecord);
        if (records.length >= wanted || Date.now() > deadline) return records.map(({ seq, ...r }) => r);
        await sleep(50);
      }
    };
    const fromMock = await denials(mock, 1001);
    assert.equal(fromMock.length, 1001, 'a window writes 1000 denials at most, then one overflow record');
    assert.deepEqual(fromMock.at(-1), {
      tenant: '',
      actor: 'coresdk',
      event: 'auth.denied',
      outcome: 'denied',
      metadata: { reasons: { FEATURE_LOCKED: 1 }, count: 1, coalesced: 'overflow', since_ms: 'number' },
    });
    assert.deepEqual(fromMock, await denials(sidecar, fromMock.length));
  });
});
