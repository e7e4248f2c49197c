//! The one domain error type, and its mapping to a gRPC status carrying an RFC 9457 problem.
//!
//! Every variant knows its gRPC code, its HTTP status and a stable reason, so the adapters in
//! `api/` never decide codes themselves (the shape of Quickwit's error-code enum).

use prost::Message as _;
use tonic::Code;

use crate::proto;

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
    #[error("no tenant is mapped for customer '{0}'")]
    UnknownCustomer(String),
    #[error("the event names no customer and no metadata.tenant_id, so no tenant can be resolved")]
    NoTenant,
    #[error("invalid request: {}", describe(.0))]
    InvalidArgument(Vec<FieldViolation>),
    #[error("flag '{key}' is not defined")]
    FlagNotFound { key: String },
    #[error("customer '{0}' has no tenant mapping")]
    CustomerNotFound(String),
    #[error("{0}")]
    Unauthenticated(&'static str),
    #[error("{0}")]
    PermissionDenied(&'static str),
    #[error("the store is unavailable: {0}")]
    StoreUnavailable(String),
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("internal error: {0}")]
    Internal(String),
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

impl Error {
    pub fn invalid(field: &'static str, description: impl Into<String>) -> Self {
        Self::InvalidArgument(vec![FieldViolation::new(field, description)])
    }

    pub fn mapping(&self) -> Mapping {
        use Error::*;
        let m = |code, http_status, slug, title, reason| Mapping {
            code,
            http_status,
            slug,
            title,
            reason,
        };
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
            Internal(_) => m(
                Code::Internal,
                500,
                "internal",
                "Internal error",
                "INTERNAL",
            ),
        }
    }

    /// The RFC 9457 problem for this error; `type_base` is the configured problem type base URI.
    pub fn problem(&self, type_base: &str) -> proto::Problem {
        let mapping = self.mapping();
        let mut extensions = prost_types::Struct::default();
        extensions.fields.insert(
            "reason".to_owned(),
            crate::json::string_value(mapping.reason),
        );
        proto::Problem {
            r#type: format!("{}/{}", type_base.trim_end_matches('/'), mapping.slug),
            title: mapping.title.to_owned(),
            status: i32::from(mapping.http_status),
            detail: self.to_string(),
            instance: String::new(),
            extensions: Some(extensions),
        }
    }

    pub fn to_status(&self, type_base: &str) -> tonic::Status {
        let mapping = self.mapping();
        let problem = self.problem(type_base);
        status_with_problem(mapping.code, mapping.reason, &problem, self.violations())
    }

    fn violations(&self) -> &[FieldViolation] {
        match self {
            Error::InvalidArgument(v) => v,
            _ => &[],
        }
    }
}

pub const ERROR_DOMAIN: &str = "coresdk.dev";

/// Builds a status whose details are a `google.rpc.Status` holding the problem, an `ErrorInfo`
/// and, for field errors, a `BadRequest`. Exposed for problems that are not `Error`s (access
/// decisions that deny by design).
pub fn status_with_problem(
    code: Code,
    reason: &str,
    problem: &proto::Problem,
    violations: &[FieldViolation],
) -> tonic::Status {
    use tonic_types::pb;
    let mut details = vec![
        prost_types::Any {
            type_url: "type.googleapis.com/coresdk.v1.Problem".to_owned(),
            value: problem.encode_to_vec(),
        },
        prost_types::Any {
            type_url: "type.googleapis.com/google.rpc.ErrorInfo".to_owned(),
            value: pb::ErrorInfo {
                reason: reason.to_owned(),
                domain: ERROR_DOMAIN.to_owned(),
                metadata: Default::default(),
            }
            .encode_to_vec(),
        },
    ];
    if !violations.is_empty() {
        details.push(prost_types::Any {
            type_url: "type.googleapis.com/google.rpc.BadRequest".to_owned(),
            value: pb::BadRequest {
                field_violations: violations
                    .iter()
                    .map(|v| pb::bad_request::FieldViolation {
                        field: v.field.to_owned(),
                        description: v.description.clone(),
                        ..Default::default()
                    })
                    .collect(),
            }
            .encode_to_vec(),
        });
    }
    let status = pb::Status {
        code: code as i32,
        message: problem.detail.clone(),
        details,
    };
    tonic::Status::with_details(code, problem.detail.clone(), status.encode_to_vec().into())
}
