//! Exported Stripe events, as an operator replays them: the page Stripe's List Events returns
//! (`{"object": "list", "data": [event, …], "has_more": …}`, newest first), one event per line
//! (JSON Lines, blank lines allowed), or a single event. Each event keeps its exact bytes.

use std::fmt;
use std::io::Read;

use serde::Deserialize;
use serde_json::value::RawValue;

/// The largest export read: it is held in memory whole, like a List Events page would be.
pub const MAX_EXPORT_BYTES: u64 = 256 * 1024 * 1024;

/// Where an event sits in the export, for messages an operator can act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Position {
    /// Index in a list's `data`.
    Index(usize),
    /// 1-based line of a JSON Lines file.
    Line(usize),
    /// The file is one event.
    Whole,
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Position::Index(i) => write!(f, "data[{i}]"),
            Position::Line(n) => write!(f, "line {n}"),
            Position::Whole => f.write_str("the event"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("cannot read it: {0}")]
    Read(#[from] std::io::Error),
    #[error(
        "it is larger than {MAX_EXPORT_BYTES} bytes; split it (one event per line) and replay the parts"
    )]
    TooLarge,
    #[error("it is not JSON: {0}")]
    NotJson(serde_json::Error),
    #[error(
        "it is neither a List Events page ({{\"object\": \"list\", \"data\": [...]}}), one event per line, nor one event"
    )]
    Shape,
    #[error("{position}: {message}")]
    Event { position: Position, message: String },
    #[error("it holds no events")]
    Empty,
}

/// One event of an export: what it says it is, and its bytes as they are in the file.
#[derive(Debug, Clone)]
pub struct ExportedEvent {
    pub position: Position,
    pub id: String,
    pub event_type: String,
    pub created: i64,
    pub payload: Vec<u8>,
}

/// The events of an export in the order to replay them: by `created`, and for equal seconds in
/// the order Stripe created them (a list's reverse order, a JSON Lines file's order).
#[derive(Debug)]
pub struct Export {
    pub events: Vec<ExportedEvent>,
    /// A List Events page that says more pages follow: the replay covers this page only.
    pub has_more: bool,
}

/// Reads an export of at most [`MAX_EXPORT_BYTES`]; every event is checked before any is
/// returned, so a malformed export sends nothing.
pub fn read_export(source: impl Read) -> Result<Export, ExportError> {
    read_bounded(source, MAX_EXPORT_BYTES)
}

fn read_bounded(source: impl Read, limit: u64) -> Result<Export, ExportError> {
    let mut bytes = Vec::new();
    source
        .take(limit.saturating_add(1))
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(ExportError::TooLarge);
    }
    parse_export(&bytes)
}

#[derive(Deserialize)]
struct Document<'a> {
    object: Option<&'a str>,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
    #[serde(default)]
    has_more: bool,
}

#[derive(Deserialize)]
struct Head {
    id: String,
    #[serde(rename = "type")]
    event_type: String,
    created: i64,
}

pub fn parse_export(bytes: &[u8]) -> Result<Export, ExportError> {
    let text = std::str::from_utf8(bytes).map_err(|e| ExportError::Event {
        position: Position::Line(line_of(bytes, e.valid_up_to())),
        message: "not UTF-8 text".to_owned(),
    })?;
    let mut lines = text
        .lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty());
    let first_is_whole_value = lines
        .next()
        .is_some_and(|(_, line)| serde_json::from_str::<&RawValue>(line).is_ok());
    let (mut events, has_more) = if first_is_whole_value && lines.next().is_some() {
        (json_lines(text)?, false)
    } else {
        document(text)?
    };
    if events.is_empty() {
        return Err(ExportError::Empty);
    }
    // Stable, so events of the same second keep the creation order established above.
    events.sort_by_key(|e| e.created);
    Ok(Export { events, has_more })
}

fn line_of(bytes: &[u8], offset: usize) -> usize {
    bytes[..offset].iter().filter(|&&b| b == b'\n').count() + 1
}

fn json_lines(text: &str) -> Result<Vec<ExportedEvent>, ExportError> {
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(index, line)| {
            let position = Position::Line(index + 1);
            let raw = serde_json::from_str::<&RawValue>(line).map_err(|e| ExportError::Event {
                position,
                message: format!("not JSON ({e})"),
            })?;
            event(position, raw)
        })
        .collect()
}

fn document(text: &str) -> Result<(Vec<ExportedEvent>, bool), ExportError> {
    let document: Document<'_> = serde_json::from_str(text).map_err(|e| {
        if e.is_data() {
            ExportError::Shape
        } else {
            ExportError::NotJson(e)
        }
    })?;
    let is_list = document.object == Some("list")
        || document
            .data
            .is_some_and(|d| d.get().trim_start().starts_with('['));
    if !is_list {
        let raw = serde_json::from_str::<&RawValue>(text).map_err(ExportError::NotJson)?;
        return Ok((vec![event(Position::Whole, raw)?], false));
    }
    let data = document.data.ok_or(ExportError::Shape)?;
    let items: Vec<&RawValue> = serde_json::from_str(data.get()).map_err(|_| ExportError::Shape)?;
    let mut events = items
        .into_iter()
        .enumerate()
        .map(|(index, raw)| event(Position::Index(index), raw))
        .collect::<Result<Vec<_>, _>>()?;
    // Stripe lists newest first.
    events.reverse();
    Ok((events, document.has_more))
}

fn event(position: Position, raw: &RawValue) -> Result<ExportedEvent, ExportError> {
    let head: Head = serde_json::from_str(raw.get()).map_err(|e| ExportError::Event {
        position,
        message: format!(
            "not a Stripe event with a string `id`, a string `type` and an integer `created` ({e})"
        ),
    })?;
    Ok(ExportedEvent {
        position,
        id: head.id,
        event_type: head.event_type,
        created: head.created,
        payload: raw.get().trim().as_bytes().to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event_json(id: &str, created: i64) -> String {
        format!(
            r#"{{"id":"{id}","object":"event","type":"invoice.paid","created":{created},"data":{{"object":{{"customer":"cus_1"}}}}}}"#
        )
    }

    fn ids(export: &Export) -> Vec<&str> {
        export.events.iter().map(|e| e.id.as_str()).collect()
    }

    #[test]
    fn a_list_page_replays_oldest_first_with_each_event_s_own_bytes() {
        let newest = event_json("evt_3", 30);
        let page = format!(
            "{{\n  \"object\": \"list\",\n  \"data\": [\n    {newest},\n    {},\n    {}\n  ],\n  \"has_more\": true\n}}",
            event_json("evt_2", 20),
            event_json("evt_1", 20)
        );
        let export = parse_export(page.as_bytes()).expect("a list");
        // Same second: the list's reverse order is the order Stripe created them.
        assert_eq!(ids(&export), ["evt_1", "evt_2", "evt_3"]);
        assert!(export.has_more);
        assert_eq!(export.events[2].payload, newest.as_bytes());
        assert_eq!(export.events[2].position, Position::Index(0));
    }

    #[test]
    fn json_lines_skip_blank_lines_and_sort_by_created() {
        let text = format!(
            "{}\n\n{}\r\n  \n",
            event_json("evt_b", 50),
            event_json("evt_a", 10)
        );
        let export = parse_export(text.as_bytes()).expect("JSON Lines");
        assert_eq!(ids(&export), ["evt_a", "evt_b"]);
        assert_eq!(export.events[0].position, Position::Line(3));
        assert_eq!(export.events[0].payload, event_json("evt_a", 10).as_bytes());
    }

    #[test]
    fn one_event_is_an_export_of_one() {
        let export = parse_export(event_json("evt_1", 1).as_bytes()).expect("one event");
        assert_eq!(ids(&export), ["evt_1"]);
    }

    #[test]
    fn a_malformed_export_names_where() {
        let bad_line = format!("{}\n{{\"id\": \"evt_2\"\n", event_json("evt_1", 1));
        let error = parse_export(bad_line.as_bytes()).expect_err("line 2 is cut");
        assert!(error.to_string().starts_with("line 2: not JSON"), "{error}");

        let no_type = format!(
            "{{\"object\":\"list\",\"data\":[{},{{\"id\":\"evt_2\",\"created\":1}}]}}",
            event_json("evt_1", 1)
        );
        let error = parse_export(no_type.as_bytes()).expect_err("data[1] has no type");
        assert!(
            error.to_string().starts_with("data[1]: not a Stripe event"),
            "{error}"
        );

        let cut = "{\"object\":\"list\",\"data\":[";
        assert!(matches!(
            parse_export(cut.as_bytes()),
            Err(ExportError::NotJson(_))
        ));
        for shape in ["[1,2]", "{\"object\":\"list\",\"data\":{}}", "42"] {
            assert!(parse_export(shape.as_bytes()).is_err(), "{shape}");
        }
        assert!(matches!(
            parse_export(b"{\"object\":\"list\",\"data\":[]}"),
            Err(ExportError::Empty)
        ));
        assert!(matches!(
            parse_export(b"\n\n"),
            Err(ExportError::NotJson(_))
        ));
        assert!(matches!(
            parse_export(b"\xff\xfe"),
            Err(ExportError::Event { .. })
        ));
    }

    #[test]
    fn no_cut_or_altered_byte_of_an_export_makes_it_panic() {
        let page = format!(
            "{{\"object\":\"list\",\"data\":[{},{}]}}\n",
            event_json("evt_2", 2),
            event_json("evt_1", 1)
        );
        let lines = format!("{}\n\n{}\n", event_json("evt_1", 1), event_json("evt_2", 2));
        for text in [page, lines] {
            let bytes = text.as_bytes();
            for cut in 0..bytes.len() {
                let _ = parse_export(&bytes[..cut]);
                for replacement in [b'"', b'\n', b'[', b'}', 0xff] {
                    let mut altered = bytes.to_vec();
                    altered[cut] = replacement;
                    let _ = parse_export(&altered);
                }
            }
        }
    }

    #[test]
    fn an_oversized_export_is_refused_before_parsing() {
        let endless = std::io::repeat(b' ');
        assert!(matches!(
            read_bounded(endless, 1024),
            Err(ExportError::TooLarge)
        ));
    }
}
