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
//! The file holds at most [`MAX_LINES`] lines, so verifying it costs the same after years: past
//! that the writer replaces it (atomically) with its newest [`KEPT_LINES`]. That loses nothing:
//! the chain is verified from genesis, so the newest checkpoint implies every older one. A
//! forged line among the dropped ones goes with them; whoever can write the file can delete
//! lines anyway, and what the chain is checked against is the newest line that verifies.
//! For real protection keep the key in a mounted secret and the file on other storage.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use ed25519_dalek::{Signature, Signer as _, SigningKey, Verifier as _, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::audit::{ChainHead, VerifyReport};
use crate::problem::Error;
use crate::store::StoreTx;

const DOMAIN_TAG_V1: &[u8] = b"coresdk.checkpoint.v1\0";
const DOMAIN_TAG_V2: &[u8] = b"coresdk.checkpoint.v2\0";
const CURRENT_VERSION: u32 = 2;

/// The most lines a checkpoint file holds; verification reads them all.
pub const MAX_LINES: usize = 64;
/// The lines a full file is cut down to: the newest alone would do, a few more leave a reader
/// some recent history.
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
    let mut hash = [0u8; 32];
    let mut signature = [0u8; 64];
    hex::decode_to_slice(&checkpoint.head_hash, &mut hash)
        .and_then(|()| hex::decode_to_slice(&checkpoint.signature, &mut signature))
        .map_err(|_| BadLine::BadSignature)?;
    let message = message(checkpoint.version, checkpoint.size, &hash, &checkpoint.time)
        .ok_or(BadLine::UnknownVersion(checkpoint.version))?;
    key.verify(&message, &Signature::from_bytes(&signature))
        .map_err(|_| BadLine::BadSignature)?;
    Ok(checkpoint)
}

/// Splits a file's text into its whole lines and what follows the last newline, which only a
/// write cut short leaves.
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

/// What a checkpoint file vouches for.
#[derive(Debug, Default)]
struct FileReading {
    newest: Option<Checkpoint>,
    /// Evidence that the file itself was tampered with.
    tampered: Option<String>,
    warnings: Vec<String>,
}

impl FileReading {
    fn consider(&mut self, checkpoint: Checkpoint) {
        if self
            .newest
            .as_ref()
            .is_none_or(|c| checkpoint.size >= c.size)
        {
            self.newest = Some(checkpoint);
        }
    }
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
    let (whole, tail) = split_torn_tail(&text);
    for (n, line) in whole_lines(whole) {
        match parse_line(line, key) {
            Ok(checkpoint) => reading.consider(checkpoint),
            Err(bad) => {
                reading.tampered = Some(format!("checkpoint line {n} {bad}"));
                return reading;
            }
        }
    }
    if !tail.trim().is_empty() {
        let n = whole.lines().count() + 1;
        match parse_line(tail, key) {
            Ok(checkpoint) => reading.consider(checkpoint),
            Err(BadLine::Unreadable) => reading.warnings.push(format!(
                "checkpoint line {n} is incomplete, as a write cut short by a crash leaves it: ignored, and replaced by the next checkpoint"
            )),
            Err(bad) => reading.tampered = Some(format!("checkpoint line {n} {bad}")),
        }
    }
    reading
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

    /// Adds a signed checkpoint of `head` and syncs the file: appended, after cutting off a
    /// line a crash left incomplete; or, once the file is full, as the last of its newest
    /// lines in a file that atomically replaces it.
    pub fn write(&self, head: ChainHead) -> Result<(), CheckpointError> {
        let _turn = self.turn.lock().unwrap_or_else(PoisonError::into_inner);
        let line = self.signed_line(head)?;
        let text = match std::fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(io_error(&self.path)(e)),
        };
        let (whole, tail) = split_torn_tail(&text);
        let lines: Vec<&str> = whole_lines(whole).map(|(_, line)| line).collect();
        if lines.len() >= MAX_LINES {
            return self.replace(&lines[lines.len() - (KEPT_LINES - 1)..], &line);
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
            .map_err(io_error(&self.path))
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

/// A checkpoint file and the key that vouches for its lines.
#[derive(Debug, Clone)]
pub struct Checkpoints {
    pub path: PathBuf,
    pub key: VerifyingKey,
}

/// Verifies the chain `tx` sees and, with `checkpoints`, that it still holds the newest one.
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
    let Some(checkpoint) = file.newest else {
        return Ok(report);
    };
    if report.head.seq < checkpoint.size {
        let first_missing = report.head.seq + 1;
        return Ok(fail(
            report,
            first_missing,
            format!(
                "records {first_missing} to {} were removed: a checkpoint signed at {} covers {} records",
                checkpoint.size,
                checkpoint.signed_at(),
                checkpoint.size
            ),
        ));
    }
    let mut stored_hash = None;
    tx.scan_audit(checkpoint.size, &mut |row| {
        stored_hash = Some(hex::encode(&row.hash));
        false
    })?;
    if stored_hash.as_deref() != Some(checkpoint.head_hash.as_str()) {
        let size = checkpoint.size;
        return Ok(fail(
            report,
            size,
            format!(
                "record {size} differs from the checkpoint signed at {}: the chain was rewritten",
                checkpoint.signed_at()
            ),
        ));
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

    /// A memory store holding `events` audit records, and its head.
    async fn chain(events: &[&str]) -> (Store, ChainHead) {
        let cache = Arc::new(FlagCache::new(Default::default()));
        let store = Store::open(
            &StoreUrl::Memory,
            None,
            Arc::new(Feeds::new(cache.clone())),
            cache,
        )
        .expect("memory store");
        for event in events {
            let record = NewAuditRecord {
                tenant_id: "acme".into(),
                actor: "test".into(),
                event: (*event).to_owned(),
                outcome: "applied".into(),
                metadata: Default::default(),
            };
            store
                .write(move |tx| tx.append_audit(record, 1_700_000_000_000))
                .await
                .expect("appended");
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

    fn signer(dir: &Path) -> Checkpointer {
        Checkpointer::new(
            dir.join("checkpoints"),
            load_or_create_key(&dir.join("key")).expect("key"),
        )
    }

    /// A chain of `events` with one checkpoint of it, in a directory that lives as long as the
    /// returned guard.
    async fn checkpointed(events: &[&str]) -> (tempfile::TempDir, Checkpointer, Store, ChainHead) {
        let dir = tempfile::tempdir().expect("temp dir");
        let signer = signer(dir.path());
        let (store, head) = chain(events).await;
        signer.write(head).expect("written");
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
        signer.write(head).expect("written");
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
        let (_dir, signer, store, head) = checkpointed(&["a", "b"]).await;
        signer.write(head).expect("written");
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

        signer.write(head).expect("written");
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
        let (_dir, signer, store, head) = checkpointed(&["a", "b"]).await;
        // A file grown before compaction existed.
        let line = text(signer.path());
        std::fs::write(signer.path(), line.repeat(100 * MAX_LINES)).expect("written");

        signer.write(head).expect("written");
        assert_eq!(text(signer.path()).lines().count(), KEPT_LINES);
        // Up to full, then cut down again.
        for lines in KEPT_LINES + 1..=MAX_LINES {
            signer.write(head).expect("written");
            assert_eq!(text(signer.path()).lines().count(), lines);
        }
        signer.write(head).expect("written");
        assert_eq!(text(signer.path()).lines().count(), KEPT_LINES);
        let report = verified(&store, &signer.checkpoints()).await;
        assert!(report.ok && report.warnings.is_empty(), "{report:?}");

        // A torn last line is cut off by a compaction too.
        let full = text(signer.path()).repeat(MAX_LINES / KEPT_LINES + 1);
        std::fs::write(signer.path(), &full[..full.len() - 40]).expect("written");
        signer.write(head).expect("written");
        assert_eq!(text(signer.path()).lines().count(), KEPT_LINES);
        let report = verified(&store, &signer.checkpoints()).await;
        assert!(report.ok && report.warnings.is_empty(), "{report:?}");
    }
}
