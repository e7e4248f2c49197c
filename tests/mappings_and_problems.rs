//! Customer → tenant mappings across restarts and checkouts, the sidecar's reserved audit
//! namespaces, and problems that stay small whatever the input.
mod common;

use common::abuse::audit_records as records;
use common::audit::map;
use common::mapping::{resolve, tenant_of, unmap};
use common::*;
use coresdk::proto::{AppendAuditRequest, AuditRecord};
use prost::Message as _;
use serde_json::{Value, json};

fn metadata(record: &AuditRecord) -> Value {
    let canonical: Value = serde_json::from_slice(&record.canonical).expect("canonical JSON");
    canonical["metadata"].clone()
}

fn tenants_file(dir: &std::path::Path) -> Options {
    let path = dir.join("tenants.json");
    std::fs::write(
        &path,
        r#"{"cus_acme_001": "acme-corp", "cus_globex": "globex"}"#,
    )
    .expect("write the tenants file");
    let mut options = Options::default();
    options
        .args
        .extend(["--tenants-file".to_owned(), path.display().to_string()]);
    options
}

#[tokio::test]
async fn a_restart_keeps_a_runtime_mapping_over_the_tenants_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut sidecar = Sidecar::on_disk(dir.path(), tenants_file(dir.path())).await;
    assert_eq!(tenant_of(&sidecar, "cus_acme_001").await, "acme-corp");
    map(&sidecar, "cus_acme_001", "acme-new").await;

    assert!(sidecar.stop().success());
    sidecar.restart().await;

    assert_eq!(tenant_of(&sidecar, "cus_acme_001").await, "acme-new");
    let paid = deliver(
        &sidecar,
        event(
            "evt_after_restart",
            "invoice.paid",
            now(),
            json!({"customer": "cus_acme_001"}),
        ),
    )
    .await
    .expect("delivered");
    assert_eq!(paid.tenant_id, "acme-new");
    assert!(is_on(&sidecar, "acme-new", "pro_features").await);

    // The first start seeded two customers; the restart changed nothing, so it left no record.
    let seeded = records(&sidecar, "tenant.mappings_seeded").await;
    assert_eq!(
        seeded.len(),
        1,
        "one record per seeding that changed something"
    );
    let counts = metadata(&seeded[0]);
    assert_eq!(
        (counts["added"].as_u64(), counts["configured"].as_u64()),
        (Some(2), Some(2))
    );
    assert_eq!(seeded[0].actor, "config");
}

#[tokio::test]
async fn a_restart_keeps_a_runtime_unmapping_over_the_tenants_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let options = tenants_file(dir.path());
    let mut sidecar = Sidecar::on_disk(dir.path(), options.clone()).await;
    assert_eq!(tenant_of(&sidecar, "cus_acme_001").await, "acme-corp");
    assert!(unmap(&sidecar, "cus_acme_001").await);

    assert!(sidecar.stop().success());
    sidecar.restart().await;

    let lookup = resolve(&sidecar, "cus_acme_001")
        .await
        .expect_err("still unmapped");
    assert_eq!(lookup.code(), tonic::Code::NotFound, "{lookup:?}");
    let refused = deliver(
        &sidecar,
        event(
            "evt_after_unmap",
            "invoice.paid",
            now(),
            json!({"customer": "cus_acme_001"}),
        ),
    )
    .await
    .expect_err("no tenant for an unmapped customer");
    assert_eq!(error_reason(&refused), "UNKNOWN_CUSTOMER");
    assert_eq!(problem(&refused).status, 422);
    assert_eq!(tenant_of(&sidecar, "cus_globex").await, "globex");

    // An unmapped customer is unmapped for checkouts too: its next checkout maps it.
    let checkout = deliver(
        &sidecar,
        event(
            "evt_checkout_after_unmap",
            "checkout.session.completed",
            now(),
            json!({"id": "cs_3", "customer": "cus_acme_001", "client_reference_id": "acme-new"}),
        ),
    )
    .await
    .expect("delivered");
    assert_eq!(checkout.tenant_id, "acme-new");
    assert_eq!(tenant_of(&sidecar, "cus_acme_001").await, "acme-new");
    assert!(sidecar.stop().success());
    drop(sidecar);

    // Only the explicit override lets the file map it back.
    let mut overriding = options;
    overriding.args.push("--tenants-file-overrides".into());
    let sidecar = Sidecar::on_disk(dir.path(), overriding).await;
    assert_eq!(tenant_of(&sidecar, "cus_acme_001").await, "acme-corp");
}

#[tokio::test]
async fn with_overrides_the_tenants_file_wins_at_start() {
    let dir = tempfile::tempdir().expect("temp dir");
    let options = tenants_file(dir.path());
    let mut sidecar = Sidecar::on_disk(dir.path(), options.clone()).await;
    map(&sidecar, "cus_acme_001", "acme-new").await;
    assert!(sidecar.stop().success());
    drop(sidecar);

    let mut overriding = options;
    overriding.args.push("--tenants-file-overrides".into());
    let sidecar = Sidecar::on_disk(dir.path(), overriding).await;
    assert_eq!(tenant_of(&sidecar, "cus_acme_001").await, "acme-corp");
    assert_eq!(tenant_of(&sidecar, "cus_globex").await, "globex");
    let seeded = records(&sidecar, "tenant.mappings_seeded").await;
    let last = metadata(seeded.last().expect("a seeding record"));
    assert_eq!(last["overridden"], 1);
    assert_eq!(last["unchanged"], 1);
    assert_eq!(
        last["moved"],
        json!([{"customer": "cus_acme_001", "from": "acme-new", "to": "acme-corp"}])
    );
}

#[tokio::test]
async fn a_checkout_cannot_move_a_mapped_customer() {
    let sidecar = Sidecar::start(Options::default()).await;
    map(&sidecar, "cus_taken", "acme-corp").await;
    let checkout = deliver(
        &sidecar,
        event(
            "evt_checkout_conflict",
            "checkout.session.completed",
            now(),
            json!({"id": "cs_1", "customer": "cus_taken", "client_reference_id": "intruder"}),
        ),
    )
    .await
    .expect("the event still applies");
    assert_eq!(checkout.tenant_id, "acme-corp");
    assert_eq!(tenant_of(&sidecar, "cus_taken").await, "acme-corp");

    let audited = records(&sidecar, "billing.checkout.session.completed").await;
    let [record] = audited.as_slice() else {
        panic!("one record for the checkout: {audited:?}")
    };
    assert_eq!(record.tenant_id, "acme-corp");
    let metadata = metadata(record);
    assert_eq!(metadata["mapping_refused"], true);
    assert_eq!(metadata["conflicting_client_reference_id"], "intruder");

    // An unmapped customer is still mapped by its checkout.
    let first = deliver(
        &sidecar,
        event(
            "evt_checkout_new",
            "checkout.session.completed",
            now(),
            json!({"id": "cs_2", "customer": "cus_fresh", "client_reference_id": "hooli"}),
        ),
    )
    .await
    .expect("delivered");
    assert_eq!(first.tenant_id, "hooli");
    assert_eq!(tenant_of(&sidecar, "cus_fresh").await, "hooli");
}

fn violation_fields(status: &tonic::Status) -> Vec<String> {
    let details =
        tonic_types::pb::Status::decode(status.details()).expect("google.rpc.Status details");
    details
        .details
        .iter()
        .filter(|d| d.type_url.ends_with("google.rpc.BadRequest"))
        .flat_map(|d| {
            tonic_types::pb::BadRequest::decode(d.value.as_slice())
                .expect("a BadRequest")
                .field_violations
        })
        .map(|v| v.field)
        .collect()
}

#[tokio::test]
async fn append_refuses_the_sidecars_own_namespaces() {
    let sidecar = Sidecar::start(Options::default()).await;
    let append = |event: &str, actor: &str| AppendAuditRequest {
        include_proof: false,
        tenant_id: "acme-corp".into(),
        actor: actor.into(),
        event: event.into(),
        outcome: "applied".into(),
        metadata: None,
        idempotency_key: String::new(),
    };
    for (event, actor, field) in [
        ("billing.invoice.paid", "app", "event"),
        ("billing.x", "stripe-webhook", "event"),
        ("auth.denied", "app", "event"),
        ("flag.set", "app", "event"),
        ("tenant.customer_mapped", "app", "event"),
        ("audit.checkpoint", "app", "event"),
        ("app.invoice.viewed", "stripe-webhook", "actor"),
    ] {
        let refused = sidecar
            .audit()
            .append(append(event, actor))
            .await
            .expect_err(event);
        assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{event}");
        assert_eq!(error_reason(&refused), "INVALID_ARGUMENT");
        assert!(
            violation_fields(&refused).contains(&field.to_owned()),
            "{event} by {actor}"
        );
    }
    assert!(
        records(&sidecar, "billing.").await.is_empty(),
        "nothing was written"
    );
    sidecar
        .audit()
        .append(append("app.invoice.viewed", "user:42"))
        .await
        .expect("application namespaces are open");
}

#[tokio::test]
async fn an_append_retried_with_its_idempotency_key_is_stored_once() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut sidecar = Sidecar::on_disk(dir.path(), Options::default()).await;
    let login = |key: &str, outcome: &str| AppendAuditRequest {
        include_proof: false,
        tenant_id: "acme-corp".into(),
        actor: "user:42".into(),
        event: "app.login".into(),
        outcome: outcome.into(),
        metadata: Some(prost_types::Struct {
            fields: [(
                "attempt".to_owned(),
                prost_types::Value {
                    kind: Some(prost_types::value::Kind::NumberValue(1.0)),
                },
            )]
            .into(),
        }),
        idempotency_key: key.into(),
    };
    let first = sidecar
        .audit()
        .append(login("6f1c1a52-key-1", "success"))
        .await
        .expect("first append")
        .into_inner();
    // The answer to the first call was lost, say, and the caller sends it again; after a
    // restart too, since the key is remembered in the store.
    sidecar.stop();
    sidecar.restart().await;
    let again = sidecar
        .audit()
        .append(login("6f1c1a52-key-1", "success"))
        .await
        .expect("the retry")
        .into_inner();
    assert_eq!((again.seq, &again.hash), (first.seq, &first.hash));
    let refused = sidecar
        .audit()
        .append(login("6f1c1a52-key-1", "failure"))
        .await
        .expect_err("another record under a used key");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert_eq!(error_reason(&refused), "IDEMPOTENCY_KEY_REUSED");
    assert!(
        !refused.message().contains(&format!("record {}", first.seq)),
        "the refusal names no record: {}",
        refused.message()
    );
    let invalid = sidecar
        .audit()
        .append(login("a key with spaces", "success"))
        .await
        .expect_err("a key with whitespace");
    assert_eq!(violation_fields(&invalid), ["idempotency_key"]);
    let other = sidecar
        .audit()
        .append(login("6f1c1a52-key-2", "success"))
        .await
        .expect("a fresh key appends")
        .into_inner();
    assert_eq!(other.seq, first.seq + 1);
    // Keys are each tenant's own: another tenant's record under the same key is its own.
    let globex = sidecar
        .audit()
        .append(AppendAuditRequest {
            include_proof: false,
            tenant_id: "globex".into(),
            ..login("6f1c1a52-key-1", "failure")
        })
        .await
        .expect("another tenant's key")
        .into_inner();
    assert_eq!(globex.seq, other.seq + 1);
    let logins = records(&sidecar, "app.login").await;
    assert_eq!(logins.len(), 3, "one record per tenant and key: {logins:?}");
}

#[tokio::test]
async fn a_huge_customer_id_gets_a_bounded_problem() {
    let sidecar = Sidecar::start(Options::default()).await;
    let customer = "c".repeat(100 * 1024);
    let refused = deliver(
        &sidecar,
        event(
            "evt_huge_customer",
            "invoice.paid",
            now(),
            json!({"customer": customer}),
        ),
    )
    .await
    .expect_err("no tenant for that customer");
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    assert_eq!(error_reason(&refused), "UNKNOWN_CUSTOMER");
    let problem = problem(&refused);
    assert_eq!(problem.status, 422);
    assert!(problem.detail.len() < 512, "{}", problem.detail);
    assert!(problem.detail.contains('…'), "{}", problem.detail);

    let audited = records(&sidecar, "billing.invoice.paid").await;
    let [record] = audited.as_slice() else {
        panic!("one record for the refusal: {audited:?}")
    };
    assert_eq!(record.outcome, "rejected");
    assert!(
        record.canonical.len() < 8 * 1024,
        "the refusal's record is bounded: {} bytes",
        record.canonical.len()
    );
}

#[tokio::test]
async fn a_huge_key_id_in_a_token_gets_a_bounded_problem() {
    use base64::Engine as _;
    let dir = tempfile::tempdir().expect("temp dir");
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, r#"{"keys": []}"#).expect("write the key set");
    let mut options = Options::default();
    options
        .args
        .extend(["--jwks-file".to_owned(), jwks.display().to_string()]);
    let sidecar = Sidecar::start(options).await;
    let part =
        |json: Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json.to_string());
    // Refused on the key id before any signature is checked, so none is needed; as long as
    // the sidecar's token bound allows.
    let token = format!(
        "{}.{}.c2ln",
        part(json!({"alg": "RS256", "typ": "JWT", "kid": "k".repeat(11 * 1024)})),
        part(json!({"sub": "someone", "tenant_id": "acme-corp"}))
    );
    let token_len_ok = token.len() <= coresdk::auth::token::MAX_TOKEN_LEN;
    let refused =
        coresdk::proto::auth_service_client::AuthServiceClient::new(sidecar.channel.clone())
            .verify_token(coresdk::proto::VerifyTokenRequest { token })
            .await
            .expect_err("no such key");
    assert!(
        token_len_ok,
        "the token stays under the sidecar's 16 KiB bound"
    );
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    let problem = problem(&refused);
    assert!(problem.detail.contains("key id"), "{}", problem.detail);
    assert!(problem.detail.len() < 512, "{}", problem.detail);
}

#[tokio::test]
async fn a_store_failure_shows_a_generic_detail_and_an_incident_id() {
    let dir = tempfile::tempdir().expect("temp dir");
    let sidecar = Sidecar::on_disk(dir.path(), Options::default()).await;
    // Another process holding the write lock past the sidecar's busy timeout is a real SQLite
    // failure ("database is locked") whose text must stay in the log.
    let holder = rusqlite::Connection::open(dir.path().join("coresdk.db")).expect("open");
    holder
        .execute_batch("BEGIN IMMEDIATE")
        .expect("take the write lock");
    let mut request = tonic::Request::new(AppendAuditRequest {
        include_proof: false,
        tenant_id: "acme-corp".into(),
        actor: "user:42".into(),
        event: "app.login".into(),
        outcome: "success".into(),
        metadata: None,
        idempotency_key: String::new(),
    });
    request.set_timeout(std::time::Duration::from_secs(30));
    let refused = sidecar
        .audit()
        .append(request)
        .await
        .expect_err("the store is locked");
    holder.execute_batch("ROLLBACK").expect("release");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert_eq!(error_reason(&refused), "STORE_UNAVAILABLE");
    let problem = problem(&refused);
    assert_eq!(problem.detail, "the store is unavailable; retry later");
    assert!(
        !refused.message().contains("locked"),
        "{}",
        refused.message()
    );
    assert!(
        problem.instance.starts_with("urn:coresdk:error:"),
        "{}",
        problem.instance
    );
}
