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
//! The ticks into the orders topic go through the event's own producer,
//! in the same produce request, behind the event: sent apart, a tick could
//! reach the event's partition first and push the event's time past it
//! (times are monotonic per partition). The event's ack waits for them.
//! The ticks into the other input topics cannot overtake an order's event
//! and go through a producer of their own without idempotence, at the same
//! moment: a broker writes them beside the event's request instead of
//! inside it (tansu 0.6 writes a request's partitions one after another,
//! and an idempotent batch costs it more), so at 16 partitions an order's
//! ack does not wait for 32 more writes. (They may overtake a rider's or
//! merchant's event not yet acked, whose time then becomes the tick's:
//! requests in flight together have no order to keep.)
//!
//! Rounds go forward: each is at least a millisecond after the one before.
//! Two events of one millisecond (two riders grabbing an order) would
//! otherwise both get a round at that millisecond + 1, and the first
//! round, queued ahead of the second event, pushes that event's time to
//! exactly its own: no round would pass it. A round runs at most 2 ms
//! (`LEAD`) ahead of the wall clock; past that, in a burst of more than a
//! round a millisecond, the dataflow's own tick passes such an event.

use super::config::{partitions, KafkaConfig, KafkaError, BATCH_HEADER, KEY_HEADER};
use super::source::Along;
use crate::ledger::{Admission, Ledger};
use crate::{now_ms, Append, Appended, LogError, Pending};
use grabflow_api::topics::{InputRecord, Topics};
use grabflow_api::{EventKind, Id, Time};
use rdkafka::consumer::BaseConsumer;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{
    BaseRecord, DefaultProducerContext, FutureProducer, FutureRecord, ThreadedProducer,
};
use std::sync::{Arc, Mutex};
use std::time::Duration;

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
    /// The orders topic's partitions, for the ticks that go with an event
    /// in its request.
    orders: Vec<i32>,
    /// The other input topics' partitions, `(topic, partition)`, for the
    /// ticks that go beside it, through `ticker`.
    others: Vec<(String, i32)>,
    /// The producer of the ticks into the other input topics: without
    /// idempotence (a lost or doubled tick is harmless).
    ticker: ThreadedProducer<DefaultProducerContext>,
    /// The last round of ticks sent along: its time and its number (rounds
    /// are queued whole, one at a time, so a round numbered after an
    /// append's events were queued is behind them in every partition of
    /// the orders topic, the one their events are in).
    ticked: Mutex<(Time, u64)>,
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
        let orders = (0..partitions(&probe, &topics.orders)?).collect();
        let mut others = Vec::new();
        for topic in topics.inputs() {
            if topic != topics.orders {
                for p in 0..partitions(&probe, topic)? {
                    others.push((topic.to_string(), p));
                }
            }
        }
        let ticker = cfg
            .ticker()
            // Sent at once: the order's event is on its way already.
            .set("linger.ms", "0")
            .create()?;
        Ok(KafkaLog {
            producer,
            topics,
            timeout: cfg.ack_timeout,
            ledger,
            orders,
            others,
            ticker,
            ticked: Mutex::new((0, 0)),
            along,
        })
    }

    /// The number of the last round of ticks, read once an append's events
    /// are queued: a later round is queued behind them.
    fn rounds(&self) -> u64 {
        self.ticked.lock().expect("ticks").1
    }

    /// Sends a tick at `at` (or later: rounds go forward) into every input
    /// partition (into the orders topic behind the events just queued,
    /// into the others beside them), unless a round at `at` or later was
    /// queued after them (a round numbered above `after`, from
    /// [`KafkaLog::rounds`]): the dataflow's clock passes them as soon as
    /// it reads them. Not waited for: a lost tick only costs the dataflow's
    /// own tick, later.
    fn tick_along(&self, at: Time, after: u64) {
        let mut last = self.ticked.lock().expect("ticks");
        if last.0 >= at && last.1 > after {
            return;
        }
        let at = round_time(at, last.0, now_ms());
        // A full queue (broker away) drops a tick, as lost ones are.
        for partition in &self.orders {
            let tick = FutureRecord::<[u8], [u8]>::to(&self.topics.orders)
                .partition(*partition)
                .timestamp(at as i64);
            let _ = self.producer.send_result(tick);
        }
        for (topic, partition) in &self.others {
            let tick = BaseRecord::<[u8], [u8]>::to(topic)
                .partition(*partition)
                .timestamp(at as i64);
            let _ = self.ticker.send(tick);
        }
        *last = (at, last.1 + 1);
        self.along.sent(at);
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
        // Just after the newest order event, if any.
        let mut waits: Time = 0;
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
            // An order's event: someone waits on what it decides (the
            // offer, a grab's answer, a rider's step).
            if self.topics.input_for(kind) == self.topics.orders {
                waits = waits.max(at + 1);
            }
        }
        if waits > 0 {
            let after = self.rounds();
            self.tick_along(waits, after);
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
