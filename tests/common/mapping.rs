//! Customer → tenant mapping helpers shared by the mapping tests on both backends.
use super::{Sidecar, admin};
use coresdk::proto::{ResolveCustomerRequest, UnmapCustomerRequest};

pub async fn resolve(sidecar: &Sidecar, customer: &str) -> Result<String, tonic::Status> {
    sidecar
        .tenants()
        .resolve_customer(admin(ResolveCustomerRequest {
            customer_id: customer.into(),
        }))
        .await
        .map(|r| r.into_inner().tenant_id)
}

pub async fn tenant_of(sidecar: &Sidecar, customer: &str) -> String {
    resolve(sidecar, customer).await.expect("ResolveCustomer")
}

/// Whether the customer had a mapping to remove.
pub async fn unmap(sidecar: &Sidecar, customer: &str) -> bool {
    sidecar
        .tenants()
        .unmap_customer(admin(UnmapCustomerRequest {
            customer_id: customer.into(),
            actor: "ops@example.com".into(),
            reason: "offboarded".into(),
        }))
        .await
        .expect("UnmapCustomer")
        .into_inner()
        .removed
}
