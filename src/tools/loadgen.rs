//! `leadscore loadgen`: drives a running service through the broker.
//!
//! * `--mode prefill` produces `--events` synthetic events to the input topics
//!   (creating them if needed) as fast as the broker takes them;
//! * `--mode prefill-state` writes `--leads` lead states (one event each,
//!   with their decay timers and segment counts) straight into the Redis the
//!   `LEADSCORE__` environment names, spread over `--partitions` shards, with
//!   every input's position at 0 (or where it was): a large state to restart over;
//! * `--mode drain` watches the service's `/metrics` until it has consumed
//!   `--events` more events and reports the sustained rate (start the service
//!   after a prefill to measure end-to-end throughput from a backlog);
//! * `--mode latency` produces at `--rate` with event time = wall time and
//!   consumes the segment-change topic, reporting produce → change-consumed
//!   latency percentiles. With `--broker mock` it brings its own broker
//!   (librdkafka's in-process mock cluster) and runs the service in the same
//!   process against it, with state in the Redis the `LEADSCORE__`
//!   environment names: the figures are then leadscore's, not a test broker's.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

use rdkafka::mocking::MockCluster;
use tokio_util::sync::CancellationToken;

use leadscore::engine::identity::{self, Route};
use leadscore::engine::{Engine, Kind, Segment};
use leadscore::event::{parse_rfc3339, wall_clock_ms};
use leadscore::metrics::sum_samples;
use leadscore::output::SegmentChangeOut;
use leadscore::settings::{Loaded, Settings, TopicSettings};
use leadscore::shard::cache::LeadKey;
use leadscore::store::redis::RedisStore;
use leadscore::store::{ShardWrite, Store as _, TimerWrite, Written};

use super::synth::Synth;

/// Load generator options.
#[derive(Debug, clap::Args)]
pub struct LoadgenArgs {
    /// What to do.
    #[arg(long, value_enum)]
    pub mode: Mode,
    /// Broker bootstrap list.
    #[arg(long, default_value = "127.0.0.1:9092")]
    pub brokers: String,
    /// Events to produce (prefill) or to wait for (drain).
    #[arg(long, default_value_t = 1_000_000)]
    pub events: u64,
    /// Distinct leads.
    #[arg(long, default_value_t = 100_000)]
    pub leads: usize,
    /// Partitions per topic when creating topics.
    #[arg(long, default_value_t = 4)]
    pub partitions: i32,
    /// Events per second (latency mode).
    #[arg(long, default_value_t = 20_000)]
    pub rate: u64,
    /// How long to measure (latency mode), after the warm-up.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Latency mode: how long to produce at `--rate` before measuring (group
    /// join, first loads, connection set-up are not what is measured).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub warmup: Duration,
    /// Latency mode: `external` measures the service and broker at
    /// `--brokers`; `mock` starts librdkafka's in-process mock cluster and the
    /// service in this process (settings from the `LEADSCORE__` environment,
    /// e.g. `LEADSCORE__REDIS__URL`; brokers and group are its own).
    #[arg(long, value_enum, default_value = "external")]
    pub broker: Broker,
    /// Latency mode: the load generator's producer `linger.ms` (how long an
    /// event may wait to be batched before it is sent; part of the figure).
    #[arg(long, default_value_t = 5)]
    pub linger_ms: u32,
    /// The service's metrics URL (drain mode), http://host:port/path; the
    /// members of one group as a comma-separated list (their counts are summed).
    #[arg(long, default_value = "http://127.0.0.1:8080/metrics")]
    pub metrics_url: String,
    /// Random seed of the synthetic stream.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// Load generator modes.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Mode {
    /// Produce a backlog.
    Prefill,
    /// Write lead states into Redis as the service would have left them.
    PrefillState,
    /// Measure how fast the service consumes it.
    Drain,
    /// Measure end-to-end latency at a fixed rate.
    Latency,
    /// Read `--events` input events with a consumer that does nothing else:
    /// the ceiling the service is compared with.
    Read,
}

/// Where the latency mode's broker is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Broker {
    /// The broker at `--brokers`, with the service already running on it.
    External,
    /// librdkafka's in-process mock cluster, with the service in this process.
    Mock,
}

/// Runs the load generator.
pub async fn run(args: LoadgenArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.leads >= 1, "--leads must be at least 1");
    anyhow::ensure!(args.partitions >= 1, "--partitions must be at least 1");
    anyhow::ensure!(args.rate >= 1, "--rate must be at least 1 event/s");
    // The settings `leadscore run` would take (defaults, then `LEADSCORE__`
    // variables), read once: the topics (with the defaults alone a renamed
    // topic was prefilled under the default name), the store, the consumer
    // properties and the rules.
    let loaded = Settings::load(None, std::env::vars())?;
    let topics = loaded.settings.kafka.topics.clone();
    match args.mode {
        Mode::Prefill => {
            let mut all: Vec<&str> = topics.inputs().iter().map(|(_, t)| *t).collect();
            all.extend(topics.outputs());
            leadscore::kafka::create_topics(&args.brokers, &all, args.partitions).await?;
            tokio::task::spawn_blocking(move || prefill(&args, &topics)).await?
        }
        Mode::PrefillState => {
            tokio::task::spawn_blocking(move || prefill_state(&args, loaded)).await?
        }
        Mode::Drain => drain(&args).await,
        Mode::Read => tokio::task::spawn_blocking(move || read(&args, &loaded.settings)).await?,
        Mode::Latency if args.broker == Broker::Mock => latency_on_mock(args, loaded).await,
        Mode::Latency => tokio::task::spawn_blocking(move || latency(&args, &topics)).await?,
    }
}

/// The service's `fetch.wait.max.ms` with the mock broker.
const FETCH_WAIT_MS: &str = "5";

/// The latency mode's own consumer's `fetch.wait.max.ms`. It reads only the
/// segment-change topic; a mock broker with nothing new for it waits out the
/// whole wait, which would be the harness's time, not leadscore's.
const MEASURE_FETCH_WAIT_MS: &str = "1";

/// How long the latency mode goes on producing after its window (changes of
/// the window's last events come back within it; the idle timeout is 1 s).
const TAIL: Duration = Duration::from_secs(3);

/// The latency mode with its own broker: librdkafka's mock cluster in this
/// process (unlike tansu's, its fetches do not slow as topics grow), the topics
/// created on it, and the service run in this process against it.
async fn latency_on_mock(mut args: LoadgenArgs, mut loaded: Loaded) -> anyhow::Result<()> {
    let topics = loaded.settings.kafka.topics.clone();
    let cluster = MockCluster::new(1).context("starting the in-process broker")?;
    for t in topics
        .inputs()
        .iter()
        .map(|(_, t)| *t)
        .chain(topics.outputs())
    {
        cluster.create_topic(t, args.partitions, 1)?;
    }
    // The mock broker answers a fetch that finds no data only after the
    // whole fetch.wait.max.ms, even if data arrives meanwhile (a real broker
    // answers at once; see rdkafka_mock_handlers.c), so librdkafka's 500 ms
    // default would stand in the figures. 1 ms floods the mock's one thread
    // with fetches at 20,000 events/s; 5 ms does not.
    loaded
        .settings
        .kafka
        .consumer
        .insert("fetch.wait.max.ms".into(), FETCH_WAIT_MS.into());
    loaded.settings.kafka.brokers = cluster.bootstrap_servers();
    loaded.settings.kafka.group_id = format!("leadscore-latency-{}", wall_clock_ms());
    let cancel = CancellationToken::new();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let service = tokio::spawn(leadscore::service::run(loaded, cancel.clone(), move |r| {
        let _ = tx.send(r);
    }));
    if rx.await.is_err() {
        service.await??;
        anyhow::bail!("the service stopped before it was ready");
    }
    args.brokers = cluster.bootstrap_servers();
    let measured = tokio::task::spawn_blocking(move || latency(&args, &topics)).await?;
    cancel.cancel();
    service.await??;
    measured
}

fn producer(
    brokers: &str,
    linger_ms: u32,
) -> anyhow::Result<ThreadedProducer<DefaultProducerContext>> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", linger_ms.to_string())
        .set("batch.size", "1000000")
        .set("queue.buffering.max.messages", "1000000")
        .create()?)
}

fn topic_of(topics: &TopicSettings, source: leadscore::event::Source) -> String {
    topics
        .inputs()
        .iter()
        .find(|(s, _)| *s == source)
        .map(|(_, t)| (*t).to_owned())
        .unwrap_or_default()
}

fn send(p: &ThreadedProducer<DefaultProducerContext>, topic: &str, key: &str, payload: &str) {
    let mut record = BaseRecord::to(topic).key(key).payload(payload);
    loop {
        match p.send(record) {
            Ok(()) => return,
            Err((_, back)) => {
                record = back;
                std::thread::sleep(Duration::from_micros(200));
            }
        }
    }
}

fn prefill(args: &LoadgenArgs, topics: &TopicSettings) -> anyhow::Result<()> {
    let p = producer(&args.brokers, 20)?;
    let mut synth = Synth::new(
        args.leads,
        args.seed,
        leadscore::event::wall_clock_ms() - 30 * 86_400_000,
        50,
    );
    let started = Instant::now();
    let mut bytes = 0u64;
    for _ in 0..args.events {
        let e = synth.next_event();
        bytes += e.payload.len() as u64;
        send(&p, &topic_of(topics, e.source), &e.key, &e.payload);
    }
    p.flush(Duration::from_secs(60))?;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "prefill: {} events ({} leads, mean payload {} bytes) in {:.2} s = {:.0} events/s",
        args.events,
        args.leads,
        bytes / args.events.max(1),
        secs,
        args.events as f64 / secs
    );
    Ok(())
}

/// Writes `--leads` leads' states into the store: each lead's first
/// synthetic event applied by the engine, stored with its decay timer, the
/// shard's segment counts, clock and positions (0 on every input unless
/// already stored; every write carries them, unchanged), through
/// the store's own fenced writes. Event times spread over the last 30 days.
fn prefill_state(args: &LoadgenArgs, loaded: Loaded) -> anyhow::Result<()> {
    const BATCH: usize = 2_000;
    let Loaded { settings, rules } = loaded;
    let store = RedisStore::connect(&settings.redis)?;
    let engine = Engine::new(rules, leadscore::service::engine_config(&settings));
    store.register_layout(engine.layout())?;
    let decoders = leadscore::service::decoders(&settings, &engine, None);
    let (inputs, sources) = leadscore::service::inputs(&settings);
    let shards = args.partitions.max(1);
    let mut writes = (0..shards)
        .map(|shard| {
            let meta = store.take_shard(shard)?;
            // Positions never move backwards: keep any already stored.
            let positions = inputs
                .iter()
                .map(|t| {
                    (
                        t.to_string(),
                        meta.positions.get(&**t).copied().unwrap_or(0),
                    )
                })
                .collect();
            Ok(ShardWrite {
                shard,
                epoch: meta.epoch,
                seq: meta.seq,
                positions,
                ..ShardWrite::default()
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut population: Vec<HashMap<String, i64>> = vec![HashMap::new(); shards as usize];
    let now = wall_clock_ms();
    let span = 30 * 86_400_000;
    let step = (span / args.leads.max(1) as i64).max(1);
    let mut synth = Synth::new(args.leads, args.seed, now - span, step);
    let (mut buf, mut decisions) = (Vec::new(), Vec::new());
    let flush = |w: &mut ShardWrite| -> anyhow::Result<()> {
        match store.write(std::slice::from_ref(w))?.as_slice() {
            [Written::Ok] => {
                w.seq += 1;
                w.leads.clear();
                w.states.clear();
                Ok(())
            }
            other => anyhow::bail!("shard {} refused the write: {other:?}", w.shard),
        }
    };
    let started = Instant::now();
    for i in 0..args.leads {
        let e = synth.event_of(i);
        let input = sources
            .iter()
            .position(|s| *s == e.source)
            .context("no input topic for a synthetic event")?;
        let event = decoders[input].decode(Some(e.payload.as_bytes()), None)?;
        // A lead's first event: no visitor is stored yet.
        let (key, kind) = match identity::route(&event, None) {
            Route::Lead { id, .. } => (LeadKey::lead(id), Kind::Lead),
            Route::Visitor { anon } => (LeadKey::visitor(anon), Kind::Visitor),
            Route::Aliased { .. } => anyhow::bail!("an alias without a stored visitor"),
        };
        let mut state = engine.new_state(kind.clone());
        decisions.clear();
        engine.apply(&mut state, &event, &mut decisions);
        let w = &mut writes[i % shards as usize];
        if kind == Kind::Lead {
            *population[w.shard as usize]
                .entry(Segment::of(&state).name(engine.rules()).to_owned())
                .or_default() += 1;
        }
        buf.clear();
        engine.encode(&state, &mut buf);
        let timer = engine
            .next_transition(&state)
            .map_or(TimerWrite::Clear, TimerWrite::Set);
        w.push_lead(key, &buf, timer);
        w.clock = Some(event.occurred_at);
        if w.leads.len() >= BATCH {
            flush(w)?;
        }
    }
    for w in &mut writes {
        w.seen = w
            .clock
            .map(|c| inputs.iter().map(|t| (t.to_string(), c)).collect())
            .unwrap_or_default();
        w.released = w.clock;
        w.population = population[w.shard as usize].drain().collect();
        flush(w)?;
    }
    println!(
        "prefill-state: {} leads over {shards} shards written in {:.1} s",
        args.leads,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

async fn scrape(url: &str) -> anyhow::Result<Scrape> {
    let rest = url
        .strip_prefix("http://")
        .context("--metrics-url must start with http://")?;
    let (host, path) = rest.split_once('/').map_or((rest, "/"), |(h, p)| (h, p));
    let mut stream = tokio::net::TcpStream::connect(host).await?;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream
        .write_all(
            format!("GET /{path} HTTP/1.0\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
    let mut body = String::new();
    stream.read_to_string(&mut body).await?;
    Ok(Scrape {
        handled: sum_samples(&body, "leadscore_events_consumed_total")
            + sum_samples(&body, "leadscore_dead_lettered_total")
            + sum_samples(&body, "leadscore_duplicates_skipped_total"),
        unwritten: sum_samples(&body, "leadscore_dirty_leads")
            + sum_samples(&body, "leadscore_merge_buffered_events"),
    })
}

/// What the service reports: events handled, and work not yet durable.
struct Scrape {
    handled: u64,
    unwritten: u64,
}

/// Every instance's scrape, summed (`--metrics-url` may list several,
/// comma-separated: the members of one group).
async fn scrape_all(urls: &str) -> anyhow::Result<Scrape> {
    let mut sum = Scrape {
        handled: 0,
        unwritten: 0,
    };
    for url in urls.split(',').map(str::trim).filter(|u| !u.is_empty()) {
        let one = scrape(url).await?;
        sum.handled += one.handled;
        sum.unwritten += one.unwritten;
    }
    Ok(sum)
}

async fn drain(args: &LoadgenArgs) -> anyhow::Result<()> {
    // Counts are the service's own since it started: start it just before this.
    let wait = Instant::now() + Duration::from_secs(15);
    while let Err(error) = scrape_all(&args.metrics_url).await {
        if Instant::now() > wait {
            return Err(error).context("scraping the service");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let target = args.events;
    let mut progress = Progress::new(target);
    let mut first: Option<(Instant, u64)> = None;
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let Scrape { handled, unwritten } = scrape_all(&args.metrics_url).await?;
        let now = Instant::now();
        if first.is_none() && handled > 0 {
            first = Some((now, handled));
        }
        progress.saw(now, handled);
        // Done when every event is handled and its state and outputs written.
        if handled >= target && unwritten == 0 {
            let (t0, n0) = first.unwrap_or((now, 0));
            let secs = now.duration_since(t0).as_secs_f64().max(1e-3);
            println!(
                "drain: {handled} events, {} of them in {secs:.2} s = {:.0} events/s end to end (consume, score, produce, Redis, commit)",
                handled - n0,
                (handled - n0) as f64 / secs
            );
            println!("{}", progress.report("drain"));
            return Ok(());
        }
        if now > deadline {
            anyhow::bail!("the service handled {handled} of {target} events in 5 minutes");
        }
        // 25 ms: every scrape renders the service's whole /metrics page.
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The sustained rate of a run over a known number of events: from the
/// moment 10 % of them were handled to the moment 90 % were. It leaves out
/// the start (group join, connections, a cold cache) and the end of a
/// finite backlog, where the last events of a shard wait for its sparser
/// inputs to go idle (`event_time.idle_timeout_ms`): a latency, not a rate.
struct Progress {
    target: u64,
    from: Option<(Instant, u64)>,
    to: Option<(Instant, u64)>,
}

impl Progress {
    fn new(target: u64) -> Self {
        Progress {
            target,
            from: None,
            to: None,
        }
    }

    fn saw(&mut self, at: Instant, handled: u64) {
        if self.from.is_none() && handled * 10 >= self.target {
            self.from = Some((at, handled));
        }
        if self.to.is_none() && handled * 10 >= self.target * 9 {
            self.to = Some((at, handled));
        }
    }

    fn rate(&self) -> Option<f64> {
        let ((t0, n0), (t1, n1)) = (self.from?, self.to?);
        let secs = t1.duration_since(t0).as_secs_f64();
        (secs > 0.0).then(|| (n1 - n0) as f64 / secs)
    }

    fn report(&self, what: &str) -> String {
        match self.rate() {
            Some(r) => {
                format!("{what} sustained: {r:.0} events/s (from 10 % to 90 % of the events)")
            }
            None => format!("{what} sustained: too few samples to tell"),
        }
    }
}

fn latency(args: &LoadgenArgs, topics: &TopicSettings) -> anyhow::Result<()> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &args.brokers)
        .set("group.id", format!("leadscore-loadgen-{}", wall_clock_ms()))
        .set("fetch.wait.max.ms", MEASURE_FETCH_WAIT_MS)
        .set("enable.auto.commit", "false")
        .create()?;
    let meta = consumer.fetch_metadata(Some(&topics.segment_changes), Duration::from_secs(10))?;
    let mut tpl = TopicPartitionList::new();
    for t in meta.topics() {
        for p in t.partitions() {
            tpl.add_partition_offset(&topics.segment_changes, p.id(), Offset::End)?;
        }
    }
    consumer.assign(&tpl)?;
    let p = producer(&args.brokers, args.linger_ms)?;
    let mut synth = Synth::new(args.leads, args.seed, wall_clock_ms(), 0);
    let started = Instant::now();
    // Only changes caused by events produced in the window after the warm-up
    // count. The stream goes on for a tail after the window, as a live one
    // would: an event's change waits for the other inputs to show a later
    // time, and at the end of a stream that is the idle timeout, not leadscore.
    let measured_from = wall_clock_ms() + args.warmup.as_millis() as i64;
    let measured_until = measured_from + args.duration.as_millis() as i64;
    let stop_at = started + args.warmup + args.duration + TAIL;
    let (mut sent, mut measured_sent) = (0u64, 0u64);
    let mut latencies: Vec<i64> = Vec::new();
    while Instant::now() < stop_at {
        let now = Instant::now();
        let due = (now.duration_since(started).as_secs_f64() * args.rate as f64) as u64;
        while sent < due {
            let at = wall_clock_ms();
            synth.set_clock(at);
            let e = synth.next_event();
            send(&p, &topic_of(topics, e.source), &e.key, &e.payload);
            sent += 1;
            measured_sent += u64::from((measured_from..measured_until).contains(&at));
        }
        while let Some(m) = consumer.poll(Duration::from_millis(1)) {
            let m = m?;
            if let Ok(c) =
                serde_json::from_slice::<SegmentChangeOut>(m.payload().unwrap_or_default())
                && c.reason == "event"
                && let Ok(at) = parse_rfc3339(&c.occurred_at)
                && (measured_from..measured_until).contains(&at)
            {
                latencies.push(wall_clock_ms() - at);
            }
        }
    }
    // Leave the assignment before the client goes (its queue closes cleanly).
    consumer.unassign()?;
    latencies.sort_unstable();
    let pct = |q: f64| {
        latencies
            .get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or(-1)
    };
    println!(
        "latency: {} events at {} events/s for {} after a {} warm-up; {} segment changes; produce -> change consumed: p50 {} ms, p90 {} ms, p99 {} ms, p99.9 {} ms, max {} ms",
        measured_sent,
        args.rate,
        humantime::format_duration(args.duration),
        humantime::format_duration(args.warmup),
        latencies.len(),
        pct(0.5),
        pct(0.9),
        pct(0.99),
        pct(0.999),
        latencies.last().copied().unwrap_or(-1)
    );
    if latencies.is_empty() {
        anyhow::bail!("no segment change came back: is the service consuming?");
    }
    Ok(())
}

fn read(args: &LoadgenArgs, settings: &Settings) -> anyhow::Result<()> {
    // The service's own consumer properties (defaults, then LEADSCORE__
    // variables, as `leadscore run` reads them), in a group of its own, so
    // that the two differ only in the work done per event.
    let topics = &settings.kafka.topics;
    let consumer: BaseConsumer = leadscore::kafka::consumer_config(&settings.kafka)
        .set("bootstrap.servers", &args.brokers)
        .set(
            "group.id",
            format!("leadscore-read-{}", leadscore::event::wall_clock_ms()),
        )
        .create()?;
    let inputs: Vec<&str> = topics.inputs().iter().map(|(_, t)| *t).collect();
    consumer.subscribe(&inputs)?;
    let mut n = 0u64;
    let mut started = None;
    let mut progress = Progress::new(args.events);
    let deadline = Instant::now() + Duration::from_secs(120);
    while n < args.events && Instant::now() < deadline {
        if let Some(m) = consumer.poll(Duration::from_millis(100)) {
            m?;
            started.get_or_insert_with(Instant::now);
            n += 1;
            if n.is_multiple_of(1024) {
                progress.saw(Instant::now(), n);
            }
        }
    }
    let secs = started.map_or(0.0, |s| s.elapsed().as_secs_f64()).max(1e-3);
    println!(
        "read: {n} events in {secs:.2} s = {:.0} events/s (a consumer that does nothing else)",
        n as f64 / secs
    );
    println!("{}", progress.report("read"));
    Ok(())
}
