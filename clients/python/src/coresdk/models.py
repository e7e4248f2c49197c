"""Plain Python views of the sidecar's answers."""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Optional, Union

from google.protobuf import json_format, struct_pb2

from coresdk.errors import Problem
from coresdk.v1 import audit_pb2, auth_pb2, flags_pb2, webhook_pb2

FlagValue = Union[bool, str, float, int, dict, list, None]

OUTCOMES = {
    webhook_pb2.WEBHOOK_OUTCOME_APPLIED: "applied",
    webhook_pb2.WEBHOOK_OUTCOME_DUPLICATE: "duplicate",
    webhook_pb2.WEBHOOK_OUTCOME_STALE: "stale",
    webhook_pb2.WEBHOOK_OUTCOME_IGNORED: "ignored",
}


def value_from_proto(value: flags_pb2.FlagValue) -> FlagValue:
    kind = value.WhichOneof("kind")
    if kind == "bool_value":
        return value.bool_value
    if kind == "string_value":
        return value.string_value
    if kind == "number_value":
        return value.number_value
    if kind == "json_value":
        return json_format.MessageToDict(value.json_value)
    return None


def value_to_proto(value: FlagValue) -> flags_pb2.FlagValue:
    if isinstance(value, bool):
        return flags_pb2.FlagValue(bool_value=value)
    if isinstance(value, str):
        return flags_pb2.FlagValue(string_value=value)
    if isinstance(value, (int, float)):
        return flags_pb2.FlagValue(number_value=float(value))
    json_value = struct_pb2.Value()
    json_format.ParseDict(value, json_value)
    return flags_pb2.FlagValue(json_value=json_value)


@dataclass(frozen=True)
class Flag:
    tenant_id: str
    key: str
    value: FlagValue
    version: int = 0
    is_default: bool = False
    updated_by: str = ""

    @classmethod
    def from_proto(cls, flag: flags_pb2.Flag) -> "Flag":
        return cls(
            tenant_id=flag.tenant_id,
            key=flag.key,
            value=value_from_proto(flag.value),
            version=flag.version,
            is_default=flag.is_default,
            updated_by=flag.updated_by,
        )


@dataclass(frozen=True)
class FlagChange:
    key: str
    old_value: FlagValue
    new_value: FlagValue
    version: int


@dataclass(frozen=True)
class InclusionProof:
    """An RFC 9162 inclusion proof: the audit path (raw 32-byte hashes, from the leaf's sibling
    upwards) from leaf `leaf_index` (the record with seq `leaf_index + 1`) to the root of the
    tree of `tree_size` records. `checkpoint` is the signed note of that tree when the proof was
    asked for against a checkpoint ("" otherwise). Check it with `coresdk.transparency`."""

    leaf_index: int
    tree_size: int
    hashes: list[bytes] = field(default_factory=list)
    checkpoint: str = ""

    @classmethod
    def from_proto(cls, p: audit_pb2.InclusionProof) -> "InclusionProof":
        return cls(leaf_index=p.leaf_index, tree_size=p.tree_size, hashes=[bytes(h) for h in p.hashes], checkpoint=p.checkpoint)


@dataclass(frozen=True)
class ConsistencyProof:
    """An RFC 9162 consistency proof that the tree of `to_size` records extends the one of
    `from_size` (raw 32-byte hashes)."""

    from_size: int
    to_size: int
    hashes: list[bytes] = field(default_factory=list)

    @classmethod
    def from_proto(cls, p: audit_pb2.GetConsistencyProofResponse) -> "ConsistencyProof":
        return cls(from_size=p.from_size, to_size=p.to_size, hashes=[bytes(h) for h in p.hashes])


@dataclass(frozen=True)
class WebhookResult:
    event_id: str
    event_type: str
    tenant_id: str
    outcome: str
    flag_changes: list[FlagChange] = field(default_factory=list)
    audit_seq: int = 0
    stale_flags: list[str] = field(default_factory=list)
    # Only when asked for (`include_proof=True`): the proof of the audit record `audit_seq`.
    inclusion_proof: Optional[InclusionProof] = None

    @classmethod
    def from_proto(cls, r: webhook_pb2.HandleStripeWebhookResponse) -> "WebhookResult":
        return cls(
            event_id=r.event_id,
            event_type=r.event_type,
            tenant_id=r.tenant_id,
            outcome=OUTCOMES.get(r.outcome, "unspecified"),
            flag_changes=[
                FlagChange(
                    c.key,
                    value_from_proto(c.old_value) if c.HasField("old_value") else None,
                    value_from_proto(c.new_value),
                    c.version,
                )
                for c in r.flag_changes
            ],
            audit_seq=r.audit_seq,
            stale_flags=list(r.stale_flags),
            inclusion_proof=InclusionProof.from_proto(r.inclusion_proof) if r.HasField("inclusion_proof") else None,
        )


@dataclass(frozen=True)
class FlagEvent:
    """A Stripe event as its delivery's (or replay's) audit record tells it."""

    event_id: str
    event_type: str
    created: int
    audit_seq: int
    actor: str
    reason: str = ""

    @classmethod
    def from_proto(cls, e: flags_pb2.FlagEvent) -> "FlagEvent":
        return cls(e.event_id, e.event_type, e.created, e.audit_seq, e.actor, e.reason)


@dataclass(frozen=True)
class AdminFlagChange:
    actor: str
    reason: str
    version: int
    audit_seq: int

    @classmethod
    def from_proto(cls, a: flags_pb2.AdminFlagChange) -> "AdminFlagChange":
        return cls(a.actor, a.reason, a.version, a.audit_seq)


@dataclass(frozen=True)
class FlagExplanation:
    """Why a flag has its value: what set it (an event or an admin change; neither for a
    catalog default), the rule that mapped the event ("" when unknown), and the later
    deliveries that were stale for it (oldest first, the latest 20 at most): older than
    `newest_event`, the newest event that set or confirmed the value when it is not `event`."""

    flag: Flag
    event: Optional[FlagEvent] = None
    admin: Optional[AdminFlagChange] = None
    rule: str = ""
    stale_events: list[FlagEvent] = field(default_factory=list)
    newest_event: Optional[FlagEvent] = None

    @classmethod
    def from_proto(cls, r: flags_pb2.ExplainFlagResponse) -> "FlagExplanation":
        set_by = r.WhichOneof("set_by")
        return cls(
            flag=Flag.from_proto(r.flag),
            event=FlagEvent.from_proto(r.event) if set_by == "event" else None,
            admin=AdminFlagChange.from_proto(r.admin) if set_by == "admin" else None,
            rule=r.rule,
            stale_events=[FlagEvent.from_proto(e) for e in r.stale_events],
            newest_event=FlagEvent.from_proto(r.newest_event) if r.HasField("newest_event") else None,
        )


@dataclass(frozen=True)
class Claims:
    subject: str
    tenant_id: str
    roles: list[str] = field(default_factory=list)
    scopes: list[str] = field(default_factory=list)
    claims: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_proto(cls, c: auth_pb2.Claims) -> "Claims":
        return cls(
            subject=c.subject,
            tenant_id=c.tenant_id,
            roles=list(c.roles),
            scopes=list(c.scopes),
            claims=json_format.MessageToDict(c.claims) if c.HasField("claims") else {},
        )


@dataclass(frozen=True)
class Decision:
    allowed: bool
    problem: Optional[Problem] = None
    tenant_id: str = ""
    subject: str = ""
    fail_mode_applied: bool = False
    claims: Optional[Claims] = None

    @classmethod
    def from_proto(cls, r: auth_pb2.AuthorizeResponse) -> "Decision":
        return cls(
            allowed=r.decision == auth_pb2.DECISION_ALLOW,
            problem=Problem.from_proto(r.problem) if r.HasField("problem") else None,
            tenant_id=r.tenant_id,
            subject=r.subject,
            fail_mode_applied=r.fail_mode_applied,
            claims=Claims.from_proto(r.claims) if r.HasField("claims") else None,
        )


def rfc3339_ms(time_ms: int) -> str:
    """The sidecar's record time: RFC 3339, UTC, milliseconds (`2026-05-01T09:00:00.000Z`)."""
    seconds, ms = divmod(time_ms, 1000)
    return datetime.fromtimestamp(seconds, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S") + f".{ms:03d}Z"


@dataclass(frozen=True)
class AuditRecord:
    """One record of the chain. `canonical` holds the exact RFC 8785 bytes that were hashed:
    `hash` = SHA-256("coresdk.audit.v1\0" ‖ bytes of `prev_hash` ‖ `canonical`), so anyone
    holding the records can check the chain without trusting whoever served them."""

    seq: int
    tenant_id: str
    actor: str
    event: str
    outcome: str
    metadata: dict[str, Any]
    hash: str = ""
    time: str = ""
    prev_hash: str = ""
    canonical: bytes = b""
    # Only when asked for (`audit(..., include_proof=True)`).
    inclusion_proof: Optional[InclusionProof] = None

    @classmethod
    def from_proto(cls, r: audit_pb2.AuditRecord) -> "AuditRecord":
        return cls(
            seq=r.seq,
            tenant_id=r.tenant_id,
            actor=r.actor,
            event=r.event,
            outcome=r.outcome,
            metadata=json_format.MessageToDict(r.metadata) if r.HasField("metadata") else {},
            hash=r.hash,
            time=rfc3339_ms(r.time.seconds * 1000 + r.time.nanos // 1_000_000) if r.HasField("time") else "",
            prev_hash=r.prev_hash,
            canonical=r.canonical,
            inclusion_proof=InclusionProof.from_proto(r.inclusion_proof) if r.HasField("inclusion_proof") else None,
        )


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    records_checked: int
    first_bad_seq: int = 0
    reason: str = ""
    head_seq: int = 0
    head_hash: str = ""
    warnings: list[str] = field(default_factory=list)
    # The checkpoint the check started from (0 when none, or with `full`), and the current
    # tree's root (hex) the new records and the consistency proof were checked against.
    checkpoint_size: int = 0
    tree_root: str = ""

    @classmethod
    def from_proto(cls, r: audit_pb2.VerifyAuditResponse) -> "VerifyResult":
        return cls(
            ok=r.ok,
            records_checked=r.records_checked,
            first_bad_seq=r.first_bad_seq,
            reason=r.reason,
            head_seq=r.head_seq,
            head_hash=r.head_hash,
            warnings=list(r.warnings),
            checkpoint_size=r.checkpoint_size,
            tree_root=r.tree_root,
        )
