//! An expensive read that concurrent callers share instead of each running their own.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use futures_util::future::{BoxFuture, FutureExt, Shared, WeakShared};

type Run<T> = Shared<BoxFuture<'static, T>>;

/// The newest run: running, or waiting for the one before it to end.
struct Newest<T> {
    run: WeakShared<BoxFuture<'static, T>>,
    started: Arc<AtomicBool>,
}

/// Callers join a run that has not started yet, so its answer covers everything that happened
/// before each of their calls; one arriving while a run is under way queues the next run,
/// which starts when that one ends. However many callers ask, at most one run is under way
/// and one waits. A run whose callers all gave up is dropped with them.
pub struct SharedRun<T> {
    newest: Mutex<Option<Newest<T>>>,
}

impl<T> Default for SharedRun<T> {
    fn default() -> Self {
        Self {
            newest: Mutex::new(None),
        }
    }
}

impl<T: Clone + Send + Sync + 'static> SharedRun<T> {
    /// The answer of the next run to start; `start` makes that run's work if no queued run
    /// can be joined.
    pub async fn join<F, Fut>(&self, start: F) -> T
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = T> + Send + 'static,
    {
        self.next_run(start).await
    }

    fn next_run<F, Fut>(&self, start: F) -> Run<T>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = T> + Send + 'static,
    {
        let mut newest = self.newest.lock().unwrap_or_else(PoisonError::into_inner);
        // A run that finished or that nobody awaits any more cannot be upgraded.
        let under_way = newest
            .as_ref()
            .and_then(|n| Some((n.run.upgrade()?, n.started.clone())));
        let before = match under_way {
            Some((queued, started)) if !started.load(Ordering::SeqCst) => return queued,
            Some((running, _)) => Some(running),
            None => None,
        };
        let started = Arc::new(AtomicBool::new(false));
        let flag = started.clone();
        let run: Run<T> = async move {
            if let Some(before) = before {
                before.await;
            }
            // Set before the work begins: a caller that still sees it unset joins this run,
            // and its call came before the work read anything.
            flag.store(true, Ordering::SeqCst);
            start().await
        }
        .boxed()
        .shared();
        *newest = run.downgrade().map(|weak| Newest { run: weak, started });
        run
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    /// A run that counts itself and then waits for `release`.
    fn counted(
        runs: &Arc<AtomicUsize>,
        release: &tokio::sync::watch::Receiver<bool>,
    ) -> impl FnOnce() -> BoxFuture<'static, usize> + Send + 'static {
        let (runs, mut release) = (runs.clone(), release.clone());
        move || {
            async move {
                let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
                let _ = release.wait_for(|go| *go).await;
                n
            }
            .boxed()
        }
    }

    #[tokio::test]
    async fn callers_during_a_run_share_the_one_after_it() {
        let shared = Arc::new(SharedRun::default());
        let runs = Arc::new(AtomicUsize::new(0));
        let (go, release) = tokio::sync::watch::channel(false);
        let first = tokio::spawn({
            let (shared, work) = (shared.clone(), counted(&runs, &release));
            async move { shared.join(work).await }
        });
        while runs.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        let mut later = Vec::new();
        for _ in 0..50 {
            let (shared, work) = (shared.clone(), counted(&runs, &release));
            later.push(tokio::spawn(async move { shared.join(work).await }));
        }
        tokio::task::yield_now().await;
        go.send(true).expect("receivers");
        assert_eq!(first.await.expect("joined"), 1);
        for call in later {
            assert_eq!(call.await.expect("joined"), 2, "the run after the first");
        }
        assert_eq!(runs.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_run_everyone_gave_up_on_is_not_joined() {
        let shared = SharedRun::default();
        let runs = Arc::new(AtomicUsize::new(0));
        let (_go, release) = tokio::sync::watch::channel(false);
        let given_up = tokio::time::timeout(
            std::time::Duration::from_millis(10),
            shared.join(counted(&runs, &release)),
        )
        .await;
        assert!(given_up.is_err());
        let (_go, released) = tokio::sync::watch::channel(true);
        assert_eq!(shared.join(counted(&runs, &released)).await, 2);
    }
}
