//! The rider trackers shared with readers: at any number of in-process
//! workers, every rider's position is found where the worker that tracks it
//! keeps it, and equals the rider's last ping in the log.

use grabflow_api::{EventKind, Feed, Output, Time};
use grabflow_dataflow::gen::random_log;
use grabflow_dataflow::riders::RiderTables;
use grabflow_dataflow::runtime::{self, Observer};
use grabflow_dataflow::stats::DataflowStats;
use grabflow_dataflow::IndexEntry;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

struct Nobody;

impl Observer for Nobody {
    fn events(&self, _: &[grabflow_api::Event]) {}
    fn decisions(&self, _: Vec<(Time, Output)>) {}
    fn index(&self, _: Vec<(IndexEntry, Time, isize)>) {}
    fn progress(&self, _: Time) {}
}

fn check(seed: u64, workers: usize) {
    let (mut cfg, log, end) = random_log(seed, 400);
    // Riders kept whatever their silence (the count of riders kept within
    // their retention is checked by the runtime tests).
    cfg.rider_retention_ms = Time::MAX;
    let mut last = BTreeMap::new();
    let mut named = BTreeSet::new();
    for e in &log {
        match &e.kind {
            EventKind::LocationPinged { rider, at } => {
                last.insert(rider.clone(), *at);
                named.insert(rider.clone());
            }
            EventKind::ShiftChanged { rider, .. } => {
                named.insert(rider.clone());
            }
            _ => {}
        }
    }
    let tables = RiderTables::new(workers, &cfg);
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = runtime::spawn(
        cfg,
        timely::Config::process(workers),
        runtime::feed_sources(rx, workers, 0),
        Arc::new(Nobody),
        DataflowStats::default(),
        Some(tables.clone()),
    );
    tx.send(Feed::Events(log.clone())).unwrap();
    tx.send(Feed::Tick(end)).unwrap();
    drop(tx);
    handle.join().unwrap();
    for e in &log {
        if let EventKind::LocationPinged { rider, .. } | EventKind::ShiftChanged { rider, .. } =
            &e.kind
        {
            assert_eq!(
                tables.position(rider),
                last.get(rider).copied(),
                "seed {seed}, {workers} workers: {rider}"
            );
        }
    }
    assert_eq!(
        tables.known(),
        named.len(),
        "seed {seed}, {workers} workers"
    );
}

#[test]
fn every_riders_last_ping_is_where_its_worker_keeps_it() {
    for seed in 0..6 {
        for workers in [1, 2, 3] {
            check(seed, workers);
        }
    }
}
