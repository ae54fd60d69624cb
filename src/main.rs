//! `grabflow`: the command line. Parses arguments and wires components; the
//! work is done by the library crates.
//!
//! ## Layout
//!
//! - `serve`: ingress, dataflow and egress in one process over the embedded log.
//! - `token`: mints a signed token with the secret kept in the data dir.
//! - `sim`: drives a running server like a city's traffic (see `grabflow-sim`).
//! - `replay`: runs a JSON-lines event log through the dataflow and prints
//!   every decision as a JSON line.
//!
//! Settings come from flags, then `GRABFLOW_*` environment variables, then
//! an optional TOML file (`--config`), then defaults.

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use grabflow_api::{DispatchConfig, Event, Id, Time};
use grabflow_dataflow::replay::{replay, ReplayPlan};
use grabflow_dataflow::stats::DataflowStats;
use grabflow_egress::routes::{app, EgressState};
use grabflow_egress::view::Egress;
use grabflow_ingress::auth::{Claims, Role, Secret};
use grabflow_ingress::routes::{Ingress, Known};
use serde::Deserialize;
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "grabflow",
    version,
    about = "Real-time dispatch for on-demand food delivery, as one incremental dataflow"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run ingress, dataflow and egress in one process (embedded log).
    Serve(ServeArgs),
    /// Print a token signed with the secret in the data dir.
    Token {
        /// app, rider or ops.
        #[arg(long)]
        role: Role,
        /// The rider id (role rider).
        #[arg(long)]
        id: Option<String>,
        /// The data dir holding `secret.key` (created if missing).
        #[arg(long, env = "GRABFLOW_DATA_DIR", default_value = "./grabflow-data")]
        data_dir: PathBuf,
    },
    /// Drive a running grabflow like a city's traffic and report what happened.
    Sim(SimArgs),
    /// Replay an event log (one JSON event per line) and print every decision.
    Replay {
        /// The log file; `-` reads standard input.
        #[arg(long, default_value = "-")]
        log: String,
        /// Timely worker threads.
        #[arg(long, default_value_t = 1, env = "GRABFLOW_WORKERS")]
        workers: usize,
        /// Run the clock this long past the last event, so timers fire.
        #[arg(long, default_value = "1h", value_parser = parse_duration)]
        settle: Duration,
    },
}

/// `sim` settings.
#[derive(Args)]
struct SimArgs {
    /// The server.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// The server's data dir (its secret signs the simulator's tokens).
    #[arg(long, env = "GRABFLOW_DATA_DIR", default_value = "./grabflow-data")]
    data_dir: PathBuf,
    /// Simulated seconds per real second. Run the server with timings scaled
    /// alike (e.g. `--grab-timeout 3s --rider-ttl 6s` at `--speed 10`).
    #[arg(long, default_value_t = 1.0)]
    speed: f64,
    /// Seed of the city and of every random choice.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Riders.
    #[arg(long, default_value_t = 200)]
    riders: usize,
    /// Merchants.
    #[arg(long, default_value_t = 100)]
    merchants: usize,
    /// Orders per minute at the day's base (the lunch peak is ~5× that).
    #[arg(long, default_value_t = 5.0)]
    orders_per_min: f64,
    /// Simulated start time, HH:MM.
    #[arg(long, default_value = "11:00")]
    start: String,
    /// Simulated minutes to run.
    #[arg(long, default_value_t = 120.0)]
    minutes: f64,
    /// Write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write PNG charts (orders.png, latency.png) into this directory.
    #[arg(long)]
    plot: Option<PathBuf>,
}

/// `serve` settings; every one is also `GRABFLOW_<NAME>` and a TOML key.
#[derive(Args, Default)]
struct ServeArgs {
    /// A TOML file with any of the settings below (snake_case keys).
    #[arg(long, env = "GRABFLOW_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:8080].
    #[arg(long, env = "GRABFLOW_LISTEN")]
    listen: Option<String>,
    /// Where the log and the secret live [default: ./grabflow-data].
    #[arg(long, env = "GRABFLOW_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Timely worker threads [default: 1].
    #[arg(long, env = "GRABFLOW_WORKERS")]
    workers: Option<usize>,
    /// Offer radius, metres [default: 3000].
    #[arg(long, env = "GRABFLOW_RADIUS_M")]
    radius_m: Option<f64>,
    /// Cap on the growing radius, metres [default: 6000].
    #[arg(long, env = "GRABFLOW_MAX_RADIUS_M")]
    max_radius_m: Option<f64>,
    /// Radius growth per timed-out round [default: 1.5].
    #[arg(long, env = "GRABFLOW_RADIUS_GROWTH")]
    radius_growth: Option<f64>,
    /// Riders per offer round [default: 20].
    #[arg(long, env = "GRABFLOW_OFFERS")]
    offers: Option<usize>,
    /// Time to grab before re-offering, e.g. 30s [default: 30s].
    #[arg(long, env = "GRABFLOW_GRAB_TIMEOUT", value_parser = parse_duration)]
    grab_timeout: Option<Duration>,
    /// A rider silent this long leaves the index [default: 60s].
    #[arg(long, env = "GRABFLOW_RIDER_TTL", value_parser = parse_duration)]
    rider_ttl: Option<Duration>,
    /// Default rider capacity [default: 3].
    #[arg(long, env = "GRABFLOW_CAPACITY")]
    capacity: Option<u32>,
    /// Clock tick when no events arrive [default: 50ms].
    #[arg(long, env = "GRABFLOW_TICK", value_parser = parse_duration)]
    tick: Option<Duration>,
}

/// The TOML file's shape: the same settings, durations as strings.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<String>,
    data_dir: Option<PathBuf>,
    workers: Option<usize>,
    radius_m: Option<f64>,
    max_radius_m: Option<f64>,
    radius_growth: Option<f64>,
    offers: Option<usize>,
    grab_timeout: Option<String>,
    rider_ttl: Option<String>,
    capacity: Option<u32>,
    tick: Option<String>,
}

/// `30s`, `2m`, `500ms`, `1h`, or plain milliseconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 30s, 2m or 500ms"))?;
    let ms = match unit {
        "" | "ms" => n,
        "s" => n * 1e3,
        "m" => n * 60e3,
        "h" => n * 3600e3,
        _ => return Err(format!("{s:?}: unit must be ms, s, m or h")),
    };
    Ok(Duration::from_millis(ms as u64))
}

struct Settings {
    listen: String,
    data_dir: PathBuf,
    workers: usize,
    tick: Duration,
    dispatch: DispatchConfig,
}

fn settings(a: ServeArgs) -> anyhow::Result<Settings> {
    let file: FileConfig = match &a.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            toml::from_str(&text).with_context(|| format!("in {}", path.display()))?
        }
        None => FileConfig::default(),
    };
    let dur = |flag: Option<Duration>,
               file: Option<String>,
               default: Duration|
     -> anyhow::Result<Duration> {
        match (flag, file) {
            (Some(d), _) => Ok(d),
            (None, Some(s)) => parse_duration(&s).map_err(anyhow::Error::msg),
            (None, None) => Ok(default),
        }
    };
    let d = DispatchConfig::default();
    let dispatch = DispatchConfig {
        radius_m: a.radius_m.or(file.radius_m).unwrap_or(d.radius_m),
        max_radius_m: a
            .max_radius_m
            .or(file.max_radius_m)
            .unwrap_or(d.max_radius_m),
        radius_growth: a
            .radius_growth
            .or(file.radius_growth)
            .unwrap_or(d.radius_growth),
        offers: a.offers.or(file.offers).unwrap_or(d.offers),
        grab_timeout_ms: dur(
            a.grab_timeout,
            file.grab_timeout,
            Duration::from_millis(d.grab_timeout_ms),
        )?
        .as_millis() as Time,
        rider_ttl_ms: dur(
            a.rider_ttl,
            file.rider_ttl,
            Duration::from_millis(d.rider_ttl_ms),
        )?
        .as_millis() as Time,
        default_capacity: a.capacity.or(file.capacity).unwrap_or(d.default_capacity),
        dedup_window_ms: d.dedup_window_ms,
    };
    if let Err((field, why)) = dispatch.validate() {
        bail!("setting {field} {why}");
    }
    Ok(Settings {
        listen: a
            .listen
            .or(file.listen)
            .unwrap_or_else(|| "127.0.0.1:8080".into()),
        data_dir: a
            .data_dir
            .or(file.data_dir)
            .unwrap_or_else(|| "./grabflow-data".into()),
        workers: a.workers.or(file.workers).unwrap_or(1).max(1),
        tick: dur(a.tick, file.tick, Duration::from_millis(50))?,
        dispatch,
    })
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}

async fn serve(s: Settings) -> anyhow::Result<()> {
    let secret = Secret::load_or_create(&s.data_dir)?;
    let (feed_tx, feed_rx) = std::sync::mpsc::channel();
    let opened =
        grabflow_ingress::log::open(&s.data_dir, feed_tx, s.tick).context("opening the log")?;
    tracing::info!(
        replayed = opened.replayed,
        cut_bytes = opened.cut,
        "log opened"
    );
    let egress = Egress::new(s.dispatch.clone(), opened.last_time);
    let stats = DataflowStats::default();
    let dataflow = grabflow_dataflow::runtime::spawn(
        s.dispatch,
        s.workers,
        feed_rx,
        egress.clone(),
        stats.clone(),
    );
    let ingress = Ingress {
        log: opened.handle,
        secret: secret.clone(),
        known: Arc::new(Mutex::new(Known {
            orders: opened.known_orders,
            merchants: opened.known_merchants,
        })),
        grabs: egress.clone(),
    };
    let router = app(
        ingress,
        EgressState {
            egress: egress.clone(),
            secret,
            stats,
        },
    );
    let listener = tokio::net::TcpListener::bind(&s.listen)
        .await
        .with_context(|| format!("listening on {}", s.listen))?;
    println!("grabflow listening on http://{}", listener.local_addr()?);
    let closing = egress.clone();
    axum::serve(listener, router)
        .with_graceful_shutdown(async move {
            shutdown_signal().await;
            tracing::info!("shutting down: no new events; draining the dataflow");
            closing.close();
        })
        .await?;
    // The router (and with it every log handle) is gone: the writer stops,
    // the feed closes, and the dataflow drains what the clock has passed.
    tokio::task::spawn_blocking(move || {
        let _ = opened.writer.join();
        let _ = dataflow.join();
    })
    .await?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Serve(args) => {
            let s = settings(args)?;
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(serve(s))
        }
        Command::Sim(a) => {
            let (h, m) = a.start.split_once(':').context("--start is HH:MM")?;
            let start_hour = h.parse::<f64>().context("--start hour")?
                + m.parse::<f64>().context("--start minute")? / 60.0;
            let positive = |x: f64| x.is_finite() && x > 0.0;
            if !positive(a.speed) || a.riders == 0 || a.merchants == 0 || !positive(a.minutes) {
                bail!("--speed, --riders, --merchants and --minutes must be positive");
            }
            let cfg = grabflow_sim::SimConfig {
                url: a.url.trim_end_matches('/').to_string(),
                data_dir: a.data_dir,
                speed: a.speed,
                seed: a.seed,
                riders: a.riders,
                merchants: a.merchants,
                orders_per_min: a.orders_per_min,
                start_hour,
                minutes: a.minutes,
                progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
            };
            let report = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(grabflow_sim::run(cfg))?;
            print!("{}", report.render());
            if let Some(path) = a.json {
                std::fs::write(&path, serde_json::to_vec_pretty(&report)?)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            if let Some(dir) = a.plot {
                grabflow_sim::plot::write(&dir, &report.minutes).map_err(anyhow::Error::msg)?;
            }
            Ok(())
        }
        Command::Token { role, id, data_dir } => {
            let id = id.map(|i| Id::new(&i)).transpose().context("--id")?;
            if role == Role::Rider && id.is_none() {
                bail!("a rider token needs --id");
            }
            let secret = Secret::load_or_create(&data_dir)?;
            println!("{}", secret.sign(&Claims { role, id }));
            Ok(())
        }
        Command::Replay {
            log,
            workers,
            settle,
        } => {
            let reader: Box<dyn BufRead> = if log == "-" {
                Box::new(std::io::stdin().lock())
            } else {
                Box::new(std::io::BufReader::new(
                    std::fs::File::open(&log).with_context(|| format!("opening {log}"))?,
                ))
            };
            let mut events = Vec::new();
            for (n, line) in reader.lines().enumerate() {
                let line = line?;
                if !line.trim().is_empty() {
                    events.push(
                        serde_json::from_str::<Event>(&line)
                            .with_context(|| format!("line {}", n + 1))?,
                    );
                }
            }
            events.sort_by_key(|e| (e.time, e.offset));
            let end = events.last().map_or(0, |e| e.time) + settle.as_millis() as Time + 1;
            let plan = ReplayPlan {
                workers: workers.max(1),
                step: 1_000,
                end,
            };
            let mut out = std::io::stdout().lock();
            for (time, output) in replay(Arc::new(events), &DispatchConfig::default(), &plan) {
                serde_json::to_writer(
                    &mut out,
                    &serde_json::json!({ "time": time, "output": output }),
                )?;
                out.write_all(b"\n")?;
            }
            Ok(())
        }
    }
}
