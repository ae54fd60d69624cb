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
//! partitions of the orders topic hold events in flight (queued, not yet
//! acked). A round's ticks into those go through the events' own
//! producer, behind them: from another producer, a tick could reach such
//! a partition first and push an event's time past its round (times are
//! monotonic per partition). The ticks into every other input partition
//! go, at the same moment, through three producers of their own without
//! idempotence (the partitions dealt among them), so a broker that serves
//! each connection's requests in turn (tansu 0.6; librdkafka sends a
//! produce request per partition) writes them side by side, and beside
//! the event, instead of queueing the event's request among 16 of ticks
//! at 16 partitions (its ack went from ~5 to ~2–3 ms) or 47 ticks on one
//! connection. A rider's or merchant's event in flight may still be
//! overtaken by a tick and take its time; nobody waits on those.
//!
//! An event is passed by any round sent after it was counted in flight:
//! each round is at least a millisecond after the one before, and at or
//! after every counted event's millisecond + 1, so ticks that overtook the
//! event before it was counted are of earlier rounds. Rounds of a burst
//! are shared: an append whose round has not gone yet sends one, unless
//! one went since it was counted. A round runs at most 2 ms (`LEAD`)
//! ahead of the wall clock; in a burst of more than a round a
//! millisecond, an append waits for the clock to allow its round (at most
//! 5 ms, beside its ack; then the dataflow's own tick passes it).

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

/// How long an append waits for the clock to allow a round it needs (the
/// dataflow's own tick comes `--kafka-tick`, 5 ms, after it reads the
/// event).
const ROUND_WAIT: Duration = Duration::from_millis(5);

/// The time of the next round of ticks, for events that need one at
/// `need` or later, the last round having been at `last`, at wall clock
/// `now`: past the last round (which may have pushed the events' time to
/// its own), or `None` while that is more than [`LEAD`] ahead of `now`
/// (the round waits for the clock).
fn round_time(need: Time, last: Time, now: Time) -> Option<Time> {
    Some(need.max(last + 1)).filter(|&t| t <= now + LEAD)
}

/// The rounds of ticks ingress sends along, and what they must pass.
#[derive(Default)]
struct Rounds {
    /// The last round's time.
    last: Time,
    /// How many rounds have been sent.
    sent: u64,
    /// The least time the next round must be at: past every event that
    /// waits for it.
    need: Time,
    /// Per partition of the orders topic, its events queued and not yet
    /// acked: a round's tick into such a partition goes through their
    /// producer, behind them, since one from a tick producer could
    /// overtake them and push their time past their own round.
    flying: Vec<u32>,
}

/// Ingress's producer: appends events to their input topics.
pub struct KafkaLog {
    producer: FutureProducer,
    topics: Topics,
    timeout: Duration,
    /// Keys and known ids: of its own appends and, through the
    /// [`Follower`](super::Follower), of every record in the input topics.
    ledger: Arc<Mutex<Ledger>>,
    /// The partition count of each input topic, as `Topics::inputs`.
    counts: [i32; 3],
    /// Every input partition, `(topic, partition)`, for rounds of ticks.
    parts: Vec<(String, i32)>,
    /// The producers of a round's ticks into the partitions without order
    /// events in flight (dealt round-robin): without idempotence (a lost
    /// or doubled tick is harmless).
    ticker: Vec<ThreadedProducer<DefaultProducerContext>>,
    /// The rounds of ticks sent along.
    rounds: Mutex<Rounds>,
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
        let mut counts = [0; 3];
        let mut parts = Vec::new();
        for (t, topic) in topics.inputs().into_iter().enumerate() {
            counts[t] = partitions(&probe, topic)?;
            parts.extend((0..counts[t]).map(|p| (topic.to_string(), p)));
        }
        let rounds = Rounds {
            flying: vec![0; counts[2] as usize],
            ..Rounds::default()
        };
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
            rounds: Mutex::new(rounds),
            along,
        })
    }

    /// The partition of a record keyed `key` in input topic `topic`.
    fn partition(&self, topic: &str, key: &str) -> i32 {
        let t = self.topics.inputs().iter().position(|i| *i == topic);
        let count = self.counts[t.expect("events go to input topics")];
        partition_for(key.as_bytes(), count)
    }

    /// Counts events queued into `own` (partitions of the orders topic)
    /// that wait for a round at `at` or later, until they are acked (the
    /// guard's drop); with the number of rounds sent so far: any round
    /// sent after this passes them.
    fn fly<'a>(&'a self, at: Time, own: &'a [i32]) -> (Flying<'a>, u64) {
        let mut r = self.rounds.lock().expect("rounds");
        r.need = r.need.max(at);
        for &p in own {
            r.flying[p as usize] += 1;
        }
        (Flying { log: self, own }, r.sent)
    }

    /// Makes sure a round of ticks is sent after round number `after`:
    /// sends one at once, unless one came since, or (in a burst of more
    /// than one a millisecond) waits for the clock to allow one, for up to
    /// [`ROUND_WAIT`] (a clock that went back leaves it to the dataflow's
    /// own tick). Not waited for: a lost tick only costs the dataflow's
    /// own tick, later.
    async fn tick_along(&self, after: u64) {
        let give_up = std::time::Instant::now() + ROUND_WAIT;
        while std::time::Instant::now() < give_up {
            let wait = {
                let mut r = self.rounds.lock().expect("rounds");
                if r.sent > after {
                    return;
                }
                let now = now_ms();
                match round_time(r.need, r.last, now) {
                    Some(at) => return self.round(&mut r, at),
                    None => (r.last + 1).saturating_sub(now + LEAD).clamp(1, LEAD),
                }
            };
            tokio::time::sleep(Duration::from_millis(wait)).await;
        }
    }

    /// Sends a round of ticks at `at` into every input partition: through
    /// the events' producer into the orders topic's partitions with events
    /// in flight (behind them), through the tick producers into the rest,
    /// at the same moment.
    fn round(&self, r: &mut Rounds, at: Time) {
        let orders = &self.topics.orders;
        // A full queue (broker away) drops a tick, as lost ones are.
        for (i, (topic, partition)) in self.parts.iter().enumerate() {
            if topic == orders && r.flying[*partition as usize] > 0 {
                let tick = FutureRecord::<[u8], [u8]>::to(orders)
                    .partition(*partition)
                    .timestamp(at as i64);
                let _ = self.producer.send_result(tick);
            } else {
                let tick = BaseRecord::<[u8], [u8]>::to(topic)
                    .partition(*partition)
                    .timestamp(at as i64);
                let _ = self.ticker[i % TICKERS].send(tick);
            }
        }
        r.last = at;
        r.sent += 1;
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
        // Until acked, the events' partitions get every round's tick
        // behind them; a round after this passes them.
        let flying = (waits > 0).then(|| self.fly(waits, &own));
        let ticks = async {
            if let Some((_, after)) = &flying {
                self.tick_along(*after).await;
            }
        };
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
        let (_, acked) = tokio::join!(ticks, wait);
        acked.map_err(|_| KafkaError::Timeout(self.timeout))??;
        Ok(last)
    }
}

/// Events of an append counted in flight in their orders partitions,
/// until dropped (acked, failed, or the append given up).
struct Flying<'a> {
    log: &'a KafkaLog,
    own: &'a [i32],
}

impl Drop for Flying<'_> {
    fn drop(&mut self) {
        let mut r = self.log.rounds.lock().expect("rounds");
        for &p in self.own {
            r.flying[p as usize] -= 1;
        }
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
        assert_eq!(round_time(1_001, 990, 1_000), Some(1_001));
        // A second event of the same millisecond: past the first's round.
        assert_eq!(round_time(1_001, 1_001, 1_000), Some(1_002));
        // A burst: never more than LEAD (2 ms) ahead of the clock; the
        // round waits for it.
        assert_eq!(round_time(1_001, 1_002, 1_000), None);
        assert_eq!(round_time(1_001, 1_002, 1_001), Some(1_003));
        // A clock gone back does not take rounds back.
        assert_eq!(round_time(901, 1_001, 900), None);
    }
}
