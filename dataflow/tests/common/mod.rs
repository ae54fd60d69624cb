//! Shared by the dataflow's tests: decisions grouped by millisecond, and
//! two runs compared millisecond by millisecond.

use grabflow_api::{Output, Time};
use std::collections::BTreeMap;

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
