//! `grabflow`: the command line. Parses arguments and wires components; the
//! work is done by the library crates.
//!
//! ## Layout
//!
//! - `serve`: ingress, dataflow and egress in one process, over the embedded
//!   log, or over Kafka with `--kafka` (and a Redis mirror with `--redis`).
//! - `ingress`, `dataflow`, `egress`: the same parts as separate processes
//!   over Kafka (split roles); `dataflow` also runs as a timely cluster
//!   (`--processes`, `--process`, `--hosts`).
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
use grabflow_dataflow::riders::RiderTables;
use grabflow_dataflow::runtime::{self, Fanout, Observer};
use grabflow_dataflow::stats::DataflowStats;
use grabflow_egress::kafka::{follow, OutputSink};
use grabflow_egress::redis::RedisMirror;
use grabflow_egress::routes::{app, EgressState};
use grabflow_egress::view::Egress;
use grabflow_ingress::auth::{Claims, Role, Secret};
use grabflow_ingress::kafka::{
    ensure_topics, Follower, GrabResults, KafkaConfig, KafkaLog, KafkaSources,
};
use grabflow_ingress::log::{LogHandle, Ticks};
use grabflow_ingress::routes::{Ingress, Known};
use serde::Deserialize;
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// mimalloc: the service allocates per request and per event on several
/// threads, where glibc's malloc showed up at ~15% of a busy server's time.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Idempotency keys and their first uses.
type KeyAnswers = Arc<Mutex<grabflow_ingress::keys::Keys>>;

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
    /// Run ingress, dataflow and egress in one process (embedded log, or Kafka).
    Serve(ServeArgs),
    /// Run only ingress (HTTP → Kafka); needs `--kafka`.
    Ingress(ServeArgs),
    /// Run only the dataflow (Kafka → Kafka, Redis); needs `--kafka`.
    Dataflow(ServeArgs),
    /// Run only egress (Kafka → rider streams, queries); needs `--kafka`.
    Egress(ServeArgs),
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
    /// Embedded log: location pings alone reach the dataflow within this
    /// long (any other event as soon as its millisecond is over); 0 ticks
    /// every millisecond [default: 10ms].
    #[arg(long, env = "GRABFLOW_PING_TICK", value_parser = parse_duration)]
    ping_tick: Option<Duration>,
    /// Kafka bootstrap servers, HOST:PORT[,…]: production mode.
    #[arg(long, env = "GRABFLOW_KAFKA")]
    kafka: Option<String>,
    /// Prefix of the Kafka topic names [default: grabflow.].
    #[arg(long, env = "GRABFLOW_KAFKA_PREFIX")]
    kafka_prefix: Option<String>,
    /// Prefix of the output topics when not --kafka-prefix (a shadow
    /// dataflow reading the same log) [default: the --kafka-prefix].
    #[arg(long, env = "GRABFLOW_KAFKA_OUTPUT_PREFIX")]
    kafka_output_prefix: Option<String>,
    /// Partitions of the topics grabflow creates [default: 4].
    #[arg(long, env = "GRABFLOW_KAFKA_PARTITIONS")]
    kafka_partitions: Option<i32>,
    /// Replicas of the topics grabflow creates [default: 1].
    #[arg(long, env = "GRABFLOW_KAFKA_REPLICATION")]
    kafka_replication: Option<i32>,
    /// An input partition holding back a newer event gets a clock tick
    /// after this long [default: 5ms]; other idle partitions every --tick.
    #[arg(long, env = "GRABFLOW_KAFKA_TICK", value_parser = parse_duration)]
    kafka_tick: Option<Duration>,
    /// How long an append waits for the broker before 503 [default: 5s].
    #[arg(long, env = "GRABFLOW_KAFKA_ACK_TIMEOUT", value_parser = parse_duration)]
    kafka_ack_timeout: Option<Duration>,
    /// Redis URL (redis://HOST:PORT/DB) of the mirror of the index and live orders.
    #[arg(long, env = "GRABFLOW_REDIS")]
    redis: Option<String>,
    /// Prefix of the mirror's Redis keys [default: grabflow:].
    #[arg(long, env = "GRABFLOW_REDIS_PREFIX")]
    redis_prefix: Option<String>,
    /// Dataflow processes of a timely cluster [default: 1].
    #[arg(long, env = "GRABFLOW_PROCESSES")]
    processes: Option<usize>,
    /// This process's index in the cluster, from 0 [default: 0].
    #[arg(long, env = "GRABFLOW_PROCESS")]
    process: Option<usize>,
    /// The cluster's processes, HOST:PORT for each, comma-separated, in order.
    #[arg(long, env = "GRABFLOW_HOSTS")]
    hosts: Option<String>,
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
    ping_tick: Option<String>,
    kafka: Option<String>,
    kafka_prefix: Option<String>,
    kafka_output_prefix: Option<String>,
    kafka_partitions: Option<i32>,
    kafka_replication: Option<i32>,
    kafka_tick: Option<String>,
    kafka_ack_timeout: Option<String>,
    redis: Option<String>,
    redis_prefix: Option<String>,
    processes: Option<usize>,
    process: Option<usize>,
    hosts: Option<String>,
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
    ticks: Ticks,
    dispatch: DispatchConfig,
    kafka: Option<KafkaConfig>,
    redis: Option<(String, String)>,
    /// Process index, and the cluster's addresses (empty: one process).
    cluster: (usize, Vec<String>),
}

impl Settings {
    /// Rider trackers the egress view can read, when every worker of the
    /// dataflow runs in this process.
    fn rider_tables(&self) -> Option<RiderTables> {
        self.cluster
            .1
            .is_empty()
            .then(|| RiderTables::new(self.workers, self.dispatch.rider_ttl_ms))
    }

    /// The timely configuration: threads of this process, or a cluster.
    fn timely(&self) -> timely::Config {
        let (process, hosts) = &self.cluster;
        let communication = if hosts.len() > 1 {
            timely::CommunicationConfig::Cluster {
                threads: self.workers,
                process: *process,
                addresses: hosts.clone(),
                report: false,
                zerocopy: false,
            }
        } else {
            timely::CommunicationConfig::Process(self.workers)
        };
        timely::Config {
            communication,
            worker: timely::WorkerConfig::default(),
        }
    }

    fn kafka(&self) -> anyhow::Result<&KafkaConfig> {
        self.kafka
            .as_ref()
            .context("this role runs over Kafka: give --kafka HOST:PORT")
    }
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
    let ticks = Ticks {
        idle: dur(a.tick, file.tick, Duration::from_millis(50))?,
        pings: dur(a.ping_tick, file.ping_tick, Duration::from_millis(10))?,
    };
    if ticks.idle.is_zero() {
        bail!("--tick must be positive");
    }
    let kafka = match a.kafka.or(file.kafka) {
        Some(brokers) => {
            let mut k = KafkaConfig::new(&brokers);
            if let Some(p) = a.kafka_prefix.or(file.kafka_prefix) {
                k.prefix = p;
            }
            k.output_prefix = a.kafka_output_prefix.or(file.kafka_output_prefix);
            k.partitions = a
                .kafka_partitions
                .or(file.kafka_partitions)
                .unwrap_or(k.partitions);
            k.replication = a
                .kafka_replication
                .or(file.kafka_replication)
                .unwrap_or(k.replication);
            k.tick = dur(a.kafka_tick, file.kafka_tick, k.tick)?;
            k.idle_tick = ticks.idle;
            k.ack_timeout = dur(a.kafka_ack_timeout, file.kafka_ack_timeout, k.ack_timeout)?;
            if k.partitions < 1 || k.replication < 1 || k.tick.is_zero() {
                bail!("--kafka-partitions, --kafka-replication and --kafka-tick must be positive");
            }
            Some(k)
        }
        None => None,
    };
    let redis = a.redis.or(file.redis).map(|url| {
        let prefix = a
            .redis_prefix
            .or(file.redis_prefix)
            .unwrap_or_else(|| "grabflow:".into());
        (url, prefix)
    });
    let processes = a.processes.or(file.processes).unwrap_or(1).max(1);
    let process = a.process.or(file.process).unwrap_or(0);
    let hosts: Vec<String> = a
        .hosts
        .or(file.hosts)
        .map(|h| {
            h.split(',')
                .map(|x| x.trim().to_string())
                .filter(|x| !x.is_empty())
                .collect()
        })
        .unwrap_or_default();
    if processes > 1 && hosts.len() != processes {
        bail!("--hosts must list {processes} HOST:PORT addresses, one per process");
    }
    if process >= processes {
        bail!("--process must be below --processes");
    }
    Ok(Settings {
        kafka,
        redis,
        cluster: (process, if processes > 1 { hosts } else { Vec::new() }),
        listen: a
            .listen
            .or(file.listen)
            .unwrap_or_else(|| "127.0.0.1:8080".into()),
        data_dir: a
            .data_dir
            .or(file.data_dir)
            .unwrap_or_else(|| "./grabflow-data".into()),
        workers: a.workers.or(file.workers).unwrap_or(1).max(1),
        ticks,
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

/// The Redis mirror, when `--redis` is given.
fn mirror(s: &Settings) -> anyhow::Result<Option<Arc<dyn Observer>>> {
    Ok(match &s.redis {
        Some((url, prefix)) => Some(
            RedisMirror::start(url, prefix, s.dispatch.radius_m).context("--redis")?
                as Arc<dyn Observer>,
        ),
        None => None,
    })
}

async fn listen(s: &Settings) -> anyhow::Result<tokio::net::TcpListener> {
    let listener = tokio::net::TcpListener::bind(&s.listen)
        .await
        .with_context(|| format!("listening on {}", s.listen))?;
    println!("grabflow listening on http://{}", listener.local_addr()?);
    Ok(listener)
}

/// Serves `router` until SIGTERM/Ctrl-C, then ends `egress`'s rider streams.
async fn serve_until_shutdown(
    s: &Settings,
    router: axum::Router,
    egress: &Arc<Egress>,
) -> anyhow::Result<()> {
    let listener = listen(s).await?;
    let closing = Arc::clone(egress);
    axum::serve(listener, router)
        .with_graceful_shutdown(async move {
            shutdown_signal().await;
            tracing::info!("shutting down: no new events; draining the dataflow");
            closing.close();
        })
        .await?;
    Ok(())
}

async fn serve(s: Settings) -> anyhow::Result<()> {
    if s.kafka.is_some() {
        return serve_kafka(s).await;
    }
    let secret = Secret::load_or_create(&s.data_dir)?;
    let (feed_tx, feed_rx) = std::sync::mpsc::channel();
    let opened =
        grabflow_ingress::log::open(&s.data_dir, feed_tx, s.ticks).context("opening the log")?;
    tracing::info!(
        replayed = opened.replayed,
        cut_bytes = opened.cut,
        "log opened"
    );
    let riders = s.rider_tables();
    let egress = Egress::new(s.dispatch.clone(), opened.last_time, riders.clone());
    let stats = DataflowStats::default();
    let mut observers: Vec<Arc<dyn Observer>> = vec![egress.clone()];
    observers.extend(mirror(&s)?);
    let dataflow = runtime::spawn(
        s.dispatch.clone(),
        s.timely(),
        runtime::feed_sources(feed_rx, s.workers),
        Arc::new(Fanout(observers)),
        stats.clone(),
        riders,
    );
    let ingress = Ingress {
        log: opened.handle,
        secret: secret.clone(),
        known: opened.known,
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
    serve_until_shutdown(&s, router, &egress).await?;
    // The router (and with it every log handle) is gone: the writer stops,
    // the feed closes, and the dataflow drains what the clock has passed.
    tokio::task::spawn_blocking(move || {
        let _ = opened.writer.join();
        let _ = dataflow.join();
    })
    .await?;
    Ok(())
}

/// Starts this process's dataflow workers over Kafka, reporting to `observer`.
fn kafka_dataflow(
    s: &Settings,
    observer: Arc<dyn Observer>,
    stats: DataflowStats,
    riders: Option<RiderTables>,
) -> anyhow::Result<(
    std::thread::JoinHandle<()>,
    Arc<std::sync::atomic::AtomicBool>,
)> {
    let sources = KafkaSources::new(s.kafka()?).context("kafka sources")?;
    let stop = Arc::clone(&sources.stop);
    let (process, hosts) = &s.cluster;
    let peers = s.workers * hosts.len().max(1);
    let mut made = std::collections::HashMap::new();
    for local in 0..s.workers {
        let index = process * s.workers + local;
        made.insert(index, sources.source(index, peers).context("kafka source")?);
    }
    let made = Mutex::new(made);
    let factory: runtime::Sources = Arc::new(move |me, _| {
        Box::new(
            made.lock()
                .expect("sources")
                .remove(&me)
                .expect("a source per local worker"),
        )
    });
    let handle = runtime::spawn(
        s.dispatch.clone(),
        s.timely(),
        factory,
        observer,
        stats,
        riders,
    );
    Ok((handle, stop))
}

/// Ids and idempotency keys ingress must know, read from the input topics.
async fn follow_inputs(
    k: &KafkaConfig,
    grabs: Option<Arc<GrabResults>>,
) -> anyhow::Result<(Arc<Mutex<Known>>, KeyAnswers)> {
    let known = Arc::new(Mutex::new(Known::default()));
    let keys = KeyAnswers::default();
    let (k, kn, ks) = (k.clone(), Arc::clone(&known), Arc::clone(&keys));
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let follower = Follower::start(&k, kn, ks, grabs)?;
        if !follower.wait_caught_up(Duration::from_secs(120)) {
            bail!("the input topics could not be read to their end in 2 minutes");
        }
        Ok(())
    })
    .await??;
    Ok((known, keys))
}

async fn serve_kafka(s: Settings) -> anyhow::Result<()> {
    let k = s.kafka()?.clone();
    ensure_topics(&k).await.context("creating the topics")?;
    let secret = Secret::load_or_create(&s.data_dir)?;
    let (known, keys) = follow_inputs(&k, None).await?;
    let riders = s.rider_tables();
    let egress = Egress::new(s.dispatch.clone(), now_ms(), riders.clone());
    let sink = {
        let k = k.clone();
        tokio::task::spawn_blocking(move || OutputSink::new(&k)).await??
    };
    let stats = DataflowStats::default();
    let mut observers: Vec<Arc<dyn Observer>> = vec![egress.clone(), sink.clone()];
    observers.extend(mirror(&s)?);
    let (dataflow, stop) = kafka_dataflow(&s, Arc::new(Fanout(observers)), stats.clone(), riders)?;
    let ingress = Ingress {
        log: LogHandle::kafka(Arc::new(KafkaLog::new(&k, keys, Arc::clone(&known))?)),
        secret: secret.clone(),
        known,
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
    serve_until_shutdown(&s, router, &egress).await?;
    stop.store(true, std::sync::atomic::Ordering::Release);
    tokio::task::spawn_blocking(move || {
        let _ = dataflow.join();
        sink.close(Duration::from_secs(10));
    })
    .await?;
    Ok(())
}

async fn run_ingress(s: Settings) -> anyhow::Result<()> {
    let k = s.kafka()?.clone();
    ensure_topics(&k).await.context("creating the topics")?;
    let secret = Secret::load_or_create(&s.data_dir)?;
    let grabs = Arc::new(GrabResults::default());
    let (known, keys) = follow_inputs(&k, Some(Arc::clone(&grabs))).await?;
    let ingress = Ingress {
        log: LogHandle::kafka(Arc::new(KafkaLog::new(&k, keys, Arc::clone(&known))?)),
        secret,
        known,
        grabs,
    };
    let router = grabflow_ingress::routes::routes(ingress)
        .route("/healthz", axum::routing::get(|| async { "ok" }));
    let listener = listen(&s).await?;
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown_signal())
        .await?;
    Ok(())
}

async fn run_dataflow(s: Settings) -> anyhow::Result<()> {
    let k = s.kafka()?.clone();
    if s.cluster.0 == 0 {
        ensure_topics(&k).await.context("creating the topics")?;
    }
    // Decisions and the gathered index reach worker 0, in process 0: only
    // it writes the output topics and the mirror.
    let mut observers: Vec<Arc<dyn Observer>> = Vec::new();
    let mut sink = None;
    if s.cluster.0 == 0 {
        let k = k.clone();
        let out = tokio::task::spawn_blocking(move || OutputSink::new(&k)).await??;
        observers.push(out.clone());
        sink = Some(out);
        observers.extend(mirror(&s)?);
    }
    // No egress reads this process's rider trackers.
    let (dataflow, stop) = kafka_dataflow(
        &s,
        Arc::new(Fanout(observers)),
        DataflowStats::default(),
        None,
    )?;
    println!("grabflow dataflow process {} running", s.cluster.0);
    shutdown_signal().await;
    stop.store(true, std::sync::atomic::Ordering::Release);
    tokio::task::spawn_blocking(move || {
        let _ = dataflow.join();
        if let Some(sink) = sink {
            sink.close(Duration::from_secs(10));
        }
    })
    .await?;
    Ok(())
}

async fn run_egress(s: Settings) -> anyhow::Result<()> {
    let k = s.kafka()?.clone();
    ensure_topics(&k).await.context("creating the topics")?;
    let secret = Secret::load_or_create(&s.data_dir)?;
    // A separate process: the view keeps the riders' positions itself.
    let egress = Egress::new(s.dispatch.clone(), 0, None);
    let _following = {
        let (k, e) = (k.clone(), egress.clone());
        tokio::task::spawn_blocking(move || follow(&k, e)).await??
    };
    let router = grabflow_egress::routes::routes(EgressState {
        egress: egress.clone(),
        secret,
        stats: DataflowStats::default(),
    });
    serve_until_shutdown(&s, router, &egress).await?;
    Ok(())
}

fn now_ms() -> Time {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as Time)
}

fn block_on(f: impl std::future::Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(f)
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Serve(args) => block_on(serve(settings(args)?)),
        Command::Ingress(args) => block_on(run_ingress(settings(args)?)),
        Command::Dataflow(args) => block_on(run_dataflow(settings(args)?)),
        Command::Egress(args) => block_on(run_egress(settings(args)?)),
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
