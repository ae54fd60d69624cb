//! Per-operator figures from timely's own logging, for `/v1/ops/dataflow`.
//!
//! [`DataflowStats::register`] installs a logger on a worker; it folds
//! timely's events into, per operator: its name, how often it was scheduled,
//! the time spent inside it, and the records it received and sent.

use serde::Serialize;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use timely::logging::{StartStop, TimelyEvent, TimelyEventBuilder};

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
}

/// Shared, cheap to clone.
#[derive(Clone, Default)]
pub struct DataflowStats(Arc<Mutex<Inner>>);

impl DataflowStats {
    /// Installs the logger on `worker` (call before building the dataflow).
    pub fn register(&self, worker: &mut timely::worker::Worker) {
        let shared = Arc::clone(&self.0);
        let mut local = Worker::default();
        if let Some(mut registry) = worker.log_register() {
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
}
