//! The rest of the public surface against the real binary: health, reflection, admin access,
//! flag reads and watches, audit append/query/tail, the CLI and configuration errors.
mod common;

use common::*;
use coresdk::proto::{self, FlagValue, flag_value::Kind};
use serde_json::json;
use tokio_stream::StreamExt as _;
use tonic::Code;

#[tokio::test]
async fn health_and_reflection() {
    let sidecar = Sidecar::start(Options::default()).await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(sidecar.channel.clone());
    for service in ["", "coresdk.v1.WebhookService", "coresdk.v1.FlagService"] {
        let answer = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("Check")
            .into_inner();
        assert_eq!(
            answer.status(),
            tonic_health::pb::health_check_response::ServingStatus::Serving
        );
    }

    let probe = std::process::Command::new(binary())
        .args(["health", "--addr", &sidecar.addr])
        .output()
        .expect("runs");
    assert!(probe.status.success(), "{probe:?}");
    let unreachable = std::process::Command::new(binary())
        .args(["health", "--addr", "127.0.0.1:1"])
        .output()
        .expect("runs");
    assert!(!unreachable.status.success());

    use tonic_reflection::pb::{v1, v1alpha};
    let mut client =
        v1::server_reflection_client::ServerReflectionClient::new(sidecar.channel.clone());
    let request = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .expect("reflection v1")
        .into_inner();
    let Some(Ok(response)) = responses.next().await else {
        panic!("no reflection answer")
    };
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        response.message_response
    else {
        panic!("not a service list")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for expected in [
        "coresdk.v1.WebhookService",
        "coresdk.v1.FlagService",
        "coresdk.v1.AuditService",
        "coresdk.v1.TenantService",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} missing from {names:?}"
        );
    }

    let mut alpha =
        v1alpha::server_reflection_client::ServerReflectionClient::new(sidecar.channel.clone());
    let request = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::FileContainingSymbol(
                "coresdk.v1.WebhookService".into(),
            ),
        ),
    };
    let mut responses = alpha
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .expect("reflection v1alpha")
        .into_inner();
    let Some(Ok(response)) = responses.next().await else {
        panic!("no reflection answer")
    };
    assert!(matches!(
        response.message_response,
        Some(v1alpha::server_reflection_response::MessageResponse::FileDescriptorResponse(_))
    ));
}

fn set_request(tenant: &str, key: &str, value: Kind) -> proto::SetFlagRequest {
    proto::SetFlagRequest {
        tenant_id: tenant.into(),
        key: key.into(),
        value: Some(FlagValue { kind: Some(value) }),
        actor: "ops@example.com".into(),
        reason: "support ticket 42".into(),
    }
}

#[tokio::test]
async fn admin_rpcs_need_the_admin_token() {
    let sidecar = Sidecar::start(Options::default()).await;
    let mut flags = sidecar.flags();
    let status = flags
        .set_flag(set_request("acme", "pro_features", Kind::BoolValue(true)))
        .await
        .expect_err("no token");
    assert_eq!(status.code(), Code::Unauthenticated);
    assert_eq!(problem(&status).status, 401);

    let mut wrong = tonic::Request::new(set_request("acme", "pro_features", Kind::BoolValue(true)));
    wrong.metadata_mut().insert(
        "authorization",
        "Bearer not-the-token".parse().expect("ascii"),
    );
    assert_eq!(
        flags.set_flag(wrong).await.expect_err("wrong token").code(),
        Code::Unauthenticated
    );

    let set = flags
        .set_flag(admin(set_request(
            "acme",
            "pro_features",
            Kind::BoolValue(true),
        )))
        .await
        .expect("right token")
        .into_inner();
    // CORESDK_ADMIN_TOKEN is the operator `admin`; the claimed actor stays in the audit.
    assert_eq!(set.updated_by, "admin");
    assert!(is_on(&sidecar, "acme", "pro_features").await);

    let audited = sidecar
        .audit()
        .query(proto::QueryAuditRequest {
            event_prefix: "flag.set".into(),
            ..Default::default()
        })
        .await
        .expect("Query")
        .into_inner();
    let metadata = audited.records[0].metadata.clone().expect("metadata");
    assert!(metadata.fields.contains_key("reason"));
    assert_eq!(
        metadata.fields["claimed_actor"].kind,
        Some(prost_types::value::Kind::StringValue(
            "ops@example.com".into()
        ))
    );
    assert!(!format!("{metadata:?}").contains(ADMIN_TOKEN));

    // Without a configured admin token, admin RPCs are refused outright.
    let open = Sidecar::start(Options {
        args: vec!["--store".into(), "memory".into()],
        envs: vec![],
    })
    .await;
    let status = open
        .tenants()
        .resolve_customer(admin(proto::ResolveCustomerRequest {
            customer_id: "cus_1".into(),
        }))
        .await
        .expect_err("disabled");
    assert_eq!(status.code(), Code::PermissionDenied);
}

#[tokio::test]
async fn flag_reads_validate_and_type_values() {
    let sidecar = Sidecar::start(Options::default()).await;
    let mut flags = sidecar.flags();
    let status = flags
        .get_flag(proto::GetFlagRequest {
            tenant_id: "acme".into(),
            key: "no_such_flag".into(),
        })
        .await
        .expect_err("undefined");
    assert_eq!(status.code(), Code::NotFound);
    for (tenant, key) in [
        ("", "pro_features"),
        ("acme", ""),
        ("has space", "pro_features"),
        ("acme", "bad key!"),
    ] {
        let status = flags
            .get_flag(proto::GetFlagRequest {
                tenant_id: tenant.into(),
                key: key.into(),
            })
            .await
            .expect_err("invalid");
        assert_eq!(status.code(), Code::InvalidArgument, "{tenant:?}/{key:?}");
        assert_eq!(problem(&status).status, 400);
    }

    let json_value =
        coresdk::api::convert::to_proto_value(&json!({"limit": 5, "tiers": ["a", "b"]}));
    for (key, kind) in [
        ("theme", Kind::StringValue("dark".into())),
        ("seats", Kind::NumberValue(25.0)),
        ("quota", Kind::JsonValue(json_value)),
    ] {
        flags
            .set_flag(admin(set_request("acme", key, kind.clone())))
            .await
            .expect("SetFlag");
        let read = flag(&sidecar, "acme", key).await;
        assert_eq!(read.value.and_then(|v| v.kind), Some(kind));
    }
    let bad = flags
        .set_flag(admin(set_request(
            "acme",
            "seats",
            Kind::NumberValue(f64::NAN),
        )))
        .await
        .expect_err("NaN");
    assert_eq!(bad.code(), Code::InvalidArgument);
    let mut missing_actor = set_request("acme", "seats", Kind::NumberValue(1.0));
    missing_actor.actor.clear();
    assert_eq!(
        flags
            .set_flag(admin(missing_actor))
            .await
            .expect_err("actor")
            .code(),
        Code::InvalidArgument
    );

    let all = flags
        .get_flags(proto::GetFlagsRequest {
            tenant_id: "acme".into(),
        })
        .await
        .expect("GetFlags")
        .into_inner();
    let keys: Vec<&str> = all.flags.iter().map(|f| f.key.as_str()).collect();
    assert_eq!(
        keys,
        vec![
            "advanced_analytics",
            "paywall_active",
            "pro_features",
            "quota",
            "seats",
            "theme"
        ]
    );
}

#[tokio::test]
async fn watch_sends_a_snapshot_then_every_change() {
    let sidecar = Sidecar::mock().await;
    let mut watch = sidecar
        .flags()
        .watch_flags(proto::WatchFlagsRequest {
            tenant_id: "acme-corp".into(),
        })
        .await
        .expect("WatchFlags")
        .into_inner();
    let first = watch.next().await.expect("a message").expect("ok");
    let Some(proto::watch_flags_response::Event::Snapshot(snapshot)) = first.event else {
        panic!("snapshot first")
    };
    assert_eq!(snapshot.flags.len(), 3, "catalog defaults");

    let body = event(
        "evt_w",
        "invoice.paid",
        now(),
        json!({"customer": "cus_acme_001"}),
    );
    sidecar
        .webhooks()
        .handle_stripe_webhook(signed("whsec_test_secret", body))
        .await
        .expect("applied");
    sidecar
        .webhooks()
        .handle_stripe_webhook(signed(
            "whsec_test_secret",
            event(
                "evt_w2",
                "invoice.paid",
                now(),
                json!({"customer": "cus_globex_001"}),
            ),
        ))
        .await
        .expect("other tenant");
    let mut seen = Vec::new();
    for _ in 0..2 {
        let message = tokio::time::timeout(std::time::Duration::from_secs(5), watch.next())
            .await
            .expect("a change arrives")
            .expect("a message")
            .expect("ok");
        let Some(proto::watch_flags_response::Event::Change(change)) = message.event else {
            panic!("a change")
        };
        assert_eq!(change.tenant_id, "acme-corp", "only the watched tenant");
        assert!(change.version > snapshot.version);
        seen.push((change.key, bool_value_of(&change.value)));
    }
    seen.sort();
    assert_eq!(
        seen,
        vec![
            ("paywall_active".into(), Some(false)),
            ("pro_features".into(), Some(true))
        ]
    );
}

fn bool_value_of(value: &Option<FlagValue>) -> Option<bool> {
    match value.as_ref()?.kind.as_ref()? {
        Kind::BoolValue(b) => Some(*b),
        _ => None,
    }
}

#[tokio::test]
async fn audit_append_query_pages_and_tail() {
    let sidecar = Sidecar::start(Options::default()).await;
    let mut audit = sidecar.audit();
    let mut tail = audit
        .tail(proto::TailAuditRequest {
            from_seq: 0,
            tenant_id: "acme".into(),
        })
        .await
        .expect("Tail")
        .into_inner();
    for i in 0..25 {
        let metadata =
            coresdk::api::convert::to_proto_struct(json!({"i": i}).as_object().expect("object"));
        audit
            .append(proto::AppendAuditRequest {
                include_proof: false,
                tenant_id: if i % 5 == 0 {
                    "other".into()
                } else {
                    "acme".into()
                },
                actor: "user:42".into(),
                event: format!("app.export.{}", if i % 2 == 0 { "csv" } else { "pdf" }),
                outcome: "success".into(),
                metadata: Some(metadata),
                idempotency_key: String::new(),
            })
            .await
            .expect("Append");
    }
    let mut collected = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = audit
            .query(proto::QueryAuditRequest {
                tenant_id: "acme".into(),
                event_prefix: "app.export.".into(),
                page_size: 7,
                page_token,
                ..Default::default()
            })
            .await
            .expect("Query")
            .into_inner();
        assert!(page.records.len() <= 7);
        collected.extend(page.records);
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert_eq!(collected.len(), 20);
    assert!(collected.windows(2).all(|w| w[0].seq < w[1].seq));

    let pdf = audit
        .query(proto::QueryAuditRequest {
            event_prefix: "app.export.pdf".into(),
            page_size: 100,
            ..Default::default()
        })
        .await
        .expect("Query")
        .into_inner();
    assert_eq!(pdf.records.len(), 12);
    let future = audit
        .query(proto::QueryAuditRequest {
            since: Some(coresdk::api::convert::timestamp_from_ms(
                coresdk::time::now_ms() + 60_000,
            )),
            ..Default::default()
        })
        .await
        .expect("Query")
        .into_inner();
    assert!(future.records.is_empty());
    let bad = audit
        .query(proto::QueryAuditRequest {
            page_token: "garbage".into(),
            ..Default::default()
        })
        .await
        .expect_err("bad token");
    assert_eq!(bad.code(), Code::InvalidArgument);

    for i in 0..20 {
        let record = tokio::time::timeout(std::time::Duration::from_secs(5), tail.next())
            .await
            .expect("tail delivers")
            .expect("a record")
            .expect("ok");
        assert_eq!(record.tenant_id, "acme", "record {i}");
    }

    let invalid = audit
        .append(proto::AppendAuditRequest {
            include_proof: false,
            actor: String::new(),
            event: "x".into(),
            outcome: "y".into(),
            ..Default::default()
        })
        .await
        .expect_err("actor required");
    assert_eq!(invalid.code(), Code::InvalidArgument);
    let big = coresdk::api::convert::to_proto_struct(
        json!({"blob": "x".repeat(5000)})
            .as_object()
            .expect("object"),
    );
    let too_big = audit
        .append(proto::AppendAuditRequest {
            include_proof: false,
            actor: "a".into(),
            event: "x".into(),
            outcome: "y".into(),
            metadata: Some(big),
            ..Default::default()
        })
        .await
        .expect_err("metadata bound");
    assert_eq!(too_big.code(), Code::InvalidArgument);
    let verified = audit
        .verify(proto::VerifyAuditRequest::default())
        .await
        .expect("Verify")
        .into_inner();
    assert!(
        verified.ok && verified.records_checked == 25,
        "{verified:?}"
    );
}

#[test]
fn stripe_sign_matches_the_published_vector() {
    use std::io::Write as _;
    let mut child = std::process::Command::new(binary())
        .args([
            "stripe",
            "sign",
            "--secret",
            "whsec_test_secret",
            "--timestamp",
            "1492774577",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("runs");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(br#"{"id":"evt_test_webhook","object":"event"}"#)
        .expect("write body");
    let output = child.wait_with_output().expect("exits");
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        "t=1492774577,v1=88a022085c6bdb887b02cb26ff76dd681234d9675c0f22844059f55552a8883a"
    );
}

#[test]
fn bad_configuration_stops_the_start_with_one_line_naming_the_setting() {
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
    let cases: [Case; 5] = [
        (&["--store", "mysql://x"], &[], "CORESDK_STORE"),
        (
            &[],
            &[("CORESDK_RULES_FILE", "/nonexistent/rules.toml")],
            "CORESDK_RULES_FILE",
        ),
        (
            &[],
            &[("CORESDK_TENANTS_FILE", "/nonexistent/tenants.json")],
            "CORESDK_TENANTS_FILE",
        ),
        (
            &[],
            &[("STRIPE_WEBHOOK_SECRET_FILE", "/nonexistent/secret")],
            "STRIPE_WEBHOOK_SECRET_FILE",
        ),
        (
            &[],
            &[("CORESDK_ADMIN_TOKEN", "short")],
            "CORESDK_ADMIN_TOKEN",
        ),
    ];
    for (args, envs, setting) in cases {
        let output = std::process::Command::new(binary())
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(args)
            .env_clear()
            .envs(envs.iter().copied())
            .output()
            .expect("runs");
        assert_eq!(output.status.code(), Some(2), "{setting}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        assert!(stderr.contains(setting), "{stderr}");
    }
}

#[tokio::test]
async fn sigterm_reports_not_serving_and_exits_cleanly() {
    let mut sidecar = Sidecar::start(Options::default()).await;
    let status = sidecar.stop();
    assert!(status.success(), "{status:?}");
}
