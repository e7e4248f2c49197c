//! Where committed changes go: the flag cache (and through it every flag watcher) and the audit
//! feed that `Tail` follows. The store calls [`Feeds::committed`] in commit order; with a shared
//! store, the change feed calls it too with what every replica committed (this one's included).
//!
//! Audit records are published in sequence order, each once: one at or below the published
//! head is already out, and one that leaves a gap (another replica committed the records
//! between, and the change feed has not fetched them yet) waits until the gap is filled.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use tokio::sync::broadcast;

use crate::audit::{AuditRecord, ChainHead};
use crate::flags::FlagCache;
use crate::metrics::Metrics;
use crate::store::{CommitListener, Committed};

/// How many audit records a slow `Tail` stream may lag before it is told to resume.
const AUDIT_FEED_BUFFER: usize = 4096;

/// Records held back behind a gap at most. Past that, newer ones are dropped here: the change
/// feed fetches every record above the head, so they come again once it has caught up.
const MAX_WAITING: usize = AUDIT_FEED_BUFFER;

pub struct Feeds {
    pub flags: Arc<FlagCache>,
    pub audit: broadcast::Sender<Arc<AuditRecord>>,
    published: Mutex<Published>,
    metrics: Metrics,
}

struct Published {
    /// The newest audit record published, every one before it published too; None until the
    /// head is set or the first record arrives.
    head: Option<ChainHead>,
    /// Records above `head + 1`, waiting for the ones before them.
    waiting: BTreeMap<u64, AuditRecord>,
}

impl Feeds {
    pub fn new(flags: Arc<FlagCache>) -> Self {
        Self {
            flags,
            audit: broadcast::channel(AUDIT_FEED_BUFFER).0,
            published: Mutex::new(Published {
                head: None,
                waiting: BTreeMap::new(),
            }),
            metrics: Metrics::default(),
        }
    }

    /// Records what reaches the feeds (and, through [`CommitListener::metrics`], what the
    /// store does) in `metrics`.
    pub fn with_metrics(mut self, metrics: Metrics) -> Self {
        self.metrics = metrics;
        self
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The newest audit record published (genesis before any).
    pub fn audit_head(&self) -> ChainHead {
        self.published
            .lock()
            .ok()
            .and_then(|published| published.head)
            .unwrap_or(ChainHead::GENESIS)
    }

    /// Starts from the stored head, so checkpoints and tails begin where the store is. Never
    /// moves the head back: the change feed may have published newer records already.
    pub fn set_audit_head(&self, head: ChainHead) {
        if let Ok(mut published) = self.published.lock() {
            if published
                .head
                .is_some_and(|current| current.seq >= head.seq)
            {
                return;
            }
            published.head = Some(head);
            published.waiting = published.waiting.split_off(&(head.seq + 1));
            self.publish_waiting(&mut published);
        }
    }

    fn publish_audit(&self, record: AuditRecord) {
        let Ok(mut published) = self.published.lock() else {
            return;
        };
        let next = published.head.map_or(record.seq, |head| head.seq + 1);
        if record.seq < next {
            return;
        }
        if record.seq > next && published.waiting.len() >= MAX_WAITING {
            return;
        }
        published.waiting.insert(record.seq, record);
        self.publish_waiting(&mut published);
    }

    /// Publishes the waiting records that follow the head without a gap.
    fn publish_waiting(&self, published: &mut Published) {
        loop {
            let next = published.head.map(|head| head.seq + 1);
            let Some(entry) = published.waiting.first_entry() else {
                return;
            };
            if next.is_some_and(|next| *entry.key() != next) {
                return;
            }
            let record = entry.remove();
            published.head = Some(ChainHead {
                seq: record.seq,
                hash: record.hash,
            });
            self.metrics.audit_published();
            // No receivers is fine: nobody is tailing.
            let _ = self.audit.send(Arc::new(record));
        }
    }
}

impl CommitListener for Feeds {
    fn committed(&self, changes: Vec<Committed>) {
        for change in changes {
            match change {
                Committed::Flag(record) => {
                    let source = record.origin.as_str();
                    // With a shared store a change arrives twice (commit, then change feed).
                    if self.flags.apply(record) {
                        self.metrics.flag_changed(source);
                    }
                }
                Committed::Audit(record) => self.publish_audit(record),
            }
        }
    }

    fn metrics(&self) -> &Metrics {
        &self.metrics
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(seq: u64) -> Committed {
        Committed::Audit(AuditRecord {
            seq,
            time_ms: 0,
            tenant_id: "t".into(),
            actor: "test".into(),
            event: "e".into(),
            outcome: "ok".into(),
            metadata: Default::default(),
            prev_hash: [0; 32],
            hash: [seq as u8; 32],
            canonical: Vec::new(),
        })
    }

    fn received(feed: &mut broadcast::Receiver<Arc<AuditRecord>>) -> Vec<u64> {
        std::iter::from_fn(|| feed.try_recv().ok().map(|r| r.seq)).collect()
    }

    #[test]
    fn audit_records_go_out_once_in_order_whoever_delivers_them() {
        let feeds = Feeds::new(Arc::new(FlagCache::new(Default::default())));
        let mut tail = feeds.audit.subscribe();
        feeds.set_audit_head(ChainHead {
            seq: 4,
            hash: [4; 32],
        });
        // This replica committed 8 while 5..7 came from another one, not fetched yet.
        feeds.committed(vec![record(8)]);
        assert_eq!(received(&mut tail), Vec::<u64>::new());
        assert_eq!(feeds.audit_head().seq, 4);
        // The change feed fetches everything above 4, this replica's 8 included.
        feeds.committed(vec![record(5), record(6), record(7), record(8)]);
        feeds.committed(vec![record(3), record(9)]);
        assert_eq!(received(&mut tail), vec![5, 6, 7, 8, 9]);
        assert_eq!(feeds.audit_head().seq, 9);
        // A stale start never moves the head back.
        feeds.set_audit_head(ChainHead::GENESIS);
        assert_eq!(feeds.audit_head().seq, 9);
    }

    #[test]
    fn without_a_known_head_the_first_record_starts_the_feed() {
        let feeds = Feeds::new(Arc::new(FlagCache::new(Default::default())));
        let mut tail = feeds.audit.subscribe();
        feeds.committed(vec![record(1), record(2)]);
        assert_eq!(received(&mut tail), vec![1, 2]);
    }
}
