//! Access decisions: who the caller is (a verified token or a tenant the app vouches for),
//! which flags the request needs, and the denial (with its RFC 9457 problem) when it may not
//! go on. Everything here decides from memory; auditing a denial is the caller's write.

pub mod token;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Map, json};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::audit::{self, NewAuditRecord};
use crate::flags::FlagCache;
pub use crate::problem::Denial;
use crate::problem::Error;
use crate::rules::is_valid_flag_key;
pub use token::{Claims, TokenError, TokenVerifier};

/// What access decisions (and clients) do when flags cannot be known.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FailMode {
    Open,
    Closed,
}

/// Flags one request may name at most.
const MAX_FLAGS: usize = 32;
/// Longest `resource` accepted; it lands in the audit trail and the problem's `instance`.
const MAX_RESOURCE_LEN: usize = 256;

/// Comparing digests keeps the comparison constant-time whatever the lengths.
pub fn tokens_match(presented: &str, expected: &str) -> bool {
    Sha256::digest(presented.trim().as_bytes())
        .ct_eq(&Sha256::digest(expected.as_bytes()))
        .into()
}

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
    match flags.iter().find(|f| !is_valid_flag_key(f)) {
        Some(bad) => Err(Error::invalid(
            field,
            format!("'{bad}' is not a valid flag key"),
        )),
        None => Ok(()),
    }
}

impl AccessRequest {
    pub fn validate(&self) -> Result<(), Error> {
        if self.token.trim().is_empty() && self.tenant_id.is_empty() {
            return Err(Error::invalid("token", "give a token or a tenant_id"));
        }
        if !self.tenant_id.is_empty() {
            crate::ops::validate_id("tenant_id", &self.tenant_id)?;
        }
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

/// Decides access: token, tenant, flags, fail mode; and which denials are worth an audit record.
pub struct Authorizer {
    tokens: Arc<TokenVerifier>,
    fail_mode: FailMode,
    coalescer: DenialCoalescer,
    fail_mode_decisions: FailModeCounter,
}

impl Authorizer {
    pub fn new(
        tokens: Arc<TokenVerifier>,
        fail_mode: FailMode,
        deny_audit_window: Duration,
    ) -> Self {
        Self {
            tokens,
            fail_mode,
            coalescer: DenialCoalescer::new(deny_audit_window),
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

    /// The `auth.denied` record for a denial, unless an identical one was audited moments ago.
    pub fn denial_record(
        &self,
        access: &Access,
        resource: &str,
        now: Instant,
    ) -> Option<NewAuditRecord> {
        let denial = access.denial.as_ref()?;
        let (tenant, subject) = (access.tenant_id.as_str(), access.subject.as_str());
        let suppressed = self.coalescer.admit(tenant, subject, denial, now)?;
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
        if suppressed > 0 {
            metadata.insert("suppressed_before".into(), json!(suppressed));
        }
        Some(NewAuditRecord {
            tenant_id: tenant.to_owned(),
            actor: if subject.is_empty() {
                "anonymous".to_owned()
            } else {
                subject.to_owned()
            },
            event: "auth.denied".to_owned(),
            outcome: "denied".to_owned(),
            metadata: audit::bound_metadata(metadata),
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub denial: Option<Denial>,
    pub fail_mode_applied: bool,
}

/// Decides from the flag cache alone (no I/O). When the cache cannot vouch for the tenant's
/// flags, the fail mode decides and says so.
pub fn decide(
    cache: &FlagCache,
    fail_mode: FailMode,
    tenant: &str,
    required: &[String],
    deny_if: &[String],
) -> Decision {
    if !cache.can_answer_for(tenant) {
        return Decision {
            denial: match fail_mode {
                FailMode::Open => None,
                FailMode::Closed => Some(Denial::Unavailable),
            },
            fail_mode_applied: true,
        };
    }
    let is_on = |key: &str| cache.is_on(tenant, key);
    let denial = deny_if
        .iter()
        .find(|flag| is_on(flag))
        .map(|flag| Denial::PaymentRequired { flag: flag.clone() })
        .or_else(|| {
            required
                .iter()
                .find(|feature| !is_on(feature))
                .map(|feature| Denial::FeatureLocked {
                    feature: feature.clone(),
                })
        });
    Decision {
        denial,
        fail_mode_applied: false,
    }
}

/// Keeps a flood of identical denials from growing the audit trail without bound: the first
/// denial for a (tenant, subject, reason, feature) in a window is audited, the rest of that
/// window are counted and reported on the next audited one as `suppressed_before`.
pub struct DenialCoalescer {
    window: Duration,
    /// (tenant, subject, reason, feature) → (window start, denials suppressed in it).
    seen: Mutex<HashMap<DenialKey, (Instant, u64)>>,
}

type DenialKey = (String, String, &'static str, String);

/// Entries kept at most before expired ones are pruned.
const COALESCE_PRUNE_AT: usize = 10_000;

impl DenialCoalescer {
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// `Some(suppressed since the last audited one)` when this denial should be audited.
    pub fn admit(&self, tenant: &str, subject: &str, denial: &Denial, now: Instant) -> Option<u64> {
        let Ok(mut seen) = self.seen.lock() else {
            return Some(0);
        };
        if seen.len() >= COALESCE_PRUNE_AT {
            let window = self.window;
            seen.retain(|_, (since, _)| now.duration_since(*since) < window);
        }
        let key = (
            tenant.to_owned(),
            subject.to_owned(),
            denial.reason(),
            denial.feature().to_owned(),
        );
        match seen.get_mut(&key) {
            Some((since, suppressed)) if now.duration_since(*since) < self.window => {
                *suppressed += 1;
                None
            }
            Some((since, suppressed)) => {
                let reported = *suppressed;
                *since = now;
                *suppressed = 0;
                Some(reported)
            }
            None => {
                seen.insert(key, (now, 0));
                Some(0)
            }
        }
    }
}

/// Counts decisions the fail mode made, for logs and the answer.
#[derive(Default)]
pub struct FailModeCounter(AtomicU64);

impl FailModeCounter {
    pub fn record(&self) -> u64 {
        self.0.fetch_add(1, Ordering::Relaxed) + 1
    }

    pub fn count(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flags::FlagValue;
    use std::collections::BTreeMap;

    fn cache() -> FlagCache {
        FlagCache::new(BTreeMap::from([
            ("pro_features".to_owned(), FlagValue::Bool(false)),
            ("paywall_active".to_owned(), FlagValue::Bool(false)),
        ]))
    }

    #[test]
    fn fail_mode_decides_when_flags_are_unavailable() {
        let cache = cache();
        cache.set_degraded(true);
        let open = decide(&cache, FailMode::Open, "t", &["pro_features".into()], &[]);
        assert_eq!(
            open,
            Decision {
                denial: None,
                fail_mode_applied: true
            }
        );
        let closed = decide(&cache, FailMode::Closed, "t", &["pro_features".into()], &[]);
        assert_eq!(
            closed,
            Decision {
                denial: Some(Denial::Unavailable),
                fail_mode_applied: true
            }
        );
        cache.set_degraded(false);
        let normal = decide(&cache, FailMode::Closed, "t", &["pro_features".into()], &[]);
        assert_eq!(
            normal.denial,
            Some(Denial::FeatureLocked {
                feature: "pro_features".into()
            })
        );
        assert!(!normal.fail_mode_applied);
    }

    #[test]
    fn coalesces_identical_denials_within_a_window() {
        let coalescer = DenialCoalescer::new(Duration::from_secs(60));
        let denial = Denial::FeatureLocked {
            feature: "x".into(),
        };
        let start = Instant::now();
        assert_eq!(coalescer.admit("t", "u", &denial, start), Some(0));
        for i in 1..=5 {
            assert_eq!(
                coalescer.admit("t", "u", &denial, start + Duration::from_secs(i)),
                None
            );
        }
        assert_eq!(
            coalescer.admit("t", "other", &denial, start),
            Some(0),
            "another subject is its own key"
        );
        assert_eq!(
            coalescer.admit("t", "u", &denial, start + Duration::from_secs(61)),
            Some(5)
        );
    }

    const SECRET: &[u8] = b"unit-test-secret-that-is-32-bytes-long";

    fn authorizer(fail_mode: FailMode) -> Authorizer {
        let tokens = TokenVerifier::new(token::TokenSettings {
            hmac_secrets: vec![SECRET.to_vec()],
            public_key_pem: None,
            jwks_file: None,
            issuer: None,
            audience: Vec::new(),
            tenant_claim: "tenant_id".into(),
            leeway_s: 0,
        })
        .expect("valid settings");
        Authorizer::new(Arc::new(tokens), fail_mode, Duration::from_secs(60))
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
        let record = authorizer
            .denial_record(&access, &request.resource, Instant::now())
            .expect("the first denial is audited");
        assert_eq!(
            (record.event.as_str(), record.actor.as_str()),
            ("auth.denied", "u1")
        );
        assert_eq!(record.metadata["resource"], "GET /api/analytics");
        assert!(
            authorizer
                .denial_record(&access, &request.resource, Instant::now())
                .is_none(),
            "an identical denial moments later is coalesced"
        );

        cache.apply(crate::flags::FlagRecord {
            tenant_id: "acme".into(),
            key: "pro_features".into(),
            value: FlagValue::Bool(true),
            version: 1,
            event_created: 0,
            origin: crate::flags::FlagOrigin::Rule,
            updated_at_ms: 0,
            updated_by: "test".into(),
            source_event_id: String::new(),
        });
        let allowed = authorizer.authorize(&cache, &request).expect("valid");
        assert_eq!(allowed.denial, None);
        assert!(
            authorizer
                .denial_record(&allowed, "", Instant::now())
                .is_none()
        );
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
