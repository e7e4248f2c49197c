use super::*;
use serde_json::Value;

const KIND: Kind = Kind {
    event: "test.coalesced",
    outcome: "counted",
    key_fields: &["key"],
};

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key(String);

impl CoalesceKey for Key {
    fn bytes(&self) -> usize {
        self.0.len()
    }

    fn reason(&self) -> &'static str {
        if self.0.starts_with("late") {
            "late"
        } else {
            "early"
        }
    }
}

fn record(key: &str) -> NewAuditRecord {
    let mut metadata = Map::new();
    metadata.insert(
        "key".into(),
        json!(key.chars().take(64).collect::<String>()),
    );
    metadata.insert("detail".into(), json!(format!("this occurrence of {key}")));
    NewAuditRecord {
        tenant_id: key.chars().take(64).collect(),
        actor: "tester".into(),
        event: KIND.event.into(),
        outcome: KIND.outcome.into(),
        metadata,
    }
}

fn admit(coalescer: &Coalescer<Key>, key: &str) -> Admitted {
    coalescer.admit(Key(key.to_owned()), || record(key))
}

fn drain(inbox: &mut AuditInbox) -> Vec<NewAuditRecord> {
    let mut records = Vec::new();
    while let Ok(record) = inbox.0.try_recv() {
        records.push(record);
    }
    records
}

fn count(record: &NewAuditRecord) -> u64 {
    record.metadata["count"]
        .as_u64()
        .expect("every record has a count")
}

fn coalesced(record: &NewAuditRecord) -> Option<&str> {
    record.metadata.get("coalesced").and_then(Value::as_str)
}

#[test]
fn the_first_is_written_at_once_and_the_repeats_when_the_window_expires() {
    let (queue, mut inbox) = audit_queue();
    let coalescer = Coalescer::new(KIND, Duration::from_millis(300), queue);
    for _ in 0..50 {
        admit(&coalescer, "a");
    }
    admit(&coalescer, "b");
    let first = drain(&mut inbox);
    assert_eq!(first.len(), 2, "one record per key so far: {first:?}");
    assert!(
        first
            .iter()
            .all(|r| count(r) == 1 && coalesced(r).is_none())
    );
    assert_eq!(first[0].metadata["key"], "a");

    coalescer.flush(false);
    assert!(drain(&mut inbox).is_empty(), "the window is still open");

    std::thread::sleep(Duration::from_millis(400));
    // No further call for "a": the periodic flush alone must report its repeats.
    coalescer.flush(false);
    let repeats = drain(&mut inbox);
    assert_eq!(repeats.len(), 1, "b had no repeats: {repeats:?}");
    assert_eq!(
        (count(&repeats[0]), coalesced(&repeats[0])),
        (49, Some("repeats"))
    );
    assert_eq!(repeats[0].metadata["key"], "a", "the first record's fields");
    assert!(repeats[0].metadata["since_ms"].is_i64());

    admit(&coalescer, "a");
    let reopened = drain(&mut inbox);
    assert_eq!(
        reopened.len(),
        1,
        "a new window opens with a record at once"
    );
    assert_eq!(count(&reopened[0]), 1);
}

#[test]
fn closing_reports_every_open_window() {
    let (queue, mut inbox) = audit_queue();
    let coalescer = Coalescer::new(KIND, Duration::from_secs(3600), queue);
    for key in ["a", "b", "c"] {
        for _ in 0..10 {
            admit(&coalescer, key);
        }
    }
    drain(&mut inbox);
    coalescer.flush(true);
    let repeats = drain(&mut inbox);
    assert_eq!(repeats.len(), 3);
    assert!(repeats.iter().all(|r| count(r) == 9));
    coalescer.flush(true);
    assert!(
        drain(&mut inbox).is_empty(),
        "a count is reported once only"
    );
}

#[test]
fn a_fresh_key_on_every_call_is_bounded_per_window_and_every_occurrence_counted() {
    let (queue, mut inbox) = audit_queue();
    let coalescer = Coalescer::new(KIND, Duration::from_secs(3600), queue);
    let occurrences = 3 * u64::from(MAX_RECORDS_PER_WINDOW);
    for i in 0..occurrences {
        admit(&coalescer, &format!("tenant-{i}"));
    }
    let written = drain(&mut inbox);
    assert_eq!(written.len(), MAX_RECORDS_PER_WINDOW as usize);

    coalescer.flush(false);
    let overflow = drain(&mut inbox);
    assert_eq!(overflow.len(), 1, "{overflow:?}");
    assert_eq!(coalesced(&overflow[0]), Some("overflow"));
    assert_eq!(
        (overflow[0].tenant_id.as_str(), overflow[0].actor.as_str()),
        ("", OVERFLOW_ACTOR)
    );
    assert_eq!(
        (overflow[0].event.as_str(), overflow[0].outcome.as_str()),
        (KIND.event, KIND.outcome)
    );

    for i in 0..10 {
        admit(&coalescer, &format!("late-{i}"));
    }
    coalescer.flush(false);
    assert!(
        drain(&mut inbox).is_empty(),
        "one overflow record per window: the next waits for the window to pass"
    );
    coalescer.flush(true);
    let closing = drain(&mut inbox);
    let total: u64 = written
        .iter()
        .chain(&overflow)
        .chain(&closing)
        .map(count)
        .sum();
    assert_eq!(total, occurrences + 10, "every occurrence is in some count");
}

#[test]
fn a_full_queue_turns_records_into_overflow_not_loss() {
    let (queue, mut inbox) = audit_queue();
    for i in 0..QUEUE_CAPACITY {
        queue.0.try_send(record(&i.to_string())).expect("room");
    }
    let coalescer = Coalescer::new(KIND, Duration::from_secs(3600), queue);
    for i in 0..20 {
        admit(&coalescer, &format!("k{i}"));
    }
    coalescer.flush(false);
    assert_eq!(drain(&mut inbox).len(), QUEUE_CAPACITY, "nothing got in");
    coalescer.flush(true);
    let overflow = drain(&mut inbox);
    assert_eq!(overflow.len(), 1);
    assert_eq!(count(&overflow[0]), 20);
}

#[test]
fn memory_is_bounded_whatever_the_key_space() {
    let (queue, mut inbox) = audit_queue();
    let coalescer = Coalescer::new(KIND, Duration::from_secs(3600), queue);
    let big = "k".repeat(16 * 1024);
    let keys = 2_000;
    let mut written = Vec::new();
    for i in 0..keys {
        admit(&coalescer, &format!("{big}{i}"));
        admit(&coalescer, &format!("{big}{i}"));
        if i % 250 == 0 {
            written.extend(drain(&mut inbox));
        }
    }
    let tracked = coalescer.tracked();
    let fits = MAX_TRACKED_BYTES / (16 * 1024);
    assert!(
        tracked <= fits,
        "{tracked} keys of 16 KiB tracked, {fits} fit the bound"
    );
    assert!(tracked > 0);
    coalescer.flush(true);
    written.extend(drain(&mut inbox));
    coalescer.flush(true);
    written.extend(drain(&mut inbox));
    assert_eq!(
        written.iter().map(count).sum::<u64>(),
        2 * keys,
        "evicted windows report their counts"
    );
}

#[test]
fn a_zero_window_writes_each_occurrence_within_the_budget() {
    let (queue, mut inbox) = audit_queue();
    let coalescer = Coalescer::new(KIND, Duration::ZERO, queue);
    for _ in 0..5 {
        admit(&coalescer, "same");
    }
    let written = drain(&mut inbox);
    assert_eq!(written.len(), 5);
    assert!(written.iter().all(|r| count(r) == 1));
}

#[test]
fn a_repeats_record_keeps_the_key_not_the_first_occurrences_details() {
    let (queue, mut inbox) = audit_queue();
    let coalescer = Coalescer::new(KIND, Duration::from_secs(3600), queue);
    assert_eq!(admit(&coalescer, "a"), Admitted::Opened);
    for _ in 0..4 {
        assert_eq!(admit(&coalescer, "a"), Admitted::Counted);
    }
    let first = drain(&mut inbox);
    assert_eq!(first[0].metadata["detail"], "this occurrence of a");
    coalescer.flush(true);
    let repeats = drain(&mut inbox);
    assert_eq!(repeats.len(), 1);
    let fields: Vec<&str> = repeats[0].metadata.keys().map(String::as_str).collect();
    assert_eq!(fields, ["coalesced", "count", "key", "since_ms"]);
    assert_eq!(
        (repeats[0].tenant_id.as_str(), repeats[0].actor.as_str()),
        ("a", "tester"),
        "the key's own fields stay"
    );
    assert_eq!(count(&repeats[0]), 4);
}

#[test]
fn a_flood_of_new_keys_does_not_hide_the_repeats_of_open_windows() {
    let (queue, mut inbox) = audit_queue();
    let coalescer = Coalescer::new(KIND, Duration::from_secs(3600), queue);
    admit(&coalescer, "real");
    let flood = 2 * u64::from(MAX_RECORDS_PER_WINDOW);
    let mut written = Vec::new();
    for i in 0..flood {
        admit(&coalescer, &format!("flood-{i}"));
        if i % 512 == 0 {
            written.extend(drain(&mut inbox));
        }
    }
    for _ in 0..7 {
        admit(&coalescer, "real");
    }
    for i in 0..3 {
        assert_eq!(admit(&coalescer, &format!("late-{i}")), Admitted::Counted);
    }
    coalescer.flush(true);
    written.extend(drain(&mut inbox));
    coalescer.flush(true);
    written.extend(drain(&mut inbox));

    let real: Vec<_> = written.iter().filter(|r| r.tenant_id == "real").collect();
    assert_eq!(real.len(), 2, "its first and its repeats: {real:?}");
    assert_eq!((count(real[1]), coalesced(real[1])), (7, Some("repeats")));

    let overflow: Vec<_> = written
        .iter()
        .filter(|r| coalesced(r) == Some("overflow"))
        .collect();
    assert_eq!(overflow.len(), 1, "{overflow:?}");
    // The first key took one of the budget's windows before the flood.
    let flooded = flood + 1 - u64::from(MAX_RECORDS_PER_WINDOW);
    assert_eq!(
        overflow[0].metadata["reasons"],
        json!({"early": flooded, "late": 3}),
        "the overflow says what it counted"
    );
    assert_eq!(count(overflow[0]), flooded + 3);
    assert_eq!(
        written.iter().map(count).sum::<u64>(),
        flood + 8 + 3,
        "every occurrence is in some count"
    );
}
