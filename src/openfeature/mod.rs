//! OpenFeature adapters: flagd's evaluation protocol (`flagd.evaluation.v1` and `v2`) and its
//! sync protocol (`flagd.sync.v1`) over the in-memory flag cache. Like `api`, they decode, read and encode; the decisions (which tenant,
//! which reason) live in [`resolve`].

pub mod evaluation;
pub mod events;
pub mod ofrep;
pub mod sync;

use prost_types::{Struct, value::Kind};
use serde_json::Value as Json;
use tonic::{Code, Status};

use crate::flags::{Flag, FlagCache, FlagValue};

/// flagd's resolution reasons. `STATIC` is never used: the RPC providers cache answers with
/// it until a configuration change, and a tenant's value is not static.
pub const TARGETING_MATCH: &str = "TARGETING_MATCH";
pub const DEFAULT: &str = "DEFAULT";
/// Variant names: the value is the tenant's own, or the catalog default.
pub const TENANT_VARIANT: &str = "tenant";
pub const DEFAULT_VARIANT: &str = "default";

/// flagd's error answers: the gRPC code its providers map to an OpenFeature error code, and
/// flagd's message shape (`FlagdError:, <CODE>`).
fn flagd_error(code: Code, error_code: &str, detail: impl std::fmt::Display) -> Status {
    Status::new(code, format!("FlagdError:, {error_code}: {detail}"))
}

fn flag_not_found(key: &str) -> Status {
    flagd_error(
        Code::NotFound,
        "FLAG_NOT_FOUND",
        format!(
            "flag '{}' is not in the catalog",
            crate::problem::quoted(key)
        ),
    )
}

fn type_mismatch(key: &str, wanted: &str) -> Status {
    flagd_error(
        Code::InvalidArgument,
        "TYPE_MISMATCH",
        format!("flag {key:?} is not a {wanted}"),
    )
}

fn invalid_context(detail: impl std::fmt::Display) -> Status {
    flagd_error(Code::InvalidArgument, "INVALID_CONTEXT", detail)
}

/// The tenant an evaluation context names: its `attribute` (a string), else its
/// `targetingKey`; `None` when it names none. A named tenant must be a valid tenant id.
pub fn tenant_of(context: Option<&Struct>, attribute: &str) -> Result<Option<String>, Status> {
    let Some(context) = context else {
        return Ok(None);
    };
    let named = |field: &str| -> Result<Option<String>, Status> {
        match context.fields.get(field).and_then(|v| v.kind.as_ref()) {
            None | Some(Kind::NullValue(_)) => Ok(None),
            Some(Kind::StringValue(s)) if s.is_empty() => Ok(None),
            Some(Kind::StringValue(s)) => {
                crate::ops::validate_id("tenant_id", s)
                    .map_err(|e| invalid_context(format!("{field}: {e}")))?;
                Ok(Some(s.clone()))
            }
            Some(_) => Err(invalid_context(format!(
                "{field} must be a string naming the tenant"
            ))),
        }
    };
    match named(attribute)? {
        Some(tenant) => Ok(Some(tenant)),
        None => named("targetingKey"),
    }
}

/// A flag's value for the tenant, with flagd's reason and variant.
pub struct Resolved {
    pub value: FlagValue,
    pub reason: &'static str,
    pub variant: &'static str,
}

/// Reads the cache only: no I/O on the evaluation path.
pub fn resolve(cache: &FlagCache, tenant: Option<&str>, key: &str) -> Result<Resolved, Status> {
    // No tenant reads the catalog default: the empty id is never a tenant's.
    let flag = cache
        .get(tenant.unwrap_or(""), key)
        .map_err(|_| flag_not_found(key))?;
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

pub fn as_bool(key: &str, value: &FlagValue) -> Result<bool, Status> {
    match value {
        FlagValue::Bool(b) => Ok(*b),
        _ => Err(type_mismatch(key, "boolean")),
    }
}

pub fn as_string(key: &str, value: FlagValue) -> Result<String, Status> {
    match value {
        FlagValue::String(s) => Ok(s),
        _ => Err(type_mismatch(key, "string")),
    }
}

pub fn as_float(key: &str, value: &FlagValue) -> Result<f64, Status> {
    match value {
        FlagValue::Number(n) => Ok(*n),
        _ => Err(type_mismatch(key, "number")),
    }
}

/// Numbers are stored as f64: an integral one in i64's range is an integer, a fractional one
/// is not.
pub fn as_int(key: &str, value: &FlagValue) -> Result<i64, Status> {
    match value {
        FlagValue::Number(n) if n.fract() == 0.0 && n.abs() < 9_223_372_036_854_775_808.0 => {
            Ok(*n as i64)
        }
        _ => Err(type_mismatch(key, "integer")),
    }
}

/// Object flags are JSON objects; other JSON (arrays, scalars) is not an object.
pub fn as_object(key: &str, value: FlagValue) -> Result<Struct, Status> {
    match value {
        FlagValue::Json(Json::Object(map)) => Ok(crate::api::convert::to_proto_struct(&map)),
        _ => Err(type_mismatch(key, "object")),
    }
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
        assert_eq!(tenant_of(None, "tenant_id").ok().flatten(), None);
    }

    #[test]
    fn a_bad_tenant_is_an_invalid_context() {
        let number = context(&[("tenant_id", Kind::NumberValue(3.0))]);
        let bad = context(&[(
            "targetingKey",
            Kind::StringValue("no spaces allowed".into()),
        )]);
        for ctx in [number, bad] {
            let status = tenant_of(Some(&ctx), "tenant_id").err();
            assert_eq!(
                status.as_ref().map(Status::code),
                Some(Code::InvalidArgument)
            );
            assert!(status.is_some_and(|s| s.message().contains("INVALID_CONTEXT")));
        }
    }

    #[test]
    fn integers_are_integral_numbers() {
        assert_eq!(as_int("k", &FlagValue::Number(3.0)).ok(), Some(3));
        assert!(as_int("k", &FlagValue::Number(3.5)).is_err());
        assert!(as_int("k", &FlagValue::Bool(true)).is_err());
    }
}
