//! Signed checkpoints of the audit log, kept outside the database, as C2SP `tlog-checkpoint`
//! notes (<https://c2sp.org/tlog-checkpoint>, <https://c2sp.org/signed-note>).
//!
//! A checkpoint is the note
//!
//! ```text
//! <origin>
//! <tree size, decimal>
//! <base64 root hash of the RFC 6962 tree of that many records>
//!
//! — <origin> base64(key id ‖ Ed25519 signature of the three lines above)
//! [— <witness> base64(key id ‖ cosignature) …]
//! ```
//!
//! signed with the sidecar's Ed25519 key under the key name `origin` (key id: the first four
//! bytes of SHA-256(origin ‖ "\n" ‖ 0x01 ‖ public key)), so any C2SP tool checks it with the
//! verifier key `coresdk audit public-key` prints. The origin defaults to
//! `coresdk.audit/<first 8 hex digits of SHA-256(public key)>`: the same for every restart and
//! every replica sharing the key, different for another deployment.
//!
//! The file holds one checkpoint a line, `{"v":3,"size":N,"note":"<note>"}`. Lines of the
//! formats before it still verify: `{v:2, size, head_hash, time, signature}`, signed over
//! `"coresdk.checkpoint.v2\0" ‖ size (u64 BE) ‖ head_hash ‖ time`, and lines without `v`
//! (version 1, signed over `"coresdk.checkpoint.v1\0" ‖ size ‖ head_hash`, the time not
//! vouched for). They vouch for the hash chain's head of their size, and verification keeps
//! demanding that the chain holds it.
//!
//! Every line is written whole with its newline, so text after the last newline is a write a
//! crash cut short: verification reports it as a warning and the next write truncates it. Any
//! other line that does not verify is evidence of tampering.
//!
//! The writer signs the tree of `n` records only if it extends the largest checkpoint `m` in
//! the file: the stored tree of `m` records has the signed root (checked with a consistency
//! proof to the new root), and every record after it is rehashed (its leaf hash, every stored
//! tree hash it completes, its chain link). So every checkpoint covers records checked once,
//! and a log cut or rewritten (say while the sidecar was stopped) is refused loudly and never
//! signed: every line the writer adds covers more than the lines before it, and a checkpoint
//! implies every smaller one. It never signs a size the file already has, so there are never
//! two notes for one size; witness cosignatures rewrite their note's line with the same body.
//! That is also what lets the file be bounded: it holds at most [`MAX_LINES`] lines
//! (verification checks each), and past that the writer replaces it (atomically) with its
//! newest [`KEPT_LINES`], the last of them its new line, the largest. A forged line among the
//! dropped ones goes with them; whoever can write the file can delete lines anyway. For real
//! protection keep the key in a mounted secret and the file on other storage, and have
//! witnesses cosign.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use base64::Engine as _;
use base64::prelude::BASE64_STANDARD;
use ed25519_dalek::{Signature, Signer as _, SigningKey, Verifier as _, VerifyingKey};
use serde::{Deserialize, Serialize};
use signed_note::{Note, VerifierList};

use crate::audit::{ChainHead, ChainVerifier, StoredAuditRow, VerifyReport};
use crate::problem::Error;
use crate::store::{Store, StoreError, StoreTx};
use crate::tlog::{Frontier, Hash};

const DOMAIN_TAG_V1: &[u8] = b"coresdk.checkpoint.v1\0";
const DOMAIN_TAG_V2: &[u8] = b"coresdk.checkpoint.v2\0";
/// The format of the lines the writer adds: a C2SP signed note.
pub const NOTE_VERSION: u32 = 3;

/// The most lines a checkpoint file holds; verification reads them all.
pub const MAX_LINES: usize = 64;
/// The lines a full file is cut down to: the newest (also the largest) alone would do, a few
/// more leave a reader some recent history.
pub const KEPT_LINES: usize = 8;
const _: () = assert!(0 < KEPT_LINES && KEPT_LINES <= MAX_LINES);
/// Witness signature lines kept with one note at most (the sidecar's own is not counted).
pub const MAX_COSIGNATURES: usize = 16;
/// Records rehashed per read of the store: bounded memory, a few queries per thousand.
const BATCH: usize = 1000;

/// C2SP signed-note signature type of a plain Ed25519 signature.
const ALG_ED25519: u8 = 0x01;
/// C2SP tlog-cosignature: a timestamped Ed25519 cosignature (`cosignature/v1`).
const ALG_COSIGNATURE_V1: u8 = 0x04;

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{0} does not hold a 64-hex-character Ed25519 key seed")]
    BadKey(String),
}

/// Why a checkpoint was not signed.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error(transparent)]
    File(#[from] CheckpointError),
    #[error("cannot read the audit log to check it against the largest checkpoint: {0}")]
    Store(#[from] Error),
    #[error(
        "REFUSING TO SIGN the audit log of {seq} records: {reason}. The log was cut or rewritten; keep the checkpoint file as evidence and investigate"
    )]
    DoesNotExtend { seq: u64, reason: String },
    #[error(
        "the checkpoint file changed while the log was checked against it: checked again at the next checkpoint"
    )]
    Changed,
}

impl From<StoreError> for SignError {
    fn from(e: StoreError) -> Self {
        Self::Store(e.into())
    }
}

/// A line of the formats before signed notes: a signed hash chain head.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct LegacyLine {
    /// 2 signs the time too; lines written before it carry no `v` and are 1.
    #[serde(rename = "v", default = "version_1")]
    version: u32,
    size: u64,
    head_hash: String,
    time: String,
    signature: String,
}

fn version_1() -> u32 {
    1
}

/// A line of the current format.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct NoteLine {
    v: u32,
    size: u64,
    note: String,
}

/// A signed checkpoint of the Merkle tree, verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedNote {
    pub origin: String,
    pub size: u64,
    pub root: Hash,
    /// The whole note: body, blank line, signature lines (the sidecar's first).
    pub note: String,
}

/// A verified line of a checkpoint file.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    /// A hash chain head of the formats before notes.
    Legacy {
        size: u64,
        head_hash: [u8; 32],
        /// When it was signed, as far as the signature vouches for it.
        signed_at: String,
    },
    Note(SignedNote),
}

impl Entry {
    fn size(&self) -> u64 {
        match self {
            Entry::Legacy { size, .. } => *size,
            Entry::Note(note) => note.size,
        }
    }

    fn is_note(&self) -> bool {
        matches!(self, Entry::Note(_))
    }

    /// What the entry vouches for, whatever cosignatures a note gained since.
    fn identity(&self) -> (u64, [u8; 32]) {
        match self {
            Entry::Legacy {
                size, head_hash, ..
            } => (*size, *head_hash),
            Entry::Note(note) => (note.size, note.root),
        }
    }

    fn describe(&self) -> String {
        match self {
            Entry::Legacy {
                size, signed_at, ..
            } => format!("the checkpoint of {size} records signed at {signed_at}"),
            Entry::Note(note) => format!("the signed checkpoint of {} records", note.size),
        }
    }
}

/// The bytes a legacy line's signature covers.
fn legacy_message(version: u32, size: u64, head_hash: &[u8; 32], time: &str) -> Option<Vec<u8>> {
    let (tag, time) = match version {
        1 => (DOMAIN_TAG_V1, ""),
        2 => (DOMAIN_TAG_V2, time),
        _ => return None,
    };
    let mut message = Vec::with_capacity(tag.len() + 40 + time.len());
    message.extend_from_slice(tag);
    message.extend_from_slice(&size.to_be_bytes());
    message.extend_from_slice(head_hash);
    message.extend_from_slice(time.as_bytes());
    Some(message)
}

/// Why a line of the file does not vouch for anything.
#[derive(Debug, PartialEq, Eq)]
enum BadLine {
    Unreadable,
    UnknownVersion(u32),
    BadSignature,
    /// A note whose body is no checkpoint, or not of the size its line claims.
    BadNote,
}

impl std::fmt::Display for BadLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unreadable => f.write_str("is unreadable"),
            Self::UnknownVersion(v) => write!(f, "has an unknown format version {v}"),
            Self::BadSignature => f.write_str("has a bad signature"),
            Self::BadNote => f.write_str("holds a note that is not a checkpoint of its size"),
        }
    }
}

/// The verifier key of `key` under the key name `name`, in the signed-note format.
pub fn verifier_key(name: &str, key: &VerifyingKey) -> String {
    signed_note::new_ed25519_verifier_key(name, key)
}

/// The origin a deployment without `CORESDK_AUDIT_ORIGIN` uses: derived from its public key,
/// so stable across restarts and replicas sharing the key, and different for another key.
pub fn default_origin(key: &VerifyingKey) -> String {
    let digest = <sha2::Sha256 as sha2::Digest>::digest(key.as_bytes());
    format!("coresdk.audit/{}", hex::encode(&digest[..4]))
}

/// What a sidecar without checkpoints says, and how to keep them.
pub const CHECKPOINTS_OFF: &str = "this sidecar keeps no signed audit checkpoints (set CORESDK_AUDIT_CHECKPOINT_FILE and CORESDK_AUDIT_SIGNING_KEY_FILE, or use a SQLite store)";

/// What [`valid_origin`] demands, for the refusal naming the setting.
pub const ORIGIN_RULE: &str =
    "must be a signed-note key name: not empty, no spaces or '+', at most 255 bytes";

/// Whether `origin` can name the checkpoints: a valid signed-note key name of at most 255 bytes.
pub fn valid_origin(origin: &str) -> bool {
    origin.len() <= 255 && signed_note::is_key_name_valid(origin)
}

/// The body of the checkpoint of the tree of `size` records with root `root`.
fn note_body(origin: &str, size: u64, root: &Hash) -> Option<String> {
    let checkpoint = tlog_tiles::Checkpoint::new(origin, size, tlog_tiles::Hash(*root), "").ok()?;
    String::from_utf8(checkpoint.to_bytes()).ok()
}

/// The signed-note verifiers of the sidecar's key under `origin`.
fn own_verifiers(origin: &str, key: &VerifyingKey) -> Option<VerifierList> {
    let verifier = signed_note::StandardVerifier::new(&verifier_key(origin, key)).ok()?;
    Some(VerifierList::new(vec![Box::new(verifier)]))
}

/// The checkpoint a note holds, if `key` signed it under the origin it names. A note of an
/// origin since changed still verifies: the key is what vouches.
pub fn open_note(text: &str, key: &VerifyingKey) -> Option<(SignedNote, Note)> {
    let note = Note::from_bytes(text.as_bytes()).ok()?;
    let body = std::str::from_utf8(note.text()).ok()?;
    let checkpoint = crate::tlog_proof::CheckpointBody::parse(body)?;
    // Exactly the three lines this writer signs: no extension lines to interpret.
    if note_body(&checkpoint.origin, checkpoint.size, &checkpoint.root)?.as_str() != body {
        return None;
    }
    let verifiers = own_verifiers(&checkpoint.origin, key)?;
    note.verify(&verifiers).ok()?;
    let signed = SignedNote {
        origin: checkpoint.origin,
        size: checkpoint.size,
        root: checkpoint.root,
        note: text.to_owned(),
    };
    Some((signed, note))
}

/// The checkpoint a line holds, if `key` signed it.
fn parse_line(line: &str, key: &VerifyingKey) -> Result<Entry, BadLine> {
    let version = serde_json::from_str::<SizeOnly>(line)
        .map_err(|_| BadLine::Unreadable)?
        .v;
    match version {
        NOTE_VERSION => {
            let line: NoteLine = serde_json::from_str(line).map_err(|_| BadLine::Unreadable)?;
            let Some((signed, _)) = open_note(&line.note, key) else {
                // A note that does not parse is as good as forged: a crash tears lines, not
                // the JSON string inside a whole one.
                return Err(if Note::from_bytes(line.note.as_bytes()).is_ok() {
                    BadLine::BadSignature
                } else {
                    BadLine::BadNote
                });
            };
            if signed.size != line.size {
                return Err(BadLine::BadNote);
            }
            Ok(Entry::Note(signed))
        }
        1 | 2 => {
            let line: LegacyLine = serde_json::from_str(line).map_err(|_| BadLine::Unreadable)?;
            let mut hash = [0u8; 32];
            let mut signature = [0u8; 64];
            hex::decode_to_slice(&line.head_hash, &mut hash)
                .and_then(|()| hex::decode_to_slice(&line.signature, &mut signature))
                .map_err(|_| BadLine::BadSignature)?;
            let message = legacy_message(line.version, line.size, &hash, &line.time)
                .ok_or(BadLine::UnknownVersion(line.version))?;
            key.verify(&message, &Signature::from_bytes(&signature))
                .map_err(|_| BadLine::BadSignature)?;
            let signed_at = match line.version {
                1 => format!("{} (a version 1 line: time not signed)", line.time),
                _ => line.time,
            };
            Ok(Entry::Legacy {
                size: line.size,
                head_hash: hash,
                signed_at,
            })
        }
        other => Err(BadLine::UnknownVersion(other)),
    }
}

/// A line of a checkpoint file, numbered from 1.
struct Line<'a> {
    n: usize,
    text: &'a str,
    /// Text after the last newline, which only a write cut short leaves.
    torn: bool,
}

/// Splits a file's text into its whole lines and what follows the last newline.
fn split_torn_tail(text: &str) -> (&str, &str) {
    match text.rfind('\n') {
        Some(end) => text.split_at(end + 1),
        None => ("", text),
    }
}

fn whole_lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines()
        .enumerate()
        .map(|(index, line)| (index + 1, line))
        .filter(|(_, line)| !line.trim().is_empty())
}

/// The file's non-blank lines, the torn tail (if any) last.
fn lines(text: &str) -> impl Iterator<Item = Line<'_>> {
    let (whole, tail) = split_torn_tail(text);
    let tail = Some(tail)
        .filter(|tail| !tail.trim().is_empty())
        .map(|tail| Line {
            n: whole.lines().count() + 1,
            text: tail,
            torn: true,
        });
    whole_lines(whole)
        .map(|(n, text)| Line {
            n,
            text,
            torn: false,
        })
        .chain(tail)
}

/// Only the size and the format of a line: to tell the formats apart, and to order lines before
/// checking signatures.
#[derive(Deserialize)]
struct SizeOnly {
    #[serde(default = "version_1")]
    v: u32,
    size: u64,
}

/// The largest checkpoint `key` signed (of equal sizes a note, it has a root, and of those
/// the later line): the one the next checkpoint must extend.
fn largest_signed(text: &str, key: &VerifyingKey) -> Option<Entry> {
    largest_verified(text, key, false)
}

/// [`largest_signed`], of the notes alone when `notes_only`. Signatures are checked largest
/// first, so a file of any length costs one check unless lines were forged; lines that do not
/// verify vouch for nothing here (verification reports them).
fn largest_verified(text: &str, key: &VerifyingKey, notes_only: bool) -> Option<Entry> {
    let mut candidates: Vec<(u64, bool, &str)> = lines(text)
        .filter_map(|line| {
            let size: SizeOnly = serde_json::from_str(line.text).ok()?;
            let note = size.v == NOTE_VERSION;
            (note || !notes_only).then_some((size.size, note, line.text))
        })
        .collect();
    candidates.reverse();
    candidates.sort_by_key(|&(size, note, _)| std::cmp::Reverse((size, note)));
    candidates
        .into_iter()
        .find_map(|(_, _, line)| parse_line(line, key).ok())
}

/// The entry the next checkpoint must extend: the largest; of equal sizes a note (it has a
/// root), and of those the later line.
fn largest(entries: &[Entry]) -> Option<&Entry> {
    entries.iter().max_by_key(|e| (e.size(), e.is_note()))
}

/// The newest signed checkpoint (the largest note) in the file at `path`, verified with `key`:
/// what `GetCheckpoint` answers, and what an offline tool proves against. None when the file
/// does not exist or holds no note `key` signed.
pub fn newest_note(path: &Path, key: &VerifyingKey) -> Result<Option<SignedNote>, CheckpointError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error(path)(e)),
    };
    Ok(newest_in(&text, key))
}

fn newest_in(text: &str, key: &VerifyingKey) -> Option<SignedNote> {
    match largest_verified(text, key, true)? {
        Entry::Note(note) => Some(note),
        Entry::Legacy { .. } => None,
    }
}

/// What a checkpoint file vouches for.
#[derive(Debug, Default)]
struct FileReading {
    entries: Vec<Entry>,
    /// Evidence that the file itself was tampered with.
    tampered: Option<String>,
    warnings: Vec<String>,
}

fn read_file(path: &Path, key: &VerifyingKey) -> FileReading {
    let mut reading = FileReading::default();
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return reading,
        Err(e) => {
            reading.tampered = Some(format!("cannot read {}: {e}", path.display()));
            return reading;
        }
    };
    for line in lines(&text) {
        match parse_line(line.text, key) {
            Ok(entry) => reading.entries.push(entry),
            Err(BadLine::Unreadable) if line.torn => reading.warnings.push(format!(
                "checkpoint line {} is incomplete, as a write cut short by a crash leaves it: ignored, and replaced by the next checkpoint",
                line.n
            )),
            Err(bad) => {
                reading.tampered = Some(format!("checkpoint line {} {bad}", line.n));
                return reading;
            }
        }
    }
    reading
}

/// Whether the chain `tx` sees holds record `seq` with the hash `hash`.
fn holds(tx: &mut dyn StoreTx, seq: u64, hash: &[u8]) -> Result<bool, StoreError> {
    if seq == 0 {
        return Ok(hash == ChainHead::GENESIS.hash);
    }
    let mut held = false;
    tx.scan_audit(seq, &mut |row| {
        held = row.seq == seq && row.hash == hash;
        false
    })?;
    Ok(held)
}

/// The first record a check found at fault, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Bad {
    seq: u64,
    reason: String,
    /// Whether the log itself holds up to there and a signed checkpoint is what it fails
    /// (removed, rewritten): then the report names the log's real head.
    against_checkpoint: bool,
}

/// Where a walk over the log starts: the records up to `head` taken as verified, `tree` the
/// right edge of their Merkle tree.
struct Start {
    head: ChainHead,
    tree: Frontier,
}

impl Start {
    const GENESIS: Start = Start {
        head: ChainHead::GENESIS,
        tree: Frontier::EMPTY,
    };
}

/// What a walk found.
struct Walked {
    head: ChainHead,
    tree: Frontier,
    /// The head and tree of the records whose tree hashes are stored: short of `head` when
    /// the newest records' are not built yet (a replica of an older version appended them,
    /// or a build was interrupted), which is no fault, but nothing past it is signed.
    built: (ChainHead, Frontier),
    checked: u64,
    bad: Option<Bad>,
}

/// What the checkpoint `entry` demands of the log once its tree has `tree.size()` records.
fn expected(entry: &Entry, tree: &Frontier, head: &ChainHead) -> Option<Bad> {
    let size = entry.size();
    if size != tree.size() {
        return None;
    }
    let holds = match entry {
        Entry::Legacy { head_hash, .. } => head.hash == *head_hash,
        Entry::Note(note) => tree.root() == note.root,
    };
    (!holds).then(|| Bad {
        seq: size,
        reason: format!(
            "record {size} differs from {}: the log was rewritten",
            entry.describe()
        ),
        against_checkpoint: true,
    })
}

/// Rehashes the records after `start` up to `to`, in batches: each record's chain link and
/// hash, its leaf hash and every tree hash it stores, and at each size of `expects` what that
/// checkpoint signed. Stops at the first record at fault.
fn walk(tx: &mut dyn StoreTx, start: Start, to: u64, expects: &[&Entry]) -> Result<Walked, Error> {
    let mut chain = ChainVerifier::after(start.head);
    let mut tree = start.tree;
    // Where the tree hashes stop being stored, when they stop: evidence if a later record has
    // them after all.
    let mut built: Option<(ChainHead, Frontier)> = None;
    let mut checked = 0;
    let mut next = start.head.seq + 1;
    let bad = 'walk: loop {
        if next > to {
            break None;
        }
        let want = usize::try_from(to - next + 1).map_or(BATCH, |left| left.min(BATCH));
        let mut rows: Vec<StoredAuditRow> = Vec::with_capacity(want);
        tx.scan_audit(next, &mut |row| {
            rows.push(row);
            rows.len() < want
        })?;
        let Some(last) = rows.last() else {
            break Some(Bad {
                seq: next,
                reason: format!("record {next} is missing"),
                against_checkpoint: false,
            });
        };
        next = last.seq + 1;
        let seqs: Vec<u64> = rows.iter().map(|row| row.seq).collect();
        let stored = tx.audit_tree_hashes(&seqs)?;
        for row in &rows {
            let before = (chain.head(), tree);
            if !chain.feed(row) {
                let (seq, reason) = chain
                    .failure()
                    .cloned()
                    .unwrap_or((row.seq, format!("record {} does not verify", row.seq)));
                break 'walk Some(Bad {
                    seq,
                    reason,
                    against_checkpoint: false,
                });
            }
            checked += 1;
            let hashes = tree.append(crate::tlog::leaf_hash(&row.canonical), chain.head().hash);
            let held = stored
                .binary_search_by_key(&row.seq, |(seq, _)| *seq)
                .ok()
                .map(|at| &stored[at].1);
            match (held, &built) {
                (None, None) => built = Some(before),
                (None, Some(_)) => {}
                (Some(_), Some((unbuilt, _))) => {
                    let seq = unbuilt.seq + 1;
                    break 'walk Some(Bad {
                        seq,
                        reason: format!(
                            "record {seq} lacks its Merkle tree hashes, but record {} after it has them: they were removed",
                            row.seq
                        ),
                        against_checkpoint: false,
                    });
                }
                (Some(_), None) => {}
            }
            if held.is_some_and(|held| *held != hashes) {
                break 'walk Some(Bad {
                    seq: row.seq,
                    reason: format!(
                        "record {} was altered (its stored Merkle tree hashes differ from its content)",
                        row.seq
                    ),
                    against_checkpoint: false,
                });
            }
            let head = chain.head();
            if let Some(bad) = expects.iter().find_map(|e| expected(e, &tree, &head)) {
                break 'walk Some(bad);
            }
        }
    };
    Ok(Walked {
        head: chain.head(),
        built: built.unwrap_or((chain.head(), tree)),
        tree,
        checked,
        bad,
    })
}

/// The position of the signed checkpoint `note` in the log `tx` sees: its last record, whose
/// own hash is recomputed, and the stored tree of its size, whose root must be the signed one.
fn start_at(tx: &mut dyn StoreTx, note: &SignedNote) -> Result<Result<Start, Bad>, Error> {
    let m = note.size;
    let mut last = None;
    tx.scan_audit(m, &mut |row| {
        last = Some(row);
        false
    })?;
    let Some(row) = last.filter(|row| row.seq == m) else {
        return Ok(Err(Bad {
            seq: m,
            reason: format!(
                "record {m} is missing: the signed checkpoint of {m} records covers it"
            ),
            against_checkpoint: true,
        }));
    };
    let prev: Option<[u8; 32]> = row.prev_hash.as_slice().try_into().ok();
    let hash: Option<[u8; 32]> = row.hash.as_slice().try_into().ok();
    let (Some(prev), Some(hash)) = (prev, hash) else {
        return Ok(Err(Bad {
            seq: m,
            reason: format!("record {m} was altered (its hashes are malformed)"),
            against_checkpoint: false,
        }));
    };
    if crate::audit::chain_hash(&prev, &row.canonical) != hash {
        return Ok(Err(Bad {
            seq: m,
            reason: format!("record {m} was altered (its hash does not match its content)"),
            against_checkpoint: false,
        }));
    }
    let tree = Frontier::read(tx, m, hash)?;
    if tree.root() != note.root {
        return Ok(Err(Bad {
            seq: m,
            reason: format!(
                "the stored Merkle tree of {m} records does not have the root the checkpoint of {m} records signed: records up to {m} were altered"
            ),
            against_checkpoint: true,
        }));
    }
    Ok(Ok(Start {
        head: ChainHead { seq: m, hash },
        tree,
    }))
}

/// Whether the stored tree proves the tree of `to` (root `to_root`) extends the signed `note`.
fn consistent(
    tx: &mut dyn StoreTx,
    note: &SignedNote,
    to: u64,
    to_root: &Hash,
) -> Result<Option<Bad>, Error> {
    let proof = crate::tlog::consistency_proof(tx, note.size, to)?;
    if crate::tlog::check_consistency(&proof, note.size, &note.root, to, to_root) {
        return Ok(None);
    }
    Ok(Some(Bad {
        seq: note.size,
        reason: format!(
            "the audit tree of {to} records does not extend the signed checkpoint of {} records (its consistency proof fails): records up to {} were altered",
            note.size, note.size
        ),
        against_checkpoint: true,
    }))
}

/// The log `tx` sees up to `head`, checked against the signed `entries`: from `from` (a
/// note, then only what follows it is rehashed) or from the first record.
struct Checked {
    walked: Walked,
    /// The note the walk started from.
    from: Option<u64>,
}

fn check(
    tx: &mut dyn StoreTx,
    entries: &[Entry],
    from: Option<&SignedNote>,
    head: ChainHead,
) -> Result<Checked, Error> {
    let fail = |bad: Bad| Checked {
        walked: Walked {
            head: ChainHead::GENESIS,
            tree: Frontier::EMPTY,
            built: (ChainHead::GENESIS, Frontier::EMPTY),
            checked: 0,
            bad: Some(bad),
        },
        from: from.map(|note| note.size),
    };
    // Largest first: a cut log is reported against the checkpoint covering the most.
    if let Some(largest) = largest(entries)
        && head.seq < largest.size()
    {
        let first_missing = head.seq + 1;
        return Ok(fail(Bad {
            seq: first_missing,
            reason: format!(
                "records {first_missing} to {} were removed: {} covers {} records",
                largest.size(),
                largest.describe(),
                largest.size()
            ),
            against_checkpoint: true,
        }));
    }
    let start = match from {
        Some(note) => match start_at(tx, note)? {
            Ok(start) => start,
            Err(bad) => return Ok(fail(bad)),
        },
        None => Start::GENESIS,
    };
    let covered = start.head.seq;
    // What the walk does not reach is checked cheaply: a chain head by one lookup, a
    // tree by a consistency proof; the largest note implies them, but a line that does not
    // hold is evidence, whichever it is.
    for entry in entries.iter().filter(|e| e.size() <= covered) {
        let bad = match entry {
            Entry::Legacy {
                size, head_hash, ..
            } => (!holds(tx, *size, head_hash)?).then(|| Bad {
                seq: *size,
                reason: format!(
                    "record {size} differs from {}: the log was rewritten",
                    entry.describe()
                ),
                against_checkpoint: true,
            }),
            Entry::Note(note) => consistent(tx, note, covered, &start.tree.root())?,
        };
        if let Some(bad) = bad {
            return Ok(fail(bad));
        }
    }
    let expects: Vec<&Entry> = entries.iter().filter(|e| e.size() > covered).collect();
    let mut walked = walk(tx, start, head.seq, &expects)?;
    if walked.bad.is_none()
        && let Some(note) = from
    {
        // The stored tree, which the proof reads, ends where its hashes do.
        let built = walked.built.1;
        walked.bad = consistent(tx, note, built.size(), &built.root())?;
    }
    Ok(Checked {
        walked,
        from: from.map(|note| note.size),
    })
}

/// The largest signed note of `entries`.
fn largest_note(entries: &[Entry]) -> Option<&SignedNote> {
    entries
        .iter()
        .filter_map(|entry| match entry {
            Entry::Note(note) => Some(note),
            Entry::Legacy { .. } => None,
        })
        .max_by_key(|note| note.size)
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// What an offline command reads: a SQLite store's database, and its checkpoint and key files
/// (those given, or where the server keeps them by default).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OfflineFiles {
    pub db: PathBuf,
    pub checkpoints: PathBuf,
    pub key: PathBuf,
}

/// Why a `--store` cannot be read offline.
#[derive(Debug)]
pub enum NotOffline {
    Memory,
    Postgres,
    /// The URL does not parse: the reason.
    Bad(String),
}

/// The files an offline command reads for the store URL `store`, with the checkpoint and key
/// files given or else the server's defaults beside the database.
pub fn offline_files(
    store: &str,
    checkpoints: Option<PathBuf>,
    key: Option<PathBuf>,
) -> Result<OfflineFiles, NotOffline> {
    match crate::store::StoreUrl::parse(store) {
        Ok(crate::store::StoreUrl::Sqlite(db)) => {
            let (default_checkpoints, default_key) = default_paths(&db);
            Ok(OfflineFiles {
                checkpoints: checkpoints.unwrap_or(default_checkpoints),
                key: key.unwrap_or(default_key),
                db,
            })
        }
        Ok(crate::store::StoreUrl::Memory) => Err(NotOffline::Memory),
        Ok(crate::store::StoreUrl::Postgres(_)) => Err(NotOffline::Postgres),
        Err(e) => Err(NotOffline::Bad(e.to_string())),
    }
}

/// Where a SQLite store keeps its checkpoints and key unless configured otherwise.
pub fn default_paths(db: &Path) -> (PathBuf, PathBuf) {
    let with = |suffix: &str| {
        let mut path = db.as_os_str().to_owned();
        path.push(suffix);
        PathBuf::from(path)
    };
    (with(".checkpoints"), with(".audit-key"))
}

/// Reads the key seed, or creates one (mode 0600) when the file does not exist yet.
pub fn load_or_create_key(path: &Path) -> Result<SigningKey, CheckpointError> {
    match std::fs::read_to_string(path) {
        Ok(text) => parse_key(path, &text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut seed = [0u8; 32];
            getrandom(&mut seed).map_err(io_error(path))?;
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            let mut file = options.open(path).map_err(io_error(path))?;
            file.write_all(hex::encode(seed).as_bytes())
                .and_then(|()| file.sync_all())
                .map_err(io_error(path))?;
            tracing::info!(path = %path.display(), "created the audit checkpoint signing key");
            Ok(SigningKey::from_bytes(&seed))
        }
        Err(e) => Err(io_error(path)(e)),
    }
}

/// Reads an existing key seed; never creates one (offline tools only vouch with a real key).
pub fn load_key(path: &Path) -> Result<SigningKey, CheckpointError> {
    let text = std::fs::read_to_string(path).map_err(io_error(path))?;
    parse_key(path, &text)
}

fn parse_key(path: &Path, text: &str) -> Result<SigningKey, CheckpointError> {
    let mut seed = [0u8; 32];
    hex::decode_to_slice(text.trim(), &mut seed)
        .map_err(|_| CheckpointError::BadKey(path.display().to_string()))?;
    Ok(SigningKey::from_bytes(&seed))
}

/// Key material from the operating system's generator, read from /dev/urandom.
fn getrandom(buf: &mut [u8]) -> std::io::Result<()> {
    use std::io::Read as _;
    std::fs::File::open("/dev/urandom")?.read_exact(buf)
}

/// A witness's verifier key (`<name>+<hex key id>+<base64(type ‖ public key)>`): a plain
/// Ed25519 note signer (type 0x01) or a C2SP tlog-cosignature `cosignature/v1` cosigner
/// (type 0x04).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WitnessKey {
    name: String,
    id: u32,
    alg: u8,
    key: VerifyingKey,
}

impl WitnessKey {
    pub fn parse(vkey: &str) -> Result<Self, String> {
        const FORMAT: &str = "is not a verifier key <name>+<8 hex digits>+<base64 key>";
        let mut parts = vkey.splitn(3, '+');
        let (Some(name), Some(id_hex), Some(key64)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(FORMAT.into());
        };
        let id = u32::from_str_radix(id_hex, 16).map_err(|_| FORMAT.to_owned())?;
        let key = BASE64_STANDARD
            .decode(key64)
            .map_err(|_| FORMAT.to_owned())?;
        if id_hex.len() != 8 || !signed_note::is_key_name_valid(name) {
            return Err(FORMAT.into());
        }
        let Some((&alg, public)) = key.split_first() else {
            return Err(FORMAT.into());
        };
        if alg != ALG_ED25519 && alg != ALG_COSIGNATURE_V1 {
            return Err(format!(
                "has signature type 0x{alg:02x}; only 0x01 (Ed25519) and 0x04 (cosignature/v1) are supported"
            ));
        }
        let public: [u8; 32] = public
            .try_into()
            .map_err(|_| "does not hold a 32-byte Ed25519 public key".to_owned())?;
        let key_bytes = key.clone();
        let key = VerifyingKey::from_bytes(&public)
            .map_err(|_| "does not hold a valid Ed25519 public key".to_owned())?;
        if signed_note::key_id(name, &key_bytes) != id {
            return Err("has a key id that does not match its name and key".into());
        }
        Ok(Self {
            name: name.to_owned(),
            id,
            alg,
            key,
        })
    }
}

impl signed_note::Verifier for WitnessKey {
    fn name(&self) -> &str {
        &self.name
    }

    fn key_id(&self) -> u32 {
        self.id
    }

    fn verify(&self, msg: &[u8], sig: &[u8]) -> bool {
        match self.alg {
            ALG_ED25519 => <[u8; 64]>::try_from(sig)
                .is_ok_and(|sig| self.key.verify(msg, &Signature::from_bytes(&sig)).is_ok()),
            ALG_COSIGNATURE_V1 => {
                let Some((time, sig)) = sig.split_first_chunk::<8>() else {
                    return false;
                };
                let Ok(sig) = <[u8; 64]>::try_from(sig) else {
                    return false;
                };
                let time = u64::from_be_bytes(*time);
                if time > i64::MAX as u64 {
                    return false;
                }
                let mut message = format!("cosignature/v1\ntime {time}\n").into_bytes();
                message.extend_from_slice(msg);
                self.key
                    .verify(&message, &Signature::from_bytes(&sig))
                    .is_ok()
            }
            _ => false,
        }
    }
}

/// The sidecar's own key as a signed-note signer.
struct NoteSigner<'a> {
    name: &'a str,
    id: u32,
    key: &'a SigningKey,
}

impl signed_note::Signer for NoteSigner<'_> {
    fn name(&self) -> &str {
        self.name
    }

    fn key_id(&self) -> u32 {
        self.id
    }

    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, ed25519_dalek::SignatureError> {
        Ok(self.key.sign(msg).to_bytes().to_vec())
    }
}

/// The key id of the sidecar's key under `name` (C2SP signed-note, type 0x01).
fn own_key_id(name: &str, key: &VerifyingKey) -> u32 {
    let mut encoded = vec![ALG_ED25519];
    encoded.extend_from_slice(key.as_bytes());
    signed_note::key_id(name, &encoded)
}

/// How the last signing round ended, for callers waiting on one.
#[derive(Debug, Clone, Default)]
struct Round {
    finished: u64,
    /// The newest note after the round, read once for every waiter.
    newest: Option<SignedNote>,
    /// Why it signed nothing when it could not: the log was refused, or the file could not
    /// be written. Waiters answer at once rather than asking for round after failing round.
    unsigned: Option<String>,
}

pub struct Checkpointer {
    path: PathBuf,
    key: SigningKey,
    origin: String,
    witnesses: Vec<WitnessKey>,
    /// Writes take turns: the final checkpoint at shutdown may overlap the loop's last one, a
    /// cosignature rewrites a line, and a write reads the file before it changes it.
    turn: Mutex<()>,
    /// Asks the checkpoint loop to sign now, for a caller waiting on a proof.
    wake: tokio::sync::Notify,
    /// The largest record a caller asked a checkpoint for: a request a round already served
    /// (it came while that round ran) starts no other round.
    wanted: std::sync::atomic::AtomicU64,
    rounds: tokio::sync::watch::Sender<Round>,
}

impl Checkpointer {
    /// `origin` None: [`default_origin`] of the key.
    pub fn new(
        path: PathBuf,
        key: SigningKey,
        origin: Option<String>,
        witnesses: Vec<WitnessKey>,
    ) -> Self {
        let origin = origin.unwrap_or_else(|| default_origin(&key.verifying_key()));
        Self {
            path,
            key,
            origin,
            witnesses,
            turn: Mutex::new(()),
            wake: tokio::sync::Notify::new(),
            wanted: std::sync::atomic::AtomicU64::new(0),
            rounds: tokio::sync::watch::Sender::new(Round::default()),
        }
    }

    pub fn verifying_key(&self) -> VerifyingKey {
        self.key.verifying_key()
    }

    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The verifier key C2SP tools check the notes with: `<origin>+<key id>+<base64 key>`.
    pub fn verifier_key(&self) -> String {
        verifier_key(&self.origin, &self.verifying_key())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What a verifier needs to check the log against this file.
    pub fn checkpoints(&self) -> Checkpoints {
        Checkpoints {
            path: self.path.clone(),
            key: self.verifying_key(),
        }
    }

    /// The newest signed checkpoint, with its cosignatures.
    pub fn newest(&self) -> Result<Option<SignedNote>, CheckpointError> {
        newest_note(&self.path, &self.verifying_key())
    }

    /// Resolves when a caller asked for a checkpoint now ([`Checkpointer::covering`]), with
    /// the largest record any caller asked for.
    pub async fn asked(&self) -> u64 {
        self.wake.notified().await;
        self.wanted.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The newest checkpoint once one covers record `seq`, asking for one to be signed now;
    /// waits `wait` at most. Callers share signings: one round covers every record committed
    /// before it started, and a caller arriving during a round is served by the next.
    pub async fn covering(&self, seq: u64, wait: Duration) -> Result<SignedNote, Error> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut rounds = self.rounds.subscribe();
        // Marked seen before the file is read: a round ending after the read wakes us.
        rounds.borrow_and_update();
        // The file once a call, for a note signed before this process's first round.
        let (path, key) = (self.path.clone(), self.verifying_key());
        let newest = tokio::task::spawn_blocking(move || newest_note(&path, &key))
            .await
            .map_err(|e| Error::Internal(format!("reading the checkpoints: {e}")))?
            .map_err(|e| Error::Internal(format!("reading the checkpoints: {e}")))?;
        if let Some(note) = newest.filter(|note| note.size >= seq) {
            return Ok(note);
        }
        // Once: the loop either wakes to it or keeps it for after the round it is in, so a
        // round starts after this call's record was committed. Asking again after each round
        // would leave a request behind for a round nobody waits for.
        self.wanted
            .fetch_max(seq, std::sync::atomic::Ordering::AcqRel);
        self.wake.notify_one();
        loop {
            match tokio::time::timeout_at(deadline, rounds.changed()).await {
                Ok(Ok(())) => {
                    // Only a round that ended after the call asked counts: an operator may
                    // have resolved an older refusal.
                    let round = rounds.borrow_and_update().clone();
                    if let Some(note) = round.newest.filter(|note| note.size >= seq) {
                        return Ok(note);
                    }
                    if let Some(why) = round.unsigned {
                        return Err(Error::CheckpointUnavailable(format!(
                            "no checkpoint covers record {seq}: {why}"
                        )));
                    }
                }
                _ => {
                    return Err(Error::CheckpointUnavailable(format!(
                        "no checkpoint covering record {seq} was signed within {} s; ask GetInclusionProof for it later",
                        wait.as_secs_f64()
                    )));
                }
            }
        }
    }

    /// Answers the callers waiting on a round with the last round's outcome again, without a
    /// round: the log was refused and has not moved since, so a new check would only refuse
    /// (and log) it again.
    pub fn repeat_round(&self) {
        self.rounds.send_modify(|round| round.finished += 1);
    }

    fn finish_round(&self, newest: Option<SignedNote>, unsigned: Option<String>) {
        self.rounds.send_modify(|round| {
            round.finished += 1;
            round.newest = newest;
            round.unsigned = unsigned;
        });
    }

    fn signed_line(&self, size: u64, root: &Hash) -> Result<String, CheckpointError> {
        let fail = |what: &str| io_error(&self.path)(std::io::Error::other(what.to_owned()));
        let body = note_body(&self.origin, size, root).ok_or_else(|| fail("bad origin"))?;
        let mut note = Note::new(body.as_bytes(), &[]).map_err(|e| fail(&e.to_string()))?;
        let signer = NoteSigner {
            name: &self.origin,
            id: own_key_id(&self.origin, &self.verifying_key()),
            key: &self.key,
        };
        note.add_sigs(&[&signer])
            .map_err(|e| fail(&e.to_string()))?;
        let note = String::from_utf8(note.to_bytes()).map_err(|e| fail(&e.to_string()))?;
        note_line(&self.path, size, note)
    }

    fn text(&self) -> Result<String, CheckpointError> {
        match std::fs::read_to_string(&self.path) {
            Ok(text) => Ok(text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
            Err(e) => Err(io_error(&self.path)(e)),
        }
    }

    /// Signs the tree of the log `store` holds if it extends the largest checkpoint, and
    /// answers the log's head. A log that does not (cut or rewritten, while the sidecar ran or
    /// before it started) is refused with [`SignError::DoesNotExtend`], and the file is left as
    /// it is: the evidence.
    pub async fn checkpoint(self: &Arc<Self>, store: &Store) -> Result<ChainHead, SignError> {
        let signed = self.sign(store).await;
        let unsigned = match &signed {
            Ok(_) | Err(SignError::Changed) => None,
            Err(e @ SignError::DoesNotExtend { .. }) => {
                Some(format!("the sidecar refuses to sign the audit log ({e})"))
            }
            Err(e) => Some(format!("the checkpoint could not be signed ({e})")),
        };
        let (path, key) = (self.path.clone(), self.verifying_key());
        let newest = tokio::task::spawn_blocking(move || newest_note(&path, &key))
            .await
            .ok()
            .and_then(Result::ok)
            .flatten();
        self.finish_round(newest, unsigned);
        signed
    }

    async fn sign(self: &Arc<Self>, store: &Store) -> Result<ChainHead, SignError> {
        // Records appended without their tree hashes (a replica of an older version, during a
        // rolling upgrade; an interrupted build) are built first: a write, one lookup when
        // the tree is complete.
        crate::tlog::build_missing(store).await?;
        let checker = self.clone();
        // Rehashing what was added since the last checkpoint (the whole log, the first time)
        // is a long read.
        let extension = store
            .long_read(move |tx| Ok(checker.extension(tx)))
            .await??;
        let head = extension.head;
        if let Some(root) = extension.root {
            let signer = self.clone();
            tokio::task::spawn_blocking(move || signer.write(&extension, &root))
                .await
                .map_err(|e| io_error(&self.path)(std::io::Error::other(e)))??;
        }
        Ok(head)
    }

    /// Checks, in one read transaction of the store, that its log extends the largest
    /// checkpoint. The file is read first, as in [`verify`]; [`Checkpointer::write`] makes sure
    /// it did not change until the new line is written.
    fn extension(&self, tx: &mut dyn StoreTx) -> Result<Extension, SignError> {
        let largest = largest_signed(&self.text()?, &self.verifying_key());
        let head = tx.audit_head()?;
        let unchanged = Extension {
            head,
            largest: largest.clone(),
            root: None,
        };
        if head.seq == 0 && largest.is_none() {
            return Ok(unchanged);
        }
        let from = match &largest {
            Some(Entry::Note(note)) => Some(note),
            _ => None,
        };
        // Only the largest: the writer never signs what does not extend it, so it implies the
        // others (verification checks them all).
        let entries: Vec<Entry> = largest.iter().cloned().collect();
        let checked = check(tx, &entries, from, head)?;
        if let Some(bad) = checked.walked.bad {
            return Err(SignError::DoesNotExtend {
                seq: head.seq,
                reason: bad.reason,
            });
        }
        // Only the records whose tree hashes are stored: a proof against the note reads them.
        let (built, tree) = checked.walked.built;
        // Never two notes for one size: the largest is the only note that can have it.
        if built.seq == 0 || from.is_some_and(|note| note.size == built.seq) {
            return Ok(Extension {
                head: built,
                ..unchanged
            });
        }
        Ok(Extension {
            head: built,
            root: Some(tree.root()),
            ..unchanged
        })
    }

    /// Adds a signed checkpoint of the extension's tree and syncs the file: appended, after
    /// cutting off a line a crash left incomplete; or, once the file is full, as the last of
    /// its newest lines in a file that atomically replaces it.
    fn write(&self, extension: &Extension, root: &Hash) -> Result<(), SignError> {
        let _turn = self.turn.lock().unwrap_or_else(PoisonError::into_inner);
        let text = self.text()?;
        // A cosignature added meanwhile rewrote the line, but not what it vouches for.
        let largest = largest_signed(&text, &self.verifying_key());
        if largest.as_ref().map(Entry::identity) != extension.largest.as_ref().map(Entry::identity)
        {
            return Err(SignError::Changed);
        }
        let line = self.signed_line(extension.head.seq, root)?;
        let (whole, tail) = split_torn_tail(&text);
        let lines: Vec<&str> = whole_lines(whole).map(|(_, line)| line).collect();
        if lines.len() >= MAX_LINES {
            let newest = lines.len() - (KEPT_LINES - 1);
            // Witnesses vouched for that one: it outlives the compaction.
            let cosigned = lines[..newest].iter().rev().find(|line| is_cosigned(line));
            let mut kept: Vec<&str> = cosigned.into_iter().copied().collect();
            kept.extend_from_slice(&lines[newest..]);
            kept.push(line.trim_end());
            replace(&self.path, &kept)?;
            tracing::info!(
                path = %self.path.display(),
                kept = kept.len(),
                "checkpoint file compacted to its newest lines"
            );
            return Ok(());
        }
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(io_error(&self.path))?;
        if !tail.is_empty() {
            tracing::warn!(
                path = %self.path.display(),
                bytes = tail.len(),
                "cutting off an incomplete checkpoint line a crash left"
            );
            let whole_len = u64::try_from(whole.len()).map_err(std::io::Error::other);
            whole_len
                .and_then(|len| file.set_len(len))
                .map_err(io_error(&self.path))?;
        }
        file.write_all(line.as_bytes())
            .and_then(|()| file.sync_data())
            .map_err(io_error(&self.path))?;
        Ok(())
    }

    /// Stores the witness signature lines of `note` (a checkpoint this sidecar signed, with
    /// lines added) with the stored note, each verified against a configured witness key, and
    /// answers the note as now stored. Blocking: file I/O.
    pub fn add_cosignatures(&self, note: &str) -> Result<SignedNote, Error> {
        let submitted = Note::from_bytes(note.as_bytes()).map_err(|_| {
            Error::invalid(
                "note",
                "is not a signed note (C2SP signed-note: the body, a blank line, then signature lines)",
            )
        })?;
        let _turn = self.turn.lock().unwrap_or_else(PoisonError::into_inner);
        let file_error = |e: CheckpointError| Error::Internal(format!("checkpoint file: {e}"));
        let text = self.text().map_err(file_error)?;
        let key = self.verifying_key();
        let (whole, _) = split_torn_tail(&text);
        let mut lines: Vec<String> = whole_lines(whole).map(|(_, l)| l.to_owned()).collect();
        let found = lines.iter().enumerate().find_map(|(at, line)| {
            let line: NoteLine = serde_json::from_str(line).ok()?;
            let (signed, stored) = open_note(&line.note, &key)?;
            (stored.text() == submitted.text()).then_some((at, signed, stored))
        });
        let Some((at, signed, stored)) = found else {
            return Err(Error::CheckpointNotFound(
                "this sidecar never signed a checkpoint with this body (or it was compacted away); cosign a note GetCheckpoint answered".into(),
            ));
        };
        let own_id = own_key_id(&signed.origin, &key);
        let mut verifiers: Vec<Box<dyn signed_note::Verifier>> = self
            .witnesses
            .iter()
            .filter(|w| !(w.name == signed.origin && w.id == own_id))
            .map(|w| Box::new(w.clone()) as Box<dyn signed_note::Verifier>)
            .collect();
        let own = signed_note::StandardVerifier::new(&verifier_key(&signed.origin, &key))
            .map_err(|e| Error::Internal(format!("own verifier key: {e}")))?;
        verifiers.push(Box::new(own));
        let (verified, unknown) = submitted
            .verify(&VerifierList::new(verifiers))
            .map_err(|e| match e {
                signed_note::NoteError::InvalidSignature { name, id } => Error::invalid(
                    "note",
                    format!("the signature line of {name}+{id:08x} does not verify"),
                ),
                other => Error::invalid("note", format!("cannot be verified: {other}")),
            })?;
        if !unknown.is_empty() {
            let names: Vec<String> = unknown
                .iter()
                .map(|s| format!("{}+{:08x}", s.name(), s.id()))
                .collect();
            return Err(Error::invalid(
                "note",
                format!(
                    "has signature lines of keys that are not configured witnesses (CORESDK_AUDIT_WITNESS_KEYS): {}",
                    names.join(", ")
                ),
            ));
        }
        let is_own = |s: &signed_note::Signature| s.name() == signed.origin && s.id() == own_id;
        let added: Vec<signed_note::Signature> =
            verified.into_iter().filter(|s| !is_own(s)).collect();
        if added.is_empty() {
            return Err(Error::invalid(
                "note",
                "carries no witness cosignature line to add",
            ));
        }
        let own_only = own_verifiers(&signed.origin, &key)
            .ok_or_else(|| Error::Internal("own verifier key".into()))?;
        let (mine, kept) = stored
            .verify(&own_only)
            .map_err(|e| Error::Internal(format!("stored note: {e}")))?;
        let replaced = |s: &signed_note::Signature| {
            added
                .iter()
                .any(|a| a.name() == s.name() && a.id() == s.id())
        };
        let witnesses: Vec<signed_note::Signature> = kept
            .into_iter()
            .filter(|s| !replaced(s))
            .chain(added.iter().cloned())
            .collect();
        if witnesses.len() > MAX_COSIGNATURES {
            return Err(Error::invalid(
                "note",
                format!("would give the checkpoint more than {MAX_COSIGNATURES} cosignatures"),
            ));
        }
        let signatures: Vec<signed_note::Signature> = mine.into_iter().chain(witnesses).collect();
        let cosigned = Note::new(stored.text(), &signatures)
            .map_err(|e| Error::Internal(format!("cosigned note: {e}")))?;
        let cosigned = String::from_utf8(cosigned.to_bytes())
            .map_err(|e| Error::Internal(format!("cosigned note: {e}")))?;
        let line = note_line(&self.path, signed.size, cosigned.clone()).map_err(file_error)?;
        lines[at] = line.trim_end().to_owned();
        let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
        replace(&self.path, &lines).map_err(file_error)?;
        tracing::info!(
            size = signed.size,
            added = added.len(),
            "stored witness cosignatures of an audit checkpoint"
        );
        Ok(SignedNote {
            note: cosigned,
            ..signed
        })
    }
}

/// Whether the file `line` is a note with a signature line besides the sidecar's own: a
/// witness cosignature ([`Checkpointer::add_cosignatures`] stores only verified ones).
fn is_cosigned(line: &str) -> bool {
    serde_json::from_str::<NoteLine>(line)
        .ok()
        .and_then(|line| {
            let (_, signatures) = line.note.split_once("\n\n")?;
            Some(signatures.lines().count() > 1)
        })
        .unwrap_or(false)
}

/// The file line of a note of `size`, with its newline.
fn note_line(path: &Path, size: u64, note: String) -> Result<String, CheckpointError> {
    let mut line = serde_json::to_string(&NoteLine {
        v: NOTE_VERSION,
        size,
        note,
    })
    .map_err(|e| io_error(path)(std::io::Error::other(e)))?;
    line.push('\n');
    Ok(line)
}

/// Replaces the file at `path` by `lines`, so that a reader sees the old file or the new one,
/// never a mix, and a crash leaves one of them.
fn replace(path: &Path, lines: &[&str]) -> Result<(), CheckpointError> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let replaced = (|| {
        let mut next = tempfile::NamedTempFile::new_in(dir)?;
        for line in lines {
            writeln!(next, "{line}")?;
        }
        if let Ok(metadata) = std::fs::metadata(path) {
            next.as_file().set_permissions(metadata.permissions())?;
        }
        next.as_file().sync_all()?;
        next.persist(path).map_err(|e| e.error)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    replaced.map_err(io_error(path))
}

/// A log head, read from the store, that extends the largest checkpoint of the file.
struct Extension {
    head: ChainHead,
    largest: Option<Entry>,
    /// The root of the tree to sign: None when there is nothing to sign (no record yet, or
    /// its size is signed already).
    root: Option<Hash>,
}

/// A checkpoint file and the key that vouches for its lines.
#[derive(Debug, Clone)]
pub struct Checkpoints {
    pub path: PathBuf,
    pub key: VerifyingKey,
}

/// Verifies the log `tx` sees against the checkpoints, if any. By default only what was added
/// since the newest signed note is rehashed (every record after it, its chain links and tree
/// hashes) and a consistency proof ties the note's signed root to the current tree; smaller
/// checkpoints are checked by a consistency proof (notes) or a lookup (chain heads of the
/// formats before). `full` recomputes every record, every stored tree hash and every
/// checkpoint's root from the first record. An incremental check that finds records up to
/// the note altered runs a full one to name the first.
///
/// Must be the first work of a read transaction that takes its snapshot at its first query
/// (SQLite's deferred `BEGIN`, PostgreSQL's `REPEATABLE READ`): the file is read before that
/// query, and a checkpoint is written only after the records it covers committed, so the
/// snapshot holds every record the checkpoint read covers. Read after the log, a checkpoint
/// written meanwhile would cover records the snapshot lacks: a false "removed".
pub fn verify(
    tx: &mut dyn StoreTx,
    checkpoints: Option<&Checkpoints>,
    full: bool,
) -> Result<VerifyReport, Error> {
    let file = checkpoints
        .map(|c| read_file(&c.path, &c.key))
        .unwrap_or_default();
    let head = tx.audit_head()?;
    let from = if full {
        None
    } else {
        largest_note(&file.entries)
    };
    let mut checked = check(tx, &file.entries, from, head)?;
    if let (Some(bad), Some(note)) = (&checked.walked.bad, from)
        && bad.seq <= note.size
    {
        let first = check(tx, &file.entries, None, head)?;
        if first.walked.bad.is_some() {
            checked = first;
        }
    }
    let walked = checked.walked;
    let mut report = VerifyReport {
        ok: true,
        records_checked: walked.checked,
        first_bad_seq: 0,
        reason: String::new(),
        head: walked.head,
        warnings: file.warnings,
        checkpoint_size: checked.from.unwrap_or(0),
        tree_root: None,
    };
    // A record at fault first, then a file tampered with (which may hide a checkpoint the log
    // fails), then a checkpoint the log fails.
    let tampered = file
        .tampered
        .filter(|_| walked.bad.as_ref().is_none_or(|bad| bad.against_checkpoint));
    if let Some(reason) = tampered {
        report.ok = false;
        report.reason = reason;
        report.head = head;
        return Ok(report);
    }
    if let Some(bad) = walked.bad {
        if bad.against_checkpoint {
            report.head = head;
        }
        report.ok = false;
        report.first_bad_seq = bad.seq;
        report.reason = bad.reason;
        return Ok(report);
    }
    report.tree_root = Some(walked.tree.root());
    Ok(report)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::audit::NewAuditRecord;
    use crate::feeds::Feeds;
    use crate::flags::FlagCache;
    use crate::store::{Store, StoreUrl};

    fn memory_store() -> Store {
        let cache = Arc::new(FlagCache::new(Default::default()));
        Store::open(
            &StoreUrl::Memory,
            None,
            Arc::new(Feeds::new(cache.clone())),
            cache,
        )
        .expect("memory store")
    }

    /// Appends one record for `event` to the chain of `store`.
    async fn grow(store: &Store, event: &str) {
        let record = NewAuditRecord {
            tenant_id: "acme".into(),
            actor: "test".into(),
            event: event.to_owned(),
            outcome: "applied".into(),
            metadata: Default::default(),
        };
        store
            .write(move |tx| tx.append_audit(record, 1_700_000_000_000))
            .await
            .expect("appended");
    }

    /// A memory store holding `events` audit records, and its head.
    async fn chain(events: &[&str]) -> (Store, ChainHead) {
        let store = memory_store();
        for event in events {
            grow(&store, event).await;
        }
        let report = store
            .read(crate::ops::verify_chain)
            .await
            .expect("verified");
        (store, report.head)
    }

    async fn verified(store: &Store, checkpoints: &Checkpoints) -> VerifyReport {
        let checkpoints = checkpoints.clone();
        store
            .read(move |tx| verify(tx, Some(&checkpoints), false))
            .await
            .expect("verified")
    }

    fn signer(dir: &Path) -> Arc<Checkpointer> {
        Arc::new(Checkpointer::new(
            dir.join("checkpoints"),
            load_or_create_key(&dir.join("key")).expect("key"),
            None,
            Vec::new(),
        ))
    }

    /// A chain of `events` with one checkpoint of it, in a directory that lives as long as the
    /// returned guard.
    async fn checkpointed(
        events: &[&str],
    ) -> (tempfile::TempDir, Arc<Checkpointer>, Store, ChainHead) {
        let dir = tempfile::tempdir().expect("temp dir");
        let signer = signer(dir.path());
        let (store, head) = chain(events).await;
        assert_eq!(signer.checkpoint(&store).await.expect("signed"), head);
        (dir, signer, store, head)
    }

    fn text(path: &Path) -> String {
        std::fs::read_to_string(path).expect("read")
    }

    #[test]
    fn the_key_is_created_private_once_and_read_back() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (_, key_file) = default_paths(&dir.path().join("coresdk.db"));
        assert!(key_file.ends_with("coresdk.db.audit-key"));
        let created = load_or_create_key(&key_file).expect("created");
        let loaded = load_or_create_key(&key_file).expect("loaded");
        assert_eq!(created.to_bytes(), loaded.to_bytes());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&key_file)
                .expect("exists")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        std::fs::write(&key_file, "not hex").expect("written");
        assert!(matches!(
            load_or_create_key(&key_file),
            Err(CheckpointError::BadKey(_))
        ));
    }

    #[tokio::test]
    async fn a_checkpointed_chain_verifies_and_a_cut_or_rebuilt_one_does_not() {
        let dir = tempfile::tempdir().expect("temp dir");
        let signer = signer(dir.path());
        let checkpoints = signer.checkpoints();

        let (store, head) = chain(&["a", "b", "c"]).await;
        assert!(verified(&store, &checkpoints).await.ok, "no checkpoint yet");
        assert_eq!(signer.checkpoint(&store).await.expect("signed"), head);
        let intact = verified(&store, &checkpoints).await;
        assert!(intact.ok && intact.warnings.is_empty(), "{intact:?}");

        // The newest two records cut off.
        let (cut, _) = chain(&["a"]).await;
        let cut = verified(&cut, &checkpoints).await;
        assert_eq!((cut.ok, cut.first_bad_seq), (false, 2));
        assert!(
            cut.reason.contains("records 2 to 3 were removed"),
            "{}",
            cut.reason
        );

        // A chain rebuilt with other content: it verifies alone, not against the checkpoint.
        let (rebuilt, _) = chain(&["x", "y", "z"]).await;
        let rebuilt = verified(&rebuilt, &checkpoints).await;
        assert_eq!((rebuilt.ok, rebuilt.first_bad_seq), (false, 3));
        assert!(rebuilt.reason.contains("rewritten"), "{}", rebuilt.reason);
    }

    #[tokio::test]
    async fn forged_or_foreign_checkpoints_are_reported() {
        let (dir, signer, store, _) = checkpointed(&["a", "b"]).await;

        let other = load_or_create_key(&dir.path().join("other-key")).expect("key");
        let foreign = Checkpoints {
            key: other.verifying_key(),
            ..signer.checkpoints()
        };
        let foreign = verified(&store, &foreign).await;
        assert!(
            !foreign.ok && foreign.reason.contains("bad signature"),
            "{foreign:?}"
        );

        let file = signer.path();
        let original = text(file);
        std::fs::write(file, original.replace("\"size\":2", "\"size\":1")).expect("written");
        let forged = verified(&store, &signer.checkpoints()).await;
        assert!(!forged.ok && forged.reason.contains("line 1"), "{forged:?}");
    }

    /// A line of a format before notes, signed with `key`.
    fn legacy_line(key: &SigningKey, version: u32, head: ChainHead, time: &str) -> String {
        let message = legacy_message(version, head.seq, &head.hash, time).expect("a version");
        let v = if version == 1 {
            String::new()
        } else {
            format!("\"v\":{version},")
        };
        format!(
            "{{{v}\"size\":{},\"head_hash\":\"{}\",\"time\":\"{time}\",\"signature\":\"{}\"}}\n",
            head.seq,
            hex::encode(head.hash),
            hex::encode(key.sign(&message).to_bytes())
        )
    }

    #[tokio::test]
    async fn lines_of_the_formats_before_notes_still_verify_against_the_chain() {
        let dir = tempfile::tempdir().expect("temp dir");
        let signer = signer(dir.path());
        let (store, head) = chain(&["a", "b"]).await;
        let time = "2025-01-01T00:00:00.000Z";
        let v1 = legacy_line(&signer.key, 1, head, time);
        let v2 = legacy_line(&signer.key, 2, head, time);
        std::fs::write(signer.path(), format!("{v1}{v2}")).expect("written");
        let report = verified(&store, &signer.checkpoints()).await;
        assert!(report.ok, "{report:?}");
        let (cut, _) = chain(&["a"]).await;
        assert!(!verified(&cut, &signer.checkpoints()).await.ok);
        let (rebuilt, _) = chain(&["x", "y"]).await;
        let rebuilt = verified(&rebuilt, &signer.checkpoints()).await;
        assert_eq!(
            (rebuilt.ok, rebuilt.first_bad_seq),
            (false, 2),
            "{rebuilt:?}"
        );

        // The time of a version 2 line is signed.
        let backdated = v2.replace(time, "2001-01-01T00:00:00.000Z");
        std::fs::write(signer.path(), format!("{v1}{backdated}")).expect("written");
        let backdated = verified(&store, &signer.checkpoints()).await;
        assert!(
            !backdated.ok && backdated.reason.contains("line 2 has a bad signature"),
            "{backdated:?}"
        );

        // The first note over legacy lines rehashes the log from the first record, and the
        // legacy lines keep being checked.
        std::fs::write(signer.path(), format!("{v1}{v2}")).expect("written");
        grow(&store, "c").await;
        signer.checkpoint(&store).await.expect("signed");
        let report = verified(&store, &signer.checkpoints()).await;
        assert!(report.ok && report.checkpoint_size == 3, "{report:?}");
        let (rebuilt, _) = chain(&["a", "x", "c"]).await;
        let rebuilt = verified(&rebuilt, &signer.checkpoints()).await;
        assert_eq!(
            (rebuilt.ok, rebuilt.first_bad_seq),
            (false, 2),
            "{rebuilt:?}"
        );

        let unknown = v1.replace("{\"size\"", "{\"v\":4,\"size\"");
        std::fs::write(signer.path(), unknown).expect("written");
        let unknown = verified(&store, &signer.checkpoints()).await;
        assert!(
            unknown.reason.contains("unknown format version 4"),
            "{unknown:?}"
        );
    }

    #[tokio::test]
    async fn a_torn_last_line_is_a_warning_and_the_next_write_cuts_it_off() {
        let (_dir, signer, store, _) = checkpointed(&["a", "b"]).await;
        grow(&store, "c").await;
        signer.checkpoint(&store).await.expect("signed");
        let whole = text(signer.path());
        let torn = &whole[..whole.len() - 40];
        std::fs::write(signer.path(), torn).expect("written");

        let report = verified(&store, &signer.checkpoints()).await;
        assert!(report.ok, "{report:?}");
        assert_eq!(report.warnings.len(), 1, "{report:?}");
        assert!(report.warnings[0].contains("line 2 is incomplete"));

        // Still caught: a cut chain, against the intact first line.
        let (cut, _) = chain(&["a"]).await;
        assert!(!verified(&cut, &signer.checkpoints()).await.ok);

        grow(&store, "d").await;
        signer.checkpoint(&store).await.expect("signed");
        let mended = text(signer.path());
        assert_eq!(mended.lines().count(), 2, "{mended}");
        assert!(mended.starts_with(whole.lines().next().expect("a line")));
        let report = verified(&store, &signer.checkpoints()).await;
        assert!(report.ok && report.warnings.is_empty(), "{report:?}");
    }

    #[tokio::test]
    async fn a_torn_line_before_the_last_or_a_bad_last_line_is_tampering() {
        let (_dir, signer, store, _) = checkpointed(&["a", "b"]).await;
        let line = text(signer.path());
        let torn = &line[..line.len() - 40];

        std::fs::write(signer.path(), format!("{torn}\n{line}")).expect("written");
        let inner = verified(&store, &signer.checkpoints()).await;
        assert!(
            !inner.ok && inner.reason.contains("line 1 is unreadable"),
            "{inner:?}"
        );

        // Whole JSON without its newline, but not signed by the key: not a crash's doing.
        let forged = line.trim().replace("\"size\":2", "\"size\":1");
        std::fs::write(signer.path(), format!("{line}{forged}")).expect("written");
        let forged = verified(&store, &signer.checkpoints()).await;
        assert!(
            !forged.ok && forged.reason.contains("line 2 holds a note that is not"),
            "{forged:?}"
        );
    }

    #[tokio::test]
    async fn the_file_is_compacted_to_its_newest_lines() {
        let (_dir, signer, store, _) = checkpointed(&["a", "b"]).await;
        // A file grown before compaction existed.
        let line = text(signer.path());
        std::fs::write(signer.path(), line.repeat(100 * MAX_LINES)).expect("written");

        grow(&store, "c").await;
        let signed = signer.checkpoint(&store).await.expect("signed");
        assert_eq!(text(signer.path()).lines().count(), KEPT_LINES);
        // Up to full, then cut down again, the new (and largest) line last.
        for lines in KEPT_LINES + 1..=MAX_LINES {
            grow(&store, "more").await;
            signer.checkpoint(&store).await.expect("signed");
            assert_eq!(text(signer.path()).lines().count(), lines);
        }
        grow(&store, "more").await;
        let head = signer.checkpoint(&store).await.expect("signed");
        assert!(head.seq > signed.seq);
        let compacted = text(signer.path());
        assert_eq!(compacted.lines().count(), KEPT_LINES);
        let last = compacted.lines().last().expect("a line");
        assert!(last.contains(&format!("\"size\":{},", head.seq)), "{last}");
        let report = verified(&store, &signer.checkpoints()).await;
        assert!(report.ok && report.warnings.is_empty(), "{report:?}");

        // A torn last line is cut off by a compaction too.
        let full = text(signer.path()).repeat(MAX_LINES / KEPT_LINES + 1);
        std::fs::write(signer.path(), &full[..full.len() - 40]).expect("written");
        grow(&store, "more").await;
        signer.checkpoint(&store).await.expect("signed");
        assert_eq!(text(signer.path()).lines().count(), KEPT_LINES);
        let report = verified(&store, &signer.checkpoints()).await;
        assert!(report.ok && report.warnings.is_empty(), "{report:?}");
    }

    /// The scenario compaction used to hide: records cut off while the sidecar was stopped, the
    /// chain grown again past the cut. Signing that head would add the largest line, and enough
    /// of them would compact the line that shows the cut away.
    #[tokio::test]
    async fn compaction_keeps_the_newest_cosigned_line() {
        let (_dir, signer, store, _) = checkpointed(&["a"]).await;
        let mut line: NoteLine =
            serde_json::from_str(text(signer.path()).trim_end()).expect("a note line");
        line.note.push_str(&format!(
            "— witness.example {}\n",
            BASE64_STANDARD.encode([7u8; 68])
        ));
        let cosigned = serde_json::to_string(&line).expect("a line");
        assert!(is_cosigned(&cosigned) && !is_cosigned(text(signer.path()).trim_end()));
        std::fs::write(signer.path(), format!("{cosigned}\n")).expect("written");
        for _ in 0..MAX_LINES {
            grow(&store, "more").await;
            signer.checkpoint(&store).await.expect("signed");
        }
        let compacted = text(signer.path());
        let lines: Vec<&str> = compacted.lines().collect();
        assert_eq!(lines.len(), KEPT_LINES + 1, "{compacted}");
        assert_eq!(lines[0], cosigned);
        let report = verified(&store, &signer.checkpoints()).await;
        assert!(report.ok && report.warnings.is_empty(), "{report:?}");
    }

    #[tokio::test]
    async fn a_chain_that_does_not_extend_the_largest_checkpoint_is_never_signed() {
        let events: Vec<String> = (0..10).map(|i| format!("e{i}")).collect();
        let events: Vec<&str> = events.iter().map(String::as_str).collect();
        let (_dir, signer, _, _) = checkpointed(&events).await;
        let evidence = text(signer.path());

        let (cut, _) = chain(&events[..8]).await;
        let refused = signer.checkpoint(&cut).await;
        assert!(
            matches!(&refused, Err(SignError::DoesNotExtend { seq: 8, reason }) if reason.contains("covers 10 records")),
            "{refused:?}"
        );
        let mut refused = Ok(ChainHead::GENESIS);
        for _ in 0..=MAX_LINES {
            grow(&cut, "forged").await;
            refused = signer.checkpoint(&cut).await;
            assert!(
                matches!(refused, Err(SignError::DoesNotExtend { .. })),
                "{refused:?}"
            );
        }
        assert!(
            matches!(&refused, Err(SignError::DoesNotExtend { reason, .. }) if reason.contains("does not have the root")),
            "{refused:?}"
        );
        assert_eq!(
            text(signer.path()),
            evidence,
            "the file is left as evidence"
        );
        let report = verified(&cut, &signer.checkpoints()).await;
        assert_eq!((report.ok, report.first_bad_seq), (false, 10), "{report:?}");
    }

    #[tokio::test]
    async fn every_line_is_checked_not_only_the_largest() {
        let (_dir, signer, store, head) = checkpointed(&["a", "b", "c"]).await;
        // A line for record 2 of another chain, signed with the key.
        let line = signer.signed_line(2, &[7; 32]).expect("signed");
        std::fs::write(signer.path(), format!("{line}{}", text(signer.path()))).expect("written");
        let report = verified(&store, &signer.checkpoints()).await;
        assert_eq!((report.ok, report.first_bad_seq), (false, 2), "{report:?}");
        assert!(report.reason.contains("record 2 differs"), "{report:?}");
        assert_eq!(head.seq, 3);
    }

    /// A read transaction that runs `hook` when the chain is first queried: there its snapshot
    /// starts.
    struct FirstQueryHook<'a> {
        tx: &'a mut dyn StoreTx,
        hook: Option<Box<dyn FnOnce() + Send>>,
    }

    impl FirstQueryHook<'_> {
        fn first_query(&mut self) {
            if let Some(hook) = self.hook.take() {
                hook();
            }
        }
    }

    impl StoreTx for FirstQueryHook<'_> {
        fn processed_event(
            &mut self,
            event_id: &str,
        ) -> Result<Option<crate::store::ProcessedEvent>, StoreError> {
            self.tx.processed_event(event_id)
        }
        fn record_processed(
            &mut self,
            event: &crate::store::ProcessedEvent,
            at_ms: i64,
        ) -> Result<(), StoreError> {
            self.tx.record_processed(event, at_ms)
        }
        fn customer_mapping(
            &mut self,
            customer_id: &str,
        ) -> Result<crate::store::CustomerMapping, StoreError> {
            self.tx.customer_mapping(customer_id)
        }
        fn map_customer(
            &mut self,
            customer_id: &str,
            tenant_id: &str,
            at_ms: i64,
        ) -> Result<Option<String>, StoreError> {
            self.tx.map_customer(customer_id, tenant_id, at_ms)
        }
        fn unmap_customer(
            &mut self,
            customer_id: &str,
            at_ms: i64,
        ) -> Result<Option<String>, StoreError> {
            self.tx.unmap_customer(customer_id, at_ms)
        }
        fn parked_at(&mut self, event_id: &str) -> Result<Option<i64>, StoreError> {
            self.tx.parked_at(event_id)
        }
        fn count_parked(
            &mut self,
            customer_id: Option<&str>,
            up_to: u64,
        ) -> Result<u64, StoreError> {
            self.tx.count_parked(customer_id, up_to)
        }
        fn park_event(&mut self, event: &crate::store::ParkedEvent) -> Result<(), StoreError> {
            self.tx.park_event(event)
        }
        fn parked_ids(&mut self, customer_id: &str) -> Result<Vec<String>, StoreError> {
            self.tx.parked_ids(customer_id)
        }
        fn take_parked_event(
            &mut self,
            event_id: &str,
        ) -> Result<Option<crate::store::ParkedEvent>, StoreError> {
            self.tx.take_parked_event(event_id)
        }
        fn expire_parked(
            &mut self,
            before_ms: i64,
            limit: u64,
        ) -> Result<Vec<crate::store::ParkedEvent>, StoreError> {
            self.tx.expire_parked(before_ms, limit)
        }
        fn prune_processed(&mut self, before_ms: i64, limit: u64) -> Result<u64, StoreError> {
            self.tx.prune_processed(before_ms, limit)
        }
        fn flag(
            &mut self,
            tenant_id: &str,
            key: &str,
        ) -> Result<Option<crate::flags::FlagRecord>, StoreError> {
            self.tx.flag(tenant_id, key)
        }
        fn write_flag(
            &mut self,
            record: crate::flags::FlagRecord,
        ) -> Result<crate::flags::FlagRecord, StoreError> {
            self.tx.write_flag(record)
        }
        fn advance_flag_order(
            &mut self,
            tenant_id: &str,
            key: &str,
            order: &crate::stripe::EventOrder,
        ) -> Result<(), StoreError> {
            self.tx.advance_flag_order(tenant_id, key, order)
        }
        fn billing_object(
            &mut self,
            tenant_id: &str,
            object: &str,
        ) -> Result<Option<crate::store::BillingObject>, StoreError> {
            self.tx.billing_object(tenant_id, object)
        }
        fn billing_objects_of_kind(
            &mut self,
            tenant_id: &str,
            kind: &str,
        ) -> Result<Vec<crate::store::BillingObject>, StoreError> {
            self.tx.billing_objects_of_kind(tenant_id, kind)
        }
        fn write_billing_object(
            &mut self,
            tenant_id: &str,
            kind: &str,
            object: &crate::store::BillingObject,
        ) -> Result<(), StoreError> {
            self.tx.write_billing_object(tenant_id, kind, object)
        }
        fn append_audit(
            &mut self,
            record: NewAuditRecord,
            at_ms: i64,
        ) -> Result<crate::audit::AuditRecord, Error> {
            self.tx.append_audit(record, at_ms)
        }
        fn load_flags(&mut self) -> Result<Vec<crate::flags::FlagRecord>, StoreError> {
            self.tx.load_flags()
        }
        fn audit_head(&mut self) -> Result<ChainHead, StoreError> {
            self.first_query();
            self.tx.audit_head()
        }
        fn query_audit(
            &mut self,
            query: &crate::store::AuditQuery,
        ) -> Result<Vec<crate::audit::AuditRecord>, StoreError> {
            self.first_query();
            self.tx.query_audit(query)
        }
        fn scan_audit(
            &mut self,
            from_seq: u64,
            visit: &mut dyn FnMut(crate::audit::StoredAuditRow) -> bool,
        ) -> Result<(), StoreError> {
            self.first_query();
            self.tx.scan_audit(from_seq, visit)
        }
        fn audit_tree_hashes(&mut self, seqs: &[u64]) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
            self.first_query();
            self.tx.audit_tree_hashes(seqs)
        }
        fn audit_tree_reach(&mut self) -> Result<crate::store::TreeReach, StoreError> {
            self.first_query();
            self.tx.audit_tree_reach()
        }
        fn extend_audit_tree(&mut self, limit: u64) -> Result<crate::store::TreeReach, Error> {
            self.first_query();
            self.tx.extend_audit_tree(limit)
        }
    }

    /// The race behind false "removed" reports, made certain: a checkpoint of a record the
    /// snapshot lacks is written just as the snapshot starts. Read before the snapshot, the file
    /// does not hold it yet; read after the chain (the old order), it would.
    #[tokio::test]
    async fn a_checkpoint_written_as_the_snapshot_starts_is_no_false_alarm() {
        let (dir, signer, store, _) = checkpointed(&["a", "b"]).await;
        let (later, _) = chain(&["a", "b", "c"]).await;
        let root = later
            .read(|tx| crate::tlog::tree_root(tx, 3))
            .await
            .expect("root");
        let newer_line = signer.signed_line(3, &root).expect("signed");
        let checkpoints = signer.checkpoints();
        let path = signer.path().to_owned();
        let report = store
            .read(move |tx| {
                let hook = Box::new(move || {
                    let mut file = std::fs::OpenOptions::new()
                        .append(true)
                        .open(&path)
                        .expect("open");
                    file.write_all(newer_line.as_bytes()).expect("appended");
                });
                let mut hooked = FirstQueryHook {
                    tx,
                    hook: Some(hook),
                };
                verify(&mut hooked, Some(&checkpoints), false)
            })
            .await
            .expect("verified");
        assert!(report.ok && report.head.seq == 2, "{report:?}");
        assert_eq!(text(signer.path()).lines().count(), 2, "the hook ran");
        drop(dir);
    }
}
