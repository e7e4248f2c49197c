//! Clients that go away (a dropped stream, a closed connection, a deadline) take their work
//! with them: stream tasks end at once, and store work nobody waits for any more is not run.
mod common;

use std::time::Duration;

use common::*;
use coresdk::proto::{
    AppendAuditRequest, QueryAuditRequest, SetFlagRequest, TailAuditRequest, VerifyAuditRequest,
    WatchFlagsRequest,
};
use tonic::transport::Channel;

/// A generous bound on anything that should be prompt; a hang guard, not a speed assertion.
const HANG_GUARD: Duration = Duration::from_secs(20);

/// A connection of its own, so that dropping it is a client going away.
async fn connection(sidecar: &Sidecar) -> Channel {
    Channel::from_shared(format!("http://{}", sidecar.addr))
        .expect("valid uri")
        .connect()
        .await
        .expect("connects")
}

fn capped(streams: usize) -> Options {
    let mut options = Options::default();
    options
        .envs
        .push(("CORESDK_MAX_STREAMS".into(), streams.to_string()));
    options
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    WatchFlags,
    Tail,
}

/// Opens a stream of `kind` on `channel`; the stream stays open while the result is held.
async fn open(kind: Kind, channel: &Channel) -> Result<Box<dyn Send>, tonic::Status> {
    Ok(match kind {
        Kind::WatchFlags => Box::new(
            coresdk::proto::flag_service_client::FlagServiceClient::new(channel.clone())
                .watch_flags(WatchFlagsRequest {
                    tenant_id: "quiet".into(),
                })
                .await?
                .into_inner(),
        ),
        Kind::Tail => Box::new(
            coresdk::proto::audit_service_client::AuditServiceClient::new(channel.clone())
                .tail(TailAuditRequest {
                    tenant_id: "quiet".into(),
                    from_seq: 0,
                })
                .await?
                .into_inner(),
        ),
    })
}

/// Opens `count` streams over connections of at most 100 streams each (HTTP/2 servers
/// allow 200 per connection by default). A stream refused for the cap is retried until the
/// hang guard: the slots of streams whose clients just left come free as their tasks end.
async fn open_many(
    kind: Kind,
    sidecar: &Sidecar,
    count: usize,
) -> (Vec<Channel>, Vec<Box<dyn Send>>) {
    let deadline = tokio::time::Instant::now() + HANG_GUARD;
    let mut channels = Vec::new();
    let mut streams = Vec::new();
    while streams.len() < count {
        if streams.len() % 100 == 0 {
            channels.push(connection(sidecar).await);
        }
        let channel = channels.last().expect("a connection");
        match open(kind, channel).await {
            Ok(stream) => streams.push(stream),
            Err(status) if status.code() == tonic::Code::ResourceExhausted => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{kind:?}: stream {} still refused: the streams of clients that left were never freed",
                    streams.len() + 1
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(status) => panic!("{kind:?}: {status:?}"),
        }
    }
    (channels, streams)
}

async fn assert_cap_refuses_one_more(kind: Kind, sidecar: &Sidecar) {
    let status = match open(kind, &sidecar.channel).await {
        Ok(_) => panic!("{kind:?}: a stream beyond the cap was opened"),
        Err(status) => status,
    };
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert_eq!(error_reason(&status), "TOO_MANY_STREAMS");
    let problem = problem(&status);
    assert_eq!(problem.status, 429);
    assert!(
        problem.detail.contains("CORESDK_MAX_STREAMS"),
        "{problem:?}"
    );
}

/// Fills the cap, then lets every client go (dropped streams on live connections for
/// `WatchFlags`, closed connections for `Tail`, as a killed client would), and fills it again.
async fn streams_end_when_their_clients_go(kind: Kind, close_connections: bool) {
    const CAP: usize = 300;
    let sidecar = Sidecar::start(capped(CAP)).await;
    let mut connections_kept_up = Vec::new();
    for _ in 0..3 {
        let (channels, streams) = open_many(kind, &sidecar, CAP).await;
        assert_cap_refuses_one_more(kind, &sidecar).await;
        drop(streams);
        if !close_connections {
            connections_kept_up.extend(channels);
        }
    }
}

#[tokio::test]
async fn watch_flags_streams_end_when_their_clients_cancel_them() {
    streams_end_when_their_clients_go(Kind::WatchFlags, false).await;
}

#[tokio::test]
async fn tail_streams_end_when_their_clients_disconnect() {
    streams_end_when_their_clients_go(Kind::Tail, true).await;
}

#[tokio::test]
async fn both_stream_kinds_share_one_cap() {
    let sidecar = Sidecar::start(capped(2)).await;
    let _flags = open(Kind::WatchFlags, &sidecar.channel)
        .await
        .expect("first stream");
    let _tail = open(Kind::Tail, &sidecar.channel)
        .await
        .expect("second stream");
    assert_cap_refuses_one_more(Kind::WatchFlags, &sidecar).await;
    assert_cap_refuses_one_more(Kind::Tail, &sidecar).await;
}

fn set_pro_features(reason: String) -> tonic::Request<SetFlagRequest> {
    admin(SetFlagRequest {
        tenant_id: "acme".into(),
        key: "pro_features".into(),
        value: Some(coresdk::proto::FlagValue {
            kind: Some(coresdk::proto::flag_value::Kind::BoolValue(true)),
        }),
        actor: "ops".into(),
        reason,
    })
}

async fn verify(sidecar: &Sidecar) -> coresdk::proto::VerifyAuditResponse {
    tokio::time::timeout(HANG_GUARD, sidecar.audit().verify(VerifyAuditRequest {}))
        .await
        .expect("Verify answers")
        .expect("Verify")
        .into_inner()
}

/// While another connection holds the database's write lock, many admins give up on their
/// SetFlag at a short deadline. Once the lock is gone none of those changes is committed (each
/// caller was told it failed), and the next call is served.
#[tokio::test]
async fn writes_whose_callers_gave_up_during_a_stall_are_not_committed() {
    const CONNECTIONS: usize = 20;
    const CALLS_EACH: usize = 15;
    let dir = tempfile::tempdir().expect("temp dir");
    let sidecar = Sidecar::on_disk(dir.path(), Options::default()).await;
    let before = verify(&sidecar).await.head_seq;

    let lock = rusqlite::Connection::open(dir.path().join("coresdk.db")).expect("open the db");
    lock.busy_timeout(Duration::from_secs(5))
        .expect("busy timeout");
    // Held well under the sidecar's own 5 s busy timeout, so the stalled writes would commit
    // after it if they were run.
    lock.execute_batch("BEGIN IMMEDIATE").expect("write lock");
    // A few calls per connection: HTTP/2 servers close a connection on which many calls are
    // cancelled before the server took them up (the rapid-reset defence).
    let mut calls = tokio::task::JoinSet::new();
    for c in 0..CONNECTIONS {
        let channel = connection(&sidecar).await;
        for i in 0..CALLS_EACH {
            let mut flags =
                coresdk::proto::flag_service_client::FlagServiceClient::new(channel.clone());
            calls.spawn(async move {
                let mut request = set_pro_features(format!("given up {c}.{i}"));
                request.set_timeout(Duration::from_millis(300));
                tokio::time::timeout(HANG_GUARD, flags.set_flag(request))
                    .await
                    .expect("answered at the deadline")
            });
        }
    }
    while let Some(call) = calls.join_next().await {
        let status = call
            .expect("joined")
            .expect_err("nothing commits under the lock");
        assert!(
            matches!(
                status.code(),
                tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
            ),
            "{status:?}"
        );
    }
    lock.execute_batch("ROLLBACK").expect("release");
    drop(lock);

    tokio::time::timeout(
        HANG_GUARD,
        sidecar.flags().set_flag(set_pro_features("after".into())),
    )
    .await
    .expect("a fresh SetFlag is served")
    .expect("SetFlag");
    assert_eq!(
        verify(&sidecar).await.head_seq,
        before + 1,
        "only the change whose caller waited is in the audit trail"
    );
}

/// A chain long enough that verifying it is real work.
async fn grow_chain(sidecar: &Sidecar, records: usize) {
    const AT_ONCE: usize = 50;
    let mut appends = tokio::task::JoinSet::new();
    for i in 0..records {
        if appends.len() == AT_ONCE {
            appends
                .join_next()
                .await
                .expect("an append")
                .expect("joined");
        }
        let mut audit = sidecar.audit();
        appends.spawn(async move {
            audit
                .append(AppendAuditRequest {
                    tenant_id: "acme".into(),
                    actor: "app".into(),
                    event: format!("app.event.{i}"),
                    outcome: "success".into(),
                    metadata: None,
                })
                .await
                .expect("Append");
        });
    }
    while let Some(append) = appends.join_next().await {
        append.expect("joined");
    }
}

async fn query_one_page(sidecar: &Sidecar) {
    sidecar
        .audit()
        .query(QueryAuditRequest {
            page_size: 10,
            ..Default::default()
        })
        .await
        .expect("Query");
}

/// Verify scans the whole chain. Callers that give up on it leave no scans behind, and
/// however many Verify calls run, other reads are still served beside them.
#[tokio::test]
async fn verify_calls_neither_pile_up_nor_starve_other_reads() {
    const RECORDS: usize = 1500;
    let dir = tempfile::tempdir().expect("temp dir");
    let sidecar = Sidecar::on_disk(dir.path(), Options::default()).await;
    grow_chain(&sidecar, RECORDS).await;

    // 100 Verify calls given up after 50 ms. Were they all scanned anyway, one after the
    // other, the next Verify would wait for about 100 scans.
    let mut gave_up = tokio::task::JoinSet::new();
    for _ in 0..10 {
        let channel = connection(&sidecar).await;
        for _ in 0..10 {
            let mut audit =
                coresdk::proto::audit_service_client::AuditServiceClient::new(channel.clone());
            gave_up.spawn(async move {
                let mut request = tonic::Request::new(VerifyAuditRequest {});
                request.set_timeout(Duration::from_millis(50));
                let _ = audit.verify(request).await;
            });
        }
    }
    while let Some(call) = gave_up.join_next().await {
        call.expect("joined");
    }
    // A hang guard of some twenty scans.
    let next = tokio::time::timeout(
        Duration::from_secs(5),
        sidecar.audit().verify(VerifyAuditRequest {}),
    )
    .await
    .expect("a Verify after the abandoned ones is served without working through them")
    .expect("Verify")
    .into_inner();
    assert!(next.ok);
    assert_eq!(next.records_checked, RECORDS as u64);

    // Verify calls that all wait for their answers: a Query sent after the first of them
    // finished is answered while the others are still queued, not after all of them.
    const WAITING: usize = 8;
    let finished = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (first_done, first_finished) = tokio::sync::oneshot::channel::<()>();
    let first_done = std::sync::Arc::new(std::sync::Mutex::new(Some(first_done)));
    let mut waiting = tokio::task::JoinSet::new();
    for _ in 0..WAITING {
        let mut audit = sidecar.audit();
        let (finished, first_done) = (finished.clone(), first_done.clone());
        waiting.spawn(async move {
            tokio::time::timeout(HANG_GUARD, audit.verify(VerifyAuditRequest {}))
                .await
                .expect("Verify answers")
                .expect("Verify");
            finished.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if let Some(first) = first_done.lock().expect("lock").take() {
                let _ = first.send(());
            }
        });
    }
    first_finished.await.expect("a Verify finished");
    tokio::time::timeout(HANG_GUARD, query_one_page(&sidecar))
        .await
        .expect("Query answers");
    let finished_before_the_query = finished.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        finished_before_the_query < WAITING,
        "the Query waited for all {WAITING} Verify calls"
    );
    while let Some(call) = waiting.join_next().await {
        call.expect("joined");
    }
}
