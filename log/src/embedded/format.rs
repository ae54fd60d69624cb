//! The file's format: framing and the forms of a record.
//!
//! Each record is `[len: u32 LE][crc32: u32 LE][payload]`, and holds one
//! append (a single event or a whole batch): `0x03` and, in postcard, the
//! key and time its events share, the first event's offset, their ids and
//! their kinds. Since 0.12 the checksum covers the length as well as the
//! payload (form `0x03`), so a damaged length cannot frame other bytes as
//! a record; records of form `0x02` (0.7 to 0.11), whose checksum covers
//! the payload alone, are still read. A batch's ids are
//! stored as the batch id alone when they are its items (`{batch}.{i}`, see
//! `Id::item`), so a batched ping costs ~18 bytes. Older forms are still
//! read: `0x01` and one event in postcard (0.6), or a JSON object (before
//! 0.6).

use grabflow_api::event::{BinaryKind, BinaryKindRef};
use grabflow_api::{Event, Id, Time};
use serde::ser::{SerializeTupleStruct, Serializer};
use serde::{Deserialize, Serialize};

/// One stored event, as read back. Deserializing it reads the JSON form of
/// logs written before 0.6; records are written in the binary form only.
#[derive(Clone, Debug, Deserialize)]
pub struct Record {
    /// The client's `Idempotency-Key`, if it sent one.
    #[serde(default)]
    pub key: Option<String>,
    /// The event, with its offset and time.
    pub event: Event,
}

/// The first byte of a 0.6 payload: one event (a JSON one starts with `{`).
pub(crate) const BINARY: u8 = 1;

/// The first byte of an append's payload, as written from 0.7 to 0.11
/// (checksum of the payload alone).
pub(crate) const APPEND: u8 = 2;

/// The first byte of an append's payload, as written since 0.12 (the
/// checksum covers the length too).
pub(crate) const APPEND_SEALED: u8 = 3;

/// A 0.6 record: the key and the event.
#[derive(Deserialize)]
struct BinaryRecord(Option<String>, Event);

/// An append as stored: the key and time its events share, the first
/// event's offset, their ids and their kinds.
#[derive(Deserialize)]
struct AppendRecord(Option<String>, Time, u64, Ids, Vec<BinaryKind>);

/// The ids of an append's events: each one, or the batch they are items of.
#[derive(Deserialize)]
enum Ids {
    Each(Vec<Id>),
    Items(Id),
}

/// An [`AppendRecord`] by reference: `events` (one append's, so sharing a
/// time and consecutive offsets) and their key, written without copies.
pub(crate) struct AppendRecordRef<'a> {
    pub(crate) key: Option<&'a str>,
    pub(crate) events: &'a [Event],
}

impl Serialize for AppendRecordRef<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let (time, offset) = self.events.first().map_or((0, 0), |e| (e.time, e.offset));
        let mut t = s.serialize_tuple_struct("AppendRecord", 5)?;
        t.serialize_field(&self.key)?;
        t.serialize_field(&time)?;
        t.serialize_field(&offset)?;
        t.serialize_field(&IdsRef(self.events))?;
        t.serialize_field(&KindsRef(self.events))?;
        t.end()
    }
}

/// The ids of `events`, as [`Ids`]: the batch alone when they are its items.
struct IdsRef<'a>(&'a [Event]);

impl Serialize for IdsRef<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let batch = match self.0 {
            [first, _, ..] => first.id.batch_of(0).filter(|&b| {
                self.0
                    .iter()
                    .enumerate()
                    .all(|(i, e)| e.id.batch_of(i) == Some(b))
            }),
            _ => None,
        };
        match batch {
            Some(batch) => s.serialize_newtype_variant("Ids", 1, "Items", batch),
            None => s.serialize_newtype_variant("Ids", 0, "Each", &EachRef(self.0)),
        }
    }
}

/// The ids of `events`, one by one.
struct EachRef<'a>(&'a [Event]);

impl Serialize for EachRef<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter().map(|e| &e.id))
    }
}

/// The kinds of `events`, in the binary form.
struct KindsRef<'a>(&'a [Event]);

impl Serialize for KindsRef<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter().map(|e| BinaryKindRef(&e.kind)))
    }
}

/// Appends the events of the record in `payload` (any form) to `out`;
/// `false` (and nothing appended) if it is not a whole one.
pub(crate) fn decode(payload: &[u8], out: &mut Vec<Record>) -> bool {
    let Some((&first, rest)) = payload.split_first() else {
        return false;
    };
    let records = match first {
        APPEND | APPEND_SEALED => decode_append(rest),
        BINARY => match postcard::take_from_bytes::<BinaryRecord>(rest) {
            Ok((BinaryRecord(key, event), [])) => Some(vec![Record { key, event }]),
            _ => None,
        },
        b'{' => serde_json::from_slice(payload).ok().map(|r| vec![r]),
        _ => None,
    };
    records.map(|r| out.extend(r)).is_some()
}

/// The offset of the first event of the record in `payload`, read from
/// its head alone (without decoding its events); `None` for the forms
/// before 0.7, which are decoded whole.
pub(crate) fn first_offset(payload: &[u8]) -> Option<u64> {
    match payload.split_first()? {
        (&(APPEND | APPEND_SEALED), rest) => {
            let ((_key, _time, first), _) =
                postcard::take_from_bytes::<(Option<&str>, Time, u64)>(rest).ok()?;
            Some(first)
        }
        _ => None,
    }
}

/// The events of an [`AppendRecord`].
fn decode_append(bytes: &[u8]) -> Option<Vec<Record>> {
    let (AppendRecord(key, time, first, ids, kinds), []) = postcard::take_from_bytes(bytes).ok()?
    else {
        return None;
    };
    let ids = match ids {
        Ids::Each(ids) => ids,
        Ids::Items(batch) => (0..kinds.len())
            .map(|i| batch.item(i))
            .collect::<Option<_>>()?,
    };
    if ids.len() != kinds.len() || kinds.is_empty() {
        return None;
    }
    let events = ids.into_iter().zip(kinds).zip(first..);
    Some(
        events
            .map(|((id, BinaryKind(kind)), offset)| Record {
                key: key.clone(),
                event: Event {
                    id,
                    offset,
                    time,
                    kind,
                },
            })
            .collect(),
    )
}

/// Appends `record` to `out` in the log's framing, serialized in place.
pub(crate) fn encode(record: &AppendRecordRef<'_>, out: &mut Vec<u8>) {
    let head = out.len();
    out.extend_from_slice(&[0; 8]);
    out.push(APPEND_SEALED);
    *out = postcard::to_extend(record, std::mem::take(out)).expect("records serialize");
    let header = frame_header(&out[head + 8..]);
    out[head..head + 8].copy_from_slice(&header);
}

/// The framing before `payload`: its length and its checksum (of the
/// length and the payload when the payload is of form
/// [`APPEND_SEALED`], else of the payload alone), little-endian.
pub(crate) fn frame_header(payload: &[u8]) -> [u8; 8] {
    let len = (payload.len() as u32).to_le_bytes();
    let mut header = [0; 8];
    header[..4].copy_from_slice(&len);
    header[4..].copy_from_slice(&checksum(&len, payload).to_le_bytes());
    header
}

/// The checksum a record's header carries for `payload` of length `len`.
fn checksum(len: &[u8; 4], payload: &[u8]) -> u32 {
    if payload.first() == Some(&APPEND_SEALED) {
        let mut h = crc32fast::Hasher::new();
        h.update(len);
        h.update(payload);
        h.finalize()
    } else {
        crc32fast::hash(payload)
    }
}

/// The payload of the record framed at the start of `bytes`, if it is
/// there whole with its checksum right (its contents are not decoded).
pub(crate) fn framed(bytes: &[u8]) -> Option<&[u8]> {
    let len: [u8; 4] = bytes.get(..4)?.try_into().ok()?;
    let crc = u32::from_le_bytes(bytes.get(4..8)?.try_into().ok()?);
    let n = u32::from_le_bytes(len) as usize;
    let payload = bytes.get(8..8usize.checked_add(n)?)?;
    (n > 0 && checksum(&len, payload) == crc).then_some(payload)
}
