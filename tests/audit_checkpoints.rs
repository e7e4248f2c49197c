//! Signed audit checkpoints against the real binary: no false tamper reports while the chain
//! and its checkpoints move, a write cut short by a crash, and a file that stays small.
mod common;

use std::time::Duration;

use common::audit::{map, offline_verify, verify};
use common::*;
use coresdk::proto::webhook_service_client::WebhookServiceClient;
use serde_json::json;
use tonic::transport::Channel;

/// Checkpoints as often as the sidecar allows, so that one lands during most verifications.
const FAST_CHECKPOINTS: [&str; 2] = ["--audit-checkpoint-interval-s", "0.01"];

fn options_with(args: &[&str]) -> Options {
    let mut options = Options::default();
    options.args.extend(args.iter().map(|a| (*a).to_owned()));
    options
}

/// Sends `count` distinct signed webhooks for a mapped customer through `client`, pausing
/// `pause` after each.
async fn send_webhooks(
    mut client: WebhookServiceClient<Channel>,
    prefix: &str,
    count: usize,
    pause: Duration,
) {
    for i in 0..count {
        let body = event(
            &format!("evt_{prefix}_{i}"),
            "invoice.paid",
            now(),
            json!({"customer": "cus_flow"}),
        );
        client
            .handle_stripe_webhook(signed(SECRET, body))
            .await
            .expect("webhook applied");
        tokio::time::sleep(pause).await;
    }
}

/// `per_sender` webhooks from each of `senders` concurrent clients.
fn flow_webhooks(
    sidecar: &Sidecar,
    senders: usize,
    per_sender: usize,
    pause: Duration,
) -> tokio::task::JoinHandle<()> {
    let clients: Vec<_> = (0..senders).map(|_| sidecar.webhooks()).collect();
    tokio::spawn(async move {
        let mut tasks = Vec::new();
        for (sender, client) in clients.into_iter().enumerate() {
            tasks.push(tokio::spawn(async move {
                send_webhooks(client, &format!("flow_{sender}"), per_sender, pause).await;
            }));
        }
        for task in tasks {
            task.await.expect("sender");
        }
    })
}

fn checkpoint_file(dir: &std::path::Path) -> std::path::PathBuf {
    dir.join("coresdk.db.checkpoints")
}

fn lines_in(file: &std::path::Path) -> usize {
    std::fs::read_to_string(file)
        .map(|text| text.lines().count())
        .unwrap_or(0)
}

#[tokio::test]
async fn verification_while_webhooks_flow_and_checkpoints_are_written_never_reports_tampering() {
    let dir = tempfile::tempdir().expect("temp dir");
    let sidecar = Sidecar::on_disk(dir.path(), options_with(&FAST_CHECKPOINTS)).await;
    map(&sidecar, "cus_flow", "acme").await;
    // A bounded flow, a few hundred records a second: the chain and its checkpoints move during
    // every verification, and the chain stays small enough for each to be short.
    let flow = flow_webhooks(&sidecar, 2, 1000, Duration::from_millis(5));

    let mut false_alarms = Vec::new();
    let (mut online, mut offline) = (0, 0);
    while !flow.is_finished() {
        let report = verify(&sidecar).await;
        online += 1;
        if !report.ok {
            false_alarms.push(format!("online: {}", report.reason));
        }
        if online % 3 == 0 {
            let output = offline_verify(&sidecar.store_url());
            offline += 1;
            if !output.status.success() {
                false_alarms.push(format!(
                    "offline: {}{}",
                    String::from_utf8_lossy(&output.stdout),
                    String::from_utf8_lossy(&output.stderr)
                ));
            }
        }
    }
    flow.await.expect("flow");
    assert!(
        online >= 3,
        "too few verifications ran while webhooks flowed"
    );
    assert!(
        std::fs::metadata(checkpoint_file(dir.path()))
            .expect("checkpoints written")
            .len()
            > 0
    );
    assert!(
        false_alarms.is_empty(),
        "{} of {online} online and {offline} offline verifications reported tampering: {false_alarms:#?}",
        false_alarms.len()
    );
}

fn stderr_of(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// One checkpoint at start (when there are records), one at shutdown, none in between.
const CHECKPOINTS_AT_START_AND_STOP: [&str; 2] = ["--audit-checkpoint-interval-s", "3600"];

#[tokio::test]
async fn a_line_torn_by_a_crash_is_a_warning_and_the_next_checkpoint_replaces_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = checkpoint_file(dir.path());
    let mut sidecar =
        Sidecar::on_disk(dir.path(), options_with(&CHECKPOINTS_AT_START_AND_STOP)).await;
    map(&sidecar, "cus_flow", "acme").await;
    send_webhooks(sidecar.webhooks(), "before", 3, Duration::ZERO).await;
    assert!(sidecar.stop().success());
    let at_stop = lines_in(&file);
    sidecar.restart().await;
    send_webhooks(sidecar.webhooks(), "after", 2, Duration::ZERO).await;
    // The start writes one line; a crash cuts it short.
    let started = async {
        while lines_in(&file) == at_stop {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), started)
        .await
        .expect("a checkpoint at start");
    let whole = std::fs::read_to_string(&file).expect("checkpoints");
    assert_eq!(whole.lines().count(), at_stop + 1, "{whole}");
    std::fs::write(&file, &whole[..whole.len() - 40]).expect("torn");

    let report = verify(&sidecar).await;
    assert!(report.ok, "{report:?}");
    assert_eq!(report.warnings.len(), 1, "{report:?}");
    assert!(
        report.warnings[0].contains(&format!("line {} is incomplete", at_stop + 1)),
        "{report:?}"
    );
    let offline = offline_verify(&sidecar.store_url());
    assert!(offline.status.success(), "{}", stderr_of(&offline));
    assert!(
        stderr_of(&offline).contains(&format!(
            "warning: checkpoint line {} is incomplete",
            at_stop + 1
        )),
        "{}",
        stderr_of(&offline)
    );

    // The shutdown checkpoint cuts the torn line off instead of gluing onto it.
    assert!(sidecar.stop().success());
    let mended = std::fs::read_to_string(&file).expect("checkpoints");
    let lines: Vec<&str> = mended.lines().collect();
    assert_eq!(lines.len(), at_stop + 1, "{mended}");
    assert!(whole.starts_with(&mended[..mended.len() - lines[at_stop].len() - 1]));
    let offline = offline_verify(&sidecar.store_url());
    assert!(offline.status.success(), "{}", stderr_of(&offline));
    assert!(!stderr_of(&offline).contains("warning"));
    let said = String::from_utf8_lossy(&offline.stdout).into_owned();
    let head = said
        .split("head seq ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .expect("the head in the ok line");
    assert!(
        lines[at_stop].contains(&format!("\"size\":{head},")),
        "{said} {mended}"
    );

    // Torn anywhere but at the end, it is not a crash's doing.
    std::fs::write(
        &file,
        format!("{}\n{mended}", &lines[0][..lines[0].len() - 40]),
    )
    .expect("written");
    let offline = offline_verify(&sidecar.store_url());
    assert_eq!(offline.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&offline.stdout).contains("checkpoint line 1 is unreadable"));
}

#[tokio::test]
async fn a_checkpoint_file_of_100k_lines_is_cut_down_by_the_next_checkpoint() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = checkpoint_file(dir.path());
    let mut sidecar = Sidecar::on_disk(dir.path(), options_with(&FAST_CHECKPOINTS)).await;
    map(&sidecar, "cus_flow", "acme").await;
    assert!(sidecar.stop().success());
    // As a file grew over years of checkpoints before compaction existed.
    let line = std::fs::read_to_string(&file).expect("checkpoints");
    let grown = line.repeat(100_000);
    std::fs::write(&file, &grown).expect("grown");

    sidecar.restart().await;
    send_webhooks(sidecar.webhooks(), "later", 1, Duration::ZERO).await;
    let changed = async {
        while std::fs::read_to_string(&file).expect("checkpoints") == grown {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), changed)
        .await
        .expect("a checkpoint was written");
    let lines = std::fs::read_to_string(&file)
        .expect("checkpoints")
        .lines()
        .count();
    assert!(
        lines <= coresdk::checkpoint::MAX_LINES,
        "{lines} lines after a checkpoint"
    );
    let report = verify(&sidecar).await;
    assert!(report.ok && report.warnings.is_empty(), "{report:?}");
}

/// Records cut off while the sidecar was stopped, and the chain grown again past the cut: the
/// sidecar must not sign that chain, or enough checkpoints would compact the one showing the cut
/// away and verification would pass again.
#[tokio::test]
async fn a_chain_cut_while_stopped_is_never_signed_after_the_restart() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = checkpoint_file(dir.path());
    let mut sidecar = Sidecar::on_disk(
        dir.path(),
        options_with(&["--audit-checkpoint-interval-s", "0.05"]),
    )
    .await;
    map(&sidecar, "cus_flow", "acme").await;
    send_webhooks(sidecar.webhooks(), "before", 4, Duration::ZERO).await;
    let stopped_at = verify(&sidecar).await.head_seq;
    assert!(sidecar.stop().success());
    let evidence = std::fs::read_to_string(&file).expect("checkpoints");
    assert!(
        evidence.contains(&format!("\"size\":{stopped_at},")),
        "{evidence}"
    );

    let db = rusqlite::Connection::open(dir.path().join("coresdk.db")).expect("open db");
    db.execute(
        "DELETE FROM audit WHERE seq > ?1",
        [i64::try_from(stopped_at).expect("small") - 2],
    )
    .expect("cut");
    drop(db);

    sidecar.restart().await;
    send_webhooks(sidecar.webhooks(), "after", 6, Duration::ZERO).await;
    // Many checkpoint intervals with a chain that moved past the cut.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let report = verify(&sidecar).await;
    assert!(report.head_seq > stopped_at, "{report:?}");
    assert!(!report.ok, "{report:?}");
    assert!(sidecar.stop().success());
    assert_eq!(
        std::fs::read_to_string(&file).expect("checkpoints"),
        evidence,
        "no checkpoint was signed over the cut chain"
    );
    let offline = offline_verify(&sidecar.store_url());
    assert_eq!(offline.status.code(), Some(1), "{}", stderr_of(&offline));
}
