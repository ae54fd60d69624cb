//! The dataflow's input: one timely worker's partitions of the input
//! topics. Time comes from the log: a record's time is its Kafka timestamp
//! made monotonic per partition, and the worker's frontier is the least
//! time over its partitions. Partitions that hold time back get tick
//! records (no value): soon when a newer event of the orders topic waits
//! on them (someone waits on what it decides), rarely otherwise. Ingress
//! sends ticks along with an order's events itself (see
//! [`producer`](super::producer)); when it runs in the same process, it
//! tells the sources through an [`Along`] clock and they count those ticks
//! as their own. So these are for events from other producers, lost
//! ticks, and timers.
//!
//! For checkpoints, each partition remembers where each recent log time
//! starts ([`Source::resume_at`]), and a source can start from the offsets a
//! checkpoint holds ([`KafkaSources::resuming`]) instead of the beginning.

use super::config::{partitions, KafkaConfig, KafkaError};
use crate::now_ms;
use crate::throttle::Throttle;
use grabflow_api::lifecycle::Stop;
use grabflow_api::source::Positions;
use grabflow_api::topics::InputRecord;
use grabflow_api::{Source, Time};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The time of the last round of ticks this process's ingress sent along
/// into every input partition (0: none). The sources of the same process
/// count such a round as sent by themselves, instead of sending their own
/// on top. A lost tick is made good by ingress's next round or, when none
/// comes, by the sources' idle tick, as their own are.
#[derive(Clone, Default)]
pub struct Along(Arc<AtomicU64>);

impl Along {
    /// A round of ticks at `at` is on its way into every input partition.
    pub fn sent(&self, at: Time) {
        self.0.fetch_max(at, Ordering::AcqRel);
    }

    /// The time of the latest round sent along.
    pub fn time(&self) -> Time {
        self.0.load(Ordering::Acquire)
    }
}

/// One input partition of a worker.
struct Part {
    topic: usize,
    name: String,
    partition: i32,
    /// Time of the partition's latest record (0 before any).
    time: Time,
    /// The time of the last tick sent into it (it may not be back yet).
    sent: Time,
    /// Where each recent time read starts (for a checkpoint).
    positions: Positions,
}

/// The resume position of a checkpoint: an input partition's number,
/// `topic << 32 | partition` (topics by their place in `Topics::inputs`).
pub fn position_key(topic: usize, partition: i32) -> u64 {
    ((topic as u64) << 32) | partition as u32 as u64
}

/// One timely worker's input partitions (`(topic, partition)` number
/// `topic * stride + partition`, dealt round-robin over the workers).
pub struct KafkaSource {
    consumer: BaseConsumer,
    parts: Vec<Part>,
    lookup: HashMap<(String, i32), usize>,
    ticker: Arc<ThreadedProducer<DefaultProducerContext>>,
    tick: Duration,
    idle_tick: Duration,
    /// The newest time of an event of the orders topic any worker of this
    /// process has read.
    newest: Arc<AtomicU64>,
    /// The orders topic's place in `Topics::inputs`.
    orders: usize,
    /// Ticks this process's ingress sent along.
    along: Along,
    stop: Stop,
    /// Records that were not events (logged and skipped).
    pub skipped: u64,
    /// Skipped records are logged at most once a second.
    skips: Throttle,
}

/// Makes the sources of a process's workers (the factory the runtime calls).
pub struct KafkaSources {
    cfg: KafkaConfig,
    counts: Vec<i32>,
    ticker: Arc<ThreadedProducer<DefaultProducerContext>>,
    newest: Arc<AtomicU64>,
    along: Along,
    /// Where each input partition resumes (by [`position_key`]), from a
    /// checkpoint; the others start at their beginning.
    resume: HashMap<u64, i64>,
    /// Set to end every source (shutdown).
    pub stop: Stop,
}

impl KafkaSources {
    /// Reads the partition counts of the input topics and makes the ticker.
    pub fn new(cfg: &KafkaConfig) -> Result<KafkaSources, KafkaError> {
        let probe: BaseConsumer = cfg.client().create()?;
        let counts = cfg
            .topics()
            .inputs()
            .iter()
            .map(|t| partitions(&probe, t))
            .collect::<Result<Vec<_>, _>>()?;
        let ticker = cfg.ticker().create()?;
        Ok(KafkaSources {
            cfg: cfg.clone(),
            counts,
            ticker: Arc::new(ticker),
            newest: Arc::default(),
            along: Along::default(),
            resume: HashMap::new(),
            stop: Stop::default(),
        })
    }

    /// Starts every input partition named in `positions` (a checkpoint's
    /// `(position_key, offset)` pairs) at its offset instead of its beginning.
    pub fn resuming(mut self, positions: &[(u64, u64)]) -> KafkaSources {
        self.resume = positions.iter().map(|&(k, o)| (k, o as i64)).collect();
        self
    }

    /// Counts the rounds of ticks `along` tells of (ingress's, in the same
    /// process) as sent by these sources.
    pub fn along(mut self, along: Along) -> KafkaSources {
        self.along = along;
        self
    }

    /// Worker `me` of `peers`'s source, reading its partitions from the start
    /// (or where a checkpoint resumes them).
    pub fn source(&self, me: usize, peers: usize) -> Result<KafkaSource, KafkaError> {
        let topics = self.cfg.topics();
        let consumer: BaseConsumer = self
            .cfg
            .consumer(&format!("{}dataflow", self.cfg.outputs()))
            .create()?;
        let mut parts = Vec::new();
        let mut tpl = TopicPartitionList::new();
        let mut n = 0usize;
        for (t, name) in topics.inputs().iter().enumerate() {
            for p in 0..self.counts[t] {
                if n % peers == me {
                    let from = self.resume.get(&position_key(t, p)).copied();
                    let offset = from.map_or(Offset::Beginning, Offset::Offset);
                    tpl.add_partition_offset(name, p, offset)?;
                    parts.push(Part {
                        topic: t,
                        name: name.to_string(),
                        partition: p,
                        time: 0,
                        sent: 0,
                        positions: Positions::from(from.unwrap_or(0).max(0) as u64),
                    });
                }
                n += 1;
            }
        }
        consumer.assign(&tpl)?;
        let lookup = parts
            .iter()
            .enumerate()
            .map(|(i, p)| ((p.name.clone(), p.partition), i))
            .collect();
        Ok(KafkaSource {
            consumer,
            parts,
            lookup,
            ticker: Arc::clone(&self.ticker),
            tick: self.cfg.tick,
            idle_tick: self.cfg.idle_tick,
            newest: Arc::clone(&self.newest),
            orders: topics
                .inputs()
                .iter()
                .position(|t| *t == topics.orders)
                .expect("the orders topic is an input"),
            along: self.along.clone(),
            stop: self.stop.clone(),
            skipped: 0,
            skips: Throttle::new(Duration::from_secs(1)),
        })
    }
}

/// Records taken per poll before the worker steps.
const POLL_BATCH: usize = 20_000;

impl KafkaSource {
    /// Ticks the partitions that hold time back. A partition behind an
    /// order's event this process has read (the event waits for every
    /// partition to pass its time) gets a tick once quiet for `tick`; any
    /// other only after `idle_tick`, so timers fire when nothing happens. A
    /// tick still on its way, sent by this source or along by ingress,
    /// counts as read; one lost is sent again after `idle_tick`. Ticks of
    /// one round share a produce request.
    fn tick_idle(&mut self) {
        let now = now_ms();
        let newest = self.newest.load(Ordering::Acquire);
        let along = self.along.time();
        for p in &mut self.parts {
            let ahead = p.time.max(p.sent).max(along);
            // The event at `newest` waits until every partition is past it
            // (its time may equal a tick's that came first: an event's time
            // is the latest of its own and the partition's before it).
            let every = if newest > 0 && newest >= ahead {
                self.tick
            } else {
                self.idle_tick
            };
            if now.saturating_sub(ahead) < every.as_millis() as Time {
                continue;
            }
            // Past the event it is for, whatever the clocks say.
            let at = now.max(newest + 1);
            let record = BaseRecord::<[u8], [u8]>::to(&p.name)
                .partition(p.partition)
                .timestamp(at as i64);
            // A full queue (broker away) only delays time; the next round
            // tries again.
            if self.ticker.send(record).is_ok() {
                p.sent = at;
            }
        }
    }
}

impl Source for KafkaSource {
    fn poll(&mut self, out: &mut Vec<grabflow_api::Event>, wait: Duration) -> Option<Time> {
        if self.stop.stopped() {
            return None;
        }
        if self.parts.is_empty() {
            std::thread::sleep(wait);
            return Some(Time::MAX);
        }
        let mut timeout = wait;
        for _ in 0..POLL_BATCH {
            let m = match self.consumer.poll(timeout) {
                None => break,
                Some(Err(e)) => {
                    // The broker is away: wait instead of spinning; time
                    // stands still until it is back.
                    tracing::debug!(error = %e, "kafka consumer");
                    std::thread::sleep(Duration::from_millis(50));
                    break;
                }
                Some(Ok(m)) => m,
            };
            timeout = Duration::ZERO;
            let Some(&i) = self.lookup.get(&(m.topic().to_string(), m.partition())) else {
                continue;
            };
            let part = &mut self.parts[i];
            let ts = m.timestamp().to_millis().unwrap_or(0).max(0) as Time;
            part.time = part.time.max(ts);
            part.positions.read(part.time, m.offset().max(0) as u64);
            if let Some(value) = m.payload() {
                match InputRecord::decode(value, part.topic, part.partition, m.offset(), part.time)
                {
                    Ok(e) => {
                        // Only an order's event hurries ticks: nobody waits
                        // on a ping, a shift or a merchant to the
                        // millisecond (at 1k pings/s, pings would tick every
                        // quiet partition every `tick`).
                        if part.topic == self.orders {
                            self.newest.fetch_max(part.time, Ordering::AcqRel);
                        }
                        out.push(e)
                    }
                    Err(e) => {
                        self.skipped += 1;
                        if let Some(held) = self.skips.admit() {
                            tracing::warn!(topic = m.topic(), partition = m.partition(), offset = m.offset(), error = %e, similar_since_last = held, "skipped a record that is not an event");
                        }
                    }
                }
            }
        }
        self.tick_idle();
        let frontier = self.parts.iter().map(|p| p.time).min();
        for p in &mut self.parts {
            p.positions.keep_near(frontier.unwrap_or(0));
        }
        frontier
    }

    /// Per partition, the offset of its first record at or after `at`, or
    /// the next to come if none has come yet.
    fn resume_at(&self, at: Time) -> Vec<(u64, u64)> {
        self.parts
            .iter()
            .map(|p| {
                (
                    position_key(p.topic, p.partition),
                    p.positions.resume_at(at),
                )
            })
            .collect()
    }
}
