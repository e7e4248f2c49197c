//! Domain values ↔ protobuf messages. The only place that knows both shapes.

use prost_types::{ListValue, Struct, Timestamp, Value, value::Kind};
use serde_json::{Map, Value as Json};

use crate::audit::AuditRecord;
use crate::auth::{Access, AccessRequest, Claims};
use crate::flags::{Flag, FlagRecord, FlagValue, finite_number};
use crate::ops::{AdminTrace, EventTrace, Explanation, FlagChange, SetBy, WebhookResult};
use crate::problem::{Error, Problem};
use crate::proto;
use crate::store::Outcome;

pub fn timestamp_from_ms(ms: i64) -> Timestamp {
    Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    }
}

pub fn ms_from_timestamp(ts: &Timestamp) -> i64 {
    ts.seconds
        .saturating_mul(1000)
        .saturating_add(i64::from(ts.nanos.clamp(0, 999_999_999)) / 1_000_000)
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

pub fn flag_value(value: &FlagValue) -> proto::FlagValue {
    use proto::flag_value::Kind;
    let kind = match value {
        FlagValue::Bool(b) => Kind::BoolValue(*b),
        FlagValue::String(s) => Kind::StringValue(s.clone()),
        FlagValue::Number(n) => Kind::NumberValue(*n),
        FlagValue::Json(v) => Kind::JsonValue(to_proto_value(v)),
    };
    proto::FlagValue { kind: Some(kind) }
}

pub fn flag_value_from_proto(value: Option<&proto::FlagValue>) -> Result<FlagValue, Error> {
    use proto::flag_value::Kind;
    match value.and_then(|v| v.kind.as_ref()) {
        None => Err(Error::invalid("value", "a value is required")),
        Some(Kind::BoolValue(b)) => Ok(FlagValue::Bool(*b)),
        Some(Kind::StringValue(s)) => Ok(FlagValue::String(s.clone())),
        Some(Kind::NumberValue(n)) if n.is_finite() => Ok(FlagValue::Number(*n)),
        Some(Kind::NumberValue(_)) => Err(Error::invalid("value", "numbers must be finite")),
        Some(Kind::JsonValue(v)) => from_proto_value(v)
            .map(FlagValue::Json)
            .map_err(|e| Error::invalid("value.json_value", e)),
    }
}

pub fn flag_record(record: FlagRecord) -> proto::Flag {
    proto::Flag {
        value: Some(flag_value(&record.value)),
        tenant_id: record.tenant_id,
        key: record.key,
        version: record.version,
        is_default: false,
        updated_at: Some(timestamp_from_ms(record.updated_at_ms)),
        updated_by: record.updated_by,
        source_event_id: record.source_event_id,
    }
}

pub fn flag(flag: Flag) -> proto::Flag {
    match flag {
        Flag::Set(record) => flag_record(record),
        Flag::Default {
            tenant_id,
            key,
            value,
        } => proto::Flag {
            tenant_id,
            key,
            value: Some(flag_value(&value)),
            version: 0,
            is_default: true,
            updated_at: None,
            updated_by: String::new(),
            source_event_id: String::new(),
        },
    }
}

pub fn flags(flags: Vec<Flag>) -> Vec<proto::Flag> {
    flags.into_iter().map(flag).collect()
}

/// Tree hashes as the protos carry them: raw 32-byte values.
pub fn hashes(hashes: &[crate::tlog::Hash]) -> Vec<Vec<u8>> {
    hashes.iter().map(|hash| hash.to_vec()).collect()
}

/// The inclusion proof of record `seq`, with the checkpoint it is against when there is one.
pub fn inclusion_proof(seq: u64, proof: crate::app::SizedProof) -> proto::InclusionProof {
    proto::InclusionProof {
        leaf_index: seq - 1,
        tree_size: proof.tree_size,
        hashes: hashes(&proof.hashes),
        checkpoint: proof.checkpoint.map(|c| c.note).unwrap_or_default(),
    }
}

pub fn audit_record(record: &AuditRecord) -> proto::AuditRecord {
    proto::AuditRecord {
        seq: record.seq,
        time: Some(timestamp_from_ms(record.time_ms)),
        tenant_id: record.tenant_id.clone(),
        actor: record.actor.clone(),
        event: record.event.clone(),
        outcome: record.outcome.clone(),
        metadata: Some(to_proto_struct(&record.metadata)),
        prev_hash: hex::encode(record.prev_hash),
        hash: hex::encode(record.hash),
        canonical: record.canonical.clone(),
        inclusion_proof: None,
    }
}

pub fn problem(problem: Problem) -> proto::Problem {
    proto::Problem {
        r#type: problem.type_uri,
        title: problem.title,
        status: i32::from(problem.status),
        detail: problem.detail,
        instance: problem.instance,
        extensions: Some(to_proto_struct(&problem.extensions)),
    }
}

fn outcome(outcome: Outcome) -> proto::WebhookOutcome {
    match outcome {
        Outcome::Applied => proto::WebhookOutcome::Applied,
        Outcome::Duplicate => proto::WebhookOutcome::Duplicate,
        Outcome::Stale => proto::WebhookOutcome::Stale,
        Outcome::Ignored => proto::WebhookOutcome::Ignored,
    }
}

/// The outcome a `WebhookOutcome` names; none for `UNSPECIFIED`.
pub fn outcome_from_proto(outcome: proto::WebhookOutcome) -> Option<Outcome> {
    match outcome {
        proto::WebhookOutcome::Applied => Some(Outcome::Applied),
        proto::WebhookOutcome::Duplicate => Some(Outcome::Duplicate),
        proto::WebhookOutcome::Stale => Some(Outcome::Stale),
        proto::WebhookOutcome::Ignored => Some(Outcome::Ignored),
        proto::WebhookOutcome::Unspecified => None,
    }
}

fn flag_change(change: FlagChange) -> proto::FlagChange {
    proto::FlagChange {
        key: change.key,
        old_value: change.old_value.as_ref().map(flag_value),
        new_value: Some(flag_value(&change.new_value)),
        version: change.version,
    }
}

pub fn webhook_result(result: WebhookResult) -> proto::HandleStripeWebhookResponse {
    proto::HandleStripeWebhookResponse {
        event_id: result.event_id,
        event_type: result.event_type,
        tenant_id: result.tenant_id,
        outcome: outcome(result.outcome) as i32,
        flag_changes: result.flag_changes.into_iter().map(flag_change).collect(),
        audit_seq: result.audit_seq,
        stale_flags: result.stale_flags,
        inclusion_proof: None,
    }
}

fn flag_event(trace: EventTrace) -> proto::FlagEvent {
    proto::FlagEvent {
        event_id: trace.event_id,
        event_type: trace.event_type,
        created: trace.created,
        audit_seq: trace.audit_seq,
        received_at: Some(timestamp_from_ms(trace.received_at_ms)),
        actor: trace.actor,
        reason: trace.reason.unwrap_or_default(),
    }
}

fn admin_flag_change(admin: AdminTrace) -> proto::AdminFlagChange {
    proto::AdminFlagChange {
        actor: admin.actor,
        reason: admin.reason.unwrap_or_default(),
        at: Some(timestamp_from_ms(admin.at_ms)),
        version: admin.version,
        audit_seq: admin.audit_seq,
    }
}

pub fn explanation(explanation: Explanation) -> proto::ExplainFlagResponse {
    use proto::explain_flag_response::SetBy as Proto;
    proto::ExplainFlagResponse {
        flag: Some(flag(explanation.flag)),
        set_by: explanation.set_by.map(|set_by| match set_by {
            SetBy::Event(trace) => Proto::Event(flag_event(trace)),
            SetBy::Admin(admin) => Proto::Admin(admin_flag_change(admin)),
        }),
        rule: explanation.rule.unwrap_or_default(),
        stale_events: explanation.stale.into_iter().map(flag_event).collect(),
        searched_from_seq: explanation.searched_from_seq,
        searched_through_seq: explanation.searched_through_seq,
        newest_event: explanation.newest.map(flag_event),
    }
}

pub fn claims(claims: &Claims) -> proto::Claims {
    let timestamp = |s: i64| timestamp_from_ms(s.saturating_mul(1000));
    proto::Claims {
        subject: claims.subject.clone(),
        tenant_id: claims.tenant_id.clone(),
        roles: claims.roles.clone(),
        scopes: claims.scopes.clone(),
        issued_at: claims.issued_at.map(timestamp),
        expires_at: claims.expires_at.map(timestamp),
        issuer: claims.issuer.clone(),
        audience: claims.audience.clone(),
        claims: Some(to_proto_struct(&claims.all)),
    }
}

pub fn access_request(request: proto::AuthorizeRequest) -> AccessRequest {
    AccessRequest {
        token: request.token,
        tenant_id: request.tenant_id,
        required_features: request.required_features,
        deny_if: request.deny_if,
        resource: request.resource,
        include_claims: request.include_claims,
    }
}

pub fn access(
    access: Access,
    links: &crate::problem::ProblemLinks,
    resource: &str,
) -> proto::AuthorizeResponse {
    let decision = match access.denial {
        Some(_) => proto::Decision::Deny,
        None => proto::Decision::Allow,
    };
    proto::AuthorizeResponse {
        decision: decision as i32,
        problem: access
            .denial
            .map(|d| problem(d.problem(links, &access.tenant_id, resource))),
        claims: access.claims.as_deref().map(claims),
        tenant_id: access.tenant_id,
        subject: access.subject,
        fail_mode_applied: access.fail_mode_applied,
    }
}
