"""What every client offers, whether it talks to a sidecar or is the in-process mock."""
from __future__ import annotations

import abc
from typing import Any, Iterable, Mapping, Optional, Sequence

from coresdk.config import Settings
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
)


class BaseSDK(abc.ABC):
    settings: Settings

    @abc.abstractmethod
    def handle_stripe_webhook(self, payload: bytes, signature_header: str, *, include_proof: bool = False) -> WebhookResult:
        """Forwards a Stripe delivery (raw body, `Stripe-Signature`). Returns only once the effect
        is committed; raises ProblemError otherwise (answer `problem.status` so Stripe retries).
        With `include_proof`, the result carries the inclusion proof of the delivery's audit
        record against the checkpoint signed for it (the call waits for that checkpoint)."""

    @abc.abstractmethod
    def replay_event(self, payload: bytes, *, reason: str) -> WebhookResult:
        """Admin: feeds one exported event through the webhook path without a signature
        (actor `replay`, `reason` in its audit record); duplicates and stale events answer as
        for a delivery. `created` is required and may not lie in the future."""

    @abc.abstractmethod
    def get_flag(self, tenant_id: str, key: str) -> Flag: ...

    @abc.abstractmethod
    def explain_flag(self, tenant_id: str, key: str) -> FlagExplanation: ...

    @abc.abstractmethod
    def get_flags(self, tenant_id: str) -> dict[str, Flag]: ...

    @abc.abstractmethod
    def set_flag(self, tenant_id: str, key: str, value: FlagValue, *, actor: str, reason: str = "") -> Flag: ...

    @abc.abstractmethod
    def verify_token(self, token: str) -> Claims: ...

    @abc.abstractmethod
    def authorize(
        self,
        *,
        token: Optional[str] = None,
        tenant_id: Optional[str] = None,
        require: Sequence[str] = (),
        deny_if: Sequence[str] = (),
        resource: str = "",
    ) -> Decision: ...

    @abc.abstractmethod
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
        """Appends an application event to the audit trail (None when spooled under fail mode
        open). With `include_proof`, the record carries `inclusion_proof`: its proof against the
        checkpoint signed for it, whose note is `inclusion_proof.checkpoint` (the call waits
        for that checkpoint, about a second)."""

    @abc.abstractmethod
    def audit_query(
        self,
        *,
        tenant_id: str = "",
        event_prefix: str = "",
        outcome: str = "",
        limit: int = 1000,
    ) -> list[AuditRecord]: ...

    @abc.abstractmethod
    def audit_verify(self, *, full: bool = False) -> VerifyResult:
        """Checks the log: by default the records added since the newest checkpoint and a
        consistency proof from it; with `full`, every record and hash from the first."""

    @abc.abstractmethod
    def audit_checkpoint(self) -> str:
        """The newest signed checkpoint: a C2SP tlog-checkpoint note (check it with
        `coresdk.transparency.open_checkpoint` and the log's verifier key). NOT_FOUND (404)
        before the first checkpoint."""

    @abc.abstractmethod
    def audit_inclusion_proof(self, seq: int, tree_size: int = 0) -> InclusionProof:
        """The RFC 9162 inclusion proof of record `seq` in the tree of `tree_size` records; 0
        means the newest checkpoint's tree, whose note comes with the proof."""

    @abc.abstractmethod
    def audit_consistency_proof(self, from_size: int, to_size: int = 0) -> ConsistencyProof:
        """The RFC 9162 consistency proof that the tree of `to_size` records (0: the newest
        checkpoint's) extends the one of `from_size`."""

    @abc.abstractmethod
    def map_customer(self, customer_id: str, tenant_id: str, *, actor: str, reason: str = "") -> int:
        """Maps a Stripe customer to a tenant (admin); returns how many of the customer's parked
        events (delivered while it had no tenant) the mapping applied."""

    @abc.abstractmethod
    def resolve_customer(self, customer_id: str) -> Optional[str]: ...

    def is_enabled(self, tenant_id: str, key: str) -> bool:
        """True when the tenant's flag is on; an unknown flag is off."""
        try:
            return self.get_flag(tenant_id, key).value is True
        except LookupError:
            return False

    def cached_is_enabled(self, tenant_id: str, key: str) -> Optional[bool]:
        """`is_enabled` answered without any I/O, or None when that takes a call (an event loop
        may call this on its own thread)."""
        return None

    def cached_flags(self, tenant_id: str) -> Optional[dict[str, Flag]]:
        """`get_flags` answered without any I/O, or None when that takes a call."""
        return None

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc: Iterable[Any]) -> None:
        self.close()
