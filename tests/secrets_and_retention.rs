//! Secret files re-read without a restart (webhook secrets, admin and API tokens, JWT HMAC
//! secrets, a PEM public key), and the background pruning of old dedup records, against the real binary.
mod common;

use common::reload::{SETTLE, eventually, replace};
use common::*;
use coresdk::proto::{
    self, VerifyTokenRequest, WebhookOutcome, auth_service_client::AuthServiceClient,
};
use serde_json::json;
use tonic::Code;

fn paid(id: &str, customer: &str) -> Vec<u8> {
    event(id, "invoice.paid", now(), json!({"customer": customer}))
}

/// Whether a delivery signed with `secret` passes the signature check.
async fn accepts(sidecar: &Sidecar, secret: &str) -> bool {
    // A new event each time: a duplicate would pass for other reasons.
    static DELIVERIES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = DELIVERIES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let body = paid(&format!("evt_rotation_{n}"), "cus_acme_001");
    match sidecar
        .webhooks()
        .handle_stripe_webhook(signed(secret, body))
        .await
    {
        // Verified: what the event then does (applied, or stale beside an earlier one of the
        // same second) is not the point here.
        Ok(_) => true,
        Err(status) => {
            assert_eq!(error_reason(&status), "SIGNATURE_MISMATCH", "{status:?}");
            false
        }
    }
}

#[tokio::test]
async fn a_rotated_webhook_secret_file_takes_effect_without_a_restart() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("webhook-secret");
    std::fs::write(&file, "whsec_old_secret\n").expect("write");
    let sidecar = Sidecar::start(Options {
        args: vec!["--mock".into()],
        envs: vec![(
            "STRIPE_WEBHOOK_SECRET_FILE".into(),
            file.display().to_string(),
        )],
    })
    .await;
    assert!(accepts(&sidecar, "whsec_old_secret").await);
    assert!(!accepts(&sidecar, "whsec_new_secret").await);

    // Stripe's roll: both secrets sign during the overlap, each is accepted.
    replace(&file, "whsec_new_secret\nwhsec_old_secret\n");
    eventually("the new secret is accepted", || {
        accepts(&sidecar, "whsec_new_secret")
    })
    .await;
    assert!(accepts(&sidecar, "whsec_old_secret").await);

    // The old one expires: dropped from the file, it is refused.
    replace(&file, "whsec_new_secret,");
    eventually("the old secret is refused", || async {
        !accepts(&sidecar, "whsec_old_secret").await
    })
    .await;
    assert!(accepts(&sidecar, "whsec_new_secret").await);

    // A broken file (empty, then gone) keeps the secret in use.
    replace(&file, "\n");
    tokio::time::sleep(SETTLE).await;
    assert!(accepts(&sidecar, "whsec_new_secret").await);
    std::fs::remove_file(&file).expect("remove");
    tokio::time::sleep(SETTLE).await;
    assert!(accepts(&sidecar, "whsec_new_secret").await);
}

const ADMIN_OLD: &str = "admin-token-old-0123456789";
const ADMIN_NEW: &str = "admin-token-new-0123456789";
const API_OLD: &str = "api-token-old-0123456789";
const API_NEW: &str = "api-token-new-0123456789";

fn map_request(customer: &str, tenant: &str) -> proto::MapCustomerRequest {
    proto::MapCustomerRequest {
        customer_id: customer.into(),
        tenant_id: tenant.into(),
        actor: "ops@example.com".into(),
        reason: String::new(),
    }
}

async fn map(sidecar: &Sidecar, customer: &str, tenant: &str) {
    sidecar
        .tenants()
        .map_customer(admin(map_request(customer, tenant)))
        .await
        .expect("mapped");
}

/// Whether an admin call with `token` is let through.
async fn admin_accepts(sidecar: &Sidecar, token: &str) -> bool {
    let mut request = tonic::Request::new(map_request("cus_rotation", "rotation-co"));
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("ascii"),
    );
    // The API token guards every RPC; an admin token passes it too.
    match sidecar.tenants().map_customer(request).await {
        Ok(_) => true,
        Err(status) => {
            assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
            false
        }
    }
}

/// Whether a flag read with the API token `token` is let through.
async fn api_accepts(sidecar: &Sidecar, token: &str) -> bool {
    let mut request = tonic::Request::new(proto::GetFlagRequest {
        tenant_id: "acme".into(),
        key: "pro_features".into(),
    });
    request
        .metadata_mut()
        .insert("x-coresdk-api-token", token.parse().expect("ascii"));
    match sidecar.flags().get_flag(request).await {
        Ok(_) => true,
        Err(status) => {
            assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
            false
        }
    }
}

#[tokio::test]
async fn rotated_admin_and_api_token_files_take_effect_and_broken_ones_keep_the_old() {
    let dir = tempfile::tempdir().expect("temp dir");
    let admin_file = dir.path().join("admin-token");
    let api_file = dir.path().join("api-token");
    std::fs::write(&admin_file, format!("{ADMIN_OLD}\n")).expect("write");
    std::fs::write(&api_file, format!("{API_OLD}\n")).expect("write");
    let sidecar = Sidecar::start(Options {
        args: vec!["--store".into(), "memory".into()],
        envs: vec![
            ("STRIPE_WEBHOOK_SECRET".into(), SECRET.into()),
            (
                "CORESDK_ADMIN_TOKEN_FILE".into(),
                admin_file.display().to_string(),
            ),
            (
                "CORESDK_API_TOKEN_FILE".into(),
                api_file.display().to_string(),
            ),
        ],
    })
    .await;
    assert!(admin_accepts(&sidecar, ADMIN_OLD).await);
    assert!(!admin_accepts(&sidecar, ADMIN_NEW).await);
    assert!(api_accepts(&sidecar, API_OLD).await);
    assert!(!api_accepts(&sidecar, API_NEW).await);

    replace(&admin_file, ADMIN_NEW);
    replace(&api_file, &format!("{API_NEW}\r\n"));
    eventually("the new admin token is accepted", || {
        admin_accepts(&sidecar, ADMIN_NEW)
    })
    .await;
    eventually("the new API token is accepted", || {
        api_accepts(&sidecar, API_NEW)
    })
    .await;
    assert!(!admin_accepts(&sidecar, ADMIN_OLD).await);
    assert!(!api_accepts(&sidecar, API_OLD).await);

    // Too short and empty: refused, the tokens in use stay.
    replace(&admin_file, "short\n");
    replace(&api_file, "");
    tokio::time::sleep(SETTLE).await;
    assert!(admin_accepts(&sidecar, ADMIN_NEW).await);
    assert!(api_accepts(&sidecar, API_NEW).await);
    assert!(!admin_accepts(&sidecar, "short").await);
}

const JWT_A: &str = "jwt-secret-a-0123456789abcdef0123456789";
const JWT_B: &str = "jwt-secret-b-0123456789abcdef0123456789";

fn hs256(secret: &str) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"sub": "user-42", "tenant_id": "acme-corp", "exp": now() + 600}),
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("encodes")
}

async fn verifies(sidecar: &Sidecar, token: &str) -> bool {
    let answer = AuthServiceClient::new(sidecar.channel.clone())
        .verify_token(VerifyTokenRequest {
            token: token.to_owned(),
        })
        .await;
    match answer {
        Ok(claims) => {
            assert_eq!(claims.into_inner().tenant_id, "acme-corp");
            true
        }
        Err(status) => {
            assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
            false
        }
    }
}

#[tokio::test]
async fn a_rotated_jwt_secret_file_takes_effect_and_a_broken_one_keeps_the_old() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("jwt-secret");
    std::fs::write(&file, JWT_A).expect("write");
    let sidecar = Sidecar::start(Options {
        args: vec!["--mock".into()],
        envs: vec![("CORESDK_JWT_SECRET_FILE".into(), file.display().to_string())],
    })
    .await;
    let (a, b) = (hs256(JWT_A), hs256(JWT_B));
    assert!(verifies(&sidecar, &a).await);
    assert!(!verifies(&sidecar, &b).await);

    replace(&file, &format!("{JWT_B}\n{JWT_A}\n"));
    eventually("B's tokens verify", || verifies(&sidecar, &b)).await;
    assert!(
        verifies(&sidecar, &a).await,
        "A's still do during the overlap"
    );

    // A's token verified before is cached: dropping A must end that too.
    replace(&file, JWT_B);
    eventually("A's tokens are refused", || async {
        !verifies(&sidecar, &a).await
    })
    .await;
    assert!(verifies(&sidecar, &b).await);

    replace(&file, "too-short-for-hmac");
    tokio::time::sleep(SETTLE).await;
    assert!(verifies(&sidecar, &b).await);
}

/// The database behind a sidecar, read and aged directly while the test runs.
#[derive(Clone)]
enum Db {
    Sqlite(std::path::PathBuf),
    Postgres(String),
}

impl Db {
    async fn run(
        &self,
        sql: &'static str,
        param: Option<(i64, &'static str)>,
        read: bool,
    ) -> Vec<String> {
        let db = self.clone();
        tokio::task::spawn_blocking(move || match db {
            Db::Sqlite(path) => {
                let conn = rusqlite::Connection::open(path).expect("open the database");
                if read {
                    let mut statement = conn.prepare(sql).expect("prepare");
                    return statement
                        .query_map([], |row| row.get(0))
                        .expect("query")
                        .collect::<Result<_, _>>()
                        .expect("rows");
                }
                let (ms, id) = param.expect("a parameter");
                conn.execute(
                    &sql.replace("$1", "?1").replace("$2", "?2"),
                    rusqlite::params![ms, id],
                )
                .expect("executed");
                Vec::new()
            }
            Db::Postgres(url) => {
                let mut client = postgres::Client::connect(&url, postgres::NoTls).expect("connect");
                if read {
                    return client
                        .query(sql, &[])
                        .expect("query")
                        .iter()
                        .map(|row| row.get(0))
                        .collect();
                }
                let (ms, id) = param.expect("a parameter");
                client.execute(sql, &[&ms, &id]).expect("executed");
                Vec::new()
            }
        })
        .await
        .expect("blocking task")
    }

    async fn dedup_rows(&self) -> Vec<String> {
        self.run(
            "SELECT event_id FROM processed_events ORDER BY event_id",
            None,
            true,
        )
        .await
    }

    /// Makes the event's dedup record look processed at `ms`.
    async fn age(&self, event_id: &'static str, ms: i64) {
        self.run(
            "UPDATE processed_events SET processed_at_ms = $1 WHERE event_id = $2",
            Some((ms, event_id)),
            false,
        )
        .await;
    }
}

/// Events delivered, some aged beyond the default 35-day window, then a restart: the first
/// pass prunes the old row no flag names any more, keeps an old row a flag still names (how
/// `flags explain` finds its event) and a newer one, and the audit trail stays whole.
async fn retention_prunes_the_aged_row(mut sidecar: Sidecar, db: Db) {
    map(&sidecar, "cus_old", "oldco").await;
    map(&sidecar, "cus_named", "namedco").await;
    map(&sidecar, "cus_kept", "keptco").await;
    // oldco's failed payment is superseded by its payment: no flag names it afterwards.
    let old = event(
        "evt_old",
        "invoice.payment_failed",
        now() - 10,
        json!({"customer": "cus_old"}),
    );
    let newer = paid("evt_newer", "cus_old");
    let named = paid("evt_named", "cus_named");
    let kept = paid("evt_kept", "cus_kept");
    for body in [old.clone(), newer, named.clone(), kept.clone()] {
        let answer = deliver(&sidecar, body).await.expect("delivered");
        assert_eq!(answer.outcome(), WebhookOutcome::Applied);
    }
    let audited = |sidecar: &Sidecar| {
        let mut client = sidecar.audit();
        async move {
            client
                .query(proto::QueryAuditRequest {
                    page_size: 1000,
                    ..Default::default()
                })
                .await
                .expect("audit")
                .into_inner()
                .records
                .len()
        }
    };
    let records = audited(&sidecar).await;
    sidecar.stop();

    let day_ms: i64 = 86_400_000;
    let now_ms = now() * 1000;
    db.age("evt_old", now_ms - 36 * day_ms).await;
    db.age("evt_named", now_ms - 36 * day_ms).await;
    db.age("evt_kept", now_ms - 34 * day_ms).await;

    sidecar.restart().await;
    eventually("the old dedup row is pruned", || async {
        !db.dedup_rows().await.contains(&"evt_old".to_owned())
    })
    .await;
    let rows = db.dedup_rows().await;
    assert!(rows.contains(&"evt_kept".to_owned()), "{rows:?}");
    assert!(
        rows.contains(&"evt_named".to_owned()),
        "a row a flag names is kept: {rows:?}"
    );
    assert_eq!(
        audited(&sidecar).await,
        records,
        "the audit trail is never pruned"
    );
    // What set namedco's flag is still found, with the event's own record.
    let explained = sidecar
        .flags()
        .explain_flag(proto::ExplainFlagRequest {
            tenant_id: "namedco".into(),
            key: "pro_features".into(),
        })
        .await
        .expect("explain")
        .into_inner();
    let Some(proto::explain_flag_response::SetBy::Event(setter)) = explained.set_by else {
        panic!("set by an event: {explained:?}");
    };
    assert_eq!(
        (setter.event_id.as_str(), setter.event_type.as_str()),
        ("evt_named", "invoice.paid")
    );
    assert!(setter.audit_seq > 0, "{setter:?}");

    // The pruned event is decided afresh: its flags have a newer event, so it is stale (alone,
    // it would be applied again: src/ops/tests/retention.rs); the kept ones are duplicates.
    let again = deliver(&sidecar, old).await.expect("redelivered");
    assert_eq!(again.outcome(), WebhookOutcome::Stale);
    for body in [named, kept] {
        let dup = deliver(&sidecar, body).await.expect("redelivered");
        assert_eq!(dup.outcome(), WebhookOutcome::Duplicate);
    }
}

#[tokio::test]
async fn retention_prunes_old_dedup_rows_on_sqlite() {
    let dir = tempfile::tempdir().expect("temp dir");
    let sidecar = Sidecar::on_disk(dir.path(), Options::default()).await;
    retention_prunes_the_aged_row(sidecar, Db::Sqlite(dir.path().join("coresdk.db"))).await;
}

#[tokio::test]
async fn retention_prunes_old_dedup_rows_on_postgres() {
    let url = pg::fresh_database(pg::server_url()).await;
    let sidecar = Sidecar::start(pg::replica_options(&url)).await;
    retention_prunes_the_aged_row(sidecar, Db::Postgres(url)).await;
}

#[tokio::test]
async fn retention_off_keeps_every_dedup_row() {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = dir.path().join("coresdk.db");
    let mut options = Options::default();
    options
        .args
        .extend(["--dedup-retention-days".into(), "off".into()]);
    let mut sidecar = Sidecar::on_disk(dir.path(), options).await;
    map(&sidecar, "cus_old", "oldco").await;
    deliver(&sidecar, paid("evt_old", "cus_old"))
        .await
        .expect("delivered");
    sidecar.stop();
    let db = Db::Sqlite(db);
    db.age("evt_old", 0).await;
    sidecar.restart().await;
    tokio::time::sleep(SETTLE).await;
    assert_eq!(db.dedup_rows().await, ["evt_old"]);
}

/// An Ed25519 key pair from `seed`: the signing key for tokens, the public key as the PEM the
/// sidecar reads (SPKI and PKCS#8 DER are a fixed prefix and the 32 key bytes).
fn ed25519(seed: u8) -> (jsonwebtoken::EncodingKey, String) {
    use base64::Engine as _;
    let seed = [seed; 32];
    let public = ed25519_dalek::SigningKey::from_bytes(&seed)
        .verifying_key()
        .to_bytes();
    let mut pkcs8 = hex::decode("302e020100300506032b657004220420").expect("hex");
    pkcs8.extend(seed);
    let mut spki = hex::decode("302a300506032b6570032100").expect("hex");
    spki.extend(public);
    let pem = format!(
        "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
        base64::engine::general_purpose::STANDARD.encode(spki)
    );
    (jsonwebtoken::EncodingKey::from_ed_der(&pkcs8), pem)
}

fn eddsa(key: &jsonwebtoken::EncodingKey) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA),
        &json!({"sub": "user-42", "tenant_id": "acme-corp", "exp": now() + 600, "aud": "securepay"}),
        key,
    )
    .expect("encodes")
}

#[tokio::test]
async fn a_replaced_jwt_public_key_file_takes_effect_and_a_broken_one_keeps_the_old() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("jwt-public-key.pem");
    let (key_a, pem_a) = ed25519(1);
    let (key_b, pem_b) = ed25519(2);
    std::fs::write(&file, &pem_a).expect("write");
    let sidecar = Sidecar::start(Options {
        args: vec!["--mock".into()],
        envs: vec![
            (
                "CORESDK_JWT_PUBLIC_KEY_FILE".into(),
                file.display().to_string(),
            ),
            ("CORESDK_JWT_AUDIENCE".into(), "securepay".into()),
        ],
    })
    .await;
    let (a, b) = (eddsa(&key_a), eddsa(&key_b));
    assert!(verifies(&sidecar, &a).await);
    assert!(!verifies(&sidecar, &b).await);

    // One key per file: the swap is a cut-over, cached verifications included.
    replace(&file, &pem_b);
    eventually("B's tokens verify", || verifies(&sidecar, &b)).await;
    assert!(!verifies(&sidecar, &a).await);

    replace(
        &file,
        "-----BEGIN PUBLIC KEY-----\nnot a key\n-----END PUBLIC KEY-----\n",
    );
    tokio::time::sleep(SETTLE).await;
    assert!(verifies(&sidecar, &b).await);
}
