use tonic::{Request, Response, Status};

use super::{SharedApp, bearer, status};
use crate::app::Admin;
use crate::proto::{self, tenant_service_server::TenantService};

pub struct TenantApi {
    pub app: SharedApp,
}

#[tonic::async_trait]
impl TenantService for TenantApi {
    async fn map_customer(
        &self,
        request: Request<proto::MapCustomerRequest>,
    ) -> Result<Response<proto::CustomerMapping>, Status> {
        let (metadata, _, request) = request.into_parts();
        let admin = Admin {
            bearer: bearer(&metadata),
            actor: &request.actor,
            reason: &request.reason,
        };
        let mapped = self
            .app
            .map_customer(
                admin,
                request.customer_id.clone(),
                request.tenant_id.clone(),
            )
            .await
            .map_err(|e| status::of_error(&e, self.app.links()))?;
        Ok(Response::new(proto::CustomerMapping {
            customer_id: request.customer_id,
            tenant_id: request.tenant_id,
            parked_events_applied: mapped.parked_applied,
        }))
    }

    async fn unmap_customer(
        &self,
        request: Request<proto::UnmapCustomerRequest>,
    ) -> Result<Response<proto::UnmapCustomerResponse>, Status> {
        let (metadata, _, request) = request.into_parts();
        let admin = Admin {
            bearer: bearer(&metadata),
            actor: &request.actor,
            reason: &request.reason,
        };
        let previous = self
            .app
            .unmap_customer(admin, request.customer_id.clone())
            .await
            .map_err(|e| status::of_error(&e, self.app.links()))?;
        Ok(Response::new(proto::UnmapCustomerResponse {
            removed: previous.is_some(),
            previous_tenant_id: previous.unwrap_or_default(),
        }))
    }

    async fn resolve_customer(
        &self,
        request: Request<proto::ResolveCustomerRequest>,
    ) -> Result<Response<proto::CustomerMapping>, Status> {
        let (metadata, _, request) = request.into_parts();
        let tenant_id = self
            .app
            .resolve_customer(bearer(&metadata), request.customer_id.clone())
            .await
            .map_err(|e| status::of_error(&e, self.app.links()))?;
        Ok(Response::new(proto::CustomerMapping {
            customer_id: request.customer_id,
            tenant_id,
            parked_events_applied: 0,
        }))
    }
}
