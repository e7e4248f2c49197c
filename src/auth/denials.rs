//! Bounds on what denials cost: identical ones are audited once per window, and fail-mode
//! decisions are counted.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::Denial;

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
}
