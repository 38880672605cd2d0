//! The fast path of JSON input: one pass over the payload for the shape that
//! trackers send almost always — one flat object of the contract's fields,
//! string (or `null`) values without escapes, and `attributes` an object of
//! such strings.
//!
//! It answers only when it is certain: anything else (an escape, a control
//! character, a number or a nested value where a string is expected, an
//! unknown or repeated key, trailing bytes) makes it return `None`, and the
//! payload goes through serde_json, which decides and names the error. So
//! for every payload the fast path accepts, serde_json would have given the
//! same fields (a property test checks this), and every rejection reads the
//! same as before.

use std::borrow::Cow;

use crate::event::AttributeList;

/// The contract's fields as found in the payload, borrowed from it (the
/// attributes already in the event's form, so that they are not copied
/// into another list).
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Fields<'a> {
    pub event_id: Option<&'a str>,
    pub lead_id: Option<&'a str>,
    pub anonymous_id: Option<&'a str>,
    pub occurred_at: Option<&'a str>,
    pub kind: Option<&'a str>,
    pub channel: Option<&'a str>,
    pub attributes: Option<AttributeList<'a>>,
}

/// Scans `text`; `None` means "not the simple shape: ask serde_json".
pub(super) fn scan(text: &str) -> Option<Fields<'_>> {
    let mut s = Scanner {
        text,
        bytes: text.as_bytes(),
        pos: 0,
    };
    let mut fields = Fields::default();
    let mut seen = 0u8;
    s.expect(b'{')?;
    if s.peek()? == b'}' {
        s.pos += 1;
    } else {
        loop {
            let key = s.string()?;
            s.expect(b':')?;
            let bit = match key {
                "event_id" => 1,
                "lead_id" => 2,
                "anonymous_id" => 4,
                "occurred_at" => 8,
                "type" => 16,
                "channel" => 32,
                "attributes" => 64,
                _ => return None,
            };
            if seen & bit != 0 {
                return None;
            }
            seen |= bit;
            if bit == 64 {
                fields.attributes = s.attributes()?;
            } else {
                let value = s.nullable_string()?;
                let slot = match bit {
                    1 => &mut fields.event_id,
                    2 => &mut fields.lead_id,
                    4 => &mut fields.anonymous_id,
                    8 => &mut fields.occurred_at,
                    16 => &mut fields.kind,
                    _ => &mut fields.channel,
                };
                *slot = value;
            }
            match s.next()? {
                b',' => continue,
                b'}' => break,
                _ => return None,
            }
        }
    }
    s.skip_space();
    (s.pos == s.bytes.len()).then_some(fields)
}

struct Scanner<'a> {
    text: &'a str,
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Scanner<'a> {
    fn skip_space(&mut self) {
        // Compact JSON has none: test the first byte before looping.
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.bytes.get(self.pos) {
            self.pos += 1;
        }
    }

    /// The next byte that is not whitespace, not consumed.
    fn peek(&mut self) -> Option<u8> {
        self.skip_space();
        self.bytes.get(self.pos).copied()
    }

    /// The next byte that is not whitespace, consumed.
    fn next(&mut self) -> Option<u8> {
        let b = self.peek()?;
        self.pos += 1;
        Some(b)
    }

    fn expect(&mut self, byte: u8) -> Option<()> {
        (self.next()? == byte).then_some(())
    }

    /// A string without escapes or control characters.
    fn string(&mut self) -> Option<&'a str> {
        self.expect(b'"')?;
        let start = self.pos;
        let end = start + plain_len(self.bytes.get(start..)?);
        if *self.bytes.get(end)? != b'"' {
            return None;
        }
        // Both ends sit next to an ASCII quote, so they are char boundaries.
        let s = self.text.get(start..end)?;
        self.pos = end + 1;
        Some(s)
    }

    /// A string, or `null`.
    fn nullable_string(&mut self) -> Option<Option<&'a str>> {
        if self.peek()? == b'n' {
            self.literal_null()?;
            return Some(None);
        }
        self.string().map(Some)
    }

    fn literal_null(&mut self) -> Option<()> {
        let end = self.pos.checked_add(4)?;
        (self.bytes.get(self.pos..end)? == b"null").then(|| self.pos = end)
    }

    /// An object of string values, or `null`.
    fn attributes(&mut self) -> Option<Option<AttributeList<'a>>> {
        if self.peek()? == b'n' {
            self.literal_null()?;
            return Some(None);
        }
        self.expect(b'{')?;
        let mut out = Vec::new();
        if self.peek()? == b'}' {
            self.pos += 1;
            return Some(Some(out));
        }
        loop {
            let key = self.string()?;
            self.expect(b':')?;
            let value = self.string()?;
            out.push((Cow::Borrowed(key), Cow::Borrowed(value)));
            match self.next()? {
                b',' => continue,
                b'}' => return Some(Some(out)),
                _ => return None,
            }
        }
    }
}

/// How many bytes from the start of `bytes` are plain string content: not a
/// quote, a backslash or a control character. Eight bytes at a time (the
/// word tricks of "Bit Twiddling Hacks": a byte below `n` sets its top bit
/// in `(x - n·0x01…) & !x & 0x80…`).
fn plain_len(bytes: &[u8]) -> usize {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let below = |x: u64, n: u64| x.wrapping_sub(ONES * n) & !x & HIGH;
    let mut i = 0;
    while let Some(chunk) = bytes.get(i..i + 8) {
        let x = u64::from_le_bytes(chunk.try_into().expect("eight bytes"));
        let special = below(x ^ (ONES * u64::from(b'"')), 1)
            | below(x ^ (ONES * u64::from(b'\\')), 1)
            | below(x, 0x20);
        if special != 0 {
            return i + (special.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    i + bytes[i..]
        .iter()
        .position(|&b| b == b'"' || b == b'\\' || b < 0x20)
        .unwrap_or(bytes.len() - i)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_usual_shape_is_read_in_one_pass() {
        let f = scan(
            r#" { "event_id" : "e-1", "lead_id":null, "anonymous_id":"c-1", "occurred_at":"2026-11-22T10:00:00Z",
                "type":"page_view","attributes":{"url":"https://example.com/ä","k":""} } "#,
        )
        .unwrap();
        assert_eq!(f.event_id, Some("e-1"));
        assert_eq!(f.lead_id, None);
        assert_eq!(f.anonymous_id, Some("c-1"));
        assert_eq!(f.kind, Some("page_view"));
        assert_eq!(
            f.attributes,
            Some(vec![
                ("url".into(), "https://example.com/ä".into()),
                ("k".into(), "".into())
            ])
        );
        assert_eq!(scan("{}"), Some(Fields::default()));
    }

    #[test]
    fn plain_len_stops_at_the_first_special_byte() {
        for text in ["", "a", "abcdefg", "abcdefgh", "abcdefghijklmnopq"] {
            assert_eq!(plain_len(text.as_bytes()), text.len());
            for special in [b'"', b'\\', b'\n', 0u8, 0x1f] {
                for at in 0..=text.len() {
                    let mut b = text.as_bytes().to_vec();
                    b.insert(at, special);
                    b.extend_from_slice(b"\"zz");
                    assert_eq!(plain_len(&b), at, "{text} {special} {at}");
                }
            }
        }
        assert_eq!(
            plain_len("é€😀 ".as_bytes()),
            "é€😀 ".len(),
            "bytes ≥ 0x80 are plain"
        );
    }

    #[test]
    fn anything_unusual_is_left_to_serde() {
        for text in [
            "",
            "[]",
            r#"{"event_id":"a\"b"}"#,
            r#"{"event_id":"a\nb"}"#,
            "{\"event_id\":\"a\tb\"}",
            r#"{"event_id":1}"#,
            r#"{"event_id":"a","event_id":"b"}"#,
            r#"{"event_id":"a",}"#,
            r#"{"extra":"a"}"#,
            r#"{"attributes":{"n":3}}"#,
            r#"{"attributes":{"a":"b",}}"#,
            r#"{"attributes":["a"]}"#,
            r#"{"lead_id":nul}"#,
            r#"{"lead_id":nulls}"#,
            r#"{"event_id":"a"} x"#,
            r#"{"event_id":"a""#,
            r#"{"event_id":"a"}}"#,
        ] {
            assert_eq!(scan(text), None, "{text}");
        }
    }
}
