// The scenarios every OpenFeature protocol of the sidecar must pass with a real, unmodified
// Node provider: a tenant's flag before and after a signed Stripe webhook flips it, the
// targetingKey fallback, a missing flag, a type mismatch, and the sidecar restarting under the
// provider. Each *.test.mjs file runs them for one protocol (node --test gives each file its own
// process, so each has its own OpenFeature singleton and sidecar).

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';

import { ErrorCode, OpenFeature, ProviderEvents, StandardResolutionReasons } from '@openfeature/server-sdk';

import { Sidecar, eventually, stripeEvent, within } from './sidecar.mjs';

const FLAG = 'pro_features';
const { DEFAULT, TARGETING_MATCH } = StandardResolutionReasons;

/**
 * Registers the scenarios for one protocol.
 * - `listener`: the sidecar listener the provider talks to (`flagd`, `flagd-sync`, `ofrep`);
 *   a binary that does not announce it fails the suite (never skips it: CI must not go green
 *   on a sidecar that lost a protocol).
 * - `provider({host, port})`: the provider pointed at that listener.
 * - `events`: whether the protocol pushes changes (flagd's EventStream, sync's stream), so the
 *   app hears PROVIDER_CONFIGURATION_CHANGED and, after a reconnect, PROVIDER_READY.
 * Every protocol answers alike: a tenant's own value is TARGETING_MATCH, the catalog default
 * DEFAULT (never STATIC, which providers may cache past a change).
 */
export async function openFeatureSuite({ listener, provider, events }) {
  const sidecar = await Sidecar.start({ listeners: [listener] });
  const endpoint = sidecar.endpoint(listener);
  const domain = `coresdk-${listener}`;

  describe(`OpenFeature Node SDK over ${listener}`, () => {
    let client;

    before(async () => {
      assert.ok(endpoint, `the sidecar announced no ${listener} listener`);
      await within(OpenFeature.setProviderAndWait(domain, provider(endpoint)), 'the provider is ready', 30_000);
      client = OpenFeature.getClient(domain);
    });

    after(async () => {
      try {
        await OpenFeature.close();
      } finally {
        await sidecar.close();
      }
    });

    /** The next event of `type` that `matches`; listening starts now, before its cause. */
    function nextEvent(type, matches = () => true) {
      let handler;
      // The SDK runs a PROVIDER_READY handler at once when the provider is already ready:
      // that call is the past, not the event awaited.
      let armed = false;
      const heard = new Promise((resolveEvent) => {
        handler = (details) => {
          if (armed && matches(details)) resolveEvent(details);
        };
        client.addHandler(type, handler);
        armed = true;
      });
      return {
        wait: (describeEvent) => within(heard, describeEvent).finally(() => client.removeHandler(type, handler)),
      };
    }

    const flagChange = () =>
      nextEvent(ProviderEvents.ConfigurationChanged, (details) => details?.flagsChanged?.includes(FLAG));

    /** The flag's details; `fallback` is what the app passes as its code default. */
    async function boolean(context, fallback) {
      const { value, reason, errorCode } = await client.getBooleanDetails(FLAG, fallback, context);
      return { value, reason, errorCode };
    }

    async function until(context, wanted, describeWait) {
      return eventually(async () => {
        // The opposite code default: the wanted value can only come from the sidecar.
        const details = await boolean(context, !wanted.value);
        return details.value === wanted.value && details.reason === wanted.reason ? details : undefined;
      }, describeWait);
    }

    /** `details` asked with code default `true`: the catalog's `false` came from the sidecar. */
    function assertCatalogDefault(details, describeIt) {
      assert.equal(details.value, false, describeIt);
      assert.equal(details.reason, DEFAULT, describeIt);
      assert.equal(details.errorCode, undefined, describeIt);
    }

    test("a tenant's flag follows a signed Stripe webhook", async () => {
      const acme = { tenant_id: 'acme-corp' };
      assertCatalogDefault(await boolean(acme, true), 'before any event');

      const changed = events ? flagChange() : undefined;
      const result = await sidecar.deliver(stripeEvent('invoice.paid', 'cus_acme_001', { id: 'in_acme' }));
      assert.equal(result.outcome, 'WEBHOOK_OUTCOME_APPLIED');
      assert.equal(result.tenant_id, 'acme-corp');

      if (changed) await changed.wait(`the app never heard that ${FLAG} changed`);
      await until(acme, { value: true, reason: TARGETING_MATCH }, 'the provider never saw the paid invoice');
      // Another tenant keeps the catalog default.
      assertCatalogDefault(await boolean({ tenant_id: 'initech' }, true), 'another tenant');
    });

    test('the targetingKey names the tenant when the context has no tenant_id', async () => {
      await sidecar.deliver(stripeEvent('invoice.paid', 'cus_globex_001', { id: 'in_globex' }));
      const byKey = await until(
        { targetingKey: 'globex' },
        { value: true, reason: TARGETING_MATCH },
        'the targetingKey never selected the tenant',
      );
      assert.equal(byKey.errorCode, undefined);
      // The tenant_id attribute, when given, wins over the targetingKey.
      assertCatalogDefault(
        await boolean({ targetingKey: 'globex', tenant_id: 'umbrella' }, true),
        'tenant_id over targetingKey',
      );
    });

    test('a missing flag answers the default value with FLAG_NOT_FOUND', async () => {
      const missing = await client.getBooleanDetails('no_such_flag', true, { tenant_id: 'acme-corp' });
      assert.equal(missing.value, true);
      assert.equal(missing.errorCode, ErrorCode.FLAG_NOT_FOUND);
      assert.equal(missing.reason, StandardResolutionReasons.ERROR);
    });

    test('a type mismatch answers the default value with TYPE_MISMATCH', async () => {
      const mismatch = await client.getStringDetails(FLAG, 'fallback', { tenant_id: 'acme-corp' });
      assert.equal(mismatch.value, 'fallback');
      assert.equal(mismatch.errorCode, ErrorCode.TYPE_MISMATCH);
      assert.equal(mismatch.reason, StandardResolutionReasons.ERROR);
    });

    test('the provider recovers when the sidecar restarts under it (same ports, same store)', async () => {
      const initech = { tenant_id: 'initech' };
      const now = Math.floor(Date.now() / 1000);
      // Older than the payment failure below: Stripe's `created` orders the two.
      await sidecar.deliver(stripeEvent('invoice.paid', 'cus_initech_001', { id: 'in_initech', created: now - 60 }));
      await until(initech, { value: true, reason: TARGETING_MATCH }, 'the provider never saw the paid invoice');

      const reconnected = events ? nextEvent(ProviderEvents.Ready) : undefined;
      await sidecar.restart();
      if (reconnected) await reconnected.wait('the provider never reconnected (no PROVIDER_READY after the restart)');
      await until(initech, { value: true, reason: TARGETING_MATCH }, "the provider lost the tenant's value across the restart");

      // A change after the restart reaches the provider (and, with events, the app) too.
      const changed = events ? flagChange() : undefined;
      const failed = await sidecar.deliver(stripeEvent('invoice.payment_failed', 'cus_initech_001', { created: now }));
      assert.equal(failed.outcome, 'WEBHOOK_OUTCOME_APPLIED');
      if (changed) await changed.wait(`the app never heard that ${FLAG} changed after the restart`);
      await until(initech, { value: false, reason: TARGETING_MATCH }, 'the provider never saw the failed payment after the restart');
    });
  });
}
