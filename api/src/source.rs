//! Where one dataflow worker's events come from.
//!
//! The trait lives in the vocabulary crate, over std types only, so the log
//! implementations (the embedded log's feed, Kafka partitions) can implement
//! it without depending on timely; the dataflow's runtime only polls it.

use crate::{Event, Time};
use std::time::Duration;

/// Where one worker's events come from.
pub trait Source {
    /// Moves the events that arrived into `out`, waiting up to `wait` when
    /// none has, and returns the frontier: no event still to come has an
    /// earlier time. `None` once the source has ended.
    fn poll(&mut self, out: &mut Vec<Event>, wait: Duration) -> Option<Time>;

    /// How long a caught-up worker waits for this source before it steps
    /// again anyway (other workers' messages do not wake it).
    fn idle_wait(&self) -> Duration {
        Duration::from_millis(1)
    }

    /// Where to resume reading to be given again every event at or after
    /// log time `at` (which the frontier has passed): `(source, offset)`
    /// pairs, one per log or partition read. Empty when the source cannot
    /// resume (a checkpoint is then of no use for restarting it).
    fn resume_at(&self, at: Time) -> Vec<(u64, u64)> {
        let _ = at;
        Vec::new()
    }
}
