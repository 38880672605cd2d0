//! leadscore: event-streaming lead scoring.
//!
//! The path of one event through the modules:
//!
//! 1. [`kafka`]: the consumer group assigns partition `p` of the first input
//!    topic; partition `p` of every other input follows, and together they
//!    form *shard* `p`. Each shard is owned by one worker thread, which reads
//!    its partitions' queues ([`kafka::worker`]);
//! 2. [`decode`] turns each payload (JSON, Avro, or Schema-Registry-framed
//!    Avro) into a validated [`event::Event`], or a reason that sends it to the
//!    dead-letter topic;
//! 3. [`shard`] merges the shard's inputs in event-time order behind a
//!    watermark ([`shard::merge`]), loads the leads an event needs into its
//!    bounded cache ([`shard::cache`]), fires decay timers as the shard's
//!    clock passes them ([`shard::timers`]), and hands event and state to the
//!    [`engine`], which is pure: it decides identity, returns the new state
//!    and the decisions (segment changes, hand-offs), and says when time
//!    alone will next change the lead;
//! 4. [`output`] encodes the decisions with deterministic event ids and the
//!    worker's [`sink`] produces them;
//! 5. every flush interval the worker's write-behind ([`writer`]) waits for
//!    the outputs to be acknowledged, then writes each changed shard to the
//!    [`store`] in one atomic, fenced step (leads, timers, positions, clock),
//!    and only then stores the offsets for commit.
//!
//! Around it: [`settings`] (one typed configuration), [`metrics`]
//! (Prometheus), [`http`] (metrics, health, the lead API) and [`service`]
//! (the wiring and the cancellation tree). The demo, the load generator,
//! `replay` and the synthetic stream live in the `leadscore` binary
//! (`src/tools/`), outside the library.

pub mod decode;
pub mod engine;
pub mod event;
pub mod http;
pub mod kafka;
pub mod metrics;
pub mod output;
pub mod registry;
pub mod service;
pub mod settings;
pub mod shard;
pub mod sink;
pub mod store;
pub mod writer;
