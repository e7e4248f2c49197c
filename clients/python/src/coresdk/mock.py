"""An in-process stand-in for the sidecar (`CORESDK_USE_MOCK=true`), for local development
and tests without a sidecar. It follows the sidecar's semantics: the same signature checks,
the same rules file (`default_rules.toml` is the sidecar's `rules/default.toml`), DUPLICATE /
STALE / IGNORED, the seeded SecurePay tenants, the same 401/402/403 problems, refusals and
denials coalesced per window, and an audit chain hashed exactly as the sidecar's (RFC 8785 of
the same records, by the `rfc8785` package). Numbers come back as doubles, as they do over
gRPC. The contract suite (`tests/contract/`) and the shared test suite run against both, so
they cannot drift apart.

Events of customers with no tenant are parked with the sidecar's bounds and applied when the
customer is mapped. Differences, by design: state lives in memory only (so parked events never
reach the sidecar's 30-day expiry); tokens are verified for HS256/384/512 (`CORESDK_JWT_SECRET`)
only.

The audit records form the sidecar's RFC 6962 Merkle tree, with its inclusion and consistency
proofs and their errors. Checkpoints differ: the mock runs no background task, so it signs one
for the current tree whenever one is asked for (`audit_checkpoint`, `tree_size=0`,
`include_proof`), with an Ed25519 key of its own made per mock (`audit_verifier_key`; signing
needs the `cryptography` package, `pip install 'coresdk[verify]'`; without it `include_proof` is
refused before anything is written). As the sidecar, it signs none of the empty log
(CHECKPOINT_NOT_FOUND). Its origin and key name are `coresdk.mock/<random hex>`: each mock is a
log of its own.
"""
from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import json
import math
import os
import re
from secrets import token_hex
import threading
import time
import dataclasses
from dataclasses import dataclass
from importlib import resources
from typing import Any, Mapping, Optional, Sequence

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, from PyPI (a dependency there).
    import tomli as tomllib  # type: ignore[no-redef]

import grpc
import rfc8785

from coresdk.base import BaseSDK
from coresdk.config import Settings
from coresdk.errors import FlagNotFound, Problem, ProblemError
from coresdk import transparency
from coresdk.validation import FLAG_KEY, WHITE_SPACE, ascii_lower, check_ids, id_defect, invalid, quoted, rust_trim
from coresdk.models import (
    AdminFlagChange,
    AuditRecord,
    Claims,
    ConsistencyProof,
    Decision,
    Flag,
    FlagChange,
    FlagEvent,
    FlagExplanation,
    FlagValue,
    InclusionProof,
    VerifyResult,
    WebhookResult,
    rfc3339_ms,
)

MOCK_SECRET = "whsec_test_secret"
MOCK_TENANTS = {"cus_acme_001": "acme-corp", "cus_globex_001": "globex", "cus_initech_001": "initech"}
ACTOR = "stripe-webhook"
REPLAY_ACTOR = "replay"
# The actor of changes made from the configuration (the sidecar's SEED_ACTOR).
SEED_ACTOR = "config"
MAX_REASON_LEN = 1024
# How many stale deliveries an explanation lists (the sidecar's STALE_SHOWN).
STALE_SHOWN = 20

# Event namespaces only the sidecar writes; Append refuses them (and the webhook actor).
RESERVED_NAMESPACES = ("billing", "auth", "flag", "tenant", "audit")
TOLERANCE_S = 300
# Seconds `created` may lie after the signature timestamp (the sidecar's MAX_CREATED_AHEAD_S).
MAX_CREATED_AHEAD_S = 300
# The sidecar's bounds on an access request (src/auth/access.rs).
MAX_AUTHORIZE_FLAGS = 32
MAX_RESOURCE_LEN = 256
# The sidecar's CORESDK_JWT_LEEWAY_S default: clock skew allowed on `exp` and `nbf`.
JWT_LEEWAY_S = 60
# The sidecar's CORESDK_DENY_AUDIT_WINDOW_S default.
DENY_AUDIT_WINDOW_S = 60
# The sidecar keeps its own records' keys beside event ids under this prefix (src/stripe/event.rs).
RESERVED_EVENT_ID_PREFIX = "coresdk:"
MAX_BODY = 1024 * 1024
# The sidecar's bounds on a signature header and on an event's `id` and `type`.
MAX_SIGNATURE_HEADER_LEN = 8 * 1024
MAX_EVENT_FIELD_LEN = 255
# The sidecar's bounds on what an application appends (src/audit.rs).
MAX_METADATA_BYTES = 4096
MAX_FIELD_LEN = 256
MAX_ACTOR_LEN = 256
DOMAIN_TAG = b"coresdk.audit.v1\0"
GENESIS_HASH = "0" * 64
# Bytes of an unverified body read for the event id and type it claims (the sidecar's CLAIM_PREFIX_BYTES).
CLAIM_PREFIX_BYTES = 1024
# The sidecar's parking bounds (CORESDK_MAX_PARKED_EVENTS, CORESDK_MAX_PARKED_EVENTS_PER_CUSTOMER).
MAX_PARKED_EVENTS = 10_000
MAX_PARKED_EVENTS_PER_CUSTOMER = 100
# The mock's own memory bounds, the Node mock's (the sidecar's store is a database): the newest
# audit records and processed event ids are kept, the oldest dropped; flags, customer mappings
# and billing objects beyond their bound are refused (507 MOCK_CAPACITY).
MAX_AUDIT_RECORDS = 100_000
MAX_PROCESSED_EVENTS = 100_000
MAX_FLAGS = 100_000
MAX_CUSTOMERS = 100_000
MAX_BILLING_OBJECTS = 100_000


def wire(value: Any) -> Any:
    """A value as it arrives over gRPC: every number a double (`google.protobuf.Value`,
    `FlagValue.number_value`), so the mock hands back what a client of the sidecar gets."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, dict):
        return {k: wire(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [wire(v) for v in value]
    raise TypeError(f"{type(value).__name__} is not a JSON value")


def _shortest_digits(n: float) -> tuple[str, int]:
    """The shortest digits that read back as |n| (what Python's repr, ryu and zmij all find),
    and the decimal exponent of the first: 1.5 -> ("15", 0), 0.001 -> ("1", -3)."""
    mantissa, _, exponent = repr(abs(n)).partition("e")
    whole, _, fraction = mantissa.partition(".")
    digits = (whole + fraction).lstrip("0")
    leading_zeros = len(whole + fraction) - len(digits)
    return digits.rstrip("0") or "0", len(whole) - 1 - leading_zeros + int(exponent or 0)


def _serde_number(n: float) -> str:
    """A JSON number as the sidecar's serde_json writes it: an integral double below 2^53 as an
    integer (the sidecar stores those as integers), any other as zmij formats a double: plain
    for decimal exponents -5 to 15 (`0.00001`, `9007199254740994.0`), else `1.5e+21`, `1e-7`."""
    if n.is_integer() and abs(n) < 2**53:
        return str(int(n))
    digits, exponent = _shortest_digits(n)
    sign = "-" if n < 0 else ""
    if -5 <= exponent <= 15:
        if len(digits) - 1 <= exponent:
            return sign + digits + "0" * (exponent - len(digits) + 1) + ".0"
        if exponent >= 0:
            return sign + digits[:exponent + 1] + "." + digits[exponent + 1:]
        return sign + "0." + "0" * (-exponent - 1) + digits
    mantissa = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
    return f"{sign}{mantissa}e{'+' if exponent >= 0 else '-'}{abs(exponent)}"


def _serde_json(value: Any) -> str:
    """Compact JSON as the sidecar's serde_json writes a value: keys sorted (its maps are
    ordered), numbers as `_serde_number`, strings escaped as Python's json does likewise."""
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(k, ensure_ascii=False)}:{_serde_json(value[k])}" for k in sorted(value)) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_serde_json(v) for v in value) + "]"
    if isinstance(value, float) or (isinstance(value, int) and not isinstance(value, bool)):
        return _serde_number(float(value))
    return json.dumps(value, ensure_ascii=False)


def _stored(value: Any) -> Any:
    """A flag value as the sidecar keeps it: integral doubles below 2^53 as integers (so -0
    is kept as 0), served back as doubles."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return float(int(value))
    if isinstance(value, dict):
        return {k: _stored(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_stored(v) for v in value]
    return value


def display(value: FlagValue) -> str:
    """The sidecar's FlagValue::display: `on`/`off`, a JSON string, a number as Rust's Display
    prints a double (its shortest digits, never an exponent: `1e21` is 1 and 21 zeros), other
    JSON as serde_json writes it."""
    if value is True:
        return "on"
    if value is False:
        return "off"
    if isinstance(value, (int, float)):
        n = float(value)
        sign = "-" if math.copysign(1.0, n) < 0 else ""
        if n == 0:
            return sign + "0"
        digits, exponent = _shortest_digits(n)
        if exponent >= len(digits) - 1:
            return sign + digits + "0" * (exponent - len(digits) + 1)
        if exponent >= 0:
            return sign + digits[:exponent + 1] + "." + digits[exponent + 1:]
        return sign + "0." + "0" * (-exponent - 1) + digits
    return _serde_json(value)


_JSON_SPACE = re.compile(r"[ \t\n\r]*")
_JSON_COMMA = re.compile(r"[ \t\n\r]*,?[ \t\n\r]*")
_JSON_COLON = re.compile(r"[ \t\n\r]*:[ \t\n\r]*")


def claimed_identity(payload: bytes) -> tuple[Optional[str], Optional[str]]:
    """The top-level string `id` and `type` an unverified body claims, read from its first
    CLAIM_PREFIX_BYTES only, as the sidecar does: fields met before the cut (or before
    anything that is not JSON) count, the first of each name, cut to 255 characters."""
    text = payload[:CLAIM_PREFIX_BYTES].decode("utf-8", "ignore")
    decoder = json.JSONDecoder()
    claimed: dict[str, Optional[str]] = {"id": None, "type": None}
    at = _JSON_SPACE.match(text).end()  # type: ignore[union-attr]  # matches the empty string
    if text[at:at + 1] != "{":
        return None, None
    at += 1
    try:
        while claimed["id"] is None or claimed["type"] is None:
            at = _JSON_COMMA.match(text, at).end()  # type: ignore[union-attr]
            key, at = decoder.raw_decode(text, at)
            colon = _JSON_COLON.match(text, at)
            if not isinstance(key, str) or colon is None:
                break
            value, at = decoder.raw_decode(text, colon.end())
            if key in claimed and claimed[key] is None and isinstance(value, str):
                claimed[key] = value[:255]
    except ValueError:
        pass
    return claimed["id"], claimed["type"]


def _event_object(event: Mapping[str, Any]) -> dict[str, Any]:
    data = event.get("data")
    obj = data.get("object") if isinstance(data, dict) else None
    return obj if isinstance(obj, dict) else {}


def _previous_attributes(event: Mapping[str, Any]) -> Optional[dict[str, Any]]:
    data = event.get("data")
    previous = data.get("previous_attributes") if isinstance(data, dict) else None
    return previous if isinstance(previous, dict) else None


def _object_str(obj: Mapping[str, Any], name: str) -> Optional[str]:
    """A non-empty string field of the event's object, as the sidecar's object_str."""
    value = obj.get(name)
    return value if isinstance(value, str) and value else None


def _customer_id(obj: Mapping[str, Any]) -> Optional[str]:
    """As the sidecar's customer_id: `customer` (a non-empty id or an expanded object), else
    the object itself when it is a customer."""
    customer = obj.get("customer")
    if isinstance(customer, str) and customer:
        return customer
    if isinstance(customer, dict):
        return customer.get("id") if isinstance(customer.get("id"), str) else None
    if obj.get("object") == "customer":
        return obj.get("id") if isinstance(obj.get("id"), str) else None
    return None


def _entitlement_lookup_keys(obj: Mapping[str, Any]) -> list[str]:
    """As the sidecar: each active entitlement's `lookup_key` (or its feature's), the valid
    flag keys among them, sorted and distinct; anything of another shape is skipped."""
    entitlements = obj.get("entitlements")
    items = entitlements.get("data") if isinstance(entitlements, dict) else None
    keys = set()
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, dict):
            continue
        key = item.get("lookup_key")
        if "lookup_key" not in item and isinstance(item.get("feature"), dict):
            key = item["feature"].get("lookup_key")
        if isinstance(key, str) and FLAG_KEY.fullmatch(key):
            keys.add(key)
    return sorted(keys)


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def _ascii_lower(text: str) -> str:
    return text.translate(_ASCII_LOWER)


def _words(name: str) -> list[str]:
    """Runs of letters and digits (any script), as Rust's `split(|c| !c.is_alphanumeric())`."""
    words, word = [], []
    for c in name:
        if c.isalnum():
            word.append(c)
        elif word:
            words.append("".join(word))
            word = []
    if word:
        words.append("".join(word))
    return words


TRUNCATED = "[truncated]"


def _bounded(metadata: dict[str, Any]) -> dict[str, Any]:
    """As the sidecar's audit::bound_metadata: while the canonical form is over the bound, the
    largest value (by its compact JSON; of equals, the last key) becomes "[truncated]"."""
    while len(rfc8785.dumps(metadata)) > MAX_METADATA_BYTES:
        largest, size = None, -1
        for key in sorted(metadata):
            value = metadata[key]
            if value == TRUNCATED:
                continue
            length = len(_serde_json(value).encode())
            if length >= size:
                largest, size = key, length
        if largest is None:
            return {}
        metadata = {**metadata, largest: TRUNCATED}
    return metadata


def _problem(type_base: str, slug: str, title: str, status: int, detail: str, reason: str, **extensions: Any) -> Problem:
    return Problem(
        type=f"{type_base.rstrip('/')}/{slug}",
        title=title,
        status=status,
        detail=detail,
        extensions={"reason": reason, **extensions},
    )


@dataclass
class _Flag:
    value: FlagValue
    version: int
    # The sidecar's EventOrder of the newest event that set or confirmed the flag.
    order: tuple[int, int, str]
    origin: str
    updated_by: str
    source_event_id: str = ""


@dataclass
class _Parked:
    """A refused event of a customer with no tenant, kept until the customer is mapped."""
    event: dict[str, Any]
    customer: str
    actor: str
    reason: str
    parked_at_ms: int


# Stripe's subscription statuses in lifecycle order; the two terminal ones share a place.
SUBSCRIPTION_STATUSES = ["incomplete", "trialing", "active", "past_due", "unpaid", "paused", "canceled", "incomplete_expired"]


def _subscription_status(event_type: str, obj: Mapping[str, Any]) -> Optional[str]:
    """As the sidecar: `.deleted` is canceled whatever its object says."""
    if event_type == "customer.subscription.deleted":
        return "canceled"
    if event_type.startswith("customer.subscription."):
        status = obj.get("status")
        return status if isinstance(status, str) and status else None
    return None


def _event_order(event_id: str, event_type: str, created: int, obj: Mapping[str, Any], previous: Any) -> tuple[int, int, str]:
    """The sidecar's EventOrder (src/stripe/event.rs): created, the tie rank, the event id."""
    if event_type == "customer.subscription.created":
        rank = 10
    elif event_type == "customer.subscription.deleted":
        rank = 100
    elif event_type in ("customer.subscription.updated", "customer.subscription.paused", "customer.subscription.resumed"):
        status = _subscription_status(event_type, obj)
        reached = 0
        if status in SUBSCRIPTION_STATUSES:
            position = min(SUBSCRIPTION_STATUSES.index(status), SUBSCRIPTION_STATUSES.index("canceled"))
            reached = 2 + 2 * position + (1 if isinstance(previous, dict) and "status" in previous else 0)
        rank = 30 + reached
    else:
        rank = 20
    return (created, rank, event_id)


SUBSCRIPTION_STATE_EVENTS = ("customer.subscription.created", "customer.subscription.updated", "customer.subscription.paused",
                             "customer.subscription.resumed", "customer.subscription.deleted")
# As the sidecar: the rule explain names for a key some subscription once set and none sets now.
NO_SUBSCRIPTION_SETS_IT = "catalog default (no subscription sets it)"


def _standing(status: Optional[str]) -> int:
    """As the sidecar: of a tenant's subscriptions, the one in the best standing decides."""
    return {"active": 3, "trialing": 3, "past_due": 2, "unpaid": 2, "incomplete": 2, "paused": 1}.get(status or "", 0)


# What the sidecar's coalescers open per window at most (MAX_RECORDS_PER_WINDOW), and the
# actor of the overflow record that counts the rest.
MAX_RECORDS_PER_WINDOW = 1000
OVERFLOW_ACTOR = "coresdk"
_Record = tuple[str, str, str, str, dict[str, Any]]


@dataclass
class _Window:
    opened: float
    opened_ms: int
    # The first occurrence's record with only the key's fields: the repeats record's pattern.
    repeats: _Record
    unreported: int = 0


class _Coalescer:
    """The sidecar's Coalescer (src/coalesce.rs) for one kind of record anyone can cause: per
    key and window, the first occurrence is written at once with `count: 1` and its details,
    the others counted into one `coalesced: "repeats"` record when the window ends. At most
    MAX_RECORDS_PER_WINDOW windows open per window; keys first seen past that are only counted,
    into one `coalesced: "overflow"` record per window (empty tenant, actor `coresdk`, the
    count by reason), so memory and records stay bounded whatever the keys."""

    def __init__(self, event: str, outcome: str, key_fields: tuple[str, ...], window_s: float):
        self.event, self.outcome, self.key_fields = event, outcome, key_fields
        self.window_s = window_s
        self.budget_window_s = max(window_s, 1.0)
        self.windows: dict[Any, _Window] = {}
        self.budget_opened = time.monotonic()
        self.used = 0
        self.overflow: dict[str, int] = {}
        self.overflow_reported: Optional[float] = None
        self.overflow_since_ms = int(time.time() * 1000)

    def admit(self, key: Any, reason: str, tenant: str, actor: str, meta: dict[str, Any], seal: Any) -> None:
        now = time.monotonic()
        window = self.windows.get(key)
        if window is not None:
            window.unreported += 1
            return
        if now - self.budget_opened >= self.budget_window_s:
            self.budget_opened, self.used = now, 0
        if self.used >= MAX_RECORDS_PER_WINDOW:
            self.overflow[reason] = self.overflow.get(reason, 0) + 1
            return
        self.used += 1
        pattern = (tenant, actor, self.event, self.outcome, {k: v for k, v in meta.items() if k in self.key_fields})
        self.windows[key] = _Window(now, int(time.time() * 1000), pattern)
        seal(tenant, actor, self.event, self.outcome, {**meta, "count": 1})

    def close_due(self, seal: Any) -> None:
        now = time.monotonic()
        for key, window in list(self.windows.items()):
            if now - window.opened >= self.window_s:
                del self.windows[key]
                if window.unreported:
                    tenant, actor, event, outcome, meta = window.repeats
                    seal(tenant, actor, event, outcome,
                         {**meta, "count": window.unreported, "coalesced": "repeats", "since_ms": window.opened_ms})
        due = self.overflow_reported is None or now - self.overflow_reported >= self.budget_window_s
        if due and self.overflow:
            reasons, self.overflow = dict(sorted(self.overflow.items())), {}
            seal("", OVERFLOW_ACTOR, self.event, self.outcome, {
                "reasons": reasons, "count": sum(reasons.values()), "coalesced": "overflow", "since_ms": self.overflow_since_ms})
            self.overflow_reported, self.overflow_since_ms = now, int(time.time() * 1000)


def _from_toml(value: Any) -> Any:
    """A TOML value as the sidecar's flag value: a date or time becomes its TOML text."""
    if isinstance(value, datetime.datetime):
        text = value.isoformat()
        return text[:-6] + "Z" if text.endswith("+00:00") else text
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: _from_toml(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_toml(v) for v in value]
    return value


class RulesError(ValueError):
    """A rules file the sidecar would refuse to start with; the message is the sidecar's."""


_RULE_KEYS = {"name", "events", "status", "plans", "set", "else", "entitlements"}


def _parse_rules(text: str) -> tuple[dict[str, FlagValue], list[dict[str, Any]]]:
    """The sidecar's Rules::parse (src/rules.rs): the same checks, so a file the sidecar refuses
    is refused here too instead of behaving differently; the same messages, except that TOML
    syntax errors and unknown keys are worded by the parser (both name the offending key)."""
    def invalid(problem: str) -> RulesError:
        return RulesError(f"invalid rules: {problem}")

    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise invalid(str(e)) from None
    for unknown in sorted(set(document) - {"flags", "rule"}):
        raise invalid(f"unknown field `{unknown}`, expected `flags` or `rule`")
    flags, specs = document.get("flags", {}), document.get("rule", [])
    if not isinstance(flags, dict) or not isinstance(specs, list) or not all(isinstance(r, dict) for r in specs):
        raise invalid("`flags` must be a table and `rule` an array of tables ([[rule]])")
    catalog: dict[str, FlagValue] = {}
    for key, value in flags.items():
        if not FLAG_KEY.fullmatch(key):
            raise invalid(f"flag key '{key}' must be 1-128 characters of letters, digits, _ - . :")
        if isinstance(value, float) and not math.isfinite(value):
            raise invalid("flag numbers must be finite")
        catalog[key] = _from_toml(value)
    rules: list[dict[str, Any]] = []
    names: set[str] = set()
    for n, spec in enumerate(specs, start=1):
        name = spec.get("name")
        if name is not None and (not isinstance(name, str) or not rust_trim(name)):
            raise invalid(f"rule {n} has an empty `name`")
        label = f"rule {n} ('{name}')" if name is not None else f"rule {n}"

        def bad(problem: str) -> RulesError:
            return invalid(f"{label} {problem}")

        for unknown in sorted(set(spec) - _RULE_KEYS):
            raise bad(f"has an unknown field `{unknown}`, expected one of {', '.join(sorted(_RULE_KEYS))}")
        events, plans = spec.get("events", []), spec.get("plans", [])
        to_set, otherwise = spec.get("set", {}), spec.get("else", {})
        entitlements, status = spec.get("entitlements", False), spec.get("status")
        if not isinstance(events, list) or not events or not all(isinstance(e, str) and e for e in events):
            raise bad("needs a non-empty `events` list")
        if not isinstance(plans, list) or not all(isinstance(p, str) for p in plans) or not isinstance(entitlements, bool) or not isinstance(to_set, dict) or not isinstance(otherwise, dict):
            raise bad("has a field of the wrong type (`plans`: strings, `set`/`else`: tables, `entitlements`: a boolean)")
        if entitlements == bool(to_set):
            raise bad("needs exactly one of `set` or `entitlements = true`")
        for plan in plans:
            # As the sidecar: plan names are matched word by word, so an entry that is not one word never matches.
            if not plan or not plan.isalnum():
                raise bad(f"lists plan '{plan}', which can never match: each `plans` entry is one word (letters and digits) of a price lookup_key or nickname, e.g. \"pro\" matches \"Pro Monthly\" and \"pro_annual\"")
        if otherwise and (not plans or entitlements):
            raise bad("has an `else`, which only a `set` rule with `plans` can have: it is what the rule sets when the plan does not match")
        if status is not None:
            if not isinstance(status, list) or not all(isinstance(x, str) for x in status):
                raise bad("has a `status` that is not a list of strings")
            if not status:
                raise bad("has an empty `status` list, which no event matches; leave it out to match any status")
            for unknown in status:
                if unknown not in SUBSCRIPTION_STATUSES:
                    raise bad(f"names status '{unknown}', which is not one of Stripe's subscription statuses ({', '.join(SUBSCRIPTION_STATUSES)})")
            for other in events:
                if not other.startswith("customer.subscription."):
                    raise bad(f"has a `status` condition but lists '{other}': only customer.subscription.* events carry a subscription status")
        for key, value in [*to_set.items(), *otherwise.items()]:
            if key not in catalog:
                raise bad(f"sets flag '{key}', which [flags] does not define")
            if isinstance(value, float) and not math.isfinite(value):
                raise invalid("flag numbers must be finite")
        name = name if name is not None else f"rule {n}"
        if name in names:
            raise invalid(f"two rules are named '{name}'; `flags explain` tells rules apart by name")
        names.add(name)
        rules.append({**spec, **{part: {k: _from_toml(v) for k, v in spec[part].items()} for part in ("set", "else") if part in spec}})
    return catalog, rules


class MockSidecar(BaseSDK):
    def __init__(self, settings: Optional[Settings] = None, env: Optional[Mapping[str, str]] = None):
        self.settings = settings or Settings.from_env(env)
        env = os.environ if env is None else env
        secrets = [rust_trim(s) for s in env.get("STRIPE_WEBHOOK_SECRET", "").split(",") if rust_trim(s)]
        self._secrets = secrets or [MOCK_SECRET]
        self._jwt_secrets = [rust_trim(s).encode() for s in env.get("CORESDK_JWT_SECRET", "").split(",") if rust_trim(s)]
        self._jwt_issuer = env.get("CORESDK_JWT_ISSUER") or None
        self._jwt_audience = [rust_trim(a) for a in env.get("CORESDK_JWT_AUDIENCE", "").split(",") if rust_trim(a)]
        self._tenant_claim = env.get("CORESDK_JWT_TENANT_CLAIM", "tenant_id")
        self._jwt_leeway_s = int(env.get("CORESDK_JWT_LEEWAY_S") or JWT_LEEWAY_S)
        self._audit_window_s = float(env.get("CORESDK_DENY_AUDIT_WINDOW_S") or DENY_AUDIT_WINDOW_S)
        self._tolerance_s = int(env.get("CORESDK_WEBHOOK_TOLERANCE_S") or TOLERANCE_S)
        self._max_body = int(env.get("CORESDK_WEBHOOK_MAX_BODY_BYTES") or MAX_BODY)
        self._max_parked = int(env.get("CORESDK_MAX_PARKED_EVENTS") or MAX_PARKED_EVENTS)
        self._max_parked_per_customer = int(env.get("CORESDK_MAX_PARKED_EVENTS_PER_CUSTOMER") or MAX_PARKED_EVENTS_PER_CUSTOMER)
        self._base = env.get("CORESDK_PROBLEM_TYPE_BASE", self.settings.problem_type_base)
        # As the sidecar: CORESDK_ADMIN_TOKEN is the operator `admin`, whose name an admin
        # change is audited under, the caller's actor kept as `claimed_actor`. Without it the
        # claim is the actor (the sidecar's mock mode). Tokens are not checked here, and the
        # named operators' file (CORESDK_ADMIN_TOKENS_FILE) is the sidecar's alone.
        # An empty or blank token is refused at start, as the sidecar does, rather than taken
        # as unset (which would turn operators off) or as a fall-through to the file.
        admin_token = env.get("CORESDK_ADMIN_TOKEN")
        if admin_token is not None and not rust_trim(admin_token):
            raise ValueError("CORESDK_ADMIN_TOKEN is set but empty; unset it, or set a token of at least 16 characters")
        if admin_token is not None and env.get("CORESDK_ADMIN_TOKEN_FILE") is not None:
            raise ValueError("CORESDK_ADMIN_TOKEN and CORESDK_ADMIN_TOKEN_FILE are one too many; set one")
        self._operator = "admin" if admin_token is not None or env.get("CORESDK_ADMIN_TOKEN_FILE") is not None else None
        self._billing_url = env.get("CORESDK_BILLING_URL")
        self._upgrade_url = env.get("CORESDK_UPGRADE_URL")
        rules_file = env.get("CORESDK_RULES_FILE")
        text = open(rules_file, encoding="utf-8").read() if rules_file else resources.files("coresdk").joinpath("default_rules.toml").read_text("utf-8")
        catalog, self._rules = _parse_rules(text)
        self._catalog = {key: wire(value) for key, value in catalog.items()}
        self._lock = threading.RLock()
        self._customers = dict(MOCK_TENANTS)
        self._flags: dict[tuple[str, str], _Flag] = {}
        self._processed: dict[str, tuple[str, str, int]] = {}
        # Events of customers with no tenant, by event id (see _park).
        self._parked: dict[str, _Parked] = {}
        # The newest entitlement summary applied, per tenant.
        # The sidecar's billing objects (src/ops/objects.rs): (tenant, "subscription:<id>" or
        # "entitlements") -> (the newest event's order, the state it left).
        self._objects: dict[tuple[str, str], tuple[tuple[int, int, str], dict[str, Any]]] = {}
        self._audit: list[AuditRecord] = []
        # The Merkle tree: the leaf hash of each kept record, and the roots of the complete
        # subtrees of the dropped records' prefix ((first leaf, leaf count) -> hash), the only
        # hashes of theirs any root or proof of a kept record needs (see _subtree).
        self._leaves: list[bytes] = []
        self._dropped: dict[tuple[int, int], bytes] = {}
        self._origin = f"coresdk.mock/{token_hex(6)}"
        self._signing_key: Any = None
        self._checkpoint: tuple[int, str] = (-1, "")
        self._version = 0
        # Coalescing windows by key: (start, start in ms, repeats since, the repeats record's pattern).
        # Refused deliveries and denials, coalesced as the sidecar does (src/coalesce.rs).
        self._refusals = _Coalescer("billing.webhook.refused", "rejected", ("reason",), self._audit_window_s)
        self._denials = _Coalescer("auth.denied", "denied", ("reason", "feature", "subject"), self._audit_window_s)
        # As a sidecar's first start with its tenants file: the seeding is the chain's first record.
        self._seal("", SEED_ACTOR, "tenant.mappings_seeded", "applied", {
            "configured": len(MOCK_TENANTS), "added": len(MOCK_TENANTS), "unchanged": 0,
            "kept_runtime": 0, "kept_unmapped": 0, "overridden": 0})

    # -- audit ----------------------------------------------------------------------------

    def _append(self, tenant_id: str, actor: str, event: str, outcome: str, metadata: Mapping[str, Any]) -> AuditRecord:
        with self._lock:
            self._close_windows()
            return self._seal(tenant_id, actor, event, outcome, metadata)

    def _seal(self, tenant_id: str, actor: str, event: str, outcome: str, metadata: Mapping[str, Any]) -> AuditRecord:
        """As the sidecar's audit::seal: the hash covers RFC 8785 of exactly
        {v, seq, time, tenant, actor, event, outcome, metadata}, the bytes kept as hashed."""
        seq = self._audit[-1].seq + 1 if self._audit else 1
        prev = self._audit[-1].hash if self._audit else GENESIS_HASH
        at = rfc3339_ms(int(time.time() * 1000))
        metadata = _bounded(wire(dict(metadata)))
        canonical = rfc8785.dumps({"v": 1, "seq": seq, "time": at, "tenant": tenant_id, "actor": actor, "event": event,
                                   "outcome": outcome, "metadata": metadata})
        digest = hashlib.sha256(DOMAIN_TAG + bytes.fromhex(prev) + canonical).hexdigest()
        record = AuditRecord(seq, tenant_id, actor, event, outcome, metadata, digest, at, prev, canonical)
        self._audit.append(record)
        self._leaves.append(transparency.leaf_hash(canonical))
        # Dropped in batches, not one per append: a list's front deletion moves every record.
        if len(self._audit) > MAX_AUDIT_RECORDS + MAX_AUDIT_RECORDS // 10:
            self._drop(len(self._audit) - MAX_AUDIT_RECORDS)
        return record

    # -- the Merkle tree ------------------------------------------------------------------

    def _first_leaf(self) -> int:
        """The leaf index of the oldest kept record: the dropped prefix's size."""
        return self._audit[0].seq - 1 if self._audit else 0

    def _drop(self, count: int) -> None:
        """Drops the oldest `count` records, keeping the roots of the complete subtrees that
        the binary decomposition of the new dropped prefix has (one per set bit of its size)."""
        end = self._first_leaf() + count
        frontier: dict[tuple[int, int], bytes] = {}
        start = 0
        for bit in reversed(range(end.bit_length())):
            if end >> bit & 1:
                frontier[(start, 1 << bit)] = self._subtree(start, start + (1 << bit))
                start += 1 << bit
        del self._audit[:count]
        del self._leaves[:count]
        self._dropped = frontier

    def _subtree(self, lo: int, hi: int) -> bytes:
        """MTH(D[lo:hi]) as RFC 6962 section 2.1 defines it. A range within the dropped prefix
        is known only as one of its kept subtree roots: every range a root or a kept record's
        proof needs is (its parent reaches past the prefix, so it is a maximal one)."""
        n = hi - lo
        if n == 0:
            return transparency.EMPTY_ROOT
        first = self._first_leaf()
        if hi <= first:
            known = self._dropped.get((lo, n))
            if known is None:
                raise self._capacity("audit records (the proof needs hashes of dropped ones)", MAX_AUDIT_RECORDS)
            return known
        if n == 1:
            return self._leaves[lo - first]
        k = 1 << ((n - 1).bit_length() - 1)
        return transparency.node_hash(self._subtree(lo, lo + k), self._subtree(lo + k, hi))

    def _path(self, m: int, lo: int, hi: int) -> list[bytes]:
        """PATH(m, D[lo:hi]) (RFC 6962 section 2.1.1), leaf m counted from 0 of the whole tree."""
        n = hi - lo
        if n == 1:
            return []
        k = 1 << ((n - 1).bit_length() - 1)
        if m < lo + k:
            return self._path(m, lo, lo + k) + [self._subtree(lo + k, hi)]
        return self._path(m, lo + k, hi) + [self._subtree(lo, lo + k)]

    def _subproof(self, m: int, lo: int, hi: int, whole: bool) -> list[bytes]:
        """SUBPROOF(m, D[lo:hi], b) (RFC 6962 section 2.1.2)."""
        n = hi - lo
        if m == n:
            return [] if whole else [self._subtree(lo, hi)]
        k = 1 << ((n - 1).bit_length() - 1)
        if m <= k:
            return self._subproof(m, lo, lo + k, whole) + [self._subtree(lo + k, hi)]
        return self._subproof(m - k, lo + k, hi, False) + [self._subtree(lo, lo + k)]

    def _size(self) -> int:
        return self._audit[-1].seq if self._audit else 0

    def _key(self) -> Any:
        if self._signing_key is None:
            try:
                from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
            except ImportError:
                raise ImportError(
                    "the mock signs its audit checkpoints with the `cryptography` package: pip install 'coresdk[verify]'"
                ) from None
            self._signing_key = Ed25519PrivateKey.generate()
        return self._signing_key

    @property
    def audit_verifier_key(self) -> str:
        """The verifier key of this mock's checkpoints, as `coresdk audit public-key` prints the
        sidecar's: `<name>+<hex key id>+<base64(0x01 || public key)>`."""
        from cryptography.hazmat.primitives import serialization

        public = self._key().public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        typed = bytes([transparency.ED25519]) + public
        return str(transparency.VerifierKey(self._origin, transparency.key_id(self._origin, typed), public))

    def _sign_checkpoint(self) -> tuple[int, str]:
        """A checkpoint of the current tree (the newest, signed when first asked for). As the
        sidecar, none of the empty log: it signs its first checkpoint after the first record."""
        size = self._size()
        if size == 0:
            raise ProblemError(
                _problem(self._base, "checkpoint-not-found", "Checkpoint not found", 404,
                         "no audit checkpoint has been signed yet: the first is signed within CORESDK_AUDIT_CHECKPOINT_INTERVAL_S of the first record",
                         "CHECKPOINT_NOT_FOUND"),
                grpc.StatusCode.NOT_FOUND,
            )
        if self._checkpoint[0] != size:
            root = self._subtree(0, size)
            text = f"{self._origin}\n{size}\n{base64.b64encode(root).decode()}\n"
            key = transparency.VerifierKey.parse(self.audit_verifier_key)
            signature = key.key_id.to_bytes(4, "big") + self._key().sign(text.encode())
            self._checkpoint = (size, f"{text}\n\u2014 {self._origin} {base64.b64encode(signature).decode()}\n")
        return self._checkpoint

    def _prove(self, seq: int, tree_size: int) -> InclusionProof:
        """As the sidecar's App::inclusion_proof, with its errors; tree size 0 is the newest
        checkpoint's tree, whose note comes with the proof."""
        if seq == 0:
            raise self._invalid("seq: is required (records are numbered from 1)")
        note = ""
        if tree_size == 0:
            tree_size, note = self._sign_checkpoint()
        if tree_size < seq:
            raise self._invalid(f"tree_size: is {tree_size}, smaller than the seq {seq} it must hold")
        self._within_log(tree_size)
        return InclusionProof(seq - 1, tree_size, self._path(seq - 1, 0, tree_size), note)

    def _within_log(self, tree_size: int) -> None:
        records = self._size()
        if tree_size > records:
            raise ProblemError(
                _problem(self._base, "out-of-range", "Out of range", 400,
                         f"the audit log holds {records} records, fewer than the tree size {tree_size} asked for",
                         "OUT_OF_RANGE"),
                grpc.StatusCode.OUT_OF_RANGE,
            )

    def audit_checkpoint(self) -> str:
        with self._lock:
            self._close_windows()
            return self._sign_checkpoint()[1]

    def audit_inclusion_proof(self, seq: int, tree_size: int = 0) -> InclusionProof:
        with self._lock:
            self._close_windows()
            return self._prove(seq, tree_size)

    def audit_consistency_proof(self, from_size: int, to_size: int = 0) -> ConsistencyProof:
        with self._lock:
            self._close_windows()
            if to_size == 0:
                to_size = self._sign_checkpoint()[0]
            if from_size > to_size:
                raise self._invalid(f"from_size: is {from_size}, larger than to_size {to_size}")
            self._within_log(to_size)
            hashes = [] if from_size in (0, to_size) else self._subproof(from_size, 0, to_size, True)
            return ConsistencyProof(from_size, to_size, hashes)

    def _audit_index(self, seq: int) -> int:
        """Where record `seq` is (or would be) in the kept records."""
        return seq - (self._audit[0].seq if self._audit else 1)

    def _record(self, seq: int) -> Optional[AuditRecord]:
        index = self._audit_index(seq)
        return self._audit[index] if 0 <= index < len(self._audit) else None

    def audit(
        self,
        event: str,
        *,
        outcome: str,
        actor: str,
        tenant_id: str = "",
        metadata: Optional[Mapping[str, Any]] = None,
        include_proof: bool = False,
    ) -> Optional[AuditRecord]:
        # As the sidecar's audit::validate_new: every violation, named by its field.
        violations = []
        for field_name, value, required in (("actor", actor, True), ("event", event, True), ("outcome", outcome, True), ("tenant_id", tenant_id, False)):
            if required and not rust_trim(value):
                violations.append(f"{field_name}: is required")
            elif len(value.encode()) > MAX_FIELD_LEN:
                violations.append(f"{field_name}: is longer than {MAX_FIELD_LEN} bytes")
        name = ascii_lower(event.lstrip(WHITE_SPACE))
        for namespace in RESERVED_NAMESPACES:
            if name == namespace or name.startswith(namespace + "."):
                violations.append(
                    f"event: '{namespace}.' is reserved for the sidecar's own records; name application events in a namespace of your own, e.g. 'app.'"
                )
        if ascii_lower(rust_trim(actor)) == ACTOR:
            violations.append(f"actor: '{ACTOR}' is reserved for verified Stripe deliveries")
        # What the sidecar receives: a google.protobuf.Struct, so numbers are doubles.
        values = wire(json.loads(json.dumps(metadata or {}, default=str)))
        size = len(rfc8785.dumps(values))
        if size > MAX_METADATA_BYTES:
            violations.append(f"metadata: is {size} bytes canonicalised, over the {MAX_METADATA_BYTES}-byte bound")
        if violations:
            raise self._invalid("; ".join(violations))
        if tenant_id:
            self._check_ids(tenant_id)
        if include_proof:
            # As the sidecar refuses CHECKPOINTS_OFF: before anything is written.
            self._key()
        with self._lock:
            record = self._append(tenant_id, actor, event, outcome, values)
            return dataclasses.replace(record, inclusion_proof=self._prove(record.seq, 0)) if include_proof else record

    def audit_query(self, *, tenant_id: str = "", event_prefix: str = "", outcome: str = "", limit: int = 1000) -> list[AuditRecord]:
        if tenant_id:
            self._check_ids(tenant_id)
        with self._lock:
            self._close_windows()
            out = [
                r for r in self._audit
                if (not tenant_id or r.tenant_id == tenant_id)
                and r.event.startswith(event_prefix)
                and (not outcome or r.outcome == outcome)
            ]
        return out[:limit]

    def audit_verify(self, *, full: bool = False) -> VerifyResult:
        # The mock always checks every record it keeps (it signs no checkpoint to start from).
        with self._lock:
            self._close_windows()
            head_seq = self._size()
            head_hash = self._audit[-1].hash if self._audit else GENESIS_HASH
            # The kept records chain on from the first one kept.
            prev = self._audit[0].prev_hash if self._audit else GENESIS_HASH
            first = self._audit[0].seq if self._audit else 1
            for i, r in enumerate(self._audit):
                digest = hashlib.sha256(DOMAIN_TAG + bytes.fromhex(prev) + r.canonical).hexdigest()
                if (r.seq != first + i or r.prev_hash != prev or r.hash != digest
                        or self._leaves[i] != transparency.leaf_hash(r.canonical)):
                    return VerifyResult(False, i, first + i, f"record {first + i} does not verify",
                                        head_seq=head_seq, head_hash=head_hash)
                prev = digest
            return VerifyResult(True, len(self._audit), head_seq=head_seq, head_hash=head_hash,
                                tree_root=self._subtree(0, head_seq).hex())

    # -- errors ---------------------------------------------------------------------------

    def _invalid(self, detail: str) -> ProblemError:
        return invalid(detail, self._base)

    def _capacity(self, what: str, most: int) -> ProblemError:
        return ProblemError(
            _problem(self._base, "mock-capacity", "Mock capacity reached", 507,
                     f"the mock keeps at most {most} {what}; it is a mock, not a store", "MOCK_CAPACITY"),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        )

    def _signature_error(self, reason: str, detail: str) -> ProblemError:
        return ProblemError(_problem(self._base, "invalid-signature", "Invalid webhook signature", 400, detail, reason))

    # -- webhooks -------------------------------------------------------------------------

    def _verify_signature(self, payload: bytes, header: str) -> int:
        """The sidecar's parse_header and SignatureVerifier::verify, with its messages."""
        def malformed(why: str) -> ProblemError:
            return self._signature_error("SIGNATURE_MALFORMED", f"the Stripe-Signature header is malformed: {why}")

        header = rust_trim(header or "")
        if not header:
            raise self._signature_error("SIGNATURE_MISSING", "the Stripe-Signature header is missing or empty")
        if len(header.encode()) > MAX_SIGNATURE_HEADER_LEN:
            raise malformed("header is too long")
        timestamp: Optional[int] = None
        signatures: list[bytes] = []
        for item in header.split(","):
            scheme, sep, value = rust_trim(item).partition("=")
            if not sep:
                raise malformed("an item has no '='")
            scheme, value = rust_trim(scheme), rust_trim(value)
            if scheme == "t":
                if timestamp is not None:
                    raise malformed("more than one timestamp")
                if not value or not (value.isascii() and value.isdigit()):
                    raise malformed("the timestamp is not a number")
                if int(value) >= 2**63:
                    raise malformed("the timestamp is out of range")
                timestamp = int(value)
            elif scheme == "v1":
                if not value:
                    raise malformed("an empty v1 signature")
                if len(value) != 64:
                    raise malformed("a v1 signature is not 64 hex characters")
                if not re.fullmatch(r"[0-9a-fA-F]{64}", value):
                    raise malformed("a v1 signature is not hexadecimal")
                signatures.append(bytes.fromhex(value))
        if timestamp is None:
            raise malformed("no timestamp (t=)")
        if not signatures:
            raise self._signature_error("SIGNATURE_MALFORMED", "the Stripe-Signature header carries no v1 signature")
        signed = f"{timestamp}.".encode() + payload
        matched = False
        for secret in self._secrets:
            expected = hmac.new(secret.encode(), signed, hashlib.sha256).digest()
            for candidate in signatures:
                matched |= hmac.compare_digest(expected, candidate)
        if not matched:
            raise self._signature_error("SIGNATURE_MISMATCH", "no v1 signature matches any configured webhook secret")
        skew = int(time.time()) - timestamp
        if abs(skew) > self._tolerance_s:
            raise self._signature_error(
                "SIGNATURE_TIMESTAMP_OUT_OF_TOLERANCE",
                f"the signature timestamp is {skew} s away from now, outside the {self._tolerance_s} s tolerance (replay or clock skew)",
            )
        return timestamp

    def _refuse(self, error: ProblemError, payload: bytes) -> ProblemError:
        """As the sidecar's refused_delivery_record: the reason, the detail, the size and the
        identity the unverified body claims, coalesced per reason."""
        reason = error.problem.reason or ""
        meta: dict[str, Any] = {"reason": reason, "detail": error.problem.detail, "payload_bytes": len(payload)}
        claimed_id, claimed_type = claimed_identity(payload)
        if claimed_id is not None:
            meta["claimed_event_id"] = claimed_id
        if claimed_type is not None:
            meta["claimed_event_type"] = claimed_type
        with self._lock:
            self._close_windows()
            self._refusals.admit(reason, reason, "", ACTOR, meta, self._seal)
        return error

    def _close_windows(self) -> None:
        """Writes what the sidecar's coalescing writer would have written by now: the repeats
        records of windows that ended and the overflow records that are due. The sidecar does
        it on a timer; the mock, which runs no background task, whenever the audit trail is
        touched, so every record lands in the order the sidecar's would."""
        for coalescer in (self._refusals, self._denials):
            coalescer.close_due(self._seal)

    def _evaluate(self, event_type: str, obj: Mapping[str, Any]) -> tuple[str, list[tuple[str, FlagValue, str]], str]:
        """As the sidecar's rules: (kind, [(flag, value, the deciding rule's name)], the
        entitlements rule's name for a summary)."""
        status = _subscription_status(event_type, obj)
        if status is not None and status not in SUBSCRIPTION_STATUSES:
            return "ignored", [], ""
        wanted: list[tuple[str, FlagValue, str]] = []
        for n, rule in enumerate(self._rules, start=1):
            if event_type not in rule.get("events", []):
                continue
            if rule.get("status") and status not in rule["status"]:
                continue
            name = rule.get("name") or f"rule {n}"
            plans = list(rule.get("plans", []))
            plan_matches = not plans or self._on_plan(obj, plans)
            if rule.get("entitlements"):
                if not plan_matches:
                    continue
                return "entitlements", [(k, True, name) for k in _entitlement_lookup_keys(obj)], name
            # In key order, as the sidecar's tables (BTreeMap) are.
            for key, value in sorted(rule.get("set" if plan_matches else "else", {}).items()):
                wanted = [w for w in wanted if w[0] != key] + [(key, wire(value), name)]
        return ("set" if wanted else "ignored"), wanted, ""

    @staticmethod
    def _on_plan(obj: Mapping[str, Any], plans: list[str]) -> bool:
        """As the sidecar's on_plan: a word (a run of Unicode letters and digits) of a plan name
        equals a listed plan, ignoring ASCII case only."""
        names: list[str] = []
        holders: list[Any] = []
        items = obj.get("items")
        data = items.get("data") if isinstance(items, dict) else None
        for item in data if isinstance(data, list) else []:
            if isinstance(item, dict):
                holders += [item.get("price"), item.get("plan")]
        holders.append(obj.get("plan"))
        for holder in holders:
            if isinstance(holder, dict):
                names += [holder.get(f) for f in ("lookup_key", "nickname") if isinstance(holder.get(f), str)]
        wanted = {_ascii_lower(p) for p in plans}
        return any(_ascii_lower(word) in wanted for name in names for word in _words(name))

    def _too_large(self, size: int) -> ProblemError:
        return ProblemError(_problem(self._base, "payload-too-large", "Payload too large", 413,
                                     f"the payload is {size} bytes, over the {self._max_body}-byte limit", "PAYLOAD_TOO_LARGE"))

    def _not_an_event(self, detail: str) -> ProblemError:
        return ProblemError(_problem(self._base, "invalid-event", "Not a Stripe event", 400,
                                     f"the verified payload is not a Stripe event: {detail}", "INVALID_EVENT"))

    def _parse_event(self, payload: bytes, latest: int, after_what: str) -> dict[str, Any]:
        """The sidecar's StripeEvent::parse: `created` is required (Stripe always sends it; any
        stand-in would differ between delivery attempts) and may not lie more than
        MAX_CREATED_AHEAD_S after `latest` (the signature time, or now for an export)."""
        try:
            event = json.loads(payload)
        except ValueError as e:
            raise self._not_an_event(f"the body is not JSON ({e})") from None
        if not isinstance(event, dict):
            raise self._not_an_event("the body is not a JSON object")
        for name in ("id", "type"):
            value = event.get(name)
            if not isinstance(value, str) or not value:
                raise self._not_an_event(f"no `{name}` string in the event")
            if len(value.encode()) > MAX_EVENT_FIELD_LEN:
                raise self._not_an_event(f"`{name}` is longer than {MAX_EVENT_FIELD_LEN} characters")
            if name == "id" and value.startswith(RESERVED_EVENT_ID_PREFIX):
                raise self._not_an_event(
                    f"event ids starting with `{RESERVED_EVENT_ID_PREFIX}` are the sidecar's own (Stripe's start with `evt_`)"
                )
        created = event.get("created")
        if created is None:
            raise self._not_an_event("no `created` in the event; Stripe always sends one")
        if not isinstance(created, int) or isinstance(created, bool) or not -(2**63) <= created < 2**63:
            raise self._not_an_event("`created` is not an integer timestamp")
        if created < 0:
            raise self._not_an_event(f"`created` ({created}) is before 1970")
        if created > latest + MAX_CREATED_AHEAD_S:
            raise self._not_an_event(f"`created` ({created}) is more than {MAX_CREATED_AHEAD_S} s after {after_what} ({latest})")
        return event

    def handle_stripe_webhook(self, payload: bytes, signature_header: str, *, include_proof: bool = False) -> WebhookResult:
        # As the sidecar's verify_delivery: size, then signature, then that the body is an event.
        try:
            if len(payload) > self._max_body:
                raise self._too_large(len(payload))
            signed_at = self._verify_signature(payload, signature_header)
            event = self._parse_event(payload, signed_at, "the signature timestamp; Stripe signs events after creating them")
        except ProblemError as e:
            raise self._refuse(e, payload) from None
        if include_proof:
            # As the sidecar refuses CHECKPOINTS_OFF: before anything is written.
            self._key()
        result = self._apply(event, signed_at, ACTOR, "")
        if not include_proof:
            return result
        with self._lock:
            return dataclasses.replace(result, inclusion_proof=self._prove(result.audit_seq, 0))

    def replay_event(self, payload: bytes, *, reason: str) -> WebhookResult:
        if not rust_trim(reason):
            raise self._invalid("reason: is required")
        if len(reason.encode()) > MAX_REASON_LEN:
            raise self._invalid(f"reason: is longer than {MAX_REASON_LEN} bytes")
        if len(payload) > self._max_body:
            raise self._too_large(len(payload))
        now = int(time.time())
        event = self._parse_event(payload, now, "now; an exported event cannot come from the future")
        # As the sidecar: the records written now name the operator who asked for the replay.
        return self._apply(event, now, REPLAY_ACTOR, reason, operator=self._operator)

    def _park(self, event: dict[str, Any], customer: str, actor: str, reason: str, meta: dict[str, Any]) -> None:
        """As the sidecar's parking (src/ops/parking.rs): keeps the refused event unless it is
        kept already or a bound is reached, and says which in the refusal's record."""
        parked = self._parked.get(event["id"])
        why = None
        if parked is None:
            if id_defect(customer) is not None:
                why = "the customer id is not one a tenant can be mapped to"
            elif self._max_parked == 0 or self._max_parked_per_customer == 0:
                why = "parking is off (CORESDK_MAX_PARKED_EVENTS or CORESDK_MAX_PARKED_EVENTS_PER_CUSTOMER is 0)"
            elif len(self._parked) >= self._max_parked:
                why = f"{self._max_parked} events are parked, the most kept (CORESDK_MAX_PARKED_EVENTS)"
            elif sum(1 for p in self._parked.values() if p.customer == customer) >= self._max_parked_per_customer:
                why = f"{self._max_parked_per_customer} events of this customer are parked, the most kept per customer (CORESDK_MAX_PARKED_EVENTS_PER_CUSTOMER)"
            else:
                parked = self._parked[event["id"]] = _Parked(event, customer, actor, reason, int(time.time() * 1000))
        if parked is not None:
            meta.update({"parked": True, "parked_at_ms": parked.parked_at_ms})
        else:
            meta.update({"parked": False, "not_parked": why})

    def _apply_parked(self, customer: str, except_id: Optional[str] = None) -> int:
        """Applies the customer's parked events in event order, each as its own delivery, and
        drops them; returns how many were applied."""
        taken = [p for p in self._parked.values() if p.customer == customer]
        for parked in taken:
            del self._parked[parked.event["id"]]
        taken = [p for p in taken if p.event["id"] != except_id]
        order = lambda p: _event_order(p.event["id"], p.event["type"], p.event["created"], _event_object(p.event), _previous_attributes(p.event))
        applied = 0
        for parked in sorted(taken, key=order):
            try:
                self._apply(parked.event, parked.event["created"], parked.actor, parked.reason, parked_at_ms=parked.parked_at_ms)
                applied += 1
            except ProblemError:
                pass
        return applied

    def _apply(self, event: dict[str, Any], signed_at: int, actor: str, reason: str, parked_at_ms: Optional[int] = None,
               operator: Optional[str] = None) -> WebhookResult:
        event_id, event_type = event["id"], event["type"]
        created = event["created"]
        obj = _event_object(event)
        customer = _customer_id(obj)
        audit_event = f"billing.{event_type}"
        # As the sidecar's base_metadata.
        meta: dict[str, Any] = {"event_id": event_id, "event_type": event_type, "created": created,
                                "livemode": event.get("livemode") is True}
        if customer is not None:
            meta["customer"] = customer
        if _object_str(obj, "id") is not None:
            meta["object_id"] = _object_str(obj, "id")
        if reason:
            meta["reason"] = reason
        if operator is not None:
            meta["operator"] = operator
        if parked_at_ms is not None:
            meta["parked_at_ms"] = parked_at_ms
        with self._lock:
            if event_id in self._processed:
                tenant, first_outcome, first_seq = self._processed[event_id]
                record = self._append(tenant, actor, audit_event, "duplicate", {**meta, "first_outcome": first_outcome, "first_audit_seq": first_seq})
                return WebhookResult(event_id, event_type, tenant, "duplicate", [], record.seq, [])
            kind, wanted, summary_rule = self._evaluate(event_type, obj)
            mapped = False
            tenant = None
            # As the sidecar's resolve_tenant: the mapping first; a checkout's valid
            # client_reference_id maps a customer with no tenant (never moves one); then a
            # valid metadata.tenant_id. An invalid id is no id at all.
            reference = _object_str(obj, "client_reference_id")
            if event_type != "checkout.session.completed" or (reference is not None and id_defect(reference) is not None):
                reference = None
            current = self._customers.get(customer) if customer is not None else None
            if current is not None:
                tenant = current
                if reference is not None and reference != current:
                    meta["mapping_refused"] = True
                    meta["conflicting_client_reference_id"] = reference
            elif customer is not None and reference is not None and id_defect(customer) is None:
                if len(self._customers) >= MAX_CUSTOMERS:
                    raise self._capacity("customer mappings", MAX_CUSTOMERS)
                mapped = True
                tenant = self._customers[customer] = reference
                meta["mapped_customer"] = customer
                # An event applied from parking never maps: the recursion is one level deep.
                if parked_at_ms is None and (applied := self._apply_parked(customer, except_id=event_id)):
                    meta["parked_events_applied"] = applied
            else:
                claimed = _object_str(obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}, "tenant_id")
                tenant = claimed if claimed is not None and id_defect(claimed) is None else None
            if tenant is None:
                if kind == "ignored":
                    return self._finish(actor, event_id, event_type, "", "ignored", [], [], meta)
                detail = (f"no tenant is mapped for customer '{quoted(customer)}'" if customer is not None
                          else "the event names no customer and no metadata.tenant_id, so no tenant can be resolved")
                if customer is not None:
                    self._park(event, customer, actor, reason, meta)
                self._append("", actor, audit_event, "rejected", {"refusal": detail, **meta})
                raise ProblemError(_problem(self._base, "unknown-customer", "Unknown customer", 422, detail, "UNKNOWN_CUSTOMER"))
            order = _event_order(event_id, event_type, created, obj, _previous_attributes(event))
            wanted, stale_object = self._resolve(tenant, kind, event_type, obj, order, wanted, summary_rule)
            stale: list[str] = []
            if stale_object is not None:
                meta.update({"stale_object": stale_object[0], "newer_event_id": stale_object[1]})
                stale = list(stale_object[2])
            if not wanted and not mapped:
                return self._finish(actor, event_id, event_type, tenant, "stale" if stale else "ignored", [], stale, meta)
            if len(self._flags) + len({key for key, *_ in wanted if (tenant, key) not in self._flags}) > MAX_FLAGS:
                raise self._capacity("flags", MAX_FLAGS)
            changes, rules = [], {}
            for key, value, rule, mark, origin in wanted:
                current = self._flags.get((tenant, key))
                # As the sidecar: an admin's value stands until a strictly newer event.
                if current is not None and (current.order > mark or (current.origin == "admin" and current.order == mark)):
                    if key not in stale:
                        stale.append(key)
                    continue
                if current is not None and current.value == value:
                    current.order = max(current.order, mark)
                    continue
                self._version += 1
                self._flags[(tenant, key)] = _Flag(value, self._version, mark, origin, actor, event_id)
                changes.append(FlagChange(key, current.value if current else None, value, self._version))
                rules[key] = rule
            if rules:
                meta["rules"] = rules
            outcome = "stale" if not mapped and (stale_object is not None or (not changes and stale)) else "applied"
            return self._finish(actor, event_id, event_type, tenant, outcome, changes, stale, meta)

    def _resolve(self, tenant, kind, event_type, obj, order, wanted, summary_rule):
        """As the sidecar's billing objects (src/ops/objects.rs): the flag writes an event asks
        for, each (key, value, rule, order mark, origin), and (object, newer event id, keys) when
        the event is older than its object's newest."""
        if kind == "entitlements":
            keys = sorted({k for k, _, _ in wanted})
            stored = self._objects.get((tenant, "entitlements"))
            known = set(stored[1]["known"]) if stored else set()
            first_named = []
            for key in keys:
                if key not in known:
                    known.add(key)
                    first_named.append(key)
            if stored is not None and stored[0] > order:
                # Stale as a whole, but the newest summary's verdict on a key only this one named is off.
                self._put_object((tenant, "entitlements"), (stored[0], {**stored[1], "known": known}))
                return [(k, False, summary_rule, stored[0], "entitlements") for k in first_named], ("entitlements", stored[0][2], keys)
            self._put_object((tenant, "entitlements"), (order, {"keys": set(keys), "known": known}))
            return [(k, k in keys, summary_rule, order, "entitlements") for k in sorted(known)], None
        if kind == "set" and event_type in SUBSCRIPTION_STATE_EVENTS:
            sub_id = obj.get("id") if isinstance(obj.get("id"), str) else ""
            name = f"subscription:{sub_id[:255]}"
            stored = self._objects.get((tenant, name))
            keys = set(stored[1]["keys"]) if stored else set()
            keys |= {k for k, _, _ in wanted}
            stale = None
            if stored is not None and stored[0] > order:
                keys_grew = keys != stored[1]["keys"]
                self._put_object((tenant, name), (stored[0], {**stored[1], "keys": keys}))
                stale = (name, stored[0][2], [k for k, _, _ in wanted])
                if not keys_grew:
                    return [], stale
            else:
                status = _subscription_status(event_type, obj)
                self._put_object((tenant, name), (order, {"standing": _standing(status), "settings": wanted, "keys": keys}))
            return self._subscription_flags(tenant), stale
        return [(k, v, r, order, "rule") for k, v, r in wanted], None

    def _put_object(self, name: tuple[str, str], stored: tuple[tuple[int, int, str], dict[str, Any]]) -> None:
        """Stores a billing object; a new one counts against the mock's bound."""
        if name not in self._objects and len(self._objects) >= MAX_BILLING_OBJECTS:
            raise self._capacity("billing objects", MAX_BILLING_OBJECTS)
        self._objects[name] = stored

    def _subscription_flags(self, tenant: str) -> list[tuple[str, FlagValue, str, tuple[int, int, str], str]]:
        """Per key, the setting of the best subscription that sets it (standing, then order), all
        at the greatest order of the tenant's subscriptions."""
        rows = sorted(((o, st) for (t, name), (o, st) in self._objects.items() if t == tenant and name.startswith("subscription:")),
                      key=lambda row: row[0], reverse=True)
        if not rows:
            return []
        mark = rows[0][0]
        best: dict[str, tuple[tuple[int, tuple[int, int, str]], FlagValue, str]] = {}
        keys: set[str] = set()
        for row_order, state in rows:
            keys |= state["keys"]
            rank = (state["standing"], row_order)
            for key, value, rule in state["settings"]:
                if key not in best or best[key][0] < rank:
                    best[key] = (rank, value, rule)
        out = []
        for key in sorted(keys):
            if key in best:
                out.append((key, best[key][1], best[key][2], mark, "rule"))
            elif key in self._catalog:
                out.append((key, self._catalog[key], NO_SUBSCRIPTION_SETS_IT, mark, "rule"))
        return out

    def _finish(self, actor, event_id, event_type, tenant, outcome, changes, stale, meta) -> WebhookResult:
        if changes:
            meta["flags"] = [f"{c.key}={display(c.new_value)}" for c in changes]
        if stale:
            meta["stale_flags"] = stale
        record = self._append(tenant, actor, f"billing.{event_type}", outcome, meta)
        self._processed[event_id] = (tenant, outcome, record.seq)
        if len(self._processed) > MAX_PROCESSED_EVENTS:
            del self._processed[next(iter(self._processed))]
        return WebhookResult(event_id, event_type, tenant, outcome, changes, record.seq, stale)

    # -- flags ----------------------------------------------------------------------------

    def _check_ids(self, tenant_id: str, key: Optional[str] = None) -> None:
        check_ids(tenant_id, key, self._base)

    def get_flag(self, tenant_id: str, key: str) -> Flag:
        self._check_ids(tenant_id, key)
        with self._lock:
            f = self._flags.get((tenant_id, key))
            if f is not None:
                return Flag(tenant_id, key, f.value, f.version, False, f.updated_by)
        if key in self._catalog:
            return Flag(tenant_id, key, self._catalog[key], 0, True)
        raise FlagNotFound(_problem(self._base, "flag-not-found", "Flag not found", 404, f"flag '{key}' is not defined", "FLAG_NOT_FOUND"))

    def explain_flag(self, tenant_id: str, key: str) -> FlagExplanation:
        flag = self.get_flag(tenant_id, key)
        with self._lock:
            f = self._flags.get((tenant_id, key))
            if f is None:
                return FlagExplanation(flag)
            event, admin, rule, setter_seq = None, None, "", 0
            if f.source_event_id:
                processed = self._processed.get(f.source_event_id)
                if processed is None:
                    event = FlagEvent(f.source_event_id, "", 0, 0, f.updated_by)
                else:
                    setter_seq = processed[2]
                    record = self._record(setter_seq)
                    if record is None:
                        event = FlagEvent(f.source_event_id, "", 0, setter_seq, f.updated_by)
                    else:
                        event = self._flag_event(record)
                        rules = record.metadata.get("rules")
                        rule = rules.get(key, "") if isinstance(rules, dict) else ""
            else:
                record = next(
                    (r for r in reversed(self._audit)
                     if r.tenant_id == tenant_id and r.event == "flag.set"
                     and r.metadata.get("flag") == key and r.metadata.get("version") == f.version),
                    None,
                )
                setter_seq = record.seq if record else 0
                admin = AdminFlagChange(f.updated_by, record.metadata.get("reason", "") if record else "", f.version, setter_seq)
            stale = [
                self._flag_event(r)
                for r in self._audit[max(self._audit_index(setter_seq + 1), 0):]
                if r.tenant_id == tenant_id and r.event.startswith("billing.") and key in (r.metadata.get("stale_flags") or [])
            ]
            newest = None
            mark = f.order[2]
            if mark and mark != f.source_event_id:
                processed = self._processed.get(mark)
                record = self._record(processed[2]) if processed else None
                newest = self._flag_event(record) if record else FlagEvent(mark, "", 0, processed[2] if processed else 0, "")
            return FlagExplanation(flag, event, admin, rule, stale[-STALE_SHOWN:], newest)

    @staticmethod
    def _flag_event(record: AuditRecord) -> FlagEvent:
        meta = record.metadata
        return FlagEvent(meta.get("event_id", ""), meta.get("event_type", ""), int(meta.get("created", 0)), record.seq, record.actor, meta.get("reason", ""))

    def get_flags(self, tenant_id: str) -> dict[str, Flag]:
        self._check_ids(tenant_id)
        out = {k: Flag(tenant_id, k, v, 0, True) for k, v in self._catalog.items()}
        with self._lock:
            out.update({k: Flag(t, k, f.value, f.version, False, f.updated_by) for (t, k), f in self._flags.items() if t == tenant_id})
        return dict(sorted(out.items()))

    def _check_admin(self, actor: str, reason: str) -> None:
        """As the sidecar's Admin::validated: who (required, bounded) and why (bounded)."""
        if not rust_trim(actor):
            raise self._invalid("actor: is required")
        if len(actor.encode()) > MAX_ACTOR_LEN:
            raise self._invalid(f"actor: is longer than {MAX_ACTOR_LEN} bytes")
        if len(reason.encode()) > MAX_REASON_LEN:
            raise self._invalid(f"reason: is longer than {MAX_REASON_LEN} bytes")

    def set_flag(self, tenant_id: str, key: str, value: FlagValue, *, actor: str, reason: str = "") -> Flag:
        self._check_ids(tenant_id, key)
        self._check_admin(actor, reason)
        try:
            # What the sidecar receives: a FlagValue whose numbers are doubles, finite ones only.
            received = wire(json.loads(json.dumps(value, allow_nan=False)))
        except (TypeError, ValueError):
            raise self._invalid("value: must be a bool, a string, a finite number or JSON") from None
        value = _stored(received)
        with self._lock:
            current = self._flags.get((tenant_id, key))
            if current is None and len(self._flags) >= MAX_FLAGS:
                raise self._capacity("flags", MAX_FLAGS)
            self._version += 1
            claimed, actor = actor, self._operator or actor
            self._flags[(tenant_id, key)] = _Flag(value, self._version, current.order if current else (0, 0, ""), "admin", actor)
            # As the sidecar's ops::set_flag: the values as `flags explain` shows them, the new
            # one as received, the old one as it was kept.
            meta: dict[str, Any] = {"flag": key, "old_value": display(current.value) if current else None,
                                    "new_value": display(received), "version": self._version}
            if reason:
                meta["reason"] = reason
            if self._operator:
                meta["claimed_actor"] = claimed
            self._append(tenant_id, actor, "flag.set", "applied", meta)
            return Flag(tenant_id, key, value, self._version, False, actor)

    # -- tenants --------------------------------------------------------------------------

    def map_customer(self, customer_id: str, tenant_id: str, *, actor: str, reason: str = "") -> int:
        if (defect := id_defect(customer_id)) is not None:
            raise self._invalid(f"customer_id: {defect}")
        self._check_ids(tenant_id)
        self._check_admin(actor, reason)
        with self._lock:
            previous = self._customers.get(customer_id)
            if previous == tenant_id:
                return 0
            if previous is None and len(self._customers) >= MAX_CUSTOMERS:
                raise self._capacity("customer mappings", MAX_CUSTOMERS)
            self._customers[customer_id] = tenant_id
            meta: dict[str, Any] = {"customer": customer_id}
            if previous is not None:
                meta["previous_tenant"] = previous
            if reason:
                meta["reason"] = reason
            parked = sum(1 for p in self._parked.values() if p.customer == customer_id)
            if parked:
                meta["parked_events"] = parked
            if self._operator:
                meta["claimed_actor"] = actor
            self._append(tenant_id, self._operator or actor, "tenant.customer_mapped", "applied", meta)
            # In the mapping's "transaction": the flags are current when this returns.
            return self._apply_parked(customer_id)

    def resolve_customer(self, customer_id: str) -> Optional[str]:
        if (defect := id_defect(customer_id)) is not None:
            raise self._invalid(f"customer_id: {defect}")
        with self._lock:
            return self._customers.get(customer_id)

    # -- auth -----------------------------------------------------------------------------

    def verify_token(self, token: str) -> Claims:
        try:
            return self._verify(token)
        except ProblemError:
            raise

    def _unauthenticated(self, why: str) -> ProblemError:
        error = ProblemError(_problem(self._base, "unauthenticated", "Unauthenticated", 401, f"The bearer token was not accepted: {why}.", "UNAUTHENTICATED"))
        # The denial's audit record keeps the reason itself, as the sidecar's does.
        error.why = why  # type: ignore[attr-defined]
        return error

    def _verify(self, token: str) -> Claims:
        token = rust_trim(token or "")
        if token.startswith("Bearer "):
            token = rust_trim(token[7:])
        if not self._jwt_secrets:
            raise self._unauthenticated("token verification is not configured")
        try:
            header_b64, payload_b64, signature_b64 = token.split(".")
            header = json.loads(_b64decode(header_b64))
            claims = json.loads(_b64decode(payload_b64))
            signature = _b64decode(signature_b64)
        except (ValueError, TypeError):
            raise self._unauthenticated("the token is malformed") from None
        if not isinstance(header, dict):
            raise self._unauthenticated("the token's algorithm is not accepted")
        digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}.get(header.get("alg"))
        if digest is None:
            raise self._unauthenticated("the token's algorithm is not accepted")
        signing_input = f"{header_b64}.{payload_b64}".encode()
        if not any(hmac.compare_digest(hmac.new(s, signing_input, digest).digest(), signature) for s in self._jwt_secrets):
            raise self._unauthenticated("the token's signature does not verify")
        if not isinstance(claims, dict) or isinstance(claims.get("sub"), (list, dict)) or any(
            isinstance(claims.get(name), (list, dict)) and claims[name] for name in ("exp", "nbf")
        ):
            # Shapes the sidecar's JWT library (jsonwebtoken over serde_json) cannot read past: a
            # `sub` that is a list or an object, an `exp` or `nbf` that is a non-empty one.
            raise self._unauthenticated("the token is malformed")
        # As the sidecar (jsonwebtoken's checks, in its order): `exp` is required as a
        # non-negative number, `nbf` optional of the same type; both get the leeway.
        now, leeway = int(time.time()), self._jwt_leeway_s
        exp = _jwt_time(claims.get("exp"))
        if exp is None:
            raise self._unauthenticated("the token lacks the required claim 'exp'")
        # A configured issuer or audience makes the claim required: a string or a list of them.
        for name, configured in (("iss", self._jwt_issuer), ("aud", self._jwt_audience)):
            value = claims.get(name)
            readable = isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))
            if configured and not readable:
                raise self._unauthenticated(f"the token lacks the required claim '{name}'")
        nbf = _jwt_time(claims["nbf"]) if "nbf" in claims else None
        if "nbf" in claims and nbf is None:
            raise self._unauthenticated("the token's claim 'nbf' has the wrong type")
        if exp < now - leeway:
            raise self._unauthenticated("the token has expired")
        if nbf is not None and nbf > now + leeway:
            raise self._unauthenticated("the token is not valid yet")
        # jsonwebtoken reads a list-valued `iss` as Issuer::Multiple: accepted when it holds the
        # configured issuer.
        iss = claims.get("iss")
        if self._jwt_issuer and self._jwt_issuer not in (iss if isinstance(iss, list) else [iss]):
            raise self._unauthenticated("the token's issuer is not accepted")
        aud = claims.get("aud")
        auds = aud if isinstance(aud, list) else [aud]
        if self._jwt_audience and not any(a in self._jwt_audience for a in auds):
            raise self._unauthenticated("the token's audience is not accepted")
        # As the sidecar: the signature vouches for who issued the token, not for its tenant
        # claim, which must be a valid tenant id when present (even empty).
        tenant = claims.get(self._tenant_claim, "")
        if not isinstance(tenant, str):
            raise self._unauthenticated(f"the token's claim '{self._tenant_claim}' has the wrong type")
        if self._tenant_claim in claims and (defect := id_defect(tenant)) is not None:
            raise self._unauthenticated(f"the token's claim '{self._tenant_claim}' is not a valid tenant id: it {defect}")
        subject = claims.get("sub")
        return Claims(
            subject=subject if isinstance(subject, str) else "",
            tenant_id=tenant,
            roles=_claim_strings(claims.get("roles")),
            scopes=_claim_strings(claims.get("scope")) + _claim_strings(claims.get("scp")),
            claims=claims,
        )

    def authorize(self, *, token: Optional[str] = None, tenant_id: Optional[str] = None, require: Sequence[str] = (), deny_if: Sequence[str] = (), resource: str = "") -> Decision:
        # As the sidecar's AccessRequest::validate.
        if not rust_trim(token or "") and not tenant_id:
            raise self._invalid("token: give a token or a tenant_id")
        if tenant_id:
            self._check_ids(tenant_id)
        for field_name, keys in (("required_features", require), ("deny_if", deny_if)):
            if len(keys) > MAX_AUTHORIZE_FLAGS:
                raise self._invalid(f"{field_name}: names more than {MAX_AUTHORIZE_FLAGS} flags")
            for key in keys:
                if not FLAG_KEY.fullmatch(key):
                    raise self._invalid(f"{field_name}: '{quoted(key)}' is not a valid flag key: use 1-128 characters of letters, digits, _ - . :")
        if len(resource.encode()) > MAX_RESOURCE_LEN:
            raise self._invalid(f"resource: is longer than {MAX_RESOURCE_LEN} bytes")
        claims = None
        subject = ""
        tenant = tenant_id or ""
        if rust_trim(token or ""):
            try:
                claims = self._verify(token or "")
            except ProblemError as e:
                return self._deny(tenant, "", e.problem, resource, "UNAUTHENTICATED", "", why=getattr(e, "why", ""))
            subject = claims.subject
            if not claims.tenant_id:
                why = f"it has no '{self._tenant_claim}' claim"
                return self._deny("", subject, self._unauthenticated(why).problem, resource, "UNAUTHENTICATED", "", why=why)
            if tenant_id and tenant_id != claims.tenant_id:
                p = _problem(self._base, "wrong-tenant", "Forbidden", 403, "The token belongs to a different tenant.", "WRONG_TENANT")
                return self._deny(tenant_id, subject, p, resource, "WRONG_TENANT", "")
            tenant = claims.tenant_id
        for flag in deny_if:
            if self.is_enabled(tenant, flag):
                ext = {"billing_url": self._billing_url} if self._billing_url else {}
                p = _problem(self._base, "payment-required", "Payment Required", 402, "The subscription has a payment problem. Update billing to continue.", "PAYMENT_REQUIRED", flag=flag, tenant_id=tenant, **ext)
                return self._deny(tenant, subject, p, resource, "PAYMENT_REQUIRED", flag, claims)
        for feature in require:
            if not self.is_enabled(tenant, feature):
                ext = {"upgrade_url": self._upgrade_url} if self._upgrade_url else {}
                p = _problem(self._base, "feature-locked", "Feature Unavailable", 403, f"The '{feature}' feature is not included in this subscription.", "FEATURE_LOCKED", feature=feature, tenant_id=tenant, **ext)
                return self._deny(tenant, subject, p, resource, "FEATURE_LOCKED", feature, claims)
        return Decision(True, None, tenant, subject, False, claims)

    def _deny(self, tenant: str, subject: str, problem: Problem, resource: str, reason: str, feature: str,
              claims: Optional[Claims] = None, why: str = "") -> Decision:
        # As the sidecar's Denial::problem: every denial names the tenant it was for, if any.
        extensions = {**problem.extensions, "tenant_id": tenant} if tenant else problem.extensions
        problem = Problem(problem.type, problem.title, problem.status, problem.detail, resource, extensions)
        # As the sidecar's denial_record: the key's fields, then this call's own details.
        meta = {"reason": reason, "feature": feature, "subject": subject, "resource": resource, "detail": why}
        with self._lock:
            self._close_windows()
            self._denials.admit((tenant, subject, reason, feature), reason, tenant, subject or "anonymous",
                                {k: v for k, v in meta.items() if v}, self._seal)
        return Decision(False, problem, tenant, subject, False, claims)


def _jwt_time(value: Any) -> Optional[int]:
    """A NumericDate as the sidecar's JWT library reads it: a non-negative integer below 2^64,
    or such a finite number rounded half away from zero; None when it is anything else."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, int):
        return value if 0 <= value < 2**64 else None
    if not math.isfinite(value) or not 0 <= value < float(2**64):
        return None
    return int(math.floor(value + 0.5))


def _claim_strings(value: Any) -> list[str]:
    """Roles and scopes as the sidecar reads them: a space-separated string, or the strings of
    a list; anything else is none."""
    if isinstance(value, str):
        return value.split()
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str)]
    return []


def _b64decode(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
