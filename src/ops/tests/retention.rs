//! Pruning dedup records by age, with explicit timestamps; tests/secrets_and_retention.rs
//! covers the background pass against the binary.

use super::*;

const DAY_MS: i64 = 86_400_000;

impl Fixture {
    async fn prune(&self, before_ms: i64, limit: u64) -> u64 {
        self.store
            .write(move |tx| Ok(tx.prune_processed(before_ms, limit)?))
            .await
            .expect("pruned")
    }

    async fn is_recorded(&self, event_id: &'static str) -> bool {
        self.store
            .read(move |tx| Ok(tx.processed_event(event_id)?))
            .await
            .expect("read")
            .is_some()
    }
}

fn paid(id: &str, created: i64) -> StripeEvent {
    event(id, "invoice.paid", created, json!({"customer": "cus_1"}))
}

fn failed(id: &str, created: i64) -> StripeEvent {
    event(
        id,
        "invoice.payment_failed",
        created,
        json!({"customer": "cus_1"}),
    )
}

#[tokio::test]
async fn only_records_older_than_the_cutoff_and_no_flag_names_go_oldest_first_and_the_audit_stays()
{
    let fx = Fixture::new();
    fx.map("cus_1", "acme").await;
    // evt_a sets both flags, evt_a2 confirms them, evt_b turns both over (it sets them now)
    // and evt_c, much later, confirms them (the flags' newest event).
    fx.deliver_at(failed("evt_a", 100), NOW_MS)
        .await
        .expect("a");
    fx.deliver_at(failed("evt_a2", 101), NOW_MS + 1)
        .await
        .expect("a2");
    fx.deliver_at(paid("evt_b", 102), NOW_MS + 2)
        .await
        .expect("b");
    fx.deliver_at(paid("evt_c", 103), NOW_MS + 10 * DAY_MS)
        .await
        .expect("c");
    let audited = fx.audit().await.len();
    let cutoff = NOW_MS + 5 * DAY_MS;

    // A batch is bounded, and takes the oldest first.
    assert_eq!(fx.prune(cutoff, 1).await, 1);
    assert!(!fx.is_recorded("evt_a").await);
    assert!(fx.is_recorded("evt_a2").await);
    assert_eq!(fx.prune(cutoff, 500).await, 1);
    // evt_b is old but still what set the flags: `flags explain` finds its record through it.
    assert_eq!(fx.prune(cutoff, 500).await, 0);
    assert!(fx.is_recorded("evt_b").await);
    assert!(fx.is_recorded("evt_c").await);
    assert_eq!(
        fx.audit().await.len(),
        audited,
        "the audit trail is never pruned"
    );
    assert!(fx.verify().await.ok);

    // A pruned event is no longer a duplicate: it is decided afresh, and as the flags have
    // newer events it is stale; a kept one is still a duplicate.
    let again = fx
        .deliver_at(failed("evt_a", 100), cutoff)
        .await
        .expect("a again");
    assert_eq!(again.outcome, Outcome::Stale);
    let kept = fx
        .deliver_at(paid("evt_b", 102), cutoff)
        .await
        .expect("b again");
    assert_eq!(kept.outcome, Outcome::Duplicate);
}

#[tokio::test]
async fn a_pruned_event_replayed_by_hand_is_decided_against_the_flags_as_they_are() {
    let fx = Fixture::new();
    fx.map("cus_1", "acme").await;
    fx.deliver_at(paid("evt_a", 100), NOW_MS).await.expect("a");
    fx.deliver_at(failed("evt_b", 101), NOW_MS + 1)
        .await
        .expect("b");
    assert!(!fx.is_on("acme", "pro_features"));
    fx.store
        .write(|tx| {
            set_flag(
                tx,
                "acme",
                "pro_features",
                FlagValue::Bool(true),
                &ADMIN,
                NOW_MS + 2,
            )
        })
        .await
        .expect("an operator turns it on");
    assert_eq!(
        fx.prune(NOW_MS + 3, 500).await,
        1,
        "evt_a, which no flag names"
    );
    let again = fx
        .deliver_at(paid("evt_a", 100), NOW_MS + 4)
        .await
        .expect("a again");
    // The later event and the operator's change win: the event is stale, not a duplicate.
    assert_eq!(again.outcome, Outcome::Stale);
    assert!(fx.is_on("acme", "pro_features"));
    assert!(fx.is_on("acme", "paywall_active"));
}

#[tokio::test]
async fn an_append_key_older_than_the_cutoff_appends_again() {
    let fx = Fixture::new();
    let append = |now_ms: i64| {
        fx.store.write(move |tx| {
            append_once(
                tx,
                NewAuditRecord {
                    tenant_id: "acme".into(),
                    actor: "billing-job".into(),
                    event: "app.invoice_sent".into(),
                    outcome: "sent".into(),
                    metadata: serde_json::Map::new(),
                },
                "invoice-42",
                now_ms,
            )
        })
    };
    let first = append(NOW_MS).await.expect("appended").seq;
    assert_eq!(append(NOW_MS + 1).await.expect("retried").seq, first);
    assert_eq!(fx.prune(NOW_MS + DAY_MS, 500).await, 1);
    let again = append(NOW_MS + DAY_MS).await.expect("appended again").seq;
    assert!(again > first, "the key was forgotten: a new record");
}
