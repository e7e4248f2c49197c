//! One SQLite connection: how it is opened, and the engine's [`Connection`] and the core's
//! [`Sql`] over it.

use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::{OpenFlags, params_from_iter};

use super::statements;
use crate::store::dialect::{Param, Row, Sql, Statement, Value};
use crate::store::engine::{Connection, OpenTx, TransactionSql};
use crate::store::tx::WriterState;
use crate::store::{StoreError, StoreUrl};

/// Statements kept prepared per connection: room for all of [`Statement`]'s, so the hot ones
/// are never evicted by a rare one.
const PREPARED_STATEMENTS: usize = 32;

pub(super) struct SqliteConn {
    conn: rusqlite::Connection,
}

impl SqliteConn {
    pub(super) fn open(url: &StoreUrl, read_only: bool) -> Result<Self, StoreError> {
        let conn = match url {
            StoreUrl::Memory => rusqlite::Connection::open_in_memory()?,
            StoreUrl::Postgres(_) => return Err(StoreError::Unsupported("not a SQLite store URL")),
            StoreUrl::Sqlite(path) => {
                let flags = if read_only {
                    OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX
                } else {
                    OpenFlags::SQLITE_OPEN_READ_WRITE
                        | OpenFlags::SQLITE_OPEN_CREATE
                        | OpenFlags::SQLITE_OPEN_NO_MUTEX
                };
                rusqlite::Connection::open_with_flags(path, flags)?
            }
        };
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.set_prepared_statement_cache_capacity(PREPARED_STATEMENTS);
        if !read_only {
            // WAL lets the reader run beside the writer; FULL syncs the WAL on every commit,
            // which is what makes an acknowledged webhook survive a power cut, not only a crash.
            conn.pragma_update(None, "journal_mode", "WAL")?;
            conn.pragma_update(None, "synchronous", "FULL")?;
        }
        Ok(Self { conn })
    }

    pub(super) fn raw(&self) -> &rusqlite::Connection {
        &self.conn
    }

    /// Checkpoints the WAL into the database file and closes it.
    pub(super) fn close(self) {
        if let Err(e) = self.conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);") {
            tracing::warn!(error = %e, "final WAL checkpoint failed; the WAL is replayed at next start");
        }
        if let Err((_, e)) = self.conn.close() {
            tracing::error!(error = %e, "closing the store failed");
        }
    }
}

impl Connection for SqliteConn {
    type Open = Self;

    fn begin_write(&mut self, _state: &mut WriterState) -> Result<&mut Self, StoreError> {
        // The lock file makes this the file's only writer, so the state the engine carries
        // from the last batch is still the database's.
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        Ok(self)
    }

    fn begin_read(&mut self) -> Result<&mut Self, StoreError> {
        self.conn.execute_batch("BEGIN")?;
        Ok(self)
    }
}

impl OpenTx for SqliteConn {
    const SCRIPTS: TransactionSql = statements::SCRIPTS;

    fn execute_script(&mut self, script: &'static str) -> Result<(), StoreError> {
        Ok(self.conn.execute_batch(script)?)
    }
}

impl Sql for SqliteConn {
    fn query(
        &mut self,
        statement: Statement,
        params: &[Param<'_>],
        each: &mut dyn FnMut(&dyn Row) -> Result<bool, StoreError>,
    ) -> Result<(), StoreError> {
        let mut prepared = self.conn.prepare_cached(statements::text(statement))?;
        let mut rows = prepared.query(params_from_iter(params))?;
        while let Some(row) = rows.next()? {
            if !each(&SqliteRow(row))? {
                break;
            }
        }
        Ok(())
    }

    fn execute(&mut self, statement: Statement, params: &[Param<'_>]) -> Result<(), StoreError> {
        self.conn
            .prepare_cached(statements::text(statement))?
            .execute(params_from_iter(params))?;
        Ok(())
    }
}

impl rusqlite::ToSql for Param<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(match *self {
            Param::Text(text) | Param::OptText(Some(text)) => {
                ToSqlOutput::Borrowed(ValueRef::Text(text.as_bytes()))
            }
            Param::Int(int) | Param::OptInt(Some(int)) => ToSqlOutput::from(int),
            Param::Bytes(bytes) => ToSqlOutput::Borrowed(ValueRef::Blob(bytes)),
            Param::OptText(None) | Param::OptInt(None) => ToSqlOutput::Borrowed(ValueRef::Null),
        })
    }
}

struct SqliteRow<'r, 's>(&'r rusqlite::Row<'s>);

impl Row for SqliteRow<'_, '_> {
    fn value(&self, column: usize) -> Result<Value, StoreError> {
        Ok(match self.0.get_ref(column)? {
            ValueRef::Null => Value::Null,
            ValueRef::Integer(int) => Value::Int(int),
            ValueRef::Text(text) => Value::Text(
                String::from_utf8(text.to_vec())
                    .map_err(|_| StoreError::Corrupt(format!("column {column} is not UTF-8")))?,
            ),
            ValueRef::Blob(bytes) => Value::Bytes(bytes.to_vec()),
            ValueRef::Real(real) => {
                return Err(StoreError::Corrupt(format!(
                    "column {column} holds the real number {real}"
                )));
            }
        })
    }
}
