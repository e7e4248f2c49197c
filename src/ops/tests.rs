//! The domain operations over the in-memory store (SQLite in memory: the production engine),
//! without any adapter in between.

use std::sync::Arc;

use serde_json::json;

use super::*;
use crate::audit::AuditRecord;
use crate::feeds::Feeds;
use crate::flags::FlagCache;
use crate::rules::Rules;
use crate::store::{AuditQuery, Outcome, Store, StoreUrl};
use crate::stripe::{SignatureVerifier, StripeEvent, sign_header};

const NOW_MS: i64 = 1_700_000_000_000;
const ADMIN: AdminChange<'static> = AdminChange {
    actor: "ops@example.com",
    claimed_actor: None,
    reason: "contract 42",
};

struct Fixture {
    store: Store,
    feeds: Arc<Feeds>,
    rules: Arc<Rules>,
}

impl Fixture {
    fn new() -> Self {
        let rules = Arc::new(Rules::built_in().expect("built-in rules"));
        let cache = Arc::new(FlagCache::new(rules.catalog().clone()));
        let feeds = Arc::new(Feeds::new(cache.clone()));
        let store =
            Store::open(&StoreUrl::Memory, None, feeds.clone(), cache).expect("memory store");
        Self {
            store,
            feeds,
            rules,
        }
    }

    async fn map(&self, customer: &'static str, tenant: &'static str) -> Option<String> {
        self.map_at(customer, tenant, NOW_MS).await
    }

    async fn map_at(
        &self,
        customer: &'static str,
        tenant: &'static str,
        now_ms: i64,
    ) -> Option<String> {
        let rules = self.rules.clone();
        self.store
            .write(move |tx| {
                map_customer(
                    tx,
                    &rules,
                    ParkingLimits::DEFAULT,
                    customer,
                    tenant,
                    &ADMIN,
                    now_ms,
                )
            })
            .await
            .expect("mapped")
            .previous
    }

    async fn deliver(&self, event: StripeEvent) -> Result<WebhookResult, Error> {
        self.deliver_at(event, NOW_MS).await
    }

    async fn deliver_at(&self, event: StripeEvent, now_ms: i64) -> Result<WebhookResult, Error> {
        let rules = self.rules.clone();
        self.store
            .write(move |tx| {
                apply_webhook(
                    tx,
                    &rules,
                    ParkingLimits::DEFAULT,
                    &event,
                    &Delivery::STRIPE,
                    now_ms,
                )
            })
            .await
            .expect("the transaction commits")
    }

    fn is_on(&self, tenant: &str, key: &str) -> bool {
        self.feeds.flags.is_on(tenant, key)
    }

    async fn audit(&self) -> Vec<AuditRecord> {
        self.store
            .read(|tx| {
                Ok(tx.query_audit(&AuditQuery {
                    through_seq: u64::MAX,
                    limit: 1000,
                    ..Default::default()
                })?)
            })
            .await
            .expect("query")
    }

    async fn verify(&self) -> VerifyReport {
        self.store.read(verify_chain).await.expect("verify")
    }
}

fn event(id: &str, event_type: &str, created: i64, object: serde_json::Value) -> StripeEvent {
    let body =
        json!({"id": id, "type": event_type, "created": created, "data": {"object": object}});
    StripeEvent::parse(body.to_string().as_bytes(), created).expect("an event")
}

#[tokio::test]
async fn a_paid_invoice_turns_features_on_once() {
    let fx = Fixture::new();
    fx.map("cus_1", "acme").await;
    let paid = event("evt_1", "invoice.paid", 100, json!({"customer": "cus_1"}));
    let first = fx.deliver(paid.clone()).await.expect("applied");
    assert_eq!(
        (first.outcome, first.tenant_id.as_str()),
        (Outcome::Applied, "acme")
    );
    assert!(
        first
            .flag_changes
            .iter()
            .any(|c| c.key == "pro_features" && c.new_value == FlagValue::Bool(true))
    );
    assert!(
        fx.is_on("acme", "pro_features"),
        "the cache follows the commit"
    );

    let again = fx.deliver(paid).await.expect("answered");
    assert_eq!(again.outcome, Outcome::Duplicate);
    assert!(again.flag_changes.is_empty());

    let events: Vec<String> = fx.audit().await.into_iter().map(|r| r.event).collect();
    assert_eq!(
        events,
        [
            "tenant.customer_mapped",
            "billing.invoice.paid",
            "billing.invoice.paid"
        ]
    );
    let report = fx.verify().await;
    assert!(report.ok && report.records_checked == 3, "{report:?}");
}

#[tokio::test]
async fn an_older_event_never_overwrites_a_newer_one() {
    let fx = Fixture::new();
    fx.map("cus_1", "acme").await;
    fx.deliver(event(
        "evt_new",
        "invoice.paid",
        200,
        json!({"customer": "cus_1"}),
    ))
    .await
    .expect("applied");
    let late = fx
        .deliver(event(
            "evt_old",
            "invoice.payment_failed",
            100,
            json!({"customer": "cus_1"}),
        ))
        .await
        .expect("answered");
    assert_eq!(late.outcome, Outcome::Stale);
    assert!(late.stale_flags.contains(&"pro_features".to_owned()));
    assert!(fx.is_on("acme", "pro_features"));
    assert!(!fx.is_on("acme", "paywall_active"));
}

#[tokio::test]
async fn unknown_customers_are_refused_and_parked_until_mapped_and_unruled_events_ignored() {
    let fx = Fixture::new();
    let refused = fx
        .deliver(event(
            "evt_1",
            "invoice.paid",
            100,
            json!({"customer": "cus_x"}),
        ))
        .await;
    assert!(matches!(refused, Err(Error::UnknownCustomer(c)) if c == "cus_x"));
    let ignored = fx
        .deliver(event(
            "evt_2",
            "charge.refunded",
            100,
            json!({"customer": "cus_x"}),
        ))
        .await
        .expect("answered");
    assert_eq!(ignored.outcome, Outcome::Ignored);
    // The refused one was parked (the unruled one was not): the mapping applies it, and
    // Stripe's retry is then a duplicate.
    fx.map("cus_x", "globex").await;
    assert!(fx.is_on("globex", "pro_features"));
    let retried = fx
        .deliver(event(
            "evt_1",
            "invoice.paid",
            100,
            json!({"customer": "cus_x"}),
        ))
        .await
        .expect("answered");
    assert_eq!(retried.outcome, Outcome::Duplicate);
    let audit = fx.audit().await;
    let outcomes: Vec<&str> = audit.iter().map(|r| r.outcome.as_str()).collect();
    assert_eq!(
        outcomes,
        ["rejected", "ignored", "applied", "applied", "duplicate"]
    );
    assert_eq!(audit[0].metadata["parked"], json!(true));
    assert_eq!(audit[2].metadata["parked_events"], json!(1));
    assert_eq!(audit[3].metadata["parked_at_ms"], json!(NOW_MS));
}

#[tokio::test]
async fn checkout_records_the_mapping_and_metadata_names_a_tenant() {
    let fx = Fixture::new();
    let checkout = fx
        .deliver(event(
            "evt_c",
            "checkout.session.completed",
            100,
            json!({"customer": "cus_new", "client_reference_id": "initech"}),
        ))
        .await
        .expect("applied");
    assert_eq!(
        (checkout.outcome, checkout.tenant_id.as_str()),
        (Outcome::Applied, "initech")
    );
    let tenant = fx
        .store
        .read(|tx| Ok(tx.tenant_of_customer("cus_new")?))
        .await
        .expect("read");
    assert_eq!(tenant.as_deref(), Some("initech"));
    let by_metadata = fx
        .deliver(event(
            "evt_m",
            "invoice.paid",
            100,
            json!({"customer": "cus_other", "metadata": {"tenant_id": "hooli"}}),
        ))
        .await
        .expect("applied");
    assert_eq!(by_metadata.tenant_id, "hooli");
}

#[tokio::test]
async fn admin_changes_are_audited_with_actor_and_reason() {
    let fx = Fixture::new();
    let written = fx
        .store
        .write(|tx| set_flag(tx, "acme", "seats", FlagValue::Number(25.0), &ADMIN, NOW_MS))
        .await
        .expect("set");
    assert_eq!((written.origin, written.version), (FlagOrigin::Admin, 1));
    assert_eq!(fx.map("cus_1", "acme").await, None);
    assert_eq!(fx.map("cus_1", "acme").await.as_deref(), Some("acme"));
    let removed = fx
        .store
        .write(|tx| unmap_customer(tx, "cus_1", &ADMIN, NOW_MS))
        .await
        .expect("unmapped");
    assert_eq!(removed.as_deref(), Some("acme"));
    let nothing = fx
        .store
        .write(|tx| unmap_customer(tx, "cus_1", &ADMIN, NOW_MS))
        .await
        .expect("unmapped");
    assert_eq!(nothing, None);

    let records = fx.audit().await;
    let events: Vec<&str> = records.iter().map(|r| r.event.as_str()).collect();
    // Mapping to the same tenant again and unmapping nothing change nothing, so audit nothing.
    assert_eq!(
        events,
        [
            "flag.set",
            "tenant.customer_mapped",
            "tenant.customer_unmapped"
        ]
    );
    assert!(records.iter().all(|r| r.actor == "ops@example.com"));
    assert_eq!(records[0].metadata["reason"], "contract 42");
    assert_eq!(records[0].metadata["new_value"], "25");
}

#[tokio::test]
async fn a_failed_operation_leaves_no_trace() {
    let fx = Fixture::new();
    let failed: Result<(), Error> = fx
        .store
        .write(|tx| {
            set_flag(tx, "acme", "seats", FlagValue::Number(1.0), &ADMIN, NOW_MS)?;
            Err(Error::Internal("changed my mind".into()))
        })
        .await;
    assert!(failed.is_err());
    assert!(fx.audit().await.is_empty());
    assert!(fx.feeds.flags.current("acme", "seats").is_none());
    // The chain continues from where the store is, not from the rolled-back record.
    fx.map("cus_1", "acme").await;
    assert_eq!(fx.audit().await[0].seq, 1);
}

#[test]
fn deliveries_are_checked_for_size_signature_and_shape() {
    let verifier = SignatureVerifier::new(vec!["whsec_unit".into()], 300);
    let now = 1_700_000_000;
    let body = br#"{"id":"evt_1","type":"invoice.paid","created":1700000000}"#;
    let header = sign_header("whsec_unit", now, body);
    let event = verify_delivery(&verifier, 1024, body, &header, now).expect("valid");
    assert_eq!(event.id, "evt_1");
    assert!(matches!(
        verify_delivery(&verifier, 16, body, &header, now),
        Err(Error::PayloadTooLarge { .. })
    ));
    assert!(matches!(
        verify_delivery(
            &verifier,
            1024,
            body,
            &sign_header("whsec_other", now, body),
            now
        ),
        Err(Error::SignatureMismatch)
    ));
    let not_an_event = b"[1,2,3]";
    let header = sign_header("whsec_unit", now, not_an_event);
    assert!(matches!(
        verify_delivery(&verifier, 1024, not_an_event, &header, now),
        Err(Error::NotAStripeEvent(_))
    ));
}

#[test]
fn refused_deliveries_keep_a_bounded_claim_and_misconfiguration_is_not_audited() {
    let body = br#"{"id":"evt_forged","type":"invoice.paid"}"#;
    let record = refused_delivery_record(&Error::SignatureMismatch, body);
    assert_eq!(
        (
            record.event.as_str(),
            record.outcome.as_str(),
            record.tenant_id.as_str()
        ),
        ("billing.webhook.refused", "rejected", "")
    );
    assert_eq!(record.metadata["reason"], "SIGNATURE_MISMATCH");
    assert_eq!(record.metadata["claimed_event_id"], "evt_forged");
    assert_eq!(record.metadata["claimed_event_type"], "invoice.paid");
    assert_eq!(record.metadata["payload_bytes"], body.len());

    let long_id = format!(r#"{{"id":"{}","type":"t"}}"#, "x".repeat(1000));
    let record = refused_delivery_record(&Error::SignatureMismatch, long_id.as_bytes());
    assert_eq!(
        record.metadata["claimed_event_id"].as_str().map(str::len),
        Some(255)
    );

    assert!(audits_refusal(&Error::SignatureMismatch));
    assert!(!audits_refusal(&Error::WebhookSecretMissing));
}

#[test]
fn only_a_small_prefix_of_an_unverified_body_is_read() {
    // Stripe's order: `id` first, the (large) `data`, `type` last.
    let mut body =
        br#"{"id":"evt_big","object":"event","data":{"object":{"id":"in_1","note":""#.to_vec();
    body.extend(std::iter::repeat_n(b'x', 8 * 1024 * 1024));
    body.extend_from_slice(br#""}},"type":"invoice.paid"}"#);
    assert_eq!(
        claimed_identity(&body),
        ClaimedIdentity {
            id: Some("evt_big".into()),
            event_type: None,
        },
        "the id is in the prefix, the type past it, and the nested id is not the event's"
    );
    let buried = format!(
        r#"{{"pad":"{}","id":"evt_late"}}"#,
        "p".repeat(CLAIM_PREFIX_BYTES)
    );
    assert_eq!(
        claimed_identity(buried.as_bytes()),
        ClaimedIdentity::default()
    );
    for junk in [&b"[1,2,3]"[..], b"", b"{", b"{\"id\":7}", b"\xff\xfe"] {
        assert_eq!(claimed_identity(junk), ClaimedIdentity::default());
    }
}

#[test]
fn ids_keys_and_texts_are_validated() {
    assert!(validate_id("tenant_id", "acme-corp").is_ok());
    for bad in ["", "has space", "tab\there", &"x".repeat(MAX_ID_LEN + 1)] {
        assert!(validate_id("tenant_id", bad).is_err(), "{bad:?}");
    }
    assert!(validate_flag_key("key", "pro_features:v2").is_ok());
    assert!(validate_flag_key("key", "bad key").is_err());
    assert!(required_text("actor", "  ", 10).is_err());
    assert!(required_text("actor", "ops", 2).is_err());
    assert!(validate_reason(&"r".repeat(1025)).is_err());
    assert!(validate_reason("").is_ok());
}

#[test]
fn ids_are_printable_and_bounded() {
    for good in [
        "acme-corp",
        "cus_NffrFeUfNV2Hib",
        "müller-gmbh",
        "東京-株式会社",
        "org:42/eu",
    ] {
        assert_eq!(id_defect(good), None, "{good:?}");
    }
    assert_eq!(id_defect(&"é".repeat(MAX_ID_LEN / 2)), None);
    assert_eq!(id_defect(""), Some(IdDefect::Empty));
    assert_eq!(
        id_defect(&"é".repeat(MAX_ID_LEN / 2 + 1)),
        Some(IdDefect::TooLong)
    );
    for (bad, code_point) in [
        ("acme\u{202E}corp", 0x202E), // right-to-left override
        ("acme\u{2066}corp", 0x2066), // left-to-right isolate
        ("acme\u{200B}corp", 0x200B), // zero-width space
        ("acme\u{200D}corp", 0x200D), // zero-width joiner
        ("acme\u{FEFF}corp", 0xFEFF), // byte order mark
        ("acme\u{2028}corp", 0x2028), // line separator
        ("acme\u{00AD}corp", 0x00AD), // soft hyphen, a format character
        ("acme\u{E000}corp", 0xE000), // private use
        ("acme\u{0085}corp", 0x0085), // next line, a control
        ("acme\u{00A0}corp", 0x00A0), // no-break space
        ("acme\u{0378}corp", 0x0378), // unassigned
        ("acme\tcorp", 0x09),
    ] {
        assert_eq!(
            id_defect(bad),
            Some(IdDefect::Unprintable {
                code_point,
                position: 5
            }),
            "{bad:?}"
        );
    }
    let refused = validate_id("tenant_id", "acme\u{202E}corp").expect_err("refused");
    assert!(refused.to_string().contains("U+202E"), "{refused}");
}

mod parking;
mod retention;
