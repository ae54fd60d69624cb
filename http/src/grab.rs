//! A grab call waits for its decision: the waiting side ([`GrabWaiter`],
//! [`GrabResults`]) and the answer both the call and the rider's stream give
//! ([`GrabAnswer`]).

use grabflow_api::{GrabOutcome, Id, LossReason};
use serde::Serialize;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::oneshot;
use utoipa::ToSchema;

/// How long a grab call waits for its decision before answering 202.
pub const GRAB_WAIT: Duration = Duration::from_secs(2);

/// Lets the grab call wait for its decision: the egress view (one process)
/// or a follower of the grabs topic (a split ingress) answers it.
pub trait GrabWaiter: Send + Sync + 'static {
    /// Registers interest in the decision on `attempt` (before it is appended).
    fn expect(&self, attempt: &Id) -> oneshot::Receiver<GrabOutcome>;
    /// Drops the interest (the caller stopped waiting).
    fn forget(&self, attempt: &Id);
}

/// Grab calls waiting for their decisions, by attempt.
#[derive(Default)]
pub struct GrabResults {
    waiters: Mutex<HashMap<Id, oneshot::Sender<GrabOutcome>>>,
}

impl GrabResults {
    /// Answers the call waiting on `attempt`, if one is.
    pub fn resolve(&self, attempt: &Id, outcome: GrabOutcome) {
        if let Some(tx) = self.waiters.lock().expect("waiters").remove(attempt) {
            let _ = tx.send(outcome);
        }
    }
}

impl GrabWaiter for GrabResults {
    fn expect(&self, attempt: &Id) -> oneshot::Receiver<GrabOutcome> {
        let (tx, rx) = oneshot::channel();
        self.waiters
            .lock()
            .expect("waiters")
            .insert(attempt.clone(), tx);
        rx
    }

    fn forget(&self, attempt: &Id) {
        self.waiters.lock().expect("waiters").remove(attempt);
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
