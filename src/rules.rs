//! Rules: which Stripe events change which flags, by event type and, for subscription events,
//! by the subscription's status and plan (the lifecycle table). Each rule decides from the
//! event alone, never from stored state, which is what lets the webhook path make the final
//! flags independent of delivery order. The built-in set is `rules/default.toml`, parsed by the
//! same code as a user's rules file, so both can only behave alike.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use crate::flags::FlagValue;
use crate::stripe::{SUBSCRIPTION_STATUSES, StripeEvent};

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
    #[serde(default)]
    name: Option<String>,
    events: Vec<String>,
    #[serde(default)]
    status: Option<Vec<String>>,
    #[serde(default)]
    plans: Vec<String>,
    #[serde(default)]
    set: BTreeMap<String, toml::Value>,
    #[serde(default, rename = "else")]
    otherwise: BTreeMap<String, toml::Value>,
    #[serde(default)]
    entitlements: bool,
}

#[derive(Debug, Clone)]
struct Rule {
    /// Shown by `flags explain` and recorded in each applied event's audit record.
    name: String,
    events: Vec<String>,
    /// Subscription statuses the rule applies to; empty applies to any.
    status: Vec<String>,
    /// Lower-cased plan words; empty matches every event.
    plans: Vec<String>,
    set: Vec<(String, FlagValue)>,
    /// What the rule sets when its events and status match but the plan does not.
    otherwise: Vec<(String, FlagValue)>,
    entitlements: bool,
}

#[derive(Debug, Clone)]
pub struct Rules {
    catalog: BTreeMap<String, FlagValue>,
    rules: Vec<Rule>,
}

/// One flag an event sets, and the rule that decided it.
#[derive(Debug, Clone, PartialEq)]
pub struct Setting {
    pub key: String,
    pub value: FlagValue,
    pub rule: String,
}

/// What an event asks for, before the store decides what actually changes. It depends on the
/// event alone, never on stored state: that is what makes the final flags independent of the
/// order deliveries arrive in.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// No rule matches the event.
    Ignored,
    /// Set these flags, in this order (later rules override earlier ones for the same key).
    Set(Vec<Setting>),
    /// Exactly these entitlement flags are on; others an older summary turned on go off.
    Entitlements { keys: Vec<String>, rule: String },
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
        let mut rules: Vec<Rule> = Vec::new();
        for (index, spec) in file.rules.into_iter().enumerate() {
            let rule = Rule::from_spec(index + 1, spec, &catalog)?;
            if rules.iter().any(|r| r.name == rule.name) {
                return Err(RulesError::Invalid(format!(
                    "two rules are named '{}'; `flags explain` tells rules apart by name",
                    rule.name
                )));
            }
            rules.push(rule);
        }
        Ok(Self { catalog, rules })
    }

    pub fn catalog(&self) -> &BTreeMap<String, FlagValue> {
        &self.catalog
    }

    pub fn evaluate(&self, event: &StripeEvent) -> Effect {
        let status = event.subscription_status();
        // A status this sidecar does not know has no row in the lifecycle table: acting on it
        // would be a guess, so the event sets nothing.
        if status.is_some_and(|s| !SUBSCRIPTION_STATUSES.contains(&s)) {
            return Effect::Ignored;
        }
        let mut set: Vec<Setting> = Vec::new();
        for rule in &self.rules {
            if !rule.events.iter().any(|e| e == &event.event_type) {
                continue;
            }
            if !rule.status.is_empty()
                && !status.is_some_and(|s| rule.status.iter().any(|r| r == s))
            {
                continue;
            }
            let plan_matches = rule.plans.is_empty() || on_plan(event, &rule.plans);
            if rule.entitlements {
                if !plan_matches {
                    continue;
                }
                let mut keys: Vec<String> = event
                    .entitlement_lookup_keys()
                    .into_iter()
                    .filter(|k| is_valid_flag_key(k))
                    .map(str::to_owned)
                    .collect();
                keys.sort();
                keys.dedup();
                return Effect::Entitlements {
                    keys,
                    rule: rule.name.clone(),
                };
            }
            let chosen = if plan_matches {
                &rule.set
            } else {
                &rule.otherwise
            };
            for (key, value) in chosen {
                set.retain(|s| &s.key != key);
                set.push(Setting {
                    key: key.clone(),
                    value: value.clone(),
                    rule: rule.name.clone(),
                });
            }
        }
        if set.is_empty() {
            Effect::Ignored
        } else {
            Effect::Set(set)
        }
    }
}

impl Rule {
    fn from_spec(
        n: usize,
        spec: RuleSpec,
        catalog: &BTreeMap<String, FlagValue>,
    ) -> Result<Self, RulesError> {
        let (name, label) = match spec.name {
            Some(name) if name.trim().is_empty() => {
                return Err(RulesError::Invalid(format!("rule {n} has an empty `name`")));
            }
            Some(name) => {
                let label = format!("rule {n} ('{name}')");
                (name, label)
            }
            None => (format!("rule {n}"), format!("rule {n}")),
        };
        let invalid = |problem: String| RulesError::Invalid(format!("{label} {problem}"));
        if spec.events.is_empty() || spec.events.iter().any(String::is_empty) {
            return Err(invalid("needs a non-empty `events` list".into()));
        }
        if spec.entitlements != spec.set.is_empty() {
            return Err(invalid(
                "needs exactly one of `set` or `entitlements = true`".into(),
            ));
        }
        if !spec.otherwise.is_empty() && (spec.plans.is_empty() || spec.entitlements) {
            return Err(invalid(
                "has an `else`, which only a `set` rule with `plans` can have: it is what the rule sets when the plan does not match".into(),
            ));
        }
        let status = match spec.status {
            Some(status) if status.is_empty() => {
                return Err(invalid(
                    "has an empty `status` list, which no event matches; leave it out to match any status".into(),
                ));
            }
            status => status.unwrap_or_default(),
        };
        let known = SUBSCRIPTION_STATUSES.join(", ");
        if let Some(unknown) = status
            .iter()
            .find(|s| !SUBSCRIPTION_STATUSES.contains(&s.as_str()))
        {
            return Err(invalid(format!(
                "names status '{unknown}', which is not one of Stripe's subscription statuses ({known})"
            )));
        }
        if !status.is_empty()
            && let Some(other) = spec
                .events
                .iter()
                .find(|e| !e.starts_with("customer.subscription."))
        {
            return Err(invalid(format!(
                "has a `status` condition but lists '{other}': only customer.subscription.* events carry a subscription status"
            )));
        }
        // Plan names are matched word by word, so an entry that is not one word never matches.
        if let Some(plan) = spec
            .plans
            .iter()
            .find(|p| p.is_empty() || p.chars().any(|c| !c.is_alphanumeric()))
        {
            return Err(invalid(format!(
                "lists plan '{plan}', which can never match: each `plans` entry is one word (letters and digits) of a price lookup_key or nickname, e.g. \"pro\" matches \"Pro Monthly\" and \"pro_annual\""
            )));
        }
        let flags = |table: BTreeMap<String, toml::Value>| {
            table
                .into_iter()
                .map(|(key, value)| {
                    if !catalog.contains_key(&key) {
                        return Err(invalid(format!(
                            "sets flag '{key}', which [flags] does not define"
                        )));
                    }
                    Ok((key, flag_value_from_toml(value)?))
                })
                .collect::<Result<Vec<_>, RulesError>>()
        };
        let set = flags(spec.set)?;
        let otherwise = flags(spec.otherwise)?;
        Ok(Rule {
            events: spec.events,
            status,
            plans: spec.plans.iter().map(|p| p.to_lowercase()).collect(),
            set,
            otherwise,
            entitlements: spec.entitlements,
            name,
        })
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

    /// The flags an effect sets, sorted, as `key=on|off`.
    fn flags(effect: &Effect) -> Vec<String> {
        let Effect::Set(set) = effect else {
            return Vec::new();
        };
        let mut shown: Vec<String> = set
            .iter()
            .map(|s| format!("{}={}", s.key, s.value.display()))
            .collect();
        shown.sort();
        shown
    }

    fn subscription(status: &str, plan: &str) -> serde_json::Value {
        serde_json::json!({"customer": "cus_1", "status": status,
            "items": {"data": [{"price": {"lookup_key": plan}}]}})
    }

    #[test]
    fn invoices_keep_their_meaning() {
        let rules = Rules::built_in().expect("built-in rules parse");
        let cus = serde_json::json!({"customer": "cus_1"});
        assert_eq!(
            flags(&rules.evaluate(&event("invoice.paid", cus.clone()))),
            ["paywall_active=off", "pro_features=on"]
        );
        for failed in [
            "invoice.payment_failed",
            "payment_intent.payment_failed",
            "payment.failed",
        ] {
            assert_eq!(
                flags(&rules.evaluate(&event(failed, cus.clone()))),
                ["paywall_active=on", "pro_features=off"]
            );
        }
        assert_eq!(
            flags(&rules.evaluate(&event("subscription.upgraded", cus.clone()))),
            ["advanced_analytics=on"]
        );
        assert_eq!(
            rules.evaluate(&event("charge.refunded", cus)),
            Effect::Ignored
        );
    }

    #[test]
    fn subscription_events_follow_the_lifecycle_table() {
        let rules = Rules::built_in().expect("built-in rules parse");
        let good = |analytics: &str| {
            vec![
                format!("advanced_analytics={analytics}"),
                "paywall_active=off".to_owned(),
                "pro_features=on".to_owned(),
            ]
        };
        let arrears = [
            "advanced_analytics=off",
            "paywall_active=on",
            "pro_features=off",
        ];
        let over = [
            "advanced_analytics=off",
            "paywall_active=off",
            "pro_features=off",
        ];
        for event_type in crate::stripe::SUBSCRIPTION_STATE_EVENTS {
            if event_type == "customer.subscription.deleted" {
                continue;
            }
            for status in ["active", "trialing"] {
                let on =
                    |plan| flags(&rules.evaluate(&event(event_type, subscription(status, plan))));
                assert_eq!(on("pro_monthly"), good("on"), "{event_type} {status}");
                assert_eq!(on("enterprise_annual"), good("on"), "{event_type} {status}");
                assert_eq!(on("basic_monthly"), good("off"), "{event_type} {status}");
            }
            for status in ["past_due", "unpaid", "incomplete"] {
                let effect = rules.evaluate(&event(event_type, subscription(status, "pro")));
                assert_eq!(flags(&effect), arrears, "{event_type} {status}");
            }
            for status in ["canceled", "incomplete_expired", "paused"] {
                let effect = rules.evaluate(&event(event_type, subscription(status, "pro")));
                assert_eq!(flags(&effect), over, "{event_type} {status}");
            }
            let unknown = rules.evaluate(&event(event_type, subscription("on_fire", "pro")));
            assert_eq!(unknown, Effect::Ignored, "{event_type}");
        }
        // Deleted means canceled, whatever the object says.
        let deleted = event(
            "customer.subscription.deleted",
            subscription("active", "pro"),
        );
        assert_eq!(flags(&rules.evaluate(&deleted)), over);
    }

    #[test]
    fn plans_match_lookup_keys_and_nicknames_by_word() {
        let rules = Rules::built_in().expect("built-in rules parse");
        let analytics = |mut object: serde_json::Value| {
            object["status"] = "active".into();
            let effect = rules.evaluate(&event("customer.subscription.updated", object));
            let Effect::Set(set) = effect else {
                return None;
            };
            set.into_iter()
                .find(|s| s.key == "advanced_analytics")
                .map(|s| s.value)
        };
        let on = Some(FlagValue::Bool(true));
        let off = Some(FlagValue::Bool(false));
        assert_eq!(
            analytics(
                serde_json::json!({"items": {"data": [{"price": {"nickname": "Pro Monthly"}}]}})
            ),
            on
        );
        assert_eq!(
            analytics(serde_json::json!({"plan": {"nickname": "PRO"}})),
            on
        );
        assert_eq!(
            analytics(serde_json::json!({"plan": {"nickname": "approval-basic"}})),
            off
        );
        assert_eq!(analytics(serde_json::json!({})), off);
    }

    #[test]
    fn each_setting_names_its_rule() {
        let rules = Rules::built_in().expect("built-in rules parse");
        let Effect::Set(set) = rules.evaluate(&event(
            "customer.subscription.updated",
            subscription("active", "basic"),
        )) else {
            panic!("a subscription update sets flags");
        };
        let named: Vec<(&str, &str)> = set
            .iter()
            .map(|s| (s.key.as_str(), s.rule.as_str()))
            .collect();
        assert!(
            named.contains(&("advanced_analytics", "paid plan")),
            "{named:?}"
        );
        assert!(
            named.contains(&("pro_features", "subscription in good standing")),
            "{named:?}"
        );
        let unnamed =
            Rules::parse("[flags]\na = true\n[[rule]]\nevents = [\"x\"]\nset = { a = true }")
                .expect("valid");
        let Effect::Set(set) = unnamed.evaluate(&event("x", serde_json::json!({}))) else {
            panic!("x sets a");
        };
        assert_eq!(set[0].rule, "rule 1");
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
            Effect::Entitlements {
                keys: vec!["audit_export".into(), "sso".into()],
                rule: "entitlements".into()
            }
        );
    }

    #[test]
    fn a_rules_file_in_the_first_format_still_means_what_it_said() {
        let rules = Rules::parse(
            r#"
            [flags]
            analytics = false
            [[rule]]
            events = ["customer.subscription.updated"]
            plans = ["pro"]
            set = { analytics = true }
            "#,
        )
        .expect("the first format loads");
        let pro = serde_json::json!({"status": "past_due", "plan": {"nickname": "Pro"}});
        assert_eq!(
            flags(&rules.evaluate(&event("customer.subscription.updated", pro))),
            ["analytics=on"]
        );
        let basic = serde_json::json!({"plan": {"nickname": "Basic"}});
        assert_eq!(
            rules.evaluate(&event("customer.subscription.updated", basic)),
            Effect::Ignored
        );
    }

    #[test]
    fn bad_rule_files_name_the_problem() {
        const FLAG: &str = "[flags]\na = true\n";
        for (text, needle) in [
            (
                "[[rule]]\nevents = []\nset = { a = true }".to_owned(),
                "events",
            ),
            (
                "[[rule]]\nevents = [\"x\"]\nset = { a = true }".to_owned(),
                "does not define",
            ),
            (format!("{FLAG}[[rule]]\nevents = [\"x\"]"), "exactly one"),
            ("[flags]\n\"bad key\" = true".to_owned(), "flag key"),
            ("[flagz]\na = 1".to_owned(), "unknown field"),
            (
                format!("{FLAG}[[rule]]\nevents = [\"x\"]\nset = {{ a = true }}\nwhen = 1"),
                "unknown field",
            ),
            (
                format!(
                    "{FLAG}[[rule]]\nevents = [\"customer.subscription.updated\"]\nstatus = [\"cancelled\"]\nset = {{ a = true }}"
                ),
                "past_due",
            ),
            (
                format!(
                    "{FLAG}[[rule]]\nevents = [\"invoice.paid\"]\nstatus = [\"active\"]\nset = {{ a = true }}"
                ),
                "only customer.subscription.*",
            ),
            (
                format!(
                    "{FLAG}[[rule]]\nevents = [\"customer.subscription.updated\"]\nstatus = []\nset = {{ a = true }}"
                ),
                "empty `status`",
            ),
            (
                format!(
                    "{FLAG}[[rule]]\nevents = [\"x\"]\nset = {{ a = true }}\nelse = {{ a = false }}"
                ),
                "only a `set` rule with `plans`",
            ),
            (
                format!(
                    "{FLAG}[[rule]]\nevents = [\"x\"]\nplans = [\"pro\"]\nset = {{ a = true }}\nelse = {{ b = false }}"
                ),
                "'b'",
            ),
            (
                format!(
                    "{FLAG}[[rule]]\nname = \"n\"\nevents = [\"x\"]\nset = {{ a = true }}\n[[rule]]\nname = \"n\"\nevents = [\"y\"]\nset = {{ a = true }}"
                ),
                "two rules are named 'n'",
            ),
            (
                format!("{FLAG}[[rule]]\nname = \" \"\nevents = [\"x\"]\nset = {{ a = true }}"),
                "empty `name`",
            ),
            (
                format!(
                    "{FLAG}[[rule]]\nevents = [\"x\"]\nplans = [\"pro monthly\"]\nset = {{ a = true }}"
                ),
                "plan 'pro monthly', which can never match",
            ),
            (
                format!("{FLAG}[[rule]]\nevents = [\"x\"]\nplans = [\"\"]\nset = {{ a = true }}"),
                "plan '', which can never match",
            ),
        ] {
            let err = Rules::parse(&text).expect_err(&text).to_string();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
    }
}
