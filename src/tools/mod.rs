//! Tools that ship in the `leadscore` binary but are not part of the
//! service: the self-contained demo, the load generator, `replay`, and the
//! synthetic event stream they share.

pub mod demo;
pub mod loadgen;
pub mod replay;
pub mod synth;
