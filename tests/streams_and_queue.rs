//! Clients that go away (a dropped stream, a closed connection, a deadline) take their work
//! with them: stream tasks end at once, and store work nobody waits for any more is not run.
mod common;

use std::time::Duration;

use common::audit::{append_app_events, verify};
use common::streams::{logged, on_disk_logging};
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

/// While another connection holds the database's write lock, many admins give up on their
/// SetFlag at a short deadline. Once the lock is gone none of those changes is committed (each
/// caller was told it failed), and the next call is served.
#[tokio::test]
async fn writes_whose_callers_gave_up_during_a_stall_are_not_committed() {
    const CONNECTIONS: usize = 20;
    const CALLS_EACH: usize = 15;
    let dir = tempfile::tempdir().expect("temp dir");
    let db = dir.path().join("coresdk.db");
    // With its metrics: they tell when the server has let go of every given-up call.
    let mut options = Options::default();
    options.args.retain(|a| a != "--store" && a != "memory");
    options
        .args
        .extend(["--store".into(), format!("sqlite://{}", db.display())]);
    let (sidecar, ops) = common::ops::start(options).await;
    let before = verify(&sidecar).await.head_seq;

    let lock = rusqlite::Connection::open(&db).expect("open the db");
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
    // The server drops a given-up call when the deadline passes on its own clock, which on a
    // loaded machine can be after the client's: until it has, the call still waits for the
    // writer. So the lock goes only once the server has handled (dropped) every one of them.
    let given_up = (CONNECTIONS * CALLS_EACH) as f64;
    let waiting_since = tokio::time::Instant::now();
    loop {
        let handled = common::ops::Scrape::of(&ops)
            .await
            .value("grpc_server_handled_total", &[("grpc_method", "SetFlag")]);
        if handled >= given_up {
            break;
        }
        assert!(
            waiting_since.elapsed() < HANG_GUARD,
            "the server still holds given-up calls: {handled} of {given_up} handled"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
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

/// A full Verify scans the whole chain. Callers that give up on it leave no scans behind,
/// callers that wait share scans, and other reads are served beside them.
#[tokio::test]
async fn verify_calls_share_scans_and_leave_none_behind() {
    const RECORDS: usize = 1500;
    const SCANNED: &str = "audit chain scanned";
    let dir = tempfile::tempdir().expect("temp dir");
    let (sidecar, log) = on_disk_logging(dir.path(), Options::default()).await;
    append_app_events(&sidecar, RECORDS).await;

    // 100 Verify calls given up after 50 ms, then one that waits. Scanned one by one they
    // would be 101 scans; shared, the calls that came together share the scan under way
    // and the one queued after it.
    let mut gave_up = tokio::task::JoinSet::new();
    for _ in 0..10 {
        let channel = connection(&sidecar).await;
        for _ in 0..10 {
            let mut audit =
                coresdk::proto::audit_service_client::AuditServiceClient::new(channel.clone());
            gave_up.spawn(async move {
                let mut request = tonic::Request::new(VerifyAuditRequest { full: true });
                request.set_timeout(Duration::from_millis(50));
                let _ = audit.verify(request).await;
            });
        }
    }
    while let Some(call) = gave_up.join_next().await {
        call.expect("joined");
    }
    let next = tokio::time::timeout(HANG_GUARD, common::checkpoints::verify_full(&sidecar))
        .await
        .expect("a Verify after the abandoned ones is served");
    assert!(next.ok);
    assert_eq!(next.records_checked, RECORDS as u64);
    let after_the_abandoned = logged(&log, SCANNED);
    assert!(
        (1..=4).contains(&after_the_abandoned),
        "{after_the_abandoned} scans for 101 Verify calls"
    );

    // Verify calls that all wait for their answers, and a Query among them.
    const WAITING: usize = 8;
    let mut waiting = tokio::task::JoinSet::new();
    for _ in 0..WAITING {
        let mut audit = sidecar.audit();
        waiting.spawn(async move {
            let report =
                tokio::time::timeout(HANG_GUARD, audit.verify(VerifyAuditRequest { full: true }))
                    .await
                    .expect("Verify answers")
                    .expect("Verify")
                    .into_inner();
            assert_eq!(report.records_checked, RECORDS as u64);
        });
    }
    tokio::time::timeout(HANG_GUARD, query_one_page(&sidecar))
        .await
        .expect("Query answers beside the scans");
    while let Some(call) = waiting.join_next().await {
        call.expect("joined");
    }
    let for_the_waiting = logged(&log, SCANNED) - after_the_abandoned;
    // One under way and one queued serve them all, unless some arrived after the queued
    // one started; one each is what sharing prevents.
    assert!(
        (1..=WAITING / 2).contains(&for_the_waiting),
        "{for_the_waiting} scans for {WAITING} Verify calls made together"
    );
}

/// A Query examines a bounded window of the chain per call: a filter that matches little
/// yields short pages with a token to go on, and paging through finds exactly the matches.
#[tokio::test]
async fn a_sparse_query_pages_through_bounded_windows() {
    let window = coresdk::app::QUERY_SCAN_WINDOW as usize;
    let sidecar = Sidecar::start(Options::default()).await;
    let mut rare = Vec::new();
    for count in [window / 2, window, window / 2] {
        append_app_events(&sidecar, count).await;
        let record = sidecar
            .audit()
            .append(AppendAuditRequest {
                include_proof: false,
                tenant_id: "rare".into(),
                actor: "app".into(),
                event: "rare.event".into(),
                outcome: "success".into(),
                metadata: None,
                idempotency_key: String::new(),
            })
            .await
            .expect("Append")
            .into_inner();
        rare.push(record.seq);
    }
    let head = *rare.last().expect("appended") as usize;

    let query = |outcome: &str, page_token: String| QueryAuditRequest {
        event_prefix: "rare.".into(),
        outcome: outcome.into(),
        page_size: 100,
        page_token,
        ..Default::default()
    };
    let first = sidecar
        .audit()
        .query(query("no-such-outcome", String::new()))
        .await
        .expect("Query")
        .into_inner();
    assert!(first.records.is_empty());
    assert!(
        !first.next_page_token.is_empty(),
        "a page that examined only part of the chain says where to go on"
    );

    for (outcome, expected) in [("success", rare.clone()), ("no-such-outcome", Vec::new())] {
        let (mut found, mut pages, mut token) = (Vec::new(), 0, String::new());
        loop {
            let page = sidecar
                .audit()
                .query(query(outcome, token))
                .await
                .expect("Query")
                .into_inner();
            pages += 1;
            found.extend(page.records.iter().map(|r| r.seq));
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
        }
        assert_eq!(found, expected, "{outcome}");
        assert_eq!(pages, head.div_ceil(window), "one page per window examined");
    }

    // Tail's catch-up goes through the same short pages.
    let mut tail = sidecar
        .audit()
        .tail(TailAuditRequest {
            tenant_id: "rare".into(),
            from_seq: 1,
        })
        .await
        .expect("Tail")
        .into_inner();
    for seq in &rare {
        let record = tokio::time::timeout(HANG_GUARD, tail.message())
            .await
            .expect("caught up")
            .expect("Tail")
            .expect("a record");
        assert_eq!(record.seq, *seq);
    }
}
