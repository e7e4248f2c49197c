//! Bounds on what denials cost: identical ones are coalesced (see `crate::coalesce`), and
//! fail-mode decisions are counted.

use std::sync::atomic::{AtomicU64, Ordering};

use super::Denial;
use crate::coalesce::CoalesceKey;

/// Denials that are "the same" for the audit trail: one record per key and window.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DenialKey {
    tenant: String,
    subject: String,
    reason: &'static str,
    feature: String,
}

impl DenialKey {
    pub fn new(tenant: &str, subject: &str, denial: &Denial) -> Self {
        Self {
            tenant: tenant.to_owned(),
            subject: subject.to_owned(),
            reason: denial.reason(),
            feature: denial.feature().to_owned(),
        }
    }
}

impl CoalesceKey for DenialKey {
    fn bytes(&self) -> usize {
        std::mem::size_of::<Self>() + self.tenant.len() + self.subject.len() + self.feature.len()
    }

    fn reason(&self) -> &'static str {
        self.reason
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
