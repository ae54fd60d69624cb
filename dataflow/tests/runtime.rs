//! The live runtime's ends: the feed's last tick is never lost when the log
//! closes, and workers whose sources end at different times stop together,
//! having decided everything before the earliest end (as the reference
//! model does), instead of waiting on each other for ever.

use grabflow_api::{Event, Feed, Output, Time};
use grabflow_dataflow::gen::random_log;
use grabflow_dataflow::reference;
use grabflow_dataflow::runtime::{self, Observer, Source, Sources};
use grabflow_dataflow::stats::DataflowStats;
use grabflow_dataflow::IndexEntry;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

mod common;
use common::{assert_same, by_time};

#[test]
fn the_last_tick_before_the_log_closes_is_not_lost() {
    let (_, log, _) = random_log(1, 20);
    let (tx, rx) = mpsc::channel();
    let mut source = runtime::feed_sources(rx, 1)(0, 1);
    let mut out = Vec::new();
    tx.send(Feed::Events(log.clone())).unwrap();
    // Events alone do not move the frontier: the poll gives up at once.
    assert_eq!(source.poll(&mut out, Duration::ZERO), Some(0));
    assert_eq!(out.len(), log.len());
    // The log's last tick and its close arrive together.
    tx.send(Feed::Tick(1_234)).unwrap();
    drop(tx);
    out.clear();
    assert_eq!(source.poll(&mut out, Duration::ZERO), Some(1_234));
    assert!(out.is_empty());
    assert_eq!(source.poll(&mut out, Duration::ZERO), None);
}

/// Hands its worker's share of the log, up to its own end, in one poll.
struct EndsAt {
    events: Vec<Event>,
    end: Time,
    done: bool,
}

impl Source for EndsAt {
    fn poll(&mut self, out: &mut Vec<Event>, _: Duration) -> Option<Time> {
        if std::mem::replace(&mut self.done, true) {
            return None;
        }
        out.append(&mut self.events);
        Some(self.end)
    }
}

#[derive(Default)]
struct Decisions(Mutex<Vec<(Time, Output)>>);

impl Observer for Decisions {
    fn events(&self, _: &[Event]) {}
    fn decisions(&self, decisions: Vec<(Time, Output)>) {
        self.0.lock().unwrap().extend(decisions);
    }
    fn index(&self, _: Vec<(IndexEntry, Time, isize)>) {}
    fn progress(&self, _: Time) {}
}

#[test]
fn workers_whose_sources_end_apart_stop_together_at_the_earliest_end() {
    for (seed, workers) in [(3, 2), (4, 3), (5, 3)] {
        let (cfg, log, end) = random_log(seed, 300);
        let start = log.first().map_or(0, |e| e.time);
        // Worker 0 ends last, worker `peers - 1` first, half-way.
        let end_of = move |me: usize| end - (end - start) / 2 * me as Time / (workers - 1) as Time;
        let earliest = end_of(workers - 1);
        let shared = Arc::new(log.clone());
        let sources: Sources = Arc::new(move |me, peers| {
            let end = end_of(me);
            let events = shared
                .iter()
                .filter(|e| e.offset as usize % peers == me && e.time < end)
                .cloned()
                .collect();
            Box::new(EndsAt {
                events,
                end,
                done: false,
            })
        });
        let observer = Arc::new(Decisions::default());
        let handle = runtime::spawn(
            cfg.clone(),
            timely::Config::process(workers),
            sources,
            observer.clone(),
            DataflowStats::default(),
            None,
        );
        let (done, stopped) = mpsc::channel();
        std::thread::spawn(move || done.send(handle.join().is_ok()));
        assert_eq!(
            stopped.recv_timeout(Duration::from_secs(120)),
            Ok(true),
            "seed {seed}, {workers} workers: the workers did not stop"
        );
        let got = by_time(std::mem::take(&mut *observer.0.lock().unwrap()));
        let expected = by_time(reference::run(&cfg, &log, earliest));
        assert!(
            expected.values().map(Vec::len).sum::<usize>() > 20,
            "seed {seed}: the log must make decisions before its earliest end"
        );
        assert_same(seed, &format!("{workers} workers"), &expected, &got);
    }
}
