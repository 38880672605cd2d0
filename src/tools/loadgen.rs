//! `leadscore loadgen`: drives a running service through the broker.
//!
//! * `--mode prefill` produces `--events` synthetic events to the input topics
//!   (creating them if needed) as fast as the broker takes them;
//! * `--mode drain` watches the service's `/metrics` until it has consumed
//!   `--events` more events and reports the sustained rate (start the service
//!   after a prefill to measure end-to-end throughput from a backlog);
//! * `--mode latency` produces at `--rate` with event time = wall time and
//!   consumes the segment-change topic, reporting produce → change-consumed
//!   latency percentiles.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

use leadscore::event::parse_rfc3339;
use leadscore::metrics::sum_counter;
use leadscore::output::SegmentChangeOut;
use leadscore::settings::TopicSettings;

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
    /// How long to run (latency mode).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
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
    /// Measure how fast the service consumes it.
    Drain,
    /// Measure end-to-end latency at a fixed rate.
    Latency,
    /// Read `--events` input events with a consumer that does nothing else:
    /// the ceiling the service is compared with.
    Read,
}

/// Runs the load generator.
pub async fn run(args: LoadgenArgs) -> anyhow::Result<()> {
    let topics = TopicSettings::default();
    match args.mode {
        Mode::Prefill => {
            let mut all: Vec<&str> = topics.inputs().iter().map(|(_, t)| *t).collect();
            all.extend(topics.outputs());
            leadscore::kafka::create_topics(&args.brokers, &all, args.partitions).await?;
            tokio::task::spawn_blocking(move || prefill(&args, &topics)).await?
        }
        Mode::Drain => drain(&args).await,
        Mode::Read => tokio::task::spawn_blocking(move || read(&args, &topics)).await?,
        Mode::Latency => tokio::task::spawn_blocking(move || latency(&args, &topics)).await?,
    }
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
    let pending = |name: &str| {
        body.lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    };
    Ok(Scrape {
        handled: sum_counter(&body, "leadscore_events_consumed_total")
            + sum_counter(&body, "leadscore_dead_lettered_total")
            + sum_counter(&body, "leadscore_duplicates_skipped_total"),
        unwritten: pending("leadscore_dirty_leads") + pending("leadscore_merge_buffered_events"),
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
    let mut first: Option<(Instant, u64)> = None;
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let Scrape { handled, unwritten } = scrape_all(&args.metrics_url).await?;
        let now = Instant::now();
        if first.is_none() && handled > 0 {
            first = Some((now, handled));
        }
        // Done when every event is handled and its state and outputs written.
        if handled >= target && unwritten == 0 {
            let (t0, n0) = first.unwrap_or((now, 0));
            let secs = now.duration_since(t0).as_secs_f64().max(1e-3);
            println!(
                "drain: {handled} events, {} of them in {secs:.2} s = {:.0} events/s end to end (consume, score, produce, Redis, commit)",
                handled - n0,
                (handled - n0) as f64 / secs
            );
            return Ok(());
        }
        if now > deadline {
            anyhow::bail!("the service handled {handled} of {target} events in 5 minutes");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn latency(args: &LoadgenArgs, topics: &TopicSettings) -> anyhow::Result<()> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &args.brokers)
        .set(
            "group.id",
            format!("leadscore-loadgen-{}", leadscore::event::wall_clock_ms()),
        )
        .set("fetch.wait.max.ms", "5")
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
    let p = producer(&args.brokers, 5)?;
    let started_ms = leadscore::event::wall_clock_ms();
    let mut synth = Synth::new(args.leads, args.seed, started_ms, 0);
    let started = Instant::now();
    let mut sent = 0u64;
    let mut latencies: Vec<i64> = Vec::new();
    let stop_at = started + args.duration;
    let drain_until = stop_at + Duration::from_secs(3);
    while Instant::now() < drain_until {
        let now = Instant::now();
        if now < stop_at {
            let due = (now.duration_since(started).as_secs_f64() * args.rate as f64) as u64;
            while sent < due {
                synth.set_clock(leadscore::event::wall_clock_ms());
                let e = synth.next_event();
                send(&p, &topic_of(topics, e.source), &e.key, &e.payload);
                sent += 1;
            }
        }
        while let Some(m) = consumer.poll(Duration::from_millis(1)) {
            let m = m?;
            if let Ok(c) =
                serde_json::from_slice::<SegmentChangeOut>(m.payload().unwrap_or_default())
                && c.reason == "event"
                && let Ok(at) = parse_rfc3339(&c.occurred_at)
                // Only changes caused by this run's events (not a backlog's).
                && at >= started_ms
            {
                latencies.push(leadscore::event::wall_clock_ms() - at);
            }
        }
    }
    latencies.sort_unstable();
    let pct = |q: f64| {
        latencies
            .get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or(-1)
    };
    println!(
        "latency: {} events at {} events/s for {}; {} segment changes; produce -> change consumed: p50 {} ms, p90 {} ms, p99 {} ms, max {} ms",
        sent,
        args.rate,
        humantime::format_duration(args.duration),
        latencies.len(),
        pct(0.5),
        pct(0.9),
        pct(0.99),
        latencies.last().copied().unwrap_or(-1)
    );
    Ok(())
}

fn read(args: &LoadgenArgs, topics: &TopicSettings) -> anyhow::Result<()> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &args.brokers)
        .set(
            "group.id",
            format!("leadscore-read-{}", leadscore::event::wall_clock_ms()),
        )
        .set("fetch.wait.max.ms", "5")
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()?;
    let inputs: Vec<&str> = topics.inputs().iter().map(|(_, t)| *t).collect();
    consumer.subscribe(&inputs)?;
    let mut n = 0u64;
    let mut started = None;
    let deadline = Instant::now() + Duration::from_secs(120);
    while n < args.events && Instant::now() < deadline {
        if let Some(m) = consumer.poll(Duration::from_millis(100)) {
            m?;
            started.get_or_insert_with(Instant::now);
            n += 1;
        }
    }
    let secs = started.map_or(0.0, |s| s.elapsed().as_secs_f64()).max(1e-3);
    println!(
        "read: {n} events in {secs:.2} s = {:.0} events/s (a consumer that does nothing else)",
        n as f64 / secs
    );
    Ok(())
}
