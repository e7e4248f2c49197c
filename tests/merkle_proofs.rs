//! The audit log's Merkle tree as a client sees it: proofs from the real binary over gRPC,
//! checked by a verifier written here from RFC 9162 (§2.1.3.2 and §2.1.4.2) and by the
//! independent `ct-merkle` crate, against roots this file recomputes from the records'
//! `canonical` bytes per RFC 6962 §2.1. Neither the code under test nor `tlog_tiles` checks
//! anything here.
mod common;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use common::audit::append_app_events;
use common::{Options, Sidecar, admin, problem};
use coresdk::proto::{
    GetConsistencyProofRequest, GetInclusionProofRequest, audit_service_client::AuditServiceClient,
};
use rand::{Rng as _, SeedableRng as _};
use sha2::{Digest as _, Sha256};
use tonic::transport::Channel;

type Hash = [u8; 32];

// ---- RFC 6962 §2.1 and RFC 9162 §2.1.3.2 / §2.1.4.2, transcribed ----

fn sha256(parts: &[&[u8]]) -> Hash {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update(part);
    }
    hasher.finalize().into()
}

/// MTH({d(0)}) = SHA-256(0x00 || d(0)).
fn leaf_hash(data: &[u8]) -> Hash {
    sha256(&[&[0x00], data])
}

/// SHA-256(0x01 || left || right).
fn node_hash(left: &Hash, right: &Hash) -> Hash {
    sha256(&[&[0x01], left, right])
}

/// Merkle Tree Hashes of the prefixes of one list of leaves. MTH(D[n]) for n > 1 is
/// SHA-256(0x01 || MTH(D[0:k]) || MTH(D[k:n])) with k the largest power of two below n; the
/// left half is always a complete subtree, remembered so that many prefixes cost little.
struct Mth<'a> {
    leaves: &'a [Hash],
    complete: HashMap<(usize, usize), Hash>,
}

impl<'a> Mth<'a> {
    fn new(leaves: &'a [Hash]) -> Self {
        Self {
            leaves,
            complete: HashMap::new(),
        }
    }

    /// MTH of the first `n` leaves.
    fn root(&mut self, n: u64) -> Hash {
        let n = usize::try_from(n).expect("small");
        assert!(n <= self.leaves.len(), "tree of {n} beyond the leaves");
        self.range(0, n)
    }

    fn range(&mut self, start: usize, n: usize) -> Hash {
        match n {
            0 => sha256(&[]),
            1 => self.leaves[start],
            _ => {
                if n.is_power_of_two()
                    && let Some(hash) = self.complete.get(&(start, n))
                {
                    return *hash;
                }
                let k = if n.is_power_of_two() {
                    n / 2
                } else {
                    1 << (usize::BITS - 1 - n.leading_zeros())
                };
                let left = self.range(start, k);
                let right = self.range(start + k, n - k);
                let hash = node_hash(&left, &right);
                if n.is_power_of_two() {
                    self.complete.insert((start, n), hash);
                }
                hash
            }
        }
    }
}

/// RFC 9162 §2.1.3.2: verifying an inclusion proof.
fn verify_inclusion(
    leaf_index: u64,
    tree_size: u64,
    hash: &Hash,
    inclusion_path: &[Hash],
    root_hash: &Hash,
) -> bool {
    // 1. If leaf_index is greater than or equal to tree_size, then stop and fail.
    if leaf_index >= tree_size {
        return false;
    }
    // 2. Set fn to leaf_index and sn to tree_size - 1.
    let (mut fnn, mut sn) = (leaf_index, tree_size - 1);
    // 3. Set r to hash.
    let mut r = *hash;
    // 4. For each value p in the inclusion_path array:
    for p in inclusion_path {
        // a. If sn is 0, then stop the iteration and fail the proof verification.
        if sn == 0 {
            return false;
        }
        // b. If LSB(fn) is set, or if fn is equal to sn, then:
        if fnn & 1 == 1 || fnn == sn {
            // i. Set r to HASH(0x01 || p || r).
            r = node_hash(p, &r);
            // ii. If LSB(fn) is not set, then right-shift both fn and sn equally until
            //     either LSB(fn) is set or fn is 0.
            if fnn & 1 == 0 {
                while fnn & 1 == 0 && fnn != 0 {
                    fnn >>= 1;
                    sn >>= 1;
                }
            }
        } else {
            // Otherwise: Set r to HASH(0x01 || r || p).
            r = node_hash(&r, p);
        }
        // c. Finally, right-shift both fn and sn one time.
        fnn >>= 1;
        sn >>= 1;
    }
    // 5. Compare sn to 0. Compare r against the root_hash. If either comparison fails, fail.
    sn == 0 && r == *root_hash
}

/// RFC 9162 §2.1.4.2: verifying a consistency proof, for 0 < first < second.
fn verify_consistency(
    first: u64,
    second: u64,
    first_hash: &Hash,
    second_hash: &Hash,
    consistency_path: &[Hash],
) -> bool {
    if first == 0 || first >= second {
        return false;
    }
    // 1. If consistency_path is an empty array, stop and fail the proof verification.
    if consistency_path.is_empty() {
        return false;
    }
    // 2. If first is an exact power of 2, then prepend first_hash to the consistency_path.
    let mut path = Vec::with_capacity(consistency_path.len() + 1);
    if first.is_power_of_two() {
        path.push(*first_hash);
    }
    path.extend_from_slice(consistency_path);
    // 3. Set fn to first - 1 and sn to second - 1.
    let (mut fnn, mut sn) = (first - 1, second - 1);
    // 4. If LSB(fn) is set, then right-shift both fn and sn equally until LSB(fn) is not set.
    while fnn & 1 == 1 {
        fnn >>= 1;
        sn >>= 1;
    }
    // 5. Set both fr and sr to the first value in the consistency_path array.
    let (mut fr, mut sr) = (path[0], path[0]);
    // 6. For each subsequent value c in the consistency_path array:
    for c in &path[1..] {
        // a. If sn is 0, then stop the iteration and fail the proof verification.
        if sn == 0 {
            return false;
        }
        // b. If LSB(fn) is set, or if fn is equal to sn, then:
        if fnn & 1 == 1 || fnn == sn {
            // i. Set fr to HASH(0x01 || c || fr). Set sr to HASH(0x01 || c || sr).
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            // ii. If LSB(fn) is not set, then right-shift both fn and sn equally until either
            //     LSB(fn) is set or fn is 0.
            if fnn & 1 == 0 {
                while fnn & 1 == 0 && fnn != 0 {
                    fnn >>= 1;
                    sn >>= 1;
                }
            }
        } else {
            // Otherwise: Set sr to HASH(0x01 || sr || c).
            sr = node_hash(&sr, c);
        }
        // c. Finally, right-shift both fn and sn one time.
        fnn >>= 1;
        sn >>= 1;
    }
    // 7. fr equals first_hash, sr equals second_hash, and sn is 0.
    fr == *first_hash && sr == *second_hash && sn == 0
}

// ---- ct-merkle, the independent implementation ----

type CtSha256 = sha2_011::Sha256;

fn ct_root(root: &Hash, size: u64) -> ct_merkle::RootHash<CtSha256> {
    ct_merkle::RootHash::new((*root).into(), size)
}

fn ct_inclusion(canonical: &[u8], leaf_index: u64, size: u64, root: &Hash, path: &[Hash]) -> bool {
    let proof = ct_merkle::InclusionProof::<CtSha256>::from_bytes(path.concat());
    ct_root(root, size)
        .verify_inclusion(&canonical, leaf_index, &proof)
        .is_ok()
}

fn ct_consistency(from: u64, from_root: &Hash, to: u64, to_root: &Hash, path: &[Hash]) -> bool {
    let Ok(proof) = ct_merkle::ConsistencyProof::<CtSha256>::try_from_bytes(path.concat()) else {
        return false;
    };
    ct_root(to_root, to)
        .verify_consistency(&ct_root(from_root, from), &proof)
        .is_ok()
}

/// The roots `ct-merkle` computes for every prefix of `canonicals`, index `n - 1` for size n.
fn ct_prefix_roots(canonicals: &[Vec<u8>]) -> Vec<Hash> {
    let mut tree = ct_merkle::mem_backed_tree::MemoryBackedTree::<CtSha256, Vec<u8>>::new();
    canonicals
        .iter()
        .map(|canonical| {
            tree.push(canonical.clone());
            let root: [u8; 32] = tree.root().as_bytes().as_slice().try_into().expect("32");
            root
        })
        .collect()
}

// ---- the sidecar ----

/// The records' canonical bytes, in seq order, after checking they are numbered 1..=n.
async fn canonicals(sidecar: &Sidecar) -> Vec<Vec<u8>> {
    let records = common::abuse::audit_records(sidecar, "").await;
    for (i, record) in records.iter().enumerate() {
        assert_eq!(record.seq, i as u64 + 1, "records are numbered 1..=n");
    }
    records.into_iter().map(|r| r.canonical).collect()
}

fn hashes(raw: Vec<Vec<u8>>) -> Vec<Hash> {
    raw.into_iter()
        .map(|h| <Hash>::try_from(h.as_slice()).expect("32-byte hashes"))
        .collect()
}

async fn inclusion(
    audit: &mut AuditServiceClient<Channel>,
    seq: u64,
    tree_size: u64,
) -> Result<Vec<Hash>, tonic::Status> {
    let proof = audit
        .get_inclusion_proof(admin(GetInclusionProofRequest { seq, tree_size }))
        .await?
        .into_inner();
    assert_eq!((proof.leaf_index, proof.tree_size), (seq - 1, tree_size));
    Ok(hashes(proof.hashes))
}

async fn consistency(
    audit: &mut AuditServiceClient<Channel>,
    from_size: u64,
    to_size: u64,
) -> Result<Vec<Hash>, tonic::Status> {
    let proof = audit
        .get_consistency_proof(admin(GetConsistencyProofRequest { from_size, to_size }))
        .await?
        .into_inner();
    assert_eq!((proof.from_size, proof.to_size), (from_size, to_size));
    Ok(hashes(proof.hashes))
}

/// The log as the test knows it: each record's bytes, leaf hash and every prefix's root.
struct Known {
    canonicals: Vec<Vec<u8>>,
    roots: Vec<Hash>,
}

impl Known {
    /// Reads every record and computes the roots both ways, which must agree.
    async fn read(sidecar: &Sidecar) -> Known {
        let canonicals = canonicals(sidecar).await;
        let leaves: Vec<Hash> = canonicals.iter().map(|c| leaf_hash(c)).collect();
        let mut mth = Mth::new(&leaves);
        let roots: Vec<Hash> = (1..=leaves.len() as u64).map(|n| mth.root(n)).collect();
        assert_eq!(
            roots,
            ct_prefix_roots(&canonicals),
            "RFC 6962 roots as computed here and by ct-merkle"
        );
        Known { canonicals, roots }
    }

    fn size(&self) -> u64 {
        self.canonicals.len() as u64
    }

    fn root(&self, size: u64) -> Hash {
        if size == 0 {
            sha256(&[])
        } else {
            self.roots[(size - 1) as usize]
        }
    }

    /// Asks for and checks record `seq`'s proof in the tree of `size`, both ways.
    async fn check_inclusion(&self, audit: &mut AuditServiceClient<Channel>, seq: u64, size: u64) {
        let path = inclusion(audit, seq, size)
            .await
            .unwrap_or_else(|e| panic!("inclusion of {seq} in {size}: {e:?}"));
        let canonical = &self.canonicals[(seq - 1) as usize];
        let root = self.root(size);
        assert!(
            verify_inclusion(seq - 1, size, &leaf_hash(canonical), &path, &root),
            "RFC 9162 verifier: record {seq} in tree {size}"
        );
        assert!(
            ct_inclusion(canonical, seq - 1, size, &root, &path),
            "ct-merkle: record {seq} in tree {size}"
        );
        // A proof that verifies anything verifies nothing: the neighbouring leaf must fail.
        let other = if seq == size { seq - 1 } else { seq + 1 };
        if other >= 1 && other != seq {
            assert!(
                !verify_inclusion(
                    seq - 1,
                    size,
                    &leaf_hash(&self.canonicals[(other - 1) as usize]),
                    &path,
                    &root
                ),
                "record {other}'s bytes must not pass as record {seq}"
            );
        }
    }

    /// Asks for and checks the consistency proof from `from` to `to`, both ways.
    async fn check_consistency(&self, audit: &mut AuditServiceClient<Channel>, from: u64, to: u64) {
        let path = consistency(audit, from, to)
            .await
            .unwrap_or_else(|e| panic!("consistency {from} → {to}: {e:?}"));
        if from == 0 || from == to {
            assert!(path.is_empty(), "RFC 9162: no proof for {from} → {to}");
            return;
        }
        let (from_root, to_root) = (self.root(from), self.root(to));
        assert!(
            verify_consistency(from, to, &from_root, &to_root, &path),
            "RFC 9162 verifier: {from} → {to}"
        );
        assert!(
            ct_consistency(from, &from_root, to, &to_root, &path),
            "ct-merkle: {from} → {to}"
        );
        let wrong = self.root(from - 1);
        assert!(
            !verify_consistency(from, to, &wrong, &to_root, &path),
            "{from} → {to} must not hold for another old root"
        );
    }
}

/// The seeded random pairs plus every pair up to 64: (seq, size) for inclusion, (from, to)
/// for consistency.
/// Pairs of sizes (or of a seq and a size) to ask proofs for.
type Pairs = Vec<(u64, u64)>;

fn pairs(size: u64, seed: u64, random: usize) -> (Pairs, Pairs) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let small = size.min(64);
    let mut inclusions: Vec<(u64, u64)> = (1..=small)
        .flat_map(|n| (1..=n).map(move |seq| (seq, n)))
        .collect();
    let mut consistencies: Vec<(u64, u64)> = (1..=small)
        .flat_map(|to| (0..=to).map(move |from| (from, to)))
        .collect();
    for _ in 0..random {
        let n = rng.gen_range(1..=size);
        inclusions.push((rng.gen_range(1..=n), n));
        let to = rng.gen_range(1..=size);
        consistencies.push((rng.gen_range(0..=to), to));
    }
    // The edges: the whole log, its first and last record.
    inclusions.extend([(1, size), (size, size)]);
    consistencies.extend([(1, size), (size - 1, size), (size, size)]);
    (inclusions, consistencies)
}

/// Checks every pair, a few calls at a time.
async fn check_all(known: &Arc<Known>, channel: &Channel, seed: u64, random: usize) {
    let (inclusions, consistencies) = pairs(known.size(), seed, random);
    const AT_ONCE: usize = 8;
    let mut calls = tokio::task::JoinSet::new();
    let jobs = inclusions
        .into_iter()
        .map(|p| (true, p))
        .chain(consistencies.into_iter().map(|p| (false, p)));
    for (is_inclusion, (a, b)) in jobs {
        if calls.len() == AT_ONCE {
            calls.join_next().await.expect("a call").expect("checked");
        }
        let known = known.clone();
        let mut audit = AuditServiceClient::new(channel.clone());
        calls.spawn(async move {
            if is_inclusion {
                known.check_inclusion(&mut audit, a, b).await;
            } else {
                known.check_consistency(&mut audit, a, b).await;
            }
        });
    }
    while let Some(call) = calls.join_next().await {
        call.expect("checked");
    }
}

const SEED: u64 = 0x6962_9162;

#[tokio::test]
async fn proofs_for_random_tree_sizes_up_to_2000_verify_by_rfc_9162_and_ct_merkle() {
    let dir = tempfile::tempdir().expect("temp dir");
    let sidecar = Sidecar::on_disk(dir.path(), Options::default()).await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(SEED);
    let total = rng.gen_range(1_500..=2_000);
    append_app_events(&sidecar, total).await;
    let known = Arc::new(Known::read(&sidecar).await);
    assert_eq!(known.size(), total as u64);
    check_all(&known, &sidecar.channel, SEED, 400).await;
}

#[tokio::test]
async fn proofs_of_tiny_logs_verify_at_every_size() {
    let sidecar = Sidecar::start(Options::default()).await;
    for n in 1..=9 {
        append_app_events(&sidecar, 1).await;
        let known = Arc::new(Known::read(&sidecar).await);
        assert_eq!(known.size(), n);
        check_all(&known, &sidecar.channel, n, 5).await;
    }
}

#[tokio::test]
async fn impossible_proofs_are_refused_with_a_problem() {
    let sidecar = Sidecar::start(Options::default()).await;
    append_app_events(&sidecar, 5).await;
    let mut audit = sidecar.audit();
    type Case = (
        &'static str,
        Result<Vec<Hash>, tonic::Status>,
        tonic::Code,
        &'static str,
    );
    let cases: [Case; 5] = [
        (
            "seq 0",
            inclusion_raw(&mut audit, 0, 5).await,
            tonic::Code::InvalidArgument,
            "seq",
        ),
        (
            "tree smaller than seq",
            inclusion(&mut audit, 4, 3).await,
            tonic::Code::InvalidArgument,
            "tree_size",
        ),
        (
            "tree beyond the log",
            inclusion(&mut audit, 2, 6).await,
            tonic::Code::OutOfRange,
            "6",
        ),
        (
            "from after to",
            consistency(&mut audit, 4, 3).await,
            tonic::Code::InvalidArgument,
            "from_size",
        ),
        (
            "to beyond the log",
            consistency(&mut audit, 2, 9).await,
            tonic::Code::OutOfRange,
            "9",
        ),
    ];
    for (case, answer, code, named) in cases {
        let status = answer.expect_err(case);
        assert_eq!(status.code(), code, "{case}: {status:?}");
        let problem = problem(&status);
        assert_eq!(problem.status, http_status(code), "{case}: {problem:?}");
        let text = format!("{} {}", problem.detail, status.message());
        assert!(
            text.contains(named),
            "{case}: the problem names {named}: {problem:?}"
        );
    }
}

/// `inclusion` without the answer's leaf index check, which seq 0 cannot pass.
async fn inclusion_raw(
    audit: &mut AuditServiceClient<Channel>,
    seq: u64,
    tree_size: u64,
) -> Result<Vec<Hash>, tonic::Status> {
    audit
        .get_inclusion_proof(admin(GetInclusionProofRequest { seq, tree_size }))
        .await
        .map(|proof| hashes(proof.into_inner().hashes))
}

fn http_status(code: tonic::Code) -> i32 {
    match code {
        tonic::Code::InvalidArgument | tonic::Code::OutOfRange => 400,
        _ => 500,
    }
}

// ---- tampering with the SQLite file behind the sidecar's back ----

fn open_db(dir: &Path) -> rusqlite::Connection {
    let db = rusqlite::Connection::open(dir.join("coresdk.db")).expect("open the database");
    db.busy_timeout(std::time::Duration::from_secs(5))
        .expect("busy timeout");
    db
}

/// The columns that make up a record, all but its place (`seq`) and its tree hashes.
const RECORD_COLUMNS: &str =
    "time_ms, tenant_id, actor, event, outcome, canonical, prev_hash, hash";

/// Swaps the contents of records `a` and `b`, leaving each seq and the stored tree in place.
fn swap_records(db: &rusqlite::Connection, a: u64, b: u64) {
    let names: Vec<&str> = RECORD_COLUMNS.split(", ").collect();
    let set = names
        .iter()
        .map(|c| format!("{c} = (SELECT {c} FROM audit AS other WHERE other.seq = ?2)"))
        .collect::<Vec<_>>()
        .join(", ");
    db.execute_batch("BEGIN IMMEDIATE").expect("begin");
    db.execute(
        &format!("CREATE TEMP TABLE swap AS SELECT seq, {RECORD_COLUMNS} FROM audit WHERE seq IN (?1, ?2)"),
        rusqlite::params![a as i64, b as i64],
    )
    .expect("copy");
    for (to, from) in [(a, b), (b, a)] {
        db.execute(
            &format!(
                "UPDATE audit SET {} WHERE seq = ?1",
                set.replace("audit AS other", "temp.swap AS other")
            ),
            rusqlite::params![to as i64, from as i64],
        )
        .expect("swap");
    }
    db.execute_batch("DROP TABLE temp.swap; COMMIT")
        .expect("commit");
}

/// What a client that trusted the log of `trusted.size()` records now finds: the records'
/// root differs, and the server's proofs of the changed records no longer verify.
async fn assert_detected(trusted: &Known, sidecar: &Sidecar, changed: &[u64]) {
    let mut audit = sidecar.audit();
    let audit = &mut audit;
    let now = Known::read(sidecar).await;
    let size = trusted.size();
    assert_eq!(now.size(), size);
    assert_ne!(
        now.root(size),
        trusted.root(size),
        "the records' root moved"
    );
    for &seq in changed {
        let path = inclusion(audit, seq, size).await.expect("a proof");
        let canonical = &now.canonicals[(seq - 1) as usize];
        assert_ne!(canonical, &trusted.canonicals[(seq - 1) as usize]);
        let root = trusted.root(size);
        assert!(
            !verify_inclusion(seq - 1, size, &leaf_hash(canonical), &path, &root),
            "record {seq} as it now reads is not in the trusted tree (RFC 9162 verifier)"
        );
        assert!(
            !ct_inclusion(canonical, seq - 1, size, &root, &path),
            "record {seq} as it now reads is not in the trusted tree (ct-merkle)"
        );
    }
    // Records nobody touched still prove against the trusted root.
    trusted.check_inclusion(audit, 1, size).await;
}

#[tokio::test]
async fn altered_reordered_and_truncated_records_no_longer_match_the_trusted_tree() {
    let dir = tempfile::tempdir().expect("temp dir");
    let sidecar = Sidecar::on_disk(dir.path(), Options::default()).await;
    append_app_events(&sidecar, 300).await;
    let mut audit = sidecar.audit();
    let trusted = Known::read(&sidecar).await;
    let db = open_db(dir.path());

    // One record's bytes altered (its outcome), everything else left as it was.
    let original: Vec<u8> = db
        .query_row("SELECT canonical FROM audit WHERE seq = 123", [], |r| {
            r.get(0)
        })
        .expect("record 123");
    let altered = String::from_utf8(original.clone())
        .expect("utf-8")
        .replace("\"outcome\":\"success\"", "\"outcome\":\"failure\"");
    assert_ne!(altered.as_bytes(), original.as_slice());
    db.execute(
        "UPDATE audit SET canonical = ?1, outcome = 'failure' WHERE seq = 123",
        rusqlite::params![altered.as_bytes()],
    )
    .expect("tamper");
    assert_detected(&trusted, &sidecar, &[123]).await;
    db.execute(
        "UPDATE audit SET canonical = ?1, outcome = 'success' WHERE seq = 123",
        rusqlite::params![original],
    )
    .expect("restore");
    assert_eq!(Known::read(&sidecar).await.root(300), trusted.root(300));

    // Two records trade places.
    swap_records(&db, 40, 41);
    assert_detected(&trusted, &sidecar, &[40, 41]).await;
    swap_records(&db, 40, 41);
    assert_eq!(Known::read(&sidecar).await.root(300), trusted.root(300));

    // The newest records cut off: what is left is an honest prefix, but the trusted tree can no
    // longer be reached from it.
    db.execute("DELETE FROM audit WHERE seq > 290", [])
        .expect("truncate");
    let now = Known::read(&sidecar).await;
    assert_eq!(now.size(), 290);
    assert_ne!(now.root(290), trusted.root(300));
    for refused in [
        consistency(&mut audit, 290, 300).await,
        inclusion(&mut audit, 300, 300).await,
    ] {
        let status = refused.expect_err("the trusted size is beyond the log");
        assert_eq!(status.code(), tonic::Code::OutOfRange, "{status:?}");
    }
}

// ---- a database from before the tree ----

/// The SQLite schema 4 (src/store/sqlite/schema.rs MIGRATION_1..4 as they were before the
/// tree), copied so the test writes exactly what an older sidecar left behind.
const SCHEMA_4: &str = "
CREATE TABLE processed_events (
    event_id TEXT PRIMARY KEY, event_type TEXT NOT NULL, tenant_id TEXT NOT NULL,
    outcome TEXT NOT NULL, audit_seq INTEGER NOT NULL, processed_at_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE customers (
    customer_id TEXT PRIMARY KEY, tenant_id TEXT NOT NULL, updated_at_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE flags (
    tenant_id TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL, version INTEGER NOT NULL,
    event_created INTEGER NOT NULL, origin TEXT NOT NULL, updated_at_ms INTEGER NOT NULL,
    updated_by TEXT NOT NULL, source_event_id TEXT NOT NULL, PRIMARY KEY (tenant_id, key)
) WITHOUT ROWID;
CREATE TABLE audit (
    seq INTEGER PRIMARY KEY, time_ms INTEGER NOT NULL, tenant_id TEXT NOT NULL,
    actor TEXT NOT NULL, event TEXT NOT NULL, outcome TEXT NOT NULL,
    canonical BLOB NOT NULL, prev_hash BLOB NOT NULL, hash BLOB NOT NULL
);
CREATE INDEX audit_by_tenant ON audit (tenant_id, seq);
ALTER TABLE customers ADD COLUMN unmapped_at_ms INTEGER;
CREATE TABLE parked_events (
    event_id TEXT PRIMARY KEY, event_type TEXT NOT NULL, customer_id TEXT NOT NULL,
    created INTEGER NOT NULL, signed_at INTEGER NOT NULL, payload BLOB NOT NULL,
    actor TEXT NOT NULL, reason TEXT, parked_at_ms INTEGER NOT NULL, rank INTEGER NOT NULL
);
CREATE INDEX parked_events_by_customer ON parked_events (customer_id, created, rank, event_id);
CREATE INDEX parked_events_by_age ON parked_events (parked_at_ms);
ALTER TABLE flags ADD COLUMN event_rank INTEGER NOT NULL DEFAULT 0;
ALTER TABLE flags ADD COLUMN order_event_id TEXT NOT NULL DEFAULT '';
CREATE TABLE billing_objects (
    tenant_id TEXT NOT NULL, object TEXT NOT NULL, kind TEXT NOT NULL,
    event_created INTEGER NOT NULL, event_rank INTEGER NOT NULL, event_id TEXT NOT NULL,
    state TEXT NOT NULL, PRIMARY KEY (tenant_id, object)
) WITHOUT ROWID;
CREATE INDEX processed_events_by_age ON processed_events (processed_at_ms);
CREATE INDEX flags_by_source_event ON flags (source_event_id);
CREATE INDEX flags_by_order_event ON flags (order_event_id);
PRAGMA user_version = 4;
";

/// `count` records sealed onto one chain by the library's own `seal`, as an older sidecar
/// appended them.
fn sealed_records(count: u64) -> Vec<coresdk::audit::AuditRecord> {
    let mut head = coresdk::audit::ChainHead::GENESIS;
    let start_ms = (common::now() - 3_600) * 1000;
    (0..count)
        .map(|i| {
            let mut metadata = serde_json::Map::new();
            metadata.insert("i".into(), serde_json::Value::from(i));
            let record = coresdk::audit::seal(
                &head,
                coresdk::audit::NewAuditRecord {
                    tenant_id: format!("tenant{}", i % 7),
                    actor: "app".into(),
                    event: format!("app.old.{i}"),
                    outcome: "success".into(),
                    metadata,
                },
                start_ms + i as i64,
            )
            .expect("sealed");
            head = coresdk::audit::ChainHead {
                seq: record.seq,
                hash: record.hash,
            };
            record
        })
        .collect()
}

/// More than one build batch (10,000), so the build logs its progress before it is done.
const OLD_RECORDS: u64 = 12_500;

#[tokio::test]
async fn a_schema_4_database_gets_its_tree_built_at_start_and_proofs_match() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut db = open_db(dir.path());
    db.execute_batch(SCHEMA_4).expect("schema 4");
    let records = sealed_records(OLD_RECORDS);
    let tx = db.transaction().expect("a transaction");
    {
        let mut insert = tx
            .prepare(&format!(
                "INSERT INTO audit (seq, {RECORD_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)"
            ))
            .expect("prepare");
        for r in &records {
            insert
                .execute(rusqlite::params![
                    r.seq as i64,
                    r.time_ms,
                    r.tenant_id,
                    r.actor,
                    r.event,
                    r.outcome,
                    r.canonical,
                    r.prev_hash.as_slice(),
                    r.hash.as_slice(),
                ])
                .expect("insert");
        }
    }
    tx.commit().expect("commit");
    drop(db);

    let log = serve_migrated(
        &format!("sqlite://{}", dir.path().join("coresdk.db").display()),
        &records,
    )
    .await;
    let progress = log.with_message("building the audit Merkle tree");
    // The first line at the start, before anything is built; more only if it took 5 s.
    assert_eq!(progress[0]["fields"]["built"], 0, "{progress:?}");
    assert_eq!(
        progress[0]["fields"]["records"], OLD_RECORDS,
        "{progress:?}"
    );
}

/// Starts the sidecar on `store`, which holds `records` from before the tree, and checks the
/// tree it built: every record kept its bytes, proofs verify against the roots recomputed
/// here, the old chain still verifies. Answers the sidecar's log, which must tell the build's
/// end.
async fn serve_migrated(
    store: &str,
    records: &[coresdk::audit::AuditRecord],
) -> common::abuse::LogLines {
    let options = Options {
        args: vec!["--store".to_owned(), store.to_owned()],
        ..Options::default()
    };
    let (sidecar, log) = common::abuse::start_logging(options, "info").await;
    let mut audit = sidecar.audit();
    let known = Arc::new(Known::read(&sidecar).await);
    assert_eq!(known.size(), records.len() as u64);
    for (record, canonical) in records.iter().zip(&known.canonicals) {
        assert_eq!(
            &record.canonical, canonical,
            "record {} kept its bytes",
            record.seq
        );
    }
    check_all(&known, &sidecar.channel, SEED ^ records.len() as u64, 150).await;
    let verified = audit
        .verify(admin(coresdk::proto::VerifyAuditRequest::default()))
        .await
        .expect("Verify")
        .into_inner();
    assert!(verified.ok, "the old chain still verifies: {verified:?}");
    assert_eq!(
        verified.head_hash,
        hex::encode(records[records.len() - 1].hash)
    );

    let built = log.with_message("audit Merkle tree built");
    assert_eq!(
        built
            .iter()
            .map(|line| line["fields"]["added"].as_u64())
            .collect::<Vec<_>>(),
        [Some(records.len() as u64)],
        "the build logs its end once, with every record it added"
    );
    log
}

// ---- PostgreSQL (CORESDK_TEST_POSTGRES_URL) ----

#[tokio::test]
async fn postgres_proofs_verify_by_rfc_9162_and_ct_merkle() {
    let url = common::pg::fresh_database(common::pg::server_url()).await;
    let sidecar = Sidecar::start(common::pg::replica_options(&url)).await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(SEED ^ 5432);
    append_app_events(&sidecar, rng.gen_range(250..=400)).await;
    let known = Arc::new(Known::read(&sidecar).await);
    check_all(&known, &sidecar.channel, SEED ^ 5432, 200).await;
}

// ---- proof files: `coresdk audit check-proof` ----

/// A C2SP signed-note key, made and used here by hand (C2SP signed-note: key id = the first 4
/// bytes of SHA-256(name ‖ "\n" ‖ 0x01 ‖ public key); signature line "— name base64(id ‖ sig)").
struct NoteKey {
    name: String,
    key: ed25519_dalek::SigningKey,
}

impl NoteKey {
    fn new(name: &str, seed: u8) -> Self {
        Self {
            name: name.into(),
            key: ed25519_dalek::SigningKey::from_bytes(&[seed; 32]),
        }
    }

    fn public(&self) -> Vec<u8> {
        let mut public = vec![0x01];
        public.extend_from_slice(self.key.verifying_key().as_bytes());
        public
    }

    fn id(&self) -> [u8; 4] {
        let hash = sha256(&[self.name.as_bytes(), b"\n", &self.public()]);
        hash[..4].try_into().expect("4 bytes")
    }

    /// `<name>+<hex id>+<base64(0x01 ‖ key)>`.
    fn verifier(&self) -> String {
        use base64::Engine as _;
        format!(
            "{}+{}+{}",
            self.name,
            hex::encode(self.id()),
            base64::engine::general_purpose::STANDARD.encode(self.public())
        )
    }

    fn signature_line(&self, body: &str) -> String {
        use base64::Engine as _;
        use ed25519_dalek::Signer as _;
        let mut signed = self.id().to_vec();
        signed.extend_from_slice(&self.key.sign(body.as_bytes()).to_bytes());
        format!(
            "\u{2014} {} {}\n",
            self.name,
            base64::engine::general_purpose::STANDARD.encode(signed)
        )
    }
}

fn b64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn checkpoint_body(origin: &str, size: u64, root: &Hash) -> String {
    format!("{origin}\n{size}\n{}\n", b64(root))
}

/// A tlog-proof file as C2SP lays it out, with the record's bytes as its `extra` line.
fn proof_text(record: &[u8], index: u64, path: &[Hash], note: &str) -> String {
    let mut text = format!(
        "c2sp.org/tlog-proof@v1\nextra {}\nindex {index}\n",
        b64(record)
    );
    for hash in path {
        text.push_str(&b64(hash));
        text.push('\n');
    }
    text.push('\n');
    text.push_str(note);
    text
}

/// `coresdk audit check-proof` on `text` with `key`: its exit code and its one line.
fn check_proof(dir: &Path, text: &str, key: &str) -> (Option<i32>, String) {
    let file = dir.join("record.tlog-proof");
    std::fs::write(&file, text).expect("write the proof");
    let file = file.display().to_string();
    let output = common::run_coresdk(None, &["audit", "check-proof", &file, "--key", key], &[]);
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(said.trim_end().lines().count(), 1, "one line: {said}");
    (output.status.code(), said)
}

#[tokio::test]
async fn check_proof_accepts_a_true_proof_and_names_each_forgery() {
    let dir = tempfile::tempdir().expect("temp dir");
    let sidecar = Sidecar::start(Options::default()).await;
    append_app_events(&sidecar, 21).await;
    let mut audit = sidecar.audit();
    let known = Known::read(&sidecar).await;
    let (seq, size) = (7, 21);
    let path = inclusion(&mut audit, seq, size).await.expect("a proof");
    let record = known.canonicals[(seq - 1) as usize].clone();
    let log = NoteKey::new("audit.example.com/coresdk", 7);
    let body = checkpoint_body(&log.name, size, &known.root(size));
    let note = format!("{body}\n{}", log.signature_line(&body));
    let good = proof_text(&record, seq - 1, &path, &note);

    let (code, said) = check_proof(dir.path(), &good, &log.verifier());
    assert_eq!(code, Some(0), "{said}");
    assert!(
        said.starts_with("ok: record 7 is in the log audit.example.com/coresdk of 21 records"),
        "{said}"
    );
    // Witness cosignatures beside the log's own do not get in the way.
    let witness = NoteKey::new("witness.example", 9);
    let cosigned = format!("{note}{}", witness.signature_line(&body));
    let cosigned_proof = proof_text(&record, seq - 1, &path, &cosigned);
    let (code, said) = check_proof(dir.path(), &cosigned_proof, &log.verifier());
    assert_eq!(code, Some(0), "{said}");
    // The witness's key checks its own signature, but it is not the log's key.
    let (code, said) = check_proof(dir.path(), &cosigned_proof, &witness.verifier());
    assert_eq!(code, Some(1), "{said}");
    assert!(
        said.contains("of the log audit.example.com/coresdk, not of witness.example"),
        "{said}"
    );

    let mut altered_record = String::from_utf8(record.clone()).expect("utf-8");
    altered_record = altered_record.replace("\"outcome\":\"success\"", "\"outcome\":\"failure\"");
    let mut altered_path = path.clone();
    altered_path[1][0] ^= 1;
    let forged_body = checkpoint_body(&log.name, size, &known.root(size - 1));
    let forger = NoteKey::new(&log.name, 8);
    let cases = [
        (
            "a checkpoint whose body was changed under the log's signature",
            proof_text(
                &record,
                seq - 1,
                &path,
                &format!("{forged_body}\n{}", log.signature_line(&body)),
            ),
            log.verifier(),
            "not signed by",
        ),
        (
            "a checkpoint signed by another key of the same name",
            proof_text(
                &record,
                seq - 1,
                &path,
                &format!("{body}\n{}", forger.signature_line(&body)),
            ),
            log.verifier(),
            "not signed by",
        ),
        (
            "a true proof checked with the wrong key",
            good.clone(),
            forger.verifier(),
            "not signed by",
        ),
        (
            "a true proof checked with another log's key",
            good.clone(),
            witness.verifier(),
            "not signed by",
        ),
        (
            "an altered record",
            proof_text(altered_record.as_bytes(), seq - 1, &path, &note),
            log.verifier(),
            "not in the signed tree",
        ),
        (
            "an altered proof hash",
            proof_text(&record, seq - 1, &altered_path, &note),
            log.verifier(),
            "not in the signed tree",
        ),
        (
            "a proof missing a hash",
            proof_text(&record, seq - 1, &path[1..], &note),
            log.verifier(),
            "not in the signed tree",
        ),
        (
            "the record claimed at another index",
            proof_text(&record, seq, &path, &note),
            log.verifier(),
            "not in the signed tree",
        ),
        (
            "a file that is no proof",
            good.replacen("c2sp.org/tlog-proof@v1", "c2sp.org/tlog-proof@v9", 1),
            log.verifier(),
            "not a tlog proof",
        ),
    ];
    for (case, text, key, named) in cases {
        let (code, said) = check_proof(dir.path(), &text, &key);
        assert_eq!(code, Some(1), "{case}: {said}");
        assert!(
            said.starts_with("FAILED: ") && said.contains(named),
            "{case}: {said}"
        );
    }

    // A key that is no key: nothing was checked.
    let (code, said) = check_proof(dir.path(), &good, "not-a-key");
    assert_eq!(code, Some(2), "{said}");
    assert!(said.contains("--key"), "{said}");
}

/// The PostgreSQL schema 4 (src/store/postgres/schema.rs MIGRATION_1..4 before the tree), with
/// its version table as an older sidecar left it.
const POSTGRES_SCHEMA_4: &str = "
CREATE TABLE processed_events (
    event_id TEXT PRIMARY KEY, event_type TEXT NOT NULL, tenant_id TEXT NOT NULL,
    outcome TEXT NOT NULL, audit_seq BIGINT NOT NULL, processed_at_ms BIGINT NOT NULL
);
CREATE TABLE customers (
    customer_id TEXT PRIMARY KEY, tenant_id TEXT NOT NULL, updated_at_ms BIGINT NOT NULL
);
CREATE TABLE flags (
    tenant_id TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL, version BIGINT NOT NULL,
    event_created BIGINT NOT NULL, origin TEXT NOT NULL, updated_at_ms BIGINT NOT NULL,
    updated_by TEXT NOT NULL, source_event_id TEXT NOT NULL, PRIMARY KEY (tenant_id, key)
);
CREATE INDEX flags_by_version ON flags (version);
CREATE TABLE audit (
    seq BIGINT PRIMARY KEY, time_ms BIGINT NOT NULL, tenant_id TEXT NOT NULL,
    actor TEXT NOT NULL, event TEXT NOT NULL, outcome TEXT NOT NULL,
    canonical BYTEA NOT NULL, prev_hash BYTEA NOT NULL, hash BYTEA NOT NULL
);
CREATE INDEX audit_by_tenant ON audit (tenant_id, seq);
ALTER TABLE customers ADD COLUMN unmapped_at_ms BIGINT;
CREATE TABLE parked_events (
    event_id TEXT PRIMARY KEY, event_type TEXT NOT NULL, customer_id TEXT NOT NULL,
    created BIGINT NOT NULL, signed_at BIGINT NOT NULL, payload BYTEA NOT NULL,
    actor TEXT NOT NULL, reason TEXT, parked_at_ms BIGINT NOT NULL, rank BIGINT NOT NULL
);
CREATE INDEX parked_events_by_customer
    ON parked_events (customer_id, created, rank, event_id COLLATE \"C\");
CREATE INDEX parked_events_by_age ON parked_events (parked_at_ms);
ALTER TABLE flags ADD COLUMN event_rank BIGINT NOT NULL DEFAULT 0;
ALTER TABLE flags ADD COLUMN order_event_id TEXT NOT NULL DEFAULT '';
CREATE TABLE billing_objects (
    tenant_id TEXT NOT NULL, object TEXT NOT NULL, kind TEXT NOT NULL,
    event_created BIGINT NOT NULL, event_rank BIGINT NOT NULL, event_id TEXT NOT NULL,
    state TEXT NOT NULL, PRIMARY KEY (tenant_id, object)
);
CREATE INDEX processed_events_by_age ON processed_events (processed_at_ms);
CREATE INDEX flags_by_source_event ON flags (source_event_id);
CREATE INDEX flags_by_order_event ON flags (order_event_id);
CREATE TABLE coresdk_schema (version INT NOT NULL);
INSERT INTO coresdk_schema (version) VALUES (1), (2), (3), (4);
";

#[tokio::test]
async fn postgres_schema_4_database_gets_its_tree_built_at_start_and_proofs_match() {
    let url = common::pg::fresh_database(common::pg::server_url()).await;
    let records = sealed_records(2_500);
    let written = records.clone();
    let target = url.clone();
    tokio::task::spawn_blocking(move || {
        let mut db = postgres::Client::connect(&target, postgres::NoTls).expect("connects");
        db.batch_execute(POSTGRES_SCHEMA_4).expect("schema 4");
        let mut tx = db.transaction().expect("a transaction");
        let insert = tx
            .prepare(&format!(
                "INSERT INTO audit (seq, {RECORD_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
            ))
            .expect("prepare");
        for r in &written {
            tx.execute(
                &insert,
                &[
                    &(r.seq as i64),
                    &r.time_ms,
                    &r.tenant_id,
                    &r.actor,
                    &r.event,
                    &r.outcome,
                    &r.canonical,
                    &r.prev_hash.as_slice(),
                    &r.hash.as_slice(),
                ],
            )
            .expect("insert");
        }
        tx.commit().expect("commit");
    })
    .await
    .expect("written");
    serve_migrated(&url, &records).await;
}

// ---- `coresdk audit prove` against the sidecar's own checkpoints ----

/// `coresdk audit ARGS…`: its exit code, stdout and stderr.
fn audit_command(args: &[&str]) -> (Option<i32>, String, String) {
    let mut all = vec!["audit"];
    all.extend_from_slice(args);
    let output = common::run_coresdk(None, &all, &[]);
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Whether the signed note `note` carries a signature by the verifier key `vkey` over its body,
/// checked here with `ring`'s Ed25519 (C2SP signed-note: "— <name> base64(key id ‖ signature)").
fn signed_by(note: &str, vkey: &str) -> bool {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut parts = vkey.trim().splitn(3, '+');
    let (Some(name), Some(id), Some(key)) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    let (Ok(id), Ok(key)) = (hex::decode(id), b64.decode(key)) else {
        return false;
    };
    let Some((body, signatures)) = note.split_once("\n\n") else {
        return false;
    };
    let body = format!("{body}\n");
    signatures.lines().any(|line| {
        let Some(signature) = line
            .strip_prefix(&format!("\u{2014} {name} "))
            .and_then(|s| b64.decode(s).ok())
        else {
            return false;
        };
        signature.len() == 68
            && signature[..4] == id[..]
            && key.first() == Some(&0x01)
            && ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, &key[1..])
                .verify(body.as_bytes(), &signature[4..])
                .is_ok()
    })
}

#[tokio::test]
async fn prove_writes_a_proof_that_check_proof_and_an_independent_reading_accept() {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let dir = tempfile::tempdir().expect("temp dir");
    let mut sidecar = Sidecar::on_disk(dir.path(), Options::default()).await;
    append_app_events(&sidecar, 30).await;
    let known = Known::read(&sidecar).await;
    let store = sidecar.store_url();
    // Its last checkpoint, at shutdown, covers all 30.
    assert!(sidecar.stop().success());
    let (code, vkey, said) = audit_command(&["public-key", "--store", &store]);
    assert_eq!(code, Some(0), "{said}");
    let vkey = vkey.trim().to_owned();

    let file = dir.path().join("record-17.tlog-proof");
    let file = file.to_str().expect("utf-8 path");
    let (code, out, said) =
        audit_command(&["prove", "--seq", "17", "--store", &store, "--out", file]);
    assert_eq!(code, Some(0), "{out}{said}");
    assert!(
        out.starts_with("ok: wrote the proof of record 17 in the signed tree of 30 records"),
        "{out}"
    );

    // The file read here, by the C2SP tlog-proof layout, without the code under test.
    let text = std::fs::read_to_string(file).expect("the proof");
    let (head, note) = text
        .split_once("\n\n")
        .expect("proof, blank line, checkpoint");
    let mut lines = head.lines();
    assert_eq!(lines.next(), Some("c2sp.org/tlog-proof@v1"));
    let record = b64
        .decode(
            lines
                .next()
                .and_then(|l| l.strip_prefix("extra "))
                .expect("extra"),
        )
        .expect("base64");
    assert_eq!(record, known.canonicals[16], "the record's canonical bytes");
    assert_eq!(lines.next(), Some("index 16"));
    let path: Vec<Hash> = lines
        .map(|l| b64.decode(l).expect("base64").try_into().expect("32 bytes"))
        .collect();
    let body: Vec<&str> = note.lines().take(3).collect();
    assert_eq!(body[1..], ["30", &b64.encode(known.root(30))], "{note}");
    assert!(
        vkey.starts_with(&format!("{}+", body[0])),
        "{vkey} names {}",
        body[0]
    );
    assert!(
        signed_by(note, &vkey),
        "the note is signed by {vkey}: {note}"
    );
    assert!(verify_inclusion(
        16,
        30,
        &leaf_hash(&record),
        &path,
        &known.root(30)
    ));
    assert!(ct_inclusion(&record, 16, 30, &known.root(30), &path));

    let (code, out, said) = audit_command(&["check-proof", file, "--key", &vkey]);
    assert_eq!(code, Some(0), "{out}{said}");
    assert!(out.starts_with("ok: record 17 is in the log"), "{out}");
    // Without --out the proof goes to standard output, the same bytes.
    let (code, out, said) = audit_command(&["prove", "--seq", "17", "--store", &store]);
    assert_eq!((code, out.as_str()), (Some(0), text.as_str()), "{said}");

    // No checkpoint covers a record after it yet.
    let (code, out, _) = audit_command(&["prove", "--seq", "31", "--store", &store]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("not yet record 31"), "{out}");

    // A record altered after the checkpoint: no proof is written for it.
    let db = open_db(dir.path());
    db.execute(
        "UPDATE audit SET canonical = CAST(replace(CAST(canonical AS TEXT), 'success', 'failure') AS BLOB) WHERE seq = 5",
        [],
    )
    .expect("tamper");
    let (code, out, _) = audit_command(&["prove", "--seq", "5", "--store", &store]);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("record 5 in the store is not the record the signed tree holds"),
        "{out}"
    );

    // A record whose stored hashes the signed root needs (record 16 completed leaves 0..16).
    db.execute("DELETE FROM audit WHERE seq = 16", [])
        .expect("delete");
    let (code, out, _) = audit_command(&["prove", "--seq", "17", "--store", &store]);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("the store cannot give the signed tree"),
        "{out}"
    );

    // Records cut off after the checkpoint.
    db.execute("DELETE FROM audit WHERE seq > 25", [])
        .expect("truncate");
    let (code, out, _) = audit_command(&["prove", "--seq", "17", "--store", &store]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("fewer than the 30"), "{out}");
}

#[tokio::test]
async fn proofs_against_the_newest_checkpoint_verify_against_its_signed_root() {
    use base64::Engine as _;
    let mut options = Options::default();
    options
        .envs
        .push(("CORESDK_AUDIT_CHECKPOINT_INTERVAL_S".into(), "0.1".into()));
    let dir = tempfile::tempdir().expect("temp dir");
    let sidecar = Sidecar::on_disk(dir.path(), options).await;
    append_app_events(&sidecar, 40).await;
    let mut audit = sidecar.audit();
    // tree_size 0: the newest checkpoint's tree, once one covers record 40 (bounded wait).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let proof = loop {
        let proof = audit
            .get_inclusion_proof(admin(GetInclusionProofRequest {
                seq: 40,
                tree_size: 0,
            }))
            .await;
        match proof {
            Ok(proof) if proof.get_ref().tree_size >= 40 => break proof.into_inner(),
            _ if std::time::Instant::now() > deadline => {
                panic!("no checkpoint covered record 40 in 10 s: {proof:?}")
            }
            _ => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
        }
    };
    let known = Known::read(&sidecar).await;
    let size = proof.tree_size;
    let body: Vec<&str> = proof.checkpoint.lines().take(3).collect();
    assert_eq!(body[1], size.to_string(), "{}", proof.checkpoint);
    let root: Hash = base64::engine::general_purpose::STANDARD
        .decode(body[2])
        .expect("base64")
        .try_into()
        .expect("32 bytes");
    assert_eq!(
        root,
        known.root(size),
        "the signed root is the records' root"
    );
    let path = hashes(proof.hashes);
    let canonical = &known.canonicals[39];
    assert_eq!(proof.leaf_index, 39);
    assert!(verify_inclusion(
        39,
        size,
        &leaf_hash(canonical),
        &path,
        &root
    ));
    assert!(ct_inclusion(canonical, 39, size, &root, &path));

    let consistency = audit
        .get_consistency_proof(admin(GetConsistencyProofRequest {
            from_size: 17,
            to_size: 0,
        }))
        .await
        .expect("a consistency proof to the newest checkpoint")
        .into_inner();
    let to = consistency.to_size;
    assert!(to >= size, "the newest checkpoint only grows");
    let path = hashes(consistency.hashes);
    assert!(verify_consistency(
        17,
        to,
        &known.root(17),
        &known.root(to),
        &path
    ));
    assert!(ct_consistency(
        17,
        &known.root(17),
        to,
        &known.root(to),
        &path
    ));
}
