//! The PostgreSQL store when the database misbehaves, and across replicas: a hung server is
//! answered UNAVAILABLE within seconds and recovered from by itself; `Tail` on any replica
//! follows every replica's records. Needs CORESDK_TEST_POSTGRES_URL (./scripts/test starts a
//! throwaway server and sets it); the hung-server test starts a server of its own.
mod common;

use std::time::{Duration, Instant};

use common::audit::verify;
use common::pg::*;
use common::*;
use coresdk::proto::{self, WebhookOutcome};
use serde_json::json;
use tokio_stream::StreamExt as _;
use tonic_health::pb::health_check_response::ServingStatus;

type WebhookClient = proto::webhook_service_client::WebhookServiceClient<tonic::transport::Channel>;

/// The hung-server test's own server: stopping it must not disturb the other tests.
const HUNG_PG_PORT: u16 = 54347;
const HUNG_PG_DIR: &str = "/tmp/coresdk-test-pg-hung";

/// Far longer than an answer may take: only a hang reaches it.
const HANG_GUARD: Duration = Duration::from_secs(30);

fn paid(id: &str) -> Vec<u8> {
    event(
        id,
        "invoice.paid",
        now(),
        json!({"customer": "cus_acme_001"}),
    )
}

/// A webhook as a patient client sends it: a deadline far beyond the hang guard, so an answer
/// within the guard is the sidecar's own.
async fn send_patiently(
    sidecar: &Sidecar,
    body: Vec<u8>,
) -> Result<proto::HandleStripeWebhookResponse, tonic::Status> {
    send_through(sidecar.webhooks(), body).await
}

async fn send_through(
    mut client: WebhookClient,
    body: Vec<u8>,
) -> Result<proto::HandleStripeWebhookResponse, tonic::Status> {
    let mut request = tonic::Request::new(signed(SECRET, body));
    request.set_timeout(Duration::from_secs(120));
    tokio::time::timeout(HANG_GUARD, client.handle_stripe_webhook(request))
        .await
        .expect("the sidecar answers while the database is hung instead of hanging")
        .map(|answer| answer.into_inner())
}

/// The server's postmaster and every backend SIGSTOPped: it accepts connections and its kernel
/// acknowledges what is sent, but nothing answers. SIGCONT when dropped, so a failing test
/// never leaves a stopped server behind.
struct Hung {
    postmaster: String,
}

impl Hung {
    fn stop(dir: &str) -> Self {
        let pid_file = std::fs::read_to_string(format!("{dir}/postmaster.pid"))
            .expect("the server's postmaster.pid");
        let hung = Self {
            postmaster: pid_file.lines().next().expect("a pid").trim().to_owned(),
        };
        // The postmaster first, so it forks no new backend meanwhile.
        signal(&["kill", "-STOP", &hung.postmaster]);
        signal(&["pkill", "-STOP", "-P", &hung.postmaster]);
        hung
    }
}

impl Drop for Hung {
    fn drop(&mut self) {
        signal(&["pkill", "-CONT", "-P", &self.postmaster]);
        signal(&["kill", "-CONT", &self.postmaster]);
    }
}

fn signal(command: &[&str]) {
    let _ = std::process::Command::new(command[0])
        .args(&command[1..])
        .status();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hung_database_is_answered_unavailable_within_seconds_and_recovered_from() {
    let server = OwnServer::start(HUNG_PG_PORT, HUNG_PG_DIR);
    let url = fresh_database(server.url.clone()).await;
    let sidecar = Sidecar::start(replica_options(&url)).await;
    let before = send_patiently(&sidecar, paid("evt_hung_before"))
        .await
        .expect("applied while the database answers");
    assert_eq!(before.outcome(), WebhookOutcome::Applied);

    {
        let _hung = Hung::stop(HUNG_PG_DIR);
        let stopped_at = Instant::now();
        let mut senders = Vec::new();
        for sender in 0..8 {
            let client = sidecar.webhooks();
            senders.push(tokio::spawn(async move {
                let mut refused = 0;
                while stopped_at.elapsed() < Duration::from_secs(8) {
                    let id = format!("evt_hung_{sender}_{refused}");
                    let status = send_through(client.clone(), paid(&id))
                        .await
                        .expect_err("nothing commits while the database is stopped");
                    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
                    assert_eq!(problem(&status).status, 503, "{status:?}");
                    refused += 1;
                }
                refused
            }));
        }
        // The services that need the database say so; the server as a whole still serves.
        wait_for_health(
            &sidecar,
            "coresdk.v1.WebhookService",
            ServingStatus::NotServing,
        )
        .await;
        wait_for_health(
            &sidecar,
            "coresdk.v1.AuditService",
            ServingStatus::NotServing,
        )
        .await;
        wait_for_health(&sidecar, "", ServingStatus::Serving).await;
        for sender in senders {
            let refused = sender.await.expect("a sender");
            assert!(refused > 0, "every sender was answered at least once");
        }
    }

    // Resumed: the sidecar recovers by itself.
    wait_for_health(
        &sidecar,
        "coresdk.v1.WebhookService",
        ServingStatus::Serving,
    )
    .await;
    let recovered = Instant::now();
    loop {
        match send_patiently(&sidecar, paid("evt_hung_after")).await {
            Ok(answer) => {
                assert_eq!(answer.outcome(), WebhookOutcome::Applied);
                break;
            }
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
                assert!(
                    recovered.elapsed() < HANG_GUARD,
                    "no webhook committed after the database resumed: {status:?}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    let report = verify(&sidecar).await;
    assert!(report.ok, "{report:?}");

    // Stopping the sidecar while the database hangs again ends within bounds.
    let _hung = Hung::stop(HUNG_PG_DIR);
    let mut sidecar = sidecar;
    let stopped = tokio::time::timeout(
        HANG_GUARD,
        tokio::task::spawn_blocking(move || sidecar.stop()),
    )
    .await
    .expect("the sidecar shuts down while the database hangs")
    .expect("stopped");
    assert!(stopped.success(), "{stopped:?}");
}

async fn append(sidecar: &Sidecar, event: &str) -> u64 {
    sidecar
        .audit()
        .append(proto::AppendAuditRequest {
            include_proof: false,
            tenant_id: "acme-corp".into(),
            actor: "user:7".into(),
            event: event.into(),
            outcome: "success".into(),
            metadata: None,
            idempotency_key: String::new(),
        })
        .await
        .expect("Append")
        .into_inner()
        .seq
}

#[tokio::test]
async fn tail_on_every_replica_follows_every_replicas_records_once_in_order() {
    let url = fresh_database(server_url()).await;
    let nodes = replicas(&url, 3).await;
    let head = verify(&nodes[2]).await.head_seq;
    let mut tail = nodes[2]
        .audit()
        .tail(proto::TailAuditRequest {
            from_seq: head + 1,
            tenant_id: String::new(),
        })
        .await
        .expect("Tail")
        .into_inner();
    let mut next = async || {
        tokio::time::timeout(Duration::from_secs(10), tail.next())
            .await
            .expect("the record reaches the tail on C")
            .expect("the stream goes on")
            .expect("a record")
    };
    // A record of C's own arriving proves the tail follows the live feed, not the store.
    append(&nodes[2], "app.tail.c0").await;
    assert_eq!(next().await.event, "app.tail.c0");

    let mut written = Vec::new();
    for i in 0..10 {
        written.push(format!("app.tail.a{i}"));
        append(&nodes[0], &written[written.len() - 1]).await;
        if i == 4 {
            // Interleaved: C's own commit lands between A's, B's too.
            written.push("app.tail.c1".into());
            append(&nodes[2], "app.tail.c1").await;
            written.push("app.tail.b0".into());
            append(&nodes[1], "app.tail.b0").await;
        }
    }
    let mut received = Vec::new();
    let mut last_seq = 0;
    while received.len() < written.len() {
        let record = next().await;
        assert!(
            record.seq > last_seq,
            "in order, each once: {} after {last_seq}",
            record.seq
        );
        last_seq = record.seq;
        received.push(record.event);
    }
    assert_eq!(received, written);
}

/// The writers' advisory lock (`WRITE_LOCK` in src/store/postgres/session.rs).
const WRITERS_LOCK: i64 = 0x636f_7265_7364_6b01;

#[tokio::test(flavor = "multi_thread")]
async fn a_lock_wait_past_lock_timeout_refuses_only_its_own_batch() {
    let url = fresh_database(server_url()).await;
    let sidecar = Sidecar::start(replica_options(&url)).await;
    assert_eq!(
        send_patiently(&sidecar, paid("evt_lock_before"))
            .await
            .expect("applied")
            .outcome(),
        WebhookOutcome::Applied
    );
    // Another replica stuck while it holds the writers' lock, past the server's lock_timeout.
    let (holder, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("a connection of our own");
    tokio::spawn(connection);
    holder
        .batch_execute(&format!(
            "BEGIN; SELECT pg_advisory_xact_lock({WRITERS_LOCK})"
        ))
        .await
        .expect("the writers' lock");
    let refused = send_patiently(&sidecar, paid("evt_lock_waited"))
        .await
        .expect_err("nothing commits while another replica holds the lock");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    holder.batch_execute("COMMIT").await.expect("released");

    // The server answered (with an error), so the replica counts it as reachable: the next
    // webhooks commit at once instead of being refused for a while as if it were down.
    for id in ["evt_lock_after", "evt_lock_waited"] {
        let answer = send_patiently(&sidecar, paid(id))
            .await
            .unwrap_or_else(|status| panic!("{id} commits once the lock is free: {status:?}"));
        assert_eq!(answer.outcome(), WebhookOutcome::Applied, "{id}");
    }
}
