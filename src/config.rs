//! The validated settings of `coresdk serve`. Building a [`Config`] only reads (secrets, PEM
//! files, rules, tenants): nothing is created or written, so a start that fails validation
//! leaves nothing behind. Directories and the checkpoint key are made by the server at start.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use crate::auth::token::{TokenSettings, TokenVerifier};
use crate::checkpoint::Checkpointer;
pub use crate::limits::ServerLimits;
use crate::ops::ParkingLimits;
use crate::problem::ProblemLinks;
use crate::reload::{Reload, Secret, WatchedFile, split_secrets};
use crate::rules::Rules;
pub use crate::settings::{DEFAULT_STORE, LogFormat, ServeArgs, SideListener};
use crate::store::StoreUrl;
use crate::stripe::SignatureVerifier;

pub const MOCK_WEBHOOK_SECRET: &str = "whsec_test_secret";
/// Tenants every mock-mode sidecar knows, as in the SecurePay walkthrough.
pub const MOCK_TENANTS: [(&str, &str); 3] = [
    ("cus_acme_001", "acme-corp"),
    ("cus_globex_001", "globex"),
    ("cus_initech_001", "initech"),
];

/// PEM material for the listener.
pub struct TlsFiles {
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
    pub client_ca: Option<Vec<u8>>,
}

pub use crate::auth::FailMode;

/// Where signed audit checkpoints go and which key signs them; the key is loaded, or created
/// when missing, by [`CheckpointFiles::open`] at server start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointFiles {
    pub file: PathBuf,
    pub key_file: PathBuf,
    /// The origin line; None: derived from the key ([`crate::checkpoint::default_origin`]).
    pub origin: Option<String>,
    /// Witness verifier keys.
    pub witnesses: Vec<crate::checkpoint::WitnessKey>,
}

impl CheckpointFiles {
    /// Creates the key's directory and loads the key (creating it mode 0600 when missing).
    pub fn open(&self) -> Result<Checkpointer, ConfigError> {
        const SETTING: &str = "CORESDK_AUDIT_SIGNING_KEY_FILE";
        if let Some(dir) = self.key_file.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| {
                config_error(
                    SETTING,
                    format!(
                        "cannot create {}: {e}; point it at a writable directory",
                        dir.display()
                    ),
                )
            })?;
        }
        let key = crate::checkpoint::load_or_create_key(&self.key_file).map_err(|e| {
            let fix = match e {
                crate::checkpoint::CheckpointError::BadKey(_) => {
                    "point it at the key file this sidecar created, or at a path where none exists yet (one is created there)"
                }
                crate::checkpoint::CheckpointError::Io { .. } => {
                    "point it at a file this user can read, in a directory it can write"
                }
            };
            config_error(SETTING, format!("{e}; {fix}"))
        })?;
        Ok(Checkpointer::new(
            self.file.clone(),
            key,
            self.origin.clone(),
            self.witnesses.clone(),
        ))
    }
}

/// A setting that cannot be used as given. `setting` is the environment variable's name (the
/// command line explains where the value came from); `message` says what is wrong and what to do.
#[derive(Debug, thiserror::Error)]
#[error("{setting}: {message}")]
pub struct ConfigError {
    pub setting: &'static str,
    pub message: String,
}

fn config_error(setting: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        setting,
        message: message.into(),
    }
}

pub mod operators;
pub use operators::Operators;

pub struct Config {
    pub listen: SocketAddr,
    /// Where the flagd evaluation service listens, if it does.
    pub flagd_listen: Option<SocketAddr>,
    pub flagd_sync_listen: Option<SocketAddr>,
    pub ofrep_listen: Option<SocketAddr>,
    /// Where metrics and probes are served; metrics are collected only when they are.
    pub ops_listen: Option<SocketAddr>,
    /// The side listeners whose address is their default, not one the operator chose.
    pub side_listens_by_default: Vec<SideListener>,
    /// The evaluation-context attribute naming the tenant (else the `targetingKey`).
    pub openfeature_tenant_attribute: String,
    /// How often an idle flagd `EventStream` says `keep_alive`.
    pub flagd_keep_alive: std::time::Duration,
    pub store: StoreUrl,
    pub tenants: BTreeMap<String, String>,
    /// The tenants file (and mock tenants) replace runtime mappings instead of only seeding.
    pub tenants_file_overrides: bool,
    pub rules: Arc<Rules>,
    pub mock: bool,
    pub verifier: SignatureVerifier,
    /// Who may call admin RPCs: `CORESDK_ADMIN_TOKEN` (the operator `admin`) and the tokens file.
    pub operators: Operators,
    pub webhook_max_body_bytes: usize,
    pub fail_mode: FailMode,
    pub log_format: LogFormat,
    pub shutdown_grace: std::time::Duration,
    /// How long after SIGTERM every RPC is still answered while health says NOT_SERVING.
    pub shutdown_delay: std::time::Duration,
    /// What every gRPC listener bounds: calls per connection, keepalive, unary time.
    pub limits: ServerLimits,
    pub api_token: Option<Secret<String>>,
    pub tokens: Arc<TokenVerifier>,
    pub problem_links: ProblemLinks,
    pub deny_audit_window: std::time::Duration,
    pub tls: Option<TlsFiles>,
    /// Where checkpoints go, when they are on (by default beside a SQLite store).
    pub checkpoint_files: Option<CheckpointFiles>,
    pub checkpoint_interval: std::time::Duration,
    pub postgres_ca_file: Option<PathBuf>,
    /// Streams served at once at most.
    pub max_streams: usize,
    /// How many events of customers with no tenant are kept until the customer is mapped.
    pub parking: ParkingLimits,
    /// How long dedup records are kept; `None`: forever.
    pub dedup_retention: Option<std::time::Duration>,
}

const READABLE: &str = "point it at a readable file";

fn read_file(setting: &'static str, path: &std::path::Path) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|e| {
        config_error(
            setting,
            format!("cannot read {}: {e}; {READABLE}", path.display()),
        )
    })
}

/// What is wrong with a bearer token (trimmed: a secret mounted from a file often ends in a
/// newline, and presented tokens are compared trimmed, so an untrimmed one could never match).
pub(crate) fn token_defect(token: &str) -> Option<&'static str> {
    if token.is_empty() {
        Some("is set but empty; unset it, or set a token of at least 16 characters")
    } else if token.len() < 16 {
        Some("must be at least 16 characters; generate one with `openssl rand -hex 16`")
    } else {
        None
    }
}

/// A token given directly or, re-read when it changes, by a file.
fn checked_token(
    setting: &'static str,
    file_setting: &'static str,
    token: Option<String>,
    file: Option<&std::path::Path>,
) -> Result<Option<Secret<String>>, ConfigError> {
    if let Some(path) = file {
        let watched = WatchedFile::load(file_setting, path, |path, bytes| {
            let token = crate::reload::utf8(path, bytes)?.trim();
            match token_defect(token) {
                Some(defect) => Err(format!("{}: the token {defect}", path.display())),
                None => Ok(token.to_owned()),
            }
        })
        .map_err(|e| config_error(file_setting, e))?;
        return Ok(Some(Secret::File(Arc::new(watched))));
    }
    let Some(token) = token else { return Ok(None) };
    let token = token.trim();
    if let Some(defect) = token_defect(token) {
        return Err(config_error(setting, defect));
    }
    Ok(Some(Secret::Fixed(Arc::new(token.to_owned()))))
}

/// The named operators' file, when given. At start and on each reload it is checked against
/// the admin and API tokens' values then: beside `CORESDK_ADMIN_TOKEN` it may not name `admin`
/// (that token's operator), and no operator may hold either token.
fn admin_tokens_file(
    path: Option<&std::path::Path>,
    beside: operators::Beside,
) -> Result<Option<Arc<WatchedFile<operators::OperatorSet>>>, ConfigError> {
    const SETTING: &str = "CORESDK_ADMIN_TOKENS_FILE";
    let Some(path) = path else { return Ok(None) };
    let file = WatchedFile::load(SETTING, path, operators::operators_parser(beside))
        .map_err(|e| config_error(SETTING, e))?;
    Ok(Some(Arc::new(file)))
}

/// The admin token may not be the API token: every app would be an admin.
fn check_admin_is_not_api(
    admin: &Option<Secret<String>>,
    api: &Option<Secret<String>>,
) -> Result<(), ConfigError> {
    if let (Some(admin), Some(api)) = (admin, api)
        && admin.with(|admin| api.with(|api| crate::auth::tokens_match(admin, api)))
    {
        return Err(config_error(
            "CORESDK_ADMIN_TOKEN",
            "is CORESDK_API_TOKEN's token, which would make every app an admin; give each its own",
        ));
    }
    Ok(())
}

fn checked_url(setting: &'static str, url: Option<String>) -> Result<Option<String>, ConfigError> {
    match url {
        Some(url) if !(url.starts_with("https://") || url.starts_with("http://")) => Err(
            config_error(setting, "must be an absolute http(s) URL, e.g. https://…"),
        ),
        other => Ok(other),
    }
}

impl Config {
    /// Whether a side listener's address is its default (so, when taken, it is skipped).
    pub fn listens_by_default(&self, listener: SideListener) -> bool {
        self.side_listens_by_default.contains(&listener)
    }

    pub fn listen_of(&self, listener: SideListener) -> Option<SocketAddr> {
        match listener {
            SideListener::Flagd => self.flagd_listen,
            SideListener::FlagdSync => self.flagd_sync_listen,
            SideListener::Ofrep => self.ofrep_listen,
            SideListener::Ops => self.ops_listen,
        }
    }

    /// The secret files to re-read when they change.
    pub fn watched(&self) -> Vec<std::sync::Weak<dyn Reload>> {
        let mut watched: Vec<std::sync::Weak<dyn Reload>> = Vec::new();
        if let Some(file) = self.verifier.secret_file() {
            let file: Arc<dyn Reload> = file.clone();
            watched.push(Arc::downgrade(&file));
        }
        watched.extend(self.operators.watched());
        watched.extend(self.api_token.iter().filter_map(Secret::watched));
        if self.tokens.has_key_files() {
            let tokens: Arc<dyn Reload> = self.tokens.clone();
            watched.push(Arc::downgrade(&tokens));
        }
        watched
    }

    pub fn from_args(mut args: ServeArgs) -> Result<Self, ConfigError> {
        let store = match (&args.store, args.mock) {
            (_, true) => StoreUrl::Memory,
            (url, false) => StoreUrl::parse(url.as_deref().unwrap_or(DEFAULT_STORE))
                .map_err(|e| config_error("CORESDK_STORE", e.to_string()))?,
        };
        if args.max_streams == 0 || args.max_streams > tokio::sync::Semaphore::MAX_PERMITS {
            return Err(config_error(
                "CORESDK_MAX_STREAMS",
                "must be a whole number of 1 or more (and not absurdly large)",
            ));
        }
        let parking = parking_limits(&args)?;
        let openfeature_tenant_attribute = args.openfeature_tenant_attribute.trim().to_owned();
        if openfeature_tenant_attribute.is_empty() {
            return Err(config_error(
                "CORESDK_OPENFEATURE_TENANT_ATTRIBUTE",
                "is empty; name the evaluation-context attribute holding the tenant id, e.g. tenant_id",
            ));
        }
        check_listeners_distinct(&args)?;
        let checkpoint_interval = interval(
            "CORESDK_AUDIT_CHECKPOINT_INTERVAL_S",
            args.audit_checkpoint_interval_s,
        )?;
        let flagd_keep_alive = interval("CORESDK_FLAGD_KEEP_ALIVE_S", args.flagd_keep_alive_s)?;
        let shutdown_delay = seconds_or_off(
            "CORESDK_SHUTDOWN_DELAY_S",
            args.shutdown_delay_s,
            MAX_SHUTDOWN_DELAY_S,
        )?
        .unwrap_or_default();
        let limits = server_limits(&args)?;
        // A PostgreSQL URL's own settings (pool_size, sslmode, port) are checked now, not when
        // the store opens, so a mistake is a setting error like any other.
        if let StoreUrl::Postgres(url) = &store {
            crate::store::postgres::Connector::new(url, args.postgres_ca_file.as_deref())
                .map_err(|e| config_error("CORESDK_STORE", e.to_string()))?;
        }

        let mut secrets: Vec<String> = args
            .webhook_secret
            .as_deref()
            .map(|s| split_secrets(s).collect())
            .unwrap_or_default();
        let secret_file = args
            .webhook_secret_file
            .as_deref()
            .map(|path| {
                WatchedFile::load("STRIPE_WEBHOOK_SECRET_FILE", path, webhook_secrets)
                    .map(Arc::new)
                    .map_err(|e| config_error("STRIPE_WEBHOOK_SECRET_FILE", e))
            })
            .transpose()?;
        if secrets.is_empty() && secret_file.is_none() && args.mock {
            secrets.push(MOCK_WEBHOOK_SECRET.to_owned());
        }

        if args.webhook_max_body_bytes == 0 || args.webhook_max_body_bytes > 64 * 1024 * 1024 {
            return Err(config_error(
                "CORESDK_WEBHOOK_MAX_BODY_BYTES",
                "must be between 1 and 67108864 (64 MiB)",
            ));
        }
        if !(args.problem_type_base.starts_with("https://")
            || args.problem_type_base.starts_with("http://")
            || args.problem_type_base.starts_with("urn:"))
        {
            return Err(config_error(
                "CORESDK_PROBLEM_TYPE_BASE",
                "must be an absolute URI; use one starting with https://, http:// or urn:",
            ));
        }
        let admin_token = checked_token(
            "CORESDK_ADMIN_TOKEN",
            "CORESDK_ADMIN_TOKEN_FILE",
            args.admin_token.take(),
            args.admin_token_file.as_deref(),
        )?;
        let api_token = checked_token(
            "CORESDK_API_TOKEN",
            "CORESDK_API_TOKEN_FILE",
            args.api_token.take(),
            args.api_token_file.as_deref(),
        )?;
        check_admin_is_not_api(&admin_token, &api_token)?;
        let operators = Operators {
            file: admin_tokens_file(
                args.admin_tokens_file.as_deref(),
                operators::Beside {
                    admin: admin_token.clone(),
                    api: api_token.clone(),
                },
            )?,
            admin: admin_token,
            api: api_token.clone(),
        };

        let tokens = token_verifier(&args)?;
        let problem_links = ProblemLinks {
            type_base: args.problem_type_base.clone(),
            billing_url: checked_url("CORESDK_BILLING_URL", args.billing_url.take())?,
            upgrade_url: checked_url("CORESDK_UPGRADE_URL", args.upgrade_url.take())?,
        };
        let tls = tls_files(&args)?;

        let rules = match &args.rules_file {
            Some(path) => Rules::from_file(path).map_err(|e| {
                let fix = match e {
                    crate::rules::RulesError::Read { .. } => READABLE,
                    _ => "fix the file; rules/default.toml documents the format",
                };
                config_error("CORESDK_RULES_FILE", format!("{e}; {fix}"))
            })?,
            None => Rules::built_in().map_err(|e| config_error("built-in rules", e.to_string()))?,
        };

        let checkpoint_files = checkpoint_files(&args, &store)?;

        let mut tenants = BTreeMap::new();
        if args.mock {
            for (customer, tenant) in MOCK_TENANTS {
                tenants.insert(customer.to_owned(), tenant.to_owned());
            }
        }
        if let Some(path) = &args.tenants_file {
            tenants.extend(load_tenants(path)?);
        }

        Ok(Self {
            listen: args.listen,
            flagd_listen: side_listen(&args, SideListener::Flagd),
            flagd_sync_listen: side_listen(&args, SideListener::FlagdSync),
            ofrep_listen: side_listen(&args, SideListener::Ofrep),
            ops_listen: side_listen(&args, SideListener::Ops),
            side_listens_by_default: SideListener::ALL
                .into_iter()
                .filter(|listener| chosen_listen(&args, *listener).is_none())
                .collect(),
            openfeature_tenant_attribute,
            flagd_keep_alive,
            store,
            tenants,
            tenants_file_overrides: args.tenants_file_overrides,
            rules: Arc::new(rules),
            mock: args.mock,
            verifier: {
                let verifier = SignatureVerifier::new(secrets, args.webhook_tolerance_s);
                match secret_file {
                    Some(file) => verifier.with_file(file),
                    None => verifier,
                }
            },
            operators,
            webhook_max_body_bytes: args.webhook_max_body_bytes,
            fail_mode: args.fail_mode,
            log_format: args.log_format,
            shutdown_grace: std::time::Duration::from_secs(args.shutdown_grace_s),
            shutdown_delay,
            limits,
            api_token,
            tokens: Arc::new(tokens),
            problem_links,
            deny_audit_window: std::time::Duration::from_secs(args.deny_audit_window_s),
            tls,
            checkpoint_files,
            checkpoint_interval,
            postgres_ca_file: args.postgres_ca_file,
            max_streams: args.max_streams,
            parking,
            dedup_retention: dedup_retention(&args.dedup_retention_days)?,
        })
    }
}

/// The `whsec_…` secrets of a secret file: one at least, for a file that holds none would
/// refuse every delivery.
fn webhook_secrets(path: &std::path::Path, bytes: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    let secrets: Vec<Vec<u8>> = split_secrets(crate::reload::utf8(path, bytes)?)
        .map(String::into_bytes)
        .collect();
    if secrets.is_empty() {
        return Err(format!(
            "{} holds no secret; put the whsec_… secret(s) in it, comma or newline separated",
            path.display()
        ));
    }
    Ok(secrets)
}

/// The most parked events a setting may ask for: each can be up to the webhook body limit,
/// so the bound keeps a typo from promising more room than any disk has.
const MAX_PARKED_EVENTS_LIMIT: u64 = 10_000_000;

/// The address the operator gave a side listener, if any (`Some(None)`: `off`).
fn chosen_listen(args: &ServeArgs, listener: SideListener) -> Option<Option<SocketAddr>> {
    match listener {
        SideListener::Flagd => args.flagd_listen,
        SideListener::FlagdSync => args.flagd_sync_listen,
        SideListener::Ofrep => args.ofrep_listen,
        SideListener::Ops => args.ops_listen,
    }
    .map(|chosen| chosen.0)
}

/// Where a side listener listens: the chosen address, else its default; `None` when off.
fn side_listen(args: &ServeArgs, listener: SideListener) -> Option<SocketAddr> {
    chosen_listen(args, listener).unwrap_or_else(|| listener.default_addr().parse().ok())
}

/// One fixed address cannot serve two protocols; ephemeral ports (`:0`) may repeat.
fn check_listeners_distinct(args: &ServeArgs) -> Result<(), ConfigError> {
    let mut taken = vec![("CORESDK_LISTEN", args.listen)];
    for listener in SideListener::ALL {
        let Some(addr) = side_listen(args, listener) else {
            continue;
        };
        if let Some((other, _)) = taken
            .iter()
            .find(|(_, used)| *used == addr && addr.port() != 0)
        {
            return Err(config_error(
                listener.setting(),
                format!("{addr} is also {other}; give each protocol its own port, or off"),
            ));
        }
        taken.push((listener.setting(), addr));
    }
    Ok(())
}

fn parking_limits(args: &ServeArgs) -> Result<ParkingLimits, ConfigError> {
    for (setting, value) in [
        ("CORESDK_MAX_PARKED_EVENTS", args.max_parked_events),
        (
            "CORESDK_MAX_PARKED_EVENTS_PER_CUSTOMER",
            args.max_parked_events_per_customer,
        ),
    ] {
        if value > MAX_PARKED_EVENTS_LIMIT {
            return Err(config_error(
                setting,
                format!("must be at most {MAX_PARKED_EVENTS_LIMIT} (0 keeps none)"),
            ));
        }
    }
    Ok(ParkingLimits {
        max_events: args.max_parked_events,
        max_per_customer: args.max_parked_events_per_customer,
    })
}

/// Ten years: beyond that "forever" (`off`) is what is meant, and the milliseconds stay small.
const MAX_RETENTION_DAYS: u64 = 3650;
/// Stripe retries a delivery for up to 3 days: a shorter window would apply a retry of an
/// event the sidecar committed (but whose answer the app lost) a second time.
const MIN_RETENTION_DAYS: u64 = 4;

fn dedup_retention(days: &str) -> Result<Option<std::time::Duration>, ConfigError> {
    let days = days.trim();
    if days.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    match days.parse::<u64>() {
        Ok(0) => Ok(None),
        Ok(days) if (MIN_RETENTION_DAYS..=MAX_RETENTION_DAYS).contains(&days) => {
            Ok(Some(std::time::Duration::from_secs(days * 86_400)))
        }
        _ => Err(config_error(
            "CORESDK_DEDUP_RETENTION_DAYS",
            format!(
                "must be a whole number of days from {MIN_RETENTION_DAYS} (Stripe retries a delivery for up to 3 days) to {MAX_RETENTION_DAYS} (default {}, longer than Stripe's 30-day event retention), or 0 or off to keep dedup records forever",
                crate::ops::DEFAULT_RETENTION_DAYS
            ),
        )),
    }
}

fn token_verifier(args: &ServeArgs) -> Result<TokenVerifier, ConfigError> {
    let jwt_secrets: Vec<Vec<u8>> = args
        .jwt_secret
        .as_deref()
        .map(|s| split_secrets(s).map(String::into_bytes).collect())
        .unwrap_or_default();
    if jwt_secrets
        .iter()
        .any(|s| s.len() < crate::auth::token::MIN_HMAC_SECRET_LEN)
    {
        return Err(config_error(
            "CORESDK_JWT_SECRET",
            crate::auth::token::SHORT_HMAC_SECRET,
        ));
    }
    TokenVerifier::new(TokenSettings {
        hmac_secrets: jwt_secrets,
        hmac_secret_file: args.jwt_secret_file.clone(),
        public_key_file: args.jwt_public_key_file.clone(),
        jwks_file: args.jwks_file.clone(),
        issuer: args.jwt_issuer.clone(),
        audience: args
            .jwt_audience
            .as_deref()
            .map(|a| split_secrets(a).collect())
            .unwrap_or_default(),
        tenant_claim: args.jwt_tenant_claim.clone(),
        leeway_s: args.jwt_leeway_s,
    })
    .map_err(|e| config_error(e.setting, e.message))
}

fn tls_files(args: &ServeArgs) -> Result<Option<TlsFiles>, ConfigError> {
    const BOTH: &str =
        "TLS needs both CORESDK_TLS_CERT_FILE and CORESDK_TLS_KEY_FILE; set both, or neither";
    match (&args.tls_cert_file, &args.tls_key_file) {
        (Some(cert), Some(key)) => Ok(Some(TlsFiles {
            cert: read_file("CORESDK_TLS_CERT_FILE", cert)?,
            key: read_file("CORESDK_TLS_KEY_FILE", key)?,
            client_ca: args
                .tls_client_ca_file
                .as_deref()
                .map(|p| read_file("CORESDK_TLS_CLIENT_CA_FILE", p))
                .transpose()?,
        })),
        (None, None) if args.tls_client_ca_file.is_some() => Err(config_error(
            "CORESDK_TLS_CLIENT_CA_FILE",
            "mutual TLS needs TLS: set CORESDK_TLS_CERT_FILE and CORESDK_TLS_KEY_FILE too",
        )),
        (None, None) => Ok(None),
        // Name the missing half: that is the setting to fix.
        (Some(_), None) => Err(config_error("CORESDK_TLS_KEY_FILE", BOTH)),
        (None, Some(_)) => Err(config_error("CORESDK_TLS_CERT_FILE", BOTH)),
    }
}

/// Checkpoints are on by default beside a SQLite store; elsewhere only when both paths are set.
/// Every checkpoint is an fsync of its own: far below 10 ms they would compete with the
/// store's commits for the disk. Keep-alive intervals share the same floor.
const MIN_INTERVAL: std::time::Duration = std::time::Duration::from_millis(10);

fn interval(setting: &'static str, seconds: f64) -> Result<std::time::Duration, ConfigError> {
    std::time::Duration::try_from_secs_f64(seconds)
        .ok()
        .filter(|interval| *interval >= MIN_INTERVAL)
        .ok_or_else(|| config_error(setting, "must be a number of seconds, at least 0.01"))
}

/// Kubernetes' own default grace period is 30 s; an hour is far past any sane drain, and the
/// bound keeps a typo from keeping a pod in Terminating for days.
const MAX_SHUTDOWN_DELAY_S: f64 = 3600.0;
/// Time-outs and keepalives longer than a day mean "never" in practice, and bounding them keeps
/// deadline arithmetic far from overflow.
const MAX_LIMIT_S: f64 = 86_400.0;

/// Seconds as a duration, `None` for 0 (off); otherwise at least [`MIN_INTERVAL`] and at most
/// `max`.
fn seconds_or_off(
    setting: &'static str,
    seconds: f64,
    max: f64,
) -> Result<Option<std::time::Duration>, ConfigError> {
    if seconds == 0.0 {
        return Ok(None);
    }
    std::time::Duration::try_from_secs_f64(seconds)
        .ok()
        .filter(|d| *d >= MIN_INTERVAL && seconds <= max)
        .map(Some)
        .ok_or_else(|| {
            config_error(
                setting,
                format!("must be 0 (off) or a number of seconds from 0.01 to {max}"),
            )
        })
}

fn server_limits(args: &ServeArgs) -> Result<ServerLimits, ConfigError> {
    const MAX_CONCURRENT: usize = 1_000_000;
    if args.max_concurrent_per_connection == 0
        || args.max_concurrent_per_connection > MAX_CONCURRENT
    {
        return Err(config_error(
            "CORESDK_MAX_CONCURRENT_PER_CONNECTION",
            format!("must be a whole number from 1 to {MAX_CONCURRENT}"),
        ));
    }
    let http2_keepalive_timeout = seconds_or_off(
        "CORESDK_HTTP2_KEEPALIVE_TIMEOUT_S",
        args.http2_keepalive_timeout_s,
        MAX_LIMIT_S,
    )?
    .ok_or_else(|| {
        config_error(
            "CORESDK_HTTP2_KEEPALIVE_TIMEOUT_S",
            "must be a number of seconds from 0.01; to turn pings off set CORESDK_HTTP2_KEEPALIVE_INTERVAL_S=0",
        )
    })?;
    Ok(ServerLimits {
        request_timeout: seconds_or_off(
            "CORESDK_REQUEST_TIMEOUT_S",
            args.request_timeout_s,
            MAX_LIMIT_S,
        )?,
        max_concurrent_per_connection: args.max_concurrent_per_connection,
        http2_keepalive_interval: seconds_or_off(
            "CORESDK_HTTP2_KEEPALIVE_INTERVAL_S",
            args.http2_keepalive_interval_s,
            MAX_LIMIT_S,
        )?,
        http2_keepalive_timeout,
    })
}

fn checkpoint_files(
    args: &ServeArgs,
    store: &StoreUrl,
) -> Result<Option<CheckpointFiles>, ConfigError> {
    let default_paths = match store {
        StoreUrl::Sqlite(db) => Some(crate::checkpoint::default_paths(db)),
        StoreUrl::Memory | StoreUrl::Postgres(_) => None,
    };
    let file = args
        .audit_checkpoint_file
        .clone()
        .or_else(|| default_paths.as_ref().map(|p| p.0.clone()));
    let key_file = args
        .audit_signing_key_file
        .clone()
        .or_else(|| default_paths.as_ref().map(|p| p.1.clone()));
    if let Some(origin) = &args.audit_origin
        && !crate::checkpoint::valid_origin(origin)
    {
        return Err(config_error(
            "CORESDK_AUDIT_ORIGIN",
            crate::checkpoint::ORIGIN_RULE,
        ));
    }
    let mut witnesses = Vec::new();
    for vkey in args
        .audit_witness_keys
        .iter()
        .map(|k| k.trim())
        .filter(|k| !k.is_empty())
    {
        witnesses.push(crate::checkpoint::WitnessKey::parse(vkey).map_err(|e| {
            config_error(
                "CORESDK_AUDIT_WITNESS_KEYS",
                format!("'{}' {e}", crate::problem::quoted(vkey)),
            )
        })?);
    }
    match (file, key_file) {
        (Some(file), Some(key_file)) => Ok(Some(CheckpointFiles {
            file,
            key_file,
            origin: args.audit_origin.clone(),
            witnesses,
        })),
        (Some(_), None) => Err(config_error(
            "CORESDK_AUDIT_SIGNING_KEY_FILE",
            "a checkpoint file needs a signing key file; set CORESDK_AUDIT_SIGNING_KEY_FILE too",
        )),
        _ if args.audit_origin.is_some() || !witnesses.is_empty() => Err(config_error(
            if args.audit_origin.is_some() {
                "CORESDK_AUDIT_ORIGIN"
            } else {
                "CORESDK_AUDIT_WITNESS_KEYS"
            },
            "names checkpoints, but none are kept; set CORESDK_AUDIT_CHECKPOINT_FILE and CORESDK_AUDIT_SIGNING_KEY_FILE too",
        )),
        _ => Ok(None),
    }
}

fn load_tenants(path: &std::path::Path) -> Result<BTreeMap<String, String>, ConfigError> {
    const SETTING: &str = "CORESDK_TENANTS_FILE";
    let text = String::from_utf8(read_file(SETTING, path)?)
        .map_err(|_| config_error(SETTING, format!("is not UTF-8 text; {READABLE}")))?;
    let tenants: BTreeMap<String, String> = serde_json::from_str(&text).map_err(|e| {
        config_error(
            SETTING,
            format!(
                "{} is not a JSON object of customer id to tenant id ({e}); write it like examples/tenants.json",
                path.display()
            ),
        )
    })?;
    for (customer, tenant) in &tenants {
        crate::ops::validate_id("customer id", customer)
            .and_then(|()| crate::ops::validate_id("tenant id", tenant))
            .map_err(|e| {
                config_error(SETTING, format!("entry '{customer}': {e}; fix that entry"))
            })?;
    }
    Ok(tenants)
}

#[cfg(test)]
mod tests;
