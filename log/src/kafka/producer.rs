//! Ingress's producer: each event goes to its input topic keyed by its
//! entity; an append answers only once the broker has acked every event
//! (`acks=all`, idempotent producer), so a 2xx means durable.
//!
//! An order's event (on the orders topic: a placement, a grab, a rider's
//! step, a cancellation; someone waits on what each decides) takes ticks
//! along: records without value, one millisecond after it, into every
//! input partition. The dataflow reads them with the event, so its clock
//! passes the event at once instead of a broker round trip later (the
//! dataflow's own ticks, see [`source`](super::source), remain for events
//! other producers write).
//!
//! Ingress places each record in its partition itself (Kafka's murmur2 of
//! the key, as the producer's partitioner would), so it knows which
//! partitions of the orders topic hold the events just queued. The ticks
//! into those go through the events' own producer, in their batch, behind
//! them: sent apart, a tick could reach an event's partition first and
//! push the event's time past it (times are monotonic per partition). The
//! ticks into every other input partition go, at the same moment, through
//! three producers of their own without idempotence (the partitions dealt
//! among them): a broker writes their requests beside the events' request
//! and beside each other instead of one after another (tansu 0.6 writes a
//! request's partitions in turn, and an idempotent batch costs it more).
//! An order's ack waits for one write (its batch: the event and its
//! tick), and at 16 partitions the clock passes it after the longest of 3
//! requests of ~16 ticks, not one of 47. (Ticks may overtake another event still in flight, whose
//! time then becomes the tick's: an order's event then still gets a round
//! of its own after that tick; a rider's or merchant's needs none. Each
//! round's requests are queued before the next round's.)
//!
//! Rounds go forward: each is at least a millisecond after the one before.
//! Two events of one millisecond (two riders grabbing an order) would
//! otherwise both get a round at that millisecond + 1, and the first
//! round, queued ahead of the second event, pushes that event's time to
//! exactly its own: no round would pass it. A round runs at most 2 ms
//! (`LEAD`) ahead of the wall clock; past that, in a burst of more than a
//! round a millisecond, events get only the ticks behind them in their
//! own partitions, and the dataflow's own tick passes what that leaves.

use super::config::{partitions, KafkaConfig, KafkaError, BATCH_HEADER, KEY_HEADER};
use super::source::Along;
use crate::ledger::{Admission, Ledger};
use crate::{now_ms, Append, Appended, LogError, Pending};
use grabflow_api::topics::{partition_for, InputRecord, Topics};
use grabflow_api::{EventKind, Id, Time};
use rdkafka::consumer::BaseConsumer;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{
    BaseRecord, DefaultProducerContext, FutureProducer, FutureRecord, ThreadedProducer,
};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Producers (connections) of the ticks beside an event: a broker may
/// write their requests side by side. At 16 partitions, order → offer p50
/// was ~16 ms with one, ~13 with three, and no better with six.
const TICKERS: usize = 3;

/// How far ahead of the wall clock a round of ticks may go to be past the
/// round before it (ms).
const LEAD: Time = 2;

/// The time of a round of ticks for events that need one at `at`, the
/// last round having been at `last`, at wall clock `now`: past the last
/// round (which may have pushed the events' time to its own), unless that
/// is more than [`LEAD`] ahead of `now`.
fn round_time(at: Time, last: Time, now: Time) -> Time {
    match at.max(last + 1) {
        forward if forward <= now + LEAD => forward,
        _ => at.max(last),
    }
}

/// Ingress's producer: appends events to their input topics.
pub struct KafkaLog {
    producer: FutureProducer,
    topics: Topics,
    timeout: Duration,
    /// Keys and known ids: of its own appends and, through the
    /// [`Follower`](super::Follower), of every record in the input topics.
    ledger: Arc<Mutex<Ledger>>,
    /// Each input topic's partition count, to place records.
    counts: Vec<(String, i32)>,
    /// Every input partition, `(topic, partition)`, for rounds of ticks.
    parts: Vec<(String, i32)>,
    /// The producers of the ticks beside an event (every input partition
    /// but its own, dealt round-robin): without idempotence (a lost or
    /// doubled tick is harmless).
    ticker: Vec<ThreadedProducer<DefaultProducerContext>>,
    /// The time of the last round of ticks sent along.
    ticked: Mutex<Time>,
    /// Tells this process's dataflow sources of the rounds sent along.
    along: Along,
}

impl KafkaLog {
    /// A producer for `cfg`'s brokers; it tells `along` of each round of
    /// ticks it sends.
    pub fn new(
        cfg: &KafkaConfig,
        ledger: Arc<Mutex<Ledger>>,
        along: Along,
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
        let probe: BaseConsumer = cfg.client().create()?;
        let topics = cfg.topics();
        let mut counts = Vec::new();
        let mut parts = Vec::new();
        for topic in topics.inputs() {
            let count = partitions(&probe, topic)?;
            counts.push((topic.to_string(), count));
            parts.extend((0..count).map(|p| (topic.to_string(), p)));
        }
        let ticker = (0..TICKERS)
            .map(|_| {
                cfg.ticker()
                    // Sent at once: the order's event is on its way already.
                    .set("linger.ms", "0")
                    .create()
            })
            .collect::<Result<_, _>>()?;
        Ok(KafkaLog {
            producer,
            topics,
            timeout: cfg.ack_timeout,
            ledger,
            counts,
            parts,
            ticker,
            ticked: Mutex::new(0),
            along,
        })
    }

    /// The partition of a record keyed `key` in input topic `topic`.
    fn partition(&self, topic: &str, key: &str) -> i32 {
        let count = self
            .counts
            .iter()
            .find(|(t, _)| t == topic)
            .map_or(1, |c| c.1);
        partition_for(key.as_bytes(), count)
    }

    /// Sends a round of ticks at `at` (or later: rounds go forward) into
    /// every input partition: into `own` (the orders topic's partitions of
    /// the events just queued) behind the events, into the others beside
    /// them. The dataflow's clock passes the events as soon as it reads
    /// them. In a burst, when a round cannot go forward, only `own` gets
    /// one. Not waited for: a lost tick only costs the dataflow's own
    /// tick, later.
    fn tick_along(&self, at: Time, own: &[i32]) {
        let mut last = self.ticked.lock().expect("ticks");
        let round = round_time(at, *last, now_ms());
        let orders = &self.topics.orders;
        // A full queue (broker away) drops a tick, as lost ones are.
        for partition in own {
            let tick = FutureRecord::<[u8], [u8]>::to(orders)
                .partition(*partition)
                .timestamp(round as i64);
            let _ = self.producer.send_result(tick);
        }
        if round <= *last {
            return;
        }
        for (i, (topic, partition)) in self.parts.iter().enumerate() {
            if topic == orders && own.contains(partition) {
                continue;
            }
            let tick = BaseRecord::<[u8], [u8]>::to(topic)
                .partition(*partition)
                .timestamp(round as i64);
            let _ = self.ticker[i % TICKERS].send(tick);
        }
        *last = round;
        self.along.sent(round);
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
        // Just after the newest order event, if any, and the orders topic's
        // partitions of the events.
        let mut waits: Time = 0;
        let mut own = Vec::new();
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
            let (topic, entity) = (self.topics.input_for(kind), kind.entity());
            let partition = self.partition(topic, entity.as_str());
            let record = FutureRecord::to(topic)
                .key(entity.as_str())
                .partition(partition)
                .payload(&value)
                .timestamp(at as i64)
                .headers(headers);
            match self.producer.send_result(record) {
                Ok(delivery) => pending.push(delivery),
                Err((e, _)) => return Err(e.into()),
            }
            // An order's event: someone waits on what it decides (the
            // offer, a grab's answer, a rider's step).
            if topic == self.topics.orders {
                waits = waits.max(at + 1);
                if !own.contains(&partition) {
                    own.push(partition);
                }
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

#[cfg(test)]
mod tests {
    use super::round_time;

    #[test]
    fn a_round_goes_past_the_last_one_but_not_far_ahead_of_the_clock() {
        // The usual case: the events' millisecond + 1.
        assert_eq!(round_time(1_001, 990, 1_000), 1_001);
        // A second event of the same millisecond: past the first's round.
        assert_eq!(round_time(1_001, 1_001, 1_000), 1_002);
        // A burst: never more than LEAD (2 ms) ahead of the clock.
        assert_eq!(round_time(1_001, 1_002, 1_000), 1_002);
        assert_eq!(round_time(1_001, 1_005, 1_000), 1_005);
        // A clock gone back does not take rounds back.
        assert_eq!(round_time(901, 1_001, 900), 1_001);
    }
}
