//! The flagd sync service (`flagd.sync.v1.FlagSyncService`) against the real binary, with a
//! client generated from the vendored flagd proto.
mod common;

use std::time::Duration;

use common::flagd_sync::{client, mock, pay, set, start};
use common::*;
use coresdk::flagd_proto::sync::v1::flag_sync_service_client::FlagSyncServiceClient;
use coresdk::flagd_proto::sync::v1::{
    FetchAllFlagsRequest, GetMetadataRequest, SyncFlagsRequest, SyncFlagsResponse,
};
use coresdk::proto::flag_value::Kind;
use serde_json::{Value as Json, json};
use tonic::Code;

fn with_header<T>(message: T, name: &'static str, value: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert(name, value.parse().expect("ascii"));
    request
}

async fn subscribe(
    addr: &str,
    request: tonic::Request<SyncFlagsRequest>,
) -> tonic::Streaming<SyncFlagsResponse> {
    client(addr)
        .await
        .sync_flags(request)
        .await
        .expect("SyncFlags")
        .into_inner()
}

async fn subscribe_all(addr: &str) -> tonic::Streaming<SyncFlagsResponse> {
    subscribe(addr, tonic::Request::new(SyncFlagsRequest::default())).await
}

/// With the selector in the `flagd-selector` header, as current providers send it.
async fn subscribe_tenant(addr: &str, tenant: &str) -> tonic::Streaming<SyncFlagsResponse> {
    let selector = format!("tenant={tenant}");
    subscribe(
        addr,
        with_header(SyncFlagsRequest::default(), "flagd-selector", &selector),
    )
    .await
}

/// The next configuration on the stream, parsed.
async fn next(stream: &mut tonic::Streaming<SyncFlagsResponse>) -> Json {
    let response = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("a configuration within 10 s")
        .expect("the stream stays healthy")
        .expect("the stream stays open");
    serde_json::from_str(&response.flag_configuration).expect("the configuration is JSON")
}

/// Reads configurations until one satisfies `wanted`.
async fn next_where(
    stream: &mut tonic::Streaming<SyncFlagsResponse>,
    wanted: impl Fn(&Json) -> bool,
) -> Json {
    loop {
        let document = next(stream).await;
        if wanted(&document) {
            return document;
        }
    }
}

/// What the document's targeting gives `tenant` for `key`: the variant of the `in` list that
/// names it, else the default variant (the shape [`the_document_has_flagds_shape`] checks).
fn value_for(document: &Json, key: &str, tenant: &str) -> Option<Json> {
    let flag = &document["flags"][key];
    let branches = flag["targeting"]["if"].as_array()?;
    let variant = branches
        .chunks(2)
        .find(|pair| {
            pair.len() == 2
                && pair[0]["in"][1]
                    .as_array()
                    .is_some_and(|tenants| tenants.contains(&json!(tenant)))
        })
        .map(|pair| pair[1].clone())
        .unwrap_or_else(|| flag["defaultVariant"].clone());
    flag["variants"].get(variant.as_str()?).cloned()
}

/// flagd's flag-definition schema (https://flagd.dev/schema/v0/flags.json) as the all-tenants
/// document uses it: typed variants, a default variant among them, JSONLogic targeting whose
/// tenant expression is a shared `$evaluators` entry.
fn assert_flagd_shape(document: &Json) {
    let top: Vec<&str> = document
        .as_object()
        .expect("an object")
        .keys()
        .map(String::as_str)
        .collect();
    assert!(
        top.iter()
            .all(|k| ["flags", "$evaluators", "metadata"].contains(k)),
        "{top:?}"
    );
    let flags = document["flags"].as_object().expect("flags is an object");
    assert!(!flags.is_empty());
    for (key, flag) in flags {
        assert_eq!(flag["state"], "ENABLED", "{key}");
        let variants = flag["variants"].as_object().expect("variants");
        assert!(!variants.is_empty(), "{key}");
        let kinds: std::collections::BTreeSet<&str> = variants
            .values()
            .map(|v| match v {
                Json::Bool(_) => "boolean",
                Json::Number(_) => "number",
                Json::String(_) => "string",
                Json::Object(_) => "object",
                other => panic!("{key}: variant {other} is none of flagd's types"),
            })
            .collect();
        assert_eq!(kinds.len(), 1, "{key}: one type per flag, got {kinds:?}");
        if let Some(default) = flag.get("defaultVariant") {
            let default = default.as_str().expect("defaultVariant is a string");
            assert!(variants.contains_key(default), "{key}");
        }
        let branches = flag["targeting"]["if"].as_array().expect("if targeting");
        assert_eq!(
            branches.last(),
            Some(&Json::Null),
            "{key}: no match is null"
        );
        for pair in branches[..branches.len() - 1].chunks(2) {
            assert_eq!(pair[0]["in"][0], json!({"$ref": "tenant"}), "{key}");
            assert!(pair[0]["in"][1].is_array(), "{key}");
            let variant = pair[1].as_str().expect("a variant name");
            assert!(variants.contains_key(variant), "{key}: {variant}");
        }
    }
    assert_eq!(
        document["$evaluators"]["tenant"],
        json!({"if": [{"var": "tenant_id"}, {"var": "tenant_id"}, {"var": "targetingKey"}]})
    );
}

#[tokio::test]
async fn a_subscriber_gets_the_configuration_then_a_new_one_after_a_webhook() {
    let (sidecar, addr) = start(mock()).await;
    let mut stream = subscribe_all(&addr).await;

    let first = next(&mut stream).await;
    assert_flagd_shape(&first);
    assert_eq!(
        first["flags"]["pro_features"],
        json!({
            "state": "ENABLED",
            "variants": {"default": false},
            "defaultVariant": "default",
            "targeting": {"if": [null]}
        })
    );
    assert_eq!(
        value_for(&first, "pro_features", "acme-corp"),
        Some(json!(false))
    );

    pay(&sidecar, "evt_sync_paid", "cus_acme_001").await;

    let paid = next_where(&mut stream, |d| {
        value_for(d, "pro_features", "acme-corp") == Some(json!(true))
    })
    .await;
    assert_flagd_shape(&paid);
    // Other tenants keep the catalog default.
    assert_eq!(
        value_for(&paid, "pro_features", "globex"),
        Some(json!(false))
    );
    // FetchAllFlags answers the same configuration.
    let fetched = client(&addr)
        .await
        .fetch_all_flags(FetchAllFlagsRequest::default())
        .await
        .expect("FetchAllFlags")
        .into_inner();
    let fetched: Json = serde_json::from_str(&fetched.flag_configuration).expect("JSON");
    assert_eq!(fetched, paid);
}

#[tokio::test]
async fn numbers_objects_and_tenant_only_keys_survive_as_variants() {
    let (sidecar, addr) = start(mock()).await;
    set(&sidecar, "acme-corp", "seats", Kind::NumberValue(40.0)).await;
    set(&sidecar, "globex", "seats", Kind::NumberValue(40.0)).await;
    set(&sidecar, "initech", "seats", Kind::NumberValue(2.5)).await;
    set(
        &sidecar,
        "acme-corp",
        "limits",
        Kind::JsonValue(coresdk::api::convert::to_proto_value(&json!({"max": 3}))),
    )
    .await;
    let mut stream = subscribe_all(&addr).await;
    // The changes may still be on their way into the shared configuration.
    let document = next_where(&mut stream, |d| {
        d["flags"]["seats"]["variants"].as_object().map(|v| v.len()) == Some(2)
            && d["flags"]["limits"].is_object()
    })
    .await;
    assert_flagd_shape(&document);
    let seats = &document["flags"]["seats"];
    // Tenants sharing a value share one list; integers stay integers.
    assert_eq!(seats["variants"], json!({"tenant-1": 2.5, "tenant-2": 40}));
    assert_eq!(
        seats["targeting"]["if"][2]["in"][1],
        json!(["acme-corp", "globex"])
    );
    // Keys the catalog lacks have no default variant: a tenant without them gets the
    // caller's default, as it does from the evaluation service (there with FLAG_NOT_FOUND).
    assert!(seats.get("defaultVariant").is_none());
    assert_eq!(
        value_for(&document, "limits", "acme-corp"),
        Some(json!({"max": 3}))
    );
}

#[tokio::test]
async fn a_tenant_selector_in_the_header_or_the_field_gives_static_flags() {
    let (sidecar, addr) = start(mock()).await;
    let mut by_header = subscribe_tenant(&addr, "acme-corp").await;
    #[allow(deprecated)]
    let mut by_field = subscribe(
        &addr,
        tonic::Request::new(SyncFlagsRequest {
            selector: "tenant=acme-corp".into(),
            ..Default::default()
        }),
    )
    .await;
    let unpaid = json!({
        "state": "ENABLED",
        "variants": {"default": false},
        "defaultVariant": "default"
    });
    for stream in [&mut by_header, &mut by_field] {
        let document = next(stream).await;
        assert!(document.get("$evaluators").is_none());
        assert_eq!(document["flags"]["pro_features"], unpaid);
    }

    pay(&sidecar, "evt_sync_selector", "cus_acme_001").await;

    let paid = json!({
        "state": "ENABLED",
        "variants": {"tenant": true},
        "defaultVariant": "tenant"
    });
    for stream in [&mut by_header, &mut by_field] {
        let document = next_where(stream, |d| {
            d["flags"]["pro_features"]["variants"]
                .get("tenant")
                .is_some()
        })
        .await;
        assert_eq!(document["flags"]["pro_features"], paid);
    }

    // The header wins over the field; FetchAllFlags reads both as well.
    #[allow(deprecated)]
    let fetched = client(&addr)
        .await
        .fetch_all_flags(with_header(
            FetchAllFlagsRequest {
                selector: "tenant=globex".into(),
                ..Default::default()
            },
            "flagd-selector",
            "tenant=acme-corp",
        ))
        .await
        .expect("FetchAllFlags")
        .into_inner();
    let fetched: Json = serde_json::from_str(&fetched.flag_configuration).expect("JSON");
    assert_eq!(fetched["flags"]["pro_features"], paid);
}

#[tokio::test]
async fn a_bad_selector_is_an_invalid_argument_naming_the_selector() {
    let (_sidecar, addr) = start(mock()).await;
    let mut sync = client(&addr).await;
    for selector in ["source=database", "tenant=", "tenant=two words"] {
        let refused = sync
            .sync_flags(with_header(
                SyncFlagsRequest::default(),
                "flagd-selector",
                selector,
            ))
            .await
            .expect_err(selector);
        assert_eq!(refused.code(), Code::InvalidArgument, "{selector}");
        assert_eq!(error_reason(&refused), "INVALID_ARGUMENT", "{selector}");
        let detail = problem(&refused).detail;
        assert!(detail.contains("selector"), "{selector}: {detail}");
        #[allow(deprecated)]
        let refused = sync
            .fetch_all_flags(FetchAllFlagsRequest {
                selector: selector.into(),
                ..Default::default()
            })
            .await
            .expect_err(selector);
        assert_eq!(refused.code(), Code::InvalidArgument, "{selector}");
    }
    // The deprecated GetMetadata: the providers take UNIMPLEMENTED as "no metadata".
    #[allow(deprecated)]
    let metadata = sync
        .get_metadata(GetMetadataRequest {})
        .await
        .expect_err("GetMetadata");
    assert_eq!(metadata.code(), Code::Unimplemented);
}

#[tokio::test]
async fn the_api_token_guards_the_sync_listener() {
    let mut options = mock();
    options.envs.push((
        "CORESDK_API_TOKEN".into(),
        "sync-api-token-0123456789".into(),
    ));
    let (_sidecar, addr) = start(options).await;
    let mut sync = client(&addr).await;
    let refused = sync
        .sync_flags(SyncFlagsRequest::default())
        .await
        .expect_err("no token");
    assert_eq!(refused.code(), Code::Unauthenticated);
    let mut stream = subscribe(
        &addr,
        with_header(
            SyncFlagsRequest::default(),
            "authorization",
            "Bearer sync-api-token-0123456789",
        ),
    )
    .await;
    assert_flagd_shape(&next(&mut stream).await);
}

#[tokio::test]
async fn sync_streams_count_against_max_streams() {
    let mut options = mock();
    options.args.extend(["--max-streams".into(), "1".into()]);
    let (_sidecar, addr) = start(options).await;
    let mut stream = subscribe_all(&addr).await;
    next(&mut stream).await;
    let refused = client(&addr)
        .await
        .sync_flags(with_header(
            SyncFlagsRequest::default(),
            "flagd-selector",
            "tenant=acme-corp",
        ))
        .await
        .expect_err("a second stream");
    assert_eq!(refused.code(), Code::ResourceExhausted);
    // A stream that ends gives its slot back.
    drop(stream);
    let reopened = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match client(&addr)
                .await
                .sync_flags(SyncFlagsRequest::default())
                .await
            {
                Ok(stream) => break stream.into_inner(),
                Err(status) => {
                    assert_eq!(status.code(), Code::ResourceExhausted);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    })
    .await
    .expect("the slot comes back");
    drop(reopened);
}

#[tokio::test]
async fn sigterm_ends_sync_streams_with_unavailable_and_the_sidecar_exits_cleanly() {
    let (mut sidecar, addr) = start(mock()).await;
    let mut all = subscribe_all(&addr).await;
    let mut one = subscribe_tenant(&addr, "globex").await;
    next(&mut all).await;
    next(&mut one).await;
    let status = tokio::task::spawn_blocking(move || sidecar.stop())
        .await
        .expect("stopped");
    assert!(status.success(), "{status:?}");
    // UNAVAILABLE, not a clean end: Node's provider reconnects only after an error.
    for stream in [&mut all, &mut one] {
        let end = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("the stream ends with the sidecar");
        assert_eq!(
            end.as_ref().err().map(tonic::Status::code),
            Some(Code::Unavailable),
            "{end:?}"
        );
    }
}

/// A webhook applied by one replica reaches the sync streams of another through the store's
/// change feed.
#[tokio::test]
async fn a_webhook_through_one_replica_reaches_sync_streams_on_another() {
    let url = common::pg::fresh_database(common::pg::server_url()).await;
    let options = common::pg::replica_options(&url);
    let (_syncing, addr) = start(options.clone()).await;
    let other = Sidecar::start(options).await;
    let mut all = subscribe_all(&addr).await;
    let mut acme = subscribe_tenant(&addr, "acme-corp").await;
    assert_eq!(
        value_for(&next(&mut all).await, "pro_features", "acme-corp"),
        Some(json!(false))
    );
    next(&mut acme).await;

    deliver(
        &other,
        event(
            "evt_sync_replica",
            "invoice.paid",
            now(),
            json!({"id": "in_1", "customer": "cus_acme_001"}),
        ),
    )
    .await
    .expect("invoice.paid accepted by the other replica");

    next_where(&mut all, |d| {
        value_for(d, "pro_features", "acme-corp") == Some(json!(true))
    })
    .await;
    next_where(&mut acme, |d| {
        d["flags"]["pro_features"]["variants"]["tenant"] == json!(true)
    })
    .await;
}

/// Reflection there lists the sync service, and not the evaluation services it does not serve.
#[tokio::test]
async fn reflection_on_the_sync_listener_lists_the_sync_service() {
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let (_sidecar, addr) = start(mock()).await;
    let mut client = ServerReflectionClient::new(common::flagd::channel(&addr).await);
    let list = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let answer = client
        .server_reflection_info(tokio_stream::iter([list]))
        .await
        .expect("reflection")
        .into_inner()
        .message()
        .await
        .expect("an answer")
        .and_then(|r| r.message_response);
    let Some(MessageResponse::ListServicesResponse(list)) = answer else {
        panic!("not a service list: {answer:?}")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.iter().any(|n| n == "flagd.sync.v1.FlagSyncService"),
        "{names:?}"
    );
    assert!(
        !names.iter().any(|n| n.starts_with("flagd.evaluation")),
        "{names:?}"
    );
}

#[tokio::test]
async fn the_renamed_tenant_attribute_is_the_one_targeting_reads() {
    let mut options = mock();
    options
        .args
        .extend(["--openfeature-tenant-attribute".into(), "org".into()]);
    let (_sidecar, addr) = start(options).await;
    let document = next(&mut subscribe_all(&addr).await).await;
    assert_eq!(
        document["$evaluators"]["tenant"],
        json!({"if": [{"var": "org"}, {"var": "org"}, {"var": "targetingKey"}]})
    );
}

#[tokio::test]
async fn the_sync_listener_serves_tls_when_the_main_one_does() {
    let dir = tempfile::tempdir().expect("temp dir");
    fixture("mint_certs.py", dir.path());
    let path = |name: &str| dir.path().join(name).display().to_string();
    let (child, _, mut sides) = common::flagd::spawn_with_sides(
        &[coresdk::settings::SideListener::FlagdSync],
        &[
            "--mock".to_owned(),
            "--tls-cert-file".to_owned(),
            path("server.pem"),
            "--tls-key-file".to_owned(),
            path("server.key"),
        ],
        &[],
    );
    let _running = common::inputs::Running(child);
    let addr = sides.remove(0);
    let ca = std::fs::read(path("ca.pem")).expect("ca.pem");
    let channel = tonic::transport::Channel::from_shared(format!("https://{addr}"))
        .expect("valid uri")
        .tls_config(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(ca))
                .domain_name("localhost"),
        )
        .expect("tls config")
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .expect("a TLS connection to the sync listener");
    let mut stream = FlagSyncServiceClient::new(channel)
        .sync_flags(SyncFlagsRequest::default())
        .await
        .expect("SyncFlags over TLS")
        .into_inner();
    assert_flagd_shape(&next(&mut stream).await);
}
