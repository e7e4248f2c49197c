//! Input limits against the real binary: ids that display as something else, tenant claims a
//! token issuer got wrong, events created in the far future, tokens with a trailing newline,
//! and `coresdk health` against a TLS listener.
mod common;

use std::io::{BufRead as _, BufReader, Read as _};
use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::inputs::spawn_tls;
use common::*;
use coresdk::proto::{
    self, AuthorizeRequest, Decision, GetFlagRequest, VerifyTokenRequest, WebhookOutcome,
    auth_service_client::AuthServiceClient, flag_value::Kind,
};
use serde_json::json;
use tonic::Code;

/// A tenant id that displays as `acmeproc`: U+202E reverses what follows it.
const SPOOFED_TENANT: &str = "acme\u{202E}corp";
const JWT_SECRET: &str = "input-limits-hmac-secret-0123456789abcdef";

fn auth(sidecar: &Sidecar) -> AuthServiceClient<tonic::transport::Channel> {
    AuthServiceClient::new(sidecar.channel.clone())
}

fn hs256(claims: serde_json::Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .expect("encodes")
}

fn token_for_tenant(tenant: &str) -> String {
    hs256(json!({"sub": "user-1", "tenant_id": tenant, "exp": now() + 600}))
}

#[tokio::test]
async fn tenant_ids_with_bidi_or_zero_width_characters_are_invalid_arguments() {
    let sidecar = Sidecar::mock().await;
    for tenant in [SPOOFED_TENANT, "acme\u{200B}corp", "\u{FEFF}acme-corp"] {
        let get = sidecar
            .flags()
            .get_flag(GetFlagRequest {
                tenant_id: tenant.into(),
                key: "pro_features".into(),
            })
            .await
            .expect_err("refused");
        assert_eq!(get.code(), Code::InvalidArgument, "{tenant:?}: {get:?}");
        let authorize = auth(&sidecar)
            .authorize(AuthorizeRequest {
                tenant_id: tenant.into(),
                ..Default::default()
            })
            .await
            .expect_err("refused");
        assert_eq!(authorize.code(), Code::InvalidArgument, "{tenant:?}");
        assert!(
            problem(&authorize).detail.contains("tenant_id"),
            "{:?}",
            problem(&authorize)
        );
    }
    // Letters of any script are still ids.
    let accented = sidecar
        .flags()
        .get_flag(GetFlagRequest {
            tenant_id: "müller-gmbh".into(),
            key: "pro_features".into(),
        })
        .await;
    assert!(accented.is_ok(), "{accented:?}");
}

#[tokio::test]
async fn a_verified_token_with_a_bad_tenant_claim_is_not_accepted() {
    let sidecar = Sidecar::start(Options {
        args: vec!["--mock".into()],
        envs: vec![("CORESDK_JWT_SECRET".into(), JWT_SECRET.into())],
    })
    .await;
    let good = auth(&sidecar)
        .authorize(AuthorizeRequest {
            token: token_for_tenant("acme-corp"),
            ..Default::default()
        })
        .await
        .expect("answers")
        .into_inner();
    assert_eq!(
        (good.decision(), good.tenant_id.as_str()),
        (Decision::Allow, "acme-corp")
    );

    for tenant in [SPOOFED_TENANT.to_owned(), String::new(), "t".repeat(200)] {
        let token = token_for_tenant(&tenant);
        let decided = auth(&sidecar)
            .authorize(AuthorizeRequest {
                token: token.clone(),
                ..Default::default()
            })
            .await
            .expect("answers")
            .into_inner();
        assert_eq!(decided.decision(), Decision::Deny, "{tenant:?}");
        let denial = decided.problem.expect("a problem");
        assert_eq!(denial.status, 401, "{tenant:?}");
        assert!(
            denial
                .detail
                .contains("'tenant_id' is not a valid tenant id"),
            "{denial:?}"
        );
        assert!(
            !denial.detail.contains(&tenant) || tenant.is_empty(),
            "the claim is not echoed: {denial:?}"
        );

        let refused = auth(&sidecar)
            .verify_token(VerifyTokenRequest { token })
            .await
            .expect_err("VerifyToken refuses it");
        assert_eq!(refused.code(), Code::Unauthenticated, "{tenant:?}");
        assert!(
            problem(&refused).detail.contains("tenant_id"),
            "{:?}",
            problem(&refused)
        );
    }
}

#[tokio::test]
async fn an_event_created_in_the_far_future_is_refused_and_later_events_still_apply() {
    let sidecar = Sidecar::mock().await;
    let send = |body: Vec<u8>| {
        let mut webhooks = sidecar.webhooks();
        async move {
            webhooks
                .handle_stripe_webhook(signed("whsec_test_secret", body))
                .await
                .map(|r| r.into_inner())
        }
    };
    let future = send(event(
        "evt_far_future",
        "invoice.payment_failed",
        i64::MAX,
        json!({"customer": "cus_acme_001"}),
    ))
    .await
    .expect_err("refused");
    assert_eq!(future.code(), Code::InvalidArgument);
    assert_eq!(error_reason(&future), "INVALID_EVENT");
    assert_eq!(problem(&future).status, 400);
    assert!(
        problem(&future).detail.contains("created"),
        "{:?}",
        problem(&future)
    );

    let paid = send(event(
        "evt_after_future",
        "invoice.paid",
        now(),
        json!({"customer": "cus_acme_001"}),
    ))
    .await
    .expect("accepted");
    assert_eq!(paid.outcome(), WebhookOutcome::Applied);
    assert!(paid.stale_flags.is_empty(), "{paid:?}");
    assert!(is_on(&sidecar, "acme-corp", "pro_features").await);
}

#[tokio::test]
async fn an_admin_token_with_a_trailing_newline_still_admits_admins() {
    let sidecar = Sidecar::start(Options {
        args: vec!["--store".into(), "memory".into()],
        envs: vec![
            ("STRIPE_WEBHOOK_SECRET".into(), SECRET.into()),
            ("CORESDK_ADMIN_TOKEN".into(), format!("{ADMIN_TOKEN}\n")),
        ],
    })
    .await;
    let set = sidecar
        .flags()
        .set_flag(admin(proto::SetFlagRequest {
            tenant_id: "acme".into(),
            key: "pro_features".into(),
            value: Some(proto::FlagValue {
                kind: Some(Kind::BoolValue(true)),
            }),
            actor: "ops@example.com".into(),
            reason: String::new(),
        }))
        .await;
    assert!(set.is_ok(), "{set:?}");
}

fn health(args: &[&str]) -> Output {
    Command::new(binary())
        .arg("health")
        .args(args)
        .env_clear()
        .output()
        .expect("coresdk health runs")
}

#[test]
fn health_probes_a_tls_listener_with_the_right_ca() {
    let dir = tempfile::tempdir().expect("temp dir");
    fixture("mint_certs.py", dir.path());
    let other = tempfile::tempdir().expect("temp dir");
    fixture("mint_certs.py", other.path());
    let file = |dir: &Path, name: &str| dir.join(name).display().to_string();
    let ca = file(dir.path(), "ca.pem");

    let (_tls, addr) = spawn_tls(dir.path(), false);
    let ok = health(&["--addr", &addr, "--tls-ca-file", &ca]);
    assert!(ok.status.success(), "{ok:?}");
    assert_eq!(String::from_utf8_lossy(&ok.stdout).trim(), "SERVING");
    let named = health(&[
        "--addr",
        &addr,
        "--tls-ca-file",
        &ca,
        "--tls-server-name",
        "localhost",
    ]);
    assert!(named.status.success(), "{named:?}");

    let plaintext = health(&["--addr", &addr, "--timeout-s", "2"]);
    assert!(!plaintext.status.success(), "{plaintext:?}");
    assert!(
        String::from_utf8_lossy(&plaintext.stderr).contains("--tls-ca-file"),
        "{plaintext:?}"
    );
    let wrong_ca = health(&[
        "--addr",
        &addr,
        "--tls-ca-file",
        &file(other.path(), "ca.pem"),
    ]);
    assert!(!wrong_ca.status.success(), "{wrong_ca:?}");
    let wrong_name = health(&[
        "--addr",
        &addr,
        "--tls-ca-file",
        &ca,
        "--tls-server-name",
        "elsewhere.example",
    ]);
    assert!(!wrong_name.status.success(), "{wrong_name:?}");

    let (_mtls, addr) = spawn_tls(dir.path(), true);
    let with_cert = health(&[
        "--addr",
        &addr,
        "--tls-ca-file",
        &ca,
        "--tls-client-cert-file",
        &file(dir.path(), "client.pem"),
        "--tls-client-key-file",
        &file(dir.path(), "client.key"),
    ]);
    assert!(with_cert.status.success(), "{with_cert:?}");
    let without_cert = health(&["--addr", &addr, "--tls-ca-file", &ca]);
    assert!(!without_cert.status.success(), "{without_cert:?}");

    let unreadable = health(&["--addr", &addr, "--tls-ca-file", "/nonexistent/ca.pem"]);
    assert_eq!(unreadable.status.code(), Some(2), "{unreadable:?}");
}

/// What a sidecar with `envs` logs at warning level until it listens.
fn start_warnings(envs: &[(&str, &str)]) -> String {
    let mut child = Command::new(binary())
        .args(["serve", "--listen", "127.0.0.1:0", "--mock"])
        .env_clear()
        .env("CORESDK_FLAGD_LISTEN", "off")
        .env("CORESDK_LOG", "warn")
        .envs(envs.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the coresdk binary starts");
    let stdout = child.stdout.take().expect("piped stdout");
    let listening = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .any(|line| line.starts_with("coresdk listening on "));
    let _ = child.kill();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .expect("piped stderr")
        .read_to_string(&mut stderr)
        .expect("readable stderr");
    let _ = child.wait();
    assert!(listening, "the sidecar started: {stderr}");
    stderr
}

#[test]
fn public_jwt_keys_without_an_audience_are_warned_about_at_start() {
    let dir = tempfile::tempdir().expect("temp dir");
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, r#"{"keys":[]}"#).expect("write");
    let jwks = jwks.display().to_string();
    let warned = start_warnings(&[("CORESDK_JWKS_FILE", &jwks)]);
    assert!(warned.contains("without CORESDK_JWT_AUDIENCE"), "{warned}");
    let quiet = start_warnings(&[
        ("CORESDK_JWKS_FILE", &jwks),
        ("CORESDK_JWT_AUDIENCE", "securepay"),
    ]);
    assert!(!quiet.contains("CORESDK_JWT_AUDIENCE"), "{quiet}");
    let hmac_only = start_warnings(&[("CORESDK_JWT_SECRET", JWT_SECRET)]);
    assert!(!hmac_only.contains("CORESDK_JWT_AUDIENCE"), "{hmac_only}");
}
