//! A synthetic event stream following the patterns of the product brief: people
//! who only read the menu, price shoppers, bookers who abandon, email-only
//! contacts who stop opening, job seekers, unsubscribers and CRM updates.
//! Used by the demo, the load generator and tests. Deterministic per seed.

use std::fmt::Write as _;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use leadscore::event::{Millis, Source, format_rfc3339};

/// How a synthetic lead behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Persona {
    /// Only reads the menu and the blog.
    Browser,
    /// Looks at prices, opens and clicks emails.
    PriceShopper,
    /// Starts a booking, abandons it, asks in chat.
    Booker,
    /// Receives emails and stops opening them.
    EmailOnly,
    /// Reads the careers page.
    JobSeeker,
    /// Unsubscribes, bounces or complains.
    Unsubscriber,
    /// Changes in the CRM: profile, customer, not ready, recycled.
    CrmManaged,
    /// Browses anonymously (cookie only), identifies, keeps browsing with the cookie.
    Visitor,
    /// Nurtured over SMS and chat apps rather than email.
    Messaging,
}

const PERSONAS: [(Persona, u32); 9] = [
    (Persona::Browser, 26),
    (Persona::PriceShopper, 22),
    (Persona::Booker, 13),
    (Persona::EmailOnly, 13),
    (Persona::JobSeeker, 5),
    (Persona::Unsubscriber, 4),
    (Persona::CrmManaged, 7),
    (Persona::Visitor, 6),
    (Persona::Messaging, 4),
];

const SOURCES: [&str; 5] = ["google", "facebook", "newsletter", "zalo", "partner-blog"];

/// One generated event, ready to produce.
#[derive(Debug, Clone)]
pub struct SynthEvent {
    /// Its source family (selects the topic).
    pub source: Source,
    /// The message key (lead id).
    pub key: String,
    /// JSON payload.
    pub payload: String,
}

/// The generator.
#[derive(Debug)]
pub struct Synth {
    rng: SmallRng,
    leads: Vec<(Persona, u32)>,
    clock: Millis,
    step_ms: Millis,
    seq: u64,
    prefix: String,
}

impl Synth {
    /// `leads` synthetic leads, event time starting at `start` and advancing
    /// `step_ms` per event.
    pub fn new(leads: usize, seed: u64, start: Millis, step_ms: Millis) -> Self {
        let mut rng = SmallRng::seed_from_u64(seed);
        let total: u32 = PERSONAS.iter().map(|(_, w)| w).sum();
        let leads = (0..leads.max(1))
            .map(|_| {
                let mut pick = rng.random_range(0..total);
                let persona = PERSONAS
                    .iter()
                    .find(|(_, w)| {
                        if pick < *w {
                            true
                        } else {
                            pick -= w;
                            false
                        }
                    })
                    .map_or(Persona::Browser, |(p, _)| *p);
                (persona, 0)
            })
            .collect();
        Synth {
            rng,
            leads,
            clock: start,
            step_ms,
            seq: 0,
            prefix: format!("s{seed}"),
        }
    }

    /// Sets the event time of the next event (e.g. to wall time).
    pub fn set_clock(&mut self, at: Millis) {
        self.clock = at;
    }

    /// The lead id of lead number `i`.
    pub fn lead_id(i: usize) -> String {
        format!("lead-{i:06}")
    }

    /// The next event.
    pub fn next_event(&mut self) -> SynthEvent {
        let i = self.rng.random_range(0..self.leads.len());
        self.event_of(i)
    }

    /// The next event of lead number `i`.
    pub fn event_of(&mut self, i: usize) -> SynthEvent {
        let (persona, step) = self.leads[i];
        self.leads[i].1 = step + 1;
        self.clock += self.step_ms;
        self.seq += 1;
        let (source, kind, mut attrs) = self.journey(persona, step);
        let key = Synth::lead_id(i);
        if step == 0 && source == Source::Web {
            attrs.push(("utm_source", SOURCES[i % SOURCES.len()].into()));
        }
        // A visitor is anonymous for its first three events, identifies on the
        // fourth, and later browses again with only the cookie. Its events are
        // keyed by the lead id (the tracker's user key), so they share a shard.
        let (lead, anon) = match (persona, step) {
            (Persona::Visitor, 0..3) => (None, Some(format!("cookie-{i:06}"))),
            (Persona::Visitor, 3) => (Some(key.clone()), Some(format!("cookie-{i:06}"))),
            (Persona::Visitor, s) if s % 3 == 0 => (None, Some(format!("cookie-{i:06}"))),
            _ => (Some(key.clone()), None),
        };
        let channel = match (persona, source) {
            (Persona::Messaging, Source::Email) => Some(["sms", "zalo", "whatsapp"][i % 3]),
            _ => None,
        };
        let mut payload = String::with_capacity(240);
        let _ = write!(payload, r#"{{"event_id":"{}-{}""#, self.prefix, self.seq);
        if let Some(l) = &lead {
            let _ = write!(payload, r#","lead_id":"{l}""#);
        }
        if let Some(a) = &anon {
            let _ = write!(payload, r#","anonymous_id":"{a}""#);
        }
        if let Some(c) = channel {
            let _ = write!(payload, r#","channel":"{c}""#);
        }
        let _ = write!(
            payload,
            r#","occurred_at":"{}","type":"{kind}","attributes":{{"#,
            format_rfc3339(self.clock)
        );
        for (n, (k, v)) in attrs.iter().enumerate() {
            if n > 0 {
                payload.push(',');
            }
            let _ = write!(payload, r#""{k}":"{v}""#);
        }
        payload.push_str("}}");
        SynthEvent {
            source,
            key,
            payload,
        }
    }

    fn journey(
        &mut self,
        persona: Persona,
        step: u32,
    ) -> (Source, &'static str, Vec<(&'static str, String)>) {
        use Source::*;
        let url = |path: &str| ("url", format!("https://buffet.example.com{path}"));
        let r: u32 = self.rng.random_range(0..100);
        match persona {
            Persona::Browser => match r {
                0..50 => (Web, "page_view", vec![url("/menu")]),
                50..75 => (Web, "page_view", vec![url("/blog/seafood-night")]),
                75..90 => (Adpixel, "impression", vec![("ad_id", "a1".into())]),
                _ => (Email, "delivered", vec![]),
            },
            Persona::PriceShopper => match (step, r) {
                (0, _) => (Web, "page_view", vec![url("/menu")]),
                (_, 0..25) => (Web, "page_view", vec![url("/price-list")]),
                (_, 25..45) => (Web, "page_view", vec![url("/pricing")]),
                (_, 45..60) => (Email, "open", vec![("campaign", "promo".into())]),
                (_, 60..72) => (
                    Email,
                    "click",
                    vec![("link_url", "https://buffet.example.com/pricing".into())],
                ),
                (_, 72..85) => (
                    Adpixel,
                    "click",
                    vec![("ad_id", "a2".into()), ("campaign_id", "c9".into())],
                ),
                (_, 85..92) => (
                    Web,
                    "chat_message",
                    vec![("intent", "combo_question".into())],
                ),
                _ => (Email, "delivered", vec![]),
            },
            Persona::Booker => match (step % 8, r) {
                (0, _) => (
                    Crm,
                    "profile_updated",
                    vec![
                        ("industry", "events".into()),
                        ("company_size", "80".into()),
                        ("job_title", "Event Manager".into()),
                        ("country", "VN".into()),
                    ],
                ),
                (1, _) => (Web, "page_view", vec![url("/pricing")]),
                (2, _) => (Web, "booking_started", vec![]),
                (3, 0..60) => (Web, "booking_abandoned", vec![]),
                (4, 0..50) => (Web, "chat_message", vec![("intent", "booking".into())]),
                (5, 0..30) => (Web, "booking_completed", vec![("party", "6".into())]),
                (_, 0..30) => (Adpixel, "add_to_cart", vec![]),
                (_, 30..60) => (Web, "page_view", vec![url("/menu")]),
                _ => (Email, "open", vec![]),
            },
            Persona::EmailOnly => match r {
                0..70 => (Email, "delivered", vec![]),
                70..85 => (Email, "open", vec![("machine_open", "true".into())]),
                _ => (Email, "sent", vec![]),
            },
            Persona::JobSeeker => match r {
                0..70 => (Web, "page_view", vec![url("/careers")]),
                _ => (Web, "page_view", vec![url("/about")]),
            },
            Persona::Unsubscriber => match (step, r) {
                (0..3, _) => (Email, "delivered", vec![]),
                (3, 0..50) => (Email, "unsubscribe", vec![]),
                (3, 50..80) => (Email, "bounce", vec![("kind", "hard".into())]),
                (3, _) => (Email, "spam_complaint", vec![]),
                _ => (Email, "delivered", vec![]),
            },
            Persona::CrmManaged => match (step % 6, r) {
                (0, _) => (
                    Crm,
                    "profile_updated",
                    vec![
                        ("industry", "restaurants".into()),
                        ("company_size", "250".into()),
                        ("budget", "20000".into()),
                        ("job_title", "Owner".into()),
                    ],
                ),
                (1, _) | (2, _) => (Web, "page_view", vec![url("/pricing")]),
                (3, 0..40) => (
                    Crm,
                    "lifecycle_changed",
                    vec![("stage", "opportunity_open".into())],
                ),
                (3, 40..70) => (
                    Crm,
                    "lifecycle_changed",
                    vec![("stage", "not_ready".into())],
                ),
                (3, _) => (Crm, "lifecycle_changed", vec![("stage", "customer".into())]),
                (4, _) => (Crm, "lifecycle_changed", vec![("stage", "recycled".into())]),
                _ => (Web, "form_submit", vec![("form_id", "contact".into())]),
            },
            Persona::Visitor => match (step, r) {
                (3, _) => (Web, "identify", vec![]),
                (_, 0..40) => (Web, "page_view", vec![url("/menu")]),
                (_, 40..70) => (Web, "page_view", vec![url("/price-list")]),
                (_, 70..85) => (Web, "booking_started", vec![]),
                _ => (Web, "page_view", vec![url("/pricing")]),
            },
            Persona::Messaging => match r {
                0..45 => (Email, "delivered", vec![]),
                45..65 => (Email, "open", vec![]),
                65..80 => (
                    Email,
                    "click",
                    vec![("link_url", "https://buffet.example.com/combo".into())],
                ),
                80..95 => (Email, "reply", vec![("text", "table for 4?".into())]),
                _ => (Email, "unsubscribe", vec![]),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use leadscore::decode::{Contract, Decoder, Format};

    #[test]
    fn every_synthetic_event_decodes() {
        let mut s = Synth::new(500, 7, 1_764_000_000_000, 1000);
        let decoders: Vec<_> = Source::ALL
            .iter()
            .map(|s| Decoder::new(*s, Format::Json, Contract::default()))
            .collect();
        for _ in 0..5000 {
            let e = s.next_event();
            let d = decoders.iter().find(|d| d.source() == e.source).unwrap();
            d.decode(Some(e.payload.as_bytes()), None)
                .unwrap_or_else(|err| panic!("{err}: {}", e.payload));
        }
    }

    #[test]
    fn same_seed_same_stream() {
        let mut a = Synth::new(50, 1, 0, 10);
        let mut b = Synth::new(50, 1, 0, 10);
        for _ in 0..100 {
            assert_eq!(a.next_event().payload, b.next_event().payload);
        }
    }
}
