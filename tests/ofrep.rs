//! OFREP (OpenFeature Remote Evaluation Protocol) against the real binary, over HTTP/1.1 and
//! h2c with prior knowledge.
mod common;

use common::flagd::{mock, pay};
use common::ofrep::{Http, Ofrep, start};
use common::*;
use hyper::StatusCode;
use serde_json::{Value, json};

fn flag_of<'a>(bulk: &'a Value, key: &str) -> &'a Value {
    bulk["flags"]
        .as_array()
        .expect("a flags array")
        .iter()
        .find(|flag| flag["key"] == key)
        .unwrap_or_else(|| panic!("{key} in {bulk}"))
}

async fn single_and_bulk_follow_a_stripe_webhook(http: Http) {
    let (sidecar, addr) = start(mock()).await;
    let ofrep = Ofrep::new(&addr, http);
    let acme = json!({"tenant_id": "acme-corp"});

    let before = ofrep.flag("pro_features", acme.clone()).await;
    assert_eq!(before.status, StatusCode::OK, "{before:?}");
    assert_eq!(
        before.body,
        json!({"key": "pro_features", "value": false, "reason": "DEFAULT", "variant": "default", "metadata": {}})
    );
    let bulk_before = ofrep.flags(acme.clone(), None).await;
    assert_eq!(bulk_before.status, StatusCode::OK, "{bulk_before:?}");
    assert_eq!(
        flag_of(&bulk_before.body, "pro_features")["reason"],
        "DEFAULT"
    );
    let etag_before = bulk_before.etag();
    // Nothing changed: the same ETag is not modified, and says so without a body.
    let unchanged = ofrep.flags(acme.clone(), Some(&etag_before)).await;
    assert_eq!(unchanged.status, StatusCode::NOT_MODIFIED, "{unchanged:?}");
    assert_eq!(unchanged.body, Value::Null);
    assert_eq!(unchanged.etag(), etag_before);

    pay(&sidecar, "evt_paid_ofrep", "cus_acme_001").await;

    let after = ofrep.flag("pro_features", acme.clone()).await;
    assert_eq!(
        after.body,
        json!({"key": "pro_features", "value": true, "reason": "TARGETING_MATCH", "variant": "tenant", "metadata": {}})
    );
    let bulk_after = ofrep.flags(acme.clone(), Some(&etag_before)).await;
    assert_eq!(bulk_after.status, StatusCode::OK, "{bulk_after:?}");
    assert_ne!(bulk_after.etag(), etag_before);
    let pro = flag_of(&bulk_after.body, "pro_features");
    assert_eq!(
        (&pro["value"], &pro["reason"]),
        (&json!(true), &json!("TARGETING_MATCH"))
    );

    // The targetingKey names the tenant without the attribute; the attribute wins over it.
    let by_key = ofrep
        .flag("pro_features", json!({"targetingKey": "acme-corp"}))
        .await;
    assert_eq!(by_key.body["reason"], "TARGETING_MATCH", "{by_key:?}");
    let bulk_by_key = ofrep
        .flags(json!({"targetingKey": "acme-corp"}), None)
        .await;
    assert_eq!(bulk_by_key.etag(), bulk_after.etag());
    let attribute_wins = ofrep
        .flag(
            "pro_features",
            json!({"tenant_id": "globex", "targetingKey": "acme-corp"}),
        )
        .await;
    assert_eq!(
        attribute_wins.body["reason"], "DEFAULT",
        "{attribute_wins:?}"
    );
    // A user's key that cannot be a tenant, an unknown tenant, no context: the catalog default.
    for context in [
        json!({"targetingKey": "Jane Doe <jane@example.com>"}),
        json!({"tenant_id": "nobody"}),
        json!({}),
    ] {
        let default = ofrep.flag("pro_features", context.clone()).await;
        assert_eq!(
            (
                default.status,
                &default.body["value"],
                &default.body["reason"]
            ),
            (StatusCode::OK, &json!(false), &json!("DEFAULT")),
            "{context}"
        );
    }
    let no_context = ofrep
        .post("/ofrep/v1/evaluate/flags/pro_features", "{}", &[])
        .await;
    assert_eq!(no_context.body["reason"], "DEFAULT", "{no_context:?}");
    let bulk_default = ofrep.flags(json!({}), None).await;
    assert!(
        bulk_default.body["flags"].as_array().is_some_and(
            |flags| !flags.is_empty() && flags.iter().all(|f| f["reason"] == "DEFAULT")
        ),
        "{bulk_default:?}"
    );
}

#[tokio::test]
async fn single_and_bulk_follow_a_stripe_webhook_over_http1() {
    single_and_bulk_follow_a_stripe_webhook(Http::One).await;
}

#[tokio::test]
async fn single_and_bulk_follow_a_stripe_webhook_over_h2c() {
    single_and_bulk_follow_a_stripe_webhook(Http::TwoCleartext).await;
}

#[tokio::test]
async fn errors_come_in_ofreps_shapes_and_statuses() {
    let (_sidecar, addr) = start(mock()).await;
    for http in [Http::One, Http::TwoCleartext] {
        let ofrep = Ofrep::new(&addr, http);
        let missing = ofrep
            .flag("no_such_flag", json!({"tenant_id": "acme-corp"}))
            .await;
        assert_eq!(missing.status, StatusCode::NOT_FOUND, "{missing:?}");
        assert_eq!(missing.body["key"], "no_such_flag");
        assert_eq!(missing.body["errorCode"], "FLAG_NOT_FOUND");
        assert!(missing.body["errorDetails"].is_string(), "{missing:?}");

        // An explicit tenant attribute that no tenant can have is an invalid context, for one
        // flag and for all of them.
        for context in [json!({"tenant_id": 42}), json!({"tenant_id": "acme\ncorp"})] {
            let single = ofrep.flag("pro_features", context.clone()).await;
            assert_eq!(single.status, StatusCode::BAD_REQUEST, "{single:?}");
            assert_eq!(
                (&single.body["key"], &single.body["errorCode"]),
                (&json!("pro_features"), &json!("INVALID_CONTEXT"))
            );
            let bulk = ofrep.flags(context, None).await;
            assert_eq!(bulk.status, StatusCode::BAD_REQUEST, "{bulk:?}");
            assert_eq!(bulk.body["errorCode"], "INVALID_CONTEXT");
            assert!(bulk.body.get("key").is_none(), "{bulk:?}");
        }
        let not_an_object = ofrep
            .post(
                "/ofrep/v1/evaluate/flags/pro_features",
                r#"{"context": "acme"}"#,
                &[],
            )
            .await;
        assert_eq!(not_an_object.status, StatusCode::BAD_REQUEST);
        assert_eq!(not_an_object.body["errorCode"], "INVALID_CONTEXT");

        for path in [
            "/ofrep/v1/evaluate/flags/pro_features",
            "/ofrep/v1/evaluate/flags",
        ] {
            let malformed = ofrep.post(path, r#"{"context": {"tenant_id": "#, &[]).await;
            assert_eq!(malformed.status, StatusCode::BAD_REQUEST, "{malformed:?}");
            assert_eq!(malformed.body["errorCode"], "PARSE_ERROR");
            // Far past the 64 KiB bound: refused before it is read whole.
            let padding = "x".repeat(256 * 1024);
            let oversized = ofrep
                .post(
                    path,
                    json!({"context": {"tenant_id": "acme-corp", "padding": padding}}).to_string(),
                    &[],
                )
                .await;
            assert_eq!(oversized.status, StatusCode::PAYLOAD_TOO_LARGE, "{path}");
            assert_eq!(oversized.body["errorCode"], "GENERAL");
        }
    }
}

#[tokio::test]
async fn the_api_token_guards_ofrep_as_it_guards_grpc() {
    const API_TOKEN: &str = "api-token-for-ofrep-tests-0123456789";
    let mut options = Options::default();
    options
        .envs
        .push(("CORESDK_API_TOKEN".into(), API_TOKEN.into()));
    let (_sidecar, addr) = start(options).await;
    let ofrep = Ofrep::new(&addr, Http::One);
    let body = json!({"context": {"tenant_id": "acme-corp"}}).to_string();
    let bearer = format!("Bearer {API_TOKEN}");
    let admin = format!("Bearer {ADMIN_TOKEN}");
    for path in [
        "/ofrep/v1/evaluate/flags/pro_features",
        "/ofrep/v1/evaluate/flags",
    ] {
        for refused in [
            vec![],
            vec![("authorization", "Bearer not-the-token")],
            vec![("x-coresdk-api-token", "not-the-token")],
        ] {
            let answer = ofrep.post(path, body.clone(), &refused).await;
            assert_eq!(
                answer.status,
                StatusCode::UNAUTHORIZED,
                "{path} {refused:?}"
            );
            assert_eq!(answer.body["errorCode"], "GENERAL");
        }
        for accepted in [
            vec![("authorization", bearer.as_str())],
            vec![("x-coresdk-api-token", API_TOKEN)],
            vec![("authorization", admin.as_str())],
        ] {
            let answer = ofrep.post(path, body.clone(), &accepted).await;
            assert_eq!(
                answer.status,
                StatusCode::OK,
                "{path} {accepted:?}: {answer:?}"
            );
        }
    }
}

/// Requests whose heads arrived and whose bodies never will: each holds an admission until
/// its connection goes.
async fn stalled_requests(addr: &str, count: usize) -> Vec<tokio::net::TcpStream> {
    use tokio::io::AsyncWriteExt as _;
    let mut stalled = Vec::with_capacity(count);
    for _ in 0..count {
        let mut tcp = tokio::net::TcpStream::connect(addr)
            .await
            .expect("a connection");
        tcp.write_all(
            b"POST /ofrep/v1/evaluate/flags/pro_features HTTP/1.1\r\nhost: ofrep\r\ncontent-length: 100\r\n\r\n{",
        )
        .await
        .expect("a request head");
        stalled.push(tcp);
    }
    stalled
}

/// Evaluates until the answer has `status`; the deadline only guards against a hang.
async fn until_status(ofrep: &Ofrep, status: StatusCode) -> common::ofrep::Answer {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let answer = ofrep
            .flag("pro_features", json!({"tenant_id": "acme-corp"}))
            .await;
        if answer.status == status || tokio::time::Instant::now() > deadline {
            return answer;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn requests_beyond_the_in_flight_bound_are_told_to_retry_later() {
    use coresdk::openfeature::ofrep::MAX_REQUESTS_IN_FLIGHT;
    let (_sidecar, addr) = start(mock()).await;
    let stalled = stalled_requests(&addr, MAX_REQUESTS_IN_FLIGHT).await;
    let ofrep = Ofrep::new(&addr, Http::One);
    let refused = until_status(&ofrep, StatusCode::TOO_MANY_REQUESTS).await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS, "{refused:?}");
    assert_eq!(
        refused
            .headers
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("1")
    );
    assert_eq!(refused.body["errorCode"], "GENERAL");
    // The stalled senders go: their admissions are free again.
    drop(stalled);
    let served = until_status(&ofrep, StatusCode::OK).await;
    assert_eq!(served.status, StatusCode::OK, "{served:?}");
}

#[tokio::test]
async fn sigterm_stops_ofrep_with_connections_open() {
    // A request stalled mid-body is in flight: the drain gives it the grace, kept short here.
    let mut options = mock();
    options
        .args
        .extend(["--shutdown-grace-s".to_owned(), "1".to_owned()]);
    let (mut sidecar, addr) = start(options).await;
    // An idle keep-alive connection of each kind stays open through the stop.
    let mut idle = Vec::new();
    for http in [Http::One, Http::TwoCleartext] {
        let ofrep = Ofrep::new(&addr, http);
        let answer = ofrep.flag("pro_features", json!({})).await;
        assert_eq!(answer.status, StatusCode::OK);
        idle.push(ofrep);
    }
    let _stalled = stalled_requests(&addr, 1).await;
    let stopped = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        tokio::task::spawn_blocking(move || sidecar.stop()),
    )
    .await
    .expect("the sidecar exits within 20 s")
    .expect("stop ran");
    assert!(stopped.success(), "{stopped:?}");
}

/// One POST over a TLS connection that offered only `alpn`, with a client certificate when
/// `client` names its files; answers the negotiated protocol and the status, or the failure.
async fn over_tls(
    addr: &str,
    ca: &[u8],
    alpn: &[u8],
    client: Option<(&[u8], &[u8])>,
) -> Result<(Option<Vec<u8>>, StatusCode), String> {
    use http_body_util::{BodyExt as _, Full};
    use hyper::body::Bytes;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject as _};
    use std::sync::Arc;

    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca) {
        roots.add(cert.expect("a CA certificate")).expect("a root");
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("TLS versions")
    .with_root_certificates(roots);
    let mut config = match client {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder
            .with_client_auth_cert(
                CertificateDer::pem_slice_iter(cert)
                    .collect::<Result<_, _>>()
                    .expect("client.pem"),
                PrivateKeyDer::from_pem_slice(key).expect("client.key"),
            )
            .expect("a client identity"),
    };
    config.alpn_protocols = vec![alpn.to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .expect("a connection");
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").expect("a name"), tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let negotiated = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
    let request = hyper::Request::post("/ofrep/v1/evaluate/flags/pro_features")
        .header("host", "localhost")
        .body(Full::new(Bytes::from(
            json!({"context": {"tenant_id": "acme-corp"}}).to_string(),
        )))
        .expect("a request");
    let io = TokioIo::new(tls);
    let response = if alpn == b"h2" {
        let (mut sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .map_err(|e| format!("h2: {e}"))?;
        tokio::spawn(connection);
        sender.send_request(request).await
    } else {
        let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| format!("http/1.1: {e}"))?;
        tokio::spawn(connection);
        sender.send_request(request).await
    }
    .map_err(|e| format!("request: {e}"))?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?
        .to_bytes();
    let body: Value = serde_json::from_slice(&body).expect("JSON");
    assert_eq!(body["reason"], "DEFAULT", "{body}");
    Ok((negotiated, status))
}

fn spawn_tls(dir: &std::path::Path, mutual: bool) -> (common::inputs::Running, String) {
    let mut args = vec!["--mock".to_owned()];
    args.extend(common::inputs::tls_args(dir, mutual));
    let (child, _, mut sides) =
        common::flagd::spawn_with_sides(&[coresdk::settings::SideListener::Ofrep], &args, &[]);
    (common::inputs::Running(child), sides.remove(0))
}

async fn within_10_s<T>(future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(std::time::Duration::from_secs(10), future)
        .await
        .expect("an end within 10 s")
}

#[tokio::test]
async fn ofrep_serves_tls_with_alpn_when_the_main_listener_does() {
    let dir = tempfile::tempdir().expect("temp dir");
    fixture("mint_certs.py", dir.path());
    let (_running, addr) = spawn_tls(dir.path(), false);
    let ca = std::fs::read(dir.path().join("ca.pem")).expect("ca.pem");
    for alpn in [&b"h2"[..], &b"http/1.1"[..]] {
        let answer = within_10_s(over_tls(&addr, &ca, alpn, None)).await;
        assert_eq!(answer, Ok((Some(alpn.to_vec()), StatusCode::OK)));
    }
    // Plaintext is not served there.
    let plaintext =
        within_10_s(Ofrep::new(&addr, Http::One).try_post("/ofrep/v1/evaluate/flags", "{}")).await;
    assert!(plaintext.is_err(), "{plaintext:?}");
}

#[tokio::test]
async fn ofrep_requires_a_client_certificate_under_mutual_tls() {
    let dir = tempfile::tempdir().expect("temp dir");
    fixture("mint_certs.py", dir.path());
    let (_running, addr) = spawn_tls(dir.path(), true);
    let read = |name: &str| std::fs::read(dir.path().join(name)).expect(name);
    let (ca, cert, key) = (read("ca.pem"), read("client.pem"), read("client.key"));
    let without = within_10_s(over_tls(&addr, &ca, b"http/1.1", None)).await;
    assert!(without.is_err(), "{without:?}");
    let with = within_10_s(over_tls(&addr, &ca, b"http/1.1", Some((&cert, &key)))).await;
    assert_eq!(with, Ok((Some(b"http/1.1".to_vec()), StatusCode::OK)));
}

#[tokio::test]
async fn a_request_head_sent_too_slowly_loses_its_connection() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let (_sidecar, addr) = start(mock()).await;
    let mut slow = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("a connection");
    // Half a request head, and then nothing: the sidecar closes the connection (after the
    // header read timeout) instead of holding it.
    slow.write_all(b"POST /ofrep/v1/evaluate/flags/pro_features HTTP/1.1\r\nhost: ofrep\r\n")
        .await
        .expect("half a head");
    let mut rest = Vec::new();
    let read = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        slow.read_to_end(&mut rest),
    )
    .await
    .expect("the sidecar ends the connection within 20 s (hyper's own default is 30 s)");
    assert!(
        read.is_err() || !String::from_utf8_lossy(&rest).contains("200 OK"),
        "{rest:?}"
    );
    // Others are served meanwhile and after.
    let answer = Ofrep::new(&addr, Http::One)
        .flag("pro_features", json!({}))
        .await;
    assert_eq!(answer.status, StatusCode::OK);
}
