// @openfeature/flagd-provider in in-process mode (flagd.sync.v1 SyncFlags, evaluated locally
// by flagd-core with JSONLogic) against the sidecar's flagd-sync listener.

import assert from 'node:assert/strict';
import { test } from 'node:test';

import { OpenFeature, StandardResolutionReasons } from '@openfeature/server-sdk';
import { FlagdProvider } from '@openfeature/flagd-provider';

import { openFeatureSuite } from './scenarios.mjs';
import { Sidecar, eventually, stripeEvent, within } from './sidecar.mjs';

function inProcess({ host, port }, options = {}) {
  return new FlagdProvider({
    host,
    port,
    resolverType: 'in-process',
    // Hang guards for a loaded machine, not latency targets.
    deadlineMs: 5_000,
    // After a stream error the provider waits this long before reconnecting (default 5 s).
    retryBackoffMaxMs: 1_000,
    ...options,
  });
}

await openFeatureSuite({ listener: 'flagd-sync', events: true, provider: (endpoint) => inProcess(endpoint) });

test(
  "a tenant=<id> selector gives that tenant's flags, with no context, and follows its changes",
  async (t) => {
    // Started here, not at load, so it does not run beside the suite's sidecar.
    const sidecar = await Sidecar.start({ listeners: ['flagd-sync'] });
    const endpoint = sidecar.endpoint('flagd-sync');
    t.after(async () => {
      try {
        await OpenFeature.close();
      } finally {
        await sidecar.close();
      }
    });
    assert.ok(endpoint, 'the sidecar announced no flagd-sync listener');
    const now = Math.floor(Date.now() / 1000);
    // Older than the payment failure below: Stripe's `created` orders the two.
    await sidecar.deliver(stripeEvent('invoice.paid', 'cus_acme_001', { id: 'in_acme', created: now - 60 }));
    // The provider sends the selector in the flagd-selector header (and the deprecated field).
    await within(
      OpenFeature.setProviderAndWait('acme-only', inProcess(endpoint, { selector: 'tenant=acme-corp' })),
      'the provider is ready',
      30_000,
    );
    const client = OpenFeature.getClient('acme-only');

    const paid = await client.getBooleanDetails('pro_features', false);
    assert.equal(paid.value, true);
    assert.equal(paid.reason, StandardResolutionReasons.STATIC);
    // Another tenant's context changes nothing: the document holds acme-corp's flags only.
    assert.equal(await client.getBooleanValue('pro_features', false, { tenant_id: 'globex' }), true);

    await sidecar.deliver(stripeEvent('invoice.payment_failed', 'cus_acme_001', { created: now }));
    await eventually(
      async () => ((await client.getBooleanValue('pro_features', true)) === false ? true : undefined),
      'the selected tenant never saw its failed payment',
    );
  },
);
