//! Where a shard's outputs go: a small trait with the Kafka producer behind
//! it in the service (`crate::kafka::sink`) and in-memory doubles in tests,
//! `replay` and benchmarks.

use std::time::Duration;

use crate::decode::DecodeError;
use crate::output::Record;

/// Why the output side failed.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The producer could not take or deliver a record: the state that
    /// produced it must not be committed (fatal for the process, which
    /// restarts from the last durable position).
    #[error("produce failed: {0}")]
    Produce(String),
    /// Acknowledgements did not arrive in time (retryable).
    #[error("timed out waiting for {0} output acknowledgements")]
    Timeout(usize),
}

impl SinkError {
    /// Whether waiting and retrying may help.
    pub fn retryable(&self) -> bool {
        matches!(self, SinkError::Timeout(_))
    }
}

/// A rejected input message, as dead-lettered.
#[derive(Debug, Clone, Copy)]
pub struct DeadLetter<'a> {
    /// Source topic.
    pub topic: &'a str,
    /// Source partition.
    pub partition: i32,
    /// Source offset.
    pub offset: i64,
    /// The original key.
    pub key: Option<&'a [u8]>,
    /// The original payload, cut to the dead-letter size limit.
    pub payload: Option<&'a [u8]>,
    /// The original payload's size in bytes.
    pub original_size: usize,
    /// xxh3-64 of the original payload, hex (when it was cut).
    pub original_hash: Option<&'a str>,
    /// Why it was rejected.
    pub error: &'a DecodeError,
}

/// Outputs of the shards of one worker.
pub trait Sink: Send {
    /// Queues an output record.
    fn send(&mut self, record: &Record) -> Result<(), SinkError>;
    /// Queues a dead letter.
    fn dead_letter(&mut self, letter: &DeadLetter<'_>) -> Result<(), SinkError>;
    /// A barrier behind every record queued so far: waiting on it returns
    /// once they are all acknowledged (it may be waited on in another thread).
    fn barrier(&mut self) -> Barrier;
}

type WaitFn = Box<dyn FnOnce(Duration) -> Result<(), SinkError> + Send>;

/// Waits for the acknowledgement of the records queued before it was taken.
pub struct Barrier(Option<WaitFn>);

impl Barrier {
    /// A barrier with nothing to wait for.
    pub fn ready() -> Self {
        Barrier(None)
    }

    /// A barrier that waits with `f`.
    pub fn new(f: impl FnOnce(Duration) -> Result<(), SinkError> + Send + 'static) -> Self {
        Barrier(Some(Box::new(f)))
    }

    /// Waits at most `timeout`.
    pub fn wait(self, timeout: Duration) -> Result<(), SinkError> {
        match self.0 {
            Some(f) => f(timeout),
            None => Ok(()),
        }
    }
}

impl std::fmt::Debug for Barrier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Barrier")
    }
}

/// A dead letter as [`MemorySink`] keeps it: topic, partition, offset,
/// reason, and how many payload bytes were kept.
pub type KeptDeadLetter = (String, i32, i64, String, usize);

/// A sink that keeps everything in memory (tests, `replay`, benchmarks).
#[derive(Debug, Default, Clone)]
pub struct MemorySink {
    /// Output records in order.
    pub records: std::sync::Arc<parking_lot::Mutex<Vec<Record>>>,
    /// Dead letters, in order.
    pub dead: std::sync::Arc<parking_lot::Mutex<Vec<KeptDeadLetter>>>,
}

impl Sink for MemorySink {
    fn send(&mut self, record: &Record) -> Result<(), SinkError> {
        self.records.lock().push(record.clone());
        Ok(())
    }

    fn dead_letter(&mut self, l: &DeadLetter<'_>) -> Result<(), SinkError> {
        self.dead.lock().push((
            l.topic.to_owned(),
            l.partition,
            l.offset,
            l.error.to_string(),
            l.payload.map_or(0, <[u8]>::len),
        ));
        Ok(())
    }

    fn barrier(&mut self) -> Barrier {
        Barrier::ready()
    }
}
