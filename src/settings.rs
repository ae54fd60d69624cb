//! The service's settings: one type, read by clap (flags) and by figment
//! (defaults, the TOML file, `GRABFLOW_*` environment variables), layered
//! defaults < file < environment < flags; then checked and turned into the
//! typed configurations of the parts ([`Plan`]).

use crate::server::Limits;
use anyhow::{bail, Context};
use clap::Args;
use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use grabflow_api::{DispatchConfig, Time};
use grabflow_dataflow::riders::RiderTables;
use grabflow_log::embedded::{Rolling, Ticks};
use grabflow_log::kafka::KafkaConfig;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Duration;

/// Every setting of `serve` and the split roles; each is also
/// `GRABFLOW_<NAME>` and a snake_case key of the TOML file.
#[derive(Args, Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// A TOML file with any of the settings below (snake_case keys).
    #[arg(long, env = "GRABFLOW_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:8080].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    /// Where the log and the secret live [default: ./grabflow-data].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    /// Connections served at once; over it, the quietest is closed
    /// [default: 0, what the open-file limit leaves room for].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<usize>,
    /// Time a connection has to send a request's head, from when it opens
    /// or its last response ends (idle keep-alive included) [default: 10s].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub header_timeout: Option<Dur>,
    /// Embedded log: events committed ahead of the dataflow beyond which
    /// pings are answered 503 (other events: twice as many); 0 never
    /// [default: 200000].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_backlog: Option<u64>,
    /// Requests a second each valid token may make; over it, 429 with
    /// Retry-After; 0 no limit [default: 100000].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<u32>,
    /// Requests a second an address may make without a valid token; 0 no
    /// limit [default: 100].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limit_address: Option<u32>,
    /// Log time between checkpoints of the whole state (a restart replays
    /// only the log after the latest; with --kafka they are kept in the
    /// cluster); 0 none [default: 30s].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checkpoint_interval: Option<Dur>,
    /// Embedded log: a segment is deleted once every event in it is this
    /// much older (log time) than the log's newest and no checkpoint needs
    /// it, e.g. 24h or 7d; 0 keeps the whole log. Without checkpoints
    /// nothing is deleted [default: 24h].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_retention: Option<Dur>,
    /// Embedded log: a segment file gives way to a new one at this size,
    /// bytes (or an hour of log time after its first event)
    /// [default: 67108864, 64 MiB].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_segment_bytes: Option<u64>,
    /// Timely worker threads [default: 1].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workers: Option<usize>,
    /// Offer radius, metres [default: 3000].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub radius_m: Option<f64>,
    /// Cap on the growing radius, metres [default: 6000].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_radius_m: Option<f64>,
    /// Radius growth per timed-out round [default: 1.5].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub radius_growth: Option<f64>,
    /// Riders per offer round [default: 20].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offers: Option<usize>,
    /// Time to grab before re-offering, e.g. 30s [default: 30s].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grab_timeout: Option<Dur>,
    /// A rider silent this long leaves the index [default: 60s].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rider_ttl: Option<Dur>,
    /// A closed order leaves the dataflow and the live view this long after
    /// it closed (its history stays for --history-retention) [default: 1h].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub order_retention: Option<Dur>,
    /// A rider with no ping or shift for this long is forgotten: off shift,
    /// no position, until its next shift (at least --rider-ttl and
    /// --grab-timeout) [default: 24h].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rider_retention: Option<Dur>,
    /// A closed order's history is answered (from `history.redb` in the
    /// data dir once it has left the live view) this long after it closed,
    /// then 404 `expired`; ingress forgets an order or merchant id this
    /// long after its last mention (at least --order-retention)
    /// [default: 7d].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub history_retention: Option<Dur>,
    /// An Idempotency-Key is remembered this long (log time) after its
    /// first use; reused later, it is a new request [default: 24h].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idempotency_window: Option<Dur>,
    /// A rider stream keeps messages this long (and at most 2000) for
    /// clients resuming with ?after=SEQ [default: 1h].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stream_retention: Option<Dur>,
    /// Default rider capacity [default: 3].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capacity: Option<u32>,
    /// Clock tick when no events arrive [default: 50ms].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tick: Option<Dur>,
    /// Embedded log: location pings alone reach the dataflow within this
    /// long (any other event as soon as its millisecond is over); 0 ticks
    /// every millisecond [default: 10ms].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ping_tick: Option<Dur>,
    /// Kafka bootstrap servers, HOST:PORT[,…]: production mode.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kafka: Option<String>,
    /// Prefix of the Kafka topic names [default: grabflow.].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kafka_prefix: Option<String>,
    /// Prefix of the output topics when not --kafka-prefix (a shadow
    /// dataflow reading the same log) [default: the --kafka-prefix].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kafka_output_prefix: Option<String>,
    /// Partitions of the topics grabflow creates [default: 4].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kafka_partitions: Option<i32>,
    /// Replicas of the topics grabflow creates [default: 1].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kafka_replication: Option<i32>,
    /// A librdkafka setting for every Kafka client, KEY=VALUE, applied after
    /// grabflow's own (repeatable; in the TOML file a list or a table, in
    /// GRABFLOW_KAFKA_OPTIONS comma-separated). Settings that would break
    /// grabflow's guarantees are refused.
    #[arg(long = "kafka-option", value_name = "KEY=VALUE")]
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "kafka_options"
    )]
    pub kafka_options: Option<Vec<String>>,
    /// Time retention (retention.ms) of the topics grabflow creates; 0 the
    /// broker's default [default: 7d].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kafka_retention: Option<Dur>,
    /// An input partition holding back a newer order's event gets a clock
    /// tick after this long [default: 5ms]; other idle partitions every
    /// --tick.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kafka_tick: Option<Dur>,
    /// How long an append waits for the broker before 503 [default: 5s].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kafka_ack_timeout: Option<Dur>,
    /// Redis URL (redis://HOST:PORT/DB) of the mirror of the index and live orders.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis: Option<String>,
    /// Prefix of the mirror's Redis keys [default: grabflow:].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_prefix: Option<String>,
    /// Dataflow processes of a timely cluster [default: 1].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub processes: Option<usize>,
    /// This process's index in the cluster, from 0 [default: 0].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub process: Option<usize>,
    /// The cluster's processes, HOST:PORT for each, comma-separated, in order.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hosts: Option<String>,
    /// Raster map tiles under the ops console's map, a URL template with
    /// {z}, {x} and {y} (none: the map needs no tile server).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub map_tiles: Option<String>,
}

/// The settings every layer may set (the environment's `GRABFLOW_<NAME>`
/// is read for these only: other `GRABFLOW_` variables are not settings).
const NAMES: &[&str] = &[
    "listen",
    "data_dir",
    "max_connections",
    "header_timeout",
    "max_backlog",
    "rate_limit",
    "rate_limit_address",
    "checkpoint_interval",
    "log_retention",
    "log_segment_bytes",
    "workers",
    "radius_m",
    "max_radius_m",
    "radius_growth",
    "offers",
    "grab_timeout",
    "rider_ttl",
    "order_retention",
    "rider_retention",
    "history_retention",
    "idempotency_window",
    "stream_retention",
    "capacity",
    "tick",
    "ping_tick",
    "kafka",
    "kafka_prefix",
    "kafka_output_prefix",
    "kafka_partitions",
    "kafka_replication",
    "kafka_retention",
    "kafka_options",
    "kafka_tick",
    "kafka_ack_timeout",
    "redis",
    "redis_prefix",
    "processes",
    "process",
    "hosts",
    "map_tiles",
];

impl Settings {
    /// The defaults of every setting that has one.
    pub fn defaults() -> Settings {
        let d = DispatchConfig::default();
        let k = KafkaConfig::new("");
        Settings {
            config: None,
            listen: Some("127.0.0.1:8080".into()),
            data_dir: Some("./grabflow-data".into()),
            max_connections: Some(0),
            header_timeout: Some(Dur(Duration::from_secs(10))),
            max_backlog: Some(200_000),
            rate_limit: Some(100_000),
            rate_limit_address: Some(100),
            checkpoint_interval: Some(Dur(Duration::from_secs(30))),
            log_retention: Some(Dur(Duration::from_secs(24 * 3600))),
            log_segment_bytes: Some(Rolling::default().bytes),
            workers: Some(1),
            radius_m: Some(d.radius_m),
            max_radius_m: Some(d.max_radius_m),
            radius_growth: Some(d.radius_growth),
            offers: Some(d.offers),
            grab_timeout: Some(Dur(Duration::from_millis(d.grab_timeout_ms))),
            rider_ttl: Some(Dur(Duration::from_millis(d.rider_ttl_ms))),
            order_retention: Some(Dur(Duration::from_millis(d.order_retention_ms))),
            rider_retention: Some(Dur(Duration::from_millis(d.rider_retention_ms))),
            history_retention: Some(Dur(Duration::from_secs(7 * 86_400))),
            idempotency_window: Some(Dur(Duration::from_secs(86_400))),
            stream_retention: Some(Dur(Duration::from_secs(3_600))),
            capacity: Some(d.default_capacity),
            tick: Some(Dur(Duration::from_millis(50))),
            ping_tick: Some(Dur(Duration::from_millis(10))),
            kafka: None,
            kafka_prefix: Some(k.prefix),
            kafka_output_prefix: None,
            kafka_partitions: Some(k.partitions),
            kafka_replication: Some(k.replication),
            kafka_retention: k.retention.map(Dur),
            kafka_options: None,
            kafka_tick: Some(Dur(k.tick)),
            kafka_ack_timeout: Some(Dur(k.ack_timeout)),
            redis: None,
            redis_prefix: Some("grabflow:".into()),
            processes: Some(1),
            process: Some(0),
            hosts: None,
            map_tiles: None,
        }
    }

    /// These settings (the flags) over the environment, over the TOML file
    /// named by `config`, over the defaults.
    pub fn layered(self) -> anyhow::Result<Settings> {
        let mut figment = Figment::from(Serialized::defaults(Settings::defaults()));
        if let Some(path) = &self.config {
            if !path.is_file() {
                bail!("reading {}: no such file", path.display());
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        let figment = figment
            .merge(Env::prefixed("GRABFLOW_").only(NAMES))
            .merge(Serialized::defaults(&self));
        let mut layered: Settings = figment.extract().map_err(|e| {
            let source = match &self.config {
                Some(path) => format!(" (flags, GRABFLOW_* variables, {})", path.display()),
                None => " (flags, GRABFLOW_* variables)".into(),
            };
            anyhow::anyhow!("settings{source}: {e}")
        })?;
        layered.config = self.config;
        Ok(layered)
    }

    /// The layered settings, checked and turned into what the parts take.
    pub fn plan(self) -> anyhow::Result<Plan> {
        Plan::new(self.layered()?)
    }
}

/// `kafka_options` from the TOML file or the environment: a list of
/// `KEY=VALUE`, a table of them, or one string of them comma-separated.
fn kafka_options<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        List(Vec<String>),
        Table(std::collections::BTreeMap<String, toml_value::Scalar>),
        Text(String),
    }
    Ok(Some(match Raw::deserialize(d)? {
        Raw::List(list) => list,
        Raw::Table(table) => table
            .into_iter()
            .map(|(k, v)| format!("{k}={}", v.text()))
            .collect(),
        Raw::Text(text) => text
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect(),
    }))
}

/// A TOML table's values, as librdkafka takes them (strings).
mod toml_value {
    use serde::Deserialize;

    /// A string, number or boolean.
    #[derive(Deserialize)]
    #[serde(untagged)]
    pub enum Scalar {
        /// `"all"`.
        Text(String),
        /// `5`.
        Int(i64),
        /// `0.5`.
        Float(f64),
        /// `true`.
        Bool(bool),
    }

    impl Scalar {
        /// As text.
        pub fn text(&self) -> String {
            match self {
                Scalar::Text(s) => s.clone(),
                Scalar::Int(n) => n.to_string(),
                Scalar::Float(x) => x.to_string(),
                Scalar::Bool(b) => b.to_string(),
            }
        }
    }
}

/// A duration setting: `500ms`, `30s`, `2m`, `1h`, `7d`, or a plain number
/// of milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl std::str::FromStr for Dur {
    type Err = String;

    fn from_str(s: &str) -> Result<Dur, String> {
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
            "d" => n * 86_400e3,
            _ => return Err(format!("{s:?}: unit must be ms, s, m, h or d")),
        };
        Ok(Dur(Duration::from_millis(ms as u64)))
    }
}

impl Serialize for Dur {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{}ms", self.0.as_millis()))
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Dur, D::Error> {
        /// A number (milliseconds) or a string with a unit.
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Millis(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Millis(ms) => Ok(Dur(Duration::from_millis(ms))),
            Raw::Text(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// How long the state outside the dataflow is kept, ms of log time (the
/// dataflow's own retentions are in [`DispatchConfig`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    /// A closed order's history is answered this long after it closed;
    /// ingress forgets an id this long after its last mention.
    pub history_ms: Time,
    /// An idempotency key is remembered this long after its first use.
    pub idempotency_ms: Time,
    /// A rider stream's messages are kept this long.
    pub stream_ms: Time,
}

/// The settings checked and typed: what each part of the service takes.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Address to listen on.
    pub listen: String,
    /// Where the log and the secret live.
    pub data_dir: PathBuf,
    /// The HTTP server's limits.
    pub limits: Limits,
    /// Embedded log: events ahead of the dataflow beyond which pings are
    /// refused (0: never).
    pub max_backlog: u64,
    /// Requests a second per valid token (0: no limit).
    pub rate_limit: u32,
    /// Requests a second per address without a valid token (0: no limit).
    pub rate_limit_address: u32,
    /// Log time between checkpoints, ms (0: none).
    pub checkpoint_interval: Time,
    /// Embedded log: log time a segment is kept past its newest event, ms
    /// (0: forever).
    pub log_retention: Time,
    /// Embedded log: when a new segment begins.
    pub rolling: Rolling,
    /// Timely worker threads of this process.
    pub workers: usize,
    /// The embedded log's ticks.
    pub ticks: Ticks,
    /// The dispatch rules.
    pub dispatch: DispatchConfig,
    /// How long state outside the dataflow is kept (log time).
    pub retention: Retention,
    /// Production mode's Kafka, if given.
    pub kafka: Option<KafkaConfig>,
    /// The Redis mirror's URL and key prefix, if given.
    pub redis: Option<(String, String)>,
    /// Process index, and the cluster's addresses (empty: one process).
    pub cluster: (usize, Vec<String>),
    /// The ops console's map tiles, if given.
    pub map_tiles: Option<String>,
}

impl Plan {
    /// Checks `s` (layered: every defaulted setting is there).
    fn new(s: Settings) -> anyhow::Result<Plan> {
        // Each setting, else its default: the defaults live in
        // `Settings::defaults` alone (layering has put them in already).
        let d = Settings::defaults();
        fn pick<T: Default>(v: Option<T>, d: Option<T>) -> T {
            v.or(d).unwrap_or_default()
        }
        let dur = |v: Option<Dur>, d: Option<Dur>| v.or(d).map_or(Duration::ZERO, |v| v.0);
        let ms = |v, d| dur(v, d).as_millis() as Time;
        let dispatch = DispatchConfig {
            radius_m: pick(s.radius_m, d.radius_m),
            max_radius_m: pick(s.max_radius_m, d.max_radius_m),
            radius_growth: pick(s.radius_growth, d.radius_growth),
            offers: pick(s.offers, d.offers),
            grab_timeout_ms: ms(s.grab_timeout, d.grab_timeout),
            rider_ttl_ms: ms(s.rider_ttl, d.rider_ttl),
            default_capacity: pick(s.capacity, d.capacity),
            dedup_window_ms: DispatchConfig::default().dedup_window_ms,
            order_retention_ms: ms(s.order_retention, d.order_retention),
            rider_retention_ms: ms(s.rider_retention, d.rider_retention),
        };
        if let Err((field, why)) = dispatch.validate() {
            bail!("setting {field} {why}");
        }
        let retention = Retention {
            history_ms: ms(s.history_retention, d.history_retention),
            idempotency_ms: ms(s.idempotency_window, d.idempotency_window),
            stream_ms: ms(s.stream_retention, d.stream_retention),
        };
        if retention.history_ms == 0 || retention.idempotency_ms == 0 || retention.stream_ms == 0 {
            bail!(
                "--history-retention, --idempotency-window and --stream-retention must be positive"
            );
        }
        if retention.history_ms < dispatch.order_retention_ms {
            bail!("--history-retention must be at least --order-retention");
        }
        let ticks = Ticks {
            idle: dur(s.tick, d.tick),
            pings: dur(s.ping_tick, d.ping_tick),
        };
        if ticks.idle.is_zero() {
            bail!("--tick must be positive");
        }
        let rolling = Rolling {
            bytes: pick(s.log_segment_bytes, d.log_segment_bytes),
            ..Rolling::default()
        };
        if rolling.bytes < 1024 {
            bail!("--log-segment-bytes must be at least 1024");
        }
        let header_timeout = dur(s.header_timeout, d.header_timeout);
        if header_timeout.is_zero() {
            bail!("--header-timeout must be positive");
        }
        let limits = Limits::new(pick(s.max_connections, d.max_connections), header_timeout);
        let kafka = match &s.kafka {
            Some(brokers) => {
                let mut k = KafkaConfig::new(brokers);
                k.prefix = s.kafka_prefix.clone().unwrap_or(k.prefix);
                k.output_prefix = s.kafka_output_prefix.clone();
                k.partitions = s.kafka_partitions.unwrap_or(k.partitions);
                k.replication = s.kafka_replication.unwrap_or(k.replication);
                k.tick = s.kafka_tick.map_or(k.tick, |t| t.0);
                k.retention = match s.kafka_retention.or(d.kafka_retention) {
                    Some(Dur(r)) if !r.is_zero() => Some(r),
                    _ => None,
                };
                let options = s.kafka_options.iter().flatten().map(String::as_str);
                let mut k = k.options(options)?;
                k.idle_tick = ticks.idle;
                k.ack_timeout = s.kafka_ack_timeout.map_or(k.ack_timeout, |t| t.0);
                if k.partitions < 1 || k.replication < 1 || k.tick.is_zero() {
                    bail!(
                        "--kafka-partitions, --kafka-replication and --kafka-tick must be positive"
                    );
                }
                Some(k)
            }
            None => None,
        };
        let redis = s.redis.clone().map(|url| {
            let prefix = pick(s.redis_prefix.clone(), d.redis_prefix.clone());
            (url, prefix)
        });
        let processes = pick(s.processes, d.processes).max(1);
        let process = pick(s.process, d.process);
        let hosts: Vec<String> = s
            .hosts
            .iter()
            .flat_map(|h| h.split(','))
            .map(|x| x.trim().to_string())
            .filter(|x| !x.is_empty())
            .collect();
        if processes > 1 && hosts.len() != processes {
            bail!("--hosts must list {processes} HOST:PORT addresses, one per process");
        }
        if process >= processes {
            bail!("--process must be below --processes");
        }
        let map_tiles = s.map_tiles.clone().filter(|t| !t.trim().is_empty());
        if let Some(t) = &map_tiles {
            if !["{z}", "{x}", "{y}"].iter().all(|p| t.contains(p)) {
                bail!("--map-tiles must be a URL template with {{z}}, {{x}} and {{y}}");
            }
        }
        Ok(Plan {
            listen: pick(s.listen, d.listen),
            data_dir: pick(s.data_dir, d.data_dir),
            limits,
            max_backlog: pick(s.max_backlog, d.max_backlog),
            rate_limit: pick(s.rate_limit, d.rate_limit),
            rate_limit_address: pick(s.rate_limit_address, d.rate_limit_address),
            checkpoint_interval: ms(s.checkpoint_interval, d.checkpoint_interval),
            log_retention: ms(s.log_retention, d.log_retention),
            rolling,
            workers: pick(s.workers, d.workers).max(1),
            ticks,
            dispatch,
            retention,
            kafka,
            redis,
            cluster: (process, if processes > 1 { hosts } else { Vec::new() }),
            map_tiles,
        })
    }

    /// How long the ingress ledger remembers keys and ids.
    pub fn ledger_windows(&self) -> grabflow_log::ledger::Windows {
        grabflow_log::ledger::Windows {
            keys: self.retention.idempotency_ms,
            known: self.retention.history_ms,
        }
    }

    /// Rider trackers the egress view can read, when every worker of the
    /// dataflow runs in this process.
    pub fn rider_tables(&self) -> Option<RiderTables> {
        self.cluster
            .1
            .is_empty()
            .then(|| RiderTables::new(self.workers, &self.dispatch))
    }

    /// The timely configuration: threads of this process, or a cluster.
    pub fn timely(&self) -> timely::Config {
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

    /// Production mode's Kafka, or an error saying this role needs it.
    pub fn kafka(&self) -> anyhow::Result<&KafkaConfig> {
        self.kafka
            .as_ref()
            .context("this role runs over Kafka: give --kafka HOST:PORT")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_beat_the_environment_which_beats_the_file_which_beats_the_defaults() {
        let dir = std::env::temp_dir().join(format!("grabflow-settings-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("grabflow.toml");
        std::fs::write(
            &file,
            "workers = 3\noffers = 7\ntick = \"2s\"\ncapacity = 4\nlisten = \"127.0.0.1:1\"\n",
        )
        .unwrap();
        // The only test here that sets these variables.
        std::env::set_var("GRABFLOW_OFFERS", "9");
        std::env::set_var("GRABFLOW_CAPACITY", "5");
        std::env::set_var("GRABFLOW_TEST_SOMETHING_ELSE", "not a setting");
        let flags = Settings {
            config: Some(file.clone()),
            capacity: Some(6),
            ..Settings::default()
        };
        let plan = flags.plan().unwrap();
        std::env::remove_var("GRABFLOW_OFFERS");
        std::env::remove_var("GRABFLOW_CAPACITY");
        std::env::remove_var("GRABFLOW_TEST_SOMETHING_ELSE");
        assert_eq!(plan.workers, 3, "the file");
        assert_eq!(plan.dispatch.offers, 9, "the environment over the file");
        assert_eq!(plan.dispatch.default_capacity, 6, "the flag over both");
        assert_eq!(
            plan.ticks.idle,
            Duration::from_secs(2),
            "a duration in the file"
        );
        assert_eq!(plan.ticks.pings, Duration::from_millis(10), "a default");
        assert_eq!(plan.listen, "127.0.0.1:1");
        assert_eq!(plan.dispatch.radius_m, 3000.0, "a default");

        std::fs::write(&file, "workerz = 3\n").unwrap();
        let e = Settings {
            config: Some(file.clone()),
            ..Settings::default()
        }
        .plan()
        .unwrap_err();
        assert!(format!("{e:#}").contains("workerz"), "{e:#}");
        let e = Settings {
            tick: Some("0ms".parse().unwrap()),
            ..Settings::default()
        }
        .plan()
        .unwrap_err();
        assert_eq!(e.to_string(), "--tick must be positive");
    }

    #[test]
    fn kafka_options_come_from_flags_or_the_file_and_guarantee_breakers_are_refused() {
        let dir = std::env::temp_dir().join(format!("grabflow-kafkaopt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let plan = |file: &str, flags: &[&str]| {
            let path = dir.join("grabflow.toml");
            std::fs::write(&path, file).unwrap();
            Settings {
                config: Some(path),
                kafka: Some("127.0.0.1:9092".into()),
                kafka_options: (!flags.is_empty())
                    .then(|| flags.iter().map(|f| f.to_string()).collect()),
                ..Settings::default()
            }
            .plan()
        };
        let options = |p: anyhow::Result<Plan>| p.unwrap().kafka.unwrap().options;
        let pair = |k: &str, v: &str| (k.to_string(), v.to_string());
        assert_eq!(
            options(plan(
                "kafka_options = [\"client.id=gf\", \"linger.ms=5\"]\n",
                &[]
            )),
            [pair("client.id", "gf"), pair("linger.ms", "5")]
        );
        assert_eq!(
            options(plan(
                "[kafka_options]\n\"security.protocol\" = \"SASL_SSL\"\n\"linger.ms\" = 5\n",
                &[]
            )),
            [
                pair("linger.ms", "5"),
                pair("security.protocol", "SASL_SSL")
            ]
        );
        assert_eq!(
            options(plan("", &["sasl.mechanism=SCRAM-SHA-512", "acks=all"])),
            [pair("sasl.mechanism", "SCRAM-SHA-512"), pair("acks", "all")]
        );
        for (bad, why) in [
            ("acks=1", "acks stays all"),
            ("enable.idempotence=false", "idempotence stays on"),
            ("enable.auto.commit=true", "commits offsets itself"),
            ("group.id=mine", "names its consumer groups"),
            ("bootstrap.servers=x:1", "--kafka"),
            ("linger.ms", "KEY=VALUE"),
        ] {
            let e = plan("", &[bad]).unwrap_err().to_string();
            assert!(
                e.contains(why) && e.contains("--kafka-option"),
                "{bad}: {e}"
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn retentions_have_defaults_read_the_file_and_flags_and_are_checked() {
        let plan = Settings::default().plan().unwrap();
        assert_eq!(
            plan.retention,
            Retention {
                history_ms: 7 * 86_400_000,
                idempotency_ms: 86_400_000,
                stream_ms: 3_600_000,
            }
        );
        let dir = std::env::temp_dir().join(format!("grabflow-retention-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("grabflow.toml");
        std::fs::write(
            &file,
            "history_retention = \"2d\"\nidempotency_window = \"10m\"\n",
        )
        .unwrap();
        let plan = Settings {
            config: Some(file.clone()),
            stream_retention: Some("90s".parse().unwrap()),
            ..Settings::default()
        }
        .plan()
        .unwrap();
        assert_eq!(plan.retention.history_ms, 2 * 86_400_000, "the file");
        assert_eq!(plan.retention.idempotency_ms, 600_000, "the file");
        assert_eq!(plan.retention.stream_ms, 90_000, "the flag");
        assert_eq!(
            plan.ledger_windows(),
            grabflow_log::ledger::Windows {
                keys: 600_000,
                known: 2 * 86_400_000
            }
        );
        let refused = |s: Settings| s.plan().unwrap_err().to_string();
        let zero = Some("0s".parse().unwrap());
        for s in [
            Settings {
                history_retention: zero,
                ..Settings::default()
            },
            Settings {
                idempotency_window: zero,
                ..Settings::default()
            },
            Settings {
                stream_retention: zero,
                ..Settings::default()
            },
        ] {
            assert!(refused(s).contains("must be positive"));
        }
        let short = Settings {
            history_retention: Some("30m".parse().unwrap()),
            ..Settings::default()
        };
        assert_eq!(
            refused(short),
            "--history-retention must be at least --order-retention"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn log_retention_and_segment_size_default_and_read_from_file_and_flags() {
        let plan = Settings::default().plan().unwrap();
        assert_eq!(plan.log_retention, 24 * 3_600_000, "24h by default");
        assert_eq!(plan.rolling, Rolling::default());
        let dir =
            std::env::temp_dir().join(format!("grabflow-log-settings-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("grabflow.toml");
        std::fs::write(
            &file,
            "log_retention = \"7d\"\nlog_segment_bytes = 1048576\n",
        )
        .unwrap();
        let plan = Settings {
            config: Some(file.clone()),
            ..Settings::default()
        }
        .plan()
        .unwrap();
        assert_eq!(plan.log_retention, 7 * 86_400_000);
        assert_eq!(plan.rolling.bytes, 1 << 20);
        let plan = Settings {
            config: Some(file.clone()),
            log_retention: Some("0".parse().unwrap()),
            ..Settings::default()
        }
        .plan()
        .unwrap();
        assert_eq!(plan.log_retention, 0, "the flag over the file: keep all");
        let e = Settings {
            log_segment_bytes: Some(100),
            ..Settings::default()
        }
        .plan()
        .unwrap_err();
        assert!(e.to_string().contains("--log-segment-bytes"), "{e}");
        assert!(NAMES.contains(&"log_retention") && NAMES.contains(&"log_segment_bytes"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn durations_read_with_units_or_as_milliseconds() {
        let d = |s: &str| s.parse::<Dur>().map(|d| d.0);
        assert_eq!(d("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(d("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(d("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(d("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(d("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert_eq!(d("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(d("250"), Ok(Duration::from_millis(250)));
        assert!(d("3 days").is_err() && d("fast").is_err());
    }
}
