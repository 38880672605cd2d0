//! The output side: an idempotent producer behind the pipeline's [`Sink`].

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use rdkafka::ClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{DeliveryResult, Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, ProducerContext, ThreadedProducer};
use tracing::error;

use crate::decode::DecodeError;
use crate::event::truncate;
use crate::metrics::Metrics;
use crate::output::{OutputKind, Record, dead_letter_headers as h};
use crate::pipeline::{Barrier, InMessage, Sink, SinkError};
use crate::settings::TopicSettings;

/// Epochs in flight are tracked in a ring this large; the processor keeps
/// at most two open (one being filled, one being written).
const EPOCHS: usize = 64;

/// Records not yet acknowledged, per epoch (a flush cuts an epoch).
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
            if self.failures.load(Ordering::SeqCst) > 0 {
                return Err(SinkError::Produce(format!(
                    "{} output records were not delivered",
                    self.failures.load(Ordering::SeqCst)
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

/// Counts deliveries and failures per epoch.
#[derive(Debug, Clone)]
pub struct DeliveryContext {
    metrics: Metrics,
    acks: Arc<Acks>,
}

impl ClientContext for DeliveryContext {}

impl ProducerContext for DeliveryContext {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, epoch: usize) {
        use rdkafka::Message;
        match result {
            Ok(m) => self
                .metrics
                .outputs_produced
                .with_label_values(&[m.topic()])
                .inc(),
            Err((error, m)) => {
                self.metrics.produce_failures.inc();
                self.acks.failures.fetch_add(1, Ordering::SeqCst);
                error!(%error, topic = m.topic(), "Output record was not delivered.");
            }
        }
        self.acks.done(epoch);
    }
}

/// The producer for outputs and dead letters.
pub struct KafkaSink {
    producer: ThreadedProducer<DeliveryContext>,
    topics: TopicSettings,
    acks: Arc<Acks>,
    epoch: usize,
}

impl std::fmt::Debug for KafkaSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSink").finish_non_exhaustive()
    }
}

impl KafkaSink {
    /// A sink producing with `config` to `topics`.
    pub fn new(
        config: &rdkafka::ClientConfig,
        topics: TopicSettings,
        metrics: Metrics,
    ) -> Result<Self, KafkaError> {
        let acks = Arc::new(Acks::new());
        let producer = config.create_with_context(DeliveryContext {
            metrics,
            acks: Arc::clone(&acks),
        })?;
        Ok(KafkaSink {
            producer,
            topics,
            acks,
            epoch: 0,
        })
    }

    fn send_record(&self, record: BaseRecord<'_, [u8], [u8], usize>) -> Result<(), SinkError> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let slot = &self.acks.pending[self.epoch % EPOCHS];
        slot.fetch_add(1, Ordering::SeqCst);
        let mut record = record.delivery_opaque(self.epoch);
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    if Instant::now() > deadline {
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

impl Sink for KafkaSink {
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

    fn dead_letter(&mut self, msg: &InMessage<'_>, error: &DecodeError) -> Result<(), SinkError> {
        let reason = truncate(&error.to_string(), 1024);
        let partition = msg.partition.to_string();
        let offset = msg.offset.to_string();
        let headers = OwnedHeaders::new_with_capacity(5)
            .insert(Header {
                key: h::REASON,
                value: Some(&reason),
            })
            .insert(Header {
                key: h::KIND,
                value: Some(error.kind()),
            })
            .insert(Header {
                key: h::TOPIC,
                value: Some(msg.topic),
            })
            .insert(Header {
                key: h::PARTITION,
                value: Some(&partition),
            })
            .insert(Header {
                key: h::OFFSET,
                value: Some(&offset),
            });
        let mut record: BaseRecord<'_, [u8], [u8], usize> =
            BaseRecord::with_opaque_to(&self.topics.dead_letter, 0).headers(headers);
        if let Some(key) = msg.key {
            record = record.key(key);
        }
        if let Some(payload) = msg.payload {
            record = record.payload(payload);
        }
        self.send_record(record)
    }

    fn barrier(&mut self) -> Barrier {
        let epoch = self.epoch;
        self.epoch += 1;
        // Start the next epoch clean (its slot was last used EPOCHS epochs ago).
        let acks = Arc::clone(&self.acks);
        Barrier::new(move |timeout| acks.wait(epoch, timeout))
    }
}
