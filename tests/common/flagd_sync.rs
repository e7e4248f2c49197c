//! A sidecar with its flagd sync listener on an ephemeral port, a client for it, and the
//! changes the sync tests make.

use coresdk::flagd_proto::sync::v1::flag_sync_service_client::FlagSyncServiceClient;
use coresdk::proto::{self, flag_value::Kind};
use coresdk::settings::SideListener;
use serde_json::json;
use tonic::transport::Channel;

use super::{Options, Sidecar, admin, event, now, signed};

/// A started sidecar and the address of its flagd sync listener
/// (`--flagd-sync-listen 127.0.0.1:0`).
pub async fn start(options: Options) -> (Sidecar, String) {
    let (child, addr, mut sides) =
        super::flagd::spawn_with_sides(&[SideListener::FlagdSync], &options.args, &options.envs);
    (
        Sidecar::started(child, addr, options).await,
        sides.remove(0),
    )
}

pub async fn client(addr: &str) -> FlagSyncServiceClient<Channel> {
    FlagSyncServiceClient::new(super::flagd::channel(addr).await)
}

/// Mock mode: the example tenants, its own webhook secret, admin calls without a token.
pub fn mock() -> Options {
    Options {
        args: vec!["--mock".into()],
        envs: Vec::new(),
    }
}

/// A signed `invoice.paid` for `customer` to a [`mock`] sidecar.
pub async fn pay(sidecar: &Sidecar, id: &str, customer: &str) {
    sidecar
        .webhooks()
        .handle_stripe_webhook(signed(
            coresdk::config::MOCK_WEBHOOK_SECRET,
            event(
                id,
                "invoice.paid",
                now(),
                json!({"id": "in_1", "customer": customer}),
            ),
        ))
        .await
        .expect("invoice.paid accepted");
}

/// An operator's `SetFlag`.
pub async fn set(sidecar: &Sidecar, tenant: &str, key: &str, kind: Kind) {
    sidecar
        .flags()
        .set_flag(admin(proto::SetFlagRequest {
            tenant_id: tenant.into(),
            key: key.into(),
            value: Some(proto::FlagValue { kind: Some(kind) }),
            actor: "ops@example.com".into(),
            reason: String::new(),
        }))
        .await
        .expect("SetFlag");
}
