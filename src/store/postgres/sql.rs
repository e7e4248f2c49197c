//! One open PostgreSQL connection with its prepared statements: the core's [`Sql`] and the
//! engine's [`OpenTx`] over it.

use std::collections::HashMap;

use tokio_postgres::Statement as Prepared;
use tokio_postgres::types::{ToSql, Type};

use super::link::Link;
use super::{AUDIT_CHANNEL, FLAG_CHANNEL, statements};
use crate::store::StoreError;
use crate::store::dialect::{Param, Row, Sql, Statement, Value};
use crate::store::engine::{OpenTx, TransactionSql};
use crate::store::tx::WriterState;

pub(super) struct PgConn {
    pub(super) client: Link,
    /// Prepared on first use; they live as long as the connection.
    prepared: HashMap<Statement, Prepared>,
    /// `NOTIFY` statements for the open write transaction, sent with its `COMMIT`.
    notify_on_commit: String,
}

impl PgConn {
    pub(super) fn new(client: Link) -> Self {
        Self {
            client,
            prepared: HashMap::new(),
            notify_on_commit: String::new(),
        }
    }

    fn prepared(&mut self, statement: Statement) -> Result<Prepared, StoreError> {
        if let Some(prepared) = self.prepared.get(&statement) {
            return Ok(prepared.clone());
        }
        let prepared = self.client.prepare(statements::text(statement))?;
        self.prepared.insert(statement, prepared.clone());
        Ok(prepared)
    }
}

impl OpenTx for PgConn {
    const SCRIPTS: TransactionSql = statements::SCRIPTS;

    fn execute_script(&mut self, script: &'static str) -> Result<(), StoreError> {
        let notify = std::mem::take(&mut self.notify_on_commit);
        if script == Self::SCRIPTS.commit && !notify.is_empty() {
            // One round trip: the writers' lock is held until this returns.
            return self.client.batch_execute(&format!("{notify}{script}"));
        }
        self.client.batch_execute(script)
    }

    /// Other replicas follow through `LISTEN`: the new flag version and audit head are
    /// announced, delivered when (and only if) the transaction commits.
    fn before_commit(
        &mut self,
        at_begin: &WriterState,
        now: &WriterState,
    ) -> Result<(), StoreError> {
        let mut notify = String::new();
        // Numbers only: nothing from outside reaches this text.
        if now.flag_version > at_begin.flag_version {
            notify.push_str(&format!(
                "SELECT pg_notify('{FLAG_CHANNEL}', '{}'); ",
                now.flag_version
            ));
        }
        if now.head.seq > at_begin.head.seq {
            notify.push_str(&format!(
                "SELECT pg_notify('{AUDIT_CHANNEL}', '{}'); ",
                now.head.seq
            ));
        }
        self.notify_on_commit = notify;
        Ok(())
    }
}

impl Sql for PgConn {
    fn query(
        &mut self,
        statement: Statement,
        params: &[Param<'_>],
        each: &mut dyn FnMut(&dyn Row) -> Result<bool, StoreError>,
    ) -> Result<(), StoreError> {
        let prepared = self.prepared(statement)?;
        let params: Vec<&(dyn ToSql + Sync)> = params.iter().map(to_sql).collect();
        for row in self.client.query(&prepared, &params)? {
            if !each(&PgRow(row))? {
                break;
            }
        }
        Ok(())
    }

    fn execute(&mut self, statement: Statement, params: &[Param<'_>]) -> Result<(), StoreError> {
        let prepared = self.prepared(statement)?;
        let params: Vec<&(dyn ToSql + Sync)> = params.iter().map(to_sql).collect();
        self.client.execute(&prepared, &params)?;
        Ok(())
    }
}

fn to_sql<'p>(param: &'p Param<'_>) -> &'p (dyn ToSql + Sync) {
    match param {
        Param::Text(text) => text,
        Param::OptText(text) => text,
        Param::Int(int) => int,
        Param::OptInt(int) => int,
        Param::Bytes(bytes) => bytes,
    }
}

struct PgRow(tokio_postgres::Row);

impl Row for PgRow {
    fn value(&self, column: usize) -> Result<Value, StoreError> {
        let Some(found) = self.0.columns().get(column) else {
            return Err(StoreError::Corrupt(format!("no column {column}")));
        };
        let ty = found.type_();
        let value = if *ty == Type::INT8 {
            self.get::<i64>(column)?.map(Value::Int)
        } else if *ty == Type::INT4 {
            self.get::<i32>(column)?
                .map(|int| Value::Int(i64::from(int)))
        } else if *ty == Type::BYTEA {
            self.get::<Vec<u8>>(column)?.map(Value::Bytes)
        } else {
            self.get::<String>(column)?.map(Value::Text)
        };
        Ok(value.unwrap_or(Value::Null))
    }
}

impl PgRow {
    /// A column that does not read as `T` is corrupt data, never a panic.
    fn get<'a, T: tokio_postgres::types::FromSql<'a>>(
        &'a self,
        column: usize,
    ) -> Result<Option<T>, StoreError> {
        self.0.try_get::<_, Option<T>>(column).map_err(|e| {
            StoreError::Corrupt(format!(
                "column {column}: {}",
                crate::problem::with_causes(&e)
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::postgres::Connector;

    /// Rows as the server sends them. Needs the test server (`./scripts/test` starts one and
    /// sets CORESDK_TEST_POSTGRES_URL), like the PostgreSQL integration tests.
    fn rows(sql: &str) -> Vec<PgRow> {
        let url = std::env::var("CORESDK_TEST_POSTGRES_URL").unwrap_or_else(|_| {
            panic!("CORESDK_TEST_POSTGRES_URL is not set: run ./scripts/test, which starts a throwaway PostgreSQL")
        });
        let mut link = Connector::new(&url, None)
            .expect("a valid URL")
            .connect()
            .expect("the test server answers");
        let statement = link.prepare(sql).expect("prepared");
        let rows = link.query(&statement, &[]).expect("queried");
        rows.into_iter().map(PgRow).collect()
    }

    #[test]
    fn a_column_missing_or_of_another_type_is_corrupt_data_not_a_panic() {
        let rows = rows("SELECT 7::int8, 'x'::text, NULL::bytea, true, 3::int4");
        let row = &rows[0];
        assert!(matches!(row.value(0), Ok(Value::Int(7))));
        assert!(matches!(row.value(2), Ok(Value::Null)));
        assert!(matches!(row.value(4), Ok(Value::Int(3))));
        assert!(matches!(row.get::<Vec<u8>>(2), Ok(None)));
        for misread in [
            row.get::<String>(0).map(|_| ()),
            row.get::<i64>(1).map(|_| ()),
            // Even where the value is NULL.
            row.get::<i64>(2).map(|_| ()),
            row.get::<i64>(9).map(|_| ()),
            // A type the dialect does not map is read as text, which a boolean is not.
            row.value(3).map(|_| ()),
            row.value(9).map(|_| ()),
        ] {
            assert!(
                matches!(misread, Err(StoreError::Corrupt(_))),
                "{misread:?}"
            );
        }
    }
}
