//! gRPC adapters: proto ↔ domain, and domain errors → statuses with problems. No logic of
//! their own beyond validating what arrives.

pub mod audit;
pub mod auth;
pub mod flags;
pub mod tenants;
pub mod webhook;

use std::sync::Arc;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::sync::{broadcast, watch};

use crate::audit::{AuditRecord, ChainHead};
use crate::auth::{DenialCoalescer, FailModeCounter, TokenVerifier};
use crate::config::Config;
use crate::flags::FlagCache;
use crate::problem::Error;
use crate::store::{CommitListener, Committed, Store};

/// How many audit records a slow `Tail` stream may lag before it is told to resume.
const AUDIT_FEED_BUFFER: usize = 4096;

/// Where committed changes go: the flag cache (and its watchers) and the audit feed.
pub struct Feeds {
    pub flags: Arc<FlagCache>,
    pub audit: broadcast::Sender<Arc<AuditRecord>>,
    /// The newest committed audit record.
    audit_head: std::sync::Mutex<ChainHead>,
}

impl Feeds {
    pub fn new(flags: Arc<FlagCache>) -> Self {
        Self {
            flags,
            audit: broadcast::channel(AUDIT_FEED_BUFFER).0,
            audit_head: std::sync::Mutex::new(ChainHead::GENESIS),
        }
    }

    pub fn audit_head(&self) -> ChainHead {
        self.audit_head
            .lock()
            .map(|head| *head)
            .unwrap_or(ChainHead::GENESIS)
    }

    /// Starts from the stored head, so checkpoints and tails begin where the store is.
    pub fn set_audit_head(&self, head: ChainHead) {
        if let Ok(mut current) = self.audit_head.lock() {
            *current = head;
        }
    }
}

impl CommitListener for Feeds {
    fn committed(&self, changes: Vec<Committed>) {
        for change in changes {
            match change {
                Committed::Flag(record) => self.flags.apply(record),
                Committed::Audit(record) => {
                    self.set_audit_head(ChainHead {
                        seq: record.seq,
                        hash: record.hash,
                    });
                    let _ = self.audit.send(Arc::new(record));
                }
            }
        }
    }
}

pub struct AppState {
    pub config: Config,
    pub store: Store,
    pub feeds: Arc<Feeds>,
    /// Flips to true at shutdown so that streams end and the server can drain.
    pub shutdown: watch::Receiver<bool>,
    pub deny_coalescer: DenialCoalescer,
    pub fail_mode_decisions: FailModeCounter,
}

impl AppState {
    pub fn tokens(&self) -> &TokenVerifier {
        &self.config.tokens
    }
}

pub type SharedState = Arc<AppState>;

impl AppState {
    pub fn status(&self, error: &Error) -> tonic::Status {
        error.to_status(&self.config.problem_type_base)
    }

    /// Admin RPCs need `authorization: Bearer <CORESDK_ADMIN_TOKEN>`; with no token
    /// configured they are refused, except in mock mode where there is nothing to protect.
    /// `require_admin` as a ready status, for handlers.
    pub fn admin_only<T>(&self, request: &tonic::Request<T>) -> Result<(), tonic::Status> {
        self.require_admin(request.metadata())
            .map_err(|e| self.status(&e))
    }

    pub fn require_admin(&self, metadata: &tonic::metadata::MetadataMap) -> Result<(), Error> {
        let Some(expected) = &self.config.admin_token else {
            if self.config.mock {
                return Ok(());
            }
            return Err(Error::PermissionDenied(
                "admin RPCs are disabled: set CORESDK_ADMIN_TOKEN on the sidecar",
            ));
        };
        let presented = metadata
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or(Error::Unauthenticated(
                "admin RPCs need 'authorization: Bearer <admin token>'",
            ))?;
        if tokens_match(presented, expected) {
            Ok(())
        } else {
            Err(Error::Unauthenticated("the admin token is not valid"))
        }
    }
}

/// Comparing digests keeps the comparison constant-time whatever the lengths.
pub fn tokens_match(presented: &str, expected: &str) -> bool {
    Sha256::digest(presented.trim().as_bytes())
        .ct_eq(&Sha256::digest(expected.as_bytes()))
        .into()
}

/// Every RPC but health needs the API token when one is configured; the admin token, which
/// can do more, is accepted too.
pub fn api_token_check(
    api_token: Option<String>,
    admin_token: Option<String>,
    type_base: String,
) -> impl Fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Clone {
    move |request: tonic::Request<()>| {
        let Some(expected) = &api_token else {
            return Ok(request);
        };
        let metadata = request.metadata();
        let bearer = metadata
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let header = metadata
            .get("x-coresdk-api-token")
            .and_then(|v| v.to_str().ok());
        let accepted = bearer.is_some_and(|b| {
            tokens_match(b, expected) || admin_token.as_deref().is_some_and(|a| tokens_match(b, a))
        }) || header.is_some_and(|h| tokens_match(h, expected));
        if accepted {
            Ok(request)
        } else {
            Err(Error::Unauthenticated(
                "this sidecar needs its API token: 'authorization: Bearer <token>' or 'x-coresdk-api-token'",
            )
            .to_status(&type_base))
        }
    }
}

/// The `reason` an admin gives for a change: optional, bounded (it lands in the audit trail).
pub fn validate_reason(reason: &str) -> Result<(), Error> {
    if reason.len() > 1024 {
        return Err(Error::invalid("reason", "is longer than 1024 bytes"));
    }
    Ok(())
}

/// Validation of a required free-text field such as `actor`.
pub fn required_text(field: &'static str, value: &str, max: usize) -> Result<(), Error> {
    if value.trim().is_empty() {
        return Err(Error::invalid(field, "is required"));
    }
    if value.len() > max {
        return Err(Error::invalid(field, format!("is longer than {max} bytes")));
    }
    Ok(())
}

/// A stream that a handler feeds from a task; ends when the task drops its sender.
pub type ResponseStream<T> =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<T, tonic::Status>> + Send>>;
