use std::collections::HashMap;

use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::{ResponseStream, SharedApp, bearer, convert, status};
use crate::app::Admin;
use crate::flags::FlagCache;
use crate::proto::{self, flag_service_server::FlagService};

pub struct FlagApi {
    pub app: SharedApp,
}

fn snapshot_message(cache: &FlagCache, tenant: &str, version: u64) -> proto::WatchFlagsResponse {
    proto::WatchFlagsResponse {
        event: Some(proto::watch_flags_response::Event::Snapshot(
            proto::FlagSnapshot {
                flags: convert::flags(cache.snapshot(tenant)),
                version,
                defaults: convert::flags(cache.defaults()),
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
        self.app
            .get_flag(&request.tenant_id, &request.key)
            .map(|flag| Response::new(convert::flag(flag)))
            .map_err(|e| status::of_error(&e, self.app.links()))
    }

    async fn get_flags(
        &self,
        request: Request<proto::GetFlagsRequest>,
    ) -> Result<Response<proto::GetFlagsResponse>, Status> {
        let request = request.into_inner();
        let flags = self
            .app
            .get_flags(&request.tenant_id)
            .map_err(|e| status::of_error(&e, self.app.links()))?;
        Ok(Response::new(proto::GetFlagsResponse {
            tenant_id: request.tenant_id,
            flags: convert::flags(flags),
        }))
    }

    async fn set_flag(
        &self,
        request: Request<proto::SetFlagRequest>,
    ) -> Result<Response<proto::Flag>, Status> {
        let (metadata, _, request) = request.into_parts();
        let links = self.app.links();
        let value = convert::flag_value_from_proto(request.value.as_ref());
        let admin = Admin {
            bearer: bearer(&metadata),
            actor: &request.actor,
            reason: &request.reason,
        };
        let written = self
            .app
            .set_flag(admin, request.tenant_id.clone(), request.key.clone(), value)
            .await
            .map_err(|e| status::of_error(&e, links))?;
        Ok(Response::new(convert::flag_record(written)))
    }

    async fn explain_flag(
        &self,
        request: Request<proto::ExplainFlagRequest>,
    ) -> Result<Response<proto::ExplainFlagResponse>, Status> {
        let request = request.into_inner();
        self.app
            .explain_flag(&request.tenant_id, &request.key)
            .await
            .map(|explanation| Response::new(convert::explanation(explanation)))
            .map_err(|e| status::of_error(&e, self.app.links()))
    }

    type WatchFlagsStream = ResponseStream<proto::WatchFlagsResponse>;

    async fn watch_flags(
        &self,
        request: Request<proto::WatchFlagsRequest>,
    ) -> Result<Response<Self::WatchFlagsStream>, Status> {
        let tenant = request.into_inner().tenant_id;
        crate::ops::validate_optional_id("tenant_id", &tenant)
            .map_err(|e| status::of_error(&e, self.app.links()))?;
        let slot = self
            .app
            .open_stream()
            .map_err(|e| status::of_error(&e, self.app.links()))?;
        let (sender, receiver) = mpsc::channel(64);
        let app = self.app.clone();
        tokio::spawn(async move {
            watch(app, tenant, sender).await;
            drop(slot);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }
}

/// Subscribes before taking the snapshot, so no change can fall between the two; changes the
/// snapshot already holds are skipped by version. Ends as soon as the client goes away, not
/// at the next change: a quiet tenant's watcher would otherwise keep its task and broadcast
/// receiver, which every change to any tenant is cloned into, forever.
async fn watch(
    app: SharedApp,
    tenant: String,
    sender: mpsc::Sender<Result<proto::WatchFlagsResponse, Status>>,
) {
    let cache = &app.feeds.flags;
    let mut shutdown = app.shutdown.clone();
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
            () = sender.closed() => return,
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
                        convert::flag_record((*record).clone()),
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
