//! Write-behind: a worker's shard changes are made durable on a background
//! thread, outputs first (every output produced before the write was taken is
//! acknowledged), then one atomic, fenced write per shard. The worker keeps
//! processing meanwhile; at most one write is in flight per worker.
//!
//! [`Policy`] is the one place that decides how a failure is handled: wait
//! and retry (with exponential back-off and jitter), give the shard up
//! (another member owns it now), or stop the process.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use rand::Rng;

use crate::sink::{Barrier, SinkError};
use crate::store::{ShardWrite, Store, StoreError, Written};

/// Why a write failed as a whole.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// Outputs were not acknowledged.
    #[error(transparent)]
    Sink(#[from] SinkError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The writer thread is gone.
    #[error("the state writer thread stopped")]
    Stopped,
}

/// What to do about a failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Keep everything pending and try again after this long.
    Retry(Duration),
    /// The shard is no longer ours: drop what it holds, write nothing.
    GiveUp,
    /// Stop the process: continuing could lose or corrupt state.
    Fatal(String),
}

/// The retry and back-off policy, shared by writes and loads.
#[derive(Debug, Clone)]
pub struct Policy {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Policy::new(Duration::from_millis(50), Duration::from_secs(2))
    }
}

impl Policy {
    /// Back-off from `min` doubling up to `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        Policy {
            min,
            max,
            next: min,
        }
    }

    /// A success: the next failure backs off from the minimum again.
    pub fn reset(&mut self) {
        self.next = self.min;
    }

    /// The next back-off: doubles each time, with full jitter in its upper half
    /// so that members retrying the same Redis do not retry in step.
    pub fn backoff(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        let half = base / 2;
        half + Duration::from_micros(rand::rng().random_range(0..=half.as_micros().max(1) as u64))
    }

    /// Decides what a failed write means.
    pub fn on_write_error(&mut self, error: &WriteError) -> Action {
        match error {
            WriteError::Sink(SinkError::Produce(e)) => Action::Fatal(format!(
                "outputs were not delivered, so the state that produced them cannot be committed: {e}"
            )),
            WriteError::Store(StoreError::Config(e)) => Action::Fatal(e.clone()),
            WriteError::Stopped => Action::Fatal("the state writer thread stopped".into()),
            WriteError::Sink(SinkError::Timeout(_)) | WriteError::Store(_) => {
                Action::Retry(self.backoff())
            }
        }
    }

    /// Decides what a shard's refused write means.
    pub fn on_refused(&self, outcome: &Written) -> Action {
        match outcome {
            Written::Ok => Action::Retry(Duration::ZERO),
            Written::Fenced(_) => Action::GiveUp,
            Written::Backwards(topic) => Action::Fatal(format!(
                "the stored position of {topic} is ahead of this member's: another member wrote it; \
                 refusing to move it backwards"
            )),
            Written::Diverged(stored) => Action::Fatal(format!(
                "Redis holds an older state of this shard than this member wrote (write {stored} \
                 stored, this member's later writes acknowledged): Redis lost acknowledged writes, \
                 as when a replica that had not received them is promoted, or an append-only file \
                 is cut short. Exiting so that a restart resumes from what Redis holds, which \
                 re-reads the events those writes covered"
            )),
            Written::Lost => Action::Fatal(
                "the shard's state is gone from Redis (flushed, evicted, or failed over to an empty \
                 replica) while this member was writing it; restore Redis from a backup or the \
                 replica that has the data (runbook: State lost). Going on from empty state would \
                 lose every score: that takes a new consumer group (README: Upgrading)"
                    .into(),
            ),
        }
    }
}

/// One write: everything a worker's shards changed, behind a barrier.
pub struct Job {
    /// Waits for the outputs produced before the write was taken.
    pub barrier: Barrier,
    /// One atomic write per shard.
    pub writes: Vec<ShardWrite>,
}

/// A finished write.
#[derive(Debug)]
pub struct Done {
    /// What was written (returned so the caller can account for it).
    pub writes: Vec<ShardWrite>,
    /// Per shard, in order, or the failure of the whole.
    pub outcome: Result<Vec<Written>, WriteError>,
    /// How long it took.
    pub took: Duration,
}

/// Runs one job in the calling thread.
pub fn run(store: &dyn Store, job: Job, ack_timeout: Duration) -> Done {
    let started = Instant::now();
    let outcome = job
        .barrier
        .wait(ack_timeout)
        .map_err(WriteError::from)
        .and_then(|()| store.write(&job.writes).map_err(WriteError::from));
    Done {
        writes: job.writes,
        outcome,
        took: started.elapsed(),
    }
}

/// A background writer thread with its own store connection.
pub struct WriteBehind {
    jobs: Sender<Job>,
    done: Receiver<Done>,
    in_flight: bool,
}

impl std::fmt::Debug for WriteBehind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteBehind")
            .field("in_flight", &self.in_flight)
            .finish_non_exhaustive()
    }
}

impl WriteBehind {
    /// Starts a writer thread named `name` writing through `store`.
    pub fn spawn(
        name: String,
        store: Arc<dyn Store>,
        ack_timeout: Duration,
    ) -> std::io::Result<Self> {
        let (jobs, jobs_rx) = crossbeam_channel::bounded::<Job>(1);
        let (done_tx, done) = crossbeam_channel::bounded(1);
        std::thread::Builder::new().name(name).spawn(move || {
            for job in jobs_rx {
                if done_tx.send(run(&*store, job, ack_timeout)).is_err() {
                    break;
                }
            }
        })?;
        Ok(WriteBehind {
            jobs,
            done,
            in_flight: false,
        })
    }

    /// Whether a write is in flight.
    pub fn busy(&self) -> bool {
        self.in_flight
    }

    /// Hands a job to the thread (one at a time).
    pub fn submit(&mut self, job: Job) -> Result<(), WriteError> {
        debug_assert!(!self.in_flight, "one write at a time");
        self.jobs.send(job).map_err(|_| WriteError::Stopped)?;
        self.in_flight = true;
        Ok(())
    }

    /// The finished write, if any.
    pub fn poll(&mut self) -> Option<Done> {
        if !self.in_flight {
            return None;
        }
        let d = self.done.try_recv().ok()?;
        self.in_flight = false;
        Some(d)
    }

    /// Waits for the write in flight, at most `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> Option<Result<Done, WriteError>> {
        if !self.in_flight {
            return None;
        }
        match self.done.recv_timeout(timeout) {
            Ok(d) => {
                self.in_flight = false;
                Some(Ok(d))
            }
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => None,
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                self.in_flight = false;
                Some(Err(WriteError::Stopped))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backs_off_with_jitter_up_to_the_maximum_and_classifies() {
        let mut p = Policy::new(Duration::from_millis(100), Duration::from_millis(800));
        let delays: Vec<Duration> = (0..6).map(|_| p.backoff()).collect();
        assert!(delays[0] >= Duration::from_millis(50) && delays[0] <= Duration::from_millis(100));
        assert!(delays[5] >= Duration::from_millis(400) && delays[5] <= Duration::from_millis(800));
        p.reset();
        assert!(p.backoff() <= Duration::from_millis(100));
        assert!(matches!(
            p.on_write_error(&WriteError::Sink(SinkError::Produce("x".into()))),
            Action::Fatal(_)
        ));
        assert!(matches!(
            p.on_write_error(&WriteError::Sink(SinkError::Timeout(3))),
            Action::Retry(_)
        ));
        assert_eq!(p.on_refused(&Written::Fenced(4)), Action::GiveUp);
        assert!(matches!(p.on_refused(&Written::Lost), Action::Fatal(_)));
    }
}
