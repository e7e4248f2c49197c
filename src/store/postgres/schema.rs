//! The PostgreSQL schema and its migrations, versioned in `coresdk_schema`.

use super::link::Link;
use crate::store::StoreError;

/// Held while migrating, so replicas starting together apply the schema once.
const MIGRATION_LOCK: i64 = 0x636f_7265_7364_6b02;

const MIGRATION_1: &str = "
CREATE TABLE IF NOT EXISTS processed_events (
    event_id TEXT PRIMARY KEY,
    event_type TEXT NOT NULL,
    tenant_id TEXT NOT NULL,
    outcome TEXT NOT NULL,
    audit_seq BIGINT NOT NULL,
    processed_at_ms BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS customers (
    customer_id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL,
    updated_at_ms BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS flags (
    tenant_id TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    version BIGINT NOT NULL,
    event_created BIGINT NOT NULL,
    origin TEXT NOT NULL,
    updated_at_ms BIGINT NOT NULL,
    updated_by TEXT NOT NULL,
    source_event_id TEXT NOT NULL,
    PRIMARY KEY (tenant_id, key)
);
CREATE INDEX IF NOT EXISTS flags_by_version ON flags (version);
CREATE TABLE IF NOT EXISTS audit (
    seq BIGINT PRIMARY KEY,
    time_ms BIGINT NOT NULL,
    tenant_id TEXT NOT NULL,
    actor TEXT NOT NULL,
    event TEXT NOT NULL,
    outcome TEXT NOT NULL,
    canonical BYTEA NOT NULL,
    prev_hash BYTEA NOT NULL,
    hash BYTEA NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_by_tenant ON audit (tenant_id, seq);
";

/// Customers unmapped at runtime keep their row as a tombstone.
const MIGRATION_2: &str = "ALTER TABLE customers ADD COLUMN IF NOT EXISTS unmapped_at_ms BIGINT;";

/// Schema 3, the billing lifecycle. Parked events: verified events of customers not mapped yet,
/// kept as received until the customer gets a tenant (then applied and deleted) or they expire.
/// A flag's ordering mark becomes the whole event order (`created`, tie rank, event id); rows
/// from before compare as rank 0 and empty id, below any event of the same second. Billing
/// objects whose events replace one another as a whole (each subscription, the entitlement
/// summary) keep the order of the newest one applied and the state it left (JSON, see
/// `ops::objects`); `kind` lists a tenant's subscriptions. Event ids are compared in Rust (byte
/// order), or in SQL under `COLLATE "C"` (byte order too: a customer's parked events), so the
/// database collation does not matter.
const MIGRATION_3: &str = "
CREATE TABLE IF NOT EXISTS parked_events (
    event_id TEXT PRIMARY KEY,
    event_type TEXT NOT NULL,
    customer_id TEXT NOT NULL,
    created BIGINT NOT NULL,
    signed_at BIGINT NOT NULL,
    payload BYTEA NOT NULL,
    actor TEXT NOT NULL,
    reason TEXT,
    parked_at_ms BIGINT NOT NULL,
    rank BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS parked_events_by_customer
    ON parked_events (customer_id, created, rank, event_id COLLATE \"C\");
CREATE INDEX IF NOT EXISTS parked_events_by_age ON parked_events (parked_at_ms);
ALTER TABLE flags ADD COLUMN IF NOT EXISTS event_rank BIGINT NOT NULL DEFAULT 0;
ALTER TABLE flags ADD COLUMN IF NOT EXISTS order_event_id TEXT NOT NULL DEFAULT '';
CREATE TABLE IF NOT EXISTS billing_objects (
    tenant_id TEXT NOT NULL,
    object TEXT NOT NULL,
    kind TEXT NOT NULL,
    event_created BIGINT NOT NULL,
    event_rank BIGINT NOT NULL,
    event_id TEXT NOT NULL,
    state TEXT NOT NULL,
    PRIMARY KEY (tenant_id, object)
);
";

/// Schema 4: dedup records older than the retention window are deleted oldest first, in
/// small batches; without this index each batch would scan the whole table.
// Retention prunes by age, and keeps what a flag names (found through the other two).
const MIGRATION_4: &str = "
CREATE INDEX IF NOT EXISTS processed_events_by_age ON processed_events (processed_at_ms);
CREATE INDEX IF NOT EXISTS flags_by_source_event ON flags (source_event_id);
CREATE INDEX IF NOT EXISTS flags_by_order_event ON flags (order_event_id);
";

/// Schema 5: the audit Merkle tree (see `crate::tlog`). Each record keeps the tree hashes its
/// append stores; rows from before are filled at start (`StoreTx::extend_audit_tree`). A
/// nullable column without a default: adding it rewrites nothing.
/// The partial index finds the first row still to fill at once however long the log, and
/// costs appends nothing: a new row has its hashes, so it is never in the index.
const MIGRATION_5: &str = "
ALTER TABLE audit ADD COLUMN IF NOT EXISTS tree_hashes BYTEA;
CREATE INDEX IF NOT EXISTS audit_unbuilt ON audit (seq) WHERE tree_hashes IS NULL;
";

/// Migration `n` (from 1) brings the schema from version `n - 1` to `n`.
const MIGRATIONS: [&str; 5] = [
    MIGRATION_1,
    MIGRATION_2,
    MIGRATION_3,
    MIGRATION_4,
    MIGRATION_5,
];
const SCHEMA_VERSION: i32 = MIGRATIONS.len() as i32;

/// Applies the schema once, however many replicas start together.
pub(super) fn migrate(client: &mut Link) -> Result<(), StoreError> {
    client.batch_execute(&format!("SELECT pg_advisory_lock({MIGRATION_LOCK})"))?;
    let applied = (|| -> Result<(), StoreError> {
        client.batch_execute("CREATE TABLE IF NOT EXISTS coresdk_schema (version INT NOT NULL)")?;
        let current = client.prepare("SELECT max(version) FROM coresdk_schema")?;
        let version: Option<i32> = match client.query(&current, &[])?.first() {
            Some(row) => row.try_get(0).map_err(|e| {
                StoreError::Corrupt(format!(
                    "coresdk_schema.version: {}",
                    crate::problem::with_causes(&e)
                ))
            })?,
            None => None,
        };
        let version = version.unwrap_or(0);
        if version > SCHEMA_VERSION {
            return Err(StoreError::Corrupt(format!(
                "the database schema is version {version}, newer than this sidecar's {SCHEMA_VERSION}"
            )));
        }
        for (reached, migration) in (1..)
            .zip(MIGRATIONS)
            .skip(usize::try_from(version).unwrap_or(0))
        {
            // One script is one implicit transaction: it commits whole or not at all.
            client.batch_execute(&format!(
                "{migration}\nINSERT INTO coresdk_schema (version) VALUES ({reached})"
            ))?;
        }
        Ok(())
    })();
    client.batch_execute(&format!("SELECT pg_advisory_unlock({MIGRATION_LOCK})"))?;
    applied
}
