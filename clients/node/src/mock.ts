// The in-process mock (`CORESDK_USE_MOCK=true`): the sidecar's behaviour without a sidecar, for
// local development and tests. It is a second implementation of the sidecar, so it follows the
// Rust code (src/ops, src/stripe, src/auth, src/audit.rs, src/coalesce.rs, src/rules.rs) point
// by point and reuses the sidecar's own artefacts where it can: the rules file
// (`rules/default.toml`), RFC 8785 canonical JSON for the audit chain (the `canonicalize`
// package), and the same problem types, reasons and details. The contract suite
// (tests/contract) runs the same scenarios against both.
//
// Differences by design: state lives in memory only, bounded (see the MAX_* constants); tokens
// are verified for HS256/384/512 (`CORESDK_JWT_SECRET`) only; coalesced audit records are written
// when their window is next looked at rather than by a background task.
//
// The audit records form the sidecar's RFC 6962 Merkle tree, with its inclusion and consistency
// proofs and their errors. Checkpoints differ: the mock runs no background task, so it signs one
// for the current tree whenever one is asked for (`auditCheckpoint`, tree size 0, `includeProof`)
// with an Ed25519 key made per mock (`auditVerifierKey`); as the sidecar, none of the empty log
// (CHECKPOINT_NOT_FOUND). Its origin and key name are
// `coresdk.mock/<random hex>`: each mock is a log of its own.

import {
  createHash,
  createHmac,
  createPublicKey as createPublicKeyFrom,
  generateKeyPairSync,
  randomBytes,
  sign as signEd25519,
  timingSafeEqual,
  type KeyObject,
} from 'node:crypto';
import { existsSync, readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

import canonicalize from 'canonicalize';
import { parse as parseToml, TomlDate, TomlError } from 'smol-toml';

import { settingsFromEnv, type Settings } from './config.js';
import { FlagNotFoundError, GrpcCode, ProblemError, problemTypeUri } from './errors.js';
import { webhookPayload } from './http.js';
import {
  MAX_FLAG_KEY_LENGTH,
  MAX_RESOURCE_BYTES,
  asciiLowercase,
  checkFlagKey,
  checkFlagList,
  checkId,
  idDefect,
  invalidProblem,
  isValidFlagKey,
  quoted,
  trimStartWhiteSpace,
  trimWhiteSpace,
} from './validation.js';
import { EMPTY_ROOT, VerifierKey, keyId, leafHash, nodeHash } from './transparency.js';
import { asJson } from './wire.js';
import type {
  AdminFlagChange,
  AuditOptions,
  AuditQuery,
  AuditRecord,
  AuthorizeOptions,
  ChangeOptions,
  Claims,
  ConsistencyProof,
  CoreSDKClient,
  Decision,
  Flag,
  FlagChange,
  FlagEvent,
  FlagExplanation,
  FlagValue,
  InclusionProof,
  JsonValue,
  Problem,
  VerifyResult,
  WebhookOptions,
  WebhookOutcome,
  WebhookResult,
} from './types.js';

type Env = Readonly<Record<string, string | undefined>>;
type JsonObject = { [key: string]: JsonValue };

export const MOCK_WEBHOOK_SECRET = 'whsec_test_secret';
/** The largest CORESDK_WEBHOOK_MAX_BODY_BYTES the sidecar accepts (src/config.rs). */
const MAX_BODY_LIMIT = 64 * 1024 * 1024;
/** The largest CORESDK_MAX_PARKED_EVENTS(_PER_CUSTOMER) the sidecar accepts (src/config.rs). */
const MAX_PARKED_EVENTS_LIMIT = 10_000_000;
/** The sidecar's mock tenants (src/config.rs MOCK_TENANTS). */
export const MOCK_TENANTS: Readonly<Record<string, string>> = Object.freeze({
  cus_acme_001: 'acme-corp',
  cus_globex_001: 'globex',
  cus_initech_001: 'initech',
});

const WEBHOOK_ACTOR = 'stripe-webhook';
const REPLAY_ACTOR = 'replay';
const PARKING_ACTOR = 'parking';
const SEED_ACTOR = 'config';
const OVERFLOW_ACTOR = 'coresdk';
const MAX_REASON_LEN = 1024;
const MAX_ACTOR_LEN = 256;
const MAX_FIELD_LEN = 256;
const MAX_METADATA_BYTES = 4096;
const MAX_HEADER_LEN = 8 * 1024;
const MAX_EVENT_FIELD_LEN = 255;
const MAX_CREATED_AHEAD_S = 300;
const MAX_OBJECT_ID_LEN = 255;
const MAX_TOKEN_LEN = 16 * 1024;
const MAX_AUTH_FLAGS = 32;
const CLAIM_PREFIX_BYTES = 1024;
const STALE_SHOWN = 20;
const QUERY_SCAN_WINDOW = 10_000;
const PARKED_RETENTION_MS = 30 * 24 * 60 * 60 * 1000;
const EXPIRE_PER_PARKING = 16;
const MAX_RECORDS_PER_WINDOW = 1000;
/** The sidecar's audit writer reports what coalescing held back this often. */
const FLUSH_EVERY_MS = 1000;
const DOMAIN_TAG = Buffer.from('coresdk.audit.v1\0', 'latin1');
const GENESIS_HASH = '0'.repeat(64);
const RESERVED_NAMESPACES = ['billing', 'auth', 'flag', 'tenant', 'audit'];
const NO_SUBSCRIPTION_SETS_IT = 'catalog default (no subscription sets it)';

// The mock's own memory bounds (the sidecar's store is a database): the newest audit records
// and processed event ids are kept, the oldest dropped; flags and customer mappings beyond
// their bound are refused.
const MAX_AUDIT_RECORDS = 100_000;
const MAX_PROCESSED_EVENTS = 100_000;
const MAX_FLAGS = 100_000;
const MAX_CUSTOMERS = 100_000;
const MAX_BILLING_OBJECTS = 100_000;

export const SUBSCRIPTION_STATUSES = [
  'incomplete',
  'trialing',
  'active',
  'past_due',
  'unpaid',
  'paused',
  'canceled',
  'incomplete_expired',
] as const;
const SUBSCRIPTION_STATE_EVENTS = [
  'customer.subscription.created',
  'customer.subscription.updated',
  'customer.subscription.paused',
  'customer.subscription.resumed',
  'customer.subscription.deleted',
];

// ---------------------------------------------------------------------------------------------
// Problems, with the sidecar's types, titles, reasons and details (src/problem.rs).

interface ProblemShape {
  /** The gRPC status the sidecar answers it with. */
  code: number;
  slug: string;
  title: string;
  status: number;
  reason: string;
}

const shape = (code: number, status: number, slug: string, title: string, reason: string): ProblemShape => ({
  code,
  status,
  slug,
  title,
  reason,
});
const BAD_SIGNATURE = [GrpcCode.UNAUTHENTICATED, 400, 'invalid-signature', 'Invalid webhook signature'] as const;

/** The sidecar's mappings (src/problem.rs `Error::mapping`, `Denial::mapping`). */
const SHAPES = {
  signatureMissing: shape(...BAD_SIGNATURE, 'SIGNATURE_MISSING'),
  signatureMalformed: shape(...BAD_SIGNATURE, 'SIGNATURE_MALFORMED'),
  signatureTolerance: shape(...BAD_SIGNATURE, 'SIGNATURE_TIMESTAMP_OUT_OF_TOLERANCE'),
  signatureMismatch: shape(...BAD_SIGNATURE, 'SIGNATURE_MISMATCH'),
  payloadTooLarge: shape(GrpcCode.INVALID_ARGUMENT, 413, 'payload-too-large', 'Payload too large', 'PAYLOAD_TOO_LARGE'),
  invalidEvent: shape(GrpcCode.INVALID_ARGUMENT, 400, 'invalid-event', 'Not a Stripe event', 'INVALID_EVENT'),
  unknownCustomer: shape(GrpcCode.FAILED_PRECONDITION, 422, 'unknown-customer', 'Unknown customer', 'UNKNOWN_CUSTOMER'),
  invalid: shape(GrpcCode.INVALID_ARGUMENT, 400, 'invalid-request', 'Invalid request', 'INVALID_ARGUMENT'),
  flagNotFound: shape(GrpcCode.NOT_FOUND, 404, 'flag-not-found', 'Flag not found', 'FLAG_NOT_FOUND'),
  unauthenticated: shape(GrpcCode.UNAUTHENTICATED, 401, 'unauthenticated', 'Unauthenticated', 'UNAUTHENTICATED'),
  paymentRequired: shape(GrpcCode.PERMISSION_DENIED, 402, 'payment-required', 'Payment Required', 'PAYMENT_REQUIRED'),
  featureLocked: shape(GrpcCode.PERMISSION_DENIED, 403, 'feature-locked', 'Feature Unavailable', 'FEATURE_LOCKED'),
  wrongTenant: shape(GrpcCode.PERMISSION_DENIED, 403, 'wrong-tenant', 'Forbidden', 'WRONG_TENANT'),
  shuttingDown: shape(GrpcCode.UNAVAILABLE, 503, 'shutting-down', 'Shutting down', 'SHUTTING_DOWN'),
  outOfRange: shape(GrpcCode.OUT_OF_RANGE, 400, 'out-of-range', 'Out of range', 'OUT_OF_RANGE'),
  checkpointNotFound: shape(GrpcCode.NOT_FOUND, 404, 'checkpoint-not-found', 'Checkpoint not found', 'CHECKPOINT_NOT_FOUND'),
  // The mock's own: its memory bound (the sidecar's store is a database).
  full: shape(GrpcCode.RESOURCE_EXHAUSTED, 507, 'mock-capacity', 'Mock capacity reached', 'MOCK_CAPACITY'),
};

/** A domain error before it becomes a problem: its shape and its message (the problem's detail). */
class Refusal {
  constructor(
    readonly shape: ProblemShape,
    readonly message: string,
  ) {}
}

const refuse = {
  signatureMissing: () => new Refusal(SHAPES.signatureMissing, 'the Stripe-Signature header is missing or empty'),
  signatureMalformed: (why: string) =>
    new Refusal(SHAPES.signatureMalformed, `the Stripe-Signature header is malformed: ${why}`),
  signatureNoV1: () => new Refusal(SHAPES.signatureMalformed, 'the Stripe-Signature header carries no v1 signature'),
  signatureTolerance: (skew: bigint, tolerance: number) =>
    new Refusal(
      SHAPES.signatureTolerance,
      `the signature timestamp is ${skew} s away from now, outside the ${tolerance} s tolerance (replay or clock skew)`,
    ),
  signatureMismatch: () => new Refusal(SHAPES.signatureMismatch, 'no v1 signature matches any configured webhook secret'),
  payloadTooLarge: (size: number, limit: number) =>
    new Refusal(SHAPES.payloadTooLarge, `the payload is ${size} bytes, over the ${limit}-byte limit`),
  notAnEvent: (why: string) => new Refusal(SHAPES.invalidEvent, `the verified payload is not a Stripe event: ${why}`),
  unknownCustomer: (customer: string) =>
    new Refusal(SHAPES.unknownCustomer, `no tenant is mapped for customer '${quoted(customer)}'`),
  noTenant: () =>
    new Refusal(
      SHAPES.unknownCustomer,
      'the event names no customer and no metadata.tenant_id, so no tenant can be resolved',
    ),
  invalid: (violations: readonly (readonly [string, string])[]) =>
    new Refusal(SHAPES.invalid, `invalid request: ${violations.map(([f, d]) => `${f}: ${d}`).join('; ')}`),
};

function utf8Length(text: string): number {
  return Buffer.byteLength(text, 'utf8');
}

// ---------------------------------------------------------------------------------------------
// Rules (src/rules.rs): the same checks and messages, so a file the sidecar refuses is refused.

/** A rules file the sidecar would refuse to start with; the message is the sidecar's. */
export class RulesError extends Error {
  override name = 'RulesError';
}

interface Setting {
  key: string;
  value: FlagValue;
  rule: string;
}

interface Rule {
  name: string;
  events: string[];
  status: string[];
  plans: string[];
  set: [string, FlagValue][];
  otherwise: [string, FlagValue][];
  entitlements: boolean;
}

export interface Rules {
  catalog: Map<string, FlagValue>;
  rules: Rule[];
}

type Effect =
  | { kind: 'ignored' }
  | { kind: 'set'; settings: Setting[] }
  | { kind: 'entitlements'; keys: string[]; rule: string };

const RULE_FIELDS = ['else', 'entitlements', 'events', 'name', 'plans', 'set', 'status'];

function isTable(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value) && !(value instanceof TomlDate);
}

/** A TOML date-time as the sidecar's TOML library writes it: no fraction of zeros, `T` and `Z`. */
function tomlDateText(date: TomlDate): string {
  return date
    .toISOString()
    .replace(/\.(\d+)/, (_, digits: string) => (/^0+$/.test(digits) ? '' : `.${digits.replace(/0+$/, '')}`))
    .replace(/z$/, 'Z');
}

function flagValueFromToml(value: unknown): FlagValue {
  if (typeof value === 'number' && !Number.isFinite(value)) {
    throw new RulesError('invalid rules: flag numbers must be finite');
  }
  return tomlToJson(value);
}

function tomlToJson(value: unknown): JsonValue {
  if (value instanceof TomlDate) return tomlDateText(value);
  if (Array.isArray(value)) return value.map(tomlToJson);
  if (isTable(value)) return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, tomlToJson(v)]));
  if (typeof value === 'bigint') return Number(value);
  return value as JsonValue;
}

/** The sidecar's `Rules::parse`; TOML syntax errors are worded by the parser. */
export function parseRules(text: string): Rules {
  const invalid = (problem: string) => new RulesError(`invalid rules: ${problem}`);
  let document: Record<string, unknown>;
  try {
    document = parseToml(text) as Record<string, unknown>;
  } catch (e) {
    throw invalid(e instanceof TomlError ? e.message : String(e));
  }
  for (const field of Object.keys(document).sort()) {
    if (field !== 'flags' && field !== 'rule') throw invalid(`unknown field \`${field}\`, expected \`flags\` or \`rule\``);
  }
  const flags = document.flags ?? {};
  const specs = document.rule ?? [];
  if (!isTable(flags) || !Array.isArray(specs) || !specs.every(isTable)) {
    throw invalid('`flags` must be a table and `rule` an array of tables ([[rule]])');
  }
  const catalog = new Map<string, FlagValue>();
  for (const key of Object.keys(flags).sort()) {
    if (!isValidFlagKey(key)) {
      throw invalid(`flag key '${key}' must be 1-${MAX_FLAG_KEY_LENGTH} characters of letters, digits, _ - . :`);
    }
    catalog.set(key, flagValueFromToml(flags[key]));
  }
  const rules: Rule[] = [];
  specs.forEach((spec: Record<string, unknown>, index) => {
    const n = index + 1;
    const given = spec.name;
    if (given !== undefined && (typeof given !== 'string' || trimWhiteSpace(given) === '')) {
      throw invalid(`rule ${n} has an empty \`name\``);
    }
    const label = given !== undefined ? `rule ${n} ('${given}')` : `rule ${n}`;
    const bad = (problem: string) => invalid(`${label} ${problem}`);
    for (const field of Object.keys(spec).sort()) {
      if (!RULE_FIELDS.includes(field)) {
        throw bad(`has an unknown field \`${field}\`, expected one of ${RULE_FIELDS.join(', ')}`);
      }
    }
    const events = spec.events ?? [];
    const plans = spec.plans ?? [];
    const set = spec.set ?? {};
    const otherwise = spec.else ?? {};
    const entitlements = spec.entitlements ?? false;
    const status = spec.status;
    if (!Array.isArray(events) || events.length === 0 || !events.every((e) => typeof e === 'string' && e !== '')) {
      throw bad('needs a non-empty `events` list');
    }
    if (
      !Array.isArray(plans) ||
      !plans.every((p) => typeof p === 'string') ||
      typeof entitlements !== 'boolean' ||
      !isTable(set) ||
      !isTable(otherwise)
    ) {
      throw bad('has a field of the wrong type (`plans`: strings, `set`/`else`: tables, `entitlements`: a boolean)');
    }
    if (entitlements === (Object.keys(set).length > 0)) throw bad('needs exactly one of `set` or `entitlements = true`');
    if (Object.keys(otherwise).length > 0 && (plans.length === 0 || entitlements)) {
      throw bad(
        'has an `else`, which only a `set` rule with `plans` can have: it is what the rule sets when the plan does not match',
      );
    }
    let statuses: string[] = [];
    if (status !== undefined) {
      if (!Array.isArray(status) || !status.every((s) => typeof s === 'string')) {
        throw bad('has a `status` that is not a list of strings');
      }
      if (status.length === 0) {
        throw bad('has an empty `status` list, which no event matches; leave it out to match any status');
      }
      statuses = status as string[];
    }
    const unknown = statuses.find((s) => !(SUBSCRIPTION_STATUSES as readonly string[]).includes(s));
    if (unknown !== undefined) {
      throw bad(
        `names status '${unknown}', which is not one of Stripe's subscription statuses (${SUBSCRIPTION_STATUSES.join(', ')})`,
      );
    }
    const other = statuses.length > 0 ? (events as string[]).find((e) => !e.startsWith('customer.subscription.')) : undefined;
    if (other !== undefined) {
      throw bad(
        `has a \`status\` condition but lists '${other}': only customer.subscription.* events carry a subscription status`,
      );
    }
    const badPlan = (plans as string[]).find((p) => p === '' || NOT_ALPHANUMERIC.test(p));
    if (badPlan !== undefined) {
      throw bad(
        `lists plan '${badPlan}', which can never match: each \`plans\` entry is one word (letters and digits) of a price lookup_key or nickname, e.g. "pro" matches "Pro Monthly" and "pro_annual"`,
      );
    }
    const settings = (table: Record<string, unknown>): [string, FlagValue][] =>
      Object.keys(table)
        .sort()
        .map((key) => {
          if (!catalog.has(key)) throw bad(`sets flag '${key}', which [flags] does not define`);
          return [key, flagValueFromToml(table[key])];
        });
    const rule: Rule = {
      name: given !== undefined ? (given as string) : `rule ${n}`,
      events: events as string[],
      status: statuses,
      plans: (plans as string[]).map((p) => p.toLowerCase()),
      set: settings(set),
      otherwise: settings(otherwise),
      entitlements,
    };
    if (rules.some((r) => r.name === rule.name)) {
      throw invalid(`two rules are named '${rule.name}'; \`flags explain\` tells rules apart by name`);
    }
    rules.push(rule);
  });
  return { catalog, rules };
}

/** Where the sidecar's rules file is: the copy the package ships, else the repository's own. */
export function defaultRulesPath(): string {
  const candidates = [
    new URL('../rules/default.toml', import.meta.url),
    new URL('../../../rules/default.toml', import.meta.url),
  ].map((url) => fileURLToPath(url));
  const found = candidates.find((path) => existsSync(path));
  if (found === undefined) {
    throw new Error(`the sidecar's rules file is missing (looked in ${candidates.join(', ')}); build the package`);
  }
  return found;
}

/** The rules the sidecar would run with: CORESDK_RULES_FILE, else the built-in set. */
export function loadRules(env: Env = process.env): Rules {
  // Taken as given, as the sidecar takes it: a set but empty path is an unreadable file.
  const path = env.CORESDK_RULES_FILE;
  if (path !== undefined) {
    let text: string;
    try {
      text = readFileSync(path, 'utf8');
    } catch (e) {
      throw new RulesError(`CORESDK_RULES_FILE: cannot read ${path}: ${(e as Error).message}`);
    }
    try {
      return parseRules(text);
    } catch (e) {
      if (e instanceof RulesError) {
        throw new RulesError(`CORESDK_RULES_FILE: ${e.message}; fix the file; rules/default.toml documents the format`);
      }
      throw e;
    }
  }
  return parseRules(readFileSync(defaultRulesPath(), 'utf8'));
}

// ---------------------------------------------------------------------------------------------
// Stripe events (src/stripe/event.rs).

interface EventOrder {
  created: number;
  rank: number;
  eventId: string;
}

const ORDER_ZERO: EventOrder = { created: 0, rank: 0, eventId: '' };

function compareOrder(a: EventOrder, b: EventOrder): number {
  if (a.created !== b.created) return a.created < b.created ? -1 : 1;
  if (a.rank !== b.rank) return a.rank < b.rank ? -1 : 1;
  // The event id's bytes, as the sidecar compares them.
  return Buffer.compare(Buffer.from(a.eventId, 'utf8'), Buffer.from(b.eventId, 'utf8'));
}

interface StripeEvent {
  id: string;
  type: string;
  created: number;
  livemode: boolean;
  object: JsonObject;
  previousAttributes: JsonObject | null;
  payload: Buffer;
  signedAt: number;
}

function asObject(value: JsonValue | undefined): JsonObject | null {
  return typeof value === 'object' && value !== null && !Array.isArray(value) ? value : null;
}

function objectStr(event: StripeEvent, field: string): string | null {
  const value = event.object[field];
  return typeof value === 'string' && value !== '' ? value : null;
}

function subscriptionStatus(event: StripeEvent): string | null {
  if (event.type === 'customer.subscription.deleted') return 'canceled';
  if (event.type.startsWith('customer.subscription.')) return objectStr(event, 'status');
  return null;
}

function lifecyclePosition(status: string): number | null {
  const index = (SUBSCRIPTION_STATUSES as readonly string[]).indexOf(status);
  return index < 0 ? null : Math.min(index, SUBSCRIPTION_STATUSES.indexOf('canceled'));
}

function eventOrder(event: StripeEvent): EventOrder {
  let rank = 20;
  if (event.type === 'customer.subscription.created') rank = 10;
  else if (event.type === 'customer.subscription.deleted') rank = 100;
  else if (['customer.subscription.updated', 'customer.subscription.paused', 'customer.subscription.resumed'].includes(event.type)) {
    const status = subscriptionStatus(event);
    const position = status === null ? null : lifecyclePosition(status);
    const changed = event.previousAttributes !== null && 'status' in event.previousAttributes;
    rank = 30 + (position === null ? 0 : 2 + 2 * position + (changed ? 1 : 0));
  }
  return { created: event.created, rank, eventId: event.id };
}

function customerId(event: StripeEvent): string | null {
  const customer = event.object.customer;
  if (typeof customer === 'string' && customer !== '') return customer;
  const expanded = asObject(customer);
  if (expanded !== null) {
    const id = expanded.id;
    return typeof id === 'string' ? id : null;
  }
  if (event.object.object === 'customer') {
    const id = event.object.id;
    return typeof id === 'string' ? id : null;
  }
  return null;
}

function metadataTenant(event: StripeEvent): string | null {
  const tenant = asObject(event.object.metadata)?.tenant_id;
  return typeof tenant === 'string' && tenant !== '' ? tenant : null;
}

function planNames(event: StripeEvent): string[] {
  const names: string[] = [];
  const pushFrom = (holder: JsonValue | undefined) => {
    const table = asObject(holder);
    if (table === null) return;
    for (const field of ['lookup_key', 'nickname']) {
      const name = table[field];
      if (typeof name === 'string') names.push(name);
    }
  };
  const items = asObject(event.object.items)?.data;
  if (Array.isArray(items)) {
    for (const item of items) {
      pushFrom(asObject(item)?.price);
      pushFrom(asObject(item)?.plan);
    }
  }
  pushFrom(event.object.plan);
  return names;
}

function entitlementLookupKeys(event: StripeEvent): string[] {
  const items = asObject(event.object.entitlements)?.data;
  if (!Array.isArray(items)) return [];
  const keys: string[] = [];
  for (const item of items) {
    const entry = asObject(item);
    if (entry === null) continue;
    // As the sidecar: `lookup_key` when present (whatever its type), else the feature's.
    const key = entry.lookup_key !== undefined ? entry.lookup_key : asObject(entry.feature)?.lookup_key;
    if (typeof key === 'string') keys.push(key);
  }
  return keys;
}


/** Rust's `char::is_alphanumeric`: Alphabetic or Numeric. */
const NOT_ALPHANUMERIC = /[^\p{Alphabetic}\p{N}]/u;

function onPlan(event: StripeEvent, plans: readonly string[]): boolean {
  // Words split on anything not a letter or digit, compared ignoring ASCII case (as the sidecar).
  return planNames(event).some((name) =>
    name.split(NOT_ALPHANUMERIC).some((word) => plans.some((plan) => asciiLowercase(word) === asciiLowercase(plan))),
  );
}

const fatalUtf8 = new TextDecoder('utf-8', { fatal: true });

/** JSON as serde_json reads it: UTF-8 strictly, and no unpaired surrogates. */
function parseJson(bytes: Buffer): JsonValue {
  const text = fatalUtf8.decode(bytes);
  const value = JSON.parse(text) as JsonValue;
  if (!wellFormed(value)) throw new Error('lone surrogate in a string');
  return value;
}

// With the `u` flag, a surrogate range matches only a surrogate that is not half of a pair.
const LONE_SURROGATE = /[\uD800-\uDFFF]/u;

function wellFormed(value: JsonValue): boolean {
  if (typeof value === 'string') return !LONE_SURROGATE.test(value);
  if (Array.isArray(value)) return value.every(wellFormed);
  if (value !== null && typeof value === 'object') {
    return Object.entries(value).every(([k, v]) => !LONE_SURROGATE.test(k) && wellFormed(v));
  }
  return true;
}

/** The sidecar keeps its own records' keys beside event ids under this prefix (src/stripe/event.rs). */
const RESERVED_EVENT_ID_PREFIX = 'coresdk:';

function requiredString(event: JsonObject, field: string): string {
  const value = event[field];
  if (typeof value === 'string' && value !== '') {
    if (utf8Length(value) > MAX_EVENT_FIELD_LEN) {
      throw refuse.notAnEvent(`\`${field}\` is longer than ${MAX_EVENT_FIELD_LEN} characters`);
    }
    return value;
  }
  throw refuse.notAnEvent(`no \`${field}\` string in the event`);
}

/** `StripeEvent::parse` (`signed`) and `parse_exported` (not signed: `latest` is now). */
function parseEvent(payload: Buffer, latest: number, signed: boolean): StripeEvent {
  let value: JsonValue;
  try {
    value = parseJson(payload);
  } catch (e) {
    throw refuse.notAnEvent(`the body is not JSON (${(e as Error).message})`);
  }
  const event = asObject(value);
  if (event === null) throw refuse.notAnEvent('the body is not a JSON object');
  const id = requiredString(event, 'id');
  if (id.startsWith(RESERVED_EVENT_ID_PREFIX)) {
    throw refuse.notAnEvent(
      `event ids starting with \`${RESERVED_EVENT_ID_PREFIX}\` are the sidecar's own (Stripe's start with \`evt_\`)`,
    );
  }
  const type = requiredString(event, 'type');
  const created = event.created;
  if (created === undefined || created === null) {
    throw refuse.notAnEvent('no `created` in the event; Stripe always sends one');
  }
  if (typeof created !== 'number' || !Number.isSafeInteger(created)) {
    throw refuse.notAnEvent('`created` is not an integer timestamp');
  }
  if (created < 0) throw refuse.notAnEvent(`\`created\` (${created}) is before 1970`);
  const what = signed
    ? 'the signature timestamp; Stripe signs events after creating them'
    : 'now; an exported event cannot come from the future';
  if (created > latest + MAX_CREATED_AHEAD_S) {
    throw refuse.notAnEvent(`\`created\` (${created}) is more than ${MAX_CREATED_AHEAD_S} s after ${what} (${latest})`);
  }
  const data = asObject(event.data);
  return {
    id,
    type,
    created,
    livemode: event.livemode === true,
    object: asObject(data?.object) ?? {},
    previousAttributes: asObject(data?.previous_attributes),
    payload,
    signedAt: latest,
  };
}

/** The top-level string `id` and `type` the first 1024 bytes of an unverified body claim. */
function claimedIdentity(payload: Buffer): { id?: string; type?: string } {
  const claimed: { id?: string; type?: string } = {};
  const text = new TextDecoder('utf-8').decode(payload.subarray(0, CLAIM_PREFIX_BYTES));
  let i = 0;
  const ws = () => {
    while (i < text.length && ' \t\r\n'.includes(text[i] ?? '')) i += 1;
  };
  // A JSON string at `i`, or undefined when the prefix ends (or breaks) inside it.
  const string = (): string | undefined => {
    const start = i;
    i += 1;
    while (i < text.length) {
      const c = text[i];
      if (c === '\\') i += 2;
      else if (c === '"') {
        i += 1;
        try {
          return JSON.parse(text.slice(start, i)) as string;
        } catch {
          return undefined;
        }
      } else i += 1;
    }
    return undefined;
  };
  // Skips one value; false when the prefix ends inside it.
  const skip = (): boolean => {
    ws();
    let depth = 0;
    while (i < text.length) {
      const c = text[i];
      if (c === '"') {
        if (string() === undefined) return false;
        if (depth === 0) return true;
        continue;
      }
      if (c === '{' || c === '[') depth += 1;
      else if (c === '}' || c === ']') {
        if (depth === 0) return true;
        depth -= 1;
        if (depth === 0) {
          i += 1;
          return true;
        }
      } else if (depth === 0 && (c === ',' || c === ' ' || c === '\n' || c === '\r' || c === '\t')) return true;
      i += 1;
    }
    return false;
  };
  ws();
  if (text[i] !== '{') return claimed;
  i += 1;
  while (i < text.length) {
    ws();
    if (text[i] !== '"') return claimed;
    const key = string();
    if (key === undefined) return claimed;
    ws();
    if (text[i] !== ':') return claimed;
    i += 1;
    ws();
    if ((key === 'id' && claimed.id === undefined) || (key === 'type' && claimed.type === undefined)) {
      if (text[i] === '"') {
        const value = string();
        if (value === undefined) return claimed;
        const bounded = Array.from(value).slice(0, 255).join('');
        if (key === 'id') claimed.id = bounded;
        else claimed.type = bounded;
      } else if (!skip()) return claimed;
    } else if (!skip()) return claimed;
    if (claimed.id !== undefined && claimed.type !== undefined) return claimed;
    ws();
    if (text[i] !== ',') return claimed;
    i += 1;
  }
  return claimed;
}

// ---------------------------------------------------------------------------------------------
// Flag values (src/flags.rs).

type FlagKind = 'bool' | 'string' | 'number' | 'json';

function flagKind(value: FlagValue): FlagKind {
  if (typeof value === 'boolean') return 'bool';
  if (typeof value === 'string') return 'string';
  if (typeof value === 'number') return 'number';
  return 'json';
}

function sameFlagValue(a: FlagValue, b: FlagValue): boolean {
  return flagKind(a) === flagKind(b) && canonicalize(a) === canonicalize(b);
}

/** A number as Rust's `f64` Display writes it: never in exponent form, and `-0` keeps its sign. */
function rustNumber(n: number): string {
  if (Object.is(n, -0)) return '-0';
  const text = String(n);
  const match = /^(-?)(\d)(?:\.(\d+))?e([+-]\d+)$/.exec(text);
  if (match === null) return text;
  const [, sign = '', lead = '', rest = '', exponentText = '0'] = match;
  const digits = lead + rest;
  const exponent = Number(exponentText);
  if (exponent >= 0) return sign + digits.padEnd(exponent + 1, '0');
  return `${sign}0.${'0'.repeat(-exponent - 1)}${digits}`;
}

/** Rust's order of strings (by UTF-8 bytes, i.e. code points), which serde_json's sorted maps keep. */
function byUtf8(a: string, b: string): number {
  return Buffer.compare(Buffer.from(a, 'utf8'), Buffer.from(b, 'utf8'));
}

/**
 * The shortest digits that read back as |n| (what JavaScript, ryu and zmij all find) and the
 * decimal exponent of the first: 1.5 -> ['15', 0], 0.001 -> ['1', -3]. Not for 0.
 */
function shortestDigits(n: number): [string, number] {
  const [mantissa = '', exponent = '0'] = String(Math.abs(n)).split('e');
  const [whole = '', fraction = ''] = mantissa.split('.');
  const all = whole + fraction;
  const significant = all.replace(/^0+/, '');
  const leadingZeros = all.length - significant.length;
  return [significant.replace(/0+$/, ''), whole.length - 1 - leadingZeros + Number(exponent)];
}

/**
 * A number inside JSON as the sidecar's serde_json writes it: an integral double below 2^53 as
 * an integer (the sidecar receives those as integers), any other as zmij formats a double: plain
 * for decimal exponents -5 to 15 (`0.00001`, `9007199254740994.0`), else `1.5e+21`, `1e-7`.
 */
function serdeNumber(n: number): string {
  if (Number.isInteger(n) && Math.abs(n) < 2 ** 53) return String(n);
  const [digits, exponent] = shortestDigits(n);
  const sign = n < 0 ? '-' : '';
  if (exponent >= -5 && exponent <= 15) {
    if (digits.length - 1 <= exponent) return `${sign}${digits.padEnd(exponent + 1, '0')}.0`;
    if (exponent >= 0) return `${sign}${digits.slice(0, exponent + 1)}.${digits.slice(exponent + 1)}`;
    return `${sign}0.${'0'.repeat(-exponent - 1)}${digits}`;
  }
  const mantissa = digits.length > 1 ? `${digits[0]}.${digits.slice(1)}` : digits;
  return `${sign}${mantissa}e${exponent >= 0 ? '+' : '-'}${Math.abs(exponent)}`;
}

/** serde_json's compact form: its maps sorted, its numbers as `serdeNumber`. */
function compactJson(value: JsonValue): string {
  if (Array.isArray(value)) return `[${value.map(compactJson).join(',')}]`;
  if (typeof value === 'number') return serdeNumber(value);
  if (value !== null && typeof value === 'object') {
    return `{${Object.keys(value)
      .sort(byUtf8)
      .map((k) => `${JSON.stringify(k)}:${compactJson(value[k] as JsonValue)}`)
      .join(',')}}`;
  }
  return JSON.stringify(value);
}

/** A value as the sidecar's store gives it back (`FlagValue::to_stored`): integral numbers are written as integers, so -0 comes back as 0. */
function storedFlagValue(value: FlagValue): FlagValue {
  return Object.is(value, -0) ? 0 : value;
}

/** How the audit trail shows a value: `on`/`off` for booleans, JSON otherwise. */
function displayFlagValue(value: FlagValue): string {
  if (value === true) return 'on';
  if (value === false) return 'off';
  if (typeof value === 'number') return rustNumber(value);
  return compactJson(value);
}

// ---------------------------------------------------------------------------------------------
// The audit trail (src/audit.rs).

interface NewRecord {
  tenant: string;
  actor: string;
  event: string;
  outcome: string;
  metadata: JsonObject;
}

interface StoredRecord {
  seq: number;
  timeMs: number;
  tenant: string;
  actor: string;
  event: string;
  outcome: string;
  prevHash: string;
  hash: string;
  canonical: Buffer;
  /** Its Merkle tree leaf hash, SHA-256(0x00 ‖ canonical). */
  leaf: Buffer;
}

function jcs(value: JsonValue): string {
  const text = canonicalize(value);
  if (text === undefined) throw new Error('canonical encoding: not JSON');
  return text;
}

function rfc3339Ms(ms: number): string {
  return new Date(ms).toISOString();
}

function chainHash(prevHex: string, canonical: Buffer): string {
  return createHash('sha256').update(DOMAIN_TAG).update(Buffer.from(prevHex, 'hex')).update(canonical).digest('hex');
}

/** Fits metadata under the bound, dropping the largest values first (as the sidecar). */
function boundMetadata(metadata: JsonObject): JsonObject {
  const bounded: JsonObject = { ...metadata };
  while (utf8Length(jcs(bounded)) > MAX_METADATA_BYTES) {
    let largest: string | null = null;
    let largestSize = -1;
    // Sorted keys, the last of equal sizes: the sidecar's max_by_key over its sorted map.
    for (const key of Object.keys(bounded).sort(byUtf8)) {
      const value = bounded[key] as JsonValue;
      if (value === '[truncated]') continue;
      const size = utf8Length(compactJson(value));
      if (size >= largestSize) {
        largest = key;
        largestSize = size;
      }
    }
    if (largest === null) {
      for (const key of Object.keys(bounded)) delete bounded[key];
      break;
    }
    bounded[largest] = '[truncated]';
  }
  return bounded;
}

function reservedNamespace(event: string): string | null {
  const lowered = asciiLowercase(trimStartWhiteSpace(event));
  return RESERVED_NAMESPACES.find((ns) => lowered === ns || lowered.startsWith(`${ns}.`)) ?? null;
}

/** The largest power of two smaller than `n` (n ≥ 2): where RFC 6962 splits a tree. */
function splitPoint(n: number): number {
  let k = 1;
  while (k * 2 < n) k *= 2;
  return k;
}

/** The raw 32-byte public key of an Ed25519 private key: the tail of its SPKI DER form (RFC 8410). */
function spkiRaw(privateKey: KeyObject): Buffer {
  const der = createPublicKeyFrom(privateKey).export({ format: 'der', type: 'spki' });
  return der.subarray(der.length - 32);
}

/** A root or proof needs the hash of a record the mock no longer keeps. */
class DroppedLeaves extends Error {}

class AuditTrail {
  #records: StoredRecord[] = [];
  #head = { seq: 0, hash: GENESIS_HASH };

  get headSeq(): number {
    return this.#head.seq;
  }

  append(record: NewRecord, nowMs: number): StoredRecord {
    const seq = this.#head.seq + 1;
    const canonical = Buffer.from(
      jcs({
        v: 1,
        seq,
        time: rfc3339Ms(nowMs),
        tenant: record.tenant,
        actor: record.actor,
        event: record.event,
        outcome: record.outcome,
        metadata: record.metadata,
      }),
      'utf8',
    );
    const hash = chainHash(this.#head.hash, canonical);
    const stored: StoredRecord = {
      seq,
      timeMs: nowMs,
      tenant: record.tenant,
      actor: record.actor,
      event: record.event,
      outcome: record.outcome,
      prevHash: this.#head.hash,
      hash,
      canonical,
      leaf: leafHash(canonical),
    };
    this.#records.push(stored);
    this.#head = { seq, hash };
    if (this.#records.length > MAX_AUDIT_RECORDS + MAX_AUDIT_RECORDS / 10) {
      this.#drop(this.#records.length - MAX_AUDIT_RECORDS);
    }
    return stored;
  }

  // -- the Merkle tree (RFC 6962 section 2.1) ---------------------------------------------------

  /**
   * The roots of the complete subtrees of the dropped records' prefix, by `first leaf:leaf
   * count`: the only hashes of theirs any root or proof of a kept record needs (see #subtree).
   */
  #dropped = new Map<string, Buffer>();

  /** The leaf index of the oldest kept record: the dropped prefix's size. */
  #firstLeaf(): number {
    return (this.#records[0]?.seq ?? this.#head.seq + 1) - 1;
  }

  /**
   * Drops the oldest `count` records, keeping the roots of the complete subtrees that the binary
   * decomposition of the new dropped prefix has (one per set bit of its size).
   */
  #drop(count: number): void {
    const end = this.#firstLeaf() + count;
    const frontier = new Map<string, Buffer>();
    let start = 0;
    for (let size = 2 ** Math.floor(Math.log2(end)); size >= 1; size /= 2) {
      if (end - start >= size) {
        frontier.set(`${start}:${size}`, this.subtree(start, start + size));
        start += size;
      }
    }
    this.#records.splice(0, count);
    this.#dropped = frontier;
  }

  /**
   * MTH(D[lo:hi]). A range within the dropped prefix is known only as one of its kept subtree
   * roots: every range a root or a kept record's proof needs is (its parent reaches past the
   * prefix, so it is a maximal one). Null when the range needs a dropped record's hash.
   */
  subtree(lo: number, hi: number): Buffer {
    const first = this.#firstLeaf();
    if (hi <= first && hi > lo) {
      const known = this.#dropped.get(`${lo}:${hi - lo}`);
      if (known === undefined) throw new DroppedLeaves();
      return known;
    }
    const n = hi - lo;
    if (n === 0) return EMPTY_ROOT;
    if (n === 1) return (this.#records[lo - first] as StoredRecord).leaf;
    const k = splitPoint(n);
    return nodeHash(this.subtree(lo, lo + k), this.subtree(lo + k, hi));
  }

  /** PATH(m, D[lo:hi]) (RFC 6962 section 2.1.1), leaf m counted from 0 of the whole tree. */
  path(m: number, lo: number, hi: number): Buffer[] {
    const n = hi - lo;
    if (n <= 1) return [];
    const k = splitPoint(n);
    if (m < lo + k) return [...this.path(m, lo, lo + k), this.subtree(lo + k, hi)];
    return [...this.path(m, lo + k, hi), this.subtree(lo, lo + k)];
  }

  /** SUBPROOF(m, D[lo:hi], b) (RFC 6962 section 2.1.2). */
  subproof(m: number, lo: number, hi: number, whole: boolean): Buffer[] {
    const n = hi - lo;
    if (m === n) return whole ? [] : [this.subtree(lo, hi)];
    const k = splitPoint(n);
    if (m <= k) return [...this.subproof(m, lo, lo + k, whole), this.subtree(lo + k, hi)];
    return [...this.subproof(m - k, lo + k, hi, false), this.subtree(lo, lo + k)];
  }

  at(seq: number): StoredRecord | undefined {
    const first = this.#records[0]?.seq ?? 1;
    return this.#records[seq - first];
  }

  /** Records with seq in (after, through], oldest first. */
  *range(after: number, through: number): Generator<StoredRecord> {
    const first = this.#records[0]?.seq ?? 1;
    for (let i = Math.max(0, after + 1 - first); i < this.#records.length; i += 1) {
      const record = this.#records[i] as StoredRecord;
      if (record.seq > through) return;
      yield record;
    }
  }

  verify(): VerifyResult {
    let prev = this.#records[0]?.prevHash ?? GENESIS_HASH;
    let expected = this.#records[0]?.seq ?? 1;
    let checked = 0;
    const head = { headSeq: this.#head.seq, headHash: this.#head.hash, warnings: [], checkpointSize: 0 };
    for (const record of this.#records) {
      const fail = (reason: string): VerifyResult => ({ ok: false, recordsChecked: checked, firstBadSeq: record.seq, reason, ...head, treeRoot: '' });
      if (record.seq !== expected) return fail(`record ${expected} is missing (the next stored record is ${record.seq})`);
      if (record.prevHash !== prev) {
        return fail(`record ${record.seq} does not link to record ${record.seq - 1} (removed, reordered or altered)`);
      }
      const hash = chainHash(prev, record.canonical);
      if (record.hash !== hash || !record.leaf.equals(leafHash(record.canonical))) {
        return fail(`record ${record.seq} was altered (its hash does not match its content)`);
      }
      checked += 1;
      expected += 1;
      prev = hash;
    }
    return { ok: true, recordsChecked: checked, firstBadSeq: 0, reason: '', ...head, treeRoot: this.subtree(0, this.#head.seq).toString('hex') };
  }
}

function metadataOf(record: StoredRecord): JsonObject {
  const parsed = JSON.parse(record.canonical.toString('utf8')) as { metadata: JsonObject };
  return parsed.metadata;
}

function publicRecord(record: StoredRecord): AuditRecord {
  return {
    seq: record.seq,
    time: rfc3339Ms(record.timeMs),
    tenantId: record.tenant,
    actor: record.actor,
    event: record.event,
    outcome: record.outcome,
    metadata: metadataOf(record),
    prevHash: record.prevHash,
    hash: record.hash,
    canonical: Buffer.from(record.canonical),
  };
}

// ---------------------------------------------------------------------------------------------
// Coalescing what anyone can cause (src/coalesce.rs).

interface Tally {
  repeats: NewRecord;
  reason: string;
  openedAt: number;
  openedMs: number;
  unreported: number;
}

function withCount(record: NewRecord, count: number, coalesced?: [string, number]): NewRecord {
  const metadata: JsonObject = { ...record.metadata, count };
  if (coalesced !== undefined) {
    metadata.coalesced = coalesced[0];
    metadata.since_ms = coalesced[1];
  }
  return { ...record, metadata: boundMetadata(metadata) };
}

class Coalescer {
  // Insertion order is opening order, and every window lasts as long: the oldest expire first.
  #windows = new Map<string, Tally>();
  #budget = { openedAt: 0, used: 0 };
  #overflow = new Map<string, number>();
  // When the oldest occurrence not yet in an overflow record was counted.
  #overflowPendingAt: number | null = null;
  #overflowReportedAt: number | null = null;
  #overflowSinceMs = Date.now();

  constructor(
    readonly kind: { event: string; outcome: string; keyFields: readonly string[] },
    readonly windowMs: number,
    readonly write: (record: NewRecord) => void,
  ) {
    this.#budget.openedAt = performance.now();
  }

  get #budgetWindowMs(): number {
    return Math.max(this.windowMs, 1000);
  }

  admit(key: string, reason: string, first: () => NewRecord): void {
    this.flush(false);
    const open = this.#windows.get(key);
    if (open !== undefined) {
      open.unreported += 1;
      return;
    }
    const now = performance.now();
    if (now - this.#budget.openedAt >= this.#budgetWindowMs) this.#budget = { openedAt: now, used: 0 };
    if (this.#budget.used >= MAX_RECORDS_PER_WINDOW) {
      this.#overflow.set(reason, (this.#overflow.get(reason) ?? 0) + 1);
      this.#overflowPendingAt ??= now;
      return;
    }
    this.#budget.used += 1;
    const record = withCount(first(), 1);
    const keep = new Set(this.kind.keyFields);
    const repeats: NewRecord = {
      ...record,
      metadata: Object.fromEntries(Object.entries(record.metadata).filter(([name]) => keep.has(name))),
    };
    this.#windows.set(key, { repeats, reason, openedAt: now, openedMs: Date.now(), unreported: 0 });
    this.write(record);
    if (this.windowMs === 0) this.flush(false);
  }

  /** Reports the windows that ended (all of them when closing) and the overflow when due. */
  flush(closing: boolean): void {
    const now = performance.now();
    for (const [key, tally] of this.#windows) {
      if (!closing && now - tally.openedAt < this.windowMs) break;
      this.#windows.delete(key);
      if (tally.unreported > 0) this.write(withCount(tally.repeats, tally.unreported, ['repeats', tally.openedMs]));
    }
    // The sidecar's writer reports overflow on its once-a-second tick, one record per budget
    // window at most: so a flood's first second goes into one record here too.
    const ticked = this.#overflowPendingAt !== null && now - this.#overflowPendingAt >= FLUSH_EVERY_MS;
    const allowed = this.#overflowReportedAt === null || now - this.#overflowReportedAt >= this.#budgetWindowMs;
    if (this.#overflow.size === 0 || !(closing || (ticked && allowed))) return;
    const reasons = Object.fromEntries([...this.#overflow].sort(([a], [b]) => (a < b ? -1 : 1)));
    const count = [...this.#overflow.values()].reduce((a, b) => a + b, 0);
    this.#overflow.clear();
    this.write(
      withCount(
        { tenant: '', actor: OVERFLOW_ACTOR, event: this.kind.event, outcome: this.kind.outcome, metadata: { reasons } },
        count,
        ['overflow', this.#overflowSinceMs],
      ),
    );
    this.#overflowReportedAt = now;
    this.#overflowPendingAt = null;
    this.#overflowSinceMs = Date.now();
  }
}

// ---------------------------------------------------------------------------------------------
// JWT (src/auth/token.rs), HS256/384/512 only.

const HMAC_ALGORITHMS: Record<string, string> = { HS256: 'sha256', HS384: 'sha384', HS512: 'sha512' };
const KNOWN_ALGORITHMS = new Set(['HS256', 'HS384', 'HS512', 'ES256', 'ES384', 'RS256', 'RS384', 'RS512', 'PS256', 'PS384', 'PS512', 'EdDSA']);

class TokenError extends Error {}

const MALFORMED = "the token is malformed";

/** Base64url without padding, strictly (canonical trailing bits), as the sidecar's JWT library. */
function b64url(part: string): Buffer {
  const bytes = /^[A-Za-z0-9_-]*$/.test(part) && part.length % 4 !== 1 ? Buffer.from(part, 'base64url') : null;
  if (bytes === null || bytes.toString('base64url') !== part) throw new TokenError(MALFORMED);
  return bytes;
}

/** A JSON value from a token part, or the TokenError `why` when it is not JSON. */
function tokenJson(bytes: Buffer, why: string): JsonValue {
  try {
    return parseJson(bytes);
  } catch {
    throw new TokenError(why);
  }
}

/** A NumericDate as the sidecar's JWT library reads it: a non-negative number, rounded; else null. */
function numericDate(value: JsonValue | undefined): number | null {
  return typeof value === 'number' && value >= 0 && value < 2 ** 64 ? Math.round(value) : null;
}

/**
 * Claims the sidecar's JWT library (jsonwebtoken over serde_json) cannot read past, so that the
 * whole token is malformed: its `sub` reader leaves an array or object unread, and its `exp` /
 * `nbf` reader leaves a non-empty one unread (an empty one reads as a claim of the wrong type).
 */
function unreadableClaims(claims: JsonObject): boolean {
  const isContainer = (value: JsonValue | undefined): boolean => typeof value === 'object' && value !== null;
  const nonEmpty = (value: JsonValue | undefined): boolean => isContainer(value) && Object.keys(value as object).length > 0;
  return isContainer(claims.sub) || nonEmpty(claims.exp) || nonEmpty(claims.nbf);
}

/** `iss` / `aud`: a string or an array of strings; anything else is as if absent. */
function stringSet(value: JsonValue | undefined): string[] | null {
  if (typeof value === 'string') return [value];
  if (Array.isArray(value) && value.every((v) => typeof v === 'string')) return value as string[];
  return null;
}

function strings(value: unknown, splitSpaces: boolean): string[] {
  if (typeof value === 'string') return splitSpaces ? value.split(/\s+/).filter((s) => s !== '') : [value];
  if (Array.isArray(value)) return value.filter((v): v is string => typeof v === 'string');
  return [];
}

// ---------------------------------------------------------------------------------------------
// The mock.

interface FlagRecord {
  value: FlagValue;
  version: number;
  order: EventOrder;
  origin: 'rule' | 'entitlements' | 'admin';
  updatedAtMs: number;
  updatedBy: string;
  sourceEventId: string;
}

interface Processed {
  tenant: string;
  outcome: WebhookOutcome;
  auditSeq: number;
  eventType: string;
}

interface Parked {
  event: StripeEvent;
  customer: string;
  actor: string;
  reason: string | null;
  parkedAtMs: number;
}

interface Delivery {
  actor: string;
  reason: string | null;
  /** The operator who asked for a replay: named in the records written then, not later. */
  operator?: string | null;
}

interface Wanted {
  key: string;
  value: FlagValue;
  origin: FlagRecord['origin'];
  rule: string;
  order: EventOrder;
}

interface BillingObject {
  kind: 'subscription' | 'entitlements';
  order: EventOrder;
  // Subscription rows.
  standing: number;
  settings: Setting[];
  keys: Set<string>;
  // The entitlements object: every key any summary named.
  known: Set<string>;
}

function standingOf(status: string | null): number {
  if (status === 'active' || status === 'trialing') return 3;
  if (status === 'past_due' || status === 'unpaid' || status === 'incomplete') return 2;
  if (status === 'paused') return 1;
  return 0;
}

function splitSecrets(text: string | undefined): string[] {
  return (text ?? '')
    .split(/[,\n]/)
    .map(trimWhiteSpace)
    .filter((s) => s !== '');
}

// The sidecar reads its settings with clap, which takes a set variable as given (untrimmed,
// and an empty one is a value, not an unset one): the mock refuses and accepts the same values.

const U64_MAX = 2n ** 64n - 1n;

/**
 * An unsigned integer setting, as Rust's `u64::from_str` reads it (an optional `+`, digits, at
 * most 2^64 - 1). Past 2^53 a number of seconds is "forever" either way: such values are capped.
 */
function envInteger(env: Env, name: string, fallback: number, max = U64_MAX): number {
  const text = env[name];
  if (text === undefined) return fallback;
  if (!/^\+?[0-9]+$/.test(text) || BigInt(text) > U64_MAX) {
    throw new Error(`${name} must be a whole number of 0 or more, not ${JSON.stringify(text)}`);
  }
  const value = BigInt(text);
  if (value > max) throw new Error(`${name} must be at most ${max}`);
  return value > BigInt(Number.MAX_SAFE_INTEGER) ? Number.MAX_SAFE_INTEGER : Number(value);
}

/** A link setting (src/config.rs `checked_url`): unset, or an absolute http(s) URL. */
function envUrl(env: Env, name: string): string | null {
  const url = env[name];
  if (url === undefined) return null;
  if (!(url.startsWith('https://') || url.startsWith('http://'))) {
    throw new Error(`${name} must be an absolute http(s) URL, e.g. https://…`);
  }
  return url;
}

const flagMapKey = (tenant: string, key: string) => `${tenant}\u0000${key}`;

export class MockSidecar implements CoreSDKClient {
  readonly settings: Settings;
  readonly spooled = 0;

  readonly #rules: Rules;
  readonly #webhookSecrets: Buffer[];
  readonly #toleranceS: number;
  readonly #maxBody: number;
  readonly #jwtSecrets: Buffer[];
  readonly #jwtIssuer: string | null;
  readonly #jwtAudience: string[];
  readonly #tenantClaim: string;
  readonly #leewayS: number;
  readonly #typeBase: string;
  /** The operator admin changes are audited under (CORESDK_ADMIN_TOKEN's: `admin`), if any. */
  readonly #operator: string | null;
  readonly #billingUrl: string | null;
  readonly #upgradeUrl: string | null;
  readonly #maxParked: number;
  readonly #maxParkedPerCustomer: number;

  readonly #audit = new AuditTrail();
  /** The log's name (checkpoint origin and key name) and Ed25519 key: each mock is a log of its own. */
  readonly #origin = `coresdk.mock/${randomBytes(6).toString('hex')}`;
  readonly #signingKey: KeyObject = generateKeyPairSync('ed25519').privateKey;
  readonly #verifierKey: VerifierKey;
  /** The newest checkpoint, signed when first asked for. */
  #checkpoint = { size: -1, note: '' };
  readonly #customers = new Map<string, string>();
  readonly #flags = new Map<string, FlagRecord>();
  readonly #processed = new Map<string, Processed>();
  readonly #parked = new Map<string, Parked>();
  readonly #objects = new Map<string, Map<string, BillingObject>>();
  #version = 0;
  #billingObjects = 0;
  readonly #refusals: Coalescer;
  readonly #denials: Coalescer;
  #closed = false;

  constructor(settings?: Settings, env: Env = process.env) {
    this.settings = settings ?? settingsFromEnv(env, { useMock: true });
    const typed = Buffer.concat([Uint8Array.of(1), spkiRaw(this.#signingKey)]);
    this.#verifierKey = VerifierKey.parse(`${this.#origin}+${keyId(this.#origin, typed).toString(16).padStart(8, '0')}+${typed.toString('base64')}`);
    this.#rules = loadRules(env);
    const secrets = splitSecrets(env.STRIPE_WEBHOOK_SECRET);
    this.#webhookSecrets = (secrets.length > 0 ? secrets : [MOCK_WEBHOOK_SECRET]).map((s) => Buffer.from(s, 'utf8'));
    this.#toleranceS = envInteger(env, 'CORESDK_WEBHOOK_TOLERANCE_S', 300);
    this.#maxBody = envInteger(env, 'CORESDK_WEBHOOK_MAX_BODY_BYTES', 1024 * 1024);
    if (this.#maxBody === 0 || this.#maxBody > MAX_BODY_LIMIT) {
      throw new Error(`CORESDK_WEBHOOK_MAX_BODY_BYTES must be between 1 and ${MAX_BODY_LIMIT} (64 MiB)`);
    }
    const jwtSecrets = splitSecrets(env.CORESDK_JWT_SECRET);
    if (jwtSecrets.some((s) => utf8Length(s) < 32)) {
      throw new Error(
        'CORESDK_JWT_SECRET: HMAC secrets must be at least 32 bytes (RFC 7518 §3.2); generate one with `openssl rand -hex 32`',
      );
    }
    this.#jwtSecrets = jwtSecrets.map((s) => Buffer.from(s, 'utf8'));
    // Untrimmed: the sidecar compares a token's `iss` with the setting exactly.
    this.#jwtIssuer = env.CORESDK_JWT_ISSUER ?? null;
    this.#jwtAudience = splitSecrets(env.CORESDK_JWT_AUDIENCE);
    this.#tenantClaim = env.CORESDK_JWT_TENANT_CLAIM ?? 'tenant_id';
    this.#leewayS = envInteger(env, 'CORESDK_JWT_LEEWAY_S', 60);
    // The settings were read from `env` unless given, and given ones win.
    this.#typeBase = this.settings.problemTypeBase;
    // As the sidecar: CORESDK_ADMIN_TOKEN is the operator `admin`, whose name an admin change
    // is audited under, the caller's actor kept as `claimed_actor`. Without it the claim is the
    // actor (the sidecar's mock mode). Tokens are not checked here, and the named operators'
    // file (CORESDK_ADMIN_TOKENS_FILE) is the sidecar's alone.
    // An empty or blank token is refused at start, as the sidecar does, rather than taken as
    // unset (which would turn operators off) or as a fall-through to the file.
    const adminToken = env.CORESDK_ADMIN_TOKEN;
    if (adminToken !== undefined && adminToken.trim() === '') {
      throw new Error('CORESDK_ADMIN_TOKEN is set but empty; unset it, or set a token of at least 16 characters');
    }
    if (adminToken !== undefined && env.CORESDK_ADMIN_TOKEN_FILE !== undefined) {
      throw new Error('CORESDK_ADMIN_TOKEN and CORESDK_ADMIN_TOKEN_FILE are one too many; set one');
    }
    this.#operator = adminToken !== undefined || env.CORESDK_ADMIN_TOKEN_FILE !== undefined ? 'admin' : null;
    this.#billingUrl = envUrl(env, 'CORESDK_BILLING_URL');
    this.#upgradeUrl = envUrl(env, 'CORESDK_UPGRADE_URL');
    this.#maxParked = envInteger(env, 'CORESDK_MAX_PARKED_EVENTS', 10_000, BigInt(MAX_PARKED_EVENTS_LIMIT));
    this.#maxParkedPerCustomer = envInteger(env, 'CORESDK_MAX_PARKED_EVENTS_PER_CUSTOMER', 100, BigInt(MAX_PARKED_EVENTS_LIMIT));
    const windowMs = envInteger(env, 'CORESDK_DENY_AUDIT_WINDOW_S', 60) * 1000;
    const write = (record: NewRecord) => {
      this.#audit.append(record, Date.now());
    };
    this.#refusals = new Coalescer(
      { event: 'billing.webhook.refused', outcome: 'rejected', keyFields: ['reason'] },
      windowMs,
      write,
    );
    this.#denials = new Coalescer(
      { event: 'auth.denied', outcome: 'denied', keyFields: ['reason', 'feature', 'subject'] },
      windowMs,
      write,
    );
    this.#seed();
  }

  /** A mock for tests: settings from `env` (not the process's), mock mode. */
  static fromEnv(env: Env = process.env): MockSidecar {
    return new MockSidecar(settingsFromEnv(env, { useMock: true }), env);
  }

  // -- problems ---------------------------------------------------------------------------------

  #problem(refusal: Refusal, instance = ''): Problem {
    const problem: Problem = {
      type: problemTypeUri(this.#typeBase, refusal.shape.slug),
      title: refusal.shape.title,
      status: refusal.shape.status,
      detail: refusal.message,
      reason: refusal.shape.reason,
    };
    if (instance !== '') problem.instance = instance;
    return problem;
  }

  #error(refusal: Refusal): ProblemError {
    const problem = this.#problem(refusal);
    const code = refusal.shape.code;
    return refusal.shape === SHAPES.flagNotFound ? new FlagNotFoundError(problem, code) : new ProblemError(problem, code);
  }

  #invalid(field: string, description: string): ProblemError {
    return this.#error(refuse.invalid([[field, description]]));
  }

  #checkId(field: string, value: string): void {
    checkId(field, value, this.#typeBase);
  }

  #checkFlagKey(field: string, key: string): void {
    checkFlagKey(key, this.#typeBase, field);
  }

  #checkText(field: string, value: string, max: number): void {
    if (trimWhiteSpace(value) === '') throw this.#invalid(field, 'is required');
    if (utf8Length(value) > max) throw this.#invalid(field, `is longer than ${max} bytes`);
  }

  #checkReason(reason: string): void {
    if (utf8Length(reason) > MAX_REASON_LEN) throw this.#invalid('reason', `is longer than ${MAX_REASON_LEN} bytes`);
  }

  #open(): void {
    if (this.#closed) throw this.#error(new Refusal(SHAPES.shuttingDown, 'the mock is closed'));
    this.#refusals.flush(false);
    this.#denials.flush(false);
  }

  // -- audit ------------------------------------------------------------------------------------

  #append(record: NewRecord, nowMs: number): StoredRecord {
    return this.#audit.append({ ...record, metadata: boundMetadata(record.metadata) }, nowMs);
  }

  async audit(options: AuditOptions): Promise<AuditRecord> {
    this.#open();
    const record = {
      tenant: options.tenantId ?? '',
      actor: options.actor ?? '',
      event: options.event ?? '',
      outcome: options.outcome ?? '',
    };
    const violations: [string, string][] = [];
    for (const [field, value, required] of [
      ['actor', record.actor, true],
      ['event', record.event, true],
      ['outcome', record.outcome, true],
      ['tenant_id', record.tenant, false],
    ] as const) {
      if (required && trimWhiteSpace(value) === '') violations.push([field, 'is required']);
      else if (utf8Length(value) > MAX_FIELD_LEN) violations.push([field, `is longer than ${MAX_FIELD_LEN} bytes`]);
    }
    // Converted as the client converts it for the wire, with the same problems.
    const metadata = options.metadata === undefined ? {} : asJson('metadata', options.metadata, this.#typeBase);
    if (metadata === null || typeof metadata !== 'object' || Array.isArray(metadata)) {
      throw new ProblemError(invalidProblem('metadata', 'must be an object', this.#typeBase), GrpcCode.INVALID_ARGUMENT);
    }
    const namespace = reservedNamespace(record.event);
    if (namespace !== null) {
      violations.push([
        'event',
        `'${namespace}.' is reserved for the sidecar's own records; name application events in a namespace of your own, e.g. 'app.'`,
      ]);
    }
    if (asciiLowercase(trimWhiteSpace(record.actor)) === WEBHOOK_ACTOR) {
      violations.push(['actor', `'${WEBHOOK_ACTOR}' is reserved for verified Stripe deliveries`]);
    }
    const size = utf8Length(jcs(metadata));
    if (size > MAX_METADATA_BYTES) {
      violations.push(['metadata', `is ${size} bytes canonicalised, over the ${MAX_METADATA_BYTES}-byte bound`]);
    }
    if (violations.length > 0) throw this.#error(refuse.invalid(violations));
    if (record.tenant !== '') this.#checkId('tenant_id', record.tenant);
    const stored = publicRecord(this.#audit.append({ ...record, metadata }, Date.now()));
    return options.includeProof === true ? { ...stored, inclusionProof: this.#prove(stored.seq, 0) } : stored;
  }

  async auditQuery(query: AuditQuery = {}): Promise<AuditRecord[]> {
    this.#open();
    const tenant = query.tenantId ?? '';
    if (tenant !== '') this.#checkId('tenant_id', tenant);
    const limit = query.limit ?? 1000;
    const out: AuditRecord[] = [];
    for (const record of this.#audit.range(0, this.#audit.headSeq)) {
      if (out.length >= limit) break;
      if (tenant !== '' && record.tenant !== tenant) continue;
      if (query.eventPrefix && !record.event.startsWith(query.eventPrefix)) continue;
      if (query.outcome && record.outcome !== query.outcome) continue;
      out.push(publicRecord(record));
    }
    return out;
  }

  /** The mock always checks every record it keeps (it signs no checkpoint to start from). */
  async auditVerify(_options: { full?: boolean } = {}): Promise<VerifyResult> {
    this.#open();
    return this.#audit.verify();
  }

  /** The verifier key of this mock's checkpoints, as `coresdk audit public-key` prints the sidecar's. */
  get auditVerifierKey(): string {
    return this.#verifierKey.toString();
  }

  /** MTH(D[lo:hi]) and the proofs, with the mock's capacity problem for dropped records. */
  #tree<T>(compute: (trail: AuditTrail) => T): T {
    try {
      return compute(this.#audit);
    } catch (e) {
      if (e instanceof DroppedLeaves) throw this.#capacity('audit records (the proof needs hashes of dropped ones)', MAX_AUDIT_RECORDS);
      throw e;
    }
  }

  /**
   * A checkpoint of the current tree (the newest, signed when first asked for). As the sidecar,
   * none of the empty log: it signs its first checkpoint after the first record.
   */
  #signCheckpoint(): { size: number; note: string } {
    const size = this.#audit.headSeq;
    if (size === 0) {
      throw this.#error(
        new Refusal(
          SHAPES.checkpointNotFound,
          'no audit checkpoint has been signed yet: the first is signed within CORESDK_AUDIT_CHECKPOINT_INTERVAL_S of the first record',
        ),
      );
    }
    if (this.#checkpoint.size !== size) {
      const root = this.#tree((trail) => trail.subtree(0, size));
      const text = `${this.#origin}\n${size}\n${root.toString('base64')}\n`;
      const id = Buffer.alloc(4);
      id.writeUInt32BE(this.#verifierKey.keyId);
      const signature = Buffer.concat([id, signEd25519(null, Buffer.from(text, 'utf8'), this.#signingKey)]);
      this.#checkpoint = { size, note: `${text}\n\u2014 ${this.#origin} ${signature.toString('base64')}\n` };
    }
    return this.#checkpoint;
  }

  /** As the sidecar's App::inclusion_proof, with its errors; tree size 0 is the newest checkpoint's. */
  #prove(seq: number, treeSize: number): InclusionProof {
    if (seq === 0) throw this.#invalid('seq', 'is required (records are numbered from 1)');
    let checkpoint = '';
    let size = treeSize;
    if (size === 0) ({ size, note: checkpoint } = this.#signCheckpoint());
    if (size < seq) throw this.#invalid('tree_size', `is ${size}, smaller than the seq ${seq} it must hold`);
    this.#withinLog(size);
    return { leafIndex: seq - 1, treeSize: size, hashes: this.#tree((trail) => trail.path(seq - 1, 0, size)), checkpoint };
  }

  #withinLog(treeSize: number): void {
    const records = this.#audit.headSeq;
    if (treeSize > records) {
      throw this.#error(
        new Refusal(SHAPES.outOfRange, `the audit log holds ${records} records, fewer than the tree size ${treeSize} asked for`),
      );
    }
  }

  async auditCheckpoint(): Promise<string> {
    this.#open();
    return this.#signCheckpoint().note;
  }

  async auditInclusionProof(seq: number, treeSize = 0): Promise<InclusionProof> {
    this.#open();
    return this.#prove(seq, treeSize);
  }

  async auditConsistencyProof(fromSize: number, toSize = 0): Promise<ConsistencyProof> {
    this.#open();
    const to = toSize === 0 ? this.#signCheckpoint().size : toSize;
    if (fromSize > to) throw this.#invalid('from_size', `is ${fromSize}, larger than to_size ${to}`);
    this.#withinLog(to);
    const hashes = fromSize === 0 || fromSize === to ? [] : this.#tree((trail) => trail.subproof(fromSize, 0, to, true));
    return { fromSize, toSize: to, hashes };
  }

  // -- webhooks ---------------------------------------------------------------------------------

  async handleStripeWebhook(rawBody: Buffer | Uint8Array | string, signatureHeader: string, options: WebhookOptions = {}): Promise<WebhookResult> {
    const result = await this.#handleStripeWebhook(rawBody, signatureHeader);
    return options.includeProof === true ? { ...result, inclusionProof: this.#prove(result.auditSeq, 0) } : result;
  }

  async #handleStripeWebhook(rawBody: Buffer | Uint8Array | string, signatureHeader: string): Promise<WebhookResult> {
    this.#open();
    const payload = webhookPayload(rawBody, this.#typeBase);
    let event: StripeEvent;
    try {
      if (payload.length > this.#maxBody) throw refuse.payloadTooLarge(payload.length, this.#maxBody);
      const signedAt = this.#verifySignature(payload, signatureHeader ?? '');
      event = parseEvent(payload, signedAt, true);
    } catch (e) {
      if (!(e instanceof Refusal)) throw e;
      // Anyone can send these: coalesced per reason, as the sidecar.
      this.#refusals.admit(JSON.stringify([e.shape.reason]), e.shape.reason, () => {
        const metadata: JsonObject = { reason: e.shape.reason, detail: e.message, payload_bytes: payload.length };
        const claimed = claimedIdentity(payload);
        if (claimed.id !== undefined) metadata.claimed_event_id = claimed.id;
        if (claimed.type !== undefined) metadata.claimed_event_type = claimed.type;
        return {
          tenant: '',
          actor: WEBHOOK_ACTOR,
          event: 'billing.webhook.refused',
          outcome: 'rejected',
          metadata: boundMetadata(metadata),
        };
      });
      throw this.#error(e);
    }
    return this.#answer(this.#apply(event, { actor: WEBHOOK_ACTOR, reason: null }, null, Date.now()));
  }

  async replayEvent(payload: Buffer | Uint8Array | string, options: { reason: string }): Promise<WebhookResult> {
    this.#open();
    this.#checkText('reason', options?.reason ?? '', MAX_REASON_LEN);
    const bytes = webhookPayload(payload, this.#typeBase);
    let event: StripeEvent;
    try {
      if (bytes.length > this.#maxBody) throw refuse.payloadTooLarge(bytes.length, this.#maxBody);
      event = parseEvent(bytes, Math.floor(Date.now() / 1000), false);
    } catch (e) {
      if (e instanceof Refusal) throw this.#error(e);
      throw e;
    }
    return this.#answer(
      this.#apply(event, { actor: REPLAY_ACTOR, reason: options.reason, operator: this.#operator }, null, Date.now()),
    );
  }

  #answer(answer: WebhookResult | Refusal): WebhookResult {
    if (answer instanceof Refusal) throw this.#error(answer);
    return answer;
  }

  /** `t=<unix>,v1=<hex>[,v1=<hex>…]` over the raw payload; returns the signed timestamp. */
  #verifySignature(payload: Buffer, header: string): number {
    const trimmed = trimWhiteSpace(header);
    if (trimmed === '') throw refuse.signatureMissing();
    if (utf8Length(trimmed) > MAX_HEADER_LEN) throw refuse.signatureMalformed('header is too long');
    let timestamp: bigint | null = null;
    const v1: Buffer[] = [];
    for (const item of trimmed.split(',')) {
      const pair = trimWhiteSpace(item);
      const at = pair.indexOf('=');
      if (at < 0) throw refuse.signatureMalformed("an item has no '='");
      const scheme = trimWhiteSpace(pair.slice(0, at));
      const value = trimWhiteSpace(pair.slice(at + 1));
      if (scheme === 't') {
        if (timestamp !== null) throw refuse.signatureMalformed('more than one timestamp');
        if (!/^[0-9]+$/.test(value)) throw refuse.signatureMalformed('the timestamp is not a number');
        timestamp = BigInt(value);
        if (timestamp > 9_223_372_036_854_775_807n) throw refuse.signatureMalformed('the timestamp is out of range');
      } else if (scheme === 'v1') {
        if (value === '') throw refuse.signatureMalformed('an empty v1 signature');
        if (utf8Length(value) !== 64) throw refuse.signatureMalformed('a v1 signature is not 64 hex characters');
        if (!/^[0-9a-fA-F]{64}$/.test(value)) throw refuse.signatureMalformed('a v1 signature is not hexadecimal');
        v1.push(Buffer.from(value, 'hex'));
      }
    }
    if (timestamp === null) throw refuse.signatureMalformed('no timestamp (t=)');
    if (v1.length === 0) throw refuse.signatureNoV1();
    let matched = false;
    for (const secret of this.#webhookSecrets) {
      const expected = createHmac('sha256', secret).update(`${timestamp}.`).update(payload).digest();
      for (const candidate of v1) matched = timingSafeEqual(expected, candidate) || matched;
    }
    if (!matched) throw refuse.signatureMismatch();
    const skew = BigInt(Math.floor(Date.now() / 1000)) - timestamp;
    if ((skew < 0n ? -skew : skew) > BigInt(this.#toleranceS)) throw refuse.signatureTolerance(skew, this.#toleranceS);
    return Number(timestamp);
  }

  #baseMetadata(event: StripeEvent, parkedAtMs: number | null): JsonObject {
    const metadata: JsonObject = {
      event_id: event.id,
      event_type: event.type,
      created: event.created,
      livemode: event.livemode,
    };
    const customer = customerId(event);
    if (customer !== null) metadata.customer = customer;
    const objectId = objectStr(event, 'id');
    if (objectId !== null) metadata.object_id = objectId;
    if (parkedAtMs !== null) metadata.parked_at_ms = parkedAtMs;
    return metadata;
  }

  #auditWebhook(delivery: Delivery, tenant: string, event: StripeEvent, outcome: string, metadata: JsonObject, nowMs: number): StoredRecord {
    if (delivery.reason !== null) metadata.reason = delivery.reason;
    if (delivery.operator != null) metadata.operator = delivery.operator;
    return this.#append({ tenant, actor: delivery.actor, event: `billing.${event.type}`, outcome, metadata }, nowMs);
  }

  /** The sidecar's `apply`: dedup, tenant, rules, ordering, flags, audit. */
  #apply(event: StripeEvent, delivery: Delivery, parkedAtMs: number | null, nowMs: number): WebhookResult | Refusal {
    const first = this.#processed.get(event.id);
    if (first !== undefined) {
      const metadata = this.#baseMetadata(event, parkedAtMs);
      metadata.first_outcome = first.outcome;
      metadata.first_audit_seq = first.auditSeq;
      const record = this.#auditWebhook(delivery, first.tenant, event, 'duplicate', metadata, nowMs);
      return {
        eventId: event.id,
        eventType: event.type,
        tenantId: first.tenant,
        outcome: 'duplicate',
        flagChanges: [],
        auditSeq: record.seq,
        staleFlags: [],
      };
    }
    const effect = this.#evaluate(event);
    const metadata = this.#baseMetadata(event, parkedAtMs);
    let mappingRecorded = false;
    let tenant: string | null = null;
    const resolved = this.#resolveTenant(event);
    if (resolved.kind === 'tenant') tenant = resolved.tenant;
    else if (resolved.kind === 'mapped') {
      const customer = customerId(event);
      metadata.mapped_customer = customer;
      // An event applied from parking never maps (nor unparks): the recursion is one level deep.
      if (parkedAtMs === null && customer !== null) {
        const applied = this.#applyParked(customer, event.id, nowMs);
        if (applied > 0) metadata.parked_events_applied = applied;
      }
      mappingRecorded = true;
      tenant = resolved.tenant;
    } else if (resolved.kind === 'refused') {
      metadata.mapping_refused = true;
      metadata.conflicting_client_reference_id = resolved.claimed;
      tenant = resolved.tenant;
    }

    if (tenant === null) {
      if (effect.kind === 'ignored') return this.#finish(delivery, event, '', 'ignored', [], [], metadata, nowMs);
      const customer = customerId(event);
      let refusal: Refusal;
      if (customer !== null) {
        this.#park(event, customer, delivery, metadata, nowMs);
        refusal = refuse.unknownCustomer(customer);
      } else refusal = refuse.noTenant();
      metadata.refusal = refusal.message;
      this.#auditWebhook(delivery, '', event, 'rejected', metadata, nowMs);
      return refusal;
    }

    const resolution = this.#resolveObjects(tenant, event, effect);
    let stale: string[] = [];
    const staleObject = resolution.stale !== null;
    if (resolution.stale !== null) {
      metadata.stale_object = resolution.stale.object;
      metadata.newer_event_id = resolution.stale.newerEventId;
      stale = [...resolution.stale.keys];
    }
    if (resolution.wanted.length === 0 && !mappingRecorded) {
      return this.#finish(delivery, event, tenant, stale.length === 0 ? 'ignored' : 'stale', [], stale, metadata, nowMs);
    }
    const changes: FlagChange[] = [];
    const decidingRules: JsonObject = {};
    for (const wanted of resolution.wanted) {
      const mapKey = flagMapKey(tenant, wanted.key);
      const current = this.#flags.get(mapKey);
      if (current !== undefined) {
        const byOrder = compareOrder(current.order, wanted.order);
        const adminHolds = current.origin === 'admin' && byOrder === 0;
        if (byOrder > 0 || adminHolds) {
          if (!stale.includes(wanted.key)) stale.push(wanted.key);
          continue;
        }
        if (sameFlagValue(current.value, wanted.value)) {
          if (byOrder < 0) current.order = wanted.order;
          continue;
        }
      } else if (this.#flags.size >= MAX_FLAGS) {
        throw this.#capacity('flags', MAX_FLAGS);
      }
      this.#version += 1;
      this.#flags.set(mapKey, {
        value: wanted.value,
        version: this.#version,
        order: wanted.order,
        origin: wanted.origin,
        updatedAtMs: nowMs,
        updatedBy: delivery.actor,
        sourceEventId: event.id,
      });
      decidingRules[wanted.key] = wanted.rule;
      changes.push({
        key: wanted.key,
        oldValue: current === undefined ? null : storedFlagValue(current.value),
        newValue: wanted.value,
        version: this.#version,
      });
    }
    if (Object.keys(decidingRules).length > 0) metadata.rules = decidingRules;
    const outcome = !mappingRecorded && (staleObject || (changes.length === 0 && stale.length > 0)) ? 'stale' : 'applied';
    return this.#finish(delivery, event, tenant, outcome, changes, stale, metadata, nowMs);
  }

  #capacity(what: string, max: number): ProblemError {
    return this.#error(new Refusal(SHAPES.full, `the mock keeps at most ${max} ${what}; it is a mock, not a store`));
  }

  #finish(
    delivery: Delivery,
    event: StripeEvent,
    tenant: string,
    outcome: WebhookOutcome,
    changes: FlagChange[],
    stale: string[],
    metadata: JsonObject,
    nowMs: number,
  ): WebhookResult {
    if (changes.length > 0) metadata.flags = changes.map((c) => `${c.key}=${displayFlagValue(c.newValue)}`);
    if (stale.length > 0) metadata.stale_flags = [...stale];
    const record = this.#auditWebhook(delivery, tenant, event, outcome, metadata, nowMs);
    this.#processed.set(event.id, { tenant, outcome, auditSeq: record.seq, eventType: event.type });
    if (this.#processed.size > MAX_PROCESSED_EVENTS) {
      const oldest = this.#processed.keys().next();
      if (!oldest.done) this.#processed.delete(oldest.value);
    }
    return { eventId: event.id, eventType: event.type, tenantId: tenant, outcome, flagChanges: changes, auditSeq: record.seq, staleFlags: stale };
  }

  /**
   * The mapping first; a checkout's valid `client_reference_id` maps only a customer with no
   * tenant (moving one is an admin's decision); then a valid `metadata.tenant_id`.
   */
  #resolveTenant(
    event: StripeEvent,
  ):
    | { kind: 'tenant' | 'mapped'; tenant: string }
    | { kind: 'refused'; tenant: string; claimed: string }
    | { kind: 'none' } {
    const customer = customerId(event);
    const candidate = event.type === 'checkout.session.completed' ? objectStr(event, 'client_reference_id') : null;
    const reference = candidate !== null && idDefect(candidate) === null ? candidate : null;
    if (customer !== null) {
      const tenant = this.#customers.get(customer);
      if (tenant !== undefined) {
        return reference !== null && reference !== tenant ? { kind: 'refused', tenant, claimed: reference } : { kind: 'tenant', tenant };
      }
    }
    if (customer !== null && reference !== null && idDefect(customer) === null) {
      this.#mapCustomer(customer, reference);
      return { kind: 'mapped', tenant: reference };
    }
    const fallback = metadataTenant(event);
    return fallback !== null && idDefect(fallback) === null ? { kind: 'tenant', tenant: fallback } : { kind: 'none' };
  }

  #mapCustomer(customer: string, tenant: string): string | undefined {
    const previous = this.#customers.get(customer);
    if (previous === undefined && this.#customers.size >= MAX_CUSTOMERS) throw this.#capacity('customer mappings', MAX_CUSTOMERS);
    this.#customers.set(customer, tenant);
    return previous;
  }

  #evaluate(event: StripeEvent): Effect {
    const status = subscriptionStatus(event);
    if (status !== null && !(SUBSCRIPTION_STATUSES as readonly string[]).includes(status)) return { kind: 'ignored' };
    const settings: Setting[] = [];
    for (const rule of this.#rules.rules) {
      if (!rule.events.includes(event.type)) continue;
      if (rule.status.length > 0 && (status === null || !rule.status.includes(status))) continue;
      const planMatches = rule.plans.length === 0 || onPlan(event, rule.plans);
      if (rule.entitlements) {
        if (!planMatches) continue;
        const keys = [...new Set(entitlementLookupKeys(event).filter(isValidFlagKey))].sort();
        return { kind: 'entitlements', keys, rule: rule.name };
      }
      for (const [key, value] of planMatches ? rule.set : rule.otherwise) {
        const at = settings.findIndex((s) => s.key === key);
        if (at >= 0) settings.splice(at, 1);
        settings.push({ key, value, rule: rule.name });
      }
    }
    return settings.length === 0 ? { kind: 'ignored' } : { kind: 'set', settings };
  }

  // -- billing objects (src/ops/objects.rs) ------------------------------------------------------

  /** Stores a billing object; a new one counts against the mock's bound. */
  #putObject(tenant: string, name: string, object: BillingObject): void {
    const objects = this.#objectsOf(tenant);
    if (!objects.has(name)) {
      if (this.#billingObjects >= MAX_BILLING_OBJECTS) throw this.#capacity('billing objects', MAX_BILLING_OBJECTS);
      this.#billingObjects += 1;
    }
    objects.set(name, object);
  }

  #objectsOf(tenant: string): Map<string, BillingObject> {
    let objects = this.#objects.get(tenant);
    if (objects === undefined) {
      objects = new Map();
      this.#objects.set(tenant, objects);
    }
    return objects;
  }

  #resolveObjects(
    tenant: string,
    event: StripeEvent,
    effect: Effect,
  ): { wanted: Wanted[]; stale: { object: string; newerEventId: string; keys: string[] } | null } {
    const order = eventOrder(event);
    if (effect.kind === 'ignored') return { wanted: [], stale: null };
    if (effect.kind === 'entitlements') return this.#entitlements(tenant, order, effect.keys, effect.rule);
    if (SUBSCRIPTION_STATE_EVENTS.includes(event.type)) return this.#subscription(tenant, event, order, effect.settings);
    return {
      wanted: effect.settings.map((s) => ({ key: s.key, value: s.value, origin: 'rule', rule: s.rule, order })),
      stale: null,
    };
  }

  #entitlements(tenant: string, order: EventOrder, keyList: string[], rule: string) {
    const objects = this.#objectsOf(tenant);
    const stored = objects.get('entitlements');
    const known = new Set(stored?.known ?? []);
    const keys = [...new Set(keyList)].sort();
    const firstNamed: string[] = [];
    for (const key of keys) {
      if (!known.has(key)) {
        known.add(key);
        firstNamed.push(key);
      }
    }
    const verdict = (key: string, on: boolean, at: EventOrder): Wanted => ({
      key,
      value: on,
      origin: 'entitlements',
      rule,
      order: at,
    });
    if (stored !== undefined && compareOrder(stored.order, order) > 0) {
      if (firstNamed.length > 0) stored.known = known;
      return {
        wanted: firstNamed.map((key) => verdict(key, false, stored.order)),
        stale: { object: 'entitlements', newerEventId: stored.order.eventId, keys },
      };
    }
    const named = new Set(keys);
    this.#putObject(tenant, 'entitlements', {
      kind: 'entitlements',
      order,
      standing: 0,
      settings: [],
      keys: named,
      known,
    });
    return { wanted: [...known].sort().map((key) => verdict(key, named.has(key), order)), stale: null };
  }

  #subscription(tenant: string, event: StripeEvent, order: EventOrder, settings: Setting[]) {
    const id = Array.from(objectStr(event, 'id') ?? '').slice(0, MAX_OBJECT_ID_LEN).join('');
    const name = `subscription:${id}`;
    const objects = this.#objectsOf(tenant);
    const stored = objects.get(name);
    const keys = new Set(stored?.keys ?? []);
    const before = keys.size;
    for (const s of settings) keys.add(s.key);
    const keysGrew = keys.size > before;
    let stale: { object: string; newerEventId: string; keys: string[] } | null = null;
    if (stored !== undefined && compareOrder(stored.order, order) > 0) {
      if (keysGrew) stored.keys = keys;
      stale = { object: name, newerEventId: stored.order.eventId, keys: settings.map((s) => s.key) };
    } else {
      this.#putObject(tenant, name, {
        kind: 'subscription',
        order,
        standing: standingOf(subscriptionStatus(event)),
        settings,
        keys,
        known: new Set(),
      });
    }
    const wanted = stale === null || keysGrew ? this.#subscriptionFlags(tenant) : [];
    return { wanted, stale };
  }

  #subscriptionFlags(tenant: string): Wanted[] {
    const rows = [...this.#objectsOf(tenant).entries()]
      .filter(([, row]) => row.kind === 'subscription')
      .sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0))
      .map(([, row]) => row);
    if (rows.length === 0) return [];
    const mark = rows.reduce((max, row) => (compareOrder(row.order, max) > 0 ? row.order : max), rows[0]!.order);
    const best = new Map<string, { standing: number; order: EventOrder; value: FlagValue; rule: string }>();
    const keys = new Set<string>();
    for (const row of rows) {
      for (const key of row.keys) keys.add(key);
      for (const setting of row.settings) {
        const current = best.get(setting.key);
        const better =
          current === undefined ||
          current.standing < row.standing ||
          (current.standing === row.standing && compareOrder(current.order, row.order) < 0);
        if (better) best.set(setting.key, { standing: row.standing, order: row.order, value: setting.value, rule: setting.rule });
      }
    }
    const wanted: Wanted[] = [];
    for (const key of [...keys].sort()) {
      const chosen = best.get(key);
      if (chosen !== undefined) wanted.push({ key, value: chosen.value, origin: 'rule', rule: chosen.rule, order: mark });
      else if (this.#rules.catalog.has(key)) {
        wanted.push({ key, value: this.#rules.catalog.get(key) as FlagValue, origin: 'rule', rule: NO_SUBSCRIPTION_SETS_IT, order: mark });
      }
    }
    return wanted;
  }

  // -- parking (src/ops/parking.rs) -------------------------------------------------------------

  #park(event: StripeEvent, customer: string, delivery: Delivery, metadata: JsonObject, nowMs: number): void {
    this.#expireParked(nowMs, EXPIRE_PER_PARKING);
    const existing = this.#parked.get(event.id);
    let notParked: string | null = null;
    let parkedAt: number | null = existing?.parkedAtMs ?? null;
    if (existing === undefined) {
      if (idDefect(customer) !== null) notParked = 'the customer id is not one a tenant can be mapped to';
      else if (this.#maxParked === 0 || this.#maxParkedPerCustomer === 0) {
        notParked = 'parking is off (CORESDK_MAX_PARKED_EVENTS or CORESDK_MAX_PARKED_EVENTS_PER_CUSTOMER is 0)';
      } else if (this.#parked.size >= this.#maxParked) {
        notParked = `${this.#maxParked} events are parked, the most kept (CORESDK_MAX_PARKED_EVENTS)`;
      } else if (this.#parkedOf(customer).length >= this.#maxParkedPerCustomer) {
        notParked = `${this.#maxParkedPerCustomer} events of this customer are parked, the most kept per customer (CORESDK_MAX_PARKED_EVENTS_PER_CUSTOMER)`;
      } else {
        this.#parked.set(event.id, { event, customer, actor: delivery.actor, reason: delivery.reason, parkedAtMs: nowMs });
        parkedAt = nowMs;
      }
    }
    if (parkedAt !== null) {
      metadata.parked = true;
      metadata.parked_at_ms = parkedAt;
    } else {
      metadata.parked = false;
      metadata.not_parked = notParked;
    }
  }

  /** A customer's parked events in event order. */
  #parkedOf(customer: string): Parked[] {
    return [...this.#parked.values()]
      .filter((p) => p.customer === customer)
      .sort((a, b) => compareOrder(eventOrder(a.event), eventOrder(b.event)));
  }

  #expireParked(nowMs: number, most: number): void {
    const before = nowMs - PARKED_RETENTION_MS;
    const expired = [...this.#parked.values()]
      .filter((p) => p.parkedAtMs < before)
      .sort((a, b) => a.parkedAtMs - b.parkedAtMs)
      .slice(0, most);
    for (const parked of expired) {
      this.#parked.delete(parked.event.id);
      this.#auditDropped(parked, nowMs);
    }
  }

  #auditDropped(parked: Parked, nowMs: number): void {
    this.#append(
      {
        tenant: '',
        actor: PARKING_ACTOR,
        event: `billing.${parked.event.type}`,
        outcome: 'expired',
        metadata: {
          event_id: parked.event.id,
          event_type: parked.event.type,
          created: parked.event.created,
          customer: parked.customer,
          parked_at_ms: parked.parkedAtMs,
          reason: `parked for more than ${PARKED_RETENTION_MS / (24 * 60 * 60 * 1000)} days without a tenant for its customer; replay it to apply it`,
        },
      },
      nowMs,
    );
  }

  /** Applies the customer's parked events in event order, each as its own delivery. */
  #applyParked(customer: string, except: string | null, nowMs: number): number {
    let applied = 0;
    for (const { event } of this.#parkedOf(customer)) {
      const parked = this.#parked.get(event.id);
      if (parked === undefined) continue;
      this.#parked.delete(event.id);
      if (parked.event.id === except) continue;
      if (parked.parkedAtMs < nowMs - PARKED_RETENTION_MS) {
        this.#auditDropped(parked, nowMs);
        continue;
      }
      const answer = this.#apply(parked.event, { actor: parked.actor, reason: parked.reason }, parked.parkedAtMs, nowMs);
      if (!(answer instanceof Refusal)) applied += 1;
    }
    return applied;
  }

  // -- tenants ----------------------------------------------------------------------------------

  /** The sidecar seeds its configured (here: mock) tenants with one audit record. */
  #seed(): void {
    const configured = Object.entries(MOCK_TENANTS);
    for (const [customer, tenant] of configured) this.#customers.set(customer, tenant);
    this.#append(
      {
        tenant: '',
        actor: SEED_ACTOR,
        event: 'tenant.mappings_seeded',
        outcome: 'applied',
        metadata: {
          configured: configured.length,
          added: configured.length,
          unchanged: 0,
          kept_runtime: 0,
          kept_unmapped: 0,
          overridden: 0,
        },
      },
      Date.now(),
    );
  }

  async mapCustomer(customerId: string, tenantId: string, options: ChangeOptions): Promise<number> {
    this.#open();
    this.#checkId('customer_id', customerId);
    this.#checkId('tenant_id', tenantId);
    this.#checkText('actor', options?.actor ?? '', MAX_ACTOR_LEN);
    const reason = options.reason ?? '';
    this.#checkReason(reason);
    const nowMs = Date.now();
    const previous = this.#mapCustomer(customerId, tenantId);
    if (previous === tenantId) return 0;
    const metadata: JsonObject = { customer: customerId };
    if (previous !== undefined) metadata.previous_tenant = previous;
    const parked = this.#parkedOf(customerId).length;
    if (parked > 0) metadata.parked_events = parked;
    if (reason !== '') metadata.reason = reason;
    if (this.#operator !== null) metadata.claimed_actor = options.actor;
    this.#append({ tenant: tenantId, actor: this.#operator ?? options.actor, event: 'tenant.customer_mapped', outcome: 'applied', metadata }, nowMs);
    return parked > 0 ? this.#applyParked(customerId, null, nowMs) : 0;
  }

  async resolveCustomer(customerId: string): Promise<string | null> {
    this.#open();
    this.#checkId('customer_id', customerId);
    return this.#customers.get(customerId) ?? null;
  }

  // -- flags ------------------------------------------------------------------------------------

  #flag(tenantId: string, key: string): Flag | null {
    const own = this.#flags.get(flagMapKey(tenantId, key));
    if (own !== undefined) {
      return { tenantId, key, value: structuredClone(own.value), version: own.version, isDefault: false, updatedBy: own.updatedBy };
    }
    if (this.#rules.catalog.has(key)) {
      const value = this.#rules.catalog.get(key) as FlagValue;
      return { tenantId, key, value: structuredClone(value), version: 0, isDefault: true, updatedBy: '' };
    }
    return null;
  }

  async isEnabled(tenantId: string, key: string): Promise<boolean> {
    this.#open();
    this.#checkId('tenant_id', tenantId);
    this.#checkFlagKey('key', key);
    return this.#flag(tenantId, key)?.value === true;
  }

  async getFlag(tenantId: string, key: string): Promise<Flag> {
    this.#open();
    this.#checkId('tenant_id', tenantId);
    this.#checkFlagKey('key', key);
    const flag = this.#flag(tenantId, key);
    if (flag === null) {
      throw this.#error(new Refusal(SHAPES.flagNotFound, `flag '${quoted(key)}' is not defined`));
    }
    return flag;
  }

  async getFlags(tenantId: string): Promise<Record<string, Flag>> {
    this.#open();
    this.#checkId('tenant_id', tenantId);
    const keys = new Set(this.#rules.catalog.keys());
    const prefix = flagMapKey(tenantId, '');
    for (const mapKey of this.#flags.keys()) if (mapKey.startsWith(prefix)) keys.add(mapKey.slice(prefix.length));
    const out: Record<string, Flag> = {};
    for (const key of [...keys].sort()) {
      const flag = this.#flag(tenantId, key);
      if (flag !== null) out[key] = flag;
    }
    return out;
  }

  async setFlag(tenantId: string, key: string, value: FlagValue, options: ChangeOptions): Promise<Flag> {
    this.#open();
    this.#checkId('tenant_id', tenantId);
    this.#checkFlagKey('key', key);
    this.#checkText('actor', options?.actor ?? '', MAX_ACTOR_LEN);
    const reason = options.reason ?? '';
    this.#checkReason(reason);
    if (typeof value === 'number' && !Number.isFinite(value)) throw this.#invalid('value', 'numbers must be finite');
    // Anything else is JSON as the client sends it (`null` and objects as a JSON value).
    const stored: FlagValue =
      typeof value === 'boolean' || typeof value === 'string' || typeof value === 'number' ? value : asJson('value', value, this.#typeBase);
    const mapKey = flagMapKey(tenantId, key);
    const current = this.#flags.get(mapKey);
    if (current === undefined && this.#flags.size >= MAX_FLAGS) throw this.#capacity('flags', MAX_FLAGS);
    const nowMs = Date.now();
    this.#version += 1;
    this.#flags.set(mapKey, {
      value: stored,
      version: this.#version,
      order: current?.order ?? ORDER_ZERO,
      origin: 'admin',
      updatedAtMs: nowMs,
      updatedBy: this.#operator ?? options.actor,
      sourceEventId: '',
    });
    const metadata: JsonObject = {
      flag: key,
      // The sidecar reads the old value back from its store, whose JSON form writes -0 as 0.
      old_value: current === undefined ? null : displayFlagValue(storedFlagValue(current.value)),
      new_value: displayFlagValue(stored),
      version: this.#version,
    };
    if (reason !== '') metadata.reason = reason;
    if (this.#operator !== null) metadata.claimed_actor = options.actor;
    const actor = this.#operator ?? options.actor;
    this.#append({ tenant: tenantId, actor, event: 'flag.set', outcome: 'applied', metadata }, nowMs);
    return { tenantId, key, value: structuredClone(stored), version: this.#version, isDefault: false, updatedBy: actor };
  }

  async explainFlag(tenantId: string, key: string): Promise<FlagExplanation> {
    const flag = await this.getFlag(tenantId, key);
    const record = this.#flags.get(flagMapKey(tenantId, key));
    const none: FlagExplanation = { flag, event: null, admin: null, rule: '', staleEvents: [], newestEvent: null };
    if (record === undefined) return none;
    const head = this.#audit.headSeq;
    const oldest = Math.max(0, head - QUERY_SCAN_WINDOW);
    let event: FlagEvent | null = null;
    let admin: AdminFlagChange | null = null;
    let rule = '';
    let setterSeq: number;
    if (record.sourceEventId === '') {
      let found: StoredRecord | undefined;
      for (const r of this.#audit.range(oldest, head)) {
        if (r.tenant !== tenantId || !r.event.startsWith('flag.set')) continue;
        if (r.timeMs < record.updatedAtMs || r.timeMs >= record.updatedAtMs + 1 || r.event !== 'flag.set') continue;
        const meta = metadataOf(r);
        if (meta.flag === key && meta.version === record.version) {
          found = r;
          break;
        }
      }
      const reason = found === undefined ? undefined : metadataOf(found).reason;
      admin = {
        actor: record.updatedBy,
        reason: typeof reason === 'string' ? reason : '',
        version: record.version,
        auditSeq: found?.seq ?? 0,
      };
      setterSeq = admin.auditSeq;
    } else {
      const unrecorded: FlagEvent = { eventId: record.sourceEventId, eventType: '', created: 0, auditSeq: 0, actor: record.updatedBy, reason: '' };
      const delivered = this.#deliveredEvent(key, unrecorded);
      event = delivered.trace;
      rule = delivered.rule;
      setterSeq = event.auditSeq;
    }
    const mark = record.order.eventId;
    const newestEvent =
      mark === '' || mark === record.sourceEventId
        ? null
        : this.#deliveredEvent(key, { eventId: mark, eventType: '', created: 0, auditSeq: 0, actor: '', reason: '' }).trace;
    const staleEvents: FlagEvent[] = [];
    for (const r of this.#audit.range(Math.max(setterSeq, oldest), head)) {
      if (r.tenant !== tenantId || !r.event.startsWith('billing.') || r.timeMs < record.updatedAtMs) continue;
      const staleFlags = metadataOf(r).stale_flags;
      if (Array.isArray(staleFlags) && staleFlags.includes(key)) staleEvents.push(this.#eventTrace(r));
    }
    return { flag, event, admin, rule, staleEvents: staleEvents.slice(-STALE_SHOWN), newestEvent };
  }

  #deliveredEvent(key: string, unrecorded: FlagEvent): { trace: FlagEvent; rule: string } {
    const processed = this.#processed.get(unrecorded.eventId);
    if (processed === undefined) return { trace: unrecorded, rule: '' };
    const record = this.#audit.at(processed.auditSeq);
    if (record === undefined) return { trace: { ...unrecorded, eventType: processed.eventType }, rule: '' };
    const rules = asObject(metadataOf(record).rules);
    const rule = rules?.[key];
    return { trace: this.#eventTrace(record), rule: typeof rule === 'string' ? rule : '' };
  }

  #eventTrace(record: StoredRecord): FlagEvent {
    const meta = metadataOf(record);
    const text = (field: string) => (typeof meta[field] === 'string' ? (meta[field] as string) : '');
    return {
      eventId: text('event_id'),
      eventType: text('event_type'),
      created: typeof meta.created === 'number' ? meta.created : 0,
      auditSeq: record.seq,
      actor: record.actor,
      reason: text('reason'),
    };
  }

  // -- auth -------------------------------------------------------------------------------------

  /** The sidecar's TokenVerifier (src/auth/token.rs over jsonwebtoken), in its order of checks. */
  #verify(token: string): Claims {
    let text = trimWhiteSpace(token);
    if (text.startsWith('Bearer ')) text = trimWhiteSpace(text.slice('Bearer '.length));
    if (this.#jwtSecrets.length === 0) {
      throw new TokenError(
        'token verification is not configured (set CORESDK_JWT_SECRET, CORESDK_JWT_PUBLIC_KEY_FILE or CORESDK_JWKS_FILE)',
      );
    }
    if (text === '') throw new TokenError('no token was given');
    if (utf8Length(text) > MAX_TOKEN_LEN) throw new TokenError(MALFORMED);
    // Split from the right, as the library: the header is all before the second-to-last dot.
    const lastDot = text.lastIndexOf('.');
    const secondDot = lastDot < 0 ? -1 : text.lastIndexOf('.', lastDot - 1);
    if (secondDot < 0) throw new TokenError(MALFORMED);
    const headerPart = text.slice(0, secondDot);
    const payloadPart = text.slice(secondDot + 1, lastDot);
    const signaturePart = text.slice(lastDot + 1);
    const header = tokenJson(b64url(headerPart), "the token's algorithm is not accepted");
    const alg = asObject(header)?.alg;
    if (typeof alg !== 'string' || !KNOWN_ALGORITHMS.has(alg)) throw new TokenError("the token's algorithm is not accepted");
    const digest = HMAC_ALGORITHMS[alg];
    if (digest === undefined) throw new TokenError(`no configured key can verify a ${alg} token`);
    const signature = b64url(signaturePart);
    const signed = `${headerPart}.${payloadPart}`;
    const verified = this.#jwtSecrets.some((secret) => {
      const expected = createHmac(digest, secret).update(signed).digest();
      return expected.length === signature.length && timingSafeEqual(expected, signature);
    });
    if (!verified) throw new TokenError("the token's signature does not verify");
    const claims = asObject(tokenJson(b64url(payloadPart), MALFORMED));
    if (claims === null || unreadableClaims(claims)) throw new TokenError(MALFORMED);
    const now = Math.floor(Date.now() / 1000);
    const exp = numericDate(claims.exp);
    if (exp === null) throw new TokenError("the token lacks the required claim 'exp'");
    // A configured issuer or audience makes the claim required (a string or a list of them).
    if (this.#jwtIssuer !== null && stringSet(claims.iss) === null) {
      throw new TokenError("the token lacks the required claim 'iss'");
    }
    if (this.#jwtAudience.length > 0 && stringSet(claims.aud) === null) {
      throw new TokenError("the token lacks the required claim 'aud'");
    }
    const nbf = numericDate(claims.nbf);
    if (claims.nbf !== undefined && nbf === null) {
      throw new TokenError("the token's claim 'nbf' has the wrong type");
    }
    if (exp < now - this.#leewayS) throw new TokenError('the token has expired');
    if (nbf !== null && nbf > now + this.#leewayS) throw new TokenError('the token is not valid yet');
    const issuers = stringSet(claims.iss);
    if (this.#jwtIssuer !== null && issuers !== null && !issuers.includes(this.#jwtIssuer)) {
      throw new TokenError("the token's issuer is not accepted");
    }
    const audiences = stringSet(claims.aud);
    if (this.#jwtAudience.length > 0 && audiences !== null && !audiences.some((a) => this.#jwtAudience.includes(a))) {
      throw new TokenError("the token's audience is not accepted");
    }
    const tenantValue = claims[this.#tenantClaim];
    let tenantId = '';
    if (tenantValue !== undefined) {
      if (typeof tenantValue !== 'string') throw new TokenError(`the token's claim '${this.#tenantClaim}' has the wrong type`);
      const defect = idDefect(tenantValue);
      if (defect !== null) {
        throw new TokenError(`the token's claim '${this.#tenantClaim}' is not a valid tenant id: it ${defect}`);
      }
      tenantId = tenantValue;
    }
    return {
      subject: typeof claims.sub === 'string' ? claims.sub : '',
      tenantId,
      roles: strings(claims.roles, true),
      scopes: [...strings(claims.scope, true), ...strings(claims.scp, true)],
      claims,
    };
  }

  #unauthenticated(why: string): Refusal {
    return new Refusal(SHAPES.unauthenticated, `The bearer token was not accepted: ${why}.`);
  }

  async verifyToken(token: string): Promise<Claims> {
    this.#open();
    try {
      return this.#verify(token ?? '');
    } catch (e) {
      if (e instanceof TokenError) throw this.#error(this.#unauthenticated(e.message));
      throw e;
    }
  }

  async authorize(options: AuthorizeOptions): Promise<Decision> {
    this.#open();
    const token = options.token ?? '';
    const tenantId = options.tenantId ?? '';
    const required = checkFlagList('required_features', options.require, this.#typeBase);
    const denyIf = checkFlagList('deny_if', options.denyIf, this.#typeBase);
    const resource = options.resource ?? '';
    if (trimWhiteSpace(token) === '' && tenantId === '') throw this.#invalid('token', 'give a token or a tenant_id');
    if (tenantId !== '') this.#checkId('tenant_id', tenantId);
    for (const [field, flags] of [
      ['required_features', required],
      ['deny_if', denyIf],
    ] as const) {
      if (flags.length > MAX_AUTH_FLAGS) throw this.#invalid(field, `names more than ${MAX_AUTH_FLAGS} flags`);
      for (const flag of flags) this.#checkFlagKey(field, flag);
    }
    if (utf8Length(resource) > MAX_RESOURCE_BYTES) throw this.#invalid('resource', `is longer than ${MAX_RESOURCE_BYTES} bytes`);

    let tenant = tenantId;
    let subject = '';
    let claims: Claims | null = null;
    if (trimWhiteSpace(token) !== '') {
      try {
        claims = this.#verify(token);
      } catch (e) {
        if (!(e instanceof TokenError)) throw e;
        return this.#deny(tenantId, '', null, { reason: 'UNAUTHENTICATED', feature: '', why: e.message }, resource);
      }
      if (claims.tenantId === '') {
        const why = `it has no '${this.#tenantClaim}' claim`;
        return this.#deny('', claims.subject, null, { reason: 'UNAUTHENTICATED', feature: '', why }, resource);
      }
      if (tenantId !== '' && tenantId !== claims.tenantId) {
        return this.#deny(tenantId, claims.subject, claims, { reason: 'WRONG_TENANT', feature: '' }, resource);
      }
      tenant = claims.tenantId;
      subject = claims.subject;
    }
    const isOn = (key: string) => this.#flag(tenant, key)?.value === true;
    const owing = denyIf.find(isOn);
    if (owing !== undefined) return this.#deny(tenant, subject, claims, { reason: 'PAYMENT_REQUIRED', feature: owing }, resource);
    const locked = required.find((feature) => !isOn(feature));
    if (locked !== undefined) return this.#deny(tenant, subject, claims, { reason: 'FEATURE_LOCKED', feature: locked }, resource);
    return { allowed: true, problem: null, tenantId: tenant, subject, failModeApplied: false, claims };
  }

  #deny(
    tenant: string,
    subject: string,
    claims: Claims | null,
    denial: { reason: 'UNAUTHENTICATED' | 'PAYMENT_REQUIRED' | 'FEATURE_LOCKED' | 'WRONG_TENANT'; feature: string; why?: string },
    resource: string,
  ): Decision {
    let refusal: Refusal;
    switch (denial.reason) {
      case 'UNAUTHENTICATED':
        refusal = this.#unauthenticated(denial.why ?? '');
        break;
      case 'PAYMENT_REQUIRED':
        refusal = new Refusal(SHAPES.paymentRequired, 'The subscription has a payment problem. Update billing to continue.');
        break;
      case 'FEATURE_LOCKED':
        refusal = new Refusal(SHAPES.featureLocked, `The '${denial.feature}' feature is not included in this subscription.`);
        break;
      case 'WRONG_TENANT':
        refusal = new Refusal(SHAPES.wrongTenant, 'The token belongs to a different tenant.');
        break;
    }
    const problem = this.#problem(refusal, resource);
    if (tenant !== '') problem.tenant_id = tenant;
    if (denial.reason === 'PAYMENT_REQUIRED') {
      if (this.#billingUrl !== null) problem.billing_url = this.#billingUrl;
      problem.flag = denial.feature;
    } else if (denial.reason === 'FEATURE_LOCKED') {
      if (this.#upgradeUrl !== null) problem.upgrade_url = this.#upgradeUrl;
      problem.feature = denial.feature;
    }
    const key = JSON.stringify([tenant, subject, denial.reason, denial.feature]);
    this.#denials.admit(key, denial.reason, () => {
      const metadata: JsonObject = { reason: denial.reason };
      if (denial.feature !== '') metadata.feature = denial.feature;
      if (subject !== '') metadata.subject = subject;
      if (resource !== '') metadata.resource = resource;
      if (denial.reason === 'UNAUTHENTICATED') metadata.detail = denial.why ?? '';
      return {
        tenant,
        actor: subject === '' ? 'anonymous' : subject,
        event: 'auth.denied',
        outcome: 'denied',
        metadata: boundMetadata(metadata),
      };
    });
    return { allowed: false, problem, tenantId: tenant, subject, failModeApplied: false, claims };
  }

  /** Writes the counts of open coalescing windows, as the sidecar does when it stops. */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#refusals.flush(true);
    this.#denials.flush(true);
    this.#closed = true;
  }
}
