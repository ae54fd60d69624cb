//! Keeps a process's ledger when other processes append too: reads the
//! input topics from the start, noting every id and idempotency key.

use super::config::{from_start, KafkaConfig, KafkaError, BATCH_HEADER, KEY_HEADER};
use crate::ledger::Ledger;
use grabflow_api::lifecycle::Thread;
use grabflow_api::topics::InputRecord;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::TopicPartitionList;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The follower's least fetch wait.
const FOLLOW_WAIT: Duration = Duration::from_millis(100);

/// Follows the input topics into a ledger, on its own thread, until stopped.
pub struct Follower {
    caught_up: Arc<AtomicBool>,
    thread: Thread,
}

impl Follower {
    /// Starts following; [`Follower::wait_caught_up`] tells when the input
    /// topics have been read to their ends as of now.
    pub fn start(cfg: &KafkaConfig, ledger: Arc<Mutex<Ledger>>) -> Result<Follower, KafkaError> {
        let mut conf = cfg.consumer(&format!("{}ingress", cfg.prefix)).config();
        // Not on an event's way to its decision (ingress looks again for an
        // id it does not know yet, see `LogHandle::following`): it fetches
        // at most every FOLLOW_WAIT, whatever the others' wait, which halves
        // what a broker reads for grabflow at a 1 ms wait.
        let wait = conf
            .get("fetch.wait.max.ms")
            .and_then(|w| w.parse::<u64>().ok())
            .unwrap_or(0)
            .max(FOLLOW_WAIT.as_millis() as u64);
        conf.set("fetch.wait.max.ms", wait.to_string());
        let consumer: BaseConsumer = conf.create()?;
        let mut tpl = TopicPartitionList::new();
        let mut ends = HashMap::new();
        for t in cfg.topics().inputs() {
            from_start(&consumer, t, &mut tpl, &mut ends)?;
        }
        consumer.assign(&tpl)?;
        let caught_up = Arc::new(AtomicBool::new(ends.is_empty()));
        let mut reading = Reading {
            ledger,
            ends,
            caught_up: Arc::clone(&caught_up),
        };
        let thread = Thread::spawn("grabflow-follower", move |stop| {
            while !stop.stopped() {
                if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
                    reading.read(&m);
                }
            }
        })
        .map_err(KafkaError::Thread)?;
        Ok(Follower { caught_up, thread })
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

    /// The following thread, to stop and join with the process's others.
    pub fn into_thread(self) -> Thread {
        self.thread
    }
}

/// What the follower's thread keeps: the ledger, and what it has still to
/// read to be caught up.
struct Reading {
    ledger: Arc<Mutex<Ledger>>,
    /// The high watermark of each partition not yet read to it.
    ends: HashMap<(String, i32), i64>,
    caught_up: Arc<AtomicBool>,
}

impl Reading {
    /// Notes one record in the ledger: a batch's records carry its size,
    /// and its key's answer is noted once all of them are read.
    fn read(&mut self, m: &BorrowedMessage<'_>) {
        let record: Option<InputRecord> = m.payload().and_then(|v| serde_json::from_slice(v).ok());
        if let Some(r) = &record {
            let key = header(m, KEY_HEADER);
            let batch = header(m, BATCH_HEADER).and_then(|b| b.parse().ok());
            let at = m.timestamp().to_millis().unwrap_or(0).max(0) as grabflow_api::Time;
            self.ledger.lock().expect("ledger").read_back(
                key.as_deref(),
                r.id.as_ref(),
                m.offset() as u64,
                &r.kind,
                Some(batch.unwrap_or(1)),
                at,
            );
        }
        let at = (m.topic().to_string(), m.partition());
        if self
            .ends
            .get(&at)
            .is_some_and(|&high| m.offset() + 1 >= high)
        {
            self.ends.remove(&at);
            if self.ends.is_empty() {
                self.caught_up.store(true, Ordering::Release);
            }
        }
    }
}

/// The value of header `name` of `m`, as text.
fn header(m: &BorrowedMessage<'_>, name: &str) -> Option<String> {
    m.headers().and_then(|h| {
        h.iter()
            .find(|x| x.key == name)
            .and_then(|x| x.value)
            .and_then(|v| std::str::from_utf8(v).ok())
            .map(str::to_string)
    })
}
