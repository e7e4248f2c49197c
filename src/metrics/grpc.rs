//! go-grpc-prometheus's server metrics as a tower layer: `grpc_server_started_total`,
//! `grpc_server_handled_total` and `grpc_server_handling_seconds`, labelled by service, method,
//! streaming kind (from the served file descriptor sets) and, once handled, status code. The
//! code is read from the response headers (trailers-only answers, which most errors are) or
//! from the trailers at the end of the body, which this layer therefore wraps.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tower::{Layer, Service};

use super::DurationHistogram;

/// gRPC status codes by number, named as grpc-go names them (go-grpc-prometheus's values).
const CODES: [&str; 17] = [
    "OK",
    "Canceled",
    "Unknown",
    "InvalidArgument",
    "DeadlineExceeded",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "ResourceExhausted",
    "FailedPrecondition",
    "Aborted",
    "OutOfRange",
    "Unimplemented",
    "Internal",
    "Unavailable",
    "DataLoss",
    "Unauthenticated",
];
const UNKNOWN_CODE: usize = 2;
const CANCELED_CODE: usize = 1;

/// Calls to paths no served descriptor names share one series, whatever the path.
const UNKNOWN: &str = "unknown";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    grpc_service: String,
    grpc_method: String,
    grpc_type: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandledLabels {
    grpc_service: String,
    grpc_method: String,
    grpc_type: &'static str,
    grpc_code: &'static str,
}

/// One method's series, made at start.
struct MethodSeries {
    started: Counter,
    handled: [Counter; CODES.len()],
    seconds: DurationHistogram,
}

impl MethodSeries {
    fn finish(&self, code: usize, started: Instant) {
        self.handled[code.min(CODES.len() - 1)].inc();
        self.seconds.observe(started.elapsed());
    }
}

#[derive(Clone)]
pub struct GrpcMetrics {
    /// By request path (`/package.Service/Method`).
    methods: Arc<HashMap<String, Arc<MethodSeries>>>,
    unknown: Arc<MethodSeries>,
}

impl GrpcMetrics {
    pub(super) fn new(descriptor_sets: &[&[u8]], registry: &mut Registry) -> Self {
        let started = Family::<MethodLabels, Counter>::default();
        let handled = Family::<HandledLabels, Counter>::default();
        let seconds = Family::<MethodLabels, DurationHistogram>::default();
        registry.register(
            "grpc_server_started",
            "RPCs started on the server",
            started.clone(),
        );
        registry.register(
            "grpc_server_handled",
            "RPCs completed on the server, regardless of success or failure",
            handled.clone(),
        );
        registry.register(
            "grpc_server_handling_seconds",
            "Response latency (seconds) of gRPC calls, to the end of the stream for streams",
            seconds.clone(),
        );
        let series = |service: &str, method: &str, kind: &'static str| {
            let labels = MethodLabels {
                grpc_service: service.to_owned(),
                grpc_method: method.to_owned(),
                grpc_type: kind,
            };
            let handled = CODES.map(|code| {
                handled
                    .get_or_create(&HandledLabels {
                        grpc_service: service.to_owned(),
                        grpc_method: method.to_owned(),
                        grpc_type: kind,
                        grpc_code: code,
                    })
                    .clone()
            });
            Arc::new(MethodSeries {
                started: started.get_or_create(&labels).clone(),
                handled,
                seconds: seconds.get_or_create(&labels).clone(),
            })
        };
        let mut methods = HashMap::new();
        for method in crate::methods::served_methods(descriptor_sets) {
            methods.insert(
                method.path(),
                series(&method.service, &method.name, method.kind),
            );
        }
        Self {
            methods: Arc::new(methods),
            unknown: series(UNKNOWN, UNKNOWN, UNKNOWN),
        }
    }

    fn of(&self, path: &str) -> &Arc<MethodSeries> {
        self.methods.get(path).unwrap_or(&self.unknown)
    }
}

/// Records the gRPC metrics of the calls through a listener; passes them through untouched
/// when metrics are off.
#[derive(Clone)]
pub struct GrpcLayer {
    metrics: Option<GrpcMetrics>,
}

impl GrpcLayer {
    pub(super) fn new(metrics: Option<GrpcMetrics>) -> Self {
        Self { metrics }
    }
}

impl<S> Layer<S> for GrpcLayer {
    type Service = GrpcMetered<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetered {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Clone)]
pub struct GrpcMetered<S> {
    inner: S,
    metrics: Option<GrpcMetrics>,
}

/// A call being measured: its method's series and when it started. A call dropped before it
/// finished (its client went away, or the drain's grace ran out, before the answer or before
/// the trailers) counts as `Canceled`, so started minus handled is what is in flight.
struct Call {
    series: Arc<MethodSeries>,
    started: Instant,
    finished: bool,
}

impl Call {
    fn finish(mut self, code: usize) {
        self.series.finish(code, self.started);
        self.finished = true;
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        if !self.finished {
            self.series.finish(CANCELED_CODE, self.started);
        }
    }
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for GrpcMetered<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
{
    type Response = http::Response<MeteredBody<ResBody>>;
    type Error = S::Error;
    type Future = MeteredFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let call = self.metrics.as_ref().map(|metrics| {
            let series = metrics.of(request.uri().path()).clone();
            series.started.inc();
            Call {
                series,
                started: Instant::now(),
                finished: false,
            }
        });
        MeteredFuture {
            inner: self.inner.call(request),
            call,
        }
    }
}

/// The inner service's answer, its body wrapped to see the trailers.
#[pin_project::pin_project]
pub struct MeteredFuture<F> {
    #[pin]
    inner: F,
    call: Option<Call>,
}

impl<F, B, E> Future for MeteredFuture<F>
where
    F: Future<Output = Result<http::Response<B>, E>>,
{
    type Output = Result<http::Response<MeteredBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let answer = std::task::ready!(this.inner.poll(cx));
        let call = this.call.take();
        Poll::Ready(match answer {
            Ok(response) => {
                let mut call = call;
                // A trailers-only answer (most errors) carries its status in the headers.
                if let Some(code) = status_code(response.headers())
                    && let Some(done) = call.take()
                {
                    done.finish(code);
                }
                Ok(response.map(|body| MeteredBody { inner: body, call }))
            }
            Err(e) => {
                if let Some(call) = call {
                    call.finish(UNKNOWN_CODE);
                }
                Err(e)
            }
        })
    }
}

/// The `grpc-status` of headers or trailers, as an index into [`CODES`] (the code's number).
pub(crate) fn status_code(headers: &http::HeaderMap) -> Option<usize> {
    let value = headers.get("grpc-status")?;
    Some(
        std::str::from_utf8(value.as_bytes())
            .ok()
            .and_then(|code| code.parse::<usize>().ok())
            .filter(|code| *code < CODES.len())
            .unwrap_or(UNKNOWN_CODE),
    )
}

/// A response body that records its call when the trailers pass (or, dropped before that,
/// its `Call` records `Canceled`).
#[pin_project::pin_project]
pub struct MeteredBody<B> {
    #[pin]
    inner: B,
    call: Option<Call>,
}

impl<B: http_body::Body> http_body::Body for MeteredBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = std::task::ready!(this.inner.poll_frame(cx));
        let code = match &frame {
            Some(Ok(frame)) => frame
                .trailers_ref()
                .map(|trailers| status_code(trailers).unwrap_or(UNKNOWN_CODE)),
            Some(Err(_)) => Some(UNKNOWN_CODE),
            // Ended without trailers: gRPC always sends them, so the status is unknown.
            None => Some(UNKNOWN_CODE),
        };
        if let Some(code) = code
            && let Some(call) = this.call.take()
        {
            call.finish(code);
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_dropped_before_its_answer_is_handled_as_canceled() {
        let mut registry = Registry::default();
        let metrics = GrpcMetrics::new(&[crate::proto::FILE_DESCRIPTOR_SET], &mut registry);
        let path = "/coresdk.v1.FlagService/GetFlag";
        let series = metrics.of(path).clone();
        let never = tower::service_fn(|_: http::Request<()>| {
            std::future::pending::<Result<http::Response<()>, std::convert::Infallible>>()
        });
        let mut metered = GrpcLayer::new(Some(metrics)).layer(never);
        let pending = metered.call(
            http::Request::builder()
                .uri(path)
                .body(())
                .expect("request"),
        );
        assert_eq!(series.started.get(), 1);
        drop(pending);
        assert_eq!(series.handled[CANCELED_CODE].get(), 1);
        assert_eq!(series.handled.iter().map(Counter::get).sum::<u64>(), 1);
    }

    #[test]
    fn unknown_paths_share_one_series() {
        let mut registry = Registry::default();
        let metrics = GrpcMetrics::new(&[crate::proto::FILE_DESCRIPTOR_SET], &mut registry);
        let a = metrics.of("/x.Y/A");
        let b = metrics.of("/made.Up/Anything");
        assert!(Arc::ptr_eq(a, b));
        assert!(!Arc::ptr_eq(
            a,
            metrics.of("/coresdk.v1.FlagService/GetFlag")
        ));
    }
}
