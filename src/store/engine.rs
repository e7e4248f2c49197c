//! The one write engine both backends run: group commit of queued jobs in one transaction,
//! each job behind a savepoint so that one failing or panicking job never takes the others
//! down, and every caller answered exactly once. Also the read loop. A backend provides a
//! [`Connection`]; everything about batches, savepoints, state restore and answers is here.

use std::panic::AssertUnwindSafe;
use std::sync::Mutex;
use std::sync::mpsc::Receiver;

use super::dialect::Sql;
use super::tx::{Tx, WriterState};
use super::{CommitListener, Job, Queue, StoreError, dropped, next_batch};
use crate::problem::Error;

/// Jobs committed together at most; bounds the latency one commit adds to the first job.
const MAX_BATCH: usize = 512;

/// A database connection as the engine drives it: opening transactions, and managing the
/// connection itself (reconnecting, locking) behind that.
pub(crate) trait Connection {
    type Open: OpenTx;

    /// Opens a write transaction, holding whatever keeps other writers out until it ends, and
    /// brings `state` up to date with the database where others may have written.
    fn begin_write(&mut self, state: &mut WriterState) -> Result<&mut Self::Open, StoreError>;

    /// Opens a read-only transaction.
    fn begin_read(&mut self) -> Result<&mut Self::Open, StoreError>;

    /// Called after work was refused because no transaction could begin, so a backend whose
    /// database is away does not spin.
    fn pause_after_refusal(&mut self) {}
}

/// The SQL text that moves a transaction along, per dialect. One savepoint is always open while
/// jobs run, so that moving past a job, or undoing it, is a single script (one round trip where
/// the database is remote).
pub(crate) struct TransactionSql {
    /// Opens the savepoint the first job runs behind.
    pub(crate) open_savepoint: &'static str,
    /// Keeps the last job's writes and opens a fresh savepoint for the next.
    pub(crate) keep_job: &'static str,
    /// Undoes the last job's writes, leaving the savepoint open for the next.
    pub(crate) undo_job: &'static str,
    pub(crate) commit: &'static str,
    pub(crate) rollback: &'static str,
}

/// A connection inside an open transaction.
pub(crate) trait OpenTx: Sql {
    const SCRIPTS: TransactionSql;

    /// Runs one of [`Self::SCRIPTS`].
    fn execute_script(&mut self, script: &'static str) -> Result<(), StoreError>;

    /// Runs last inside the transaction, seeing how the batch moved the writer state.
    fn before_commit(
        &mut self,
        _at_begin: &WriterState,
        _now: &WriterState,
    ) -> Result<(), StoreError> {
        Ok(())
    }
}

/// Runs batches from `queue` until it is closed. `state` is the writer state to start from.
pub(crate) fn write_loop(
    conn: &mut impl Connection,
    mut state: WriterState,
    queue: &Receiver<Queue>,
    listener: &dyn CommitListener,
) {
    let mut closing = false;
    while !closing {
        let Some((batch, close_after)) = next_batch(queue, MAX_BATCH) else {
            break;
        };
        closing = close_after;
        run_batch(conn, &mut state, batch, listener);
    }
    // Work queued behind the close marker is dropped, which answers it "unavailable".
}

/// Runs `batch` in one transaction, one savepoint per job, and commits once. Every job is
/// answered: with the commit's outcome if its work returned, with an error if it panicked or
/// the batch could not begin or commit. The listener hears the changes only of a commit.
///
/// A job whose caller has gone before it runs ([`Job::abandoned`]) is dropped unrun, checked
/// once before the transaction begins (which may wait for a lock) and again just before the
/// job would run; a job that ran is never dropped, since the commit is what its caller, if it
/// is still there, will be told.
pub(crate) fn run_batch<C: Connection>(
    conn: &mut C,
    state: &mut WriterState,
    mut batch: Vec<Box<dyn Job>>,
    listener: &dyn CommitListener,
) {
    batch.retain(|job| !job.abandoned());
    if batch.is_empty() {
        return;
    }
    let span = commit_span(&batch);
    let entered = span.enter();
    let began = std::time::Instant::now();
    let tx = match conn.begin_write(state) {
        Ok(tx) => tx,
        Err(e) => {
            tracing::warn!(error = %e, jobs = batch.len(), "cannot begin a write transaction; store writes refused");
            for job in batch {
                job.answer(Err(not_begun(&e)));
            }
            conn.pause_after_refusal();
            return;
        }
    };
    let at_begin = *state;
    let mut ran: Vec<Box<dyn Job>> = Vec::with_capacity(batch.len());
    let mut changes = Vec::new();
    let mut pending = batch.into_iter();
    let scripts = <C::Open as OpenTx>::SCRIPTS;
    if let Err(e) = tx.execute_script(scripts.open_savepoint) {
        return abandon(tx, state, at_begin, ran, pending, &e);
    }
    while let Some(mut job) = pending.next() {
        if job.abandoned() {
            continue;
        }
        let saved = *state;
        let changes_before = changes.len();
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
            job.run(&mut Tx::writing(&mut *tx, state, &mut changes))
        }));
        let step = if matches!(outcome, Ok(true)) {
            tx.execute_script(scripts.keep_job)
        } else {
            *state = saved;
            changes.truncate(changes_before);
            tx.execute_script(scripts.undo_job)
        };
        match outcome {
            Ok(_) => ran.push(job),
            Err(_) => {
                tracing::error!("a store job panicked; its writes were rolled back");
                job.answer(Err(dropped()));
            }
        }
        if let Err(e) = step {
            return abandon(tx, state, at_begin, ran, pending, &e);
        }
    }
    let committed = tx
        .before_commit(&at_begin, state)
        .and_then(|()| tx.execute_script(scripts.commit));
    if let Err(e) = committed {
        return abandon(tx, state, at_begin, ran, std::iter::empty(), &e);
    }
    listener.metrics().store_commit(ran.len(), began.elapsed());
    listener.committed(changes);
    // The commit ends before its callers hear of it, as their waits' spans do.
    drop(entered);
    drop(span);
    for job in ran {
        job.answer(Ok(()));
    }
}

/// The span of a batch's transaction. One commit serves several callers: it is a child of the
/// first traced job's write (so a lone request's trace holds its commit) and links the others'.
/// Work nobody traces (background writes) makes no span.
fn commit_span(batch: &[Box<dyn Job>]) -> tracing::Span {
    let mut traced = batch
        .iter()
        .map(|job| job.span())
        .filter(|span| !span.is_disabled());
    let Some(first) = traced.next() else {
        return tracing::Span::none();
    };
    // Signed: the trace bridge exports only signed integers as numbers.
    let jobs = i64::try_from(batch.len()).unwrap_or(i64::MAX);
    let span = tracing::debug_span!(parent: first, "store.commit", store.jobs = jobs);
    for other in traced {
        span.follows_from(other);
    }
    span
}

/// The answer to work refused because no transaction could begin. It names the cause: callers
/// see only a generic problem, and the log line of its incident id then says what happened.
fn not_begun(why: &StoreError) -> Error {
    Error::StoreUnavailable(format!("cannot begin a transaction: {}", why.summary()))
}

/// Rolls the batch back, puts the writer state back where the batch began (which is what the
/// database holds again) and answers every job, run or not, that nothing committed.
fn abandon<T: OpenTx>(
    tx: &mut T,
    state: &mut WriterState,
    at_begin: WriterState,
    ran: Vec<Box<dyn Job>>,
    not_run: impl Iterator<Item = Box<dyn Job>>,
    why: &StoreError,
) {
    tracing::error!(error = %why, "the batch did not commit; rolling it back");
    // The connection may be gone: its state no longer matters, only the answers do.
    let _ = tx.execute_script(T::SCRIPTS.rollback);
    *state = at_begin;
    for job in ran.into_iter().chain(not_run) {
        job.answer(Err(Error::StoreUnavailable(format!(
            "the transaction did not commit: {}",
            why.summary()
        ))));
    }
}

/// Serves reads from `queue`, one read-only transaction each, until the queue is closed.
/// Several connections may share one queue. A read whose caller has gone is dropped unrun.
pub(crate) fn read_loop(conn: &mut impl Connection, queue: &Mutex<Receiver<Queue>>) {
    loop {
        let next = match queue.lock() {
            Ok(queue) => queue.recv(),
            Err(_) => return,
        };
        let Ok(Queue::Work(job)) = next else { return };
        read(conn, job);
    }
}

fn read<C: Connection>(conn: &mut C, mut job: Box<dyn Job>) {
    if job.abandoned() {
        return;
    }
    let tx = match conn.begin_read() {
        Ok(tx) => tx,
        Err(e) => {
            tracing::warn!(error = %e, "cannot begin a read transaction; the read is refused");
            job.answer(Err(not_begun(&e)));
            conn.pause_after_refusal();
            return;
        }
    };
    let outcome =
        std::panic::catch_unwind(AssertUnwindSafe(|| job.run(&mut Tx::reading(&mut *tx))));
    // Nothing was written: ending the transaction either way releases its snapshot.
    let _ = tx.execute_script(<C::Open as OpenTx>::SCRIPTS.commit);
    match outcome {
        Ok(_) => job.answer(Ok(())),
        Err(_) => {
            tracing::error!("a store read panicked");
            job.answer(Err(dropped()));
        }
    }
}

#[cfg(test)]
pub(super) mod tests;
