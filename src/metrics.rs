//! Prometheus metrics, registered once. Names follow
//! `leadscore_<noun>_<unit>` with `_total` on counters; labels are
//! low-cardinality only (topic, type, segment, reason, outcome), never a lead id.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// All of leadscore's metrics.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Events decoded and handed to the engine, by topic and type.
    pub events_consumed: IntCounterVec,
    /// Payloads that failed to decode or validate, by topic and error kind.
    pub decode_failures: IntCounterVec,
    /// Messages written to the dead-letter topic, by source topic.
    pub dead_lettered: IntCounterVec,
    /// Events skipped because their id was seen (redelivery or re-produce), by topic.
    pub duplicates_skipped: IntCounterVec,
    /// Segment transitions published, by from, to and reason.
    pub segment_changes: IntCounterVec,
    /// Hand-offs published.
    pub handoffs: IntCounter,
    /// Output records acknowledged by the broker, by topic.
    pub outputs_produced: IntCounterVec,
    /// Output records the broker failed to take.
    pub produce_failures: IntCounter,
    /// Messages not applied: already applied (below the partition's position) or from a released partition.
    pub messages_skipped: IntCounter,
    /// Duration of one state flush (produce acks + Redis write + commit).
    pub flush_seconds: Histogram,
    /// Leads written per flush.
    pub flush_leads: Histogram,
    /// Redis calls that failed and will be retried, by operation.
    pub redis_errors: IntCounterVec,
    /// 1 while Redis answers, 0 while it does not.
    pub redis_up: IntGauge,
    /// Offset commits, by outcome.
    pub commits: IntCounterVec,
    /// Rebalance callbacks, by kind (assign, revoke, lost).
    pub rebalances: IntCounterVec,
    /// Time to decode, score and produce one poll batch.
    pub batch_seconds: Histogram,
    /// Wall time from a message's broker timestamp until its batch was processed.
    pub processing_latency_seconds: Histogram,
    /// Consumer lag in messages, by topic and partition (from librdkafka statistics).
    pub consumer_lag: IntGaugeVec,
    /// Leads held in memory.
    pub leads_in_memory: IntGauge,
    /// Leads changed since the last flush.
    pub dirty_leads: IntGauge,
    /// Leads in memory per segment.
    pub segment_population: IntGaugeVec,
    /// Pending decay timers.
    pub timers_pending: IntGauge,
    /// 1 when the service is ready to consume.
    pub ready: IntGauge,
    /// Consumption paused because state cannot be written.
    pub paused: IntGauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(c.clone())).expect("registered once");
    c
}

fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("valid metric");
    r.register(Box::new(c.clone())).expect("registered once");
    c
}

fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("valid metric");
    r.register(Box::new(g.clone())).expect("registered once");
    g
}

fn histogram(r: &Registry, name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
        .expect("valid metric");
    r.register(Box::new(h.clone())).expect("registered once");
    h
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric in a fresh registry.
    pub fn new() -> Self {
        let r = Registry::new();
        let latency = vec![
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ];
        let consumer_lag = IntGaugeVec::new(
            Opts::new(
                "leadscore_consumer_lag_messages",
                "Consumer lag in messages by topic and partition.",
            ),
            &["topic", "partition"],
        )
        .expect("valid metric");
        r.register(Box::new(consumer_lag.clone()))
            .expect("registered once");
        let segment_population = IntGaugeVec::new(
            Opts::new(
                "leadscore_segment_population_leads",
                "Leads in memory per segment.",
            ),
            &["segment"],
        )
        .expect("valid metric");
        r.register(Box::new(segment_population.clone()))
            .expect("registered once");
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
                "Events skipped as already applied, by topic.",
                &["topic"],
            ),
            segment_changes: counter_vec(
                &r,
                "leadscore_segment_changes_total",
                "Segment transitions published, by from, to and reason.",
                &["from", "to", "reason"],
            ),
            handoffs: counter(
                &r,
                "leadscore_handoffs_total",
                "Hand-offs to sales published.",
            ),
            outputs_produced: counter_vec(
                &r,
                "leadscore_outputs_produced_total",
                "Output records acknowledged by the broker, by topic.",
                &["topic"],
            ),
            produce_failures: counter(
                &r,
                "leadscore_produce_failures_total",
                "Output records the broker failed to take.",
            ),
            messages_skipped: counter(
                &r,
                "leadscore_messages_skipped_total",
                "Messages not applied: below their partition's position (already applied) or polled from a partition since given up.",
            ),
            flush_seconds: histogram(
                &r,
                "leadscore_redis_flush_seconds",
                "Duration of one state flush to Redis.",
                latency.clone(),
            ),
            flush_leads: histogram(
                &r,
                "leadscore_redis_flush_leads",
                "Leads written per flush.",
                vec![1.0, 10.0, 100.0, 1000.0, 10_000.0, 100_000.0],
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
            batch_seconds: histogram(
                &r,
                "leadscore_batch_processing_seconds",
                "Time to decode, score and produce one poll batch.",
                latency.clone(),
            ),
            processing_latency_seconds: histogram(
                &r,
                "leadscore_processing_latency_seconds",
                "Wall time from the broker timestamp of a message to its processing.",
                latency,
            ),
            consumer_lag,
            leads_in_memory: gauge(&r, "leadscore_leads_in_memory", "Leads held in memory."),
            dirty_leads: gauge(
                &r,
                "leadscore_dirty_leads",
                "Leads changed since the last flush.",
            ),
            segment_population,
            timers_pending: gauge(
                &r,
                "leadscore_decay_timers_pending",
                "Scheduled decay and lifecycle timers.",
            ),
            ready: gauge(&r, "leadscore_ready", "1 when ready to consume."),
            paused: gauge(
                &r,
                "leadscore_consumption_paused",
                "1 while consumption is paused (state cannot be written).",
            ),
            registry: r,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_text_format() {
        let m = Metrics::new();
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
    }
}
