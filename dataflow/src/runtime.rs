//! The live worker runtime: the dispatch dataflow fed from the log.
//!
//! [`spawn`] starts timely workers on their own threads. A feeder thread
//! hands every [`Feed`] item (durable events, clock ticks) to each worker;
//! each worker inserts its share of the events and advances its input to
//! each tick, so timers fire as the clock passes them. Decisions, index
//! changes and progress go to an [`Observer`] (the egress side).

use crate::graph::dispatch;
use crate::IndexEntry;
use differential_dataflow::input::Input;
use grabflow_api::{DispatchConfig, Event, Feed, Output, Time};
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;
use timely::dataflow::operators::{Inspect, Probe};

/// Receives what the dataflow produces. Called from worker threads.
pub trait Observer: Send + Sync + 'static {
    /// Events as they enter the dataflow (before any decision on them).
    fn events(&self, events: &[Event]);
    /// Decisions of worker 0's `decide`, in time and decision order.
    fn decisions(&self, decisions: Vec<(Time, Output)>);
    /// Changes of the rider index (from every worker).
    fn index(&self, changes: Vec<(IndexEntry, Time, isize)>);
    /// Every decision before `time` has been delivered.
    fn progress(&self, time: Time);
}

/// Starts `workers` timely workers reading `feed` until it closes.
pub fn spawn(
    cfg: DispatchConfig,
    workers: usize,
    feed: mpsc::Receiver<Feed>,
    observer: Arc<dyn Observer>,
    stats: crate::stats::DataflowStats,
) -> std::thread::JoinHandle<()> {
    let workers = workers.max(1);
    // One worker reads the log's feed itself; several get it fanned out by a
    // feeder thread (each inserts its share and follows every tick).
    let rxs: Vec<std::sync::Mutex<Option<mpsc::Receiver<Feed>>>> = if workers == 1 {
        vec![std::sync::Mutex::new(Some(feed))]
    } else {
        let (txs, rxs): (Vec<_>, Vec<_>) = (0..workers).map(|_| mpsc::channel::<Feed>()).unzip();
        let feeder_observer = Arc::clone(&observer);
        std::thread::Builder::new()
            .name("grabflow-feeder".into())
            .spawn(move || {
                for item in feed {
                    if let Feed::Events(events) = &item {
                        feeder_observer.events(events);
                    }
                    for tx in &txs {
                        let _ = tx.send(item.clone());
                    }
                }
            })
            .expect("spawn feeder");
        rxs.into_iter()
            .map(|rx| std::sync::Mutex::new(Some(rx)))
            .collect()
    };
    let rxs = Arc::new(rxs);
    std::thread::Builder::new()
        .name("grabflow-dataflow".into())
        .spawn(move || {
            let guards = timely::execute(timely::Config::process(workers), move |worker| {
                let (me, peers) = (worker.index(), worker.peers());
                let rx = rxs[me]
                    .lock()
                    .expect("feed lock")
                    .take()
                    .expect("one receiver per worker");
                stats.register(worker);
                let decided = Rc::new(RefCell::new(Vec::new()));
                let indexed = Rc::new(RefCell::new(Vec::new()));
                let (d, i) = (Rc::clone(&decided), Rc::clone(&indexed));
                let (mut input, probe) = worker.dataflow::<Time, _, _>(|scope| {
                    let (input, events) = scope.new_collection::<Event, isize>();
                    let out = dispatch(events, &cfg);
                    out.index
                        .inner
                        .inspect(move |x| i.borrow_mut().push(x.clone()));
                    let (probe, _) = out
                        .outputs
                        .inner
                        .inspect(move |(o, t, _)| d.borrow_mut().push((*t, o.clone())))
                        .probe();
                    (input, probe)
                });
                let mut reported = 0;
                'run: loop {
                    let mut got = rx.recv_timeout(Duration::from_millis(1));
                    loop {
                        match got {
                            Ok(Feed::Events(events)) => {
                                if peers == 1 {
                                    observer.events(&events);
                                }
                                for e in events {
                                    if e.offset as usize % peers == me {
                                        // The log never sends an event older than a
                                        // tick it sent (ticks are `max(now, last time)`);
                                        // the clamp only keeps a broken promise from
                                        // panicking a live service.
                                        debug_assert!(
                                            e.time >= *input.time(),
                                            "the log sends events in time order"
                                        );
                                        let t = e.time.max(*input.time());
                                        input.update_at(e, t, 1);
                                    }
                                }
                            }
                            Ok(Feed::Tick(t)) => {
                                if t > *input.time() {
                                    input.advance_to(t);
                                }
                                input.flush();
                            }
                            Err(mpsc::RecvTimeoutError::Timeout) => break,
                            Err(mpsc::RecvTimeoutError::Disconnected) => break 'run,
                        }
                        got = rx.try_recv().map_err(|e| match e {
                            mpsc::TryRecvError::Empty => mpsc::RecvTimeoutError::Timeout,
                            mpsc::TryRecvError::Disconnected => {
                                mpsc::RecvTimeoutError::Disconnected
                            }
                        });
                    }
                    worker.step();
                    let changes: Vec<_> = indexed.borrow_mut().drain(..).collect();
                    if !changes.is_empty() {
                        observer.index(changes);
                    }
                    let decisions: Vec<_> = decided.borrow_mut().drain(..).collect();
                    if !decisions.is_empty() {
                        observer.decisions(decisions);
                    }
                    if me == 0 {
                        let at = probe.with_frontier(|f| f.first().copied().unwrap_or(Time::MAX));
                        if at > reported {
                            reported = at;
                            observer.progress(at);
                        }
                    }
                }
                // Drain what the clock has passed, then stop without letting
                // time run to infinity (which would fire every pending timer).
                input.flush();
                let until = *input.time();
                worker.step_while(|| probe.less_than(&until));
                let decisions: Vec<_> = decided.borrow_mut().drain(..).collect();
                if !decisions.is_empty() {
                    observer.decisions(decisions);
                }
                for dataflow in worker.installed_dataflows() {
                    worker.drop_dataflow(dataflow);
                }
            })
            .expect("timely starts");
            drop(guards.join());
        })
        .expect("spawn dataflow")
}
