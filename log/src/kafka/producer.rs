//! Ingress's producer: each event goes to its input topic keyed by its
//! entity; an append answers only once the broker has acked every event
//! (`acks=all`, idempotent producer), so a 2xx means durable.
//!
//! An event that waits on a decision (anything but a location ping) takes
//! ticks along: records without value, one millisecond after it, into every
//! input partition. The one into the event's own partition goes right
//! behind it, through the same producer; the others through a producer of
//! their own (so the event's ack does not wait for them). The dataflow
//! reads them in the same fetch as the event, so its clock passes the event
//! at once instead of a broker round trip later (the dataflow's own ticks,
//! see [`source`](super::source), remain for events other producers write).

use super::config::{partitions, KafkaConfig, KafkaError, BATCH_HEADER, KEY_HEADER};
use crate::ledger::{Admission, Ledger};
use crate::{now_ms, Append, Appended, LogError, Pending};
use grabflow_api::topics::{partition_for, InputRecord, Topics};
use grabflow_api::{EventKind, Id, Time};
use rdkafka::consumer::BaseConsumer;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{
    BaseRecord, DefaultProducerContext, FutureProducer, FutureRecord, ThreadedProducer,
};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Ingress's producer: appends events to their input topics.
pub struct KafkaLog {
    producer: FutureProducer,
    topics: Topics,
    timeout: Duration,
    /// Keys and known ids: of its own appends and, through the
    /// [`Follower`](super::Follower), of every record in the input topics.
    ledger: Arc<Mutex<Ledger>>,
    /// The partitions of each input topic, for the ticks that go with an
    /// event.
    counts: HashMap<String, i32>,
    /// Sends those ticks, but the ones into the events' own partitions.
    ticker: ThreadedProducer<DefaultProducerContext>,
    /// The time of the last ticks sent along (at most one round a
    /// millisecond).
    ticked: AtomicU64,
}

impl KafkaLog {
    /// A producer for `cfg`'s brokers.
    pub fn new(cfg: &KafkaConfig, ledger: Arc<Mutex<Ledger>>) -> Result<Self, KafkaError> {
        let producer: FutureProducer = cfg
            .producer()
            // A broker that stays down fails the append (503) instead of
            // holding the request forever; nothing unacknowledged is promised.
            .set(
                "message.timeout.ms",
                cfg.ack_timeout.as_millis().max(1).to_string(),
            )
            .create()?;
        let probe: BaseConsumer = cfg.client().create()?;
        let mut counts = HashMap::new();
        for topic in cfg.topics().inputs() {
            counts.insert(topic.to_string(), partitions(&probe, topic)?);
        }
        let ticker = cfg
            .producer()
            // As the dataflow's ticker: for now or never, and duplicates
            // are harmless.
            .set("message.timeout.ms", "10000")
            .set("enable.idempotence", "false")
            .create()?;
        Ok(KafkaLog {
            producer,
            topics: cfg.topics(),
            timeout: cfg.ack_timeout,
            ledger,
            counts,
            ticker,
            ticked: AtomicU64::new(0),
        })
    }

    /// Sends a tick at `at` into every input partition (unless a round at
    /// `at` or later went already): into `own` (the partitions of the
    /// events just sent) behind them, into the others through the ticker.
    /// The dataflow's clock passes the events as soon as it reads them.
    /// Not waited for: a lost tick only costs the dataflow's own, later.
    fn tick_along(&self, at: Time, own: &HashSet<(&str, i32)>) {
        if self.ticked.fetch_max(at, Ordering::AcqRel) >= at {
            return;
        }
        for (topic, &count) in &self.counts {
            for partition in 0..count {
                // A full queue (broker away) drops the tick, as lost ones are.
                if own.contains(&(topic.as_str(), partition)) {
                    let tick = FutureRecord::<[u8], [u8]>::to(topic)
                        .partition(partition)
                        .timestamp(at as i64);
                    let _ = self.producer.send_result(tick);
                } else {
                    let tick = BaseRecord::<[u8], [u8]>::to(topic)
                        .partition(partition)
                        .timestamp(at as i64);
                    let _ = self.ticker.send(tick);
                }
            }
        }
    }

    /// Appends `events` and answers once the broker has acked every one,
    /// as the ledger admits it.
    async fn append_admitted(
        &self,
        key: Option<String>,
        events: Vec<(Id, EventKind)>,
    ) -> Result<Appended, LogError> {
        let admitted =
            self.ledger
                .lock()
                .expect("ledger")
                .admit(key.as_deref(), &events, crate::now_ms())?;
        let claim = match admitted {
            Admission::Repeat(answer) => return Ok(answer),
            Admission::Fresh(claim) => claim,
        };
        let last = match self.produce(key.as_deref(), &events).await {
            Ok(last) => last,
            Err(e) => {
                self.ledger.lock().expect("ledger").failed(claim);
                return Err(e.into());
            }
        };
        let answer = match events.as_slice() {
            [(id, _)] => Appended::One {
                event_id: id.clone(),
                offset: last.unwrap_or(0) as u64,
            },
            _ => Appended::Batch {
                accepted: events.len(),
            },
        };
        self.ledger.lock().expect("ledger").appended(claim, &answer);
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
        // Just after the newest event that waits on a decision, if any, and
        // the partitions of those events.
        let mut waits: Time = 0;
        let mut own = HashSet::new();
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
            let at = now_ms();
            let record = FutureRecord::to(self.topics.input_for(kind))
                .key(kind.entity().as_str())
                .payload(&value)
                .timestamp(at as i64)
                .headers(headers);
            match self.producer.send_result(record) {
                Ok(delivery) => pending.push(delivery),
                Err((e, _)) => return Err(e.into()),
            }
            if !matches!(kind, EventKind::LocationPinged { .. }) {
                waits = waits.max(at + 1);
                let topic = self.topics.input_for(kind);
                let count = self.counts.get(topic).copied().unwrap_or(1);
                own.insert((
                    topic,
                    partition_for(kind.entity().as_str().as_bytes(), count),
                ));
            }
        }
        if waits > 0 {
            self.tick_along(waits, &own);
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

impl Append for KafkaLog {
    fn append(&self, key: Option<String>, events: Vec<(Id, EventKind)>) -> Pending<'_> {
        Box::pin(self.append_admitted(key, events))
    }
}
