//! The writer thread: it owns the file, takes every append waiting, gives
//! each event its log offset and time (`max(now, last time)`, so time never
//! goes back), writes them durably in one write, and only then answers the
//! callers and hands the events to the dataflow. Between appends it sends
//! clock ticks, so timers fire when nothing happens.

use super::backlog::Backlog;
use super::direct::DirectAppender;
use super::format::{encode, AppendRecordRef};
use super::space::Space;
use crate::keys::{FirstUse, Print};
use crate::ledger::{Admission, Claim, Ledger};
use crate::throttle::Throttle;
use crate::{now_ms, Appended, LogError};
use grabflow_api::{Event, EventKind, Feed, Id, Time};
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
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

/// One append, as sent to the writer.
pub(crate) struct Command {
    pub(crate) key: Option<String>,
    pub(crate) events: Vec<(Id, EventKind)>,
    pub(crate) reply: oneshot::Sender<Result<Appended, LogError>>,
}

pub(crate) struct Writer {
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
    /// Opens `path` for appending after its records (which end at byte
    /// `end`), going on from the log's last time and next offset; the
    /// ledger and the backlog are shared with the log's handles.
    pub(crate) fn open(
        path: &Path,
        (end, last_time, next_offset): (u64, Time, u64),
        direct: bool,
        (ledger, backlog): (Arc<Mutex<Ledger>>, Arc<Backlog>),
        feed: mpsc::Sender<Feed>,
        ticks: Ticks,
    ) -> std::io::Result<Writer> {
        // Never truncated: the records are kept, and writes go where they end.
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)?;
        let space = Space::new(&file, file.metadata()?.len())?;
        let direct = if direct {
            DirectAppender::open(path, end)?
        } else {
            None
        };
        if direct.is_none() {
            tracing::info!("log: no direct I/O on this file system; commits write and fdatasync");
        }
        Ok(Writer {
            file,
            end,
            space,
            direct,
            ledger,
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
            failures: Throttle::new(Duration::from_secs(10)),
            backlog,
        })
    }

    /// Commits what `appends` brings and ticks, until every sender is gone;
    /// then hands the last events over.
    pub(crate) fn run(mut self, appends: mpsc::Receiver<Command>) {
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
        match self.write() {
            Ok(()) => {
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
