//! The transaction core: [`StoreTx`] written once over a dialect's SQL primitives
//! ([`Sql`]). The domain steps — the flag version bump and change capture, sealing an audit
//! record onto the chain head and capturing it, read-then-upsert of customer mappings and their tombstones, refusing
//! writes on a read connection, mapping rows to records — live here only.

use super::dialect::{Param, Row, Sql, Statement, query_all, query_opt};
use super::{
    AuditQuery, BillingObject, Committed, CustomerMapping, Outcome, ParkedEvent, ProcessedEvent,
    StoreError, StoreTx, TreeReach,
};
use crate::audit::{self, AuditRecord, ChainHead, NewAuditRecord, StoredAuditRow};
use crate::flags::{FlagOrigin, FlagRecord, FlagValue};
use crate::problem::Error;
use crate::stripe::EventOrder;
use crate::tlog::{self, Frontier};

/// Stored integers are `i64`; sequence numbers and versions are `u64` and never negative.
pub(crate) fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

pub(crate) fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn billing_object_from_row(row: &dyn Row) -> Result<BillingObject, StoreError> {
    Ok(BillingObject {
        object: row.text(0)?,
        order: EventOrder {
            created: row.int(1)?,
            rank: row.int(2)?,
            event_id: row.text(3)?,
        },
        state: row.text(4)?,
    })
}

fn flag_from_row(row: &dyn Row) -> Result<FlagRecord, StoreError> {
    Ok(FlagRecord {
        tenant_id: row.text(0)?,
        key: row.text(1)?,
        value: FlagValue::from_stored(&row.text(2)?).map_err(StoreError::Corrupt)?,
        version: to_u64(row.int(3)?),
        order: EventOrder {
            created: row.int(4)?,
            rank: row.int(9)?,
            event_id: row.text(10)?,
        },
        origin: FlagOrigin::parse(&row.text(5)?),
        updated_at_ms: row.int(6)?,
        updated_by: row.text(7)?,
        source_event_id: row.text(8)?,
    })
}

fn parked_from_row(row: &dyn Row) -> Result<ParkedEvent, StoreError> {
    Ok(ParkedEvent {
        event_id: row.text(0)?,
        event_type: row.text(1)?,
        customer_id: row.text(2)?,
        created: row.int(3)?,
        signed_at: row.int(4)?,
        payload: row.bytes(5)?,
        actor: row.text(6)?,
        reason: row.opt_text(7)?,
        parked_at_ms: row.int(8)?,
        rank: row.int(9)?,
    })
}

fn audit_from_row(row: &dyn Row) -> Result<StoredAuditRow, StoreError> {
    Ok(StoredAuditRow {
        seq: to_u64(row.int(0)?),
        time_ms: row.int(1)?,
        tenant_id: row.text(2)?,
        actor: row.text(3)?,
        event: row.text(4)?,
        outcome: row.text(5)?,
        canonical: row.bytes(6)?,
        prev_hash: row.bytes(7)?,
        hash: row.bytes(8)?,
    })
}

fn chain_head(seq: i64, hash: Vec<u8>) -> Result<ChainHead, StoreError> {
    Ok(ChainHead {
        seq: to_u64(seq),
        hash: hash
            .try_into()
            .map_err(|_| StoreError::Corrupt(format!("audit record {seq} has a bad hash")))?,
    })
}

/// What the writer carries from one job to the next: the chain head new audit records are
/// sealed onto, the right edge of the Merkle tree they are added to, and the store-wide flag
/// version counter. Restored when a job or a batch fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct WriterState {
    pub(crate) head: ChainHead,
    pub(crate) flag_version: u64,
    /// The tree of the chain up to `head` once an append needed it; read (and the tree built
    /// where rows lack it) whenever it is not of `head`, e.g. after another replica wrote.
    pub(crate) tree: Frontier,
}

impl WriterState {
    pub(crate) const EMPTY: WriterState = WriterState {
        head: ChainHead::GENESIS,
        flag_version: 0,
        tree: Frontier::EMPTY,
    };

    /// Reads the state from the tables.
    pub(crate) fn load(sql: &mut dyn Sql) -> Result<Self, StoreError> {
        let row = query_opt(sql, Statement::WriterState, &[], |row| {
            Ok((row.opt_int(0)?, row.opt_bytes(1)?, row.opt_int(2)?))
        })?;
        let Some((seq, hash, version)) = row else {
            return Ok(Self::EMPTY);
        };
        Ok(WriterState {
            head: match (seq, hash) {
                (Some(seq), Some(hash)) => chain_head(seq, hash)?,
                _ => ChainHead::GENESIS,
            },
            flag_version: to_u64(version.unwrap_or(0)),
            tree: Frontier::EMPTY,
        })
    }
}

/// Every flag changed after `version`, oldest change first: how a replica catches up.
pub(crate) fn flags_after(sql: &mut dyn Sql, version: u64) -> Result<Vec<FlagRecord>, StoreError> {
    query_all(
        sql,
        Statement::FlagsAfter,
        &[Param::Int(to_i64(version))],
        flag_from_row,
    )
}

/// Rows of the audit chain read per round trip by `scan_audit`, so a long chain is neither held
/// in memory at once nor read through one long-running statement.
const AUDIT_PAGE: i64 = 1000;

/// The first page of a scan is this small and each next one twice as large, up to
/// [`AUDIT_PAGE`]: a scan that stops after a row or two (a checkpoint's point lookup) must not
/// fetch a thousand rows where the database client reads whole pages (PostgreSQL), while a long
/// scan pays only a few extra round trips.
const FIRST_AUDIT_PAGE: i64 = 8;

/// A [`StoreTx`] over a dialect's [`Sql`].
pub(crate) struct Tx<'a> {
    sql: &'a mut dyn Sql,
    /// None on a read connection, which refuses writes.
    writes: Option<Writes<'a>>,
}

struct Writes<'a> {
    state: &'a mut WriterState,
    /// What the transaction changed, for the [`super::CommitListener`] once it commits.
    changes: &'a mut Vec<Committed>,
}

impl<'a> Tx<'a> {
    pub(crate) fn writing(
        sql: &'a mut dyn Sql,
        state: &'a mut WriterState,
        changes: &'a mut Vec<Committed>,
    ) -> Self {
        Self {
            sql,
            writes: Some(Writes { state, changes }),
        }
    }

    pub(crate) fn reading(sql: &'a mut dyn Sql) -> Self {
        Self { sql, writes: None }
    }

    /// The connection and the writer's state, or [`StoreError::ReadOnly`].
    fn for_write(&mut self) -> Result<(&mut dyn Sql, &mut Writes<'a>), StoreError> {
        let writes = self.writes.as_mut().ok_or(StoreError::ReadOnly)?;
        Ok((&mut *self.sql, writes))
    }
}

impl StoreTx for Tx<'_> {
    fn processed_event(&mut self, event_id: &str) -> Result<Option<ProcessedEvent>, StoreError> {
        query_opt(
            self.sql,
            Statement::ProcessedEvent,
            &[Param::Text(event_id)],
            |row| {
                let outcome = row.text(2)?;
                Ok(ProcessedEvent {
                    event_id: event_id.to_owned(),
                    event_type: row.text(0)?,
                    tenant_id: row.text(1)?,
                    outcome: Outcome::parse(&outcome).ok_or_else(|| {
                        StoreError::Corrupt(format!("unknown stored outcome '{outcome}'"))
                    })?,
                    audit_seq: to_u64(row.int(3)?),
                })
            },
        )
    }

    fn record_processed(&mut self, event: &ProcessedEvent, at_ms: i64) -> Result<(), StoreError> {
        let (sql, _) = self.for_write()?;
        sql.execute(
            Statement::RecordProcessed,
            &[
                Param::Text(&event.event_id),
                Param::Text(&event.event_type),
                Param::Text(&event.tenant_id),
                Param::Text(event.outcome.as_str()),
                Param::Int(to_i64(event.audit_seq)),
                Param::Int(at_ms),
            ],
        )
    }

    fn customer_mapping(&mut self, customer_id: &str) -> Result<CustomerMapping, StoreError> {
        let row = query_opt(
            self.sql,
            Statement::CustomerMapping,
            &[Param::Text(customer_id)],
            |row| Ok((row.text(0)?, row.opt_int(1)?)),
        )?;
        Ok(match row {
            None => CustomerMapping::NeverMapped,
            Some((_, Some(_unmapped_at))) => CustomerMapping::Unmapped,
            Some((tenant, None)) => CustomerMapping::Mapped(tenant),
        })
    }

    fn map_customer(
        &mut self,
        customer_id: &str,
        tenant_id: &str,
        at_ms: i64,
    ) -> Result<Option<String>, StoreError> {
        self.for_write()?;
        let previous = self.tenant_of_customer(customer_id)?;
        self.sql.execute(
            Statement::MapCustomer,
            &[
                Param::Text(customer_id),
                Param::Text(tenant_id),
                Param::Int(at_ms),
            ],
        )?;
        Ok(previous)
    }

    fn unmap_customer(
        &mut self,
        customer_id: &str,
        at_ms: i64,
    ) -> Result<Option<String>, StoreError> {
        self.for_write()?;
        let previous = self.tenant_of_customer(customer_id)?;
        if previous.is_some() {
            self.sql.execute(
                Statement::UnmapCustomer,
                &[Param::Text(customer_id), Param::Int(at_ms)],
            )?;
        }
        Ok(previous)
    }

    fn parked_at(&mut self, event_id: &str) -> Result<Option<i64>, StoreError> {
        query_opt(
            self.sql,
            Statement::ParkedAt,
            &[Param::Text(event_id)],
            |row| row.int(0),
        )
    }

    fn count_parked(&mut self, customer_id: Option<&str>, up_to: u64) -> Result<u64, StoreError> {
        let limit = Param::Int(to_i64(up_to));
        let count = match customer_id {
            Some(customer) => query_opt(
                self.sql,
                Statement::CountParkedOfCustomer,
                &[Param::Text(customer), limit],
                |row| row.int(0),
            )?,
            None => query_opt(self.sql, Statement::CountParked, &[limit], |row| row.int(0))?,
        };
        Ok(to_u64(count.unwrap_or(0)))
    }

    fn park_event(&mut self, event: &ParkedEvent) -> Result<(), StoreError> {
        let (sql, _) = self.for_write()?;
        sql.execute(
            Statement::ParkEvent,
            &[
                Param::Text(&event.event_id),
                Param::Text(&event.event_type),
                Param::Text(&event.customer_id),
                Param::Int(event.created),
                Param::Int(event.signed_at),
                Param::Bytes(&event.payload),
                Param::Text(&event.actor),
                Param::OptText(event.reason.as_deref()),
                Param::Int(event.parked_at_ms),
                Param::Int(event.rank),
            ],
        )
    }

    fn parked_ids(&mut self, customer_id: &str) -> Result<Vec<String>, StoreError> {
        let (sql, _) = self.for_write()?;
        query_all(
            sql,
            Statement::ParkedIdsOfCustomer,
            &[Param::Text(customer_id)],
            |row| row.text(0),
        )
    }

    fn take_parked_event(&mut self, event_id: &str) -> Result<Option<ParkedEvent>, StoreError> {
        let (sql, _) = self.for_write()?;
        query_opt(
            sql,
            Statement::TakeParkedEvent,
            &[Param::Text(event_id)],
            parked_from_row,
        )
    }

    fn expire_parked(
        &mut self,
        before_ms: i64,
        limit: u64,
    ) -> Result<Vec<ParkedEvent>, StoreError> {
        let (sql, _) = self.for_write()?;
        query_all(
            sql,
            Statement::ExpireParked,
            &[Param::Int(before_ms), Param::Int(to_i64(limit))],
            parked_from_row,
        )
    }

    fn prune_processed(&mut self, before_ms: i64, limit: u64) -> Result<u64, StoreError> {
        let (sql, _) = self.for_write()?;
        let mut deleted = 0;
        sql.query(
            Statement::PruneProcessed,
            &[Param::Int(before_ms), Param::Int(to_i64(limit))],
            &mut |_| {
                deleted += 1;
                Ok(true)
            },
        )?;
        Ok(deleted)
    }

    fn flag(&mut self, tenant_id: &str, key: &str) -> Result<Option<FlagRecord>, StoreError> {
        query_opt(
            self.sql,
            Statement::Flag,
            &[Param::Text(tenant_id), Param::Text(key)],
            flag_from_row,
        )
    }

    fn write_flag(&mut self, mut record: FlagRecord) -> Result<FlagRecord, StoreError> {
        let (sql, writes) = self.for_write()?;
        writes.state.flag_version += 1;
        record.version = writes.state.flag_version;
        let value = record.value.to_stored();
        sql.execute(
            Statement::WriteFlag,
            &[
                Param::Text(&record.tenant_id),
                Param::Text(&record.key),
                Param::Text(&value),
                Param::Int(to_i64(record.version)),
                Param::Int(record.order.created),
                Param::Text(record.origin.as_str()),
                Param::Int(record.updated_at_ms),
                Param::Text(&record.updated_by),
                Param::Text(&record.source_event_id),
                Param::Int(record.order.rank),
                Param::Text(&record.order.event_id),
            ],
        )?;
        writes.changes.push(Committed::Flag(record.clone()));
        Ok(record)
    }

    fn advance_flag_order(
        &mut self,
        tenant_id: &str,
        key: &str,
        order: &EventOrder,
    ) -> Result<(), StoreError> {
        let (sql, _) = self.for_write()?;
        sql.execute(
            Statement::AdvanceFlagOrder,
            &[
                Param::Text(tenant_id),
                Param::Text(key),
                Param::Int(order.created),
                Param::Int(order.rank),
                Param::Text(&order.event_id),
            ],
        )
    }

    fn billing_object(
        &mut self,
        tenant_id: &str,
        object: &str,
    ) -> Result<Option<BillingObject>, StoreError> {
        query_opt(
            self.sql,
            Statement::BillingObject,
            &[Param::Text(tenant_id), Param::Text(object)],
            billing_object_from_row,
        )
    }

    fn billing_objects_of_kind(
        &mut self,
        tenant_id: &str,
        kind: &str,
    ) -> Result<Vec<BillingObject>, StoreError> {
        query_all(
            self.sql,
            Statement::BillingObjectsOfKind,
            &[Param::Text(tenant_id), Param::Text(kind)],
            billing_object_from_row,
        )
    }

    fn write_billing_object(
        &mut self,
        tenant_id: &str,
        kind: &str,
        object: &BillingObject,
    ) -> Result<(), StoreError> {
        let (sql, _) = self.for_write()?;
        sql.execute(
            Statement::WriteBillingObject,
            &[
                Param::Text(tenant_id),
                Param::Text(&object.object),
                Param::Text(kind),
                Param::Int(object.order.created),
                Param::Int(object.order.rank),
                Param::Text(&object.order.event_id),
                Param::Text(&object.state),
            ],
        )
    }

    fn append_audit(&mut self, record: NewAuditRecord, at_ms: i64) -> Result<AuditRecord, Error> {
        let (_, writes) = self.for_write()?;
        let state = *writes.state;
        if !state.tree.matches(&state.head) {
            let tree = match self.extend_tree(u64::MAX) {
                Ok((reach, tree)) if reach.built == state.head.seq => tree,
                built => {
                    // An edited table must not stop the writes (verification names the damage):
                    // new records' tree hashes come from the records themselves.
                    let why = match built {
                        Ok((reach, _)) => format!("it reaches record {}", reach.built),
                        Err(e) => e.to_string(),
                    };
                    tracing::error!(
                        head = state.head.seq,
                        error = %why,
                        "the stored audit Merkle tree cannot be extended to the chain's head; the tree's right edge is recomputed from the records (run coresdk audit verify --full)"
                    );
                    self.frontier_from_records(state.head)?
                }
            };
            self.for_write()?.1.state.tree = tree;
        }
        let (sql, writes) = self.for_write()?;
        let sealed = audit::seal(&writes.state.head, record, at_ms)?;
        writes.state.head = ChainHead {
            seq: sealed.seq,
            hash: sealed.hash,
        };
        let tree_hashes = writes
            .state
            .tree
            .append(tlog::leaf_hash(&sealed.canonical), sealed.hash);
        sql.execute(
            Statement::AppendAudit,
            &[
                Param::Int(to_i64(sealed.seq)),
                Param::Int(sealed.time_ms),
                Param::Text(&sealed.tenant_id),
                Param::Text(&sealed.actor),
                Param::Text(&sealed.event),
                Param::Text(&sealed.outcome),
                Param::Bytes(&sealed.canonical),
                Param::Bytes(&sealed.prev_hash),
                Param::Bytes(&sealed.hash),
                Param::Bytes(&tree_hashes),
            ],
        )?;
        writes.changes.push(Committed::Audit(sealed.clone()));
        Ok(sealed)
    }

    fn load_flags(&mut self) -> Result<Vec<FlagRecord>, StoreError> {
        query_all(self.sql, Statement::AllFlags, &[], flag_from_row)
    }

    fn audit_head(&mut self) -> Result<ChainHead, StoreError> {
        let head = query_opt(self.sql, Statement::AuditHead, &[], |row| {
            chain_head(row.int(0)?, row.bytes(1)?)
        })?;
        Ok(head.unwrap_or(ChainHead::GENESIS))
    }

    fn query_audit(&mut self, query: &AuditQuery) -> Result<Vec<AuditRecord>, StoreError> {
        query_all(
            self.sql,
            Statement::QueryAudit,
            &[
                Param::Int(to_i64(query.after_seq)),
                Param::OptText(query.tenant_id.as_deref()),
                Param::OptText(query.event_prefix.as_deref()),
                Param::OptText(query.outcome.as_deref()),
                Param::OptInt(query.since_ms),
                Param::OptInt(query.until_ms),
                Param::Int(i64::from(query.limit)),
                Param::Int(to_i64(query.through_seq)),
            ],
            |row| Ok(audit_from_row(row)?.into_record()),
        )
    }

    fn scan_audit(
        &mut self,
        from_seq: u64,
        visit: &mut dyn FnMut(StoredAuditRow) -> bool,
    ) -> Result<(), StoreError> {
        let mut after = to_i64(from_seq).saturating_sub(1);
        let mut page = FIRST_AUDIT_PAGE;
        loop {
            let mut read = 0;
            let mut stopped = false;
            self.sql.query(
                Statement::AuditPage,
                &[Param::Int(after), Param::Int(page)],
                &mut |row| {
                    let row = audit_from_row(row)?;
                    read += 1;
                    after = to_i64(row.seq);
                    stopped = !visit(row);
                    Ok(!stopped)
                },
            )?;
            if stopped || read < page {
                return Ok(());
            }
            page = (page * 2).min(AUDIT_PAGE);
        }
    }

    fn audit_tree_hashes(&mut self, seqs: &[u64]) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let list = serde_json::to_string(seqs).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let mut rows = Vec::with_capacity(seqs.len());
        self.sql.query(
            Statement::AuditTreeHashes,
            &[Param::Text(&list)],
            &mut |row| {
                if let Some(hashes) = row.opt_bytes(1)? {
                    rows.push((to_u64(row.int(0)?), hashes));
                }
                Ok(true)
            },
        )?;
        Ok(rows)
    }

    fn audit_tree_reach(&mut self) -> Result<TreeReach, StoreError> {
        let (built, records) = self.tree_built()?;
        Ok(TreeReach {
            built: built.seq,
            records,
        })
    }

    fn extend_audit_tree(&mut self, limit: u64) -> Result<TreeReach, Error> {
        Ok(self.extend_tree(limit)?.0)
    }
}

impl Tx<'_> {
    /// The newest record the tree covers (the one before the first without tree hashes, or the
    /// head), and how many records the chain has.
    fn tree_built(&mut self) -> Result<(ChainHead, u64), StoreError> {
        let head = self.audit_head()?;
        let first_unbuilt = query_opt(self.sql, Statement::FirstUnbuilt, &[], |row| {
            Ok((row.int(0)?, row.opt_bytes(1)?))
        })?;
        let built = match first_unbuilt {
            None => head,
            Some((1, _)) => ChainHead::GENESIS,
            Some((seq, Some(hash))) => chain_head(seq - 1, hash)?,
            Some((seq, None)) => {
                return Err(StoreError::Corrupt(format!(
                    "audit record {} is missing, so the Merkle tree cannot be built past it",
                    seq - 1
                )));
            }
        };
        Ok((built, head.seq))
    }

    /// The right edge of the tree of the chain up to `head`, from every record's bytes: what
    /// the writer falls back on when the stored tree cannot give it.
    fn frontier_from_records(&mut self, head: ChainHead) -> Result<Frontier, Error> {
        let mut tree = Frontier::EMPTY;
        let mut gap = None;
        self.scan_audit(1, &mut |row| {
            if row.seq != tree.size() + 1 || row.seq > head.seq {
                gap = Some(tree.size() + 1);
                return false;
            }
            let chain_hash = row.hash.as_slice().try_into().unwrap_or([0; 32]);
            tree.append(tlog::leaf_hash(&row.canonical), chain_hash);
            true
        })?;
        if let Some(seq) = gap.filter(|_| tree.size() < head.seq) {
            return Err(StoreError::Corrupt(format!(
                "audit record {seq} is missing: no Merkle tree can be built over the chain"
            ))
            .into());
        }
        if !tree.matches(&head) {
            return Err(StoreError::Corrupt(format!(
                "the audit chain's records do not reach its head, record {}",
                head.seq
            ))
            .into());
        }
        Ok(tree)
    }

    /// [`StoreTx::extend_audit_tree`], with the right edge of the tree it reached.
    fn extend_tree(&mut self, limit: u64) -> Result<(TreeReach, Frontier), Error> {
        self.for_write()?;
        let (newest, records) = self.tree_built()?;
        let mut tree = Frontier::read(self, newest.seq, newest.hash)?;
        if newest.seq == records {
            let reach = TreeReach {
                built: newest.seq,
                records,
            };
            return Ok((reach, tree));
        }
        // Leaf and chain hashes only: a batch of rows is held at once, not their bytes. Only
        // rows without tree hashes are read, so rows that have them are never rewritten.
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        let mut missing = Vec::new();
        let mut after = to_i64(newest.seq);
        loop {
            let page = AUDIT_PAGE.min(i64::try_from(limit - missing.len()).unwrap_or(AUDIT_PAGE));
            let before = missing.len();
            self.sql.query(
                Statement::UnbuiltPage,
                &[Param::Int(after), Param::Int(page)],
                &mut |row| {
                    let seq = row.int(0)?;
                    missing.push((to_u64(seq), tlog::leaf_hash(&row.bytes(1)?), row.bytes(2)?));
                    after = seq;
                    Ok(true)
                },
            )?;
            let read = missing.len() - before;
            if i64::try_from(read).unwrap_or(i64::MAX) < page || missing.len() >= limit {
                break;
            }
        }
        for (seq, leaf, chain_hash) in missing {
            // The first row read is the first without hashes, so the run is never empty. The
            // record after it is gone, or has tree hashes though the one before it had none (an
            // edited table): nothing past it is written here; the next call goes on after it.
            if seq != tree.size() + 1 {
                break;
            }
            let chain_hash = chain_hash
                .try_into()
                .map_err(|_| StoreError::Corrupt(format!("audit record {seq} has a bad hash")))?;
            let hashes = tree.append(leaf, chain_hash);
            self.sql.execute(
                Statement::SetTreeHashes,
                &[Param::Int(to_i64(seq)), Param::Bytes(&hashes)],
            )?;
        }
        let reach = TreeReach {
            built: tree.size(),
            records,
        };
        Ok((reach, tree))
    }
}
