//! The ops console's live feed: `GET /v1/ops/stream` (Server-Sent Events),
//! a summary of the city every second and ops events as they happen.
//!
//! It costs nothing while nobody watches. One [`OpsHub`] per process holds
//! a broadcast channel; the first subscriber starts the one thread that
//! computes the summary each second ([`summarize`], a pure function of two
//! readings of the counters and a snapshot of the city), serializes it once
//! and sends the same text to every subscriber; the thread ends at the first
//! tick with no subscriber left. Five consoles cost what one does.
//!
//! [`Tapped`] sits in front of the view as the dataflow's observer: it
//! reads each batch of decisions before the view takes it, to time every
//! order's first offer (the `grabflow_order_offer_ms` histogram, always
//! kept: one clock read per offer round) and, while someone watches, to
//! keep the samples of the current second and send ops events (grab
//! timeouts, overtime, cancellations, redispatches, reassignments).

use crate::state::EgressState;
use crate::streams::stream_claims;
use crate::view::Egress;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::Json;
use foldhash::HashMap;
use futures_util::stream::{Stream, StreamExt};
use grabflow_api::output::TransitionReason;
use grabflow_api::{Coord, Event, Id, OrderState, Output, Time};
use grabflow_dataflow::checkpoint::Snapshot as Saving;
use grabflow_dataflow::geo_index::{cell_boundary, cell_of};
use grabflow_dataflow::runtime::Observer;
use grabflow_dataflow::stats::OperatorStats;
use grabflow_dataflow::IndexEntry;
use grabflow_http::auth::{Auth, Role};
use grabflow_http::extract::{self as wire, IdSchema, QueryParams};
use grabflow_http::waiter::GrabAnswer;
use grabflow_http::ApiError;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::broadcast;
use tokio_stream::wrappers::BroadcastStream;
use utoipa::ToSchema;

/// How often the summary is sent.
pub const SUMMARY_EVERY: Duration = Duration::from_secs(1);

/// The most riders, orders, merchants and cells one summary carries (the
/// rest are left out and the summary says `truncated`).
pub const CITY_CAP: usize = 5_000;

/// Messages a slow subscriber may fall behind by before it skips some.
const CHANNEL: usize = 256;

/// Upper bounds of the `grabflow_order_offer_ms` histogram's buckets.
pub const OFFER_BUCKETS_MS: [u64; 14] = [
    1, 2, 5, 10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 30_000,
];

/// Samples of order → first offer kept for the headline percentiles.
const HEADLINE_WINDOW: Duration = Duration::from_secs(60);

/// An indexed rider, as the map draws it.
#[derive(Clone, Debug)]
pub struct CityRider {
    /// The rider.
    pub id: Id,
    /// Where the index has it.
    pub at: Coord,
    /// Its H3 cell (the index's resolution).
    pub cell: u64,
    /// Orders it carries.
    pub load: u32,
}

/// An order not closed, as the map draws it.
#[derive(Clone, Debug)]
pub struct CityOrder {
    /// The order.
    pub id: Id,
    /// Its state.
    pub state: OrderState,
    /// Its merchant.
    pub merchant: Id,
    /// Where its merchant is, if known.
    pub merchant_at: Option<Coord>,
    /// Where its rider is, if it has one in the index.
    pub rider_at: Option<Coord>,
}

/// The live city, read from the view for one summary.
#[derive(Clone, Debug, Default)]
pub struct City {
    /// Indexed riders.
    pub riders: Vec<CityRider>,
    /// Orders not closed.
    pub orders: Vec<CityOrder>,
    /// Some riders or orders were left out (over [`CITY_CAP`]).
    pub truncated: bool,
}

impl City {
    /// Adds `order` unless `cap` orders are there already.
    pub fn add_order(&mut self, order: CityOrder, cap: usize) {
        if self.orders.len() >= cap {
            self.truncated = true;
        } else {
            self.orders.push(order);
        }
    }
}

/// One reading of the figures the rates are computed from.
#[derive(Clone, Debug, Default)]
pub struct Reading {
    /// When, Unix ms (wall clock).
    pub at: Time,
    /// Location pings into the dataflow, ever.
    pub pings: u64,
    /// Orders placed, ever.
    pub orders: u64,
    /// Events of every kind, ever.
    pub events: u64,
    /// Offer rounds sent, ever.
    pub rounds: u64,
    /// Orders offered for the first time, ever.
    pub first_offers: u64,
    /// Grabs won, ever.
    pub grabs_won: u64,
    /// Grabs lost by reason, ever.
    pub grabs_lost: BTreeMap<String, u64>,
}

/// The headline figures of a summary (the console's `data-metric`s).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Figures {
    /// Riders known.
    pub riders: usize,
    /// Riders in the dispatch index (on shift, fresh).
    pub riders_indexed: usize,
    /// Merchants known.
    pub merchants: usize,
    /// Orders known.
    pub orders: usize,
    /// Orders in any state but `closed`.
    pub orders_open: i64,
    /// Location pings a second, over the last interval.
    pub pings_per_s: f64,
    /// Orders placed a second.
    pub orders_per_s: f64,
    /// Events of every kind a second.
    pub events_per_s: f64,
    /// Order → first offer, median over the last interval (null: no sample).
    pub order_offer_p50_ms: Option<u64>,
    /// Order → first offer, 99th percentile over the last interval.
    pub order_offer_p99_ms: Option<u64>,
    /// Order → first offer, median over the last minute.
    pub order_offer_p50_1m_ms: Option<u64>,
    /// Order → first offer, 99th percentile over the last minute.
    pub order_offer_p99_1m_ms: Option<u64>,
    /// Offer rounds sent per order first offered, over the last interval
    /// (null when none was).
    pub offer_rounds_per_order: Option<f64>,
    /// Grabs won a second.
    pub grabs_won_per_s: f64,
    /// Grabs lost a second (all reasons).
    pub grabs_lost_per_s: f64,
    /// Newest event's time minus the dataflow's frontier, ms.
    pub lag_ms: u64,
}

/// An H3 cell with supply or demand.
#[derive(Clone, Debug, Serialize)]
pub struct CellFigures {
    /// The cell, as H3's hexadecimal index.
    pub cell: String,
    /// Riders indexed in it.
    pub supply: u32,
    /// Orders waiting (`created` or `notified`) at merchants in it.
    pub demand: u32,
    /// Its corners, `[lat, lon]`.
    pub boundary: Vec<[f64; 2]>,
}

/// What the console receives every second.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    /// When, Unix ms (wall clock).
    pub at: Time,
    /// The headline figures.
    pub figures: Figures,
    /// Grabs lost a second, by reason.
    pub grabs_lost_per_s: BTreeMap<String, f64>,
    /// Orders by current state.
    pub orders_by_state: BTreeMap<crate::view::Name, i64>,
    /// Cells with riders or waiting orders.
    pub cells: Vec<CellFigures>,
    /// Indexed riders: `[id, lat, lon, load]`.
    pub riders: Vec<(Id, f64, f64, u32)>,
    /// Merchants with orders waiting: `[id, lat, lon, waiting]`.
    pub merchants: Vec<(Id, f64, f64, u32)>,
    /// Orders not closed: `[id, state, lat, lon]`, at the rider once
    /// assigned, else at the merchant.
    pub orders: Vec<(Id, &'static str, f64, f64)>,
    /// Riders, orders or cells were left out (over the cap).
    pub truncated: bool,
    /// Per-operator figures of the dataflow.
    pub operators: Vec<OperatorStats>,
}

/// Everything a summary is made from, read at one moment.
pub struct Snapshot {
    /// The counters now.
    pub now: Reading,
    /// Riders known, indexed; merchants, orders.
    pub sizes: (usize, usize, usize, usize),
    /// Orders by state.
    pub orders_by_state: BTreeMap<crate::view::Name, i64>,
    /// The dataflow's lag, ms.
    pub lag_ms: u64,
    /// The city.
    pub city: City,
    /// Order → first offer samples (ms) since the last summary.
    pub samples: Vec<u64>,
    /// The same over the last minute.
    pub window: Vec<u64>,
    /// The operators' figures.
    pub operators: Vec<OperatorStats>,
}

/// The `q`-quantile (0–1) of `sorted`, nearest rank; `None` when empty.
pub fn quantile(sorted: &[u64], q: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// The summary of `snap`, with rates over the time since `prev` (none
/// before the first reading: rates are then zero).
pub fn summarize(prev: Option<&Reading>, snap: Snapshot) -> Summary {
    let Snapshot {
        now,
        sizes,
        orders_by_state,
        lag_ms,
        city,
        mut samples,
        mut window,
        operators,
    } = snap;
    let secs = prev.map_or(0.0, |p| now.at.saturating_sub(p.at) as f64 / 1_000.0);
    let rate = |f: fn(&Reading) -> u64| match prev {
        Some(p) if secs > 0.0 => f(&now).saturating_sub(f(p)) as f64 / secs,
        _ => 0.0,
    };
    let mut lost = BTreeMap::new();
    for (reason, n) in &now.grabs_lost {
        let before = prev.and_then(|p| p.grabs_lost.get(reason)).copied();
        let per_s = if secs > 0.0 {
            n.saturating_sub(before.unwrap_or(0)) as f64 / secs
        } else {
            0.0
        };
        lost.insert(reason.clone(), per_s);
    }
    samples.sort_unstable();
    window.sort_unstable();
    let first = rate(|r| r.first_offers);
    let figures = Figures {
        riders: sizes.0,
        riders_indexed: sizes.1,
        merchants: sizes.2,
        orders: sizes.3,
        orders_open: open_orders(&orders_by_state),
        pings_per_s: rate(|r| r.pings),
        orders_per_s: rate(|r| r.orders),
        events_per_s: rate(|r| r.events),
        order_offer_p50_ms: quantile(&samples, 0.5),
        order_offer_p99_ms: quantile(&samples, 0.99),
        order_offer_p50_1m_ms: quantile(&window, 0.5),
        order_offer_p99_1m_ms: quantile(&window, 0.99),
        offer_rounds_per_order: (first > 0.0).then(|| rate(|r| r.rounds) / first),
        grabs_won_per_s: rate(|r| r.grabs_won),
        grabs_lost_per_s: lost.values().fold(0.0, |a, b| a + b),
        lag_ms,
    };
    let (cells, merchants, orders, cut) = places(&city);
    Summary {
        at: now.at,
        figures,
        grabs_lost_per_s: lost,
        orders_by_state,
        cells,
        riders: city
            .riders
            .iter()
            .map(|r| (r.id.clone(), r.at.lat(), r.at.lon(), r.load))
            .collect(),
        merchants,
        orders,
        truncated: city.truncated || cut,
        operators,
    }
}

/// Orders in any state but `closed`.
pub fn open_orders(by_state: &BTreeMap<crate::view::Name, i64>) -> i64 {
    by_state
        .iter()
        .filter(|(state, _)| *state != OrderState::Closed.name())
        .map(|(_, n)| *n)
        .sum()
}

type Places = (
    Vec<CellFigures>,
    Vec<(Id, f64, f64, u32)>,
    Vec<(Id, &'static str, f64, f64)>,
    bool,
);

/// The city's cells (supply and demand), merchants with waiting orders,
/// and orders placed on the map; whether cells were cut at the cap.
fn places(city: &City) -> Places {
    let mut cells: BTreeMap<u64, (u32, u32)> = BTreeMap::new();
    for r in &city.riders {
        cells.entry(r.cell).or_default().0 += 1;
    }
    let mut merchants: BTreeMap<&Id, (Coord, u32)> = BTreeMap::new();
    let mut orders = Vec::with_capacity(city.orders.len());
    for o in &city.orders {
        let waiting = matches!(o.state, OrderState::Created | OrderState::Notified);
        if let (true, Some(at)) = (waiting, o.merchant_at) {
            cells.entry(cell_of(at)).or_default().1 += 1;
            merchants.entry(&o.merchant).or_insert((at, 0)).1 += 1;
        }
        let at = if waiting {
            o.merchant_at
        } else {
            o.rider_at.or(o.merchant_at)
        };
        if let Some(at) = at {
            orders.push((o.id.clone(), o.state.name(), at.lat(), at.lon()));
        }
    }
    let cut = cells.len() > CITY_CAP;
    let cells = cells
        .into_iter()
        .take(CITY_CAP)
        .map(|(cell, (supply, demand))| CellFigures {
            cell: format!("{cell:x}"),
            supply,
            demand,
            boundary: cell_boundary(cell)
                .into_iter()
                .map(|c| [c.lat(), c.lon()])
                .collect(),
        })
        .collect();
    let merchants = merchants
        .into_iter()
        .map(|(id, (at, n))| (id.clone(), at.lat(), at.lon(), n))
        .collect();
    (cells, merchants, orders, cut)
}

/// An ops event, sent as it happens.
#[derive(Clone, Debug, Serialize)]
pub struct OpsEvent<'a> {
    /// `grab_timeout`, `overtime`, `cancelled`, `redispatched`,
    /// `reassigned` or `compensation_due`.
    pub kind: &'static str,
    /// The order.
    pub order_id: &'a Id,
    /// Its merchant.
    pub merchant_id: &'a Id,
    /// Its rider, if it has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rider_id: Option<&'a Id>,
    /// The state it entered.
    pub state: &'static str,
    /// When, Unix ms (log time).
    pub at: Time,
}

/// The ops event a transition for `reason` is, if it is one.
pub fn event_kind(reason: TransitionReason) -> Option<&'static str> {
    Some(match reason {
        TransitionReason::GrabTimeout => "grab_timeout",
        TransitionReason::DeadlinePassed => "overtime",
        TransitionReason::Cancelled => "cancelled",
        TransitionReason::Redispatched => "redispatched",
        TransitionReason::Reassigned => "reassigned",
        TransitionReason::CompensationDue => "compensation_due",
        _ => return None,
    })
}

/// Orders whose trail is kept at the most (the oldest leave first).
pub const TRAIL_CAP: usize = 20_000;

/// One rider offered an order.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct TrailOffer {
    /// The rider.
    #[schema(value_type = IdSchema)]
    pub rider_id: Id,
    /// Rider to merchant when offered, metres.
    pub distance_m: u32,
}

/// One offer round of an order.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct TrailRound {
    /// The round, from 0 (each timed-out round widens the radius).
    pub round: u32,
    /// When it was sent, Unix ms (log time).
    #[schema(value_type = u64)]
    pub at: Time,
    /// When it times out.
    #[schema(value_type = u64)]
    pub expires_at: Time,
    /// The riders offered, in the order dispatch chose them (nearest first).
    pub offers: Vec<TrailOffer>,
}

/// One grab attempt decided.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct TrailGrab {
    /// When it was decided, Unix ms (log time).
    #[schema(value_type = u64)]
    pub at: Time,
    /// The rider who tried.
    #[schema(value_type = IdSchema)]
    pub rider_id: Id,
    /// `result` (`won` or `lost`) and, if lost, `reason`.
    #[serde(flatten)]
    pub answer: GrabAnswer,
}

/// What the console saw of an order while it watched.
#[derive(Clone, Debug, Default, Serialize, ToSchema)]
pub struct Trail {
    /// Its offer rounds, oldest first.
    pub rounds: Vec<TrailRound>,
    /// Its grab race: every attempt decided, in decision order.
    pub grabs: Vec<TrailGrab>,
}

/// `GET /v1/ops/orders/{order_id}/trail`.
#[derive(Serialize, ToSchema)]
pub struct TrailAnswer {
    /// The order.
    #[schema(value_type = IdSchema)]
    pub order_id: Id,
    /// Whether a console watched while the order was dispatched: trails
    /// are kept only then (false: `rounds` and `grabs` are empty).
    pub recorded: bool,
    /// The trail.
    #[serde(flatten)]
    pub trail: Trail,
}

/// The trails kept, oldest order first.
#[derive(Default)]
struct Trails {
    by_order: HashMap<Id, Trail>,
    fifo: std::collections::VecDeque<Id>,
}

impl Trails {
    fn of(&mut self, order: &Id) -> &mut Trail {
        if !self.by_order.contains_key(order) {
            if self.fifo.len() >= TRAIL_CAP {
                if let Some(old) = self.fifo.pop_front() {
                    self.by_order.remove(&old);
                }
            }
            self.fifo.push_back(order.clone());
        }
        self.by_order.entry(order.clone()).or_default()
    }
}

/// One message of the stream: its SSE event name and its JSON text.
type Message = (&'static str, Arc<str>);

/// A histogram with fixed buckets, in Prometheus's shape.
#[derive(Default)]
struct Histogram {
    /// Counts per bucket of [`OFFER_BUCKETS_MS`] (not cumulative), and
    /// one more for above the last.
    buckets: [AtomicU64; OFFER_BUCKETS_MS.len() + 1],
    sum: AtomicU64,
}

impl Histogram {
    fn observe(&self, v: u64) {
        let i = OFFER_BUCKETS_MS.partition_point(|&b| b < v);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum.fetch_add(v, Ordering::Relaxed);
    }
}

/// Per order placed and not yet offered: its placement's log time.
#[derive(Default)]
struct Timing {
    placed: HashMap<Id, Time>,
    /// Samples (wall ms, latency ms) while someone watches, for the last
    /// minute.
    recent: std::collections::VecDeque<(Time, u64)>,
}

/// The console's feed: the broadcast, the thread that computes summaries
/// while anyone listens, and the figures [`Tapped`] takes from decisions.
pub struct OpsHub {
    tx: broadcast::Sender<Message>,
    /// Whether the summary thread runs; taken with the subscription so the
    /// task never stops under a new subscriber.
    running: Mutex<bool>,
    /// Someone watches: samples and events are kept.
    watched: AtomicBool,
    timing: Mutex<Timing>,
    /// Offer rounds and grab races of orders dispatched while watched.
    trails: Mutex<Trails>,
    offers: Histogram,
    rounds: AtomicU64,
    first_offers: AtomicU64,
    /// Summaries computed, ever (one a second while anyone listens,
    /// however many do).
    summaries: AtomicU64,
}

impl Default for OpsHub {
    fn default() -> Self {
        OpsHub {
            tx: broadcast::channel(CHANNEL).0,
            running: Mutex::new(false),
            watched: AtomicBool::new(false),
            timing: Mutex::default(),
            trails: Mutex::default(),
            offers: Histogram::default(),
            rounds: AtomicU64::new(0),
            first_offers: AtomicU64::new(0),
            summaries: AtomicU64::new(0),
        }
    }
}

impl OpsHub {
    /// Subscribes to the feed, starting the summary thread if it is not
    /// running.
    pub fn subscribe(self: &Arc<Self>, state: &EgressState) -> broadcast::Receiver<Message> {
        let mut running = self.running.lock().expect("ops hub");
        let rx = self.tx.subscribe();
        self.watched.store(true, Ordering::Release);
        if !*running {
            let (hub, state) = (Arc::clone(self), state.clone());
            let spawned = std::thread::Builder::new()
                .name("grabflow-ops-summary".into())
                .spawn(move || hub.summaries(state));
            match spawned {
                Ok(_) => *running = true,
                Err(e) => tracing::warn!("no ops summaries (a thread could not start): {e}"),
            }
        }
        rx
    }

    /// How many consoles listen.
    pub fn listeners(&self) -> usize {
        self.tx.receiver_count()
    }

    /// Whether the summary thread runs.
    pub fn running(&self) -> bool {
        *self.running.lock().expect("ops hub")
    }

    /// Computes and sends a summary at once and then each second until
    /// nobody listens. On a thread of its own at a lower priority (nice 10,
    /// this thread only, on Linux): a summary is a burst of work (the city,
    /// its cells, the JSON) that on a tokio worker delayed the requests
    /// queued behind it, and that on a busy machine should wait for a free
    /// core rather than take one from dispatch.
    fn summaries(self: Arc<Self>, state: EgressState) {
        if let Err(e) = rustix::process::setpriority_process(None, 10) {
            tracing::debug!("the ops summary thread keeps its priority: {e}");
        }
        let mut prev: Option<Reading> = None;
        let mut next = Instant::now();
        loop {
            let now = Instant::now();
            if next > now {
                std::thread::sleep(next - now);
            }
            next = next.max(now) + SUMMARY_EVERY;
            {
                let mut running = self.running.lock().expect("ops hub");
                if self.tx.receiver_count() == 0 {
                    *running = false;
                    self.watched.store(false, Ordering::Release);
                    self.timing.lock().expect("ops timing").recent.clear();
                    *self.trails.lock().expect("ops trails") = Trails::default();
                    return;
                }
            }
            let started = Instant::now();
            let snap = self.snapshot(&state);
            let reading = snap.now.clone();
            let summary = summarize(prev.as_ref(), snap);
            prev = Some(reading);
            let text = serde_json::to_string(&summary).expect("summaries serialize");
            self.summaries.fetch_add(1, Ordering::Relaxed);
            tracing::trace!(took = ?started.elapsed(), bytes = text.len(), "ops summary");
            let _ = self.tx.send(("summary", Arc::from(text)));
        }
    }

    /// Reads everything a summary needs.
    fn snapshot(&self, state: &EgressState) -> Snapshot {
        let egress = &state.egress;
        let c = egress.counters();
        let (progress, last_event) = egress.progress();
        let at = grabflow_log::now_ms();
        let (samples, window) = {
            let mut timing = self.timing.lock().expect("ops timing");
            let since = at.saturating_sub(HEADLINE_WINDOW.as_millis() as Time);
            while timing.recent.front().is_some_and(|&(t, _)| t < since) {
                timing.recent.pop_front();
            }
            let last = at.saturating_sub(SUMMARY_EVERY.as_millis() as Time);
            let samples = timing
                .recent
                .iter()
                .filter(|&&(t, _)| t >= last)
                .map(|&(_, v)| v)
                .collect();
            (samples, timing.recent.iter().map(|&(_, v)| v).collect())
        };
        let now = Reading {
            at,
            pings: c.events.get("location_pinged").copied().unwrap_or(0),
            orders: c.events.get("order_placed").copied().unwrap_or(0),
            events: c.events.values().sum(),
            rounds: self.rounds.load(Ordering::Relaxed),
            first_offers: self.first_offers.load(Ordering::Relaxed),
            grabs_won: c.grabs_won,
            grabs_lost: c.grabs_lost.clone(),
        };
        Snapshot {
            now,
            sizes: egress.sizes(),
            orders_by_state: c.orders_by_state,
            lag_ms: last_event.saturating_sub(progress.min(last_event)),
            city: egress.city(CITY_CAP),
            samples,
            window,
            operators: state.stats.snapshot(),
        }
    }

    /// Reads a batch of decisions (before the view applies it): times
    /// first offers, and while watched keeps the samples and sends ops
    /// events. `ready`: replay has caught up (replayed offers are not
    /// timed, nor sent as events).
    fn observe(&self, decisions: &[(Time, Output)], ready: bool) {
        let watched = self.watched.load(Ordering::Acquire);
        let mut timing = None;
        let mut now = None;
        let mut trails = None;
        for (t, o) in decisions {
            if watched {
                self.trail(t, o, &mut trails);
            }
            let Output::Transition {
                order,
                merchant,
                to,
                reason,
                rider,
                ..
            } = o
            else {
                continue;
            };
            let timing = timing.get_or_insert_with(|| self.timing.lock().expect("ops timing"));
            match reason {
                TransitionReason::Placed => {
                    timing.placed.insert(order.clone(), *t);
                }
                TransitionReason::Offered => {
                    self.rounds.fetch_add(1, Ordering::Relaxed);
                    if let Some(placed) = timing.placed.remove(order) {
                        self.first_offers.fetch_add(1, Ordering::Relaxed);
                        if ready {
                            let now = *now.get_or_insert_with(grabflow_log::now_ms);
                            let ms = now.saturating_sub(placed);
                            self.offers.observe(ms);
                            if watched {
                                timing.recent.push_back((now, ms));
                            }
                        }
                    }
                }
                _ if *to == OrderState::Closed => {
                    timing.placed.remove(order);
                }
                _ => {}
            }
            let kind = event_kind(*reason).filter(|_| watched && ready);
            if let Some(kind) = kind {
                let event = OpsEvent {
                    kind,
                    order_id: order,
                    merchant_id: merchant,
                    rider_id: rider.as_ref(),
                    state: to.name(),
                    at: *t,
                };
                let text = serde_json::to_string(&event).expect("events serialize");
                let _ = self.tx.send(("ops_event", Arc::from(text)));
            }
        }
    }

    /// Adds decision `o`, made at `t`, to its order's trail if it is an
    /// offer or a grab decided (`trails`: the lock, taken once a batch).
    fn trail<'h>(
        &'h self,
        t: &Time,
        o: &Output,
        trails: &mut Option<std::sync::MutexGuard<'h, Trails>>,
    ) {
        if !matches!(o, Output::Offered { .. } | Output::GrabDecided { .. }) {
            return;
        }
        let trails = trails.get_or_insert_with(|| self.trails.lock().expect("ops trails"));
        match o {
            Output::Offered {
                order,
                rider,
                distance_m,
                round,
                expires_at,
                ..
            } => {
                let trail = trails.of(order);
                let offer = TrailOffer {
                    rider_id: rider.clone(),
                    distance_m: *distance_m,
                };
                match trail.rounds.last_mut() {
                    Some(r) if r.round == *round && r.at == *t => r.offers.push(offer),
                    _ => trail.rounds.push(TrailRound {
                        round: *round,
                        at: *t,
                        expires_at: *expires_at,
                        offers: vec![offer],
                    }),
                }
            }
            Output::GrabDecided {
                order,
                rider,
                outcome,
                ..
            } => trails.of(order).grabs.push(TrailGrab {
                at: *t,
                rider_id: rider.clone(),
                answer: GrabAnswer::from(*outcome),
            }),
            _ => {}
        }
    }

    /// The trail of `order`, if one was kept.
    pub fn trail_of(&self, order: &Id) -> Option<Trail> {
        let trails = self.trails.lock().expect("ops trails");
        trails.by_order.get(order).cloned()
    }

    /// Summaries computed since the process started.
    pub fn summaries_computed(&self) -> u64 {
        self.summaries.load(Ordering::Relaxed)
    }

    /// The console's figures in Prometheus's text format: consoles
    /// listening, summaries computed, and the `grabflow_order_offer_ms`
    /// histogram.
    pub fn prometheus(&self, out: &mut String) {
        out.push_str(&format!(
            "# HELP grabflow_ops_consoles Ops consoles (and other clients) on /v1/ops/stream.\n\
             # TYPE grabflow_ops_consoles gauge\ngrabflow_ops_consoles {}\n\
             # HELP grabflow_ops_summaries_total Console summaries computed (one a second while \
             anyone listens, however many do).\n\
             # TYPE grabflow_ops_summaries_total counter\ngrabflow_ops_summaries_total {}\n",
            self.listeners(),
            self.summaries_computed()
        ));
        out.push_str(&format!(
            "# HELP grabflow_offer_rounds_total Offer rounds sent (first rounds and re-offers).\n\
             # TYPE grabflow_offer_rounds_total counter\ngrabflow_offer_rounds_total {}\n\
             # HELP grabflow_first_offers_total Orders offered for the first time.\n\
             # TYPE grabflow_first_offers_total counter\ngrabflow_first_offers_total {}\n",
            self.rounds.load(Ordering::Relaxed),
            self.first_offers.load(Ordering::Relaxed)
        ));
        let name = "grabflow_order_offer_ms";
        out.push_str(&format!(
            "# HELP {name} Order placed (log time) to its first offer round reaching egress, ms.\n\
             # TYPE {name} histogram\n"
        ));
        let mut cumulative = 0;
        for (i, bound) in OFFER_BUCKETS_MS.iter().enumerate() {
            cumulative += self.offers.buckets[i].load(Ordering::Relaxed);
            out.push_str(&format!("{name}_bucket{{le=\"{bound}\"}} {cumulative}\n"));
        }
        cumulative += self.offers.buckets[OFFER_BUCKETS_MS.len()].load(Ordering::Relaxed);
        out.push_str(&format!("{name}_bucket{{le=\"+Inf\"}} {cumulative}\n"));
        out.push_str(&format!(
            "{name}_sum {}\n{name}_count {cumulative}\n",
            self.offers.sum.load(Ordering::Relaxed)
        ));
    }
}

/// The dataflow's observer in front of the view: the hub reads each
/// batch of decisions, then the view applies it.
pub struct Tapped {
    /// The view.
    pub egress: Arc<Egress>,
    /// The console's feed.
    pub hub: Arc<OpsHub>,
}

impl Observer for Tapped {
    fn events(&self, events: &[Event]) {
        self.egress.events(events);
    }
    fn decisions(&self, decisions: Vec<(Time, Output)>) {
        self.hub.observe(&decisions, self.egress.is_ready());
        self.egress.decisions(decisions);
    }
    fn index(&self, changes: Vec<(IndexEntry, Time, isize)>) {
        self.egress.index(changes);
    }
    fn progress(&self, time: Time) {
        Observer::progress(&*self.egress, time);
    }
    fn save(&self, at: Time) -> Saving {
        self.egress.save(at)
    }
}

/// `?access_token=` for `EventSource`, which cannot set headers.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpsStreamQuery {
    /// An ops token, for clients that cannot send `Authorization`.
    pub access_token: Option<String>,
}

/// The ops console's live feed (Server-Sent Events): a `summary` event
/// every second, and an `ops_event` as each happens.
#[utoipa::path(get, path = "/v1/ops/stream", params(("access_token" = Option<String>, Query, description = "The ops token, for clients that cannot set `Authorization`")),
    responses((status = 200, description = "Server-Sent Events: `event: summary` every second (`data`: the city's figures, riders, orders, cells, operators; docs/api.md), `event: ops_event` as grab timeouts, overtime, cancellations, redispatches and reassignments happen", content_type = "text/event-stream")),
    security(("bearer" = []), ("access_token" = [])))]
pub async fn ops_stream(
    State(s): State<EgressState>,
    QueryParams(q): QueryParams<OpsStreamQuery>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    stream_claims(&s, &headers, q.access_token.as_deref())?.require(&[Role::Ops], None)?;
    let rx = s.ops.subscribe(&s);
    let egress = Arc::clone(&s.egress);
    let closed = async move { egress.closed().await };
    let stream = BroadcastStream::new(rx)
        .filter_map(|m| async move {
            // A console that fell behind skips what it missed.
            let (name, text) = m.ok()?;
            Some(Ok(SseEvent::default().event(name).data(text.as_ref())))
        })
        .take_until(Box::pin(closed));
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

/// The offer rounds (riders offered, their distances) and the grab race
/// (every attempt, winner and losers' reasons) of an order, as kept while
/// a console watched.
#[utoipa::path(get, path = "/v1/ops/orders/{order_id}/trail", params(("order_id" = String, Path)),
    responses((status = 200, description = "The order's trail", body = TrailAnswer), (status = 404)),
    security(("bearer" = [])))]
pub async fn order_trail(
    State(s): State<EgressState>,
    Auth(claims): Auth,
    Path(order_id): Path<String>,
) -> Result<Json<TrailAnswer>, ApiError> {
    claims.require(&[Role::Ops], None)?;
    let id = wire::id(&order_id, "order_id")?;
    if s.egress.order(&id).is_none() {
        return Err(ApiError::not_found("order_id", format!("no order {id}")));
    }
    let trail = s.ops.trail_of(&id);
    Ok(Json(TrailAnswer {
        order_id: id,
        recorded: trail.is_some(),
        trail: trail.unwrap_or_default(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> Id {
        s.parse().unwrap()
    }

    fn at(lat: f64, lon: f64) -> Coord {
        Coord::from_degrees(lat, lon).unwrap()
    }

    #[test]
    fn quantiles_take_the_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(quantile(&v, 0.5), Some(50));
        assert_eq!(quantile(&v, 0.99), Some(99));
        assert_eq!(quantile(&[7], 0.99), Some(7));
        assert_eq!(quantile(&[], 0.5), None);
    }

    #[test]
    fn a_summary_has_rates_over_the_interval_and_the_city_by_cell() {
        let prev = Reading {
            at: 10_000,
            pings: 100,
            orders: 10,
            events: 120,
            rounds: 10,
            first_offers: 8,
            grabs_won: 5,
            grabs_lost: [("already_taken".to_string(), 2)].into(),
        };
        let now = Reading {
            at: 12_000,
            pings: 300,
            orders: 14,
            events: 330,
            rounds: 16,
            first_offers: 12,
            grabs_won: 9,
            grabs_lost: [("already_taken".to_string(), 6)].into(),
        };
        let m = at(31.23, 121.47);
        let rider = CityRider {
            id: id("R1"),
            at: at(31.231, 121.47),
            cell: cell_of(m),
            load: 1,
        };
        let order = |o: &str, state| CityOrder {
            id: id(o),
            state,
            merchant: id("M1"),
            merchant_at: Some(m),
            rider_at: Some(rider.at),
        };
        let city = City {
            riders: vec![rider.clone()],
            orders: vec![
                order("O1", OrderState::Created),
                order("O2", OrderState::Notified),
                order("O3", OrderState::Delivering),
            ],
            truncated: false,
        };
        let by_state: BTreeMap<_, _> = [("created", 1), ("notified", 1), ("delivering", 1)]
            .into_iter()
            .chain([("closed", 7)])
            .map(|(k, v)| (k.into(), v))
            .collect();
        let s = summarize(
            Some(&prev),
            Snapshot {
                now,
                sizes: (3, 1, 1, 10),
                orders_by_state: by_state,
                lag_ms: 4,
                city,
                samples: vec![9, 3, 5],
                window: vec![3, 5, 9, 40],
                operators: Vec::new(),
            },
        );
        let f = &s.figures;
        assert_eq!(
            (f.pings_per_s, f.orders_per_s, f.events_per_s),
            (100.0, 2.0, 105.0)
        );
        assert_eq!(
            (f.order_offer_p50_ms, f.order_offer_p99_ms),
            (Some(5), Some(9))
        );
        assert_eq!(f.order_offer_p99_1m_ms, Some(40));
        assert_eq!(f.offer_rounds_per_order, Some(1.5));
        assert_eq!((f.grabs_won_per_s, f.grabs_lost_per_s), (2.0, 2.0));
        assert_eq!((f.orders_open, f.riders_indexed, f.lag_ms), (3, 1, 4));
        assert_eq!(s.cells.len(), 1);
        let cell = &s.cells[0];
        assert_eq!((cell.supply, cell.demand, cell.boundary.len()), (1, 2, 6));
        assert_eq!(s.merchants, vec![(id("M1"), 31.23, 121.47, 2)]);
        let states: Vec<_> = s.orders.iter().map(|o| (o.1, o.2)).collect();
        assert_eq!(
            states,
            [
                ("created", 31.23),
                ("notified", 31.23),
                ("delivering", 31.231)
            ]
        );
        // No earlier reading: no rates.
        let first = summarize(
            None,
            Snapshot {
                now: prev.clone(),
                sizes: (0, 0, 0, 0),
                orders_by_state: BTreeMap::new(),
                lag_ms: 0,
                city: City::default(),
                samples: Vec::new(),
                window: Vec::new(),
                operators: Vec::new(),
            },
        );
        assert_eq!(first.figures.pings_per_s, 0.0);
        assert_eq!(first.figures.order_offer_p99_ms, None);
    }

    fn transition(order: &str, to: OrderState, reason: TransitionReason) -> Output {
        Output::Transition {
            order: id(order),
            merchant: id("M1"),
            from: None,
            to,
            reason,
            rider: None,
            event: None,
        }
    }

    fn offered(order: &str, rider: &str, distance_m: u32) -> Output {
        Output::Offered {
            order: id(order),
            rider: id(rider),
            merchant: id("M1"),
            distance_m,
            round: 0,
            expires_at: 31_000,
        }
    }

    #[test]
    fn while_watched_the_tap_keeps_trails_and_sends_events() {
        use grabflow_api::{GrabOutcome, LossReason};
        let hub = OpsHub::default();
        let decisions = vec![
            (
                1_000,
                transition("O1", OrderState::Created, TransitionReason::Placed),
            ),
            (1_000, offered("O1", "R1", 100)),
            (1_000, offered("O1", "R2", 250)),
            (
                1_000,
                transition("O1", OrderState::Notified, TransitionReason::Offered),
            ),
            (
                1_200,
                Output::GrabDecided {
                    attempt: id("A1"),
                    order: id("O1"),
                    rider: id("R2"),
                    outcome: GrabOutcome::Won,
                },
            ),
            (
                1_201,
                Output::GrabDecided {
                    attempt: id("A2"),
                    order: id("O1"),
                    rider: id("R1"),
                    outcome: GrabOutcome::Lost(LossReason::AlreadyTaken),
                },
            ),
        ];
        // Nobody watches: only the first offer is timed.
        hub.observe(&decisions, true);
        assert!(hub.trail_of(&id("O1")).is_none());
        assert_eq!(
            hub.offers
                .buckets
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .sum::<u64>(),
            1
        );
        // Watched: trails and events.
        hub.watched.store(true, Ordering::Release);
        let mut rx = hub.tx.subscribe();
        let again: Vec<_> = decisions
            .iter()
            .map(|(t, o)| (*t, o.clone()))
            .chain([(
                40_000,
                transition("O1", OrderState::Created, TransitionReason::Redispatched),
            )])
            .collect();
        hub.observe(&again, true);
        let trail = hub.trail_of(&id("O1")).expect("a trail");
        assert_eq!(trail.rounds.len(), 1);
        let offers: Vec<_> = trail.rounds[0]
            .offers
            .iter()
            .map(|o| (o.rider_id.as_str(), o.distance_m))
            .collect();
        assert_eq!(offers, [("R1", 100), ("R2", 250)]);
        let race = serde_json::to_value(&trail.grabs).unwrap();
        assert_eq!(
            race,
            serde_json::json!([
                {"at": 1_200, "rider_id": "R2", "result": "won"},
                {"at": 1_201, "rider_id": "R1", "result": "lost", "reason": "already_taken"}
            ])
        );
        let (name, text) = rx.try_recv().expect("an ops event");
        assert_eq!(name, "ops_event");
        let event: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            (event["kind"].as_str(), event["at"].as_u64()),
            (Some("redispatched"), Some(40_000))
        );
        // Replayed decisions (not ready) send no events.
        hub.observe(&again[6..], false);
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn the_offer_histogram_is_cumulative() {
        let hub = OpsHub::default();
        for v in [0, 1, 3, 3, 40_000] {
            hub.offers.observe(v);
        }
        let mut out = String::new();
        hub.prometheus(&mut out);
        assert!(
            out.contains("grabflow_order_offer_ms_bucket{le=\"1\"} 2\n"),
            "{out}"
        );
        assert!(
            out.contains("grabflow_order_offer_ms_bucket{le=\"5\"} 4\n"),
            "{out}"
        );
        assert!(
            out.contains("grabflow_order_offer_ms_bucket{le=\"30000\"} 4\n"),
            "{out}"
        );
        assert!(
            out.contains("grabflow_order_offer_ms_bucket{le=\"+Inf\"} 5\n"),
            "{out}"
        );
        assert!(out.contains("grabflow_order_offer_ms_count 5\n"), "{out}");
        assert!(out.contains("grabflow_order_offer_ms_sum 40007\n"), "{out}");
    }
}
