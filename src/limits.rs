//! What every gRPC listener bounds: calls running at once per connection (one more is refused
//! with a problem), HTTP/2 keepalive (a dead peer's connection, and its streams, are closed),
//! and how long a unary call may run. Streams are never cut by the time limit: a `WatchFlags`
//! or `Tail` is meant to stay open.

use std::collections::HashSet;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, LazyLock};

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use std::task::{Context, Poll};
use std::time::Duration;

use tonic::codegen::http;
use tower::{Layer, Service};

use crate::problem::{Error, ProblemLinks};

/// The validated limits (see `settings`: `--max-concurrent-per-connection`,
/// `--http2-keepalive-*`, `--request-timeout-s`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerLimits {
    /// `None`: unary calls run as long as their caller waits.
    pub request_timeout: Option<Duration>,
    pub max_concurrent_per_connection: usize,
    /// `None`: no pings.
    pub http2_keepalive_interval: Option<Duration>,
    pub http2_keepalive_timeout: Duration,
}

impl ServerLimits {
    /// A server builder with these connection limits.
    pub fn apply(&self, builder: tonic::transport::Server) -> tonic::transport::Server {
        builder
            .http2_keepalive_interval(self.http2_keepalive_interval)
            .http2_keepalive_timeout(Some(self.http2_keepalive_timeout))
    }

    /// The layer bounding calls per connection, refusing one over the limit with the problem.
    pub fn connection_calls(&self, links: &ProblemLinks) -> ConnectionCalls {
        ConnectionCalls {
            limit: self.max_concurrent_per_connection,
            running: Arc::default(),
            links: Arc::new(links.clone()),
        }
    }

    /// The layer bounding unary calls, answering a call over the limit with the problem.
    pub fn request_timeout(&self, links: &ProblemLinks) -> RequestTimeout {
        RequestTimeout {
            limit: self.request_timeout,
            links: Arc::new(links.clone()),
        }
    }
}

/// The answer, with its problem, to a call a limit stops.
fn refusal<R: Default>(error: &Error, links: &ProblemLinks) -> http::Response<R> {
    crate::api::status::of_error(error, links).into_http()
}

/// The `/package.Service/Method` paths of every unary RPC the sidecar serves, read from the
/// services' own descriptors so that a new streaming RPC can never be cut by the time limit
/// by mistake: a path not known to be unary is not timed.
static UNARY_PATHS: LazyLock<HashSet<String>> = LazyLock::new(|| {
    crate::methods::served_methods(&crate::methods::SERVED_DESCRIPTOR_SETS)
        .iter()
        .filter(|method| method.is_unary())
        .map(crate::methods::Method::path)
        .collect()
});

/// Bounds unary calls by the sidecar's request timeout.
#[derive(Clone)]
pub struct RequestTimeout {
    limit: Option<Duration>,
    links: Arc<ProblemLinks>,
}

impl<S> Layer<S> for RequestTimeout {
    type Service = RequestTimeoutService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestTimeoutService {
            inner,
            limit: self.limit,
            links: self.links.clone(),
        }
    }
}

#[derive(Clone)]
pub struct RequestTimeoutService<S> {
    inner: S,
    limit: Option<Duration>,
    links: Arc<ProblemLinks>,
}

impl<S, B, R> Service<http::Request<B>> for RequestTimeoutService<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    R: Default,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let limit = self
            .limit
            .filter(|_| UNARY_PATHS.contains(request.uri().path()));
        let response = self.inner.call(request);
        let Some(limit) = limit else {
            return Box::pin(response);
        };
        let links = self.links.clone();
        Box::pin(async move {
            match tokio::time::timeout(limit, response).await {
                Ok(answer) => answer,
                // Dropping the handler's future stops its work where it stands: a store write
                // not yet begun is skipped (no one waits for it), one already running commits
                // (a webhook's retry then finds it a duplicate).
                Err(_) => Ok(refusal(&Error::RequestTimeout { limit }, &links)),
            }
        })
    }
}

/// A connection, by its two ends: unique while it is open.
type ConnectionKey = (Option<SocketAddr>, SocketAddr);

/// The connection a call came on, from what the transport put in its extensions.
fn connection_of<B>(request: &http::Request<B>) -> Option<ConnectionKey> {
    use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
    let extensions = request.extensions();
    let tcp = extensions.get::<TcpConnectInfo>().or_else(|| {
        extensions
            .get::<TlsConnectInfo<TcpConnectInfo>>()
            .map(TlsConnectInfo::get_ref)
    })?;
    Some((tcp.local_addr(), tcp.remote_addr()?))
}

/// Bounds the calls each connection has running, until each one's response starts (a stream
/// then holds no place: `--max-streams` bounds those). The transport builds per-connection
/// state only for its own layers, whose limit makes the extra call wait unseen, outside the
/// metrics and the drain; so the count is kept here by connection, and a call over the limit
/// is refused at once with a problem the caller can act on. Entries exist only while their
/// connection has a call running: memory is bounded by the calls in flight.
#[derive(Clone)]
pub struct ConnectionCalls {
    limit: usize,
    running: Arc<DashMap<ConnectionKey, usize>>,
    links: Arc<ProblemLinks>,
}

impl<S> Layer<S> for ConnectionCalls {
    type Service = ConnectionCallsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ConnectionCallsService {
            inner,
            calls: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct ConnectionCallsService<S> {
    inner: S,
    calls: ConnectionCalls,
}

/// A call's place on its connection, given back when dropped.
struct Place {
    running: Arc<DashMap<ConnectionKey, usize>>,
    connection: ConnectionKey,
}

impl ConnectionCalls {
    fn take_place(&self, connection: ConnectionKey) -> Option<Place> {
        let mut calls = self.running.entry(connection).or_insert(0);
        if *calls >= self.limit {
            return None;
        }
        *calls += 1;
        drop(calls);
        Some(Place {
            running: self.running.clone(),
            connection,
        })
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        // Decremented and, at zero, removed under one shard lock, so a call taking a place
        // meanwhile is never lost.
        if let Entry::Occupied(mut calls) = self.running.entry(self.connection) {
            *calls.get_mut() = calls.get().saturating_sub(1);
            if *calls.get() == 0 {
                calls.remove();
            }
        }
    }
}

impl<S, B, R> Service<http::Request<B>> for ConnectionCallsService<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    R: Default,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let place = match connection_of(&request) {
            // Not on a TCP connection (an in-process transport): nothing to share fairly.
            None => None,
            Some(connection) => match self.calls.take_place(connection) {
                Some(place) => Some(place),
                None => {
                    let limit = self.calls.limit;
                    let links = self.calls.links.clone();
                    // Made inside the future: the body type need not be `Send` itself.
                    return Box::pin(async move {
                        Ok(refusal(&Error::TooManyCallsOnConnection { limit }, &links))
                    });
                }
            },
        };
        let response = self.inner.call(request);
        Box::pin(async move {
            let answer = response.await;
            drop(place);
            answer
        })
    }
}

#[cfg(test)]
mod tests {
    use super::UNARY_PATHS;

    #[test]
    fn unary_rpcs_are_timed_and_streams_are_not() {
        for unary in [
            "/coresdk.v1.FlagService/GetFlag",
            "/coresdk.v1.WebhookService/HandleStripeWebhook",
            "/grpc.health.v1.Health/Check",
            "/flagd.evaluation.v1.Service/ResolveBoolean",
            "/flagd.sync.v1.FlagSyncService/FetchAllFlags",
        ] {
            assert!(UNARY_PATHS.contains(unary), "{unary}");
        }
        for stream in [
            "/coresdk.v1.FlagService/WatchFlags",
            "/coresdk.v1.AuditService/Tail",
            "/grpc.health.v1.Health/Watch",
            "/flagd.evaluation.v1.Service/EventStream",
            "/flagd.sync.v1.FlagSyncService/SyncFlags",
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        ] {
            assert!(!UNARY_PATHS.contains(stream), "{stream}");
        }
    }
}
