//! Starts the real `coresdk` binary on an ephemeral port and talks to it over gRPC.
#![allow(dead_code)]

pub mod abuse;
pub mod audit;
pub mod checkpoints;
pub mod flagd;
pub mod flagd_sync;
pub mod inputs;
pub mod mapping;
pub mod ofrep;
pub mod ops;
pub mod parking;
pub mod reload;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use coresdk::proto::{
    audit_service_client::AuditServiceClient, flag_service_client::FlagServiceClient,
    tenant_service_client::TenantServiceClient, webhook_service_client::WebhookServiceClient,
};
use prost::Message as _;
use tonic::transport::Channel;

pub mod pg;
pub mod streams;

pub const SECRET: &str = "whsec_integration_secret";
pub const ADMIN_TOKEN: &str = "admin-token-for-tests-0123456789";

pub struct Sidecar {
    child: Option<Child>,
    pub addr: String,
    pub channel: Channel,
    pub data_dir: Option<PathBuf>,
    args: Vec<String>,
    envs: Vec<(String, String)>,
}

#[derive(Clone)]
pub struct Options {
    pub args: Vec<String>,
    pub envs: Vec<(String, String)>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            args: vec!["--store".into(), "memory".into()],
            envs: vec![
                ("STRIPE_WEBHOOK_SECRET".into(), SECRET.into()),
                ("CORESDK_ADMIN_TOKEN".into(), ADMIN_TOKEN.into()),
            ],
        }
    }
}

pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_coresdk")
}

/// Runs `coresdk ARGS…` as [`run_coresdk`] does, expects the start refused (exit 2) with an
/// error naming `setting`, and answers the standard error.
pub fn refused_at_start(
    cwd: Option<&Path>,
    args: &[&str],
    envs: &[(&str, &str)],
    setting: &str,
) -> String {
    let output = run_coresdk(cwd, args, envs);
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(2), "{args:?} {envs:?}: {stderr}");
    assert!(stderr.contains(setting), "{setting}: {stderr}");
    stderr
}

/// Runs `coresdk ARGS…` to its end with only `envs` (and `CORESDK_LOG=error`), in `cwd` when
/// given, with no standard input: a command as a user types it.
pub fn run_coresdk(cwd: Option<&Path>, args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut command = Command::new(binary());
    command
        .args(args)
        .env_clear()
        .env("CORESDK_LOG", "error")
        .envs(envs.iter().copied())
        .stdin(Stdio::null());
    if let Some(cwd) = cwd {
        command.current_dir(cwd);
    }
    // Bounded: a command expected to stop (a refused start, say) that runs on instead fails
    // the test rather than hanging the suite.
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary runs");
    let drain = |pipe: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut bytes);
            }
            bytes
        })
    };
    let stdout = drain(child.stdout.take().map(|p| Box::new(p) as Box<_>));
    let stderr = drain(child.stderr.take().map(|p| Box::new(p) as Box<_>));
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().expect("waits") {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("coresdk {args:?} still running after 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: stdout.join().expect("stdout read"),
        stderr: stderr.join().expect("stderr read"),
    }
}

/// Starts `coresdk serve --listen 127.0.0.1:0 ARGS…` with only `envs` and returns it with the
/// address it printed.
pub fn spawn(args: &[String], envs: &[(String, String)]) -> (Child, String) {
    spawn_with_stderr(args, envs, Stdio::inherit())
}

/// `coresdk serve --listen 127.0.0.1:0 ARGS…` with only `envs`, stdout piped to read the
/// address lines from.
pub fn serve_command(args: &[String], envs: &[(String, String)], stderr: Stdio) -> Command {
    let mut command = Command::new(binary());
    command
        .args(["serve", "--listen", "127.0.0.1:0"])
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        // Sidecars run side by side: none may take the OpenFeature protocols' fixed default
        // ports.
        .env("CORESDK_FLAGD_LISTEN", "off")
        .env("CORESDK_FLAGD_SYNC_LISTEN", "off")
        .env("CORESDK_OFREP_LISTEN", "off")
        .env("CORESDK_OPS_LISTEN", "off")
        // Tests stop many sidecars: they drain at once unless a test asks for the delay.
        .env("CORESDK_SHUTDOWN_DELAY_S", "0")
        .env(
            "CORESDK_LOG",
            std::env::var("TEST_CORESDK_LOG").unwrap_or_else(|_| "error".into()),
        )
        .stdout(Stdio::piped())
        .stderr(stderr);
    for (k, v) in envs {
        command.env(k, v);
    }
    command
}

/// [`spawn`], with the sidecar's standard error (its log) going to `stderr`.
pub fn spawn_with_stderr(
    args: &[String],
    envs: &[(String, String)],
    stderr: Stdio,
) -> (Child, String) {
    spawn_command(serve_command(args, envs, stderr))
}

/// Starts a `serve_command` and returns it with the address it announced.
pub fn spawn_command(mut command: Command) -> (Child, String) {
    let mut child = command.spawn().expect("the coresdk binary starts");
    let stdout = child.stdout.take().expect("piped stdout");
    let mut lines = BufReader::new(stdout).lines();
    let addr = loop {
        let line = lines
            .next()
            .expect("the sidecar printed its address before exiting")
            .expect("readable stdout");
        if let Some(addr) = line.strip_prefix("coresdk listening on ") {
            break addr.to_owned();
        }
    };
    // Keep draining stdout so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    (child, addr)
}

pub async fn connect(addr: &str) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .expect("valid uri")
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .expect("connects to the sidecar")
}

/// `options` with the store on a SQLite file in `dir`.
fn on_disk(dir: &Path, mut options: Options) -> Options {
    options.args.retain(|a| a != "--store" && a != "memory");
    options.args.extend([
        "--store".to_owned(),
        format!("sqlite://{}", dir.join("coresdk.db").display()),
    ]);
    options
}

impl Sidecar {
    pub async fn start(options: Options) -> Self {
        let (child, addr) = spawn(&options.args, &options.envs);
        Self::started(child, addr, options).await
    }

    /// `count` sidecars launched at the same instant (their start-up work races), then connected.
    pub async fn start_together(options: Options, count: usize) -> Vec<Self> {
        let spawned: Vec<(Child, String)> = std::thread::scope(|scope| {
            let launches: Vec<_> = (0..count)
                .map(|_| scope.spawn(|| spawn(&options.args, &options.envs)))
                .collect();
            launches
                .into_iter()
                .map(|launch| launch.join().expect("a sidecar launched"))
                .collect()
        });
        let mut sidecars = Vec::new();
        for (child, addr) in spawned {
            sidecars.push(Self::started(child, addr, options.clone()).await);
        }
        sidecars
    }

    async fn started(child: Child, addr: String, options: Options) -> Self {
        let channel = connect(&addr).await;
        Self {
            child: Some(child),
            addr,
            channel,
            data_dir: None,
            args: options.args,
            envs: options.envs,
        }
    }

    pub async fn mock() -> Self {
        Self::start(Options {
            args: vec!["--mock".into()],
            envs: Vec::new(),
        })
        .await
    }

    /// A sidecar on a SQLite file in `dir`.
    pub async fn on_disk(dir: &Path, options: Options) -> Self {
        let mut sidecar = Self::start(on_disk(dir, options)).await;
        sidecar.data_dir = Some(dir.to_owned());
        sidecar
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    pub fn store_url(&self) -> String {
        format!(
            "sqlite://{}",
            self.data_dir
                .as_ref()
                .expect("an on-disk sidecar")
                .join("coresdk.db")
                .display()
        )
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success());
        child.wait().expect("the sidecar exits")
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().expect("SIGKILL");
        let _ = child.wait();
    }

    /// Starts the same configuration again (same store), on a new port.
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "stop or kill first");
        let (child, addr) = spawn(&self.args, &self.envs);
        self.channel = connect(&addr).await;
        self.addr = addr;
        self.child = Some(child);
    }

    pub fn webhooks(&self) -> WebhookServiceClient<Channel> {
        WebhookServiceClient::new(self.channel.clone())
    }
    pub fn flags(&self) -> FlagServiceClient<Channel> {
        FlagServiceClient::new(self.channel.clone())
    }
    pub fn audit(&self) -> AuditServiceClient<Channel> {
        AuditServiceClient::new(self.channel.clone())
    }
    pub fn tenants(&self) -> TenantServiceClient<Channel> {
        TenantServiceClient::new(self.channel.clone())
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub fn now() -> i64 {
    coresdk::time::now_s()
}

/// A Stripe event body with `data.object` = `object`.
pub fn event(id: &str, event_type: &str, created: i64, object: serde_json::Value) -> Vec<u8> {
    serde_json::json!({
        "id": id,
        "object": "event",
        "type": event_type,
        "created": created,
        "livemode": false,
        "data": {"object": object},
    })
    .to_string()
    .into_bytes()
}

/// Stripe's delivery of `body`, signed with [`SECRET`].
pub async fn deliver(
    sidecar: &Sidecar,
    body: Vec<u8>,
) -> Result<coresdk::proto::HandleStripeWebhookResponse, tonic::Status> {
    sidecar
        .webhooks()
        .handle_stripe_webhook(signed(SECRET, body))
        .await
        .map(|r| r.into_inner())
}

pub fn signed(secret: &str, body: Vec<u8>) -> coresdk::proto::HandleStripeWebhookRequest {
    let signature_header = coresdk::stripe::sign_header(secret, now(), &body);
    coresdk::proto::HandleStripeWebhookRequest {
        include_proof: false,
        payload: body,
        signature_header,
    }
}

pub fn admin<T>(message: T) -> tonic::Request<T> {
    with_bearer(message, ADMIN_TOKEN)
}

/// `message` with `authorization: Bearer <token>`.
pub fn with_bearer<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("ascii"),
    );
    request
}

/// The RFC 9457 problem carried in a status's details.
pub fn problem(status: &tonic::Status) -> coresdk::proto::Problem {
    let details =
        tonic_types::pb::Status::decode(status.details()).expect("google.rpc.Status details");
    let any = details
        .details
        .iter()
        .find(|d| d.type_url.ends_with("coresdk.v1.Problem"))
        .expect("a Problem in the details");
    coresdk::proto::Problem::decode(any.value.as_slice()).expect("a Problem")
}

pub fn error_reason(status: &tonic::Status) -> String {
    let details =
        tonic_types::pb::Status::decode(status.details()).expect("google.rpc.Status details");
    let any = details
        .details
        .iter()
        .find(|d| d.type_url.ends_with("google.rpc.ErrorInfo"))
        .expect("an ErrorInfo in the details");
    tonic_types::pb::ErrorInfo::decode(any.value.as_slice())
        .expect("an ErrorInfo")
        .reason
}

pub fn bool_value(flag: &coresdk::proto::Flag) -> Option<bool> {
    match flag.value.as_ref()?.kind.as_ref()? {
        coresdk::proto::flag_value::Kind::BoolValue(b) => Some(*b),
        _ => None,
    }
}

pub async fn flag(sidecar: &Sidecar, tenant: &str, key: &str) -> coresdk::proto::Flag {
    sidecar
        .flags()
        .get_flag(coresdk::proto::GetFlagRequest {
            tenant_id: tenant.into(),
            key: key.into(),
        })
        .await
        .expect("GetFlag")
        .into_inner()
}

pub async fn is_on(sidecar: &Sidecar, tenant: &str, key: &str) -> bool {
    bool_value(&flag(sidecar, tenant, key).await).expect("a bool flag")
}

/// The Python with PyJWT and `cryptography` that `scripts/python-env` prepares.
pub fn python() -> std::path::PathBuf {
    let python = std::env::var_os("CORESDK_TEST_PYTHON")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python"));
    assert!(
        python.exists(),
        "{} is missing: run ./scripts/test (or ./scripts/python-env) first; the auth tests mint tokens with PyJWT",
        python.display()
    );
    python
}

/// Runs one of `tests/fixtures/*.py` with `dir` as its argument and returns its stdout.
pub fn fixture(script: &str, dir: &Path) -> String {
    let output = Command::new(python())
        .arg(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures")
                .join(script),
        )
        .arg(dir)
        .output()
        .expect("the fixture script runs");
    assert!(
        output.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("utf-8")
}
