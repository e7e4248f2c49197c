//! Commands that ask a running sidecar over gRPC: connecting (plaintext or TLS), `stripe
//! replay` and `flags explain`. Each reports on stdout and explains failures in one line on
//! stderr.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use serde_json::{Value as Json, json};
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Request};

use super::{ExplainArgs, ReplayArgs, SidecarArgs};
use crate::api::convert::{flag_value_from_proto, ms_from_timestamp, outcome_from_proto};
use crate::flags::FlagValue;
use crate::proto::{
    self, ExplainFlagRequest, ReplayStripeEventRequest, explain_flag_response::SetBy,
    flag_service_client::FlagServiceClient, webhook_service_client::WebhookServiceClient,
};
use crate::store::Outcome;
use crate::stripe::export::{Export, read_export};
use crate::time::rfc3339_ms;

/// Every event acknowledged; the flags answered.
pub const EXIT_OK: u8 = 0;
/// The sidecar refused or could not apply some event (or explain the flag).
pub const EXIT_FAILED: u8 = 1;
/// Nothing was sent: a bad setting, an unreadable or malformed file, no connection.
pub const EXIT_NOTHING_SENT: u8 = 2;

/// The TLS side of a connection: None for a plaintext listener.
pub fn tls(args: &SidecarArgs) -> Result<Option<ClientTlsConfig>, String> {
    let Some(ca_file) = &args.tls_ca_file else {
        return Ok(None);
    };
    let read = |flag: &str, path: &Path| {
        std::fs::read(path).map_err(|e| {
            format!(
                "{flag}: cannot read {}: {e}; point it at a readable PEM file",
                path.display()
            )
        })
    };
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read("--tls-ca-file", ca_file)?));
    if let Some(name) = &args.tls_server_name {
        tls = tls.domain_name(name.clone());
    }
    if let (Some(cert), Some(key)) = (&args.tls_client_cert_file, &args.tls_client_key_file) {
        tls = tls.identity(Identity::from_pem(
            read("--tls-client-cert-file", cert)?,
            read("--tls-client-key-file", key)?,
        ));
    }
    Ok(Some(tls))
}

/// A hint for errors of a plaintext connection, which fail against a TLS listener in ways
/// that do not say so.
pub fn tls_hint(tls: Option<&ClientTlsConfig>) -> &'static str {
    if tls.is_some() {
        ""
    } else {
        "; if the sidecar serves TLS, give --tls-ca-file"
    }
}

/// Connects, waiting at most `timeout` for the connection and then for each answer.
pub async fn connect(
    addr: &str,
    tls: Option<ClientTlsConfig>,
    timeout: Duration,
) -> Result<Channel, String> {
    let hint = tls_hint(tls.as_ref());
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))
        .map_err(|e| format!("--addr {addr:?}: {e}"))?
        .connect_timeout(timeout)
        .timeout(timeout);
    if let Some(tls) = tls {
        endpoint = endpoint
            .tls_config(tls)
            .map_err(|e| format!("unusable TLS settings: {}", crate::problem::with_causes(&e)))?;
    }
    endpoint.connect().await.map_err(|e| {
        format!(
            "cannot connect: {}; check that the sidecar runs and listens there (--addr or CORESDK_LISTEN){hint}",
            crate::problem::with_causes(&e)
        )
    })
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))
}

/// Connects as `args` say, on a runtime of its own.
fn connected(
    args: &SidecarArgs,
    timeout_s: u64,
) -> Result<(tokio::runtime::Runtime, Channel), String> {
    let tls = tls(args)?;
    let runtime = runtime()?;
    let timeout = Duration::from_secs(timeout_s.max(1));
    let channel = runtime
        .block_on(connect(&args.addr, tls, timeout))
        .map_err(|e| format!("the sidecar at {}: {e}", args.addr))?;
    Ok((runtime, channel))
}

/// `authorization: Bearer <token>`, checked once before anything is sent.
type Authorization = Option<MetadataValue<tonic::metadata::Ascii>>;

fn authorization(token: Option<&str>) -> Result<Authorization, String> {
    token
        .map(|token| {
            MetadataValue::try_from(format!("Bearer {token}"))
                .map_err(|_| "the token holds characters a header cannot carry".to_owned())
        })
        .transpose()
}

fn authorized<T>(message: T, authorization: &Authorization) -> Request<T> {
    let mut request = Request::new(message);
    if let Some(value) = authorization {
        request
            .metadata_mut()
            .insert("authorization", value.clone());
    }
    request
}

/// A refusal as one line: its code and the problem's detail.
fn refusal(status: &tonic::Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
}

/// Refusals that every later call would meet as well: stop instead of trying each event.
fn stops_the_run(code: Code) -> bool {
    matches!(
        code,
        Code::Unauthenticated
            | Code::PermissionDenied
            | Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Cancelled
            | Code::Unknown
            | Code::Unimplemented
    )
}

fn fail(line: &str, code: u8) -> ExitCode {
    eprintln!("coresdk: {line}");
    ExitCode::from(code)
}

fn read_file(file: &Path) -> Result<Export, String> {
    if file == Path::new("-") {
        use std::io::IsTerminal as _;
        if std::io::stdin().is_terminal() {
            return Err(
                "stripe replay - reads the export from standard input: pipe it in, or name the file"
                    .to_owned(),
            );
        }
        return read_export(std::io::stdin().lock())
            .map_err(|e| format!("the export on standard input: {e}; nothing was sent"));
    }
    let opened = std::fs::File::open(file)
        .map_err(|e| format!("cannot open {}: {e}; nothing was sent", file.display()))?;
    read_export(std::io::BufReader::new(opened))
        .map_err(|e| format!("{}: {e}; nothing was sent", file.display()))
}

pub fn replay(args: ReplayArgs) -> ExitCode {
    if args.reason.trim().is_empty() {
        return fail(
            "--reason is required: say why you replay; it goes into every event's audit record",
            EXIT_NOTHING_SENT,
        );
    }
    let authorization = match authorization(args.admin_token.as_deref()) {
        Ok(authorization) => authorization,
        Err(line) => return fail(&format!("--admin-token: {line}"), EXIT_NOTHING_SENT),
    };
    let export = match read_file(&args.file) {
        Ok(export) => export,
        Err(line) => return fail(&line, EXIT_NOTHING_SENT),
    };
    if export.has_more {
        eprintln!(
            "coresdk: warning: the export says has_more: it is one page of the list; replay the next pages too (List Events with starting_after)"
        );
    }
    let (runtime, channel) = match connected(&args.sidecar, args.timeout_s) {
        Ok(connected) => connected,
        Err(line) => return fail(&format!("{line}; nothing was sent"), EXIT_NOTHING_SENT),
    };
    let mut client = WebhookServiceClient::new(channel);
    let total = export.events.len();
    let mut counts: BTreeMap<&'static str, usize> = BTreeMap::new();
    let mut sent = 0;
    for event in export.events {
        let request = authorized(
            ReplayStripeEventRequest {
                payload: event.payload,
                reason: args.reason.clone(),
            },
            &authorization,
        );
        sent += 1;
        let answer = runtime.block_on(client.replay_stripe_event(request));
        let label = format!(
            "{} {} {} (created {})",
            event.position, event.id, event.event_type, event.created
        );
        match answer {
            Ok(answer) => {
                let answer = answer.into_inner();
                let outcome = outcome_name(answer.outcome());
                *counts.entry(outcome).or_default() += 1;
                println!("{label}: {}", acknowledged(outcome, &answer));
            }
            Err(status) => {
                *counts.entry("failed").or_default() += 1;
                println!("{label}: FAILED {}", refusal(&status));
                if stops_the_run(status.code()) {
                    eprintln!(
                        "coresdk: stopped: every further event would meet the same refusal; {} not sent",
                        total - sent
                    );
                    break;
                }
            }
        }
    }
    let counted: Vec<String> = counts.iter().map(|(k, n)| format!("{n} {k}")).collect();
    let not_sent = total - sent;
    let not_sent = if not_sent > 0 {
        format!(", {not_sent} not sent")
    } else {
        String::new()
    };
    println!(
        "replayed {sent} of {total} events: {}{not_sent}",
        counted.join(", ")
    );
    if counts.contains_key("failed") {
        ExitCode::from(EXIT_FAILED)
    } else {
        ExitCode::from(EXIT_OK)
    }
}

fn outcome_name(outcome: proto::WebhookOutcome) -> &'static str {
    outcome_from_proto(outcome).map_or("unspecified", Outcome::as_str)
}

fn acknowledged(outcome: &str, answer: &proto::HandleStripeWebhookResponse) -> String {
    let mut line = outcome.to_uppercase();
    if !answer.tenant_id.is_empty() {
        line.push_str(&format!(" tenant {}", answer.tenant_id));
    }
    for change in &answer.flag_changes {
        let value = flag_value_from_proto(change.new_value.as_ref())
            .map(|v| v.display())
            .unwrap_or_default();
        line.push_str(&format!(" {}={value}", change.key));
    }
    if !answer.stale_flags.is_empty() {
        line.push_str(&format!(" (stale for {})", answer.stale_flags.join(", ")));
    }
    line.push_str(&format!(", audit seq {}", answer.audit_seq));
    line
}

pub fn explain(args: ExplainArgs) -> ExitCode {
    let request = match authorization(args.api_token.as_deref()) {
        Ok(authorization) => authorized(
            ExplainFlagRequest {
                tenant_id: args.tenant.clone(),
                key: args.key.clone(),
            },
            &authorization,
        ),
        Err(line) => return fail(&format!("--api-token: {line}"), EXIT_NOTHING_SENT),
    };
    let (runtime, channel) = match connected(&args.sidecar, args.timeout_s) {
        Ok(connected) => connected,
        Err(line) => return fail(&line, EXIT_NOTHING_SENT),
    };
    let answer = runtime.block_on(FlagServiceClient::new(channel).explain_flag(request));
    match answer {
        Ok(answer) => {
            let answer = answer.into_inner();
            if args.json {
                println!("{:#}", explanation_json(&answer));
            } else {
                print!("{}", explanation_text(&answer));
            }
            ExitCode::from(EXIT_OK)
        }
        Err(status) => fail(
            &format!(
                "cannot explain {} of {}: {}",
                args.key,
                args.tenant,
                refusal(&status)
            ),
            EXIT_FAILED,
        ),
    }
}

fn value_of(flag: Option<&proto::Flag>) -> Option<FlagValue> {
    flag_value_from_proto(flag?.value.as_ref()).ok()
}

fn value_json(value: &FlagValue) -> Json {
    match value {
        FlagValue::Bool(b) => json!(b),
        FlagValue::String(s) => json!(s),
        FlagValue::Number(n) => json!(n),
        FlagValue::Json(v) => v.clone(),
    }
}

fn time(timestamp: Option<&prost_types::Timestamp>) -> String {
    timestamp.map_or_else(String::new, |t| rfc3339_ms(ms_from_timestamp(t)))
}

fn created(seconds: i64) -> String {
    format!("{} = {seconds}", rfc3339_ms(seconds.saturating_mul(1000)))
}

fn event_text(event: &proto::FlagEvent) -> String {
    let mut line = format!(
        "event {} ({}, created {}), {} by {} at {}",
        event.event_id,
        event.event_type,
        created(event.created),
        if event.actor == crate::ops::REPLAY_ACTOR {
            "replayed"
        } else {
            "delivered"
        },
        event.actor,
        time(event.received_at.as_ref())
    );
    if !event.reason.is_empty() {
        line.push_str(&format!(" (reason: {})", event.reason));
    }
    if event.audit_seq > 0 {
        line.push_str(&format!(", audit seq {}", event.audit_seq));
    } else {
        line.push_str(", its audit record was not found");
    }
    line
}

/// The explanation as an operator reads it: one fact per line.
pub fn explanation_text(answer: &proto::ExplainFlagResponse) -> String {
    let flag = answer.flag.as_ref();
    let value = value_of(flag).map_or_else(|| "(no value)".to_owned(), |v| v.display());
    let (tenant, key) = flag.map_or(("", ""), |f| (f.tenant_id.as_str(), f.key.as_str()));
    let mut text = String::new();
    if flag.is_some_and(|f| f.is_default) {
        text.push_str(&format!(
            "{key} of {tenant} = {value}: the catalog default; nothing has set it for this tenant\n"
        ));
        return text;
    }
    let version = flag.map_or(0, |f| f.version);
    text.push_str(&format!(
        "{key} of {tenant} = {value} (version {version})\n"
    ));
    match &answer.set_by {
        Some(SetBy::Event(event)) => {
            text.push_str(&format!("set by: {}\n", event_text(event)));
            let rule = if answer.rule.is_empty() {
                "unknown (the event's audit record names none)"
            } else {
                &answer.rule
            };
            text.push_str(&format!("rule: {rule}\n"));
        }
        Some(SetBy::Admin(admin)) => {
            let mut line = format!(
                "set by: operator {} at {}, version {}",
                admin.actor,
                time(admin.at.as_ref()),
                admin.version
            );
            if !admin.reason.is_empty() {
                line.push_str(&format!(" (reason: {})", admin.reason));
            }
            if admin.audit_seq > 0 {
                line.push_str(&format!(", audit seq {}", admin.audit_seq));
            }
            text.push_str(&format!("{line}\nrule: none (an admin change)\n"));
        }
        None => text.push_str("set by: unknown\n"),
    }
    if let Some(newest) = &answer.newest_event {
        text.push_str(&format!(
            "order mark: {} (only a newer event changes this flag)\n",
            event_text(newest)
        ));
    }
    let searched = format!(
        "searched the audit records after seq {} through {}",
        answer.searched_from_seq, answer.searched_through_seq
    );
    if answer.stale_events.is_empty() {
        text.push_str(&format!("stale events: none ({searched})\n"));
    } else {
        text.push_str(&format!(
            "stale events (delivered later, but older than the flag's newest event; {searched}):\n"
        ));
        for event in &answer.stale_events {
            text.push_str(&format!("  {}\n", event_text(event)));
        }
    }
    text
}

fn event_json(event: &proto::FlagEvent) -> Json {
    json!({
        "event_id": event.event_id,
        "event_type": event.event_type,
        "created": event.created,
        "audit_seq": event.audit_seq,
        "received_at": time(event.received_at.as_ref()),
        "actor": event.actor,
        "reason": event.reason,
    })
}

pub fn explanation_json(answer: &proto::ExplainFlagResponse) -> Json {
    let flag = answer.flag.as_ref();
    let set_by = match &answer.set_by {
        Some(SetBy::Event(event)) => json!({"event": event_json(event)}),
        Some(SetBy::Admin(admin)) => json!({"admin": {
            "actor": admin.actor,
            "reason": admin.reason,
            "at": time(admin.at.as_ref()),
            "version": admin.version,
            "audit_seq": admin.audit_seq,
        }}),
        None => Json::Null,
    };
    json!({
        "tenant_id": flag.map(|f| f.tenant_id.clone()),
        "key": flag.map(|f| f.key.clone()),
        "value": value_of(flag).as_ref().map(value_json),
        "is_default": flag.is_some_and(|f| f.is_default),
        "version": flag.map_or(0, |f| f.version),
        "set_by": set_by,
        "rule": if answer.rule.is_empty() { Json::Null } else { json!(answer.rule) },
        "newest_event": answer.newest_event.as_ref().map(event_json),
        "stale_events": answer.stale_events.iter().map(event_json).collect::<Vec<_>>(),
        "searched_from_seq": answer.searched_from_seq,
        "searched_through_seq": answer.searched_through_seq,
    })
}
