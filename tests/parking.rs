//! Events of customers not mapped yet are parked (bounded, audited) and applied, in event
//! order, in the transaction that gives the customer a tenant: MapCustomer, the tenants file
//! at start, or a checkout with `client_reference_id`. Stripe's later retries are duplicates.
mod common;

use common::audit::{map, verify};
use common::mapping::unmap;
use common::parking::*;
use common::*;
use coresdk::proto::WebhookOutcome;
use serde_json::json;

/// Billing records (webhook outcomes), skipping the mapping and seeding records.
fn billing(records: &[Record]) -> Vec<(String, String, String)> {
    records
        .iter()
        .filter(|r| r.event.starts_with("billing.") && r.event_id() != "")
        .map(|r| (r.event_id().to_owned(), r.outcome.clone(), r.tenant.clone()))
        .collect()
}

fn with_args(extra: &[&str]) -> Options {
    let mut options = Options::default();
    options.args.extend(extra.iter().map(|a| (*a).to_owned()));
    options
}

#[tokio::test]
async fn map_customer_applies_parked_events_at_once_in_event_order() {
    let sidecar = Sidecar::start(Options::default()).await;
    let t = now();
    // Delivered newest first; a retry of the same event is parked once.
    let paid = invoice("evt_paid", "invoice.paid", t - 10, "cus_new");
    let failed = invoice("evt_failed", "invoice.payment_failed", t - 30, "cus_new");
    refused(&sidecar, paid.clone()).await;
    refused(&sidecar, failed.clone()).await;
    refused(&sidecar, paid.clone()).await;

    let parked = records_of(&sidecar, "evt_paid").await;
    assert_eq!(parked.len(), 2, "{parked:?}");
    for record in &parked {
        assert_eq!(record.outcome, "rejected");
        assert_eq!(record.metadata["parked"], json!(true), "{record:?}");
    }
    assert_eq!(
        parked[0].metadata["parked_at_ms"], parked[1].metadata["parked_at_ms"],
        "the retry found the event parked already"
    );
    assert!(flag(&sidecar, "newco", "pro_features").await.is_default);

    assert_eq!(map(&sidecar, "cus_new", "newco").await, 2);
    // Applied when MapCustomer answered: the older failure first, then the newer payment.
    assert!(is_on(&sidecar, "newco", "pro_features").await);
    assert!(!is_on(&sidecar, "newco", "paywall_active").await);
    let all = records(&sidecar).await;
    let mapped = all
        .iter()
        .position(|r| r.event == "tenant.customer_mapped")
        .expect("the mapping is audited");
    assert_eq!(all[mapped].metadata["parked_events"], json!(2));
    let after: Vec<_> = billing(&all[mapped..]);
    assert_eq!(
        after,
        [
            ("evt_failed".into(), "applied".into(), "newco".into()),
            ("evt_paid".into(), "applied".into(), "newco".into()),
        ]
    );
    for record in &all[mapped + 1..] {
        assert_eq!(record.actor, "stripe-webhook");
        assert!(record.metadata["parked_at_ms"].is_i64(), "{record:?}");
    }

    // Stripe's retries of the parked events are duplicates and change nothing.
    assert_eq!(outcome(&sidecar, failed).await, WebhookOutcome::Duplicate);
    assert_eq!(outcome(&sidecar, paid).await, WebhookOutcome::Duplicate);
    assert!(is_on(&sidecar, "newco", "pro_features").await);
    // Once applied, a parked event is gone: moving the customer applies nothing again.
    map(&sidecar, "cus_new", "other").await;
    let last = records(&sidecar).await.pop().expect("records");
    assert_eq!(last.event, "tenant.customer_mapped");
    assert_eq!(last.metadata.get("parked_events"), None, "{last:?}");
    assert!(verify(&sidecar).await.ok);
}

#[tokio::test]
async fn parked_events_are_applied_in_the_event_order_the_store_reads_them_in() {
    let sidecar = Sidecar::start(Options::default()).await;
    parked_events_apply_in_event_order(&sidecar, &sidecar).await;
}

#[tokio::test]
async fn a_checkout_that_maps_the_customer_applies_its_parked_events() {
    let sidecar = Sidecar::start(Options::default()).await;
    let t = now();
    let failed = invoice("evt_co_failed", "invoice.payment_failed", t - 5, "cus_co");
    refused(&sidecar, failed.clone()).await;

    let checkout = deliver(
        &sidecar,
        event(
            "evt_checkout",
            "checkout.session.completed",
            t,
            json!({"customer": "cus_co", "client_reference_id": "coco"}),
        ),
    )
    .await
    .expect("the checkout maps the customer");
    assert_eq!(checkout.outcome(), WebhookOutcome::Applied);
    assert_eq!(checkout.tenant_id, "coco");
    assert!(is_on(&sidecar, "coco", "paywall_active").await);
    assert!(!is_on(&sidecar, "coco", "pro_features").await);

    let all = records(&sidecar).await;
    assert_eq!(
        billing(&all),
        [
            ("evt_co_failed".into(), "rejected".into(), String::new()),
            ("evt_co_failed".into(), "applied".into(), "coco".into()),
            ("evt_checkout".into(), "applied".into(), "coco".into()),
        ]
    );
    let checkout_record = all.last().expect("records");
    assert_eq!(checkout_record.metadata["parked_events_applied"], json!(1));
    assert_eq!(checkout_record.metadata["mapped_customer"], json!("cus_co"));
    assert_eq!(outcome(&sidecar, failed).await, WebhookOutcome::Duplicate);
}

#[tokio::test]
async fn the_tenants_file_at_start_applies_parked_events() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut first = Sidecar::on_disk(dir.path(), Options::default()).await;
    let paid = invoice("evt_file_paid", "invoice.paid", now(), "cus_file");
    refused(&first, paid.clone()).await;
    assert!(first.stop().success());
    drop(first);

    let tenants = dir.path().join("tenants.json");
    std::fs::write(&tenants, r#"{"cus_file": "filed"}"#).expect("tenants file");
    let tenants = tenants.display().to_string();
    let sidecar = Sidecar::on_disk(dir.path(), with_args(&["--tenants-file", &tenants])).await;
    assert!(is_on(&sidecar, "filed", "pro_features").await);
    let all = records(&sidecar).await;
    let seeded = all
        .iter()
        .find(|r| r.event == "tenant.mappings_seeded")
        .expect("the seeding is audited");
    assert_eq!(seeded.metadata["parked_events"], json!(1));
    assert_eq!(
        billing(&all),
        [
            ("evt_file_paid".into(), "rejected".into(), String::new()),
            ("evt_file_paid".into(), "applied".into(), "filed".into()),
        ]
    );
    assert_eq!(outcome(&sidecar, paid).await, WebhookOutcome::Duplicate);
}

#[tokio::test]
async fn a_parked_event_survives_kill_9() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut sidecar = Sidecar::on_disk(dir.path(), Options::default()).await;
    let paid = invoice("evt_k9", "invoice.paid", now(), "cus_k9");
    refused(&sidecar, paid.clone()).await;
    sidecar.kill9();

    sidecar.restart().await;
    map(&sidecar, "cus_k9", "survivor").await;
    assert!(is_on(&sidecar, "survivor", "pro_features").await);
    assert_eq!(outcome(&sidecar, paid).await, WebhookOutcome::Duplicate);
    assert!(verify(&sidecar).await.ok);
}

#[tokio::test]
async fn over_the_caps_an_event_is_refused_audited_and_not_parked() {
    let sidecar = Sidecar::start(with_args(&[
        "--max-parked-events",
        "2",
        "--max-parked-events-per-customer",
        "1",
    ]))
    .await;
    let t = now();
    let first_a = invoice("evt_a1", "invoice.payment_failed", t - 20, "cus_a");
    let second_a = invoice("evt_a2", "invoice.paid", t - 10, "cus_a");
    let first_b = invoice("evt_b1", "invoice.paid", t, "cus_b");
    let first_c = invoice("evt_c1", "invoice.paid", t, "cus_c");
    refused(&sidecar, first_a.clone()).await;
    // Over the per-customer cap, then over the total: still 422, so Stripe retries.
    refused(&sidecar, second_a.clone()).await;
    refused(&sidecar, first_b).await;
    refused(&sidecar, first_c.clone()).await;
    // A parked event retried while the lot is full is still parked, not refused room.
    refused(&sidecar, first_a).await;

    let parked_note = |records: Vec<Record>| -> Vec<serde_json::Value> {
        records
            .iter()
            .map(|r| r.metadata["parked"].clone())
            .collect()
    };
    assert_eq!(
        parked_note(records_of(&sidecar, "evt_a1").await),
        [json!(true), json!(true)]
    );
    let per_customer = records_of(&sidecar, "evt_a2").await;
    assert_eq!(parked_note(per_customer.clone()), [json!(false)]);
    let why = per_customer[0].metadata["not_parked"]
        .as_str()
        .expect("why");
    assert!(why.contains("per customer"), "{why}");
    assert_eq!(
        parked_note(records_of(&sidecar, "evt_b1").await),
        [json!(true)]
    );
    let total = records_of(&sidecar, "evt_c1").await;
    assert_eq!(parked_note(total.clone()), [json!(false)]);
    let why = total[0].metadata["not_parked"].as_str().expect("why");
    assert!(why.contains("CORESDK_MAX_PARKED_EVENTS"), "{why}");

    // Mapping applies what was parked; what was not is Stripe's to retry, and applies then.
    map(&sidecar, "cus_a", "acorp").await;
    assert!(is_on(&sidecar, "acorp", "paywall_active").await);
    assert_eq!(outcome(&sidecar, second_a).await, WebhookOutcome::Applied);
    assert!(is_on(&sidecar, "acorp", "pro_features").await);
    // Mapping cus_a made room: cus_c's retry is parked now.
    refused(&sidecar, first_c).await;
    assert_eq!(
        parked_note(records_of(&sidecar, "evt_c1").await),
        [json!(false), json!(true)]
    );
}

#[tokio::test]
async fn unmapping_parks_later_events_until_the_customer_is_mapped_again() {
    let sidecar = Sidecar::start(Options::default()).await;
    let t = now();
    map(&sidecar, "cus_u", "uco").await;
    assert_eq!(
        outcome(
            &sidecar,
            invoice("evt_u_paid", "invoice.paid", t - 20, "cus_u")
        )
        .await,
        WebhookOutcome::Applied
    );
    assert!(unmap(&sidecar, "cus_u").await);
    // Nothing applied is undone or parked again; the next event is parked.
    assert!(is_on(&sidecar, "uco", "pro_features").await);
    let failed = invoice("evt_u_failed", "invoice.payment_failed", t - 10, "cus_u");
    refused(&sidecar, failed.clone()).await;
    assert!(is_on(&sidecar, "uco", "pro_features").await);

    map(&sidecar, "cus_u", "uco").await;
    assert!(!is_on(&sidecar, "uco", "pro_features").await);
    assert!(is_on(&sidecar, "uco", "paywall_active").await);
    assert_eq!(outcome(&sidecar, failed).await, WebhookOutcome::Duplicate);
}
