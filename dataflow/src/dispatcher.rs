//! The decision core: orders, offers, grab races, loads and timers.
//!
//! [`Dispatcher`] holds the state that every decision needs at once — the
//! geo index of available riders, each rider's load and capacity, each
//! order's state — because those decisions are sequential by definition: the
//! first valid grab wins, and a win changes the rider's load, which decides
//! the next grab. The `decide` operator in [`crate::graph`] owns one
//! `Dispatcher` and calls it once per log millisecond, in this order:
//!
//! 1. [`Dispatcher::apply_index`] and [`Dispatcher::apply_capacity`]: rider
//!    state as of the end of the millisecond (all pings, shifts and expiries).
//! 2. [`Dispatcher::fire_timers`]: grab timeouts, promised-time deadlines,
//!    and retention: closed orders and idle riders forgotten.
//! 3. [`Dispatcher::apply_event`]: order events, in log-offset order.
//! 4. [`Dispatcher::offer_pass`]: every order that may have gained a
//!    candidate is offered to its K nearest available riders.
//!
//! Waiting orders are registered on the cells their radius reaches, so a
//! rider appearing (or freeing capacity) wakes only the orders near it.
//!
//! Retention keeps the state bounded by what is live: a closed order is
//! forgotten `order_retention_ms` after it closed (an event naming it is then
//! `unknown_order`, and its id may be placed again: each placement has a
//! serial number, so the timers of a forgotten order never touch a new one),
//! and a rider's load and capacity are forgotten once it has carried nothing
//! and been out of the index for `rider_retention_ms`. The latter is never
//! seen in a decision: the rider trackers forget such a rider's shift no
//! later, so it can only come back through a new shift, which sets its
//! capacity again.

use crate::geo_index::{cells_within, GeoIndex};
use crate::IndexEntry;
use grabflow_api::output::TransitionReason as Why;
use grabflow_api::{
    Coord, DispatchConfig, Event, EventKind, GrabOutcome, Id, LossReason, OrderState, Output,
    RejectReason, Time, WithdrawReason,
};
use rustc_hash::{FxHashMap, FxHashSet};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// A timer the dispatcher set for itself, on an order (or a rider). Timers
/// due in the same millisecond fire ordered by id, then deadline before
/// timeout before forgetting. Order timers name the placement they were set
/// for (its serial number): one of a forgotten order does nothing.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
enum Timer {
    /// The promised delivery time of placement `.0`.
    Deadline(u64),
    /// The end of placement `.0`'s offer round with offer sequence `.1`.
    GrabTimeout(u64, u32),
    /// The order's retention after it closed is over.
    Forget,
    /// The rider may have been idle for its retention.
    ForgetRider,
}

/// A rider as the decision core sees it.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct RiderLoad {
    /// Orders the rider may carry (last shift's value, or the default).
    capacity: u32,
    /// Orders currently assigned and not yet delivered.
    load: u32,
    /// When it last left the index, changed shift or was freed: it is
    /// forgotten once idle (out of the index, no load) for the retention
    /// after that.
    seen: Time,
}

/// A merchant.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Merchant {
    at: Coord,
    open: bool,
}

/// One order's state.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Order {
    /// Where offers are searched from: the merchant's position at placement.
    at: Coord,
    /// The merchant, for offer and transition records.
    merchant: Id,
    /// Which placement this is (timers name it).
    serial: u64,
    state: OrderState,
    /// Offer rounds that timed out so far; the radius grows with it.
    round: u32,
    /// Counts offer rounds sent, so a stale timeout can be told apart.
    offer_seq: u32,
    /// Riders offered the current round (while `notified`).
    offers: Vec<Id>,
    /// Riders offered in earlier rounds (for `offer_expired`).
    past_offers: FxHashSet<Id>,
    /// The assigned rider.
    rider: Option<Id>,
    picked_up: bool,
    /// The promised time has passed (it may still be unassigned).
    overdue: bool,
    /// It was ever in `overtime`: delivery leads to compensation.
    ever_overtime: bool,
    /// The spot this waiting order watches from (see [`Spot`]).
    watching: Option<SpotKey>,
}

/// Where waiting orders search from and how far: a position and a radius
/// (the radius's bits). Orders waiting at one merchant in the same round
/// share one, so each cell lists spots, not orders: a busy merchant's
/// thousands of waiting orders cost one entry per cell, not thousands.
type SpotKey = (Coord, u64);

/// The waiting orders searching from one spot, and the cells its radius
/// reaches (where a rider appearing wakes them).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Spot {
    cells: Vec<u64>,
    orders: FxHashSet<Id>,
}

/// An order as an order event finds it, before the event changes it.
struct Found {
    state: OrderState,
    /// The assigned rider.
    rider: Option<Id>,
    picked_up: bool,
}

impl Found {
    /// A rider has it: `delivering` or `overtime`.
    fn carrying(&self) -> bool {
        matches!(self.state, OrderState::Delivering | OrderState::Overtime)
    }

    /// A rider has it and has not picked it up: it may still be cancelled,
    /// redispatched or reassigned.
    fn on_the_way(&self) -> bool {
        self.carrying() && !self.picked_up
    }

    /// Whether `rider` is the one assigned.
    fn assigned_to(&self, rider: &Id) -> bool {
        self.rider.as_ref() == Some(rider)
    }
}

/// Records that `event` (naming `order`) had no effect, and why.
fn reject(event: &Id, order: &Id, reason: RejectReason, out: &mut Vec<Output>) {
    out.push(Output::Rejected {
        event: event.clone(),
        order: Some(order.clone()),
        reason,
    });
}

/// The decision core. See the module doc for the per-millisecond protocol.
/// Between milliseconds it holds no work in progress, so it is saved in a
/// checkpoint whole (it is `Serialize`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Dispatcher {
    cfg: DispatchConfig,
    /// Available-ish riders (online and pinged within the TTL) by cell.
    index: GeoIndex,
    riders: FxHashMap<Id, RiderLoad>,
    merchants: FxHashMap<Id, Merchant>,
    orders: FxHashMap<Id, Order>,
    /// Cell → the spots whose waiting (`created`) orders' search radius
    /// reaches the cell.
    watch: FxHashMap<u64, FxHashSet<SpotKey>>,
    /// The spots waiting orders search from.
    spots: FxHashMap<SpotKey, Spot>,
    timers: BTreeMap<Time, Vec<(Id, Timer)>>,
    /// Orders placed so far: the next placement's serial number.
    placed: u64,
    /// The millisecond being handled.
    now: Time,
    /// Timer times set since the last [`Dispatcher::take_new_timer_times`].
    #[serde(skip)]
    new_timer_times: Vec<Time>,
    /// Orders to try offering in this millisecond's offer pass.
    #[serde(skip)]
    dirty: BTreeSet<Id>,
    /// Riders that may have become a candidate in this millisecond.
    #[serde(skip)]
    woken: FxHashSet<Id>,
    /// The event being applied: the cause its transitions name.
    #[serde(skip)]
    cause: Option<Id>,
}

impl Dispatcher {
    /// An empty dispatcher.
    pub fn new(cfg: DispatchConfig) -> Self {
        Dispatcher {
            cfg,
            index: GeoIndex::default(),
            riders: FxHashMap::default(),
            merchants: FxHashMap::default(),
            orders: FxHashMap::default(),
            watch: FxHashMap::default(),
            spots: FxHashMap::default(),
            timers: BTreeMap::new(),
            placed: 0,
            now: 0,
            cause: None,
            new_timer_times: Vec::new(),
            dirty: BTreeSet::new(),
            woken: FxHashSet::default(),
        }
    }

    /// What the core holds, for the operator's state figures: orders (live,
    /// and closed ones within their retention), merchants, riders with a
    /// load or a capacity, riders in its index, cells watched by waiting
    /// orders, and the milliseconds with a timer due.
    pub fn sizes(&self) -> crate::stats::StateSizes {
        vec![
            ("orders", self.orders.len()),
            ("merchants", self.merchants.len()),
            ("riders", self.riders.len()),
            ("indexed", self.index.len()),
            ("watched_cells", self.watch.len()),
            ("timer_times", self.timers.len()),
        ]
    }

    /// Step 1a: starts millisecond `t` with the index's changes in it.
    /// Insertions take effect first; a retraction then removes a rider only
    /// if the index still holds exactly the retracted entry (otherwise the
    /// rider moved). A rider that appears or moves wakes the waiting orders
    /// watching its cell, if it has room for an order (a full rider is
    /// no candidate; freeing room wakes it then).
    pub fn apply_index(&mut self, updates: &[(IndexEntry, isize)], t: Time) {
        self.now = t;
        for (e, diff) in updates {
            if *diff > 0
                && self.index.upsert(&e.rider, e.cell, e.at)
                && self.watch.contains_key(&e.cell)
                && self.is_free(&e.rider)
            {
                self.woken.insert(e.rider.clone());
            }
        }
        for (e, diff) in updates {
            if *diff < 0 && self.index.get(&e.rider) == Some((e.cell, e.at)) {
                self.index.remove(&e.rider);
                if let Some(r) = self.riders.get_mut(&e.rider) {
                    r.seen = t;
                    self.check_rider(&e.rider);
                }
            }
        }
    }

    /// Step 1b: a shift's capacity (the last shift of the millisecond wins).
    pub fn apply_capacity(&mut self, rider: &Id, capacity: Option<u32>) {
        let capacity = capacity.unwrap_or(self.cfg.default_capacity);
        let entry = self.rider_mut(rider);
        if capacity > entry.capacity {
            self.woken.insert(rider.clone());
        }
        let now = self.now;
        let entry = self.rider_mut(rider);
        entry.capacity = capacity;
        entry.seen = now;
        self.check_rider(rider);
    }

    /// Step 2: the timers due at `t`.
    pub fn fire_timers(&mut self, t: Time, out: &mut Vec<Output>) {
        let Some(mut due) = self.timers.remove(&t) else {
            return;
        };
        due.sort();
        for (id, timer) in due {
            match timer {
                Timer::Deadline(serial) => self.on_deadline(&id, serial, out),
                Timer::GrabTimeout(serial, seq) => self.on_grab_timeout(&id, serial, seq, out),
                Timer::Forget => {
                    self.orders.remove(&id);
                }
                Timer::ForgetRider => self.on_forget_rider(&id, t),
            }
        }
    }

    /// Step 3: one order event (merchant, order or ops event) at `t`.
    /// Location pings and shifts arrive through steps 1a/1b instead.
    pub fn apply_event(&mut self, event: &Event, t: Time, out: &mut Vec<Output>) {
        self.cause = Some(event.id.clone());
        self.on_event(event, t, out);
        self.cause = None;
    }

    /// [`Dispatcher::apply_event`], with `cause` set.
    fn on_event(&mut self, event: &Event, t: Time, out: &mut Vec<Output>) {
        let id = &event.id;
        match &event.kind {
            EventKind::MerchantUpserted { merchant, at, open } => {
                self.on_merchant(merchant, *at, *open)
            }
            EventKind::ShiftChanged { .. } | EventKind::LocationPinged { .. } => {}
            EventKind::OrderPlaced {
                order,
                merchant,
                promised_minutes,
                ..
            } => self.on_order_placed(id, order, merchant, *promised_minutes, t, out),
            EventKind::GrabAttempted { order, rider } => self.on_grab(id, order, rider, out),
            EventKind::OrderCancelled { order } => self.on_cancelled(id, order, out),
            EventKind::PickedUp { order, rider } => self.on_picked_up(id, order, rider, out),
            EventKind::Delivered { order, rider } => self.on_delivered(id, order, rider, out),
            EventKind::CompensationSettled { order, .. } => {
                self.on_compensation_settled(id, order, out)
            }
            EventKind::Redispatched { order } => self.on_redispatched(id, order, out),
            EventKind::Reassigned { order, rider } => self.on_reassigned(id, order, rider, out),
        }
    }

    /// A merchant registered, moved, opened or closed: orders placed from
    /// now on see it so.
    fn on_merchant(&mut self, merchant: &Id, at: Coord, open: bool) {
        self.merchants
            .insert(merchant.clone(), Merchant { at, open });
    }

    /// An order placed at an open merchant starts `created`, with its
    /// promised-time deadline set, and is offered in this millisecond's pass.
    fn on_order_placed(
        &mut self,
        event: &Id,
        order: &Id,
        merchant: &Id,
        promised_minutes: u32,
        t: Time,
        out: &mut Vec<Output>,
    ) {
        if self.orders.contains_key(order) {
            return reject(event, order, RejectReason::DuplicateOrder, out);
        }
        let at = match self.merchants.get(merchant) {
            None => return reject(event, order, RejectReason::UnknownMerchant, out),
            Some(m) if !m.open => return reject(event, order, RejectReason::MerchantClosed, out),
            Some(m) => m.at,
        };
        self.placed += 1;
        let serial = self.placed;
        self.orders.insert(
            order.clone(),
            Order {
                at,
                merchant: merchant.clone(),
                serial,
                state: OrderState::Created,
                round: 0,
                offer_seq: 0,
                offers: Vec::new(),
                past_offers: FxHashSet::default(),
                rider: None,
                picked_up: false,
                overdue: false,
                ever_overtime: false,
                watching: None,
            },
        );
        out.push(Output::Transition {
            order: order.clone(),
            merchant: merchant.clone(),
            from: None,
            to: OrderState::Created,
            reason: Why::Placed,
            rider: None,
            event: Some(event.clone()),
        });
        let deadline = t + u64::from(promised_minutes.max(1)) * 60_000;
        self.set_timer(deadline, order.clone(), Timer::Deadline(serial));
        self.dirty.insert(order.clone());
    }

    /// A grab attempt is decided; the winner takes the order, and the other
    /// riders offered it lose their offers.
    fn on_grab(&mut self, event: &Id, order: &Id, rider: &Id, out: &mut Vec<Output>) {
        let outcome = self.judge_grab(order, rider);
        out.push(Output::GrabDecided {
            attempt: event.clone(),
            order: order.clone(),
            rider: rider.clone(),
            outcome,
        });
        if outcome == GrabOutcome::Won {
            self.withdraw_offers(order, WithdrawReason::Taken, Some(rider), out);
            self.assign(order, rider, Why::Grabbed, out);
        }
    }

    /// Cancelling closes an order not yet picked up (taking back its offers
    /// or its rider).
    fn on_cancelled(&mut self, event: &Id, id: &Id, out: &mut Vec<Output>) {
        let Some(o) = self.look_up(event, id, out) else {
            return;
        };
        match o.state {
            OrderState::Created | OrderState::Notified => {
                self.withdraw_offers(id, WithdrawReason::Cancelled, None, out);
                self.transition(id, OrderState::Closed, Why::Cancelled, out);
            }
            _ if o.on_the_way() => {
                self.unassign(id, WithdrawReason::Cancelled, out);
                self.transition(id, OrderState::Closed, Why::Cancelled, out);
            }
            _ => reject(event, id, RejectReason::InvalidState, out),
        }
    }

    /// The assigned rider picked the food up (a sub-state: the order stays
    /// in its state).
    fn on_picked_up(&mut self, event: &Id, id: &Id, rider: &Id, out: &mut Vec<Output>) {
        let Some(o) = self.look_up(event, id, out) else {
            return;
        };
        if !o.on_the_way() {
            reject(event, id, RejectReason::InvalidState, out)
        } else if !o.assigned_to(rider) {
            reject(event, id, RejectReason::NotAssignedRider, out)
        } else {
            self.order_mut(id).picked_up = true;
            self.transition(id, o.state, Why::PickedUp, out);
        }
    }

    /// The assigned rider delivered: the order is received, then closed, or
    /// owed compensation if it was ever overtime; the rider is freed.
    fn on_delivered(&mut self, event: &Id, id: &Id, rider: &Id, out: &mut Vec<Output>) {
        let Some(o) = self.look_up(event, id, out) else {
            return;
        };
        if !o.carrying() {
            return reject(event, id, RejectReason::InvalidState, out);
        }
        if !o.assigned_to(rider) {
            return reject(event, id, RejectReason::NotAssignedRider, out);
        }
        self.release(rider);
        let o = self.order_mut(id);
        o.picked_up = true;
        let late = o.ever_overtime;
        self.transition(id, OrderState::Received, Why::Delivered, out);
        if late {
            self.transition(id, OrderState::Compensating, Why::CompensationDue, out);
        } else {
            self.transition(id, OrderState::Closed, Why::Completed, out);
        }
    }

    /// Ops settled a late order's compensation: it closes.
    fn on_compensation_settled(&mut self, event: &Id, id: &Id, out: &mut Vec<Output>) {
        let Some(o) = self.look_up(event, id, out) else {
            return;
        };
        if o.state == OrderState::Compensating {
            self.transition(id, OrderState::Closed, Why::Compensated, out);
        } else {
            reject(event, id, RejectReason::InvalidState, out)
        }
    }

    /// Ops take an order not yet picked up back to `created`, to offer it
    /// again (a waiting order is just tried again).
    fn on_redispatched(&mut self, event: &Id, id: &Id, out: &mut Vec<Output>) {
        let Some(o) = self.look_up(event, id, out) else {
            return;
        };
        match o.state {
            OrderState::Created => {
                self.dirty.insert(id.clone());
            }
            OrderState::Notified => {
                self.withdraw_offers(id, WithdrawReason::Redispatched, None, out);
                self.transition(id, OrderState::Created, Why::Redispatched, out);
            }
            _ if o.on_the_way() => {
                self.unassign(id, WithdrawReason::Redispatched, out);
                self.transition(id, OrderState::Created, Why::Redispatched, out);
            }
            _ => reject(event, id, RejectReason::InvalidState, out),
        }
    }

    /// Ops give an order not yet picked up to a rider directly, taking it
    /// from its offers or from another rider.
    fn on_reassigned(&mut self, event: &Id, id: &Id, rider: &Id, out: &mut Vec<Output>) {
        let Some(o) = self.look_up(event, id, out) else {
            return;
        };
        match o.state {
            OrderState::Created | OrderState::Notified => {
                self.withdraw_offers(id, WithdrawReason::Reassigned, None, out);
                self.assign(id, rider, Why::Reassigned, out);
            }
            _ if o.on_the_way() && !o.assigned_to(rider) => {
                self.unassign(id, WithdrawReason::Reassigned, out);
                self.assign(id, rider, Why::Reassigned, out);
            }
            _ => reject(event, id, RejectReason::InvalidState, out),
        }
    }

    /// The order event `event` names, as it finds it; `None`, with the event
    /// rejected as `unknown_order`, when there is no such order.
    fn look_up(&self, event: &Id, id: &Id, out: &mut Vec<Output>) -> Option<Found> {
        let Some(o) = self.orders.get(id) else {
            reject(event, id, RejectReason::UnknownOrder, out);
            return None;
        };
        Some(Found {
            state: o.state,
            rider: o.rider.clone(),
            picked_up: o.picked_up,
        })
    }

    /// Step 4: offers every waiting order that may have gained a candidate.
    pub fn offer_pass(&mut self, t: Time, out: &mut Vec<Output>) {
        for rider in std::mem::take(&mut self.woken) {
            if let Some((cell, _)) = self.index.get(&rider) {
                for spot in self.watch.get(&cell).into_iter().flatten() {
                    if let Some(spot) = self.spots.get(spot) {
                        self.dirty.extend(spot.orders.iter().cloned());
                    }
                }
            }
        }
        for id in std::mem::take(&mut self.dirty) {
            let Some(o) = self.orders.get(&id) else {
                continue;
            };
            if o.state != OrderState::Created {
                continue;
            }
            let radius = self.cfg.radius_for_round(o.round);
            let (at, merchant) = (o.at, o.merchant.clone());
            let candidates = self
                .index
                .nearest(at, radius, self.cfg.offers, |r| self.is_free(r));
            if candidates.is_empty() {
                self.watch_order(&id, at, radius);
                continue;
            }
            let expires_at = t + self.cfg.grab_timeout_ms;
            let o = self.order_mut(&id);
            o.offer_seq += 1;
            let (round, serial, seq) = (o.round, o.serial, o.offer_seq);
            o.offers = candidates.iter().map(|(r, _)| r.clone()).collect();
            for (rider, dist) in candidates {
                out.push(Output::Offered {
                    order: id.clone(),
                    rider,
                    merchant: merchant.clone(),
                    distance_m: dist.round() as u32,
                    round,
                    expires_at,
                });
            }
            self.transition(&id, OrderState::Notified, Why::Offered, out);
            self.set_timer(expires_at, id, Timer::GrabTimeout(serial, seq));
        }
    }

    /// A dispatcher holding what `saved` held (from a checkpoint), under
    /// `cfg`; its pending timers are all new timer times, to be woken at.
    pub fn restore(cfg: DispatchConfig, mut saved: Dispatcher) -> Self {
        saved.cfg = cfg;
        saved.new_timer_times = saved.timers.keys().copied().collect();
        saved
    }

    /// Timer times set since the last call: the operator holds a capability
    /// for each so the timers fire on time.
    pub fn take_new_timer_times(&mut self) -> Vec<Time> {
        std::mem::take(&mut self.new_timer_times)
    }

    fn is_free(&self, rider: &Id) -> bool {
        self.riders.get(rider).is_none_or(|l| l.load < l.capacity)
    }

    fn rider_mut(&mut self, rider: &Id) -> &mut RiderLoad {
        let capacity = self.cfg.default_capacity;
        self.riders.entry(rider.clone()).or_insert(RiderLoad {
            capacity,
            load: 0,
            seen: 0,
        })
    }

    fn order_mut(&mut self, id: &Id) -> &mut Order {
        self.orders.get_mut(id).expect("order exists")
    }

    fn set_timer(&mut self, at: Time, order: Id, timer: Timer) {
        self.timers.entry(at).or_default().push((order, timer));
        self.new_timer_times.push(at);
    }

    fn judge_grab(&self, id: &Id, rider: &Id) -> GrabOutcome {
        use LossReason::*;
        let Some(o) = self.orders.get(id) else {
            return GrabOutcome::Lost(UnknownOrder);
        };
        let not_offered = if o.past_offers.contains(rider) {
            OfferExpired
        } else {
            NotOffered
        };
        let reason = match o.state {
            OrderState::Closed => OrderClosed,
            OrderState::Delivering
            | OrderState::Overtime
            | OrderState::Received
            | OrderState::Compensating => AlreadyTaken,
            OrderState::Created => not_offered,
            OrderState::Notified if !o.offers.contains(rider) => not_offered,
            OrderState::Notified if !self.is_free(rider) => OverCapacity,
            OrderState::Notified => return GrabOutcome::Won,
        };
        GrabOutcome::Lost(reason)
    }

    fn transition(&mut self, id: &Id, to: OrderState, reason: Why, out: &mut Vec<Output>) {
        let o = self.orders.get_mut(id).expect("order exists");
        let from = std::mem::replace(&mut o.state, to);
        if to == OrderState::Created {
            self.dirty.insert(id.clone());
        }
        let unwatch = match (from, to) {
            (OrderState::Created, to) if to != OrderState::Created => o.watching.take(),
            _ => None,
        };
        if to == OrderState::Closed {
            // Closed orders keep only what grab and duplicate checks need,
            // for their retention.
            o.offers = Vec::new();
            o.past_offers = FxHashSet::default();
        }
        out.push(Output::Transition {
            order: id.clone(),
            merchant: o.merchant.clone(),
            from: Some(from),
            to,
            reason,
            rider: o.rider.clone(),
            event: self.cause.clone(),
        });
        if let Some(key) = unwatch {
            self.unwatch(id, key);
        }
        if to == OrderState::Closed {
            let forget = self.now.saturating_add(self.cfg.order_retention_ms);
            if forget < Time::MAX {
                self.set_timer(forget, id.clone(), Timer::Forget);
            }
        }
    }

    /// Checks `rider` once its retention after it was last seen is over.
    fn check_rider(&mut self, rider: &Id) {
        let seen = self.riders.get(rider).map_or(0, |r| r.seen);
        let at = seen.saturating_add(self.cfg.rider_retention_ms);
        if at > self.now && at < Time::MAX {
            self.set_timer(at, rider.clone(), Timer::ForgetRider);
        }
    }

    /// Forgets `rider` if it has been idle for its retention: out of the
    /// index, carrying nothing, and seen no later than the retention ago (a
    /// later sighting set a later check).
    fn on_forget_rider(&mut self, rider: &Id, t: Time) {
        let idle = self.riders.get(rider).is_some_and(|r| {
            r.load == 0 && r.seen.saturating_add(self.cfg.rider_retention_ms) <= t
        });
        if idle && self.index.get(rider).is_none() {
            self.riders.remove(rider);
        }
    }

    /// Registers waiting order `id` on the spot `(at, radius)` (once).
    fn watch_order(&mut self, id: &Id, at: Coord, radius: f64) {
        let o = self.orders.get_mut(id).expect("order exists");
        if o.watching.is_some() {
            return;
        }
        let key = (at, radius.to_bits());
        o.watching = Some(key);
        let spot = self.spots.entry(key).or_insert_with(|| {
            let cells = cells_within(at, radius);
            for &cell in &cells {
                self.watch.entry(cell).or_default().insert(key);
            }
            Spot {
                cells,
                orders: FxHashSet::default(),
            }
        });
        spot.orders.insert(id.clone());
    }

    /// Takes order `id` off spot `key`; the spot's last order takes it off
    /// its cells.
    fn unwatch(&mut self, id: &Id, key: SpotKey) {
        let Some(spot) = self.spots.get_mut(&key) else {
            return;
        };
        spot.orders.remove(id);
        if !spot.orders.is_empty() {
            return;
        }
        for cell in self.spots.remove(&key).map(|s| s.cells).unwrap_or_default() {
            if let Some(set) = self.watch.get_mut(&cell) {
                set.remove(&key);
                if set.is_empty() {
                    self.watch.remove(&cell);
                }
            }
        }
    }

    fn withdraw_offers(
        &mut self,
        id: &Id,
        reason: WithdrawReason,
        keep: Option<&Id>,
        out: &mut Vec<Output>,
    ) {
        let o = self.orders.get_mut(id).expect("order exists");
        for rider in std::mem::take(&mut o.offers) {
            if Some(&rider) != keep {
                out.push(Output::Withdrawn {
                    order: id.clone(),
                    rider: rider.clone(),
                    reason,
                });
            }
            o.past_offers.insert(rider);
        }
    }

    fn assign(&mut self, id: &Id, rider: &Id, reason: Why, out: &mut Vec<Output>) {
        self.rider_mut(rider).load += 1;
        self.order_mut(id).rider = Some(rider.clone());
        self.transition(id, OrderState::Delivering, reason, out);
        out.push(Output::Assigned {
            order: id.clone(),
            rider: rider.clone(),
        });
        let o = self.order_mut(id);
        if o.overdue {
            o.ever_overtime = true;
            self.transition(id, OrderState::Overtime, Why::DeadlinePassed, out);
        }
    }

    fn unassign(&mut self, id: &Id, reason: WithdrawReason, out: &mut Vec<Output>) {
        if let Some(rider) = self.order_mut(id).rider.take() {
            self.release(&rider);
            out.push(Output::Unassigned {
                order: id.clone(),
                rider,
                reason,
            });
        }
    }

    fn release(&mut self, rider: &Id) {
        let now = self.now;
        let r = self.rider_mut(rider);
        r.load = r.load.saturating_sub(1);
        r.seen = now;
        self.check_rider(rider);
        self.woken.insert(rider.clone());
    }

    fn on_deadline(&mut self, id: &Id, serial: u64, out: &mut Vec<Output>) {
        let Some(o) = self.orders.get_mut(id).filter(|o| o.serial == serial) else {
            return;
        };
        match o.state {
            OrderState::Created | OrderState::Notified => o.overdue = true,
            OrderState::Delivering => {
                o.overdue = true;
                o.ever_overtime = true;
                self.transition(id, OrderState::Overtime, Why::DeadlinePassed, out);
            }
            _ => {}
        }
    }

    fn on_grab_timeout(&mut self, id: &Id, serial: u64, seq: u32, out: &mut Vec<Output>) {
        let Some(o) = self.orders.get_mut(id).filter(|o| o.serial == serial) else {
            return;
        };
        if o.state != OrderState::Notified || o.offer_seq != seq {
            return;
        }
        o.round += 1;
        self.withdraw_offers(id, WithdrawReason::Expired, None, out);
        self.transition(id, OrderState::Created, Why::GrabTimeout, out);
    }
}
