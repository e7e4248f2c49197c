//! The application: one method per use case, over the store, the flag cache and the
//! configuration. Adapters (gRPC today; flagd, OFREP and HTTP later) decode a request, call
//! one of these and encode the answer; validation, policy and auditing happen here, once.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

use crate::audit::{self, AuditRecord, NewAuditRecord, VerifyReport};
use crate::auth::{Access, AccessRequest, Authorizer, Claims, DenialKey, TokenError};
use crate::checkpoint::Checkpointer;
use crate::coalesce::{Admitted, AuditWriter, Coalescer, Flush, Kind, audit_queue};
use crate::config::Config;
use crate::feeds::Feeds;
use crate::flags::{Flag, FlagRecord, FlagValue};
use crate::ops::{
    self, AdminChange, WebhookResult, validate_flag_key, validate_id, validate_optional_id,
};
use crate::problem::{Error, ProblemLinks};
use crate::shared_run::SharedRun;
use crate::store::{AuditQuery, Store};
use crate::stripe::StripeEvent;

/// Longest `actor` an admin change or an appended record may name.
const MAX_ACTOR_LEN: usize = 256;

/// Longest note `AddCosignatures` takes: a checkpoint and a few dozen signature lines fit
/// many times over.
const MAX_NOTE_BYTES: usize = 16 * 1024;

/// An operator's replay of an exported event: why, and who asked (none in mock mode without
/// operators).
struct Replay {
    reason: String,
    operator: Option<String>,
}

/// The most audit records one `Query` page examines: bounded work per call, whatever its
/// filters (they match by comparing, not through an index).
pub const QUERY_SCAN_WINDOW: u64 = 10_000;

/// A proof in the tree of `tree_size` records, and that tree's signed checkpoint when the
/// size was the newest checkpoint's.
#[derive(Debug)]
pub struct SizedProof {
    pub tree_size: u64,
    pub hashes: Vec<crate::tlog::Hash>,
    pub checkpoint: Option<crate::checkpoint::SignedNote>,
}

/// A page of [`App::query_audit`]: every record up to `scanned_through` has been considered.
#[derive(Debug)]
pub struct AuditPage {
    pub records: Vec<AuditRecord>,
    pub scanned_through: u64,
    /// Whether records after `scanned_through` existed when the page was read.
    pub more: bool,
}

pub struct App {
    pub config: Config,
    pub store: Store,
    pub feeds: Arc<Feeds>,
    /// Signs the chain head now and then, when checkpoints are kept.
    pub checkpoints: Option<Arc<Checkpointer>>,
    /// Flips to true at shutdown so that streams end and the server can drain.
    pub shutdown: watch::Receiver<bool>,
    authorizer: Authorizer,
    /// One permit per open stream, up to `config.max_streams`.
    streams: Arc<Semaphore>,
    /// Refused deliveries, by refusal reason: anyone can send them, so they are coalesced.
    refusals: Arc<Coalescer<&'static str>>,
    denials: Arc<Coalescer<DenialKey>>,
    audit_writer: AuditWriter,
    /// Concurrent `Verify` calls share one scan of the log (one for full scans, one for
    /// incremental ones).
    verify_runs: Arc<SharedRun<Result<VerifyReport, Arc<Error>>>>,
    full_verify_runs: Arc<SharedRun<Result<VerifyReport, Arc<Error>>>>,
}

/// Held by a stream's task for as long as it serves the stream.
pub type StreamSlot = OwnedSemaphorePermit;

/// An admin's change request, as every admin use case takes it.
pub struct Admin<'a> {
    /// `authorization: Bearer …` as presented, if at all.
    pub bearer: Option<&'a str>,
    pub actor: &'a str,
    pub reason: &'a str,
}

impl Admin<'_> {
    /// Checks who and why, and keeps them for the transaction, which outlives the request.
    /// The audited actor is the `operator` whose token made the call; the actor the caller
    /// claims is kept beside it. With no operator (mock mode, no token) the claim is all
    /// there is.
    fn validated(&self, operator: Option<String>) -> Result<Author, Error> {
        ops::required_text("actor", self.actor, MAX_ACTOR_LEN)?;
        ops::validate_reason(self.reason)?;
        let (actor, claimed_actor) = match operator {
            Some(operator) => (operator, Some(self.actor.to_owned())),
            None => (self.actor.to_owned(), None),
        };
        Ok(Author {
            actor,
            claimed_actor,
            reason: self.reason.to_owned(),
        })
    }
}

/// A validated admin's name and reason, owned.
struct Author {
    actor: String,
    claimed_actor: Option<String>,
    reason: String,
}

impl Author {
    fn change(&self) -> AdminChange<'_> {
        AdminChange {
            actor: &self.actor,
            claimed_actor: self.claimed_actor.as_deref(),
            reason: &self.reason,
        }
    }
}

impl App {
    pub fn new(
        config: Config,
        store: Store,
        feeds: Arc<Feeds>,
        checkpoints: Option<Arc<Checkpointer>>,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        let authorizer = Authorizer::new(config.tokens.clone(), config.fail_mode);
        let streams = Arc::new(Semaphore::new(config.max_streams));
        let (queue, inbox) = audit_queue();
        let window = config.deny_audit_window;
        let refusals = Arc::new(Coalescer::new(
            Kind {
                event: ops::REFUSED_DELIVERY_EVENT,
                outcome: ops::REFUSED_DELIVERY_OUTCOME,
                key_fields: ops::REFUSED_DELIVERY_KEY_FIELDS,
            },
            window,
            queue.clone(),
        ));
        let denials = Arc::new(Coalescer::new(
            Kind {
                event: "auth.denied",
                outcome: "denied",
                key_fields: crate::auth::DENIAL_KEY_FIELDS,
            },
            window,
            queue,
        ));
        let flushers: Vec<Arc<dyn Flush>> = vec![refusals.clone(), denials.clone()];
        let audit_writer = AuditWriter::spawn(store.clone(), inbox, flushers);
        Self {
            config,
            store,
            feeds,
            checkpoints,
            shutdown,
            authorizer,
            streams,
            refusals,
            denials,
            audit_writer,
            verify_runs: Arc::default(),
            full_verify_runs: Arc::default(),
        }
    }

    /// Writes the counts of open coalescing windows; call before closing the store.
    pub async fn close_audits(&self, within: Duration) {
        self.audit_writer.close(within).await;
    }

    /// Room for one more stream, or `TooManyStreams` when `--max-streams` are open: each one
    /// holds a task, a channel and a broadcast receiver that every change is cloned into.
    pub fn open_stream(&self) -> Result<StreamSlot, Error> {
        self.streams
            .clone()
            .try_acquire_owned()
            .map_err(|_| Error::TooManyStreams {
                limit: self.config.max_streams,
            })
    }

    /// Streams open now, each holding one of `--max-streams` slots.
    pub fn open_streams(&self) -> usize {
        self.config
            .max_streams
            .saturating_sub(self.streams.available_permits())
    }

    pub fn links(&self) -> &ProblemLinks {
        &self.config.problem_links
    }

    /// Admin use cases need `authorization: Bearer <an operator's token>` and answer with the
    /// operator's name; with no operator configured they are refused, except in mock mode
    /// where there is nothing to protect (and no operator: `None`).
    pub fn require_admin(&self, bearer: Option<&str>) -> Result<Option<String>, Error> {
        if !self.config.operators.configured() {
            if self.config.mock {
                return Ok(None);
            }
            return Err(Error::PermissionDenied(
                "admin RPCs are disabled: set CORESDK_ADMIN_TOKEN or CORESDK_ADMIN_TOKENS_FILE on the sidecar",
            ));
        }
        let presented = bearer.ok_or(Error::Unauthenticated(
            "admin RPCs need 'authorization: Bearer <admin token>'",
        ))?;
        let operator = self
            .config
            .operators
            .identify(presented)
            .ok_or(Error::Unauthenticated("the admin token is not valid"))?;
        Ok(Some(operator))
    }

    /// Verifies, deduplicates and applies a Stripe delivery in one durable transaction. Any
    /// `Ok` means "acknowledge"; any `Err` means "let Stripe retry" (or stop, for a forgery).
    pub async fn handle_webhook(
        &self,
        payload: Vec<u8>,
        signature_header: &str,
    ) -> Result<WebhookResult, Error> {
        let max_body = self.config.webhook_max_body_bytes;
        let event = match ops::verify_delivery(
            &self.config.verifier,
            max_body,
            &payload,
            signature_header,
            crate::time::now_s(),
        ) {
            Ok(event) => event,
            Err(refusal) => {
                // Anyone can send these: one line per coalescing window (the coalescer logs
                // the window's count when it closes), not one per request.
                let counted = ops::audits_refusal(&refusal)
                    && self.refusals.admit(refusal.mapping().reason, || {
                        ops::refused_delivery_record(&refusal, &payload)
                    }) == Admitted::Counted;
                self.feeds
                    .metrics()
                    .webhook("refused", Some(refusal.mapping().reason));
                if counted {
                    tracing::debug!(error = %refusal, bytes = payload.len(), "webhook refused");
                } else {
                    tracing::warn!(error = %refusal, bytes = payload.len(), "webhook refused");
                }
                return Err(refusal);
            }
        };
        self.apply_event(event, None).await
    }

    /// Feeds one exported event through the webhook path minus the signature: the admin
    /// token vouches for it instead, and its audit record names actor `replay` and `reason`.
    pub async fn replay_event(
        &self,
        bearer: Option<&str>,
        payload: Vec<u8>,
        reason: String,
    ) -> Result<WebhookResult, Error> {
        let operator = self.require_admin(bearer)?;
        ops::required_text("reason", &reason, ops::MAX_REASON_LEN)?;
        // The records stay the webhook path's, under the actor `replay`, and name the operator
        // in their metadata. The reason is the caller's text: Debug-escaped, so a newline in it
        // cannot forge a log line.
        tracing::info!(
            operator = operator.as_deref().unwrap_or("(mock mode, no operator)"),
            reason = ?reason,
            "replay of an exported event"
        );
        let event = ops::verify_export(
            self.config.webhook_max_body_bytes,
            &payload,
            crate::time::now_s(),
        )?;
        self.apply_event(event, Some(Replay { reason, operator }))
            .await
    }

    /// Applies a verified event in one durable transaction: Stripe's delivery, or with a
    /// `replay`, an operator's replay.
    async fn apply_event(
        &self,
        event: StripeEvent,
        replay: Option<Replay>,
    ) -> Result<WebhookResult, Error> {
        let rules = self.config.rules.clone();
        let parking = self.config.parking;
        let event_id = event.id.clone();
        let replayed = replay.is_some();
        let answer = self
            .store
            .write(move |tx| {
                let delivery = match &replay {
                    Some(replay) => {
                        ops::Delivery::replay(&replay.reason, replay.operator.as_deref())
                    }
                    None => ops::Delivery::STRIPE,
                };
                ops::apply_webhook(
                    tx,
                    &rules,
                    parking,
                    &event,
                    &delivery,
                    crate::time::now_ms(),
                )
            })
            .await;
        let metrics = self.feeds.metrics();
        match &answer {
            Ok(Ok(result)) => metrics.webhook(result.outcome.as_str(), None),
            Ok(Err(refusal)) => metrics.webhook("refused", Some(refusal.mapping().reason)),
            Err(_) => metrics.webhook("failed", None),
        }
        match &answer {
            Ok(Ok(result)) => tracing::info!(
                event_id = %result.event_id,
                event_type = %result.event_type,
                tenant = %result.tenant_id,
                outcome = result.outcome.as_str(),
                changes = result.flag_changes.len(),
                replayed,
                "webhook"
            ),
            Ok(Err(refusal)) => {
                tracing::warn!(%event_id, replayed, error = %refusal, "webhook refused")
            }
            Err(failure) if replayed => {
                tracing::error!(%event_id, error = %failure, "replayed event not committed; the operator's call fails and may be repeated")
            }
            Err(failure) => {
                tracing::error!(%event_id, error = %failure, "webhook not committed; Stripe will retry")
            }
        }
        answer?
    }

    pub fn get_flag(&self, tenant_id: &str, key: &str) -> Result<Flag, Error> {
        validate_id("tenant_id", tenant_id)?;
        validate_flag_key("key", key)?;
        self.feeds.flags.get(tenant_id, key)
    }

    /// What set a tenant's flag and what came too late for it, from the audit trail; searches
    /// at most [`QUERY_SCAN_WINDOW`] of the newest records, like a `Query` page.
    pub async fn explain_flag(
        &self,
        tenant_id: &str,
        key: &str,
    ) -> Result<ops::Explanation, Error> {
        let current = self.get_flag(tenant_id, key)?;
        self.store
            .read(move |tx| ops::explain_flag(tx, current, QUERY_SCAN_WINDOW))
            .await
    }

    /// Every flag of a tenant, catalog defaults included, sorted by key.
    pub fn get_flags(&self, tenant_id: &str) -> Result<Vec<Flag>, Error> {
        validate_id("tenant_id", tenant_id)?;
        Ok(self.feeds.flags.all_of(tenant_id))
    }

    pub async fn set_flag(
        &self,
        admin: Admin<'_>,
        tenant_id: String,
        key: String,
        // Decoded by the adapter, checked here after the other fields, like every field.
        value: Result<FlagValue, Error>,
    ) -> Result<FlagRecord, Error> {
        let operator = self.require_admin(admin.bearer)?;
        validate_id("tenant_id", &tenant_id)?;
        validate_flag_key("key", &key)?;
        let author = admin.validated(operator)?;
        let value = value?;
        let written = self
            .store
            .write(move |tx| {
                ops::set_flag(
                    tx,
                    &tenant_id,
                    &key,
                    value,
                    &author.change(),
                    crate::time::now_ms(),
                )
            })
            .await?;
        tracing::info!(tenant = %written.tenant_id, key = %written.key, actor = %written.updated_by, "flag set by admin");
        Ok(written)
    }

    pub async fn map_customer(
        &self,
        admin: Admin<'_>,
        customer_id: String,
        tenant_id: String,
    ) -> Result<ops::Mapped, Error> {
        let operator = self.require_admin(admin.bearer)?;
        validate_id("customer_id", &customer_id)?;
        validate_id("tenant_id", &tenant_id)?;
        let author = admin.validated(operator)?;
        let (rules, parking) = (self.config.rules.clone(), self.config.parking);
        self.store
            .write(move |tx| {
                ops::map_customer(
                    tx,
                    &rules,
                    parking,
                    &customer_id,
                    &tenant_id,
                    &author.change(),
                    crate::time::now_ms(),
                )
            })
            .await
    }

    /// Returns the tenant the customer was mapped to, if it was.
    pub async fn unmap_customer(
        &self,
        admin: Admin<'_>,
        customer_id: String,
    ) -> Result<Option<String>, Error> {
        let operator = self.require_admin(admin.bearer)?;
        validate_id("customer_id", &customer_id)?;
        let author = admin.validated(operator)?;
        self.store
            .write(move |tx| {
                ops::unmap_customer(tx, &customer_id, &author.change(), crate::time::now_ms())
            })
            .await
    }

    pub async fn resolve_customer(
        &self,
        bearer: Option<&str>,
        customer_id: String,
    ) -> Result<String, Error> {
        self.require_admin(bearer)?;
        validate_id("customer_id", &customer_id)?;
        let lookup = customer_id.clone();
        self.store
            .read(move |tx| Ok(tx.tenant_of_customer(&lookup)?))
            .await?
            .ok_or(Error::CustomerNotFound(customer_id))
    }

    /// The application's own audit event, validated, sealed and committed.
    pub async fn append_audit(
        &self,
        record: NewAuditRecord,
        idempotency_key: Option<String>,
    ) -> Result<AuditRecord, Error> {
        audit::validate_new(&record)?;
        validate_optional_id("tenant_id", &record.tenant_id)?;
        let Some(key) = idempotency_key else {
            return self.append(record).await;
        };
        validate_id("idempotency_key", &key)?;
        self.store
            .write(move |tx| ops::append_once(tx, record, &key, crate::time::now_ms()))
            .await
    }

    async fn append(&self, record: NewAuditRecord) -> Result<AuditRecord, Error> {
        self.store
            .write(move |tx| tx.append_audit(record, crate::time::now_ms()))
            .await
    }

    /// One page of matching records after `query.after_seq`, examining at most
    /// [`QUERY_SCAN_WINDOW`] records: a filter that matches few of them yields a short (even
    /// empty) page that says where the next one starts, instead of a scan of the whole chain
    /// on a reader every other read needs. `query.through_seq` is set here.
    pub async fn query_audit(&self, mut query: AuditQuery) -> Result<AuditPage, Error> {
        validate_optional_id("tenant_id", query.tenant_id.as_deref().unwrap_or_default())?;
        if let (Some(since), Some(until)) = (query.since_ms, query.until_ms)
            && since > until
        {
            return Err(Error::invalid("until", "is before `since`"));
        }
        self.store
            .read(move |tx| {
                let head = tx.audit_head()?.seq;
                query.through_seq = query
                    .after_seq
                    .saturating_add(QUERY_SCAN_WINDOW)
                    .min(head)
                    .max(query.after_seq);
                let page_size = query.limit;
                // One more than the page holds tells whether the window has more matches.
                query.limit = page_size.saturating_add(1);
                let mut records = tx.query_audit(&query)?;
                if records.len() > page_size as usize {
                    records.truncate(page_size as usize);
                    let last = records.last().map_or(query.after_seq, |r| r.seq);
                    return Ok(AuditPage {
                        records,
                        scanned_through: last,
                        more: true,
                    });
                }
                Ok(AuditPage {
                    records,
                    scanned_through: query.through_seq,
                    more: query.through_seq < head,
                })
            })
            .await
    }

    /// Verifies the log ([`crate::checkpoint::verify`]): what was added since the newest
    /// checkpoint, or with `full` everything from the first record. Callers share scans: one
    /// that arrives while a scan runs joins the next one, so the answer covers every record
    /// committed before its call, and at most one scan of each kind runs and one waits however
    /// many call.
    pub async fn verify_audit(&self, full: bool) -> Result<VerifyReport, Arc<Error>> {
        let (store, checkpoints) = (self.store.clone(), self.checkpoints.clone());
        let runs = if full {
            &self.full_verify_runs
        } else {
            &self.verify_runs
        };
        runs.join(move || async move {
            let checkpoints = checkpoints.as_ref().map(|c| c.checkpoints());
            let report = store
                .long_read(move |tx| {
                    let report = crate::checkpoint::verify(tx, checkpoints.as_ref(), full)?;
                    tracing::debug!(
                        records = report.records_checked,
                        full,
                        "audit chain scanned"
                    );
                    Ok(report)
                })
                .await?;
            if !report.ok {
                tracing::error!(first_bad_seq = report.first_bad_seq, reason = %report.reason, "audit log does not verify");
            }
            for warning in &report.warnings {
                tracing::warn!(%warning, "audit verification");
            }
            Ok(report)
        })
        .await
    }

    fn checkpointer(&self) -> Result<&Arc<Checkpointer>, Error> {
        self.checkpoints.as_ref().ok_or(Error::CheckpointsOff)
    }

    /// Refuses what needs signed checkpoints when this sidecar keeps none.
    pub fn checkpoints_on(&self) -> Result<(), Error> {
        self.checkpointer().map(|_| ())
    }

    /// The newest signed checkpoint, with its cosignatures.
    pub async fn newest_checkpoint(&self) -> Result<crate::checkpoint::SignedNote, Error> {
        let Some(checkpointer) = self.checkpoints.clone() else {
            return Err(Error::CheckpointNotFound(
                crate::checkpoint::CHECKPOINTS_OFF.into(),
            ));
        };
        tokio::task::spawn_blocking(move || checkpointer.newest())
            .await
            .map_err(|e| Error::Internal(format!("reading the checkpoints: {e}")))?
            .map_err(|e| Error::Internal(format!("reading the checkpoints: {e}")))?
            .ok_or_else(|| {
                Error::CheckpointNotFound(
                    "no audit checkpoint has been signed yet: the first is signed within CORESDK_AUDIT_CHECKPOINT_INTERVAL_S of the first record".into(),
                )
            })
    }

    /// Admin only: stores witness cosignatures of a checkpoint this sidecar signed.
    pub async fn add_cosignatures(
        &self,
        bearer: Option<&str>,
        note: String,
    ) -> Result<crate::checkpoint::SignedNote, Error> {
        self.require_admin(bearer)?;
        let checkpointer = self.checkpointer()?.clone();
        if note.len() > MAX_NOTE_BYTES {
            return Err(Error::invalid(
                "note",
                format!("is longer than {MAX_NOTE_BYTES} bytes"),
            ));
        }
        tokio::task::spawn_blocking(move || checkpointer.add_cosignatures(&note))
            .await
            .map_err(|e| Error::Internal(format!("storing cosignatures: {e}")))?
    }

    /// Record `seq`'s inclusion proof against the next checkpoint covering it, asking for one
    /// to be signed now; waits `wait` at most.
    pub async fn proof_at_next_checkpoint(
        &self,
        seq: u64,
        wait: Duration,
    ) -> Result<SizedProof, Error> {
        if seq == 0 {
            return Err(Error::OutOfRange(
                "the call recorded no audit record to prove".into(),
            ));
        }
        let note = self.checkpointer()?.covering(seq, wait).await?;
        let hashes = self.proof_against(seq, &note).await?;
        Ok(SizedProof {
            tree_size: note.size,
            hashes,
            checkpoint: Some(note),
        })
    }

    /// Record `seq`'s inclusion proof against `note`, refused when the stored tree is no
    /// longer the signed one (a log cut or rewritten since, which the sidecar refuses to sign
    /// over): such a proof could never verify against the note.
    async fn proof_against(
        &self,
        seq: u64,
        note: &crate::checkpoint::SignedNote,
    ) -> Result<Vec<crate::tlog::Hash>, Error> {
        use crate::tlog_proof::ProveError;
        let (size, root) = (note.size, note.root);
        let proved = self
            .store
            .read(move |tx| Ok(crate::tlog_proof::inclusion_against(tx, seq, size, &root)))
            .await?;
        proved.map_err(|e| match e {
            ProveError::Store(e) => e,
            e @ ProveError::NotCovered { .. } => Error::CheckpointNotFound(e.to_string()),
            e => Error::CheckpointUnavailable(format!(
                "the audit log no longer extends its newest checkpoint: {e}; the sidecar refuses to sign over it (AUDIT CHAIN CUT OR REWRITTEN in its log)"
            )),
        })
    }

    /// The RFC 9162 inclusion proof of record `seq` in the tree of `tree_size` records; with
    /// `tree_size` 0, in the newest checkpoint's tree, whose note comes with it.
    pub async fn inclusion_proof(&self, seq: u64, tree_size: u64) -> Result<SizedProof, Error> {
        if seq == 0 {
            return Err(Error::invalid(
                "seq",
                "is required (records are numbered from 1)",
            ));
        }
        let (tree_size, checkpoint) = self.size_or_checkpoint(tree_size).await?;
        if tree_size < seq {
            return Err(Error::invalid(
                "tree_size",
                format!("is {tree_size}, smaller than the seq {seq} it must hold"),
            ));
        }
        let hashes = match &checkpoint {
            Some(note) => self.proof_against(seq, note).await?,
            None => {
                self.store
                    .read(move |tx| {
                        within_log(tx, tree_size)?;
                        crate::tlog::inclusion_proof(tx, seq - 1, tree_size)
                    })
                    .await?
            }
        };
        Ok(SizedProof {
            tree_size,
            hashes,
            checkpoint,
        })
    }

    /// `size`, or for 0 the newest checkpoint's size and the checkpoint.
    async fn size_or_checkpoint(
        &self,
        size: u64,
    ) -> Result<(u64, Option<crate::checkpoint::SignedNote>), Error> {
        if size > 0 {
            return Ok((size, None));
        }
        let note = self.newest_checkpoint().await?;
        Ok((note.size, Some(note)))
    }

    /// The RFC 9162 consistency proof from the tree of `from_size` records to that of
    /// `to_size` (0: the newest checkpoint's).
    pub async fn consistency_proof(
        &self,
        from_size: u64,
        to_size: u64,
    ) -> Result<SizedProof, Error> {
        let (to_size, checkpoint) = self.size_or_checkpoint(to_size).await?;
        if from_size > to_size {
            return Err(Error::invalid(
                "from_size",
                format!("is {from_size}, larger than to_size {to_size}"),
            ));
        }
        let hashes = self
            .store
            .read(move |tx| {
                within_log(tx, to_size)?;
                crate::tlog::consistency_proof(tx, from_size, to_size)
            })
            .await?;
        Ok(SizedProof {
            tree_size: to_size,
            hashes,
            checkpoint,
        })
    }

    pub fn verify_token(&self, token: &str) -> Result<Arc<Claims>, TokenError> {
        self.authorizer.tokens().verify(token)
    }

    /// Decides from memory; a denial is audited (coalesced) without the caller waiting for it.
    pub fn authorize(&self, request: &AccessRequest) -> Result<Access, Error> {
        let access = self.authorizer.authorize(&self.feeds.flags, request)?;
        self.feeds.metrics().authorize(
            access.denial.as_ref().map(|denial| denial.reason()),
            access
                .fail_mode_applied
                .then(|| self.config.fail_mode.as_str()),
        );
        if let Some(denial) = &access.denial {
            let key = DenialKey::new(&access.tenant_id, &access.subject, denial);
            let admitted = self.denials.admit(key, || {
                crate::auth::denial_record(&access, denial, &request.resource)
            });
            // Logged like it is audited: a line per window, its count when the window closes.
            if admitted == Admitted::Opened {
                tracing::info!(
                    tenant = %access.tenant_id,
                    subject = %access.subject,
                    reason = denial.reason(),
                    resource = %request.resource,
                    "access denied"
                );
            }
        }
        Ok(access)
    }
}

/// Refuses a tree larger than the log, whose proofs would name records that do not exist yet,
/// or than the stored tree (records a replica of an older version appended are built at the
/// next checkpoint round).
fn within_log(tx: &mut dyn crate::store::StoreTx, tree_size: u64) -> Result<(), Error> {
    let reach = tx.audit_tree_reach()?;
    if tree_size > reach.records {
        return Err(Error::OutOfRange(format!(
            "the audit log holds {} records, fewer than the tree size {tree_size} asked for",
            reach.records
        )));
    }
    if tree_size > reach.built {
        return Err(Error::OutOfRange(format!(
            "the audit Merkle tree covers the first {} records so far, fewer than the tree size {tree_size} asked for; the rest are added at the next checkpoint or restart",
            reach.built
        )));
    }
    Ok(())
}
