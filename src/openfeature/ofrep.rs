//! OFREP, the OpenFeature Remote Evaluation Protocol: single and bulk evaluation over HTTP/1.1
//! and h2c on one port (or TLS with ALPN when the main listener has TLS), answered from the
//! flag cache in OFREP's JSON shapes. Tenant selection and reasons are the flagd evaluation
//! service's ([`super::tenant_of`], [`super::resolve`]).

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{Next, from_fn_with_state};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use serde_json::{Map, Value as Json, json};
use sha2::{Digest as _, Sha256};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

use super::{EvaluationError, Resolved, resolve, tenant_of};
use crate::app::App;
use crate::config::{SideListener, TlsFiles};
use crate::server::{ServeError, ServerTask, Side};

/// A context is a few attributes: 64 KiB is far more than any provider sends, and bounds what
/// a request may make the sidecar hold.
const MAX_BODY_BYTES: usize = 64 * 1024;
/// A client must send its request head within this (slowloris), and the whole request and
/// its answer within [`REQUEST_TIMEOUT`].
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; further ones wait in the listen backlog.
const MAX_CONNECTIONS: usize = 512;
const MAX_STREAMS_PER_CONNECTION: u32 = 16;
/// Requests held at once, bodies included; one more is answered 429 at once rather than
/// queued. With [`MAX_BODY_BYTES`] this bounds what bodies can take (16 MiB), whatever the
/// connections and streams.
pub const MAX_REQUESTS_IN_FLIGHT: usize = 256;
const RETRY_AFTER_S: u64 = 1;
/// A request head (HTTP/1 request line and headers, HTTP/2 header list) is refused past this.
const MAX_HEAD_BYTES: usize = 16 * 1024;
/// A connection that answered nothing for this long is closed (one that never sent a request
/// too, from its start).
const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection told to go that is still open this long after its last answer is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

type TokenCheck =
    dyn Fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Send + Sync;

#[derive(Clone)]
struct Ofrep {
    app: Arc<App>,
    /// The main listener's API-token interceptor, so one rule decides for every protocol.
    check: Arc<TokenCheck>,
    /// Per tenant, its last bulk answer and the cache version it was made at: a 304 or a
    /// repeated fetch costs no serialization or digest until a flag changes.
    bulk: moka::sync::Cache<String, Arc<BulkAnswer>>,
}

/// Bytes of bulk answers kept (bodies and tenant ids); the others are made again when asked.
/// Tenants without flags of their own share one answer, so ids never seen cost nothing here.
const MAX_BULK_ANSWER_BYTES: u64 = 16 * 1024 * 1024;

struct BulkAnswer {
    /// [`crate::flags::FlagCache::version`] when it was made: any flag change since makes it
    /// stale.
    version: u64,
    body: Bytes,
    etag: HeaderValue,
}

/// Serves OFREP on the side listener until the sidecar stops.
pub fn serve<C>(side: Side<C>) -> Result<ServerTask, ServeError>
where
    C: Fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status>
        + Clone
        + Send
        + Sync
        + 'static,
{
    let tls = side
        .state
        .config
        .tls
        .as_ref()
        .map(tls_acceptor)
        .transpose()
        .map_err(|message| ServeError::SideTls {
            listener: SideListener::Ofrep,
            message,
        })?;
    let stopping = side.stopping();
    let app = router(
        Ofrep {
            app: side.state,
            check: Arc::new(side.check),
            bulk: moka::sync::Cache::builder()
                .weigher(|tenant: &String, answer: &Arc<BulkAnswer>| {
                    u32::try_from(tenant.len() + answer.body.len()).unwrap_or(u32::MAX)
                })
                .max_capacity(MAX_BULK_ANSWER_BYTES)
                .build(),
        },
        side.in_flight,
    );
    Ok(tokio::spawn(accept(
        "OFREP",
        side.listener,
        app,
        tls,
        stopping,
    )))
}

fn router(ofrep: Ofrep, in_flight: crate::drain::InFlight) -> Router {
    let routes = Router::new()
        .route("/ofrep/v1/evaluate/flags/{key}", post(evaluate_flag))
        .route("/ofrep/v1/evaluate/flags", post(evaluate_flags))
        .route_layer(from_fn_with_state(ofrep.clone(), authenticate));
    // Outside the authentication, so a refused request is traced too; absent when traces are
    // off.
    let routes = if crate::telemetry::enabled() {
        routes.route_layer(axum::middleware::from_fn(crate::telemetry::trace_http))
    } else {
        routes
    };
    routes
        .layer(from_fn_with_state(REQUEST_TIMEOUT, within_deadline))
        .layer(from_fn_with_state(
            Arc::new(Semaphore::new(MAX_REQUESTS_IN_FLIGHT)),
            admit,
        ))
        .layer(in_flight)
        .with_state(ofrep)
}

fn connection_builder() -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        // hyper's read buffer: a head that does not fit is refused (431). Bodies stream
        // through it in pieces, so it bounds heads only.
        .max_buf_size(MAX_HEAD_BYTES);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .max_header_list_size(MAX_HEAD_BYTES as u32)
        // Finds peers that vanished without closing, so they do not keep a connection slot.
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10));
    builder
}

/// The requests a connection is answering, and when it last answered one (or opened).
struct Activity {
    state: std::sync::Mutex<(usize, Instant)>,
}

/// A request being answered; its connection is idle again from when the last one drops.
struct Answering(Arc<Activity>);

impl Activity {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            state: std::sync::Mutex::new((0, Instant::now())),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, (usize, Instant)> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn begin(self: &Arc<Self>) -> Answering {
        self.state().0 += 1;
        Answering(self.clone())
    }

    /// Returns once the connection has answered nothing for `limit`, counted from `since` at
    /// the earliest.
    async fn idle_for(&self, limit: Duration, since: Instant) {
        loop {
            let (answering, last) = *self.state();
            if answering == 0 {
                let deadline = last.max(since) + limit;
                if Instant::now() >= deadline {
                    return;
                }
                tokio::time::sleep_until(deadline).await;
            } else {
                tokio::time::sleep(limit).await;
            }
        }
    }
}

impl Drop for Answering {
    fn drop(&mut self) {
        let mut state = self.0.state();
        state.0 = state.0.saturating_sub(1);
        state.1 = Instant::now();
    }
}

/// Serves HTTP/1.1 and h2c (or TLS) connections of `listener` with `app` until `stopping`:
/// connections bounded in number, in head size, in idle time and in how long they stay after
/// the stop. `protocol` names them in the log. The ops listener serves this way too.
pub(crate) async fn accept(
    protocol: &'static str,
    listener: TcpListener,
    app: Router,
    tls: Option<TlsAcceptor>,
    stopping: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let builder = Arc::new(connection_builder());
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    // Dropped with this task (the sidecar gives up waiting), it ends every connection.
    let mut connections = tokio::task::JoinSet::new();
    let (stop, stopped) = watch::channel(false);
    tokio::pin!(stopping);
    loop {
        while connections.try_join_next().is_some() {}
        let permit = tokio::select! {
            permit = slots.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            () = &mut stopping => break,
        };
        let tcp = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(error) => {
                    // Out of file descriptors and the like: pause rather than spin.
                    tracing::warn!(%error, protocol, "could not accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut stopping => break,
        };
        let _ = tcp.set_nodelay(true);
        let app = app.clone();
        let builder = builder.clone();
        let tls = tls.clone();
        let mut stopped = stopped.clone();
        connections.spawn(async move {
            let _permit = permit;
            let served = match tls {
                None => serve_connection(protocol, &builder, tcp, app, stopped).await,
                Some(tls) => {
                    let handshake = tokio::select! {
                        handshake = tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, tls.accept(tcp)) => handshake,
                        _ = stopped.wait_for(|stop| *stop) => return,
                    };
                    match handshake {
                        Ok(Ok(stream)) => serve_connection(protocol, &builder, stream, app, stopped).await,
                        Ok(Err(error)) => {
                            tracing::debug!(%error, protocol, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(protocol, "TLS handshake timed out");
                            return;
                        }
                    }
                }
            };
            if let Err(error) = served {
                tracing::debug!(%error, protocol, "connection ended with an error");
            }
        });
    }
    // Every connection is told to go; answers in flight finish first (the drain waits for
    // them), and each connection is bounded on its own, so this wait is too.
    let _ = stop.send(true);
    let all_closed = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(REQUEST_TIMEOUT + CLOSE_GRACE, all_closed)
        .await
        .is_err()
    {
        tracing::debug!(
            left = connections.len(),
            protocol,
            "connections closed by force"
        );
    }
    Ok(())
}

/// Serves one connection until it ends, or until it has answered nothing for
/// [`IDLE_TIMEOUT`] (from its start when it never sent a request: a silent peer or a partial
/// HTTP/2 preface) or the sidecar stops. Then it is told to go (idle HTTP/1 closed, HTTP/2
/// `GOAWAY`) and, still open [`CLOSE_GRACE`] after its last answer, dropped.
async fn serve_connection<I>(
    protocol: &'static str,
    builder: &auto::Builder<TokioExecutor>,
    io: I,
    app: Router,
    mut stopped: watch::Receiver<bool>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let activity = Activity::new();
    let service = {
        let activity = activity.clone();
        let app = TowerToHyperService::new(app);
        hyper::service::service_fn(move |request| {
            let answering = activity.begin();
            let answer = hyper::service::Service::call(&app, request);
            async move {
                let answer = answer.await;
                drop(answering);
                answer
            }
        })
    };
    let connection = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(connection);
    tokio::select! {
        served = connection.as_mut() => return served,
        () = activity.idle_for(IDLE_TIMEOUT, Instant::now()) => {}
        _ = stopped.wait_for(|stop| *stop) => {}
    }
    connection.as_mut().graceful_shutdown();
    tokio::select! {
        served = connection.as_mut() => served,
        () = activity.idle_for(CLOSE_GRACE, Instant::now()) => {
            tracing::debug!(protocol, "connection closed by force after its grace");
            Ok(())
        }
    }
}

/// The main listener's certificate and client CA, with ALPN for both HTTP versions.
fn tls_acceptor(files: &TlsFiles) -> Result<TlsAcceptor, String> {
    use rustls_pki_types::pem::PemObject as _;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_slice_iter(&files.cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("CORESDK_TLS_CERT_FILE: {e}"))?;
    let key = PrivateKeyDer::from_pem_slice(&files.key)
        .map_err(|e| format!("CORESDK_TLS_KEY_FILE: {e}"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(ca) {
                let cert = cert.map_err(|e| format!("CORESDK_TLS_CLIENT_CA_FILE: {e}"))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("CORESDK_TLS_CLIENT_CA_FILE: {e}"))?;
            }
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .build()
                    .map_err(|e| format!("CORESDK_TLS_CLIENT_CA_FILE: {e}"))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| format!("CORESDK_TLS_CERT_FILE / CORESDK_TLS_KEY_FILE: {e}"))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// An OFREP error answer: `{key, errorCode, errorDetails}` (no `key` for the bulk endpoint).
#[derive(Debug)]
struct Failure {
    status: StatusCode,
    code: &'static str,
    details: String,
}

impl Failure {
    fn new(status: StatusCode, code: &'static str, details: impl Into<String>) -> Self {
        Self {
            status,
            code,
            details: details.into(),
        }
    }

    fn answer(self, key: Option<&str>) -> Response {
        let mut body = Map::new();
        if let Some(key) = key {
            body.insert("key".into(), Json::String(key.to_owned()));
        }
        body.insert("errorCode".into(), Json::String(self.code.to_owned()));
        body.insert("errorDetails".into(), Json::String(self.details));
        (self.status, axum::Json(Json::Object(body))).into_response()
    }
}

impl From<EvaluationError> for Failure {
    fn from(error: EvaluationError) -> Self {
        Failure::new(error.http_status(), error.code(), error.to_string())
    }
}

/// A longer body is still read (and dropped) up to this, within the request deadline: its
/// sender writes it whole before it reads the answer, and would otherwise find the connection
/// reset instead of the 413.
const MAX_DRAINED_BYTES: usize = 1024 * 1024;

/// The body, at most [`MAX_BODY_BYTES`] of it.
async fn read_body(body: Body) -> Result<Bytes, Failure> {
    use futures_util::StreamExt as _;
    let too_large = || {
        Failure::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "GENERAL",
            format!("the request body is larger than {MAX_BODY_BYTES} bytes"),
        )
    };
    let mut chunks = body.into_data_stream();
    let mut kept = Vec::new();
    let mut seen = 0usize;
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.map_err(|e| {
            Failure::new(
                StatusCode::BAD_REQUEST,
                "PARSE_ERROR",
                format!("the body could not be read: {e}"),
            )
        })?;
        seen = seen.saturating_add(chunk.len());
        if seen <= MAX_BODY_BYTES {
            kept.extend_from_slice(&chunk);
        } else if seen > MAX_DRAINED_BYTES {
            return Err(too_large());
        } else {
            kept = Vec::new();
        }
    }
    if seen > MAX_BODY_BYTES {
        return Err(too_large());
    }
    Ok(Bytes::from(kept))
}

/// The evaluation context of a request body `{"context": {...}}`. No body, or no context, is
/// an empty context (the Python provider sends `{}` when it has none).
fn context_of(body: &[u8]) -> Result<Option<Map<String, Json>>, Failure> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let parsed: Json = serde_json::from_slice(body).map_err(|e| {
        Failure::new(
            StatusCode::BAD_REQUEST,
            "PARSE_ERROR",
            format!("the body is not JSON: {e}"),
        )
    })?;
    let Json::Object(mut request) = parsed else {
        return Err(Failure::new(
            StatusCode::BAD_REQUEST,
            "PARSE_ERROR",
            r#"the body must be a JSON object: {"context": {...}}"#,
        ));
    };
    match request.remove("context") {
        None | Some(Json::Null) => Ok(None),
        Some(Json::Object(context)) => Ok(Some(context)),
        Some(_) => Err(Failure::new(
            StatusCode::BAD_REQUEST,
            "INVALID_CONTEXT",
            "context must be a JSON object",
        )),
    }
}

impl Ofrep {
    /// The bulk answer for `tenant` ("" for none) as the cache holds it now. The version is
    /// read first: a change landing meanwhile is in the answer, or bumps the version past it.
    fn bulk_answer(&self, tenant: &str) -> Result<BulkAnswer, Failure> {
        let cache = &self.app.feeds.flags;
        let version = cache.version();
        let flags: Vec<Json> = cache
            .all_of(tenant)
            .into_iter()
            .map(|flag| {
                let key = flag.key().to_owned();
                success(&key, Resolved::from(flag))
            })
            .collect();
        let body = json!({ "flags": flags }).to_string();
        let etag = format!(
            "\"{}\"",
            hex::encode(&Sha256::digest(body.as_bytes())[..16])
        );
        let etag = HeaderValue::from_str(&etag).map_err(|_| {
            Failure::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "GENERAL",
                "could not make the ETag",
            )
        })?;
        Ok(BulkAnswer {
            version,
            body: Bytes::from(body),
            etag,
        })
    }

    fn tenant(&self, context: Option<&Map<String, Json>>) -> Result<Option<String>, Failure> {
        Ok(tenant_of(
            context,
            &self.app.config.openfeature_tenant_attribute,
        )?)
    }
}

fn success(key: &str, resolved: Resolved) -> Json {
    json!({
        "key": key,
        "value": resolved.value.into_json(),
        "reason": resolved.reason,
        "variant": resolved.variant,
        "metadata": {},
    })
}

async fn evaluate_flag(
    State(ofrep): State<Ofrep>,
    Path(key): Path<String>,
    body: Body,
) -> Response {
    let body = match read_body(body).await {
        Ok(body) => body,
        Err(failure) => return failure.answer(Some(&key)),
    };
    let answer = context_of(&body).and_then(|context| {
        let tenant = ofrep.tenant(context.as_ref())?;
        Ok(resolve(&ofrep.app.feeds.flags, tenant.as_deref(), &key)?)
    });
    match answer {
        Ok(resolved) => axum::Json(success(&key, resolved)).into_response(),
        Err(failure) => failure.answer(Some(&key)),
    }
}

/// Every flag of the tenant the context names (the catalog defaults for no tenant). The ETag
/// is a digest of the answer itself, so it changes exactly when the answer does, whichever
/// replica gives it.
async fn evaluate_flags(State(ofrep): State<Ofrep>, headers: HeaderMap, body: Body) -> Response {
    let tenant = match read_body(body)
        .await
        .and_then(|body| context_of(&body))
        .and_then(|context| ofrep.tenant(context.as_ref()))
    {
        Ok(tenant) => tenant,
        Err(failure) => return failure.answer(None),
    };
    // A tenant without flags of its own gets the catalog defaults, as no tenant does.
    let tenant = tenant
        .filter(|tenant| ofrep.app.feeds.flags.has_own_flags(tenant))
        .unwrap_or_default();
    let answer = match ofrep.bulk.get(&tenant) {
        Some(kept) if kept.version == ofrep.app.feeds.flags.version() => kept,
        _ => match ofrep.bulk_answer(&tenant) {
            Ok(answer) => {
                let answer = Arc::new(answer);
                ofrep.bulk.insert(tenant, answer.clone());
                answer
            }
            Err(failure) => return failure.answer(None),
        },
    };
    if matches_etag(&headers, &answer.etag) {
        return (
            StatusCode::NOT_MODIFIED,
            [(header::ETAG, answer.etag.clone())],
        )
            .into_response();
    }
    (
        [
            (header::ETAG, answer.etag.clone()),
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            ),
        ],
        answer.body.clone(),
    )
        .into_response()
}

/// `If-None-Match` compared weakly against each listed entity tag. `*` (RFC 9110: any current
/// representation) is no tag the providers were given, and would make a first fetch a 304.
fn matches_etag(headers: &HeaderMap, etag: &HeaderValue) -> bool {
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
        // `*` would match on a first fetch: only the tags we gave out are compared.
        .any(|candidate| candidate.trim_start_matches("W/").as_bytes() == etag.as_bytes())
}

/// The API token, by the main listener's own interceptor: 401 in OFREP's shape when refused.
async fn authenticate(State(ofrep): State<Ofrep>, request: Request, next: Next) -> Response {
    let metadata = tonic::metadata::MetadataMap::from_headers(request.headers().clone());
    let call = tonic::Request::from_parts(metadata, tonic::Extensions::default(), ());
    match (ofrep.check)(call) {
        Ok(_) => next.run(request).await,
        Err(status) => {
            let http = match status.code() {
                tonic::Code::PermissionDenied => StatusCode::FORBIDDEN,
                _ => StatusCode::UNAUTHORIZED,
            };
            Failure::new(http, "GENERAL", status.message()).answer(None)
        }
    }
}

/// Admits a request while fewer than [`MAX_REQUESTS_IN_FLIGHT`] are held; beyond, 429 with
/// `Retry-After` (the providers pause until then).
async fn admit(State(admission): State<Arc<Semaphore>>, request: Request, next: Next) -> Response {
    let Ok(_admitted) = admission.try_acquire_owned() else {
        let mut answer = Failure::new(
            StatusCode::TOO_MANY_REQUESTS,
            "GENERAL",
            format!(
                "more than {MAX_REQUESTS_IN_FLIGHT} requests at once; retry after {RETRY_AFTER_S} s"
            ),
        )
        .answer(None);
        answer
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_S));
        return answer;
    };
    next.run(request).await
}

/// Bounds how long a request may take, its body included (a slow sender holds a slot).
async fn within_deadline(
    State(deadline): State<Duration>,
    request: Request,
    next: Next,
) -> Response {
    match tokio::time::timeout(deadline, next.run(request)).await {
        Ok(response) => response,
        Err(_) => Failure::new(
            StatusCode::REQUEST_TIMEOUT,
            "GENERAL",
            format!(
                "the request was not complete within {} ms",
                deadline.as_millis()
            ),
        )
        .answer(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(if_none_match: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::IF_NONE_MATCH,
            HeaderValue::from_str(if_none_match).expect("a header value"),
        );
        headers
    }

    fn abc() -> HeaderValue {
        HeaderValue::from_static("\"abc\"")
    }

    #[test]
    fn if_none_match_compares_weakly_against_each_listed_tag() {
        assert!(matches_etag(&headers("\"abc\""), &abc()));
        assert!(matches_etag(&headers("W/\"abc\""), &abc()));
        assert!(matches_etag(&headers("\"x\", \"abc\""), &abc()));
        assert!(!matches_etag(&headers("*"), &abc()));
        assert!(!matches_etag(&headers("\"abd\""), &abc()));
        assert!(!matches_etag(&HeaderMap::new(), &abc()));
    }

    #[tokio::test]
    async fn a_request_that_outlives_its_deadline_is_answered_408() {
        use tower::ServiceExt as _;
        let never = Router::new()
            .route("/", post(std::future::pending::<()>))
            .layer(from_fn_with_state(
                Duration::from_millis(20),
                within_deadline,
            ));
        let request = axum::http::Request::post("/")
            .body(axum::body::Body::empty())
            .expect("a request");
        let answer = tokio::time::timeout(Duration::from_secs(10), never.oneshot(request))
            .await
            .expect("an answer within 10 s");
        assert_eq!(
            answer.map(|response| response.status()).ok(),
            Some(StatusCode::REQUEST_TIMEOUT)
        );
    }

    #[tokio::test]
    async fn bodies_are_kept_up_to_the_bound_and_refused_past_it() {
        let read = |len: usize| read_body(Body::from(vec![b' '; len]));
        assert_eq!(
            read(MAX_BODY_BYTES).await.map(|b| b.len()).ok(),
            Some(MAX_BODY_BYTES)
        );
        for len in [MAX_BODY_BYTES + 1, MAX_DRAINED_BYTES + 1] {
            let refused = read(len).await.err().map(|failure| failure.status);
            assert_eq!(refused, Some(StatusCode::PAYLOAD_TOO_LARGE), "{len}");
        }
    }

    #[test]
    fn bodies_name_their_context_or_none() {
        let parse = |body: &str| context_of(body.as_bytes());
        assert!(matches!(parse(""), Ok(None)));
        assert!(matches!(parse("{}"), Ok(None)));
        assert!(matches!(parse(r#"{"context": {"a": 1}}"#), Ok(Some(_))));
        for (body, code) in [
            ("{", "PARSE_ERROR"),
            ("[]", "PARSE_ERROR"),
            (r#"{"context": "acme"}"#, "INVALID_CONTEXT"),
        ] {
            let failure = parse(body).expect_err(body);
            assert_eq!(failure.status, StatusCode::BAD_REQUEST, "{body}");
            assert_eq!(failure.code, code, "{body}");
        }
    }
}
