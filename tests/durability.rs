//! Restart persistence, kill -9 after acknowledged calls, and tamper detection, on the
//! embedded SQLite store of the real binary.
mod common;

use common::audit::{append_app_events, map, offline_verify, verify};
use common::*;
use coresdk::proto::WebhookOutcome;
use serde_json::json;

async fn audit_count(sidecar: &Sidecar) -> usize {
    common::abuse::audit_records(sidecar, "").await.len()
}

#[tokio::test]
async fn state_survives_a_clean_restart() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut sidecar = Sidecar::on_disk(dir.path(), Options::default()).await;
    map(&sidecar, "cus_1", "tenant-1").await;
    let body = event(
        "evt_persist",
        "invoice.paid",
        now(),
        json!({"customer": "cus_1"}),
    );
    sidecar
        .webhooks()
        .handle_stripe_webhook(signed(SECRET, body.clone()))
        .await
        .expect("applied");
    let before = audit_count(&sidecar).await;
    let status = sidecar.stop();
    assert!(status.success(), "clean exit on SIGTERM: {status:?}");

    sidecar.restart().await;
    assert!(is_on(&sidecar, "tenant-1", "pro_features").await);
    assert_eq!(audit_count(&sidecar).await, before);
    let report = common::checkpoints::verify_full(&sidecar).await;
    assert!(report.ok, "{report:?}");
    assert_eq!(report.records_checked as usize, before);
    let again = sidecar
        .webhooks()
        .handle_stripe_webhook(signed(SECRET, body))
        .await
        .expect("redelivery")
        .into_inner();
    assert_eq!(
        again.outcome(),
        WebhookOutcome::Duplicate,
        "dedup survives restarts"
    );
}

#[tokio::test]
async fn nothing_acknowledged_is_lost_to_kill_9() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut sidecar = Sidecar::on_disk(dir.path(), Options::default()).await;
    for i in 0..8 {
        map(&sidecar, &format!("cus_{i}"), &format!("tenant-{i}")).await;
    }
    // 32 concurrent senders so commits are shared; every acknowledged one must survive.
    let mut senders = Vec::new();
    for sender in 0..32 {
        let client = sidecar.webhooks();
        senders.push(tokio::spawn(async move {
            let mut client = client;
            let mut acked = Vec::new();
            for n in 0..10 {
                let id = format!("evt_k_{sender}_{n}");
                let body = event(
                    &id,
                    "invoice.paid",
                    now(),
                    json!({"customer": format!("cus_{}", sender % 8)}),
                );
                let answer = client
                    .handle_stripe_webhook(signed(SECRET, body))
                    .await
                    .expect("acked");
                acked.push((id, answer.into_inner().audit_seq));
            }
            acked
        }));
    }
    let mut acked = Vec::new();
    for sender in senders {
        acked.extend(sender.await.expect("sender task"));
    }
    let flag_versions = flag(&sidecar, "tenant-3", "pro_features").await.version;
    sidecar.kill9();

    sidecar.restart().await;
    let report = verify(&sidecar).await;
    assert!(report.ok, "{report:?}");
    let max_seq = acked.iter().map(|(_, seq)| *seq).max().unwrap_or(0);
    assert!(
        report.head_seq >= max_seq,
        "every acknowledged audit record is there"
    );
    for (id, _) in acked {
        let body = event(&id, "invoice.paid", now(), json!({"customer": "cus_0"}));
        let answer = sidecar
            .webhooks()
            .handle_stripe_webhook(signed(SECRET, body))
            .await
            .expect("redelivery")
            .into_inner();
        assert_eq!(
            answer.outcome(),
            WebhookOutcome::Duplicate,
            "{id} was acknowledged, so it must be known"
        );
    }
    assert!(is_on(&sidecar, "tenant-3", "pro_features").await);
    assert_eq!(
        flag(&sidecar, "tenant-3", "pro_features").await.version,
        flag_versions
    );
}

#[tokio::test]
async fn tampering_is_named_online_and_offline() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut sidecar = Sidecar::on_disk(dir.path(), Options::default()).await;
    append_app_events(&sidecar, 5).await;
    let store = sidecar.store_url();
    sidecar.stop();

    let offline = common::checkpoints::offline_verify_full(&store);
    assert!(offline.status.success(), "{offline:?}");
    assert!(String::from_utf8_lossy(&offline.stdout).starts_with("ok: 5 records"));

    // Alter record 3 behind the sidecar's back. It is covered by the checkpoint signed at
    // shutdown, so only a full verification rehashes it.
    let db = rusqlite::Connection::open(dir.path().join("coresdk.db")).expect("open db");
    db.execute("UPDATE audit SET outcome = 'failure' WHERE seq = 3", [])
        .expect("tamper");
    drop(db);
    let offline = common::checkpoints::offline_verify_full(&store);
    assert_eq!(offline.status.code(), Some(1));
    let said = String::from_utf8_lossy(&offline.stdout).to_string();
    assert!(said.starts_with("FAILED at seq 3"), "{said}");

    sidecar.restart().await;
    let report = common::checkpoints::verify_full(&sidecar).await;
    assert_eq!((report.ok, report.first_bad_seq), (false, 3), "{report:?}");
    sidecar.stop();

    // Remove record 2 instead (after restoring 3 is impossible: simulate a deletion on a copy).
    let db = rusqlite::Connection::open(dir.path().join("coresdk.db")).expect("open db");
    db.execute("UPDATE audit SET outcome = 'success' WHERE seq = 3", [])
        .expect("restore");
    db.execute("DELETE FROM audit WHERE seq = 2", [])
        .expect("delete");
    drop(db);
    let offline = common::checkpoints::offline_verify_full(&store);
    let said = String::from_utf8_lossy(&offline.stdout).to_string();
    assert!(
        said.starts_with("FAILED at seq 2") && said.contains("missing"),
        "{said}"
    );
}

#[tokio::test]
async fn a_second_sidecar_on_the_same_file_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let _first = Sidecar::on_disk(dir.path(), Options::default()).await;
    let output = std::process::Command::new(binary())
        .args(["serve", "--listen", "127.0.0.1:0", "--store"])
        .arg(format!(
            "sqlite://{}",
            dir.path().join("coresdk.db").display()
        ))
        .output()
        .expect("runs");
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("in use by another sidecar"));
}

#[tokio::test]
async fn cutting_off_the_newest_records_is_caught_by_signed_checkpoints() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut sidecar = Sidecar::on_disk(dir.path(), Options::default()).await;
    append_app_events(&sidecar, 5).await;
    let store = sidecar.store_url();
    assert!(sidecar.stop().success());
    let checkpoints = dir.path().join("coresdk.db.checkpoints");
    assert!(
        std::fs::read_to_string(&checkpoints)
            .expect("a checkpoint was written at shutdown")
            .contains("\"size\":5"),
    );

    let db = rusqlite::Connection::open(dir.path().join("coresdk.db")).expect("open db");
    db.execute("DELETE FROM audit WHERE seq >= 4", [])
        .expect("truncate");
    drop(db);
    let offline = offline_verify(&store);
    let said = String::from_utf8_lossy(&offline.stdout).to_string();
    assert_eq!(offline.status.code(), Some(1), "{said}");
    assert!(
        said.starts_with("FAILED at seq 4") && said.contains("removed"),
        "{said}"
    );

    sidecar.restart().await;
    let report = verify(&sidecar).await;
    assert_eq!((report.ok, report.first_bad_seq), (false, 4), "{report:?}");
    sidecar.stop();

    // A forged checkpoint line is itself reported.
    let mut text = std::fs::read_to_string(&checkpoints).expect("read");
    text.push_str(&format!(
        "{{\"size\":3,\"head_hash\":\"{}\",\"time\":\"x\",\"signature\":\"{}\"}}\n",
        "0".repeat(64),
        "0".repeat(128)
    ));
    std::fs::write(&checkpoints, text).expect("write");
    let offline = offline_verify(&store);
    assert!(String::from_utf8_lossy(&offline.stdout).contains("bad signature"));
}
