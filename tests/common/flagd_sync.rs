//! A sidecar with its flagd sync listener on an ephemeral port, and a client for it.

use coresdk::flagd_proto::sync::v1::flag_sync_service_client::FlagSyncServiceClient;
use coresdk::settings::SideListener;
use tonic::transport::Channel;

use super::{Options, Sidecar, connect};

/// A started sidecar and the address of its flagd sync listener
/// (`--flagd-sync-listen 127.0.0.1:0`).
pub async fn start(options: Options) -> (Sidecar, String) {
    let (child, addr, mut sides) =
        super::flagd::spawn_with_sides(&[SideListener::FlagdSync], &options.args, &options.envs);
    let channel = connect(&addr).await;
    let sidecar = Sidecar {
        child: Some(child),
        addr,
        channel,
        data_dir: None,
        args: options.args,
        envs: options.envs,
    };
    (sidecar, sides.remove(0))
}

pub async fn client(addr: &str) -> FlagSyncServiceClient<Channel> {
    FlagSyncServiceClient::new(super::flagd::channel(addr).await)
}
