//! Access decisions: who the caller is (a verified token or a tenant the app vouches for),
//! which flags the request needs, and the denial (with its RFC 9457 problem) when it may not
//! go on. Everything here decides from memory; auditing a denial is the caller's write.

mod access;
mod denials;
pub mod token;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::flags::FlagCache;
pub use crate::problem::Denial;
pub use access::{
    ANONYMOUS_ACTOR, Access, AccessRequest, Authorizer, DENIAL_KEY_FIELDS, denial_record,
};
pub use denials::{DenialKey, FailModeCounter};
pub use token::{Claims, TokenError, TokenVerifier};

/// What access decisions (and clients) do when flags cannot be known.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FailMode {
    Open,
    Closed,
}

impl FailMode {
    pub fn as_str(self) -> &'static str {
        match self {
            FailMode::Open => "open",
            FailMode::Closed => "closed",
        }
    }
}

/// Comparing digests keeps the comparison constant-time whatever the lengths.
pub fn tokens_match(presented: &str, expected: &str) -> bool {
    Sha256::digest(presented.trim().as_bytes())
        .ct_eq(&Sha256::digest(expected.as_bytes()))
        .into()
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flags::FlagValue;
    use std::collections::BTreeMap;

    /// The catalog the access tests decide against.
    pub(crate) fn cache() -> FlagCache {
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
}
