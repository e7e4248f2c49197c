// What the client does while the sidecar is away: the real binary stopped, then started again
// on the same address with the same store.

import assert from 'node:assert/strict';
import { test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';

import { FlagNotFoundError, SidecarUnavailableError } from '../dist/index.js';
import { clientFor, eventually, recordingLogger, Sidecar, sign, stripeEvent } from './helpers.mjs';
import { token } from './suite.mjs';

const notCurrent = (client) => eventually(() => (client.cacheCurrent ? undefined : true), 'the cache stayed current');
const current = (client) => eventually(() => (client.cacheCurrent ? true : undefined), 'the cache never came back');

test('fail mode open: last known flags, allowed decisions, a bounded audit spool sent once the sidecar is back', async () => {
  const sidecar = await Sidecar.start();
  const logger = recordingLogger();
  const client = await clientFor(sidecar, { failMode: 'open', timeoutMs: 300, spoolLimit: 2 }, { logger });
  try {
    const body = stripeEvent('invoice.paid', 'cus_acme_001');
    await client.handleStripeWebhook(body, sign(body));
    assert.equal(await client.isEnabled('acme-corp', 'pro_features'), true);

    await sidecar.stop();
    await notCurrent(client);
    assert.equal(await client.isEnabled('acme-corp', 'pro_features'), true, 'the last known value');
    assert.equal(await client.isEnabled('globex', 'pro_features'), false, 'the catalog default');
    assert.equal((await client.getFlag('acme-corp', 'pro_features')).value, true);
    await assert.rejects(client.getFlag('acme-corp', 'never_defined'), FlagNotFoundError);
    assert.equal(await client.isEnabled('acme-corp', 'never_defined'), false);
    const decision = await client.authorize({ token: token('acme-corp'), tenantId: 'acme-corp', require: ['pro_features'] });
    assert.deepEqual([decision.allowed, decision.failModeApplied, decision.problem], [true, true, null]);

    // Webhooks never fail open: Stripe must retry.
    const refused = await client.handleStripeWebhook(body, sign(body)).then(
      () => assert.fail('a webhook was acknowledged while the sidecar was away'),
      (error) => error,
    );
    assert.ok(refused instanceof SidecarUnavailableError, String(refused));
    assert.equal(refused.status, 503);
    assert.equal(refused.problem.reason, 'SIDECAR_UNAVAILABLE');

    for (const n of [1, 2, 3]) {
      assert.equal(await client.audit({ event: `app.login.${n}`, outcome: 'success', actor: 'user:1', tenantId: 'acme-corp' }), null);
    }
    assert.equal(client.spooled, 2, 'the spool keeps at most spoolLimit records');
    assert.ok(client.failModeDecisions >= 5);
    assert.deepEqual(
      logger.lines.filter(([, message]) => message.includes('spool is full')).map(([level]) => level),
      ['error'],
    );
    assert.equal(logger.lines.filter(([, message]) => message.includes('unavailable')).length, 1, 'one line per outage');

    await sidecar.restart();
    await current(client);
    await eventually(() => (client.spooled === 0 ? true : undefined), 'the spool was never sent');
    const logins = await client.auditQuery({ tenantId: 'acme-corp', eventPrefix: 'app.login' });
    assert.deepEqual(logins.map((r) => r.event), ['app.login.2', 'app.login.3'], 'the oldest record was dropped');
    assert.equal(logger.lines.filter(([, message]) => message === 'coresdk sidecar is back').length, 1);
    assert.equal((await client.auditVerify()).ok, true);
  } finally {
    await client.close();
    await sidecar.close();
  }
});

test('fail mode closed: 503 errors and denied decisions, nothing spooled', async () => {
  const sidecar = await Sidecar.start();
  const client = await clientFor(sidecar, { failMode: 'closed', timeoutMs: 300 }, { logger: recordingLogger() });
  try {
    await sidecar.stop();
    await notCurrent(client);
    await assert.rejects(client.isEnabled('acme-corp', 'pro_features'), SidecarUnavailableError);
    await assert.rejects(client.getFlag('acme-corp', 'never_defined'), SidecarUnavailableError);
    const decision = await client.authorize({ token: token('acme-corp'), require: ['pro_features'], resource: 'GET /x' });
    assert.equal(decision.allowed, false);
    assert.equal(decision.failModeApplied, true);
    assert.equal(decision.problem.status, 503);
    await assert.rejects(client.audit({ event: 'app.login', outcome: 'success', actor: 'user:1' }), SidecarUnavailableError);
    assert.equal(client.spooled, 0);
    const body = stripeEvent('invoice.paid', 'cus_acme_001');
    await assert.rejects(client.handleStripeWebhook(body, sign(body)), SidecarUnavailableError);

    await sidecar.restart();
    await current(client);
    assert.equal(await client.isEnabled('acme-corp', 'pro_features'), false);
    assert.equal((await client.authorize({ tenantId: 'acme-corp' })).allowed, true);
  } finally {
    await client.close();
    await sidecar.close();
  }
});

test('fail mode closed: once the sidecar is back, flags are asked of it while the flag stream still waits to reconnect', async () => {
  const sidecar = await Sidecar.start();
  // A generous deadline: the first calls after the restart may wait for the channel to reconnect.
  const client = await clientFor(sidecar, { failMode: 'closed', timeoutMs: 10_000 }, { logger: recordingLogger() });
  try {
    assert.equal(await client.isEnabled('acme-corp', 'pro_features'), false);
    await sidecar.stop();
    await notCurrent(client);
    // Long enough down that the stream's reconnect backoff has grown to seconds.
    await sleep(4_000);
    await sidecar.restart();
    const before = client.failModeDecisions;
    // The cache is warm but stale: fail mode closed asks the sidecar rather than answering 503.
    assert.equal(client.cacheCurrent, false, 'precondition: the flag stream has not reconnected yet');
    assert.equal((await client.getFlag('acme-corp', 'pro_features')).value, false);
    assert.equal(await client.isEnabled('acme-corp', 'pro_features'), false);
    assert.equal(client.failModeDecisions, before);
    // That answer ended the outage, and the stream reconnects without waiting out its backoff.
    await current(client);
  } finally {
    await client.close();
    await sidecar.close();
  }
});
