//! Per-operator figures from the dataflow's own logging, for `/v1/ops/dataflow`.
//!
//! [`DataflowStats::register`] installs two loggers on a worker. One folds
//! timely's events into, per operator: its name, how often it was scheduled,
//! the time spent inside it, and the records it received and sent. The other
//! reads [`STATE_LOG`], where each stateful operator reports what it holds
//! after a step (its arrangement, in differential's terms: ids remembered,
//! riders tracked, orders, timers, records buffered for a millisecond not yet
//! complete), summed over workers.

use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use timely::container::CapacityContainerBuilder;
use timely::logging::{StartStop, TimelyEvent, TimelyEventBuilder};

/// The logging stream stateful operators report their sizes on.
pub const STATE_LOG: &str = "grabflow/state";

/// What one stateful operator holds after a step, by part (`"orders"` → 1200).
pub type StateSizes = Vec<(&'static str, usize)>;

/// How an operator's sizes changed in a step, on [`STATE_LOG`] (logged
/// when they change): summed, a worker's events give what it holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateEvent {
    /// The operator's address (as in timely's `Operates` event).
    pub operator: Vec<usize>,
    /// The change of each part that changed.
    pub changes: Vec<(&'static str, i64)>,
}

/// The container of [`STATE_LOG`].
pub type StateEventBuilder = CapacityContainerBuilder<Vec<(Duration, StateEvent)>>;

/// An operator's handle on [`STATE_LOG`]: reports its sizes when they change,
/// and costs nothing when no one listens.
pub(crate) struct StateLog {
    logger: Option<timely::logging_core::Logger<StateEventBuilder>>,
    operator: Vec<usize>,
    last: StateSizes,
}

impl StateLog {
    /// The log of the operator at `address` on `worker`.
    pub(crate) fn new(worker: &timely::worker::Worker, address: &[usize]) -> Self {
        StateLog {
            logger: worker.logger_for(STATE_LOG),
            operator: address.to_vec(),
            last: Vec::new(),
        }
    }

    /// Logs how `sizes()` differ from the last ones, if someone listens and
    /// they do.
    pub(crate) fn report(&mut self, sizes: impl FnOnce() -> StateSizes) {
        let Some(logger) = &self.logger else { return };
        let sizes = sizes();
        let before = |part| self.last.iter().find(|(p, _)| *p == part).map(|&(_, n)| n);
        // A part's first report is logged even at zero: every part shows.
        let changes: Vec<_> = sizes
            .iter()
            .filter(|&&(part, n)| before(part) != Some(n))
            .map(|&(part, n)| (part, n as i64 - before(part).unwrap_or(0) as i64))
            .collect();
        self.last = sizes;
        if !changes.is_empty() {
            logger.log(StateEvent {
                operator: self.operator.clone(),
                changes,
            });
        }
    }
}

/// One operator's figures (summed over workers).
#[derive(Clone, Debug, Default, Serialize)]
pub struct OperatorStats {
    /// The operator's name.
    pub name: String,
    /// Its address in the dataflow.
    pub addr: Vec<usize>,
    /// Times it was scheduled.
    pub schedules: u64,
    /// Time spent running it, microseconds.
    pub busy_us: u64,
    /// Records received on its inputs.
    pub records_in: i64,
    /// Records sent from its outputs.
    pub records_out: i64,
    /// What a stateful operator holds, by part (absent for stateless ones).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub state: BTreeMap<&'static str, i64>,
}

#[derive(Default)]
struct Worker {
    /// Operator id → address.
    addr_of: HashMap<usize, Vec<usize>>,
    /// Channel id → (source address, target address).
    channels: HashMap<usize, (Vec<usize>, Vec<usize>)>,
    /// Operator id → when its current scheduling started.
    started: HashMap<usize, Duration>,
}

#[derive(Default)]
struct Inner {
    ops: HashMap<Vec<usize>, OperatorStats>,
    /// Every channel's (source, target) operator addresses, for drawing
    /// the graph (the same on every worker).
    channels: BTreeSet<(Vec<usize>, Vec<usize>)>,
}

/// Shared, cheap to clone.
#[derive(Clone, Default)]
pub struct DataflowStats(Arc<Mutex<Inner>>);

impl DataflowStats {
    /// Installs the loggers on `worker` (call before building the dataflow).
    pub fn register(&self, worker: &mut timely::worker::Worker) {
        let Some(mut registry) = worker.log_register() else {
            return;
        };
        let shared = Arc::clone(&self.0);
        registry.insert::<StateEventBuilder, _>(STATE_LOG, move |_time, data| {
            let Some(events) = data else { return };
            let mut inner = shared.lock().expect("stats lock");
            for (_, event) in events.iter() {
                let entry = inner.ops.entry(event.operator.clone()).or_default();
                for &(part, d) in &event.changes {
                    *entry.state.entry(part).or_default() += d;
                }
            }
        });
        let shared = Arc::clone(&self.0);
        let mut local = Worker::default();
        registry.insert::<TimelyEventBuilder, _>("timely", move |_time, data| {
            let Some(events) = data else { return };
            let mut inner = shared.lock().expect("stats lock");
            for (at, event) in events.iter() {
                match event {
                    TimelyEvent::Operates(op) => {
                        local.addr_of.insert(op.id, op.addr.clone());
                        let entry = inner.ops.entry(op.addr.clone()).or_default();
                        entry.name = op.name.clone();
                        entry.addr = op.addr.clone();
                    }
                    TimelyEvent::Channels(ch) => {
                        let mut source = ch.scope_addr.clone();
                        source.push(ch.source.0);
                        let mut target = ch.scope_addr.clone();
                        target.push(ch.target.0);
                        inner.channels.insert((source.clone(), target.clone()));
                        local.channels.insert(ch.id, (source, target));
                    }
                    TimelyEvent::Schedule(s) => match s.start_stop {
                        StartStop::Start => {
                            local.started.insert(s.id, *at);
                        }
                        StartStop::Stop => {
                            let (Some(start), Some(addr)) =
                                (local.started.remove(&s.id), local.addr_of.get(&s.id))
                            else {
                                continue;
                            };
                            let entry = inner.ops.entry(addr.clone()).or_default();
                            entry.schedules += 1;
                            entry.busy_us += at.saturating_sub(start).as_micros() as u64;
                        }
                    },
                    TimelyEvent::Messages(m) => {
                        let Some((source, target)) = local.channels.get(&m.channel) else {
                            continue;
                        };
                        let addr = if m.is_send { source } else { target };
                        let entry = inner.ops.entry(addr.clone()).or_default();
                        if m.is_send {
                            entry.records_out += m.record_count;
                        } else {
                            entry.records_in += m.record_count;
                        }
                    }
                    _ => {}
                }
            }
        });
    }

    /// The figures of every named operator, by address.
    pub fn snapshot(&self) -> Vec<OperatorStats> {
        let inner = self.0.lock().expect("stats lock");
        let mut ops: Vec<_> = inner
            .ops
            .values()
            .filter(|o| !o.name.is_empty())
            .cloned()
            .collect();
        ops.sort_by(|a, b| a.addr.cmp(&b.addr));
        ops
    }

    /// The dataflow's channels, as (source, target) operator addresses, in
    /// address order: the edges of its graph. An address whose last part
    /// is 0 is the boundary of the scope it ends (a scope's own inputs and
    /// outputs), not an operator.
    pub fn channels(&self) -> Vec<(Vec<usize>, Vec<usize>)> {
        let inner = self.0.lock().expect("stats lock");
        inner.channels.iter().cloned().collect()
    }
}
