//! Kafka: the log of production mode.
//!
//! - [`KafkaConfig`]: where the broker is and how topics are named and made.
//! - [`ensure_topics`]: creates the topics of [`Topics`] that are missing.
//! - [`KafkaLog`]: ingress's producer. Each event goes to its input topic
//!   keyed by its entity; the call returns only once the broker has acked it
//!   (`acks=all`, idempotent producer), so a 2xx means durable.
//! - [`KafkaSource`]: one timely worker's input partitions. Time comes from
//!   the log: a record's time is its Kafka timestamp made monotonic per
//!   partition, and the worker's frontier is the least time over its
//!   partitions. Partitions that hold time back get tick records (no
//!   value): soon when a newer event waits on them, rarely otherwise.
//! - [`Follower`]: reads the input topics for the ids and idempotency keys
//!   ingress must know, and the grab results for waiting grab calls.

use crate::keys::{FirstUse, KeyReused, Keys, Print};
use crate::log::Appended;
use crate::routes::{GrabWaiter, Known};
use grabflow_api::topics::{InputRecord, OutputRecord, Topics};
use grabflow_api::{EventKind, GrabOutcome, Id, Output, Time};
use grabflow_dataflow::runtime::Source;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::ThreadedProducer;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use serde::Deserialize;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::oneshot;

/// The header carrying a client's `Idempotency-Key`.
pub const KEY_HEADER: &str = "idempotency-key";
/// The header carrying the size of the batch a record belongs to.
pub const BATCH_HEADER: &str = "grabflow-batch";

/// Settings of production mode's Kafka.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap servers, `host:port[,host:port…]`.
    pub brokers: String,
    /// Prefix of every topic name (`grabflow.` gives `grabflow.orders`, …).
    pub prefix: String,
    /// Prefix of the output topics, when not `prefix` (a shadow dataflow).
    pub output_prefix: Option<String>,
    /// Partitions of each topic grabflow creates.
    pub partitions: i32,
    /// Replicas of each topic grabflow creates.
    pub replication: i32,
    /// How long an append waits for the broker's ack before answering 503.
    pub ack_timeout: Duration,
    /// An input partition holding back a newer event gets a tick after this
    /// long without a record.
    pub tick: Duration,
    /// Any input partition without a record for this long gets a tick, so
    /// timers fire when nothing happens.
    pub idle_tick: Duration,
}

impl KafkaConfig {
    /// Defaults for `brokers`: prefix `grabflow.`, 4 partitions, 1 replica,
    /// 5 s ack timeout, 5 ms tick, 50 ms idle tick.
    pub fn new(brokers: &str) -> KafkaConfig {
        KafkaConfig {
            brokers: brokers.to_string(),
            prefix: "grabflow.".into(),
            output_prefix: None,
            partitions: 4,
            replication: 1,
            ack_timeout: Duration::from_secs(5),
            tick: Duration::from_millis(5),
            idle_tick: Duration::from_millis(50),
        }
    }

    /// The topic names.
    pub fn topics(&self) -> Topics {
        Topics::with_outputs(&self.prefix, self.outputs())
    }

    /// The prefix of the output topics (and of the dataflow's consumer group).
    pub fn outputs(&self) -> &str {
        self.output_prefix.as_deref().unwrap_or(&self.prefix)
    }

    /// A client configuration for these brokers.
    pub fn client(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers)
            // librdkafka's own logs go through its context to `log`; keep
            // them to errors (a stopped broker is reported by our errors).
            .set("log_level", "3");
        c
    }

    /// Producer settings shared by every grabflow producer.
    pub fn producer(&self) -> ClientConfig {
        let mut c = self.client();
        // No duplicates and no reordering on retries: exactly one copy of each
        // acknowledged record, in order per partition.
        c.set("enable.idempotence", "true")
            // An ack means every in-sync replica has the record.
            .set("acks", "all")
            // Concurrent requests share a produce request at ≤1 ms of latency.
            .set("linger.ms", "1")
            // Same partitioning as Java clients (murmur2 of the key), so other
            // services co-partition with grabflow's topics.
            .set("partitioner", "murmur2_random")
            // One record per batch. tansu 0.6 (the test broker) counts a
            // partition's offsets and high watermark per batch, not per
            // record, which breaks reading a partition to its end and
            // finding its last record; single-record batches keep both
            // right (at a cost in throughput, measured in the README).
            .set("batch.num.messages", "1");
        c
    }

    /// Consumer settings for reading topics by assignment (no group rebalance).
    pub fn consumer(&self, group: &str) -> ClientConfig {
        let mut c = self.client();
        // Commits (of the dataflow) go to this group; nothing else uses it.
        c.set("group.id", group)
            // Progress is committed by grabflow itself, after delivery.
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            // An idle partition is answered within 10 ms. tansu 0.6 holds
            // a fetch for the whole wait even when data arrives, so this
            // bounds latency; at 5 ms its idle polling cost twice the CPU
            // for the same order→offer latency, at 100 ms latency was 200 ms.
            .set("fetch.wait.max.ms", "10")
            .set("enable.partition.eof", "false");
        c
    }
}

/// Errors of the Kafka side.
#[derive(Debug, thiserror::Error)]
pub enum KafkaError {
    /// The client failed.
    #[error("kafka: {0}")]
    Client(#[from] rdkafka::error::KafkaError),
    /// A topic is missing or has no partitions.
    #[error("kafka topic {0} has no partitions")]
    NoPartitions(String),
    /// The broker did not answer in time.
    #[error("kafka did not ack within {0:?}")]
    Timeout(Duration),
    /// The idempotency key was first used for a different request.
    #[error(transparent)]
    KeyReused(#[from] KeyReused),
    /// An order with this id was placed already.
    #[error("order {0} exists")]
    OrderExists(Id),
}

/// Creates the topics that are missing; returns their names.
pub async fn ensure_topics(cfg: &KafkaConfig) -> Result<Topics, KafkaError> {
    let topics = cfg.topics();
    let admin: AdminClient<DefaultClientContext> = cfg.client().create()?;
    let names: Vec<&str> = topics
        .inputs()
        .into_iter()
        .chain(topics.outputs())
        .chain([topics.index.as_str()])
        .collect();
    let new: Vec<NewTopic> = names
        .iter()
        .map(|n| NewTopic::new(n, cfg.partitions, TopicReplication::Fixed(cfg.replication)))
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for result in admin.create_topics(&new, &opts).await? {
        match result {
            Ok(_) => {}
            Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => {
                return Err(KafkaError::Client(rdkafka::error::KafkaError::AdminOp(
                    code,
                )))
                .inspect_err(|_| tracing::error!(topic = name, "topic not created"));
            }
        }
    }
    Ok(topics)
}

/// Partitions of `topic`, from the broker's metadata.
pub fn partitions(consumer: &BaseConsumer, topic: &str) -> Result<i32, KafkaError> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(5))?;
        let n = md
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .map_or(0, |t| t.partitions().len() as i32);
        if n > 0 {
            return Ok(n);
        }
        if Instant::now() > deadline {
            return Err(KafkaError::NoPartitions(topic.to_string()));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn now_ms() -> Time {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as Time)
}

/// Ingress's producer: appends events to their input topics.
pub struct KafkaLog {
    producer: FutureProducer,
    topics: Topics,
    timeout: Duration,
    /// Answers of idempotency keys seen (own appends and, via the
    /// [`Follower`], every record carrying a key).
    keys: Arc<Mutex<Keys>>,
    /// Ids the topics hold (kept by the [`Follower`] and ingress), to place
    /// an order once whatever key its request carries.
    known: Arc<Mutex<Known>>,
}

impl KafkaLog {
    /// A producer for `cfg`'s brokers.
    pub fn new(
        cfg: &KafkaConfig,
        keys: Arc<Mutex<Keys>>,
        known: Arc<Mutex<Known>>,
    ) -> Result<Self, KafkaError> {
        let producer: FutureProducer = cfg
            .producer()
            // A broker that stays down fails the append (503) instead of
            // holding the request forever; nothing unacknowledged is promised.
            .set(
                "message.timeout.ms",
                cfg.ack_timeout.as_millis().max(1).to_string(),
            )
            .create()?;
        Ok(KafkaLog {
            producer,
            topics: cfg.topics(),
            timeout: cfg.ack_timeout,
            keys,
            known,
        })
    }

    /// Appends `events` and answers once the broker has acked every one.
    /// With an idempotency `key` already used, appends nothing and returns
    /// the first answer.
    pub async fn append(
        &self,
        key: Option<String>,
        events: Vec<(Id, EventKind)>,
    ) -> Result<Appended, KafkaError> {
        let request = key
            .as_ref()
            .map(|_| Print::of(events.iter().map(|(_, k)| k)));
        if let (Some(k), Some(request)) = (&key, request) {
            if let Some(first) = self.keys.lock().expect("keys").get(k) {
                return Ok(first.repeat(request)?);
            }
        }
        // Claimed before producing, so of two placements racing here the
        // second is refused; given back if the broker does not take it.
        let claimed = self
            .known
            .lock()
            .expect("known")
            .claim_orders(&events)
            .map_err(KafkaError::OrderExists)?;
        let last = match self.produce(key.as_deref(), &events).await {
            Ok(last) => last,
            Err(e) => {
                self.known.lock().expect("known").release(&claimed);
                return Err(e);
            }
        };
        let batch = events.len();
        let answer = match events.as_slice() {
            [(id, _)] if batch == 1 => Appended::One {
                event_id: id.clone(),
                offset: last.unwrap_or(0) as u64,
            },
            _ => Appended::Batch { accepted: batch },
        };
        if let (Some(k), Some(request)) = (key, request) {
            let first = FirstUse {
                answer: answer.clone(),
                request,
            };
            self.keys.lock().expect("keys").insert(k, first);
        }
        Ok(answer)
    }

    /// Produces `events` (with `key` in their headers) and waits for the
    /// broker's acks; the offset of the last.
    async fn produce(
        &self,
        key: Option<&str>,
        events: &[(Id, EventKind)],
    ) -> Result<Option<i64>, KafkaError> {
        let batch = events.len();
        let mut pending = Vec::with_capacity(batch);
        for (id, kind) in events {
            let value = serde_json::to_vec(&InputRecord {
                id: Some(id.clone()),
                kind: kind.clone(),
            })
            .expect("events serialize");
            let mut headers = OwnedHeaders::new();
            if let Some(k) = key {
                headers = headers.insert(Header {
                    key: KEY_HEADER,
                    value: Some(k),
                });
                if batch > 1 {
                    headers = headers.insert(Header {
                        key: BATCH_HEADER,
                        value: Some(&batch.to_string()),
                    });
                }
            }
            let record = FutureRecord::to(self.topics.input_for(kind))
                .key(kind.entity().as_str())
                .payload(&value)
                .timestamp(now_ms() as i64)
                .headers(headers);
            match self.producer.send_result(record) {
                Ok(delivery) => pending.push(delivery),
                Err((e, _)) => return Err(e.into()),
            }
        }
        let mut last = None;
        let wait = tokio::time::timeout(self.timeout + Duration::from_secs(1), async {
            for d in pending {
                match d.await {
                    Ok(Ok(delivery)) => last = Some(delivery.offset),
                    Ok(Err((e, _))) => return Err(KafkaError::Client(e)),
                    Err(_) => return Err(KafkaError::Timeout(self.timeout)),
                }
            }
            Ok(())
        });
        wait.await
            .map_err(|_| KafkaError::Timeout(self.timeout))??;
        Ok(last)
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
    /// The newest event time any worker of this process has read.
    newest: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    /// Records that were not events (logged and skipped).
    pub skipped: u64,
}

/// Makes the sources of a process's workers (the factory the runtime calls).
pub struct KafkaSources {
    cfg: KafkaConfig,
    counts: Vec<i32>,
    ticker: Arc<ThreadedProducer<DefaultProducerContext>>,
    newest: Arc<AtomicU64>,
    /// Set to end every source (shutdown).
    pub stop: Arc<AtomicBool>,
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
        let ticker = cfg
            .producer()
            // Ticks are for now or never: an old one is useless.
            .set("message.timeout.ms", "10000")
            // A duplicated tick is harmless; and several processes tick the
            // same partitions, which tansu 0.6's idempotence tracking does
            // not take well (a wedged partition stops the clock).
            .set("enable.idempotence", "false")
            .create()?;
        Ok(KafkaSources {
            cfg: cfg.clone(),
            counts,
            ticker: Arc::new(ticker),
            newest: Arc::default(),
            stop: Arc::default(),
        })
    }

    /// Worker `me` of `peers`'s source, reading its partitions from the start.
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
                    tpl.add_partition_offset(name, p, Offset::Beginning)?;
                    parts.push(Part {
                        topic: t,
                        name: name.to_string(),
                        partition: p,
                        time: 0,
                        sent: 0,
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
            stop: Arc::clone(&self.stop),
            skipped: 0,
        })
    }
}

/// Records taken per poll before the worker steps.
const POLL_BATCH: usize = 20_000;

impl KafkaSource {
    /// Ticks the partitions that hold time back. A partition behind an
    /// event this process has read (the event waits for every partition to
    /// pass its time) gets a tick once quiet for `tick`; any other only after
    /// `idle_tick`, so timers fire when nothing happens. A tick still on its
    /// way counts as read; one lost is sent again after `idle_tick`. Ticks of
    /// one round share a produce request.
    fn tick_idle(&mut self) {
        let now = now_ms();
        let newest = self.newest.load(Ordering::Acquire);
        for p in &mut self.parts {
            let ahead = p.time.max(p.sent);
            let every = if newest > ahead {
                self.tick
            } else {
                self.idle_tick
            };
            if now.saturating_sub(ahead) < every.as_millis() as Time {
                continue;
            }
            // Never behind the event it is for, whatever the clocks say.
            let at = now.max(newest);
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
        if self.stop.load(Ordering::Acquire) {
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
            if let Some(value) = m.payload() {
                match InputRecord::decode(value, part.topic, part.partition, m.offset(), part.time)
                {
                    Ok(e) => {
                        self.newest.fetch_max(part.time, Ordering::AcqRel);
                        out.push(e)
                    }
                    Err(e) => {
                        self.skipped += 1;
                        tracing::warn!(topic = m.topic(), partition = m.partition(), offset = m.offset(), error = %e, "skipped a record that is not an event");
                    }
                }
            }
        }
        self.tick_idle();
        self.parts.iter().map(|p| p.time).min()
    }
}

/// Grab calls waiting for their decisions: fed from the grabs topic (split
/// ingress) or by egress's view (one process).
#[derive(Default)]
pub struct GrabResults {
    waiters: Mutex<HashMap<Id, oneshot::Sender<GrabOutcome>>>,
}

impl GrabResults {
    /// Answers the call waiting on `attempt`, if one is.
    pub fn resolve(&self, attempt: &Id, outcome: GrabOutcome) {
        if let Some(tx) = self.waiters.lock().expect("waiters").remove(attempt) {
            let _ = tx.send(outcome);
        }
    }
}

impl GrabWaiter for GrabResults {
    fn expect(&self, attempt: &Id) -> oneshot::Receiver<GrabOutcome> {
        let (tx, rx) = oneshot::channel();
        self.waiters
            .lock()
            .expect("waiters")
            .insert(attempt.clone(), tx);
        rx
    }

    fn forget(&self, attempt: &Id) {
        self.waiters.lock().expect("waiters").remove(attempt);
    }
}

/// Follows the input topics (ids ingress must know, idempotency keys) and,
/// when given waiters, the grabs topic.
pub struct Follower {
    caught_up: Arc<AtomicBool>,
}

impl Follower {
    /// Starts following on its own thread; [`Follower::wait_caught_up`]
    /// tells when the input topics have been read to their ends as of now.
    pub fn start(
        cfg: &KafkaConfig,
        known: Arc<Mutex<Known>>,
        keys: Arc<Mutex<Keys>>,
        grabs: Option<Arc<GrabResults>>,
    ) -> Result<Follower, KafkaError> {
        let topics = cfg.topics();
        let consumer: BaseConsumer = cfg.consumer(&format!("{}ingress", cfg.prefix)).create()?;
        let mut tpl = TopicPartitionList::new();
        let mut ends = HashMap::new();
        for t in topics.inputs() {
            for p in 0..partitions(&consumer, t)? {
                tpl.add_partition_offset(t, p, Offset::Beginning)?;
                let (_, high) = consumer.fetch_watermarks(t, p, Duration::from_secs(10))?;
                if high > 0 {
                    ends.insert((t.to_string(), p), high);
                }
            }
        }
        if grabs.is_some() {
            for p in 0..partitions(&consumer, &topics.grabs)? {
                tpl.add_partition_offset(&topics.grabs, p, Offset::End)?;
            }
        }
        consumer.assign(&tpl)?;
        let caught_up = Arc::new(AtomicBool::new(ends.is_empty()));
        let done = Arc::clone(&caught_up);
        std::thread::Builder::new()
            .name("grabflow-follower".into())
            .spawn(move || {
                // A batch's events read so far, and their print, by key.
                let mut batch_counts: HashMap<String, (usize, Print)> = HashMap::new();
                loop {
                    let Some(m) = consumer.poll(Duration::from_millis(100)) else {
                        continue;
                    };
                    let Ok(m) = m else { continue };
                    if m.topic() == topics.grabs {
                        if let (Some(g), Some(v)) = (&grabs, m.payload()) {
                            if let Ok(OutputRecord {
                                output:
                                    Output::GrabDecided {
                                        attempt, outcome, ..
                                    },
                                ..
                            }) = serde_json::from_slice(v)
                            {
                                g.resolve(&attempt, outcome);
                            }
                        }
                        continue;
                    }
                    let header = |name: &str| {
                        m.headers().and_then(|h| {
                            h.iter()
                                .find(|x| x.key == name)
                                .and_then(|x| x.value)
                                .and_then(|v| std::str::from_utf8(v).ok())
                                .map(str::to_string)
                        })
                    };
                    let record: Option<InputRecord> =
                        m.payload().and_then(|v| serde_json::from_slice(v).ok());
                    if let Some(r) = &record {
                        let mut k = known.lock().expect("known");
                        match &r.kind {
                            EventKind::OrderPlaced { order, .. } => {
                                k.orders.insert(order.clone());
                            }
                            EventKind::MerchantUpserted { merchant, .. } => {
                                k.merchants.insert(merchant.clone());
                            }
                            _ => {}
                        }
                    }
                    if let (Some(key), Some(record)) = (header(KEY_HEADER), record) {
                        let first = match header(BATCH_HEADER).and_then(|b| b.parse().ok()) {
                            Some(n) => {
                                let (read, request) = batch_counts.entry(key.clone()).or_default();
                                *read += 1;
                                request.add(&record.kind);
                                (*read == n).then_some(FirstUse {
                                    answer: Appended::Batch { accepted: n },
                                    request: *request,
                                })
                            }
                            None => record.id.map(|id| FirstUse {
                                answer: Appended::One {
                                    event_id: id,
                                    offset: m.offset() as u64,
                                },
                                request: Print::of([&record.kind]),
                            }),
                        };
                        if let Some(first) = first {
                            keys.lock().expect("keys").entry(key).or_insert(first);
                        }
                    }
                    let at = (m.topic().to_string(), m.partition());
                    if ends.get(&at).is_some_and(|&high| m.offset() + 1 >= high) {
                        ends.remove(&at);
                        if ends.is_empty() {
                            done.store(true, Ordering::Release);
                        }
                    }
                }
            })
            .expect("spawn follower");
        Ok(Follower { caught_up })
    }

    /// Waits until the input topics have been read up to where they ended
    /// when following started (or `timeout` passed); returns whether they were.
    pub fn wait_caught_up(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while !self.caught_up.load(Ordering::Acquire) {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }
}
