//! The embedded log: append-only, checksummed, group-committed, in
//! segments.
//!
//! The log is a run of segment files in `<data dir>/log/`, each named by
//! its first offset (see [`segments`]), in the [`format`](mod@format) of
//! framed, checksummed records. An append is one record, so a torn write
//! loses a whole unacknowledged append, never part of one. A writer thread
//! owns the last segment: it takes every append waiting,
//! gives each event its log offset and time (`max(now, last time)`, so time
//! never goes back), writes them durably in one write (direct I/O, see
//! [`direct`]; else a write and `fdatasync`), and only then answers
//! the callers and hands the events to the dataflow. Appends that arrive
//! during a write go in the next one. Between appends it sends clock ticks,
//! so timers fire when nothing happens. A full or old segment gives way to
//! a new one; old segments go once retention and the checkpoints allow.
//!
//! How soon the dataflow hears of a commit depends on what it holds (see
//! [`Ticks`]): any event but a location ping, as soon as the clock passes
//! its millisecond; pings alone, within [`Ticks::pings`]. Each tick costs
//! the dataflow a pass over every operator, while a ping changes nothing
//! anyone waits on until an order, a grab or a timer reads the index (and
//! those tick at once, taking the pings before them along).
//!
//! On open, the segments a restart needs are read a record at a time; a
//! torn or corrupt tail of the last one (a crash mid-write) is cut at the
//! last whole record, never half-applied; any other damage stops the open.
//! The records after the checkpoint are then replayed into the dataflow,
//! streamed the same way and a bounded backlog ahead of it, before new
//! appends are taken: a restart's memory does not grow with the tail.
//!
//! ## Layout
//!
//! - this module: [`open`] (read back, rebuild the ledger, start the
//!   writer), [`Options`], [`Ticks`], [`EmbeddedLog`] (the [`Append`] side).
//! - [`backlog`]: how far appends may run ahead of the dataflow.
//! - [`format`](mod@format): framing and the record forms, old and new.
//! - [`recovery`]: reading a segment back, cutting a torn tail.
//! - [`segments`]: the segment files, rolling, migration from one file,
//!   retention.
//! - `writer`: the writer thread: replay, group commit, ticks, rolling and
//!   deleting segments.
//! - [`space`]: the zero-filled room kept ahead of the writer.
//! - [`direct`]: commits as direct, data-synchronous writes.

pub mod backlog;
pub mod direct;
pub mod format;
pub mod recovery;
pub mod segments;
pub mod space;
#[cfg(test)]
mod tests;
mod writer;

pub use format::Record;
pub use recovery::{read_records, read_records_from, repair, verify, Repaired, Report, Scanned};
pub use segments::{Retention, Rolling, Segment};

use crate::ledger::Ledger;
use crate::{Append, LogError, LogHandle, Pending};
use backlog::Backlog;
use grabflow_api::lifecycle::Thread;
use grabflow_api::{EventKind, Feed, Id, Time};
use recovery::scan;
use segments::first_time;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
use tokio::sync::oneshot;
use writer::{Command, Start, Writer};
pub use writer::{Ticks, REPLAY_AHEAD};

/// What opening the log found.
pub struct Opened {
    /// The handle to append with.
    pub handle: LogHandle,
    /// Events after the checkpoint (all of them without one): the writer
    /// replays them into the feed before it takes an append.
    pub replayed: usize,
    /// Bytes cut from a torn tail.
    pub cut: u64,
    /// The latest event time in the log (0 when empty).
    pub last_time: Time,
    /// The writer thread; it ends when every handle is dropped.
    pub writer: Thread,
}

/// How the log is kept: ticks, segments and retention.
#[derive(Clone, Debug)]
pub struct Options {
    /// When the writer tells the dataflow that time has passed.
    pub ticks: Ticks,
    /// When a new segment begins.
    pub rolling: Rolling,
    /// Which segments may be deleted; the checkpoints tell it what they
    /// need ([`Retention::checkpointed`]).
    pub retention: Arc<Retention>,
}

impl Options {
    /// Ticks as `ticks` says, the default segments, nothing deleted.
    pub fn new(ticks: Ticks) -> Options {
        Options {
            ticks,
            rolling: Rolling::default(),
            retention: Arc::new(Retention::new(0)),
        }
    }
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
    open_with(
        dir,
        feed,
        backlog,
        Resume::default(),
        Options::new(ticks),
        true,
    )
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

/// [`open`], from a checkpoint, kept as `options` say: replays only the
/// events from `resume.from` on, and reads back into `resume.ledger` only
/// those it lacks.
pub fn open_resuming(
    dir: &Path,
    feed: mpsc::Sender<Feed>,
    backlog: Arc<Backlog>,
    resume: Resume,
    options: Options,
) -> Result<Opened, LogError> {
    open_with(dir, feed, backlog, resume, options, true)
}

/// [`open_resuming`], with direct I/O only if `direct` (tests take both
/// paths). Opening reads the segments from the one holding the first
/// event the ledger or the dataflow lacks to the last, a record at a time:
/// each is checked (a torn tail is cut in the last one only), the
/// offsets must follow on from segment to segment, and the ledger reads
/// back what it lacks. The writer then replays the dataflow's part
/// (see [`writer`]) before it takes appends.
fn open_with(
    dir: &Path,
    feed: mpsc::Sender<Feed>,
    backlog: Arc<Backlog>,
    Resume { from, mut ledger }: Resume,
    options: Options,
    direct: bool,
) -> Result<Opened, LogError> {
    std::fs::create_dir_all(dir)?;
    segments::migrate(dir)?;
    let log_dir = segments::dir(dir);
    std::fs::create_dir_all(&log_dir)?;
    let mut all = segments::list(dir)?;
    let start = from.min(ledger.next());
    if let Some(first) = all.first().filter(|s| s.first > start) {
        return Err(LogError::Segments {
            path: first.path.clone(),
            why: format!(
                "the log begins at offset {}, after the {start} a restart needs \
                 (the segments before it are gone)",
                first.first
            ),
        });
    }
    let mut read_from = all.iter().rposition(|s| s.first <= start).unwrap_or(0);
    let (mut last, mut end, mut cut, mut active_time) = (None, 0, 0, None);
    // The offset the next segment must begin at.
    let mut expect: Option<u64> = None;
    let ledger_from = ledger.next();
    let mut replayed = 0;
    for (i, segment) in all.iter().enumerate().skip(read_from) {
        let tail = i + 1 == all.len();
        let scanned = scan(&segment.path, start, tail, |Record { key, event }| {
            replayed += usize::from(event.offset >= from);
            if event.offset >= ledger_from {
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
        })?;
        let broken = |why: String| LogError::Segments {
            path: segment.path.clone(),
            why,
        };
        if let Some(e) = expect.filter(|&e| e != segment.first) {
            // A repair of the segment before may have quarantined its last
            // records: their offsets are missing, knowingly.
            let repaired = i > 0 && segments::repaired(&all[i - 1].path);
            if !(repaired && segment.first > e) {
                return Err(broken(format!(
                    "it begins at offset {}, but the segment before ends before {e}",
                    segment.first
                )));
            }
            tracing::warn!(
                "log: offsets {e} to {} are missing: `grabflow log repair` quarantined them",
                segment.first - 1
            );
        }
        match scanned.first {
            Some(first) if first != segment.first => {
                return Err(broken(format!(
                    "its first event has offset {first}, not the {} it is named by",
                    segment.first
                )))
            }
            None if !tail => return Err(broken("it holds no whole record".into())),
            _ => {}
        }
        expect = Some(
            scanned
                .last
                .as_ref()
                .map_or(segment.first, |r| r.event.offset + 1),
        );
        if tail {
            (end, cut) = (scanned.end, scanned.cut);
            active_time = scanned.first.and(first_time(&segment.path)?);
        }
        last = scanned.last.or(last);
    }
    // The last segment is empty (a crash right after it was begun): the
    // log's clock stands where the segment before ends.
    if last.is_none() && read_from > 0 && read_from + 1 == all.len() {
        read_from -= 1;
        let before = &all[read_from];
        last = scan(&before.path, u64::MAX, false, |_| {})?.last;
        let ends = last.as_ref().map(|r| r.event.offset + 1);
        if ends != Some(all[read_from + 1].first) {
            return Err(LogError::Segments {
                path: all[read_from + 1].path.clone(),
                why: format!("it begins where the segment before does not end ({ends:?})"),
            });
        }
    }
    let last_time = last.as_ref().map_or(0, |r| r.event.time);
    let next_offset = expect.unwrap_or(0);
    if next_offset < ledger.next() || next_offset < from {
        return Err(LogError::Segments {
            path: log_dir,
            why: format!(
                "the log ends at offset {next_offset}, before the checkpoint's {}",
                from.max(ledger.next())
            ),
        });
    }
    // The dataflow's part: from the segment holding `from`.
    let replay_from = all.iter().rposition(|s| s.first <= from).unwrap_or(0);
    let replay: Vec<(PathBuf, bool)> = all[replay_from..]
        .iter()
        .enumerate()
        .map(|(i, s)| (s.path.clone(), replay_from + i + 1 == all.len()))
        .collect();
    let active = all.pop().unwrap_or_else(|| Segment {
        first: 0,
        path: segments::file(&log_dir, 0),
    });
    let ledger = Arc::new(Mutex::new(ledger));
    let (tx, rx) = mpsc::channel::<Command>();
    let start = Start {
        log_dir,
        sealed: all,
        active,
        end,
        active_time,
        last_time,
        next_offset,
        replay: (replay, from),
        rolling: options.rolling,
        retention: options.retention,
    };
    let writer = Writer::open(
        start,
        direct,
        (Arc::clone(&ledger), Arc::clone(&backlog)),
        feed,
        options.ticks,
    )?;
    let writer = Thread::spawn("grabflow-log", move |stop| writer.run(rx, stop))?;
    Ok(Opened {
        handle: LogHandle::new(Arc::new(EmbeddedLog { tx, backlog }), ledger),
        replayed,
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
