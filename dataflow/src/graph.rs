//! The dispatch dataflow: pure functions from collections to collections.
//!
//! ```text
//! events ─┬─(pings)──────────────┬─ track_riders ──▶ index ─┐
//!         └─(the rest)── dedup ──┴─(shifts)                  │
//!                               └─(all but pings)────────────┴─ decide ──▶ outputs
//! ```
//!
//! Every operator buffers its input by log millisecond and handles a
//! millisecond only once the input frontier has passed it, so all events of a
//! millisecond are seen together and ordered by log offset. Timers (grab
//! timeouts, promised-time deadlines, rider silence) are capabilities held
//! for a future millisecond: they fire when the log's clock passes them.
//!
//! `dedup` is partitioned by event id and `track_riders` by rider id, so the
//! ping traffic spreads over all workers; `decide` runs on one worker because
//! grab races and rider capacity are sequential by definition.

use crate::checkpoint::{snapshot, Checkpointing, DataflowState, Snapshot, Stateful};
use crate::dedup::Deduper;
use crate::dispatcher::Dispatcher;
use crate::riders::{rider_route, RiderTables, RiderTracker};
use crate::stats::{StateLog, StateSizes};
use crate::IndexEntry;
use differential_dataflow::collection::vec::Collection as VecCollection;
use differential_dataflow::AsCollection;
use grabflow_api::{DispatchConfig, Event, EventKind, Output, Time};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::rc::Rc;
use std::sync::Arc;
use timely::communication::Pull;
use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::channels::Message;
use timely::dataflow::operators::core::OkErr;
use timely::dataflow::operators::generic::operator::Operator;
use timely::dataflow::operators::generic::{InputHandleCore, OutputBuilderSession, Session};
use timely::dataflow::operators::{Capability, InputCapability};
use timely::scheduling::Activator;

/// The log: every event at its log time, each with multiplicity one.
pub type Events<'s> = VecCollection<'s, Time, Event>;
/// The index of available riders by cell.
pub type Index<'s> = VecCollection<'s, Time, IndexEntry>;
/// Dispatch decisions, each inserted at the millisecond it was made.
pub type Outputs<'s> = VecCollection<'s, Time, Output>;

/// What the dispatch dataflow produces.
pub struct Dispatch<'s> {
    /// Riders on shift and pinged within the TTL, by H3 cell.
    pub index: Index<'s>,
    /// Every decision, as an append-only collection (the change stream).
    pub outputs: Outputs<'s>,
}

/// Builds the whole dispatch computation over the event log.
pub fn dispatch<'s>(events: Events<'s>, cfg: &DispatchConfig) -> Dispatch<'s> {
    dispatch_sharing(events, cfg, None, None)
}

/// What the stateful operators of one worker need to take part in
/// checkpoints (see [`crate::checkpoint`]), and to start from one.
#[derive(Clone)]
pub struct Checkpoints {
    /// Where checkpoints are asked for and gathered.
    pub checkpointing: Arc<Checkpointing>,
    /// The checkpoint to start from, if any.
    pub restore: Option<Arc<DataflowState>>,
    /// The activators of this worker's stateful operators: poked when a
    /// checkpoint is asked for, so that an idle operator saves too.
    pub activators: Rc<RefCell<Vec<Activator>>>,
}

/// [`dispatch`], with the rider trackers kept in `riders` (one per worker of
/// the scope) where readers outside the dataflow can see them, and taking
/// part in `checkpoints`.
pub fn dispatch_sharing<'s>(
    events: Events<'s>,
    cfg: &DispatchConfig,
    riders: Option<&RiderTables>,
    checkpoints: Option<&Checkpoints>,
) -> Dispatch<'s> {
    // One pass that moves each event straight into its side's output
    // (pings are most of the traffic: no copy, no intermediate buffer).
    let (pings, rest) = events.inner.ok_err(|(e, t, d): (Event, Time, isize)| {
        if matches!(e.kind, EventKind::LocationPinged { .. }) {
            Ok((e, t, d))
        } else {
            Err((e, t, d))
        }
    });
    let (pings, rest) = (pings.as_collection(), rest.as_collection());
    let order_events = dedup(rest, cfg.dedup_window_ms, checkpoints);
    let shifts = order_events.clone().filter(|e| e.kind.is_rider_state());
    let index = track_riders(pings.concat(shifts), cfg, riders, checkpoints);
    let outputs = decide(index.clone(), order_events, cfg.clone(), checkpoints);
    Dispatch { index, outputs }
}

/// A stable hash for routing records to workers (the same in every process).
fn route<K: Hash + ?Sized>(key: &K) -> u64 {
    let mut h = rustc_hash::FxHasher::default();
    key.hash(&mut h);
    h.finish()
}

/// Work buffered per log millisecond, and one capability at or before the
/// earliest of them. Records carry their own millisecond and may be sent
/// under an earlier capability, so a whole batch of milliseconds goes out
/// under one: progress tracking sees one timestamp per batch, not per
/// millisecond.
///
/// The buffers of handled milliseconds are kept for reuse: a busy
/// millisecond's buffer is large, and a fresh one per millisecond would be
/// grown (and its memory faulted in) anew each time.
struct Pending<W> {
    work: BTreeMap<Time, W>,
    cap: Option<Capability<Time>>,
    spare: Vec<W>,
}

/// A millisecond's buffered work, emptied for reuse.
trait Work: Default {
    fn clear(&mut self);
    /// Records it has room for.
    fn room(&self) -> usize;
    /// Records it holds.
    fn records(&self) -> usize;
}

impl<T> Work for Vec<T> {
    fn clear(&mut self) {
        Vec::clear(self);
    }
    fn room(&self) -> usize {
        self.capacity()
    }
    fn records(&self) -> usize {
        self.len()
    }
}

/// Spare buffers kept per operator (one per millisecond handled in a step).
const SPARE: usize = 4;
/// The largest buffer kept (in records): a rare huge millisecond, as in a
/// replay, gives its memory back.
const SPARE_ROOM: usize = 1 << 16;

impl<W: Work> Pending<W> {
    fn new() -> Self {
        Pending {
            work: BTreeMap::new(),
            cap: None,
            spare: Vec::new(),
        }
    }

    /// Gives back a handled millisecond's buffer, to be reused.
    fn recycle(&mut self, mut work: W) {
        if self.spare.len() < SPARE && work.room() <= SPARE_ROOM {
            work.clear();
            self.spare.push(work);
        }
    }

    /// The work slot of millisecond `t`, received under `cap`.
    fn slot(&mut self, cap: &InputCapability<Time>, t: Time) -> &mut W {
        let earlier = match (&self.cap, cap.least()) {
            (None, _) => true,
            (Some(held), Some(c)) => c < held.time(),
            (Some(_), None) => false,
        };
        if earlier {
            self.cap = cap.retain_least(0).or(self.cap.take());
        }
        let spare = &mut self.spare;
        self.work
            .entry(t)
            .or_insert_with(|| spare.pop().unwrap_or_default())
    }

    /// Makes sure millisecond `t` is visited (for a timer); `t` is later than
    /// the millisecond being handled, so the held capability covers it.
    fn wake_at(&mut self, t: Time) {
        self.work.entry(t).or_default();
    }

    /// The earliest buffered millisecond, if `ready` says its input is complete.
    fn pop_ready(&mut self, ready: impl Fn(&Time) -> bool) -> Option<(Time, W)> {
        let entry = self.work.first_entry()?;
        if !ready(entry.key()) {
            return None;
        }
        Some(entry.remove_entry())
    }

    /// Records waiting for their millisecond to be complete.
    fn buffered(&self) -> usize {
        self.work.values().map(Work::records).sum()
    }

    /// After a batch: hold the capability only as far back as still needed.
    fn downgrade(&mut self) {
        match (self.work.keys().next(), &mut self.cap) {
            (Some(t), Some(cap)) => cap.downgrade(t),
            (None, cap) => *cap = None,
            (Some(_), None) => unreachable!("pending work always has a capability"),
        }
    }
}

type Builder<D> = CapacityContainerBuilder<Vec<(D, Time, isize)>>;
/// Where an operator emits a millisecond's records.
type Emit<'a, 'b, D> = Session<'a, 'b, Time, Builder<D>, Capability<Time>>;

/// Lets an operator's [`PerMillisecond::handle`] ask for a later millisecond
/// to be visited (a timer).
struct Wake<'p, W>(&'p mut Pending<W>);

impl<W: Work> Wake<'_, W> {
    /// Visits millisecond `t` (later than the one being handled).
    fn at(&mut self, t: Time) {
        self.0.wake_at(t);
    }
}

/// What one of the operators here does with each complete millisecond of
/// its input; [`MillisecondOperator`] does the rest.
trait PerMillisecond {
    /// One millisecond of input.
    type Work: Work;
    /// The records it emits.
    type Out: Clone + 'static;
    /// Handles millisecond `t`: emits its records, at `t`, into `out`, and
    /// sets its timers with `wake`. Gives the work's buffer back for reuse.
    fn handle(
        &mut self,
        t: Time,
        work: Self::Work,
        out: &mut Emit<'_, '_, Self::Out>,
        wake: &mut Wake<'_, Self::Work>,
    ) -> Self::Work;
    /// What it holds, for the state figures (the skeleton adds what is
    /// buffered).
    fn sizes(&self) -> StateSizes;
    /// Its state between milliseconds, for a checkpoint: a copy, encoded
    /// (postcard) later off the worker.
    fn save(&self) -> Snapshot;
    /// The later milliseconds its state has timers at (a restored state's).
    fn timers(&mut self) -> Vec<Time>;
}

/// An operator's share in checkpoints: which it is, on which worker, and
/// the last checkpoint it saved its state for.
struct Saving {
    checkpointing: Arc<Checkpointing>,
    op: Stateful,
    worker: usize,
    saved: Time,
}

impl Saving {
    /// The checkpoint asked for and not yet saved by this operator.
    fn wanted(&self) -> Option<Time> {
        self.checkpointing
            .requested()
            .filter(|at| *at != self.saved)
    }
}

/// The skeleton every operator here shares, around its [`PerMillisecond`]
/// part: input buffered by millisecond ([`Pending`]); each millisecond
/// handled, in time order, once every input's frontier has passed it; the
/// capability then held only as far back as still needed; and the state
/// figures reported.
struct MillisecondOperator<H: PerMillisecond> {
    part: H,
    pending: Pending<H::Work>,
    state: StateLog,
    saving: Option<Saving>,
}

impl<H: PerMillisecond> MillisecondOperator<H> {
    fn new(part: H, state: StateLog) -> Self {
        MillisecondOperator {
            part,
            pending: Pending::new(),
            state,
            saving: None,
        }
    }

    /// Takes part in `checkpoints` as `op` on `worker` (poked by `activator`),
    /// starting, if restored, at its time with its `part`'s timers held with
    /// `cap`, the operator's first capability.
    fn saving(
        mut self,
        checkpoints: Option<&Checkpoints>,
        op: Stateful,
        (worker, activator): (usize, Activator),
        mut cap: Capability<Time>,
    ) -> Self {
        let Some(c) = checkpoints else { return self };
        c.activators.borrow_mut().push(activator);
        self.saving = Some(Saving {
            checkpointing: Arc::clone(&c.checkpointing),
            op,
            worker,
            saved: 0,
        });
        if let Some(restored) = &c.restore {
            let timers = self.part.timers();
            if let Some(first) = timers.iter().min() {
                cap.downgrade(&restored.at.max(*first));
                self.pending.cap = Some(cap);
                for t in timers {
                    self.pending.wake_at(t);
                }
            }
        }
        self
    }

    /// Saves the part's state for the checkpoint at `at`.
    fn save(&mut self, at: Time) {
        if let Some(s) = &mut self.saving {
            s.saved = at;
            s.checkpointing.part(at, s.op, s.worker, self.part.save());
        }
    }

    /// Files every record arrived on `input` in its millisecond's work, with
    /// `put` (given the work, the record and its diff).
    fn absorb<D, P>(
        &mut self,
        input: &mut InputHandleCore<Time, Vec<(D, Time, isize)>, P>,
        mut put: impl FnMut(&mut H::Work, D, isize),
    ) where
        P: Pull<Message<Time, Vec<(D, Time, isize)>>>,
    {
        let pending = &mut self.pending;
        input.for_each_stamp(|cap, data| {
            for batch in data {
                for (record, t, diff) in batch.drain(..) {
                    put(pending.slot(&cap, t), record, diff);
                }
            }
        });
    }

    /// Handles every buffered millisecond `ready` says is complete, in time
    /// order, emitting into `output`.
    fn step(
        &mut self,
        output: &mut OutputBuilderSession<'_, Time, Builder<H::Out>>,
        ready: impl Fn(&Time) -> bool,
    ) {
        // A checkpoint asked for is saved before the first millisecond at or
        // after its time is handled, or once every one before it has been.
        let mut wanted = self.saving.as_ref().and_then(Saving::wanted);
        if let Some(cap) = self.pending.cap.clone() {
            let mut session = output.session(&cap);
            while let Some((t, work)) = self.pending.pop_ready(&ready) {
                if let Some(at) = wanted.filter(|at| t >= *at) {
                    self.save(at);
                    wanted = None;
                }
                let work = self
                    .part
                    .handle(t, work, &mut session, &mut Wake(&mut self.pending));
                self.pending.recycle(work);
            }
            drop(session);
            self.pending.downgrade();
        }
        if let Some(at) = wanted.filter(|at| ready(&at.saturating_sub(1))) {
            self.save(at);
        }
        let (part, pending) = (&self.part, &self.pending);
        self.state.report(|| {
            let mut sizes = part.sizes();
            sizes.push(("buffered", pending.buffered()));
            sizes
        });
    }
}

/// Drops events whose id was already seen within the window (see
/// [`Deduper`]). Pings do not come through here: applying one twice changes
/// nothing, and they are most of the traffic.
pub fn dedup<'s>(
    events: Events<'s>,
    window: Time,
    checkpoints: Option<&Checkpoints>,
) -> Events<'s> {
    let pact = Exchange::new(|(e, _, _): &(Event, Time, isize)| route(&e.id));
    let scope = events.inner.scope();
    let (me, peers) = (scope.index(), scope.peers());
    let checkpoints = checkpoints.cloned();
    events
        .inner
        .unary_frontier::<Builder<Event>, _, _, _>(pact, "Dedup", move |cap, info| {
            let state = StateLog::new(scope.worker(), &info.address);
            let deduper = match checkpoints.as_ref().and_then(|c| c.restore.as_ref()) {
                Some(r) => r
                    .dedup(window, |id| route(id) % peers as u64 == me as u64)
                    .expect("a checkpoint checked on load"),
                None => Deduper::new(window),
            };
            let activator = (me, scope.activator_for(info.address.clone()));
            let mut op = MillisecondOperator::new(Dedup(deduper), state).saving(
                checkpoints.as_ref(),
                Stateful::Dedup,
                activator,
                cap,
            );
            move |(input, frontier), output| {
                op.absorb(input, |batch, event, diff| {
                    if diff > 0 {
                        batch.push(event);
                    }
                });
                op.step(output, |t| !frontier.less_equal(t));
            }
        })
        .as_collection()
}

/// [`dedup`]'s millisecond: the first occurrence of each id goes on.
struct Dedup(Deduper);

impl PerMillisecond for Dedup {
    type Work = Vec<Event>;
    type Out = Event;

    fn handle(
        &mut self,
        t: Time,
        batch: Vec<Event>,
        out: &mut Emit<'_, '_, Event>,
        _: &mut Wake<'_, Vec<Event>>,
    ) -> Vec<Event> {
        let mut admitted = self.0.admit(t, batch);
        out.give_iterator(admitted.drain(..).map(|e| (e, t, 1)));
        admitted
    }

    fn sizes(&self) -> StateSizes {
        vec![("ids", self.0.len())]
    }

    fn save(&self) -> Snapshot {
        snapshot(self.0.save())
    }

    fn timers(&mut self) -> Vec<Time> {
        Vec::new()
    }
}

/// Turns pings and shifts into the index of available riders (see
/// [`RiderTracker`]); each worker's tracker is
/// its own, or its slot of `shared` (which must have one per worker of the
/// scope).
pub fn track_riders<'s>(
    events: Events<'s>,
    cfg: &DispatchConfig,
    shared: Option<&RiderTables>,
    checkpoints: Option<&Checkpoints>,
) -> Index<'s> {
    let (me, peers) = (events.inner.scope().index(), events.inner.scope().peers());
    let (tables, slot) = match shared {
        Some(t) => {
            assert_eq!(t.workers(), peers, "one shared rider tracker per worker");
            (t.clone(), me)
        }
        None => (RiderTables::new(1, cfg), 0),
    };
    let pact =
        Exchange::new(|(e, _, _): &(Event, Time, isize)| e.kind.rider().map_or(0, rider_route));
    let scope = events.inner.scope();
    let checkpoints = checkpoints.cloned();
    let limits = (cfg.rider_ttl_ms, cfg.rider_retention_ms);
    events
        .inner
        .unary_frontier::<Builder<IndexEntry>, _, _, _>(pact, "TrackRiders", move |cap, info| {
            let state = StateLog::new(scope.worker(), &info.address);
            if let Some(r) = checkpoints.as_ref().and_then(|c| c.restore.as_ref()) {
                let mine = |rider: &grabflow_api::Id| RiderTables::worker_of(rider, peers) == me;
                let tracker: RiderTracker = r
                    .tracker(limits, mine)
                    .expect("a checkpoint checked on load");
                tables.replace(slot, tracker);
            }
            let part = TrackRiders {
                tables,
                slot,
                changes: Vec::new(),
            };
            let activator = (me, scope.activator_for(info.address.clone()));
            let mut op = MillisecondOperator::new(part, state).saving(
                checkpoints.as_ref(),
                Stateful::TrackRiders,
                activator,
                cap,
            );
            move |(input, frontier), output| {
                op.absorb(input, |batch, event, _| batch.push(event));
                op.step(output, |t| !frontier.less_equal(t));
            }
        })
        .as_collection()
}

/// [`track_riders`]' millisecond: this worker's riders' pings and shifts
/// applied to its tracker, and the index changes they make.
struct TrackRiders {
    tables: RiderTables,
    /// This worker's tracker in `tables`.
    slot: usize,
    /// The index changes of the millisecond being handled.
    changes: Vec<(IndexEntry, isize)>,
}

impl PerMillisecond for TrackRiders {
    type Work = Vec<Event>;
    type Out = IndexEntry;

    fn handle(
        &mut self,
        t: Time,
        mut batch: Vec<Event>,
        out: &mut Emit<'_, '_, IndexEntry>,
        wake: &mut Wake<'_, Vec<Event>>,
    ) -> Vec<Event> {
        // Offsets are unique: an unstable sort gives the one order.
        batch.sort_unstable_by_key(|e| e.offset);
        // Locked a millisecond at a time: a replay's long run of
        // milliseconds never keeps a rider query waiting.
        let mut tracker = self.tables.lock(self.slot);
        for event in &batch {
            tracker.apply(&event.kind, t);
        }
        tracker.settle(t, &mut self.changes);
        for at in tracker.take_new_check_times() {
            wake.at(at);
        }
        out.give_iterator(self.changes.drain(..).map(|(e, d)| (e, t, d)));
        drop(tracker);
        batch
    }

    fn sizes(&self) -> StateSizes {
        self.tables.lock(self.slot).sizes()
    }

    fn save(&self) -> Snapshot {
        snapshot(self.tables.lock(self.slot).save())
    }

    fn timers(&mut self) -> Vec<Time> {
        self.tables.lock(self.slot).take_new_check_times()
    }
}

/// The per-millisecond input of `decide`.
#[derive(Default)]
struct DecideWork {
    index: Vec<(IndexEntry, isize)>,
    events: Vec<Event>,
}

impl Work for DecideWork {
    fn clear(&mut self) {
        self.index.clear();
        self.events.clear();
    }
    fn room(&self) -> usize {
        self.index.capacity() + self.events.capacity()
    }
    fn records(&self) -> usize {
        self.index.len() + self.events.len()
    }
}

/// Runs the decision core (see [`Dispatcher`]) over the index and the order events.
pub fn decide<'s>(
    index: Index<'s>,
    events: Events<'s>,
    cfg: DispatchConfig,
    checkpoints: Option<&Checkpoints>,
) -> Outputs<'s> {
    let to_one = Exchange::new(|_: &(IndexEntry, Time, isize)| 0);
    let to_one_too = Exchange::new(|_: &(Event, Time, isize)| 0);
    let scope = index.inner.scope();
    let me = scope.index();
    let checkpoints = checkpoints.cloned();
    index
        .inner
        .binary_frontier::<_, Builder<Output>, _, _, _, _>(
            events.inner,
            to_one,
            to_one_too,
            "Decide",
            move |cap, info| {
                let state = StateLog::new(scope.worker(), &info.address);
                let core = match checkpoints.as_ref().and_then(|c| c.restore.as_ref()) {
                    // It runs on worker 0: the others stay empty.
                    Some(r) if me == 0 => r.dispatcher(cfg).expect("a checkpoint checked on load"),
                    _ => Dispatcher::new(cfg),
                };
                let part = Decide {
                    core,
                    out: Vec::new(),
                };
                let activator = (me, scope.activator_for(info.address.clone()));
                let mut op = MillisecondOperator::new(part, state).saving(
                    checkpoints.as_ref(),
                    Stateful::Decide,
                    activator,
                    cap,
                );
                move |(index, index_frontier), (events, event_frontier), output| {
                    op.absorb(index, |work, entry, diff| work.index.push((entry, diff)));
                    op.absorb(events, |work, event, _| work.events.push(event));
                    op.step(output, |t| {
                        !index_frontier.less_equal(t) && !event_frontier.less_equal(t)
                    });
                }
            },
        )
        .as_collection()
}

/// [`decide`]'s millisecond: the decision core's per-millisecond protocol
/// (see [`crate::dispatcher`]).
struct Decide {
    core: Dispatcher,
    /// The decisions of the millisecond being handled.
    out: Vec<Output>,
}

impl PerMillisecond for Decide {
    type Work = DecideWork;
    type Out = Output;

    fn handle(
        &mut self,
        t: Time,
        mut work: DecideWork,
        out: &mut Emit<'_, '_, Output>,
        wake: &mut Wake<'_, DecideWork>,
    ) -> DecideWork {
        let core = &mut self.core;
        work.events.sort_unstable_by_key(|e| e.offset);
        core.apply_index(&work.index, t);
        for e in &work.events {
            if let EventKind::ShiftChanged {
                rider, capacity, ..
            } = &e.kind
            {
                core.apply_capacity(rider, *capacity);
            }
        }
        core.fire_timers(t, &mut self.out);
        for e in &work.events {
            core.apply_event(e, t, &mut self.out);
        }
        core.offer_pass(t, &mut self.out);
        for at in core.take_new_timer_times() {
            wake.at(at);
        }
        out.give_iterator(self.out.drain(..).map(|o| (o, t, 1)));
        work
    }

    fn sizes(&self) -> StateSizes {
        self.core.sizes()
    }

    fn save(&self) -> Snapshot {
        snapshot(self.core.clone())
    }

    fn timers(&mut self) -> Vec<Time> {
        self.core.take_new_timer_times()
    }
}
