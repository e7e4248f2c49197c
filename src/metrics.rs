//! Prometheus metrics: one registry per process, owned through the [`Metrics`] handle that the
//! feeds (and through them the store and the app) carry. Off (`--ops-listen off`) the handle
//! is empty and every recording method returns at once, so nothing is collected that nobody
//! can scrape.
//!
//! Labels take values from closed sets only (outcomes, problem and denial reasons, modes,
//! gRPC methods of the served descriptor sets): nothing a caller sends becomes a label value.
//! The gRPC metrics (go-grpc-prometheus's names) are on every call's path, so each method's
//! series are made once at start and recorded with atomic adds: no lock, no allocation.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;

pub mod grpc;

/// Seconds: gRPC calls answered from memory take microseconds, store commits milliseconds,
/// streams minutes; the Prometheus defaults (from 5 ms) would put every GetFlag in one bucket.
const SECONDS_BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];
/// Jobs per store commit; the engine commits at most 512 at once.
const BATCH_BUCKETS: [f64; 10] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    decision: &'static str,
    reason: &'static str,
}

const ALLOWED: DecisionLabels = DecisionLabels {
    decision: "allow",
    reason: "none",
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModeLabel {
    mode: &'static str,
}

/// A setting's name: a fixed, short list, so a bounded label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SettingLabel {
    pub setting: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabel {
    source: &'static str,
}

/// The process's metrics, or nothing when they are off. Cloning shares them.
#[derive(Clone, Default)]
pub struct Metrics {
    inner: Option<Arc<Inner>>,
}

struct Inner {
    registry: Registry,
    grpc: grpc::GrpcMetrics,
    webhooks: Family<OutcomeLabel, Counter>,
    refusals: Family<ReasonLabel, Counter>,
    decisions: Family<DecisionLabels, Counter>,
    /// `decisions{decision="allow",reason="none"}`, the common answer on every request's path:
    /// held, so counting it is one atomic add.
    allowed: Counter,
    fail_mode: Family<ModeLabel, Counter>,
    commit_seconds: Histogram,
    batch_size: Histogram,
    flag_changes: Family<SourceLabel, Counter>,
    audit_records: Counter,
    feed_reconnects: Counter,
}

/// For listeners that have no metrics of their own to hand out.
static OFF: Metrics = Metrics { inner: None };

impl Metrics {
    /// Metrics that record nothing.
    pub fn off() -> &'static Metrics {
        &OFF
    }

    /// Collecting metrics, with a series for every gRPC method of `descriptor_sets`.
    pub fn new(descriptor_sets: &[&[u8]]) -> Self {
        let mut registry = Registry::default();
        let grpc = grpc::GrpcMetrics::new(descriptor_sets, &mut registry);
        let webhooks = Family::default();
        registry.register(
            "coresdk_webhooks",
            "Stripe deliveries handled, by outcome (applied, duplicate, stale, ignored; refused: not verified or not acceptable; failed: not committed)",
            webhooks.clone(),
        );
        let refusals = Family::default();
        registry.register(
            "coresdk_webhook_refusals",
            "Stripe deliveries refused, by problem reason",
            refusals.clone(),
        );
        let decisions = Family::<DecisionLabels, Counter>::default();
        registry.register(
            "coresdk_authorize_decisions",
            "Authorize decisions, by decision (allow, deny) and denial reason (none when allowed)",
            decisions.clone(),
        );
        let allowed = decisions.get_or_create(&ALLOWED).clone();
        let fail_mode = Family::default();
        registry.register(
            "coresdk_fail_mode_decisions",
            "Access decisions made by the fail mode because flags were unavailable, by mode",
            fail_mode.clone(),
        );
        let commit_seconds = Histogram::new(SECONDS_BUCKETS);
        registry.register(
            "coresdk_store_commit_seconds",
            "Time from beginning a write transaction to its commit, per batch",
            commit_seconds.clone(),
        );
        let batch_size = Histogram::new(BATCH_BUCKETS);
        registry.register(
            "coresdk_store_batch_size",
            "Jobs committed together in one write transaction",
            batch_size.clone(),
        );
        let flag_changes = Family::default();
        registry.register(
            "coresdk_flag_changes",
            "Flag changes applied to this sidecar's cache (with a shared store, every replica's), by source",
            flag_changes.clone(),
        );
        let audit_records = Counter::default();
        registry.register(
            "coresdk_audit_records",
            "Audit records published to this sidecar's feed (with a shared store, every replica's)",
            audit_records.clone(),
        );
        let feed_reconnects = Counter::default();
        registry.register(
            "coresdk_postgres_feed_reconnects",
            "Times the PostgreSQL change feed was lost and reconnected",
            feed_reconnects.clone(),
        );
        Self {
            inner: Some(Arc::new(Inner {
                registry,
                grpc,
                webhooks,
                refusals,
                decisions,
                allowed,
                fail_mode,
                commit_seconds,
                batch_size,
                flag_changes,
                audit_records,
                feed_reconnects,
            })),
        }
    }

    pub fn enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// The layer recording the gRPC metrics of every call through a listener.
    pub fn grpc_layer(&self) -> grpc::GrpcLayer {
        grpc::GrpcLayer::new(self.inner.as_ref().map(|inner| inner.grpc.clone()))
    }

    /// A delivery's outcome; `reason` is the problem reason of a refusal.
    pub fn webhook(&self, outcome: &'static str, refusal_reason: Option<&'static str>) {
        let Some(inner) = &self.inner else { return };
        inner
            .webhooks
            .get_or_create(&OutcomeLabel { outcome })
            .inc();
        if let Some(reason) = refusal_reason {
            inner.refusals.get_or_create(&ReasonLabel { reason }).inc();
        }
    }

    /// An access decision: `denial` is the denial reason, `fail_mode` the mode when the fail
    /// mode decided.
    pub fn authorize(&self, denial: Option<&'static str>, fail_mode: Option<&'static str>) {
        let Some(inner) = &self.inner else { return };
        match denial {
            Some(reason) => {
                inner
                    .decisions
                    .get_or_create(&DecisionLabels {
                        decision: "deny",
                        reason,
                    })
                    .inc();
            }
            None => {
                inner.allowed.inc();
            }
        }
        if let Some(mode) = fail_mode {
            inner.fail_mode.get_or_create(&ModeLabel { mode }).inc();
        }
    }

    /// A write transaction committed `jobs` jobs, `took` after it began.
    pub fn store_commit(&self, jobs: usize, took: Duration) {
        let Some(inner) = &self.inner else { return };
        inner.commit_seconds.observe(took.as_secs_f64());
        inner.batch_size.observe(jobs as f64);
    }

    pub fn flag_changed(&self, source: &'static str) {
        let Some(inner) = &self.inner else { return };
        inner
            .flag_changes
            .get_or_create(&SourceLabel { source })
            .inc();
    }

    pub fn audit_published(&self) {
        if let Some(inner) = &self.inner {
            inner.audit_records.inc();
        }
    }

    pub fn feed_reconnected(&self) {
        if let Some(inner) = &self.inner {
            inner.feed_reconnects.inc();
        }
    }

    /// The registry in the Prometheus text format (0.0.4), followed by `live`: gauges read
    /// at scrape time. Empty when off.
    pub fn encode(&self, live: &Registry) -> Result<String, std::fmt::Error> {
        let mut text = String::with_capacity(64 * 1024);
        if let Some(inner) = &self.inner {
            prometheus_client::encoding::prometheus_text::encode(&mut text, &inner.registry)?;
            prometheus_client::encoding::prometheus_text::encode(&mut text, live)?;
        }
        Ok(text)
    }
}

pub use prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// A histogram of durations recorded with atomic adds only: prometheus-client's own takes a
/// mutex per observation, which every gRPC call would contend on.
#[derive(Clone, Debug, Default)]
pub struct DurationHistogram {
    inner: Arc<DurationCounts>,
}

#[derive(Debug, Default)]
struct DurationCounts {
    sum_nanos: AtomicU64,
    /// Per bucket of [`SECONDS_BUCKETS`], then +Inf; not cumulative.
    buckets: [AtomicU64; SECONDS_BUCKETS.len() + 1],
}

/// [`SECONDS_BUCKETS`] in nanoseconds, so that an observation compares integers.
const BUCKET_NANOS: [u64; SECONDS_BUCKETS.len()] = {
    let mut nanos = [0; SECONDS_BUCKETS.len()];
    let mut i = 0;
    while i < nanos.len() {
        nanos[i] = (SECONDS_BUCKETS[i] * 1e9) as u64;
        i += 1;
    }
    nanos
};

impl DurationHistogram {
    pub fn observe(&self, took: Duration) {
        let nanos = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        let bucket = BUCKET_NANOS.partition_point(|bound| *bound < nanos);
        let counts = &self.inner;
        counts.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
        counts.buckets[bucket].fetch_add(1, Ordering::Relaxed);
    }
}

impl TypedMetric for DurationHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for DurationHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let counts = &self.inner;
        let mut buckets = [(0.0, 0); SECONDS_BUCKETS.len() + 1];
        let mut count = 0;
        for (i, slot) in buckets.iter_mut().enumerate() {
            let n = counts.buckets[i].load(Ordering::Relaxed);
            count += n;
            *slot = (SECONDS_BUCKETS.get(i).copied().unwrap_or(f64::INFINITY), n);
        }
        // The count is the buckets' sum rather than a counter of its own, so a scrape in the
        // middle of an observation still shows a consistent histogram.
        let sum = counts.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(histogram: &DurationHistogram) -> String {
        let mut registry = Registry::default();
        registry.register("h_seconds", "test", histogram.clone());
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &registry)
            .expect("encodes");
        text
    }

    #[test]
    fn durations_land_in_their_buckets_cumulatively() {
        let histogram = DurationHistogram::default();
        histogram.observe(Duration::from_micros(50));
        histogram.observe(Duration::from_micros(100));
        histogram.observe(Duration::from_millis(3));
        histogram.observe(Duration::from_secs(20));
        let text = encoded(&histogram);
        for line in [
            "h_seconds_bucket{le=\"0.0001\"} 2",
            "h_seconds_bucket{le=\"0.0025\"} 2",
            "h_seconds_bucket{le=\"0.005\"} 3",
            "h_seconds_bucket{le=\"10\"} 3",
            "h_seconds_bucket{le=\"+Inf\"} 4",
            "h_seconds_count 4",
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
        assert!(text.contains("h_seconds_sum 20.00315"), "{text}");
    }

    #[test]
    fn off_records_nothing_and_encodes_nothing() {
        let off = Metrics::default();
        off.webhook("applied", None);
        off.authorize(Some("FEATURE_LOCKED"), Some("open"));
        assert!(!off.enabled());
        assert_eq!(off.encode(&Registry::default()).expect("encodes"), "");
    }

    #[test]
    fn closed_label_sets_count_exactly() {
        let on = Metrics::new(&[]);
        on.webhook("refused", Some("SIGNATURE_MISMATCH"));
        on.authorize(None, None);
        on.authorize(Some("FEATURE_LOCKED"), Some("closed"));
        let text = on.encode(&Registry::default()).expect("encodes");
        for line in [
            "coresdk_webhooks_total{outcome=\"refused\"} 1",
            "coresdk_webhook_refusals_total{reason=\"SIGNATURE_MISMATCH\"} 1",
            "coresdk_authorize_decisions_total{decision=\"allow\",reason=\"none\"} 1",
            "coresdk_authorize_decisions_total{decision=\"deny\",reason=\"FEATURE_LOCKED\"} 1",
            "coresdk_fail_mode_decisions_total{mode=\"closed\"} 1",
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
    }
}
