//! The embedded log: append-only, checksummed, group-committed.
//!
//! One file, `events.log`, in the data directory. Each record is
//! `[len: u32 LE][crc32 of payload: u32 LE][payload]`, the payload a
//! [`Record`]: `0x01` and the record in postcard (what is written), or a JSON
//! object (what versions before 0.6 wrote, still read). The binary form is
//! a third the size of the JSON one and about a third of the work to write,
//! which matters at hundreds of thousands of pings a second. A writer
//! thread owns the file: it takes every append waiting, gives each event its
//! log offset and time (`max(now, last time)`, so time never goes back),
//! writes them, calls `fsync` once for the batch, and only then answers the
//! callers and hands the events to the dataflow. Under load it waits 100 µs
//! for more appends before committing. Between appends it sends clock
//! ticks, so timers fire when nothing happens.
//!
//! On open, the file is scanned; a torn or corrupt tail (a crash mid-write)
//! is cut at the last whole record, never half-applied. The records read
//! back are replayed into the dataflow before new appends are taken.

use grabflow_api::{Event, EventKind, Feed, Id, Time};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::oneshot;

/// One stored record, as read back. Deserializing it reads the JSON form of
/// logs written before 0.6; records are written in the binary form only.
#[derive(Clone, Debug, Deserialize)]
pub struct Record {
    /// The client's `Idempotency-Key`, if it sent one.
    #[serde(default)]
    pub key: Option<String>,
    /// The event, with its offset and time.
    pub event: Event,
}

/// The answer to an append: what a retry with the same key gets again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Appended {
    /// One event appended: its id and offset.
    One {
        /// The event's id.
        event_id: Id,
        /// Its position in the log.
        offset: u64,
    },
    /// A batch: how many events it held.
    Batch {
        /// Events appended.
        accepted: usize,
    },
}

/// Errors of the log.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The file could not be read, written or synced.
    #[error("log i/o: {0}")]
    Io(#[from] std::io::Error),
    /// A record in the middle of the log is unreadable (not a torn tail).
    #[error("log record at byte {0} is corrupt")]
    Corrupt(u64),
    /// The broker did not take the event.
    #[error("{0}")]
    Unavailable(String),
    /// The writer has stopped (shutting down).
    #[error("the log is closed")]
    Closed,
}

enum Command {
    Append {
        key: Option<String>,
        events: Vec<(Id, EventKind)>,
        reply: oneshot::Sender<Result<Appended, String>>,
    },
}

/// A handle to the log (the embedded writer, or Kafka); cheap to clone.
#[derive(Clone)]
pub struct LogHandle {
    inner: Inner,
}

#[derive(Clone)]
enum Inner {
    Embedded(mpsc::Sender<Command>),
    Kafka(std::sync::Arc<crate::kafka::KafkaLog>),
}

impl LogHandle {
    /// A handle appending to Kafka.
    pub fn kafka(log: std::sync::Arc<crate::kafka::KafkaLog>) -> LogHandle {
        LogHandle {
            inner: Inner::Kafka(log),
        }
    }

    /// Appends `events` durably (one batch, one fsync) and answers once they
    /// are on disk. With an idempotency `key` already used, appends nothing
    /// and returns the first answer.
    pub async fn append(
        &self,
        key: Option<String>,
        events: Vec<(Id, EventKind)>,
    ) -> Result<Appended, LogError> {
        let tx = match &self.inner {
            Inner::Embedded(tx) => tx,
            Inner::Kafka(log) => {
                return log
                    .append(key, events)
                    .await
                    .map_err(|e| LogError::Unavailable(e.to_string()))
            }
        };
        let (reply, rx) = oneshot::channel();
        tx.send(Command::Append { key, events, reply })
            .map_err(|_| LogError::Closed)?;
        match rx.await {
            Ok(Ok(a)) => Ok(a),
            Ok(Err(e)) => Err(LogError::Io(std::io::Error::other(e))),
            Err(_) => Err(LogError::Closed),
        }
    }
}

/// What opening the log found.
pub struct Opened {
    /// The handle to append with.
    pub handle: LogHandle,
    /// Records already in the log (replayed into the feed before anything new).
    pub replayed: usize,
    /// Bytes cut from a torn tail.
    pub cut: u64,
    /// The latest event time in the log (0 when empty).
    pub last_time: Time,
    /// Orders and merchants the log already knows (for 404s on unknown ids).
    pub known_orders: HashSet<Id>,
    /// Merchants the log already knows.
    pub known_merchants: HashSet<Id>,
    /// The writer thread; it ends when every handle is dropped.
    pub writer: std::thread::JoinHandle<()>,
}

fn now_ms() -> Time {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as Time)
}

/// Reads every whole record of `path`, cutting a torn tail. Returns the
/// records and the number of bytes cut.
pub fn read_records(path: &Path) -> Result<(Vec<Record>, u64), LogError> {
    let mut file = match OpenOptions::new().read(true).write(true).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), 0)),
        Err(e) => return Err(e.into()),
    };
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    let mut records = Vec::new();
    let mut pos = 0usize;
    while pos < bytes.len() {
        let good = (|| {
            let head = bytes.get(pos..pos + 8)?;
            let len = u32::from_le_bytes(head[0..4].try_into().ok()?) as usize;
            let crc = u32::from_le_bytes(head[4..8].try_into().ok()?);
            let payload = bytes.get(pos + 8..pos + 8 + len)?;
            (crc32fast::hash(payload) == crc)
                .then(|| decode(payload))?
                .map(|r| (r, 8 + len))
        })();
        match good {
            Some((record, size)) => {
                records.push(record);
                pos += size;
            }
            None => {
                // Only a tail can be torn: anything after a bad record means corruption.
                let rest = bytes.len() - pos;
                if rest > 8 + 16 * 1024 * 1024 {
                    return Err(LogError::Corrupt(pos as u64));
                }
                file.set_len(pos as u64)?;
                file.sync_all()?;
                return Ok((records, rest as u64));
            }
        }
    }
    Ok((records, 0))
}

/// Under concurrent load (the last commit held more than one append), how
/// long the writer waits for more appends before it commits, as PostgreSQL's
/// `commit_delay`: fewer, fuller commits mean fewer fsyncs and fewer wake-ups
/// of every thread involved. An append on a quiet log is committed at once.
const COMMIT_DELAY: Duration = Duration::from_micros(100);

/// The first byte of a binary payload (a JSON one starts with `{`).
const BINARY: u8 = 1;

/// A [`Record`] in the binary form: every field, in order.
#[derive(Deserialize)]
struct BinaryRecord(Option<String>, Event);

/// A [`BinaryRecord`] by reference, for writing without copying the event.
#[derive(Serialize)]
struct BinaryRecordRef<'a>(Option<&'a str>, &'a Event);

/// The record in `payload`, either form; `None` if it is not a whole one.
fn decode(payload: &[u8]) -> Option<Record> {
    match payload.split_first()? {
        (&BINARY, rest) => match postcard::take_from_bytes::<BinaryRecord>(rest).ok()? {
            (BinaryRecord(key, event), []) => Some(Record { key, event }),
            _ => None,
        },
        (b'{', _) => serde_json::from_slice(payload).ok(),
        _ => None,
    }
}

/// Appends `record` to `out` in the log's framing, serialized in place.
fn encode(record: &BinaryRecordRef<'_>, out: &mut Vec<u8>) {
    let head = out.len();
    out.extend_from_slice(&[0; 8]);
    out.push(BINARY);
    *out = postcard::to_extend(record, std::mem::take(out)).expect("records serialize");
    let payload = &out[head + 8..];
    let (len, crc) = (payload.len() as u32, crc32fast::hash(payload));
    out[head..head + 4].copy_from_slice(&len.to_le_bytes());
    out[head + 4..head + 8].copy_from_slice(&crc.to_le_bytes());
}

/// Opens (or creates) the log in `dir`, replays what it holds into `feed`,
/// and starts the writer thread, which sends a clock tick every `tick`.
pub fn open(dir: &Path, feed: mpsc::Sender<Feed>, tick: Duration) -> Result<Opened, LogError> {
    std::fs::create_dir_all(dir)?;
    let path: PathBuf = dir.join("events.log");
    let (records, cut) = read_records(&path)?;
    let mut keys: HashMap<String, Appended> = HashMap::new();
    let mut last_time = 0;
    let mut next_offset = 0;
    for r in &records {
        if let Some(k) = &r.key {
            let answer = match keys.get(k) {
                Some(Appended::One { .. }) => Appended::Batch { accepted: 2 },
                Some(Appended::Batch { accepted }) => Appended::Batch {
                    accepted: accepted + 1,
                },
                None => Appended::One {
                    event_id: r.event.id.clone(),
                    offset: r.event.offset,
                },
            };
            keys.insert(k.clone(), answer);
        }
        last_time = last_time.max(r.event.time);
        next_offset = r.event.offset + 1;
    }
    let replayed = records.len();
    let mut known_orders = HashSet::new();
    let mut known_merchants = HashSet::new();
    for r in &records {
        match &r.event.kind {
            EventKind::OrderPlaced { order, .. } => {
                known_orders.insert(order.clone());
            }
            EventKind::MerchantUpserted { merchant, .. } => {
                known_merchants.insert(merchant.clone());
            }
            _ => {}
        }
    }
    let log_last_time = last_time;
    for chunk in records.chunks(4096) {
        let _ = feed.send(Feed::Events(
            chunk.iter().map(|r| r.event.clone()).collect(),
        ));
    }
    let mut file = OpenOptions::new().create(true).append(true).open(&path)?;
    file.seek(SeekFrom::End(0))?;
    let (tx, rx) = mpsc::channel::<Command>();
    let writer = std::thread::Builder::new()
        .name("grabflow-log".into())
        .spawn(move || {
            let mut writer = Writer {
                file,
                keys,
                last_time,
                last_event: last_time,
                next_offset,
                feed,
                told: 0,
                buf: Vec::new(),
            };
            let mut busy = false;
            loop {
                // Events of the last committed millisecond stay open until a
                // tick passes it: tick again as soon as the clock does.
                let wait = if writer.told <= writer.last_event {
                    tick.min(Duration::from_millis(1))
                } else {
                    tick
                };
                match rx.recv_timeout(wait) {
                    Ok(first) => {
                        let mut batch = vec![first];
                        batch.extend(rx.try_iter());
                        if busy {
                            std::thread::sleep(COMMIT_DELAY);
                            batch.extend(rx.try_iter());
                        }
                        busy = batch.len() > 1;
                        writer.commit(batch);
                    }
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
                writer.tick();
            }
        })?;
    Ok(Opened {
        handle: LogHandle {
            inner: Inner::Embedded(tx),
        },
        replayed,
        cut,
        last_time: log_last_time,
        known_orders,
        known_merchants,
        writer,
    })
}

struct Writer {
    file: File,
    keys: HashMap<String, Appended>,
    /// No event or tick from now on may be earlier than this.
    last_time: Time,
    /// The time of the newest committed event.
    last_event: Time,
    next_offset: u64,
    feed: mpsc::Sender<Feed>,
    /// The last tick sent: the dataflow's frontier.
    told: Time,
    buf: Vec<u8>,
}

impl Writer {
    /// Tells the dataflow no event will come before `max(now, last time)`,
    /// when that is news (each message wakes the dataflow).
    fn tick(&mut self) {
        self.last_time = self.last_time.max(now_ms());
        if self.last_time > self.told {
            self.told = self.last_time;
            let _ = self.feed.send(Feed::Tick(self.last_time));
        }
    }

    fn commit(&mut self, batch: Vec<Command>) {
        self.buf.clear();
        let mut events = Vec::with_capacity(
            batch
                .iter()
                .map(|Command::Append { events, .. }| events.len())
                .sum(),
        );
        let mut answers = Vec::new();
        let mut batch_keys: HashMap<String, Appended> = HashMap::new();
        for Command::Append {
            key,
            events: new,
            reply,
        } in batch
        {
            if let Some(answer) = key
                .as_ref()
                .and_then(|k| self.keys.get(k).or_else(|| batch_keys.get(k)))
            {
                answers.push((reply, Ok(answer.clone())));
                continue;
            }
            let time = self.last_time.max(now_ms());
            self.last_time = time;
            self.last_event = time;
            let count = new.len();
            let mut first = None;
            for (id, kind) in new {
                let event = Event {
                    id,
                    offset: self.next_offset,
                    time,
                    kind,
                };
                self.next_offset += 1;
                first.get_or_insert_with(|| (event.id.clone(), event.offset));
                encode(&BinaryRecordRef(key.as_deref(), &event), &mut self.buf);
                events.push(event);
            }
            let answer = match first {
                Some((event_id, offset)) if count == 1 => Appended::One { event_id, offset },
                _ => Appended::Batch { accepted: count },
            };
            if let Some(k) = key {
                batch_keys.insert(k, answer.clone());
            }
            answers.push((reply, Ok(answer)));
        }
        let durable = self
            .file
            .write_all(&self.buf)
            .and_then(|_| self.file.sync_data());
        match durable {
            Ok(()) => {
                self.keys.extend(batch_keys);
                if !events.is_empty() {
                    let _ = self.feed.send(Feed::Events(events));
                }
                for (reply, answer) in answers {
                    let _ = reply.send(answer);
                }
            }
            Err(e) => {
                // Nothing of this batch is acknowledged; a partial write is a
                // torn tail that the next open cuts.
                tracing::error!("log write failed: {e}");
                for (reply, _) in answers {
                    let _ = reply.send(Err(e.to_string()));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use grabflow_api::Coord;

    fn ping(n: usize) -> (Id, EventKind) {
        (
            Id::new(&format!("e{n}")).unwrap(),
            EventKind::LocationPinged {
                rider: Id::new("r1").unwrap(),
                at: Coord::from_degrees(31.0, 121.0).unwrap(),
            },
        )
    }

    fn events(rx: &mpsc::Receiver<Feed>) -> Vec<Event> {
        rx.try_iter()
            .flat_map(|f| match f {
                Feed::Events(e) => e,
                Feed::Tick(_) => vec![],
            })
            .collect()
    }

    #[tokio::test]
    async fn appends_survive_reopen_and_keys_are_honoured() {
        let dir = std::env::temp_dir().join(format!("grabflow-log-{}", rand::random::<u64>()));
        let (tx, rx) = mpsc::channel();
        let log = open(&dir, tx, Duration::from_millis(5)).unwrap();
        let a = log.handle.append(None, vec![ping(1)]).await.unwrap();
        assert_eq!(
            a,
            Appended::One {
                event_id: Id::new("e1").unwrap(),
                offset: 0
            }
        );
        let b = log
            .handle
            .append(Some("k".into()), vec![ping(2), ping(3)])
            .await
            .unwrap();
        assert_eq!(b, Appended::Batch { accepted: 2 });
        let again = log
            .handle
            .append(Some("k".into()), vec![ping(4)])
            .await
            .unwrap();
        assert_eq!(again, b, "a repeated key gets the first answer");
        let fed = events(&rx);
        assert_eq!(
            fed.iter().map(|e| e.offset).collect::<Vec<_>>(),
            vec![0, 1, 2]
        );
        assert!(fed.windows(2).all(|w| w[0].time <= w[1].time));
        drop(log.handle);
        log.writer.join().unwrap();

        let (tx, rx) = mpsc::channel();
        let log = open(&dir, tx, Duration::from_millis(5)).unwrap();
        assert_eq!(log.replayed, 3);
        assert_eq!(
            events(&rx),
            fed,
            "replay gives back exactly what was acknowledged"
        );
        let again = log
            .handle
            .append(Some("k".into()), vec![ping(5)])
            .await
            .unwrap();
        assert_eq!(again, b, "keys survive a restart");
        let c = log.handle.append(None, vec![ping(6)]).await.unwrap();
        assert_eq!(
            c,
            Appended::One {
                event_id: Id::new("e6").unwrap(),
                offset: 3
            }
        );
        drop(log.handle);
        log.writer.join().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn json_records_of_older_logs_are_read_beside_binary_ones() {
        let dir = std::env::temp_dir().join(format!("grabflow-log-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        // A record as versions before 0.6 wrote it.
        let json = br#"{"key":"k","event":{"id":"e0","offset":0,"time":5,"kind":{"type":"location_pinged","rider":"r1","at":{"lat_e7":310000000,"lon_e7":1210000000}}}}"#;
        let mut old = Vec::new();
        old.extend_from_slice(&(json.len() as u32).to_le_bytes());
        old.extend_from_slice(&crc32fast::hash(json).to_le_bytes());
        old.extend_from_slice(json);
        std::fs::write(dir.join("events.log"), &old).unwrap();

        let (tx, rx) = mpsc::channel();
        let log = open(&dir, tx, Duration::from_millis(5)).unwrap();
        assert_eq!(log.replayed, 1);
        let replayed = events(&rx);
        assert_eq!(replayed[0].kind, ping(0).1);
        let again = log
            .handle
            .append(Some("k".into()), vec![ping(9)])
            .await
            .unwrap();
        assert_eq!(
            again,
            Appended::One {
                event_id: Id::new("e0").unwrap(),
                offset: 0
            },
            "a key of a JSON record is honoured"
        );
        log.handle.append(None, vec![ping(1)]).await.unwrap();
        drop(log.handle);
        log.writer.join().unwrap();

        let bytes = std::fs::read(dir.join("events.log")).unwrap();
        assert_eq!(bytes[old.len() + 8], BINARY, "new records are binary");
        let (records, cut) = read_records(&dir.join("events.log")).unwrap();
        assert_eq!(cut, 0);
        let got: Vec<_> = records
            .iter()
            .map(|r| (r.key.clone(), r.event.id.to_string(), r.event.offset))
            .collect();
        assert_eq!(
            got,
            vec![(Some("k".into()), "e0".into(), 0), (None, "e1".into(), 1)]
        );
        assert_eq!(records[1].event.kind, ping(1).1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn a_torn_tail_is_cut_and_never_half_applied() {
        let dir = std::env::temp_dir().join(format!("grabflow-log-{}", rand::random::<u64>()));
        let (tx, _rx) = mpsc::channel();
        let log = open(&dir, tx, Duration::from_millis(5)).unwrap();
        for n in 0..5 {
            log.handle.append(None, vec![ping(n)]).await.unwrap();
        }
        drop(log.handle);
        log.writer.join().unwrap();
        let path = dir.join("events.log");
        let full = std::fs::metadata(&path).unwrap().len();
        // A crash in the middle of writing the last record.
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(full - 7).unwrap();
        let (records, cut) = read_records(&path).unwrap();
        assert_eq!(records.len(), 4);
        assert!(cut > 0);
        let (again, cut_again) = read_records(&path).unwrap();
        assert_eq!((again.len(), cut_again), (4, 0), "the cut is made on disk");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
