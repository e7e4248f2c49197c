//! Command line and environment, parsed once at start into one validated [`Config`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use clap::builder::BoolishValueParser;
use clap::{ArgAction, Args, Parser, Subcommand, ValueEnum};

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

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FailMode {
    Open,
    Closed,
}

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
        let admin_token = match args.admin_token {
            Some(token) if token.trim().is_empty() => {
                return Err(config_error("CORESDK_ADMIN_TOKEN", "is set but empty"));
            }
            Some(token) if token.len() < 16 => {
                return Err(config_error(
                    "CORESDK_ADMIN_TOKEN",
                    "must be at least 16 characters",
                ));
            }
            other => other,
        };

        let rules = match &args.rules_file {
            Some(path) => Rules::from_file(path)
                .map_err(|e| config_error("CORESDK_RULES_FILE (--rules-file)", e.to_string()))?,
            None => Rules::built_in().map_err(|e| config_error("built-in rules", e.to_string()))?,
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
