//! A sidecar with its flagd evaluation listener on an ephemeral port, and clients for it.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::time::Duration;

use coresdk::flagd_proto::evaluation::{v1, v2};
use coresdk::settings::SideListener;
use prost_types::{Struct, Value, value::Kind};
use tonic::transport::Channel;

use super::{Options, Sidecar, connect, event, now, serve_command, signed};

/// A started sidecar and the address of its flagd listener (`--flagd-listen 127.0.0.1:0`).
pub async fn start(options: Options) -> (Sidecar, String) {
    start_side(SideListener::Flagd, options).await
}

/// A started sidecar and the address of its `listener`, on an ephemeral port.
pub async fn start_side(listener: SideListener, options: Options) -> (Sidecar, String) {
    let (child, addr, mut sides) = spawn_with_sides(&[listener], &options.args, &options.envs);
    let side = sides.remove(0);
    let channel = connect(&addr).await;
    let sidecar = Sidecar {
        child: Some(child),
        addr,
        channel,
        data_dir: None,
        args: options.args,
        envs: options.envs,
    };
    (sidecar, side)
}

/// Starts `coresdk serve` with both listeners on ephemeral ports and returns it with the main
/// address and the flagd one.
pub fn spawn(args: &[String], envs: &[(String, String)]) -> (Child, String, String) {
    let (child, addr, mut sides) = spawn_with_sides(&[SideListener::Flagd], args, envs);
    (child, addr, sides.remove(0))
}

/// Starts `coresdk serve` with the main listener and each of `sides` on ephemeral ports, and
/// returns it with the main address and the sides' addresses in the order asked, read from the
/// `coresdk <name> listening on ADDR` lines that follow the main one.
pub fn spawn_with_sides(
    sides: &[SideListener],
    args: &[String],
    envs: &[(String, String)],
) -> (Child, String, Vec<String>) {
    let mut all_args: Vec<String> = sides
        .iter()
        .flat_map(|side| [side.flag().to_owned(), "127.0.0.1:0".to_owned()])
        .collect();
    all_args.extend_from_slice(args);
    let mut command = serve_command(&all_args, envs, Stdio::inherit());
    let mut child = command.spawn().expect("the coresdk binary starts");
    let stdout = child.stdout.take().expect("piped stdout");
    let mut lines = BufReader::new(stdout).lines();
    let mut announced = HashMap::new();
    let mut addr = None;
    while addr.is_none() || announced.len() < sides.len() {
        let line = lines
            .next()
            .expect("the sidecar printed its addresses before exiting")
            .expect("readable stdout");
        if let Some(main) = line.strip_prefix("coresdk listening on ") {
            addr = Some(main.to_owned());
        }
        for side in sides {
            if let Some(side_addr) =
                line.strip_prefix(&format!("coresdk {} listening on ", side.name()))
            {
                announced.insert(side.name(), side_addr.to_owned());
            }
        }
    }
    std::thread::spawn(move || for _ in lines {});
    let sides = sides
        .iter()
        .map(|side| announced[side.name()].clone())
        .collect();
    (child, addr.expect("the main address"), sides)
}

pub async fn channel(addr: &str) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .expect("valid uri")
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .expect("connects to the flagd listener")
}

pub fn v2_client(channel: &Channel) -> v2::service_client::ServiceClient<Channel> {
    v2::service_client::ServiceClient::new(channel.clone())
}

pub fn v1_client(channel: &Channel) -> v1::service_client::ServiceClient<Channel> {
    v1::service_client::ServiceClient::new(channel.clone())
}

/// An evaluation context of string attributes.
pub fn context(attributes: &[(&str, &str)]) -> Option<Struct> {
    Some(Struct {
        fields: attributes
            .iter()
            .map(|(k, v)| {
                (
                    (*k).to_owned(),
                    Value {
                        kind: Some(Kind::StringValue((*v).to_owned())),
                    },
                )
            })
            .collect(),
    })
}

/// The keys of a `configuration_change` event's `data.flags`.
pub fn changed_keys(data: Option<&Struct>) -> Vec<String> {
    let Some(Kind::StructValue(flags)) = data
        .and_then(|d| d.fields.get("flags"))
        .and_then(|v| v.kind.as_ref())
    else {
        return Vec::new();
    };
    flags.fields.keys().cloned().collect()
}

/// The webhook secret mock mode accepts.
pub const MOCK_SECRET: &str = "whsec_test_secret";

/// Mock mode: seeded tenants (`cus_acme_001 → acme-corp`), the test secret.
pub fn mock() -> Options {
    Options {
        args: vec!["--mock".into()],
        envs: Vec::new(),
    }
}

/// A paid invoice of `customer`: its tenant's `pro_features` turns on.
pub async fn pay(sidecar: &Sidecar, id: &str, customer: &str) {
    sidecar
        .webhooks()
        .handle_stripe_webhook(signed(
            MOCK_SECRET,
            event(
                id,
                "invoice.paid",
                now(),
                serde_json::json!({"id": "in_1", "customer": customer}),
            ),
        ))
        .await
        .expect("invoice.paid accepted");
}
