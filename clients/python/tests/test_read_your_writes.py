"""After a committed write the client waits, within one deadline, until its flag cache shows
what the write changed: the caller's next is_enabled sees it. Against the real binary, with the
cache's stream slowed down so a missing wait shows."""
from __future__ import annotations

import time
from typing import Any

import grpc
import pytest

from conftest import Sidecar, client_for, sign, stripe_event
from coresdk import ProblemError, Settings
from coresdk.client import SidecarClient
from coresdk.v1 import flags_pb2, webhook_pb2

# Long enough that a caller not waiting for the cache reads before the change arrives.
STREAM_DELAY_S = 0.4


def slow_stream(client: SidecarClient) -> None:
    """Every change the flag stream delivers reaches the cache STREAM_DELAY_S late."""
    apply = client.cache.apply

    def late(change: flags_pb2.Flag) -> None:
        time.sleep(STREAM_DELAY_S)
        apply(change)

    client.cache.apply = late  # type: ignore[method-assign]


def park_an_invoice(client: SidecarClient, customer: str) -> None:
    body = stripe_event("invoice.paid", customer, created=int(time.time()) - 60)
    with pytest.raises(ProblemError) as refused:
        client.handle_stripe_webhook(body, sign(body))
    assert refused.value.problem.reason == "UNKNOWN_CUSTOMER"


def test_a_replayed_checkout_waits_for_the_parked_events_it_applied(sidecar: Sidecar) -> None:
    client = client_for(sidecar, timeout_ms=5000)
    try:
        park_an_invoice(client, "cus_ryw_replay")
        slow_stream(client)
        checkout = stripe_event("checkout.session.completed", "cus_ryw_replay", client_reference_id="ryw-replay")
        result = client.replay_event(checkout, reason="support ticket 7")
        assert (result.outcome, result.tenant_id) == ("applied", "ryw-replay")
        assert client.is_enabled("ryw-replay", "pro_features"), "the parked invoice's change is not in the cache yet"
    finally:
        client.close()


def test_a_map_customer_retried_after_a_lost_answer_still_waits(sidecar: Sidecar) -> None:
    """The retry answers 0 parked events applied (the first attempt applied them): the client
    waits for the tenant's flags all the same."""
    client = client_for(sidecar, timeout_ms=5000)
    try:
        park_an_invoice(client, "cus_ryw_map")
        slow_stream(client)
        real = client._tenants.MapCustomer
        calls: list[int] = []

        class Lost(grpc.RpcError):
            def code(self) -> grpc.StatusCode:
                return grpc.StatusCode.UNAVAILABLE

            def details(self) -> str:
                return "connection reset after the commit"

            def trailing_metadata(self) -> tuple:
                return ()

        def answer_lost_once(request: Any, **kwargs: Any) -> Any:
            answer = real(request, **kwargs)
            calls.append(answer.parked_events_applied)
            if len(calls) == 1:
                raise Lost()
            return answer

        client._tenants.MapCustomer = answer_lost_once  # type: ignore[method-assign]
        assert client.map_customer("cus_ryw_map", "ryw-map", actor="ops") == 0
        assert calls == [1, 0]
        assert client.is_enabled("ryw-map", "pro_features"), "the parked invoice's change is not in the cache yet"
    finally:
        client.close()


def test_the_waits_after_a_webhook_share_one_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    """An applied checkout waits for its own changes and then for the tenant's flags: together
    at most one timeout_ms, however slow each is (a clock that only the waits advance)."""
    import coresdk.client as module

    timeout_s = 1.0
    client = SidecarClient(Settings(sidecar_addr="127.0.0.1:9", timeout_ms=int(timeout_s * 1000)), watch=False)
    now = [1000.0]
    monkeypatch.setattr(module.time, "monotonic", lambda: now[0])

    def wait_for(predicate: Any, timeout: float) -> bool:
        now[0] += timeout  # nothing ever arrives: every wait runs to its end
        return False

    get_flags_timeouts: list[float] = []

    def get_flags(request: Any, timeout: float, **_: Any) -> flags_pb2.GetFlagsResponse:
        get_flags_timeouts.append(timeout)
        now[0] += timeout / 2
        return flags_pb2.GetFlagsResponse(flags=[flags_pb2.Flag(tenant_id="t", key="sso", version=9)])

    def checkout(request: Any, timeout: float, **_: Any) -> webhook_pb2.HandleStripeWebhookResponse:
        return webhook_pb2.HandleStripeWebhookResponse(
            event_id="evt_1", event_type="checkout.session.completed", tenant_id="t",
            outcome=webhook_pb2.WEBHOOK_OUTCOME_APPLIED,
            flag_changes=[webhook_pb2.FlagChange(key="pro_features", version=3)],
        )

    try:
        client.cache.connected = True
        client.cache.wait_for = wait_for  # type: ignore[method-assign]
        client._webhooks = type("Webhooks", (), {"HandleStripeWebhook": staticmethod(checkout), "ReplayStripeEvent": staticmethod(checkout)})()
        client._flags = type("Flags", (), {"GetFlags": staticmethod(get_flags)})()
        for deliver in (lambda: client.handle_stripe_webhook(b"{}", "t=1,v1=00"), lambda: client.replay_event(b"{}", reason="r")):
            started = now[0]
            assert deliver().outcome == "applied"
            assert now[0] - started <= timeout_s + 1e-9
        assert all(t <= timeout_s for t in get_flags_timeouts)
    finally:
        client.close()
