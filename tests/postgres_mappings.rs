//! Customer → tenant mappings on PostgreSQL: the schema migration that keeps unmapped
//! customers apart from never-mapped ones, on a database an older sidecar created. Needs
//! CORESDK_TEST_POSTGRES_URL (./scripts/test starts a throwaway server and sets it).
mod common;

use common::audit::map;
use common::mapping::{resolve, tenant_of, unmap};
use common::pg::*;
use common::*;
use serde_json::json;

/// Turns the database back into what schema version 1 made of it, rows included.
async fn downgrade_to_version_1(url: String) {
    tokio::task::spawn_blocking(move || {
        let mut client = postgres::Client::connect(&url, postgres::NoTls).expect("connect");
        client
            .batch_execute(
                "ALTER TABLE customers DROP COLUMN unmapped_at_ms;
                 DELETE FROM coresdk_schema WHERE version > 1;",
            )
            .expect("downgrade");
    })
    .await
    .expect("blocking task");
}

#[tokio::test]
async fn a_version_1_database_migrates_and_a_restart_keeps_an_unmapping() {
    let url = fresh_database(server_url()).await;
    let mut first = Sidecar::start(replica_options(&url)).await;
    map(&first, "cus_acme_001", "acme-new").await;
    assert!(first.stop().success());
    drop(first);
    downgrade_to_version_1(url.clone()).await;

    // Replicas starting together race for the migration; it applies once and keeps the rows.
    let mut nodes = replicas(&url, 2).await;
    for node in &nodes {
        assert_eq!(tenant_of(node, "cus_acme_001").await, "acme-new");
    }
    assert!(unmap(&nodes[0], "cus_acme_001").await);
    for node in &mut nodes {
        assert!(node.stop().success());
    }
    nodes[0].restart().await;

    let lookup = resolve(&nodes[0], "cus_acme_001")
        .await
        .expect_err("still unmapped");
    assert_eq!(lookup.code(), tonic::Code::NotFound, "{lookup:?}");
    let refused = nodes[0]
        .webhooks()
        .handle_stripe_webhook(signed(
            SECRET,
            event(
                "evt_after_unmap",
                "invoice.paid",
                now(),
                json!({"customer": "cus_acme_001"}),
            ),
        ))
        .await
        .expect_err("no tenant for an unmapped customer");
    assert_eq!(error_reason(&refused), "UNKNOWN_CUSTOMER");
    assert_eq!(tenant_of(&nodes[0], "cus_globex_001").await, "globex");
}
