//! Audit records that anyone can cause (refused webhook deliveries, access denials) must not
//! buy durable writes one for one. They are coalesced per key and window, bounded in number
//! and memory whatever the key space, and written off the request path by one writer task.
//!
//! Per key and window: the first occurrence is written at once (`count: 1`) with all its
//! details; later ones are counted, and one record carrying their `count` (`coalesced:
//! "repeats"`) is written when the window's entry ends (it expires, is evicted for room, or the
//! sidecar stops). A repeats record keeps only what the key says (the kind's `key_fields`, the
//! tenant and actor): the first occurrence's own details (a claimed event id, a size, a
//! resource) did not apply to the others.
//!
//! Per coalescer and window: at most [`MAX_RECORDS_PER_WINDOW`] windows open, each with a
//! record at once; keys first seen beyond that, and records the full queue could not take, go
//! into one `coalesced: "overflow"` record per window, its count broken down by reason. Repeats
//! records do not draw on that budget: there is at most one per window opened, so they are
//! bounded by it already, and a flood of new keys must not hide what the keys already open
//! (a real tenant's repeated denials) in the overflow. So the `count`s of a kind's records add
//! up to the occurrences, and a flood adds about `2 × MAX_RECORDS_PER_WINDOW + 1` records at most
//! per window, even with a new key on every call; a key first seen once the budget is spent is
//! only counted, not kept, so such a flood costs one cache lookup and one counter per call.
//!
//! Entries live in a `moka` cache: time-to-live is the window, capacity is bounded by weight,
//! and its eviction listener reports whatever an entry still counted, so no count is dropped
//! with the entry. Each call is O(1) amortized (moka batches its housekeeping); the writer task
//! runs what is overdue once a second, so a window that sees no further event still reports.

use std::collections::BTreeMap;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde_json::{Map, json};
use tokio::sync::{mpsc, oneshot};

use crate::audit::{self, NewAuditRecord};
use crate::store::Store;

/// Windows one coalescer opens per window at most, each written at once and once more with
/// its repeat count if it had repeats.
pub const MAX_RECORDS_PER_WINDOW: u32 = 1000;
/// Approximate bytes of keys and first records one coalescer keeps at most: a few thousand
/// windows, more than the budget lets a window write.
const MAX_TRACKED_BYTES: u64 = 2 * 1024 * 1024;
/// What an entry costs beyond its strings: the cache's node, the record's map, allocations.
const ENTRY_OVERHEAD: usize = 512;
/// Records waiting for the writer at most; further ones are counted as overflow.
const QUEUE_CAPACITY: usize = 1024;
/// Records committed in one store transaction at most.
const MAX_BATCH: usize = 256;
/// How often expired windows and pending overflow are reported.
const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// The cache refuses a time-to-live beyond 1,000 years; a year already means "never".
const MAX_WINDOW: Duration = Duration::from_secs(365 * 24 * 3600);
/// The budget needs a window to count in even when coalescing by key is off (window 0).
const MIN_BUDGET_WINDOW: Duration = Duration::from_secs(1);
/// Set in a window's count once it was reported: one atomic operation both reads the count
/// and closes the window, so an occurrence counted concurrently is never dropped.
const REPORTED: u64 = 1 << 63;
/// The actor of overflow records, which stand for many actors.
pub(crate) const OVERFLOW_ACTOR: &str = "coresdk";

/// What a coalescer's records are: their event name and outcome, and the metadata fields
/// that belong to the key, so they hold for every occurrence a repeats record counts.
#[derive(Debug, Clone, Copy)]
pub struct Kind {
    pub event: &'static str,
    pub outcome: &'static str,
    pub key_fields: &'static [&'static str],
}

/// A coalescing key; its size counts toward the coalescer's memory bound, its reason (one of
/// a small fixed set) breaks the overflow count down.
pub trait CoalesceKey: Hash + Eq + Clone + Send + Sync + 'static {
    fn bytes(&self) -> usize;
    fn reason(&self) -> &'static str;
}

/// A reason alone is the key.
impl CoalesceKey for &'static str {
    fn bytes(&self) -> usize {
        0
    }

    fn reason(&self) -> &'static str {
        self
    }
}

/// What [`Coalescer::admit`] did with an occurrence; callers log only what opens a window,
/// so a flood costs log lines no more than records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admitted {
    /// The first of its key in this window: its record is on its way.
    Opened,
    /// Counted into an open window or the overflow.
    Counted,
}

/// The sending side of the one bounded queue every coalescer writes through.
#[derive(Clone)]
pub struct AuditQueue(mpsc::Sender<NewAuditRecord>);

/// The receiving side, handed to [`AuditWriter::spawn`].
pub struct AuditInbox(mpsc::Receiver<NewAuditRecord>);

pub fn audit_queue() -> (AuditQueue, AuditInbox) {
    let (sender, receiver) = mpsc::channel(QUEUE_CAPACITY);
    (AuditQueue(sender), AuditInbox(receiver))
}

/// One window of one key.
struct Tally {
    /// The first occurrence's record without its own details: the repeats record's pattern.
    repeats: NewAuditRecord,
    reason: &'static str,
    opened_ms: i64,
    /// Occurrences after the first not yet written, and the [`REPORTED`] bit once they were.
    unreported: AtomicU64,
    /// Its weight against [`MAX_TRACKED_BYTES`], measured once.
    bytes: usize,
}

/// How many records the current window has written, and when overflow was last reported.
struct Budget {
    window_opened: Instant,
    used: u32,
    overflow_reported: Option<Instant>,
    overflow_since_ms: i64,
}

/// What the cache's eviction listener needs too.
struct Reporter {
    kind: Kind,
    budget_window: Duration,
    queue: AuditQueue,
    budget: Mutex<Budget>,
    /// Occurrences not yet in any record, by reason.
    overflow: Mutex<BTreeMap<&'static str, u64>>,
}

pub struct Coalescer<K: CoalesceKey> {
    windows: moka::sync::Cache<K, Arc<Tally>>,
    reporter: Arc<Reporter>,
}

impl<K: CoalesceKey> Coalescer<K> {
    pub fn new(kind: Kind, window: Duration, queue: AuditQueue) -> Self {
        let reporter = Arc::new(Reporter {
            kind,
            budget_window: window.max(MIN_BUDGET_WINDOW),
            queue,
            budget: Mutex::new(Budget {
                window_opened: Instant::now(),
                used: 0,
                overflow_reported: None,
                overflow_since_ms: crate::time::now_ms(),
            }),
            overflow: Mutex::new(BTreeMap::new()),
        });
        let listener = reporter.clone();
        let windows = moka::sync::Cache::builder()
            .max_capacity(MAX_TRACKED_BYTES)
            .weigher(|key: &K, tally: &Arc<Tally>| {
                u32::try_from(key.bytes() + tally.bytes).unwrap_or(u32::MAX)
            })
            .time_to_live(window.min(MAX_WINDOW))
            // Every way out (expired, evicted for room, replaced after expiry) reports the count.
            .eviction_listener(move |_key, tally: Arc<Tally>, _cause| {
                listener.report_repeats(&tally);
            })
            .build();
        Self { windows, reporter }
    }

    /// Counts one occurrence; `first_record` is called only when it opens a window.
    pub fn admit(&self, key: K, first_record: impl FnOnce() -> NewAuditRecord) -> Admitted {
        if let Some(tally) = self.windows.get(&key) {
            self.count_repeat(&tally);
            return Admitted::Counted;
        }
        // A new window costs a record now. Without budget the occurrence is only counted, and
        // its key not kept: a flood of new keys then costs neither memory nor records.
        let reason = key.reason();
        if !self.reporter.take_budget() {
            self.reporter.overflow(reason, 1);
            return Admitted::Counted;
        }
        let mut first = None;
        let entry = self.windows.entry(key).or_insert_with(|| {
            let record = with_count(first_record(), 1, None);
            let repeats = self.reporter.without_details(&record);
            first = Some(record);
            let bytes = approximate_bytes(&repeats);
            Arc::new(Tally {
                repeats,
                reason,
                opened_ms: crate::time::now_ms(),
                unreported: AtomicU64::new(0),
                bytes,
            })
        });
        match first {
            Some(record) if entry.is_fresh() => {
                self.reporter.send(reason, 1, record);
                Admitted::Opened
            }
            _ => {
                // Another call opened the window meanwhile; the budget taken goes unused.
                self.count_repeat(entry.value());
                Admitted::Counted
            }
        }
    }

    fn count_repeat(&self, tally: &Tally) {
        let before = tally.unreported.fetch_add(1, Ordering::Relaxed);
        if before & REPORTED != 0 {
            // The window was reported between the lookup and the increment (the cache may
            // evict during the lookup itself): this occurrence is reported on its own, as
            // the repeat it is (once per window at most, so outside the budget too).
            self.reporter.send(tally.reason, 1, tally.repeats_record(1));
        }
    }

    #[cfg(test)]
    fn tracked(&self) -> u64 {
        self.windows.run_pending_tasks();
        self.windows.entry_count()
    }
}

impl<K: CoalesceKey> Flush for Coalescer<K> {
    fn flush(&self, closing: bool) {
        if closing {
            for (_, tally) in self.windows.iter() {
                self.reporter.report_repeats(&tally);
            }
        }
        // Expired windows reach the eviction listener here when no call came to trigger it.
        self.windows.run_pending_tasks();
        self.reporter.report_overflow(closing);
    }
}

impl Tally {
    fn repeats_record(&self, count: u64) -> NewAuditRecord {
        with_count(
            self.repeats.clone(),
            count,
            Some(("repeats", self.opened_ms)),
        )
    }
}

impl Reporter {
    /// Queues `record`, which stands for `count` occurrences of `reason`; if the queue is
    /// full, the count joins the overflow.
    fn send(&self, reason: &'static str, count: u64, record: NewAuditRecord) {
        if self.queue.0.try_send(record).is_err() {
            self.overflow(reason, count);
        }
    }

    fn overflow(&self, reason: &'static str, count: u64) {
        let mut overflow = self.overflow.lock().unwrap_or_else(PoisonError::into_inner);
        *overflow.entry(reason).or_default() += count;
    }

    /// `first` with only what every occurrence of its key shares.
    fn without_details(&self, first: &NewAuditRecord) -> NewAuditRecord {
        NewAuditRecord {
            tenant_id: first.tenant_id.clone(),
            actor: first.actor.clone(),
            event: first.event.clone(),
            outcome: first.outcome.clone(),
            metadata: first
                .metadata
                .iter()
                .filter(|(name, _)| self.kind.key_fields.contains(&name.as_str()))
                .map(|(name, value)| (name.clone(), value.clone()))
                .collect(),
        }
    }

    fn take_budget(&self) -> bool {
        let mut budget = self.budget.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        if now.duration_since(budget.window_opened) >= self.budget_window {
            budget.window_opened = now;
            budget.used = 0;
        }
        if budget.used < MAX_RECORDS_PER_WINDOW {
            budget.used += 1;
            true
        } else {
            false
        }
    }

    fn report_repeats(&self, tally: &Tally) {
        let before = tally.unreported.fetch_or(REPORTED, Ordering::Relaxed);
        let count = before & !REPORTED;
        if before & REPORTED == 0 && count > 0 {
            // The log line that pairs with the caller's line for the window's first occurrence.
            tracing::info!(
                event = self.kind.event,
                reason = tally.reason,
                tenant = %tally.repeats.tenant_id,
                count,
                since_ms = tally.opened_ms,
                "repeats coalesced into one audit record"
            );
            self.send(tally.reason, count, tally.repeats_record(count));
        }
    }

    /// One overflow record per window at most, unless the sidecar is stopping.
    fn report_overflow(&self, closing: bool) {
        let mut budget = self.budget.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        let due = closing
            || budget
                .overflow_reported
                .is_none_or(|at| now.duration_since(at) >= self.budget_window);
        if !due {
            return;
        }
        let reasons =
            std::mem::take(&mut *self.overflow.lock().unwrap_or_else(PoisonError::into_inner));
        let count: u64 = reasons.values().sum();
        if count == 0 {
            return;
        }
        let mut metadata = Map::new();
        metadata.insert("reasons".into(), json!(reasons));
        let record = with_count(
            NewAuditRecord {
                tenant_id: String::new(),
                actor: OVERFLOW_ACTOR.to_owned(),
                event: self.kind.event.to_owned(),
                outcome: self.kind.outcome.to_owned(),
                metadata,
            },
            count,
            Some(("overflow", budget.overflow_since_ms)),
        );
        // The overflow record is what keeps the count when the budget is spent, so it
        // bypasses the budget; only a full queue delays it to the next flush.
        if self.queue.0.try_send(record).is_err() {
            for (reason, count) in reasons {
                self.overflow(reason, count);
            }
            return;
        }
        tracing::warn!(
            event = self.kind.event,
            count,
            reasons = %json!(reasons),
            "audit records coalesced into one overflow record"
        );
        budget.overflow_reported = Some(now);
        budget.overflow_since_ms = crate::time::now_ms();
    }
}

/// `record` standing for `count` occurrences; `coalesced` says which kind of summary it is
/// and since when it counted.
fn with_count(
    mut record: NewAuditRecord,
    count: u64,
    coalesced: Option<(&str, i64)>,
) -> NewAuditRecord {
    record.metadata.insert("count".into(), json!(count));
    if let Some((kind, since_ms)) = coalesced {
        record.metadata.insert("coalesced".into(), json!(kind));
        record.metadata.insert("since_ms".into(), json!(since_ms));
    }
    record.metadata = audit::bound_metadata(std::mem::take(&mut record.metadata));
    record
}

fn approximate_bytes(record: &NewAuditRecord) -> usize {
    let metadata =
        serde_json::to_vec(&record.metadata).map_or(audit::MAX_METADATA_BYTES, |b| b.len());
    ENTRY_OVERHEAD
        + record.tenant_id.len()
        + record.actor.len()
        + record.event.len()
        + record.outcome.len()
        + 2 * metadata
}

/// Something the writer reports for once a second, and fully when the sidecar stops.
pub trait Flush: Send + Sync {
    fn flush(&self, closing: bool);
}

/// The one task that drains the queue into the store, several records per transaction.
pub struct AuditWriter {
    close: Mutex<Option<oneshot::Sender<oneshot::Sender<()>>>>,
}

impl AuditWriter {
    /// Must be called inside the Tokio runtime.
    pub fn spawn(store: Store, inbox: AuditInbox, flushers: Vec<Arc<dyn Flush>>) -> Self {
        let (close, closing) = oneshot::channel();
        tokio::spawn(write_loop(store, inbox.0, flushers, closing));
        Self {
            close: Mutex::new(Some(close)),
        }
    }

    /// Reports every open window and writes what is queued, waiting `within` at most.
    pub async fn close(&self, within: Duration) {
        let Some(close) = self
            .close
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        else {
            return;
        };
        let (done, finished) = oneshot::channel();
        if close.send(done).is_err() {
            return;
        }
        if tokio::time::timeout(within, finished).await.is_err() {
            tracing::warn!(
                ?within,
                "coalesced audit records were still being written at shutdown"
            );
        }
    }
}

async fn write_loop(
    store: Store,
    mut inbox: mpsc::Receiver<NewAuditRecord>,
    flushers: Vec<Arc<dyn Flush>>,
    mut closing: oneshot::Receiver<oneshot::Sender<()>>,
) {
    let mut ticker = tokio::time::interval(FLUSH_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            received = inbox.recv() => {
                let Some(first) = received else { return };
                let mut batch = vec![first];
                fill(&mut inbox, &mut batch);
                commit(&store, batch).await;
            }
            _ = ticker.tick() => {
                for flusher in &flushers {
                    flusher.flush(false);
                }
            }
            done = &mut closing => {
                // Reporting may refill the queue (or the overflow, when it is full): a few
                // rounds write the windows, then whatever overflowed.
                for _ in 0..3 {
                    for flusher in &flushers {
                        flusher.flush(true);
                    }
                    loop {
                        let mut batch = Vec::new();
                        fill(&mut inbox, &mut batch);
                        if batch.is_empty() {
                            break;
                        }
                        commit(&store, batch).await;
                    }
                }
                if let Ok(done) = done {
                    let _ = done.send(());
                }
                return;
            }
        }
    }
}

fn fill(inbox: &mut mpsc::Receiver<NewAuditRecord>, batch: &mut Vec<NewAuditRecord>) {
    while batch.len() < MAX_BATCH {
        match inbox.try_recv() {
            Ok(record) => batch.push(record),
            Err(_) => break,
        }
    }
}

async fn commit(store: &Store, batch: Vec<NewAuditRecord>) {
    let records = batch.len();
    let written = store
        .write_detached(move |tx| {
            let now_ms = crate::time::now_ms();
            for record in batch {
                tx.append_audit(record, now_ms)?;
            }
            Ok(())
        })
        .await;
    if let Err(e) = written {
        tracing::error!(error = %e, records, "could not write coalesced audit records");
    }
}

#[cfg(test)]
mod tests;
