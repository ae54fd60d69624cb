//! The sequential reference model: the dispatch rules as one plain loop.
//!
//! It shares no machinery with the dataflow: riders sit in a plain lat/lon
//! grid (not H3), silence is checked when a rider is looked at (no timers),
//! every waiting order is retried every millisecond (no wake-ups), and timers
//! are a sorted map scanned in order. Tests hold the dataflow equal to it,
//! millisecond by millisecond; the benchmark uses it as the speed yardstick.
//!
//! Each millisecond `t` with events or due timers, in order:
//! 1. drop redelivered events (ids seen within the dedup window; pings are
//!    never deduplicated); apply pings and shifts;
//! 2. fire timers due at `t` (by order id; deadlines before grab timeouts);
//! 3. apply the other events in log-offset order;
//! 4. offer every `created` order to its K nearest available riders within
//!    the round's radius (nearest first, ties by rider id), if there are any.
//!
//! Retention: a closed order is forgotten `order_retention_ms` after it
//! closed (a timer, after the order's other timers of that millisecond); a
//! rider's next ping or shift more than `rider_retention_ms` after its last
//! one finds it forgotten: off shift, with no position (its load and
//! capacity stay: they are only seen again through a new shift).

use grabflow_api::geo::distance_m;
use grabflow_api::output::TransitionReason as Why;
use grabflow_api::{
    Coord, DispatchConfig, Event, EventKind, GrabOutcome, Id, LossReason, OrderState, Output,
    RejectReason, Time, WithdrawReason,
};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

/// Grid bucket size in degrees (~1.1 km of latitude).
const BUCKET_DEG: f64 = 0.01;

fn bucket(at: Coord) -> (i32, i32) {
    (
        (at.lat() / BUCKET_DEG).floor() as i32,
        (at.lon() / BUCKET_DEG).floor() as i32,
    )
}

#[derive(Default)]
struct Rider {
    at: Option<Coord>,
    last_ping: Time,
    /// Its last ping or shift.
    last_seen: Time,
    online: bool,
    capacity: Option<u32>,
    load: u32,
}

struct Order {
    at: Coord,
    merchant: Id,
    /// Which placement of the id this is: timers of an earlier one, since
    /// forgotten, do nothing.
    serial: u64,
    state: OrderState,
    round: u32,
    offer_seq: u32,
    offers: Vec<Id>,
    past_offers: HashSet<Id>,
    rider: Option<Id>,
    picked_up: bool,
    overdue: bool,
    ever_overtime: bool,
}

#[derive(Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    Deadline(u64),
    GrabTimeout(u64, u32),
    Forget,
}

/// The whole dispatch state, sequentially.
pub struct Reference {
    cfg: DispatchConfig,
    riders: HashMap<Id, Rider>,
    grid: HashMap<(i32, i32), BTreeSet<Id>>,
    merchants: HashMap<Id, (Coord, bool)>,
    orders: HashMap<Id, Order>,
    timers: BTreeMap<Time, Vec<(Id, Timer)>>,
    seen: HashMap<Id, Time>,
    /// Orders placed so far.
    placed: u64,
    /// The millisecond being processed.
    now: Time,
}

/// Runs the reference model over `log` and returns every decision made
/// before `end`, with its time, in the order made.
pub fn run(cfg: &DispatchConfig, log: &[Event], end: Time) -> Vec<(Time, Output)> {
    let mut model = Reference::new(cfg.clone());
    let mut by_time: BTreeMap<Time, Vec<&Event>> = BTreeMap::new();
    for e in log.iter().filter(|e| e.time < end) {
        by_time.entry(e.time).or_default().push(e);
    }
    let mut out = Vec::new();
    loop {
        let next_event = by_time.keys().next().copied();
        let next_timer = model.timers.keys().next().copied().filter(|&t| t < end);
        let t = match (next_event, next_timer) {
            (None, None) => break,
            (a, b) => a.into_iter().chain(b).min().expect("one is some"),
        };
        let events = by_time.remove(&t).unwrap_or_default();
        for o in model.step(t, events) {
            out.push((t, o));
        }
    }
    out
}

impl Reference {
    /// An empty model.
    pub fn new(cfg: DispatchConfig) -> Self {
        Reference {
            cfg,
            riders: HashMap::new(),
            grid: HashMap::new(),
            merchants: HashMap::new(),
            orders: HashMap::new(),
            timers: BTreeMap::new(),
            seen: HashMap::new(),
            placed: 0,
            now: 0,
        }
    }

    /// Processes millisecond `t`: its events (any order) and its due timers.
    pub fn step(&mut self, t: Time, mut events: Vec<&Event>) -> Vec<Output> {
        self.now = t;
        let mut out = Vec::new();
        events.sort_by_key(|e| e.offset);
        let window = self.cfg.dedup_window_ms;
        events.retain(|e| {
            if matches!(e.kind, EventKind::LocationPinged { .. }) {
                return true;
            }
            match self.seen.get(&e.id) {
                Some(&s) if s + window > t => false,
                _ => {
                    self.seen.insert(e.id.clone(), t);
                    true
                }
            }
        });
        for e in &events {
            if let Some(rider) = e.kind.rider() {
                self.forget_if_idle(rider, t);
            }
            match &e.kind {
                EventKind::LocationPinged { rider, at } => {
                    let r = self.riders.entry(rider.clone()).or_default();
                    if let Some(old) = r.at {
                        if let Some(set) = self.grid.get_mut(&bucket(old)) {
                            set.remove(rider);
                        }
                    }
                    r.at = Some(*at);
                    r.last_ping = t;
                    r.last_seen = t;
                    self.grid
                        .entry(bucket(*at))
                        .or_default()
                        .insert(rider.clone());
                }
                EventKind::ShiftChanged {
                    rider,
                    online,
                    capacity,
                } => {
                    let r = self.riders.entry(rider.clone()).or_default();
                    r.online = *online;
                    r.capacity = *capacity;
                    r.last_seen = t;
                }
                _ => {}
            }
        }
        if let Some(mut due) = self.timers.remove(&t) {
            due.sort();
            for (id, timer) in due {
                self.on_timer(&id, timer, &mut out);
            }
        }
        for e in &events {
            let start = out.len();
            self.on_event(e, t, &mut out);
            // Every transition an event makes names it as the cause.
            for o in &mut out[start..] {
                if let Output::Transition { event, .. } = o {
                    *event = Some(e.id.clone());
                }
            }
        }
        self.offer_waiting(t, &mut out);
        out
    }

    /// A rider seen again more than its retention after its last ping or
    /// shift comes back off shift, with no position.
    fn forget_if_idle(&mut self, rider: &Id, t: Time) {
        let Some(r) = self.riders.get_mut(rider) else {
            return;
        };
        if r.last_seen.saturating_add(self.cfg.rider_retention_ms) >= t {
            return;
        }
        if let Some(at) = r.at.take() {
            if let Some(set) = self.grid.get_mut(&bucket(at)) {
                set.remove(rider);
            }
        }
        r.online = false;
        r.last_ping = 0;
    }

    fn capacity(&self, rider: &Id) -> u32 {
        self.riders
            .get(rider)
            .and_then(|r| r.capacity)
            .unwrap_or(self.cfg.default_capacity)
    }

    fn load(&self, rider: &Id) -> u32 {
        self.riders.get(rider).map_or(0, |r| r.load)
    }

    fn available(&self, rider: &Id, t: Time) -> bool {
        let Some(r) = self.riders.get(rider) else {
            return false;
        };
        r.online
            && r.at.is_some()
            && r.last_ping + self.cfg.rider_ttl_ms > t
            && r.load < self.capacity(rider)
    }

    fn candidates(&self, at: Coord, radius: f64, t: Time) -> Vec<(f64, Id)> {
        let dlat = radius / 111_000.0;
        let dlon = radius / (111_000.0 * at.lat().to_radians().cos().max(0.01));
        let lo = bucket(
            Coord::from_degrees((at.lat() - dlat).max(-90.0), (at.lon() - dlon).max(-180.0))
                .unwrap(),
        );
        let hi = bucket(
            Coord::from_degrees((at.lat() + dlat).min(90.0), (at.lon() + dlon).min(180.0)).unwrap(),
        );
        let mut found = Vec::new();
        for bl in lo.0..=hi.0 {
            for bo in lo.1..=hi.1 {
                for rider in self.grid.get(&(bl, bo)).into_iter().flatten() {
                    let d = distance_m(
                        at,
                        self.riders[rider]
                            .at
                            .expect("gridded riders have a position"),
                    );
                    if d <= radius && self.available(rider, t) {
                        found.push((d, rider.clone()));
                    }
                }
            }
        }
        found.sort_by(|a, b| a.0.total_cmp(&b.0).then_with(|| a.1.cmp(&b.1)));
        found.truncate(self.cfg.offers);
        found
    }

    fn set_state(&mut self, id: &Id, to: OrderState, reason: Why, out: &mut Vec<Output>) {
        let o = self.orders.get_mut(id).unwrap();
        let from = o.state;
        o.state = to;
        out.push(Output::Transition {
            order: id.clone(),
            merchant: o.merchant.clone(),
            from: Some(from),
            to,
            reason,
            rider: o.rider.clone(),
            event: None,
        });
        let forget = self.now.saturating_add(self.cfg.order_retention_ms);
        if to == OrderState::Closed && forget < Time::MAX {
            self.timers
                .entry(forget)
                .or_default()
                .push((id.clone(), Timer::Forget));
        }
    }

    fn withdraw(
        &mut self,
        id: &Id,
        reason: WithdrawReason,
        except: Option<&Id>,
        out: &mut Vec<Output>,
    ) {
        let o = self.orders.get_mut(id).unwrap();
        for r in std::mem::take(&mut o.offers) {
            if Some(&r) != except {
                out.push(Output::Withdrawn {
                    order: id.clone(),
                    rider: r.clone(),
                    reason,
                });
            }
            o.past_offers.insert(r);
        }
    }

    fn give_to(&mut self, id: &Id, rider: &Id, reason: Why, out: &mut Vec<Output>) {
        self.riders.entry(rider.clone()).or_default().load += 1;
        self.orders.get_mut(id).unwrap().rider = Some(rider.clone());
        self.set_state(id, OrderState::Delivering, reason, out);
        out.push(Output::Assigned {
            order: id.clone(),
            rider: rider.clone(),
        });
        if self.orders[id].overdue {
            self.orders.get_mut(id).unwrap().ever_overtime = true;
            self.set_state(id, OrderState::Overtime, Why::DeadlinePassed, out);
        }
    }

    fn take_from_rider(&mut self, id: &Id, reason: WithdrawReason, out: &mut Vec<Output>) {
        if let Some(r) = self.orders.get_mut(id).unwrap().rider.take() {
            let rider = self.riders.entry(r.clone()).or_default();
            rider.load = rider.load.saturating_sub(1);
            out.push(Output::Unassigned {
                order: id.clone(),
                rider: r,
                reason,
            });
        }
    }

    fn on_timer(&mut self, id: &Id, timer: Timer, out: &mut Vec<Output>) {
        let Some(o) = self.orders.get_mut(id) else {
            return;
        };
        match timer {
            Timer::Forget => {
                self.orders.remove(id);
            }
            Timer::Deadline(serial) if serial != o.serial => {}
            Timer::GrabTimeout(serial, _) if serial != o.serial => {}
            Timer::Deadline(_) => match o.state {
                OrderState::Created | OrderState::Notified => o.overdue = true,
                OrderState::Delivering => {
                    o.overdue = true;
                    o.ever_overtime = true;
                    self.set_state(id, OrderState::Overtime, Why::DeadlinePassed, out);
                }
                _ => {}
            },
            Timer::GrabTimeout(_, seq) => {
                if o.state == OrderState::Notified && o.offer_seq == seq {
                    o.round += 1;
                    self.withdraw(id, WithdrawReason::Expired, None, out);
                    self.set_state(id, OrderState::Created, Why::GrabTimeout, out);
                }
            }
        }
    }

    fn on_event(&mut self, e: &Event, t: Time, out: &mut Vec<Output>) {
        let reject = |order: &Id, reason, out: &mut Vec<Output>| {
            out.push(Output::Rejected {
                event: e.id.clone(),
                order: Some(order.clone()),
                reason,
            })
        };
        use OrderState::*;
        match &e.kind {
            EventKind::MerchantUpserted { merchant, at, open } => {
                self.merchants.insert(merchant.clone(), (*at, *open));
            }
            EventKind::LocationPinged { .. } | EventKind::ShiftChanged { .. } => {}
            EventKind::OrderPlaced {
                order,
                merchant,
                promised_minutes,
                ..
            } => {
                if self.orders.contains_key(order) {
                    return reject(order, RejectReason::DuplicateOrder, out);
                }
                let Some(&(at, open)) = self.merchants.get(merchant) else {
                    return reject(order, RejectReason::UnknownMerchant, out);
                };
                if !open {
                    return reject(order, RejectReason::MerchantClosed, out);
                }
                self.placed += 1;
                self.orders.insert(
                    order.clone(),
                    Order {
                        at,
                        merchant: merchant.clone(),
                        serial: self.placed,
                        state: Created,
                        round: 0,
                        offer_seq: 0,
                        offers: vec![],
                        past_offers: HashSet::new(),
                        rider: None,
                        picked_up: false,
                        overdue: false,
                        ever_overtime: false,
                    },
                );
                out.push(Output::Transition {
                    order: order.clone(),
                    merchant: merchant.clone(),
                    from: None,
                    to: Created,
                    reason: Why::Placed,
                    rider: None,
                    event: None,
                });
                let due = t + 60_000 * u64::from((*promised_minutes).max(1));
                self.timers
                    .entry(due)
                    .or_default()
                    .push((order.clone(), Timer::Deadline(self.placed)));
            }
            EventKind::GrabAttempted { order, rider } => {
                let outcome = match self.orders.get(order) {
                    None => GrabOutcome::Lost(LossReason::UnknownOrder),
                    Some(o) => match o.state {
                        Closed => GrabOutcome::Lost(LossReason::OrderClosed),
                        Delivering | Overtime | Received | Compensating => {
                            GrabOutcome::Lost(LossReason::AlreadyTaken)
                        }
                        Created | Notified
                            if !(o.state == Notified && o.offers.contains(rider)) =>
                        {
                            if o.past_offers.contains(rider) {
                                GrabOutcome::Lost(LossReason::OfferExpired)
                            } else {
                                GrabOutcome::Lost(LossReason::NotOffered)
                            }
                        }
                        _ if self.load(rider) >= self.capacity(rider) => {
                            GrabOutcome::Lost(LossReason::OverCapacity)
                        }
                        _ => GrabOutcome::Won,
                    },
                };
                out.push(Output::GrabDecided {
                    attempt: e.id.clone(),
                    order: order.clone(),
                    rider: rider.clone(),
                    outcome,
                });
                if outcome == GrabOutcome::Won {
                    self.withdraw(order, WithdrawReason::Taken, Some(rider), out);
                    self.give_to(order, rider, Why::Grabbed, out);
                }
            }
            kind => {
                let id = kind.order().unwrap();
                let Some(o) = self.orders.get(id) else {
                    return reject(id, RejectReason::UnknownOrder, out);
                };
                let state = o.state;
                let on_the_way = matches!(state, Delivering | Overtime) && !o.picked_up;
                let assigned = o.rider.clone();
                match kind {
                    EventKind::OrderCancelled { .. } => {
                        if matches!(state, Created | Notified) {
                            self.withdraw(id, WithdrawReason::Cancelled, None, out);
                        } else if on_the_way {
                            self.take_from_rider(id, WithdrawReason::Cancelled, out);
                        } else {
                            return reject(id, RejectReason::InvalidState, out);
                        }
                        self.set_state(id, Closed, Why::Cancelled, out);
                    }
                    EventKind::PickedUp { rider, .. } => {
                        if !on_the_way {
                            reject(id, RejectReason::InvalidState, out)
                        } else if assigned.as_ref() != Some(rider) {
                            reject(id, RejectReason::NotAssignedRider, out)
                        } else {
                            self.orders.get_mut(id).unwrap().picked_up = true;
                            self.set_state(id, state, Why::PickedUp, out);
                        }
                    }
                    EventKind::Delivered { rider, .. } => {
                        if !matches!(state, Delivering | Overtime) {
                            reject(id, RejectReason::InvalidState, out)
                        } else if assigned.as_ref() != Some(rider) {
                            reject(id, RejectReason::NotAssignedRider, out)
                        } else {
                            let r = self.riders.entry(rider.clone()).or_default();
                            r.load = r.load.saturating_sub(1);
                            self.orders.get_mut(id).unwrap().picked_up = true;
                            self.set_state(id, Received, Why::Delivered, out);
                            if self.orders[id].ever_overtime {
                                self.set_state(id, Compensating, Why::CompensationDue, out);
                            } else {
                                self.set_state(id, Closed, Why::Completed, out);
                            }
                        }
                    }
                    EventKind::CompensationSettled { .. } => {
                        if state == Compensating {
                            self.set_state(id, Closed, Why::Compensated, out);
                        } else {
                            reject(id, RejectReason::InvalidState, out)
                        }
                    }
                    EventKind::Redispatched { .. } => {
                        if state == Notified {
                            self.withdraw(id, WithdrawReason::Redispatched, None, out);
                            self.set_state(id, Created, Why::Redispatched, out);
                        } else if on_the_way {
                            self.take_from_rider(id, WithdrawReason::Redispatched, out);
                            self.set_state(id, Created, Why::Redispatched, out);
                        } else if state != Created {
                            reject(id, RejectReason::InvalidState, out)
                        }
                    }
                    EventKind::Reassigned { rider, .. } => {
                        if matches!(state, Created | Notified) {
                            self.withdraw(id, WithdrawReason::Reassigned, None, out);
                            self.give_to(id, rider, Why::Reassigned, out);
                        } else if on_the_way && assigned.as_ref() != Some(rider) {
                            self.take_from_rider(id, WithdrawReason::Reassigned, out);
                            self.give_to(id, rider, Why::Reassigned, out);
                        } else {
                            reject(id, RejectReason::InvalidState, out)
                        }
                    }
                    _ => unreachable!(),
                }
            }
        }
    }

    fn offer_waiting(&mut self, t: Time, out: &mut Vec<Output>) {
        let mut waiting: Vec<Id> = self
            .orders
            .iter()
            .filter(|(_, o)| o.state == OrderState::Created)
            .map(|(id, _)| id.clone())
            .collect();
        waiting.sort();
        for id in waiting {
            let o = &self.orders[&id];
            let found = self.candidates(o.at, self.cfg.radius_for_round(o.round), t);
            if found.is_empty() {
                continue;
            }
            let expires_at = t + self.cfg.grab_timeout_ms;
            let o = self.orders.get_mut(&id).unwrap();
            o.offer_seq += 1;
            o.offers = found.iter().map(|(_, r)| r.clone()).collect();
            for (d, rider) in &found {
                out.push(Output::Offered {
                    order: id.clone(),
                    rider: rider.clone(),
                    merchant: o.merchant.clone(),
                    distance_m: d.round() as u32,
                    round: o.round,
                    expires_at,
                });
            }
            let (serial, seq) = (o.serial, o.offer_seq);
            self.set_state(&id, OrderState::Notified, Why::Offered, out);
            self.timers
                .entry(expires_at)
                .or_default()
                .push((id, Timer::GrabTimeout(serial, seq)));
        }
    }
}

impl Reference {
    /// Riders holding an offer of `order` in its current round.
    pub fn offered_riders(&self, order: &Id) -> Vec<Id> {
        self.orders
            .get(order)
            .map(|o| o.offers.clone())
            .unwrap_or_default()
    }

    /// The rider `order` is assigned to.
    pub fn assigned_rider(&self, order: &Id) -> Option<Id> {
        self.orders.get(order).and_then(|o| o.rider.clone())
    }

    /// Times of pending timers strictly before `t`, earliest first.
    pub fn timer_times_before(&self, t: Time) -> Vec<Time> {
        self.timers.range(..t).map(|(&at, _)| at).collect()
    }
}
