//! Webhook behaviour against the real binary: the SecurePay scenarios, every refusal,
//! duplicates, ordering, tenants and entitlements.
mod common;

use common::*;
use coresdk::proto::{QueryAuditRequest, WebhookOutcome};
use serde_json::json;
use tonic::Code;

async fn send(
    sidecar: &Sidecar,
    request: coresdk::proto::HandleStripeWebhookRequest,
) -> Result<coresdk::proto::HandleStripeWebhookResponse, tonic::Status> {
    sidecar
        .webhooks()
        .handle_stripe_webhook(request)
        .await
        .map(|r| r.into_inner())
}

fn mock_signed(body: Vec<u8>) -> coresdk::proto::HandleStripeWebhookRequest {
    signed("whsec_test_secret", body)
}

#[tokio::test]
async fn securepay_scenarios() {
    let sidecar = Sidecar::mock().await;
    let t = now();

    // invoice.paid → pro_features on for acme-corp.
    assert!(flag(&sidecar, "acme-corp", "pro_features").await.is_default);
    let paid = send(
        &sidecar,
        mock_signed(event(
            "evt_paid_1",
            "invoice.paid",
            t,
            json!({"id": "in_1", "customer": "cus_acme_001"}),
        )),
    )
    .await
    .expect("invoice.paid accepted");
    assert_eq!(paid.outcome(), WebhookOutcome::Applied);
    assert_eq!(paid.tenant_id, "acme-corp");
    assert!(is_on(&sidecar, "acme-corp", "pro_features").await);
    assert!(!is_on(&sidecar, "acme-corp", "paywall_active").await);
    let audited = sidecar
        .audit()
        .query(QueryAuditRequest {
            tenant_id: "acme-corp".into(),
            event_prefix: "billing.invoice.paid".into(),
            ..Default::default()
        })
        .await
        .expect("Query")
        .into_inner();
    assert_eq!(audited.records.len(), 1);
    let record = &audited.records[0];
    assert_eq!(
        (record.actor.as_str(), record.outcome.as_str()),
        ("stripe-webhook", "applied")
    );
    assert_eq!(record.seq, paid.audit_seq);

    // payment.failed → pro_features off, paywall on for globex.
    send(
        &sidecar,
        mock_signed(event(
            "evt_paid_2",
            "invoice.paid",
            t - 10,
            json!({"customer": "cus_globex_001"}),
        )),
    )
    .await
    .expect("accepted");
    let failed = send(
        &sidecar,
        mock_signed(event(
            "evt_failed_1",
            "payment.failed",
            t,
            json!({"customer": "cus_globex_001"}),
        )),
    )
    .await
    .expect("payment.failed accepted");
    assert_eq!(failed.outcome(), WebhookOutcome::Applied);
    assert!(!is_on(&sidecar, "globex", "pro_features").await);
    assert!(is_on(&sidecar, "globex", "paywall_active").await);
    let audited = sidecar
        .audit()
        .query(QueryAuditRequest {
            event_prefix: "billing.payment.failed".into(),
            ..Default::default()
        })
        .await
        .expect("Query")
        .into_inner();
    assert_eq!(audited.records[0].tenant_id, "globex");

    // subscription.upgraded → advanced_analytics on for initech.
    assert!(!is_on(&sidecar, "initech", "advanced_analytics").await);
    let upgraded = send(
        &sidecar,
        mock_signed(event(
            "evt_up_1",
            "subscription.upgraded",
            t,
            json!({"customer": "cus_initech_001"}),
        )),
    )
    .await
    .expect("accepted");
    assert_eq!(upgraded.flag_changes.len(), 1);
    assert_eq!(upgraded.flag_changes[0].key, "advanced_analytics");
    assert!(is_on(&sidecar, "initech", "advanced_analytics").await);

    // customer.subscription.updated, active on an enterprise price, does the same.
    let updated = send(
        &sidecar,
        mock_signed(event(
            "evt_up_2",
            "customer.subscription.updated",
            t,
            json!({"customer": "cus_acme_001", "status": "active", "items": {"data": [{"price": {"lookup_key": "enterprise_monthly"}}]}}),
        )),
    )
    .await
    .expect("accepted");
    assert_eq!(updated.outcome(), WebhookOutcome::Applied);
    assert!(is_on(&sidecar, "acme-corp", "advanced_analytics").await);
}

#[tokio::test]
async fn refusals_answer_problems_and_are_audited() {
    let sidecar = Sidecar::start(Options::default()).await;
    let body = event("evt_r", "invoice.paid", now(), json!({"customer": "cus_x"}));
    let good = signed(SECRET, body.clone());

    let cases: Vec<(&str, coresdk::proto::HandleStripeWebhookRequest, &str)> = vec![
        (
            "forged",
            signed("whsec_wrong", body.clone()),
            "SIGNATURE_MISMATCH",
        ),
        (
            "missing header",
            coresdk::proto::HandleStripeWebhookRequest {
                include_proof: false,
                payload: body.clone(),
                signature_header: String::new(),
            },
            "SIGNATURE_MISSING",
        ),
        (
            "malformed header",
            coresdk::proto::HandleStripeWebhookRequest {
                include_proof: false,
                payload: body.clone(),
                signature_header: "t=1,v1=zz".into(),
            },
            "SIGNATURE_MALFORMED",
        ),
        (
            "no v1",
            coresdk::proto::HandleStripeWebhookRequest {
                include_proof: false,
                payload: body.clone(),
                signature_header: format!("t={},v0={}", now(), "a".repeat(64)),
            },
            "SIGNATURE_MALFORMED",
        ),
        (
            "replayed",
            coresdk::proto::HandleStripeWebhookRequest {
                include_proof: false,
                payload: body.clone(),
                signature_header: coresdk::stripe::sign_header(SECRET, now() - 301, &body),
            },
            "SIGNATURE_TIMESTAMP_OUT_OF_TOLERANCE",
        ),
        (
            "from the future",
            coresdk::proto::HandleStripeWebhookRequest {
                include_proof: false,
                payload: body.clone(),
                signature_header: coresdk::stripe::sign_header(SECRET, now() + 330, &body),
            },
            "SIGNATURE_TIMESTAMP_OUT_OF_TOLERANCE",
        ),
        (
            "tampered body",
            coresdk::proto::HandleStripeWebhookRequest {
                include_proof: false,
                payload: event("evt_r", "invoice.paid", now(), json!({"customer": "cus_y"})),
                signature_header: good.signature_header.clone(),
            },
            "SIGNATURE_MISMATCH",
        ),
        (
            "not json",
            signed(SECRET, b"hello".to_vec()),
            "INVALID_EVENT",
        ),
        (
            "no id",
            signed(SECRET, br#"{"type":"invoice.paid"}"#.to_vec()),
            "INVALID_EVENT",
        ),
        (
            "no type",
            signed(SECRET, br#"{"id":"evt_1"}"#.to_vec()),
            "INVALID_EVENT",
        ),
        (
            // Standing a delivery's signature timestamp in for it would make the outcome
            // depend on which attempt committed.
            "no created",
            signed(
                SECRET,
                br#"{"id":"evt_1","type":"invoice.paid","data":{"object":{"customer":"cus_y"}}}"#
                    .to_vec(),
            ),
            "INVALID_EVENT",
        ),
    ];
    for (name, request, reason) in cases {
        let status = send(&sidecar, request).await.expect_err(name);
        assert_eq!(error_reason(&status), reason, "{name}: {status:?}");
        let problem = problem(&status);
        if name == "no created" {
            assert!(
                problem.detail.contains("no `created`"),
                "{}",
                problem.detail
            );
        }
        assert_eq!(problem.status, 400, "{name}");
        assert!(problem.r#type.starts_with("https://"), "{name}");
        assert!(
            !problem.detail.contains(SECRET),
            "{name}: the secret leaked"
        );
        assert!(
            matches!(status.code(), Code::Unauthenticated | Code::InvalidArgument),
            "{name}"
        );
    }
    // Refused deliveries are coalesced per reason and written off the request path
    // (tests/abuse.rs covers the counts): the first of each of the five reasons, at once.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let refused = loop {
        let refused = sidecar
            .audit()
            .query(QueryAuditRequest {
                event_prefix: "billing.webhook.refused".into(),
                ..Default::default()
            })
            .await
            .expect("Query")
            .into_inner();
        if refused.records.len() >= 5 || std::time::Instant::now() > deadline {
            break refused;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let mut reasons: Vec<String> = refused
        .records
        .iter()
        .filter_map(
            |r| match r.metadata.as_ref()?.fields.get("reason")?.kind.as_ref()? {
                prost_types::value::Kind::StringValue(reason) => Some(reason.clone()),
                _ => None,
            },
        )
        .collect();
    reasons.sort();
    assert_eq!(
        reasons,
        [
            "INVALID_EVENT",
            "SIGNATURE_MALFORMED",
            "SIGNATURE_MISMATCH",
            "SIGNATURE_MISSING",
            "SIGNATURE_TIMESTAMP_OUT_OF_TOLERANCE"
        ],
        "one record per refusal reason"
    );

    // An oversized body is refused with 413 and the server keeps serving.
    let mut big = event(
        "evt_big",
        "invoice.paid",
        now(),
        json!({"customer": "cus_x"}),
    );
    big.extend(std::iter::repeat_n(b' ', 1024 * 1024));
    let status = send(&sidecar, signed(SECRET, big))
        .await
        .expect_err("too large");
    assert_eq!(problem(&status).status, 413);
    let mut huge = vec![b' '; 6 * 1024 * 1024];
    huge[0] = b'{';
    let status = send(&sidecar, signed(SECRET, huge))
        .await
        .expect_err("far too large");
    assert!(matches!(
        status.code(),
        Code::InvalidArgument | Code::ResourceExhausted | Code::OutOfRange
    ));
    assert!(
        !is_on(&sidecar, "nobody", "pro_features").await,
        "still serving"
    );

    // Unknown customer → 422, audited and parked; the mapping applies it, so Stripe's retry
    // is a duplicate.
    let unknown = signed(
        SECRET,
        event(
            "evt_unknown",
            "invoice.paid",
            now(),
            json!({"customer": "cus_new"}),
        ),
    );
    let status = send(&sidecar, unknown.clone())
        .await
        .expect_err("unknown customer");
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(problem(&status).status, 422);
    sidecar
        .tenants()
        .map_customer(admin(coresdk::proto::MapCustomerRequest {
            customer_id: "cus_new".into(),
            tenant_id: "newco".into(),
            actor: "ops@example.com".into(),
            reason: "onboarding".into(),
        }))
        .await
        .expect("MapCustomer");
    assert!(is_on(&sidecar, "newco", "pro_features").await);
    let retried = send(&sidecar, signed(SECRET, unknown.payload))
        .await
        .expect("retry acknowledged");
    assert_eq!(
        (retried.outcome(), retried.tenant_id.as_str()),
        (WebhookOutcome::Duplicate, "newco")
    );
    let rejected = sidecar
        .audit()
        .query(QueryAuditRequest {
            outcome: "rejected".into(),
            event_prefix: "billing.invoice.paid".into(),
            ..Default::default()
        })
        .await
        .expect("Query")
        .into_inner();
    assert_eq!(rejected.records.len(), 1);
}

#[tokio::test]
async fn no_secret_configured_refuses_webhooks_but_serves() {
    let sidecar = Sidecar::start(Options {
        args: vec!["--store".into(), "memory".into()],
        envs: vec![],
    })
    .await;
    let status = send(
        &sidecar,
        signed(SECRET, event("evt_1", "invoice.paid", now(), json!({}))),
    )
    .await
    .expect_err("no secret");
    assert_eq!(error_reason(&status), "WEBHOOK_SECRET_MISSING");
    assert!(flag(&sidecar, "acme", "pro_features").await.is_default);
}

#[tokio::test]
async fn rotation_accepts_every_configured_secret() {
    let sidecar = Sidecar::start(Options {
        args: vec!["--store".into(), "memory".into()],
        envs: vec![(
            "STRIPE_WEBHOOK_SECRET".into(),
            format!("whsec_old, {SECRET}"),
        )],
    })
    .await;
    for (i, secret) in ["whsec_old", SECRET].into_iter().enumerate() {
        let body = event(
            &format!("evt_rot_{i}"),
            "charge.succeeded",
            now(),
            json!({}),
        );
        let answer = send(&sidecar, signed(secret, body))
            .await
            .expect("accepted");
        assert_eq!(answer.outcome(), WebhookOutcome::Ignored);
    }
}

#[tokio::test]
async fn duplicates_stale_and_ignored_events() {
    let sidecar = Sidecar::mock().await;
    let t = now();
    let paid = mock_signed(event(
        "evt_d1",
        "invoice.paid",
        t,
        json!({"customer": "cus_acme_001"}),
    ));
    let first = send(&sidecar, paid.clone()).await.expect("first");
    assert_eq!(first.outcome(), WebhookOutcome::Applied);
    let version = flag(&sidecar, "acme-corp", "pro_features").await.version;

    let again = send(&sidecar, mock_signed(paid.payload.clone()))
        .await
        .expect("redelivery");
    assert_eq!(again.outcome(), WebhookOutcome::Duplicate);
    assert_eq!(again.tenant_id, "acme-corp");
    assert!(again.flag_changes.is_empty());
    assert!(
        again.audit_seq > first.audit_seq,
        "the redelivery is audited too"
    );
    assert_eq!(
        flag(&sidecar, "acme-corp", "pro_features").await.version,
        version
    );

    // An older failure arriving after a newer payment must not lock the tenant out.
    let late = send(
        &sidecar,
        mock_signed(event(
            "evt_d0",
            "invoice.payment_failed",
            t - 60,
            json!({"customer": "cus_acme_001"}),
        )),
    )
    .await
    .expect("late event");
    assert_eq!(late.outcome(), WebhookOutcome::Stale);
    assert_eq!(late.stale_flags, vec!["paywall_active", "pro_features"]);
    assert!(is_on(&sidecar, "acme-corp", "pro_features").await);
    assert!(!is_on(&sidecar, "acme-corp", "paywall_active").await);

    // A newer failure does apply.
    let newer = send(
        &sidecar,
        mock_signed(event(
            "evt_d2",
            "invoice.payment_failed",
            t + 1,
            json!({"customer": "cus_acme_001"}),
        )),
    )
    .await
    .expect("newer event");
    assert_eq!(newer.outcome(), WebhookOutcome::Applied);
    assert!(!is_on(&sidecar, "acme-corp", "pro_features").await);

    let ignored = send(
        &sidecar,
        mock_signed(event(
            "evt_i",
            "charge.refunded",
            t,
            json!({"customer": "cus_acme_001"}),
        )),
    )
    .await
    .expect("ignored");
    assert_eq!(
        (ignored.outcome(), ignored.tenant_id.as_str()),
        (WebhookOutcome::Ignored, "acme-corp")
    );
    let audited = sidecar
        .audit()
        .query(QueryAuditRequest {
            tenant_id: "acme-corp".into(),
            ..Default::default()
        })
        .await
        .expect("Query")
        .into_inner();
    let outcomes: Vec<&str> = audited
        .records
        .iter()
        .filter(|r| r.actor == "stripe-webhook")
        .map(|r| r.outcome.as_str())
        .collect();
    assert_eq!(
        outcomes,
        vec!["applied", "duplicate", "stale", "applied", "ignored"]
    );
}

#[tokio::test]
async fn checkout_maps_tenants_and_entitlements_drive_flags() {
    let sidecar = Sidecar::mock().await;
    let t = now();
    let checkout = send(
        &sidecar,
        mock_signed(event(
            "evt_co",
            "checkout.session.completed",
            t,
            json!({"id": "cs_1", "customer": "cus_hooli", "client_reference_id": "hooli"}),
        )),
    )
    .await
    .expect("checkout");
    assert_eq!(
        (checkout.outcome(), checkout.tenant_id.as_str()),
        (WebhookOutcome::Applied, "hooli")
    );
    let paid = send(
        &sidecar,
        mock_signed(event(
            "evt_co2",
            "invoice.paid",
            t,
            json!({"customer": "cus_hooli"}),
        )),
    )
    .await
    .expect("mapped by checkout");
    assert_eq!(paid.tenant_id, "hooli");

    // metadata.tenant_id is the fallback when no mapping exists.
    let by_metadata = send(
        &sidecar,
        mock_signed(event(
            "evt_md",
            "invoice.paid",
            t,
            json!({"customer": "cus_unmapped", "metadata": {"tenant_id": "piedpiper"}}),
        )),
    )
    .await
    .expect("metadata tenant");
    assert_eq!(by_metadata.tenant_id, "piedpiper");

    let summary = |id: &str, created: i64, keys: &[&str]| {
        let data: Vec<_> = keys
            .iter()
            .map(|k| json!({"object": "entitlements.active_entitlement", "lookup_key": k}))
            .collect();
        mock_signed(event(
            id,
            "entitlements.active_entitlement_summary.updated",
            created,
            json!({"object": "entitlements.active_entitlement_summary", "customer": "cus_hooli", "entitlements": {"data": data}}),
        ))
    };
    send(&sidecar, summary("evt_e1", t, &["sso", "audit_export"]))
        .await
        .expect("summary 1");
    assert!(is_on(&sidecar, "hooli", "sso").await);
    assert!(is_on(&sidecar, "hooli", "audit_export").await);
    let second = send(&sidecar, summary("evt_e2", t + 1, &["sso"]))
        .await
        .expect("summary 2");
    assert_eq!(second.flag_changes.len(), 1);
    assert!(is_on(&sidecar, "hooli", "sso").await);
    assert!(
        !is_on(&sidecar, "hooli", "audit_export").await,
        "a feature that left the summary turns off"
    );
}
