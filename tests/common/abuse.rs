//! Reading the whole audit trail back, past the 1,000-record page.

use coresdk::proto::{AuditRecord, QueryAuditRequest};

use super::Sidecar;

/// Every record under `event_prefix` (all of them for ""), all pages.
pub async fn audit_records(sidecar: &Sidecar, event_prefix: &str) -> Vec<AuditRecord> {
    let mut all = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = sidecar
            .audit()
            .query(QueryAuditRequest {
                event_prefix: event_prefix.into(),
                page_size: 1000,
                page_token,
                ..Default::default()
            })
            .await
            .expect("Query")
            .into_inner();
        all.extend(page.records);
        if page.next_page_token.is_empty() {
            return all;
        }
        page_token = page.next_page_token;
    }
}

/// Log lines (JSON) a sidecar wrote to standard error so far.
#[derive(Clone, Default)]
pub struct LogLines(std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>);

impl LogLines {
    /// The lines whose message starts with `message`.
    pub fn with_message(&self, message: &str) -> Vec<serde_json::Value> {
        self.0
            .lock()
            .expect("log lines")
            .iter()
            .filter(|line| {
                line["fields"]["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with(message))
            })
            .cloned()
            .collect()
    }

    /// Waits (bounded) until a line with `message` shows, and returns those lines.
    pub async fn awaiting(&self, message: &str) -> Vec<serde_json::Value> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while self.with_message(message).is_empty() && std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        self.with_message(message)
    }
}

/// [`Sidecar::start`], logging JSON at `level` into the returned [`LogLines`] instead of the
/// test's standard error.
pub async fn start_logging(options: super::Options, level: &str) -> (Sidecar, LogLines) {
    use std::io::{BufRead, BufReader};
    let mut envs = options.envs.clone();
    envs.push(("CORESDK_LOG".into(), level.into()));
    envs.push(("CORESDK_LOG_FORMAT".into(), "json".into()));
    let (mut child, addr) =
        super::spawn_with_stderr(&options.args, &envs, std::process::Stdio::piped());
    let logs = LogLines::default();
    let stderr = child.stderr.take().expect("piped stderr");
    let kept = logs.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Ok(line) = serde_json::from_str(&line) {
                kept.0.lock().expect("log lines").push(line);
            }
        }
    });
    (Sidecar::started(child, addr, options).await, logs)
}
