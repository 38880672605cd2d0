//! The input side: a `BaseConsumer` polled in batches on a dedicated thread,
//! cooperative rebalancing that drains before giving partitions up, and
//! offsets committed only after the flush that covers them.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::KafkaResult;
use rdkafka::message::BorrowedMessage;
use rdkafka::statistics::Statistics;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, info_span, warn};

use crate::metrics::Metrics;
use crate::pipeline::{Durable, InMessage, PipelineError, Processor, SinkError};

/// Liveness and readiness, shared with the HTTP server.
#[derive(Debug, Default)]
pub struct Health {
    /// The consumer loop is running.
    pub running: AtomicBool,
    /// The last store call succeeded.
    pub store_up: AtomicBool,
    /// Partitions currently assigned.
    pub assigned: AtomicUsize,
    /// Wall ms of the loop's last turn.
    pub heartbeat_ms: AtomicI64,
}

impl Health {
    /// Ready to consume: running and the store answers.
    pub fn ready(&self) -> bool {
        self.running.load(Ordering::SeqCst) && self.store_up.load(Ordering::SeqCst)
    }

    /// Alive: the loop turned within `max_silence`.
    pub fn alive(&self, max_silence: Duration) -> bool {
        let last = self.heartbeat_ms.load(Ordering::SeqCst);
        last == 0 || crate::event::wall_clock_ms() - last <= max_silence.as_millis() as i64
    }

    fn set_store_up(&self, up: bool, metrics: &Metrics) {
        self.store_up.store(up, Ordering::SeqCst);
        metrics.redis_up.set(up as i64);
        metrics.ready.set(self.ready() as i64);
    }
}

/// Errors that stop the consumer (the process exits non-zero and restarts
/// from the last durable position).
#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    /// The Kafka client failed.
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// Outputs could not be delivered, so the state that produced them cannot be committed.
    #[error("outputs lost: {0}")]
    OutputsLost(String),
    /// The input topics are missing or not co-partitioned.
    #[error("input topics: {0}")]
    Topics(String),
    /// The state store stayed unavailable through a rebalance or shutdown drain.
    #[error("could not drain within the deadline: {0}")]
    Drain(String),
}

/// Consumer callbacks: rebalancing, commit results, statistics.
pub struct LeadscoreContext {
    processor: Arc<Mutex<Processor>>,
    metrics: Metrics,
    health: Arc<Health>,
    drain_timeout: Duration,
    followers: Mutex<Vec<String>>,
    fatal: Mutex<Option<ConsumerError>>,
}

impl LeadscoreContext {
    /// A context around the shared processor.
    pub fn new(
        processor: Arc<Mutex<Processor>>,
        metrics: Metrics,
        health: Arc<Health>,
        drain_timeout: Duration,
    ) -> Self {
        LeadscoreContext {
            processor,
            metrics,
            health,
            drain_timeout,
            followers: Mutex::new(Vec::new()),
            fatal: Mutex::new(None),
        }
    }

    /// The group assigns partitions of the first input topic only; partition
    /// `p` of every other input topic follows partition `p` of it, so one
    /// member owns all of a lead's events (its shard) and nobody else does.
    fn expand(&self, tpl: &TopicPartitionList) -> (Vec<(String, i32)>, TopicPartitionList) {
        let followers = self.followers.lock();
        let mut parts = Vec::new();
        for e in tpl.elements() {
            parts.push((e.topic().to_owned(), e.partition()));
            for f in followers.iter() {
                parts.push((f.clone(), e.partition()));
            }
        }
        let mut full = TopicPartitionList::with_capacity(parts.len());
        for (topic, partition) in &parts {
            full.add_partition(topic, *partition);
        }
        (parts, full)
    }

    fn assign(&self, consumer: &BaseConsumer<Self>, tpl: &TopicPartitionList) {
        let (parts, mut tpl) = self.expand(tpl);
        let deadline = Instant::now() + self.drain_timeout;
        let positions = loop {
            match self.processor.lock().assign(&parts) {
                Ok(p) => {
                    self.health.set_store_up(true, &self.metrics);
                    break p;
                }
                Err(error) => {
                    self.health.set_store_up(false, &self.metrics);
                    self.metrics
                        .redis_errors
                        .with_label_values(&["assign"])
                        .inc();
                    if Instant::now() > deadline {
                        // Without the stored positions the partitions cannot be read
                        // without double counting: give up and let the process restart.
                        *self.fatal.lock() = Some(ConsumerError::Drain(error.to_string()));
                        return;
                    }
                    warn!(%error, "Cannot read stored positions; retrying.");
                    std::thread::sleep(Duration::from_millis(500));
                }
            }
        };
        let resume: Vec<String> = parts
            .iter()
            .zip(&positions)
            .filter_map(|((t, p), o)| o.map(|o| format!("{t}/{p}@{o}")))
            .collect();
        for ((topic, partition), pos) in parts.iter().zip(positions) {
            if let Some(offset) = pos
                && let Err(error) =
                    tpl.set_partition_offset(topic, *partition, Offset::Offset(offset))
            {
                warn!(%error, topic, partition, "Cannot set the resume offset.");
            }
        }
        info!(
            partitions = parts.len(),
            ?resume,
            "Partitions assigned; resuming from the stored positions."
        );
        if let Err(error) = consumer.incremental_assign(&tpl) {
            *self.fatal.lock() = Some(error.into());
        }
        self.health
            .assigned
            .fetch_add(parts.len(), Ordering::SeqCst);
    }

    fn revoke(&self, consumer: &BaseConsumer<Self>, tpl: &TopicPartitionList) {
        let (parts, tpl) = self.expand(tpl);
        let lost = consumer.assignment_lost();
        let mut processor = self.processor.lock();
        if lost {
            // Someone else may already own them: drop unflushed state, commit nothing.
            warn!(
                partitions = parts.len(),
                "Partitions lost; dropping their unflushed state."
            );
            self.metrics.rebalances.with_label_values(&["lost"]).inc();
        } else {
            match drain(
                &mut processor,
                Instant::now() + self.drain_timeout,
                &self.health,
                &self.metrics,
            ) {
                Ok(durable) => commit(consumer, &durable, CommitMode::Sync, &self.metrics),
                Err(error) => {
                    error!(%error, "Could not flush before giving partitions up; the next owner resumes from the last durable position.");
                }
            }
        }
        processor.release(&parts);
        drop(processor);
        if let Err(error) = consumer.incremental_unassign(&tpl) {
            *self.fatal.lock() = Some(error.into());
        }
        self.health.assigned.fetch_sub(
            parts.len().min(self.health.assigned.load(Ordering::SeqCst)),
            Ordering::SeqCst,
        );
        info!(partitions = parts.len(), "Partitions revoked.");
    }
}

impl ClientContext for LeadscoreContext {
    fn stats(&self, statistics: Statistics) {
        for (topic, t) in &statistics.topics {
            for (partition, p) in &t.partitions {
                if *partition >= 0 && p.consumer_lag >= 0 {
                    self.metrics
                        .consumer_lag
                        .with_label_values(&[topic.as_str(), &partition.to_string()])
                        .set(p.consumer_lag);
                }
            }
        }
    }
}

impl ConsumerContext for LeadscoreContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                self.metrics.rebalances.with_label_values(&["assign"]).inc();
                self.assign(consumer, tpl);
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                self.metrics.rebalances.with_label_values(&["revoke"]).inc();
                self.revoke(consumer, tpl);
            }
            other => {
                error!(error = ?other, "Rebalance error.");
                self.metrics.rebalances.with_label_values(&["error"]).inc();
            }
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, _offsets: &TopicPartitionList) {
        match result {
            Ok(()) => self.metrics.commits.with_label_values(&["ok"]).inc(),
            Err(error) => {
                self.metrics.commits.with_label_values(&["error"]).inc();
                warn!(%error, "Offset commit failed; the next commit covers it.");
            }
        }
    }
}

fn is_fatal(error: &PipelineError) -> bool {
    matches!(
        error,
        PipelineError::Sink(SinkError::Produce(_)) | PipelineError::Writer
    )
}

/// Flushes until it succeeds, a fatal error occurs, or the deadline passes.
fn drain(
    processor: &mut Processor,
    deadline: Instant,
    health: &Health,
    metrics: &Metrics,
) -> Result<Durable, PipelineError> {
    let mut backoff = Duration::from_millis(50);
    loop {
        match processor.flush() {
            Ok(durable) => {
                health.set_store_up(true, metrics);
                return Ok(durable);
            }
            Err(error) if is_fatal(&error) || Instant::now() + backoff > deadline => {
                return Err(error);
            }
            Err(error) => {
                health.set_store_up(false, metrics);
                warn!(%error, "Flush failed; retrying.");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

fn commit<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    durable: &Durable,
    mode: CommitMode,
    metrics: &Metrics,
) {
    if durable.is_empty() {
        return;
    }
    let mut tpl = TopicPartitionList::with_capacity(durable.len());
    for (topic, partition, offset) in durable {
        if tpl
            .add_partition_offset(topic, *partition, Offset::Offset(*offset))
            .is_err()
        {
            return;
        }
    }
    if let Err(error) = consumer.commit(&tpl, mode) {
        metrics.commits.with_label_values(&["error"]).inc();
        warn!(%error, "Offset commit failed; the next commit covers it.");
    } else if matches!(mode, CommitMode::Sync) {
        metrics.commits.with_label_values(&["ok"]).inc();
    }
}

/// Every input topic must exist with the same partition count: a lead's
/// events are keyed to the same partition number in each.
fn check_copartitioned(
    consumer: &BaseConsumer<LeadscoreContext>,
    topics: &[&str],
) -> Result<(), ConsumerError> {
    let mut counts = Vec::new();
    for topic in topics {
        let meta = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
        let n = meta
            .topics()
            .iter()
            .find(|t| t.name() == *topic && t.error().is_none())
            .map_or(0, |t| t.partitions().len());
        counts.push((*topic, n));
    }
    let missing: Vec<&str> = counts
        .iter()
        .filter(|(_, n)| *n == 0)
        .map(|(t, _)| *t)
        .collect();
    if !missing.is_empty() {
        return Err(ConsumerError::Topics(format!(
            "{} do not exist; create them first (topics are never created automatically)",
            missing.join(", ")
        )));
    }
    if counts.windows(2).any(|w| w[0].1 != w[1].1) {
        let list: Vec<String> = counts.iter().map(|(t, n)| format!("{t}={n}")).collect();
        return Err(ConsumerError::Topics(format!(
            "must all have the same partition count, got {}",
            list.join(", ")
        )));
    }
    Ok(())
}

fn to_in<'a>(m: &'a BorrowedMessage<'a>) -> InMessage<'a> {
    InMessage {
        topic: m.topic(),
        partition: m.partition(),
        offset: m.offset(),
        key: m.key(),
        payload: m.payload(),
        timestamp: m.timestamp().to_millis(),
    }
}

/// Runs the consumer loop until `cancel` fires, then drains and commits.
pub fn run(
    consumer: &BaseConsumer<LeadscoreContext>,
    topics: &[&str],
    batch_max: usize,
    cancel: &CancellationToken,
) -> Result<(), ConsumerError> {
    let ctx = consumer.context();
    let processor = Arc::clone(&ctx.processor);
    let (metrics, health) = (ctx.metrics.clone(), Arc::clone(&ctx.health));
    let _span = info_span!("consumer").entered();
    check_copartitioned(consumer, topics)?;
    let (anchor, followers) = topics
        .split_first()
        .ok_or_else(|| ConsumerError::Topics("no input topics".into()))?;
    *ctx.followers.lock() = followers.iter().map(|t| (*t).to_owned()).collect();
    consumer.subscribe(&[anchor])?;
    health.running.store(true, Ordering::SeqCst);
    health.set_store_up(true, &metrics);
    info!(?topics, "Consuming.");
    let result = consume(consumer, &processor, batch_max, cancel, &metrics, &health);
    health.running.store(false, Ordering::SeqCst);
    metrics.ready.set(0);
    if let Err(error) = &result {
        error!(%error, "Consumer stopping on an unrecoverable error.");
        return result;
    }
    // Stop fetching, make everything durable, commit synchronously.
    info!("Draining before shutdown.");
    let deadline = Instant::now() + ctx.drain_timeout;
    let durable = drain(&mut processor.lock(), deadline, &health, &metrics)
        .map_err(|e| ConsumerError::Drain(e.to_string()))?;
    commit(consumer, &durable, CommitMode::Sync, &metrics);
    consumer.unsubscribe();
    // Serve the final revoke so the group rebalances at once.
    let until = Instant::now() + Duration::from_millis(500);
    while Instant::now() < until && health.assigned.load(Ordering::SeqCst) > 0 {
        if consumer.poll(Duration::from_millis(50)).is_some() {
            // Fetched after the drain; not processed and not committed.
        }
    }
    info!("Consumer stopped cleanly.");
    Ok(())
}

fn consume(
    consumer: &BaseConsumer<LeadscoreContext>,
    processor: &Mutex<Processor>,
    batch_max: usize,
    cancel: &CancellationToken,
    metrics: &Metrics,
    health: &Health,
) -> Result<(), ConsumerError> {
    let ctx = consumer.context();
    while !cancel.is_cancelled() {
        if let Some(error) = ctx.fatal.lock().take() {
            return Err(error);
        }
        health
            .heartbeat_ms
            .store(crate::event::wall_clock_ms(), Ordering::SeqCst);
        let mut msgs: Vec<BorrowedMessage<'_>> = Vec::new();
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => msgs.push(m),
            Some(Err(error)) => warn!(%error, "Consumer error."),
            None => {}
        }
        while !msgs.is_empty() && msgs.len() < batch_max {
            match consumer.poll(Duration::ZERO) {
                Some(Ok(m)) => msgs.push(m),
                Some(Err(error)) => {
                    warn!(%error, "Consumer error.");
                    break;
                }
                None => break,
            }
        }
        if !msgs.is_empty() {
            let batch: Vec<InMessage<'_>> = msgs.iter().map(to_in).collect();
            let mut backoff = Duration::from_millis(100);
            loop {
                let result = processor.lock().process(&batch);
                match result {
                    Ok(()) => break,
                    Err(error) if is_fatal(&error) => {
                        return Err(ConsumerError::OutputsLost(error.to_string()));
                    }
                    Err(error) => {
                        // The store is down: hold this batch and consume nothing
                        // more (memory stays bounded) until it answers again.
                        // librdkafka keeps the group session alive meanwhile.
                        health.set_store_up(false, metrics);
                        metrics.paused.set(1);
                        metrics.redis_errors.with_label_values(&["load"]).inc();
                        warn!(%error, "Cannot load lead state; holding the batch until the store answers.");
                        if !wait(cancel, &mut backoff) {
                            return Ok(());
                        }
                        health
                            .heartbeat_ms
                            .store(crate::event::wall_clock_ms(), Ordering::SeqCst);
                    }
                }
            }
            metrics.paused.set(0);
        }
        // Make state durable at the flush interval; while the store is down,
        // retry here instead of consuming more.
        let mut backoff = Duration::from_millis(100);
        let mut retrying = false;
        loop {
            let mut p = processor.lock();
            let mut finished = p.poll_flush();
            if finished.is_none() && (retrying || p.flush_due()) {
                finished = match p.start_flush() {
                    Ok(None) => None,
                    Ok(Some(durable)) => Some(Ok(durable)),
                    Err(error) => Some(Err(error)),
                };
            }
            match finished {
                None => break,
                Some(Ok(durable)) => {
                    drop(p);
                    health.set_store_up(true, metrics);
                    metrics.paused.set(0);
                    commit(consumer, &durable, CommitMode::Async, metrics);
                    break;
                }
                Some(Err(error)) if is_fatal(&error) => {
                    return Err(ConsumerError::OutputsLost(error.to_string()));
                }
                Some(Err(error)) => {
                    let backlog = p.dirty_len();
                    drop(p);
                    health.set_store_up(false, metrics);
                    metrics.paused.set(1);
                    warn!(%error, dirty = backlog, "Flush failed; holding consumption and offsets until it succeeds.");
                    retrying = true;
                    if !wait(cancel, &mut backoff) {
                        return Ok(());
                    }
                    health
                        .heartbeat_ms
                        .store(crate::event::wall_clock_ms(), Ordering::SeqCst);
                }
            }
        }
    }
    Ok(())
}

/// Sleeps `backoff` (doubling it up to 2 s); false if cancelled meanwhile.
fn wait(cancel: &CancellationToken, backoff: &mut Duration) -> bool {
    let until = Instant::now() + *backoff;
    while Instant::now() < until {
        if cancel.is_cancelled() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    *backoff = (*backoff * 2).min(Duration::from_secs(2));
    true
}
