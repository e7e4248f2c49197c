//! Signed checkpoints of the audit chain, kept outside the database.
//!
//! A hash chain proves that nothing inside it was altered, but not that its newest records
//! were not cut off, nor that the whole chain was not rebuilt. Every few seconds the sidecar
//! appends a line `{v, size, head_hash, time, signature}` to a checkpoint file, signed with
//! Ed25519 over `"coresdk.checkpoint.v2\0" ‖ size (u64 BE) ‖ head_hash ‖ time (UTF-8)`, so the
//! time a line claims is vouched for too. Lines without `v` were written before that (version
//! 1, signed over `"coresdk.checkpoint.v1\0" ‖ size ‖ head_hash`); they still verify, but their
//! time is not vouched for. Verification then also demands that the chain still holds every
//! checkpointed record, with the checkpointed head hash.
//!
//! Every line is written whole with its newline, so text after the last newline is a write a
//! crash cut short: verification reports it as a warning and the next write truncates it. Any
//! other line that does not verify is evidence of tampering.
//!
//! The writer signs a head only if the chain, read from the store, extends the largest
//! checkpoint in the file: it holds that checkpoint's record with its hash. A chain cut or
//! rewritten (say while the sidecar was stopped) is refused loudly and never signed, so every
//! line the writer adds covers more than the lines before it, and a checkpoint implies every
//! smaller one. That is what lets the file be bounded: it holds at most [`MAX_LINES`] lines
//! (verification checks each, one lookup apiece), and past that the writer replaces it
//! (atomically) with its newest [`KEPT_LINES`], the last of them its new line, the largest.
//! A forged line among the dropped ones goes with them; whoever can write the file can delete
//! lines anyway. For real protection keep the key in a mounted secret and the file on other
//! storage.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use ed25519_dalek::{Signature, Signer as _, SigningKey, Verifier as _, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::audit::{ChainHead, VerifyReport};
use crate::problem::Error;
use crate::store::{Store, StoreError, StoreTx};

const DOMAIN_TAG_V1: &[u8] = b"coresdk.checkpoint.v1\0";
const DOMAIN_TAG_V2: &[u8] = b"coresdk.checkpoint.v2\0";
const CURRENT_VERSION: u32 = 2;

/// The most lines a checkpoint file holds; verification reads them all.
pub const MAX_LINES: usize = 64;
/// The lines a full file is cut down to: the newest (also the largest) alone would do, a few
/// more leave a reader some recent history.
pub const KEPT_LINES: usize = 8;
const _: () = assert!(0 < KEPT_LINES && KEPT_LINES <= MAX_LINES);

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
    #[error("cannot read the audit chain to check it against the largest checkpoint: {0}")]
    Store(#[from] Error),
    #[error(
        "REFUSING TO SIGN the audit chain head {seq}: {reason}. The chain was cut or rewritten; keep the checkpoint file as evidence and investigate"
    )]
    DoesNotExtend { seq: u64, reason: String },
    #[error(
        "the checkpoint file changed while the chain was checked against it: checked again at the next checkpoint"
    )]
    Changed,
}

impl From<StoreError> for SignError {
    fn from(e: StoreError) -> Self {
        Self::Store(e.into())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Checkpoint {
    /// The format: 2 signs the time too; lines written before it carry no `v` and are 1.
    #[serde(rename = "v", default = "version_1")]
    pub version: u32,
    pub size: u64,
    pub head_hash: String,
    pub time: String,
    pub signature: String,
}

fn version_1() -> u32 {
    1
}

impl Checkpoint {
    /// When it was signed, as far as the signature vouches for it.
    fn signed_at(&self) -> String {
        match self.version {
            1 => format!("{} (a version 1 line: time not signed)", self.time),
            _ => self.time.clone(),
        }
    }
}

/// The bytes a checkpoint's signature covers.
fn message(version: u32, size: u64, head_hash: &[u8; 32], time: &str) -> Option<Vec<u8>> {
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
}

impl std::fmt::Display for BadLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unreadable => f.write_str("is unreadable"),
            Self::UnknownVersion(v) => write!(f, "has an unknown format version {v}"),
            Self::BadSignature => f.write_str("has a bad signature"),
        }
    }
}

/// The checkpoint a line holds, if `key` signed it.
fn parse_line(line: &str, key: &VerifyingKey) -> Result<Checkpoint, BadLine> {
    let checkpoint: Checkpoint = serde_json::from_str(line).map_err(|_| BadLine::Unreadable)?;
    check_signature(&checkpoint, key)?;
    Ok(checkpoint)
}

fn check_signature(checkpoint: &Checkpoint, key: &VerifyingKey) -> Result<(), BadLine> {
    let mut hash = [0u8; 32];
    let mut signature = [0u8; 64];
    hex::decode_to_slice(&checkpoint.head_hash, &mut hash)
        .and_then(|()| hex::decode_to_slice(&checkpoint.signature, &mut signature))
        .map_err(|_| BadLine::BadSignature)?;
    let message = message(checkpoint.version, checkpoint.size, &hash, &checkpoint.time)
        .ok_or(BadLine::UnknownVersion(checkpoint.version))?;
    key.verify(&message, &Signature::from_bytes(&signature))
        .map_err(|_| BadLine::BadSignature)
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

/// The checkpoint with the largest size among the lines `key` signed: the one the chain must
/// extend. Signatures are checked largest first, so a file of any length costs one check
/// unless lines were forged.
fn largest(text: &str, key: &VerifyingKey) -> Option<Checkpoint> {
    let mut checkpoints: Vec<Checkpoint> = lines(text)
        .filter_map(|line| serde_json::from_str(line.text).ok())
        .collect();
    // Of equal sizes, the later line.
    checkpoints.reverse();
    checkpoints.sort_by_key(|c| std::cmp::Reverse(c.size));
    checkpoints
        .into_iter()
        .find(|c| check_signature(c, key).is_ok())
}

/// What a checkpoint file vouches for.
#[derive(Debug, Default)]
struct FileReading {
    checkpoints: Vec<Checkpoint>,
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
            Ok(checkpoint) => reading.checkpoints.push(checkpoint),
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

/// Whether the chain `tx` sees holds `checkpoint`'s record with its hash.
fn holds_checkpoint(tx: &mut dyn StoreTx, checkpoint: &Checkpoint) -> Result<bool, StoreError> {
    let hash = hex::decode(&checkpoint.head_hash).unwrap_or_default();
    holds(tx, checkpoint.size, &hash)
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io {
        path: path.display().to_string(),
        source,
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
        Ok(text) => {
            let mut seed = [0u8; 32];
            hex::decode_to_slice(text.trim(), &mut seed)
                .map_err(|_| CheckpointError::BadKey(path.display().to_string()))?;
            Ok(SigningKey::from_bytes(&seed))
        }
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

/// Key material from the operating system's generator, read from /dev/urandom.
fn getrandom(buf: &mut [u8]) -> std::io::Result<()> {
    use std::io::Read as _;
    std::fs::File::open("/dev/urandom")?.read_exact(buf)
}

pub struct Checkpointer {
    path: PathBuf,
    key: SigningKey,
    /// Writes take turns: the final checkpoint at shutdown may overlap the loop's last one, and
    /// a write reads the file before it changes it.
    turn: Mutex<()>,
}

impl Checkpointer {
    pub fn new(path: PathBuf, key: SigningKey) -> Self {
        Self {
            path,
            key,
            turn: Mutex::new(()),
        }
    }

    pub fn verifying_key(&self) -> VerifyingKey {
        self.key.verifying_key()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What a verifier needs to check the chain against this file.
    pub fn checkpoints(&self) -> Checkpoints {
        Checkpoints {
            path: self.path.clone(),
            key: self.verifying_key(),
        }
    }

    fn signed_line(&self, head: ChainHead) -> Result<String, CheckpointError> {
        let time = crate::time::rfc3339_ms(crate::time::now_ms());
        let message = message(CURRENT_VERSION, head.seq, &head.hash, &time).ok_or_else(|| {
            io_error(&self.path)(std::io::Error::other("no message for the current version"))
        })?;
        let mut line = serde_json::to_string(&Checkpoint {
            version: CURRENT_VERSION,
            size: head.seq,
            head_hash: hex::encode(head.hash),
            time,
            signature: hex::encode(self.key.sign(&message).to_bytes()),
        })
        .map_err(|e| io_error(&self.path)(std::io::Error::other(e)))?;
        line.push('\n');
        Ok(line)
    }

    fn text(&self) -> Result<String, CheckpointError> {
        match std::fs::read_to_string(&self.path) {
            Ok(text) => Ok(text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
            Err(e) => Err(io_error(&self.path)(e)),
        }
    }

    /// The checkpoint the next one must extend. Lines that do not verify are left for
    /// verification to report; they vouch for nothing here.
    fn largest_in(&self, text: &str) -> Option<Checkpoint> {
        largest(text, &self.verifying_key())
    }

    /// Signs the head of the chain `store` holds if it extends the largest checkpoint, and
    /// answers it. A chain that does not (cut or rewritten, while the sidecar ran or before it
    /// started) is refused with [`SignError::DoesNotExtend`], and the file is left as it is:
    /// the evidence.
    pub async fn checkpoint(self: &Arc<Self>, store: &Store) -> Result<ChainHead, SignError> {
        let checker = self.clone();
        let extension = store.read(move |tx| Ok(checker.extension(tx))).await??;
        let head = extension.head;
        if extension.signs {
            let signer = self.clone();
            tokio::task::spawn_blocking(move || signer.write(&extension))
                .await
                .map_err(|e| io_error(&self.path)(std::io::Error::other(e)))??;
        }
        Ok(head)
    }

    /// Checks, in one read transaction of the store, that its chain extends the largest
    /// checkpoint. The file is read first, as in [`verify`]; [`Checkpointer::write`] makes sure
    /// it did not change until the new line is written.
    fn extension(&self, tx: &mut dyn StoreTx) -> Result<Extension, SignError> {
        let largest = self.largest_in(&self.text()?);
        let head = tx.audit_head()?;
        let refuse = |reason: String| SignError::DoesNotExtend {
            seq: head.seq,
            reason,
        };
        let Some(largest) = largest else {
            return Ok(Extension {
                head,
                largest: None,
                signs: head.seq > 0,
            });
        };
        if head.seq < largest.size {
            return Err(refuse(format!(
                "the chain ends at record {} but a checkpoint signed at {} covers {} records",
                head.seq,
                largest.signed_at(),
                largest.size
            )));
        }
        if !holds_checkpoint(tx, &largest)? {
            return Err(refuse(format!(
                "record {} differs from the checkpoint signed at {}",
                largest.size,
                largest.signed_at()
            )));
        }
        Ok(Extension {
            head,
            largest: Some(largest),
            signs: true,
        })
    }

    /// Adds a signed checkpoint of the extension's head and syncs the file: appended, after
    /// cutting off a line a crash left incomplete; or, once the file is full, as the last of
    /// its newest lines in a file that atomically replaces it.
    fn write(&self, extension: &Extension) -> Result<(), SignError> {
        let _turn = self.turn.lock().unwrap_or_else(PoisonError::into_inner);
        let text = self.text()?;
        if self.largest_in(&text) != extension.largest {
            return Err(SignError::Changed);
        }
        let line = self.signed_line(extension.head)?;
        let (whole, tail) = split_torn_tail(&text);
        let lines: Vec<&str> = whole_lines(whole).map(|(_, line)| line).collect();
        if lines.len() >= MAX_LINES {
            return Ok(self.replace(&lines[lines.len() - (KEPT_LINES - 1)..], &line)?);
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

    /// Replaces the file by `kept` and `last`, so that a reader sees the old file or the new
    /// one, never a mix, and a crash leaves one of them.
    fn replace(&self, kept: &[&str], last: &str) -> Result<(), CheckpointError> {
        let dir = match self.path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        let io = io_error(&self.path);
        let replaced = (|| {
            let mut next = tempfile::NamedTempFile::new_in(dir)?;
            for line in kept {
                writeln!(next, "{line}")?;
            }
            next.write_all(last.as_bytes())?;
            if let Ok(metadata) = std::fs::metadata(&self.path) {
                next.as_file().set_permissions(metadata.permissions())?;
            }
            next.as_file().sync_all()?;
            next.persist(&self.path).map_err(|e| e.error)?;
            std::fs::File::open(dir)?.sync_all()
        })();
        replaced.map_err(io)?;
        tracing::info!(
            path = %self.path.display(),
            kept = kept.len() + 1,
            "checkpoint file compacted to its newest lines"
        );
        Ok(())
    }
}

/// A chain head, read from the store, that extends the largest checkpoint of the file.
struct Extension {
    head: ChainHead,
    largest: Option<Checkpoint>,
    /// Whether there is anything to sign: not before the first record.
    signs: bool,
}

/// A checkpoint file and the key that vouches for its lines.
#[derive(Debug, Clone)]
pub struct Checkpoints {
    pub path: PathBuf,
    pub key: VerifyingKey,
}

/// Verifies the chain `tx` sees and, with `checkpoints`, that it still holds every checkpoint.
///
/// Must be the first work of a read transaction that takes its snapshot at its first query
/// (SQLite's deferred `BEGIN`, PostgreSQL's `REPEATABLE READ`): the file is read before that
/// query, and a checkpoint is written only after the records it covers committed, so the
/// snapshot holds every record the checkpoint read covers. Read after the chain, a checkpoint
/// written meanwhile would cover records the snapshot lacks: a false "removed".
pub fn verify(
    tx: &mut dyn StoreTx,
    checkpoints: Option<&Checkpoints>,
) -> Result<VerifyReport, Error> {
    let file = checkpoints.map(|c| read_file(&c.path, &c.key));
    let mut report = crate::ops::verify_chain(tx)?;
    let Some(file) = file else {
        return Ok(report);
    };
    report.warnings.extend(file.warnings);
    if !report.ok {
        return Ok(report);
    }
    let fail = |mut report: VerifyReport, seq: u64, reason: String| {
        report.ok = false;
        report.first_bad_seq = seq;
        report.reason = reason;
        report
    };
    if let Some(reason) = file.tampered {
        return Ok(fail(report, 0, reason));
    }
    let mut checkpoints = file.checkpoints;
    // Largest first: a cut chain is reported against the checkpoint covering the most.
    checkpoints.sort_by_key(|c| std::cmp::Reverse(c.size));
    if let Some(largest) = checkpoints.first()
        && report.head.seq < largest.size
    {
        let first_missing = report.head.seq + 1;
        let reason = format!(
            "records {first_missing} to {} were removed: a checkpoint signed at {} covers {} records",
            largest.size,
            largest.signed_at(),
            largest.size
        );
        return Ok(fail(report, first_missing, reason));
    }
    // Every line, not the largest alone: the writer signs only a chain that extends the
    // largest line, so any line the chain does not hold is evidence, whichever it is.
    for checkpoint in &checkpoints {
        if !holds_checkpoint(tx, checkpoint)? {
            let size = checkpoint.size;
            let reason = format!(
                "record {size} differs from the checkpoint signed at {}: the chain was rewritten",
                checkpoint.signed_at()
            );
            return Ok(fail(report, size, reason));
        }
    }
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
            .read(move |tx| verify(tx, Some(&checkpoints)))
            .await
            .expect("verified")
    }

    fn signer(dir: &Path) -> Arc<Checkpointer> {
        Arc::new(Checkpointer::new(
            dir.join("checkpoints"),
            load_or_create_key(&dir.join("key")).expect("key"),
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

    #[tokio::test]
    async fn the_time_is_signed_and_version_1_lines_still_verify() {
        let (_dir, signer, store, head) = checkpointed(&["a", "b"]).await;
        let line = text(signer.path());
        assert!(line.starts_with("{\"v\":2,"), "{line}");

        let checkpoint: Checkpoint = serde_json::from_str(line.trim()).expect("a checkpoint");
        let backdated = line.replace(&checkpoint.time, "2001-01-01T00:00:00.000Z");
        std::fs::write(signer.path(), backdated).expect("written");
        let backdated = verified(&store, &signer.checkpoints()).await;
        assert!(
            !backdated.ok && backdated.reason.contains("line 1 has a bad signature"),
            "{backdated:?}"
        );

        // A line as the sidecar wrote it before version 2: no `v`, the time not signed.
        let v1 = message(1, head.seq, &head.hash, "ignored").expect("version 1");
        let old = format!(
            "{{\"size\":{},\"head_hash\":\"{}\",\"time\":\"2025-01-01T00:00:00.000Z\",\"signature\":\"{}\"}}\n",
            head.seq,
            hex::encode(head.hash),
            hex::encode(signer.key.sign(&v1).to_bytes())
        );
        std::fs::write(signer.path(), &old).expect("written");
        let report = verified(&store, &signer.checkpoints()).await;
        assert!(report.ok, "{report:?}");
        let (cut, _) = chain(&["a"]).await;
        assert!(!verified(&cut, &signer.checkpoints()).await.ok);

        let unknown = old.replace("{\"size\"", "{\"v\":3,\"size\"");
        std::fs::write(signer.path(), unknown).expect("written");
        let unknown = verified(&store, &signer.checkpoints()).await;
        assert!(
            unknown.reason.contains("unknown format version 3"),
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
            !forged.ok && forged.reason.contains("line 2 has a bad signature"),
            "{forged:?}"
        );
    }

    #[tokio::test]
    async fn the_file_is_compacted_to_its_newest_lines() {
        let (_dir, signer, store, _) = checkpointed(&["a", "b"]).await;
        // A file grown before compaction existed.
        let line = text(signer.path());
        std::fs::write(signer.path(), line.repeat(100 * MAX_LINES)).expect("written");

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
        signer.checkpoint(&store).await.expect("signed");
        assert_eq!(text(signer.path()).lines().count(), KEPT_LINES);
        let report = verified(&store, &signer.checkpoints()).await;
        assert!(report.ok && report.warnings.is_empty(), "{report:?}");
    }

    /// The scenario compaction used to hide: records cut off while the sidecar was stopped, the
    /// chain grown again past the cut. Signing that head would add the largest line, and enough
    /// of them would compact the line that shows the cut away.
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
            matches!(&refused, Err(SignError::DoesNotExtend { reason, .. }) if reason.contains("record 10 differs")),
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
        let other = ChainHead {
            seq: 2,
            hash: [7; 32],
        };
        let line = signer.signed_line(other).expect("signed");
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
        let (_, later) = chain(&["a", "b", "c"]).await;
        let newer_line = signer.signed_line(later).expect("signed");
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
                verify(&mut hooked, Some(&checkpoints))
            })
            .await
            .expect("verified");
        assert!(report.ok && report.head.seq == 2, "{report:?}");
        assert_eq!(text(signer.path()).lines().count(), 2, "the hook ran");
        drop(dir);
    }
}
