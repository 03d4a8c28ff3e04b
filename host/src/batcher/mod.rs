//! Deciding what runs in each forward pass. Pure: no torch, no I/O, no clocks of its own, so
//! the rules are tested on their own.
//!
//! - [`chunks`]: one call's sequences split into length-sorted passes under the two limits.
//! - [`scheduler`]: sequences from every in-flight call and tenant, chosen batch by batch with
//!   length grouping, fairness by recent use per tenant, a bounded queue, deadlines and cancellation.

pub mod chunks;
pub mod scheduler;

pub use chunks::{BatchLimits, Chunk, ChunkOrder, plan_chunks};
