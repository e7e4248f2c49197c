"""The billing lifecycle (issue 10) alike in the mock and the real sidecar: flags follow the
subscription's status and plan, same-second events converge in any order, an older entitlement
summary is stale, and the audit names the rule that set each flag."""
from __future__ import annotations

import itertools
import json
import time

from conftest import sign


def body(event_id: str, event_type: str, created: int, obj: dict, previous: dict | None = None) -> bytes:
    data: dict = {"object": obj}
    if previous is not None:
        data["previous_attributes"] = previous
    return json.dumps({"id": event_id, "object": "event", "type": event_type, "created": created, "data": data}).encode()


def subscription(tenant: str, status: str, plan: str) -> dict:
    return {"object": "subscription", "metadata": {"tenant_id": tenant}, "status": status, "items": {"data": [{"price": {"lookup_key": plan}}]}}


def state(sdk, tenant: str) -> tuple[bool, bool, bool]:
    return tuple(sdk.is_enabled(tenant, key) for key in ("pro_features", "paywall_active", "advanced_analytics"))


def test_cancel_after_a_failed_payment_converges_in_every_order_and_locks_without_the_paywall(sdk):
    t = int(time.time()) - 100
    second = [
        ("evt_1", "invoice.payment_failed", None, None),
        ("evt_2", "customer.subscription.updated", "past_due", "active"),
        ("evt_3", "customer.subscription.updated", "canceled", "past_due"),
        ("evt_4", "customer.subscription.deleted", "canceled", None),
    ]
    for n, order in enumerate(itertools.permutations(second)):
        tenant = f"cancel-{n}"
        sdk.handle_stripe_webhook(*signed(body(f"evt_0_{tenant}", "customer.subscription.created", t - 10, subscription(tenant, "active", "pro_monthly"))))
        for event_id, event_type, status, was in order:
            obj = subscription(tenant, status, "pro_monthly") if status else {"object": "invoice", "metadata": {"tenant_id": tenant}}
            sdk.handle_stripe_webhook(*signed(body(f"{event_id}_{tenant}", event_type, t, obj, {"status": was} if was else None)))
        assert state(sdk, tenant) == (False, False, False), order
    denied = sdk.authorize(tenant_id="cancel-0", require=["pro_features"], deny_if=["paywall_active"])
    assert (denied.allowed, denied.problem.status) == (False, 403)


def test_a_downgrade_turns_advanced_analytics_off_and_names_the_rule(sdk):
    t = int(time.time()) - 100
    sdk.handle_stripe_webhook(*signed(body("evt_up", "customer.subscription.created", t, subscription("down", "active", "enterprise_annual"))))
    assert state(sdk, "down") == (True, False, True)
    result = sdk.handle_stripe_webhook(*signed(body("evt_down", "customer.subscription.updated", t + 1, subscription("down", "active", "basic_monthly"))))
    assert state(sdk, "down") == (True, False, False)
    record = next(r for r in sdk.audit_query(tenant_id="down") if r.seq == result.audit_seq)
    assert record.metadata["rules"] == {"advanced_analytics": "paid plan"}


def test_an_older_entitlement_summary_is_stale(sdk):
    t = int(time.time()) - 100

    def summary(event_id: str, created: int, keys: list[str]):
        obj = {"object": "entitlements.active_entitlement_summary", "metadata": {"tenant_id": "ent"}, "entitlements": {"data": [{"lookup_key": k} for k in keys]}}
        return sdk.handle_stripe_webhook(*signed(body(event_id, "entitlements.active_entitlement_summary.updated", created, obj)))

    assert summary("evt_s2", t + 2, ["sso"]).outcome == "applied"
    older = summary("evt_s1", t + 1, ["audit_export"])
    assert (older.outcome, older.stale_flags) == ("stale", ["audit_export"])
    # The newest summary does not name audit_export: off, explicitly, as in the other order.
    assert [(c.key, c.new_value) for c in older.flag_changes] == [("audit_export", False)]
    assert sdk.is_enabled("ent", "sso") and not sdk.is_enabled("ent", "audit_export")
    assert not sdk.get_flag("ent", "audit_export").is_default


def test_a_key_the_newest_summary_dropped_ends_off_whatever_the_order(sdk):
    t = int(time.time()) - 100
    for n, order in enumerate(itertools.permutations(range(3))):
        tenant = f"dropped-{n}"
        summary = lambda keys: {"object": "entitlements.active_entitlement_summary", "metadata": {"tenant_id": tenant},
                                "entitlements": {"data": [{"lookup_key": k} for k in keys]}}
        kind = "entitlements.active_entitlement_summary.updated"
        events = [
            body(f"evt_s1_{tenant}", kind, t, summary(["advanced_analytics"])),
            body(f"evt_r_{tenant}", "customer.subscription.updated", t + 1, subscription(tenant, "active", "pro_monthly")),
            body(f"evt_s2_{tenant}", kind, t + 2, summary([])),
        ]
        for i in order:
            sdk.handle_stripe_webhook(*signed(events[i]))
        assert state(sdk, tenant) == (True, False, False), order


def test_a_plan_switch_by_cancel_and_create_in_one_second_follows_the_new_subscription(sdk):
    t = int(time.time()) - 100
    for old_first in (True, False):
        tenant = f"switch-{old_first}"

        def sub(sub_id: str, status: str, plan: str) -> dict:
            return {**subscription(tenant, status, plan), "id": sub_id}

        sdk.handle_stripe_webhook(*signed(body(f"evt_0_{tenant}", "customer.subscription.created", t - 50, sub("sub_old", "active", "basic_monthly"))))
        cancel = body(f"evt_b_{tenant}", "customer.subscription.deleted", t, sub("sub_old", "canceled", "basic_monthly"))
        create = body(f"evt_a_{tenant}", "customer.subscription.created", t, sub("sub_new", "active", "pro_monthly"))
        for payload in (cancel, create) if old_first else (create, cancel):
            sdk.handle_stripe_webhook(*signed(payload))
        assert state(sdk, tenant) == (True, False, True), old_first


def signed(payload: bytes) -> tuple[bytes, str]:
    return payload, sign(payload)
