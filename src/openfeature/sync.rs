//! flagd's sync protocol (`flagd.sync.v1.FlagSyncService`) for OpenFeature's in-process
//! providers: they receive flagd's JSON flag configuration and evaluate it themselves.
//!
//! The configuration compiles every tenant's values into JSONLogic `targeting` on the tenant
//! (the context's tenant attribute, else its `targetingKey`, as [`super::tenant_of`] picks
//! it), so a provider answers exactly what the evaluation service answers. Tenants sharing a
//! value share one `in` list, so the document grows by about one tenant id per tenant value.
//! With the selector `tenant=<id>` a provider receives that tenant's flags alone, as static
//! flags.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;
use serde::Serialize;
use serde_json::{Value as Json, json};
use tokio::sync::{broadcast, watch};
use tokio_stream::wrappers::WatchStream;
use tonic::{Request, Response, Status};

use super::{DEFAULT_VARIANT, TENANT_VARIANT};
use crate::api::{ResponseStream, SharedApp, status};
use crate::flagd_proto::sync::v1::{
    FetchAllFlagsRequest, FetchAllFlagsResponse, GetMetadataRequest, GetMetadataResponse,
    SyncFlagsRequest, SyncFlagsResponse, flag_sync_service_server::FlagSyncService,
};
use crate::flags::{Flag, FlagCache, FlagRecord, FlagValue};
use crate::problem::Error;

/// The header flagd's providers send their selector in (the request field is deprecated).
pub const SELECTOR_HEADER: &str = "flagd-selector";
/// The selector naming one tenant: `tenant=<id>`.
pub const TENANT_SELECTOR: &str = "tenant=";
/// The shared `$evaluators` entry: the tenant an evaluation context names.
pub const TENANT_EVALUATOR: &str = "tenant";
/// The changes of one commit (a webhook turning several flags) reach the cache one by one:
/// waiting this long after the first lets the rest ride along in the same document.
const SETTLE: Duration = Duration::from_millis(5);
/// Documents are rebuilt at most this often: a burst of changes (a migration, a flood of
/// webhooks) costs one build per interval, not one per change.
const MIN_SPACING: Duration = Duration::from_millis(75);

/// Which configuration a provider asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    /// Every tenant's values, in targeting.
    All,
    /// One tenant's values, as static flags.
    Tenant(String),
}

impl Selector {
    /// The `flagd-selector` header, else the request's (deprecated) `selector` field.
    fn of<T>(request: &Request<T>, field: &str) -> Result<Self, Error> {
        let header = match request.metadata().get(SELECTOR_HEADER) {
            Some(value) => Some(value.to_str().map_err(|_| {
                Error::invalid(
                    "selector",
                    format!("the {SELECTOR_HEADER} header must be visible ASCII"),
                )
            })?),
            None => None,
        };
        Self::parse(header.filter(|h| !h.is_empty()).unwrap_or(field))
    }

    pub fn parse(selector: &str) -> Result<Self, Error> {
        if selector.is_empty() {
            return Ok(Self::All);
        }
        let Some(tenant) = selector.strip_prefix(TENANT_SELECTOR) else {
            return Err(Error::invalid(
                "selector",
                format!(
                    "'{}' is not a selector this sidecar serves: leave it empty for every tenant, or use {TENANT_SELECTOR}<id> for one",
                    crate::problem::quoted(selector)
                ),
            ));
        };
        crate::ops::validate_id("selector", tenant)?;
        Ok(Self::Tenant(tenant.to_owned()))
    }

    /// The configuration it selects, as the cache holds it now.
    fn document(&self, cache: &FlagCache, tenant_attribute: &str) -> String {
        match self {
            Self::All => document(cache, tenant_attribute),
            Self::Tenant(tenant) => tenant_document(cache, tenant),
        }
    }

    /// Whether a change can alter its configuration.
    fn concerns(&self, change: &FlagRecord) -> bool {
        match self {
            Self::All => true,
            Self::Tenant(tenant) => change.tenant_id == *tenant,
        }
    }
}

/// flagd's flag configuration (https://flagd.dev/schema/v0/flags.json).
#[derive(Serialize)]
struct Document<'a> {
    #[serde(rename = "$evaluators", skip_serializing_if = "Option::is_none")]
    evaluators: Option<Json>,
    flags: BTreeMap<&'a str, Definition<'a>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Definition<'a> {
    state: &'static str,
    variants: BTreeMap<String, Json>,
    /// Absent for a key the catalog lacks: the provider then answers the caller's default,
    /// which is what a tenant without the key gets from the evaluation service as well
    /// (there as `FLAG_NOT_FOUND`).
    #[serde(skip_serializing_if = "Option::is_none")]
    default_variant: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    targeting: Option<Targeting<'a>>,
}

/// `{"if": [{"in": [{"$ref": "tenant"}, [<ids>]]}, "<variant>", …, null]}`: the variant of
/// the list that names the tenant; `null` (the default variant, reason DEFAULT) for none.
#[derive(Serialize)]
struct Targeting<'a> {
    #[serde(rename = "if")]
    branches: Vec<Branch<'a>>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum Branch<'a> {
    Listed {
        #[serde(rename = "in")]
        within: (TenantReference, Vec<&'a str>),
    },
    Variant(String),
    Otherwise(()),
}

/// `{"$ref": "tenant"}`: the shared tenant expression.
#[derive(Serialize)]
struct TenantReference {
    #[serde(rename = "$ref")]
    reference: &'static str,
}

/// The JSONLogic for "the tenant the context names": its tenant attribute if set, else its
/// `targetingKey`, as the evaluation service picks it.
pub fn tenant_expression(tenant_attribute: &str) -> Json {
    json!({"if": [
        {"var": tenant_attribute},
        {"var": tenant_attribute},
        {"var": "targetingKey"}
    ]})
}

/// The tenants sharing one value of a flag.
struct Group<'a> {
    value: Json,
    tenants: Vec<&'a str>,
}

/// Whether flagd's schema lets a value be a variant: objects only among JSON values (arrays
/// and JSON scalars are refused by strict providers, and would cost every tenant its flags).
fn servable(value: &FlagValue) -> bool {
    !matches!(value, FlagValue::Json(json) if !json.is_object())
}

/// flagd's schema wants every variant of a flag to be of one type: the catalog default's,
/// else (a key only operators set) the first stored value's.
fn same_kind(a: &FlagValue, b: &FlagValue) -> bool {
    std::mem::discriminant(a) == std::mem::discriminant(b)
}

/// The all-tenants configuration: per flag, the catalog default as `defaultVariant` and one
/// variant per distinct tenant value, chosen by targeting on the tenant. A tenant whose own
/// value equals the default is still listed, so its evaluation is a `TARGETING_MATCH` as on
/// the evaluation service.
pub fn document(cache: &FlagCache, tenant_attribute: &str) -> String {
    let stored = cache.snapshot("");
    let catalog = cache.defaults();
    let defaults: BTreeMap<&str, &FlagValue> = catalog
        .iter()
        .map(|flag| (flag.key(), flag.value()))
        .collect();
    // Per key, per value (by its JSON text, so equal values group whatever their origin).
    let mut groups: BTreeMap<&str, BTreeMap<String, Group<'_>>> =
        defaults.keys().map(|key| (*key, BTreeMap::new())).collect();
    let mut kinds: BTreeMap<&str, &FlagValue> = defaults.clone();
    let mut left_out = 0usize;
    for flag in &stored {
        if !servable(flag.value()) {
            left_out += 1;
            continue;
        }
        // Only a servable value may set the kind of a key the catalog lacks.
        let kind = *kinds.entry(flag.key()).or_insert(flag.value());
        if !same_kind(flag.value(), kind) {
            left_out += 1;
            continue;
        }
        let value = flag.value().clone().into_json();
        let group = groups
            .entry(flag.key())
            .or_default()
            .entry(value.to_string())
            .or_insert_with(|| Group {
                value,
                tenants: Vec::new(),
            });
        group.tenants.push(flag.tenant_id());
    }
    let flags = groups
        .into_iter()
        .map(|(key, by_value)| {
            let mut variants = BTreeMap::new();
            let default_variant = defaults.get(key).map(|value| {
                variants.insert(DEFAULT_VARIANT.to_owned(), (*value).clone().into_json());
                DEFAULT_VARIANT
            });
            let mut branches = Vec::with_capacity(by_value.len() * 2 + 1);
            for (n, group) in by_value.into_values().enumerate() {
                let name = format!("{TENANT_VARIANT}-{}", n + 1);
                let reference = TenantReference {
                    reference: TENANT_EVALUATOR,
                };
                branches.push(Branch::Listed {
                    within: (reference, group.tenants),
                });
                branches.push(Branch::Variant(name.clone()));
                variants.insert(name, group.value);
            }
            branches.push(Branch::Otherwise(()));
            let definition = Definition {
                state: "ENABLED",
                variants,
                default_variant,
                targeting: Some(Targeting { branches }),
            };
            (key, definition)
        })
        .collect();
    if left_out > 0 {
        tracing::warn!(
            left_out,
            "flagd sync: tenant values that flagd's schema cannot hold (a JSON array or scalar, or a type other than the flag's) are left out; those tenants get the flag's default in-process"
        );
    }
    let document = Document {
        evaluators: Some(json!({ TENANT_EVALUATOR: tenant_expression(tenant_attribute) })),
        flags,
    };
    serialize(&document)
}

/// One tenant's configuration: its flags (catalog defaults included) as static flags, the
/// variant named as the evaluation service names it.
pub fn tenant_document(cache: &FlagCache, tenant: &str) -> String {
    let flags = cache.all_of(tenant);
    let document = Document {
        evaluators: None,
        flags: flags
            .iter()
            .filter(|flag| servable(flag.value()))
            .map(|flag| {
                let name = match flag {
                    Flag::Set(_) => TENANT_VARIANT,
                    Flag::Default { .. } => DEFAULT_VARIANT,
                };
                let definition = Definition {
                    state: "ENABLED",
                    variants: BTreeMap::from([(name.to_owned(), flag.value().clone().into_json())]),
                    default_variant: Some(name),
                    targeting: None,
                };
                (flag.key(), definition)
            })
            .collect(),
    };
    serialize(&document)
}

fn serialize(document: &Document<'_>) -> String {
    // Only string-keyed maps, strings and JSON values: serializing cannot fail.
    serde_json::to_string(document).unwrap_or_default()
}

/// Keeps `sender` at the current configuration of `selector`: after each burst of changes
/// that concerns it, one rebuild, published only when the document differs. Readers of the
/// watch see the latest document, never a backlog. Ends at shutdown, or, for a document of
/// its own (`shared` is `None`), when nobody reads it. A shared document (`shared` given)
/// outlives its readers, but is not rebuilt while it has none: its flag then says it is
/// stale, and the next reader rebuilds it (see [`Shared::follow`]).
async fn publish(
    cache: Arc<FlagCache>,
    tenant_attribute: Arc<str>,
    selector: Selector,
    mut changes: broadcast::Receiver<Arc<FlagRecord>>,
    mut shutdown: watch::Receiver<bool>,
    sender: watch::Sender<Arc<str>>,
    shared: Option<Arc<tokio::sync::Mutex<bool>>>,
) {
    let unread = async {
        match &shared {
            Some(_) => std::future::pending().await,
            None => sender.closed().await,
        }
    };
    tokio::pin!(unread);
    let mut last_build: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            change = changes.recv() => match change {
                Ok(record) if !selector.concerns(&record) => continue,
                // A lagging receiver missed changes it cannot name: rebuild.
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return,
            },
            _ = shutdown.wait_for(|stop| *stop) => return,
            () = &mut unread => return,
        }
        let next_build = last_build.map_or(tokio::time::Instant::now(), |at| at + MIN_SPACING);
        tokio::select! {
            () = tokio::time::sleep_until(next_build.max(tokio::time::Instant::now() + SETTLE)) => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
        // Everything queued so far is in the cache already (it is applied before it is
        // announced), so the rebuild covers it; what comes after is heard afresh.
        changes = changes.resubscribe();
        match &shared {
            // Readers subscribe and check the flag under the same lock: none can see a
            // document this skipped, or one half rebuilt.
            Some(stale) => {
                let mut stale = stale.lock().await;
                if sender.receiver_count() > 0 {
                    last_build = Some(tokio::time::Instant::now());
                    *stale = !rebuild(&cache, &tenant_attribute, &selector, &sender).await;
                } else {
                    *stale = true;
                }
            }
            None => {
                last_build = Some(tokio::time::Instant::now());
                rebuild(&cache, &tenant_attribute, &selector, &sender).await;
            }
        }
    }
}

/// Builds `selector`'s configuration off the async workers (many tenants make a large
/// document) and publishes it if it differs; `false` when it could not be built.
async fn rebuild(
    cache: &Arc<FlagCache>,
    tenant_attribute: &Arc<str>,
    selector: &Selector,
    sender: &watch::Sender<Arc<str>>,
) -> bool {
    let build = {
        let (cache, attribute, selector) =
            (cache.clone(), tenant_attribute.clone(), selector.clone());
        tokio::task::spawn_blocking(move || selector.document(&cache, &attribute))
    };
    let document = match build.await {
        Ok(document) => document,
        Err(error) => {
            tracing::error!(%error, "building the flagd sync configuration failed");
            return false;
        }
    };
    sender.send_if_modified(|current| {
        let changed = **current != *document;
        if changed {
            *current = Arc::from(document);
        }
        changed
    });
    true
}

/// Starts following `selector`'s configuration: the receiver holds it now, and the latest
/// one after every change.
fn follow(app: &SharedApp, selector: Selector) -> watch::Receiver<Arc<str>> {
    let cache = app.feeds.flags.clone();
    let attribute: Arc<str> = Arc::from(app.config.openfeature_tenant_attribute.as_str());
    // Subscribed before the first build, so no change after it goes unheard.
    let changes = cache.subscribe();
    let (sender, receiver) = watch::channel(Arc::from(selector.document(&cache, &attribute)));
    tokio::spawn(publish(
        cache,
        attribute,
        selector,
        changes,
        app.shutdown.clone(),
        sender,
        None,
    ));
    receiver
}

/// The all-tenants configuration, shared by every stream that wants it, and rebuilt after
/// changes only while one follows it: a sidecar whose sync listener nobody uses spends
/// nothing on it.
struct Shared {
    cache: Arc<FlagCache>,
    tenant_attribute: Arc<str>,
    sender: watch::Sender<Arc<str>>,
    /// Whether changes went unbuilt while nobody read; held while (re)building.
    stale: Arc<tokio::sync::Mutex<bool>>,
}

impl Shared {
    fn start(
        cache: Arc<FlagCache>,
        tenant_attribute: Arc<str>,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        let changes = cache.subscribe();
        // Built at first use, not at start: until then nobody needs it.
        let (sender, _) = watch::channel(Arc::from(""));
        let stale = Arc::new(tokio::sync::Mutex::new(true));
        tokio::spawn(publish(
            cache.clone(),
            tenant_attribute.clone(),
            Selector::All,
            changes,
            shutdown,
            sender.clone(),
            Some(stale.clone()),
        ));
        Self {
            cache,
            tenant_attribute,
            sender,
            stale,
        }
    }

    /// A reader of the current document (rebuilt first if changes went unbuilt while
    /// nobody read it), then of the latest after every change. The rebuild runs on a task of
    /// its own: a caller that gives up (a reset, a 1 ms deadline) cannot leave it unfinished
    /// and the document stale, making the next caller pay for another build.
    async fn follow(self: &Arc<Self>) -> Result<watch::Receiver<Arc<str>>, Error> {
        let shared = self.clone();
        let followed = tokio::spawn(async move {
            let mut stale = shared.stale.lock().await;
            let receiver = shared.sender.subscribe();
            if *stale {
                *stale = !rebuild(
                    &shared.cache,
                    &shared.tenant_attribute,
                    &Selector::All,
                    &shared.sender,
                )
                .await;
            }
            (!*stale).then_some(receiver)
        });
        match followed.await {
            Ok(Some(receiver)) => Ok(receiver),
            _ => Err(Error::Internal(
                "the flagd sync configuration could not be built".into(),
            )),
        }
    }
}

/// A `SyncFlags` stream: the current document, then the latest one whenever the reader is
/// ready for more, so a slow reader skips documents instead of queueing them. It holds
/// `slot` while it lives, and ends at shutdown with UNAVAILABLE rather than a clean end: the
/// providers reconnect after an error, and some (Node's) never after a stream that ended OK.
fn responses<S: Send + 'static>(
    documents: watch::Receiver<Arc<str>>,
    slot: S,
    shutdown: watch::Receiver<bool>,
    goodbye: Status,
) -> ResponseStream<SyncFlagsResponse> {
    let mut stopping = shutdown.clone();
    let stream = WatchStream::new(documents)
        .map(move |document| {
            let _slot = &slot;
            Ok(SyncFlagsResponse {
                flag_configuration: document.to_string(),
                sync_context: None,
            })
        })
        .take_until(async move {
            let _ = stopping.wait_for(|stop| *stop).await;
        });
    super::ending_in_goodbye(stream, shutdown, goodbye)
}

/// The sync service. Every all-tenants stream reads the one shared document.
#[derive(Clone)]
pub struct Sync {
    app: SharedApp,
    all: Arc<Shared>,
}

impl Sync {
    /// Starts keeping the all-tenants document current while anyone follows it.
    pub fn start(app: SharedApp) -> Self {
        let all = Arc::new(Shared::start(
            app.feeds.flags.clone(),
            Arc::from(app.config.openfeature_tenant_attribute.as_str()),
            app.shutdown.clone(),
        ));
        Self { app, all }
    }

    fn selector<T>(&self, request: &Request<T>, field: &str) -> Result<Selector, Status> {
        Selector::of(request, field).map_err(|e| status::of_error(&e, self.app.links()))
    }
}

#[tonic::async_trait]
impl FlagSyncService for Sync {
    type SyncFlagsStream = ResponseStream<SyncFlagsResponse>;

    /// The configuration at once, then the latest one after every change. Counted against
    /// `--max-streams`; ends at shutdown with UNAVAILABLE.
    async fn sync_flags(
        &self,
        request: Request<SyncFlagsRequest>,
    ) -> Result<Response<Self::SyncFlagsStream>, Status> {
        #[allow(deprecated)]
        let selector = self.selector(&request, &request.get_ref().selector)?;
        let slot = self
            .app
            .open_stream()
            .map_err(|e| status::of_error(&e, self.app.links()))?;
        let documents = match selector {
            Selector::All => self
                .all
                .follow()
                .await
                .map_err(|e| status::of_error(&e, self.app.links()))?,
            Selector::Tenant(_) => follow(&self.app, selector),
        };
        Ok(Response::new(responses(
            documents,
            slot,
            self.app.shutdown.clone(),
            status::of_error(&Error::ShuttingDown, self.app.links()),
        )))
    }

    async fn fetch_all_flags(
        &self,
        request: Request<FetchAllFlagsRequest>,
    ) -> Result<Response<FetchAllFlagsResponse>, Status> {
        #[allow(deprecated)]
        let selector = self.selector(&request, &request.get_ref().selector)?;
        let flag_configuration = match selector {
            Selector::All => self
                .all
                .follow()
                .await
                .map_err(|e| status::of_error(&e, self.app.links()))?
                .borrow()
                .to_string(),
            Selector::Tenant(tenant) => tenant_document(&self.app.feeds.flags, &tenant),
        };
        Ok(Response::new(FetchAllFlagsResponse { flag_configuration }))
    }

    /// Deprecated by flagd in favour of `SyncFlagsResponse.sync_context`; the providers that
    /// still call it take UNIMPLEMENTED as "no metadata". Answering with metadata would add
    /// it to every evaluation context.
    #[allow(deprecated)]
    async fn get_metadata(
        &self,
        _request: Request<GetMetadataRequest>,
    ) -> Result<Response<GetMetadataResponse>, Status> {
        Err(Status::unimplemented(
            "GetMetadata is deprecated by flagd; this sidecar sends no sync metadata",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flags::test_record as record;

    fn cache() -> FlagCache {
        let cache = FlagCache::new(BTreeMap::from([
            ("pro".to_owned(), FlagValue::Bool(false)),
            ("seats".to_owned(), FlagValue::Number(1.0)),
        ]));
        cache.apply(record("acme", "pro", FlagValue::Bool(true), 1));
        cache.apply(record("globex", "pro", FlagValue::Bool(true), 2));
        cache.apply(record("initech", "pro", FlagValue::Bool(false), 3));
        cache.apply(record("acme", "seats", FlagValue::Number(25.0), 4));
        cache.apply(record(
            "acme",
            "limits",
            FlagValue::Json(json!({"rps": 10})),
            5,
        ));
        cache
    }

    #[test]
    fn tenants_sharing_a_value_share_one_list() {
        let document: Json = serde_json::from_str(&document(&cache(), "tenant_id")).expect("JSON");
        let pro = &document["flags"]["pro"];
        assert_eq!(pro["defaultVariant"], "default");
        assert_eq!(
            pro["variants"],
            json!({"default": false, "tenant-1": false, "tenant-2": true})
        );
        let reference = json!({"$ref": "tenant"});
        assert_eq!(
            pro["targeting"],
            json!({"if": [
                {"in": [reference, ["initech"]]}, "tenant-1",
                {"in": [reference, ["acme", "globex"]]}, "tenant-2",
                null
            ]})
        );
        assert_eq!(
            document["$evaluators"]["tenant"],
            json!({"if": [{"var": "tenant_id"}, {"var": "tenant_id"}, {"var": "targetingKey"}]})
        );
        // Integers stay integers; objects stay objects.
        assert_eq!(
            document["flags"]["seats"]["variants"]["tenant-1"],
            json!(25)
        );
        assert_eq!(document["flags"]["seats"]["variants"]["default"], json!(1));
        let limits = &document["flags"]["limits"];
        assert_eq!(limits["variants"], json!({"tenant-1": {"rps": 10}}));
        assert!(limits.get("defaultVariant").is_none());
    }

    /// flagd's schema: one type per flag, and objects only among JSON values. A value that
    /// breaks it is left out (that tenant gets the default in-process), not the document.
    #[test]
    fn values_flagds_schema_cannot_hold_are_left_out() {
        let cache = cache();
        cache.apply(record(
            "globex",
            "seats",
            FlagValue::String("many".into()),
            6,
        ));
        cache.apply(record(
            "initech",
            "seats",
            FlagValue::Json(json!([1, 2])),
            7,
        ));
        cache.apply(record("globex", "limits", FlagValue::Json(json!(3)), 8));
        let document: Json = serde_json::from_str(&document(&cache, "tenant_id")).expect("JSON");
        assert_eq!(
            document["flags"]["seats"]["variants"],
            json!({"default": 1, "tenant-1": 25})
        );
        assert_eq!(
            document["flags"]["limits"]["variants"],
            json!({"tenant-1": {"rps": 10}})
        );
        let initech: Json =
            serde_json::from_str(&tenant_document(&cache, "initech")).expect("JSON");
        assert!(initech["flags"].get("seats").is_none(), "{initech}");
    }

    #[test]
    fn a_tenant_document_has_static_flags() {
        let document: Json =
            serde_json::from_str(&tenant_document(&cache(), "globex")).expect("JSON");
        assert_eq!(
            document,
            json!({"flags": {
                "pro": {"state": "ENABLED", "variants": {"tenant": true}, "defaultVariant": "tenant"},
                "seats": {"state": "ENABLED", "variants": {"default": 1}, "defaultVariant": "default"}
            }})
        );
    }

    #[test]
    fn selectors_are_empty_or_one_tenant() {
        assert!(matches!(Selector::parse(""), Ok(Selector::All)));
        assert!(matches!(Selector::parse("tenant=acme"), Ok(Selector::Tenant(t)) if t == "acme"));
        for bad in ["source=db", "tenant=", "tenant=a b", "flagSetId=x"] {
            assert!(
                matches!(Selector::parse(bad), Err(Error::InvalidArgument(_))),
                "{bad}"
            );
        }
    }

    /// A reader that falls behind gets the newest document next, not the ones it missed;
    /// at shutdown the stream ends with UNAVAILABLE and gives its slot back.
    #[tokio::test]
    async fn a_slow_reader_skips_to_the_latest_document() {
        let (sender, documents) = watch::channel(Arc::from("0"));
        let (stop, shutdown) = watch::channel(false);
        let slots = Arc::new(tokio::sync::Semaphore::new(1));
        let slot = slots.clone().try_acquire_owned().expect("a slot");
        let mut stream = responses(
            documents,
            slot,
            shutdown,
            Status::unavailable("shutting down"),
        );
        let first = stream.next().await.and_then(Result::ok);
        assert_eq!(first.map(|r| r.flag_configuration), Some("0".to_owned()));
        for n in 1..=1000 {
            sender.send_replace(Arc::from(n.to_string()));
        }
        let next = stream.next().await.and_then(Result::ok);
        assert_eq!(next.map(|r| r.flag_configuration), Some("1000".to_owned()));
        stop.send_replace(true);
        let end = stream.next().await;
        assert_eq!(
            end.and_then(Result::err).map(|s| s.code()),
            Some(tonic::Code::Unavailable)
        );
        assert!(stream.next().await.is_none());
        drop(stream);
        assert_eq!(slots.available_permits(), 1);
    }

    /// A tenant's stream hears a burst of its changes, and ends up at their final state.
    #[tokio::test]
    async fn a_burst_of_changes_reaches_a_tenants_stream() {
        let cache = Arc::new(cache());
        let (_stop, shutdown) = watch::channel(false);
        let selector = Selector::Tenant("acme".into());
        let changes = cache.subscribe();
        let (sender, mut receiver) =
            watch::channel(Arc::from(selector.document(&cache, "tenant_id")));
        receiver.borrow_and_update();
        tokio::spawn(publish(
            cache.clone(),
            Arc::from("tenant_id"),
            selector,
            changes,
            shutdown,
            sender,
            None,
        ));
        for (n, seats) in (11..).zip([2.0, 3.0, 4.0]) {
            cache.apply(record("acme", "seats", FlagValue::Number(seats), n));
        }
        tokio::time::timeout(Duration::from_secs(10), receiver.changed())
            .await
            .expect("a new document")
            .expect("publisher alive");
        let document: Json = serde_json::from_str(&receiver.borrow_and_update()).expect("JSON");
        assert_eq!(document["flags"]["seats"]["variants"]["tenant"], json!(4));
        assert!(Selector::Tenant("acme".into()).concerns(&record(
            "acme",
            "k",
            FlagValue::Bool(true),
            1
        )));
        assert!(!Selector::Tenant("acme".into()).concerns(&record(
            "globex",
            "k",
            FlagValue::Bool(true),
            1
        )));
    }

    /// Nobody following the all-tenants document: changes cost no rebuild, and the first
    /// follower still gets them all; while followed, every change is published.
    #[tokio::test]
    async fn the_shared_document_is_built_only_while_followed() {
        let cache = Arc::new(cache());
        let (_stop, shutdown) = watch::channel(false);
        let shared = Arc::new(Shared::start(
            cache.clone(),
            Arc::from("tenant_id"),
            shutdown,
        ));
        cache.apply(record("acme", "seats", FlagValue::Number(7.0), 20));
        tokio::time::sleep(MIN_SPACING * 4).await;
        assert_eq!(&**shared.sender.borrow(), "", "built with nobody following");

        // Readers arriving together all get the built document, never the placeholder.
        let readers: Vec<_> = (0..16)
            .map(|_| {
                let shared = shared.clone();
                tokio::spawn(
                    async move { shared.follow().await.expect("built").borrow().to_string() },
                )
            })
            .collect();
        for reader in readers {
            let document = reader.await.expect("a reader");
            assert!(!document.is_empty(), "a reader got the unbuilt placeholder");
        }

        // Unread again, a change goes unbuilt.
        cache.apply(record("acme", "seats", FlagValue::Number(9.0), 21));
        tokio::time::sleep(MIN_SPACING * 4).await;
        assert!(*shared.stale.lock().await);
        // A reader that gives up at once still has the document built, once: the next one
        // finds it current instead of paying for another build.
        // Polled once (the rebuild is handed to its task) and dropped, as a reset call is.
        let gave_up = futures_util::FutureExt::now_or_never(shared.follow());
        assert!(
            gave_up.is_none(),
            "the reader could not give up before the build"
        );
        tokio::time::timeout(Duration::from_secs(10), async {
            while !shared.sender.borrow().contains("9") {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("built although its reader left");
        assert!(!*shared.stale.lock().await);

        let mut follower = shared.follow().await.expect("built");
        let document: Json = serde_json::from_str(&follower.borrow_and_update()).expect("JSON");
        assert!(
            document["flags"]["seats"]["variants"]
                .as_object()
                .is_some_and(|variants| variants.values().any(|v| *v == json!(9)))
        );

        cache.apply(record("acme", "seats", FlagValue::Number(8.0), 22));
        tokio::time::timeout(Duration::from_secs(10), follower.changed())
            .await
            .expect("a new document while followed")
            .expect("publisher alive");
        let document: Json = serde_json::from_str(&follower.borrow_and_update()).expect("JSON");
        assert!(
            document["flags"]["seats"]["variants"]
                .as_object()
                .is_some_and(|variants| variants.values().any(|v| *v == json!(8)))
        );
    }
}
