//! The command line: every flag with its environment fallback, and errors that say which setting
//! was wrong, where its value came from (flag, environment or default) and what to do instead.
//! Parsing here only reads: [`crate::config::Config`] validates, and the server creates files.

use std::any::TypeId;
use std::ffi::{OsStr, OsString};
use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Subcommand;
use clap::builder::BoolishValueParser;
use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::parser::ValueSource;
use clap::{ArgAction, ArgMatches, Args, CommandFactory as _, FromArgMatches as _, Parser};

use crate::config::{ConfigError, DEFAULT_STORE, FailMode, LogFormat};

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
        /// Address of the sidecar to ask (the address it listens on).
        #[arg(long, env = "CORESDK_LISTEN", default_value = "127.0.0.1:50051")]
        addr: String,
        /// A service name such as `coresdk.v1.WebhookService`; empty asks for the whole server.
        #[arg(long, default_value = "")]
        service: String,
        /// Seconds to wait for the connection and for the answer, each.
        #[arg(long, default_value_t = 2)]
        timeout_s: u64,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Verify the hash chain of a store without a running sidecar; exits 1 when it does not verify.
    Verify {
        /// The SQLite store to verify, `sqlite://PATH`.
        #[arg(long, env = "CORESDK_STORE", default_value = DEFAULT_STORE)]
        store: String,
        /// Signed checkpoints to check the chain against. Defaults to `<db>.checkpoints`.
        #[arg(long, env = "CORESDK_AUDIT_CHECKPOINT_FILE")]
        checkpoint_file: Option<PathBuf>,
        /// Defaults to `<db>.audit-key`; without it only the chain itself is checked.
        #[arg(long, env = "CORESDK_AUDIT_SIGNING_KEY_FILE")]
        signing_key_file: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum StripeCommand {
    /// Sign a body read from standard input and print a `Stripe-Signature` header for it:
    /// `printf '%s' "$BODY" | coresdk stripe sign --secret whsec_…`.
    Sign {
        /// The endpoint secret (`whsec_…`) to sign with.
        #[arg(long, env = "STRIPE_WEBHOOK_SECRET", hide_env_values = true)]
        secret: String,
        /// Unix seconds; now by default.
        #[arg(long)]
        timestamp: Option<i64>,
    },
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to listen on (loopback by default: the sidecar serves its own pod).
    #[arg(long, env = "CORESDK_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// `sqlite://PATH` (durable, one sidecar), `postgres://USER:PASS@HOST/DB` (shared by
    /// replicas) or `memory`. Default: `sqlite://./coresdk-data/coresdk.db` (`memory` with --mock).
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
    /// Log lines as text or JSON, on standard error; the level is `CORESDK_LOG` or `RUST_LOG`.
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
    /// A file holding HMAC secrets (comma or newline separated), added to --jwt-secret.
    #[arg(long, env = "CORESDK_JWT_SECRET_FILE")]
    pub jwt_secret_file: Option<PathBuf>,
    /// A PEM public key (RSA, EC P-256/P-384 or Ed25519) for RS*/ES*/EdDSA tokens.
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
    /// Identical denials within this window are audited once, with a count.
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
    /// Seconds between checkpoints of a chain head that moved (at least 1).
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

/// A parsed command line, with the matches that remember where each value came from.
pub struct Invocation {
    pub cli: Cli,
    matches: ArgMatches,
}

impl Invocation {
    /// Parses `args` (program name first) and the environment. A bad value comes back as one
    /// line naming the setting, its source and the fix; `--help`, `--version` and errors clap
    /// explains best itself (an unknown flag, say) come back as clap's error.
    pub fn parse_from(args: Vec<OsString>) -> Result<Self, ParseError> {
        let matches = match Cli::command().try_get_matches_from(&args) {
            Ok(matches) => matches,
            Err(e) => {
                return Err(
                    match explain_clap_error(&e, &args, &|name| std::env::var_os(name)) {
                        Some(line) => ParseError::Setting(line),
                        None => ParseError::Clap(e),
                    },
                );
            }
        };
        let cli = Cli::from_arg_matches(&matches).map_err(ParseError::Clap)?;
        Ok(Self { cli, matches })
    }

    /// The one line for a configuration error: the setting, where its value came from, the
    /// value unless it is a secret, and the message (which says what to do).
    pub fn explain(&self, error: &ConfigError) -> String {
        // Serve's settings are the same arguments whether given to `coresdk` or `coresdk serve`.
        let matches = self
            .matches
            .subcommand_matches("serve")
            .unwrap_or(&self.matches);
        let command = Cli::command();
        let arg = command
            .get_arguments()
            .find(|a| a.get_env() == Some(OsStr::new(error.setting)));
        let Some(arg) = arg else {
            return format!("{}: {}", error.setting, error.message);
        };
        let id = arg.get_id().as_str();
        let value = matches
            .get_raw(id)
            .and_then(|mut values| values.next())
            .map(|v| v.to_string_lossy().into_owned());
        let origin = match matches.value_source(id) {
            Some(ValueSource::CommandLine) => Origin::Flag(long_flag(arg)),
            Some(ValueSource::EnvVariable) => Origin::Environment,
            Some(ValueSource::DefaultValue) => Origin::Default,
            _ => Origin::Unset,
        };
        let value = if arg.is_hide_env_values_set() {
            None
        } else {
            value
        };
        line(error.setting, &origin, value.as_deref(), &error.message)
    }
}

pub enum ParseError {
    /// A bad value, explained in one line: exit 2.
    Setting(String),
    /// Help, version, or an error clap formats itself (`exit()` prints it with its exit code).
    Clap(clap::Error),
}

enum Origin {
    Flag(String),
    Environment,
    Default,
    Unset,
}

fn long_flag(arg: &clap::Arg) -> String {
    arg.get_long()
        .map(|long| format!("--{long}"))
        .unwrap_or_else(|| arg.get_id().to_string())
}

fn line(setting: &str, origin: &Origin, value: Option<&str>, message: &str) -> String {
    let origin = match origin {
        Origin::Flag(flag) => format!("from {flag} on the command line"),
        Origin::Environment => "from the environment".to_owned(),
        Origin::Default => "the default".to_owned(),
        Origin::Unset => "not set".to_owned(),
    };
    match value {
        Some(value) => format!("{setting} ({origin}) = {value:?}: {message}"),
        None => format!("{setting} ({origin}): {message}"),
    }
}

/// Explains a bad value clap refused, naming the environment variable when the value came
/// from there (clap itself only ever names the flag). `None` for every other kind of error.
fn explain_clap_error(
    error: &clap::Error,
    argv: &[OsString],
    env: &dyn Fn(&str) -> Option<OsString>,
) -> Option<String> {
    if !matches!(
        error.kind(),
        ErrorKind::InvalidValue | ErrorKind::ValueValidation
    ) {
        return None;
    }
    let Some(ContextValue::String(shown)) = error.get(ContextKind::InvalidArg) else {
        return None;
    };
    let mut command = Cli::command();
    command.build();
    let arg = find_arg(&command, shown)?;
    let flag = long_flag(arg);
    let on_command_line = argv.iter().skip(1).any(|a| {
        let a = a.to_string_lossy();
        a == flag || a.starts_with(&format!("{flag}="))
    });
    let env_name = arg.get_env().map(|e| e.to_string_lossy().into_owned());
    let (setting, origin) = match &env_name {
        Some(name) if !on_command_line && env(name).is_some() => {
            (name.clone(), Origin::Environment)
        }
        Some(name) => (name.clone(), Origin::Flag(flag)),
        None => (flag.clone(), Origin::Flag(flag)),
    };
    let value = match error.get(ContextKind::InvalidValue) {
        Some(ContextValue::String(v)) if !arg.is_hide_env_values_set() => Some(v.as_str()),
        _ => None,
    };
    let message = match error.get(ContextKind::ValidValue) {
        Some(ContextValue::Strings(valid)) if !valid.is_empty() => {
            format!("invalid value; use {}", valid.join(" or "))
        }
        _ => {
            let why = std::error::Error::source(error)
                .map(|e| e.to_string())
                .unwrap_or_else(|| "invalid value".to_owned());
            format!("{why}; {}", expected(arg))
        }
    };
    Some(line(&setting, &origin, value, &message))
}

/// The argument clap shows as `shown` (e.g. `--fail-mode <FAIL_MODE>`), in any subcommand.
fn find_arg<'a>(command: &'a clap::Command, shown: &str) -> Option<&'a clap::Arg> {
    command
        .get_arguments()
        .find(|a| a.to_string() == shown)
        .or_else(|| {
            command
                .get_subcommands()
                .find_map(|sub| find_arg(sub, shown))
        })
}

/// What a value of this argument's type looks like, for the fix half of an error.
fn expected(arg: &clap::Arg) -> String {
    let parser = arg.get_value_parser();
    let kind = parser.type_id();
    if kind == TypeId::of::<u64>() || kind == TypeId::of::<usize>() {
        "use a whole number of 0 or more".to_owned()
    } else if kind == TypeId::of::<i64>() {
        "use a whole number".to_owned()
    } else if kind == TypeId::of::<SocketAddr>() {
        "use an IP address and port, e.g. 127.0.0.1:50051".to_owned()
    } else if kind == TypeId::of::<bool>() {
        "use true or false".to_owned()
    } else {
        format!("see `coresdk help` for {}", long_flag(arg))
    }
}

#[cfg(test)]
mod tests;
