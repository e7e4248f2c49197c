//! The one mapping from what went wrong (a domain [`Error`]) or what an access decision refused
//! (a [`Denial`]) to an RFC 9457 [`Problem`], its HTTP status, its gRPC code and a stable reason.
//!
//! Every variant knows its code, its status and its reason, so adapters never decide them
//! (the shape of Quickwit's error-code enum); `api::status` only encodes what this decides.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};
use tonic::Code;

/// An error and every error behind it, outermost first: a client's own message ("error
/// connecting to server", "transport error") says what failed, only its sources say why.
pub fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let said = cause.to_string();
        // Some errors repeat their source in their own message.
        if !text.contains(&said) {
            text.push_str(": ");
            text.push_str(&said);
        }
        source = cause.source();
    }
    text
}

/// How many characters of a caller's input a problem quotes. Problems travel in response
/// headers (`grpc-status-details-bin`), which clients cap at 8-16 KiB: echoing input whole
/// would turn a clear refusal into `RESOURCE_EXHAUSTED` at the client.
pub const MAX_QUOTED_CHARS: usize = 64;

/// Input as a problem (or an audit record of one) may quote it: at most
/// [`MAX_QUOTED_CHARS`] characters, with `…` marking a cut.
pub fn quoted(input: &str) -> String {
    match input.char_indices().nth(MAX_QUOTED_CHARS) {
        Some((cut, _)) => format!("{}…", &input[..cut]),
        None => input.to_owned(),
    }
}

/// Where problem documents point and which links they carry.
#[derive(Debug, Clone)]
pub struct ProblemLinks {
    pub type_base: String,
    pub billing_url: Option<String>,
    pub upgrade_url: Option<String>,
}

/// An RFC 9457 problem document, ready to be returned as `application/problem+json`.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    pub type_uri: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    pub instance: String,
    /// Always holds `reason`; denials add what the caller needs to act (links, flag, tenant).
    pub extensions: Map<String, Value>,
}

impl Problem {
    fn new(links: &ProblemLinks, mapping: &Mapping, detail: String, instance: &str) -> Self {
        let mut extensions = Map::new();
        extensions.insert("reason".into(), json!(mapping.reason));
        Self {
            type_uri: format!("{}/{}", links.type_base.trim_end_matches('/'), mapping.slug),
            title: mapping.title.to_owned(),
            status: mapping.http_status,
            detail,
            instance: instance.to_owned(),
            extensions,
        }
    }

    fn extend(&mut self, key: &str, value: &str) {
        self.extensions.insert(key.to_owned(), json!(value));
    }
}

/// A request field that failed validation, reported as a `google.rpc.BadRequest` violation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    pub field: &'static str,
    pub description: String,
}

impl FieldViolation {
    pub fn new(field: &'static str, description: impl Into<String>) -> Self {
        Self {
            field,
            description: description.into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the Stripe-Signature header is missing or empty")]
    SignatureMissing,
    #[error("the Stripe-Signature header is malformed: {0}")]
    SignatureMalformed(&'static str),
    #[error("the Stripe-Signature header carries no v1 signature")]
    SignatureNoV1,
    #[error(
        "the signature timestamp is {skew_s} s away from now, outside the {tolerance_s} s tolerance (replay or clock skew)"
    )]
    SignatureTimestampOutOfTolerance { skew_s: i64, tolerance_s: u64 },
    #[error("no v1 signature matches any configured webhook secret")]
    SignatureMismatch,
    #[error(
        "no webhook secret is configured (set STRIPE_WEBHOOK_SECRET or STRIPE_WEBHOOK_SECRET_FILE)"
    )]
    WebhookSecretMissing,
    #[error("the payload is {size} bytes, over the {limit}-byte limit")]
    PayloadTooLarge { size: usize, limit: usize },
    #[error("the verified payload is not a Stripe event: {0}")]
    NotAStripeEvent(String),
    #[error("no tenant is mapped for customer '{}'", quoted(.0))]
    UnknownCustomer(String),
    #[error("the event names no customer and no metadata.tenant_id, so no tenant can be resolved")]
    NoTenant,
    #[error("invalid request: {}", describe(.0))]
    InvalidArgument(Vec<FieldViolation>),
    #[error("flag '{}' is not defined", quoted(key))]
    FlagNotFound { key: String },
    #[error("customer '{}' has no tenant mapping", quoted(.0))]
    CustomerNotFound(String),
    #[error(
        "idempotency key '{}' was already used for a different record of this tenant; use a fresh key for a new record",
        quoted(key)
    )]
    IdempotencyKeyReused { key: String },
    #[error("{0}")]
    Unauthenticated(&'static str),
    #[error("{0}")]
    PermissionDenied(&'static str),
    #[error("the store is unavailable: {0}")]
    StoreUnavailable(String),
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error(
        "this sidecar serves at most {limit} streams (WatchFlags, Tail) at once and all are open; close one or raise CORESDK_MAX_STREAMS"
    )]
    TooManyStreams { limit: usize },
    #[error(
        "this connection already has as many calls running as one connection may have ({limit}, CORESDK_MAX_CONCURRENT_PER_CONNECTION); the call was not started: retry when one has answered, or spread calls over more connections"
    )]
    TooManyCallsOnConnection { limit: usize },
    #[error(
        "the call ran longer than this sidecar's {} s request timeout (CORESDK_REQUEST_TIMEOUT_S) and was stopped; it may or may not have taken effect, so retry only what is safe to repeat",
        limit.as_secs_f64()
    )]
    RequestTimeout { limit: Duration },
    /// A tree size or record the log does not hold (yet).
    #[error("{0}")]
    OutOfRange(String),
    /// No signed checkpoint exists yet, or checkpoints are off.
    #[error("{0}")]
    CheckpointNotFound(String),
    /// What needs signed checkpoints, with none kept.
    #[error("{}, so it cannot answer this", crate::checkpoint::CHECKPOINTS_OFF)]
    CheckpointsOff,
    /// No proof against a signed checkpoint can be had: none covering the record was signed in
    /// time, signing fails, or the stored tree is no longer the signed one. Never answered
    /// for a call that committed a record (it answers the record without its proof).
    #[error("{0}")]
    CheckpointUnavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
}

/// A `urn:coresdk:error:` id unique to this failure: the process's start time and id tell
/// replicas and restarts apart, a counter tells this process's failures apart.
fn incident_instance() -> String {
    use std::sync::LazyLock;
    use std::sync::atomic::{AtomicU64, Ordering};
    static PROCESS: LazyLock<String> =
        LazyLock::new(|| format!("{:x}-{:x}", crate::time::now_ms(), std::process::id()));
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("urn:coresdk:error:{}-{n}", *PROCESS)
}

/// A hung database fails every request at once: a log line each would flood the log. So the
/// first failure per second is logged at `error`, with how many were not since the previous
/// such line; those are logged at `debug`, each with its incident id, so every id a caller
/// quotes can still be found (with debug logging on) and the error log stays bounded.
static INCIDENT_LOG: Throttle = Throttle::new(Duration::from_secs(1));

/// Lets one event per interval through and counts the others.
pub(crate) struct Throttle {
    every: Duration,
    state: Mutex<ThrottleState>,
}

struct ThrottleState {
    last: Option<Instant>,
    held_back: u64,
}

impl Throttle {
    pub(crate) const fn new(every: Duration) -> Self {
        Self {
            every,
            state: Mutex::new(ThrottleState {
                last: None,
                held_back: 0,
            }),
        }
    }

    /// `Some(events held back since the last one let through)` if this one goes through.
    pub(crate) fn admit(&self, now: Instant) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if state
            .last
            .is_some_and(|last| now.saturating_duration_since(last) < self.every)
        {
            state.held_back += 1;
            return None;
        }
        state.last = Some(now);
        Some(std::mem::take(&mut state.held_back))
    }
}

fn describe(violations: &[FieldViolation]) -> String {
    violations
        .iter()
        .map(|v| format!("{}: {}", v.field, v.description))
        .collect::<Vec<_>>()
        .join("; ")
}

/// What a variant maps to on the wire.
pub struct Mapping {
    pub code: Code,
    pub http_status: u16,
    /// Last segment of the problem `type` URI.
    pub slug: &'static str,
    pub title: &'static str,
    /// Stable `google.rpc.ErrorInfo.reason`.
    pub reason: &'static str,
}

impl Mapping {
    const fn new(
        code: Code,
        http_status: u16,
        slug: &'static str,
        title: &'static str,
        reason: &'static str,
    ) -> Self {
        Self {
            code,
            http_status,
            slug,
            title,
            reason,
        }
    }
}

impl Error {
    pub fn invalid(field: &'static str, description: impl Into<String>) -> Self {
        Self::InvalidArgument(vec![FieldViolation::new(field, description)])
    }

    pub fn mapping(&self) -> Mapping {
        use Error::*;
        let m = Mapping::new;
        match self {
            SignatureMissing => m(
                Code::Unauthenticated,
                400,
                "invalid-signature",
                "Invalid webhook signature",
                "SIGNATURE_MISSING",
            ),
            SignatureMalformed(_) | SignatureNoV1 => m(
                Code::Unauthenticated,
                400,
                "invalid-signature",
                "Invalid webhook signature",
                "SIGNATURE_MALFORMED",
            ),
            SignatureTimestampOutOfTolerance { .. } => m(
                Code::Unauthenticated,
                400,
                "invalid-signature",
                "Invalid webhook signature",
                "SIGNATURE_TIMESTAMP_OUT_OF_TOLERANCE",
            ),
            SignatureMismatch => m(
                Code::Unauthenticated,
                400,
                "invalid-signature",
                "Invalid webhook signature",
                "SIGNATURE_MISMATCH",
            ),
            WebhookSecretMissing => m(
                Code::FailedPrecondition,
                503,
                "webhook-secret-missing",
                "Webhook verification is not configured",
                "WEBHOOK_SECRET_MISSING",
            ),
            PayloadTooLarge { .. } => m(
                Code::InvalidArgument,
                413,
                "payload-too-large",
                "Payload too large",
                "PAYLOAD_TOO_LARGE",
            ),
            NotAStripeEvent(_) => m(
                Code::InvalidArgument,
                400,
                "invalid-event",
                "Not a Stripe event",
                "INVALID_EVENT",
            ),
            UnknownCustomer(_) | NoTenant => m(
                Code::FailedPrecondition,
                422,
                "unknown-customer",
                "Unknown customer",
                "UNKNOWN_CUSTOMER",
            ),
            InvalidArgument(_) => m(
                Code::InvalidArgument,
                400,
                "invalid-request",
                "Invalid request",
                "INVALID_ARGUMENT",
            ),
            FlagNotFound { .. } => m(
                Code::NotFound,
                404,
                "flag-not-found",
                "Flag not found",
                "FLAG_NOT_FOUND",
            ),
            CustomerNotFound(_) => m(
                Code::NotFound,
                404,
                "customer-not-found",
                "Customer not mapped",
                "CUSTOMER_NOT_FOUND",
            ),
            // The IETF Idempotency-Key draft's answer to a key reused with another payload.
            IdempotencyKeyReused { .. } => m(
                Code::FailedPrecondition,
                422,
                "idempotency-key-reused",
                "Idempotency key reused",
                "IDEMPOTENCY_KEY_REUSED",
            ),
            Unauthenticated(_) => m(
                Code::Unauthenticated,
                401,
                "unauthenticated",
                "Unauthenticated",
                "UNAUTHENTICATED",
            ),
            PermissionDenied(_) => m(
                Code::PermissionDenied,
                403,
                "forbidden",
                "Forbidden",
                "PERMISSION_DENIED",
            ),
            StoreUnavailable(_) => m(
                Code::Unavailable,
                503,
                "store-unavailable",
                "Store unavailable",
                "STORE_UNAVAILABLE",
            ),
            ShuttingDown => m(
                Code::Unavailable,
                503,
                "shutting-down",
                "Shutting down",
                "SHUTTING_DOWN",
            ),
            TooManyStreams { .. } => m(
                Code::ResourceExhausted,
                429,
                "too-many-streams",
                "Too many streams",
                "TOO_MANY_STREAMS",
            ),
            TooManyCallsOnConnection { .. } => m(
                Code::ResourceExhausted,
                429,
                "too-many-calls-on-connection",
                "Too many calls on one connection",
                "TOO_MANY_CALLS_ON_CONNECTION",
            ),
            RequestTimeout { .. } => m(
                Code::DeadlineExceeded,
                504,
                "request-timeout",
                "Request timed out",
                "REQUEST_TIMEOUT",
            ),
            OutOfRange(_) => m(
                Code::OutOfRange,
                400,
                "out-of-range",
                "Out of range",
                "OUT_OF_RANGE",
            ),
            CheckpointNotFound(_) => m(
                Code::NotFound,
                404,
                "checkpoint-not-found",
                "Checkpoint not found",
                "CHECKPOINT_NOT_FOUND",
            ),
            CheckpointsOff => m(
                Code::FailedPrecondition,
                503,
                "checkpoints-off",
                "Checkpoints are off",
                "CHECKPOINTS_OFF",
            ),
            // Permanent until an operator acts (a cut or rewritten log): clients must not retry it.
            CheckpointUnavailable(_) => m(
                Code::FailedPrecondition,
                409,
                "checkpoint-unavailable",
                "Checkpoint unavailable",
                "CHECKPOINT_UNAVAILABLE",
            ),
            Internal(_) => m(
                Code::Internal,
                500,
                "internal",
                "Internal error",
                "INTERNAL",
            ),
        }
    }

    /// The RFC 9457 problem for this error. A store or internal failure's own text (SQLite and
    /// PostgreSQL messages can name tables, paths and row values) goes to the log under an
    /// incident id; the problem only says what the caller can do, with that id as `instance`.
    ///
    /// With traces on, every problem made inside a call has that call's trace as `instance`
    /// (see [`crate::telemetry::current_instance`]), an incident included, so what a caller
    /// quotes leads to the trace and to the log line alike.
    pub fn problem(&self, links: &ProblemLinks) -> Problem {
        let mapping = self.mapping();
        let traced = crate::telemetry::current_instance();
        let public_detail = match self {
            Error::StoreUnavailable(_) => "the store is unavailable; retry later",
            Error::Internal(_) => "the sidecar failed to handle the request",
            _ => {
                let instance = traced.unwrap_or_default();
                return Problem::new(links, &mapping, self.to_string(), &instance);
            }
        };
        let instance = traced.unwrap_or_else(incident_instance);
        match INCIDENT_LOG.admit(Instant::now()) {
            Some(0) => tracing::error!(
                instance = %instance,
                reason = mapping.reason,
                error = %self,
                "request failed"
            ),
            Some(suppressed) => tracing::error!(
                instance = %instance,
                reason = mapping.reason,
                error = %self,
                suppressed,
                "request failed ({suppressed} more failures since the last such line are logged at debug)"
            ),
            None => {
                tracing::debug!(instance = %instance, reason = mapping.reason, error = %self, "request failed")
            }
        }
        Problem::new(links, &mapping, public_detail.to_owned(), &instance)
    }

    /// Field violations, for a `BadRequest` beside the problem.
    pub fn violations(&self) -> &[FieldViolation] {
        match self {
            Error::InvalidArgument(v) => v,
            _ => &[],
        }
    }
}

/// Why an access decision said no. A denial is an answer, not a failure: it travels as the
/// problem of an `Authorize` response, and becomes an error status only for `VerifyToken`.
#[derive(Debug, Clone, PartialEq)]
pub enum Denial {
    /// 401: no usable identity.
    Unauthenticated(String),
    /// 402: a billing flag says no (e.g. `paywall_active`).
    PaymentRequired { flag: String },
    /// 403: a required feature is off.
    FeatureLocked { feature: String },
    /// 403: the token belongs to another tenant than the one asked about.
    WrongTenant,
    /// 503: flags unavailable and fail mode `closed`.
    Unavailable,
}

impl Denial {
    pub fn mapping(&self) -> Mapping {
        let m = Mapping::new;
        match self {
            Denial::Unauthenticated(_) => m(
                Code::Unauthenticated,
                401,
                "unauthenticated",
                "Unauthenticated",
                "UNAUTHENTICATED",
            ),
            Denial::PaymentRequired { .. } => m(
                Code::PermissionDenied,
                402,
                "payment-required",
                "Payment Required",
                "PAYMENT_REQUIRED",
            ),
            Denial::FeatureLocked { .. } => m(
                Code::PermissionDenied,
                403,
                "feature-locked",
                "Feature Unavailable",
                "FEATURE_LOCKED",
            ),
            Denial::WrongTenant => m(
                Code::PermissionDenied,
                403,
                "wrong-tenant",
                "Forbidden",
                "WRONG_TENANT",
            ),
            Denial::Unavailable => m(
                Code::Unavailable,
                503,
                "decision-unavailable",
                "Service Unavailable",
                "DECISION_UNAVAILABLE",
            ),
        }
    }

    pub fn reason(&self) -> &'static str {
        self.mapping().reason
    }

    /// The flag a denial names, if any (for coalescing and the audit record).
    pub fn feature(&self) -> &str {
        match self {
            Denial::PaymentRequired { flag } => flag,
            Denial::FeatureLocked { feature } => feature,
            _ => "",
        }
    }

    fn detail(&self) -> String {
        match self {
            Denial::Unauthenticated(why) => format!("The bearer token was not accepted: {why}."),
            Denial::PaymentRequired { .. } => {
                "The subscription has a payment problem. Update billing to continue.".to_owned()
            }
            Denial::FeatureLocked { feature } => {
                format!("The '{feature}' feature is not included in this subscription.")
            }
            Denial::WrongTenant => "The token belongs to a different tenant.".to_owned(),
            Denial::Unavailable => {
                "Access could not be decided because feature flags are unavailable.".to_owned()
            }
        }
    }

    /// The problem to return for this denial of `tenant`'s request for `instance`.
    ///
    /// The caller's resource stays the `instance` (the app returns this problem to its own
    /// user); with traces on, the call's trace goes into a `trace` member, and into `instance`
    /// too when the caller named no resource.
    pub fn problem(&self, links: &ProblemLinks, tenant: &str, instance: &str) -> Problem {
        let traced = crate::telemetry::current_instance();
        let instance = match &traced {
            Some(trace) if instance.is_empty() => trace,
            _ => instance,
        };
        let mut problem = Problem::new(links, &self.mapping(), self.detail(), instance);
        if let Some(trace) = &traced {
            problem.extend("trace", trace);
        }
        if !tenant.is_empty() {
            problem.extend("tenant_id", tenant);
        }
        match self {
            Denial::PaymentRequired { flag } => {
                if let Some(url) = &links.billing_url {
                    problem.extend("billing_url", url);
                }
                problem.extend("flag", flag);
            }
            Denial::FeatureLocked { feature } => {
                if let Some(url) = &links.upgrade_url {
                    problem.extend("upgrade_url", url);
                }
                problem.extend("feature", feature);
            }
            _ => {}
        }
        problem
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn links() -> ProblemLinks {
        ProblemLinks {
            type_base: "https://securepay.example/errors/".into(),
            billing_url: Some("https://securepay.example/billing".into()),
            upgrade_url: Some("https://securepay.example/pricing".into()),
        }
    }

    #[test]
    fn errors_become_problems_with_their_reason() {
        let problem = Error::StoreUnavailable("disk".into()).problem(&links());
        assert_eq!(
            problem.type_uri,
            "https://securepay.example/errors/store-unavailable"
        );
        assert_eq!(
            (problem.status, problem.title.as_str()),
            (503, "Store unavailable")
        );
        assert_eq!(problem.extensions["reason"], "STORE_UNAVAILABLE");
        let invalid = Error::invalid("tenant_id", "is required");
        assert_eq!(invalid.mapping().code, Code::InvalidArgument);
        assert_eq!(invalid.violations().len(), 1);
    }

    #[test]
    fn store_and_internal_failures_show_a_generic_detail_and_an_incident_id() {
        for error in [
            Error::StoreUnavailable("no such table: customer_tenants (in /var/lib/x.db)".into()),
            Error::Internal("canonical encoding: key must be a string".into()),
        ] {
            let first = error.problem(&links());
            let second = error.problem(&links());
            assert!(
                !first.detail.contains("customer_tenants"),
                "{}",
                first.detail
            );
            assert!(!first.detail.contains("canonical"), "{}", first.detail);
            assert!(
                first.instance.starts_with("urn:coresdk:error:"),
                "{}",
                first.instance
            );
            assert_ne!(
                first.instance, second.instance,
                "each failure has its own id"
            );
        }
        let retry = Error::StoreUnavailable("disk I/O error".into());
        assert_eq!(
            retry.problem(&links()).detail,
            "the store is unavailable; retry later"
        );
        assert_eq!(retry.mapping().code, Code::Unavailable, "still retryable");
    }

    #[test]
    fn failures_log_at_error_once_per_interval_and_count_the_rest() {
        let throttle = Throttle::new(Duration::from_secs(1));
        let start = Instant::now();
        assert_eq!(throttle.admit(start), Some(0));
        for ms in 1..400 {
            assert_eq!(throttle.admit(start + Duration::from_millis(ms)), None);
        }
        let later = start + Duration::from_millis(1000);
        assert_eq!(
            throttle.admit(later),
            Some(399),
            "the next line says how many it held"
        );
        assert_eq!(throttle.admit(later), None);
        assert_eq!(throttle.admit(later + Duration::from_secs(5)), Some(1));
    }

    #[test]
    fn quoted_input_is_cut_short() {
        assert_eq!(quoted("cus_123"), "cus_123");
        let exact = "é".repeat(MAX_QUOTED_CHARS);
        assert_eq!(quoted(&exact), exact);
        let long = "é".repeat(100_000);
        assert_eq!(quoted(&long), format!("{}…", "é".repeat(MAX_QUOTED_CHARS)));
        for error in [
            Error::UnknownCustomer(long.clone()),
            Error::CustomerNotFound(long.clone()),
            Error::FlagNotFound { key: long.clone() },
        ] {
            let detail = error.problem(&links()).detail;
            assert!(detail.chars().count() < MAX_QUOTED_CHARS + 64, "{detail}");
            assert!(detail.contains('…'), "{detail}");
        }
    }

    #[test]
    fn denials_carry_the_configured_links() {
        let paywall = Denial::PaymentRequired {
            flag: "paywall_active".into(),
        }
        .problem(&links(), "globex", "/api/dashboard");
        assert_eq!(paywall.status, 402);
        assert_eq!(
            paywall.type_uri,
            "https://securepay.example/errors/payment-required"
        );
        assert_eq!(paywall.instance, "/api/dashboard");
        assert_eq!(
            paywall.extensions["billing_url"],
            "https://securepay.example/billing"
        );
        assert_eq!(paywall.extensions["tenant_id"], "globex");
        let locked = Denial::FeatureLocked {
            feature: "advanced_analytics".into(),
        }
        .problem(&links(), "acme", "");
        assert_eq!(
            (locked.status, locked.title.as_str()),
            (403, "Feature Unavailable")
        );
        assert!(locked.extensions.contains_key("upgrade_url"));
        assert_eq!(locked.extensions["reason"], "FEATURE_LOCKED");
    }
}
