//! The consumer group: one `BaseConsumer` whose thread serves rebalances,
//! statistics and commit results, while every assigned partition's messages
//! go to a queue of its own, read by the worker that owns the shard.
//!
//! * Assignment (cooperative-sticky): the group assigns partitions of the
//!   first input topic; partition `p` of every other input follows, so one
//!   member owns all of shard `p`'s inputs. For each new shard the callback
//!   takes the shard's owner epoch in the store, reads its positions, splits
//!   its partitions' queues off, hands the shard to its worker, and only then
//!   assigns the partitions at the stored positions. Timers are not read
//!   here: the shard pages them in as its clock advances.
//! * Revocation: the owning workers write what the shards hold (bounded by
//!   the drain deadline, below the session timeout), the stored offsets are
//!   committed synchronously, then the partitions are released. Lost
//!   partitions (another member may own them already) are dropped unwritten.
//! * Offsets: workers store the offsets their durable writes cover; this
//!   thread commits them every second and the revocation synchronously.
//! * Shutdown: unsubscribe (the revocation drains and commits), let the
//!   LeaveGroup go out, close the consumer: the group rebalances at once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::statistics::Statistics;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};
use tracing::{error, info, info_span, warn};

use super::runtime::Runtime;
use super::worker::{Control, Wake};
use crate::shard::Shard;
use crate::store::{ShardId, Store};
use crate::writer::Policy;

/// How the consumer thread reaches a worker: its control channel and its wake-up.
type WorkerHandle = (Sender<Control>, Arc<Wake>);

/// Errors that stop the consumer.
#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    /// The Kafka client failed.
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// Topics are missing or not co-partitioned.
    #[error("topics: {0}")]
    Topics(String),
    /// A part of the service stopped on an error.
    #[error("{0}")]
    Fatal(String),
    /// The stop's drain gave shards up before their state was written
    /// (Redis did not answer in time). Nothing is lost: committed offsets
    /// never pass what Redis holds.
    #[error(
        "stopped without writing every shard within shutdown.drain_timeout_ms ({} ms): {unwritten} given up unwritten{}; \
         nothing is lost, the next start resumes from the positions in Redis",
        drain_timeout.as_millis(),
        if held.is_empty() { String::new() } else { format!(", {held:?} still draining") }
    )]
    DrainIncomplete {
        /// The drain's deadline.
        drain_timeout: Duration,
        /// Shards given up with unwritten state.
        unwritten: usize,
        /// Shards whose worker had not finished draining.
        held: Vec<ShardId>,
    },
}

/// Set once the service has begun closing its consumer itself, at shutdown
/// (bounded by a deadline). rdkafka's `BaseConsumer` closes once more when
/// its last handle drops, and logs librdkafka's refusal at ERROR ("Failed to
/// close consumer queue on drop: … BrokerDestroy"): on every clean shutdown,
/// an error that is not one. [`is_redundant_close_error`] lets the log
/// filter drop it.
static CLOSED: AtomicBool = AtomicBool::new(false);

/// Whether a log event is rdkafka's complaint that a consumer the service
/// has already closed cannot be closed again on drop. ERROR is the level of
/// that one message in rdkafka's consumer module (0.39), and it is dropped
/// only after the service closed its consumer.
pub fn is_redundant_close_error(meta: &tracing::Metadata<'_>) -> bool {
    CLOSED.load(Ordering::Relaxed)
        && *meta.level() == tracing::Level::ERROR
        && meta.target() == "rdkafka::consumer::base_consumer"
}

/// A shard taken in the store, with its split queues and where to resume.
struct Taken {
    shard: Shard,
    queues: Vec<Queue>,
    /// Per input topic: the stored position, or the group's committed offset.
    resume: Vec<(Arc<str>, Offset)>,
}

type Queue = super::batch::BatchQueue<GroupContext>;

/// The consumer's callbacks.
pub struct GroupContext {
    rt: Arc<Runtime>,
    store: Arc<dyn Store>,
    me: OnceLock<Weak<BaseConsumer<GroupContext>>>,
    workers: OnceLock<Vec<WorkerHandle>>,
    drain_timeout: Duration,
    /// How long after a fence a shard the group still assigns here is taken again.
    fence_grace: Duration,
}

impl GroupContext {
    /// Callbacks over `rt`, taking shards in `store`. A shard fenced while
    /// the group still assigns it here is taken again after `fence_grace`
    /// (the consumer's session timeout: long enough for the group to have
    /// moved it, had it moved it).
    pub fn new(
        rt: Arc<Runtime>,
        store: Arc<dyn Store>,
        drain_timeout: Duration,
        fence_grace: Duration,
    ) -> Self {
        GroupContext {
            rt,
            store,
            me: OnceLock::new(),
            workers: OnceLock::new(),
            drain_timeout,
            fence_grace,
        }
    }

    /// Lets the callbacks reach the consumer (to split queues) and the workers.
    pub fn attach(&self, consumer: &Arc<BaseConsumer<GroupContext>>, workers: Vec<WorkerHandle>) {
        let _ = self.me.set(Arc::downgrade(consumer));
        let _ = self.workers.set(workers);
    }

    fn worker_of(&self, shard: ShardId) -> Option<&WorkerHandle> {
        let w = self.workers.get()?;
        w.get(shard.unsigned_abs() as usize % w.len().max(1))
    }

    /// The full list of input partitions of these shards.
    fn partitions(&self, shards: &[ShardId]) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::with_capacity(shards.len() * self.rt.inputs.len());
        for p in shards {
            for t in self.rt.inputs.iter() {
                tpl.add_partition(t, *p);
            }
        }
        tpl
    }

    fn assign(&self, consumer: &BaseConsumer<Self>, shards: &[ShardId]) {
        let mut tpl = TopicPartitionList::with_capacity(shards.len() * self.rt.inputs.len());
        let mut resume = Vec::new();
        // One deadline for the whole callback (settings keep the drain
        // timeout within half of max.poll.interval.ms): past it the member
        // stops with an error rather than being dropped by the group.
        let deadline = Instant::now() + self.drain_timeout;
        for &p in shards {
            self.rt.forget_fenced(p);
            let Some(taken) = self.take(consumer, p, deadline) else {
                return;
            };
            for (t, offset) in taken.resume {
                if let Offset::Offset(o) = offset {
                    resume.push(format!("{t}/{p}@{o}"));
                }
                if let Err(e) = tpl.add_partition_offset(&t, p, offset) {
                    warn!(error = %e, topic = &*t, partition = p, "Cannot set the resume offset.");
                }
            }
            if !self.hand_over(taken.shard, taken.queues) {
                return;
            }
        }
        info!(shards = ?shards, ?resume, "Shards assigned; resuming from the stored positions.");
        if let Err(e) = consumer.incremental_assign(&tpl) {
            self.rt.fail(format!("incremental assign failed: {e}"));
        }
    }

    /// Takes shard `p` in the store (retrying until `deadline` while it does
    /// not answer) and splits its partitions' queues off. `None` after a
    /// fatal error, which it records.
    fn take(&self, consumer: &BaseConsumer<Self>, p: ShardId, deadline: Instant) -> Option<Taken> {
        let Some(me) = self.me.get().and_then(Weak::upgrade) else {
            self.rt.fail("rebalance before the consumer was attached");
            return None;
        };
        let mut policy = Policy::default();
        let meta = loop {
            match self.store.take_shard(p) {
                Ok(m) => {
                    self.rt.set_store_up();
                    break m;
                }
                Err(e) if Instant::now() < deadline && e.retryable() => {
                    self.rt.set_store_down(&e);
                    self.rt
                        .metrics
                        .redis_errors
                        .with_label_values(&["assign"])
                        .inc();
                    warn!(error = %e, shard = p, "Cannot take the shard in the store; retrying.");
                    std::thread::sleep(policy.backoff());
                }
                Err(e) => {
                    // Without its positions the shard cannot be read without double counting.
                    self.rt
                        .fail(format!("cannot take shard {p} in the store: {e}"));
                    return None;
                }
            }
        };
        if meta.fresh
            && let Some(committed) = self.committed(consumer, p)
        {
            self.rt.fail(format!(
                "state lost: Redis has no state for shard {p} (partition {p} of the input topics), but the \
                 consumer group has committed offsets for it ({committed}). Redis was flushed, evicted keys \
                 (a maxmemory-policy other than noeviction), or failed \
                 over to an empty replica, or redis.key_prefix changed. Restore Redis from a backup or \
                 the replica that has the data (runbook: State lost). Rescoring from scratch instead \
                 takes a consumer group with no committed offsets (a new kafka.group_id, or the group \
                 deleted): resetting the group's offsets is not enough, they stay committed."
            ));
            return None;
        }
        let shard = Shard::new(
            p,
            &meta,
            Arc::clone(&self.rt.inputs),
            Arc::clone(&self.rt.sources),
            self.rt.shard_config,
        );
        let mut queues = Vec::with_capacity(self.rt.inputs.len());
        let mut resume = Vec::with_capacity(self.rt.inputs.len());
        for (i, t) in self.rt.inputs.iter().enumerate() {
            let Some(q) = Queue::split(&me, t, p) else {
                self.rt.fail(format!("cannot split the queue of {t}/{p}"));
                return None;
            };
            queues.push(q);
            let offset = shard.position(i).map_or(Offset::Stored, Offset::Offset);
            resume.push((Arc::clone(t), offset));
        }
        Some(Taken {
            shard,
            queues,
            resume,
        })
    }

    /// Gives a taken shard to its worker; false after a fatal error.
    fn hand_over(&self, shard: Shard, queues: Vec<Queue>) -> bool {
        let Some((control, wake)) = self.worker_of(shard.id()) else {
            self.rt.fail("no worker to take the shard");
            return false;
        };
        if control
            .send(Control::Add {
                shard: Box::new(shard),
                queues,
            })
            .is_err()
        {
            self.rt.fail("a worker stopped");
            return false;
        }
        wake.notify();
        true
    }

    /// Takes again a shard that a worker dropped because another member
    /// took it in the store, but whose partitions the group still assigns
    /// here a session timeout later: otherwise nobody would read them until
    /// this member restarted (the group counts them as read here). The
    /// partitions are rewound to the positions in the store, so that
    /// nothing applied but not yet durable is skipped. If another member
    /// does own them too (two deployments on one key prefix, or a broker
    /// that assigned them twice), the two take turns, each fencing the
    /// other; every write stays fenced by the owner epoch.
    fn retake(&self, consumer: &BaseConsumer<Self>, p: ShardId) {
        warn!(
            shard = p,
            "A shard fenced a session timeout ago is still assigned here; taking it again."
        );
        let deadline = Instant::now() + self.drain_timeout;
        let Some(Taken {
            shard,
            queues,
            resume,
        }) = self.take(consumer, p, deadline)
        else {
            return;
        };
        let mut tpl = TopicPartitionList::with_capacity(resume.len());
        for (t, offset) in resume {
            // Never stored: read from the start, as a first assignment would
            // (auto.offset.reset = earliest; nothing was committed for it).
            let offset = match offset {
                Offset::Stored => Offset::Beginning,
                o => o,
            };
            if let Err(e) = tpl.add_partition_offset(&t, p, offset) {
                warn!(error = %e, topic = &*t, partition = p, "Cannot set the rewind offset.");
            }
        }
        if let Err(e) = consumer.seek_partitions(tpl, Duration::from_secs(10)) {
            warn!(error = %e, shard = p, "Cannot rewind the shard's partitions; trying again later.");
            self.rt.report_fenced(p);
            return;
        }
        self.rt
            .metrics
            .rebalances
            .with_label_values(&["retake"])
            .inc();
        self.hand_over(shard, queues);
    }

    /// Shards fenced a session timeout ago that the group still assigns here.
    fn retake_fenced(&self, consumer: &BaseConsumer<Self>) {
        let due = self.rt.fenced_for(self.fence_grace);
        if due.is_empty() {
            return;
        }
        let Some(anchor) = self.rt.inputs.first() else {
            return;
        };
        let assigned = consumer.assignment().unwrap_or_default();
        for p in due {
            if assigned.find_partition(anchor, p).is_some()
                && !self.rt.caches.read().contains_key(&p)
            {
                self.retake(consumer, p);
            }
        }
    }

    /// The group's committed offsets for shard `p`'s partitions, if any.
    fn committed(&self, consumer: &BaseConsumer<Self>, p: ShardId) -> Option<String> {
        let got = consumer
            .committed_offsets(self.partitions(&[p]), Duration::from_secs(10))
            .ok()?;
        let list: Vec<String> = got
            .elements()
            .iter()
            .filter_map(|e| match e.offset() {
                Offset::Offset(o) if o >= 0 => Some(format!("{}/{}@{o}", e.topic(), e.partition())),
                _ => None,
            })
            .collect();
        (!list.is_empty()).then(|| list.join(", "))
    }

    fn revoke(&self, consumer: &BaseConsumer<Self>, shards: &[ShardId]) {
        for &p in shards {
            self.rt.forget_fenced(p);
        }
        let lost = consumer.assignment_lost() || self.rt.failed();
        let deadline = Instant::now() + self.drain_timeout;
        // One message per worker with all its shards: a worker drains them
        // in one write, so a Redis that does not answer costs the deadline
        // once, not one store timeout per shard after it.
        let mut by_worker: Vec<(&WorkerHandle, Vec<ShardId>)> = Vec::new();
        for &p in shards {
            let Some(worker) = self.worker_of(p) else {
                continue;
            };
            match by_worker.iter_mut().find(|(w, _)| std::ptr::eq(*w, worker)) {
                Some((_, ids)) => ids.push(p),
                None => by_worker.push((worker, vec![p])),
            }
        }
        let mut waits = Vec::new();
        for ((control, wake), ids) in by_worker {
            let (tx, rx) = crossbeam_channel::bounded(1);
            let msg = if lost {
                Control::Drop {
                    shards: ids,
                    done: tx,
                }
            } else {
                Control::Drain {
                    shards: ids,
                    deadline,
                    done: tx,
                }
            };
            if control.send(msg).is_ok() {
                wake.notify();
                waits.push(rx);
            }
        }
        for rx in waits {
            let left = deadline.saturating_duration_since(Instant::now()) + Duration::from_secs(1);
            if rx.recv_timeout(left).is_err() {
                error!(
                    "A worker did not finish draining in time; its shards' next owner resumes from the last durable position."
                );
            }
        }
        if lost {
            warn!(shards = ?shards, "Partitions lost; their unwritten state was dropped.");
            self.rt
                .metrics
                .rebalances
                .with_label_values(&["lost"])
                .inc();
        } else {
            commit(consumer, &self.rt, "on revoke");
        }
        let tpl = self.partitions(shards);
        if let Err(e) = consumer.incremental_unassign(&tpl) {
            self.rt.fail(format!("incremental unassign failed: {e}"));
        }
        let mut lag = self.rt.lag.lock();
        for p in shards {
            for (input, t) in self.rt.inputs.iter().enumerate() {
                lag.remove(&(input, *p));
                let _ = self
                    .rt
                    .metrics
                    .consumer_lag
                    .remove_label_values(&[&**t, &p.to_string()]);
            }
        }
        info!(shards = ?shards, "Shards revoked.");
    }
}

impl ClientContext for GroupContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        super::client_log::client_log(level, fac, message);
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        super::client_log::client_error(&error, reason);
    }

    fn stats(&self, statistics: Statistics) {
        let owned = self.rt.caches.read();
        let mut lag = self.rt.lag.lock();
        for (topic, t) in &statistics.topics {
            let Some(input) = self.rt.inputs.iter().position(|i| **i == **topic) else {
                continue;
            };
            for (partition, p) in &t.partitions {
                if *partition < 0 || !owned.contains_key(partition) {
                    continue;
                }
                // What the broker has that this consumer has not fetched yet.
                if p.hi_offset >= 0 && p.next_offset >= 0 {
                    lag.insert((input, *partition), (p.hi_offset - p.next_offset).max(0));
                }
                // Behind the group's committed offset; a partition the group
                // never committed is read from its start (auto.offset.reset =
                // earliest), so its whole log is the lag.
                let committed_lag = if p.consumer_lag >= 0 {
                    Some(p.consumer_lag)
                } else if p.committed_offset < 0 && p.hi_offset >= 0 && p.lo_offset >= 0 {
                    Some(p.hi_offset - p.lo_offset)
                } else {
                    None
                };
                if let Some(value) = committed_lag {
                    self.rt
                        .metrics
                        .consumer_lag
                        .with_label_values(&[topic.as_str(), &partition.to_string()])
                        .set(value);
                }
            }
        }
    }
}

impl ConsumerContext for GroupContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let anchor = self
            .rt
            .inputs
            .first()
            .map(|t| t.to_string())
            .unwrap_or_default();
        let mut shards: Vec<ShardId> = tpl
            .elements()
            .iter()
            .filter(|e| e.topic() == anchor)
            .map(|e| e.partition())
            .collect();
        shards.sort_unstable();
        shards.dedup();
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                self.rt
                    .metrics
                    .rebalances
                    .with_label_values(&["assign"])
                    .inc();
                self.assign(consumer, &shards);
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                self.rt
                    .metrics
                    .rebalances
                    .with_label_values(&["revoke"])
                    .inc();
                self.revoke(consumer, &shards);
            }
            other => {
                error!(error = ?other, "Rebalance error.");
                self.rt
                    .metrics
                    .rebalances
                    .with_label_values(&["error"])
                    .inc();
            }
        }
    }
}

/// How long the start waits for the brokers to describe a topic.
const METADATA_WAIT: Duration = Duration::from_secs(10);

/// Checks the topics: every input exists with the same partition count (a
/// lead's events are keyed to the same partition number in each), and every
/// output exists. `None` if `stopping` said to stop while it waited for the
/// brokers (a signal during the start is answered within a second).
pub fn check_topics(
    consumer: &BaseConsumer<GroupContext>,
    inputs: &[&str],
    outputs: &[&str],
    stopping: impl Fn() -> bool,
) -> Result<Option<i32>, ConsumerError> {
    let mut counts = Vec::new();
    let mut missing = Vec::new();
    let deadline = Instant::now() + METADATA_WAIT;
    for topic in inputs.iter().chain(outputs) {
        let meta = loop {
            let attempt = Instant::now();
            let left = deadline.saturating_duration_since(attempt);
            match consumer.fetch_metadata(Some(topic), left.min(Duration::from_secs(1))) {
                Ok(meta) => break meta,
                Err(_) if stopping() => return Ok(None),
                Err(e) if Instant::now() >= deadline => {
                    return Err(ConsumerError::Topics(format!(
                        "cannot read {topic}'s metadata from the brokers in {} s ({e}); check kafka.brokers and that they are reachable",
                        METADATA_WAIT.as_secs()
                    )));
                }
                // An attempt that failed at once is not retried in a spin.
                Err(_) => {
                    std::thread::sleep(Duration::from_millis(100).saturating_sub(attempt.elapsed()))
                }
            }
        };
        let n = meta
            .topics()
            .iter()
            .find(|t| t.name() == *topic && t.error().is_none())
            .map_or(0, |t| t.partitions().len());
        if n == 0 {
            missing.push(*topic);
        } else if inputs.contains(topic) {
            counts.push((*topic, n));
        }
    }
    if !missing.is_empty() {
        return Err(ConsumerError::Topics(format!(
            "{} do not exist; create them first (topics are never created automatically)",
            missing.join(", ")
        )));
    }
    if counts.windows(2).any(|w| w[0].1 != w[1].1) {
        let list: Vec<String> = counts.iter().map(|(t, n)| format!("{t}={n}")).collect();
        return Err(ConsumerError::Topics(format!(
            "the input topics must all have the same partition count (they are co-partitioned by lead id), got {}",
            list.join(", ")
        )));
    }
    Ok(Some(counts.first().map_or(0, |(_, n)| *n as i32)))
}

/// Commits the stored offsets and waits for the answer, which it counts in
/// `leadscore_offset_commits_total` (every commit leadscore makes goes
/// through here: librdkafka reports no other).
fn commit(consumer: &BaseConsumer<GroupContext>, rt: &Runtime, when: &str) {
    match consumer.commit_consumer_state(CommitMode::Sync) {
        Ok(()) => rt.metrics.commits.with_label_values(&["ok"]).inc(),
        // Nothing stored since the last commit.
        Err(e) if e.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::NoOffset) => {}
        Err(e) => {
            rt.metrics.commits.with_label_values(&["error"]).inc();
            warn!(error = %e, when, "Offset commit failed; the next commit covers it.");
        }
    }
}

/// Commits the offsets the workers stored (each covered by a durable
/// write) once a second, on a thread of its own. Each commit waits for the
/// broker's answer, which is how its outcome is counted: librdkafka hands
/// an asynchronous commit's result only to an `offset_commit_cb`, which the
/// rdkafka crate does not set, so with `CommitMode::Async` no outcome came
/// back and `leadscore_offset_commits_total{outcome="ok"}` stayed 0 (a user
/// probe). A broker that does not answer holds this thread, not the
/// consumer loop.
struct Committer {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Committer {
    fn spawn(consumer: &Arc<BaseConsumer<GroupContext>>, rt: &Arc<Runtime>) -> Committer {
        let stop = Arc::new(AtomicBool::new(false));
        let (consumer, rt, stopping) = (consumer.clone(), rt.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("commit".into())
            .spawn(move || {
                while !stopping.load(Ordering::SeqCst) {
                    let next = Instant::now() + Duration::from_secs(1);
                    while Instant::now() < next && !stopping.load(Ordering::SeqCst) {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    if stopping.load(Ordering::SeqCst) {
                        break;
                    }
                    commit(&consumer, &rt, "periodic");
                }
            })
            .ok();
        if thread.is_none() {
            warn!(
                "Cannot start the commit thread; offsets are committed only as partitions are released."
            );
        }
        Committer { stop, thread }
    }

    /// Stops the thread once its commit in flight, if any, has its answer
    /// (or after 2 s: a broker that does not answer must not hold the drain).
    fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let Some(t) = self.thread.take() else {
            return;
        };
        let until = Instant::now() + Duration::from_secs(2);
        while !t.is_finished() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(10));
        }
        if t.is_finished() {
            let _ = t.join();
        }
    }
}

impl Drop for Committer {
    /// A loop that ends in failure stops the thread too (without waiting).
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Runs the consumer loop until cancelled or failed, then leaves the group
/// (the final revocation drains and commits).
pub fn run(
    consumer: &Arc<BaseConsumer<GroupContext>>,
    rt: &Arc<Runtime>,
    outputs: &[&str],
    workers: &[WorkerHandle],
    drain_timeout: Duration,
) -> Result<(), ConsumerError> {
    let _span = info_span!("consumer").entered();
    let inputs: Vec<&str> = rt.inputs.iter().map(|t| &**t).collect();
    let Some(partitions) = check_topics(consumer, &inputs, outputs, || rt.stopping())? else {
        if let Some(f) = rt.fatal() {
            return Err(ConsumerError::Fatal(f));
        }
        info!("Stopped before consuming.");
        return Ok(());
    };
    rt.set_partitions(partitions);
    let anchor = inputs
        .first()
        .ok_or_else(|| ConsumerError::Topics("no input topics".into()))?;
    consumer.subscribe(&[anchor])?;
    rt.health
        .running
        .store(true, std::sync::atomic::Ordering::SeqCst);
    rt.set_store_up();
    info!(topics = ?inputs, "Consuming.");
    let segments: Vec<String> = crate::engine::Segment::all_names(rt.engine.rules())
        .into_iter()
        .map(str::to_owned)
        .collect();
    let segment_refs: Vec<&str> = segments.iter().map(String::as_str).collect();
    let mut last_gauges = Instant::now();
    let committer = Committer::spawn(consumer, rt);
    while !rt.cancel().is_cancelled() {
        rt.health.heartbeat_ms.store(
            crate::event::wall_clock_ms(),
            std::sync::atomic::Ordering::SeqCst,
        );
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                // Queues are split before assignment; forward a stray anyway.
                let owned = m.detach();
                if let Some((tx, wake)) =
                    workers.get(owned.partition().unsigned_abs() as usize % workers.len().max(1))
                {
                    let _ = tx.send(Control::Message(owned));
                    wake.notify();
                }
            }
            Some(Err(e)) => warn!(error = %e, "Consumer error."),
            None => {}
        }
        if last_gauges.elapsed() >= Duration::from_secs(1) {
            consumer.context().retake_fenced(consumer);
            rt.publish_gauges(&segment_refs);
            rt.metrics.ready.set(i64::from(rt.health.ready()));
            last_gauges = Instant::now();
        }
    }
    rt.health
        .running
        .store(false, std::sync::atomic::Ordering::SeqCst);
    rt.metrics.ready.set(0);
    if let Some(f) = rt.fatal() {
        return Err(ConsumerError::Fatal(f));
    }
    // No periodic commit in flight as the member leaves (see `consumer_config`).
    committer.stop();
    // Leave the group: the revocation callback drains the shards and commits.
    info!("Draining before shutdown.");
    let unwritten = rt.unwritten();
    consumer.unsubscribe();
    let until = Instant::now() + drain_timeout + Duration::from_secs(2);
    while Instant::now() < until && !rt.caches.read().is_empty() {
        let _ = consumer.poll(Duration::from_millis(50));
    }
    if let Some(f) = rt.fatal() {
        return Err(ConsumerError::Fatal(f));
    }
    let mut held: Vec<ShardId> = rt.caches.read().keys().copied().collect();
    held.sort_unstable();
    let unwritten = rt.unwritten() - unwritten;
    // The revocation committed synchronously; with nothing left to commit
    // librdkafka sends LeaveGroup as the unassignment completes, so the
    // group rebalances at once instead of after this member's session
    // timeout. Give the request a moment to go out before closing.
    let until = Instant::now() + Duration::from_millis(300);
    while Instant::now() < until {
        let _ = consumer.poll(Duration::from_millis(20));
    }
    // Close here, not on drop (the workers hold the consumer too, and the
    // process may exit first).
    match consumer.close_queue() {
        Ok(()) => {
            CLOSED.store(true, Ordering::Relaxed);
            let until = Instant::now() + Duration::from_secs(10);
            while !consumer.closed() && Instant::now() < until {
                let _ = consumer.poll(Duration::from_millis(50));
            }
        }
        Err(e) => warn!(error = %e, "Cannot close the consumer cleanly."),
    }
    // Stopped without writing everything: nothing is lost (the offsets
    // committed never pass what Redis holds, and the next start resumes
    // from there), but the stop was not the clean one asked for.
    if unwritten > 0 || !held.is_empty() {
        return Err(ConsumerError::DrainIncomplete {
            drain_timeout,
            unwritten,
            held,
        });
    }
    info!("Consumer stopped cleanly.");
    Ok(())
}
