//! Graceful drain (SIGTERM: NOT_SERVING while still answering for the shutdown delay, then
//! in-flight calls drain) and the server limits (unary request timeout, calls per connection,
//! HTTP/2 keepalive), on the real binary. Slow calls are real ones: a store write waiting for
//! the SQLite write lock this test holds (below the sidecar's 5 s busy timeout).
mod common;

use std::path::Path;
use std::process::Child;
use std::time::Duration;

use common::*;
use coresdk::proto::{
    FlagValue, GetFlagRequest, SetFlagRequest, WatchFlagsRequest,
    flag_service_client::FlagServiceClient, flag_value::Kind, watch_flags_response::Event,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tonic::transport::Channel;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// A generous bound on anything that should be prompt; a hang guard, not a speed assertion.
const HANG_GUARD: Duration = Duration::from_secs(20);

/// The sidecar's process, killed if a failing test leaves it running.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A sidecar on a SQLite file in `dir` with `settings` as environment variables; the test owns
/// the process, to signal it and watch it exit.
fn start(dir: &Path, settings: &[(&str, &str)]) -> (Running, String) {
    let options = Options::default();
    let mut args = vec![
        "--store".to_owned(),
        format!("sqlite://{}", dir.join("coresdk.db").display()),
    ];
    args.extend(
        options
            .args
            .into_iter()
            .filter(|a| a != "--store" && a != "memory"),
    );
    let mut envs = options.envs;
    envs.extend(
        settings
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    );
    let (child, addr) = spawn(&args, &envs);
    (Running(child), addr)
}

fn signal(Running(child): &Running, name: &str) {
    let status = std::process::Command::new("kill")
        .args([&format!("-{name}"), &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill -{name}");
}

/// Waits (bounded) for the process to exit; true when it exited cleanly.
async fn exits_cleanly(Running(child): &mut Running) -> bool {
    let deadline = tokio::time::Instant::now() + HANG_GUARD;
    loop {
        if let Some(status) = child.try_wait().expect("waitable") {
            return status.success();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the sidecar did not exit"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Holds the database's write lock until dropped (or released), so the sidecar's next store
/// write waits.
struct WriteLock(rusqlite::Connection);

impl WriteLock {
    fn take(dir: &Path) -> Self {
        let lock = rusqlite::Connection::open(dir.join("coresdk.db")).expect("open the db");
        lock.busy_timeout(Duration::from_secs(5))
            .expect("busy timeout");
        lock.execute_batch("BEGIN IMMEDIATE").expect("write lock");
        Self(lock)
    }

    fn release(self) {
        self.0.execute_batch("ROLLBACK").expect("release");
    }
}

fn set_flag(key: &str, on: bool, reason: &str) -> tonic::Request<SetFlagRequest> {
    admin(SetFlagRequest {
        tenant_id: "acme".into(),
        key: key.into(),
        value: Some(FlagValue {
            kind: Some(Kind::BoolValue(on)),
        }),
        actor: "ops".into(),
        reason: reason.into(),
    })
}

type SetFlagCall =
    tokio::task::JoinHandle<Result<tonic::Response<coresdk::proto::Flag>, tonic::Status>>;

/// A SetFlag on `channel` that stays in flight while `_lock` is held: its write waits for it.
async fn slow_set_flag(channel: &Channel, _lock: &WriteLock) -> SetFlagCall {
    let mut flags = FlagServiceClient::new(channel.clone());
    let slow =
        tokio::spawn(async move { flags.set_flag(set_flag("pro_features", true, "slow")).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!slow.is_finished(), "the write waits for the lock");
    slow
}

fn get_flag() -> GetFlagRequest {
    GetFlagRequest {
        tenant_id: "acme".into(),
        key: "pro_features".into(),
    }
}

async fn health(channel: &Channel, service: &str) -> ServingStatus {
    let answer = tokio::time::timeout(
        HANG_GUARD,
        HealthClient::new(channel.clone()).check(HealthCheckRequest {
            service: service.into(),
        }),
    )
    .await
    .expect("health answers")
    .expect("health check");
    answer.into_inner().status()
}

/// Waits (bounded) until the whole server reports NOT_SERVING.
async fn until_not_serving(channel: &Channel) {
    let deadline = tokio::time::Instant::now() + HANG_GUARD;
    while health(channel, "").await != ServingStatus::NotServing {
        assert!(tokio::time::Instant::now() < deadline, "never NOT_SERVING");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A `WatchFlags` stream of tenant `acme`, its snapshot already read.
async fn watch(channel: &Channel) -> tonic::Streaming<coresdk::proto::WatchFlagsResponse> {
    let mut stream = FlagServiceClient::new(channel.clone())
        .watch_flags(WatchFlagsRequest {
            tenant_id: "acme".into(),
        })
        .await
        .expect("WatchFlags")
        .into_inner();
    let first = tokio::time::timeout(HANG_GUARD, stream.message())
        .await
        .expect("a snapshot in time")
        .expect("a message")
        .expect("not ended");
    assert!(matches!(first.event, Some(Event::Snapshot(_))), "{first:?}");
    stream
}

/// The key of the next change on `stream`.
async fn next_change(stream: &mut tonic::Streaming<coresdk::proto::WatchFlagsResponse>) -> String {
    let message = tokio::time::timeout(HANG_GUARD, stream.message())
        .await
        .expect("a change in time")
        .expect("the stream is healthy")
        .expect("not ended");
    match message.event {
        Some(Event::Change(flag)) => flag.key,
        other => panic!("expected a change, got {other:?}"),
    }
}

/// SIGTERM with a slow call in flight: during the delay health says NOT_SERVING, yet new
/// connections and calls are served, the slow call and a new write succeed, and a stream keeps
/// delivering changes; after the delay the stream ends and the process exits 0.
#[tokio::test]
async fn sigterm_keeps_answering_while_not_serving_for_the_delay_then_drains() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (mut child, addr) = start(dir.path(), &[("CORESDK_SHUTDOWN_DELAY_S", "5")]);
    let channel = connect(&addr).await;
    assert_eq!(health(&channel, "").await, ServingStatus::Serving);
    let mut stream = watch(&channel).await;

    let lock = WriteLock::take(dir.path());
    let slow = slow_set_flag(&channel, &lock).await;

    signal(&child, "TERM");
    until_not_serving(&channel).await;
    for service in ["coresdk.v1.FlagService", "coresdk.v1.WebhookService"] {
        assert_eq!(
            health(&channel, service).await,
            ServingStatus::NotServing,
            "{service}"
        );
    }
    // A connection made during the delay is accepted and served.
    let fresh = connect(&addr).await;
    let mut fresh_flags = FlagServiceClient::new(fresh.clone());
    fresh_flags
        .get_flag(get_flag())
        .await
        .expect("a new call during the delay");

    lock.release();
    tokio::time::timeout(HANG_GUARD, slow)
        .await
        .expect("the slow call ends")
        .expect("joined")
        .expect("the slow call in flight at SIGTERM succeeds");
    fresh_flags
        .set_flag(set_flag("advanced_analytics", true, "during the delay"))
        .await
        .expect("a new write during the delay succeeds");
    assert_eq!(next_change(&mut stream).await, "pro_features");
    assert_eq!(next_change(&mut stream).await, "advanced_analytics");
    assert!(
        child.0.try_wait().expect("waitable").is_none(),
        "still running during the delay"
    );

    // As before the delay existed, a WatchFlags stream then ends (flagd's streams end
    // UNAVAILABLE), so its client reconnects elsewhere.
    let end = tokio::time::timeout(HANG_GUARD, stream.message())
        .await
        .expect("the stream ends after the delay");
    assert!(matches!(end, Ok(None)), "{end:?}");
    assert!(exits_cleanly(&mut child).await, "exit 0 after the drain");
}

/// A second SIGTERM during a long delay ends it at once.
#[tokio::test]
async fn a_second_signal_ends_the_delay_at_once() {
    let dir = tempfile::tempdir().expect("temp dir");
    // Far longer than the hang guard: only the second signal can end it in time.
    let (mut child, addr) = start(dir.path(), &[("CORESDK_SHUTDOWN_DELAY_S", "600")]);
    let channel = connect(&addr).await;
    signal(&child, "TERM");
    until_not_serving(&channel).await;
    FlagServiceClient::new(channel.clone())
        .get_flag(get_flag())
        .await
        .expect("served during the delay");
    signal(&child, "INT");
    assert!(
        exits_cleanly(&mut child).await,
        "exit 0 after the second signal"
    );
}

/// Delay 0 is the behaviour before the delay existed: new connections are refused at once,
/// while the call in flight still drains and gets its answer.
#[tokio::test]
async fn with_no_delay_sigterm_stops_accepting_at_once_and_drains() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (mut child, addr) = start(dir.path(), &[("CORESDK_SHUTDOWN_DELAY_S", "0")]);
    let channel = connect(&addr).await;
    let lock = WriteLock::take(dir.path());
    let slow = slow_set_flag(&channel, &lock).await;

    signal(&child, "TERM");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(4);
    loop {
        if tokio::net::TcpStream::connect(&addr).await.is_err() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still accepting connections"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!slow.is_finished(), "the write still waits for the lock");
    lock.release();
    tokio::time::timeout(HANG_GUARD, slow)
        .await
        .expect("the slow call ends")
        .expect("joined")
        .expect("the call in flight at SIGTERM drains and succeeds");
    assert!(exits_cleanly(&mut child).await, "exit 0 after the drain");
}

/// A unary call over `--request-timeout-s` is answered DEADLINE_EXCEEDED with the sidecar's
/// problem (and its write is not committed); a stream open far longer is not cut.
#[tokio::test]
async fn a_unary_call_over_the_request_timeout_gets_the_problem_and_streams_outlive_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (mut child, addr) = start(dir.path(), &[("CORESDK_REQUEST_TIMEOUT_S", "0.5")]);
    let channel = connect(&addr).await;
    let mut stream = watch(&channel).await;
    let mut flags = FlagServiceClient::new(channel.clone());

    let lock = WriteLock::take(dir.path());
    let status = tokio::time::timeout(
        HANG_GUARD,
        flags.set_flag(set_flag("pro_features", true, "timed out")),
    )
    .await
    .expect("answered")
    .expect_err("over the request timeout");
    lock.release();
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    assert_eq!(error_reason(&status), "REQUEST_TIMEOUT");
    let problem = problem(&status);
    assert_eq!(problem.status, 504);
    assert!(
        problem.detail.contains("CORESDK_REQUEST_TIMEOUT_S"),
        "{problem:?}"
    );

    // The stream has now been open well past the timeout, and more.
    tokio::time::sleep(Duration::from_millis(700)).await;
    flags
        .set_flag(set_flag("advanced_analytics", true, "after"))
        .await
        .expect("a prompt call is served");
    assert_eq!(
        next_change(&mut stream).await,
        "advanced_analytics",
        "the stream still runs, and the timed-out write was not committed"
    );
    signal(&child, "TERM");
    assert!(exits_cleanly(&mut child).await);
}

/// A call beyond `--max-concurrent-per-connection` is refused at once with the problem; other connections are unaffected; the connection serves
/// again once a slot frees; a started stream takes no place.
#[tokio::test]
async fn a_call_over_the_per_connection_limit_is_refused_with_the_problem() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (mut child, addr) = start(
        dir.path(),
        &[("CORESDK_MAX_CONCURRENT_PER_CONNECTION", "1")],
    );
    let busy = connect(&addr).await;
    // An open stream holds no place once started: the connection still serves a call.
    let _stream = watch(&busy).await;
    tokio::time::timeout(
        HANG_GUARD,
        FlagServiceClient::new(busy.clone()).get_flag(get_flag()),
    )
    .await
    .expect("not held up by the stream")
    .expect("GetFlag beside a stream");
    let lock = WriteLock::take(dir.path());
    let slow = slow_set_flag(&busy, &lock).await;
    let refused = tokio::time::timeout(
        HANG_GUARD,
        FlagServiceClient::new(busy.clone()).get_flag(get_flag()),
    )
    .await
    .expect("refused at once, not queued")
    .expect_err("the second call on the busy connection is refused");
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
    assert_eq!(error_reason(&refused), "TOO_MANY_CALLS_ON_CONNECTION");
    assert!(
        problem(&refused)
            .detail
            .contains("CORESDK_MAX_CONCURRENT_PER_CONNECTION"),
        "{refused:?}"
    );

    let other = connect(&addr).await;
    FlagServiceClient::new(other)
        .get_flag(get_flag())
        .await
        .expect("another connection is served");
    lock.release();
    tokio::time::timeout(HANG_GUARD, slow)
        .await
        .expect("answered")
        .expect("joined")
        .map(drop)
        .expect("the slow call is served once the lock is released");
    FlagServiceClient::new(busy)
        .get_flag(get_flag())
        .await
        .expect("the connection serves again once its call ended");
    signal(&child, "TERM");
    assert!(exits_cleanly(&mut child).await);
}

/// A TCP proxy that forwards until `freeze` is sent, then holds both connections open without
/// moving a byte: a peer that is gone without closing anything.
async fn freezable_proxy(target: String) -> (String, tokio::sync::watch::Sender<bool>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let (freeze, frozen) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let server = tokio::net::TcpStream::connect(&target)
                .await
                .expect("the sidecar");
            let (client_read, client_write) = client.into_split();
            let (server_read, server_write) = server.into_split();
            tokio::spawn(pump(client_read, server_write, frozen.clone()));
            tokio::spawn(pump(server_read, client_write, frozen.clone()));
        }
    });
    (addr, freeze)
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut frozen: tokio::sync::watch::Receiver<bool>,
) {
    let mut buffer = vec![0; 16 * 1024];
    loop {
        tokio::select! {
            () = async { let _ = frozen.wait_for(|f| *f).await; } => break,
            read = from.read(&mut buffer) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if to.write_all(&buffer[..n]).await.is_err() {
                        return;
                    }
                }
            },
        }
    }
    // Both halves stay open, silent, until the test ends.
    let _held = (from, to);
    std::future::pending::<()>().await;
}

type Opened = Result<Box<dyn Send>, tonic::Status>;
type Opening = std::pin::Pin<Box<dyn std::future::Future<Output = Opened> + Send>>;

fn open_watch(channel: Channel) -> Opening {
    Box::pin(async move {
        let stream = FlagServiceClient::new(channel)
            .watch_flags(WatchFlagsRequest {
                tenant_id: "acme".into(),
            })
            .await?;
        Ok(Box::new(stream.into_inner()) as Box<dyn Send>)
    })
}

fn open_event_stream(channel: Channel) -> Opening {
    use coresdk::flagd_proto::evaluation::v2;
    Box::pin(async move {
        let stream = common::flagd::v2_client(&channel)
            .event_stream(v2::EventStreamRequest {})
            .await?;
        Ok(Box::new(stream.into_inner()) as Box<dyn Send>)
    })
}

const ONE_STREAM_FAST_PINGS: [(&str, &str); 3] = [
    ("CORESDK_MAX_STREAMS", "1"),
    ("CORESDK_HTTP2_KEEPALIVE_INTERVAL_S", "0.2"),
    ("CORESDK_HTTP2_KEEPALIVE_TIMEOUT_S", "0.3"),
];

/// Opens the one stream `--max-streams 1` allows through a proxy at `addr`, freezes the proxy,
/// and waits (bounded) until a stream opened directly is accepted again.
async fn a_dead_peers_stream_is_freed(addr: &str, open: fn(Channel) -> Opening) {
    let (proxied, freeze) = freezable_proxy(addr.to_owned()).await;
    let _doomed = open(connect(&proxied).await)
        .await
        .expect("the one stream allowed");
    let direct = connect(addr).await;
    let refused = open(direct.clone())
        .await
        .err()
        .expect("the only stream place is taken");
    assert_eq!(error_reason(&refused), "TOO_MANY_STREAMS");

    freeze.send(true).expect("the proxy runs");
    let deadline = tokio::time::Instant::now() + HANG_GUARD;
    loop {
        match open(direct.clone()).await {
            Ok(_) => break,
            Err(status) => assert_eq!(error_reason(&status), "TOO_MANY_STREAMS"),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the dead peer's stream was never freed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// With HTTP/2 keepalive, a peer that stops answering (no FIN, no RST) is found dead and its
/// stream freed: with room for one stream, a new one is accepted again.
#[tokio::test]
async fn keepalive_frees_the_streams_of_a_dead_peer() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (mut child, addr) = start(dir.path(), &ONE_STREAM_FAST_PINGS);
    a_dead_peers_stream_is_freed(&addr, open_watch).await;
    signal(&child, "TERM");
    assert!(exits_cleanly(&mut child).await);
}

/// The flagd listener has the same keepalive as the main one.
#[tokio::test]
async fn keepalive_frees_a_dead_peers_flagd_event_stream() {
    let mut options = Options::default();
    options.envs.extend(
        ONE_STREAM_FAST_PINGS
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    );
    let (_sidecar, flagd) = common::flagd::start(options).await;
    a_dead_peers_stream_is_freed(&flagd, open_event_stream).await;
}
