//! Checkpoints of the dataflow: every stateful operator's state on every
//! worker, as of one log time, with where each worker's source resumes.
//!
//! A checkpoint is taken *at* a time `at`: each operator saves its state
//! once every millisecond before `at` is handled and none at or after it;
//! each worker notes where its source must resume to give every event at or
//! after `at` again. Restored, the operators start with that state and the
//! sources re-read from there: everything the dataflow decides from `at`
//! on is what it would have decided had it never stopped (the decisions are
//! a pure function of the log, and the state at `at` is what the log before
//! `at` made).
//!
//! Worker 0 asks for a checkpoint (`Checkpointing::due`) at its input's
//! time, which no operator anywhere can have passed: an operator handles a
//! millisecond only once every worker's input has. Each worker pokes its
//! operators when a request appears, so an operator with nothing to do
//! saves too. The parts meet in [`Checkpointing`]; once all are there (and
//! the observer's own state, saved by worker 0 between the decisions before
//! `at` and those after), the whole goes to the `done` callback, as a
//! [`Taken`] checkpoint.
//!
//! Saving does not encode. Each part is a [`Snapshot`]: a copy of the state
//! (cheap: what is large is shared, e.g. the view's stream messages) that
//! encodes itself when the checkpoint's writer calls [`Taken::encode`], on
//! its own thread. So a checkpoint stalls the dataflow only for the copies
//! (the service bench measures it), not for the encoding.
//!
//! In one process only: the request is read from shared memory. A cluster
//! of processes runs without checkpoints (see `docs/operations.md`).

use crate::dedup::{DedupState, Deduper};
use crate::dispatcher::Dispatcher;
use crate::riders::{RiderTracker, TrackerState};
use grabflow_api::{DispatchConfig, Id, Time};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// A stateful operator of the dispatch dataflow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Stateful {
    /// `dedup`, partitioned by event id.
    Dedup,
    /// `track_riders`, partitioned by rider id.
    TrackRiders,
    /// `decide`, on worker 0.
    Decide,
}

/// The stateful operators, each on every worker.
pub const OPERATORS: [Stateful; 3] = [Stateful::Dedup, Stateful::TrackRiders, Stateful::Decide];

/// A state as of a checkpoint's time that encodes itself (postcard) when
/// called: taken on the dataflow's threads, called off them.
pub type Snapshot = Box<dyn FnOnce() -> Vec<u8> + Send>;

/// A snapshot of a state already encoded (or cheap to encode at once).
pub fn encoded(bytes: Vec<u8>) -> Snapshot {
    Box::new(move || bytes)
}

/// A snapshot encoding `state` (an owned copy) when called.
pub fn snapshot<S: Serialize + Send + 'static>(state: S) -> Snapshot {
    Box::new(move || postcard::to_allocvec(&state).expect("states serialize"))
}

/// Where a source resumes: `(source, offset)` pairs (the embedded log is
/// one source; Kafka has one per input partition).
pub type Position = Vec<(u64, u64)>;

/// The dataflow's part of a checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DataflowState {
    /// Every decision before this log time is made, none at or after it.
    pub at: Time,
    /// The workers it was taken with.
    pub workers: usize,
    /// Each operator's state on each worker, in postcard.
    pub parts: Vec<(Stateful, usize, Vec<u8>)>,
    /// Where each worker's source resumes.
    pub positions: Vec<(usize, Position)>,
    /// The observer's state as of `at` (the egress view), as it saved it.
    pub observer: Vec<u8>,
}

/// Why a checkpoint could not be restored.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// A part did not decode.
    #[error("the checkpoint's {0:?} state does not decode: {1}")]
    Decode(Stateful, postcard::Error),
}

impl DataflowState {
    /// Where to resume reading: for each source, the earliest position any
    /// worker gave (workers reading one source all give the same).
    pub fn resume(&self) -> Position {
        let mut at: std::collections::BTreeMap<u64, u64> = Default::default();
        for (source, offset) in self.positions.iter().flat_map(|(_, p)| p) {
            let slot = at.entry(*source).or_insert(*offset);
            *slot = (*slot).min(*offset);
        }
        at.into_iter().collect()
    }

    fn parts_of(&self, op: Stateful) -> impl Iterator<Item = &[u8]> {
        self.parts
            .iter()
            .filter(move |(o, _, _)| *o == op)
            .map(|(_, _, b)| b.as_slice())
    }

    /// The dedup state of worker `me` of `peers`: every saved worker's ids
    /// that route to it (the number of workers may differ from the saved).
    pub fn dedup(&self, window: Time, mine: impl Fn(&Id) -> bool) -> Result<Deduper, RestoreError> {
        let saved = self
            .parts_of(Stateful::Dedup)
            .map(postcard::from_bytes::<DedupState>)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| RestoreError::Decode(Stateful::Dedup, e))?;
        Ok(Deduper::restore(window, saved, mine))
    }

    /// The rider tracker of a worker: every saved worker's riders that
    /// route to it.
    pub fn tracker(
        &self,
        limits: (Time, Time),
        mine: impl Fn(&Id) -> bool,
    ) -> Result<RiderTracker, RestoreError> {
        let saved = self
            .parts_of(Stateful::TrackRiders)
            .map(postcard::from_bytes::<TrackerState>)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| RestoreError::Decode(Stateful::TrackRiders, e))?;
        Ok(RiderTracker::restore(limits, saved, mine))
    }

    /// The decision core (saved on worker 0, where it runs).
    pub fn dispatcher(&self, cfg: DispatchConfig) -> Result<Dispatcher, RestoreError> {
        let saved = self
            .parts
            .iter()
            .find(|(o, w, _)| *o == Stateful::Decide && *w == 0)
            .map(|(_, _, b)| postcard::from_bytes::<Dispatcher>(b))
            .transpose()
            .map_err(|e| RestoreError::Decode(Stateful::Decide, e))?;
        Ok(match saved {
            Some(d) => Dispatcher::restore(cfg, d),
            None => Dispatcher::new(cfg),
        })
    }
}

/// The state of a checkpoint being gathered.
#[derive(Default)]
struct Gathering {
    parts: Vec<(Stateful, usize, Snapshot)>,
    positions: Vec<(usize, Position)>,
    observer: Option<Snapshot>,
}

/// A checkpoint taken: every part as of its time, not yet encoded.
pub struct Taken {
    /// Every decision before this log time is made, none at or after it.
    pub at: Time,
    workers: usize,
    parts: Vec<(Stateful, usize, Snapshot)>,
    positions: Vec<(usize, Position)>,
    observer: Snapshot,
}

impl Taken {
    /// Encodes every part (the costly step; off the dataflow's threads).
    pub fn encode(self) -> DataflowState {
        DataflowState {
            at: self.at,
            workers: self.workers,
            parts: self
                .parts
                .into_iter()
                .map(|(op, worker, part)| (op, worker, part()))
                .collect(),
            positions: self.positions,
            observer: (self.observer)(),
        }
    }
}

/// Asks for checkpoints and gathers their parts (shared by the workers of
/// one process).
pub struct Checkpointing {
    /// Log time between checkpoints.
    interval: Time,
    /// The time of the checkpoint asked for and not yet complete (0: none).
    request: AtomicU64,
    /// The time of the last complete checkpoint (or the restored one).
    last: AtomicU64,
    workers: AtomicU64,
    gathering: Mutex<Gathering>,
    #[allow(clippy::type_complexity)]
    done: Box<dyn Fn(Taken) + Send + Sync>,
}

impl Checkpointing {
    /// Checkpoints every `interval` ms of log time (the first one `interval`
    /// after `since`, the restored checkpoint's time, or after the first
    /// time worker 0 looks when 0) and at a
    /// graceful end, each handed to `done` once whole; none with an
    /// `interval` of 0 (the workers still start from a restored one).
    pub fn new(interval: Time, since: Time, done: impl Fn(Taken) + Send + Sync + 'static) -> Self {
        Checkpointing {
            interval,
            request: AtomicU64::new(0),
            last: AtomicU64::new(since),
            workers: AtomicU64::new(1),
            gathering: Mutex::new(Gathering::default()),
            done: Box::new(done),
        }
    }

    /// The workers that take part (set when the dataflow starts).
    pub(crate) fn set_workers(&self, workers: usize) {
        self.workers.store(workers as u64, Ordering::Release);
    }

    /// The checkpoint asked for and not complete, if any.
    pub fn requested(&self) -> Option<Time> {
        match self.request.load(Ordering::Acquire) {
            0 => None,
            t => Some(t),
        }
    }

    /// Worker 0, its input at `now`: asks for a checkpoint at `now` if one
    /// is due (or `now` is the end and it has moved since the last one).
    /// Returns whether it asked.
    pub(crate) fn due(&self, now: Time, ending: bool) -> bool {
        if self.interval == 0 {
            return false;
        }
        let last = self.last.load(Ordering::Acquire);
        if last == 0 && !ending {
            // A fresh start: the first checkpoint is an interval from now.
            self.last.store(now, Ordering::Release);
            return false;
        }
        let due = now > last && (ending || now >= last.saturating_add(self.interval));
        let open = self.requested();
        // At the end, one still open is replaced by the one at the end.
        if due && (open.is_none() || (ending && open != Some(now))) {
            let mut g = self.gathering.lock().expect("gathering");
            *g = Gathering::default();
            self.request.store(now, Ordering::Release);
            return true;
        }
        false
    }

    /// An operator's state on `worker`, as of `at` (ignored unless `at`
    /// is still the time asked for).
    pub(crate) fn part(&self, at: Time, op: Stateful, worker: usize, state: Snapshot) {
        let mut g = self.gathering.lock().expect("gathering");
        if self.requested() == Some(at) {
            g.parts.push((op, worker, state));
            self.complete(g);
        }
    }

    /// Where `worker`'s source resumes for `at`.
    pub(crate) fn position(&self, at: Time, worker: usize, position: Position) {
        let mut g = self.gathering.lock().expect("gathering");
        if self.requested() == Some(at) {
            g.positions.push((worker, position));
            self.complete(g);
        }
    }

    /// The observer's state as of `at` (worker 0).
    pub(crate) fn observer(&self, at: Time, state: Snapshot) {
        let mut g = self.gathering.lock().expect("gathering");
        if self.requested() == Some(at) {
            g.observer = Some(state);
            self.complete(g);
        }
    }

    /// Hands the checkpoint over once every part is in.
    fn complete(&self, mut g: std::sync::MutexGuard<'_, Gathering>) {
        let workers = self.workers.load(Ordering::Acquire) as usize;
        let whole = g.parts.len() == OPERATORS.len() * workers
            && g.positions.len() == workers
            && g.observer.is_some();
        let Some(at) = self.requested() else { return };
        if !whole {
            return;
        }
        let mut g = std::mem::take(&mut *g);
        g.parts.sort_by_key(|(o, w, _)| (*o, *w));
        g.positions.sort_by_key(|(w, _)| *w);
        let taken = Taken {
            at,
            workers,
            parts: g.parts,
            positions: g.positions,
            observer: g.observer.unwrap_or_else(|| encoded(Vec::new())),
        };
        self.last.store(at, Ordering::Release);
        self.request.store(0, Ordering::Release);
        (self.done)(taken);
    }
}
