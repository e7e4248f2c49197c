//! AuthService against the real binary, with tokens minted by PyJWT (an independent
//! implementation) and certificates made by Python's `cryptography`.
mod common;

use std::path::Path;

use common::inputs::spawn_tls;
use common::*;
use coresdk::proto::{
    self, AuthorizeRequest, Decision, VerifyTokenRequest, auth_service_client::AuthServiceClient,
};
use serde_json::{Value, json};
use tonic::Code;

struct Minted {
    tokens: Value,
    files: Value,
}

impl Minted {
    fn new(dir: &Path) -> Self {
        let minted: Value = serde_json::from_str(&fixture("mint_tokens.py", dir)).expect("JSON");
        Self {
            tokens: minted["tokens"].clone(),
            files: minted["files"].clone(),
        }
    }
    fn token(&self, name: &str) -> String {
        self.tokens[name].as_str().expect(name).to_owned()
    }
    fn file(&self, name: &str) -> String {
        self.files[name].as_str().expect(name).to_owned()
    }
}

fn token_envs(minted: &Minted) -> Vec<(String, String)> {
    vec![
        ("CORESDK_JWT_SECRET_FILE".into(), minted.file("hmac_secret")),
        ("CORESDK_JWT_PUBLIC_KEY_FILE".into(), minted.file("rsa_pem")),
        ("CORESDK_JWKS_FILE".into(), minted.file("jwks")),
        ("CORESDK_JWT_ISSUER".into(), "https://issuer.test".into()),
        ("CORESDK_JWT_AUDIENCE".into(), "securepay".into()),
    ]
}

async fn mock_with_tokens(minted: &Minted, extra: &[(&str, &str)]) -> Sidecar {
    let mut envs = token_envs(minted);
    envs.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    Sidecar::start(Options {
        args: vec!["--mock".into()],
        envs,
    })
    .await
}

fn auth(sidecar: &Sidecar) -> AuthServiceClient<tonic::transport::Channel> {
    AuthServiceClient::new(sidecar.channel.clone())
}

async fn verify(sidecar: &Sidecar, token: String) -> Result<proto::Claims, tonic::Status> {
    auth(sidecar)
        .verify_token(VerifyTokenRequest { token })
        .await
        .map(|r| r.into_inner())
}

#[tokio::test]
async fn every_algorithm_family_verifies_and_bad_tokens_do_not() {
    let dir = tempfile::tempdir().expect("temp dir");
    let minted = Minted::new(dir.path());
    let sidecar = mock_with_tokens(&minted, &[]).await;

    for alg in [
        "HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "ES256", "ES384", "EdDSA",
    ] {
        let claims = verify(&sidecar, minted.token(alg))
            .await
            .unwrap_or_else(|e| panic!("{alg}: {e:?}"));
        assert_eq!(claims.tenant_id, "acme-corp", "{alg}");
        assert_eq!(claims.subject, "user-42");
        assert_eq!(claims.roles, vec!["admin", "billing"]);
        assert_eq!(claims.scopes, vec!["read:analytics", "write:settings"]);
        assert_eq!(claims.audience, vec!["securepay"]);
        assert!(claims.expires_at.is_some() && claims.claims.is_some());
    }
    let bearer = verify(&sidecar, format!("Bearer {}", minted.token("HS256")))
        .await
        .expect("Bearer prefix");
    assert_eq!(bearer.tenant_id, "acme-corp");
    for within in ["expired_within_leeway", "nbf_within_leeway"] {
        assert!(
            verify(&sidecar, minted.token(within)).await.is_ok(),
            "{within} is inside the 60 s leeway"
        );
    }

    for (bad, reason) in [
        ("expired_beyond_leeway", "expired"),
        ("not_yet_valid", "not valid yet"),
        ("wrong_audience", "audience"),
        ("wrong_issuer", "issuer"),
        ("no_exp", "exp"),
        // A configured issuer and audience are required, not only checked when present.
        ("no_issuer", "iss"),
        ("no_audience", "aud"),
        ("numeric_issuer", "iss"),
        ("wrong_secret", "signature"),
        ("alg_none", "algorithm"),
        ("rsa_public_key_as_hmac_secret", "signature"),
        ("unknown_kid", "ghost"),
    ] {
        let status = verify(&sidecar, minted.token(bad)).await.expect_err(bad);
        assert_eq!(status.code(), Code::Unauthenticated, "{bad}");
        let problem = problem(&status);
        assert_eq!(problem.status, 401, "{bad}");
        assert!(problem.detail.contains(reason), "{bad}: {}", problem.detail);
    }
    for garbage in ["", "abc", "a.b.c", &"x".repeat(20_000)] {
        let status = verify(&sidecar, garbage.to_owned())
            .await
            .expect_err("garbage");
        assert_eq!(status.code(), Code::Unauthenticated);
    }
}

#[tokio::test]
async fn an_rsa_public_key_is_never_an_hmac_secret() {
    let dir = tempfile::tempdir().expect("temp dir");
    let minted = Minted::new(dir.path());
    // Only the RSA key is configured: an HS256 token signed with its PEM bytes is the classic
    // algorithm-confusion forgery.
    let sidecar = Sidecar::start(Options {
        args: vec!["--mock".into()],
        envs: vec![("CORESDK_JWT_PUBLIC_KEY_FILE".into(), minted.file("rsa_pem"))],
    })
    .await;
    let status = verify(&sidecar, minted.token("rsa_public_key_as_hmac_secret"))
        .await
        .expect_err("forged");
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(
        problem(&status).detail.contains("no configured key"),
        "{}",
        problem(&status).detail
    );
    assert!(verify(&sidecar, minted.token("RS256")).await.is_ok());
}

#[tokio::test]
async fn jwks_rotation_is_picked_up_without_a_restart() {
    let dir = tempfile::tempdir().expect("temp dir");
    let minted = Minted::new(dir.path());
    let sidecar = mock_with_tokens(&minted, &[]).await;
    let status = verify(&sidecar, minted.token("rotated_kid"))
        .await
        .expect_err("not yet in the set");
    assert!(problem(&status).detail.contains("rsa-2"));

    std::fs::copy(minted.file("jwks_rotated"), minted.file("jwks")).expect("rotate the key set");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match verify(&sidecar, minted.token("rotated_kid")).await {
            Ok(claims) => {
                assert_eq!(claims.tenant_id, "acme-corp");
                break;
            }
            Err(e) if std::time::Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            Err(e) => panic!("the rotated key was never picked up: {e:?}"),
        }
    }
    assert!(
        verify(&sidecar, minted.token("RS256")).await.is_ok(),
        "old keys still work"
    );
}

async fn authorize(
    sidecar: &Sidecar,
    token: &str,
    required: &[&str],
    deny_if: &[&str],
    resource: &str,
) -> proto::AuthorizeResponse {
    auth(sidecar)
        .authorize(AuthorizeRequest {
            token: token.into(),
            tenant_id: String::new(),
            required_features: required.iter().map(|s| s.to_string()).collect(),
            deny_if: deny_if.iter().map(|s| s.to_string()).collect(),
            resource: resource.into(),
            include_claims: true,
        })
        .await
        .expect("Authorize answers")
        .into_inner()
}

fn extension(problem: &proto::Problem, key: &str) -> Option<String> {
    match problem
        .extensions
        .as_ref()?
        .fields
        .get(key)?
        .kind
        .as_ref()?
    {
        prost_types::value::Kind::StringValue(s) => Some(s.clone()),
        _ => None,
    }
}

async fn denial_records(sidecar: &Sidecar) -> Vec<proto::AuditRecord> {
    common::abuse::audit_records(sidecar, "auth.denied").await
}

#[tokio::test]
async fn securepay_gates_end_to_end() {
    let dir = tempfile::tempdir().expect("temp dir");
    let minted = Minted::new(dir.path());
    let sidecar = mock_with_tokens(
        &minted,
        &[
            (
                "CORESDK_PROBLEM_TYPE_BASE",
                "https://securepay.example/errors",
            ),
            ("CORESDK_BILLING_URL", "https://securepay.example/billing"),
            ("CORESDK_UPGRADE_URL", "https://securepay.example/pricing"),
        ],
    )
    .await;
    let acme = minted.token("HS256");

    // /api/analytics: 403 before the upgrade, 200 after.
    let before = authorize(
        &sidecar,
        &acme,
        &["advanced_analytics"],
        &[],
        "GET /api/analytics",
    )
    .await;
    assert_eq!(before.decision(), Decision::Deny);
    let problem = before.problem.expect("a problem");
    assert_eq!(problem.status, 403);
    assert_eq!(
        problem.r#type,
        "https://securepay.example/errors/feature-locked"
    );
    assert_eq!(
        extension(&problem, "upgrade_url").as_deref(),
        Some("https://securepay.example/pricing")
    );
    assert_eq!(problem.instance, "GET /api/analytics");

    let body = event(
        "evt_up",
        "subscription.upgraded",
        now(),
        json!({"customer": "cus_acme_001"}),
    );
    sidecar
        .webhooks()
        .handle_stripe_webhook(signed("whsec_test_secret", body))
        .await
        .expect("upgrade");
    let after = authorize(
        &sidecar,
        &acme,
        &["advanced_analytics"],
        &[],
        "GET /api/analytics",
    )
    .await;
    assert_eq!(after.decision(), Decision::Allow);
    assert!(after.problem.is_none());
    assert_eq!(
        (after.tenant_id.as_str(), after.subject.as_str()),
        ("acme-corp", "user-42")
    );

    // /api/dashboard: 200 until a payment fails, then 402.
    let globex = minted.token("globex");
    let ok = authorize(
        &sidecar,
        &globex,
        &[],
        &["paywall_active"],
        "GET /api/dashboard",
    )
    .await;
    assert_eq!(ok.decision(), Decision::Allow);
    let body = event(
        "evt_fail",
        "payment.failed",
        now(),
        json!({"customer": "cus_globex_001"}),
    );
    sidecar
        .webhooks()
        .handle_stripe_webhook(signed("whsec_test_secret", body))
        .await
        .expect("failure");
    let paywalled = authorize(
        &sidecar,
        &globex,
        &[],
        &["paywall_active"],
        "GET /api/dashboard",
    )
    .await;
    assert_eq!(paywalled.decision(), Decision::Deny);
    let problem = paywalled.problem.expect("a problem");
    assert_eq!(
        (problem.status, problem.title.as_str()),
        (402, "Payment Required")
    );
    assert_eq!(
        extension(&problem, "billing_url").as_deref(),
        Some("https://securepay.example/billing")
    );

    // A bad token is a 401 decision; a token for another tenant is refused.
    let bad = authorize(
        &sidecar,
        &minted.token("expired_beyond_leeway"),
        &[],
        &[],
        "GET /api/dashboard",
    )
    .await;
    assert_eq!(
        (bad.decision(), bad.problem.map(|p| p.status)),
        (Decision::Deny, Some(401))
    );
    let mismatch = auth(&sidecar)
        .authorize(AuthorizeRequest {
            token: acme.clone(),
            tenant_id: "globex".into(),
            ..Default::default()
        })
        .await
        .expect("answers")
        .into_inner();
    assert_eq!(mismatch.problem.map(|p| p.status), Some(403));
    let no_tenant = authorize(&sidecar, &minted.token("no_tenant"), &[], &[], "").await;
    assert_eq!(no_tenant.problem.map(|p| p.status), Some(401));

    // A tenant the app vouches for, without a token.
    let by_tenant = auth(&sidecar)
        .authorize(AuthorizeRequest {
            tenant_id: "initech".into(),
            required_features: vec!["advanced_analytics".into()],
            ..Default::default()
        })
        .await
        .expect("answers")
        .into_inner();
    assert_eq!(by_tenant.decision(), Decision::Deny);
    let invalid = auth(&sidecar)
        .authorize(AuthorizeRequest {
            required_features: vec!["bad key!".into()],
            tenant_id: "x".into(),
            ..Default::default()
        })
        .await
        .expect_err("invalid flag key");
    assert_eq!(invalid.code(), Code::InvalidArgument);
    assert_eq!(
        auth(&sidecar)
            .authorize(AuthorizeRequest::default())
            .await
            .expect_err("nothing given")
            .code(),
        Code::InvalidArgument
    );

    // A flood of identical denials is audited once per window.
    for _ in 0..50 {
        authorize(
            &sidecar,
            &globex,
            &[],
            &["paywall_active"],
            "GET /api/dashboard",
        )
        .await;
    }
    // Denials are audited without holding up the answer: wait until they are stored, then
    // give any (wrongly) uncoalesced writes time to land before counting.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let records = denial_records(&sidecar).await;
        let stored = records
            .iter()
            .any(|r| r.tenant_id == "globex" && r.actor == "user-7")
            && records.iter().any(|r| r.tenant_id == "acme-corp");
        if stored || std::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let denials = denial_records(&sidecar).await;
    let globex_paywall = denials
        .iter()
        .filter(|r| r.tenant_id == "globex" && r.actor == "user-7")
        .count();
    assert_eq!(globex_paywall, 1, "51 identical denials, one record");
    assert!(
        denials
            .iter()
            .any(|r| r.tenant_id == "acme-corp" && r.outcome == "denied")
    );
    assert!(denials.len() < 10, "{} records", denials.len());
}

#[tokio::test]
async fn the_api_token_guards_every_rpc_but_health() {
    let sidecar = Sidecar::start(Options {
        args: vec!["--store".into(), "memory".into()],
        envs: vec![
            (
                "CORESDK_API_TOKEN".into(),
                "api-token-0123456789abcdef".into(),
            ),
            ("CORESDK_ADMIN_TOKEN".into(), ADMIN_TOKEN.into()),
        ],
    })
    .await;
    let request = || proto::GetFlagRequest {
        tenant_id: "acme".into(),
        key: "pro_features".into(),
    };
    let status = sidecar
        .flags()
        .get_flag(request())
        .await
        .expect_err("no token");
    assert_eq!(status.code(), Code::Unauthenticated);
    assert_eq!(problem(&status).status, 401);

    let mut with_header = tonic::Request::new(request());
    with_header.metadata_mut().insert(
        "x-coresdk-api-token",
        "api-token-0123456789abcdef".parse().expect("ascii"),
    );
    assert!(sidecar.flags().get_flag(with_header).await.is_ok());
    let mut with_bearer = tonic::Request::new(request());
    with_bearer.metadata_mut().insert(
        "authorization",
        "Bearer api-token-0123456789abcdef".parse().expect("ascii"),
    );
    assert!(sidecar.flags().get_flag(with_bearer).await.is_ok());
    assert!(
        sidecar.flags().get_flag(admin(request())).await.is_ok(),
        "the admin token is accepted too"
    );
    let mut wrong = tonic::Request::new(request());
    wrong
        .metadata_mut()
        .insert("x-coresdk-api-token", "nope".parse().expect("ascii"));
    assert_eq!(
        sidecar
            .flags()
            .get_flag(wrong)
            .await
            .expect_err("wrong")
            .code(),
        Code::Unauthenticated
    );

    let mut health = tonic_health::pb::health_client::HealthClient::new(sidecar.channel.clone());
    assert!(
        health
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new()
            })
            .await
            .is_ok()
    );
}

async fn tls_channel(
    addr: &str,
    dir: &Path,
    with_client_cert: bool,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    let read = |name: &str| std::fs::read(dir.join(name)).expect(name);
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read("ca.pem")))
        .domain_name("localhost");
    if with_client_cert {
        tls = tls.identity(Identity::from_pem(read("client.pem"), read("client.key")));
    }
    let port = addr.rsplit(':').next().expect("port");
    tonic::transport::Channel::from_shared(format!("https://localhost:{port}"))
        .expect("uri")
        .tls_config(tls)?
        .connect()
        .await
}

async fn get_flag_over(channel: tonic::transport::Channel) -> Result<proto::Flag, tonic::Status> {
    coresdk::proto::flag_service_client::FlagServiceClient::new(channel)
        .get_flag(proto::GetFlagRequest {
            tenant_id: "acme".into(),
            key: "pro_features".into(),
        })
        .await
        .map(|r| r.into_inner())
}

#[tokio::test]
async fn tls_and_mutual_tls() {
    let dir = tempfile::tempdir().expect("temp dir");
    fixture("mint_certs.py", dir.path());

    let (tls_sidecar, addr) = spawn_tls(dir.path(), false);
    let channel = tls_channel(&addr, dir.path(), false)
        .await
        .expect("TLS connects");
    assert!(get_flag_over(channel).await.is_ok());
    let plaintext = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await;
    if let Ok(channel) = plaintext {
        assert!(
            get_flag_over(channel).await.is_err(),
            "plaintext must not be served over TLS"
        );
    }
    drop(tls_sidecar);

    let (_mtls_sidecar, addr) = spawn_tls(dir.path(), true);
    let with_cert = tls_channel(&addr, dir.path(), true)
        .await
        .expect("mTLS connects");
    assert!(
        get_flag_over(with_cert).await.is_ok(),
        "accepted with a client certificate"
    );
    let refused = match tls_channel(&addr, dir.path(), false).await {
        Err(_) => true,
        Ok(channel) => get_flag_over(channel).await.is_err(),
    };
    assert!(refused, "refused without a client certificate");
}
