//! leadscore: event-streaming lead scoring.
//!
//! The path of one event through the modules:
//!
//! 1. [`kafka`] polls a batch of messages from the input topics;
//! 2. [`decode`] turns each payload (JSON or Avro) into a validated
//!    [`event::Event`], or a reason that sends it to the dead-letter topic;
//! 3. [`pipeline`] looks the lead up in the in-memory [`dashmap::DashMap`]
//!    (loading it from [`store`] on first use), and hands event and state to
//!    the [`engine`], which is pure: it returns the new state and the
//!    decisions (segment changes, hand-offs), and says when decay will next
//!    move the lead so the pipeline can schedule it;
//! 4. [`output`] encodes the decisions with deterministic event ids and
//!    [`kafka`] produces them;
//! 5. every flush interval the pipeline waits for the produced outputs to be
//!    acknowledged, writes the changed leads and the partition positions to
//!    [`store`] (Redis) in one transaction, and only then commits offsets.
//!
//! Around it: [`settings`] (one typed configuration), [`metrics`]
//! (Prometheus), [`http`] (metrics, health, lead lookup), [`demo`] (a
//! self-contained run against an in-process broker), [`replay`] (scoring a
//! file with no Kafka or Redis, and comparing rules) and [`loadgen`] (the
//! end-to-end load generator).

pub mod decode;
pub mod demo;
pub mod engine;
pub mod event;
pub mod http;
pub mod kafka;
pub mod loadgen;
pub mod metrics;
pub mod output;
pub mod pipeline;
pub mod replay;
pub mod service;
pub mod settings;
pub mod store;
pub mod synth;
