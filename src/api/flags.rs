use std::collections::HashMap;

use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::{ResponseStream, SharedState, required_text, validate_reason};
use crate::flags::{FlagCache, FlagValue};
use crate::ops::{self, AdminChange};
use crate::problem::Error;
use crate::proto::{self, flag_service_server::FlagService};
use crate::rules::{MAX_FLAG_KEY_LEN, is_valid_flag_key};

pub struct FlagApi {
    pub state: SharedState,
}

fn validate_key(key: &str) -> Result<(), Error> {
    if is_valid_flag_key(key) {
        Ok(())
    } else {
        Err(Error::invalid(
            "key",
            format!("must be 1-{MAX_FLAG_KEY_LEN} characters of letters, digits, _ - . :"),
        ))
    }
}

fn snapshot_message(cache: &FlagCache, tenant: &str, version: u64) -> proto::WatchFlagsResponse {
    proto::WatchFlagsResponse {
        event: Some(proto::watch_flags_response::Event::Snapshot(
            proto::FlagSnapshot {
                flags: cache.snapshot(tenant),
                version,
                defaults: cache.defaults(),
            },
        )),
    }
}

#[tonic::async_trait]
impl FlagService for FlagApi {
    async fn get_flag(
        &self,
        request: Request<proto::GetFlagRequest>,
    ) -> Result<Response<proto::Flag>, Status> {
        let request = request.into_inner();
        ops::validate_id("tenant_id", &request.tenant_id)
            .and_then(|()| validate_key(&request.key))
            .and_then(|()| self.state.feeds.flags.get(&request.tenant_id, &request.key))
            .map(Response::new)
            .map_err(|e| self.state.status(&e))
    }

    async fn get_flags(
        &self,
        request: Request<proto::GetFlagsRequest>,
    ) -> Result<Response<proto::GetFlagsResponse>, Status> {
        let request = request.into_inner();
        ops::validate_id("tenant_id", &request.tenant_id).map_err(|e| self.state.status(&e))?;
        let flags = self.state.feeds.flags.all_of(&request.tenant_id);
        Ok(Response::new(proto::GetFlagsResponse {
            tenant_id: request.tenant_id,
            flags,
        }))
    }

    async fn set_flag(
        &self,
        request: Request<proto::SetFlagRequest>,
    ) -> Result<Response<proto::Flag>, Status> {
        let state = &self.state;
        state.admin_only(&request)?;
        let request = request.into_inner();
        let value = ops::validate_id("tenant_id", &request.tenant_id)
            .and_then(|()| validate_key(&request.key))
            .and_then(|()| required_text("actor", &request.actor, 256))
            .and_then(|()| validate_reason(&request.reason))
            .and_then(|()| FlagValue::from_proto(request.value.as_ref()))
            .map_err(|e| state.status(&e))?;
        let written = state
            .store
            .write(move |tx| {
                ops::set_flag(
                    tx,
                    &request.tenant_id,
                    &request.key,
                    value,
                    &AdminChange {
                        actor: &request.actor,
                        reason: &request.reason,
                    },
                    crate::time::now_ms(),
                )
            })
            .await
            .map_err(|e| state.status(&e))?;
        tracing::info!(tenant = %written.tenant_id, key = %written.key, actor = %written.updated_by, "flag set by admin");
        Ok(Response::new(written.to_proto()))
    }

    type WatchFlagsStream = ResponseStream<proto::WatchFlagsResponse>;

    async fn watch_flags(
        &self,
        request: Request<proto::WatchFlagsRequest>,
    ) -> Result<Response<Self::WatchFlagsStream>, Status> {
        let tenant = request.into_inner().tenant_id;
        if !tenant.is_empty() {
            ops::validate_id("tenant_id", &tenant).map_err(|e| self.state.status(&e))?;
        }
        let (sender, receiver) = mpsc::channel(64);
        let state = self.state.clone();
        tokio::spawn(async move { watch(state, tenant, sender).await });
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }
}

/// Subscribes before taking the snapshot, so no change can fall between the two; changes the
/// snapshot already holds are skipped by version.
async fn watch(
    state: SharedState,
    tenant: String,
    sender: mpsc::Sender<Result<proto::WatchFlagsResponse, Status>>,
) {
    let cache = &state.feeds.flags;
    let mut shutdown = state.shutdown.clone();
    let mut changes = cache.subscribe();
    let mut seen = cache.version();
    if sender
        .send(Ok(snapshot_message(cache, &tenant, seen)))
        .await
        .is_err()
    {
        return;
    }
    // Per-flag versions guard against a change the snapshot raced with.
    let mut known: HashMap<(String, String), u64> = HashMap::new();
    loop {
        let change = tokio::select! {
            change = changes.recv() => change,
            _ = shutdown.changed() => return,
        };
        let message = match change {
            Ok(record) => {
                if record.version <= seen || (!tenant.is_empty() && record.tenant_id != tenant) {
                    continue;
                }
                let slot = known
                    .entry((record.tenant_id.clone(), record.key.clone()))
                    .or_default();
                if record.version <= *slot {
                    continue;
                }
                *slot = record.version;
                proto::WatchFlagsResponse {
                    event: Some(proto::watch_flags_response::Event::Change(
                        record.to_proto(),
                    )),
                }
            }
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                tracing::warn!(missed, "a flag watcher fell behind; sending a new snapshot");
                seen = cache.version();
                known.clear();
                snapshot_message(cache, &tenant, seen)
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        if sender.send(Ok(message)).await.is_err() {
            return;
        }
    }
}
