//! Per-rider tracking: positions, shifts and the silence timeout.
//!
//! [`RiderTracker`] runs in the `track_riders` operator, partitioned by rider
//! across workers; this is where the bulk of the traffic (location pings)
//! is absorbed. For each millisecond it turns pings and shifts into changes
//! of the index collection: a rider is indexed while on shift, with a known
//! position, and pinged within `rider_ttl`. A rider with no ping or shift
//! for `rider_retention` is forgotten: it comes back off shift, with no
//! position.
//!
//! The trackers of a process's workers can be shared ([`RiderTables`]): the
//! rider query then reads a rider's last position where the dataflow keeps
//! it, instead of the egress view keeping a second copy by looking every
//! ping up again.

use crate::geo_index::CellShape;
use crate::IndexEntry;
use grabflow_api::{Coord, DispatchConfig, EventKind, Id, Time};
use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, MutexGuard};

#[derive(Debug)]
struct Track {
    rider: Id,
    at: Option<Coord>,
    last_ping: Time,
    /// Its last ping or shift.
    last_seen: Time,
    online: bool,
    /// The index entry last emitted for this rider.
    indexed: Option<(u64, Coord)>,
    /// The outline of the cell of the last position, to skip `cell_of`.
    shape: Option<Box<CellShape>>,
    /// When its check (silence, then retention) is due: the queue may hold
    /// other, stale entries for the slot, which are skipped.
    check: Option<Time>,
}

/// One rider of a [`RiderTracker`], as saved in a checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SavedTrack {
    rider: Id,
    at: Option<Coord>,
    last_ping: Time,
    last_seen: Time,
    online: bool,
    indexed: Option<(u64, Coord)>,
    /// When its check is due.
    check: Option<Time>,
}

/// What a [`RiderTracker`] holds, as saved in a checkpoint.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TrackerState {
    /// The riders tracked, in the order of their checks' queue.
    tracks: Vec<SavedTrack>,
}

/// The index entry of `rider` at `(cell, position)`.
fn entry(rider: &Id, (cell, at): (u64, Coord)) -> IndexEntry {
    IndexEntry {
        cell,
        rider: rider.clone(),
        at,
    }
}

/// The riders of one worker's partition.
#[derive(Debug)]
pub struct RiderTracker {
    ttl: Time,
    retention: Time,
    /// Each rider's slot in `tracks`: one hash lookup per ping, and none
    /// when the millisecond settles.
    riders: FxHashMap<Id, usize>,
    tracks: Vec<Track>,
    /// Slots of `tracks` left by riders dropped.
    free: Vec<usize>,
    /// Checks by time (slots): a rider's silence, then its retention.
    checks: BTreeMap<Time, Vec<usize>>,
    /// Slots touched in the current millisecond.
    touched: Vec<usize>,
    new_check_times: Vec<Time>,
}

impl RiderTracker {
    /// A tracker that takes riders silent for `ttl` milliseconds out of the
    /// index, and forgets riders with no ping or shift for `retention`
    /// (at least `ttl`).
    pub fn new(ttl: Time, retention: Time) -> Self {
        RiderTracker {
            ttl,
            retention: retention.max(ttl),
            riders: FxHashMap::default(),
            tracks: Vec::new(),
            free: Vec::new(),
            checks: BTreeMap::new(),
            touched: Vec::new(),
            new_check_times: Vec::new(),
        }
    }

    /// When `track` next needs a check: the end of its silence while it is
    /// indexed, else the end of its retention.
    fn next_check(&self, track: &Track) -> Time {
        if track.indexed.is_some() {
            track.last_ping.saturating_add(self.ttl)
        } else {
            track.last_seen.saturating_add(self.retention)
        }
    }

    /// Makes sure the track in `slot` is checked no later than it needs.
    fn schedule(&mut self, slot: usize) {
        let due = self.next_check(&self.tracks[slot]);
        let track = &mut self.tracks[slot];
        if track.check.is_some_and(|c| c <= due) || due == Time::MAX {
            return;
        }
        track.check = Some(due);
        self.checks.entry(due).or_default().push(slot);
        self.new_check_times.push(due);
    }

    /// Applies one ping or shift of millisecond `t` (call in offset order).
    pub fn apply(&mut self, kind: &EventKind, t: Time) {
        let Some(rider) = kind.rider() else { return };
        let slot = match self.riders.get(rider) {
            Some(&slot) => slot,
            None => {
                let track = Track {
                    rider: rider.clone(),
                    at: None,
                    last_ping: 0,
                    last_seen: t,
                    online: false,
                    indexed: None,
                    shape: None,
                    check: None,
                };
                let slot = match self.free.pop() {
                    Some(slot) => {
                        self.tracks[slot] = track;
                        slot
                    }
                    None => {
                        self.tracks.push(track);
                        self.tracks.len() - 1
                    }
                };
                self.riders.insert(rider.clone(), slot);
                slot
            }
        };
        let track = &mut self.tracks[slot];
        track.last_seen = t;
        match kind {
            EventKind::LocationPinged { at, .. } => {
                track.at = Some(*at);
                track.last_ping = t;
            }
            EventKind::ShiftChanged { online, .. } => track.online = *online,
            _ => {}
        }
        self.touched.push(slot);
    }

    /// Ends millisecond `t`: emits the index changes of the riders touched,
    /// then runs the checks due at `t`: a rider silent for the TTL leaves
    /// the index, one with no ping or shift for the retention is forgotten.
    pub fn settle(&mut self, t: Time, out: &mut Vec<(IndexEntry, isize)>) {
        let touched = std::mem::take(&mut self.touched);
        for &slot in &touched {
            let track = &mut self.tracks[slot];
            let fresh = track.last_ping + self.ttl > t;
            let want = match (track.online && fresh, track.at) {
                (true, Some(at)) => match &track.shape {
                    Some(shape) if shape.surely_contains(at) => Some((shape.cell, at)),
                    _ => {
                        let shape = CellShape::of(at);
                        let cell = shape.cell;
                        track.shape = Some(Box::new(shape));
                        Some((cell, at))
                    }
                },
                _ => None,
            };
            if want != track.indexed {
                if let Some(old) = track.indexed {
                    out.push((entry(&track.rider, old), -1));
                }
                if let Some(new) = want {
                    out.push((entry(&track.rider, new), 1));
                }
                track.indexed = want;
            }
            self.schedule(slot);
        }
        self.touched = touched;
        self.touched.clear();
        let Some(due) = self.checks.remove(&t) else {
            return;
        };
        for slot in due {
            let track = &mut self.tracks[slot];
            if track.check != Some(t) {
                continue; // stale: a sooner check was set since
            }
            track.check = None;
            if track.indexed.is_some() && track.last_ping + self.ttl <= t {
                let old = track.indexed.take().expect("indexed");
                out.push((entry(&track.rider, old), -1));
            }
            if track.indexed.is_none() && track.last_seen.saturating_add(self.retention) <= t {
                // Nothing left worth keeping. The slot is overwritten when
                // it is used again.
                self.riders.remove(&track.rider);
                track.shape = None;
                self.free.push(slot);
            } else {
                self.schedule(slot);
            }
        }
    }

    /// What it holds, for a checkpoint (between milliseconds).
    pub fn save(&self) -> TrackerState {
        // In the order of the checks' queue, then of the slots: a restored
        // tracker runs the checks of a millisecond in the same order.
        let mut slots: Vec<usize> = self.riders.values().copied().collect();
        slots.sort_by_key(|&s| (self.tracks[s].check.unwrap_or(Time::MAX), s));
        let tracks = slots
            .into_iter()
            .map(|slot| {
                let t = &self.tracks[slot];
                SavedTrack {
                    rider: t.rider.clone(),
                    at: t.at,
                    last_ping: t.last_ping,
                    last_seen: t.last_seen,
                    online: t.online,
                    indexed: t.indexed,
                    check: t.check,
                }
            })
            .collect();
        TrackerState { tracks }
    }

    /// A tracker holding what `saved` did (the states of one or more
    /// workers), keeping only the riders `mine` says this worker routes.
    /// Its pending checks are all new check times, to be woken at.
    pub fn restore(
        (ttl, retention): (Time, Time),
        saved: impl IntoIterator<Item = TrackerState>,
        mine: impl Fn(&Id) -> bool,
    ) -> Self {
        let mut tracker = RiderTracker::new(ttl, retention);
        let mut checks: Vec<(Time, usize)> = Vec::new();
        for state in saved {
            for t in state.tracks.into_iter().filter(|t| mine(&t.rider)) {
                let slot = tracker.tracks.len();
                if let Some(at) = t.check {
                    checks.push((at, slot));
                }
                tracker.riders.insert(t.rider.clone(), slot);
                tracker.tracks.push(Track {
                    rider: t.rider,
                    at: t.at,
                    last_ping: t.last_ping,
                    last_seen: t.last_seen,
                    online: t.online,
                    indexed: t.indexed,
                    shape: None,
                    check: t.check,
                });
            }
        }
        checks.sort_by_key(|(t, _)| *t);
        for (at, slot) in checks {
            tracker.checks.entry(at).or_default().push(slot);
        }
        tracker.new_check_times = tracker.checks.keys().copied().collect();
        tracker
    }

    /// Check times scheduled since the last call.
    pub fn take_new_check_times(&mut self) -> Vec<Time> {
        std::mem::take(&mut self.new_check_times)
    }

    /// The last position `rider` reported (up to the last millisecond
    /// handled), if it pinged within its retention.
    pub fn position(&self, rider: &Id) -> Option<Coord> {
        self.riders
            .get(rider)
            .and_then(|&slot| self.tracks[slot].at)
    }

    /// What this partition holds, for the operator's state figures: riders
    /// tracked (within their retention), and the milliseconds with a check
    /// due.
    pub fn sizes(&self) -> crate::stats::StateSizes {
        vec![
            ("riders", self.riders.len()),
            ("check_times", self.checks.len()),
        ]
    }

    /// Riders tracked by this partition.
    pub fn len(&self) -> usize {
        self.riders.len()
    }

    /// Whether this partition tracks no rider.
    pub fn is_empty(&self) -> bool {
        self.riders.is_empty()
    }
}

/// The hash that routes a rider's pings and shifts to its worker (the same
/// in every process).
pub fn rider_route(rider: &Id) -> u64 {
    let mut h = rustc_hash::FxHasher::default();
    rider.hash(&mut h);
    h.finish()
}

/// The rider trackers of a process's workers, shared with readers. Worker
/// `i` of `n` tracks the riders that [`RiderTables::worker_of`] gives to it
/// (the partitioning of the `track_riders` exchange).
#[derive(Clone, Debug)]
pub struct RiderTables(Arc<[Mutex<RiderTracker>]>);

impl RiderTables {
    /// Trackers for `workers` workers (all of the dataflow's), with `cfg`'s
    /// rider TTL and retention.
    pub fn new(workers: usize, cfg: &DispatchConfig) -> Self {
        RiderTables(
            (0..workers.max(1))
                .map(|_| Mutex::new(RiderTracker::new(cfg.rider_ttl_ms, cfg.rider_retention_ms)))
                .collect(),
        )
    }

    /// How many workers' trackers there are.
    pub fn workers(&self) -> usize {
        self.0.len()
    }

    /// The worker of `peers` that tracks `rider`, as timely's exchange
    /// routes [`rider_route`].
    pub fn worker_of(rider: &Id, peers: usize) -> usize {
        (rider_route(rider) % peers.max(1) as u64) as usize
    }

    /// Puts `tracker` in worker `index`'s slot (a restored checkpoint).
    pub fn replace(&self, index: usize, tracker: RiderTracker) {
        *self.lock(index) = tracker;
    }

    /// Worker `index`'s tracker, locked.
    pub fn lock(&self, index: usize) -> MutexGuard<'_, RiderTracker> {
        self.0[index].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Riders that pinged or changed shift within their retention.
    pub fn known(&self) -> usize {
        (0..self.0.len()).map(|i| self.lock(i).len()).sum()
    }

    /// Whether `rider` is tracked (it pinged or changed shift within its
    /// retention).
    pub fn tracks(&self, rider: &Id) -> bool {
        self.lock(Self::worker_of(rider, self.0.len()))
            .riders
            .contains_key(rider)
    }

    /// The last position `rider` reported (see [`RiderTracker::position`]).
    pub fn position(&self, rider: &Id) -> Option<Coord> {
        self.lock(Self::worker_of(rider, self.0.len()))
            .position(rider)
    }
}
