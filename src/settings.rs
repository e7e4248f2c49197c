//! Every setting of `coresdk serve`: its flag, environment variable, default and help. The
//! command line (`cli`) parses these; `config` validates them into a `Config`.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::builder::BoolishValueParser;
use clap::{ArgAction, Args, ValueEnum};

use crate::auth::FailMode;

/// flagd's own default ports, so providers find the sidecar unconfigured.
pub const DEFAULT_FLAGD_LISTEN: &str = "127.0.0.1:8013";
pub const DEFAULT_FLAGD_SYNC_LISTEN: &str = "127.0.0.1:8015";
pub const DEFAULT_OFREP_LISTEN: &str = "127.0.0.1:8016";
/// The port OpenTelemetry's Prometheus exporters use by convention.
pub const DEFAULT_OPS_LISTEN: &str = "127.0.0.1:9464";

/// The listeners beside the main one: one for each protocol OpenFeature providers speak, and
/// the operations listener (metrics and probes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SideListener {
    Flagd,
    FlagdSync,
    Ofrep,
    Ops,
}

impl SideListener {
    /// In the order their `coresdk <name> listening on ADDR` lines follow the main one.
    pub const ALL: [Self; 4] = [Self::Flagd, Self::FlagdSync, Self::Ofrep, Self::Ops];

    /// Its name in the listening line and in messages.
    pub fn name(self) -> &'static str {
        match self {
            Self::Flagd => "flagd",
            Self::FlagdSync => "flagd-sync",
            Self::Ofrep => "ofrep",
            Self::Ops => "ops",
        }
    }

    pub fn flag(self) -> &'static str {
        match self {
            Self::Flagd => "--flagd-listen",
            Self::FlagdSync => "--flagd-sync-listen",
            Self::Ofrep => "--ofrep-listen",
            Self::Ops => "--ops-listen",
        }
    }

    pub fn setting(self) -> &'static str {
        match self {
            Self::Flagd => "CORESDK_FLAGD_LISTEN",
            Self::FlagdSync => "CORESDK_FLAGD_SYNC_LISTEN",
            Self::Ofrep => "CORESDK_OFREP_LISTEN",
            Self::Ops => "CORESDK_OPS_LISTEN",
        }
    }

    pub fn default_addr(self) -> &'static str {
        match self {
            Self::Flagd => DEFAULT_FLAGD_LISTEN,
            Self::FlagdSync => DEFAULT_FLAGD_SYNC_LISTEN,
            Self::Ofrep => DEFAULT_OFREP_LISTEN,
            Self::Ops => DEFAULT_OPS_LISTEN,
        }
    }

    /// What it serves, for the log.
    pub fn serves(self) -> &'static str {
        match self {
            Self::Flagd => "flagd evaluation (flagd.evaluation.v1, v2)",
            Self::FlagdSync => "flagd sync (flagd.sync.v1)",
            Self::Ofrep => "OFREP (HTTP/1.1 and h2c)",
            Self::Ops => "operations: /metrics, /livez, /readyz (plain HTTP, no API token)",
        }
    }
}

pub const DEFAULT_STORE: &str = "sqlite://./coresdk-data/coresdk.db";

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// A listener address, or `off` for a listener that is not wanted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionalListen(pub Option<SocketAddr>);

impl std::str::FromStr for OptionalListen {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.trim().eq_ignore_ascii_case("off") {
            return Ok(Self(None));
        }
        s.trim().parse().map(|addr| Self(Some(addr))).map_err(|_| {
            format!(
                "{s:?} is not an address; use an IP address and port, e.g. 127.0.0.1:9000, or off"
            )
        })
    }
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to listen on (loopback by default: the sidecar serves its own pod).
    #[arg(long, env = "CORESDK_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    // The OpenFeature listeners have no clap default: a default address that is taken is
    // tolerated (the sidecar serves without that protocol), a chosen one is not, so whether
    // the address was chosen must stay known.
    /// Address of the flagd evaluation service (`flagd.evaluation.v1` and `v2`) for
    /// OpenFeature's flagd providers in RPC mode, or `off` [default: 127.0.0.1:8013]
    #[arg(long, env = "CORESDK_FLAGD_LISTEN")]
    pub flagd_listen: Option<OptionalListen>,
    /// Address of the flagd sync service (`flagd.sync.v1`) for OpenFeature's flagd providers
    /// in in-process mode, or `off` [default: 127.0.0.1:8015]
    #[arg(long, env = "CORESDK_FLAGD_SYNC_LISTEN")]
    pub flagd_sync_listen: Option<OptionalListen>,
    /// Address of the OpenFeature Remote Evaluation Protocol (OFREP, HTTP) service, or `off`
    /// [default: 127.0.0.1:8016]
    #[arg(long, env = "CORESDK_OFREP_LISTEN")]
    pub ofrep_listen: Option<OptionalListen>,
    /// Address of the operations listener (Prometheus `/metrics`, `/livez`, `/readyz`; plain
    /// HTTP without the API token), or `off`, which also stops collecting metrics
    /// [default: 127.0.0.1:9464]
    #[arg(long, env = "CORESDK_OPS_LISTEN")]
    pub ops_listen: Option<OptionalListen>,
    /// The evaluation-context attribute naming the tenant; without it, the `targetingKey` does.
    #[arg(
        long,
        env = "CORESDK_OPENFEATURE_TENANT_ATTRIBUTE",
        default_value = "tenant_id"
    )]
    pub openfeature_tenant_attribute: String,
    /// Seconds between `keep_alive` events on an idle flagd `EventStream`; decimals allowed
    /// (at least 0.01).
    #[arg(long, env = "CORESDK_FLAGD_KEEP_ALIVE_S", default_value_t = 30.0)]
    pub flagd_keep_alive_s: f64,
    /// `sqlite://PATH` (durable, one sidecar), `postgres://USER:PASS@HOST/DB` (shared by
    /// replicas) or `memory`. Default: `sqlite://./coresdk-data/coresdk.db` (`memory` with --mock).
    #[arg(long, env = "CORESDK_STORE")]
    pub store: Option<String>,
    /// JSON object of Stripe customer id → tenant id; at start it maps the customers never
    /// mapped, leaving runtime changes (MapCustomer, UnmapCustomer, checkout) alone.
    #[arg(long, env = "CORESDK_TENANTS_FILE")]
    pub tenants_file: Option<PathBuf>,
    /// Let the --tenants-file win: at start it also maps customers mapped elsewhere or unmapped
    /// at runtime back to the tenant it names.
    #[arg(long, env = "CORESDK_TENANTS_FILE_OVERRIDES", action = ArgAction::Set, num_args = 0..=1,
          default_value = "false", default_missing_value = "true", value_parser = BoolishValueParser::new())]
    pub tenants_file_overrides: bool,
    /// TOML rules replacing the built-in ones (see rules/default.toml).
    #[arg(long, env = "CORESDK_RULES_FILE")]
    pub rules_file: Option<PathBuf>,
    /// Local development: memory store, seeded tenants, test secret.
    #[arg(long, env = "CORESDK_USE_MOCK", action = ArgAction::Set, num_args = 0..=1,
          default_value = "false", default_missing_value = "true", value_parser = BoolishValueParser::new())]
    pub mock: bool,
    /// Stripe endpoint secrets (`whsec_…`), comma-separated: all are accepted, for rotation.
    #[arg(long, env = "STRIPE_WEBHOOK_SECRET", hide_env_values = true)]
    pub webhook_secret: Option<String>,
    /// A file holding secrets (comma or newline separated), e.g. a mounted Kubernetes secret;
    /// re-read when it changes, so a rotation needs no restart.
    #[arg(long, env = "STRIPE_WEBHOOK_SECRET_FILE")]
    pub webhook_secret_file: Option<PathBuf>,
    /// Bearer token that admin RPCs require. Without it admin RPCs are refused (except in mock mode).
    #[arg(long, env = "CORESDK_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// A file holding the admin token (instead of --admin-token), re-read when it changes.
    #[arg(long, env = "CORESDK_ADMIN_TOKEN_FILE", conflicts_with = "admin_token")]
    pub admin_token_file: Option<PathBuf>,
    /// A file of named operators, one `name: token` line each (`#` comments allowed); the
    /// audit names the operator whose token made a change. Re-read when it changes.
    #[arg(long, env = "CORESDK_ADMIN_TOKENS_FILE")]
    pub admin_tokens_file: Option<PathBuf>,
    /// Accepted distance between a signature's timestamp and now, in both directions.
    #[arg(long, env = "CORESDK_WEBHOOK_TOLERANCE_S", default_value_t = 300)]
    pub webhook_tolerance_s: u64,
    /// Largest webhook body accepted.
    #[arg(long, env = "CORESDK_WEBHOOK_MAX_BODY_BYTES", default_value_t = 1024 * 1024)]
    pub webhook_max_body_bytes: usize,
    /// Base URI of RFC 9457 problem `type`s.
    #[arg(
        long,
        env = "CORESDK_PROBLEM_TYPE_BASE",
        default_value = "https://coresdk.dev/problems"
    )]
    pub problem_type_base: String,
    /// What clients and access decisions do when a dependency is down.
    #[arg(long, env = "CORESDK_FAIL_MODE", value_enum, default_value_t = FailMode::Open)]
    pub fail_mode: FailMode,
    /// Log lines as text or JSON, on standard error; the level is `CORESDK_LOG` or `RUST_LOG`.
    #[arg(long, env = "CORESDK_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// How long in-flight calls may take to finish after SIGTERM.
    #[arg(long, env = "CORESDK_SHUTDOWN_GRACE_S", default_value_t = 10)]
    pub shutdown_grace_s: u64,
    /// Seconds after SIGTERM/SIGINT during which every RPC is still answered while health says
    /// NOT_SERVING, so load balancers and the app stop sending first; then calls drain. A
    /// second signal ends it at once. Decimals allowed; 0 drains at once.
    #[arg(long, env = "CORESDK_SHUTDOWN_DELAY_S", default_value_t = 5.0)]
    pub shutdown_delay_s: f64,
    /// Seconds a unary call may run before it is answered DEADLINE_EXCEEDED (a caller's shorter
    /// deadline still wins); streams are never cut by it. 0.01 to 86400, decimals allowed; 0
    /// turns it off.
    #[arg(long, env = "CORESDK_REQUEST_TIMEOUT_S", default_value_t = 30.0)]
    pub request_timeout_s: f64,
    /// Calls one gRPC connection may have running at once (1 to 1000000); one more is refused
    /// at once (RESOURCE_EXHAUSTED, TOO_MANY_CALLS_ON_CONNECTION).
    #[arg(
        long,
        env = "CORESDK_MAX_CONCURRENT_PER_CONNECTION",
        default_value_t = 100
    )]
    pub max_concurrent_per_connection: usize,
    /// Seconds between HTTP/2 pings on each gRPC connection, so a dead peer is noticed and its
    /// streams freed. Decimals allowed; 0 turns pings off.
    #[arg(
        long,
        env = "CORESDK_HTTP2_KEEPALIVE_INTERVAL_S",
        default_value_t = 30.0
    )]
    pub http2_keepalive_interval_s: f64,
    /// Seconds a ping may go unanswered before the connection is closed. Decimals allowed.
    #[arg(
        long,
        env = "CORESDK_HTTP2_KEEPALIVE_TIMEOUT_S",
        default_value_t = 10.0
    )]
    pub http2_keepalive_timeout_s: f64,
    /// When set, every RPC but health needs `authorization: Bearer <token>` (this token or the
    /// admin token) or `x-coresdk-api-token: <token>`.
    #[arg(long, env = "CORESDK_API_TOKEN", hide_env_values = true)]
    pub api_token: Option<String>,
    /// A file holding the API token (instead of --api-token), re-read when it changes.
    #[arg(long, env = "CORESDK_API_TOKEN_FILE", conflicts_with = "api_token")]
    pub api_token_file: Option<PathBuf>,
    /// HMAC secret(s) for HS256/384/512 tokens, comma-separated.
    #[arg(long, env = "CORESDK_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// A file holding HMAC secrets (comma or newline separated), added to --jwt-secret;
    /// re-read when it changes.
    #[arg(long, env = "CORESDK_JWT_SECRET_FILE")]
    pub jwt_secret_file: Option<PathBuf>,
    /// A PEM public key (RSA, EC P-256/P-384 or Ed25519) for RS*/ES*/EdDSA tokens; re-read
    /// when it changes.
    #[arg(long, env = "CORESDK_JWT_PUBLIC_KEY_FILE")]
    pub jwt_public_key_file: Option<PathBuf>,
    /// A JWK set; keys are picked by `kid`, and the file is re-read when it changes.
    #[arg(long, env = "CORESDK_JWKS_FILE")]
    pub jwks_file: Option<PathBuf>,
    /// Required `iss` of tokens; any issuer is accepted when unset.
    #[arg(long, env = "CORESDK_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// Accepted audiences, comma-separated.
    #[arg(long, env = "CORESDK_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// The token claim naming the caller's tenant.
    #[arg(long, env = "CORESDK_JWT_TENANT_CLAIM", default_value = "tenant_id")]
    pub jwt_tenant_claim: String,
    /// Clock skew allowed on `exp` and `nbf`.
    #[arg(long, env = "CORESDK_JWT_LEEWAY_S", default_value_t = 60)]
    pub jwt_leeway_s: u64,
    /// Link put in 402 problems as `billing_url`.
    #[arg(long, env = "CORESDK_BILLING_URL")]
    pub billing_url: Option<String>,
    /// Link put in 403 feature-locked problems as `upgrade_url`.
    #[arg(long, env = "CORESDK_UPGRADE_URL")]
    pub upgrade_url: Option<String>,
    /// Identical denials (and refused webhooks, per reason) within this window are audited
    /// once, with a count.
    #[arg(long, env = "CORESDK_DENY_AUDIT_WINDOW_S", default_value_t = 60)]
    pub deny_audit_window_s: u64,
    /// Serve TLS with this certificate chain (PEM); needs --tls-key-file.
    #[arg(long, env = "CORESDK_TLS_CERT_FILE")]
    pub tls_cert_file: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert-file.
    #[arg(long, env = "CORESDK_TLS_KEY_FILE")]
    pub tls_key_file: Option<PathBuf>,
    /// CA certificate(s) (PEM) that sign the PostgreSQL server's certificate; needed with
    /// `sslmode=require`/`verify-full` in a postgres:// store URL.
    #[arg(long, env = "CORESDK_POSTGRES_CA_FILE")]
    pub postgres_ca_file: Option<PathBuf>,
    /// Signed audit checkpoints are appended here (default: beside a SQLite store, `<db>.checkpoints`).
    #[arg(long, env = "CORESDK_AUDIT_CHECKPOINT_FILE")]
    pub audit_checkpoint_file: Option<PathBuf>,
    /// Ed25519 seed (64 hex characters) signing the checkpoints; created at start when missing
    /// (default: `<db>.audit-key`). Mount it from a secret in production.
    #[arg(long, env = "CORESDK_AUDIT_SIGNING_KEY_FILE")]
    pub audit_signing_key_file: Option<PathBuf>,
    /// The checkpoints' origin line and signing key name (C2SP tlog-checkpoint): no spaces or
    /// '+', at most 255 bytes (default: `coresdk.audit/<first 8 hex digits of SHA-256 of the
    /// public key>`, the same for every replica sharing the key).
    #[arg(long, env = "CORESDK_AUDIT_ORIGIN")]
    pub audit_origin: Option<String>,
    /// Witnesses whose cosignatures `AddCosignatures` accepts: verifier keys
    /// (`<name>+<key id>+<base64 key>`, type 0x01 Ed25519 or 0x04 cosignature/v1), comma-separated.
    #[arg(
        long = "audit-witness-key",
        env = "CORESDK_AUDIT_WITNESS_KEYS",
        value_delimiter = ','
    )]
    pub audit_witness_keys: Vec<String>,
    /// Seconds between checkpoints of a chain head that moved; decimals allowed (at least 0.01).
    #[arg(
        long,
        env = "CORESDK_AUDIT_CHECKPOINT_INTERVAL_S",
        default_value_t = 10.0
    )]
    pub audit_checkpoint_interval_s: f64,
    /// Streams (`WatchFlags`, `Tail`) open at once at most; more are refused with
    /// RESOURCE_EXHAUSTED until one ends.
    #[arg(long, env = "CORESDK_MAX_STREAMS", default_value_t = 1024)]
    pub max_streams: usize,
    /// Verified events of customers with no tenant kept at most, to be applied when the
    /// customer is mapped (0: none are kept; Stripe's retries are then the only way back).
    #[arg(long, env = "CORESDK_MAX_PARKED_EVENTS", default_value_t = crate::ops::ParkingLimits::DEFAULT.max_events)]
    pub max_parked_events: u64,
    /// Of those, the most kept for one customer.
    #[arg(long, env = "CORESDK_MAX_PARKED_EVENTS_PER_CUSTOMER", default_value_t = crate::ops::ParkingLimits::DEFAULT.max_per_customer)]
    pub max_parked_events_per_customer: u64,
    /// Days a dedup record (a processed event id or an Append idempotency key) is kept; older
    /// ones are pruned in the background. `0` or `off` keeps them forever.
    #[arg(long, env = "CORESDK_DEDUP_RETENTION_DAYS", default_value_t = crate::ops::DEFAULT_RETENTION_DAYS.to_string())]
    pub dedup_retention_days: String,
    /// Require client certificates signed by this CA (mutual TLS).
    #[arg(long, env = "CORESDK_TLS_CLIENT_CA_FILE")]
    pub tls_client_ca_file: Option<PathBuf>,
}
