//! One access question answered: token → tenant → flags → decision, and which denials are
//! worth an audit record.

use std::sync::Arc;

use serde_json::{Map, json};

use super::{Claims, Denial, FailMode, FailModeCounter, TokenVerifier, decide};
use crate::audit::{self, NewAuditRecord};
use crate::flags::FlagCache;
use crate::problem::Error;

/// The actor of a denial whose caller's token named no subject.
pub const ANONYMOUS_ACTOR: &str = "anonymous";

/// Flags one request may name at most.
const MAX_FLAGS: usize = 32;
/// Longest `resource` accepted; it lands in the audit trail and the problem's `instance`.
const MAX_RESOURCE_LEN: usize = 256;
/// One access question, as a route handler asks it.
#[derive(Debug, Clone, Default)]
pub struct AccessRequest {
    /// A bearer token whose tenant claim names the tenant; empty when `tenant_id` is trusted.
    pub token: String,
    pub tenant_id: String,
    /// Flags that must be on (403 feature-locked otherwise).
    pub required_features: Vec<String>,
    /// Flags that deny when on (402 payment-required).
    pub deny_if: Vec<String>,
    /// What is being accessed, for the audit trail and the problem's `instance`.
    pub resource: String,
    pub include_claims: bool,
}

fn validate_flag_list(field: &'static str, flags: &[String]) -> Result<(), Error> {
    if flags.len() > MAX_FLAGS {
        return Err(Error::invalid(
            field,
            format!("names more than {MAX_FLAGS} flags"),
        ));
    }
    flags
        .iter()
        .try_for_each(|flag| crate::ops::validate_flag_key(field, flag))
}

impl AccessRequest {
    pub fn validate(&self) -> Result<(), Error> {
        if self.token.trim().is_empty() && self.tenant_id.is_empty() {
            return Err(Error::invalid("token", "give a token or a tenant_id"));
        }
        crate::ops::validate_optional_id("tenant_id", &self.tenant_id)?;
        validate_flag_list("required_features", &self.required_features)?;
        validate_flag_list("deny_if", &self.deny_if)?;
        if self.resource.len() > MAX_RESOURCE_LEN {
            return Err(Error::invalid(
                "resource",
                format!("is longer than {MAX_RESOURCE_LEN} bytes"),
            ));
        }
        Ok(())
    }
}

/// The answer to an [`AccessRequest`].
#[derive(Debug, Clone, PartialEq)]
pub struct Access {
    pub tenant_id: String,
    pub subject: String,
    /// The verified claims, when a token was given and `include_claims` asked for them.
    pub claims: Option<Arc<Claims>>,
    /// None: allowed.
    pub denial: Option<Denial>,
    /// The fail mode decided because the tenant's flags were unavailable.
    pub fail_mode_applied: bool,
}

/// What a denial's record shares with every denial coalesced with it (see `DenialKey`; the
/// tenant is the record's own field); its resource and detail belong to that one call.
pub const DENIAL_KEY_FIELDS: &[&str] = &["reason", "feature", "subject"];

/// The `auth.denied` record of `access`, denied for `denial`.
pub fn denial_record(access: &Access, denial: &Denial, resource: &str) -> NewAuditRecord {
    let (tenant, subject) = (access.tenant_id.as_str(), access.subject.as_str());
    let mut metadata = Map::new();
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
    NewAuditRecord {
        tenant_id: tenant.to_owned(),
        actor: if subject.is_empty() {
            ANONYMOUS_ACTOR.to_owned()
        } else {
            subject.to_owned()
        },
        event: "auth.denied".to_owned(),
        outcome: "denied".to_owned(),
        metadata: audit::bound_metadata(metadata),
    }
}

/// Decides access: token, tenant, flags, fail mode.
pub struct Authorizer {
    tokens: Arc<TokenVerifier>,
    fail_mode: FailMode,
    fail_mode_decisions: FailModeCounter,
}

impl Authorizer {
    pub fn new(tokens: Arc<TokenVerifier>, fail_mode: FailMode) -> Self {
        Self {
            tokens,
            fail_mode,
            fail_mode_decisions: FailModeCounter::default(),
        }
    }

    pub fn tokens(&self) -> &Arc<TokenVerifier> {
        &self.tokens
    }

    pub fn fail_mode_decisions(&self) -> u64 {
        self.fail_mode_decisions.count()
    }

    /// Validates the request, then decides from the token and the flag cache (no I/O).
    pub fn authorize(&self, cache: &FlagCache, request: &AccessRequest) -> Result<Access, Error> {
        request.validate()?;
        let denied = |tenant: &str, subject: &str, claims, denial| Access {
            tenant_id: tenant.to_owned(),
            subject: subject.to_owned(),
            claims,
            denial: Some(denial),
            fail_mode_applied: false,
        };
        let (tenant, subject, claims) = if request.token.trim().is_empty() {
            (request.tenant_id.clone(), String::new(), None)
        } else {
            match self.tokens.verify(&request.token) {
                Err(e) => {
                    return Ok(denied(
                        &request.tenant_id,
                        "",
                        None,
                        Denial::Unauthenticated(e.to_string()),
                    ));
                }
                Ok(claims) if claims.tenant_id.is_empty() => {
                    let why = format!("it has no '{}' claim", self.tokens.tenant_claim());
                    return Ok(denied(
                        "",
                        &claims.subject,
                        None,
                        Denial::Unauthenticated(why),
                    ));
                }
                Ok(claims) => {
                    let shown = request.include_claims.then(|| claims.clone());
                    if !request.tenant_id.is_empty() && request.tenant_id != claims.tenant_id {
                        return Ok(denied(
                            &request.tenant_id,
                            &claims.subject,
                            shown,
                            Denial::WrongTenant,
                        ));
                    }
                    (claims.tenant_id.clone(), claims.subject.clone(), shown)
                }
            }
        };
        let decision = decide(
            cache,
            self.fail_mode,
            &tenant,
            &request.required_features,
            &request.deny_if,
        );
        if decision.fail_mode_applied {
            let total = self.fail_mode_decisions.record();
            tracing::warn!(tenant, total, mode = ?self.fail_mode, "access decided by fail mode: flags unavailable");
        }
        Ok(Access {
            tenant_id: tenant,
            subject,
            claims,
            denial: decision.denial,
            fail_mode_applied: decision.fail_mode_applied,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::tests::cache;
    use crate::auth::{FailMode, token};
    use crate::flags::FlagValue;

    const SECRET: &[u8] = b"unit-test-secret-that-is-32-bytes-long";

    fn authorizer(fail_mode: FailMode) -> Authorizer {
        let tokens = TokenVerifier::new(token::TokenSettings {
            hmac_secrets: vec![SECRET.to_vec()],
            hmac_secret_file: None,
            public_key_file: None,
            jwks_file: None,
            issuer: None,
            audience: Vec::new(),
            tenant_claim: "tenant_id".into(),
            leeway_s: 0,
        })
        .expect("valid settings");
        Authorizer::new(Arc::new(tokens), fail_mode)
    }

    fn token(claims: serde_json::Value) -> String {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(SECRET),
        )
        .expect("encodes")
    }

    fn exp() -> i64 {
        crate::time::now_s() + 600
    }

    #[test]
    fn a_token_names_the_tenant_and_flags_decide() {
        let authorizer = authorizer(FailMode::Open);
        let cache = cache();
        let request = AccessRequest {
            token: format!(
                "Bearer {}",
                token(json!({"sub": "u1", "tenant_id": "acme", "exp": exp()}))
            ),
            required_features: vec!["pro_features".into()],
            deny_if: vec!["paywall_active".into()],
            resource: "GET /api/analytics".into(),
            include_claims: true,
            ..Default::default()
        };
        let access = authorizer.authorize(&cache, &request).expect("valid");
        assert_eq!(
            (access.tenant_id.as_str(), access.subject.as_str()),
            ("acme", "u1")
        );
        assert_eq!(
            access.denial,
            Some(Denial::FeatureLocked {
                feature: "pro_features".into()
            })
        );
        assert_eq!(
            access.claims.as_ref().map(|c| c.subject.as_str()),
            Some("u1")
        );
        let denial = access.denial.as_ref().expect("denied");
        let record = denial_record(&access, denial, &request.resource);
        assert_eq!(
            (record.event.as_str(), record.actor.as_str()),
            ("auth.denied", "u1")
        );
        assert_eq!(record.metadata["resource"], "GET /api/analytics");

        cache.apply(crate::flags::FlagRecord {
            tenant_id: "acme".into(),
            key: "pro_features".into(),
            value: FlagValue::Bool(true),
            version: 1,
            order: Default::default(),
            origin: crate::flags::FlagOrigin::Rule,
            updated_at_ms: 0,
            updated_by: "test".into(),
            source_event_id: String::new(),
        });
        let allowed = authorizer.authorize(&cache, &request).expect("valid");
        assert_eq!(allowed.denial, None);
    }

    #[test]
    fn bad_tokens_wrong_tenants_and_missing_claims_are_denied() {
        let authorizer = authorizer(FailMode::Open);
        let cache = cache();
        let ask = |token: String, tenant: &str| {
            authorizer
                .authorize(
                    &cache,
                    &AccessRequest {
                        token,
                        tenant_id: tenant.into(),
                        ..Default::default()
                    },
                )
                .expect("valid request")
        };
        let forged = ask("not.a.token".into(), "acme");
        assert!(matches!(forged.denial, Some(Denial::Unauthenticated(_))));
        assert_eq!(forged.tenant_id, "acme");
        let other = ask(
            token(json!({"sub": "u", "tenant_id": "globex", "exp": exp()})),
            "acme",
        );
        assert_eq!(other.denial, Some(Denial::WrongTenant));
        let tenantless = ask(token(json!({"sub": "u", "exp": exp()})), "");
        assert!(
            matches!(&tenantless.denial, Some(Denial::Unauthenticated(why)) if why.contains("tenant_id"))
        );
        // A trusted tenant id without a token is decided on its flags alone.
        let trusted = ask(String::new(), "acme");
        assert_eq!((trusted.denial, trusted.subject.as_str()), (None, ""));
    }

    #[test]
    fn requests_are_validated_before_anything_is_decided() {
        let authorizer = authorizer(FailMode::Open);
        let cache = cache();
        let refused = |request: AccessRequest| authorizer.authorize(&cache, &request).is_err();
        assert!(
            refused(AccessRequest::default()),
            "neither token nor tenant"
        );
        assert!(refused(AccessRequest {
            tenant_id: "has space".into(),
            ..Default::default()
        }));
        assert!(refused(AccessRequest {
            tenant_id: "acme".into(),
            required_features: vec!["bad key!".into()],
            ..Default::default()
        }));
        assert!(refused(AccessRequest {
            tenant_id: "acme".into(),
            deny_if: vec!["k".into(); MAX_FLAGS + 1],
            ..Default::default()
        }));
        assert!(refused(AccessRequest {
            tenant_id: "acme".into(),
            resource: "r".repeat(MAX_RESOURCE_LEN + 1),
            ..Default::default()
        }));
    }

    #[test]
    fn the_fail_mode_decides_and_is_counted() {
        let closed = authorizer(FailMode::Closed);
        let cache = cache();
        cache.set_degraded(true);
        let request = AccessRequest {
            tenant_id: "unknown-tenant".into(),
            ..Default::default()
        };
        let access = closed.authorize(&cache, &request).expect("valid");
        assert_eq!(access.denial, Some(Denial::Unavailable));
        assert!(access.fail_mode_applied);
        assert_eq!(closed.fail_mode_decisions(), 1);
    }
}
