//! Soak benchmark: a city for a simulated week against the real
//! `grabflow serve`, at high speed, with every retention scaled alike.
//!
//! `cargo bench --bench soak` runs `grabflow sim` (the library) one
//! simulated day at a time against one server: riders pinging on shift,
//! orders on the day's curve (lunch and dinner peaks), full life cycles,
//! cancellations. Log time is real time, so a simulated day lasts
//! `SOAK_DAY_SECS` real seconds (default 120: speed 720) and every
//! retention is divided by the same speed: orders (1 h), riders (24 h),
//! idempotency keys (24 h), rider streams (1 h), the log (24 h); the
//! history retention is two simulated days (not seven, so the run reaches
//! its steady state) and checkpoints are taken every 2 real seconds.
//! Dispatch's own timings are not scaled (a grab timeout of 40 ms would be
//! shorter than a rider's round trip): 2 s to grab, riders silent for 5 s
//! leave the index. After each day it reports
//! the server's RSS, the data dir's size (and the checkpoints' share), the
//! last checkpoint's size and write time; after days 2, 4 and 7 (and the
//! last) it stops the server (SIGTERM) and starts it again, reporting the
//! time to `/readyz`, the restart's peak RSS and the events it replayed.
//!
//! Knobs: `SOAK_DAYS` (7), `SOAK_DAY_SECS` (120), `SOAK_RIDERS` (60),
//! `SOAK_MERCHANTS` (40), `SOAK_ORDERS_PER_MIN` (base rate per simulated
//! minute, 2; peaks reach ~5×).

use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
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

/// The peak and current RSS of process `pid`, MiB.
fn rss_mib(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    };
    (field("VmHWM:"), field("VmRSS:"))
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

/// Starts `grabflow serve` on `dir` with `args` and waits for `/readyz`:
/// the process, its URL and how long it took. (The caller waits for the
/// process, after stopping it.)
#[allow(clippy::zombie_processes)]
async fn start(dir: &Path, args: &[String]) -> (Child, String, Duration) {
    let t0 = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_grabflow"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .expect("the server starts");
    let mut line = String::new();
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    out.read_line(&mut line)
        .expect("the server says where it listens");
    let url = line
        .trim()
        .rsplit(' ')
        .next()
        .unwrap_or_default()
        .to_string();
    // Keep reading its stdout so it never blocks on a full pipe.
    std::thread::spawn(move || for _ in out.lines() {});
    let http = reqwest::Client::new();
    loop {
        if let Ok(r) = http.get(format!("{url}/readyz")).send().await {
            if r.status().is_success() {
                return (child, url, t0.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn sigterm(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
}

/// The server's `/v1/ops/metrics`.
async fn metrics(url: &str, dir: &Path) -> Value {
    let secret = grabflow_http::auth::Secret::load_or_create(dir).expect("the secret");
    let ops = secret.sign(&grabflow_http::auth::Claims {
        role: grabflow_http::auth::Role::Ops,
        id: None,
    });
    match reqwest::Client::new()
        .get(format!("{url}/v1/ops/metrics"))
        .bearer_auth(ops)
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
    ]
    .into_iter()
    .flat_map(|(k, v)| [k.to_string(), v])
    .collect();
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
    println!("\n| day | orders placed / delivered | events sent | RSS | data dir | of it checkpoints | last checkpoint (write) | restart: ready in | restart peak RSS | replayed events |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let (mut server, mut url, _) = rt.block_on(start(&dir, &args));
    let mut rss_by_day = Vec::new();
    let mut dir_by_day = Vec::new();
    for d in 1..=days {
        let cfg = grabflow_sim::SimConfig {
            url: url.clone(),
            data_dir: dir.clone(),
            speed,
            seed: u64::from(d),
            riders,
            merchants,
            orders_per_min,
            start_hour: 0.0,
            minutes: 1440.0,
            progress: false,
            tag: format!("d{d}"),
        };
        let report = rt.block_on(grabflow_sim::run(cfg));
        let (placed, delivered, sent) = match &report {
            Ok(r) => {
                if !r.errors.is_empty() {
                    eprintln!("day {d}: the simulation saw errors: {:?}", r.errors);
                }
                (r.orders_placed, r.orders_delivered, r.events_sent)
            }
            Err(e) => {
                eprintln!("day {d}: the simulation stopped: {e}");
                (0, 0, 0)
            }
        };
        if std::env::var("SOAK_DEBUG").is_ok() {
            rt.block_on(async {
                let secret = grabflow_http::auth::Secret::load_or_create(&dir).unwrap();
                let app = secret.sign(&grabflow_http::auth::Claims { role: grabflow_http::auth::Role::Ops, id: None });
                for path in ["/v1/ops/metrics".to_string(), format!("/v1/orders/simd{d}-o0"), format!("/v1/orders/simd{d}-o5"), "/v1/riders/sim-r0".to_string(), "/v1/merchants/sim-m0/riders".to_string()] {
                    let r = reqwest::Client::new().get(format!("{url}{path}")).bearer_auth(&app).send().await.unwrap();
                    eprintln!("DEBUG {path}: {} {}", r.status(), r.text().await.unwrap_or_default().chars().take(2500).collect::<String>());
                }
            });
        }
        let m = rt.block_on(metrics(&url, &dir));
        let (_, rss) = rss_mib(server.id());
        let (total, ckpt) = (size_of(&dir), size_of(&dir.join("checkpoints")));
        rss_by_day.push(rss);
        dir_by_day.push(mib(total));
        let c = &m["checkpoint"];
        let last = format!(
            "{:.1} MiB ({} ms)",
            mib(c["bytes"].as_u64().unwrap_or(0)),
            c["write_ms"].as_u64().unwrap_or(0)
        );
        let restart = [2, 4, 7, days].contains(&d);
        let (ready, peak, replayed) = if restart {
            sigterm(&mut server);
            let (s, u, took) = rt.block_on(start(&dir, &args));
            let (peak, _) = rss_mib(s.id());
            let m = rt.block_on(metrics(&u, &dir));
            let replayed = m["checkpoint"]["replayed_events"].as_u64().unwrap_or(0);
            (server, url) = (s, u);
            (
                format!("{:.2} s", took.as_secs_f64()),
                format!("{peak:.0} MiB"),
                replayed.to_string(),
            )
        } else {
            ("".into(), "".into(), "".into())
        };
        println!(
            "| {d} | {placed} / {delivered} | {sent} | {rss:.0} MiB | {:.1} MiB | {:.1} MiB | {last} | {ready} | {peak} | {replayed} |",
            mib(total),
            mib(ckpt)
        );
    }
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
