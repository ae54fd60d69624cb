//! Dispatch benchmark on a generated city (issue: "the dispatch dataflow").
//!
//! `cargo bench -p grabflow-dataflow --bench dispatch` runs every mode in its
//! own child process on the same seeded city and prints one table:
//!
//! - `dataflow/1`, `dataflow/2`: the timely/differential dataflow at 1 and 2 workers;
//! - `reference`: the sequential reference model (the practical limit);
//! - `redis-geo`: the original design — `GEOADD` per ping and
//!   `GEOSEARCH … BYRADIUS 3 km ASC COUNT 20` per order, pipelined, against a
//!   `redis-server` started on a free loopback port.
//!
//! The city: 50 000 riders and 20 000 merchants, normally distributed
//! (σ = 6.5 km) around 31.23 N 121.47 E; every rider pings every 5 s moving
//! at most 30 m; orders are Zipf-distributed over merchants; R = 3 km, K = 20.
//! Phases are timed separately: pings (12 rounds = one minute of log time),
//! then orders. Peak memory is the child's peak RSS above its RSS once the
//! events were generated. `BENCH_SCALE=0.1` shrinks everything for a quick look.

use differential_dataflow::input::Input;
use grabflow_api::{DispatchConfig, Event, EventKind, Time};
use grabflow_dataflow::gen::City;
use grabflow_dataflow::graph::dispatch;
use grabflow_dataflow::reference::Reference;
use std::collections::BTreeMap;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use timely::dataflow::operators::Probe;

const T0: Time = 1_800_000_000_000;
const PING_ROUNDS: usize = 12;
const PING_PERIOD_MS: Time = 5_000;
const ORDER_PHASE_MS: Time = 10_000;
const STEP_MS: Time = 1_000;

struct Workload {
    opening: Vec<Event>,
    pings: Vec<Event>,
    orders: Vec<Event>,
    ping_end: Time,
    order_end: Time,
}

fn scale() -> f64 {
    std::env::var("BENCH_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0)
}

fn workload() -> Workload {
    let s = scale();
    let mut city = City::new(
        42,
        (50_000.0 * s) as usize,
        (20_000.0 * s) as usize,
        6_500.0,
    );
    let opening = city.opening(T0);
    let mut pings = Vec::new();
    for round in 0..PING_ROUNDS {
        pings.extend(city.ping_round(
            T0 + 1 + round as Time * PING_PERIOD_MS,
            PING_PERIOD_MS,
            30.0,
        ));
    }
    let ping_end = T0 + 1 + PING_ROUNDS as Time * PING_PERIOD_MS;
    let orders = city.orders(ping_end, ORDER_PHASE_MS, (20_000.0 * s) as usize);
    Workload {
        opening,
        pings,
        orders,
        ping_end,
        order_end: ping_end + ORDER_PHASE_MS,
    }
}

/// (current RSS, peak RSS) of this process, in bytes.
fn memory() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// With `BENCH_PHASES` set, reports the RSS after each phase on stderr.
fn phase_memory(phase: &str) {
    if std::env::var_os("BENCH_PHASES").is_some() {
        let (rss, peak) = memory();
        eprintln!("{phase}: rss {} MiB, peak {} MiB", rss >> 20, peak >> 20);
    }
}

struct Measured {
    pings_s: f64,
    orders_s: f64,
    offers: u64,
}

fn run_reference(w: &Workload, cfg: &DispatchConfig) -> Measured {
    let mut model = Reference::new(cfg.clone());
    let mut offers = 0u64;
    let mut feed = |events: &[Event], model: &mut Reference| {
        let mut by_time: BTreeMap<Time, Vec<&Event>> = BTreeMap::new();
        for e in events {
            by_time.entry(e.time).or_default().push(e);
        }
        for (t, es) in by_time {
            offers += model
                .step(t, es)
                .iter()
                .filter(|o| matches!(o, grabflow_api::Output::Offered { .. }))
                .count() as u64;
        }
    };
    feed(&w.opening, &mut model);
    let start = Instant::now();
    feed(&w.pings, &mut model);
    let pings_s = w.pings.len() as f64 / start.elapsed().as_secs_f64();
    let start = Instant::now();
    feed(&w.orders, &mut model);
    let orders_s = w.orders.len() as f64 / start.elapsed().as_secs_f64();
    Measured {
        pings_s,
        orders_s,
        offers,
    }
}

fn run_dataflow(w: Arc<Workload>, cfg: &DispatchConfig, workers: usize) -> Measured {
    let cfg = cfg.clone();
    let result = Arc::new(Mutex::new(None));
    let sink = Arc::clone(&result);
    timely::execute(timely::Config::process(workers), move |worker| {
        let (me, peers) = (worker.index(), worker.peers());
        let offers = std::rc::Rc::new(std::cell::Cell::new(0u64));
        let count = std::rc::Rc::clone(&offers);
        let (mut input, probe) = worker.dataflow::<Time, _, _>(|scope| {
            let (input, events) = scope.new_collection::<Event, isize>();
            let out = dispatch(events, &cfg).outputs;
            let out = out.inspect(move |(o, _, _)| {
                if matches!(o, grabflow_api::Output::Offered { .. }) {
                    count.set(count.get() + 1)
                }
            });
            let (probe, _) = out.inner.probe();
            (input, probe)
        });
        input.advance_to(T0);
        let mut feed = |events: &[Event], until: Time| {
            let mut epoch = *input.time();
            for (i, e) in events.iter().enumerate() {
                if e.time >= epoch + STEP_MS {
                    epoch = e.time;
                    input.advance_to(epoch);
                    input.flush();
                    worker.step_while(|| probe.less_than(input.time()));
                }
                if i % peers == me {
                    input.update_at(e.clone(), e.time, 1);
                }
            }
            input.advance_to(until);
            input.flush();
            worker.step_while(|| probe.less_than(&until));
        };
        feed(&w.opening, T0 + 1);
        phase_memory("opening");
        let start = Instant::now();
        feed(&w.pings, w.ping_end);
        phase_memory("pings");
        let pings_s = w.pings.len() as f64 / start.elapsed().as_secs_f64();
        let start = Instant::now();
        feed(&w.orders, w.order_end);
        let orders_s = w.orders.len() as f64 / start.elapsed().as_secs_f64();
        phase_memory("orders");
        // Stop here, as a live service would: closing the input would let the
        // clock run to infinity and fire every pending timer.
        for dataflow in worker.installed_dataflows() {
            worker.drop_dataflow(dataflow);
        }
        if me == 0 {
            *sink.lock().unwrap() = Some((pings_s, orders_s, offers.get()));
        }
    })
    .expect("timely starts");
    let (pings_s, orders_s, offers) = result.lock().unwrap().take().expect("worker 0 reports");
    Measured {
        pings_s,
        orders_s,
        offers,
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The original design on Redis GEO commands. Returns the measurement and
/// Redis's own peak memory.
fn run_redis(w: &Workload) -> Option<(Measured, u64)> {
    let port = free_port();
    let mut server = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .ok()?;
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/")).ok()?;
    let mut con = (0..100).find_map(|_| {
        std::thread::sleep(std::time::Duration::from_millis(50));
        client.get_connection().ok()
    })?;
    let key = "bench:riders";
    let geoadd = |events: &[Event], con: &mut redis::Connection| {
        for chunk in events.chunks(1000) {
            let mut pipe = redis::pipe();
            for e in chunk {
                if let EventKind::LocationPinged { rider, at } = &e.kind {
                    pipe.cmd("GEOADD")
                        .arg(key)
                        .arg(at.lon())
                        .arg(at.lat())
                        .arg(rider.as_str())
                        .ignore();
                }
            }
            pipe.query::<()>(con).expect("GEOADD");
        }
    };
    geoadd(&w.opening, &mut con);
    let start = Instant::now();
    geoadd(&w.pings, &mut con);
    let pings_s = w.pings.len() as f64 / start.elapsed().as_secs_f64();
    let merchants: std::collections::HashMap<_, _> = w
        .opening
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::MerchantUpserted { merchant, at, .. } => Some((merchant.clone(), *at)),
            _ => None,
        })
        .collect();
    let start = Instant::now();
    let mut offers = 0u64;
    for chunk in w.orders.chunks(100) {
        let mut pipe = redis::pipe();
        for e in chunk {
            if let EventKind::OrderPlaced { merchant, .. } = &e.kind {
                let at = merchants[merchant];
                pipe.cmd("GEOSEARCH")
                    .arg(key)
                    .arg("FROMLONLAT")
                    .arg(at.lon())
                    .arg(at.lat());
                pipe.arg("BYRADIUS")
                    .arg(3000)
                    .arg("m")
                    .arg("ASC")
                    .arg("COUNT")
                    .arg(20);
            }
        }
        let found: Vec<Vec<String>> = pipe.query(&mut con).expect("GEOSEARCH");
        offers += found.iter().map(|v| v.len() as u64).sum::<u64>();
    }
    let orders_s = w.orders.len() as f64 / start.elapsed().as_secs_f64();
    let info: String = redis::cmd("INFO")
        .arg("memory")
        .query(&mut con)
        .unwrap_or_default();
    let peak = info
        .lines()
        .find_map(|l| l.strip_prefix("used_memory_peak:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let _ = server.kill();
    let _ = server.wait();
    Some((
        Measured {
            pings_s,
            orders_s,
            offers,
        },
        peak,
    ))
}

fn child(mode: &str) {
    let cfg = DispatchConfig::default();
    let w = Arc::new(workload());
    let (base, _) = memory();
    let (m, extra_peak) = match mode {
        "reference" => (run_reference(&w, &cfg), 0),
        "dataflow-1" => (run_dataflow(Arc::clone(&w), &cfg, 1), 0),
        "dataflow-2" => (run_dataflow(Arc::clone(&w), &cfg, 2), 0),
        "redis-geo" => match run_redis(&w) {
            Some(r) => r,
            None => {
                println!("RESULT {mode} skipped");
                return;
            }
        },
        other => panic!("unknown mode {other}"),
    };
    let (_, peak) = memory();
    let mem = peak.saturating_sub(base) + extra_peak;
    println!(
        "RESULT {mode} {} {} {} {}",
        m.pings_s, m.orders_s, m.offers, mem
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--mode") {
        return child(&args[i + 1]);
    }
    if args.iter().any(|a| a == "--list") {
        return;
    }
    let s = scale();
    println!(
        "city: {} riders, {} merchants, {} pings, {} orders (BENCH_SCALE={s}); R = 3 km, K = 20",
        (50_000.0 * s) as usize,
        (20_000.0 * s) as usize,
        (50_000.0 * s) as usize * PING_ROUNDS,
        (20_000.0 * s) as usize
    );
    let exe = std::env::current_exe().expect("own path");
    let mut rows = Vec::new();
    for mode in ["reference", "dataflow-1", "dataflow-2", "redis-geo"] {
        let out = Command::new(&exe)
            .args(["--mode", mode])
            .output()
            .expect("child runs");
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text
            .lines()
            .find(|l| l.starts_with("RESULT"))
            .unwrap_or("")
            .to_string();
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() == 6 {
            let num = |i: usize| f[i].parse::<f64>().unwrap_or(0.0);
            rows.push((mode, num(2), num(3), num(4), num(5)));
        } else {
            eprintln!("{mode}: {line} {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    let get = |m: &str| rows.iter().find(|r| r.0 == m).copied();
    println!("\n| mode | pings/s | per worker | orders/s | offers made | peak memory |");
    println!("|---|---:|---:|---:|---:|---:|");
    for &(mode, p, o, offers, mem) in &rows {
        let workers = if mode == "dataflow-2" { 2.0 } else { 1.0 };
        println!(
            "| {mode} | {:.0} | {:.0} | {:.0} | {offers:.0} | {:.0} MiB |",
            p,
            p / workers,
            o,
            mem / 1048576.0
        );
    }
    if let (Some(r), Some(d1)) = (get("reference"), get("dataflow-1")) {
        println!(
            "\ndataflow/1 vs reference: pings {:.2}x, orders {:.2}x",
            d1.1 / r.1,
            d1.2 / r.2
        );
        if let Some(d2) = get("dataflow-2") {
            println!(
                "dataflow/2 vs reference: pings {:.2}x, orders {:.2}x",
                d2.1 / r.1,
                d2.2 / r.2
            );
        }
        if let Some(g) = get("redis-geo") {
            println!(
                "dataflow/1 vs redis-geo: pings {:.2}x, orders {:.2}x",
                d1.1 / g.1,
                d1.2 / g.2
            );
        }
    }
}
