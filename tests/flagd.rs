//! The flagd evaluation service (`flagd.evaluation.v1` and `v2`) against the real binary, with
//! clients generated from the vendored flagd protos.
mod common;

use std::time::Duration;

use common::flagd::{
    changed_keys, context, mock, pay, set, spawn_tls_side, start, tls_channel, v1_client, v2_client,
};
use common::*;
use coresdk::flagd_proto::evaluation::{v1, v2};
use coresdk::proto::flag_value::Kind;
use coresdk::settings::SideListener;
use tonic::Code;

fn boolean(key: &str, ctx: &[(&str, &str)]) -> v2::ResolveBooleanRequest {
    v2::ResolveBooleanRequest {
        flag_key: key.into(),
        context: context(ctx),
    }
}

#[tokio::test]
async fn a_tenants_boolean_follows_a_stripe_webhook() {
    let (sidecar, addr) = start(mock()).await;
    let channel = connect(&addr).await;
    let mut v2 = v2_client(&channel);
    let mut v1 = v1_client(&channel);

    let before = v2
        .resolve_boolean(boolean("pro_features", &[("tenant_id", "acme-corp")]))
        .await
        .expect("ResolveBoolean")
        .into_inner();
    assert_eq!(
        (
            before.value,
            before.reason.as_str(),
            before.variant.as_deref()
        ),
        (Some(false), "DEFAULT", Some("default"))
    );

    pay(&sidecar, "evt_paid_flagd", "cus_acme_001").await;

    let after = v2
        .resolve_boolean(boolean("pro_features", &[("tenant_id", "acme-corp")]))
        .await
        .expect("ResolveBoolean")
        .into_inner();
    assert_eq!(
        (after.value, after.reason.as_str(), after.variant.as_deref()),
        (Some(true), "TARGETING_MATCH", Some("tenant"))
    );
    // The targetingKey names the tenant when the tenant attribute is absent; the attribute
    // wins when both are there.
    let by_key = v2
        .resolve_boolean(boolean("pro_features", &[("targetingKey", "acme-corp")]))
        .await
        .expect("ResolveBoolean")
        .into_inner();
    assert_eq!(
        (by_key.value, by_key.reason.as_str()),
        (Some(true), "TARGETING_MATCH")
    );
    let attribute_wins = v2
        .resolve_boolean(boolean(
            "pro_features",
            &[("tenant_id", "globex"), ("targetingKey", "acme-corp")],
        ))
        .await
        .expect("ResolveBoolean")
        .into_inner();
    assert_eq!(
        (attribute_wins.value, attribute_wins.reason.as_str()),
        (Some(false), "DEFAULT")
    );
    // A tenant the sidecar never heard of, a targetingKey no tenant can have (a user's name
    // and email: it names no tenant, it is no error), and no context at all: the catalog
    // default.
    for ctx in [
        vec![("tenant_id", "nobody")],
        vec![("targetingKey", "Jane Doe <jane@example.com>")],
        vec![],
    ] {
        let default = v2
            .resolve_boolean(boolean("pro_features", &ctx))
            .await
            .expect("ResolveBoolean")
            .into_inner();
        assert_eq!(
            (default.value, default.reason.as_str()),
            (Some(false), "DEFAULT")
        );
    }

    // v1, the older providers' protocol, answers alike.
    let old = v1
        .resolve_boolean(v1::ResolveBooleanRequest {
            flag_key: "pro_features".into(),
            context: context(&[("tenant_id", "acme-corp")]),
        })
        .await
        .expect("v1 ResolveBoolean")
        .into_inner();
    assert_eq!((old.value, old.reason.as_str()), (true, "TARGETING_MATCH"));
    let all = v1
        .resolve_all(v1::ResolveAllRequest {
            context: context(&[("targetingKey", "acme-corp")]),
        })
        .await
        .expect("ResolveAll")
        .into_inner();
    let pro = &all.flags["pro_features"];
    assert_eq!(pro.reason, "TARGETING_MATCH");
    assert_eq!(pro.value, Some(v1::any_flag::Value::BoolValue(true)));
    let nobody = v1
        .resolve_all(v1::ResolveAllRequest {
            context: context(&[("targetingKey", "nobody")]),
        })
        .await
        .expect("ResolveAll")
        .into_inner();
    assert!(!nobody.flags.is_empty());
    assert!(
        nobody.flags.values().all(|flag| flag.reason == "DEFAULT"),
        "{nobody:?}"
    );
}

#[tokio::test]
async fn strings_numbers_objects_and_errors_as_flagd_answers_them() {
    let (sidecar, addr) = start(mock()).await;
    let mut v2 = v2_client(&connect(&addr).await);
    set(
        &sidecar,
        "acme-corp",
        "plan",
        Kind::StringValue("pro".into()),
    )
    .await;
    set(&sidecar, "acme-corp", "seats", Kind::NumberValue(40.0)).await;
    set(&sidecar, "acme-corp", "ratio", Kind::NumberValue(2.5)).await;
    set(
        &sidecar,
        "acme-corp",
        "limits",
        Kind::JsonValue(prost_types::Value {
            kind: Some(prost_types::value::Kind::StructValue(prost_types::Struct {
                fields: [(
                    "max".to_owned(),
                    prost_types::Value {
                        kind: Some(prost_types::value::Kind::NumberValue(3.0)),
                    },
                )]
                .into(),
            })),
        }),
    )
    .await;
    let acme = || context(&[("tenant_id", "acme-corp")]);

    let plan = v2
        .resolve_string(v2::ResolveStringRequest {
            flag_key: "plan".into(),
            context: acme(),
        })
        .await
        .expect("ResolveString")
        .into_inner();
    assert_eq!(
        (plan.value.as_deref(), plan.reason.as_str()),
        (Some("pro"), "TARGETING_MATCH")
    );
    let seats = v2
        .resolve_int(v2::ResolveIntRequest {
            flag_key: "seats".into(),
            context: acme(),
        })
        .await
        .expect("ResolveInt")
        .into_inner();
    assert_eq!(seats.value, Some(40));
    let ratio = v2
        .resolve_float(v2::ResolveFloatRequest {
            flag_key: "ratio".into(),
            context: acme(),
        })
        .await
        .expect("ResolveFloat")
        .into_inner();
    assert_eq!(ratio.value, Some(2.5));
    let limits = v2
        .resolve_object(v2::ResolveObjectRequest {
            flag_key: "limits".into(),
            context: acme(),
        })
        .await
        .expect("ResolveObject")
        .into_inner();
    assert_eq!(
        limits.value.and_then(|v| v.fields.get("max").cloned()),
        Some(prost_types::Value {
            kind: Some(prost_types::value::Kind::NumberValue(3.0))
        })
    );

    // A fractional number is no integer, and a boolean no string: TYPE_MISMATCH.
    let fractional = v2
        .resolve_int(v2::ResolveIntRequest {
            flag_key: "ratio".into(),
            context: acme(),
        })
        .await
        .expect_err("2.5 is not an integer");
    let not_a_string = v2
        .resolve_string(v2::ResolveStringRequest {
            flag_key: "pro_features".into(),
            context: acme(),
        })
        .await
        .expect_err("a boolean is not a string");
    for status in [fractional, not_a_string] {
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains("TYPE_MISMATCH"), "{status:?}");
    }
    // A key no catalog and no tenant has: FLAG_NOT_FOUND.
    let missing = v2
        .resolve_boolean(boolean("no_such_flag", &[("tenant_id", "acme-corp")]))
        .await
        .expect_err("unknown flag");
    assert_eq!(missing.code(), Code::NotFound);
    assert!(missing.message().contains("FLAG_NOT_FOUND"), "{missing:?}");
    // A tenant attribute no tenant can have: INVALID_CONTEXT.
    let bad = v2
        .resolve_boolean(boolean("pro_features", &[("tenant_id", "acme\ncorp")]))
        .await
        .expect_err("bad tenant id");
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(bad.message().contains("INVALID_CONTEXT"), "{bad:?}");
}

async fn next<T>(stream: &mut tonic::Streaming<T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("an event within 10 s")
        .expect("the stream stays healthy")
        .expect("the stream stays open")
}

#[tokio::test]
async fn event_stream_announces_ready_then_each_change() {
    let (sidecar, addr) = start(mock()).await;
    let channel = connect(&addr).await;
    let mut v2_events = v2_client(&channel)
        .event_stream(v2::EventStreamRequest {})
        .await
        .expect("v2 EventStream")
        .into_inner();
    let mut v1_events = v1_client(&channel)
        .event_stream(v1::EventStreamRequest {})
        .await
        .expect("v1 EventStream")
        .into_inner();
    assert_eq!(next(&mut v2_events).await.r#type, "provider_ready");
    assert_eq!(next(&mut v1_events).await.r#type, "provider_ready");

    pay(&sidecar, "evt_paid_events", "cus_acme_001").await;

    // One webhook changes several flags; they may come as one event or several.
    let mut v2_changed = Vec::new();
    while !v2_changed.contains(&"pro_features".to_owned()) {
        let event = next(&mut v2_events).await;
        assert_eq!(event.r#type, "configuration_change");
        v2_changed.extend(changed_keys(event.data.as_ref()));
    }
    let mut v1_changed = Vec::new();
    while !v1_changed.contains(&"pro_features".to_owned()) {
        let event = next(&mut v1_events).await;
        assert_eq!(event.r#type, "configuration_change");
        v1_changed.extend(changed_keys(event.data.as_ref()));
    }
}

#[tokio::test]
async fn the_api_token_guards_the_flagd_listener() {
    let mut options = mock();
    options.envs.push((
        "CORESDK_API_TOKEN".into(),
        "flagd-api-token-0123456789".into(),
    ));
    let (_sidecar, addr) = start(options).await;
    let mut v2 = v2_client(&connect(&addr).await);
    let refused = v2
        .resolve_boolean(boolean("pro_features", &[]))
        .await
        .expect_err("no token");
    assert_eq!(refused.code(), Code::Unauthenticated);
    let mut request = tonic::Request::new(boolean("pro_features", &[]));
    request.metadata_mut().insert(
        "authorization",
        "Bearer flagd-api-token-0123456789".parse().expect("ascii"),
    );
    let answered = v2.resolve_boolean(request).await.expect("with the token");
    assert_eq!(answered.into_inner().reason, "DEFAULT");
}

#[test]
fn a_bad_flagd_address_is_a_setting_error() {
    let output = run_coresdk(None, &["serve", "--mock", "--flagd-listen", "nowhere"], &[]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("flagd-listen"), "{stderr}");
}

#[tokio::test]
async fn an_idle_event_stream_says_keep_alive_and_streams_are_capped() {
    let mut options = mock();
    options.args.extend([
        "--flagd-keep-alive-s".into(),
        "0.05".into(),
        "--max-streams".into(),
        "1".into(),
    ]);
    let (_sidecar, addr) = start(options).await;
    let mut client = v2_client(&connect(&addr).await);
    let mut events = client
        .event_stream(v2::EventStreamRequest {})
        .await
        .expect("EventStream")
        .into_inner();
    assert_eq!(next(&mut events).await.r#type, "provider_ready");
    assert_eq!(next(&mut events).await.r#type, "keep_alive");
    assert_eq!(next(&mut events).await.r#type, "keep_alive");
    // The one stream --max-streams allows is taken.
    let refused = client
        .event_stream(v2::EventStreamRequest {})
        .await
        .expect_err("a second stream");
    assert_eq!(refused.code(), Code::ResourceExhausted);
}

#[tokio::test]
async fn the_flagd_listener_serves_tls_when_the_main_one_does() {
    let dir = tempfile::tempdir().expect("temp dir");
    fixture("mint_certs.py", dir.path());
    let (_running, addr) = spawn_tls_side(SideListener::Flagd, dir.path());
    let channel = tls_channel(&addr, &dir.path().join("ca.pem")).await;
    let answered = v2_client(&channel)
        .resolve_boolean(boolean("pro_features", &[("tenant_id", "acme-corp")]))
        .await
        .expect("ResolveBoolean over TLS");
    assert_eq!(answered.into_inner().reason, "DEFAULT");
    // Plaintext is not served there.
    let plaintext = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .expect("valid uri")
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5))
        .connect_lazy();
    let refused = v2_client(&plaintext)
        .resolve_boolean(boolean("pro_features", &[]))
        .await;
    assert!(refused.is_err(), "{refused:?}");
}

#[tokio::test]
async fn reflection_on_the_flagd_listener_describes_flagds_services() {
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let (_sidecar, addr) = start(mock()).await;
    let mut client = ServerReflectionClient::new(connect(&addr).await);
    let requests = [
        MessageRequest::ListServices(String::new()),
        // A symbol whose file imports google/protobuf/struct.proto: grpcurl needs both.
        MessageRequest::FileContainingSymbol("flagd.evaluation.v2.Service".into()),
    ]
    .map(|request| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(request),
    });
    let mut responses = client
        .server_reflection_info(tokio_stream::iter(requests))
        .await
        .expect("reflection")
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) = responses
        .message()
        .await
        .expect("an answer")
        .and_then(|r| r.message_response)
    else {
        panic!("not a service list")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for expected in ["flagd.evaluation.v1.Service", "flagd.evaluation.v2.Service"] {
        assert!(names.iter().any(|n| n == expected), "{names:?}");
    }
    let Some(MessageResponse::FileDescriptorResponse(files)) = responses
        .message()
        .await
        .expect("an answer")
        .and_then(|r| r.message_response)
    else {
        panic!("no file descriptors")
    };
    assert!(!files.file_descriptor_proto.is_empty());
}

#[tokio::test]
async fn the_tenant_attribute_can_be_renamed() {
    let mut options = mock();
    options
        .args
        .extend(["--openfeature-tenant-attribute".into(), "org".into()]);
    let (sidecar, addr) = start(options).await;
    let mut v2 = v2_client(&connect(&addr).await);
    pay(&sidecar, "evt_paid_org", "cus_acme_001").await;
    let by_org = v2
        .resolve_boolean(boolean("pro_features", &[("org", "acme-corp")]))
        .await
        .expect("ResolveBoolean")
        .into_inner();
    assert_eq!(
        (by_org.value, by_org.reason.as_str()),
        (Some(true), "TARGETING_MATCH")
    );
    // `tenant_id` is then an attribute like any other.
    let ignored = v2
        .resolve_boolean(boolean("pro_features", &[("tenant_id", "acme-corp")]))
        .await
        .expect("ResolveBoolean")
        .into_inner();
    assert_eq!(
        (ignored.value, ignored.reason.as_str()),
        (Some(false), "DEFAULT")
    );
}

#[tokio::test]
async fn sigterm_ends_event_streams_and_the_sidecar_exits_cleanly() {
    let (mut sidecar, addr) = start(mock()).await;
    let mut events = v2_client(&connect(&addr).await)
        .event_stream(v2::EventStreamRequest {})
        .await
        .expect("EventStream")
        .into_inner();
    assert_eq!(next(&mut events).await.r#type, "provider_ready");
    let status = tokio::task::spawn_blocking(move || sidecar.stop())
        .await
        .expect("stopped");
    assert!(status.success(), "{status:?}");
    let end = tokio::time::timeout(Duration::from_secs(10), events.message())
        .await
        .expect("the stream ends with the sidecar");
    assert!(!matches!(end, Ok(Some(_))), "{end:?}");
}

/// Waits (at most 20 s) for a sidecar that must not start to exit, unsuccessfully.
async fn assert_fails_to_start(child: &mut std::process::Child) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("the sidecar kept running with its flagd address taken");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(!status.success());
}

/// An address the operator chose for flagd that is taken stops the start with a message that
/// names the setting; flagd's default address taken (a real flagd in the pod) does not stop a
/// sidecar that was never asked for flagd.
#[tokio::test]
async fn a_taken_flagd_address_fails_the_start_unless_it_was_never_chosen() {
    let held = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    let taken = held.local_addr().expect("address").to_string();
    let mut chosen = serve_command(
        &["--mock".into()],
        &[("CORESDK_FLAGD_LISTEN".into(), taken.clone())],
        std::process::Stdio::piped(),
    )
    .spawn()
    .expect("the coresdk binary starts");
    assert_fails_to_start(&mut chosen).await;
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut chosen.stderr.take().expect("stderr"), &mut stderr)
        .expect("stderr");
    assert!(
        stderr.contains(&format!("cannot listen for flagd on {taken}"))
            && stderr.contains("CORESDK_FLAGD_LISTEN"),
        "{stderr}"
    );

    // The default address: hold it (or find it held already), and a sidecar never asked for
    // flagd serves anyway...
    let _default = std::net::TcpListener::bind(coresdk::settings::DEFAULT_FLAGD_LISTEN);
    let mut by_default = serve_command(&["--mock".into()], &[], std::process::Stdio::null());
    by_default.env_remove("CORESDK_FLAGD_LISTEN");
    let (mut child, addr) = spawn_command(by_default);
    let channel = connect(&addr).await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let answer = health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .expect("the sidecar serves without flagd")
        .into_inner();
    assert_eq!(
        answer.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    let _ = child.kill();
    let _ = child.wait();

    // ...while one asked for flagd at that very address fails, like any chosen address.
    let mut asked = serve_command(
        &["--mock".into()],
        &[(
            "CORESDK_FLAGD_LISTEN".into(),
            coresdk::settings::DEFAULT_FLAGD_LISTEN.into(),
        )],
        std::process::Stdio::null(),
    )
    .spawn()
    .expect("the coresdk binary starts");
    assert_fails_to_start(&mut asked).await;
}
