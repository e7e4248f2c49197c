//! Load benchmark for the sidecar. Starts the release binary on an ephemeral loopback port
//! (or targets `--addr`), then measures in one run, against the same server:
//! `grpc.health.v1.Health/Check` (the baseline: the cheapest call the server answers),
//! `FlagService/GetFlag`, flagd's `ResolveBoolean` and OFREP single evaluation over keep-alive
//! HTTP/1.1 (each reported as a ratio to the baseline, and per server CPU-second), durable webhook throughput
//! on the embedded store with concurrent senders (invoices; then subscription updates, as a
//! ratio to the invoices: the lifecycle rules and subscription objects at work); plus the server's RSS idle and
//! at its peak under load; how long a flag change takes to reach watchers (`WatchFlags`, flagd's
//! `EventStream`; across replicas with PostgreSQL); then the abuse phases (`abuse.rs`) and the
//! audit log's (`audit.rs`: Append against an older sidecar, inclusion proofs and Verify on a
//! large log). All traffic stays on loopback,
//! bounded in time.
#![forbid(unsafe_code)]

mod abuse;
mod audit;
/// The generator and check of the lifecycle property test, shared so that this run is the
/// same check, only bigger.
#[path = "../../tests/lifecycle/histories.rs"]
#[allow(dead_code)]
mod histories;
mod layers;
mod ofrep;
mod openfeature;
mod ops;
mod sidecar;
mod sync_size;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use coresdk::proto::{
    AuthorizeRequest, GetFlagRequest, HandleStripeWebhookRequest,
    auth_service_client::AuthServiceClient, flag_service_client::FlagServiceClient,
    webhook_service_client::WebhookServiceClient,
};
use sidecar::{rss_kib, sidecar_binary, start_sidecar, start_sidecar_with};
use tonic::transport::Channel;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

const SECRET: &str = "whsec_bench_secret";
const JWT_SECRET: &str = "bench-jwt-secret-that-is-at-least-32-bytes";
const ADMIN_TOKEN: &str = "bench-admin-token-0123456789abcdef";
const TENANTS: usize = 64;

type BoxError = Box<dyn std::error::Error>;

/// The server the bench started, whose CPU time each phase reports.
static SERVER_PID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();

#[derive(Parser)]
#[command(about = "Benchmark the CoreSDK sidecar over loopback gRPC")]
struct Args {
    /// Target a running sidecar instead of starting one (RSS is then not measured).
    #[arg(long)]
    addr: Option<String>,
    /// The sidecar binary to start; defaults to `coresdk` next to this one.
    #[arg(long)]
    sidecar: Option<PathBuf>,
    /// With `--addr`: the running sidecar's OFREP listener, to measure it too.
    #[arg(long)]
    ofrep_addr: Option<String>,
    /// Seconds measured per phase (reads alternate in one-second rounds; after a warm-up).
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Concurrent callers for the read phases.
    #[arg(long, default_value_t = 32)]
    read_concurrency: usize,
    /// Concurrent webhook senders.
    #[arg(long, default_value_t = 32)]
    webhook_concurrency: usize,
    /// Store for the started sidecar (default: SQLite in a temporary directory). With a
    /// `postgres://` URL a second replica is started too, to measure cross-replica propagation.
    #[arg(long)]
    store: Option<String>,
    /// HTTP/2 connections the callers share.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Forged webhooks per second during the flood rounds.
    #[arg(long, default_value_t = 2000)]
    flood_rate: u64,
    /// Distinct denied tenants sent before the "new tenant per call" Authorize rounds.
    #[arg(long, default_value_t = 100_000)]
    distinct_tenants: u64,
    /// Instead of the load phases: check order independence (issue 10) over this many random
    /// realistic Stripe histories, each delivered chronologically and in
    /// `--lifecycle-orders` shuffled orders through the webhook path (in-process, in-memory
    /// store); prints the counts and every divergence, and fails if there is one.
    #[arg(long)]
    lifecycle_histories: Option<usize>,
    /// Shuffled delivery orders per history for `--lifecycle-histories`.
    #[arg(long, default_value_t = 20)]
    lifecycle_orders: usize,
    /// Seed of the `--lifecycle-histories` run (the test's is 0x5eed2026).
    #[arg(long, default_value_t = 1)]
    lifecycle_seed: u64,
    /// Instead of the load phases: build the flagd sync configuration for this many tenants
    /// (in-process, realistic values per the built-in rules) and print its size and build time.
    #[arg(long)]
    sync_tenants: Option<usize>,
    /// Tenants given a flag before `/metrics` scrapes are timed (issue 13: at most 10 ms with
    /// 10,000 tenants loaded); 0 skips the scrape phase.
    #[arg(long, default_value_t = 10_000)]
    scrape_tenants: usize,
    /// Scrapes of `/metrics` timed, one after another on one keep-alive connection.
    #[arg(long, default_value_t = 200)]
    scrapes: usize,
    /// An older `coresdk` binary (issue 14's baseline: commit 284c761, before the audit Merkle
    /// tree) whose Append throughput the audit phase compares with, in alternating rounds.
    #[arg(long)]
    baseline_sidecar: Option<PathBuf>,
    /// Records of the log the audit phase seeds to time GetInclusionProof and the Verify of
    /// 10,000 newer records on (issue 14's targets are at 1,000,000; seeding that takes a
    /// while, hence the small default).
    #[arg(long, default_value_t = 20_000)]
    audit_records: u64,
    /// Instead of the load phases: only the audit phase.
    #[arg(long)]
    audit_only: bool,
}

/// The `--lifecycle-histories` run.
async fn lifecycle(
    histories: usize,
    orders: usize,
    seed: u64,
) -> Result<(), Box<dyn std::error::Error>> {
    let started = Instant::now();
    let report = histories::check(seed, histories, orders).await;
    println!(
        "lifecycle: {} histories ({} mapped late), {} delivery orders, {} events delivered, {} checked against the table, {} divergences ({:.1} s, seed {seed})",
        report.histories,
        report.mapped_late,
        report.deliveries,
        report.events_delivered,
        report.checked_against_the_table,
        report.divergences.len(),
        started.elapsed().as_secs_f64(),
    );
    for divergence in &report.divergences {
        println!("  divergence: {divergence}");
    }
    if report.divergences.is_empty() {
        Ok(())
    } else {
        Err(format!("{} divergences", report.divergences.len()).into())
    }
}

struct Phase {
    name: &'static str,
    calls: u64,
    errors: u64,
    elapsed: Duration,
    latencies_us: Vec<u32>,
    /// CPU seconds the server spent while the phase was measured (when the bench started it).
    server_cpu_s: Option<f64>,
}

impl Phase {
    fn merge(mut self, other: Phase) -> Phase {
        self.calls += other.calls;
        self.errors += other.errors;
        self.elapsed += other.elapsed;
        self.latencies_us.extend(other.latencies_us);
        self.latencies_us.sort_unstable();
        self.server_cpu_s = self
            .server_cpu_s
            .zip(other.server_cpu_s)
            .map(|(a, b)| a + b);
        self
    }

    fn throughput(&self) -> f64 {
        self.calls as f64 / self.elapsed.as_secs_f64()
    }

    /// Calls per second of server CPU: the throughput one fully busy server core would give
    /// (the bench client shares the machine, so the wall-clock rate understates it).
    fn per_server_core(&self) -> Option<f64> {
        self.server_cpu_s
            .filter(|cpu| *cpu > 0.0)
            .map(|cpu| self.calls as f64 / cpu)
    }

    fn percentile(&self, p: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return 0.0;
        }
        let index = ((self.latencies_us.len() - 1) as f64 * p).round() as usize;
        f64::from(self.latencies_us[index]) / 1000.0
    }
}

/// A signed delivery of a Stripe event about `customer`, as Stripe would send it now.
fn signed_event(
    id: String,
    event_type: &str,
    created: i64,
    customer: &str,
) -> HandleStripeWebhookRequest {
    signed_object_event(
        id,
        event_type,
        created,
        serde_json::json!({"object": "invoice", "customer": customer}),
    )
}

/// A subscription update as Stripe sends it: the subscription object with its status and plan,
/// so the lifecycle rules and the tenant's subscription objects do their whole work.
fn signed_subscription_update(
    id: String,
    created: i64,
    customer: &str,
    status: &str,
) -> HandleStripeWebhookRequest {
    signed_object_event(
        id,
        "customer.subscription.updated",
        created,
        serde_json::json!({
            "object": "subscription",
            "id": format!("sub_{customer}"),
            "customer": customer,
            "status": status,
            "items": {"data": [{"price": {"lookup_key": "pro_monthly"}}]},
        }),
    )
}

fn signed_object_event(
    id: String,
    event_type: &str,
    created: i64,
    object: serde_json::Value,
) -> HandleStripeWebhookRequest {
    let payload = serde_json::json!({
        "id": id,
        "object": "event",
        "type": event_type,
        "created": created,
        "data": {"object": object},
    })
    .to_string()
    .into_bytes();
    let signature_header = coresdk::stripe::sign_header(SECRET, coresdk::time::now_s(), &payload);
    HandleStripeWebhookRequest {
        include_proof: false,
        payload,
        signature_header,
    }
}

/// A plaintext HTTP/2 channel to a loopback listener.
async fn channel(addr: &str) -> Result<Channel, BoxError> {
    Ok(Channel::from_shared(format!("http://{addr}"))?
        .connect()
        .await?)
}

/// An HS256 token for `tenant`, valid for an hour.
fn bench_token(tenant: &str) -> Result<String, jsonwebtoken::errors::Error> {
    let claims = serde_json::json!({
        "sub": "bench-user",
        "tenant_id": tenant,
        "exp": coresdk::time::now_s() + 3600,
    });
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
}

/// Runs `call` from `concurrency` tasks for `warm_up` and then `measured`.
async fn run_phase<F, Fut>(
    name: &'static str,
    concurrency: usize,
    warm_up: Duration,
    measured: Duration,
    call: Arc<F>,
) -> Phase
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let server = SERVER_PID.get().copied();
    run_phase_on(server, name, concurrency, warm_up, measured, call).await
}

/// [`run_phase`] against the server `server` (the one whose CPU time is reported).
async fn run_phase_on<F, Fut>(
    server: Option<u32>,
    name: &'static str,
    concurrency: usize,
    warm_up: Duration,
    measured: Duration,
    call: Arc<F>,
) -> Phase
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for worker in 0..concurrency {
        let (call, measuring, stop, errors) = (
            call.clone(),
            measuring.clone(),
            stop.clone(),
            errors.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(16 * 1024);
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                let ok = call(worker, n).await;
                n += 1;
                if measuring.load(Ordering::Relaxed) {
                    latencies.push(started.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
                    if !ok {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            latencies
        }));
    }
    tokio::time::sleep(warm_up).await;
    let cpu_before = server.and_then(sidecar::cpu_seconds);
    measuring.store(true, Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(measured).await;
    measuring.store(false, Ordering::Relaxed);
    let elapsed = started.elapsed();
    let server_cpu_s = cpu_before
        .zip(server.and_then(sidecar::cpu_seconds))
        .map(|(before, after)| after - before);
    stop.store(true, Ordering::Relaxed);
    let mut latencies_us = Vec::new();
    for task in tasks {
        latencies_us.extend(task.await.unwrap_or_default());
    }
    latencies_us.sort_unstable();
    Phase {
        name,
        calls: latencies_us.len() as u64,
        errors: errors.load(Ordering::Relaxed),
        elapsed,
        latencies_us,
        server_cpu_s,
    }
}

/// GetFlag of `pro_features` for bench tenant `tenant`, over `channel`.
async fn get_flag_once(channel: Channel, tenant: usize) -> bool {
    FlagServiceClient::new(channel)
        .get_flag(GetFlagRequest {
            tenant_id: format!("tenant-{tenant}"),
            key: "pro_features".into(),
        })
        .await
        .is_ok()
}

/// Calls [`get_flag_once`] over `channels`, the bench tenants in turn.
macro_rules! get_flag_caller {
    ($channels:expr) => {{
        let channels: Arc<Vec<Channel>> = $channels;
        Arc::new(move |w: usize, n: u64| {
            get_flag_once(
                channels[w % channels.len()].clone(),
                (n as usize + w) % TENANTS,
            )
        })
    }};
}

/// One paid invoice per bench tenant, so its flags are set (not catalog defaults).
async fn pay_every_tenant(channel: &Channel) -> Result<(), BoxError> {
    let mut setup = WebhookServiceClient::new(channel.clone());
    for i in 0..TENANTS {
        setup
            .handle_stripe_webhook(signed_event(
                format!("evt_setup_{}_{i}", std::process::id()),
                "invoice.paid",
                coresdk::time::now_s(),
                &format!("cus_bench_{i}"),
            ))
            .await?;
    }
    Ok(())
}

fn print_phase(phase: &Phase, baseline: Option<&Phase>) {
    let ratio = baseline
        .map(|b| format!("{:.2}x", phase.throughput() / b.throughput()))
        .unwrap_or_else(|| "baseline".into());
    let per_core = phase
        .per_server_core()
        .map(|rate| format!("  ({rate:.0}/s per server core)"))
        .unwrap_or_default();
    println!(
        "{:<28} {:>10.0}/s  p50 {:>7.3} ms  p99 {:>7.3} ms  errors {:>5}  {}{}",
        phase.name,
        phase.throughput(),
        phase.percentile(0.50),
        phase.percentile(0.99),
        phase.errors,
        ratio,
        per_core
    );
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    if let Some(histories) = args.lifecycle_histories {
        return lifecycle(histories, args.lifecycle_orders, args.lifecycle_seed).await;
    }
    if let Some(tenants) = args.sync_tenants {
        return sync_size::run(tenants);
    }
    let audit_bench = audit::AuditBench {
        current: sidecar_binary(args.sidecar.as_deref())?,
        baseline: args.baseline_sidecar.clone(),
        records: args.audit_records,
        rounds: args.seconds.max(1),
        concurrency: args.webhook_concurrency,
        connections: args.connections,
    };
    if args.audit_only {
        return audit::run(&audit_bench).await;
    }
    let sidecar = match &args.addr {
        Some(_) => None,
        None => Some(start_sidecar(
            sidecar_binary(args.sidecar.as_deref())?,
            args.store.as_deref(),
        )?),
    };
    let addr = match (&args.addr, &sidecar) {
        (Some(addr), _) => addr.clone(),
        (None, Some(s)) => s.addr.clone(),
        (None, None) => return Err("no address".into()),
    };
    let pid = sidecar.as_ref().map(|s| s.child.id());
    if let Some(pid) = pid {
        let _ = SERVER_PID.set(pid);
    }
    let ofrep_addr = match &sidecar {
        Some(started) => started.sides.get("ofrep").cloned(),
        None => args.ofrep_addr.clone(),
    };
    let mut channels = Vec::new();
    for _ in 0..args.connections.max(1) {
        channels.push(channel(&addr).await?);
    }
    let channels = Arc::new(channels);
    let mut flagd_channels = Vec::new();
    if let Some(flagd) = sidecar.as_ref().and_then(|s| s.sides.get("flagd")) {
        for _ in 0..args.connections.max(1) {
            flagd_channels.push(channel(flagd).await?);
        }
    }
    let flagd_channels = Arc::new(flagd_channels);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle_rss = pid.and_then(rss_kib);

    println!(
        "coresdk-bench against {addr}: {} s per phase, {} read callers, {} webhook senders, {} connections, {} cores",
        args.seconds,
        args.read_concurrency,
        args.webhook_concurrency,
        channels.len(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );

    // The baseline and GetFlag alternate in short rounds so that both see the same machine
    // (the client shares the cores with the server, and a noisy neighbour hits both alike).
    let chans = channels.clone();
    let health_call = Arc::new(move |w: usize, _n: u64| {
        let mut client = HealthClient::new(chans[w % chans.len()].clone());
        async move {
            client
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .is_ok()
        }
    });
    let get_flag_call = get_flag_caller!(channels.clone());
    let chans = channels.clone();
    let tokens: Arc<Vec<String>> = Arc::new(
        (0..TENANTS)
            .map(|i| bench_token(&format!("tenant-{i}")))
            .collect::<Result<_, _>>()?,
    );
    let authorize_call = Arc::new(move |w: usize, n: u64| {
        let mut client = AuthServiceClient::new(chans[w % chans.len()].clone());
        let token = tokens[(n as usize + w) % TENANTS].clone();
        async move {
            client
                .authorize(AuthorizeRequest {
                    token,
                    tenant_id: String::new(),
                    required_features: vec!["pro_features".into()],
                    deny_if: vec!["paywall_active".into()],
                    resource: String::new(),
                    include_claims: false,
                })
                .await
                .is_ok()
        }
    });
    // Same tenants and flag as GetFlag, one keep-alive connection per caller.
    let ofrep_call = ofrep_addr.map(|addr| {
        let callers = Arc::new(ofrep::Callers::new(addr, args.read_concurrency));
        let tenant_ids: Arc<Vec<String>> =
            Arc::new((0..TENANTS).map(|i| format!("tenant-{i}")).collect());
        Arc::new(move |w: usize, n: u64| {
            let callers = callers.clone();
            let tenant_ids = tenant_ids.clone();
            async move {
                callers
                    .evaluate(w, &tenant_ids[(n as usize + w) % TENANTS], "pro_features")
                    .await
            }
        })
    });
    if ofrep_call.is_none() {
        println!(
            "OFREP: skipped (the sidecar does not serve it: built before OFREP, or --addr without --ofrep-addr)"
        );
    }
    // Every bench tenant pays, so Authorize measures the common path: allowed.
    pay_every_tenant(&channels[0]).await?;
    let rounds = args.seconds.max(1);
    let round = Duration::from_secs(1);
    let mut health: Option<Phase> = None;
    let mut get_flag: Option<Phase> = None;
    let mut authorize: Option<Phase> = None;
    let mut resolve_boolean: Option<Phase> = None;
    let resolve_boolean_call = openfeature::resolve_boolean_call(flagd_channels.clone());
    let mut ofrep_phase: Option<Phase> = None;
    for i in 0..rounds {
        let warm_up = if i == 0 {
            Duration::from_secs(1)
        } else {
            Duration::from_millis(200)
        };
        let h = run_phase(
            "Health/Check (baseline)",
            args.read_concurrency,
            warm_up,
            round,
            health_call.clone(),
        )
        .await;
        let g = run_phase(
            "FlagService/GetFlag",
            args.read_concurrency,
            warm_up,
            round,
            get_flag_call.clone(),
        )
        .await;
        let a = run_phase(
            "AuthService/Authorize (HS256)",
            args.read_concurrency,
            warm_up,
            round,
            authorize_call.clone(),
        )
        .await;
        if !flagd_channels.is_empty() {
            let r = run_phase(
                "flagd v2 ResolveBoolean",
                args.read_concurrency,
                warm_up,
                round,
                resolve_boolean_call.clone(),
            )
            .await;
            resolve_boolean = Some(match resolve_boolean {
                Some(p) => p.merge(r),
                None => r,
            });
        }
        authorize = Some(match authorize {
            Some(p) => p.merge(a),
            None => a,
        });
        if let Some(call) = &ofrep_call {
            let o = run_phase(
                "OFREP evaluate (HTTP/1.1)",
                args.read_concurrency,
                warm_up,
                round,
                call.clone(),
            )
            .await;
            ofrep_phase = Some(match ofrep_phase {
                Some(p) => p.merge(o),
                None => o,
            });
        }
        health = Some(match health {
            Some(p) => p.merge(h),
            None => h,
        });
        get_flag = Some(match get_flag {
            Some(p) => p.merge(g),
            None => g,
        });
    }
    let (Some(health), Some(get_flag), Some(authorize)) = (health, get_flag, authorize) else {
        return Err("no rounds ran".into());
    };
    print_phase(&health, None);
    print_phase(&get_flag, Some(&health));
    print_phase(&authorize, Some(&health));
    match &resolve_boolean {
        Some(resolve_boolean) => print_phase(resolve_boolean, Some(&health)),
        None => println!("flagd v2 ResolveBoolean: skipped (the sidecar has no flagd listener)"),
    }
    if let Some(ofrep_phase) = &ofrep_phase {
        print_phase(ofrep_phase, Some(&health));
    }

    // Metrics on against off: two fresh sidecars of the same build with the same data, so the
    // one that ran the phases above (its store larger, its caches warmer) is compared with
    // neither.
    match &sidecar {
        Some(started) if started.sides.contains_key("ops") => {
            let mut fresh = Vec::new();
            for envs in [&[][..], &[("CORESDK_OPS_LISTEN", "off")][..]] {
                let sidecar = start_sidecar_with(
                    sidecar_binary(args.sidecar.as_deref())?,
                    args.store.as_deref(),
                    envs,
                )?;
                let mut channels = Vec::new();
                for _ in 0..args.connections.max(1) {
                    channels.push(channel(&sidecar.addr).await?);
                }
                pay_every_tenant(&channels[0]).await?;
                fresh.push((sidecar, Arc::new(channels)));
            }
            println!(
                "ops: GetFlag with metrics collected (ratio to a sidecar with --ops-listen off, same build, same data, same run)"
            );
            ops::metrics_overhead(
                (
                    Some(fresh[0].0.child.id()),
                    get_flag_caller!(fresh[0].1.clone()),
                ),
                (
                    Some(fresh[1].0.child.id()),
                    get_flag_caller!(fresh[1].1.clone()),
                ),
                args.read_concurrency,
                rounds,
            )
            .await;
        }
        _ => println!(
            "ops: metrics overhead skipped (the sidecar has no ops listener, or --addr was given)"
        ),
    }
    layers::report(
        get_flag
            .per_server_core()
            .map(|calls_per_cpu_s| 1e9 / calls_per_cpu_s),
    )
    .await;

    let peak_rss = Arc::new(AtomicU64::new(0));
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = pid.map(|pid| {
        let (peak, sampling) = (peak_rss.clone(), sampling.clone());
        tokio::spawn(async move {
            while sampling.load(Ordering::Relaxed) {
                if let Some(rss) = rss_kib(pid) {
                    peak.fetch_max(rss, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    });
    let chans = channels.clone();
    let run = std::process::id();
    let webhook_call = Arc::new(move |w: usize, n: u64| {
        let mut client = WebhookServiceClient::new(chans[w % chans.len()].clone());
        let event_type = if n.is_multiple_of(2) {
            "invoice.paid"
        } else {
            "invoice.payment_failed"
        };
        let delivery = signed_event(
            format!("evt_bench_{run}_{w}_{n}"),
            event_type,
            coresdk::time::now_s(),
            &format!("cus_bench_{}", (w + n as usize) % TENANTS),
        );
        async move { client.handle_stripe_webhook(delivery).await.is_ok() }
    });
    let webhooks = run_phase(
        "WebhookService (durable)",
        args.webhook_concurrency,
        Duration::from_secs(1),
        Duration::from_secs(args.seconds),
        webhook_call.clone(),
    )
    .await;
    let chans = channels.clone();
    let subscription_call = Arc::new(move |w: usize, n: u64| {
        let mut client = WebhookServiceClient::new(chans[w % chans.len()].clone());
        let status = if n.is_multiple_of(2) {
            "active"
        } else {
            "past_due"
        };
        let delivery = signed_subscription_update(
            format!("evt_bench_sub_{run}_{w}_{n}"),
            coresdk::time::now_s(),
            &format!("cus_bench_{}", (w + n as usize) % TENANTS),
            status,
        );
        async move { client.handle_stripe_webhook(delivery).await.is_ok() }
    });
    let subscription_webhooks = run_phase(
        "WebhookService subscription updates (durable)",
        args.webhook_concurrency,
        Duration::from_secs(1),
        Duration::from_secs(args.seconds),
        subscription_call,
    )
    .await;
    sampling.store(false, Ordering::Relaxed);
    if let Some(sampler) = sampler {
        let _ = sampler.await;
    }
    print_phase(&webhooks, Some(&health));
    print_phase(&subscription_webhooks, Some(&webhooks));

    if let (Some(store), Some(sidecar)) = (args.store.as_deref(), &sidecar)
        && store.starts_with("postgres")
    {
        let other = start_sidecar(sidecar_binary(args.sidecar.as_deref())?, Some(store))?;
        let a = channel(&sidecar.addr).await?;
        let c = channel(&other.addr).await?;
        let mut watch = openfeature::WatchFlags::open(c).await?;
        let latencies =
            openfeature::change_latencies(a.clone(), &mut watch, 200, Duration::ZERO, "prop")
                .await?;
        openfeature::print_latencies(
            "cross-replica propagation (webhook committed on A → change on C's WatchFlags)",
            &latencies,
        );
        if let Some(flagd) = other.sides.get("flagd") {
            let flagd = channel(flagd).await?;
            let mut events = openfeature::EventStream::open(flagd).await?;
            let latencies =
                openfeature::change_latencies(a, &mut events, 200, Duration::ZERO, "prop_flagd")
                    .await?;
            openfeature::print_latencies(
                "cross-replica change to provider (webhook committed on A → configuration_change on C's flagd EventStream)",
                &latencies,
            );
        }
    }

    if let Some(flagd) = flagd_channels.first() {
        let mut events = openfeature::EventStream::open(flagd.clone()).await?;
        let latencies = openfeature::change_latencies(
            channels[0].clone(),
            &mut events,
            200,
            Duration::ZERO,
            "flagd",
        )
        .await?;
        openfeature::print_latencies(
            "change to provider (webhook → configuration_change on flagd EventStream)",
            &latencies,
        );
    }
    if let Some(sync) = sidecar.as_ref().and_then(|s| s.sides.get("flagd-sync")) {
        let sync = channel(sync).await?;
        let mut configurations = openfeature::SyncFlags::open(sync).await?;
        let latencies =
            // Apart by more than the rebuild spacing: each change is measured on its own, not
            // as part of a burst (which is published at most every 75 ms).
            openfeature::change_latencies(
                channels[0].clone(),
                &mut configurations,
                100,
                Duration::from_millis(100),
                "sync",
            )
            .await?;
        openfeature::print_latencies(
            "change to in-process provider (webhook → new configuration on flagd SyncFlags; changes 100 ms apart)",
            &latencies,
        );
    }

    if let Some(idle) = idle_rss {
        println!(
            "server RSS: idle {:.1} MiB, peak under webhook load {:.1} MiB",
            idle as f64 / 1024.0,
            peak_rss.load(Ordering::Relaxed) as f64 / 1024.0
        );
    }

    println!("abuse: durable webhooks while forged ones flood in (ratio to none, same run)");
    abuse::forged_flood(
        &channels,
        args.webhook_concurrency,
        rounds,
        args.flood_rate,
        webhook_call,
    )
    .await?;
    println!(
        "abuse: Authorize denials, a new tenant per call after {} (ratio to one tenant)",
        args.distinct_tenants
    );
    abuse::distinct_denials(
        &channels,
        args.read_concurrency,
        rounds,
        args.distinct_tenants,
    )
    .await?;
    if let Some(rss) = pid.and_then(rss_kib) {
        println!(
            "server RSS after the abuse phases: {:.1} MiB",
            rss as f64 / 1024.0
        );
    }
    // Sidecars of their own, on fresh data: they need the bench to start sidecars.
    if sidecar.is_some() {
        audit::run(&audit_bench).await?;
    } else {
        println!("audit: skipped (--addr: the audit phase starts sidecars of its own)");
    }
    // Last: it leaves the sidecar with many more tenants than the phases above measured.
    match sidecar.as_ref().and_then(|s| s.sides.get("ops")) {
        Some(ops_addr) if args.scrape_tenants > 0 => {
            ops::scrape_latency(
                channels[0].clone(),
                ops_addr,
                args.scrape_tenants,
                args.scrapes,
            )
            .await?
        }
        _ => println!("ops: /metrics scrape skipped (no ops listener, or --scrape-tenants 0)"),
    }
    Ok(())
}
