//! The embedded store: SQLite in WAL mode with `synchronous=FULL`, so a commit is on disk
//! before it is acknowledged. `memory` is the same engine on an in-memory database, so mock
//! mode and tests run exactly the code production runs.
//!
//! One writer thread owns the write connection and commits whatever jobs queued up while the
//! previous commit was syncing in one transaction (group commit), each job in its own
//! savepoint so one failing job never takes the others down. Reads of a file database run on a
//! second, read-only connection so a long `Verify` never holds up webhooks.

use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};

use super::{
    AuditQuery, Backend, CommitListener, Committed, Finisher, Job, Outcome, ProcessedEvent, Queue,
    StoreError, StoreTx, StoreUrl, next_batch,
};
use crate::audit::{self, AuditRecord, ChainHead, NewAuditRecord, StoredAuditRow};
use crate::flags::{FlagOrigin, FlagRecord, FlagValue};
use crate::problem::Error;

/// Jobs committed together at most; bounds the latency one commit adds to the first job.
const MAX_BATCH: usize = 512;
const SCHEMA_VERSION: i64 = 1;

const MIGRATION_1: &str = "
CREATE TABLE processed_events (
    event_id TEXT PRIMARY KEY,
    event_type TEXT NOT NULL,
    tenant_id TEXT NOT NULL,
    outcome TEXT NOT NULL,
    audit_seq INTEGER NOT NULL,
    processed_at_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE customers (
    customer_id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL,
    updated_at_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE flags (
    tenant_id TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    version INTEGER NOT NULL,
    event_created INTEGER NOT NULL,
    origin TEXT NOT NULL,
    updated_at_ms INTEGER NOT NULL,
    updated_by TEXT NOT NULL,
    source_event_id TEXT NOT NULL,
    PRIMARY KEY (tenant_id, key)
) WITHOUT ROWID;
CREATE TABLE audit (
    seq INTEGER PRIMARY KEY,
    time_ms INTEGER NOT NULL,
    tenant_id TEXT NOT NULL,
    actor TEXT NOT NULL,
    event TEXT NOT NULL,
    outcome TEXT NOT NULL,
    canonical BLOB NOT NULL,
    prev_hash BLOB NOT NULL,
    hash BLOB NOT NULL
);
CREATE INDEX audit_by_tenant ON audit (tenant_id, seq);
";

/// What the writer keeps between transactions; restored when a job or a commit fails.
#[derive(Debug, Clone, Copy)]
struct WriterState {
    head: ChainHead,
    flag_version: u64,
}

pub struct SqliteStore {
    /// Held for the store's lifetime: two sidecars on one file would each keep their own
    /// chain head and fork the audit chain, so the second one must not start.
    _lock: Option<std::fs::File>,
    writer: mpsc::Sender<Queue>,
    /// Absent for an in-memory database, whose reads go through the writer.
    reader: Option<mpsc::Sender<Queue>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

fn open_connection(url: &StoreUrl, read_only: bool) -> Result<Connection, StoreError> {
    let conn = match url {
        StoreUrl::Memory => Connection::open_in_memory()?,
        StoreUrl::Postgres(_) => return Err(StoreError::Unsupported("not a SQLite store URL")),
        StoreUrl::Sqlite(path) => {
            let flags = if read_only {
                OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX
            } else {
                OpenFlags::SQLITE_OPEN_READ_WRITE
                    | OpenFlags::SQLITE_OPEN_CREATE
                    | OpenFlags::SQLITE_OPEN_NO_MUTEX
            };
            Connection::open_with_flags(path, flags)?
        }
    };
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    if !read_only {
        // WAL lets the reader run beside the writer; FULL syncs the WAL on every commit, which
        // is what makes an acknowledged webhook survive a power cut, not only a crash.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
    }
    Ok(conn)
}

fn migrate(conn: &Connection) -> Result<(), StoreError> {
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if version > SCHEMA_VERSION {
        return Err(StoreError::Corrupt(format!(
            "the database schema is version {version}, newer than this sidecar's {SCHEMA_VERSION}"
        )));
    }
    if version < 1 {
        conn.execute_batch(&format!(
            "BEGIN IMMEDIATE; {MIGRATION_1} PRAGMA user_version = 1; COMMIT;"
        ))?;
    }
    Ok(())
}

fn load_head(conn: &Connection) -> Result<ChainHead, StoreError> {
    let head = conn
        .query_row(
            "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1",
            [],
            |r| Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?)),
        )
        .optional()?;
    Ok(match head {
        None => ChainHead::GENESIS,
        Some((seq, hash)) => ChainHead {
            seq: to_u64(seq),
            hash: hash
                .try_into()
                .map_err(|_| StoreError::Corrupt(format!("audit record {seq} has a bad hash")))?,
        },
    })
}

fn load_state(conn: &Connection) -> Result<WriterState, StoreError> {
    let head = load_head(conn)?;
    let flag_version: i64 =
        conn.query_row("SELECT COALESCE(MAX(version), 0) FROM flags", [], |r| {
            r.get(0)
        })?;
    Ok(WriterState {
        head,
        flag_version: to_u64(flag_version),
    })
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl SqliteStore {
    pub fn open(url: &StoreUrl, listener: Arc<dyn CommitListener>) -> Result<Self, StoreError> {
        if let StoreUrl::Sqlite(path) = url
            && let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::DataDir {
                path: dir.display().to_string(),
                source,
            })?;
        }
        let lock = match url {
            StoreUrl::Memory | StoreUrl::Postgres(_) => None,
            StoreUrl::Sqlite(path) => Some(lock_exclusively(path)?),
        };
        let conn = open_connection(url, false)?;
        migrate(&conn)?;
        let state = load_state(&conn)?;
        let (writer, writer_queue) = mpsc::channel();
        let mut threads = vec![
            std::thread::Builder::new()
                .name("coresdk-store-writer".into())
                .spawn(move || write_loop(conn, state, writer_queue, listener))
                .map_err(|e| StoreError::Corrupt(format!("cannot start the writer: {e}")))?,
        ];
        let reader = match url {
            StoreUrl::Memory | StoreUrl::Postgres(_) => None,
            StoreUrl::Sqlite(_) => {
                let conn = open_connection(url, true)?;
                let (reader, reader_queue) = mpsc::channel();
                threads.push(
                    std::thread::Builder::new()
                        .name("coresdk-store-reader".into())
                        .spawn(move || read_loop(conn, reader_queue))
                        .map_err(|e| {
                            StoreError::Corrupt(format!("cannot start the reader: {e}"))
                        })?,
                );
                Some(reader)
            }
        };
        Ok(Self {
            _lock: lock,
            writer,
            reader,
            threads: Mutex::new(threads),
        })
    }
}

fn lock_exclusively(db: &Path) -> Result<std::fs::File, StoreError> {
    let mut lock_path = db.as_os_str().to_owned();
    lock_path.push(".lock");
    let lock_path = std::path::PathBuf::from(lock_path);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|source| StoreError::DataDir {
            path: lock_path.display().to_string(),
            source,
        })?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(StoreError::Locked(db.display().to_string())),
        Err(std::fs::TryLockError::Error(source)) => Err(StoreError::DataDir {
            path: lock_path.display().to_string(),
            source,
        }),
    }
}

impl Backend for SqliteStore {
    fn submit_write(&self, job: Job) {
        // A closed queue drops the job, which answers the caller "unavailable".
        let _ = self.writer.send(Queue::Work(job));
    }

    fn submit_read(&self, job: Job) {
        let queue = self.reader.as_ref().unwrap_or(&self.writer);
        let _ = queue.send(Queue::Work(job));
    }

    fn close(&self) {
        let _ = self.writer.send(Queue::Close);
        if let Some(reader) = &self.reader {
            let _ = reader.send(Queue::Close);
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

fn write_loop(
    conn: Connection,
    mut state: WriterState,
    queue: mpsc::Receiver<Queue>,
    listener: Arc<dyn CommitListener>,
) {
    let mut closing = false;
    while !closing {
        let Some((batch, close_after)) = next_batch(&queue, MAX_BATCH) else {
            break;
        };
        closing = close_after;
        run_batch(&conn, &mut state, batch, listener.as_ref());
    }
    // Work queued behind the close marker is dropped, which answers it "unavailable".
    if let Err(e) = conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);") {
        tracing::warn!(error = %e, "final WAL checkpoint failed; the WAL is replayed at next start");
    }
    if let Err((_, e)) = conn.close() {
        tracing::error!(error = %e, "closing the store failed");
    }
}

fn run_batch(
    conn: &Connection,
    state: &mut WriterState,
    batch: Vec<Job>,
    listener: &dyn CommitListener,
) {
    if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
        tracing::error!(error = %e, jobs = batch.len(), "cannot begin a transaction");
        return;
    }
    let mut finishers: Vec<Finisher> = Vec::with_capacity(batch.len());
    let mut changes = Vec::new();
    for job in batch {
        let saved = *state;
        let changes_before = changes.len();
        if let Err(e) = conn.execute_batch("SAVEPOINT job") {
            tracing::error!(error = %e, "cannot open a savepoint");
            continue;
        }
        let mut tx = SqliteTx {
            conn,
            state: Some(state),
            changes: &mut changes,
        };
        let ran = std::panic::catch_unwind(AssertUnwindSafe(|| job(&mut tx)));
        let keep = matches!(ran, Ok((true, _)));
        let undo = if keep {
            conn.execute_batch("RELEASE job")
        } else {
            *state = saved;
            changes.truncate(changes_before);
            conn.execute_batch("ROLLBACK TO job; RELEASE job")
        };
        if let Err(e) = undo {
            tracing::error!(error = %e, "savepoint failed; abandoning the batch");
            abort(conn, state, finishers, e.to_string());
            return;
        }
        match ran {
            Ok((_, finish)) => finishers.push(finish),
            Err(_) => tracing::error!("a store job panicked; its writes were rolled back"),
        }
    }
    match conn.execute_batch("COMMIT") {
        Ok(()) => {
            listener.committed(changes);
            for finish in finishers {
                finish(Ok(()));
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "commit failed");
            abort(conn, state, finishers, e.to_string());
        }
    }
}

fn abort(conn: &Connection, state: &mut WriterState, finishers: Vec<Finisher>, why: String) {
    let _ = conn.execute_batch("ROLLBACK");
    match load_state(conn) {
        Ok(reloaded) => *state = reloaded,
        Err(e) => tracing::error!(error = %e, "cannot reload the chain head after a failed commit"),
    }
    for finish in finishers {
        finish(Err(Error::StoreUnavailable(format!(
            "the transaction did not commit: {why}"
        ))));
    }
}

fn read_loop(conn: Connection, queue: mpsc::Receiver<Queue>) {
    while let Ok(Queue::Work(job)) = queue.recv() {
        if let Err(e) = conn.execute_batch("BEGIN") {
            tracing::error!(error = %e, "cannot begin a read transaction");
            continue;
        }
        let mut changes = Vec::new();
        let mut tx = SqliteTx {
            conn: &conn,
            state: None,
            changes: &mut changes,
        };
        let ran = std::panic::catch_unwind(AssertUnwindSafe(|| job(&mut tx)));
        let _ = conn.execute_batch("COMMIT");
        match ran {
            Ok((_, finish)) => finish(Ok(())),
            Err(_) => tracing::error!("a store read panicked"),
        }
    }
}

struct SqliteTx<'a> {
    conn: &'a Connection,
    /// None on the read-only connection.
    state: Option<&'a mut WriterState>,
    changes: &'a mut Vec<Committed>,
}

impl SqliteTx<'_> {
    fn state(&mut self) -> Result<&mut WriterState, StoreError> {
        self.state.as_deref_mut().ok_or(StoreError::ReadOnly)
    }
}

const FLAG_COLUMNS: &str = "tenant_id, key, value, version, event_created, origin, updated_at_ms, updated_by, source_event_id";
const AUDIT_COLUMNS: &str =
    "seq, time_ms, tenant_id, actor, event, outcome, canonical, prev_hash, hash";

fn flag_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Result<FlagRecord, StoreError>> {
    let value: String = row.get(2)?;
    let origin: String = row.get(5)?;
    let record = FlagValue::from_stored(&value).map(|value| FlagRecord {
        tenant_id: String::new(),
        key: String::new(),
        value,
        version: 0,
        event_created: 0,
        origin: FlagOrigin::parse(&origin),
        updated_at_ms: 0,
        updated_by: String::new(),
        source_event_id: String::new(),
    });
    Ok(match record {
        Err(e) => Err(StoreError::Corrupt(e)),
        Ok(record) => Ok(FlagRecord {
            tenant_id: row.get(0)?,
            key: row.get(1)?,
            version: to_u64(row.get(3)?),
            event_created: row.get(4)?,
            updated_at_ms: row.get(6)?,
            updated_by: row.get(7)?,
            source_event_id: row.get(8)?,
            ..record
        }),
    })
}

fn audit_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<StoredAuditRow> {
    Ok(StoredAuditRow {
        seq: to_u64(row.get(0)?),
        time_ms: row.get(1)?,
        tenant_id: row.get(2)?,
        actor: row.get(3)?,
        event: row.get(4)?,
        outcome: row.get(5)?,
        canonical: row.get(6)?,
        prev_hash: row.get(7)?,
        hash: row.get(8)?,
    })
}

impl StoreTx for SqliteTx<'_> {
    fn processed_event(&mut self, event_id: &str) -> Result<Option<ProcessedEvent>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT event_type, tenant_id, outcome, audit_seq FROM processed_events WHERE event_id = ?1",
        )?;
        let row = stmt
            .query_row([event_id], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, i64>(3)?,
                ))
            })
            .optional()?;
        row.map(|(event_type, tenant_id, outcome, audit_seq)| {
            Ok(ProcessedEvent {
                event_id: event_id.to_owned(),
                event_type,
                tenant_id,
                outcome: Outcome::parse(&outcome).ok_or_else(|| {
                    StoreError::Corrupt(format!("unknown stored outcome '{outcome}'"))
                })?,
                audit_seq: to_u64(audit_seq),
            })
        })
        .transpose()
    }

    fn record_processed(&mut self, event: &ProcessedEvent, at_ms: i64) -> Result<(), StoreError> {
        self.state()?;
        self.conn
            .prepare_cached(
                "INSERT INTO processed_events (event_id, event_type, tenant_id, outcome, audit_seq, processed_at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?
            .execute(params![
                event.event_id,
                event.event_type,
                event.tenant_id,
                event.outcome.as_str(),
                to_i64(event.audit_seq),
                at_ms
            ])?;
        Ok(())
    }

    fn tenant_of_customer(&mut self, customer_id: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn
            .prepare_cached("SELECT tenant_id FROM customers WHERE customer_id = ?1")?
            .query_row([customer_id], |r| r.get(0))
            .optional()?)
    }

    fn map_customer(
        &mut self,
        customer_id: &str,
        tenant_id: &str,
        at_ms: i64,
    ) -> Result<Option<String>, StoreError> {
        self.state()?;
        let previous = self.tenant_of_customer(customer_id)?;
        self.conn
            .prepare_cached(
                "INSERT INTO customers (customer_id, tenant_id, updated_at_ms) VALUES (?1, ?2, ?3)
                 ON CONFLICT (customer_id) DO UPDATE SET tenant_id = excluded.tenant_id, updated_at_ms = excluded.updated_at_ms",
            )?
            .execute(params![customer_id, tenant_id, at_ms])?;
        Ok(previous)
    }

    fn unmap_customer(&mut self, customer_id: &str) -> Result<Option<String>, StoreError> {
        self.state()?;
        let previous = self.tenant_of_customer(customer_id)?;
        self.conn
            .prepare_cached("DELETE FROM customers WHERE customer_id = ?1")?
            .execute([customer_id])?;
        Ok(previous)
    }

    fn flag(&mut self, tenant_id: &str, key: &str) -> Result<Option<FlagRecord>, StoreError> {
        self.conn
            .prepare_cached(&format!(
                "SELECT {FLAG_COLUMNS} FROM flags WHERE tenant_id = ?1 AND key = ?2"
            ))?
            .query_row([tenant_id, key], flag_from_row)
            .optional()?
            .transpose()
    }

    fn flags_with_origin(
        &mut self,
        tenant_id: &str,
        origin: FlagOrigin,
    ) -> Result<Vec<FlagRecord>, StoreError> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {FLAG_COLUMNS} FROM flags WHERE tenant_id = ?1 AND origin = ?2 ORDER BY key"
        ))?;
        let rows = stmt.query_map([tenant_id, origin.as_str()], flag_from_row)?;
        rows.map(|r| r?).collect()
    }

    fn write_flag(&mut self, mut record: FlagRecord) -> Result<FlagRecord, StoreError> {
        let state = self.state()?;
        state.flag_version += 1;
        record.version = state.flag_version;
        self.conn
            .prepare_cached(&format!(
                "INSERT INTO flags ({FLAG_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
                 ON CONFLICT (tenant_id, key) DO UPDATE SET value = excluded.value,
                   version = excluded.version, event_created = excluded.event_created,
                   origin = excluded.origin, updated_at_ms = excluded.updated_at_ms,
                   updated_by = excluded.updated_by, source_event_id = excluded.source_event_id"
            ))?
            .execute(params![
                record.tenant_id,
                record.key,
                record.value.to_stored(),
                to_i64(record.version),
                record.event_created,
                record.origin.as_str(),
                record.updated_at_ms,
                record.updated_by,
                record.source_event_id,
            ])?;
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
        self.conn
            .prepare_cached(
                "UPDATE flags SET event_created = MAX(event_created, ?3) WHERE tenant_id = ?1 AND key = ?2",
            )?
            .execute(params![tenant_id, key, created])?;
        Ok(())
    }

    fn append_audit(&mut self, record: NewAuditRecord, at_ms: i64) -> Result<AuditRecord, Error> {
        let state = self.state()?;
        let sealed = audit::seal(&state.head, record, at_ms)?;
        state.head = ChainHead {
            seq: sealed.seq,
            hash: sealed.hash,
        };
        self.conn
            .prepare_cached(&format!(
                "INSERT INTO audit ({AUDIT_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)"
            ))
            .map_err(StoreError::from)?
            .execute(params![
                to_i64(sealed.seq),
                sealed.time_ms,
                sealed.tenant_id,
                sealed.actor,
                sealed.event,
                sealed.outcome,
                sealed.canonical,
                sealed.prev_hash.as_slice(),
                sealed.hash.as_slice(),
            ])
            .map_err(StoreError::from)?;
        self.changes.push(Committed::Audit(sealed.clone()));
        Ok(sealed)
    }

    fn load_flags(&mut self) -> Result<Vec<FlagRecord>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(&format!("SELECT {FLAG_COLUMNS} FROM flags"))?;
        let rows = stmt.query_map([], flag_from_row)?;
        rows.map(|r| r?).collect()
    }

    fn audit_head(&mut self) -> Result<ChainHead, StoreError> {
        load_head(self.conn)
    }

    fn query_audit(&mut self, query: &AuditQuery) -> Result<Vec<AuditRecord>, StoreError> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {AUDIT_COLUMNS} FROM audit
             WHERE seq > ?1
               AND (?2 IS NULL OR tenant_id = ?2)
               AND (?3 IS NULL OR substr(event, 1, length(?3)) = ?3)
               AND (?4 IS NULL OR outcome = ?4)
               AND (?5 IS NULL OR time_ms >= ?5)
               AND (?6 IS NULL OR time_ms < ?6)
             ORDER BY seq LIMIT ?7"
        ))?;
        let rows = stmt.query_map(
            params![
                to_i64(query.after_seq),
                query.tenant_id,
                query.event_prefix,
                query.outcome,
                query.since_ms,
                query.until_ms,
                i64::from(query.limit),
            ],
            audit_from_row,
        )?;
        rows.map(|r| Ok(r?.into_record())).collect()
    }

    fn scan_audit(
        &mut self,
        from_seq: u64,
        visit: &mut dyn FnMut(StoredAuditRow) -> bool,
    ) -> Result<(), StoreError> {
        let mut stmt = self.conn.prepare(&format!(
            "SELECT {AUDIT_COLUMNS} FROM audit WHERE seq >= ?1 ORDER BY seq"
        ))?;
        let mut rows = stmt.query([to_i64(from_seq)])?;
        while let Some(row) = rows.next()? {
            if !visit(audit_from_row(row)?) {
                break;
            }
        }
        Ok(())
    }
}

/// Opens a database file read-only for offline tools (`coresdk audit verify`).
pub fn open_read_only(path: &Path) -> Result<impl StoreTxOwner, StoreError> {
    if !path.exists() {
        return Err(StoreError::Corrupt(format!(
            "{} does not exist",
            path.display()
        )));
    }
    let conn = open_connection(&StoreUrl::Sqlite(path.to_owned()), true)?;
    Ok(OfflineStore { conn })
}

/// A store opened without the server, for command-line tools.
pub trait StoreTxOwner {
    fn with_tx<T>(&mut self, work: impl FnOnce(&mut dyn StoreTx) -> T) -> T;
}

struct OfflineStore {
    conn: Connection,
}

impl StoreTxOwner for OfflineStore {
    fn with_tx<T>(&mut self, work: impl FnOnce(&mut dyn StoreTx) -> T) -> T {
        let mut changes = Vec::new();
        let mut tx = SqliteTx {
            conn: &self.conn,
            state: None,
            changes: &mut changes,
        };
        work(&mut tx)
    }
}
