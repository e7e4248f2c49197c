//! Parking on PostgreSQL: an event of a customer with no tenant parked by one replica is
//! applied when another maps the customer, and every replica's flags follow. Needs
//! CORESDK_TEST_POSTGRES_URL (./scripts/test starts a throwaway server and sets it).
mod common;

use std::time::{Duration, Instant};

use common::audit::map;
use common::parking::*;
use common::pg::*;
use common::*;
use coresdk::proto::WebhookOutcome;
use serde_json::json;

/// A hang guard for the change feed between replicas, not a speed assertion.
const HANG_GUARD: Duration = Duration::from_secs(20);

#[tokio::test]
async fn an_event_parked_on_one_replica_is_applied_when_another_maps_the_customer() {
    let url = fresh_database(server_url()).await;
    let nodes = replicas(&url, 2).await;
    let t = now();
    let paid = invoice("evt_pg_paid", "invoice.paid", t - 10, "cus_pg");
    let failed = invoice("evt_pg_failed", "invoice.payment_failed", t - 30, "cus_pg");
    refused(&nodes[0], paid.clone()).await;
    refused(&nodes[1], failed.clone()).await;
    // Stripe's retry reaching the other replica finds the event parked already.
    refused(&nodes[1], paid.clone()).await;
    let parked: Vec<_> = records_of(&nodes[0], "evt_pg_paid")
        .await
        .into_iter()
        .map(|r| r.metadata["parked_at_ms"].clone())
        .collect();
    assert_eq!(parked.len(), 2);
    assert_eq!(parked[0], parked[1]);

    map(&nodes[1], "cus_pg", "pgco").await;
    assert!(is_on(&nodes[1], "pgco", "pro_features").await);
    assert!(!is_on(&nodes[1], "pgco", "paywall_active").await);
    let applied: Vec<(String, String)> = records(&nodes[1])
        .await
        .into_iter()
        .filter(|r| r.tenant == "pgco" && r.event.starts_with("billing."))
        .map(|r| (r.event_id().to_owned(), r.outcome))
        .collect();
    assert_eq!(
        applied,
        [
            ("evt_pg_failed".to_owned(), "applied".to_owned()),
            ("evt_pg_paid".to_owned(), "applied".to_owned()),
        ]
    );

    let deadline = Instant::now() + HANG_GUARD;
    while !is_on(&nodes[0], "pgco", "pro_features").await {
        assert!(
            Instant::now() < deadline,
            "the other replica never saw the flag"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(outcome(&nodes[0], paid).await, WebhookOutcome::Duplicate);
    assert_eq!(outcome(&nodes[1], failed).await, WebhookOutcome::Duplicate);
    assert!(
        !records_of(&nodes[0], "evt_pg_paid")
            .await
            .iter()
            .any(|r| r.metadata.get("parked") == Some(&json!(false)))
    );
}

#[tokio::test]
async fn parked_events_are_applied_in_event_order_whatever_the_database_collation() {
    let url = fresh_locale_sorted_database(server_url()).await;
    let nodes = replicas(&url, 2).await;
    parked_events_apply_in_event_order(&nodes[0], &nodes[1]).await;
}
