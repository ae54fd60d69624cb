//! How far appends may run ahead of the dataflow: backpressure, so a flood
//! of appends is answered 503 instead of growing memory.
//!
//! The writer counts events in as it commits them, and out once the
//! dataflow's progress (every decision before a time delivered) passes
//! their time. Beyond `limit` events ahead, appends of location pings are
//! refused with [`LogError::Behind`](crate::LogError::Behind) (a 503 with
//! `Retry-After`); any other event (an order, a grab, a shift) is refused
//! only beyond twice that, so dispatch goes on while pings are shed. The
//! check is made before an append is queued, so concurrent appends may
//! overshoot the limit by what is in flight at once.

use grabflow_api::{EventKind, Id, Time};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Events committed and not yet through the dataflow.
#[derive(Debug)]
pub struct Backlog {
    /// Events ahead beyond which pings are refused (0: no limit).
    limit: u64,
    /// Events committed whose time the dataflow has not passed.
    ahead: AtomicU64,
    /// Committed events by time, not yet passed: `(time, events)`.
    pending: Mutex<VecDeque<(Time, u64)>>,
}

impl Backlog {
    /// A backlog refusing pings beyond `limit` events ahead (0: never).
    pub fn new(limit: u64) -> Backlog {
        Backlog {
            limit,
            ahead: AtomicU64::new(0),
            pending: Mutex::new(VecDeque::new()),
        }
    }

    /// Events committed and not yet through the dataflow.
    pub fn ahead(&self) -> u64 {
        self.ahead.load(Ordering::Acquire)
    }

    /// The dataflow has delivered every decision before `time`.
    pub fn progress(&self, time: Time) {
        let mut pending = self.pending.lock().expect("backlog");
        let mut done = 0;
        while let Some(&(t, n)) = pending.front() {
            if t >= time {
                break;
            }
            done += n;
            pending.pop_front();
        }
        self.ahead.fetch_sub(done, Ordering::AcqRel);
    }

    /// Whether an append of `events` may be taken now.
    pub(crate) fn admits(&self, events: &[(Id, EventKind)]) -> bool {
        if self.limit == 0 {
            return true;
        }
        let pings = events
            .iter()
            .all(|(_, kind)| matches!(kind, EventKind::LocationPinged { .. }));
        let limit = if pings { self.limit } else { 2 * self.limit };
        self.ahead() < limit
    }

    /// Whether more than `limit` events are ahead and some of them are
    /// older than `time` (the dataflow can finish those now).
    pub(crate) fn holds_before(&self, limit: u64, time: Time) -> bool {
        self.ahead() > limit
            && self
                .pending
                .lock()
                .expect("backlog")
                .front()
                .is_some_and(|&(t, _)| t < time)
    }

    /// `n` events of `time` were committed.
    pub(crate) fn committed(&self, time: Time, n: u64) {
        if n == 0 {
            return;
        }
        let mut pending = self.pending.lock().expect("backlog");
        match pending.back_mut() {
            Some((t, count)) if *t == time => *count += n,
            _ => pending.push_back((time, n)),
        }
        self.ahead.fetch_add(n, Ordering::AcqRel);
    }
}
