//! Counts calls in flight, so that shutdown waits for exactly those and no longer. The
//! transport's own graceful shutdown also waits for idle client connections to go away,
//! which a long-lived sidecar client never does.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tower::{Layer, Service};

#[derive(Clone, Default)]
pub struct InFlight {
    count: Arc<AtomicUsize>,
}

struct Guard(Arc<AtomicUsize>);

impl Drop for Guard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl InFlight {
    pub fn current(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    /// Waits until no call is in flight, or `grace` elapsed; says whether it drained.
    pub async fn drained(&self, grace: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + grace;
        while self.current() > 0 {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        true
    }
}

impl<S> Layer<S> for InFlight {
    type Service = InFlightService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        InFlightService {
            inner,
            count: self.count.clone(),
        }
    }
}

#[derive(Clone)]
pub struct InFlightService<S> {
    inner: S,
    count: Arc<AtomicUsize>,
}

impl<S, R> Service<R> for InFlightService<S>
where
    S: Service<R>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: R) -> Self::Future {
        self.count.fetch_add(1, Ordering::AcqRel);
        let guard = Guard(self.count.clone());
        let response = self.inner.call(request);
        Box::pin(async move {
            let result = response.await;
            drop(guard);
            result
        })
    }
}
