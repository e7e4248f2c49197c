//! A sidecar with its flagd sync listener on an ephemeral port, and a client for it.

use coresdk::flagd_proto::sync::v1::flag_sync_service_client::FlagSyncServiceClient;
use coresdk::settings::SideListener;
use tonic::transport::Channel;

use super::{Options, Sidecar, connect};

/// A started sidecar and the address of its flagd sync listener
/// (`--flagd-sync-listen 127.0.0.1:0`).
pub async fn start(options: Options) -> (Sidecar, String) {
    super::flagd::start_side(SideListener::FlagdSync, options).await
}

pub async fn client(addr: &str) -> FlagSyncServiceClient<Channel> {
    FlagSyncServiceClient::new(connect(addr).await)
}
