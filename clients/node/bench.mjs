// Benchmarks of the Node client against a real sidecar it starts itself (beside
// clients/python/bench.py):
//
// 1. `isEnabled` on a warm cache, in ns per awaited call, beside two floors measured in the same
//    run: a plain nested-Map lookup (what the cache does) and an awaited async function that
//    does only that lookup (what any promise-returning read costs).
// 2. Change propagation: a webhook is applied through one client; the time until a second
//    client's cache (fed by WatchFlags) shows the new value, p50/p99 over a few hundred changes.
//
//     cargo build --release && (cd clients/node && npm ci && npm run build)
//     node clients/node/bench.mjs [path/to/coresdk]    # default target/release/coresdk
//
// The binary may also come from CORESDK_BENCH_BINARY.

import { join } from 'node:path';
import { setImmediate as yieldToEvents } from 'node:timers/promises';

import { ROOT, Sidecar, sign, stripeEvent } from '../../tests/openfeature-node/sidecar.mjs';
import { SidecarClient } from './dist/index.js';
import { clientFor, settingsFor } from './test/helpers.mjs';

process.env.CORESDK_TEST_BINARY =
  process.argv[2] ?? process.env.CORESDK_BENCH_BINARY ?? join(ROOT, 'target', 'release', 'coresdk');

const CALLS = 1_000_000;
const REPEATS = 5;
const CHANGES = 300;

/** The best of REPEATS runs of CALLS calls, in ns per call. */
async function nsPerCall(body) {
  let best = Infinity;
  for (let run = 0; run < REPEATS; run += 1) {
    const started = process.hrtime.bigint();
    await body(CALLS);
    best = Math.min(best, Number(process.hrtime.bigint() - started) / CALLS);
  }
  return best;
}

function percentile(sorted, p) {
  return sorted[Math.min(sorted.length - 1, Math.ceil((sorted.length * p) / 100) - 1)];
}

async function main() {
  console.log(`sidecar: ${process.env.CORESDK_TEST_BINARY}; node ${process.version}`);
  const sidecar = await Sidecar.start();
  const reader = await clientFor(sidecar);
  // No cache of its own: its webhook calls return as soon as the sidecar answers, so the time
  // measured is the reader's.
  const writer = new SidecarClient(settingsFor(sidecar), { watch: false });
  try {
    const first = stripeEvent('invoice.paid', 'cus_acme_001');
    await writer.handleStripeWebhook(first, sign(first));
    while (!(await reader.isEnabled('acme-corp', 'pro_features'))) await yieldToEvents();

    const plain = new Map([['acme-corp', new Map([['pro_features', { value: true }]])]]);
    let sink = 0;
    const mapLookup = await nsPerCall(async (n) => {
      for (let i = 0; i < n; i += 1) if (plain.get('acme-corp')?.get('pro_features')?.value === true) sink += 1;
    });
    const lookupAsync = async (tenant, key) => plain.get(tenant)?.get(key)?.value === true;
    const awaitedLookup = await nsPerCall(async (n) => {
      for (let i = 0; i < n; i += 1) if (await lookupAsync('acme-corp', 'pro_features')) sink += 1;
    });
    const isEnabled = await nsPerCall(async (n) => {
      for (let i = 0; i < n; i += 1) if (await reader.isEnabled('acme-corp', 'pro_features')) sink += 1;
    });
    if (sink !== 3 * REPEATS * CALLS) throw new Error('a lookup answered false');
    console.log(
      `isEnabled (warm cache): ${isEnabled.toFixed(0)} ns/call; floors: Map lookup ${mapLookup.toFixed(1)} ns, ` +
        `awaited async Map lookup ${awaitedLookup.toFixed(0)} ns (${(isEnabled / awaitedLookup).toFixed(1)}x)`,
    );

    const latencies = [];
    for (let i = 0; i < CHANGES; i += 1) {
      const eventType = i % 2 === 0 ? 'invoice.payment_failed' : 'invoice.paid';
      const expected = eventType === 'invoice.paid';
      const body = stripeEvent(eventType, 'cus_acme_001');
      const started = process.hrtime.bigint();
      await writer.handleStripeWebhook(body, sign(body));
      while ((await reader.isEnabled('acme-corp', 'pro_features')) !== expected) {
        if (Number(process.hrtime.bigint() - started) > 5e9) throw new Error('a change never reached the reader');
        await yieldToEvents();
      }
      latencies.push(Number(process.hrtime.bigint() - started) / 1e6);
    }
    latencies.sort((a, b) => a - b);
    console.log(
      `propagation webhook → other client's cache: p50 ${percentile(latencies, 50).toFixed(2)} ms, ` +
        `p99 ${percentile(latencies, 99).toFixed(2)} ms, max ${latencies.at(-1).toFixed(2)} ms over ${CHANGES} changes`,
    );
  } finally {
    await reader.close();
    await writer.close();
    await sidecar.close();
  }
}

await main();
