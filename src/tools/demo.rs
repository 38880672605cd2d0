//! `leadscore demo`: the real service (consumer, engine, producer, HTTP)
//! against librdkafka's in-process mock broker, with state in memory, fed a
//! synthetic stream. Prints segment changes and hand-offs as they happen.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{ClientConfig, Message};
use tokio_util::sync::CancellationToken;

use leadscore::engine::Rules;
use leadscore::metrics::sum_samples;
use leadscore::output::{HandoffOut, SegmentChangeOut};
use leadscore::settings::{Backend, Loaded, Settings};

use super::synth::Synth;

/// Demo options.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Synthetic leads.
    #[arg(long, default_value_t = 3000)]
    pub leads: usize,
    /// Events per second fed in.
    #[arg(long, default_value_t = 2000)]
    pub rate: u64,
    /// How long to run (e.g. 20s, 2m).
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Simulated time per event, so that decay shows within the run.
    #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
    pub time_per_event: Duration,
    /// HTTP listen address (port 0 picks a free one). Without it,
    /// 127.0.0.1:8080, or a free port if that one is taken.
    #[arg(long)]
    pub listen: Option<String>,
    /// Print at most this many segment changes per second (hand-offs are always printed).
    #[arg(long, default_value_t = 8)]
    pub print_per_second: u32,
}

const PARTITIONS: i32 = 4;

/// Where the demo serves HTTP unless told otherwise (a free port if taken).
const DEFAULT_LISTEN: &str = "127.0.0.1:8080";

/// Runs the demo.
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let cluster = MockCluster::new(1).context("starting the in-process broker")?;
    let brokers = cluster.bootstrap_servers();
    let mut settings = Settings::default();
    let topics = settings.kafka.topics.clone();
    for (_, t) in topics.inputs() {
        cluster.create_topic(t, PARTITIONS, 1)?;
    }
    for t in topics.outputs() {
        cluster.create_topic(t, PARTITIONS, 1)?;
    }
    settings.kafka.brokers = brokers.clone();
    settings.kafka.group_id = "leadscore-demo".into();
    settings
        .kafka
        .consumer
        .insert("fetch.wait.max.ms".into(), "10".into());
    settings.state.backend = Backend::Memory;
    settings.http.listen = match &args.listen {
        // An address asked for is used or the demo stops saying why.
        Some(listen) => {
            std::net::TcpListener::bind(listen)
                .with_context(|| format!("--listen {listen}: cannot listen there"))?;
            listen.clone()
        }
        None if std::net::TcpListener::bind(DEFAULT_LISTEN).is_ok() => DEFAULT_LISTEN.into(),
        None => "127.0.0.1:0".into(),
    };
    let rules = Arc::new(Rules::default_rules());
    let loaded = Loaded {
        settings,
        rules: Arc::clone(&rules),
    };

    let cancel = CancellationToken::new();
    leadscore::service::cancel_on_signals(cancel.clone(), |code| std::process::exit(code));
    let (tx, rx) = tokio::sync::oneshot::channel();
    let service = tokio::spawn(leadscore::service::run(loaded, cancel.clone(), move |r| {
        let _ = tx.send(r);
    }));
    let running = rx.await.context("the service did not start")?;
    println!("leadscore demo: in-process Kafka broker at {brokers}, state in memory.");
    println!(
        "Metrics: http://{0}/metrics   Lead lookup: http://{0}/v1/leads/lead-000042",
        running.http_addr
    );
    println!(
        "Feeding {} events/s for {} leads for {} ({} of event time per event).\n",
        args.rate,
        args.leads,
        humantime::format_duration(args.duration),
        humantime::format_duration(args.time_per_event)
    );

    let stop = Arc::new(AtomicBool::new(false));
    let produced = Arc::new(AtomicU64::new(0));
    let feeder = {
        let (brokers, stop, produced, topics) = (
            brokers.clone(),
            stop.clone(),
            produced.clone(),
            topics.clone(),
        );
        let (leads, rate, step) = (
            args.leads,
            args.rate.max(1),
            args.time_per_event.as_millis() as i64,
        );
        std::thread::spawn(move || -> anyhow::Result<()> {
            let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
                .set("bootstrap.servers", &brokers)
                .set("linger.ms", "5")
                .create()?;
            let start = leadscore::event::wall_clock_ms() - 60 * 86_400_000;
            let mut synth = Synth::new(leads, 42, start, step);
            let began = Instant::now();
            let mut n: u64 = 0;
            while !stop.load(Ordering::SeqCst) {
                let due = (began.elapsed().as_secs_f64() * rate as f64) as u64;
                if n >= due {
                    std::thread::sleep(Duration::from_millis(2));
                    continue;
                }
                let e = synth.next_event();
                let topic = topics
                    .inputs()
                    .iter()
                    .find(|(s, _)| *s == e.source)
                    .map(|(_, t)| (*t).to_owned())
                    .unwrap_or_default();
                // Every 5000th message is malformed, to show the dead-letter path.
                let payload = if n % 5000 == 4999 {
                    "{\"event_id\": 42".to_owned()
                } else {
                    e.payload
                };
                let record = BaseRecord::to(&topic).key(&e.key).payload(&payload);
                if producer.send(record).is_ok() {
                    n += 1;
                    produced.store(n, Ordering::SeqCst);
                } else {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            producer.flush(Duration::from_secs(5))?;
            Ok(())
        })
    };
    let watcher = {
        let (brokers, stop, topics) = (brokers.clone(), stop.clone(), topics.clone());
        let per_second = args.print_per_second;
        std::thread::spawn(move || -> anyhow::Result<Summary> {
            watch(&brokers, &topics, &stop, per_second)
        })
    };

    let deadline = tokio::time::sleep(args.duration);
    tokio::pin!(deadline);
    tokio::select! {
        _ = &mut deadline => {}
        _ = cancel.cancelled() => {}
    }
    stop.store(true, Ordering::SeqCst);
    feeder
        .join()
        .map_err(|_| anyhow::anyhow!("feeder panicked"))??;
    // Let the service catch up with what was fed, then stop it.
    let total = produced.load(Ordering::SeqCst);
    let until = Instant::now() + Duration::from_secs(10);
    while consumed(&running.metrics) + dead(&running.metrics) < total && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let metrics_text = running.metrics.render();
    let population: BTreeMap<String, i64> = leadscore::engine::Segment::all_names(&rules)
        .into_iter()
        .map(|seg| {
            let line = format!("leadscore_segment_population_leads{{segment=\"{seg}\"}} ");
            let n = metrics_text
                .lines()
                .find_map(|l| l.strip_prefix(line.as_str()))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .unwrap_or(0.0) as i64;
            (seg.to_owned(), n)
        })
        .filter(|(_, n)| *n > 0)
        .collect();
    cancel.cancel();
    service.await??;
    let summary = watcher
        .join()
        .map_err(|_| anyhow::anyhow!("watcher panicked"))??;

    println!("\n--- summary ---------------------------------------------------------");
    println!(
        "events fed: {total}, scored: {}, dead-lettered: {}",
        consumed(&running.metrics),
        dead(&running.metrics)
    );
    println!("hand-offs to sales: {}", summary.handoffs);
    println!("segment changes by transition:");
    for ((from, to, reason), n) in &summary.transitions {
        println!("  {from:>11} -> {to:<11} ({reason}): {n}");
    }
    println!("leads by segment now: {population:?}");
    println!(
        "The same service against a real broker and Redis: leadscore run --config config/local.toml (see DEVELOPERS.md)"
    );
    drop(cluster);
    Ok(())
}

#[derive(Debug, Default)]
struct Summary {
    handoffs: u64,
    transitions: BTreeMap<(String, String, String), u64>,
}

fn watch(
    brokers: &str,
    topics: &leadscore::settings::TopicSettings,
    stop: &AtomicBool,
    per_second: u32,
) -> anyhow::Result<Summary> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "leadscore-demo-watch")
        .set("auto.offset.reset", "earliest")
        .set("fetch.wait.max.ms", "10")
        .create()?;
    consumer.subscribe(&[&topics.segment_changes, &topics.handoffs])?;
    let mut summary = Summary::default();
    let mut window = Instant::now();
    let mut printed = 0;
    let mut idle_since: Option<Instant> = None;
    loop {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                idle_since = None;
                let payload = m.payload().unwrap_or_default();
                if m.topic() == topics.handoffs {
                    summary.handoffs += 1;
                    if let Ok(h) = serde_json::from_slice::<HandoffOut>(payload) {
                        let top: Vec<String> = h
                            .top_signals
                            .iter()
                            .take(3)
                            .map(|s| format!("{} {:.0}", s.rule, s.points))
                            .collect();
                        println!(
                            "HAND-OFF  {}  score {:.0}  grade {}  crossed by {}  top: {}",
                            h.lead_id,
                            h.score,
                            h.fit_grade.as_deref().unwrap_or("unknown"),
                            h.crossing_signal.as_deref().unwrap_or("-"),
                            top.join(", ")
                        );
                    }
                } else if let Ok(c) = serde_json::from_slice::<SegmentChangeOut>(payload) {
                    *summary
                        .transitions
                        .entry((
                            c.previous_segment.clone(),
                            c.segment.clone(),
                            c.reason.clone(),
                        ))
                        .or_default() += 1;
                    if window.elapsed() >= Duration::from_secs(1) {
                        window = Instant::now();
                        printed = 0;
                    }
                    if printed < per_second {
                        printed += 1;
                        println!(
                            "{}  {}  {:>10} -> {:<10} score {:>6.1}  ({})",
                            &c.occurred_at[..16],
                            c.lead_id,
                            c.previous_segment,
                            c.segment,
                            c.score,
                            c.reason
                        );
                    }
                }
            }
            Some(Err(e)) => eprintln!("watcher: {e}"),
            None => {
                if stop.load(Ordering::SeqCst) {
                    let since = *idle_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > Duration::from_secs(3) {
                        return Ok(summary);
                    }
                }
            }
        }
    }
}

fn consumed(m: &leadscore::metrics::Metrics) -> u64 {
    sum_samples(&m.render(), "leadscore_events_consumed_total")
}

fn dead(m: &leadscore::metrics::Metrics) -> u64 {
    sum_samples(&m.render(), "leadscore_dead_lettered_total")
}
