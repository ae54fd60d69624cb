//! The live runtime's ends: the feed's last tick is never lost when the log
//! closes, and workers whose sources end at different times stop together,
//! having decided everything before the earliest end (as the reference
//! model does), instead of waiting on each other for ever. And what the
//! stateful operators report holding (`/v1/ops/dataflow`) is what the log
//! put there, summed over workers.

use grabflow_api::{Event, EventKind, Feed, Output, Time};
use grabflow_dataflow::gen::random_log;
use grabflow_dataflow::reference;
use grabflow_dataflow::runtime::{self, Source, Sources};
use grabflow_dataflow::stats::DataflowStats;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{mpsc, Arc};
use std::time::Duration;

mod common;
use common::{assert_same, by_time, Decisions};

#[test]
fn the_last_tick_before_the_log_closes_is_not_lost() {
    let (_, log, _) = random_log(1, 20);
    let (tx, rx) = mpsc::channel();
    let mut source = runtime::feed_sources(rx, 1, 0)(0, 1);
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

/// Each stateful operator's state figures after running `log` to `end` at
/// `workers` workers, by operator name.
fn state_after(
    cfg: &grabflow_api::DispatchConfig,
    log: &[Event],
    end: Time,
    workers: usize,
) -> BTreeMap<String, BTreeMap<&'static str, i64>> {
    let (tx, rx) = mpsc::channel();
    let stats = DataflowStats::default();
    let handle = runtime::spawn(
        cfg.clone(),
        timely::Config::process(workers),
        runtime::feed_sources(rx, workers, 0),
        Arc::new(Decisions::default()),
        stats.clone(),
        None,
    );
    tx.send(Feed::Events(log.to_vec())).unwrap();
    tx.send(Feed::Tick(end)).unwrap();
    drop(tx);
    handle.join().unwrap();
    stats
        .snapshot()
        .into_iter()
        .filter(|op| !op.state.is_empty())
        .map(|op| (op.name, op.state))
        .collect()
}

#[test]
fn operators_report_the_state_the_log_left_them_summed_over_workers() {
    for seed in [7, 8, 9] {
        let (cfg, mut log, _) = random_log(seed, 400);
        // Ends three quarters in: some riders and orders are still kept.
        let end = log[log.len() * 3 / 4].time;
        log.retain(|e| e.time < end);
        let mut one = state_after(&cfg, &log, end, 1);
        let names: Vec<&str> = one.keys().map(String::as_str).collect();
        assert_eq!(names, ["Decide", "Dedup", "TrackRiders"], "seed {seed}");
        // Every millisecond before the end was handled: nothing waits.
        for (name, state) in &one {
            assert_eq!(state["buffered"], 0, "seed {seed}: {name} {state:?}");
        }
        // Orders placed, less those closed for their retention before the end.
        let (mut created, mut forgotten) = (0, 0);
        for (t, o) in reference::run(&cfg, &log, end) {
            match o {
                Output::Transition { from: None, .. } => created += 1,
                Output::Transition {
                    to: grabflow_api::OrderState::Closed,
                    ..
                } if t + cfg.order_retention_ms < end => forgotten += 1,
                _ => {}
            }
        }
        assert!(created > 0, "seed {seed}: the log places orders");
        assert_eq!(
            one["Decide"]["orders"],
            created - forgotten,
            "seed {seed}: {created} placed, {forgotten} forgotten"
        );
        let mut merchants = BTreeSet::new();
        // Each rider's last ping or shift: counting redelivered shifts (which
        // dedup may drop), and not.
        let (mut riders, mut first_riders) = (BTreeMap::new(), BTreeMap::new());
        let mut ids_seen = BTreeSet::new();
        for e in &log {
            match &e.kind {
                EventKind::MerchantUpserted { merchant, .. } => {
                    merchants.insert(merchant);
                }
                EventKind::LocationPinged { rider, .. } | EventKind::ShiftChanged { rider, .. } => {
                    riders.insert(rider, e.time);
                    if ids_seen.insert(&e.id) {
                        first_riders.insert(rider, e.time);
                    }
                }
                _ => {}
            }
        }
        assert_eq!(
            one["Decide"]["merchants"],
            merchants.len() as i64,
            "seed {seed}"
        );
        let track = &one["TrackRiders"];
        // Riders with a ping or shift within their retention of the end.
        let kept = |lasts: &BTreeMap<_, Time>| {
            lasts
                .values()
                .filter(|&&last| last + cfg.rider_retention_ms >= end)
                .count() as i64
        };
        let (fewest, most) = (kept(&first_riders), kept(&riders));
        assert!(
            (fewest..=most).contains(&track["riders"]),
            "seed {seed}: {} riders tracked, {fewest}..={most} expected",
            track["riders"]
        );
        let ids: BTreeSet<_> = log
            .iter()
            .filter(|e| !matches!(e.kind, EventKind::LocationPinged { .. }))
            .map(|e| &e.id)
            .collect();
        let remembered = |state: &BTreeMap<String, BTreeMap<&str, i64>>| state["Dedup"]["ids"];
        assert!(
            (1..=ids.len() as i64).contains(&remembered(&one)),
            "seed {seed}: {one:?}"
        );
        // The same log at three workers: the partitions sum to the same
        // figures, but for ids a partition has not yet had the occasion to
        // forget (it forgets when it next handles a millisecond).
        let mut three = state_after(&cfg, &log, end, 3);
        assert!(
            (remembered(&one)..=ids.len() as i64).contains(&remembered(&three)),
            "seed {seed}: {three:?}"
        );
        // Likewise the milliseconds with a rider check due: riders of one
        // millisecond share them on one worker, not on three.
        for state in [&mut three, &mut one] {
            state.get_mut("Dedup").unwrap().remove("ids");
            state.get_mut("TrackRiders").unwrap().remove("check_times");
        }
        assert_eq!(three, one, "seed {seed}, 3 workers");
    }
}
