//! Service benchmark: the real `grabflow serve` over loopback HTTP/WebSocket.
//!
//! `cargo bench --bench service` prints, in one run:
//! - location pings/s over HTTP, one per request and 100 per batch request,
//!   against a bare axum handler (its own process) that only parses the same
//!   JSON and answers 202 — the ceiling of an axum service on this machine;
//! - order → offer-on-WebSocket and grab → result latency (p50/p99) while a
//!   steady 10 000 pings/s and 200 orders/s flow (500 riders on WebSockets),
//!   beside the floor under them: the log's own commit (one direct,
//!   data-synchronous append) timed alone on the same disk, before and after.
//!
//! - a flood: batched pings from many clients as fast as they go, against
//!   the default `--max-backlog`: pings acked, batches held back with 503,
//!   the server's peak RSS and the dataflow's largest lag;
//! - Kafka (`kafka_phase`): the same ingress and a lighter latency load
//!   through tansu, in six set-ups (`BENCH_KAFKA_SETUPS` picks some),
//!   against the embedded log;
//! - restarts (`restart_phase`) with `BENCH_RESTART_PINGS` pings and
//!   `BENCH_RESTART_ORDERS` orders in the log: from a checkpoint, after
//!   `kill -9`, and replaying the whole log.
//!
//! The load generator shares the machine's cores with the server.
//! `BENCH_SECS` sets each phase's length (default 5); `BENCH_CONSOLES=N`
//! keeps N ops consoles on `/v1/ops/stream` during the latency phase, and
//! `BENCH_CHECKPOINT_INTERVAL=250ms` has the server checkpoint that often
//! through it. `BENCH_GRABFLOW=PATH` runs another build of the server (an
//! earlier commit's, say) for an A/B against this one in the same hour.

mod common;

use axum::routing::post;
use axum::{Json, Router};
use common::{rss_mib, sigterm, spawn, start_ready, token};
use futures_util::StreamExt;
use grabflow_log::embedded::direct::DirectAppender;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct Ping {
    lat: f64,
    lon: f64,
    at: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct BatchPing {
    rider_id: String,
    lat: f64,
    lon: f64,
    at: Option<u64>,
}

/// The same allocator as the server, so the baseline differs only in what
/// its handler does.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn secs() -> u64 {
    std::env::var("BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5)
}

/// The baseline: a bare axum server that parses the same bodies.
async fn bare_server() {
    let app = Router::new()
        .route(
            "/v1/riders/{rider_id}/location",
            post(|Json(_p): Json<Ping>| async { (axum::http::StatusCode::ACCEPTED, "{}") }),
        )
        .route(
            "/v1/locations:batch",
            post(|Json(p): Json<Vec<BatchPing>>| async move {
                (
                    axum::http::StatusCode::ACCEPTED,
                    Json(json!({"accepted": p.len()})),
                )
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    println!("listening on http://{}", listener.local_addr().unwrap());
    axum::serve(listener, app).await.unwrap();
}

/// Pings/s with `clients` concurrent clients for the phase length.
async fn ping_rate(url: &str, token: &str, batch: usize, clients: usize) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let end = Instant::now() + Duration::from_secs(secs());
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (url, token, done) = (url.to_string(), token.to_string(), Arc::clone(&done));
        tasks.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut n = 0u64;
            while Instant::now() < end {
                n += 1;
                let lat = 31.23 + (n % 100) as f64 * 1e-5;
                let ok = if batch == 1 {
                    let r = http
                        .post(format!("{url}/v1/riders/B{c}/location"))
                        .bearer_auth(&token)
                        .json(&json!({"lat": lat, "lon": 121.47}));
                    r.send()
                        .await
                        .map(|r| r.status().as_u16() == 202)
                        .unwrap_or(false)
                } else {
                    let items: Vec<Value> = (0..batch)
                        .map(
                            |i| json!({"rider_id": format!("B{c}x{i}"), "lat": lat, "lon": 121.47}),
                        )
                        .collect();
                    let r = http
                        .post(format!("{url}/v1/locations:batch"))
                        .bearer_auth(&token)
                        .json(&items);
                    r.send()
                        .await
                        .map(|r| r.status().as_u16() == 202)
                        .unwrap_or(false)
                };
                if ok {
                    done.fetch_add(batch as u64, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    done.load(Ordering::Relaxed) as f64 / secs() as f64
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// The floor under every 2xx: the log's commit alone, `n` 200-byte appends
/// through its own direct appender into a zero-filled scratch file on the
/// disk the servers use, one after another with nothing else running.
/// Milliseconds per commit (p50, p99, max); `None` where the file system has
/// no direct I/O.
fn commit_latency(n: usize) -> Option<(f64, f64, f64)> {
    let dir = std::env::temp_dir().join(format!("grabflow-bench-disk-{}", std::process::id()));
    std::fs::create_dir_all(&dir).ok()?;
    let path = dir.join("events.log");
    let record = [7u8; 200];
    // Written zeros (not a sparse file): the log's room is made the same way.
    std::fs::write(&path, vec![0u8; n * record.len() + (1 << 20)]).ok()?;
    std::fs::File::open(&path).ok()?.sync_all().ok()?;
    let mut appender = DirectAppender::open(&path, 0).ok()??;
    let mut ms = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        appender.append((i * record.len()) as u64, &record).ok()?;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let _ = std::fs::remove_dir_all(&dir);
    Some((
        percentile(&mut ms, 0.5),
        percentile(&mut ms, 0.99),
        percentile(&mut ms, 1.0),
    ))
}

/// A steady load: a batch of `pings` every `ping_every`, an order every `order_every`.
#[derive(Clone, Copy)]
struct Load {
    ping_every: Duration,
    pings: u64,
    order_every: Duration,
}

/// 10 000 pings/s and 200 orders/s.
const FULL: Load = Load {
    ping_every: Duration::from_millis(10),
    pings: 100,
    order_every: Duration::from_millis(5),
};

/// 1 000 pings/s and 20 orders/s (the Kafka rows, as issue #20 sets them).
const KAFKA_LOAD: Load = Load {
    ping_every: Duration::from_millis(10),
    pings: 10,
    order_every: Duration::from_millis(50),
};

/// What a latency phase measured (milliseconds).
struct Latencies {
    /// Order POST → first offer on a rider's WebSocket.
    offers: Vec<f64>,
    /// Grab POST → decided answer.
    grabs: Vec<f64>,
    /// Order POST → its 202 (durable in the log).
    acks: Vec<f64>,
    /// Orders placed.
    orders: usize,
}

async fn latencies(url: &str, dir: &std::path::Path, load: Load) -> Latencies {
    let app = token(dir, "app", None);
    let http = reqwest::Client::new();
    for m in 0..50 {
        let body = json!({"lat": 31.23 + (m / 10) as f64 * 0.002, "lon": 121.47 + (m % 10) as f64 * 0.002});
        http.put(format!("{url}/v1/merchants/M{m}"))
            .bearer_auth(&app)
            .json(&body)
            .send()
            .await
            .unwrap();
    }
    let riders = 500;
    let placed: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let offer_ms: Arc<Mutex<Vec<f64>>> = Arc::default();
    let grab_ms: Arc<Mutex<Vec<f64>>> = Arc::default();
    let ack_ms: Arc<Mutex<Vec<f64>>> = Arc::default();
    let mut sockets = Vec::new();
    for r in 0..riders {
        let rider = format!("R{r}");
        let tok = token(dir, "rider", Some(&rider));
        http.put(format!("{url}/v1/riders/{rider}/shift"))
            .bearer_auth(&tok)
            .json(&json!({"online": true, "capacity": 50}))
            .send()
            .await
            .unwrap();
        let ws_url = format!(
            "{}/v1/riders/{rider}/ws?access_token={tok}",
            url.replace("http", "ws")
        );
        let (ws, _) = tokio_tungstenite::connect_async(ws_url).await.unwrap();
        sockets.push((tok, ws));
    }
    let consoles = watch_consoles(url, dir, &http).await;
    let end = Instant::now() + Duration::from_secs(secs());
    let mut tasks = Vec::new();
    for (tok, mut ws) in sockets {
        let (placed, offer_ms, grab_ms, url) = (
            Arc::clone(&placed),
            Arc::clone(&offer_ms),
            Arc::clone(&grab_ms),
            url.to_string(),
        );
        tasks.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            while let Ok(Some(Ok(msg))) = tokio::time::timeout_at(end.into(), ws.next()).await {
                let Ok(text) = msg.into_text() else { continue };
                let v: Value = serde_json::from_str(&text).unwrap_or_default();
                if v["type"] != "offer" {
                    continue;
                }
                let order = v["order_id"].as_str().unwrap_or_default().to_string();
                let first = placed.lock().unwrap().remove(&order);
                if let Some(t0) = first {
                    offer_ms
                        .lock()
                        .unwrap()
                        .push(t0.elapsed().as_secs_f64() * 1e3);
                    // The first rider to hear of an order grabs it.
                    let t1 = Instant::now();
                    let r = http
                        .post(format!("{url}/v1/orders/{order}/grab"))
                        .bearer_auth(&tok)
                        .send()
                        .await;
                    if r.map(|r| r.status().as_u16() == 200).unwrap_or(false) {
                        grab_ms
                            .lock()
                            .unwrap()
                            .push(t1.elapsed().as_secs_f64() * 1e3);
                    }
                }
            }
        }));
    }
    // 10 000 pings/s: every 10 ms a batch of 100; 200 orders/s: every 5 ms one order.
    let pinger = {
        let (url, app) = (url.to_string(), app.clone());
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut tick = tokio::time::interval(load.ping_every);
            let mut round = 0u64;
            while Instant::now() < end {
                tick.tick().await;
                round += 1;
                let items: Vec<Value> = (0..load.pings)
                    .map(|i| {
                        let r = (round * load.pings + i) % riders as u64;
                        let (dy, dx) = ((r / 25) as f64 * 0.0005, (r % 25) as f64 * 0.0005);
                        json!({"rider_id": format!("R{r}"), "lat": 31.225 + dy, "lon": 121.465 + dx})
                    })
                    .collect();
                let (http, url, app) = (http.clone(), url.clone(), app.clone());
                tokio::spawn(async move {
                    http.post(format!("{url}/v1/locations:batch"))
                        .bearer_auth(&app)
                        .json(&items)
                        .send()
                        .await
                });
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut tick = tokio::time::interval(load.order_every);
    let mut n = 0;
    while Instant::now() + Duration::from_millis(500) < end {
        tick.tick().await;
        n += 1;
        let order = format!("O{n}");
        let body = json!({"order_id": order, "merchant_id": format!("M{}", n % 50), "dropoff": {"lat": 31.22, "lon": 121.48}});
        let t0 = Instant::now();
        placed.lock().unwrap().insert(order, t0);
        let (http, url, app, ack_ms) = (
            http.clone(),
            url.to_string(),
            app.clone(),
            Arc::clone(&ack_ms),
        );
        tokio::spawn(async move {
            let r = http
                .post(format!("{url}/v1/orders"))
                .bearer_auth(&app)
                .json(&body)
                .send()
                .await;
            if r.is_ok_and(|r| r.status().as_u16() == 202) {
                ack_ms
                    .lock()
                    .unwrap()
                    .push(t0.elapsed().as_secs_f64() * 1e3);
            }
        });
    }
    pinger.await.unwrap();
    for t in tasks {
        let _ = t.await;
    }
    consoles.into_iter().for_each(|c| c.abort());
    let offers = std::mem::take(&mut *offer_ms.lock().unwrap());
    let grabs = std::mem::take(&mut *grab_ms.lock().unwrap());
    let acks = std::mem::take(&mut *ack_ms.lock().unwrap());
    Latencies {
        offers,
        grabs,
        acks,
        orders: n,
    }
}

/// `BENCH_CONSOLES=N` ops consoles on `/v1/ops/stream` (read and thrown
/// away) for the latency phase, to see what watching costs dispatch.
async fn watch_consoles(
    url: &str,
    dir: &std::path::Path,
    http: &reqwest::Client,
) -> Vec<tokio::task::JoinHandle<()>> {
    let n: usize = std::env::var("BENCH_CONSOLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let ops = token(dir, "ops", None);
    let mut consoles = Vec::new();
    for _ in 0..n {
        let resp = http
            .get(format!("{url}/v1/ops/stream"))
            .bearer_auth(&ops)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200, "an ops stream");
        consoles.push(tokio::spawn(async move {
            let mut body = resp.bytes_stream();
            while let Some(Ok(_)) = body.next().await {}
        }));
    }
    if n > 0 {
        println!("({n} ops consoles watching during the latency phase)");
    }
    consoles
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    if args.iter().any(|a| a == "--bare-server") {
        return rt.block_on(bare_server());
    }
    if args.iter().any(|a| a == "--list") {
        return;
    }
    // `cargo bench --bench service -- ingress|latency|kafka` runs one part.
    let only: Vec<&str> = args[1..]
        .iter()
        .map(String::as_str)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let part = |name: &str| only.is_empty() || only.contains(&name);
    if part("ingress") {
        ingress_phase(&rt);
    }
    if part("latency") {
        let before = commit_latency(2000);
        // `BENCH_CHECKPOINT_INTERVAL` (e.g. 250ms) has the server checkpoint
        // that often through the phase (default: the server's 30 s).
        let interval = std::env::var("BENCH_CHECKPOINT_INTERVAL").ok();
        let extra: Vec<&str> = interval
            .iter()
            .flat_map(|i| ["--checkpoint-interval", i.as_str()])
            .collect();
        let l = with_server(&rt, &extra, async |url, dir, _| {
            latencies(url, dir, FULL).await
        });
        let after = commit_latency(2000);
        let Latencies {
            mut offers,
            mut grabs,
            mut acks,
            orders,
        } = l;
        println!("\nsteady load: 10 000 pings/s + 200 orders/s, 500 riders on WebSockets, {orders} orders:");
        println!("| latency | p50 | p99 | samples |");
        println!("|---|---:|---:|---:|");
        for (name, v) in [
            (
                "order POST → first offer on a rider's WebSocket",
                &mut offers,
            ),
            ("grab POST → decided answer", &mut grabs),
            ("order POST → 202 (durable)", &mut acks),
        ] {
            let n = v.len();
            let (p50, p99) = (percentile(v, 0.5), percentile(v, 0.99));
            println!("| {name} | {p50:.2} ms | {p99:.2} ms | {n} |");
        }
        for (when, c) in [("before", before), ("after", after)] {
            match c {
                Some((p50, p99, max)) => println!(
                    "| the log's commit alone, no load ({when}; max {max:.2} ms) | {p50:.2} ms | {p99:.2} ms | 2000 |"
                ),
                None => println!("| the log's commit alone ({when}) | no direct I/O here | | |"),
            }
        }
    }
    if part("kafka") {
        kafka_phase(&rt);
    }
    if part("restart") {
        restart_phase(&rt);
    }
    if part("flood") {
        flood_phase(&rt);
    }
}

/// A flood of batched pings against the default backlog bound: what is
/// acked, what is held back, and what it costs in memory and lag.
fn flood_phase(rt: &tokio::runtime::Runtime) {
    let secs = secs().max(10);
    let (acked, held, peak, lag) = with_server(rt, &[], async |url, dir, pid| {
        let app = token(dir, "app", None);
        let deadline = Instant::now() + Duration::from_secs(secs);
        let mut clients = Vec::new();
        for c in 0..8u64 {
            let (url, app) = (url.to_string(), app.clone());
            clients.push(tokio::spawn(async move {
                let http = reqwest::Client::new();
                let (mut acked, mut held) = (0u64, 0u64);
                let mut n = c;
                while Instant::now() < deadline {
                    let items: Vec<Value> = (0..1000u64)
                        .map(|i| {
                            n = n
                                .wrapping_mul(6364136223846793005)
                                .wrapping_add(1442695040888963407 + i);
                            let north = (n >> 33) as f64 / (1u64 << 31) as f64 - 0.5;
                            json!({"rider_id": format!("R{}", n % 50_000), "lat": 31.23 + north * 0.2, "lon": 121.47})
                        })
                        .collect();
                    match http
                        .post(format!("{url}/v1/locations:batch"))
                        .bearer_auth(&app)
                        .json(&items)
                        .send()
                        .await
                        .map(|r| r.status().as_u16())
                    {
                        Ok(202) => acked += 1000,
                        Ok(503) => held += 1,
                        _ => {}
                    }
                }
                (acked, held)
            }));
        }
        // The dataflow's lag behind the log, sampled while the flood runs.
        let ops = token(dir, "ops", None);
        let http = reqwest::Client::new();
        let mut lag = 0u64;
        while Instant::now() < deadline {
            if let Ok(r) = http
                .get(format!("{url}/v1/ops/metrics"))
                .bearer_auth(&ops)
                .send()
                .await
            {
                let m: Value = r.json().await.unwrap_or_default();
                lag = lag.max(m["dataflow"]["lag_ms"].as_u64().unwrap_or(0));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let (mut acked, mut held) = (0, 0);
        for c in clients {
            let (a, h) = c.await.unwrap();
            acked += a;
            held += h;
        }
        (acked, held, rss_mib(pid).0, lag)
    });
    println!("\nflood: 8 clients posting 1000-ping batches for {secs} s, default --max-backlog:");
    println!(
        "| pings acked | per second | batches answered 503 | peak RSS | largest dataflow lag |"
    );
    println!("|---:|---:|---:|---:|---:|");
    println!(
        "| {acked} | {:.0} | {held} | {peak:.0} MiB | {lag} ms |",
        acked as f64 / secs as f64
    );
}

/// Pings put in the log before the restarts (`BENCH_RESTART_PINGS`,
/// default 2 000 000).
fn restart_pings() -> u64 {
    std::env::var("BENCH_RESTART_PINGS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2_000_000)
}

/// Orders placed after the pings (`BENCH_RESTART_ORDERS`, default 20 000).
fn restart_orders() -> u64 {
    std::env::var("BENCH_RESTART_ORDERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_000)
}

/// Places `n` orders at 50 merchants, 64 at a time (none is offered: no
/// rider is on shift, so each waits in the state until its deadline).
async fn place_orders(url: &str, app: &str, n: u64) {
    let http = reqwest::Client::new();
    for m in 0..50 {
        http.put(format!("{url}/v1/merchants/M{m}"))
            .bearer_auth(app)
            .json(&json!({"lat": 31.2 + m as f64 * 1e-3, "lon": 121.47}))
            .send()
            .await
            .unwrap();
    }
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let (http, url, app, next) = (
            http.clone(),
            url.to_string(),
            app.to_string(),
            Arc::clone(&next),
        );
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return;
                }
                let body = json!({"order_id": format!("B{i}"), "merchant_id": format!("M{}", i % 50), "dropoff": {"lat": 31.22, "lon": 121.48}});
                while !http
                    .post(format!("{url}/v1/orders"))
                    .bearer_auth(&app)
                    .json(&body)
                    .send()
                    .await
                    .is_ok_and(|r| r.status().as_u16() == 202)
                {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// Restart time and memory with a long log behind: from the latest
/// checkpoint (the default) against replaying the whole log (the same log,
/// its checkpoints removed, `--checkpoint-interval 0`), after a graceful
/// stop and after `kill -9`.
fn restart_phase(rt: &tokio::runtime::Runtime) {
    let dir = std::env::temp_dir().join(format!("grabflow-bench-restart-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let pings = restart_pings();
    let orders = restart_orders();
    let live = rt.block_on(async {
        let (mut server, url, _) = start_ready(&dir, &[]).await;
        let app = token(&dir, "app", None);
        // Batched pings from many riders, as the ingress bench sends them.
        let http = reqwest::Client::new();
        let mut sent = 0u64;
        let batch = 1000;
        while sent < pings {
            let mut tasks = Vec::new();
            for c in 0..8 {
                let items: Vec<Value> = (0..batch)
                    .map(|i| {
                        let lat = 31.2 + ((sent as usize + c * batch + i) % 997) as f64 * 1e-4;
                        json!({"rider_id": format!("R{}", (c * batch + i) % 50_000), "lat": lat, "lon": 121.47})
                    })
                    .collect();
                let (http, url, app) = (http.clone(), url.clone(), app.clone());
                tasks.push(tokio::spawn(async move {
                    loop {
                        let r = http
                            .post(format!("{url}/v1/locations:batch"))
                            .bearer_auth(&app)
                            .json(&items)
                            .send()
                            .await;
                        if r.is_ok_and(|r| r.status().as_u16() == 202) {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
            sent += 8 * batch as u64;
        }
        place_orders(&url, &app, orders).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let rss = rss_mib(server.id()).1;
        sigterm(&mut server);
        rss
    });
    let (log_bytes, log_segments) = grabflow_log::embedded::segments::usage(&dir);
    let log_mib = log_bytes as f64 / 1048576.0;
    println!("
restart with {pings} batched pings and {orders} orders (all open) in the log ({log_mib:.0} MiB in {log_segments} segments; live RSS before the stop {live:.0} MiB):");
    println!("| start | ready in | peak RSS | replayed events |");
    println!("|---|---:|---:|---:|");
    let run = |name: &str, extra: &[&str], kill: bool| {
        rt.block_on(async {
            let (mut server, url, took) = start_ready(&dir, extra).await;
            let (peak, _) = rss_mib(server.id());
            let ops = token(&dir, "ops", None);
            let m: Value = reqwest::Client::new()
                .get(format!("{url}/v1/ops/metrics"))
                .bearer_auth(&ops)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap_or_default();
            let replayed = m["checkpoint"]["replayed_events"]
                .as_u64()
                .map_or("–".to_string(), |n| n.to_string());
            println!(
                "| {name} | {:.2} s | {peak:.0} MiB | {replayed} |",
                took.as_secs_f64()
            );
            if kill {
                let _ = server.kill();
                let _ = server.wait();
            } else {
                sigterm(&mut server);
            }
        })
    };
    run("from the checkpoint of a graceful stop", &[], true);
    run("from the latest checkpoint after kill -9", &[], false);
    let _ = std::fs::remove_dir_all(dir.join("checkpoints"));
    run(
        "the whole log (no checkpoint, --checkpoint-interval 0)",
        &["--checkpoint-interval", "0"],
        true,
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Rounds of the ingress comparison; each alternates the two servers, so a
/// slow spell of the (shared, virtual) machine hits both.
const ROUNDS: usize = 5;

/// One ingress round: (pings/s, server CPU µs per ping) of the bare server
/// and grabflow, one ping per request, then 100 per batch.
type Round = [(f64, f64); 4];

/// Single and batched pings/s: the bare axum handler against `grabflow
/// serve`, in alternating rounds; prints each round and the medians.
fn ingress_phase(rt: &tokio::runtime::Runtime) {
    let (mut bare, bare_url) =
        spawn(Command::new(std::env::current_exe().unwrap()).arg("--bare-server"));
    let clients = 64;
    println!(
        "HTTP ingress, {clients} concurrent clients, {ROUNDS} rounds of {} s per server and phase:",
        secs()
    );
    let bare_pid = bare.id();
    // Per round: (rate, server CPU µs per ping) of bare and ours, single then batched.
    let rounds = with_server(rt, &[], async |url, dir, ours_pid| {
        let app = token(dir, "app", None);
        let mut rounds = Vec::new();
        for _ in 0..ROUNDS {
            let mut round: Round = [(0.0, 0.0); 4];
            for (i, batch) in [1, 100].into_iter().enumerate() {
                for (j, (url, pid)) in [(bare_url.as_str(), bare_pid), (url, ours_pid)]
                    .into_iter()
                    .enumerate()
                {
                    let cpu = cpu_secs(pid);
                    let rate = ping_rate(url, &app, batch, clients).await;
                    let per_ping = (cpu_secs(pid) - cpu) / (rate * secs() as f64) * 1e6;
                    round[2 * i + j] = (rate, per_ping);
                }
            }
            rounds.push(round);
        }
        rounds
    });
    let _ = bare.kill();
    let _ = bare.wait();
    println!("| pings | bare axum (parse only) | grabflow (validated, fsynced) | ratio | server CPU µs/ping, bare / grabflow |");
    println!("|---|---:|---:|---:|---:|");
    for (i, name) in ["one per request", "100 per batch"].into_iter().enumerate() {
        for r in &rounds {
            let ((b, bc), (o, oc)) = (r[2 * i], r[2 * i + 1]);
            println!(
                "| {name} | {b:.0}/s | {o:.0}/s | {:.2} | {bc:.2} / {oc:.2} |",
                o / b
            );
        }
        let median = |f: &dyn Fn(&Round) -> f64| {
            let mut v: Vec<f64> = rounds.iter().map(f).collect();
            percentile(&mut v, 0.5)
        };
        let mut ratios: Vec<f64> = rounds.iter().map(|r| r[2 * i + 1].0 / r[2 * i].0).collect();
        let (lo, hi) = (percentile(&mut ratios, 0.0), percentile(&mut ratios, 1.0));
        println!(
            "| **{name}, median** | **{:.0}/s** | **{:.0}/s** | **{:.2}** ({lo:.2}–{hi:.2}) | {:.2} / {:.2} |",
            median(&|r| r[2 * i].0),
            median(&|r| r[2 * i + 1].0),
            percentile(&mut ratios, 0.5),
            median(&|r| r[2 * i].1),
            median(&|r| r[2 * i + 1].1),
        );
    }
}

/// CPU time (user + system) a process has used, in seconds.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the `(comm)`: state is 3rd, utime 14th, stime 15th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<f64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|x| x.parse().ok())
        .collect();
    f.iter().sum::<f64>() / 100.0
}

/// Batched pings for the phase length: acked per second, and end to end
/// (acked, then read by the dataflow: `/v1/ops/metrics` counts them) per
/// second from the phase's start until the dataflow has them all.
async fn end_to_end(url: &str, dir: &std::path::Path, _pid: u32) -> (f64, f64) {
    let (app, ops) = (token(dir, "app", None), token(dir, "ops", None));
    let t0 = Instant::now();
    let acked = ping_rate(url, &app, 100, 64).await * secs() as f64;
    let http = reqwest::Client::new();
    let mut seen = 0.0;
    while seen < acked && t0.elapsed() < Duration::from_secs(secs() * 20 + 30) {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if let Ok(r) = http
            .get(format!("{url}/v1/ops/metrics"))
            .bearer_auth(&ops)
            .send()
            .await
        {
            let v: Value = r.json().await.unwrap_or_default();
            seen = v["events"]["location_pinged"].as_f64().unwrap_or(0.0);
        }
    }
    (acked / secs() as f64, seen / t0.elapsed().as_secs_f64())
}

/// Runs `phase` (given the server's URL, data dir and process id) against
/// a fresh `grabflow serve` with `extra` flags.
fn with_server<T>(
    rt: &tokio::runtime::Runtime,
    extra: &[&str],
    phase: impl AsyncFnOnce(&str, &std::path::Path, u32) -> T,
) -> T {
    static RUN: AtomicU64 = AtomicU64::new(0);
    let n = RUN.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("grabflow-bench-{}-{n}", std::process::id()));
    let binary =
        std::env::var("BENCH_GRABFLOW").unwrap_or_else(|_| env!("CARGO_BIN_EXE_grabflow").into());
    let (mut server, url) = spawn(
        Command::new(binary)
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(extra)
            .arg("--data-dir")
            .arg(&dir),
    );
    let pid = server.id();
    let out = rt.block_on(async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        phase(&url, &dir, pid).await
    });
    let _ = server.kill();
    let _ = server.wait();
    let _ = std::fs::remove_dir_all(&dir);
    // Let the disk and the machine settle before the next phase.
    let _ = Command::new("sync").status();
    std::thread::sleep(Duration::from_secs(2));
    out
}

/// A tansu broker (in-memory storage) on a free loopback port, for one phase.
/// A tansu broker: its process, its address, and the directory it runs in
/// (a SQLite engine's file is there).
struct Broker(Child, String, std::path::PathBuf);

/// tansu's storage engines: in memory, or a SQLite file.
#[derive(Clone, Copy, PartialEq)]
enum Storage {
    Memory,
    Sqlite,
}

impl Broker {
    fn start(tansu: &std::path::Path, storage: Storage) -> Broker {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let listener = format!("tcp://127.0.0.1:{port}");
        let dir = std::env::temp_dir().join(format!("grabflow-bench-tansu-{port}"));
        std::fs::create_dir_all(&dir).unwrap();
        let engine = match storage {
            Storage::Memory => "memory://tansu/",
            // tansu opens `sqlite:///F` as F under its working directory.
            Storage::Sqlite => "sqlite:///tansu.db",
        };
        let child = Command::new(tansu)
            .current_dir(&dir)
            .args(["broker", "--listener-url", &listener])
            .args(["--advertised-listener-url", &listener])
            .args(["--storage-engine", engine])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(500));
        Broker(child, format!("127.0.0.1:{port}"), dir)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = std::fs::remove_dir_all(&self.2);
    }
}

/// tansu alone, without grabflow: the trip of a record (one every 50 ms,
/// as the orders) from a producer to a consumer that reads every partition
/// of three topics of `partitions` each, as the dataflow does, while 1 000
/// other records/s flow into the first (as the pings), with grabflow's
/// producer settings and a 1 ms fetch wait. With `ticks`, each such record
/// is followed in its request by a record without value into every
/// partition, as ingress sends ticks along. The floor of one consumer hop:
/// milliseconds, p50 and p99.
fn broker_hop(
    rt: &tokio::runtime::Runtime,
    tansu: &std::path::Path,
    partitions: i32,
    ticks: bool,
) -> (f64, f64) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::Message;
    use rdkafka::producer::{BaseRecord, DefaultProducerContext, ThreadedProducer};
    use rdkafka::{Offset, TopicPartitionList};
    let broker = Broker::start(tansu, Storage::Memory);
    let topics = ["hop.riders", "hop.merchants", "hop.orders"];
    // grabflow's own client settings.
    let cfg = grabflow_log::kafka::KafkaConfig::new(&broker.1);
    let admin: AdminClient<DefaultClientContext> = cfg.client().create().unwrap();
    let new: Vec<NewTopic> = topics
        .iter()
        .map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(1)))
        .collect();
    rt.block_on(admin.create_topics(new.iter(), &AdminOptions::new()))
        .unwrap();
    let producer: ThreadedProducer<DefaultProducerContext> = cfg.producer().create().unwrap();
    let consumer: BaseConsumer = cfg
        .consumer("hop")
        .set("fetch.wait.max.ms", "1")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for t in topics {
        for p in 0..partitions {
            tpl.add_partition_offset(t, p, Offset::Beginning).unwrap();
        }
    }
    consumer.assign(&tpl).unwrap();
    let start = Instant::now();
    let end = start + Duration::from_secs(secs() + 1);
    let (mut next_load, mut next_mark, mut n) = (start, start, 0u64);
    let mut hops = Vec::new();
    while Instant::now() < end {
        let now = Instant::now();
        if now >= next_load {
            for _ in 0..10 {
                let key = format!("R{}", n % 500);
                n += 1;
                let _ = producer.send(BaseRecord::to(topics[0]).key(&key).payload("ping"));
            }
            next_load += Duration::from_millis(10);
        }
        if now >= next_mark {
            let (key, sent) = (format!("O{n}"), start.elapsed().as_nanos().to_string());
            let _ = producer.send(BaseRecord::to(topics[2]).key(&key).payload(&sent));
            if ticks {
                for t in topics {
                    for p in 0..partitions {
                        let _ = producer.send(BaseRecord::<[u8], [u8]>::to(t).partition(p));
                    }
                }
            }
            next_mark += Duration::from_millis(50);
        }
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(1)) {
            let sent = (m.topic() == topics[2])
                .then(|| m.payload().and_then(|v| std::str::from_utf8(v).ok()))
                .flatten()
                .and_then(|v| v.parse::<u128>().ok());
            // The first second is the consumer's start, not a hop.
            if let Some(sent) = sent.filter(|&s| s > 1_000_000_000) {
                hops.push((start.elapsed().as_nanos() - sent) as f64 / 1e6);
            }
        }
    }
    (percentile(&mut hops, 0.5), percentile(&mut hops, 0.99))
}

/// One Kafka set-up's figures: pings acked/s and end to end/s, the
/// latency phase's, the broker's CPU (cores).
struct KafkaColumn<'a> {
    name: &'a str,
    acked: f64,
    e2e: f64,
    light: Light,
    cpu: f64,
}

/// The latency phase at the Kafka load (milliseconds).
struct Light {
    /// Order → offer, p50 and p99.
    p50: f64,
    p99: f64,
    /// Order → its 202 (acked by the broker), p50.
    ack_p50: f64,
    /// Offers seen, orders placed.
    seen: usize,
    placed: usize,
}

/// Production mode on this machine: tansu on loopback and `serve --kafka`,
/// against the embedded log under the same loads. Each phase has a fresh
/// broker and server, so one's backlog never slows the next. Six set-ups,
/// on tansu's in-memory engine unless named: grabflow's defaults (4
/// partitions, 10 ms fetch wait); a 1 ms fetch wait (tansu holds every
/// fetch for the whole `fetch.wait.max.ms` and answers with what it had
/// when the fetch began, so each consumer hop costs ~1.5× the wait); 16
/// partitions, at both waits; tansu's SQLite engine; and one record per
/// batch (what 0.12 hard-wired). The broker's CPU (its share of one core)
/// shows when it is the limit.
fn kafka_phase(rt: &tokio::runtime::Runtime) {
    let home = std::env::var("CARGO_HOME")
        .unwrap_or_else(|_| format!("{}/.cargo", std::env::var("HOME").unwrap_or_default()));
    let tansu = std::path::PathBuf::from(home).join("bin/tansu");
    if !tansu.exists() {
        println!("\n(tansu is not installed: no Kafka figures; scripts/test installs it)");
        return;
    }
    let light = async |url: &str, dir: &std::path::Path, _pid: u32| {
        let mut l = latencies(url, dir, KAFKA_LOAD).await;
        Light {
            p50: percentile(&mut l.offers, 0.5),
            p99: percentile(&mut l.offers, 0.99),
            ack_p50: percentile(&mut l.acks, 0.5),
            seen: l.offers.len(),
            placed: l.orders,
        }
    };
    let (e_acked, e_e2e) = with_server(rt, &[], end_to_end);
    let e_light = with_server(rt, &[], light);
    let fetch_1ms = ["--kafka-option", "fetch.wait.max.ms=1"];
    let sixteen = ["--kafka-partitions", "16"];
    use Storage::{Memory, Sqlite};
    let setups: [(&str, Vec<&str>, Storage); 6] = [
        ("defaults", vec![], Memory),
        ("1 ms fetch wait", fetch_1ms.to_vec(), Memory),
        ("16 partitions", sixteen.to_vec(), Memory),
        (
            "16 partitions, 1 ms fetch wait",
            [sixteen, fetch_1ms].concat(),
            Memory,
        ),
        ("SQLite, 1 ms fetch wait", fetch_1ms.to_vec(), Sqlite),
        (
            "one record per batch",
            vec!["--kafka-option", "batch.num.messages=1"],
            Memory,
        ),
    ];
    // `BENCH_KAFKA_SETUPS="defaults;16 partitions"` runs the set-ups named.
    let chosen = std::env::var("BENCH_KAFKA_SETUPS").ok();
    let setups = setups.iter().filter(|(name, ..)| {
        chosen
            .as_deref()
            .is_none_or(|c| c.split(';').any(|w| *name == w.trim()))
    });
    let mut columns = Vec::new();
    for (name, extra, storage) in setups {
        let (acked, e2e) = {
            let broker = Broker::start(&tansu, *storage);
            let args = [&["--kafka", broker.1.as_str()][..], extra].concat();
            with_server(rt, &args, end_to_end)
        };
        let (light, cpu) = {
            let broker = Broker::start(&tansu, *storage);
            let args = [&["--kafka", broker.1.as_str()][..], extra].concat();
            let before = (cpu_secs(broker.0.id()), Instant::now());
            let light = with_server(rt, &args, light);
            let used = cpu_secs(broker.0.id()) - before.0;
            (light, used / before.1.elapsed().as_secs_f64())
        };
        columns.push(KafkaColumn {
            name,
            acked,
            e2e,
            light,
            cpu,
        });
    }
    println!("\nKafka (tansu 0.6, loopback) against the embedded log, same machine:");
    let head: Vec<String> = columns
        .iter()
        .map(|c| format!("kafka, {}", c.name))
        .collect();
    println!("| | embedded | {} |", head.join(" | "));
    println!("|---|---:|{}", "---:|".repeat(columns.len()));
    let row = |name: String, e: String, f: &dyn Fn(&KafkaColumn) -> String| {
        let cells: Vec<String> = columns.iter().map(f).collect();
        println!("| {name} | {e} | {} |", cells.join(" | "));
    };
    row(
        "pings acked/s, 100 per batch, 64 clients".into(),
        format!("{e_acked:.0}"),
        &|c| format!("{:.0}", c.acked),
    );
    row(
        "pings/s end to end (acked and read by the dataflow)".into(),
        format!("{e_e2e:.0}"),
        &|c| format!("{:.0}", c.e2e),
    );
    let load = format!(
        "{} pings/s + {} orders/s",
        KAFKA_LOAD.pings * 1000 / KAFKA_LOAD.ping_every.as_millis() as u64,
        1000 / KAFKA_LOAD.order_every.as_millis()
    );
    row(
        format!("order → offer p50, {load}"),
        format!("{:.2} ms", e_light.p50),
        &|c| format!("{:.2} ms", c.light.p50),
    );
    row(
        format!("order → offer p99, {load}"),
        format!("{:.2} ms", e_light.p99),
        &|c| format!("{:.2} ms", c.light.p99),
    );
    row(
        "order → 202 (acked) p50".into(),
        format!("{:.2} ms", e_light.ack_p50),
        &|c| format!("{:.2} ms", c.light.ack_p50),
    );
    row(
        "offers seen / orders placed".into(),
        format!("{} / {}", e_light.seen, e_light.placed),
        &|c| format!("{} / {}", c.light.seen, c.light.placed),
    );
    row(
        "broker CPU during the latency phase (cores)".into(),
        "–".into(),
        &|c| format!("{:.2}", c.cpu),
    );
    if std::env::var("BENCH_KAFKA_HOP").is_ok_and(|v| v == "0") {
        return;
    }
    println!("\ntansu alone (no grabflow): one consumer hop, p50 / p99, 1 ms fetch wait:");
    println!("| input partitions | records only | with a tick into every partition per order |");
    println!("|---:|---:|---:|");
    for partitions in [4, 16] {
        let plain = broker_hop(rt, &tansu, partitions, false);
        let ticked = broker_hop(rt, &tansu, partitions, true);
        println!(
            "| {} | {:.2} / {:.2} ms | {:.2} / {:.2} ms |",
            3 * partitions,
            plain.0,
            plain.1,
            ticked.0,
            ticked.1
        );
    }
}
