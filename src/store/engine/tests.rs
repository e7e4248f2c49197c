//! The batch algorithm against a scripted connection: which scripts run, in which order, and
//! what every caller is answered when a job panics or a step of the batch fails.

use std::sync::Mutex;

use tokio::sync::oneshot;

use super::*;
use crate::flags::{FlagOrigin, FlagRecord, FlagValue};
use crate::store::dialect::{Param, Row, Statement};
use crate::store::{Committed, StoreTx, job};

/// A connection that records what the engine asks of it and fails where it is told to.
#[derive(Default)]
struct Scripted {
    log: Vec<&'static str>,
    /// The script that fails, and on which of its runs (1 = the first).
    fail: Option<(&'static str, usize)>,
    fail_begin: bool,
    paused: bool,
}

impl Scripted {
    fn failing(script: &'static str, on_run: usize) -> Self {
        Self {
            fail: Some((script, on_run)),
            ..Self::default()
        }
    }

    fn record(&mut self, step: &'static str) -> Result<(), StoreError> {
        self.log.push(step);
        let runs = self.log.iter().filter(|s| **s == step).count();
        match self.fail {
            Some((failing, on_run)) if failing == step && on_run == runs => {
                Err(StoreError::Corrupt(format!("injected failure of {step}")))
            }
            _ => Ok(()),
        }
    }
}

impl Connection for Scripted {
    type Open = Self;

    fn begin_write(&mut self, _state: &mut WriterState) -> Result<&mut Self, StoreError> {
        if self.fail_begin {
            return Err(StoreError::Corrupt("injected failure of begin".into()));
        }
        self.record("begin")?;
        Ok(self)
    }

    fn begin_read(&mut self) -> Result<&mut Self, StoreError> {
        self.record("begin read")?;
        Ok(self)
    }

    fn pause_after_refusal(&mut self) {
        self.paused = true;
    }
}

impl OpenTx for Scripted {
    const SCRIPTS: TransactionSql = TransactionSql {
        open_savepoint: "savepoint",
        keep_job: "keep",
        undo_job: "undo",
        commit: "commit",
        rollback: "rollback",
    };

    fn execute_script(&mut self, script: &'static str) -> Result<(), StoreError> {
        self.record(script)
    }

    fn before_commit(&mut self, _: &WriterState, _: &WriterState) -> Result<(), StoreError> {
        self.record("before commit")
    }
}

impl Sql for Scripted {
    fn query(
        &mut self,
        _: Statement,
        _: &[Param<'_>],
        _: &mut dyn FnMut(&dyn Row) -> Result<bool, StoreError>,
    ) -> Result<(), StoreError> {
        self.record("query")
    }

    fn execute(&mut self, _: Statement, _: &[Param<'_>]) -> Result<(), StoreError> {
        self.record("write")
    }
}

#[derive(Default)]
struct Heard(Mutex<Vec<Vec<Committed>>>);

impl CommitListener for Heard {
    fn committed(&self, changes: Vec<Committed>) {
        self.0.lock().expect("listener lock").push(changes);
    }
}

impl Heard {
    /// The flags each commit announced, as (key, version).
    fn flags(&self) -> Vec<Vec<(String, u64)>> {
        let heard = self.0.lock().expect("listener lock");
        heard
            .iter()
            .map(|changes| {
                changes
                    .iter()
                    .filter_map(|change| match change {
                        Committed::Flag(flag) => Some((flag.key.clone(), flag.version)),
                        Committed::Audit(_) => None,
                    })
                    .collect()
            })
            .collect()
    }
}

pub(crate) fn flag(key: &str) -> FlagRecord {
    FlagRecord {
        tenant_id: "acme".into(),
        key: key.into(),
        value: FlagValue::Bool(true),
        version: 0,
        order: Default::default(),
        origin: FlagOrigin::Admin,
        updated_at_ms: 0,
        updated_by: "test".into(),
        source_event_id: String::new(),
    }
}

type Answer<T> = oneshot::Receiver<Result<T, Error>>;

/// A job that writes flag `key` and answers the version it got.
fn write(key: &'static str) -> (Box<dyn Job>, Answer<u64>) {
    job(move |tx: &mut dyn StoreTx| Ok(tx.write_flag(flag(key))?.version))
}

/// A job that writes flag `key`, then panics.
fn write_then_panic(key: &'static str) -> (Box<dyn Job>, Answer<u64>) {
    job(move |tx: &mut dyn StoreTx| {
        tx.write_flag(flag(key))?;
        panic!("injected panic in a store job")
    })
}

fn answered<T: std::fmt::Debug>(answer: &mut Answer<T>) -> Result<T, Error> {
    answer.try_recv().expect("the job was answered")
}

fn unavailable<T: std::fmt::Debug>(answer: &mut Answer<T>) -> String {
    match answered(answer) {
        Err(Error::StoreUnavailable(why)) => why,
        other => panic!("expected StoreUnavailable, got {other:?}"),
    }
}

/// Runs three flag-writing jobs as one batch on `conn`; returns their answers, the writer
/// state after the batch and what the listener heard.
fn run_three(conn: &mut Scripted) -> ([Answer<u64>; 3], WriterState, Heard) {
    let (a, a_answer) = write("a");
    let (b, b_answer) = write("b");
    let (c, c_answer) = write("c");
    let heard = Heard::default();
    let mut state = WriterState::EMPTY;
    run_batch(conn, &mut state, vec![a, b, c], &heard);
    ([a_answer, b_answer, c_answer], state, heard)
}

#[test]
fn a_panicking_job_is_answered_with_an_error_and_the_others_commit() {
    let mut conn = Scripted::default();
    let (a, mut a_answer) = write("a");
    let (b, mut b_answer) = write_then_panic("doomed");
    let (c, mut c_answer) = write("c");
    let heard = Heard::default();
    let mut state = WriterState::EMPTY;
    run_batch(&mut conn, &mut state, vec![a, b, c], &heard);

    assert_eq!(answered(&mut a_answer).ok(), Some(1));
    unavailable(&mut b_answer);
    // The panicking job's version bump was undone with its writes: "c" takes the next one.
    assert_eq!(answered(&mut c_answer).ok(), Some(2));
    assert_eq!(state.flag_version, 2);
    assert_eq!(
        heard.flags(),
        vec![vec![("a".to_owned(), 1), ("c".to_owned(), 2)]]
    );
    assert_eq!(
        conn.log,
        [
            "begin",
            "savepoint",
            "write",
            "keep",
            "write",
            "undo",
            "write",
            "keep",
            "before commit",
            "commit"
        ]
    );
}

#[test]
fn a_job_that_fails_is_undone_and_answered_its_own_error() {
    let mut conn = Scripted::default();
    let (a, mut a_answer) = job(|tx: &mut dyn StoreTx| -> Result<u64, Error> {
        tx.write_flag(flag("a"))?;
        Err(Error::FlagNotFound { key: "a".into() })
    });
    let (b, mut b_answer) = write("b");
    let heard = Heard::default();
    let mut state = WriterState::EMPTY;
    run_batch(&mut conn, &mut state, vec![a, b], &heard);

    assert!(matches!(
        answered(&mut a_answer),
        Err(Error::FlagNotFound { .. })
    ));
    assert_eq!(answered(&mut b_answer).ok(), Some(1));
    assert_eq!(heard.flags(), vec![vec![("b".to_owned(), 1)]]);
    assert_eq!(conn.log[..4], ["begin", "savepoint", "write", "undo"]);
}

#[test]
fn a_batch_whose_first_savepoint_fails_runs_nothing_and_answers_everyone() {
    let mut conn = Scripted::failing("savepoint", 1);
    let (answers, state, heard) = run_three(&mut conn);
    for mut answer in answers {
        assert!(unavailable(&mut answer).contains("did not commit"));
    }
    assert_eq!(conn.log, ["begin", "savepoint", "rollback"]);
    assert_eq!(state, WriterState::EMPTY);
    assert!(heard.flags().is_empty(), "nothing committed, nothing heard");
}

#[test]
fn a_failed_savepoint_mid_batch_abandons_it_and_answers_run_and_unrun_jobs() {
    for failing in ["keep", "undo"] {
        // "keep" fails after job "a"; job "b" panics so that the engine undoes it, and "undo"
        // fails there.
        let mut conn = Scripted::failing(failing, 1);
        let (a, mut a_answer) = write("a");
        let (b, mut b_answer) = write_then_panic("b");
        let (c, mut c_answer) = write("c");
        let heard = Heard::default();
        let mut state = WriterState::EMPTY;
        run_batch(&mut conn, &mut state, vec![a, b, c], &heard);

        assert!(unavailable(&mut a_answer).contains("did not commit"));
        unavailable(&mut b_answer);
        assert!(unavailable(&mut c_answer).contains("did not commit"));
        assert_eq!(conn.log.last(), Some(&"rollback"), "{failing}");
        assert!(!conn.log.contains(&"commit"), "{failing}");
        assert_eq!(state, WriterState::EMPTY, "{failing}: state put back");
        assert!(heard.flags().is_empty(), "{failing}");
    }
}

#[test]
fn a_failed_commit_answers_every_job_and_puts_the_state_back() {
    for failing in ["before commit", "commit"] {
        let mut conn = Scripted::failing(failing, 1);
        let (answers, state, heard) = run_three(&mut conn);
        for mut answer in answers {
            let why = unavailable(&mut answer);
            assert!(
                why.contains("did not commit") && why.contains("injected"),
                "{why}"
            );
        }
        assert_eq!(conn.log.last(), Some(&"rollback"), "{failing}");
        assert_eq!(state, WriterState::EMPTY, "{failing}: no version was spent");
        assert!(heard.flags().is_empty(), "{failing}");
    }
}

#[test]
fn a_batch_that_cannot_begin_answers_everyone_and_pauses() {
    let mut conn = Scripted {
        fail_begin: true,
        ..Scripted::default()
    };
    let (answers, state, heard) = run_three(&mut conn);
    for mut answer in answers {
        unavailable(&mut answer);
    }
    assert!(conn.log.is_empty(), "no job ran: {:?}", conn.log);
    assert!(conn.paused);
    assert_eq!(state, WriterState::EMPTY);
    assert!(heard.flags().is_empty());
}

#[test]
fn reads_refuse_writes_and_a_panicking_read_is_answered() {
    let mut conn = Scripted::default();
    let (refused, mut refused_answer) = write("a");
    read(&mut conn, refused);
    assert!(matches!(
        answered(&mut refused_answer),
        Err(Error::StoreUnavailable(why)) if why.contains("read-only")
    ));

    let (panics, mut panics_answer) = job(|tx: &mut dyn StoreTx| -> Result<(), Error> {
        tx.load_flags()?;
        panic!("injected panic in a store read")
    });
    read(&mut conn, panics);
    unavailable(&mut panics_answer);
    assert_eq!(
        conn.log,
        ["begin read", "commit", "begin read", "query", "commit"]
    );
}

#[test]
fn jobs_whose_callers_left_before_they_ran_are_skipped_and_the_rest_commit() {
    let mut conn = Scripted::default();
    let (a, mut a_answer) = write("a");
    let (gone_early, gone_early_answer) = write("gone early");
    // The caller of "gone late" leaves while the batch is already running ("a" drops it).
    let (gone_late, gone_late_answer) = write("gone late");
    let leave = Mutex::new(Some(gone_late_answer));
    let (leaves, mut leaves_answer) = job(move |tx: &mut dyn StoreTx| {
        drop(leave.lock().expect("lock").take());
        Ok(tx.write_flag(flag("leaves"))?.version)
    });
    drop(gone_early_answer);
    let heard = Heard::default();
    let mut state = WriterState::EMPTY;
    run_batch(
        &mut conn,
        &mut state,
        vec![a, gone_early, leaves, gone_late],
        &heard,
    );

    assert_eq!(answered(&mut a_answer).ok(), Some(1));
    assert_eq!(answered(&mut leaves_answer).ok(), Some(2));
    assert_eq!(
        heard.flags(),
        vec![vec![("a".to_owned(), 1), ("leaves".to_owned(), 2)]]
    );
    assert_eq!(
        conn.log.iter().filter(|step| **step == "write").count(),
        2,
        "skipped jobs wrote nothing: {:?}",
        conn.log
    );
}

#[test]
fn a_job_that_ran_commits_even_if_its_caller_leaves_before_the_commit() {
    let mut conn = Scripted::default();
    let own_answer: std::sync::Arc<Mutex<Option<Answer<u64>>>> = Default::default();
    let cell = own_answer.clone();
    let (leaving, answer) = job(move |tx: &mut dyn StoreTx| {
        drop(cell.lock().expect("lock").take());
        Ok(tx.write_flag(flag("leaving"))?.version)
    });
    *own_answer.lock().expect("lock") = Some(answer);
    let heard = Heard::default();
    let mut state = WriterState::EMPTY;
    run_batch(&mut conn, &mut state, vec![leaving], &heard);

    assert_eq!(heard.flags(), vec![vec![("leaving".to_owned(), 1)]]);
    assert_eq!(conn.log.last(), Some(&"commit"));
}

#[test]
fn a_batch_of_abandoned_jobs_begins_no_transaction() {
    let mut conn = Scripted::default();
    let (a, a_answer) = write("a");
    drop(a_answer);
    let heard = Heard::default();
    let mut state = WriterState::EMPTY;
    run_batch(&mut conn, &mut state, vec![a], &heard);
    assert!(conn.log.is_empty(), "{:?}", conn.log);
    assert!(heard.flags().is_empty());
}

#[test]
fn detached_work_runs_though_nobody_waits_for_it() {
    use crate::store::{WhenAbandoned, queued_job};
    let mut conn = Scripted::default();
    let (detached, answer) = queued_job(
        |tx: &mut dyn StoreTx| Ok(tx.write_flag(flag("audit"))?.version),
        WhenAbandoned::Run,
        Vec::new(),
        tracing::Span::none(),
    );
    drop::<Answer<u64>>(answer);
    let heard = Heard::default();
    let mut state = WriterState::EMPTY;
    run_batch(&mut conn, &mut state, vec![detached], &heard);
    assert_eq!(heard.flags(), vec![vec![("audit".to_owned(), 1)]]);
}

#[test]
fn a_read_whose_caller_left_is_not_run() {
    let mut conn = Scripted::default();
    let (gone, answer) = job(|tx: &mut dyn StoreTx| -> Result<(), Error> {
        tx.load_flags()?;
        Ok(())
    });
    drop(answer);
    read(&mut conn, gone);
    assert!(conn.log.is_empty(), "{:?}", conn.log);
}
