"""The mock's memory is bounded as the Node mock's: the newest audit records and processed
event ids are kept, and flags, customer mappings and billing objects past their bound are
refused with 507 MOCK_CAPACITY (bounds made small here; the mock's are 100,000 each)."""
from __future__ import annotations

import pytest

import coresdk.mock as mock_module
from conftest import ENV, sign, stripe_event
from coresdk import ProblemError, Settings
from coresdk.mock import MockSidecar


@pytest.fixture
def mock() -> MockSidecar:
    return MockSidecar(Settings(use_mock=True), env=ENV)


def capacity(caught: pytest.ExceptionInfo) -> tuple[int, str]:
    return caught.value.status, caught.value.problem.reason


def test_the_oldest_audit_records_are_dropped_and_the_rest_still_verifies(mock: MockSidecar, monkeypatch) -> None:
    monkeypatch.setattr(mock_module, "MAX_AUDIT_RECORDS", 10)
    before = mock.audit_query()[-1].seq if mock.audit_query() else 0
    for n in range(30):
        mock.audit(f"app.e{n}", outcome="ok", actor="app")
    kept = mock.audit_query(limit=100)
    assert 10 <= len(kept) <= 11
    assert [r.seq for r in kept] == list(range(before + 31 - len(kept), before + 31))
    verdict = mock.audit_verify()
    assert verdict.ok and verdict.records_checked == len(kept)


def test_the_oldest_processed_event_ids_are_forgotten(mock: MockSidecar, monkeypatch) -> None:
    monkeypatch.setattr(mock_module, "MAX_PROCESSED_EVENTS", 3)
    bodies = [stripe_event("charge.refunded", "cus_acme_001", event_id=f"evt_bound_{n}") for n in range(5)]
    for body in bodies:
        assert mock.handle_stripe_webhook(body, sign(body)).outcome == "ignored"
    # The newest are still known; the oldest is a new delivery again.
    assert mock.handle_stripe_webhook(bodies[-1], sign(bodies[-1])).outcome == "duplicate"
    assert mock.handle_stripe_webhook(bodies[0], sign(bodies[0])).outcome == "ignored"


def test_flags_past_the_bound_are_refused(mock: MockSidecar, monkeypatch) -> None:
    mock.set_flag("acme-corp", "pro_features", True, actor="ops")
    monkeypatch.setattr(mock_module, "MAX_FLAGS", 2)
    mock.set_flag("acme-corp", "sso", True, actor="ops")
    with pytest.raises(ProblemError) as caught:
        mock.set_flag("acme-corp", "exports", True, actor="ops")
    assert capacity(caught) == (507, "MOCK_CAPACITY")
    assert mock.set_flag("acme-corp", "sso", False, actor="ops").value is False, "an existing flag still changes"
    paid = stripe_event("invoice.paid", "cus_globex_001")
    with pytest.raises(ProblemError) as caught:
        mock.handle_stripe_webhook(paid, sign(paid))
    assert capacity(caught) == (507, "MOCK_CAPACITY")
    assert mock.get_flags("globex")["pro_features"].is_default, "nothing of the refused event was written"


def test_customer_mappings_and_billing_objects_past_the_bound_are_refused(mock: MockSidecar, monkeypatch) -> None:
    monkeypatch.setattr(mock_module, "MAX_CUSTOMERS", len(mock_module.MOCK_TENANTS))
    with pytest.raises(ProblemError) as caught:
        mock.map_customer("cus_new_001", "newco", actor="ops")
    assert capacity(caught) == (507, "MOCK_CAPACITY")
    assert mock.map_customer("cus_acme_001", "acme-corp", actor="ops") == 0, "a mapping that exists is no new one"
    monkeypatch.setattr(mock_module, "MAX_BILLING_OBJECTS", 0)
    created = stripe_event("customer.subscription.created", "cus_acme_001", id="sub_1", status="active")
    with pytest.raises(ProblemError) as caught:
        mock.handle_stripe_webhook(created, sign(created))
    assert capacity(caught) == (507, "MOCK_CAPACITY")
