//! Input anyone can send must not buy durable writes one for one: floods of forged webhooks
//! and of denials with a new tenant id per call add a bounded number of audit records, keep
//! every occurrence in their counts, and leave memory and real deliveries alone.
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::abuse::{audit_records, start_logging};
use common::*;
use coresdk::coalesce::MAX_RECORDS_PER_WINDOW;
use coresdk::proto::{
    AuditRecord, AuthorizeRequest, WebhookOutcome, auth_service_client::AuthServiceClient,
};
use prost_types::value::Kind;
use serde_json::json;
use tokio::sync::Semaphore;

/// Calls in flight at once during a flood.
const CONCURRENCY: usize = 32;

/// Waits (bounded) until at least `at_least` records exist under `event_prefix`, then a little
/// longer for stragglers, and returns them.
async fn settled_records(
    sidecar: &Sidecar,
    event_prefix: &str,
    at_least: usize,
) -> Vec<AuditRecord> {
    let deadline = Instant::now() + Duration::from_secs(15);
    while audit_records(sidecar, event_prefix).await.len() < at_least && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The writer runs its periodic flush once a second.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    audit_records(sidecar, event_prefix).await
}

fn field<'a>(record: &'a AuditRecord, name: &str) -> Option<&'a Kind> {
    record.metadata.as_ref()?.fields.get(name)?.kind.as_ref()
}

fn count(record: &AuditRecord) -> u64 {
    match field(record, "count") {
        Some(Kind::NumberValue(n)) => *n as u64,
        other => panic!("record {} carries no count: {other:?}", record.seq),
    }
}

fn text<'a>(record: &'a AuditRecord, name: &str) -> Option<&'a str> {
    match field(record, name) {
        Some(Kind::StringValue(s)) => Some(s),
        _ => None,
    }
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("a VmRSS line")
}

#[tokio::test]
async fn a_forged_webhook_flood_adds_a_bounded_number_of_counted_records() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut sidecar = Sidecar::on_disk(dir.path(), Options::default()).await;
    let forged = 2_000;
    let room = Arc::new(Semaphore::new(CONCURRENCY));
    let mut sends = Vec::new();
    for i in 0..forged {
        let permit = room.clone().acquire_owned().await.expect("open");
        let mut client = sidecar.webhooks();
        let body = event(
            &format!("evt_forged_{i}"),
            "invoice.paid",
            now(),
            json!({"customer": "cus_acme_001"}),
        );
        sends.push(tokio::spawn(async move {
            let answer = client
                .handle_stripe_webhook(signed("whsec_not_the_secret", body))
                .await;
            drop(permit);
            answer
        }));
    }
    for send in sends {
        let status = send.await.expect("joined").expect_err("forged");
        assert_eq!(error_reason(&status), "SIGNATURE_MISMATCH");
    }

    let refused = settled_records(&sidecar, "billing.webhook.refused", 1).await;
    assert!(
        (1..=3).contains(&refused.len()),
        "{forged} forged deliveries added {} records",
        refused.len()
    );
    assert_eq!(count(&refused[0]), 1, "the first is written at once");
    assert_eq!(text(&refused[0], "reason"), Some("SIGNATURE_MISMATCH"));
    assert!(
        text(&refused[0], "claimed_event_id").is_some_and(|id| id.starts_with("evt_forged_")),
        "the claim is read from the body's prefix"
    );

    // A real delivery still goes through.
    let valid = sidecar
        .webhooks()
        .handle_stripe_webhook(signed(
            SECRET,
            event(
                "evt_real",
                "invoice.paid",
                now(),
                json!({"id": "in_1", "customer": "cus_real", "metadata": {"tenant_id": "acme"}}),
            ),
        ))
        .await
        .expect("a signed delivery is accepted")
        .into_inner();
    assert_eq!(valid.outcome(), WebhookOutcome::Applied);
    assert!(is_on(&sidecar, "acme", "pro_features").await);

    // The window is still open: stopping writes its count, so no occurrence is lost.
    assert!(sidecar.stop().success());
    sidecar.restart().await;
    let refused = audit_records(&sidecar, "billing.webhook.refused").await;
    assert!(refused.len() <= 3, "{} records", refused.len());
    assert_eq!(
        refused.iter().map(count).sum::<u64>(),
        forged,
        "the counts add up to the forged deliveries: {refused:?}"
    );
    let repeats = refused
        .iter()
        .find(|r| text(r, "coalesced") == Some("repeats"))
        .expect("the repeats were written at the stop");
    assert_eq!(text(repeats, "reason"), Some("SIGNATURE_MISMATCH"));
    for detail in ["claimed_event_id", "payload_bytes", "detail"] {
        assert!(
            field(repeats, detail).is_none(),
            "the first delivery's {detail} does not apply to the {} others: {repeats:?}",
            count(repeats)
        );
    }
}

async fn deny(client: &mut AuthServiceClient<tonic::transport::Channel>, tenant: String) {
    let answer = client
        .authorize(AuthorizeRequest {
            tenant_id: tenant,
            required_features: vec!["pro_features".into()],
            resource: "GET /api/reports".into(),
            ..Default::default()
        })
        .await
        .expect("Authorize answers")
        .into_inner();
    assert!(answer.problem.is_some(), "denied: pro_features is off");
}

#[tokio::test]
async fn denials_with_a_new_tenant_each_call_are_bounded_in_records_and_memory() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut sidecar = Sidecar::on_disk(dir.path(), Options::default()).await;
    let mut client = AuthServiceClient::new(sidecar.channel.clone());

    let identical = 50;
    for _ in 0..identical {
        deny(&mut client, "acme".into()).await;
    }
    let first = settled_records(&sidecar, "auth.denied", 1).await;
    assert_eq!(first.len(), 1, "{identical} identical denials, one record");
    assert_eq!(count(&first[0]), 1);

    let rss_before = rss_kib(sidecar.pid());
    let distinct: u64 = 8_000;
    let room = Arc::new(Semaphore::new(CONCURRENCY));
    let mut calls = Vec::new();
    for i in 0..distinct {
        let permit = room.clone().acquire_owned().await.expect("open");
        let mut client = client.clone();
        calls.push(tokio::spawn(async move {
            deny(&mut client, format!("tenant-{i:06}")).await;
            drop(permit);
        }));
    }
    for call in calls {
        call.await.expect("joined");
    }
    let rss_after = rss_kib(sidecar.pid());

    let denied = settled_records(&sidecar, "auth.denied", 2).await;
    let bound = MAX_RECORDS_PER_WINDOW as usize + 2;
    assert!(
        denied.len() <= bound,
        "{distinct} distinct denials added {} records (bound {bound})",
        denied.len()
    );
    // The coalescing state is bounded (a few MiB): the flood must not grow the process by
    // anything like its key space.
    assert!(
        rss_after < rss_before + 24 * 1024,
        "RSS {rss_before} KiB → {rss_after} KiB"
    );

    // Still coalesced after the flood; the flood's budget is spent, so they are counted.
    for _ in 0..identical {
        deny(&mut client, "acme".into()).await;
    }
    assert!(sidecar.stop().success());
    sidecar.restart().await;
    let denied = audit_records(&sidecar, "auth.denied").await;
    // Each window opened wrote its first record and, if it had any, its repeats.
    assert!(denied.len() <= 2 * bound, "{} records", denied.len());
    assert_eq!(
        denied.iter().map(count).sum::<u64>(),
        distinct + 2 * identical,
        "every denial is in some record's count"
    );
    // The flood spent the budget for new windows, but acme's window was open: its repeats
    // are acme's, not hidden in the overflow.
    let acme: Vec<_> = denied.iter().filter(|r| r.tenant_id == "acme").collect();
    assert_eq!(acme.len(), 2, "acme's first and its repeats: {acme:?}");
    assert_eq!(count(acme[1]), 2 * identical - 1);
    assert_eq!(text(acme[1], "coalesced"), Some("repeats"));
    assert_eq!(text(acme[1], "feature"), Some("pro_features"));
    assert!(
        field(acme[1], "resource").is_none(),
        "one call's resource does not apply to all"
    );
    let overflow: Vec<_> = denied
        .iter()
        .filter(|r| text(r, "coalesced") == Some("overflow"))
        .collect();
    assert!(!overflow.is_empty());
    for record in overflow {
        let Some(Kind::StructValue(reasons)) = field(record, "reasons") else {
            panic!("the overflow breaks its count down by reason: {record:?}");
        };
        let by_reason: u64 = reasons
            .fields
            .values()
            .map(|n| match n.kind {
                Some(Kind::NumberValue(n)) => n as u64,
                _ => panic!("a count per reason: {reasons:?}"),
            })
            .sum();
        assert_eq!(by_reason, count(record));
        assert!(
            reasons
                .fields
                .contains_key(text(acme[0], "reason").expect("a reason"))
        );
    }
}

#[tokio::test]
async fn forged_webhooks_log_a_line_per_window_not_per_request() {
    let (mut sidecar, logs) = start_logging(Options::default(), "info").await;
    let forged = 200;
    let mut client = sidecar.webhooks();
    for i in 0..forged {
        let body = event(&format!("evt_forged_{i}"), "invoice.paid", now(), json!({}));
        client
            .handle_stripe_webhook(signed("whsec_not_the_secret", body))
            .await
            .expect_err("forged");
    }
    let opened = logs.awaiting("webhook refused").await;
    assert_eq!(
        opened.len(),
        1,
        "one line for the window, not one per request"
    );
    assert_eq!(opened[0]["level"], "WARN");

    // The window is still open; stopping closes it, and its count is logged.
    assert!(sidecar.stop().success());
    let closed = logs.awaiting("repeats coalesced").await;
    assert_eq!(closed.len(), 1, "{closed:?}");
    assert_eq!(closed[0]["fields"]["count"], forged - 1);
    assert_eq!(closed[0]["fields"]["reason"], "SIGNATURE_MISMATCH");
    assert_eq!(logs.with_message("webhook refused").len(), 1);
}
