//! What a SQL dialect provides the transaction core: the text of each [`Statement`], binding
//! [`Param`]s, and reading columns as [`Value`]s, over the two primitives of [`Sql`]. The column
//! lists are here once, so that every dialect's SQL reads the columns in the order the core
//! maps them.

use super::StoreError;

/// The columns of a flag row, in the order the core reads them and [`Statement::WriteFlag`]
/// binds them. A macro so that dialects can `concat!` it into `&'static str` SQL.
macro_rules! flag_columns {
    () => {
        "tenant_id, key, value, version, event_created, origin, updated_at_ms, updated_by, source_event_id, event_rank, order_event_id"
    };
}

/// The columns of an audit row, in the order the core reads them and [`Statement::AppendAudit`]
/// binds them.
macro_rules! audit_columns {
    () => {
        "seq, time_ms, tenant_id, actor, event, outcome, canonical, prev_hash, hash"
    };
}

/// The columns of a parked event, in the order the core reads them and
/// [`Statement::ParkEvent`] binds them.
macro_rules! parked_columns {
    () => {
        "event_id, event_type, customer_id, created, signed_at, payload, actor, reason, parked_at_ms, rank"
    };
}

pub(crate) use {audit_columns, flag_columns, parked_columns};

/// Every statement the core runs. Each dialect gives the SQL text; the parameters (in order)
/// and the columns returned are fixed here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Statement {
    /// event_id → event_type, tenant_id, outcome, audit_seq.
    ProcessedEvent,
    /// event_id, event_type, tenant_id, outcome, audit_seq, processed_at_ms.
    RecordProcessed,
    /// customer_id → tenant_id, unmapped_at_ms (NULL while mapped).
    CustomerMapping,
    /// customer_id, tenant_id, updated_at_ms: inserts or replaces the mapping, clearing a
    /// tombstone.
    MapCustomer,
    /// customer_id, unmapped_at_ms: turns the mapping into a tombstone. The row stays so that
    /// seeding from the tenants file can tell "unmapped" from "never mapped".
    UnmapCustomer,
    /// tenant_id, key → flag columns.
    Flag,
    /// → flag columns of every flag.
    AllFlags,
    /// version → flag columns of every flag changed after that version, ordered by version.
    FlagsAfter,
    /// The flag columns: inserts or replaces the flag.
    WriteFlag,
    /// tenant_id, key, created, rank, event_id: sets the flag's ordering mark (all three
    /// columns together) without changing its value or version.
    AdvanceFlagOrder,
    /// tenant_id, object → object, created, rank, event_id, state of the newest event applied
    /// to the object.
    BillingObject,
    /// tenant_id, kind, limit → object, created, rank, event_id, state of the tenant's objects
    /// of that kind, newest `created` and rank first (event ids are compared in Rust).
    BillingObjectsOfKind,
    /// tenant_id, object, kind, created, rank, event_id, state: inserts or replaces the object.
    WriteBillingObject,
    /// The audit columns, then the record's tree hashes (see `crate::tlog`).
    AppendAudit,
    /// seqs (a JSON array) → seq, tree_hashes of those records, ordered by seq.
    AuditTreeHashes,
    /// → seq of the oldest audit record without tree hashes, and the hash of the record before
    /// it (NULL for the first record); no row when every record has them.
    FirstUnbuilt,
    /// after_seq, limit → seq, canonical, hash of the records without tree hashes, ordered by
    /// seq (through the partial index of those rows).
    UnbuiltPage,
    /// seq, tree_hashes: stores the tree hashes of a record from before the tree.
    SetTreeHashes,
    /// → seq, hash of the newest audit record (no row when there is none).
    AuditHead,
    /// → newest audit seq, its hash, highest flag version: one row, NULLs when empty.
    WriterState,
    /// after_seq, tenant_id?, event_prefix?, outcome?, since_ms?, until_ms?, limit → audit
    /// columns ordered by seq (a NULL filter matches everything).
    QueryAudit,
    /// after_seq, limit → audit columns ordered by seq.
    AuditPage,
    /// event_id → parked_at_ms of the parked event.
    ParkedAt,
    /// limit → how many events are parked, counting no further than `limit`.
    CountParked,
    /// customer_id, limit → how many events of the customer are parked, up to `limit`.
    CountParkedOfCustomer,
    /// The parked columns: parks the event unless it is parked already.
    ParkEvent,
    /// customer_id → the ids of the customer's parked events in event order (`created`, tie
    /// rank, event id in byte order): the order [`crate::stripe::EventOrder`] compares by.
    ParkedIdsOfCustomer,
    /// event_id → the parked columns of that event, deleted.
    TakeParkedEvent,
    /// before_ms, limit → the parked columns of up to `limit` events parked before
    /// `before_ms`, oldest first, deleted.
    ExpireParked,
    /// before_ms, limit → the event ids of up to `limit` dedup records processed before
    /// `before_ms`, oldest first, deleted.
    PruneProcessed,
}

/// A statement parameter.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Param<'a> {
    Text(&'a str),
    OptText(Option<&'a str>),
    Int(i64),
    OptInt(Option<i64>),
    Bytes(&'a [u8]),
}

/// One column of a result row, as the dialect read it.
#[derive(Debug)]
pub(crate) enum Value {
    Null,
    Int(i64),
    Text(String),
    Bytes(Vec<u8>),
}

/// A result row.
pub(crate) trait Row {
    fn value(&self, column: usize) -> Result<Value, StoreError>;
}

impl dyn Row + '_ {
    pub(crate) fn text(&self, column: usize) -> Result<String, StoreError> {
        match self.value(column)? {
            Value::Text(text) => Ok(text),
            other => Err(unexpected(column, "text", &other)),
        }
    }

    pub(crate) fn opt_text(&self, column: usize) -> Result<Option<String>, StoreError> {
        match self.value(column)? {
            Value::Text(text) => Ok(Some(text)),
            Value::Null => Ok(None),
            other => Err(unexpected(column, "text", &other)),
        }
    }

    pub(crate) fn int(&self, column: usize) -> Result<i64, StoreError> {
        match self.opt_int(column)? {
            Some(int) => Ok(int),
            None => Err(unexpected(column, "an integer", &Value::Null)),
        }
    }

    pub(crate) fn opt_int(&self, column: usize) -> Result<Option<i64>, StoreError> {
        match self.value(column)? {
            Value::Int(int) => Ok(Some(int)),
            Value::Null => Ok(None),
            other => Err(unexpected(column, "an integer", &other)),
        }
    }

    pub(crate) fn bytes(&self, column: usize) -> Result<Vec<u8>, StoreError> {
        match self.opt_bytes(column)? {
            Some(bytes) => Ok(bytes),
            None => Err(unexpected(column, "bytes", &Value::Null)),
        }
    }

    pub(crate) fn opt_bytes(&self, column: usize) -> Result<Option<Vec<u8>>, StoreError> {
        match self.value(column)? {
            Value::Bytes(bytes) => Ok(Some(bytes)),
            Value::Null => Ok(None),
            other => Err(unexpected(column, "bytes", &other)),
        }
    }
}

/// Names the kind only: a column's content has no place in a log line.
fn unexpected(column: usize, wanted: &str, found: &Value) -> StoreError {
    let found = match found {
        Value::Null => "NULL",
        Value::Int(_) => "an integer",
        Value::Text(_) => "text",
        Value::Bytes(_) => "bytes",
    };
    StoreError::Corrupt(format!(
        "column {column} holds {found} where {wanted} belongs"
    ))
}

/// The SQL primitives a dialect provides on an open connection. Statements are prepared once
/// per connection and reused.
pub(crate) trait Sql {
    /// Runs a statement that returns rows, handing each to `each` until it returns false.
    fn query(
        &mut self,
        statement: Statement,
        params: &[Param<'_>],
        each: &mut dyn FnMut(&dyn Row) -> Result<bool, StoreError>,
    ) -> Result<(), StoreError>;

    /// Runs a statement that returns no rows.
    fn execute(&mut self, statement: Statement, params: &[Param<'_>]) -> Result<(), StoreError>;
}

/// The first row `map`ped, if there is one.
pub(crate) fn query_opt<T>(
    sql: &mut dyn Sql,
    statement: Statement,
    params: &[Param<'_>],
    map: impl Fn(&dyn Row) -> Result<T, StoreError>,
) -> Result<Option<T>, StoreError> {
    let mut found = None;
    sql.query(statement, params, &mut |row| {
        found = Some(map(row)?);
        Ok(false)
    })?;
    Ok(found)
}

/// Every row `map`ped.
pub(crate) fn query_all<T>(
    sql: &mut dyn Sql,
    statement: Statement,
    params: &[Param<'_>],
    map: impl Fn(&dyn Row) -> Result<T, StoreError>,
) -> Result<Vec<T>, StoreError> {
    let mut all = Vec::new();
    sql.query(statement, params, &mut |row| {
        all.push(map(row)?);
        Ok(true)
    })?;
    Ok(all)
}
