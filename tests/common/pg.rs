//! PostgreSQL test servers and databases, shared by the PostgreSQL test files.

use std::time::Duration;

use tonic_health::pb::health_check_response::ServingStatus;

use super::{Options, Sidecar};

/// A sidecar on the store at `url`, with the example tenants.
pub fn replica_options(url: &str) -> Options {
    Options {
        args: vec![
            "--store".into(),
            url.into(),
            "--tenants-file".into(),
            concat!(env!("CARGO_MANIFEST_DIR"), "/examples/tenants.json").into(),
        ],
        ..Options::default()
    }
}

/// `count` replicas on one database, launched together so that their schema migrations and
/// tenant seeding race, as when a deployment scales up.
pub async fn replicas(url: &str, count: usize) -> Vec<Sidecar> {
    Sidecar::start_together(replica_options(url), count).await
}

/// The shared test server (`./scripts/test` starts one and sets CORESDK_TEST_POSTGRES_URL).
pub fn server_url() -> String {
    std::env::var("CORESDK_TEST_POSTGRES_URL").unwrap_or_else(|_| {
        panic!(
            "CORESDK_TEST_POSTGRES_URL is not set: run ./scripts/test, which starts a throwaway PostgreSQL with scripts/postgres-test-server"
        )
    })
}

/// A new, empty database on the test server, so tests never share state.
pub async fn fresh_database(server: String) -> String {
    fresh_database_with(server, "").await
}

/// [`fresh_database`] whose text sorts by the rules of an English-speaking locale (ICU
/// `en-US`: "evt_a" < "evt_B"), not byte by byte as under the test server's C locale.
pub async fn fresh_locale_sorted_database(server: String) -> String {
    fresh_database_with(
        server,
        " TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en-US'",
    )
    .await
}

async fn fresh_database_with(server: String, options: &'static str) -> String {
    tokio::task::spawn_blocking(move || {
        let name = format!(
            "coresdk_{}_{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        );
        let mut admin = postgres::Client::connect(&server, postgres::NoTls)
            .expect("the test PostgreSQL is reachable");
        admin
            .batch_execute(&format!("CREATE DATABASE {name}{options}"))
            .expect("create database");
        let (base, _) = server.rsplit_once('/').expect("a database in the URL");
        format!("{base}/{name}")
    })
    .await
    .expect("blocking task")
}

/// The newest installed PostgreSQL's bin directory (scripts/postgres-test-server installs one).
pub fn postgres_bin() -> std::path::PathBuf {
    std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is installed")
        .filter_map(Result::ok)
        .map(|e| e.path().join("bin"))
        .max()
        .expect("a PostgreSQL version")
}

/// Starts (or reuses) a test's own server on `port` in `dir`, with the same options every
/// time, and returns its URL.
pub fn start_own_server(port: u16, dir: &str) -> String {
    start_own_server_with(port, dir, &[])
}

/// [`start_own_server`] with more of the script's settings (server options, pg_hba.conf).
pub fn start_own_server_with(port: u16, dir: &str, settings: &[(&str, &str)]) -> String {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/postgres-test-server");
    let output = std::process::Command::new(script)
        .env("CORESDK_TEST_PG_PORT", port.to_string())
        .env("CORESDK_TEST_PG_DIR", dir)
        .envs(settings.iter().copied())
        .output()
        .expect("the script runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout)
        .expect("utf-8")
        .trim()
        .to_owned()
}

/// `pg_ctl stop` in `mode` (`fast`, `immediate`) on the server in `dir`.
fn pg_ctl_stop(dir: &str, mode: &str) -> std::process::Output {
    // From `/`: the postgres user may not be able to enter the checkout, and pg_ctl says so.
    std::process::Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(postgres_bin().join("pg_ctl"))
        .args(["-D", dir, "-m", mode, "-w", "stop"])
        .current_dir("/")
        .output()
        .expect("pg_ctl runs")
}

/// Stops the server in `dir` (fast shutdown).
pub fn stop_own_server(dir: &str) {
    let output = pg_ctl_stop(dir, "fast");
    assert!(
        output.status.success(),
        "pg_ctl stop: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Stops whatever server an earlier run left in `dir`, if any, and removes the directory, so
/// that a new cluster starts there.
pub fn discard_own_server(dir: &str) {
    let _ = pg_ctl_stop(dir, "immediate");
    let _ = std::fs::remove_dir_all(dir);
}

/// A test's own server, stopped when the test ends however it ends.
pub struct OwnServer {
    pub url: String,
    dir: &'static str,
}

impl OwnServer {
    pub fn start(port: u16, dir: &'static str) -> Self {
        Self::start_with(port, dir, &[])
    }

    pub fn start_with(port: u16, dir: &'static str, settings: &[(&str, &str)]) -> Self {
        Self {
            url: start_own_server_with(port, dir, settings),
            dir,
        }
    }
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        // Not asserted: the test may have stopped it already, or be failing (a panic while
        // unwinding aborts every other test).
        let _ = pg_ctl_stop(self.dir, "fast");
    }
}

/// Waits (up to a generous hang guard) until `service` reports `wanted`.
pub async fn wait_for_health(sidecar: &Sidecar, service: &str, wanted: ServingStatus) {
    let mut health = tonic_health::pb::health_client::HealthClient::new(sidecar.channel.clone());
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let status = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("Check")
            .into_inner()
            .status();
        if status == wanted {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{service:?} stayed {status:?}, wanted {wanted:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
