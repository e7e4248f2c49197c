// Between the gRPC messages (as @grpc/proto-loader decodes them, see src/proto.ts) and the
// client's public shapes (src/types.ts); and the sidecar's problems out of a failed call.

import type * as grpc from '@grpc/grpc-js';

import { FlagNotFoundError, GrpcCode, ProblemError, SidecarUnavailableError, unavailableProblem } from './errors.js';
import type { AdminFlagChange__Output } from './generated/coresdk/v1/AdminFlagChange.js';
import type { AuditRecord__Output } from './generated/coresdk/v1/AuditRecord.js';
import type { GetConsistencyProofResponse__Output } from './generated/coresdk/v1/GetConsistencyProofResponse.js';
import type { InclusionProof__Output } from './generated/coresdk/v1/InclusionProof.js';
import type { VerifyAuditResponse__Output } from './generated/coresdk/v1/VerifyAuditResponse.js';
import type { AuthorizeResponse__Output } from './generated/coresdk/v1/AuthorizeResponse.js';
import type { Claims__Output } from './generated/coresdk/v1/Claims.js';
import type { ExplainFlagResponse__Output } from './generated/coresdk/v1/ExplainFlagResponse.js';
import type { Flag__Output } from './generated/coresdk/v1/Flag.js';
import type { FlagEvent__Output } from './generated/coresdk/v1/FlagEvent.js';
import type { FlagValue, FlagValue__Output } from './generated/coresdk/v1/FlagValue.js';
import type { HandleStripeWebhookResponse__Output } from './generated/coresdk/v1/HandleStripeWebhookResponse.js';
import type { Problem__Output } from './generated/coresdk/v1/Problem.js';
import type { Struct, Struct__Output } from './generated/google/protobuf/Struct.js';
import type { Timestamp__Output } from './generated/google/protobuf/Timestamp.js';
import type { Value, Value__Output } from './generated/google/protobuf/Value.js';
import { api, PROBLEM_TYPE_URL } from './proto.js';
import type {
  AuditRecord,
  Claims,
  ConsistencyProof,
  Decision,
  Flag,
  FlagEvent,
  FlagExplanation,
  FlagValue as PublicFlagValue,
  InclusionProof,
  JsonValue,
  Problem,
  VerifyResult,
  WebhookOutcome,
  WebhookResult,
} from './types.js';
import { invalidProblem } from './validation.js';

// -- google.protobuf.Struct / Value ---------------------------------------------------------

export function valueToJson(value: Value__Output | null | undefined): JsonValue {
  switch (value?.kind) {
    case 'boolValue':
      return value.boolValue ?? false;
    case 'numberValue':
      return value.numberValue ?? 0;
    case 'stringValue':
      return value.stringValue ?? '';
    case 'structValue':
      return structToJson(value.structValue);
    case 'listValue':
      return (value.listValue?.values ?? []).map(valueToJson);
    default:
      return null;
  }
}

export function structToJson(struct: Struct__Output | null | undefined): { [key: string]: JsonValue } {
  const out: { [key: string]: JsonValue } = {};
  for (const [key, value] of Object.entries(struct?.fields ?? {})) out[key] = valueToJson(value);
  return out;
}

/** A value that went through JSON (so only JSON's types remain) as a google.protobuf.Value. */
function jsonToValue(value: JsonValue): Value {
  if (value === null) return { nullValue: 'NULL_VALUE' };
  if (typeof value === 'boolean') return { boolValue: value };
  if (typeof value === 'number') return { numberValue: value };
  if (typeof value === 'string') return { stringValue: value };
  if (Array.isArray(value)) return { listValue: { values: value.map(jsonToValue) } };
  return { structValue: jsonToStruct(value) };
}

function jsonToStruct(object: { [key: string]: JsonValue }): Struct {
  const fields: { [key: string]: Value } = {};
  for (const [key, value] of Object.entries(object)) fields[key] = jsonToValue(value);
  return { fields };
}

/**
 * Plain data as JSON sees it (`toJSON`, dates as strings, undefined members dropped), refused
 * with a 400 problem when JSON cannot represent it (a BigInt, a cycle).
 */
export function asJson(field: string, value: unknown, typeBase: string): JsonValue {
  try {
    const text = JSON.stringify(value);
    return text === undefined ? null : (JSON.parse(text) as JsonValue);
  } catch (error) {
    throw new ProblemError(
      invalidProblem(field, `must be JSON data: ${(error as Error).message}`, typeBase),
      GrpcCode.INVALID_ARGUMENT,
    );
  }
}

export function metadataToStruct(metadata: { [key: string]: unknown } | undefined, typeBase: string): Struct | null {
  if (metadata === undefined) return null;
  const json = asJson('metadata', metadata, typeBase);
  if (json === null || typeof json !== 'object' || Array.isArray(json)) {
    throw new ProblemError(invalidProblem('metadata', 'must be an object', typeBase), GrpcCode.INVALID_ARGUMENT);
  }
  return jsonToStruct(json);
}

// -- flags ----------------------------------------------------------------------------------

export function flagValueFromProto(value: FlagValue__Output | null | undefined): PublicFlagValue {
  switch (value?.kind) {
    case 'boolValue':
      return value.boolValue ?? false;
    case 'stringValue':
      return value.stringValue ?? '';
    case 'numberValue':
      return value.numberValue ?? 0;
    case 'jsonValue':
      return valueToJson(value.jsonValue);
    default:
      return null;
  }
}

export function flagValueToProto(value: PublicFlagValue, typeBase: string): FlagValue {
  if (typeof value === 'boolean') return { boolValue: value };
  if (typeof value === 'string') return { stringValue: value };
  if (typeof value === 'number') return { numberValue: value };
  return { jsonValue: jsonToValue(asJson('value', value, typeBase)) };
}

export function flagFromProto(flag: Flag__Output): Flag {
  return {
    tenantId: flag.tenantId,
    key: flag.key,
    value: flagValueFromProto(flag.value),
    version: flag.version,
    isDefault: flag.isDefault,
    updatedBy: flag.updatedBy,
  };
}

const OUTCOMES: Record<string, WebhookOutcome> = {
  WEBHOOK_OUTCOME_APPLIED: 'applied',
  WEBHOOK_OUTCOME_DUPLICATE: 'duplicate',
  WEBHOOK_OUTCOME_STALE: 'stale',
  WEBHOOK_OUTCOME_IGNORED: 'ignored',
};

export function webhookResultFromProto(r: HandleStripeWebhookResponse__Output): WebhookResult {
  const outcome = OUTCOMES[r.outcome];
  if (outcome === undefined) {
    throw new ProblemError({
      type: 'about:blank',
      title: 'Unexpected answer',
      status: 502,
      detail: `the sidecar answered the webhook with outcome ${r.outcome}, which this client does not know`,
    });
  }
  return {
    eventId: r.eventId,
    eventType: r.eventType,
    tenantId: r.tenantId,
    outcome,
    flagChanges: r.flagChanges.map((c) => ({
      key: c.key,
      oldValue: c.oldValue ? flagValueFromProto(c.oldValue) : null,
      newValue: flagValueFromProto(c.newValue),
      version: c.version,
    })),
    auditSeq: r.auditSeq,
    staleFlags: r.staleFlags,
    ...(r.inclusionProof ? { inclusionProof: inclusionProofFromProto(r.inclusionProof) } : {}),
  };
}

function flagEventFromProto(e: FlagEvent__Output): FlagEvent {
  return {
    eventId: e.eventId,
    eventType: e.eventType,
    created: e.created,
    auditSeq: e.auditSeq,
    actor: e.actor,
    reason: e.reason,
  };
}

function adminChangeFromProto(a: AdminFlagChange__Output) {
  return { actor: a.actor, reason: a.reason, version: a.version, auditSeq: a.auditSeq };
}

export function explanationFromProto(r: ExplainFlagResponse__Output, tenantId: string, key: string): FlagExplanation {
  return {
    flag: r.flag
      ? flagFromProto(r.flag)
      : { tenantId, key, value: null, version: 0, isDefault: true, updatedBy: '' },
    event: r.setBy === 'event' && r.event ? flagEventFromProto(r.event) : null,
    admin: r.setBy === 'admin' && r.admin ? adminChangeFromProto(r.admin) : null,
    rule: r.rule,
    staleEvents: r.staleEvents.map(flagEventFromProto),
    newestEvent: r.newestEvent ? flagEventFromProto(r.newestEvent) : null,
  };
}

// -- auth -----------------------------------------------------------------------------------

export function claimsFromProto(c: Claims__Output): Claims {
  return {
    subject: c.subject,
    tenantId: c.tenantId,
    roles: c.roles,
    scopes: c.scopes,
    claims: structToJson(c.claims),
  };
}

export function decisionFromProto(r: AuthorizeResponse__Output): Decision {
  return {
    allowed: r.decision === 'DECISION_ALLOW',
    problem: r.problem ? problemFromProto(r.problem) : null,
    tenantId: r.tenantId,
    subject: r.subject,
    failModeApplied: r.failModeApplied,
    claims: r.claims ? claimsFromProto(r.claims) : null,
  };
}

// -- audit ----------------------------------------------------------------------------------

function timestampToRfc3339(t: Timestamp__Output | null): string {
  if (t === null) return '';
  return new Date(t.seconds * 1000 + Math.floor(t.nanos / 1_000_000)).toISOString();
}

export function auditRecordFromProto(r: AuditRecord__Output): AuditRecord {
  return {
    seq: r.seq,
    time: timestampToRfc3339(r.time),
    tenantId: r.tenantId,
    actor: r.actor,
    event: r.event,
    outcome: r.outcome,
    metadata: structToJson(r.metadata),
    prevHash: r.prevHash,
    hash: r.hash,
    canonical: r.canonical,
    ...(r.inclusionProof ? { inclusionProof: inclusionProofFromProto(r.inclusionProof) } : {}),
  };
}

export function inclusionProofFromProto(p: InclusionProof__Output): InclusionProof {
  return { leafIndex: p.leafIndex, treeSize: p.treeSize, hashes: p.hashes, checkpoint: p.checkpoint };
}

export function consistencyProofFromProto(p: GetConsistencyProofResponse__Output): ConsistencyProof {
  return { fromSize: p.fromSize, toSize: p.toSize, hashes: p.hashes };
}

export function verifyResultFromProto(r: VerifyAuditResponse__Output): VerifyResult {
  return {
    ok: r.ok,
    recordsChecked: r.recordsChecked,
    firstBadSeq: r.firstBadSeq,
    reason: r.reason,
    headSeq: r.headSeq,
    headHash: r.headHash,
    warnings: r.warnings,
    checkpointSize: r.checkpointSize,
    treeRoot: r.treeRoot,
  };
}

// -- problems -------------------------------------------------------------------------------

export function problemFromProto(p: Problem__Output): Problem {
  const problem: Problem = { type: p.type, title: p.title, status: p.status };
  if (p.detail) problem.detail = p.detail;
  if (p.instance) problem.instance = p.instance;
  // Extension members sit inline, as in the `application/problem+json` body; they never
  // replace the standard members.
  for (const [name, value] of Object.entries(structToJson(p.extensions))) {
    if (!(name in problem)) problem[name] = value;
  }
  return problem;
}

/** The sidecar's problem in the call's `google.rpc.Status` trailer, if it sent one. */
function problemInTrailers(metadata: grpc.Metadata | undefined): Problem | null {
  for (const bytes of metadata?.get('grpc-status-details-bin') ?? []) {
    if (!Buffer.isBuffer(bytes)) continue;
    try {
      const { decodeStatus, decodeProblem } = api();
      for (const detail of decodeStatus(bytes).details) {
        if (detail.type_url === PROBLEM_TYPE_URL) return problemFromProto(decodeProblem(detail.value));
      }
    } catch {
      // Undecodable details are no problem of the sidecar's: fall back to the status.
    }
  }
  return null;
}

function isServiceError(error: unknown): error is grpc.ServiceError {
  return error instanceof Error && typeof (error as Partial<grpc.ServiceError>).code === 'number';
}

/** A failed call as a ProblemError carrying the sidecar's problem (or one describing the failure). */
export function problemFromError(error: unknown, typeBase: string): ProblemError {
  if (error instanceof ProblemError) return error;
  if (!isServiceError(error)) {
    return new ProblemError({ type: 'about:blank', title: 'Error', status: 500, detail: String(error) });
  }
  const problem = problemInTrailers(error.metadata);
  if (problem !== null) {
    if (problem.reason === 'FLAG_NOT_FOUND') return new FlagNotFoundError(problem, error.code);
    return new ProblemError(problem, error.code);
  }
  if (error.code === GrpcCode.UNAVAILABLE || error.code === GrpcCode.DEADLINE_EXCEEDED) {
    // grpc-js ends a refused connection's details with an empty "Resolution note: ".
    const details = error.details.replace(/\s*Resolution note:\s*$/, '');
    return new SidecarUnavailableError(unavailableProblem(`the sidecar did not answer: ${details}`, typeBase), error.code);
  }
  return new ProblemError({ type: 'about:blank', title: 'Error', status: 500, detail: error.details || error.message }, error.code);
}
