//! The embedded log: append-only, checksummed, group-committed.
//!
//! One file, `events.log`, in the data directory. Each record is
//! `[len: u32 LE][crc32 of payload: u32 LE][payload]`, and holds one append
//! (a single event or a whole batch): `0x02` and, in postcard, the key and
//! time its events share, the first event's offset, their ids and their
//! kinds (what is written since 0.7). A batch's ids are stored as the batch
//! id alone when they are its items (`{batch}.{i}`, see `Id::item`), so a
//! batched ping costs ~18 bytes. Older forms are still read: `0x01` and one
//! event in postcard (0.6), or a JSON object (before 0.6). An append is one
//! record, so a torn write loses a whole unacknowledged append, never part
//! of one. A writer thread owns the file: it takes every append waiting,
//! gives each event its log offset and time (`max(now, last time)`, so time
//! never goes back), writes them durably in one write (direct I/O, see
//! [`crate::direct`]; else a write and `fdatasync`), and only then answers
//! the callers and hands the events to the dataflow. Appends that arrive
//! during a write go in the next one. Between appends it sends clock ticks,
//! so timers fire when nothing happens.
//!
//! How soon the dataflow hears of a commit depends on what it holds (see
//! [`Ticks`]): any event but a location ping, as soon as the clock passes
//! its millisecond; pings alone, within [`Ticks::pings`]. Each tick costs
//! the dataflow a pass over every operator, while a ping changes nothing
//! anyone waits on until an order, a grab or a timer reads the index (and
//! those tick at once, taking the pings before them along).
//!
//! On open, the file is scanned; a torn or corrupt tail (a crash mid-write)
//! is cut at the last whole record, never half-applied. The records read
//! back are replayed into the dataflow before new appends are taken.

use crate::direct::DirectAppender;
use crate::keys::{FirstUse, KeyReused, Keys, Print};
use crate::routes::Known;
use crate::space::Space;
use grabflow_api::event::{BinaryKind, BinaryKindRef};
use grabflow_api::{Event, EventKind, Feed, Id, Time};
use serde::ser::{SerializeTupleStruct, Serializer};
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::oneshot;

/// One stored event, as read back. Deserializing it reads the JSON form of
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
    /// The idempotency key was first used for a different request.
    #[error(transparent)]
    KeyReused(#[from] KeyReused),
    /// An order with this id was placed already.
    #[error("order {0} exists")]
    OrderExists(Id),
}

enum Command {
    Append {
        key: Option<String>,
        events: Vec<(Id, EventKind)>,
        reply: oneshot::Sender<Result<Appended, LogError>>,
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
                return log.append(key, events).await.map_err(|e| match e {
                    crate::kafka::KafkaError::KeyReused(e) => LogError::KeyReused(e),
                    crate::kafka::KafkaError::OrderExists(o) => LogError::OrderExists(o),
                    e => LogError::Unavailable(e.to_string()),
                })
            }
        };
        let (reply, rx) = oneshot::channel();
        tx.send(Command::Append { key, events, reply })
            .map_err(|_| LogError::Closed)?;
        rx.await.unwrap_or(Err(LogError::Closed))
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
    /// Orders and merchants the log holds (for 404s on unknown ids), kept
    /// by ingress from now on; the writer claims each order placed here.
    pub known: Arc<Mutex<Known>>,
    /// The writer thread; it ends when every handle is dropped.
    pub writer: std::thread::JoinHandle<()>,
}

fn now_ms() -> Time {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as Time)
}

/// What [`read_records`] found in a log file.
#[derive(Debug)]
pub struct Scanned {
    /// Every whole record, in order.
    pub records: Vec<Record>,
    /// Where the records end: the next append goes here.
    pub end: u64,
    /// Bytes of a torn tail cut off.
    pub cut: u64,
}

/// The longest torn tail taken for one (a commit's write at most); garbage
/// further on means corruption, and the log refuses to open.
const MAX_TORN: usize = 64 << 20;

/// Reads every whole record of `path` up to its end (a zero header, or the
/// end of the file), cutting a torn tail (with the zero-filled room after
/// it: the writer adds fresh room).
pub fn read_records(path: &Path) -> Result<Scanned, LogError> {
    let mut file = match OpenOptions::new().read(true).write(true).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Scanned {
                records: Vec::new(),
                end: 0,
                cut: 0,
            })
        }
        Err(e) => return Err(e.into()),
    };
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    let mut records = Vec::new();
    let mut pos = 0usize;
    while pos < bytes.len() {
        if bytes[pos..].starts_with(&[0; 8]) && bytes[pos..].iter().all(|&b| b == 0) {
            // The zero-filled room after the last record.
            break;
        }
        let good = (|| {
            let head = bytes.get(pos..pos + 8)?;
            let len = u32::from_le_bytes(head[0..4].try_into().ok()?) as usize;
            let crc = u32::from_le_bytes(head[4..8].try_into().ok()?);
            let payload = bytes.get(pos + 8..pos + 8 + len)?;
            (len > 0 && crc32fast::hash(payload) == crc && decode(payload, &mut records))
                .then_some(8 + len)
        })();
        match good {
            Some(size) => pos += size,
            None => {
                // Only a tail can be torn: anything further on means corruption.
                let torn = bytes
                    .iter()
                    .rposition(|&b| b != 0)
                    .map_or(0, |last| last + 1 - pos);
                if torn > MAX_TORN {
                    return Err(LogError::Corrupt(pos as u64));
                }
                file.set_len(pos as u64)?;
                file.sync_all()?;
                return Ok(Scanned {
                    records,
                    end: pos as u64,
                    cut: torn as u64,
                });
            }
        }
    }
    Ok(Scanned {
        records,
        end: pos as u64,
        cut: 0,
    })
}

/// The first byte of a 0.6 payload: one event (a JSON one starts with `{`).
const BINARY: u8 = 1;

/// The first byte of an append's payload, as written since 0.7.
const APPEND: u8 = 2;

/// A 0.6 record: the key and the event.
#[derive(Deserialize)]
struct BinaryRecord(Option<String>, Event);

/// An append as stored: the key and time its events share, the first
/// event's offset, their ids and their kinds.
#[derive(Deserialize)]
struct AppendRecord(Option<String>, Time, u64, Ids, Vec<BinaryKind>);

/// The ids of an append's events: each one, or the batch they are items of.
#[derive(Deserialize)]
enum Ids {
    Each(Vec<Id>),
    Items(Id),
}

/// An [`AppendRecord`] by reference: `events` (one append's, so sharing a
/// time and consecutive offsets) and their key, written without copies.
struct AppendRecordRef<'a> {
    key: Option<&'a str>,
    events: &'a [Event],
}

impl Serialize for AppendRecordRef<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let (time, offset) = self.events.first().map_or((0, 0), |e| (e.time, e.offset));
        let mut t = s.serialize_tuple_struct("AppendRecord", 5)?;
        t.serialize_field(&self.key)?;
        t.serialize_field(&time)?;
        t.serialize_field(&offset)?;
        t.serialize_field(&IdsRef(self.events))?;
        t.serialize_field(&KindsRef(self.events))?;
        t.end()
    }
}

/// The ids of `events`, as [`Ids`]: the batch alone when they are its items.
struct IdsRef<'a>(&'a [Event]);

impl Serialize for IdsRef<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let batch = match self.0 {
            [first, _, ..] => first.id.batch_of(0).filter(|&b| {
                self.0
                    .iter()
                    .enumerate()
                    .all(|(i, e)| e.id.batch_of(i) == Some(b))
            }),
            _ => None,
        };
        match batch {
            Some(batch) => s.serialize_newtype_variant("Ids", 1, "Items", batch),
            None => s.serialize_newtype_variant("Ids", 0, "Each", &EachRef(self.0)),
        }
    }
}

/// The ids of `events`, one by one.
struct EachRef<'a>(&'a [Event]);

impl Serialize for EachRef<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter().map(|e| &e.id))
    }
}

/// The kinds of `events`, in the binary form.
struct KindsRef<'a>(&'a [Event]);

impl Serialize for KindsRef<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter().map(|e| BinaryKindRef(&e.kind)))
    }
}

/// Appends the events of the record in `payload` (any form) to `out`;
/// `false` (and nothing appended) if it is not a whole one.
fn decode(payload: &[u8], out: &mut Vec<Record>) -> bool {
    let Some((&first, rest)) = payload.split_first() else {
        return false;
    };
    let records = match first {
        APPEND => decode_append(rest),
        BINARY => match postcard::take_from_bytes::<BinaryRecord>(rest) {
            Ok((BinaryRecord(key, event), [])) => Some(vec![Record { key, event }]),
            _ => None,
        },
        b'{' => serde_json::from_slice(payload).ok().map(|r| vec![r]),
        _ => None,
    };
    records.map(|r| out.extend(r)).is_some()
}

/// The events of an [`AppendRecord`].
fn decode_append(bytes: &[u8]) -> Option<Vec<Record>> {
    let (AppendRecord(key, time, first, ids, kinds), []) = postcard::take_from_bytes(bytes).ok()?
    else {
        return None;
    };
    let ids = match ids {
        Ids::Each(ids) => ids,
        Ids::Items(batch) => (0..kinds.len())
            .map(|i| batch.item(i))
            .collect::<Option<_>>()?,
    };
    if ids.len() != kinds.len() || kinds.is_empty() {
        return None;
    }
    let events = ids.into_iter().zip(kinds).zip(first..);
    Some(
        events
            .map(|((id, BinaryKind(kind)), offset)| Record {
                key: key.clone(),
                event: Event {
                    id,
                    offset,
                    time,
                    kind,
                },
            })
            .collect(),
    )
}

/// Appends `record` to `out` in the log's framing, serialized in place.
fn encode(record: &AppendRecordRef<'_>, out: &mut Vec<u8>) {
    let head = out.len();
    out.extend_from_slice(&[0; 8]);
    out.push(APPEND);
    *out = postcard::to_extend(record, std::mem::take(out)).expect("records serialize");
    let header = frame_header(&out[head + 8..]);
    out[head..head + 8].copy_from_slice(&header);
}

/// The framing before `payload`: its length and its crc32, little-endian.
fn frame_header(payload: &[u8]) -> [u8; 8] {
    let mut header = [0; 8];
    header[..4].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    header[4..].copy_from_slice(&crc32fast::hash(payload).to_le_bytes());
    header
}

/// How often the writer tells the dataflow that time has passed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ticks {
    /// With nothing committed since the last tick (timers fire on these).
    pub idle: Duration,
    /// With only location pings committed since the last tick: they reach
    /// the dataflow within this long. Any other event ticks as soon as the
    /// clock passes its millisecond.
    pub pings: Duration,
}

/// Opens (or creates) the log in `dir`, replays what it holds into `feed`,
/// and starts the writer thread, which sends clock ticks as `ticks` says.
/// Commits are direct writes where the file system allows it (see
/// [`crate::direct`]), else buffered writes and `fdatasync`.
pub fn open(dir: &Path, feed: mpsc::Sender<Feed>, ticks: Ticks) -> Result<Opened, LogError> {
    open_with(dir, feed, ticks, true)
}

/// [`open`], with direct I/O only if `direct` (tests take both paths).
fn open_with(
    dir: &Path,
    feed: mpsc::Sender<Feed>,
    ticks: Ticks,
    direct: bool,
) -> Result<Opened, LogError> {
    std::fs::create_dir_all(dir)?;
    let path: PathBuf = dir.join("events.log");
    let Scanned { records, end, cut } = read_records(&path)?;
    let mut keys = Keys::new();
    let mut last_time = 0;
    let mut next_offset = 0;
    for r in &records {
        if let Some(k) = &r.key {
            // A batch's events carry its key each: the answer counts them.
            let (answer, mut request) = match keys.remove(k) {
                Some(FirstUse {
                    answer: Appended::One { .. },
                    request,
                }) => (Appended::Batch { accepted: 2 }, request),
                Some(FirstUse {
                    answer: Appended::Batch { accepted },
                    request,
                }) => (
                    Appended::Batch {
                        accepted: accepted + 1,
                    },
                    request,
                ),
                None => (
                    Appended::One {
                        event_id: r.event.id.clone(),
                        offset: r.event.offset,
                    },
                    Print::default(),
                ),
            };
            request.add(&r.event.kind);
            keys.insert(k.clone(), FirstUse { answer, request });
        }
        last_time = last_time.max(r.event.time);
        next_offset = r.event.offset + 1;
    }
    let replayed = records.len();
    let mut known = Known::default();
    for r in &records {
        match &r.event.kind {
            EventKind::OrderPlaced { order, .. } => {
                known.orders.insert(order.clone());
            }
            EventKind::MerchantUpserted { merchant, .. } => {
                known.merchants.insert(merchant.clone());
            }
            _ => {}
        }
    }
    let known = Arc::new(Mutex::new(known));
    let log_last_time = last_time;
    for chunk in records.chunks(4096) {
        let _ = feed.send(Feed::Events(
            chunk.iter().map(|r| r.event.clone()).collect(),
        ));
    }
    // Never truncated: the records are kept, and writes go where they end.
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)?;
    let space = Space::new(&file, file.metadata()?.len())?;
    let direct = if direct {
        DirectAppender::open(&path, end)?
    } else {
        None
    };
    if direct.is_none() {
        tracing::info!("log: no direct I/O on this file system; commits write and fdatasync");
    }
    let (tx, rx) = mpsc::channel::<Command>();
    let writer_known = Arc::clone(&known);
    let writer = std::thread::Builder::new()
        .name("grabflow-log".into())
        .spawn(move || {
            let mut writer = Writer {
                file,
                end,
                space,
                direct,
                keys,
                known: writer_known,
                last_time,
                last_event: last_time,
                last_urgent: last_time,
                next_offset,
                feed,
                told: 0,
                told_at: Instant::now(),
                ticks,
                unsent: Vec::new(),
                buf: Vec::new(),
            };
            loop {
                match rx.recv_timeout(writer.next_tick()) {
                    // Group commit: every append that came while the last
                    // commit was being written goes in this one. No delay
                    // to gather more: waiting leaves the HTTP workers idle
                    // (a 100 µs delay left the CPU idle 10-17% of the time
                    // under the bench's single pings, against 8-11%).
                    Ok(first) => {
                        let mut batch = vec![first];
                        batch.extend(rx.try_iter());
                        writer.commit(batch);
                    }
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
                writer.tick();
            }
            writer.hand_over();
        })?;
    Ok(Opened {
        handle: LogHandle {
            inner: Inner::Embedded(tx),
        },
        replayed,
        cut,
        last_time: log_last_time,
        known,
        writer,
    })
}

struct Writer {
    file: File,
    /// Where the records end: the next write goes here.
    end: u64,
    /// The zero-filled room ahead.
    space: Space,
    /// Commits by direct I/O, where the file system has it.
    direct: Option<DirectAppender>,
    keys: Keys,
    /// Ids the log holds: an order is placed once, whatever key its request
    /// carries ([`Known::claim_orders`]).
    known: Arc<Mutex<Known>>,
    /// No event or tick from now on may be earlier than this.
    last_time: Time,
    /// The time of the newest committed event.
    last_event: Time,
    /// The time of the newest committed event other than a location ping.
    last_urgent: Time,
    next_offset: u64,
    feed: mpsc::Sender<Feed>,
    /// The last tick sent: the dataflow's frontier.
    told: Time,
    /// When it was sent.
    told_at: Instant,
    ticks: Ticks,
    /// Committed events not yet handed to the dataflow: they go with the
    /// next tick (see [`Writer::tick`]).
    unsent: Vec<Event>,
    buf: Vec<u8>,
}

impl Writer {
    /// Whether an event other than a ping waits for the tick that lets the
    /// dataflow finish its millisecond.
    fn urgent_waiting(&self) -> bool {
        self.told <= self.last_urgent
    }

    /// How long to wait for an append before ticking: until the clock
    /// passes a committed event's millisecond (which only a tick lets the
    /// dataflow finish) if any but a ping is waiting for it; until the ping
    /// cadence is up if only pings are; else the idle tick.
    fn next_tick(&self) -> Duration {
        // Until the clock's next millisecond (a full one waited from the
        // commit would add half a millisecond on average to every offer).
        let into_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos() % 1_000_000);
        let clock = self
            .ticks
            .idle
            .min(Duration::from_nanos(u64::from(1_000_000 - into_ms)));
        if self.urgent_waiting() {
            clock
        } else if self.told <= self.last_event {
            // Never less than that: a cadence already up waits only for the
            // clock to pass the pings' millisecond.
            self.ticks
                .pings
                .saturating_sub(self.told_at.elapsed())
                .max(clock)
        } else {
            self.ticks.idle
        }
    }

    /// Tells the dataflow no event will come before `max(now, last time)`,
    /// when that is news and due (see [`Writer::next_tick`]), in one message
    /// with the events committed since the last tick. Each message wakes the
    /// dataflow, and its operators finish a millisecond only once a tick has
    /// passed it: events sent on their own, between ticks, would wake it for
    /// nothing to finish.
    fn tick(&mut self) {
        self.last_time = self.last_time.max(now_ms());
        let only_pings = !self.urgent_waiting() && !self.unsent.is_empty();
        if only_pings && self.told_at.elapsed() < self.ticks.pings {
            return;
        }
        if self.last_time > self.told {
            self.told = self.last_time;
            self.told_at = Instant::now();
            let tick = self.told;
            let _ = self.feed.send(match std::mem::take(&mut self.unsent) {
                events if events.is_empty() => Feed::Tick(tick),
                events => Feed::EventsThenTick(events, tick),
            });
        }
    }

    /// Sends the committed events not yet handed to the dataflow.
    fn hand_over(&mut self) {
        if !self.unsent.is_empty() {
            let _ = self
                .feed
                .send(Feed::Events(std::mem::take(&mut self.unsent)));
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
        let mut batch_keys = Keys::new();
        let mut claimed = Vec::new();
        for Command::Append {
            key,
            events: new,
            reply,
        } in batch
        {
            let request = key.as_ref().map(|_| Print::of(new.iter().map(|(_, k)| k)));
            if let Some(first) = key
                .as_ref()
                .and_then(|k| self.keys.get(k).or_else(|| batch_keys.get(k)))
            {
                let repeat = first.repeat(request.unwrap_or_default());
                answers.push((reply, repeat.map_err(LogError::from)));
                continue;
            }
            if new
                .iter()
                .any(|(_, kind)| matches!(kind, EventKind::OrderPlaced { .. }))
            {
                match self.known.lock().expect("known").claim_orders(&new) {
                    Ok(orders) => claimed.extend(orders),
                    Err(order) => {
                        answers.push((reply, Err(LogError::OrderExists(order))));
                        continue;
                    }
                }
            }
            let time = self.last_time.max(now_ms());
            self.last_time = time;
            self.last_event = time;
            let start = events.len();
            for (id, kind) in new {
                if !matches!(kind, EventKind::LocationPinged { .. }) {
                    self.last_urgent = time;
                }
                events.push(Event {
                    id,
                    offset: self.next_offset,
                    time,
                    kind,
                });
                self.next_offset += 1;
            }
            let appended = &events[start..];
            if appended.is_empty() {
                answers.push((reply, Ok(Appended::Batch { accepted: 0 })));
                continue;
            }
            encode(
                &AppendRecordRef {
                    key: key.as_deref(),
                    events: appended,
                },
                &mut self.buf,
            );
            let answer = match appended {
                [one] => Appended::One {
                    event_id: one.id.clone(),
                    offset: one.offset,
                },
                _ => Appended::Batch {
                    accepted: appended.len(),
                },
            };
            if let (Some(k), Some(request)) = (key, request) {
                let first = FirstUse {
                    answer: answer.clone(),
                    request,
                };
                batch_keys.insert(k, first);
            }
            answers.push((reply, Ok(answer)));
        }
        // Within the room, the size is synced already; past it, the sync
        // takes the new size along (O_DSYNC and fdatasync both write what
        // reading needs).
        let durable = match &mut self.direct {
            Some(direct) => {
                let (start, len) = direct.extent(self.end, self.buf.len());
                self.space.reserve(start, len);
                direct.append(self.end, &self.buf)
            }
            None => {
                self.space.reserve(self.end, self.buf.len() as u64);
                self.file
                    .write_all_at(&self.buf, self.end)
                    .and_then(|_| self.file.sync_data())
            }
        };
        match durable {
            Ok(()) => {
                self.end += self.buf.len() as u64;
                self.space.wrote(self.end);
                self.keys.extend(batch_keys);
                if self.unsent.is_empty() {
                    self.unsent = events;
                } else {
                    self.unsent.append(&mut events);
                }
                for (reply, answer) in answers {
                    let _ = reply.send(answer);
                }
            }
            Err(e) => {
                // Nothing of this batch is acknowledged; a partial write is a
                // torn tail that the next open cuts.
                tracing::error!("log write failed: {e}");
                self.known.lock().expect("known").release(&claimed);
                for (reply, _) in answers {
                    let e = std::io::Error::new(e.kind(), e.to_string());
                    let _ = reply.send(Err(LogError::Io(e)));
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
                Feed::Events(e) | Feed::EventsThenTick(e, _) => e,
                Feed::Tick(_) => vec![],
            })
            .collect()
    }

    #[tokio::test]
    async fn appends_survive_reopen_and_keys_are_honoured() {
        let dir = scratch();
        let (log, rx) = open_in(&dir);
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
        // A retry: the same contents (the server gives them new ids).
        let again = log
            .handle
            .append(Some("k".into()), vec![ping(6), ping(7)])
            .await
            .unwrap();
        assert_eq!(again, b, "a repeated key gets the first answer");
        let other = log.handle.append(Some("k".into()), vec![ping(4)]).await;
        assert!(
            matches!(other, Err(LogError::KeyReused(_))),
            "the key on another request is refused: {other:?}"
        );
        // The writer hands its last events over as it closes.
        drop(log.handle);
        log.writer.join().unwrap();
        let fed = events(&rx);
        assert_eq!(
            fed.iter().map(|e| e.offset).collect::<Vec<_>>(),
            vec![0, 1, 2]
        );
        assert!(fed.windows(2).all(|w| w[0].time <= w[1].time));

        let (log, rx) = open_in(&dir);
        assert_eq!(log.replayed, 3);
        assert_eq!(
            events(&rx),
            fed,
            "replay gives back exactly what was acknowledged"
        );
        let again = log
            .handle
            .append(Some("k".into()), vec![ping(8), ping(9)])
            .await
            .unwrap();
        assert_eq!(again, b, "keys survive a restart");
        let other = log.handle.append(Some("k".into()), vec![ping(5)]).await;
        assert!(
            matches!(other, Err(LogError::KeyReused(_))),
            "and so does what they were used for: {other:?}"
        );
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

    /// Committed events reach the dataflow no later than the tick that
    /// passes their time (the tick that lets it finish them), while the log
    /// stays open.
    #[tokio::test]
    async fn events_are_handed_over_before_the_tick_that_passes_them() {
        let dir = scratch();
        let (log, rx) = open_in(&dir);
        for n in 0..20 {
            log.handle.append(None, vec![ping(n)]).await.unwrap();
        }
        let committed = now_ms();
        let mut fed = Vec::new();
        loop {
            match rx.recv_timeout(Duration::from_secs(10)).expect("a tick") {
                Feed::Events(e) => fed.extend(e),
                Feed::EventsThenTick(e, t) => {
                    fed.extend(e);
                    if t > committed {
                        break;
                    }
                }
                Feed::Tick(t) if t > committed => break,
                Feed::Tick(_) => {}
            }
        }
        assert_eq!(
            fed.iter().map(|e| e.offset).collect::<Vec<_>>(),
            (0..20).collect::<Vec<_>>(),
            "every event before the tick that passes it"
        );
        drop(log.handle);
        log.writer.join().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Pings alone wait for the ping cadence; any other event ticks as soon
    /// as its millisecond is over and takes the pings before it along.
    #[tokio::test]
    async fn pings_wait_for_their_cadence_and_other_events_tick_at_once() {
        let dir = scratch();
        let (tx, rx) = mpsc::channel();
        let slow = Duration::from_secs(30);
        let log = open(
            &dir,
            tx,
            Ticks {
                idle: slow,
                pings: slow,
            },
        )
        .unwrap();
        // The first tick (nothing to replay) comes at once.
        assert!(matches!(
            rx.recv_timeout(Duration::from_secs(10)),
            Ok(Feed::Tick(_))
        ));
        for n in 0..5 {
            log.handle.append(None, vec![ping(n)]).await.unwrap();
        }
        assert!(
            rx.recv_timeout(Duration::from_millis(300)).is_err(),
            "acknowledged pings alone wait for the ping cadence"
        );
        let shift = (
            Id::new("s1").unwrap(),
            EventKind::ShiftChanged {
                rider: Id::new("r1").unwrap(),
                online: true,
                capacity: None,
            },
        );
        let Appended::One { offset, .. } = log.handle.append(None, vec![shift]).await.unwrap()
        else {
            panic!("one event")
        };
        // Everything up to the shift change, then a tick past its time
        // (one may come at its time first, with the events).
        let started = Instant::now();
        let mut fed: Vec<Event> = Vec::new();
        loop {
            let tick = match rx.recv_timeout(Duration::from_secs(10)).expect("a tick") {
                Feed::Events(e) => {
                    fed.extend(e);
                    continue;
                }
                Feed::EventsThenTick(e, t) => {
                    fed.extend(e);
                    t
                }
                Feed::Tick(t) => t,
            };
            if fed
                .last()
                .is_some_and(|e| e.offset == offset && tick > e.time)
            {
                break;
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "a shift change does not wait for the ping cadence"
        );
        assert_eq!(
            fed.iter().map(|e| e.offset).collect::<Vec<_>>(),
            (0..=offset).collect::<Vec<_>>(),
            "the pings before it come along"
        );
        drop(log.handle);
        log.writer.join().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The same cadence with pings as without.
    fn every(tick: Duration) -> Ticks {
        Ticks {
            idle: tick,
            pings: tick,
        }
    }

    /// The log in `dir` (5 ms ticks) and the feed it replays and appends into.
    fn place(n: usize, order: &str) -> (Id, EventKind) {
        (
            Id::new(&format!("p{n}")).unwrap(),
            EventKind::OrderPlaced {
                order: Id::new(order).unwrap(),
                merchant: Id::new("m1").unwrap(),
                dropoff: Coord::from_degrees(31.0, 121.0).unwrap(),
                promised_minutes: 30,
            },
        )
    }

    #[tokio::test]
    async fn an_order_is_placed_once_whatever_its_key() {
        let dir = scratch();
        let (log, _rx) = open_in(&dir);
        let first = log
            .handle
            .append(Some("a".into()), vec![place(1, "o1")])
            .await
            .unwrap();
        let exists = |r: Result<Appended, LogError>| matches!(r, Err(LogError::OrderExists(o)) if o.as_str() == "o1");
        // Another key, no key, or two placements racing into one commit.
        let (b, c) = tokio::join!(
            log.handle.append(Some("b".into()), vec![place(2, "o1")]),
            log.handle.append(None, vec![place(3, "o1")]),
        );
        assert!(exists(b) && exists(c));
        let (d, e) = tokio::join!(
            log.handle.append(None, vec![place(4, "o2")]),
            log.handle.append(Some("e".into()), vec![place(5, "o2")]),
        );
        assert!(
            d.is_ok() != e.is_ok(),
            "one of two racing placements: {d:?} {e:?}"
        );
        // The first key's repeat still gets its answer.
        let again = log
            .handle
            .append(Some("a".into()), vec![place(6, "o1")])
            .await;
        assert_eq!(again.unwrap(), first);
        drop(log.handle);
        log.writer.join().unwrap();
        let (log, _rx) = open_in(&dir);
        assert_eq!(log.replayed, 2, "o1 and o2, once each");
        assert!(exists(
            log.handle
                .append(Some("f".into()), vec![place(7, "o1")])
                .await
        ));
        drop(log.handle);
        log.writer.join().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn open_in(dir: &Path) -> (Opened, mpsc::Receiver<Feed>) {
        let (tx, rx) = mpsc::channel();
        (open(dir, tx, every(Duration::from_millis(5))).unwrap(), rx)
    }

    /// Where the file system has direct I/O, commits use it; one log may
    /// be written both ways in turn (a data dir moved between file
    /// systems) and reads back whole.
    #[tokio::test]
    async fn direct_and_buffered_commits_read_back_alike() {
        let dir = scratch();
        let path = dir.join("events.log");
        let mut acked = Vec::new();
        for (round, direct) in [false, true, false, true].into_iter().enumerate() {
            let (tx, rx) = mpsc::channel();
            let log = open_with(&dir, tx, every(Duration::from_millis(5)), direct).unwrap();
            assert_eq!((log.replayed, log.cut), (acked.len(), 0));
            assert_eq!(events(&rx).len(), acked.len(), "replayed");
            for n in 0..3 {
                let id = round * 10 + n;
                let events = if n == 1 {
                    vec![ping(id), ping(id + 100)]
                } else {
                    vec![ping(id)]
                };
                acked.extend(events.iter().map(|(id, _)| id.clone()));
                log.handle.append(None, events).await.unwrap();
            }
            drop(log.handle);
            log.writer.join().unwrap();
            let back = read_records(&path).unwrap();
            assert_eq!(back.cut, 0);
            let ids: Vec<Id> = back.records.iter().map(|r| r.event.id.clone()).collect();
            assert_eq!(
                ids, acked,
                "round {round}: every acknowledged event, in order"
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A fresh directory for one test's log.
    fn scratch() -> PathBuf {
        std::env::temp_dir().join(format!("grabflow-log-{}", rand::random::<u64>()))
    }

    /// `payload` framed as the log frames it.
    fn framed(payload: &[u8]) -> Vec<u8> {
        [&frame_header(payload)[..], payload].concat()
    }

    #[tokio::test]
    async fn records_of_older_logs_are_read_beside_new_ones() {
        let dir = scratch();
        std::fs::create_dir_all(&dir).unwrap();
        // A record as versions before 0.6 wrote it (JSON)...
        let json = br#"{"key":"k","event":{"id":"e0","offset":0,"time":5,"kind":{"type":"location_pinged","rider":"r1","at":{"lat_e7":310000000,"lon_e7":1210000000}}}}"#;
        let mut old = framed(json);
        // ...and one as 0.6 wrote it (one event in postcard).
        let (id, kind) = ping(1);
        let event = Event {
            id,
            offset: 1,
            time: 6,
            kind,
        };
        let mut binary = vec![BINARY];
        binary.extend(postcard::to_allocvec(&(None::<&str>, &event)).unwrap());
        old.extend(framed(&binary));
        std::fs::write(dir.join("events.log"), &old).unwrap();

        let (log, rx) = open_in(&dir);
        assert_eq!(log.replayed, 2);
        let replayed = events(&rx);
        assert_eq!(replayed[0].kind, ping(0).1);
        assert_eq!(replayed[1], event);
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
        log.handle.append(None, vec![ping(2)]).await.unwrap();
        drop(log.handle);
        log.writer.join().unwrap();

        let bytes = std::fs::read(dir.join("events.log")).unwrap();
        assert_eq!(bytes[old.len() + 8], APPEND, "new records are appends");
        let Scanned { records, cut, .. } = read_records(&dir.join("events.log")).unwrap();
        assert_eq!(cut, 0);
        let got: Vec<_> = records
            .iter()
            .map(|r| (r.key.clone(), r.event.id.to_string(), r.event.offset))
            .collect();
        assert_eq!(
            got,
            vec![
                (Some("k".into()), "e0".into(), 0),
                (None, "e1".into(), 1),
                (None, "e2".into(), 2)
            ]
        );
        assert_eq!(records[2].event.kind, ping(2).1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn a_batch_is_one_record_with_its_ids_stored_once() {
        let dir = scratch();
        let (log, rx) = open_in(&dir);
        let batch = Id::new_batch();
        let items: Vec<_> = (0..500)
            .map(|i| (batch.item(i).unwrap(), ping(i).1))
            .collect();
        // Ids that are not one batch's items in order are stored one by one.
        let mixed = vec![ping(7), (batch.item(1).unwrap(), ping(8).1)];
        let a = log
            .handle
            .append(Some("b".into()), items.clone())
            .await
            .unwrap();
        assert_eq!(a, Appended::Batch { accepted: 500 });
        log.handle.append(None, mixed.clone()).await.unwrap();
        drop(log.handle);
        log.writer.join().unwrap();
        let fed = events(&rx);

        let size = read_records(&dir.join("events.log")).unwrap().end;
        assert!(size < 500 * 20, "{size} bytes for 502 pings");
        let Scanned { records, cut, .. } = read_records(&dir.join("events.log")).unwrap();
        assert_eq!(cut, 0);
        let back: Vec<Event> = records.iter().map(|r| r.event.clone()).collect();
        assert_eq!(back, fed, "read back as they were fed");
        let expected: Vec<_> = items.into_iter().chain(mixed).collect();
        let got: Vec<_> = back.into_iter().map(|e| (e.id, e.kind)).collect();
        assert_eq!(got, expected);
        assert!(records[..500].iter().all(|r| r.key.as_deref() == Some("b")));
        assert!(records[500..].iter().all(|r| r.key.is_none()));

        // A torn batch is cut whole: none of its events is applied.
        let path = dir.join("events.log");
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(size - 3).unwrap();
        let Scanned { records, cut, .. } = read_records(&path).unwrap();
        assert_eq!(records.len(), 500);
        assert!(cut > 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn a_torn_tail_is_cut_and_never_half_applied() {
        let dir = scratch();
        let (log, _rx) = open_in(&dir);
        for n in 0..5 {
            log.handle.append(None, vec![ping(n)]).await.unwrap();
        }
        drop(log.handle);
        log.writer.join().unwrap();
        let path = dir.join("events.log");
        let full = read_records(&path).unwrap().end;
        // A crash in the middle of writing the last record.
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(full - 7).unwrap();
        let Scanned { records, cut, .. } = read_records(&path).unwrap();
        assert_eq!(records.len(), 4);
        assert!(cut > 0);
        let again = read_records(&path).unwrap();
        assert_eq!(
            (again.records.len(), again.cut),
            (4, 0),
            "the cut is made on disk"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn the_zero_filled_room_is_reused_and_a_record_torn_in_it_is_cut() {
        let dir = scratch();
        let path = dir.join("events.log");
        let (log, _rx) = open_in(&dir);
        for n in 0..3 {
            log.handle.append(None, vec![ping(n)]).await.unwrap();
        }
        drop(log.handle);
        log.writer.join().unwrap();
        let first = read_records(&path).unwrap();
        assert_eq!((first.records.len(), first.cut), (3, 0));
        let len = std::fs::metadata(&path).unwrap().len();
        assert!(
            len >= first.end + crate::space::CHUNK / 2,
            "room ahead: {len}"
        );

        // Reopened, appends go on where the records end, inside the room.
        let (log, rx) = open_in(&dir);
        assert_eq!((log.replayed, log.cut), (3, 0));
        let a = log.handle.append(None, vec![ping(3)]).await.unwrap();
        assert!(matches!(a, Appended::One { offset: 3, .. }));
        drop(log.handle);
        log.writer.join().unwrap();
        assert_eq!(events(&rx).len(), 4);
        let second = read_records(&path).unwrap();
        assert_eq!(second.records.len(), 4);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), len, "no growth");

        // A crash halfway through writing a record into the room.
        let bytes = std::fs::read(&path).unwrap();
        let last = &bytes[first.end as usize..second.end as usize];
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&last[..last.len() / 2], second.end).unwrap();
        let torn = read_records(&path).unwrap();
        assert_eq!((torn.records.len(), torn.end), (4, second.end));
        assert!(torn.cut > 0 && torn.cut <= (last.len() / 2) as u64);

        // Garbage far past the records is corruption, not a torn tail.
        f.write_all_at(b"junk", second.end + MAX_TORN as u64 + 100)
            .unwrap();
        assert!(matches!(read_records(&path), Err(LogError::Corrupt(at)) if at == second.end));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
