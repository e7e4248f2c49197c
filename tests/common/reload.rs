//! Helpers of the tests of files the sidecar re-reads when they change.
use std::path::Path;
use std::time::{Duration, Instant};

/// Longer than the sidecar's one-second check of its watched files, with room for a slow box.
pub const SETTLE: Duration = Duration::from_millis(2500);
pub const WAIT_AT_MOST: Duration = Duration::from_secs(15);

/// Replaces `path` as a Kubernetes secret volume does: a new file renamed over the old.
pub fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

/// Waits until `check` holds, for at most [`WAIT_AT_MOST`].
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !check().await {
        assert!(start.elapsed() < WAIT_AT_MOST, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
