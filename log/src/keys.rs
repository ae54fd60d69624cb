//! Idempotency keys: what each key was first used for, and the answer it got.
//!
//! A repeat of a request with its key gets the first answer and appends
//! nothing. The same key on a different request (another path, another
//! body) is a client's mistake: answering it with the first answer would
//! acknowledge an event that is never appended, so it is refused instead
//! ([`KeyReused`], a 422 naming `Idempotency-Key`).
//!
//! A key is remembered for the idempotency window after its first use (log
//! time, see [`crate::ledger`]); used again later, it is a new request.

use crate::Appended;
use grabflow_api::EventKind;
use std::collections::HashMap;
use std::hash::{DefaultHasher, Hasher};

/// A print of a request's events: their contents, not the ids or times the
/// server gives them. A sum over the events, so the order they are read back
/// in (from several Kafka partitions) does not change it. Computed afresh on
/// every start, kept in checkpoints
/// only with [`Print::probe`], to tell a build that prints differently.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Print(u64);

impl Print {
    /// The print of a request made of `kinds`.
    pub fn of<'a>(kinds: impl IntoIterator<Item = &'a EventKind>) -> Print {
        let mut print = Print::default();
        for kind in kinds {
            print.add(kind);
        }
        print
    }

    /// The print of a fixed request: a checkpoint keeps it, and prints kept
    /// by a build that prints differently are not trusted.
    pub fn probe() -> Print {
        let id = grabflow_api::Id::new("probe").expect("a valid id");
        Print::of([&EventKind::OrderCancelled { order: id }])
    }

    /// Adds one more event of the same request.
    pub fn add(&mut self, kind: &EventKind) {
        let bytes = postcard::to_allocvec(kind).expect("events serialize");
        let mut h = DefaultHasher::new();
        h.write(&bytes);
        self.0 = self.0.wrapping_add(h.finish());
    }
}

/// A key's first use: the answer it got, the print of its request, and
/// when.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FirstUse {
    /// What the first request was answered.
    pub answer: Appended,
    /// Its events' print.
    pub request: Print,
    /// Its log time: the key is forgotten the idempotency window after.
    pub at: grabflow_api::Time,
}

/// Keys seen, by key.
pub type Keys = HashMap<String, FirstUse>;

/// The key was first used for a different request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("this Idempotency-Key was first used for a different request")]
pub struct KeyReused;

impl FirstUse {
    /// The answer to a repeat whose request prints as `request`.
    pub fn repeat(&self, request: Print) -> Result<Appended, KeyReused> {
        if request == self.request {
            Ok(self.answer.clone())
        } else {
            Err(KeyReused)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use grabflow_api::{Coord, Id};

    fn ping(rider: &str, lat: f64) -> EventKind {
        EventKind::LocationPinged {
            rider: Id::new(rider).unwrap(),
            at: Coord::from_degrees(lat, 121.0).unwrap(),
        }
    }

    #[test]
    fn a_print_is_of_the_contents_in_any_order() {
        let (a, b) = (ping("r1", 31.0), ping("r2", 31.0));
        assert_eq!(Print::of([&a, &b]), Print::of([&b, &a]));
        assert_ne!(Print::of([&a]), Print::of([&b]));
        assert_ne!(Print::of([&a]), Print::of([&ping("r1", 31.5)]));
        assert_ne!(Print::of([&a]), Print::of([&a, &a]));
        let first = FirstUse {
            answer: Appended::Batch { accepted: 2 },
            request: Print::of([&a, &b]),
            at: 0,
        };
        assert_eq!(
            first.repeat(Print::of([&b, &a])),
            Ok(Appended::Batch { accepted: 2 })
        );
        assert_eq!(first.repeat(Print::of([&a])), Err(KeyReused));
    }
}
