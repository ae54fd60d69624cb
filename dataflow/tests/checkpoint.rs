//! Checkpoints: a run checkpointed part-way and restored from there (at
//! the same or another number of workers) decides exactly what the
//! uninterrupted reference model decides, millisecond by millisecond, in
//! the same order, on many seeded random logs.

use grabflow_api::{Event, Feed, Output, Time};
use grabflow_dataflow::checkpoint::{Checkpointing, DataflowState};
use grabflow_dataflow::gen::random_log;
use grabflow_dataflow::reference;
use grabflow_dataflow::runtime;
use grabflow_dataflow::stats::DataflowStats;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

mod common;
use common::{assert_same, by_time, Decisions};

/// Runs `events` (fed in `chunks` paced pieces, each followed by a tick)
/// at `workers` workers until `until`, checkpointing every `interval` ms,
/// from `restore` if given; returns the decisions and the checkpoints.
fn run(
    cfg: &grabflow_api::DispatchConfig,
    events: &[Event],
    until: Time,
    workers: usize,
    interval: Time,
    restore: Option<Arc<DataflowState>>,
) -> (Vec<(Time, Output)>, Vec<DataflowState>) {
    let (tx, rx) = mpsc::channel();
    let taken = Arc::new(Mutex::new(Vec::new()));
    let keep = Arc::clone(&taken);
    let since = restore.as_ref().map_or(0, |r| r.at);
    let next = restore
        .as_ref()
        .and_then(|r| r.resume().first().map(|(_, o)| *o))
        .unwrap_or(0);
    let checkpointing = Arc::new(Checkpointing::new(interval, since, move |state| {
        keep.lock().unwrap().push(state.encode())
    }));
    let observer = Arc::new(Decisions::default());
    let handle = runtime::spawn_checkpointed(
        cfg.clone(),
        timely::Config::process(workers),
        runtime::feed_sources(rx, workers, next),
        observer.clone(),
        DataflowStats::default(),
        None,
        Some((checkpointing, restore)),
    );
    // Paced, so the workers see the clock move in steps and checkpoints
    // fall at many points of the log.
    let pieces = 8;
    let per = events.len().div_ceil(pieces).max(1);
    let pieces: Vec<&[Event]> = events.chunks(per).collect();
    for (i, piece) in pieces.iter().enumerate() {
        // The clock moves up to the next piece's first event (a millisecond
        // may straddle two pieces).
        let tick = pieces
            .get(i + 1)
            .map_or(until, |next| next[0].time)
            .min(until);
        tx.send(Feed::EventsThenTick(piece.to_vec(), tick)).unwrap();
        std::thread::sleep(Duration::from_millis(3));
    }
    tx.send(Feed::Tick(until)).unwrap();
    drop(tx);
    handle.join().expect("the dataflow ends");
    let decisions = std::mem::take(&mut *observer.0.lock().unwrap());
    let taken = std::mem::take(&mut *taken.lock().unwrap());
    (decisions, taken)
}

/// Checkpoints `seed`'s log part-way at `before` workers, restores the
/// checkpoint `pick` chooses at `after` workers, and compares the two runs'
/// decisions with the reference's. Returns whether a checkpoint taken
/// while running (not the one at the end) was restored.
fn check(seed: u64, before: usize, after: usize) -> bool {
    let (cfg, log, end) = random_log(seed, 200 + (seed as usize * 31) % 200);
    let expected = by_time(reference::run(&cfg, &log, end));
    let start = log.first().map_or(0, |e| e.time);
    // Stop somewhere in the second half; checkpoint often before that.
    let stop = start + (end - start) / 2 + (seed * 7_919) % ((end - start) / 2).max(1);
    let interval = ((stop - start) / 5).max(1);
    let first: Vec<Event> = log.iter().filter(|e| e.time < stop).cloned().collect();
    let (decided, checkpoints) = run(&cfg, &first, stop, before, interval, None);
    let last = checkpoints
        .last()
        .expect("a checkpoint at the end, at least");
    assert_eq!(last.at, stop, "seed {seed}: the graceful end checkpoints");
    // A checkpoint taken while running when there is one, else the last.
    let live = checkpoints.len() > 1;
    let chosen =
        checkpoints[(seed as usize) % (checkpoints.len() - usize::from(live)).max(1)].clone();
    let at = chosen.at;
    assert_eq!(chosen.workers, before);
    assert_eq!(
        chosen.observer,
        at.to_le_bytes(),
        "seed {seed}: the observer saved at its time"
    );
    // The position is exactly where the events at or after `at` start.
    let resume = chosen.resume();
    let from = log
        .iter()
        .position(|e| e.time >= at)
        .map_or(log.len() as u64, |i| log[i].offset);
    assert_eq!(
        resume,
        vec![(0, from)],
        "seed {seed}: resume at the first event at or after {at}"
    );
    let rest: Vec<Event> = log.iter().filter(|e| e.offset >= from).cloned().collect();
    let (later, _) = run(&cfg, &rest, end, after, interval, Some(Arc::new(chosen)));
    assert!(
        later.iter().all(|(t, _)| *t >= at),
        "seed {seed}: a restored run decides nothing before its checkpoint"
    );
    let mut got: Vec<(Time, Output)> = decided.into_iter().filter(|(t, _)| *t < at).collect();
    got.extend(later);
    assert_same(
        seed,
        &format!("checkpointed at {at} with {before} workers, restored with {after}"),
        &expected,
        &by_time(got),
    );
    live
}

#[test]
fn a_run_restored_from_a_checkpoint_decides_as_one_never_stopped() {
    let live = (0..40).filter(|&seed| check(seed, 1, 1)).count();
    assert!(
        live > 20,
        "checkpoints taken while running were restored: {live}"
    );
}

#[test]
fn a_checkpoint_at_four_workers_restores_at_four() {
    let live = (100..130).filter(|&seed| check(seed, 4, 4)).count();
    assert!(
        live > 10,
        "checkpoints taken while running were restored: {live}"
    );
}

#[test]
fn a_checkpoint_at_four_workers_restores_at_one_and_two() {
    for seed in 200..230 {
        check(seed, 4, 1 + (seed as usize % 2));
    }
    for seed in 230..240 {
        check(seed, 2, 4);
    }
}
