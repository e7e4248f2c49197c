//! The sidecar under test: started from the release binary beside this one, with its store in
//! a temporary directory, and stopped with SIGTERM when dropped.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

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
    /// The side listeners it announced, by name (`flagd`, `flagd-sync`, `ofrep`, `ops`); an
    /// older sidecar has none.
    pub sides: HashMap<String, String>,
    _dir: tempfile::TempDir,
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
    start_sidecar_with(binary, store, &[])
}

/// [`start_sidecar`] with more environment (`envs` last, so they win).
pub fn start_sidecar_with(
    binary: PathBuf,
    store: Option<&str>,
    envs: &[(&str, &str)],
) -> Result<Sidecar, Box<dyn std::error::Error>> {
    use std::io::{BufRead, BufReader};
    if !binary.exists() {
        return Err(format!(
            "{} not found: build it first with `cargo build --release --workspace`",
            binary.display()
        )
        .into());
    }
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
        // Several sidecars may run at once: each OpenFeature listener takes an ephemeral port
        // (through the environment, which an older sidecar without them ignores).
        .env("CORESDK_FLAGD_LISTEN", "127.0.0.1:0")
        .env("CORESDK_FLAGD_SYNC_LISTEN", "127.0.0.1:0")
        .env("CORESDK_OFREP_LISTEN", "127.0.0.1:0")
        // Metrics on, as by default; the admin token loads the tenants the scrape is timed with.
        .env("CORESDK_OPS_LISTEN", "127.0.0.1:0")
        .env("CORESDK_ADMIN_TOKEN", crate::ADMIN_TOKEN)
        // Stopped when dropped: no load balancer to wait for.
        .env("CORESDK_SHUTDOWN_DELAY_S", "0")
        .envs(envs.iter().copied())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let (lines_tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            // Nobody listens any more once the addresses are known: keep draining.
            let _ = lines_tx.send(line);
        }
    });
    let addr = loop {
        match lines.recv_timeout(Duration::from_secs(60)) {
            Ok(line) => {
                if let Some(addr) = line.strip_prefix("coresdk listening on ") {
                    break addr.to_owned();
                }
            }
            Err(_) => return Err("the sidecar exited (or hung) before listening".into()),
        }
    };
    // The side listeners' lines follow the main one at once, when the sidecar has them.
    let mut sides = HashMap::new();
    while let Ok(line) = lines.recv_timeout(Duration::from_millis(300)) {
        if let Some((name, side)) = line
            .strip_prefix("coresdk ")
            .and_then(|rest| rest.split_once(" listening on "))
        {
            sides.insert(name.to_owned(), side.to_owned());
        }
    }
    Ok(Sidecar {
        child,
        addr,
        sides,
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

/// CPU seconds (user + system) a process has used so far, from /proc.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces: the fields that follow start after its `)`.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after `)`.
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / clock_ticks_per_second())
}

/// `getconf CLK_TCK`: 100 on every Linux the bench will meet, asked once anyway.
fn clock_ticks_per_second() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|out| String::from_utf8(out.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}
