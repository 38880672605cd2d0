//! Hot-path benchmarks with fixed fixtures: decoding, scoring, and the whole
//! processor batch (decode → engine → encode outputs) with in-memory doubles.
//!
//! `cargo bench --bench engine`

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use leadscore::decode::{DecodeError, Decoder, Format, encode_avro, input_schema};
use leadscore::engine::{Engine, Rules};
use leadscore::event::{Event, Source};
use leadscore::metrics::Metrics;
use leadscore::output::{Encoder, Record};
use leadscore::pipeline::{
    Barrier, InMessage, LeadMap, Processor, ProcessorConfig, Sink, SinkError,
};
use leadscore::store::MemoryStore;
use leadscore::synth::{Synth, SynthEvent};

/// The allocator the `leadscore` binary uses, so the figures are the shipped ones.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const EVENTS: usize = 100_000;
const LEADS: usize = 10_000;

fn fixture() -> Vec<SynthEvent> {
    let mut s = Synth::new(LEADS, 7, 1_764_000_000_000, 1000);
    (0..EVENTS).map(|_| s.next_event()).collect()
}

fn decoders() -> HashMap<Source, Decoder> {
    Source::ALL
        .iter()
        .map(|s| (*s, Decoder::new(*s, Format::Json)))
        .collect()
}

fn bench_decode(c: &mut Criterion) {
    let events = fixture();
    let d = decoders();
    let mut g = c.benchmark_group("decode");
    g.throughput(Throughput::Elements(events.len() as u64));
    g.bench_function("json", |b| {
        b.iter(|| {
            for e in &events {
                black_box(d[&e.source].decode(Some(e.payload.as_bytes())).unwrap());
            }
        })
    });
    let avro: Vec<(Source, Vec<u8>)> = events
        .iter()
        .map(|e| {
            let ev = d[&e.source].decode(Some(e.payload.as_bytes())).unwrap();
            (e.source, encode_avro(&input_schema(e.source), &ev).unwrap())
        })
        .collect();
    let ad: HashMap<Source, Decoder> = Source::ALL
        .iter()
        .map(|s| (*s, Decoder::new(*s, Format::Avro)))
        .collect();
    g.bench_function("avro", |b| {
        b.iter(|| {
            for (s, bytes) in &avro {
                black_box(ad[s].decode(Some(bytes)).unwrap());
            }
        })
    });
    g.finish();
}

fn bench_engine(c: &mut Criterion) {
    let events = fixture();
    let d = decoders();
    let decoded: Vec<Event<'static>> = events
        .iter()
        .map(|e| {
            d[&e.source]
                .decode(Some(e.payload.as_bytes()))
                .unwrap()
                .into_owned()
        })
        .collect();
    let engine = Engine::new(Arc::new(Rules::default_rules()), 16);
    let mut g = c.benchmark_group("engine");
    g.throughput(Throughput::Elements(decoded.len() as u64));
    g.bench_function("apply", |b| {
        b.iter_batched(
            || HashMap::<String, leadscore::engine::LeadState>::with_capacity(LEADS),
            |mut states| {
                let mut out = Vec::new();
                for e in &decoded {
                    let s = states
                        .entry(leadscore::pipeline::subject_key(e).into_owned())
                        .or_insert_with(|| engine.new_state());
                    out.clear();
                    engine.apply(s, e, &mut out);
                    black_box(engine.next_transition(s));
                }
                states
            },
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

struct NullSink;

impl Sink for NullSink {
    fn send(&mut self, record: &Record) -> Result<(), SinkError> {
        black_box(record);
        Ok(())
    }
    fn dead_letter(&mut self, _: &InMessage<'_>, _: &DecodeError) -> Result<(), SinkError> {
        Ok(())
    }
    fn barrier(&mut self) -> Barrier {
        Barrier::ready()
    }
}

fn bench_processor(c: &mut Criterion) {
    let events = fixture();
    let topics: HashMap<Source, String> = Source::ALL
        .iter()
        .map(|s| (*s, format!("events.{s}")))
        .collect();
    let mut g = c.benchmark_group("processor");
    g.throughput(Throughput::Elements(events.len() as u64));
    g.sample_size(10);
    g.bench_function("batch_8192_memory_store", |b| {
        b.iter_batched(
            || {
                Processor::new(
                    Engine::new(Arc::new(Rules::default_rules()), 16),
                    Arc::new(LeadMap::default()),
                    Arc::new(MemoryStore::default()),
                    Box::new(NullSink),
                    Source::ALL
                        .iter()
                        .map(|s| (topics[s].clone(), Decoder::new(*s, Format::Json)))
                        .collect(),
                    Encoder::new(Format::Json),
                    Metrics::new(),
                    ProcessorConfig {
                        flush_interval: Duration::from_millis(200),
                        flush_max_dirty: 50_000,
                        ack_timeout: Duration::from_secs(1),
                    },
                )
            },
            |mut p| {
                let msgs: Vec<InMessage<'_>> = events
                    .iter()
                    .enumerate()
                    .map(|(i, e)| InMessage {
                        topic: &topics[&e.source],
                        partition: (e.key.bytes().map(u32::from).sum::<u32>() % 4) as i32,
                        offset: i as i64,
                        key: Some(e.key.as_bytes()),
                        payload: Some(e.payload.as_bytes()),
                        timestamp: None,
                    })
                    .collect();
                for chunk in msgs.chunks(8192) {
                    p.process(chunk).unwrap();
                }
                p.flush().unwrap();
                p
            },
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

criterion_group!(benches, bench_decode, bench_engine, bench_processor);
criterion_main!(benches);
