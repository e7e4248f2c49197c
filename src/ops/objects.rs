//! Billing objects: what an event's effect becomes once the tenant's other events of the same
//! object kind are taken into account, so that the final flags are a function of the set of
//! events delivered, whatever their order.
//!
//! Why the result is a function of the set. Every flag write carries an order mark and is
//! made only when that mark is at least the flag's (see `webhook::apply`), so each flag ends
//! with the value of the write with the greatest mark. The writes are of three kinds:
//! - an event that is neither a subscription nor an entitlement summary writes its own
//!   settings at its own order (depends on the event alone);
//! - subscription events (`subscription:<id>` objects): per subscription, the greatest event
//!   wins (older ones are STALE as a whole); the subscription-derived flags are then a pure
//!   function of the set of subscription rows (per key, the setting of the best row that sets
//!   it: highest standing, then greatest order), written at mark A = the greatest order of
//!   all rows. Rows and A only move forward, and the last non-stale subscription event sees
//!   the final rows, so the last aggregate write is (A_final, aggregate_final) whatever the
//!   delivery order; earlier aggregate writes carry marks ≤ A_final and lose to it. A is some
//!   subscription event's order, and orders include the event id, so no other event writes
//!   at the same mark: "≥" lets the aggregate rewrite at an unchanged A (an older
//!   subscription's event changed which row is best) without ever tying with another kind;
//! - entitlement summaries (the `entitlements` object): each key any summary ever named ends
//!   with the newest summary N's verdict (on iff N names it) at N's order: a newer summary
//!   writes every known key at its order, and a key first named by a summary older than N
//!   gets an explicit off at N's order.
//!
//! So per flag the final value is the one of the greatest mark among {the non-object events
//! touching it, (A_final, aggregate_final), (N_final, N's verdict)}: a function of the set.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::flags::{FlagOrigin, FlagValue};
use crate::problem::Error;
use crate::rules::{Effect, Rules, Setting};
use crate::store::{BillingObject, StoreTx};
use crate::stripe::{EventOrder, SUBSCRIPTION_STATE_EVENTS, StripeEvent};

/// The billing object an active entitlement summary describes whole.
pub const ENTITLEMENTS_OBJECT: &str = "entitlements";
pub const ENTITLEMENTS_KIND: &str = "entitlements";
/// The kind of the `subscription:<id>` objects.
pub const SUBSCRIPTION_KIND: &str = "subscription";
/// Subscription ids longer than this are cut: Stripe's are about 30 characters.
const MAX_OBJECT_ID_LEN: usize = 255;
/// The rule named for a key that some subscription once set and none sets now.
const NO_SUBSCRIPTION_SETS_IT: &str = "catalog default (no subscription sets it)";

/// One flag write an event's effect asks for: compared with the flag's order mark by
/// `order` (written when `order` ≥ the flag's), not by the event's own order.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Wanted {
    pub key: String,
    pub value: FlagValue,
    pub origin: FlagOrigin,
    pub rule: String,
    pub order: EventOrder,
}

/// What an event asks of the tenant's flags.
#[derive(Debug, Default)]
pub(super) struct Resolution {
    pub wanted: Vec<Wanted>,
    /// The event is older than its object's newest event: the object and that event's id,
    /// and the keys the event would have set.
    pub stale: Option<StaleObject>,
}

#[derive(Debug)]
pub(super) struct StaleObject {
    pub object: String,
    pub newer_event_id: String,
    pub keys: Vec<String>,
}

/// How much a subscription in this status entitles its customer: of a tenant's
/// subscriptions, the one in the best standing decides each flag it sets (then the newest).
/// A domain policy, not a rule: paying beats owing, owing beats paused, paused beats over.
pub fn subscription_standing(status: Option<&str>) -> i64 {
    match status {
        Some("active" | "trialing") => 3,
        Some("past_due" | "unpaid" | "incomplete") => 2,
        Some("paused") => 1,
        _ => 0,
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredSetting {
    key: String,
    /// [`FlagValue::to_stored`].
    value: String,
    rule: String,
}

/// A subscription's row: what its newest event's rules set, and every key any of its
/// events (stale ones included) ever set.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SubscriptionState {
    status: Option<String>,
    standing: i64,
    settings: Vec<StoredSetting>,
    keys: BTreeSet<String>,
}

/// The newest summary's keys and every key any summary of the tenant named.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct EntitlementsState {
    keys: BTreeSet<String>,
    known: BTreeSet<String>,
}

fn corrupt(object: &str, e: impl std::fmt::Display) -> Error {
    crate::store::StoreError::Corrupt(format!("billing object {object}: {e}")).into()
}

fn to_json<T: Serialize>(object: &str, state: &T) -> Result<String, Error> {
    serde_json::to_string(state).map_err(|e| corrupt(object, e))
}

fn from_json<T: for<'de> Deserialize<'de>>(object: &BillingObject) -> Result<T, Error> {
    serde_json::from_str(&object.state).map_err(|e| corrupt(&object.object, e))
}

/// The flag writes `effect` (the rules' verdict on `event`) asks of `tenant`, after the
/// event's billing object, if it has one, has taken it in.
pub(super) fn resolve(
    tx: &mut dyn StoreTx,
    rules: &Rules,
    tenant: &str,
    event: &StripeEvent,
    effect: Effect,
) -> Result<Resolution, Error> {
    let order = event.order();
    match effect {
        Effect::Ignored => Ok(Resolution::default()),
        Effect::Entitlements { keys, rule } => entitlements(tx, tenant, order, keys, &rule),
        Effect::Set(settings) if SUBSCRIPTION_STATE_EVENTS.contains(&event.event_type.as_str()) => {
            subscription(tx, rules, tenant, event, order, settings)
        }
        Effect::Set(settings) => Ok(Resolution {
            wanted: settings
                .into_iter()
                .map(|s| Wanted {
                    key: s.key,
                    value: s.value,
                    origin: FlagOrigin::Rule,
                    rule: s.rule,
                    order: order.clone(),
                })
                .collect(),
            stale: None,
        }),
    }
}

fn entitlements(
    tx: &mut dyn StoreTx,
    tenant: &str,
    order: EventOrder,
    keys: Vec<String>,
    rule: &str,
) -> Result<Resolution, Error> {
    let stored = tx.billing_object(tenant, ENTITLEMENTS_OBJECT)?;
    let mut state: EntitlementsState = match &stored {
        Some(object) => from_json(object)?,
        None => EntitlementsState::default(),
    };
    let keys: BTreeSet<String> = keys.into_iter().collect();
    let mut first_named = Vec::new();
    // No cap on the keys remembered: a key left out would keep whichever verdict its order
    // of arrival gave it. Keys come from verified summaries only (each within the body limit).
    for key in &keys {
        if state.known.insert(key.clone()) {
            first_named.push(key.clone());
        }
    }
    let verdict = |key: &str, on: bool, order: &EventOrder| Wanted {
        key: key.to_owned(),
        value: FlagValue::Bool(on),
        origin: FlagOrigin::Entitlements,
        rule: rule.to_owned(),
        order: order.clone(),
    };
    match stored {
        Some(newest) if newest.order > order => {
            // Stale as a whole; but the newest summary does not name a key only this one
            // named, so the newest summary's verdict on it is off, at its order.
            let wanted = first_named
                .iter()
                .map(|key| verdict(key, false, &newest.order))
                .collect();
            if !first_named.is_empty() {
                let state = to_json(ENTITLEMENTS_OBJECT, &state)?;
                tx.write_billing_object(
                    tenant,
                    ENTITLEMENTS_KIND,
                    &BillingObject {
                        state,
                        ..newest.clone()
                    },
                )?;
            }
            Ok(Resolution {
                wanted,
                stale: Some(StaleObject {
                    object: ENTITLEMENTS_OBJECT.to_owned(),
                    newer_event_id: newest.order.event_id,
                    keys: keys.into_iter().collect(),
                }),
            })
        }
        _ => {
            let wanted = state
                .known
                .iter()
                .map(|key| verdict(key, keys.contains(key), &order))
                .collect();
            state.keys = keys;
            tx.write_billing_object(
                tenant,
                ENTITLEMENTS_KIND,
                &BillingObject {
                    object: ENTITLEMENTS_OBJECT.to_owned(),
                    order,
                    state: to_json(ENTITLEMENTS_OBJECT, &state)?,
                },
            )?;
            Ok(Resolution {
                wanted,
                stale: None,
            })
        }
    }
}

fn subscription(
    tx: &mut dyn StoreTx,
    rules: &Rules,
    tenant: &str,
    event: &StripeEvent,
    order: EventOrder,
    settings: Vec<Setting>,
) -> Result<Resolution, Error> {
    let id: String = event
        .object_str("id")
        .unwrap_or_default()
        .chars()
        .take(MAX_OBJECT_ID_LEN)
        .collect();
    let object = format!("{SUBSCRIPTION_KIND}:{id}");
    let stored = tx.billing_object(tenant, &object)?;
    let mut keys: BTreeSet<String> = match &stored {
        Some(row) => from_json::<SubscriptionState>(row)?.keys,
        None => BTreeSet::new(),
    };
    let before = keys.len();
    keys.extend(settings.iter().map(|s| s.key.clone()));
    let keys_grew = keys.len() > before;
    let stale = match stored {
        Some(newest) if newest.order > order => {
            // Stale as a whole; only the keys it sets join the subscription's.
            if keys_grew {
                let mut state: SubscriptionState = from_json(&newest)?;
                state.keys = keys;
                let state = to_json(&object, &state)?;
                tx.write_billing_object(
                    tenant,
                    SUBSCRIPTION_KIND,
                    &BillingObject {
                        state,
                        ..newest.clone()
                    },
                )?;
            }
            Some(StaleObject {
                object,
                newer_event_id: newest.order.event_id,
                keys: settings.into_iter().map(|s| s.key).collect(),
            })
        }
        _ => {
            let status = event.subscription_status().map(str::to_owned);
            let state = SubscriptionState {
                standing: subscription_standing(status.as_deref()),
                status,
                settings: settings
                    .into_iter()
                    .map(|s| StoredSetting {
                        key: s.key,
                        value: s.value.to_stored(),
                        rule: s.rule,
                    })
                    .collect(),
                keys,
            };
            tx.write_billing_object(
                tenant,
                SUBSCRIPTION_KIND,
                &BillingObject {
                    state: to_json(&object, &state)?,
                    object,
                    order,
                },
            )?;
            None
        }
    };
    // The rows are unchanged after a stale event that brought no new key: recomputing would
    // only undo an admin's SetFlag made since, which the event is older than.
    let wanted = if stale.is_none() || keys_grew {
        subscription_flags(tx, rules, tenant)?
    } else {
        Vec::new()
    };
    Ok(Resolution { wanted, stale })
}

/// The tenant's subscription-derived flags, a pure function of its subscription rows: per
/// key, the setting of the best row that sets it (highest standing, then greatest order),
/// or the catalog default for a key some event of a row once set and no row sets now; all
/// at the greatest order of the rows.
fn subscription_flags(
    tx: &mut dyn StoreTx,
    rules: &Rules,
    tenant: &str,
) -> Result<Vec<Wanted>, Error> {
    // Every row, not the newest few: a row left out would leave the keys only it sets to
    // whichever order delivered it. Rows come from verified Stripe events only, one per
    // subscription the customer ever had, so the work is linear in that (small) number.
    let rows = tx.billing_objects_of_kind(tenant, SUBSCRIPTION_KIND)?;
    let Some(mark) = rows.iter().map(|row| row.order.clone()).max() else {
        return Ok(Vec::new());
    };
    let mut best: BTreeMap<String, ((i64, EventOrder), FlagValue, String)> = BTreeMap::new();
    let mut keys = BTreeSet::new();
    for row in &rows {
        let state: SubscriptionState = from_json(row)?;
        keys.extend(state.keys);
        let standing = (state.standing, row.order.clone());
        for setting in state.settings {
            let value =
                FlagValue::from_stored(&setting.value).map_err(|e| corrupt(&row.object, e))?;
            if best
                .get(&setting.key)
                .is_none_or(|(current, _, _)| *current < standing)
            {
                best.insert(setting.key, (standing.clone(), value, setting.rule));
            }
        }
    }
    Ok(keys
        .into_iter()
        .filter_map(|key| {
            let (value, rule) = match best.remove(&key) {
                Some((_, value, rule)) => (value, rule),
                None => (
                    rules.catalog().get(&key)?.clone(),
                    NO_SUBSCRIPTION_SETS_IT.to_owned(),
                ),
            };
            Some(Wanted {
                key,
                value,
                origin: FlagOrigin::Rule,
                rule,
                order: mark.clone(),
            })
        })
        .collect())
}
