//! Durable state behind one interface: processed events (dedup), customer → tenant mappings,
//! flags and the audit chain.
//!
//! The domain logic (`crate::ops`) runs inside a store transaction through [`StoreTx`], so every
//! backend gets the same semantics from the same code. Work is submitted as closures to the
//! backend's worker, which may commit several of them together (group commit) and answers each
//! only after the commit is durable.
//!
//! Both backends share all but what truly differs between them:
//! - `engine`: the batch runner (savepoint per job, panics caught, state restored, every caller
//!   answered) and the read loop, over a backend's `engine::Connection`;
//! - `tx`: [`StoreTx`] once, over the SQL primitives of `dialect::Sql`;
//! - `dialect`: those primitives, the statements and the column lists;
//! - [`sqlite`] and [`postgres`]: connections, SQL text, locking, schema and (PostgreSQL) the
//!   change feed.

mod dialect;
mod engine;
pub mod postgres;
pub mod sqlite;
mod tx;

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};
use tracing::Instrument as _;

use crate::audit::{AuditRecord, NewAuditRecord, StoredAuditRow};
use crate::flags::FlagRecord;
use crate::problem::Error;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("corrupt stored data: {0}")]
    Corrupt(String),
    #[error("{0} does not exist: give the --store a sidecar wrote to")]
    Missing(String),
    #[error("this store connection is read-only")]
    ReadOnly,
    #[error("unsupported store URL '{0}': use sqlite://PATH, postgres://… or memory")]
    UnsupportedUrl(String),
    #[error("PostgreSQL: {0}")]
    Postgres(String),
    #[error("cannot connect to PostgreSQL at {target}: {cause}; {check}")]
    PostgresUnreachable {
        /// `host:port/database`, never the password.
        target: String,
        /// The client's error and every error behind it.
        cause: String,
        /// What the operator should look at.
        check: &'static str,
    },
    #[error("{0}")]
    Unsupported(&'static str),
    #[error(
        "{0} is in use by another sidecar (one writer per SQLite file; use postgres:// for several replicas)"
    )]
    Locked(String),
    #[error("cannot start the {name} thread: {source}")]
    Thread {
        name: &'static str,
        source: std::io::Error,
    },
    #[error("cannot create the data directory {path}: {source}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
}

impl StoreError {
    /// What a caller may be told: the first line only, since PostgreSQL's `DETAIL` and `HINT`
    /// lines can quote row values (the log keeps them whole).
    pub fn summary(&self) -> String {
        let text = self.to_string();
        text.lines().next().unwrap_or_default().to_owned()
    }
}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Self {
        Error::StoreUnavailable(e.summary())
    }
}

/// How a webhook delivery ended; stored with the event id for redeliveries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Applied,
    Duplicate,
    Stale,
    Ignored,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Applied => "applied",
            Outcome::Duplicate => "duplicate",
            Outcome::Stale => "stale",
            Outcome::Ignored => "ignored",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "applied" => Outcome::Applied,
            "duplicate" => Outcome::Duplicate,
            "stale" => Outcome::Stale,
            "ignored" => Outcome::Ignored,
            _ => return None,
        })
    }
}

/// A billing object whose events replace one another whole (a subscription, the active
/// entitlement summary): the newest event's order and the state it left, as JSON.
#[derive(Debug, Clone, PartialEq)]
pub struct BillingObject {
    pub object: String,
    pub order: crate::stripe::EventOrder,
    pub state: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ProcessedEvent {
    pub event_id: String,
    pub event_type: String,
    pub tenant_id: String,
    pub outcome: Outcome,
    pub audit_seq: u64,
}

#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    pub tenant_id: Option<String>,
    pub event_prefix: Option<String>,
    pub outcome: Option<String>,
    pub since_ms: Option<i64>,
    pub until_ms: Option<i64>,
    /// Only records with a greater sequence number (the page cursor).
    pub after_seq: u64,
    /// Only records up to this sequence number: with `after_seq` it bounds the rows the query
    /// examines, whatever the other filters match.
    pub through_seq: u64,
    pub limit: u32,
}

/// A verified event kept while its customer has no tenant: what `StripeEvent::parse` needs to
/// read it again (the payload as received and the signature's timestamp), who delivered it,
/// and the columns it is found and ordered by.
#[derive(Debug, Clone, PartialEq)]
pub struct ParkedEvent {
    pub event_id: String,
    pub event_type: String,
    pub customer_id: String,
    pub created: i64,
    pub signed_at: i64,
    pub payload: Vec<u8>,
    /// The delivery's actor and reason (Stripe's, or an operator's replay).
    pub actor: String,
    pub reason: Option<String>,
    /// When the event was first parked; redeliveries do not move it.
    pub parked_at_ms: i64,
    /// The event's tie rank ([`crate::stripe::EventOrder::rank`]): with `created` and the id,
    /// the order its customer's parked events are applied in, read from the store.
    pub rank: i64,
}

/// What the store knows about a customer's tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CustomerMapping {
    /// Never mapped: the tenants file may map it.
    NeverMapped,
    Mapped(String),
    /// Unmapped at runtime. Kept apart from [`Self::NeverMapped`] so that a restart does not
    /// hand the customer back to the tenant the tenants file names.
    Unmapped,
}

impl CustomerMapping {
    pub fn tenant(self) -> Option<String> {
        match self {
            Self::Mapped(tenant) => Some(tenant),
            Self::NeverMapped | Self::Unmapped => None,
        }
    }
}

#[derive(Debug, Clone)]
pub enum Committed {
    Flag(FlagRecord),
    Audit(AuditRecord),
}

pub trait CommitListener: Send + Sync {
    fn committed(&self, changes: Vec<Committed>);

    /// Where the store records its commits and its change feed's reconnects.
    fn metrics(&self) -> &crate::metrics::Metrics {
        crate::metrics::Metrics::off()
    }
}

/// The primitive operations a transaction offers. Writes are visible to later reads of the
/// same transaction and take effect only if it commits.
pub trait StoreTx {
    fn processed_event(&mut self, event_id: &str) -> Result<Option<ProcessedEvent>, StoreError>;
    fn record_processed(&mut self, event: &ProcessedEvent, at_ms: i64) -> Result<(), StoreError>;
    fn customer_mapping(&mut self, customer_id: &str) -> Result<CustomerMapping, StoreError>;
    /// The customer's tenant; none for a customer never mapped or unmapped.
    fn tenant_of_customer(&mut self, customer_id: &str) -> Result<Option<String>, StoreError> {
        Ok(self.customer_mapping(customer_id)?.tenant())
    }
    /// Maps the customer, unmapped or not. Returns the tenant it was mapped to before, if any.
    fn map_customer(
        &mut self,
        customer_id: &str,
        tenant_id: &str,
        at_ms: i64,
    ) -> Result<Option<String>, StoreError>;
    /// Marks a mapped customer unmapped. Returns the tenant it was mapped to, if any.
    fn unmap_customer(
        &mut self,
        customer_id: &str,
        at_ms: i64,
    ) -> Result<Option<String>, StoreError>;
    /// When the event was parked, if it is.
    fn parked_at(&mut self, event_id: &str) -> Result<Option<i64>, StoreError>;
    /// How many events are parked (of `customer_id` only, when given), counting no further
    /// than `up_to`: the work is bounded by the cap it is compared with.
    fn count_parked(&mut self, customer_id: Option<&str>, up_to: u64) -> Result<u64, StoreError>;
    /// Parks the event; an event parked already keeps its first row.
    fn park_event(&mut self, event: &ParkedEvent) -> Result<(), StoreError>;
    /// The ids of the customer's parked events, in event order; only ids, so that applying
    /// them holds one payload in memory at a time.
    fn parked_ids(&mut self, customer_id: &str) -> Result<Vec<String>, StoreError>;
    /// Deletes and returns the parked event, if it is (still) parked.
    fn take_parked_event(&mut self, event_id: &str) -> Result<Option<ParkedEvent>, StoreError>;
    /// Deletes and returns up to `limit` events parked before `before_ms`, oldest first.
    fn expire_parked(&mut self, before_ms: i64, limit: u64)
    -> Result<Vec<ParkedEvent>, StoreError>;
    /// Deletes up to `limit` dedup records (processed events and append keys) recorded before
    /// `before_ms`, oldest first; returns how many it deleted.
    fn prune_processed(&mut self, before_ms: i64, limit: u64) -> Result<u64, StoreError>;
    fn flag(&mut self, tenant_id: &str, key: &str) -> Result<Option<FlagRecord>, StoreError>;
    /// Writes a flag under the next store-wide version (the given one is ignored) and returns it.
    fn write_flag(&mut self, record: FlagRecord) -> Result<FlagRecord, StoreError>;
    /// Sets a flag's event ordering mark without changing its value or version: an event that
    /// confirms the value moves it forward. The caller has checked that `order` is newer.
    fn advance_flag_order(
        &mut self,
        tenant_id: &str,
        key: &str,
        order: &crate::stripe::EventOrder,
    ) -> Result<(), StoreError>;
    /// One of a tenant's billing objects: the order of the newest event applied to it and the
    /// state that event left (see `ops::webhook`).
    fn billing_object(
        &mut self,
        tenant_id: &str,
        object: &str,
    ) -> Result<Option<BillingObject>, StoreError>;
    /// Every billing object of `kind` of the tenant, in no particular order.
    fn billing_objects_of_kind(
        &mut self,
        tenant_id: &str,
        kind: &str,
    ) -> Result<Vec<BillingObject>, StoreError>;
    /// Inserts or replaces a billing object.
    fn write_billing_object(
        &mut self,
        tenant_id: &str,
        kind: &str,
        object: &BillingObject,
    ) -> Result<(), StoreError>;
    fn append_audit(&mut self, record: NewAuditRecord, at_ms: i64) -> Result<AuditRecord, Error>;
    fn load_flags(&mut self) -> Result<Vec<FlagRecord>, StoreError>;
    /// The newest audit record's sequence number and hash (genesis when empty).
    fn audit_head(&mut self) -> Result<crate::audit::ChainHead, StoreError>;
    fn query_audit(&mut self, query: &AuditQuery) -> Result<Vec<AuditRecord>, StoreError>;
    /// The audit record with sequence number `seq`, if the chain has it.
    fn audit_record(&mut self, seq: u64) -> Result<Option<AuditRecord>, StoreError> {
        let query = AuditQuery {
            after_seq: seq.saturating_sub(1),
            through_seq: seq,
            limit: 1,
            ..AuditQuery::default()
        };
        Ok(self.query_audit(&query)?.into_iter().next())
    }
    /// Calls `visit` with every audit row from `from_seq` in order until it returns false.
    fn scan_audit(
        &mut self,
        from_seq: u64,
        visit: &mut dyn FnMut(StoredAuditRow) -> bool,
    ) -> Result<(), StoreError>;
    /// The Merkle tree hashes (see [`crate::tlog`]) stored with the records `seqs` (ascending,
    /// at most a few hundred), ordered by seq; a record without them (or missing) is left out.
    fn audit_tree_hashes(&mut self, seqs: &[u64]) -> Result<Vec<(u64, Vec<u8>)>, StoreError>;
    /// How far the Merkle tree reaches, read only.
    fn audit_tree_reach(&mut self) -> Result<TreeReach, StoreError>;
    /// Stores the tree hashes of up to `limit` of the oldest records that lack them (a chain
    /// from before the tree, or records a replica of an older version appended), and answers
    /// how far the tree now reaches.
    fn extend_audit_tree(&mut self, limit: u64) -> Result<TreeReach, Error>;
}

/// How much of the audit chain the Merkle tree covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TreeReach {
    /// Records whose tree hashes are stored: always the chain's first `built` records.
    pub built: u64,
    /// Records in the chain.
    pub records: u64,
}

/// A unit of work as a backend's worker sees it. The engine keeps the job after running it, so
/// it can always answer: with the commit's outcome, or with an error when the work panicked or
/// never ran.
pub(crate) trait Job: Send {
    /// Runs the work inside the transaction; true keeps its writes.
    fn run(&mut self, tx: &mut dyn StoreTx) -> bool;
    /// Answers the caller once the transaction committed (`Ok`) or did not.
    fn answer(self: Box<Self>, outcome: Result<(), Error>);
    /// True when the job has not run, its caller has stopped waiting (deadline, disconnect),
    /// and it was not submitted to run regardless: the engine then drops it unrun. See
    /// [`Store::write`] for why that is safe, and [`Store::write_detached`] for work that
    /// must never be skipped.
    fn abandoned(&self) -> bool;
    /// The span of the caller's wait for this work (disabled unless traces are on): the work
    /// runs inside it, and the batch's commit span hangs off it.
    fn span(&self) -> &tracing::Span;
}

/// What a backend's worker thread receives.
pub(crate) enum Queue {
    Work(Box<dyn Job>),
    Close,
}

/// Blocks for the next job, then takes whatever else is already queued, up to `max`: the group
/// one commit will share. None once the queue is closed; the flag says a close followed the work.
pub(crate) fn next_batch(
    queue: &std::sync::mpsc::Receiver<Queue>,
    max: usize,
) -> Option<(Vec<Box<dyn Job>>, bool)> {
    let mut batch = match queue.recv() {
        Ok(Queue::Work(job)) => vec![job],
        Ok(Queue::Close) | Err(_) => return None,
    };
    while batch.len() < max {
        match queue.try_recv() {
            Ok(Queue::Work(job)) => batch.push(job),
            Ok(Queue::Close) => return Some((batch, true)),
            Err(_) => break,
        }
    }
    Some((batch, false))
}

/// The threads a backend runs (writer, readers, feed), joined once when it closes.
#[derive(Default)]
pub(crate) struct Workers(std::sync::Mutex<Vec<std::thread::JoinHandle<()>>>);

impl Workers {
    pub(crate) fn spawn(
        &self,
        name: &'static str,
        body: impl FnOnce() + Send + 'static,
    ) -> Result<(), StoreError> {
        let handle = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(body)
            .map_err(|source| StoreError::Thread { name, source })?;
        if let Ok(mut threads) = self.0.lock() {
            threads.push(handle);
        }
        Ok(())
    }

    /// Waits for every thread; a second call finds none left.
    pub(crate) fn join_all(&self) {
        let threads = match self.0.lock() {
            Ok(mut threads) => std::mem::take(&mut *threads),
            Err(_) => return,
        };
        for thread in threads {
            let _ = thread.join();
        }
    }
}

pub(crate) trait Backend: Send + Sync {
    fn submit_write(&self, job: Box<dyn Job>);
    fn submit_read(&self, job: Box<dyn Job>);
    /// Stops accepting work, finishes what was submitted and closes the database cleanly.
    fn close(&self);
    /// Whether the database is reachable as far as the backend knows. The embedded store is
    /// the process's own file, so it always is.
    fn available(&self) -> bool {
        true
    }
}

/// Jobs queued for the store at most; further callers wait for room, so overload slows
/// callers down instead of growing memory without bound. A job keeps its room until it is
/// answered or dropped, whether or not its caller still waits.
const MAX_QUEUED_JOBS: usize = 8192;

#[derive(Clone)]
pub struct Store {
    backend: Arc<dyn Backend>,
    room: Arc<Semaphore>,
    /// One long read (a scan of the whole chain) at a time: however many are asked for, they
    /// occupy at most one reader connection, and the other readers keep serving reads.
    long_reads: Arc<Semaphore>,
}

/// Whether a job's work must run even when its caller has stopped waiting.
#[derive(Clone, Copy, PartialEq, Eq)]
enum WhenAbandoned {
    Skip,
    Run,
}

/// Where the state lives, from `--store`.
#[derive(Clone, PartialEq, Eq)]
pub enum StoreUrl {
    Memory,
    Sqlite(std::path::PathBuf),
    /// A libpq-style URL; its password never reaches a log (see the Debug impl).
    Postgres(String),
}

impl std::fmt::Debug for StoreUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreUrl::Memory => f.write_str("memory"),
            StoreUrl::Sqlite(path) => write!(f, "sqlite://{}", path.display()),
            StoreUrl::Postgres(url) => f.write_str(&redact_password(url)),
        }
    }
}

/// `postgres://user:secret@host/db` → `postgres://user:***@host/db`; a password given as a
/// URL setting is hidden too.
pub use postgres::redact_url as redact_password;

impl StoreUrl {
    pub fn parse(url: &str) -> Result<Self, StoreError> {
        if url == "memory" || url == "memory://" {
            return Ok(StoreUrl::Memory);
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(StoreUrl::Postgres(url.to_owned()));
        }
        match url.strip_prefix("sqlite://") {
            Some(path) if !path.is_empty() => Ok(StoreUrl::Sqlite(path.into())),
            _ => Err(StoreError::UnsupportedUrl(redact_password(url))),
        }
    }
}

impl Store {
    /// `cache` is kept current by other replicas' changes when the store is shared.
    pub fn open(
        url: &StoreUrl,
        postgres_ca_file: Option<&std::path::Path>,
        listener: Arc<dyn CommitListener>,
        cache: Arc<crate::flags::FlagCache>,
    ) -> Result<Self, StoreError> {
        let backend: Arc<dyn Backend> = match url {
            StoreUrl::Postgres(pg) => Arc::new(postgres::PostgresStore::open(
                &postgres::Connector::new(pg, postgres_ca_file)?,
                listener,
                Some(cache),
            )?),
            _ => Arc::new(sqlite::SqliteStore::open(url, listener)?),
        };
        Ok(Self::over(backend))
    }

    /// Jobs queued or running, reads and writes: the room they hold.
    pub fn queued(&self) -> usize {
        MAX_QUEUED_JOBS.saturating_sub(self.room.available_permits())
    }

    fn over(backend: Arc<dyn Backend>) -> Self {
        Self {
            backend,
            room: Arc::new(Semaphore::new(MAX_QUEUED_JOBS)),
            long_reads: Arc::new(Semaphore::new(1)),
        }
    }

    /// Runs `work` in a write transaction; an `Err` rolls back its writes. Answers only after
    /// the commit is durable.
    ///
    /// Work whose caller stops waiting (dropped this future: a deadline, a disconnect) before
    /// the work started is skipped. That is safe because such work has had no effect and its
    /// caller was told nothing but an error: a webhook's app answered Stripe with an error, so
    /// Stripe redelivers and the event id's deduplication makes the redelivery exact; an admin
    /// saw the call fail. Work that already ran is never skipped: it commits with its batch
    /// whether or not anyone is still listening. Work with no waiting caller by design goes
    /// through [`Store::write_detached`].
    pub async fn write<T, F>(&self, work: F) -> Result<T, Error>
    where
        T: Send + 'static,
        F: FnOnce(&mut dyn StoreTx) -> Result<T, Error> + Send + 'static,
    {
        self.run(
            work,
            WhenAbandoned::Skip,
            None,
            write_span(),
            |backend, job| backend.submit_write(job),
        )
        .await
    }

    /// Like [`Store::write`], but once queued the work runs and commits even if nobody waits
    /// for its answer any more: for background work (audit records written off the request
    /// path) whose submitter may drop this future after the work is queued.
    pub async fn write_detached<T, F>(&self, work: F) -> Result<T, Error>
    where
        T: Send + 'static,
        F: FnOnce(&mut dyn StoreTx) -> Result<T, Error> + Send + 'static,
    {
        self.run(
            work,
            WhenAbandoned::Run,
            None,
            write_span(),
            |backend, job| backend.submit_write(job),
        )
        .await
    }

    /// Runs `work` in a read-only transaction; skipped, like a write, when its caller has
    /// gone before it started.
    pub async fn read<T, F>(&self, work: F) -> Result<T, Error>
    where
        T: Send + 'static,
        F: FnOnce(&mut dyn StoreTx) -> Result<T, Error> + Send + 'static,
    {
        self.run(
            work,
            WhenAbandoned::Skip,
            None,
            tracing::Span::none(),
            |backend, job| backend.submit_read(job),
        )
        .await
    }

    /// A read that scans far more than a page (verifying the whole chain): it waits until no
    /// other long read is queued or running, so however many callers ask, at most one such
    /// read occupies a reader connection. A caller that gives up while waiting leaves no work
    /// behind.
    pub async fn long_read<T, F>(&self, work: F) -> Result<T, Error>
    where
        T: Send + 'static,
        F: FnOnce(&mut dyn StoreTx) -> Result<T, Error> + Send + 'static,
    {
        let lane = self
            .long_reads
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| dropped())?;
        self.run(
            work,
            WhenAbandoned::Skip,
            Some(lane),
            tracing::Span::none(),
            |backend, job| backend.submit_read(job),
        )
        .await
    }

    /// Queues `work` (waiting for room first) and waits for its answer. The room, and the
    /// `lane` when given, travel with the job: a caller that stops waiting does not free them
    /// while its work is still queued.
    async fn run<T, F>(
        &self,
        work: F,
        when_abandoned: WhenAbandoned,
        lane: Option<OwnedSemaphorePermit>,
        span: tracing::Span,
        submit: impl FnOnce(&dyn Backend, Box<dyn Job>),
    ) -> Result<T, Error>
    where
        T: Send + 'static,
        F: FnOnce(&mut dyn StoreTx) -> Result<T, Error> + Send + 'static,
    {
        let room = self
            .room
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| dropped())?;
        let permits = std::iter::once(room).chain(lane).collect();
        let (job, answer) = queued_job(work, when_abandoned, permits, span.clone());
        submit(self.backend.as_ref(), job);
        // Entered while waiting, so the span ends when its answer arrives, not when the work
        // last ran (a span ends when it is last left).
        answer
            .instrument(span)
            .await
            .unwrap_or_else(|_| Err(dropped()))
    }

    pub fn close(&self) {
        self.backend.close();
    }

    pub fn available(&self) -> bool {
        self.backend.available()
    }
}

/// What a caller hears when its work never reached a commit: the transaction could not begin,
/// or the work panicked. The details are in the sidecar log, not in the answer.
pub(crate) fn dropped() -> Error {
    Error::StoreUnavailable("the store could not run the transaction (see the sidecar log)".into())
}

/// Wraps `work` as a [`Job`] whose answer arrives on the returned channel; it is skipped if
/// that channel is dropped before the work starts.
#[cfg(test)]
pub(crate) fn job<T, F>(work: F) -> (Box<dyn Job>, oneshot::Receiver<Result<T, Error>>)
where
    T: Send + 'static,
    F: FnOnce(&mut dyn StoreTx) -> Result<T, Error> + Send + 'static,
{
    queued_job(work, WhenAbandoned::Skip, Vec::new(), tracing::Span::none())
}

/// A write's span, from its queueing to its commit, inside the call that waits for it. Writes
/// made outside any call (background work) are not traced: each would be a trace of its own.
fn write_span() -> tracing::Span {
    let caller = tracing::Span::current();
    if caller.is_none() {
        return tracing::Span::none();
    }
    tracing::debug_span!(parent: &caller, "store.write")
}

fn queued_job<T, F>(
    work: F,
    when_abandoned: WhenAbandoned,
    permits: Vec<OwnedSemaphorePermit>,
    span: tracing::Span,
) -> (Box<dyn Job>, oneshot::Receiver<Result<T, Error>>)
where
    T: Send + 'static,
    F: FnOnce(&mut dyn StoreTx) -> Result<T, Error> + Send + 'static,
{
    let (reply, answer) = oneshot::channel();
    let job = Pending {
        work: Some(work),
        result: None,
        reply,
        when_abandoned,
        _permits: permits,
        span,
    };
    (Box::new(job), answer)
}

/// A caller's work and where its answer goes; `result` is set once the work returned.
struct Pending<T, F> {
    work: Option<F>,
    result: Option<Result<T, Error>>,
    reply: oneshot::Sender<Result<T, Error>>,
    when_abandoned: WhenAbandoned,
    /// Queue room (and a long read's lane), given back when the job is answered or dropped.
    _permits: Vec<OwnedSemaphorePermit>,
    span: tracing::Span,
}

impl<T, F> Job for Pending<T, F>
where
    T: Send,
    F: FnOnce(&mut dyn StoreTx) -> Result<T, Error> + Send,
{
    fn run(&mut self, tx: &mut dyn StoreTx) -> bool {
        let Some(work) = self.work.take() else {
            return false;
        };
        let result = self.span.in_scope(|| work(tx));
        let keep = result.is_ok();
        self.result = Some(result);
        keep
    }

    fn answer(self: Box<Self>, outcome: Result<(), Error>) {
        // A failed commit outranks the work's own result; work that never returned (it
        // panicked, or never ran) has nothing to report but the failure.
        let Pending { result, reply, .. } = *self;
        let answer = outcome.and_then(|()| result.unwrap_or_else(|| Err(dropped())));
        // The caller may have gone away (deadline) after the work ran; it is committed all
        // the same.
        let _ = reply.send(answer);
    }

    fn abandoned(&self) -> bool {
        self.when_abandoned == WhenAbandoned::Skip && self.work.is_some() && self.reply.is_closed()
    }

    fn span(&self) -> &tracing::Span {
        &self.span
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use super::*;

    /// A backend that only keeps what it is given, like a worker stuck behind a lock.
    #[derive(Default)]
    struct Stuck {
        writes: Mutex<Vec<Box<dyn Job>>>,
        reads: Mutex<Vec<Box<dyn Job>>>,
    }

    impl Backend for Stuck {
        fn submit_write(&self, job: Box<dyn Job>) {
            self.writes.lock().expect("lock").push(job);
        }
        fn submit_read(&self, job: Box<dyn Job>) {
            self.reads.lock().expect("lock").push(job);
        }
        fn close(&self) {}
    }

    fn store_with_room(backend: Arc<Stuck>, room: usize) -> Store {
        Store {
            room: Arc::new(Semaphore::new(room)),
            ..Store::over(backend)
        }
    }

    async fn give_up_after_submitting<T: Send + 'static>(
        call: impl std::future::Future<Output = Result<T, Error>>,
    ) {
        let gave_up = tokio::time::timeout(Duration::from_millis(20), call).await;
        assert!(gave_up.is_err(), "a stuck backend answers nothing");
    }

    #[tokio::test]
    async fn queued_work_keeps_its_room_after_its_caller_gave_up() {
        let backend = Arc::new(Stuck::default());
        let store = store_with_room(backend.clone(), 2);
        for _ in 0..2 {
            give_up_after_submitting(store.write(|_| Ok(()))).await;
        }
        assert_eq!(backend.writes.lock().expect("lock").len(), 2);
        assert_eq!(store.room.available_permits(), 0, "both jobs still queued");
        // A third caller waits for room instead of queueing past the bound.
        give_up_after_submitting(store.write(|_| Ok(()))).await;
        assert_eq!(backend.writes.lock().expect("lock").len(), 2);

        // Answering (here: dropping) the queued jobs gives their room back.
        backend.writes.lock().expect("lock").clear();
        assert_eq!(store.room.available_permits(), 2);
    }

    #[tokio::test]
    async fn one_long_read_at_a_time_reaches_the_readers() {
        let backend = Arc::new(Stuck::default());
        let store = store_with_room(backend.clone(), 8);
        give_up_after_submitting(store.long_read(|_| Ok(()))).await;
        assert_eq!(backend.reads.lock().expect("lock").len(), 1);
        // While the first is queued, others wait for the lane, and leave nothing when they
        // give up; plain reads are not held up.
        give_up_after_submitting(store.long_read(|_| Ok(()))).await;
        give_up_after_submitting(store.read(|_| Ok(()))).await;
        assert_eq!(backend.reads.lock().expect("lock").len(), 2);

        backend.reads.lock().expect("lock").clear();
        give_up_after_submitting(store.long_read(|_| Ok(()))).await;
        assert_eq!(backend.reads.lock().expect("lock").len(), 1);
    }
}
