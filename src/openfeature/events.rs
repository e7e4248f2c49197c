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
    let stopping = shutdown.clone();
    tokio::spawn(async move {
        follow(&cache, shutdown, every, sender, make).await;
        drop(slot);
    });
    Ok(super::ending_in_goodbye(
        ReceiverStream::new(receiver),
        stopping,
        goodbye,
    ))
}

/// `every`: how often an idle stream says `keep_alive` (`--flagd-keep-alive-s`); it keeps
/// proxies and load balancers from closing it.
/// At shutdown it stops, and the stream ends in UNAVAILABLE ([`super::ending_in_goodbye`]).
async fn follow<T, F>(
    cache: &FlagCache,
    mut shutdown: watch::Receiver<bool>,
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
            _ = shutdown.changed() => return,
        };
        // A subscriber that reads nothing must not hold the stream open past shutdown.
        tokio::select! {
            sent = sender.send(Ok(message)) => if sent.is_err() { return },
            _ = shutdown.wait_for(|stop| *stop) => return,
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

    /// Providers reconnect only after an error status, so shutdown never ends the stream
    /// cleanly: not even for a subscriber whose queue is full, which hears the goodbye after
    /// what was queued.
    #[tokio::test]
    async fn shutdown_ends_even_a_full_stream_with_unavailable() {
        use futures_util::StreamExt as _;
        let cache = FlagCache::new(Default::default());
        let (stop, shutdown) = watch::channel(false);
        let (sender, receiver) = mpsc::channel(QUEUE);
        let mut stream = crate::openfeature::ending_in_goodbye(
            ReceiverStream::new(receiver),
            shutdown.clone(),
            Status::unavailable("shutting down"),
        );
        // A short keep-alive fills the queue of a subscriber that reads nothing.
        let follower = tokio::spawn(async move {
            follow(
                &cache,
                shutdown,
                Duration::from_millis(1),
                sender,
                |kind, _| kind,
            )
            .await;
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        stop.send(true).expect("the follower listens");
        tokio::time::timeout(Duration::from_secs(10), follower)
            .await
            .expect("the follower stops at shutdown")
            .expect("the follower ran");
        let mut queued = 0;
        let last = loop {
            match stream.next().await {
                Some(Ok(_)) => queued += 1,
                other => break other,
            }
        };
        assert_eq!(queued, QUEUE, "the queue was full");
        let code = last.and_then(Result::err).map(|status| status.code());
        assert_eq!(code, Some(tonic::Code::Unavailable));
        assert!(stream.next().await.is_none(), "nothing after the goodbye");
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
