//! Realistic Stripe billing histories, and the order-independence check over them (issue 10,
//! point 2): every history is delivered in its chronological order and in shuffled orders
//! with redeliveries, through the real webhook path on an in-memory SQLite store, and every
//! order must end in the same flags (value and is-default of every key). Histories hold
//! several subscriptions per customer, overlapping (a plan change made by cancelling one and
//! creating another in the same second, in both orders; a second subscription), entitlement
//! summaries naming a catalog flag and fresh keys, `subscription.upgraded`, and customers
//! mapped to a tenant only midway (their first deliveries are parked, then applied by the
//! mapping). When a subscription event is the newest event, the flags must be the lifecycle
//! table's for the subscription in the best standing, as a model of the subscriptions
//! (independent of the sidecar's code) computes it.
//!
//! Every history runs under two rule sets: the built-in rules, where every subscription status
//! sets the same keys (and the table check applies), and [`VARIED_RULES`], where statuses set
//! different keys, so that a key some subscription once set can be set by none now and a
//! stale event can bring a key its subscription's newest event does not set.
//!
//! Shared by the property test (`tests/billing_lifecycle.rs`, a fixed seed, bounded) and the
//! benchmark's `--lifecycle-histories N` (a bigger run); not part of the sidecar.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use coresdk::feeds::Feeds;
use coresdk::flags::{FlagCache, FlagValue};
use coresdk::ops::{AdminChange, Delivery, ParkingLimits, apply_webhook, map_customer};
use coresdk::problem::Error;
use coresdk::rules::Rules;
use coresdk::store::{Outcome, Store, StoreUrl};
use coresdk::stripe::{SUBSCRIPTION_STATE_EVENTS, StripeEvent};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

pub const FLAGS: [&str; 3] = ["pro_features", "paywall_active", "advanced_analytics"];
const PLANS: [&str; 3] = ["basic_monthly", "pro_monthly", "enterprise_annual"];
/// Entitlement features: one that is also a catalog flag (a rule sets it too) and fresh keys.
const FEATURES: [&str; 3] = ["advanced_analytics", "sso", "audit_export"];
/// Every key a history can touch: the catalog and the entitlement features.
const KEYS: [&str; 5] = [
    "pro_features",
    "paywall_active",
    "advanced_analytics",
    "sso",
    "audit_export",
];
/// A customer has at most this many subscriptions running at once.
const MAX_RUNNING: usize = 3;

/// A custom rules file whose subscription statuses set different keys: good standing sets
/// pro_features, paywall_active and the plan flag; arrears only puts up the paywall; an ended
/// subscription only takes it down (pro_features stays with whichever subscription set it, or
/// goes back to the catalog default when none does); a paused one sets nothing.
pub const VARIED_RULES: &str = r#"
[flags]
pro_features = false
paywall_active = false
advanced_analytics = false

[[rule]]
name = "invoice paid"
events = ["invoice.paid"]
set = { pro_features = true, paywall_active = false }

[[rule]]
name = "payment failed"
events = ["invoice.payment_failed", "payment_intent.payment_failed", "payment.failed"]
set = { pro_features = false, paywall_active = true }

[[rule]]
name = "good standing"
events = ["customer.subscription.created", "customer.subscription.updated", "customer.subscription.paused",
          "customer.subscription.resumed", "customer.subscription.deleted"]
status = ["active", "trialing"]
set = { pro_features = true, paywall_active = false }

[[rule]]
name = "paid plan"
events = ["customer.subscription.created", "customer.subscription.updated", "customer.subscription.paused",
          "customer.subscription.resumed", "customer.subscription.deleted"]
status = ["active", "trialing"]
plans = ["pro", "enterprise"]
set = { advanced_analytics = true }
else = { advanced_analytics = false }

[[rule]]
name = "arrears: paywall only"
events = ["customer.subscription.created", "customer.subscription.updated", "customer.subscription.paused",
          "customer.subscription.resumed", "customer.subscription.deleted"]
status = ["past_due", "unpaid", "incomplete"]
set = { paywall_active = true }

[[rule]]
name = "ended: paywall down only"
events = ["customer.subscription.created", "customer.subscription.updated", "customer.subscription.paused",
          "customer.subscription.resumed", "customer.subscription.deleted"]
status = ["canceled", "incomplete_expired"]
set = { paywall_active = false }

[[rule]]
name = "upgraded"
events = ["subscription.upgraded"]
set = { advanced_analytics = true }

[[rule]]
name = "entitlements"
events = ["entitlements.active_entitlement_summary.updated"]
entitlements = true
"#;

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

/// A history in the order Stripe produced it, and whether its customer is only mapped to a
/// tenant midway (its first deliveries are then refused and parked).
#[derive(Debug, Clone)]
pub struct History {
    pub events: Vec<HistoryEvent>,
    pub mapped_late: bool,
}

#[derive(Debug, Clone)]
struct Subscription {
    id: u32,
    status: &'static str,
    plan: &'static str,
}

impl Subscription {
    fn over(&self) -> bool {
        matches!(self.status, "canceled" | "incomplete_expired")
    }
}

struct Generator<'a> {
    rng: &'a mut StdRng,
    events: Vec<HistoryEvent>,
    t: i64,
    subscriptions: Vec<Subscription>,
    /// The subscription the next subscription events are about.
    current: usize,
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

    fn sub(&mut self) -> &mut Subscription {
        &mut self.subscriptions[self.current]
    }

    fn subscription_object(&self) -> Value {
        let sub = &self.subscriptions[self.current];
        json!({
            "id": format!("sub_{}", sub.id),
            "object": "subscription",
            "status": sub.status,
            "items": {"data": [{"price": {"lookup_key": sub.plan}}]},
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
            "subscription": format!("sub_{}", self.subscriptions[self.current].id),
        });
        self.push(event_type, object, None);
    }

    /// An Entitlements summary: a random set of active features.
    fn summary(&mut self) {
        let data: Vec<Value> = FEATURES
            .iter()
            .filter(|_| self.rng.gen_bool(0.5))
            .map(|key| json!({"lookup_key": key}))
            .collect();
        let object = json!({"object": "entitlements.active_entitlement_summary",
            "entitlements": {"data": data}});
        self.push(
            "entitlements.active_entitlement_summary.updated",
            object,
            None,
        );
    }

    /// Moves the current subscription to `status`: the update Stripe sends, with what it
    /// sends in the same second (the invoice that caused it, the pause or resume event, the
    /// deletion).
    fn transition(&mut self, status: &'static str) {
        let was = std::mem::replace(&mut self.sub().status, status);
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

    /// A new subscription, made current: created (with the first invoice's outcome in the
    /// same second).
    fn start_subscription(&mut self) {
        let status = self.pick(&["trialing", "active", "incomplete", "paid_at_once"]);
        let plan = self.pick(&PLANS);
        let id = self.subscriptions.len() as u32 + 1;
        self.subscriptions.push(Subscription { id, status, plan });
        self.current = self.subscriptions.len() - 1;
        if status == "paid_at_once" {
            // Created incomplete, its first invoice paid and the subscription active, all in
            // the same second: the three disagree about the flags.
            self.sub().status = "incomplete";
            self.subscription("customer.subscription.created", None);
            self.transition("active");
            return;
        }
        self.subscription("customer.subscription.created", None);
        match status {
            "active" => self.invoice("invoice.paid"),
            "incomplete" if self.rng.gen_bool(0.5) => self.invoice("invoice.payment_failed"),
            _ => {}
        }
    }

    /// A plan change made by cancelling the current subscription and creating one on another
    /// plan in the same second, the two in either order (both happen).
    fn switch_by_cancel_and_create(&mut self) {
        let old = self.current;
        let cancelled_at = self.events.len();
        self.sub().status = "canceled";
        self.subscription("customer.subscription.deleted", None);
        let plan = self.pick(&PLANS);
        let id = self.subscriptions.len() as u32 + 1;
        self.subscriptions.push(Subscription {
            id,
            status: "active",
            plan,
        });
        self.current = self.subscriptions.len() - 1;
        self.subscription("customer.subscription.created", None);
        self.invoice("invoice.paid");
        if self.rng.gen_bool(0.5) {
            let cancel = self.events.remove(cancelled_at);
            self.events.push(cancel);
        }
        debug_assert!(self.subscriptions[old].over());
    }
}

/// A random, realistic history of one customer starting at `start` (Unix seconds).
pub fn history(rng: &mut StdRng, start: i64) -> History {
    let mapped_late = rng.gen_bool(0.25);
    let mut g = Generator {
        rng,
        events: Vec::new(),
        t: start,
        subscriptions: Vec::new(),
        current: 0,
    };
    g.start_subscription();
    let steps = g.rng.gen_range(1..14);
    for _ in 0..steps {
        g.t += g.rng.gen_range(0..=3);
        let running: Vec<usize> = (0..g.subscriptions.len())
            .filter(|&i| !g.subscriptions[i].over())
            .collect();
        if running.is_empty() {
            // Over: the customer may subscribe again, to a new subscription.
            if g.rng.gen_bool(0.4) {
                g.start_subscription();
                continue;
            }
            break;
        }
        g.current = running[g.rng.gen_range(0..running.len())];
        if g.rng.gen_bool(0.1) {
            g.summary();
            continue;
        }
        let next: &'static str = match g.sub().status {
            "incomplete" => g.pick(&["active", "incomplete_expired"]),
            "trialing" => g.pick(&["active", "past_due", "canceled", "plan"]),
            "active" => g.pick(&[
                "renewal", "plan", "past_due", "paused", "canceled", "switch", "add", "upgraded",
            ]),
            "past_due" => g.pick(&["active", "retry_failed", "unpaid", "canceled"]),
            "unpaid" => g.pick(&["active", "canceled"]),
            _ => g.pick(&["active", "canceled"]),
        };
        match next {
            "renewal" => g.invoice("invoice.paid"),
            "retry_failed" => g.invoice("invoice.payment_failed"),
            "upgraded" => {
                let object = g.subscription_object();
                g.push("subscription.upgraded", object, None);
            }
            "plan" => {
                let was = g.sub().plan;
                let plan = g.pick(&PLANS);
                g.sub().plan = plan;
                let object = g.subscription_object();
                g.push(
                    "customer.subscription.updated",
                    object,
                    Some(json!({"items": {"data": [{"price": {"lookup_key": was}}]}})),
                );
            }
            "switch" => g.switch_by_cancel_and_create(),
            "add" if running.len() < MAX_RUNNING => g.start_subscription(),
            "add" => g.invoice("invoice.paid"),
            status => g.transition(status),
        }
    }
    History {
        events: g.events,
        mapped_late,
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
    /// Over both rule sets (each runs the same histories).
    pub histories: usize,
    /// Delivery runs: the chronological one and the shuffled ones, per history.
    pub deliveries: usize,
    pub events_delivered: usize,
    /// Histories whose customer was mapped midway (deliveries parked, then applied).
    pub mapped_late: usize,
    /// Histories whose newest event is a subscription event, checked against the table for
    /// the subscription in the best standing.
    pub checked_against_the_table: usize,
    /// Human-readable descriptions of every divergence (empty when all orders agree).
    pub divergences: Vec<String>,
}

/// Every key's stored value; `None` is "never set" (GetFlag answers the default with
/// `is_default`), so comparing these compares value and is-default.
type Flags = BTreeMap<&'static str, Option<FlagValue>>;

/// Generates `histories` histories from `seed` and delivers each chronologically and in
/// `shuffled_orders` random orders, each with a few redeliveries; a customer mapped late is
/// mapped after a random number of deliveries of each order. The same histories and orders
/// run under the built-in rules (checked against the table too) and under [`VARIED_RULES`].
pub async fn check(seed: u64, histories: usize, shuffled_orders: usize) -> Report {
    let mut report = Report::default();
    let built_in = Rules::built_in().expect("built-in rules");
    let varied = Rules::parse(VARIED_RULES).expect("the varied rules parse");
    for (name, rules, against_the_table) in
        [("built-in", built_in, true), ("varied", varied, false)]
    {
        check_under(
            name,
            rules,
            against_the_table,
            seed,
            histories,
            shuffled_orders,
            &mut report,
        )
        .await;
    }
    report
}

async fn check_under(
    rule_set: &str,
    rules: Rules,
    against_the_table: bool,
    seed: u64,
    histories: usize,
    shuffled_orders: usize,
    report: &mut Report,
) {
    let rules = Arc::new(rules);
    let cache = Arc::new(FlagCache::new(rules.catalog().clone()));
    let feeds = Arc::new(Feeds::new(cache.clone()));
    let store = Store::open(&StoreUrl::Memory, None, feeds, cache).expect("memory store");
    let mut rng = StdRng::seed_from_u64(seed);
    for h in 0..histories {
        let history = history(&mut rng, 1_700_000_000 + 100_000 * h as i64);
        report.mapped_late += usize::from(history.mapped_late);
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
                .map(|e| {
                    format!(
                        "{}@{}({} {})",
                        e.event_type, e.created, e.object["id"], e.object["status"]
                    )
                })
                .collect();
            let mapped_after = history.mapped_late.then(|| rng.gen_range(0..=order.len()));
            let events = events(&tenant, order, history.mapped_late);
            let expected = if o == 0 && against_the_table {
                table_expectation(&events)
            } else {
                None
            };
            let flags = match deliver(&store, &rules, &tenant, events, mapped_after).await {
                Ok(flags) => flags,
                Err(refused) => {
                    report.divergences.push(format!(
                        "{rule_set} rules, history {h} order {o}: {refused}"
                    ));
                    continue;
                }
            };
            if let Some((status, plan)) = expected {
                report.checked_against_the_table += 1;
                let table = table_state(&status, &plan);
                let got: BTreeMap<&str, bool> = FLAGS
                    .iter()
                    .map(|k| (*k, flags[k] == Some(FlagValue::Bool(true))))
                    .collect();
                if got != table {
                    report.divergences.push(format!(
                        "{rule_set} rules, history {h}: the best subscription is {status} on {plan}: expected {table:?}, got {flags:?} after {shown:?}"
                    ));
                }
            }
            match &chronological {
                None => chronological = Some(flags),
                Some(first) if *first != flags => report.divergences.push(format!(
                    "{rule_set} rules, history {h} order {o}: {flags:?} differs from the chronological {first:?}; delivered {shown:?}"
                )),
                Some(_) => {}
            }
        }
        report.histories += 1;
    }
}

/// The events of one delivery run, for `tenant`: by `metadata.tenant_id`, or, for a customer
/// mapped late, by the customer's mapping only.
fn events(tenant: &str, order: Vec<HistoryEvent>, mapped_late: bool) -> Vec<StripeEvent> {
    order
        .into_iter()
        .map(|e| {
            let mut object = e.object;
            object["customer"] = json!(format!("cus_{tenant}"));
            if !mapped_late {
                object["metadata"] = json!({"tenant_id": tenant});
            }
            let mut data = json!({"object": object});
            if let Some(previous) = e.previous_attributes {
                data["previous_attributes"] = previous;
            }
            // One prefix per run keeps the ids' relative byte order, which breaks ties.
            let body = json!({"id": format!("evt_{tenant}_{}", e.id_suffix), "type": e.event_type,
                "created": e.created, "data": data});
            StripeEvent::parse(body.to_string().as_bytes(), e.created).expect("a valid event")
        })
        .collect()
}

/// The status and plan of the subscription in the best standing (then the newest), from a
/// model of the subscriptions: each one's newest event by the event order. `None` when an
/// event of another kind is newer than every subscription event: the table then does not
/// decide alone.
fn table_expectation(events: &[StripeEvent]) -> Option<(String, String)> {
    let mut newest: BTreeMap<String, &StripeEvent> = BTreeMap::new();
    for event in events
        .iter()
        .filter(|e| SUBSCRIPTION_STATE_EVENTS.contains(&e.event_type.as_str()))
    {
        let id = event.object_str("id").unwrap_or_default().to_owned();
        if newest.get(&id).is_none_or(|n| n.order() < event.order()) {
            newest.insert(id, event);
        }
    }
    let newest_subscription_event = newest.values().map(|e| e.order()).max()?;
    if events
        .iter()
        .filter(|e| !SUBSCRIPTION_STATE_EVENTS.contains(&e.event_type.as_str()))
        .any(|e| e.order() > newest_subscription_event)
    {
        return None;
    }
    let standing = |status: &str| match status {
        "active" | "trialing" => 3,
        "past_due" | "unpaid" | "incomplete" => 2,
        "paused" => 1,
        _ => 0,
    };
    let best = newest.values().max_by_key(|e| {
        (
            standing(e.subscription_status().unwrap_or_default()),
            e.order(),
        )
    })?;
    let plan = best.object["items"]["data"][0]["price"]["lookup_key"].as_str()?;
    Some((best.subscription_status()?.to_owned(), plan.to_owned()))
}

/// Delivers one run through the webhook path, in one transaction (mapping a late customer
/// after `mapped_after` deliveries), and reads every key's flag.
async fn deliver(
    store: &Store,
    rules: &Arc<Rules>,
    tenant: &str,
    events: Vec<StripeEvent>,
    mapped_after: Option<usize>,
) -> Result<Flags, String> {
    let rules = rules.clone();
    let tenant = tenant.to_owned();
    let customer = format!("cus_{tenant}");
    store
        .write(move |tx| {
            let map = |tx: &mut dyn coresdk::store::StoreTx| {
                let change = AdminChange {
                    actor: "ops@example.com",
                    claimed_actor: None,
                    reason: "the customer signed up",
                };
                map_customer(
                    tx,
                    &rules,
                    ParkingLimits::DEFAULT,
                    &customer,
                    &tenant,
                    &change,
                    0,
                )
            };
            let mut ignored = BTreeSet::new();
            for (i, event) in events.iter().enumerate() {
                if mapped_after == Some(i) {
                    map(tx)?;
                }
                let unmapped = mapped_after.is_some_and(|after| i < after);
                match apply_webhook(
                    tx,
                    &rules,
                    ParkingLimits::DEFAULT,
                    event,
                    &Delivery::STRIPE,
                    0,
                )? {
                    Err(Error::UnknownCustomer(_)) if unmapped => {}
                    // An event no rule acts on is not parked (there is nothing to lose), so
                    // its redelivery is a duplicate.
                    Ok(result) if unmapped && result.outcome == Outcome::Ignored => {
                        ignored.insert(event.id.clone());
                    }
                    Ok(result)
                        if unmapped
                            && result.outcome == Outcome::Duplicate
                            && ignored.contains(&event.id) => {}
                    Err(refused) => return Ok(Err(format!("{} refused: {refused}", event.id))),
                    Ok(result) if unmapped => {
                        return Ok(Err(format!(
                            "{} {:?} before the mapping",
                            event.id, result.outcome
                        )));
                    }
                    Ok(_) => {}
                }
            }
            if mapped_after == Some(events.len()) {
                map(tx)?;
            }
            let mut flags = Flags::new();
            for key in KEYS {
                flags.insert(key, tx.flag(&tenant, key)?.map(|f| f.value));
            }
            Ok(Ok(flags))
        })
        .await
        .expect("the transaction commits")
}
