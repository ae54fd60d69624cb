//! The ledger: what a log knows of its own contents that appends are
//! checked against, kept by the same rules whichever log it is.
//!
//! - **Idempotency keys.** A request repeated with its key gets the first
//!   answer and appends nothing; the key on a different request is refused
//!   ([`KeyReused`](crate::keys::KeyReused)).
//! - **Known ids.** The orders and merchants the log holds, so ingress
//!   answers 404 for unknown ones.
//! - **One placement per order.** An append placing an order claims it
//!   before it is written, so of two placements racing the second is
//!   refused ([`LogError::OrderExists`]); the claim is given back if the
//!   append fails.
//!
//! A log calls [`Ledger::admit`] before writing, then [`Ledger::appended`]
//! or [`Ledger::failed`]; on start (and, for Kafka, while following what
//! other processes append) it calls [`Ledger::read_back`] for every event.

use crate::keys::{FirstUse, Keys, Print};
use crate::{Appended, LogError};
use grabflow_api::{EventKind, Id};
use std::collections::{HashMap, HashSet};

/// Ids the log holds, to answer 404 for unknown ones.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Known {
    /// Placed orders.
    pub orders: HashSet<Id>,
    /// Registered merchants.
    pub merchants: HashSet<Id>,
}

impl Known {
    /// Notes the ids `kind` introduces.
    fn note(&mut self, kind: &EventKind) {
        match kind {
            EventKind::OrderPlaced { order, .. } => {
                self.orders.insert(order.clone());
            }
            EventKind::MerchantUpserted { merchant, .. } => {
                self.merchants.insert(merchant.clone());
            }
            _ => {}
        }
    }
}

/// Idempotency keys and known ids of one log. Saved whole in a checkpoint
/// ([`Ledger::next`] says which events it holds).
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Ledger {
    keys: Keys,
    known: Known,
    /// Batches read back in part, by key: events read so far and their
    /// print (a batch's records may come from several Kafka partitions).
    reading: HashMap<String, (usize, Print)>,
    /// The offset after the last event it has taken in (embedded log).
    next: u64,
}

/// What the ledger says of an append before it is made.
#[derive(Debug)]
pub enum Admission {
    /// The key was used for this very request: its first answer, again.
    Repeat(Appended),
    /// A new append: write it, then report with the claim.
    Fresh(Claim),
}

/// What a fresh append holds until it is durable or has failed.
#[derive(Debug, Default)]
pub struct Claim {
    /// The request's key and print.
    key: Option<(String, Print)>,
    /// Orders it places, claimed.
    orders: Vec<Id>,
    /// Merchants it registers (known once durable).
    merchants: Vec<Id>,
}

impl Claim {
    /// The key this append carries, if any.
    pub fn key(&self) -> Option<&str> {
        self.key.as_ref().map(|(k, _)| k.as_str())
    }

    /// A key's first use: `answer`, for this claim's request.
    pub fn first_use(&self, answer: &Appended) -> Option<(String, FirstUse)> {
        self.key.as_ref().map(|(k, request)| {
            (
                k.clone(),
                FirstUse {
                    answer: answer.clone(),
                    request: *request,
                },
            )
        })
    }
}

impl Ledger {
    /// The offset after the last event taken in: a ledger restored from a
    /// checkpoint reads back only the events from there on.
    pub fn next(&self) -> u64 {
        self.next
    }

    /// Every event before `offset` is taken in (after a commit).
    pub fn taken_to(&mut self, offset: u64) {
        self.next = self.next.max(offset);
    }

    /// The ids the log holds.
    pub fn known(&self) -> &Known {
        &self.known
    }

    /// The first use of `key`, if it was used.
    pub fn key(&self, key: &str) -> Option<&FirstUse> {
        self.keys.get(key)
    }

    /// Admits an append of `events` with `key`: a repeat of a keyed
    /// request gets its first answer; a placement of an order placed
    /// already is refused; anything else is claimed.
    pub fn admit(
        &mut self,
        key: Option<&str>,
        events: &[(Id, EventKind)],
    ) -> Result<Admission, LogError> {
        let request = key.map(|_| Print::of(events.iter().map(|(_, k)| k)));
        if let (Some(k), Some(request)) = (key, request) {
            if let Some(first) = self.keys.get(k) {
                return Ok(Admission::Repeat(first.repeat(request)?));
            }
        }
        let mut claim = Claim {
            key: key.zip(request).map(|(k, r)| (k.to_string(), r)),
            ..Claim::default()
        };
        for (_, kind) in events {
            match kind {
                EventKind::OrderPlaced { order, .. } => {
                    if !self.known.orders.insert(order.clone()) {
                        self.failed(claim);
                        return Err(LogError::OrderExists(order.clone()));
                    }
                    claim.orders.push(order.clone());
                }
                EventKind::MerchantUpserted { merchant, .. } => {
                    claim.merchants.push(merchant.clone())
                }
                _ => {}
            }
        }
        Ok(Admission::Fresh(claim))
    }

    /// The append of `claim` is durable and was answered `answer`.
    pub fn appended(&mut self, claim: Claim, answer: &Appended) {
        if let Some((key, first)) = claim.first_use(answer) {
            self.keys.insert(key, first);
        }
        self.known.merchants.extend(claim.merchants);
    }

    /// The append of `claim` failed: nothing of it is acknowledged.
    pub fn failed(&mut self, claim: Claim) {
        for order in &claim.orders {
            self.known.orders.remove(order);
        }
    }

    /// Notes one event read back from the log: the ids it introduces and,
    /// with a `key`, that key's first answer (a single event's answer names
    /// its `id`: without one, the key is not noted). `batch` is how many events
    /// the append held when the log says (Kafka's batch header; 1 for a
    /// record on its own): the key's answer is then recorded once all are
    /// read, and a first use is kept. Without it (the embedded log, whose
    /// appends read back in order), the answer counts the key's events as
    /// they come: one is `One`, more a `Batch`.
    pub fn read_back(
        &mut self,
        key: Option<&str>,
        id: Option<&Id>,
        offset: u64,
        kind: &EventKind,
        batch: Option<usize>,
    ) {
        self.next = self.next.max(offset + 1);
        self.known.note(kind);
        let Some(key) = key else { return };
        match (batch, id) {
            (None, Some(id)) => {
                let (answer, mut request) = match self.keys.remove(key) {
                    Some(FirstUse {
                        answer: Appended::One { .. },
                        request,
                    }) => (Appended::Batch { accepted: 2 }, request),
                    Some(FirstUse {
                        answer: Appended::Batch { accepted },
                        request,
                    }) => (
                        Appended::Batch {
                            accepted: accepted + 1,
                        },
                        request,
                    ),
                    None => (
                        Appended::One {
                            event_id: id.clone(),
                            offset,
                        },
                        Print::default(),
                    ),
                };
                request.add(kind);
                self.keys
                    .insert(key.to_string(), FirstUse { answer, request });
            }
            (Some(1), Some(id)) => {
                let first = FirstUse {
                    answer: Appended::One {
                        event_id: id.clone(),
                        offset,
                    },
                    request: Print::of([kind]),
                };
                self.keys.entry(key.to_string()).or_insert(first);
            }
            (None | Some(1), None) => {}
            (Some(n), _) => {
                let (read, request) = self.reading.entry(key.to_string()).or_default();
                *read += 1;
                request.add(kind);
                if *read == n {
                    let request = *request;
                    self.reading.remove(key);
                    let first = FirstUse {
                        answer: Appended::Batch { accepted: n },
                        request,
                    };
                    self.keys.entry(key.to_string()).or_insert(first);
                }
            }
        }
    }
}
