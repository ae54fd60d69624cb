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

use foldhash::HashMap;
use grabflow_api::output::{RejectReason, TransitionReason, WithdrawReason};
use grabflow_api::{
    Coord, DispatchConfig, Event, EventKind, GrabOutcome, Id, OrderState, Output, Time,
};
use grabflow_dataflow::geo_index::GeoIndex;
use grabflow_dataflow::riders::RiderTables;
use grabflow_dataflow::runtime::Observer;
use grabflow_dataflow::IndexEntry;
use grabflow_http::extract::IdSchema;
use grabflow_http::waiter::{self, verdict_of, Expect, GrabAnswer, Verdict, Waiter, Waiting};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::borrow::Cow;
use std::collections::{BTreeMap, VecDeque};
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
}

/// Messages kept per rider for reconnecting clients.
pub const STREAM_KEEP: usize = 2_000;

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
#[derive(Default, Serialize, Deserialize)]
struct Stream {
    next_seq: u64,
    messages: VecDeque<(u64, Arc<str>)>,
    #[serde(skip)]
    notify: Arc<Notify>,
}

/// What the view keeps; saved whole in a checkpoint (with the counters).
#[derive(Default, Serialize, Deserialize)]
struct View {
    riders: HashMap<Id, RiderView>,
    merchants: HashMap<Id, (Coord, bool)>,
    orders: HashMap<Id, OrderView>,
    index: GeoIndex,
    streams: HashMap<Id, Stream>,
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
    /// Orders by current state.
    pub orders_by_state: BTreeMap<Name, i64>,
}

/// [`Saved`], by reference (written without copying the view).
#[derive(Serialize)]
struct SavedRef<'a> {
    view: &'a View,
    counters: &'a Counters,
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
}

impl Egress {
    /// An empty view; ready once the dataflow passes `replay_until` (the last
    /// replayed event's time; 0 for an empty log). `positions` are the
    /// dataflow's rider trackers when they run in this process (riders'
    /// positions are then read there); with `None`, the view keeps each
    /// rider's last ping itself.
    pub fn new(
        cfg: DispatchConfig,
        replay_until: Time,
        positions: Option<RiderTables>,
    ) -> Arc<Egress> {
        Arc::new(Egress {
            positions,
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

    /// An order, if the dataflow has seen it placed.
    pub fn order(&self, id: &Id) -> Option<OrderView> {
        self.view.read().expect("view").orders.get(id).cloned()
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

    /// Messages of `rider` with seq above `after`. To miss nothing, a caller
    /// enables its wait on [`Egress::notifier`] before calling.
    pub fn messages_after(&self, rider: &Id, after: u64) -> Vec<(u64, Arc<str>)> {
        let v = self.view.read().expect("view");
        v.streams
            .get(rider)
            .map(|s| {
                s.messages
                    .iter()
                    .filter(|(seq, _)| *seq > after)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
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
                }
                // The dataflow's trackers keep the position: nothing to do.
                EventKind::LocationPinged { .. } if self.positions.is_some() => {}
                EventKind::LocationPinged { rider, at } => match v.riders.get_mut(rider) {
                    Some(r) => r.at = Some(*at),
                    None => {
                        v.riders.entry(rider.clone()).or_default().at = Some(*at);
                    }
                },
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

    fn save(&self, _at: Time) -> Vec<u8> {
        let view = self.view.read().expect("view");
        let counters = self.counters.lock().expect("counters");
        let saved = SavedRef {
            view: &view,
            counters: &counters,
        };
        postcard::to_allocvec(&saved).expect("the view serializes")
    }

    fn progress(&self, time: Time) {
        self.progress.fetch_max(time, Ordering::AcqRel);
        if time > self.replay_until.load(Ordering::Acquire) {
            self.ready.store(true, Ordering::Release);
        }
    }
}

/// A batch of decisions being applied to the view, under its locks, and
/// what to do once they are released.
struct Decisions<'e> {
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
        if let Some(o) = self.view.orders.get_mut(order) {
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
        let entry = self.view.orders.entry(order).or_insert_with(|| OrderView {
            state: to,
            rider: None,
            merchant,
            history: Vec::new(),
        });
        entry.state = to;
        entry.rider = rider;
        entry.history.push(step);
    }

    /// Adds the message `msg(seq)` to `rider`'s stream, at its next seq.
    fn tell<'a>(&mut self, rider: &Id, msg: impl FnOnce(u64) -> RiderMessage<'a>) {
        let s = self.view.streams.entry(rider.clone()).or_default();
        s.next_seq += 1;
        let text = serde_json::to_string(&msg(s.next_seq)).expect("messages serialize");
        s.messages.push_back((s.next_seq, Arc::from(text)));
        while s.messages.len() > STREAM_KEEP {
            s.messages.pop_front();
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
