//! Delivery guarantees under injected faults, against the real broker and
//! Redis, with a workload over all four input topics and the skew production
//! has (see `common::skewed_workload`). Each test compares the final Redis
//! state (bit for bit) and the set of distinct output event ids with an
//! uninterrupted run over the same input.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{Broker, Msg, Names, Redis, Service, assert_same_leads, http_get, json};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rdkafka::Message;

const PARTITIONS: i32 = 4;
const EVENTS: usize = 40_000;
const LEADS: usize = 4_000;

/// These tests each run a broker, Redis and several services on a 2-core
/// machine; run them one at a time so their timing means something.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// tansu 0.6 expires a member that stopped heartbeating only while serving a
/// request, and when that is not the surviving member's heartbeat the
/// survivor is never told to rebalance: a member joining next to a freshly
/// killed one can wait for partitions forever. After a kill, the tests let
/// the dead member's 6 s session lapse before another member joins (a Kafka
/// broker needs no such pause).
const SESSION_LAPSE: Duration = Duration::from_millis(6_500);

/// For tests whose feed pauses for seconds (an outage): inputs wait longer
/// before they count as idle.
const SLOW_FEED: (&str, &str) = ("LEADSCORE__EVENT_TIME__IDLE_TIMEOUT_MS", "20000");

/// Settings of every service in these tests: inputs stay active between the
/// feeder's chunks (so the merge never gives up waiting on a live input),
/// and nothing expires (so final states are worth comparing).
const ENV: &[(&str, &str)] = &[
    ("LEADSCORE__EVENT_TIME__IDLE_TIMEOUT_MS", "4000"),
    ("LEADSCORE__EVENT_TIME__ALLOWED_LATENESS_MS", "10000"),
    ("LEADSCORE__STATE__RETENTION", "0s"),
];

fn env(extra: &[(&'static str, &'static str)]) -> Vec<(&'static str, &'static str)> {
    ENV.iter().chain(extra).copied().collect()
}

fn workload() -> &'static Vec<Msg> {
    static W: OnceLock<Vec<Msg>> = OnceLock::new();
    W.get_or_init(|| common::skewed_workload(EVENTS, LEADS, PARTITIONS, 11))
}

fn setup(broker: &Broker) -> Names {
    let names = Names::new();
    broker.create_topics(&names.all(), PARTITIONS);
    names
}

/// Waits until at least `total` input messages are committed; on timeout
/// fails with every member's metrics and log.
fn wait_committed(
    broker: &Broker,
    names: &Names,
    total: usize,
    timeout: Duration,
    members: &[&Service],
) {
    let deadline = Instant::now() + timeout;
    loop {
        let done = broker.committed_inputs(names, PARTITIONS);
        if done >= total as i64 {
            return;
        }
        if Instant::now() >= deadline {
            let reports: Vec<String> = members
                .iter()
                .enumerate()
                .map(|(n, m)| {
                    let metrics = m
                        .get("/metrics")
                        .map(|m| m.1)
                        .unwrap_or_default()
                        .lines()
                        .filter(|l| l.starts_with("leadscore_") && !l.contains("bucket"))
                        .collect::<Vec<_>>()
                        .join("\n");
                    format!(
                        "member {n} metrics:\n{metrics}\nmember {n} log:\n{}",
                        m.logs()
                    )
                })
                .collect();
            panic!("committed {done} of {total}\n{}", reports.join("\n"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until the whole workload is committed and no member has anything
/// left to write.
fn wait_done(broker: &Broker, names: &Names, timeout: Duration, members: &[&Service]) {
    wait_committed(broker, names, workload().len(), timeout, members);
    for member in members {
        member.wait_settled(Duration::from_secs(60));
    }
}

/// Distinct output event ids on both output topics.
fn output_ids(broker: &Broker, names: &Names) -> BTreeSet<String> {
    let mut ids = BTreeSet::new();
    for topic in [&names.changes, &names.handoffs] {
        for m in broker.read(topic, PARTITIONS, usize::MAX, Duration::from_secs(4)) {
            assert!(m.payload().is_some());
            ids.insert(json(&m)["event_id"].as_str().unwrap().to_owned());
        }
    }
    ids
}

type Outcome = (BTreeMap<String, Vec<u8>>, BTreeSet<String>);

/// The uninterrupted run over the whole workload, produced up front: final
/// lead states and distinct output ids. Computed once for all tests.
fn reference() -> &'static Outcome {
    static R: OnceLock<Outcome> = OnceLock::new();
    R.get_or_init(|| {
        let items = workload();
        let broker = Broker::start();
        let redis = Redis::start();
        let names = setup(&broker);
        broker.produce_msgs(&names, items);
        let service = Service::start(&broker, &redis, &names, &env(&[]));
        wait_done(&broker, &names, Duration::from_secs(400), &[&service]);
        let late = service.counter("leadscore_late_events_total");
        let mis_keyed = service.counter("leadscore_events_mis_keyed_total");
        assert!(service.terminate().success());
        assert_eq!(late, 0, "the workload's disorder stays inside the allowed lateness");
        // Leads' events keyed by lead id, cookie-only ones by the cookie
        // (in the lead's partition or another): no false alarm.
        assert_eq!(mis_keyed, 0, "the workload keys as the contract asks");
        let out = (redis.leads(&names.prefix), output_ids(&broker, &names));
        assert!(out.0.len() > LEADS / 2, "most leads are stored");
        assert!(out.1.len() > 1000, "plenty of outputs");
        // Stitched leads are counted in their segment (they were not before 88f6e48).
        common::assert_populations_match(&redis, &names.prefix);
        let (visitors, aliases) = common::visitors_and_aliases(&out.0);
        assert!(
            visitors > 100 && aliases > 100,
            "the workload stitches visitors and keeps others apart: {visitors} visitors, {aliases} aliases"
        );
        out
    })
}

/// Feeds the workload in production order, in chunks, while `during` runs.
fn feed_while<T>(
    broker: &Broker,
    names: &Names,
    chunk: usize,
    pause: Duration,
    during: impl FnOnce() -> T,
) -> T {
    std::thread::scope(|scope| {
        let feeder = scope.spawn(|| {
            for c in workload().chunks(chunk) {
                broker.produce_msgs(names, c);
                std::thread::sleep(pause);
            }
        });
        let out = during();
        feeder.join().unwrap();
        out
    })
}

/// Lets `service` commit the whole workload, stops it cleanly, and compares
/// the result with the uninterrupted run. Returns how many events the
/// service applied late.
fn finish_and_compare(
    broker: &Broker,
    redis: &Redis,
    names: &Names,
    timeout: Duration,
    service: Service,
) -> u64 {
    wait_done(broker, names, timeout, &[&service]);
    let late = service.counter("leadscore_late_events_total");
    assert!(service.terminate().success(), "exit 0 on SIGTERM");
    assert_same(redis, broker, names);
    late
}

fn assert_same(redis: &Redis, broker: &Broker, names: &Names) {
    let want = reference();
    assert_same_leads(
        &redis.leads(&names.prefix),
        &want.0,
        "final Redis state against the uninterrupted run",
    );
    common::assert_populations_match(redis, &names.prefix);
    let got = output_ids(broker, names);
    assert_eq!(got.len(), want.1.len(), "distinct output events");
    assert!(got == want.1, "output event ids differ");
}

/// Samples stored positions while a test runs and checks none moves backwards.
struct Positions {
    seen: BTreeMap<String, i64>,
    samples: usize,
}

impl Positions {
    fn new() -> Self {
        Positions {
            seen: BTreeMap::new(),
            samples: 0,
        }
    }

    fn sample(&mut self, redis: &Redis, prefix: &str) {
        for (k, v) in redis.positions(prefix) {
            let before = self.seen.insert(k.clone(), v).unwrap_or(-1);
            assert!(
                v >= before,
                "the stored position of {k} moved backwards: {before} -> {v}"
            );
        }
        self.samples += 1;
    }
}

#[test]
fn sigkill_at_random_points_loses_nothing_and_counts_nothing_twice() {
    sigkills(Redis::start);
}

#[test]
fn on_a_redis_cluster_sigkills_lose_nothing_and_count_nothing_twice() {
    sigkills(|| Redis::start_cluster(false));
}

fn sigkills(redis: fn() -> Redis) {
    let _serial = serial();
    reference();
    let broker = Broker::start();
    let redis = redis();
    let names = setup(&broker);
    let mut rng = SmallRng::seed_from_u64(5);
    feed_while(&broker, &names, 1_000, Duration::from_millis(900), || {
        for _ in 0..5 {
            let service = Service::start(&broker, &redis, &names, &env(&[]));
            std::thread::sleep(Duration::from_millis(rng.random_range(300..2500)));
            service.kill();
            std::thread::sleep(SESSION_LAPSE);
        }
    });
    let service = Service::start(&broker, &redis, &names, &env(&[]));
    finish_and_compare(&broker, &redis, &names, Duration::from_secs(300), service);
}

#[test]
fn graceful_shutdown_under_load_is_bounded_and_exact() {
    graceful_shutdown(Redis::start);
}

#[test]
fn on_a_redis_cluster_graceful_shutdown_is_bounded_and_exact() {
    graceful_shutdown(|| Redis::start_cluster(false));
}

fn graceful_shutdown(redis: fn() -> Redis) {
    let _serial = serial();
    reference();
    let broker = Broker::start();
    let redis = redis();
    let names = setup(&broker);
    broker.produce_msgs(&names, workload());
    // Small batches put the stop, and so the resume positions, inside the
    // broker's record batches rather than at their edges.
    let small = env(&[("LEADSCORE__KAFKA__BATCH_MAX_MESSAGES", "300")]);
    let service = Service::start(&broker, &redis, &names, &small);
    wait_committed(&broker, &names, 2_000, Duration::from_secs(60), &[&service]);
    let started = Instant::now();
    // Exit 0, and no ERROR in the log: a rollout under load pages no one.
    service.stop_cleanly("a stop under load");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "drained in {:?}",
        started.elapsed()
    );
    let stopped_at = broker.committed_inputs(&names, PARTITIONS);
    assert!(
        stopped_at < workload().len() as i64,
        "stopped mid-backlog, not after it"
    );
    // Resumed inside a record batch, it finishes the backlog exactly, and
    // its own stop logs no ERROR either.
    let service = Service::start(&broker, &redis, &names, &small);
    wait_done(&broker, &names, Duration::from_secs(300), &[&service]);
    service.stop_cleanly("the resumed service's stop");
    assert_same(&redis, &broker, &names);
}

#[test]
fn redis_down_for_20_seconds_pauses_commits_and_recovers_exactly() {
    let _serial = serial();
    reference();
    let broker = Broker::start();
    let mut redis = Redis::start_persistent();
    let names = setup(&broker);
    let items = workload();
    let (first, rest) = items.split_at(items.len() / 3);
    broker.produce_msgs(&names, first);
    // The rest is produced only after the outage starts, seconds after the
    // service read the first part dry: an idle timeout shorter than that
    // gap would declare the CRM input idle and make its next sync late
    // (exactness holds while no input goes idle before the stream ends).
    let service = Service::start(&broker, &redis, &names, &env(&[SLOW_FEED]));
    wait_committed(
        &broker,
        &names,
        first.len() / 2,
        Duration::from_secs(120),
        &[&service],
    );
    redis.stop();
    broker.produce_msgs(&names, rest);
    let outage = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    let frozen = broker.committed_inputs(&names, PARTITIONS);
    let (status, why) = service.get("/readyz").unwrap();
    assert_eq!(status, 503, "not ready while Redis is down");
    // The store error's own words (a stopped Redis refuses connections).
    assert!(why.contains("Redis is unavailable: "), "{why}");
    let (_, metrics) = service.get("/metrics").unwrap();
    assert!(metrics.contains("leadscore_redis_up 0"), "{metrics}");
    while outage.elapsed() < Duration::from_secs(20) {
        assert_eq!(
            service.get("/healthz").map(|r| r.0),
            Some(200),
            "alive during the outage"
        );
        std::thread::sleep(Duration::from_secs(2));
    }
    assert_eq!(
        broker.committed_inputs(&names, PARTITIONS),
        frozen,
        "no commits while state cannot be written"
    );
    assert!(service.counter("leadscore_redis_errors_total") > 0);
    redis.restart();
    wait_done(&broker, &names, Duration::from_secs(300), &[&service]);
    assert_eq!(service.get("/readyz").map(|r| r.0), Some(200));
    // The outage's end is logged, with the last failure (it was not logged
    // at all before 2026-12-08).
    let logs = service.logs();
    assert!(logs.contains("Redis answers again."), "{logs}");
    assert!(service.terminate().success());
    assert_same(&redis, &broker, &names);
}

#[test]
fn a_broker_restart_mid_stream_loses_nothing() {
    let _serial = serial();
    reference();
    let broker = Broker::start();
    let redis = Redis::start();
    let names = setup(&broker);
    let items = workload();
    let (first, rest) = items.split_at(items.len() / 2);
    broker.produce_msgs(&names, first);
    let service = Service::start(&broker, &redis, &names, &env(&[]));
    std::thread::sleep(Duration::from_millis(1500));
    let broker = broker.restart();
    broker.produce_msgs(&names, rest);
    finish_and_compare(&broker, &redis, &names, Duration::from_secs(300), service);
}

#[test]
fn a_group_of_three_that_gains_and_loses_members_ends_exact() {
    group_of_three(Redis::start);
}

#[test]
fn on_a_redis_cluster_a_group_of_three_that_gains_and_loses_members_ends_exact() {
    group_of_three(|| Redis::start_cluster(false));
}

fn group_of_three(redis: fn() -> Redis) {
    let _serial = serial();
    reference();
    let broker = Broker::start();
    let redis = redis();
    let names = setup(&broker);
    let mut positions = Positions::new();
    let survivors = feed_while(&broker, &names, 4_000, Duration::from_millis(400), || {
        let a = Service::start(&broker, &redis, &names, &env(&[]));
        let b = Service::start(&broker, &redis, &names, &env(&[]));
        let c = Service::start(&broker, &redis, &names, &env(&[]));
        positions.sample(&redis, &names.prefix);
        std::thread::sleep(Duration::from_millis(1500));
        b.kill(); // a crash: its partitions move once its session expires
        std::thread::sleep(SESSION_LAPSE);
        let d = Service::start(&broker, &redis, &names, &env(&[]));
        positions.sample(&redis, &names.prefix);
        std::thread::sleep(Duration::from_millis(1500));
        assert!(c.terminate().success(), "a member leaving cleanly exits 0");
        positions.sample(&redis, &names.prefix);
        (a, d)
    });
    let (a, d) = survivors;
    wait_done(&broker, &names, Duration::from_secs(300), &[&a, &d]);
    positions.sample(&redis, &names.prefix);
    let (_, metrics) = a.get("/metrics").unwrap();
    assert!(
        metrics.contains("leadscore_rebalances_total{kind=\"assign\"}"),
        "{metrics}"
    );
    assert!(a.terminate().success());
    assert!(d.terminate().success());
    assert_same(&redis, &broker, &names);
}

/// Changed leads cannot be evicted until they are written, so a member
/// whose writes fall due only every 30 s would hold every lead and visitor
/// it saw meanwhile; a shard over its share of `state.max_leads_in_memory`
/// writes at once instead. A cache of 300 per member for the workload's
/// thousands of leads and visitors, a second member joining halfway (the
/// limit is shared again among each member's shards): memory stays
/// bounded, and the end state is the uninterrupted run's.
#[test]
fn a_small_cache_with_rare_writes_stays_bounded_and_ends_exact() {
    let _serial = serial();
    let stored = reference().0.len();
    let broker = Broker::start();
    let redis = Redis::start();
    let names = setup(&broker);
    let small = env(&[
        ("LEADSCORE__STATE__MAX_LEADS_IN_MEMORY", "300"),
        ("LEADSCORE__REDIS__FLUSH_INTERVAL_MS", "30000"),
        ("LEADSCORE__REDIS__FLUSH_MAX_DIRTY", "1000000"),
    ]);
    let held = |m: &Service| m.counter("leadscore_leads_in_memory");
    let mut most = 0;
    let watch = |members: &[&Service], most: &mut u64, until: Instant| {
        while Instant::now() < until {
            *most = members.iter().map(|m| held(m)).fold(*most, u64::max);
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let (a, b) = feed_while(&broker, &names, 4_000, Duration::from_millis(400), || {
        let a = Service::start(&broker, &redis, &names, &small);
        watch(&[&a], &mut most, Instant::now() + Duration::from_secs(3));
        let b = Service::start(&broker, &redis, &names, &small);
        watch(
            &[&a, &b],
            &mut most,
            Instant::now() + Duration::from_secs(3),
        );
        (a, b)
    });
    let total = workload().len() as i64;
    let deadline = Instant::now() + Duration::from_secs(300);
    while broker.committed_inputs(&names, PARTITIONS) < total && Instant::now() < deadline {
        watch(
            &[&a, &b],
            &mut most,
            Instant::now() + Duration::from_millis(500),
        );
    }
    wait_done(&broker, &names, Duration::from_secs(60), &[&a, &b]);
    // The gauges are published about once a second.
    std::thread::sleep(Duration::from_millis(1_500));
    for m in [&a, &b] {
        assert!(held(m) <= 300, "{} held at the end", held(m));
        assert!(m.counter("leadscore_lead_cache_evictions_total") > 0);
    }
    eprintln!("most held by a member: {most} (limit 300; {stored} leads and visitors stored)");
    // Above the limit only by a round per shard: a round takes no more
    // events than its shard may hold leads, a shard stops stepping once
    // changed leads keep it over its limit, and takes nothing in while a
    // write is in flight (508 here on 2026-12-06; before that, with rounds
    // of 2,048 events and a whole turn's budget per shard, 300 to 1,018 on
    // a fast machine and 2,221 to 3,055 on a slow one); without the early
    // write, about 4,700.
    assert!(
        most <= 2_000,
        "a member held {most} leads and visitors at once over a limit of 300"
    );
    assert!(a.terminate().success());
    assert!(b.terminate().success());
    assert_same(&redis, &broker, &names);
}

/// An upgrade without downtime: each member of a group of three is
/// replaced in turn (SIGTERM, then a new one joins) while events flow; the
/// group uses cooperative rebalancing, so the others keep their shards.
#[test]
fn a_rolling_restart_of_a_group_of_three_under_load_ends_exact() {
    let _serial = serial();
    let (redis, broker, names, _) = rolling_restart(&[], &[]);
    assert_same(&redis, &broker, &names);
}

/// The second roll of an upgrade across a state format change, under load:
/// a group writing format 4 (`state.format_version = 4`, as the first roll
/// leaves it) is replaced member by member by ones writing this release's
/// format, so shards move back and forth between the two while leads are
/// written in both. Every lead ends as the uninterrupted run's (compared
/// as decoded states, rewritten in this release's format), and most were
/// rewritten in the new format by the end.
#[test]
fn a_rolling_upgrade_across_a_state_format_change_ends_exact() {
    let _serial = serial();
    let (redis, broker, names, before) =
        rolling_restart(&[("LEADSCORE__STATE__FORMAT_VERSION", "4")], &[]);
    assert!(
        before.get(&4).is_some_and(|n| *n > 0) && before.keys().all(|v| *v == 4),
        "before the roll the first members wrote format 4 only: {before:?}"
    );
    let engine = leadscore::engine::Engine::new(
        std::sync::Arc::new(leadscore::engine::Rules::default_rules()),
        leadscore::engine::EngineConfig::default(),
    );
    let stored = redis.leads(&names.prefix);
    // The first members' leads are read by their successors as the roll
    // moves shards (a successor that could not read them would start them
    // afresh, and the comparison below would fail). Leads no event or
    // timer reached afterwards stay in format 4 (37 of 5,179 in one run).
    let old = stored.values().filter(|b| b.first() == Some(&4)).count();
    assert!(
        old < stored.len() / 2,
        "{old} of {} leads still in format 4",
        stored.len()
    );
    let rewritten: BTreeMap<String, Vec<u8>> = stored
        .into_iter()
        .map(|(k, b)| {
            let mut current = Vec::new();
            engine.encode(
                &engine.decode(&b).expect("every stored lead reads"),
                &mut current,
            );
            (k, current)
        })
        .collect();
    assert_same_leads(&rewritten, &reference().0, "leads written in two formats");
    common::assert_populations_match(&redis, &names.prefix);
    let got = output_ids(&broker, &names);
    assert!(got == reference().1, "output event ids differ");
}

/// A group of three started with `first` settings, replaced one member at
/// a time (every 2 s, under load) by members started with `then`; returns
/// once the group has committed the whole workload and stopped cleanly,
/// with stored positions never moving backwards, and how many stored leads
/// were in each format version just before the first member was replaced.
/// The caller holds the [`serial`] lock.
fn rolling_restart(
    first: &[(&'static str, &'static str)],
    then: &[(&'static str, &'static str)],
) -> (Redis, Broker, Names, BTreeMap<u8, usize>) {
    reference();
    let broker = Broker::start();
    let redis = Redis::start();
    let names = setup(&broker);
    let mut positions = Positions::new();
    let mut formats = BTreeMap::new();
    let group = feed_while(&broker, &names, 2_000, Duration::from_millis(500), || {
        let mut group: Vec<Service> = (0..3)
            .map(|_| Service::start(&broker, &redis, &names, &env(first)))
            .collect();
        for step in 0..3 {
            std::thread::sleep(Duration::from_millis(2000));
            positions.sample(&redis, &names.prefix);
            if step == 0 {
                // The first members have written leads before the first is
                // replaced (a slow start of the group may take longer than
                // the 2 s above).
                let deadline = Instant::now() + Duration::from_secs(30);
                while redis.leads(&names.prefix).is_empty() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(100));
                }
                for state in redis.leads(&names.prefix).values() {
                    let version = state.first().copied().unwrap_or_default();
                    *formats.entry(version).or_default() += 1;
                }
            }
            let old = group.remove(0);
            assert!(
                old.terminate().success(),
                "a member leaving cleanly exits 0"
            );
            group.push(Service::start(&broker, &redis, &names, &env(then)));
            positions.sample(&redis, &names.prefix);
        }
        group
    });
    wait_done(
        &broker,
        &names,
        Duration::from_secs(300),
        &group.iter().collect::<Vec<_>>(),
    );
    positions.sample(&redis, &names.prefix);
    for member in group {
        assert!(member.terminate().success());
    }
    (redis, broker, names, formats)
}

/// A shard fenced while the group still assigns it to its member: another
/// member took it in Redis (here the owner epoch is raised by hand, as a
/// member that took the shard and then died before the group heard of it
/// would leave it) and the group never moved it. The member drops the shard
/// at its next write, takes it again once a session timeout has passed,
/// resumes from the positions in Redis, and ends exact. Without the
/// re-take nobody reads the shard again until the member restarts.
#[test]
fn a_shard_fenced_while_still_assigned_is_taken_again_and_ends_exact() {
    let _serial = serial();
    reference();
    let broker = Broker::start();
    let redis = Redis::start();
    let names = setup(&broker);
    // Started as the feed starts (inputs quiet past the idle timeout before
    // the first event would move the clock to the wall clock), with inputs
    // that wait out the gaps of a live feed: one service reading it live
    // ends exact only if no input idles before everything has arrived.
    let service = feed_while(&broker, &names, 2_000, Duration::from_millis(500), || {
        let service = Service::start(&broker, &redis, &names, &env(&[SLOW_FEED]));
        wait_committed(
            &broker,
            &names,
            8_000,
            Duration::from_secs(120),
            &[&service],
        );
        let _: i64 = redis::cmd("HINCRBY")
            .arg(shard_record(&names, 1))
            .arg("epoch")
            .arg(1)
            .query(&mut redis.conn())
            .unwrap();
        service
    });
    wait_done(&broker, &names, Duration::from_secs(180), &[&service]);
    assert!(
        service.counter("leadscore_shards_fenced_total") >= 1,
        "the member was fenced"
    );
    let retakes = service
        .get("/metrics")
        .unwrap()
        .1
        .lines()
        .find(|l| l.starts_with("leadscore_rebalances_total{kind=\"retake\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(retakes >= 1.0, "the shard was taken again");
    assert!(service.terminate().success());
    assert_same(&redis, &broker, &names);
}

/// The key of a shard's record, whose hash slot holds all of the shard.
fn shard_record(names: &Names, shard: i32) -> String {
    format!("{}{{p{shard}}}:meta", names.prefix)
}

#[test]
fn on_a_redis_cluster_a_shard_slot_moved_mid_stream_ends_exact() {
    let _serial = serial();
    reference();
    let broker = Broker::start();
    let redis = Redis::start_cluster(false);
    let names = setup(&broker);
    let mut positions = Positions::new();
    let service = feed_while(&broker, &names, 2_000, Duration::from_millis(500), || {
        let service = Service::start(&broker, &redis, &names, &env(&[]));
        wait_committed(
            &broker,
            &names,
            6_000,
            Duration::from_secs(120),
            &[&service],
        );
        positions.sample(&redis, &names.prefix);
        let record = shard_record(&names, 0);
        let (slot, from) = redis.slot_owner(&record);
        let to = redis.primaries().into_iter().find(|p| *p != from).unwrap();
        // Keys move a few at a time while the service reads and writes the
        // shard: it meets ASK redirects, TRYAGAIN on its scripts whose keys
        // are split between the nodes, and finally MOVED.
        redis.migrate_slot(slot, from, to);
        assert_eq!(redis.slot_owner(&record), (slot, to));
        positions.sample(&redis, &names.prefix);
        service
    });
    wait_done(&broker, &names, Duration::from_secs(300), &[&service]);
    positions.sample(&redis, &names.prefix);
    assert!(service.terminate().success(), "exit 0 on SIGTERM");
    assert_same(&redis, &broker, &names);
}

#[test]
fn on_a_redis_cluster_a_primary_killed_fails_over_to_its_replica_and_ends_exact() {
    let _serial = serial();
    reference();
    let broker = Broker::start();
    let mut redis = Redis::start_cluster(true);
    let names = setup(&broker);
    let mut service = Service::start(&broker, &redis, &names, &env(&[SLOW_FEED]));
    let mut restarts = 0;
    feed_while(&broker, &names, 1_000, Duration::from_millis(700), || {
        wait_committed(
            &broker,
            &names,
            8_000,
            Duration::from_secs(120),
            &[&service],
        );
        let (_, victim) = redis.slot_owner(&shard_record(&names, 0));
        // The replica holds everything written so far (the shards' records
        // among it); what is written from here on it may miss. Without the
        // wait, a replica that had not yet received the shards' records
        // could be promoted, and the service rightly stops as on a flushed
        // Redis (seen once on a loaded CI run, 2026-12-03).
        redis.wait_replicas_synced(victim, Duration::from_secs(60));
        redis.kill_node(victim);
        // Its replica is promoted once the others give up on it (node
        // timeout 2 s); meanwhile writes to its slots fail and are retried.
        let deadline = Instant::now() + Duration::from_secs(60);
        while redis.primaries().len() < 3 {
            assert!(Instant::now() < deadline, "no replica took over");
            std::thread::sleep(Duration::from_millis(200));
        }
        redis.wait_cluster_ok(Duration::from_secs(60));
    });
    // Like Kubernetes, restart the service if it exits: a promoted replica
    // that missed acknowledged writes makes it exit (the shard's write
    // sequence is behind), and the restart resumes from what Redis holds.
    let deadline = Instant::now() + Duration::from_secs(300);
    while broker.committed_inputs(&names, PARTITIONS) < workload().len() as i64 {
        if let Some(status) = service.exited() {
            let log = service.logs();
            assert!(
                log.contains("Redis lost acknowledged writes"),
                "exited ({status}) for another reason:\n{log}"
            );
            restarts += 1;
            assert!(restarts <= 3, "restarted {restarts} times");
            service = Service::start(&broker, &redis, &names, &env(&[]));
        }
        assert!(
            Instant::now() < deadline,
            "not finished; log:\n{}",
            service.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    service.wait_settled(Duration::from_secs(60));
    assert!(service.terminate().success());
    eprintln!("restarts after the failover: {restarts}");
    assert_same(&redis, &broker, &names);
}

/// An instance paused past its session (a GC stall, SIGSTOP, a network cut
/// to the broker but not to Redis) still holds unwritten leads and positions
/// when it resumes: it must write none of them over its successor's state.
#[test]
fn a_paused_member_that_resumes_cannot_overwrite_its_successor() {
    let _serial = serial();
    reference();
    let broker = Broker::start();
    let redis = Redis::start();
    let names = setup(&broker);
    let mut positions = Positions::new();
    let (a, b) = feed_while(&broker, &names, 2_000, Duration::from_millis(300), || {
        let a = Service::start(&broker, &redis, &names, &env(&[]));
        let b = Service::start(&broker, &redis, &names, &env(&[]));
        std::thread::sleep(Duration::from_millis(2000));
        positions.sample(&redis, &names.prefix);
        a.signal("STOP");
        // Past the 6 s session: b takes a's shards and commits beyond them.
        let before = broker.committed_inputs(&names, PARTITIONS);
        let until = Instant::now() + Duration::from_secs(12);
        while Instant::now() < until {
            positions.sample(&redis, &names.prefix);
            std::thread::sleep(Duration::from_millis(300));
        }
        assert!(
            broker.committed_inputs(&names, PARTITIONS) > before,
            "b carried on"
        );
        a.signal("CONT");
        for _ in 0..20 {
            positions.sample(&redis, &names.prefix);
            std::thread::sleep(Duration::from_millis(250));
        }
        (a, b)
    });
    wait_done(&broker, &names, Duration::from_secs(300), &[&b, &a]);
    positions.sample(&redis, &names.prefix);
    assert!(positions.samples > 20);
    let fenced =
        a.counter("leadscore_shards_fenced_total") + a.counter("leadscore_rebalances_total");
    assert!(fenced > 0, "the resumed member noticed it lost its shards");
    // Whatever a did after it resumed, it exits and the state is exact.
    let _ = a.terminate();
    assert!(b.terminate().success());
    assert_same(&redis, &broker, &names);
}

/// Redis unavailable for longer than `max.poll.interval.ms`, with two members:
/// both hold their input, nothing is committed, and both carry on exactly.
///
/// Ignored: it failed in 3 runs of 4 on this machine while the rebalance
/// callback retried taking each new shard for up to the drain timeout (past
/// this test's 8 s poll interval, so the group dropped the member and tansu
/// then left partitions assigned to nobody). The callback's retries are now
/// bounded by the drain timeout in all, itself at most half the poll
/// interval, after which the member stops with an error: this test's
/// expectation (both members ride the outage out) is not what the service
/// does. Taking shards in the worker instead (assign at the committed
/// offsets, seek once taken) made this test pass, but a companion scenario
/// (a member leaving during the outage) then failed in each of five runs on
/// this broker: four times the group never reassigned the leaver's shards,
/// once the final state was wrong for a cause not found. So that change was
/// not kept. README "Known limitations" says so.
#[test]
#[ignore = "a member assigned shards while Redis is down stops with an error after the drain timeout instead of riding the outage out (README known limitations)"]
fn a_redis_outage_longer_than_the_poll_interval_with_two_members_recovers_exactly() {
    let _serial = serial();
    reference();
    let broker = Broker::start();
    let mut redis = Redis::start_persistent();
    let names = setup(&broker);
    let items = workload();
    let (first, rest) = items.split_at(items.len() / 3);
    broker.produce_msgs(&names, first);
    let poll = env(&[
        ("LEADSCORE__KAFKA__CONSUMER__MAX_POLL_INTERVAL_MS", "8000"),
        ("LEADSCORE__SHUTDOWN__DRAIN_TIMEOUT_MS", "4000"),
    ]);
    let a = Service::start(&broker, &redis, &names, &poll);
    let b = Service::start(&broker, &redis, &names, &poll);
    std::thread::sleep(Duration::from_secs(2));
    let mut positions = Positions::new();
    positions.sample(&redis, &names.prefix);
    redis.stop();
    broker.produce_msgs(&names, rest);
    std::thread::sleep(Duration::from_secs(12));
    redis.restart();
    wait_done(&broker, &names, Duration::from_secs(300), &[&a, &b]);
    positions.sample(&redis, &names.prefix);
    assert!(a.terminate().success());
    assert!(b.terminate().success());
    assert_same(&redis, &broker, &names);
}

/// The low-latency setting (`idle_timeout_ms = 0`) gives up waiting only at
/// the live edge: an input whose partition still has events in the broker
/// holds its shard back however briefly its queue is empty, so a backlog
/// (a restart, a catch-up, a new deployment) is merged in event-time order
/// and ends exactly where the uninterrupted run with the fault tests' idle
/// timeout does, with nothing late.
#[test]
fn with_idle_timeout_zero_a_backlog_is_still_merged_in_event_time_order() {
    let _serial = serial();
    reference();
    let broker = Broker::start();
    let redis = Redis::start();
    let names = setup(&broker);
    broker.produce_msgs(&names, workload());
    let service = Service::start(
        &broker,
        &redis,
        &names,
        &env(&[("LEADSCORE__EVENT_TIME__IDLE_TIMEOUT_MS", "0")]),
    );
    let late = finish_and_compare(&broker, &redis, &names, Duration::from_secs(300), service);
    assert_eq!(
        late, 0,
        "events applied late while catching up on a backlog"
    );
}

#[test]
fn poison_and_oversized_input_is_dead_lettered_and_every_good_event_is_scored() {
    let _serial = serial();
    let broker = Broker::start();
    let redis = Redis::start();
    let names = setup(&broker);
    let service = Service::start(
        &broker,
        &redis,
        &names,
        &[("LEADSCORE__KAFKA__FORMATS__CRM", "avro")],
    );
    let good = |i: usize| {
        serde_json::json!({"event_id": format!("g{i}"), "lead_id": format!("p-{}", i % 50), "occurred_at": "2026-11-22T10:00:00Z", "type": "form_submit"})
            .to_string()
            .into_bytes()
    };
    let mut rng = SmallRng::seed_from_u64(3);
    let random_bytes: Vec<u8> = (0..300).map(|_| rng.random()).collect();
    let future = leadscore::event::format_rfc3339(leadscore::event::wall_clock_ms() + 3_600_000);
    let poison: Vec<(&str, Vec<u8>)> = vec![
        ("json", random_bytes),
        ("json", br#"{"event_id": 5, "lead_id": "x", "occurred_at": "2026-11-22T10:00:00Z", "type": "form_submit"}"#.to_vec()),
        ("contract", br#"{"event_id": "m1", "occurred_at": "2026-11-22T10:00:00Z", "type": "form_submit"}"#.to_vec()),
        ("contract", br#"{"event_id": "m2", "lead_id": "x", "type": "form_submit"}"#.to_vec()),
        ("too_large", format!(r#"{{"event_id":"big","lead_id":"x","occurred_at":"2026-11-22T10:00:00Z","type":"form_submit","attributes":{{"pad":"{}"}}}}"#, "x".repeat(70_000)).into_bytes()),
        ("contract", br#"{"event_id": "t1", "lead_id": "x", "occurred_at": "2099-01-01T00:00:00Z", "type": "form_submit"}"#.to_vec()),
        ("contract", format!(r#"{{"event_id": "t2", "lead_id": "x", "occurred_at": "{future}", "type": "form_submit"}}"#).into_bytes()),
        ("json", b"{\"event_id\": \"u1\", \"lead_id\": \"\xff\xfe\", \"occurred_at\": \"2026-11-22T10:00:00Z\", \"type\": \"form_submit\"}".to_vec()),
        ("contract", br#"{"event_id": "k1", "lead_id": "x", "occurred_at": "2026-11-22T10:00:00Z", "type": "teleport"}"#.to_vec()),
        ("contract", br#"{"event_id": "ch", "lead_id": "x", "occurred_at": "2026-11-22T10:00:00Z", "type": "open", "channel": "pigeon"}"#.to_vec()),
        ("empty", Vec::new()),
    ];
    let mut web: Vec<Msg> = Vec::new();
    let mut next_good = 0;
    for (kind, bytes) in &poison {
        for _ in 0..3 {
            web.push((0, 0, "k".into(), good(next_good)));
            next_good += 1;
        }
        // The channel check belongs to the messaging topic.
        let input = if bytes.windows(7).any(|w| w == b"pigeon\"") {
            2
        } else {
            0
        };
        let _ = kind;
        web.push((input, 0, "k".into(), bytes.clone()));
    }
    broker.produce_msgs(&names, &web);
    // A message between the producer's limit (1 MB) and the broker's.
    let huge = vec![b'{'; 1_040_000];
    let big_producer: rdkafka::producer::ThreadedProducer<
        rdkafka::producer::DefaultProducerContext,
    > = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &broker.brokers)
        .set("message.max.bytes", "2000000")
        .create()
        .unwrap();
    use rdkafka::producer::Producer;
    big_producer
        .send(
            rdkafka::producer::BaseRecord::to(&names.web)
                .partition(1)
                .key("huge")
                .payload(&huge),
        )
        .unwrap();
    big_producer.flush(Duration::from_secs(30)).unwrap();
    let after_huge = serde_json::json!({"event_id": "after-huge", "lead_id": "h", "occurred_at": "2026-11-22T10:00:00Z", "type": "form_submit"});
    broker.produce_msgs(
        &names,
        &[(0, 1, "h".into(), after_huge.to_string().into_bytes())],
    );
    // Truncated Avro on the Avro topic.
    let schema = leadscore::decode::input_schema(leadscore::event::Source::Crm);
    let crm_text = serde_json::json!({"event_id": "c1", "lead_id": "p-1", "occurred_at": "2026-11-22T10:00:00Z", "type": "profile_updated", "attributes": {"industry": "events"}}).to_string();
    let e = leadscore::decode::Decoder::new(
        leadscore::event::Source::Crm,
        leadscore::decode::Format::Json,
        Default::default(),
    )
    .decode(Some(crm_text.as_bytes()), None)
    .unwrap();
    let avro = leadscore::decode::encode_avro(&schema, &e).unwrap();
    broker.produce_msgs(
        &names,
        &[
            (3, 0, "p-1".into(), avro[..avro.len() / 2].to_vec()),
            (3, 0, "p-1".into(), avro.clone()),
        ],
    );

    let bad = poison.len() + 2;
    let dead = broker.read(&names.dead, PARTITIONS, bad, Duration::from_secs(30));
    assert_eq!(dead.len(), bad, "log:\n{}", service.logs());
    let mut kinds: Vec<String> = dead
        .iter()
        .map(|m| common::header(m, "leadscore.error.kind").unwrap())
        .collect();
    kinds.sort();
    let mut expected: Vec<String> = poison
        .iter()
        .map(|(k, _)| (*k).to_owned())
        .chain(["avro".to_owned(), "too_large".to_owned()])
        .collect();
    expected.sort();
    assert_eq!(kinds, expected);
    for m in &dead {
        assert!(!common::header(m, "leadscore.reason").unwrap().is_empty());
        assert!(
            common::header(m, "leadscore.source.offset")
                .unwrap()
                .parse::<i64>()
                .is_ok()
        );
    }
    let cut = dead
        .iter()
        .find(|m| m.key() == Some(b"huge"))
        .expect("the 1.04 MB message");
    assert_eq!(cut.payload().unwrap().len(), 65_536, "a cut copy");
    assert_eq!(
        common::header(cut, "leadscore.original.size").as_deref(),
        Some("1040000")
    );
    assert_eq!(
        common::header(cut, "leadscore.original.xxh3").map(|h| h.len()),
        Some(16)
    );
    let future_reason = dead
        .iter()
        .find(|m| {
            m.payload()
                .is_some_and(|p| p.windows(4).any(|w| w == b"\"t2\""))
        })
        .map(|m| common::header(m, "leadscore.reason").unwrap())
        .unwrap();
    assert!(
        future_reason.contains("after the message's broker timestamp"),
        "{future_reason}"
    );
    // Every message is accounted for: the good web events, the one after the
    // huge message, the whole CRM event, and the dead-lettered ones.
    service.wait_consumed((next_good + 2 + bad) as u64, Duration::from_secs(30));
    let (status, body) = service.get("/v1/leads/p-1").unwrap();
    assert_eq!(status, 200);
    assert!(body.contains("\"fit\":15.0"), "{body}");
    assert_eq!(
        service.get("/v1/leads/h").unwrap().0,
        200,
        "the partition moved past the huge message"
    );
    assert!(http_get(&service.http, "/healthz").is_some());
    assert!(service.terminate().success());
}
