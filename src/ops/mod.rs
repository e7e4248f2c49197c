//! The domain operations, each run inside one store transaction so that its effects, its
//! dedup record and its audit record commit together or not at all; and the validation of
//! the ids and texts they accept.

mod explain;
mod objects;
mod parking;
mod retention;
mod webhook;

use serde_json::{Map, Value, json};

use crate::audit::{self, ChainVerifier, NewAuditRecord, VerifyReport};
use crate::flags::{FlagOrigin, FlagRecord, FlagValue};
use crate::problem::Error;
use crate::rules::Rules;
use crate::store::{CustomerMapping, StoreTx};
pub use explain::{AdminTrace, EventTrace, Explanation, STALE_SHOWN, SetBy, explain_flag};
pub use parking::{PARKED_RETENTION_MS, PARKING_ACTOR, ParkingLimits};
pub use retention::{DEFAULT_RETENTION_DAYS, retention_loop};
pub use webhook::{
    CLAIM_PREFIX_BYTES, ClaimedIdentity, Delivery, FlagChange, REFUSED_DELIVERY_EVENT,
    REFUSED_DELIVERY_KEY_FIELDS, REFUSED_DELIVERY_OUTCOME, REPLAY_ACTOR, WEBHOOK_ACTOR,
    WebhookResult, apply_webhook, audit_event_name, audits_refusal, claimed_identity,
    refused_delivery_record, verify_delivery, verify_export,
};

pub const MAX_ID_LEN: usize = 128;

/// Why a string cannot be a tenant or customer id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdDefect {
    #[error("is required")]
    Empty,
    #[error("is longer than {MAX_ID_LEN} bytes")]
    TooLong,
    #[error(
        "must be printable: U+{code_point:04X} (character {position}) is whitespace, a control, a format character such as a bidi override or zero-width space, or unassigned"
    )]
    Unprintable { code_point: u32, position: usize },
}

/// Tenant and customer ids: bounded, and only characters that show as themselves. Refused by
/// general category: separators (whitespace, U+2028/2029) and "other" (controls; format
/// characters, which include the bidi overrides and isolates U+202A–202E and U+2066–2069, the
/// zero-width U+200B–200F and the BOM U+FEFF; private use; unassigned). Such characters let
/// two ids that look alike be different tenants, or one id display as another in logs and
/// the audit trail. Letters of any script stay valid.
pub fn id_defect(value: &str) -> Option<IdDefect> {
    use unicode_properties::{GeneralCategoryGroup, UnicodeGeneralCategory as _};
    if value.is_empty() {
        return Some(IdDefect::Empty);
    }
    if value.len() > MAX_ID_LEN {
        return Some(IdDefect::TooLong);
    }
    value
        .chars()
        .enumerate()
        .find(|(_, c)| {
            matches!(
                c.general_category_group(),
                GeneralCategoryGroup::Separator | GeneralCategoryGroup::Other
            )
        })
        .map(|(position, c)| IdDefect::Unprintable {
            code_point: u32::from(c),
            position: position + 1,
        })
}

/// [`id_defect`] as the problem for the request field `field`.
pub fn validate_id(field: &'static str, value: &str) -> Result<(), Error> {
    match id_defect(value) {
        None => Ok(()),
        Some(defect) => Err(Error::invalid(field, defect.to_string())),
    }
}

/// Flag keys: letters, digits and `_ - . :`, bounded. The refused key is quoted, cut short.
pub fn validate_flag_key(field: &'static str, key: &str) -> Result<(), Error> {
    if crate::rules::is_valid_flag_key(key) {
        return Ok(());
    }
    Err(Error::invalid(
        field,
        format!(
            "'{}' is not a valid flag key: use 1-{} characters of letters, digits, _ - . :",
            crate::problem::quoted(key),
            crate::rules::MAX_FLAG_KEY_LEN
        ),
    ))
}

/// An id that may be left empty, meaning "any" (a tenant filter) or "none".
pub fn validate_optional_id(field: &'static str, value: &str) -> Result<(), Error> {
    if value.is_empty() {
        Ok(())
    } else {
        validate_id(field, value)
    }
}

pub const MAX_REASON_LEN: usize = 1024;

/// The `reason` an admin gives for a change: optional, bounded (it lands in the audit trail).
pub fn validate_reason(reason: &str) -> Result<(), Error> {
    if reason.len() > MAX_REASON_LEN {
        return Err(Error::invalid(
            "reason",
            format!("is longer than {MAX_REASON_LEN} bytes"),
        ));
    }
    Ok(())
}

/// A required free-text field such as `actor`: present and bounded.
pub fn required_text(field: &'static str, value: &str, max: usize) -> Result<(), Error> {
    if value.trim().is_empty() {
        return Err(Error::invalid(field, "is required"));
    }
    if value.len() > max {
        return Err(Error::invalid(field, format!("is longer than {max} bytes")));
    }
    Ok(())
}

/// Who makes an admin change and why, for the audit trail.
pub struct AdminChange<'a> {
    /// The operator whose token made the change (or, with none, the caller's claim).
    pub actor: &'a str,
    /// The `actor` the caller claimed, when an operator's token vouched for the call.
    pub claimed_actor: Option<&'a str>,
    pub reason: &'a str,
}

fn admin_metadata(
    change: &AdminChange<'_>,
    mut metadata: Map<String, Value>,
) -> Map<String, Value> {
    if !change.reason.is_empty() {
        metadata.insert("reason".into(), json!(change.reason));
    }
    if let Some(claimed) = change.claimed_actor {
        metadata.insert("claimed_actor".into(), json!(claimed));
    }
    audit::bound_metadata(metadata)
}

/// An admin sets a flag. The event ordering mark (the whole [`crate::stripe::EventOrder`]) is kept, so an admin override does not make
/// later Stripe events look stale, and a later event may change the flag again.
pub fn set_flag(
    tx: &mut dyn StoreTx,
    tenant_id: &str,
    key: &str,
    value: FlagValue,
    change: &AdminChange<'_>,
    now_ms: i64,
) -> Result<FlagRecord, Error> {
    let current = tx.flag(tenant_id, key)?;
    let written = tx.write_flag(FlagRecord {
        tenant_id: tenant_id.to_owned(),
        key: key.to_owned(),
        value: value.clone(),
        version: 0,
        order: current
            .as_ref()
            .map(|c| c.order.clone())
            .unwrap_or_default(),
        origin: FlagOrigin::Admin,
        updated_at_ms: now_ms,
        updated_by: change.actor.to_owned(),
        source_event_id: String::new(),
    })?;
    let mut metadata = Map::new();
    metadata.insert("flag".into(), json!(key));
    metadata.insert(
        "old_value".into(),
        json!(current.map(|c| c.value.display())),
    );
    metadata.insert("new_value".into(), json!(value.display()));
    metadata.insert("version".into(), json!(written.version));
    tx.append_audit(
        NewAuditRecord {
            tenant_id: tenant_id.to_owned(),
            actor: change.actor.to_owned(),
            event: "flag.set".to_owned(),
            outcome: "applied".to_owned(),
            metadata: admin_metadata(change, metadata),
        },
        now_ms,
    )?;
    Ok(written)
}

/// What [`map_customer`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapped {
    /// The tenant the customer had before, if any.
    pub previous: Option<String>,
    /// Parked events of the customer applied in the mapping's transaction.
    pub parked_applied: u64,
}

/// Maps the customer and applies its parked events (see [`parking::apply_parked`]) in the
/// same transaction: the mapping's audit record counts them, each has its own record after it.
#[allow(clippy::too_many_arguments)]
pub fn map_customer(
    tx: &mut dyn StoreTx,
    rules: &Rules,
    parking: ParkingLimits,
    customer_id: &str,
    tenant_id: &str,
    change: &AdminChange<'_>,
    now_ms: i64,
) -> Result<Mapped, Error> {
    let previous = tx.map_customer(customer_id, tenant_id, now_ms)?;
    if previous.as_deref() == Some(tenant_id) {
        return Ok(Mapped {
            previous,
            parked_applied: 0,
        });
    }
    let mut metadata = Map::new();
    metadata.insert("customer".into(), json!(customer_id));
    if let Some(previous) = &previous {
        metadata.insert("previous_tenant".into(), json!(previous));
    }
    let parked = tx.count_parked(Some(customer_id), u64::MAX)?;
    if parked > 0 {
        metadata.insert("parked_events".into(), json!(parked));
    }
    tx.append_audit(
        NewAuditRecord {
            tenant_id: tenant_id.to_owned(),
            actor: change.actor.to_owned(),
            event: "tenant.customer_mapped".to_owned(),
            outcome: "applied".to_owned(),
            metadata: admin_metadata(change, metadata),
        },
        now_ms,
    )?;
    let parked_applied = if parked > 0 {
        parking::apply_parked(tx, rules, parking, customer_id, None, now_ms)?
    } else {
        0
    };
    Ok(Mapped {
        previous,
        parked_applied,
    })
}

/// Marks the customer unmapped. Nothing already applied is undone or parked again; the
/// customer's later events are parked until it is mapped again.
pub fn unmap_customer(
    tx: &mut dyn StoreTx,
    customer_id: &str,
    change: &AdminChange<'_>,
    now_ms: i64,
) -> Result<Option<String>, Error> {
    let previous = tx.unmap_customer(customer_id, now_ms)?;
    if let Some(tenant) = &previous {
        let mut metadata = Map::new();
        metadata.insert("customer".into(), json!(customer_id));
        tx.append_audit(
            NewAuditRecord {
                tenant_id: tenant.clone(),
                actor: change.actor.to_owned(),
                event: "tenant.customer_unmapped".to_owned(),
                outcome: "applied".to_owned(),
                metadata: admin_metadata(change, metadata),
            },
            now_ms,
        )?;
    }
    Ok(previous)
}

/// What seeding the configured mappings did; also the metadata of its audit record.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SeedReport {
    /// Customers that had no tenant and now have the configured one.
    pub added: u64,
    /// Customers already mapped as configured.
    pub unchanged: u64,
    /// Customers mapped elsewhere at runtime, left there.
    pub kept: u64,
    /// Customers unmapped at runtime, left unmapped.
    pub kept_unmapped: u64,
    /// Customers mapped elsewhere or unmapped at runtime, moved to the configured tenant
    /// (overrides only).
    pub overridden: u64,
    /// Parked events of the customers added or moved, applied.
    pub parked_applied: u64,
}

/// How many moved customers the seeding record names; the counts cover the rest.
const SEED_RECORD_MOVES: usize = 16;

/// Maps the configured customers (tenants file, mock tenants) that were never mapped. A
/// customer mapped or unmapped at runtime stays so unless `overrides`: the file is where
/// mappings start, `MapCustomer`, `UnmapCustomer` and checkouts are where they change, and a
/// restart must not undo a change. One audit record summarises a seeding that changed
/// anything, so restarts do not grow the trail; the parked events of the customers it mapped
/// are applied after it, each with its own record.
pub fn seed_customers(
    tx: &mut dyn StoreTx,
    rules: &Rules,
    parking: ParkingLimits,
    configured: &std::collections::BTreeMap<String, String>,
    overrides: bool,
    now_ms: i64,
) -> Result<SeedReport, Error> {
    let mut report = SeedReport::default();
    let mut moves = Vec::new();
    let mut mapped_now = Vec::new();
    for (customer, tenant) in configured {
        let current = match tx.customer_mapping(customer)? {
            CustomerMapping::NeverMapped => {
                tx.map_customer(customer, tenant, now_ms)?;
                report.added += 1;
                mapped_now.push(customer);
                continue;
            }
            CustomerMapping::Mapped(current) if current == *tenant => {
                report.unchanged += 1;
                continue;
            }
            CustomerMapping::Mapped(current) => Some(current),
            CustomerMapping::Unmapped => None,
        };
        if !overrides {
            match current {
                Some(_) => report.kept += 1,
                None => report.kept_unmapped += 1,
            }
            continue;
        }
        tx.map_customer(customer, tenant, now_ms)?;
        report.overridden += 1;
        mapped_now.push(customer);
        if moves.len() < SEED_RECORD_MOVES {
            moves.push(json!({"customer": customer, "from": current, "to": tenant}));
        }
    }
    let mut with_parked = Vec::new();
    let mut parked = 0;
    for customer in mapped_now {
        let count = tx.count_parked(Some(customer), u64::MAX)?;
        if count > 0 {
            parked += count;
            with_parked.push(customer);
        }
    }
    if report.added + report.overridden > 0 {
        let mut metadata = Map::new();
        metadata.insert("configured".into(), json!(configured.len()));
        metadata.insert("added".into(), json!(report.added));
        metadata.insert("unchanged".into(), json!(report.unchanged));
        metadata.insert("kept_runtime".into(), json!(report.kept));
        metadata.insert("kept_unmapped".into(), json!(report.kept_unmapped));
        metadata.insert("overridden".into(), json!(report.overridden));
        if !moves.is_empty() {
            metadata.insert("moved".into(), Value::Array(moves));
        }
        if parked > 0 {
            metadata.insert("parked_events".into(), json!(parked));
        }
        tx.append_audit(
            NewAuditRecord {
                tenant_id: String::new(),
                actor: SEED_ACTOR.to_owned(),
                event: "tenant.mappings_seeded".to_owned(),
                outcome: "applied".to_owned(),
                metadata: audit::bound_metadata(metadata),
            },
            now_ms,
        )?;
    }
    for customer in with_parked {
        report.parked_applied += parking::apply_parked(tx, rules, parking, customer, None, now_ms)?;
    }
    Ok(report)
}

/// The actor of changes made from the sidecar's configuration.
pub const SEED_ACTOR: &str = "config";

/// Appends `record` once per idempotency key: a retry of the same record answers the record
/// the first call appended (its answer may have been lost on the way), a different record
/// under a used key is refused rather than silently answered with someone else's record.
pub fn append_once(
    tx: &mut dyn StoreTx,
    record: NewAuditRecord,
    key: &str,
    now_ms: i64,
) -> Result<audit::AuditRecord, Error> {
    // Remembered in the webhook deduplication table, under a prefix no event may have, so
    // keys share its bounds and its retention. Keys are the tenant's own: another tenant's
    // use of the same key neither blocks this one nor learns anything from it (the length
    // keeps `a:b` + `c` apart from `a` + `b:c`).
    let id = format!(
        "{}append:{}:{}:{key}",
        crate::stripe::event::RESERVED_ID_PREFIX,
        record.tenant_id.len(),
        record.tenant_id
    );
    if let Some(first) = tx.processed_event(&id)? {
        let stored = tx.audit_record(first.audit_seq)?.ok_or_else(|| {
            Error::Internal(format!(
                "idempotency key names audit record {}, which is missing",
                first.audit_seq
            ))
        })?;
        // Metadata is compared canonically: a number read back may differ in representation
        // (1 and 1.0) while hashing identically.
        let same = stored.tenant_id == record.tenant_id
            && stored.actor == record.actor
            && stored.event == record.event
            && stored.outcome == record.outcome
            && serde_jcs::to_vec(&stored.metadata).ok() == serde_jcs::to_vec(&record.metadata).ok();
        return if same {
            Ok(stored)
        } else {
            Err(Error::IdempotencyKeyReused {
                key: key.to_owned(),
            })
        };
    }
    let tenant_id = record.tenant_id.clone();
    let sealed = tx.append_audit(record, now_ms)?;
    tx.record_processed(
        &crate::store::ProcessedEvent {
            event_id: id,
            event_type: "audit.append".to_owned(),
            tenant_id,
            outcome: crate::store::Outcome::Applied,
            audit_seq: sealed.seq,
        },
        now_ms,
    )?;
    Ok(sealed)
}

pub fn verify_chain(tx: &mut dyn StoreTx) -> Result<VerifyReport, Error> {
    let mut verifier = ChainVerifier::default();
    tx.scan_audit(1, &mut |row| verifier.feed(&row))?;
    Ok(verifier.finish())
}

#[cfg(test)]
mod lifecycle_tests;
#[cfg(test)]
mod tests;
