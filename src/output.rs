//! Output events: segment changes, hand-offs and dead letters, with
//! deterministic event ids and JSON or Avro encoding.
//!
//! Event ids are UUID v5 over (kind, rules version, lead, trigger): the same
//! input always yields the same id, so consumers de-duplicate redeliveries.

use std::collections::BTreeMap;

use apache_avro::Schema;
use apache_avro::types::Value;
use serde::Serialize;
use sha1::{Digest, Sha1};
use uuid::Uuid;

use crate::decode::Format;
use crate::engine::rules::published;
use crate::engine::{Decision, Engine, Handoff, Rules, SegmentChange};
use crate::event::{Millis, format_rfc3339};

/// Namespace of leadscore's deterministic event ids.
const ID_NAMESPACE: Uuid = Uuid::from_u128(0x6c65_6164_7363_6f72_6500_0000_0000_0001);

/// The deterministic id of a segment change.
pub fn change_id(rules_version: &str, lead: &str, c: &SegmentChange, rules: &Rules) -> Uuid {
    let at;
    let trigger: [&str; 2] = match &c.trigger {
        Some(t) => ["event:", t],
        None => {
            at = c.at.to_string();
            ["time:", &at]
        }
    };
    id_of(&[
        &["change"],
        &[rules_version],
        &[lead],
        &trigger,
        &[c.to.name(rules)],
    ])
}

/// The deterministic id of a hand-off.
pub fn handoff_id(rules_version: &str, lead: &str, h: &Handoff) -> Uuid {
    id_of(&[&["handoff"], &[rules_version], &[lead], &[&h.trigger]])
}

/// UUIDv5 of the parts joined by the unit separator (U+001F), each part
/// the concatenation of its pieces. Hashed as it goes (no joined name is
/// built) with the `sha1` crate, which uses the CPU's SHA instructions where
/// it has them: the same bytes as `Uuid::new_v5`, in a fraction of the time.
fn id_of(parts: &[&[&str]]) -> Uuid {
    let mut sha = Sha1::new();
    sha.update(ID_NAMESPACE.as_bytes());
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            sha.update([0x1f]);
        }
        for piece in *part {
            sha.update(piece.as_bytes());
        }
    }
    let digest = sha.finalize();
    let mut bytes = [0; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_sha1_bytes(bytes).into_uuid()
}

/// A segment change as published.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct SegmentChangeOut {
    /// Deterministic id.
    pub event_id: String,
    /// Lead.
    pub lead_id: String,
    /// Segment before.
    pub previous_segment: String,
    /// Segment after.
    pub segment: String,
    /// Total score.
    pub score: f64,
    /// Engagement score.
    pub engagement: f64,
    /// Fit score.
    pub fit: f64,
    /// Fit grade (`A`…`D`); null while no profile is known (unknown fit).
    pub fit_grade: Option<String>,
    /// `event`, `decay`, `lifecycle`, `frequency_cap` or `opt_out`.
    pub reason: String,
    /// Triggering input event, if any.
    pub trigger_event_id: Option<String>,
    /// Event time of the change, RFC 3339.
    pub occurred_at: String,
    /// Rules version.
    pub rules_version: String,
    /// Channels the lead has opted out of.
    pub opted_out_channels: Vec<String>,
}

/// One signal in a hand-off.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct SignalOut {
    /// Rule name.
    pub rule: String,
    /// Decayed points at hand-off time.
    pub points: f64,
    /// Last match, RFC 3339.
    #[schema(format = DateTime)]
    pub last_at: String,
    /// Matches.
    pub count: u32,
}

/// A hand-off as published.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct HandoffOut {
    /// Deterministic id.
    pub event_id: String,
    /// Lead.
    pub lead_id: String,
    /// Total score.
    pub score: f64,
    /// Engagement.
    pub engagement: f64,
    /// Fit.
    pub fit: f64,
    /// Fit grade; null while no profile is known (unknown fit).
    pub fit_grade: Option<String>,
    /// Segment at hand-off.
    pub segment: String,
    /// Top contributing signals.
    pub top_signals: Vec<SignalOut>,
    /// Rule of the signal that crossed the line.
    pub crossing_signal: Option<String>,
    /// The event that crossed the line.
    pub trigger_event_id: String,
    /// Fit points by rule.
    pub fit_breakdown: BTreeMap<String, f64>,
    /// Profile attributes the fit rules use that are not known yet.
    pub missing_profile: Vec<String>,
    /// Source of the lead's first touch (e.g. `utm_source`), if known.
    pub first_touch_source: Option<String>,
    /// Campaign of the lead's first touch, if known.
    pub first_touch_campaign: Option<String>,
    /// Event time, RFC 3339.
    pub occurred_at: String,
    /// Rules version.
    pub rules_version: String,
}

/// Which output topic a record goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputKind {
    /// `leads.segment-changes`.
    SegmentChange,
    /// `leads.sales-handoffs`.
    Handoff,
}

/// One encoded output record, keyed by lead id.
#[derive(Debug, Clone)]
pub struct Record {
    /// Destination.
    pub kind: OutputKind,
    /// Lead id (the message key).
    pub key: String,
    /// Encoded payload.
    pub payload: Vec<u8>,
    /// Event time of the decision (the message timestamp).
    pub at: Millis,
}

impl Default for Record {
    fn default() -> Self {
        Record {
            kind: OutputKind::SegmentChange,
            key: String::new(),
            payload: Vec::new(),
            at: 0,
        }
    }
}

/// Encodes decisions into records.
#[derive(Debug, Clone)]
pub struct Encoder {
    format: Format,
    change_schema: Schema,
    handoff_schema: Schema,
    /// Schema Registry ids of the two output schemas (`avro-registry`).
    registry_ids: Option<(u32, u32)>,
}

/// The segment-change schema's text, as shipped in `schemas/`.
pub const CHANGE_SCHEMA: &str = include_str!("../schemas/leads.segment-changes.avsc");
/// The sales hand-off schema's text, as shipped in `schemas/`.
pub const HANDOFF_SCHEMA: &str = include_str!("../schemas/leads.sales-handoffs.avsc");

/// Output schemas as shipped in `schemas/`.
pub fn output_schemas() -> (Schema, Schema) {
    let parse = |t: &str| Schema::parse_str(t).expect("shipped output schemas parse");
    (parse(CHANGE_SCHEMA), parse(HANDOFF_SCHEMA))
}

impl Encoder {
    /// An encoder for `format`.
    pub fn new(format: Format) -> Self {
        let (change_schema, handoff_schema) = output_schemas();
        Encoder {
            format,
            change_schema,
            handoff_schema,
            registry_ids: None,
        }
    }

    /// Frames Avro outputs with these Schema Registry ids (segment changes, hand-offs).
    pub fn with_registry_ids(mut self, change: u32, handoff: u32) -> Self {
        self.registry_ids = Some((change, handoff));
        self
    }

    /// The published form of a decision.
    pub fn describe(engine: &Engine, lead: &str, d: &Decision) -> Described {
        let rules = &**engine.rules();
        let v = &rules.version;
        match d {
            Decision::Change(c) => Described::Change(SegmentChangeOut {
                event_id: change_id(v, lead, c, rules).to_string(),
                lead_id: lead.to_owned(),
                previous_segment: c.from.name(rules).to_owned(),
                segment: c.to.name(rules).to_owned(),
                score: published(c.scores.total),
                engagement: published(c.scores.engagement),
                fit: published(c.scores.fit),
                fit_grade: c.scores.grade.map(|g| g.as_str().to_owned()),
                reason: c.reason.as_str().to_owned(),
                trigger_event_id: c.trigger.clone(),
                occurred_at: format_rfc3339(c.at),
                rules_version: v.clone(),
                opted_out_channels: engine.opted_out_names(&c.opted_out),
            }),
            Decision::Handoff(h) => Described::Handoff(HandoffOut {
                event_id: handoff_id(v, lead, h).to_string(),
                lead_id: lead.to_owned(),
                score: published(h.scores.total),
                engagement: published(h.scores.engagement),
                fit: published(h.scores.fit),
                fit_grade: h.scores.grade.map(|g| g.as_str().to_owned()),
                segment: h.segment.name(rules).to_owned(),
                top_signals: h
                    .top_signals
                    .iter()
                    .map(|s| SignalOut {
                        rule: s.rule.clone(),
                        points: published(s.points),
                        last_at: format_rfc3339(s.last_at),
                        count: s.count,
                    })
                    .collect(),
                crossing_signal: h.crossing_rule.clone(),
                trigger_event_id: h.trigger.clone(),
                fit_breakdown: h.fit_breakdown.iter().cloned().collect(),
                missing_profile: h.missing_profile.clone(),
                first_touch_source: h.first_touch.as_ref().map(|f| f.0.clone()),
                first_touch_campaign: h.first_touch.as_ref().and_then(|f| f.1.clone()),
                occurred_at: format_rfc3339(h.at),
                rules_version: v.clone(),
            }),
            Decision::Expire { .. } => unreachable!("expiry is not published"),
        }
    }

    /// Encodes one published decision (a change or a hand-off).
    pub fn encode(&self, engine: &Engine, lead: &str, d: &Decision) -> Record {
        let mut record = Record::default();
        self.encode_into(engine, lead, d, &mut record);
        record
    }

    /// [`Encoder::encode`] into `record`, reusing its buffers.
    pub fn encode_into(&self, engine: &Engine, lead: &str, d: &Decision, record: &mut Record) {
        let (kind, at) = match d {
            Decision::Change(c) => (OutputKind::SegmentChange, c.at),
            Decision::Handoff(h) => (OutputKind::Handoff, h.at),
            Decision::Expire { at } => (OutputKind::SegmentChange, *at),
        };
        record.kind = kind;
        record.at = at;
        record.key.clear();
        record.key.push_str(lead);
        record.payload.clear();
        if let (Format::Json, Decision::Change(c)) = (self.format, d) {
            // Segment changes are most of the output: written in place.
            change_json(engine, lead, c, &mut record.payload);
            return;
        }
        let described = Encoder::describe(engine, lead, d);
        let payload = match (self.format, self.registry_ids) {
            (Format::Json, _) => described.to_json(),
            (Format::AvroRegistry, Some((change, handoff))) => {
                let id = if kind == OutputKind::SegmentChange {
                    change
                } else {
                    handoff
                };
                crate::registry::frame(id, &self.to_avro(&described, d))
            }
            (Format::Avro | Format::AvroRegistry, _) => self.to_avro(&described, d),
        };
        record.payload = payload;
    }

    fn to_avro(&self, described: &Described, d: &Decision) -> Vec<u8> {
        let s = |v: &str| Value::String(v.to_owned());
        let opt = |v: &Option<String>| match v {
            Some(x) => Value::Union(1, Box::new(Value::String(x.clone()))),
            None => Value::Union(0, Box::new(Value::Null)),
        };
        let strings =
            |v: &[String]| Value::Array(v.iter().map(|x| Value::String(x.clone())).collect());
        let (schema, record) = match (described, d) {
            (Described::Change(c), Decision::Change(raw)) => (
                &self.change_schema,
                Value::Record(vec![
                    ("event_id".into(), s(&c.event_id)),
                    ("lead_id".into(), s(&c.lead_id)),
                    ("previous_segment".into(), s(&c.previous_segment)),
                    ("segment".into(), s(&c.segment)),
                    ("score".into(), Value::Double(c.score)),
                    ("engagement".into(), Value::Double(c.engagement)),
                    ("fit".into(), Value::Double(c.fit)),
                    ("fit_grade".into(), opt(&c.fit_grade)),
                    (
                        "reason".into(),
                        Value::Enum(u32::from(raw.reason.code()), c.reason.clone()),
                    ),
                    ("trigger_event_id".into(), opt(&c.trigger_event_id)),
                    ("occurred_at".into(), Value::TimestampMillis(raw.at)),
                    ("rules_version".into(), s(&c.rules_version)),
                    ("opted_out_channels".into(), strings(&c.opted_out_channels)),
                ]),
            ),
            (Described::Handoff(h), Decision::Handoff(raw)) => (
                &self.handoff_schema,
                Value::Record(vec![
                    ("event_id".into(), s(&h.event_id)),
                    ("lead_id".into(), s(&h.lead_id)),
                    ("score".into(), Value::Double(h.score)),
                    ("engagement".into(), Value::Double(h.engagement)),
                    ("fit".into(), Value::Double(h.fit)),
                    ("fit_grade".into(), opt(&h.fit_grade)),
                    ("segment".into(), s(&h.segment)),
                    (
                        "top_signals".into(),
                        Value::Array(
                            raw.top_signals
                                .iter()
                                .map(|sig| {
                                    Value::Record(vec![
                                        ("rule".into(), s(&sig.rule)),
                                        ("points".into(), Value::Double(sig.points)),
                                        ("last_at".into(), Value::TimestampMillis(sig.last_at)),
                                        ("count".into(), Value::Long(i64::from(sig.count))),
                                    ])
                                })
                                .collect(),
                        ),
                    ),
                    ("crossing_signal".into(), opt(&h.crossing_signal)),
                    ("trigger_event_id".into(), s(&h.trigger_event_id)),
                    (
                        "fit_breakdown".into(),
                        Value::Map(
                            h.fit_breakdown
                                .iter()
                                .map(|(k, v)| (k.clone(), Value::Double(*v)))
                                .collect(),
                        ),
                    ),
                    ("missing_profile".into(), strings(&h.missing_profile)),
                    ("first_touch_source".into(), opt(&h.first_touch_source)),
                    ("first_touch_campaign".into(), opt(&h.first_touch_campaign)),
                    ("occurred_at".into(), Value::TimestampMillis(raw.at)),
                    ("rules_version".into(), s(&h.rules_version)),
                ]),
            ),
            _ => unreachable!("described from the same decision"),
        };
        apache_avro::to_avro_datum(schema, record)
            .expect("output records match the shipped schemas")
    }
}

/// A segment change as JSON, written straight into `out`: the bytes of
/// [`SegmentChangeOut`] through serde_json (a test holds them equal), without
/// building its owned strings first.
fn change_json(engine: &Engine, lead: &str, c: &SegmentChange, out: &mut Vec<u8>) {
    let rules = &**engine.rules();
    let mut id = [0u8; uuid::fmt::Hyphenated::LENGTH];
    let id = change_id(&rules.version, lead, c, rules)
        .hyphenated()
        .encode_lower(&mut id);
    let mut json = |key: &str, value: &dyn erased::Value| {
        out.push(if out.is_empty() { b'{' } else { b',' });
        out.push(b'"');
        out.extend_from_slice(key.as_bytes());
        out.extend_from_slice(b"\":");
        value.write(out);
    };
    json("event_id", &&*id);
    json("lead_id", &lead);
    json("previous_segment", &c.from.name(rules));
    json("segment", &c.to.name(rules));
    json("score", &published(c.scores.total));
    json("engagement", &published(c.scores.engagement));
    json("fit", &published(c.scores.fit));
    json("fit_grade", &c.scores.grade.map(|g| g.as_str()));
    json("reason", &c.reason.as_str());
    json("trigger_event_id", &c.trigger.as_deref());
    json("occurred_at", &&*format_rfc3339(c.at));
    json("rules_version", &rules.version.as_str());
    json(
        "opted_out_channels",
        &c.opted_out
            .iter()
            .filter_map(|i| rules.channels.get(usize::from(*i)).map(String::as_str))
            .collect::<Vec<&str>>(),
    );
    out.push(b'}');
}

/// One JSON value written with serde_json's own formatting (escaping,
/// shortest round-trip floats, `null` for a non-finite number or `None`).
mod erased {
    pub(super) trait Value {
        fn write(&self, out: &mut Vec<u8>);
    }

    impl<T: serde::Serialize + ?Sized> Value for T {
        fn write(&self, out: &mut Vec<u8>) {
            serde_json::to_writer(out, self).expect("plain values serialize");
        }
    }
}

/// A decision in its published shape.
#[derive(Debug, Clone, PartialEq)]
pub enum Described {
    /// A segment change.
    Change(SegmentChangeOut),
    /// A hand-off.
    Handoff(HandoffOut),
}

impl Described {
    /// JSON bytes.
    pub fn to_json(&self) -> Vec<u8> {
        match self {
            Described::Change(c) => serde_json::to_vec(c),
            Described::Handoff(h) => serde_json::to_vec(h),
        }
        .expect("output structs serialize")
    }
}

/// Kafka header names on dead-lettered messages (the payload and key are the original bytes).
pub mod dead_letter_headers {
    /// Human-readable reason.
    pub const REASON: &str = "leadscore.reason";
    /// Error class (`json`, `avro`, `contract`, …).
    pub const KIND: &str = "leadscore.error.kind";
    /// Source topic.
    pub const TOPIC: &str = "leadscore.source.topic";
    /// Source partition.
    pub const PARTITION: &str = "leadscore.source.partition";
    /// Source offset.
    pub const OFFSET: &str = "leadscore.source.offset";
    /// Size of the original payload in bytes (the dead letter carries at most
    /// `kafka.dead_letter_max_bytes` of it).
    pub const ORIGINAL_SIZE: &str = "leadscore.original.size";
    /// xxh3-64 (hex) of the original payload, when the dead letter carries a cut copy.
    pub const ORIGINAL_HASH: &str = "leadscore.original.xxh3";
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::engine::rules::Grade;
    use crate::engine::{EngineConfig, Reason, Scores, Segment};

    fn change() -> SegmentChange {
        SegmentChange {
            from: Segment::Tier(0),
            to: Segment::Tier(1),
            scores: Scores {
                total: 30.0,
                engagement: 30.0,
                fit: 0.0,
                grade: Some(Grade::D),
            },
            reason: Reason::Event,
            trigger: Some("e-1".into()),
            at: 1_764_000_000_000,
            opted_out: Vec::new(),
        }
    }

    proptest::proptest! {
        /// The streamed hash is UUID v5 of the joined name, as documented.
        #[test]
        fn ids_are_uuid_v5_of_the_joined_parts(
            parts in proptest::collection::vec(proptest::collection::vec(".{0,40}", 1..3), 1..6)
        ) {
            let pieces: Vec<Vec<&str>> = parts.iter().map(|p| p.iter().map(String::as_str).collect()).collect();
            let refs: Vec<&[&str]> = pieces.iter().map(Vec::as_slice).collect();
            let name: Vec<String> = parts.iter().map(|p| p.concat()).collect();
            let expected = Uuid::new_v5(&ID_NAMESPACE, name.join("\x1f").as_bytes());
            proptest::prop_assert_eq!(id_of(&refs), expected);
        }
    }

    #[test]
    fn ids_are_deterministic_and_distinct() {
        let rules = Rules::default_rules();
        let a = change_id("v1", "lead", &change(), &rules);
        assert_eq!(a, change_id("v1", "lead", &change(), &rules));
        assert_ne!(a, change_id("v2", "lead", &change(), &rules));
        assert_ne!(a, change_id("v1", "other", &change(), &rules));
    }

    /// Downstream consumers de-duplicate by these ids, across releases too:
    /// the names they hash must never change.
    #[test]
    fn ids_are_pinned() {
        let rules = Rules::default_rules();
        let mut c = change();
        assert_eq!(
            change_id("v1", "lead", &c, &rules).to_string(),
            "223f8901-249d-5e72-acd9-274eb8425007"
        );
        c.trigger = None;
        assert_eq!(
            change_id("v1", "lead", &c, &rules).to_string(),
            "25bb747a-77a8-5272-87a2-ab4bf8f7cc8d"
        );
        let h = Handoff {
            scores: c.scores,
            segment: c.to,
            top_signals: Vec::new(),
            crossing_rule: None,
            trigger: "e-9".into(),
            fit_breakdown: Vec::new(),
            missing_profile: Vec::new(),
            first_touch: None,
            at: c.at,
        };
        assert_eq!(
            handoff_id("v1", "lead", &h).to_string(),
            "86e84f7d-157b-5ac5-af3e-95e340d4104a"
        );
    }

    proptest::proptest! {
        /// Segment changes written in place are the bytes serde_json gives
        /// for their published struct.
        #[test]
        fn segment_changes_written_in_place_match_serde(
            lead in "[a-z0-9\"\\\\\u{e9}\u{1}-]{0,12}",
            trigger in proptest::option::of("[ -~\u{e9}\u{7f}\n]{0,20}"),
            from in 0u16..9,
            to in 0u16..9,
            reason in 0u8..5,
            scores in proptest::array::uniform3(proptest::num::f64::ANY),
            grade in proptest::option::of(0u8..4),
            opted in proptest::collection::vec(0u8..6, 0..3),
            at in 946_684_800_000i64..4_102_444_800_000,
        ) {
            let engine = Engine::new(Arc::new(Rules::default_rules()), EngineConfig::default());
            let segment = |code: u16| Segment::from_code(if code < 3 { code } else { 997 + code });
            let c = SegmentChange {
                from: segment(from),
                to: segment(to),
                scores: Scores {
                    total: scores[0],
                    engagement: scores[1],
                    fit: scores[2],
                    grade: grade.map(|g| [Grade::A, Grade::B, Grade::C, Grade::D][usize::from(g)]),
                },
                reason: Reason::from_code(reason),
                trigger,
                at,
                opted_out: opted,
            };
            let d = Decision::Change(c);
            let fast = Encoder::new(Format::Json).encode(&engine, &lead, &d).payload;
            let slow = Encoder::describe(&engine, &lead, &d).to_json();
            proptest::prop_assert_eq!(String::from_utf8(fast).unwrap(), String::from_utf8(slow).unwrap());
        }
    }

    /// 25 points read back through floating point as 24.99999999998895
    /// enter `warm` (the threshold's tolerance) and are published as 25, so
    /// a consumer that checks the score against the threshold agrees.
    #[test]
    fn a_published_score_agrees_with_the_segment_threshold() {
        let engine = Engine::new(Arc::new(Rules::default_rules()), EngineConfig::default());
        let mut c = change();
        c.scores.total = 24.999_999_999_988_95;
        c.scores.engagement = 24.999_999_999_988_95;
        let Described::Change(out) = Encoder::describe(&engine, "lead", &Decision::Change(c))
        else {
            panic!("a change");
        };
        assert_eq!(out.score, 25.0);
        assert_eq!(out.engagement, 25.0);
        // On either side of a threshold, as the segment decisions see it.
        let t = 20.0;
        for score in [19.999_999_5, 20.0 - 1e-9, 20.0, 20.000_000_4] {
            assert!(published(score) >= t, "{score}");
            assert!(
                score >= t - crate::engine::rules::SCORE_TOLERANCE,
                "{score}"
            );
        }
        for score in [19.999_998_9, 19.5, -3.0] {
            assert!(published(score) < t, "{score}");
            assert!(score < t - crate::engine::rules::SCORE_TOLERANCE, "{score}");
        }
        assert_eq!(published(31.998_693_526_921_816), 31.998_694);
    }

    #[test]
    fn json_and_avro_encode() {
        let engine = Engine::new(Arc::new(Rules::default_rules()), EngineConfig::default());
        let d = Decision::Change(change());
        let json = Encoder::new(Format::Json).encode(&engine, "lead-7", &d);
        let parsed: SegmentChangeOut = serde_json::from_slice(&json.payload).unwrap();
        assert_eq!(parsed.previous_segment, "cold");
        assert_eq!(parsed.segment, "warm");
        assert_eq!(parsed.occurred_at, "2025-11-24T16:00:00.000Z");
        assert_eq!(parsed.fit_grade.as_deref(), Some("D"));
        let avro = Encoder::new(Format::Avro).encode(&engine, "lead-7", &d);
        let (schema, _) = output_schemas();
        let back = apache_avro::from_avro_datum(&schema, &mut &avro.payload[..], None).unwrap();
        assert!(matches!(back, Value::Record(_)));
    }
}
