//! Realistic Stripe subscription histories, and the order-independence check over them (issue
//! 10, point 2): every history is delivered in its chronological order and in shuffled orders
//! with redeliveries, through the real webhook path on an in-memory SQLite store; every order
//! must end in the same flags, and a history ending in a subscription event must end in the
//! lifecycle table's state for that event's status and plan.
//!
//! Shared by the property test (`tests/billing_lifecycle.rs`, a fixed seed, bounded) and the
//! benchmark's `--lifecycle-histories N` (a bigger run); not part of the sidecar.

use std::collections::BTreeMap;
use std::sync::Arc;

use coresdk::feeds::Feeds;
use coresdk::flags::{FlagCache, FlagValue};
use coresdk::ops::{Delivery, ParkingLimits, apply_webhook};
use coresdk::rules::Rules;
use coresdk::store::{Store, StoreUrl};
use coresdk::stripe::StripeEvent;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

pub const FLAGS: [&str; 3] = ["pro_features", "paywall_active", "advanced_analytics"];
const PLANS: [&str; 3] = ["basic_monthly", "pro_monthly", "enterprise_annual"];

/// One event of a history, before a delivery run gives it its id prefix and tenant.
#[derive(Debug, Clone)]
pub struct HistoryEvent {
    /// Random, like Stripe's: equal-second ties are then broken in no particular favour.
    pub id_suffix: String,
    pub event_type: &'static str,
    pub created: i64,
    pub object: Value,
    pub previous_attributes: Option<Value>,
}

/// A history in the order Stripe produced it, and the subscription state its last event
/// leaves when that event is a subscription event.
#[derive(Debug, Clone)]
pub struct History {
    pub events: Vec<HistoryEvent>,
    pub ends_in: Option<(String, String)>,
}

struct Generator<'a> {
    rng: &'a mut StdRng,
    events: Vec<HistoryEvent>,
    t: i64,
    subscription: u32,
    status: &'static str,
    plan: &'static str,
}

impl Generator<'_> {
    fn id(&mut self) -> String {
        const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
        (0..14)
            .map(|_| char::from(ALPHABET[self.rng.gen_range(0..ALPHABET.len())]))
            .collect()
    }

    fn pick(&mut self, options: &[&'static str]) -> &'static str {
        options[self.rng.gen_range(0..options.len())]
    }

    fn push(&mut self, event_type: &'static str, object: Value, previous: Option<Value>) {
        let id_suffix = self.id();
        self.events.push(HistoryEvent {
            id_suffix,
            event_type,
            created: self.t,
            object,
            previous_attributes: previous,
        });
    }

    fn subscription_object(&self) -> Value {
        json!({
            "id": format!("sub_{}", self.subscription),
            "object": "subscription",
            "status": self.status,
            "items": {"data": [{"price": {"lookup_key": self.plan}}]},
        })
    }

    /// A subscription event for the current state; `was` is the status before, when it changed.
    fn subscription(&mut self, event_type: &'static str, was: Option<&str>) {
        let object = self.subscription_object();
        let previous = was.map(|status| json!({"status": status}));
        self.push(event_type, object, previous);
    }

    fn invoice(&mut self, event_type: &'static str) {
        let object = json!({
            "id": format!("in_{}", self.id()),
            "object": "invoice",
            "subscription": format!("sub_{}", self.subscription),
        });
        self.push(event_type, object, None);
    }

    /// Moves to `status`: the subscription update Stripe sends, with what it sends in the
    /// same second (the invoice that caused it, the pause or resume event, the deletion).
    fn transition(&mut self, status: &'static str) {
        let was = std::mem::replace(&mut self.status, status);
        match status {
            "active" if was == "paused" => {
                self.subscription("customer.subscription.resumed", None);
                self.subscription("customer.subscription.updated", Some(was));
                self.either_order();
            }
            "paused" => {
                self.subscription("customer.subscription.paused", None);
                self.subscription("customer.subscription.updated", Some(was));
                self.either_order();
            }
            "active" => {
                self.invoice("invoice.paid");
                self.subscription("customer.subscription.updated", Some(was));
            }
            "past_due" => {
                self.invoice("invoice.payment_failed");
                self.subscription("customer.subscription.updated", Some(was));
            }
            // When the last dunning retry fails and the settings cancel the subscription,
            // the failure, the update and the deletion share a second and disagree about the
            // paywall.
            "canceled" => {
                if was == "past_due" && self.rng.gen_bool(0.5) {
                    self.invoice("invoice.payment_failed");
                }
                self.subscription("customer.subscription.updated", Some(was));
                self.subscription("customer.subscription.deleted", None);
            }
            _ => self.subscription("customer.subscription.updated", Some(was)),
        }
    }

    /// Stripe sends the last two events (same second, same resulting state) in no fixed order.
    fn either_order(&mut self) {
        let n = self.events.len();
        if n >= 2 && self.rng.gen_bool(0.5) {
            self.events.swap(n - 1, n - 2);
        }
    }

    /// A new subscription: created (with the first invoice's outcome in the same second).
    fn start_subscription(&mut self) {
        self.status = self.pick(&["trialing", "active", "incomplete", "paid_at_once"]);
        self.plan = self.pick(&PLANS);
        if self.status == "paid_at_once" {
            // Created incomplete, its first invoice paid and the subscription active, all in
            // the same second: the three disagree about the flags.
            self.status = "incomplete";
            self.subscription("customer.subscription.created", None);
            self.transition("active");
            return;
        }
        self.subscription("customer.subscription.created", None);
        match self.status {
            "active" => self.invoice("invoice.paid"),
            "incomplete" if self.rng.gen_bool(0.5) => self.invoice("invoice.payment_failed"),
            _ => {}
        }
    }
}

/// A random, realistic history of one customer starting at `start` (Unix seconds).
pub fn history(rng: &mut StdRng, start: i64) -> History {
    let mut g = Generator {
        rng,
        events: Vec::new(),
        t: start,
        subscription: 1,
        status: "incomplete",
        plan: "basic_monthly",
    };
    g.start_subscription();
    let steps = g.rng.gen_range(1..12);
    for _ in 0..steps {
        g.t += g.rng.gen_range(1..=3);
        let next: &'static str = match g.status {
            "incomplete" => g.pick(&["active", "incomplete_expired"]),
            "trialing" => g.pick(&["active", "past_due", "canceled", "plan"]),
            "active" => g.pick(&["renewal", "plan", "past_due", "paused", "canceled"]),
            "past_due" => g.pick(&["active", "retry_failed", "unpaid", "canceled"]),
            "unpaid" => g.pick(&["active", "canceled"]),
            "paused" => g.pick(&["active", "canceled"]),
            // Over: the customer may subscribe again, to a new subscription.
            _ if g.rng.gen_bool(0.3) => "resubscribe",
            _ => break,
        };
        match next {
            "renewal" => g.invoice("invoice.paid"),
            "retry_failed" => g.invoice("invoice.payment_failed"),
            "plan" => {
                let was = g.plan;
                g.plan = g.pick(&PLANS);
                let object = g.subscription_object();
                g.push(
                    "customer.subscription.updated",
                    object,
                    Some(json!({"items": {"data": [{"price": {"lookup_key": was}}]}})),
                );
            }
            "resubscribe" => {
                g.subscription += 1;
                g.start_subscription();
            }
            status => g.transition(status),
        }
    }
    let ends_in = g.events.last().and_then(|last| {
        let status = if last.event_type == "customer.subscription.deleted" {
            "canceled"
        } else {
            last.event_type
                .starts_with("customer.subscription.")
                .then(|| last.object["status"].as_str())
                .flatten()?
        };
        let plan = last.object["items"]["data"][0]["price"]["lookup_key"].as_str()?;
        Some((status.to_owned(), plan.to_owned()))
    });
    History {
        events: g.events,
        ends_in,
    }
}

/// The lifecycle table (README, rules/default.toml): the flags a subscription in `status` on
/// `plan` has.
pub fn table_state(status: &str, plan: &str) -> BTreeMap<&'static str, bool> {
    let paid_plan = plan.contains("pro") || plan.contains("enterprise");
    let (pro, paywall, analytics) = match status {
        "active" | "trialing" => (true, false, paid_plan),
        "past_due" | "unpaid" | "incomplete" => (false, true, false),
        _ => (false, false, false),
    };
    BTreeMap::from([
        ("pro_features", pro),
        ("paywall_active", paywall),
        ("advanced_analytics", analytics),
    ])
}

/// What the check found.
#[derive(Debug, Default)]
pub struct Report {
    pub histories: usize,
    /// Delivery runs: the chronological one and the shuffled ones, per history.
    pub deliveries: usize,
    pub events_delivered: usize,
    pub ending_in_a_subscription_event: usize,
    /// Human-readable descriptions of every divergence (empty when all orders agree).
    pub divergences: Vec<String>,
}

type Flags = BTreeMap<&'static str, Option<FlagValue>>;

/// Generates `histories` histories from `seed` and delivers each chronologically and in
/// `shuffled_orders` random orders, each with a few redeliveries.
pub async fn check(seed: u64, histories: usize, shuffled_orders: usize) -> Report {
    let rules = Arc::new(Rules::built_in().expect("built-in rules"));
    let cache = Arc::new(FlagCache::new(rules.catalog().clone()));
    let feeds = Arc::new(Feeds::new(cache.clone()));
    let store = Store::open(&StoreUrl::Memory, None, feeds, cache).expect("memory store");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut report = Report::default();
    for h in 0..histories {
        let history = history(&mut rng, 1_700_000_000 + 100_000 * h as i64);
        let mut orders = vec![history.events.clone()];
        for _ in 0..shuffled_orders {
            let mut order = history.events.clone();
            order.shuffle(&mut rng);
            for _ in 0..rng.gen_range(0..=3) {
                let again = order[rng.gen_range(0..order.len())].clone();
                order.insert(rng.gen_range(0..=order.len()), again);
            }
            orders.push(order);
        }
        let mut chronological: Option<Flags> = None;
        for (o, order) in orders.into_iter().enumerate() {
            report.deliveries += 1;
            report.events_delivered += order.len();
            let tenant = format!("h{h}-o{o}");
            let shown: Vec<String> = order
                .iter()
                .map(|e| format!("{}@{}({})", e.event_type, e.created, e.object["status"]))
                .collect();
            let flags = deliver(&store, &rules, &tenant, order).await;
            let flags = match flags {
                Ok(flags) => flags,
                Err(refused) => {
                    report
                        .divergences
                        .push(format!("history {h} order {o}: {refused}"));
                    continue;
                }
            };
            match &chronological {
                None => {
                    if let Some((status, plan)) = &history.ends_in {
                        report.ending_in_a_subscription_event += 1;
                        let expected: Flags = table_state(status, plan)
                            .into_iter()
                            .map(|(k, v)| (k, Some(FlagValue::Bool(v))))
                            .collect();
                        if flags != expected {
                            report.divergences.push(format!(
                                "history {h} ends {status} on {plan}: expected {expected:?}, got {flags:?} after {shown:?}"
                            ));
                        }
                    }
                    chronological = Some(flags);
                }
                Some(first) if *first != flags => report.divergences.push(format!(
                    "history {h} order {o}: {flags:?} differs from the chronological {first:?}; delivered {shown:?}"
                )),
                Some(_) => {}
            }
        }
        report.histories += 1;
    }
    report
}

/// Delivers one order through the webhook path, in one transaction, and reads the flags.
async fn deliver(
    store: &Store,
    rules: &Arc<Rules>,
    tenant: &str,
    order: Vec<HistoryEvent>,
) -> Result<Flags, String> {
    let events: Vec<StripeEvent> = order
        .into_iter()
        .map(|e| {
            let mut object = e.object;
            object["customer"] = json!(format!("cus_{tenant}"));
            object["metadata"] = json!({"tenant_id": tenant});
            let mut data = json!({"object": object});
            if let Some(previous) = e.previous_attributes {
                data["previous_attributes"] = previous;
            }
            // One prefix per run keeps the ids' relative byte order, which breaks ties.
            let body = json!({"id": format!("evt_{tenant}_{}", e.id_suffix), "type": e.event_type,
                "created": e.created, "data": data});
            StripeEvent::parse(body.to_string().as_bytes(), e.created).expect("a valid event")
        })
        .collect();
    let rules = rules.clone();
    let tenant = tenant.to_owned();
    store
        .write(move |tx| {
            for event in &events {
                if let Err(refused) = apply_webhook(
                    tx,
                    &rules,
                    ParkingLimits::DEFAULT,
                    event,
                    &Delivery::STRIPE,
                    0,
                )? {
                    return Ok(Err(format!("{} refused: {refused}", event.id)));
                }
            }
            let mut flags = Flags::new();
            for key in FLAGS {
                flags.insert(key, tx.flag(&tenant, key)?.map(|f| f.value));
            }
            Ok(Ok(flags))
        })
        .await
        .expect("the transaction commits")
}
