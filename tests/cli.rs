//! The command line as a user meets it: the real binary, with settings from flags and from the
//! environment, in a working directory of its own.
mod common;

use std::io::{BufRead as _, BufReader};
use std::process::{Command, Output, Stdio};

use common::run_coresdk;

fn one_line(output: &Output) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    stderr
}

#[test]
fn a_bad_value_from_the_environment_is_reported_under_the_variable() {
    let dir = tempfile::tempdir().expect("temp dir");
    let output = run_coresdk(Some(dir.path()), &[], &[("CORESDK_FAIL_MODE", "sometimes")]);
    assert_eq!(output.status.code(), Some(2));
    assert_eq!(
        one_line(&output),
        r#"coresdk: CORESDK_FAIL_MODE (from the environment) = "sometimes": invalid value; use open or closed"#
    );

    let output = run_coresdk(
        Some(dir.path()),
        &["serve"],
        &[("CORESDK_SHUTDOWN_GRACE_S", "ten")],
    );
    assert_eq!(output.status.code(), Some(2));
    let line = one_line(&output);
    assert!(
        line.starts_with(r#"coresdk: CORESDK_SHUTDOWN_GRACE_S (from the environment) = "ten": "#),
        "{line}"
    );

    let output = run_coresdk(
        Some(dir.path()),
        &[],
        &[("CORESDK_WEBHOOK_MAX_BODY_BYTES", "0")],
    );
    assert_eq!(output.status.code(), Some(2));
    assert_eq!(
        one_line(&output),
        r#"coresdk: CORESDK_WEBHOOK_MAX_BODY_BYTES (from the environment) = "0": must be between 1 and 67108864 (64 MiB)"#
    );
}

#[test]
fn a_bad_flag_is_reported_under_the_flag_and_the_variable() {
    let dir = tempfile::tempdir().expect("temp dir");
    // The flag wins over the environment, and the error says so.
    let output = run_coresdk(
        Some(dir.path()),
        &["--fail-mode", "sometimes"],
        &[("CORESDK_FAIL_MODE", "open")],
    );
    assert_eq!(output.status.code(), Some(2));
    assert_eq!(
        one_line(&output),
        r#"coresdk: CORESDK_FAIL_MODE (from --fail-mode on the command line) = "sometimes": invalid value; use open or closed"#
    );
}

#[test]
fn secrets_are_named_but_never_shown() {
    let dir = tempfile::tempdir().expect("temp dir");
    let output = run_coresdk(
        Some(dir.path()),
        &[],
        &[("CORESDK_ADMIN_TOKEN", "short-secret")],
    );
    assert_eq!(output.status.code(), Some(2));
    let line = one_line(&output);
    assert!(
        line.starts_with("coresdk: CORESDK_ADMIN_TOKEN (from the environment): "),
        "{line}"
    );
    assert!(!line.contains("short-secret"), "{line}");
}

#[test]
fn a_start_that_fails_validation_leaves_no_data_directory_and_no_key() {
    let dir = tempfile::tempdir().expect("temp dir");
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)]);
    // The tenants file is read after the checkpoint paths are worked out: parsing used to
    // create the key by then.
    let cases: [Case; 4] = [
        (&[], &[("CORESDK_FAIL_MODE", "sometimes")]),
        (&["--rules-file", "/nonexistent/rules.toml"], &[]),
        (
            &[],
            &[("CORESDK_TENANTS_FILE", "/nonexistent/tenants.json")],
        ),
        (&["--tls-cert-file", "/nonexistent/cert.pem"], &[]),
    ];
    for (args, envs) in cases {
        let output = run_coresdk(Some(dir.path()), args, envs);
        assert_eq!(output.status.code(), Some(2), "{args:?} {envs:?}");
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert!(left.is_empty(), "{args:?} {envs:?} left {left:?} behind");
    }
}

#[test]
fn a_bad_checkpoint_key_stops_the_start_before_the_store_is_created() {
    let dir = tempfile::tempdir().expect("temp dir");
    let key = dir.path().join("audit-key");
    std::fs::write(&key, "not a key").expect("write");
    let key = key.to_str().expect("UTF-8");
    let output = run_coresdk(
        Some(dir.path()),
        &["--listen", "127.0.0.1:0"],
        &[("CORESDK_AUDIT_SIGNING_KEY_FILE", key)],
    );
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!(
            "CORESDK_AUDIT_SIGNING_KEY_FILE (from the environment) = \"{key}\""
        )),
        "{stderr}"
    );
    assert!(!dir.path().join("coresdk-data").exists());
}

/// Kills the sidecar if the test fails before stopping it: no process outlives a test.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_good_start_creates_the_data_directory_and_the_key() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut running = Running(
        Command::new(env!("CARGO_BIN_EXE_coresdk"))
            .args(["--listen", "127.0.0.1:0"])
            .current_dir(dir.path())
            .env_clear()
            .env("CORESDK_FLAGD_LISTEN", "off")
            .env("CORESDK_LOG", "error")
            .stdout(Stdio::piped())
            .spawn()
            .expect("starts"),
    );
    let child = &mut running.0;
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).expect("read");
    assert!(line.starts_with("coresdk listening on "), "{line}");
    let stopped = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(stopped.success());
    assert!(child.wait().expect("exits").success());
    let data = dir.path().join("coresdk-data");
    assert!(data.join("coresdk.db").exists());
    assert!(data.join("coresdk.db.audit-key").exists());
}

#[test]
fn health_with_nothing_listening_names_the_address_and_the_cause() {
    let dir = tempfile::tempdir().expect("temp dir");
    // A port that was just free: nothing listens there.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .to_string();
    let output = run_coresdk(
        Some(dir.path()),
        &["health", "--addr", &addr, "--timeout-s", "1"],
        &[],
    );
    assert_eq!(output.status.code(), Some(1));
    let line = one_line(&output);
    assert!(line.contains(&addr), "{line}");
    assert!(line.contains("Connection refused"), "{line}");
    assert!(line.contains("--addr"), "{line}");
}

#[test]
fn help_describes_the_store_choices() {
    let dir = tempfile::tempdir().expect("temp dir");
    let output = run_coresdk(Some(dir.path()), &["serve", "--help"], &[]);
    assert!(output.status.success());
    let help = String::from_utf8_lossy(&output.stdout);
    for needed in ["sqlite://PATH", "postgres://", "`memory`", "--tls-key-file"] {
        assert!(help.contains(needed), "{needed}: {help}");
    }
}

#[test]
fn client_commands_read_sidecar_tls_and_health_keeps_its_old_names() {
    let dir = tempfile::tempdir().expect("temp dir");
    let missing = dir.path().join("no-such-ca.pem");
    let missing = missing.to_str().expect("UTF-8 path");
    let nobody = ["--addr", "127.0.0.1:1"];
    let health = [&["health"][..], &nobody].concat();
    let explain = [&["flags", "explain", "acme", "pro_features"][..], &nobody].concat();
    let reads_the_ca = |args: &[&str], var: &str| {
        let output = run_coresdk(Some(dir.path()), args, &[(var, missing)]);
        String::from_utf8_lossy(&output.stderr).contains(&format!("cannot read {missing}"))
    };
    assert!(reads_the_ca(&health, "CORESDK_SIDECAR_TLS_CA_FILE"));
    assert!(reads_the_ca(&explain, "CORESDK_SIDECAR_TLS_CA_FILE"));
    assert!(reads_the_ca(&health, "CORESDK_HEALTH_TLS_CA_FILE"));
    // The old name belongs to `health` alone.
    assert!(!reads_the_ca(&explain, "CORESDK_HEALTH_TLS_CA_FILE"));
    // Given both, the new name wins: the old one is not even read.
    let output = run_coresdk(
        Some(dir.path()),
        &health,
        &[
            ("CORESDK_SIDECAR_TLS_CA_FILE", missing),
            ("CORESDK_HEALTH_TLS_CA_FILE", "/elsewhere.pem"),
        ],
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("cannot read {missing}")),
        "{stderr}"
    );
    // The alias is checked like the flag: a server name needs a CA file.
    let output = run_coresdk(
        Some(dir.path()),
        &health,
        &[("CORESDK_HEALTH_TLS_SERVER_NAME", "localhost")],
    );
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("--tls-ca-file"));
}
