//! A PostgreSQL connection as the write engine and the read loop drive it: reconnecting when
//! the connection was lost, and the advisory lock that makes one writer of all replicas.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::connect::Connector;
use super::sql::PgConn;
use crate::store::StoreError;
use crate::store::engine::{Connection, OpenTx};
use crate::store::tx::WriterState;

/// Held by every write transaction of every replica until it ends: writers take turns, so each
/// reads the chain head and the flag version the previous one committed.
const WRITE_LOCK: i64 = 0x636f_7265_7364_6b01;

/// After failing to reach the server, how long work is refused at once instead of trying
/// again: while the server does not answer, each attempt costs a connect deadline, and the
/// work queued behind it must not wait out one attempt per batch.
const RETRY_AFTER: Duration = Duration::from_secs(1);

pub(super) struct Session {
    connector: Connector,
    stop: Arc<AtomicBool>,
    conn: Option<PgConn>,
    /// How long to wait after work was refused before taking more.
    refusal_pause: Duration,
    /// When and why reaching the server last failed, until a connection opens.
    unreachable: Option<(Instant, String)>,
}

impl Session {
    pub(super) fn new(
        connector: Connector,
        stop: Arc<AtomicBool>,
        refusal_pause: Duration,
    ) -> Self {
        Self {
            connector,
            stop,
            conn: None,
            refusal_pause,
            unreachable: None,
        }
    }

    /// The open connection, connecting when there is none or it closed; refused at once
    /// within [`RETRY_AFTER`] of a failed attempt.
    fn connected(&mut self) -> Result<&mut PgConn, StoreError> {
        if self
            .conn
            .as_ref()
            .is_none_or(|conn| conn.client.is_closed())
        {
            self.conn = None;
            if let Some((since, why)) = &self.unreachable
                && since.elapsed() < RETRY_AFTER
            {
                return Err(StoreError::Postgres(why.clone()));
            }
            match self.connector.connect() {
                Ok(link) => {
                    self.unreachable = None;
                    self.conn = Some(PgConn::new(link));
                }
                Err(e) => {
                    self.unreachable = Some((Instant::now(), e.to_string()));
                    return Err(e);
                }
            }
        }
        self.open()
    }

    fn open(&mut self) -> Result<&mut PgConn, StoreError> {
        self.conn
            .as_mut()
            .ok_or_else(|| StoreError::Postgres("the connection closed".into()))
    }

    /// A connection that died since its last use only shows it on first use: when `begin`
    /// fails on such a connection, reconnect once and retry before refusing the work
    /// (UNAVAILABLE, retryable), so callers' deadlines and Stripe's retries stay meaningful.
    /// A server that did not answer in time is not asked again: that would double the wait.
    ///
    /// A server that answered with an error (the writers' lock not granted within
    /// `lock_timeout` while another replica holds it, a statement past `statement_timeout`)
    /// is reachable and the connection sound: only this work is refused, the failed
    /// transaction is rolled back and the connection kept for the next.
    fn begin<T>(
        &mut self,
        begin: impl Fn(&mut PgConn) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut retried = false;
        loop {
            let reused = self
                .conn
                .as_ref()
                .is_some_and(|conn| !conn.client.is_closed());
            let conn = self.connected()?;
            match begin(conn) {
                Ok(began) => return Ok(began),
                Err(e) => {
                    let answered = !conn.client.is_closed();
                    let rolled_back = conn
                        .execute_script(<PgConn as OpenTx>::SCRIPTS.rollback)
                        .is_ok();
                    if answered && rolled_back {
                        return Err(e);
                    }
                    let died_idle = reused && conn.client.is_closed() && !conn.client.timed_out();
                    self.conn = None;
                    if retried || !died_idle {
                        if !died_idle {
                            self.unreachable = Some((Instant::now(), e.to_string()));
                        }
                        return Err(e);
                    }
                    tracing::warn!(
                        error = %e,
                        server = %self.connector.target(),
                        "cannot begin a transaction; reconnecting"
                    );
                    retried = true;
                }
            }
        }
    }
}

impl Connection for Session {
    type Open = PgConn;

    fn begin_write(&mut self, state: &mut WriterState) -> Result<&mut PgConn, StoreError> {
        // The tree's right edge stays when the head it was of is still the head, and is read
        // again at the next append otherwise.
        let tree = state.tree;
        *state = self.begin(|conn| {
            conn.client.batch_execute(&format!(
                "BEGIN; SELECT pg_advisory_xact_lock({WRITE_LOCK})"
            ))?;
            WriterState::load(conn)
        })?;
        state.tree = tree;
        self.open()
    }

    /// One snapshot for the whole read, taken at its first query: a read that pages (`Verify`
    /// scans the chain page by page) sees one state, and work done before that query (reading
    /// the checkpoint file) happens before the snapshot.
    fn begin_read(&mut self) -> Result<&mut PgConn, StoreError> {
        self.begin(|conn| {
            conn.client
                .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        })?;
        self.open()
    }

    fn pause_after_refusal(&mut self) {
        if !self.stop.load(Ordering::Acquire) {
            std::thread::sleep(self.refusal_pause);
        }
    }
}
