//! Rules: which Stripe events change which flags. The built-in set is `rules/default.toml`,
//! parsed by the same code as a user's rules file, so both can only behave alike.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use crate::flags::FlagValue;
use crate::stripe::StripeEvent;

pub const BUILT_IN: &str = include_str!("../rules/default.toml");
pub const MAX_FLAG_KEY_LEN: usize = 128;

#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid rules: {0}")]
    Parse(#[from] toml::de::Error),
    #[error("invalid rules: {0}")]
    Invalid(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RulesFile {
    #[serde(default)]
    flags: BTreeMap<String, toml::Value>,
    #[serde(default, rename = "rule")]
    rules: Vec<RuleSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleSpec {
    events: Vec<String>,
    #[serde(default)]
    plans: Vec<String>,
    #[serde(default)]
    set: BTreeMap<String, toml::Value>,
    #[serde(default)]
    entitlements: bool,
}

#[derive(Debug, Clone)]
struct Rule {
    events: Vec<String>,
    /// Lower-cased plan words; empty matches every event.
    plans: Vec<String>,
    set: Vec<(String, FlagValue)>,
    entitlements: bool,
}

#[derive(Debug, Clone)]
pub struct Rules {
    catalog: BTreeMap<String, FlagValue>,
    rules: Vec<Rule>,
}

/// What an event asks for, before the store decides what actually changes.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// No rule matches the event.
    Ignored,
    /// Set these flags, in this order (later rules override earlier ones for the same key).
    Set(Vec<(String, FlagValue)>),
    /// Exactly these entitlement flags are on; others the summary once turned on go off.
    Entitlements(Vec<String>),
}

pub fn is_valid_flag_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= MAX_FLAG_KEY_LEN
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'))
}

fn flag_value_from_toml(value: toml::Value) -> Result<FlagValue, RulesError> {
    Ok(match value {
        toml::Value::Boolean(b) => FlagValue::Bool(b),
        toml::Value::String(s) => FlagValue::String(s),
        toml::Value::Integer(i) => FlagValue::Number(i as f64),
        toml::Value::Float(f) if f.is_finite() => FlagValue::Number(f),
        toml::Value::Float(_) => {
            return Err(RulesError::Invalid("flag numbers must be finite".into()));
        }
        toml::Value::Datetime(d) => FlagValue::String(d.to_string()),
        other @ (toml::Value::Array(_) | toml::Value::Table(_)) => FlagValue::Json(
            serde_json::to_value(other).map_err(|e| RulesError::Invalid(e.to_string()))?,
        ),
    })
}

impl Rules {
    pub fn built_in() -> Result<Self, RulesError> {
        Self::parse(BUILT_IN)
    }

    pub fn from_file(path: &Path) -> Result<Self, RulesError> {
        let text = std::fs::read_to_string(path).map_err(|source| RulesError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text)
    }

    pub fn parse(text: &str) -> Result<Self, RulesError> {
        let file: RulesFile = toml::from_str(text)?;
        let mut catalog = BTreeMap::new();
        for (key, value) in file.flags {
            if !is_valid_flag_key(&key) {
                return Err(RulesError::Invalid(format!(
                    "flag key '{key}' must be 1-{MAX_FLAG_KEY_LEN} characters of letters, digits, _ - . :"
                )));
            }
            catalog.insert(key, flag_value_from_toml(value)?);
        }
        let mut rules = Vec::new();
        for (index, spec) in file.rules.into_iter().enumerate() {
            let n = index + 1;
            if spec.events.is_empty() || spec.events.iter().any(String::is_empty) {
                return Err(RulesError::Invalid(format!(
                    "rule {n} needs a non-empty `events` list"
                )));
            }
            if spec.entitlements != spec.set.is_empty() {
                return Err(RulesError::Invalid(format!(
                    "rule {n} needs exactly one of `set` or `entitlements = true`"
                )));
            }
            let mut set = Vec::new();
            for (key, value) in spec.set {
                if !catalog.contains_key(&key) {
                    return Err(RulesError::Invalid(format!(
                        "rule {n} sets flag '{key}', which [flags] does not define"
                    )));
                }
                set.push((key, flag_value_from_toml(value)?));
            }
            rules.push(Rule {
                events: spec.events,
                plans: spec.plans.iter().map(|p| p.to_lowercase()).collect(),
                set,
                entitlements: spec.entitlements,
            });
        }
        Ok(Self { catalog, rules })
    }

    pub fn catalog(&self) -> &BTreeMap<String, FlagValue> {
        &self.catalog
    }

    pub fn evaluate(&self, event: &StripeEvent) -> Effect {
        let mut set: Vec<(String, FlagValue)> = Vec::new();
        for rule in &self.rules {
            if !rule.events.iter().any(|e| e == &event.event_type) {
                continue;
            }
            if !rule.plans.is_empty() && !on_plan(event, &rule.plans) {
                continue;
            }
            if rule.entitlements {
                let mut keys: Vec<String> = event
                    .entitlement_lookup_keys()
                    .into_iter()
                    .filter(|k| is_valid_flag_key(k))
                    .map(str::to_owned)
                    .collect();
                keys.sort();
                keys.dedup();
                return Effect::Entitlements(keys);
            }
            for (key, value) in &rule.set {
                set.retain(|(k, _)| k != key);
                set.push((key.clone(), value.clone()));
            }
        }
        if set.is_empty() {
            Effect::Ignored
        } else {
            Effect::Set(set)
        }
    }
}

fn on_plan(event: &StripeEvent, plans: &[String]) -> bool {
    event.plan_names().iter().any(|name| {
        name.split(|c: char| !c.is_alphanumeric())
            .any(|word| plans.iter().any(|p| word.eq_ignore_ascii_case(p)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(event_type: &str, object: serde_json::Value) -> StripeEvent {
        let body = serde_json::json!({"id": "evt_1", "type": event_type, "created": 1, "data": {"object": object}});
        StripeEvent::parse(body.to_string().as_bytes(), 0).expect("valid event")
    }

    fn on(key: &str) -> (String, FlagValue) {
        (key.into(), FlagValue::Bool(true))
    }
    fn off(key: &str) -> (String, FlagValue) {
        (key.into(), FlagValue::Bool(false))
    }

    #[test]
    fn built_ins_reproduce_the_seed() {
        let rules = Rules::built_in().expect("built-in rules parse");
        let cus = serde_json::json!({"customer": "cus_1"});
        assert_eq!(
            rules.evaluate(&event("invoice.paid", cus.clone())),
            Effect::Set(vec![off("paywall_active"), on("pro_features")])
        );
        for failed in [
            "invoice.payment_failed",
            "payment_intent.payment_failed",
            "payment.failed",
        ] {
            assert_eq!(
                rules.evaluate(&event(failed, cus.clone())),
                Effect::Set(vec![on("paywall_active"), off("pro_features")])
            );
        }
        assert_eq!(
            rules.evaluate(&event("subscription.upgraded", cus.clone())),
            Effect::Set(vec![on("advanced_analytics")])
        );
        assert_eq!(
            rules.evaluate(&event("customer.subscription.deleted", cus.clone())),
            Effect::Set(vec![off("advanced_analytics"), off("pro_features")])
        );
        assert_eq!(
            rules.evaluate(&event("charge.refunded", cus)),
            Effect::Ignored
        );
    }

    #[test]
    fn subscription_updates_need_a_paid_plan() {
        let rules = Rules::built_in().expect("built-in rules parse");
        let upgraded = |object| rules.evaluate(&event("customer.subscription.updated", object));
        let expected = Effect::Set(vec![on("advanced_analytics")]);
        assert_eq!(
            upgraded(
                serde_json::json!({"items": {"data": [{"price": {"lookup_key": "enterprise_annual"}}]}})
            ),
            expected
        );
        assert_eq!(
            upgraded(
                serde_json::json!({"items": {"data": [{"price": {"nickname": "Pro Monthly"}}]}})
            ),
            expected
        );
        assert_eq!(
            upgraded(serde_json::json!({"plan": {"nickname": "PRO"}})),
            expected
        );
        assert_eq!(
            upgraded(serde_json::json!({"plan": {"nickname": "approval-basic"}})),
            Effect::Ignored
        );
        assert_eq!(upgraded(serde_json::json!({})), Effect::Ignored);
    }

    #[test]
    fn entitlement_summaries_list_their_lookup_keys() {
        let rules = Rules::built_in().expect("built-in rules parse");
        let summary = serde_json::json!({"customer": "cus_1", "entitlements": {"data": [
            {"lookup_key": "sso"}, {"lookup_key": "audit_export"}, {"lookup_key": "bad key!"}]}});
        assert_eq!(
            rules.evaluate(&event(
                "entitlements.active_entitlement_summary.updated",
                summary
            )),
            Effect::Entitlements(vec!["audit_export".into(), "sso".into()])
        );
    }

    #[test]
    fn bad_rule_files_name_the_problem() {
        for (text, needle) in [
            ("[[rule]]\nevents = []\nset = { a = true }", "events"),
            (
                "[[rule]]\nevents = [\"x\"]\nset = { a = true }",
                "does not define",
            ),
            (
                "[flags]\na = true\n[[rule]]\nevents = [\"x\"]",
                "exactly one",
            ),
            ("[flags]\n\"bad key\" = true", "flag key"),
            ("[flagz]\na = 1", "unknown field"),
        ] {
            let err = Rules::parse(text).expect_err(text).to_string();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
    }
}
