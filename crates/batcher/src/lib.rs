//! Deciding what runs in each forward pass. Pure: no torch, no I/O, no clocks of its own, so
//! the rules are tested on their own.
//!
//! - [`chunks`]: one call's sequences split into length-sorted passes under the two limits.
//! - [`cost`]: a forward pass's time predicted from its shape, fitted to measured passes.
//! - [`scheduler`]: sequences from every in-flight call and tenant, chosen batch by batch with
//!   length grouping, fairness by recent use per tenant, a time target per pass, a bounded queue
//!   with a share per tenant, deadlines and cancellation.

pub mod chunks;
pub mod cost;
pub mod scheduler;

pub use chunks::{BatchLimits, Chunk, ChunkOrder, plan_chunks};
