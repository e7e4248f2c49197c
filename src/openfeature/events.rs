//! flagd's `EventStream`: `provider_ready` at once, `configuration_change` naming the changed
//! keys on every flag change, `keep_alive` while idle.

use std::collections::BTreeSet;

use prost_types::{Struct, Value, value::Kind};
use std::time::Duration;

use tokio::sync::{broadcast, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use crate::api::{ResponseStream, SharedApp, status};
use crate::flags::FlagCache;
use crate::problem::Error;

pub const PROVIDER_READY: &str = "provider_ready";
pub const CONFIGURATION_CHANGE: &str = "configuration_change";
pub const KEEP_ALIVE: &str = "keep_alive";

/// Changes already queued are sent as one event, at most this many keys at a time.
const BATCH: usize = 256;
/// Events queued per subscriber; a slower one falls behind on the broadcast instead, and is
/// then told that every flag changed.
const QUEUE: usize = 16;

/// Opens a stream (counted against `--max-streams`) whose messages `make` builds from an
/// event type and its data.
pub fn stream<T, F>(app: &SharedApp, make: F) -> Result<ResponseStream<T>, Status>
where
    T: Send + 'static,
    F: Fn(&'static str, Struct) -> T + Send + 'static,
{
    let slot = app
        .open_stream()
        .map_err(|e| status::of_error(&e, app.links()))?;
    let (sender, receiver) = mpsc::channel(QUEUE);
    let (cache, shutdown) = (app.feeds.flags.clone(), app.shutdown.clone());
    let every = app.config.flagd_keep_alive;
    let goodbye = status::of_error(&Error::ShuttingDown, app.links());
    tokio::spawn(async move {
        follow(&cache, shutdown, goodbye, every, sender, make).await;
        drop(slot);
    });
    Ok(Box::pin(ReceiverStream::new(receiver)))
}

/// `every`: how often an idle stream says `keep_alive` (`--flagd-keep-alive-s`); it keeps
/// proxies and load balancers from closing it.
/// `goodbye`: how the stream ends on shutdown. An error, not a clean end: the flagd providers
/// reconnect their EventStream only after an error status, so a clean end would leave them
/// deaf to every change once the sidecar is back (the Node provider, for one, never asks again).
async fn follow<T, F>(
    cache: &FlagCache,
    mut shutdown: watch::Receiver<bool>,
    goodbye: Status,
    every: Duration,
    sender: mpsc::Sender<Result<T, Status>>,
    make: F,
) where
    F: Fn(&'static str, Struct) -> T,
{
    // Subscribed before `provider_ready`, so no change after it goes unannounced.
    let mut changes = cache.subscribe();
    if sender
        .send(Ok(make(PROVIDER_READY, Struct::default())))
        .await
        .is_err()
    {
        return;
    }
    let mut keep_alive = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    keep_alive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let message = tokio::select! {
            change = changes.recv() => {
                let mut keys = BTreeSet::new();
                match change {
                    Ok(record) => {
                        keys.insert(record.key.clone());
                        while keys.len() < BATCH {
                            match changes.try_recv() {
                                Ok(record) => { keys.insert(record.key.clone()); }
                                Err(broadcast::error::TryRecvError::Lagged(_)) => {
                                    keys.extend(cache.known_keys());
                                    break;
                                }
                                Err(_) => break,
                            }
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        tracing::warn!(missed, "an EventStream subscriber fell behind; announcing every flag as changed");
                        keys.extend(cache.known_keys());
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
                make(CONFIGURATION_CHANGE, changed_flags(keys))
            }
            _ = keep_alive.tick() => make(KEEP_ALIVE, Struct::default()),
            () = sender.closed() => return,
            _ = shutdown.changed() => {
                // A full queue means a subscriber that reads nothing: shutdown waits for no one.
                let _ = sender.try_send(Err(goodbye));
                return;
            }
        };
        if sender.send(Ok(message)).await.is_err() {
            return;
        }
    }
}

/// flagd's shape: `{"flags": {"<key>": {"type": "write"}, …}}`.
fn changed_flags(keys: BTreeSet<String>) -> Struct {
    let write = Struct {
        fields: [(
            "type".to_owned(),
            Value {
                kind: Some(Kind::StringValue("write".into())),
            },
        )]
        .into(),
    };
    let flags = Struct {
        fields: keys
            .into_iter()
            .map(|key| {
                (
                    key,
                    Value {
                        kind: Some(Kind::StructValue(write.clone())),
                    },
                )
            })
            .collect(),
    };
    Struct {
        fields: [(
            "flags".to_owned(),
            Value {
                kind: Some(Kind::StructValue(flags)),
            },
        )]
        .into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flags::{FlagValue, test_record};

    fn keys(data: &Struct) -> usize {
        match data.fields.get("flags").and_then(|v| v.kind.as_ref()) {
            Some(Kind::StructValue(flags)) => flags.fields.len(),
            _ => 0,
        }
    }

    /// Providers reconnect only after an error status, so shutdown must not end the stream
    /// cleanly.
    #[tokio::test]
    async fn shutdown_ends_the_stream_with_unavailable() {
        let cache = FlagCache::new(Default::default());
        let (stop, shutdown) = watch::channel(false);
        let (sender, mut receiver) = mpsc::channel(QUEUE);
        let follower = follow(
            &cache,
            shutdown,
            Status::unavailable("shutting down"),
            Duration::from_secs(3600),
            sender,
            |kind, _| kind,
        );
        let listener = async {
            let ready = receiver.recv().await.and_then(Result::ok);
            assert_eq!(ready, Some(PROVIDER_READY));
            stop.send(true).expect("the follower listens");
            receiver.recv().await
        };
        let ((), last) = tokio::join!(follower, listener);
        let code = last.and_then(Result::err).map(|status| status.code());
        assert_eq!(code, Some(tonic::Code::Unavailable));
        assert!(receiver.recv().await.is_none(), "nothing after the goodbye");
    }

    /// A subscriber that reads nothing holds its queue and no more: the broadcast drops what
    /// it missed, and it is then told that every known key changed.
    #[tokio::test]
    async fn a_subscriber_that_falls_behind_hears_every_key() {
        const CHANGES: u64 = 6000;
        let cache = std::sync::Arc::new(FlagCache::new(Default::default()));
        let (_stop, shutdown) = watch::channel(false);
        let (sender, mut receiver) = mpsc::channel(QUEUE);
        let follower = {
            let cache = cache.clone();
            tokio::spawn(async move {
                follow(
                    &cache,
                    shutdown,
                    Status::unavailable("shutting down"),
                    Duration::from_secs(3600),
                    sender,
                    |kind, data| (kind, data),
                )
                .await;
            })
        };
        let ready = receiver.recv().await.and_then(Result::ok);
        assert_eq!(ready.map(|(kind, _)| kind), Some(PROVIDER_READY));
        for n in 1..=CHANGES {
            cache.apply(test_record(
                "acme",
                &format!("flag_{n}"),
                FlagValue::Bool(true),
                n,
            ));
            // Let the follower run, so it fills its queue and then blocks.
            if n % 64 == 0 {
                tokio::task::yield_now().await;
            }
        }
        let mut events = 0;
        let everything = loop {
            let event = tokio::time::timeout(Duration::from_secs(10), receiver.recv())
                .await
                .ok()
                .flatten()
                .and_then(Result::ok);
            let Some((kind, data)) = event else {
                panic!("the stream ended or went quiet before announcing every key");
            };
            assert_eq!(kind, CONFIGURATION_CHANGE);
            events += 1;
            if keys(&data) > BATCH {
                break keys(&data);
            }
        };
        assert_eq!(everything, CHANGES as usize);
        // Queue, batches and the one catch-up event: far fewer events than changes.
        assert!(events <= QUEUE + 2, "{events} events");
        follower.abort();
    }
}
