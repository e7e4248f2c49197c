//! The operations listener of the real binary: `/livez`, `/readyz` and `/metrics` (exact counter
//! deltas after known traffic), its start rules (a chosen address taken fails the start, a
//! taken default is skipped, `off` serves nothing), and readiness through a PostgreSQL outage.
//! The outage test starts a PostgreSQL server of its own (scripts/postgres-test-server).
mod common;

use std::io::{BufRead as _, BufReader};
use std::time::Duration;

use common::ops::{Scrape, get};
use common::pg::*;
use common::*;
use coresdk::proto::{self, WebhookOutcome};
use serde_json::json;
use tonic_health::pb::health_check_response::ServingStatus;

const OUTAGE_PG_PORT: u16 = 54351;
const OUTAGE_PG_DIR: &str = "/tmp/coresdk-test-pg-ops-outage";

fn with_tenants(mut options: Options) -> Options {
    options.args.extend([
        "--tenants-file".to_owned(),
        concat!(env!("CARGO_MANIFEST_DIR"), "/examples/tenants.json").to_owned(),
    ]);
    options
}

fn paid(id: &str, customer: &str) -> Vec<u8> {
    event(id, "invoice.paid", now(), json!({"customer": customer}))
}

/// grpc-go's name of a status code, as `grpc_code` carries it.
fn code_name(code: tonic::Code) -> &'static str {
    match code {
        tonic::Code::Ok => "OK",
        tonic::Code::NotFound => "NotFound",
        tonic::Code::InvalidArgument => "InvalidArgument",
        tonic::Code::Unauthenticated => "Unauthenticated",
        tonic::Code::PermissionDenied => "PermissionDenied",
        tonic::Code::Unavailable => "Unavailable",
        other => panic!("no name for {other:?} in this test"),
    }
}

fn handled<'a>(service: &'a str, method: &'a str, code: &'a str) -> [(&'a str, &'a str); 4] {
    [
        ("grpc_service", service),
        ("grpc_method", method),
        ("grpc_type", "unary"),
        ("grpc_code", code),
    ]
}

#[tokio::test]
async fn probes_answer_and_metrics_count_known_traffic_exactly() {
    let (sidecar, ops) = common::ops::start(with_tenants(Options::default())).await;
    assert_eq!(get(&ops, "/livez").await.0, 200);
    assert_eq!(get(&ops, "/readyz").await.0, 200);
    assert_eq!(get(&ops, "/nothing-here").await.0, 404);

    let before = Scrape::of(&ops).await;

    let applied = deliver(&sidecar, paid("evt_ops_1", "cus_acme_001"))
        .await
        .expect("applied");
    assert_eq!(applied.outcome(), WebhookOutcome::Applied);
    let duplicate = deliver(&sidecar, paid("evt_ops_1", "cus_acme_001"))
        .await
        .expect("duplicate");
    assert_eq!(duplicate.outcome(), WebhookOutcome::Duplicate);
    let forged = sidecar
        .webhooks()
        .handle_stripe_webhook(signed(
            "whsec_not_the_secret",
            paid("evt_ops_2", "cus_acme_001"),
        ))
        .await
        .expect_err("a forged signature is refused");
    let refusal_reason = error_reason(&forged);

    let mut auth = proto::auth_service_client::AuthServiceClient::new(sidecar.channel.clone());
    let decide = |features: &[&str]| proto::AuthorizeRequest {
        tenant_id: "acme-corp".into(),
        required_features: features.iter().map(|f| (*f).to_owned()).collect(),
        ..Default::default()
    };
    let allowed = auth.authorize(decide(&[])).await.expect("Authorize");
    assert_eq!(allowed.into_inner().decision(), proto::Decision::Allow);
    let denied = auth
        .authorize(decide(&["no_such_feature_anywhere"]))
        .await
        .expect("Authorize")
        .into_inner();
    assert_eq!(denied.decision(), proto::Decision::Deny);

    let mut flags = sidecar.flags();
    flags
        .get_flag(proto::GetFlagRequest {
            tenant_id: "acme-corp".into(),
            key: "pro_features".into(),
        })
        .await
        .expect("GetFlag");
    let missing = flags
        .get_flag(proto::GetFlagRequest {
            tenant_id: "acme-corp".into(),
            key: "no_such_flag".into(),
        })
        .await
        .expect_err("an unknown flag");
    let missing_code = code_name(missing.code());

    let after = Scrape::of(&ops).await;
    let delta = |name: &str, labels: &[(&str, &str)]| {
        after.value(name, labels) - before.value(name, labels)
    };

    assert_eq!(
        delta("coresdk_webhooks_total", &[("outcome", "applied")]),
        1.0
    );
    assert_eq!(
        delta("coresdk_webhooks_total", &[("outcome", "duplicate")]),
        1.0
    );
    assert_eq!(
        delta("coresdk_webhooks_total", &[("outcome", "refused")]),
        1.0
    );
    assert_eq!(
        delta(
            "coresdk_webhook_refusals_total",
            &[("reason", refusal_reason.as_str())]
        ),
        1.0,
        "refused for {refusal_reason}"
    );
    assert_eq!(
        delta(
            "coresdk_authorize_decisions_total",
            &[("decision", "allow"), ("reason", "none")]
        ),
        1.0
    );
    assert_eq!(
        delta(
            "coresdk_authorize_decisions_total",
            &[("decision", "deny"), ("reason", "FEATURE_LOCKED")]
        ),
        1.0
    );
    assert_eq!(delta("coresdk_fail_mode_decisions_total", &[]), 0.0);

    let get_flag = [
        ("grpc_service", "coresdk.v1.FlagService"),
        ("grpc_method", "GetFlag"),
        ("grpc_type", "unary"),
    ];
    assert_eq!(delta("grpc_server_started_total", &get_flag), 2.0);
    assert_eq!(
        delta(
            "grpc_server_handled_total",
            &handled("coresdk.v1.FlagService", "GetFlag", "OK")
        ),
        1.0
    );
    assert_eq!(
        delta(
            "grpc_server_handled_total",
            &handled("coresdk.v1.FlagService", "GetFlag", missing_code)
        ),
        1.0,
        "GetFlag of an unknown flag answers {missing_code}"
    );
    assert_eq!(delta("grpc_server_handling_seconds_count", &get_flag), 2.0);
    assert_eq!(
        delta(
            "grpc_server_handling_seconds_bucket",
            &[
                ("grpc_service", "coresdk.v1.FlagService"),
                ("grpc_method", "GetFlag"),
                ("le", "+Inf")
            ]
        ),
        2.0
    );
    let webhook = "coresdk.v1.WebhookService";
    assert_eq!(
        delta(
            "grpc_server_handled_total",
            &handled(webhook, "HandleStripeWebhook", "OK")
        ),
        2.0
    );
    assert_eq!(
        delta(
            "grpc_server_handled_total",
            &handled(webhook, "HandleStripeWebhook", code_name(forged.code()))
        ),
        1.0
    );
    assert_eq!(
        delta(
            "grpc_server_handled_total",
            &handled("coresdk.v1.AuthService", "Authorize", "OK")
        ),
        2.0
    );

    // The applied delivery changed flags and wrote its audit record; the head follows.
    assert_eq!(
        delta("coresdk_flag_changes_total", &[]),
        applied.flag_changes.len() as f64
    );
    assert!(!applied.flag_changes.is_empty());
    let published = delta("coresdk_audit_records_total", &[]);
    assert!(published >= 1.0);
    assert_eq!(delta("coresdk_audit_head_seq", &[]), published);
    assert!(after.value("coresdk_audit_head_seq", &[]) >= applied.audit_seq as f64);
    let commits = delta("coresdk_store_commit_seconds_count", &[]);
    assert!(commits >= 1.0, "the delivery committed");
    assert_eq!(delta("coresdk_store_batch_size_count", &[]), commits);
    assert_eq!(after.value("coresdk_store_queue_depth", &[]), 0.0);
    assert_eq!(after.value("coresdk_watch_streams", &[]), 0.0);
    assert!(after.has("coresdk_postgres_feed_reconnects_total"));
}

#[tokio::test]
async fn unknown_methods_share_one_series_and_streams_are_counted_when_they_end() {
    let (sidecar, ops) = common::ops::start(Options::default()).await;
    let before = Scrape::of(&ops).await;
    // A path no service serves, twice under different names: neither name becomes a label.
    for path in ["/made.up.Service/First", "/another.Made.Up/Second"] {
        let mut client = tonic::client::Grpc::new(sidecar.channel.clone());
        client.ready().await.expect("ready");
        let answer: Result<tonic::Response<()>, _> = client
            .unary(
                tonic::Request::new(()),
                path.parse().expect("a path"),
                tonic_prost::ProstCodec::<(), ()>::default(),
            )
            .await;
        assert_eq!(
            answer.expect_err("unimplemented").code(),
            tonic::Code::Unimplemented
        );
    }
    // A server stream: counted as started while open, handled once it ends.
    let mut stream = sidecar
        .flags()
        .watch_flags(proto::WatchFlagsRequest {
            tenant_id: "acme-corp".into(),
        })
        .await
        .expect("WatchFlags")
        .into_inner();
    let _ = tokio::time::timeout(Duration::from_millis(200), stream.message()).await;
    let open = Scrape::of(&ops).await;
    let watch = [
        ("grpc_service", "coresdk.v1.FlagService"),
        ("grpc_method", "WatchFlags"),
        ("grpc_type", "server_stream"),
    ];
    assert_eq!(
        open.value("grpc_server_started_total", &watch)
            - before.value("grpc_server_started_total", &watch),
        1.0
    );
    assert_eq!(open.value("coresdk_watch_streams", &[]), 1.0);
    drop(stream);

    let after = loop {
        let scrape = Scrape::of(&ops).await;
        if scrape.value("grpc_server_handled_total", &watch)
            > before.value("grpc_server_handled_total", &watch)
        {
            break scrape;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        after.value("grpc_server_handled_total", &watch)
            - before.value("grpc_server_handled_total", &watch),
        1.0
    );
    let unknown = [
        ("grpc_service", "unknown"),
        ("grpc_method", "unknown"),
        ("grpc_code", "Unimplemented"),
    ];
    assert_eq!(
        after.value("grpc_server_handled_total", &unknown)
            - before.value("grpc_server_handled_total", &unknown),
        2.0
    );
    let services = after.label_values("grpc_server_handled_total", "grpc_service");
    assert!(
        services
            .iter()
            .all(|s| !s.contains("made.up") && !s.contains("Made.Up")),
        "{services:?}"
    );
}

/// `coresdk serve` with `envs`, read to its end after SIGTERM: its exit and its stdout lines.
fn run_and_stop(args: &[&str]) -> (bool, Vec<String>, String) {
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    let envs = vec![("STRIPE_WEBHOOK_SECRET".to_owned(), SECRET.to_owned())];
    let mut child = serve_command(&args, &envs, std::process::Stdio::piped())
        .spawn()
        .expect("the binary starts");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let mut seen = Vec::new();
    // The listening lines are written together; the first tells the start succeeded.
    if let Some(Ok(line)) = lines.next() {
        seen.push(line);
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
    }
    seen.extend(lines.map_while(Result::ok));
    let output = child.wait_with_output().expect("the sidecar ends");
    (
        output.status.success(),
        seen,
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn the_ops_listener_follows_the_side_listeners_start_rules() {
    // A chosen address that is taken fails the start, naming the setting.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("a port");
    let addr = taken.local_addr().expect("addr").to_string();
    let (ok, lines, stderr) = run_and_stop(&["--store", "memory", "--ops-listen", &addr]);
    assert!(!ok, "{lines:?}");
    assert!(stderr.contains("CORESDK_OPS_LISTEN"), "{stderr}");

    // Off: no ops listener is announced.
    let (ok, lines, stderr) = run_and_stop(&["--store", "memory", "--ops-listen", "off"]);
    assert!(ok, "{stderr}");
    assert!(lines[0].starts_with("coresdk listening on "), "{lines:?}");
    assert!(
        lines.iter().all(|line| !line.starts_with("coresdk ops")),
        "{lines:?}"
    );

    // The default address taken: the sidecar serves without it, and says why. Another test's
    // sidecar may hold it for a moment; this test holds it for the whole check.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let _default = loop {
        match std::net::TcpListener::bind(coresdk::settings::DEFAULT_OPS_LISTEN) {
            Ok(held) => break held,
            Err(e) => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "cannot take the default ops address: {e}"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    };
    let mut command = serve_command(
        &["--store".to_owned(), "memory".to_owned()],
        &[
            ("STRIPE_WEBHOOK_SECRET".to_owned(), SECRET.to_owned()),
            ("CORESDK_LOG".to_owned(), "warn".to_owned()),
        ],
        std::process::Stdio::piped(),
    );
    command.env_remove("CORESDK_OPS_LISTEN");
    let mut child = command.spawn().expect("the binary starts");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let first = lines.next().expect("a line").expect("readable");
    assert!(first.starts_with("coresdk listening on "), "{first}");
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let output = child.wait_with_output().expect("the sidecar ends");
    assert!(output.status.success());
    assert!(
        rest.iter().all(|line| !line.starts_with("coresdk ops")),
        "{rest:?}"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("ops is not served: its default address is taken"),
        "{stderr}"
    );
}

#[tokio::test]
async fn readyz_is_503_during_a_postgres_outage_and_200_after() {
    let server = OwnServer::start(OUTAGE_PG_PORT, OUTAGE_PG_DIR);
    let url = fresh_database(server.url.clone()).await;
    let (sidecar, ops) = common::ops::start(replica_options(&url)).await;
    assert_eq!(get(&ops, "/readyz").await.0, 200);
    let before = Scrape::of(&ops).await;

    stop_own_server(OUTAGE_PG_DIR);
    wait_for_health(
        &sidecar,
        "coresdk.v1.WebhookService",
        ServingStatus::NotServing,
    )
    .await;
    // The same source: the moment gRPC health says NOT_SERVING, so does /readyz.
    let (status, _, body) = get(&ops, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("coresdk.v1.WebhookService"), "{body}");
    assert!(!body.contains("coresdk.v1.FlagService"), "{body}");
    assert_eq!(get(&ops, "/livez").await.0, 200);

    // A tenant the cache cannot vouch for is decided by the fail mode (open by default).
    let mut auth = proto::auth_service_client::AuthServiceClient::new(sidecar.channel.clone());
    let unknown = auth
        .authorize(proto::AuthorizeRequest {
            tenant_id: "never-seen".into(),
            required_features: vec!["pro_features".into()],
            ..Default::default()
        })
        .await
        .expect("Authorize")
        .into_inner();
    assert!(unknown.fail_mode_applied);
    let during = Scrape::of(&ops).await;
    assert_eq!(
        during.value("coresdk_fail_mode_decisions_total", &[("mode", "open")])
            - before.value("coresdk_fail_mode_decisions_total", &[("mode", "open")]),
        1.0
    );

    start_own_server(OUTAGE_PG_PORT, OUTAGE_PG_DIR);
    wait_for_health(
        &sidecar,
        "coresdk.v1.WebhookService",
        ServingStatus::Serving,
    )
    .await;
    let (status, _, body) = get(&ops, "/readyz").await;
    assert_eq!(status, 200, "{body}");
    let after = Scrape::of(&ops).await;
    assert!(
        after.value("coresdk_postgres_feed_reconnects_total", &[])
            > before.value("coresdk_postgres_feed_reconnects_total", &[])
    );
    drop(server);
}
