//! Where the broker is, how topics are named and made, how every client is
//! set up, and what can go wrong.

use grabflow_api::topics::Topics;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use serde::Deserialize;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The header carrying a client's `Idempotency-Key`.
pub const KEY_HEADER: &str = "idempotency-key";
/// The header carrying the size of the batch a record belongs to.
pub const BATCH_HEADER: &str = "grabflow-batch";

/// Settings of production mode's Kafka.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap servers, `host:port[,host:port…]`.
    pub brokers: String,
    /// Prefix of every topic name (`grabflow.` gives `grabflow.orders`, …).
    pub prefix: String,
    /// Prefix of the output topics, when not `prefix` (a shadow dataflow).
    pub output_prefix: Option<String>,
    /// Partitions of each topic grabflow creates.
    pub partitions: i32,
    /// Replicas of each topic grabflow creates.
    pub replication: i32,
    /// How long an append waits for the broker's ack before answering 503.
    pub ack_timeout: Duration,
    /// An input partition holding back a newer event gets a tick after this
    /// long without a record.
    pub tick: Duration,
    /// Any input partition without a record for this long gets a tick, so
    /// timers fire when nothing happens.
    pub idle_tick: Duration,
    /// The time retention (`retention.ms`) of the input and output topics
    /// grabflow creates (none: the broker's default).
    pub retention: Option<Duration>,
    /// librdkafka settings given by the user (`--kafka-option`), applied to
    /// every client after grabflow's own (see [`KafkaConfig::options`]).
    #[serde(default)]
    pub options: Vec<(String, String)>,
}

/// A librdkafka setting grabflow refuses, and why.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("--kafka-option {key}={value}: {why}")]
pub struct RefusedOption {
    /// The setting.
    pub key: String,
    /// Its value.
    pub value: String,
    /// What it would break.
    pub why: &'static str,
}

/// A client's settings: grabflow's, then the user's options on top, which
/// [`ClientSettings::create`] applies last.
#[derive(Clone)]
pub struct ClientSettings {
    config: ClientConfig,
    options: Vec<(String, String)>,
}

impl ClientSettings {
    /// Sets `key` to `value` (under the user's options).
    pub fn set(&mut self, key: &str, value: impl Into<String>) -> &mut ClientSettings {
        self.config.set(key, value);
        self
    }

    /// The settings as librdkafka gets them: grabflow's, then the user's.
    pub fn config(&self) -> ClientConfig {
        let mut c = self.config.clone();
        for (k, v) in &self.options {
            c.set(k, v);
        }
        c
    }

    /// Creates the client.
    pub fn create<T: rdkafka::config::FromClientConfig>(&self) -> rdkafka::error::KafkaResult<T> {
        self.config().create()
    }

    /// Creates the client with `context`.
    pub fn create_with_context<C, T>(&self, context: C) -> rdkafka::error::KafkaResult<T>
    where
        C: rdkafka::ClientContext,
        T: rdkafka::config::FromClientConfigAndContext<C>,
    {
        self.config().create_with_context(context)
    }
}

impl KafkaConfig {
    /// Defaults for `brokers`: prefix `grabflow.`, 4 partitions, 1 replica,
    /// 5 s ack timeout, 5 ms tick, 50 ms idle tick, topics kept 7 days.
    pub fn new(brokers: &str) -> KafkaConfig {
        KafkaConfig {
            brokers: brokers.to_string(),
            prefix: "grabflow.".into(),
            output_prefix: None,
            partitions: 4,
            replication: 1,
            ack_timeout: Duration::from_secs(5),
            tick: Duration::from_millis(5),
            idle_tick: Duration::from_millis(50),
            retention: Some(Duration::from_secs(7 * 86_400)),
            options: Vec::new(),
        }
    }

    /// Checks the user's librdkafka settings (`KEY=VALUE` each) and keeps
    /// them, to be applied to every client after grabflow's own. Refused:
    /// what would break grabflow's guarantees or its own wiring —
    /// `enable.idempotence=false` and `acks` other than `all` (an ack must
    /// mean every in-sync replica has the record, once), `enable.auto.commit`
    /// (grabflow commits after delivery), `bootstrap.servers` (that is
    /// `--kafka`), `group.id` (grabflow names its groups) and `partitioner`
    /// (grabflow places every record it writes itself, by murmur2 of the
    /// key: the setting would do nothing).
    pub fn options<'a>(
        mut self,
        options: impl IntoIterator<Item = &'a str>,
    ) -> Result<KafkaConfig, RefusedOption> {
        for option in options {
            let (key, value) = option.split_once('=').unwrap_or((option, ""));
            let (key, value) = (key.trim().to_string(), value.trim().to_string());
            let refuse = |why| RefusedOption {
                key: key.clone(),
                value: value.clone(),
                why,
            };
            let why = match key.as_str() {
                "" => Some("not KEY=VALUE"),
                _ if !option.contains('=') => Some("not KEY=VALUE"),
                "bootstrap.servers" | "metadata.broker.list" => {
                    Some("the brokers are set with --kafka")
                }
                "group.id" => Some("grabflow names its consumer groups itself"),
                "partitioner" => Some(
                    "grabflow places every record it writes itself, by Kafka's murmur2 of the key (as Java clients do): it would change nothing",
                ),
                "enable.idempotence" if value != "true" => {
                    Some("appends must be written exactly once: idempotence stays on")
                }
                "acks" | "request.required.acks" if value != "all" && value != "-1" => {
                    Some("an ack must mean every in-sync replica has the record: acks stays all")
                }
                "enable.auto.commit" if value != "false" => {
                    Some("grabflow commits offsets itself, after delivery")
                }
                _ => None,
            };
            if let Some(why) = why {
                return Err(refuse(why));
            }
            self.options.push((key, value));
        }
        Ok(self)
    }

    /// The topic names.
    pub fn topics(&self) -> Topics {
        Topics::with_outputs(&self.prefix, self.outputs())
    }

    /// The prefix of the output topics (and of the dataflow's consumer group).
    pub fn outputs(&self) -> &str {
        self.output_prefix.as_deref().unwrap_or(&self.prefix)
    }

    /// A client configuration for these brokers.
    pub fn client(&self) -> ClientSettings {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers)
            // librdkafka's own logs go through its context to `log`; keep
            // them to errors (a stopped broker is reported by our errors).
            .set("log_level", "3")
            // A broker that went away is tried again at most 1 s apart (as
            // Java clients do; librdkafka's default backs off to 10 s), so a
            // restarted broker is found again before ingress's appends
            // waiting for it time out.
            .set("reconnect.backoff.max.ms", "1000");
        ClientSettings {
            config: c,
            options: self.options.clone(),
        }
    }

    /// Producer settings shared by every grabflow producer.
    pub fn producer(&self) -> ClientSettings {
        let mut c = self.client();
        // No duplicates and no reordering on retries: exactly one copy of each
        // acknowledged record, in order per partition.
        c.set("enable.idempotence", "true")
            // An ack means every in-sync replica has the record.
            .set("acks", "all")
            // Records waiting at once go in one batch, and concurrent
            // requests share a produce request, at ≤1 ms of added latency
            // (a request's own records are sent together anyway).
            .set("linger.ms", "1")
            // Batches are compressed; lz4 costs least CPU for what it saves.
            .set("compression.type", "lz4");
        // (No partitioner: grabflow places every record it writes itself,
        // as Java clients do, `grabflow_api::topics::partition_for`.)
        // (tansu 0.6, the test broker, mishandles batches of several
        // records: its high watermark is the last batch's first offset + 1,
        // and a fetch from an offset inside a batch comes back empty. The
        // tests run it with `--kafka-option batch.num.messages=1`; see
        // docs/production.md, "Against tansu".)
        c
    }

    /// Settings of a producer of clock ticks (records without value): an
    /// old tick is useless, so one not acked within 10 s is dropped; and
    /// without idempotence, because a doubled tick is harmless and several
    /// processes tick the same partitions, which tansu 0.6's idempotence
    /// tracking does not take well (a wedged partition stops the clock).
    pub fn ticker(&self) -> ClientSettings {
        let mut c = self.producer();
        c.set("message.timeout.ms", "10000")
            .set("enable.idempotence", "false");
        c
    }

    /// Consumer settings for reading topics by assignment (no group rebalance).
    pub fn consumer(&self, group: &str) -> ClientSettings {
        let mut c = self.client();
        // Commits (of the dataflow) go to this group; nothing else uses it.
        c.set("group.id", group)
            // Progress is committed by grabflow itself, after delivery.
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            // An idle partition is answered within 10 ms. tansu 0.6 holds
            // a fetch for the whole wait even when data arrives, so this
            // bounds latency; at 5 ms its idle polling cost twice the CPU
            // for the same order→offer latency, at 100 ms latency was 200 ms.
            .set("fetch.wait.max.ms", "10")
            .set("enable.partition.eof", "false");
        c
    }
}

/// Errors of the Kafka side.
#[derive(Debug, thiserror::Error)]
pub enum KafkaError {
    /// The client failed.
    #[error("kafka: {0}")]
    Client(#[from] rdkafka::error::KafkaError),
    /// A topic is missing or has no partitions.
    #[error("kafka topic {0} has no partitions")]
    NoPartitions(String),
    /// The broker did not answer in time.
    #[error("kafka did not ack within {0:?}")]
    Timeout(Duration),
    /// The input topics could not be read to their ends in time.
    #[error("the input topics could not be read to their end in {0:?}")]
    CatchUp(Duration),
    /// A client thread could not be started.
    #[error("starting a thread: {0}")]
    Thread(std::io::Error),
    /// No broker answered (unreachable, or refused by TLS or SASL).
    #[error("no Kafka broker at {brokers} answered within {within:?}: {why}")]
    Unreachable {
        /// The bootstrap servers.
        brokers: String,
        /// How long it was given.
        within: Duration,
        /// The last error librdkafka reported, in its words.
        why: String,
    },
}

/// How long a starting process waits for a broker to answer.
const REACH: Duration = Duration::from_secs(10);

/// Keeps the last errors librdkafka reported about its connections (a
/// broker refusing them, a TLS handshake failing), which it otherwise only
/// logs: a start that times out says why.
#[derive(Default)]
struct LastError(Mutex<Why>);

/// What librdkafka said last.
#[derive(Default)]
struct Why {
    /// Its last log line at error level: a connection's failure, with the
    /// reason (the TLS handshake's included).
    logged: Option<String>,
    /// Its last error event (often only "1/1 brokers are down").
    error: Option<String>,
}

impl rdkafka::ClientContext for LastError {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        tracing::debug!(?level, facility, message, "librdkafka");
        if (level as i32) <= RDKafkaLogLevel::Error as i32 {
            self.0.lock().expect("last error").logged = Some(message.to_string());
        }
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        tracing::debug!(%error, reason, "kafka client");
        self.0.lock().expect("last error").error = Some(reason.to_string());
    }
}

impl rdkafka::consumer::ConsumerContext for LastError {}

/// Waits until a client of `cfg` gets the cluster's metadata, within
/// [`REACH`]; if it does not, says why (librdkafka's last error). Blocking.
fn reach(cfg: &KafkaConfig) -> Result<(), KafkaError> {
    let probe: BaseConsumer<LastError> = cfg.client().create_with_context(LastError::default())?;
    let deadline = Instant::now() + REACH;
    loop {
        let Err(e) = probe.fetch_metadata(None, Duration::from_secs(1)) else {
            return Ok(());
        };
        // librdkafka's logs and errors wait in its queue until polled.
        for _ in 0..100 {
            if probe.poll(Duration::ZERO).is_none() {
                break;
            }
        }
        if Instant::now() >= deadline {
            let why = std::mem::take(&mut *probe.context().0.lock().expect("last error"));
            return Err(KafkaError::Unreachable {
                brokers: cfg.brokers.clone(),
                within: REACH,
                why: why.logged.or(why.error).unwrap_or_else(|| e.to_string()),
            });
        }
    }
}

/// Creates the topics that are missing, with the delete policy and the time
/// retention of `cfg` (and the checkpoint topic, compacted); returns their
/// names.
pub async fn ensure_topics(cfg: &KafkaConfig) -> Result<Topics, KafkaError> {
    let topics = cfg.topics();
    // A broker that cannot be reached (or whose certificate is not
    // trusted) fails the start within seconds, saying why, instead of an
    // admin request timing out after a minute.
    let probing = cfg.clone();
    tokio::task::spawn_blocking(move || reach(&probing))
        .await
        .map_err(|e| KafkaError::Thread(std::io::Error::other(e)))??;
    let admin: AdminClient<DefaultClientContext> = cfg.client().create()?;
    let names: Vec<&str> = topics
        .inputs()
        .into_iter()
        .chain(topics.outputs())
        .chain([topics.index.as_str()])
        .collect();
    let retention = cfg.retention.map(|r| r.as_millis().to_string());
    let mut new: Vec<NewTopic> = names
        .iter()
        .map(|n| {
            // Kafka's default, said explicitly: a broker may default
            // otherwise, and tansu applies `retention.ms` only to topics
            // whose configuration names the delete policy.
            let topic = NewTopic::new(n, cfg.partitions, TopicReplication::Fixed(cfg.replication))
                .set("cleanup.policy", "delete");
            match &retention {
                Some(ms) => topic.set("retention.ms", ms),
                None => topic,
            }
        })
        .collect();
    let checkpoints = super::checkpoints::topic(cfg);
    new.push(
        NewTopic::new(&checkpoints, 1, TopicReplication::Fixed(cfg.replication))
            .set("cleanup.policy", "compact"),
    );
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for result in admin.create_topics(&new, &opts).await? {
        match result {
            Ok(_) => {}
            Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => {
                return Err(KafkaError::Client(rdkafka::error::KafkaError::AdminOp(
                    code,
                )))
                .inspect_err(|_| tracing::error!(topic = name, "topic not created"));
            }
        }
    }
    Ok(topics)
}

/// Adds every partition of `topic` to `tpl`, to be read from its start,
/// and notes in `ends` where each one holding records ends now (its high
/// watermark): read up to there, a reader has caught up.
pub fn from_start(
    consumer: &BaseConsumer,
    topic: &str,
    tpl: &mut TopicPartitionList,
    ends: &mut HashMap<(String, i32), i64>,
) -> Result<(), KafkaError> {
    for p in 0..partitions(consumer, topic)? {
        tpl.add_partition_offset(topic, p, Offset::Beginning)?;
        let (_, high) = consumer.fetch_watermarks(topic, p, Duration::from_secs(10))?;
        if high > 0 {
            ends.insert((topic.to_string(), p), high);
        }
    }
    Ok(())
}

/// Partitions of `topic`, from the broker's metadata.
pub fn partitions(consumer: &BaseConsumer, topic: &str) -> Result<i32, KafkaError> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(5))?;
        let n = md
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .map_or(0, |t| t.partitions().len() as i32);
        if n > 0 {
            return Ok(n);
        }
        if Instant::now() > deadline {
            return Err(KafkaError::NoPartitions(topic.to_string()));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::producer::BaseProducer;

    #[test]
    fn a_managed_clusters_tls_and_sasl_settings_are_taken() {
        // No broker is needed to create a client: librdkafka checks the
        // settings then, and refuses SASL_SSL when built without TLS.
        let cfg = KafkaConfig::new("broker.example:9093")
            .options([
                "security.protocol=SASL_SSL",
                "sasl.mechanism=SCRAM-SHA-512",
                "sasl.username=grabflow",
                "sasl.password=secret",
                "ssl.endpoint.identification.algorithm=https",
                "compression.type=lz4",
            ])
            .unwrap();
        let producer: Result<BaseProducer, _> = cfg.producer().create();
        assert!(producer.is_ok(), "{:?}", producer.err());
        let consumer: Result<BaseConsumer, _> = cfg.consumer("g").create();
        assert!(consumer.is_ok(), "{:?}", consumer.err());
        // And an unknown setting is librdkafka's error, naming it.
        let bad = KafkaConfig::new("b:1")
            .options(["no.such.setting=1"])
            .unwrap();
        let e = bad
            .client()
            .create::<BaseConsumer>()
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("no.such.setting"), "{e}");
    }
}
