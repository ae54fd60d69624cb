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
//!
//! **Retention** (log time, so a ledger rebuilt from the log, or restored
//! from a checkpoint and read on, is the same): a key is forgotten the
//! idempotency window after its first use, and reused later is a new
//! request; an order or merchant id is forgotten the known window
//! (`--history-retention`) after its last mention, so the ledger holds
//! what the last window mentioned, not the whole history. Look-ups treat
//! what is past its window as gone; the maps are swept of it every
//! quarter of the shorter window.

use crate::keys::{FirstUse, Keys, Print};
use crate::{Appended, LogError};
use grabflow_api::{EventKind, Id, Time};
use std::collections::HashMap;

/// Ids the log holds, to answer 404 for unknown ones, with the log time
/// of their last mention.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Known {
    /// Placed orders (mentioned by any event on them).
    pub orders: HashMap<Id, Time>,
    /// Registered merchants (mentioned by an upsert or an order there).
    pub merchants: HashMap<Id, Time>,
}

impl Known {
    /// Notes the ids `kind` introduces or mentions, at log time `at`.
    fn note(&mut self, kind: &EventKind, at: Time) {
        match kind {
            EventKind::OrderPlaced {
                order, merchant, ..
            } => {
                self.orders.insert(order.clone(), at);
                self.mention_merchant(merchant, at);
            }
            EventKind::MerchantUpserted { merchant, .. } => {
                self.merchants.insert(merchant.clone(), at);
            }
            kind => {
                if let Some(order) = kind.order() {
                    if let Some(last) = self.orders.get_mut(order) {
                        *last = (*last).max(at);
                    }
                }
            }
        }
    }

    /// A later mention of a merchant it holds.
    fn mention_merchant(&mut self, merchant: &Id, at: Time) {
        if let Some(last) = self.merchants.get_mut(merchant) {
            *last = (*last).max(at);
        }
    }
}

/// How long the ledger remembers, ms of log time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Windows {
    /// A key, after its first use.
    pub keys: Time,
    /// An order or merchant id, after its last mention.
    pub known: Time,
}

impl Default for Windows {
    /// 24 h for keys, 7 days for ids.
    fn default() -> Windows {
        Windows {
            keys: 24 * 60 * 60 * 1000,
            known: 7 * 24 * 60 * 60 * 1000,
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
    /// The newest log time it has taken in.
    now: Time,
    /// Log time of the last sweep of expired keys and ids.
    swept: Time,
    /// How long it remembers: settings, not state (set after a restore).
    #[serde(skip)]
    windows: Windows,
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
    /// Its events, for the ids they mention once durable.
    mentions: Vec<EventKind>,
    /// The log time it is admitted at.
    at: Time,
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
                    at: self.at,
                },
            )
        })
    }
}

impl Ledger {
    /// An empty ledger remembering for `windows`.
    pub fn new(windows: Windows) -> Ledger {
        Ledger {
            windows,
            ..Ledger::default()
        }
    }

    /// Remembers for `windows` from now on (a ledger restored from a
    /// checkpoint gets its settings here).
    pub fn set_windows(&mut self, windows: Windows) {
        self.windows = windows;
    }

    /// The newest log time taken in.
    pub fn now(&self) -> Time {
        self.now
    }

    /// Whether order `id` was placed and mentioned within the window.
    pub fn knows_order(&self, id: &Id) -> bool {
        self.live(self.known.orders.get(id))
    }

    /// Whether merchant `id` was registered and mentioned within the window.
    pub fn knows_merchant(&self, id: &Id) -> bool {
        self.live(self.known.merchants.get(id))
    }

    fn live(&self, last: Option<&Time>) -> bool {
        last.is_some_and(|t| t + self.windows.known > self.now)
    }

    /// The first use of `key` within the window, if any.
    fn live_key(&self, key: &str) -> Option<&FirstUse> {
        self.keys
            .get(key)
            .filter(|f| f.at + self.windows.keys > self.now)
    }

    /// Log time `at` has come: what is past its window is swept, every
    /// quarter of the shorter window.
    fn advance(&mut self, at: Time) {
        self.now = self.now.max(at);
        let every = (self.windows.keys.min(self.windows.known) / 4).max(1);
        if self.now < self.swept + every {
            return;
        }
        self.swept = self.now;
        let (now, w) = (self.now, self.windows);
        self.keys.retain(|_, f| f.at + w.keys > now);
        self.known.orders.retain(|_, t| *t + w.known > now);
        self.known.merchants.retain(|_, t| *t + w.known > now);
    }

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

    /// The first use of `key`, if it was used within the window.
    pub fn key(&self, key: &str) -> Option<&FirstUse> {
        self.live_key(key)
    }

    /// Admits an append of `events` with `key`, to be made at log time
    /// `at`: a repeat of a keyed request within the window gets its first
    /// answer; a placement of an order placed already (and mentioned within
    /// the window) is refused; anything else is claimed.
    pub fn admit(
        &mut self,
        key: Option<&str>,
        events: &[(Id, EventKind)],
        at: Time,
    ) -> Result<Admission, LogError> {
        self.advance(at);
        let request = key.map(|_| Print::of(events.iter().map(|(_, k)| k)));
        if let (Some(k), Some(request)) = (key, request) {
            if let Some(first) = self.live_key(k) {
                return Ok(Admission::Repeat(first.repeat(request)?));
            }
        }
        let mut claim = Claim {
            key: key.zip(request).map(|(k, r)| (k.to_string(), r)),
            at,
            ..Claim::default()
        };
        for (_, kind) in events {
            match kind {
                EventKind::OrderPlaced { order, .. } => {
                    if self.knows_order(order) || claim.orders.contains(order) {
                        self.failed(claim);
                        return Err(LogError::OrderExists(order.clone()));
                    }
                    self.known.orders.insert(order.clone(), at);
                    claim.orders.push(order.clone());
                }
                EventKind::MerchantUpserted { merchant, .. } => {
                    claim.merchants.push(merchant.clone())
                }
                _ => {}
            }
            claim.mentions.push(kind.clone());
        }
        Ok(Admission::Fresh(claim))
    }

    /// The append of `claim` is durable and was answered `answer`.
    pub fn appended(&mut self, claim: Claim, answer: &Appended) {
        if let Some((key, first)) = claim.first_use(answer) {
            self.keys.insert(key, first);
        }
        for merchant in &claim.merchants {
            self.known.merchants.insert(merchant.clone(), claim.at);
        }
        for kind in &claim.mentions {
            self.known.note(kind, claim.at);
        }
    }

    /// The append of `claim` failed: nothing of it is acknowledged.
    pub fn failed(&mut self, claim: Claim) {
        for order in &claim.orders {
            if self.known.orders.get(order) == Some(&claim.at) {
                self.known.orders.remove(order);
            }
        }
    }

    /// Notes one event read back from the log, made at log time `at`: the
    /// ids it introduces or mentions and,
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
        at: Time,
    ) {
        self.advance(at);
        self.next = self.next.max(offset + 1);
        self.known.note(kind, at);
        let Some(key) = key else { return };
        // A first use past its window is forgotten: this use is a new one.
        if self.keys.contains_key(key) && self.live_key(key).is_none() {
            self.keys.remove(key);
        }
        match (batch, id) {
            (None, Some(id)) => {
                let (answer, mut request, first_at) = match self.keys.remove(key) {
                    Some(FirstUse {
                        answer: Appended::One { .. },
                        request,
                        at: first,
                    }) => (Appended::Batch { accepted: 2 }, request, first),
                    Some(FirstUse {
                        answer: Appended::Batch { accepted },
                        request,
                        at: first,
                    }) => (
                        Appended::Batch {
                            accepted: accepted + 1,
                        },
                        request,
                        first,
                    ),
                    None => (
                        Appended::One {
                            event_id: id.clone(),
                            offset,
                        },
                        Print::default(),
                        at,
                    ),
                };
                request.add(kind);
                let first = FirstUse {
                    answer,
                    request,
                    at: first_at,
                };
                self.keys.insert(key.to_string(), first);
            }
            (Some(1), Some(id)) => {
                let first = FirstUse {
                    answer: Appended::One {
                        event_id: id.clone(),
                        offset,
                    },
                    request: Print::of([kind]),
                    at,
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
                        at,
                    };
                    self.keys.entry(key.to_string()).or_insert(first);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use grabflow_api::Coord;

    fn id(s: &str) -> Id {
        Id::new(s).unwrap()
    }

    fn place(order: &str) -> (Id, EventKind) {
        let kind = EventKind::OrderPlaced {
            order: id(order),
            merchant: id("m1"),
            dropoff: Coord::from_degrees(31.0, 121.0).unwrap(),
            promised_minutes: 30,
        };
        (id(&format!("e-{order}")), kind)
    }

    fn cancel(order: &str) -> (Id, EventKind) {
        let kind = EventKind::OrderCancelled { order: id(order) };
        (id(&format!("c-{order}")), kind)
    }

    /// Admits and appends `events` with `key` at `at`, as a log does.
    fn append(l: &mut Ledger, key: Option<&str>, events: &[(Id, EventKind)], at: Time) -> Appended {
        match l.admit(key, events, at).unwrap() {
            Admission::Repeat(answer) => answer,
            Admission::Fresh(claim) => {
                let answer = Appended::One {
                    event_id: events[0].0.clone(),
                    offset: at,
                };
                l.appended(claim, &answer);
                answer
            }
        }
    }

    const WINDOWS: Windows = Windows {
        keys: 1_000,
        known: 5_000,
    };

    #[test]
    fn a_key_is_a_repeat_within_its_window_and_a_new_request_after() {
        let mut l = Ledger::new(WINDOWS);
        let first = append(&mut l, Some("k"), &[place("o1")], 10_000);
        assert_eq!(append(&mut l, Some("k"), &[place("o1")], 10_999), first);
        // Past the window the key is forgotten: the same request is new
        // (and refused as a second placement, which the ledger still knows).
        assert!(matches!(
            l.admit(Some("k"), &[place("o1")], 11_000),
            Err(LogError::OrderExists(_))
        ));
        let again = append(&mut l, Some("k"), &[cancel("o1")], 11_000);
        assert_ne!(again, first);
        assert_eq!(l.key("k").map(|f| f.at), Some(11_000));
    }

    #[test]
    fn ids_are_forgotten_a_window_after_their_last_mention_and_swept() {
        let mut l = Ledger::new(WINDOWS);
        append(&mut l, None, &[place("o1")], 10_000);
        append(&mut l, None, &[place("o2")], 10_000);
        // o1 is mentioned later, o2 is not.
        append(&mut l, None, &[cancel("o1")], 13_000);
        l.advance(15_000);
        assert!(l.knows_order(&id("o1")));
        assert!(!l.knows_order(&id("o2")), "o2's last mention is 5 s old");
        assert_eq!(l.known.orders.len(), 1, "o2 is swept from the map");
        l.advance(18_000);
        assert!(!l.knows_order(&id("o1")));
        assert!(l.known.orders.is_empty() && l.keys.is_empty());
        // Forgotten, an order id may be placed again.
        append(&mut l, None, &[place("o2")], 18_000);
        assert!(l.knows_order(&id("o2")));
    }

    #[test]
    fn a_ledger_read_back_equals_the_one_that_appended() {
        let mut appending = Ledger::new(WINDOWS);
        let mut reading = Ledger::new(WINDOWS);
        let log: Vec<(Option<&str>, (Id, EventKind), Time)> = vec![
            (Some("a"), place("o1"), 1_000),
            (Some("b"), place("o2"), 1_500),
            (None, cancel("o1"), 2_600),
            (Some("a"), cancel("o2"), 3_000),
            (None, place("o3"), 9_000),
        ];
        for (offset, (key, event, at)) in log.into_iter().enumerate() {
            let offset = offset as u64;
            if let Admission::Fresh(claim) = appending
                .admit(key, std::slice::from_ref(&event), at)
                .unwrap()
            {
                let answer = Appended::One {
                    event_id: event.0.clone(),
                    offset,
                };
                appending.appended(claim, &answer);
            }
            appending.taken_to(offset + 1);
            reading.read_back(key, Some(&event.0), offset, &event.1, None, at);
        }
        let saved = |l: &Ledger| postcard::to_allocvec(l).unwrap();
        let (a, b) = (saved(&appending), saved(&reading));
        let back: Ledger = postcard::from_bytes(&a).unwrap();
        assert_eq!(back.known.orders, reading.known.orders);
        assert_eq!(back.known.merchants, reading.known.merchants);
        assert_eq!(back.keys, reading.keys);
        assert_eq!((back.now, back.swept), (reading.now, reading.swept));
        assert_eq!(a.len(), b.len());
        assert!(!reading.knows_order(&id("o1")) && reading.knows_order(&id("o3")));
    }
}
