//! Assembles the services, health and reflection, and runs them until SIGTERM/SIGINT, then
//! drains: NOT_SERVING first while every call is still answered for the shutdown delay, then
//! no new calls, streams told to end, in-flight calls given a bounded grace, and the store
//! closed cleanly last.

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::{Router, TcpIncoming};
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic_health::ServingStatus;
use tower::layer::util::{Identity as NoLayer, Stack};

use crate::health::Health;

use crate::api::{
    audit::AuditApi, auth::AuthApi, flags::FlagApi, tenants::TenantApi, webhook::WebhookApi,
};
use crate::app::App;
use crate::config::{Config, SideListener};
use crate::feeds::Feeds;
use crate::flags::FlagCache;
use crate::ops;
use crate::problem::Error;
use crate::proto::{
    audit_service_server::AuditServiceServer, auth_service_server::AuthServiceServer,
    flag_service_server::FlagServiceServer, tenant_service_server::TenantServiceServer,
    webhook_service_server::WebhookServiceServer,
};
use crate::store::Store;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot prepare the audit checkpoints: {0}")]
    Checkpoints(#[from] crate::config::ConfigError),
    #[error("cannot open the store: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("cannot prepare the store: {0}")]
    Prepare(#[from] Error),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error(
        "cannot listen for {} on {addr} ({} / {}): {source}; choose another address, or off",
        listener.name(), listener.flag(), listener.setting()
    )]
    SideBind {
        listener: SideListener,
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error(
        "cannot serve {} over TLS: {message}; check CORESDK_TLS_CERT_FILE, CORESDK_TLS_KEY_FILE and CORESDK_TLS_CLIENT_CA_FILE",
        listener.name()
    )]
    SideTls {
        listener: SideListener,
        message: String,
    },
    #[error("cannot listen for SIGTERM/SIGINT: {0}")]
    Signals(std::io::Error),
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

pub async fn serve(config: Config) -> Result<(), ServeError> {
    if config.mock {
        tracing::warn!(
            "MOCK MODE: in-memory store (nothing survives a restart), seeded test tenants, test webhook secret unless one is set, admin RPCs allowed without a token. Never use in production."
        );
    }
    if !config.verifier.has_secrets() {
        tracing::warn!(
            "no webhook secret: set STRIPE_WEBHOOK_SECRET or STRIPE_WEBHOOK_SECRET_FILE; webhooks are refused until then"
        );
    }
    if !config.operators.configured() && !config.mock {
        tracing::warn!(
            "no CORESDK_ADMIN_TOKEN nor CORESDK_ADMIN_TOKENS_FILE: admin RPCs (SetFlag, MapCustomer, UnmapCustomer, ResolveCustomer, ReplayStripeEvent, AddCosignatures) are refused"
        );
    }
    if config.tokens.accepts_other_apps_tokens() {
        tracing::warn!(
            "JWT public keys (CORESDK_JWT_PUBLIC_KEY_FILE or CORESDK_JWKS_FILE) without CORESDK_JWT_AUDIENCE: tokens their issuer made for any other application are accepted; set CORESDK_JWT_AUDIENCE to this application's audience"
        );
    }

    // The key is created here rather than while parsing, so a start that fails validation
    // leaves no key (and no data directory) behind.
    let checkpoints = match &config.checkpoint_files {
        Some(files) => Some(Arc::new(files.open()?)),
        None => None,
    };
    if let Some(checkpointer) = &checkpoints {
        tracing::info!(
            origin = checkpointer.origin(),
            verifier_key = %checkpointer.verifier_key(),
            file = %checkpointer.path().display(),
            "audit checkpoints are signed as C2SP tlog-checkpoint notes"
        );
    }

    let cache = Arc::new(FlagCache::new(config.rules.catalog().clone()));
    // Collected only where someone can scrape them, so `--ops-listen off` costs nothing.
    let metrics = match config.ops_listen {
        Some(_) => crate::metrics::Metrics::new(&crate::methods::SERVED_DESCRIPTOR_SETS),
        None => crate::metrics::Metrics::default(),
    };
    let feeds = Arc::new(Feeds::new(cache.clone()).with_metrics(metrics));
    let store = Store::open(
        &config.store,
        config.postgres_ca_file.as_deref(),
        feeds.clone(),
        cache.clone(),
    )?;
    // A tree that cannot be built (an edited table) must not keep the sidecar from serving:
    // verification names the damage, and the writer extends the tree from the records.
    if let Err(e) = crate::tlog::build_missing(&store).await {
        tracing::error!(error = %e, "the audit Merkle tree could not be built over the whole chain; proofs reach only as far as it does: run coresdk audit verify --full");
    }
    cache.load(store.read(|tx| Ok(tx.load_flags()?)).await?);
    feeds.set_audit_head(store.read(|tx| Ok(tx.audit_head()?)).await?);
    seed_tenants(&store, &config).await?;

    let (health, health_service) = Health::new();
    let health = Arc::new(health);
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let listen = config.listen;
    let grace = config.shutdown_grace;
    let delay = config.shutdown_delay;
    let max_message = config
        .webhook_max_body_bytes
        .saturating_mul(4)
        .max(4 * 1024 * 1024);
    let state = Arc::new(App::new(
        config,
        store.clone(),
        feeds,
        checkpoints,
        shutdown_rx.clone(),
    ));
    crate::reload::spawn_watcher(state.config.watched(), crate::reload::WATCH_EVERY);

    let (reflection_v1, reflection_v1alpha) = reflection(&[
        crate::proto::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
    ])?;

    let mut signals = ShutdownSignals::register().map_err(ServeError::Signals)?;
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|source| ServeError::Bind {
            addr: listen,
            source,
        })?;
    let bound = listener.local_addr().map_err(|source| ServeError::Bind {
        addr: listen,
        source,
    })?;

    let in_flight = crate::drain::InFlight::default();
    let mut builder = server_builder(&state.config, state.feeds.metrics(), &in_flight)?;
    let check = crate::api::api_token_check(
        state.config.api_token.clone(),
        state.config.operators.clone(),
        state.links().clone(),
    );
    // Oversized webhook bodies must reach the handler to get a problem answer, so the
    // transport limit sits well above the body limit.
    let router = builder
        .add_service(health_service)
        .add_service(InterceptedService::new(reflection_v1, check.clone()))
        .add_service(InterceptedService::new(reflection_v1alpha, check.clone()))
        .add_service(InterceptedService::new(
            WebhookServiceServer::new(WebhookApi { app: state.clone() })
                .max_decoding_message_size(max_message),
            check.clone(),
        ))
        .add_service(FlagServiceServer::with_interceptor(
            FlagApi { app: state.clone() },
            check.clone(),
        ))
        .add_service(AuditServiceServer::with_interceptor(
            AuditApi { app: state.clone() },
            check.clone(),
        ))
        .add_service(TenantServiceServer::with_interceptor(
            TenantApi { app: state.clone() },
            check.clone(),
        ))
        .add_service(AuthServiceServer::with_interceptor(
            AuthApi { app: state.clone() },
            check.clone(),
        ));

    health.set_all(ServingStatus::Serving).await;

    // Bound before the main listener announces itself: a start that cannot have a side
    // listener it was asked for fails before anyone is told it serves.
    let mut sides = Vec::new();
    for listener in SideListener::ALL {
        let Some(addr) = state.config.listen_of(listener) else {
            continue;
        };
        let by_default = state.config.listens_by_default(listener);
        let Some(tcp) = bind_side(listener, addr, by_default).await? else {
            continue;
        };
        let bound = tcp.local_addr().map_err(|source| ServeError::SideBind {
            listener,
            addr,
            source,
        })?;
        let side = Side {
            listener: tcp,
            state: state.clone(),
            check: check.clone(),
            in_flight: in_flight.clone(),
            shutdown: shutdown_rx.clone(),
            health: health.clone(),
        };
        let task = match listener {
            SideListener::Flagd => serve_flagd(side)?,
            SideListener::FlagdSync => serve_flagd_sync(side)?,
            SideListener::Ofrep => crate::openfeature::ofrep::serve(side)?,
            SideListener::Ops => crate::ops_listener::serve(side)?,
        };
        tracing::info!(%bound, "serving {}", listener.serves());
        sides.push((listener, bound, task));
    }

    let mut drain = shutdown_rx.clone();
    let mut server = tokio::spawn(router.serve_with_incoming_shutdown(
        // Small answers must not wait for delayed ACKs (Nagle): set TCP_NODELAY per connection.
        TcpIncoming::from(listener).with_nodelay(Some(true)),
        async move {
            let _ = drain.wait_for(|stop| *stop).await;
        },
    ));
    tracing::info!(%bound, store = ?state.config.store, "serving");
    // Tests and tools read this line to learn the port when listening on port 0.
    // Signals are registered first: whoever reads the line may stop us right away.
    // A closed stdout (`coresdk … | true`) must not take the server down, as println! would.
    {
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), "coresdk listening on {bound}");
        // After it, so readers of the first line alone are unaffected.
        for (listener, side_bound, _) in &sides {
            let _ = writeln!(
                std::io::stdout(),
                "coresdk {} listening on {side_bound}",
                listener.name()
            );
        }
    }

    let store_health = tokio::spawn(report_store_health(store.clone(), health.clone()));
    let checkpointing = state.checkpoints.clone().map(|checkpointer| {
        let feeds = state.feeds.clone();
        let every = state.config.checkpoint_interval;
        tokio::spawn(checkpoint_loop(checkpointer, store.clone(), feeds, every))
    });

    let retention = state
        .config
        .dedup_retention
        .map(|window| tokio::spawn(crate::ops::retention_loop(store.clone(), window)));

    signals.received().await;
    // Stopped first: a store coming back must not turn a service SERVING again while we go.
    store_health.abort();
    // An abort does not stop a poll already running on another worker: wait for the task to
    // be gone before the last word on the statuses.
    let _ = store_health.await;
    health.set_all(ServingStatus::NotServing).await;
    // Load balancers and the app next to us see NOT_SERVING and stop sending; until they
    // have, every call (and every new connection) is still answered, streams included.
    if !delay.is_zero() {
        tracing::info!(
            ?delay,
            "shutting down: NOT_SERVING, still answering every call for the shutdown delay (CORESDK_SHUTDOWN_DELAY_S); send SIGTERM or SIGINT again to end the delay now"
        );
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = signals.received() => {
                tracing::info!("second shutdown signal: the shutdown delay ends now");
            }
        }
    }
    tracing::info!(
        in_flight = in_flight.current(),
        "shutting down: no new calls, draining in-flight calls"
    );
    let _ = shutdown_tx.send(true);
    if !in_flight.drained(grace).await {
        tracing::warn!(
            ?grace,
            left = in_flight.current(),
            "in-flight calls did not finish within the grace period"
        );
    }
    // A server that failed still lets the rest shut down cleanly (the audit windows closed,
    // the final checkpoint written, the store closed); its error is the exit status.
    let mut failed = finish(&mut server, "main").await.err();
    for (listener, _, task) in &mut sides {
        if let Err(e) = finish(task, listener.name()).await {
            failed.get_or_insert(e);
        }
    }
    if let Some(task) = retention {
        task.abort();
    }
    if let Some(task) = checkpointing {
        task.abort();
    }
    // Counts still open in coalescing windows become records while the store is open.
    state.close_audits(grace).await;
    // The calls have drained and the audit writer has stopped, so the chain is complete: the
    // final checkpoint reads its head, and checks it, while the store is still open.
    // Aborting the loop does not stop a write it already handed to a blocking thread; when that
    // one lands between our check and our write, the file changed under us: check again once.
    if let Some(checkpointer) = state.checkpoints.clone()
        && let Err(e) = match checkpointer.checkpoint(&store).await {
            Err(crate::checkpoint::SignError::Changed) => checkpointer.checkpoint(&store).await,
            done => done,
        }
    {
        tracing::error!(error = %e, "could not write the final audit checkpoint");
    }
    drop(state);
    let closing = store.clone();
    let _ = tokio::task::spawn_blocking(move || closing.close()).await;
    tracing::info!("store closed; bye");
    failed.map_or(Ok(()), Err)
}

/// The layers every gRPC listener has, outermost first: the call's span (when traces are on)
/// covers all of it, the metrics see every answer (a refused or timed out call's too), the
/// connection's share is taken, drain counts the call, the timeout bounds the handler.
type GrpcLayers = Stack<
    crate::limits::RequestTimeout,
    Stack<
        crate::drain::InFlight,
        Stack<
            crate::limits::ConnectionCalls,
            Stack<crate::metrics::grpc::GrpcLayer, Stack<crate::telemetry::TraceLayer, NoLayer>>,
        >,
    >,
>;

/// A server builder with the listener's limits, TLS settings (if any) and layers.
fn server_builder(
    config: &Config,
    metrics: &crate::metrics::Metrics,
    in_flight: &crate::drain::InFlight,
) -> Result<Server<GrpcLayers>, ServeError> {
    let mut builder = config.limits.apply(Server::builder());
    if let Some(tls) = &config.tls {
        let mut tls_config =
            ServerTlsConfig::new().identity(Identity::from_pem(&tls.cert, &tls.key));
        if let Some(ca) = &tls.client_ca {
            tls_config = tls_config.client_ca_root(Certificate::from_pem(ca));
        }
        builder = builder.tls_config(tls_config)?;
    }
    Ok(builder
        .layer(crate::telemetry::TraceLayer::new(
            &crate::methods::SERVED_DESCRIPTOR_SETS,
        ))
        .layer(metrics.grpc_layer())
        .layer(config.limits.connection_calls(&config.problem_links))
        .layer(in_flight.clone())
        .layer(config.limits.request_timeout(&config.problem_links)))
}

/// A server's task; it ends when the shutdown signal has drained it.
pub type ServerTask = tokio::task::JoinHandle<Result<(), ServeError>>;

/// Waits briefly for a server task to end: idle client connections would hold the transport's
/// own drain open indefinitely, so after that it is aborted.
async fn finish<E>(
    task: &mut tokio::task::JoinHandle<Result<(), E>>,
    which: &str,
) -> Result<(), ServeError>
where
    ServeError: From<E>,
{
    match tokio::time::timeout(std::time::Duration::from_millis(200), &mut *task).await {
        Ok(Ok(result)) => result?,
        Ok(Err(join)) => tracing::error!(error = %join, server = which, "server task failed"),
        Err(_) => task.abort(),
    }
    Ok(())
}

/// What a server beside the main one shares with it: the app, the API-token check, the
/// in-flight count SIGTERM drains, and the shutdown signal.
pub struct Side<C> {
    pub listener: TcpListener,
    pub state: Arc<App>,
    pub check: C,
    pub in_flight: crate::drain::InFlight,
    pub shutdown: watch::Receiver<bool>,
    /// The gRPC health statuses, which readiness reports.
    pub health: Arc<Health>,
}

impl<C> Side<C> {
    /// A future that completes when the sidecar shuts down.
    pub fn stopping(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut shutdown = self.shutdown.clone();
        async move {
            let _ = shutdown.wait_for(|stop| *stop).await;
        }
    }
}

/// Binds a side listener. A port taken at a protocol's default address (a real flagd in the
/// pod, another sidecar) must not stop a sidecar that was never asked for that protocol: it
/// serves without it, and says so (`None`). An address the operator chose is theirs to fix.
async fn bind_side(
    listener: SideListener,
    addr: std::net::SocketAddr,
    by_default: bool,
) -> Result<Option<TcpListener>, ServeError> {
    match TcpListener::bind(addr).await {
        Ok(tcp) => Ok(Some(tcp)),
        Err(source) if by_default => {
            tracing::warn!(
                %addr,
                error = %source,
                "{} is not served: its default address is taken; set {} to a free address, or off",
                listener.name(),
                listener.setting()
            );
            Ok(None)
        }
        Err(source) => Err(ServeError::SideBind {
            listener,
            addr,
            source,
        }),
    }
}

/// Server reflection describing `descriptor_sets`, in both versions: grpcurl up to 1.8
/// (PyPI's, for one) speaks only the older `v1alpha`.
fn reflection(
    descriptor_sets: &[&'static [u8]],
) -> Result<
    (
        tonic_reflection::server::v1::ServerReflectionServer<
            impl tonic_reflection::server::v1::ServerReflection,
        >,
        tonic_reflection::server::v1alpha::ServerReflectionServer<
            impl tonic_reflection::server::v1alpha::ServerReflection,
        >,
    ),
    ServeError,
> {
    let builder = || {
        descriptor_sets.iter().fold(
            tonic_reflection::server::Builder::configure(),
            |builder, set| builder.register_encoded_file_descriptor_set(set),
        )
    };
    Ok((builder().build_v1()?, builder().build_v1alpha()?))
}

/// A gRPC side listener's server: the main listener's layers, limits and TLS, and reflection
/// over its own descriptors (so grpcurl needs no local copy of flagd's protos), behind the
/// main listener's API token.
fn side_router<C>(
    side: &Side<C>,
    descriptors: &'static [u8],
) -> Result<Router<GrpcLayers>, ServeError>
where
    C: tonic::service::Interceptor + Clone + Send + Sync + 'static,
{
    let (reflection, reflection_v1alpha) = reflection(&[descriptors])?;
    Ok(server_builder(
        &side.state.config,
        side.state.feeds.metrics(),
        &side.in_flight,
    )?
    .add_service(InterceptedService::new(reflection, side.check.clone()))
    .add_service(InterceptedService::new(
        reflection_v1alpha,
        side.check.clone(),
    )))
}

/// Serves a side listener's router until the shutdown signal.
fn spawn_side<C>(router: Router<GrpcLayers>, side: Side<C>) -> ServerTask {
    let stopping = side.stopping();
    let incoming = TcpIncoming::from(side.listener).with_nodelay(Some(true));
    tokio::spawn(async move {
        Ok(router
            .serve_with_incoming_shutdown(incoming, stopping)
            .await?)
    })
}

/// flagd's evaluation service (v1 and v2), with the main listener's TLS and API token.
fn serve_flagd<C>(side: Side<C>) -> Result<ServerTask, ServeError>
where
    C: tonic::service::Interceptor + Clone + Send + Sync + 'static,
{
    use crate::flagd_proto::evaluation::{v1, v2};
    let evaluation = crate::openfeature::evaluation::Evaluation {
        app: side.state.clone(),
    };
    let router = side_router(&side, crate::flagd_proto::FILE_DESCRIPTOR_SET)?
        .add_service(v1::service_server::ServiceServer::with_interceptor(
            evaluation.clone(),
            side.check.clone(),
        ))
        .add_service(v2::service_server::ServiceServer::with_interceptor(
            evaluation,
            side.check.clone(),
        ));
    Ok(spawn_side(router, side))
}

/// flagd's sync service (`flagd.sync.v1`) for in-process providers, with the main listener's
/// TLS and API token.
fn serve_flagd_sync<C>(side: Side<C>) -> Result<ServerTask, ServeError>
where
    C: tonic::service::Interceptor + Clone + Send + Sync + 'static,
{
    use crate::flagd_proto::sync::v1::flag_sync_service_server::FlagSyncServiceServer;
    let sync = crate::openfeature::sync::Sync::start(side.state.clone());
    let router = side_router(&side, crate::flagd_proto::sync::FILE_DESCRIPTOR_SET)?.add_service(
        FlagSyncServiceServer::with_interceptor(sync, side.check.clone()),
    );
    Ok(spawn_side(router, side))
}

/// Services that need the database report NOT_SERVING while it is unreachable; the server as
/// a whole (`""`), FlagService and AuthService stay SERVING, since they answer from memory.
async fn report_store_health(store: Store, health: Arc<Health>) {
    let mut was_up = true;
    let mut ticker = tokio::time::interval(std::time::Duration::from_millis(250));
    loop {
        ticker.tick().await;
        let up = store.available();
        if up == was_up {
            continue;
        }
        was_up = up;
        let status = if up {
            tracing::info!("store reachable again");
            ServingStatus::Serving
        } else {
            tracing::warn!("store unreachable: webhooks, audit and tenant RPCs answer UNAVAILABLE");
            ServingStatus::NotServing
        };
        for name in crate::health::NEEDS_STORE {
            health.set(name, status).await;
        }
    }
}

/// Signs the log's tree every `every` when it grew, and at once when a caller waits for a
/// proof ([`crate::checkpoint::Checkpointer::covering`]). The first round runs at start, so a
/// log cut or rewritten while the sidecar was down is reported right away.
async fn checkpoint_loop(
    checkpointer: Arc<crate::checkpoint::Checkpointer>,
    store: Store,
    feeds: Arc<Feeds>,
    every: std::time::Duration,
) {
    let mut covered = None;
    // The log's head when a round last refused it.
    let mut refused_at = None;
    let mut ticker = tokio::time::interval(every);
    // After a slow write, wait a full interval rather than catching up with a burst.
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let wanted = tokio::select! {
            _ = ticker.tick() => None,
            wanted = checkpointer.asked() => Some(wanted),
        };
        let asked = wanted.is_some();
        let published = feeds.audit_head().seq;
        // The store's head may be ahead of what the commit listener has published yet; a
        // caller asking has a record committed, so its round always reads the store, unless
        // the last round covered it already (the caller asked while it ran, and is served).
        let need = wanted.unwrap_or(published);
        if refused_at.is_none() && covered.is_some_and(|covered| covered >= need) {
            continue;
        }
        if !asked && covered.is_some_and(|covered| covered >= published) {
            continue;
        }
        // A refused log that has not moved is refused again without a check (or its ERROR):
        // a caller asking for proofs must not make the sidecar rescan it call after call.
        if refused_at == Some(published) {
            checkpointer.repeat_round();
            continue;
        }
        refused_at = None;
        match checkpointer.checkpoint(&store).await {
            Ok(head) => covered = Some(head.seq),
            Err(e @ crate::checkpoint::SignError::DoesNotExtend { .. }) => {
                refused_at = Some(published);
                tracing::error!(
                    error = %e,
                    file = %checkpointer.path().display(),
                    "AUDIT CHAIN CUT OR REWRITTEN: no checkpoint is signed until it is resolved"
                );
                // Said again whenever the log moves, not on every tick.
                covered = Some(published);
            }
            Err(e) => tracing::error!(error = %e, "could not write an audit checkpoint"),
        }
    }
}

async fn seed_tenants(store: &Store, config: &Config) -> Result<(), Error> {
    if config.tenants.is_empty() {
        return Ok(());
    }
    let tenants = config.tenants.clone();
    let overrides = config.tenants_file_overrides;
    let (rules, parking) = (config.rules.clone(), config.parking);
    let report = store
        .write(move |tx| {
            ops::seed_customers(
                tx,
                &rules,
                parking,
                &tenants,
                overrides,
                crate::time::now_ms(),
            )
        })
        .await?;
    tracing::info!(
        added = report.added,
        unchanged = report.unchanged,
        overridden = report.overridden,
        parked_applied = report.parked_applied,
        "customer → tenant mappings seeded from the configuration"
    );
    if report.kept + report.kept_unmapped > 0 {
        tracing::warn!(
            kept = report.kept,
            kept_unmapped = report.kept_unmapped,
            "customers the tenants file maps elsewhere keep their runtime mapping, and customers unmapped at runtime stay unmapped; set CORESDK_TENANTS_FILE_OVERRIDES=true to let the file win"
        );
    }
    Ok(())
}

/// SIGTERM and SIGINT, registered when this is created: a signal that arrives before the
/// server waits for it must still mean "drain", never the default "die at once".
struct ShutdownSignals {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
}

impl ShutdownSignals {
    fn register() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            terminate: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
        })
    }

    /// The next SIGTERM or SIGINT.
    async fn received(&mut self) {
        tokio::select! {
            _ = self.terminate.recv() => {},
            _ = self.interrupt.recv() => {},
        }
    }
}
