//! A partition's queue read a batch at a time: the crate's only unsafe code.
//!
//! rdkafka's `PartitionQueue::poll` hands out one message per call, and each
//! call reads the clock three or four times (its own timeout, librdkafka's
//! poll timeout and its "application polled" mark), takes the queue's lock
//! and wraps the message in an event. In a drain that was 7 % of the
//! workers' samples (`perf`, 2026-12-07; `docs/benchmarks.md`).
//! librdkafka's `rd_kafka_consume_batch_queue` takes up to a batch of
//! messages in one call: the clock and the poll marks once per batch, and no
//! event around each message. rdkafka does not wrap it, so this module calls
//! it through `rdkafka-sys`, on a second handle to the same partition queue
//! that `split_partition_queue` cut off the consumer's queue.

#![allow(unsafe_code)]

use std::ffi::CString;
use std::ptr::NonNull;

use rdkafka::Timestamp;
use rdkafka::bindings as rd;
use rdkafka::consumer::base_consumer::PartitionQueue;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::OwnedMessage;

/// A partition's queue, split off the consumer, read in batches.
pub struct BatchQueue<C: ConsumerContext + 'static> {
    /// librdkafka's handle to the partition's fetch queue, destroyed by
    /// this value's `Drop`, which runs before `split` (keeping the consumer
    /// alive) is dropped.
    raw: NonNull<rd::rd_kafka_queue_t>,
    /// The split queue: it keeps the queue cut off the consumer's and the
    /// consumer alive, and carries the wake-up callback.
    split: PartitionQueue<C>,
}

// SAFETY: librdkafka's queue handles may be used from any thread (its
// queues take their own lock); the handle is used by one worker at a time.
unsafe impl<C: ConsumerContext + 'static> Send for BatchQueue<C> {}

impl<C: ConsumerContext + 'static> BatchQueue<C> {
    /// Splits `topic`/`partition`'s queue off `consumer`'s (its messages no
    /// longer reach the consumer's poll). `None` if librdkafka does not know
    /// the partition.
    pub fn split(
        consumer: &std::sync::Arc<BaseConsumer<C>>,
        topic: &str,
        partition: i32,
    ) -> Option<Self> {
        let split = consumer.split_partition_queue(topic, partition)?;
        let name = CString::new(topic).ok()?;
        // SAFETY: the client pointer is valid while `consumer` lives, and
        // `name` is a NUL-terminated string that outlives the call. The call
        // returns a new reference to the partition's fetch queue (or null),
        // which this value owns and destroys on drop.
        let raw = unsafe {
            rd::rd_kafka_queue_get_partition(
                consumer.client().native_ptr(),
                name.as_ptr(),
                partition,
            )
        };
        Some(Self {
            raw: NonNull::new(raw)?,
            split,
        })
    }

    /// Calls `f` (from librdkafka's threads) when the queue becomes non-empty.
    pub fn set_nonempty_callback<F: Fn() + Send + Sync + 'static>(&mut self, f: F) {
        self.split.set_nonempty_callback(f);
    }

    /// Appends up to `max` of the queue's messages to `out`, in offset order,
    /// without waiting; returns how many.
    pub fn read(&self, out: &mut Vec<RawMessage>, max: usize) -> usize {
        out.reserve(max);
        let spare = out.spare_capacity_mut();
        // SAFETY: `RawMessage` is a transparent `NonNull<rd_kafka_message_t>`,
        // so the spare capacity is `max` or more writable message pointers;
        // librdkafka writes at most `max` of them and returns how many (or
        // -1, read as none). Each one it returns is a non-null message this
        // caller now owns (destroyed by `RawMessage`'s drop), so the length
        // may grow by that count.
        unsafe {
            let n = rd::rd_kafka_consume_batch_queue(
                self.raw.as_ptr(),
                0,
                spare.as_mut_ptr().cast::<*mut rd::rd_kafka_message_t>(),
                max,
            );
            let n = usize::try_from(n).unwrap_or(0).min(max);
            out.set_len(out.len() + n);
            n
        }
    }
}

impl<C: ConsumerContext + 'static> Drop for BatchQueue<C> {
    fn drop(&mut self) {
        // SAFETY: the handle came from `rd_kafka_queue_get_partition` and is
        // destroyed once, while `split` still keeps the client alive.
        unsafe { rd::rd_kafka_queue_destroy(self.raw.as_ptr()) }
    }
}

/// A message (or a consumer error) taken from a [`BatchQueue`], destroyed
/// when dropped.
#[repr(transparent)]
pub struct RawMessage(NonNull<rd::rd_kafka_message_t>);

// SAFETY: a librdkafka message is read-only once handed out and may be
// destroyed from any thread.
unsafe impl Send for RawMessage {}

impl RawMessage {
    fn get(&self) -> &rd::rd_kafka_message_t {
        // SAFETY: the pointer came from librdkafka and stays valid until
        // this value drops.
        unsafe { self.0.as_ref() }
    }

    /// The consumer error it carries instead of a message, if any.
    pub fn error(&self) -> Option<KafkaError> {
        let m = self.get();
        match m.err {
            rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR => None,
            rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR__PARTITION_EOF => {
                Some(KafkaError::PartitionEOF(m.partition))
            }
            e => Some(KafkaError::MessageConsumption(RDKafkaErrorCode::from(e))),
        }
    }

    /// Its offset.
    pub fn offset(&self) -> i64 {
        self.get().offset
    }

    /// Its key, if it has one.
    pub fn key(&self) -> Option<&[u8]> {
        let m = self.get();
        // SAFETY: librdkafka's key pointer and length describe one buffer
        // that lives as long as the message.
        (!m.key.is_null())
            .then(|| unsafe { std::slice::from_raw_parts(m.key.cast::<u8>(), m.key_len) })
    }

    /// Its payload, if it has one.
    pub fn payload(&self) -> Option<&[u8]> {
        let m = self.get();
        // SAFETY: as for the key.
        (!m.payload.is_null())
            .then(|| unsafe { std::slice::from_raw_parts(m.payload.cast::<u8>(), m.len) })
    }

    /// Its timestamp in milliseconds since the epoch (create or log-append
    /// time), if it has one.
    pub fn timestamp_ms(&self) -> Option<i64> {
        let mut kind = rd::rd_kafka_timestamp_type_t::RD_KAFKA_TIMESTAMP_NOT_AVAILABLE;
        // SAFETY: a valid message, and a valid place for the kind.
        let at = unsafe { rd::rd_kafka_message_timestamp(self.0.as_ptr(), &mut kind) };
        let none =
            at == -1 || kind == rd::rd_kafka_timestamp_type_t::RD_KAFKA_TIMESTAMP_NOT_AVAILABLE;
        (!none).then_some(at)
    }

    /// An owned copy, kept while the message cannot be handled yet.
    pub fn detach(&self, topic: &str) -> OwnedMessage {
        let m = self.get();
        OwnedMessage::new(
            self.payload().map(<[u8]>::to_vec),
            self.key().map(<[u8]>::to_vec),
            topic.to_owned(),
            self.timestamp_ms()
                .map_or(Timestamp::NotAvailable, Timestamp::CreateTime),
            m.partition,
            m.offset,
            None,
        )
    }
}

impl Drop for RawMessage {
    fn drop(&mut self) {
        // SAFETY: librdkafka handed the message out once, and it is
        // destroyed once.
        unsafe { rd::rd_kafka_message_destroy(self.0.as_ptr()) }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use rdkafka::consumer::DefaultConsumerContext;
    use rdkafka::mocking::MockCluster;
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

    use super::*;

    /// What a test reads of a message: offset, key, payload, timestamp.
    type Seen = (i64, Option<Vec<u8>>, Option<Vec<u8>>, Option<i64>);

    #[test]
    fn a_batch_read_gives_each_message_in_order_as_produced() {
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic("t", 1, 1).unwrap();
        let brokers = cluster.bootstrap_servers();
        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .create()
            .unwrap();
        // A keyed event, a tombstone (key, no payload), an empty payload
        // without a key, then enough to take several batches.
        let to = || BaseRecord::<str, str>::to("t").partition(0);
        producer
            .send(to().key("k1").payload("p1").timestamp(1_000))
            .unwrap();
        producer.send(to().key("gone").timestamp(2_000)).unwrap();
        producer.send(to().payload("").timestamp(3_000)).unwrap();
        let keys: Vec<String> = (0..10).map(|i| format!("n{i}")).collect();
        for k in &keys {
            producer
                .send(to().key(k.as_str()).payload("x").timestamp(4_000))
                .unwrap();
        }
        producer.flush(Duration::from_secs(10)).unwrap();

        let consumer: Arc<BaseConsumer<DefaultConsumerContext>> = Arc::new(
            ClientConfig::new()
                .set("bootstrap.servers", &brokers)
                .set("group.id", "batch-test")
                .set("fetch.wait.max.ms", "10")
                .create()
                .unwrap(),
        );
        let queue = BatchQueue::split(&consumer, "t", 0).unwrap();
        let mut assignment = TopicPartitionList::new();
        assignment
            .add_partition_offset("t", 0, Offset::Beginning)
            .unwrap();
        consumer.assign(&assignment).unwrap();

        let mut seen: Vec<Seen> = Vec::new();
        let mut detached = Vec::new();
        let mut batch = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while seen.len() < 13 {
            assert!(Instant::now() < deadline, "read only {seen:?}");
            // Nothing of this partition reaches the consumer's own queue.
            assert!(consumer.poll(Duration::from_millis(5)).is_none());
            let n = queue.read(&mut batch, 4);
            assert!(n <= 4 && batch.len() == n, "{n} messages for a batch of 4");
            for m in batch.drain(..) {
                assert!(m.error().is_none(), "{:?}", m.error());
                seen.push((
                    m.offset(),
                    m.key().map(<[u8]>::to_vec),
                    m.payload().map(<[u8]>::to_vec),
                    m.timestamp_ms(),
                ));
                detached.push(m.detach("t"));
            }
        }
        let mut want: Vec<Seen> = vec![
            (0, Some(b"k1".to_vec()), Some(b"p1".to_vec()), Some(1_000)),
            (1, Some(b"gone".to_vec()), None, Some(2_000)),
            (2, None, Some(Vec::new()), Some(3_000)),
        ];
        want.extend(keys.iter().zip(3..).map(|(k, o)| {
            (
                o,
                Some(k.clone().into_bytes()),
                Some(b"x".to_vec()),
                Some(4_000),
            )
        }));
        assert_eq!(seen, want);
        // An owned copy says the same.
        for (m, (offset, key, payload, at)) in detached.iter().zip(&want) {
            assert_eq!(m.offset(), *offset);
            assert_eq!(m.key(), key.as_deref());
            assert_eq!(m.payload(), payload.as_deref());
            assert_eq!(m.timestamp().to_millis(), *at);
            assert_eq!((m.topic(), m.partition()), ("t", 0));
        }
        // Nothing more, and reading an empty queue does not wait.
        let started = Instant::now();
        assert_eq!(queue.read(&mut batch, 4), 0);
        assert!(batch.is_empty());
        assert!(started.elapsed() < Duration::from_secs(1));
    }
}
