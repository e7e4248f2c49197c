//! Command line and environment, parsed once at start into one validated [`Config`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use clap::builder::BoolishValueParser;
use clap::{ArgAction, Args, Parser, Subcommand, ValueEnum};

use crate::auth::token::{TokenSettings, TokenVerifier};
use crate::checkpoint::Checkpointer;
use crate::problem::ProblemLinks;
use crate::rules::Rules;
use crate::store::StoreUrl;
use crate::stripe::SignatureVerifier;

pub const DEFAULT_STORE: &str = "sqlite://./coresdk-data/coresdk.db";
pub const MOCK_WEBHOOK_SECRET: &str = "whsec_test_secret";
/// Tenants every mock-mode sidecar knows, as in the SecurePay walkthrough.
pub const MOCK_TENANTS: [(&str, &str); 3] = [
    ("cus_acme_001", "acme-corp"),
    ("cus_globex_001", "globex"),
    ("cus_initech_001", "initech"),
];

#[derive(Debug, Parser)]
#[command(
    name = "coresdk",
    version,
    about = "CoreSDK sidecar: verified Stripe webhooks, per-tenant feature flags and a tamper-evident audit trail over gRPC",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// `coresdk` with no command serves, with these settings.
    #[command(flatten)]
    pub serve: ServeArgs,
}

// Parsed once at start; the size of the serve variant costs nothing worth boxing for.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the sidecar (the default command).
    Serve(ServeArgs),
    /// Offline audit trail tools.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Stripe developer tools.
    #[command(subcommand)]
    Stripe(StripeCommand),
    /// Ask a running sidecar's health service; exits 0 only when it is SERVING. For exec
    /// probes and container health checks, which cannot reach a loopback-only gRPC port.
    Health {
        #[arg(long, env = "CORESDK_LISTEN", default_value = "127.0.0.1:50051")]
        addr: String,
        /// A service name such as `coresdk.v1.WebhookService`; empty asks for the whole server.
        #[arg(long, default_value = "")]
        service: String,
        #[arg(long, default_value_t = 2)]
        timeout_s: u64,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Verify the hash chain of a store without a running sidecar; exits 1 when it does not verify.
    Verify {
        #[arg(long, env = "CORESDK_STORE", default_value = DEFAULT_STORE)]
        store: String,
        /// Defaults to `<db>.checkpoints`.
        #[arg(long, env = "CORESDK_AUDIT_CHECKPOINT_FILE")]
        checkpoint_file: Option<PathBuf>,
        /// Defaults to `<db>.audit-key`; without it only the chain itself is checked.
        #[arg(long, env = "CORESDK_AUDIT_SIGNING_KEY_FILE")]
        signing_key_file: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum StripeCommand {
    /// Sign a body read from standard input and print a `Stripe-Signature` header for it.
    Sign {
        #[arg(long, env = "STRIPE_WEBHOOK_SECRET", hide_env_values = true)]
        secret: String,
        /// Unix seconds; now by default.
        #[arg(long)]
        timestamp: Option<i64>,
    },
}

pub use crate::auth::FailMode;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to listen on (loopback by default: the sidecar serves its own pod).
    #[arg(long, env = "CORESDK_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// `sqlite://PATH` (durable, default) or `memory`.
    #[arg(long, env = "CORESDK_STORE")]
    pub store: Option<String>,
    /// JSON object of Stripe customer id → tenant id, loaded into the store at start.
    #[arg(long, env = "CORESDK_TENANTS_FILE")]
    pub tenants_file: Option<PathBuf>,
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
    /// A file holding secrets (comma or newline separated), e.g. a mounted Kubernetes secret.
    #[arg(long, env = "STRIPE_WEBHOOK_SECRET_FILE")]
    pub webhook_secret_file: Option<PathBuf>,
    /// Bearer token that admin RPCs require. Without it admin RPCs are refused (except in mock mode).
    #[arg(long, env = "CORESDK_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
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
    #[arg(long, env = "CORESDK_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// How long in-flight calls may take to finish after SIGTERM.
    #[arg(long, env = "CORESDK_SHUTDOWN_GRACE_S", default_value_t = 10)]
    pub shutdown_grace_s: u64,
    /// When set, every RPC but health needs `authorization: Bearer <token>` (this token or the
    /// admin token) or `x-coresdk-api-token: <token>`.
    #[arg(long, env = "CORESDK_API_TOKEN", hide_env_values = true)]
    pub api_token: Option<String>,
    /// HMAC secret(s) for HS256/384/512 tokens, comma-separated.
    #[arg(long, env = "CORESDK_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    #[arg(long, env = "CORESDK_JWT_SECRET_FILE")]
    pub jwt_secret_file: Option<PathBuf>,
    /// A PEM public key (RSA, EC P-256/P-384 or Ed25519) for RS*/ES*/EdDSA tokens.
    #[arg(long, env = "CORESDK_JWT_PUBLIC_KEY_FILE")]
    pub jwt_public_key_file: Option<PathBuf>,
    /// A JWK set; keys are picked by `kid`, and the file is re-read when it changes.
    #[arg(long, env = "CORESDK_JWKS_FILE")]
    pub jwks_file: Option<PathBuf>,
    #[arg(long, env = "CORESDK_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// Accepted audiences, comma-separated.
    #[arg(long, env = "CORESDK_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
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
    /// Identical denials within this window are audited once, with a count.
    #[arg(long, env = "CORESDK_DENY_AUDIT_WINDOW_S", default_value_t = 60)]
    pub deny_audit_window_s: u64,
    /// Serve TLS with this certificate chain (PEM); needs --tls-key.
    #[arg(long, env = "CORESDK_TLS_CERT_FILE")]
    pub tls_cert_file: Option<PathBuf>,
    #[arg(long, env = "CORESDK_TLS_KEY_FILE")]
    pub tls_key_file: Option<PathBuf>,
    /// CA certificate(s) (PEM) that sign the PostgreSQL server's certificate; needed with
    /// `sslmode=require`/`verify-full` in a postgres:// store URL.
    #[arg(long, env = "CORESDK_POSTGRES_CA_FILE")]
    pub postgres_ca_file: Option<PathBuf>,
    /// Signed audit checkpoints are appended here (default: beside a SQLite store, `<db>.checkpoints`).
    #[arg(long, env = "CORESDK_AUDIT_CHECKPOINT_FILE")]
    pub audit_checkpoint_file: Option<PathBuf>,
    /// Ed25519 seed (64 hex characters) signing the checkpoints; created when missing
    /// (default: `<db>.audit-key`). Mount it from a secret in production.
    #[arg(long, env = "CORESDK_AUDIT_SIGNING_KEY_FILE")]
    pub audit_signing_key_file: Option<PathBuf>,
    #[arg(
        long,
        env = "CORESDK_AUDIT_CHECKPOINT_INTERVAL_S",
        default_value_t = 10
    )]
    pub audit_checkpoint_interval_s: u64,
    /// Require client certificates signed by this CA (mutual TLS).
    #[arg(long, env = "CORESDK_TLS_CLIENT_CA_FILE")]
    pub tls_client_ca_file: Option<PathBuf>,
}

/// PEM material for the listener.
pub struct TlsFiles {
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
    pub client_ca: Option<Vec<u8>>,
}

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

pub struct Config {
    pub listen: SocketAddr,
    pub store: StoreUrl,
    pub tenants: BTreeMap<String, String>,
    pub rules: Arc<Rules>,
    pub mock: bool,
    pub verifier: SignatureVerifier,
    pub admin_token: Option<String>,
    pub webhook_max_body_bytes: usize,
    pub problem_type_base: String,
    pub fail_mode: FailMode,
    pub log_format: LogFormat,
    pub shutdown_grace: std::time::Duration,
    pub api_token: Option<String>,
    pub tokens: Arc<TokenVerifier>,
    pub tenant_claim: String,
    pub problem_links: ProblemLinks,
    pub deny_audit_window: std::time::Duration,
    pub tls: Option<TlsFiles>,
    pub checkpoints: Option<Arc<Checkpointer>>,
    pub checkpoint_interval: std::time::Duration,
    pub postgres_ca_file: Option<PathBuf>,
}

fn read_file(setting: &'static str, path: &std::path::Path) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path)
        .map_err(|e| config_error(setting, format!("cannot read {}: {e}", path.display())))
}

fn checked_token(
    setting: &'static str,
    token: Option<String>,
) -> Result<Option<String>, ConfigError> {
    match token {
        Some(token) if token.trim().is_empty() => Err(config_error(setting, "is set but empty")),
        Some(token) if token.len() < 16 => {
            Err(config_error(setting, "must be at least 16 characters"))
        }
        other => Ok(other),
    }
}

fn checked_url(setting: &'static str, url: Option<String>) -> Result<Option<String>, ConfigError> {
    match url {
        Some(url) if !(url.starts_with("https://") || url.starts_with("http://")) => {
            Err(config_error(setting, "must be an absolute http(s) URL"))
        }
        other => Ok(other),
    }
}

fn split_secrets(text: &str) -> impl Iterator<Item = String> + '_ {
    text.split([',', '\n'])
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

impl Config {
    pub fn from_args(args: ServeArgs) -> Result<Self, ConfigError> {
        let store = match (&args.store, args.mock) {
            (_, true) => StoreUrl::Memory,
            (Some(url), false) => StoreUrl::parse(url)
                .map_err(|e| config_error("CORESDK_STORE (--store)", e.to_string()))?,
            (None, false) => StoreUrl::parse(DEFAULT_STORE)
                .map_err(|e| config_error("CORESDK_STORE (--store)", e.to_string()))?,
        };

        let mut secrets: Vec<String> = args
            .webhook_secret
            .as_deref()
            .map(|s| split_secrets(s).collect())
            .unwrap_or_default();
        if let Some(path) = &args.webhook_secret_file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                config_error(
                    "STRIPE_WEBHOOK_SECRET_FILE",
                    format!("cannot read {}: {e}", path.display()),
                )
            })?;
            let before = secrets.len();
            secrets.extend(split_secrets(&text));
            if secrets.len() == before {
                return Err(config_error(
                    "STRIPE_WEBHOOK_SECRET_FILE",
                    format!("{} holds no secret", path.display()),
                ));
            }
        }
        if secrets.is_empty() && args.mock {
            secrets.push(MOCK_WEBHOOK_SECRET.to_owned());
        }

        if args.webhook_max_body_bytes == 0 || args.webhook_max_body_bytes > 64 * 1024 * 1024 {
            return Err(config_error(
                "CORESDK_WEBHOOK_MAX_BODY_BYTES",
                "must be between 1 and 67108864",
            ));
        }
        if !(args.problem_type_base.starts_with("https://")
            || args.problem_type_base.starts_with("http://")
            || args.problem_type_base.starts_with("urn:"))
        {
            return Err(config_error(
                "CORESDK_PROBLEM_TYPE_BASE",
                "must be an absolute URI (https://…)",
            ));
        }
        let admin_token = checked_token("CORESDK_ADMIN_TOKEN", args.admin_token)?;
        let api_token = checked_token("CORESDK_API_TOKEN", args.api_token)?;

        let mut jwt_secrets: Vec<Vec<u8>> = args
            .jwt_secret
            .as_deref()
            .map(|s| split_secrets(s).map(String::into_bytes).collect())
            .unwrap_or_default();
        if let Some(path) = &args.jwt_secret_file {
            let text = String::from_utf8(read_file("CORESDK_JWT_SECRET_FILE", path)?)
                .map_err(|_| config_error("CORESDK_JWT_SECRET_FILE", "is not UTF-8 text"))?;
            jwt_secrets.extend(split_secrets(&text).map(String::into_bytes));
        }
        if jwt_secrets.iter().any(|s| s.len() < 32) {
            return Err(config_error(
                "CORESDK_JWT_SECRET",
                "HMAC secrets must be at least 32 bytes (RFC 7518 §3.2)",
            ));
        }
        let public_key_pem = args
            .jwt_public_key_file
            .as_deref()
            .map(|p| read_file("CORESDK_JWT_PUBLIC_KEY_FILE", p))
            .transpose()?;
        let tokens = TokenVerifier::new(TokenSettings {
            hmac_secrets: jwt_secrets,
            public_key_pem,
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
        .map_err(|e| config_error(e.setting, e.message))?;
        let problem_links = ProblemLinks {
            type_base: args.problem_type_base.clone(),
            billing_url: checked_url("CORESDK_BILLING_URL", args.billing_url)?,
            upgrade_url: checked_url("CORESDK_UPGRADE_URL", args.upgrade_url)?,
        };
        let tls = match (&args.tls_cert_file, &args.tls_key_file) {
            (Some(cert), Some(key)) => Some(TlsFiles {
                cert: read_file("CORESDK_TLS_CERT_FILE", cert)?,
                key: read_file("CORESDK_TLS_KEY_FILE", key)?,
                client_ca: args
                    .tls_client_ca_file
                    .as_deref()
                    .map(|p| read_file("CORESDK_TLS_CLIENT_CA_FILE", p))
                    .transpose()?,
            }),
            (None, None) if args.tls_client_ca_file.is_some() => {
                return Err(config_error(
                    "CORESDK_TLS_CLIENT_CA_FILE",
                    "needs CORESDK_TLS_CERT_FILE and CORESDK_TLS_KEY_FILE",
                ));
            }
            (None, None) => None,
            _ => {
                return Err(config_error(
                    "CORESDK_TLS_CERT_FILE",
                    "TLS needs both CORESDK_TLS_CERT_FILE and CORESDK_TLS_KEY_FILE",
                ));
            }
        };

        let rules = match &args.rules_file {
            Some(path) => Rules::from_file(path)
                .map_err(|e| config_error("CORESDK_RULES_FILE (--rules-file)", e.to_string()))?,
            None => Rules::built_in().map_err(|e| config_error("built-in rules", e.to_string()))?,
        };

        let default_paths = match &store {
            StoreUrl::Sqlite(db) => Some(crate::checkpoint::default_paths(db)),
            StoreUrl::Memory | StoreUrl::Postgres(_) => None,
        };
        let checkpoint_file = args
            .audit_checkpoint_file
            .clone()
            .or_else(|| default_paths.as_ref().map(|p| p.0.clone()));
        let key_file = args
            .audit_signing_key_file
            .clone()
            .or_else(|| default_paths.as_ref().map(|p| p.1.clone()));
        let checkpoints = match (checkpoint_file, key_file) {
            (Some(file), Some(key_file)) => {
                if let Some(dir) = key_file.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir).map_err(|e| {
                        config_error(
                            "CORESDK_AUDIT_SIGNING_KEY_FILE",
                            format!("cannot create {}: {e}", dir.display()),
                        )
                    })?;
                }
                let key = crate::checkpoint::load_or_create_key(&key_file)
                    .map_err(|e| config_error("CORESDK_AUDIT_SIGNING_KEY_FILE", e.to_string()))?;
                Some(Arc::new(Checkpointer::new(file, key)))
            }
            (Some(_), None) => {
                return Err(config_error(
                    "CORESDK_AUDIT_SIGNING_KEY_FILE",
                    "a checkpoint file needs a signing key file",
                ));
            }
            _ => None,
        };

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
            store,
            tenants,
            rules: Arc::new(rules),
            mock: args.mock,
            verifier: SignatureVerifier::new(secrets, args.webhook_tolerance_s),
            admin_token,
            webhook_max_body_bytes: args.webhook_max_body_bytes,
            problem_type_base: args.problem_type_base,
            fail_mode: args.fail_mode,
            log_format: args.log_format,
            shutdown_grace: std::time::Duration::from_secs(args.shutdown_grace_s),
            api_token,
            tokens: Arc::new(tokens),
            tenant_claim: args.jwt_tenant_claim,
            problem_links,
            deny_audit_window: std::time::Duration::from_secs(args.deny_audit_window_s),
            tls,
            checkpoints,
            checkpoint_interval: std::time::Duration::from_secs(
                args.audit_checkpoint_interval_s.max(1),
            ),
            postgres_ca_file: args.postgres_ca_file,
        })
    }
}

fn load_tenants(path: &std::path::Path) -> Result<BTreeMap<String, String>, ConfigError> {
    const SETTING: &str = "CORESDK_TENANTS_FILE (--tenants-file)";
    let text = std::fs::read_to_string(path)
        .map_err(|e| config_error(SETTING, format!("cannot read {}: {e}", path.display())))?;
    let tenants: BTreeMap<String, String> = serde_json::from_str(&text).map_err(|e| {
        config_error(
            SETTING,
            format!(
                "{} is not a JSON object of customer id to tenant id: {e}",
                path.display()
            ),
        )
    })?;
    for (customer, tenant) in &tenants {
        crate::ops::validate_id("customer id", customer)
            .and_then(|()| crate::ops::validate_id("tenant id", tenant))
            .map_err(|e| config_error(SETTING, format!("entry '{customer}': {e}")))?;
    }
    Ok(tenants)
}
