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
use crate::audit::AuditRecord;
use crate::flags::FlagCache;
use crate::store::dialect::Sql;
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
                self.listener.metrics().feed_reconnected();
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

    /// Hands the listener every change above what it was handed before. The cursor in `seen`
    /// moves only with what the listener was handed: a scan that fails partway (a page past
    /// its deadline, a lost connection, a row that does not decode) hands over what it read
    /// before failing, and the next catch-up starts right after that, so no record is skipped.
    fn catch_up(&mut self, sql: &mut dyn Sql, wake: Wake) -> Result<(), StoreError> {
        if wake.flags {
            // One statement: it fails whole, before the cursor moves.
            let changed = tx::flags_after(sql, self.seen.flag_version)?;
            if let Some(newest) = changed.iter().map(|flag| flag.version).max() {
                self.listener
                    .committed(changed.into_iter().map(Committed::Flag).collect());
                self.seen.flag_version = newest;
            }
        }
        if wake.audit {
            let mut chunk = Vec::new();
            let listener = &self.listener;
            let seen = &mut self.seen.head.seq;
            let scanned = Tx::reading(sql).scan_audit(*seen + 1, &mut |row| {
                chunk.push(row.into_record());
                if chunk.len() >= AUDIT_CHUNK {
                    hand_over(listener.as_ref(), seen, std::mem::take(&mut chunk));
                }
                true
            });
            hand_over(listener.as_ref(), seen, chunk);
            scanned?;
        }
        Ok(())
    }
}

/// Hands `records` (in sequence order) to the listener, then moves `seen` past them.
fn hand_over(listener: &dyn CommitListener, seen: &mut u64, records: Vec<AuditRecord>) {
    let Some(last) = records.last().map(|record| record.seq) else {
        return;
    };
    listener.committed(records.into_iter().map(Committed::Audit).collect());
    *seen = last;
}

/// A round trip the server must answer within [`PROBE_DEADLINE`].
fn probe(conn: &mut PgConn) -> Result<(), StoreError> {
    conn.client.set_deadline(PROBE_DEADLINE);
    let answered = conn.client.batch_execute("SELECT 1");
    conn.client.set_deadline(super::link::ANSWER_DEADLINE);
    answered
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::store::dialect::{Param, Row, Statement, Value};

    /// A chain of `records` audit records served page by page; the page holding record
    /// `fails_at` fails when it reaches that record, as a scan does when one of its rows does
    /// not decode.
    struct Chain {
        records: u64,
        fails_at: Option<u64>,
    }

    struct AuditRow(u64);

    impl Row for AuditRow {
        fn value(&self, column: usize) -> Result<Value, StoreError> {
            let seq = i64::try_from(self.0).unwrap_or(i64::MAX);
            Ok(match column {
                0 => Value::Int(seq),
                1 => Value::Int(0),
                2..=5 => Value::Text("t".into()),
                _ => Value::Bytes(vec![0; 32]),
            })
        }
    }

    impl Sql for Chain {
        fn query(
            &mut self,
            statement: Statement,
            params: &[Param<'_>],
            each: &mut dyn FnMut(&dyn Row) -> Result<bool, StoreError>,
        ) -> Result<(), StoreError> {
            let (Statement::AuditPage, [Param::Int(after), Param::Int(limit)]) =
                (statement, params)
            else {
                return Ok(());
            };
            let first = u64::try_from(*after).unwrap_or(0) + 1;
            let last = self
                .records
                .min(first + u64::try_from(*limit).unwrap_or(0) - 1);
            for seq in first..=last {
                if self.fails_at == Some(seq) {
                    return Err(StoreError::Postgres("injected failure mid-page".into()));
                }
                if !each(&AuditRow(seq))? {
                    break;
                }
            }
            Ok(())
        }

        fn execute(&mut self, _: Statement, _: &[Param<'_>]) -> Result<(), StoreError> {
            Ok(())
        }
    }

    #[derive(Default)]
    struct Received(Mutex<Vec<u64>>);

    impl CommitListener for Received {
        fn committed(&self, changes: Vec<Committed>) {
            let mut received = self.0.lock().expect("not poisoned");
            for change in changes {
                if let Committed::Audit(record) = change {
                    received.push(record.seq);
                }
            }
        }
    }

    #[test]
    fn a_scan_failing_partway_skips_no_record_on_the_next_catch_up() {
        let received = Arc::new(Received::default());
        let mut feed = Feed {
            connector: Connector::new("postgres://u@db/x", None).expect("valid"),
            stop: Arc::new(AtomicBool::new(false)),
            cache: Arc::new(FlagCache::new(Default::default())),
            listener: received.clone(),
            reachable: Arc::new(AtomicBool::new(true)),
            seen: WriterState::EMPTY,
        };
        let audit = || Wake {
            flags: false,
            audit: true,
        };
        let mut chain = Chain {
            records: 2500,
            // Past the first chunk the feed hands over, in the middle of the second.
            fails_at: Some(1501),
        };
        assert!(feed.catch_up(&mut chain, audit()).is_err());
        // The feed reconnects and catches up again; this time the scan goes through.
        chain.fails_at = None;
        feed.catch_up(&mut chain, audit()).expect("caught up");
        let received = received.0.lock().expect("not poisoned");
        assert!(
            received.iter().copied().eq(1..=2500),
            "every record handed over once, in order: {} handed over, the first gap at {:?}",
            received.len(),
            received.windows(2).find(|pair| pair[1] != pair[0] + 1)
        );
        assert_eq!(feed.seen.head.seq, 2500);
    }
}
