"""The real OpenFeature Python SDK and OFREP provider, unmodified from PyPI, pointed at the
sidecar's OFREP listener. The provider keeps no cache (each evaluation is one POST), so a change
is seen by the next evaluation."""

import time
from collections.abc import Callable
from pathlib import Path

import pytest
from openfeature import api
from openfeature.contrib.provider.ofrep import OFREPProvider
from openfeature.evaluation_context import EvaluationContext
from openfeature.exception import ErrorCode
from openfeature.flag_evaluation import FlagEvaluationDetails, Reason

from conftest import Sidecar, client_for, free_port, sign, stripe_event


@pytest.fixture
def ofrep(tmp_path: Path):
    # A fixed free port rather than :0, so a restarted sidecar is found where the provider looks.
    port = free_port()
    process = Sidecar(tmp_path, {"CORESDK_OFREP_LISTEN": f"127.0.0.1:{port}"})
    process.start()
    try:
        assert process.process is not None and process.process.stdout is not None
        line = process.process.stdout.readline()
        assert line == f"coresdk ofrep listening on 127.0.0.1:{port}\n", line
        api.set_provider_and_wait(OFREPProvider(f"http://127.0.0.1:{port}", timeout=5.0))
        try:
            yield process, api.get_client()
        finally:
            api.shutdown()
    finally:
        process.stop()


def tenant(tenant_id: str) -> EvaluationContext:
    return EvaluationContext(attributes={"tenant_id": tenant_id})


def eventually(evaluate: Callable[[], FlagEvaluationDetails], wanted: Callable[[FlagEvaluationDetails], bool]):
    """Evaluates until `wanted` holds; the deadline only guards against a hang."""
    deadline = time.monotonic() + 15
    while True:
        details = evaluate()
        if wanted(details) or time.monotonic() > deadline:
            return details
        time.sleep(0.05)


def pay(process: Sidecar) -> None:
    sidecar = client_for(process)
    try:
        body = stripe_event("invoice.paid", "cus_acme_001", id="in_1")
        sidecar.handle_stripe_webhook(body, sign(body))
    finally:
        sidecar.close()


def test_a_tenants_flag_follows_a_stripe_webhook_through_the_provider(ofrep):
    process, client = ofrep
    before = client.get_boolean_details("pro_features", True, tenant("acme-corp"))
    assert (before.value, before.reason, before.variant) == (False, Reason.DEFAULT, "default")

    pay(process)

    after = eventually(
        lambda: client.get_boolean_details("pro_features", False, tenant("acme-corp")),
        lambda details: details.value is True,
    )
    assert (after.value, after.reason, after.variant) == (True, Reason.TARGETING_MATCH, "tenant")
    # The targetingKey names the tenant when no tenant_id attribute is given.
    by_key = client.get_boolean_details("pro_features", False, EvaluationContext(targeting_key="acme-corp"))
    assert (by_key.value, by_key.reason) == (True, Reason.TARGETING_MATCH)
    # A targetingKey that cannot be a tenant id (a user's name) names none: the catalog default.
    user = client.get_boolean_details("pro_features", True, EvaluationContext(targeting_key="Jane Doe"))
    assert (user.value, user.reason, user.error_code) == (False, Reason.DEFAULT, None)
    other = client.get_boolean_details("pro_features", True, tenant("globex"))
    assert (other.value, other.reason) == (False, Reason.DEFAULT)


def test_missing_flags_type_mismatches_and_bad_contexts_reach_the_app_as_openfeature_errors(ofrep):
    _, client = ofrep
    missing = client.get_boolean_details("no_such_flag", True, tenant("acme-corp"))
    assert (missing.value, missing.error_code) == (True, ErrorCode.FLAG_NOT_FOUND)
    mismatch = client.get_string_details("pro_features", "fallback", tenant("acme-corp"))
    assert (mismatch.value, mismatch.error_code) == ("fallback", ErrorCode.TYPE_MISMATCH)
    invalid = client.get_boolean_details("pro_features", True, EvaluationContext(attributes={"tenant_id": "acme corp"}))
    assert (invalid.value, invalid.error_code) == (True, ErrorCode.INVALID_CONTEXT)


def test_the_provider_recovers_when_the_sidecar_restarts_under_it(ofrep):
    process, client = ofrep
    pay(process)
    assert client.get_boolean_value("pro_features", False, tenant("acme-corp")) is True

    process.stop()
    down = client.get_boolean_details("pro_features", False, tenant("acme-corp"))
    assert (down.value, down.error_code) == (False, ErrorCode.GENERAL)

    process.start()
    assert process.process is not None and process.process.stdout is not None
    assert process.process.stdout.readline().startswith("coresdk ofrep listening on ")
    # The tenant's value was stored: the restarted sidecar answers it again.
    back = eventually(
        lambda: client.get_boolean_details("pro_features", False, tenant("acme-corp")),
        lambda details: details.error_code is None,
    )
    assert (back.value, back.reason) == (True, Reason.TARGETING_MATCH)
