//! Signed checkpoints of the audit chain, kept outside the database.
//!
//! A hash chain proves that nothing inside it was altered, but not that its newest records
//! were not cut off, nor that the whole chain was not rebuilt. Every few seconds the sidecar
//! appends `{size, head_hash, time, signature}` to a checkpoint file, signed with Ed25519 over
//! `"coresdk.checkpoint.v1\0" ‖ size (u64 BE) ‖ head_hash`. Verification then also demands that
//! the chain still holds every checkpointed record, with the checkpointed head hash.
//! For real protection keep the key in a mounted secret and the file on other storage.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use ed25519_dalek::{Signature, Signer as _, SigningKey, Verifier as _, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::audit::{ChainHead, VerifyReport};
use crate::problem::Error;
use crate::store::StoreTx;

const DOMAIN_TAG: &[u8] = b"coresdk.checkpoint.v1\0";

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
    pub size: u64,
    pub head_hash: String,
    pub time: String,
    pub signature: String,
}

fn message(size: u64, head_hash: &[u8; 32]) -> Vec<u8> {
    let mut message = Vec::with_capacity(DOMAIN_TAG.len() + 40);
    message.extend_from_slice(DOMAIN_TAG);
    message.extend_from_slice(&size.to_be_bytes());
    message.extend_from_slice(head_hash);
    message
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
}

impl Checkpointer {
    pub fn new(path: PathBuf, key: SigningKey) -> Self {
        Self { path, key }
    }

    pub fn verifying_key(&self) -> VerifyingKey {
        self.key.verifying_key()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends a signed checkpoint of `head` and syncs the file.
    pub fn write(&self, head: ChainHead) -> Result<(), CheckpointError> {
        let signature = self.key.sign(&message(head.seq, &head.hash));
        let line = serde_json::to_string(&Checkpoint {
            size: head.seq,
            head_hash: hex::encode(head.hash),
            time: crate::time::rfc3339_ms(crate::time::now_ms()),
            signature: hex::encode(signature.to_bytes()),
        })
        .map_err(|e| io_error(&self.path)(std::io::Error::other(e)))?;
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(io_error(&self.path))?;
        writeln!(file, "{line}")
            .and_then(|()| file.sync_data())
            .map_err(io_error(&self.path))
    }
}

/// Reads the checkpoint file and returns the largest checkpoint whose signature verifies; a
/// line that does not verify is itself evidence of tampering.
fn newest_valid(path: &Path, key: &VerifyingKey) -> Result<Option<Checkpoint>, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let mut newest: Option<Checkpoint> = None;
    for (index, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let n = index + 1;
        let checkpoint: Checkpoint =
            serde_json::from_str(line).map_err(|_| format!("checkpoint line {n} is unreadable"))?;
        let mut hash = [0u8; 32];
        let mut signature = [0u8; 64];
        let decoded = hex::decode_to_slice(&checkpoint.head_hash, &mut hash)
            .and_then(|()| hex::decode_to_slice(&checkpoint.signature, &mut signature));
        let valid = decoded.is_ok()
            && key
                .verify(
                    &message(checkpoint.size, &hash),
                    &Signature::from_bytes(&signature),
                )
                .is_ok();
        if !valid {
            return Err(format!("checkpoint line {n} has a bad signature"));
        }
        if newest.as_ref().is_none_or(|c| checkpoint.size >= c.size) {
            newest = Some(checkpoint);
        }
    }
    Ok(newest)
}

/// Extends a chain report with the checkpoints: the chain must still hold the newest
/// checkpointed record, with the same hash.
pub fn check(
    tx: &mut dyn StoreTx,
    report: VerifyReport,
    path: &Path,
    key: &VerifyingKey,
) -> Result<VerifyReport, Error> {
    if !report.ok {
        return Ok(report);
    }
    let fail = |mut report: VerifyReport, seq: u64, reason: String| {
        report.ok = false;
        report.first_bad_seq = seq;
        report.reason = reason;
        report
    };
    let checkpoint = match newest_valid(path, key) {
        Ok(Some(checkpoint)) => checkpoint,
        Ok(None) => return Ok(report),
        Err(reason) => return Ok(fail(report, 0, reason)),
    };
    if report.head.seq < checkpoint.size {
        let first_missing = report.head.seq + 1;
        return Ok(fail(
            report,
            first_missing,
            format!(
                "records {first_missing} to {} were removed: a checkpoint signed at {} covers {} records",
                checkpoint.size, checkpoint.time, checkpoint.size
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
                checkpoint.time
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

    /// A memory store holding `events` audit records, and its chain report.
    async fn chain(events: &[&str]) -> (Store, VerifyReport) {
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
        (store, report)
    }

    async fn checked(
        store: &Store,
        report: VerifyReport,
        path: &Path,
        key: VerifyingKey,
    ) -> VerifyReport {
        let path = path.to_owned();
        store
            .read(move |tx| check(tx, report, &path, &key))
            .await
            .expect("checked")
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
        let file = dir.path().join("checkpoints");
        let signer = Checkpointer::new(
            file.clone(),
            load_or_create_key(&dir.path().join("key")).expect("key"),
        );
        let key = signer.verifying_key();

        let (store, report) = chain(&["a", "b", "c"]).await;
        assert!(
            checked(&store, report.clone(), &file, key).await.ok,
            "no checkpoint yet"
        );
        signer.write(report.head).expect("written");
        let intact = checked(&store, report, &file, key).await;
        assert!(intact.ok, "{intact:?}");

        // The newest two records cut off.
        let (cut, cut_report) = chain(&["a"]).await;
        let cut = checked(&cut, cut_report, &file, key).await;
        assert_eq!((cut.ok, cut.first_bad_seq), (false, 2));
        assert!(
            cut.reason.contains("records 2 to 3 were removed"),
            "{}",
            cut.reason
        );

        // A chain rebuilt with other content: it verifies alone, not against the checkpoint.
        let (rebuilt, rebuilt_report) = chain(&["x", "y", "z"]).await;
        assert!(rebuilt_report.ok);
        let rebuilt = checked(&rebuilt, rebuilt_report, &file, key).await;
        assert_eq!((rebuilt.ok, rebuilt.first_bad_seq), (false, 3));
        assert!(rebuilt.reason.contains("rewritten"), "{}", rebuilt.reason);
    }

    #[tokio::test]
    async fn forged_or_foreign_checkpoints_are_reported() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("checkpoints");
        let signer = Checkpointer::new(
            file.clone(),
            load_or_create_key(&dir.path().join("key")).expect("key"),
        );
        let (store, report) = chain(&["a", "b"]).await;
        signer.write(report.head).expect("written");

        let other = load_or_create_key(&dir.path().join("other-key")).expect("key");
        let foreign = checked(&store, report.clone(), &file, other.verifying_key()).await;
        assert!(
            !foreign.ok && foreign.reason.contains("bad signature"),
            "{foreign:?}"
        );

        let text = std::fs::read_to_string(&file).expect("read");
        std::fs::write(&file, text.replace("\"size\":2", "\"size\":1")).expect("written");
        let forged = checked(&store, report, &file, signer.verifying_key()).await;
        assert!(!forged.ok && forged.reason.contains("line 1"), "{forged:?}");
    }
}
