//! Running a finished log through the dataflow, at any number of workers.
//!
//! Used by the tests (against the reference model) and the benchmark. Every
//! worker walks the same log and inserts its share of it (round-robin), and
//! all advance the input together in steps of `step` ms of log time, waiting
//! for the outputs of each step: epoch by epoch.

use crate::graph::dispatch;
use differential_dataflow::input::Input;
use grabflow_api::{DispatchConfig, Event, Output, Time};
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use timely::dataflow::operators::{Inspect, Probe};

/// How a log is replayed.
#[derive(Clone, Debug)]
pub struct ReplayPlan {
    /// Timely worker threads.
    pub workers: usize,
    /// Milliseconds of log time per input step (the frontier moves by this).
    pub step: Time,
    /// The clock's final time: timers before it fire; outputs from it on are cut.
    pub end: Time,
}

/// Replays `log` (sorted by time, then offset) and returns every decision
/// made before `plan.end`, by time and, within a millisecond, in the order
/// made (all decisions come from the one `decide` operator, in order).
pub fn replay(
    log: Arc<Vec<Event>>,
    cfg: &DispatchConfig,
    plan: &ReplayPlan,
) -> Vec<(Time, Output)> {
    let cfg = cfg.clone();
    let plan2 = plan.clone();
    let guards = timely::execute(timely::Config::process(plan.workers), move |worker| {
        let (me, peers) = (worker.index(), worker.peers());
        let captured = Rc::new(RefCell::new(Vec::new()));
        let sink = Rc::clone(&captured);
        let (mut input, probe) = worker.dataflow::<Time, _, _>(|scope| {
            let (input, events) = scope.new_collection::<Event, isize>();
            let out = dispatch(events, &cfg).outputs;
            let (probe, _) = out
                .inner
                .inspect(move |(o, t, _)| sink.borrow_mut().push((*t, o.clone())))
                .probe();
            (input, probe)
        });
        let mut epoch = log.first().map_or(0, |e| e.time);
        input.advance_to(epoch);
        for (i, e) in log.iter().enumerate() {
            if e.time >= plan2.end {
                break;
            }
            if e.time >= epoch + plan2.step {
                epoch = e.time;
                input.advance_to(epoch);
                input.flush();
                while probe.less_than(input.time()) {
                    // Park rather than spin while other workers finish: with
                    // more workers than cores, spinning starves them.
                    worker.step_or_park(None);
                }
            }
            if i % peers == me {
                input.update_at(e.clone(), e.time, 1);
            }
        }
        input.advance_to(plan2.end);
        input.flush();
        while probe.less_than(&plan2.end) {
            worker.step_or_park(None);
        }
        // Stop here: closing the input would let the clock run to infinity
        // and fire every pending timer, long past `end`.
        for dataflow in worker.installed_dataflows() {
            worker.drop_dataflow(dataflow);
        }
        let out = captured.borrow().clone();
        out
    })
    .expect("timely starts");
    let mut all: Vec<(Time, Output)> = guards
        .join()
        .into_iter()
        .flat_map(|r| r.expect("worker finishes"))
        .filter(|(t, _)| *t < plan.end)
        .collect();
    all.sort_by_key(|(t, _)| *t);
    all
}
