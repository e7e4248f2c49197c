//! The parts of a verified Stripe event that the sidecar acts on.

use std::sync::Arc;

use serde_json::{Map, Value};

use crate::problem::Error;

/// Longest event id or type accepted; Stripe's are far shorter, and both end up in the audit.
pub const MAX_EVENT_FIELD_LEN: usize = 255;

/// How far `created` may lie after the signature timestamp. Stripe creates an event before it
/// signs any delivery of it, and both times come from Stripe's clocks, so a real event is never
/// ahead; the margin only absorbs skew between Stripe's own servers. Without a bound, one signed
/// event created in the far future would make every later event of its tenant stale.
pub const MAX_CREATED_AHEAD_S: i64 = 300;

/// Stripe's subscription statuses, in lifecycle order: the order [`EventOrder`] ranks
/// same-second subscription updates by. `canceled` and `incomplete_expired` are both terminal
/// and share a rank.
pub const SUBSCRIPTION_STATUSES: [&str; 8] = [
    "incomplete",
    "trialing",
    "active",
    "past_due",
    "unpaid",
    "paused",
    "canceled",
    "incomplete_expired",
];

/// The event types whose object is a subscription and whose flags follow its `status`.
pub const SUBSCRIPTION_STATE_EVENTS: [&str; 5] = [
    "customer.subscription.created",
    "customer.subscription.updated",
    "customer.subscription.paused",
    "customer.subscription.resumed",
    "customer.subscription.deleted",
];

/// A strict total order over events, computed from the event alone, so that applying
/// "the greatest event wins" per flag gives the same flags whatever order deliveries arrive
/// in. Compared field by field: `created`, then `rank` (the tie rule for events of the same
/// second, see [`StripeEvent::order`]), then the event id's bytes. The default (all zero,
/// empty id) is below every event: the mark of a flag no event set.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EventOrder {
    pub created: i64,
    pub rank: i64,
    pub event_id: String,
}

/// Tie ranks within one second. Gaps leave room; stored ranks are compared, never decoded.
const RANK_SUBSCRIPTION_CREATED: i64 = 10;
const RANK_OTHER: i64 = 20;
/// Updates rank from here up, by the status they reach; an update without a known status
/// ranks first among them.
const RANK_SUBSCRIPTION_UPDATE: i64 = 30;
const RANK_SUBSCRIPTION_DELETED: i64 = 100;

#[derive(Debug, Clone)]
pub struct StripeEvent {
    pub id: String,
    pub event_type: String,
    /// `created` (unix seconds): orders deliveries, which Stripe does not send in order.
    pub created: i64,
    pub livemode: bool,
    /// `data.object`, or an empty object when the event has none.
    pub object: Map<String, Value>,
    /// `data.previous_attributes`: what an `*.updated` event changed, with the old values.
    pub previous_attributes: Option<Map<String, Value>>,
    /// The payload as received and the signature's timestamp: what [`Self::parse`] reads the
    /// event again from (an event parked for a customer not mapped yet is kept as these).
    pub payload: Payload,
    pub signed_at: i64,
}

/// An event's bytes as received, shared rather than copied; shown by size only.
#[derive(Clone, PartialEq, Eq)]
pub struct Payload(Arc<[u8]>);

impl Payload {
    pub fn bytes(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for Payload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Payload({} bytes)", self.0.len())
    }
}

impl StripeEvent {
    /// Parses a payload whose signature was already verified; `created` may not lie after
    /// `signed_at` (give or take [`MAX_CREATED_AHEAD_S`]).
    pub fn parse(payload: &[u8], signed_at: i64) -> Result<Self, Error> {
        Self::parse_checked(payload, Latest::Signed(signed_at))
    }

    /// Parses an event exported from Stripe (List Events) for a replay: no signature vouches
    /// for it, so `created` may not lie after `now_s` (give or take the same margin). An old
    /// `created` is what an export holds.
    pub fn parse_exported(payload: &[u8], now_s: i64) -> Result<Self, Error> {
        Self::parse_checked(payload, Latest::Now(now_s))
    }

    /// `created` is required on every path: Stripe always sends it, and anything standing in
    /// for it (a delivery's signature timestamp, the replay's clock) differs between attempts
    /// at the same event, so which attempt committed would decide the final flags.
    fn parse_checked(payload: &[u8], latest: Latest) -> Result<Self, Error> {
        let value: Value = serde_json::from_slice(payload)
            .map_err(|e| Error::NotAStripeEvent(format!("the body is not JSON ({e})")))?;
        let Value::Object(mut event) = value else {
            return Err(Error::NotAStripeEvent(
                "the body is not a JSON object".into(),
            ));
        };
        let id = required_string(&event, "id")?;
        if id.starts_with(RESERVED_ID_PREFIX) {
            return Err(Error::NotAStripeEvent(format!(
                "event ids starting with `{RESERVED_ID_PREFIX}` are the sidecar's own (Stripe's start with `evt_`)"
            )));
        }
        let event_type = required_string(&event, "type")?;
        let created = match event.get("created") {
            None | Some(Value::Null) => {
                return Err(Error::NotAStripeEvent(
                    "no `created` in the event; Stripe always sends one".into(),
                ));
            }
            Some(v) => plausible_created(v, latest)?,
        };
        let livemode = event
            .get("livemode")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let (object, previous_attributes) = match event.remove("data") {
            Some(Value::Object(mut data)) => (
                match data.remove("object") {
                    Some(Value::Object(object)) => object,
                    _ => Map::new(),
                },
                match data.remove("previous_attributes") {
                    Some(Value::Object(previous)) => Some(previous),
                    _ => None,
                },
            ),
            _ => (Map::new(), None),
        };
        Ok(Self {
            id,
            event_type,
            created,
            livemode,
            object,
            previous_attributes,
            payload: Payload(Arc::from(payload)),
            // What vouched for the event and when: parsing the kept payload again with it
            // (a parked event) passes the same checks.
            signed_at: match latest {
                Latest::Signed(at) | Latest::Now(at) => at,
            },
        })
    }

    /// Where the event stands among events of the same `created` second (the tie rule):
    /// 1. `customer.subscription.created` first: nothing happens to a subscription before it
    ///    exists;
    /// 2. then invoice, payment, entitlement and every other event;
    /// 3. then `customer.subscription.updated|paused|resumed`, by the lifecycle position of the
    ///    status they reach (incomplete < trialing < active < past_due < unpaid < paused <
    ///    canceled = incomplete_expired): a subscription's object is the state Stripe reached
    ///    after processing that second's invoice, and within a second a subscription only moves
    ///    forward through dunning. Of two updates reaching the same status, the one whose
    ///    `previous_attributes` shows a status change ranks after the one that changed
    ///    something else: the transition is what closes the second's processing;
    /// 4. `customer.subscription.deleted` last: it is terminal;
    /// 5. finally the event id, byte by byte, so that two events never tie.
    ///
    /// Among subscription events the rank orders one subscription's own history: each
    /// subscription is its own billing object, and which of a tenant's subscriptions decides
    /// is its standing, not this order (see `ops::objects`), so a deletion of one subscription
    /// never overrides the creation of another in the same second.
    pub fn order(&self) -> EventOrder {
        let rank = match self.event_type.as_str() {
            "customer.subscription.created" => RANK_SUBSCRIPTION_CREATED,
            "customer.subscription.deleted" => RANK_SUBSCRIPTION_DELETED,
            "customer.subscription.updated"
            | "customer.subscription.paused"
            | "customer.subscription.resumed" => {
                let reached = self
                    .subscription_status()
                    .and_then(lifecycle_position)
                    .map_or(0, |position| {
                        2 + 2 * position + i64::from(self.changed_status())
                    });
                RANK_SUBSCRIPTION_UPDATE + reached
            }
            _ => RANK_OTHER,
        };
        EventOrder {
            created: self.created,
            rank,
            event_id: self.id.clone(),
        }
    }

    /// The status a subscription event leaves the subscription in: `canceled` for
    /// `customer.subscription.deleted` whatever its object says (a deleted subscription is
    /// over), the object's `status` for the other subscription events, none for any other event.
    pub fn subscription_status(&self) -> Option<&str> {
        match self.event_type.as_str() {
            "customer.subscription.deleted" => Some("canceled"),
            t if t.starts_with("customer.subscription.") => self.object_str("status"),
            _ => None,
        }
    }

    /// Whether `previous_attributes` (Stripe's diff on `*.updated` events) names a status.
    fn changed_status(&self) -> bool {
        self.previous_attributes
            .as_ref()
            .is_some_and(|previous| previous.contains_key("status"))
    }

    /// The Stripe customer the event is about: `customer` as an id or an expanded object, or
    /// the object itself when the event is about a customer.
    pub fn customer_id(&self) -> Option<&str> {
        match self.object.get("customer") {
            Some(Value::String(id)) if !id.is_empty() => return Some(id),
            Some(Value::Object(customer)) => {
                return customer.get("id").and_then(Value::as_str);
            }
            _ => {}
        }
        if self.object.get("object").and_then(Value::as_str) == Some("customer") {
            return self.object.get("id").and_then(Value::as_str);
        }
        None
    }

    pub fn object_str(&self, field: &str) -> Option<&str> {
        self.object
            .get(field)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
    }

    /// `metadata.tenant_id` on the object, the fallback when no mapping exists.
    pub fn metadata_tenant(&self) -> Option<&str> {
        self.object
            .get("metadata")
            .and_then(|m| m.get("tenant_id"))
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
    }

    /// Names of the plans a subscription is on: every item's price `lookup_key` and `nickname`,
    /// its plan `nickname`, and the legacy top-level `plan.nickname`.
    pub fn plan_names(&self) -> Vec<&str> {
        fn push_from<'a>(names: &mut Vec<&'a str>, holder: Option<&'a Value>) {
            if let Some(holder) = holder {
                for field in ["lookup_key", "nickname"] {
                    if let Some(name) = holder.get(field).and_then(Value::as_str) {
                        names.push(name);
                    }
                }
            }
        }
        let mut names = Vec::new();
        if let Some(items) = self
            .object
            .get("items")
            .and_then(|i| i.get("data"))
            .and_then(Value::as_array)
        {
            for item in items {
                push_from(&mut names, item.get("price"));
                push_from(&mut names, item.get("plan"));
            }
        }
        push_from(&mut names, self.object.get("plan"));
        names
    }

    /// `lookup_key`s of the features in an active entitlement summary.
    pub fn entitlement_lookup_keys(&self) -> Vec<&str> {
        self.object
            .get("entitlements")
            .and_then(|e| e.get("data"))
            .and_then(Value::as_array)
            .map(|items| {
                items
                    .iter()
                    .filter_map(|item| {
                        item.get("lookup_key")
                            .or_else(|| item.get("feature").and_then(|f| f.get("lookup_key")))
                            .and_then(Value::as_str)
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// A status's place in [`SUBSCRIPTION_STATUSES`], the two terminal ones sharing the last.
fn lifecycle_position(status: &str) -> Option<i64> {
    let index = SUBSCRIPTION_STATUSES.iter().position(|s| *s == status)?;
    let terminal = SUBSCRIPTION_STATUSES
        .iter()
        .position(|s| *s == "canceled")
        .unwrap_or(index);
    i64::try_from(index.min(terminal)).ok()
}

/// The latest `created` an event may have (give or take [`MAX_CREATED_AHEAD_S`]).
#[derive(Debug, Clone, Copy)]
enum Latest {
    /// A delivery's signature timestamp: Stripe signs events after creating them.
    Signed(i64),
    /// The sidecar's clock, for an export no signature vouches for.
    Now(i64),
}

/// `created` as Unix seconds that can be a real event's: not before 1970, and not after
/// `latest` (give or take [`MAX_CREATED_AHEAD_S`]).
fn plausible_created(value: &Value, latest: Latest) -> Result<i64, Error> {
    let created = value
        .as_i64()
        .ok_or_else(|| Error::NotAStripeEvent("`created` is not an integer timestamp".into()))?;
    if created < 0 {
        return Err(Error::NotAStripeEvent(format!(
            "`created` ({created}) is before 1970"
        )));
    }
    let (bound, what) = match latest {
        Latest::Signed(at) => (
            at,
            "the signature timestamp; Stripe signs events after creating them",
        ),
        Latest::Now(at) => (at, "now; an exported event cannot come from the future"),
    };
    if created > bound.saturating_add(MAX_CREATED_AHEAD_S) {
        return Err(Error::NotAStripeEvent(format!(
            "`created` ({created}) is more than {MAX_CREATED_AHEAD_S} s after {what} ({bound})"
        )));
    }
    Ok(created)
}

/// Ids the sidecar keeps in the event deduplication table for its own records (`Append`
/// idempotency keys); no event may claim one, or it could pass for (or block) such a record.
pub const RESERVED_ID_PREFIX: &str = "coresdk:";

fn required_string(event: &Map<String, Value>, field: &'static str) -> Result<String, Error> {
    match event.get(field) {
        Some(Value::String(s)) if !s.is_empty() && s.len() <= MAX_EVENT_FIELD_LEN => Ok(s.clone()),
        Some(Value::String(s)) if !s.is_empty() => Err(Error::NotAStripeEvent(format!(
            "`{field}` is longer than {MAX_EVENT_FIELD_LEN} characters"
        ))),
        _ => Err(Error::NotAStripeEvent(format!(
            "no `{field}` string in the event"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_what_is_not_an_event() {
        for body in [
            &b"not json"[..],
            b"[1,2]",
            br#"{"type":"invoice.paid"}"#,
            br#"{"id":"evt_1"}"#,
            br#"{"id":"","type":"invoice.paid"}"#,
            br#"{"id":"coresdk:append:k1","type":"invoice.paid","created":5}"#,
            br#"{"id":"evt_1","type":"invoice.paid","created":"yesterday"}"#,
        ] {
            assert!(matches!(
                StripeEvent::parse(body, 0),
                Err(Error::NotAStripeEvent(_))
            ));
        }
        // The reserved id above is refused for its prefix alone.
        let ordinary = br#"{"id":"evt_append:k1","type":"invoice.paid","created":5}"#;
        assert!(StripeEvent::parse(ordinary, 0).is_ok());
    }

    #[test]
    fn reads_customer_plans_and_entitlements() {
        let body = br#"{"id":"evt_1","type":"customer.subscription.updated","created":5,
            "data":{"object":{"customer":{"id":"cus_1"},"metadata":{"tenant_id":"t1"},
            "items":{"data":[{"price":{"lookup_key":"pro_monthly","nickname":"Pro"}}]},
            "plan":{"nickname":"Enterprise"},
            "entitlements":{"data":[{"lookup_key":"sso"},{"feature":{"lookup_key":"audit"}}]}}}}"#;
        let event = StripeEvent::parse(body, 0).expect("valid event");
        assert_eq!(event.created, 5);
        assert_eq!(event.customer_id(), Some("cus_1"));
        assert_eq!(event.metadata_tenant(), Some("t1"));
        assert_eq!(event.plan_names(), vec!["pro_monthly", "Pro", "Enterprise"]);
        assert_eq!(event.entitlement_lookup_keys(), vec!["sso", "audit"]);
    }

    #[test]
    fn created_must_be_a_plausible_unix_time() {
        let body = |created: &str| format!(r#"{{"id":"evt_1","type":"x","created":{created}}}"#);
        let signed_at = 1_700_000_000;
        for created in [
            i64::MAX.to_string(),
            (signed_at + MAX_CREATED_AHEAD_S + 1).to_string(),
            "-1".to_owned(),
            i64::MIN.to_string(),
            "1e300".to_owned(),
        ] {
            assert!(
                matches!(
                    StripeEvent::parse(body(&created).as_bytes(), signed_at),
                    Err(Error::NotAStripeEvent(_))
                ),
                "{created}"
            );
        }
        for created in [
            0,
            signed_at - 30 * 86_400,
            signed_at,
            signed_at + MAX_CREATED_AHEAD_S,
        ] {
            let event = StripeEvent::parse(body(&created.to_string()).as_bytes(), signed_at)
                .expect("plausible");
            assert_eq!(event.created, created);
        }
    }

    #[test]
    fn parsing_the_kept_payload_again_gives_the_same_event() {
        let body =
            br#"{"id":"evt_1","type":"invoice.paid","created":1699999999,"data":{"object":{"customer":"cus_1"}}}"#;
        let event = StripeEvent::parse(body, 1_700_000_000).expect("valid");
        assert_eq!(event.payload.bytes(), body);
        let again = StripeEvent::parse(event.payload.bytes(), event.signed_at).expect("valid");
        assert_eq!(
            (again.id, again.created, again.object),
            (event.id, event.created, event.object)
        );
    }

    #[test]
    fn an_exported_event_needs_a_created_that_is_not_in_the_future() {
        let now = 1_700_000_000;
        let missing = StripeEvent::parse_exported(br#"{"id":"evt_1","type":"x"}"#, now);
        assert!(matches!(missing, Err(Error::NotAStripeEvent(m)) if m.contains("`created`")));
        let ahead = format!(
            r#"{{"id":"evt_1","type":"x","created":{}}}"#,
            now + MAX_CREATED_AHEAD_S + 1
        );
        let ahead = StripeEvent::parse_exported(ahead.as_bytes(), now);
        assert!(matches!(ahead, Err(Error::NotAStripeEvent(m)) if m.contains("after now")));
        let old = br#"{"id":"evt_1","type":"x","created":1000}"#;
        let event = StripeEvent::parse_exported(old, now).expect("an old event is fine");
        assert_eq!(event.created, 1000);
    }

    #[test]
    fn every_event_needs_created() {
        for body in [
            &br#"{"id":"evt_1","type":"x"}"#[..],
            br#"{"id":"evt_1","type":"x","created":null}"#,
        ] {
            for parsed in [
                StripeEvent::parse(body, 77),
                StripeEvent::parse_exported(body, 77),
            ] {
                assert!(
                    matches!(parsed, Err(Error::NotAStripeEvent(ref m)) if m == "no `created` in the event; Stripe always sends one"),
                    "{parsed:?}"
                );
            }
        }
    }

    fn order_of(id: &str, event_type: &str, status: Option<&str>, previous: bool) -> EventOrder {
        let mut data = serde_json::json!({"object": {"status": status}});
        if previous {
            data["previous_attributes"] = serde_json::json!({"status": "active"});
        }
        let body = serde_json::json!({"id": id, "type": event_type, "created": 9, "data": data});
        StripeEvent::parse(body.to_string().as_bytes(), 9)
            .expect("valid")
            .order()
    }

    #[test]
    fn the_tie_rule_orders_a_second_by_lifecycle() {
        // Ascending, each with an id that would sort it first if ids decided.
        let ascending = [
            order_of(
                "evt_z",
                "customer.subscription.created",
                Some("active"),
                false,
            ),
            order_of("evt_y", "invoice.payment_failed", None, false),
            order_of("evt_x", "customer.subscription.updated", None, false),
            order_of(
                "evt_w",
                "customer.subscription.updated",
                Some("trialing"),
                false,
            ),
            order_of(
                "evt_v",
                "customer.subscription.resumed",
                Some("active"),
                false,
            ),
            order_of(
                "evt_u",
                "customer.subscription.updated",
                Some("past_due"),
                false,
            ),
            order_of(
                "evt_t",
                "customer.subscription.updated",
                Some("past_due"),
                true,
            ),
            order_of(
                "evt_s",
                "customer.subscription.updated",
                Some("unpaid"),
                true,
            ),
            order_of(
                "evt_r",
                "customer.subscription.paused",
                Some("paused"),
                false,
            ),
            order_of(
                "evt_q",
                "customer.subscription.updated",
                Some("canceled"),
                true,
            ),
            order_of(
                "evt_p",
                "customer.subscription.deleted",
                Some("active"),
                false,
            ),
        ];
        for pair in ascending.windows(2) {
            assert!(pair[0] < pair[1], "{:?} < {:?}", pair[0], pair[1]);
        }
        // Same second, same rank: the id decides, so no two events ever tie.
        let a = order_of(
            "evt_a",
            "customer.subscription.updated",
            Some("canceled"),
            false,
        );
        let b = order_of(
            "evt_b",
            "customer.subscription.updated",
            Some("incomplete_expired"),
            false,
        );
        assert_eq!(a.rank, b.rank);
        assert!(a < b);
        // An earlier second always comes first, whatever the rank.
        let mut earlier = order_of("evt_z", "customer.subscription.deleted", None, false);
        earlier.created = 8;
        assert!(earlier < ascending[0]);
    }

    #[test]
    fn deleted_subscriptions_are_canceled_whatever_the_object_says() {
        let body = br#"{"id":"evt_1","type":"customer.subscription.deleted","created":0,"data":{"object":{"status":"active"}}}"#;
        let event = StripeEvent::parse(body, 0).expect("valid");
        assert_eq!(event.subscription_status(), Some("canceled"));
        let body = br#"{"id":"evt_1","type":"invoice.paid","created":0,"data":{"object":{"status":"paid"}}}"#;
        let event = StripeEvent::parse(body, 0).expect("valid");
        assert_eq!(event.subscription_status(), None);
    }
}
