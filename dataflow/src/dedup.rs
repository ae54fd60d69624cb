//! Dropping redelivered events.
//!
//! A retried POST or a producer retry appends an event id already seen.
//! [`Deduper`] remembers ids for a window of log time and lets only the first
//! occurrence (lowest time, then lowest offset) through. Forgetting is driven
//! by log time, so the result is a pure function of the log. Location pings
//! never reach it (see [`crate::graph::dedup`]): applying one twice changes
//! nothing, and remembering every ping would cost more memory than the whole
//! rider index.

use grabflow_api::{Event, Id, Time};
use rustc_hash::FxHashSet;
use std::collections::VecDeque;

/// Remembers event ids for `window` milliseconds of log time.
#[derive(Debug)]
pub struct Deduper {
    window: Time,
    seen: FxHashSet<Id>,
    /// Ids in the order they were first seen, with their times, to forget.
    by_time: VecDeque<(Time, Id)>,
}

impl Deduper {
    /// A deduper remembering ids for `window` ms.
    pub fn new(window: Time) -> Self {
        Deduper {
            window,
            seen: FxHashSet::default(),
            by_time: VecDeque::new(),
        }
    }

    /// Keeps the first occurrence of each id among `events`, all of
    /// millisecond `t` (given in any order), and returns them in offset order.
    pub fn admit(&mut self, t: Time, mut events: Vec<Event>) -> Vec<Event> {
        while let Some((seen_at, _)) = self.by_time.front() {
            if seen_at + self.window > t {
                break;
            }
            let (_, id) = self.by_time.pop_front().expect("checked above");
            self.seen.remove(&id);
        }
        // Offsets are unique: an unstable sort gives the one order.
        events.sort_unstable_by_key(|e| e.offset);
        events.retain(|e| {
            if self.seen.insert(e.id.clone()) {
                self.by_time.push_back((t, e.id.clone()));
                true
            } else {
                false
            }
        });
        events
    }

    /// Ids remembered.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// Whether no id is remembered.
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}
