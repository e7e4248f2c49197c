//! Access decisions: who the caller is (a verified token or a tenant the app vouches for),
//! which flags the request needs, and the RFC 9457 problem to return when it may not go on.

pub mod token;

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::config::FailMode;
use crate::flags::FlagCache;
use crate::proto;
pub use token::{Claims, TokenError, TokenVerifier};

/// Where problem documents point and which links they carry.
#[derive(Debug, Clone)]
pub struct ProblemLinks {
    pub type_base: String,
    pub billing_url: Option<String>,
    pub upgrade_url: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Denial {
    /// 401: no usable identity.
    Unauthenticated(String),
    /// 402: a billing flag says no (e.g. `paywall_active`).
    PaymentRequired { flag: String },
    /// 403: a required feature is off.
    FeatureLocked { feature: String },
    /// 403: the token belongs to another tenant than the one asked about.
    WrongTenant,
    /// 503: flags unavailable and fail mode `closed`.
    Unavailable,
}

impl Denial {
    pub fn reason(&self) -> &'static str {
        match self {
            Denial::Unauthenticated(_) => "UNAUTHENTICATED",
            Denial::PaymentRequired { .. } => "PAYMENT_REQUIRED",
            Denial::FeatureLocked { .. } => "FEATURE_LOCKED",
            Denial::WrongTenant => "WRONG_TENANT",
            Denial::Unavailable => "DECISION_UNAVAILABLE",
        }
    }

    pub fn feature(&self) -> &str {
        match self {
            Denial::PaymentRequired { flag } => flag,
            Denial::FeatureLocked { feature } => feature,
            _ => "",
        }
    }

    pub fn problem(&self, links: &ProblemLinks, tenant: &str, instance: &str) -> proto::Problem {
        let base = links.type_base.trim_end_matches('/');
        let mut extensions = prost_types::Struct::default();
        let mut extend = |k: &str, v: &str| {
            extensions
                .fields
                .insert(k.to_owned(), crate::json::string_value(v));
        };
        extend("reason", self.reason());
        if !tenant.is_empty() {
            extend("tenant_id", tenant);
        }
        let (slug, title, status, detail) = match self {
            Denial::Unauthenticated(why) => (
                "unauthenticated",
                "Unauthenticated",
                401,
                format!("The bearer token was not accepted: {why}."),
            ),
            Denial::PaymentRequired { flag } => {
                if let Some(url) = &links.billing_url {
                    extend("billing_url", url);
                }
                extend("flag", flag);
                (
                    "payment-required",
                    "Payment Required",
                    402,
                    "The subscription has a payment problem. Update billing to continue."
                        .to_owned(),
                )
            }
            Denial::FeatureLocked { feature } => {
                if let Some(url) = &links.upgrade_url {
                    extend("upgrade_url", url);
                }
                extend("feature", feature);
                (
                    "feature-locked",
                    "Feature Unavailable",
                    403,
                    format!("The '{feature}' feature is not included in this subscription."),
                )
            }
            Denial::WrongTenant => (
                "wrong-tenant",
                "Forbidden",
                403,
                "The token belongs to a different tenant.".to_owned(),
            ),
            Denial::Unavailable => (
                "decision-unavailable",
                "Service Unavailable",
                503,
                "Access could not be decided because feature flags are unavailable.".to_owned(),
            ),
        };
        proto::Problem {
            r#type: format!("{base}/{slug}"),
            title: title.to_owned(),
            status,
            detail,
            instance: instance.to_owned(),
            extensions: Some(extensions),
        }
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

    #[test]
    fn problems_carry_the_configured_links() {
        let links = ProblemLinks {
            type_base: "https://securepay.example/errors".into(),
            billing_url: Some("https://securepay.example/billing".into()),
            upgrade_url: Some("https://securepay.example/pricing".into()),
        };
        let paywall = Denial::PaymentRequired {
            flag: "paywall_active".into(),
        }
        .problem(&links, "globex", "/api/dashboard");
        assert_eq!(paywall.status, 402);
        assert_eq!(
            paywall.r#type,
            "https://securepay.example/errors/payment-required"
        );
        let ext = paywall.extensions.expect("extensions");
        assert!(ext.fields.contains_key("billing_url"));
        let locked = Denial::FeatureLocked {
            feature: "advanced_analytics".into(),
        }
        .problem(&links, "acme", "");
        assert_eq!(
            (locked.status, locked.title.as_str()),
            (403, "Feature Unavailable")
        );
        assert!(
            locked
                .extensions
                .expect("extensions")
                .fields
                .contains_key("upgrade_url")
        );
    }
}
