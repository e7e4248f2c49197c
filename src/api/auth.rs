use std::time::Instant;

use serde_json::json;
use tonic::{Request, Response, Status};

use super::SharedState;
use crate::audit::{self, NewAuditRecord};
use crate::auth::{Claims, Denial, TokenError, decide};
use crate::ops;
use crate::problem::Error;
use crate::proto::{self, auth_service_server::AuthService};
use crate::rules::is_valid_flag_key;

pub struct AuthApi {
    pub state: SharedState,
}

/// Flags one request may name at most.
const MAX_FLAGS: usize = 32;

fn claims_to_proto(claims: &Claims) -> proto::Claims {
    proto::Claims {
        subject: claims.subject.clone(),
        tenant_id: claims.tenant_id.clone(),
        roles: claims.roles.clone(),
        scopes: claims.scopes.clone(),
        issued_at: claims
            .issued_at
            .map(|s| crate::time::timestamp_from_ms(s.saturating_mul(1000))),
        expires_at: claims
            .expires_at
            .map(|s| crate::time::timestamp_from_ms(s.saturating_mul(1000))),
        issuer: claims.issuer.clone(),
        audience: claims.audience.clone(),
        claims: Some(crate::json::to_proto_struct(&claims.all)),
    }
}

fn token_status(state: &SharedState, error: &TokenError) -> Status {
    let denial = Denial::Unauthenticated(error.to_string());
    let problem = denial.problem(&state.config.problem_links, "", "");
    crate::problem::status_with_problem(
        tonic::Code::Unauthenticated,
        "UNAUTHENTICATED",
        &problem,
        &[],
    )
}

fn validate_flag_list(field: &'static str, flags: &[String]) -> Result<(), Error> {
    if flags.len() > MAX_FLAGS {
        return Err(Error::invalid(
            field,
            format!("names more than {MAX_FLAGS} flags"),
        ));
    }
    match flags.iter().find(|f| !is_valid_flag_key(f)) {
        Some(bad) => Err(Error::invalid(
            field,
            format!("'{bad}' is not a valid flag key"),
        )),
        None => Ok(()),
    }
}

impl AuthApi {
    /// Audits a denial unless the coalescer says an identical one was audited moments ago.
    /// The write is not awaited: a denial is not something the caller needs acknowledged.
    fn audit_denial(&self, tenant: &str, subject: &str, resource: &str, denial: &Denial) {
        let Some(suppressed) =
            self.state
                .deny_coalescer
                .admit(tenant, subject, denial, Instant::now())
        else {
            return;
        };
        let mut metadata = serde_json::Map::new();
        metadata.insert("reason".into(), json!(denial.reason()));
        if !denial.feature().is_empty() {
            metadata.insert("feature".into(), json!(denial.feature()));
        }
        if !subject.is_empty() {
            metadata.insert("subject".into(), json!(subject));
        }
        if !resource.is_empty() {
            metadata.insert("resource".into(), json!(resource));
        }
        if let Denial::Unauthenticated(why) = denial {
            metadata.insert("detail".into(), json!(why));
        }
        if suppressed > 0 {
            metadata.insert("suppressed_before".into(), json!(suppressed));
        }
        let record = NewAuditRecord {
            tenant_id: tenant.to_owned(),
            actor: if subject.is_empty() {
                "anonymous".to_owned()
            } else {
                subject.to_owned()
            },
            event: "auth.denied".to_owned(),
            outcome: "denied".to_owned(),
            metadata: audit::bound_metadata(metadata),
        };
        let store = self.state.store.clone();
        tokio::spawn(async move {
            if let Err(e) = store
                .write(move |tx| tx.append_audit(record, crate::time::now_ms()))
                .await
            {
                tracing::error!(error = %e, "could not audit a denial");
            }
        });
    }
}

#[tonic::async_trait]
impl AuthService for AuthApi {
    async fn verify_token(
        &self,
        request: Request<proto::VerifyTokenRequest>,
    ) -> Result<Response<proto::Claims>, Status> {
        let token = request.into_inner().token;
        match self.state.tokens().verify(&token) {
            Ok(claims) => Ok(Response::new(claims_to_proto(&claims))),
            Err(e) => Err(token_status(&self.state, &e)),
        }
    }

    async fn authorize(
        &self,
        request: Request<proto::AuthorizeRequest>,
    ) -> Result<Response<proto::AuthorizeResponse>, Status> {
        let state = &self.state;
        let request = request.into_inner();
        if request.token.trim().is_empty() && request.tenant_id.is_empty() {
            return Err(state.status(&Error::invalid("token", "give a token or a tenant_id")));
        }
        if !request.tenant_id.is_empty() {
            ops::validate_id("tenant_id", &request.tenant_id).map_err(|e| state.status(&e))?;
        }
        validate_flag_list("required_features", &request.required_features)
            .and_then(|()| validate_flag_list("deny_if", &request.deny_if))
            .and_then(|()| {
                if request.resource.len() > 256 {
                    Err(Error::invalid("resource", "is longer than 256 bytes"))
                } else {
                    Ok(())
                }
            })
            .map_err(|e| state.status(&e))?;

        let links = &state.config.problem_links;
        let deny = |tenant: &str,
                    subject: &str,
                    claims: Option<proto::Claims>,
                    denial: Denial,
                    fail_mode_applied: bool| {
            self.audit_denial(tenant, subject, &request.resource, &denial);
            tracing::info!(tenant, subject, reason = denial.reason(), resource = %request.resource, "access denied");
            Response::new(proto::AuthorizeResponse {
                decision: proto::Decision::Deny as i32,
                problem: Some(denial.problem(links, tenant, &request.resource)),
                tenant_id: tenant.to_owned(),
                subject: subject.to_owned(),
                fail_mode_applied,
                claims,
            })
        };

        let (tenant, subject, claims) = if request.token.trim().is_empty() {
            (request.tenant_id.clone(), String::new(), None)
        } else {
            match state.tokens().verify(&request.token) {
                Ok(claims) => {
                    if claims.tenant_id.is_empty() {
                        let why = format!("it has no '{}' claim", state.config.tenant_claim);
                        return Ok(deny(
                            "",
                            &claims.subject,
                            None,
                            Denial::Unauthenticated(why),
                            false,
                        ));
                    }
                    let proto_claims = request.include_claims.then(|| claims_to_proto(&claims));
                    if !request.tenant_id.is_empty() && request.tenant_id != claims.tenant_id {
                        return Ok(deny(
                            &request.tenant_id,
                            &claims.subject,
                            proto_claims,
                            Denial::WrongTenant,
                            false,
                        ));
                    }
                    (
                        claims.tenant_id.clone(),
                        claims.subject.clone(),
                        proto_claims,
                    )
                }
                Err(e) => {
                    return Ok(deny(
                        &request.tenant_id,
                        "",
                        None,
                        Denial::Unauthenticated(e.to_string()),
                        false,
                    ));
                }
            }
        };

        let decision = decide(
            &state.feeds.flags,
            state.config.fail_mode,
            &tenant,
            &request.required_features,
            &request.deny_if,
        );
        if decision.fail_mode_applied {
            let total = state.fail_mode_decisions.record();
            tracing::warn!(tenant, total, mode = ?state.config.fail_mode, "access decided by fail mode: flags unavailable");
        }
        Ok(match decision.denial {
            Some(denial) => deny(
                &tenant,
                &subject,
                claims,
                denial,
                decision.fail_mode_applied,
            ),
            None => Response::new(proto::AuthorizeResponse {
                decision: proto::Decision::Allow as i32,
                problem: None,
                tenant_id: tenant,
                subject,
                fail_mode_applied: decision.fail_mode_applied,
                claims,
            }),
        })
    }
}
