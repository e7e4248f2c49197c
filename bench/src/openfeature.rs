//! The OpenFeature side of the benchmark: flagd's `ResolveBoolean` as a read phase beside
//! `GetFlag`, and how long a change takes to reach a provider.

use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use coresdk::flagd_proto::evaluation::v2::{
    EventStreamRequest, ResolveBooleanRequest, service_client::ServiceClient,
};
use coresdk::proto::webhook_service_client::WebhookServiceClient;
use coresdk::proto::{
    WatchFlagsRequest, flag_service_client::FlagServiceClient, watch_flags_response::Event,
};
use prost_types::{Struct, Value, value::Kind};
use tokio_stream::StreamExt as _;
use tonic::transport::Channel;

use crate::{BoxError, TENANTS, signed_event};

/// An evaluation context naming the tenant the way OpenFeature apps do.
fn tenant_context(tenant: &str) -> Struct {
    Struct {
        fields: [(
            "tenant_id".to_owned(),
            Value {
                kind: Some(Kind::StringValue(tenant.to_owned())),
            },
        )]
        .into(),
    }
}

/// One bench call's outcome, boxed so a phase's calls share one type.
pub type Call = std::pin::Pin<Box<dyn Future<Output = bool> + Send>>;

/// `ResolveBoolean(pro_features)` for the same tenants `GetFlag` reads, spread over the flagd
/// listener's connections.
pub fn resolve_boolean_call(
    channels: Arc<Vec<Channel>>,
) -> Arc<impl Fn(usize, u64) -> Call + Send + Sync> {
    let contexts: Arc<Vec<Struct>> = Arc::new(
        (0..TENANTS)
            .map(|i| tenant_context(&format!("tenant-{i}")))
            .collect(),
    );
    Arc::new(move |w: usize, n: u64| {
        let mut client = ServiceClient::new(channels[w % channels.len()].clone());
        let context = contexts[(n as usize + w) % TENANTS].clone();
        Box::pin(async move {
            client
                .resolve_boolean(ResolveBooleanRequest {
                    flag_key: "pro_features".into(),
                    context: Some(context),
                })
                .await
                .is_ok()
        }) as Call
    })
}

/// A subscriber that learns about flag changes.
pub trait ChangeWatch {
    /// Returns once it has seen a change of `pro_features`.
    async fn changed(&mut self) -> Result<(), BoxError>;
}

/// The sidecar's own `WatchFlags` stream for tenant-1.
pub struct WatchFlags(tonic::Streaming<coresdk::proto::WatchFlagsResponse>);

impl WatchFlags {
    pub async fn open(channel: Channel) -> Result<Self, BoxError> {
        let mut stream = FlagServiceClient::new(channel)
            .watch_flags(WatchFlagsRequest {
                tenant_id: "tenant-1".into(),
            })
            .await?
            .into_inner();
        stream.next().await.ok_or("no snapshot")??;
        Ok(Self(stream))
    }
}

impl ChangeWatch for WatchFlags {
    async fn changed(&mut self) -> Result<(), BoxError> {
        loop {
            let message = tokio::time::timeout(Duration::from_secs(5), self.0.next())
                .await?
                .ok_or("the watch ended")??;
            if let Some(Event::Change(flag)) = message.event
                && flag.key == "pro_features"
            {
                return Ok(());
            }
        }
    }
}

/// flagd's `EventStream` (v2), as an RPC provider follows it: a `configuration_change` naming
/// `pro_features` is when the provider drops its cached value.
pub struct EventStream(tonic::Streaming<coresdk::flagd_proto::evaluation::v2::EventStreamResponse>);

impl EventStream {
    pub async fn open(flagd: Channel) -> Result<Self, BoxError> {
        let mut stream = ServiceClient::new(flagd)
            .event_stream(EventStreamRequest {})
            .await?
            .into_inner();
        let ready = stream.next().await.ok_or("no provider_ready")??;
        if ready.r#type != "provider_ready" {
            return Err(format!("first event {:?}, not provider_ready", ready.r#type).into());
        }
        Ok(Self(stream))
    }
}

impl ChangeWatch for EventStream {
    async fn changed(&mut self) -> Result<(), BoxError> {
        loop {
            let message = tokio::time::timeout(Duration::from_secs(5), self.0.next())
                .await?
                .ok_or("the event stream ended")??;
            let names_the_flag = message
                .data
                .as_ref()
                .and_then(|data| data.fields.get("flags"))
                .and_then(|flags| match &flags.kind {
                    Some(Kind::StructValue(flags)) => {
                        Some(flags.fields.contains_key("pro_features"))
                    }
                    _ => None,
                })
                .unwrap_or(false);
            if message.r#type == "configuration_change" && names_the_flag {
                return Ok(());
            }
        }
    }
}

/// flagd's `SyncFlags` (all tenants), as an in-process provider follows it: a new
/// configuration is when the provider evaluates the change.
pub struct SyncFlags(tonic::Streaming<coresdk::flagd_proto::sync::v1::SyncFlagsResponse>);

impl SyncFlags {
    pub async fn open(sync: Channel) -> Result<Self, BoxError> {
        use coresdk::flagd_proto::sync::v1::{
            SyncFlagsRequest, flag_sync_service_client::FlagSyncServiceClient,
        };
        let mut stream = FlagSyncServiceClient::new(sync)
            .sync_flags(SyncFlagsRequest::default())
            .await?
            .into_inner();
        stream.next().await.ok_or("no first configuration")??;
        Ok(Self(stream))
    }
}

impl ChangeWatch for SyncFlags {
    /// The sidecar sends a configuration only when it differs, and the bench changes only
    /// `pro_features` while measuring: the next one carries the change.
    async fn changed(&mut self) -> Result<(), BoxError> {
        tokio::time::timeout(Duration::from_secs(5), self.0.next())
            .await?
            .ok_or("the sync stream ended")??;
        Ok(())
    }
}

/// The `created` of every measured event, a minute after the first was sent (Stripe signs
/// events at most 300 s before their `created`, so this stays acceptable throughout).
static BASE: OnceLock<i64> = OnceLock::new();
/// Measured events sent so far.
static SENT: AtomicU64 = AtomicU64::new(0);

/// Milliseconds from sending a webhook that flips tenant-1's `pro_features` through `sender`
/// until `watch` has seen the change, `count` times, `pause` apart, sorted. `tag` names the
/// measurement in event ids.
pub async fn change_latencies(
    sender: Channel,
    watch: &mut impl ChangeWatch,
    count: usize,
    pause: Duration,
    tag: &str,
) -> Result<Vec<f64>, BoxError> {
    let mut sender = WebhookServiceClient::new(sender);
    let mut latencies = Vec::with_capacity(count);
    for n in 0..count {
        tokio::time::sleep(pause).await;
        let event_type = if n % 2 == 0 {
            "invoice.payment_failed"
        } else {
            "invoice.paid"
        };
        // Created after every earlier bench event, all in the same second: their order is
        // then their ids', which count up across measurements, so none is ever stale.
        let created = *BASE.get_or_init(|| coresdk::time::now_s() + 60);
        let delivery = signed_event(
            format!(
                "evt_{:010}_{tag}_{}",
                SENT.fetch_add(1, Ordering::Relaxed),
                std::process::id()
            ),
            event_type,
            created,
            "cus_bench_1",
        );
        let started = Instant::now();
        let answer = sender.handle_stripe_webhook(delivery).await?.into_inner();
        // Only a delivery that changed pro_features produces the change we wait for.
        if !answer.flag_changes.iter().any(|c| c.key == "pro_features") {
            continue;
        }
        watch.changed().await?;
        latencies.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    latencies.sort_by(f64::total_cmp);
    Ok(latencies)
}

/// `what: p50 …, p99 …, max … over N changes`.
pub fn print_latencies(what: &str, latencies: &[f64]) {
    if latencies.is_empty() {
        println!("{what}: no changes measured");
        return;
    }
    let pct = |p: f64| latencies[((latencies.len() - 1) as f64 * p).round() as usize];
    println!(
        "{what}: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms over {} changes",
        pct(0.5),
        pct(0.99),
        latencies[latencies.len() - 1],
        latencies.len()
    );
}
