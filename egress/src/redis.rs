//! Redis: the live index and order states, mirrored for other services.
//!
//! [`RedisMirror`] is an `Observer` of the dataflow. It hands what it hears to
//! its own thread, which keeps the mirrored state in memory and writes each
//! batch of changes as one pipeline. Keys, under a prefix (`grabflow:`):
//!
//! | key | type | holds |
//! |---|---|---|
//! | `{p}riders` | GEO set | every indexed rider (on shift, pinged within the TTL) |
//! | `{p}rider:{id}` | hash | `cell` (H3 res 8, hex), `lat`, `lon`, `time` of an indexed rider |
//! | `{p}merchant:{id}:riders` | sorted set | for a merchant with an order waiting for a rider: each indexed rider within the base radius, scored by distance in metres |
//! | `{p}order:{id}` | hash | a live order: `state`, `merchant`, `rider` (when assigned), `updated_at` |
//! | `{p}orders` | set | ids of the live orders |
//! | `{p}meta` | hash | `progress`: every change before this log ms is mirrored |
//!
//! When a write fails (Redis away), the mirror keeps dispatching's pace: it
//! goes on applying changes in memory and retries the connection; once back,
//! it deletes the prefix's keys and writes the whole state again, so Redis
//! converges to the in-memory state.

use grabflow_api::lifecycle::Thread;
use grabflow_api::{Coord, Event, EventKind, Id, OrderState, Output, Time};
use grabflow_dataflow::geo_index::{cell_of, GeoIndex};
use grabflow_dataflow::runtime::Observer;
use grabflow_dataflow::IndexEntry;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

/// Errors of the Redis side.
#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    /// The URL is not a Redis URL.
    #[error("redis: {0}")]
    Client(#[from] redis::RedisError),
    /// The mirror's thread could not be started.
    #[error("starting the redis mirror: {0}")]
    Thread(#[from] std::io::Error),
}

enum Msg {
    Events(Vec<Event>),
    Decisions(Vec<(Time, Output)>),
    Index(Vec<(IndexEntry, Time, isize)>),
    Progress(Time),
}

/// How the mirror is doing (for ops).
#[derive(Default)]
pub struct MirrorStatus {
    /// Whether the last write succeeded.
    pub connected: AtomicBool,
    /// Full rewrites done after Redis came back (or at start).
    pub resyncs: AtomicU64,
    /// Log ms before which every change is in Redis.
    pub mirrored: AtomicU64,
}

/// Mirrors the index and live orders into Redis.
pub struct RedisMirror {
    tx: Mutex<mpsc::Sender<Msg>>,
    /// How the mirror is doing.
    pub status: Arc<MirrorStatus>,
}

impl RedisMirror {
    /// Starts mirroring to `url` under `prefix`; `radius_m` is the base
    /// offer radius of the merchants' rider sets. The mirror's thread ends
    /// once every handle to the mirror is dropped.
    pub fn start(
        url: &str,
        prefix: &str,
        radius_m: f64,
    ) -> Result<(Arc<RedisMirror>, Thread), RedisError> {
        let client = redis::Client::open(url)?;
        let (tx, rx) = mpsc::channel();
        let status = Arc::new(MirrorStatus::default());
        let mut state = Mirror {
            prefix: prefix.to_string(),
            radius_m,
            riders: GeoIndex::default(),
            rider_time: HashMap::new(),
            merchants: HashMap::new(),
            orders: HashMap::new(),
            waiting: HashMap::new(),
            hot: GeoIndex::default(),
            sets: HashMap::new(),
            progress: 0,
            ops: redis::pipe(),
            dirty: true,
        };
        let st = Arc::clone(&status);
        let thread = Thread::spawn("grabflow-redis", move |_| state.run(&client, &rx, &st))?;
        let mirror = Arc::new(RedisMirror {
            tx: Mutex::new(tx),
            status,
        });
        Ok((mirror, thread))
    }

    fn send(&self, m: Msg) {
        let _ = self.tx.lock().expect("mirror").send(m);
    }
}

impl Observer for RedisMirror {
    fn events(&self, events: &[Event]) {
        // Merchants' positions place their rider sets; orders come with
        // their merchant in the transitions.
        let wanted: Vec<Event> = events
            .iter()
            .filter(|e| matches!(e.kind, EventKind::MerchantUpserted { .. }))
            .cloned()
            .collect();
        if !wanted.is_empty() {
            self.send(Msg::Events(wanted));
        }
    }
    fn decisions(&self, decisions: Vec<(Time, Output)>) {
        self.send(Msg::Decisions(decisions));
    }
    fn index(&self, changes: Vec<(IndexEntry, Time, isize)>) {
        self.send(Msg::Index(changes));
    }
    fn progress(&self, time: Time) {
        self.send(Msg::Progress(time));
    }
}

/// A live order as mirrored.
#[derive(Clone)]
struct OrderRow {
    state: OrderState,
    merchant: Id,
    rider: Option<Id>,
    updated_at: Time,
}

/// The mirror thread's state.
struct Mirror {
    prefix: String,
    radius_m: f64,
    riders: GeoIndex,
    rider_time: HashMap<Id, Time>,
    merchants: HashMap<Id, Coord>,
    orders: HashMap<Id, OrderRow>,
    /// Orders waiting for a rider, per merchant.
    waiting: HashMap<Id, usize>,
    /// Merchants with waiting orders, by position.
    hot: GeoIndex,
    /// Each hot merchant's rider set, as written.
    sets: HashMap<Id, HashMap<Id, f64>>,
    progress: Time,
    /// Commands of the current batch.
    ops: redis::Pipeline,
    /// Redis must be rewritten from the state (start, or after a failure).
    dirty: bool,
}

fn waits(s: OrderState) -> bool {
    matches!(s, OrderState::Created | OrderState::Notified)
}

impl Mirror {
    fn key(&self, parts: &[&str]) -> String {
        let mut k = self.prefix.clone();
        k.push_str(&parts.concat());
        k
    }

    fn run(&mut self, client: &redis::Client, rx: &mpsc::Receiver<Msg>, status: &MirrorStatus) {
        let mut con: Option<redis::Connection> = None;
        loop {
            let first = match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(m) => Some(m),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            };
            self.ops = redis::pipe();
            for m in first.into_iter().chain(rx.try_iter()) {
                self.apply(m);
            }
            if con.is_none() {
                con = client
                    .get_connection_with_timeout(Duration::from_millis(500))
                    .ok();
                if con.is_none() {
                    status.connected.store(false, Ordering::Release);
                    self.dirty = true;
                    continue;
                }
            }
            let c = con.as_mut().expect("connected");
            let result = if self.dirty {
                self.resync(c).inspect(|_| {
                    status.resyncs.fetch_add(1, Ordering::Relaxed);
                })
            } else {
                self.write_progress();
                self.ops.query::<()>(c)
            };
            match result {
                Ok(()) => {
                    self.dirty = false;
                    status.connected.store(true, Ordering::Release);
                    status.mirrored.store(self.progress, Ordering::Release);
                }
                Err(e) => {
                    if status.connected.swap(false, Ordering::AcqRel) {
                        tracing::warn!(error = %e, "redis mirror: write failed; will resync");
                    }
                    self.dirty = true;
                    con = None;
                }
            }
        }
    }

    fn apply(&mut self, m: Msg) {
        match m {
            Msg::Events(events) => {
                for e in events {
                    if let EventKind::MerchantUpserted { merchant, at, .. } = e.kind {
                        if self.hot.get(&merchant).is_some()
                            && self.merchants.get(&merchant) != Some(&at)
                        {
                            self.merchants.insert(merchant.clone(), at);
                            self.cool(&merchant);
                            self.heat(&merchant);
                        } else {
                            self.merchants.insert(merchant, at);
                        }
                    }
                }
            }
            Msg::Decisions(ds) => {
                for (t, o) in ds {
                    if let Output::Transition {
                        order,
                        merchant,
                        from,
                        to,
                        rider,
                        ..
                    } = o
                    {
                        let waited = from.is_some_and(waits);
                        self.transition(order, merchant, waited, to, rider, t);
                    }
                }
            }
            Msg::Index(mut changes) => {
                changes.sort_by_key(|(_, t, d)| (*t, -*d));
                for (e, t, d) in changes {
                    if d > 0 {
                        self.rider_moved(&e.rider, Some((e.cell, e.at)), t);
                    } else if self.riders.get(&e.rider) == Some((e.cell, e.at)) {
                        self.rider_moved(&e.rider, None, t);
                    }
                }
            }
            Msg::Progress(t) => self.progress = self.progress.max(t),
        }
    }

    /// An order entered state `to`, from a state that was waiting for a
    /// rider or not (`was_waiting`).
    fn transition(
        &mut self,
        order: Id,
        merchant: Id,
        was_waiting: bool,
        to: OrderState,
        rider: Option<Id>,
        t: Time,
    ) {
        let okey = self.key(&["order:", order.as_str()]);
        let live = self.key(&["orders"]);
        if to == OrderState::Closed {
            self.orders.remove(&order);
            self.ops.cmd("DEL").arg(&okey).ignore();
            self.ops.cmd("SREM").arg(&live).arg(order.as_str()).ignore();
        } else {
            let row = OrderRow {
                state: to,
                merchant: merchant.clone(),
                rider,
                updated_at: t,
            };
            self.write_order(&order, &row);
            self.orders.insert(order, row);
        }
        match (was_waiting, waits(to)) {
            (false, true) => {
                *self.waiting.entry(merchant.clone()).or_default() += 1;
                if self.waiting[&merchant] == 1 {
                    self.heat(&merchant);
                }
            }
            (true, false) => {
                let n = self.waiting.get_mut(&merchant).expect("counted");
                *n -= 1;
                if *n == 0 {
                    self.waiting.remove(&merchant);
                    self.cool(&merchant);
                }
            }
            _ => {}
        }
    }

    fn write_order(&mut self, order: &Id, row: &OrderRow) {
        let okey = self.key(&["order:", order.as_str()]);
        let live = self.key(&["orders"]);
        self.ops
            .cmd("HSET")
            .arg(&okey)
            .arg("state")
            .arg(row.state.name())
            .arg("merchant")
            .arg(row.merchant.as_str())
            .arg("updated_at")
            .arg(row.updated_at)
            .ignore();
        match &row.rider {
            Some(r) => self
                .ops
                .cmd("HSET")
                .arg(&okey)
                .arg("rider")
                .arg(r.as_str())
                .ignore(),
            None => self.ops.cmd("HDEL").arg(&okey).arg("rider").ignore(),
        };
        self.ops.cmd("SADD").arg(&live).arg(order.as_str()).ignore();
    }

    fn write_progress(&mut self) {
        let meta = self.key(&["meta"]);
        self.ops
            .cmd("HSET")
            .arg(meta)
            .arg("progress")
            .arg(self.progress)
            .ignore();
    }

    /// A merchant got its first waiting order: compute its rider set.
    fn heat(&mut self, merchant: &Id) {
        let Some(&at) = self.merchants.get(merchant) else {
            return;
        };
        self.hot.upsert(merchant, cell_of(at), at);
        let near: HashMap<Id, f64> = self
            .riders
            .nearest(at, self.radius_m, usize::MAX, |_| true)
            .into_iter()
            .collect();
        let key = self.key(&["merchant:", merchant.as_str(), ":riders"]);
        self.ops.cmd("DEL").arg(&key).ignore();
        if !near.is_empty() {
            let cmd = self.ops.cmd("ZADD").arg(&key);
            for (r, d) in &near {
                cmd.arg(d.round() as i64).arg(r.as_str());
            }
            cmd.ignore();
        }
        self.sets.insert(merchant.clone(), near);
    }

    /// A merchant has no waiting order any more: drop its rider set.
    fn cool(&mut self, merchant: &Id) {
        self.hot.remove(merchant);
        self.sets.remove(merchant);
        let key = self.key(&["merchant:", merchant.as_str(), ":riders"]);
        self.ops.cmd("DEL").arg(key).ignore();
    }

    fn rider_moved(&mut self, rider: &Id, now: Option<(u64, Coord)>, t: Time) {
        let before = self.riders.get(rider);
        let geo = self.key(&["riders"]);
        let hkey = self.key(&["rider:", rider.as_str()]);
        match now {
            Some((cell, at)) => {
                self.riders.upsert(rider, cell, at);
                self.rider_time.insert(rider.clone(), t);
                // Redis GEO takes latitudes within ±85.05°; a rider nearer a
                // pole is in the hash only.
                if at.lat().abs() > 85.05 {
                    self.ops.cmd("ZREM").arg(&geo).arg(rider.as_str()).ignore();
                } else {
                    self.ops
                        .cmd("GEOADD")
                        .arg(&geo)
                        .arg(at.lon())
                        .arg(at.lat())
                        .arg(rider.as_str())
                        .ignore();
                }
                self.ops
                    .cmd("HSET")
                    .arg(&hkey)
                    .arg("cell")
                    .arg(format!("{cell:x}"))
                    .arg("lat")
                    .arg(at.lat())
                    .arg("lon")
                    .arg(at.lon())
                    .arg("time")
                    .arg(t)
                    .ignore();
            }
            None => {
                self.riders.remove(rider);
                self.rider_time.remove(rider);
                self.ops.cmd("ZREM").arg(&geo).arg(rider.as_str()).ignore();
                self.ops.cmd("DEL").arg(&hkey).ignore();
            }
        }
        // The hot merchants near where the rider was or is now.
        let mut touched: HashSet<Id> = HashSet::new();
        for (_, at) in before.into_iter().chain(now) {
            touched.extend(
                self.hot
                    .nearest(at, self.radius_m, usize::MAX, |_| true)
                    .into_iter()
                    .map(|(m, _)| m),
            );
        }
        for m in touched {
            let mat = self.merchants[&m];
            let key = self.key(&["merchant:", m.as_str(), ":riders"]);
            let d = now
                .map(|(_, at)| grabflow_api::geo::distance_m(mat, at))
                .filter(|d| *d <= self.radius_m);
            let set = self.sets.entry(m).or_default();
            match d {
                Some(d) => {
                    set.insert(rider.clone(), d);
                    self.ops
                        .cmd("ZADD")
                        .arg(&key)
                        .arg(d.round() as i64)
                        .arg(rider.as_str())
                        .ignore();
                }
                None => {
                    if set.remove(rider).is_some() {
                        self.ops.cmd("ZREM").arg(&key).arg(rider.as_str()).ignore();
                    }
                }
            }
        }
    }

    /// Deletes the prefix's keys and writes the whole state.
    fn resync(&mut self, c: &mut redis::Connection) -> redis::RedisResult<()> {
        let pattern = format!("{}*", self.prefix);
        let keys: Vec<String> = redis::cmd("KEYS").arg(&pattern).query(c)?;
        for chunk in keys.chunks(1000) {
            redis::cmd("DEL").arg(chunk).query::<()>(c)?;
        }
        self.ops = redis::pipe();
        let riders: Vec<(Id, (u64, Coord), Time)> = self
            .rider_time
            .iter()
            .filter_map(|(r, t)| self.riders.get(r).map(|x| (r.clone(), x, *t)))
            .collect();
        let sets = std::mem::take(&mut self.sets);
        let hot: Vec<Id> = sets.keys().cloned().collect();
        // Re-add every rider with no hot merchant (the sets come after).
        for m in &hot {
            self.hot.remove(m);
        }
        for (r, (cell, at), t) in riders {
            self.rider_moved(&r, Some((cell, at)), t);
        }
        for m in hot {
            self.heat(&m);
        }
        let orders: Vec<(Id, OrderRow)> = self
            .orders
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (o, row) in orders {
            self.write_order(&o, &row);
        }
        self.write_progress();
        std::mem::replace(&mut self.ops, redis::pipe()).query::<()>(c)
    }
}
