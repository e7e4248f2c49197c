use tonic::{Request, Response, Status};

use super::SharedState;
use crate::ops::{self, WebhookResult};
use crate::problem::Error;
use crate::proto::{self, webhook_service_server::WebhookService};
use crate::store::Outcome;
use crate::stripe::StripeEvent;

pub struct WebhookApi {
    pub state: SharedState,
}

fn outcome_to_proto(outcome: Outcome) -> proto::WebhookOutcome {
    match outcome {
        Outcome::Applied => proto::WebhookOutcome::Applied,
        Outcome::Duplicate => proto::WebhookOutcome::Duplicate,
        Outcome::Stale => proto::WebhookOutcome::Stale,
        Outcome::Ignored => proto::WebhookOutcome::Ignored,
    }
}

fn to_proto(result: WebhookResult) -> proto::HandleStripeWebhookResponse {
    proto::HandleStripeWebhookResponse {
        event_id: result.event_id,
        event_type: result.event_type,
        tenant_id: result.tenant_id,
        outcome: outcome_to_proto(result.outcome) as i32,
        flag_changes: result
            .flag_changes
            .into_iter()
            .map(|c| proto::FlagChange {
                key: c.key,
                old_value: c.old_value.map(|v| v.to_proto()),
                new_value: Some(c.new_value.to_proto()),
                version: c.version,
            })
            .collect(),
        audit_seq: result.audit_seq,
        stale_flags: result.stale_flags,
    }
}

impl WebhookApi {
    async fn handle(
        &self,
        request: proto::HandleStripeWebhookRequest,
    ) -> Result<WebhookResult, Error> {
        let config = &self.state.config;
        let payload_len = request.payload.len();
        let verified = if payload_len > config.webhook_max_body_bytes {
            Err(Error::PayloadTooLarge {
                size: payload_len,
                limit: config.webhook_max_body_bytes,
            })
        } else {
            config
                .verifier
                .verify(
                    &request.payload,
                    &request.signature_header,
                    crate::time::now_s(),
                )
                .and_then(|signed_at| StripeEvent::parse(&request.payload, signed_at))
        };
        let event = match verified {
            Ok(event) => event,
            Err(refusal) => return Err(self.refuse(refusal, &request.payload).await),
        };
        let rules = config.rules.clone();
        let event_id = event.id.clone();
        let answer = self
            .state
            .store
            .write(move |tx| ops::apply_webhook(tx, &rules, &event, crate::time::now_ms()))
            .await;
        match &answer {
            Ok(Ok(result)) => tracing::info!(
                event_id = %result.event_id,
                event_type = %result.event_type,
                tenant = %result.tenant_id,
                outcome = result.outcome.as_str(),
                changes = result.flag_changes.len(),
                "webhook"
            ),
            Ok(Err(refusal)) => tracing::warn!(%event_id, error = %refusal, "webhook refused"),
            Err(failure) => {
                tracing::error!(%event_id, error = %failure, "webhook not committed; Stripe will retry")
            }
        }
        answer?
    }

    /// Records a refused delivery in the audit trail, then returns the refusal.
    async fn refuse(&self, refusal: Error, payload: &[u8]) -> Error {
        tracing::warn!(error = %refusal, bytes = payload.len(), "webhook refused");
        if matches!(refusal, Error::WebhookSecretMissing) {
            return refusal;
        }
        // The claimed id helps find a forged or replayed event; it is only ever a claim.
        let hint = if payload.len() <= self.state.config.webhook_max_body_bytes {
            serde_json::from_slice::<serde_json::Value>(payload)
                .ok()
                .and_then(|v| {
                    let id = v.get("id")?.as_str()?.chars().take(255).collect::<String>();
                    let kind = v
                        .get("type")?
                        .as_str()?
                        .chars()
                        .take(255)
                        .collect::<String>();
                    Some((id, kind))
                })
        } else {
            None
        };
        let reason = refusal.mapping().reason;
        let detail = refusal.to_string();
        let len = payload.len();
        let audited = self
            .state
            .store
            .write(move |tx| {
                ops::audit_refused_delivery(
                    tx,
                    reason,
                    &detail,
                    len,
                    hint.as_ref().map(|(i, t)| (i.as_str(), t.as_str())),
                    crate::time::now_ms(),
                )
            })
            .await;
        if let Err(e) = audited {
            tracing::error!(error = %e, "could not audit a refused webhook");
        }
        refusal
    }
}

#[tonic::async_trait]
impl WebhookService for WebhookApi {
    async fn handle_stripe_webhook(
        &self,
        request: Request<proto::HandleStripeWebhookRequest>,
    ) -> Result<Response<proto::HandleStripeWebhookResponse>, Status> {
        self.handle(request.into_inner())
            .await
            .map(|r| Response::new(to_proto(r)))
            .map_err(|e| self.state.status(&e))
    }
}
