//! A sidecar serving TLS, for the tests that connect to one themselves.

use std::path::Path;
use std::process::Child;

/// Kills the sidecar however the test ends: no process outlives a test.
pub struct Running(pub Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts a sidecar with the certificates `mint_certs.py` wrote into `dir`, requiring client
/// certificates from its CA when `mutual`; returns it with its address. `Sidecar::start`
/// connects in plaintext, so the caller connects itself.
pub fn spawn_tls(dir: &Path, mutual: bool) -> (Running, String) {
    let mut args = vec!["--store".to_owned(), "memory".to_owned()];
    args.extend(tls_args(dir, mutual));
    let (child, addr) = super::spawn(&args, &[]);
    (Running(child), addr)
}

/// The TLS settings for the certificates `mint_certs.py` wrote into `dir`.
pub fn tls_args(dir: &Path, mutual: bool) -> Vec<String> {
    let path = |name: &str| dir.join(name).display().to_string();
    let mut args = vec![
        "--tls-cert-file".to_owned(),
        path("server.pem"),
        "--tls-key-file".to_owned(),
        path("server.key"),
    ];
    if mutual {
        args.extend(["--tls-client-ca-file".to_owned(), path("ca.pem")]);
    }
    args
}
