//! Kafka: decisions out to topics, and (split egress) back in.
//!
//! - [`OutputSink`] is an `Observer` of the dataflow: every decision goes to
//!   its output topic with its global `seq`, the index to `{prefix}index`.
//!   On start it reads the last record of every output partition, so a
//!   restarted dataflow, which replays the log from its latest checkpoint
//!   (or the start), produces only the decisions not yet delivered: no loss,
//!   no duplicate. Its next `seq` is part of the checkpoint, which is
//!   written only once the broker has acked every decision before it
//!   ([`OutputSink::delivered`]). A record the broker refuses for good
//!   (librdkafka retries everything else, without end) stops the process
//!   and every checkpoint after it: a restart resends it. Once a second
//!   it waits for every produced record's ack and then commits, for every
//!   input partition, the offset where the delivered time ends (progress for
//!   lag monitoring).
//! - [`follow`] feeds a split egress process's view from the topics: input
//!   events, the index, and the decisions put back in `seq` order, each one
//!   only after every input event of its time.

use grabflow_api::lifecycle::{Stop, Thread};
use grabflow_api::topics::{partition_for, IndexRecord, InputRecord, OutputRecord, Topics};
use grabflow_api::{Event, Output, Time};
use grabflow_dataflow::checkpoint::{snapshot, Snapshot};
use grabflow_dataflow::runtime::Observer;
use grabflow_dataflow::IndexEntry;
use grabflow_log::kafka::{from_start, partitions, KafkaConfig, KafkaError};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::{KafkaError as ClientError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The key of a decision on the output topics: its order (or, for a
/// rejection naming none, the event).
pub fn output_key(o: &Output) -> &str {
    match o {
        Output::Offered { order, .. }
        | Output::Withdrawn { order, .. }
        | Output::GrabDecided { order, .. }
        | Output::Unassigned { order, .. }
        | Output::Assigned { order, .. }
        | Output::Transition { order, .. } => order.as_str(),
        Output::Rejected { event, order, .. } => order.as_ref().unwrap_or(event).as_str(),
    }
}

/// What the broker has acked of the sink's records: each record gets a
/// number when handed to the producer, and is pending until its delivery
/// report; one refused for good is counted and logged.
#[derive(Default)]
pub struct Deliveries {
    /// Records refused for good (not retried: librdkafka retries the rest).
    failed: AtomicU64,
    /// The next record's number.
    next: AtomicUsize,
    /// The numbers of the records not yet reported on.
    pending: Mutex<BTreeSet<usize>>,
}

impl Deliveries {
    /// Numbers a record about to be handed to the producer.
    fn hand(&self) -> usize {
        let n = self.next.fetch_add(1, Ordering::AcqRel);
        self.pending.lock().expect("pending").insert(n);
        n
    }

    /// A record was not handed over after all (refused by the client).
    fn refused(&self, n: usize) {
        self.pending.lock().expect("pending").remove(&n);
        self.failed.fetch_add(1, Ordering::AcqRel);
    }

    /// Whether every record numbered below `upto` has been reported on.
    fn reported(&self, upto: usize) -> bool {
        let pending = self.pending.lock().expect("pending");
        pending.first().is_none_or(|&n| n >= upto)
    }
}

impl rdkafka::ClientContext for Deliveries {}

impl rdkafka::producer::ProducerContext for Deliveries {
    type DeliveryOpaque = usize;
    fn delivery(&self, result: &rdkafka::message::DeliveryResult<'_>, n: usize) {
        self.pending.lock().expect("pending").remove(&n);
        if let Err((e, m)) = result {
            self.failed.fetch_add(1, Ordering::AcqRel);
            tracing::error!(topic = m.topic(), partition = m.partition(), error = %e, "a decision was not delivered: the process stops, and a restart resends it from the last checkpoint");
        }
    }
}

/// Why the sink's records are not all on the topics.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The broker refused records for good.
    #[error("the broker refused {0} output records for good")]
    Refused(u64),
    /// Acks did not come in time.
    #[error("output records not acked within {0:?}")]
    Unacked(Duration),
}

/// Writes decisions and index changes to Kafka.
pub struct OutputSink {
    topics: Topics,
    producer: ThreadedProducer<Deliveries>,
    /// Partitions per output topic.
    counts: HashMap<String, i32>,
    /// The highest `seq` already on each output partition.
    delivered: HashMap<(String, i32), u64>,
    next_seq: Mutex<u64>,
    /// Every decision before this time has been handed to the producer.
    progress: AtomicU64,
    /// Decisions skipped as already delivered (a restart's replay).
    pub skipped: AtomicU64,
}

/// Reads the last `OutputRecord` of `(topic, partition)`, if any.
fn last_seq(cfg: &KafkaConfig, topic: &str, partition: i32) -> Result<Option<u64>, KafkaError> {
    let c: BaseConsumer = cfg.consumer(&format!("{}tail", cfg.outputs())).create()?;
    // Records before `low` are gone (the topic's retention): a partition
    // the broker emptied holds no decision to look for.
    let (low, high) = c.fetch_watermarks(topic, partition, Duration::from_secs(10))?;
    // Look back past records that are not decisions (should there be any).
    let mut from = high;
    while from > low {
        let start = (from - 64).max(low);
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, partition, Offset::Offset(start))?;
        c.assign(&tpl)?;
        let mut best = None;
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut next = start;
        while next < from && Instant::now() < deadline {
            if let Some(Ok(m)) = c.poll(Duration::from_millis(100)) {
                next = m.offset() + 1;
                if let Some(r) = m
                    .payload()
                    .and_then(|v| serde_json::from_slice::<OutputRecord>(v).ok())
                {
                    best = Some(r.seq);
                }
            }
        }
        if next < from {
            return Err(KafkaError::Timeout(Duration::from_secs(10)));
        }
        if best.is_some() {
            return Ok(best);
        }
        from = start;
    }
    Ok(None)
}

impl OutputSink {
    /// Reads where every output partition ends and starts the committer
    /// (its thread is returned, to stop and join with the process's others).
    pub fn new(cfg: &KafkaConfig) -> Result<(Arc<OutputSink>, Thread), KafkaError> {
        let topics = cfg.topics();
        let probe: BaseConsumer = cfg.client().create()?;
        let mut counts = HashMap::new();
        for t in topics.outputs().into_iter().chain([topics.index.as_str()]) {
            counts.insert(t.to_string(), partitions(&probe, t)?);
        }
        // A process killed a moment ago may still have produce requests on
        // their way through the broker: read the tails until they stay put
        // for a second.
        let tails = || -> Result<HashMap<(String, i32), u64>, KafkaError> {
            let mut tails = HashMap::new();
            for t in topics.outputs() {
                for p in 0..counts[t] {
                    if let Some(seq) = last_seq(cfg, t, p)? {
                        tails.insert((t.to_string(), p), seq);
                    }
                }
            }
            Ok(tails)
        };
        let mut delivered = tails()?;
        for _ in 0..10 {
            if delivered.is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_secs(1));
            let again = tails()?;
            if again == delivered {
                break;
            }
            delivered = again;
        }
        let producer = cfg
            .producer()
            // Decisions are never dropped: while the broker is away they wait
            // and are retried.
            .set("message.timeout.ms", "0")
            // One request in flight per broker keeps each partition in seq
            // order across retries without the idempotent producer, whose
            // sequence tracking a young topic on tansu 0.6 can wedge for a
            // partition (seen: every decision for one partition held back).
            // A retry may write a record twice; `seq` tells consumers, and a
            // restart reads the tails, so nothing is applied twice.
            .set("enable.idempotence", "false")
            .set("max.in.flight.requests.per.connection", "1")
            .create_with_context(Deliveries::default())?;
        let sink = Arc::new(OutputSink {
            topics,
            producer,
            counts,
            delivered,
            next_seq: Mutex::new(0),
            progress: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
        });
        let committer = Arc::clone(&sink);
        let consumer: BaseConsumer = cfg
            .consumer(&format!("{}dataflow", cfg.outputs()))
            .create()?;
        let inputs: Vec<(String, i32)> = committer
            .topics
            .inputs()
            .iter()
            .map(|t| partitions(&probe, t).map(|n| (t.to_string(), n)))
            .collect::<Result<_, _>>()?;
        let committing = Thread::spawn("grabflow-commit", move |stop| {
            committer.commit_loop(&consumer, &inputs, &stop)
        })
        .map_err(KafkaError::Thread)?;
        Ok((sink, committing))
    }

    /// Commits progress once a second; ends (which stops the process) once
    /// the broker has refused a record for good.
    fn commit_loop(&self, consumer: &BaseConsumer, inputs: &[(String, i32)], stop: &Stop) {
        let mut committed = 0;
        while !stop.stopped() {
            std::thread::sleep(Duration::from_secs(1));
            if self.refusals().is_err() {
                return;
            }
            let t = self.progress.load(Ordering::Acquire);
            if t <= committed || self.delivered(Duration::from_secs(10)).is_err() {
                continue;
            }
            // Every decision before `t` is acked: commit, per input partition,
            // the first offset at or after `t`.
            let mut tpl = TopicPartitionList::new();
            for (topic, n) in inputs {
                for p in 0..*n {
                    let _ = tpl.add_partition_offset(topic, p, Offset::Offset(t as i64));
                }
            }
            match consumer.offsets_for_times(tpl, Duration::from_secs(5)) {
                Ok(offsets) => {
                    let mut commit = TopicPartitionList::new();
                    for e in offsets.elements() {
                        if let Offset::Offset(o) = e.offset() {
                            let _ = commit.add_partition_offset(
                                e.topic(),
                                e.partition(),
                                Offset::Offset(o),
                            );
                        }
                    }
                    if commit.count() > 0 && consumer.commit(&commit, CommitMode::Sync).is_ok() {
                        committed = t;
                    }
                }
                Err(e) => tracing::debug!(error = %e, "offsets for times"),
            }
        }
    }

    /// Continues from a checkpoint's `saved` state (as [`Observer::save`]
    /// made it): the decisions replayed after it get their first `seq`s.
    pub fn restore(&self, saved: &[u8]) -> Result<(), postcard::Error> {
        *self.next_seq.lock().expect("seq") = postcard::from_bytes(saved)?;
        Ok(())
    }

    /// Waits (up to `timeout`) for every record's ack (the committer is
    /// stopped with its thread).
    pub fn close(&self, timeout: Duration) {
        let _ = self.producer.flush(timeout);
    }

    /// Waits (up to `timeout`) until the broker has reported on every
    /// record handed over so far, and says whether it has them all. A
    /// checkpoint is written only after: one whose `seq` is past a decision
    /// the broker does not have would leave it out of every restart.
    pub fn delivered(&self, timeout: Duration) -> Result<(), SinkError> {
        let deliveries = self.producer.context();
        let upto = deliveries.next.load(Ordering::Acquire);
        let deadline = Instant::now() + timeout;
        while !deliveries.reported(upto) {
            if Instant::now() > deadline {
                return Err(SinkError::Unacked(timeout));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        self.refusals()
    }

    /// Whether the broker refused any record for good (the process must
    /// then stop: see the crate docs).
    pub fn refusals(&self) -> Result<(), SinkError> {
        match self.producer.context().failed.load(Ordering::Acquire) {
            0 => Ok(()),
            n => Err(SinkError::Refused(n)),
        }
    }

    fn send(&self, topic: &str, partition: i32, key: &str, value: &[u8], time: Time) {
        let deliveries = self.producer.context();
        let n = deliveries.hand();
        let mut record = BaseRecord::with_opaque_to(topic, n)
            .partition(partition)
            .key(key)
            .payload(value)
            .timestamp(time as i64);
        loop {
            match self.producer.send(record) {
                Ok(()) => return,
                // The queue is full (the broker is slow or away): wait, which
                // holds the dataflow back instead of dropping the decision.
                Err((ClientError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err((e, _)) => {
                    deliveries.refused(n);
                    tracing::error!(topic, partition, error = %e, "a decision was refused by the client: the process stops");
                    return;
                }
            }
        }
    }
}

impl Observer for OutputSink {
    fn events(&self, _: &[Event]) {}

    fn decisions(&self, decisions: Vec<(Time, Output)>) {
        let mut next = self.next_seq.lock().expect("seq");
        for (time, output) in decisions {
            let seq = *next;
            *next += 1;
            let topic = self.topics.output_for(&output);
            let key = output_key(&output);
            let partition = partition_for(key.as_bytes(), self.counts[topic]);
            if self
                .delivered
                .get(&(topic.to_string(), partition))
                .is_some_and(|&last| seq <= last)
            {
                self.skipped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let key = key.to_string();
            let value =
                serde_json::to_vec(&OutputRecord { seq, time, output }).expect("outputs serialize");
            self.send(topic, partition, &key, &value, time);
        }
    }

    fn index(&self, changes: Vec<(IndexEntry, Time, isize)>) {
        // The last state of each rider in this batch, as one upsert.
        let mut changes = changes;
        changes.sort_by_key(|(e, t, d)| (e.rider.clone(), *t, *d));
        let mut last: BTreeMap<_, IndexRecord> = BTreeMap::new();
        for (e, time, d) in changes {
            let rec = IndexRecord {
                rider: e.rider.clone(),
                time,
                cell: (d > 0).then_some(e.cell),
                at: (d > 0).then_some(e.at),
            };
            last.insert(e.rider, rec);
        }
        let n = self.counts[&self.topics.index];
        for (rider, rec) in last {
            let value = serde_json::to_vec(&rec).expect("index records serialize");
            let p = partition_for(rider.as_str().as_bytes(), n);
            self.send(&self.topics.index, p, rider.as_str(), &value, rec.time);
        }
    }

    fn progress(&self, time: Time) {
        self.progress.fetch_max(time, Ordering::AcqRel);
    }

    /// The next `seq`: the decisions before the checkpoint took those before.
    fn save(&self, _at: Time) -> Snapshot {
        snapshot(*self.next_seq.lock().expect("seq"))
    }
}

/// What [`follow`] has read, for readiness, and its thread.
pub struct Following {
    caught_up: Arc<AtomicBool>,
    thread: Thread,
}

impl Following {
    /// Whether the topics were read to where they ended at start.
    pub fn caught_up(&self) -> bool {
        self.caught_up.load(Ordering::Acquire)
    }

    /// The following thread, to stop and join with the process's others.
    pub fn into_thread(self) -> Thread {
        self.thread
    }
}

/// Feeds `observer` (a split egress's view) from the topics, on its own
/// thread: input events as read, index upserts as changes, and decisions in
/// `seq` order once every input partition has passed their time.
pub fn follow(cfg: &KafkaConfig, observer: Arc<dyn Observer>) -> Result<Following, KafkaError> {
    let topics = cfg.topics();
    let consumer: BaseConsumer = cfg.consumer(&format!("{}egress", cfg.outputs())).create()?;
    let mut tpl = TopicPartitionList::new();
    let mut inputs = HashMap::new();
    for (topic, t) in topics.inputs().into_iter().enumerate() {
        for p in 0..partitions(&consumer, t)? {
            tpl.add_partition_offset(t, p, Offset::Beginning)?;
            inputs.insert((t.to_string(), p), InputPartition { topic, time: 0 });
        }
    }
    // Caught up once the decisions and the index are read to where they
    // end now.
    let mut ends = HashMap::new();
    for t in topics.outputs().into_iter().chain([topics.index.as_str()]) {
        from_start(&consumer, t, &mut tpl, &mut ends)?;
    }
    consumer.assign(&tpl)?;
    let caught_up = Arc::new(AtomicBool::new(ends.is_empty()));
    let follower = Follower {
        observer,
        index_topic: topics.index.clone(),
        inputs,
        ends,
        caught_up: Arc::clone(&caught_up),
        pending: BTreeMap::new(),
        next_seq: 0,
        ready: Vec::new(),
        current: HashMap::new(),
        events: Vec::new(),
        changes: Vec::new(),
    };
    let thread = Thread::spawn("grabflow-egress-follow", move |stop| {
        follower.run(&consumer, &stop)
    })
    .map_err(KafkaError::Thread)?;
    Ok(Following { caught_up, thread })
}

/// How long the follower waits for a first record before handing over what
/// it has.
const FOLLOW_WAIT: Duration = Duration::from_millis(50);
/// The most records the follower reads before handing over.
const FOLLOW_BATCH: usize = 10_000;

/// An input partition as followed.
struct InputPartition {
    /// The topic's place in [`Topics::inputs`], which numbers its events'
    /// offsets.
    topic: usize,
    /// The partition's time so far: its records' timestamps, made monotonic.
    time: Time,
}

/// The follower thread: what it has read from the topics and not yet
/// handed to the observer.
struct Follower {
    observer: Arc<dyn Observer>,
    index_topic: String,
    inputs: HashMap<(String, i32), InputPartition>,
    /// Output and index partitions not yet read to where they ended at start.
    ends: HashMap<(String, i32), i64>,
    caught_up: Arc<AtomicBool>,
    /// Decisions read ahead of `next_seq`, by seq.
    pending: BTreeMap<u64, (Time, Output)>,
    /// The seq of the next decision to hand over.
    next_seq: u64,
    /// Decisions in seq order, waiting for every input to pass their time.
    ready: Vec<(Time, Output)>,
    /// Each rider's last index upsert.
    current: HashMap<grabflow_api::Id, IndexRecord>,
    /// Input events read, not yet handed over.
    events: Vec<Event>,
    /// Index changes read, not yet handed over.
    changes: Vec<(IndexEntry, Time, isize)>,
}

impl Follower {
    /// Reads and hands over, for ever.
    fn run(mut self, consumer: &BaseConsumer, stop: &Stop) {
        while !stop.stopped() {
            let mut wait = FOLLOW_WAIT;
            for _ in 0..FOLLOW_BATCH {
                let Some(Ok(m)) = consumer.poll(wait) else {
                    break;
                };
                wait = Duration::ZERO;
                self.take(&m);
            }
            self.hand_over();
        }
    }

    /// Files one record: an input event, an index upsert or a decision.
    fn take(&mut self, m: &impl Message) {
        let at = (m.topic().to_string(), m.partition());
        if let Some(input) = self.inputs.get_mut(&at) {
            let ts = m.timestamp().to_millis().unwrap_or(0).max(0) as Time;
            input.time = input.time.max(ts);
            if let Some(v) = m.payload() {
                if let Ok(e) =
                    InputRecord::decode(v, input.topic, m.partition(), m.offset(), input.time)
                {
                    self.events.push(e);
                }
            }
        } else if m.topic() == self.index_topic {
            if let Some(r) = m
                .payload()
                .and_then(|v| serde_json::from_slice::<IndexRecord>(v).ok())
            {
                if !self.upsert(r) {
                    // Skipped whole: it does not count as read to the end.
                    return;
                }
            }
        } else if let Some(r) = m
            .payload()
            .and_then(|v| serde_json::from_slice::<OutputRecord>(v).ok())
        {
            if r.seq >= self.next_seq {
                self.pending.insert(r.seq, (r.time, r.output));
            }
        }
        if self
            .ends
            .get(&at)
            .is_some_and(|&high| m.offset() + 1 >= high)
        {
            self.ends.remove(&at);
        }
    }

    /// A rider's index upsert, as the change from their last one; `false`
    /// (and nothing changed) for one older than that.
    fn upsert(&mut self, r: IndexRecord) -> bool {
        let old = self.current.get(&r.rider);
        if old.is_some_and(|o| o.time > r.time) {
            return false;
        }
        if let Some(IndexRecord {
            cell: Some(cell),
            at: Some(at),
            time,
            ..
        }) = old
        {
            let entry = IndexEntry {
                cell: *cell,
                rider: r.rider.clone(),
                at: *at,
            };
            self.changes.push((entry, *time, -1));
        }
        if let (Some(cell), Some(at)) = (r.cell, r.at) {
            let entry = IndexEntry {
                cell,
                rider: r.rider.clone(),
                at,
            };
            self.changes.push((entry, r.time, 1));
        }
        self.current.insert(r.rider.clone(), r);
        true
    }

    /// Hands the observer the events and index changes read, and the
    /// decisions, in seq order, whose time every input partition has passed.
    fn hand_over(&mut self) {
        while let Some(d) = self.pending.remove(&self.next_seq) {
            self.ready.push(d);
            self.next_seq += 1;
        }
        if !self.events.is_empty() {
            self.observer.events(&std::mem::take(&mut self.events));
        }
        if !self.changes.is_empty() {
            self.observer.index(std::mem::take(&mut self.changes));
        }
        let inputs_at = self.inputs.values().map(|i| i.time).min().unwrap_or(0);
        let n = self.ready.partition_point(|(t, _)| *t < inputs_at);
        if n > 0 {
            let last = self.ready[n - 1].0;
            self.observer.decisions(self.ready.drain(..n).collect());
            self.observer.progress(last);
        }
        if self.ends.is_empty() && self.ready.is_empty() && self.pending.is_empty() {
            self.caught_up.store(true, Ordering::Release);
        }
    }
}
