//! Shared by the dataflow's tests: decisions grouped by millisecond, two
//! runs compared millisecond by millisecond, and an observer that keeps
//! every decision.
#![allow(dead_code)]

use grabflow_api::{Event, Output, Time};
use grabflow_dataflow::checkpoint::{encoded, Snapshot};
use grabflow_dataflow::runtime::Observer;
use grabflow_dataflow::IndexEntry;
use std::collections::BTreeMap;
use std::sync::Mutex;

/// Keeps every decision the runtime hands over. Its checkpoint state is
/// the time it was asked at, so a test can tell it was saved there.
#[derive(Default)]
pub struct Decisions(pub Mutex<Vec<(Time, Output)>>);

impl Observer for Decisions {
    fn events(&self, _: &[Event]) {}
    fn decisions(&self, decisions: Vec<(Time, Output)>) {
        self.0.lock().unwrap().extend(decisions);
    }
    fn index(&self, _: Vec<(IndexEntry, Time, isize)>) {}
    fn progress(&self, _: Time) {}
    fn save(&self, at: Time) -> Snapshot {
        encoded(at.to_le_bytes().to_vec())
    }
}

/// Decisions by time, each millisecond's in the order made.
pub fn by_time(outputs: Vec<(Time, Output)>) -> BTreeMap<Time, Vec<Output>> {
    let mut map: BTreeMap<Time, Vec<Output>> = BTreeMap::new();
    for (t, o) in outputs {
        map.entry(t).or_default().push(o);
    }
    map
}

/// Compares two runs epoch by epoch (each millisecond's decisions in the
/// order made) and names the first millisecond that differs.
pub fn assert_same(
    seed: u64,
    what: &str,
    expected: &BTreeMap<Time, Vec<Output>>,
    got: &BTreeMap<Time, Vec<Output>>,
) {
    for t in expected.keys().chain(got.keys()) {
        let (e, g) = (expected.get(t), got.get(t));
        assert_eq!(e, g, "seed {seed}, {what}: outputs differ at t={t}");
    }
}
