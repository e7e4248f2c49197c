//! The shared store: PostgreSQL, for several sidecar replicas over one database.
//!
//! Every write transaction first takes one transaction-scoped advisory lock, then reads the
//! audit chain head and the flag version counter from the tables. That serialises writers
//! across all replicas (at READ COMMITTED), so a redelivery that lands on two replicas at the
//! same instant is seen as a duplicate by whichever commits second, and the chain stays one
//! chain; the primary key on `audit.seq` refuses a fork should anything bypass the lock. As
//! with SQLite, jobs that queue up while a commit syncs share the next transaction (group
//! commit, one savepoint each), which keeps the lock's cost per webhook small.
//!
//! Each replica's flag cache follows the others through `LISTEN/NOTIFY`: a commit that changed
//! flags notifies the new version; listeners fetch every flag above the version they have seen,
//! and do the same after reconnecting, so no change is missed.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use postgres::fallible_iterator::FallibleIterator as _;
use postgres::types::ToSql;
use postgres::{Client, NoTls, Statement};

use super::{
    AuditQuery, Backend, CommitListener, Committed, Finisher, Job, Outcome, ProcessedEvent, Queue,
    StoreError, StoreTx, next_batch,
};
use crate::audit::{self, AuditRecord, ChainHead, NewAuditRecord, StoredAuditRow};
use crate::flags::{FlagCache, FlagOrigin, FlagRecord, FlagValue};
use crate::problem::Error;

const WRITE_LOCK: i64 = 0x636f_7265_7364_6b01;
const MIGRATION_LOCK: i64 = 0x636f_7265_7364_6b02;
const CHANNEL: &str = "coresdk_flags";
const MAX_BATCH: usize = 512;
const SCHEMA_VERSION: i32 = 1;

const MIGRATION_1: &str = "
CREATE TABLE IF NOT EXISTS processed_events (
    event_id TEXT PRIMARY KEY,
    event_type TEXT NOT NULL,
    tenant_id TEXT NOT NULL,
    outcome TEXT NOT NULL,
    audit_seq BIGINT NOT NULL,
    processed_at_ms BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS customers (
    customer_id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL,
    updated_at_ms BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS flags (
    tenant_id TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    version BIGINT NOT NULL,
    event_created BIGINT NOT NULL,
    origin TEXT NOT NULL,
    updated_at_ms BIGINT NOT NULL,
    updated_by TEXT NOT NULL,
    source_event_id TEXT NOT NULL,
    PRIMARY KEY (tenant_id, key)
);
CREATE INDEX IF NOT EXISTS flags_by_version ON flags (version);
CREATE TABLE IF NOT EXISTS audit (
    seq BIGINT PRIMARY KEY,
    time_ms BIGINT NOT NULL,
    tenant_id TEXT NOT NULL,
    actor TEXT NOT NULL,
    event TEXT NOT NULL,
    outcome TEXT NOT NULL,
    canonical BYTEA NOT NULL,
    prev_hash BYTEA NOT NULL,
    hash BYTEA NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_by_tenant ON audit (tenant_id, seq);
";

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl From<postgres::Error> for StoreError {
    fn from(e: postgres::Error) -> Self {
        StoreError::Postgres(e.to_string())
    }
}

/// Applies the schema once, however many replicas start together.
fn migrate(client: &mut Client) -> Result<(), StoreError> {
    client.batch_execute(&format!("SELECT pg_advisory_lock({MIGRATION_LOCK})"))?;
    let applied = (|| -> Result<(), StoreError> {
        client.batch_execute("CREATE TABLE IF NOT EXISTS coresdk_schema (version INT NOT NULL)")?;
        let version: Option<i32> = client
            .query_opt("SELECT max(version) FROM coresdk_schema", &[])?
            .and_then(|row| row.get(0));
        let version = version.unwrap_or(0);
        if version > SCHEMA_VERSION {
            return Err(StoreError::Corrupt(format!(
                "the database schema is version {version}, newer than this sidecar's {SCHEMA_VERSION}"
            )));
        }
        if version < 1 {
            let mut tx = client.transaction()?;
            tx.batch_execute(MIGRATION_1)?;
            tx.execute("INSERT INTO coresdk_schema (version) VALUES (1)", &[])?;
            tx.commit()?;
        }
        Ok(())
    })();
    client.batch_execute(&format!("SELECT pg_advisory_unlock({MIGRATION_LOCK})"))?;
    applied
}

/// Prepared statements of one connection, prepared on first use.
#[derive(Default)]
struct Statements(HashMap<&'static str, Statement>);

impl Statements {
    fn get(&mut self, client: &mut Client, sql: &'static str) -> Result<Statement, StoreError> {
        if let Some(statement) = self.0.get(sql) {
            return Ok(statement.clone());
        }
        let statement = client.prepare(sql)?;
        self.0.insert(sql, statement.clone());
        Ok(statement)
    }
}

#[derive(Debug, Clone, Copy)]
struct WriterState {
    head: ChainHead,
    flag_version: u64,
}

pub struct PostgresStore {
    writer: mpsc::Sender<Queue>,
    reader: mpsc::Sender<Queue>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    /// Kept by the change-feed listener, which notices a lost server within half a second.
    reachable: Arc<std::sync::atomic::AtomicBool>,
    read_connections: usize,
}

/// How to reach the database: the parsed URL, and TLS when the URL asks for it.
#[derive(Clone)]
pub struct Connector {
    config: postgres::Config,
    tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
    /// Connections serving reads, from the URL's `pool_size` (default 2); writes always go
    /// through one connection per replica, which is what group commit needs.
    pub read_connections: usize,
}

impl Connector {
    /// `sslmode=require`, `verify-ca` or `verify-full` turn TLS on, always verifying the server
    /// against the CA in `ca_file` (stricter than libpq's `require`, which does not verify).
    pub fn new(url: &str, ca_file: Option<&std::path::Path>) -> Result<Self, StoreError> {
        let mut tls_wanted = false;
        let mut read_connections = 2;
        let cleaned = match url.split_once('?') {
            None => url.to_owned(),
            Some((base, query)) => {
                let kept: Vec<&str> = query
                    .split('&')
                    .filter(|pair| {
                        if let Some(size) = pair.strip_prefix("pool_size=") {
                            read_connections = size.parse().unwrap_or(0);
                            return false;
                        }
                        match pair.strip_prefix("sslmode=") {
                            Some("require" | "verify-ca" | "verify-full") => {
                                tls_wanted = true;
                                false
                            }
                            Some(_) => false,
                            None => true,
                        }
                    })
                    .collect();
                if kept.is_empty() {
                    base.to_owned()
                } else {
                    format!("{base}?{}", kept.join("&"))
                }
            }
        };
        let mut config: postgres::Config = cleaned
            .parse()
            .map_err(|e: postgres::Error| StoreError::Postgres(format!("bad URL: {e}")))?;
        if !(1..=64).contains(&read_connections) {
            return Err(StoreError::Unsupported(
                "pool_size must be between 1 and 64",
            ));
        }
        if !tls_wanted {
            return Ok(Self {
                config,
                tls: None,
                read_connections,
            });
        }
        let ca_file = ca_file.ok_or(StoreError::Unsupported(
            "sslmode=require/verify-full needs CORESDK_POSTGRES_CA_FILE (the CA that signed the server certificate)",
        ))?;
        use rustls_pki_types::pem::PemObject as _;
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pki_types::CertificateDer::pem_file_iter(ca_file)
            .map_err(|e| StoreError::Postgres(format!("{}: {e}", ca_file.display())))?
        {
            let cert =
                cert.map_err(|e| StoreError::Postgres(format!("{}: {e}", ca_file.display())))?;
            roots
                .add(cert)
                .map_err(|e| StoreError::Postgres(format!("{}: {e}", ca_file.display())))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| StoreError::Postgres(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.ssl_mode(postgres::config::SslMode::Require);
        Ok(Self {
            config,
            tls: Some(tokio_postgres_rustls::MakeRustlsConnect::new(tls)),
            read_connections,
        })
    }

    fn connect(&self) -> Result<Client, postgres::Error> {
        match &self.tls {
            Some(tls) => self.config.connect(tls.clone()),
            None => self.config.connect(NoTls),
        }
    }
}

/// Connects, retrying with backoff until `stop`; None when stopping.
fn connect(url: &Connector, stop: &std::sync::atomic::AtomicBool, what: &str) -> Option<Client> {
    let mut delay = Duration::from_millis(100);
    loop {
        if stop.load(std::sync::atomic::Ordering::Acquire) {
            return None;
        }
        match url.connect() {
            Ok(client) => return Some(client),
            Err(e) => {
                tracing::warn!(error = %e, what, retry_in = ?delay, "PostgreSQL unreachable");
                std::thread::sleep(delay);
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
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
            migrate(&mut first)
        })
        .join()
        .map_err(|_| StoreError::Corrupt("the migration thread panicked".into()))??;

        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reachable = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let (writer, writer_queue) = mpsc::channel();
        let (reader, reader_queue) = mpsc::channel();
        let mut threads = Vec::new();
        let spawn = |name: &str, body: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name.to_owned())
                .spawn(body)
                .map_err(|e| StoreError::Corrupt(format!("cannot start {name}: {e}")))
        };
        {
            let (url, stop) = (url.clone(), stop.clone());
            threads.push(spawn(
                "coresdk-pg-writer",
                Box::new(move || write_loop(&url, &stop, writer_queue, listener)),
            )?);
        }
        // Readers (Query, Verify, Tail catch-up, ResolveCustomer) share one queue.
        let reader_queue = Arc::new(Mutex::new(reader_queue));
        for _ in 0..url.read_connections {
            let (url, stop, queue) = (url.clone(), stop.clone(), reader_queue.clone());
            threads.push(spawn(
                "coresdk-pg-reader",
                Box::new(move || read_loop(&url, &stop, &queue)),
            )?);
        }
        if let Some(cache) = cache {
            let (url, stop, reachable) = (url.clone(), stop.clone(), reachable.clone());
            threads.push(spawn(
                "coresdk-pg-listener",
                Box::new(move || listen_loop(&url, &stop, &cache, &reachable)),
            )?);
        }
        Ok(Self {
            writer,
            reader,
            threads: Mutex::new(threads),
            stop,
            reachable,
            read_connections: url.read_connections,
        })
    }
}

impl Backend for PostgresStore {
    fn submit_write(&self, job: Job) {
        let _ = self.writer.send(Queue::Work(job));
    }

    fn submit_read(&self, job: Job) {
        let _ = self.reader.send(Queue::Work(job));
    }

    fn available(&self) -> bool {
        self.reachable.load(std::sync::atomic::Ordering::Acquire)
    }

    fn close(&self) {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        let _ = self.writer.send(Queue::Close);
        for _ in 0..self.read_connections {
            let _ = self.reader.send(Queue::Close);
        }
        let threads = match self.threads.lock() {
            Ok(mut threads) => std::mem::take(&mut *threads),
            Err(_) => return,
        };
        for thread in threads {
            let _ = thread.join();
        }
    }
}

fn load_state(client: &mut Client) -> Result<WriterState, StoreError> {
    let row = client.query_one(
        "SELECT (SELECT seq FROM audit ORDER BY seq DESC LIMIT 1),
                (SELECT hash FROM audit ORDER BY seq DESC LIMIT 1),
                (SELECT max(version) FROM flags)",
        &[],
    )?;
    let head = match (
        row.get::<_, Option<i64>>(0),
        row.get::<_, Option<Vec<u8>>>(1),
    ) {
        (Some(seq), Some(hash)) => ChainHead {
            seq: to_u64(seq),
            hash: hash
                .try_into()
                .map_err(|_| StoreError::Corrupt(format!("audit record {seq} has a bad hash")))?,
        },
        _ => ChainHead::GENESIS,
    };
    let version: Option<i64> = row.get(2);
    Ok(WriterState {
        head,
        flag_version: to_u64(version.unwrap_or(0)),
    })
}

fn write_loop(
    url: &Connector,
    stop: &std::sync::atomic::AtomicBool,
    queue: mpsc::Receiver<Queue>,
    listener: Arc<dyn CommitListener>,
) {
    let mut client: Option<Client> = None;
    let mut statements = Statements::default();
    let mut closing = false;
    while !closing {
        let Some((batch, close_after)) = next_batch(&queue, MAX_BATCH) else {
            break;
        };
        closing = close_after;
        // A connection that died since the last batch only shows it on first use: on a
        // failed BEGIN, reconnect once and retry before refusing the batch (UNAVAILABLE,
        // retryable), so callers' deadlines and Stripe's retries stay meaningful.
        let mut began = None;
        for _attempt in 0..2 {
            let Some(connected) = connected(&mut client, &mut statements, url) else {
                break;
            };
            match begin(connected) {
                Ok(state) => {
                    began = Some(state);
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot begin a write transaction");
                    let _ = connected.batch_execute("ROLLBACK");
                    client = None;
                }
            }
        }
        match (began, client.as_mut()) {
            (Some(state), Some(connected)) => {
                run_batch(connected, &mut statements, state, batch, listener.as_ref());
            }
            _ => {
                fail_all(batch, "PostgreSQL is unreachable");
                if !stop.load(std::sync::atomic::Ordering::Acquire) {
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }
}

/// The open connection, reconnecting (once) when there is none or it closed.
fn connected<'a>(
    client: &'a mut Option<Client>,
    statements: &mut Statements,
    url: &Connector,
) -> Option<&'a mut Client> {
    if client.as_ref().is_none_or(Client::is_closed) {
        *statements = Statements::default();
        *client = url
            .connect()
            .inspect_err(|e| tracing::warn!(error = %e, "PostgreSQL unreachable"))
            .ok();
    }
    client.as_mut()
}

fn begin(client: &mut Client) -> Result<WriterState, StoreError> {
    client.batch_execute(&format!(
        "BEGIN; SELECT pg_advisory_xact_lock({WRITE_LOCK})"
    ))?;
    load_state(client)
}

fn fail_all(batch: Vec<Job>, why: &str) {
    // Dropping a job answers its caller "unavailable"; say why in the log once per batch.
    tracing::warn!(jobs = batch.len(), why, "store writes refused");
    drop(batch);
}

/// Runs `batch` in the transaction `begin` opened, one savepoint per job, and commits once.
fn run_batch(
    client: &mut Client,
    statements: &mut Statements,
    mut state: WriterState,
    batch: Vec<Job>,
    listener: &dyn CommitListener,
) {
    let versions_before = state.flag_version;
    let mut finishers: Vec<Finisher> = Vec::with_capacity(batch.len());
    let mut changes = Vec::new();
    // One savepoint is always open: after each job a single round trip either moves it past
    // the job (RELEASE + SAVEPOINT) or undoes the job (ROLLBACK TO keeps it open).
    if let Err(e) = client.batch_execute("SAVEPOINT job") {
        let _ = client.batch_execute("ROLLBACK");
        fail_all(batch, &e.to_string());
        return;
    }
    for job in batch {
        let saved = state;
        let changes_before = changes.len();
        let mut tx = PgTx {
            client,
            statements,
            state: Some(&mut state),
            changes: &mut changes,
        };
        let ran = std::panic::catch_unwind(AssertUnwindSafe(|| job(&mut tx)));
        let keep = matches!(ran, Ok((true, _)));
        let undo = if keep {
            client.batch_execute("RELEASE SAVEPOINT job; SAVEPOINT job")
        } else {
            state = saved;
            changes.truncate(changes_before);
            client.batch_execute("ROLLBACK TO SAVEPOINT job")
        };
        if let Err(e) = undo {
            let _ = client.batch_execute("ROLLBACK");
            answer_all(finishers, Err(e.to_string()));
            return;
        }
        match ran {
            Ok((_, finish)) => finishers.push(finish),
            Err(_) => tracing::error!("a store job panicked; its writes were rolled back"),
        }
    }
    if state.flag_version > versions_before {
        // Delivered to every listening replica when (and only if) the transaction commits.
        let notified = client.execute(
            "SELECT pg_notify($1, $2)",
            &[&CHANNEL, &state.flag_version.to_string()],
        );
        if let Err(e) = notified {
            let _ = client.batch_execute("ROLLBACK");
            answer_all(finishers, Err(e.to_string()));
            return;
        }
    }
    match client.batch_execute("COMMIT") {
        Ok(()) => {
            listener.committed(changes);
            answer_all(finishers, Ok(()));
        }
        Err(e) => {
            let _ = client.batch_execute("ROLLBACK");
            answer_all(finishers, Err(e.to_string()));
        }
    }
}

fn answer_all(finishers: Vec<Finisher>, outcome: Result<(), String>) {
    for finish in finishers {
        finish(outcome.clone().map_err(|why| {
            Error::StoreUnavailable(format!("the transaction did not commit: {why}"))
        }));
    }
}

fn read_loop(
    url: &Connector,
    stop: &std::sync::atomic::AtomicBool,
    queue: &Mutex<mpsc::Receiver<Queue>>,
) {
    let mut client: Option<Client> = None;
    let mut statements = Statements::default();
    loop {
        let next = match queue.lock() {
            Ok(queue) => queue.recv(),
            Err(_) => return,
        };
        let Ok(Queue::Work(job)) = next else { return };
        let mut began = false;
        for _attempt in 0..2 {
            let Some(connected) = connected(&mut client, &mut statements, url) else {
                break;
            };
            if connected.batch_execute("BEGIN READ ONLY").is_ok() {
                began = true;
                break;
            }
            client = None;
        }
        let Some(connected) = client.as_mut().filter(|_| began) else {
            // Dropping the job answers its caller "unavailable".
            drop(job);
            if !stop.load(std::sync::atomic::Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(50));
            }
            continue;
        };
        let mut changes = Vec::new();
        let mut tx = PgTx {
            client: connected,
            statements: &mut statements,
            state: None,
            changes: &mut changes,
        };
        let ran = std::panic::catch_unwind(AssertUnwindSafe(|| job(&mut tx)));
        let _ = connected.batch_execute("COMMIT");
        if let Ok((_, finish)) = ran {
            finish(Ok(()));
        }
    }
}

/// Follows other replicas' flag changes. While the feed is down the cache is marked degraded,
/// so access decisions for tenants it does not know fall back to the fail mode.
fn listen_loop(
    url: &Connector,
    stop: &std::sync::atomic::AtomicBool,
    cache: &FlagCache,
    reachable: &std::sync::atomic::AtomicBool,
) {
    let mut seen = cache.version();
    let lost = |why: &str| {
        tracing::warn!(why, "flag change feed lost; reconnecting");
        cache.set_degraded(true);
        reachable.store(false, std::sync::atomic::Ordering::Release);
    };
    while !stop.load(std::sync::atomic::Ordering::Acquire) {
        let Some(mut client) = connect(url, stop, "flag change feed") else {
            return;
        };
        if let Err(e) = client.batch_execute(&format!("LISTEN {CHANNEL}")) {
            lost(&e.to_string());
            continue;
        }
        // Anything committed while we were away is fetched now, by version.
        if let Err(e) = catch_up(&mut client, cache, &mut seen) {
            lost(&e.to_string());
            continue;
        }
        cache.set_degraded(false);
        reachable.store(true, std::sync::atomic::Ordering::Release);
        tracing::info!(version = seen, "flag change feed connected");
        loop {
            if stop.load(std::sync::atomic::Ordering::Acquire) {
                return;
            }
            let mut woke = false;
            let mut failed = false;
            {
                let mut notifications = client.notifications();
                let mut iter = notifications.timeout_iter(Duration::from_millis(500));
                loop {
                    match iter.next() {
                        Ok(Some(_)) => woke = true,
                        Ok(None) => break,
                        Err(_) => {
                            failed = true;
                            break;
                        }
                    }
                    if woke {
                        break;
                    }
                }
            }
            if failed || client.is_closed() {
                lost("the connection closed");
                break;
            }
            if woke && let Err(e) = catch_up(&mut client, cache, &mut seen) {
                lost(&e.to_string());
                break;
            }
        }
    }
}

fn catch_up(client: &mut Client, cache: &FlagCache, seen: &mut u64) -> Result<(), StoreError> {
    let rows = client.query(
        &format!("SELECT {FLAG_COLUMNS} FROM flags WHERE version > $1 ORDER BY version"),
        &[&to_i64(*seen)],
    )?;
    for row in rows {
        let record = flag_from_row(&row)?;
        *seen = (*seen).max(record.version);
        cache.apply(record);
    }
    Ok(())
}

struct PgTx<'a> {
    client: &'a mut Client,
    statements: &'a mut Statements,
    state: Option<&'a mut WriterState>,
    changes: &'a mut Vec<Committed>,
}

const FLAG_COLUMNS: &str = "tenant_id, key, value, version, event_created, origin, updated_at_ms, updated_by, source_event_id";

fn flag_from_row(row: &postgres::Row) -> Result<FlagRecord, StoreError> {
    let value: String = row.get(2);
    let origin: String = row.get(5);
    Ok(FlagRecord {
        tenant_id: row.get(0),
        key: row.get(1),
        value: FlagValue::from_stored(&value).map_err(StoreError::Corrupt)?,
        version: to_u64(row.get(3)),
        event_created: row.get(4),
        origin: FlagOrigin::parse(&origin),
        updated_at_ms: row.get(6),
        updated_by: row.get(7),
        source_event_id: row.get(8),
    })
}

fn audit_from_row(row: &postgres::Row) -> StoredAuditRow {
    StoredAuditRow {
        seq: to_u64(row.get(0)),
        time_ms: row.get(1),
        tenant_id: row.get(2),
        actor: row.get(3),
        event: row.get(4),
        outcome: row.get(5),
        canonical: row.get(6),
        prev_hash: row.get(7),
        hash: row.get(8),
    }
}

impl PgTx<'_> {
    fn state(&mut self) -> Result<&mut WriterState, StoreError> {
        self.state.as_deref_mut().ok_or(StoreError::ReadOnly)
    }

    fn query(
        &mut self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<postgres::Row>, StoreError> {
        let statement = self.statements.get(self.client, sql)?;
        Ok(self.client.query(&statement, params)?)
    }

    fn execute(
        &mut self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, StoreError> {
        let statement = self.statements.get(self.client, sql)?;
        Ok(self.client.execute(&statement, params)?)
    }
}

impl StoreTx for PgTx<'_> {
    fn processed_event(&mut self, event_id: &str) -> Result<Option<ProcessedEvent>, StoreError> {
        let rows = self.query(
            "SELECT event_type, tenant_id, outcome, audit_seq FROM processed_events WHERE event_id = $1",
            &[&event_id],
        )?;
        rows.first()
            .map(|row| {
                let outcome: String = row.get(2);
                Ok(ProcessedEvent {
                    event_id: event_id.to_owned(),
                    event_type: row.get(0),
                    tenant_id: row.get(1),
                    outcome: Outcome::parse(&outcome).ok_or_else(|| {
                        StoreError::Corrupt(format!("unknown stored outcome '{outcome}'"))
                    })?,
                    audit_seq: to_u64(row.get(3)),
                })
            })
            .transpose()
    }

    fn record_processed(&mut self, event: &ProcessedEvent, at_ms: i64) -> Result<(), StoreError> {
        self.state()?;
        self.execute(
            "INSERT INTO processed_events (event_id, event_type, tenant_id, outcome, audit_seq, processed_at_ms) VALUES ($1, $2, $3, $4, $5, $6)",
            &[
                &event.event_id,
                &event.event_type,
                &event.tenant_id,
                &event.outcome.as_str(),
                &to_i64(event.audit_seq),
                &at_ms,
            ],
        )?;
        Ok(())
    }

    fn tenant_of_customer(&mut self, customer_id: &str) -> Result<Option<String>, StoreError> {
        let rows = self.query(
            "SELECT tenant_id FROM customers WHERE customer_id = $1",
            &[&customer_id],
        )?;
        Ok(rows.first().map(|row| row.get(0)))
    }

    fn map_customer(
        &mut self,
        customer_id: &str,
        tenant_id: &str,
        at_ms: i64,
    ) -> Result<Option<String>, StoreError> {
        self.state()?;
        let previous = self.tenant_of_customer(customer_id)?;
        self.execute(
            "INSERT INTO customers (customer_id, tenant_id, updated_at_ms) VALUES ($1, $2, $3)
             ON CONFLICT (customer_id) DO UPDATE SET tenant_id = EXCLUDED.tenant_id, updated_at_ms = EXCLUDED.updated_at_ms",
            &[&customer_id, &tenant_id, &at_ms],
        )?;
        Ok(previous)
    }

    fn unmap_customer(&mut self, customer_id: &str) -> Result<Option<String>, StoreError> {
        self.state()?;
        let previous = self.tenant_of_customer(customer_id)?;
        self.execute(
            "DELETE FROM customers WHERE customer_id = $1",
            &[&customer_id],
        )?;
        Ok(previous)
    }

    fn flag(&mut self, tenant_id: &str, key: &str) -> Result<Option<FlagRecord>, StoreError> {
        let rows = self.query(
            "SELECT tenant_id, key, value, version, event_created, origin, updated_at_ms, updated_by, source_event_id FROM flags WHERE tenant_id = $1 AND key = $2",
            &[&tenant_id, &key],
        )?;
        rows.first().map(flag_from_row).transpose()
    }

    fn flags_with_origin(
        &mut self,
        tenant_id: &str,
        origin: FlagOrigin,
    ) -> Result<Vec<FlagRecord>, StoreError> {
        let rows = self.query(
            "SELECT tenant_id, key, value, version, event_created, origin, updated_at_ms, updated_by, source_event_id FROM flags WHERE tenant_id = $1 AND origin = $2 ORDER BY key",
            &[&tenant_id, &origin.as_str()],
        )?;
        rows.iter().map(flag_from_row).collect()
    }

    fn write_flag(&mut self, mut record: FlagRecord) -> Result<FlagRecord, StoreError> {
        let state = self.state()?;
        state.flag_version += 1;
        record.version = state.flag_version;
        self.execute(
            "INSERT INTO flags (tenant_id, key, value, version, event_created, origin, updated_at_ms, updated_by, source_event_id)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
             ON CONFLICT (tenant_id, key) DO UPDATE SET value = EXCLUDED.value, version = EXCLUDED.version,
               event_created = EXCLUDED.event_created, origin = EXCLUDED.origin, updated_at_ms = EXCLUDED.updated_at_ms,
               updated_by = EXCLUDED.updated_by, source_event_id = EXCLUDED.source_event_id",
            &[
                &record.tenant_id,
                &record.key,
                &record.value.to_stored(),
                &to_i64(record.version),
                &record.event_created,
                &record.origin.as_str(),
                &record.updated_at_ms,
                &record.updated_by,
                &record.source_event_id,
            ],
        )?;
        self.changes.push(Committed::Flag(record.clone()));
        Ok(record)
    }

    fn advance_event_created(
        &mut self,
        tenant_id: &str,
        key: &str,
        created: i64,
    ) -> Result<(), StoreError> {
        self.state()?;
        self.execute(
            "UPDATE flags SET event_created = GREATEST(event_created, $3) WHERE tenant_id = $1 AND key = $2",
            &[&tenant_id, &key, &created],
        )?;
        Ok(())
    }

    fn append_audit(&mut self, record: NewAuditRecord, at_ms: i64) -> Result<AuditRecord, Error> {
        let state = self.state()?;
        let sealed = audit::seal(&state.head, record, at_ms)?;
        state.head = ChainHead {
            seq: sealed.seq,
            hash: sealed.hash,
        };
        self.execute(
            "INSERT INTO audit (seq, time_ms, tenant_id, actor, event, outcome, canonical, prev_hash, hash)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            &[
                &to_i64(sealed.seq),
                &sealed.time_ms,
                &sealed.tenant_id,
                &sealed.actor,
                &sealed.event,
                &sealed.outcome,
                &sealed.canonical,
                &sealed.prev_hash.as_slice(),
                &sealed.hash.as_slice(),
            ],
        )?;
        self.changes.push(Committed::Audit(sealed.clone()));
        Ok(sealed)
    }

    fn load_flags(&mut self) -> Result<Vec<FlagRecord>, StoreError> {
        let rows = self.query(
            "SELECT tenant_id, key, value, version, event_created, origin, updated_at_ms, updated_by, source_event_id FROM flags",
            &[],
        )?;
        rows.iter().map(flag_from_row).collect()
    }

    fn audit_head(&mut self) -> Result<ChainHead, StoreError> {
        Ok(load_state(self.client)?.head)
    }

    fn query_audit(&mut self, query: &AuditQuery) -> Result<Vec<AuditRecord>, StoreError> {
        let rows = self.query(
            "SELECT seq, time_ms, tenant_id, actor, event, outcome, canonical, prev_hash, hash FROM audit
             WHERE seq > $1
               AND ($2::text IS NULL OR tenant_id = $2)
               AND ($3::text IS NULL OR substr(event, 1, length($3)) = $3)
               AND ($4::text IS NULL OR outcome = $4)
               AND ($5::bigint IS NULL OR time_ms >= $5)
               AND ($6::bigint IS NULL OR time_ms < $6)
             ORDER BY seq LIMIT $7",
            &[
                &to_i64(query.after_seq),
                &query.tenant_id,
                &query.event_prefix,
                &query.outcome,
                &query.since_ms,
                &query.until_ms,
                &i64::from(query.limit),
            ],
        )?;
        Ok(rows
            .iter()
            .map(|r| audit_from_row(r).into_record())
            .collect())
    }

    fn scan_audit(
        &mut self,
        from_seq: u64,
        visit: &mut dyn FnMut(StoredAuditRow) -> bool,
    ) -> Result<(), StoreError> {
        let mut after = to_i64(from_seq) - 1;
        loop {
            let rows = self.query(
                "SELECT seq, time_ms, tenant_id, actor, event, outcome, canonical, prev_hash, hash FROM audit WHERE seq > $1 ORDER BY seq LIMIT 1000",
                &[&after],
            )?;
            let Some(last) = rows.last() else {
                return Ok(());
            };
            after = last.get(0);
            let full = rows.len() == 1000;
            for row in &rows {
                if !visit(audit_from_row(row)) {
                    return Ok(());
                }
            }
            if !full {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_settings_are_read_and_refused_when_out_of_range() {
        let plain =
            Connector::new("postgres://u:p@127.0.0.1:5432/db?pool_size=4", None).expect("valid");
        assert_eq!((plain.read_connections, plain.tls.is_some()), (4, false));
        assert!(Connector::new("postgres://u@h/db?pool_size=0", None).is_err());
        let no_ca = Connector::new("postgres://u@h/db?sslmode=require", None);
        assert!(
            matches!(no_ca, Err(StoreError::Unsupported(m)) if m.contains("CORESDK_POSTGRES_CA_FILE"))
        );
        assert_eq!(
            Connector::new("postgres://u@h/db", None)
                .map(|c| c.read_connections)
                .ok(),
            Some(2)
        );
    }

    #[test]
    fn passwords_never_reach_the_log() {
        let url =
            crate::store::StoreUrl::parse("postgres://app:s3cret@db:5432/coresdk").expect("valid");
        let shown = format!("{url:?}");
        assert!(
            !shown.contains("s3cret") && shown.contains("app:***@db"),
            "{shown}"
        );
    }
}
