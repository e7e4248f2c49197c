// The in-process mock: the client contract (test/suite.mjs, the same suite client.test.mjs runs
// against the real sidecar), and what only the mock has to prove: it decides from the sidecar's
// own rules file, and refuses a rules file the sidecar refuses, with the sidecar's message.

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createHmac } from 'node:crypto';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';

import { binary, ENV, ROOT, Sidecar, sign } from '../../../tests/openfeature-node/sidecar.mjs';
import { MockSidecar, RulesError, makeSettings } from '../dist/index.js';
import { clientFor } from './helpers.mjs';
import { defineClientSuite } from './suite.mjs';

function mock(env = {}) {
  const settings = makeSettings({ useMock: true, problemTypeBase: ENV.CORESDK_PROBLEM_TYPE_BASE });
  return new MockSidecar(settings, { ...ENV, ...env });
}

defineClientSuite('mock', async () => {
  const sdk = mock();
  return {
    sdk,
    // A second client of the same mock: the same state, its own close() a no-op.
    another: async () =>
      new Proxy(sdk, {
        get: (target, name) => {
          if (name === 'close') return async () => {};
          const value = Reflect.get(target, name, target);
          return typeof value === 'function' ? value.bind(target) : value;
        },
      }),
    close: () => sdk.close(),
  };
});

const FLAGS = '[flags]\npro_features = false\nadvanced_analytics = false\n';
const rule = (body) => `[[rule]]\n${body}\n`;

// Each file the sidecar refuses; `exact` when the message is the sidecar's own wording (not the
// TOML parser's, which differs between parsers: then both must name `mentions`).
const REFUSED = [
  { rules: FLAGS + rule('events = ["customer.subscription.updated"]\nstatus = ["actve"]\nset = { pro_features = true }'), exact: true },
  { rules: FLAGS + rule('name = "paid"\nevents = ["invoice.paid"]\nstatus = ["active"]\nset = { pro_features = true }'), exact: true },
  { rules: FLAGS + rule('events = ["customer.subscription.updated"]\nset = { advanced_analytics = true }\nelse = { advanced_analytics = false }'), exact: true },
  {
    rules:
      FLAGS +
      rule('name = "same"\nevents = ["invoice.paid"]\nset = { pro_features = true }') +
      rule('name = "same"\nevents = ["invoice.payment_failed"]\nset = { pro_features = false }'),
    exact: true,
  },
  { rules: FLAGS + rule('events = ["customer.subscription.updated"]\nstatus = []\nset = { pro_features = true }'), exact: true },
  { rules: FLAGS + rule('events = ["invoice.paid"]\nset = { no_such_flag = true }'), exact: true },
  { rules: FLAGS + rule('events = ["customer.subscription.updated"]\nplans = ["pro monthly"]\nset = { advanced_analytics = true }'), exact: true },
  { rules: FLAGS + rule('name = "  "\nevents = ["invoice.paid"]\nset = { pro_features = true }'), exact: true },
  // U+0085 is white space to Rust's trim (and not to JS's).
  { rules: FLAGS + rule('name = "\\u0085"\nevents = ["invoice.paid"]\nset = { pro_features = true }'), exact: true },
  { rules: FLAGS + rule('events = []\nset = { pro_features = true }'), exact: true },
  { rules: FLAGS + rule('events = ["invoice.paid"]\nentitlements = true\nset = { pro_features = true }'), exact: true },
  { rules: '[flags]\n"bad key!" = true\n', exact: true },
  { rules: FLAGS + rule('events = ["invoice.paid"]\nbogus = 1\nset = { pro_features = true }'), mentions: '`bogus`' },
  { rules: '[flag]\npro_features = false\n', mentions: '`flag`' },
];

/** What the sidecar says when it refuses to start with `path` as its rules file. */
function sidecarRefusal(path) {
  return sidecarExit(['--rules-file', path], {});
}

/** How the sidecar ends when started with `args` and `env` (on top of the suite's). */
function sidecarExit(args, env) {
  return new Promise((resolve, reject) => {
    const child = spawn(binary(), ['serve', '--store', 'memory', '--listen', '127.0.0.1:0', ...args], {
      stdio: ['ignore', 'ignore', 'pipe'],
      env: { ...process.env, ...ENV, ...env },
    });
    let stderr = '';
    child.stderr.on('data', (chunk) => {
      stderr += chunk;
    });
    // A hang guard: a sidecar that accepts the file keeps running.
    const guard = setTimeout(() => child.kill('SIGKILL'), 30_000);
    child.on('error', reject);
    child.on('close', (code) => {
      clearTimeout(guard);
      resolve({ code, stderr });
    });
  });
}

/** The part of a refusal that names the defect: between `invalid rules: ` and `; fix the file`. */
function defect(message) {
  const match = /invalid rules: ([\s\S]*?)\s*; fix the file/.exec(message);
  assert.ok(match, `not a rules refusal: ${message}`);
  return match[1];
}

describe('mock: the rules', () => {
  let dir;
  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'coresdk-node-rules-'));
  });
  after(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  REFUSED.forEach(({ rules, exact, mentions }, n) => {
    test(`a rules file the sidecar refuses, the mock refuses with the same message (${n + 1})`, async () => {
      const path = join(dir, `rules-${n}.toml`);
      await writeFile(path, rules);
      const sidecar = await sidecarRefusal(path);
      assert.notEqual(sidecar.code, 0, 'the sidecar accepted the file');
      const error = (() => {
        try {
          mock({ CORESDK_RULES_FILE: path });
        } catch (caught) {
          return caught;
        }
        return assert.fail('the mock accepted a rules file the sidecar refuses');
      })();
      assert.ok(error instanceof RulesError, String(error));
      if (exact) assert.equal(defect(error.message), defect(sidecar.stderr));
      else {
        assert.ok(defect(sidecar.stderr).includes(mentions), sidecar.stderr);
        assert.ok(defect(error.message).includes(mentions), error.message);
      }
    });
  });

  test('a rules file the sidecar accepts, the mock accepts, and both decide by it', async () => {
    const path = join(dir, 'accepted.toml');
    await writeFile(
      path,
      '[flags]\nreports = false\nseats = 1\nratio = 0.25\nbig = 1e21\nlabel = "free"\n' +
        'since = 1979-05-27T07:32:00Z\nlocal = 1979-05-27T00:32:00.999\nday = 1979-05-27\nat = 07:32:00\n' +
        'limits = { api = 100, tiers = ["a", 2, true], nested = { x = 1.5 } }\nlist = [1, 2.5]\n' +
        rule('name = "paid"\nevents = ["invoice.paid"]\nset = { reports = true, seats = 5, label = "pro", limits = { api = 1000 } }'),
    );
    const env = { CORESDK_RULES_FILE: path };
    const sidecar = await Sidecar.start({ env });
    const client = await clientFor(sidecar, { adminToken: ENV.CORESDK_ADMIN_TOKEN, problemTypeBase: ENV.CORESDK_PROBLEM_TYPE_BASE }).catch(
      async (error) => {
        await sidecar.close();
        throw error;
      },
    );
    const sdk = mock(env);
    try {
      const values = async (backend) =>
        Object.fromEntries(Object.values(await backend.getFlags('acme-corp')).map((f) => [f.key, [f.value, f.isDefault]]));
      const before = await values(client);
      assert.deepEqual(before.seats, [1, true]);
      assert.deepEqual(await values(sdk), before);
      const body = Buffer.from(
        JSON.stringify({ id: 'evt_rules', type: 'invoice.paid', created: Math.floor(Date.now() / 1000), data: { object: { customer: 'cus_acme_001' } } }),
      );
      const deliver = async (backend) => {
        const { auditSeq, ...result } = await backend.handleStripeWebhook(body, sign(body));
        return result;
      };
      assert.deepEqual(await deliver(sdk), await deliver(client));
      const after = await values(client);
      assert.deepEqual(after.seats, [5, false]);
      assert.deepEqual(await values(sdk), after);
      const flags = async (backend) =>
        (await backend.auditQuery({ eventPrefix: 'billing.invoice.paid' })).map((r) => r.metadata.flags);
      assert.deepEqual(await flags(sdk), await flags(client));
    } finally {
      await sdk.close();
      await client.close();
      await sidecar.close();
    }
  });

  test('the default rules are the sidecar\'s: the same catalog, served by both', async () => {
    const sidecar = await Sidecar.start();
    const client = await clientFor(sidecar).catch(async (error) => {
      await sidecar.close();
      throw error;
    });
    const sdk = mock();
    try {
      const shown = (flags) => Object.values(flags).map((f) => [f.key, f.value, f.isDefault]);
      const expected = shown(await client.getFlags('fresh-tenant'));
      assert.ok(expected.length > 0);
      assert.deepEqual(shown(await sdk.getFlags('fresh-tenant')), expected);
    } finally {
      await sdk.close();
      await client.close();
      await sidecar.close();
    }
  });

  test('the packaged rules file is the repository\'s rules/default.toml', async () => {
    const { readFile } = await import('node:fs/promises');
    const { defaultRulesPath } = await import('../dist/index.js');
    assert.equal(await readFile(defaultRulesPath(), 'utf8'), await readFile(join(ROOT, 'rules', 'default.toml'), 'utf8'));
  });
});

test("the mock's settings win over the environment: problem types under settings.problemTypeBase", async () => {
  const settings = makeSettings({ useMock: true, problemTypeBase: 'https://mine.example/problems/' });
  const sdk = new MockSidecar(settings, { ...ENV, CORESDK_PROBLEM_TYPE_BASE: 'https://env.example/errors' });
  try {
    const error = await sdk.getFlag('bad tenant', 'pro_features').then(
      () => assert.fail('a bad tenant id was accepted'),
      (caught) => caught,
    );
    assert.equal(error.problem.type, 'https://mine.example/problems/invalid-request');
    const refused = await sdk.handleStripeWebhook('{}', 't=1,v1=00').then(
      () => assert.fail('a forged delivery was accepted'),
      (caught) => caught,
    );
    assert.ok(refused.problem.type.startsWith('https://mine.example/problems/'), refused.problem.type);
  } finally {
    await sdk.close();
  }
});

describe('mock: the settings the sidecar reads are read as the sidecar reads them', () => {
  // Taken as given (clap neither trims a value nor treats an empty one as unset), checked as
  // src/config.rs checks them.
  const REFUSED_SETTINGS = [
    { CORESDK_WEBHOOK_TOLERANCE_S: ' 300' },
    { CORESDK_WEBHOOK_TOLERANCE_S: '' },
    { CORESDK_JWT_LEEWAY_S: '1.5' },
    { CORESDK_JWT_LEEWAY_S: '18446744073709551616' },
    { CORESDK_DENY_AUDIT_WINDOW_S: '-1' },
    { CORESDK_WEBHOOK_MAX_BODY_BYTES: '0' },
    { CORESDK_WEBHOOK_MAX_BODY_BYTES: String(64 * 1024 * 1024 + 1) },
    { CORESDK_MAX_PARKED_EVENTS: '10000001' },
    { CORESDK_MAX_PARKED_EVENTS_PER_CUSTOMER: '10000001' },
    { CORESDK_BILLING_URL: '' },
    { CORESDK_BILLING_URL: ' https://pay.example' },
    { CORESDK_UPGRADE_URL: 'pricing.example' },
    { CORESDK_RULES_FILE: '' },
  ];
  for (const env of REFUSED_SETTINGS) {
    test(`refused: ${JSON.stringify(env)}`, async () => {
      const sidecar = await sidecarExit([], env);
      assert.notEqual(sidecar.code, 0, 'the sidecar started');
      assert.match(sidecar.stderr, new RegExp(Object.keys(env)[0]));
      assert.throws(() => mock(env), (error) => error instanceof Error && error.message.includes(Object.keys(env)[0]));
    });
  }

  test('accepted: the largest u64', async () => {
    const env = { CORESDK_WEBHOOK_TOLERANCE_S: '18446744073709551615', CORESDK_DENY_AUDIT_WINDOW_S: '+0' };
    const sidecar = await Sidecar.start({ env });
    await sidecar.close();
    await mock(env).close();
  });

  test('accepted: a leading +, the largest limits, and an issuer and secrets kept or trimmed as the sidecar keeps them', async () => {
    const env = {
      CORESDK_WEBHOOK_TOLERANCE_S: '+300',
      CORESDK_WEBHOOK_MAX_BODY_BYTES: String(64 * 1024 * 1024),
      CORESDK_MAX_PARKED_EVENTS: '10000000',
      CORESDK_MAX_PARKED_EVENTS_PER_CUSTOMER: '10000000',
      // Rust's trim drops U+0085 (White_Space), which JS's trim keeps.
      CORESDK_JWT_SECRET: `\u0085${ENV.CORESDK_JWT_SECRET}\u0085`,
      CORESDK_JWT_ISSUER: ' https://id.example ',
    };
    const sidecar = await Sidecar.start({ env });
    const client = await clientFor(sidecar, { problemTypeBase: ENV.CORESDK_PROBLEM_TYPE_BASE }).catch(async (error) => {
      await sidecar.close();
      throw error;
    });
    const sdk = mock(env);
    try {
      const now = Math.floor(Date.now() / 1000);
      const part = (object) => Buffer.from(JSON.stringify(object)).toString('base64url');
      const jwt = (iss) => {
        const input = `${part({ alg: 'HS256', typ: 'JWT' })}.${part({ sub: 'ann', tenant_id: 'acme-corp', exp: now + 3600, iss })}`;
        return `${input}.${createHmac('sha256', ENV.CORESDK_JWT_SECRET).update(input).digest('base64url')}`;
      };
      const verdict = (backend, token) =>
        backend.verifyToken(token).then(
          (answer) => ({ valid: true, tenant: answer.tenantId, iss: answer.claims.iss }),
          (error) => ({ valid: false, problem: error.problem }),
        );
      // The issuer is compared untrimmed: only the exact setting is accepted.
      for (const iss of [' https://id.example ', 'https://id.example']) {
        const expected = await verdict(client, jwt(iss));
        assert.deepEqual(await verdict(sdk, jwt(iss)), expected, `iss ${JSON.stringify(iss)}`);
      }
      assert.equal((await verdict(client, jwt(' https://id.example '))).valid, true);
      assert.equal((await verdict(client, jwt('https://id.example'))).valid, false);
    } finally {
      await sdk.close();
      await client.close();
      await sidecar.close();
    }
  });
});

test('an empty or doubled admin token is refused at start, as the sidecar refuses it', () => {
  // Not unset (operators off) nor a fall-through to the file: the sidecar does not start.
  const env = Object.fromEntries(Object.entries(ENV).filter(([k]) => !k.startsWith('CORESDK_ADMIN_TOKEN')));
  for (const admin of [
    { CORESDK_ADMIN_TOKEN: '' },
    { CORESDK_ADMIN_TOKEN: ' \n', CORESDK_ADMIN_TOKEN_FILE: '/etc/admin-token' },
    { CORESDK_ADMIN_TOKEN: 'x'.repeat(16), CORESDK_ADMIN_TOKEN_FILE: '/etc/admin-token' },
  ]) {
    assert.throws(() => new MockSidecar(makeSettings({ useMock: true }), { ...env, ...admin }), /CORESDK_ADMIN_TOKEN/);
  }
});
