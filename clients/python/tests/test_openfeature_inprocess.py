"""The real OpenFeature Python SDK and flagd provider in in-process mode (flagd.sync.v1: the
provider evaluates the sidecar's flag configuration itself, with JSONLogic), unmodified from
PyPI, pointed at the sidecar's flagd sync listener."""

import time
from pathlib import Path
from typing import Callable

import pytest
from openfeature import api
from openfeature.client import OpenFeatureClient
from openfeature.contrib.provider.flagd import FlagdProvider
from openfeature.contrib.provider.flagd.config import ResolverType
from openfeature.evaluation_context import EvaluationContext
from openfeature.exception import ErrorCode, ProviderFatalError
from openfeature.flag_evaluation import FlagEvaluationDetails, Reason

from conftest import Sidecar, client_for, free_port, sign, stripe_event

# Only a hang guard: a change normally reaches the provider in well under a second.
HANG_GUARD_S = 20


def in_process(port: int, **options) -> FlagdProvider:
    return FlagdProvider(
        host="127.0.0.1",
        port=port,
        resolver_type=ResolverType.IN_PROCESS,
        deadline_ms=5000,
        # Reconnect quickly after the sidecar restarts.
        retry_backoff_ms=100,
        retry_backoff_max_ms=500,
        **options,
    )


class Synced:
    """A sidecar with its flagd sync and flagd evaluation listeners on fixed ports (so a
    restart keeps them), an in-process provider on the first and an RPC provider on the
    second, each behind its own OpenFeature client."""

    def __init__(self, tmp: Path):
        self.sync_port = free_port()
        self.flagd_port = free_port()
        self.process = Sidecar(
            tmp,
            {
                "CORESDK_FLAGD_SYNC_LISTEN": f"127.0.0.1:{self.sync_port}",
                "CORESDK_FLAGD_LISTEN": f"127.0.0.1:{self.flagd_port}",
            },
        )
        self.process.start()
        api.set_provider_and_wait(in_process(self.sync_port), "in-process")
        api.set_provider_and_wait(
            FlagdProvider(host="127.0.0.1", port=self.flagd_port, resolver_type=ResolverType.RPC, deadline_ms=5000),
            "rpc",
        )
        self.client: OpenFeatureClient = api.get_client("in-process")
        self.rpc: OpenFeatureClient = api.get_client("rpc")

    def webhook(self, event_type: str, customer: str, **fields) -> None:
        sidecar = client_for(self.process)
        try:
            body = stripe_event(event_type, customer, **fields)
            sidecar.handle_stripe_webhook(body, sign(body))
        finally:
            sidecar.close()


@pytest.fixture
def synced(tmp_path: Path):
    try:
        setup = Synced(tmp_path)
    except BaseException:
        api.shutdown()
        raise
    try:
        yield setup
    finally:
        api.shutdown()
        setup.process.stop()


def tenant(tenant_id: str) -> EvaluationContext:
    return EvaluationContext(attributes={"tenant_id": tenant_id})


def eventually(evaluate: Callable[[], FlagEvaluationDetails], wanted: tuple) -> FlagEvaluationDetails:
    """Evaluates until (value, reason) is `wanted`; fails only when the hang guard runs out."""
    deadline = time.monotonic() + HANG_GUARD_S
    while True:
        details = evaluate()
        if (details.value, details.reason) == wanted:
            return details
        assert time.monotonic() < deadline, f"still {(details.value, details.reason)}, wanted {wanted}"
        time.sleep(0.05)


def test_a_tenants_flag_follows_a_stripe_webhook_in_process(synced):
    client = synced.client
    before = client.get_boolean_details("pro_features", True, tenant("acme-corp"))
    assert (before.value, before.reason) == (False, Reason.DEFAULT)

    synced.webhook("invoice.paid", "cus_acme_001", id="in_1")

    eventually(lambda: client.get_boolean_details("pro_features", False, tenant("acme-corp")), (True, Reason.TARGETING_MATCH))
    # The targetingKey names the tenant when no tenant_id attribute is given.
    by_key = client.get_boolean_details("pro_features", False, EvaluationContext(targeting_key="acme-corp"))
    assert (by_key.value, by_key.reason) == (True, Reason.TARGETING_MATCH)
    # The tenant attribute wins over the targetingKey.
    both = client.get_boolean_details("pro_features", True, EvaluationContext(targeting_key="acme-corp", attributes={"tenant_id": "globex"}))
    assert (both.value, both.reason) == (False, Reason.DEFAULT)
    # Another tenant keeps the catalog default.
    other = client.get_boolean_details("pro_features", True, tenant("globex"))
    assert (other.value, other.reason) == (False, Reason.DEFAULT)


def test_in_process_evaluation_agrees_with_the_evaluation_service(synced):
    synced.webhook("invoice.paid", "cus_acme_001", id="in_agree")
    # Wait for both to see the change, then compare them case by case.
    eventually(lambda: synced.client.get_boolean_details("pro_features", False, tenant("acme-corp")), (True, Reason.TARGETING_MATCH))
    eventually(lambda: synced.rpc.get_boolean_details("pro_features", False, tenant("acme-corp")), (True, Reason.TARGETING_MATCH))
    contexts = {
        "a tenant with its own value": tenant("acme-corp"),
        "the same tenant by targetingKey": EvaluationContext(targeting_key="acme-corp"),
        "a tenant without one": tenant("globex"),
        "no tenant": EvaluationContext(),
        "no context": None,
    }
    for flag in ("pro_features", "paywall_active", "advanced_analytics"):
        for case, context in contexts.items():
            local = synced.client.get_boolean_details(flag, True, context)
            remote = synced.rpc.get_boolean_details(flag, True, context)
            assert (local.value, local.reason, local.error_code) == (remote.value, remote.reason, remote.error_code), f"{flag}, {case}"


def test_missing_flags_and_type_mismatches_are_openfeature_errors_in_process(synced):
    client = synced.client
    missing = client.get_boolean_details("no_such_flag", True, tenant("acme-corp"))
    assert (missing.value, missing.error_code) == (True, ErrorCode.FLAG_NOT_FOUND)
    mismatch = client.get_string_details("pro_features", "fallback", tenant("acme-corp"))
    assert (mismatch.value, mismatch.error_code) == ("fallback", ErrorCode.TYPE_MISMATCH)


def test_a_tenant_selector_gives_that_tenants_flags_without_context(synced):
    synced.webhook("invoice.paid", "cus_acme_001", id="in_selector")
    api.set_provider_and_wait(in_process(synced.sync_port, selector="tenant=acme-corp"), "acme")
    acme = api.get_client("acme")
    # Static flags: no context needed, the selector chose the tenant.
    eventually(lambda: acme.get_boolean_details("pro_features", False), (True, Reason.STATIC))
    paywall = acme.get_boolean_details("paywall_active", True)
    assert (paywall.value, paywall.reason) == (False, Reason.STATIC)


def test_a_selector_the_sidecar_does_not_serve_is_refused_as_an_invalid_argument(synced):
    # Providers retry sync errors unless told a code is fatal; then the refusal is immediate.
    bad = in_process(synced.sync_port, selector="source=database", fatal_status_codes=["INVALID_ARGUMENT"])
    with pytest.raises(ProviderFatalError):
        api.set_provider_and_wait(bad, "bad-selector")


def test_the_provider_follows_the_sidecar_through_a_restart(synced):
    client = synced.client
    synced.webhook("invoice.paid", "cus_acme_001", id="in_before_restart")
    eventually(lambda: client.get_boolean_details("pro_features", False, tenant("acme-corp")), (True, Reason.TARGETING_MATCH))

    synced.process.stop()
    # While the sidecar is away the provider keeps evaluating its last configuration.
    kept = client.get_boolean_details("pro_features", False, tenant("acme-corp"))
    assert (kept.value, kept.reason) == (True, Reason.TARGETING_MATCH)

    # Same ports, same store.
    synced.process.start()
    synced.webhook("invoice.payment_failed", "cus_acme_001", id="in_after_restart")
    eventually(lambda: client.get_boolean_details("paywall_active", False, tenant("acme-corp")), (True, Reason.TARGETING_MATCH))
    eventually(lambda: client.get_boolean_details("pro_features", True, tenant("acme-corp")), (False, Reason.TARGETING_MATCH))
