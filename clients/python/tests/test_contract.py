"""One suite, two implementations: every test runs against the in-process mock and against the
real sidecar, so the mock cannot drift from the product."""
from __future__ import annotations

import json
import time

import pytest

from conftest import ENV, Sidecar, client_for, sign, stripe_event, token
from coresdk import FlagNotFound, ProblemError, Settings
from coresdk.mock import MockSidecar


def deliver(sdk, body: bytes):
    return sdk.handle_stripe_webhook(body, sign(body))


def test_invoice_paid_turns_pro_features_on_and_is_audited(sdk):
    result = deliver(sdk, stripe_event("invoice.paid", "cus_acme_001"))
    assert (result.outcome, result.tenant_id) == ("applied", "acme-corp")
    assert {c.key: c.new_value for c in result.flag_changes} == {"pro_features": True, "paywall_active": False}
    assert sdk.is_enabled("acme-corp", "pro_features")
    records = sdk.audit_query(tenant_id="acme-corp", event_prefix="billing.invoice.paid")
    assert [(r.actor, r.outcome) for r in records] == [("stripe-webhook", "applied")]
    assert sdk.audit_verify().ok


def test_redelivery_is_a_duplicate_and_older_events_are_stale(sdk):
    now = int(time.time())
    body = stripe_event("invoice.paid", "cus_globex_001", created=now, event_id="evt_dup_1")
    assert deliver(sdk, body).outcome == "applied"
    again = deliver(sdk, body)
    assert (again.outcome, again.tenant_id, again.flag_changes) == ("duplicate", "globex", [])
    late = deliver(sdk, stripe_event("invoice.payment_failed", "cus_globex_001", created=now - 60))
    assert late.outcome == "stale"
    assert sorted(late.stale_flags) == ["paywall_active", "pro_features"]
    assert sdk.is_enabled("globex", "pro_features")
    assert deliver(sdk, stripe_event("charge.refunded", "cus_globex_001")).outcome == "ignored"


def test_an_event_created_in_the_far_future_is_refused_and_does_not_block_later_ones(sdk):
    with pytest.raises(ProblemError) as caught:
        deliver(sdk, stripe_event("invoice.payment_failed", "cus_initech_001", created=9223372036854775807))
    assert (caught.value.status, caught.value.problem.reason) == (400, "INVALID_EVENT")
    assert deliver(sdk, stripe_event("invoice.paid", "cus_initech_001")).outcome == "applied"
    assert sdk.is_enabled("initech", "pro_features")


@pytest.mark.parametrize("created", [None, "yesterday", 1.5, True])
def test_an_event_without_an_integer_created_is_refused(sdk, created):
    # A stand-in such as the signature time would differ between delivery attempts of the event.
    event = json.loads(stripe_event("invoice.paid", "cus_acme_001"))
    if created is None:
        del event["created"]
    else:
        event["created"] = created
    with pytest.raises(ProblemError) as caught:
        deliver(sdk, json.dumps(event).encode())
    assert (caught.value.status, caught.value.problem.reason) == (400, "INVALID_EVENT")
    assert "`created`" in caught.value.problem.detail
    assert not sdk.is_enabled("acme-corp", "pro_features")


@pytest.mark.parametrize(
    "header, reason",
    [
        ("", "SIGNATURE_MISSING"),
        ("t=1,v1=abc", "SIGNATURE_MALFORMED"),
        (None, "SIGNATURE_MISMATCH"),
    ],
)
def test_bad_signatures_are_400_problems(sdk, header, reason):
    body = stripe_event("invoice.paid", "cus_acme_001")
    if header is None:
        header = sign(body, "whsec_forged")
    with pytest.raises(ProblemError) as caught:
        sdk.handle_stripe_webhook(body, header)
    assert caught.value.status == 400
    assert caught.value.problem.reason == reason
    assert not sdk.is_enabled("acme-corp", "pro_features")


def test_forged_deliveries_are_audited_once_per_window_with_a_count(sdk):
    body = stripe_event("invoice.paid", "cus_acme_001")
    for _ in range(5):
        with pytest.raises(ProblemError):
            sdk.handle_stripe_webhook(body, sign(body, "whsec_forged"))
    # The sidecar writes coalesced records off the request path: give its writer a moment.
    deadline = time.monotonic() + 5
    while not (records := sdk.audit_query(event_prefix="billing.webhook.refused")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [(r.metadata.get("reason"), r.metadata.get("count")) for r in records] == [("SIGNATURE_MISMATCH", 1)]


@pytest.fixture(params=["mock", "sidecar"])
def one_second_windows(request, tmp_path):
    env = {**ENV, "CORESDK_DENY_AUDIT_WINDOW_S": "1"}
    if request.param == "mock":
        yield MockSidecar(Settings(use_mock=True), env=env)
        return
    process = Sidecar(tmp_path, extra_env={"CORESDK_DENY_AUDIT_WINDOW_S": "1"})
    process.start()
    client = client_for(process)
    yield client
    client.close()
    process.stop()


def test_denied_repeats_are_counted_without_the_first_calls_details(one_second_windows):
    sdk = one_second_windows
    for path in ["GET /a", "GET /b", "GET /c"]:
        assert not sdk.authorize(tenant_id="hooli", require=["pro_features"], resource=path).allowed
    time.sleep(1.2)
    # The mock reports a window when its key next occurs; the sidecar once it has expired.
    assert not sdk.authorize(tenant_id="hooli", require=["pro_features"], resource="GET /d").allowed
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        records = sdk.audit_query(tenant_id="hooli", event_prefix="auth.denied")
        if any(r.metadata.get("coalesced") == "repeats" for r in records):
            break
        time.sleep(0.05)
    first = records[0]
    assert (first.metadata.get("count"), first.metadata.get("resource")) == (1, "GET /a")
    [repeats] = [r for r in records if r.metadata.get("coalesced") == "repeats"]
    assert (repeats.tenant_id, repeats.metadata.get("count")) == ("hooli", 2)
    assert (repeats.metadata.get("reason"), repeats.metadata.get("feature")) == ("FEATURE_LOCKED", "pro_features")
    assert "resource" not in repeats.metadata, "the first call's resource is not every call's"


def test_replayed_signature_is_refused(sdk):
    import stripe

    body = stripe_event("invoice.paid", "cus_acme_001")
    old = stripe.WebhookSignature.generate_signature_header(body.decode(), "whsec_test_secret", timestamp=int(time.time()) - 301)
    with pytest.raises(ProblemError) as caught:
        sdk.handle_stripe_webhook(body, old)
    assert caught.value.problem.reason == "SIGNATURE_TIMESTAMP_OUT_OF_TOLERANCE"


def test_unknown_customer_is_422_until_mapped(sdk):
    body = stripe_event("invoice.paid", "cus_nobody")
    with pytest.raises(ProblemError) as caught:
        deliver(sdk, body)
    assert caught.value.status == 422
    sdk.map_customer("cus_nobody", "nobody-inc", actor="ops")
    assert sdk.resolve_customer("cus_nobody") == "nobody-inc"
    assert deliver(sdk, body).tenant_id == "nobody-inc"


def test_a_parked_event_applies_on_mapping_in_event_order_and_its_retry_is_a_duplicate(sdk):
    now = int(time.time())
    # Delivered newest first: the payment after the failure must win.
    paid = stripe_event("invoice.paid", "cus_parked_1", created=now - 10, event_id="evt_parked_paid")
    failed = stripe_event("invoice.payment_failed", "cus_parked_1", created=now - 30, event_id="evt_parked_failed")
    for body in (paid, failed, paid):
        with pytest.raises(ProblemError) as caught:
            deliver(sdk, body)
        assert (caught.value.status, caught.value.problem.reason) == (422, "UNKNOWN_CUSTOMER")
    refusals = [r for r in sdk.audit_query(event_prefix="billing.invoice.paid") if r.metadata.get("event_id") == "evt_parked_paid"]
    assert [(r.outcome, r.metadata.get("parked")) for r in refusals] == [("rejected", True)] * 2
    # Stripe's retry finds it parked already: one row, its first time.
    assert refusals[0].metadata["parked_at_ms"] == refusals[1].metadata["parked_at_ms"]

    assert sdk.map_customer("cus_parked_1", "parkco", actor="ops") == 2
    # Current in the store when the mapping answers (the client's cache follows a moment later).
    assert sdk.explain_flag("parkco", "pro_features").flag.value is True
    assert sdk.explain_flag("parkco", "paywall_active").flag.value is False
    mapped = sdk.audit_query(tenant_id="parkco", event_prefix="tenant.customer_mapped")
    assert [r.metadata.get("parked_events") for r in mapped] == [2]
    applied = [r for r in sdk.audit_query(tenant_id="parkco") if r.event.startswith("billing.")]
    assert [(r.metadata["event_id"], r.outcome, r.actor, "parked_at_ms" in r.metadata) for r in applied] == [
        ("evt_parked_failed", "applied", "stripe-webhook", True),
        ("evt_parked_paid", "applied", "stripe-webhook", True),
    ]
    assert deliver(sdk, paid).outcome == "duplicate"
    assert deliver(sdk, failed).outcome == "duplicate"


def test_a_checkout_applies_the_parked_events_of_the_customer_it_maps(sdk):
    paid = stripe_event("invoice.paid", "cus_parked_2", event_id="evt_parked_2")
    with pytest.raises(ProblemError):
        deliver(sdk, paid)
    checkout = deliver(sdk, stripe_event("checkout.session.completed", "cus_parked_2", client_reference_id="checkoutco"))
    assert checkout.tenant_id == "checkoutco"
    assert sdk.explain_flag("checkoutco", "pro_features").flag.value is True
    records = [r for r in sdk.audit_query(tenant_id="checkoutco") if r.event.startswith("billing.")]
    assert [r.event for r in records] == ["billing.invoice.paid", "billing.checkout.session.completed"]
    assert records[1].metadata.get("parked_events_applied") == 1
    assert deliver(sdk, paid).outcome == "duplicate"


@pytest.fixture(params=["mock", "sidecar"])
def one_parked_per_customer(request, tmp_path):
    extra = {"CORESDK_MAX_PARKED_EVENTS_PER_CUSTOMER": "1"}
    if request.param == "mock":
        yield MockSidecar(Settings(use_mock=True), env={**ENV, **extra})
        return
    process = Sidecar(tmp_path, extra_env=extra)
    process.start()
    client = client_for(process)
    yield client
    client.close()
    process.stop()


def test_over_the_per_customer_cap_an_event_is_refused_and_not_parked(one_parked_per_customer):
    sdk = one_parked_per_customer
    for n in (1, 2):
        with pytest.raises(ProblemError) as caught:
            deliver(sdk, stripe_event("invoice.paid", "cus_capped", event_id=f"evt_capped_{n}"))
        assert caught.value.status == 422
    records = {r.metadata["event_id"]: r.metadata for r in sdk.audit_query(event_prefix="billing.invoice.paid")}
    assert records["evt_capped_1"]["parked"] is True
    assert records["evt_capped_2"]["parked"] is False
    assert "CORESDK_MAX_PARKED_EVENTS_PER_CUSTOMER" in records["evt_capped_2"]["not_parked"]


def test_a_checkout_maps_only_unmapped_customers(sdk):
    moved = deliver(sdk, stripe_event("checkout.session.completed", "cus_acme_001", client_reference_id="intruder"))
    assert moved.tenant_id == "acme-corp"
    assert sdk.resolve_customer("cus_acme_001") == "acme-corp"
    [record] = sdk.audit_query(tenant_id="acme-corp", event_prefix="billing.checkout.session.completed")
    assert record.metadata["conflicting_client_reference_id"] == "intruder"
    fresh = deliver(sdk, stripe_event("checkout.session.completed", "cus_fresh", client_reference_id="hooli"))
    assert fresh.tenant_id == "hooli"
    assert sdk.resolve_customer("cus_fresh") == "hooli"


def test_a_huge_customer_id_is_quoted_short(sdk):
    with pytest.raises(ProblemError) as caught:
        deliver(sdk, stripe_event("invoice.paid", "c" * 100_000))
    assert caught.value.status == 422
    assert len(caught.value.problem.detail) < 512


def test_flags_defaults_set_and_not_found(sdk):
    flag = sdk.get_flag("hooli", "pro_features")
    assert (flag.value, flag.is_default) == (False, True)
    with pytest.raises(FlagNotFound):
        sdk.get_flag("hooli", "no_such_flag")
    assert not sdk.is_enabled("hooli", "no_such_flag")
    sdk.set_flag("hooli", "seats", 25, actor="ops@example.com", reason="contract")
    assert sdk.get_flag("hooli", "seats").value == 25
    assert set(sdk.get_flags("hooli")) >= {"pro_features", "paywall_active", "advanced_analytics", "seats"}
    with pytest.raises(ProblemError) as caught:
        sdk.get_flag("", "pro_features")
    assert caught.value.status == 400


def test_authorize_gates_like_the_seed(sdk):
    acme, globex = token("acme-corp"), token("globex")
    locked = sdk.authorize(token=acme, require=["advanced_analytics"], resource="GET /api/analytics")
    assert not locked.allowed
    assert (locked.problem.status, locked.problem.type) == (403, "https://securepay.example/errors/feature-locked")
    assert locked.problem.extensions["upgrade_url"] == "https://securepay.example/pricing"
    deliver(sdk, stripe_event("subscription.upgraded", "cus_acme_001"))
    allowed = sdk.authorize(token=acme, require=["advanced_analytics"])
    assert (allowed.allowed, allowed.tenant_id, allowed.subject) == (True, "acme-corp", "user@acme-corp")

    assert sdk.authorize(token=globex, deny_if=["paywall_active"]).allowed
    deliver(sdk, stripe_event("payment.failed", "cus_globex_001"))
    paywalled = sdk.authorize(token=globex, deny_if=["paywall_active"])
    assert (paywalled.allowed, paywalled.problem.status) == (False, 402)
    assert paywalled.problem.extensions["billing_url"] == "https://securepay.example/billing"

    expired = sdk.authorize(token=token("acme-corp", exp=int(time.time()) - 3600), require=["pro_features"])
    assert (expired.allowed, expired.problem.status) == (False, 401)
    assert any(r.event == "auth.denied" for r in sdk.audit_query(event_prefix="auth."))


def test_verify_token(sdk):
    claims = sdk.verify_token(token("acme-corp", roles=["admin"]))
    assert (claims.tenant_id, claims.subject, claims.roles) == ("acme-corp", "user@acme-corp", ["admin"])
    with pytest.raises(ProblemError) as caught:
        sdk.verify_token("not.a.token")
    assert caught.value.status == 401


@pytest.mark.parametrize("tenant_claim", ["acme\u202ecorp", "acme\u200bcorp", "x" * 129, 42, None])
def test_a_verified_token_with_a_bad_tenant_claim_is_not_accepted(sdk, tenant_claim):
    bad = token("acme-corp", tenant_id=tenant_claim)
    with pytest.raises(ProblemError) as caught:
        sdk.verify_token(bad)
    assert caught.value.status == 401
    decision = sdk.authorize(token=bad, require=["pro_features"])
    assert (decision.allowed, decision.problem.status) == (False, 401)


def test_application_audit_events(sdk):
    record = sdk.audit("app.export.csv", outcome="success", actor="user:42", tenant_id="acme-corp", metadata={"rows": 10})
    assert record is not None and record.seq > 0
    found = sdk.audit_query(tenant_id="acme-corp", event_prefix="app.export.")
    assert [r.metadata.get("rows") for r in found] == [10]
    with pytest.raises(ProblemError):
        sdk.audit("", outcome="x", actor="y")
    for event, actor in [("billing.invoice.paid", "user:42"), ("auth.denied", "user:42"), ("app.x", "stripe-webhook")]:
        with pytest.raises(ProblemError) as caught:
            sdk.audit(event, outcome="applied", actor=actor)
        assert (caught.value.status, caught.value.problem.reason) == (400, "INVALID_ARGUMENT")
    assert sdk.audit_verify().ok


def test_the_asyncio_variant_answers_like_the_sync_one(sdk):
    import asyncio

    from coresdk.aio import AsyncSDK

    async def scenario():
        client = AsyncSDK(sdk)
        body = stripe_event("invoice.paid", "cus_initech_001")
        result = await client.handle_stripe_webhook(body, sign(body))
        decision = await client.authorize(token=token("initech"), require=["pro_features"])
        return result.outcome, decision.allowed, await client.is_enabled("initech", "pro_features")

    assert asyncio.run(scenario()) == ("applied", True, True)


def test_a_replayed_event_takes_the_webhook_path_and_is_audited_as_replay(sdk):
    now = int(time.time())
    body = stripe_event("invoice.payment_failed", "cus_globex_001", created=now - 86_400, event_id="evt_replayed_1")
    result = sdk.replay_event(body, reason="outage INC-7")
    assert (result.outcome, result.tenant_id) == ("applied", "globex")
    assert sdk.is_enabled("globex", "paywall_active")
    records = sdk.audit_query(tenant_id="globex", event_prefix="billing.invoice.payment_failed")
    assert [(r.actor, r.metadata.get("reason")) for r in records] == [("replay", "outage INC-7")]
    assert sdk.replay_event(body, reason="again").outcome == "duplicate"
    assert deliver(sdk, body).outcome == "duplicate"
    older = stripe_event("invoice.paid", "cus_globex_001", created=now - 90_000)
    assert sdk.replay_event(older, reason="older").outcome == "stale"
    for payload, reason in [
        (stripe_event("invoice.paid", "cus_globex_001", created=now + 3_600), "from the future"),
        (json.dumps({"id": "evt_undated", "type": "invoice.paid"}).encode(), "undated"),
    ]:
        with pytest.raises(ProblemError) as caught:
            sdk.replay_event(payload, reason=reason)
        assert (caught.value.status, caught.value.problem.reason) == (400, "INVALID_EVENT")
    with pytest.raises(ProblemError) as caught:
        sdk.replay_event(stripe_event("invoice.paid", "cus_globex_001"), reason=" ")
    assert caught.value.status == 400


def test_explain_names_what_set_a_flag_and_the_later_stale_events(sdk):
    now = int(time.time())
    setter = deliver(sdk, stripe_event("invoice.paid", "cus_acme_001", created=now, event_id="evt_setter"))
    late = stripe_event("invoice.payment_failed", "cus_acme_001", created=now - 60, event_id="evt_late")
    assert sdk.replay_event(late, reason="INC-8").outcome == "stale"
    explained = sdk.explain_flag("acme-corp", "pro_features")
    assert explained.flag.value is True
    assert (explained.event.event_id, explained.event.audit_seq, explained.event.actor) == ("evt_setter", setter.audit_seq, "stripe-webhook")
    assert explained.admin is None
    assert [(e.event_id, e.actor, e.reason, e.created) for e in explained.stale_events] == [("evt_late", "replay", "INC-8", now - 60)]

    sdk.set_flag("acme-corp", "pro_features", False, actor="ops@acme", reason="ticket 9")
    explained = sdk.explain_flag("acme-corp", "pro_features")
    # CORESDK_ADMIN_TOKEN is the operator `admin`: the change is its, the claim is kept beside.
    assert (explained.admin.actor, explained.admin.reason, explained.event) == ("admin", "ticket 9", None)
    [record] = sdk.audit_query(tenant_id="acme-corp", event_prefix="flag.set")
    assert (record.actor, record.metadata["claimed_actor"]) == ("admin", "ops@acme")
    assert explained.stale_events == []
    default = sdk.explain_flag("acme-corp", "advanced_analytics")
    assert default.flag.is_default and default.event is None and default.admin is None
    with pytest.raises(FlagNotFound):
        sdk.explain_flag("acme-corp", "no_such_flag")


def test_explain_names_the_newest_event_that_confirmed_the_value(sdk):
    now = int(time.time())
    deliver(sdk, stripe_event("invoice.paid", "cus_acme_001", created=now - 100, event_id="evt_paid_first"))
    assert sdk.explain_flag("acme-corp", "pro_features").newest_event is None
    deliver(sdk, stripe_event("invoice.paid", "cus_acme_001", created=now, event_id="evt_paid_again"))
    between = stripe_event("invoice.payment_failed", "cus_acme_001", created=now - 50, event_id="evt_failed_between")
    assert sdk.handle_stripe_webhook(between, sign(between)).outcome == "stale"
    explained = sdk.explain_flag("acme-corp", "pro_features")
    assert explained.event.event_id == "evt_paid_first"
    assert (explained.newest_event.event_id, explained.newest_event.created) == ("evt_paid_again", now)
    assert [e.event_id for e in explained.stale_events] == ["evt_failed_between"]


def test_a_flag_key_with_a_trailing_newline_is_refused(sdk):
    # `^…$` lets "key\n" through (`$` matches before a final newline); the sidecar refuses it.
    with pytest.raises(ProblemError) as caught:
        sdk.get_flag("acme-corp", "pro_features\n")
    assert (caught.value.status, caught.value.problem.reason) == (400, "INVALID_ARGUMENT")


def test_settings_keep_tokens_out_of_their_repr():
    settings = Settings(admin_token="admin-secret-token", api_token="api-secret-token")
    assert "secret-token" not in repr(settings)
    assert settings.admin_token == "admin-secret-token"


def test_the_asyncio_variant_never_blocks_the_event_loop():
    import asyncio

    from coresdk.aio import AsyncSDK
    from coresdk.client import SidecarClient

    # Nothing listens there: every flag read waits for its timeout, in a thread.
    sdk = AsyncSDK(SidecarClient(Settings(sidecar_addr="127.0.0.1:9", timeout_ms=500, fail_mode="closed"), watch=False))

    async def scenario():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        beat = asyncio.create_task(ticker())
        for read in (sdk.is_enabled("acme-corp", "pro_features"), sdk.get_flags("acme-corp")):
            with pytest.raises(ProblemError):
                await read
        beat.cancel()
        return ticks

    try:
        assert asyncio.run(scenario()) > 20, "the event loop stood still while the sidecar was asked"
    finally:
        sdk.sync.close()


def test_the_asyncio_variant_asks_nothing_on_the_loop_when_the_stream_drops_meanwhile():
    """The stream may drop between a look at the cache and the answer: the loop's thread must
    then still do no I/O (a blocking call there would stop every other request)."""
    import asyncio
    import threading

    from coresdk.aio import AsyncSDK
    from coresdk.client import FlagCache, SidecarClient
    from coresdk.v1 import flags_pb2

    class DroppingCache(FlagCache):
        """Connected at the first look, dropped at every later one."""

        looks = 0

        @property
        def connected(self) -> bool:
            self.looks += 1
            return self.looks == 1

        @connected.setter
        def connected(self, value: bool) -> None:
            pass

    client = SidecarClient(Settings(sidecar_addr="127.0.0.1:9", timeout_ms=300, fail_mode="closed"), watch=False)
    asked_from: list[threading.Thread] = []

    class Flags:
        def GetFlag(self, request, **_):
            asked_from.append(threading.current_thread())
            return flags_pb2.Flag(tenant_id=request.tenant_id, key=request.key, value=flags_pb2.FlagValue(bool_value=True))

        def GetFlags(self, request, **_):
            asked_from.append(threading.current_thread())
            return flags_pb2.GetFlagsResponse()

    snapshot = flags_pb2.FlagSnapshot(flags=[flags_pb2.Flag(tenant_id="acme-corp", key="pro_features", value=flags_pb2.FlagValue(bool_value=True), version=1)])

    async def scenario():
        for read in (lambda sdk: sdk.is_enabled("acme-corp", "pro_features"), lambda sdk: sdk.get_flags("acme-corp")):
            client.cache = DroppingCache()
            client.cache.replace(snapshot)
            await read(AsyncSDK(client))
        return threading.current_thread()

    try:
        client._flags = Flags()
        loop_thread = asyncio.run(scenario())
        assert loop_thread not in asked_from
    finally:
        client.close()


@pytest.mark.parametrize("admin", [{"CORESDK_ADMIN_TOKEN": ""}, {"CORESDK_ADMIN_TOKEN": " \n"},
                                   {"CORESDK_ADMIN_TOKEN": "x" * 16, "CORESDK_ADMIN_TOKEN_FILE": "/etc/admin-token"}])
def test_the_mock_refuses_an_empty_or_doubled_admin_token_as_the_sidecar_does(admin):
    # The sidecar does not start (`is set but empty`, or the two settings conflict): an empty
    # value neither turns operators off nor falls through to the file.
    env = {k: v for k, v in ENV.items() if not k.startswith("CORESDK_ADMIN_TOKEN")}
    with pytest.raises(ValueError, match="CORESDK_ADMIN_TOKEN"):
        MockSidecar(Settings(use_mock=True), env={**env, **admin})
