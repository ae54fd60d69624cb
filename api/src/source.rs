//! Where one dataflow worker's events come from.
//!
//! The trait lives in the vocabulary crate, over std types only, so the log
//! implementations (the embedded log's feed, Kafka partitions) can implement
//! it without depending on timely; the dataflow's runtime only polls it.

use crate::{Event, Time};
use std::collections::VecDeque;
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

/// Where each recent log time starts in one log or partition, for
/// [`Source::resume_at`]: the offset of the first record read at each
/// time, and the offset after the last one.
#[derive(Debug, Default)]
pub struct Positions {
    firsts: VecDeque<(Time, u64)>,
    next: u64,
}

/// How much log time [`Positions`] remembers: a checkpoint's time is at
/// most a moment behind the frontier.
pub const POSITIONS_KEPT: Time = 120_000;

impl Positions {
    /// Positions of a log read from `offset` on.
    pub fn from(offset: u64) -> Positions {
        Positions {
            firsts: VecDeque::new(),
            next: offset,
        }
    }

    /// A record at `offset` was read, at log time `time` (times never go
    /// back).
    pub fn read(&mut self, time: Time, offset: u64) {
        if self.firsts.back().is_none_or(|(t, _)| *t < time) {
            self.firsts.push_back((time, offset));
        }
        self.next = self.next.max(offset + 1);
    }

    /// Forgets the times more than [`POSITIONS_KEPT`] before `frontier`.
    pub fn keep_near(&mut self, frontier: Time) {
        let keep_from = frontier.saturating_sub(POSITIONS_KEPT);
        while self.firsts.front().is_some_and(|(t, _)| *t < keep_from) {
            self.firsts.pop_front();
        }
    }

    /// The offset of the first record at or after `at`, or the next to
    /// come if none has come yet.
    pub fn resume_at(&self, at: Time) -> u64 {
        let first = self.firsts.iter().find(|(t, _)| *t >= at);
        first.map_or(self.next, |(_, offset)| *offset)
    }
}
