//! The command line: every flag with its environment fallback, and errors that say which setting
//! was wrong, where its value came from (flag, environment or default) and what to do instead.
//! Parsing here only reads: [`crate::config::Config`] validates, and the server creates files.

use std::any::TypeId;
use std::ffi::{OsStr, OsString};
use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Subcommand;
use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory as _, FromArgMatches as _, Parser};

use crate::config::ConfigError;
pub use crate::settings::{DEFAULT_STORE, ServeArgs};

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
    Health(HealthArgs),
    /// Ask a running sidecar about flags.
    #[command(subcommand)]
    Flags(FlagsCommand),
}

#[derive(Debug, Clone, clap::Args)]
pub struct HealthArgs {
    #[command(flatten)]
    pub sidecar: SidecarArgs,
    /// A service name such as `coresdk.v1.WebhookService`; empty asks for the whole server.
    #[arg(long, default_value = "")]
    pub service: String,
    /// Seconds to wait for the connection and for the answer, each.
    #[arg(long, default_value_t = 2)]
    pub timeout_s: u64,
}

/// The names `coresdk health` read its TLS settings from before `stripe replay` and `flags
/// explain` shared them as `CORESDK_SIDECAR_TLS_*`: probes deployed with them keep working. Each
/// alias is read only by `health`, and only when the new name is unset.
const HEALTH_TLS_ALIASES: [(&str, &str); 4] = [
    ("tls_ca_file", "CORESDK_HEALTH_TLS_CA_FILE"),
    ("tls_server_name", "CORESDK_HEALTH_TLS_SERVER_NAME"),
    (
        "tls_client_cert_file",
        "CORESDK_HEALTH_TLS_CLIENT_CERT_FILE",
    ),
    ("tls_client_key_file", "CORESDK_HEALTH_TLS_CLIENT_KEY_FILE"),
];

/// The command line as parsed in `env`: [`Cli`], with `health` reading each old TLS variable
/// (see [`HEALTH_TLS_ALIASES`]) in place of its new name when only the old one is set. clap reads
/// one variable per argument, so the alias takes the argument's place rather than a second read,
/// and every check (`requires`, the value parser) applies to it unchanged.
fn command_in(env: &dyn Fn(&str) -> Option<OsString>) -> clap::Command {
    Cli::command().mut_subcommand("health", |health| {
        health.mut_args(|arg| {
            let Some((_, alias)) = HEALTH_TLS_ALIASES
                .iter()
                .find(|(id, _)| arg.get_id() == *id)
            else {
                return arg;
            };
            let new_name_set = arg
                .get_env()
                .and_then(OsStr::to_str)
                .is_some_and(|name| env(name).is_some());
            if !new_name_set && env(alias).is_some() {
                arg.env(*alias)
            } else {
                arg
            }
        })
    })
}

/// Where a client command finds a running sidecar, and how it connects.
#[derive(Debug, Clone, clap::Args)]
pub struct SidecarArgs {
    /// Address of the sidecar to ask (the address it listens on).
    #[arg(long, env = "CORESDK_LISTEN", default_value = "127.0.0.1:50051")]
    pub addr: String,
    /// Connect with TLS, trusting the server certificate only if this CA (PEM) signed it; for a
    /// sidecar started with --tls-cert-file.
    #[arg(long, env = "CORESDK_SIDECAR_TLS_CA_FILE")]
    pub tls_ca_file: Option<PathBuf>,
    /// The name the server certificate must carry; by default the host of --addr.
    #[arg(
        long,
        env = "CORESDK_SIDECAR_TLS_SERVER_NAME",
        requires = "tls_ca_file"
    )]
    pub tls_server_name: Option<String>,
    /// Client certificate (PEM) for a sidecar that requires one (its --tls-client-ca-file);
    /// needs --tls-client-key-file.
    #[arg(
        long,
        env = "CORESDK_SIDECAR_TLS_CLIENT_CERT_FILE",
        requires_all = ["tls_client_key_file", "tls_ca_file"]
    )]
    pub tls_client_cert_file: Option<PathBuf>,
    /// The private key (PEM) of --tls-client-cert-file.
    #[arg(
        long,
        env = "CORESDK_SIDECAR_TLS_CLIENT_KEY_FILE",
        requires = "tls_client_cert_file"
    )]
    pub tls_client_key_file: Option<PathBuf>,
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
        /// Recompute every record, tree hash and checkpoint from the first record, instead of
        /// only what was added since the newest checkpoint.
        #[arg(long)]
        full: bool,
    },
    /// Print the verifier key of the audit checkpoints (`<origin>+<key id>+<base64 key>`), for
    /// C2SP signed-note tools and witnesses.
    PublicKey {
        /// The store whose key to read: for a SQLite store the key defaults to `<db>.audit-key`.
        #[arg(long, env = "CORESDK_STORE", default_value = DEFAULT_STORE)]
        store: String,
        /// The sidecar's signing key (its CORESDK_AUDIT_SIGNING_KEY_FILE); only its public half
        /// is printed. Defaults to `<db>.audit-key` for a SQLite store.
        #[arg(long, env = "CORESDK_AUDIT_SIGNING_KEY_FILE")]
        audit_signing_key_file: Option<PathBuf>,
        /// The sidecar's CORESDK_AUDIT_ORIGIN, when it sets one.
        #[arg(long, env = "CORESDK_AUDIT_ORIGIN")]
        audit_origin: Option<String>,
    },
    /// Write a self-contained proof that one record is in the log (C2SP tlog-proof carrying
    /// the record's bytes), against the newest signed checkpoint; `check-proof` verifies it.
    Prove(proof::ProveArgs),
    /// Verify a proof file from `prove` offline, with only the log's verifier key; exits 1
    /// when it does not verify.
    CheckProof(proof::CheckProofArgs),
}

#[derive(Debug, Subcommand)]
pub enum FlagsCommand {
    /// Print why a tenant's flag has its value: the event or admin change that set it, the
    /// rule that mapped the event, and the later events that were STALE for it.
    Explain(ExplainArgs),
}

#[derive(Debug, Clone, clap::Args)]
pub struct ExplainArgs {
    /// The tenant whose flag to explain.
    pub tenant: String,
    /// The flag's key, e.g. `pro_features`.
    pub key: String,
    #[command(flatten)]
    pub sidecar: SidecarArgs,
    /// The sidecar's API token (its CORESDK_API_TOKEN), when it has one; the admin token
    /// works too.
    #[arg(long, env = "CORESDK_API_TOKEN", hide_env_values = true)]
    pub api_token: Option<String>,
    /// Seconds to wait for the connection and for the answer, each.
    #[arg(long, default_value_t = 10)]
    pub timeout_s: u64,
    /// Print the answer as JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, clap::Args)]
pub struct ReplayArgs {
    /// The export: a List Events page (`{"object": "list", "data": [...]}`), one event per
    /// line, or one event; `-` reads standard input.
    pub file: PathBuf,
    /// Why you replay (recorded in every event's audit record), e.g. "outage 2024-05-01".
    #[arg(long)]
    pub reason: String,
    #[command(flatten)]
    pub sidecar: SidecarArgs,
    /// The sidecar's admin token (its CORESDK_ADMIN_TOKEN).
    #[arg(long, env = "CORESDK_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Seconds to wait for the connection, and for each event's answer.
    #[arg(long, default_value_t = 10)]
    pub timeout_s: u64,
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
    /// Feed exported events (Stripe's List Events, or `stripe events list`) to a running
    /// sidecar through its webhook path without signatures, oldest first: recovery from an
    /// outage longer than Stripe's retry window. Needs the admin token. Exits 0 when every
    /// event was acknowledged (applied, duplicate, stale or ignored), 1 when the sidecar
    /// refused or could not apply some, 2 when nothing was sent (unreadable or malformed file,
    /// bad settings).
    Replay(ReplayArgs),
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
        let matches = match command_in(&|name| std::env::var_os(name)).try_get_matches_from(&args) {
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
    // A URL's password must not reach a log, even in a URL that is wrong otherwise.
    match value.map(crate::store::redact_password) {
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
            // A range check already says which values are allowed.
            if why.contains(" is not in ") {
                why
            } else {
                format!("{why}; {}", expected(arg))
            }
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

pub mod proof;
pub mod remote;

#[cfg(test)]
mod tests;
