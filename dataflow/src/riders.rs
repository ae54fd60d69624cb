//! Per-rider tracking: positions, shifts and the silence timeout.
//!
//! [`RiderTracker`] runs in the `track_riders` operator, partitioned by rider
//! across workers; this is where the bulk of the traffic (location pings)
//! is absorbed. For each millisecond it turns pings and shifts into changes
//! of the index collection: a rider is indexed while on shift, with a known
//! position, and pinged within `rider_ttl`.

use crate::geo_index::CellShape;
use crate::IndexEntry;
use grabflow_api::{Coord, EventKind, Id, Time};
use rustc_hash::FxHashMap;
use std::collections::BTreeMap;

#[derive(Debug, Default)]
struct Track {
    at: Option<Coord>,
    last_ping: Time,
    online: bool,
    /// The index entry last emitted for this rider.
    indexed: Option<(u64, Coord)>,
    /// The outline of the cell of the last position, to skip `cell_of`.
    shape: Option<Box<CellShape>>,
    /// Whether a silence check is scheduled.
    check_pending: bool,
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
    riders: FxHashMap<Id, Track>,
    /// Silence checks by time; at most one pending per rider.
    checks: BTreeMap<Time, Vec<Id>>,
    /// Riders touched in the current millisecond.
    touched: Vec<Id>,
    new_check_times: Vec<Time>,
}

impl RiderTracker {
    /// A tracker that drops riders silent for `ttl` milliseconds.
    pub fn new(ttl: Time) -> Self {
        RiderTracker {
            ttl,
            riders: FxHashMap::default(),
            checks: BTreeMap::new(),
            touched: Vec::new(),
            new_check_times: Vec::new(),
        }
    }

    /// Applies one ping or shift of millisecond `t` (call in offset order).
    pub fn apply(&mut self, kind: &EventKind, t: Time) {
        let Some(rider) = kind.rider() else { return };
        let track = match self.riders.get_mut(rider) {
            Some(track) => track,
            None => self.riders.entry(rider.clone()).or_default(),
        };
        match kind {
            EventKind::LocationPinged { at, .. } => {
                track.at = Some(*at);
                track.last_ping = t;
                if !track.check_pending {
                    track.check_pending = true;
                    self.checks
                        .entry(t + self.ttl)
                        .or_default()
                        .push(rider.clone());
                    self.new_check_times.push(t + self.ttl);
                }
            }
            EventKind::ShiftChanged { online, .. } => track.online = *online,
            _ => {}
        }
        self.touched.push(rider.clone());
    }

    /// Ends millisecond `t`: emits the index changes of the riders touched,
    /// then runs the silence checks due at `t`.
    pub fn settle(&mut self, t: Time, out: &mut Vec<(IndexEntry, isize)>) {
        for rider in std::mem::take(&mut self.touched) {
            let track = self.riders.get_mut(&rider).expect("touched riders exist");
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
                    out.push((entry(&rider, old), -1));
                }
                if let Some(new) = want {
                    out.push((entry(&rider, new), 1));
                }
                track.indexed = want;
            }
        }
        let Some(due) = self.checks.remove(&t) else {
            return;
        };
        for rider in due {
            let track = self.riders.get_mut(&rider).expect("checked riders exist");
            let expires = track.last_ping + self.ttl;
            if expires > t {
                self.checks.entry(expires).or_default().push(rider);
                self.new_check_times.push(expires);
                continue;
            }
            track.check_pending = false;
            if let Some(old) = track.indexed.take() {
                out.push((entry(&rider, old), -1));
            }
            if !track.online {
                // Off shift and silent: nothing left worth keeping.
                self.riders.remove(&rider);
            }
        }
    }

    /// Check times scheduled since the last call.
    pub fn take_new_check_times(&mut self) -> Vec<Time> {
        std::mem::take(&mut self.new_check_times)
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
