//! One open PostgreSQL connection with its prepared statements: the core's [`Sql`] and the
//! engine's [`OpenTx`] over it.

use std::collections::HashMap;

use postgres::types::{ToSql, Type};
use postgres::{Client, Statement as Prepared};

use super::{CHANNEL, statements};
use crate::store::StoreError;
use crate::store::dialect::{Param, Row, Sql, Statement, Value};
use crate::store::engine::{OpenTx, TransactionSql};
use crate::store::tx::WriterState;

pub(super) struct PgConn {
    pub(super) client: Client,
    /// Prepared on first use; they live as long as the connection.
    prepared: HashMap<Statement, Prepared>,
}

impl PgConn {
    pub(super) fn new(client: Client) -> Self {
        Self {
            client,
            prepared: HashMap::new(),
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
        Ok(self.client.batch_execute(script)?)
    }

    fn before_commit(
        &mut self,
        at_begin: &WriterState,
        now: &WriterState,
    ) -> Result<(), StoreError> {
        if now.flag_version > at_begin.flag_version {
            // Delivered to every listening replica when (and only if) the transaction commits.
            self.client.execute(
                "SELECT pg_notify($1, $2)",
                &[&CHANNEL, &now.flag_version.to_string()],
            )?;
        }
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

struct PgRow(postgres::Row);

impl Row for PgRow {
    fn value(&self, column: usize) -> Result<Value, StoreError> {
        let Some(found) = self.0.columns().get(column) else {
            return Err(StoreError::Corrupt(format!("no column {column}")));
        };
        let ty = found.type_();
        let value = if *ty == Type::INT8 {
            self.0.try_get::<_, Option<i64>>(column)?.map(Value::Int)
        } else if *ty == Type::INT4 {
            self.0
                .try_get::<_, Option<i32>>(column)?
                .map(|int| Value::Int(i64::from(int)))
        } else if *ty == Type::BYTEA {
            self.0
                .try_get::<_, Option<Vec<u8>>>(column)?
                .map(Value::Bytes)
        } else {
            self.0
                .try_get::<_, Option<String>>(column)?
                .map(Value::Text)
        };
        Ok(value.unwrap_or(Value::Null))
    }
}
