//! Parsing and validating `coresdk serve`'s settings, from flags only (the environment is
//! ignored here, so a developer's shell cannot change the outcome).

use std::path::{Path, PathBuf};

use clap::{CommandFactory as _, FromArgMatches as _};

use super::*;
use crate::cli::Cli;

fn args(flags: &[&str]) -> ServeArgs {
    let matches = Cli::command()
        .mut_args(|arg| arg.env(None::<&str>))
        .try_get_matches_from(std::iter::once("coresdk").chain(flags.iter().copied()))
        .expect("flags parse");
    Cli::from_arg_matches(&matches).expect("matches").serve
}

fn config(flags: &[&str]) -> Config {
    Config::from_args(args(flags)).expect("valid configuration")
}

fn error(flags: &[&str]) -> ConfigError {
    Config::from_args(args(flags))
        .err()
        .expect("a configuration error")
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write");
    path
}

fn text(path: &Path) -> &str {
    path.to_str().expect("UTF-8 temp path")
}

#[test]
fn defaults_serve_sqlite_on_loopback_with_checkpoints_beside_the_database() {
    let config = config(&[]);
    assert_eq!(config.listen, "127.0.0.1:50051".parse().expect("addr"));
    assert_eq!(
        config.store,
        StoreUrl::Sqlite("./coresdk-data/coresdk.db".into())
    );
    assert_eq!(config.fail_mode, FailMode::Open);
    assert_eq!(config.log_format, LogFormat::Text);
    assert!(!config.mock);
    assert!(!config.verifier.has_secrets());
    assert!(config.operators.admin.is_none() && config.api_token.is_none());
    assert!(config.tenants.is_empty());
    assert!(!config.tenants_file_overrides);
    assert!(config.tls.is_none());
    assert_eq!(config.webhook_max_body_bytes, 1024 * 1024);
    assert_eq!(config.shutdown_grace, std::time::Duration::from_secs(10));
    assert_eq!(config.deny_audit_window, std::time::Duration::from_secs(60));
    assert_eq!(
        config.checkpoint_interval,
        std::time::Duration::from_secs(10)
    );
    assert_eq!(config.tokens.tenant_claim(), "tenant_id");
    assert_eq!(
        config.checkpoint_files,
        Some(CheckpointFiles {
            file: "./coresdk-data/coresdk.db.checkpoints".into(),
            key_file: "./coresdk-data/coresdk.db.audit-key".into(),
            origin: None,
            witnesses: Vec::new(),
        })
    );
}

#[test]
fn parsing_creates_nothing_even_where_the_key_will_go() {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = dir.path().join("data").join("coresdk.db");
    let config = config(&["--store", &format!("sqlite://{}", text(&db))]);
    let files = config.checkpoint_files.expect("checkpoints beside SQLite");
    assert_eq!(files.file, dir.path().join("data/coresdk.db.checkpoints"));
    assert_eq!(files.key_file, dir.path().join("data/coresdk.db.audit-key"));
    assert!(
        !dir.path().join("data").exists(),
        "parsing created the data directory"
    );
}

#[test]
fn opening_the_checkpoint_files_creates_the_key_once_and_then_reuses_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let files = CheckpointFiles {
        file: dir.path().join("cp"),
        key_file: dir.path().join("keys/audit-key"),
        origin: None,
        witnesses: Vec::new(),
    };
    let first = files.open().expect("creates the directory and the key");
    let again = files.open().expect("loads the key");
    assert_eq!(first.verifying_key(), again.verifying_key());
    assert_eq!(again.path(), dir.path().join("cp"));
}

#[test]
fn a_bad_checkpoint_key_names_the_key_setting() {
    let dir = tempfile::tempdir().expect("temp dir");
    let files = CheckpointFiles {
        file: dir.path().join("cp"),
        key_file: write(dir.path(), "key", "not a hex seed"),
        origin: None,
        witnesses: Vec::new(),
    };
    let error = files.open().err().expect("refused");
    assert_eq!(error.setting, "CORESDK_AUDIT_SIGNING_KEY_FILE");
}

#[test]
fn explicit_checkpoint_files_are_used_with_any_store_and_the_interval_is_at_least_10_ms() {
    for refused in ["0", "0.009", "-1", "NaN", "inf"] {
        assert_eq!(
            error(&[&format!("--audit-checkpoint-interval-s={refused}")]).setting,
            "CORESDK_AUDIT_CHECKPOINT_INTERVAL_S",
            "{refused}"
        );
    }
    assert_eq!(
        config(&["--store", "memory", "--audit-checkpoint-interval-s", "0.25"]).checkpoint_interval,
        std::time::Duration::from_millis(250)
    );
    let config = config(&[
        "--store",
        "memory",
        "--audit-checkpoint-file",
        "/elsewhere/cp",
        "--audit-signing-key-file",
        "/secrets/key",
        "--audit-checkpoint-interval-s",
        "2",
    ]);
    assert_eq!(
        config.checkpoint_files,
        Some(CheckpointFiles {
            file: "/elsewhere/cp".into(),
            key_file: "/secrets/key".into(),
            origin: None,
            witnesses: Vec::new(),
        })
    );
    assert_eq!(
        config.checkpoint_interval,
        std::time::Duration::from_secs(2)
    );
    assert!(
        self::config(&["--store", "memory"])
            .checkpoint_files
            .is_none()
    );
    assert!(
        self::config(&["--store", "postgres://u@127.0.0.1/db"])
            .checkpoint_files
            .is_none()
    );
}

#[test]
fn mock_mode_has_a_memory_store_seeded_tenants_and_the_test_secret() {
    let config = config(&["--mock", "--store", "sqlite:///ignored/in/mock/mode.db"]);
    assert!(config.mock);
    assert_eq!(config.store, StoreUrl::Memory);
    assert!(config.verifier.has_secrets());
    assert!(config.checkpoint_files.is_none());
    for (customer, tenant) in MOCK_TENANTS {
        assert_eq!(
            config.tenants.get(customer).map(String::as_str),
            Some(tenant)
        );
    }
    assert!(self::config(&["--mock=false"]).store != StoreUrl::Memory);
}

#[test]
fn webhook_secrets_come_from_the_flag_and_from_a_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = write(dir.path(), "secret", "whsec_one\n whsec_two ,\n");
    assert!(
        config(&["--webhook-secret-file", text(&file)])
            .verifier
            .has_secrets()
    );
    assert!(
        config(&["--webhook-secret", "whsec_a,whsec_b"])
            .verifier
            .has_secrets()
    );

    let empty = write(dir.path(), "empty", " \n,\n");
    let e = error(&["--webhook-secret-file", text(&empty)]);
    assert_eq!(e.setting, "STRIPE_WEBHOOK_SECRET_FILE");
    assert!(e.message.contains("holds no secret"), "{e}");
}

#[test]
fn tls_needs_both_halves_and_reads_them_at_parse_time() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cert = write(dir.path(), "cert.pem", "CERT");
    let key = write(dir.path(), "key.pem", "KEY");
    let ca = write(dir.path(), "ca.pem", "CA");
    let config = config(&[
        "--tls-cert-file",
        text(&cert),
        "--tls-key-file",
        text(&key),
        "--tls-client-ca-file",
        text(&ca),
    ]);
    let tls = config.tls.expect("TLS on");
    assert_eq!(
        (tls.cert.as_slice(), tls.key.as_slice()),
        (&b"CERT"[..], &b"KEY"[..])
    );
    assert_eq!(tls.client_ca.as_deref(), Some(&b"CA"[..]));

    assert_eq!(
        error(&["--tls-cert-file", text(&cert)]).setting,
        "CORESDK_TLS_KEY_FILE"
    );
    assert_eq!(
        error(&["--tls-key-file", text(&key)]).setting,
        "CORESDK_TLS_CERT_FILE"
    );
    assert_eq!(
        error(&["--tls-client-ca-file", text(&ca)]).setting,
        "CORESDK_TLS_CLIENT_CA_FILE"
    );
}

#[test]
fn a_tenants_file_is_validated_and_added_to_the_mock_tenants() {
    let dir = tempfile::tempdir().expect("temp dir");
    let good = write(dir.path(), "tenants.json", r#"{"cus_new": "new-co"}"#);
    let config = config(&["--mock", "--tenants-file", text(&good)]);
    assert_eq!(config.tenants.len(), MOCK_TENANTS.len() + 1);
    assert_eq!(
        config.tenants.get("cus_new").map(String::as_str),
        Some("new-co")
    );

    for bad in [r#"["cus_a"]"#, r#"{"cus_a": 1}"#, r#"{"cus a": "x"}"#, "{"] {
        let file = write(dir.path(), "bad.json", bad);
        let e = error(&["--tenants-file", text(&file)]);
        assert_eq!(e.setting, "CORESDK_TENANTS_FILE", "{bad}: {e}");
    }
}

#[test]
fn every_validated_setting_names_itself_when_its_value_is_bad() {
    let dir = tempfile::tempdir().expect("temp dir");
    let missing = dir.path().join("missing");
    let missing = text(&missing);
    let short_jwt = write(dir.path(), "short-jwt", "too-short");
    let short_jwt = text(&short_jwt);
    // A valid witness key: refused only without checkpoints.
    let witness = crate::checkpoint::verifier_key(
        "witness.example/w1",
        &ed25519_dalek::SigningKey::from_bytes(&[1; 32]).verifying_key(),
    );
    let cases: &[(&[&str], &str)] = &[
        (&["--store", "mysql://x"], "CORESDK_STORE"),
        (&["--store", "sqlite://"], "CORESDK_STORE"),
        (
            &["--webhook-secret-file", missing],
            "STRIPE_WEBHOOK_SECRET_FILE",
        ),
        (
            &["--webhook-max-body-bytes", "0"],
            "CORESDK_WEBHOOK_MAX_BODY_BYTES",
        ),
        (
            &["--webhook-max-body-bytes", "67108865"],
            "CORESDK_WEBHOOK_MAX_BODY_BYTES",
        ),
        (
            &["--problem-type-base", "problems"],
            "CORESDK_PROBLEM_TYPE_BASE",
        ),
        (&["--admin-token", "short"], "CORESDK_ADMIN_TOKEN"),
        (&["--admin-token", "   "], "CORESDK_ADMIN_TOKEN"),
        (&["--api-token", "short"], "CORESDK_API_TOKEN"),
        (&["--jwt-secret", "short"], "CORESDK_JWT_SECRET"),
        (&["--jwt-secret-file", missing], "CORESDK_JWT_SECRET_FILE"),
        (&["--jwt-secret-file", short_jwt], "CORESDK_JWT_SECRET_FILE"),
        (
            &["--jwt-public-key-file", missing],
            "CORESDK_JWT_PUBLIC_KEY_FILE",
        ),
        (&["--jwks-file", missing], "CORESDK_JWKS_FILE"),
        (&["--billing-url", "billing"], "CORESDK_BILLING_URL"),
        (&["--upgrade-url", "ftp://x"], "CORESDK_UPGRADE_URL"),
        (&["--rules-file", missing], "CORESDK_RULES_FILE"),
        (&["--tenants-file", missing], "CORESDK_TENANTS_FILE"),
        (
            &["--store", "memory", "--audit-checkpoint-file", "/cp"],
            "CORESDK_AUDIT_SIGNING_KEY_FILE",
        ),
        (&["--audit-origin", "two words"], "CORESDK_AUDIT_ORIGIN"),
        (&["--audit-origin", "a+b"], "CORESDK_AUDIT_ORIGIN"),
        (
            &["--store", "memory", "--audit-origin", "x"],
            "CORESDK_AUDIT_ORIGIN",
        ),
        (
            &["--audit-witness-key", "w+00000000+AQ=="],
            "CORESDK_AUDIT_WITNESS_KEYS",
        ),
        (
            &["--store", "memory", "--audit-witness-key", &witness],
            "CORESDK_AUDIT_WITNESS_KEYS",
        ),
    ];
    for (flags, setting) in cases {
        let e = error(flags);
        assert_eq!(e.setting, *setting, "{flags:?}: {e}");
    }
}

#[test]
fn secrets_never_appear_in_errors() {
    let e = error(&["--admin-token", "short-secret"]);
    assert!(!e.to_string().contains("short-secret"), "{e}");
    let e = error(&["--jwt-secret", "hmac-secret-too-short"]);
    assert!(!e.to_string().contains("hmac-secret-too-short"), "{e}");
}

#[test]
fn tokens_are_trimmed_like_a_mounted_secret_file() {
    let config = config(&[
        "--admin-token",
        "admin-token-0123456789\n",
        "--api-token",
        " api-token-0123456789\r\n",
    ]);
    let current = |token: &Option<Secret<String>>| token.as_ref().map(|t| t.with(String::clone));
    assert_eq!(
        current(&config.operators.admin).as_deref(),
        Some("admin-token-0123456789")
    );
    assert_eq!(
        current(&config.api_token).as_deref(),
        Some("api-token-0123456789")
    );
    // Length counts what is left once trimmed.
    let e = error(&["--admin-token", "short-token\n\n\n\n\n\n"]);
    assert_eq!(e.setting, "CORESDK_ADMIN_TOKEN");
    let e = error(&["--api-token", "\n"]);
    assert!(e.message.contains("empty"), "{e}");
}

#[test]
fn a_postgres_url_is_checked_when_parsed() {
    for (url, says) in [
        ("postgres://u@127.0.0.1/db?pool_size=0", "pool_size"),
        ("postgres://u@127.0.0.1/db?pool_size=1", "between 2 and 64"),
        ("postgres://u@127.0.0.1/db?sslmode=requir", "sslmode=requir"),
        (
            "postgres://u@127.0.0.1/db?sslmode=require",
            "CORESDK_POSTGRES_CA_FILE",
        ),
    ] {
        let refused = error(&["--store", url]);
        assert_eq!(refused.setting, "CORESDK_STORE");
        assert!(refused.message.contains(says), "{url}: {}", refused.message);
    }
}

#[test]
fn streams_are_capped_at_a_positive_number() {
    assert_eq!(config(&[]).max_streams, 1024);
    assert_eq!(config(&["--max-streams", "5"]).max_streams, 5);
    assert_eq!(
        error(&["--max-streams", "0"]).setting,
        "CORESDK_MAX_STREAMS"
    );
}

#[test]
fn parking_limits_default_accept_zero_and_refuse_absurd_values() {
    let defaults = ["--store", "memory"];
    assert_eq!(config(&defaults).parking, ParkingLimits::DEFAULT);
    let off = config(&[
        "--store",
        "memory",
        "--max-parked-events",
        "0",
        "--max-parked-events-per-customer",
        "0",
    ]);
    assert_eq!(
        off.parking,
        ParkingLimits {
            max_events: 0,
            max_per_customer: 0
        }
    );
    for (flag, setting) in [
        ("--max-parked-events", "CORESDK_MAX_PARKED_EVENTS"),
        (
            "--max-parked-events-per-customer",
            "CORESDK_MAX_PARKED_EVENTS_PER_CUSTOMER",
        ),
    ] {
        let e = error(&["--store", "memory", flag, "10000001"]);
        assert_eq!(e.setting, setting, "{e}");
    }
}

#[test]
fn the_openfeature_listeners_default_to_flagds_ports_and_can_be_turned_off() {
    let defaults = config(&[]);
    assert_eq!(
        defaults.flagd_listen,
        Some("127.0.0.1:8013".parse().expect("addr"))
    );
    assert_eq!(
        defaults.flagd_sync_listen,
        Some("127.0.0.1:8015".parse().expect("addr"))
    );
    assert_eq!(
        defaults.ofrep_listen,
        Some("127.0.0.1:8016".parse().expect("addr"))
    );
    assert_eq!(defaults.openfeature_tenant_attribute, "tenant_id");
    assert_eq!(
        defaults.flagd_keep_alive,
        std::time::Duration::from_secs(30)
    );
    // An address given, even the default one, is chosen: taken, it fails the start.
    assert!(defaults.listens_by_default(SideListener::Flagd));
    assert!(!config(&["--flagd-listen", "127.0.0.1:8013"]).listens_by_default(SideListener::Flagd));
    assert_eq!(config(&["--flagd-listen", "off"]).flagd_listen, None);
    assert_eq!(config(&["--flagd-listen", "OFF"]).flagd_listen, None);
    // Ephemeral ports may both be 0; one fixed port cannot serve both.
    assert!(
        config(&["--listen", "127.0.0.1:0", "--flagd-listen", "127.0.0.1:0"])
            .flagd_listen
            .is_some()
    );
    let same = error(&[
        "--listen",
        "127.0.0.1:9000",
        "--flagd-listen",
        "127.0.0.1:9000",
    ]);
    assert_eq!(same.setting, "CORESDK_FLAGD_LISTEN");
    let shared = error(&[
        "--flagd-listen",
        "127.0.0.1:9001",
        "--ofrep-listen",
        "127.0.0.1:9001",
    ]);
    assert_eq!(shared.setting, "CORESDK_OFREP_LISTEN");
    assert!(shared.message.contains("CORESDK_FLAGD_LISTEN"), "{shared}");
    let blank = error(&["--openfeature-tenant-attribute", " "]);
    assert_eq!(blank.setting, "CORESDK_OPENFEATURE_TENANT_ATTRIBUTE");
    let keep_alive = error(&["--flagd-keep-alive-s", "0"]);
    assert_eq!(keep_alive.setting, "CORESDK_FLAGD_KEEP_ALIVE_S");
}

#[test]
fn the_ops_listener_defaults_to_loopback_9464_follows_the_side_listener_rules_and_can_be_turned_off()
 {
    let defaults = config(&[]);
    assert_eq!(
        defaults.ops_listen,
        Some("127.0.0.1:9464".parse().expect("addr"))
    );
    assert!(defaults.listens_by_default(SideListener::Ops));
    let chosen = config(&["--ops-listen", "0.0.0.0:9464"]);
    assert_eq!(chosen.listen_of(SideListener::Ops), chosen.ops_listen);
    assert!(!chosen.listens_by_default(SideListener::Ops));
    assert_eq!(config(&["--ops-listen", "off"]).ops_listen, None);
    let shared = error(&[
        "--ofrep-listen",
        "127.0.0.1:9002",
        "--ops-listen",
        "127.0.0.1:9002",
    ]);
    assert_eq!(shared.setting, "CORESDK_OPS_LISTEN");
    assert!(shared.message.contains("CORESDK_OFREP_LISTEN"), "{shared}");
}

#[test]
fn drain_and_server_limits_default_and_are_validated() {
    use std::time::Duration;
    let defaults = config(&[]);
    assert_eq!(defaults.shutdown_delay, Duration::from_secs(5));
    assert_eq!(
        defaults.limits,
        ServerLimits {
            request_timeout: Some(Duration::from_secs(30)),
            max_concurrent_per_connection: 100,
            http2_keepalive_interval: Some(Duration::from_secs(30)),
            http2_keepalive_timeout: Duration::from_secs(10),
        }
    );
    let off = config(&[
        "--shutdown-delay-s=0",
        "--request-timeout-s=0",
        "--http2-keepalive-interval-s=0",
        "--http2-keepalive-timeout-s=0.5",
    ]);
    assert_eq!(off.shutdown_delay, Duration::ZERO);
    assert_eq!(off.limits.request_timeout, None);
    assert_eq!(off.limits.http2_keepalive_interval, None);
    assert_eq!(
        off.limits.http2_keepalive_timeout,
        Duration::from_millis(500)
    );
    for (flag, setting) in [
        ("--shutdown-delay-s=-1", "CORESDK_SHUTDOWN_DELAY_S"),
        ("--shutdown-delay-s=7200", "CORESDK_SHUTDOWN_DELAY_S"),
        ("--request-timeout-s=0.001", "CORESDK_REQUEST_TIMEOUT_S"),
        ("--request-timeout-s=NaN", "CORESDK_REQUEST_TIMEOUT_S"),
        (
            "--max-concurrent-per-connection=0",
            "CORESDK_MAX_CONCURRENT_PER_CONNECTION",
        ),
        (
            "--http2-keepalive-interval-s=inf",
            "CORESDK_HTTP2_KEEPALIVE_INTERVAL_S",
        ),
        (
            "--http2-keepalive-timeout-s=0",
            "CORESDK_HTTP2_KEEPALIVE_TIMEOUT_S",
        ),
    ] {
        assert_eq!(error(&[flag]).setting, setting, "{flag}");
    }
}

#[test]
fn dedup_retention_is_whole_days_and_off_or_zero_keeps_records_forever() {
    const DAY: std::time::Duration = std::time::Duration::from_secs(86_400);
    assert_eq!(config(&[]).dedup_retention, Some(35 * DAY));
    assert_eq!(
        config(&["--dedup-retention-days", "7"]).dedup_retention,
        Some(7 * DAY)
    );
    for off in ["0", "off", "OFF"] {
        assert_eq!(
            config(&["--dedup-retention-days", off]).dedup_retention,
            None
        );
    }
    for bad in ["", "1.5", "-1", "1", "3", "3651", "forever"] {
        let flag = format!("--dedup-retention-days={bad}");
        let e = error(&[&flag]);
        assert_eq!(e.setting, "CORESDK_DEDUP_RETENTION_DAYS", "{bad:?}");
    }
}

#[test]
fn token_files_are_checked_like_the_tokens_and_exclude_them() {
    let dir = tempfile::tempdir().expect("temp dir");
    let good = write(dir.path(), "admin", "admin-token-0123456789\n");
    let api = write(dir.path(), "api", "api-token-0123456789\n");
    let short = write(dir.path(), "short", "short\n");
    let config = config(&[
        "--admin-token-file",
        text(&good),
        "--api-token-file",
        text(&api),
    ]);
    assert!(matches!(config.operators.admin, Some(Secret::File(_))));
    assert_eq!(
        config.api_token.map(|t| t.with(String::clone)).as_deref(),
        Some("api-token-0123456789")
    );
    // One token for both would make every app an admin, however each is given.
    for flags in [
        [
            "--admin-token-file",
            text(&good),
            "--api-token-file",
            text(&good),
        ],
        [
            "--admin-token",
            " admin-token-0123456789",
            "--api-token-file",
            text(&good),
        ],
    ] {
        let e = error(&flags);
        assert_eq!(e.setting, "CORESDK_ADMIN_TOKEN");
        assert!(
            e.message.contains("CORESDK_API_TOKEN") && !e.message.contains("admin-token-0"),
            "{e}"
        );
    }
    let e = error(&["--admin-token-file", text(&short)]);
    assert_eq!(e.setting, "CORESDK_ADMIN_TOKEN_FILE");
    assert!(
        e.message.contains("at least 16") && !e.message.contains("short\n"),
        "{e}"
    );
    let e = error(&["--api-token-file", text(&dir.path().join("missing"))]);
    assert_eq!(e.setting, "CORESDK_API_TOKEN_FILE");
    assert!(
        Cli::command()
            .mut_args(|arg| arg.env(None::<&str>))
            .try_get_matches_from([
                "coresdk",
                "--admin-token",
                "admin-token-0123456789",
                "--admin-token-file",
                text(&good),
            ])
            .is_err(),
        "a token and a token file are one too many"
    );
}

#[test]
fn the_origin_and_witness_keys_go_with_the_checkpoints() {
    let witness = crate::checkpoint::verifier_key(
        "witness.example/w1",
        &ed25519_dalek::SigningKey::from_bytes(&[1; 32]).verifying_key(),
    );
    let files = config(&[
        "--audit-origin",
        "example.com/ledger",
        "--audit-witness-key",
        &witness,
    ])
    .checkpoint_files
    .expect("checkpoints beside SQLite");
    assert_eq!(files.origin.as_deref(), Some("example.com/ledger"));
    assert_eq!(
        files.witnesses,
        vec![crate::checkpoint::WitnessKey::parse(&witness).expect("a witness key")]
    );
}
