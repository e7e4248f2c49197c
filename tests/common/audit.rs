//! Audit and tenant helpers shared by the audit tests.
use super::{Sidecar, admin, binary};
use coresdk::proto::VerifyAuditRequest;

pub async fn map(sidecar: &Sidecar, customer: &str, tenant: &str) {
    sidecar
        .tenants()
        .map_customer(admin(coresdk::proto::MapCustomerRequest {
            customer_id: customer.into(),
            tenant_id: tenant.into(),
            actor: "test".into(),
            reason: String::new(),
        }))
        .await
        .expect("MapCustomer");
}

/// `coresdk audit verify --store …`, as an operator would run it.
pub fn offline_verify(store: &str) -> std::process::Output {
    std::process::Command::new(binary())
        .args(["audit", "verify", "--store", store])
        .output()
        .expect("runs")
}

pub async fn verify(sidecar: &Sidecar) -> coresdk::proto::VerifyAuditResponse {
    sidecar
        .audit()
        .verify(admin(VerifyAuditRequest {}))
        .await
        .expect("Verify")
        .into_inner()
}
