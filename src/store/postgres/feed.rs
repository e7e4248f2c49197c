//! The flag change feed: follows other replicas' flag changes through `LISTEN/NOTIFY` and keeps
//! the local cache current. A commit that changed flags notifies its new version; the feed
//! fetches every flag above the version it has seen, and does the same after reconnecting, so
//! no change is missed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use postgres::fallible_iterator::FallibleIterator as _;

use super::CHANNEL;
use super::connect::Connector;
use super::sql::PgConn;
use crate::flags::FlagCache;
use crate::store::StoreError;
use crate::store::tx;

/// Follows the feed until `stop`. While it is down the cache is marked degraded, so access
/// decisions for tenants it does not know fall back to the fail mode, and `reachable` is false.
pub(super) fn listen_loop(
    connector: &Connector,
    stop: &AtomicBool,
    cache: &FlagCache,
    reachable: &AtomicBool,
) {
    let mut seen = cache.version();
    let server = connector.target();
    let lost = |why: &str| {
        tracing::warn!(why, %server, "flag change feed lost; reconnecting");
        cache.set_degraded(true);
        reachable.store(false, Ordering::Release);
    };
    while !stop.load(Ordering::Acquire) {
        let Some(client) = connector.connect_with_backoff(stop, "flag change feed") else {
            return;
        };
        let mut conn = PgConn::new(client);
        if let Err(e) = conn.client.batch_execute(&format!("LISTEN {CHANNEL}")) {
            lost(&StoreError::from(e).to_string());
            continue;
        }
        // Anything committed while we were away is fetched now, by version.
        if let Err(e) = catch_up(&mut conn, cache, &mut seen) {
            lost(&e.to_string());
            continue;
        }
        cache.set_degraded(false);
        reachable.store(true, Ordering::Release);
        tracing::info!(version = seen, "flag change feed connected");
        loop {
            if stop.load(Ordering::Acquire) {
                return;
            }
            let (woke, failed) = wait_for_notification(&mut conn);
            if failed || conn.client.is_closed() {
                lost("the connection closed");
                break;
            }
            if woke && let Err(e) = catch_up(&mut conn, cache, &mut seen) {
                lost(&e.to_string());
                break;
            }
        }
    }
}

/// Waits up to half a second for a notification, so a stop or a lost server is noticed soon.
/// Says whether one came and whether the connection failed.
fn wait_for_notification(conn: &mut PgConn) -> (bool, bool) {
    let mut notifications = conn.client.notifications();
    let mut waiting = notifications.timeout_iter(Duration::from_millis(500));
    match waiting.next() {
        Ok(Some(_)) => (true, false),
        Ok(None) => (false, false),
        Err(_) => (false, true),
    }
}

fn catch_up(conn: &mut PgConn, cache: &FlagCache, seen: &mut u64) -> Result<(), StoreError> {
    for record in tx::flags_after(conn, *seen)? {
        *seen = (*seen).max(record.version);
        cache.apply(record);
    }
    Ok(())
}
