//! The dataflow equals the sequential reference model, millisecond by
//! millisecond, on hundreds of seeded random logs, at 1 and 4 workers and at
//! several input step sizes.

use grabflow_api::{Output, Time};
use grabflow_dataflow::gen::random_log;
use grabflow_dataflow::reference;
use grabflow_dataflow::replay::{replay, ReplayPlan};
use std::sync::Arc;

mod common;
use common::{assert_same, by_time};

fn check(seed: u64, workers: usize) -> usize {
    let size = 150 + (seed as usize * 37) % 300;
    let (cfg, log, end) = random_log(seed, size);
    let expected = by_time(reference::run(&cfg, &log, end));
    // From one-millisecond epochs (the finest) to a minute per step.
    let step: Time = [1, 250, 3_000, 60_000][seed as usize % 4];
    let got = by_time(replay(
        Arc::new(log),
        &cfg,
        &ReplayPlan { workers, step, end },
    ));
    assert_same(
        seed,
        &format!("{workers} workers, step {step} ms"),
        &expected,
        &got,
    );
    expected.values().map(Vec::len).sum()
}

#[test]
fn dataflow_equals_reference_on_random_logs_at_one_worker() {
    let decisions: usize = (0..300).map(|seed| check(seed, 1)).sum();
    assert!(
        decisions > 10_000,
        "the logs must make many decisions, made {decisions}"
    );
}

#[test]
fn dataflow_equals_reference_on_random_logs_at_four_workers() {
    let decisions: usize = (0..300).map(|seed| check(seed, 4)).sum();
    assert!(
        decisions > 10_000,
        "the logs must make many decisions, made {decisions}"
    );
}

#[test]
fn random_logs_exercise_every_rule() {
    use grabflow_api::output::TransitionReason as Why;
    use grabflow_api::{GrabOutcome, LossReason, RejectReason};
    let mut reasons = std::collections::BTreeSet::new();
    let mut losses = std::collections::BTreeSet::new();
    let mut rejects = std::collections::BTreeSet::new();
    for seed in 0..220 {
        let (cfg, log, end) = random_log(seed, 150 + (seed as usize * 37) % 300);
        for (_, o) in reference::run(&cfg, &log, end) {
            match o {
                Output::Transition { reason, .. } => {
                    reasons.insert(reason);
                }
                Output::GrabDecided {
                    outcome: GrabOutcome::Lost(r),
                    ..
                } => {
                    losses.insert(r);
                }
                Output::Rejected { reason, .. } => {
                    rejects.insert(reason);
                }
                _ => {}
            }
        }
    }
    use Why::*;
    for r in [
        Placed,
        Offered,
        GrabTimeout,
        Grabbed,
        DeadlinePassed,
        PickedUp,
        Delivered,
        Completed,
        CompensationDue,
        Compensated,
        Cancelled,
        Redispatched,
        Reassigned,
    ] {
        assert!(
            reasons.contains(&r),
            "no random log made a {r:?} transition"
        );
    }
    use LossReason::*;
    for r in [
        AlreadyTaken,
        NotOffered,
        OrderClosed,
        UnknownOrder,
        OverCapacity,
        OfferExpired,
    ] {
        assert!(losses.contains(&r), "no random grab lost with {r:?}");
    }
    assert!(
        rejects.len() >= 5,
        "rejections seen: {rejects:?} ({:?})",
        RejectReason::DuplicateOrder
    );
}
