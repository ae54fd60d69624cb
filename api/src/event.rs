//! Events: what the log holds and the dispatch computation consumes.
//!
//! The log gives each accepted event its [`Event::offset`] (its position,
//! which breaks ties between events of the same millisecond: the first grab
//! by offset wins) and its [`Event::time`] (the dataflow timestamp).

use crate::{Coord, Id, Time};
use serde::{Deserialize, Serialize};

/// One logged event.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Event {
    /// Client- or ingress-chosen id; a redelivered event with a seen id is dropped.
    pub id: Id,
    /// Position in the log; orders events within one millisecond.
    pub offset: u64,
    /// Log time in Unix milliseconds; the dataflow timestamp.
    pub time: Time,
    /// What happened.
    #[serde(with = "kind_codec")]
    pub kind: EventKind,
}

/// The kind's encoding: its tagged JSON form (`"type": "location_pinged"`)
/// for JSON (the API, the topics, old log records); for binary formats (the
/// embedded log, timely's exchange between processes), which cannot decode
/// internally tagged enums, the same fields tagged by variant ([`Binary`]).
mod kind_codec {
    use super::{Binary, EventKind};
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(kind: &EventKind, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            kind.serialize(s)
        } else {
            Binary::serialize(kind, s)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<EventKind, D::Error> {
        if d.is_human_readable() {
            EventKind::deserialize(d)
        } else {
            Binary::deserialize(d)
        }
    }
}

/// [`EventKind`] for binary formats: serde's remote derive, so the compiler
/// holds the two definitions to the same fields. Variants are numbered in
/// order: new kinds go at the end.
#[derive(Serialize, Deserialize)]
#[serde(remote = "EventKind")]
enum Binary {
    MerchantUpserted {
        merchant: Id,
        at: Coord,
        open: bool,
    },
    ShiftChanged {
        rider: Id,
        online: bool,
        capacity: Option<u32>,
    },
    LocationPinged {
        rider: Id,
        at: Coord,
    },
    OrderPlaced {
        order: Id,
        merchant: Id,
        dropoff: Coord,
        promised_minutes: u32,
    },
    OrderCancelled {
        order: Id,
    },
    GrabAttempted {
        order: Id,
        rider: Id,
    },
    PickedUp {
        order: Id,
        rider: Id,
    },
    Delivered {
        order: Id,
        rider: Id,
    },
    CompensationSettled {
        order: Id,
        amount_cents: u64,
    },
    Redispatched {
        order: Id,
    },
    Reassigned {
        order: Id,
        rider: Id,
    },
}

/// An [`EventKind`] read in its binary form (variants by number, fields in
/// order), for stores that keep kinds apart from their events (the embedded
/// log's records).
#[derive(Deserialize)]
#[serde(transparent)]
pub struct BinaryKind(#[serde(with = "Binary")] pub EventKind);

/// An [`EventKind`] written in its binary form, by reference.
pub struct BinaryKindRef<'a>(pub &'a EventKind);

impl Serialize for BinaryKindRef<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        Binary::serialize(self.0, s)
    }
}

/// The kinds of event dispatch reacts to.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum EventKind {
    /// A merchant registered, moved, opened or closed.
    MerchantUpserted {
        /// The merchant.
        merchant: Id,
        /// Where orders are picked up.
        at: Coord,
        /// Whether it takes orders.
        open: bool,
    },
    /// A rider started or ended a shift.
    ShiftChanged {
        /// The rider.
        rider: Id,
        /// On shift (takes offers) or not.
        online: bool,
        /// Orders the rider may carry at once; the configured default when absent.
        capacity: Option<u32>,
    },
    /// A rider's location ping.
    LocationPinged {
        /// The rider.
        rider: Id,
        /// Where the rider is.
        at: Coord,
    },
    /// A paid order enters dispatch.
    OrderPlaced {
        /// The order.
        order: Id,
        /// The merchant that prepares it; offers go to riders near it.
        merchant: Id,
        /// Where it is delivered.
        dropoff: Coord,
        /// Promised delivery time, minutes after placement.
        promised_minutes: u32,
    },
    /// The customer or merchant cancelled.
    OrderCancelled {
        /// The order.
        order: Id,
    },
    /// A rider tries to take an offered order.
    GrabAttempted {
        /// The order.
        order: Id,
        /// The rider trying.
        rider: Id,
    },
    /// The assigned rider picked the food up.
    PickedUp {
        /// The order.
        order: Id,
        /// The rider reporting it.
        rider: Id,
    },
    /// The assigned rider delivered.
    Delivered {
        /// The order.
        order: Id,
        /// The rider reporting it.
        rider: Id,
    },
    /// Ops settled the compensation owed for an overtime order.
    CompensationSettled {
        /// The order.
        order: Id,
        /// What was paid, in cents.
        amount_cents: u64,
    },
    /// Ops take the order back and offer it again.
    Redispatched {
        /// The order.
        order: Id,
    },
    /// Ops assign the order to a rider directly.
    Reassigned {
        /// The order.
        order: Id,
        /// The rider it goes to.
        rider: Id,
    },
}

impl EventKind {
    /// The kind's name, as in the JSON `type` tag.
    pub fn name(&self) -> &'static str {
        match self {
            EventKind::MerchantUpserted { .. } => "merchant_upserted",
            EventKind::ShiftChanged { .. } => "shift_changed",
            EventKind::LocationPinged { .. } => "location_pinged",
            EventKind::OrderPlaced { .. } => "order_placed",
            EventKind::OrderCancelled { .. } => "order_cancelled",
            EventKind::GrabAttempted { .. } => "grab_attempted",
            EventKind::PickedUp { .. } => "picked_up",
            EventKind::Delivered { .. } => "delivered",
            EventKind::CompensationSettled { .. } => "compensation_settled",
            EventKind::Redispatched { .. } => "redispatched",
            EventKind::Reassigned { .. } => "reassigned",
        }
    }

    /// Whether the event changes rider state (position, shift) rather than an order.
    pub fn is_rider_state(&self) -> bool {
        matches!(
            self,
            EventKind::ShiftChanged { .. } | EventKind::LocationPinged { .. }
        )
    }

    /// The rider whose state the event changes, for rider-state events.
    pub fn rider(&self) -> Option<&Id> {
        match self {
            EventKind::ShiftChanged { rider, .. } | EventKind::LocationPinged { rider, .. } => {
                Some(rider)
            }
            _ => None,
        }
    }

    /// The order the event concerns, if any.
    pub fn order(&self) -> Option<&Id> {
        match self {
            EventKind::OrderPlaced { order, .. }
            | EventKind::OrderCancelled { order }
            | EventKind::GrabAttempted { order, .. }
            | EventKind::PickedUp { order, .. }
            | EventKind::Delivered { order, .. }
            | EventKind::CompensationSettled { order, .. }
            | EventKind::Redispatched { order }
            | EventKind::Reassigned { order, .. } => Some(order),
            _ => None,
        }
    }

    /// The id the event is keyed by in a partitioned log (its entity).
    pub fn entity(&self) -> &Id {
        match self {
            EventKind::MerchantUpserted { merchant, .. } => merchant,
            EventKind::ShiftChanged { rider, .. } | EventKind::LocationPinged { rider, .. } => {
                rider
            }
            other => other.order().expect("every other kind names an order"),
        }
    }
}

/// What the log hands the dataflow, in log order.
#[derive(Clone, Debug)]
pub enum Feed {
    /// Durable events, in offset order.
    Events(Vec<Event>),
    /// No event from now on will have a time before this one: the clock.
    Tick(Time),
    /// Durable events, then a tick: one message, so the dataflow is woken
    /// once for both.
    EventsThenTick(Vec<Event>, Time),
}
