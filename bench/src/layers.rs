//! What the metrics and trace layers add to each call, measured in process on the layers
//! themselves: the same calls through a bare service and through the layers, so that neither a
//! network nor a second process blurs a cost of a few hundred nanoseconds. Compared with the
//! sidecar's own CPU time per GetFlag (measured above), this is the share of GetFlag
//! throughput the layers can cost where the server's CPU is the limit.

use std::convert::Infallible;
use std::time::Instant;

use http_body_util::{BodyExt as _, StreamBody};
use hyper::body::{Bytes, Frame};
use tonic::codegen::http;
use tower::{Service, ServiceBuilder, ServiceExt as _};

type Answer = StreamBody<tokio_stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>>;

/// A unary gRPC answer as the transport sees it: one message, then the OK trailers (which the
/// metrics layer reads).
fn answer() -> http::Response<Answer> {
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
    let frames = vec![
        Ok(Frame::data(Bytes::from_static(&[0, 0, 0, 0, 2, 8, 1]))),
        Ok(Frame::trailers(trailers)),
    ];
    http::Response::new(StreamBody::new(tokio_stream::iter(frames)))
}

fn request() -> http::Request<()> {
    http::Request::builder()
        .uri("/coresdk.v1.FlagService/GetFlag")
        .body(())
        .unwrap_or_default()
}

/// Nanoseconds per call through `service`, the answer's body read to its trailers.
async fn ns_per_call<S, B>(mut service: S, calls: u32) -> f64
where
    S: Service<http::Request<()>, Response = http::Response<B>>,
    S::Error: std::fmt::Debug,
    B: hyper::body::Body,
    B::Error: std::fmt::Debug,
{
    let mut run = async |n: u32| {
        let started = Instant::now();
        for _ in 0..n {
            let Ok(ready) = service.ready().await else {
                return None;
            };
            let Ok(response) = ready.call(request()).await else {
                return None;
            };
            if response.into_body().collect().await.is_err() {
                return None;
            }
        }
        Some(started.elapsed())
    };
    // A warm-up, then the best of three: the least disturbed by the rest of the machine.
    let _ = run(calls / 10).await;
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        if let Some(took) = run(calls).await {
            best = best.min(took.as_nanos() as f64 / f64::from(calls));
        }
    }
    best
}

/// Prints the layers' cost per call, and its share of `server_ns_per_get_flag`.
pub async fn report(server_ns_per_get_flag: Option<f64>) {
    const CALLS: u32 = 200_000;
    let sets = &coresdk::methods::SERVED_DESCRIPTOR_SETS;
    let bare = || tower::service_fn(|_: http::Request<()>| async { Ok::<_, Infallible>(answer()) });
    // This process has no OTLP endpoint set: the trace layer is as a sidecar's with traces off.
    let trace_off = coresdk::telemetry::TraceLayer::new(sets);
    let metrics = coresdk::metrics::Metrics::new(sets);
    let base = ns_per_call(bare(), CALLS).await;
    let traced = ns_per_call(
        ServiceBuilder::new()
            .layer(trace_off.clone())
            .service(bare()),
        CALLS,
    )
    .await;
    let both = ns_per_call(
        ServiceBuilder::new()
            .layer(trace_off)
            .layer(metrics.grpc_layer())
            .service(bare()),
        CALLS,
    )
    .await;
    let share = |ns: f64| match server_ns_per_get_flag {
        Some(per_call) if per_call > 0.0 => format!(
            "  = {:.1} % of the sidecar's CPU per GetFlag ({:.1} µs)",
            100.0 * ns / per_call,
            per_call / 1000.0
        ),
        _ => String::new(),
    };
    println!(
        "layers: per call in process (best of 3 x {CALLS}): bare service {base:.0} ns; trace layer, traces off: +{:.0} ns; trace (off) + metrics layers: +{:.0} ns{}",
        traced - base,
        both - base,
        share(both - base)
    );
}
