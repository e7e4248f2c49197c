//! The SQLite schema and its migrations, versioned by `PRAGMA user_version`.

use rusqlite::Connection;

use crate::store::StoreError;

const SCHEMA_VERSION: i64 = 1;

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

/// Brings the schema up to this sidecar's version; refuses a database from a newer sidecar.
pub(super) fn migrate(conn: &Connection) -> Result<(), StoreError> {
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if version > SCHEMA_VERSION {
        return Err(StoreError::Corrupt(format!(
            "the database schema is version {version}, newer than this sidecar's {SCHEMA_VERSION}"
        )));
    }
    if version < 1 {
        conn.execute_batch(&format!(
            "BEGIN IMMEDIATE; {MIGRATION_1} PRAGMA user_version = 1; COMMIT;"
        ))?;
    }
    Ok(())
}
