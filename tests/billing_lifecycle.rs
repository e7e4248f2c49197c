//! Issue 10, points 1 and 2 against the real binary: flags follow the subscription's status
//! and plan (the lifecycle table), and the final flags do not depend on delivery order, ties
//! within a second included. The property test delivers random realistic histories in random
//! orders through the webhook path (ops level, in-memory SQLite).
mod common;

#[path = "lifecycle/histories.rs"]
mod histories;

use common::*;
use coresdk::proto::{
    AuthorizeRequest, HandleStripeWebhookResponse, QueryAuditRequest, WebhookOutcome,
    auth_service_client::AuthServiceClient,
};
use serde_json::{Value, json};

/// A subscription event's object for `tenant` (resolved by `metadata.tenant_id`).
fn subscription(tenant: &str, status: &str, plan: &str) -> Value {
    json!({"id": format!("sub_{tenant}"), "object": "subscription", "customer": format!("cus_{tenant}"),
        "metadata": {"tenant_id": tenant}, "status": status,
        "items": {"data": [{"price": {"lookup_key": plan}}]}})
}

fn invoice(tenant: &str) -> Value {
    json!({"object": "invoice", "customer": format!("cus_{tenant}"), "metadata": {"tenant_id": tenant}})
}

/// An event body, with `previous_attributes` when given.
fn body(
    id: &str,
    event_type: &str,
    created: i64,
    object: Value,
    previous: Option<Value>,
) -> Vec<u8> {
    let mut data = json!({"object": object});
    if let Some(previous) = previous {
        data["previous_attributes"] = previous;
    }
    json!({"id": id, "object": "event", "type": event_type, "created": created,
        "livemode": false, "data": data})
    .to_string()
    .into_bytes()
}

async fn deliver(sidecar: &Sidecar, body: Vec<u8>) -> HandleStripeWebhookResponse {
    sidecar
        .webhooks()
        .handle_stripe_webhook(signed(SECRET, body))
        .await
        .expect("accepted")
        .into_inner()
}

/// `pro_features`, `paywall_active`, `advanced_analytics`, as on/off.
async fn state(sidecar: &Sidecar, tenant: &str) -> [bool; 3] {
    [
        is_on(sidecar, tenant, "pro_features").await,
        is_on(sidecar, tenant, "paywall_active").await,
        is_on(sidecar, tenant, "advanced_analytics").await,
    ]
}

const GOOD_PAID_PLAN: [bool; 3] = [true, false, true];
const GOOD_BASIC_PLAN: [bool; 3] = [true, false, false];
const ARREARS: [bool; 3] = [false, true, false];
const OVER: [bool; 3] = [false, false, false];

/// One customer's subscription, as Stripe reports it to the sidecar.
struct Customer<'a> {
    sidecar: &'a Sidecar,
    tenant: &'a str,
    plan: &'a str,
    status: &'a str,
    /// Seconds, advanced by the caller; events of one step share it.
    t: i64,
}

impl<'a> Customer<'a> {
    /// Subscribed (created, active) a little while ago.
    async fn subscribed(sidecar: &'a Sidecar, tenant: &'a str, plan: &'a str) -> Self {
        let customer = Customer {
            sidecar,
            tenant,
            plan,
            status: "active",
            t: now() - 100,
        };
        customer
            .subscription("customer.subscription.created", None)
            .await;
        customer
    }

    async fn invoice(&self, event_type: &str) -> HandleStripeWebhookResponse {
        let id = format!("evt_{}_{}_{event_type}", self.tenant, self.t);
        deliver(
            self.sidecar,
            body(&id, event_type, self.t, invoice(self.tenant), None),
        )
        .await
    }

    /// A subscription event for the current status and plan; `previous` is its
    /// `previous_attributes`.
    async fn subscription(
        &self,
        event_type: &str,
        previous: Option<Value>,
    ) -> HandleStripeWebhookResponse {
        let id = format!("evt_{}_{}_{event_type}", self.tenant, self.t);
        let object = subscription(self.tenant, self.status, self.plan);
        deliver(
            self.sidecar,
            body(&id, event_type, self.t, object, previous),
        )
        .await
    }

    /// Moves to `status` one second later: the update, with `with` (the invoice that caused
    /// it, or the pause/resume/deletion event) in the same second.
    async fn moves_to(&mut self, status: &'a str, with: &str) {
        self.t += 1;
        let was = std::mem::replace(&mut self.status, status);
        let previous = Some(json!({"status": was}));
        if with.starts_with("invoice.") {
            self.invoice(with).await;
        } else {
            self.subscription(with, None).await;
        }
        self.subscription("customer.subscription.updated", previous)
            .await;
    }

    async fn state(&self) -> [bool; 3] {
        state(self.sidecar, self.tenant).await
    }
}

#[tokio::test]
async fn each_status_row_of_the_table() {
    let sidecar = Sidecar::start(Options::default()).await;
    let rows: [(&[&str], [bool; 3], [bool; 3]); 3] = [
        (&["active", "trialing"], GOOD_PAID_PLAN, GOOD_BASIC_PLAN),
        (&["past_due", "unpaid", "incomplete"], ARREARS, ARREARS),
        (&["canceled", "incomplete_expired", "paused"], OVER, OVER),
    ];
    for (statuses, on_pro, on_basic) in rows {
        for status in statuses {
            for (plan, expected) in [("pro_monthly", on_pro), ("basic_monthly", on_basic)] {
                let tenant = format!("{status}-{plan}").replace('_', "-");
                let mut customer = Customer::subscribed(&sidecar, &tenant, plan).await;
                // From arrears, so that every flag the row sets has to move from somewhere.
                customer
                    .moves_to("past_due", "invoice.payment_failed")
                    .await;
                customer.t += 1;
                customer.status = status;
                let previous = Some(json!({"status": "past_due"}));
                let updated = customer
                    .subscription("customer.subscription.updated", previous)
                    .await;
                assert_eq!(updated.outcome(), WebhookOutcome::Applied, "{tenant}");
                assert_eq!(customer.state().await, expected, "{tenant}");
            }
        }
    }
    // `.deleted` means canceled, whatever the object says.
    let mut deleted = Customer::subscribed(&sidecar, "deleted", "pro_monthly").await;
    deleted.moves_to("past_due", "invoice.payment_failed").await;
    deleted.t += 1;
    deleted.status = "active";
    deleted
        .subscription("customer.subscription.deleted", None)
        .await;
    assert_eq!(deleted.state().await, OVER);
    // A status the table does not know sets nothing.
    let mut unknown = Customer::subscribed(&sidecar, "unknown", "pro_monthly").await;
    unknown.t += 1;
    unknown.status = "on_hold";
    let ignored = unknown
        .subscription("customer.subscription.updated", None)
        .await;
    assert_eq!(ignored.outcome(), WebhookOutcome::Ignored);
    assert!(ignored.flag_changes.is_empty());
    assert_eq!(unknown.state().await, GOOD_PAID_PLAN);
}

#[tokio::test]
async fn a_downgrade_turns_advanced_analytics_off_and_the_audit_names_the_rule() {
    let sidecar = Sidecar::start(Options::default()).await;
    let mut acme = Customer::subscribed(&sidecar, "acme", "enterprise_annual").await;
    assert_eq!(acme.state().await, GOOD_PAID_PLAN);
    acme.t += 1;
    acme.plan = "basic_monthly";
    let previous = json!({"items": {"data": [{"price": {"lookup_key": "enterprise_annual"}}]}});
    let downgraded = acme
        .subscription("customer.subscription.updated", Some(previous))
        .await;
    assert_eq!(acme.state().await, GOOD_BASIC_PLAN);
    let changed: Vec<&str> = downgraded
        .flag_changes
        .iter()
        .map(|c| c.key.as_str())
        .collect();
    assert_eq!(changed, ["advanced_analytics"]);

    let records = sidecar
        .audit()
        .query(QueryAuditRequest {
            tenant_id: "acme".into(),
            event_prefix: "billing.customer.subscription.updated".into(),
            ..Default::default()
        })
        .await
        .expect("Query")
        .into_inner()
        .records;
    let metadata = records[0].metadata.clone().expect("metadata");
    let rules = metadata
        .fields
        .get("rules")
        .expect("the deciding rules are recorded");
    let Some(prost_types::value::Kind::StructValue(rules)) = &rules.kind else {
        panic!("rules is an object: {rules:?}");
    };
    let named: Vec<(String, String)> = rules
        .fields
        .iter()
        .map(|(flag, rule)| match &rule.kind {
            Some(prost_types::value::Kind::StringValue(rule)) => (flag.clone(), rule.clone()),
            other => panic!("{flag}: {other:?}"),
        })
        .collect();
    assert_eq!(
        named,
        [("advanced_analytics".to_owned(), "paid plan".to_owned())]
    );
}

#[tokio::test]
async fn dunning_recovery_turns_pro_back_on() {
    let sidecar = Sidecar::start(Options::default()).await;
    let mut acme = Customer::subscribed(&sidecar, "acme", "pro_monthly").await;
    acme.moves_to("past_due", "invoice.payment_failed").await;
    assert_eq!(acme.state().await, ARREARS);
    acme.moves_to("active", "invoice.paid").await;
    assert_eq!(acme.state().await, GOOD_PAID_PLAN);
}

#[tokio::test]
async fn cancel_after_a_failed_payment_locks_features_without_the_paywall() {
    let sidecar = Sidecar::start(Options::default()).await;
    let mut acme = Customer::subscribed(&sidecar, "acme", "pro_monthly").await;
    acme.moves_to("past_due", "invoice.payment_failed").await;
    acme.moves_to("canceled", "customer.subscription.deleted")
        .await;
    assert_eq!(acme.state().await, OVER);

    let access = AuthServiceClient::new(sidecar.channel.clone())
        .authorize(AuthorizeRequest {
            tenant_id: "acme".into(),
            required_features: vec!["pro_features".into()],
            deny_if: vec!["paywall_active".into()],
            resource: "GET /api/reports".into(),
            ..Default::default()
        })
        .await
        .expect("Authorize answers")
        .into_inner();
    let problem = access.problem.expect("denied with a problem");
    assert_eq!(problem.status, 403, "{problem:?}");
}

#[tokio::test]
async fn pause_then_resume() {
    let sidecar = Sidecar::start(Options::default()).await;
    let mut acme = Customer::subscribed(&sidecar, "acme", "pro_monthly").await;
    acme.moves_to("paused", "customer.subscription.paused")
        .await;
    assert_eq!(acme.state().await, OVER);
    acme.moves_to("active", "customer.subscription.resumed")
        .await;
    assert_eq!(acme.state().await, GOOD_PAID_PLAN);
}

#[tokio::test]
async fn equal_second_deliveries_converge_in_every_order() {
    same_second_permutations(&Sidecar::start(Options::default()).await).await;
}

/// Every permutation of events that Stripe emits in the same second ends in the state of the
/// greatest by the tie rule.
async fn same_second_permutations(sidecar: &Sidecar) {
    let t = now() - 100;
    // A failed renewal, the move to past_due, then cancellation, all in one second; and a
    // second where the subscription is created together with its paid first invoice.
    // (id, type, status reached, status before when the event changed it)
    type Event = (
        &'static str,
        &'static str,
        Option<&'static str>,
        Option<&'static str>,
    );
    let seconds: [(&str, [bool; 3], Vec<Event>); 2] = [
        (
            "cancel",
            OVER,
            vec![
                ("evt_1", "invoice.payment_failed", None, None),
                (
                    "evt_2",
                    "customer.subscription.updated",
                    Some("past_due"),
                    Some("active"),
                ),
                (
                    "evt_3",
                    "customer.subscription.updated",
                    Some("canceled"),
                    Some("past_due"),
                ),
                (
                    "evt_4",
                    "customer.subscription.deleted",
                    Some("canceled"),
                    None,
                ),
            ],
        ),
        (
            "start",
            GOOD_PAID_PLAN,
            vec![
                (
                    "evt_5",
                    "customer.subscription.created",
                    Some("incomplete"),
                    None,
                ),
                ("evt_6", "invoice.paid", None, None),
                (
                    "evt_7",
                    "customer.subscription.updated",
                    Some("active"),
                    Some("incomplete"),
                ),
            ],
        ),
    ];
    for (name, expected, events) in seconds {
        for (p, permutation) in permutations(events.len()).into_iter().enumerate() {
            let tenant = format!("{name}-{p}");
            for index in permutation {
                let (id, event_type, status, was) = events[index];
                let object = match status {
                    Some(status) => subscription(&tenant, status, "pro_monthly"),
                    None => invoice(&tenant),
                };
                let previous = was.map(|was| json!({"status": was}));
                deliver(
                    sidecar,
                    body(&format!("{id}_{tenant}"), event_type, t, object, previous),
                )
                .await;
            }
            assert_eq!(state(sidecar, &tenant).await, expected, "{tenant}");
        }
    }
}

fn permutations(n: usize) -> Vec<Vec<usize>> {
    if n == 0 {
        return vec![Vec::new()];
    }
    let mut all = Vec::new();
    for shorter in permutations(n - 1) {
        for at in 0..=shorter.len() {
            let mut p = shorter.clone();
            p.insert(at, n - 1);
            all.push(p);
        }
    }
    all
}

#[tokio::test]
async fn a_rules_file_in_the_first_format_still_loads_and_applies() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("rules.toml");
    std::fs::write(
        &path,
        r#"
        [flags]
        pro_features = false
        advanced_analytics = false

        [[rule]]
        events = ["invoice.paid"]
        set = { pro_features = true }

        [[rule]]
        events = ["customer.subscription.updated"]
        plans = ["pro", "enterprise"]
        set = { advanced_analytics = true }

        [[rule]]
        events = ["entitlements.active_entitlement_summary.updated"]
        entitlements = true
        "#,
    )
    .expect("write the rules");
    let mut options = Options::default();
    options
        .args
        .extend(["--rules-file".into(), path.display().to_string()]);
    let sidecar = Sidecar::start(options).await;
    let t = now() - 100;
    deliver(
        &sidecar,
        body("evt_p", "invoice.paid", t, invoice("acme"), None),
    )
    .await;
    // The file's own meaning: an update on a pro plan turns analytics on, whatever its status.
    let past_due = subscription("acme", "past_due", "pro_monthly");
    deliver(
        &sidecar,
        body(
            "evt_u",
            "customer.subscription.updated",
            t + 1,
            past_due,
            None,
        ),
    )
    .await;
    assert!(is_on(&sidecar, "acme", "pro_features").await);
    assert!(is_on(&sidecar, "acme", "advanced_analytics").await);
}

#[test]
fn a_rules_file_naming_an_unknown_status_stops_the_start_with_the_known_ones() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("rules.toml");
    std::fs::write(
        &path,
        "[flags]\npro = false\n[[rule]]\nname = \"good standing\"\nevents = [\"customer.subscription.updated\"]\nstatus = [\"cancelled\"]\nset = { pro = true }\n",
    )
    .expect("write the rules");
    let output = std::process::Command::new(binary())
        .args(["--store", "memory", "--rules-file"])
        .arg(&path)
        .env_clear()
        .env("CORESDK_LOG", "error")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("the binary runs");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    for needle in [
        "rule 1 ('good standing')",
        "'cancelled'",
        "past_due, unpaid, paused, canceled",
    ] {
        assert!(stderr.contains(needle), "{needle}: {stderr}");
    }
}

/// Whether an entitlement flag is on; one no summary ever turned on is not defined at all.
async fn entitled(sidecar: &Sidecar, tenant: &str, key: &str) -> bool {
    let found = sidecar
        .flags()
        .get_flag(coresdk::proto::GetFlagRequest {
            tenant_id: tenant.into(),
            key: key.into(),
        })
        .await;
    match found {
        Ok(flag) => bool_value(&flag.into_inner()).expect("a bool flag"),
        Err(status) if status.code() == tonic::Code::NotFound => false,
        Err(status) => panic!("GetFlag: {status:?}"),
    }
}

#[tokio::test]
async fn an_older_entitlement_summary_is_stale() {
    older_summary_is_stale(&Sidecar::start(Options::default()).await).await;
}

/// Both with the PostgreSQL store: its own statements and migration carry the order.
#[tokio::test]
async fn on_postgresql_too() {
    let url = common::pg::fresh_database(common::pg::server_url()).await;
    let sidecar = Sidecar::start(Options {
        args: vec!["--store".into(), url],
        ..Options::default()
    })
    .await;
    same_second_permutations(&sidecar).await;
    older_summary_is_stale(&sidecar).await;
    plan_switches(&sidecar).await;
}

async fn older_summary_is_stale(sidecar: &Sidecar) {
    let t = now() - 100;
    let summary = |keys: &[&str]| {
        let data: Vec<Value> = keys.iter().map(|k| json!({"lookup_key": k})).collect();
        json!({"object": "entitlements.active_entitlement_summary", "customer": "cus_acme",
            "metadata": {"tenant_id": "acme"}, "entitlements": {"data": data}})
    };
    let kind = "entitlements.active_entitlement_summary.updated";
    let newer = deliver(
        sidecar,
        body("evt_s2", kind, t + 2, summary(&["sso"]), None),
    )
    .await;
    assert_eq!(newer.outcome(), WebhookOutcome::Applied);
    let older = deliver(
        sidecar,
        body("evt_s1", kind, t + 1, summary(&["audit_export"]), None),
    )
    .await;
    assert_eq!(older.outcome(), WebhookOutcome::Stale);
    assert_eq!(older.stale_flags, ["audit_export"]);
    // The newest summary does not name audit_export: it is off, explicitly, as it would be had
    // the older summary come first.
    let turned_off: Vec<(&str, bool)> = older
        .flag_changes
        .iter()
        .map(|c| {
            let on = match c.new_value.as_ref().and_then(|v| v.kind.as_ref()) {
                Some(coresdk::proto::flag_value::Kind::BoolValue(on)) => *on,
                other => panic!("a bool flag, not {other:?}"),
            };
            (c.key.as_str(), on)
        })
        .collect();
    assert_eq!(turned_off, [("audit_export", false)]);
    assert!(entitled(sidecar, "acme", "sso").await);
    assert!(!entitled(sidecar, "acme", "audit_export").await);
    // A newer summary still replaces it.
    deliver(
        sidecar,
        body("evt_s3", kind, t + 3, summary(&["audit_export"]), None),
    )
    .await;
    assert!(!entitled(sidecar, "acme", "sso").await);
    assert!(entitled(sidecar, "acme", "audit_export").await);
}

/// Point 2's property: 100 random realistic histories, each delivered chronologically and in
/// 5 shuffled orders with redeliveries, all end in the same flags, under the built-in rules and
/// under rules whose statuses set different keys (`histories::VARIED_RULES`); under the
/// built-in rules, those whose newest event is a subscription event end in the table's state
/// for the subscription in the best standing. Fixed seed: a failure reproduces.
#[tokio::test]
async fn any_delivery_order_of_a_realistic_history_ends_in_the_same_flags() {
    let report = histories::check(0x5eed_2026, 100, 5).await;
    assert!(
        report.divergences.is_empty(),
        "{} divergences, first: {:#?}",
        report.divergences.len(),
        &report.divergences[..report.divergences.len().min(3)]
    );
    println!("{report:?}");
    // Both rule sets ran every history.
    assert_eq!((report.histories, report.deliveries), (200, 1200));
    // Not vacuous: many histories are checked against the table, and some map their
    // customer late.
    assert!(report.checked_against_the_table > 60, "{report:?}");
    assert!(report.mapped_late > 20, "{report:?}");
}

/// Must-fix 2 of the review: a plan change made by cancelling the old subscription and
/// creating the new one in the same second. The tie rule orders one subscription's events; the
/// two subscriptions are two objects, and the one in good standing decides.
#[tokio::test]
async fn switching_plans_by_cancel_and_create_in_one_second_follows_the_new_subscription() {
    plan_switches(&Sidecar::start(Options::default()).await).await;
}

async fn plan_switches(sidecar: &Sidecar) {
    let t = now() - 100;
    for (from, to, expected) in [
        ("basic_monthly", "pro_monthly", GOOD_PAID_PLAN),
        ("pro_monthly", "basic_monthly", GOOD_BASIC_PLAN),
    ] {
        for old_first in [true, false] {
            let tenant = format!("switch-{to}-{old_first}");
            let sub = |id: &str, status: &str, plan: &str| {
                let mut object = subscription(&tenant, status, plan);
                object["id"] = json!(id);
                object
            };
            let created = |id: &str, plan: &str, at: i64| {
                body(
                    &format!("evt_{tenant}_{id}_created"),
                    "customer.subscription.created",
                    at,
                    sub(id, "active", plan),
                    None,
                )
            };
            deliver(sidecar, created("sub_old", from, t - 50)).await;
            let cancel = body(
                &format!("evt_{tenant}_sub_old_deleted"),
                "customer.subscription.deleted",
                t,
                sub("sub_old", "canceled", from),
                None,
            );
            let create = created("sub_new", to, t);
            let (first, second) = if old_first {
                (cancel, create)
            } else {
                (create, cancel)
            };
            deliver(sidecar, first).await;
            let last = deliver(sidecar, second).await;
            assert_ne!(last.outcome(), WebhookOutcome::Stale, "{tenant}");
            assert_eq!(state(sidecar, &tenant).await, expected, "{tenant}");
        }
    }
}

/// Must-fix 1 of the review: a key an entitlement summary named and a newer one dropped ends
/// off whatever the order, even when a subscription rule also sets it in between.
#[tokio::test]
async fn a_key_the_newest_summary_dropped_ends_off_in_every_order() {
    let sidecar = Sidecar::start(Options::default()).await;
    let t = now() - 100;
    let kind = "entitlements.active_entitlement_summary.updated";
    for (o, order) in [[0, 1, 2], [1, 0, 2], [2, 1, 0], [1, 2, 0]]
        .into_iter()
        .enumerate()
    {
        let tenant = format!("summaries-{o}");
        let summary = |keys: &[&str]| {
            let data: Vec<Value> = keys.iter().map(|k| json!({"lookup_key": k})).collect();
            json!({"object": "entitlements.active_entitlement_summary",
                "customer": format!("cus_{tenant}"), "metadata": {"tenant_id": tenant},
                "entitlements": {"data": data}})
        };
        let events = [
            body(
                &format!("evt_{tenant}_s1"),
                kind,
                t,
                summary(&["advanced_analytics", "sso"]),
                None,
            ),
            body(
                &format!("evt_{tenant}_r"),
                "customer.subscription.updated",
                t + 1,
                subscription(&tenant, "active", "pro_monthly"),
                None,
            ),
            body(&format!("evt_{tenant}_s2"), kind, t + 2, summary(&[]), None),
        ];
        for i in order {
            deliver(&sidecar, events[i].clone()).await;
        }
        assert_eq!(
            state(&sidecar, &tenant).await,
            [true, false, false],
            "{order:?}"
        );
        // Off, not merely absent: every order answers the same is_default.
        let sso = flag(&sidecar, &tenant, "sso").await;
        assert_eq!(
            (bool_value(&sso), sso.is_default),
            (Some(false), false),
            "{order:?}"
        );
    }
}
