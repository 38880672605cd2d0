//! The event-time merge of one shard's inputs (the same partition number of
//! every input topic).
//!
//! Each input is a FIFO queue in offset order. The merge releases the input
//! head with the smallest (event time, input index) once no other input can
//! still deliver something earlier: every other input either has a head of
//! its own, or has already shown an event time past the candidate (less the
//! allowed lateness), or is idle (caught up with its partition and quiet for
//! the idle time). Under those rules the release order is a function of the
//! four partitions' contents, not of how their fetches interleave, so a
//! restart that re-reads the unreleased tail reproduces the same order.
//!
//! Messages without an event time (poison, erasure tombstones) leave as soon
//! as they reach the head of their queue. Nothing here reads a clock.

use std::collections::VecDeque;

use crate::event::Millis;

/// One queued message.
#[derive(Debug)]
pub struct Queued<T> {
    /// Its offset in its partition.
    pub offset: i64,
    /// Its event time; `None` leaves at once when at the head.
    pub at: Option<Millis>,
    /// The payload.
    pub item: T,
}

/// A message the merge let through.
#[derive(Debug)]
pub struct Released<T> {
    /// Which input.
    pub input: usize,
    /// Offset in that input's partition.
    pub offset: i64,
    /// Event time, if it has one.
    pub at: Option<Millis>,
    /// Whether it is later than something released before it (it arrived
    /// after the merge had moved past its time).
    pub late: bool,
    /// The payload.
    pub item: T,
}

#[derive(Debug)]
struct Input<T> {
    queue: VecDeque<Queued<T>>,
    /// Largest event time seen on this input (released or queued).
    seen: Millis,
    /// Caught up and quiet: does not hold the others back.
    idle: bool,
}

/// The merge of a shard's inputs.
#[derive(Debug)]
pub struct Merge<T> {
    inputs: Vec<Input<T>>,
    lateness: Millis,
    released: Millis,
    queued: usize,
}

/// A time before every event.
pub const NEVER: Millis = i64::MIN;

impl<T> Merge<T> {
    /// A merge of `inputs` inputs tolerating `lateness` ms of disorder within an input.
    pub fn new(inputs: usize, lateness: Millis) -> Self {
        Merge {
            inputs: (0..inputs)
                .map(|_| Input {
                    queue: VecDeque::new(),
                    seen: NEVER,
                    idle: false,
                })
                .collect(),
            lateness: lateness.max(0),
            released: NEVER,
            queued: 0,
        }
    }

    /// Restores what an input had shown before a restart (its largest event
    /// time among the messages already applied) and the merge's progress.
    pub fn restore(&mut self, input: usize, seen: Millis, released: Millis) {
        if let Some(i) = self.inputs.get_mut(input) {
            i.seen = i.seen.max(seen);
        }
        self.released = self.released.max(released);
    }

    /// Queues a message of `input`.
    pub fn push(&mut self, input: usize, offset: i64, at: Option<Millis>, item: T) {
        let i = &mut self.inputs[input];
        if let Some(t) = at {
            i.seen = i.seen.max(t);
        }
        i.idle = false;
        i.queue.push_back(Queued { offset, at, item });
        self.queued += 1;
    }

    /// Marks an input idle (caught up and quiet) or active.
    pub fn set_idle(&mut self, input: usize, idle: bool) {
        if let Some(i) = self.inputs.get_mut(input) {
            i.idle = idle && i.queue.is_empty();
        }
    }

    /// Whether an input is idle.
    pub fn is_idle(&self, input: usize) -> bool {
        self.inputs.get(input).is_some_and(|i| i.idle)
    }

    /// Whether every input is idle.
    pub fn all_idle(&self) -> bool {
        self.inputs.iter().all(|i| i.idle)
    }

    /// Messages queued in all inputs.
    pub fn queued(&self) -> usize {
        self.queued
    }

    /// Messages queued in one input.
    pub fn queued_in(&self, input: usize) -> usize {
        self.inputs.get(input).map_or(0, |i| i.queue.len())
    }

    /// The largest event time seen on an input.
    pub fn seen(&self, input: usize) -> Millis {
        self.inputs.get(input).map_or(NEVER, |i| i.seen)
    }

    /// The largest event time released so far.
    pub fn released(&self) -> Millis {
        self.released
    }

    /// The earliest event time any input may still deliver (its watermark):
    /// the smallest over non-idle inputs of their head, or of what they have
    /// shown less the allowed lateness.
    pub fn watermark(&self) -> Millis {
        self.inputs
            .iter()
            .filter(|i| !i.idle)
            .map(|i| match i.queue.front() {
                Some(q) => q.at.unwrap_or(NEVER),
                None => i.seen.saturating_sub(self.lateness),
            })
            .min()
            .unwrap_or(Millis::MAX)
    }

    /// Lets the next message through, if the rules allow one.
    pub fn pop(&mut self) -> Option<Released<T>> {
        // Messages without a time leave first: they change no state.
        if let Some(input) = self
            .inputs
            .iter()
            .position(|i| i.queue.front().is_some_and(|q| q.at.is_none()))
        {
            return self.take(input);
        }
        let (input, at) = self
            .inputs
            .iter()
            .enumerate()
            .filter_map(|(n, i)| i.queue.front().map(|q| (n, q.at.unwrap_or(NEVER))))
            .min_by_key(|(n, at)| (*at, *n))?;
        let blocked = self.inputs.iter().enumerate().any(|(n, i)| {
            n != input
                && i.queue.is_empty()
                && !i.idle
                && !(at < i.seen.saturating_sub(self.lateness)
                    || (at == i.seen.saturating_sub(self.lateness) && input < n))
        });
        if blocked {
            return None;
        }
        self.take(input)
    }

    fn take(&mut self, input: usize) -> Option<Released<T>> {
        let q = self.inputs[input].queue.pop_front()?;
        self.queued -= 1;
        let late = q.at.is_some_and(|t| t < self.released);
        if let Some(t) = q.at {
            self.released = self.released.max(t);
        }
        Some(Released {
            input,
            offset: q.offset,
            at: q.at,
            late,
            item: q.item,
        })
    }

    /// Drops everything queued (a shard given up); returns how many.
    pub fn clear(&mut self) -> usize {
        let n = self.queued;
        for i in &mut self.inputs {
            i.queue.clear();
        }
        self.queued = 0;
        n
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn drain(m: &mut Merge<u32>) -> Vec<(usize, u32)> {
        let mut out = Vec::new();
        while let Some(r) = m.pop() {
            out.push((r.input, r.item));
        }
        out
    }

    #[test]
    fn waits_for_inputs_that_may_deliver_earlier() {
        let mut m = Merge::new(2, 0);
        m.push(0, 0, Some(10), 1);
        assert!(m.pop().is_none(), "input 1 has shown nothing yet");
        m.push(1, 0, Some(5), 2);
        assert_eq!(
            drain(&mut m),
            vec![(1, 2)],
            "5 first; then 10 waits for input 1 again"
        );
        m.push(1, 1, Some(12), 3);
        assert_eq!(drain(&mut m), vec![(0, 1)]);
        m.set_idle(0, true);
        assert_eq!(
            drain(&mut m),
            vec![(1, 3)],
            "an idle input does not hold back"
        );
    }

    #[test]
    fn messages_without_time_leave_at_once_from_the_head() {
        let mut m = Merge::new(2, 0);
        m.push(0, 0, None, 9);
        assert_eq!(drain(&mut m), vec![(0, 9)]);
    }

    #[test]
    fn lateness_is_the_disorder_an_input_may_still_deliver() {
        let mut m = Merge::new(2, 100);
        m.push(1, 0, Some(1000), 1);
        m.push(0, 0, Some(800), 2);
        assert_eq!(drain(&mut m), vec![(0, 2)]);
        assert!(m.pop().is_none(), "input 0 may still deliver 700 and later");
        m.push(0, 1, Some(1050), 3);
        assert_eq!(
            drain(&mut m),
            vec![(1, 1)],
            "1000 first; 1050 waits for input 1 to pass 1150"
        );
        m.push(1, 1, Some(1200), 4);
        assert_eq!(drain(&mut m), vec![(0, 3)]);
    }

    /// The order of release depends only on each input's sequence, not on
    /// how arrivals interleave (each input's times in order, nothing idle
    /// until everything has arrived).
    fn merged(streams: &[Vec<i64>], arrival: &[usize]) -> Vec<(usize, usize)> {
        let mut m = Merge::new(streams.len(), 0);
        let mut next = vec![0usize; streams.len()];
        let mut out = Vec::new();
        for &input in arrival {
            if next[input] < streams[input].len() {
                let at = streams[input][next[input]];
                m.push(input, next[input] as i64, Some(at), next[input] as u32);
                next[input] += 1;
            }
            while let Some(r) = m.pop() {
                out.push((r.input, r.item as usize));
            }
        }
        for (input, stream) in streams.iter().enumerate() {
            while next[input] < stream.len() {
                let at = stream[next[input]];
                m.push(input, next[input] as i64, Some(at), next[input] as u32);
                next[input] += 1;
            }
        }
        for input in 0..streams.len() {
            m.set_idle(input, true);
        }
        loop {
            let before = out.len();
            while let Some(r) = m.pop() {
                out.push((r.input, r.item as usize));
            }
            for input in 0..streams.len() {
                m.set_idle(input, true);
            }
            if out.len() == before {
                break;
            }
        }
        out
    }

    proptest! {
        #[test]
        fn any_interleaving_gives_the_same_order(
            gaps in proptest::collection::vec(proptest::collection::vec(0i64..50, 0..30), 4),
            arrival in proptest::collection::vec(0usize..4, 0..200),
        ) {
            let streams: Vec<Vec<i64>> = gaps
                .iter()
                .map(|g| g.iter().scan(0i64, |t, d| { *t += d; Some(*t) }).collect())
                .collect();
            let reference = merged(&streams, &[]);
            prop_assert_eq!(merged(&streams, &arrival), reference.clone());
            prop_assert_eq!(reference.len(), streams.iter().map(Vec::len).sum::<usize>());
        }
    }
}
