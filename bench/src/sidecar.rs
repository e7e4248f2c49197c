//! The sidecar under test: started from the release binary beside this one, with its store in
//! a temporary directory, and stopped with SIGTERM when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::{JWT_SECRET, SECRET, TENANTS};

/// The sidecar to start: `given`, or `coresdk` in this binary's directory (`target/release/`,
/// where the workspace builds both).
pub fn sidecar_binary(given: Option<&Path>) -> Result<PathBuf, Box<dyn std::error::Error>> {
    Ok(match given {
        Some(path) => path.to_owned(),
        None => std::env::current_exe()?
            .parent()
            .ok_or("no binary directory")?
            .join("coresdk"),
    })
}

pub struct Sidecar {
    pub child: Child,
    pub addr: String,
    /// Its OFREP listener; `None` for a sidecar built before OFREP.
    pub ofrep: Option<String>,
    _dir: tempfile::TempDir,
}

/// Whether `binary` serves OFREP: asked of its `serve --help`, so an older binary is known
/// before it starts rather than by waiting for a line it never prints.
fn serves_ofrep(binary: &Path) -> bool {
    Command::new(binary)
        .args(["serve", "--help"])
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains("--ofrep-listen"))
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

pub fn start_sidecar(
    binary: PathBuf,
    store: Option<&str>,
) -> Result<Sidecar, Box<dyn std::error::Error>> {
    use std::io::{BufRead, BufReader};
    if !binary.exists() {
        return Err(format!(
            "{} not found: build it first with `cargo build --release --workspace`",
            binary.display()
        )
        .into());
    }
    let ofrep = serves_ofrep(&binary);
    let dir = tempfile::tempdir()?;
    let tenants: serde_json::Map<String, serde_json::Value> = (0..TENANTS)
        .map(|i| (format!("cus_bench_{i}"), format!("tenant-{i}").into()))
        .collect();
    let tenants_file = dir.path().join("tenants.json");
    std::fs::write(
        &tenants_file,
        serde_json::Value::Object(tenants).to_string(),
    )?;
    let mut child = Command::new(&binary)
        .args(["serve", "--listen", "127.0.0.1:0", "--store"])
        .arg(
            store
                .map(str::to_owned)
                .unwrap_or_else(|| format!("sqlite://{}", dir.path().join("coresdk.db").display())),
        )
        .arg("--tenants-file")
        .arg(&tenants_file)
        .env("STRIPE_WEBHOOK_SECRET", SECRET)
        .env("CORESDK_JWT_SECRET", JWT_SECRET)
        .env("CORESDK_LOG", "error")
        // Several sidecars may run at once: none takes an OpenFeature protocol's fixed port.
        .env("CORESDK_FLAGD_LISTEN", "off")
        .env("CORESDK_FLAGD_SYNC_LISTEN", "off")
        .env(
            "CORESDK_OFREP_LISTEN",
            if ofrep { "127.0.0.1:0" } else { "off" },
        )
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let mut address = |prefix: &str| loop {
        match lines.next() {
            Some(Ok(line)) => {
                if let Some(addr) = line.strip_prefix(prefix) {
                    break Ok(addr.to_owned());
                }
            }
            _ => break Err("the sidecar exited before listening"),
        }
    };
    let addr = address("coresdk listening on ")?;
    // Its line follows the main one.
    let ofrep = match ofrep {
        true => Some(address("coresdk ofrep listening on ")?),
        false => None,
    };
    std::thread::spawn(move || for _ in lines {});
    Ok(Sidecar {
        child,
        addr,
        ofrep,
        _dir: dir,
    })
}

/// Resident set size of a process, from /proc.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// CPU time a process has used (user + system), from /proc; Linux counts it in USER_HZ,
/// which is 100 on every architecture it supports.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces: the fields counted start after its closing paren.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i)?.parse::<u64>().ok();
    Some((ticks(11)? + ticks(12)?) as f64 / 100.0)
}
