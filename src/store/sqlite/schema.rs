//! The SQLite schema and its migrations, versioned by `PRAGMA user_version`.

use rusqlite::Connection;

use crate::store::StoreError;

const MIGRATION_1: &str = "
CREATE TABLE processed_events (
    event_id TEXT PRIMARY KEY,
    event_type TEXT NOT NULL,
    tenant_id TEXT NOT NULL,
    outcome TEXT NOT NULL,
    audit_seq INTEGER NOT NULL,
    processed_at_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE customers (
    customer_id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL,
    updated_at_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE flags (
    tenant_id TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    version INTEGER NOT NULL,
    event_created INTEGER NOT NULL,
    origin TEXT NOT NULL,
    updated_at_ms INTEGER NOT NULL,
    updated_by TEXT NOT NULL,
    source_event_id TEXT NOT NULL,
    PRIMARY KEY (tenant_id, key)
) WITHOUT ROWID;
CREATE TABLE audit (
    seq INTEGER PRIMARY KEY,
    time_ms INTEGER NOT NULL,
    tenant_id TEXT NOT NULL,
    actor TEXT NOT NULL,
    event TEXT NOT NULL,
    outcome TEXT NOT NULL,
    canonical BLOB NOT NULL,
    prev_hash BLOB NOT NULL,
    hash BLOB NOT NULL
);
CREATE INDEX audit_by_tenant ON audit (tenant_id, seq);
";

/// Customers unmapped at runtime keep their row as a tombstone.
const MIGRATION_2: &str = "ALTER TABLE customers ADD COLUMN unmapped_at_ms INTEGER;";

/// Schema 3, the billing lifecycle. Parked events: verified events of customers not mapped yet,
/// kept as received until the customer gets a tenant (then applied and deleted) or they expire. A rowid table: payloads are too large
/// for WITHOUT ROWID's clustered rows.
/// A flag's ordering mark becomes the whole event order (`created`, tie rank, event id); rows
/// from before compare as rank 0 and empty id, below any event of the same second. Billing
/// objects whose events replace one another as a whole (each subscription, the entitlement
/// summary) keep the order of the newest one applied and the state it left (JSON, see
/// `ops::objects`); `kind` lists a tenant's subscriptions.
const MIGRATION_3: &str = "
CREATE TABLE parked_events (
    event_id TEXT PRIMARY KEY,
    event_type TEXT NOT NULL,
    customer_id TEXT NOT NULL,
    created INTEGER NOT NULL,
    signed_at INTEGER NOT NULL,
    payload BLOB NOT NULL,
    actor TEXT NOT NULL,
    reason TEXT,
    parked_at_ms INTEGER NOT NULL,
    rank INTEGER NOT NULL
);
CREATE INDEX parked_events_by_customer ON parked_events (customer_id, created, rank, event_id);
CREATE INDEX parked_events_by_age ON parked_events (parked_at_ms);
ALTER TABLE flags ADD COLUMN event_rank INTEGER NOT NULL DEFAULT 0;
ALTER TABLE flags ADD COLUMN order_event_id TEXT NOT NULL DEFAULT '';
CREATE TABLE billing_objects (
    tenant_id TEXT NOT NULL,
    object TEXT NOT NULL,
    kind TEXT NOT NULL,
    event_created INTEGER NOT NULL,
    event_rank INTEGER NOT NULL,
    event_id TEXT NOT NULL,
    state TEXT NOT NULL,
    PRIMARY KEY (tenant_id, object)
) WITHOUT ROWID;
";

/// Schema 4: dedup records older than the retention window are deleted oldest first, in
/// small batches; without this index each batch would scan the whole table.
// Retention prunes by age, and keeps what a flag names (found through the other two).
const MIGRATION_4: &str = "
CREATE INDEX processed_events_by_age ON processed_events (processed_at_ms);
CREATE INDEX flags_by_source_event ON flags (source_event_id);
CREATE INDEX flags_by_order_event ON flags (order_event_id);
";

/// Schema 5: the audit Merkle tree (see `crate::tlog`). Each record keeps the tree hashes its
/// append stores; rows from before are filled at start (`StoreTx::extend_audit_tree`). The
/// partial index finds the first row still to fill at once however long the log, and costs
/// appends nothing: a new row has its hashes, so it is never in the index.
const MIGRATION_5: &str = "
ALTER TABLE audit ADD COLUMN tree_hashes BLOB;
CREATE INDEX audit_unbuilt ON audit (seq) WHERE tree_hashes IS NULL;
";

/// Migration `n` (from 1) brings the schema from version `n - 1` to `n`.
const MIGRATIONS: [&str; 5] = [
    MIGRATION_1,
    MIGRATION_2,
    MIGRATION_3,
    MIGRATION_4,
    MIGRATION_5,
];
const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// Brings the schema up to this sidecar's version; refuses a database from a newer sidecar.
/// The version is read under the write lock and every step commits with it, so a migration
/// applies once and whole.
pub(super) fn migrate(conn: &Connection) -> Result<(), StoreError> {
    conn.execute_batch("BEGIN IMMEDIATE")?;
    let migrated = (|| -> Result<(), StoreError> {
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if version > SCHEMA_VERSION {
            return Err(StoreError::Corrupt(format!(
                "the database schema is version {version}, newer than this sidecar's {SCHEMA_VERSION}"
            )));
        }
        for migration in MIGRATIONS
            .iter()
            .skip(usize::try_from(version).unwrap_or(0))
        {
            conn.execute_batch(migration)?;
        }
        conn.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        Ok(())
    })();
    match migrated {
        Ok(()) => Ok(conn.execute_batch("COMMIT")?),
        Err(e) => {
            // The migration's own error is the one to report, whatever the rollback says.
            let _ = conn.execute_batch("ROLLBACK");
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_version_1_database_keeps_its_mappings_and_migrates_once() {
        let conn = Connection::open_in_memory().expect("open");
        conn.execute_batch(&format!(
            "{MIGRATION_1} PRAGMA user_version = 1;
             INSERT INTO customers (customer_id, tenant_id, updated_at_ms) VALUES ('cus_1', 'acme', 1);"
        ))
        .expect("a version 1 database");
        migrate(&conn).expect("migrated");
        migrate(&conn).expect("migrating again changes nothing");
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .expect("version");
        assert_eq!(version, SCHEMA_VERSION);
        let row: (String, Option<i64>) = conn
            .query_row(
                "SELECT tenant_id, unmapped_at_ms FROM customers WHERE customer_id = 'cus_1'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .expect("the mapping survives");
        assert_eq!(row, ("acme".to_owned(), None));
    }

    #[test]
    fn version_2_flags_keep_their_mark_with_the_lowest_tie_rank() {
        let conn = Connection::open_in_memory().expect("open");
        conn.execute_batch(&format!(
            "{MIGRATION_1} {MIGRATION_2} PRAGMA user_version = 2;
             INSERT INTO flags (tenant_id, key, value, version, event_created, origin, updated_at_ms,
               updated_by, source_event_id)
             VALUES ('acme', 'pro_features', '{{\"bool\":true}}', 1, 100, 'rule', 1, 'stripe-webhook', 'evt_1');"
        ))
        .expect("a version 2 database");
        migrate(&conn).expect("migrated");
        let mark: (i64, i64, String) = conn
            .query_row(
                "SELECT event_created, event_rank, order_event_id FROM flags",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .expect("the flag survives");
        assert_eq!(mark, (100, 0, String::new()));
        let objects: i64 = conn
            .query_row("SELECT count(*) FROM billing_objects", [], |r| r.get(0))
            .expect("the table exists");
        assert_eq!(objects, 0);
    }
}
