//! The clocks plugins see: the host's, rounded down to [`CLOCK_RESOLUTION`].
//!
//! Plugins need time for their own timing metadata, not nanoseconds: a fine timer is what
//! cache-timing side channels are built on, so none is granted.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use wasmtime_wasi::{HostMonotonicClock, HostWallClock};

use crate::CLOCK_RESOLUTION;

fn round_down(nanos: u128) -> u64 {
    let step = CLOCK_RESOLUTION.as_nanos();
    u64::try_from(nanos - nanos % step).unwrap_or(u64::MAX)
}

pub struct CoarseWallClock;

impl HostWallClock for CoarseWallClock {
    fn resolution(&self) -> std::time::Duration {
        CLOCK_RESOLUTION
    }

    fn now(&self) -> std::time::Duration {
        let since_epoch = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        std::time::Duration::from_nanos(round_down(since_epoch.as_nanos()))
    }
}

/// Counts from the instance's creation, so it tells nothing of the host's uptime either.
pub struct CoarseMonotonicClock(Instant);

impl CoarseMonotonicClock {
    pub fn new() -> Self {
        Self(Instant::now())
    }
}

impl HostMonotonicClock for CoarseMonotonicClock {
    fn resolution(&self) -> u64 {
        CLOCK_RESOLUTION.as_nanos() as u64
    }

    fn now(&self) -> u64 {
        round_down(self.0.elapsed().as_nanos())
    }
}
