//! The change feed: follows every replica's commits through `LISTEN/NOTIFY`. A commit that
//! changed flags notifies its new flag version, one that appended audit records its new audit
//! head; the feed fetches every flag above the version it has seen and every audit record above
//! the sequence it has seen, and hands them to the [`CommitListener`] as the writer hands its
//! own commits. The listener drops what it already holds (flags by version, audit records by
//! sequence), so this replica's own commits, which come back this way too, are harmless. After
//! reconnecting the feed fetches the same way, so nothing is missed.
//!
//! While nothing arrives the feed probes its connection every second: a server that stopped
//! answering is noticed within [`PROBE_DEADLINE`] and reported through `reachable`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::connect::Connector;
use super::sql::PgConn;
use super::{AUDIT_CHANNEL, FLAG_CHANNEL};
use crate::flags::FlagCache;
use crate::store::tx::{self, Tx, WriterState};
use crate::store::{CommitListener, Committed, StoreError, StoreTx as _};

/// How long the feed waits for a notification before probing the connection instead.
const PROBE_EVERY: Duration = Duration::from_secs(1);
/// How long the probe (`SELECT 1`) may take before the server counts as unreachable.
const PROBE_DEADLINE: Duration = Duration::from_secs(2);
/// Audit records handed to the listener at once while catching up.
const AUDIT_CHUNK: usize = 1000;

pub(super) struct Feed {
    pub(super) connector: Connector,
    pub(super) stop: Arc<AtomicBool>,
    /// Marked degraded while the feed is down.
    pub(super) cache: Arc<FlagCache>,
    pub(super) listener: Arc<dyn CommitListener>,
    pub(super) reachable: Arc<AtomicBool>,
    /// The newest flag version and audit record handed to the listener, or in the store when
    /// the feed started (the server loads that much itself). Kept here rather than read from
    /// the listener: this replica's own commits reach the listener first, and a version of its
    /// own says nothing about the changes of others below it.
    pub(super) seen: WriterState,
}

/// What woke the feed: which kinds of change to fetch.
#[derive(Default)]
struct Wake {
    flags: bool,
    audit: bool,
}

impl Feed {
    /// Follows the feed until `stop`. While it is down the cache is marked degraded, so access
    /// decisions for tenants it does not know fall back to the fail mode, and `reachable` is
    /// false.
    pub(super) fn listen_loop(mut self) {
        let server = self.connector.target();
        while !self.stop.load(Ordering::Acquire) {
            let Some(link) = self
                .connector
                .connect_with_backoff(&self.stop, "change feed")
            else {
                return;
            };
            let mut conn = PgConn::new(link);
            let followed = self.follow(&mut conn);
            if self.stop.load(Ordering::Acquire) {
                return;
            }
            if let Err(e) = followed {
                tracing::warn!(error = %e, %server, "change feed lost; reconnecting");
            }
            self.cache.set_degraded(true);
            self.reachable.store(false, Ordering::Release);
        }
    }

    /// Listens, catches up, then follows until the connection fails or `stop`.
    fn follow(&mut self, conn: &mut PgConn) -> Result<(), StoreError> {
        conn.client
            .batch_execute(&format!("LISTEN {FLAG_CHANNEL}; LISTEN {AUDIT_CHANNEL}"))?;
        // Anything committed while we were away is fetched now.
        self.catch_up(
            conn,
            Wake {
                flags: true,
                audit: true,
            },
        )?;
        self.cache.set_degraded(false);
        self.reachable.store(true, Ordering::Release);
        tracing::info!(
            version = self.seen.flag_version,
            audit_seq = self.seen.head.seq,
            "change feed connected"
        );
        while !self.stop.load(Ordering::Acquire) {
            let arrived = conn.client.notifications(PROBE_EVERY)?;
            if arrived.is_empty() {
                probe(conn)?;
                continue;
            }
            let mut wake = Wake::default();
            for notification in &arrived {
                match notification.channel() {
                    FLAG_CHANNEL => wake.flags = true,
                    AUDIT_CHANNEL => wake.audit = true,
                    _ => {}
                }
            }
            self.catch_up(conn, wake)?;
        }
        Ok(())
    }

    fn catch_up(&mut self, conn: &mut PgConn, wake: Wake) -> Result<(), StoreError> {
        if wake.flags {
            let changed = tx::flags_after(conn, self.seen.flag_version)?;
            if let Some(newest) = changed.iter().map(|flag| flag.version).max() {
                self.seen.flag_version = newest;
                self.listener
                    .committed(changed.into_iter().map(Committed::Flag).collect());
            }
        }
        if wake.audit {
            let mut chunk = Vec::new();
            let listener = &self.listener;
            let seen = &mut self.seen.head.seq;
            Tx::reading(conn).scan_audit(*seen + 1, &mut |row| {
                *seen = row.seq;
                chunk.push(Committed::Audit(row.into_record()));
                if chunk.len() >= AUDIT_CHUNK {
                    listener.committed(std::mem::take(&mut chunk));
                }
                true
            })?;
            if !chunk.is_empty() {
                listener.committed(chunk);
            }
        }
        Ok(())
    }
}

/// A round trip the server must answer within [`PROBE_DEADLINE`].
fn probe(conn: &mut PgConn) -> Result<(), StoreError> {
    conn.client.set_deadline(PROBE_DEADLINE);
    let answered = conn.client.batch_execute("SELECT 1");
    conn.client.set_deadline(super::link::ANSWER_DEADLINE);
    answered
}
