//! OpenTelemetry traces, off unless an OTLP endpoint is configured (`OTEL_EXPORTER_OTLP_ENDPOINT`
//! or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`). The rest of the code only makes `tracing` spans;
//! this module alone speaks OpenTelemetry: it bridges those spans to an OTLP/gRPC exporter, starts
//! a server span per gRPC call (parented by the caller's W3C `traceparent`), and tells problems
//! which trace they belong to.
//!
//! Off, nothing here is installed: the log subscriber is the plain one, the gRPC layer passes
//! calls through, and the child spans (at `debug`) are disabled at their call sites.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use opentelemetry::propagation::{Extractor, TextMapPropagator as _};
use opentelemetry::trace::{Status, TraceContextExt as _, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tower::{Layer, Service};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{Layer as _, filter};

use crate::call_end::{self, CallEnd, EndBody, EndFuture};

/// How long shutdown waits for the last spans to reach the collector: a dead collector must not
/// hold the exit past the drain the operator configured.
pub const FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

/// The `instance` prefix of a problem made inside a traced call.
pub const INSTANCE_PREFIX: &str = "urn:coresdk:trace:";

/// Set once the exporter is installed; problems ask it before looking for a span.
static ENABLED: AtomicBool = AtomicBool::new(false);

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error(
        "{var}={value}: this build exports traces over OTLP/gRPC only; set it to grpc, or unset it"
    )]
    Protocol { var: &'static str, value: String },
    #[error(
        "{var}={value}: traces are exported in plaintext to a collector beside the sidecar; give an http:// address"
    )]
    Endpoint { var: &'static str, value: String },
    #[error("{var}={value}: this build sends traces uncompressed; set it to none, or unset it")]
    Compression { var: &'static str, value: String },
    #[error(
        "OTEL_TRACES_EXPORTER={0}: only otlp (or none) is supported; set it to otlp, or unset it"
    )]
    Exporter(String),
    #[error("cannot build the OTLP trace exporter: {0}")]
    Build(String),
}

/// A non-empty environment variable.
fn var(name: &str) -> Option<String> {
    std::env::var(name)
        .ok()
        .filter(|value| !value.trim().is_empty())
}

/// The first of `names` that is set, and its value: given the traces-specific variable and
/// then the general one, the setting that applies to traces.
fn first_set(names: [&'static str; 2]) -> Option<(&'static str, String)> {
    names
        .into_iter()
        .find_map(|name| var(name).map(|value| (name, value)))
}

/// Whether traces are wanted, by the standard variables: an OTLP endpoint turns them on;
/// `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none` keep them off. What else the
/// OpenTelemetry SDK reads itself (headers, timeouts, sampler, batch sizes, resource).
pub fn wanted() -> Result<bool, TelemetryError> {
    if var("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
        return Ok(false);
    }
    match var("OTEL_TRACES_EXPORTER").map(|v| v.trim().to_ascii_lowercase()) {
        Some(v) if v == "none" => return Ok(false),
        Some(v) if v != "otlp" => return Err(TelemetryError::Exporter(v)),
        _ => {}
    }
    let Some((endpoint_var, endpoint)) = first_set([
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    ]) else {
        return Ok(false);
    };
    if !endpoint.trim().starts_with("http://") {
        return Err(TelemetryError::Endpoint {
            var: endpoint_var,
            value: endpoint,
        });
    }
    if let Some((var, protocol)) = first_set([
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
    ]) && protocol.trim() != "grpc"
    {
        return Err(TelemetryError::Protocol {
            var,
            value: protocol,
        });
    }
    // The exporter would take it, and then fail every export without a word.
    if let Some((var, compression)) = first_set([
        "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION",
        "OTEL_EXPORTER_OTLP_COMPRESSION",
    ]) && compression.trim() != "none"
    {
        return Err(TelemetryError::Compression {
            var,
            value: compression,
        });
    }
    Ok(true)
}

/// The exporter and its batch processor. Built inside the Tokio runtime, whose tasks carry the
/// gRPC connection to the collector.
pub struct Tracing {
    provider: SdkTracerProvider,
}

impl Tracing {
    /// `None` when traces are not wanted (see [`wanted`]).
    pub fn from_env() -> Result<Option<Self>, TelemetryError> {
        if !wanted()? {
            return Ok(None);
        }
        // Endpoint, headers, timeout and compression come from the OTEL_EXPORTER_OTLP_*
        // variables, read by the exporter itself.
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build()
            .map_err(|e| TelemetryError::Build(e.to_string()))?;
        let resource = opentelemetry_sdk::Resource::builder().build();
        // The SDK names an unnamed service after the executable's file name; this one has a name.
        let unnamed = resource
            .get(&opentelemetry::Key::new("service.name"))
            .is_none_or(|name| name.as_str().starts_with("unknown_service"));
        let resource = if unnamed {
            opentelemetry_sdk::Resource::builder()
                .with_service_name("coresdk")
                .build()
        } else {
            resource
        };
        // The batch processor's queue is bounded (OTEL_BSP_MAX_QUEUE_SIZE, 2048): spans a dead
        // collector cannot take are dropped, never waited for. The sampler comes from
        // OTEL_TRACES_SAMPLER(_ARG), parent-based always-on by default.
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(Reporting::new(exporter))
            .with_resource(resource)
            .build();
        Ok(Some(Self { provider }))
    }

    /// Sends what is still queued, waiting at most [`FLUSH_TIMEOUT`], and stops the exporter.
    pub fn shutdown(self) {
        if let Err(e) = self.provider.shutdown_with_timeout(FLUSH_TIMEOUT) {
            tracing::warn!(error = %e, "not every span reached the trace collector before exit");
        }
    }
}

/// The exporter, saying when spans cannot be delivered: the SDK's own diagnostics are off
/// (they would feed back into the trace layer), and a wrong or dead endpoint would otherwise
/// look exactly like working traces. One line a minute at most, counting the failures between.
struct Reporting<E> {
    inner: E,
    failures: crate::problem::Throttle,
}

impl<E> Reporting<E> {
    fn new(inner: E) -> Self {
        Self {
            inner,
            failures: crate::problem::Throttle::new(Duration::from_secs(60)),
        }
    }
}

impl<E: std::fmt::Debug> std::fmt::Debug for Reporting<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.inner.fmt(f)
    }
}

impl<E: opentelemetry_sdk::trace::SpanExporter> opentelemetry_sdk::trace::SpanExporter
    for Reporting<E>
{
    async fn export(
        &self,
        batch: Vec<opentelemetry_sdk::trace::SpanData>,
    ) -> opentelemetry_sdk::error::OTelSdkResult {
        let spans = batch.len();
        let exported = self.inner.export(batch).await;
        if let Err(error) = &exported
            && let Some(failed_before) = self.failures.admit(std::time::Instant::now())
        {
            tracing::warn!(
                %error,
                spans,
                failed_before,
                "spans could not be sent to the trace collector (OTEL_EXPORTER_OTLP_ENDPOINT) and were dropped; failed_before counts failed exports since the last such line"
            );
        }
        exported
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> opentelemetry_sdk::error::OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> opentelemetry_sdk::error::OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.inner.set_resource(resource);
    }
}

/// Installs the log subscriber (`CORESDK_LOG`, else `RUST_LOG`, else `info`; JSON lines when
/// `json`), with the trace bridge beside it when `tracing` is on. Log lines inside a call then
/// name its `trace_id`. (A flag, not `LogFormat`: `problem` imports this module, and the
/// settings import what imports `problem`.)
pub fn init_logging(json: bool, tracing: Option<&Tracing>) {
    use std::io::IsTerminal as _;
    let filter = tracing_subscriber::EnvFilter::try_from_env("CORESDK_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::stderr().is_terminal();
    let Some(tracing) = tracing else {
        // Exactly the subscriber of a sidecar without traces: nothing added to its hot path.
        let builder = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(ansi)
            .with_writer(std::io::stderr);
        if json {
            builder.json().init();
        } else {
            builder.init();
        }
        return;
    };
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let fmt = if json {
        fmt.json().with_filter(filter).boxed()
    } else {
        fmt.with_filter(filter).boxed()
    };
    // The sidecar's own spans (the call's child spans are at debug) and its warnings and errors
    // (as span events); never the transport's, least of all the exporter's own.
    let ours = filter::filter_fn(|meta| {
        meta.target().starts_with("coresdk")
            && if meta.is_span() {
                *meta.level() <= tracing::Level::DEBUG
            } else {
                *meta.level() <= tracing::Level::WARN
            }
    });
    let otel = tracing_opentelemetry::layer()
        .with_tracer(tracing.provider.tracer("coresdk"))
        .with_filter(ours);
    tracing_subscriber::registry().with(fmt).with(otel).init();
    ENABLED.store(true, Ordering::Release);
}

/// The current call's trace as a problem's `instance`:
/// `urn:coresdk:trace:<32-hex trace id>:<16-hex span id>`. `None` when traces are off or
/// outside a call.
pub fn current_instance() -> Option<String> {
    if !enabled() {
        return None;
    }
    let cx = Span::current().context();
    let span = cx.span();
    let span = span.span_context();
    span.is_valid()
        .then(|| format!("{INSTANCE_PREFIX}{}:{}", span.trace_id(), span.span_id()))
}

/// gRPC metadata as the W3C propagator reads it.
struct Headers<'a>(&'a http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// A server span named `name`, child of the caller's `traceparent` (when it sent one), its
/// trace and span ids recorded for the log lines made inside it.
fn server_span(name: &str, headers: &http::HeaderMap) -> Span {
    let span = tracing::info_span!(
        target: "coresdk::rpc",
        "rpc",
        otel.name = name,
        otel.kind = "server",
        trace_id = tracing::field::Empty,
        span_id = tracing::field::Empty,
    );
    let parent = TraceContextPropagator::new().extract(&Headers(headers));
    // Fails only when the span is disabled (filtered out), which leaves nothing to parent.
    let _ = span.set_parent(parent);
    let cx = span.context();
    let otel_span = cx.span();
    let context = otel_span.span_context();
    if context.is_valid() {
        span.record("trace_id", tracing::field::display(context.trace_id()));
        span.record("span_id", tracing::field::display(context.span_id()));
    }
    span
}

/// Whether traces are on (the exporter is installed).
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Acquire)
}

/// An HTTP server span per OFREP request, named by its route (`POST /ofrep/v1/…/{key}`), as
/// an axum route layer: only routes the listener serves, so no input becomes a span name.
/// Installed only when traces are on ([`enabled`]).
pub async fn trace_http(
    route: axum::extract::MatchedPath,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use tracing::Instrument as _;
    let method = request.method().as_str().to_owned();
    let span = server_span(&format!("{method} {}", route.as_str()), request.headers());
    span.set_attribute("http.request.method", method);
    span.set_attribute("http.route", route.as_str().to_owned());
    let response = next.run(request).instrument(span.clone()).await;
    let status = response.status();
    span.set_attribute("http.response.status_code", i64::from(status.as_u16()));
    if status.is_server_error() {
        span.set_status(Status::error(status.as_str().to_owned()));
    }
    response
}

/// A served method's span name (`package.Service/Method`) and attributes.
struct RpcName {
    name: String,
    service: String,
    method: String,
}

/// Spans per gRPC call; passes calls through untouched when traces are off.
#[derive(Clone, Default)]
pub struct TraceLayer {
    /// By request path, when traces are on.
    methods: Option<Arc<HashMap<String, RpcName>>>,
}

impl TraceLayer {
    /// Traces the calls of every method in `descriptor_sets` (others under `_OTHER`), if
    /// traces are on.
    pub fn new(descriptor_sets: &[&[u8]]) -> Self {
        if !enabled() {
            return Self::default();
        }
        let methods = crate::methods::served_methods(descriptor_sets)
            .into_iter()
            .map(|m| {
                let name = RpcName {
                    name: format!("{}/{}", m.service, m.name),
                    service: m.service.clone(),
                    method: m.name.clone(),
                };
                (m.path(), name)
            })
            .collect();
        Self {
            methods: Some(Arc::new(methods)),
        }
    }
}

impl<S> Layer<S> for TraceLayer {
    type Service = Traced<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Traced {
            inner,
            methods: self.methods.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Traced<S> {
    inner: S,
    methods: Option<Arc<HashMap<String, RpcName>>>,
}

/// A call's server span, ended (dropped) with the last of its answer. A call dropped before
/// its status (the client went away, the drain's grace ran out) is `CANCELLED`.
pub struct RpcSpan {
    span: Span,
    finished: bool,
}

/// gRPC codes that are the server's fault, which OpenTelemetry marks as span errors: UNKNOWN,
/// DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS.
const SERVER_ERRORS: [usize; 6] = [2, 4, 12, 13, 14, 15];

impl RpcSpan {
    fn start(methods: &HashMap<String, RpcName>, headers: &http::HeaderMap, path: &str) -> Self {
        let (name, service, method) = match methods.get(path) {
            Some(rpc) => (rpc.name.as_str(), rpc.service.as_str(), rpc.method.as_str()),
            // Unbounded input never becomes a span name.
            None => ("_OTHER", "_OTHER", "_OTHER"),
        };
        let span = server_span(name, headers);
        span.set_attribute("rpc.system", "grpc");
        span.set_attribute("rpc.service", service.to_owned());
        span.set_attribute("rpc.method", method.to_owned());
        Self {
            span,
            finished: false,
        }
    }

    fn record(&mut self, code: usize) {
        self.finished = true;
        self.span
            .set_attribute("rpc.grpc.status_code", i64::try_from(code).unwrap_or(2));
        if SERVER_ERRORS.contains(&code) {
            self.span
                .set_status(Status::error(format!("gRPC status {code}")));
        }
    }
}

impl CallEnd for RpcSpan {
    fn finish(mut self, code: usize) {
        self.record(code);
    }

    /// Entered while the handler and the answer's body are polled: a span ends when it is last
    /// left, so a stream's span lasts as long as the stream.
    fn polling<R>(&self, poll: impl FnOnce() -> R) -> R {
        self.span.in_scope(poll)
    }
}

impl Drop for RpcSpan {
    fn drop(&mut self) {
        if !self.finished {
            self.record(call_end::CANCELLED);
        }
    }
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for Traced<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
{
    type Response = http::Response<EndBody<ResBody, RpcSpan>>;
    type Error = S::Error;
    type Future = EndFuture<S::Future, RpcSpan>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let rpc = self
            .methods
            .as_ref()
            .map(|methods| RpcSpan::start(methods, request.headers(), request.uri().path()));
        // The inner service (interceptors included) is called inside the span, so a denial it
        // makes knows its trace.
        let inner = match &rpc {
            Some(rpc) => rpc.polling(|| self.inner.call(request)),
            None => self.inner.call(request),
        };
        EndFuture::new(inner, rpc)
    }
}
