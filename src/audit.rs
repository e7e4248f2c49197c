//! The audit trail: records, their RFC 8785 canonical bytes, the hash chain and its verification.
//!
//! One global chain: every record's hash covers the previous record's hash, so removing,
//! altering or reordering any record breaks every hash after it. Per-tenant views are queries
//! over the one chain; a single chain is what makes "nothing was removed" provable at all.
//!
//! `hash = SHA-256("coresdk.audit.v1\0" ‖ prev_hash ‖ canonical)`, where `canonical` is the
//! RFC 8785 (JCS) encoding of `{v, seq, time, tenant, actor, event, outcome, metadata}`. The
//! exact hashed bytes are stored, so verification never depends on re-serialising.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::problem::Error;

pub const DOMAIN_TAG: &[u8] = b"coresdk.audit.v1\0";
pub const GENESIS_HASH: [u8; 32] = [0; 32];
/// Bound on a record's metadata once canonicalised: the trail is not a payload archive.
pub const MAX_METADATA_BYTES: usize = 4096;
pub const MAX_FIELD_LEN: usize = 256;

/// A record before it is sealed into the chain.
#[derive(Debug, Clone, PartialEq)]
pub struct NewAuditRecord {
    pub tenant_id: String,
    pub actor: String,
    pub event: String,
    pub outcome: String,
    pub metadata: Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct CanonicalRecord {
    v: u32,
    seq: u64,
    time: String,
    tenant: String,
    actor: String,
    event: String,
    outcome: String,
    metadata: Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AuditRecord {
    pub seq: u64,
    pub time_ms: i64,
    pub tenant_id: String,
    pub actor: String,
    pub event: String,
    pub outcome: String,
    pub metadata: Map<String, Value>,
    pub prev_hash: [u8; 32],
    pub hash: [u8; 32],
    pub canonical: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainHead {
    pub seq: u64,
    pub hash: [u8; 32],
}

impl ChainHead {
    pub const GENESIS: ChainHead = ChainHead {
        seq: 0,
        hash: GENESIS_HASH,
    };
}

pub fn chain_hash(prev_hash: &[u8; 32], canonical: &[u8]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(DOMAIN_TAG);
    hasher.update(prev_hash);
    hasher.update(canonical);
    hasher.finalize().into()
}

fn canonical_bytes(record: &CanonicalRecord) -> Result<Vec<u8>, Error> {
    serde_jcs::to_vec(record).map_err(|e| Error::Internal(format!("canonical encoding: {e}")))
}

/// Fits metadata under the bound, dropping the largest values first (replaced by a marker),
/// so a delivery is never refused for what it carries.
pub fn bound_metadata(mut metadata: Map<String, Value>) -> Map<String, Value> {
    while serde_jcs::to_vec(&metadata).map_or(usize::MAX, |b| b.len()) > MAX_METADATA_BYTES {
        let Some(largest) = metadata
            .iter()
            .filter(|(_, v)| !matches!(v, Value::String(s) if s == "[truncated]"))
            .max_by_key(|(_, v)| v.to_string().len())
            .map(|(k, _)| k.clone())
        else {
            metadata.clear();
            break;
        };
        metadata.insert(largest, Value::String("[truncated]".into()));
    }
    metadata
}

/// Event namespaces only the sidecar writes (`billing.<stripe type>`, `auth.denied`,
/// `flag.set`, `tenant.customer_mapped`, …): an application's `Append` may not use them, so a
/// query for `billing.` or `auth.` returns only what the sidecar itself recorded.
pub const RESERVED_NAMESPACES: [&str; 5] = ["billing", "auth", "flag", "tenant", "audit"];

/// The reserved namespace `event` falls in, compared the way a reader would (case and leading
/// blanks ignored), if any.
pub fn reserved_namespace(event: &str) -> Option<&'static str> {
    let event = event.trim_start().to_ascii_lowercase();
    RESERVED_NAMESPACES.into_iter().find(|namespace| {
        event
            .strip_prefix(namespace)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
    })
}

/// Validates a record the application appends itself.
pub fn validate_new(record: &NewAuditRecord) -> Result<(), Error> {
    let mut violations = Vec::new();
    for (field, value, required) in [
        ("actor", &record.actor, true),
        ("event", &record.event, true),
        ("outcome", &record.outcome, true),
        ("tenant_id", &record.tenant_id, false),
    ] {
        if required && value.trim().is_empty() {
            violations.push(crate::problem::FieldViolation::new(field, "is required"));
        } else if value.len() > MAX_FIELD_LEN {
            violations.push(crate::problem::FieldViolation::new(
                field,
                format!("is longer than {MAX_FIELD_LEN} bytes"),
            ));
        }
    }
    if let Some(namespace) = reserved_namespace(&record.event) {
        violations.push(crate::problem::FieldViolation::new(
            "event",
            format!(
                "'{namespace}.' is reserved for the sidecar's own records; name application events in a namespace of your own, e.g. 'app.'"
            ),
        ));
    }
    // The one actor that vouches for a verified Stripe delivery.
    if record
        .actor
        .trim()
        .eq_ignore_ascii_case(crate::ops::WEBHOOK_ACTOR)
    {
        violations.push(crate::problem::FieldViolation::new(
            "actor",
            format!(
                "'{}' is reserved for verified Stripe deliveries",
                crate::ops::WEBHOOK_ACTOR
            ),
        ));
    }
    let size = serde_jcs::to_vec(&record.metadata).map_or(usize::MAX, |b| b.len());
    if size > MAX_METADATA_BYTES {
        violations.push(crate::problem::FieldViolation::new(
            "metadata",
            format!("is {size} bytes canonicalised, over the {MAX_METADATA_BYTES}-byte bound"),
        ));
    }
    if violations.is_empty() {
        Ok(())
    } else {
        Err(Error::InvalidArgument(violations))
    }
}

/// Seals `new` onto the chain after `head`.
pub fn seal(head: &ChainHead, new: NewAuditRecord, time_ms: i64) -> Result<AuditRecord, Error> {
    let seq = head.seq + 1;
    let canonical = canonical_bytes(&CanonicalRecord {
        v: 1,
        seq,
        time: crate::time::rfc3339_ms(time_ms),
        tenant: new.tenant_id.clone(),
        actor: new.actor.clone(),
        event: new.event.clone(),
        outcome: new.outcome.clone(),
        metadata: new.metadata.clone(),
    })?;
    let hash = chain_hash(&head.hash, &canonical);
    Ok(AuditRecord {
        seq,
        time_ms,
        tenant_id: new.tenant_id,
        actor: new.actor,
        event: new.event,
        outcome: new.outcome,
        metadata: new.metadata,
        prev_hash: head.hash,
        hash,
        canonical,
    })
}

/// A record as a store holds it: the indexed columns beside the hashed bytes.
#[derive(Debug, Clone)]
pub struct StoredAuditRow {
    pub seq: u64,
    pub time_ms: i64,
    pub tenant_id: String,
    pub actor: String,
    pub event: String,
    pub outcome: String,
    pub canonical: Vec<u8>,
    pub prev_hash: Vec<u8>,
    pub hash: Vec<u8>,
}

impl StoredAuditRow {
    /// The record the row claims to be; the metadata comes from the hashed bytes only.
    pub fn into_record(self) -> AuditRecord {
        let metadata = serde_json::from_slice::<CanonicalRecord>(&self.canonical)
            .map(|c| c.metadata)
            .unwrap_or_default();
        AuditRecord {
            seq: self.seq,
            time_ms: self.time_ms,
            tenant_id: self.tenant_id,
            actor: self.actor,
            event: self.event,
            outcome: self.outcome,
            metadata,
            prev_hash: self.prev_hash.try_into().unwrap_or(GENESIS_HASH),
            hash: self.hash.try_into().unwrap_or(GENESIS_HASH),
            canonical: self.canonical,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    pub ok: bool,
    pub records_checked: u64,
    pub first_bad_seq: u64,
    pub reason: String,
    pub head: ChainHead,
    /// What deserves an operator's attention without being evidence of tampering.
    pub warnings: Vec<String>,
    /// The signed checkpoint an incremental verification started from (0: none, or full).
    pub checkpoint_size: u64,
    /// The root of the Merkle tree of the `head.seq` records, as recomputed (when checked).
    pub tree_root: Option<[u8; 32]>,
}

/// Walks stored rows in sequence order and stops at the first one that does not verify.
pub struct ChainVerifier {
    head: ChainHead,
    checked: u64,
    failure: Option<(u64, String)>,
}

impl Default for ChainVerifier {
    fn default() -> Self {
        Self {
            head: ChainHead::GENESIS,
            checked: 0,
            failure: None,
        }
    }
}

impl ChainVerifier {
    /// A verifier of the records after `head`, which is taken as verified.
    pub fn after(head: ChainHead) -> Self {
        Self {
            head,
            ..Self::default()
        }
    }

    /// The last record that verified.
    pub fn head(&self) -> ChainHead {
        self.head
    }

    /// The first record that did not verify, and why.
    pub fn failure(&self) -> Option<&(u64, String)> {
        self.failure.as_ref()
    }

    /// Feeds the next row; returns false once a bad record was found (stop scanning).
    pub fn feed(&mut self, row: &StoredAuditRow) -> bool {
        if self.failure.is_some() {
            return false;
        }
        let expected_seq = self.head.seq + 1;
        if let Err(reason) = self.check(row, expected_seq) {
            let bad = if row.seq > expected_seq {
                expected_seq
            } else {
                row.seq
            };
            self.failure = Some((bad, reason));
            return false;
        }
        self.checked += 1;
        self.head = ChainHead {
            seq: row.seq,
            hash: chain_hash(&self.head.hash, &row.canonical),
        };
        true
    }

    fn check(&self, row: &StoredAuditRow, expected_seq: u64) -> Result<(), String> {
        if row.seq > expected_seq {
            return Err(format!(
                "record {expected_seq} is missing (the next stored record is {})",
                row.seq
            ));
        }
        if row.seq < expected_seq {
            return Err(format!("record {} appears out of order", row.seq));
        }
        if row.prev_hash.as_slice() != self.head.hash {
            return Err(format!(
                "record {} does not link to record {} (removed, reordered or altered)",
                row.seq, self.head.seq
            ));
        }
        if row.hash.as_slice() != chain_hash(&self.head.hash, &row.canonical) {
            return Err(format!(
                "record {} was altered (its hash does not match its content)",
                row.seq
            ));
        }
        let hashed: CanonicalRecord = serde_json::from_slice(&row.canonical)
            .map_err(|_| format!("record {} has unreadable hashed bytes", row.seq))?;
        let columns_match = hashed.seq == row.seq
            && hashed.time == crate::time::rfc3339_ms(row.time_ms)
            && hashed.tenant == row.tenant_id
            && hashed.actor == row.actor
            && hashed.event == row.event
            && hashed.outcome == row.outcome;
        if !columns_match {
            return Err(format!(
                "record {} was altered (its columns differ from its hashed content)",
                row.seq
            ));
        }
        Ok(())
    }

    pub fn finish(self) -> VerifyReport {
        match self.failure {
            Some((first_bad_seq, reason)) => VerifyReport {
                ok: false,
                records_checked: self.checked,
                first_bad_seq,
                reason,
                head: self.head,
                warnings: Vec::new(),
                checkpoint_size: 0,
                tree_root: None,
            },
            None => VerifyReport {
                ok: true,
                records_checked: self.checked,
                first_bad_seq: 0,
                reason: String::new(),
                head: self.head,
                warnings: Vec::new(),
                checkpoint_size: 0,
                tree_root: None,
            },
        }
    }
}

impl AuditRecord {
    pub fn to_row(&self) -> StoredAuditRow {
        StoredAuditRow {
            seq: self.seq,
            time_ms: self.time_ms,
            tenant_id: self.tenant_id.clone(),
            actor: self.actor.clone(),
            event: self.event.clone(),
            outcome: self.outcome.clone(),
            canonical: self.canonical.clone(),
            prev_hash: self.prev_hash.to_vec(),
            hash: self.hash.to_vec(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new(event: &str) -> NewAuditRecord {
        NewAuditRecord {
            tenant_id: "acme".into(),
            actor: "tester".into(),
            event: event.into(),
            outcome: "applied".into(),
            metadata: serde_json::json!({"z": 1, "a": "é", "n": 1.5e3})
                .as_object()
                .cloned()
                .unwrap_or_default(),
        }
    }

    fn chain(n: usize) -> Vec<StoredAuditRow> {
        let mut head = ChainHead::GENESIS;
        (0..n)
            .map(|i| {
                let record =
                    seal(&head, new(&format!("e{i}")), 1_700_000_000_000 + i as i64).expect("seal");
                head = ChainHead {
                    seq: record.seq,
                    hash: record.hash,
                };
                record.to_row()
            })
            .collect()
    }

    fn verify(rows: &[StoredAuditRow]) -> VerifyReport {
        let mut verifier = ChainVerifier::default();
        for row in rows {
            if !verifier.feed(row) {
                break;
            }
        }
        verifier.finish()
    }

    #[test]
    fn canonical_bytes_follow_rfc_8785() {
        let record = seal(&ChainHead::GENESIS, new("x"), 0).expect("seal");
        let text = String::from_utf8(record.canonical).expect("utf-8");
        assert_eq!(
            text,
            r#"{"actor":"tester","event":"x","metadata":{"a":"é","n":1500,"z":1},"outcome":"applied","seq":1,"tenant":"acme","time":"1970-01-01T00:00:00.000Z","v":1}"#
        );
        // RFC 8785 §3.2.2.3 number examples (the long literal is the RFC's own, kept as printed).
        #[allow(clippy::excessive_precision)]
        let numbers = serde_json::json!([1e21, 1e-7, 0.000001, 333333333.33333329, -0.0]);
        assert_eq!(
            String::from_utf8(serde_jcs::to_vec(&numbers).expect("jcs")).expect("utf-8"),
            "[1e+21,1e-7,0.000001,333333333.3333333,0]"
        );
    }

    #[test]
    fn an_intact_chain_verifies() {
        let report = verify(&chain(5));
        assert!(report.ok, "{report:?}");
        assert_eq!(report.records_checked, 5);
        assert_eq!(report.head.seq, 5);
    }

    #[test]
    fn altered_columns_or_bytes_are_named() {
        let mut rows = chain(5);
        rows[2].outcome = "rejected".into();
        let report = verify(&rows);
        assert_eq!((report.ok, report.first_bad_seq), (false, 3));

        let mut rows = chain(5);
        let last = rows[3].canonical.len() - 2;
        rows[3].canonical[last] ^= 1;
        let report = verify(&rows);
        assert_eq!((report.ok, report.first_bad_seq), (false, 4));
        assert!(report.reason.contains("altered"));
    }

    #[test]
    fn removed_and_reordered_records_are_named() {
        let mut rows = chain(5);
        rows.remove(1);
        let report = verify(&rows);
        assert_eq!((report.ok, report.first_bad_seq), (false, 2));
        assert!(report.reason.contains("missing"));

        // Swap the content of records 3 and 4 but keep the sequence column in order.
        let mut rows = chain(5);
        let (third, fourth) = (rows[2].clone(), rows[3].clone());
        rows[2] = StoredAuditRow { seq: 3, ..fourth };
        rows[3] = StoredAuditRow { seq: 4, ..third };
        let report = verify(&rows);
        assert_eq!((report.ok, report.first_bad_seq), (false, 3));
    }

    #[test]
    fn application_records_stay_out_of_the_sidecar_namespaces() {
        for event in [
            "billing.invoice.paid",
            "auth.denied",
            "flag.set",
            "tenant.customer_mapped",
            "audit.checkpoint",
            "Billing.x",
            " tenant.x",
            "audit",
        ] {
            let refused = validate_new(&new(event)).expect_err(event);
            assert_eq!(refused.violations()[0].field, "event", "{event}");
        }
        for event in [
            "app.login",
            "billingx.y",
            "authority.changed",
            "app.billing.x",
        ] {
            assert!(validate_new(&new(event)).is_ok(), "{event}");
        }
        let mut impostor = new("app.login");
        impostor.actor = crate::ops::WEBHOOK_ACTOR.to_owned();
        let refused = validate_new(&impostor).expect_err("the webhook actor");
        assert_eq!(refused.violations()[0].field, "actor");
    }

    #[test]
    fn metadata_is_bounded_without_losing_the_record() {
        let mut metadata = Map::new();
        metadata.insert("big".into(), Value::String("x".repeat(10_000)));
        metadata.insert("small".into(), Value::String("keep".into()));
        let bounded = bound_metadata(metadata);
        assert_eq!(bounded["small"], "keep");
        assert_eq!(bounded["big"], "[truncated]");
    }
}
