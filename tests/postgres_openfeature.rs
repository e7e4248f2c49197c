//! OpenFeature providers on replicas sharing PostgreSQL: a change committed through one
//! replica reaches the providers following another.
mod common;

use std::time::Duration;

use common::flagd::{changed_keys, context, v2_client};
use common::pg::*;
use common::*;
use coresdk::flagd_proto::evaluation::v2;
use serde_json::json;

#[tokio::test]
async fn a_webhook_through_replica_a_reaches_an_event_stream_on_replica_c() {
    let url = fresh_database(server_url()).await;
    let a = Sidecar::start(replica_options(&url)).await;
    let (_c, c_flagd) = common::flagd::start(replica_options(&url)).await;
    let channel = connect(&c_flagd).await;
    let mut events = v2_client(&channel)
        .event_stream(v2::EventStreamRequest {})
        .await
        .expect("EventStream on C")
        .into_inner();
    let ready = tokio::time::timeout(Duration::from_secs(10), events.message())
        .await
        .expect("provider_ready within 10 s")
        .expect("healthy")
        .expect("open");
    assert_eq!(ready.r#type, "provider_ready");

    deliver(
        &a,
        event(
            "evt_pg_of_paid",
            "invoice.paid",
            now(),
            json!({"customer": "cus_acme_001"}),
        ),
    )
    .await
    .expect("the webhook through A");

    // One webhook may be announced in several events (the feed brings each flag change on
    // its own): wait for the one naming pro_features.
    loop {
        let message = tokio::time::timeout(Duration::from_secs(10), events.message())
            .await
            .expect("C announces A's change within 10 s")
            .expect("healthy")
            .expect("open");
        if message.r#type == "configuration_change"
            && changed_keys(message.data.as_ref()).contains(&"pro_features".to_owned())
        {
            break;
        }
    }
    // What a provider asks next, having dropped its cached value: C answers the new value.
    let answer = v2_client(&channel)
        .resolve_boolean(v2::ResolveBooleanRequest {
            flag_key: "pro_features".into(),
            context: context(&[("tenant_id", "acme-corp")]),
        })
        .await
        .expect("ResolveBoolean on C")
        .into_inner();
    assert_eq!(answer.value, Some(true));
    assert_eq!(answer.reason, "TARGETING_MATCH");
}
