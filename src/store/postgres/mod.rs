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
//! Each replica's flag cache follows the others through `LISTEN/NOTIFY` (`feed`).
//!
//! The parts: `connect` (the URL, TLS, connecting and connection errors), `schema`
//! (migrations), `session` (a reconnecting connection as the engine drives it, and the writers'
//! lock), `sql` (statements on one connection; `statements` holds their text) and `feed`.

mod connect;
mod feed;
mod schema;
mod session;
mod sql;
mod statements;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use self::connect::Connector;
use self::session::Session;
use super::engine;
use super::tx::WriterState;
use super::{Backend, CommitListener, Job, Queue, StoreError, Workers};
use crate::flags::FlagCache;

/// The `NOTIFY` channel a commit that changed flags announces its new version on.
const CHANNEL: &str = "coresdk_flags";

/// How long the writer and a reader wait after refusing work because the database is away.
const WRITER_REFUSAL_PAUSE: Duration = Duration::from_millis(100);
const READER_REFUSAL_PAUSE: Duration = Duration::from_millis(50);

pub struct PostgresStore {
    writer: mpsc::Sender<Queue>,
    reader: mpsc::Sender<Queue>,
    workers: Workers,
    stop: Arc<AtomicBool>,
    /// Kept by the change-feed listener, which notices a lost server within half a second.
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
        // The sync client drives its own runtime, so it must not run on an async thread.
        let first_url = url.clone();
        std::thread::spawn(move || -> Result<(), StoreError> {
            let mut first = first_url.connect()?;
            schema::migrate(&mut first)
        })
        .join()
        .map_err(|_| StoreError::Corrupt("the migration thread panicked".into()))??;

        let stop = Arc::new(AtomicBool::new(false));
        let reachable = Arc::new(AtomicBool::new(true));
        let (writer, writer_queue) = mpsc::channel();
        let (reader, reader_queue) = mpsc::channel();
        let workers = Workers::default();
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
            let (url, stop, reachable) = (url.clone(), stop.clone(), reachable.clone());
            workers.spawn("coresdk-pg-listener", move || {
                feed::listen_loop(&url, &stop, &cache, &reachable)
            })?;
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
        self.workers.join_all();
    }
}
