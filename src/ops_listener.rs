//! The operations listener: `/metrics` for Prometheus, `/livez` and `/readyz` for kubelet
//! probes, over plain HTTP and without the API token (scrapers and probes carry none; the
//! listener binds loopback unless told otherwise). Connections are bounded as OFREP's are.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{Next, from_fn_with_state};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::Semaphore;

use crate::app::App;
use crate::health::Health;
use crate::server::{ServeError, ServerTask, Side};

/// Scrapes answered at once; one more is answered 503 rather than queued. Probes are not
/// counted: each is O(1), and a probe refused because of scrapes would get a healthy sidecar
/// restarted.
const MAX_SCRAPES_IN_FLIGHT: usize = 4;
/// The runtime must run a fresh task within this for `/livez` to say it is alive.
const LIVENESS_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Clone)]
struct Ops {
    app: Arc<App>,
    health: Arc<Health>,
}

/// Serves the ops routes on the side listener until the sidecar stops.
pub fn serve<C>(side: Side<C>) -> Result<ServerTask, ServeError> {
    let stopping = side.stopping();
    let app = router(Ops {
        app: side.state,
        health: side.health,
    });
    Ok(tokio::spawn(crate::openfeature::ofrep::accept(
        "ops",
        side.listener,
        app,
        None,
        stopping,
    )))
}

fn router(ops: Ops) -> Router {
    let scrapes = Router::new()
        .route("/metrics", get(metrics))
        .route_layer(from_fn_with_state(
            Arc::new(Semaphore::new(MAX_SCRAPES_IN_FLIGHT)),
            admit,
        ));
    Router::new()
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .merge(scrapes)
        .with_state(ops)
}

async fn admit(State(admission): State<Arc<Semaphore>>, request: Request, next: Next) -> Response {
    let Ok(_admitted) = admission.try_acquire_owned() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("more than {MAX_SCRAPES_IN_FLIGHT} scrapes at once\n"),
        )
            .into_response();
    };
    next.run(request).await
}

/// Alive while the runtime still runs tasks: a wedged runtime would not answer at all, a
/// starved one answers 503.
async fn livez() -> Response {
    match tokio::time::timeout(LIVENESS_TIMEOUT, tokio::spawn(async {})).await {
        Ok(Ok(())) => (StatusCode::OK, "ok\n").into_response(),
        _ => (
            StatusCode::SERVICE_UNAVAILABLE,
            "the runtime does not run tasks\n",
        )
            .into_response(),
    }
}

/// Ready when every gRPC health service is SERVING; otherwise 503 naming those that are not.
async fn readyz(State(ops): State<Ops>) -> Response {
    let not_serving = ops.health.not_serving();
    if not_serving.is_empty() {
        return (StatusCode::OK, "ok\n").into_response();
    }
    let names: Vec<&str> = not_serving
        .iter()
        .map(|name| if name.is_empty() { "(server)" } else { name })
        .collect();
    (
        StatusCode::SERVICE_UNAVAILABLE,
        format!("not serving: {}\n", names.join(", ")),
    )
        .into_response()
}

async fn metrics(State(ops): State<Ops>) -> Response {
    let app = &ops.app;
    // Levels read now rather than kept up to date on every change.
    let mut live = Registry::default();
    let gauge = |value: u64| {
        let gauge = Gauge::<i64>::default();
        gauge.set(i64::try_from(value).unwrap_or(i64::MAX));
        gauge
    };
    live.register(
        "coresdk_store_queue_depth",
        "Store jobs queued or running (writes and reads); callers wait for room at 8192",
        gauge(app.store.queued() as u64),
    );
    live.register(
        "coresdk_watch_streams",
        "Streams open (WatchFlags, Tail, flagd event and sync streams), out of --max-streams",
        gauge(app.open_streams() as u64),
    );
    live.register(
        "coresdk_audit_head_seq",
        "Sequence number of the newest audit record this sidecar has published",
        gauge(app.feeds.audit_head().seq),
    );
    let stale = Family::<crate::metrics::SettingLabel, Gauge<i64>>::default();
    let mut files = Vec::new();
    for watched in app.config.watched() {
        if let Some(watched) = watched.upgrade() {
            watched.staleness(&mut files);
        }
    }
    for (setting, is_stale) in files {
        stale
            .get_or_create(&crate::metrics::SettingLabel { setting })
            .set(i64::from(is_stale));
    }
    live.register(
        "coresdk_secret_file_stale",
        "1 while a watched secret file's current content cannot be used and an older one is served (see the ERROR log), else 0",
        stale,
    );
    match app.feeds.metrics().encode(&live) {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
            )],
            text,
        )
            .into_response(),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "the metrics could not be encoded\n",
        )
            .into_response(),
    }
}
