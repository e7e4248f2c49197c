// The behaviour every @coresdk/client client must show, whether it talks to the real sidecar
// (client.test.mjs) or is the in-process mock (mock.test.mjs): one suite, so the two cannot
// drift apart.
//
//   defineClientSuite('sidecar', async () => ({ sdk, another, close }))
//
// `makeWorld` is called once for the suite and resolves to `sdk` (a CoreSDKClient with the
// admin token and the problem type base of ENV), `another()` (a second client of the same
// backend, for changes that must reach another client's cache) and `close()`. Every test works
// on its own tenants and customers, so the tests share one backend.

import assert from 'node:assert/strict';
import { createHmac, randomUUID } from 'node:crypto';
import { after, before, describe, test } from 'node:test';

import { ENV, eventually, sign, stripeEvent } from '../../../tests/openfeature-node/sidecar.mjs';
import { FlagNotFoundError, ProblemError } from '../dist/index.js';

export { ENV, sign, stripeEvent };

/** An HS256 JWT as the sidecar expects (CORESDK_JWT_SECRET), minted with node:crypto. */
export function token(tenantId, claims = {}, secret = ENV.CORESDK_JWT_SECRET) {
  const part = (object) => Buffer.from(JSON.stringify(object)).toString('base64url');
  const header = part({ alg: 'HS256', typ: 'JWT' });
  const body = part({
    sub: `user@${tenantId}`,
    tenant_id: tenantId,
    exp: Math.floor(Date.now() / 1000) + 600,
    ...claims,
  });
  const mac = createHmac('sha256', secret).update(`${header}.${body}`).digest('base64url');
  return `${header}.${body}.${mac}`;
}

/** A tenant and a Stripe customer of its own, so tests sharing one backend never meet. */
export async function freshCustomer(sdk, label) {
  const unique = randomUUID().slice(0, 8);
  const customer = `cus_${label}_${unique}`;
  const tenant = `${label}-${unique}`;
  assert.equal(await sdk.mapCustomer(customer, tenant, { actor: 'suite', reason: 'test tenant' }), 0);
  return { customer, tenant };
}

async function rejectsWithProblem(promise, status, reason) {
  const error = await promise.then(
    () => assert.fail(`expected a ${status} ${reason} problem, got an answer`),
    (caught) => caught,
  );
  assert.ok(error instanceof ProblemError, `expected a ProblemError, got ${error}`);
  assert.equal(error.status, status, JSON.stringify(error.problem));
  assert.equal(error.problem.reason, reason, JSON.stringify(error.problem));
  return error;
}

export function defineClientSuite(name, makeWorld) {
  describe(`${name}: the CoreSDK client contract`, () => {
    let world;
    let sdk;
    const deliver = (body) => sdk.handleStripeWebhook(body, sign(body));

    before(async () => {
      world = await makeWorld();
      sdk = world.sdk;
    });
    after(async () => {
      await world?.close();
    });

    test('a signed invoice.paid turns pro_features on, is audited, and the chain verifies', async () => {
      assert.equal(await sdk.isEnabled('acme-corp', 'pro_features'), false);
      const result = await deliver(stripeEvent('invoice.paid', 'cus_acme_001'));
      assert.equal(result.outcome, 'applied');
      assert.equal(result.tenantId, 'acme-corp');
      assert.equal(result.eventType, 'invoice.paid');
      assert.deepEqual(
        Object.fromEntries(result.flagChanges.map((c) => [c.key, c.newValue])),
        { pro_features: true, paywall_active: false },
      );
      assert.ok(result.auditSeq > 0);
      // Read-your-writes: the answer waited for this client's cache.
      assert.equal(await sdk.isEnabled('acme-corp', 'pro_features'), true);
      const flag = await sdk.getFlag('acme-corp', 'pro_features');
      assert.equal(flag.value, true);
      assert.equal(flag.isDefault, false);
      assert.equal(flag.updatedBy, 'stripe-webhook');
      const records = await sdk.auditQuery({ tenantId: 'acme-corp', eventPrefix: 'billing.invoice.paid' });
      assert.deepEqual(records.map((r) => [r.actor, r.outcome, r.seq]), [['stripe-webhook', 'applied', result.auditSeq]]);
      // Full: by default the sidecar checks only the records since its newest checkpoint.
      const verified = await sdk.auditVerify({ full: true });
      assert.equal(verified.ok, true, verified.reason);
      assert.ok(verified.recordsChecked >= 1);
    });

    test('a redelivery is a duplicate, an older event is stale, an unruled type is ignored', async () => {
      const { customer, tenant } = await freshCustomer(sdk, 'dup');
      const now = Math.floor(Date.now() / 1000);
      const body = stripeEvent('invoice.paid', customer, { created: now });
      assert.equal((await deliver(body)).outcome, 'applied');
      const again = await deliver(body);
      assert.equal(again.outcome, 'duplicate');
      assert.equal(again.tenantId, tenant);
      assert.deepEqual(again.flagChanges, []);
      const late = await deliver(stripeEvent('invoice.payment_failed', customer, { created: now - 60 }));
      assert.equal(late.outcome, 'stale');
      assert.deepEqual([...late.staleFlags].sort(), ['paywall_active', 'pro_features']);
      assert.equal(await sdk.isEnabled(tenant, 'pro_features'), true);
      assert.equal((await deliver(stripeEvent('charge.refunded', customer))).outcome, 'ignored');
    });

    for (const [label, header, reason] of [
      ['a missing signature', () => '', 'SIGNATURE_MISSING'],
      ['a malformed signature', () => 't=1,v1=abc', 'SIGNATURE_MALFORMED'],
      ['a forged signature', (body) => sign(body, 'whsec_forged'), 'SIGNATURE_MISMATCH'],
      [
        'a replayed signature',
        (body) => sign(body, ENV.STRIPE_WEBHOOK_SECRET, Math.floor(Date.now() / 1000) - 301),
        'SIGNATURE_TIMESTAMP_OUT_OF_TOLERANCE',
      ],
    ]) {
      test(`${label} is a 400 problem and changes nothing`, async () => {
        const { customer, tenant } = await freshCustomer(sdk, 'sig');
        const body = stripeEvent('invoice.paid', customer);
        const error = await rejectsWithProblem(sdk.handleStripeWebhook(body, header(body)), 400, reason);
        assert.equal(error.problem.type, `${ENV.CORESDK_PROBLEM_TYPE_BASE}/invalid-signature`);
        assert.equal(await sdk.isEnabled(tenant, 'pro_features'), false);
      });
    }

    test('replayEvent (admin) feeds an exported event through the webhook path, audited as a replay', async () => {
      const { customer, tenant } = await freshCustomer(sdk, 'replay');
      const body = stripeEvent('invoice.paid', customer);
      const replayed = await sdk.replayEvent(body, { reason: 'outage INC-42' });
      assert.equal(replayed.outcome, 'applied');
      assert.equal(replayed.tenantId, tenant);
      assert.equal(await sdk.isEnabled(tenant, 'pro_features'), true);
      assert.equal((await sdk.getFlag(tenant, 'pro_features')).updatedBy, 'replay');
      assert.equal((await sdk.replayEvent(body, { reason: 'again' })).outcome, 'duplicate');
      const explained = await sdk.explainFlag(tenant, 'pro_features');
      assert.equal(explained.event?.actor, 'replay');
      assert.equal(explained.event?.reason, 'outage INC-42');
    });

    test('an unknown customer is 422 until mapped; resolveCustomer names its tenant', async () => {
      const unique = randomUUID().slice(0, 8);
      const customer = `cus_nobody_${unique}`;
      const body = stripeEvent('invoice.paid', customer);
      await rejectsWithProblem(deliver(body), 422, 'UNKNOWN_CUSTOMER');
      assert.equal(await sdk.resolveCustomer(customer), null);
      // The refused event was parked: mapping the customer applies it.
      assert.equal(await sdk.mapCustomer(customer, `nobody-${unique}`, { actor: 'ops', reason: 'onboarding' }), 1);
      assert.equal(await sdk.resolveCustomer(customer), `nobody-${unique}`);
      assert.equal((await deliver(body)).outcome, 'duplicate');
    });

    test('authorize: 403 feature-locked and 402 payment-required problems name the resource', async () => {
      const { customer, tenant } = await freshCustomer(sdk, 'authz');
      const locked = await sdk.authorize({
        token: token(tenant),
        require: ['pro_features'],
        resource: 'GET /api/analytics',
      });
      assert.equal(locked.allowed, false);
      assert.equal(locked.failModeApplied, false);
      assert.equal(locked.tenantId, tenant);
      assert.equal(locked.subject, `user@${tenant}`);
      assert.equal(locked.problem.status, 403);
      assert.equal(locked.problem.reason, 'FEATURE_LOCKED');
      assert.equal(locked.problem.type, `${ENV.CORESDK_PROBLEM_TYPE_BASE}/feature-locked`);
      assert.equal(locked.problem.instance, 'GET /api/analytics');

      await deliver(stripeEvent('invoice.payment_failed', customer));
      const unpaid = await sdk.authorize({ tenantId: tenant, denyIf: ['paywall_active'], resource: 'POST /api/export' });
      assert.equal(unpaid.allowed, false);
      assert.equal(unpaid.problem.status, 402);
      assert.equal(unpaid.problem.reason, 'PAYMENT_REQUIRED');
      assert.equal(unpaid.problem.instance, 'POST /api/export');

      await deliver(stripeEvent('invoice.paid', customer));
      const allowed = await sdk.authorize({ token: `Bearer ${token(tenant)}`, require: ['pro_features'], denyIf: ['paywall_active'] });
      assert.equal(allowed.allowed, true, JSON.stringify(allowed.problem));
      assert.equal(allowed.problem, null);
      assert.equal(allowed.claims?.tenantId, tenant);

      const wrong = await sdk.authorize({ token: token(tenant), tenantId: 'acme-corp' });
      assert.equal(wrong.allowed, false);
      assert.equal(wrong.problem.status, 403);
      assert.equal(wrong.problem.reason, 'WRONG_TENANT');
    });

    test('verifyToken answers the claims of a good token and a 401 problem for a bad one', async () => {
      const claims = await sdk.verifyToken(token('globex', { roles: ['admin'], plan: 'pro' }));
      assert.equal(claims.subject, 'user@globex');
      assert.equal(claims.tenantId, 'globex');
      assert.deepEqual(claims.roles, ['admin']);
      assert.equal(claims.claims.plan, 'pro');
      const error = await sdk.verifyToken(token('globex', {}, 'not-the-secret-but-long-enough-0123')).then(
        () => assert.fail('a token signed with another secret was accepted'),
        (caught) => caught,
      );
      assert.ok(error instanceof ProblemError);
      assert.equal(error.status, 401);
      assert.equal(error.problem.reason, 'UNAUTHENTICATED');
    });

    test('audit appends a record to the chain, query finds it, verify checks it', async () => {
      const { tenant } = await freshCustomer(sdk, 'audit');
      const record = await sdk.audit({
        event: 'app.report.exported',
        outcome: 'success',
        actor: 'user:42',
        tenantId: tenant,
        metadata: { rows: 3, format: 'csv', nested: { ok: true, list: [1, 'two', null] } },
      });
      assert.ok(record.seq > 0);
      assert.equal(record.tenantId, tenant);
      assert.deepEqual(record.metadata, { rows: 3, format: 'csv', nested: { ok: true, list: [1, 'two', null] } });
      assert.match(record.hash, /^[0-9a-f]{64}$/);
      assert.match(record.prevHash, /^[0-9a-f]{64}$/);
      assert.match(record.time, /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/);
      assert.ok(Buffer.isBuffer(record.canonical) && record.canonical.length > 0);
      assert.deepEqual(JSON.parse(record.canonical.toString('utf8')).metadata, record.metadata);
      const found = await sdk.auditQuery({ tenantId: tenant, eventPrefix: 'app.' });
      assert.deepEqual(found.map((r) => [r.seq, r.hash]), [[record.seq, record.hash]]);
      assert.equal((await sdk.auditQuery({ tenantId: tenant, outcome: 'failure' })).length, 0);
      assert.equal((await sdk.auditVerify()).ok, true);
    });

    test('setFlag (admin) changes a flag at once for this client; bad ids are 400 problems', async () => {
      const { tenant } = await freshCustomer(sdk, 'admin');
      const flag = await sdk.setFlag(tenant, 'beta_ui', true, { actor: 'ops@example.com', reason: 'pilot' });
      assert.equal(flag.value, true);
      assert.ok(flag.version > 0);
      // CORESDK_ADMIN_TOKEN is the operator `admin`: the change is its, the claim is kept beside.
      assert.equal(flag.updatedBy, 'admin');
      assert.equal(await sdk.isEnabled(tenant, 'beta_ui'), true);
      const flags = await sdk.getFlags(tenant);
      assert.equal(flags.beta_ui.value, true);
      assert.equal(flags.pro_features.isDefault, true);
      const explained = await sdk.explainFlag(tenant, 'beta_ui');
      assert.equal(explained.admin?.actor, 'admin');
      const [record] = await sdk.auditQuery({ tenantId: tenant, eventPrefix: 'flag.set' });
      assert.deepEqual([record.actor, record.metadata.claimed_actor], ['admin', 'ops@example.com']);
      assert.equal(explained.admin?.reason, 'pilot');

      await assert.rejects(sdk.getFlag(tenant, 'no_such_flag'), FlagNotFoundError);
      assert.equal(await sdk.isEnabled(tenant, 'no_such_flag'), false);
      await rejectsWithProblem(sdk.getFlag('bad tenant', 'pro_features'), 400, 'INVALID_ARGUMENT');
      await rejectsWithProblem(sdk.isEnabled('', 'pro_features'), 400, 'INVALID_ARGUMENT');
      await rejectsWithProblem(sdk.getFlag(tenant, 'bad key!'), 400, 'INVALID_ARGUMENT');
      await rejectsWithProblem(sdk.getFlags('zero\u200bwidth'), 400, 'INVALID_ARGUMENT');
    });

    test('a webhook body that is not bytes or a string is a 500 RAW_BODY_UNAVAILABLE problem, read as nothing', async () => {
      // `{length: 1e9}` is what express.json() gives for a posted {"length": 1000000000}: read
      // as an array-like it would be a gigabyte of zeros.
      for (const body of [{ length: 1e9 }, { id: 'evt_1', type: 'invoice.paid' }, undefined, null, 42, [1, 2]]) {
        const error = await rejectsWithProblem(sdk.handleStripeWebhook(body, 't=1,v1=00'), 500, 'RAW_BODY_UNAVAILABLE');
        assert.match(error.problem.detail, /installStripeWebhook/);
        assert.ok(error.problem.type.endsWith('/raw-body-unavailable'), error.problem.type);
        await rejectsWithProblem(sdk.replayEvent(body, { reason: 'ops' }), 500, 'RAW_BODY_UNAVAILABLE');
      }
      // Bytes in any of the accepted forms are read.
      const body = stripeEvent('charge.refunded', 'cus_acme_001');
      assert.equal((await sdk.handleStripeWebhook(new Uint8Array(Buffer.from(body)), sign(body))).outcome, 'ignored');
    });

    test('require and denyIf must be lists: a bare string is a 400 problem, not its characters', async () => {
      await rejectsWithProblem(sdk.authorize({ tenantId: 'acme-corp', require: 'pro_features' }), 400, 'INVALID_ARGUMENT');
      await rejectsWithProblem(sdk.authorize({ tenantId: 'acme-corp', denyIf: 'paywall_active' }), 400, 'INVALID_ARGUMENT');
      await rejectsWithProblem(sdk.authorize({ tenantId: 'acme-corp', require: [1] }), 400, 'INVALID_ARGUMENT');
    });

    test('a change made through one client reaches a second client\'s cache', async () => {
      const { customer, tenant } = await freshCustomer(sdk, 'watch');
      const other = await world.another();
      try {
        assert.equal(await other.isEnabled(tenant, 'pro_features'), false);
        await deliver(stripeEvent('invoice.paid', customer));
        await eventually(
          async () => ((await other.isEnabled(tenant, 'pro_features')) ? true : undefined),
          'the webhook never reached the second client',
        );
        await sdk.setFlag(tenant, 'beta_ui', true, { actor: 'ops' });
        await eventually(
          async () => ((await other.isEnabled(tenant, 'beta_ui')) ? true : undefined),
          'setFlag never reached the second client',
        );
      } finally {
        await other.close();
      }
    });
  });
}
