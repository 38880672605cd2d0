//! The output side: an idempotent producer behind the pipeline's [`Sink`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rdkafka::ClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{DeliveryResult, Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer, ProducerContext, ThreadedProducer};
use tracing::error;

use crate::decode::DecodeError;
use crate::event::truncate;
use crate::metrics::Metrics;
use crate::output::{OutputKind, Record, dead_letter_headers as h};
use crate::pipeline::{InMessage, Sink, SinkError};
use crate::settings::TopicSettings;

/// Counts deliveries and failures.
#[derive(Debug, Clone)]
pub struct DeliveryContext {
    metrics: Metrics,
    failures: Arc<AtomicU64>,
}

impl ClientContext for DeliveryContext {}

impl ProducerContext for DeliveryContext {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        use rdkafka::Message;
        match result {
            Ok(m) => self
                .metrics
                .outputs_produced
                .with_label_values(&[m.topic()])
                .inc(),
            Err((error, m)) => {
                self.metrics.produce_failures.inc();
                self.failures.fetch_add(1, Ordering::SeqCst);
                error!(%error, topic = m.topic(), "Output record was not delivered.");
            }
        }
    }
}

/// The producer for outputs and dead letters.
pub struct KafkaSink {
    producer: ThreadedProducer<DeliveryContext>,
    topics: TopicSettings,
    failures: Arc<AtomicU64>,
    failures_seen: u64,
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
        let failures = Arc::new(AtomicU64::new(0));
        let producer = config.create_with_context(DeliveryContext {
            metrics,
            failures: failures.clone(),
        })?;
        Ok(KafkaSink {
            producer,
            topics,
            failures,
            failures_seen: 0,
        })
    }

    fn send_record(&self, mut record: BaseRecord<'_, [u8], [u8]>) -> Result<(), SinkError> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    if Instant::now() > deadline {
                        return Err(SinkError::Produce("producer queue full for 30 s".into()));
                    }
                    record = back;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err((e, _)) => return Err(SinkError::Produce(e.to_string())),
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
            BaseRecord::to(topic)
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
        let mut record: BaseRecord<'_, [u8], [u8]> =
            BaseRecord::to(&self.topics.dead_letter).headers(headers);
        if let Some(key) = msg.key {
            record = record.key(key);
        }
        if let Some(payload) = msg.payload {
            record = record.payload(payload);
        }
        self.send_record(record)
    }

    fn flush(&mut self, timeout: Duration) -> Result<(), SinkError> {
        self.producer
            .flush(timeout)
            .map_err(|_| SinkError::Timeout(self.producer.in_flight_count().max(0) as usize))?;
        let failures = self.failures.load(Ordering::SeqCst);
        if failures != self.failures_seen {
            self.failures_seen = failures;
            return Err(SinkError::Produce(format!(
                "{failures} output records were not delivered"
            )));
        }
        Ok(())
    }
}
