use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::{ResponseStream, SharedApp, convert, status};
use crate::audit::{AuditRecord, NewAuditRecord};
use crate::problem::Error;
use crate::proto::{self, audit_service_server::AuditService};
use crate::store::AuditQuery;

pub struct AuditApi {
    pub app: SharedApp,
}

pub const DEFAULT_PAGE_SIZE: u32 = 100;
pub const MAX_PAGE_SIZE: u32 = 1000;
const PAGE_TOKEN_PREFIX: &str = "after:";

fn page_token(after_seq: u64) -> String {
    URL_SAFE_NO_PAD.encode(format!("{PAGE_TOKEN_PREFIX}{after_seq}"))
}

fn parse_page_token(token: &str) -> Result<u64, Error> {
    if token.is_empty() {
        return Ok(0);
    }
    URL_SAFE_NO_PAD
        .decode(token)
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .and_then(|text| text.strip_prefix(PAGE_TOKEN_PREFIX)?.parse().ok())
        .ok_or_else(|| Error::invalid("page_token", "is not a token this server issued"))
}

fn non_empty(s: String) -> Option<String> {
    if s.is_empty() { None } else { Some(s) }
}

/// The longest a call waits for the checkpoint its proof needs, whatever its deadline.
pub const MAX_PROOF_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Until when a call may wait for a checkpoint, taken when the call starts: most of what the
/// shorter of its deadline (`grpc-timeout`) and the sidecar's own request timeout
/// (`server_limit`) leave, so that the answer (the record, with or without its proof) still
/// reaches it and never becomes a REQUEST_TIMEOUT; at most [`MAX_PROOF_WAIT`].
pub fn proof_deadline(
    metadata: &tonic::metadata::MetadataMap,
    server_limit: Option<std::time::Duration>,
) -> tokio::time::Instant {
    tokio::time::Instant::now() + proof_wait(metadata, server_limit)
}

fn proof_wait(
    metadata: &tonic::metadata::MetadataMap,
    server_limit: Option<std::time::Duration>,
) -> std::time::Duration {
    let deadline = metadata
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout);
    [deadline, server_limit]
        .into_iter()
        .flatten()
        .map(|limit| limit.mul_f64(0.8))
        .fold(MAX_PROOF_WAIT, std::time::Duration::min)
}

/// A `grpc-timeout` value: up to 8 digits and a unit (gRPC over HTTP/2).
fn parse_grpc_timeout(value: &str) -> Option<std::time::Duration> {
    use std::time::Duration;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Record `seq`'s inclusion proof against the next checkpoint covering it, for a call that
/// has committed the record: a proof that cannot be had in time is left out (the caller asks
/// GetInclusionProof for it later), never an error, so that a client retrying the error
/// cannot commit the record twice.
pub async fn proof_if_any(
    app: &SharedApp,
    seq: u64,
    until: tokio::time::Instant,
) -> Option<proto::InclusionProof> {
    let wait = until.saturating_duration_since(tokio::time::Instant::now());
    match app.proof_at_next_checkpoint(seq, wait).await {
        Ok(proof) => Some(convert::inclusion_proof(seq, proof)),
        Err(e) => {
            tracing::warn!(
                seq,
                error = %e,
                "answering the committed audit record without its inclusion proof; GetInclusionProof (seq, tree_size 0) serves it once a checkpoint covers it"
            );
            None
        }
    }
}

#[tonic::async_trait]
impl AuditService for AuditApi {
    async fn append(
        &self,
        request: Request<proto::AppendAuditRequest>,
    ) -> Result<Response<proto::AuditRecord>, Status> {
        let app = &self.app;
        let until = proof_deadline(request.metadata(), app.config.limits.request_timeout);
        let request = request.into_inner();
        let include_proof = request.include_proof;
        // Refused before anything is written: a proof that can never come.
        if include_proof {
            app.checkpoints_on()
                .map_err(|e| status::of_error(&e, app.links()))?;
        }
        let metadata = match &request.metadata {
            Some(s) => convert::from_proto_struct(s)
                .map_err(|e| status::of_error(&Error::invalid("metadata", e), app.links()))?,
            None => Default::default(),
        };
        let record = NewAuditRecord {
            tenant_id: request.tenant_id,
            actor: request.actor,
            event: request.event,
            outcome: request.outcome,
            metadata,
        };
        let sealed = app
            .append_audit(record, non_empty(request.idempotency_key))
            .await
            .map_err(|e| status::of_error(&e, app.links()))?;
        let mut answer = convert::audit_record(&sealed);
        if include_proof {
            answer.inclusion_proof = proof_if_any(app, sealed.seq, until).await;
        }
        Ok(Response::new(answer))
    }

    async fn query(
        &self,
        request: Request<proto::QueryAuditRequest>,
    ) -> Result<Response<proto::QueryAuditResponse>, Status> {
        let app = &self.app;
        let request = request.into_inner();
        let after_seq =
            parse_page_token(&request.page_token).map_err(|e| status::of_error(&e, app.links()))?;
        // AIP-158: an oversized page is coerced to the maximum rather than refused.
        let limit = match request.page_size {
            0 => DEFAULT_PAGE_SIZE,
            n => n.min(MAX_PAGE_SIZE),
        };
        let query = AuditQuery {
            tenant_id: non_empty(request.tenant_id),
            event_prefix: non_empty(request.event_prefix),
            outcome: non_empty(request.outcome),
            since_ms: request.since.as_ref().map(convert::ms_from_timestamp),
            until_ms: request.until.as_ref().map(convert::ms_from_timestamp),
            after_seq,
            limit,
            ..Default::default()
        };
        let page = app
            .query_audit(query)
            .await
            .map_err(|e| status::of_error(&e, app.links()))?;
        // AIP-158 allows a short page with a token: the page examined a bounded window.
        let next_page_token = if page.more {
            page_token(page.scanned_through)
        } else {
            String::new()
        };
        Ok(Response::new(proto::QueryAuditResponse {
            records: page.records.iter().map(convert::audit_record).collect(),
            next_page_token,
        }))
    }

    async fn verify(
        &self,
        request: Request<proto::VerifyAuditRequest>,
    ) -> Result<Response<proto::VerifyAuditResponse>, Status> {
        let report = self
            .app
            .verify_audit(request.into_inner().full)
            .await
            .map_err(|e| status::of_error(&e, self.app.links()))?;
        Ok(Response::new(proto::VerifyAuditResponse {
            ok: report.ok,
            records_checked: report.records_checked,
            first_bad_seq: report.first_bad_seq,
            reason: report.reason,
            head_seq: report.head.seq,
            head_hash: hex::encode(report.head.hash),
            warnings: report.warnings,
            checkpoint_size: report.checkpoint_size,
            tree_root: report.tree_root.map(hex::encode).unwrap_or_default(),
        }))
    }

    async fn get_checkpoint(
        &self,
        _request: Request<proto::GetCheckpointRequest>,
    ) -> Result<Response<proto::GetCheckpointResponse>, Status> {
        let note = self
            .app
            .newest_checkpoint()
            .await
            .map_err(|e| status::of_error(&e, self.app.links()))?;
        Ok(Response::new(proto::GetCheckpointResponse {
            note: note.note,
        }))
    }

    async fn get_inclusion_proof(
        &self,
        request: Request<proto::GetInclusionProofRequest>,
    ) -> Result<Response<proto::InclusionProof>, Status> {
        let request = request.into_inner();
        let proof = self
            .app
            .inclusion_proof(request.seq, request.tree_size)
            .await
            .map_err(|e| status::of_error(&e, self.app.links()))?;
        Ok(Response::new(convert::inclusion_proof(request.seq, proof)))
    }

    async fn get_consistency_proof(
        &self,
        request: Request<proto::GetConsistencyProofRequest>,
    ) -> Result<Response<proto::GetConsistencyProofResponse>, Status> {
        let request = request.into_inner();
        let proof = self
            .app
            .consistency_proof(request.from_size, request.to_size)
            .await
            .map_err(|e| status::of_error(&e, self.app.links()))?;
        Ok(Response::new(proto::GetConsistencyProofResponse {
            hashes: convert::hashes(&proof.hashes),
            from_size: request.from_size,
            to_size: proof.tree_size,
        }))
    }

    async fn add_cosignatures(
        &self,
        request: Request<proto::AddCosignaturesRequest>,
    ) -> Result<Response<proto::GetCheckpointResponse>, Status> {
        let (metadata, _, request) = request.into_parts();
        let note = self
            .app
            .add_cosignatures(super::bearer(&metadata), request.note)
            .await
            .map_err(|e| status::of_error(&e, self.app.links()))?;
        Ok(Response::new(proto::GetCheckpointResponse {
            note: note.note,
        }))
    }

    type TailStream = ResponseStream<proto::AuditRecord>;

    async fn tail(
        &self,
        request: Request<proto::TailAuditRequest>,
    ) -> Result<Response<Self::TailStream>, Status> {
        let request = request.into_inner();
        crate::ops::validate_optional_id("tenant_id", &request.tenant_id)
            .map_err(|e| status::of_error(&e, self.app.links()))?;
        let slot = self
            .app
            .open_stream()
            .map_err(|e| status::of_error(&e, self.app.links()))?;
        let (sender, receiver) = mpsc::channel(256);
        let app = self.app.clone();
        tokio::spawn(async move {
            tail(app, request, sender).await;
            drop(slot);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }
}

type TailSender = mpsc::Sender<Result<proto::AuditRecord, Status>>;

/// Sends stored records after `after_seq` page by page; returns the last sequence it
/// considered (sent, or filtered out), or None when the client went away.
async fn catch_up(
    app: &SharedApp,
    tenant: &Option<String>,
    mut after_seq: u64,
    sender: &TailSender,
) -> Option<u64> {
    loop {
        let query = AuditQuery {
            tenant_id: tenant.clone(),
            after_seq,
            limit: MAX_PAGE_SIZE,
            ..Default::default()
        };
        // A client that leaves while a page is read drops the read with it.
        let page = tokio::select! {
            page = app.query_audit(query) => page,
            () = sender.closed() => return None,
        };
        let page = match page {
            Ok(page) => page,
            Err(e) => {
                let _ = sender.send(Err(status::of_error(&e, app.links()))).await;
                return None;
            }
        };
        for record in &page.records {
            sender.send(Ok(convert::audit_record(record))).await.ok()?;
        }
        after_seq = page.scanned_through;
        if !page.more {
            return Some(after_seq);
        }
    }
}

/// Subscribes first, then replays what is stored, then follows the feed, skipping what the
/// replay already sent; a lagging client is caught up from the store again. Ends as soon as
/// the client goes away, like `WatchFlags`.
async fn tail(app: SharedApp, request: proto::TailAuditRequest, sender: TailSender) {
    let tenant = non_empty(request.tenant_id);
    let mut shutdown = app.shutdown.clone();
    let mut feed: broadcast::Receiver<Arc<AuditRecord>> = app.feeds.audit.subscribe();
    let mut last_sent = if request.from_seq > 0 {
        match catch_up(&app, &tenant, request.from_seq - 1, &sender).await {
            Some(last) => last,
            None => return,
        }
    } else {
        app.feeds.audit_head().seq
    };
    loop {
        let next = tokio::select! {
            next = feed.recv() => next,
            () = sender.closed() => return,
            _ = shutdown.changed() => return,
        };
        match next {
            Ok(record) => {
                if record.seq <= last_sent
                    || tenant.as_ref().is_some_and(|t| &record.tenant_id != t)
                {
                    continue;
                }
                last_sent = record.seq;
                if sender
                    .send(Ok(convert::audit_record(&record)))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            Err(broadcast::error::RecvError::Lagged(_)) => {
                match catch_up(&app, &tenant, last_sent, &sender).await {
                    Some(last) => last_sent = last,
                    None => return,
                }
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}
