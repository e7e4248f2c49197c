//! Input anyone can send must not buy durable writes one for one: floods of forged webhooks
//! and of denials with a new tenant id per call add a bounded number of audit records, keep
//! every occurrence in their counts, and leave memory and real deliveries alone.
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::abuse::audit_records;
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
    assert!(denied.len() <= bound + 1, "{} records", denied.len());
    assert_eq!(
        denied.iter().map(count).sum::<u64>(),
        distinct + 2 * identical,
        "every denial is in some record's count"
    );
    assert_eq!(
        denied.iter().filter(|r| r.tenant_id == "acme").count(),
        1,
        "acme's later denials were counted, not written one by one"
    );
}
