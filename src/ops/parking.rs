//! Events of customers not mapped yet. Such an event is refused (422, so Stripe retries) and
//! also parked: kept as received, bounded, in the refusal's own transaction. When the customer
//! gets a tenant (`MapCustomer`, the tenants file, a checkout with `client_reference_id`), its
//! parked events are applied at once, in event order, through the webhook path, in the
//! mapping's transaction; Stripe's later retries of them are then duplicates.

use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};

use super::validate_id;
use super::webhook::{Delivery, apply_unparked, audit_event_name};
use crate::audit::{self, NewAuditRecord};
use crate::problem::{Error, Throttle};
use crate::rules::Rules;
use crate::store::{ParkedEvent, StoreTx};
use crate::stripe::StripeEvent;

/// How many refused events of customers not mapped yet the store keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParkingLimits {
    /// Parked events in all (0: nothing is parked).
    pub max_events: u64,
    /// Parked events of one customer, so that one busy unmapped customer cannot take the
    /// room of all the others.
    pub max_per_customer: u64,
}

impl ParkingLimits {
    pub const DEFAULT: ParkingLimits = ParkingLimits {
        max_events: 10_000,
        max_per_customer: 100,
    };
}

/// A parked event older than this is dropped (audited `expired`) instead of applied: Stripe
/// stops retrying a delivery after three days, so by then nothing but a replay brings the
/// event back, and an operator who maps a customer weeks later decides that with a replay.
pub const PARKED_RETENTION_MS: i64 = 30 * 24 * 60 * 60 * 1000;

/// Expired events dropped per parking at most: each parking adds one row at most, so this
/// keeps up with the expiry while the work per request stays bounded.
const EXPIRE_PER_PARKING: u64 = 16;

/// The actor of the sidecar's own parking decisions (expiry).
pub const PARKING_ACTOR: &str = "parking";

/// A full parking lot is worth a warning, not one per refused delivery.
static FULL_WARNING: Throttle = Throttle::new(Duration::from_secs(60));

/// What became of a refused event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parking {
    /// Parked (now or by an earlier delivery of the same event) at this time.
    Parked { at_ms: i64 },
    /// Not kept: the delivery is refused all the same, so Stripe retries it.
    NotParked(String),
}

impl Parking {
    /// What the refusal's audit record says about it.
    pub fn note(&self, metadata: &mut Map<String, Value>) {
        match self {
            Parking::Parked { at_ms } => {
                metadata.insert("parked".into(), json!(true));
                metadata.insert("parked_at_ms".into(), json!(at_ms));
            }
            Parking::NotParked(why) => {
                metadata.insert("parked".into(), json!(false));
                metadata.insert("not_parked".into(), json!(why));
            }
        }
    }
}

/// Parks a verified event of `customer`, which has no tenant, unless it is parked already or
/// the lot is full; first drops a few expired events.
pub fn park(
    tx: &mut dyn StoreTx,
    limits: ParkingLimits,
    event: &StripeEvent,
    customer: &str,
    delivery: &Delivery<'_>,
    now_ms: i64,
) -> Result<Parking, Error> {
    for expired in tx.expire_parked(
        now_ms.saturating_sub(PARKED_RETENTION_MS),
        EXPIRE_PER_PARKING,
    )? {
        audit_dropped(tx, &expired, "expired", &expired_reason(), now_ms)?;
    }
    if let Some(at_ms) = tx.parked_at(&event.id)? {
        return Ok(Parking::Parked { at_ms });
    }
    if validate_id("customer", customer).is_err() {
        return Ok(Parking::NotParked(
            "the customer id is not one a tenant can be mapped to".into(),
        ));
    }
    if limits.max_events == 0 || limits.max_per_customer == 0 {
        return Ok(Parking::NotParked(
            "parking is off (CORESDK_MAX_PARKED_EVENTS or CORESDK_MAX_PARKED_EVENTS_PER_CUSTOMER is 0)"
                .into(),
        ));
    }
    let full = if tx.count_parked(None, limits.max_events)? >= limits.max_events {
        format!(
            "{} events are parked, the most kept (CORESDK_MAX_PARKED_EVENTS)",
            limits.max_events
        )
    } else if tx.count_parked(Some(customer), limits.max_per_customer)? >= limits.max_per_customer {
        format!(
            "{} events of this customer are parked, the most kept per customer (CORESDK_MAX_PARKED_EVENTS_PER_CUSTOMER)",
            limits.max_per_customer
        )
    } else {
        tx.park_event(&ParkedEvent {
            event_id: event.id.clone(),
            event_type: event.event_type.clone(),
            customer_id: customer.to_owned(),
            created: event.created,
            signed_at: event.signed_at,
            payload: event.payload.bytes().to_vec(),
            actor: delivery.actor.to_owned(),
            reason: delivery.reason.map(str::to_owned),
            parked_at_ms: now_ms,
            rank: event.order().rank,
        })?;
        return Ok(Parking::Parked { at_ms: now_ms });
    };
    if let Some(held_back) = FULL_WARNING.admit(Instant::now()) {
        tracing::warn!(
            event_id = %event.id,
            customer = %customer,
            reason = %full,
            not_parked_since_last_warning = held_back,
            "an event of a customer with no tenant was not parked; it is refused, so Stripe retries it: map the customer or raise the limit"
        );
    }
    Ok(Parking::NotParked(full))
}

/// Applies the parked events of `customer`, which just got a tenant, and deletes them: in
/// event order, each through the webhook path (its own dedup record, flags and audit record),
/// in the caller's transaction. The store gives the order, and each event is read, applied and
/// deleted before the next is read: memory holds one payload, not all of a customer's.
/// `except` is the event whose own delivery mapped the customer: it is being applied already.
/// Returns how many were applied.
pub fn apply_parked(
    tx: &mut dyn StoreTx,
    rules: &Rules,
    limits: ParkingLimits,
    customer: &str,
    except: Option<&str>,
    now_ms: i64,
) -> Result<u64, Error> {
    let mut applied = 0;
    // The final flags do not depend on this order; the audit trail reads best in event order.
    for event_id in tx.parked_ids(customer)? {
        // Gone since the ids were read only if an earlier event's path deleted it.
        let Some(parked) = tx.take_parked_event(&event_id)? else {
            continue;
        };
        if except == Some(parked.event_id.as_str()) {
            continue;
        }
        if parked.parked_at_ms < now_ms.saturating_sub(PARKED_RETENTION_MS) {
            audit_dropped(tx, &parked, "expired", &expired_reason(), now_ms)?;
            continue;
        }
        let event = match StripeEvent::parse(&parked.payload, parked.signed_at) {
            Ok(event) => event,
            // Parsed once already; only a stricter parser after an upgrade gets here.
            Err(e) => {
                audit_dropped(tx, &parked, "dropped", &e.to_string(), now_ms)?;
                continue;
            }
        };
        let delivery = Delivery {
            actor: &parked.actor,
            reason: parked.reason.as_deref(),
            operator: None,
        };
        match apply_unparked(
            tx,
            rules,
            limits,
            &event,
            &delivery,
            parked.parked_at_ms,
            now_ms,
        )? {
            Ok(_) => applied += 1,
            // Refused again (its customer lost its tenant in between): the webhook path has
            // audited and parked it again.
            Err(refusal) => {
                tracing::warn!(event_id = %event.id, error = %refusal, "a parked event was refused again")
            }
        }
    }
    if applied > 0 {
        tracing::info!(
            customer = %customer,
            applied,
            "parked events of a newly mapped customer applied"
        );
    }
    Ok(applied)
}

fn expired_reason() -> String {
    format!(
        "parked for more than {} days without a tenant for its customer; replay it to apply it",
        PARKED_RETENTION_MS / (24 * 60 * 60 * 1000)
    )
}

/// Audits a parked event deleted without being applied, so that an operator can replay it.
fn audit_dropped(
    tx: &mut dyn StoreTx,
    parked: &ParkedEvent,
    outcome: &str,
    why: &str,
    now_ms: i64,
) -> Result<(), Error> {
    tracing::warn!(event_id = %parked.event_id, customer = %parked.customer_id, outcome, why, "parked event deleted unapplied");
    let mut metadata = Map::new();
    metadata.insert("event_id".into(), json!(parked.event_id));
    metadata.insert("event_type".into(), json!(parked.event_type));
    metadata.insert("created".into(), json!(parked.created));
    metadata.insert("customer".into(), json!(parked.customer_id));
    metadata.insert("parked_at_ms".into(), json!(parked.parked_at_ms));
    metadata.insert("reason".into(), json!(why));
    tx.append_audit(
        NewAuditRecord {
            tenant_id: String::new(),
            actor: PARKING_ACTOR.to_owned(),
            event: audit_event_name(&parked.event_type),
            outcome: outcome.to_owned(),
            metadata: audit::bound_metadata(metadata),
        },
        now_ms,
    )?;
    Ok(())
}
