//! Soak benchmark: a city for a simulated week against the real
//! `grabflow serve`, at high speed, with every retention scaled alike.
//!
//! `cargo bench --bench soak` runs one `grabflow sim` city (the library)
//! for `SOAK_DAYS` simulated days against one server: riders pinging on
//! shift, orders on the day's curve (lunch and dinner peaks), full life
//! cycles, cancellations. Log time is real time, so a simulated day lasts
//! `SOAK_DAY_SECS` real seconds (default 120: speed 720) and every
//! retention is divided by the same speed: orders (1 h), riders (24 h),
//! idempotency keys (24 h), rider streams (1 h), the log (24 h); the
//! history retention is two simulated days (not seven, so the run reaches
//! its steady state) and checkpoints are taken every 2 real seconds.
//! Dispatch's own timings are not scaled (a grab timeout of 40 ms would be
//! shorter than a rider's round trip): 2 s to grab, riders silent for 5 s
//! leave the index.
//!
//! At the end of each simulated day it reports the orders in the live view
//! and archived, the events, the server's RSS, the data dir's size (and the
//! checkpoints' share), the last checkpoint's size and write time and the
//! dataflow's lag; after the week, the city's own report, then a restart
//! (SIGTERM, start again): time to `/readyz`, peak RSS, events replayed.
//!
//! Knobs: `SOAK_DAYS` (7), `SOAK_DAY_SECS` (120), `SOAK_RIDERS` (60),
//! `SOAK_MERCHANTS` (40), `SOAK_ORDERS_PER_MIN` (base rate per simulated
//! minute, 2; peaks reach ~5×).

mod common;

use common::{rss_mib, sigterm, start_ready, token};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// A duration of simulated time as a real-time setting at `speed`.
fn scaled(sim_secs: f64, speed: f64) -> String {
    format!(
        "{}ms",
        ((sim_secs / speed) * 1000.0).round().max(1.0) as u64
    )
}

/// Bytes under `path` (files, recursively).
fn size_of(path: &Path) -> u64 {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    if !meta.is_dir() {
        return meta.len();
    }
    std::fs::read_dir(path)
        .map(|entries| entries.flatten().map(|e| size_of(&e.path())).sum())
        .unwrap_or(0)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / 1048576.0
}

/// The server's `/v1/ops/metrics`.
async fn metrics(url: &str, dir: &Path) -> Value {
    match reqwest::Client::new()
        .get(format!("{url}/v1/ops/metrics"))
        .bearer_auth(token(dir, "ops", None))
        .send()
        .await
    {
        Ok(r) => r.json().await.unwrap_or_default(),
        Err(_) => Value::Null,
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let days: u32 = env_or("SOAK_DAYS", 7);
    let day_secs: f64 = env_or("SOAK_DAY_SECS", 120.0);
    let riders: usize = env_or("SOAK_RIDERS", 60);
    let merchants: usize = env_or("SOAK_MERCHANTS", 40);
    let orders_per_min: f64 = env_or("SOAK_ORDERS_PER_MIN", 2.0);
    let speed = 86_400.0 / day_secs;
    let (hour, day) = (3600.0, 86_400.0);
    let args: Vec<String> = [
        // Dispatch's own timings stay workable in real time (an HTTP round
        // trip is a millisecond): only the retentions are scaled.
        ("--grab-timeout", "2s".to_string()),
        ("--rider-ttl", "5s".to_string()),
        ("--order-retention", scaled(hour, speed)),
        ("--rider-retention", scaled(day, speed)),
        ("--history-retention", scaled(2.0 * day, speed)),
        ("--idempotency-window", scaled(day, speed)),
        ("--stream-retention", scaled(hour, speed)),
        ("--log-retention", scaled(day, speed)),
        ("--checkpoint-interval", "2s".to_string()),
        // Segments small enough to be sealed, and deleted, within the run.
        ("--log-segment-bytes", (4u64 << 20).to_string()),
    ]
    .into_iter()
    .flat_map(|(k, v)| [k.to_string(), v])
    .collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let dir: PathBuf =
        std::env::temp_dir().join(format!("grabflow-bench-soak-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    println!(
        "soak: {days} simulated days of {day_secs} s (speed {speed:.0}), {riders} riders, \
         {merchants} merchants, {orders_per_min} orders/min at the base; server: {}",
        args.join(" ")
    );
    println!("\n| day | orders in the live view | orders archived | events | RSS | data dir | of it checkpoints | last checkpoint (write) | dataflow lag |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let (mut server, url, _) = rt.block_on(start_ready(&dir, &args));
    // One city for the whole run (a simulation ends with riders mid-way:
    // runs one after another would leave them loaded for good).
    let cfg = grabflow_sim::SimConfig {
        url: url.clone(),
        data_dir: dir.clone(),
        speed,
        seed: 7,
        riders,
        merchants,
        orders_per_min,
        start_hour: 0.0,
        minutes: 1440.0 * f64::from(days),
        progress: false,
        tag: String::new(),
    };
    let city = rt.spawn(grabflow_sim::run(cfg));
    let mut rss_by_day = Vec::new();
    let mut dir_by_day = Vec::new();
    let started = Instant::now();
    for d in 1..=days {
        let due = started + Duration::from_secs_f64(day_secs * f64::from(d));
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
        let m = rt.block_on(metrics(&url, &dir));
        let (_, rss) = rss_mib(server.id());
        let (total, ckpt) = (size_of(&dir), size_of(&dir.join("checkpoints")));
        rss_by_day.push(rss);
        dir_by_day.push(mib(total));
        let c = &m["checkpoint"];
        let events: u64 = m["events"]
            .as_object()
            .map_or(0, |e| e.values().filter_map(Value::as_u64).sum());
        println!(
            "| {d} | {} | {} | {events} | {rss:.0} MiB | {:.1} MiB | {:.1} MiB | {:.1} MiB ({} ms) | {} ms |",
            m["orders"],
            m["orders_archived"],
            mib(total),
            mib(ckpt),
            mib(c["bytes"].as_u64().unwrap_or(0)),
            c["write_ms"].as_u64().unwrap_or(0),
            m["dataflow"]["lag_ms"],
        );
    }
    let report = rt.block_on(city);
    match report {
        Ok(Ok(r)) => println!(
            "\ncity: {} orders placed, {} delivered, {} cancelled, {} events sent; errors {:?}",
            r.orders_placed, r.orders_delivered, r.orders_cancelled, r.events_sent, r.errors
        ),
        Ok(Err(e)) => println!("\nthe simulation stopped: {e}"),
        Err(e) => println!("\nthe simulation panicked: {e}"),
    }
    // A restart after the week: from the latest checkpoint.
    let (_, live) = rss_mib(server.id());
    sigterm(&mut server);
    let (s, u, took) = rt.block_on(start_ready(&dir, &args));
    let (peak, _) = rss_mib(s.id());
    let m = rt.block_on(metrics(&u, &dir));
    server = s;
    println!(
        "restart after day {days}: ready in {:.2} s, peak RSS {peak:.0} MiB (live before the stop {live:.0} MiB), {} events replayed",
        took.as_secs_f64(),
        m["checkpoint"]["replayed_events"]
    );
    sigterm(&mut server);
    if rss_by_day.len() >= 7 {
        let (day2, day7) = (rss_by_day[1], rss_by_day[6]);
        println!(
            "\nRSS after day 7 / after day 2: {:.2} (target ≤ 1.10); data dir after day 7 / after day 2: {:.2}",
            day7 / day2,
            dir_by_day[6] / dir_by_day[1].max(0.001)
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
