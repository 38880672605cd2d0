//! Prometheus metrics, registered once. Names follow
//! `leadscore_<noun>_<unit>` with `_total` on counters; labels are
//! low-cardinality only (topic, partition, type, segment, source, channel,
//! reason, outcome), never a lead id or an error message. Counters whose
//! label values are known up front exist at zero from the start, so an alert
//! on their first increase can fire. Shards add their counts up per batch and
//! [`Metrics::absorb`] applies them, off the per-event path.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::engine::{Rules, Segment};
use crate::shard::StepStats;

/// All of leadscore's metrics.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Events decoded and scored, by topic and type.
    pub events_consumed: IntCounterVec,
    /// Payloads that failed to decode or validate, by topic and error kind.
    pub decode_failures: IntCounterVec,
    /// Messages written to the dead-letter topic, by source topic.
    pub dead_lettered: IntCounterVec,
    /// Events skipped because their id was seen, by topic.
    pub duplicates_skipped: IntCounterVec,
    /// Messages not applied: redelivered offsets.
    pub messages_skipped: IntCounter,
    /// Events applied after the shard's merge had moved past their time, by topic.
    pub late_events: IntCounterVec,
    /// Events applied in merge order but older than a shard's idle clock, by topic.
    pub events_behind_clock: IntCounterVec,
    /// Segment changes published, by from, to and reason.
    pub segment_changes: IntCounterVec,
    /// Hand-offs published.
    pub handoffs: IntCounter,
    /// Engagement events by event, channel, the lead's segment then, and its first-touch source.
    pub engagement_events: IntCounterVec,
    /// Output records acknowledged by the broker, by topic.
    pub outputs_produced: IntCounterVec,
    /// Output records the broker refused, by topic.
    pub produce_failures: IntCounterVec,
    /// Duration of one state write (output acks + Redis).
    pub flush_seconds: Histogram,
    /// Leads written per flush.
    pub flush_leads: Histogram,
    /// Failed Redis calls (retried), by operation.
    pub redis_errors: IntCounterVec,
    /// 1 while Redis answers.
    pub redis_up: IntGauge,
    /// Offset commits, by outcome.
    pub commits: IntCounterVec,
    /// Rebalance callbacks, by kind.
    pub rebalances: IntCounterVec,
    /// Writes refused because another member owns the shard now.
    pub shards_fenced: IntCounter,
    /// Lead lookups served from memory.
    pub cache_hits: IntCounter,
    /// Lead lookups that went to the store.
    pub cache_misses: IntCounter,
    /// Leads evicted from memory.
    pub cache_evictions: IntCounter,
    /// Leads (and visitors) expired by retention.
    pub leads_expired: IntCounter,
    /// Leads erased on request.
    pub leads_erased: IntCounter,
    /// Events dropped because their lead was erased after their time.
    pub events_after_erasure: IntCounter,
    /// Events with no message key, or with a lead id they are not keyed by, by topic.
    pub events_mis_keyed: IntCounterVec,
    /// Time to decode, score and produce one batch.
    pub batch_seconds: Histogram,
    /// Wall time from a message's broker timestamp until it was processed.
    pub processing_latency_seconds: Histogram,
    /// Consumer lag in messages, by topic and partition (owned partitions only).
    pub consumer_lag: IntGaugeVec,
    /// Shards owned by this instance.
    pub shards_owned: IntGauge,
    /// Wall clock minus each owned shard's watermark.
    pub watermark_lag_seconds: IntGaugeVec,
    /// Events held behind the watermark.
    pub merge_buffered: IntGauge,
    /// Leads held in memory.
    pub leads_in_memory: IntGauge,
    /// Bytes the lead cache takes (keys and states as allocated, bookkeeping and decay timers).
    pub cache_bytes: IntGauge,
    /// Leads changed since their last write.
    pub dirty_leads: IntGauge,
    /// Timers held in memory.
    pub timers_pending: IntGauge,
    /// Leads per segment in the shards this instance owns.
    pub segment_population: IntGaugeVec,
    /// 1 when ready to consume.
    pub ready: IntGauge,
    /// 1 while consumption is paused (state cannot be written).
    pub paused: IntGauge,
    /// Version information (value 1).
    pub build_info: IntGaugeVec,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: T) -> T {
    r.register(Box::new(c.clone()))
        .expect("each metric is registered once");
    c
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    reg(
        r,
        IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"),
    )
}

fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    reg(r, IntCounter::new(name, help).expect("valid metric"))
}

fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    reg(r, IntGauge::new(name, help).expect("valid metric"))
}

fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    reg(
        r,
        IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric"),
    )
}

fn histogram(r: &Registry, name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    reg(
        r,
        Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
            .expect("valid metric"),
    )
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Names used by the engagement metric's `event` label.
pub const ENGAGEMENT_EVENTS: [&str; 9] = [
    "delivered",
    "open",
    "click",
    "reply",
    "unsubscribe",
    "booking_started",
    "booking_completed",
    "purchase",
    "conversion",
];

impl Metrics {
    /// Registers every metric in a fresh registry (with process metrics).
    pub fn new() -> Self {
        let r = Registry::new();
        #[cfg(target_os = "linux")]
        {
            let pc = prometheus::process_collector::ProcessCollector::for_self();
            let _ = r.register(Box::new(pc));
        }
        let latency = vec![
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            30.0, 60.0,
        ];
        Metrics {
            events_consumed: counter_vec(
                &r,
                "leadscore_events_consumed_total",
                "Events decoded and scored, by topic and type.",
                &["topic", "type"],
            ),
            decode_failures: counter_vec(
                &r,
                "leadscore_decode_failures_total",
                "Payloads that failed to decode or validate, by topic and kind.",
                &["topic", "kind"],
            ),
            dead_lettered: counter_vec(
                &r,
                "leadscore_dead_lettered_total",
                "Messages sent to the dead-letter topic, by source topic.",
                &["topic"],
            ),
            duplicates_skipped: counter_vec(
                &r,
                "leadscore_duplicates_skipped_total",
                "Events skipped as already applied (same event id), by topic.",
                &["topic"],
            ),
            messages_skipped: counter(
                &r,
                "leadscore_messages_skipped_total",
                "Messages not applied because their offset was already applied (redelivered).",
            ),
            late_events: counter_vec(
                &r,
                "leadscore_late_events_total",
                "Events applied after the shard's merge had moved past their time (duplicates not counted), by topic.",
                &["topic"],
            ),
            events_behind_clock: counter_vec(
                &r,
                "leadscore_events_behind_clock_total",
                "Events applied in merge order but older than the shard's clock, which had followed the wall clock while every input was idle (a backfill; duplicates not counted), by topic.",
                &["topic"],
            ),
            segment_changes: counter_vec(
                &r,
                "leadscore_segment_changes_total",
                "Segment changes published, by from, to and reason.",
                &["from", "to", "reason"],
            ),
            handoffs: counter(
                &r,
                "leadscore_handoffs_total",
                "Hand-offs to sales published.",
            ),
            engagement_events: counter_vec(
                &r,
                "leadscore_engagement_events_total",
                "Engagement events by event, channel, the lead's segment at that moment and its first-touch source.",
                &["event", "channel", "segment", "source"],
            ),
            outputs_produced: counter_vec(
                &r,
                "leadscore_outputs_produced_total",
                "Output records acknowledged by the broker, by topic.",
                &["topic"],
            ),
            produce_failures: counter_vec(
                &r,
                "leadscore_produce_failures_total",
                "Output records the broker refused, by topic.",
                &["topic"],
            ),
            flush_seconds: histogram(
                &r,
                "leadscore_redis_flush_seconds",
                "Duration of one state write: output acknowledgements, then Redis.",
                latency.clone(),
            ),
            flush_leads: histogram(
                &r,
                "leadscore_redis_flush_leads",
                "Leads written per flush.",
                vec![1.0, 10.0, 100.0, 1000.0, 10_000.0, 100_000.0, 1_000_000.0],
            ),
            redis_errors: counter_vec(
                &r,
                "leadscore_redis_errors_total",
                "Failed Redis calls (retried), by operation.",
                &["op"],
            ),
            redis_up: gauge(&r, "leadscore_redis_up", "1 while Redis answers."),
            commits: counter_vec(
                &r,
                "leadscore_offset_commits_total",
                "Offset commits by outcome.",
                &["outcome"],
            ),
            rebalances: counter_vec(
                &r,
                "leadscore_rebalances_total",
                "Rebalance callbacks by kind.",
                &["kind"],
            ),
            shards_fenced: counter(
                &r,
                "leadscore_shards_fenced_total",
                "Shard writes refused because another member owns the shard now.",
            ),
            cache_hits: counter(
                &r,
                "leadscore_lead_cache_hits_total",
                "Lead lookups served from memory.",
            ),
            cache_misses: counter(
                &r,
                "leadscore_lead_cache_misses_total",
                "Lead lookups that went to Redis.",
            ),
            cache_evictions: counter(
                &r,
                "leadscore_lead_cache_evictions_total",
                "Leads evicted from memory (clean, reloaded on their next event).",
            ),
            leads_expired: counter(
                &r,
                "leadscore_leads_expired_total",
                "Leads and visitors deleted by retention.",
            ),
            leads_erased: counter(
                &r,
                "leadscore_leads_erased_total",
                "Lead states erased on request (a lead with state in several partitions counts once in each).",
            ),
            events_after_erasure: counter(
                &r,
                "leadscore_events_after_erasure_total",
                "Events dropped because their lead or visitor was erased after the event's time (a producer's retry, a late event).",
            ),
            events_mis_keyed: counter_vec(
                &r,
                "leadscore_events_mis_keyed_total",
                "Events with no message key, or with a lead id and another key (an email, a session id, the cookie): the producer's partitioner may send one lead's events to several partitions, each holding a state of its own. Counted as read.",
                &["topic"],
            ),
            batch_seconds: histogram(
                &r,
                "leadscore_batch_processing_seconds",
                "Time to decode, score and produce one batch.",
                latency.clone(),
            ),
            processing_latency_seconds: histogram(
                &r,
                "leadscore_processing_latency_seconds",
                "Wall time from a message's broker timestamp until it was processed.",
                latency,
            ),
            consumer_lag: gauge_vec(
                &r,
                "leadscore_consumer_lag_messages",
                "Consumer lag in messages, by topic and partition (partitions this instance owns).",
                &["topic", "partition"],
            ),
            shards_owned: gauge(
                &r,
                "leadscore_shards_owned",
                "Shards (partition numbers) owned by this instance.",
            ),
            watermark_lag_seconds: gauge_vec(
                &r,
                "leadscore_shard_watermark_lag_seconds",
                "Wall clock minus the shard's event-time watermark.",
                &["shard"],
            ),
            merge_buffered: gauge(
                &r,
                "leadscore_merge_buffered_events",
                "Events held behind the watermark.",
            ),
            leads_in_memory: gauge(&r, "leadscore_leads_in_memory", "Leads held in memory."),
            cache_bytes: gauge(
                &r,
                "leadscore_lead_cache_bytes",
                "Bytes the lead cache takes: each lead's key and state in the allocator's size class, its bookkeeping, and its decay timer.",
            ),
            dirty_leads: gauge(
                &r,
                "leadscore_dirty_leads",
                "Leads changed since their last write.",
            ),
            timers_pending: gauge(
                &r,
                "leadscore_decay_timers_pending",
                "Decay and lifecycle timers held in memory.",
            ),
            segment_population: gauge_vec(
                &r,
                "leadscore_segment_population_leads",
                "Leads per segment in the shards this instance owns.",
                &["segment"],
            ),
            ready: gauge(&r, "leadscore_ready", "1 when ready to consume."),
            paused: gauge(
                &r,
                "leadscore_consumption_paused",
                "1 while consumption is paused (state cannot be written).",
            ),
            build_info: gauge_vec(
                &r,
                "leadscore_build_info",
                "Version information.",
                &["version", "rules_version"],
            ),
            registry: r,
        }
    }

    /// Creates the series whose label values are known, at zero.
    pub fn init(&self, rules: &Rules, inputs: &[&str], outputs: &[&str]) {
        self.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION"), &rules.version])
            .set(1);
        for outcome in ["ok", "error"] {
            self.commits.with_label_values(&[outcome]);
        }
        for kind in ["assign", "revoke", "lost", "error", "retake"] {
            self.rebalances.with_label_values(&[kind]);
        }
        for op in ["load", "write", "assign", "timers", "http"] {
            self.redis_errors.with_label_values(&[op]);
        }
        for topic in inputs {
            self.dead_lettered.with_label_values(&[topic]);
            self.duplicates_skipped.with_label_values(&[topic]);
            self.late_events.with_label_values(&[topic]);
            self.events_behind_clock.with_label_values(&[topic]);
            self.events_mis_keyed.with_label_values(&[topic]);
            for kind in ["json", "avro", "registry", "contract", "too_large", "empty"] {
                self.decode_failures.with_label_values(&[topic, kind]);
            }
        }
        for topic in outputs {
            self.outputs_produced.with_label_values(&[topic]);
            self.produce_failures.with_label_values(&[topic]);
        }
        for segment in Segment::all_names(rules) {
            self.segment_population.with_label_values(&[segment]);
        }
    }

    /// Applies the counts of one batch of shard steps.
    pub fn absorb(&self, stats: &mut StepStats, topics: &[std::sync::Arc<str>], now_ms: i64) {
        let topic = |i: usize| topics.get(i).map_or("unknown", |t| &**t);
        for ((input, kind), n) in stats.consumed.drain() {
            self.events_consumed
                .with_label_values(&[topic(input), kind.as_str()])
                .inc_by(n);
        }
        for ((input, kind), n) in stats.dead.drain() {
            self.decode_failures
                .with_label_values(&[topic(input), kind])
                .inc_by(n);
            self.dead_lettered
                .with_label_values(&[topic(input)])
                .inc_by(n);
        }
        for (input, n) in stats.duplicates.drain() {
            self.duplicates_skipped
                .with_label_values(&[topic(input)])
                .inc_by(n);
        }
        for (input, n) in stats.late.drain() {
            self.late_events
                .with_label_values(&[topic(input)])
                .inc_by(n);
        }
        for (input, n) in stats.behind_clock.drain() {
            self.events_behind_clock
                .with_label_values(&[topic(input)])
                .inc_by(n);
        }
        for (input, n) in stats.mis_keyed.drain() {
            self.events_mis_keyed
                .with_label_values(&[topic(input)])
                .inc_by(n);
        }
        self.messages_skipped
            .inc_by(std::mem::take(&mut stats.skipped));
        for ((from, to, reason), n) in stats.changes.drain() {
            self.segment_changes
                .with_label_values(&[&from, &to, reason])
                .inc_by(n);
        }
        self.handoffs.inc_by(std::mem::take(&mut stats.handoffs));
        for ((event, channel, segment, source), n) in stats.engagement.drain() {
            self.engagement_events
                .with_label_values(&[event, &channel, &segment, &source])
                .inc_by(n);
        }
        self.cache_hits.inc_by(std::mem::take(&mut stats.hits));
        self.cache_misses.inc_by(std::mem::take(&mut stats.misses));
        self.cache_evictions
            .inc_by(std::mem::take(&mut stats.evicted));
        self.leads_expired
            .inc_by(std::mem::take(&mut stats.expired));
        self.leads_erased.inc_by(std::mem::take(&mut stats.erased));
        self.events_after_erasure
            .inc_by(std::mem::take(&mut stats.after_erasure));
        for ts in stats.latency_samples.drain(..) {
            self.processing_latency_seconds
                .observe((now_ms - ts).max(0) as f64 / 1000.0);
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding cannot fail");
        String::from_utf8(buf).expect("text format is UTF-8")
    }
}

/// The sum of a metric's samples (every label set of a counter or a gauge)
/// in a Prometheus text exposition.
pub fn sum_samples(text: &str, name: &str) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_text_format_with_known_series_at_zero() {
        let m = Metrics::new();
        m.init(
            &Rules::default_rules(),
            &["events.web"],
            &["leads.segment-changes"],
        );
        m.events_consumed
            .with_label_values(&["events.web", "page_view"])
            .inc();
        m.handoffs.inc();
        let text = m.render();
        assert!(text.contains("# TYPE leadscore_events_consumed_total counter"));
        assert!(text.contains(
            "leadscore_events_consumed_total{topic=\"events.web\",type=\"page_view\"} 1"
        ));
        assert!(text.contains("leadscore_handoffs_total 1"));
        assert!(text.contains("leadscore_offset_commits_total{outcome=\"error\"} 0"));
        assert!(text.contains("leadscore_segment_population_leads{segment=\"resting\"} 0"));
        assert!(text.contains("leadscore_build_info{"));
        assert!(
            text.contains("process_resident_memory_bytes"),
            "process metrics"
        );
        assert_eq!(sum_samples(&text, "leadscore_handoffs_total"), 1);
    }
}
