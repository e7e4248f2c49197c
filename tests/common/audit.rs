//! Audit and tenant helpers shared by the audit tests.
use super::{Sidecar, admin, binary};
use coresdk::proto::VerifyAuditRequest;

/// `MapCustomer`; answers how many parked events the mapping applied.
pub async fn map(sidecar: &Sidecar, customer: &str, tenant: &str) -> u64 {
    sidecar
        .tenants()
        .map_customer(admin(coresdk::proto::MapCustomerRequest {
            customer_id: customer.into(),
            tenant_id: tenant.into(),
            actor: "test".into(),
            reason: String::new(),
        }))
        .await
        .expect("MapCustomer")
        .into_inner()
        .parked_events_applied
}

/// `coresdk audit verify --store …`, as an operator would run it.
pub fn offline_verify(store: &str) -> std::process::Output {
    std::process::Command::new(binary())
        .args(["audit", "verify", "--store", store])
        .output()
        .expect("runs")
}

/// Appends `count` application events (`app.event.{i}`, tenant `acme`), some at once.
pub async fn append_app_events(sidecar: &Sidecar, count: usize) {
    const AT_ONCE: usize = 50;
    let mut appends = tokio::task::JoinSet::new();
    for i in 0..count {
        if appends.len() == AT_ONCE {
            appends
                .join_next()
                .await
                .expect("an append")
                .expect("joined");
        }
        let mut audit = sidecar.audit();
        appends.spawn(async move {
            audit
                .append(coresdk::proto::AppendAuditRequest {
                    include_proof: false,
                    tenant_id: "acme".into(),
                    actor: "app".into(),
                    event: format!("app.event.{i}"),
                    outcome: "success".into(),
                    metadata: None,
                    idempotency_key: String::new(),
                })
                .await
                .expect("Append");
        });
    }
    while let Some(append) = appends.join_next().await {
        append.expect("joined");
    }
}

pub async fn verify(sidecar: &Sidecar) -> coresdk::proto::VerifyAuditResponse {
    sidecar
        .audit()
        .verify(admin(VerifyAuditRequest::default()))
        .await
        .expect("Verify")
        .into_inner()
}
