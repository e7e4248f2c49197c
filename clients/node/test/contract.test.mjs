// The language-neutral contract suite (tests/contract/scenarios.json; the format and the runner
// semantics are in tests/contract/README.md), played against the real sidecar (through
// SidecarClient) and against the in-process mock, through the public client API: the mock passes
// exactly what the sidecar passes. The audit chain is checked by this runner itself, with its own
// RFC 8785 encoder (below, from the RFC's rules), not by the implementations' code.

import assert from 'node:assert/strict';
import { createHash, createHmac, randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { describe, test } from 'node:test';

import { ROOT, Sidecar } from '../../../tests/openfeature-node/sidecar.mjs';
import { MOCK_TENANTS, MockSidecar, ProblemError, makeSettings } from '../dist/index.js';
import { clientFor } from './helpers.mjs';

const SUITE = JSON.parse(readFileSync(join(ROOT, 'tests', 'contract', 'scenarios.json'), 'utf8'));
const DOMAIN_TAG = Buffer.from('coresdk.audit.v1\0', 'latin1');
const RFC3339_MS = /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$/;
// Only a hang guard for records the sidecar writes off the request path.
const POLL_GUARD_MS = 10_000;

// -- RFC 8785 (JCS), written from the RFC, independent of the `canonicalize` package ------------

/** §3.2.2.2: `"`, `\` and the controls escaped (the short forms where JSON has them), the rest as is. */
function jcsString(text) {
  const SHORT = { 0x08: '\\b', 0x09: '\\t', 0x0a: '\\n', 0x0c: '\\f', 0x0d: '\\r', 0x22: '\\"', 0x5c: '\\\\' };
  let out = '"';
  for (let i = 0; i < text.length; i += 1) {
    const unit = text.charCodeAt(i);
    if (unit >= 0xd800 && unit <= 0xdfff) {
      const pair = unit <= 0xdbff && i + 1 < text.length && text.charCodeAt(i + 1) >= 0xdc00 && text.charCodeAt(i + 1) <= 0xdfff;
      if (!pair) throw new Error('RFC 8785: a lone surrogate has no UTF-8 form');
      out += text[i] + text[i + 1];
      i += 1;
    } else if (SHORT[unit] !== undefined) out += SHORT[unit];
    else if (unit < 0x20) out += `\\u${unit.toString(16).padStart(4, '0')}`;
    else out += text[i];
  }
  return `${out}"`;
}

/** §3.2.2.3: numbers as ECMAScript's Number.prototype.toString writes them (-0 as 0). */
function jcsNumber(n) {
  if (!Number.isFinite(n)) throw new Error('RFC 8785: no NaN or Infinity');
  return Object.is(n, -0) ? '0' : n.toString();
}

/** §3.2.3: object members sorted by the UTF-16 code units of their names. */
function byCodeUnits(a, b) {
  for (let i = 0; i < Math.min(a.length, b.length); i += 1) {
    const d = a.charCodeAt(i) - b.charCodeAt(i);
    if (d !== 0) return d;
  }
  return a.length - b.length;
}

function jcs(value) {
  if (value === null) return 'null';
  if (value === true) return 'true';
  if (value === false) return 'false';
  if (typeof value === 'number') return jcsNumber(value);
  if (typeof value === 'string') return jcsString(value);
  if (Array.isArray(value)) return `[${value.map(jcs).join(',')}]`;
  if (typeof value === 'object') {
    const keys = Object.keys(value).sort(byCodeUnits);
    return `{${keys.map((k) => `${jcsString(k)}:${jcs(value[k])}`).join(',')}}`;
  }
  throw new Error(`RFC 8785: ${typeof value} is not JSON`);
}

// -- the implementations ---------------------------------------------------------------------

function settingsFor(env, overrides = {}) {
  return {
    adminToken: env.CORESDK_ADMIN_TOKEN,
    problemTypeBase: env.CORESDK_PROBLEM_TYPE_BASE,
    timeoutMs: 5_000,
    ...overrides,
  };
}

/** A fresh implementation with a scenario's environment: `{ sdk, close }`. */
const IMPLEMENTATIONS = {
  sidecar: async (env) => {
    const sidecar = await Sidecar.start({ env });
    try {
      const sdk = await clientFor(sidecar, settingsFor(env));
      return {
        sdk,
        close: async () => {
          try {
            await sdk.close();
          } finally {
            await sidecar.close();
          }
        },
      };
    } catch (error) {
      await sidecar.close();
      throw error;
    }
  },
  mock: async (env) => {
    const sdk = new MockSidecar(makeSettings(settingsFor(env, { useMock: true })), env);
    return { sdk, close: () => sdk.close() };
  },
};

// -- one scenario against one implementation -------------------------------------------------

const isNumber = (value) => typeof value === 'number';
const isObject = (value) => typeof value === 'object' && value !== null && !Array.isArray(value);

class Run {
  constructor(scenario, env, sdk) {
    this.scenario = scenario;
    this.env = env;
    this.sdk = sdk;
    this.nonce = randomBytes(4).toString('hex');
    this.base = Math.floor(Date.now() / 1000);
    this.bodies = new Map();
    this.types = new Map();
    this.created = new Map();
    this.seqs = new Map();
    this.where = '';
  }

  async play() {
    for (const [n, step] of this.scenario.steps.entries()) {
      const [action] = Object.keys(step).filter((key) => key in STEP_FORMS);
      this.where = `${this.scenario.name} step ${n} (${action})`;
      await this[action](step[action], step.expect ?? {});
    }
  }

  // -- matching -------------------------------------------------------------------------------

  fail(what) {
    throw new assert.AssertionError({ message: `${this.where}: ${what}` });
  }

  show(value) {
    return JSON.stringify(value, (_, v) => (Buffer.isBuffer(v) ? `<${v.length} bytes>` : v));
  }

  match(expected, actual, path = '') {
    if (typeof expected === 'string' && expected.startsWith('$')) {
      const colon = expected.indexOf(':');
      const kind = colon < 0 ? expected.slice(1) : expected.slice(1, colon);
      const label = colon < 0 ? '' : expected.slice(colon + 1);
      if (expected.startsWith('$$')) expected = expected.slice(1);
      else if (kind === 'any') {
        if (actual === undefined) this.fail(`${path}: missing`);
        return;
      } else if (kind === 'number' || kind === 'string' || kind === 'bool') {
        const ok = { number: isNumber(actual), string: typeof actual === 'string', bool: typeof actual === 'boolean' }[kind];
        if (!ok) this.fail(`${path}: ${this.show(actual)} is not a ${kind}`);
        return;
      } else if (kind === 'event_id') expected = this.eventId(label);
      else if (kind === 'created') expected = this.created.get(label);
      else if (kind === 'seq') expected = this.seqs.get(label);
      else this.fail(`${path}: unknown matcher ${expected}`);
    }
    if (Array.isArray(expected)) {
      if (!Array.isArray(actual) || actual.length !== expected.length) {
        this.fail(`${path}: expected ${this.show(expected)}, got ${this.show(actual)}`);
      }
      expected.forEach((e, n) => this.match(e, actual[n], `${path}[${n}]`));
      return;
    }
    if (isObject(expected)) {
      const same = isObject(actual) && Object.keys(actual).sort().join('\0') === Object.keys(expected).sort().join('\0');
      if (!same) this.fail(`${path}: expected keys ${this.show(Object.keys(expected).sort())}, got ${this.show(actual)}`);
      for (const key of Object.keys(expected)) this.match(expected[key], actual[key], `${path}.${key}`);
      return;
    }
    // null, booleans, strings and numbers (by value) compare exactly.
    if (actual !== expected) this.fail(`${path}: expected ${this.show(expected)}, got ${this.show(actual)}`);
  }

  checkProblem(expected, problem, path = 'problem') {
    if (problem === null || problem === undefined) this.fail(`expected a problem ${this.show(expected)}, got none`);
    for (const [key, want] of Object.entries(expected)) {
      if (key === 'status') this.match(want, problem.status, `${path}.status`);
      else if (key === 'reason') this.match(want, problem.reason, `${path}.reason`);
      else if (key === 'type') {
        this.match(`${this.env.CORESDK_PROBLEM_TYPE_BASE.replace(/\/+$/, '')}/${want}`, problem.type, `${path}.type`);
      } else if (key === 'title') this.match(want, problem.title, `${path}.title`);
      // RFC 9457: an absent `instance` is the empty one (the client leaves it out).
      else if (key === 'instance') this.match(want, problem.instance ?? '', `${path}.instance`);
      else if (key === 'detail_contains') {
        if (!(problem.detail ?? '').includes(want)) this.fail(`${path}.detail ${this.show(problem.detail)} does not contain ${this.show(want)}`);
      } else if (key === 'extensions') {
        for (const [name, value] of Object.entries(want)) {
          if (!(name in problem)) this.fail(`${path} lacks the extension ${name}: ${this.show(problem)}`);
          this.match(value, problem[name], `${path}.${name}`);
        }
      } else this.fail(`unknown problem field ${key}`);
    }
  }

  /** Runs the step's call: it must fail with the expected problem, or succeed. */
  async call(expect, call) {
    let answer;
    try {
      answer = await call();
    } catch (error) {
      if (!(error instanceof ProblemError)) throw error;
      if (!('problem' in expect)) this.fail(`unexpected problem ${this.show(error.problem)}`);
      this.checkProblem(expect.problem, error.problem);
      return undefined;
    }
    if ('problem' in expect) this.fail(`expected the problem ${this.show(expect.problem)}, got the answer ${this.show(answer)}`);
    return answer;
  }

  fields(expect, actual) {
    for (const [key, want] of Object.entries(expect)) {
      if (!(key in actual)) this.fail(`unknown expectation ${key}`);
      this.match(want, actual[key], key);
    }
  }

  // -- webhooks -------------------------------------------------------------------------------

  eventId(label) {
    return `evt_${this.nonce}_${label}`;
  }

  /** The delivery's bytes, event id and type. */
  body(spec) {
    if ('redeliver' in spec) {
      const label = spec.redeliver;
      // A raw body has no event id or type to check (its type is remembered as '').
      const type = this.types.get(label);
      return [this.bodies.get(label), type ? this.eventId(label) : '', type];
    }
    const label = spec.event;
    const raw = spec.raw_body;
    if (raw !== undefined && raw !== null) {
      const text = typeof raw === 'string' ? raw : raw.repeat.repeat(raw.times);
      const body = Buffer.from(text, 'utf8');
      this.bodies.set(label, body);
      this.types.set(label, '');
      return [body, '', ''];
    }
    const object = {};
    if (spec.customer !== undefined && spec.customer !== null) object.customer = spec.customer;
    Object.assign(object, spec.object ?? {});
    const data = { object };
    if ('previous_attributes' in spec) data.previous_attributes = spec.previous_attributes;
    const event = {
      id: this.eventId(label),
      object: 'event',
      created: this.base + (spec.created ?? 0),
      data,
      livemode: false,
      type: spec.type,
    };
    Object.assign(event, spec.event_fields ?? {});
    for (const key of spec.drop ?? []) delete event[key];
    const body = Buffer.from(JSON.stringify(event), 'utf8');
    this.bodies.set(label, body);
    this.types.set(label, spec.type);
    this.created.set(label, event.created ?? null);
    return [body, this.eventId(label), spec.type];
  }

  header(body, how) {
    if (how === 'missing') return '';
    if (isObject(how) && 'header' in how) return how.header;
    let secret = this.env.STRIPE_WEBHOOK_SECRET.split(',')[0].trim();
    let offset = 0;
    if (how === 'forged') secret = SUITE.forged_secret;
    else if (isObject(how)) {
      secret = how.secret ?? secret;
      offset = how.t_offset ?? 0;
    } else if (how !== 'valid') this.fail(`unknown signature ${this.show(how)}`);
    const t = Math.floor(Date.now() / 1000) + offset;
    const mac = createHmac('sha256', secret).update(`${t}.`).update(body).digest('hex');
    const extra = isObject(how) ? how.extra : undefined;
    return extra ? `t=${t},${extra},v1=${mac}` : `t=${t},v1=${mac}`;
  }

  async webhook(spec, expect) {
    const [body, eventId, eventType] = this.body(spec);
    const header = this.header(body, spec.signature ?? 'valid');
    await this.answered(spec, expect, eventId, eventType, () => this.sdk.handleStripeWebhook(body, header));
  }

  async replay(spec, expect) {
    const [body, eventId, eventType] = this.body(spec);
    await this.answered(spec, expect, eventId, eventType, () => this.sdk.replayEvent(body, { reason: spec.reason ?? '' }));
  }

  async answered(spec, expect, eventId, eventType, call) {
    const result = await this.call(expect, call);
    if (result === undefined) return;
    if ('event' in spec) this.seqs.set(spec.event, result.auditSeq);
    if (eventId !== '') {
      this.match(eventId, result.eventId, 'event_id');
      this.match(eventType, result.eventType, 'event_type');
    }
    const actual = {
      outcome: result.outcome,
      tenant: result.tenantId,
      changes: Object.fromEntries(result.flagChanges.map((c) => [c.key, c.newValue])),
    };
    const old = new Map(result.flagChanges.map((c) => [c.key, c.oldValue]));
    for (const [key, want] of Object.entries(expect)) {
      if (key === 'old') {
        for (const [flag, value] of Object.entries(want)) {
          if (!old.has(flag)) this.fail(`old: no change of ${flag} in ${this.show(result.flagChanges)}`);
          this.match(value, old.get(flag), `old.${flag}`);
        }
      } else if (key === 'stale_flags') this.match([...want].sort(), [...result.staleFlags].sort(), 'stale_flags');
      else if (key in actual) this.match(want, actual[key], key);
      else this.fail(`unknown expectation ${key}`);
    }
  }

  // -- flags ----------------------------------------------------------------------------------

  flagFields(flag) {
    return { value: flag.value, is_default: flag.isDefault, updated_by: flag.updatedBy };
  }

  async get_flag(spec, expect) {
    const flag = await this.call(expect, () => this.sdk.getFlag(spec.tenant, spec.key));
    if (flag !== undefined) this.fields(expect, this.flagFields(flag));
  }

  async get_flags(spec, expect) {
    const flags = await this.call(expect, () => this.sdk.getFlags(spec.tenant));
    if (flags === undefined) return;
    const values = Object.fromEntries(Object.entries(flags).map(([key, flag]) => [key, flag.value]));
    const defaults = Object.entries(flags)
      .filter(([, flag]) => flag.isDefault)
      .map(([key]) => key)
      .sort();
    const sorted = Object.fromEntries(Object.entries(expect).map(([k, v]) => [k, k === 'defaults' ? [...v].sort() : v]));
    this.fields(sorted, { values, defaults });
  }

  flagEvent(event) {
    if (event === null || event === undefined) return null;
    const { eventId, eventType, created, auditSeq, actor, reason } = event;
    return { event_id: eventId, event_type: eventType, created, audit_seq: auditSeq, actor, reason };
  }

  async explain_flag(spec, expect) {
    const why = await this.call(expect, () => this.sdk.explainFlag(spec.tenant, spec.key));
    if (why === undefined) return;
    const admin =
      why.admin === null
        ? null
        : { actor: why.admin.actor, reason: why.admin.reason, version: why.admin.version, audit_seq: why.admin.auditSeq };
    this.fields(expect, {
      value: why.flag.value,
      is_default: why.flag.isDefault,
      set_by: why.event !== null ? 'event' : why.admin !== null ? 'admin' : 'default',
      event: this.flagEvent(why.event),
      admin,
      rule: why.rule,
      stale_events: why.staleEvents.map((e) => this.flagEvent(e)),
      newest_event: this.flagEvent(why.newestEvent),
    });
  }

  async is_enabled(spec, expect) {
    const enabled = await this.call(expect, () => this.sdk.isEnabled(spec.tenant, spec.key));
    if (!('problem' in expect)) this.fields(expect, { value: enabled });
  }

  async set_flag(spec, expect) {
    const flag = await this.call(expect, () =>
      this.sdk.setFlag(spec.tenant, spec.key, spec.value, { actor: spec.actor ?? '', reason: spec.reason ?? '' }),
    );
    if (flag !== undefined) this.fields(expect, this.flagFields(flag));
  }

  // -- tenants --------------------------------------------------------------------------------

  async map_customer(spec, expect) {
    const applied = await this.call(expect, () =>
      this.sdk.mapCustomer(spec.customer, spec.tenant, { actor: spec.actor ?? '', reason: spec.reason ?? '' }),
    );
    if (applied !== undefined) this.fields(expect, { parked_events_applied: applied });
  }

  async resolve_customer(spec, expect) {
    const tenant = await this.call(expect, () => this.sdk.resolveCustomer(spec.customer));
    if (!('problem' in expect)) this.fields(expect, { tenant });
  }

  // -- access ---------------------------------------------------------------------------------

  token(spec) {
    if (typeof spec === 'string') return spec;
    const claims = { ...(spec.claims ?? {}) };
    const expIn = 'exp_in' in spec ? spec.exp_in : 600;
    if (expIn !== null) claims.exp = Math.floor(Date.now() / 1000) + expIn;
    if ('nbf_in' in spec) claims.nbf = Math.floor(Date.now() / 1000) + spec.nbf_in;
    const secret = spec.secret ?? this.env.CORESDK_JWT_SECRET.split(',')[0].trim();
    const alg = spec.alg ?? 'HS256';
    const digest = { HS256: 'sha256', HS384: 'sha384', HS512: 'sha512' }[alg];
    const part = (object) => Buffer.from(JSON.stringify(object), 'utf8').toString('base64url');
    const signingInput = `${part({ alg, typ: 'JWT' })}.${part(claims)}`;
    if (alg === 'none') return `${signingInput}.`;
    return `${signingInput}.${createHmac(digest, secret).update(signingInput).digest('base64url')}`;
  }

  async authorize(spec, expect) {
    const token = 'token' in spec ? this.token(spec.token) : undefined;
    const callExpect = 'error' in expect ? { problem: expect.error } : {};
    const decision = await this.call(callExpect, () =>
      this.sdk.authorize({
        token,
        tenantId: spec.tenant,
        require: spec.require ?? [],
        denyIf: spec.deny_if ?? [],
        resource: spec.resource ?? '',
      }),
    );
    if (decision === undefined) return;
    for (const [key, want] of Object.entries(expect)) {
      if (key === 'problem') this.checkProblem(want, decision.problem);
      else if (key === 'allowed' || key === 'tenant' || key === 'subject') {
        const actual = { allowed: decision.allowed, tenant: decision.tenantId, subject: decision.subject }[key];
        this.match(want, actual, key);
      } else this.fail(`unknown expectation ${key}`);
    }
    if (decision.allowed && decision.problem !== null) this.fail(`allowed, with a problem ${this.show(decision.problem)}`);
  }

  async verify_token(spec, expect) {
    const claims = await this.call(expect, () => this.sdk.verifyToken(this.token(spec.token)));
    if (claims !== undefined) this.fields(expect, { subject: claims.subject, tenant: claims.tenantId });
  }

  // -- audit ----------------------------------------------------------------------------------

  record(expected, record, path) {
    const actual = {
      tenant: record.tenantId,
      actor: record.actor,
      event: record.event,
      outcome: record.outcome,
      metadata: record.metadata,
    };
    for (const [key, want] of Object.entries(expected)) {
      if (!(key in actual)) this.fail(`${path}: unknown record field ${key}`);
      this.match(want, actual[key], `${path}.${key}`);
    }
  }

  async audit(spec, expect) {
    const record = await this.call(expect, () =>
      this.sdk.audit({
        event: spec.event,
        outcome: spec.outcome ?? '',
        actor: spec.actor ?? '',
        tenantId: spec.tenant ?? '',
        metadata: spec.metadata ?? undefined,
      }),
    );
    if (record !== undefined && 'record' in expect) this.record(expect.record, record, 'record');
  }

  async audit_query(spec, expect) {
    const query = () =>
      this.sdk.auditQuery({ tenantId: spec.tenant ?? '', eventPrefix: spec.event_prefix ?? '', outcome: spec.outcome ?? '' });
    if ('problem' in expect) {
      await this.call(expect, query);
      return;
    }
    const wanted = expect.records;
    const deadline = Date.now() + POLL_GUARD_MS;
    let records;
    for (;;) {
      records = await query();
      if (records.length >= wanted.length || Date.now() > deadline) break;
      await sleep(50);
    }
    if (records.length !== wanted.length) {
      this.fail(`expected ${wanted.length} records, got ${this.show(records.map((r) => [r.event, r.outcome, r.metadata]))}`);
    }
    wanted.forEach((want, n) => this.record(want, records[n], `records[${n}]`));
  }

  async verify_chain(spec, expect) {
    assert.deepEqual(expect, { ok: true }, 'verify_chain expects {"ok": true}');
    const records = await this.sdk.auditQuery({ limit: 1_000_000 });
    let prev = '0'.repeat(64);
    for (const [n, r] of records.entries()) {
      const where = `record ${r.seq}`;
      if (r.seq !== n + 1) this.fail(`${where}: expected seq ${n + 1}`);
      if (r.prevHash !== prev) this.fail(`${where}: prev_hash ${r.prevHash} is not the previous hash ${prev}`);
      if (!RFC3339_MS.test(r.time)) this.fail(`${where}: time ${r.time} is not RFC 3339 with milliseconds`);
      const canonical = jcs({
        v: 1,
        seq: r.seq,
        time: r.time,
        tenant: r.tenantId,
        actor: r.actor,
        event: r.event,
        outcome: r.outcome,
        metadata: r.metadata,
      });
      if (!Buffer.from(canonical, 'utf8').equals(r.canonical)) {
        this.fail(`${where}: canonical ${r.canonical.toString('utf8')} is not RFC 8785 of the record: ${canonical}`);
      }
      const digest = createHash('sha256').update(DOMAIN_TAG).update(Buffer.from(prev, 'hex')).update(r.canonical).digest('hex');
      if (r.hash !== digest) this.fail(`${where}: hash ${r.hash} is not ${digest}`);
      prev = r.hash;
    }
    // Full: by default the sidecar checks only the records since its newest checkpoint.
    const verdict = await this.sdk.auditVerify({ full: true });
    if (!verdict.ok || verdict.recordsChecked < records.length) {
      this.fail(`auditVerify: ${this.show(verdict)} after ${records.length} records`);
    }
  }

  async wait(seconds) {
    await sleep(seconds * 1000);
  }
}

// -- the format: every object's keys (tests/contract/README.md; unknown keys are an error) ------

const PROBLEM_KEYS = ['status', 'reason', 'type', 'title', 'instance', 'detail_contains', 'extensions'];
const RECORD_KEYS = ['tenant', 'actor', 'event', 'outcome', 'metadata'];
const FLAG_EVENT_KEYS = ['event_id', 'event_type', 'created', 'audit_seq', 'actor', 'reason'];
const BODY_KEYS = ['event', 'type', 'customer', 'object', 'previous_attributes', 'created', 'event_fields', 'drop', 'redeliver', 'raw_body'];
const WEBHOOK_EXPECT = ['outcome', 'tenant', 'changes', 'old', 'stale_flags', 'problem'];
/** Per action: the keys of its spec and of its `expect` (`problem` included where the README allows it). */
const STEP_FORMS = {
  webhook: { spec: [...BODY_KEYS, 'signature'], expect: WEBHOOK_EXPECT },
  replay: { spec: [...BODY_KEYS, 'reason'], expect: WEBHOOK_EXPECT },
  get_flag: { spec: ['tenant', 'key'], expect: ['value', 'is_default', 'updated_by', 'problem'] },
  get_flags: { spec: ['tenant'], expect: ['values', 'defaults', 'problem'] },
  is_enabled: { spec: ['tenant', 'key'], expect: ['value', 'problem'] },
  set_flag: { spec: ['tenant', 'key', 'value', 'actor', 'reason'], expect: ['value', 'is_default', 'updated_by', 'problem'] },
  explain_flag: {
    spec: ['tenant', 'key'],
    expect: ['value', 'is_default', 'set_by', 'event', 'newest_event', 'admin', 'rule', 'stale_events', 'problem'],
  },
  map_customer: { spec: ['customer', 'tenant', 'actor', 'reason'], expect: ['parked_events_applied', 'problem'] },
  resolve_customer: { spec: ['customer'], expect: ['tenant', 'problem'] },
  authorize: { spec: ['token', 'tenant', 'require', 'deny_if', 'resource'], expect: ['allowed', 'tenant', 'subject', 'problem', 'error'] },
  verify_token: { spec: ['token'], expect: ['subject', 'tenant', 'problem'] },
  audit: { spec: ['event', 'outcome', 'actor', 'tenant', 'metadata'], expect: ['record', 'problem'] },
  audit_query: { spec: ['tenant', 'event_prefix', 'outcome'], expect: ['records', 'problem'] },
  verify_chain: { spec: [], expect: ['ok'] },
  wait: { spec: null, expect: [] },
};

/**
 * Every defect of the file's form, as `path: what`: a key no object of its kind has (a typo
 * such as `custmer` would otherwise be ignored and the step test less than it says), or an
 * object where the format wants another kind of value. Values compared as given (flag values,
 * claims, metadata, `object`, `event_fields`, extensions) are free-form.
 */
function formDefects(suite) {
  const defects = [];
  const keys = (value, allowed, path) => {
    if (!isObject(value)) {
      defects.push(`${path}: expected an object, got ${JSON.stringify(value)}`);
      return false;
    }
    for (const key of Object.keys(value)) if (!allowed.includes(key)) defects.push(`${path}: unknown key ${JSON.stringify(key)}`);
    return true;
  };
  const problem = (value, path) => keys(value, PROBLEM_KEYS, path);
  const record = (value, path) => keys(value, RECORD_KEYS, path);
  const flagEvent = (value, path) => {
    if (value !== null && keys(value, FLAG_EVENT_KEYS, path)) {
      const missing = FLAG_EVENT_KEYS.filter((key) => !(key in value));
      if (missing.length > 0) defects.push(`${path}: a FLAG_EVENT has all six fields; missing ${missing.join(', ')}`);
    }
  };
  const token = (value, path) => {
    if (typeof value !== 'string') keys(value, ['claims', 'exp_in', 'nbf_in', 'secret', 'alg'], path);
  };
  const body = (spec, path) => {
    if (isObject(spec.raw_body) && keys(spec.raw_body, ['repeat', 'times'], `${path}.raw_body`)) {
      if (!('repeat' in spec.raw_body && 'times' in spec.raw_body)) defects.push(`${path}.raw_body: needs \`repeat\` and \`times\``);
    }
    if (!('event' in spec) && !('redeliver' in spec)) defects.push(`${path}: needs \`event\` (or \`redeliver\`)`);
  };
  keys(suite, ['format', 'env', 'tenants', 'forged_secret', 'scenarios'], 'file');
  for (const [n, scenario] of (suite.scenarios ?? []).entries()) {
    const where = `scenarios[${n}] (${scenario?.name})`;
    if (!keys(scenario, ['name', 'about', 'env', 'steps'], where)) continue;
    for (const [m, step] of (scenario.steps ?? []).entries()) {
      const at = `${where} step ${m}`;
      if (!isObject(step)) {
        defects.push(`${at}: expected an object`);
        continue;
      }
      const actions = Object.keys(step).filter((key) => key in STEP_FORMS);
      if (actions.length !== 1) {
        defects.push(`${at}: ${actions.length} action keys (${actions.join(', ')}); a step has exactly one`);
        continue;
      }
      const [action] = actions;
      keys(step, [action, 'expect', 'about'], at);
      const form = STEP_FORMS[action];
      const spec = step[action];
      if (form.spec !== null && keys(spec, form.spec, `${at}.${action}`)) {
        if (action === 'webhook' || action === 'replay') body(spec, `${at}.${action}`);
        if (action === 'webhook' && isObject(spec.signature)) {
          const header = 'header' in spec.signature;
          keys(spec.signature, header ? ['header'] : ['t_offset', 'secret', 'extra'], `${at}.webhook.signature`);
        }
        if ('token' in spec) token(spec.token, `${at}.${action}.token`);
      }
      if (!('expect' in step)) continue;
      const expect = step.expect;
      if (!keys(expect, form.expect, `${at}.expect`)) continue;
      if ('problem' in expect && Object.keys(expect).length > 1 && action !== 'authorize') {
        defects.push(`${at}.expect: an answer or a problem, never both`);
      }
      if ('problem' in expect) problem(expect.problem, `${at}.expect.problem`);
      if ('error' in expect) problem(expect.error, `${at}.expect.error`);
      if ('record' in expect) record(expect.record, `${at}.expect.record`);
      if (Array.isArray(expect.records)) expect.records.forEach((r, k) => record(r, `${at}.expect.records[${k}]`));
      else if ('records' in expect) defects.push(`${at}.expect.records: expected a list`);
      for (const key of ['event', 'newest_event']) if (action === 'explain_flag' && key in expect) flagEvent(expect[key], `${at}.expect.${key}`);
      if (action === 'explain_flag' && Array.isArray(expect.stale_events)) {
        expect.stale_events.forEach((e, k) => flagEvent(e, `${at}.expect.stale_events[${k}]`));
      }
      if (action === 'explain_flag' && isObject(expect.admin)) keys(expect.admin, ['actor', 'reason', 'version', 'audit_seq'], `${at}.expect.admin`);
    }
  }
  return defects;
}

test('the contract suite is well formed', () => {
  assert.deepEqual(Object.keys(SUITE).sort(), ['env', 'forged_secret', 'format', 'scenarios', 'tenants']);
  assert.deepEqual(formDefects(SUITE), []);
  assert.equal(SUITE.format, 1);
  const tenants = JSON.parse(readFileSync(join(ROOT, 'examples', 'tenants.json'), 'utf8'));
  assert.deepEqual(SUITE.tenants, tenants);
  assert.deepEqual(SUITE.tenants, { ...MOCK_TENANTS });
  const names = SUITE.scenarios.map((s) => s.name);
  assert.equal(new Set(names).size, names.length, 'scenario names must be unique');
  for (const scenario of SUITE.scenarios) {
    const labels = scenario.steps.flatMap((step) =>
      ['webhook', 'replay'].filter((action) => action in step && 'event' in step[action]).map((action) => step[action].event),
    );
    assert.equal(new Set(labels).size, labels.length, `${scenario.name}: event labels must be unique`);
  }
});

test('the format check finds an unknown key in every kind of object', () => {
  const scenario = (steps, extra = {}) => ({ format: 1, scenarios: [{ name: 's', steps, ...extra }] });
  const flagEvent = { event_id: 'x', event_type: 't', created: 1, audit_seq: 1, actor: 'a', reason: 'r' };
  const typos = [
    { ...scenario([]), formats: 1 },
    scenario([], { step: [] }),
    scenario([{ webhook: { event: 'e', type: 't', custmer: 'cus_acme_001' } }]),
    scenario([{ webhook: { event: 'e', type: 't' }, expect: { outcome: 'applied', tennant: 'acme-corp' } }]),
    scenario([{ webhook: { event: 'e', type: 't', signature: { t_ofset: 5 } } }]),
    scenario([{ webhook: { event: 'e', type: 't', signature: { header: 'x', secret: 's' } } }]),
    scenario([{ webhook: { event: 'e', raw_body: { repeat: 'x', times: 3, time: 3 } } }]),
    scenario([{ webhook: { event: 'e', raw_body: { repeat: 'x' } } }]),
    scenario([{ replay: { event: 'e', type: 't', signature: 'valid', reason: 'r' } }]),
    scenario([{ get_flag: { tenant: 't', key: 'k' }, expect: { problem: { status: 400, detail: 'x' } } }]),
    scenario([{ authorize: { token: { claims: {}, exp: 5 } } }]),
    scenario([{ authorize: { tenant: 't' }, expect: { allowed: false, problem: { reasons: 'X' } } }]),
    scenario([{ authorize: { tenant: 't' }, expect: { error: { staus: 400 } } }]),
    scenario([{ audit: { event: 'e', outcome: 'o', actor: 'a' }, expect: { record: { tenant_id: '' } } }]),
    scenario([{ audit_query: {}, expect: { records: [{ event: 'e', outcom: 'o' }] } }]),
    scenario([{ explain_flag: { tenant: 't', key: 'k' }, expect: { event: { ...flagEvent, seq: 1 } } }]),
    scenario([{ explain_flag: { tenant: 't', key: 'k' }, expect: { stale_events: [{ event_id: 'x' }] } }]),
    scenario([{ explain_flag: { tenant: 't', key: 'k' }, expect: { admin: { actor: 'a', audit: 1 } } }]),
    scenario([{ verify_chain: {}, expect: { ok: true, all: true } }]),
    scenario([{ wait: 1, get_flags: { tenant: 't' } }]),
    scenario([{ get_flags: { tenant: 't' }, expected: {} }]),
    scenario([{ set_flag: { tenant: 't', key: 'k', value: 1 }, expect: { value: 1, problem: { status: 400 } } }]),
  ];
  for (const suite of typos) assert.equal(formDefects(suite).length, 1, `${JSON.stringify(suite)}: ${formDefects(suite).join('; ')}`);
  const fine = scenario([
    { webhook: { event: 'e', type: 't', signature: { header: 'x' } }, expect: { outcome: 'applied' }, about: 'a step' },
    { explain_flag: { tenant: 't', key: 'k' }, expect: { event: flagEvent, newest_event: null, stale_events: [flagEvent], admin: null } },
    { wait: 1 },
  ]);
  assert.deepEqual(formDefects(fine), []);
});

test('the runner\'s RFC 8785 encoder writes the RFC\'s own example', () => {
  // RFC 8785 §3.2.4 (sorting) and §3.2.2 (numbers, escapes).
  const input = {
    numbers: [333333333.33333329, 1e30, 4.5, 2e-3, 0.000000000000000000000000001],
    string: '€$\u000f\nA\'B"\\\\"/',
    literals: [null, true, false],
  };
  assert.equal(
    jcs(input),
    '{"literals":[null,true,false],"numbers":[333333333.3333333,1e+30,4.5,0.002,1e-27],"string":"€$\\u000f\\nA\'B\\"\\\\\\\\\\"/"}',
  );
  // §3.2.3: sorted by UTF-16 code units, so U+1F600 (a surrogate pair) sorts before U+FB33.
  const names = {
    '\u20ac': 'Euro Sign',
    '\r': 'Carriage Return',
    '\ufb33': 'Hebrew Letter Dalet With Dagesh',
    1: 'One',
    '\ud83d\ude00': 'Emoji: Grinning Face',
    '\u0080': 'Control',
    '\u00f6': 'Latin Small Letter O With Diaeresis',
  };
  assert.equal(
    jcs(names),
    '{"\\r":"Carriage Return","1":"One","\u0080":"Control","\u00f6":"Latin Small Letter O With Diaeresis",' +
      '"\u20ac":"Euro Sign","\ud83d\ude00":"Emoji: Grinning Face","\ufb33":"Hebrew Letter Dalet With Dagesh"}',
  );
});

for (const [name, start] of Object.entries(IMPLEMENTATIONS)) {
  describe(`contract suite: ${name}`, () => {
    for (const scenario of SUITE.scenarios) {
      test(scenario.name, async () => {
        assert.deepEqual(formDefects({ scenarios: [scenario] }), [], 'the scenario is not of the format');
        // `{root}` in a value stands for the repository root's absolute path (the README's `env`).
        const env = Object.fromEntries(
          Object.entries({ ...SUITE.env, ...(scenario.env ?? {}) }).map(([key, value]) => [key, value.replaceAll('{root}', ROOT)]),
        );
        const world = await start(env);
        try {
          await new Run(scenario, env, world.sdk).play();
        } finally {
          await world.close();
        }
      });
    }
  });
}
