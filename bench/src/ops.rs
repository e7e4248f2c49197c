//! The operations listener's costs (issue 13): GetFlag throughput with metrics collected (the
//! ops listener on, as by default) against a sidecar with `--ops-listen off`, which collects
//! nothing, in alternating rounds of the same run; and the latency of a `/metrics` scrape once
//! many tenants have flags.

use std::sync::Arc;
use std::time::{Duration, Instant};

use coresdk::proto::{
    FlagValue, SetFlagRequest, flag_service_client::FlagServiceClient, flag_value,
};
use http_body_util::{BodyExt as _, Empty};
use hyper::body::Bytes;
use tonic::transport::Channel;

use crate::{BoxError, Phase, print_phase, run_phase_on};

/// GetFlag with metrics on and off, alternating one-second rounds; prints both and the ratio.
pub async fn metrics_overhead<F1, F2, Fut1, Fut2>(
    on: (Option<u32>, Arc<F1>),
    off: (Option<u32>, Arc<F2>),
    concurrency: usize,
    rounds: u64,
) where
    F1: Fn(usize, u64) -> Fut1 + Send + Sync + 'static,
    F2: Fn(usize, u64) -> Fut2 + Send + Sync + 'static,
    Fut1: std::future::Future<Output = bool> + Send,
    Fut2: std::future::Future<Output = bool> + Send,
{
    let (mut with, mut without): (Option<Phase>, Option<Phase>) = (None, None);
    for i in 0..rounds.max(1) {
        let warm_up = if i == 0 {
            Duration::from_secs(1)
        } else {
            Duration::from_millis(200)
        };
        let round = Duration::from_secs(1);
        // Each goes first in every other round, so that neither gains from the order.
        let off_phase = || {
            run_phase_on(
                off.0,
                "GetFlag, --ops-listen off",
                concurrency,
                warm_up,
                round,
                off.1.clone(),
            )
        };
        let on_phase = || {
            run_phase_on(
                on.0,
                "GetFlag, metrics on",
                concurrency,
                warm_up,
                round,
                on.1.clone(),
            )
        };
        let (b, m) = if i % 2 == 0 {
            let b = off_phase().await;
            (b, on_phase().await)
        } else {
            let m = on_phase().await;
            (off_phase().await, m)
        };
        without = Some(match without {
            Some(p) => p.merge(b),
            None => b,
        });
        with = Some(match with {
            Some(p) => p.merge(m),
            None => m,
        });
    }
    if let (Some(with), Some(without)) = (with, without) {
        print_phase(&without, None);
        print_phase(&with, Some(&without));
    }
}

/// Gives `tenants` tenants a flag each (SetFlag, concurrently), then times `scrapes` GETs of
/// `/metrics` one after another on one keep-alive HTTP/1.1 connection.
pub async fn scrape_latency(
    channel: Channel,
    ops_addr: &str,
    tenants: usize,
    scrapes: usize,
) -> Result<(), BoxError> {
    let loading = Instant::now();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut loaders = Vec::new();
    for _ in 0..64 {
        let (channel, next) = (channel.clone(), next.clone());
        loaders.push(tokio::spawn(async move {
            let mut client = FlagServiceClient::new(channel);
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= tenants {
                    return Ok::<(), tonic::Status>(());
                }
                let mut request = tonic::Request::new(SetFlagRequest {
                    tenant_id: format!("scrape-tenant-{i}"),
                    key: "pro_features".into(),
                    value: Some(FlagValue {
                        kind: Some(flag_value::Kind::BoolValue(true)),
                    }),
                    actor: "bench".into(),
                    reason: "scrape latency with many tenants".into(),
                });
                request.metadata_mut().insert(
                    "authorization",
                    format!("Bearer {}", crate::ADMIN_TOKEN)
                        .parse()
                        .map_err(|_| tonic::Status::internal("token"))?,
                );
                client.set_flag(request).await?;
            }
        }));
    }
    for loader in loaders {
        loader.await??;
    }
    let loaded = loading.elapsed();

    let tcp = tokio::net::TcpStream::connect(ops_addr).await?;
    tcp.set_nodelay(true)?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await?;
    tokio::spawn(connection);
    let mut latencies_us = Vec::with_capacity(scrapes);
    let mut bytes = 0;
    for _ in 0..scrapes.max(1) {
        let request = hyper::Request::get("/metrics")
            .header(hyper::header::HOST, ops_addr)
            .body(Empty::<Bytes>::new())?;
        let started = Instant::now();
        sender.ready().await?;
        let response = sender.send_request(request).await?;
        if response.status() != hyper::StatusCode::OK {
            return Err(format!("/metrics answered {}", response.status()).into());
        }
        bytes = response.into_body().collect().await?.to_bytes().len();
        latencies_us.push(started.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
    }
    latencies_us.sort_unstable();
    let at = |p: f64| {
        f64::from(latencies_us[((latencies_us.len() - 1) as f64 * p).round() as usize]) / 1000.0
    };
    println!(
        "GET /metrics with {tenants} tenants' flags ({:.1} s to load): p50 {:.3} ms  p99 {:.3} ms  max {:.3} ms  ({} scrapes, {:.1} KiB)",
        loaded.as_secs_f64(),
        at(0.50),
        at(0.99),
        at(1.0),
        latencies_us.len(),
        bytes as f64 / 1024.0
    );
    Ok(())
}
