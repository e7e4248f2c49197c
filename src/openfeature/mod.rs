//! OpenFeature adapters over the in-memory flag cache: flagd's evaluation protocol
//! (`flagd.evaluation.v1` and `v2`), its sync protocol (`flagd.sync.v1`) and OFREP. Like `api`,
//! they decode, read and encode; the decisions (which tenant, which reason, which error) live
//! here, in [`tenant_of`] and [`resolve`].

pub mod evaluation;
pub mod events;
pub mod ofrep;
pub mod sync;

use prost_types::{Struct, value::Kind};
use serde_json::Value as Json;
use tonic::{Code, Status};

use crate::api::ResponseStream;
use crate::flags::{Flag, FlagCache, FlagValue};

/// flagd's resolution reasons. `STATIC` is never used: the RPC providers cache answers with
/// it until a configuration change, and a tenant's value is not static.
pub const TARGETING_MATCH: &str = "TARGETING_MATCH";
pub const DEFAULT: &str = "DEFAULT";
/// Variant names: the value is the tenant's own, or the catalog default.
pub const TENANT_VARIANT: &str = "tenant";
pub const DEFAULT_VARIANT: &str = "default";

/// Why an evaluation has no value, with the OpenFeature error code each protocol reports.
#[derive(Debug, thiserror::Error)]
pub enum EvaluationError {
    #[error("flag '{}' is not in the catalog", crate::problem::quoted(.key))]
    FlagNotFound { key: String },
    #[error("flag {key:?} is not a {wanted}")]
    TypeMismatch { key: String, wanted: &'static str },
    #[error("{0}")]
    InvalidContext(String),
}

impl EvaluationError {
    /// OpenFeature's error code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::FlagNotFound { .. } => "FLAG_NOT_FOUND",
            Self::TypeMismatch { .. } => "TYPE_MISMATCH",
            Self::InvalidContext(_) => "INVALID_CONTEXT",
        }
    }

    /// The gRPC code flagd's providers map back to [`Self::code`].
    pub fn grpc_code(&self) -> Code {
        match self {
            Self::FlagNotFound { .. } => Code::NotFound,
            Self::TypeMismatch { .. } | Self::InvalidContext(_) => Code::InvalidArgument,
        }
    }

    /// The HTTP status OFREP answers it with.
    pub fn http_status(&self) -> axum::http::StatusCode {
        use axum::http::StatusCode;
        match self {
            Self::FlagNotFound { .. } => StatusCode::NOT_FOUND,
            Self::TypeMismatch { .. } | Self::InvalidContext(_) => StatusCode::BAD_REQUEST,
        }
    }
}

/// flagd's error answers: the gRPC code its providers map to an OpenFeature error code, and
/// flagd's message shape (`FlagdError:, <CODE>`).
impl From<EvaluationError> for Status {
    fn from(error: EvaluationError) -> Self {
        Status::new(
            error.grpc_code(),
            format!("FlagdError:, {}: {error}", error.code()),
        )
    }
}

fn type_mismatch(key: &str, wanted: &'static str) -> EvaluationError {
    EvaluationError::TypeMismatch {
        key: key.to_owned(),
        wanted,
    }
}

/// An evaluation-context attribute, as tenant selection reads it.
pub enum Attribute<'a> {
    Absent,
    Text(&'a str),
    Other,
}

/// An evaluation context as a protocol carries it: flagd's protobuf `Struct`, OFREP's JSON.
pub trait EvaluationContext {
    fn attribute(&self, name: &str) -> Attribute<'_>;
}

impl EvaluationContext for Struct {
    fn attribute(&self, name: &str) -> Attribute<'_> {
        match self.fields.get(name).and_then(|v| v.kind.as_ref()) {
            None | Some(Kind::NullValue(_)) => Attribute::Absent,
            Some(Kind::StringValue(s)) => Attribute::Text(s),
            Some(_) => Attribute::Other,
        }
    }
}

impl EvaluationContext for serde_json::Map<String, Json> {
    fn attribute(&self, name: &str) -> Attribute<'_> {
        match self.get(name) {
            None | Some(Json::Null) => Attribute::Absent,
            Some(Json::String(s)) => Attribute::Text(s),
            Some(_) => Attribute::Other,
        }
    }
}

/// OpenFeature's name for the evaluated subject's key.
pub const TARGETING_KEY: &str = "targetingKey";

/// The tenant an evaluation context names: its `attribute`, which must then be a valid tenant
/// id, else its `targetingKey` when that is one; `None` when it names none.
pub fn tenant_of<C: EvaluationContext>(
    context: Option<&C>,
    attribute: &str,
) -> Result<Option<String>, EvaluationError> {
    use crate::ops::{IdDefect, id_defect};
    let Some(context) = context else {
        return Ok(None);
    };
    match context.attribute(attribute) {
        Attribute::Text(tenant) => match id_defect(tenant) {
            None => return Ok(Some(tenant.to_owned())),
            Some(IdDefect::Empty) => {}
            Some(defect) => {
                return Err(EvaluationError::InvalidContext(format!(
                    "{attribute} {defect}"
                )));
            }
        },
        Attribute::Absent => {}
        Attribute::Other => {
            return Err(EvaluationError::InvalidContext(format!(
                "{attribute} must be a string naming the tenant"
            )));
        }
    }
    // The targetingKey is the application's key for whoever is evaluated, often a user (an
    // email, a name): it names a tenant only when it could be one, and otherwise names none.
    match context.attribute(TARGETING_KEY) {
        Attribute::Text(key) if id_defect(key).is_none() => Ok(Some(key.to_owned())),
        _ => Ok(None),
    }
}

/// A flag's value for the tenant, with flagd's reason and variant.
pub struct Resolved {
    pub value: FlagValue,
    pub reason: &'static str,
    pub variant: &'static str,
}

/// Reads the cache only: no I/O on the evaluation path.
pub fn resolve(
    cache: &FlagCache,
    tenant: Option<&str>,
    key: &str,
) -> Result<Resolved, EvaluationError> {
    // No tenant reads the catalog default: the empty id is never a tenant's.
    let flag = cache
        .get(tenant.unwrap_or(""), key)
        .map_err(|_| EvaluationError::FlagNotFound {
            key: key.to_owned(),
        })?;
    Ok(Resolved::from(flag))
}

impl From<Flag> for Resolved {
    /// A tenant's own value is a targeting match; the catalog default is the default.
    fn from(flag: Flag) -> Self {
        match flag {
            Flag::Set(record) => Resolved {
                value: record.value,
                reason: TARGETING_MATCH,
                variant: TENANT_VARIANT,
            },
            Flag::Default { value, .. } => Resolved {
                value,
                reason: DEFAULT,
                variant: DEFAULT_VARIANT,
            },
        }
    }
}

pub fn as_bool(key: &str, value: &FlagValue) -> Result<bool, EvaluationError> {
    match value {
        FlagValue::Bool(b) => Ok(*b),
        _ => Err(type_mismatch(key, "boolean")),
    }
}

pub fn as_string(key: &str, value: FlagValue) -> Result<String, EvaluationError> {
    match value {
        FlagValue::String(s) => Ok(s),
        _ => Err(type_mismatch(key, "string")),
    }
}

pub fn as_float(key: &str, value: &FlagValue) -> Result<f64, EvaluationError> {
    match value {
        FlagValue::Number(n) => Ok(*n),
        _ => Err(type_mismatch(key, "number")),
    }
}

/// Numbers are stored as f64: an integral one in i64's range is an integer, a fractional one
/// is not.
pub fn as_int(key: &str, value: &FlagValue) -> Result<i64, EvaluationError> {
    match value {
        FlagValue::Number(n) if n.fract() == 0.0 && n.abs() < 9_223_372_036_854_775_808.0 => {
            Ok(*n as i64)
        }
        _ => Err(type_mismatch(key, "integer")),
    }
}

/// Object flags are JSON objects; other JSON (arrays, scalars) is not an object.
pub fn as_object(key: &str, value: FlagValue) -> Result<Struct, EvaluationError> {
    match value {
        FlagValue::Json(Json::Object(map)) => Ok(crate::api::convert::to_proto_struct(&map)),
        _ => Err(type_mismatch(key, "object")),
    }
}

/// A stream's `messages`, then, when they end because the sidecar is shutting down,
/// `goodbye` (UNAVAILABLE) after whatever was queued: never a clean end, which flagd's
/// providers do not reconnect after (Node's never asks again, and stays deaf to changes).
pub fn ending_in_goodbye<T, S>(
    messages: S,
    shutdown: tokio::sync::watch::Receiver<bool>,
    goodbye: Status,
) -> ResponseStream<T>
where
    T: Send + 'static,
    S: futures_util::Stream<Item = Result<T, Status>> + Send + 'static,
{
    use futures_util::StreamExt as _;
    let end =
        futures_util::stream::once(async move { (*shutdown.borrow()).then_some(Err(goodbye)) })
            .filter_map(std::future::ready);
    Box::pin(messages.chain(end))
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost_types::Value;

    fn context(fields: &[(&str, Kind)]) -> Struct {
        Struct {
            fields: fields
                .iter()
                .map(|(k, v)| {
                    (
                        k.to_string(),
                        Value {
                            kind: Some(v.clone()),
                        },
                    )
                })
                .collect(),
        }
    }

    #[test]
    fn the_tenant_attribute_wins_over_the_targeting_key() {
        let both = context(&[
            ("tenant_id", Kind::StringValue("acme".into())),
            ("targetingKey", Kind::StringValue("globex".into())),
        ]);
        assert_eq!(
            tenant_of(Some(&both), "tenant_id").ok().flatten(),
            Some("acme".into())
        );
        assert_eq!(
            tenant_of(Some(&both), "org").ok().flatten(),
            Some("globex".into())
        );
        assert_eq!(tenant_of(None::<&Struct>, "tenant_id").ok().flatten(), None);
    }

    #[test]
    fn a_bad_tenant_attribute_is_an_invalid_context() {
        let number = context(&[("tenant_id", Kind::NumberValue(3.0))]);
        let spaced = context(&[("tenant_id", Kind::StringValue("acme corp".into()))]);
        for ctx in [number, spaced] {
            let error = tenant_of(Some(&ctx), "tenant_id").err();
            assert!(
                matches!(error, Some(EvaluationError::InvalidContext(_))),
                "{error:?}"
            );
            let status = Status::from(error.expect("an error"));
            assert_eq!(status.code(), Code::InvalidArgument);
            assert!(status.message().contains("INVALID_CONTEXT"), "{status:?}");
        }
    }

    #[test]
    fn a_targeting_key_that_cannot_be_a_tenant_names_none() {
        let user = context(&[(
            "targetingKey",
            Kind::StringValue("Jane Doe <jane@example.com>".into()),
        )]);
        let number = context(&[("targetingKey", Kind::NumberValue(7.0))]);
        for ctx in [user, number] {
            assert!(matches!(tenant_of(Some(&ctx), "tenant_id"), Ok(None)));
        }
    }

    #[test]
    fn json_contexts_select_tenants_like_protobuf_ones() {
        let json = |value: Json| match value {
            Json::Object(map) => map,
            _ => panic!("an object"),
        };
        let both = json(serde_json::json!({"tenant_id": "acme", "targetingKey": "globex"}));
        assert_eq!(
            tenant_of(Some(&both), "tenant_id").ok().flatten(),
            Some("acme".into())
        );
        let by_key = json(serde_json::json!({"tenant_id": null, "targetingKey": "globex"}));
        assert_eq!(
            tenant_of(Some(&by_key), "tenant_id").ok().flatten(),
            Some("globex".into())
        );
        let user = json(serde_json::json!({"targetingKey": "Jane Doe"}));
        assert!(matches!(tenant_of(Some(&user), "tenant_id"), Ok(None)));
        let bad = json(serde_json::json!({"tenant_id": ["acme"]}));
        assert!(matches!(
            tenant_of(Some(&bad), "tenant_id"),
            Err(EvaluationError::InvalidContext(_))
        ));
    }

    #[test]
    fn integers_are_integral_numbers() {
        assert_eq!(as_int("k", &FlagValue::Number(3.0)).ok(), Some(3));
        assert!(as_int("k", &FlagValue::Number(3.5)).is_err());
        assert!(as_int("k", &FlagValue::Bool(true)).is_err());
    }
}
