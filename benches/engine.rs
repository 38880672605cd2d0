//! Hot-path benchmarks on the synthetic stream (the brief's personas,
//! anonymous visitors who identify, all four sources):
//!
//! - `decode`: JSON and Avro payloads to validated events;
//! - `engine`: the scoring engine alone, on one thread: events decoded up
//!   front and each lead's state held unpacked, so what is timed is what
//!   the engine does per event (apply it, and say when time alone will next
//!   change the lead);
//! - `shard`: one shard doing everything the service does per event except
//!   Kafka and Redis I/O: decode, event-time merge, lead cache, engine,
//!   timers, output encoding, and a state write (to the in-memory store)
//!   every 10,000 events;
//! - `state`: a lead's stored form, unpacked into a reused state and packed
//!   again (what the shard does on every event), over the states the
//!   engine builds from the first half of the stream;
//! - `ids`: the deterministic UUID v5 of a segment change (`change_id`),
//!   beside the same id made the way it was before (joined name, then
//!   `Uuid::new_v5`) in the same run;
//! - `shards`: 1, 2, 4 and 8 threads, each driving its own shard as the
//!   service's workers do (shared: the engine and rules, read-only). Total
//!   events per second across threads; flat past the machine's core count.
//!
//! `cargo bench --bench engine`

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use leadscore::decode::{Contract, Decoder, Format, encode_avro, input_schema};
use leadscore::engine::{
    Engine, EngineConfig, Kind, LeadState, Reason, Rules, Scores, Segment, SegmentChange,
};
use leadscore::event::Event;
use leadscore::event::Source;
use leadscore::output::{Encoder, change_id};
use leadscore::shard::{Ctx, InMessage, Shard, ShardConfig, StepStats};
use leadscore::sink::{Barrier, DeadLetter, Sink, SinkError};
use leadscore::store::Store;
use leadscore::store::memory::MemoryStore;

// Its unit tests compile here without the test harness that runs them,
// which leaves their imports unused.
#[allow(dead_code, unused_imports)]
#[path = "../src/tools/synth.rs"]
mod synth;

/// The allocator the `leadscore` binary uses, so the figures are the shipped ones.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const EVENTS: usize = 200_000;
const LEADS: usize = 20_000;

struct Fixture {
    /// (input, key, payload).
    events: Vec<(usize, String, Vec<u8>)>,
}

fn fixture(seed: u64) -> Fixture {
    let mut s = synth::Synth::new(LEADS, seed, 1_764_000_000_000, 1000);
    let events = (0..EVENTS)
        .map(|_| {
            let e = s.next_event();
            let input = Source::ALL.iter().position(|x| *x == e.source).unwrap();
            (input, e.key, e.payload.into_bytes())
        })
        .collect();
    Fixture { events }
}

fn engine() -> Engine {
    Engine::new(Arc::new(Rules::default_rules()), EngineConfig::default())
}

fn decoders(engine: &Engine, format: Format) -> Vec<Decoder> {
    let contract = Contract {
        channels: engine.rules().channels.clone().into(),
        future_tolerance_ms: i64::MAX / 4,
    };
    Source::ALL
        .iter()
        .map(|s| Decoder::new(*s, format, contract.clone()))
        .collect()
}

/// Outputs counted and dropped: the benchmark measures leadscore, not a producer.
#[derive(Default)]
struct NullSink {
    records: u64,
}

impl Sink for NullSink {
    fn send(&mut self, record: &leadscore::output::Record) -> Result<(), SinkError> {
        black_box(record);
        self.records += 1;
        Ok(())
    }

    fn dead_letter(&mut self, letter: &DeadLetter<'_>) -> Result<(), SinkError> {
        black_box(letter);
        Ok(())
    }

    fn barrier(&mut self) -> Barrier {
        Barrier::ready()
    }
}

/// Runs the whole fixture through a fresh shard; returns the outputs made.
fn run_shard(engine: &Engine, decoders: &[Decoder], fixture: &Fixture) -> u64 {
    let store = MemoryStore::default();
    let meta = store.take_shard(0).unwrap();
    let topics: Arc<[Arc<str>]> = ["web", "adpixel", "email", "crm"]
        .iter()
        .map(|t| Arc::from(*t))
        .collect();
    let mut shard = Shard::new(0, &meta, topics, Source::ALL.into(), ShardConfig::default());
    let encoder = Encoder::new(Format::Json);
    let mut sink = NullSink::default();
    let mut stats = StepStats::default();
    let mut offsets = [0i64; 4];
    for chunk in fixture.events.chunks(10_000) {
        for (input, key, payload) in chunk {
            let msg = InMessage {
                input: *input,
                offset: offsets[*input],
                key: Some(key.as_bytes()),
                payload: Some(payload),
                timestamp: None,
            };
            offsets[*input] += 1;
            let decoded = decoders[*input].decode(msg.payload, None);
            shard.push(&msg, decoded, &mut stats);
        }
        let mut ctx = Ctx {
            engine,
            store: &store,
            sink: &mut sink,
            encoder: &encoder,
            stats: &mut stats,
        };
        while shard.step(&mut ctx, 1 << 16).unwrap() > 0 {}
        let (write, pending) = shard.prepare_write();
        let ok = store.write(std::slice::from_ref(&write)).is_ok();
        shard.write_done(pending, ok);
        shard.recycle(write);
        stats = StepStats::default();
    }
    for i in 0..4 {
        shard.set_idle(i, true);
    }
    let mut ctx = Ctx {
        engine,
        store: &store,
        sink: &mut sink,
        encoder: &encoder,
        stats: &mut stats,
    };
    while shard.step(&mut ctx, 1 << 16).unwrap() > 0 {}
    sink.records
}

fn bench_decode(c: &mut Criterion) {
    let engine = engine();
    let fixture = fixture(7);
    let json = decoders(&engine, Format::Json);
    let mut g = c.benchmark_group("decode");
    g.throughput(Throughput::Elements(fixture.events.len() as u64));
    g.bench_function("json", |b| {
        b.iter(|| {
            for (input, _, payload) in &fixture.events {
                let _ = black_box(json[*input].decode(Some(payload), None));
            }
        })
    });
    let schemas: Vec<_> = Source::ALL.iter().map(|s| input_schema(*s)).collect();
    let avro: Vec<(usize, Vec<u8>)> = fixture
        .events
        .iter()
        .filter_map(|(input, _, payload)| {
            let event = json[*input].decode(Some(payload), None).ok()?;
            Some((*input, encode_avro(&schemas[*input], &event).ok()?))
        })
        .collect();
    let avro_decoders = decoders(&engine, Format::Avro);
    g.throughput(Throughput::Elements(avro.len() as u64));
    g.bench_function("avro", |b| {
        b.iter(|| {
            for (input, payload) in &avro {
                let _ = black_box(avro_decoders[*input].decode(Some(payload), None));
            }
        })
    });
    g.finish();
}

/// Whose state an event applies to: its lead's, or its visitor's when anonymous.
fn owner(e: &Event<'_>) -> (String, Kind) {
    match (e.lead_id.as_deref(), e.anonymous_id.as_deref()) {
        (Some(l), _) => (format!("l:{l}"), Kind::Lead),
        (None, Some(a)) => (format!("a:{a}"), Kind::Visitor),
        (None, None) => unreachable!("decoded events have an identity"),
    }
}

fn bench_engine(c: &mut Criterion) {
    let engine = engine();
    let fixture = fixture(7);
    let decoders = decoders(&engine, Format::Json);
    let events: Vec<Event<'static>> = fixture
        .events
        .iter()
        .filter_map(|(input, _, payload)| decoders[*input].decode(Some(payload), None).ok())
        .map(Event::into_owned)
        .collect();
    // Each event's state: its lead's, or its visitor's when anonymous.
    let mut ids = std::collections::HashMap::new();
    let mut kinds = Vec::new();
    let owners: Vec<usize> = events
        .iter()
        .map(|e| {
            let (id, kind) = owner(e);
            *ids.entry(id).or_insert_with(|| {
                kinds.push(kind);
                kinds.len() - 1
            })
        })
        .collect();
    let mut g = c.benchmark_group("engine");
    g.throughput(Throughput::Elements(events.len() as u64));
    // Fresh states for every pass, made and dropped outside the timing:
    // a fresh vector of 20,000 states is megabytes the kernel zeroes on
    // first touch, which is the bench's cost, not the engine's.
    g.bench_function("apply", |b| {
        b.iter_batched_ref(
            || {
                kinds
                    .iter()
                    .cloned()
                    .map(LeadState::new)
                    .collect::<Vec<_>>()
            },
            |states| {
                let mut decisions = Vec::new();
                let mut published = 0;
                for (e, n) in events.iter().zip(&owners) {
                    decisions.clear();
                    black_box(engine.apply(&mut states[*n], e, &mut decisions));
                    black_box(engine.next_transition(&states[*n]));
                    published += decisions.len();
                }
                published
            },
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

fn bench_state(c: &mut Criterion) {
    let engine = engine();
    let fixture = fixture(7);
    let decoders = decoders(&engine, Format::Json);
    // States mid-life: each lead's after the first half of the stream.
    let mut states = std::collections::BTreeMap::<String, LeadState>::new();
    let mut decisions = Vec::new();
    for (input, _, payload) in &fixture.events[..EVENTS / 2] {
        let Ok(e) = decoders[*input].decode(Some(payload), None) else {
            continue;
        };
        let (id, kind) = owner(&e);
        let state = states.entry(id).or_insert_with(|| LeadState::new(kind));
        decisions.clear();
        engine.apply(state, &e, &mut decisions);
    }
    let states: Vec<LeadState> = states.into_values().collect();
    let stored: Vec<Vec<u8>> = states
        .iter()
        .map(|s| {
            let mut out = Vec::new();
            engine.encode(s, &mut out);
            out
        })
        .collect();
    let mut g = c.benchmark_group("state");
    g.throughput(Throughput::Elements(states.len() as u64));
    g.bench_function("decode", |b| {
        let mut into = LeadState::new(Kind::Lead);
        b.iter(|| {
            for bytes in &stored {
                black_box(engine.decode_into(bytes, &mut into).unwrap());
            }
        })
    });
    g.bench_function("encode", |b| {
        let mut out = Vec::new();
        b.iter(|| {
            for s in &states {
                engine.encode(s, &mut out);
                black_box(&out);
            }
        })
    });
    g.finish();
}

fn bench_shard(c: &mut Criterion) {
    let engine = engine();
    let fixture = fixture(7);
    let decoders = decoders(&engine, Format::Json);
    let mut g = c.benchmark_group("shard");
    g.throughput(Throughput::Elements(fixture.events.len() as u64));
    g.sample_size(10);
    g.bench_function("events", |b| {
        b.iter(|| black_box(run_shard(&engine, &decoders, &fixture)))
    });
    g.finish();
}

fn bench_shards(c: &mut Criterion) {
    let engine = Arc::new(engine());
    let fixtures: Vec<Arc<Fixture>> = (0..8).map(|i| Arc::new(fixture(100 + i))).collect();
    let mut g = c.benchmark_group("shards");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(20));
    for threads in [1usize, 2, 4, 8] {
        g.throughput(Throughput::Elements((threads * EVENTS) as u64));
        g.bench_function(format!("threads_{threads}"), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let start = Instant::now();
                    std::thread::scope(|scope| {
                        for fixture in fixtures.iter().take(threads) {
                            let engine = Arc::clone(&engine);
                            scope.spawn(move || {
                                let decoders = decoders(&engine, Format::Json);
                                black_box(run_shard(&engine, &decoders, fixture))
                            });
                        }
                    });
                    total += start.elapsed();
                }
                total
            })
        });
    }
    g.finish();
}

fn bench_ids(c: &mut Criterion) {
    let rules = Rules::default_rules();
    let namespace = uuid::Uuid::from_u128(0x6c65_6164_7363_6f72_6500_0000_0000_0001);
    let changes: Vec<(String, SegmentChange)> = (0..1_000)
        .map(|i| {
            let change = SegmentChange {
                from: Segment::Tier(0),
                to: Segment::Tier(1),
                scores: Scores {
                    total: 30.0,
                    engagement: 30.0,
                    fit: 0.0,
                    grade: None,
                },
                reason: Reason::Event,
                trigger: Some(format!("{:08x}-7d1c-4f7e-9a61-{i:012}", i * 7919)),
                at: 1_764_000_000_000,
                opted_out: Vec::new(),
            };
            (format!("crm-{i:06}"), change)
        })
        .collect();
    let joined = |lead: &str, change: &SegmentChange| {
        let trigger = change.trigger.as_deref().unwrap_or_default();
        let name = [
            "change",
            "v1",
            lead,
            &format!("event:{trigger}"),
            change.to.name(&rules),
        ]
        .join("\x1f");
        uuid::Uuid::new_v5(&namespace, name.as_bytes())
    };
    // Both sides make the same ids, so they do the same work.
    let (lead, change) = &changes[0];
    assert_eq!(change_id("v1", lead, change, &rules), joined(lead, change));
    let mut g = c.benchmark_group("ids");
    g.throughput(Throughput::Elements(changes.len() as u64));
    g.bench_function("change_id", |b| {
        b.iter(|| {
            for (lead, change) in &changes {
                black_box(change_id("v1", lead, change, &rules));
            }
        })
    });
    g.bench_function("joined_new_v5", |b| {
        b.iter(|| {
            for (lead, change) in &changes {
                black_box(joined(lead, change));
            }
        })
    });
    g.finish();
}

// In a module of its own: the function the macro makes cannot carry a doc
// comment, and the crate's lints ask one of every public item.
mod group {
    use super::*;

    criterion_group!(
        benches,
        bench_decode,
        bench_engine,
        bench_ids,
        bench_state,
        bench_shard,
        bench_shards
    );
}
criterion_main!(group::benches);
