//! Helpers of the parking tests (events of customers not mapped yet), on both backends.
use serde_json::{Map, Value, json};

use super::{Sidecar, deliver, event};
use coresdk::proto::WebhookOutcome;

/// An `invoice.paid` or `invoice.payment_failed` (or any type) of `customer`.
pub fn invoice(id: &str, event_type: &str, created: i64, customer: &str) -> Vec<u8> {
    event(id, event_type, created, json!({"customer": customer}))
}

/// Delivers an event whose customer has no tenant: refused with 422 so Stripe retries.
pub async fn refused(sidecar: &Sidecar, body: Vec<u8>) {
    let refusal = deliver(sidecar, body)
        .await
        .expect_err("a customer with no tenant is refused");
    assert_eq!(
        refusal.code(),
        tonic::Code::FailedPrecondition,
        "{refusal:?}"
    );
    assert_eq!(super::error_reason(&refusal), "UNKNOWN_CUSTOMER");
    assert_eq!(super::problem(&refusal).status, 422);
}

pub async fn outcome(sidecar: &Sidecar, body: Vec<u8>) -> WebhookOutcome {
    deliver(sidecar, body)
        .await
        .expect("acknowledged")
        .outcome()
}

/// An audit record as the tests read it.
#[derive(Debug, Clone)]
pub struct Record {
    pub event: String,
    pub outcome: String,
    pub tenant: String,
    pub actor: String,
    pub metadata: Map<String, Value>,
}

impl Record {
    pub fn event_id(&self) -> &str {
        self.metadata
            .get("event_id")
            .and_then(Value::as_str)
            .unwrap_or_default()
    }
}

/// Every audit record, oldest first.
pub async fn records(sidecar: &Sidecar) -> Vec<Record> {
    super::abuse::audit_records(sidecar, "")
        .await
        .into_iter()
        .map(|r| Record {
            event: r.event,
            outcome: r.outcome,
            tenant: r.tenant_id,
            actor: r.actor,
            metadata: r
                .metadata
                .as_ref()
                .map(|m| coresdk::api::convert::from_proto_struct(m).expect("JSON metadata"))
                .unwrap_or_default(),
        })
        .collect()
}

/// The records about one event id, oldest first.
pub async fn records_of(sidecar: &Sidecar, event_id: &str) -> Vec<Record> {
    records(sidecar)
        .await
        .into_iter()
        .filter(|r| r.event_id() == event_id)
        .collect()
}

/// Parks events of one customer whose event order (`created`, then the tie rank, then the id's
/// bytes) differs from their delivery order and from a locale's order of their ids, maps the
/// customer, and checks that they were applied in event order.
pub async fn parked_events_apply_in_event_order(sidecar: &Sidecar, mapper: &Sidecar) {
    let t = super::now() - 60;
    let subscription = |id: &str, event_type: &str, status: &str| {
        event(
            id,
            event_type,
            t,
            json!({"object": "subscription", "customer": "cus_order", "status": status,
                   "items": {"data": [{"price": {"lookup_key": "pro_monthly"}}]}}),
        )
    };
    // Delivered newest first. The two invoices tie but for their ids: "evt_Z" < "evt_a" in
    // bytes, the other way round in most locales.
    let delivered = [
        invoice("evt_late", "invoice.paid", t + 1, "cus_order"),
        subscription("evt_B", "customer.subscription.deleted", "canceled"),
        invoice("evt_a", "invoice.payment_failed", t, "cus_order"),
        invoice("evt_Z", "invoice.paid", t, "cus_order"),
        subscription("evt_z", "customer.subscription.created", "active"),
    ];
    for body in delivered {
        refused(sidecar, body).await;
    }
    super::audit::map(mapper, "cus_order", "orderco").await;
    let applied: Vec<String> = records(mapper)
        .await
        .into_iter()
        .filter(|r| r.tenant == "orderco" && r.event.starts_with("billing."))
        .map(|r| r.event_id().to_owned())
        .collect();
    assert_eq!(applied, ["evt_z", "evt_Z", "evt_a", "evt_B", "evt_late"]);
}
