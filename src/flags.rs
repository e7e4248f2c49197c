//! Flag values, the in-memory flag cache every read is served from, and the change broadcast
//! that `WatchFlags` streams follow.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use dashmap::DashMap;
use serde_json::Value as Json;
use tokio::sync::broadcast;

use crate::problem::Error;
use crate::stripe::EventOrder;

#[derive(Debug, Clone, PartialEq)]
pub enum FlagValue {
    Bool(bool),
    String(String),
    Number(f64),
    Json(Json),
}

impl FlagValue {
    /// The stored form: a one-key object naming the kind, so a JSON string flag and a string
    /// flag stay distinct.
    pub fn to_stored(&self) -> String {
        let kind = match self {
            FlagValue::Bool(_) => "bool",
            FlagValue::String(_) => "string",
            FlagValue::Number(_) => "number",
            FlagValue::Json(_) => "json",
        };
        serde_json::json!({ kind: self.clone().into_json() }).to_string()
    }

    /// The value as plain JSON, as the HTTP protocols answer it and flagd variants hold it:
    /// integral numbers stay integers, so that a provider's integer evaluation accepts them.
    pub fn into_json(self) -> Json {
        match self {
            FlagValue::Bool(b) => Json::Bool(b),
            FlagValue::String(s) => Json::String(s),
            FlagValue::Number(n) => finite_number(n).map(Json::Number).unwrap_or(Json::Null),
            FlagValue::Json(v) => v,
        }
    }

    pub fn from_stored(stored: &str) -> Result<Self, String> {
        let parsed: serde_json::Map<String, Json> =
            serde_json::from_str(stored).map_err(|e| format!("bad stored flag value: {e}"))?;
        let Some((kind, value)) = parsed.into_iter().next() else {
            return Err("empty stored flag value".into());
        };
        Ok(match (kind.as_str(), value) {
            ("bool", Json::Bool(b)) => FlagValue::Bool(b),
            ("string", Json::String(s)) => FlagValue::String(s),
            ("number", Json::Number(n)) => FlagValue::Number(n.as_f64().unwrap_or(0.0)),
            ("json", v) => FlagValue::Json(v),
            (kind, _) => return Err(format!("bad stored flag value of kind {kind}")),
        })
    }

    /// How the audit trail shows a value: `on`/`off` for booleans, JSON otherwise.
    pub fn display(&self) -> String {
        match self {
            FlagValue::Bool(true) => "on".into(),
            FlagValue::Bool(false) => "off".into(),
            FlagValue::String(s) => Json::String(s.clone()).to_string(),
            FlagValue::Number(n) => n.to_string(),
            FlagValue::Json(v) => v.to_string(),
        }
    }
}

/// Integral values stay integers so that canonical JSON prints `3`, not `3.0`; JSON has no NaN
/// or infinity, so those are refused.
pub fn finite_number(n: f64) -> Result<serde_json::Number, &'static str> {
    if n.fract() == 0.0 && n.abs() < 9_007_199_254_740_992.0 {
        return Ok(serde_json::Number::from(n as i64));
    }
    serde_json::Number::from_f64(n).ok_or("numbers must be finite")
}

/// Who last wrote a flag: shown, never decided on (billing objects decide what a summary or
/// a subscription turns off).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlagOrigin {
    Rule,
    Entitlements,
    Admin,
}

impl FlagOrigin {
    pub fn as_str(self) -> &'static str {
        match self {
            FlagOrigin::Rule => "rule",
            FlagOrigin::Entitlements => "entitlements",
            FlagOrigin::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Self {
        match s {
            "entitlements" => FlagOrigin::Entitlements,
            "admin" => FlagOrigin::Admin,
            _ => FlagOrigin::Rule,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct FlagRecord {
    pub tenant_id: String,
    pub key: String,
    pub value: FlagValue,
    /// Store-wide change counter at this flag's last change.
    pub version: u64,
    /// The order of the newest Stripe event that set or confirmed it: an event ordered before
    /// it may not overwrite it. Admin changes keep it; the default is below every event.
    pub order: EventOrder,
    pub origin: FlagOrigin,
    pub updated_at_ms: i64,
    pub updated_by: String,
    pub source_event_id: String,
}

/// An operator's change of `tenant`'s `key`, for the tests that feed a [`FlagCache`].
#[cfg(test)]
pub(crate) fn test_record(tenant: &str, key: &str, value: FlagValue, version: u64) -> FlagRecord {
    FlagRecord {
        tenant_id: tenant.into(),
        key: key.into(),
        value,
        version,
        order: EventOrder::default(),
        origin: FlagOrigin::Admin,
        updated_at_ms: 0,
        updated_by: "test".into(),
        source_event_id: String::new(),
    }
}

/// A tenant's flag as a read answers it: what was set for the tenant, or the catalog default
/// for a flag the tenant never had.
#[derive(Debug, Clone, PartialEq)]
pub enum Flag {
    Set(FlagRecord),
    Default {
        tenant_id: String,
        key: String,
        value: FlagValue,
    },
}

impl Flag {
    fn default_of(tenant_id: &str, key: &str, value: &FlagValue) -> Self {
        Flag::Default {
            tenant_id: tenant_id.to_owned(),
            key: key.to_owned(),
            value: value.clone(),
        }
    }

    pub fn tenant_id(&self) -> &str {
        match self {
            Flag::Set(record) => &record.tenant_id,
            Flag::Default { tenant_id, .. } => tenant_id,
        }
    }

    pub fn key(&self) -> &str {
        match self {
            Flag::Set(record) => &record.key,
            Flag::Default { key, .. } => key,
        }
    }

    pub fn value(&self) -> &FlagValue {
        match self {
            Flag::Set(record) => &record.value,
            Flag::Default { value, .. } => value,
        }
    }
}

/// How many changes a slow `WatchFlags` stream may lag before it is resynchronised.
const CHANGE_BUFFER: usize = 4096;

/// Every tenant's flags in memory, kept current by the store as transactions commit.
pub struct FlagCache {
    by_tenant: DashMap<String, HashMap<String, FlagRecord>>,
    /// Defaults of the flags the rules define: the answer for a tenant that never had one.
    catalog: BTreeMap<String, FlagValue>,
    version: AtomicU64,
    changes: broadcast::Sender<Arc<FlagRecord>>,
    /// Set by a store whose change feed is down: the cache may then be stale, and access
    /// decisions fall back to the fail mode. The embedded store's cache is always current.
    degraded: AtomicBool,
}

impl FlagCache {
    pub fn new(catalog: BTreeMap<String, FlagValue>) -> Self {
        Self {
            by_tenant: DashMap::new(),
            catalog,
            version: AtomicU64::new(0),
            changes: broadcast::channel(CHANGE_BUFFER).0,
            degraded: AtomicBool::new(false),
        }
    }

    pub fn set_degraded(&self, degraded: bool) {
        self.degraded.store(degraded, Ordering::Release);
    }

    /// Whether the cache can vouch for a tenant's flags right now: always while the feed is
    /// healthy; when it is down, only for tenants whose last known flags it holds.
    pub fn can_answer_for(&self, tenant_id: &str) -> bool {
        !self.degraded.load(Ordering::Acquire) || self.by_tenant.contains_key(tenant_id)
    }

    /// Loads the store's flags at start, before the server reports SERVING. A shared store's
    /// change feed runs already and may have applied a change newer than this snapshot: per
    /// flag, the newer version stays.
    pub fn load(&self, records: Vec<FlagRecord>) {
        for record in records {
            self.version.fetch_max(record.version, Ordering::AcqRel);
            let mut flags = self.by_tenant.entry(record.tenant_id.clone()).or_default();
            match flags.get(&record.key) {
                Some(current) if current.version >= record.version => {}
                _ => {
                    flags.insert(record.key.clone(), record);
                }
            }
        }
    }

    /// Applies a committed change and tells the watchers. Called in commit order; a change
    /// that is not newer than what the cache holds is dropped, so replays are harmless. Says
    /// whether it was applied.
    pub fn apply(&self, record: FlagRecord) -> bool {
        {
            let mut flags = self.by_tenant.entry(record.tenant_id.clone()).or_default();
            if let Some(current) = flags.get(&record.key)
                && current.version >= record.version
            {
                return false;
            }
            flags.insert(record.key.clone(), record.clone());
        }
        self.version.fetch_max(record.version, Ordering::AcqRel);
        // No receivers is fine: nobody is watching.
        let _ = self.changes.send(Arc::new(record));
        true
    }

    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    pub fn get(&self, tenant_id: &str, key: &str) -> Result<Flag, Error> {
        if let Some(flags) = self.by_tenant.get(tenant_id)
            && let Some(record) = flags.get(key)
        {
            return Ok(Flag::Set(record.clone()));
        }
        match self.catalog.get(key) {
            Some(default) => Ok(Flag::default_of(tenant_id, key, default)),
            None => Err(Error::FlagNotFound {
                key: key.to_owned(),
            }),
        }
    }

    /// Whether a tenant's flag is `true` (its own value, else the catalog default); unknown
    /// keys are off. The access-decision hot path: no conversion, no allocation.
    pub fn is_on(&self, tenant_id: &str, key: &str) -> bool {
        if let Some(flags) = self.by_tenant.get(tenant_id)
            && let Some(record) = flags.get(key)
        {
            return record.value == FlagValue::Bool(true);
        }
        self.catalog.get(key) == Some(&FlagValue::Bool(true))
    }

    /// Whether the tenant has a flag of its own (else it reads the catalog defaults alone).
    pub fn has_own_flags(&self, tenant_id: &str) -> bool {
        self.by_tenant
            .get(tenant_id)
            .is_some_and(|flags| !flags.is_empty())
    }

    pub fn current(&self, tenant_id: &str, key: &str) -> Option<FlagRecord> {
        self.by_tenant
            .get(tenant_id)
            .and_then(|flags| flags.get(key).cloned())
    }

    /// A tenant's flags, with catalog defaults for the ones it never had, sorted by key.
    pub fn all_of(&self, tenant_id: &str) -> Vec<Flag> {
        let mut out: BTreeMap<String, Flag> = self
            .catalog
            .iter()
            .map(|(key, default)| (key.clone(), Flag::default_of(tenant_id, key, default)))
            .collect();
        if let Some(flags) = self.by_tenant.get(tenant_id) {
            for (key, record) in flags.iter() {
                out.insert(key.clone(), Flag::Set(record.clone()));
            }
        }
        out.into_values().collect()
    }

    /// Every stored flag of one tenant, or of all tenants when `tenant_id` is empty.
    pub fn snapshot(&self, tenant_id: &str) -> Vec<Flag> {
        if !tenant_id.is_empty() {
            return self.all_of(tenant_id);
        }
        let mut out: Vec<FlagRecord> = self
            .by_tenant
            .iter()
            .flat_map(|entry| entry.value().values().cloned().collect::<Vec<_>>())
            .collect();
        out.sort_by(|a, b| (&a.tenant_id, &a.key).cmp(&(&b.tenant_id, &b.key)));
        out.into_iter().map(Flag::Set).collect()
    }

    /// The catalog defaults, as flags of no tenant.
    pub fn defaults(&self) -> Vec<Flag> {
        self.catalog
            .iter()
            .map(|(key, value)| Flag::default_of("", key, value))
            .collect()
    }

    /// Every flag key any tenant or the catalog has.
    pub fn known_keys(&self) -> std::collections::BTreeSet<String> {
        let mut keys: std::collections::BTreeSet<String> = self.catalog.keys().cloned().collect();
        for entry in self.by_tenant.iter() {
            keys.extend(entry.value().keys().cloned());
        }
        keys
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<FlagRecord>> {
        self.changes.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(key: &str, value: bool, version: u64) -> FlagRecord {
        test_record("t", key, FlagValue::Bool(value), version)
    }

    #[test]
    fn stored_values_round_trip() {
        for value in [
            FlagValue::Bool(true),
            FlagValue::String("blue".into()),
            FlagValue::Number(2.5),
            FlagValue::Json(serde_json::json!({"a": [1, "x"]})),
        ] {
            assert_eq!(FlagValue::from_stored(&value.to_stored()), Ok(value));
        }
    }

    #[test]
    fn defaults_known_keys_and_refuses_unknown_ones() {
        let cache = FlagCache::new(BTreeMap::from([(
            "pro_features".to_owned(),
            FlagValue::Bool(false),
        )]));
        let flag = cache.get("acme", "pro_features").expect("catalog flag");
        assert!(matches!(flag, Flag::Default { .. }));
        assert!(matches!(
            cache.get("acme", "nope"),
            Err(Error::FlagNotFound { .. })
        ));
    }

    #[test]
    fn is_on_reads_the_tenant_value_then_the_default() {
        let cache = FlagCache::new(BTreeMap::from([
            ("on_by_default".to_owned(), FlagValue::Bool(true)),
            ("k".to_owned(), FlagValue::Bool(false)),
        ]));
        assert!(cache.is_on("t", "on_by_default"));
        assert!(!cache.is_on("t", "k"));
        cache.apply(record("k", true, 1));
        assert!(cache.is_on("t", "k"));
        assert!(!cache.is_on("t", "unknown"));
    }

    #[test]
    fn loading_a_snapshot_keeps_newer_changes_the_feed_applied() {
        let cache = FlagCache::new(BTreeMap::new());
        cache.apply(record("k", true, 7));
        cache.load(vec![record("k", false, 4), record("other", true, 2)]);
        assert_eq!(
            cache.current("t", "k").map(|r| (r.value, r.version)),
            Some((FlagValue::Bool(true), 7))
        );
        assert_eq!(cache.current("t", "other").map(|r| r.version), Some(2));
        cache.load(vec![record("other", false, 9)]);
        assert_eq!(
            cache.current("t", "other").map(|r| r.value),
            Some(FlagValue::Bool(false))
        );
        assert_eq!(cache.version(), 9);
    }

    #[test]
    fn older_versions_never_replace_newer_ones() {
        let cache = FlagCache::new(BTreeMap::new());
        cache.apply(record("k", true, 5));
        cache.apply(record("k", false, 3));
        assert_eq!(
            cache.current("t", "k").map(|r| r.value),
            Some(FlagValue::Bool(true))
        );
        assert_eq!(cache.version(), 5);
    }
}
