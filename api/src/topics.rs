//! The Kafka vocabulary of production mode: topic names and record values.
//!
//! Input topics (what apps, ingress and other services produce):
//! - `{prefix}riders`: `location_pinged`, `shift_changed`, keyed by rider id;
//! - `{prefix}merchants`: `merchant_upserted`, keyed by merchant id;
//! - `{prefix}orders`: every order event (placed, cancelled, grab attempts,
//!   pick-up, delivery, compensation, redispatch, reassign), keyed by order id,
//!   so the grabs of one order are totally ordered in one partition.
//!
//! An input value is one JSON object: the event's fields with its `type` and
//! an optional `id` (see [`InputRecord`]). A record with **no value** is a
//! clock tick: the dataflow produces them into idle partitions so time moves
//! on. The record's Kafka timestamp is the event's time, made monotonic per
//! partition (`max(timestamp, previous time)`).
//!
//! Output topics (what the dataflow produces), each value an [`OutputRecord`]
//! (`seq`, `time` and the decision's fields), keyed by order id:
//! - `{prefix}offers`: offered, withdrawn, assigned, unassigned;
//! - `{prefix}grabs`: grab_decided;
//! - `{prefix}transitions`: transition, rejected.
//!
//! `seq` numbers all decisions of the log from 0 without gaps, so a consumer
//! of all three topics can put them back in decision order. `{prefix}index`
//! holds the rider index as upserts keyed by rider ([`IndexRecord`]).

use crate::{Coord, Event, EventKind, Id, Output, Time};
use serde::{Deserialize, Serialize};

/// The topic names under one prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Topics {
    /// Rider pings and shifts.
    pub riders: String,
    /// Merchant upserts.
    pub merchants: String,
    /// Order events and grab attempts.
    pub orders: String,
    /// Offers, withdrawals, assignments.
    pub offers: String,
    /// Grab results.
    pub grabs: String,
    /// Order transitions and rejections.
    pub transitions: String,
    /// The rider index, as upserts.
    pub index: String,
}

impl Topics {
    /// The topics named `{prefix}riders`, `{prefix}orders`, ….
    pub fn new(prefix: &str) -> Topics {
        Topics::with_outputs(prefix, prefix)
    }

    /// Inputs under `inputs`, outputs (decisions, index) under `outputs`: a
    /// second dataflow (a shadow run, a cluster check) reads the same log
    /// and writes elsewhere.
    pub fn with_outputs(inputs: &str, outputs: &str) -> Topics {
        let i = |name: &str| format!("{inputs}{name}");
        let o = |name: &str| format!("{outputs}{name}");
        Topics {
            riders: i("riders"),
            merchants: i("merchants"),
            orders: i("orders"),
            offers: o("offers"),
            grabs: o("grabs"),
            transitions: o("transitions"),
            index: o("index"),
        }
    }

    /// The input topics, in the order that numbers their partitions.
    pub fn inputs(&self) -> [&str; 3] {
        [&self.riders, &self.merchants, &self.orders]
    }

    /// The output topics of decisions.
    pub fn outputs(&self) -> [&str; 3] {
        [&self.offers, &self.grabs, &self.transitions]
    }

    /// The input topic an event kind goes to.
    pub fn input_for(&self, kind: &EventKind) -> &str {
        match kind {
            EventKind::LocationPinged { .. } | EventKind::ShiftChanged { .. } => &self.riders,
            EventKind::MerchantUpserted { .. } => &self.merchants,
            _ => &self.orders,
        }
    }

    /// The output topic of a decision.
    pub fn output_for(&self, output: &Output) -> &str {
        match output {
            Output::GrabDecided { .. } => &self.grabs,
            Output::Transition { .. } | Output::Rejected { .. } => &self.transitions,
            _ => &self.offers,
        }
    }
}

/// Input records number their partitions `topic * PARTITION_STRIDE + partition`.
pub const PARTITION_STRIDE: u64 = 1 << 12;
/// An event's [`Event::offset`] is `source << OFFSET_BITS | kafka offset`.
pub const OFFSET_BITS: u32 = 40;

/// The log position of a Kafka input record: orders same-millisecond events by
/// (topic, partition, offset), which is deterministic; grabs of one order share
/// a partition, so the first produced wins.
pub fn input_offset(topic: usize, partition: i32, offset: i64) -> u64 {
    let source = topic as u64 * PARTITION_STRIDE + partition as u64;
    (source << OFFSET_BITS) | (offset as u64 & ((1 << OFFSET_BITS) - 1))
}

/// Kafka's default partitioner (Java's `murmur2`, librdkafka's
/// `murmur2_random` for keyed records): the partition of `key` among
/// `partitions`. Ingress places input records by it (it must know an
/// order event's partition, to tick behind it), and the sink output
/// records; `tests/kafka.rs` checks it against librdkafka's own.
pub fn partition_for(key: &[u8], partitions: i32) -> i32 {
    let hash = murmur2::murmur2(key, murmur2::KAFKA_SEED) & 0x7fff_ffff;
    (hash % partitions.max(1) as u32) as i32
}

/// An input record's value: `{"id": "...", "type": "location_pinged", ...}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InputRecord {
    /// The event id (dedup key). When absent, the record's position
    /// (`k:{topic}:{partition}:{offset}`) is used: a redelivered record is
    /// then dropped, but a producer's retry that wrote it twice is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Id>,
    /// The event.
    #[serde(flatten)]
    pub kind: EventKind,
}

impl InputRecord {
    /// Reads a value, giving a record without id the one of its position.
    pub fn decode(
        value: &[u8],
        topic: usize,
        partition: i32,
        offset: i64,
        time: Time,
    ) -> Result<Event, DecodeError> {
        let r: InputRecord = serde_json::from_slice(value)?;
        let coord = match &r.kind {
            EventKind::MerchantUpserted { at, .. } | EventKind::LocationPinged { at, .. } => {
                Some(*at)
            }
            EventKind::OrderPlaced { dropoff, .. } => Some(*dropoff),
            _ => None,
        };
        if coord.is_some_and(|c| !c.is_valid()) {
            return Err(DecodeError::Coord);
        }
        let id = match r.id {
            Some(id) => id,
            None => {
                Id::new(&format!("k:{topic}:{partition}:{offset}")).expect("position ids are valid")
            }
        };
        Ok(Event {
            id,
            offset: input_offset(topic, partition, offset),
            time,
            kind: r.kind,
        })
    }
}

/// Why an input record was skipped.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Not JSON, or not an event.
    #[error("not an input event: {0}")]
    Json(#[from] serde_json::Error),
    /// A position outside ±90°/±180°.
    #[error("a position is out of range")]
    Coord,
}

/// A decision as it is on the output topics.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OutputRecord {
    /// Position among all decisions of the log, from 0, without gaps.
    pub seq: u64,
    /// Log time of the decision.
    pub time: Time,
    /// The decision (its `type` and fields).
    #[serde(flatten)]
    pub output: Output,
}

/// A rider's entry in the index, as on `{prefix}index` (keyed by rider).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct IndexRecord {
    /// The rider.
    pub rider: Id,
    /// Log time of the change.
    pub time: Time,
    /// H3 resolution-8 cell and position; absent when the rider left the index.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cell: Option<u64>,
    /// Position; absent when the rider left the index.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<Coord>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_go_where_kafkas_java_clients_put_them() {
        // Java's `Utils.murmur2` of each key (librdkafka's test vectors,
        // rdmurmur2.c): every tail length, and a key longer than a word.
        let java: [(&str, u32); 8] = [
            ("kafka", 0xd067_cf64),
            ("giberish123456789", 0x8f55_2b0c),
            ("1234", 0x9fc9_7b14),
            ("234", 0xe7c0_09ca),
            ("34", 0x8739_30da),
            ("4", 0x5a4b_5ca1),
            ("", 0x106e_08d9),
            ("PreAmbleWillBeRemoved,ThePrePartThatIs", 0x7842_4f1c),
        ];
        for (key, hash) in java {
            // Java's `toPositive`: the sign bit cleared, not negated.
            let positive = (hash & 0x7fff_ffff) as i32;
            assert_eq!(partition_for(key.as_bytes(), i32::MAX), positive % i32::MAX);
            assert_eq!(partition_for(key.as_bytes(), 7), positive % 7, "{key}");
        }
    }

    #[test]
    fn input_records_round_trip_and_default_their_id() {
        let v = br#"{"type":"location_pinged","rider":"r1","at":{"lat_e7":15,"lon_e7":25}}"#;
        let e = InputRecord::decode(v, 0, 3, 17, 99).unwrap();
        assert_eq!(e.id.as_str(), "k:0:3:17");
        assert_eq!(e.time, 99);
        assert_eq!(e.offset, input_offset(0, 3, 17));
        let rec = InputRecord {
            id: Some(Id::new("ev-1").unwrap()),
            kind: e.kind.clone(),
        };
        let bytes = serde_json::to_vec(&rec).unwrap();
        assert_eq!(
            InputRecord::decode(&bytes, 0, 3, 17, 99)
                .unwrap()
                .id
                .as_str(),
            "ev-1"
        );
        assert!(InputRecord::decode(br#"{"type":"nope"}"#, 0, 0, 0, 0).is_err());
        let far =
            br#"{"type":"location_pinged","rider":"r1","at":{"lat_e7":910000000,"lon_e7":0}}"#;
        assert!(matches!(
            InputRecord::decode(far, 0, 0, 0, 0),
            Err(DecodeError::Coord)
        ));
        assert!(input_offset(0, 1, 0) > input_offset(0, 0, 1 << 30));
        assert!(input_offset(2, 0, 0) > input_offset(1, 4000, 0));
    }

    #[test]
    fn output_records_carry_seq_and_time_beside_the_decision() {
        let o = Output::Assigned {
            order: Id::new("o1").unwrap(),
            rider: Id::new("r1").unwrap(),
        };
        let rec = OutputRecord {
            seq: 7,
            time: 42,
            output: o,
        };
        let text = serde_json::to_string(&rec).unwrap();
        assert!(text.contains(r#""seq":7"#) && text.contains(r#""type":"assigned""#));
        assert_eq!(serde_json::from_str::<OutputRecord>(&text).unwrap(), rec);
    }
}
