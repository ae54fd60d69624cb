//! A call waits for what the dataflow made of its event: a grab for its
//! decision, a rider's pickup or delivery for the transition it caused or
//! its rejection. The waiting side ([`Waiter`], [`Waiting`]), what is
//! waited for ([`Verdict`], read off decisions by [`verdict_of`]) and the
//! answers the calls give ([`GrabAnswer`], [`StepAnswer`]).

use grabflow_api::{GrabOutcome, Id, LossReason, OrderState, Output, RejectReason};
use serde::Serialize;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::oneshot;
use utoipa::ToSchema;

/// How long a call waits for its decision before answering 202.
pub const WAIT: Duration = Duration::from_secs(2);

/// What a waiting call waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// A grab's decision ([`Verdict::Grab`]).
    Grab,
    /// The transition an order event caused, or its rejection
    /// ([`Verdict::Applied`], [`Verdict::Rejected`]).
    Step,
}

/// What the dataflow made of one event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// A grab was decided.
    Grab(GrabOutcome),
    /// The event moved its order; the state it entered.
    Applied(OrderState),
    /// The event had no effect.
    Rejected(RejectReason),
}

impl Verdict {
    /// Whether this verdict answers a call expecting `expect`. A delivery's
    /// `received` is always followed at once by `closed` or `compensating`
    /// (same event, same millisecond): the call answers with that one.
    fn answers(&self, expect: Expect) -> bool {
        match (expect, self) {
            (Expect::Grab, Verdict::Grab(_)) => true,
            (Expect::Step, Verdict::Applied(state)) => *state != OrderState::Received,
            (Expect::Step, Verdict::Rejected(_)) => true,
            _ => false,
        }
    }
}

/// The verdict a decision gives on an event, and the event's id: a grab
/// decided, a transition naming its cause, or a rejection.
pub fn verdict_of(output: &Output) -> Option<(&Id, Verdict)> {
    match output {
        Output::GrabDecided {
            attempt, outcome, ..
        } => Some((attempt, Verdict::Grab(*outcome))),
        Output::Transition {
            event: Some(event),
            to,
            ..
        } => Some((event, Verdict::Applied(*to))),
        Output::Rejected { event, reason, .. } => Some((event, Verdict::Rejected(*reason))),
        _ => None,
    }
}

/// Lets a call wait for what became of its event: the egress view (one
/// process) or a follower of the output topics (a split ingress) answers.
pub trait Waiter: Send + Sync + 'static {
    /// Registers interest in `event` (before it is appended).
    fn expect(&self, event: &Id, what: Expect) -> oneshot::Receiver<Verdict>;
    /// Drops the interest (the caller stopped waiting).
    fn forget(&self, event: &Id);
}

/// Calls waiting for their verdicts, by event id.
#[derive(Default)]
pub struct Waiting {
    waiters: Mutex<HashMap<Id, (Expect, oneshot::Sender<Verdict>)>>,
}

impl Waiting {
    /// Answers the calls waiting on the events of `verdicts` (decisions in
    /// the order made): each call gets the first verdict of the kind it
    /// expects.
    pub fn resolve<'a>(&self, verdicts: impl IntoIterator<Item = (&'a Id, Verdict)>) {
        let mut waiters = self.waiters.lock().expect("waiters");
        if waiters.is_empty() {
            return;
        }
        for (event, verdict) in verdicts {
            if waiters.get(event).is_some_and(|(e, _)| verdict.answers(*e)) {
                if let Some((_, tx)) = waiters.remove(event) {
                    let _ = tx.send(verdict);
                }
            }
        }
    }
}

impl Waiter for Waiting {
    fn expect(&self, event: &Id, what: Expect) -> oneshot::Receiver<Verdict> {
        let (tx, rx) = oneshot::channel();
        self.waiters
            .lock()
            .expect("waiters")
            .insert(event.clone(), (what, tx));
        rx
    }

    fn forget(&self, event: &Id) {
        self.waiters.lock().expect("waiters").remove(event);
    }
}

/// `200` answer to a decided grab (and the body of the stream's `grab_result`).
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct GrabAnswer {
    /// `won` or `lost`.
    pub result: &'static str,
    /// Why it lost: already_taken, not_offered, order_closed, unknown_order, over_capacity, offer_expired.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub reason: Option<LossReason>,
}

impl From<GrabOutcome> for GrabAnswer {
    fn from(outcome: GrabOutcome) -> Self {
        match outcome {
            GrabOutcome::Won => GrabAnswer {
                result: "won",
                reason: None,
            },
            GrabOutcome::Lost(reason) => GrabAnswer {
                result: "lost",
                reason: Some(reason),
            },
        }
    }
}

/// `200` answer to a pickup or delivery the dataflow applied.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct StepAnswer {
    /// The event's id.
    pub event_id: String,
    /// The order.
    pub order_id: String,
    /// The state the order is in after it: `delivering` (picked up),
    /// `closed`, or `compensating` (delivered late).
    #[schema(value_type = String)]
    pub state: OrderState,
}

/// The stable error code and message of a rejected pickup or delivery
/// (answered 409).
pub fn rejection(reason: RejectReason) -> (&'static str, &'static str) {
    match reason {
        RejectReason::NotAssignedRider => (
            "not_assigned",
            "the order is assigned to another rider, or to none",
        ),
        RejectReason::InvalidState => (
            "wrong_state",
            "the order's state does not allow this (not picked up yet, already picked up, or closed)",
        ),
        RejectReason::UnknownOrder => ("unknown_order", "no such order"),
        RejectReason::DuplicateOrder => ("conflict", "an order with this id was already placed"),
        RejectReason::UnknownMerchant => ("unknown_merchant", "no such merchant"),
        RejectReason::MerchantClosed => ("merchant_closed", "the merchant is closed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> Id {
        Id::new(s).unwrap()
    }

    #[test]
    fn a_call_gets_the_verdict_it_expects_and_a_delivery_its_final_state() {
        let w = Waiting::default();
        let grab = w.expect(&id("g"), Expect::Grab);
        let mut drop = w.expect(&id("d"), Expect::Step);
        let mut wrong = w.expect(&id("x"), Expect::Step);
        let (g, d, x) = (id("g"), id("d"), id("x"));
        w.resolve([
            // The grab's transition comes first: the grab call waits on.
            (&g, Verdict::Applied(OrderState::Delivering)),
            (&d, Verdict::Applied(OrderState::Received)),
            (&g, Verdict::Grab(GrabOutcome::Won)),
            (&d, Verdict::Applied(OrderState::Closed)),
        ]);
        assert_eq!(
            grab.blocking_recv().unwrap(),
            Verdict::Grab(GrabOutcome::Won)
        );
        assert_eq!(
            drop.try_recv().unwrap(),
            Verdict::Applied(OrderState::Closed)
        );
        assert!(wrong.try_recv().is_err(), "not resolved yet");
        w.resolve([(&x, Verdict::Rejected(RejectReason::NotAssignedRider))]);
        assert_eq!(
            wrong.try_recv().unwrap(),
            Verdict::Rejected(RejectReason::NotAssignedRider)
        );
        assert!(w.waiters.lock().unwrap().is_empty());
    }
}
