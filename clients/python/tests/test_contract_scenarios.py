"""The language-neutral contract suite (`tests/contract/scenarios.json`, format in its README),
played against the real sidecar and against the in-process mock through the public client API:
the mock passes exactly what the sidecar passes."""
from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
import secrets
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import pytest

from conftest import ROOT, Sidecar
from coresdk import ProblemError, Settings
from coresdk.base import BaseSDK
from coresdk.client import SidecarClient
from coresdk.errors import Problem
from coresdk.mock import MOCK_TENANTS, MockSidecar
from coresdk.models import AuditRecord

SUITE = json.loads((ROOT / "tests" / "contract" / "scenarios.json").read_text(encoding="utf-8"))
SCENARIOS = SUITE["scenarios"]
DOMAIN_TAG = b"coresdk.audit.v1\0"
RFC3339_MS = re.compile(r"\A\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z\Z")
# Only a hang guard for records the sidecar writes off the request path.
POLL_GUARD_S = 10
# Every object of the format and the keys it may have (README "Steps"): an unknown key, a typo
# such as "custmer", is an error, not a field silently left out. Objects that carry data
# (`object`, `event_fields`, `claims`, `metadata`, `values`, `changes`, `old`, `extensions`) are free.
WEBHOOK_BODY = {"event", "type", "customer", "object", "previous_attributes", "created", "event_fields", "drop", "redeliver", "raw_body"}
WEBHOOK_EXPECT = {"outcome", "tenant", "changes", "old", "stale_flags", "problem"}
FORMAT: dict[str, tuple[Optional[set[str]], set[str]]] = {
    "webhook": (WEBHOOK_BODY | {"signature"}, WEBHOOK_EXPECT),
    "replay": (WEBHOOK_BODY | {"reason"}, WEBHOOK_EXPECT),
    "get_flag": ({"tenant", "key"}, {"value", "is_default", "updated_by", "problem"}),
    "get_flags": ({"tenant"}, {"values", "defaults", "problem"}),
    "is_enabled": ({"tenant", "key"}, {"value", "problem"}),
    "set_flag": ({"tenant", "key", "value", "actor", "reason"}, {"value", "updated_by", "is_default", "problem"}),
    "explain_flag": ({"tenant", "key"}, {"value", "is_default", "set_by", "event", "newest_event", "admin", "rule", "stale_events", "problem"}),
    "map_customer": ({"customer", "tenant", "actor", "reason"}, {"parked_events_applied", "problem"}),
    "resolve_customer": ({"customer"}, {"tenant", "problem"}),
    "authorize": ({"token", "tenant", "require", "deny_if", "resource"}, {"allowed", "tenant", "subject", "problem", "error"}),
    "verify_token": ({"token"}, {"subject", "tenant", "problem"}),
    "audit": ({"event", "outcome", "actor", "tenant", "metadata"}, {"record", "problem"}),
    "audit_query": ({"tenant", "event_prefix", "outcome"}, {"records", "problem"}),
    "verify_chain": (set(), {"ok"}),
    "wait": (None, set()),  # a number of seconds, no object
}
ACTIONS = set(FORMAT)
SIGNATURE = {"t_offset", "secret", "extra", "header"}
TOKEN = {"claims", "exp_in", "nbf_in", "secret", "alg"}
PROBLEM = {"status", "reason", "type", "title", "instance", "detail_contains", "extensions"}
RECORD = {"tenant", "actor", "event", "outcome", "metadata"}
ADMIN = {"actor", "reason", "version", "audit_seq"}
FLAG_EVENT = {"event_id", "event_type", "created", "audit_seq", "actor", "reason"}


def format_errors(scenario: dict[str, Any]) -> list[str]:
    """Every key of `scenario` the format does not know, or a missing FLAG_EVENT key."""
    errors: list[str] = []

    def keys(value: Any, allowed: set[str], where: str, exact: bool = False) -> None:
        if not isinstance(value, dict):
            return  # a string token, a named signature, a text raw_body, null: no keys
        if unknown := set(value) - allowed:
            errors.append(f"{where}: unknown keys {sorted(unknown)}")
        if exact and (missing := allowed - set(value)):
            errors.append(f"{where}: missing keys {sorted(missing)}")

    keys(scenario, {"name", "about", "env", "steps"}, scenario.get("name", "a scenario"))
    for n, step in enumerate(scenario.get("steps", [])):
        where = f"{scenario.get('name')} step {n}"
        actions = set(step) & ACTIONS
        if len(actions) != 1 or set(step) - actions - {"expect", "about"}:
            errors.append(f"{where}: one action, `expect` and `about` only: {sorted(step)}")
            continue
        (action,) = actions
        spec_keys, expect_keys = FORMAT[action]
        spec, expect = step[action], step.get("expect", {})
        if spec_keys is not None:
            keys(spec, spec_keys, f"{where} {action}")
        keys(expect, expect_keys, f"{where} expect")
        if isinstance(spec, dict):
            keys(spec.get("signature"), SIGNATURE, f"{where} signature")
            keys(spec.get("token"), TOKEN, f"{where} token")
            keys(spec.get("raw_body"), {"repeat", "times"}, f"{where} raw_body", exact=True)
        for name in ("problem", "error"):
            keys(expect.get(name), PROBLEM, f"{where} expect.{name}")
        keys(expect.get("record"), RECORD, f"{where} expect.record")
        for r, record in enumerate(expect.get("records") or []):
            keys(record, RECORD, f"{where} expect.records[{r}]")
        keys(expect.get("admin"), ADMIN, f"{where} expect.admin")
        for name in ("event", "newest_event"):
            keys(expect.get(name) if action == "explain_flag" else None, FLAG_EVENT, f"{where} expect.{name}", exact=True)
        for e, event in enumerate(expect.get("stale_events") or []):
            keys(event, FLAG_EVENT, f"{where} expect.stale_events[{e}]", exact=True)
    return errors


# -- RFC 8785 (JCS), written from the RFC: the chain is checked independently of the mock's
# encoder (the `rfc8785` package) and of the sidecar's.


def jcs(value: Any) -> bytes:
    """RFC 8785 bytes of a JSON value (ints are JSON numbers, as doubles)."""
    # A lone surrogate has no UTF-8 form: the strict codec refuses it, as the RFC does.
    return _jcs(value).encode("utf-8")


def _jcs(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return _jcs_number(float(value))
    if isinstance(value, str):
        return _jcs_string(value)
    if isinstance(value, list):
        return "[" + ",".join(_jcs(item) for item in value) + "]"
    if isinstance(value, dict):
        # §3.2.3: members sorted by the UTF-16 code units of their names (UTF-16BE bytes sort alike).
        names = sorted(value, key=lambda name: name.encode("utf-16-be", "surrogatepass"))
        return "{" + ",".join(f"{_jcs_string(name)}:{_jcs(value[name])}" for name in names) + "}"
    raise TypeError(f"RFC 8785: {type(value).__name__} is not JSON")


def _jcs_string(text: str) -> str:
    """§3.2.2.2: `"`, `\\` and the controls escaped (JSON's short forms where it has them)."""
    short = {0x08: "\\b", 0x09: "\\t", 0x0A: "\\n", 0x0C: "\\f", 0x0D: "\\r", 0x22: '\\"', 0x5C: "\\\\"}
    out = []
    for c in text:
        code = ord(c)
        out.append(short[code] if code in short else f"\\u{code:04x}" if code < 0x20 else c)
    return '"' + "".join(out) + '"'


def _jcs_number(n: float) -> str:
    """§3.2.2.3: ECMAScript's Number.prototype.toString of the double (-0 as 0)."""
    if not math.isfinite(n):
        raise ValueError("RFC 8785: no NaN or Infinity")
    if n == 0:
        return "0"
    # `repr` gives the shortest digits that read back as the same double, as ECMAScript does.
    mantissa, _, exponent = repr(abs(n)).partition("e")
    whole, _, fraction = mantissa.partition(".")
    digits = (whole + fraction).lstrip("0")
    point = len(whole) - (len(whole + fraction) - len((whole + fraction).lstrip("0"))) + int(exponent or 0)
    digits = digits.rstrip("0")
    k, sign = len(digits), "-" if n < 0 else ""
    if k <= point <= 21:
        return sign + digits + "0" * (point - k)
    if 0 < point <= 21:
        return sign + digits[:point] + "." + digits[point:]
    if -6 < point <= 0:
        return sign + "0." + "0" * -point + digits
    e = point - 1
    return sign + digits[0] + ("." + digits[1:] if k > 1 else "") + f"e{'+' if e >= 0 else '-'}{abs(e)}"


def test_the_runners_jcs_writes_the_rfcs_own_examples():
    # RFC 8785 §3.2.4 (sorting) and §3.2.2 (numbers, escapes).
    sample = {
        "numbers": [333333333.33333329, 1e30, 4.5, 2e-3, 0.000000000000000000000000001],
        "string": "\u20ac$\u000f\nA'B\"\\\\\"/",
        "literals": [None, True, False],
    }
    assert jcs(sample) == (
        '{"literals":[null,true,false],"numbers":[333333333.3333333,1e+30,4.5,0.002,1e-27],'
        '"string":"\u20ac$\\u000f\\nA\'B\\"\\\\\\\\\\"/"}'
    ).encode()
    # §3.2.3: sorted by UTF-16 code units, so U+1F600 (a surrogate pair) sorts before U+FB33.
    names = {"\u20ac": "Euro Sign", "\r": "Carriage Return", "\ufb33": "Hebrew Letter Dalet With Dagesh", "1": "One",
             "\U0001f600": "Emoji: Grinning Face", "\u0080": "Control", "\u00f6": "Latin Small Letter O With Diaeresis"}
    assert jcs(names) == (
        '{"\\r":"Carriage Return","1":"One","\u0080":"Control","\u00f6":"Latin Small Letter O With Diaeresis",'
        '"\u20ac":"Euro Sign","\U0001f600":"Emoji: Grinning Face","\ufb33":"Hebrew Letter Dalet With Dagesh"}'
    ).encode()
    # Appendix B's boundaries of ECMAScript's number form.
    for number, text in [(0.0, "0"), (-0.0, "0"), (1e21, "1e+21"), (1e20, "100000000000000000000"), (1e-7, "1e-7"),
                         (0.000001, "0.000001"), (-1.5, "-1.5"), (5e-324, "5e-324"), (1.7976931348623157e308, "1.7976931348623157e+308"),
                         (9007199254740992.0, "9007199254740992"), (295147905179352830000.0, "295147905179352830000"), (123.0, "123")]:
        assert jcs(number) == text.encode(), number
    with pytest.raises(UnicodeEncodeError):
        jcs("\ud800")


def test_the_suite_is_well_formed():
    assert SUITE["format"] == 1
    assert set(SUITE) == {"format", "env", "tenants", "forged_secret", "scenarios"}
    tenants = json.loads((ROOT / "examples" / "tenants.json").read_text(encoding="utf-8"))
    assert SUITE["tenants"] == tenants == MOCK_TENANTS
    names = [s["name"] for s in SCENARIOS]
    assert len(names) == len(set(names)), "scenario names must be unique"
    for scenario in SCENARIOS:
        assert set(scenario) <= {"name", "about", "env", "steps"}, scenario["name"]
        labels = [s[a]["event"] for s in scenario["steps"] for a in ("webhook", "replay") if a in s and "event" in s[a]]
        assert len(labels) == len(set(labels)), f"{scenario['name']}: event labels must be unique"
        assert format_errors(scenario) == []


@pytest.mark.parametrize("typo", [
    {"webhook": {"event": "e", "type": "invoice.paid", "custmer": "cus_acme_001"}},
    {"webhook": {"event": "e", "type": "invoice.paid", "signature": {"t_ofset": 5}}},
    {"webhook": {"event": "e", "raw_body": {"repeat": "x"}}},
    {"replay": {"event": "e", "type": "invoice.paid", "signature": "valid", "reason": "r"}},
    {"get_flag": {"tenant": "t", "key": "k"}, "expect": {"problem": {"status": 400, "detail_contain": "x"}}},
    {"authorize": {"token": {"claims": {}, "exp": 5}}},
    {"authorize": {"tenant": "t"}, "expect": {"allowed": True, "tennant": "t"}},
    {"audit_query": {}, "expect": {"records": [{"outcome": "ok", "metdata": {}}]}},
    {"explain_flag": {"tenant": "t", "key": "k"}, "expect": {"event": {"event_id": "e"}}},
    {"get_flags": {"tenant": "t"}, "about": "x", "note": "y"},
])
def test_an_unknown_key_anywhere_in_a_step_is_an_error(typo: dict[str, Any]) -> None:
    assert format_errors({"name": "typo", "steps": [typo]}), typo


@pytest.fixture(params=["sidecar", "mock"])
def implementation(request, tmp_path: Path) -> Iterator[Callable[[dict[str, str]], BaseSDK]]:
    """A factory: the implementation under test, fresh, with a scenario's environment."""
    made: list[tuple[BaseSDK, Optional[Sidecar]]] = []
    yield lambda env: start_implementation(request.param, env, tmp_path, made)
    stop_implementations(made)


@pytest.fixture
def sidecar_and_mock(tmp_path: Path) -> Iterator[tuple[BaseSDK, BaseSDK]]:
    """Both implementations, fresh, with the suite's environment: for comparing them directly."""
    made: list[tuple[BaseSDK, Optional[Sidecar]]] = []
    env = dict(SUITE["env"])
    yield start_implementation("sidecar", env, tmp_path, made), start_implementation("mock", env, tmp_path, made)
    stop_implementations(made)


def start_implementation(kind: str, env: dict[str, str], tmp_path: Path, made: list[tuple[BaseSDK, Optional[Sidecar]]]) -> BaseSDK:
    """The mock, or the real sidecar and a client of it; noted in `made` for stopping."""
    if kind == "mock":
        sdk: BaseSDK = MockSidecar(Settings(use_mock=True), env=env)
        made.append((sdk, None))
        return sdk
    process = Sidecar(tmp_path, extra_env=env)
    process.start()
    settings = Settings(
        sidecar_addr=process.addr,
        admin_token=env["CORESDK_ADMIN_TOKEN"],
        problem_type_base=env["CORESDK_PROBLEM_TYPE_BASE"],
        # A debug build on a machine shared with other test runs: generous, only a hang guard.
        timeout_ms=5000,
    )
    client = SidecarClient(settings)
    made.append((client, process))
    assert client.cache.warm.wait(5), "the flag cache never warmed"
    return client


def stop_implementations(made: list[tuple[BaseSDK, Optional[Sidecar]]]) -> None:
    for sdk, process in made:
        sdk.close()
        if process is not None:
            process.stop()


def stripe_signature_header(secret: str, t: int, body: bytes, extra: Optional[str] = None) -> str:
    """`t=<t>,v1=<hex HMAC-SHA256(secret, "<t>." ‖ body)>`, with `extra` items before `v1`."""
    signature = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},{extra},v1={signature}" if extra else f"t={t},v1={signature}"


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s["name"] for s in SCENARIOS])
def test_scenario(scenario: dict[str, Any], implementation: Callable[[dict[str, str]], BaseSDK]) -> None:
    assert format_errors(scenario) == []
    env = {key: value.replace("{root}", str(ROOT)) for key, value in {**SUITE["env"], **scenario.get("env", {})}.items()}
    Run(scenario, env, implementation(env)).play()


def jwt(claims: dict[str, Any], secret: str, alg: str) -> str:
    """A token minted by PyJWT, independently of both implementations: HMAC-signed, or unsigned
    for `alg: none` (which must be refused). PyJWT leaves the claims as given, odd types too."""
    import jwt as pyjwt

    return pyjwt.encode(claims, None if alg == "none" else secret, algorithm=alg)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def wire_numbers(value: Any, where: str) -> None:
    """Every number on the wire is a double: a Python client hands back floats, never ints."""
    if isinstance(value, dict):
        for key, item in value.items():
            wire_numbers(item, f"{where}.{key}")
    elif isinstance(value, list):
        for n, item in enumerate(value):
            wire_numbers(item, f"{where}[{n}]")
    else:
        assert not is_number(value) or isinstance(value, float), f"{where}: {value!r} is an int; the wire has a double"


class Run:
    """One scenario against one implementation."""

    def __init__(self, scenario: dict[str, Any], env: dict[str, str], sdk: BaseSDK):
        self.scenario = scenario
        self.env = env
        self.sdk = sdk
        self.nonce = secrets.token_hex(4)
        self.base = int(time.time())
        self.bodies: dict[str, bytes] = {}
        self.types: dict[str, str] = {}
        self.created: dict[str, Any] = {}
        self.seqs: dict[str, int] = {}
        self.where = ""

    def play(self) -> None:
        for n, step in enumerate(self.scenario["steps"]):
            (action,) = set(step) & ACTIONS
            self.where = f"{self.scenario['name']} step {n} ({action})"
            getattr(self, action)(step[action], step.get("expect", {}))

    # -- matching -------------------------------------------------------------------------

    def fail(self, what: str) -> None:
        raise AssertionError(f"{self.where}: {what}")

    def match(self, expected: Any, actual: Any, path: str = "") -> None:
        if isinstance(expected, str) and expected.startswith("$"):
            kind, _, label = expected[1:].partition(":")
            if expected.startswith("$$"):
                expected = expected[1:]
            elif kind == "any":
                return
            elif kind in ("number", "string", "bool"):
                ok = {"number": is_number(actual), "string": isinstance(actual, str), "bool": isinstance(actual, bool)}[kind]
                if not ok:
                    self.fail(f"{path}: {actual!r} is not a {kind}")
                return
            elif kind == "event_id":
                expected = self.event_id(label)
            elif kind == "created":
                expected = self.created[label]
            elif kind == "seq":
                expected = self.seqs[label]
            else:
                self.fail(f"{path}: unknown matcher {expected!r}")
        if isinstance(expected, bool) or expected is None:
            same = actual is expected
        elif is_number(expected):
            same = is_number(actual) and actual == expected
        elif isinstance(expected, str):
            same = actual == expected
        elif isinstance(expected, list):
            if not isinstance(actual, list) or len(actual) != len(expected):
                self.fail(f"{path}: expected {expected!r}, got {actual!r}")
            for n, (e, a) in enumerate(zip(expected, actual)):
                self.match(e, a, f"{path}[{n}]")
            return
        elif isinstance(expected, dict):
            if not isinstance(actual, dict) or set(actual) != set(expected):
                self.fail(f"{path}: expected keys {sorted(expected)}, got {actual!r}")
            for key in expected:
                self.match(expected[key], actual[key], f"{path}.{key}")
            return
        else:
            raise TypeError(expected)
        if not same:
            self.fail(f"{path}: expected {expected!r}, got {actual!r}")

    def check_problem(self, expected: dict[str, Any], problem: Optional[Problem], path: str = "problem") -> None:
        if problem is None:
            self.fail(f"expected a problem {expected}, got none")
        for key, want in expected.items():
            if key == "status":
                self.match(want, problem.status, f"{path}.status")
            elif key == "reason":
                self.match(want, problem.reason, f"{path}.reason")
            elif key == "type":
                self.match(self.env["CORESDK_PROBLEM_TYPE_BASE"].rstrip("/") + "/" + want, problem.type, f"{path}.type")
            elif key in ("title", "instance"):
                self.match(want, getattr(problem, key), f"{path}.{key}")
            elif key == "detail_contains":
                if want not in problem.detail:
                    self.fail(f"{path}.detail {problem.detail!r} does not contain {want!r}")
            elif key == "extensions":
                for name, value in want.items():
                    if name not in problem.extensions:
                        self.fail(f"{path}.extensions lacks {name!r}: {problem.extensions}")
                    self.match(value, problem.extensions[name], f"{path}.extensions.{name}")
            else:
                self.fail(f"unknown problem field {key!r}")

    def call(self, expect: dict[str, Any], call: Callable[[], Any]) -> Any:
        """Runs the step's call: it must fail with the expected problem, or succeed."""
        try:
            answer = call()
        except ProblemError as e:
            if "problem" not in expect:
                self.fail(f"unexpected problem {e.problem.to_dict()}")
            self.check_problem(expect["problem"], e.problem)
            return None
        if "problem" in expect:
            self.fail(f"expected the problem {expect['problem']}, got the answer {answer!r}")
        return answer

    def fields(self, expect: dict[str, Any], actual: dict[str, Any], allowed: set[str]) -> None:
        for key, want in expect.items():
            if key not in allowed:
                self.fail(f"unknown expectation {key!r}")
            self.match(want, actual[key], key)

    # -- webhooks -------------------------------------------------------------------------

    def event_id(self, label: str) -> str:
        return f"evt_{self.nonce}_{label}"

    def body(self, spec: dict[str, Any]) -> tuple[bytes, str, str]:
        """The delivery's bytes, event id and type."""
        if "redeliver" in spec:
            label = spec["redeliver"]
            return self.bodies[label], self.event_id(label) if self.types[label] else "", self.types[label]
        label = spec["event"]
        raw = spec.get("raw_body")
        if raw is not None:
            text = raw if isinstance(raw, str) else raw["repeat"] * raw["times"]
            self.bodies[label], self.types[label] = text.encode(), ""
            return text.encode(), "", ""
        obj: dict[str, Any] = {}
        if spec.get("customer") is not None:
            obj["customer"] = spec["customer"]
        obj.update(spec.get("object", {}))
        data: dict[str, Any] = {"object": obj}
        if "previous_attributes" in spec:
            data["previous_attributes"] = spec["previous_attributes"]
        event: dict[str, Any] = {
            "id": self.event_id(label),
            "object": "event",
            "created": self.base + spec.get("created", 0),
            "data": data,
            "livemode": False,
            "type": spec["type"],
        }
        event.update(spec.get("event_fields", {}))
        for key in spec.get("drop", []):
            event.pop(key, None)
        body = json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode()
        self.bodies[label], self.types[label], self.created[label] = body, spec["type"], event.get("created")
        return body, self.event_id(label), spec["type"]

    def header(self, body: bytes, how: Any) -> str:
        if how == "missing":
            return ""
        if isinstance(how, dict) and "header" in how:
            return how["header"]
        secret = self.env["STRIPE_WEBHOOK_SECRET"].split(",")[0].strip()
        offset = 0
        if how == "forged":
            secret = SUITE["forged_secret"]
        elif isinstance(how, dict):
            secret, offset = how.get("secret", secret), how.get("t_offset", 0)
        elif how != "valid":
            self.fail(f"unknown signature {how!r}")
        extra = how.get("extra") if isinstance(how, dict) else None
        return stripe_signature_header(secret, int(time.time()) + offset, body, extra)

    def webhook(self, spec: dict[str, Any], expect: dict[str, Any]) -> None:
        body, event_id, event_type = self.body(spec)
        header = self.header(body, spec.get("signature", "valid"))
        self.answered(spec, expect, event_id, event_type, lambda: self.sdk.handle_stripe_webhook(body, header))

    def replay(self, spec: dict[str, Any], expect: dict[str, Any]) -> None:
        body, event_id, event_type = self.body(spec)
        self.answered(spec, expect, event_id, event_type, lambda: self.sdk.replay_event(body, reason=spec.get("reason", "")))

    def answered(self, spec: dict[str, Any], expect: dict[str, Any], event_id: str, event_type: str, call: Callable[[], Any]) -> None:
        result = self.call(expect, call)
        if result is None:
            return
        if "event" in spec:
            self.seqs[spec["event"]] = result.audit_seq
        if event_id:
            self.match(event_id, result.event_id, "event_id")
            self.match(event_type, result.event_type, "event_type")
        for change in result.flag_changes:
            wire_numbers([change.old_value, change.new_value], f"flag change {change.key}")
        actual = {
            "outcome": result.outcome,
            "tenant": result.tenant_id,
            "changes": {c.key: c.new_value for c in result.flag_changes},
            "stale_flags": sorted(result.stale_flags),
        }
        old = {c.key: c.old_value for c in result.flag_changes}
        for key, want in expect.items():
            if key == "old":
                for flag, value in want.items():
                    if flag not in old:
                        self.fail(f"old: no change of {flag!r} in {result.flag_changes}")
                    self.match(value, old[flag], f"old.{flag}")
            elif key == "stale_flags":
                self.match(sorted(want), actual["stale_flags"], "stale_flags")
            elif key in actual:
                self.match(want, actual[key], key)
            else:
                self.fail(f"unknown expectation {key!r}")

    # -- flags ----------------------------------------------------------------------------

    def get_flag(self, spec: dict[str, Any], expect: dict[str, Any]) -> None:
        flag = self.call(expect, lambda: self.sdk.get_flag(spec["tenant"], spec["key"]))
        if flag is not None:
            wire_numbers(flag.value, "value")
            self.fields(expect, {"value": flag.value, "is_default": flag.is_default, "updated_by": flag.updated_by},
                        {"value", "is_default", "updated_by"})

    def get_flags(self, spec: dict[str, Any], expect: dict[str, Any]) -> None:
        flags = self.call(expect, lambda: self.sdk.get_flags(spec["tenant"]))
        if flags is not None:
            values = {key: flag.value for key, flag in flags.items()}
            wire_numbers(values, "values")
            defaults = sorted(key for key, flag in flags.items() if flag.is_default)
            expect = {k: sorted(v) if k == "defaults" else v for k, v in expect.items()}
            self.fields(expect, {"values": values, "defaults": defaults}, {"values", "defaults"})

    def flag_event(self, event: Any) -> Any:
        if event is None:
            return None
        return {"event_id": event.event_id, "event_type": event.event_type, "created": event.created,
                "audit_seq": event.audit_seq, "actor": event.actor, "reason": event.reason}

    def explain_flag(self, spec: dict[str, Any], expect: dict[str, Any]) -> None:
        why = self.call(expect, lambda: self.sdk.explain_flag(spec["tenant"], spec["key"]))
        if why is None:
            return
        wire_numbers(why.flag.value, "value")
        admin = None if why.admin is None else {
            "actor": why.admin.actor, "reason": why.admin.reason, "version": why.admin.version, "audit_seq": why.admin.audit_seq}
        actual = {
            "value": why.flag.value, "is_default": why.flag.is_default,
            "set_by": "event" if why.event is not None else "admin" if why.admin is not None else "default",
            "event": self.flag_event(why.event), "admin": admin, "rule": why.rule,
            "stale_events": [self.flag_event(e) for e in why.stale_events], "newest_event": self.flag_event(why.newest_event),
        }
        self.fields(expect, actual, set(actual))

    def is_enabled(self, spec: dict[str, Any], expect: dict[str, Any]) -> None:
        enabled = self.call(expect, lambda: self.sdk.is_enabled(spec["tenant"], spec["key"]))
        if "problem" not in expect:
            self.fields(expect, {"value": enabled}, {"value"})

    def set_flag(self, spec: dict[str, Any], expect: dict[str, Any]) -> None:
        flag = self.call(expect, lambda: self.sdk.set_flag(
            spec["tenant"], spec["key"], spec["value"], actor=spec.get("actor", ""), reason=spec.get("reason", "")))
        if flag is not None:
            wire_numbers(flag.value, "value")
            self.fields(expect, {"value": flag.value, "is_default": flag.is_default, "updated_by": flag.updated_by},
                        {"value", "is_default", "updated_by"})

    # -- tenants --------------------------------------------------------------------------

    def map_customer(self, spec: dict[str, Any], expect: dict[str, Any]) -> None:
        applied = self.call(expect, lambda: self.sdk.map_customer(
            spec["customer"], spec["tenant"], actor=spec.get("actor", ""), reason=spec.get("reason", "")))
        if applied is not None:
            self.fields(expect, {"parked_events_applied": applied}, {"parked_events_applied"})

    def resolve_customer(self, spec: dict[str, Any], expect: dict[str, Any]) -> None:
        tenant = self.call(expect, lambda: self.sdk.resolve_customer(spec["customer"]))
        if "problem" not in expect:
            self.fields(expect, {"tenant": tenant}, {"tenant"})

    # -- access ---------------------------------------------------------------------------

    def token(self, spec: Any) -> str:
        if isinstance(spec, str):
            return spec
        claims = dict(spec.get("claims", {}))
        exp_in = spec.get("exp_in", 600)
        if exp_in is not None:
            claims["exp"] = int(time.time()) + exp_in
        if "nbf_in" in spec:
            claims["nbf"] = int(time.time()) + spec["nbf_in"]
        secret = spec.get("secret", self.env["CORESDK_JWT_SECRET"].split(",")[0].strip())
        return jwt(claims, secret, spec.get("alg", "HS256"))

    def authorize(self, spec: dict[str, Any], expect: dict[str, Any]) -> None:
        token = self.token(spec["token"]) if "token" in spec else None
        call_expect = {"problem": expect["error"]} if "error" in expect else {}
        decision = self.call(call_expect, lambda: self.sdk.authorize(
            token=token, tenant_id=spec.get("tenant"), require=spec.get("require", []),
            deny_if=spec.get("deny_if", []), resource=spec.get("resource", "")))
        if decision is None:
            return
        for key, want in expect.items():
            if key == "problem":
                self.check_problem(want, decision.problem)
            elif key in ("allowed", "tenant", "subject"):
                actual = {"allowed": decision.allowed, "tenant": decision.tenant_id, "subject": decision.subject}[key]
                self.match(want, actual, key)
            else:
                self.fail(f"unknown expectation {key!r}")
        if decision.allowed and decision.problem is not None:
            self.fail(f"allowed, with a problem {decision.problem.to_dict()}")

    def verify_token(self, spec: dict[str, Any], expect: dict[str, Any]) -> None:
        claims = self.call(expect, lambda: self.sdk.verify_token(self.token(spec["token"])))
        if claims is not None:
            self.fields(expect, {"subject": claims.subject, "tenant": claims.tenant_id}, {"subject", "tenant"})

    # -- audit ----------------------------------------------------------------------------

    def record(self, expected: dict[str, Any], record: AuditRecord, path: str) -> None:
        wire_numbers(record.metadata, f"{path}.metadata")
        actual = {"tenant": record.tenant_id, "actor": record.actor, "event": record.event, "outcome": record.outcome,
                  "metadata": record.metadata}
        for key, want in expected.items():
            if key not in actual:
                self.fail(f"{path}: unknown record field {key!r}")
            self.match(want, actual[key], f"{path}.{key}")

    def audit(self, spec: dict[str, Any], expect: dict[str, Any]) -> None:
        record = self.call(expect, lambda: self.sdk.audit(
            spec["event"], outcome=spec.get("outcome", ""), actor=spec.get("actor", ""),
            tenant_id=spec.get("tenant", ""), metadata=spec.get("metadata")))
        if record is not None and "record" in expect:
            self.record(expect["record"], record, "record")

    def audit_query(self, spec: dict[str, Any], expect: dict[str, Any]) -> None:
        def query() -> list[AuditRecord]:
            return self.sdk.audit_query(tenant_id=spec.get("tenant", ""), event_prefix=spec.get("event_prefix", ""),
                                        outcome=spec.get("outcome", ""))

        if "problem" in expect:
            self.call(expect, query)
            return
        wanted = expect["records"]
        deadline = time.monotonic() + POLL_GUARD_S
        while True:
            records = query()
            if len(records) >= len(wanted) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if len(records) != len(wanted):
            self.fail(f"expected {len(wanted)} records, got {[(r.event, r.outcome, r.metadata) for r in records]}")
        for n, (want, record) in enumerate(zip(wanted, records)):
            self.record(want, record, f"records[{n}]")

    def verify_chain(self, spec: dict[str, Any], expect: dict[str, Any]) -> None:
        assert expect == {"ok": True}, "verify_chain expects {\"ok\": true}"
        records = self.sdk.audit_query(limit=1_000_000)
        prev = "0" * 64
        for n, r in enumerate(records, start=1):
            where = f"record {r.seq}"
            if r.seq != n:
                self.fail(f"{where}: expected seq {n}")
            if r.prev_hash != prev:
                self.fail(f"{where}: prev_hash {r.prev_hash} is not the previous hash {prev}")
            if not RFC3339_MS.match(r.time):
                self.fail(f"{where}: time {r.time!r} is not RFC 3339 with milliseconds")
            canonical = jcs({"v": 1, "seq": r.seq, "time": r.time, "tenant": r.tenant_id, "actor": r.actor,
                                       "event": r.event, "outcome": r.outcome, "metadata": r.metadata})
            if r.canonical != canonical:
                self.fail(f"{where}: canonical {r.canonical!r} is not RFC 8785 of the record: {canonical!r}")
            digest = hashlib.sha256(DOMAIN_TAG + bytes.fromhex(prev) + r.canonical).hexdigest()
            if r.hash != digest:
                self.fail(f"{where}: hash {r.hash} is not {digest}")
            prev = r.hash
        # Full: by default the sidecar checks only the records since its newest checkpoint.
        verdict = self.sdk.audit_verify(full=True)
        if not verdict.ok or verdict.records_checked < len(records):
            self.fail(f"audit_verify: {verdict} after {len(records)} records")

    def wait(self, seconds: float, expect: dict[str, Any]) -> None:
        time.sleep(seconds)


def test_a_flood_of_new_denial_keys_overflows_into_one_record(implementation: Callable[[dict[str, str]], BaseSDK]) -> None:
    """Past 1,000 windows opened in a window, new keys are only counted, into one overflow
    record (too many steps for a scenario, so written here against both implementations)."""
    sdk = implementation(dict(SUITE["env"]))
    for n in range(1001):
        assert not sdk.authorize(tenant_id=f"flood-{n}", require=["pro_features"]).allowed
    deadline = time.monotonic() + POLL_GUARD_S
    while not (overflow := [r for r in sdk.audit_query(event_prefix="auth.denied", limit=5000) if r.actor == "coresdk"]):
        assert time.monotonic() < deadline, "no overflow record"
        time.sleep(0.05)
    records = sdk.audit_query(event_prefix="auth.denied", limit=5000)
    assert len(records) == 1001
    assert len({r.tenant_id for r in records if r.actor == "anonymous"}) == 1000
    [record] = overflow
    assert (record.tenant_id, record.outcome) == ("", "denied")
    assert set(record.metadata) == {"reasons", "count", "coalesced", "since_ms"}
    assert (record.metadata["reasons"], record.metadata["count"], record.metadata["coalesced"]) == ({"FEATURE_LOCKED": 1}, 1, "overflow")


def test_an_oversized_webhook_record_is_truncated_not_refused(implementation: Callable[[dict[str, str]], BaseSDK]) -> None:
    """A delivery's record is bounded to 4 KiB by replacing its largest values; the problem
    quotes the customer id cut short (an input too long for a scenario file)."""
    sdk = implementation(dict(SUITE["env"]))
    run = Run({"name": "oversized", "steps": []}, dict(SUITE["env"]), sdk)
    customer = "cus_" + "x" * 5000
    run.webhook({"event": "big", "type": "invoice.paid", "customer": customer},
                {"problem": {"status": 422, "reason": "UNKNOWN_CUSTOMER", "detail_contains": f"'{customer[:64]}…'"}})
    run.audit_query({"outcome": "rejected"}, {"records": [{"metadata": {
        "event_id": "$event_id:big", "event_type": "invoice.paid", "created": "$created:big", "livemode": False,
        "customer": "[truncated]", "parked": False, "not_parked": "the customer id is not one a tenant can be mapped to",
        "refusal": f"no tenant is mapped for customer '{customer[:64]}…'"}}]})
    run.verify_chain({}, {"ok": True})


def test_random_billing_histories_answer_alike_in_the_sidecar_and_the_mock(sidecar_and_mock: tuple[BaseSDK, BaseSDK]) -> None:
    """Beyond the hand-written scenarios: realistic histories from a fixed seed (overlapping
    subscriptions, plan switches, invoices, entitlement summaries, same-second ties, delivery in
    a shuffled order with redeliveries) get the same answer to every delivery and end in the
    same flags, explanations and audit trail in the mock as in the sidecar; in some histories the
    customer is mapped only midway, by an admin or a checkout (its earlier events are parked and
    applied by the mapping), or an admin overrides a flag."""
    import random

    env = dict(SUITE["env"])
    sidecar, mock = sidecar_and_mock
    rng = random.Random(12)
    now = int(time.time())
    statuses = ["incomplete", "trialing", "active", "past_due", "unpaid", "paused", "canceled", "incomplete_expired"]
    plans = [("basic", "Basic"), ("pro_monthly", "Pro Monthly"), ("team", "Enterprise Annual")]
    for history in range(30):
        tenant = f"history-{history}"
        customer = f"cus_history_{history}" if rng.random() < 0.4 else None
        events = []
        for n in range(rng.randint(3, 9)):
            created = now - 600 + rng.randint(0, 5) * 60 + rng.choice([0, 0, 1])
            kind = rng.random()
            obj: dict[str, Any] = {"customer": customer} if customer else {"metadata": {"tenant_id": tenant}}
            previous = None
            if kind < 0.5:
                event_type = rng.choice(["customer.subscription.created", "customer.subscription.updated",
                                         "customer.subscription.updated", "customer.subscription.deleted",
                                         "customer.subscription.paused", "customer.subscription.resumed"])
                lookup_key, nickname = rng.choice(plans)
                obj.update({"id": rng.choice(["sub_a", "sub_b"]), "object": "subscription", "status": rng.choice(statuses),
                            "items": {"data": [{"price": {"lookup_key": lookup_key, "nickname": nickname}}]}})
                if event_type == "customer.subscription.updated" and rng.random() < 0.5:
                    previous = {"status": rng.choice(statuses)}
            elif kind < 0.8:
                event_type = rng.choice(["invoice.paid", "invoice.payment_failed", "subscription.upgraded", "charge.refunded"])
                obj.update({"id": f"in_{n}", "object": "invoice"})
            else:
                event_type = "entitlements.active_entitlement_summary.updated"
                keys = rng.sample(["sso", "audit_log", "exports"], rng.randint(0, 3))
                obj.update({"object": "entitlements.active_entitlement_summary",
                            "entitlements": {"data": [{"lookup_key": k} for k in keys]}})
            data: dict[str, Any] = {"object": obj}
            if previous is not None:
                data["previous_attributes"] = previous
            event = {"id": f"evt_h{history}_{n:02d}", "object": "event", "created": created, "data": data,
                     "livemode": False, "type": event_type}
            events.append(json.dumps(event, separators=(",", ":")).encode())
        deliveries: list[Any] = events + rng.sample(events, rng.randint(0, 2))
        rng.shuffle(deliveries)
        if customer and rng.random() < 0.5:
            deliveries.insert(rng.randint(0, len(deliveries)), "map")
        elif customer:
            # Or a checkout names the tenant (sometimes a malformed one, which maps nothing).
            reference = tenant if rng.random() < 0.8 else f"{tenant} x"
            checkout = {"id": f"evt_h{history}_checkout", "object": "event", "created": now - 300,
                        "data": {"object": {"id": "cs_1", "object": "checkout.session", "customer": customer,
                                            "client_reference_id": reference}},
                        "livemode": False, "type": "checkout.session.completed"}
            body = json.dumps(checkout, separators=(",", ":")).encode()
            deliveries.insert(rng.randint(0, len(deliveries)), body)
            deliveries.insert(rng.randint(0, len(deliveries)), body)
        if rng.random() < 0.4:
            override = (rng.choice(["pro_features", "paywall_active", "advanced_analytics", "sso"]), rng.random() < 0.5)
            deliveries.insert(rng.randint(0, len(deliveries)), override)
        for body in deliveries:
            answers = []
            for sdk in (sidecar, mock):
                if body == "map":
                    answers.append(sdk.map_customer(customer, tenant, actor="history"))
                    continue
                if isinstance(body, tuple):
                    flag = sdk.set_flag(tenant, body[0], body[1], actor="history", reason="override")
                    answers.append((flag.value, flag.updated_by))
                    continue
                header = stripe_signature_header(env["STRIPE_WEBHOOK_SECRET"], int(time.time()), body)
                try:
                    # An operator's replay of an exported event now and then, else a delivery.
                    r = sdk.replay_event(body, reason="history") if zlib.crc32(body) % 7 == 0 else sdk.handle_stripe_webhook(body, header)
                except ProblemError as e:
                    answers.append((e.problem.status, e.problem.reason, e.problem.detail))
                    continue
                answers.append((r.outcome, r.tenant_id, {c.key: (c.old_value, c.new_value) for c in r.flag_changes}, sorted(r.stale_flags)))
            assert answers[0] == answers[1], f"history {history}, {body!r}: sidecar {answers[0]}, mock {answers[1]}"
        ends = [{k: (f.value, f.is_default) for k, f in sdk.get_flags(tenant).items()} for sdk in (sidecar, mock)]
        assert ends[0] == ends[1], f"history {history}: sidecar {ends[0]}, mock {ends[1]}"
        def explained(sdk: BaseSDK, key: str) -> Any:
            why = sdk.explain_flag(tenant, key)
            event = lambda e: None if e is None else (e.event_id, e.event_type, e.created, e.audit_seq, e.actor, e.reason)
            admin = None if why.admin is None else (why.admin.actor, why.admin.reason)
            return (why.flag.value, why.flag.is_default, event(why.event), admin, why.rule,
                    [event(e) for e in why.stale_events], event(why.newest_event))

        for key in ends[0]:
            whys = [explained(sdk, key) for sdk in (sidecar, mock)]
            assert whys[0] == whys[1], f"history {history}, {key}: sidecar {whys[0]}, mock {whys[1]}"
        # Every record of the tenant alike, but for when things happened.
        trails = [[(r.actor, r.event, r.outcome, {k: v for k, v in r.metadata.items() if k != "parked_at_ms"})
                   for r in sdk.audit_query(tenant_id=tenant)] for sdk in (sidecar, mock)]
        assert trails[0] == trails[1], f"history {history}: sidecar {trails[0]}, mock {trails[1]}"


def test_random_access_requests_decide_alike_in_the_sidecar_and_the_mock(sidecar_and_mock: tuple[BaseSDK, BaseSDK]) -> None:
    """Random access requests (fixed seed: tokens good, forged or tenant-less, a tenant that
    matches or not, required and forbidden flags of every type, with and without a resource)
    get the same decision and problem, and leave the same auth.denied records, in both."""
    import random

    env = dict(SUITE["env"])
    sidecar, mock = sidecar_and_mock
    for sdk in (sidecar, mock):
        sdk.set_flag("t1", "pro_features", True, actor="setup")
        sdk.set_flag("t1", "paywall_active", True, actor="setup")
        sdk.set_flag("t2", "sso", "yes", actor="setup")
    rng = random.Random(3)
    tenants = ["acme-corp", "globex", "t1", "t2"]
    flags = ["pro_features", "paywall_active", "advanced_analytics", "sso", "never_defined"]
    for _ in range(300):
        request: dict[str, Any] = {"require": rng.sample(flags, rng.randint(0, 2)),
                                   "deny_if": rng.sample(flags, rng.randint(0, 2)),
                                   "resource": rng.choice(["", "GET /x"])}
        if rng.random() < 0.6:
            claims: dict[str, Any] = {"sub": rng.choice(["u1", "u2", ""]), "exp": int(time.time()) + 600}
            if rng.random() < 0.8:
                claims["tenant_id"] = rng.choice(tenants)
            secret = env["CORESDK_JWT_SECRET"] if rng.random() < 0.9 else SUITE["forged_secret"] * 2
            request["token"] = jwt(claims, secret, "HS256")
        if rng.random() < 0.6 or "token" not in request:
            request["tenant_id"] = rng.choice(tenants)
        answers = []
        for sdk in (sidecar, mock):
            d = sdk.authorize(**request)
            answers.append((d.allowed, d.problem.to_dict() if d.problem else None, d.tenant_id, d.subject))
        assert answers[0] == answers[1], f"{request}: sidecar {answers[0]}, mock {answers[1]}"

    def denials(sdk: BaseSDK) -> list[Any]:
        return [(r.tenant_id, r.actor, r.outcome, r.metadata) for r in sdk.audit_query(event_prefix="auth.")]

    wanted = denials(mock)
    deadline = time.monotonic() + POLL_GUARD_S
    while len(got := denials(sidecar)) < len(wanted) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert got == wanted
