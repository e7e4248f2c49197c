//! Conversions between `serde_json` values and the protobuf `Struct`/`Value` well-known types.

use prost_types::{ListValue, Struct, Value, value::Kind};
use serde_json::{Map, Number, Value as Json};

pub fn string_value(s: &str) -> Value {
    Value {
        kind: Some(Kind::StringValue(s.to_owned())),
    }
}

pub fn to_proto_value(json: &Json) -> Value {
    let kind = match json {
        Json::Null => Kind::NullValue(0),
        Json::Bool(b) => Kind::BoolValue(*b),
        Json::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        Json::String(s) => Kind::StringValue(s.clone()),
        Json::Array(items) => Kind::ListValue(ListValue {
            values: items.iter().map(to_proto_value).collect(),
        }),
        Json::Object(map) => Kind::StructValue(to_proto_struct(map)),
    };
    Value { kind: Some(kind) }
}

pub fn to_proto_struct(map: &Map<String, Json>) -> Struct {
    Struct {
        fields: map
            .iter()
            .map(|(k, v)| (k.clone(), to_proto_value(v)))
            .collect(),
    }
}

/// Protobuf numbers are doubles; JSON has no NaN or infinity, so those are refused.
pub fn from_proto_value(value: &Value) -> Result<Json, &'static str> {
    Ok(match &value.kind {
        None | Some(Kind::NullValue(_)) => Json::Null,
        Some(Kind::BoolValue(b)) => Json::Bool(*b),
        Some(Kind::NumberValue(n)) => Json::Number(finite_number(*n)?),
        Some(Kind::StringValue(s)) => Json::String(s.clone()),
        Some(Kind::ListValue(list)) => Json::Array(
            list.values
                .iter()
                .map(from_proto_value)
                .collect::<Result<_, _>>()?,
        ),
        Some(Kind::StructValue(s)) => Json::Object(from_proto_struct(s)?),
    })
}

pub fn from_proto_struct(s: &Struct) -> Result<Map<String, Json>, &'static str> {
    s.fields
        .iter()
        .map(|(k, v)| Ok((k.clone(), from_proto_value(v)?)))
        .collect()
}

pub fn finite_number(n: f64) -> Result<Number, &'static str> {
    // Integral values stay integers so that canonical JSON prints `3`, not `3.0`.
    if n.fract() == 0.0 && n.abs() < 9_007_199_254_740_992.0 {
        return Ok(Number::from(n as i64));
    }
    Number::from_f64(n).ok_or("numbers must be finite")
}
