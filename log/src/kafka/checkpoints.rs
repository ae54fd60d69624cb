//! Checkpoints kept in the cluster, so that a dataflow process started on
//! a fresh machine resumes from the latest one instead of offset 0 (as
//! Kafka Streams keeps its stores in changelog topics).
//!
//! The topic `{outputs}checkpoints` has one partition and is compacted. A
//! checkpoint is written as chunks of at most [`CHUNK`] bytes, keyed
//! `a/NNNNNN` or `b/NNNNNN` (the two slots are used in turn, so writing one
//! never overwrites the chunks of the latest), then, once every chunk is
//! acked, a manifest keyed `manifest`: its log time, slot, chunk count,
//! length and CRC32. Compaction keeps the latest record of each key: the
//! latest manifest and both slots' chunks. Each chunk carries its
//! checkpoint's time in a header, so chunks left by a write that did not
//! finish are never taken for the manifest's.
//!
//! Reading ([`KafkaCheckpoints::open`]) reads the topic to its end and
//! tries the manifests newest first: one whose chunks are not all there or
//! whose checksum fails is skipped, loudly, for the one before.

use super::config::{KafkaConfig, KafkaError};
use grabflow_api::Time;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The largest chunk of a checkpoint, bytes (under the 1 MB record limit
/// brokers have by default).
pub const CHUNK: usize = 512 * 1024;
/// The format version of the manifest.
pub const VERSION: u32 = 1;
/// The header naming a chunk's checkpoint (its log time, in decimal).
const AT_HEADER: &str = "grabflow-checkpoint";
/// The manifest's key.
const MANIFEST: &str = "manifest";
/// How long a write waits for the broker's acks.
const ACK_WAIT: Duration = Duration::from_secs(30);

/// What says a checkpoint is whole: written after all its chunks.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Manifest {
    version: u32,
    at: Time,
    slot: u8,
    chunks: u32,
    len: u64,
    crc: u32,
}

/// Counts records the broker refused.
struct Refusals(AtomicU64);

impl ClientContext for Refusals {}

impl ProducerContext for Refusals {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &rdkafka::message::DeliveryResult<'_>, _: ()) {
        if let Err((e, _)) = result {
            tracing::warn!(error = %e, "a checkpoint record was not delivered");
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A checkpoint written to the topic.
#[derive(Clone, Debug)]
pub struct Written {
    /// Its size, bytes.
    pub bytes: u64,
    /// The log time it is as of.
    pub at: Time,
    /// Records it took (chunks and the manifest).
    pub records: u32,
}

/// The checkpoints of one dataflow (its output prefix) in the cluster.
pub struct KafkaCheckpoints {
    topic: String,
    producer: ThreadedProducer<Refusals>,
    /// The slot the next checkpoint goes to.
    slot: u8,
}

/// The checkpoint topic's name for `cfg`.
pub fn topic(cfg: &KafkaConfig) -> String {
    format!("{}checkpoints", cfg.outputs())
}

fn slot_name(slot: u8) -> char {
    if slot == 0 {
        'a'
    } else {
        'b'
    }
}

impl KafkaCheckpoints {
    /// Reads the checkpoint topic to its end; returns the store and the
    /// newest checkpoint whose body `decode` accepts, with its time. A
    /// checkpoint that is not whole, or that `decode` refuses, is skipped
    /// with an error logged. Blocking.
    pub fn open<T>(
        cfg: &KafkaConfig,
        decode: impl Fn(&[u8]) -> Result<T, String>,
    ) -> Result<(KafkaCheckpoints, Option<(Time, T)>), KafkaError> {
        let topic = topic(cfg);
        let (manifests, chunks) = read_all(cfg, &topic)?;
        let mut found = None;
        for m in manifests.iter().rev() {
            match assemble(m, &chunks).and_then(|body| decode(&body)) {
                Ok(state) => {
                    found = Some((m.at, state));
                    break;
                }
                Err(why) => tracing::error!(
                    topic,
                    at = m.at,
                    "skipping a checkpoint in the cluster (using the one before): {why}"
                ),
            }
        }
        let producer = cfg
            .producer()
            .set("message.max.bytes", (CHUNK + 64 * 1024).to_string())
            .create_with_context(Refusals(AtomicU64::new(0)))?;
        // The latest manifest's slot is kept; the next write takes the other.
        let latest_slot = manifests.last().map_or(1, |m| m.slot);
        let store = KafkaCheckpoints {
            topic,
            producer,
            slot: 1 - latest_slot.min(1),
        };
        Ok((store, found))
    }

    /// Writes `body` as the checkpoint as of `at`: its chunks, then (once
    /// they are acked) its manifest. Blocking.
    pub fn write(&mut self, at: Time, body: &[u8]) -> Result<Written, KafkaError> {
        let slot = self.slot;
        let refused = self.producer.context().0.load(Ordering::Relaxed);
        let stamp = at.to_string();
        let chunks: Vec<&[u8]> = body.chunks(CHUNK).collect();
        for (i, chunk) in chunks.iter().enumerate() {
            let key = format!("{}/{i:06}", slot_name(slot));
            let headers = OwnedHeaders::new().insert(Header {
                key: AT_HEADER,
                value: Some(stamp.as_bytes()),
            });
            self.send(
                BaseRecord::to(&self.topic)
                    .partition(0)
                    .key(key.as_bytes())
                    .payload(*chunk)
                    .headers(headers),
            )?;
        }
        self.acked(refused)?;
        let manifest = Manifest {
            version: VERSION,
            at,
            slot,
            chunks: chunks.len() as u32,
            len: body.len() as u64,
            crc: crc32fast::hash(body),
        };
        let value = serde_json::to_vec(&manifest).expect("the manifest serializes");
        self.send(
            BaseRecord::to(&self.topic)
                .partition(0)
                .key(MANIFEST.as_bytes())
                .payload(&value),
        )?;
        self.acked(refused)?;
        self.slot = 1 - slot;
        Ok(Written {
            bytes: body.len() as u64,
            at,
            records: chunks.len() as u32 + 1,
        })
    }

    /// Queues `record`, waiting while the producer's queue is full.
    fn send(&self, mut record: BaseRecord<'_, [u8], [u8]>) -> Result<(), KafkaError> {
        let deadline = Instant::now() + ACK_WAIT;
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((e, r)) if Instant::now() > deadline => {
                    drop(r);
                    return Err(KafkaError::Client(e));
                }
                Err((_, r)) => {
                    record = r;
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }

    /// Waits for every record sent to be acked, none refused since `refused`.
    fn acked(&self, refused: u64) -> Result<(), KafkaError> {
        self.producer
            .flush(ACK_WAIT)
            .map_err(|_| KafkaError::Timeout(ACK_WAIT))?;
        if self.producer.context().0.load(Ordering::Relaxed) != refused {
            return Err(KafkaError::Timeout(ACK_WAIT));
        }
        Ok(())
    }
}

/// Every manifest in the topic, oldest first, and the latest chunk of each
/// key (with its checkpoint's time).
type Read = (Vec<Manifest>, HashMap<String, (Time, Vec<u8>)>);

/// Reads the whole checkpoint topic, up to where it ends now.
fn read_all(cfg: &KafkaConfig, topic: &str) -> Result<Read, KafkaError> {
    let consumer: BaseConsumer = cfg
        .consumer(&format!("{}checkpoints", cfg.outputs()))
        .set("fetch.max.bytes", (4 * CHUNK).to_string())
        .set("max.partition.fetch.bytes", (2 * CHUNK).to_string())
        .create()?;
    let (low, high) = consumer.fetch_watermarks(topic, 0, Duration::from_secs(10))?;
    let (mut manifests, mut chunks) = (Vec::new(), HashMap::new());
    if high <= low {
        return Ok((manifests, chunks));
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning)?;
    consumer.assign(&tpl)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut next = low;
    while next < high {
        if Instant::now() > deadline {
            return Err(KafkaError::CatchUp(Duration::from_secs(60)));
        }
        let m = match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => m,
            Some(Err(e)) => {
                tracing::debug!(error = %e, "reading checkpoints");
                continue;
            }
            None => continue,
        };
        next = m.offset() + 1;
        let key = m.key().map(String::from_utf8_lossy).unwrap_or_default();
        let Some(value) = m.payload() else { continue };
        if key == MANIFEST {
            match serde_json::from_slice::<Manifest>(value) {
                Ok(manifest) if manifest.version == VERSION => manifests.push(manifest),
                Ok(manifest) => tracing::error!(
                    version = manifest.version,
                    "a checkpoint manifest of another format version (skipped)"
                ),
                Err(e) => tracing::error!(error = %e, "a checkpoint manifest that does not decode"),
            }
            // Only the newest few are ever tried.
            if manifests.len() > 4 {
                manifests.remove(0);
            }
            continue;
        }
        let at = m
            .headers()
            .and_then(|h| h.iter().find(|h| h.key == AT_HEADER))
            .and_then(|h| h.value)
            .and_then(|v| std::str::from_utf8(v).ok()?.parse::<Time>().ok());
        if let Some(at) = at {
            chunks.insert(key.into_owned(), (at, value.to_vec()));
        }
    }
    Ok((manifests, chunks))
}

/// The body `m` describes, from `chunks`, if whole and intact.
fn assemble(m: &Manifest, chunks: &HashMap<String, (Time, Vec<u8>)>) -> Result<Vec<u8>, String> {
    let mut body = Vec::with_capacity(m.len as usize);
    for i in 0..m.chunks {
        let key = format!("{}/{i:06}", slot_name(m.slot));
        match chunks.get(&key) {
            Some((at, bytes)) if *at == m.at => body.extend_from_slice(bytes),
            Some((at, _)) => return Err(format!("chunk {key} is of the checkpoint at {at}")),
            None => return Err(format!("chunk {key} is missing")),
        }
    }
    if body.len() as u64 != m.len || crc32fast::hash(&body) != m.crc {
        return Err("its checksum does not match".into());
    }
    Ok(body)
}
