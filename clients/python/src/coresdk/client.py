"""The client of a real sidecar: gRPC calls with a deadline and retries, a local flag cache fed
by WatchFlags, and the fail mode for when the sidecar is away."""
from __future__ import annotations

import collections
import json
import logging
import random
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, TypeVar

import grpc
from google.protobuf import json_format, struct_pb2

from coresdk.base import BaseSDK
from coresdk.config import Settings
from coresdk.errors import (
    FlagNotFound,
    Problem,
    ProblemError,
    SidecarUnavailable,
    problem_from_rpc_error,
    unavailable_problem,
)
from coresdk.validation import check_ids
from coresdk.models import (
    AuditRecord,
    Claims,
    ConsistencyProof,
    Decision,
    Flag,
    FlagExplanation,
    FlagValue,
    InclusionProof,
    VerifyResult,
    WebhookResult,
    value_to_proto,
)
from coresdk.v1 import (
    audit_pb2,
    audit_pb2_grpc,
    auth_pb2,
    auth_pb2_grpc,
    flags_pb2,
    flags_pb2_grpc,
    tenants_pb2,
    tenants_pb2_grpc,
    webhook_pb2,
    webhook_pb2_grpc,
)

log = logging.getLogger("coresdk")
T = TypeVar("T")
# How much longer than its timeout a call with include_proof may take: the sidecar answers
# once a checkpoint covering the record is signed, which it does early for it (about a second).
PROOF_WAIT_S = 5.0
# A full verification replays the whole log, which can take far longer than a call's timeout;
# the sidecar stops it at its own request timeout (CORESDK_REQUEST_TIMEOUT_S, 30 s by default).
FULL_VERIFY_TIMEOUT_S = 60.0


class Outage:
    """Logs a sidecar outage once when it starts and once when it ends, not once per call."""

    def __init__(self, fail_mode: str):
        self._fail_mode = fail_mode
        self._down = False
        self._lock = threading.Lock()
        self.fail_mode_decisions = 0

    def failed(self, why: str) -> None:
        with self._lock:
            if not self._down:
                self._down = True
                log.warning("coresdk sidecar unavailable (%s); fail mode %s applies until it is back", why, self._fail_mode)

    def decided_by_fail_mode(self) -> None:
        with self._lock:
            self.fail_mode_decisions += 1

    def recovered(self) -> bool:
        with self._lock:
            if self._down:
                self._down = False
                log.warning("coresdk sidecar is back")
                return True
            return False

    @property
    def down(self) -> bool:
        return self._down


class FlagCache:
    """Every tenant's flags plus the catalog defaults, kept exact by a WatchFlags stream."""

    def __init__(self) -> None:
        self._flags: dict[tuple[str, str], Flag] = {}
        self._defaults: dict[str, Flag] = {}
        self.warm = threading.Event()
        self.connected = False
        self._changed = threading.Condition()

    def replace(self, snapshot: flags_pb2.FlagSnapshot) -> None:
        flags = {(f.tenant_id, f.key): Flag.from_proto(f) for f in snapshot.flags}
        defaults = {f.key: Flag.from_proto(f) for f in snapshot.defaults}
        with self._changed:
            self._flags, self._defaults = flags, defaults
            self._changed.notify_all()
        self.warm.set()

    def apply(self, change: flags_pb2.Flag) -> None:
        key = (change.tenant_id, change.key)
        with self._changed:
            current = self._flags.get(key)
            if current is None or current.version < change.version:
                self._flags[key] = Flag.from_proto(change)
            self._changed.notify_all()

    def get(self, tenant_id: str, key: str) -> Optional[Flag]:
        flag = self._flags.get((tenant_id, key))
        if flag is not None:
            return flag
        default = self._defaults.get(key)
        if default is None:
            return None
        return Flag(tenant_id=tenant_id, key=key, value=default.value, is_default=True)

    def of_tenant(self, tenant_id: str) -> dict[str, Flag]:
        out = {key: Flag(tenant_id, key, d.value, is_default=True) for key, d in self._defaults.items()}
        out.update({k: f for (t, k), f in list(self._flags.items()) if t == tenant_id})
        return out

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        with self._changed:
            return self._changed.wait_for(predicate, timeout)


def _channel(settings: Settings) -> grpc.Channel:
    """A channel to the sidecar: plaintext, or TLS (mutual with a client certificate)."""
    options: list[tuple[str, Any]] = [("grpc.enable_retries", 0), ("grpc.keepalive_time_ms", 30_000)]
    if not settings.uses_tls:
        return grpc.insecure_channel(settings.sidecar_addr, options=options)

    def read(path: Optional[str]) -> Optional[bytes]:
        return Path(path).read_bytes() if path else None

    credentials = grpc.ssl_channel_credentials(
        root_certificates=read(settings.tls_ca_file),
        private_key=read(settings.tls_client_key_file),
        certificate_chain=read(settings.tls_client_cert_file),
    )
    if settings.tls_server_name:
        options.append(("grpc.ssl_target_name_override", settings.tls_server_name))
    return grpc.secure_channel(settings.sidecar_addr, credentials, options=options)


class SidecarClient(BaseSDK):
    def __init__(self, settings: Optional[Settings] = None, *, watch: bool = True):
        self.settings = settings or Settings.from_env()
        self._channel = _channel(self.settings)
        self._webhooks = webhook_pb2_grpc.WebhookServiceStub(self._channel)
        self._flags = flags_pb2_grpc.FlagServiceStub(self._channel)
        self._audit = audit_pb2_grpc.AuditServiceStub(self._channel)
        self._auth = auth_pb2_grpc.AuthServiceStub(self._channel)
        self._tenants = tenants_pb2_grpc.TenantServiceStub(self._channel)
        self.outage = Outage(self.settings.fail_mode)
        self.cache = FlagCache()
        self._spool: collections.deque = collections.deque(maxlen=self.settings.spool_limit)
        # One flusher at a time (the watcher and a caller may both see the sidecar come back), and a
        # record leaves the spool only once the sidecar acknowledged it, so `spooled == 0` means stored.
        self._flushing = threading.Lock()
        self._stream: Any = None
        self._closed = threading.Event()
        # Cuts the watcher's reconnect backoff short: set when a call finds the sidecar back
        # (the stream should follow at once, not after up to 7.5 s) and on close.
        self._wake_watcher = threading.Event()
        self._watcher: Optional[threading.Thread] = None
        if watch:
            self._watcher = threading.Thread(target=self._watch_loop, name="coresdk-watch", daemon=True)
            self._watcher.start()

    # -- plumbing -------------------------------------------------------------------------

    def _metadata(self, admin: bool = False) -> list[tuple[str, str]]:
        token = self.settings.admin_token if admin else (self.settings.api_token or None)
        if admin and not token:
            token = self.settings.api_token
        return [("authorization", f"Bearer {token}")] if token else []

    def _call(
        self, method: Callable[..., T], request: Any, *, admin: bool = False, idempotent: bool = True, deadline: Optional[float] = None
    ) -> T:
        """One call within the deadline, retrying what `ProblemError.retryable` says is worth it
        (the sidecar away or slow, or the connection at its call limit) with backoff and jitter. Webhooks
        are deduplicated by event id, appends by their idempotency key, and reads repeat
        safely. A write that is not idempotent (`SetFlag`) is retried only after the sidecar
        said it committed nothing: a transport failure may have come after the commit, and a
        retry would write it twice. `deadline` (monotonic) replaces the call's own."""
        if deadline is None:
            deadline = time.monotonic() + self.settings.timeout_ms / 1000
        delay = 0.02
        while True:
            remaining = deadline - time.monotonic()
            try:
                # A write that must not be retried waits for the connection instead (within the
                # deadline), so a sidecar that is restarting fails it before it was ever sent.
                answer = method(
                    request, timeout=max(remaining, 0.001), metadata=self._metadata(admin), wait_for_ready=not idempotent
                )
                if self.outage.recovered():
                    self._wake_watcher.set()
                    self._flush_spool_in_background()
                return answer
            except grpc.RpcError as e:
                error = problem_from_rpc_error(e)
                transport = isinstance(error, SidecarUnavailable)
                if transport:
                    self.outage.failed(e.details() if hasattr(e, "details") else str(e))
                if not error.retryable or (transport and not idempotent) or time.monotonic() + delay >= deadline:
                    raise error from None
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 0.5)

    def _watch_loop(self) -> None:
        backoff = 0.05
        while not self._closed.is_set():
            try:
                stream = self._flags.WatchFlags(flags_pb2.WatchFlagsRequest(), metadata=self._metadata())
                self._stream = stream
                for message in stream:
                    kind = message.WhichOneof("event")
                    if kind == "snapshot":
                        self.cache.replace(message.snapshot)
                        self.cache.connected = True
                        backoff = 0.05
                        if self.outage.recovered():
                            self._flush_spool_in_background()
                    elif kind == "change":
                        self.cache.apply(message.change)
            except grpc.RpcError as e:
                if self._closed.is_set():
                    return
                self.outage.failed(f"flag stream: {e.code().name if hasattr(e, 'code') else e}")
            except Exception:
                if self._closed.is_set():
                    return
                # A failure handling a message must not end the loop with the cache still
                # marked current: it would serve stale flags as fresh from then on.
                log.exception("coresdk: handling the flag stream failed; reconnecting")
                if self._stream is not None:
                    self._stream.cancel()
            self.cache.connected = False
            self._wake_watcher.wait(backoff * (0.5 + random.random()))
            self._wake_watcher.clear()
            backoff = min(backoff * 2, 5.0)

    def _flush_spool_in_background(self) -> None:
        """A caller must not wait while up to `spool_limit` records are sent."""
        if self._spool and not self._flushing.locked():
            threading.Thread(target=self._flush_spool, name="coresdk-spool", daemon=True).start()

    def _flush_spool(self) -> None:
        if not self._flushing.acquire(blocking=False):
            return
        busy_delay = 0.02
        try:
            while self._spool and not self._closed.is_set():
                request = self._spool[0]
                try:
                    self._audit.Append(request, timeout=self.settings.timeout_ms / 1000, metadata=self._metadata())
                except grpc.RpcError as e:
                    error = problem_from_rpc_error(e)
                    if error.connection_busy:
                        # Up but busy (not an outage): the same record again shortly.
                        self._closed.wait(busy_delay * (0.5 + random.random()))
                        busy_delay = min(busy_delay * 2, 1.0)
                        continue
                    if isinstance(error, SidecarUnavailable) or error.retryable:
                        # Down again: the next recovery sends the rest.
                        self.outage.failed(f"audit spool: {e.code().name if hasattr(e, 'code') else e}")
                        return
                    # Refused for good: kept at the head, it would block every later record.
                    log.error("coresdk: the sidecar refused a spooled audit record, dropped: %s", error)
                except ValueError:
                    return  # the channel was closed under us
                # A full spool may have dropped this record to make room while it was in flight.
                if self._spool and self._spool[0] is request:
                    self._spool.popleft()
        finally:
            self._flushing.release()
        # A record spooled while this flush was ending (its recovery saw the lock held) is
        # sent now rather than at the next outage's end.
        if self._spool and not self.outage.down and not self._closed.is_set():
            self._flush_spool_in_background()

    def close(self) -> None:
        self._closed.set()
        self._wake_watcher.set()
        stream = getattr(self, "_stream", None)
        if stream is not None:
            stream.cancel()
        self._channel.close()

    # -- webhooks -------------------------------------------------------------------------

    def handle_stripe_webhook(self, payload: bytes, signature_header: str, *, include_proof: bool = False) -> WebhookResult:
        # Never fails open: an effect that was not committed must make Stripe retry.
        request = webhook_pb2.HandleStripeWebhookRequest(
            payload=payload, signature_header=signature_header or "", include_proof=include_proof
        )
        deadline = time.monotonic() + self.settings.timeout_ms / 1000 + (PROOF_WAIT_S if include_proof else 0)
        return self._webhook_committed(self._call(self._webhooks.HandleStripeWebhook, request, deadline=deadline))

    def replay_event(self, payload: bytes, *, reason: str) -> WebhookResult:
        request = webhook_pb2.ReplayStripeEventRequest(payload=payload, reason=reason)
        return self._webhook_committed(self._call(self._webhooks.ReplayStripeEvent, request, admin=True))

    def _webhook_committed(self, answer: webhook_pb2.HandleStripeWebhookResponse) -> WebhookResult:
        result = WebhookResult.from_proto(answer)
        deadline = self._read_your_writes_deadline()
        self._await_cache(result.tenant_id, [(c.key, c.version) for c in result.flag_changes], deadline)
        if result.event_type == "checkout.session.completed" and result.outcome == "applied":
            # A checkout that maps its customer applies the customer's parked events, whose
            # changes the answer does not list.
            self._await_tenant(result.tenant_id, deadline)
        return result

    def _read_your_writes_deadline(self) -> float:
        """The waits after a committed write together take at most one `timeout_ms`."""
        return time.monotonic() + self.settings.timeout_ms / 1000

    def _await_cache(self, tenant_id: str, versions: list[tuple[str, int]], deadline: float) -> None:
        """Read-your-writes: once a change is acknowledged, wait (until `deadline`) until the
        local cache shows it, so the caller's next is_enabled sees what it just did."""
        if not versions or not self.cache.connected:
            return

        def caught_up() -> bool:
            return all((f := self.cache._flags.get((tenant_id, key))) is not None and f.version >= version for key, version in versions)

        self.cache.wait_for(caught_up, max(deadline - time.monotonic(), 0))

    def _await_tenant(self, tenant_id: str, deadline: float) -> None:
        """Read-your-writes for changes an answer does not list (the parked events a mapping
        applied): the cache waits for the versions the sidecar holds now."""
        if not tenant_id or not self.cache.connected or time.monotonic() >= deadline:
            return
        try:
            answer = self._call(self._flags.GetFlags, flags_pb2.GetFlagsRequest(tenant_id=tenant_id), deadline=deadline)
        except ProblemError:
            return  # the write is committed: a failed wait must not report it as failed
        self._await_cache(tenant_id, [(f.key, f.version) for f in answer.flags if not f.is_default], deadline)

    # -- flags ----------------------------------------------------------------------------

    def get_flag(self, tenant_id: str, key: str) -> Flag:
        check_ids(tenant_id, key, self.settings.problem_type_base)
        # Under fail mode closed a value is served only while the cache is current; with the
        # stream down (reconnecting, say, while calls already succeed) the sidecar is asked.
        if self.cache.warm.is_set() and (self.cache.connected or self.settings.fail_mode == "open"):
            flag = self.cache.get(tenant_id, key)
            if flag is not None:
                return flag
        try:
            return Flag.from_proto(self._call(self._flags.GetFlag, flags_pb2.GetFlagRequest(tenant_id=tenant_id, key=key)))
        except SidecarUnavailable:
            if self.settings.fail_mode == "closed":
                self.outage.decided_by_fail_mode()
                raise
            self.outage.decided_by_fail_mode()
            raise FlagNotFound(unavailable_problem(f"flag '{key}' is not known locally and the sidecar is away")) from None

    def explain_flag(self, tenant_id: str, key: str) -> FlagExplanation:
        check_ids(tenant_id, key, self.settings.problem_type_base)
        request = flags_pb2.ExplainFlagRequest(tenant_id=tenant_id, key=key)
        return FlagExplanation.from_proto(self._call(self._flags.ExplainFlag, request))

    def is_enabled(self, tenant_id: str, key: str) -> bool:
        # The hot path: a dictionary lookup once the cache is warm.
        cached = self.cached_is_enabled(tenant_id, key)
        if cached is not None:
            return cached
        return super().is_enabled(tenant_id, key)

    def cached_is_enabled(self, tenant_id: str, key: str) -> Optional[bool]:
        # `connected` is read once: the stream may drop meanwhile, and then a second look
        # would send the caller to the sidecar after all.
        if not self.cache.connected:
            return None
        flag = self.cache._flags.get((tenant_id, key))
        if flag is not None:
            return flag.value is True
        default = self.cache._defaults.get(key)
        if default is None:
            return None
        # No stored value, which is also what a malformed tenant id finds: refuse that as the
        # sidecar (and the mock) does, off the hot path of a cached value.
        check_ids(tenant_id, key, self.settings.problem_type_base)
        return default.value is True

    def cached_flags(self, tenant_id: str) -> Optional[dict[str, Flag]]:
        if not (self.cache.warm.is_set() and (self.cache.connected or self.settings.fail_mode == "open")):
            return None
        check_ids(tenant_id, None, self.settings.problem_type_base)
        return self.cache.of_tenant(tenant_id)

    def get_flags(self, tenant_id: str) -> dict[str, Flag]:
        check_ids(tenant_id, None, self.settings.problem_type_base)
        cached = self.cached_flags(tenant_id)
        if cached is not None:
            return cached
        answer = self._call(self._flags.GetFlags, flags_pb2.GetFlagsRequest(tenant_id=tenant_id))
        return {f.key: Flag.from_proto(f) for f in answer.flags}

    def set_flag(self, tenant_id: str, key: str, value: FlagValue, *, actor: str, reason: str = "") -> Flag:
        request = flags_pb2.SetFlagRequest(
            tenant_id=tenant_id, key=key, value=value_to_proto(value), actor=actor, reason=reason
        )
        flag = Flag.from_proto(self._call(self._flags.SetFlag, request, admin=True, idempotent=False))
        self._await_cache(tenant_id, [(key, flag.version)], self._read_your_writes_deadline())
        return flag

    # -- auth -----------------------------------------------------------------------------

    def verify_token(self, token: str) -> Claims:
        return Claims.from_proto(self._call(self._auth.VerifyToken, auth_pb2.VerifyTokenRequest(token=token)))

    def authorize(
        self,
        *,
        token: Optional[str] = None,
        tenant_id: Optional[str] = None,
        require: Sequence[str] = (),
        deny_if: Sequence[str] = (),
        resource: str = "",
    ) -> Decision:
        request = auth_pb2.AuthorizeRequest(
            token=token or "",
            tenant_id=tenant_id or "",
            required_features=list(require),
            deny_if=list(deny_if),
            resource=resource,
            include_claims=True,
        )
        try:
            return Decision.from_proto(self._call(self._auth.Authorize, request))
        except SidecarUnavailable as e:
            self.outage.decided_by_fail_mode()
            if self.settings.fail_mode == "closed":
                return Decision(allowed=False, problem=e.problem, tenant_id=tenant_id or "", fail_mode_applied=True)
            return Decision(allowed=True, tenant_id=tenant_id or "", fail_mode_applied=True)

    # -- audit ----------------------------------------------------------------------------

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
        struct = struct_pb2.Struct()
        if metadata:
            json_format.ParseDict(json.loads(json.dumps(metadata, default=str)), struct)
        # The key makes every resend of this record, a retry or the spool's after an outage,
        # answer the one record the sidecar stored, even when an answer was lost after a commit.
        request = audit_pb2.AppendAuditRequest(
            tenant_id=tenant_id, actor=actor, event=event, outcome=outcome, metadata=struct,
            idempotency_key=uuid.uuid4().hex,
            include_proof=include_proof,
        )
        # With include_proof the sidecar answers once a checkpoint covering the record is
        # signed (about a second), so the call gets that long beyond its own timeout.
        deadline = time.monotonic() + self.settings.timeout_ms / 1000 + (PROOF_WAIT_S if include_proof else 0)
        try:
            return AuditRecord.from_proto(self._call(self._audit.Append, request, deadline=deadline))
        except SidecarUnavailable:
            if self.settings.fail_mode == "closed":
                raise
            if len(self._spool) == self._spool.maxlen:
                log.error("coresdk audit spool is full; the oldest spooled record was dropped")
            # Nobody waits for the spooled record's answer: its proof would only slow the flush.
            request.include_proof = False
            self._spool.append(request)
            return None

    @property
    def spooled(self) -> int:
        return len(self._spool)

    def audit_query(self, *, tenant_id: str = "", event_prefix: str = "", outcome: str = "", limit: int = 1000) -> list[AuditRecord]:
        records: list[AuditRecord] = []
        token = ""
        while len(records) < limit:
            page = self._call(
                self._audit.Query,
                audit_pb2.QueryAuditRequest(
                    tenant_id=tenant_id,
                    event_prefix=event_prefix,
                    outcome=outcome,
                    page_size=min(1000, limit - len(records)),
                    page_token=token,
                ),
            )
            records.extend(AuditRecord.from_proto(r) for r in page.records)
            token = page.next_page_token
            if not token:
                break
        return records

    def audit_verify(self, *, full: bool = False) -> VerifyResult:
        deadline = None if not full else time.monotonic() + max(FULL_VERIFY_TIMEOUT_S, self.settings.timeout_ms / 1000)
        return VerifyResult.from_proto(self._call(self._audit.Verify, audit_pb2.VerifyAuditRequest(full=full), deadline=deadline))

    def audit_checkpoint(self) -> str:
        return self._call(self._audit.GetCheckpoint, audit_pb2.GetCheckpointRequest()).note

    def audit_inclusion_proof(self, seq: int, tree_size: int = 0) -> InclusionProof:
        request = audit_pb2.GetInclusionProofRequest(seq=seq, tree_size=tree_size)
        return InclusionProof.from_proto(self._call(self._audit.GetInclusionProof, request))

    def audit_consistency_proof(self, from_size: int, to_size: int = 0) -> ConsistencyProof:
        request = audit_pb2.GetConsistencyProofRequest(from_size=from_size, to_size=to_size)
        return ConsistencyProof.from_proto(self._call(self._audit.GetConsistencyProof, request))

    # -- tenants --------------------------------------------------------------------------

    def map_customer(self, customer_id: str, tenant_id: str, *, actor: str, reason: str = "") -> int:
        request = tenants_pb2.MapCustomerRequest(customer_id=customer_id, tenant_id=tenant_id, actor=actor, reason=reason)
        applied = self._call(self._tenants.MapCustomer, request, admin=True).parked_events_applied
        # Always: a retry after a lost answer says 0 though the first attempt applied events.
        self._await_tenant(tenant_id, self._read_your_writes_deadline())
        return applied

    def resolve_customer(self, customer_id: str) -> Optional[str]:
        try:
            answer = self._call(
                self._tenants.ResolveCustomer, tenants_pb2.ResolveCustomerRequest(customer_id=customer_id), admin=True
            )
        except ProblemError as e:
            if e.code == grpc.StatusCode.NOT_FOUND:
                return None
            raise
        return answer.tenant_id


