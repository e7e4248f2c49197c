//! The verifiable audit log's costs (issue 14):
//! - `Append` throughput of this sidecar against an older one (`--baseline-sidecar`, built
//!   before the Merkle tree), in alternating rounds, each round on a fresh data directory so
//!   that neither measures the other's larger log;
//! - `GetInclusionProof` latency on a log of `--audit-records` records, seeded in-process
//!   through the library's own store (large write transactions), then served by the sidecar;
//! - `Verify` of 10,000 records appended after the newest checkpoint of that log: incremental
//!   (the records since the checkpoint and a consistency proof) where the sidecar supports it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use coresdk::audit::NewAuditRecord;
use coresdk::proto::{
    AppendAuditRequest, GetCheckpointRequest, GetInclusionProofRequest, VerifyAuditRequest,
    audit_service_client::AuditServiceClient,
};
use coresdk::store::{CommitListener, Committed, Store, StoreUrl};
use tonic::transport::Channel;

use crate::sidecar::{Sidecar, start_sidecar, start_sidecar_with};
use crate::{BoxError, Phase, channel, print_phase, run_phase_on};

/// Records appended after the large log's checkpoint, then verified.
const NEW_RECORDS: u64 = 10_000;
/// Records per write transaction while seeding: large, as a bulk load is.
const SEED_BATCH: u64 = 50_000;
/// How long the sidecar may take to sign its first checkpoint of the seeded log.
const CHECKPOINT_WAIT: Duration = Duration::from_secs(300);
/// How long one `Verify` may take before the phase gives up on it.
const VERIFY_TIMEOUT: Duration = Duration::from_secs(600);

pub struct AuditBench {
    pub current: PathBuf,
    pub baseline: Option<PathBuf>,
    pub records: u64,
    pub rounds: u64,
    pub concurrency: usize,
    pub connections: usize,
}

pub async fn run(bench: &AuditBench) -> Result<(), BoxError> {
    append_throughput(bench).await?;
    large_log(bench).await
}

/// An application record as a client appends it.
fn append_request(w: usize, n: u64) -> AppendAuditRequest {
    AppendAuditRequest {
        tenant_id: format!("tenant-{}", (w + n as usize) % crate::TENANTS),
        actor: "bench".into(),
        event: "app.bench.append".into(),
        outcome: "success".into(),
        metadata: None,
        idempotency_key: String::new(),
        include_proof: false,
    }
}

async fn channels(addr: &str, count: usize) -> Result<Arc<Vec<Channel>>, BoxError> {
    let mut channels = Vec::new();
    for _ in 0..count.max(1) {
        channels.push(channel(addr).await?);
    }
    Ok(Arc::new(channels))
}

/// One round of `Append` load against a fresh sidecar of `binary`.
async fn append_round(
    binary: &Path,
    name: &'static str,
    warm_up: Duration,
    bench: &AuditBench,
) -> Result<Phase, BoxError> {
    let sidecar = start_sidecar(binary.to_owned(), None)?;
    let channels = channels(&sidecar.addr, bench.connections).await?;
    let call = Arc::new(move |w: usize, n: u64| {
        let mut client = AuditServiceClient::new(channels[w % channels.len()].clone());
        async move { client.append(append_request(w, n)).await.is_ok() }
    });
    let phase = run_phase_on(
        Some(sidecar.child.id()),
        name,
        bench.concurrency,
        warm_up,
        Duration::from_secs(1),
        call,
    )
    .await;
    drop(sidecar);
    Ok(phase)
}

/// `Append` throughput, alternating with the baseline sidecar when there is one.
async fn append_throughput(bench: &AuditBench) -> Result<(), BoxError> {
    let (mut current, mut baseline): (Option<Phase>, Option<Phase>) = (None, None);
    for i in 0..bench.rounds.max(1) {
        let warm_up = Duration::from_millis(if i == 0 { 1000 } else { 300 });
        let now = || append_round(&bench.current, "AuditService/Append", warm_up, bench);
        let Some(old) = &bench.baseline else {
            current = Some(merged(current, now().await?));
            continue;
        };
        let then = || append_round(old, "AuditService/Append, baseline", warm_up, bench);
        // Each goes first in every other round, so that neither gains from the order.
        let (c, b) = if i % 2 == 0 {
            let c = now().await?;
            (c, then().await?)
        } else {
            let b = then().await?;
            (now().await?, b)
        };
        current = Some(merged(current, c));
        baseline = Some(merged(baseline, b));
    }
    let Some(current) = current else {
        return Err("no Append rounds ran".into());
    };
    match &baseline {
        Some(baseline) => {
            println!(
                "audit: Append throughput, ratio to --baseline-sidecar (target ≥ 0.90x; alternating rounds, fresh data each)"
            );
            print_phase(baseline, None);
            print_phase(&current, Some(baseline));
        }
        None => {
            println!("audit: Append throughput (no --baseline-sidecar to compare with)");
            print_phase(&current, None);
        }
    }
    Ok(())
}

fn merged(sum: Option<Phase>, phase: Phase) -> Phase {
    match sum {
        Some(sum) => sum.merge(phase),
        None => phase,
    }
}

struct Ignore;

impl CommitListener for Ignore {
    fn committed(&self, _: Vec<Committed>) {}
}

/// Appends `records` records to a new SQLite store at `db` through the library, in large
/// transactions, as the sidecar's own writer would (chain and tree hashes alike).
async fn seed(db: &Path, records: u64) -> Result<Duration, BoxError> {
    let started = Instant::now();
    let store = Store::open(
        &StoreUrl::Sqlite(db.to_owned()),
        None,
        Arc::new(Ignore),
        Arc::new(coresdk::flags::FlagCache::new(BTreeMap::new())),
    )?;
    let at_ms = coresdk::time::now_ms();
    let mut seeded = 0;
    while seeded < records {
        let batch = SEED_BATCH.min(records - seeded);
        let first = seeded;
        store
            .write(move |tx| {
                for i in first..first + batch {
                    tx.append_audit(
                        NewAuditRecord {
                            tenant_id: format!("tenant-{}", i % crate::TENANTS as u64),
                            actor: "bench-seed".into(),
                            event: "app.bench.seeded".into(),
                            outcome: "success".into(),
                            metadata: serde_json::Map::new(),
                        },
                        at_ms,
                    )?;
                }
                Ok(())
            })
            .await?;
        seeded += batch;
    }
    store.close();
    // The store's threads release the file (and its lock) as they end.
    tokio::task::spawn_blocking(move || drop(store)).await?;
    Ok(started.elapsed())
}

/// A cheap, well-spread pseudo-random seq in `1..=records` for caller `w`'s call `n`.
fn spread(w: usize, n: u64, records: u64) -> u64 {
    let mut x = (w as u64) << 40 ^ n ^ 0x9e37_79b9_7f4a_7c15;
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^= x >> 31;
    1 + x % records
}

async fn large_log(bench: &AuditBench) -> Result<(), BoxError> {
    let records = bench.records.max(1);
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("coresdk.db");
    let took = seed(&db, records).await?;
    println!(
        "audit: {records} records seeded in-process in {:.1} s ({:.0}/s)",
        took.as_secs_f64(),
        records as f64 / took.as_secs_f64()
    );
    let store = format!("sqlite://{}", db.display());
    // Only the checkpoint at start: the Verify phase measures what came after it.
    let sidecar = start_sidecar_with(
        bench.current.clone(),
        Some(&store),
        &[("CORESDK_AUDIT_CHECKPOINT_INTERVAL_S", "86400")],
    )?;
    let channels = channels(&sidecar.addr, bench.connections).await?;
    // The sidecar signs its first checkpoint once started, after checking every record it
    // covers: the phases wait for it, so that the proofs are timed on a quiet sidecar and the
    // appends below are what Verify finds new.
    let waiting = Instant::now();
    let mut client = AuditServiceClient::new(channels[0].clone());
    let covered = loop {
        match checkpoint_size(&mut client).await {
            Ok(size) if size >= records => break Ok(size),
            Err(e) if e.code() == tonic::Code::Unimplemented => break Err(e),
            answer if waiting.elapsed() > CHECKPOINT_WAIT => break answer,
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    match covered {
        Ok(size) => println!(
            "audit: the sidecar's first checkpoint covers {size} records ({:.1} s after it listened)",
            waiting.elapsed().as_secs_f64()
        ),
        Err(e) => println!(
            "audit: no C2SP checkpoint of the seeded log ({:?}): Verify below scans the whole log",
            e.code()
        ),
    }
    inclusion_latency(&sidecar, &channels, records, bench.rounds).await;
    incremental_verify(&sidecar, &channels, records, bench.concurrency).await
}

async fn inclusion_latency(
    sidecar: &Sidecar,
    channels: &Arc<Vec<Channel>>,
    records: u64,
    seconds: u64,
) {
    let chans = channels.clone();
    let call = Arc::new(move |w: usize, n: u64| {
        let mut client = AuditServiceClient::new(chans[w % chans.len()].clone());
        let seq = spread(w, n, records);
        async move {
            client
                .get_inclusion_proof(GetInclusionProofRequest {
                    seq,
                    tree_size: records,
                })
                .await
                .is_ok_and(|proof| !proof.into_inner().hashes.is_empty() || records == 1)
        }
    });
    let phase = run_phase_on(
        Some(sidecar.child.id()),
        "GetInclusionProof, 1 caller",
        1,
        Duration::from_secs(1),
        Duration::from_secs(seconds.max(1)),
        call,
    )
    .await;
    println!(
        "audit: GetInclusionProof of random records in the tree of all {records}, one caller: {:.0}/s  p50 {:.3} ms  p99 {:.3} ms  errors {} (target p99 ≤ 1 ms at 1,000,000)",
        phase.throughput(),
        phase.percentile(0.50),
        phase.percentile(0.99),
        phase.errors
    );
}

/// The newest checkpoint's tree size, when the sidecar serves C2SP checkpoints.
async fn checkpoint_size(client: &mut AuditServiceClient<Channel>) -> Result<u64, tonic::Status> {
    let note = client
        .get_checkpoint(GetCheckpointRequest {})
        .await?
        .into_inner()
        .note;
    Ok(coresdk::tlog_proof::CheckpointBody::parse(&note).map_or(0, |body| body.size))
}

async fn incremental_verify(
    sidecar: &Sidecar,
    channels: &Arc<Vec<Channel>>,
    records: u64,
    concurrency: usize,
) -> Result<(), BoxError> {
    let mut client = AuditServiceClient::new(channels[0].clone());
    let appending = Instant::now();
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut appenders = Vec::new();
    for w in 0..concurrency.max(1) {
        let (mut client, next) = (
            AuditServiceClient::new(channels[w % channels.len()].clone()),
            next.clone(),
        );
        appenders.push(tokio::spawn(async move {
            loop {
                let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if n >= NEW_RECORDS {
                    return Ok::<(), tonic::Status>(());
                }
                client.append(append_request(w, n)).await?;
            }
        }));
    }
    for appender in appenders {
        appender.await??;
    }
    let appended = appending.elapsed();
    let cpu_before = crate::sidecar::cpu_seconds(sidecar.child.id());
    let started = Instant::now();
    let mut request = tonic::Request::new(VerifyAuditRequest { full: false });
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", crate::ADMIN_TOKEN).parse()?,
    );
    let report = tokio::time::timeout(VERIFY_TIMEOUT, client.verify(request))
        .await
        .map_err(|_| format!("Verify took over {} s", VERIFY_TIMEOUT.as_secs()))??
        .into_inner();
    let took = started.elapsed();
    let cpu = cpu_before
        .zip(crate::sidecar::cpu_seconds(sidecar.child.id()))
        .map(|(before, after)| format!(", {:.3} s of server CPU", after - before))
        .unwrap_or_default();
    let how = if report.checkpoint_size > 0 {
        format!(
            "incremental from the checkpoint of {} records",
            report.checkpoint_size
        )
    } else {
        "a full scan: this sidecar's Verify is not incremental".to_owned()
    };
    println!(
        "audit: Verify after {NEW_RECORDS} appends ({:.1} s) to the {records}-record log: ok {}, {} records checked, {how}, {:.3} s{cpu} (target ≤ 1 s at 1,000,000)",
        appended.as_secs_f64(),
        report.ok,
        report.records_checked,
        took.as_secs_f64(),
    );
    Ok(())
}
