//! Sidecars whose log a test reads: what the sidecar did, counted rather than timed.
use std::path::{Path, PathBuf};

use super::{Options, Sidecar, on_disk, spawn_with_stderr};

/// A sidecar on a SQLite file in `dir`, logging at debug level to `dir/coresdk.log`.
pub async fn on_disk_logging(dir: &Path, options: Options) -> (Sidecar, PathBuf) {
    let mut options = on_disk(dir, options);
    options
        .envs
        .push(("CORESDK_LOG".into(), "coresdk=debug".into()));
    let log = dir.join("coresdk.log");
    let file = std::fs::File::create(&log).expect("a log file");
    let (child, addr) = spawn_with_stderr(&options.args, &options.envs, file.into());
    let mut sidecar = Sidecar::started(child, addr, options).await;
    sidecar.data_dir = Some(dir.to_owned());
    (sidecar, log)
}

/// How many lines of the log at `log` contain `message`.
pub fn logged(log: &Path, message: &str) -> usize {
    std::fs::read_to_string(log)
        .expect("the log is readable")
        .lines()
        .filter(|line| line.contains(message))
        .count()
}
