//! The live view egress serves, kept from what the dataflow emits.
//!
//! [`Egress`] implements the dataflow runtime's `Observer` (events, decisions,
//! index changes, progress) and the waiting calls' [`Waiter`] (grabs,
//! pickups, deliveries). It keeps:
//! - each order's state and history, each rider's position, shift and load,
//!   and the rider index by cell (for merchant→rider queries);
//! - per rider, the stream of messages with a monotonically increasing `seq`
//!   (offers, withdrawals, grab results, assignments), so a reconnecting client
//!   that passes `after=SEQ` misses nothing; the seqs are a function of the
//!   log, so they survive a restart.
//!
//! Everything it keeps has an end, in log time (so a replay or a restore
//! from a checkpoint keeps the same):
//! - a closed order leaves the view `order_retention` after it closed
//!   (`closing`, in close order); its history goes to the [`History`] store
//!   on disk, which answers it until `history_retention` after it closed;
//! - a stream keeps at most [`STREAM_KEEP`] messages, none older than the
//!   stream retention; a stream whose messages have all gone restarts its
//!   seqs above every seq it gave (at the log time of its next message), and
//!   leaves the table once no client holds it. A client resuming from a seq
//!   no longer kept is told so first ([`RiderMessage::Gap`]).

use crate::history::{History, HistoryError, Lookup};
use foldhash::HashMap;
use grabflow_api::output::{RejectReason, TransitionReason, WithdrawReason};
use grabflow_api::{
    Coord, DispatchConfig, Event, EventKind, GrabOutcome, Id, OrderState, Output, Time,
};
use grabflow_dataflow::checkpoint::{snapshot, Snapshot};
use grabflow_dataflow::geo_index::GeoIndex;
use grabflow_dataflow::riders::RiderTables;
use grabflow_dataflow::runtime::Observer;
use grabflow_dataflow::IndexEntry;
use grabflow_http::extract::IdSchema;
use grabflow_http::waiter::{self, verdict_of, Expect, GrabAnswer, Verdict, Waiter, Waiting};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockWriteGuard};
use tokio::sync::{oneshot, Notify};
use utoipa::ToSchema;

/// One message on a rider's stream: a WebSocket text frame, or an SSE
/// event's `data` (its `id` is the `seq`).
#[derive(Serialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RiderMessage<'a> {
    /// An order offered to the rider: grab it before `expires_at`.
    Offer {
        /// Position in the rider's stream (resume with `?after=SEQ`).
        seq: u64,
        /// The order.
        #[schema(value_type = IdSchema)]
        order_id: &'a Id,
        /// Its merchant.
        #[schema(value_type = IdSchema)]
        merchant_id: &'a Id,
        /// Rider to merchant when offered, metres.
        distance_m: u32,
        /// When the offer round ends, Unix ms.
        #[schema(value_type = u64)]
        expires_at: Time,
    },
    /// An offer, or an assignment, taken back.
    Withdrawn {
        /// Position in the rider's stream.
        seq: u64,
        /// The order.
        #[schema(value_type = IdSchema)]
        order_id: &'a Id,
        /// Why: `taken` (another rider won it), `cancelled`, `expired`,
        /// `redispatched` or `reassigned` (by ops).
        #[schema(value_type = String)]
        reason: WithdrawReason,
    },
    /// The decision on the rider's grab.
    GrabResult {
        /// Position in the rider's stream.
        seq: u64,
        /// The order.
        #[schema(value_type = IdSchema)]
        order_id: &'a Id,
        /// `result` and, if lost, `reason`: as the grab call answers.
        #[serde(flatten)]
        answer: GrabAnswer,
    },
    /// The order is the rider's (won, or reassigned by ops).
    Assigned {
        /// Position in the rider's stream.
        seq: u64,
        /// The order.
        #[schema(value_type = IdSchema)]
        order_id: &'a Id,
    },
    /// Sent first to a client resuming from a seq the stream no longer
    /// keeps (older than `--stream-retention`, or beyond the last 2000
    /// messages, or of a stream that has started over): the messages after
    /// the client's seq and before `first_seq` are gone. The messages from
    /// `first_seq` on follow. Over SSE its `id` is `first_seq - 1`.
    Gap {
        /// The first seq the client can still have.
        first_seq: u64,
    },
}

/// Messages kept per rider for reconnecting clients (and no older than
/// the stream retention).
pub const STREAM_KEEP: usize = 2_000;

/// Log time between sweeps of the stream table and of the history store,
/// ms. Reads filter by time between sweeps: a sweep only frees memory.
const SWEEP_EVERY: Time = 1_000;

/// What the view keeps beyond the live city, and for how long (log time).
pub struct Retention {
    /// A stream message is kept this long, ms.
    pub stream_ms: Time,
    /// Where closed orders go once they leave the view (`None`: they are
    /// forgotten).
    pub history: Option<History>,
}

impl Default for Retention {
    /// One hour of stream messages; no history store.
    fn default() -> Retention {
        Retention {
            stream_ms: 60 * 60 * 1000,
            history: None,
        }
    }
}

/// A rider as queried.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RiderView {
    /// Last reported position.
    pub at: Option<Coord>,
    /// On shift.
    pub online: bool,
    /// Capacity from the last shift (default when absent).
    pub capacity: Option<u32>,
    /// Orders assigned and not delivered.
    pub load: u32,
    /// Log time of its last shift (and, when the view keeps positions, of
    /// its last ping): a rider carrying nothing leaves the view once the
    /// dataflow has forgotten it (`rider_retention_ms` after its last ping
    /// or shift).
    pub seen: Time,
}

/// One step of an order's history: a transition, or an event that had no
/// effect on the order. In JSON, `event_id` and `rejected` are left out
/// when absent; in a checkpoint every field is written (postcard reads
/// fields by position).
#[derive(Clone, Debug, Deserialize, ToSchema)]
pub struct HistoryItem {
    /// The state entered (for a rejected event, the state the order stayed in).
    #[schema(value_type = String)]
    pub state: OrderState,
    /// When, Unix ms (log time).
    #[schema(value_type = u64)]
    pub at: Time,
    /// Why: `placed`, `offered`, `grab_timeout`, `grabbed`,
    /// `deadline_passed`, `picked_up`, `delivered`, `completed`,
    /// `compensation_due`, `compensated`, `cancelled`, `redispatched`,
    /// `reassigned`; or `rejected` for an event that had no effect.
    #[schema(value_type = String)]
    pub reason: Step,
    /// The event that caused it; absent when a timer or the offer pass did.
    #[schema(value_type = Option<String>)]
    pub event_id: Option<Id>,
    /// For a rejected event, why, as its call's 409 code: `not_assigned`
    /// (not the assigned rider), `wrong_state`, `conflict` (placed twice).
    #[schema(value_type = Option<String>)]
    pub rejected: Option<Cow<'static, str>>,
}

impl Serialize for HistoryItem {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let whole = !s.is_human_readable();
        let mut st = s.serialize_struct("HistoryItem", 5)?;
        st.serialize_field("state", &self.state)?;
        st.serialize_field("at", &self.at)?;
        st.serialize_field("reason", &self.reason)?;
        for (name, value) in [
            ("event_id", self.event_id.as_ref().map(Id::as_str)),
            ("rejected", self.rejected.as_deref()),
        ] {
            if whole || value.is_some() {
                st.serialize_field(name, &value)?;
            } else {
                st.skip_field(name)?;
            }
        }
        st.end()
    }
}

/// What a history step records: a transition's reason, or a rejection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// The order moved, for this reason.
    Moved(TransitionReason),
    /// The event had no effect.
    Rejected(RejectReason),
}

/// [`Step`] as a checkpoint keeps it (whole).
#[derive(Serialize, Deserialize)]
enum StepRepr {
    Moved(TransitionReason),
    Rejected(RejectReason),
}

/// In JSON, the transition's reason or `rejected`; in a checkpoint, whole.
impl Serialize for Step {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match (s.is_human_readable(), *self) {
            (true, Step::Moved(reason)) => reason.serialize(s),
            (true, Step::Rejected(_)) => s.serialize_str("rejected"),
            (false, Step::Moved(r)) => StepRepr::Moved(r).serialize(s),
            (false, Step::Rejected(r)) => StepRepr::Rejected(r).serialize(s),
        }
    }
}

/// Read back from a checkpoint only.
impl<'de> Deserialize<'de> for Step {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(match StepRepr::deserialize(d)? {
            StepRepr::Moved(r) => Step::Moved(r),
            StepRepr::Rejected(r) => Step::Rejected(r),
        })
    }
}

/// An order as queried.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct OrderView {
    /// Current state.
    pub state: OrderState,
    /// Assigned rider.
    pub rider: Option<Id>,
    /// The merchant.
    pub merchant: Id,
    /// Every transition.
    pub history: Vec<HistoryItem>,
}

/// One rider's message stream.
#[derive(Clone, Default, Serialize, Deserialize)]
struct Stream {
    /// The last seq given; 0 before the first message, and again once
    /// every message has aged out (the next one then starts over, at its
    /// log time, above every seq given before).
    next_seq: u64,
    /// Kept messages: seq, log time, the JSON text. Shared with the
    /// checkpoint copies still being encoded: the first change after one
    /// copies this stream's alone (`Arc::make_mut`).
    messages: Arc<VecDeque<(u64, Time, Arc<str>)>>,
    /// Log time of the last message.
    last_at: Time,
    /// Wakes the stream's clients.
    #[serde(skip)]
    notify: Arc<Notify>,
}

impl Stream {
    /// Drops the messages `retention` old at log time `now`; once none is
    /// left and the last is that old, the seqs start over (if the clock is
    /// past the last seq, which the new ones start above).
    fn trim(&mut self, now: Time, retention: Time) {
        let aged = |m: &VecDeque<(u64, Time, Arc<str>)>| {
            m.front().is_some_and(|(_, at, _)| at + retention <= now)
        };
        if aged(&self.messages) {
            let messages = Arc::make_mut(&mut self.messages);
            while aged(messages) {
                messages.pop_front();
            }
        }
        if self.messages.is_empty() && self.last_at + retention <= now && self.next_seq < now {
            self.next_seq = 0;
        }
    }
}

/// What a client resuming after a seq gets.
#[derive(Debug, Default)]
pub struct Resume {
    /// The first seq it can have, if messages after its seq are gone
    /// (send a [`RiderMessage::Gap`] first).
    pub gap: Option<u64>,
    /// The kept messages after its seq (all kept ones, after a gap).
    pub messages: Vec<(u64, Arc<str>)>,
}

/// What the view keeps; saved whole in a checkpoint (with the counters).
/// A checkpoint copies it (each stream's messages are shared, not copied,
/// until the stream next changes) and encodes the copy on the checkpoint's
/// writer thread.
#[derive(Clone, Default, Serialize, Deserialize)]
struct View {
    riders: HashMap<Id, RiderView>,
    merchants: HashMap<Id, (Coord, bool)>,
    /// Shared with the checkpoint copies still being encoded: an order
    /// changing after one is copied alone (`Arc::make_mut`).
    orders: HashMap<Id, Arc<OrderView>>,
    index: GeoIndex,
    streams: HashMap<Id, Stream>,
    /// Closed orders still in the view, by close time: each leaves
    /// `order_retention` after it closed.
    closing: BTreeSet<(Time, Id)>,
}

/// A counter's name (an event kind, a decision kind, a state).
pub type Name = Cow<'static, str>;

/// Business counters for `/v1/ops/metrics` and `/metrics`.
#[derive(Default, Clone, Serialize, Deserialize)]
pub struct Counters {
    /// Events that entered the dataflow, by kind.
    pub events: BTreeMap<Name, u64>,
    /// Decisions, by kind.
    pub decisions: BTreeMap<Name, u64>,
    /// Grabs won.
    pub grabs_won: u64,
    /// Grabs lost, by reason.
    pub grabs_lost: BTreeMap<String, u64>,
    /// Orders in the view by current state (closed ones until they leave
    /// the view for the history store).
    pub orders_by_state: BTreeMap<Name, i64>,
    /// Closed orders moved from the view to the history store.
    pub orders_archived: u64,
}

/// The view and counters as a checkpoint keeps them.
#[derive(Serialize, Deserialize)]
struct Saved {
    view: View,
    counters: Counters,
}

/// The last checkpoint written and this start's, for the metrics.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CheckpointFigures {
    /// The last checkpoint's log time (0: none yet).
    pub last_at: Time,
    /// Its size, bytes.
    pub last_bytes: u64,
    /// How long encoding and writing it took, ms.
    pub last_write_ms: u64,
    /// When it was written (for its age).
    #[serde(skip)]
    pub written: Option<std::time::Instant>,
    /// Checkpoints written since the start.
    pub written_total: u64,
    /// Checkpoints that failed to write since the start.
    pub failed_total: u64,
    /// The checkpoint this process started from (0: none).
    pub started_from: Time,
    /// Events the start replayed from the log.
    pub replayed: u64,
}

/// Checkpoint figures, shared by the checkpoint thread and the metrics.
pub type SharedFigures = Arc<Mutex<CheckpointFigures>>;

/// The egress state, shared by the dataflow's observer side and the routes.
pub struct Egress {
    /// The dispatch configuration (radius for merchant queries, default capacity).
    pub cfg: DispatchConfig,
    view: RwLock<View>,
    counters: Mutex<Counters>,
    waiters: Waiting,
    /// The dataflow has delivered every decision before this log time.
    progress: AtomicU64,
    /// Ready once progress passes the end of the replayed log.
    ready: AtomicBool,
    replay_until: AtomicU64,
    /// Time of the newest event seen.
    last_event: AtomicU64,
    /// Checkpoint figures, where checkpoints are taken.
    checkpoints: Mutex<Option<SharedFigures>>,
    /// Set on shutdown: open streams end.
    closed: AtomicBool,
    closing: Notify,
    /// The dataflow's rider trackers, when they are in this process: riders'
    /// positions are read there, and pings are not looked up again here.
    positions: Option<RiderTables>,
    /// Stream retention, and the history store closed orders go to.
    retention: Retention,
    /// Log time of the last sweep of the stream table.
    swept_streams: AtomicU64,
    /// Log time of the last sweep asked of the history store.
    swept_history: AtomicU64,
}

impl Egress {
    /// An empty view; ready once the dataflow passes `replay_until` (the last
    /// replayed event's time; 0 for an empty log). `positions` are the
    /// dataflow's rider trackers when they run in this process (riders'
    /// positions are then read there); with `None`, the view keeps each
    /// rider's last ping itself. `retention` says how long stream messages
    /// are kept and where closed orders go once they leave the view.
    pub fn new(
        cfg: DispatchConfig,
        replay_until: Time,
        positions: Option<RiderTables>,
        retention: Retention,
    ) -> Arc<Egress> {
        Arc::new(Egress {
            positions,
            retention,
            swept_streams: AtomicU64::new(0),
            swept_history: AtomicU64::new(0),
            cfg,
            view: RwLock::default(),
            counters: Mutex::default(),
            waiters: Waiting::default(),
            progress: AtomicU64::new(0),
            ready: AtomicBool::new(false),
            replay_until: AtomicU64::new(replay_until),
            last_event: AtomicU64::new(0),
            checkpoints: Mutex::new(None),
            closed: AtomicBool::new(false),
            closing: Notify::new(),
        })
    }

    /// The view and counters restored from a checkpoint's `saved` state
    /// (as [`Observer::save`] made it).
    pub fn restore(&self, saved: &[u8]) -> Result<(), postcard::Error> {
        let Saved { view, counters } = postcard::from_bytes(saved)?;
        *self.view.write().expect("view") = view;
        *self.counters.lock().expect("counters") = counters;
        Ok(())
    }

    /// Whether a checkpoint's `saved` view decodes (one of another
    /// version's layout does not: that checkpoint is skipped).
    pub fn decodes(saved: &[u8]) -> Result<(), postcard::Error> {
        postcard::from_bytes::<Saved>(saved).map(drop)
    }

    /// Where the checkpoint figures are kept (for the metrics).
    pub fn set_checkpoints(&self, figures: Option<SharedFigures>) {
        *self.checkpoints.lock().expect("checkpoints") = figures;
    }

    /// A copy of the checkpoint figures, if checkpoints are taken.
    pub fn checkpoints(&self) -> Option<CheckpointFigures> {
        let shared = self.checkpoints.lock().expect("checkpoints").clone()?;
        let figures = shared.lock().expect("figures").clone();
        Some(figures)
    }

    /// Ends every open rider stream (graceful shutdown).
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.closing.notify_waiters();
    }

    /// Resolves once [`Egress::close`] has been called.
    pub async fn closed(&self) {
        let wait = self.closing.notified();
        tokio::pin!(wait);
        wait.as_mut().enable();
        if !self.closed.load(Ordering::Acquire) {
            wait.await;
        }
    }

    /// Whether replay has caught up.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// The dataflow's progress (log ms) and the newest event's time.
    pub fn progress(&self) -> (Time, Time) {
        (
            self.progress.load(Ordering::Acquire),
            self.last_event.load(Ordering::Acquire),
        )
    }

    /// A copy of the business counters.
    pub fn counters(&self) -> Counters {
        self.counters.lock().expect("counters").clone()
    }

    /// Sizes: riders known (that pinged or changed shift, with the rider
    /// trackers; named by any event, without), riders indexed, merchants,
    /// orders.
    pub fn sizes(&self) -> (usize, usize, usize, usize) {
        let known = self.positions.as_ref().map(RiderTables::known);
        let v = self.view.read().expect("view");
        (
            known.unwrap_or(v.riders.len()),
            v.index.len(),
            v.merchants.len(),
            v.orders.len(),
        )
    }

    /// An order, if the dataflow has seen it placed and its history is
    /// kept: from the view, else from the history store.
    pub fn order(&self, id: &Id) -> Option<OrderView> {
        match self.lookup(id) {
            Ok(Lookup::Found(order)) => Some(order),
            _ => None,
        }
    }

    /// Order `id`: from the view, else from the history store (whole,
    /// expired, or unknown), at the dataflow's progress.
    pub fn lookup(&self, id: &Id) -> Result<Lookup, HistoryError> {
        if let Some(o) = self.view.read().expect("view").orders.get(id) {
            return Ok(Lookup::Found(OrderView::clone(o)));
        }
        match &self.retention.history {
            Some(h) => h.lookup(id, self.log_time()),
            None => Ok(Lookup::Unknown),
        }
    }

    /// The log time retention is judged at: the dataflow's progress, and
    /// while replaying no earlier than the end of the replayed log (what
    /// had expired before the restart stays expired).
    fn log_time(&self) -> Time {
        let progress = self.progress.load(Ordering::Acquire);
        progress.max(self.replay_until.load(Ordering::Acquire))
    }

    /// Rider streams in the table and the messages they keep.
    pub fn stream_sizes(&self) -> (usize, usize) {
        let v = self.view.read().expect("view");
        let messages = v.streams.values().map(|s| s.messages.len()).sum();
        (v.streams.len(), messages)
    }

    /// Waits until every order handed on to the history store so far is on
    /// disk (a checkpoint without them is written only then).
    pub fn flush_history(&self) {
        if let Some(h) = &self.retention.history {
            h.flush();
        }
    }

    /// Stops the history store's thread once it has written what is
    /// queued (after the dataflow has stopped).
    pub fn close_history(&self) {
        if let Some(h) = &self.retention.history {
            h.close();
        }
    }

    /// A rider, if any event named it, and its entry in the dispatch index
    /// (position), if it is indexed (on shift and fresh).
    pub fn rider(&self, id: &Id) -> Option<(RiderView, Option<Coord>)> {
        let (rider, indexed) = {
            let v = self.view.read().expect("view");
            (v.riders.get(id).cloned(), v.index.get(id).map(|(_, at)| at))
        };
        let Some(tables) = &self.positions else {
            return Some((rider?, indexed));
        };
        // The view lock is released: the trackers' locks are never taken
        // under it.
        let at = tables.position(id);
        if rider.is_none() && at.is_none() {
            return None;
        }
        let rider = RiderView {
            at,
            ..rider.unwrap_or_default()
        };
        Some((rider, indexed))
    }

    /// The `limit` available riders nearest to a merchant within the base
    /// radius, nearest first; `None` for an unknown merchant.
    pub fn riders_near(&self, merchant: &Id, limit: usize) -> Option<Vec<(Id, f64)>> {
        let v = self.view.read().expect("view");
        let (at, _) = *v.merchants.get(merchant)?;
        let free = |r: &Id| {
            v.riders
                .get(r)
                .is_none_or(|x| x.load < x.capacity.unwrap_or(self.cfg.default_capacity))
        };
        Some(v.index.nearest(at, self.cfg.radius_m, limit, free))
    }

    /// Messages of `rider` with seq above `after` (0: every kept one), and
    /// whether some after `after` are gone: older than the stream
    /// retention, beyond the [`STREAM_KEEP`] last, or of a stream that has
    /// started over (a seq beyond the last given counts as that too). To
    /// miss nothing, a caller enables its wait on [`Egress::notifier`]
    /// before calling.
    pub fn messages_after(&self, rider: &Id, after: u64) -> Resume {
        let now = self.log_time();
        let v = self.view.read().expect("view");
        let Some(s) = v.streams.get(rider) else {
            return Resume::default();
        };
        let kept = s
            .messages
            .iter()
            .filter(|(_, at, _)| at + self.retention.stream_ms > now);
        let first = kept.clone().next().map(|(seq, _, _)| *seq);
        let last = s.next_seq;
        let gap = match first {
            _ if after == 0 => None,
            Some(first) if after + 1 < first || after > last => Some(first),
            None if last > 0 && after != last => Some(last + 1),
            _ => None,
        };
        let messages = kept
            .filter(|(seq, _, _)| gap.is_some() || *seq > after)
            .map(|(seq, _, text)| (*seq, Arc::clone(text)))
            .collect();
        Resume { gap, messages }
    }

    /// The notifier of a rider's stream.
    pub fn notifier(&self, rider: &Id) -> Arc<Notify> {
        let mut v = self.view.write().expect("view");
        Arc::clone(&v.streams.entry(rider.clone()).or_default().notify)
    }
}

impl Observer for Egress {
    fn events(&self, events: &[Event]) {
        let mut v = self.view.write().expect("view");
        let mut c = self.counters.lock().expect("counters");
        // Counted per run of one kind (a batch of pings is one run).
        let mut run: Option<(&'static str, u64)> = None;
        for e in events {
            let kind = e.kind.name();
            match &mut run {
                Some((k, n)) if *k == kind => *n += 1,
                _ => {
                    if let Some((k, n)) = run.replace((kind, 1)) {
                        *c.events.entry(k.into()).or_default() += n;
                    }
                }
            }
            match &e.kind {
                EventKind::MerchantUpserted { merchant, at, open } => {
                    v.merchants.insert(merchant.clone(), (*at, *open));
                }
                EventKind::ShiftChanged {
                    rider,
                    online,
                    capacity,
                } => {
                    let r = v.riders.entry(rider.clone()).or_default();
                    r.online = *online;
                    r.capacity = *capacity;
                    r.seen = r.seen.max(e.time);
                }
                // The dataflow's trackers keep the position: nothing to do.
                EventKind::LocationPinged { .. } if self.positions.is_some() => {}
                EventKind::LocationPinged { rider, at } => {
                    let r = match v.riders.get_mut(rider) {
                        Some(r) => r,
                        None => v.riders.entry(rider.clone()).or_default(),
                    };
                    r.at = Some(*at);
                    r.seen = r.seen.max(e.time);
                }
                _ => {}
            }
        }
        if let Some((k, n)) = run {
            *c.events.entry(k.into()).or_default() += n;
        }
        if let Some(last) = events.last() {
            self.last_event.fetch_max(last.time, Ordering::AcqRel);
        }
    }

    fn decisions(&self, decisions: Vec<(Time, Output)>) {
        let mut batch = Decisions {
            stream_ms: self.retention.stream_ms,
            now: 0,
            view: self.view.write().expect("view"),
            counters: self.counters.lock().expect("counters"),
            woken: Vec::new(),
            resolved: Vec::new(),
        };
        for (t, o) in decisions {
            batch.apply(t, o);
        }
        // Callers and streams are woken once the locks are released.
        let Decisions {
            woken, resolved, ..
        } = batch;
        self.waiters
            .resolve(resolved.iter().map(|(event, verdict)| (event, *verdict)));
        for n in woken {
            n.notify_waiters();
        }
    }

    fn index(&self, changes: Vec<(IndexEntry, Time, isize)>) {
        let mut v = self.view.write().expect("view");
        v.index
            .apply(changes.iter().map(|(e, _, d)| (e, *d)), |_| {});
    }

    /// The view and counters. Orders it has handed on to the history store
    /// are not in it: the checkpoint's writer waits for them to be on disk
    /// ([`Egress::flush_history`]) before the checkpoint is, off the
    /// dataflow's thread.
    fn save(&self, _at: Time) -> Snapshot {
        let view = self.view.read().expect("view").clone();
        let counters = self.counters.lock().expect("counters").clone();
        snapshot(Saved { view, counters })
    }

    fn progress(&self, time: Time) {
        self.progress.fetch_max(time, Ordering::AcqRel);
        self.retire(time);
        if time > self.replay_until.load(Ordering::Acquire) {
            self.ready.store(true, Ordering::Release);
        }
    }
}

impl Egress {
    /// What has aged out by log time `now` leaves: closed orders past the
    /// order retention go to the history store; every [`SWEEP_EVERY`],
    /// stream messages past the stream retention and unheld empty streams
    /// go, and the history store is swept.
    fn retire(&self, now: Time) {
        let keep = self.cfg.order_retention_ms;
        let due = |v: &View| v.closing.first().is_some_and(|(t, _)| t + keep <= now);
        if due(&self.view.read().expect("view")) {
            let mut v = self.view.write().expect("view");
            let mut c = self.counters.lock().expect("counters");
            let mut leaving = Vec::new();
            while due(&v) {
                let (closed_at, id) = v.closing.pop_first().expect("checked");
                if let Some(order) = v.orders.remove(&id).map(Arc::unwrap_or_clone) {
                    *c.orders_by_state
                        .entry(order.state.name().into())
                        .or_default() -= 1;
                    c.orders_archived += 1;
                    leaving.push((id, closed_at, order));
                }
            }
            drop((v, c));
            if let Some(h) = &self.retention.history {
                h.put(leaving);
            }
        }
        let swept = self.swept_streams.load(Ordering::Acquire);
        if now >= swept + SWEEP_EVERY {
            self.swept_streams.store(now, Ordering::Release);
            let retention = self.retention.stream_ms;
            // Riders carrying nothing whom the dataflow has forgotten: with
            // the trackers' positions, those they no longer track (read
            // before the view's lock: theirs are never taken under it).
            let forget = self.cfg.rider_retention_ms;
            let tracked: Option<HashSet<Id>> = self.positions.as_ref().map(|t| {
                let v = self.view.read().expect("view");
                let idle: Vec<Id> = v
                    .riders
                    .iter()
                    .filter(|(_, r)| r.load == 0 && r.seen.saturating_add(forget) <= now)
                    .map(|(id, _)| id.clone())
                    .collect();
                drop(v);
                idle.into_iter().filter(|id| t.tracks(id)).collect()
            });
            let mut v = self.view.write().expect("view");
            v.streams.retain(|_, s| {
                s.trim(now, retention);
                // Held by a client: kept (empty) so it is woken.
                !s.messages.is_empty() || s.next_seq > 0 || Arc::strong_count(&s.notify) > 1
            });
            v.riders.retain(|id, r| {
                r.load > 0
                    || r.seen.saturating_add(forget) > now
                    || tracked.as_ref().is_some_and(|t| t.contains(id))
            });
        }
        if let Some(h) = &self.retention.history {
            if now >= self.swept_history.load(Ordering::Acquire) + SWEEP_EVERY {
                self.swept_history.store(now, Ordering::Release);
                h.sweep(now);
            }
        }
    }
}

/// A batch of decisions being applied to the view, under its locks, and
/// what to do once they are released.
struct Decisions<'e> {
    /// How long stream messages are kept, ms.
    stream_ms: Time,
    /// The log time of the decision being applied.
    now: Time,
    view: RwLockWriteGuard<'e, View>,
    counters: MutexGuard<'e, Counters>,
    /// Rider streams given a message.
    woken: Vec<Arc<Notify>>,
    /// What became of events, for the calls waiting on them.
    resolved: Vec<(Id, Verdict)>,
}

impl Decisions<'_> {
    /// Applies decision `o`, made at `t`.
    fn apply(&mut self, t: Time, o: Output) {
        self.now = t;
        *self.counters.decisions.entry(o.name().into()).or_default() += 1;
        if let Some((event, verdict)) = verdict_of(&o) {
            self.resolved.push((event.clone(), verdict));
        }
        match o {
            Output::Offered {
                order,
                rider,
                merchant,
                distance_m,
                expires_at,
                ..
            } => self.offered(&order, &rider, &merchant, distance_m, expires_at),
            Output::Withdrawn {
                order,
                rider,
                reason,
            } => self.withdrawn(&order, &rider, reason),
            Output::Unassigned {
                order,
                rider,
                reason,
            } => self.unassigned(&order, &rider, reason),
            Output::GrabDecided {
                order,
                rider,
                outcome,
                ..
            } => self.grab_decided(&order, &rider, outcome),
            Output::Assigned { order, rider } => self.assigned(&order, &rider),
            Output::Transition {
                order,
                merchant,
                from,
                to,
                reason,
                rider,
                event,
            } => {
                let step = HistoryItem {
                    state: to,
                    at: t,
                    reason: Step::Moved(reason),
                    event_id: event,
                    rejected: None,
                };
                self.transition(order, merchant, from, step, rider)
            }
            Output::Rejected {
                event,
                order: Some(order),
                reason,
            } => self.rejected(t, &order, event, reason),
            Output::Rejected { order: None, .. } => {}
        }
    }

    /// An offer: on the rider's stream.
    fn offered(
        &mut self,
        order: &Id,
        rider: &Id,
        merchant: &Id,
        distance_m: u32,
        expires_at: Time,
    ) {
        self.tell(rider, |seq| RiderMessage::Offer {
            seq,
            order_id: order,
            merchant_id: merchant,
            distance_m,
            expires_at,
        });
    }

    /// An offer taken back: on the rider's stream.
    fn withdrawn(&mut self, order: &Id, rider: &Id, reason: WithdrawReason) {
        self.tell(rider, |seq| RiderMessage::Withdrawn {
            seq,
            order_id: order,
            reason,
        });
    }

    /// An order taken from its rider: one order less on the rider, and a
    /// withdrawal on their stream.
    fn unassigned(&mut self, order: &Id, rider: &Id, reason: WithdrawReason) {
        let r = self.view.riders.entry(rider.clone()).or_default();
        r.load = r.load.saturating_sub(1);
        self.tell(rider, |seq| RiderMessage::Withdrawn {
            seq,
            order_id: order,
            reason,
        });
    }

    /// A grab decided: counted, on the rider's stream, and answered to the
    /// grab call waiting for it.
    fn grab_decided(&mut self, order: &Id, rider: &Id, outcome: GrabOutcome) {
        match outcome {
            GrabOutcome::Won => self.counters.grabs_won += 1,
            GrabOutcome::Lost(reason) => {
                let name = serde_json::to_value(reason)
                    .ok()
                    .and_then(|x| x.as_str().map(str::to_string));
                *self
                    .counters
                    .grabs_lost
                    .entry(name.unwrap_or_default())
                    .or_default() += 1;
            }
        }
        self.tell(rider, |seq| RiderMessage::GrabResult {
            seq,
            order_id: order,
            answer: GrabAnswer::from(outcome),
        });
    }

    /// An event on a known order had no effect: it stays in the order's
    /// history (a wrong rider's delivery is visible to ops).
    fn rejected(&mut self, t: Time, order: &Id, event: Id, reason: RejectReason) {
        if let Some(o) = self.view.orders.get_mut(order).map(Arc::make_mut) {
            o.history.push(HistoryItem {
                state: o.state,
                at: t,
                reason: Step::Rejected(reason),
                event_id: Some(event),
                rejected: Some(waiter::rejection(reason).0.into()),
            });
        }
    }

    /// An order now the rider's: one order more on the rider, and on their
    /// stream.
    fn assigned(&mut self, order: &Id, rider: &Id) {
        self.view.riders.entry(rider.clone()).or_default().load += 1;
        self.tell(rider, |seq| RiderMessage::Assigned {
            seq,
            order_id: order,
        });
    }

    /// An order entered `step.state`: counted by state, a delivery frees
    /// its rider, and the order's view and history follow.
    fn transition(
        &mut self,
        order: Id,
        merchant: Id,
        from: Option<OrderState>,
        step: HistoryItem,
        rider: Option<Id>,
    ) {
        let to = step.state;
        let by_state = &mut self.counters.orders_by_state;
        if let Some(from) = from {
            *by_state.entry(from.name().into()).or_default() -= 1;
        }
        *by_state.entry(to.name().into()).or_default() += 1;
        if to == OrderState::Received {
            if let Some(r) = &rider {
                let r = self.view.riders.entry(r.clone()).or_default();
                r.load = r.load.saturating_sub(1);
            }
        }
        let entry = self.view.orders.entry(order.clone()).or_insert_with(|| {
            Arc::new(OrderView {
                state: to,
                rider: None,
                merchant,
                history: Vec::new(),
            })
        });
        let entry = Arc::make_mut(entry);
        entry.state = to;
        entry.rider = rider;
        let at = step.at;
        entry.history.push(step);
        if to == OrderState::Closed {
            self.view.closing.insert((at, order));
        }
    }

    /// Adds the message `msg(seq)` to `rider`'s stream, at its next seq.
    fn tell<'a>(&mut self, rider: &Id, msg: impl FnOnce(u64) -> RiderMessage<'a>) {
        let now = self.now;
        let s = self.view.streams.entry(rider.clone()).or_default();
        s.trim(now, self.stream_ms);
        // A stream starting (over) starts at its log time: above any seq
        // it gave before (see `Stream::trim`).
        s.next_seq = if s.next_seq == 0 {
            now.max(1)
        } else {
            s.next_seq + 1
        };
        s.last_at = now;
        let text = serde_json::to_string(&msg(s.next_seq)).expect("messages serialize");
        let messages = Arc::make_mut(&mut s.messages);
        messages.push_back((s.next_seq, now, Arc::from(text)));
        while messages.len() > STREAM_KEEP {
            messages.pop_front();
        }
        self.woken.push(Arc::clone(&s.notify));
    }
}

impl Waiter for Egress {
    fn expect(&self, event: &Id, what: Expect) -> oneshot::Receiver<Verdict> {
        self.waiters.expect(event, what)
    }

    fn forget(&self, event: &Id) {
        self.waiters.forget(event);
    }
}

impl Egress {
    /// The live city for the ops console, each list capped at `cap`
    /// entries: the indexed riders (position, cell, whether carrying an
    /// order), the orders not closed (where they are: at their merchant
    /// while waiting, at their rider once assigned) and the merchants
    /// with orders waiting. Costs O(indexed riders + orders) under the
    /// view's read lock.
    pub fn city(&self, cap: usize) -> crate::ops::City {
        use crate::ops::{CityOrder, CityRider};
        let v = self.view.read().expect("view");
        let mut city = crate::ops::City::default();
        for (id, cell, at) in v.index.iter() {
            if city.riders.len() == cap {
                city.truncated = true;
                break;
            }
            let load = v.riders.get(id).map_or(0, |r| r.load);
            city.riders.push(CityRider {
                id: id.clone(),
                at,
                cell,
                load,
            });
        }
        for (id, o) in &v.orders {
            if o.state == OrderState::Closed {
                continue;
            }
            let merchant = v.merchants.get(&o.merchant).map(|&(at, _)| at);
            let rider = o
                .rider
                .as_ref()
                .and_then(|r| v.index.get(r))
                .map(|(_, at)| at);
            city.add_order(
                CityOrder {
                    id: id.clone(),
                    state: o.state,
                    merchant: o.merchant.clone(),
                    merchant_at: merchant,
                    rider_at: rider,
                },
                cap,
            );
        }
        city
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use grabflow_api::output::TransitionReason;

    fn id(s: &str) -> Id {
        Id::new(s).unwrap()
    }

    /// Order `order` (of merchant m1) moving from `from` to `to`.
    fn step(
        order: &str,
        to: OrderState,
        reason: TransitionReason,
        from: Option<OrderState>,
    ) -> Output {
        Output::Transition {
            order: id(order),
            merchant: id("m1"),
            from,
            to,
            reason,
            rider: None,
            event: None,
        }
    }

    fn offer(order: &str) -> Output {
        Output::Offered {
            order: id(order),
            rider: id("r1"),
            merchant: id("m1"),
            distance_m: 100,
            round: 0,
            expires_at: 0,
        }
    }

    fn view(stream_ms: Time, history: Option<History>) -> Arc<Egress> {
        let cfg = DispatchConfig {
            order_retention_ms: 2_000,
            ..DispatchConfig::default()
        };
        let retention = Retention { stream_ms, history };
        Egress::new(cfg, 0, None, retention)
    }

    fn seqs(r: &Resume) -> Vec<u64> {
        r.messages.iter().map(|(s, _)| *s).collect()
    }

    #[test]
    fn the_ring_is_bounded_by_count_and_a_resume_past_it_gets_a_gap() {
        let e = view(60_000, None);
        let offers = (0..STREAM_KEEP + 5).map(|i| (1_000, offer(&format!("o{i}"))));
        e.decisions(offers.collect());
        // The first message is at its log time; the first five are gone.
        let r1 = id("r1");
        let all = e.messages_after(&r1, 0);
        assert_eq!(all.gap, None, "a client from the start has nothing to miss");
        assert_eq!(all.messages.len(), STREAM_KEEP);
        assert_eq!(all.messages[0].0, 1_005);
        let resumed = e.messages_after(&r1, 1_002);
        assert_eq!(resumed.gap, Some(1_005));
        assert_eq!(seqs(&resumed).len(), STREAM_KEEP);
        // From a seq still kept: no gap.
        let resumed = e.messages_after(&r1, 1_004);
        assert_eq!((resumed.gap, resumed.messages.len()), (None, STREAM_KEEP));
        // A seq beyond the last given is not one of this stream: a gap.
        assert_eq!(e.messages_after(&r1, 99_999).gap, Some(1_005));
    }

    #[test]
    fn the_ring_is_bounded_by_time_and_starts_over_above_its_old_seqs() {
        let e = view(1_000, None);
        let r1 = id("r1");
        e.decisions(vec![(1_000, offer("o1")), (1_500, offer("o2"))]);
        Observer::progress(&*e, 1_600);
        assert_eq!(seqs(&e.messages_after(&r1, 0)), vec![1_000, 1_001]);
        // o1 is a second old: not served, then trimmed.
        Observer::progress(&*e, 2_100);
        let r = e.messages_after(&r1, 1_000);
        assert_eq!((r.gap, seqs(&r)), (None, vec![1_001]));
        let r = e.messages_after(&r1, 999);
        assert_eq!((r.gap, seqs(&r)), (Some(1_001), vec![1_001]));
        // Everything old, the stream leaves the table...
        Observer::progress(&*e, 3_000);
        assert_eq!(e.stream_sizes(), (0, 0));
        // ...and its next message starts above every seq it gave.
        e.decisions(vec![(5_000, offer("o3"))]);
        Observer::progress(&*e, 5_001);
        let r = e.messages_after(&r1, 1_001);
        assert_eq!((r.gap, seqs(&r)), (Some(5_000), vec![5_000]));
        // The same seqs when no sweep ran in between (a replay).
        let replayed = view(1_000, None);
        replayed.decisions(vec![
            (1_000, offer("o1")),
            (1_500, offer("o2")),
            (5_000, offer("o3")),
        ]);
        Observer::progress(&*replayed, 5_001);
        assert_eq!(seqs(&replayed.messages_after(&r1, 0)), vec![5_000]);
    }

    /// What a client can see of `e`: orders, streams from every seq, sizes
    /// and counters.
    fn seen(e: &Egress, orders: &[&str], after: &[u64]) -> String {
        let mut out = Vec::new();
        for o in orders {
            out.push(match e.lookup(&id(o)).unwrap() {
                Lookup::Found(o) => serde_json::to_string(&o).unwrap(),
                other => format!("{other:?}"),
            });
        }
        for a in after {
            let r = e.messages_after(&id("r1"), *a);
            out.push(format!("{:?} {:?}", r.gap, r.messages));
        }
        let c = e.counters();
        out.push(format!(
            "{:?} {:?} {} {}",
            e.sizes(),
            c.orders_by_state,
            c.orders_archived,
            serde_json::to_string(&c.decisions).unwrap()
        ));
        out.join("\n")
    }

    #[test]
    fn a_restore_and_the_decisions_after_it_see_what_an_unstopped_run_sees() {
        let placed = |o: &str| step(o, OrderState::Created, TransitionReason::Placed, None);
        let closed = |o: &str| {
            let from = Some(OrderState::Created);
            step(o, OrderState::Closed, TransitionReason::Cancelled, from)
        };
        let before = vec![
            (1_000, placed("o1")),
            (1_000, offer("o1")),
            (1_200, placed("o2")),
            (1_500, closed("o1")),
            (1_600, offer("o2")),
        ];
        let after = vec![
            (2_500, closed("o2")),
            (2_600, offer("o3")),
            (4_000, placed("o4")),
            (4_200, offer("o4")),
        ];
        let orders = ["o1", "o2", "o4"];
        let seqs = [0, 999, 1_000, 1_001, 2_599, 4_199, 9_999];
        // One run, checkpointed at 2 000 and going on.
        let unstopped = view(1_500, None);
        unstopped.decisions(before.clone());
        Observer::progress(&*unstopped, 1_800);
        let saved = unstopped.save(2_000)();
        Observer::progress(&*unstopped, 2_000);
        unstopped.decisions(after.clone());
        for t in [3_000, 3_600, 4_300] {
            Observer::progress(&*unstopped, t);
        }
        // Another restored from the checkpoint, given what followed it in
        // one go (as a replay does).
        let restored = view(1_500, None);
        restored.restore(&saved).unwrap();
        restored.decisions(after);
        Observer::progress(&*restored, 4_300);
        assert_eq!(
            seen(&restored, &orders, &seqs),
            seen(&unstopped, &orders, &seqs)
        );
        // Both have let o1 go (closed at 1 500, order retention 2 s).
        assert_eq!(unstopped.counters().orders_archived, 1);
    }

    #[test]
    fn a_closed_order_leaves_the_view_for_the_history_store() {
        let dir = std::env::temp_dir().join(format!("grabflow-view-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let e = view(1_000, Some(History::open(&dir, 5_000).unwrap()));
        e.decisions(vec![
            (
                1_000,
                step("o1", OrderState::Created, TransitionReason::Placed, None),
            ),
            (
                1_500,
                step(
                    "o1",
                    OrderState::Closed,
                    TransitionReason::Cancelled,
                    Some(OrderState::Created),
                ),
            ),
        ]);
        Observer::progress(&*e, 3_000);
        assert_eq!(e.sizes().3, 1, "closed 1.5 s ago: still in the view");
        Observer::progress(&*e, 3_500);
        assert_eq!(e.sizes().3, 0, "closed 2 s ago: on disk");
        assert_eq!(e.counters().orders_archived, 1);
        let saved = e.save(3_500)();
        match e.lookup(&id("o1")).unwrap() {
            Lookup::Found(o) => assert_eq!(o.history.len(), 2),
            other => panic!("{other:?}"),
        }
        Observer::progress(&*e, 6_500);
        assert!(matches!(e.lookup(&id("o1")).unwrap(), Lookup::Expired));
        assert!(matches!(e.lookup(&id("o9")).unwrap(), Lookup::Unknown));
        // A view restored from the checkpoint holds no copy of it.
        let restored = view(1_000, None);
        restored.restore(&saved).unwrap();
        assert_eq!(restored.sizes().3, 0);
        e.close_history();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
