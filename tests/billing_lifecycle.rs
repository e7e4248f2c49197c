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

/// A created subscription to start from, a few seconds in the past.
async fn subscribed(sidecar: &Sidecar, tenant: &str, plan: &str, t: i64) {
    let created = subscription(tenant, "active", plan);
    deliver(
        sidecar,
        body(
            &format!("evt_{tenant}_c"),
            "customer.subscription.created",
            t,
            created,
            None,
        ),
    )
    .await;
}

#[tokio::test]
async fn each_status_row_of_the_table() {
    let sidecar = Sidecar::start(Options::default()).await;
    let t = now() - 100;
    let rows: [(&[&str], [bool; 3], [bool; 3]); 3] = [
        (&["active", "trialing"], GOOD_PAID_PLAN, GOOD_BASIC_PLAN),
        (&["past_due", "unpaid", "incomplete"], ARREARS, ARREARS),
        (&["canceled", "incomplete_expired", "paused"], OVER, OVER),
    ];
    for (statuses, on_pro, on_basic) in rows {
        for status in statuses {
            for (plan, expected) in [("pro_monthly", on_pro), ("basic_monthly", on_basic)] {
                let tenant = format!("{status}-{plan}").replace('_', "-");
                // The opposite corner first, so every flag the row sets has to move.
                deliver(
                    &sidecar,
                    body(
                        &format!("evt_{tenant}_0"),
                        "invoice.paid",
                        t,
                        invoice(&tenant),
                        None,
                    ),
                )
                .await;
                let updated = deliver(
                    &sidecar,
                    body(
                        &format!("evt_{tenant}_1"),
                        "customer.subscription.updated",
                        t + 1,
                        subscription(&tenant, status, plan),
                        Some(json!({"status": "active"})),
                    ),
                )
                .await;
                assert_eq!(updated.outcome(), WebhookOutcome::Applied, "{tenant}");
                assert_eq!(state(&sidecar, &tenant).await, expected, "{tenant}");
            }
        }
    }
    // `.deleted` means canceled, whatever the object says.
    deliver(
        &sidecar,
        body(
            "evt_del_0",
            "invoice.payment_failed",
            t,
            invoice("deleted"),
            None,
        ),
    )
    .await;
    let deleted = subscription("deleted", "active", "pro_monthly");
    deliver(
        &sidecar,
        body(
            "evt_del_1",
            "customer.subscription.deleted",
            t + 1,
            deleted,
            None,
        ),
    )
    .await;
    assert_eq!(state(&sidecar, "deleted").await, OVER);
    // A status the table does not know sets nothing.
    let unknown = subscription("unknown", "on_hold", "pro_monthly");
    let ignored = deliver(
        &sidecar,
        body("evt_unk", "customer.subscription.updated", t, unknown, None),
    )
    .await;
    assert_eq!(ignored.outcome(), WebhookOutcome::Ignored);
    assert!(ignored.flag_changes.is_empty());
}

#[tokio::test]
async fn a_downgrade_turns_advanced_analytics_off_and_the_audit_names_the_rule() {
    let sidecar = Sidecar::start(Options::default()).await;
    let t = now() - 100;
    subscribed(&sidecar, "acme", "enterprise_annual", t).await;
    assert_eq!(state(&sidecar, "acme").await, GOOD_PAID_PLAN);
    let downgraded = deliver(
        &sidecar,
        body(
            "evt_down",
            "customer.subscription.updated",
            t + 1,
            subscription("acme", "active", "basic_monthly"),
            Some(json!({"items": {"data": [{"price": {"lookup_key": "enterprise_annual"}}]}})),
        ),
    )
    .await;
    assert_eq!(state(&sidecar, "acme").await, GOOD_BASIC_PLAN);
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
    let t = now() - 100;
    subscribed(&sidecar, "acme", "pro_monthly", t).await;
    deliver(
        &sidecar,
        body(
            "evt_f",
            "invoice.payment_failed",
            t + 10,
            invoice("acme"),
            None,
        ),
    )
    .await;
    let past_due = subscription("acme", "past_due", "pro_monthly");
    let previous = Some(json!({"status": "active"}));
    deliver(
        &sidecar,
        body(
            "evt_pd",
            "customer.subscription.updated",
            t + 10,
            past_due,
            previous,
        ),
    )
    .await;
    assert_eq!(state(&sidecar, "acme").await, ARREARS);

    deliver(
        &sidecar,
        body("evt_p", "invoice.paid", t + 20, invoice("acme"), None),
    )
    .await;
    let active = subscription("acme", "active", "pro_monthly");
    let previous = Some(json!({"status": "past_due"}));
    deliver(
        &sidecar,
        body(
            "evt_a",
            "customer.subscription.updated",
            t + 20,
            active,
            previous,
        ),
    )
    .await;
    assert_eq!(state(&sidecar, "acme").await, GOOD_PAID_PLAN);
}

#[tokio::test]
async fn cancel_after_a_failed_payment_locks_features_without_the_paywall() {
    let sidecar = Sidecar::start(Options::default()).await;
    let t = now() - 100;
    subscribed(&sidecar, "acme", "pro_monthly", t).await;
    deliver(
        &sidecar,
        body(
            "evt_f",
            "invoice.payment_failed",
            t + 10,
            invoice("acme"),
            None,
        ),
    )
    .await;
    let past_due = subscription("acme", "past_due", "pro_monthly");
    deliver(
        &sidecar,
        body(
            "evt_pd",
            "customer.subscription.updated",
            t + 10,
            past_due,
            None,
        ),
    )
    .await;
    let canceled = subscription("acme", "canceled", "pro_monthly");
    let previous = Some(json!({"status": "past_due"}));
    deliver(
        &sidecar,
        body(
            "evt_cx",
            "customer.subscription.updated",
            t + 30,
            canceled.clone(),
            previous,
        ),
    )
    .await;
    deliver(
        &sidecar,
        body(
            "evt_del",
            "customer.subscription.deleted",
            t + 30,
            canceled,
            None,
        ),
    )
    .await;
    assert_eq!(state(&sidecar, "acme").await, OVER);

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
    let t = now() - 100;
    subscribed(&sidecar, "acme", "pro_monthly", t).await;
    let paused = subscription("acme", "paused", "pro_monthly");
    let previous = Some(json!({"status": "active"}));
    deliver(
        &sidecar,
        body(
            "evt_pz",
            "customer.subscription.paused",
            t + 10,
            paused.clone(),
            None,
        ),
    )
    .await;
    deliver(
        &sidecar,
        body(
            "evt_pu",
            "customer.subscription.updated",
            t + 10,
            paused,
            previous,
        ),
    )
    .await;
    assert_eq!(state(&sidecar, "acme").await, OVER);
    let active = subscription("acme", "active", "pro_monthly");
    let previous = Some(json!({"status": "paused"}));
    // The update first this time: the pair arrives in either order.
    deliver(
        &sidecar,
        body(
            "evt_ru",
            "customer.subscription.updated",
            t + 20,
            active.clone(),
            previous,
        ),
    )
    .await;
    deliver(
        &sidecar,
        body(
            "evt_rz",
            "customer.subscription.resumed",
            t + 20,
            active,
            None,
        ),
    )
    .await;
    assert_eq!(state(&sidecar, "acme").await, GOOD_PAID_PLAN);
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
    assert!(older.flag_changes.is_empty());
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

/// Point 2's property: 200 random realistic histories, each delivered chronologically and in
/// 5 shuffled orders with redeliveries, all end in the same flags; those ending in a
/// subscription event end in the table's state. Fixed seed: a failure reproduces.
#[tokio::test]
async fn any_delivery_order_of_a_realistic_history_ends_in_the_same_flags() {
    let report = histories::check(0x5eed_2026, 200, 5).await;
    assert!(
        report.divergences.is_empty(),
        "{} divergences, first: {:#?}",
        report.divergences.len(),
        &report.divergences[..report.divergences.len().min(3)]
    );
    assert_eq!((report.histories, report.deliveries), (200, 1200));
    // Not vacuous: many histories end in a subscription event, and those are checked
    // against the table.
    assert!(report.ending_in_a_subscription_event > 100, "{report:?}");
}
