//! Parking at the level of the operations: expiry, and the checkout that maps its own
//! customer. The integration tests (tests/parking.rs) cover the rest against the binary.

use super::*;
use crate::ops::{PARKED_RETENTION_MS, ParkingLimits};
use crate::store::ParkedEvent;

impl Fixture {
    async fn parked(&self) -> u64 {
        self.store
            .read(|tx| Ok(tx.count_parked(None, u64::MAX)?))
            .await
            .expect("counted")
    }
}

fn paid(id: &str, customer: &str) -> StripeEvent {
    event(id, "invoice.paid", 100, json!({"customer": customer}))
}

#[tokio::test]
async fn expired_parked_events_are_dropped_and_audited_never_applied() {
    let fx = Fixture::new();
    for i in 0..20 {
        let refused = fx.deliver(paid(&format!("evt_{i:02}"), "cus_old")).await;
        assert!(matches!(refused, Err(Error::UnknownCustomer(_))));
    }
    assert_eq!(fx.parked().await, 20);

    // A parking after the retention drops a bounded batch of the oldest expired events.
    let later = NOW_MS + PARKED_RETENTION_MS + 1;
    let refused = fx.deliver_at(paid("evt_new", "cus_new"), later).await;
    assert!(matches!(refused, Err(Error::UnknownCustomer(_))));
    assert_eq!(fx.parked().await, 20 - 16 + 1);

    // Mapping drops the rest of the expired ones instead of applying them.
    fx.map_at("cus_old", "oldco", later).await;
    assert!(!fx.is_on("oldco", "pro_features"));
    assert_eq!(fx.parked().await, 1);
    let audit = fx.audit().await;
    let expired: Vec<&str> = audit
        .iter()
        .filter(|r| r.outcome == "expired")
        .map(|r| r.metadata["event_id"].as_str().expect("an id"))
        .collect();
    let all: Vec<String> = (0..20).map(|i| format!("evt_{i:02}")).collect();
    assert_eq!(expired.len(), 20);
    assert!(all.iter().all(|id| expired.contains(&id.as_str())));
    assert!(
        audit
            .iter()
            .filter(|r| r.outcome == "expired")
            .all(|r| r.actor == PARKING_ACTOR && r.event == "billing.invoice.paid")
    );

    // The one parked in time is applied.
    fx.map_at("cus_new", "newco", later).await;
    assert!(fx.is_on("newco", "pro_features"));
    assert_eq!(fx.parked().await, 0);
    assert!(fx.verify().await.ok);
}

#[tokio::test]
async fn a_parked_checkout_that_maps_its_customer_is_applied_once() {
    let fx = Fixture::new();
    let checkout = event(
        "evt_checkout",
        "checkout.session.completed",
        100,
        json!({"customer": "cus_co", "client_reference_id": "coco"}),
    );
    // Parked by an earlier delivery (say, under rules that refused it), with a payment.
    let parked = ParkedEvent {
        event_id: checkout.id.clone(),
        event_type: checkout.event_type.clone(),
        customer_id: "cus_co".into(),
        created: checkout.created,
        signed_at: checkout.signed_at,
        payload: checkout.payload.bytes().to_vec(),
        actor: WEBHOOK_ACTOR.into(),
        reason: None,
        parked_at_ms: NOW_MS,
        rank: checkout.order().rank,
    };
    fx.store
        .write(move |tx| Ok(tx.park_event(&parked)?))
        .await
        .expect("parked");
    assert!(fx.deliver(paid("evt_paid", "cus_co")).await.is_err());

    let mapped = fx.deliver(checkout).await.expect("applied");
    assert_eq!(mapped.tenant_id, "coco");
    assert!(fx.is_on("coco", "pro_features"));
    assert_eq!(fx.parked().await, 0);
    let applied: Vec<String> = fx
        .audit()
        .await
        .into_iter()
        .filter(|r| r.outcome == "applied")
        .map(|r| {
            r.metadata["event_id"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    assert_eq!(applied, ["evt_paid", "evt_checkout"]);
}

#[tokio::test]
async fn a_parked_event_is_applied_as_the_delivery_that_brought_it() {
    let fx = Fixture::new();
    let rules = fx.rules.clone();
    let replayed = paid("evt_replayed", "cus_r");
    let refused = fx
        .store
        .write(move |tx| {
            apply_webhook(
                tx,
                &rules,
                ParkingLimits::DEFAULT,
                &replayed,
                &Delivery::replay("outage 42", Some("alice")),
                NOW_MS,
            )
        })
        .await
        .expect("the transaction commits");
    assert!(refused.is_err());
    // Parked at replay time: that record names the operator who asked for the replay.
    let parked = fx.audit().await;
    let parked = parked.last().expect("the parked record");
    assert_eq!(parked.actor, "replay");
    assert_eq!(parked.metadata["operator"], json!("alice"));

    fx.map("cus_r", "rco").await;
    let audit = fx.audit().await;
    let applied = audit.last().expect("records");
    assert_eq!(
        (applied.outcome.as_str(), applied.actor.as_str()),
        ("applied", "replay")
    );
    assert_eq!(applied.metadata["reason"], json!("outage 42"));
    assert_eq!(applied.metadata["parked_at_ms"], json!(NOW_MS));
    // Applied later by a mapping, which that operator did not ask for.
    assert_eq!(applied.metadata.get("operator"), None);
}
