//! The embedded log: append-only, checksummed, group-committed.
//!
//! One file, `events.log`, in the data directory, in the [`format`](mod@format) of
//! framed, checksummed records. An append is one record, so a torn write loses a whole unacknowledged append, never part
//! of one. A writer thread owns the file: it takes every append waiting,
//! gives each event its log offset and time (`max(now, last time)`, so time
//! never goes back), writes them durably in one write (direct I/O, see
//! [`direct`]; else a write and `fdatasync`), and only then answers
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

//!
//! ## Layout
//!
//! - this module: [`open`] (read back, rebuild the ledger, replay, start
//!   the writer), [`Ticks`], [`EmbeddedLog`] (the [`Append`] side).
//! - [`backlog`]: how far appends may run ahead of the dataflow.
//! - [`format`](mod@format): framing and the record forms, old and new.
//! - [`recovery`]: reading the file back, cutting a torn tail.
//! - `writer`: the writer thread: group commit and ticks.
//! - [`space`]: the zero-filled room kept ahead of the writer.
//! - [`direct`]: commits as direct, data-synchronous writes.

pub mod backlog;
pub mod direct;
pub mod format;
pub mod recovery;
pub mod space;
#[cfg(test)]
mod tests;
mod writer;

pub use format::Record;
pub use recovery::{read_records, read_records_from, repair, verify, Repaired, Report, Scanned};

use crate::ledger::Ledger;
use crate::{Append, LogError, LogHandle, Pending};
use backlog::Backlog;
use grabflow_api::lifecycle::Thread;
use grabflow_api::{EventKind, Feed, Id, Time};
use std::path::Path;
use std::sync::{mpsc, Arc, Mutex};
use tokio::sync::oneshot;
pub use writer::Ticks;
use writer::{Command, Writer};

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
    /// The writer thread; it ends when every handle is dropped.
    pub writer: Thread,
}

/// Opens (or creates) the log in `dir`, replays what it holds into `feed`,
/// and starts the writer thread, which sends clock ticks as `ticks` says.
/// Commits are direct writes where the file system allows it (see
/// [`direct`]), else buffered writes and `fdatasync`.
/// Appends are refused while the dataflow is further behind than
/// `backlog` allows (the service tells it the dataflow's progress).
pub fn open(
    dir: &Path,
    feed: mpsc::Sender<Feed>,
    ticks: Ticks,
    backlog: Arc<Backlog>,
) -> Result<Opened, LogError> {
    open_with(dir, feed, ticks, backlog, Resume::default(), true)
}

/// Where a restart from a checkpoint picks the log up.
#[derive(Debug, Default)]
pub struct Resume {
    /// The events from this offset on are replayed into the feed (the
    /// dataflow's checkpoint holds what those before made).
    pub from: u64,
    /// The ledger the checkpoint saved: it has taken in every event before
    /// its [`Ledger::next`], and reads back the rest.
    pub ledger: Ledger,
}

/// [`open`], from a checkpoint: replays only the events from `resume.from`
/// on, and reads back into `resume.ledger` only those it lacks.
pub fn open_resuming(
    dir: &Path,
    feed: mpsc::Sender<Feed>,
    ticks: Ticks,
    backlog: Arc<Backlog>,
    resume: Resume,
) -> Result<Opened, LogError> {
    open_with(dir, feed, ticks, backlog, resume, true)
}

/// [`open_resuming`], with direct I/O only if `direct` (tests take both paths).
fn open_with(
    dir: &Path,
    feed: mpsc::Sender<Feed>,
    ticks: Ticks,
    backlog: Arc<Backlog>,
    Resume { from, mut ledger }: Resume,
    direct: bool,
) -> Result<Opened, LogError> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join("events.log");
    let Scanned {
        mut records,
        end,
        cut,
        last,
    } = read_records_from(&path, from.min(ledger.next()))?;
    let (last_time, next_offset) = last.map_or((0, 0), |r| (r.event.time, r.event.offset + 1));
    if next_offset < ledger.next() || next_offset < from {
        return Err(LogError::Io(std::io::Error::other(format!(
            "{}: the log ends at offset {next_offset}, before the checkpoint's {}",
            path.display(),
            from.max(ledger.next())
        ))));
    }
    let read_from = ledger.next();
    for Record { key, event } in records.iter().filter(|r| r.event.offset >= read_from) {
        // A batch's events carry its key each: the answer counts them.
        ledger.read_back(
            key.as_deref(),
            Some(&event.id),
            event.offset,
            &event.kind,
            None,
            event.time,
        );
    }
    records.retain(|r| r.event.offset >= from);
    for chunk in records.chunks(4096) {
        let _ = feed.send(Feed::Events(
            chunk.iter().map(|r| r.event.clone()).collect(),
        ));
    }
    let ledger = Arc::new(Mutex::new(ledger));
    let (tx, rx) = mpsc::channel::<Command>();
    let writer = Writer::open(
        &path,
        (end, last_time, next_offset),
        direct,
        (Arc::clone(&ledger), Arc::clone(&backlog)),
        feed,
        ticks,
    )?;
    let writer = Thread::spawn("grabflow-log", move |_| writer.run(rx))?;
    Ok(Opened {
        handle: LogHandle::new(Arc::new(EmbeddedLog { tx, backlog }), ledger),
        replayed: records.len(),
        cut,
        last_time,
        writer,
    })
}

/// The embedded log's [`Append`] side: hands each append to the writer
/// thread and waits for its commit.
pub struct EmbeddedLog {
    tx: mpsc::Sender<Command>,
    backlog: Arc<Backlog>,
}

impl Append for EmbeddedLog {
    fn append(&self, key: Option<String>, events: Vec<(Id, EventKind)>) -> Pending<'_> {
        if !self.backlog.admits(&events) {
            let behind = self.backlog.ahead();
            return Box::pin(async move { Err(LogError::Behind(behind)) });
        }
        let (reply, rx) = oneshot::channel();
        let sent = self.tx.send(Command { key, events, reply });
        Box::pin(async move {
            sent.map_err(|_| LogError::Closed)?;
            rx.await.unwrap_or(Err(LogError::Closed))
        })
    }
}
