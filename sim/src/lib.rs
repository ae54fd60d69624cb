//! # grabflow-sim — a city that drives grabflow like real traffic
//!
//! `grabflow sim` talks to a running grabflow only through its public API,
//! as real clients do: merchants and orders over HTTP, one WebSocket per
//! rider for offers. Riders ride a street grid at scooter speed, ping every
//! few seconds, react to offers after a human delay, grab some, ride to the
//! merchant, pick up, ride to the customer and deliver. Orders follow a day's
//! shape (lunch and dinner peaks) and Zipf popularity over merchants; some
//! are cancelled. Time can run faster than real time (`speed`), and a seed
//! makes the city repeatable.
//!
//! ## Layout
//!
//! - [`run`]: the simulation and its end-of-run consistency check against
//!   the server's own `/v1/ops/metrics`.
//! - [`city`]: merchant clusters, the street grid, the day's shape.
//! - [`report`]: what was measured ([`report::Report`]).
//! - [`plot`]: PNG charts of the day.

pub mod city;
pub mod plot;
pub mod report;

use futures_util::StreamExt;
use grabflow_api::{Coord, Id};
use grabflow_http::auth::{Claims, Role, Secret};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Exp, Zipf};
use report::{Latency, Minute, Report};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// How a simulation runs.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// The grabflow server, e.g. `http://127.0.0.1:8080`.
    pub url: String,
    /// The server's data dir, whose secret signs the simulator's tokens.
    pub data_dir: PathBuf,
    /// Simulated seconds per real second.
    pub speed: f64,
    /// Seed of the city and of every random choice.
    pub seed: u64,
    /// Riders.
    pub riders: usize,
    /// Merchants.
    pub merchants: usize,
    /// Orders per minute at the base of the day's shape (peaks reach ~5×).
    pub orders_per_min: f64,
    /// Simulated clock at the start, hours (e.g. 10.5 is 10:30).
    pub start_hour: f64,
    /// Simulated minutes to run.
    pub minutes: f64,
    /// Draw a progress bar.
    pub progress: bool,
    /// Put in the order and rider ids (`sim{tag}-o{n}`, `sim{tag}-r{n}`),
    /// so that runs against the same server are different orders and
    /// riders (a run ends with riders mid-delivery, loaded for good).
    pub tag: String,
}

/// Errors that stop a simulation.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// The server could not be reached or refused the set-up.
    #[error("server: {0}")]
    Server(String),
    /// The token secret could not be read.
    #[error("tokens: {0}")]
    Tokens(String),
}

/// A placed order, as the simulator knows it.
struct Placed {
    at: Instant,
    minute: usize,
    merchant: Coord,
    dropoff: Coord,
    offered: bool,
    wins: u32,
}

#[derive(Default)]
struct Stats {
    events_sent: u64,
    errors: BTreeMap<String, u64>,
    orders: HashMap<String, Placed>,
    offer_ms: Vec<(usize, f64)>,
    grab_ms: Vec<f64>,
    index_ms: Vec<f64>,
    minutes: Vec<Minute>,
}

impl Stats {
    /// Minute `m` of the run (which starts at `start_hour`).
    fn minute(&mut self, m: usize, start_hour: f64) -> &mut Minute {
        while self.minutes.len() <= m {
            let hour = start_hour + self.minutes.len() as f64 / 60.0;
            self.minutes.push(Minute {
                hour,
                ..Minute::default()
            });
        }
        &mut self.minutes[m]
    }
}

struct World {
    cfg: SimConfig,
    http: reqwest::Client,
    secret: Secret,
    app: String,
    start: Instant,
    merchants: Vec<Coord>,
    stats: Mutex<Stats>,
    stop: AtomicBool,
}

impl World {
    fn sim_secs(&self) -> f64 {
        self.start.elapsed().as_secs_f64() * self.cfg.speed
    }
    fn minute(&self) -> usize {
        (self.sim_secs() / 60.0) as usize
    }
    fn hour(&self) -> f64 {
        self.cfg.start_hour + self.sim_secs() / 3600.0
    }
    async fn sleep_sim(&self, secs: f64) {
        tokio::time::sleep(Duration::from_secs_f64((secs / self.cfg.speed).max(0.0))).await;
    }
    fn token(&self, role: Role, id: Option<&str>) -> String {
        self.secret.sign(&Claims {
            role,
            id: id.map(|i| Id::new(i).expect("simulated ids are valid")),
        })
    }
    fn error(&self, kind: String) {
        *self
            .stats
            .lock()
            .expect("stats")
            .errors
            .entry(kind)
            .or_default() += 1;
    }

    /// One API call; counts it and its error, if any.
    async fn call(
        &self,
        method: &str,
        path: &str,
        token: &str,
        body: Option<Value>,
    ) -> Option<(u16, Value)> {
        if method != "GET" {
            self.stats.lock().expect("stats").events_sent += 1;
        }
        let mut req = self
            .http
            .request(
                method.parse().expect("method"),
                format!("{}{path}", self.cfg.url),
            )
            .bearer_auth(token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        match req.send().await {
            Ok(resp) => {
                let status = resp.status().as_u16();
                let value: Value = resp.json().await.unwrap_or(Value::Null);
                if status >= 400 {
                    let code = value["error"]["code"].as_str().unwrap_or("?").to_string();
                    self.error(format!("http_{status}_{code}"));
                }
                Some((status, value))
            }
            Err(e) => {
                self.error(if e.is_timeout() {
                    "timeout".into()
                } else {
                    "transport".into()
                });
                None
            }
        }
    }
}

/// One leg of a rider's work.
struct Leg {
    order: String,
    to: Coord,
    pickup: bool,
}

async fn rider(world: Arc<World>, n: usize, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let id = format!("sim{}-r{n}", world.cfg.tag);
    let token = world.token(Role::Rider, Some(&id));
    let mut at = city::rider_start(&mut rng);
    // Shifts start over the first minutes; some riders leave mid-run.
    world
        .sleep_sim(rng.random_range(0.0..120.0_f64.min(world.cfg.minutes * 6.0)))
        .await;
    let leaves_at = if rng.random_bool(0.15) {
        world.cfg.minutes * 60.0 * rng.random_range(0.5..0.9)
    } else {
        f64::MAX
    };
    let capacity = 2;
    let shift = json!({"online": true, "capacity": capacity});
    world
        .call(
            "PUT",
            &format!("/v1/riders/{id}/shift"),
            &token,
            Some(shift),
        )
        .await;
    let ws_url = format!(
        "{}/v1/riders/{id}/ws?access_token={token}",
        world.cfg.url.replacen("http", "ws", 1)
    );
    let Ok((mut ws, _)) = tokio_tungstenite::connect_async(ws_url).await else {
        world.error("websocket_connect".into());
        return;
    };
    let (won_tx, mut won_rx) = mpsc::unbounded_channel::<String>();
    let mut legs: VecDeque<Leg> = VecDeque::new();
    let mut pending = 0usize;
    let mut wander = city::rider_start(&mut rng);
    let ping_every = 5.0;
    let mut ping = tokio::time::interval(Duration::from_secs_f64(ping_every / world.cfg.speed));
    let mut pings = 0u64;
    loop {
        tokio::select! {
            _ = ping.tick() => {
                if world.stop.load(Ordering::Relaxed) {
                    break;
                }
                if world.sim_secs() > leaves_at && legs.is_empty() {
                    world.call("PUT", &format!("/v1/riders/{id}/shift"), &token, Some(json!({"online": false}))).await;
                    break;
                }
                let target = legs.front().map_or(wander, |l| l.to);
                let (next, arrived) = city::step_towards(at, target, city::SPEED_MPS * ping_every);
                at = next;
                pings += 1;
                let sent = Instant::now();
                let body = json!({"lat": at.lat(), "lon": at.lon()});
                world.call("POST", &format!("/v1/riders/{id}/location"), &token, Some(body)).await;
                if pings.is_multiple_of(10) {
                    let (w, id, token) = (Arc::clone(&world), id.clone(), token.clone());
                    tokio::spawn(async move { measure_index(w, id, token, at, sent).await });
                }
                if arrived {
                    match legs.pop_front() {
                        Some(leg) if leg.pickup => {
                            world.call("POST", &format!("/v1/orders/{}/pickup", leg.order), &token, None).await;
                        }
                        Some(leg) => {
                            let r = world.call("POST", &format!("/v1/orders/{}/delivered", leg.order), &token, None).await;
                            // 200: applied; 202: durable, not decided within 2 s.
                            if r.is_some_and(|r| r.0 == 200 || r.0 == 202) {
                                let mut s = world.stats.lock().expect("stats");
                                let m = world.minute();
                                let h = world.cfg.start_hour;
                                s.minute(m, h).delivered += 1;
                            }
                        }
                        None => wander = city::rider_start(&mut rng),
                    }
                }
            }
            msg = ws.next() => {
                let Some(Ok(msg)) = msg else { break };
                let Ok(text) = msg.into_text() else { continue };
                let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                if v["type"] != "offer" {
                    continue;
                }
                let order = v["order_id"].as_str().unwrap_or_default().to_string();
                {
                    let mut s = world.stats.lock().expect("stats");
                    let first = s.orders.get_mut(&order).filter(|p| !p.offered).map(|p| {
                        p.offered = true;
                        (p.minute, p.at.elapsed().as_secs_f64() * 1e3)
                    });
                    if let Some(sample) = first {
                        s.offer_ms.push(sample);
                    }
                }
                // A human decides after a few seconds; busy riders mostly pass.
                if legs.len() / 2 + pending < capacity && rng.random_bool(0.6) {
                    pending += 1;
                    let delay = rng.random_range(2.0..8.0);
                    let (w, token, tx) = (Arc::clone(&world), token.clone(), won_tx.clone());
                    tokio::spawn(async move {
                        w.sleep_sim(delay).await;
                        let sent = Instant::now();
                        let r = w.call("POST", &format!("/v1/orders/{order}/grab"), &token, None).await;
                        let won = match r {
                            Some((200, body)) => {
                                w.stats.lock().expect("stats").grab_ms.push(sent.elapsed().as_secs_f64() * 1e3);
                                body["result"] == "won"
                            }
                            _ => false,
                        };
                        let _ = tx.send(if won { order } else { String::new() });
                    });
                }
            }
            Some(order) = won_rx.recv() => {
                pending = pending.saturating_sub(1);
                if order.is_empty() {
                    continue;
                }
                let mut s = world.stats.lock().expect("stats");
                let (m, h) = (world.minute(), world.cfg.start_hour);
                s.minute(m, h).grabbed += 1;
                if let Some(p) = s.orders.get_mut(&order) {
                    p.wins += 1;
                    legs.push_back(Leg { order: order.clone(), to: p.merchant, pickup: true });
                    legs.push_back(Leg { order, to: p.dropoff, pickup: false });
                }
            }
        }
    }
}

/// Polls the rider until the dispatch index holds it at `at`.
async fn measure_index(world: Arc<World>, id: String, token: String, at: Coord, sent: Instant) {
    let deadline = sent + Duration::from_secs(5);
    while Instant::now() < deadline {
        let Some((200, v)) = world
            .call("GET", &format!("/v1/riders/{id}"), &token, None)
            .await
        else {
            return;
        };
        let indexed = &v["indexed"];
        if let (Some(lat), Some(lon)) = (indexed["lat"].as_f64(), indexed["lon"].as_f64()) {
            if Coord::from_degrees(lat, lon).ok() == Some(at) {
                world
                    .stats
                    .lock()
                    .expect("stats")
                    .index_ms
                    .push(sent.elapsed().as_secs_f64() * 1e3);
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

async fn orders(world: Arc<World>, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let zipf = Zipf::new(world.merchants.len() as f64, 1.1).expect("merchants");
    let mut n = 0;
    let end = world.cfg.minutes * 60.0;
    loop {
        let rate = world.cfg.orders_per_min / 60.0 * city::day_shape(world.hour());
        let wait = Exp::new(rate.max(1e-6)).expect("rate").sample(&mut rng);
        world.sleep_sim(wait).await;
        if world.sim_secs() >= end || world.stop.load(Ordering::Relaxed) {
            break;
        }
        n += 1;
        let m = zipf.sample(&mut rng) as usize - 1;
        let merchant = world.merchants[m];
        let dropoff = city::dropoff(&mut rng, merchant);
        let promised_sim_min = rng.random_range(25.0..45.0);
        let promised = ((promised_sim_min / world.cfg.speed).round() as u32).max(1);
        let order = format!("sim{}-o{n}", world.cfg.tag);
        let body = json!({"order_id": order, "merchant_id": format!("sim-m{m}"),
            "dropoff": {"lat": dropoff.lat(), "lon": dropoff.lon()}, "promised_minutes": promised});
        let placed_at = Instant::now();
        let (minute, hour) = (world.minute(), world.cfg.start_hour);
        {
            let mut s = world.stats.lock().expect("stats");
            s.orders.insert(
                order.clone(),
                Placed {
                    at: placed_at,
                    minute,
                    merchant,
                    dropoff,
                    offered: false,
                    wins: 0,
                },
            );
        }
        let accepted = world
            .call("POST", "/v1/orders", &world.app, Some(body))
            .await
            .is_some_and(|r| r.0 == 202);
        let mut s = world.stats.lock().expect("stats");
        if !accepted {
            s.orders.remove(&order);
            continue;
        }
        s.minute(minute, hour).placed += 1;
        drop(s);
        // Some customers cancel while nobody has the order yet.
        if rng.random_bool(0.04) {
            let (w, delay) = (Arc::clone(&world), rng.random_range(60.0..240.0));
            tokio::spawn(async move {
                w.sleep_sim(delay).await;
                let taken = w
                    .stats
                    .lock()
                    .expect("stats")
                    .orders
                    .get(&order)
                    .is_some_and(|p| p.wins > 0);
                if !taken && !w.stop.load(Ordering::Relaxed) {
                    let r = w
                        .call(
                            "POST",
                            &format!("/v1/orders/{order}/cancel"),
                            &w.app,
                            Some(json!({"reason": "changed my mind"})),
                        )
                        .await;
                    if r.is_some_and(|r| r.0 == 202) {
                        let mut s = w.stats.lock().expect("stats");
                        let (m, h) = (w.minute(), w.cfg.start_hour);
                        s.minute(m, h).cancelled += 1;
                    }
                }
            });
        }
    }
}

/// Runs the simulation against a live server and returns its report.
pub async fn run(cfg: SimConfig) -> Result<Report, SimError> {
    let secret =
        Secret::load_or_create(&cfg.data_dir).map_err(|e| SimError::Tokens(e.to_string()))?;
    let app = secret.sign(&Claims {
        role: Role::App,
        id: None,
    });
    let ops = secret.sign(&Claims {
        role: Role::Ops,
        id: None,
    });
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let merchants = city::merchants(&mut rng, cfg.merchants);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| SimError::Server(e.to_string()))?;
    let world = Arc::new(World {
        cfg: cfg.clone(),
        http,
        secret,
        app,
        start: Instant::now(),
        merchants,
        stats: Mutex::default(),
        stop: AtomicBool::new(false),
    });
    for (m, at) in world.merchants.iter().enumerate() {
        let body = json!({"lat": at.lat(), "lon": at.lon(), "open": true});
        match world
            .call(
                "PUT",
                &format!("/v1/merchants/sim-m{m}"),
                &world.app,
                Some(body),
            )
            .await
        {
            Some((202, _)) => {}
            other => {
                return Err(SimError::Server(format!(
                    "registering merchants: {other:?}"
                )))
            }
        }
    }
    let world = Arc::new(World {
        start: Instant::now(),
        ..Arc::into_inner(world).expect("no other owner yet")
    });
    let bar = cfg.progress.then(|| {
        let bar = indicatif::ProgressBar::new((cfg.minutes * 60.0) as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bar:40} {msg}")
                .expect("template")
                .progress_chars("=> "),
        );
        bar
    });
    let mut tasks = Vec::new();
    for n in 0..cfg.riders {
        tasks.push(tokio::spawn(rider(
            Arc::clone(&world),
            n,
            cfg.seed ^ ((n as u64 + 1) * 0x9E37),
        )));
    }
    let generator = tokio::spawn(orders(Arc::clone(&world), cfg.seed.wrapping_mul(31)));
    while world.sim_secs() < cfg.minutes * 60.0 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if let Some(bar) = &bar {
            let s = world.stats.lock().expect("stats");
            let (placed, grabbed, delivered) = s.minutes.iter().fold((0, 0, 0), |a, m| {
                (a.0 + m.placed, a.1 + m.grabbed, a.2 + m.delivered)
            });
            let h = world.hour();
            bar.set_position(world.sim_secs() as u64);
            bar.set_message(format!(
                "{:02}:{:02}  placed {placed}  grabbed {grabbed}  delivered {delivered}  events {}  errors {}",
                h as u32,
                (h.fract() * 60.0) as u32,
                s.events_sent,
                s.errors.values().sum::<u64>()
            ));
        }
    }
    world.stop.store(true, Ordering::Relaxed);
    let _ = generator.await;
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    Ok(report(&world, &ops).await)
}

async fn report(world: &World, ops: &str) -> Report {
    // Final states: every placed order, and the server's own count; retried
    // until two readings of the server agree (timers keep running).
    let ids: Vec<String> = world
        .stats
        .lock()
        .expect("stats")
        .orders
        .keys()
        .cloned()
        .collect();
    let mut r = Report::default();
    for _attempt in 0..5 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let before = server_states(world, ops).await;
        let histories = futures_util::stream::iter(ids.iter().cloned())
            .map(|id| async move {
                world
                    .call("GET", &format!("/v1/orders/{id}"), &world.app, None)
                    .await
                    .map(|r| (id, r.1))
            })
            .buffer_unordered(16)
            .collect::<Vec<_>>()
            .await;
        let after = server_states(world, ops).await;
        r = summarize(world, histories.into_iter().flatten().collect());
        r.server_orders_by_state = after.clone();
        let ours: BTreeMap<String, i64> = r
            .final_states
            .iter()
            .map(|(k, v)| (k.clone(), *v as i64))
            .collect();
        r.consistent_with_server = before == after && ours == after;
        if r.consistent_with_server {
            break;
        }
    }
    r
}

async fn server_states(world: &World, ops: &str) -> BTreeMap<String, i64> {
    let Some((200, m)) = world.call("GET", "/v1/ops/metrics", ops, None).await else {
        return BTreeMap::new();
    };
    m["orders_by_state"]
        .as_object()
        .map(|o| {
            o.iter()
                .filter_map(|(k, v)| v.as_i64().filter(|n| *n != 0).map(|n| (k.clone(), n)))
                .collect()
        })
        .unwrap_or_default()
}

fn summarize(world: &World, histories: Vec<(String, Value)>) -> Report {
    let s = world.stats.lock().expect("stats");
    let mut r = Report {
        events_sent: s.events_sent,
        errors: s.errors.clone(),
        ..Report::default()
    };
    r.orders_placed = s.orders.len() as u64;
    r.orders_offered = s.orders.values().filter(|p| p.offered).count() as u64;
    r.double_winners = s.orders.values().filter(|p| p.wins > 1).count() as u64;
    let (mut first_round, mut overtime) = (0u64, 0u64);
    for (_, order) in &histories {
        let Some(history) = order["history"].as_array() else {
            continue;
        };
        let reasons: Vec<&str> = history
            .iter()
            .filter_map(|h| h["reason"].as_str())
            .collect();
        let state = order["state"].as_str().unwrap_or("?").to_string();
        *r.final_states.entry(state).or_default() += 1;
        r.grab_timeouts += reasons.iter().filter(|x| **x == "grab_timeout").count() as u64;
        r.redispatches += reasons.iter().filter(|x| **x == "redispatched").count() as u64;
        if let Some(won) = reasons.iter().position(|x| *x == "grabbed") {
            r.orders_grabbed += 1;
            if !reasons[..won].contains(&"grab_timeout") {
                first_round += 1;
            }
        }
        if reasons.contains(&"delivered") {
            r.orders_delivered += 1;
            if history.iter().any(|h| h["state"] == "overtime") {
                overtime += 1;
            }
        }
        if reasons.contains(&"cancelled") {
            r.orders_cancelled += 1;
        }
    }
    r.first_round_share = if r.orders_grabbed > 0 {
        first_round as f64 / r.orders_grabbed as f64
    } else {
        0.0
    };
    r.overtime_rate = if r.orders_delivered > 0 {
        overtime as f64 / r.orders_delivered as f64
    } else {
        0.0
    };
    let offers: Vec<f64> = s.offer_ms.iter().map(|x| x.1).collect();
    r.order_to_first_offer = Latency::of(&offers);
    r.grab_to_result = Latency::of(&s.grab_ms);
    r.location_to_index = Latency::of(&s.index_ms);
    r.minutes = s.minutes.clone();
    for (m, minute) in r.minutes.iter_mut().enumerate() {
        let samples: Vec<f64> = s
            .offer_ms
            .iter()
            .filter(|x| x.0 == m)
            .map(|x| x.1)
            .collect();
        minute.offer_p50_ms = Latency::of(&samples).p50_ms;
    }
    r
}
