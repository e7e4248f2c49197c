#![forbid(unsafe_code)]

use std::io::{IsTerminal as _, Read as _};
use std::process::ExitCode;

use coresdk::cli::{
    AuditCommand, Command, FlagsCommand, HealthArgs, Invocation, ParseError, ServeArgs,
    StripeCommand, remote,
};
use coresdk::config::{Config, LogFormat};
use coresdk::server::ServeError;
use coresdk::store::sqlite::{StoreTxOwner as _, open_read_only};
use coresdk::telemetry::Tracing;

/// Exit status of a setting that cannot be used: the start never began.
const CONFIGURATION_ERROR: u8 = 2;

fn main() -> ExitCode {
    let mut invocation = match Invocation::parse_from(std::env::args_os().collect()) {
        Ok(invocation) => invocation,
        Err(ParseError::Setting(line)) => {
            eprintln!("coresdk: {line}");
            return ExitCode::from(CONFIGURATION_ERROR);
        }
        // Help and version print and exit 0; anything else clap explains itself and exits 2.
        Err(ParseError::Clap(e)) => e.exit(),
    };
    match invocation.cli.command.take() {
        None => {
            let args = invocation.cli.serve.clone();
            serve(&invocation, args)
        }
        Some(Command::Serve(args)) => serve(&invocation, args),
        Some(Command::Audit(AuditCommand::Verify {
            store,
            checkpoint_file,
            signing_key_file,
            full,
        })) => audit_verify(&store, checkpoint_file, signing_key_file, full),
        Some(Command::Audit(AuditCommand::PublicKey {
            store,
            audit_signing_key_file,
            audit_origin,
        })) => audit_public_key(&store, audit_signing_key_file, audit_origin),
        Some(Command::Audit(AuditCommand::Prove(args))) => coresdk::cli::proof::prove(&args),
        Some(Command::Audit(AuditCommand::CheckProof(args))) => {
            coresdk::cli::proof::check_proof(&args)
        }
        Some(Command::Stripe(StripeCommand::Sign { secret, timestamp })) => {
            stripe_sign(&secret, timestamp)
        }
        Some(Command::Stripe(StripeCommand::Replay(args))) => remote::replay(args),
        Some(Command::Health(args)) => health(args),
        Some(Command::Flags(FlagsCommand::Explain(args))) => remote::explain(args),
    }
}

fn health(args: HealthArgs) -> ExitCode {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    let tls = match remote::tls(&args.sidecar) {
        Ok(tls) => tls,
        Err(line) => {
            eprintln!("coresdk: {line}");
            return ExitCode::from(CONFIGURATION_ERROR);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("coresdk: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let HealthArgs {
        sidecar,
        service,
        timeout_s,
    } = args;
    let addr = sidecar.addr;
    let hint = remote::tls_hint(tls.as_ref());
    let timeout = std::time::Duration::from_secs(timeout_s.max(1));
    let answer = runtime.block_on(async {
        let channel = remote::connect(&addr, tls, timeout).await?;
        HealthClient::new(channel)
            .check(HealthCheckRequest { service })
            .await
            .map(|r| r.into_inner().status())
            .map_err(|e| format!("{}: {}{hint}", e.code(), e.message()))
    });
    match answer {
        Ok(ServingStatus::Serving) => {
            println!("SERVING");
            ExitCode::SUCCESS
        }
        Ok(status) => {
            println!("{}", status.as_str_name());
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("coresdk: health check of {addr} failed: {e}");
            ExitCode::FAILURE
        }
    }
}

fn serve(invocation: &Invocation, args: ServeArgs) -> ExitCode {
    let config = match Config::from_args(args) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("coresdk: {}", invocation.explain(&e));
            return ExitCode::from(CONFIGURATION_ERROR);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("coresdk: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The exporter's connection to the collector lives on the runtime's tasks.
    let tracing = match runtime.block_on(async { Tracing::from_env() }) {
        Ok(tracing) => tracing,
        Err(e) => {
            eprintln!("coresdk: {e}");
            return ExitCode::from(CONFIGURATION_ERROR);
        }
    };
    coresdk::telemetry::init_logging(config.log_format == LogFormat::Json, tracing.as_ref());
    let served = runtime.block_on(coresdk::server::serve(config));
    // After the drain, while the runtime still runs the exporter's tasks; bounded.
    if let Some(tracing) = tracing {
        tracing.shutdown();
    }
    match served {
        Ok(()) => ExitCode::SUCCESS,
        // A setting's error: one line, like every other configuration error.
        Err(ServeError::Checkpoints(e)) => {
            eprintln!(
                "coresdk: cannot prepare the audit checkpoints: {}",
                invocation.explain(&e)
            );
            ExitCode::from(CONFIGURATION_ERROR)
        }
        Err(e) => {
            tracing::error!(error = %e, "stopped");
            eprintln!("coresdk: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Prints the checkpoints' verifier key, read from the key file the server uses (never
/// created here).
fn audit_public_key(
    store: &str,
    key_file: Option<std::path::PathBuf>,
    origin: Option<String>,
) -> ExitCode {
    use coresdk::checkpoint::NotOffline;
    let key_file = match (
        key_file,
        coresdk::checkpoint::offline_files(store, None, None),
    ) {
        (Some(file), _) => file,
        (None, Ok(files)) => files.key,
        (None, Err(NotOffline::Memory | NotOffline::Postgres)) => {
            eprintln!(
                "coresdk: CORESDK_AUDIT_SIGNING_KEY_FILE (--audit-signing-key-file): only a SQLite store has a default key file; name the sidecar's"
            );
            return ExitCode::from(CONFIGURATION_ERROR);
        }
        (None, Err(NotOffline::Bad(e))) => {
            eprintln!("coresdk: CORESDK_STORE (--store): {e}");
            return ExitCode::from(CONFIGURATION_ERROR);
        }
    };
    if let Some(origin) = &origin
        && !coresdk::checkpoint::valid_origin(origin)
    {
        eprintln!(
            "coresdk: CORESDK_AUDIT_ORIGIN (--audit-origin): {}",
            coresdk::checkpoint::ORIGIN_RULE
        );
        return ExitCode::from(CONFIGURATION_ERROR);
    }
    let key = match coresdk::checkpoint::load_key(&key_file) {
        Ok(key) => key.verifying_key(),
        Err(e) => {
            eprintln!("coresdk: CORESDK_AUDIT_SIGNING_KEY_FILE (--audit-signing-key-file): {e}");
            return ExitCode::from(CONFIGURATION_ERROR);
        }
    };
    let origin = origin.unwrap_or_else(|| coresdk::checkpoint::default_origin(&key));
    println!("{}", coresdk::checkpoint::verifier_key(&origin, &key));
    ExitCode::SUCCESS
}

fn audit_verify(
    store: &str,
    checkpoint_file: Option<std::path::PathBuf>,
    signing_key_file: Option<std::path::PathBuf>,
    full: bool,
) -> ExitCode {
    use coresdk::checkpoint::NotOffline;
    let files = match coresdk::checkpoint::offline_files(store, checkpoint_file, signing_key_file) {
        Ok(files) => files,
        Err(NotOffline::Memory) => {
            eprintln!("coresdk: a memory store has nothing to verify offline");
            return ExitCode::from(2);
        }
        Err(NotOffline::Postgres) => {
            eprintln!(
                "coresdk: offline verification reads SQLite files; for PostgreSQL call AuditService/Verify on any replica"
            );
            return ExitCode::from(2);
        }
        Err(NotOffline::Bad(e)) => {
            eprintln!("coresdk: CORESDK_STORE (--store): {e}");
            return ExitCode::from(2);
        }
    };
    let path = files.db;
    let mut offline = match open_read_only(&path) {
        Ok(offline) => offline,
        Err(e) => {
            eprintln!("coresdk: cannot open {}: {e}", path.display());
            return ExitCode::from(2);
        }
    };
    let (checkpoint_file, key_file) = (files.checkpoints, files.key);
    // Offline verification must never create a key: only an existing one can vouch.
    let key = if key_file.exists() {
        match coresdk::checkpoint::load_key(&key_file) {
            Ok(key) => Some(key.verifying_key()),
            Err(e) => {
                eprintln!("coresdk: {e}");
                return ExitCode::from(2);
            }
        }
    } else {
        eprintln!(
            "coresdk: no signing key at {}: checking the chain only, not its checkpoints",
            key_file.display()
        );
        None
    };
    let checkpoints = key.map(|key| coresdk::checkpoint::Checkpoints {
        path: checkpoint_file,
        key,
    });
    let verified = offline
        .with_read_tx(|tx| coresdk::checkpoint::verify(tx, checkpoints.as_ref(), full))
        .map_err(coresdk::problem::Error::from)
        .and_then(|verified| verified);
    if let Ok(report) = &verified {
        for warning in &report.warnings {
            eprintln!("coresdk: warning: {warning}");
        }
    }
    match verified {
        Ok(report) if report.ok => {
            let from = match report.checkpoint_size {
                0 => String::new(),
                size => format!(" after the signed checkpoint of {size} records"),
            };
            println!(
                "ok: {} records verified{from}; head seq {} hash {}; tree root {}",
                report.records_checked,
                report.head.seq,
                hex::encode(report.head.hash),
                report.tree_root.map(hex::encode).unwrap_or_default()
            );
            ExitCode::SUCCESS
        }
        Ok(report) => {
            println!(
                "FAILED at seq {}: {} ({} records verified before it)",
                report.first_bad_seq, report.reason, report.records_checked
            );
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("coresdk: {e}");
            ExitCode::from(2)
        }
    }
}

fn stripe_sign(secret: &str, timestamp: Option<i64>) -> ExitCode {
    // Waiting silently for a body typed at a terminal looks like a hang.
    if std::io::stdin().is_terminal() {
        eprintln!(
            "coresdk: stripe sign reads the body to sign from standard input: printf '%s' \"$BODY\" | coresdk stripe sign --secret whsec_…"
        );
        return ExitCode::from(CONFIGURATION_ERROR);
    }
    let mut body = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut body) {
        eprintln!("coresdk: cannot read the body from standard input: {e}");
        return ExitCode::from(2);
    }
    let timestamp = timestamp.unwrap_or_else(coresdk::time::now_s);
    println!("{}", coresdk::stripe::sign_header(secret, timestamp, &body));
    ExitCode::SUCCESS
}
