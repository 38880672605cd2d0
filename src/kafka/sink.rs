//! The output side: one idempotent producer for the process; each worker
//! sends through its own [`WorkerSink`], whose barriers wait for that
//! worker's records only.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use rdkafka::ClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{DeliveryResult, Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer, ProducerContext, ThreadedProducer};
use tracing::error;

use crate::event::truncate;
use crate::metrics::Metrics;
use crate::output::{OutputKind, Record, dead_letter_headers as h};
use crate::settings::TopicSettings;
use crate::sink::{Barrier, DeadLetter, Sink, SinkError};

/// Epochs in flight per worker are tracked in a ring this large; a worker
/// keeps at most two open (one being filled, one being written).
const EPOCHS: usize = 64;

/// Records not yet acknowledged, per epoch (a write cuts an epoch).
#[derive(Debug)]
struct Acks {
    pending: [AtomicI64; EPOCHS],
    failures: AtomicU64,
    lock: Mutex<()>,
    changed: Condvar,
}

impl Acks {
    fn new() -> Self {
        Acks {
            pending: std::array::from_fn(|_| AtomicI64::new(0)),
            failures: AtomicU64::new(0),
            lock: Mutex::new(()),
            changed: Condvar::new(),
        }
    }

    fn done(&self, epoch: usize) {
        self.pending[epoch % EPOCHS].fetch_sub(1, Ordering::SeqCst);
        let _guard = self.lock.lock();
        self.changed.notify_all();
    }

    /// Waits until every epoch up to `epoch` has no record pending.
    fn wait(&self, epoch: usize, timeout: Duration) -> Result<(), SinkError> {
        let deadline = Instant::now() + timeout;
        let filling = (epoch + 1) % EPOCHS;
        let mut guard = self.lock.lock();
        loop {
            let failed = self.failures.load(Ordering::SeqCst);
            if failed > 0 {
                return Err(SinkError::Produce(format!(
                    "{failed} output records were not delivered"
                )));
            }
            let outstanding: i64 = (0..EPOCHS)
                .filter(|slot| *slot != filling)
                .map(|slot| self.pending[slot].load(Ordering::SeqCst))
                .sum();
            if outstanding == 0 {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(SinkError::Timeout(outstanding as usize));
            }
            self.changed.wait_for(&mut guard, Duration::from_millis(10));
        }
    }
}

/// Counts deliveries and failures per worker and epoch.
pub struct DeliveryContext {
    metrics: Metrics,
    acks: Vec<Arc<Acks>>,
}

impl ClientContext for DeliveryContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        super::client_log::client_log(level, fac, message);
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        super::client_log::client_error(&error, reason);
    }
}

/// The delivery opaque: worker in the high half, epoch in the low half.
fn opaque(worker: usize, epoch: usize) -> usize {
    (worker << 32) | (epoch % EPOCHS)
}

impl ProducerContext for DeliveryContext {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, tag: usize) {
        use rdkafka::Message;
        let (worker, epoch) = (tag >> 32, tag & 0xffff_ffff);
        let Some(acks) = self.acks.get(worker) else {
            return;
        };
        match result {
            Ok(m) => self
                .metrics
                .outputs_produced
                .with_label_values(&[m.topic()])
                .inc(),
            Err((e, m)) => {
                self.metrics
                    .produce_failures
                    .with_label_values(&[m.topic()])
                    .inc();
                acks.failures.fetch_add(1, Ordering::SeqCst);
                error!(error = %e, topic = m.topic(), "Output record was not delivered.");
            }
        }
        acks.done(epoch);
    }
}

/// The process's producer, shared by the workers.
pub type SharedProducer = Arc<ThreadedProducer<DeliveryContext>>;

/// Creates the producer and one sink per worker.
pub fn sinks(
    config: &rdkafka::ClientConfig,
    topics: &TopicSettings,
    metrics: &Metrics,
    workers: usize,
) -> Result<(SharedProducer, Vec<WorkerSink>), KafkaError> {
    let acks: Vec<Arc<Acks>> = (0..workers).map(|_| Arc::new(Acks::new())).collect();
    let producer: SharedProducer = Arc::new(config.create_with_context(DeliveryContext {
        metrics: metrics.clone(),
        acks: acks.clone(),
    })?);
    let sinks = acks
        .into_iter()
        .enumerate()
        .map(|(worker, acks)| WorkerSink {
            producer: Arc::clone(&producer),
            topics: topics.clone(),
            acks,
            worker,
            epoch: 0,
        })
        .collect();
    Ok((producer, sinks))
}

/// One worker's outputs and dead letters.
pub struct WorkerSink {
    producer: SharedProducer,
    topics: TopicSettings,
    acks: Arc<Acks>,
    worker: usize,
    epoch: usize,
}

impl std::fmt::Debug for WorkerSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerSink")
            .field("worker", &self.worker)
            .finish_non_exhaustive()
    }
}

impl WorkerSink {
    fn send_record(&self, record: BaseRecord<'_, [u8], [u8], usize>) -> Result<(), SinkError> {
        // Read the clock only once the queue is full (this runs per output).
        let mut deadline = None;
        let slot = &self.acks.pending[self.epoch % EPOCHS];
        slot.fetch_add(1, Ordering::SeqCst);
        let mut record = record.delivery_opaque(opaque(self.worker, self.epoch));
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    let now = Instant::now();
                    if now > *deadline.get_or_insert(now + Duration::from_secs(30)) {
                        slot.fetch_sub(1, Ordering::SeqCst);
                        return Err(SinkError::Produce("producer queue full for 30 s".into()));
                    }
                    record = back;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err((e, _)) => {
                    slot.fetch_sub(1, Ordering::SeqCst);
                    return Err(SinkError::Produce(e.to_string()));
                }
            }
        }
    }
}

impl Sink for WorkerSink {
    fn send(&mut self, record: &Record) -> Result<(), SinkError> {
        let topic = match record.kind {
            OutputKind::SegmentChange => &self.topics.segment_changes,
            OutputKind::Handoff => &self.topics.handoffs,
        };
        self.send_record(
            BaseRecord::with_opaque_to(topic, 0)
                .key(record.key.as_bytes())
                .payload(&record.payload[..])
                .timestamp(record.at),
        )
    }

    fn dead_letter(&mut self, l: &DeadLetter<'_>) -> Result<(), SinkError> {
        let reason = truncate(&l.error.to_string(), 1024);
        let partition = l.partition.to_string();
        let offset = l.offset.to_string();
        let size = l.original_size.to_string();
        let mut headers = OwnedHeaders::new_with_capacity(7)
            .insert(Header {
                key: h::REASON,
                value: Some(&reason),
            })
            .insert(Header {
                key: h::KIND,
                value: Some(l.error.kind()),
            })
            .insert(Header {
                key: h::TOPIC,
                value: Some(l.topic),
            })
            .insert(Header {
                key: h::PARTITION,
                value: Some(&partition),
            })
            .insert(Header {
                key: h::OFFSET,
                value: Some(&offset),
            })
            .insert(Header {
                key: h::ORIGINAL_SIZE,
                value: Some(&size),
            });
        if let Some(hash) = l.original_hash {
            headers = headers.insert(Header {
                key: h::ORIGINAL_HASH,
                value: Some(hash),
            });
        }
        let mut record: BaseRecord<'_, [u8], [u8], usize> =
            BaseRecord::with_opaque_to(&self.topics.dead_letter, 0).headers(headers);
        if let Some(key) = l.key {
            record = record.key(key);
        }
        if let Some(payload) = l.payload {
            record = record.payload(payload);
        }
        self.send_record(record)
    }

    fn barrier(&mut self) -> Barrier {
        let epoch = self.epoch;
        self.epoch += 1;
        let acks = Arc::clone(&self.acks);
        Barrier::new(move |timeout| acks.wait(epoch, timeout))
    }
}

/// Flushes the producer (at shutdown).
pub fn flush(producer: &SharedProducer, timeout: Duration) {
    if let Err(e) = producer.flush(timeout) {
        error!(error = %e, "Producer flush failed at shutdown.");
    }
}
