//! Helpers of the C2SP checkpoint tests: full verification, online and offline.
use super::{Sidecar, admin, binary};
use coresdk::proto::VerifyAuditRequest;

/// `coresdk audit verify --full --store …`: every record from the first.
pub fn offline_verify_full(store: &str) -> std::process::Output {
    std::process::Command::new(binary())
        .args(["audit", "verify", "--full", "--store", store])
        .output()
        .expect("runs")
}

/// `Verify` with `full`: every record from the first.
pub async fn verify_full(sidecar: &Sidecar) -> coresdk::proto::VerifyAuditResponse {
    sidecar
        .audit()
        .verify(admin(VerifyAuditRequest { full: true }))
        .await
        .expect("Verify")
        .into_inner()
}
