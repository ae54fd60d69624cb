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
        /// Previous state; none when the order was just placed.
        from: Option<OrderState>,
        /// New state.
        to: OrderState,
        /// Why.
        reason: TransitionReason,
        /// The assigned rider, when there is one.
        rider: Option<Id>,
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
