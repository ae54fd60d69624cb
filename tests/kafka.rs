//! Production mode against a real Kafka-protocol broker (`tansu`, started
//! here on a free loopback port, in memory, or on a SQLite file where a
//! test restarts it or needs its retention) and real Redis (the
//! service on 127.0.0.1:6379 when there is one, else `redis-server` started
//! here), with the real binary in every role and plain rdkafka and Redis
//! clients reading what it wrote.

mod common;

use common::*;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_port(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{what} never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A `tansu` broker on a loopback port, stopped on drop.
struct Broker {
    child: Option<Child>,
    /// Where clients find it (what it advertises).
    addr: String,
    /// The port it listens on.
    port: u16,
    /// Its storage engine, and the directory it runs in (a SQLite file's
    /// home): kept to start it again.
    storage: &'static str,
    dir: PathBuf,
    /// Whether every client must authenticate (SASL) first.
    authentication: bool,
}

fn tansu() -> PathBuf {
    let home = std::env::var("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap()).join(".cargo"));
    let installed = home.join("bin/tansu");
    if installed.exists() {
        installed
    } else {
        PathBuf::from("tansu")
    }
}

impl Broker {
    /// In memory: its records are gone when it stops.
    fn start() -> Broker {
        Broker::on("memory://tansu/", std::env::temp_dir())
    }

    /// On the SQLite file `tansu.db` in `dir`: records, committed offsets
    /// and topic settings survive a kill, and each start deletes the
    /// records past their topic's `retention.ms` (tansu's maintenance runs
    /// at start, then every 10 minutes).
    fn persistent(dir: &Path) -> Broker {
        // tansu opens `sqlite:///F` as F under its working directory.
        Broker::on("sqlite:///tansu.db", dir.to_path_buf())
    }

    fn on(storage: &'static str, dir: PathBuf) -> Broker {
        let port = free_port();
        Broker::advertising(storage, dir, port, port)
    }

    /// Listening on `port`, telling clients it is at `advertised`.
    fn advertising(storage: &'static str, dir: PathBuf, port: u16, advertised: u16) -> Broker {
        let mut b = Broker {
            child: None,
            addr: format!("127.0.0.1:{advertised}"),
            port,
            storage,
            dir,
            authentication: false,
        };
        b.run();
        b
    }

    /// Makes the SCRAM-SHA-512 user `name` (with tansu's own command; its
    /// SQLite engine keeps users, its memory engine does not), then starts
    /// again serving only clients that authenticate.
    fn with_user(&mut self, name: &str, password: &str) {
        let made = Command::new(tansu())
            .args(["user", "create", "--mechanism", "scram512", "--broker"])
            .arg(format!("tcp://127.0.0.1:{}", self.port))
            .args([name, password])
            .env("RUST_LOG", "off")
            .stdout(Stdio::null())
            .status();
        assert!(made.is_ok_and(|s| s.success()), "tansu made no user");
        self.authentication = true;
        self.restart();
    }

    fn run(&mut self) {
        let listener = format!("tcp://127.0.0.1:{}", self.port);
        let advertised = format!("tcp://{}", self.addr);
        let child = Command::new(tansu())
            .current_dir(&self.dir)
            .args([
                "broker",
                "--listener-url",
                &listener,
                "--advertised-listener-url",
                &advertised,
            ])
            .args(["--storage-engine", self.storage])
            .args(self.authentication.then_some("--authentication"))
            .env(
                "RUST_LOG",
                std::env::var("TANSU_LOG").unwrap_or("off".into()),
            )
            .stdout(self.log())
            .stderr(self.log())
            .spawn()
            .expect("tansu runs (scripts/test installs it)");
        self.child = Some(child);
        wait_port(self.port, "tansu");
    }

    /// Where its log goes: `tansu.log` beside a SQLite file (at the level
    /// `TANSU_LOG` sets, none unless set), else nowhere.
    fn log(&self) -> Stdio {
        if self.storage.starts_with("sqlite") {
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.dir.join("tansu.log"));
            log.map_or(Stdio::null(), Stdio::from)
        } else {
            Stdio::null()
        }
    }

    /// SIGKILL: gone at once, mid-request.
    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port and storage.
    fn restart(&mut self) {
        self.kill9();
        self.run();
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A Redis: the machine's on 6379, or one started here on `port`.
struct Redis {
    child: Option<Child>,
    port: u16,
    prefix: String,
}

impl Redis {
    /// The machine's Redis if it has one, else a fresh `redis-server`.
    fn any() -> Redis {
        if TcpStream::connect("127.0.0.1:6379").is_ok() {
            Redis {
                child: None,
                port: 6379,
                prefix: format!("gftest{}:", rand_suffix()),
            }
        } else {
            Redis::own(free_port())
        }
    }

    /// A `redis-server` of this test on `port`.
    fn own(port: u16) -> Redis {
        Redis::own_with_prefix(port, format!("gftest{}:", rand_suffix()))
    }

    fn own_with_prefix(port: u16, prefix: String) -> Redis {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server runs (scripts/test installs it)");
        wait_port(port, "redis-server");
        Redis {
            child: Some(child),
            port,
            prefix,
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    fn con(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .unwrap()
            .get_connection()
            .unwrap()
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.stop();
        } else if let Ok(c) = redis::Client::open(self.url()) {
            if let Ok(mut c) = c.get_connection() {
                let keys: Vec<String> = redis::cmd("KEYS")
                    .arg(format!("{}*", self.prefix))
                    .query(&mut c)
                    .unwrap_or_default();
                if !keys.is_empty() {
                    let _ = redis::cmd("DEL").arg(keys).query::<()>(&mut c);
                }
            }
        }
    }
}

/// Every record of `topics` up to where they end now, as (topic, key, JSON
/// value); ticks (records with no value) left out.
fn read_topics(broker: &str, topics: &[String]) -> Vec<(String, String, Value)> {
    read_records(broker, topics)
        .into_iter()
        .map(|(t, k, v, _, _)| (t, k, v))
        .collect()
}

/// [`read_topics`] with each record's partition and offset.
fn read_records(broker: &str, topics: &[String]) -> Vec<(String, String, Value, i32, i64)> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", broker)
        .set("group.id", format!("reader{}", rand_suffix()))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    let mut ends = HashMap::new();
    for t in topics {
        let md = c.fetch_metadata(Some(t), Duration::from_secs(5)).unwrap();
        for p in md.topics()[0].partitions() {
            let (_, high) = c
                .fetch_watermarks(t, p.id(), Duration::from_secs(5))
                .unwrap();
            if high > 0 {
                tpl.add_partition_offset(t, p.id(), Offset::Beginning)
                    .unwrap();
                ends.insert((t.clone(), p.id()), high);
            }
        }
    }
    if ends.is_empty() {
        return Vec::new();
    }
    c.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ends.is_empty() {
        assert!(Instant::now() < deadline, "topics not read to their end");
        let Some(Ok(m)) = c.poll(Duration::from_millis(50)) else {
            continue;
        };
        let at = (m.topic().to_string(), m.partition());
        if ends.get(&at).is_some_and(|&high| m.offset() + 1 >= high) {
            ends.remove(&at);
        }
        if let Some(v) = m.payload() {
            let key = m
                .key()
                .map(|k| String::from_utf8_lossy(k).to_string())
                .unwrap_or_default();
            let value = serde_json::from_slice(v).unwrap();
            out.push((m.topic().to_string(), key, value, m.partition(), m.offset()));
        }
    }
    out
}

/// The decisions on the output topics under `prefix`, in `seq` order from 0
/// up to the first missing one (see [`kept_decisions`]).
fn decisions(broker: &str, prefix: &str) -> Vec<Value> {
    decisions_from(broker, prefix, Some(0))
}

/// The decisions the output topics under `prefix` still keep, in `seq`
/// order from the first kept (0 unless the broker deleted older records
/// past their retention) up to the first missing one. Asserts no seq is
/// there twice, and that none is missing for good: each partition holds
/// its decisions in seq order, so a seq below the last one of every
/// partition must be there (above it, it may still be on its way).
fn kept_decisions(broker: &str, prefix: &str) -> Vec<Value> {
    decisions_from(broker, prefix, None)
}

/// [`kept_decisions`] from seq `from` (none: the first kept).
fn decisions_from(broker: &str, prefix: &str, from: Option<u64>) -> Vec<Value> {
    let topics: Vec<String> = ["offers", "grabs", "transitions"]
        .iter()
        .map(|t| format!("{prefix}{t}"))
        .collect();
    let mut by_seq: BTreeMap<u64, (Value, String, i32, i64)> = BTreeMap::new();
    let mut last: HashMap<(String, i32), u64> = HashMap::new();
    for (t, _, v, p, o) in read_records(broker, &topics) {
        let seq = v["seq"].as_u64().expect("a seq");
        let e = last.entry((t.clone(), p)).or_default();
        *e = (*e).max(seq);
        if let Some((v0, t0, p0, o0)) = by_seq.insert(seq, (v.clone(), t.clone(), p, o)) {
            panic!("seq {seq} is duplicated: {t0}/{p0}@{o0} {v0} and {t}/{p}@{o} {v}");
        }
    }
    let floor = if last.len() == 3 * 2 {
        last.values().copied().min().unwrap_or(0)
    } else {
        0
    };
    let first = from.unwrap_or_else(|| by_seq.keys().next().copied().unwrap_or(0));
    let upto = first
        + by_seq
            .range(first..)
            .enumerate()
            .take_while(|(i, (s, _))| first + *i as u64 == **s)
            .count() as u64;
    if upto - first < by_seq.len() as u64 {
        eprintln!(
            "{prefix}: {} decisions, contiguous from {first} up to {upto}; floor {floor}; partitions {last:?}",
            by_seq.len()
        );
    }
    assert!(
        upto >= floor,
        "seq {upto} under {prefix} is missing, yet every partition has gone past it"
    );
    by_seq
        .range(first..upto)
        .map(|(_, (v, ..))| v.clone())
        .collect()
}

/// Waits until `f` holds (20 s at most).
async fn eventually<F: std::future::Future<Output = Result<(), String>>>(mut f: impl FnMut() -> F) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match f().await {
            Ok(()) => return,
            Err(why) if Instant::now() > deadline => panic!("never held: {why}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// `--kafka` for `broker`, with the in-memory test broker's workaround:
/// tansu 0.6's memory engine mishandles batches of several records (its
/// high watermark counts batches; a fetch from inside a batch comes back
/// empty), so against it grabflow's producers send one record per batch.
/// Its SQLite engine counts per record (see
/// `the_sqlite_broker_counts_offsets_per_record`): against it grabflow
/// batches, as in production.
fn kafka_args<'a>(broker: &'a Broker, more: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec!["--kafka", broker.addr.as_str(), "--kafka-partitions", "2"];
    if broker.storage.starts_with("memory") {
        a.extend(["--kafka-option", "batch.num.messages=1"]);
    }
    a.extend_from_slice(more);
    a
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_order_life_cycle_through_kafka_with_its_outputs_on_topics() {
    let broker = Broker::start();
    let redis = Redis::any();
    let dir = temp_dir();
    let url = redis.url();
    let s = Server::start(
        &dir,
        &kafka_args(&broker, &["--redis", &url, "--redis-prefix", &redis.prefix]),
    );
    s.wait_ready().await;
    life_cycle_on(&s, &s).await;

    // Other services read the decisions from the topics, in seq order.
    let all = decisions(&broker.addr, "grabflow.");
    let kinds: Vec<(&str, &str)> = all
        .iter()
        .filter(|v| v["type"] == "transition")
        .map(|v| (v["to"].as_str().unwrap(), v["reason"].as_str().unwrap()))
        .collect();
    assert_eq!(
        kinds,
        [
            ("created", "placed"),
            ("notified", "offered"),
            ("delivering", "grabbed"),
            ("delivering", "picked_up"),
            ("received", "delivered"),
            ("closed", "completed")
        ]
    );
    // The transitions topic names each transition's cause, and carries the
    // wrong rider's and the second pickup's rejections.
    let transitions: Vec<&Value> = all.iter().filter(|v| v["type"] == "transition").collect();
    assert!(transitions[0]["event"].is_string(), "placed by its event");
    assert!(
        transitions[1]["event"].is_null(),
        "offered by the offer pass"
    );
    let rejected: Vec<&str> = all
        .iter()
        .filter(|v| v["type"] == "rejected")
        .map(|v| v["reason"].as_str().unwrap())
        .collect();
    assert_eq!(rejected, ["not_assigned_rider", "invalid_state"]);
    assert!(all
        .iter()
        .any(|v| v["type"] == "grab_decided" && v["outcome"]["result"] == "won"));
    // The input topics hold the events as JSON keyed by entity.
    let inputs = read_topics(&broker.addr, &["grabflow.orders".to_string()]);
    assert!(inputs
        .iter()
        .any(|(_, k, v)| k == "O1" && v["type"] == "order_placed" && v["merchant"] == "M1"));
    // Redis: the closed order left the live set; the rider is indexed.
    let mut r = redis.con();
    let p = &redis.prefix;
    let live: Vec<String> = redis::cmd("SMEMBERS")
        .arg(format!("{p}orders"))
        .query(&mut r)
        .unwrap();
    assert!(live.is_empty(), "{live:?}");
    let pos: Vec<Option<(f64, f64)>> = redis::cmd("GEOPOS")
        .arg(format!("{p}riders"))
        .arg("R1")
        .query(&mut r)
        .unwrap();
    let (lon, lat) = pos[0].expect("R1 is in the GEO set");
    assert!((lat - 31.2309).abs() < 1e-3 && (lon - 121.47).abs() < 1e-3);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_keys_and_what_they_were_for_are_read_back_from_the_topics() {
    let broker = Broker::start();
    let dir = temp_dir();
    let mut s = Server::start(&dir, &kafka_args(&broker, &[]));
    s.wait_ready().await;
    let app = s.token("app", None);
    let batch = |riders: &[&str]| {
        json!(riders
            .iter()
            .map(|r| json!({"rider_id": r, "lat": 31.23, "lon": 121.47}))
            .collect::<Vec<_>>())
    };
    let riders = ["K1", "K2", "K3", "K4", "K5", "K6"];
    let first = s
        .call_keyed("POST", "/v1/locations:batch", &app, "b-1", batch(&riders))
        .await;
    assert_eq!(first, (202, json!({"accepted": 6})));
    let one = s
        .call_keyed(
            "POST",
            "/v1/riders/K1/location",
            &app,
            "p-1",
            json!({"lat": 31.0, "lon": 121.0}),
        )
        .await;
    assert_eq!(one.0, 202, "{one:?}");
    // A new process knows the keys only from the topics: the batch's events
    // are spread over partitions and read back in another order.
    s.kill9();
    let s = Server::start(&dir, &kafka_args(&broker, &[]));
    s.wait_ready().await;
    let mut shuffled = riders;
    shuffled.reverse();
    let again = s
        .call_keyed("POST", "/v1/locations:batch", &app, "b-1", batch(&shuffled))
        .await;
    assert_eq!(again, first, "a retried batch gets its first answer");
    let again = s
        .call_keyed(
            "POST",
            "/v1/riders/K1/location",
            &app,
            "p-1",
            json!({"lat": 31.0, "lon": 121.0}),
        )
        .await;
    assert_eq!(again, one, "a retried ping gets its first answer");
    for (path, key, body) in [
        ("/v1/locations:batch", "b-1", batch(&riders[..5])),
        (
            "/v1/riders/K1/location",
            "p-1",
            json!({"lat": 31.5, "lon": 121.0}),
        ),
        (
            "/v1/riders/K2/location",
            "p-1",
            json!({"lat": 31.0, "lon": 121.0}),
        ),
    ] {
        let (status, e) = s.call_keyed("POST", path, &app, key, body).await;
        assert_eq!(status, 422, "{path} {key}: {e}");
        assert_eq!(e["error"]["field"], "Idempotency-Key", "{e}");
    }
    // An order is placed once, whatever key its requests carry.
    s.city(&app, &[]).await;
    let order =
        json!({"order_id": "O1", "merchant_id": "M1", "dropoff": {"lat": 31.2, "lon": 121.4}});
    let first = s
        .call_keyed("POST", "/v1/orders", &app, "o-1", order.clone())
        .await;
    assert_eq!(first.0, 202, "{first:?}");
    let (status, e) = s
        .call_keyed("POST", "/v1/orders", &app, "o-2", order.clone())
        .await;
    assert_eq!(
        (status, &e["error"]["field"]),
        (409, &json!("order_id")),
        "{e}"
    );
    assert_eq!(
        s.call_keyed("POST", "/v1/orders", &app, "o-1", order).await,
        first
    );
    // Two placements racing: one is taken, the other refused.
    let o2 = json!({"order_id": "O2", "merchant_id": "M1", "dropoff": {"lat": 31.2, "lon": 121.4}});
    let (x, y) = tokio::join!(
        s.call_keyed("POST", "/v1/orders", &app, "o2-x", o2.clone()),
        s.call_keyed("POST", "/v1/orders", &app, "o2-y", o2),
    );
    let mut statuses = [x.0, y.0];
    statuses.sort();
    assert_eq!(statuses, [202, 409], "{x:?} {y:?}");
    // Nothing but the first two requests reached the topics.
    let pings: Vec<_> = read_topics(&broker.addr, &["grabflow.riders".to_string()])
        .into_iter()
        .filter(|(_, _, v)| v["type"] == "location_pinged")
        .collect();
    assert_eq!(pings.len(), 7, "{pings:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_produced_straight_to_the_topics_are_dispatched() {
    let broker = Broker::start();
    let dir = temp_dir();
    let s = Server::start(&dir, &kafka_args(&broker, &[]));
    s.wait_ready().await;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &broker.addr)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .create()
        .unwrap();
    let produce = |topic: &'static str, key: &'static str, value: Value| {
        let producer = producer.clone();
        async move {
            let body = value.to_string();
            producer
                .send(
                    FutureRecord::to(topic).key(key).payload(&body),
                    Duration::from_secs(5),
                )
                .await
                .expect("the broker acks");
        }
    };
    produce("grabflow.merchants", "M9", json!({"id": "ext-1", "type": "merchant_upserted", "merchant": "M9", "at": {"lat_e7": 312300000, "lon_e7": 1214700000}, "open": true})).await;
    // No id: the record's position is its id.
    produce(
        "grabflow.riders",
        "R9",
        json!({"type": "shift_changed", "rider": "R9", "online": true, "capacity": null}),
    )
    .await;
    produce("grabflow.riders", "R9", json!({"type": "location_pinged", "rider": "R9", "at": {"lat_e7": 312310000, "lon_e7": 1214700000}})).await;
    // Not an event: skipped, nothing breaks.
    produce("grabflow.riders", "R9", json!({"type": "teleported"})).await;
    let r9 = s.token("rider", Some("R9"));
    let mut ws = s.ws("R9", &r9, 0).await;
    produce("grabflow.orders", "O9", json!({"id": "ext-2", "type": "order_placed", "order": "O9", "merchant": "M9", "dropoff": {"lat_e7": 312200000, "lon_e7": 1214800000}, "promised_minutes": 30})).await;
    let offer = expect_msg(&mut ws, is("offer", "O9")).await;
    assert_eq!(offer["merchant_id"], "M9");
    // Ingress learned of the order from the topic: the grab is accepted.
    let (status, body) = s.call("POST", "/v1/orders/O9/grab", &r9, None).await;
    assert_eq!((status, body), (200, json!({"result": "won"})));
    let _ = std::fs::remove_dir_all(&dir);
}

/// An order whose time a tick pushed forward (a tick from another
/// producer reached its partition first with a later timestamp: times are
/// monotonic per partition, so the order takes the tick's) is offered at
/// once: the dataflow ticks every partition past it, its own included,
/// instead of leaving the partition at exactly the order's time until the
/// idle tick (10 minutes here: the offer would never come in time).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_behind_a_later_tick_in_its_partition_is_offered_without_the_idle_tick() {
    let broker = Broker::start();
    let dir = temp_dir();
    let s = Server::start(&dir, &kafka_args(&broker, &["--tick", "10m"]));
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &broker.addr)
        .create()
        .unwrap();
    let now = grabflow_log::now_ms() as i64;
    let produce = |topic: &'static str, value: Option<Value>, at: i64| {
        let producer = producer.clone();
        async move {
            let body = value.map(|v| v.to_string());
            let mut record = FutureRecord::<str, str>::to(topic)
                .partition(0)
                .timestamp(at);
            if let Some(body) = body.as_deref() {
                record = record.payload(body);
            }
            producer
                .send(record, Duration::from_secs(5))
                .await
                .expect("the broker acks");
        }
    };
    produce("grabflow.merchants", Some(json!({"type": "merchant_upserted", "merchant": "M9", "at": {"lat_e7": 312300000, "lon_e7": 1214700000}, "open": true})), now).await;
    produce(
        "grabflow.riders",
        Some(json!({"type": "shift_changed", "rider": "R9", "online": true, "capacity": null})),
        now,
    )
    .await;
    produce("grabflow.riders", Some(json!({"type": "location_pinged", "rider": "R9", "at": {"lat_e7": 312310000, "lon_e7": 1214700000}})), now).await;
    let r9 = s.token("rider", Some("R9"));
    let mut ws = s.ws("R9", &r9, 0).await;
    // A tick a second ahead, then the order, in one partition.
    produce("grabflow.orders", None, now + 1000).await;
    produce("grabflow.orders", Some(json!({"type": "order_placed", "order": "O9", "merchant": "M9", "dropoff": {"lat_e7": 312200000, "lon_e7": 1214800000}, "promised_minutes": 30})), now).await;
    let offer = expect_msg(&mut ws, is("offer", "O9")).await;
    assert_eq!(offer["merchant_id"], "M9");
    let _ = std::fs::remove_dir_all(&dir);
}

/// In `serve`, ingress's own ticks carry each order's event to its
/// decision: with the dataflow's ticks put off for 10 minutes, a whole
/// order life (placed, offered, grabbed, picked up, delivered) is decided
/// step by step at 16 partitions, and so is every order of a burst. Each
/// event has a tick behind it in its own partition (where ingress placed
/// it) and one beside it in every other; without either, it would wait
/// for the dataflow's tick.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingress_ticks_alone_carry_each_order_event_to_its_decision() {
    let broker = Broker::start();
    let dir = temp_dir();
    let s = Server::start(
        &dir,
        &[
            "--kafka",
            &broker.addr,
            "--kafka-partitions",
            "16",
            "--kafka-option",
            "batch.num.messages=1",
            "--tick",
            "10m",
            "--kafka-tick",
            "10m",
        ],
    );
    s.wait_ready().await;
    let (app, r1) = (s.token("app", None), s.token("rider", Some("R1")));
    s.city(&app, &[("R1", &r1, 100.0)]).await;
    let mut ws = s.ws("R1", &r1, 0).await;
    s.order(&app, "O1").await;
    let offer = expect_msg(&mut ws, is("offer", "O1")).await;
    assert_eq!(offer["merchant_id"], "M1");
    let (status, body) = s.call("POST", "/v1/orders/O1/grab", &r1, None).await;
    assert_eq!((status, body), (200, json!({"result": "won"})));
    for (step, state) in [("pickup", "delivering"), ("delivered", "closed")] {
        let path = format!("/v1/orders/O1/{step}");
        let (status, body) = s.call("POST", &path, &r1, None).await;
        assert_eq!((status, &body["state"]), (200, &json!(state)), "{body}");
    }
    // A burst: orders placed all at once, in flight together in many
    // partitions (a later round's tick must not overtake one and leave it
    // past its own round), more than a round a millisecond: every one is
    // decided.
    let ids: Vec<String> = (0..48).map(|i| format!("B{i}")).collect();
    futures_util::future::join_all(ids.iter().map(|id| s.order(&app, id))).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    for id in &ids {
        while order_states(&s, &app, id).await.is_empty() {
            assert!(Instant::now() < deadline, "order {id} was never decided");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Riders and merchants of a small city, and orders that stay waiting.
async fn city_with_waiting_orders(s: &Server, app: &str, riders: usize) -> Vec<String> {
    for (m, lat) in [("M1", 31.23), ("M2", 31.25), ("M3", 31.60)] {
        let (st, _) = s
            .call(
                "PUT",
                &format!("/v1/merchants/{m}"),
                app,
                Some(json!({"lat": lat, "lon": 121.47})),
            )
            .await;
        assert_eq!(st, 202);
    }
    let mut ids = Vec::new();
    for i in 0..riders {
        let id = format!("R{i}");
        let tok = s.token("rider", Some(&id));
        let online = i % 7 != 3;
        s.call(
            "PUT",
            &format!("/v1/riders/{id}/shift"),
            &tok,
            Some(json!({"online": online})),
        )
        .await;
        let (north, east) = (
            ((i * 37) % 50) as f64 * 100.0,
            ((i * 53) % 40) as f64 * 100.0 - 2000.0,
        );
        let body = json!({"lat": 31.22 + north / 111_195.0, "lon": 121.47 + east / 95_000.0});
        let (st, _) = s
            .call(
                "POST",
                &format!("/v1/riders/{id}/location"),
                &tok,
                Some(body),
            )
            .await;
        assert_eq!(st, 202);
        ids.push(id);
    }
    for (o, m) in [("W1", "M1"), ("W2", "M2"), ("W3", "M3")] {
        let body = json!({"order_id": o, "merchant_id": m, "dropoff": {"lat": 31.22, "lon": 121.48}, "promised_minutes": 60});
        assert_eq!(s.call("POST", "/v1/orders", app, Some(body)).await.0, 202);
    }
    ids
}

/// Whether the Redis mirror under `prefix` equals the server's in-memory view.
async fn mirror_matches(s: &Server, r: &Redis, app: &str, riders: &[String]) -> Result<(), String> {
    let mut c = r.con();
    let p = &r.prefix;
    let geo: BTreeSet<String> = redis::cmd("ZRANGE")
        .arg(format!("{p}riders"))
        .arg(0)
        .arg(-1)
        .query::<Vec<String>>(&mut c)
        .map_err(|e| e.to_string())?
        .into_iter()
        .collect();
    let mut indexed = BTreeSet::new();
    for id in riders {
        let (_, v) = s.call("GET", &format!("/v1/riders/{id}"), app, None).await;
        let h: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(format!("{p}rider:{id}"))
            .query(&mut c)
            .map_err(|e| e.to_string())?;
        if v["indexed"].is_null() {
            if !h.is_empty() {
                return Err(format!("{id} is not indexed but Redis has {h:?}"));
            }
            continue;
        }
        indexed.insert(id.clone());
        let lat: f64 = h
            .get("lat")
            .and_then(|x| x.parse().ok())
            .ok_or(format!("{id}: no lat"))?;
        let lon: f64 = h
            .get("lon")
            .and_then(|x| x.parse().ok())
            .ok_or(format!("{id}: no lon"))?;
        if (lat - v["indexed"]["lat"].as_f64().unwrap()).abs() > 1e-9
            || (lon - v["indexed"]["lon"].as_f64().unwrap()).abs() > 1e-9
        {
            return Err(format!(
                "{id}: Redis at {lat},{lon}, memory at {}",
                v["indexed"]
            ));
        }
    }
    if geo != indexed {
        return Err(format!("GEO set {geo:?} != indexed {indexed:?}"));
    }
    for m in ["M1", "M2", "M3"] {
        let (_, v) = s
            .call(
                "GET",
                &format!("/v1/merchants/{m}/riders?limit=200"),
                app,
                None,
            )
            .await;
        let want: BTreeMap<String, i64> = v["riders"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| {
                (
                    x["rider_id"].as_str().unwrap().to_string(),
                    x["distance_m"].as_f64().unwrap().round() as i64,
                )
            })
            .collect();
        let got: BTreeMap<String, i64> = redis::cmd("ZRANGE")
            .arg(format!("{p}merchant:{m}:riders"))
            .arg(0)
            .arg(-1)
            .arg("WITHSCORES")
            .query::<Vec<(String, i64)>>(&mut c)
            .map_err(|e| e.to_string())?
            .into_iter()
            .collect();
        if got != want {
            return Err(format!("{m}: Redis {got:?} != memory {want:?}"));
        }
    }
    for o in ["W1", "W2", "W3"] {
        let (_, v) = s.call("GET", &format!("/v1/orders/{o}"), app, None).await;
        let state: Option<String> = redis::cmd("HGET")
            .arg(format!("{p}order:{o}"))
            .arg("state")
            .query(&mut c)
            .map_err(|e| e.to_string())?;
        if state.as_deref() != v["state"].as_str() {
            return Err(format!("{o}: Redis {state:?} != memory {}", v["state"]));
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_index_read_with_plain_commands_equals_the_in_memory_one() {
    let broker = Broker::start();
    let redis = Redis::any();
    let dir = temp_dir();
    let url = redis.url();
    let s = Server::start(
        &dir,
        &kafka_args(&broker, &["--redis", &url, "--redis-prefix", &redis.prefix]),
    );
    s.wait_ready().await;
    let app = s.token("app", None);
    let riders = city_with_waiting_orders(&s, &app, 40).await;
    eventually(|| mirror_matches(&s, &redis, &app, &riders)).await;
    // The merchants with waiting orders near riders have non-empty sets; the
    // one far from every rider has none.
    let mut c = redis.con();
    let n: usize = redis::cmd("ZCARD")
        .arg(format!("{}merchant:M1:riders", redis.prefix))
        .query(&mut c)
        .unwrap();
    assert!(n > 5, "M1 has {n} riders in Redis");
    let far: usize = redis::cmd("EXISTS")
        .arg(format!("{}merchant:M3:riders", redis.prefix))
        .query(&mut c)
        .unwrap();
    assert_eq!(far, 0);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_mid_run_and_the_mirror_converges() {
    let broker = Broker::start();
    let port = free_port();
    let mut redis = Redis::own(port);
    let dir = temp_dir();
    let url = redis.url();
    let s = Server::start(
        &dir,
        &kafka_args(&broker, &["--redis", &url, "--redis-prefix", &redis.prefix]),
    );
    s.wait_ready().await;
    let app = s.token("app", None);
    let riders = city_with_waiting_orders(&s, &app, 20).await;
    eventually(|| mirror_matches(&s, &redis, &app, &riders)).await;
    // Redis goes away (with everything it held); dispatch goes on.
    redis.stop();
    let r0 = s.token("rider", Some("R0"));
    let mut ws = s.ws("R0", &r0, 0).await;
    for (i, rider) in riders.iter().enumerate() {
        let tok = s.token("rider", Some(rider));
        let body = json!({"lat": 31.2301 + i as f64 * 1e-4, "lon": 121.4701});
        let (st, _) = s
            .call(
                "POST",
                &format!("/v1/riders/{rider}/location"),
                &tok,
                Some(body),
            )
            .await;
        assert_eq!(st, 202);
    }
    let body = json!({"order_id": "X1", "merchant_id": "M1", "dropoff": {"lat": 31.22, "lon": 121.48}, "promised_minutes": 60});
    assert_eq!(s.call("POST", "/v1/orders", &app, Some(body)).await.0, 202);
    expect_msg(&mut ws, is("offer", "X1")).await;
    // It comes back empty; the mirror writes everything again.
    let back = Redis::own_with_prefix(port, redis.prefix.clone());
    eventually(|| mirror_matches(&s, &back, &app, &riders)).await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// Busy traffic through `ingress`: riders on streams from `egress` grab
/// what they are offered (races included), pick up and deliver.
async fn traffic(ingress: &Server, egress: &Server, orders: usize) {
    traffic_from(ingress, egress, 0..orders).await
}

/// [`traffic`], placing the orders `K{n}` for each `n` of `orders`.
async fn traffic_from(ingress: &Server, egress: &Server, orders: std::ops::Range<usize>) {
    let riders = riders_at_work(ingress, egress).await;
    let app = ingress.token("app", None);
    for k in orders {
        assert_eq!(
            ingress
                .call("POST", "/v1/orders", &app, Some(order_k(k)))
                .await
                .0,
            202
        );
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    riders.finish().await;
}

/// The order `K{k}` at merchant M1.
fn order_k(k: usize) -> Value {
    json!({"order_id": format!("K{k}"), "merchant_id": "M1", "dropoff": {"lat": 31.22, "lon": 121.48}, "promised_minutes": 30})
}

/// Riders at work for 15 s (or until [`Riders::finish`]).
struct Riders(Vec<tokio::task::JoinHandle<()>>);

impl Riders {
    /// Lets them finish what they were offered (3 s), then stops them.
    async fn finish(self) {
        tokio::time::sleep(Duration::from_secs(3)).await;
        for t in self.0 {
            t.abort();
        }
    }
}

/// Merchant M1 and six riders near it, set up through `ingress`, each on a
/// stream from `egress`, grabbing what they are offered (races included),
/// picking up and delivering.
async fn riders_at_work(ingress: &Server, egress: &Server) -> Riders {
    let app = ingress.token("app", None);
    let (st, _) = ingress
        .call(
            "PUT",
            "/v1/merchants/M1",
            &app,
            Some(json!({"lat": 31.23, "lon": 121.47})),
        )
        .await;
    assert_eq!(st, 202);
    let mut tasks = Vec::new();
    for i in 0..6 {
        let id = format!("T{i}");
        let tok = ingress.token("rider", Some(&id));
        ingress
            .call(
                "PUT",
                &format!("/v1/riders/{id}/shift"),
                &tok,
                Some(json!({"online": true, "capacity": 2})),
            )
            .await;
        let body = json!({"lat": 31.23 + i as f64 * 2e-3, "lon": 121.47});
        assert_eq!(
            ingress
                .call(
                    "POST",
                    &format!("/v1/riders/{id}/location"),
                    &tok,
                    Some(body)
                )
                .await
                .0,
            202
        );
        let mut ws = egress.ws(&id, &tok, 0).await;
        let (url, http) = (ingress.url.clone(), ingress.http.clone());
        tasks.push(tokio::spawn(async move {
            use futures_util::StreamExt;
            let post = |path: String| {
                let (url, http, tok) = (url.clone(), http.clone(), tok.clone());
                async move {
                    let _ = http
                        .post(format!("{url}{path}"))
                        .bearer_auth(tok)
                        .send()
                        .await;
                }
            };
            let deadline = Instant::now() + Duration::from_secs(15);
            while let Ok(Some(Ok(m))) = tokio::time::timeout(
                deadline.saturating_duration_since(Instant::now()),
                ws.next(),
            )
            .await
            {
                let Ok(v) = serde_json::from_str::<Value>(&m.into_text().unwrap_or_default())
                else {
                    continue;
                };
                let order = v["order_id"].as_str().unwrap_or_default().to_string();
                match v["type"].as_str() {
                    Some("offer") if (order.len() + i) % 3 != 0 => {
                        post(format!("/v1/orders/{order}/grab")).await
                    }
                    Some("assigned") => {
                        post(format!("/v1/orders/{order}/pickup")).await;
                        post(format!("/v1/orders/{order}/delivered")).await;
                    }
                    _ => {}
                }
            }
        }));
    }
    Riders(tasks)
}

/// A child process killed when dropped (also when a test fails).
struct Proc(Child);

impl Proc {
    fn kill9(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }

    /// SIGTERM, and asserts it stops cleanly within 30 s (a dataflow
    /// writes its last checkpoint first).
    fn stop(&mut self) {
        let sent = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        assert!(sent.is_ok_and(|s| s.success()));
        let status = exit_within(&mut self.0, Duration::from_secs(30));
        assert!(
            status.is_some_and(|s| s.success()),
            "it did not stop cleanly: {status:?}"
        );
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A `grabflow dataflow` process.
fn dataflow(broker: &Broker, extra: &[&str]) -> Proc {
    Proc(
        Command::new(env!("CARGO_BIN_EXE_grabflow"))
            .arg("dataflow")
            .args(kafka_args(broker, extra))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("the binary starts"),
    )
}

/// A `grabflow dataflow` process logging (at info) into the file `log`.
fn dataflow_logging(broker: &Broker, extra: &[&str], log: &Path) -> Proc {
    Proc(
        Command::new(env!("CARGO_BIN_EXE_grabflow"))
            .arg("dataflow")
            .args(kafka_args(broker, extra))
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).expect("a log file"))
            .spawn()
            .expect("the binary starts"),
    )
}

/// Starts a dataflow with `args` (logging to `log`) on a machine with
/// nothing on it, sends orders K20..K40 and checks that it resumed from a
/// checkpoint at or after the last of `before` (the stopped one's
/// decisions) and that the last order reached egress.
async fn resume_with_traffic(
    (broker, ingress, egress): (&Broker, &Server, &Server),
    args: &[&str],
    log: &Path,
    before: &[Value],
) -> Proc {
    let last_before = before.last().map_or(0, |v| v["time"].as_u64().unwrap());
    let resumed = dataflow_logging(broker, args, log);
    traffic_from(ingress, egress, 20..40).await;
    let at = resumed_from(log).expect("the dataflow says where it resumed");
    assert!(
        at >= last_before,
        "resumed from a checkpoint at {at}, before the last decision {last_before}"
    );
    let app = ingress.token("app", None);
    eventually(|| async {
        let (_, k39) = egress.call("GET", "/v1/orders/K39", &app, None).await;
        match k39["state"].is_string() {
            true => Ok(()),
            false => Err(format!("the last order has not reached egress: {k39}")),
        }
    })
    .await;
    resumed
}

/// The checkpoint time a dataflow's log says its input resumed from.
fn resumed_from(log: &Path) -> Option<u64> {
    let raw = std::fs::read_to_string(log).unwrap_or_default();
    // Without the terminal colours the log may carry.
    let mut text = String::new();
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            chars.by_ref().find(|c| c.is_ascii_alphabetic());
        } else {
            text.push(c);
        }
    }
    let line = text.lines().find(|l| l.contains("kafka input resumes"))?;
    let (_, rest) = line.split_once("checkpoint=")?;
    rest.split_whitespace().next()?.parse().ok()
}

/// Decisions of two runs over the same log agree on every time both passed.
fn same_decisions(a: &[Value], b: &[Value]) {
    let last = |d: &[Value]| d.last().map_or(0, |v| v["time"].as_u64().unwrap());
    let upto = last(a).min(last(b));
    let before = |d: &[Value]| -> Vec<Value> {
        d.iter()
            .filter(|v| v["time"].as_u64().unwrap() < upto)
            .cloned()
            .collect()
    };
    let (all_a, all_b) = (a.len(), b.len());
    let (a, b) = (before(a), before(b));
    assert!(
        a.len() > 30,
        "only {} decisions to compare (of {all_a} and {all_b}, up to {upto})",
        a.len()
    );
    assert_eq!(a, b);
}

/// Waits until the output topics under `prefix` hold at least `n` decisions.
fn wait_decisions(broker: &str, prefix: &str, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let d = decisions(broker, prefix);
        if d.len() >= n || Instant::now() > deadline {
            return d;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_roles_and_a_killed_dataflow_lose_and_duplicate_nothing() {
    // On SQLite, so grabflow's producers batch as in production.
    let dir = temp_dir();
    let broker = Broker::persistent(&dir);
    let slow = ["--grab-timeout", "3s", "--rider-ttl", "20s"];
    let ingress = Server::start_role("ingress", &dir, &kafka_args(&broker, &[]));
    let mut flow = dataflow(&broker, &slow);
    let egress = Server::start_role("egress", &dir, &kafka_args(&broker, &slow));
    life_cycle_on(&ingress, &egress).await;
    // Traffic, with the dataflow killed and restarted in the middle of it.
    let busy = traffic(&ingress, &egress, 40);
    let killer = async {
        tokio::time::sleep(Duration::from_millis(1200)).await;
        flow.kill9();
        tokio::time::sleep(Duration::from_millis(500)).await;
        dataflow(&broker, &slow)
    };
    let ((), _restarted) = tokio::join!(busy, killer);
    // Every seq once, none missing (asserted by `decisions`).
    let live = decisions(&broker.addr, "grabflow.");
    let app = ingress.token("app", None);
    eventually(|| async {
        let (_, k39) = egress.call("GET", "/v1/orders/K39", &app, None).await;
        match k39["state"].is_string() {
            true => Ok(()),
            false => Err(format!("the last order has not reached egress: {k39}")),
        }
    })
    .await;
    // A fresh dataflow on the same log decides exactly the same.
    let _shadow = dataflow(
        &broker,
        &[&slow[..], &["--kafka-output-prefix", "ref."]].concat(),
    );
    let reference = wait_decisions(&broker.addr, "ref.", live.len());
    same_decisions(&live, &reference);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Places `K{k}` with an idempotency key, retrying (with the same key)
/// while ingress answers 503, the broker not acking: how many 503s it got.
async fn place_until_acked(ingress: &Server, app: &str, k: usize) -> usize {
    let key = format!("place-K{k}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut refused = 0;
    loop {
        let (status, body) = ingress
            .call_keyed("POST", "/v1/orders", app, &key, order_k(k))
            .await;
        match status {
            202 => return refused,
            503 if Instant::now() < deadline => {
                refused += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            _ => panic!("placing K{k}: {status} {body}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_killed_and_restarted_mid_traffic_and_every_acked_order_is_decided_once() {
    let dir = temp_dir();
    let mut broker = Broker::persistent(&dir);
    let slow = ["--grab-timeout", "3s", "--rider-ttl", "20s"];
    // The outage (2 s, and librdkafka's reconnect backoff) stays within
    // the ack timeout: a placement waits for the broker to come back. (One
    // the producer gave up on makes librdkafka's idempotent producer bump
    // its epoch, which tansu 0.6 cannot take: a produce with an epoch it did
    // not hand out panics its storage task, and every request after that
    // fails until it restarts.)
    let ingress = Server::start_role(
        "ingress",
        &dir,
        &kafka_args(&broker, &["--kafka-ack-timeout", "8s"]),
    );
    let mut flow = dataflow(&broker, &slow);
    let mut egress = Server::start_role("egress", &dir, &kafka_args(&broker, &slow));
    let app = ingress.token("app", None);
    let riders = riders_at_work(&ingress, &egress).await;
    // Orders, each retried until acked; the broker is SIGKILLed among them
    // and started again 2 s later on the same port and file.
    let orders = 30;
    let placing = async {
        let (mut refused, mut slowest) = (0, Duration::ZERO);
        for k in 0..orders {
            let t = Instant::now();
            refused += place_until_acked(&ingress, &app, k).await;
            slowest = slowest.max(t.elapsed());
            tokio::time::sleep(Duration::from_millis(60)).await;
        }
        (refused, slowest)
    };
    let outage = async {
        tokio::time::sleep(Duration::from_millis(800)).await;
        broker.kill9();
        tokio::time::sleep(Duration::from_secs(2)).await;
        broker.restart();
    };
    let ((refused, slowest), ()) = tokio::join!(placing, outage);
    assert!(
        slowest > Duration::from_secs(1),
        "no placement waited for the broker ({slowest:?})"
    );
    eprintln!("placements refused while the broker was away: {refused}; slowest {slowest:?}");
    riders.finish().await;
    // Nothing was restarted but the broker: every role found it again, and
    // every acked order reached egress, placed once.
    for k in 0..orders {
        let path = format!("/v1/orders/K{k}");
        eventually(|| async {
            let (_, o) = egress.call("GET", &path, &app, None).await;
            let Some(history) = o["history"].as_array() else {
                return Err(format!("K{k} has not reached egress: {o}"));
            };
            let placed = history.iter().filter(|h| h["reason"] == "placed").count();
            match placed {
                1 => Ok(()),
                n => Err(format!("K{k} placed {n} times: {o}")),
            }
        })
        .await;
    }
    assert!(flow.0.try_wait().unwrap().is_none(), "the dataflow exited");
    assert!(egress.child.try_wait().unwrap().is_none(), "egress exited");
    // Every seq once, none missing (asserted by `decisions`), each order's
    // placement decided once; and a dataflow reading the log afterwards
    // decides exactly the same.
    let live = decisions(&broker.addr, "grabflow.");
    for k in 0..orders {
        let order = format!("K{k}");
        let placed = live
            .iter()
            .filter(|v| v["order"] == order.as_str() && v["reason"] == "placed")
            .count();
        assert_eq!(placed, 1, "{order} placed {placed} times");
    }
    let _reference = dataflow(
        &broker,
        &[&slow[..], &["--kafka-output-prefix", "ref."]].concat(),
    );
    let reference = wait_decisions(&broker.addr, "ref.", live.len());
    same_decisions(&live, &reference);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Whether every partition of `topics` starts past offset 0 (its low
/// watermark): its first records were deleted.
fn all_start_past_0(broker: &str, topics: &[String]) -> Result<(), String> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", broker)
        .create()
        .unwrap();
    for t in topics {
        let md = c
            .fetch_metadata(Some(t), Duration::from_secs(5))
            .map_err(|e| e.to_string())?;
        for p in md.topics()[0].partitions() {
            let (low, high) = c
                .fetch_watermarks(t, p.id(), Duration::from_secs(5))
                .map_err(|e| e.to_string())?;
            if low == 0 {
                return Err(format!("{t}/{} still starts at 0 (ends at {high})", p.id()));
            }
        }
    }
    Ok(())
}

/// `a` and `b` (decisions in seq order) cut to the seqs both kept.
fn common_seqs(a: Vec<Value>, b: Vec<Value>) -> (Vec<Value>, Vec<Value>) {
    let seq = |v: &Value| v["seq"].as_u64().unwrap();
    let from = a.first().map_or(0, seq).max(b.first().map_or(0, seq));
    let keep = |d: Vec<Value>| -> Vec<Value> { d.into_iter().filter(|v| seq(v) >= from).collect() };
    (keep(a), keep(b))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn input_past_its_retention_is_deleted_and_a_dataflow_resumes_from_the_cluster_checkpoint() {
    let dir = temp_dir();
    let mut broker = Broker::persistent(&dir);
    let retention = Duration::from_secs(4);
    let keep = ["--kafka-retention", "4s"];
    let slow = [
        "--grab-timeout",
        "3s",
        "--rider-ttl",
        "20s",
        "--checkpoint-interval",
        "500ms",
    ];
    let ingress = Server::start_role("ingress", &dir, &kafka_args(&broker, &keep));
    let egress = Server::start_role(
        "egress",
        &dir,
        &kafka_args(&broker, &[&slow[..], &keep].concat()),
    );
    // A runs throughout, writing to its own topics; B is stopped, and
    // started again once the broker has deleted what it had read.
    let _a = dataflow(
        &broker,
        &[&slow[..], &keep, &["--kafka-output-prefix", "ref."]].concat(),
    );
    let b_args = [&slow[..], &keep].concat();
    let mut b = dataflow_logging(&broker, &b_args, &dir.join("b.log"));
    traffic_from(&ingress, &egress, 0..20).await;
    b.stop();
    let before = decisions(&broker.addr, "grabflow.");
    // Past the retention, the broker restarts; its maintenance at start
    // deletes the input records older than that (A's ticks go on).
    tokio::time::sleep(retention + Duration::from_secs(1)).await;
    broker.restart();
    let inputs: Vec<String> = ["riders", "merchants", "orders"]
        .iter()
        .map(|t| format!("grabflow.{t}"))
        .collect();
    // The checkpoint topic is compacted instead: the chunks and manifests
    // written over since are gone too.
    let compacted = [&inputs[..], &["grabflow.checkpoints".to_string()]].concat();
    eventually(|| async { all_start_past_0(&broker.addr, &compacted) }).await;
    let placed = read_topics(&broker.addr, &inputs)
        .into_iter()
        .filter(|(_, _, v)| v["type"] == "order_placed")
        .count();
    assert_eq!(placed, 0, "the placements are past their retention");
    // B, with nothing on its machine, resumes from the latest checkpoint,
    // whole after the compaction.
    let _b = resume_with_traffic(
        (&broker, &ingress, &egress),
        &b_args,
        &dir.join("b-again.log"),
        &before,
    )
    .await;
    // B's decisions since it resumed are A's, which never stopped (each
    // run's topics keep the decisions since the retention's cut).
    let b_kept = kept_decisions(&broker.addr, "grabflow.");
    let b_last = b_kept.last().map_or(0, |v| v["seq"].as_u64().unwrap());
    assert!(b_kept.first().is_some_and(|v| v["seq"].as_u64() > Some(0)));
    let deadline = Instant::now() + Duration::from_secs(30);
    let a_kept = loop {
        let a = kept_decisions(&broker.addr, "ref.");
        if a.last().is_some_and(|v| v["seq"].as_u64() >= Some(b_last)) || Instant::now() > deadline
        {
            break a;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let (a, b) = common_seqs(a_kept, b_kept);
    same_decisions(&a, &b);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_process_cluster_decides_as_one_process_does() {
    // On SQLite, so grabflow's producers batch as in production.
    let dir = temp_dir();
    let broker = Broker::persistent(&dir);
    let slow = ["--grab-timeout", "3s", "--rider-ttl", "20s"];
    let s = Server::start(&dir, &kafka_args(&broker, &slow));
    s.wait_ready().await;
    traffic(&s, &s, 30).await;
    let one = decisions(&broker.addr, "grabflow.");
    let hosts = format!("127.0.0.1:{},127.0.0.1:{}", free_port(), free_port());
    let cluster = |i: &'static str| {
        let mut args = slow.to_vec();
        args.extend([
            "--kafka-output-prefix",
            "two.",
            "--processes",
            "2",
            "--process",
            i,
            "--hosts",
            &hosts,
        ]);
        dataflow(&broker, &args)
    };
    let mut cluster = [cluster("0"), cluster("1")];
    let two = wait_decisions(&broker.addr, "two.", one.len());
    same_decisions(&one, &two);
    // SIGTERM to both: they agree where to stop and exit together, cleanly.
    let pids: Vec<String> = cluster.iter().map(|p| p.0.id().to_string()).collect();
    let sent = Command::new("kill").arg("-TERM").args(&pids).status();
    assert!(sent.is_ok_and(|s| s.success()));
    for p in &mut cluster {
        let status = exit_within(&mut p.0, Duration::from_secs(20));
        assert!(
            status.is_some_and(|s| s.success()),
            "a cluster process did not exit cleanly after SIGTERM: {status:?}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dataflow_on_a_fresh_machine_resumes_from_the_checkpoint_kept_in_the_cluster() {
    let broker = Broker::start();
    let dir = temp_dir();
    let slow = [
        "--grab-timeout",
        "3s",
        "--rider-ttl",
        "20s",
        "--checkpoint-interval",
        "500ms",
    ];
    let ingress = Server::start_role("ingress", &dir, &kafka_args(&broker, &[]));
    let egress = Server::start_role("egress", &dir, &kafka_args(&broker, &slow));
    let first_log = dir.join("first.log");
    let mut first = dataflow_logging(&broker, &slow, &first_log);
    traffic_from(&ingress, &egress, 0..20).await;
    // SIGTERM: it stops cleanly, its last checkpoint written to the cluster.
    first.stop();
    assert_eq!(
        resumed_from(&first_log),
        Some(0),
        "the first one starts from nothing"
    );
    let before = decisions(&broker.addr, "grabflow.");
    // Another dataflow process, with nothing on its machine (the dataflow
    // role keeps nothing on disk): it starts from that checkpoint, not from
    // the topics' start, and goes on where the first one stopped.
    let _second = resume_with_traffic(
        (&broker, &ingress, &egress),
        &slow,
        &dir.join("second.log"),
        &before,
    )
    .await;
    // Every seq once, none missing (asserted by `decisions`); and a
    // dataflow reading the whole log from its start decides the same.
    let live = decisions(&broker.addr, "grabflow.");
    assert!(live.len() > before.len());
    let _reference = dataflow(
        &broker,
        &[&slow[..], &["--kafka-output-prefix", "ref."]].concat(),
    );
    let reference = wait_decisions(&broker.addr, "ref.", live.len());
    same_decisions(&live, &reference);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs `grabflow dataflow` with `args` until it exits: success, stderr.
fn dataflow_exit(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_grabflow"))
        .arg("dataflow")
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .output()
        .expect("the binary runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_options_reach_librdkafka_and_guarantee_breakers_are_refused() {
    let broker = Broker::start();
    // An option librdkafka does not know stops the start, in its words:
    // the setting reached it.
    let (ok, stderr) = dataflow_exit(&kafka_args(
        &broker,
        &["--kafka-option", "no.such.setting=1"],
    ));
    assert!(!ok && stderr.contains("no.such.setting"), "{stderr}");
    // One that would break exactly-once is refused before any client.
    let (ok, stderr) = dataflow_exit(&kafka_args(&broker, &["--kafka-option", "acks=1"]));
    assert!(!ok && stderr.contains("acks stays all"), "{stderr}");
    // And one that would do nothing (grabflow places every record it
    // writes itself) and says so.
    let (ok, stderr) = dataflow_exit(&kafka_args(
        &broker,
        &["--kafka-option", "partitioner=consistent"],
    ));
    assert!(!ok && stderr.contains("murmur2"), "{stderr}");
    // Good options (also from the environment) and the service works.
    let dir = temp_dir();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_grabflow"));
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&dir)
        .args(kafka_args(
            &broker,
            &["--kafka-option", "client.id=grabflow-test"],
        ))
        .env(
            "GRABFLOW_KAFKA_OPTIONS",
            "linger.ms=2, socket.keepalive.enable=true",
        );
    let s = Server::from_command(cmd, &dir);
    s.wait_ready().await;
    let app = s.token("app", None);
    let (status, _) = s
        .call(
            "PUT",
            "/v1/merchants/M1",
            &app,
            Some(json!({"lat": 31.23, "lon": 121.47})),
        )
        .await;
    assert_eq!(status, 202);
    let _ = std::fs::remove_dir_all(&dir);
}

/// grabflow places every record it writes itself (ingress must know an
/// order event's partition, to tick behind it): `partition_for` puts a key
/// where librdkafka's own `murmur2_random` partitioner (what Java clients
/// do) puts it, at a partition count that is a power of two and one that
/// is not, for keys of every tail length and of bytes past ASCII.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_for_places_a_key_where_librdkafka_does() {
    let broker = Broker::start();
    let cfg = grabflow_log::kafka::KafkaConfig::new(&broker.addr);
    let admin: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> =
        cfg.client().create().unwrap();
    let counts = [("placed-16", 16), ("placed-7", 7)];
    let topics: Vec<_> = counts
        .iter()
        .map(|(t, n)| {
            rdkafka::admin::NewTopic::new(t, *n, rdkafka::admin::TopicReplication::Fixed(1))
        })
        .collect();
    admin
        .create_topics(topics.iter(), &rdkafka::admin::AdminOptions::new())
        .await
        .unwrap();
    // librdkafka's own partitioner places these (no partition given).
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &broker.addr)
        .set("partitioner", "murmur2_random")
        .create()
        .unwrap();
    let keys: Vec<String> = (0..200)
        .map(|i| {
            format!(
                "{}{i}",
                ["O", "R", "M-", "order-", "Ørsted-ü", "配送"][i % 6]
            )
        })
        .collect();
    for (topic, n) in counts {
        let sends = keys.iter().map(|k| {
            producer.send(
                FutureRecord::to(topic).key(k).payload("x"),
                Duration::from_secs(10),
            )
        });
        let placed: Vec<i32> = futures_util::future::join_all(sends)
            .await
            .into_iter()
            .map(|d| d.unwrap().partition)
            .collect();
        let ours: Vec<i32> = keys
            .iter()
            .map(|k| grabflow_api::topics::partition_for(k.as_bytes(), n))
            .collect();
        assert_eq!(placed, ours, "{topic}");
        // Spread over the partitions, as a hash should.
        assert_eq!(ours.iter().collect::<BTreeSet<_>>().len(), n as usize);
    }
}

/// The memory engine's batch quirk (see [`kafka_args`]) is not the SQLite
/// engine's: 15 records in batches of 8 and 7 end at 15 (the memory engine
/// says 9), and a read from inside a batch starts there (the memory engine
/// returns nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sqlite_broker_counts_offsets_per_record() {
    let dir = temp_dir();
    let broker = Broker::persistent(&dir);
    let admin: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> =
        ClientConfig::new()
            .set("bootstrap.servers", &broker.addr)
            .create()
            .unwrap();
    let topic =
        rdkafka::admin::NewTopic::new("probe", 1, rdkafka::admin::TopicReplication::Fixed(1));
    admin
        .create_topics([&topic], &rdkafka::admin::AdminOptions::new())
        .await
        .unwrap();
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &broker.addr)
        .set("linger.ms", "200")
        .set("batch.num.messages", "8")
        .create()
        .unwrap();
    let sends: Vec<_> = (0..15)
        .map(|i| {
            let body = format!("{i}");
            let p = producer.clone();
            async move {
                p.send(
                    FutureRecord::to("probe")
                        .partition(0)
                        .key("k")
                        .payload(&body),
                    Duration::from_secs(5),
                )
                .await
                .map(|d| d.offset)
                .map_err(|(e, _)| e.to_string())
            }
        })
        .collect();
    let offsets = futures_util::future::join_all(sends).await;
    let acked: Vec<i64> = offsets.into_iter().map(Result::unwrap).collect();
    assert_eq!(acked, (0..15).collect::<Vec<_>>());
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &broker.addr)
        .set("group.id", "probe")
        .create()
        .unwrap();
    let wm = c
        .fetch_watermarks("probe", 0, Duration::from_secs(5))
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset("probe", 0, Offset::Offset(10))
        .unwrap();
    c.assign(&tpl).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut got = Vec::new();
    while Instant::now() < deadline && got.len() < 5 {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(100)) {
            got.push(m.offset());
        }
    }
    assert_eq!(wm, (0, 15));
    assert_eq!(got, [10, 11, 12, 13, 14]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A self-signed certificate and its key for 127.0.0.1 and localhost, made
/// in `dir` with the `openssl` command: (certificate, key).
fn self_signed(dir: &Path) -> (PathBuf, PathBuf) {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let made = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=127.0.0.1"])
        .args(["-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(Stdio::null())
        .status();
    assert!(
        made.is_ok_and(|s| s.success()),
        "openssl made no certificate"
    );
    (cert, key)
}

/// Serves with `args` (in `dir`): a rider on shift near a merchant is
/// offered the order placed there.
async fn offered_through(dir: &Path, args: &[&str]) {
    let s = Server::start(dir, args);
    s.wait_ready().await;
    let app = s.token("app", None);
    let r1 = s.token("rider", Some("R1"));
    s.city(&app, &[("R1", &r1, 100.0)]).await;
    let mut ws = s.ws("R1", &r1, 0).await;
    s.order(&app, "O1").await;
    expect_msg(&mut ws, is("offer", "O1")).await;
}

/// TLS in front of `broker` on `port` (the one it advertises), with
/// `socat`: tansu 0.6 serves no TLS (its `--cert` and `--key` cannot be
/// given together, and the TLS acceptor it builds is never used), so every
/// connection of grabflow's clients (bootstrap and broker) goes through it.
fn tls_front(broker: &Broker, port: u16, cert: &Path, key: &Path) -> Proc {
    let front = Proc(
        Command::new("socat")
            .arg(format!(
                "OPENSSL-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,cert={},key={},verify=0",
                cert.display(),
                key.display()
            ))
            .arg(format!("TCP:127.0.0.1:{}", broker.port))
            .stderr(Stdio::null())
            .spawn()
            .expect("socat runs (scripts/test installs it)"),
    );
    wait_port(port, "socat");
    front
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_an_order_is_placed_and_offered_and_an_untrusted_broker_fails_the_start() {
    let dir = temp_dir();
    let (cert, key) = self_signed(&dir);
    let tls_port = free_port();
    let broker = Broker::advertising("memory://tansu/", dir.clone(), free_port(), tls_port);
    let _front = tls_front(&broker, tls_port, &cert, &key);
    let ca = format!("ssl.ca.location={}", cert.display());
    let tls = [
        "--kafka-option",
        "security.protocol=ssl",
        "--kafka-option",
        &ca,
    ];
    offered_through(&dir, &kafka_args(&broker, &tls)).await;
    // Without the CA, the broker's certificate is not trusted: the start
    // fails within seconds, in librdkafka's words.
    let started = Instant::now();
    let (ok, stderr) = dataflow_exit(&kafka_args(
        &broker,
        &["--kafka-option", "security.protocol=ssl"],
    ));
    assert!(
        !ok && stderr.contains("certificate verify failed"),
        "{stderr}"
    );
    assert!(started.elapsed() < Duration::from_secs(30));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A managed Kafka's shape: SASL_SSL with SCRAM-SHA-512 (TLS from
/// [`tls_front`], users and authentication from tansu itself). With the
/// right credentials an order is offered; with a wrong password, or none,
/// the start fails within seconds in librdkafka's words.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_sasl_ssl_with_scram_an_order_is_offered_and_a_wrong_password_fails_the_start() {
    let dir = temp_dir();
    let (cert, key) = self_signed(&dir);
    let tls_port = free_port();
    let mut broker = Broker::advertising("sqlite:///tansu.db", dir.clone(), free_port(), tls_port);
    broker.with_user("grabflow", "s3cret");
    let _front = tls_front(&broker, tls_port, &cert, &key);
    let ca = format!("ssl.ca.location={}", cert.display());
    let sasl_ssl = |password: &'static str| {
        [
            "security.protocol=sasl_ssl".to_string(),
            ca.clone(),
            "sasl.mechanism=SCRAM-SHA-512".into(),
            "sasl.username=grabflow".into(),
            format!("sasl.password={password}"),
        ]
        .map(|o| ["--kafka-option".to_string(), o])
        .concat()
    };
    let good = sasl_ssl("s3cret");
    let good: Vec<&str> = good.iter().map(String::as_str).collect();
    offered_through(&dir, &kafka_args(&broker, &good)).await;
    let bad = sasl_ssl("wrong");
    let bad: Vec<&str> = bad.iter().map(String::as_str).collect();
    let tls_only = [
        "--kafka-option",
        "security.protocol=ssl",
        "--kafka-option",
        &ca,
    ];
    // (tansu drops a client that does not authenticate without a word:
    // librdkafka can only say the broker is down.)
    let failures = [
        (&bad[..], "SASL authentication error"),
        (&tls_only[..], "brokers are down"),
    ];
    for (args, why) in failures {
        let started = Instant::now();
        let (ok, stderr) = dataflow_exit(&kafka_args(&broker, args));
        assert!(!ok, "started: {why}");
        assert!(
            stderr.contains("no Kafka broker") && stderr.contains(why),
            "{stderr}"
        );
        assert!(started.elapsed() < Duration::from_secs(30), "{why}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
