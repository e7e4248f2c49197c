//! Why a tenant's flag has its value, read back from the audit trail: the record of the event
//! or admin change that set it, the rule that mapped the event, and the later deliveries that
//! were stale for it.

use serde_json::{Map, Value};

use crate::audit::AuditRecord;
use crate::flags::{Flag, FlagRecord};
use crate::problem::Error;
use crate::store::{AuditQuery, StoreTx};

/// The most stale deliveries an explanation lists: the latest ones.
pub const STALE_SHOWN: usize = 20;

/// The audit event of an admin's `SetFlag`.
const FLAG_SET_EVENT: &str = "flag.set";
/// Every Stripe delivery's audit event starts so (see `audit_event_name`).
const BILLING_EVENT_PREFIX: &str = "billing.";

#[derive(Debug, Clone, PartialEq)]
pub struct Explanation {
    pub flag: Flag,
    pub set_by: Option<SetBy>,
    /// The rule that mapped the setting event to this flag, when its record names it.
    pub rule: Option<String>,
    /// The event of the flag's order mark when it is not the setter: only a newer event changes
    /// the flag, and the stale deliveries are older than it (see `ExplainFlagResponse`).
    pub newest: Option<EventTrace>,
    /// Oldest first, at most [`STALE_SHOWN`].
    pub stale: Vec<EventTrace>,
    /// The audit records searched for stale deliveries: `(from, through]`.
    pub searched_from_seq: u64,
    pub searched_through_seq: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum SetBy {
    Event(EventTrace),
    Admin(AdminTrace),
}

/// A Stripe event as its delivery's audit record tells it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct EventTrace {
    pub event_id: String,
    pub event_type: String,
    /// The event's `created`; 0 when its record was not found.
    pub created: i64,
    /// 0 when no record was found.
    pub audit_seq: u64,
    pub received_at_ms: i64,
    pub actor: String,
    pub reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AdminTrace {
    pub actor: String,
    pub reason: Option<String>,
    pub at_ms: i64,
    pub version: u64,
    /// 0 when its record lies outside the searched window.
    pub audit_seq: u64,
}

/// Explains `current` (the flag as the cache answers it, which names the catalog default when
/// the tenant never had the flag) from the store: at most `window` of the newest audit records
/// are searched, through a tenant's index, so the work is bounded however long the chain.
pub fn explain_flag(
    tx: &mut dyn StoreTx,
    current: Flag,
    window: u64,
) -> Result<Explanation, Error> {
    let Some(record) = tx.flag(current.tenant_id(), current.key())? else {
        return Ok(Explanation {
            flag: current,
            set_by: None,
            rule: None,
            newest: None,
            stale: Vec::new(),
            searched_from_seq: 0,
            searched_through_seq: 0,
        });
    };
    let head = tx.audit_head()?.seq;
    let oldest_searched = head.saturating_sub(window);
    let (set_by, rule) = if record.source_event_id.is_empty() {
        let admin = admin_change(tx, &record, oldest_searched, head)?;
        (SetBy::Admin(admin), None)
    } else {
        let (trace, rule) = setting_event(tx, &record)?;
        (SetBy::Event(trace), rule)
    };
    let setter_seq = match &set_by {
        SetBy::Event(trace) => trace.audit_seq,
        SetBy::Admin(admin) => admin.audit_seq,
    };
    let mark = &record.order.event_id;
    let newest = if mark.is_empty() || *mark == record.source_event_id {
        None
    } else {
        let unrecorded = EventTrace {
            event_id: mark.clone(),
            ..EventTrace::default()
        };
        Some(delivered_event(tx, &record.key, unrecorded)?.0)
    };
    let searched_from_seq = setter_seq.max(oldest_searched);
    let stale = stale_deliveries(tx, &record, searched_from_seq, head, window)?;
    Ok(Explanation {
        flag: Flag::Set(record),
        set_by: Some(set_by),
        rule,
        newest,
        stale,
        searched_from_seq,
        searched_through_seq: head,
    })
}

/// The setting event's delivery record, found through the processed-events table, and the
/// rule it names for this flag.
fn setting_event(
    tx: &mut dyn StoreTx,
    flag: &FlagRecord,
) -> Result<(EventTrace, Option<String>), Error> {
    let unrecorded = EventTrace {
        event_id: flag.source_event_id.clone(),
        actor: flag.updated_by.clone(),
        received_at_ms: flag.updated_at_ms,
        ..EventTrace::default()
    };
    delivered_event(tx, &flag.key, unrecorded)
}

/// An event's delivery record and the rule it names for `key`; `unrecorded` (which names the
/// event) is what is known when the record is not found.
fn delivered_event(
    tx: &mut dyn StoreTx,
    key: &str,
    unrecorded: EventTrace,
) -> Result<(EventTrace, Option<String>), Error> {
    let Some(processed) = tx.processed_event(&unrecorded.event_id)? else {
        return Ok((unrecorded, None));
    };
    let Some(record) = tx.audit_record(processed.audit_seq)? else {
        let trace = EventTrace {
            event_type: processed.event_type,
            ..unrecorded
        };
        return Ok((trace, None));
    };
    let rule = record
        .metadata
        .get("rules")
        .and_then(|rules| rules.get(key))
        .and_then(Value::as_str)
        .map(str::to_owned);
    Ok((event_trace(&record), rule))
}

fn event_trace(record: &AuditRecord) -> EventTrace {
    let text = |field: &str| text(&record.metadata, field);
    EventTrace {
        event_id: text("event_id").unwrap_or_default(),
        event_type: text("event_type").unwrap_or_default(),
        created: record
            .metadata
            .get("created")
            .and_then(Value::as_i64)
            .unwrap_or_default(),
        audit_seq: record.seq,
        received_at_ms: record.time_ms,
        actor: record.actor.clone(),
        reason: text("reason"),
    }
}

fn text(metadata: &Map<String, Value>, field: &str) -> Option<String> {
    metadata
        .get(field)
        .and_then(Value::as_str)
        .map(str::to_owned)
}

/// The admin's `flag.set` record that wrote this version: same tenant, same millisecond.
fn admin_change(
    tx: &mut dyn StoreTx,
    flag: &FlagRecord,
    after_seq: u64,
    through_seq: u64,
) -> Result<AdminTrace, Error> {
    let query = AuditQuery {
        tenant_id: Some(flag.tenant_id.clone()),
        event_prefix: Some(FLAG_SET_EVENT.to_owned()),
        since_ms: Some(flag.updated_at_ms),
        until_ms: Some(flag.updated_at_ms.saturating_add(1)),
        after_seq,
        through_seq,
        limit: u32::MAX,
        ..AuditQuery::default()
    };
    let record = tx.query_audit(&query)?.into_iter().find(|r| {
        r.event == FLAG_SET_EVENT
            && r.metadata.get("flag").and_then(Value::as_str) == Some(flag.key.as_str())
            && r.metadata.get("version").and_then(Value::as_u64) == Some(flag.version)
    });
    Ok(AdminTrace {
        actor: flag.updated_by.clone(),
        reason: record.as_ref().and_then(|r| text(&r.metadata, "reason")),
        at_ms: flag.updated_at_ms,
        version: flag.version,
        audit_seq: record.map_or(0, |r| r.seq),
    })
}

/// Deliveries for this tenant after the setter's record whose `stale_flags` name the flag: the
/// latest [`STALE_SHOWN`], oldest first.
fn stale_deliveries(
    tx: &mut dyn StoreTx,
    flag: &FlagRecord,
    after_seq: u64,
    through_seq: u64,
    window: u64,
) -> Result<Vec<EventTrace>, Error> {
    let query = AuditQuery {
        tenant_id: Some(flag.tenant_id.clone()),
        event_prefix: Some(BILLING_EVENT_PREFIX.to_owned()),
        // A setter whose record was not found still bounds the search by its time.
        since_ms: Some(flag.updated_at_ms),
        after_seq,
        through_seq,
        limit: u32::try_from(window).unwrap_or(u32::MAX),
        ..AuditQuery::default()
    };
    let mut stale: Vec<EventTrace> = tx
        .query_audit(&query)?
        .iter()
        .filter(|r| {
            r.metadata
                .get("stale_flags")
                .and_then(Value::as_array)
                .is_some_and(|keys| keys.iter().any(|k| k.as_str() == Some(flag.key.as_str())))
        })
        .map(event_trace)
        .collect();
    let surplus = stale.len().saturating_sub(STALE_SHOWN);
    stale.drain(..surplus);
    Ok(stale)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use serde_json::json;

    use super::*;
    use crate::audit::NewAuditRecord;
    use crate::feeds::Feeds;
    use crate::flags::{FlagCache, FlagOrigin, FlagValue};
    use crate::ops::{Delivery, apply_webhook};
    use crate::rules::Rules;
    use crate::store::{Outcome, ProcessedEvent, Store, StoreUrl};
    use crate::stripe::StripeEvent;

    const NOW_MS: i64 = 1_700_000_000_000;

    fn store() -> (Store, Arc<FlagCache>) {
        let rules = Rules::built_in().expect("built-in rules");
        let cache = Arc::new(FlagCache::new(rules.catalog().clone()));
        let feeds = Arc::new(Feeds::new(cache.clone()));
        let store = Store::open(&StoreUrl::Memory, None, feeds, cache.clone()).expect("store");
        (store, cache)
    }

    fn invoice(id: &str, event_type: &str, created: i64) -> StripeEvent {
        let body = json!({"id": id, "type": event_type, "created": created,
            "data": {"object": {"metadata": {"tenant_id": "acme"}}}});
        StripeEvent::parse(body.to_string().as_bytes(), created).expect("an event")
    }

    async fn deliver(store: &Store, event: StripeEvent) -> Outcome {
        let rules = Rules::built_in().expect("built-in rules");
        store
            .write(move |tx| {
                apply_webhook(
                    tx,
                    &rules,
                    crate::ops::ParkingLimits::DEFAULT,
                    &event,
                    &Delivery::replay("test", None),
                    NOW_MS,
                )
            })
            .await
            .expect("committed")
            .expect("acknowledged")
            .outcome
    }

    async fn explain(store: &Store, cache: &FlagCache, window: u64) -> Explanation {
        let current = cache.get("acme", "pro_features").expect("a catalog flag");
        store
            .read(move |tx| explain_flag(tx, current, window))
            .await
            .expect("explained")
    }

    #[tokio::test]
    async fn lists_the_latest_stale_deliveries_within_the_window() {
        let (store, cache) = store();
        assert_eq!(
            deliver(&store, invoice("evt_setter", "invoice.paid", 1_000)).await,
            Outcome::Applied
        );
        for n in 0..25 {
            let late = invoice(&format!("evt_late_{n}"), "invoice.payment_failed", 100 + n);
            assert_eq!(deliver(&store, late).await, Outcome::Stale);
        }
        let explained = explain(&store, &cache, 10_000).await;
        let Some(SetBy::Event(setter)) = &explained.set_by else {
            panic!("set by an event: {explained:?}");
        };
        assert_eq!(
            (setter.event_id.as_str(), setter.audit_seq),
            ("evt_setter", 1)
        );
        assert_eq!(setter.reason.as_deref(), Some("test"));
        let stale: Vec<&str> = explained
            .stale
            .iter()
            .map(|e| e.event_id.as_str())
            .collect();
        let latest: Vec<String> = (5..25).map(|n| format!("evt_late_{n}")).collect();
        assert_eq!(stale, latest);
        assert_eq!(
            (explained.searched_from_seq, explained.searched_through_seq),
            (1, 26)
        );

        // A window of the newest 4 records: the setter lies before it, the search starts there.
        let bounded = explain(&store, &cache, 4).await;
        let stale: Vec<&str> = bounded.stale.iter().map(|e| e.event_id.as_str()).collect();
        assert_eq!(
            stale,
            ["evt_late_21", "evt_late_22", "evt_late_23", "evt_late_24"]
        );
        assert_eq!(bounded.searched_from_seq, 22);
    }

    #[tokio::test]
    async fn the_rule_comes_from_the_setting_record_and_is_unknown_without_one() {
        let (store, cache) = store();
        deliver(&store, invoice("evt_plain", "invoice.paid", 1_000)).await;
        assert_eq!(
            explain(&store, &cache, 100).await.rule.as_deref(),
            Some("invoice paid")
        );

        // A record written before applied webhooks named their rules.
        store
            .write(|tx| {
                let mut metadata = Map::new();
                metadata.insert("event_id".into(), json!("evt_ruled"));
                metadata.insert("event_type".into(), json!("invoice.paid"));
                metadata.insert("created".into(), json!(2_000));
                let record = tx.append_audit(
                    NewAuditRecord {
                        tenant_id: "acme".into(),
                        actor: "stripe-webhook".into(),
                        event: "billing.invoice.paid".into(),
                        outcome: "applied".into(),
                        metadata,
                    },
                    NOW_MS,
                )?;
                tx.record_processed(
                    &ProcessedEvent {
                        event_id: "evt_ruled".into(),
                        event_type: "invoice.paid".into(),
                        tenant_id: "acme".into(),
                        outcome: Outcome::Applied,
                        audit_seq: record.seq,
                    },
                    NOW_MS,
                )?;
                tx.write_flag(FlagRecord {
                    tenant_id: "acme".into(),
                    key: "pro_features".into(),
                    value: FlagValue::Bool(true),
                    version: 0,
                    order: crate::stripe::EventOrder {
                        created: 2_000,
                        rank: 20,
                        event_id: "evt_ruled".into(),
                    },
                    origin: FlagOrigin::Rule,
                    updated_at_ms: NOW_MS,
                    updated_by: "stripe-webhook".into(),
                    source_event_id: "evt_ruled".into(),
                })?;
                Ok(())
            })
            .await
            .expect("written");
        let explained = explain(&store, &cache, 100).await;
        assert_eq!(explained.rule, None);
        let Some(SetBy::Event(setter)) = &explained.set_by else {
            panic!("set by an event: {explained:?}");
        };
        assert_eq!(
            (setter.event_id.as_str(), setter.created),
            ("evt_ruled", 2_000)
        );
    }
}
