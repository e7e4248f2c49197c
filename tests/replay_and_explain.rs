//! Issue 10, points 4 and 5 against the real binary: `coresdk stripe replay` feeds exported
//! events through the webhook path (admin token, actor `replay`, the operator's reason), and
//! `coresdk flags explain` says what set a flag and what came too late for it.
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::*;
use coresdk::proto::{
    ExplainFlagRequest, ExplainFlagResponse, QueryAuditRequest, ReplayStripeEventRequest,
    SetFlagRequest, WebhookOutcome, explain_flag_response::SetBy,
};
use serde_json::json;
use tonic::Code;

fn replay(sidecar: &Sidecar, file: &Path, reason: &str, envs: &[(&str, &str)]) -> Output {
    let file = file.to_str().expect("a UTF-8 path");
    run_coresdk(
        None,
        &[
            "stripe",
            "replay",
            file,
            "--reason",
            reason,
            "--addr",
            &sidecar.addr,
        ],
        envs,
    )
}

const WITH_ADMIN_TOKEN: &[(&str, &str)] = &[("CORESDK_ADMIN_TOKEN", ADMIN_TOKEN)];

/// `lines` as a JSON Lines export, `events.jsonl` in `dir`.
fn json_lines_export(dir: &Path, lines: &[String]) -> PathBuf {
    let file = dir.join("events.jsonl");
    std::fs::write(&file, lines.join("\n")).expect("written");
    file
}

/// Fails showing the whole `text` when it lacks `needle`.
#[track_caller]
fn assert_contains(text: &str, needle: &str) {
    assert!(text.contains(needle), "{needle:?} is not in:\n{text}");
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// An invoice event for `tenant` (named by the object's metadata, so no mapping is needed).
fn invoice(id: &str, event_type: &str, created: i64, tenant: &str) -> serde_json::Value {
    let body = event(
        id,
        event_type,
        created,
        json!({"id": format!("in_{id}"), "customer": format!("cus_{tenant}"), "metadata": {"tenant_id": tenant}}),
    );
    serde_json::from_slice(&body).expect("JSON")
}

/// Stripe's own, signed delivery of `event`.
async fn deliver(
    sidecar: &Sidecar,
    event: &serde_json::Value,
) -> coresdk::proto::HandleStripeWebhookResponse {
    let body = serde_json::to_vec(event).expect("JSON");
    sidecar
        .webhooks()
        .handle_stripe_webhook(signed(SECRET, body))
        .await
        .expect("acknowledged")
        .into_inner()
}

/// The lines of stdout that report an event, in the order they were replayed.
fn replayed_ids(output: &Output) -> Vec<String> {
    stdout(output)
        .lines()
        .filter(|l| !l.starts_with("replayed "))
        .filter_map(|l| {
            l.split_whitespace()
                .find(|word| word.starts_with("evt_"))
                .map(str::to_owned)
        })
        .collect()
}

fn string_field(record: &coresdk::proto::AuditRecord, field: &str) -> Option<String> {
    let value = record.metadata.as_ref()?.fields.get(field)?;
    match value.kind.as_ref()? {
        prost_types::value::Kind::StringValue(s) => Some(s.clone()),
        _ => None,
    }
}

async fn billing_records(sidecar: &Sidecar, tenant: &str) -> Vec<coresdk::proto::AuditRecord> {
    sidecar
        .audit()
        .query(QueryAuditRequest {
            tenant_id: tenant.into(),
            event_prefix: "billing.".into(),
            ..Default::default()
        })
        .await
        .expect("Query")
        .into_inner()
        .records
}

async fn try_explain(
    sidecar: &Sidecar,
    tenant: &str,
    key: &str,
) -> Result<ExplainFlagResponse, tonic::Status> {
    let request = ExplainFlagRequest {
        tenant_id: tenant.into(),
        key: key.into(),
    };
    let answer = sidecar.flags().explain_flag(request).await?;
    Ok(answer.into_inner())
}

async fn explain(sidecar: &Sidecar, tenant: &str, key: &str) -> ExplainFlagResponse {
    try_explain(sidecar, tenant, key)
        .await
        .expect("ExplainFlag")
}

/// `coresdk flags explain TENANT KEY EXTRA…` against `sidecar`.
fn explain_command(sidecar: &Sidecar, tenant: &str, key: &str, extra: &[&str]) -> Output {
    let mut args = vec!["flags", "explain", tenant, key, "--addr", &sidecar.addr];
    args.extend_from_slice(extra);
    run_coresdk(None, &args, &[])
}

/// `ReplayStripeEvent` with the admin token, or without any when `as_admin` is false.
async fn replay_rpc(
    sidecar: &Sidecar,
    payload: Vec<u8>,
    reason: &str,
    as_admin: bool,
) -> Result<coresdk::proto::HandleStripeWebhookResponse, tonic::Status> {
    let message = ReplayStripeEventRequest {
        payload,
        reason: reason.into(),
    };
    let request = if as_admin {
        admin(message)
    } else {
        tonic::Request::new(message)
    };
    let answer = sidecar.webhooks().replay_stripe_event(request).await?;
    Ok(answer.into_inner())
}

#[tokio::test]
async fn a_list_events_page_replays_oldest_first_audited_as_replay_and_again_as_duplicates() {
    let sidecar = Sidecar::start(Options::default()).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let t = now() - 86_400;
    // Stripe lists newest first; the failure came after the payment, so it must win.
    let page = json!({
        "object": "list",
        "url": "/v1/events",
        "has_more": false,
        "data": [
            invoice("evt_failed", "invoice.payment_failed", t + 60, "acme"),
            invoice("evt_paid", "invoice.paid", t, "acme"),
        ],
    });
    let file = dir.path().join("events.json");
    std::fs::write(&file, serde_json::to_vec_pretty(&page).expect("JSON")).expect("written");

    let output = replay(&sidecar, &file, "outage 2026-11-28", WITH_ADMIN_TOKEN);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}{}",
        stdout(&output),
        stderr(&output)
    );
    assert_eq!(replayed_ids(&output), ["evt_paid", "evt_failed"]);
    assert_contains(&stdout(&output), "replayed 2 of 2 events: 2 applied");
    assert!(!is_on(&sidecar, "acme", "pro_features").await);
    assert!(is_on(&sidecar, "acme", "paywall_active").await);

    let records = billing_records(&sidecar, "acme").await;
    assert_eq!(records.len(), 2);
    for record in &records {
        assert_eq!(record.actor, "replay");
        assert_eq!(record.outcome, "applied");
        assert_eq!(
            string_field(record, "reason").as_deref(),
            Some("outage 2026-11-28")
        );
    }

    // The same export again: every event is a duplicate and nothing changes.
    let again = replay(
        &sidecar,
        &file,
        "outage 2026-11-28, again",
        WITH_ADMIN_TOKEN,
    );
    assert_eq!(again.status.code(), Some(0), "{}", stderr(&again));
    assert_eq!(
        stdout(&again).matches(": DUPLICATE").count(),
        2,
        "{}",
        stdout(&again)
    );
    assert!(stdout(&again).contains("replayed 2 of 2 events: 2 duplicate"));
    assert!(is_on(&sidecar, "acme", "paywall_active").await);

    // Stripe's own later delivery of a replayed event is a duplicate as well.
    let redelivered = deliver(&sidecar, &invoice("evt_paid", "invoice.paid", t, "acme")).await;
    assert_eq!(redelivered.outcome(), WebhookOutcome::Duplicate);
}

#[tokio::test]
async fn json_lines_replay_an_event_older_than_the_flag_s_setter_as_stale_and_explain_lists_it() {
    let sidecar = Sidecar::start(Options::default()).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let t = now() - 3_600;
    // Stripe delivered the newest event itself.
    let delivered = deliver(&sidecar, &invoice("evt_new", "invoice.paid", t, "globex")).await;
    assert_eq!(delivered.outcome(), WebhookOutcome::Applied);

    let lines = [
        invoice(
            "evt_old_failure",
            "invoice.payment_failed",
            t - 600,
            "globex",
        )
        .to_string(),
        String::new(),
        invoice("evt_other", "invoice.paid", t - 900, "initech").to_string(),
        "   ".to_owned(),
    ];
    let file = json_lines_export(dir.path(), &lines);
    let output = replay(&sidecar, &file, "recover globex", WITH_ADMIN_TOKEN);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}{}",
        stdout(&output),
        stderr(&output)
    );
    let out = stdout(&output);
    assert_eq!(replayed_ids(&output), ["evt_other", "evt_old_failure"]);
    assert!(out.contains("line 1 evt_old_failure"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.contains("evt_old_failure") && l.contains(": STALE")),
        "{out}"
    );
    assert!(out.contains("1 applied, 1 stale"), "{out}");
    assert!(is_on(&sidecar, "globex", "pro_features").await);
    assert!(is_on(&sidecar, "initech", "pro_features").await);

    // Explain names the delivered event and lists the replayed one that came too late.
    let explained = explain(&sidecar, "globex", "pro_features").await;
    let Some(SetBy::Event(setter)) = &explained.set_by else {
        panic!("set by an event: {explained:?}");
    };
    assert_eq!(setter.event_id, "evt_new");
    assert_eq!(setter.event_type, "invoice.paid");
    assert_eq!(setter.created, t);
    assert_eq!(setter.actor, "stripe-webhook");
    assert_eq!(setter.audit_seq, delivered.audit_seq);
    // The built-in rule's name, as the setting event's audit record gives it.
    assert_eq!(explained.rule, "invoice paid");
    assert_eq!(explained.stale_events.len(), 1, "{explained:?}");
    let stale = &explained.stale_events[0];
    assert_eq!(stale.event_id, "evt_old_failure");
    assert_eq!(stale.actor, "replay");
    assert_eq!(stale.reason, "recover globex");
    assert_eq!(stale.created, t - 600);
    assert!(stale.audit_seq > setter.audit_seq);

    // The command line prints the same facts.
    let printed = explain_command(&sidecar, "globex", "pro_features", &[]);
    assert_eq!(printed.status.code(), Some(0), "{}", stderr(&printed));
    let text = stdout(&printed);
    assert!(text.starts_with("pro_features of globex = on"), "{text}");
    assert!(
        text.contains("set by: event evt_new (invoice.paid"),
        "{text}"
    );
    assert!(text.contains("rule: invoice paid"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.trim_start().starts_with("event evt_old_failure")
                && l.contains("replayed by replay")),
        "{text}"
    );
    let as_json = explain_command(&sidecar, "globex", "pro_features", &["--json"]);
    let parsed: serde_json::Value = serde_json::from_slice(&as_json.stdout).expect("JSON");
    assert_eq!(parsed["value"], json!(true));
    assert_eq!(parsed["set_by"]["event"]["event_id"], json!("evt_new"));
    assert_eq!(
        parsed["stale_events"][0]["event_id"],
        json!("evt_old_failure")
    );
}

#[tokio::test]
async fn explain_names_an_admin_change_a_default_and_refuses_an_unknown_key() {
    let sidecar = Sidecar::start(Options::default()).await;
    let set = sidecar
        .flags()
        .set_flag(admin(SetFlagRequest {
            tenant_id: "umbrella".into(),
            key: "pro_features".into(),
            value: Some(coresdk::proto::FlagValue {
                kind: Some(coresdk::proto::flag_value::Kind::BoolValue(true)),
            }),
            actor: "ops@umbrella".into(),
            reason: "ticket 42".into(),
        }))
        .await
        .expect("SetFlag")
        .into_inner();
    let explained = explain(&sidecar, "umbrella", "pro_features").await;
    let Some(SetBy::Admin(change)) = &explained.set_by else {
        panic!("set by an admin: {explained:?}");
    };
    // The operator whose token made the change (CORESDK_ADMIN_TOKEN's: `admin`), not the claim.
    assert_eq!(change.actor, "admin");
    assert_eq!(change.reason, "ticket 42");
    assert_eq!(change.version, set.version);
    assert!(change.audit_seq > 0);
    let printed = explain_command(&sidecar, "umbrella", "pro_features", &[]);
    let text = stdout(&printed);
    assert!(
        text.contains("set by: operator admin") && text.contains("(reason: ticket 42)"),
        "{text}"
    );

    let default = explain(&sidecar, "umbrella", "paywall_active").await;
    assert!(default.flag.as_ref().is_some_and(|f| f.is_default));
    assert!(default.set_by.is_none());

    let unknown = try_explain(&sidecar, "umbrella", "no_such_flag")
        .await
        .expect_err("unknown key");
    assert_eq!(unknown.code(), Code::NotFound);
    let bad_tenant = try_explain(&sidecar, "a\u{202e}b", "pro_features")
        .await
        .expect_err("bad tenant id");
    assert_eq!(bad_tenant.code(), Code::InvalidArgument);
    let printed = explain_command(&sidecar, "umbrella", "no_such_flag", &[]);
    assert_eq!(printed.status.code(), Some(1));
    assert_contains(&stderr(&printed), "NotFound");
}

#[tokio::test]
async fn replay_needs_the_admin_token_a_reason_and_a_plausible_created() {
    let sidecar = Sidecar::start(Options::default()).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let t = now() - 600;
    let lines = [
        invoice("evt_1", "invoice.paid", t, "hooli").to_string(),
        invoice("evt_2", "invoice.paid", t + 1, "hooli").to_string(),
    ];
    let file = json_lines_export(dir.path(), &lines);

    // No token: the first refusal stops the run; nothing is applied.
    let output = replay(&sidecar, &file, "no token", &[]);
    assert_eq!(output.status.code(), Some(1), "{}", stdout(&output));
    assert_contains(&stdout(&output), "FAILED Unauthenticated");
    assert_contains(&stderr(&output), "1 not sent");
    let wrong = replay(
        &sidecar,
        &file,
        "wrong token",
        &[("CORESDK_ADMIN_TOKEN", "not-the-token")],
    );
    assert_eq!(wrong.status.code(), Some(1));
    assert!(flag(&sidecar, "hooli", "pro_features").await.is_default);
    assert!(billing_records(&sidecar, "hooli").await.is_empty());

    // The RPC itself refuses without the token, without a reason, and for an event from the
    // future or one with no `created`.
    let payload = serde_json::to_vec(&invoice("evt_1", "invoice.paid", t, "hooli")).expect("JSON");
    let unauthenticated = replay_rpc(&sidecar, payload.clone(), "why", false)
        .await
        .expect_err("no token");
    assert_eq!(unauthenticated.code(), Code::Unauthenticated);
    let no_reason = replay_rpc(&sidecar, payload.clone(), "  ", true)
        .await
        .expect_err("no reason");
    assert_eq!(no_reason.code(), Code::InvalidArgument);
    assert_eq!(problem(&no_reason).status, 400);
    let future = serde_json::to_vec(&invoice("evt_f", "invoice.paid", now() + 3_600, "hooli"))
        .expect("JSON");
    let from_the_future = replay_rpc(&sidecar, future, "why", true)
        .await
        .expect_err("created in the future");
    assert_eq!(from_the_future.code(), Code::InvalidArgument);
    assert_contains(from_the_future.message(), "after now");
    let undated = br#"{"id":"evt_u","type":"invoice.paid","data":{"object":{"metadata":{"tenant_id":"hooli"}}}}"#;
    let undated = replay_rpc(&sidecar, undated.to_vec(), "why", true)
        .await
        .expect_err("no created");
    assert_eq!(undated.code(), Code::InvalidArgument);
    assert_contains(
        undated.message(),
        "no `created` in the event; Stripe always sends one",
    );
    assert!(flag(&sidecar, "hooli", "pro_features").await.is_default);

    // With the token and a reason it applies.
    let replayed = replay_rpc(&sidecar, payload, "why", true)
        .await
        .expect("replayed");
    assert_eq!(replayed.outcome(), WebhookOutcome::Applied);
    assert!(is_on(&sidecar, "hooli", "pro_features").await);
}

#[tokio::test]
async fn a_dash_reads_the_export_from_standard_input() {
    use std::io::Write as _;
    let sidecar = Sidecar::start(Options::default()).await;
    let mut child = Command::new(binary())
        .args([
            "stripe",
            "replay",
            "-",
            "--reason",
            "piped",
            "--addr",
            &sidecar.addr,
        ])
        .env_clear()
        .env("CORESDK_LOG", "error")
        .env("CORESDK_ADMIN_TOKEN", ADMIN_TOKEN)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary runs");
    let event = invoice("evt_piped", "invoice.paid", now() - 60, "wayne");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(event.to_string().as_bytes())
        .expect("written");
    let output = child.wait_with_output().expect("it ends");
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_contains(&stdout(&output), "evt_piped invoice.paid");
    assert!(is_on(&sidecar, "wayne", "pro_features").await);
}

#[tokio::test]
async fn a_malformed_export_sends_nothing_and_says_where() {
    let sidecar = Sidecar::start(Options::default()).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let t = now() - 600;
    let lines = [
        invoice("evt_1", "invoice.paid", t, "pied").to_string(),
        "{\"id\": \"evt_2\", \"type\": \"invoice.paid\"".to_owned(),
    ];
    let file = json_lines_export(dir.path(), &lines);
    let output = replay(&sidecar, &file, "broken file", WITH_ADMIN_TOKEN);
    assert_eq!(output.status.code(), Some(2));
    let error = stderr(&output);
    assert!(error.contains("line 2: not JSON"), "{error}");
    assert!(error.contains("nothing was sent"), "{error}");
    assert!(stdout(&output).is_empty());

    let page = dir.path().join("page.json");
    let missing_type = json!({"object": "list", "data": [
        invoice("evt_1", "invoice.paid", t, "pied"),
        {"id": "evt_2", "created": t},
    ]});
    std::fs::write(&page, missing_type.to_string()).expect("written");
    let output = replay(&sidecar, &page, "broken page", WITH_ADMIN_TOKEN);
    assert_eq!(output.status.code(), Some(2));
    assert_contains(&stderr(&output), "data[1]: not a Stripe event");

    let missing = replay(
        &sidecar,
        &dir.path().join("absent.json"),
        "typo",
        WITH_ADMIN_TOKEN,
    );
    assert_eq!(missing.status.code(), Some(2));
    assert_contains(&stderr(&missing), "cannot open");

    assert!(flag(&sidecar, "pied", "pro_features").await.is_default);
    assert!(billing_records(&sidecar, "pied").await.is_empty());
}

#[tokio::test]
async fn an_unmapped_customer_s_event_fails_alone_is_parked_and_applies_on_mapping() {
    let sidecar = Sidecar::start(Options::default()).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let t = now() - 600;
    let unmapped = event(
        "evt_unmapped",
        "invoice.paid",
        t,
        json!({"customer": "cus_nobody"}),
    );
    let lines = [
        String::from_utf8(unmapped).expect("UTF-8"),
        invoice("evt_ok", "invoice.paid", t + 5, "stark").to_string(),
    ];
    let file = json_lines_export(dir.path(), &lines);
    let output = replay(&sidecar, &file, "partial", WITH_ADMIN_TOKEN);
    assert_eq!(output.status.code(), Some(1), "{}", stdout(&output));
    let out = stdout(&output);
    assert!(
        out.lines()
            .any(|l| l.contains("evt_unmapped") && l.contains("FAILED FailedPrecondition")),
        "{out}"
    );
    assert!(
        out.contains("replayed 2 of 2 events: 1 applied, 1 failed"),
        "{out}"
    );
    assert!(is_on(&sidecar, "stark", "pro_features").await);

    // Refused like a delivery, and parked like one: mapping the customer applies it, still
    // as the operator's replay.
    let refused = common::parking::records_of(&sidecar, "evt_unmapped").await;
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(
        (refused[0].actor.as_str(), &refused[0].metadata["parked"]),
        ("replay", &json!(true))
    );
    common::audit::map(&sidecar, "cus_nobody", "nobodyco").await;
    assert!(is_on(&sidecar, "nobodyco", "pro_features").await);
    let applied = common::parking::records_of(&sidecar, "evt_unmapped").await;
    let applied = applied.last().expect("a record");
    assert_eq!(
        (
            applied.outcome.as_str(),
            applied.actor.as_str(),
            &applied.metadata["reason"]
        ),
        ("applied", "replay", &json!("partial"))
    );
    let again = replay(&sidecar, &file, "again", WITH_ADMIN_TOKEN);
    assert_eq!(again.status.code(), Some(0), "{}", stdout(&again));
    assert_contains(&stdout(&again), "replayed 2 of 2 events: 2 duplicate");
}

#[tokio::test]
async fn a_replayed_event_meets_the_webhook_body_limit() {
    let mut options = Options::default();
    options
        .envs
        .push(("CORESDK_WEBHOOK_MAX_BODY_BYTES".into(), "2048".into()));
    let sidecar = Sidecar::start(options).await;
    let mut padded = invoice("evt_big", "invoice.paid", now() - 60, "cyberdyne");
    padded["data"]["object"]["description"] = json!("x".repeat(4096));
    let refused = replay_rpc(
        &sidecar,
        serde_json::to_vec(&padded).expect("JSON"),
        "too big",
        true,
    )
    .await
    .expect_err("over the body limit");
    assert_eq!(problem(&refused).status, 413);
    assert_eq!(error_reason(&refused), "PAYLOAD_TOO_LARGE");
    assert!(flag(&sidecar, "cyberdyne", "pro_features").await.is_default);
}

#[tokio::test]
async fn explain_names_the_newest_event_that_confirmed_the_value_and_the_stale_ones_are_older_than_it()
 {
    let sidecar = Sidecar::start(Options::default()).await;
    let t = now();
    // Paid, paid again later (a confirmation: the value stays, the order mark moves), then a
    // failure dated between the two arrives: older than the newest event, so stale.
    for (id, event_type, created) in [
        ("evt_first_paid", "invoice.paid", t - 100),
        ("evt_second_paid", "invoice.paid", t),
        ("evt_failed_between", "invoice.payment_failed", t - 50),
    ] {
        deliver(&sidecar, &invoice(id, event_type, created, "hooli")).await;
    }
    let explained = explain(&sidecar, "hooli", "pro_features").await;
    let Some(SetBy::Event(setter)) = &explained.set_by else {
        panic!("set by an event: {explained:?}");
    };
    assert_eq!(setter.event_id, "evt_first_paid");
    let newest = explained
        .newest_event
        .as_ref()
        .expect("a newer confirming event");
    assert_eq!(
        (newest.event_id.as_str(), newest.created),
        ("evt_second_paid", t)
    );
    let stale: Vec<&str> = explained
        .stale_events
        .iter()
        .map(|e| e.event_id.as_str())
        .collect();
    assert_eq!(stale, ["evt_failed_between"]);

    let printed = explain_command(&sidecar, "hooli", "pro_features", &[]);
    let text = stdout(&printed);
    assert!(text.contains("order mark: event evt_second_paid"), "{text}");
    let as_json = explain_command(&sidecar, "hooli", "pro_features", &["--json"]);
    let parsed: serde_json::Value = serde_json::from_slice(&as_json.stdout).expect("JSON");
    assert_eq!(parsed["newest_event"]["event_id"], json!("evt_second_paid"));

    // When the setter is the newest event, there is no separate one to name.
    deliver(
        &sidecar,
        &invoice("evt_only", "invoice.paid", t, "pied-piper"),
    )
    .await;
    let setter_only = explain(&sidecar, "pied-piper", "pro_features").await;
    assert!(setter_only.newest_event.is_none(), "{setter_only:?}");
}
