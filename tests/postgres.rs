//! The PostgreSQL store with three real sidecar processes sharing one database. Needs
//! CORESDK_TEST_POSTGRES_URL (./scripts/test starts a throwaway server and sets it).
mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::audit::verify;
use common::pg::*;
use common::*;
use coresdk::proto::{self, WebhookOutcome};
use serde_json::json;
use tokio_stream::StreamExt as _;

#[tokio::test]
async fn one_event_at_three_replicas_at_once_applies_once() {
    let url = fresh_database(server_url()).await;
    let nodes = replicas(&url, 3).await;
    for round in 0..5 {
        let body = event(
            &format!("evt_race_{round}"),
            "invoice.paid",
            now(),
            json!({"customer": "cus_acme_001"}),
        );
        let (a, b, c) = tokio::join!(
            deliver(&nodes[0], body.clone()),
            deliver(&nodes[1], body.clone()),
            deliver(&nodes[2], body)
        );
        let mut outcomes: Vec<WebhookOutcome> = [a, b, c]
            .into_iter()
            .map(|r| r.expect("acknowledged").outcome())
            .collect();
        outcomes.sort_by_key(|o| *o as i32);
        assert_eq!(
            outcomes,
            vec![
                WebhookOutcome::Applied,
                WebhookOutcome::Duplicate,
                WebhookOutcome::Duplicate
            ],
            "round {round}"
        );
    }
}

#[tokio::test]
async fn a_thousand_mixed_deliveries_over_three_replicas() {
    let url = format!("{}?pool_size=3", fresh_database(server_url()).await);
    let nodes = replicas(&url, 3).await;
    let customers = ["cus_acme_001", "cus_globex_001", "cus_initech_001"];
    let types = [
        "invoice.paid",
        "invoice.payment_failed",
        "charge.refunded",
        "subscription.upgraded",
    ];
    // 500 distinct events, each delivered twice (Stripe retries), in an interleaved order.
    let mut deliveries = Vec::new();
    for i in 0..500usize {
        let body = event(
            &format!("evt_mix_{i}"),
            types[i % types.len()],
            now() - (i % 7) as i64,
            json!({"customer": customers[i % 3]}),
        );
        deliveries.push((format!("evt_mix_{i}"), body));
    }
    let mut order: Vec<usize> = (0..1000)
        .map(|n| {
            if n % 2 == 0 {
                n / 2
            } else {
                (n / 2 + 250) % 500
            }
        })
        .collect();
    order.rotate_left(7);
    let queue = std::sync::Arc::new(tokio::sync::Mutex::new(
        order.into_iter().enumerate().collect::<Vec<_>>(),
    ));
    let deliveries = std::sync::Arc::new(deliveries);
    let mut senders = Vec::new();
    for sender in 0..16 {
        let queue = queue.clone();
        let deliveries = deliveries.clone();
        let clients: Vec<_> = nodes.iter().map(Sidecar::webhooks).collect();
        senders.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            loop {
                let next = queue.lock().await.pop();
                let Some((n, index)) = next else { return seen };
                let (id, body) = &deliveries[index];
                let mut client = clients[(n + sender) % clients.len()].clone();
                let answer = client
                    .handle_stripe_webhook(signed(SECRET, body.clone()))
                    .await
                    .expect("acknowledged")
                    .into_inner();
                seen.push((id.clone(), answer.outcome()));
            }
        }));
    }
    let mut by_event: HashMap<String, Vec<WebhookOutcome>> = HashMap::new();
    for sender in senders {
        for (id, outcome) in sender.await.expect("sender") {
            by_event.entry(id).or_default().push(outcome);
        }
    }
    assert_eq!(by_event.len(), 500);
    for (id, outcomes) in &by_event {
        assert_eq!(outcomes.len(), 2, "{id}");
        let duplicates = outcomes
            .iter()
            .filter(|o| **o == WebhookOutcome::Duplicate)
            .count();
        assert_eq!(
            duplicates, 1,
            "{id}: exactly one of its two deliveries is a duplicate: {outcomes:?}"
        );
    }
    for node in &nodes {
        let report = verify(node).await;
        assert!(report.ok, "{report:?}");
        // 1000 deliveries + the one record of seeding the tenants file, written once however
        // the replicas raced (the later ones found every customer mapped).
        assert_eq!(report.records_checked, 1001, "{report:?}");
    }
}

#[tokio::test]
async fn a_change_through_replica_a_reaches_a_watch_on_replica_c() {
    let url = fresh_database(server_url()).await;
    let nodes = replicas(&url, 3).await;
    let mut watch = nodes[2]
        .flags()
        .watch_flags(proto::WatchFlagsRequest {
            tenant_id: "acme-corp".into(),
        })
        .await
        .expect("WatchFlags")
        .into_inner();
    let first = watch.next().await.expect("snapshot").expect("ok");
    assert!(matches!(
        first.event,
        Some(proto::watch_flags_response::Event::Snapshot(_))
    ));

    nodes[0]
        .flags()
        .set_flag(admin(proto::SetFlagRequest {
            tenant_id: "acme-corp".into(),
            key: "seats".into(),
            value: Some(proto::FlagValue {
                kind: Some(proto::flag_value::Kind::NumberValue(40.0)),
            }),
            actor: "ops".into(),
            reason: String::new(),
        }))
        .await
        .expect("SetFlag on A");
    let change = tokio::time::timeout(Duration::from_secs(5), watch.next())
        .await
        .expect("the change reaches C")
        .expect("a message")
        .expect("ok");
    let Some(proto::watch_flags_response::Event::Change(flag)) = change.event else {
        panic!("a change")
    };
    assert_eq!(
        (flag.key.as_str(), flag.tenant_id.as_str()),
        ("seats", "acme-corp")
    );

    // A webhook through B changes C's cache as well.
    deliver(
        &nodes[1],
        event(
            "evt_b",
            "invoice.paid",
            now(),
            json!({"customer": "cus_acme_001"}),
        ),
    )
    .await
    .expect("B");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !is_on(&nodes[2], "acme-corp", "pro_features").await {
        assert!(
            std::time::Instant::now() < deadline,
            "C never saw B's webhook"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The outage and TLS tests' own servers: stopping or reconfiguring them must not disturb the
/// other tests.
const OUTAGE_PG_PORT: u16 = 54331;
const OUTAGE_PG_DIR: &str = "/tmp/coresdk-test-pg-outage";
const TLS_PG_PORT: u16 = 54333;
const TLS_PG_DIR: &str = "/tmp/coresdk-test-pg-tls";

use tonic_health::pb::health_check_response::ServingStatus;

#[tokio::test]
async fn postgres_going_away_mid_load_loses_nothing_acknowledged() {
    let server = OwnServer::start(OUTAGE_PG_PORT, OUTAGE_PG_DIR);
    let url = fresh_database(server.url.clone()).await;
    let nodes = replicas(&url, 3).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut senders = Vec::new();
    for sender in 0..4 {
        let clients: Vec<_> = nodes.iter().map(Sidecar::webhooks).collect();
        let stop = stop.clone();
        senders.push(tokio::spawn(async move {
            let (mut acked, mut refused) = (Vec::new(), 0usize);
            let mut n = 0usize;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let id = format!("evt_out_{sender}_{n}");
                let body = event(
                    &id,
                    "invoice.paid",
                    now(),
                    json!({"customer": "cus_globex_001"}),
                );
                let mut client = clients[n % clients.len()].clone();
                match client.handle_stripe_webhook(signed(SECRET, body)).await {
                    Ok(_) => acked.push(id),
                    Err(status) => {
                        assert_eq!(
                            status.code(),
                            tonic::Code::Unavailable,
                            "retryable while the database is away"
                        );
                        refused += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
                n += 1;
            }
            (acked, refused)
        }));
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    stop_own_server(OUTAGE_PG_DIR);
    tokio::time::sleep(Duration::from_millis(400)).await;
    // Flag reads keep answering from the cache while the database is away.
    let during = flag(&nodes[0], "globex", "pro_features").await;
    assert_eq!(bool_value(&during), Some(true));
    // Health says which part is down: webhooks need the database, the server still serves.
    wait_for_health(
        &nodes[0],
        "coresdk.v1.WebhookService",
        ServingStatus::NotServing,
    )
    .await;
    wait_for_health(&nodes[0], "", ServingStatus::Serving).await;
    // Access decisions: a tenant whose flags are cached is decided from the cache; one the
    // cache cannot vouch for is decided by the fail mode (open by default), and says so.
    let mut auth = proto::auth_service_client::AuthServiceClient::new(nodes[0].channel.clone());
    let decide = |tenant: &str| proto::AuthorizeRequest {
        tenant_id: tenant.into(),
        required_features: vec!["pro_features".into()],
        ..Default::default()
    };
    let cached = auth
        .authorize(decide("globex"))
        .await
        .expect("Authorize")
        .into_inner();
    assert_eq!(
        (cached.decision(), cached.fail_mode_applied),
        (proto::Decision::Allow, false)
    );
    let unknown = auth
        .authorize(decide("never-seen"))
        .await
        .expect("Authorize")
        .into_inner();
    assert_eq!(
        (unknown.decision(), unknown.fail_mode_applied),
        (proto::Decision::Allow, true)
    );
    start_own_server(OUTAGE_PG_PORT, OUTAGE_PG_DIR);
    wait_for_health(
        &nodes[0],
        "coresdk.v1.WebhookService",
        ServingStatus::Serving,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut acked = Vec::new();
    let mut refused = 0;
    for sender in senders {
        let (a, r) = sender.await.expect("sender");
        acked.extend(a);
        refused += r;
    }
    assert!(refused > 0, "the outage was observed");
    assert!(acked.len() > 20, "work was acknowledged: {}", acked.len());
    // Every acknowledged event is known after recovery: a redelivery is a duplicate.
    for id in &acked {
        let body = event(
            id,
            "invoice.paid",
            now(),
            json!({"customer": "cus_globex_001"}),
        );
        let answer = deliver(&nodes[1], body).await.expect("recovered");
        assert_eq!(
            answer.outcome(),
            WebhookOutcome::Duplicate,
            "{id} was acknowledged before"
        );
    }
    let report = verify(&nodes[2]).await;
    assert!(report.ok, "{report:?}");
}

#[tokio::test]
async fn tls_to_postgres_is_verified_against_the_configured_ca() {
    let certs = tempfile::tempdir().expect("temp dir");
    fixture("mint_certs.py", certs.path());
    // A new cluster each run, which accepts TLS connections only.
    discard_own_server(TLS_PG_DIR);
    let key_dir = format!("{TLS_PG_DIR}-keys");
    let _ = std::fs::remove_dir_all(&key_dir);
    std::fs::create_dir_all(&key_dir).expect("key dir");
    for name in ["server.pem", "server.key"] {
        std::fs::copy(certs.path().join(name), format!("{key_dir}/{name}")).expect("copy");
    }
    let owned = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "chown -R postgres {key_dir} && chmod 600 {key_dir}/server.key"
        ))
        .status()
        .expect("chown");
    assert!(owned.success());
    let options = format!(
        "-c ssl=on -c ssl_cert_file={key_dir}/server.pem -c ssl_key_file={key_dir}/server.key"
    );
    let server = OwnServer::start_with(
        TLS_PG_PORT,
        TLS_PG_DIR,
        &[
            ("CORESDK_TEST_PG_OPTIONS", &options),
            (
                "CORESDK_TEST_PG_HBA",
                "local all all trust\\nhostssl all all 127.0.0.1/32 trust\\nhostnossl all all 127.0.0.1/32 reject",
            ),
        ],
    );
    let url = server.url.clone();
    let ca = certs.path().join("ca.pem").display().to_string();

    let verified = Sidecar::start(Options {
        args: vec!["--store".into(), format!("{url}?sslmode=verify-full")],
        envs: vec![
            ("STRIPE_WEBHOOK_SECRET".into(), SECRET.into()),
            ("CORESDK_ADMIN_TOKEN".into(), ADMIN_TOKEN.into()),
            ("CORESDK_POSTGRES_CA_FILE".into(), ca),
        ],
    })
    .await;
    verified
        .tenants()
        .map_customer(admin(proto::MapCustomerRequest {
            customer_id: "cus_tls".into(),
            tenant_id: "tls-co".into(),
            actor: "test".into(),
            reason: String::new(),
        }))
        .await
        .expect("writes over TLS");
    let applied = deliver(
        &verified,
        event(
            "evt_tls",
            "invoice.paid",
            now(),
            json!({"customer": "cus_tls"}),
        ),
    )
    .await
    .expect("a webhook over TLS");
    assert_eq!(applied.outcome(), WebhookOutcome::Applied);

    let run = |args: &[&str], envs: &[(&str, &str)]| {
        std::process::Command::new(binary())
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(args)
            .env_clear()
            .envs(envs.iter().copied())
            .output()
            .expect("runs")
    };
    // Plaintext is refused by the server; TLS without a CA is refused by the sidecar at start.
    let plaintext = run(&["--store", &url], &[]);
    assert!(!plaintext.status.success());
    let no_ca = run(&["--store", &format!("{url}?sslmode=require")], &[]);
    assert!(!no_ca.status.success());
    assert!(String::from_utf8_lossy(&no_ca.stderr).contains("CORESDK_POSTGRES_CA_FILE"));
    // A server certificate from another CA is refused.
    let other = tempfile::tempdir().expect("temp dir");
    fixture("mint_certs.py", other.path());
    let wrong_ca = run(
        &["--store", &format!("{url}?sslmode=verify-full")],
        &[(
            "CORESDK_POSTGRES_CA_FILE",
            &other.path().join("ca.pem").display().to_string(),
        )],
    );
    assert!(!wrong_ca.status.success());
}
