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
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

/// What a [`Deduper`] remembers, as saved in a checkpoint: the ids with the
/// times they were first seen, oldest first.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DedupState {
    /// Ids by the time they were first seen, oldest first.
    pub by_time: Vec<(Time, Id)>,
}

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

    /// What it remembers, for a checkpoint.
    pub fn save(&self) -> DedupState {
        DedupState {
            by_time: self.by_time.iter().cloned().collect(),
        }
    }

    /// A deduper remembering what `saved` did (the states of one or more
    /// workers: a checkpoint restored into a different number of workers),
    /// keeping only the ids `mine` says this worker routes.
    pub fn restore(
        window: Time,
        saved: impl IntoIterator<Item = DedupState>,
        mine: impl Fn(&Id) -> bool,
    ) -> Self {
        let mut by_time: Vec<(Time, Id)> = saved
            .into_iter()
            .flat_map(|s| s.by_time)
            .filter(|(_, id)| mine(id))
            .collect();
        // Stable: each worker's ids keep their order within a millisecond.
        by_time.sort_by_key(|(t, _)| *t);
        Deduper {
            window,
            seen: by_time.iter().map(|(_, id)| id.clone()).collect(),
            by_time: by_time.into(),
        }
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
