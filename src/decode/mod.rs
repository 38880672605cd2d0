//! Wire formats for input events: JSON (the default) and Avro, chosen per topic.
//!
//! A decoder turns one message payload into a validated [`Event`] or a
//! [`DecodeError`] whose text becomes the dead-letter reason. JSON decoding
//! borrows strings from the payload wherever they contain no escapes.

use std::borrow::Cow;
use std::fmt;

use std::sync::Arc;

use apache_avro::Schema;
use apache_avro::types::Value;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize};

use crate::event::{ContractError, Event, EventType, Source, parse_rfc3339, truncate};
use crate::registry::{self, Registry};

mod scan;

/// Largest accepted payload, in bytes. Bigger messages are dead-lettered unread.
pub const MAX_PAYLOAD_BYTES: usize = 64 * 1024;

/// The wire format of one topic.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", try_from = "String")]
pub enum Format {
    /// One JSON object per message.
    #[default]
    Json,
    /// One Avro binary datum per message, written with the family's schema in `schemas/`.
    Avro,
    /// Confluent Schema Registry framing: magic byte 0, a 4-byte schema id,
    /// then the Avro datum, written with the registered schema of that id.
    #[serde(rename = "avro-registry")]
    AvroRegistry,
}

impl TryFrom<String> for Format {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        crate::settings::one_of(
            &s,
            &[
                ("json", Format::Json),
                ("avro", Format::Avro),
                ("avro-registry", Format::AvroRegistry),
            ],
        )
    }
}

/// Why a payload could not become an event. All variants are poison (dead-letter and move on).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The message has no payload.
    #[error("empty payload")]
    Empty,
    /// The payload exceeds [`MAX_PAYLOAD_BYTES`].
    #[error("payload of {0} bytes exceeds the {MAX_PAYLOAD_BYTES}-byte limit")]
    TooLarge(usize),
    /// The payload is not valid JSON of the contract's shape.
    #[error("invalid JSON: {0}")]
    Json(String),
    /// The payload is not a valid Avro datum of the family's schema.
    #[error("invalid Avro: {0}")]
    Avro(String),
    /// The payload decoded but breaks the event contract.
    #[error("contract violation: {0}")]
    Contract(#[from] ContractError),
    /// A Schema Registry frame whose schema id is unknown, or whose writer
    /// schema leadscore cannot read (poison).
    #[error("schema registry: {0}")]
    Registry(String),
    /// The Schema Registry cannot be reached: not poison; the message is held
    /// and decoded again later.
    #[error("{0}")]
    RegistryUnavailable(String),
}

impl DecodeError {
    /// A short, low-cardinality label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            DecodeError::Empty => "empty",
            DecodeError::TooLarge(_) => "too_large",
            DecodeError::Json(_) => "json",
            DecodeError::Avro(_) => "avro",
            DecodeError::Contract(_) => "contract",
            DecodeError::Registry(_) | DecodeError::RegistryUnavailable(_) => "registry",
        }
    }

    /// Whether decoding again later may succeed (the message is not poison).
    pub fn retryable(&self) -> bool {
        matches!(self, DecodeError::RegistryUnavailable(_))
    }
}

/// What every decoder checks beyond the wire format.
#[derive(Debug, Clone)]
pub struct Contract {
    /// Channel names accepted in a messaging event's `channel` (from the rules).
    pub channels: std::sync::Arc<[String]>,
    /// How far `occurred_at` may lie after the message's broker timestamp (or
    /// the wall clock, without one or when that is earlier) before the event
    /// is rejected.
    pub future_tolerance_ms: i64,
}

impl Default for Contract {
    fn default() -> Self {
        Contract {
            channels: ["email", "sms", "zalo", "whatsapp"]
                .map(String::from)
                .into(),
            future_tolerance_ms: 5 * 60_000,
        }
    }
}

/// Decodes payloads of one topic.
#[derive(Debug, Clone)]
pub struct Decoder {
    source: Source,
    format: Format,
    avro: Option<Schema>,
    contract: Contract,
    registry: Option<Arc<Registry>>,
}

impl Decoder {
    /// A decoder for a topic of `source` family in `format`.
    pub fn new(source: Source, format: Format, contract: Contract) -> Self {
        // A hostile length prefix must not make the Avro reader allocate
        // more than a payload can hold (the first call sets it process-wide).
        apache_avro::max_allocation_bytes(MAX_PAYLOAD_BYTES * 4);
        let avro =
            matches!(format, Format::Avro | Format::AvroRegistry).then(|| input_schema(source));
        Decoder {
            source,
            format,
            avro,
            contract,
            registry: None,
        }
    }

    /// Reads Schema Registry frames through `registry`.
    pub fn with_registry(mut self, registry: Option<Arc<Registry>>) -> Self {
        self.registry = registry;
        self
    }

    /// The family this decoder reads.
    pub fn source(&self) -> Source {
        self.source
    }

    /// Decodes and validates one payload. `timestamp` is the message's broker
    /// timestamp in ms, if it has one.
    pub fn decode<'a>(
        &self,
        payload: Option<&'a [u8]>,
        timestamp: Option<i64>,
    ) -> Result<Event<'a>, DecodeError> {
        let bytes = payload
            .filter(|p| !p.is_empty())
            .ok_or(DecodeError::Empty)?;
        if bytes.len() > MAX_PAYLOAD_BYTES {
            return Err(DecodeError::TooLarge(bytes.len()));
        }
        let event = match (&self.format, &self.avro) {
            (Format::Avro, Some(schema)) => {
                decode_avro(self.source, schema, None, bytes).map_err(|e| match e {
                    // A Schema Registry frame read as a bare datum fails
                    // somewhere in its id; say what it looks like.
                    DecodeError::Avro(why) if bytes.len() > 5 && bytes[0] == registry::MAGIC => {
                        DecodeError::Avro(format!(
                            "{why} (it starts like a Schema Registry frame: is the topic's format avro-registry?)"
                        ))
                    }
                    e => e,
                })?
            }
            (Format::AvroRegistry, Some(reader)) => {
                let (id, datum) = registry::unframe(bytes).map_err(DecodeError::Registry)?;
                let writer = self.writer_schema(id)?;
                decode_avro(self.source, &writer, Some(reader), datum).map_err(|e| match e {
                    DecodeError::Avro(why) => DecodeError::Avro(format!(
                        "written with schema id {id}, read as leadscore's {} schema: {why}",
                        self.source
                    )),
                    e => e,
                })?
            }
            _ => decode_json(self.source, bytes)?,
        };
        let event = event.validate()?;
        self.check(&event, timestamp)?;
        Ok(event)
    }

    /// The writer schema of a frame's id. It is not checked against the
    /// reader schema as a whole: each datum is resolved on its own (Avro's
    /// rules), so a schema that adds an event type still decodes every event
    /// of the types leadscore knows, and only an event of the new type is
    /// dead-lettered.
    fn writer_schema(&self, id: u32) -> Result<Arc<Schema>, DecodeError> {
        let registry = self
            .registry
            .as_ref()
            .ok_or_else(|| DecodeError::Registry("no schema registry configured".into()))?;
        registry.schema(id).map_err(|e| {
            if e.retryable() {
                DecodeError::RegistryUnavailable(e.to_string())
            } else {
                DecodeError::Registry(e.to_string())
            }
        })
    }

    /// The checks that need configuration: channel names and future dates.
    pub fn check(&self, event: &Event<'_>, timestamp: Option<i64>) -> Result<(), ContractError> {
        if let Some(c) = event.channel.as_deref()
            && !self.contract.channels.iter().any(|k| k == c)
        {
            return Err(ContractError::UnknownChannel {
                got: truncate(c, 64),
                known: self.contract.channels.join(", "),
            });
        }
        // The broker timestamp keeps a replay deterministic, but a producer
        // may set it (CreateTime) to anything, the event's own date
        // included: never later than the wall clock.
        let wall = crate::event::wall_clock_ms();
        let (reference, against) = match timestamp.filter(|t| *t > 0) {
            Some(t) if t <= wall => (t, "the message's broker timestamp"),
            _ => (wall, "the wall clock"),
        };
        // Both instants in the message: a broker timestamp of 1970 (a
        // producer that sets it in the wrong unit) is plain to see.
        let ahead = event.occurred_at.saturating_sub(reference);
        if ahead > self.contract.future_tolerance_ms {
            return Err(ContractError::FromTheFuture {
                occurred_at: crate::event::format_rfc3339(event.occurred_at),
                ahead_ms: ahead,
                against: format!("{against} {}", crate::event::format_rfc3339(reference)),
                tolerance_ms: self.contract.future_tolerance_ms,
            });
        }
        Ok(())
    }
}

/// The Avro schema text of an input family, as shipped in `schemas/`.
pub fn input_schema_text(source: Source) -> &'static str {
    match source {
        Source::Web => include_str!("../../schemas/events.web.avsc"),
        Source::Adpixel => include_str!("../../schemas/events.adpixel.avsc"),
        Source::Email => include_str!("../../schemas/events.email.avsc"),
        Source::Crm => include_str!("../../schemas/events.crm.avsc"),
    }
}

/// The Avro schema of an input family, as shipped in `schemas/`.
pub fn input_schema(source: Source) -> Schema {
    Schema::parse_str(input_schema_text(source))
        .expect("shipped input schemas parse (checked by tests)")
}

/// What a JSON payload must be, in the contract's words (also serde's
/// `expecting` below, which takes only a literal).
const EXPECTED_EVENT: &str =
    "an event: a JSON object with event_id, occurred_at, type and lead_id or anonymous_id";

#[derive(Deserialize)]
#[serde(
    expecting = "an event: a JSON object with event_id, occurred_at, type and lead_id or anonymous_id"
)]
struct RawEvent<'a> {
    #[serde(borrow)]
    event_id: Option<Str<'a>>,
    #[serde(borrow, default)]
    lead_id: Option<Str<'a>>,
    #[serde(borrow, default)]
    anonymous_id: Option<Str<'a>>,
    #[serde(borrow)]
    occurred_at: Option<Str<'a>>,
    #[serde(borrow, rename = "type")]
    kind: Option<Str<'a>>,
    #[serde(borrow, default)]
    channel: Option<Str<'a>>,
    #[serde(borrow, default)]
    attributes: Option<Attributes<'a>>,
}

/// A JSON object of string → string, kept in message order without a map allocation.
struct Attributes<'a>(Vec<(Cow<'a, str>, Cow<'a, str>)>);

#[derive(Deserialize)]
struct Str<'a>(#[serde(borrow)] Cow<'a, str>);

impl<'a> Str<'a> {
    fn borrowed(s: Option<&'a str>) -> Option<Str<'a>> {
        s.map(|s| Str(Cow::Borrowed(s)))
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Attributes<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct AttrVisitor;
        impl<'de> Visitor<'de> for AttrVisitor {
            type Value = Attributes<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object of string values")
            }
            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Self::Value, M::Error> {
                let mut out = Vec::with_capacity(map.size_hint().unwrap_or(2).min(16));
                while let Some(Str(key)) = map.next_key::<Str<'de>>()? {
                    let Str(value) = map.next_value::<Str<'de>>().map_err(|_| {
                        de::Error::custom(format_args!(
                            "attribute {:?} must be a string",
                            truncate(&key, 64)
                        ))
                    })?;
                    out.push((key, value));
                }
                Ok(Attributes(out))
            }
        }
        deserializer.deserialize_map(AttrVisitor)
    }
}

fn decode_json(source: Source, bytes: &[u8]) -> Result<Event<'_>, DecodeError> {
    // One UTF-8 check over the whole payload is cheaper than serde_json's
    // check of each of its twenty-odd strings (`from_slice`).
    let text = std::str::from_utf8(bytes)
        .map_err(|e| DecodeError::Json(format!("the payload is not UTF-8: {e}")))?;
    // The usual shape in one pass; serde_json decides everything else.
    let fields = match scan::scan(text) {
        Some(f) => {
            let str = Str::borrowed;
            RawEvent {
                event_id: str(f.event_id),
                lead_id: str(f.lead_id),
                anonymous_id: str(f.anonymous_id),
                occurred_at: str(f.occurred_at),
                kind: str(f.kind),
                channel: str(f.channel),
                attributes: f.attributes.map(Attributes),
            }
        }
        // serde reads a struct from an array too, and would complain about
        // its first element.
        None if text.trim_start().starts_with('[') => {
            return Err(DecodeError::Json(format!(
                "invalid type: an array, expected {EXPECTED_EVENT}"
            )));
        }
        None => serde_json::from_str(text).map_err(json_error)?,
    };
    event_of(source, fields)
}

/// The event of a JSON payload's fields, checked against the contract's
/// required fields and vocabulary.
fn event_of(source: Source, raw: RawEvent<'_>) -> Result<Event<'_>, DecodeError> {
    let event_id = raw.event_id.ok_or(ContractError::MissingEventId)?.0;
    let occurred_at = raw
        .occurred_at
        .ok_or_else(|| ContractError::BadTimestamp("missing".into()))?
        .0;
    let kind = raw
        .kind
        .ok_or_else(|| DecodeError::Json("missing field `type`".into()))?
        .0;
    Ok(Event {
        event_id,
        lead_id: raw.lead_id.map(|s| s.0),
        anonymous_id: raw.anonymous_id.map(|s| s.0),
        occurred_at: parse_rfc3339(&occurred_at)?,
        source,
        kind: parse_type(source, &kind)?,
        channel: raw.channel.map(|s| s.0),
        attributes: raw.attributes.map(|a| a.0).unwrap_or_default(),
    })
}

fn parse_type(source: Source, kind: &str) -> Result<EventType, ContractError> {
    EventType::parse(source, kind).ok_or_else(|| ContractError::UnknownType {
        family: source,
        kind: truncate(kind, 64),
    })
}

/// serde_json's error, with a word on the one message that misleads: a
/// `\u` escape of a lone UTF-16 surrogate (`"\ud800"`) is reported as "unexpected
/// end of hex escape".
fn json_error(e: serde_json::Error) -> DecodeError {
    let text = e.to_string();
    if text.contains("hex escape") {
        return DecodeError::Json(format!(
            "{text} (a \\u escape must be four hex digits, and a UTF-16 surrogate must come in a pair)"
        ));
    }
    DecodeError::Json(text)
}

fn decode_avro(
    source: Source,
    writer: &Schema,
    reader_schema: Option<&Schema>,
    bytes: &[u8],
) -> Result<Event<'static>, DecodeError> {
    let mut reader = bytes;
    let value = apache_avro::from_avro_datum(writer, &mut reader, reader_schema).map_err(|e| {
        DecodeError::Avro(match reader_schema {
            Some(ours) => unresolved(writer, ours, bytes).unwrap_or_else(|| e.to_string()),
            None => e.to_string(),
        })
    })?;
    if !reader.is_empty() {
        return Err(DecodeError::Avro(format!(
            "{} trailing bytes after the datum",
            reader.len()
        )));
    }
    let Value::Record(fields) = value else {
        return Err(DecodeError::Avro("datum is not a record".into()));
    };
    let mut event = Event {
        event_id: Cow::Borrowed(""),
        lead_id: None,
        anonymous_id: None,
        occurred_at: 0,
        source,
        kind: EventType::Identify,
        channel: None,
        attributes: Vec::new(),
    };
    let mut kind = None;
    for (name, value) in fields {
        match (name.as_str(), value) {
            ("event_id", Value::String(s)) => event.event_id = Cow::Owned(s),
            ("lead_id", v) => event.lead_id = avro_opt_string(v),
            ("anonymous_id", v) => event.anonymous_id = avro_opt_string(v),
            ("channel", v) => event.channel = avro_opt_string(v),
            ("occurred_at", Value::TimestampMillis(t)) => event.occurred_at = t,
            ("type", Value::Enum(_, s)) | ("type", Value::String(s)) => kind = Some(s),
            ("attributes", Value::Map(m)) => {
                let mut attrs: Vec<_> = m
                    .into_iter()
                    .filter_map(|(k, v)| match v {
                        Value::String(v) => Some((Cow::Owned(k), Cow::Owned(v))),
                        _ => None,
                    })
                    .collect();
                // Avro maps carry no order; sort so decisions never depend on hash order.
                attrs.sort();
                event.attributes = attrs;
            }
            _ => {}
        }
    }
    let kind = kind.ok_or_else(|| DecodeError::Avro("missing field `type`".into()))?;
    event.kind = parse_type(source, &kind)?;
    Ok(event)
}

/// Why a datum that reads with its writer's schema does not resolve to
/// ours, naming the field: apache-avro's own error names neither the field
/// nor, for an enum, the problem (`None` when the datum does not read with
/// its writer's schema either). Only on the error path: it decodes again.
fn unresolved(writer: &Schema, ours: &Schema, bytes: &[u8]) -> Option<String> {
    use apache_avro::error::Details;
    let Ok(Value::Record(written)) = apache_avro::from_avro_datum(writer, &mut &bytes[..], None)
    else {
        return None;
    };
    let Schema::Record(ours) = ours else {
        return None;
    };
    ours.fields.iter().find_map(|field| {
        let value = match written.iter().find(|(name, _)| *name == field.name) {
            Some((_, value)) => value.clone(),
            None if field.default.is_some() => return None,
            None => return Some(format!("field `{}`: missing from the writer's schema, and ours gives no default", field.name)),
        };
        let error = value.resolve(&field.schema).err()?;
        let why = match error.details() {
            Details::GetEnumDefault { symbol, symbols } => {
                format!("{symbol:?} is not one of ours ({})", symbols.join(", "))
            }
            Details::GetString(Value::Null) => {
                "a null where ours expects a string (a map's value, or a field that may not be null)".into()
            }
            other => other.to_string(),
        };
        Some(format!("field `{}`: {why}", field.name))
    })
}

fn avro_opt_string(value: Value) -> Option<Cow<'static, str>> {
    match value {
        Value::Union(_, inner) => avro_opt_string(*inner),
        Value::String(s) => Some(Cow::Owned(s)),
        _ => None,
    }
}

/// Encodes an event as an Avro datum of its family's schema (used by the load
/// generator, the demo and tests to produce Avro input).
pub fn encode_avro(schema: &Schema, event: &Event<'_>) -> Result<Vec<u8>, apache_avro::Error> {
    let opt = |v: &Option<Cow<'_, str>>| match v {
        Some(s) => Value::Union(1, Box::new(Value::String(s.to_string()))),
        None => Value::Union(0, Box::new(Value::Null)),
    };
    let kind_index = event
        .source
        .types()
        .iter()
        .position(|t| *t == event.kind)
        .unwrap_or_default() as u32;
    let mut fields = vec![
        ("event_id".into(), Value::String(event.event_id.to_string())),
        ("lead_id".into(), opt(&event.lead_id)),
        ("anonymous_id".into(), opt(&event.anonymous_id)),
        (
            "occurred_at".into(),
            Value::TimestampMillis(event.occurred_at),
        ),
        (
            "type".into(),
            Value::Enum(kind_index, event.kind.as_str().into()),
        ),
        (
            "attributes".into(),
            Value::Map(
                event
                    .attributes
                    .iter()
                    .map(|(k, v)| (k.to_string(), Value::String(v.to_string())))
                    .collect(),
            ),
        ),
    ];
    if event.source == Source::Email {
        fields.push(("channel".into(), opt(&event.channel)));
    }
    apache_avro::to_avro_datum(schema, Value::Record(fields))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{"event_id":"e-1","lead_id":"crm-00042","occurred_at":"2026-11-22T10:00:00Z","type":"page_view","attributes":{"url":"https://example.com/pricing"}}"#;

    #[test]
    fn json_borrows_and_validates() {
        let d = Decoder::new(Source::Web, Format::Json, Contract::default());
        let e = d.decode(Some(GOOD.as_bytes()), None).unwrap();
        assert!(matches!(e.event_id, Cow::Borrowed(_)));
        assert_eq!(e.kind, EventType::PageView);
        assert_eq!(e.attribute("url"), Some("https://example.com/pricing"));
    }

    #[test]
    fn json_errors_name_the_problem() {
        let d = Decoder::new(Source::Web, Format::Json, Contract::default());
        let cases: &[(&str, &str)] = &[
            ("{", "invalid JSON"),
            (r#"{"event_id":1}"#, "invalid JSON"),
            (
                r#"{"event_id":"e","lead_id":"l","occurred_at":"2026-11-22T10:00:00Z","type":"open"}"#,
                "not a web event type",
            ),
            (
                r#"{"event_id":"e","lead_id":"l","occurred_at":"soon","type":"page_view"}"#,
                "RFC 3339",
            ),
            (
                r#"{"event_id":"e","occurred_at":"2026-11-22T10:00:00Z","type":"page_view"}"#,
                "neither lead_id",
            ),
            (
                r#"{"event_id":"e","lead_id":"l","occurred_at":"2026-11-22T10:00:00Z","type":"page_view","attributes":{"n":3}}"#,
                "must be a string",
            ),
            (
                r#"{"event_id":"e","lead_id":"l","occurred_at":"1970-01-01T00:00:00Z","type":"page_view"}"#,
                "occurred_at 1970-01-01T00:00:00.000Z is outside",
            ),
            (
                r#"{"event_id":"e","lead_id":"l","occurred_at":"2026-11-22T10:00:00Z","type":"page_view","attributes":{"url":"/blog","url":"/pricing"}}"#,
                "contract violation: attribute \"url\" appears more than once",
            ),
            // A lone surrogate: serde_json's own words mislead.
            (
                r#"{"event_id":"e\ud800","lead_id":"l","occurred_at":"2026-11-22T10:00:00Z","type":"page_view"}"#,
                "a UTF-16 surrogate must come in a pair",
            ),
            // The same through serde's path (an escape in a value).
            (
                r#"{"event_id":"e","lead_id":"l","occurred_at":"2026-11-22T10:00:00Z","type":"page_view","attributes":{"url":"/bl\u006fg","url":"/pricing"}}"#,
                "attribute \"url\" appears more than once",
            ),
            // Not an object: what was expected, in the contract's words.
            ("null", "expected an event: a JSON object with event_id"),
            (r#"["a"]"#, "expected an event: a JSON object with event_id"),
            (
                "[1, 2]",
                "invalid type: an array, expected an event: a JSON object",
            ),
        ];
        for (input, expected) in cases {
            let err = d
                .decode(Some(input.as_bytes()), None)
                .unwrap_err()
                .to_string();
            assert!(err.contains(expected), "{input}: {err}");
        }
        let latin1 = b"{\"event_id\":\"caf\xe9\",\"lead_id\":\"l\"}";
        let err = d.decode(Some(latin1), None).unwrap_err().to_string();
        assert!(
            err.contains("invalid JSON") && err.contains("not UTF-8"),
            "{err}"
        );
        assert_eq!(d.decode(None, None), Err(DecodeError::Empty));
        let big = vec![b' '; MAX_PAYLOAD_BYTES + 1];
        assert!(matches!(
            d.decode(Some(&big), None),
            Err(DecodeError::TooLarge(_))
        ));
    }

    /// A producer that sets the record's timestamp to the event's own date
    /// (a month ahead) does not get it past the check: the reference is
    /// never later than the wall clock. A broker timestamp in the past is
    /// still the reference (a replay decides as the live run did).
    #[test]
    fn an_event_dated_ahead_of_the_wall_clock_is_refused_whatever_its_broker_timestamp() {
        let d = Decoder::new(Source::Web, Format::Json, Contract::default());
        let now = crate::event::wall_clock_ms();
        let event = |at: i64| {
            format!(
                r#"{{"event_id":"e","lead_id":"l","occurred_at":"{}","type":"page_view"}}"#,
                crate::event::format_rfc3339(at)
            )
        };
        let month = 30 * 86_400_000;
        let ahead = event(now + month);
        let err = d
            .decode(Some(ahead.as_bytes()), Some(now + month))
            .unwrap_err()
            .to_string();
        assert!(err.contains("after the wall clock"), "{err}");
        let err = d
            .decode(Some(ahead.as_bytes()), Some(now))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("after the message's broker timestamp"),
            "{err}"
        );
        let earlier = event(now - month);
        assert!(
            d.decode(Some(earlier.as_bytes()), Some(now - month))
                .is_ok()
        );
        let err = d
            .decode(Some(earlier.as_bytes()), Some(now - 2 * month))
            .unwrap_err()
            .to_string();
        // The reference instant is in the message.
        let reference = format!(
            "after the message's broker timestamp {}",
            crate::event::format_rfc3339(now - 2 * month)
        );
        assert!(err.contains(&reference), "{err}");
        // A broker timestamp in the wrong unit shows as 1970.
        let err = d
            .decode(Some(earlier.as_bytes()), Some(1))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("after the message's broker timestamp 1970-01-01T00:00:00.001Z"),
            "{err}"
        );
        assert!(
            d.decode(Some(event(now).as_bytes()), Some(now + month))
                .is_ok()
        );
    }

    /// A producer's schema that does not resolve to ours: the error names
    /// the field and says what is wrong in words (apache-avro's own message
    /// for an unknown symbol speaks of an "Enum default", and for a null
    /// map value names no field).
    #[test]
    fn a_writer_schema_that_does_not_resolve_names_the_field() {
        let ours = input_schema(Source::Web);
        let theirs = |from: &str, to: &str| {
            let text = input_schema_text(Source::Web).replace(from, to);
            assert_ne!(text, input_schema_text(Source::Web), "{from}");
            Schema::parse_str(&text).unwrap()
        };
        let record = |kind: Value, attributes: Value| {
            Value::Record(vec![
                ("event_id".into(), Value::String("e-1".into())),
                (
                    "lead_id".into(),
                    Value::Union(1, Box::new(Value::String("l-1".into()))),
                ),
                (
                    "anonymous_id".into(),
                    Value::Union(0, Box::new(Value::Null)),
                ),
                (
                    "occurred_at".into(),
                    Value::TimestampMillis(1_764_000_000_000),
                ),
                ("type".into(), kind),
                ("attributes".into(), attributes),
            ])
        };
        let why = |writer: &Schema, value: Value| {
            let bytes = apache_avro::to_avro_datum(writer, value).unwrap();
            match decode_avro(Source::Web, writer, Some(&ours), &bytes) {
                Err(DecodeError::Avro(why)) => why,
                other => panic!("{other:?}"),
            }
        };
        // A symbol the producer added.
        let added = theirs("\"purchase\"", "\"purchase\", \"video_play\"");
        let got = why(
            &added,
            record(
                Value::Enum(9, "video_play".into()),
                Value::Map(Default::default()),
            ),
        );
        assert!(
            got.starts_with("field `type`: \"video_play\" is not one of ours (page_view, "),
            "{got}"
        );
        // Map values that may be null.
        let nullable = theirs(
            "\"values\": \"string\"",
            "\"values\": [\"null\", \"string\"]",
        );
        let attributes =
            Value::Map([("url".to_owned(), Value::Union(0, Box::new(Value::Null)))].into());
        let got = why(
            &nullable,
            record(Value::Enum(0, "page_view".into()), attributes),
        );
        assert!(
            got.starts_with("field `attributes`: a null where ours expects a string"),
            "{got}"
        );
        // A value that is there reads as before.
        let attributes = Value::Map(
            [(
                "url".to_owned(),
                Value::Union(1, Box::new(Value::String("/x".into()))),
            )]
            .into(),
        );
        let bytes = apache_avro::to_avro_datum(
            &nullable,
            record(Value::Enum(0, "page_view".into()), attributes),
        )
        .unwrap();
        let event = decode_avro(Source::Web, &nullable, Some(&ours), &bytes).unwrap();
        assert_eq!(event.attributes, vec![("url".into(), "/x".into())]);
    }

    #[test]
    fn avro_round_trips_for_every_family() {
        for source in Source::ALL {
            let schema = input_schema(source);
            let kind = source.types()[0];
            let event = Event {
                event_id: "e-9".into(),
                lead_id: Some("lead-9".into()),
                anonymous_id: Some("anon-9".into()),
                occurred_at: 1_764_000_000_000,
                source,
                kind,
                channel: (source == Source::Email).then(|| "sms".into()),
                attributes: vec![("a".into(), "1".into()), ("b".into(), "2".into())],
            };
            let bytes = encode_avro(&schema, &event).unwrap();
            let decoded = Decoder::new(source, Format::Avro, Contract::default())
                .decode(Some(&bytes), None)
                .unwrap();
            assert_eq!(decoded, event);
            // A Schema Registry frame on a bare `avro` topic: the error says
            // what the bytes look like.
            let framed = registry::frame(16, &bytes);
            let err = Decoder::new(source, Format::Avro, Contract::default())
                .decode(Some(&framed), None)
                .unwrap_err();
            assert!(
                matches!(&err, DecodeError::Avro(why) if why.contains("is the topic's format avro-registry?")),
                "{source}: {err}"
            );
            let truncated = &bytes[..bytes.len() - 3];
            assert!(
                Decoder::new(source, Format::Avro, Contract::default())
                    .decode(Some(truncated), None)
                    .is_err()
            );
        }
    }

    /// What serde_json alone makes of a payload (the path before the scanner).
    fn via_serde(source: Source, text: &str) -> Result<Event<'_>, DecodeError> {
        let raw: RawEvent<'_> = serde_json::from_str(text).map_err(json_error)?;
        event_of(source, raw)
    }

    /// JSON text near the contract's shape: the required fields (usually
    /// valid, sometimes not) in any order, plus known, unknown and repeated
    /// keys; strings with quotes, escapes, control and non-ASCII characters;
    /// nulls, numbers, nested values and stray whitespace.
    fn near_json() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        fn quoted(v: &[&'static str]) -> BoxedStrategy<String> {
            prop::sample::select(v.to_vec())
                .prop_map(|t| format!("\"{t}\""))
                .boxed()
        }
        let odd = [
            "",
            "caf\u{e9} \u{1f600}",
            r#"a\"b"#,
            r"\u0041",
            r"tab\there",
            "raw\ttab",
            "new\nline",
        ];
        let with = |good: &[&'static str]| {
            let mut all = good.to_vec();
            all.extend(odd);
            prop_oneof![
                12 => quoted(good),
                1 => quoted(&all),
                1 => prop::sample::select(vec!["null", "12", "true", r#"["a"]"#]).prop_map(str::to_owned),
            ]
        };
        let attrs = prop::collection::vec(
            (
                quoted(&["url", "stage", "kind", "utm_source"]),
                with(&["https://x.io/pricing", "hard", "customer", "google"]),
            ),
            0..3,
        )
        .prop_map(|kv| {
            let body: Vec<String> = kv.iter().map(|(k, v)| format!("{k}:{v}")).collect();
            format!("{{{}}}", body.join(","))
        });
        let required = (
            with(&["e-1", "0f8c6a1e-77"]),
            with(&["crm-00042", "l"]),
            with(&["cookie-7f3a"]),
            with(&[
                "2026-11-22T10:00:00Z",
                "2026-11-22T10:00:00.5+07:00",
                "1970-01-01T00:00:00Z",
                "soon",
            ]),
            with(&["page_view", "open", "click", "identify", "profile_updated"]),
            with(&["sms", "email", "fax"]),
        );
        let extra = prop::collection::vec(
            (
                prop::sample::select(vec!["event_id", "lead_id", "type", "attributes", "extra"]),
                prop_oneof![with(&["x"]), attrs.clone()],
            ),
            0..2,
        );
        let space = prop::sample::select(vec!["", " ", "\n ", "\t"]);
        (
            required,
            attrs,
            extra,
            proptest::bool::weighted(0.3),
            space,
            any::<prop::sample::Index>(),
        )
            .prop_map(
                |((id, lead, anon, at, kind, channel), attrs, extra, more, sp, cut)| {
                    let mut fields: Vec<(String, String)> = [
                        ("event_id", id),
                        ("lead_id", lead),
                        ("anonymous_id", anon),
                        ("occurred_at", at),
                        ("type", kind),
                        ("channel", channel),
                        ("attributes", attrs),
                    ]
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), v))
                    .collect();
                    // Drop one field now and then, and rotate the order.
                    if more {
                        fields.remove(cut.index(fields.len()));
                    }
                    let n = fields.len();
                    fields.rotate_left(cut.index(n));
                    fields.extend(extra.into_iter().map(|(k, v)| (k.to_owned(), v)));
                    let body: Vec<String> = fields
                        .iter()
                        .map(|(k, v)| format!("{sp}\"{k}\"{sp}:{sp}{v}"))
                        .collect();
                    format!("{{{}}}{sp}", body.join(","))
                },
            )
    }

    #[test]
    fn the_usual_payloads_take_the_fast_path() {
        assert!(scan::scan(GOOD).is_some());
        let email = r#"{"event_id":"9a1f","lead_id":"crm-7","occurred_at":"2026-11-22T10:00:00.123Z","type":"open","channel":"sms","attributes":{"campaign":"spring","utm_source":"google"}}"#;
        assert!(scan::scan(email).is_some());
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

        /// The fast path answers only where serde_json gives the same event
        /// (and so the same error, since the contract checks follow both).
        #[test]
        fn the_fast_path_agrees_with_serde(text in near_json()) {
            if scan::scan(&text).is_some() {
                for source in Source::ALL {
                    let fast = decode_json(source, text.as_bytes());
                    let slow = via_serde(source, &text);
                    proptest::prop_assert_eq!(fast, slow, "{}", text);
                }
            }
        }
    }

    proptest::proptest! {
        // Fuzzing the decoders: any bytes give an event or an error, never a panic.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            for source in Source::ALL {
                let _ = Decoder::new(source, Format::Json, Contract::default()).decode(Some(&bytes), None);
                let _ = Decoder::new(source, Format::Avro, Contract::default()).decode(Some(&bytes), None);
            }
        }

        #[test]
        fn mutated_valid_events_never_panic(cut in 0usize..200, flip in 0usize..200, byte in proptest::prelude::any::<u8>()) {
            let mut json = GOOD.as_bytes().to_vec();
            let i = flip % json.len();
            json[i] = byte;
            json.truncate(cut.max(1).min(json.len()));
            let _ = Decoder::new(Source::Web, Format::Json, Contract::default()).decode(Some(&json), None);
            let schema = input_schema(Source::Web);
            let event = Decoder::new(Source::Web, Format::Json, Contract::default()).decode(Some(GOOD.as_bytes()), None).unwrap();
            let mut avro = encode_avro(&schema, &event).unwrap();
            let j = flip % avro.len();
            avro[j] = byte;
            avro.truncate(cut.max(1).min(avro.len()));
            let _ = Decoder::new(Source::Web, Format::Avro, Contract::default()).decode(Some(&avro), None);
        }
    }
}
