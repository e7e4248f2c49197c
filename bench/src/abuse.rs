//! Phases that put the sidecar under input anyone can send: a forged-webhook flood next to real
//! deliveries, and Authorize denials with a new tenant id on every call. Each is measured in
//! alternating one-second rounds against its calm counterpart, so both see the same machine,
//! and reported as a ratio to it; the audit records each flood added are counted afterwards.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use coresdk::proto::{
    AuthorizeRequest, HandleStripeWebhookRequest, QueryAuditRequest,
    audit_service_client::AuditServiceClient, auth_service_client::AuthServiceClient,
    webhook_service_client::WebhookServiceClient,
};
use tonic::transport::Channel;

use crate::{Phase, print_phase, run_phase};

/// A badly signed delivery, as a forger would send it.
fn forged(n: u64) -> HandleStripeWebhookRequest {
    let payload = serde_json::json!({
        "id": format!("evt_forged_{n}"),
        "object": "event",
        "type": "invoice.paid",
        "created": coresdk::time::now_s(),
        "data": {"object": {"object": "invoice", "customer": "cus_bench_0"}},
    })
    .to_string()
    .into_bytes();
    let signature_header =
        coresdk::stripe::sign_header("whsec_forged", coresdk::time::now_s(), &payload);
    HandleStripeWebhookRequest {
        include_proof: false,
        payload,
        signature_header,
    }
}

/// Forged deliveries at a steady `rate` per second from `senders` tasks until stopped.
struct Flood {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Flood {
    fn start(
        channels: &Arc<Vec<Channel>>,
        rate: u64,
        senders: usize,
        sent: &Arc<AtomicU64>,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let every = Duration::from_secs_f64(senders as f64 / rate.max(1) as f64);
        let tasks = (0..senders)
            .map(|s| {
                let mut client = WebhookServiceClient::new(channels[s % channels.len()].clone());
                let (stop, sent) = (stop.clone(), sent.clone());
                tokio::spawn(async move {
                    let mut ticker = tokio::time::interval(every);
                    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                    while !stop.load(Ordering::Relaxed) {
                        ticker.tick().await;
                        let n = sent.fetch_add(1, Ordering::Relaxed);
                        let _ = client.handle_stripe_webhook(forged(n)).await;
                    }
                })
            })
            .collect();
        Self { stop, tasks }
    }

    async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

/// Audit records whose event starts with `prefix`.
async fn audit_count(channel: Channel, prefix: &str) -> Result<usize, tonic::Status> {
    let mut client = AuditServiceClient::new(channel);
    let (mut total, mut page_token) = (0, String::new());
    loop {
        let page = client
            .query(QueryAuditRequest {
                event_prefix: prefix.into(),
                page_size: 1000,
                page_token,
                ..Default::default()
            })
            .await?
            .into_inner();
        total += page.records.len();
        if page.next_page_token.is_empty() {
            return Ok(total);
        }
        page_token = page.next_page_token;
    }
}

fn merge(into: Option<Phase>, phase: Phase) -> Option<Phase> {
    Some(match into {
        Some(p) => p.merge(phase),
        None => phase,
    })
}

/// Durable webhook throughput with and without a forged flood, alternating rounds.
pub async fn forged_flood<F, Fut>(
    channels: &Arc<Vec<Channel>>,
    concurrency: usize,
    rounds: u64,
    rate: u64,
    webhook_call: Arc<F>,
) -> Result<(), Box<dyn std::error::Error>>
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let before = audit_count(channels[0].clone(), "billing.webhook.refused").await?;
    let sent = Arc::new(AtomicU64::new(0));
    let (mut calm, mut flooded) = (None, None);
    let round = Duration::from_secs(1);
    let warm_up = Duration::from_millis(300);
    for _ in 0..rounds {
        let c = run_phase(
            "webhooks, no flood",
            concurrency,
            warm_up,
            round,
            webhook_call.clone(),
        )
        .await;
        calm = merge(calm, c);
        let flood = Flood::start(channels, rate, 16, &sent);
        let f = run_phase(
            "webhooks, forged flood",
            concurrency,
            warm_up,
            round,
            webhook_call.clone(),
        )
        .await;
        flood.stop().await;
        flooded = merge(flooded, f);
    }
    let (Some(calm), Some(flooded)) = (calm, flooded) else {
        return Err("no rounds ran".into());
    };
    print_phase(&calm, None);
    print_phase(&flooded, Some(&calm));
    // Coalesced records are written off the request path: give the writer a moment.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let added = audit_count(channels[0].clone(), "billing.webhook.refused")
        .await?
        .saturating_sub(before);
    println!(
        "  forged deliveries sent: {} (target {rate}/s while flooding); billing.webhook.refused records added: {added}",
        sent.load(Ordering::Relaxed)
    );
    Ok(())
}

/// One Authorize that is denied (no tenant has `pro_features` on under these names).
async fn denied(mut client: AuthServiceClient<Channel>, tenant_id: String) -> bool {
    client
        .authorize(AuthorizeRequest {
            token: String::new(),
            tenant_id,
            required_features: vec!["pro_features".into()],
            deny_if: Vec::new(),
            resource: "GET /bench".into(),
            include_claims: false,
        })
        .await
        .is_ok_and(|answer| answer.into_inner().problem.is_some())
}

/// Authorize throughput when every call names a tenant never seen before (after `distinct`
/// such calls), against one denied tenant over and over, alternating rounds; and that one
/// tenant before the fill, since a fill that slows every call would hide in the ratio.
pub async fn distinct_denials(
    channels: &Arc<Vec<Channel>>,
    concurrency: usize,
    rounds: u64,
    distinct: u64,
) -> Result<(), Box<dyn std::error::Error>> {
    let before = audit_count(channels[0].clone(), "auth.denied").await?;
    let next = Arc::new(AtomicU64::new(0));
    let chans = channels.clone();
    let counter = next.clone();
    let fresh_call = Arc::new(move |w: usize, _n: u64| {
        let k = counter.fetch_add(1, Ordering::Relaxed);
        denied(
            AuthServiceClient::new(chans[w % chans.len()].clone()),
            format!("denied-{k}"),
        )
    });
    let chans = channels.clone();
    let same_call = Arc::new(move |w: usize, _n: u64| {
        denied(
            AuthServiceClient::new(chans[w % chans.len()].clone()),
            "denied-always".into(),
        )
    });

    // The same tenant before the fill: what the fill itself may cost every later call.
    let mut unfilled = None;
    for _ in 0..rounds {
        let s = run_phase(
            "Authorize, one tenant, unfilled",
            concurrency,
            Duration::from_millis(300),
            Duration::from_secs(1),
            same_call.clone(),
        )
        .await;
        unfilled = merge(unfilled, s);
    }
    let unfilled = unfilled.ok_or("no rounds ran")?;

    // Fill: `distinct` tenants denied once each (bounded in time, for a slow sidecar).
    let started = Instant::now();
    let limit = Duration::from_secs(60);
    let fill: Vec<_> = (0..concurrency)
        .map(|w| {
            let (call, next) = (fresh_call.clone(), next.clone());
            tokio::spawn(async move {
                while next.load(Ordering::Relaxed) < distinct && started.elapsed() < limit {
                    call(w, 0).await;
                }
            })
        })
        .collect();
    for task in fill {
        let _ = task.await;
    }
    println!(
        "  filled: {} distinct denied tenants in {:.1} s",
        next.load(Ordering::Relaxed),
        started.elapsed().as_secs_f64()
    );

    let (mut same, mut fresh) = (None, None);
    let round = Duration::from_secs(1);
    let warm_up = Duration::from_millis(300);
    for _ in 0..rounds {
        let s = run_phase(
            "Authorize, one denied tenant",
            concurrency,
            warm_up,
            round,
            same_call.clone(),
        )
        .await;
        same = merge(same, s);
        let f = run_phase(
            "Authorize, a new tenant/call",
            concurrency,
            warm_up,
            round,
            fresh_call.clone(),
        )
        .await;
        fresh = merge(fresh, f);
    }
    let (Some(same), Some(fresh)) = (same, fresh) else {
        return Err("no rounds ran".into());
    };
    print_phase(&unfilled, None);
    print_phase(&same, Some(&unfilled));
    print_phase(&fresh, Some(&same));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let added = audit_count(channels[0].clone(), "auth.denied")
        .await?
        .saturating_sub(before);
    println!(
        "  denials: {} distinct tenants in all; auth.denied records added: {added}",
        next.load(Ordering::Relaxed)
    );
    Ok(())
}
