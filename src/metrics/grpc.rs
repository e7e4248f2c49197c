//! go-grpc-prometheus's server metrics as a tower layer: `grpc_server_started_total`,
//! `grpc_server_handled_total` and `grpc_server_handling_seconds`, labelled by service, method,
//! streaming kind (from the served file descriptor sets) and, once handled, status code (as
//! `call_end` reads it).

use std::collections::HashMap;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tower::{Layer, Service};

use super::DurationHistogram;
use crate::call_end::{self, CallEnd, EndBody, EndFuture};

/// gRPC status codes by number, named as grpc-go names them (go-grpc-prometheus's values).
const CODES: [&str; call_end::CODES] = [
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
pub struct Call {
    series: Arc<MethodSeries>,
    started: Instant,
    finished: bool,
}

impl CallEnd for Call {
    fn finish(mut self, code: usize) {
        self.series.finish(code, self.started);
        self.finished = true;
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        if !self.finished {
            self.series.finish(call_end::CANCELLED, self.started);
        }
    }
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for GrpcMetered<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
{
    type Response = http::Response<EndBody<ResBody, Call>>;
    type Error = S::Error;
    type Future = EndFuture<S::Future, Call>;

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
        EndFuture::new(self.inner.call(request), call)
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
        assert_eq!(series.handled[call_end::CANCELLED].get(), 1);
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
