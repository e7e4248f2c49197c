use tonic::{Request, Response, Status};

use super::{SharedState, required_text, validate_reason};
use crate::ops::{self, AdminChange};
use crate::problem::Error;
use crate::proto::{self, tenant_service_server::TenantService};

pub struct TenantApi {
    pub state: SharedState,
}

#[tonic::async_trait]
impl TenantService for TenantApi {
    async fn map_customer(
        &self,
        request: Request<proto::MapCustomerRequest>,
    ) -> Result<Response<proto::CustomerMapping>, Status> {
        let state = &self.state;
        state.admin_only(&request)?;
        let request = request.into_inner();
        ops::validate_id("customer_id", &request.customer_id)
            .and_then(|()| ops::validate_id("tenant_id", &request.tenant_id))
            .and_then(|()| required_text("actor", &request.actor, 256))
            .and_then(|()| validate_reason(&request.reason))
            .map_err(|e| state.status(&e))?;
        let answer = proto::CustomerMapping {
            customer_id: request.customer_id.clone(),
            tenant_id: request.tenant_id.clone(),
        };
        state
            .store
            .write(move |tx| {
                ops::map_customer(
                    tx,
                    &request.customer_id,
                    &request.tenant_id,
                    &AdminChange {
                        actor: &request.actor,
                        reason: &request.reason,
                    },
                    crate::time::now_ms(),
                )
            })
            .await
            .map_err(|e| state.status(&e))?;
        Ok(Response::new(answer))
    }

    async fn unmap_customer(
        &self,
        request: Request<proto::UnmapCustomerRequest>,
    ) -> Result<Response<proto::UnmapCustomerResponse>, Status> {
        let state = &self.state;
        state.admin_only(&request)?;
        let request = request.into_inner();
        ops::validate_id("customer_id", &request.customer_id)
            .and_then(|()| required_text("actor", &request.actor, 256))
            .and_then(|()| validate_reason(&request.reason))
            .map_err(|e| state.status(&e))?;
        let previous = state
            .store
            .write(move |tx| {
                ops::unmap_customer(
                    tx,
                    &request.customer_id,
                    &AdminChange {
                        actor: &request.actor,
                        reason: &request.reason,
                    },
                    crate::time::now_ms(),
                )
            })
            .await
            .map_err(|e| state.status(&e))?;
        Ok(Response::new(proto::UnmapCustomerResponse {
            removed: previous.is_some(),
            previous_tenant_id: previous.unwrap_or_default(),
        }))
    }

    async fn resolve_customer(
        &self,
        request: Request<proto::ResolveCustomerRequest>,
    ) -> Result<Response<proto::CustomerMapping>, Status> {
        let state = &self.state;
        state.admin_only(&request)?;
        let customer_id = request.into_inner().customer_id;
        ops::validate_id("customer_id", &customer_id).map_err(|e| state.status(&e))?;
        let lookup = customer_id.clone();
        let tenant = state
            .store
            .read(move |tx| Ok(tx.tenant_of_customer(&lookup)?))
            .await
            .map_err(|e| state.status(&e))?;
        match tenant {
            Some(tenant_id) => Ok(Response::new(proto::CustomerMapping {
                customer_id,
                tenant_id,
            })),
            None => Err(state.status(&Error::CustomerNotFound(customer_id))),
        }
    }
}
