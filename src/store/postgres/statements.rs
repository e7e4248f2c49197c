//! The PostgreSQL text of the core's statements and transaction scripts.

use crate::store::dialect::{Statement, audit_columns, flag_columns, parked_columns};
use crate::store::engine::TransactionSql;

pub(super) const SCRIPTS: TransactionSql = TransactionSql {
    open_savepoint: "SAVEPOINT job",
    // One round trip per job: this took the shared store from 670 to ~1,650 webhooks/s.
    keep_job: "RELEASE SAVEPOINT job; SAVEPOINT job",
    // ROLLBACK TO leaves the savepoint open, ready for the next job.
    undo_job: "ROLLBACK TO SAVEPOINT job",
    commit: "COMMIT",
    rollback: "ROLLBACK",
};

pub(super) fn text(statement: Statement) -> &'static str {
    match statement {
        Statement::ProcessedEvent => {
            "SELECT event_type, tenant_id, outcome, audit_seq FROM processed_events WHERE event_id = $1"
        }
        Statement::RecordProcessed => {
            "INSERT INTO processed_events (event_id, event_type, tenant_id, outcome, audit_seq, processed_at_ms)
             VALUES ($1, $2, $3, $4, $5, $6)"
        }
        Statement::CustomerMapping => {
            "SELECT tenant_id, unmapped_at_ms FROM customers WHERE customer_id = $1"
        }
        Statement::MapCustomer => {
            "INSERT INTO customers (customer_id, tenant_id, updated_at_ms) VALUES ($1, $2, $3)
             ON CONFLICT (customer_id) DO UPDATE SET tenant_id = EXCLUDED.tenant_id,
               updated_at_ms = EXCLUDED.updated_at_ms, unmapped_at_ms = NULL"
        }
        Statement::UnmapCustomer => {
            "UPDATE customers SET unmapped_at_ms = $2, updated_at_ms = $2 WHERE customer_id = $1"
        }
        Statement::Flag => concat!(
            "SELECT ",
            flag_columns!(),
            " FROM flags WHERE tenant_id = $1 AND key = $2"
        ),
        Statement::AllFlags => concat!("SELECT ", flag_columns!(), " FROM flags"),
        Statement::FlagsAfter => concat!(
            "SELECT ",
            flag_columns!(),
            " FROM flags WHERE version > $1 ORDER BY version"
        ),
        Statement::WriteFlag => concat!(
            "INSERT INTO flags (",
            flag_columns!(),
            ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
             ON CONFLICT (tenant_id, key) DO UPDATE SET value = EXCLUDED.value, version = EXCLUDED.version,
               event_created = EXCLUDED.event_created, origin = EXCLUDED.origin, updated_at_ms = EXCLUDED.updated_at_ms,
               updated_by = EXCLUDED.updated_by, source_event_id = EXCLUDED.source_event_id,
               event_rank = EXCLUDED.event_rank, order_event_id = EXCLUDED.order_event_id"
        ),
        Statement::AdvanceFlagOrder => {
            "UPDATE flags SET event_created = $3, event_rank = $4, order_event_id = $5
             WHERE tenant_id = $1 AND key = $2"
        }
        Statement::BillingObject => {
            "SELECT object, event_created, event_rank, event_id, state FROM billing_objects
             WHERE tenant_id = $1 AND object = $2"
        }
        Statement::BillingObjectsOfKind => {
            "SELECT object, event_created, event_rank, event_id, state FROM billing_objects
             WHERE tenant_id = $1 AND kind = $2"
        }
        Statement::WriteBillingObject => {
            "INSERT INTO billing_objects (tenant_id, object, kind, event_created, event_rank, event_id, state)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (tenant_id, object) DO UPDATE SET kind = EXCLUDED.kind,
               event_created = EXCLUDED.event_created, event_rank = EXCLUDED.event_rank,
               event_id = EXCLUDED.event_id, state = EXCLUDED.state"
        }
        Statement::AppendAudit => concat!(
            "INSERT INTO audit (",
            audit_columns!(),
            ", tree_hashes) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
        ),
        Statement::AuditTreeHashes => {
            "SELECT seq, tree_hashes FROM audit
             WHERE seq IN (SELECT jsonb_array_elements_text($1::text::jsonb)::bigint) ORDER BY seq"
        }
        Statement::FirstUnbuilt => {
            "SELECT u.seq, (SELECT hash FROM audit WHERE seq = u.seq - 1)
             FROM (SELECT seq FROM audit WHERE tree_hashes IS NULL ORDER BY seq LIMIT 1) AS u"
        }
        Statement::UnbuiltPage => {
            "SELECT seq, canonical, hash FROM audit
             WHERE seq > $1 AND tree_hashes IS NULL ORDER BY seq LIMIT $2"
        }
        Statement::SetTreeHashes => "UPDATE audit SET tree_hashes = $2 WHERE seq = $1",
        Statement::AuditHead => "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1",
        Statement::WriterState => {
            "SELECT (SELECT seq FROM audit ORDER BY seq DESC LIMIT 1),
                    (SELECT hash FROM audit ORDER BY seq DESC LIMIT 1),
                    (SELECT max(version) FROM flags)"
        }
        // A parameter only compared with NULL has no type PostgreSQL could infer: cast it.
        Statement::QueryAudit => concat!(
            "SELECT ",
            audit_columns!(),
            " FROM audit
             WHERE seq > $1 AND seq <= $8
               AND ($2::text IS NULL OR tenant_id = $2)
               AND ($3::text IS NULL OR substr(event, 1, length($3)) = $3)
               AND ($4::text IS NULL OR outcome = $4)
               AND ($5::bigint IS NULL OR time_ms >= $5)
               AND ($6::bigint IS NULL OR time_ms < $6)
             ORDER BY seq LIMIT $7"
        ),
        Statement::AuditPage => concat!(
            "SELECT ",
            audit_columns!(),
            " FROM audit WHERE seq > $1 ORDER BY seq LIMIT $2"
        ),
        Statement::ParkedAt => "SELECT parked_at_ms FROM parked_events WHERE event_id = $1",
        Statement::CountParked => {
            "SELECT count(*) FROM (SELECT 1 FROM parked_events LIMIT $1) AS parked"
        }
        Statement::CountParkedOfCustomer => {
            "SELECT count(*) FROM (SELECT 1 FROM parked_events WHERE customer_id = $1 LIMIT $2) AS parked"
        }
        Statement::ParkEvent => concat!(
            "INSERT INTO parked_events (",
            parked_columns!(),
            ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT (event_id) DO NOTHING"
        ),
        Statement::ParkedIdsOfCustomer => {
            "SELECT event_id FROM parked_events WHERE customer_id = $1
               ORDER BY created, rank, event_id COLLATE \"C\""
        }
        Statement::TakeParkedEvent => concat!(
            "DELETE FROM parked_events WHERE event_id = $1 RETURNING ",
            parked_columns!()
        ),
        Statement::ExpireParked => concat!(
            "DELETE FROM parked_events WHERE event_id IN (SELECT event_id FROM parked_events
               WHERE parked_at_ms < $1 ORDER BY parked_at_ms LIMIT $2) RETURNING ",
            parked_columns!()
        ),
        Statement::PruneProcessed => {
            // A record a flag still names (the event that set it, or its newest) is how
            // `flags explain` finds that event's audit record: it stays while named.
            "DELETE FROM processed_events WHERE event_id IN (SELECT p.event_id FROM processed_events p
               WHERE p.processed_at_ms < $1
                 AND NOT EXISTS (SELECT 1 FROM flags f WHERE f.source_event_id = p.event_id)
                 AND NOT EXISTS (SELECT 1 FROM flags f WHERE f.order_event_id = p.event_id)
               ORDER BY p.processed_at_ms LIMIT $2) RETURNING event_id"
        }
    }
}
