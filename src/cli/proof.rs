//! `coresdk audit prove` and `coresdk audit check-proof`: proof files of single records (see
//! [`crate::tlog_proof`]). Each says what happened in one line: stdout when it worked or the
//! proof does not verify, stderr when the command could not do its work.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::settings::DEFAULT_STORE;
use crate::store::sqlite::{StoreTxOwner as _, open_read_only};
use crate::tlog_proof::{self, MAX_PROOF_BYTES, ProveError};

/// The proof was written, or it verifies.
pub const EXIT_OK: u8 = 0;
/// The proof does not verify; or no proof can be made (no checkpoint covers the record yet,
/// or the store no longer has the signed tree).
pub const EXIT_FAILED: u8 = 1;
/// Nothing was checked or written: a bad argument, an unreadable file or store.
pub const EXIT_UNUSABLE: u8 = 2;

#[derive(Debug, Clone, clap::Args)]
pub struct ProveArgs {
    /// The record to prove.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub seq: u64,
    /// The SQLite store, `sqlite://PATH` (for PostgreSQL ask any replica:
    /// AuditService/GetInclusionProof with tree_size 0 answers the proof with its checkpoint).
    #[arg(long, env = "CORESDK_STORE", default_value = DEFAULT_STORE)]
    pub store: String,
    /// Where to write the proof (`.tlog-proof` by convention); standard output when absent.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// The signed checkpoints. Defaults to `<db>.checkpoints`.
    #[arg(long, env = "CORESDK_AUDIT_CHECKPOINT_FILE")]
    pub checkpoint_file: Option<PathBuf>,
    /// The checkpoints' signing key, whose signature a checkpoint needs to be used. Defaults to
    /// `<db>.audit-key`.
    #[arg(long, env = "CORESDK_AUDIT_SIGNING_KEY_FILE")]
    pub signing_key_file: Option<PathBuf>,
}

#[derive(Debug, Clone, clap::Args)]
pub struct CheckProofArgs {
    /// The proof file `coresdk audit prove` wrote.
    pub file: PathBuf,
    /// The log's verifier key, `<name>+<hex key id>+<base64 key>` (what `coresdk audit
    /// public-key` prints).
    #[arg(long)]
    pub key: String,
}

pub fn check_proof(args: &CheckProofArgs) -> ExitCode {
    let text = match read_bounded(&args.file) {
        Ok(text) => text,
        Err(e) => {
            eprintln!("coresdk: cannot read {}: {e}", args.file.display());
            return ExitCode::from(EXIT_UNUSABLE);
        }
    };
    match tlog_proof::check(&text, &args.key) {
        Ok(checked) => {
            println!(
                "ok: record {} is in the log {} of {} records (root {}), signed by {}",
                checked.seq,
                checked.checkpoint.origin,
                checked.checkpoint.size,
                hex::encode(checked.checkpoint.root),
                checked.signed_by
            );
            ExitCode::from(EXIT_OK)
        }
        Err(tlog_proof::ProofError::Key(why)) => {
            eprintln!("coresdk: --key {why}");
            ExitCode::from(EXIT_UNUSABLE)
        }
        Err(e) => {
            println!("FAILED: {e}");
            ExitCode::from(EXIT_FAILED)
        }
    }
}

/// A proof file's text, refusing anything larger than a proof can be.
fn read_bounded(path: &Path) -> Result<String, String> {
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut bytes = Vec::new();
    file.take(MAX_PROOF_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| e.to_string())?;
    if bytes.len() as u64 > MAX_PROOF_BYTES {
        return Err(format!(
            "larger than {MAX_PROOF_BYTES} bytes, which no proof is"
        ));
    }
    String::from_utf8(bytes).map_err(|_| "not UTF-8 text, which every proof is".to_owned())
}

pub fn prove(args: &ProveArgs) -> ExitCode {
    use crate::checkpoint::{NotOffline, OfflineFiles};
    let files = crate::checkpoint::offline_files(
        &args.store,
        args.checkpoint_file.clone(),
        args.signing_key_file.clone(),
    );
    let files = match files {
        Ok(files) => files,
        Err(NotOffline::Memory) => {
            eprintln!("coresdk: a memory store has nothing to prove offline");
            return ExitCode::from(EXIT_UNUSABLE);
        }
        Err(NotOffline::Postgres) => {
            eprintln!(
                "coresdk: prove reads SQLite files; for PostgreSQL call AuditService/GetInclusionProof (tree_size 0) on any replica"
            );
            return ExitCode::from(EXIT_UNUSABLE);
        }
        Err(NotOffline::Bad(e)) => {
            eprintln!("coresdk: CORESDK_STORE (--store): {e}");
            return ExitCode::from(EXIT_UNUSABLE);
        }
    };
    let OfflineFiles {
        db: path,
        checkpoints: checkpoint_file,
        key: key_file,
    } = files;
    let note = match newest_checkpoint_note(&checkpoint_file, &key_file) {
        Ok(Some(note)) => note,
        Ok(None) => {
            println!("FAILED: {}", ProveError::NoCheckpoint);
            return ExitCode::from(EXIT_FAILED);
        }
        Err(e) => {
            eprintln!("coresdk: {e}");
            return ExitCode::from(EXIT_UNUSABLE);
        }
    };
    let mut offline = match open_read_only(&path) {
        Ok(offline) => offline,
        Err(e) => {
            eprintln!("coresdk: cannot open {}: {e}", path.display());
            return ExitCode::from(EXIT_UNUSABLE);
        }
    };
    // A transaction that cannot begin checked nothing; a read inside it that fails is the
    // store no longer holding the tree it signed.
    let proved = match offline.with_read_tx(|tx| tlog_proof::prove(tx, args.seq, &note)) {
        Ok(proved) => proved,
        Err(e) => {
            eprintln!("coresdk: cannot read {}: {e}", path.display());
            return ExitCode::from(EXIT_UNUSABLE);
        }
    };
    let proof = match proved {
        Ok(proof) => proof,
        Err(e) => {
            println!("FAILED: {e}");
            return ExitCode::from(EXIT_FAILED);
        }
    };
    let text = proof.to_text();
    let Some(out) = &args.out else {
        print!("{text}");
        return ExitCode::from(EXIT_OK);
    };
    if let Err(e) = std::fs::write(out, &text) {
        eprintln!("coresdk: cannot write {}: {e}", out.display());
        return ExitCode::from(EXIT_UNUSABLE);
    }
    println!(
        "ok: wrote the proof of record {} in the signed tree of {} records to {}",
        args.seq,
        tlog_proof::CheckpointBody::parse(&note).map_or(0, |body| body.size),
        out.display()
    );
    ExitCode::from(EXIT_OK)
}

/// The newest checkpoint note signed with the key in `key_file`, as written to
/// `checkpoint_file` (witness cosignatures included); `None` when none is signed yet. Being the
/// newest, it is the one whose size covers the most records: `prove` says so when even it does
/// not cover the record.
fn newest_checkpoint_note(
    checkpoint_file: &Path,
    key_file: &Path,
) -> Result<Option<String>, String> {
    let key = crate::checkpoint::load_key(key_file)
        .map_err(|e| format!("CORESDK_AUDIT_SIGNING_KEY_FILE (--signing-key-file): {e}"))?
        .verifying_key();
    crate::checkpoint::newest_note(checkpoint_file, &key)
        .map(|newest| newest.map(|signed| signed.note))
        .map_err(|e| format!("CORESDK_AUDIT_CHECKPOINT_FILE (--checkpoint-file): {e}"))
}
