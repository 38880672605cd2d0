//! A worker thread: owns a share of the shards, reads their partitions'
//! queues (split off the consumer, so no message crosses a thread), steps the
//! shards, and makes their changes durable through its own write-behind
//! before storing the offsets those writes cover. Workers share nothing but
//! the producer and the consumer handle; a slow shard holds up only its worker.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use parking_lot::{Condvar, Mutex};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::OwnedMessage;
use rdkafka::{Message, Offset, TopicPartitionList};
use tracing::{debug, error, info, warn};

use super::batch::RawMessage;
use super::consumer::GroupContext;
use crate::decode::Decoder;
use crate::engine::Engine;
use crate::event::{Millis, wall_clock_ms};
use crate::output::Encoder;
use crate::shard::{Ctx, InMessage, Pending, Shard, ShardError, StepStats};
use crate::sink::Sink;
use crate::store::{ShardId, Store, Written};
use crate::writer::{Action, Job, Policy, WriteBehind};

use super::runtime::Runtime;
use super::sink::WorkerSink;

type Queue = super::batch::BatchQueue<GroupContext>;

/// What the consumer thread asks of a worker.
pub enum Control {
    /// Take a shard, with its inputs' queues (in input order).
    Add {
        /// The shard.
        shard: Box<Shard>,
        /// Its partition queues.
        queues: Vec<Queue>,
    },
    /// Write what these shards hold, store their offsets and give them up.
    Drain {
        /// The shards.
        shards: Vec<ShardId>,
        /// Give up waiting for the store after this.
        deadline: Instant,
        /// Signalled when done.
        done: Sender<()>,
    },
    /// Give shards up without writing (their partitions were lost).
    Drop {
        /// The shards.
        shards: Vec<ShardId>,
        /// Signalled when done.
        done: Sender<()>,
    },
    /// A message that reached the main queue (should not happen: queues are
    /// split before assignment).
    Message(OwnedMessage),
    /// The consumer has left the group: stop.
    Stop,
}

/// Wakes a worker: a queue became non-empty or a control message arrived.
#[derive(Debug, Default)]
pub struct Wake {
    flag: Mutex<bool>,
    cond: Condvar,
}

impl Wake {
    /// Wakes the worker.
    pub fn notify(&self) {
        *self.flag.lock() = true;
        self.cond.notify_one();
    }

    fn wait(&self, timeout: Duration) {
        let mut f = self.flag.lock();
        if !*f {
            self.cond.wait_for(&mut f, timeout);
        }
        *f = false;
    }
}

/// A worker's handle, held by the consumer thread.
pub struct Handle {
    /// Control messages.
    pub control: Sender<Control>,
    /// Its wake-up.
    pub wake: Arc<Wake>,
    /// Its thread.
    pub thread: std::thread::JoinHandle<()>,
}

struct Owned {
    shard: Shard,
    queues: Vec<Queue>,
    /// Per input: when quiet time started counting (the last message, or the
    /// last time the worker started watching the queue again).
    last_message: Vec<Instant>,
    /// Per input: when its queue was last polled.
    last_poll: Vec<Instant>,
    blocked_until: Option<Instant>,
    /// The positions and clock of the last durable write.
    written: Option<Durable>,
    /// Per input, the messages that could not be decoded yet (the Schema
    /// Registry was unreachable), in offset order: the first is retried
    /// before that input is read on. More than one when the failure came
    /// mid-batch: the rest of the batch waits behind it.
    held: Vec<VecDeque<OwnedMessage>>,
}

/// What a durable write covered: the next offset per input topic, and the
/// shard's clock.
type Durable = (Vec<(Arc<str>, i64)>, Millis);

/// One worker.
pub struct Worker {
    id: usize,
    rt: Arc<Runtime>,
    engine: Arc<Engine>,
    decoders: Vec<Decoder>,
    encoder: Encoder,
    store: Arc<dyn Store>,
    sink: WorkerSink,
    writer: WriteBehind,
    policy: Policy,
    control: Receiver<Control>,
    wake: Arc<Wake>,
    consumer: Arc<BaseConsumer<GroupContext>>,
    shards: Vec<Owned>,
    pending: HashMap<ShardId, Pending>,
    stats: StepStats,
    next_write: Instant,
    write_blocked_until: Option<Instant>,
    /// This worker holds inputs back until the Schema Registry answers.
    registry_held: bool,
    /// The batch being read from a queue (empty between reads).
    batch: Vec<RawMessage>,
}

impl Worker {
    /// Starts worker `id`.
    #[allow(clippy::too_many_arguments)]
    pub fn spawn(
        id: usize,
        rt: Arc<Runtime>,
        decoders: Vec<Decoder>,
        encoder: Encoder,
        store: Arc<dyn Store>,
        writer_store: Arc<dyn Store>,
        sink: WorkerSink,
        consumer: Arc<BaseConsumer<GroupContext>>,
    ) -> std::io::Result<Handle> {
        let (control, rx) = crossbeam_channel::unbounded();
        let wake = Arc::new(Wake::default());
        let ack_timeout = rt.ack_timeout;
        let writer =
            WriteBehind::spawn(format!("leadscore-writer-{id}"), writer_store, ack_timeout)?;
        let worker = Worker {
            id,
            engine: Arc::clone(&rt.engine),
            rt,
            decoders,
            encoder,
            store,
            sink,
            writer,
            policy: Policy::default(),
            control: rx,
            wake: Arc::clone(&wake),
            consumer,
            shards: Vec::new(),
            pending: HashMap::new(),
            stats: StepStats::default(),
            next_write: Instant::now(),
            write_blocked_until: None,
            registry_held: false,
            batch: Vec::new(),
        };
        let thread = std::thread::Builder::new()
            .name(format!("leadscore-worker-{id}"))
            .spawn(move || worker.run())?;
        Ok(Handle {
            control,
            wake,
            thread,
        })
    }

    fn run(mut self) {
        let _span = tracing::info_span!("worker", id = self.id).entered();
        loop {
            let mut busy = false;
            loop {
                match self.control.try_recv() {
                    Ok(Control::Stop) => {
                        self.give_up_all();
                        return;
                    }
                    Ok(c) => {
                        busy = true;
                        self.handle(c);
                    }
                    Err(crossbeam_channel::TryRecvError::Empty) => break,
                    Err(crossbeam_channel::TryRecvError::Disconnected) => {
                        self.give_up_all();
                        return;
                    }
                }
            }
            let started = Instant::now();
            busy |= self.read_and_step();
            self.write_if_due(false);
            busy |= self.collect_writes();
            self.report(started);
            if !busy {
                self.wake.wait(Duration::from_millis(50));
            }
        }
    }

    fn handle(&mut self, c: Control) {
        match c {
            Control::Add { shard, queues } => {
                info!(shard = shard.id(), epoch = shard.epoch(), "Shard taken.");
                let n = queues.len();
                self.rt
                    .register_cache(shard.id(), Arc::clone(shard.cache()));
                let mut queues = queues;
                for q in &mut queues {
                    let w = Arc::clone(&self.wake);
                    q.set_nonempty_callback(move || w.notify());
                }
                self.shards.push(Owned {
                    shard: *shard,
                    queues,
                    last_message: vec![Instant::now(); n],
                    last_poll: vec![Instant::now(); n],
                    blocked_until: None,
                    written: None,
                    held: (0..n).map(|_| VecDeque::new()).collect(),
                });
            }
            Control::Drain {
                shards,
                deadline,
                done,
            } => {
                self.drain(&shards, deadline);
                let _ = done.send(());
            }
            Control::Drop { shards, done } => {
                for id in shards {
                    self.remove(id, "lost");
                }
                let _ = done.send(());
            }
            Control::Stop => {}
            Control::Message(m) => {
                let partition = m.partition();
                let Some(o) = self.shards.iter_mut().find(|o| o.shard.id() == partition) else {
                    return;
                };
                let Some(input) = self.rt.inputs.iter().position(|t| **t == *m.topic()) else {
                    return;
                };
                let msg = owned_message(input, &m);
                let decoded = self.decoders[input].decode(msg.payload, msg.timestamp);
                o.shard.push(&msg, decoded, &mut self.stats);
            }
        }
    }

    /// Reads every shard's queues into its merge and steps it.
    fn read_and_step(&mut self) -> bool {
        let now = Instant::now();
        let wall = wall_clock_ms();
        let idle_after = self.rt.idle_timeout;
        let batch = self.rt.batch_max;
        let mut busy = false;
        let mut registry_down: Option<String> = None;
        let mut failures: Vec<(usize, ShardError)> = Vec::new();
        let writing = self.writer.busy();
        for (n, o) in self.shards.iter_mut().enumerate() {
            if o.blocked_until.is_some_and(|t| now < t) {
                continue;
            }
            // Changed leads cannot be evicted until written: a shard over
            // its share of the memory limit takes nothing in while a write
            // is in flight (the write makes its leads evictable, and the
            // next one is due at once), so the limit is passed by at most
            // a round's leads, however slow the store.
            if writing && o.shard.cache().lock().over_limit() {
                continue;
            }
            if o.blocked_until.take().is_some() {
                // Quiet time counts only while the shard reads: an input left
                // unread while the store was down is not idle.
                o.last_message.fill(now);
            }
            // Bounded memory: read only while the merge holds less than a batch per input.
            for (input, q) in o.queues.iter().enumerate() {
                // Quiet time counts only while the queue is watched: after a
                // gap (a drain, a blocked shard, a long batch) it starts again.
                if now.duration_since(o.last_poll[input]) > Duration::from_millis(500) {
                    o.last_message[input] = now;
                }
                o.last_poll[input] = now;
                if o.shard.queued_in(input) >= batch {
                    // Not read this round: quiet time cannot count.
                    o.last_message[input] = now;
                    continue;
                }
                // Held messages first, in order; the input is read on only
                // once they all decode.
                let mut holding = false;
                while let Some(m) = o.held[input].front() {
                    let msg = owned_message(input, m);
                    if let Some(error) =
                        push(&mut o.shard, &self.decoders[input], &msg, &mut self.stats)
                    {
                        registry_down = Some(error);
                        holding = true;
                        break;
                    }
                    o.held[input].pop_front();
                }
                if holding {
                    o.last_message[input] = now;
                    continue;
                }
                let read = q.read(&mut self.batch, batch);
                for m in self.batch.drain(..) {
                    if !o.held[input].is_empty() {
                        // Not poison: kept, with the rest of the batch behind it.
                        o.held[input].push_back(m.detach(&self.rt.inputs[input]));
                        continue;
                    }
                    match m.error() {
                        None => {}
                        // A user's `enable.partition.eof=true` reports each
                        // time an input reaches its end: news, not an error
                        // (each was logged as a warning).
                        Some(KafkaError::PartitionEOF(_)) => continue,
                        Some(e) => {
                            warn!(error = %e, shard = o.shard.id(), input, "Consumer error.");
                            continue;
                        }
                    }
                    let msg = InMessage {
                        input,
                        offset: m.offset(),
                        key: m.key(),
                        payload: m.payload(),
                        timestamp: m.timestamp_ms(),
                    };
                    if let Some(error) =
                        push(&mut o.shard, &self.decoders[input], &msg, &mut self.stats)
                    {
                        registry_down = Some(error);
                        o.held[input].push_back(m.detach(&self.rt.inputs[input]));
                    }
                }
                if read > 0 {
                    busy = true;
                }
                // Quiet time starts at the last message read, whether or not
                // the merge still holds it: an input counts as idle once its
                // queue empties if nothing new came for the idle time (the
                // merge never treats an input with a queue as idle). Counted
                // from the queue's emptying instead, the inputs of a stream's
                // end went idle one after another, each an idle time after
                // the one before (a user probe: the last events of a stream
                // waited three idle times).
                if read > 0 {
                    o.last_message[input] = now;
                }
                // Idle: nothing read, quiet for the idle time (zero: at once)
                // and nothing left in the broker. The last part holds even
                // with a zero idle time: an input whose next fetch has not
                // arrived while its partition still has a backlog is not at
                // the live edge, and moving on without it would make its
                // events late on every restart and catch-up.
                let idle = read == 0
                    && now.duration_since(o.last_message[input]) >= idle_after
                    && self.rt.caught_up(input, o.shard.id());
                let was = o.shard.is_idle(input);
                o.shard.set_idle(input, idle);
                if was != o.shard.is_idle(input) {
                    debug!(
                        shard = o.shard.id(),
                        input,
                        idle = !was,
                        quiet_ms = now.duration_since(o.last_message[input]).as_millis() as u64,
                        "Input idleness changed."
                    );
                }
            }
            let mut ctx = Ctx {
                engine: &self.engine,
                store: &*self.store,
                sink: &mut self.sink,
                encoder: &self.encoder,
                stats: &mut self.stats,
            };
            let result = o
                .shard
                .step(&mut ctx, batch * 4)
                .and_then(|n| Ok(n + o.shard.idle_tick(&mut ctx, wall, batch * 4)?));
            match result {
                Ok(k) => busy |= k > 0,
                Err(e) => failures.push((n, e)),
            }
        }
        for (n, e) in failures.into_iter().rev() {
            busy = true;
            self.on_step_error(n, e);
        }
        let held = self
            .shards
            .iter()
            .any(|o| o.held.iter().any(|h| !h.is_empty()));
        match (&registry_down, self.registry_held) {
            (Some(error), false) => {
                self.registry_held = true;
                self.rt
                    .health
                    .registry_down
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                warn!(%error, "Schema registry unusable (no answer, a failure or a refusal); holding the affected inputs until it gives schemas again (nothing is dead-lettered).");
                self.rt.refresh_ready();
            }
            (None, true) if !held => {
                self.registry_held = false;
                self.rt
                    .health
                    .registry_down
                    .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                info!("Schema registry answers again.");
                self.rt.refresh_ready();
            }
            _ => {}
        }
        busy
    }

    fn on_step_error(&mut self, n: usize, e: ShardError) {
        let id = self.shards[n].shard.id();
        match e {
            ShardError::Fenced { outcome, .. } => match self.policy.on_refused(&outcome) {
                Action::GiveUp => {
                    warn!(
                        shard = id,
                        ?outcome,
                        "Another member owns this shard now; dropping what it holds."
                    );
                    self.fenced(id);
                }
                Action::Fatal(msg) => self.rt.fail(msg),
                Action::Retry(_) => {}
            },
            e if e.retryable() => {
                let delay = self.policy.backoff();
                self.rt
                    .metrics
                    .redis_errors
                    .with_label_values(&["load"])
                    .inc();
                self.rt.set_store_down(&e);
                warn!(error = %e, shard = id, retry_in = ?delay, "Cannot load lead state; holding this shard's input until the store answers.");
                self.shards[n].blocked_until = Some(Instant::now() + delay);
            }
            e => self.rt.fail(format!("shard {id}: {e}")),
        }
    }

    /// Starts a write of every shard's changes when one is due and none is in flight.
    fn write_if_due(&mut self, force: bool) {
        let now = Instant::now();
        if self.writer.busy() || self.write_blocked_until.is_some_and(|t| now < t) {
            return;
        }
        // Changed leads cannot be evicted until written: a shard over its
        // share of the memory limit with changed leads writes now, whatever
        // the interval, so the limit holds however long the interval is.
        let (dirty, over_limit) = self.shards.iter().fold((0, false), |(n, over), o| {
            let cache = o.shard.cache().lock();
            let d = cache.dirty_len();
            (n + d, over || (d > 0 && cache.over_limit()))
        });
        if !force && now < self.next_write && dirty < self.rt.flush_max_dirty && !over_limit {
            return;
        }
        self.next_write = now + self.rt.flush_interval;
        let mut writes = Vec::new();
        for o in &mut self.shards {
            let positions = o.shard.positions();
            let moved = o
                .written
                .as_ref()
                .is_none_or(|(p, c)| *p != positions || *c != o.shard.clock());
            if !o.shard.has_changes() && !moved {
                continue;
            }
            let (write, pending) = o.shard.prepare_write();
            self.pending.insert(o.shard.id(), pending);
            writes.push(write);
        }
        if writes.is_empty() {
            return;
        }
        let job = Job {
            barrier: self.sink.barrier(),
            writes,
        };
        if let Err(e) = self.writer.submit(job) {
            self.rt.fail(e.to_string());
        }
    }

    /// Accounts for a finished write.
    fn collect_writes(&mut self) -> bool {
        match self.writer.poll() {
            Some(done) => {
                self.finish(done);
                true
            }
            None => false,
        }
    }

    fn finish(&mut self, done: crate::writer::Done) {
        let leads: usize = done.writes.iter().map(|w| w.leads.len()).sum();
        match done.outcome {
            Ok(outcomes) => {
                self.policy.reset();
                self.write_blocked_until = None;
                self.rt.set_store_up();
                // The store answers: shards held back by a failed load may read again.
                for o in &mut self.shards {
                    if o.blocked_until.take().is_some() {
                        o.last_message.fill(Instant::now());
                    }
                }
                self.rt
                    .metrics
                    .flush_seconds
                    .observe(done.took.as_secs_f64());
                self.rt.metrics.flush_leads.observe(leads as f64);
                let mut offsets = TopicPartitionList::new();
                for (w, outcome) in done.writes.iter().zip(outcomes) {
                    let pending = self.pending.remove(&w.shard).unwrap_or_default();
                    let Some(o) = self
                        .shards
                        .iter_mut()
                        .find(|o| o.shard.id() == w.shard && o.shard.epoch() == w.epoch)
                    else {
                        continue;
                    };
                    match outcome {
                        Written::Ok => {
                            o.shard.write_done(pending, true);
                            o.written = Some((
                                w.positions
                                    .iter()
                                    .map(|(t, p)| (Arc::from(t.as_str()), *p))
                                    .collect(),
                                w.clock.unwrap_or(i64::MIN),
                            ));
                            for (topic, p) in &w.positions {
                                let _ = offsets.add_partition_offset(
                                    topic,
                                    w.shard,
                                    Offset::Offset(*p),
                                );
                            }
                        }
                        refused => match self.policy.on_refused(&refused) {
                            Action::GiveUp => {
                                warn!(
                                    shard = w.shard,
                                    ?refused,
                                    "Write refused: another member owns this shard now; dropping what it holds."
                                );
                                self.fenced(w.shard);
                            }
                            Action::Fatal(msg) => self.rt.fail(format!("shard {}: {msg}", w.shard)),
                            Action::Retry(_) => {}
                        },
                    }
                }
                if offsets.count() > 0
                    && let Err(e) = self.consumer.store_offsets(&offsets)
                {
                    debug!(error = %e, "Cannot store offsets (partitions moved meanwhile).");
                }
                self.recycle(done.writes);
            }
            Err(e) => {
                for w in &done.writes {
                    let pending = self.pending.remove(&w.shard).unwrap_or_default();
                    if let Some(o) = self.shards.iter_mut().find(|o| o.shard.id() == w.shard) {
                        o.shard.write_done(pending, false);
                    }
                }
                self.recycle(done.writes);
                match self.policy.on_write_error(&e) {
                    Action::Retry(delay) => {
                        self.rt
                            .metrics
                            .redis_errors
                            .with_label_values(&["write"])
                            .inc();
                        self.rt.set_store_down(&e);
                        warn!(error = %e, retry_in = ?delay, "Write failed; holding offsets until it succeeds.");
                        self.write_blocked_until = Some(Instant::now() + delay);
                        self.next_write = Instant::now() + delay;
                    }
                    Action::Fatal(msg) => self.rt.fail(msg),
                    Action::GiveUp => {}
                }
            }
        }
    }

    /// Hands finished writes' buffers back to their shards, for their next writes.
    fn recycle(&mut self, writes: Vec<crate::store::ShardWrite>) {
        for w in writes {
            if let Some(o) = self
                .shards
                .iter_mut()
                .find(|o| o.shard.id() == w.shard && o.shard.epoch() == w.epoch)
            {
                o.shard.recycle(w);
            }
        }
    }

    /// Makes what `ids` hold durable (retrying until `deadline`) and gives them up.
    fn drain(&mut self, ids: &[ShardId], deadline: Instant) {
        // How long the last write took to fail, if it failed: an attempt
        // is made only if one as long still fits before the deadline (a
        // Redis that stopped answering takes the store's whole timeout to
        // fail), so the drain ends by the deadline, not a timeout past it.
        let mut failed_after = None;
        // The write in flight first.
        while self.writer.busy() {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.writer.wait(left.max(Duration::from_millis(1))) {
                Some(Ok(done)) => {
                    failed_after = done.outcome.is_err().then_some(done.took);
                    self.finish(done);
                }
                Some(Err(e)) => self.rt.fail(e.to_string()),
                None if Instant::now() >= deadline => break,
                None => {}
            }
        }
        loop {
            let mut writes = Vec::new();
            for o in &mut self.shards {
                if ids.contains(&o.shard.id()) {
                    let (write, pending) = o.shard.prepare_write();
                    self.pending.insert(o.shard.id(), pending);
                    writes.push(write);
                }
            }
            if writes.is_empty() {
                break;
            }
            let room = deadline.saturating_duration_since(Instant::now());
            if room.is_zero() || failed_after.is_some_and(|took| room < took) || self.rt.failed() {
                self.give_up_unwritten(ids);
                break;
            }
            // On the writer thread, waited for until the deadline at most:
            // a store that does not answer can take more than one timeout
            // (a reconnection, then the write). One still in flight at the
            // deadline is left to finish or fail on its own; it is fenced
            // and atomic, and the shards are given up either way.
            let started = Instant::now();
            let job = Job {
                barrier: self.sink.barrier(),
                writes,
            };
            if let Err(e) = self.writer.submit(job) {
                self.rt.fail(e.to_string());
            }
            let failed = match self.writer.wait(room) {
                Some(Ok(done)) => {
                    let failed = done.outcome.is_err();
                    self.finish(done);
                    failed
                }
                Some(Err(e)) => {
                    self.rt.fail(e.to_string());
                    true
                }
                None => true,
            };
            if !failed {
                break;
            }
            if self.writer.busy() || self.rt.failed() {
                self.give_up_unwritten(ids);
                break;
            }
            let took = started.elapsed();
            let pause = self.policy.backoff();
            if deadline.saturating_duration_since(Instant::now()) < pause + took {
                self.give_up_unwritten(ids);
                break;
            }
            failed_after = Some(took);
            std::thread::sleep(pause);
        }
        for id in ids {
            self.remove(*id, "revoked");
        }
    }

    fn give_up_unwritten(&self, ids: &[ShardId]) {
        error!(shards = ?ids, "Could not write before giving the shards up; their next owner resumes from the last durable position.");
        self.rt.gave_up_unwritten(ids.len());
    }

    /// Another member took the shard: drop what it holds. Usually the group
    /// moved the partitions already (that is how the other member got them)
    /// and librdkafka learns of it at its next heartbeat or rebalance; if
    /// the group still assigns them here after a session timeout, the
    /// consumer thread takes the shard again (see `GroupContext::retake`).
    /// Leaving and rejoining the group here was tried: under a rolling
    /// restart it kept the group rebalancing with partitions assigned to
    /// nobody.
    fn fenced(&mut self, id: ShardId) {
        self.rt.metrics.shards_fenced.inc();
        self.remove(id, "fenced");
        self.rt.report_fenced(id);
    }

    fn remove(&mut self, id: ShardId, why: &str) {
        if let Some(n) = self.shards.iter().position(|o| o.shard.id() == id) {
            let mut o = self.shards.remove(n);
            // Messages read but not applied: not lost, the shard's next
            // owner reads them again from the stored positions.
            let to_reread = o.shard.clear();
            self.pending.remove(&id);
            self.rt.unregister_cache(id);
            info!(
                shard = id,
                why,
                to_reread,
                "Shard given up; its next owner reads again what it had not applied."
            );
        }
    }

    fn give_up_all(&mut self) {
        let ids: Vec<ShardId> = self.shards.iter().map(|o| o.shard.id()).collect();
        for id in ids {
            self.remove(id, "stopped");
        }
        if std::mem::take(&mut self.registry_held) {
            self.rt
                .health
                .registry_down
                .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            self.rt.refresh_ready();
        }
    }

    fn report(&mut self, started: Instant) {
        self.rt
            .metrics
            .absorb(&mut self.stats, &self.rt.inputs, wall_clock_ms());
        self.rt
            .metrics
            .batch_seconds
            .observe(started.elapsed().as_secs_f64());
        let mut board = self.rt.board.lock();
        for o in &self.shards {
            let cache = o.shard.cache().lock();
            board.insert(
                o.shard.id(),
                super::runtime::ShardGauges {
                    leads: cache.len(),
                    bytes: cache.bytes(),
                    dirty: cache.dirty_len(),
                    timers: o.shard.timers_pending(&cache),
                    buffered: o.shard.buffered(),
                    watermark: o.shard.watermark(),
                    clock: o.shard.clock(),
                    population: o.shard.population().clone(),
                },
            );
        }
    }
}

/// Decodes and queues one message; a retryable decoding failure (the Schema
/// Registry is unreachable) queues nothing and is returned.
fn push(
    shard: &mut Shard,
    decoder: &Decoder,
    msg: &InMessage<'_>,
    stats: &mut StepStats,
) -> Option<String> {
    match decoder.decode(msg.payload, msg.timestamp) {
        Err(e) if e.retryable() => Some(e.to_string()),
        decoded => {
            shard.push(msg, decoded, stats);
            None
        }
    }
}

/// A kept message of input `input`, as a shard takes it.
fn owned_message(input: usize, m: &OwnedMessage) -> InMessage<'_> {
    InMessage {
        input,
        offset: m.offset(),
        key: m.key(),
        payload: m.payload(),
        timestamp: m.timestamp().to_millis(),
    }
}
