// The real sidecar binary for the OpenFeature Node tests: ephemeral ports, a throwaway SQLite
// store, signed Stripe webhooks over its gRPC API, and a restart on the same ports and store.
// Mirrors clients/python/tests/conftest.py, so both suites start the sidecar the same way.
// The Node client's tests (clients/node/test) use it too, from a checkout where only
// clients/node has its packages installed: so only `deliver`, which the OpenFeature tests
// alone call, loads gRPC (from this directory's node_modules), and only when called.

import { spawn } from 'node:child_process';
import { createHmac } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { setTimeout as sleep } from 'node:timers/promises';

export const ROOT = resolve(fileURLToPath(new URL('.', import.meta.url)), '..', '..');
export const STRIPE_SECRET = 'whsec_test_secret';
const ADMIN_TOKEN = 'node-suite-admin-token-0123456789';
export const ENV = {
  STRIPE_WEBHOOK_SECRET: STRIPE_SECRET,
  CORESDK_JWT_SECRET: 'node-suite-jwt-secret-at-least-32-bytes',
  CORESDK_ADMIN_TOKEN: ADMIN_TOKEN,
  CORESDK_PROBLEM_TYPE_BASE: 'https://securepay.example/errors',
  CORESDK_BILLING_URL: 'https://securepay.example/billing',
  CORESDK_UPGRADE_URL: 'https://securepay.example/pricing',
  // Sidecars are stopped often: no shutdown delay (the Rust suite tests it).
  CORESDK_SHUTDOWN_DELAY_S: '0',
};
// examples/tenants.json: cus_acme_001 → acme-corp, cus_globex_001 → globex, cus_initech_001 → initech.
export const TENANTS_FILE = join(ROOT, 'examples', 'tenants.json');
// Every side listener the sidecar may have (the OpenFeature ones and operations): each is off
// unless a test asks for it, so a test never races another process for a default port.
const SIDE_LISTENERS = ['flagd', 'flagd-sync', 'ofrep', 'ops'];

// Hang guards only: a debug build opening a fresh store is slow on a loaded machine.
const START_TIMEOUT_MS = 30_000;
const STOP_TIMEOUT_MS = 15_000;
// The extra listeners' lines follow the main one at once (one write each, no wait between), so
// a name still missing after this long is a listener this binary does not have.
const LISTENER_LINES_GRACE_MS = 3_000;

export function binary() {
  const path = process.env.CORESDK_TEST_BINARY ?? join(ROOT, 'target', 'debug', 'coresdk');
  if (!existsSync(path)) {
    throw new Error(`${path} is missing: run \`cargo build\` (./scripts/test does) before the Node tests`);
  }
  return path;
}

function listenEnv(name) {
  return `CORESDK_${name.toUpperCase().replaceAll('-', '_')}_LISTEN`;
}

const LISTENING = /^coresdk listening on (\S+)$/;
const NAMED_LISTENING = /^coresdk (\S+) listening on (\S+)$/;

// Every sidecar this process started, so none outlives it even if a test forgets `close()`.
const running = new Set();
process.on('exit', () => {
  for (const child of running) child.kill('SIGKILL');
});

/** Lines of a stream, awaited one at a time. */
class LineReader {
  #lines = [];
  #waiters = [];
  #closed = false;

  constructor(stream) {
    const lines = createInterface({ input: stream, crlfDelay: Infinity });
    lines.on('line', (line) => {
      const waiter = this.#waiters.shift();
      if (waiter) waiter(line);
      else this.#lines.push(line);
    });
    lines.on('close', () => {
      this.#closed = true;
      for (const waiter of this.#waiters.splice(0)) waiter(null);
    });
  }

  /** The next line; null when the stream ended or `timeoutMs` passed first. */
  next(timeoutMs) {
    if (this.#lines.length > 0) return Promise.resolve(this.#lines.shift());
    if (this.#closed) return Promise.resolve(null);
    return new Promise((resolveLine) => {
      const waiter = (line) => {
        clearTimeout(timer);
        resolveLine(line);
      };
      const timer = setTimeout(() => {
        this.#waiters.splice(this.#waiters.indexOf(waiter), 1);
        resolveLine(null);
      }, timeoutMs);
      this.#waiters.push(waiter);
    });
  }
}

export class Sidecar {
  /**
   * Starts the binary with the named OpenFeature listeners on ephemeral ports, e.g.
   * `Sidecar.start({ listeners: ['flagd'] })`.
   */
  static async start({ listeners = [], env = {} } = {}) {
    const dir = await mkdtemp(join(tmpdir(), 'coresdk-node-'));
    const sidecar = new Sidecar(dir, listeners, env);
    try {
      await sidecar.#spawn();
    } catch (error) {
      await sidecar.close();
      throw error;
    }
    return sidecar;
  }

  #dir;
  #env;
  #wanted;
  #child = null;
  #exited = null;
  #stderr = '';
  /** The main gRPC address, e.g. `127.0.0.1:41234`. */
  addr = '127.0.0.1:0';
  /** name → address of each OpenFeature listener this sidecar announced. */
  listeners = new Map();

  constructor(dir, listeners, env) {
    this.#dir = dir;
    this.#wanted = new Map(listeners.map((name) => [name, '127.0.0.1:0']));
    this.#env = env;
  }

  get store() {
    return `sqlite://${join(this.#dir, 'coresdk.db')}`;
  }

  /** `{host, port}` of a listener, or undefined when this binary does not serve it. */
  endpoint(name) {
    const addr = this.listeners.get(name);
    if (addr === undefined) return undefined;
    const colon = addr.lastIndexOf(':');
    return { host: addr.slice(0, colon), port: Number(addr.slice(colon + 1)) };
  }

  async #spawn() {
    const env = { ...ENV, ...this.#env, PATH: process.env.PATH ?? '', CORESDK_LOG: 'error' };
    for (const name of SIDE_LISTENERS) env[listenEnv(name)] = 'off';
    for (const [name, addr] of this.#wanted) env[listenEnv(name)] = addr;
    const child = spawn(
      binary(),
      ['serve', '--listen', this.addr, '--store', this.store, '--tenants-file', TENANTS_FILE],
      { env, stdio: ['ignore', 'pipe', 'pipe'] },
    );
    running.add(child);
    this.#child = child;
    this.#stderr = '';
    child.stderr.setEncoding('utf8');
    child.stderr.on('data', (chunk) => {
      // The tail is enough to say why a start failed.
      this.#stderr = (this.#stderr + chunk).slice(-4000);
    });
    this.#exited = new Promise((resolveExit) => {
      child.once('exit', (code, signal) => {
        running.delete(child);
        resolveExit({ code, signal });
      });
    });
    const lines = new LineReader(child.stdout);

    const first = await lines.next(START_TIMEOUT_MS);
    const main = first?.match(LISTENING);
    if (!main) {
      // A binary that exited says why on stderr; give the pipe a moment to deliver it.
      await Promise.race([this.#exited, sleep(1_000)]);
      throw new Error(`the sidecar did not start: first line ${JSON.stringify(first)}; stderr: ${this.#stderr}`);
    }
    this.addr = main[1];
    this.listeners.clear();
    while ([...this.#wanted.keys()].some((name) => !this.listeners.has(name))) {
      const line = await lines.next(LISTENER_LINES_GRACE_MS);
      if (line === null) break;
      const named = line.match(NAMED_LISTENING);
      if (named) this.listeners.set(named[1], named[2]);
    }
  }

  /** Stops the process (SIGTERM, then SIGKILL after a hang guard); the store stays. */
  async stop() {
    const child = this.#child;
    if (child === null) return;
    this.#child = null;
    if (child.exitCode === null && child.signalCode === null) {
      child.kill('SIGTERM');
      const guard = new AbortController();
      const stopped = await Promise.race([
        this.#exited,
        sleep(STOP_TIMEOUT_MS, null, { signal: guard.signal }).catch(() => undefined),
      ]);
      guard.abort();
      if (stopped === null) {
        child.kill('SIGKILL');
        await this.#exited;
        throw new Error(`the sidecar ignored SIGTERM for ${STOP_TIMEOUT_MS} ms; stderr: ${this.#stderr}`);
      }
      // A clean stop is part of what is tested: a sidecar that fails its shutdown (or dies
      // of SIGTERM instead of handling it) fails the test.
      if (stopped.code !== 0 || stopped.signal !== null) {
        throw new Error(
          `the sidecar did not stop cleanly on SIGTERM (exit code ${stopped.code}, signal ${stopped.signal}); stderr: ${this.#stderr}`,
        );
      }
    }
  }

  /** Stops the sidecar and starts it again on the same ports with the same store. */
  async restart() {
    await this.stop();
    for (const [name, addr] of this.listeners) this.#wanted.set(name, addr);
    const before = new Map(this.listeners);
    await this.#spawn();
    for (const [name, addr] of before) {
      if (this.listeners.get(name) !== addr) {
        throw new Error(`after the restart ${name} listens on ${this.listeners.get(name)}, not ${addr}`);
      }
    }
  }

  /** Stops the sidecar and deletes its store. */
  async close() {
    try {
      await this.stop();
    } finally {
      await rm(this.#dir, { recursive: true, force: true });
    }
  }

  /** Delivers a Stripe event, signed as Stripe signs it, through WebhookService/HandleStripeWebhook. */
  async deliver(payload) {
    const { grpc, WebhookService } = await webhookService();
    const client = new WebhookService(this.addr, grpc.credentials.createInsecure());
    try {
      return await new Promise((resolveCall, rejectCall) => {
        client.HandleStripeWebhook(
          { payload, signature_header: sign(payload) },
          { deadline: Date.now() + 10_000 },
          (error, response) => (error ? rejectCall(error) : resolveCall(response)),
        );
      });
    } finally {
      client.close();
    }
  }
}

let webhookServiceClass;
function webhookService() {
  webhookServiceClass ??= (async () => {
    const grpc = await import('@grpc/grpc-js');
    const protoLoader = await import('@grpc/proto-loader');
    const definition = protoLoader.loadSync('coresdk/v1/webhook.proto', {
      includeDirs: [join(ROOT, 'proto')],
      keepCase: true,
      longs: String,
      enums: String,
      defaults: true,
      oneofs: true,
    });
    return { grpc, WebhookService: grpc.loadPackageDefinition(definition).coresdk.v1.WebhookService };
  })();
  return webhookServiceClass;
}

/** Stripe's scheme: `t=<unix>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`. */
export function sign(payload, secret = STRIPE_SECRET, timestamp = Math.floor(Date.now() / 1000)) {
  const mac = createHmac('sha256', secret).update(`${timestamp}.`).update(payload).digest('hex');
  return `t=${timestamp},v1=${mac}`;
}

let eventCounter = 0;
/**
 * A Stripe event's raw body. `created` orders events for the same flag (an older one never
 * overwrites a newer one), so tests that send several give each its own.
 */
export function stripeEvent(type, customer, { created = Math.floor(Date.now() / 1000), ...fields } = {}) {
  eventCounter += 1;
  return Buffer.from(
    JSON.stringify({
      id: `evt_node_${process.pid}_${Date.now()}_${eventCounter}`,
      object: 'event',
      type,
      created,
      data: { object: { ...fields, customer } },
    }),
  );
}

/**
 * Polls `probe` until it returns something other than undefined, and returns that. The timeout
 * is a hang guard, not a speed assertion; `describe` says what never happened.
 */
export async function eventually(probe, describe, { timeoutMs = 15_000, intervalMs = 50 } = {}) {
  const deadline = Date.now() + timeoutMs;
  let last;
  for (;;) {
    try {
      const value = await probe();
      if (value !== undefined) return value;
    } catch (error) {
      last = error;
    }
    if (Date.now() > deadline) {
      throw new Error(`${describe} within ${timeoutMs} ms${last ? `: ${last.message}` : ''}`);
    }
    await sleep(intervalMs);
  }
}

/** `promise`, or an error saying what never happened after `timeoutMs` (a hang guard). */
export async function within(promise, describe, timeoutMs = 15_000) {
  let timer;
  const expired = new Promise((_, rejectExpired) => {
    timer = setTimeout(() => rejectExpired(new Error(`${describe} within ${timeoutMs} ms`)), timeoutMs);
  });
  try {
    return await Promise.race([promise, expired]);
  } finally {
    clearTimeout(timer);
  }
}
