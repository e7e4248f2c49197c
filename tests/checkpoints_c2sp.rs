//! C2SP checkpoints against the real binary: the note byte for byte, its signature checked with
//! an Ed25519 implementation other than the sidecar's (ring), the verifier key, one note per
//! size, forged lines, cut and tampered logs, incremental and full verification on both stores,
//! witness cosignatures, and inclusion proofs on request, checked by RFC 9162's algorithm
//! written here.
mod common;

use std::time::Duration;

use base64::Engine as _;
use base64::prelude::BASE64_STANDARD;
use common::audit::{map, offline_verify, verify};
use common::checkpoints::{offline_verify_full, verify_full};
use common::*;
use coresdk::proto::{
    AddCosignaturesRequest, AppendAuditRequest, GetCheckpointRequest, GetInclusionProofRequest,
    QueryAuditRequest,
};
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair as _, UnparsedPublicKey};
use serde_json::json;
use sha2::{Digest as _, Sha256};

/// A checkpoint at start and at shutdown, and when a caller asks for a proof; none in between.
const ONLY_WHEN_ASKED: [&str; 2] = ["--audit-checkpoint-interval-s", "3600"];

fn options_with(args: &[&str]) -> Options {
    let mut options = Options::default();
    options.args.extend(args.iter().map(|a| (*a).to_owned()));
    options
}

fn sha256(parts: &[&[u8]]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update(part);
    }
    hasher.finalize().into()
}

/// RFC 6962 §2.1: the Merkle tree hash of `leaves`.
fn mth(leaves: &[Vec<u8>]) -> [u8; 32] {
    match leaves.len() {
        0 => sha256(&[]),
        1 => sha256(&[&[0], &leaves[0]]),
        n => {
            // The largest power of two smaller than n.
            let k = if n.is_power_of_two() {
                n / 2
            } else {
                n.next_power_of_two() / 2
            };
            sha256(&[&[1], &mth(&leaves[..k]), &mth(&leaves[k..])])
        }
    }
}

/// RFC 9162 §2.1.3.2: whether `path` proves leaf `index` with `leaf` data in the tree of `size`
/// leaves with root `root`.
fn verify_inclusion(index: u64, size: u64, leaf: &[u8], path: &[Vec<u8>], root: &[u8]) -> bool {
    if index >= size {
        return false;
    }
    let (mut fnode, mut snode) = (index, size - 1);
    let mut r = sha256(&[&[0], leaf]);
    for p in path {
        if snode == 0 {
            return false;
        }
        if fnode & 1 == 1 || fnode == snode {
            r = sha256(&[&[1], p, &r]);
            if fnode & 1 == 0 {
                while fnode & 1 == 0 && fnode != 0 {
                    fnode >>= 1;
                    snode >>= 1;
                }
            }
        } else {
            r = sha256(&[&[1], &r, p]);
        }
        fnode >>= 1;
        snode >>= 1;
    }
    snode == 0 && r.as_slice() == root
}

/// Every record's canonical bytes, in order.
async fn canonicals(sidecar: &Sidecar) -> Vec<Vec<u8>> {
    let mut all = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = sidecar
            .audit()
            .query(admin(QueryAuditRequest {
                page_size: 1000,
                page_token: page_token.clone(),
                ..Default::default()
            }))
            .await
            .expect("Query")
            .into_inner();
        all.extend(page.records.into_iter().map(|r| r.canonical));
        if page.next_page_token.is_empty() {
            return all;
        }
        page_token = page.next_page_token;
    }
}

fn app_record(i: usize) -> AppendAuditRequest {
    AppendAuditRequest {
        tenant_id: "acme".into(),
        actor: "app".into(),
        event: format!("app.event.{i}"),
        outcome: "success".into(),
        ..Default::default()
    }
}

/// Appends records `from..to` one after the other.
async fn append(sidecar: &Sidecar, from: usize, to: usize) {
    for i in from..to {
        sidecar
            .audit()
            .append(admin(app_record(i)))
            .await
            .expect("Append");
    }
}

/// Every record, in order.
async fn records(sidecar: &Sidecar) -> Vec<coresdk::proto::AuditRecord> {
    sidecar
        .audit()
        .query(admin(QueryAuditRequest {
            page_size: 1000,
            ..Default::default()
        }))
        .await
        .expect("Query")
        .into_inner()
        .records
}

/// Appends one record and answers it with its inclusion proof.
async fn append_with_proof(sidecar: &Sidecar, i: usize) -> coresdk::proto::AuditRecord {
    sidecar
        .audit()
        .append(admin(AppendAuditRequest {
            include_proof: true,
            ..app_record(i)
        }))
        .await
        .expect("Append with its proof")
        .into_inner()
}

/// The sidecar's Ed25519 key pair, from the seed it keeps beside its SQLite store.
fn sidecar_key(dir: &std::path::Path) -> Ed25519KeyPair {
    let seed = std::fs::read_to_string(dir.join("coresdk.db.audit-key")).expect("the key file");
    let seed = hex::decode(seed.trim()).expect("hex");
    Ed25519KeyPair::from_seed_unchecked(&seed).expect("a seed")
}

/// The signed-note key id: SHA-256(name ‖ "\n" ‖ type ‖ public key)[..4].
fn key_id(name: &str, alg: u8, public: &[u8]) -> [u8; 4] {
    let digest = sha256(&[name.as_bytes(), b"\n", &[alg], public]);
    [digest[0], digest[1], digest[2], digest[3]]
}

/// A parsed checkpoint note: origin, size, root, and the signature lines as (name, bytes).
struct Parsed {
    body: String,
    origin: String,
    size: u64,
    root: Vec<u8>,
    signatures: Vec<(String, Vec<u8>)>,
}

fn parse(note: &str) -> Parsed {
    let (body, signatures) = note.split_once("\n\n").expect("a blank line");
    let body = format!("{body}\n");
    let lines: Vec<&str> = body.lines().collect();
    assert_eq!(lines.len(), 3, "origin, size, root: {note}");
    assert!(signatures.ends_with('\n'), "{note:?}");
    let signatures = signatures
        .lines()
        .map(|line| {
            let line = line.strip_prefix("— ").expect("an em dash and a space");
            let (name, sig) = line.split_once(' ').expect("name and signature");
            (
                name.to_owned(),
                BASE64_STANDARD.decode(sig).expect("base64"),
            )
        })
        .collect();
    Parsed {
        origin: lines[0].to_owned(),
        size: lines[1].parse().expect("a decimal size"),
        root: BASE64_STANDARD.decode(lines[2]).expect("base64 root"),
        body,
        signatures,
    }
}

async fn newest_note(sidecar: &Sidecar) -> Result<String, tonic::Status> {
    sidecar
        .audit()
        .get_checkpoint(admin(GetCheckpointRequest {}))
        .await
        .map(|r| r.into_inner().note)
}

#[tokio::test]
async fn the_checkpoint_is_a_c2sp_note_with_the_key_and_root_the_records_give() {
    let dir = tempfile::tempdir().expect("temp dir");
    let sidecar = Sidecar::on_disk(dir.path(), options_with(&ONLY_WHEN_ASKED)).await;
    let none = newest_note(&sidecar).await.expect_err("no checkpoint yet");
    assert_eq!(none.code(), tonic::Code::NotFound, "{none:?}");
    assert_eq!(error_reason(&none), "CHECKPOINT_NOT_FOUND");

    append(&sidecar, 0, 6).await;
    let record = append_with_proof(&sidecar, 6).await;
    let proof = record.inclusion_proof.expect("a proof");
    assert_eq!((proof.leaf_index, proof.tree_size), (6, 7));
    let note = newest_note(&sidecar).await.expect("a checkpoint");
    assert_eq!(
        note, proof.checkpoint,
        "the proof is against the newest note"
    );

    let key = sidecar_key(dir.path());
    let public = key.public_key().as_ref().to_vec();
    let origin = format!("coresdk.audit/{}", hex::encode(&sha256(&[&public])[..4]));
    let leaves = canonicals(&sidecar).await;
    assert_eq!(leaves.len(), 7);
    let root = mth(&leaves);
    let body = format!("{origin}\n7\n{}\n", BASE64_STANDARD.encode(root));
    let id = key_id(&origin, 0x01, &public);
    let parsed = parse(&note);
    assert_eq!(parsed.body, body, "byte for byte");
    assert_eq!(parsed.signatures.len(), 1, "{note}");
    let (name, signature) = &parsed.signatures[0];
    assert_eq!(name, &origin);
    assert_eq!(&signature[..4], &id, "the key id");
    assert_eq!(signature.len(), 4 + 64);
    UnparsedPublicKey::new(&ED25519, &public)
        .verify(body.as_bytes(), &signature[4..])
        .expect("the signature verifies with ring");
    assert_eq!(
        note,
        format!("{body}\n— {origin} {}\n", BASE64_STANDARD.encode(signature))
    );

    // The proof, checked by RFC 9162's algorithm against the signed root.
    assert!(verify_inclusion(
        6,
        7,
        &record.canonical,
        &proof.hashes,
        &parsed.root
    ));
    // Size 0: the newest checkpoint's tree, and its note.
    let at_checkpoint = sidecar
        .audit()
        .get_inclusion_proof(admin(GetInclusionProofRequest {
            seq: 3,
            tree_size: 0,
        }))
        .await
        .expect("a proof at the checkpoint")
        .into_inner();
    assert_eq!(at_checkpoint.tree_size, 7);
    assert_eq!(at_checkpoint.checkpoint, note);
    assert!(verify_inclusion(
        2,
        7,
        &leaves[2],
        &at_checkpoint.hashes,
        &parsed.root
    ));

    // The verifier key, as C2SP tools take it.
    let printed = run_coresdk(
        None,
        &["audit", "public-key", "--store", &sidecar.store_url()],
        &[],
    );
    assert!(printed.status.success(), "{printed:?}");
    let mut encoded = vec![0x01];
    encoded.extend_from_slice(&public);
    assert_eq!(
        String::from_utf8_lossy(&printed.stdout),
        format!(
            "{origin}+{}+{}\n",
            hex::encode(id),
            BASE64_STANDARD.encode(&encoded)
        )
    );
    // With another origin, another key name and id.
    let other = run_coresdk(
        None,
        &[
            "audit",
            "public-key",
            "--store",
            &sidecar.store_url(),
            "--audit-origin",
            "example.com/audit",
        ],
        &[],
    );
    assert_eq!(
        String::from_utf8_lossy(&other.stdout),
        format!(
            "example.com/audit+{}+{}\n",
            hex::encode(key_id("example.com/audit", 0x01, &public)),
            BASE64_STANDARD.encode(&encoded)
        )
    );

    let report = verify(&sidecar).await;
    assert!(report.ok, "{report:?}");
    assert_eq!(report.checkpoint_size, 7);
    assert_eq!(report.tree_root, hex::encode(root));
}

#[tokio::test]
async fn a_configured_origin_names_the_note_and_a_bad_one_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let sidecar = Sidecar::on_disk(
        dir.path(),
        options_with(&["--audit-origin", "example.com/ledger/1"]),
    )
    .await;
    let record = append_with_proof(&sidecar, 0).await;
    let note = record.inclusion_proof.expect("a proof").checkpoint;
    let parsed = parse(&note);
    assert_eq!(parsed.origin, "example.com/ledger/1");
    assert_eq!(parsed.signatures[0].0, "example.com/ledger/1");

    for bad in ["has space", "a+b", ""] {
        refused_at_start(
            Some(dir.path()),
            &["--store", "memory", "--audit-origin", bad],
            &[],
            "CORESDK_AUDIT_ORIGIN",
        );
    }
}

#[tokio::test]
async fn a_bad_witness_key_is_refused_at_start() {
    let dir = tempfile::tempdir().expect("temp dir");
    let bad_id = vkey("witness.example/w1", 0x01, &witness(1)).replacen("+", "+0", 1);
    for bad in [
        "not a key",
        "witness.example/w1+00000000+AQ==",
        bad_id.as_str(),
        &vkey("witness.example/w1", 0x06, &witness(1)),
    ] {
        refused_at_start(
            Some(dir.path()),
            &["--audit-checkpoint-interval-s", "1"],
            &[("CORESDK_AUDIT_WITNESS_KEYS", bad)],
            "CORESDK_AUDIT_WITNESS_KEYS",
        );
    }
}

#[tokio::test]
async fn concurrent_callers_each_get_a_proof_of_their_record_against_a_note() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("coresdk.db.checkpoints");
    let sidecar = Sidecar::on_disk(dir.path(), options_with(&ONLY_WHEN_ASKED)).await;
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..24 {
        let mut audit = sidecar.audit();
        calls.spawn(async move {
            audit
                .append(admin(AppendAuditRequest {
                    include_proof: true,
                    ..app_record(i)
                }))
                .await
                .expect("Append with its proof")
                .into_inner()
        });
    }
    let mut seqs = Vec::new();
    while let Some(record) = calls.join_next().await {
        let record = record.expect("joined");
        let proof = record.inclusion_proof.expect("a proof");
        let parsed = parse(&proof.checkpoint);
        assert_eq!(parsed.size, proof.tree_size);
        assert!(proof.tree_size >= record.seq);
        assert!(verify_inclusion(
            record.seq - 1,
            proof.tree_size,
            &record.canonical,
            &proof.hashes,
            &parsed.root
        ));
        seqs.push(record.seq);
    }
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=24).collect::<Vec<u64>>());
    let sizes = note_sizes(&file);
    assert!(
        sizes.windows(2).all(|w| w[0] < w[1]) && sizes.len() <= 24,
        "{sizes:?}"
    );
}

/// The sizes of the notes in a checkpoint file, in file order.
fn note_sizes(file: &std::path::Path) -> Vec<u64> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|line| line["v"] == 3)
        .filter_map(|line| line["size"].as_u64())
        .collect()
}

#[tokio::test]
async fn never_two_notes_for_one_size_across_restarts_and_shutdowns() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("coresdk.db.checkpoints");
    let mut sidecar = Sidecar::on_disk(
        dir.path(),
        options_with(&["--audit-checkpoint-interval-s", "0.02"]),
    )
    .await;
    append(&sidecar, 0, 3).await;
    let signed = append_with_proof(&sidecar, 3).await;
    let note = signed.inclusion_proof.expect("a proof").checkpoint;
    // Many intervals with nothing new.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(sidecar.stop().success());
    sidecar.restart().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(newest_note(&sidecar).await.expect("a note"), note);
    append(&sidecar, 4, 6).await;
    assert!(sidecar.stop().success());
    sidecar.restart().await;
    assert!(sidecar.stop().success());

    let sizes = note_sizes(&file);
    assert_eq!(sizes.last(), Some(&6), "{sizes:?}");
    let mut distinct = sizes.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(
        distinct.len(),
        sizes.len(),
        "a size signed twice: {sizes:?}"
    );
    assert!(
        sizes.windows(2).all(|w| w[0] < w[1]),
        "each note covers more: {sizes:?}"
    );
}

#[tokio::test]
async fn a_forged_checkpoint_line_and_a_truncated_log_are_detected() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("coresdk.db.checkpoints");
    let mut sidecar = Sidecar::on_disk(dir.path(), options_with(&ONLY_WHEN_ASKED)).await;
    append(&sidecar, 0, 4).await;
    let note = append_with_proof(&sidecar, 4)
        .await
        .inclusion_proof
        .expect("a proof")
        .checkpoint;
    let store = sidecar.store_url();
    assert!(sidecar.stop().success());
    let intact = std::fs::read_to_string(&file).expect("checkpoints");

    // Another root under the same signature: the note no longer verifies.
    let parsed = parse(&note);
    let forged_root = BASE64_STANDARD.encode(sha256(&[b"forged"]));
    let root = BASE64_STANDARD.encode(&parsed.root);
    let forged = intact.replace(&root, &forged_root);
    assert_ne!(forged, intact);
    // The interval's first checkpoint may come before the proof's on a loaded machine.
    let forged_line = intact
        .lines()
        .position(|line| line.contains(&root))
        .expect("the note's line")
        + 1;
    let bad_line = format!("line {forged_line} has a bad signature");
    std::fs::write(&file, &forged).expect("forged");
    let offline = offline_verify(&store);
    let said = String::from_utf8_lossy(&offline.stdout).to_string();
    assert_eq!(offline.status.code(), Some(1), "{said}");
    assert!(said.contains(&bad_line), "{said}");
    sidecar.restart().await;
    let report = verify(&sidecar).await;
    assert!(
        !report.ok && report.reason.contains(&bad_line),
        "{report:?}"
    );
    assert!(sidecar.stop().success());
    std::fs::write(&file, &intact).expect("restored");

    // The newest records cut off: named online, the note still served, and nothing signed over
    // the cut log, at start or at shutdown.
    let db = rusqlite::Connection::open(dir.path().join("coresdk.db")).expect("open db");
    db.execute("DELETE FROM audit WHERE seq >= 4", [])
        .expect("truncate");
    drop(db);
    sidecar.restart().await;
    let report = verify(&sidecar).await;
    assert_eq!(
        (report.ok, report.first_bad_seq, report.head_seq),
        (false, 4, 3),
        "{report:?}"
    );
    assert!(
        report.reason.contains("records 4 to 5 were removed"),
        "{report:?}"
    );
    assert_eq!(newest_note(&sidecar).await.expect("the note"), note);
    // A proof asked for over the cut log cannot be had, and the call says so at once: with
    // its committed record and no proof (an error would be retried, appending it twice).
    for i in [9, 12] {
        let started = std::time::Instant::now();
        let record = append_with_proof(&sidecar, i).await;
        assert!(record.inclusion_proof.is_none(), "{record:?}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "answered at once"
        );
        let events: Vec<String> = records(&sidecar)
            .await
            .into_iter()
            .map(|r| r.event)
            .collect();
        let event = format!("app.event.{i}");
        assert_eq!(
            events.iter().filter(|e| **e == event).count(),
            1,
            "{events:?}"
        );
        append(&sidecar, 10, 12).await;
    }
    // The log grew past the note again, with other records: a proof against the newest note
    // could never verify, so none is served.
    let status = sidecar
        .audit()
        .get_inclusion_proof(admin(GetInclusionProofRequest {
            seq: 1,
            tree_size: 0,
        }))
        .await
        .expect_err("no proof against a note the log contradicts");
    assert_eq!(
        (status.code(), error_reason(&status).as_str()),
        (tonic::Code::FailedPrecondition, "CHECKPOINT_UNAVAILABLE"),
        "{status:?}: permanent until an operator acts, so not a code clients retry"
    );
    assert!(sidecar.stop().success());
    assert_eq!(std::fs::read_to_string(&file).expect("checkpoints"), intact);
}

/// Stops a sidecar without its shutdown checkpoint.
fn crash(sidecar: &mut Sidecar) {
    sidecar.kill9();
}

#[tokio::test]
async fn tampering_after_the_checkpoint_is_found_incrementally_and_before_it_with_full() {
    let dir = tempfile::tempdir().expect("temp dir");
    let db_path = dir.path().join("coresdk.db");
    let mut sidecar = Sidecar::on_disk(dir.path(), options_with(&ONLY_WHEN_ASKED)).await;
    append(&sidecar, 0, 4).await;
    append_with_proof(&sidecar, 4).await;
    append(&sidecar, 5, 8).await;
    let store = sidecar.store_url();
    let report = verify(&sidecar).await;
    assert!(report.ok, "{report:?}");
    assert_eq!(
        (
            report.checkpoint_size,
            report.records_checked,
            report.head_seq
        ),
        (5, 3, 8),
        "only the records after the checkpoint are rehashed"
    );
    assert_eq!(
        report.tree_root,
        hex::encode(mth(&canonicals(&sidecar).await))
    );
    crash(&mut sidecar);

    // After the checkpoint: found by the default, incremental verification.
    let db = rusqlite::Connection::open(&db_path).expect("open db");
    db.execute("UPDATE audit SET outcome = 'failure' WHERE seq = 7", [])
        .expect("tamper");
    let offline = offline_verify(&store);
    let said = String::from_utf8_lossy(&offline.stdout).to_string();
    assert!(said.starts_with("FAILED at seq 7"), "{said}");
    sidecar.restart().await;
    let report = verify(&sidecar).await;
    assert_eq!(
        (report.ok, report.first_bad_seq, report.checkpoint_size),
        (false, 7, 5),
        "{report:?}"
    );
    crash(&mut sidecar);
    db.execute("UPDATE audit SET outcome = 'success' WHERE seq = 7", [])
        .expect("restore");

    // A record after it whose stored tree hashes were altered is named too.
    let original: Vec<u8> = db
        .query_row("SELECT tree_hashes FROM audit WHERE seq = 6", [], |row| {
            row.get(0)
        })
        .expect("read");
    db.execute(
        "UPDATE audit SET tree_hashes = zeroblob(64) WHERE seq = 6",
        [],
    )
    .expect("tamper");
    let offline = offline_verify(&store);
    let said = String::from_utf8_lossy(&offline.stdout).to_string();
    assert!(
        said.starts_with("FAILED at seq 6") && said.contains("Merkle"),
        "{said}"
    );
    db.execute(
        "UPDATE audit SET tree_hashes = ?1 WHERE seq = 6",
        [original],
    )
    .expect("restore");
    assert!(offline_verify(&store).status.success());

    // Before the checkpoint: the signed root covers it; a full verification rehashes it.
    db.execute("UPDATE audit SET outcome = 'failure' WHERE seq = 3", [])
        .expect("tamper");
    drop(db);
    let offline = offline_verify_full(&store);
    let said = String::from_utf8_lossy(&offline.stdout).to_string();
    assert!(said.starts_with("FAILED at seq 3"), "{said}");
    sidecar.restart().await;
    let report = verify_full(&sidecar).await;
    assert_eq!((report.ok, report.first_bad_seq), (false, 3), "{report:?}");
    assert_eq!(
        report.checkpoint_size, 0,
        "full starts from the first record"
    );
}

/// A witness key pair: Ed25519 from a fixed seed.
fn witness(seed: u8) -> Ed25519KeyPair {
    Ed25519KeyPair::from_seed_unchecked(&[seed; 32]).expect("a seed")
}

fn vkey(name: &str, alg: u8, key: &Ed25519KeyPair) -> String {
    let public = key.public_key().as_ref();
    let mut encoded = vec![alg];
    encoded.extend_from_slice(public);
    format!(
        "{name}+{}+{}",
        hex::encode(key_id(name, alg, public)),
        BASE64_STANDARD.encode(encoded)
    )
}

/// A plain Ed25519 note signature line.
fn ed25519_line(name: &str, key: &Ed25519KeyPair, body: &str) -> String {
    let mut sig = key_id(name, 0x01, key.public_key().as_ref()).to_vec();
    sig.extend_from_slice(key.sign(body.as_bytes()).as_ref());
    format!("— {name} {}\n", BASE64_STANDARD.encode(sig))
}

/// A C2SP tlog-cosignature `cosignature/v1` line: time ‖ Ed25519 over the header, the time
/// line and the body.
fn cosignature_line(name: &str, key: &Ed25519KeyPair, body: &str, time: u64) -> String {
    let message = format!("cosignature/v1\ntime {time}\n{body}");
    let mut sig = key_id(name, 0x04, key.public_key().as_ref()).to_vec();
    sig.extend_from_slice(&time.to_be_bytes());
    sig.extend_from_slice(key.sign(message.as_bytes()).as_ref());
    format!("— {name} {}\n", BASE64_STANDARD.encode(sig))
}

async fn cosign(sidecar: &Sidecar, note: String) -> Result<String, tonic::Status> {
    sidecar
        .audit()
        .add_cosignatures(admin(AddCosignaturesRequest { note }))
        .await
        .map(|r| r.into_inner().note)
}

#[tokio::test]
async fn witness_cosignatures_are_verified_stored_and_served() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (w1, w2, stranger) = (witness(1), witness(2), witness(3));
    let keys = format!(
        "{},{}",
        vkey("witness.example/w1", 0x01, &w1),
        vkey("witness.example/w2", 0x04, &w2)
    );
    let mut options = options_with(&ONLY_WHEN_ASKED);
    options
        .envs
        .push(("CORESDK_AUDIT_WITNESS_KEYS".into(), keys));
    let mut sidecar = Sidecar::on_disk(dir.path(), options).await;
    let note = append_with_proof(&sidecar, 0)
        .await
        .inclusion_proof
        .expect("a proof")
        .checkpoint;
    let body = parse(&note).body;
    let first = ed25519_line("witness.example/w1", &w1, &body);
    let second = cosignature_line("witness.example/w2", &w2, &body, 1_700_000_000);

    let stored = cosign(&sidecar, format!("{note}{first}{second}"))
        .await
        .expect("cosigned");
    assert_eq!(stored, format!("{note}{first}{second}"));
    assert_eq!(newest_note(&sidecar).await.expect("a note"), stored);
    // A witness signing again replaces its line; the sidecar's own line may be left out.
    let again = cosignature_line("witness.example/w2", &w2, &body, 1_700_000_100);
    let stored = cosign(&sidecar, format!("{body}\n{again}"))
        .await
        .expect("cosigned again");
    assert_eq!(stored, format!("{note}{first}{again}"));
    assert!(verify(&sidecar).await.ok);

    let refused = |status: tonic::Status, code: tonic::Code| {
        assert_eq!(status.code(), code, "{status:?}");
        status
    };
    // A key that is not a configured witness.
    let unknown = ed25519_line("witness.example/w3", &stranger, &body);
    let status = cosign(&sidecar, format!("{note}{unknown}"))
        .await
        .expect_err("unknown witness");
    let detail = problem(&refused(status, tonic::Code::InvalidArgument)).detail;
    assert!(detail.contains("not configured witnesses"), "{detail}");
    // A witness's signature of another body.
    let mut bad = ed25519_line("witness.example/w1", &w1, "another body\n");
    assert_ne!(bad, first);
    let status = cosign(&sidecar, format!("{note}{bad}"))
        .await
        .expect_err("bad signature");
    let detail = problem(&refused(status, tonic::Code::InvalidArgument)).detail;
    assert!(detail.contains("does not verify"), "{detail}");
    // A cosignature/v1 line whose time was changed after signing.
    bad = cosignature_line("witness.example/w2", &w2, &body, 1_700_000_000);
    let mut raw = BASE64_STANDARD
        .decode(bad.trim_end().rsplit(' ').next().expect("sig"))
        .expect("base64");
    raw[11] ^= 1;
    bad = format!("— witness.example/w2 {}\n", BASE64_STANDARD.encode(raw));
    let status = cosign(&sidecar, format!("{note}{bad}"))
        .await
        .expect_err("bad time");
    refused(status, tonic::Code::InvalidArgument);
    // A body the sidecar never signed.
    let other_body = body.replace("\n1\n", "\n2\n");
    let status = cosign(
        &sidecar,
        format!(
            "{other_body}\n{}",
            ed25519_line("witness.example/w1", &w1, &other_body)
        ),
    )
    .await
    .expect_err("never signed");
    let status = refused(status, tonic::Code::NotFound);
    assert_eq!(error_reason(&status), "CHECKPOINT_NOT_FOUND");
    // Only an admin may add them.
    let status = sidecar
        .audit()
        .add_cosignatures(AddCosignaturesRequest {
            note: format!("{note}{first}"),
        })
        .await
        .expect_err("not an admin");
    assert!(
        matches!(
            status.code(),
            tonic::Code::PermissionDenied | tonic::Code::Unauthenticated
        ),
        "{status:?}"
    );
    assert!(sidecar.stop().success());
    // Kept across a restart, and by the shutdown checkpoint (nothing new to sign).
    sidecar.restart().await;
    assert_eq!(
        newest_note(&sidecar).await.expect("a note"),
        format!("{note}{first}{again}")
    );
}

/// Delivers a signed webhook asking for its record's inclusion proof.
async fn deliver_with_proof(
    sidecar: &Sidecar,
    body: Vec<u8>,
) -> coresdk::proto::HandleStripeWebhookResponse {
    let mut request = signed(SECRET, body);
    request.include_proof = true;
    sidecar
        .webhooks()
        .handle_stripe_webhook(request)
        .await
        .expect("the delivery's result")
        .into_inner()
}

#[tokio::test]
async fn a_webhook_answers_its_record_with_a_proof_on_request() {
    let dir = tempfile::tempdir().expect("temp dir");
    let sidecar = Sidecar::on_disk(dir.path(), options_with(&ONLY_WHEN_ASKED)).await;
    map(&sidecar, "cus_proof", "acme").await;
    let body = event(
        "evt_proof_1",
        "invoice.paid",
        now(),
        json!({"customer": "cus_proof"}),
    );
    let answer = deliver_with_proof(&sidecar, body).await;
    let proof = answer.inclusion_proof.expect("a proof");
    assert_eq!(proof.leaf_index + 1, answer.audit_seq);
    let parsed = parse(&proof.checkpoint);
    assert_eq!(parsed.size, proof.tree_size);
    assert!(proof.tree_size >= answer.audit_seq);
    let leaves = canonicals(&sidecar).await;
    let leaf = &leaves[usize::try_from(proof.leaf_index).expect("small")];
    assert!(verify_inclusion(
        proof.leaf_index,
        proof.tree_size,
        leaf,
        &proof.hashes,
        &parsed.root
    ));
    // Not some other record.
    assert!(!verify_inclusion(
        proof.leaf_index,
        proof.tree_size,
        b"another record",
        &proof.hashes,
        &parsed.root
    ));

    // Without checkpoints there is nothing to prove against.
    let memory = Sidecar::start(Options::default()).await;
    let status = memory
        .audit()
        .append(admin(AppendAuditRequest {
            include_proof: true,
            ..app_record(0)
        }))
        .await
        .expect_err("no checkpoints");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    assert_eq!(error_reason(&status), "CHECKPOINTS_OFF");
    // Refused before the write: a retry cannot append the record twice.
    assert!(records(&memory).await.is_empty());
    let status = newest_note(&memory).await.expect_err("no checkpoints");
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
}

#[tokio::test]
async fn incremental_verification_on_postgresql() {
    let url = common::pg::fresh_database(common::pg::server_url()).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("checkpoints");
    let key = dir.path().join("key");
    let mut options = common::pg::replica_options(&url);
    options.args.extend(
        [
            "--audit-checkpoint-file",
            file.to_str().expect("utf-8"),
            "--audit-signing-key-file",
            key.to_str().expect("utf-8"),
        ]
        .map(String::from),
    );
    options.args.extend(ONLY_WHEN_ASKED.map(String::from));
    let sidecar = Sidecar::start(options).await;
    let before = verify(&sidecar).await.head_seq;
    let signed = append_with_proof(&sidecar, 0).await;
    let size = signed.inclusion_proof.expect("a proof").tree_size;
    assert_eq!(size, before + 1);
    append(&sidecar, 1, 4).await;
    let report = verify(&sidecar).await;
    assert!(report.ok, "{report:?}");
    assert_eq!(
        (report.checkpoint_size, report.records_checked),
        (size, 3),
        "only the records after the checkpoint are rehashed"
    );
    assert_eq!(
        report.tree_root,
        hex::encode(mth(&canonicals(&sidecar).await))
    );

    let (db, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(connection);
    let after = i64::try_from(size + 2).expect("small");
    db.execute(
        "UPDATE audit SET outcome = 'failure' WHERE seq = $1",
        &[&after],
    )
    .await
    .expect("tamper");
    let report = verify(&sidecar).await;
    assert_eq!(
        (report.ok, report.first_bad_seq, report.checkpoint_size),
        (false, size + 2, size),
        "{report:?}"
    );
    db.execute(
        "UPDATE audit SET outcome = 'success' WHERE seq = $1",
        &[&after],
    )
    .await
    .expect("restore");
    assert!(verify(&sidecar).await.ok);

    let before_checkpoint = i64::try_from(size).expect("small");
    db.execute(
        "UPDATE audit SET outcome = 'failure' WHERE seq = $1",
        &[&before_checkpoint],
    )
    .await
    .expect("tamper");
    let report = verify_full(&sidecar).await;
    assert_eq!(
        (report.ok, report.first_bad_seq),
        (false, size),
        "{report:?}"
    );
}

#[tokio::test]
async fn a_proof_that_cannot_be_signed_in_time_leaves_the_committed_record_without_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("coresdk.db.checkpoints");
    // The sidecar's own request timeout is shorter than the longest proof wait: the wait must
    // end before it, or the committed record is answered as a REQUEST_TIMEOUT.
    let options = options_with(&[
        ONLY_WHEN_ASKED[0],
        ONLY_WHEN_ASKED[1],
        "--request-timeout-s",
        "1",
    ]);
    let mut sidecar = Sidecar::on_disk(dir.path(), options).await;
    append(&sidecar, 0, 2).await;
    assert!(sidecar.stop().success());
    // No checkpoint can be written any more (root ignores file modes): the file is a link into
    // a directory that does not exist.
    std::fs::remove_file(&file).expect("remove the checkpoints");
    std::os::unix::fs::symlink(dir.path().join("gone").join("checkpoints"), &file)
        .expect("dangling link");
    sidecar.restart().await;
    let record = append_with_proof(&sidecar, 2).await;
    assert!(record.inclusion_proof.is_none(), "{record:?}");
    assert_eq!(record.seq, 3, "{record:?}");
    let events: Vec<String> = records(&sidecar)
        .await
        .into_iter()
        .map(|r| r.event)
        .collect();
    assert_eq!(events, ["app.event.0", "app.event.1", "app.event.2"]);

    // The webhook too: its result, with no proof, and the delivery handled once.
    let body = event(
        "evt_no_proof",
        "customer.created",
        now(),
        json!({"id": "cus_np"}),
    );
    let result = deliver_with_proof(&sidecar, body).await;
    assert!(result.inclusion_proof.is_none(), "{result:?}");
    assert_eq!(result.audit_seq, 4, "{result:?}");
    let _ = sidecar.stop();
}

/// Removes the stored tree hashes of records `from..=to`, as a replica of a version before the
/// tree (or an interrupted build) leaves them.
fn unbuild(dir: &std::path::Path, from: u64, to: u64) {
    let db = rusqlite::Connection::open(dir.join("coresdk.db")).expect("open db");
    db.busy_timeout(Duration::from_secs(5))
        .expect("busy timeout");
    let changed = db
        .execute(
            "UPDATE audit SET tree_hashes = NULL WHERE seq BETWEEN ?1 AND ?2",
            [from, to],
        )
        .expect("unbuild");
    assert_eq!(changed as u64, to - from + 1);
}

#[tokio::test]
async fn records_appended_without_their_tree_are_built_and_signed_and_a_gap_is_named() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("coresdk.db.checkpoints");
    let mut sidecar = Sidecar::on_disk(dir.path(), options_with(&ONLY_WHEN_ASKED)).await;
    append(&sidecar, 0, 3).await;
    assert!(
        append_with_proof(&sidecar, 3)
            .await
            .inclusion_proof
            .is_some()
    );
    append(&sidecar, 4, 8).await;
    // The newest records, past the note of 4, as an older replica appends them while this one
    // runs: not built yet, which is no fault.
    unbuild(dir.path(), 6, 8);
    for report in [verify(&sidecar).await, verify_full(&sidecar).await] {
        assert!(report.ok, "{report:?}");
        assert_eq!(report.head_seq, 8, "{report:?}");
    }
    // The shutdown checkpoint builds them first, then signs all 8.
    assert!(sidecar.stop().success());
    assert_eq!(
        note_sizes(&file).last(),
        Some(&8),
        "{:?}",
        note_sizes(&file)
    );
    sidecar.restart().await;
    for report in [verify(&sidecar).await, verify_full(&sidecar).await] {
        assert!(report.ok, "{report:?}");
        assert_eq!(report.head_seq, 8, "{report:?}");
    }
    assert!(sidecar.stop().success());

    // A record's tree hashes removed before records that keep theirs: built again from its
    // bytes at start (only that record's; the others are never rewritten), and the log
    // verifies, since nothing it vouches for changed.
    unbuild(dir.path(), 3, 3);
    sidecar.restart().await;
    let report = verify_full(&sidecar).await;
    assert!(report.ok, "{report:?}");
    assert!(sidecar.stop().success());

    // Hashes that are not the record's are named, and left as they are (the evidence).
    let db = rusqlite::Connection::open(dir.path().join("coresdk.db")).expect("open db");
    db.execute("UPDATE audit SET tree_hashes = x'00' WHERE seq = 3", [])
        .expect("edited");
    drop(db);
    sidecar.restart().await;
    let report = verify_full(&sidecar).await;
    assert_eq!((report.ok, report.first_bad_seq), (false, 3), "{report:?}");
    let _ = sidecar.stop();
    let db = rusqlite::Connection::open(dir.path().join("coresdk.db")).expect("open db");
    let kept: Vec<u8> = db
        .query_row("SELECT tree_hashes FROM audit WHERE seq = 3", [], |row| {
            row.get(0)
        })
        .expect("read");
    assert_eq!(kept, vec![0]);
}

#[tokio::test]
async fn a_refused_log_is_not_rechecked_per_call_until_it_moves() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut sidecar = Sidecar::on_disk(dir.path(), options_with(&ONLY_WHEN_ASKED)).await;
    append(&sidecar, 0, 4).await;
    assert!(
        append_with_proof(&sidecar, 4)
            .await
            .inclusion_proof
            .is_some()
    );
    let store = sidecar.store_url();
    assert!(sidecar.stop().success());
    let db = rusqlite::Connection::open(dir.path().join("coresdk.db")).expect("open db");
    db.execute("DELETE FROM audit WHERE seq >= 4", [])
        .expect("truncate");
    drop(db);

    let log = dir.path().join("sidecar.log");
    let stderr = std::fs::File::create(&log).expect("log file");
    let args: Vec<String> = ["--store", store.as_str()]
        .into_iter()
        .chain(ONLY_WHEN_ASKED)
        .map(str::to_owned)
        .collect();
    let (mut child, addr) = spawn_with_stderr(&args, &Options::default().envs, stderr.into());
    let mut audit =
        coresdk::proto::audit_service_client::AuditServiceClient::new(connect(&addr).await);
    // Records past the note, then one asking for its proof, and the same call again and again
    // (its idempotency key answers the record stored): the log does not move, so it is not checked again, and each call still answers
    // at once, with the record and no proof.
    for i in 4..7 {
        audit.append(admin(app_record(i))).await.expect("Append");
    }
    let started = std::time::Instant::now();
    for _ in 0..6 {
        let record = audit
            .append(admin(AppendAuditRequest {
                include_proof: true,
                idempotency_key: "refused-once".into(),
                ..app_record(9)
            }))
            .await
            .expect("the record")
            .into_inner();
        assert_eq!(record.seq, 7, "past the note of 5 the log contradicts");
        assert!(record.inclusion_proof.is_none(), "{record:?}");
    }
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "answered at once"
    );
    child.kill().expect("kill");
    child.wait().expect("reaped");
    let text = std::fs::read_to_string(&log).expect("the log");
    let refusals = text
        .lines()
        .filter(|line| line.contains("AUDIT CHAIN CUT OR REWRITTEN"))
        .count();
    // At start, and once the call's record moved the log: not once a call.
    assert!((1..=2).contains(&refusals), "{refusals} refusals: {text}");
}
