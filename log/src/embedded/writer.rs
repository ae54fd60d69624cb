//! The writer thread: it owns the active segment, takes every append
//! waiting, gives each event its log offset and time (`max(now, last
//! time)`, so time never goes back), writes them durably in one write, and
//! only then answers the callers and hands the events to the dataflow.
//! Between appends it sends clock ticks, so timers fire when nothing
//! happens.
//!
//! Before it takes any append it replays the log after the checkpoint into
//! the dataflow, a segment at a time and never more than
//! [`REPLAY_AHEAD`] events ahead of it (see [`Writer::replay`]). It begins a
//! new segment when the active one is full or old (see
//! [`Rolling`](super::segments::Rolling)), and deletes the segments
//! retention lets go (see [`Retention`]).

use super::backlog::Backlog;
use super::direct::DirectAppender;
use super::format::{encode, AppendRecordRef};
use super::recovery::scan_with;
use super::segments::{self, Retention, Rolling, Segment};
use super::space::Space;
use crate::keys::{FirstUse, Print};
use crate::ledger::{Admission, Claim, Ledger};
use crate::throttle::Throttle;
use crate::{now_ms, Appended, LogError};
use grabflow_api::lifecycle::Stop;
use grabflow_api::{Event, EventKind, Feed, Id, Time};
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::oneshot;

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

/// Events a replay may run ahead of the dataflow (those of one
/// millisecond excepted: the dataflow finishes them together).
pub const REPLAY_AHEAD: u64 = 1 << 18;

/// Events handed to the dataflow at a time during a replay.
const REPLAY_CHUNK: usize = 4096;

/// How often the writer looks for segments retention lets go.
const RETAIN_EVERY: Duration = Duration::from_secs(1);

/// Where the log stands when the writer starts.
pub(crate) struct Start {
    /// The segments' directory.
    pub(crate) log_dir: PathBuf,
    /// The sealed segments, oldest first.
    pub(crate) sealed: Vec<Segment>,
    /// The segment appended to (created if missing).
    pub(crate) active: Segment,
    /// Where its records end.
    pub(crate) end: u64,
    /// The time of its first event, if it holds any.
    pub(crate) active_time: Option<Time>,
    /// The log's newest event time (0 when empty).
    pub(crate) last_time: Time,
    /// The offset the next event gets.
    pub(crate) next_offset: u64,
    /// The segments to replay into the dataflow first (and whether each
    /// is the active one), and the first offset to replay.
    pub(crate) replay: (Vec<(PathBuf, bool)>, u64),
    /// When to begin a new segment.
    pub(crate) rolling: Rolling,
    /// What may be deleted.
    pub(crate) retention: Arc<Retention>,
}

/// One append, as sent to the writer.
pub(crate) struct Command {
    pub(crate) key: Option<String>,
    pub(crate) events: Vec<(Id, EventKind)>,
    pub(crate) reply: oneshot::Sender<Result<Appended, LogError>>,
}

pub(crate) struct Writer {
    /// The segments' directory.
    log_dir: PathBuf,
    /// The sealed segments, oldest first, with their first event's time
    /// once read (retention compares it).
    sealed: Vec<(Segment, Option<Time>)>,
    /// The segment appended to.
    active: Segment,
    /// The time of its first event (`None` while it holds none).
    active_time: Option<Time>,
    /// When to begin a new segment.
    rolling: Rolling,
    /// What may be deleted, and when it was last looked at.
    retention: (Arc<Retention>, Instant),
    /// Whether commits may use direct I/O (each segment is tried).
    try_direct: bool,
    /// What to replay before taking appends (see [`Start::replay`]).
    replay: (Vec<(PathBuf, bool)>, u64),
    /// The active segment's file.
    file: File,
    /// Where the records end: the next write goes here.
    end: u64,
    /// The zero-filled room ahead.
    space: Space,
    /// Commits by direct I/O, where the file system has it.
    direct: Option<DirectAppender>,
    /// Keys and known ids, shared with the handles (see [`crate::ledger`]).
    ledger: Arc<Mutex<Ledger>>,
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
    /// Failed writes are logged once per 10 s (a full disk fails them all).
    failures: Throttle,
    /// Committed events not yet through the dataflow.
    backlog: Arc<Backlog>,
}

impl Writer {
    /// Opens the active segment of `start` for appending after its
    /// records, going on from the log's last time and next offset; the
    /// ledger and the backlog are shared with the log's handles.
    pub(crate) fn open(
        start: Start,
        direct: bool,
        (ledger, backlog): (Arc<Mutex<Ledger>>, Arc<Backlog>),
        feed: mpsc::Sender<Feed>,
        ticks: Ticks,
    ) -> std::io::Result<Writer> {
        let (file, space, direct_appender) =
            open_segment(&start.active.path, start.end, direct, start.rolling)?;
        if direct && direct_appender.is_none() {
            tracing::info!("log: no direct I/O on this file system; commits write and fdatasync");
        }
        segments::sync_dir(&start.log_dir)?;
        Ok(Writer {
            log_dir: start.log_dir,
            sealed: start.sealed.into_iter().map(|s| (s, None)).collect(),
            active: start.active,
            active_time: start.active_time,
            rolling: start.rolling,
            retention: (start.retention, Instant::now()),
            try_direct: direct,
            replay: start.replay,
            file,
            end: start.end,
            space,
            direct: direct_appender,
            ledger,
            last_time: start.last_time,
            last_event: start.last_time,
            last_urgent: start.last_time,
            next_offset: start.next_offset,
            feed,
            told: 0,
            told_at: Instant::now(),
            ticks,
            unsent: Vec::new(),
            buf: Vec::new(),
            failures: Throttle::new(Duration::from_secs(10)),
            backlog,
        })
    }

    /// Replays the log after the checkpoint into the dataflow: a segment
    /// read at a time, handed over in chunks. Once more than
    /// [`REPLAY_AHEAD`] events are ahead of the dataflow, it ticks at the
    /// last handed-over event's time (later events are no earlier), so the
    /// dataflow finishes what it holds, and waits while that is so and
    /// some of them are finishable. So a restart holds one segment and a
    /// bounded backlog, however long the tail, and the dataflow's clock
    /// (and with it its checkpoints) moves once per [`REPLAY_AHEAD`]
    /// events, not per chunk. The segments were checked when the log
    /// opened; one that can no longer be read stops the writer (a panic
    /// the service reports): the dataflow must not go on without it.
    fn replay(&mut self, stop: &Stop) {
        let (segments, from) = std::mem::take(&mut self.replay);
        let mut chunk = Vec::with_capacity(REPLAY_CHUNK);
        let mut open = true;
        for (path, active) in segments {
            let scanned = scan_with(&path, from, active, false, |r| {
                if !open {
                    return;
                }
                chunk.push(r.event);
                if chunk.len() == REPLAY_CHUNK {
                    open = self.hand_replayed(&mut chunk, stop);
                }
            });
            if let Err(e) = scanned {
                panic!("log: replaying {}: {e}", path.display());
            }
        }
        if open {
            self.hand_replayed(&mut chunk, stop);
        }
    }

    /// Hands `chunk` (replayed events) to the dataflow; beyond
    /// [`REPLAY_AHEAD`], with a tick at its last time, then waits for the
    /// dataflow (see [`Writer::replay`]); `false` once the dataflow is gone.
    fn hand_replayed(&mut self, chunk: &mut Vec<Event>, stop: &Stop) -> bool {
        let Some(last) = chunk.last().map(|e| e.time) else {
            return true;
        };
        let events = std::mem::replace(chunk, Vec::with_capacity(REPLAY_CHUNK));
        self.backlog.committed(last, events.len() as u64);
        if self.backlog.ahead() <= REPLAY_AHEAD {
            return self.feed.send(Feed::Events(events)).is_ok();
        }
        self.told = self.told.max(last);
        self.told_at = Instant::now();
        if self.feed.send(Feed::EventsThenTick(events, last)).is_err() {
            return false;
        }
        while self.backlog.holds_before(REPLAY_AHEAD, last) && !stop.stopped() {
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }

    /// Deletes the oldest sealed segments retention lets go (see
    /// [`Retention::expired`]), at most once a [`RETAIN_EVERY`]. A segment
    /// that cannot be deleted is kept, and so is every one after it.
    fn retain(&mut self) {
        let (retention, at) = &mut self.retention;
        if at.elapsed() < RETAIN_EVERY || self.sealed.is_empty() {
            return;
        }
        *at = Instant::now();
        let mut firsts: Vec<u64> = self.sealed.iter().map(|(s, _)| s.first).collect();
        firsts.push(self.active.first);
        let (sealed, active_time) = (&mut self.sealed, self.active_time);
        let expired = retention.expired(
            &firsts,
            |i| match sealed.get_mut(i) {
                None => active_time,
                Some((_, Some(t))) => Some(*t),
                Some((s, time)) => {
                    *time = segments::first_time(&s.path).ok().flatten();
                    *time
                }
            },
            self.last_event,
        );
        let mut deleted = 0;
        for (segment, _) in &self.sealed[..expired] {
            if let Err(e) = std::fs::remove_file(&segment.path) {
                tracing::warn!("log: could not delete {}: {e}", segment.path.display());
                break;
            }
            deleted += 1;
        }
        if deleted > 0 {
            let gone: Vec<_> = self.sealed.drain(..deleted).collect();
            let _ = segments::sync_dir(&self.log_dir);
            let kept_from = self.sealed.first().map_or(&self.active, |(s, _)| s).first;
            tracing::info!(
                segments = gone.len(),
                first = gone[0].0.first,
                kept_from,
                "log: deleted segments past retention"
            );
        }
    }

    /// Begins a new segment at `first` (the next offset) when the commit
    /// in the buffer, of time `time`, is due one (see [`Rolling`]): creates
    /// it (a leftover of a roll that failed holds nothing acknowledged),
    /// syncs the directory, then seals the active one, trimmed to its
    /// records. On error the active segment stays as it was.
    fn roll_if_due(&mut self, first: u64, time: Time) -> std::io::Result<()> {
        let full = self.end + self.buf.len() as u64 > self.rolling.bytes;
        let old = self
            .active_time
            .is_some_and(|t| time.saturating_sub(t) >= self.rolling.span);
        if self.end == 0 || self.buf.is_empty() || !(full || old) {
            return Ok(());
        }
        let path = segments::file(&self.log_dir, first);
        OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&path)?;
        let (file, space, direct) = open_segment(&path, 0, self.try_direct, self.rolling)?;
        segments::sync_dir(&self.log_dir)?;
        // The helper stops before the room it was filling is trimmed.
        self.space = space;
        self.direct = direct;
        let sealed = std::mem::replace(&mut self.file, file);
        if let Err(e) = sealed.set_len(self.end).and_then(|()| sealed.sync_all()) {
            // Zeros after the records read as their end: harmless.
            tracing::warn!("log: could not trim the sealed segment's room: {e}");
        }
        let segment = std::mem::replace(&mut self.active, Segment { first, path });
        self.sealed.push((segment, self.active_time.take()));
        self.end = 0;
        Ok(())
    }

    /// Commits what `appends` brings and ticks, until every sender is gone;
    /// then hands the last events over.
    pub(crate) fn run(mut self, appends: mpsc::Receiver<Command>, stop: Stop) {
        self.replay(&stop);
        loop {
            match appends.recv_timeout(self.next_tick()) {
                // Group commit: every append that came while the last
                // commit was being written goes in this one. No delay
                // to gather more: waiting leaves the HTTP workers idle
                // (a 100 µs delay left the CPU idle 10-17% of the time
                // under the bench's single pings, against 8-11%).
                Ok(first) => {
                    let mut batch = vec![first];
                    batch.extend(appends.try_iter());
                    self.commit(batch);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
            self.tick();
            self.retain();
        }
        self.hand_over();
    }

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

    /// Commits every append in `batch` in one durable write, then answers
    /// each and queues its events for the dataflow; if the write fails,
    /// nothing of the batch is acknowledged.
    fn commit(&mut self, batch: Vec<Command>) {
        self.buf.clear();
        let first_offset = self.next_offset;
        let mut events = Vec::with_capacity(batch.iter().map(|c| c.events.len()).sum());
        let mut group = HashMap::new();
        let staged: Vec<Staged> = batch
            .into_iter()
            .map(|command| self.stage(command, &mut group, &mut events))
            .collect();
        let time = events.first().map_or(self.last_time, |e| e.time);
        match self
            .roll_if_due(first_offset, time)
            .and_then(|()| self.write())
        {
            Ok(()) => {
                if !events.is_empty() {
                    self.active_time.get_or_insert(time);
                }
                let mut ledger = self.ledger.lock().expect("ledger");
                let mut answers = Vec::with_capacity(staged.len());
                for Staged {
                    reply,
                    answer,
                    claim,
                } in staged
                {
                    if let (Some(claim), Ok(answer)) = (claim, &answer) {
                        ledger.appended(claim, answer);
                    }
                    answers.push((reply, answer));
                }
                ledger.taken_to(self.next_offset);
                drop(ledger);
                if let Some(last) = events.last() {
                    self.backlog.committed(last.time, events.len() as u64);
                }
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
                // torn tail that the next open cuts. Its offsets go to the
                // next commit: acknowledged offsets have no gaps.
                if let Some(held) = self.failures.admit() {
                    tracing::error!(
                        similar_since_last = held,
                        "log write failed (the appends are answered 503): {e}"
                    );
                }
                self.next_offset = first_offset;
                let mut ledger = self.ledger.lock().expect("ledger");
                for s in staged {
                    if let Some(claim) = s.claim {
                        ledger.failed(claim);
                    }
                    let e = std::io::Error::new(e.kind(), e.to_string());
                    let _ = s.reply.send(Err(LogError::Io(e)));
                }
            }
        }
    }

    /// Stages one append of a commit: admitted by the ledger (or by `group`,
    /// the keys first used earlier in this commit), its events given their
    /// offsets and time and encoded into the commit's buffer.
    fn stage(
        &mut self,
        Command {
            key,
            events: new,
            reply,
        }: Command,
        group: &mut HashMap<String, FirstUse>,
        events: &mut Vec<Event>,
    ) -> Staged {
        let answered = |reply, answer| Staged {
            reply,
            answer,
            claim: None,
        };
        if let Some(first) = key.as_deref().and_then(|k| group.get(k)) {
            let repeat = first.repeat(Print::of(new.iter().map(|(_, k)| k)));
            return answered(reply, repeat.map_err(LogError::from));
        }
        let time = self.last_time.max(now_ms());
        let admitted = self
            .ledger
            .lock()
            .expect("ledger")
            .admit(key.as_deref(), &new, time);
        let claim = match admitted {
            Ok(Admission::Fresh(claim)) => claim,
            Ok(Admission::Repeat(answer)) => return answered(reply, Ok(answer)),
            Err(e) => return answered(reply, Err(e)),
        };
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
        let answer = match appended {
            [] => return answered(reply, Ok(Appended::Batch { accepted: 0 })),
            [one] => Appended::One {
                event_id: one.id.clone(),
                offset: one.offset,
            },
            _ => Appended::Batch {
                accepted: appended.len(),
            },
        };
        encode(
            &AppendRecordRef {
                key: key.as_deref(),
                events: appended,
            },
            &mut self.buf,
        );
        group.extend(claim.first_use(&answer));
        Staged {
            reply,
            answer: Ok(answer),
            claim: Some(claim),
        }
    }

    /// Writes the commit's buffer durably after the records. Within the
    /// room, the size is synced already; past it, the sync takes the new
    /// size along (O_DSYNC and fdatasync both write what reading needs).
    fn write(&mut self) -> std::io::Result<()> {
        match &mut self.direct {
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
        }?;
        self.end += self.buf.len() as u64;
        self.space.wrote(self.end);
        Ok(())
    }
}

/// One append of a commit, until the write is done.
struct Staged {
    reply: oneshot::Sender<Result<Appended, LogError>>,
    /// What it is answered if the write is durable.
    answer: Result<Appended, LogError>,
    /// What it claimed in the ledger (a fresh append with events).
    claim: Option<Claim>,
}

/// Opens the segment at `path`, whose records end at `end`, for appending:
/// the file, its room (up to the roll size) and a direct appender if
/// `direct` and the file system has direct I/O.
fn open_segment(
    path: &std::path::Path,
    end: u64,
    direct: bool,
    rolling: Rolling,
) -> std::io::Result<(File, Space, Option<DirectAppender>)> {
    // Never truncated: the records are kept, and writes go where they end.
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)?;
    let space = Space::new(&file, file.metadata()?.len(), rolling.bytes)?;
    let direct = if direct {
        DirectAppender::open(path, end)?
    } else {
        None
    };
    Ok((file, space, direct))
}
