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
    let change = AdminChange {
        actor: "ops@example.com",
        reason: "goodwill",
    };
    store
        .write(move |tx| {
            set_flag(
                tx,
                "acme",
                "pro_features",
                FlagValue::Bool(true),
                &change,
                NOW_MS,
            )
        })
        .await
        .expect("set");
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
