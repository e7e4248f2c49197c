//! Retention of dedup records: `processed_events` rows (webhook event ids and Append
//! idempotency keys) older than the window are deleted in the background. The audit trail is
//! never pruned: it is the record of what happened, dedup rows only guard against repeats.

use std::time::Duration;

use crate::problem::Error;
use crate::store::Store;

/// Rows deleted per transaction: small enough that a webhook queued behind one batch waits
/// milliseconds, not seconds.
const PRUNE_BATCH: u64 = 500;
/// Between batches the writer is left to the request path.
const PAUSE_BETWEEN_BATCHES: Duration = Duration::from_millis(100);
/// How often a pass runs; the window is days, so an hour's lag is nothing.
const PASS_EVERY: Duration = Duration::from_secs(3600);

/// The default window: longer than Stripe's 30 days of event retention, so any event Stripe
/// can still redeliver (or that its dashboard can still resend) finds its dedup record.
pub const DEFAULT_RETENTION_DAYS: u64 = 35;

/// One pass: batches until a short one, each its own write transaction. Returns the rows
/// deleted, or the store error that ended the pass early (with what it had deleted).
async fn prune_pass(store: &Store, window: Duration) -> (u64, Option<Error>) {
    let window_ms = i64::try_from(window.as_millis()).unwrap_or(i64::MAX);
    let before_ms = crate::time::now_ms().saturating_sub(window_ms);
    let mut pruned = 0;
    loop {
        match store
            .write_detached(move |tx| Ok(tx.prune_processed(before_ms, PRUNE_BATCH)?))
            .await
        {
            Ok(deleted) => {
                pruned += deleted;
                if deleted < PRUNE_BATCH {
                    return (pruned, None);
                }
            }
            Err(e) => return (pruned, Some(e)),
        }
        tokio::time::sleep(PAUSE_BETWEEN_BATCHES).await;
    }
}

/// Prunes at start, then once per [`PASS_EVERY`]; runs until aborted.
pub async fn retention_loop(store: Store, window: Duration) {
    let mut ticker = tokio::time::interval(PASS_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let (pruned, failed) = prune_pass(&store, window).await;
        if pruned > 0 {
            tracing::info!(
                pruned,
                retention_days = window.as_secs() / 86_400,
                "pruned dedup records older than the retention window (CORESDK_DEDUP_RETENTION_DAYS)"
            );
        }
        if let Some(e) = failed {
            tracing::warn!(error = %e, "pruning dedup records stopped early; the next pass goes on");
        }
    }
}
