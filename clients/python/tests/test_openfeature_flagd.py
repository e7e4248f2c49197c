"""The real OpenFeature Python SDK and flagd provider (RPC mode, flagd.evaluation.v2), unmodified
from PyPI, pointed at the sidecar's flagd listener."""

import threading

import pytest
from openfeature import api
from openfeature.contrib.provider.flagd import FlagdProvider
from openfeature.contrib.provider.flagd.config import ResolverType
from openfeature.evaluation_context import EvaluationContext
from openfeature.event import ProviderEvent
from openfeature.exception import ErrorCode
from openfeature.flag_evaluation import Reason

from conftest import eventually, pay, tenant, webhook


@pytest.fixture
def flagd(openfeature_sidecar):
    process, (addr,) = openfeature_sidecar("CORESDK_FLAGD_LISTEN")
    host, port = addr.rsplit(":", 1)
    api.set_provider_and_wait(FlagdProvider(host=host, port=int(port), resolver_type=ResolverType.RPC, deadline_ms=5000))
    try:
        yield process, api.get_client()
    finally:
        api.shutdown()


def test_a_tenants_flag_follows_a_stripe_webhook_through_the_provider(flagd):
    process, client = flagd
    changed = threading.Event()
    client.add_handler(ProviderEvent.PROVIDER_CONFIGURATION_CHANGED, lambda details: changed.set())

    before = client.get_boolean_details("pro_features", True, tenant("acme-corp"))
    assert (before.value, before.reason) == (False, Reason.DEFAULT)

    pay(process)
    assert changed.wait(5), "the provider saw no configuration_change"

    after = client.get_boolean_details("pro_features", False, tenant("acme-corp"))
    assert (after.value, after.reason) == (True, Reason.TARGETING_MATCH)
    # The targetingKey names the tenant when no tenant_id attribute is given.
    by_key = client.get_boolean_details("pro_features", False, EvaluationContext(targeting_key="acme-corp"))
    assert (by_key.value, by_key.reason) == (True, Reason.TARGETING_MATCH)
    # Another tenant keeps the catalog default.
    other = client.get_boolean_details("pro_features", True, tenant("globex"))
    assert (other.value, other.reason) == (False, Reason.DEFAULT)


def test_missing_flags_and_type_mismatches_reach_the_app_as_openfeature_errors(flagd):
    _, client = flagd
    missing = client.get_boolean_details("no_such_flag", True, tenant("acme-corp"))
    assert (missing.value, missing.error_code) == (True, ErrorCode.FLAG_NOT_FOUND)
    mismatch = client.get_string_details("pro_features", "fallback", tenant("acme-corp"))
    assert (mismatch.value, mismatch.error_code) == ("fallback", ErrorCode.TYPE_MISMATCH)


def test_the_provider_follows_the_sidecar_through_a_restart(openfeature_sidecar):
    process, (addr,) = openfeature_sidecar("CORESDK_FLAGD_LISTEN", restartable=True)
    host, port = addr.rsplit(":", 1)
    api.set_provider_and_wait(FlagdProvider(host=host, port=int(port), resolver_type=ResolverType.RPC, deadline_ms=5000))
    try:
        client = api.get_client()
        pay(process)
        # Cached by the provider until a configuration_change says otherwise.
        eventually(lambda: client.get_boolean_details("pro_features", False, tenant("acme-corp")), lambda d: d.value is True)

        process.stop()
        # Same ports, same store: the tenant's value was stored, and the provider reconnects
        # its event stream (the sidecar ended it with UNAVAILABLE), so a change made after
        # the restart reaches it too.
        process.start()
        back = eventually(
            lambda: client.get_boolean_details("pro_features", False, tenant("acme-corp")),
            lambda d: d.error_code is None,
        )
        assert (back.value, back.reason) == (True, Reason.TARGETING_MATCH)
        webhook(process, "invoice.payment_failed", "cus_acme_001", id="in_after_restart")
        # pro_features was read (and cached) before: only a configuration_change on the
        # reconnected stream makes the provider ask again.
        failed = eventually(
            lambda: client.get_boolean_details("pro_features", True, tenant("acme-corp")),
            lambda d: d.value is False,
        )
        assert failed.reason == Reason.TARGETING_MATCH
    finally:
        api.shutdown()
