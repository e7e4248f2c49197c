//! Stripe deliveries: verification, the refused-delivery policy, and applying a verified
//! event inside one transaction (dedup, tenant, rules, ordering, flags, audit).

use serde_json::{Map, Value, json};

use super::objects;
use super::parking::{self, ParkingLimits};
use super::validate_id;
use crate::audit::{self, AuditRecord, NewAuditRecord};
use crate::flags::{FlagOrigin, FlagRecord, FlagValue};
use crate::problem::Error;
use crate::rules::{Effect, Rules};
use crate::store::{Outcome, ProcessedEvent, StoreTx};
use crate::stripe::{SignatureVerifier, StripeEvent};

pub const WEBHOOK_ACTOR: &str = "stripe-webhook";
/// The actor of an operator's replay of exported events.
pub const REPLAY_ACTOR: &str = "replay";

/// Who feeds an event through the webhook path and why: Stripe's own delivery, or an
/// operator's replay (actor `replay`, with the operator's reason and name in every audit
/// record written then).
#[derive(Debug, Clone, Copy)]
pub struct Delivery<'a> {
    pub actor: &'a str,
    pub reason: Option<&'a str>,
    /// The operator who asked for a replay (none in mock mode without operators, and none
    /// when a parked event applies later: the mapping's operator did not ask for it).
    pub operator: Option<&'a str>,
}

impl Delivery<'static> {
    pub const STRIPE: Delivery<'static> = Delivery {
        actor: WEBHOOK_ACTOR,
        reason: None,
        operator: None,
    };
}

impl<'a> Delivery<'a> {
    pub fn replay(reason: &'a str, operator: Option<&'a str>) -> Self {
        Delivery {
            actor: REPLAY_ACTOR,
            reason: Some(reason),
            operator,
        }
    }
}

/// Checks an exported event an operator replays: the delivery's size limit, then that it is
/// an event whose `created` is not in the future. No signature: the admin token vouches.
pub fn verify_export(
    max_body_bytes: usize,
    payload: &[u8],
    now_s: i64,
) -> Result<StripeEvent, Error> {
    check_body_size(max_body_bytes, payload)?;
    StripeEvent::parse_exported(payload, now_s)
}

fn check_body_size(max_body_bytes: usize, payload: &[u8]) -> Result<(), Error> {
    if payload.len() > max_body_bytes {
        return Err(Error::PayloadTooLarge {
            size: payload.len(),
            limit: max_body_bytes,
        });
    }
    Ok(())
}

#[derive(Debug, Clone, PartialEq)]
pub struct FlagChange {
    pub key: String,
    pub old_value: Option<FlagValue>,
    pub new_value: FlagValue,
    pub version: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct WebhookResult {
    pub event_id: String,
    pub event_type: String,
    pub tenant_id: String,
    pub outcome: Outcome,
    pub flag_changes: Vec<FlagChange>,
    pub stale_flags: Vec<String>,
    pub audit_seq: u64,
}

/// The audit event name of a Stripe event type: `billing.invoice.paid`.
pub fn audit_event_name(event_type: &str) -> String {
    format!("billing.{event_type}")
}

fn base_metadata(event: &StripeEvent) -> Map<String, Value> {
    let mut metadata = Map::new();
    metadata.insert("event_id".into(), json!(event.id));
    metadata.insert("event_type".into(), json!(event.event_type));
    metadata.insert("created".into(), json!(event.created));
    metadata.insert("livemode".into(), json!(event.livemode));
    if let Some(customer) = event.customer_id() {
        metadata.insert("customer".into(), json!(customer));
    }
    if let Some(object_id) = event.object_str("id") {
        metadata.insert("object_id".into(), json!(object_id));
    }
    metadata
}

fn audit_webhook(
    tx: &mut dyn StoreTx,
    delivery: &Delivery<'_>,
    tenant_id: &str,
    event: &StripeEvent,
    outcome: &str,
    mut metadata: Map<String, Value>,
    now_ms: i64,
) -> Result<AuditRecord, Error> {
    if let Some(reason) = delivery.reason {
        metadata.insert("reason".into(), json!(reason));
    }
    if let Some(operator) = delivery.operator {
        metadata.insert("operator".into(), json!(operator));
    }
    tx.append_audit(
        NewAuditRecord {
            tenant_id: tenant_id.to_owned(),
            actor: delivery.actor.to_owned(),
            event: audit_event_name(&event.event_type),
            outcome: outcome.to_owned(),
            metadata: audit::bound_metadata(metadata),
        },
        now_ms,
    )
}

/// Applies a verified event: dedup, tenant, rules, ordering, flags, audit. The outer `Result`
/// is the transaction's (an `Err` rolls everything back); the inner one is the answer, which
/// may be a refusal whose audit record still commits. An event refused because its customer
/// has no tenant is parked within `parking`'s limits (see [`parking`]).
pub fn apply_webhook(
    tx: &mut dyn StoreTx,
    rules: &Rules,
    parking: ParkingLimits,
    event: &StripeEvent,
    delivery: &Delivery<'_>,
    now_ms: i64,
) -> Result<Result<WebhookResult, Error>, Error> {
    apply(tx, rules, parking, event, delivery, None, now_ms)
}

/// [`apply_webhook`] for an event parked at `parked_at_ms`, now that its customer has a tenant.
pub(super) fn apply_unparked(
    tx: &mut dyn StoreTx,
    rules: &Rules,
    parking: ParkingLimits,
    event: &StripeEvent,
    delivery: &Delivery<'_>,
    parked_at_ms: i64,
    now_ms: i64,
) -> Result<Result<WebhookResult, Error>, Error> {
    apply(
        tx,
        rules,
        parking,
        event,
        delivery,
        Some(parked_at_ms),
        now_ms,
    )
}

#[tracing::instrument(
    level = "debug",
    name = "rules.apply",
    skip_all,
    fields(stripe.event_type = %crate::problem::quoted(&event.event_type))
)]
fn apply(
    tx: &mut dyn StoreTx,
    rules: &Rules,
    parking: ParkingLimits,
    event: &StripeEvent,
    delivery: &Delivery<'_>,
    parked_at_ms: Option<i64>,
    now_ms: i64,
) -> Result<Result<WebhookResult, Error>, Error> {
    // Shadows the function so that every record of an unparked event says it was parked.
    let base_metadata = |event: &StripeEvent| {
        let mut metadata = base_metadata(event);
        if let Some(parked_at_ms) = parked_at_ms {
            metadata.insert("parked_at_ms".into(), json!(parked_at_ms));
        }
        metadata
    };
    if let Some(first) = tx.processed_event(&event.id)? {
        let mut metadata = base_metadata(event);
        metadata.insert("first_outcome".into(), json!(first.outcome.as_str()));
        metadata.insert("first_audit_seq".into(), json!(first.audit_seq));
        let record = audit_webhook(
            tx,
            delivery,
            &first.tenant_id,
            event,
            "duplicate",
            metadata,
            now_ms,
        )?;
        return Ok(Ok(WebhookResult {
            event_id: event.id.clone(),
            event_type: event.event_type.clone(),
            tenant_id: first.tenant_id,
            outcome: Outcome::Duplicate,
            flag_changes: Vec::new(),
            stale_flags: Vec::new(),
            audit_seq: record.seq,
        }));
    }

    let effect = rules.evaluate(event);
    let mut metadata = base_metadata(event);
    let mut mapping_recorded = false;

    let tenant = match resolve_tenant(tx, event, now_ms)? {
        Resolved::Tenant(tenant) => Some(tenant),
        Resolved::Mapped(tenant) => {
            metadata.insert("mapped_customer".into(), json!(event.customer_id()));
            // An event applied from parking resolves through the mapping that unparked it, so
            // it never maps (nor unparks) anything: the recursion is one level deep.
            if parked_at_ms.is_none()
                && let Some(customer) = event.customer_id()
            {
                let applied =
                    parking::apply_parked(tx, rules, parking, customer, Some(&event.id), now_ms)?;
                if applied > 0 {
                    metadata.insert("parked_events_applied".into(), json!(applied));
                }
            }
            mapping_recorded = true;
            Some(tenant)
        }
        Resolved::MappingRefused { tenant, claimed } => {
            tracing::warn!(
                event_id = %event.id,
                tenant = %tenant,
                claimed = %claimed,
                "checkout names another tenant for an already mapped customer; the mapping stays"
            );
            metadata.insert("mapping_refused".into(), json!(true));
            metadata.insert("conflicting_client_reference_id".into(), json!(claimed));
            Some(tenant)
        }
        Resolved::None => None,
    };

    let Some(tenant) = tenant else {
        if effect == Effect::Ignored {
            return finish(
                tx,
                delivery,
                event,
                String::new(),
                Outcome::Ignored,
                Vec::new(),
                Vec::new(),
                metadata,
                now_ms,
            )
            .map(Ok);
        }
        let refusal = match event.customer_id() {
            Some(customer) => {
                parking::park(tx, parking, event, customer, delivery, now_ms)?.note(&mut metadata);
                Error::UnknownCustomer(customer.to_owned())
            }
            None => Error::NoTenant,
        };
        metadata.insert("refusal".into(), json!(refusal.to_string()));
        audit_webhook(tx, delivery, "", event, "rejected", metadata, now_ms)?;
        return Ok(Err(refusal));
    };

    let resolution = objects::resolve(tx, rules, &tenant, event, effect)?;
    let mut stale: Vec<String> = Vec::new();
    let stale_object = resolution.stale.is_some();
    if let Some(object) = resolution.stale {
        metadata.insert("stale_object".into(), json!(object.object));
        metadata.insert("newer_event_id".into(), json!(object.newer_event_id));
        stale = object.keys;
    }
    if resolution.wanted.is_empty() && !mapping_recorded {
        let outcome = if stale.is_empty() {
            Outcome::Ignored
        } else {
            Outcome::Stale
        };
        return finish(
            tx,
            delivery,
            event,
            tenant,
            outcome,
            Vec::new(),
            stale,
            metadata,
            now_ms,
        )
        .map(Ok);
    }

    // Each flag keeps the value of the write with the greatest order mark; the marks and what
    // they make the final flags a function of are in `objects`.
    let mut changes = Vec::new();
    let mut deciding_rules = Map::new();
    for objects::Wanted {
        key,
        value,
        origin,
        rule,
        order,
    } in resolution.wanted
    {
        let current = tx.flag(&tenant, &key)?;
        if let Some(current) = &current {
            // An admin's value stands until a strictly newer event: the subscription aggregate
            // re-writes at an unchanged mark when an older subscription's event arrives (a
            // replay, a parked event), which must not undo an override made since.
            let admin_holds = current.origin == FlagOrigin::Admin && current.order == order;
            if current.order > order || admin_holds {
                if !stale.contains(&key) {
                    stale.push(key);
                }
                continue;
            }
            if current.value == value {
                // The setter stays the source; the mark moves so older events stay stale.
                if current.order < order {
                    tx.advance_flag_order(&tenant, &key, &order)?;
                }
                continue;
            }
        }
        let written = tx.write_flag(FlagRecord {
            tenant_id: tenant.clone(),
            key: key.clone(),
            value: value.clone(),
            version: 0,
            order,
            origin,
            updated_at_ms: now_ms,
            updated_by: delivery.actor.to_owned(),
            source_event_id: event.id.clone(),
        })?;
        deciding_rules.insert(key.clone(), json!(rule));
        changes.push(FlagChange {
            key,
            old_value: current.map(|c| c.value),
            new_value: value,
            version: written.version,
        });
    }
    if !deciding_rules.is_empty() {
        metadata.insert("rules".into(), Value::Object(deciding_rules));
    }
    // Nothing changed only because newer events got there first, or the event's object had a
    // newer event (what it changed then is what the newer event says): tell the caller it was
    // stale.
    let outcome =
        if !mapping_recorded && (stale_object || (changes.is_empty() && !stale.is_empty())) {
            Outcome::Stale
        } else {
            Outcome::Applied
        };
    finish(
        tx, delivery, event, tenant, outcome, changes, stale, metadata, now_ms,
    )
    .map(Ok)
}

enum Resolved {
    Tenant(String),
    /// A checkout completed with `client_reference_id`: the mapping was just recorded.
    Mapped(String),
    /// A checkout's `client_reference_id` names another tenant than the customer's mapping:
    /// the mapping stays and the event applies to the mapped tenant.
    MappingRefused {
        tenant: String,
        claimed: String,
    },
    None,
}

/// The mapping table first; a checkout's `client_reference_id` only maps a customer that has
/// no tenant yet, unmapped ones included: the unmapping tombstone guards against the tenants
/// file at start, not against a customer's next checkout. Moving a mapped customer is an admin decision (`MapCustomer`), never one a
/// checkout session can make: whoever can start a checkout can set its reference.
fn resolve_tenant(
    tx: &mut dyn StoreTx,
    event: &StripeEvent,
    now_ms: i64,
) -> Result<Resolved, Error> {
    let customer = event.customer_id();
    let reference = event
        .object_str("client_reference_id")
        .filter(|_| event.event_type == "checkout.session.completed")
        .filter(|tenant| validate_id("client_reference_id", tenant).is_ok());
    if let Some(customer) = customer
        && let Some(tenant) = tx.tenant_of_customer(customer)?
    {
        return Ok(match reference {
            Some(claimed) if claimed != tenant => Resolved::MappingRefused {
                tenant,
                claimed: claimed.to_owned(),
            },
            _ => Resolved::Tenant(tenant),
        });
    }
    if let (Some(customer), Some(tenant)) = (customer, reference)
        && validate_id("customer", customer).is_ok()
    {
        tx.map_customer(customer, tenant, now_ms)?;
        return Ok(Resolved::Mapped(tenant.to_owned()));
    }
    Ok(match event.metadata_tenant() {
        Some(tenant) if validate_id("metadata.tenant_id", tenant).is_ok() => {
            Resolved::Tenant(tenant.to_owned())
        }
        _ => Resolved::None,
    })
}

#[allow(clippy::too_many_arguments)]
fn finish(
    tx: &mut dyn StoreTx,
    delivery: &Delivery<'_>,
    event: &StripeEvent,
    tenant_id: String,
    outcome: Outcome,
    flag_changes: Vec<FlagChange>,
    stale_flags: Vec<String>,
    mut metadata: Map<String, Value>,
    now_ms: i64,
) -> Result<WebhookResult, Error> {
    if !flag_changes.is_empty() {
        let shown: Vec<String> = flag_changes
            .iter()
            .map(|c| format!("{}={}", c.key, c.new_value.display()))
            .collect();
        metadata.insert("flags".into(), json!(shown));
    }
    if !stale_flags.is_empty() {
        metadata.insert("stale_flags".into(), json!(stale_flags));
    }
    let record = audit_webhook(
        tx,
        delivery,
        &tenant_id,
        event,
        outcome.as_str(),
        metadata,
        now_ms,
    )?;
    tx.record_processed(
        &ProcessedEvent {
            event_id: event.id.clone(),
            event_type: event.event_type.clone(),
            tenant_id: tenant_id.clone(),
            outcome,
            audit_seq: record.seq,
        },
        now_ms,
    )?;
    Ok(WebhookResult {
        event_id: event.id.clone(),
        event_type: event.event_type.clone(),
        tenant_id,
        outcome,
        flag_changes,
        stale_flags,
        audit_seq: record.seq,
    })
}

/// Checks a delivery as received: size, then signature, then that the signed body is an event.
#[tracing::instrument(
    level = "debug",
    name = "webhook.verify",
    skip_all,
    fields(error.type = tracing::field::Empty, otel.status_code = tracing::field::Empty)
)]
pub fn verify_delivery(
    verifier: &SignatureVerifier,
    max_body_bytes: usize,
    payload: &[u8],
    signature_header: &str,
    now_s: i64,
) -> Result<StripeEvent, Error> {
    let verified = check_body_size(max_body_bytes, payload)
        .and_then(|()| verifier.verify(payload, signature_header, now_s))
        .and_then(|signed_at| StripeEvent::parse(payload, signed_at));
    if let Err(refusal) = &verified {
        let span = tracing::Span::current();
        span.record("error.type", refusal.mapping().reason);
        span.record("otel.status_code", "ERROR");
    }
    verified
}

/// Whether a delivery refused before it reached the rules (bad signature, oversized, not an
/// event) is audited: not when the refusal is the sidecar's own misconfiguration rather than
/// something a sender did.
pub fn audits_refusal(refusal: &Error) -> bool {
    !matches!(refusal, Error::WebhookSecretMissing)
}

/// Bytes of an unverified body read for the identity it claims. Stripe writes `id` first, so
/// it is nearly always there; `type` comes last, so only a small event shows it.
pub const CLAIM_PREFIX_BYTES: usize = 1024;

/// What the audit trail keeps of a refused delivery (see [`audits_refusal`]).
pub fn refused_delivery_record(refusal: &Error, payload: &[u8]) -> NewAuditRecord {
    let mut metadata = Map::new();
    metadata.insert("reason".into(), json!(refusal.mapping().reason));
    metadata.insert("detail".into(), json!(refusal.to_string()));
    metadata.insert("payload_bytes".into(), json!(payload.len()));
    // The claimed id helps find a forged or replayed event; it is only ever a claim.
    let claimed = claimed_identity(payload);
    if let Some(id) = claimed.id {
        metadata.insert("claimed_event_id".into(), json!(id));
    }
    if let Some(event_type) = claimed.event_type {
        metadata.insert("claimed_event_type".into(), json!(event_type));
    }
    NewAuditRecord {
        tenant_id: String::new(),
        actor: WEBHOOK_ACTOR.to_owned(),
        event: REFUSED_DELIVERY_EVENT.to_owned(),
        outcome: REFUSED_DELIVERY_OUTCOME.to_owned(),
        metadata: audit::bound_metadata(metadata),
    }
}

pub const REFUSED_DELIVERY_EVENT: &str = "billing.webhook.refused";
pub const REFUSED_DELIVERY_OUTCOME: &str = "rejected";
/// What a refused delivery's record shares with every refusal coalesced with it (the key is
/// the reason); its claimed id, size and detail belong to that one delivery.
pub const REFUSED_DELIVERY_KEY_FIELDS: &[&str] = &["reason"];

/// The top-level string `id` and `type` a body claims.
#[derive(Debug, Default, PartialEq)]
pub struct ClaimedIdentity {
    pub id: Option<String>,
    pub event_type: Option<String>,
}

/// Reads the claimed identity from the first [`CLAIM_PREFIX_BYTES`] only, whatever the body's
/// size: a real JSON parser walks the prefix and keeps the top-level fields it meets before
/// the prefix ends (the cut is then a parse error, which is expected and ignored).
pub fn claimed_identity(payload: &[u8]) -> ClaimedIdentity {
    let prefix = &payload[..payload.len().min(CLAIM_PREFIX_BYTES)];
    let mut claimed = ClaimedIdentity::default();
    let mut parser = serde_json::Deserializer::from_slice(prefix);
    let _ = serde::Deserializer::deserialize_map(&mut parser, ClaimVisitor(&mut claimed));
    claimed
}

struct ClaimVisitor<'a>(&'a mut ClaimedIdentity);

impl<'de> serde::de::Visitor<'de> for ClaimVisitor<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let bounded =
            |value: Value| -> Option<String> { Some(value.as_str()?.chars().take(255).collect()) };
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                "id" if self.0.id.is_none() => self.0.id = bounded(map.next_value()?),
                "type" if self.0.event_type.is_none() => {
                    self.0.event_type = bounded(map.next_value()?)
                }
                _ => {
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
            }
            if self.0.id.is_some() && self.0.event_type.is_some() {
                break;
            }
        }
        Ok(())
    }
}
