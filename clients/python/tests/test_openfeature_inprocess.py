"""The real OpenFeature Python SDK and flagd provider in in-process mode (flagd.sync.v1: the
provider evaluates the sidecar's flag configuration itself, with JSONLogic), unmodified from
PyPI, pointed at the sidecar's flagd sync listener."""

import pytest
from openfeature import api
from openfeature.client import OpenFeatureClient
from openfeature.contrib.provider.flagd import FlagdProvider
from openfeature.contrib.provider.flagd.config import ResolverType
from openfeature.evaluation_context import EvaluationContext
from openfeature.exception import ErrorCode, ProviderFatalError
from openfeature.flag_evaluation import Reason

from conftest import Sidecar, eventually, pay, tenant, webhook


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


def resolves(value, reason):
    return lambda details: (details.value, details.reason) == (value, reason)


class Synced:
    """A sidecar with its flagd sync and flagd evaluation listeners on fixed ports (so a
    restart keeps them), an in-process provider on the first and an RPC provider on the
    second, each behind its own OpenFeature client."""

    def __init__(self, process: Sidecar, sync_addr: str, flagd_addr: str):
        self.process = process
        self.sync_port = int(sync_addr.rsplit(":", 1)[1])
        flagd_port = int(flagd_addr.rsplit(":", 1)[1])
        api.set_provider_and_wait(in_process(self.sync_port), "in-process")
        api.set_provider_and_wait(
            FlagdProvider(host="127.0.0.1", port=flagd_port, resolver_type=ResolverType.RPC, deadline_ms=5000),
            "rpc",
        )
        self.client: OpenFeatureClient = api.get_client("in-process")
        self.rpc: OpenFeatureClient = api.get_client("rpc")


@pytest.fixture
def synced(openfeature_sidecar):
    process, (sync_addr, flagd_addr) = openfeature_sidecar(
        "CORESDK_FLAGD_SYNC_LISTEN", "CORESDK_FLAGD_LISTEN", restartable=True
    )
    try:
        yield Synced(process, sync_addr, flagd_addr)
    finally:
        api.shutdown()


def test_a_tenants_flag_follows_a_stripe_webhook_in_process(synced):
    client = synced.client
    before = client.get_boolean_details("pro_features", True, tenant("acme-corp"))
    assert (before.value, before.reason) == (False, Reason.DEFAULT)

    pay(synced.process, "in_1")

    eventually(lambda: client.get_boolean_details("pro_features", False, tenant("acme-corp")), resolves(True, Reason.TARGETING_MATCH))
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
    pay(synced.process, "in_agree")
    # Wait for both to see the change, then compare them case by case.
    eventually(lambda: synced.client.get_boolean_details("pro_features", False, tenant("acme-corp")), resolves(True, Reason.TARGETING_MATCH))
    eventually(lambda: synced.rpc.get_boolean_details("pro_features", False, tenant("acme-corp")), resolves(True, Reason.TARGETING_MATCH))
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
    pay(synced.process, "in_selector")
    api.set_provider_and_wait(in_process(synced.sync_port, selector="tenant=acme-corp"), "acme")
    acme = api.get_client("acme")
    # Static flags: no context needed, the selector chose the tenant.
    eventually(lambda: acme.get_boolean_details("pro_features", False), resolves(True, Reason.STATIC))
    paywall = acme.get_boolean_details("paywall_active", True)
    assert (paywall.value, paywall.reason) == (False, Reason.STATIC)


def test_a_selector_the_sidecar_does_not_serve_is_refused_as_an_invalid_argument(synced):
    # Providers retry sync errors unless told a code is fatal; then the refusal is immediate.
    bad = in_process(synced.sync_port, selector="source=database", fatal_status_codes=["INVALID_ARGUMENT"])
    with pytest.raises(ProviderFatalError):
        api.set_provider_and_wait(bad, "bad-selector")


def test_the_provider_follows_the_sidecar_through_a_restart(synced):
    client = synced.client
    pay(synced.process, "in_before_restart")
    eventually(lambda: client.get_boolean_details("pro_features", False, tenant("acme-corp")), resolves(True, Reason.TARGETING_MATCH))

    synced.process.stop()
    # While the sidecar is away the provider keeps evaluating its last configuration.
    kept = client.get_boolean_details("pro_features", False, tenant("acme-corp"))
    assert (kept.value, kept.reason) == (True, Reason.TARGETING_MATCH)

    # Same ports, same store.
    synced.process.start()
    webhook(synced.process, "invoice.payment_failed", "cus_acme_001", id="in_after_restart")
    eventually(lambda: client.get_boolean_details("paywall_active", False, tenant("acme-corp")), resolves(True, Reason.TARGETING_MATCH))
    eventually(lambda: client.get_boolean_details("pro_features", True, tenant("acme-corp")), resolves(False, Reason.TARGETING_MATCH))
