//! Ordering of webhook effects (issue 10, point 2) at the operation level: what a flag's
//! ordering mark is moved by, and what keeps it.

use std::sync::Arc;

use serde_json::json;

use super::*;
use crate::feeds::Feeds;
use crate::flags::FlagCache;
use crate::rules::Rules;
use crate::store::{Outcome, Store, StoreUrl};
use crate::stripe::{EventOrder, StripeEvent};

const NOW_MS: i64 = 1_700_000_000_000;

fn store() -> (Store, Arc<Rules>) {
    let rules = Arc::new(Rules::built_in().expect("built-in rules"));
    let cache = Arc::new(FlagCache::new(rules.catalog().clone()));
    let feeds = Arc::new(Feeds::new(cache.clone()));
    let store = Store::open(&StoreUrl::Memory, None, feeds, cache).expect("memory store");
    (store, rules)
}

fn event(id: &str, event_type: &str, created: i64, status: Option<&str>) -> StripeEvent {
    let object = json!({"metadata": {"tenant_id": "acme"}, "status": status,
        "items": {"data": [{"price": {"lookup_key": "pro_monthly"}}]}});
    let body =
        json!({"id": id, "type": event_type, "created": created, "data": {"object": object}});
    StripeEvent::parse(body.to_string().as_bytes(), created).expect("an event")
}

async fn deliver(store: &Store, rules: &Arc<Rules>, event: StripeEvent) -> WebhookResult {
    let rules = rules.clone();
    store
        .write(move |tx| {
            apply_webhook(
                tx,
                &rules,
                ParkingLimits::DEFAULT,
                &event,
                &Delivery::STRIPE,
                NOW_MS,
            )
        })
        .await
        .expect("the transaction commits")
        .expect("applied")
}

/// An admin's `SetFlag` of one of acme's boolean flags, as ops@example.com.
async fn admin_sets(store: &Store, key: &'static str, on: bool, reason: &'static str) {
    let change = AdminChange {
        actor: "ops@example.com",
        claimed_actor: None,
        reason,
    };
    store
        .write(move |tx| set_flag(tx, "acme", key, FlagValue::Bool(on), &change, NOW_MS))
        .await
        .expect("set");
}

async fn pro(store: &Store) -> FlagRecord {
    store
        .read(|tx| Ok(tx.flag("acme", "pro_features")?))
        .await
        .expect("read")
        .expect("the flag is set")
}

#[tokio::test]
async fn a_confirming_event_moves_the_mark_but_keeps_the_setter() {
    let (store, rules) = store();
    deliver(&store, &rules, event("evt_a", "invoice.paid", 100, None)).await;
    let confirmed = deliver(&store, &rules, event("evt_c", "invoice.paid", 300, None)).await;
    assert!(confirmed.flag_changes.is_empty());
    let flag = pro(&store).await;
    assert_eq!(
        flag.source_event_id, "evt_a",
        "explaining the flag names its setter"
    );
    assert_eq!(
        flag.order,
        event("evt_c", "invoice.paid", 300, None).order()
    );
    // Older than the confirmation, though newer than the setter: stale.
    let late = deliver(
        &store,
        &rules,
        event("evt_b", "invoice.payment_failed", 200, None),
    )
    .await;
    assert_eq!(late.outcome, Outcome::Stale);
    assert!(pro(&store).await.value == FlagValue::Bool(true));
}

#[tokio::test]
async fn an_admin_override_keeps_the_whole_order() {
    let (store, rules) = store();
    let past_due = event(
        "evt_m",
        "customer.subscription.updated",
        100,
        Some("past_due"),
    );
    let mark: EventOrder = past_due.order();
    deliver(&store, &rules, past_due).await;
    admin_sets(&store, "pro_features", true, "goodwill").await;
    assert_eq!(pro(&store).await.order, mark);
    // Same second, but the invoice ranks before the subscription update: still stale, even
    // though its id sorts after (the rank decides before the id).
    let invoice = deliver(
        &store,
        &rules,
        event("evt_z", "invoice.payment_failed", 100, None),
    )
    .await;
    assert_eq!(invoice.outcome, Outcome::Stale);
    assert!(pro(&store).await.value == FlagValue::Bool(true));
    // A later subscription event takes over again.
    deliver(
        &store,
        &rules,
        event(
            "evt_n",
            "customer.subscription.updated",
            101,
            Some("unpaid"),
        ),
    )
    .await;
    assert!(pro(&store).await.value == FlagValue::Bool(false));
}
fn summary(id: &str, created: i64, keys: &[&str]) -> StripeEvent {
    let data: Vec<_> = keys.iter().map(|k| json!({"lookup_key": k})).collect();
    let object = json!({"metadata": {"tenant_id": "acme"}, "entitlements": {"data": data}});
    let body = json!({"id": id, "type": "entitlements.active_entitlement_summary.updated",
        "created": created, "data": {"object": object}});
    StripeEvent::parse(body.to_string().as_bytes(), created).expect("an event")
}

async fn final_flags(events: Vec<StripeEvent>) -> Vec<(String, String)> {
    let (store, rules) = store();
    for e in events {
        deliver(&store, &rules, e).await;
    }
    let mut all = store
        .read(|tx| Ok(tx.load_flags()?))
        .await
        .expect("read")
        .into_iter()
        .filter(|f| f.tenant_id == "acme")
        .map(|f| (f.key, f.value.display()))
        .collect::<Vec<_>>();
    all.sort();
    all
}

#[tokio::test]
async fn a_summary_and_a_subscription_on_one_key_end_alike_in_any_order() {
    let s1 = || summary("evt_s1", 100, &["advanced_analytics"]);
    let r = || {
        event(
            "evt_r",
            "customer.subscription.updated",
            200,
            Some("active"),
        )
    };
    let s2 = || summary("evt_s2", 300, &[]);
    let a = final_flags(vec![s1(), r(), s2()]).await;
    let b = final_flags(vec![r(), s1(), s2()]).await;
    assert_eq!(a, b, "S1,R,S2 vs R,S1,S2");
}

#[tokio::test]
async fn a_key_that_left_the_summaries_ends_off_in_any_order() {
    let s1 = || summary("evt_s1", 100, &["sso"]);
    let s2 = || summary("evt_s2", 200, &[]);
    let a = final_flags(vec![s1(), s2()]).await;
    let b = final_flags(vec![s2(), s1()]).await;
    assert_eq!(a, b, "S1,S2 vs S2,S1");
}

fn sub_event(
    id: &str,
    event_type: &str,
    created: i64,
    sub: &str,
    status: &str,
    plan: &str,
) -> StripeEvent {
    let object = json!({"id": sub, "object": "subscription", "customer": "cus_1",
        "metadata": {"tenant_id": "acme"}, "status": status,
        "items": {"data": [{"price": {"lookup_key": plan}}]}});
    let body =
        json!({"id": id, "type": event_type, "created": created, "data": {"object": object}});
    StripeEvent::parse(body.to_string().as_bytes(), created).expect("an event")
}

#[tokio::test]
async fn switching_plans_by_cancel_and_create_in_one_second_keeps_the_new_plan() {
    // The app cancels the basic subscription and creates a pro one in the same API flow.
    let old = || {
        sub_event(
            "evt_b",
            "customer.subscription.deleted",
            500,
            "sub_old",
            "canceled",
            "basic_monthly",
        )
    };
    let new = || {
        sub_event(
            "evt_a",
            "customer.subscription.created",
            500,
            "sub_new",
            "active",
            "pro_monthly",
        )
    };
    let expected = vec![
        ("advanced_analytics".to_owned(), "on".to_owned()),
        ("paywall_active".to_owned(), "off".to_owned()),
        ("pro_features".to_owned(), "on".to_owned()),
    ];
    assert_eq!(final_flags(vec![old(), new()]).await, expected, "old, new");
    assert_eq!(final_flags(vec![new(), old()]).await, expected, "new, old");
}

#[tokio::test]
async fn an_older_event_of_the_same_subscription_is_stale_as_a_whole() {
    let (store, rules) = store();
    let newer = sub_event(
        "evt_2",
        "customer.subscription.updated",
        200,
        "sub_1",
        "past_due",
        "pro_monthly",
    );
    deliver(&store, &rules, newer).await;
    // Newer than every flag's own setter would not matter: the subscription has a newer event.
    let older = sub_event(
        "evt_1",
        "customer.subscription.updated",
        100,
        "sub_1",
        "active",
        "pro_monthly",
    );
    let result = deliver(&store, &rules, older).await;
    assert_eq!(result.outcome, Outcome::Stale);
    assert!(result.flag_changes.is_empty());
    assert!(pro(&store).await.value == FlagValue::Bool(false));
}

/// An older event of another subscription can change which subscription decides without
/// moving the newest order: the flags are rewritten at the same mark, in any delivery order.
#[tokio::test]
async fn an_older_event_of_another_subscription_can_still_decide() {
    let b_created = || {
        sub_event(
            "evt_b1",
            "customer.subscription.created",
            100,
            "sub_b",
            "active",
            "basic_monthly",
        )
    };
    let a_created = || {
        sub_event(
            "evt_a1",
            "customer.subscription.created",
            200,
            "sub_a",
            "active",
            "pro_monthly",
        )
    };
    let a_deleted = || {
        sub_event(
            "evt_a2",
            "customer.subscription.deleted",
            300,
            "sub_a",
            "canceled",
            "pro_monthly",
        )
    };
    let b_past_due = || {
        sub_event(
            "evt_b2",
            "customer.subscription.updated",
            250,
            "sub_b",
            "past_due",
            "basic_monthly",
        )
    };
    let expected = vec![
        ("advanced_analytics".to_owned(), "off".to_owned()),
        ("paywall_active".to_owned(), "on".to_owned()),
        ("pro_features".to_owned(), "off".to_owned()),
    ];
    let chronological =
        final_flags(vec![b_created(), a_created(), b_past_due(), a_deleted()]).await;
    assert_eq!(chronological, expected);
    let late = final_flags(vec![b_created(), a_created(), a_deleted(), b_past_due()]).await;
    assert_eq!(
        late, expected,
        "sub_b's older update arrives after sub_a's deletion"
    );
}

/// Every key any summary named is remembered, however many: a later summary without one turns
/// it off (a cap would leave the keys past it to the order of arrival).
#[tokio::test]
async fn every_entitlement_key_ever_named_is_remembered() {
    let (store, rules) = store();
    let many: Vec<String> = (0..1_000).map(|n| format!("feature_{n}")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    deliver(&store, &rules, summary("evt_s1", 100, &many)).await;
    deliver(&store, &rules, summary("evt_s2", 200, &["extra"])).await;
    let value = |key: &'static str| {
        let store = store.clone();
        async move {
            store
                .read(move |tx| Ok(tx.flag("acme", key)?))
                .await
                .expect("read")
                .map(|f| f.value)
        }
    };
    assert_eq!(value("extra").await, Some(FlagValue::Bool(true)));
    assert_eq!(value("feature_0").await, Some(FlagValue::Bool(false)));
    deliver(&store, &rules, summary("evt_s3", 300, &[])).await;
    assert_eq!(value("extra").await, Some(FlagValue::Bool(false)));
    assert_eq!(value("feature_999").await, Some(FlagValue::Bool(false)));
}

#[tokio::test]
async fn a_stale_subscription_event_leaves_an_admin_override_alone() {
    let (store, rules) = store();
    let newer = sub_event(
        "evt_2",
        "customer.subscription.updated",
        200,
        "sub_1",
        "past_due",
        "pro_monthly",
    );
    deliver(&store, &rules, newer).await;
    admin_sets(&store, "pro_features", true, "goodwill").await;
    let older = sub_event(
        "evt_1",
        "customer.subscription.updated",
        100,
        "sub_1",
        "canceled",
        "pro_monthly",
    );
    assert_eq!(deliver(&store, &rules, older).await.outcome, Outcome::Stale);
    assert!(pro(&store).await.value == FlagValue::Bool(true));
}

/// An older event of ANOTHER subscription (a replay, a parked event) re-derives the tenant's
/// subscription flags at an unchanged mark; it must not undo an admin override made since.
#[tokio::test]
async fn an_older_event_of_another_subscription_leaves_an_admin_override_alone() {
    let (store, rules) = store();
    let active_pro = sub_event(
        "evt_a",
        "customer.subscription.created",
        100,
        "sub_a",
        "active",
        "pro_monthly",
    );
    deliver(&store, &rules, active_pro).await;
    admin_sets(
        &store,
        "advanced_analytics",
        false,
        "analytics off during the audit",
    )
    .await;
    let older_other = sub_event(
        "evt_b",
        "customer.subscription.updated",
        50,
        "sub_b",
        "canceled",
        "basic_monthly",
    );
    deliver(&store, &rules, older_other).await;
    let analytics = store
        .read(|tx| Ok(tx.flag("acme", "advanced_analytics")?))
        .await
        .expect("read")
        .expect("set");
    assert_eq!(analytics.value, FlagValue::Bool(false), "{analytics:?}");
}
