//! OpenTelemetry traces against the real binary, without a collector: which variables turn them
//! on, the trace in every problem's `instance` and in the log, and that a collector nobody
//! listens at neither slows calls nor holds the exit. (clients/python/tests/test_tracing.py
//! receives the spans themselves.)

mod common;

use std::io::{BufRead as _, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{Options, Sidecar, problem, signed};
use coresdk::proto::{
    AuthorizeRequest, GetFlagRequest, auth_service_client::AuthServiceClient,
    flag_service_client::FlagServiceClient,
};

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_SPAN_ID: &str = "00f067aa0ba902b7";

/// An address where nothing listens: a collector that is down.
fn dead_endpoint() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    let port = listener.local_addr().expect("bound").port();
    drop(listener);
    format!("http://127.0.0.1:{port}")
}

fn traced(extra: &[(&str, &str)]) -> Options {
    let mut options = Options::default();
    options.envs.extend([
        ("OTEL_EXPORTER_OTLP_ENDPOINT".to_owned(), dead_endpoint()),
        ("OTEL_BSP_SCHEDULE_DELAY".to_owned(), "50".to_owned()),
    ]);
    options.envs.extend(
        extra
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    );
    options
}

fn with_traceparent<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{TRACE_ID}-{PARENT_SPAN_ID}-01")
            .parse()
            .expect("ascii"),
    );
    request
}

fn missing_flag() -> GetFlagRequest {
    GetFlagRequest {
        tenant_id: "acme".into(),
        key: "no_such_flag".into(),
    }
}

/// The trace and span ids of a `urn:coresdk:trace:<trace>:<span>` instance.
fn trace_of(instance: &str) -> (String, String) {
    let rest = instance
        .strip_prefix("urn:coresdk:trace:")
        .unwrap_or_else(|| panic!("a trace instance, got {instance:?}"));
    let (trace, span) = rest.split_once(':').expect("trace:span");
    let hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    assert!(hex(trace, 32) && hex(span, 16), "{instance}");
    (trace.to_owned(), span.to_owned())
}

#[tokio::test]
async fn with_traces_on_every_problem_names_the_callers_trace_and_its_own_span() {
    let sidecar = Sidecar::start(traced(&[])).await;
    let mut flags = sidecar.flags();

    let first = flags
        .get_flag(with_traceparent(missing_flag()))
        .await
        .expect_err("no such flag");
    let (trace, span) = trace_of(&problem(&first).instance);
    assert_eq!(trace, TRACE_ID, "the caller's trace continues");
    assert_ne!(
        span, PARENT_SPAN_ID,
        "the sidecar's own span, not the caller's"
    );

    // A caller that reuses its traceparent still tells its calls apart.
    let again = flags
        .get_flag(with_traceparent(missing_flag()))
        .await
        .expect_err("no such flag");
    let (trace_again, span_again) = trace_of(&problem(&again).instance);
    assert_eq!(trace_again, TRACE_ID);
    assert_ne!(span_again, span);

    // No traceparent: a trace of the sidecar's own.
    let untraced = flags
        .get_flag(missing_flag())
        .await
        .expect_err("no such flag");
    let (own, _) = trace_of(&problem(&untraced).instance);
    assert_ne!(own, TRACE_ID);
    assert_ne!(own, "0".repeat(32));

    // A forged webhook: refused before anything reaches the store, still traced.
    let mut forged = signed("whsec_not_the_secret", b"{}".to_vec());
    forged.signature_header.push('0');
    let refused = sidecar
        .webhooks()
        .handle_stripe_webhook(with_traceparent(forged))
        .await
        .expect_err("forged");
    assert_eq!(trace_of(&problem(&refused).instance).0, TRACE_ID);
}

#[tokio::test]
async fn a_denial_keeps_the_callers_resource_and_adds_the_trace() {
    let sidecar = Sidecar::start(traced(&[])).await;
    let mut auth = AuthServiceClient::new(sidecar.channel.clone());
    let ask = |resource: &str| AuthorizeRequest {
        tenant_id: "acme".into(),
        required_features: vec!["pro_features".into()],
        resource: resource.into(),
        ..Default::default()
    };
    let answer = auth
        .authorize(with_traceparent(ask("GET /api/reports")))
        .await
        .expect("Authorize answers")
        .into_inner();
    let denied = answer.problem.expect("pro_features is off");
    assert_eq!(denied.instance, "GET /api/reports");
    let trace = denied
        .extensions
        .as_ref()
        .and_then(|e| e.fields.get("trace"))
        .and_then(|v| match &v.kind {
            Some(prost_types::value::Kind::StringValue(s)) => Some(s.clone()),
            _ => None,
        })
        .expect("a trace member");
    assert_eq!(trace_of(&trace).0, TRACE_ID);

    // Without a resource, the trace is the instance.
    let answer = auth
        .authorize(with_traceparent(ask("")))
        .await
        .expect("Authorize answers")
        .into_inner();
    let denied = answer.problem.expect("pro_features is off");
    assert_eq!(trace_of(&denied.instance).0, TRACE_ID);
}

#[tokio::test]
async fn without_an_endpoint_or_when_disabled_problems_are_as_before() {
    for options in [
        Options::default(),
        traced(&[("OTEL_SDK_DISABLED", "true")]),
        traced(&[("OTEL_TRACES_EXPORTER", "none")]),
    ] {
        let envs = options.envs.clone();
        let sidecar = Sidecar::start(options).await;
        let missing = FlagServiceClient::new(sidecar.channel.clone())
            .get_flag(with_traceparent(missing_flag()))
            .await
            .expect_err("no such flag");
        assert_eq!(problem(&missing).instance, "", "{envs:?}");
        let answer = AuthServiceClient::new(sidecar.channel.clone())
            .authorize(AuthorizeRequest {
                tenant_id: "acme".into(),
                required_features: vec!["pro_features".into()],
                ..Default::default()
            })
            .await
            .expect("Authorize answers")
            .into_inner();
        let denied = answer.problem.expect("pro_features is off");
        assert_eq!(denied.instance, "", "{envs:?}");
        assert!(
            !denied
                .extensions
                .is_some_and(|e| e.fields.contains_key("trace")),
            "{envs:?}"
        );
    }
}

#[test]
fn an_unusable_trace_setting_stops_the_start_with_one_line_naming_it() {
    for (var, value, named) in [
        (
            "OTEL_EXPORTER_OTLP_PROTOCOL",
            "http/protobuf",
            "OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf",
        ),
        (
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
            "http/json",
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL=http/json",
        ),
        (
            "OTEL_TRACES_EXPORTER",
            "zipkin",
            "OTEL_TRACES_EXPORTER=zipkin",
        ),
        (
            "OTEL_EXPORTER_OTLP_COMPRESSION",
            "gzip",
            "OTEL_EXPORTER_OTLP_COMPRESSION=gzip",
        ),
    ] {
        let endpoint = dead_endpoint();
        let stderr = common::refused_at_start(
            None,
            &["serve", "--listen", "127.0.0.1:0", "--store", "memory"],
            &[("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint), (var, value)],
            named,
        );
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    }
    let output = common::run_coresdk(
        None,
        &["serve", "--listen", "127.0.0.1:0", "--store", "memory"],
        &[(
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "https://collector.example:4317",
        )],
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=https://collector.example:4317"),
        "{stderr}"
    );
}

/// A traced sidecar whose log lines (`CORESDK_LOG=info`, plus `extra`) arrive on the receiver,
/// and its address.
fn started_with_logs(
    extra: &[(&str, &str)],
) -> (
    std::process::Child,
    String,
    std::sync::mpsc::Receiver<String>,
) {
    let mut command = common::serve_command(
        &["--store".to_owned(), "memory".to_owned()],
        &traced(extra).envs,
        Stdio::piped(),
    );
    command.env("CORESDK_LOG", "info");
    let mut child = command.spawn().expect("starts");
    let stderr = child.stderr.take().expect("piped");
    let (lines_tx, lines_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    let stdout = child.stdout.take().expect("piped");
    let mut stdout = BufReader::new(stdout).lines();
    let addr = loop {
        let line = stdout.next().expect("announced").expect("readable");
        if let Some(addr) = line.strip_prefix("coresdk listening on ") {
            break addr.to_owned();
        }
    };
    std::thread::spawn(move || for _ in stdout {});
    (child, addr, lines_rx)
}

/// The first line containing `wanted` within 10 s.
fn logged(lines: &std::sync::mpsc::Receiver<String>, wanted: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let line = lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| panic!("never logged: {wanted}"));
        if line.contains(wanted) {
            return line;
        }
    }
}

#[tokio::test]
async fn log_lines_inside_a_call_carry_its_trace_id() {
    let (mut child, addr, lines_rx) = started_with_logs(&[("CORESDK_LOG_FORMAT", "json")]);
    let channel = common::connect(&addr).await;

    let mut forged = signed("whsec_not_the_secret", b"{}".to_vec());
    forged.signature_header.push('0');
    let refusal = coresdk::proto::webhook_service_client::WebhookServiceClient::new(channel)
        .handle_stripe_webhook(with_traceparent(forged))
        .await
        .expect_err("forged");
    let (_, instance_span) = trace_of(&problem(&refusal).instance);

    let refused = logged(&lines_rx, "webhook refused");
    let line: serde_json::Value = serde_json::from_str(&refused).expect("a JSON log line");
    assert_eq!(line["span"]["trace_id"], TRACE_ID, "{refused}");
    // The user's problem and the log line name the same span.
    assert_eq!(line["span"]["span_id"], instance_span.as_str(), "{refused}");
    let _ = child.kill();
    let _ = child.wait();
}

/// A wrong or dead endpoint must not look like working traces: the failed exports are logged.
#[tokio::test]
async fn spans_a_dead_collector_cannot_take_are_reported_in_the_log() {
    let (mut child, addr, lines_rx) = started_with_logs(&[]);
    let mut flags =
        coresdk::proto::flag_service_client::FlagServiceClient::new(common::connect(&addr).await);
    flags
        .get_flag(with_traceparent(missing_flag()))
        .await
        .expect_err("no such flag");
    let warning = logged(&lines_rx, "could not be sent to the trace collector");
    assert!(warning.contains("WARN"), "{warning}");
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test]
async fn a_dead_collector_neither_holds_calls_nor_the_exit() {
    a_collector_that_never_answers(traced(&[])).await;
}

#[tokio::test]
async fn a_silent_collector_neither_holds_calls_nor_the_exit() {
    // Connections complete in the kernel's backlog and then hear nothing: each export hangs
    // until its timeout.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    let endpoint = format!("http://{}", silent.local_addr().expect("bound"));
    let mut options = traced(&[]);
    for (name, value) in &mut options.envs {
        if name == "OTEL_EXPORTER_OTLP_ENDPOINT" {
            value.clone_from(&endpoint);
        }
    }
    a_collector_that_never_answers(options).await;
    drop(silent);
}

async fn a_collector_that_never_answers(mut options: Options) {
    options.envs.extend([
        // An export that would wait long if anything waited for it.
        ("OTEL_EXPORTER_OTLP_TIMEOUT".to_owned(), "30000".to_owned()),
        ("OTEL_BSP_MAX_QUEUE_SIZE".to_owned(), "16".to_owned()),
    ]);
    let mut sidecar = Sidecar::start(options).await;
    let mut flags = sidecar.flags();
    // Far more spans than the queue holds, across several export rounds.
    for _ in 0..200 {
        flags
            .get_flag(with_traceparent(missing_flag()))
            .await
            .expect_err("no such flag");
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let answered = tokio::time::timeout(
        Duration::from_secs(5),
        flags.get_flag(with_traceparent(missing_flag())),
    )
    .await
    .expect("answers while the collector is down");
    assert!(answered.is_err(), "no such flag");

    // The stop flushes what is queued, for a bounded time, and exits cleanly.
    let pid = sidecar.pid();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done_tx.send(sidecar.stop());
    });
    let status = done_rx
        .recv_timeout(Duration::from_secs(15))
        .unwrap_or_else(|_| panic!("sidecar {pid} still running 15 s after SIGTERM"));
    assert!(status.success(), "{status:?}");
}
