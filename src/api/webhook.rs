use tonic::{Request, Response, Status};

use super::{SharedApp, bearer, convert, status};
use crate::proto::{self, webhook_service_server::WebhookService};

pub struct WebhookApi {
    pub app: SharedApp,
}

#[tonic::async_trait]
impl WebhookService for WebhookApi {
    async fn handle_stripe_webhook(
        &self,
        request: Request<proto::HandleStripeWebhookRequest>,
    ) -> Result<Response<proto::HandleStripeWebhookResponse>, Status> {
        let app = &self.app;
        let until =
            super::audit::proof_deadline(request.metadata(), app.config.limits.request_timeout);
        let request = request.into_inner();
        // Refused before the delivery is handled: a proof that can never come.
        if request.include_proof {
            app.checkpoints_on()
                .map_err(|e| status::of_error(&e, app.links()))?;
        }
        let result = app
            .handle_webhook(request.payload, &request.signature_header)
            .await
            .map_err(|e| status::of_error(&e, app.links()))?;
        let seq = result.audit_seq;
        let mut answer = convert::webhook_result(result);
        if request.include_proof {
            answer.inclusion_proof = super::audit::proof_if_any(app, seq, until).await;
        }
        Ok(Response::new(answer))
    }

    async fn replay_stripe_event(
        &self,
        request: Request<proto::ReplayStripeEventRequest>,
    ) -> Result<Response<proto::HandleStripeWebhookResponse>, Status> {
        let (metadata, _, request) = request.into_parts();
        self.app
            .replay_event(bearer(&metadata), request.payload, request.reason)
            .await
            .map(|result| Response::new(convert::webhook_result(result)))
            .map_err(|e| status::of_error(&e, self.app.links()))
    }
}
