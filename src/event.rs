//! The input event contract: one validated event, whatever its wire format.
//!
//! Decoders (`crate::decode`) turn bytes into an [`Event`]; everything after them
//! works on this one type. Validation happens here so that JSON and Avro input
//! obey exactly the same contract.

use std::borrow::Cow;
use std::fmt;

use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch, UTC. All engine time is event time in this unit.
pub type Millis = i64;

/// Earliest accepted `occurred_at`: 2000-01-01T00:00:00Z.
pub const MIN_OCCURRED_AT: Millis = 946_684_800_000;
/// Latest accepted `occurred_at`: 2100-01-01T00:00:00Z.
pub const MAX_OCCURRED_AT: Millis = 4_102_444_800_000;
/// Longest accepted `event_id`, `lead_id` or `anonymous_id`, in bytes.
pub const MAX_ID_LEN: usize = 256;
/// Most attributes accepted on one event.
pub const MAX_ATTRIBUTES: usize = 64;
/// Longest accepted attribute key or value, in bytes.
pub const MAX_ATTRIBUTE_LEN: usize = 4096;

/// The family of an input topic; each family has its own event-type vocabulary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// Website events (`events.web`).
    Web,
    /// Advertising pixel events (`events.adpixel`).
    Adpixel,
    /// Email engagement events (`events.email`).
    Email,
    /// CRM profile and lifecycle events (`events.crm`).
    Crm,
}

impl Source {
    /// All sources, in a fixed order.
    pub const ALL: [Source; 4] = [Source::Web, Source::Adpixel, Source::Email, Source::Crm];

    /// The lower-case name used in config files, metrics and outputs.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Web => "web",
            Source::Adpixel => "adpixel",
            Source::Email => "email",
            Source::Crm => "crm",
        }
    }

    /// The event types this source accepts.
    pub fn types(self) -> &'static [EventType] {
        use EventType::*;
        match self {
            Source::Web => &[
                PageView,
                FormSubmit,
                ContentDownload,
                BookingStarted,
                BookingAbandoned,
                ChatMessage,
                Identify,
                BookingCompleted,
                Purchase,
            ],
            Source::Adpixel => &[Impression, Click, AddToCart, Conversion],
            Source::Email => &[
                Sent,
                Delivered,
                Open,
                Click,
                Reply,
                Unsubscribe,
                Bounce,
                SpamComplaint,
            ],
            Source::Crm => &[ProfileUpdated, LifecycleChanged, ErasureRequested],
        }
    }

    /// Parses a source name as written in config files.
    pub fn parse(name: &str) -> Option<Source> {
        Source::ALL.into_iter().find(|s| s.as_str() == name)
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The event-type vocabulary of the contract (see the README's event table).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventType {
    /// Web: a page was viewed (`url`, `referrer`, `title`).
    PageView,
    /// Web: a form was submitted (`form_id`).
    FormSubmit,
    /// Web: a document was downloaded (`asset`).
    ContentDownload,
    /// Web: a booking was started.
    BookingStarted,
    /// Web: a booking was started and abandoned.
    BookingAbandoned,
    /// Web: a chat or inbox question.
    ChatMessage,
    /// Web: links an `anonymous_id` to a `lead_id`.
    Identify,
    /// Web: a booking was completed.
    BookingCompleted,
    /// Web: a purchase (`value`).
    Purchase,
    /// Ad pixel: an ad impression.
    Impression,
    /// Ad pixel or email: a click.
    Click,
    /// Ad pixel: an item added to a cart.
    AddToCart,
    /// Ad pixel: a conversion (`value`).
    Conversion,
    /// Email: a message was sent.
    Sent,
    /// Email: a message was delivered.
    Delivered,
    /// Email: a message was opened.
    Open,
    /// Email: a reply.
    Reply,
    /// Email: an unsubscribe.
    Unsubscribe,
    /// Email: a bounce (`kind`: hard or soft).
    Bounce,
    /// Email: a spam complaint.
    SpamComplaint,
    /// CRM: profile attributes changed (industry, company_size, job_title, budget, country, …).
    ProfileUpdated,
    /// CRM: lifecycle stage changed (`stage`).
    LifecycleChanged,
    /// CRM: the person asked to be erased (also: a tombstone on the CRM topic).
    ErasureRequested,
}

impl EventType {
    /// The wire name of this type.
    pub fn as_str(self) -> &'static str {
        use EventType::*;
        match self {
            PageView => "page_view",
            FormSubmit => "form_submit",
            ContentDownload => "content_download",
            BookingStarted => "booking_started",
            BookingAbandoned => "booking_abandoned",
            ChatMessage => "chat_message",
            Identify => "identify",
            BookingCompleted => "booking_completed",
            Purchase => "purchase",
            Impression => "impression",
            Click => "click",
            AddToCart => "add_to_cart",
            Conversion => "conversion",
            Sent => "sent",
            Delivered => "delivered",
            Open => "open",
            Reply => "reply",
            Unsubscribe => "unsubscribe",
            Bounce => "bounce",
            SpamComplaint => "spam_complaint",
            ProfileUpdated => "profile_updated",
            LifecycleChanged => "lifecycle_changed",
            ErasureRequested => "erasure_requested",
        }
    }

    /// Parses a wire type name for the given source; `None` if that source has no such type.
    pub fn parse(source: Source, name: &str) -> Option<EventType> {
        source.types().iter().copied().find(|t| t.as_str() == name)
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why an event breaks the contract. Every variant is poison: the event is
/// dead-lettered with this reason and the partition moves on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContractError {
    /// `event_id` is missing or empty.
    #[error("event_id is missing or empty")]
    MissingEventId,
    /// Neither `lead_id` nor `anonymous_id` is present.
    #[error("neither lead_id nor anonymous_id is present")]
    MissingIdentity,
    /// An id is longer than [`MAX_ID_LEN`].
    #[error("{field} is longer than {MAX_ID_LEN} bytes")]
    IdTooLong {
        /// The offending field.
        field: &'static str,
    },
    /// `occurred_at` is outside 2000-01-01 .. 2100-01-01.
    #[error("occurred_at {} is outside 2000-01-01..2100-01-01", time_in_words(*.0))]
    TimestampOutOfRange(Millis),
    /// `occurred_at` is not RFC 3339.
    #[error("occurred_at is not an RFC 3339 timestamp: {0}")]
    BadTimestamp(String),
    /// `type` is not in the vocabulary of this topic's source.
    #[error("type {kind:?} is not a {family} event type")]
    UnknownType {
        /// The topic's source family.
        family: Source,
        /// The type as received.
        kind: String,
    },
    /// Too many attributes, or one too long.
    #[error(
        "attributes exceed the limits ({MAX_ATTRIBUTES} entries of at most {MAX_ATTRIBUTE_LEN} bytes)"
    )]
    AttributesTooLarge,
    /// Two attributes of one name: which one a rule would read is not the
    /// producer's to guess (JSON parsers differ: most keep the last).
    #[error("attribute {0:?} appears more than once")]
    DuplicateAttribute(String),
    /// An `identify` event without both ids.
    #[error("identify needs both lead_id and anonymous_id")]
    IdentifyWithoutBothIds,
    /// An erasure request without a lead id.
    #[error("erasure_requested needs a lead_id")]
    ErasureWithoutLead,
    /// `channel` names a channel the rules do not list.
    #[error("channel {got:?} is not one of the configured channels ({known})")]
    UnknownChannel {
        /// The channel as received.
        got: String,
        /// The configured channels, comma-separated.
        known: String,
    },
    /// `occurred_at` lies further ahead of the message's broker timestamp
    /// (or the wall clock, without one or when that is earlier) than the
    /// configured tolerance.
    #[error(
        "occurred_at {occurred_at} is {ahead_ms} ms after {against} (tolerance {tolerance_ms} ms)"
    )]
    FromTheFuture {
        /// The event time, RFC 3339.
        occurred_at: String,
        /// How far ahead it is.
        ahead_ms: i64,
        /// `the message's broker timestamp` or `the wall clock`, with its
        /// instant (RFC 3339).
        against: String,
        /// The configured tolerance.
        tolerance_ms: i64,
    },
}

/// One validated input event. Strings borrow from the message where the decoder allows.
#[derive(Debug, Clone, PartialEq)]
pub struct Event<'a> {
    /// Unique id; the de-duplication key.
    pub event_id: Cow<'a, str>,
    /// The known lead, if identified.
    pub lead_id: Option<Cow<'a, str>>,
    /// The anonymous visitor id, if any.
    pub anonymous_id: Option<Cow<'a, str>>,
    /// Event time.
    pub occurred_at: Millis,
    /// The family of the topic it came from.
    pub source: Source,
    /// The event type.
    pub kind: EventType,
    /// Messaging channel (messaging topic only; `None` is the first configured channel).
    pub channel: Option<Cow<'a, str>>,
    /// String attributes, in message order.
    pub attributes: AttributeList<'a>,
}

impl<'a> Event<'a> {
    /// Its attribute list, emptied, for the next event (see
    /// [`PackedEvent::event_in`]).
    pub fn into_spare(self) -> SpareAttributes {
        relist(self.attributes)
    }

    /// Checks the contract rules shared by every decoder.
    pub fn validate(self) -> Result<Self, ContractError> {
        if self.event_id.is_empty() {
            return Err(ContractError::MissingEventId);
        }
        check_len("event_id", &self.event_id)?;
        let lead = self.lead_id.as_deref().filter(|s| !s.is_empty());
        let anon = self.anonymous_id.as_deref().filter(|s| !s.is_empty());
        if lead.is_none() && anon.is_none() {
            return Err(ContractError::MissingIdentity);
        }
        if let Some(id) = lead {
            check_len("lead_id", id)?;
        }
        if let Some(id) = anon {
            check_len("anonymous_id", id)?;
        }
        if self.kind == EventType::Identify && (lead.is_none() || anon.is_none()) {
            return Err(ContractError::IdentifyWithoutBothIds);
        }
        if self.kind == EventType::ErasureRequested && lead.is_none() {
            return Err(ContractError::ErasureWithoutLead);
        }
        if !(MIN_OCCURRED_AT..MAX_OCCURRED_AT).contains(&self.occurred_at) {
            return Err(ContractError::TimestampOutOfRange(self.occurred_at));
        }
        if self.attributes.len() > MAX_ATTRIBUTES
            || self
                .attributes
                .iter()
                .any(|(k, v)| k.len() > MAX_ATTRIBUTE_LEN || v.len() > MAX_ATTRIBUTE_LEN)
        {
            return Err(ContractError::AttributesTooLarge);
        }
        // At most MAX_ATTRIBUTES, and usually two or three: pairwise.
        for (i, (name, _)) in self.attributes.iter().enumerate() {
            if self.attributes[..i].iter().any(|(seen, _)| seen == name) {
                return Err(ContractError::DuplicateAttribute(truncate(name, 64)));
            }
        }
        if self
            .channel
            .as_deref()
            .is_some_and(|c| c.len() > MAX_ID_LEN)
        {
            return Err(ContractError::IdTooLong { field: "channel" });
        }
        Ok(Event {
            lead_id: self.lead_id.filter(|s| !s.is_empty()),
            anonymous_id: self.anonymous_id.filter(|s| !s.is_empty()),
            channel: if self.source == Source::Email {
                self.channel.filter(|s| !s.is_empty())
            } else {
                None
            },
            ..self
        })
    }

    /// The value of an attribute, if present (the first one wins on repeats).
    /// `channel` also reads the event's channel field when no attribute has that name.
    pub fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_ref())
            .or_else(|| {
                (key == "channel")
                    .then_some(self.channel.as_deref())
                    .flatten()
            })
    }

    /// Copies every borrowed string so the event outlives its message.
    pub fn into_owned(self) -> Event<'static> {
        let own = |c: Cow<'a, str>| Cow::Owned(c.into_owned());
        Event {
            event_id: own(self.event_id),
            lead_id: self.lead_id.map(own),
            anonymous_id: self.anonymous_id.map(own),
            occurred_at: self.occurred_at,
            source: self.source,
            kind: self.kind,
            channel: self.channel.map(own),
            attributes: self
                .attributes
                .into_iter()
                .map(|(k, v)| (own(k), own(v)))
                .collect(),
        }
    }
}

/// A validated event that owns its strings, packed end to end into one
/// buffer: what a shard's merge holds between a message's decoding and its
/// apply. An owned [`Event`] takes an allocation per string (about nine for
/// an event with two attributes); this takes one, its text, and where each
/// string ends is kept beside it (see [`Ends`]), so that the first read of
/// an event after its wait in the merge misses the CPU's caches once.
#[derive(Debug, Clone, PartialEq)]
pub struct PackedEvent {
    /// The event id, lead id, anonymous id, channel, then each attribute's
    /// key and value. An absent id or channel is empty (validation leaves
    /// none of them present and empty).
    text: Box<str>,
    /// Where each string of `text` ends.
    ends: Ends,
    occurred_at: Millis,
    source: Source,
    kind: EventType,
}

/// Strings of a [`PackedEvent`] before its attributes.
const PACKED_FIELDS: usize = 4;

/// Strings whose ends a [`PackedEvent`] holds inline: the four fields and
/// four attributes.
const INLINE_ENDS: usize = PACKED_FIELDS + 2 * 4;

/// Where each string of a packed event's text ends: inline for the usual
/// event (at most [`INLINE_ENDS`] strings in its first 64 KiB), in an
/// allocation of its own otherwise. A decoded event's text is never longer
/// than its message, which the decoder caps at 64 KiB
/// (`decode::MAX_PAYLOAD_BYTES`), so only more than four attributes take the
/// boxed form in the service; longer text is handled all the same.
#[derive(Debug, Clone, PartialEq)]
enum Ends {
    Inline { n: u8, ends: [u16; INLINE_ENDS] },
    Heap(Box<[u32]>),
}

impl Ends {
    /// The ends of the strings, in order.
    fn new(ends: impl Iterator<Item = usize>) -> Ends {
        let mut inline = [0u16; INLINE_ENDS];
        let mut n = 0;
        let mut all = Vec::new();
        for end in ends {
            match inline.get_mut(n).zip(u16::try_from(end).ok()) {
                Some((slot, end)) if all.is_empty() => *slot = end,
                _ => {
                    if all.is_empty() {
                        all.extend(inline[..n].iter().map(|&e| u32::from(e)));
                    }
                    all.push(u32::try_from(end).expect("an event's strings fit a message"));
                }
            }
            n += 1;
        }
        match u8::try_from(n) {
            Ok(n) if all.is_empty() => Ends::Inline { n, ends: inline },
            _ => Ends::Heap(all.into_boxed_slice()),
        }
    }

    fn len(&self) -> usize {
        match self {
            Ends::Inline { n, .. } => usize::from(*n),
            Ends::Heap(ends) => ends.len(),
        }
    }

    fn get(&self, i: usize) -> usize {
        match self {
            Ends::Inline { ends, .. } => usize::from(ends[i]),
            Ends::Heap(ends) => ends[i] as usize,
        }
    }
}

impl PackedEvent {
    /// Packs a validated event (its strings are at most a message long).
    pub fn new(e: &Event<'_>) -> PackedEvent {
        let fields = [
            &*e.event_id,
            e.lead_id.as_deref().unwrap_or_default(),
            e.anonymous_id.as_deref().unwrap_or_default(),
            e.channel.as_deref().unwrap_or_default(),
        ];
        let strings = || {
            fields
                .into_iter()
                .chain(e.attributes.iter().flat_map(|(k, v)| [&**k, &**v]))
        };
        let mut text = String::with_capacity(strings().map(str::len).sum());
        let ends = Ends::new(strings().map(|s| {
            text.push_str(s);
            text.len()
        }));
        PackedEvent {
            text: text.into_boxed_str(),
            ends,
            occurred_at: e.occurred_at,
            source: e.source,
            kind: e.kind,
        }
    }

    fn string(&self, i: usize) -> &str {
        let start = if i == 0 { 0 } else { self.ends.get(i - 1) };
        &self.text[start..self.ends.get(i)]
    }

    fn present(&self, i: usize) -> Option<&str> {
        Some(self.string(i)).filter(|s| !s.is_empty())
    }

    /// The lead id, if identified.
    pub fn lead_id(&self) -> Option<&str> {
        self.present(1)
    }

    /// The anonymous visitor id, if any.
    pub fn anonymous_id(&self) -> Option<&str> {
        self.present(2)
    }

    /// The event, its strings borrowed from here.
    pub fn event(&self) -> Event<'_> {
        self.event_in(Vec::new())
    }

    /// The event, its strings borrowed from here and its attributes listed
    /// in `spare`'s allocation: a shard applying events one after another
    /// gives each event's list back ([`Event::into_spare`]) for the next,
    /// rather than allocating one per event.
    pub fn event_in(&self, spare: SpareAttributes) -> Event<'_> {
        let mut attributes = relist(spare);
        attributes.extend(
            (PACKED_FIELDS..self.ends.len())
                .step_by(2)
                .map(|i| (self.string(i).into(), self.string(i + 1).into())),
        );
        Event {
            event_id: self.string(0).into(),
            lead_id: self.lead_id().map(Cow::Borrowed),
            anonymous_id: self.anonymous_id().map(Cow::Borrowed),
            occurred_at: self.occurred_at,
            source: self.source,
            kind: self.kind,
            channel: self.present(3).map(Cow::Borrowed),
            attributes,
        }
    }
}

/// An empty list of attributes kept for its allocation (see
/// [`PackedEvent::event_in`]).
pub type SpareAttributes = AttributeList<'static>;

/// An event's attributes: (key, value) in the order given.
pub type AttributeList<'a> = Vec<(Cow<'a, str>, Cow<'a, str>)>;

/// Empties a list of attributes and gives its allocation back as a list of
/// another lifetime (nothing of the old one is left in it). The standard
/// library collects a mapped `into_iter` of the same layout in place, so
/// this keeps the allocation; were that to change, it would allocate
/// afresh, and `attribute_lists_keep_their_allocation` would say so.
// `filter` would keep the old lifetime: only a map can change it.
#[allow(clippy::unnecessary_filter_map)]
fn relist<'b>(list: AttributeList<'_>) -> AttributeList<'b> {
    list.into_iter().filter_map(|_| None).collect()
}

fn check_len(field: &'static str, value: &str) -> Result<(), ContractError> {
    if value.len() > MAX_ID_LEN {
        Err(ContractError::IdTooLong { field })
    } else {
        Ok(())
    }
}

/// Parses an RFC 3339 timestamp into milliseconds since the epoch.
///
/// The usual shape (`YYYY-MM-DDTHH:MM:SS`, an optional fraction of up to nine
/// digits, then `Z` or `±HH:MM`) is read digit by digit; anything else (a
/// leap second, a longer fraction, a malformed text) goes through the `time`
/// crate, which decides what is valid. A property test checks that both give
/// the same answer wherever the fast path answers.
pub fn parse_rfc3339(text: &str) -> Result<Millis, ContractError> {
    match parse_rfc3339_common(text.as_bytes()) {
        Some(millis) => Ok(millis),
        None => parse_rfc3339_full(text),
    }
}

fn parse_rfc3339_full(text: &str) -> Result<Millis, ContractError> {
    let parsed = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .map_err(|_| ContractError::BadTimestamp(truncate(text, 64)))?;
    let millis = parsed.unix_timestamp_nanos() / 1_000_000;
    Ok(millis as Millis)
}

/// The common shape of an RFC 3339 time, or `None` to leave it to the full parser.
fn parse_rfc3339_common(b: &[u8]) -> Option<Millis> {
    fn digits(b: &[u8], from: usize, n: usize) -> Option<i64> {
        let mut v = 0i64;
        for &c in b.get(from..from + n)? {
            if !c.is_ascii_digit() {
                return None;
            }
            v = v * 10 + i64::from(c - b'0');
        }
        Some(v)
    }
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let (year, month, day) = (digits(b, 0, 4)?, digits(b, 5, 2)?, digits(b, 8, 2)?);
    let (hour, minute, second) = (digits(b, 11, 2)?, digits(b, 14, 2)?, digits(b, 17, 2)?);
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let month_days = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return None,
    };
    if day < 1 || day > month_days || hour > 23 || minute > 59 || second > 59 {
        return None;
    }
    let mut at = 19;
    let mut millis = 0;
    if b[at] == b'.' {
        let start = at + 1;
        at = start;
        while at < b.len() && b[at].is_ascii_digit() {
            at += 1;
        }
        let n = at - start;
        if n == 0 || n > 9 {
            return None;
        }
        // Truncated to whole milliseconds, as the full parser's nanoseconds are.
        let ms_digits = n.min(3);
        millis = digits(b, start, ms_digits)? * [100, 10, 1][ms_digits - 1];
    }
    let offset_minutes = match b.get(at..)? {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), _, _, b':', _, _] => {
            let (h, m) = (digits(b, at + 1, 2)?, digits(b, at + 4, 2)?);
            if h > 23 || m > 59 {
                return None;
            }
            if *sign == b'+' {
                h * 60 + m
            } else {
                -(h * 60 + m)
            }
        }
        _ => return None,
    };
    // Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's days_from_civil).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let seconds = days * 86_400 + hour * 3_600 + minute * 60 + second - offset_minutes * 60;
    // Before 1970 the full parser's division rounds toward zero, not down.
    (seconds >= 0).then_some(seconds * 1_000 + millis)
}

/// Formats milliseconds since the epoch as RFC 3339 UTC with millisecond precision.
pub fn format_rfc3339(millis: Millis) -> String {
    let nanos = i128::from(millis) * 1_000_000;
    match time::OffsetDateTime::from_unix_timestamp_nanos(nanos) {
        Ok(t) if (0..=9999).contains(&t.year()) => {
            // `YYYY-MM-DDTHH:MM:SS.mmmZ`, written digit by digit: this runs
            // for every published record, and `format!` costs several times more.
            let mut out = [0u8; 24];
            let fields: [(usize, u32, usize); 7] = [
                (0, t.year() as u32, 4),
                (5, u32::from(u8::from(t.month())), 2),
                (8, u32::from(t.day()), 2),
                (11, u32::from(t.hour()), 2),
                (14, u32::from(t.minute()), 2),
                (17, u32::from(t.second()), 2),
                (20, u32::from(t.millisecond()), 3),
            ];
            for (at, mut value, width) in fields {
                for i in (0..width).rev() {
                    out[at + i] = b'0' + (value % 10) as u8;
                    value /= 10;
                }
            }
            for (at, sep) in [
                (4, b'-'),
                (7, b'-'),
                (10, b'T'),
                (13, b':'),
                (16, b':'),
                (19, b'.'),
                (23, b'Z'),
            ] {
                out[at] = sep;
            }
            // ASCII digits and separators only: the check cannot fail.
            std::str::from_utf8(&out).unwrap_or_default().to_owned()
        }
        Ok(t) => {
            let (y, mo, d) = (t.year(), u8::from(t.month()), t.day());
            format!(
                "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
                t.hour(),
                t.minute(),
                t.second(),
                t.millisecond()
            )
        }
        Err(_) => millis.to_string(),
    }
}

/// A time for a message: RFC 3339, or milliseconds since the epoch past
/// the calendar's range (an Avro `timestamp-millis` can be any `long`).
fn time_in_words(millis: Millis) -> String {
    let text = format_rfc3339(millis);
    if text.ends_with('Z') {
        text
    } else {
        format!("{millis} ms since the epoch")
    }
}

/// The wall clock in milliseconds since the epoch (only for lag and latency
/// figures and the HTTP view; scoring never reads it).
pub fn wall_clock_ms() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as Millis)
}

/// Cuts a string to at most `max` bytes on a character boundary (for error messages).
pub fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Event<'static> {
        Event {
            event_id: "e1".into(),
            lead_id: Some("lead-1".into()),
            anonymous_id: None,
            occurred_at: parse_rfc3339("2026-11-22T10:00:00Z").unwrap(),
            source: Source::Web,
            kind: EventType::PageView,
            channel: None,
            attributes: vec![("url".into(), "https://x/pricing".into())],
        }
    }

    /// A packed event reads back as the event it was packed from: ids
    /// present or absent, a channel, escaped (owned) and borrowed strings,
    /// attributes repeated, empty values, none at all.
    #[test]
    fn a_packed_event_reads_back_as_it_was() {
        let mut events = vec![sample()];
        events.push(Event {
            lead_id: None,
            anonymous_id: Some("anon-ü".into()),
            source: Source::Email,
            kind: EventType::Identify,
            channel: Some(Cow::Owned("sms".to_owned())),
            attributes: vec![
                ("a".into(), "".into()),
                ("a".into(), "second \"quoted\"".to_owned().into()),
                ("".into(), "v".into()),
            ],
            ..sample()
        });
        events.push(Event {
            lead_id: Some("L".into()),
            anonymous_id: Some("v".into()),
            attributes: Vec::new(),
            ..sample()
        });
        // Past the inline ends: more attributes than they hold, and text
        // that passes 64 KiB in the middle of the strings.
        events.push(Event {
            attributes: (0..9)
                .map(|i| (format!("k{i}").into(), format!("v{i}").into()))
                .collect(),
            ..sample()
        });
        events.push(Event {
            attributes: vec![
                ("a".into(), "x".repeat(40_000).into()),
                ("b".into(), "y".repeat(40_000).into()),
                ("c".into(), "z".into()),
            ],
            ..sample()
        });
        events.push(Event {
            attributes: vec![("a".into(), "x".repeat(u16::MAX as usize).into())],
            ..sample()
        });
        for e in events {
            let packed = PackedEvent::new(&e);
            let inline = e.attributes.len() <= 4 && packed.text.len() <= usize::from(u16::MAX);
            assert_eq!(matches!(packed.ends, Ends::Inline { .. }), inline);
            assert_eq!(packed.event(), e);
            assert_eq!(packed.lead_id(), e.lead_id.as_deref());
            assert_eq!(packed.anonymous_id(), e.anonymous_id.as_deref());
            assert_eq!(packed.clone().event().attribute("a"), e.attribute("a"));
        }
    }

    /// Events applied one after another reuse one attribute list.
    #[test]
    fn attribute_lists_keep_their_allocation() {
        let packed = PackedEvent::new(&sample());
        let e = packed.event_in(SpareAttributes::with_capacity(8));
        assert_eq!(e, sample());
        let ptr = e.attributes.as_ptr() as usize;
        let spare = e.into_spare();
        assert!(spare.is_empty());
        assert_eq!((spare.as_ptr() as usize, spare.capacity()), (ptr, 8));
        let e = packed.event_in(spare);
        assert_eq!(e.attributes.as_ptr() as usize, ptr);
        assert_eq!(e, sample());
    }

    #[test]
    fn valid_event_passes() {
        let e = sample().validate().unwrap();
        assert_eq!(e.lead_id.as_deref(), Some("lead-1"));
        assert_eq!(e.attribute("url"), Some("https://x/pricing"));
    }

    #[test]
    fn contract_violations_are_named() {
        let mut e = sample();
        e.event_id = "".into();
        assert_eq!(e.validate(), Err(ContractError::MissingEventId));
        let mut e = sample();
        e.lead_id = Some("".into());
        assert_eq!(e.validate(), Err(ContractError::MissingIdentity));
        let mut e = sample();
        e.occurred_at = 0;
        assert_eq!(e.validate(), Err(ContractError::TimestampOutOfRange(0)));
        assert_eq!(
            ContractError::TimestampOutOfRange(915_148_800_000).to_string(),
            "occurred_at 1999-01-01T00:00:00.000Z is outside 2000-01-01..2100-01-01"
        );
        assert_eq!(
            ContractError::TimestampOutOfRange(i64::MAX).to_string(),
            "occurred_at 9223372036854775807 ms since the epoch is outside 2000-01-01..2100-01-01"
        );
        let mut e = sample();
        e.kind = EventType::Identify;
        assert_eq!(e.validate(), Err(ContractError::IdentifyWithoutBothIds));
        let mut e = sample();
        e.lead_id = Some("x".repeat(300).into());
        assert_eq!(
            e.validate(),
            Err(ContractError::IdTooLong { field: "lead_id" })
        );
        // A repeated attribute name: JSON parsers differ on which value
        // wins, so a rule must not guess (a user probe found the first
        // kept, where a producer's own parser sees the last).
        let mut e = sample();
        e.attributes = vec![
            ("url".into(), "/blog".into()),
            ("ref".into(), "x".into()),
            ("url".into(), "/pricing".into()),
        ];
        assert_eq!(
            e.validate(),
            Err(ContractError::DuplicateAttribute("url".into()))
        );
        assert_eq!(
            ContractError::DuplicateAttribute("url".into()).to_string(),
            "attribute \"url\" appears more than once"
        );
    }

    #[test]
    fn types_belong_to_their_source() {
        assert_eq!(
            EventType::parse(Source::Email, "click"),
            Some(EventType::Click)
        );
        assert_eq!(EventType::parse(Source::Crm, "click"), None);
        assert_eq!(
            EventType::parse(Source::Web, "booking_abandoned"),
            Some(EventType::BookingAbandoned)
        );
    }

    #[test]
    fn timestamps_round_trip() {
        let t = parse_rfc3339("2026-11-22T10:00:00.250+01:00").unwrap();
        assert_eq!(format_rfc3339(t), "2026-11-22T09:00:00.250Z");
        assert!(parse_rfc3339("yesterday").is_err());
    }

    proptest::proptest! {
        /// Wherever the fast path answers, the `time` crate gives the same
        /// instant; and texts near the usual shape parse the same through both.
        #[test]
        fn the_fast_rfc3339_path_agrees_with_the_time_crate(
            year in 0i64..10_000,
            month in 0i64..14,
            day in 0i64..33,
            hour in 0i64..26,
            minute in 0i64..62,
            second in 0i64..62,
            fraction in proptest::option::of("[0-9]{0,11}"),
            zone in proptest::sample::select(vec!["Z", "z", "+00:00", "-00:00", "+07:00", "-05:30", "+23:59", "+24:00", "-12:60", "+0700", "", "Zx"]),
            t in proptest::sample::select(vec!["T", "t", " "]),
        ) {
            let text = format!(
                "{year:04}-{month:02}-{day:02}{t}{hour:02}:{minute:02}:{second:02}{}{zone}",
                fraction.map(|f| format!(".{f}")).unwrap_or_default()
            );
            let fast = parse_rfc3339_common(text.as_bytes());
            let full = parse_rfc3339_full(&text).ok();
            if let Some(fast) = fast {
                proptest::prop_assert_eq!(Some(fast), full, "{}", text);
            }
            proptest::prop_assert_eq!(parse_rfc3339(&text).ok(), full, "{}", text);
        }

        #[test]
        fn formatting_round_trips_over_the_years_0_to_9999(
            millis in -62_167_219_200_000_i64..253_402_300_800_000
        ) {
            let text = format_rfc3339(millis);
            proptest::prop_assert_eq!(text.len(), 24);
            proptest::prop_assert_eq!(parse_rfc3339(&text).unwrap(), millis);
        }
    }
}
