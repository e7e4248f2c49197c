//! The shared store: PostgreSQL, for several sidecar replicas over one database.
//!
//! Every write transaction first takes one transaction-scoped advisory lock, then reads the
//! audit chain head and the flag version counter from the tables. That serialises writers
//! across all replicas (at READ COMMITTED), so a redelivery that lands on two replicas at the
//! same instant is seen as a duplicate by whichever commits second, and the chain stays one
//! chain; the primary key on `audit.seq` refuses a fork should anything bypass the lock. As
//! with SQLite, jobs that queue up while a commit syncs share the next transaction (the shared
//! write engine's group commit, one savepoint each), which keeps the lock's cost per webhook
//! small.
//!
//! Each replica's flag cache and audit feed follow the others through `LISTEN/NOTIFY` (`feed`).
//!
//! A database that stops answering (hung, overloaded, cut off) must not hang the sidecar: every
//! round trip has a deadline (`link`), the server ends long statements and lock waits itself
//! (`connect`), and the feed probes its connection every second, which is what the health
//! service reports.
//!
//! The parts: `connect` (the URL, TLS, connecting and connection errors), `link` (one
//! connection with deadlines), `schema` (migrations), `session` (a reconnecting connection as
//! the engine drives it, and the writers' lock), `sql` (statements on one connection;
//! `statements` holds their text) and `feed`.

mod connect;
mod feed;
mod link;
mod schema;
mod session;
mod sql;
mod statements;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use self::connect::{Connector, redact_url};
use self::session::Session;
use super::engine;
use super::tx::WriterState;
use super::{Backend, CommitListener, Job, Queue, StoreError, Workers};
use crate::flags::FlagCache;

/// The `NOTIFY` channel a commit that changed flags announces its new version on.
const FLAG_CHANNEL: &str = "coresdk_flags";
/// The `NOTIFY` channel a commit that appended audit records announces its new head on.
const AUDIT_CHANNEL: &str = "coresdk_audit";

/// The migration waits for another replica's (replicas starting together), so it may take
/// longer than a round trip otherwise may.
const MIGRATION_WAIT: Duration = Duration::from_secs(30);

/// How long closing waits for the threads. Every wait of theirs is bounded, so they end well
/// within this; a thread that still has not is left behind rather than hanging the shutdown.
const CLOSE_DEADLINE: Duration = Duration::from_secs(15);

/// How long the writer and a reader wait after refusing work because the database is away.
const WRITER_REFUSAL_PAUSE: Duration = Duration::from_millis(100);
const READER_REFUSAL_PAUSE: Duration = Duration::from_millis(50);

pub struct PostgresStore {
    writer: mpsc::Sender<Queue>,
    reader: mpsc::Sender<Queue>,
    workers: Arc<Workers>,
    stop: Arc<AtomicBool>,
    /// Kept by the change feed, which probes the server every second and counts it lost when
    /// the connection fails or a probe is not answered within two seconds.
    reachable: Arc<AtomicBool>,
    read_connections: usize,
}

impl PostgresStore {
    pub fn open(
        url: &Connector,
        listener: Arc<dyn CommitListener>,
        cache: Option<Arc<FlagCache>>,
    ) -> Result<Self, StoreError> {
        // The first connection and the migration happen before the sidecar serves, so a bad
        // URL or an unreachable database stops the start with a clear error.
        // A connection drives its own runtime, so it must not run on an async thread.
        // The flag version and audit head read then are where the feed starts: the server
        // loads the flags and reads the head once this returns, so the feed never starts past
        // what the server knows.
        let first_url = url.clone();
        let feed_start = std::thread::spawn(move || -> Result<WriterState, StoreError> {
            let mut first = first_url.connect()?;
            first.set_deadline(MIGRATION_WAIT);
            let wait = MIGRATION_WAIT.as_millis();
            first.batch_execute(&format!(
                "SET lock_timeout = {wait}; SET statement_timeout = {wait}"
            ))?;
            schema::migrate(&mut first)?;
            WriterState::load(&mut sql::PgConn::new(first))
        })
        .join()
        .map_err(|_| StoreError::Corrupt("the migration thread panicked".into()))??;

        let stop = Arc::new(AtomicBool::new(false));
        let reachable = Arc::new(AtomicBool::new(true));
        let (writer, writer_queue) = mpsc::channel();
        let (reader, reader_queue) = mpsc::channel();
        let workers = Arc::new(Workers::default());
        let listener_for_feed = listener.clone();
        {
            let mut session = Session::new(url.clone(), stop.clone(), WRITER_REFUSAL_PAUSE);
            // Each batch reads the state afresh under the write lock; this one is never used.
            workers.spawn("coresdk-pg-writer", move || {
                engine::write_loop(
                    &mut session,
                    WriterState::EMPTY,
                    &writer_queue,
                    listener.as_ref(),
                );
            })?;
        }
        // Readers (Query, Verify, Tail catch-up, ResolveCustomer) share one queue.
        let reader_queue = Arc::new(Mutex::new(reader_queue));
        for _ in 0..url.read_connections {
            let mut session = Session::new(url.clone(), stop.clone(), READER_REFUSAL_PAUSE);
            let queue = reader_queue.clone();
            workers.spawn("coresdk-pg-reader", move || {
                engine::read_loop(&mut session, &queue)
            })?;
        }
        if let Some(cache) = cache {
            let feed = feed::Feed {
                connector: url.clone(),
                stop: stop.clone(),
                cache,
                listener: listener_for_feed,
                reachable: reachable.clone(),
                seen: feed_start,
            };
            workers.spawn("coresdk-pg-listener", move || feed.listen_loop())?;
        }
        Ok(Self {
            writer,
            reader,
            workers,
            stop,
            reachable,
            read_connections: url.read_connections,
        })
    }
}

impl Backend for PostgresStore {
    fn submit_write(&self, job: Box<dyn Job>) {
        let _ = self.writer.send(Queue::Work(job));
    }

    fn submit_read(&self, job: Box<dyn Job>) {
        let _ = self.reader.send(Queue::Work(job));
    }

    fn available(&self) -> bool {
        self.reachable.load(Ordering::Acquire)
    }

    fn close(&self) {
        self.stop.store(true, Ordering::Release);
        let _ = self.writer.send(Queue::Close);
        for _ in 0..self.read_connections {
            let _ = self.reader.send(Queue::Close);
        }
        let (joined, all_joined) = mpsc::channel();
        let workers = self.workers.clone();
        let joiner = std::thread::Builder::new()
            .name("coresdk-pg-close".into())
            .spawn(move || {
                workers.join_all();
                let _ = joined.send(());
            });
        if joiner.is_err() {
            self.workers.join_all();
        } else if all_joined.recv_timeout(CLOSE_DEADLINE).is_err() {
            tracing::warn!(
                deadline = ?CLOSE_DEADLINE,
                "PostgreSQL threads did not finish in time; leaving them behind"
            );
        }
    }
}
