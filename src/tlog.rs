//! The audit log as an RFC 6962 Merkle tree: leaf `i` (0-based) is the audit record with
//! `seq = i + 1`, and its leaf data are exactly that record's stored `canonical` bytes.
//!
//! Storage follows Go's `sumdb/tlog` (and `tlog_tiles`, its Rust port): appending record `n`
//! (0-based) stores its leaf hash and the root of every complete subtree it completes, at most
//! `1 + log₂ n` hashes and just under two on average. They are kept in the record's own row
//! (`tree_hashes`, the hashes concatenated, lowest level first) and written by the same
//! statement as the record, so the tree is in the record's transaction by construction. Any
//! complete subtree `(level, k)` is then the `level`th hash of the record that completed it,
//! `seq = (k + 1) << level`; a proof or a root reads at most `2 log₂ n` hashes in one query.
//!
//! The writer keeps the tree's right edge ([`Frontier`]: one complete subtree root per set bit
//! of the size), so an append reads nothing to compute its hashes.

use std::cell::RefCell;

use tlog_tiles::{HashReader, tlog};

use crate::problem::Error;
use crate::store::{StoreError, StoreTx};

pub type Hash = [u8; 32];

/// The root of the empty tree: SHA-256 of nothing (RFC 6962 §2.1).
pub const EMPTY_ROOT: Hash = tlog_tiles::EMPTY_HASH.0;

/// SHA-256(0x00 ‖ data): the leaf hash of a record's canonical bytes.
pub fn leaf_hash(canonical: &[u8]) -> Hash {
    tlog_tiles::record_hash(canonical).0
}

/// SHA-256(0x01 ‖ left ‖ right).
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    tlog_tiles::node_hash(tlog_tiles::Hash(*left), tlog_tiles::Hash(*right)).0
}

/// The most levels a tree of `u64` leaves has.
const LEVELS: usize = 64;

/// The right edge of the tree of `size` leaves: the root of each complete subtree its binary
/// decomposition has (level `l` holds one exactly when bit `l` of `size` is set). Tied to the
/// hash chain head of the same size, so that a writer state whose chain moved on (another
/// replica wrote) is known to be out of date.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Frontier {
    size: u64,
    chain_hash: Hash,
    roots: [Hash; LEVELS],
}

impl std::fmt::Debug for Frontier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Frontier")
            .field("size", &self.size)
            .field("root", &hex::encode(self.root()))
            .finish()
    }
}

impl Frontier {
    pub const EMPTY: Frontier = Frontier {
        size: 0,
        chain_hash: crate::audit::GENESIS_HASH,
        roots: [[0; 32]; LEVELS],
    };

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether this is the tree of the chain whose head is `head`.
    pub fn matches(&self, head: &crate::audit::ChainHead) -> bool {
        self.size == head.seq && self.chain_hash == head.hash
    }

    /// Adds the next leaf (whose record has chain hash `chain_hash`) and answers the hashes its
    /// record stores: the leaf hash, then each subtree root it completes, lowest first.
    pub fn append(&mut self, leaf: Hash, chain_hash: Hash) -> Vec<u8> {
        let n = self.size;
        let completed = n.trailing_ones() as usize;
        let mut stored = Vec::with_capacity(32 * (completed + 1));
        stored.extend_from_slice(&leaf);
        let mut hash = leaf;
        for level in 0..completed {
            hash = node_hash(&self.roots[level], &hash);
            stored.extend_from_slice(&hash);
        }
        self.roots[completed] = hash;
        self.size = n + 1;
        self.chain_hash = chain_hash;
        stored
    }

    /// The RFC 6962 root: the complete subtrees folded from the smallest (rightmost) up.
    pub fn root(&self) -> Hash {
        let mut levels = (0..LEVELS).filter(|level| self.size >> level & 1 == 1);
        let Some(lowest) = levels.next() else {
            return EMPTY_ROOT;
        };
        levels.fold(self.roots[lowest], |right, level| {
            node_hash(&self.roots[level], &right)
        })
    }

    /// The right edge of the stored tree of `size` records, whose record `size` has chain hash
    /// `chain_hash`, read in one query.
    pub fn read(tx: &mut dyn StoreTx, size: u64, chain_hash: Hash) -> Result<Frontier, Error> {
        let mut nodes = Vec::new();
        let mut start = 0u64;
        for level in (0..LEVELS).rev() {
            if size >> level & 1 == 1 {
                nodes.push((level, start >> level));
                start += 1 << level;
            }
        }
        let indexes: Vec<u64> = nodes
            .iter()
            .map(|&(level, k)| tlog::stored_hash_index(level as u8, k))
            .collect();
        let hashes = StoredHashes::new(tx).read(&indexes)?;
        let mut frontier = Frontier {
            size,
            chain_hash,
            ..Frontier::EMPTY
        };
        for ((level, _), hash) in nodes.into_iter().zip(hashes) {
            frontier.roots[level] = hash;
        }
        Ok(frontier)
    }
}

/// Where the stored hash with `tlog` index `index` lives: the record that completed its
/// subtree, and its position among that record's hashes (its level).
fn location(index: u64) -> Option<(u64, usize)> {
    let (level, k) = tlog::split_stored_hash_index(index);
    let seq = k
        .checked_add(1)?
        .checked_mul(1u64.checked_shl(u32::from(level))?)?;
    Some((seq, usize::from(level)))
}

/// The stored tree hashes a transaction sees, as `tlog_tiles` reads them.
pub struct StoredHashes<'a, 'b> {
    tx: RefCell<&'a mut (dyn StoreTx + 'b)>,
    /// The first failure, kept whole: `tlog_tiles` errors carry no text.
    failure: RefCell<Option<Error>>,
}

impl<'a, 'b> StoredHashes<'a, 'b> {
    pub fn new(tx: &'a mut (dyn StoreTx + 'b)) -> Self {
        Self {
            tx: RefCell::new(tx),
            failure: RefCell::new(None),
        }
    }

    /// The hashes at `indexes` (`tlog` stored hash indexes), in that order.
    pub fn read(&self, indexes: &[u64]) -> Result<Vec<Hash>, Error> {
        if indexes.is_empty() {
            return Ok(Vec::new());
        }
        let locations = indexes
            .iter()
            .map(|&index| location(index).ok_or_else(|| corrupt(index)))
            .collect::<Result<Vec<_>, _>>()?;
        let mut seqs: Vec<u64> = locations.iter().map(|&(seq, _)| seq).collect();
        seqs.sort_unstable();
        seqs.dedup();
        let rows = self.tx.borrow_mut().audit_tree_hashes(&seqs)?;
        locations
            .iter()
            .zip(indexes)
            .map(|(&(seq, level), &index)| {
                let stored = rows
                    .binary_search_by_key(&seq, |(row_seq, _)| *row_seq)
                    .ok()
                    .and_then(|at| rows[at].1.get(32 * level..32 * (level + 1)))
                    .ok_or_else(|| corrupt(index))?;
                Hash::try_from(stored).map_err(|_| corrupt(index))
            })
            .collect()
    }

    /// What `tlog_tiles` reported as its reader's failure, with the reason.
    fn explain(&self, e: tlog::Error) -> Error {
        self.failure
            .borrow_mut()
            .take()
            .unwrap_or_else(|| Error::Internal(format!("Merkle tree: {e}")))
    }
}

impl HashReader for StoredHashes<'_, '_> {
    fn read_hashes(&self, indexes: &[u64]) -> Result<Vec<tlog_tiles::Hash>, tlog::Error> {
        match self.read(indexes) {
            Ok(hashes) => Ok(hashes.into_iter().map(tlog_tiles::Hash).collect()),
            Err(e) => {
                *self.failure.borrow_mut() = Some(e);
                Err(tlog::Error::IndexesNotInTree)
            }
        }
    }
}

fn corrupt(index: u64) -> Error {
    let (level, k) = tlog::split_stored_hash_index(index);
    StoreError::Corrupt(format!(
        "the audit Merkle tree lacks its stored hash at level {level}, index {k}"
    ))
    .into()
}

/// Why a proof was not given: the sizes asked for, not the store, are at fault.
fn out_of_range(what: String) -> Error {
    Error::OutOfRange(what)
}

/// The root of the stored tree of `size` records.
pub fn tree_root(tx: &mut dyn StoreTx, size: u64) -> Result<Hash, Error> {
    let reader = StoredHashes::new(tx);
    tlog::tree_hash(size, &reader)
        .map(|hash| hash.0)
        .map_err(|e| reader.explain(e))
}

/// The RFC 9162 inclusion proof of leaf `leaf_index` in the stored tree of `tree_size` records.
pub fn inclusion_proof(
    tx: &mut dyn StoreTx,
    leaf_index: u64,
    tree_size: u64,
) -> Result<Vec<Hash>, Error> {
    if leaf_index >= tree_size {
        return Err(out_of_range(format!(
            "record {} is not in a tree of {tree_size} records",
            leaf_index.saturating_add(1)
        )));
    }
    let reader = StoredHashes::new(tx);
    tlog::prove_record(tree_size, leaf_index, &reader)
        .map(|proof| proof.into_iter().map(|hash| hash.0).collect())
        .map_err(|e| reader.explain(e))
}

/// The RFC 9162 consistency proof from the stored tree of `from_size` records to the one of
/// `to_size`. Empty when the sizes are equal or `from_size` is 0, as RFC 9162 has it.
pub fn consistency_proof(
    tx: &mut dyn StoreTx,
    from_size: u64,
    to_size: u64,
) -> Result<Vec<Hash>, Error> {
    if from_size > to_size {
        return Err(out_of_range(format!(
            "a tree of {to_size} records cannot extend one of {from_size}"
        )));
    }
    if from_size == 0 || from_size == to_size {
        return Ok(Vec::new());
    }
    let reader = StoredHashes::new(tx);
    tlog::prove_tree(to_size, from_size, &reader)
        .map(|proof| proof.into_iter().map(|hash| hash.0).collect())
        .map_err(|e| reader.explain(e))
}

/// Whether `proof` shows leaf `leaf_index` with hash `leaf` in the tree of `tree_size` leaves
/// with root `root` (RFC 9162 §2.1.3.2).
pub fn check_inclusion(
    proof: &[Hash],
    tree_size: u64,
    root: &Hash,
    leaf_index: u64,
    leaf: &Hash,
) -> bool {
    if leaf_index >= tree_size || proof.len() > LEVELS {
        return false;
    }
    let proof: Vec<tlog_tiles::Hash> = proof.iter().copied().map(tlog_tiles::Hash).collect();
    tlog::check_record(
        &proof,
        tree_size,
        tlog_tiles::Hash(*root),
        leaf_index,
        tlog_tiles::Hash(*leaf),
    )
    .is_ok()
}

/// Whether `proof` shows that the tree of `to_size` leaves with root `to_root` extends the one
/// of `from_size` with root `from_root` (RFC 9162 §2.1.4.2).
pub fn check_consistency(
    proof: &[Hash],
    from_size: u64,
    from_root: &Hash,
    to_size: u64,
    to_root: &Hash,
) -> bool {
    // A proof is at most two hashes a level; checking copies it once per level.
    if from_size > to_size || proof.len() > 2 * LEVELS {
        return false;
    }
    if from_size == to_size {
        return proof.is_empty() && from_root == to_root;
    }
    if from_size == 0 {
        return proof.is_empty();
    }
    let proof: Vec<tlog_tiles::Hash> = proof.iter().copied().map(tlog_tiles::Hash).collect();
    tlog::check_tree(
        &proof,
        to_size,
        tlog_tiles::Hash(*to_root),
        from_size,
        tlog_tiles::Hash(*from_root),
    )
    .is_ok()
}

/// Records whose tree hashes one write transaction of [`build_missing`] stores: a few
/// hundred milliseconds of the writer at most, so the build never holds the write lock long.
const BUILD_BATCH: u64 = 10_000;

/// Builds the tree of a chain from before it (or the records a replica of an older version
/// appended), oldest record first, a batch per transaction, and logs its progress. Safe to
/// run anywhere and again: a chain whose tree is complete costs one read.
pub async fn build_missing(store: &crate::store::Store) -> Result<(), Error> {
    let started = std::time::Instant::now();
    // Where the tree reaches before anything is built, so that the log counts every record
    // added, also when one batch adds them all.
    let from = store.read(|tx| Ok(tx.audit_tree_reach()?)).await?;
    if from.built >= from.records {
        return Ok(());
    }
    let mut reach = from;
    let mut logged: Option<std::time::Instant> = None;
    while reach.built < reach.records {
        if logged.is_none_or(|at| at.elapsed().as_secs() >= 5) {
            logged = Some(std::time::Instant::now());
            tracing::info!(
                built = reach.built,
                records = reach.records,
                percent = reach.built * 100 / reach.records.max(1),
                "building the audit Merkle tree over records from before it"
            );
        }
        reach = store.write(|tx| tx.extend_audit_tree(BUILD_BATCH)).await?;
    }
    tracing::info!(
        records = reach.records,
        added = reach.built - from.built,
        seconds = started.elapsed().as_secs_f64(),
        "audit Merkle tree built"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `tlog_tiles`' own stored hashes, read back from what [`Frontier::append`] stored.
    struct Stored(Vec<Vec<u8>>);

    impl HashReader for Stored {
        fn read_hashes(&self, indexes: &[u64]) -> Result<Vec<tlog_tiles::Hash>, tlog::Error> {
            indexes
                .iter()
                .map(|&index| {
                    let (seq, level) = location(index).ok_or(tlog::Error::IndexesNotInTree)?;
                    let row = self
                        .0
                        .get(usize::try_from(seq - 1).map_err(|_| tlog::Error::BadMath)?)
                        .ok_or(tlog::Error::IndexesNotInTree)?;
                    let hash: Hash = row
                        .get(32 * level..32 * (level + 1))
                        .and_then(|h| h.try_into().ok())
                        .ok_or(tlog::Error::IndexesNotInTree)?;
                    Ok(tlog_tiles::Hash(hash))
                })
                .collect()
        }
    }

    #[test]
    fn appends_store_what_tlog_stores_and_the_frontier_knows_the_root() {
        let mut frontier = Frontier::EMPTY;
        let mut stored = Stored(Vec::new());
        assert_eq!(frontier.root(), EMPTY_ROOT);
        for n in 0..300u64 {
            let data = format!("record {n}");
            let expected = tlog::stored_hashes(n, data.as_bytes(), &stored).expect("tlog");
            let ours = frontier.append(leaf_hash(data.as_bytes()), [0; 32]);
            let theirs: Vec<u8> = expected.iter().flat_map(|h| h.0).collect();
            assert_eq!(ours, theirs, "record {n}");
            stored.0.push(ours);
            let root = tlog::tree_hash(n + 1, &stored).expect("root");
            assert_eq!(frontier.root(), root.0, "size {}", n + 1);
        }
    }

    #[test]
    fn stored_hash_locations_name_the_record_that_completed_the_subtree() {
        // Leaf 5 (seq 6) is stored by record 6; the subtree of leaves 4..8 (level 2, k 1) by
        // record 8, the fourth hash it stores... at level 2.
        assert_eq!(location(tlog::stored_hash_index(0, 5)), Some((6, 0)));
        assert_eq!(location(tlog::stored_hash_index(2, 1)), Some((8, 2)));
        assert_eq!(location(tlog::stored_hash_index(3, 0)), Some((8, 3)));
    }
}
