//! Where committed changes go: the flag cache (and through it every flag watcher) and the audit
//! feed that `Tail` follows. The store calls [`Feeds::committed`] in commit order.

use std::sync::{Arc, Mutex};

use tokio::sync::broadcast;

use crate::audit::{AuditRecord, ChainHead};
use crate::flags::FlagCache;
use crate::store::{CommitListener, Committed};

/// How many audit records a slow `Tail` stream may lag before it is told to resume.
const AUDIT_FEED_BUFFER: usize = 4096;

pub struct Feeds {
    pub flags: Arc<FlagCache>,
    pub audit: broadcast::Sender<Arc<AuditRecord>>,
    /// The newest committed audit record.
    audit_head: Mutex<ChainHead>,
}

impl Feeds {
    pub fn new(flags: Arc<FlagCache>) -> Self {
        Self {
            flags,
            audit: broadcast::channel(AUDIT_FEED_BUFFER).0,
            audit_head: Mutex::new(ChainHead::GENESIS),
        }
    }

    pub fn audit_head(&self) -> ChainHead {
        self.audit_head
            .lock()
            .map(|head| *head)
            .unwrap_or(ChainHead::GENESIS)
    }

    /// Starts from the stored head, so checkpoints and tails begin where the store is.
    pub fn set_audit_head(&self, head: ChainHead) {
        if let Ok(mut current) = self.audit_head.lock() {
            *current = head;
        }
    }
}

impl CommitListener for Feeds {
    fn committed(&self, changes: Vec<Committed>) {
        for change in changes {
            match change {
                Committed::Flag(record) => self.flags.apply(record),
                Committed::Audit(record) => {
                    self.set_audit_head(ChainHead {
                        seq: record.seq,
                        hash: record.hash,
                    });
                    let _ = self.audit.send(Arc::new(record));
                }
            }
        }
    }
}
