//! Self-contained proofs that one audit record is in the log, in the C2SP `tlog-proof` format
//! (<https://c2sp.org/tlog-proof>), checked offline with nothing but the log's verifier key:
//!
//! ```text
//! c2sp.org/tlog-proof@v1
//! extra <base64 of the record's canonical bytes>
//! index <leaf index = seq - 1>
//! <base64 inclusion proof hash, from the leaf's sibling up>
//! …
//!
//! <the signed checkpoint note, verbatim>
//! ```
//!
//! Where it differs from a plain `tlog-proof`: the spec leaves the entry itself out (the proof
//! is a detached signature over data the verifier already has) and calls `extra` opaque,
//! unauthenticated context. Here `extra` carries the record's canonical bytes, so one file is
//! enough to show the record to a third party; it needs no authentication of its own, because
//! its leaf hash is what the inclusion proof binds to the signed root. A generic `tlog-proof`
//! verifier checks the file unchanged when given those bytes as the entry.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

use crate::store::StoreTx;
use crate::tlog::{self, Hash};

/// The first line of every proof.
pub const HEADER: &str = "c2sp.org/tlog-proof@v1";

/// Proofs are a few kilobytes (a record under 5 KiB, at most 64 hashes, a note with a few
/// cosignatures); anything much larger is not one, and is not read whole.
pub const MAX_PROOF_BYTES: u64 = 256 * 1024;

/// An inclusion proof has one hash per level of a tree of at most 2⁶⁴ leaves.
const MAX_HASHES: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum ProofError {
    #[error("not a tlog proof: {0}")]
    Malformed(String),
    #[error("the key is not a signed-note verifier key (<name>+<hex id>+<base64 key>): {0}")]
    Key(String),
    #[error("the checkpoint is not signed by {key}: {why}")]
    Unsigned { key: String, why: String },
    #[error("the checkpoint is of the log {origin}, not of {key_name} whose key was given")]
    OtherLog { origin: String, key_name: String },
    #[error(
        "the record is not in the signed tree of {tree_size} records at index {index}: the inclusion proof does not lead from its bytes to the checkpoint's root"
    )]
    NotIncluded { index: u64, tree_size: u64 },
    #[error("the record says it is seq {said}, but the proof is for seq {proved}")]
    OtherSeq { said: String, proved: u64 },
}

/// What a proof file holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProofFile {
    /// The record's canonical bytes (its leaf data).
    pub record: Vec<u8>,
    /// The record's leaf index, `seq - 1`.
    pub index: u64,
    pub hashes: Vec<Hash>,
    /// The signed checkpoint note, verbatim (ends with a newline).
    pub checkpoint: String,
}

impl ProofFile {
    pub fn to_text(&self) -> String {
        let mut text = format!(
            "{HEADER}\nextra {}\nindex {}\n",
            STANDARD.encode(&self.record),
            self.index
        );
        for hash in &self.hashes {
            text.push_str(&STANDARD.encode(hash));
            text.push('\n');
        }
        text.push('\n');
        text.push_str(&self.checkpoint);
        text
    }

    pub fn parse(text: &str) -> Result<ProofFile, ProofError> {
        let malformed = |why: &str| ProofError::Malformed(why.to_owned());
        let mut rest = text;
        let mut line = || -> Result<&str, ProofError> {
            let (line, after) = rest
                .split_once('\n')
                .ok_or_else(|| malformed("it ends before its checkpoint"))?;
            rest = after;
            Ok(line)
        };
        if line()? != HEADER {
            return Err(malformed(&format!("its first line is not {HEADER}")));
        }
        let record = line()?
            .strip_prefix("extra ")
            .and_then(|b64| STANDARD.decode(b64).ok())
            .ok_or_else(|| {
                malformed(
                    "its second line is not `extra <base64 record>`: the file carries no record",
                )
            })?;
        let index = line()?
            .strip_prefix("index ")
            // Digits only: `u64::from_str` also takes a leading `+`, which C2SP does not.
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()) && (*n == "0" || !n.starts_with('0')))
            .and_then(|n| n.parse::<u64>().ok())
            .ok_or_else(|| malformed("its third line is not `index <decimal>`"))?;
        let mut hashes = Vec::new();
        loop {
            let line = line()?;
            if line.is_empty() {
                break;
            }
            if hashes.len() == MAX_HASHES {
                return Err(malformed("it has more proof hashes than any tree needs"));
            }
            let hash = STANDARD
                .decode(line)
                .ok()
                .and_then(|bytes| Hash::try_from(bytes.as_slice()).ok())
                .ok_or_else(|| malformed("a proof line is not a base64 SHA-256 hash"))?;
            hashes.push(hash);
        }
        Ok(ProofFile {
            record,
            index,
            hashes,
            checkpoint: rest.to_owned(),
        })
    }
}

/// The body of a C2SP `tlog-checkpoint`: origin, tree size and root (extension lines, if
/// any, follow and are not needed here).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointBody {
    pub origin: String,
    pub size: u64,
    pub root: Hash,
}

impl CheckpointBody {
    /// The body at the start of `text` (a note's text, or the whole note), read by
    /// `tlog_tiles`' C2SP checkpoint parser.
    pub fn parse(text: &str) -> Option<CheckpointBody> {
        let mut reader = std::io::Cursor::new(text.as_bytes());
        let checkpoint = tlog_tiles::Checkpoint::from_reader(&mut reader, false).ok()?;
        Some(CheckpointBody {
            origin: checkpoint.origin().to_owned(),
            size: checkpoint.size(),
            root: checkpoint.hash().0,
        })
    }
}

/// What a proof that checked out shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    pub seq: u64,
    pub checkpoint: CheckpointBody,
    /// `<name>+<hex id>` of the key that signed the checkpoint.
    pub signed_by: String,
}

/// Checks a proof file with the log's verifier key alone: the checkpoint's signature, that it
/// is that key's log, the record's leaf hash, and the inclusion proof to the signed root.
pub fn check(text: &str, verifier_key: &str) -> Result<Checked, ProofError> {
    let verifier = signed_note::StandardVerifier::new(verifier_key.trim())
        .map_err(|e| ProofError::Key(e.to_string()))?;
    let key = {
        use signed_note::Verifier as _;
        (
            verifier.name().to_owned(),
            format!("{}+{:08x}", verifier.name(), verifier.key_id()),
        )
    };
    let proof = ProofFile::parse(text)?;
    let note = signed_note::Note::from_bytes(proof.checkpoint.as_bytes())
        .map_err(|e| ProofError::Malformed(format!("its checkpoint is not a signed note: {e}")))?;
    note.verify(&signed_note::VerifierList::new(vec![Box::new(verifier)]))
        .map_err(|e| ProofError::Unsigned {
            key: key.1.clone(),
            why: e.to_string(),
        })?;
    let body = std::str::from_utf8(note.text())
        .ok()
        .and_then(CheckpointBody::parse)
        .ok_or_else(|| {
            ProofError::Malformed(
                "its checkpoint's body is not `<origin>`, `<size>`, `<base64 root>`".into(),
            )
        })?;
    // C2SP names a log's key after its origin: a key of another name vouches for another log.
    if body.origin != key.0 {
        return Err(ProofError::OtherLog {
            origin: body.origin,
            key_name: key.0,
        });
    }
    let leaf = tlog::leaf_hash(&proof.record);
    if !tlog::check_inclusion(&proof.hashes, body.size, &body.root, proof.index, &leaf) {
        return Err(ProofError::NotIncluded {
            index: proof.index,
            tree_size: body.size,
        });
    }
    let seq = proof.index + 1;
    // The leaf is bound to its place already; a record whose own seq disagrees was sealed
    // somewhere else and would mislead whoever reads it.
    let said = serde_json::from_slice::<serde_json::Value>(&proof.record)
        .ok()
        .and_then(|record| record.get("seq").and_then(serde_json::Value::as_u64));
    if said != Some(seq) {
        return Err(ProofError::OtherSeq {
            said: said.map_or_else(|| "no seq".to_owned(), |s| s.to_string()),
            proved: seq,
        });
    }
    Ok(Checked {
        seq,
        checkpoint: body,
        signed_by: key.1,
    })
}

#[derive(Debug, thiserror::Error)]
pub enum ProveError {
    #[error(
        "the newest signed checkpoint covers {size} records, not yet record {seq}; try again after the next checkpoint"
    )]
    NotCovered { seq: u64, size: u64 },
    #[error("there is no signed checkpoint yet; try again after the first one")]
    NoCheckpoint,
    #[error("the checkpoint is not a C2SP checkpoint note")]
    BadCheckpoint,
    #[error(
        "the store holds {records} records, fewer than the {size} its newest checkpoint signed: records were removed"
    )]
    Truncated { records: u64, size: u64 },
    #[error(
        "the store's tree of {size} records does not have the signed root: the database was altered after the checkpoint"
    )]
    OtherRoot { size: u64 },
    #[error("record {0} is missing from the store")]
    Missing(u64),
    #[error(
        "record {0} in the store is not the record the signed tree holds: the database was altered after the checkpoint"
    )]
    Altered(u64),
    /// A read of the signed tree failed: hashes or records it needs are gone or damaged.
    #[error("the store cannot give the signed tree: {0}")]
    Store(#[from] crate::problem::Error),
}

/// The inclusion proof of record `seq` (from 1) in the tree of `size` records whose signed
/// root is `root`, after checking that the store still has that tree: a log cut or rewritten
/// since the note was signed never gets a proof that cannot verify against it.
pub fn inclusion_against(
    tx: &mut dyn StoreTx,
    seq: u64,
    size: u64,
    root: &Hash,
) -> Result<Vec<Hash>, ProveError> {
    if size < seq || seq == 0 {
        return Err(ProveError::NotCovered { seq, size });
    }
    let records = tx.audit_head().map_err(crate::problem::Error::from)?.seq;
    if records < size {
        return Err(ProveError::Truncated { records, size });
    }
    if tlog::tree_root(tx, size)? != *root {
        return Err(ProveError::OtherRoot { size });
    }
    Ok(tlog::inclusion_proof(tx, seq - 1, size)?)
}

/// Builds the proof of record `seq` against `checkpoint` (a signed note whose tree covers
/// it) from the store's stored tree, after checking the store still has that tree.
pub fn prove(tx: &mut dyn StoreTx, seq: u64, checkpoint: &str) -> Result<ProofFile, ProveError> {
    let body = signed_note::Note::from_bytes(checkpoint.as_bytes())
        .ok()
        .and_then(|note| {
            std::str::from_utf8(note.text())
                .ok()
                .and_then(CheckpointBody::parse)
        })
        .ok_or(ProveError::BadCheckpoint)?;
    let hashes = inclusion_against(tx, seq, body.size, &body.root)?;
    let record = tx
        .audit_record(seq)
        .map_err(crate::problem::Error::from)?
        .ok_or(ProveError::Missing(seq))?;
    // The stored tree is intact (its root is the signed one), but the record's own bytes may
    // not be: a file that could never check out is refused here, with the reason.
    let leaf = tlog::leaf_hash(&record.canonical);
    if !tlog::check_inclusion(&hashes, body.size, &body.root, seq - 1, &leaf) {
        return Err(ProveError::Altered(seq));
    }
    Ok(ProofFile {
        record: record.canonical,
        index: seq - 1,
        hashes,
        checkpoint: checkpoint.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use super::*;
    use crate::store::{CommitListener, Committed, Store, StoreUrl};

    struct Ignore;

    impl CommitListener for Ignore {
        fn committed(&self, _: Vec<Committed>) {}
    }

    /// A signed-note signer named `name` and its verifier key.
    fn signer(name: &str, seed: u8) -> (signed_note::StandardSigner, String) {
        let key = ed25519_dalek::SigningKey::from_bytes(&[seed; 32]);
        let public = [&[1u8][..], key.verifying_key().as_bytes()].concat();
        let private = [&[1u8][..], &key.to_bytes()].concat();
        let skey = format!(
            "PRIVATE+KEY+{name}+{:08x}+{}",
            signed_note::key_id(name, &public),
            STANDARD.encode(private)
        );
        (
            signed_note::StandardSigner::new(&skey).expect("a signer key"),
            signed_note::new_ed25519_verifier_key(name, &key.verifying_key()),
        )
    }

    fn checkpoint(signer: &signed_note::StandardSigner, size: u64, root: &Hash) -> String {
        use signed_note::Signer as _;
        let body = format!("{}\n{size}\n{}\n", signer.name(), STANDARD.encode(root));
        let mut note = signed_note::Note::new(body.as_bytes(), &[]).expect("a note");
        note.add_sigs(&[signer]).expect("signed");
        String::from_utf8(note.to_bytes()).expect("utf-8")
    }

    #[tokio::test]
    async fn a_proof_built_from_the_stored_tree_checks_out_with_the_key_alone() {
        let dir = tempfile::tempdir().expect("a directory");
        let db = dir.path().join("coresdk.db");
        let store = Store::open(
            &StoreUrl::Sqlite(db.clone()),
            None,
            Arc::new(Ignore),
            Arc::new(crate::flags::FlagCache::new(BTreeMap::new())),
        )
        .expect("a store");
        store
            .write(|tx| {
                for i in 0..10 {
                    tx.append_audit(
                        crate::audit::NewAuditRecord {
                            tenant_id: "acme".into(),
                            actor: "test".into(),
                            event: format!("app.{i}"),
                            outcome: "success".into(),
                            metadata: Default::default(),
                        },
                        1_000 + i,
                    )?;
                }
                Ok(())
            })
            .await
            .expect("appended");
        let root = store.read(|tx| tlog::tree_root(tx, 8)).await.expect("root");
        let (log, vkey) = signer("audit.example", 3);
        let prove_with = |seq: u64, note: String| {
            store.read(move |tx| Ok(prove(tx, seq, &note).map_err(|e| e.to_string())))
        };

        let proof = prove_with(5, checkpoint(&log, 8, &root))
            .await
            .expect("read")
            .expect("a proof");
        let checked = check(&proof.to_text(), &vkey).expect("it checks out");
        assert_eq!((checked.seq, checked.checkpoint.size), (5, 8));
        let (_, other_key) = signer("audit.example", 4);
        assert!(matches!(
            check(&proof.to_text(), &other_key),
            Err(ProofError::Unsigned { .. })
        ));

        for (seq, note, refused) in [
            (
                9,
                checkpoint(&log, 8, &root),
                "covers 8 records, not yet record 9",
            ),
            (
                5,
                checkpoint(&log, 8, &[0; 32]),
                "does not have the signed root",
            ),
            (5, checkpoint(&log, 12, &root), "fewer than the 12"),
        ] {
            let e = prove_with(seq, note)
                .await
                .expect("read")
                .expect_err(refused);
            assert!(e.contains(refused), "{e}");
        }

        // Record 3's bytes altered behind the store's back (its stored tree hashes stay).
        let tamper = rusqlite::Connection::open(&db).expect("open");
        tamper
            .busy_timeout(std::time::Duration::from_secs(5))
            .expect("busy timeout");
        tamper
            .execute(
                "UPDATE audit SET canonical = CAST(replace(CAST(canonical AS TEXT), 'success', 'failure') AS BLOB) WHERE seq = 3",
                [],
            )
            .expect("tamper");
        let e = prove_with(3, checkpoint(&log, 8, &root))
            .await
            .expect("read")
            .expect_err("an altered record");
        assert!(
            e.contains("record 3 in the store is not the record the signed tree holds"),
            "{e}"
        );
        prove_with(4, checkpoint(&log, 8, &root))
            .await
            .expect("read")
            .expect("the records around it still prove");
    }

    fn sample() -> ProofFile {
        ProofFile {
            record: br#"{"seq":3}"#.to_vec(),
            index: 2,
            hashes: vec![[1; 32], [2; 32]],
            checkpoint: "example.com/log\n3\nAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n\n\u{2014} example.com/log abcd\n".into(),
        }
    }

    #[test]
    fn a_proof_file_reads_back_as_written() {
        let proof = sample();
        assert_eq!(ProofFile::parse(&proof.to_text()).expect("parses"), proof);
    }

    #[test]
    fn malformed_files_are_named_not_guessed() {
        let text = sample().to_text();
        for (broken, why) in [
            (
                text.replacen(HEADER, "c2sp.org/tlog-proof@v2", 1),
                "first line",
            ),
            (text.replacen("extra ", "extras ", 1), "no record"),
            (text.replacen("index 2", "index 02", 1), "index"),
            (text.replacen("index 2", "index +2", 1), "index"),
            (text.replacen("index 2", "index ", 1), "index"),
            (text.replacen("AQEB", "AQE", 1), "not a base64"),
            (
                text.split("\n\n").next().expect("head").to_owned(),
                "ends before",
            ),
        ] {
            let e = ProofFile::parse(&broken).expect_err(why);
            assert!(e.to_string().contains(why), "{why}: {e}");
        }
    }

    #[test]
    fn checkpoint_bodies_need_origin_size_and_a_32_byte_root() {
        let root = STANDARD.encode([7u8; 32]);
        assert_eq!(
            CheckpointBody::parse(&format!("o\n12\n{root}\n")),
            Some(CheckpointBody {
                origin: "o".into(),
                size: 12,
                root: [7; 32]
            })
        );
        assert_eq!(CheckpointBody::parse(&format!("o\n012\n{root}\n")), None);
        assert_eq!(CheckpointBody::parse("o\n12\nAAAA\n"), None);
        assert_eq!(CheckpointBody::parse(&format!("\n12\n{root}\n")), None);
    }
}
