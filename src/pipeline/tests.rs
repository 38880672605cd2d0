//! Processor tests with an in-memory store and sink.

use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;

use super::*;
use crate::decode::Format;
use crate::engine::Rules;
use crate::event::Source;
use crate::output::{OutputKind, SegmentChangeOut};
use crate::store::MemoryStore;

#[derive(Default, Clone)]
struct VecSink {
    records: Arc<Mutex<Vec<Record>>>,
    dead: Arc<Mutex<Vec<(String, i64, String)>>>,
}

impl Sink for VecSink {
    fn send(&mut self, record: &Record) -> Result<(), SinkError> {
        self.records.lock().push(record.clone());
        Ok(())
    }
    fn dead_letter(&mut self, msg: &InMessage<'_>, error: &DecodeError) -> Result<(), SinkError> {
        self.dead
            .lock()
            .push((msg.topic.to_owned(), msg.offset, error.to_string()));
        Ok(())
    }
    fn barrier(&mut self) -> Barrier {
        Barrier::ready()
    }
}

/// A store that can be switched off, to show failures change nothing.
#[derive(Default)]
struct FlakyStore {
    inner: MemoryStore,
    down: AtomicBool,
}

impl Store for FlakyStore {
    fn load(&self, ids: &[&str]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        self.check()?;
        self.inner.load(ids)
    }
    fn write(&self, batch: &WriteBatch) -> Result<(), StoreError> {
        self.check()?;
        self.inner.write(batch)
    }
    fn positions(&self, p: &[(String, i32)]) -> Result<Vec<Option<i64>>, StoreError> {
        self.check()?;
        self.inner.positions(p)
    }
    fn clock(&self, shard: i32) -> Result<Option<Millis>, StoreError> {
        self.inner.clock(shard)
    }
    fn timers(&self, shard: i32) -> Result<Vec<(String, Millis)>, StoreError> {
        self.inner.timers(shard)
    }
    fn ping(&self) -> Result<(), StoreError> {
        self.check()
    }
}

impl FlakyStore {
    fn check(&self) -> Result<(), StoreError> {
        if self.down.load(Ordering::SeqCst) {
            Err(StoreError::Redis(redis::RedisError::from((
                redis::ErrorKind::IoError,
                "down for the test",
            ))))
        } else {
            Ok(())
        }
    }
}

fn processor(store: Arc<dyn Store>, sink: VecSink) -> Processor {
    let decoders = Source::ALL
        .iter()
        .map(|s| (format!("events.{s}"), Decoder::new(*s, Format::Json)))
        .collect();
    Processor::new(
        Engine::new(Arc::new(Rules::default_rules()), 16),
        Arc::new(LeadMap::default()),
        store,
        Box::new(sink),
        decoders,
        Encoder::new(Format::Json),
        Metrics::new(),
        ProcessorConfig {
            flush_interval: Duration::from_millis(100),
            flush_max_dirty: 1000,
            ack_timeout: Duration::from_secs(1),
        },
    )
}

const T0: &str = "2026-11-22T10:00:";

fn json(id: &str, lead: &str, sec: u32, kind: &str, url: &str) -> Vec<u8> {
    format!(
        r#"{{"event_id":"{id}","lead_id":"{lead}","occurred_at":"{T0}{sec:02}Z","type":"{kind}","attributes":{{"url":"{url}"}}}}"#
    )
    .into_bytes()
}

fn msg<'a>(topic: &'a str, offset: i64, payload: &'a [u8]) -> InMessage<'a> {
    InMessage {
        topic,
        partition: 0,
        offset,
        key: None,
        payload: Some(payload),
        timestamp: None,
    }
}

fn changes(sink: &VecSink) -> Vec<SegmentChangeOut> {
    sink.records
        .lock()
        .iter()
        .filter(|r| r.kind == OutputKind::SegmentChange)
        .map(|r| serde_json::from_slice(&r.payload).unwrap())
        .collect()
}

#[test]
fn scores_dead_letters_and_flushes_positions() {
    let store = Arc::new(MemoryStore::default());
    let sink = VecSink::default();
    let mut p = processor(store.clone(), sink.clone());
    let payloads = [
        json("e1", "lead-a", 1, "page_view", "/pricing"),
        b"not json".to_vec(),
        json("e2", "lead-a", 2, "booking_started", ""),
    ];
    let batch: Vec<_> = payloads
        .iter()
        .enumerate()
        .map(|(i, p)| msg("events.web", i as i64, p))
        .collect();
    p.process(&batch).unwrap();
    let c = changes(&sink);
    assert_eq!(c.len(), 1);
    assert_eq!(
        (c[0].previous_segment.as_str(), c[0].segment.as_str()),
        ("cold", "warm")
    );
    assert_eq!(c[0].trigger_event_id.as_deref(), Some("e2"));
    let dead = sink.dead.lock().clone();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].1, 1);
    assert!(dead[0].2.contains("invalid JSON"));
    let durable = p.flush().unwrap();
    assert_eq!(durable, vec![("events.web".to_owned(), 0, 3)]);
    assert!(store.load(&["lead-a"]).unwrap()[0].is_some());
}

#[test]
fn a_restarted_processor_continues_with_identical_scores() {
    let events: Vec<Vec<u8>> = (0..20)
        .map(|i| {
            let url = if i % 3 == 0 { "/pricing" } else { "/menu" };
            json(
                &format!("e{i}"),
                &format!("lead-{}", i % 4),
                i,
                "page_view",
                url,
            )
        })
        .collect();
    // One uninterrupted run.
    let sink_a = VecSink::default();
    let mut a = processor(Arc::new(MemoryStore::default()), sink_a.clone());
    let all: Vec<_> = events
        .iter()
        .enumerate()
        .map(|(i, p)| msg("events.web", i as i64, p))
        .collect();
    a.process(&all).unwrap();
    // Two runs with a restart in between, sharing one store.
    let store = Arc::new(MemoryStore::default());
    let sink_b = VecSink::default();
    let mut b1 = processor(store.clone(), sink_b.clone());
    b1.assign(&[("events.web".into(), 0)]).unwrap();
    b1.process(&all[..9]).unwrap();
    b1.flush().unwrap();
    drop(b1);
    let mut b2 = processor(store.clone(), sink_b.clone());
    let resume = b2.assign(&[("events.web".into(), 0)]).unwrap();
    assert_eq!(resume, vec![Some(9)]);
    b2.process(&all[9..]).unwrap();
    for lead in ["lead-0", "lead-1", "lead-2", "lead-3"] {
        let x = a.leads.get(lead).unwrap().state.clone();
        let y = b2.leads.get(lead).unwrap().state.clone();
        assert_eq!(x, y, "{lead}");
    }
    let ids = |s: &VecSink| {
        s.records
            .lock()
            .iter()
            .map(|r| r.payload.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(ids(&sink_a), ids(&sink_b));
}

#[test]
fn redelivered_messages_count_once() {
    let sink = VecSink::default();
    let mut p = processor(Arc::new(MemoryStore::default()), sink.clone());
    let e = json("e1", "lead-a", 1, "booking_started", "");
    p.process(&[msg("events.web", 0, &e)]).unwrap();
    // Offset 0 again is a redelivery (below the position); offset 1 is a
    // re-produced copy (same event id at a new offset).
    p.process(&[msg("events.web", 0, &e), msg("events.web", 1, &e)])
        .unwrap();
    let engine = p.engine().clone();
    let state = p.leads.get("lead-a").unwrap().state.clone();
    assert_eq!(engine.engagement_at(&state, state.as_of), 25.0);
    assert_eq!(p.metrics.messages_skipped.get(), 1);
    assert_eq!(
        p.metrics
            .duplicates_skipped
            .with_label_values(&["events.web"])
            .get(),
        1
    );
}

/// Messages polled before a revoke may reach `process` after the partition
/// was flushed and released; applying them would write state and a position
/// for a partition another member now owns.
#[test]
fn messages_from_a_released_partition_are_not_applied() {
    let store = Arc::new(MemoryStore::default());
    let mut p = processor(store.clone(), VecSink::default());
    let part = [("events.web".to_owned(), 0)];
    p.assign(&part).unwrap();
    let e1 = json("e1", "lead-a", 1, "booking_started", "");
    let e2 = json("e2", "lead-a", 2, "form_submit", "");
    p.process(&[msg("events.web", 0, &e1)]).unwrap();
    p.flush().unwrap();
    p.release(&part);

    p.process(&[msg("events.web", 1, &e2)]).unwrap();
    assert!(p.leads.get("lead-a").is_none(), "released state stays gone");
    assert_eq!(p.dirty_len(), 0);
    assert!(p.positions().is_empty());
    p.flush().unwrap();
    assert_eq!(store.positions(&part).unwrap(), vec![Some(1)]);
    assert_eq!(p.metrics.messages_skipped.get(), 1);

    // Assigned again: it resumes from the flushed position and applies
    // offset 1 exactly once, whether it arrives stale, refetched or both.
    assert_eq!(p.assign(&part).unwrap(), vec![Some(1)]);
    p.process(&[
        msg("events.web", 1, &e2),
        msg("events.web", 0, &e1),
        msg("events.web", 1, &e2),
    ])
    .unwrap();
    let engine = p.engine().clone();
    let state = p.leads.get("lead-a").unwrap().state.clone();
    let mut reference = processor(Arc::new(MemoryStore::default()), VecSink::default());
    reference
        .process(&[msg("events.web", 0, &e1), msg("events.web", 1, &e2)])
        .unwrap();
    let want = reference.leads.get("lead-a").unwrap().state.clone();
    assert_eq!(state, want);
    assert_eq!(
        engine.engagement_at(&state, state.as_of),
        engine.engagement_at(&want, want.as_of)
    );
    assert_eq!(p.positions(), vec![("events.web".to_owned(), 0, 2)]);
    assert_eq!(
        p.metrics
            .duplicates_skipped
            .with_label_values(&["events.web"])
            .get(),
        0,
        "skipped by position, not by the bounded id window"
    );
}

#[test]
fn store_failures_change_nothing_and_are_retried() {
    let store = Arc::new(FlakyStore::default());
    let sink = VecSink::default();
    let mut p = processor(store.clone(), sink.clone());
    let e1 = json("e1", "lead-a", 1, "booking_started", "");
    p.process(&[msg("events.web", 0, &e1)]).unwrap();
    store.down.store(true, Ordering::SeqCst);
    assert!(p.flush().is_err());
    // A new lead cannot be loaded: the batch fails before any change.
    let e2 = json("e2", "lead-b", 2, "booking_started", "");
    assert!(p.process(&[msg("events.web", 1, &e2)]).is_err());
    assert!(p.leads.get("lead-b").is_none());
    store.down.store(false, Ordering::SeqCst);
    p.process(&[msg("events.web", 1, &e2)]).unwrap();
    let durable = p.flush().unwrap();
    assert_eq!(durable, vec![("events.web".to_owned(), 0, 2)]);
    assert_eq!(
        store
            .inner
            .load(&["lead-a", "lead-b"])
            .unwrap()
            .iter()
            .flatten()
            .count(),
        2
    );
}

#[test]
fn decay_fires_without_traffic_for_the_lead() {
    let sink = VecSink::default();
    let mut p = processor(Arc::new(MemoryStore::default()), sink.clone());
    let hot = [
        json("h1", "hot-lead", 1, "booking_abandoned", ""),
        json("h2", "hot-lead", 2, "form_submit", ""),
        json("h3", "hot-lead", 3, "booking_started", ""),
    ];
    let batch: Vec<_> = hot
        .iter()
        .enumerate()
        .map(|(i, p)| msg("events.web", i as i64, p))
        .collect();
    p.process(&batch).unwrap();
    assert_eq!(changes(&sink).last().unwrap().segment, "hot");
    // Weeks later, another lead's event in the same shard moves the clock.
    let later = br#"{"event_id":"o1","lead_id":"other","occurred_at":"2026-12-30T00:00:00Z","type":"page_view"}"#;
    p.process(&[msg("events.web", 3, later)]).unwrap();
    let c = changes(&sink);
    let decays: Vec<_> = c.iter().filter(|c| c.reason == "decay").collect();
    assert_eq!(decays.len(), 2, "{c:?}");
    assert_eq!(
        (
            decays[0].previous_segment.as_str(),
            decays[0].segment.as_str()
        ),
        ("hot", "warm")
    );
    assert_eq!(
        (
            decays[1].previous_segment.as_str(),
            decays[1].segment.as_str()
        ),
        ("warm", "cold")
    );
    assert!(decays[0].occurred_at < decays[1].occurred_at);
    assert!(decays[1].occurred_at.as_str() < "2026-12-30");
}

#[test]
fn identify_merges_the_anonymous_history_once() {
    let store = Arc::new(MemoryStore::default());
    let sink = VecSink::default();
    let mut p = processor(store.clone(), sink.clone());
    let anon = |id: &str, sec: u32, url: &str| {
        format!(
            r#"{{"event_id":"{id}","anonymous_id":"cookie-9","occurred_at":"{T0}{sec:02}Z","type":"page_view","attributes":{{"url":"{url}"}}}}"#
        )
        .into_bytes()
    };
    let a1 = anon("a1", 1, "/pricing");
    let a2 = anon("a2", 2, "/pricing");
    p.process(&[msg("events.web", 0, &a1), msg("events.web", 1, &a2)])
        .unwrap();
    // Anonymous visitors are scored silently (30 points would be warm).
    assert!(changes(&sink).is_empty());
    p.flush().unwrap();
    assert!(store.load(&["anon:cookie-9"]).unwrap()[0].is_some());
    // A fresh processor (a restart): the visitor is loaded from the store and merged.
    let mut p = processor(store.clone(), sink.clone());
    let identify = format!(
        r#"{{"event_id":"i1","lead_id":"crm-9","anonymous_id":"cookie-9","occurred_at":"{T0}10Z","type":"identify"}}"#
    )
    .into_bytes();
    p.process(&[msg("events.web", 2, &identify)]).unwrap();
    let c = changes(&sink);
    assert_eq!(c.len(), 1);
    assert_eq!(
        (c[0].lead_id.as_str(), c[0].segment.as_str()),
        ("crm-9", "warm")
    );
    assert!(p.leads.get("anon:cookie-9").is_none());
    // A second identify for the same visitor merges nothing more.
    let identify2 = format!(
        r#"{{"event_id":"i2","lead_id":"crm-9","anonymous_id":"cookie-9","occurred_at":"{T0}11Z","type":"identify"}}"#
    )
    .into_bytes();
    p.process(&[msg("events.web", 3, &identify2)]).unwrap();
    let state = p.leads.get("crm-9").unwrap().state.clone();
    let e = p.engine().engagement_at(&state, state.as_of);
    assert!((e - 30.0).abs() < 0.01, "{e}");
    p.flush().unwrap();
    assert!(
        store.load(&["anon:cookie-9"]).unwrap()[0].is_none(),
        "merged visitor deleted"
    );
}
