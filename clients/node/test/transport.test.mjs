// The client's transport against the real sidecar: a write that may have committed is never
// sent twice, TLS and mutual TLS, local validation that refuses what the sidecar refuses, and a
// close() that lets the process exit.

import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { createServer, connect } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { fileURLToPath } from 'node:url';

import {
  checkFlagKey,
  checkId,
  ProblemError,
  SidecarClient,
  SidecarUnavailableError,
  makeSettings,
  settingsFromEnv,
} from '../dist/index.js';
import { clientFor, ENV, eventually, recordingLogger, settingsFor, Sidecar, sign, stripeEvent, within } from './helpers.mjs';

const ROOT = fileURLToPath(new URL('../../../', import.meta.url));

/**
 * A TCP proxy in front of the sidecar that can drop the connection once the sidecar starts
 * answering the next request: the request arrived (and may have committed), the client never
 * hears back. Counts the connections the client opens.
 */
async function startProxy(target) {
  const colon = target.lastIndexOf(':');
  const [host, port] = [target.slice(0, colon), Number(target.slice(colon + 1))];
  const sockets = new Set();
  const proxy = { connections: 0, armed: false, requestSeen: false, addr: '', freeze: 'off' };
  const server = createServer((client) => {
    proxy.connections += 1;
    const upstream = connect(port, host);
    for (const socket of [client, upstream]) {
      sockets.add(socket);
      socket.on('error', () => {});
      socket.on('close', () => sockets.delete(socket));
    }
    client.on('data', (chunk) => {
      if (proxy.freeze === 'answered') proxy.freeze = 'frozen';
      if (proxy.freeze === 'frozen') return;
      if (proxy.freeze === 'armed') proxy.freeze = 'requested';
      if (proxy.armed) proxy.requestSeen = true;
      upstream.write(chunk);
    });
    upstream.on('data', (chunk) => {
      if (proxy.freeze === 'frozen') return;
      if (proxy.freeze === 'requested') proxy.freeze = 'answered';
      if (proxy.armed && proxy.requestSeen) {
        proxy.armed = false;
        proxy.requestSeen = false;
        client.destroy();
        upstream.destroy();
        return;
      }
      client.write(chunk);
    });
    client.on('close', () => upstream.destroy());
    upstream.on('close', () => client.destroy());
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  proxy.addr = `127.0.0.1:${server.address().port}`;
  proxy.cutNextAnswer = () => {
    proxy.armed = true;
    proxy.requestSeen = false;
  };
  // The next request is answered; from the client's next write on, nothing goes either way
  // and the connections stay open: every call waits out its deadline, the stream sees nothing.
  proxy.freezeAfterNextAnswer = () => {
    proxy.freeze = 'armed';
  };
  proxy.close = () =>
    new Promise((resolve) => {
      for (const socket of sockets) socket.destroy();
      server.close(resolve);
    });
  return proxy;
}

describe('against one sidecar', () => {
  let sidecar;
  before(async () => {
    sidecar = await Sidecar.start();
  });
  after(async () => {
    await sidecar?.close();
  });

  test('SetFlag is not sent again after the connection dropped; an Append (keyed) and a read are', async () => {
    const proxy = await startProxy(sidecar.addr);
    const client = new SidecarClient(
      settingsFor(sidecar, { sidecarAddr: proxy.addr, failMode: 'closed', timeoutMs: 3_000 }),
      { watch: false, logger: recordingLogger() },
    );
    const reader = await clientFor(sidecar);
    try {
      assert.equal((await client.auditVerify()).ok, true);
      assert.equal(proxy.connections, 1);

      // The answer is cut after the sidecar committed: SetFlag has no key, so one attempt.
      const before = await reader.auditQuery({ eventPrefix: 'flag.set' });
      proxy.cutNextAnswer();
      await assert.rejects(client.setFlag('acme-corp', 'beta_ui', true, { actor: 'ops' }), SidecarUnavailableError);
      assert.equal(proxy.connections, 1, 'the write was sent again over a new connection');
      const after = await reader.auditQuery({ eventPrefix: 'flag.set' });
      assert.ok(after.length - before.length <= 1, `${after.length - before.length} changes`);

      // An append carries an idempotency key: it is sent again and answered with the one
      // record the sidecar stored.
      proxy.cutNextAnswer();
      const record = await client.audit({ event: 'app.transfer.sent', outcome: 'success', actor: 'user:7', tenantId: 'acme-corp' });
      assert.ok(proxy.connections > 1, 'the append was not tried again');
      const sent = await reader.auditQuery({ eventPrefix: 'app.transfer.sent' });
      assert.deepEqual(sent.map((r) => r.seq), [record.seq]);

      // A read within the same deadline is tried again, over a new connection, and answers.
      const connections = proxy.connections;
      proxy.cutNextAnswer();
      assert.equal((await client.auditVerify()).ok, true);
      assert.ok(proxy.connections > connections, 'the read was not tried again');
    } finally {
      await reader.close();
      await client.close();
      await proxy.close();
    }
  });

  test('a committed mapping resolves even when the read-your-writes step after it fails', async () => {
    const proxy = await startProxy(sidecar.addr);
    const timeoutMs = 1_500;
    const reader = await clientFor(sidecar);
    const client = await clientFor(sidecar, { sidecarAddr: proxy.addr, timeoutMs }, { logger: recordingLogger() });
    try {
      // An event for a customer nobody mapped yet is parked; the mapping applies it.
      const customer = `cus_ryw_${Date.now()}`;
      const body = stripeEvent('invoice.paid', customer);
      await assert.rejects(reader.handleStripeWebhook(body, sign(body)), (error) => error.problem?.reason === 'UNKNOWN_CUSTOMER');
      // The mapping is answered; the GetFlags that waits for its effects in the cache never is.
      proxy.freezeAfterNextAnswer();
      const tenant = `ryw-${Date.now()}`;
      assert.equal(await within(client.mapCustomer(customer, tenant, { actor: 'ops', reason: 'test' }), 'mapCustomer returned'), 1);
      assert.equal(proxy.freeze, 'frozen', 'precondition: the step after the mapping got no answer');
      assert.equal(await reader.resolveCustomer(customer), tenant);
    } finally {
      await client.close();
      await reader.close();
      await proxy.close();
    }
  });

  test('ids and keys checked locally get the problem the sidecar sends', async () => {
    const client = await clientFor(sidecar);
    try {
      const base = ENV.CORESDK_PROBLEM_TYPE_BASE;
      const refusals = async (promise) => promise.then(() => assert.fail('accepted'), (error) => error.problem);
      const local = (check) => {
        try {
          check();
        } catch (error) {
          assert.ok(error instanceof ProblemError);
          return error.problem;
        }
        return assert.fail('accepted locally');
      };
      for (const tenant of ['', 'two words', 'zero\u200bwidth', 'bidi\u202eevil', 'x'.repeat(129), 'é'.repeat(65)]) {
        const remote = await refusals(client.mapCustomer('cus_validation', tenant, { actor: 'suite' }));
        assert.deepEqual(local(() => checkId('tenant_id', tenant, base)), remote, JSON.stringify(tenant));
      }
      for (const key of ['', 'bad key', 'naïve', 'k'.repeat(129), `${'k'.repeat(70)}!`, 'key\n']) {
        const remote = await refusals(client.setFlag('acme-corp', key, true, { actor: 'suite' }));
        assert.deepEqual(local(() => checkFlagKey(key, base)), remote, JSON.stringify(key));
      }
      // What the sidecar accepts, the client accepts.
      checkId('tenant_id', 'école-ü', base);
      checkFlagKey('a.b:c-d_e', base);
    } finally {
      await client.close();
    }
  });

  test('close() ends the stream and the channel: the process exits by itself', async () => {
    const script = `
      import { SidecarClient, makeSettings } from ${JSON.stringify(new URL('../dist/index.js', import.meta.url).href)};
      const [addr, reachable] = process.argv.slice(1);
      const client = new SidecarClient(makeSettings({ sidecarAddr: addr, timeoutMs: 2000 }), { logger: { warn() {}, error() {} } });
      if (reachable === 'yes') {
        const deadline = Date.now() + 10_000;
        while (!client.cacheCurrent && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
        if (!client.cacheCurrent) { console.error('never current'); process.exit(3); }
      }
      // Unreachable: the fail mode (open) answers after the deadline, with a reconnect pending.
      await client.isEnabled('acme-corp', 'pro_features');
      await client.close();
      await client.close();
      console.log('closed');
    `;
    for (const [addr, reachable] of [
      [sidecar.addr, 'yes'],
      ['127.0.0.1:1', 'no'],
    ]) {
      const child = spawn(process.execPath, ['--input-type=module', '-e', script, addr, reachable], {
        stdio: ['ignore', 'pipe', 'pipe'],
      });
      let output = '';
      child.stdout.on('data', (chunk) => (output += chunk));
      child.stderr.on('data', (chunk) => (output += chunk));
      const exited = new Promise((resolve) => child.once('exit', (code) => resolve(code)));
      try {
        const code = await within(exited, `a process that closed its client (${addr}) exited`, 20_000);
        assert.deepEqual([code, output.trim()], [0, 'closed'], addr);
      } finally {
        child.kill('SIGKILL');
      }
    }
  });

  test('a client left unclosed during an outage does not keep the process alive either', async () => {
    // Nothing listens on port 1: the stream fails and its reconnect timer must not hold the loop.
    const script = `
      import { SidecarClient, makeSettings } from ${JSON.stringify(new URL('../dist/index.js', import.meta.url).href)};
      const client = new SidecarClient(makeSettings({ sidecarAddr: '127.0.0.1:1', timeoutMs: 200 }), { logger: { warn() {}, error() {} } });
      console.log(await client.isEnabled('acme-corp', 'pro_features'));
    `;
    const child = spawn(process.execPath, ['--input-type=module', '-e', script], { stdio: ['ignore', 'pipe', 'pipe'] });
    let output = '';
    child.stdout.on('data', (chunk) => (output += chunk));
    child.stderr.on('data', (chunk) => (output += chunk));
    try {
      const code = await within(new Promise((resolve) => child.once('exit', resolve)), 'the process exited', 20_000);
      assert.deepEqual([code, output.trim()], [0, 'false']);
    } finally {
      child.kill('SIGKILL');
    }
  });
});

test('the API token goes with every call and the admin token with admin calls', async () => {
  const apiToken = 'node-suite-api-token-0123456789';
  const sidecar = await Sidecar.start({ env: { CORESDK_API_TOKEN: apiToken } });
  const clients = [];
  const open = (overrides, options) => {
    const client = new SidecarClient(settingsFor(sidecar, { timeoutMs: 2_000, ...overrides }), options);
    clients.push(client);
    return client;
  };
  try {
    const both = open({ apiToken });
    await eventually(() => (both.cacheCurrent ? true : undefined), 'WatchFlags never answered with the API token');
    assert.equal((await both.getFlag('acme-corp', 'pro_features')).isDefault, true);
    assert.equal((await both.setFlag('acme-corp', 'beta_ui', true, { actor: 'ops' })).value, true);
    assert.equal(await both.isEnabled('acme-corp', 'beta_ui'), true);

    const anonymous = open({ adminToken: undefined }, { watch: false });
    const refused = await anonymous.getFlag('acme-corp', 'pro_features').then(() => assert.fail('answered'), (e) => e);
    assert.ok(refused instanceof ProblemError && !(refused instanceof SidecarUnavailableError), String(refused));
    assert.equal(refused.status, 401, JSON.stringify(refused.problem));

    // Without an admin token the API token is sent, which no admin call accepts.
    const apiOnly = open({ apiToken, adminToken: undefined }, { watch: false });
    assert.equal((await apiOnly.getFlag('acme-corp', 'beta_ui')).value, true);
    const notAdmin = await apiOnly.setFlag('acme-corp', 'beta_ui', false, { actor: 'ops' }).then(() => assert.fail('answered'), (e) => e);
    assert.ok(notAdmin instanceof ProblemError, String(notAdmin));
    assert.ok([401, 403].includes(notAdmin.status), JSON.stringify(notAdmin.problem));
  } finally {
    for (const client of clients) await client.close();
    await sidecar.close();
  }
});

test('TLS and mutual TLS to the sidecar, from the CORESDK_SIDECAR_TLS_* settings', async () => {
  const python = process.env.CORESDK_TEST_PYTHON;
  assert.ok(
    python,
    'CORESDK_TEST_PYTHON is not set: the TLS test mints its certificates with tests/fixtures/mint_certs.py and needs a Python with `cryptography` (./scripts/test sets it)',
  );
  const certs = await mkdtemp(join(tmpdir(), 'coresdk-node-certs-'));
  try {
    const minted = spawnSync(python, [join(ROOT, 'tests', 'fixtures', 'mint_certs.py'), certs], { encoding: 'utf8' });
    assert.equal(minted.status, 0, `mint_certs.py failed: ${minted.stderr}${minted.error ?? ''}`);
    const server = {
      CORESDK_TLS_CERT_FILE: join(certs, 'server.pem'),
      CORESDK_TLS_KEY_FILE: join(certs, 'server.key'),
    };
    const clientEnv = {
      CORESDK_SIDECAR_TLS_CA_FILE: join(certs, 'ca.pem'),
      CORESDK_SIDECAR_TLS_CLIENT_CERT_FILE: join(certs, 'client.pem'),
      CORESDK_SIDECAR_TLS_CLIENT_KEY_FILE: join(certs, 'client.key'),
    };
    for (const mutual of [false, true]) {
      const sidecar = await Sidecar.start({
        env: { ...server, ...(mutual ? { CORESDK_TLS_CLIENT_CA_FILE: join(certs, 'ca.pem') } : {}) },
      });
      try {
        // The certificate names 127.0.0.1, where the sidecar listens, and sidecar.coresdk.test,
        // which no address resolves to: only the server-name override reaches that name.
        for (const serverName of [undefined, 'sidecar.coresdk.test']) {
          const env = { ...clientEnv, CORESDK_SIDECAR_ADDR: sidecar.addr };
          if (serverName) env.CORESDK_SIDECAR_TLS_SERVER_NAME = serverName;
          const settings = settingsFromEnv(env, { adminToken: ENV.CORESDK_ADMIN_TOKEN, timeoutMs: 5_000 });
          const client = new SidecarClient(settings);
          try {
            await eventually(() => (client.cacheCurrent ? true : undefined), `the cache never became current over TLS (mutual ${mutual})`);
            assert.equal((await client.getFlag('acme-corp', 'pro_features')).isDefault, true);
            assert.equal((await client.auditVerify()).ok, true);
          } finally {
            await client.close();
          }
        }
        // A plaintext client cannot talk to it, nor one expecting a name the certificate lacks;
        // nor, under mutual TLS, one without a certificate.
        const refused = [
          settingsFor(sidecar, { timeoutMs: 300, failMode: 'closed' }),
          settingsFromEnv(
            { ...clientEnv, CORESDK_SIDECAR_ADDR: sidecar.addr, CORESDK_SIDECAR_TLS_SERVER_NAME: 'elsewhere.coresdk.test' },
            { timeoutMs: 300, failMode: 'closed' },
          ),
        ];
        if (mutual) {
          refused.push(
            settingsFor(sidecar, { timeoutMs: 300, failMode: 'closed', tls: { caFile: clientEnv.CORESDK_SIDECAR_TLS_CA_FILE } }),
          );
        }
        for (const settings of refused) {
          const client = new SidecarClient(settings, { watch: false, logger: recordingLogger() });
          try {
            await assert.rejects(client.getFlag('acme-corp', 'pro_features'), SidecarUnavailableError);
          } finally {
            await client.close();
          }
        }
      } finally {
        await sidecar.close();
      }
    }
  } finally {
    await rm(certs, { recursive: true, force: true });
  }
});

test("a logger that throws fails no call: the sidecar's outage is still answered by the fail mode", async () => {
  const throwing = {
    warn() {
      throw new Error('the logger broke');
    },
    error() {
      throw new Error('the logger broke');
    },
  };
  const client = new SidecarClient(makeSettings({ sidecarAddr: '127.0.0.1:1', failMode: 'open', timeoutMs: 300 }), { logger: throwing });
  try {
    assert.equal(await client.isEnabled('acme-corp', 'pro_features'), false);
    assert.equal(await client.audit({ event: 'app.login', outcome: 'success', actor: 'user:1' }), null);
    assert.equal(client.spooled, 1);
  } finally {
    await client.close();
  }
});

test('settings given as undefined are not given: the defaults, or the environment, apply', () => {
  assert.equal(makeSettings({ timeoutMs: undefined, failMode: undefined }).timeoutMs, 1000);
  assert.equal(makeSettings({ failMode: undefined }).failMode, 'open');
  const settings = settingsFromEnv({ CORESDK_TIMEOUT_MS: '2500', CORESDK_FAIL_MODE: 'closed' }, { timeoutMs: undefined, failMode: undefined });
  assert.deepEqual([settings.timeoutMs, settings.failMode], [2500, 'closed']);
});
