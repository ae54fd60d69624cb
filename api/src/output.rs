//! Outputs: what dispatch decides. Each record is emitted at a dataflow time
//! (log milliseconds); together they explain every order's history.

use crate::{Id, Time};
use serde::{Deserialize, Serialize};

/// The order life cycle (原: 已创建 已通知 运送中 已收货 超时 赔付 关闭).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OrderState {
    /// Waiting for an offer round (no rider in range yet, or a round timed out).
    Created,
    /// Offered to riders; waiting for the first valid grab.
    Notified,
    /// A rider has it (picked up or on the way to the merchant).
    Delivering,
    /// Delivered.
    Received,
    /// Still not delivered at the promised time.
    Overtime,
    /// Delivered late; waiting for ops to settle compensation.
    Compensating,
    /// Done: completed, compensated or cancelled.
    Closed,
}

impl OrderState {
    /// The state's name, as in JSON.
    pub fn name(self) -> &'static str {
        match self {
            OrderState::Created => "created",
            OrderState::Notified => "notified",
            OrderState::Delivering => "delivering",
            OrderState::Received => "received",
            OrderState::Overtime => "overtime",
            OrderState::Compensating => "compensating",
            OrderState::Closed => "closed",
        }
    }
}

/// Why an order changed state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TransitionReason {
    /// The order was placed.
    Placed,
    /// An offer round was sent.
    Offered,
    /// Nobody grabbed within the grab timeout.
    GrabTimeout,
    /// A rider won the grab race.
    Grabbed,
    /// The promised time passed.
    DeadlinePassed,
    /// The rider picked the food up (a sub-state of delivering).
    PickedUp,
    /// The rider delivered.
    Delivered,
    /// Delivered in time; nothing more to do.
    Completed,
    /// Delivered late; compensation is owed.
    CompensationDue,
    /// Ops settled the compensation.
    Compensated,
    /// Cancelled before pick-up.
    Cancelled,
    /// Ops took the order back to offer it again.
    Redispatched,
    /// Ops assigned the order to a rider directly.
    Reassigned,
}

/// Why an offer was withdrawn from a rider, or an assignment taken away.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WithdrawReason {
    /// Another rider won the grab race.
    Taken,
    /// The order was cancelled.
    Cancelled,
    /// The offer round timed out.
    Expired,
    /// Ops redispatched the order.
    Redispatched,
    /// Ops assigned the order to another rider.
    Reassigned,
}

/// Why a grab attempt lost (API.md's loss reasons).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossReason {
    /// Another rider's grab came first.
    AlreadyTaken,
    /// The rider was never offered this order.
    NotOffered,
    /// The order is closed or cancelled.
    OrderClosed,
    /// No such order.
    UnknownOrder,
    /// The rider already carries as many orders as their capacity.
    OverCapacity,
    /// The rider was offered the order in an earlier round that has ended.
    OfferExpired,
}

/// The decision on one grab attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(tag = "result", content = "reason", rename_all = "snake_case")]
pub enum GrabOutcome {
    /// This attempt won the order.
    Won,
    /// This attempt lost, for the reason given.
    Lost(LossReason),
}

/// Why an event had no effect.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectReason {
    /// An order with this id was already placed.
    DuplicateOrder,
    /// The order names a merchant never registered.
    UnknownMerchant,
    /// The merchant is closed.
    MerchantClosed,
    /// No such order.
    UnknownOrder,
    /// The order's state does not allow this event.
    InvalidState,
    /// Only the assigned rider may report this.
    NotAssignedRider,
}

/// One dispatch decision.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Output {
    /// An order was offered to a rider; fixed until the order leaves `notified`.
    Offered {
        /// The order.
        order: Id,
        /// The rider offered it.
        rider: Id,
        /// The order's merchant.
        merchant: Id,
        /// Rider to merchant when the offer was made, metres.
        distance_m: u32,
        /// Offer round, from 0; each timed-out round widens the radius.
        round: u32,
        /// When the round times out.
        expires_at: Time,
    },
    /// An offer (or an assignment) was taken back from a rider.
    Withdrawn {
        /// The order.
        order: Id,
        /// The rider losing it.
        rider: Id,
        /// Why.
        reason: WithdrawReason,
    },
    /// A grab attempt was decided.
    GrabDecided {
        /// The grab event's id.
        attempt: Id,
        /// The order.
        order: Id,
        /// The rider who tried.
        rider: Id,
        /// Won, or lost with a reason.
        outcome: GrabOutcome,
    },
    /// An order was taken away from its assigned rider (cancelled,
    /// redispatched or reassigned by ops).
    Unassigned {
        /// The order.
        order: Id,
        /// The rider losing it.
        rider: Id,
        /// Why.
        reason: WithdrawReason,
    },
    /// An order now belongs to a rider (won, or reassigned by ops).
    Assigned {
        /// The order.
        order: Id,
        /// The rider.
        rider: Id,
    },
    /// An order changed state (or, for pick-up, sub-state).
    Transition {
        /// The order.
        order: Id,
        /// The order's merchant: sinks keyed or grouped by merchant need no
        /// map of their own from orders to merchants.
        merchant: Id,
        /// Previous state; none when the order was just placed.
        from: Option<OrderState>,
        /// New state.
        to: OrderState,
        /// Why.
        reason: TransitionReason,
        /// The assigned rider, when there is one.
        rider: Option<Id>,
        /// The event that caused it (its id); none when a timer or the
        /// offer pass did. A rider's pickup or delivery call waits for the
        /// transition its event caused, or for its rejection.
        // Written as null when absent (not skipped): binary encodings of
        // the same type read fields by position.
        #[serde(default)]
        event: Option<Id>,
    },
    /// An event had no effect.
    Rejected {
        /// The event's id.
        event: Id,
        /// The order it named, if any.
        order: Option<Id>,
        /// Why.
        reason: RejectReason,
    },
}

impl Output {
    /// The record's kind, as in the JSON `type` tag.
    pub fn name(&self) -> &'static str {
        match self {
            Output::Offered { .. } => "offered",
            Output::Withdrawn { .. } => "withdrawn",
            Output::Unassigned { .. } => "unassigned",
            Output::GrabDecided { .. } => "grab_decided",
            Output::Assigned { .. } => "assigned",
            Output::Transition { .. } => "transition",
            Output::Rejected { .. } => "rejected",
        }
    }

    /// The rider this record is for, when it goes to a rider's stream.
    pub fn rider(&self) -> Option<&Id> {
        match self {
            Output::Offered { rider, .. }
            | Output::Withdrawn { rider, .. }
            | Output::GrabDecided { rider, .. }
            | Output::Unassigned { rider, .. }
            | Output::Assigned { rider, .. } => Some(rider),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Coord, Event, EventKind};

    fn tag(v: serde_json::Value) -> String {
        v.get("type")
            .map_or(v.clone(), |t| t.clone())
            .as_str()
            .unwrap()
            .to_string()
    }

    #[test]
    fn names_are_the_json_tags() {
        let id = || Id::new("x").unwrap();
        let at = Coord::from_degrees(1.0, 2.0).unwrap();
        for s in [
            OrderState::Created,
            OrderState::Notified,
            OrderState::Delivering,
            OrderState::Received,
            OrderState::Overtime,
            OrderState::Compensating,
            OrderState::Closed,
        ] {
            assert_eq!(tag(serde_json::to_value(s).unwrap()), s.name());
        }
        let outputs = [
            Output::Offered {
                order: id(),
                rider: id(),
                merchant: id(),
                distance_m: 1,
                round: 0,
                expires_at: 1,
            },
            Output::Withdrawn {
                order: id(),
                rider: id(),
                reason: WithdrawReason::Taken,
            },
            Output::Unassigned {
                order: id(),
                rider: id(),
                reason: WithdrawReason::Cancelled,
            },
            Output::GrabDecided {
                attempt: id(),
                order: id(),
                rider: id(),
                outcome: GrabOutcome::Won,
            },
            Output::Assigned {
                order: id(),
                rider: id(),
            },
            Output::Transition {
                order: id(),
                merchant: id(),
                from: None,
                to: OrderState::Created,
                reason: TransitionReason::Placed,
                rider: None,
                event: Some(id()),
            },
            Output::Rejected {
                event: id(),
                order: None,
                reason: RejectReason::UnknownOrder,
            },
        ];
        for o in outputs {
            assert_eq!(tag(serde_json::to_value(&o).unwrap()), o.name());
        }
        let kinds = [
            EventKind::MerchantUpserted {
                merchant: id(),
                at,
                open: true,
            },
            EventKind::ShiftChanged {
                rider: id(),
                online: true,
                capacity: None,
            },
            EventKind::LocationPinged { rider: id(), at },
            EventKind::OrderPlaced {
                order: id(),
                merchant: id(),
                dropoff: at,
                promised_minutes: 1,
            },
            EventKind::OrderCancelled { order: id() },
            EventKind::GrabAttempted {
                order: id(),
                rider: id(),
            },
            EventKind::PickedUp {
                order: id(),
                rider: id(),
            },
            EventKind::Delivered {
                order: id(),
                rider: id(),
            },
            EventKind::CompensationSettled {
                order: id(),
                amount_cents: 1,
            },
            EventKind::Redispatched { order: id() },
            EventKind::Reassigned {
                order: id(),
                rider: id(),
            },
        ];
        for k in kinds {
            let name = k.name();
            let e = Event {
                id: id(),
                offset: 0,
                time: 0,
                kind: k,
            };
            assert_eq!(tag(serde_json::to_value(&e).unwrap()["kind"].clone()), name);
            // The binary form (the log, timely's exchange) gives back the same event.
            let bytes = postcard::to_allocvec(&e).unwrap();
            assert_eq!(postcard::from_bytes::<Event>(&bytes).unwrap(), e, "{name}");
        }
    }
}
