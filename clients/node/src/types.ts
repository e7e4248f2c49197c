// The client's public shapes: what both the sidecar client and the in-process mock answer.
// Field names follow Node's camelCase; a `Problem` is exactly the RFC 9457
// `application/problem+json` body, so it can be sent to an HTTP caller as is.

import type { Settings } from './config.js';

export type JsonValue = null | boolean | number | string | JsonValue[] | { [key: string]: JsonValue };

/** A flag's value: the sidecar's flags are booleans, strings, numbers (always floats on the wire) or JSON. */
export type FlagValue = JsonValue;

/** An RFC 9457 problem detail, with its extension members (`reason`, `flag`, `upgrade_url`, …) inline. */
export interface Problem {
  type: string;
  title: string;
  status: number;
  detail?: string;
  instance?: string;
  /** The sidecar's stable machine-readable reason, e.g. `FEATURE_LOCKED`, `SIGNATURE_MISMATCH`. */
  reason?: string;
  [extension: string]: JsonValue | undefined;
}

export interface Flag {
  tenantId: string;
  key: string;
  value: FlagValue;
  /** 0 for a catalog default. */
  version: number;
  isDefault: boolean;
  updatedBy: string;
}

export interface FlagChange {
  key: string;
  /** null when the flag had no stored value before (it was the catalog default). */
  oldValue: FlagValue;
  newValue: FlagValue;
  version: number;
}

export type WebhookOutcome = 'applied' | 'duplicate' | 'stale' | 'ignored';

export interface WebhookResult {
  eventId: string;
  eventType: string;
  tenantId: string;
  outcome: WebhookOutcome;
  flagChanges: FlagChange[];
  auditSeq: number;
  /** Flags a newer event had already decided (outcome `stale`). */
  staleFlags: string[];
  /** Only when asked for (`includeProof`): the proof of the audit record `auditSeq`. */
  inclusionProof?: InclusionProof;
}

export interface WebhookOptions {
  /**
   * Answer with the inclusion proof of the delivery's audit record against the checkpoint
   * signed for it (the call waits for that checkpoint, about a second).
   */
  includeProof?: boolean;
}

/** A Stripe event as its delivery's (or replay's) audit record tells it. */
export interface FlagEvent {
  eventId: string;
  eventType: string;
  created: number;
  auditSeq: number;
  actor: string;
  reason: string;
}

export interface AdminFlagChange {
  actor: string;
  reason: string;
  version: number;
  auditSeq: number;
}

/** Why a flag has its value (see the README's `flags explain`). */
export interface FlagExplanation {
  flag: Flag;
  event: FlagEvent | null;
  admin: AdminFlagChange | null;
  rule: string;
  staleEvents: FlagEvent[];
  newestEvent: FlagEvent | null;
}

export interface Claims {
  subject: string;
  tenantId: string;
  roles: string[];
  scopes: string[];
  claims: { [name: string]: JsonValue };
}

export interface Decision {
  allowed: boolean;
  /** Why not, ready to send as `application/problem+json` with status `problem.status`. */
  problem: Problem | null;
  tenantId: string;
  subject: string;
  /** The sidecar was away and the fail mode decided. */
  failModeApplied: boolean;
  claims: Claims | null;
}

export interface AuditRecord {
  seq: number;
  /** RFC 3339 with milliseconds, UTC: the form the chain hashes. */
  time: string;
  tenantId: string;
  actor: string;
  event: string;
  outcome: string;
  metadata: { [key: string]: JsonValue };
  /** Hex SHA-256 of the previous record (64 zeros for the first). */
  prevHash: string;
  /** Hex SHA-256("coresdk.audit.v1\0" ‖ prev hash bytes ‖ canonical). */
  hash: string;
  /** The exact RFC 8785 bytes that were hashed: the record's Merkle tree leaf data. */
  canonical: Buffer;
  /** Only when asked for (`audit({ ..., includeProof: true })`). */
  inclusionProof?: InclusionProof;
}

/**
 * An RFC 9162 inclusion proof: the audit path (raw 32-byte hashes, from the leaf's sibling
 * upwards) from leaf `leafIndex` (the record with seq `leafIndex + 1`) to the root of the tree
 * of `treeSize` records. `checkpoint` is the signed note of that tree when the proof was asked
 * for against a checkpoint ('' otherwise). Check it with `verifyRecordInclusion`.
 */
export interface InclusionProof {
  leafIndex: number;
  treeSize: number;
  hashes: Buffer[];
  checkpoint: string;
}

/** An RFC 9162 consistency proof that the tree of `toSize` records extends the one of `fromSize`. */
export interface ConsistencyProof {
  fromSize: number;
  toSize: number;
  hashes: Buffer[];
}

export interface VerifyResult {
  ok: boolean;
  recordsChecked: number;
  firstBadSeq: number;
  reason: string;
  headSeq: number;
  headHash: string;
  warnings: string[];
  /**
   * The checkpoint the check started from (0 when none, or with `full`): records up to it are
   * covered by its signature and the consistency proof to the current tree.
   */
  checkpointSize: number;
  /** The current tree's root (hex) the new records and the consistency proof were checked against. */
  treeRoot: string;
}

export interface AuthorizeOptions {
  /** A bearer token (with or without the `Bearer ` prefix); its tenant claim names the tenant. */
  token?: string;
  /** The tenant, when there is no token (or to check that the token belongs to it). */
  tenantId?: string;
  /** Flags that must be on (403 `feature-locked` otherwise). */
  require?: readonly string[];
  /** Flags that must be off (402 `payment-required` otherwise). */
  denyIf?: readonly string[];
  /** What is being accessed, e.g. `GET /api/analytics`; becomes the problem's `instance`. */
  resource?: string;
}

export interface AuditOptions {
  event: string;
  outcome: string;
  actor: string;
  tenantId?: string;
  metadata?: { [key: string]: unknown };
  /**
   * Answer the record with `inclusionProof`: its proof against the checkpoint signed for it,
   * whose note is `inclusionProof.checkpoint` (the call waits for that checkpoint, about a second).
   */
  includeProof?: boolean;
}

export interface AuditQuery {
  tenantId?: string;
  eventPrefix?: string;
  outcome?: string;
  /** At most this many records (default 1000). */
  limit?: number;
}

export interface ChangeOptions {
  actor: string;
  reason?: string;
}

/** What every client offers, whether it talks to a sidecar or is the in-process mock. */
export interface CoreSDKClient {
  readonly settings: Settings;

  /**
   * Forwards a Stripe delivery: the raw body exactly as received (never a re-serialised
   * object) and the `Stripe-Signature` header. Resolves only once the effect is committed;
   * rejects with a ProblemError otherwise (answer `problem.status` so Stripe retries). Never
   * decided by the fail mode.
   */
  handleStripeWebhook(rawBody: Buffer | Uint8Array | string, signatureHeader: string, options?: WebhookOptions): Promise<WebhookResult>;
  /** Admin: feeds one exported event through the webhook path without a signature. */
  replayEvent(payload: Buffer | Uint8Array | string, options: { reason: string }): Promise<WebhookResult>;

  /** True when the tenant's flag is on; an unknown flag is off. Served from the local cache when current. */
  isEnabled(tenantId: string, key: string): Promise<boolean>;
  getFlag(tenantId: string, key: string): Promise<Flag>;
  getFlags(tenantId: string): Promise<Record<string, Flag>>;
  explainFlag(tenantId: string, key: string): Promise<FlagExplanation>;
  /** Admin. */
  setFlag(tenantId: string, key: string, value: FlagValue, options: ChangeOptions): Promise<Flag>;

  verifyToken(token: string): Promise<Claims>;
  authorize(options: AuthorizeOptions): Promise<Decision>;

  /** Appends an application event to the audit trail; null when spooled under fail mode `open`. */
  audit(options: AuditOptions): Promise<AuditRecord | null>;
  auditQuery(query?: AuditQuery): Promise<AuditRecord[]>;
  /**
   * Checks the log: by default the records added since the newest checkpoint and a consistency
   * proof from it; with `full`, every record and hash from the first.
   */
  auditVerify(options?: { full?: boolean }): Promise<VerifyResult>;
  /**
   * The newest signed checkpoint: a C2SP tlog-checkpoint note (check it with `openCheckpoint`
   * and the log's verifier key). NOT_FOUND (404) before the first checkpoint.
   */
  auditCheckpoint(): Promise<string>;
  /**
   * The RFC 9162 inclusion proof of record `seq` in the tree of `treeSize` records; 0 (the
   * default) means the newest checkpoint's tree, whose note comes with the proof.
   */
  auditInclusionProof(seq: number, treeSize?: number): Promise<InclusionProof>;
  /**
   * The RFC 9162 consistency proof that the tree of `toSize` records (0, the default: the
   * newest checkpoint's) extends the one of `fromSize`.
   */
  auditConsistencyProof(fromSize: number, toSize?: number): Promise<ConsistencyProof>;
  /** Audit records waiting in the local spool for the sidecar to come back. */
  readonly spooled: number;

  /** Admin: maps a Stripe customer to a tenant; resolves to how many parked events it applied. */
  mapCustomer(customerId: string, tenantId: string, options: ChangeOptions): Promise<number>;
  /** Admin: the tenant of a Stripe customer, or null. */
  resolveCustomer(customerId: string): Promise<string | null>;

  close(): Promise<void>;
}
