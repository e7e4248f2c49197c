//! The embedded store: SQLite in WAL mode with `synchronous=FULL`, so a commit is on disk
//! before it is acknowledged. `memory` is the same engine on an in-memory database, so mock
//! mode and tests run exactly the code production runs.
//!
//! One writer thread owns the write connection and runs the shared write engine on it (group
//! commit, one savepoint per job). Reads of a file database run on [`READERS`] read-only
//! connections sharing one queue, so a long `Verify` never holds up webhooks, and (since the
//! store runs one long read at a time) never holds up the other reads either.

mod connection;
mod schema;
mod statements;

use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use self::connection::SqliteConn;
use super::engine;
use super::tx::{Tx, WriterState};
use super::{Backend, CommitListener, Job, Queue, StoreError, StoreTx, StoreUrl, Workers};

/// Read-only connections of a file database: one for the long read the store allows at a
/// time, and one that is always left for every other read.
const READERS: usize = 2;

pub struct SqliteStore {
    /// Held for the store's lifetime: two sidecars on one file would each keep their own
    /// chain head and fork the audit chain, so the second one must not start.
    _lock: Option<std::fs::File>,
    writer: mpsc::Sender<Queue>,
    /// Absent for an in-memory database, whose reads go through the writer (a long read there
    /// holds up writes too; the memory store is for mock mode and tests).
    reader: Option<mpsc::Sender<Queue>>,
    workers: Workers,
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
        let mut conn = SqliteConn::open(url, false)?;
        schema::migrate(conn.raw())?;
        let state = WriterState::load(&mut conn)?;
        let (writer, writer_queue) = mpsc::channel();
        let workers = Workers::default();
        workers.spawn("coresdk-store-writer", move || {
            engine::write_loop(&mut conn, state, &writer_queue, listener.as_ref());
            conn.close();
        })?;
        let reader = match url {
            StoreUrl::Memory | StoreUrl::Postgres(_) => None,
            StoreUrl::Sqlite(_) => {
                let (reader, reader_queue) = mpsc::channel();
                let reader_queue = Arc::new(Mutex::new(reader_queue));
                for _ in 0..READERS {
                    let mut conn = SqliteConn::open(url, true)?;
                    let queue = reader_queue.clone();
                    workers.spawn("coresdk-store-reader", move || {
                        engine::read_loop(&mut conn, &queue)
                    })?;
                }
                Some(reader)
            }
        };
        Ok(Self {
            _lock: lock,
            writer,
            reader,
            workers,
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
    fn submit_write(&self, job: Box<dyn Job>) {
        // A closed queue drops the job, which answers the caller "unavailable".
        let _ = self.writer.send(Queue::Work(job));
    }

    fn submit_read(&self, job: Box<dyn Job>) {
        let queue = self.reader.as_ref().unwrap_or(&self.writer);
        let _ = queue.send(Queue::Work(job));
    }

    fn close(&self) {
        let _ = self.writer.send(Queue::Close);
        if let Some(reader) = &self.reader {
            for _ in 0..READERS {
                let _ = reader.send(Queue::Close);
            }
        }
        self.workers.join_all();
    }
}

/// Opens a database file read-only for offline tools (`coresdk audit verify`).
pub fn open_read_only(path: &Path) -> Result<impl StoreTxOwner, StoreError> {
    if !path.exists() {
        return Err(StoreError::Missing(path.display().to_string()));
    }
    let conn = SqliteConn::open(&StoreUrl::Sqlite(path.to_owned()), true)?;
    Ok(OfflineStore { conn })
}

/// A store opened without the server, for command-line tools.
pub trait StoreTxOwner {
    /// Runs `work` in one read transaction, whose snapshot is taken at its first query.
    fn with_read_tx<T>(
        &mut self,
        work: impl FnOnce(&mut dyn StoreTx) -> T,
    ) -> Result<T, StoreError>;
}

struct OfflineStore {
    conn: SqliteConn,
}

impl StoreTxOwner for OfflineStore {
    fn with_read_tx<T>(
        &mut self,
        work: impl FnOnce(&mut dyn StoreTx) -> T,
    ) -> Result<T, StoreError> {
        use super::engine::{Connection as _, OpenTx};
        let tx = self.conn.begin_read()?;
        let done = work(&mut Tx::reading(&mut *tx));
        tx.execute_script(<SqliteConn as OpenTx>::SCRIPTS.commit)?;
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::problem::Error;
    use crate::store::engine::tests::flag;
    use crate::store::{Committed, job};

    struct Ignore;

    impl CommitListener for Ignore {
        fn committed(&self, _: Vec<Committed>) {}
    }

    #[test]
    fn a_panicking_job_leaves_nothing_in_the_database_and_the_others_commit() {
        let mut conn = SqliteConn::open(&StoreUrl::Memory, false).expect("open");
        schema::migrate(conn.raw()).expect("migrate");
        let mut state = WriterState::load(&mut conn).expect("state");
        let write = |key: &'static str, panics: bool| {
            job(move |tx: &mut dyn StoreTx| -> Result<u64, Error> {
                let written = tx.write_flag(flag(key))?;
                assert!(!panics, "injected panic in a store job");
                Ok(written.version)
            })
        };
        let (a, mut a_answer) = write("a", false);
        let (b, mut b_answer) = write("doomed", true);
        let (c, mut c_answer) = write("c", false);
        engine::run_batch(&mut conn, &mut state, vec![a, b, c], &Ignore);

        assert_eq!(a_answer.try_recv().expect("answered").ok(), Some(1));
        assert!(matches!(
            b_answer.try_recv().expect("answered"),
            Err(Error::StoreUnavailable(_))
        ));
        assert_eq!(c_answer.try_recv().expect("answered").ok(), Some(2));
        let stored: Vec<(String, u64)> = Tx::reading(&mut conn)
            .load_flags()
            .expect("flags")
            .into_iter()
            .map(|f| (f.key, f.version))
            .collect();
        assert_eq!(stored, [("a".to_owned(), 1), ("c".to_owned(), 2)]);
        assert_eq!(WriterState::load(&mut conn).expect("state"), state);
    }

    fn record(event: &str) -> crate::audit::NewAuditRecord {
        crate::audit::NewAuditRecord {
            tenant_id: "acme".into(),
            actor: "test".into(),
            event: event.into(),
            outcome: "applied".into(),
            metadata: Default::default(),
        }
    }

    /// Runs `work` as one write batch and answers what it answered.
    fn write<T: Send + 'static>(
        conn: &mut SqliteConn,
        state: &mut WriterState,
        work: impl FnOnce(&mut dyn StoreTx) -> Result<T, Error> + Send + 'static,
    ) -> T {
        let (job, mut answer) = job(work);
        engine::run_batch(conn, state, vec![job], &Ignore);
        answer.try_recv().expect("answered").expect("written")
    }

    #[test]
    fn the_tree_of_a_chain_from_before_it_is_built_in_batches_and_then_extended() {
        use crate::tlog::{self, Frontier};
        let mut conn = SqliteConn::open(&StoreUrl::Memory, false).expect("open");
        schema::migrate(conn.raw()).expect("migrate");
        let mut state = WriterState::load(&mut conn).expect("state");
        let mut canonical = Vec::new();
        for n in 0..25 {
            let sealed = write(&mut conn, &mut state, move |tx| {
                tx.append_audit(record(&format!("e{n}")), 1_700_000_000_000)
            });
            canonical.push(sealed.canonical);
        }
        // The chain as a sidecar before the tree left it: no tree hashes after record 10.
        conn.raw()
            .execute("UPDATE audit SET tree_hashes = NULL WHERE seq > 10", [])
            .expect("forgotten");
        let reach = Tx::reading(&mut conn).audit_tree_reach().expect("reach");
        assert_eq!((reach.built, reach.records), (10, 25));
        // Found through the partial index, not by scanning the rows still to build.
        let sql = format!(
            "EXPLAIN QUERY PLAN {}",
            statements::text(crate::store::dialect::Statement::FirstUnbuilt)
        );
        let mut explained = conn.raw().prepare(&sql).expect("explained");
        let plan = explained
            .query_map([], |row| row.get::<_, String>(3))
            .expect("plan")
            .collect::<Result<Vec<_>, _>>()
            .expect("plan rows")
            .join("; ");
        drop(explained);
        assert!(plan.contains("audit_unbuilt"), "{plan}");
        let mut state = WriterState::load(&mut conn).expect("state");
        let reach = write(&mut conn, &mut state, |tx| tx.extend_audit_tree(7));
        assert_eq!((reach.built, reach.records), (17, 25));
        // The next append finds its tree out of date and builds the rest first.
        let sealed = write(&mut conn, &mut state, |tx| {
            tx.append_audit(record("after"), 1_700_000_000_000)
        });
        canonical.push(sealed.canonical);
        let mut expected = Frontier::EMPTY;
        let mut tx = Tx::reading(&mut conn);
        assert_eq!(tlog::tree_root(&mut tx, 0).expect("root"), tlog::EMPTY_ROOT);
        for (n, bytes) in canonical.iter().enumerate() {
            expected.append(tlog::leaf_hash(bytes), [0; 32]);
            let size = n as u64 + 1;
            assert_eq!(
                tlog::tree_root(&mut tx, size).expect("root"),
                expected.root(),
                "size {size}"
            );
        }
        let reach = tx.extend_audit_tree(0);
        assert!(reach.is_err(), "a read transaction builds nothing");

        // Hashes removed from one record in the middle: only that record is built again, from
        // its bytes; the records after it keep theirs, untouched.
        let stored = |conn: &mut SqliteConn| -> Vec<Vec<u8>> {
            let mut all = conn
                .raw()
                .prepare("SELECT tree_hashes FROM audit ORDER BY seq")
                .expect("prepared");
            all.query_map([], |row| row.get(0))
                .expect("read")
                .collect::<Result<_, _>>()
                .expect("rows")
        };
        let before = stored(&mut conn);
        conn.raw()
            .execute_batch(
                "UPDATE audit SET tree_hashes = NULL WHERE seq = 5;
                 UPDATE audit SET tree_hashes = x'00' WHERE seq = 9;",
            )
            .expect("edited");
        let reach = write(&mut conn, &mut state, |tx| tx.extend_audit_tree(100));
        assert_eq!(
            (reach.built, reach.records),
            (5, 26),
            "it stops where hashes are stored"
        );
        let reach = Tx::reading(&mut conn).audit_tree_reach().expect("reach");
        assert_eq!((reach.built, reach.records), (26, 26));
        let after = stored(&mut conn);
        assert_eq!(after[4], before[4], "record 5 built again from its bytes");
        assert_eq!(
            after[8],
            vec![0],
            "record 9's (edited) hashes are left as evidence"
        );
        assert_eq!(after[9..], before[9..]);
    }
}
