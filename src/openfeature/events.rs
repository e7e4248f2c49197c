//! flagd's `EventStream`: `provider_ready` at once, `configuration_change` naming the changed
//! keys on every flag change, `keep_alive` while idle.

use std::collections::BTreeSet;

use prost_types::{Struct, Value, value::Kind};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use crate::api::{ResponseStream, SharedApp, status};

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
    let app = app.clone();
    tokio::spawn(async move {
        follow(app, sender, make).await;
        drop(slot);
    });
    Ok(Box::pin(ReceiverStream::new(receiver)))
}

async fn follow<T, F>(app: SharedApp, sender: mpsc::Sender<Result<T, Status>>, make: F)
where
    F: Fn(&'static str, Struct) -> T,
{
    let cache = &app.feeds.flags;
    let mut shutdown = app.shutdown.clone();
    // Subscribed before `provider_ready`, so no change after it goes unannounced.
    let mut changes = cache.subscribe();
    if sender
        .send(Ok(make(PROVIDER_READY, Struct::default())))
        .await
        .is_err()
    {
        return;
    }
    // Keeps proxies and load balancers from closing an idle stream (`--flagd-keep-alive-s`).
    let every = app.config.flagd_keep_alive;
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
