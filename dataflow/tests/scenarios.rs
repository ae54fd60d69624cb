//! One named scenario per rule of the order state machine. Each runs through
//! the dataflow and the reference model, which must agree, then checks the
//! decisions a user would see.

use grabflow_api::output::TransitionReason as Why;
use grabflow_api::{
    Coord, DispatchConfig, Event, EventKind, GrabOutcome, Id, LossReason, OrderState, Output,
    RejectReason, Time, WithdrawReason,
};
use grabflow_dataflow::gen::city_centre;
use grabflow_dataflow::reference;
use grabflow_dataflow::replay::{replay, ReplayPlan};
use std::sync::Arc;

const T0: Time = 1_800_000_000_000;

fn id(s: &str) -> Id {
    Id::new(s).unwrap()
}

/// A hand-written log: events at seconds after `T0`.
struct Script {
    cfg: DispatchConfig,
    log: Vec<Event>,
}

impl Script {
    fn new() -> Self {
        Script {
            cfg: DispatchConfig::default(),
            log: Vec::new(),
        }
    }

    fn at(&mut self, secs: f64, kind: EventKind) -> Id {
        let n = self.log.len();
        let event_id = id(&format!("e{n}"));
        let time = T0 + (secs * 1000.0) as Time;
        self.log.push(Event {
            id: event_id.clone(),
            offset: n as u64,
            time,
            kind,
        });
        event_id
    }

    /// A merchant at the centre and riders on shift, `metres` north of it.
    fn city(&mut self, riders: &[f64]) {
        self.at(
            0.0,
            EventKind::MerchantUpserted {
                merchant: id("m"),
                at: city_centre(),
                open: true,
            },
        );
        for (i, m) in riders.iter().enumerate() {
            let r = id(&format!("r{}", i + 1));
            self.at(
                0.0,
                EventKind::ShiftChanged {
                    rider: r.clone(),
                    online: true,
                    capacity: None,
                },
            );
            self.ping(0.0, &format!("r{}", i + 1), *m);
        }
    }

    fn ping(&mut self, secs: f64, rider: &str, north_m: f64) {
        self.at(
            secs,
            EventKind::LocationPinged {
                rider: id(rider),
                at: north(north_m),
            },
        );
    }

    fn order(&mut self, secs: f64, order: &str) -> Id {
        self.at(
            secs,
            EventKind::OrderPlaced {
                order: id(order),
                merchant: id("m"),
                dropoff: north(-1000.0),
                promised_minutes: 30,
            },
        )
    }

    fn grab(&mut self, secs: f64, order: &str, rider: &str) -> Id {
        self.at(
            secs,
            EventKind::GrabAttempted {
                order: id(order),
                rider: id(rider),
            },
        )
    }

    /// Runs both models up to `end_secs`; they must agree. Returns the decisions.
    fn run(&self, end_secs: f64) -> Run {
        let end = T0 + (end_secs * 1000.0) as Time;
        let mut log = self.log.clone();
        log.sort_by_key(|e| (e.time, e.offset));
        let expected = reference::run(&self.cfg, &log, end);
        let got = replay(
            Arc::new(log),
            &self.cfg,
            &ReplayPlan {
                workers: 1,
                step: 1,
                end,
            },
        );
        assert_eq!(got, expected, "dataflow and reference disagree");
        Run(got)
    }
}

fn north(m: f64) -> Coord {
    city_centre().offset_m(m, 0.0)
}

struct Run(Vec<(Time, Output)>);

impl Run {
    fn secs(t: Time) -> f64 {
        (t - T0) as f64 / 1000.0
    }

    fn offers(&self, order: &str) -> Vec<(f64, String, u32, u32)> {
        self.0
            .iter()
            .filter_map(|(t, o)| match o {
                Output::Offered {
                    order: o,
                    rider,
                    distance_m,
                    round,
                    ..
                } if o.as_str() == order => {
                    Some((Self::secs(*t), rider.to_string(), *distance_m, *round))
                }
                _ => None,
            })
            .collect()
    }

    fn states(&self, order: &str) -> Vec<(f64, OrderState, Why)> {
        self.0
            .iter()
            .filter_map(|(t, o)| match o {
                Output::Transition {
                    order: o,
                    to,
                    reason,
                    ..
                } if o.as_str() == order => Some((Self::secs(*t), *to, *reason)),
                _ => None,
            })
            .collect()
    }

    fn grab(&self, attempt: &Id) -> GrabOutcome {
        self.0
            .iter()
            .find_map(|(_, o)| match o {
                Output::GrabDecided {
                    attempt: a,
                    outcome,
                    ..
                } if a == attempt => Some(*outcome),
                _ => None,
            })
            .expect("every grab is decided")
    }

    fn withdrawn(&self, rider: &str) -> Vec<(f64, WithdrawReason)> {
        self.0
            .iter()
            .filter_map(|(t, o)| match o {
                Output::Withdrawn {
                    rider: r, reason, ..
                }
                | Output::Unassigned {
                    rider: r, reason, ..
                } if r.as_str() == rider => Some((Self::secs(*t), *reason)),
                _ => None,
            })
            .collect()
    }

    fn rejected(&self, event: &Id) -> Option<RejectReason> {
        self.0.iter().find_map(|(_, o)| match o {
            Output::Rejected {
                event: e, reason, ..
            } if e == event => Some(*reason),
            _ => None,
        })
    }

    fn last_state(&self, order: &str) -> OrderState {
        self.states(order)
            .last()
            .expect("the order has a history")
            .1
    }
}

use OrderState::*;

#[test]
fn a_placed_order_is_offered_to_the_k_nearest_available_riders_nearest_first() {
    let mut s = Script::new();
    s.cfg.offers = 2;
    s.city(&[300.0, 100.0, 200.0, 5000.0]);
    s.order(1.0, "o1");
    let run = s.run(2.0);
    assert_eq!(
        run.offers("o1"),
        vec![(1.0, "r2".into(), 100, 0), (1.0, "r3".into(), 200, 0)]
    );
    assert_eq!(
        run.states("o1"),
        vec![(1.0, Created, Why::Placed), (1.0, Notified, Why::Offered)]
    );
}

#[test]
fn an_order_with_nobody_in_range_waits_and_is_offered_the_moment_a_rider_arrives() {
    let mut s = Script::new();
    s.city(&[8000.0]);
    s.order(1.0, "o1");
    s.ping(5.0, "r1", 4000.0);
    s.ping(10.0, "r1", 2900.0);
    let run = s.run(20.0);
    assert_eq!(run.offers("o1"), vec![(10.0, "r1".into(), 2900, 0)]);
    assert_eq!(run.states("o1")[1], (10.0, Notified, Why::Offered));
}

#[test]
fn offers_are_fixed_when_made_and_do_not_flicker_when_riders_move() {
    let mut s = Script::new();
    s.city(&[100.0]);
    s.order(1.0, "o1");
    s.ping(5.0, "r1", 9000.0);
    let run = s.run(10.0);
    assert_eq!(run.offers("o1").len(), 1);
    assert!(run.withdrawn("r1").is_empty());
    assert_eq!(run.last_state("o1"), Notified);
}

#[test]
fn the_first_grab_by_log_position_wins_and_the_loser_is_told_and_withdrawn() {
    let mut s = Script::new();
    s.city(&[100.0, 200.0, 300.0]);
    s.order(1.0, "o1");
    let first = s.grab(2.0, "o1", "r2");
    let second = s.grab(2.0, "o1", "r1");
    let run = s.run(5.0);
    assert_eq!(run.grab(&first), GrabOutcome::Won);
    assert_eq!(
        run.grab(&second),
        GrabOutcome::Lost(LossReason::AlreadyTaken)
    );
    assert_eq!(run.withdrawn("r1"), vec![(2.0, WithdrawReason::Taken)]);
    assert_eq!(run.withdrawn("r3"), vec![(2.0, WithdrawReason::Taken)]);
    assert!(run.withdrawn("r2").is_empty());
    assert_eq!(
        run.states("o1").last().unwrap(),
        &(2.0, Delivering, Why::Grabbed)
    );
    let winners = run
        .0
        .iter()
        .filter(|(_, o)| matches!(o, Output::Assigned { .. }))
        .count();
    assert_eq!(winners, 1);
}

#[test]
fn no_grab_within_the_timeout_reoffers_with_a_wider_radius() {
    let mut s = Script::new();
    s.city(&[1000.0, 4000.0]);
    s.order(1.0, "o1");
    let late = s.grab(40.0, "o1", "r2");
    let run = s.run(100.0);
    assert_eq!(
        run.offers("o1"),
        vec![
            (1.0, "r1".into(), 1000, 0),
            (31.0, "r1".into(), 1000, 1),
            (31.0, "r2".into(), 4000, 1)
        ]
    );
    assert_eq!(run.withdrawn("r1")[0], (31.0, WithdrawReason::Expired));
    let states = run.states("o1");
    assert!(states.contains(&(31.0, Created, Why::GrabTimeout)));
    assert_eq!(run.grab(&late), GrabOutcome::Won);
}

#[test]
fn every_loss_reason_is_given_where_it_applies() {
    let mut s = Script::new();
    s.cfg.offers = 1;
    s.city(&[100.0, 200.0, 300.0]);
    s.at(
        0.0,
        EventKind::ShiftChanged {
            rider: id("r3"),
            online: true,
            capacity: Some(1),
        },
    );
    s.order(1.0, "o1");
    s.order(1.0, "o2");
    let not_offered = s.grab(2.0, "o1", "r2");
    let unknown = s.grab(2.0, "nope", "r1");
    // r1 and r2 ride away, so o4 is offered to r3 alone; then ops give r3
    // another order, filling its capacity of one, before it grabs o4.
    s.order(3.0, "o3");
    s.ping(4.0, "r1", 9000.0);
    s.ping(4.0, "r2", 9000.0);
    s.order(5.0, "o4");
    s.at(
        5.5,
        EventKind::Reassigned {
            order: id("o3"),
            rider: id("r3"),
        },
    );
    let over = s.grab(6.0, "o4", "r3");
    s.at(7.0, EventKind::OrderCancelled { order: id("o2") });
    let closed = s.grab(8.0, "o2", "r1");
    let expired = s.grab(40.0, "o4", "r3");
    let run = s.run(60.0);
    assert_eq!(
        run.grab(&not_offered),
        GrabOutcome::Lost(LossReason::NotOffered)
    );
    assert_eq!(
        run.grab(&unknown),
        GrabOutcome::Lost(LossReason::UnknownOrder)
    );
    assert_eq!(run.offers("o4")[0].1, "r3");
    assert_eq!(run.grab(&over), GrabOutcome::Lost(LossReason::OverCapacity));
    assert_eq!(
        run.grab(&closed),
        GrabOutcome::Lost(LossReason::OrderClosed)
    );
    assert_eq!(
        run.grab(&expired),
        GrabOutcome::Lost(LossReason::OfferExpired)
    );
}

#[test]
fn delivered_in_time_is_received_then_closed_with_a_pick_up_on_the_way() {
    let mut s = Script::new();
    s.city(&[100.0]);
    s.order(1.0, "o1");
    s.grab(2.0, "o1", "r1");
    let wrong = s.at(
        3.0,
        EventKind::PickedUp {
            order: id("o1"),
            rider: id("r9"),
        },
    );
    s.at(
        4.0,
        EventKind::PickedUp {
            order: id("o1"),
            rider: id("r1"),
        },
    );
    let cancel = s.at(5.0, EventKind::OrderCancelled { order: id("o1") });
    s.at(
        600.0,
        EventKind::Delivered {
            order: id("o1"),
            rider: id("r1"),
        },
    );
    let run = s.run(700.0);
    assert_eq!(run.rejected(&wrong), Some(RejectReason::NotAssignedRider));
    assert_eq!(run.rejected(&cancel), Some(RejectReason::InvalidState));
    let whys: Vec<_> = run
        .states("o1")
        .into_iter()
        .map(|(_, st, why)| (st, why))
        .collect();
    assert_eq!(
        whys,
        vec![
            (Created, Why::Placed),
            (Notified, Why::Offered),
            (Delivering, Why::Grabbed),
            (Delivering, Why::PickedUp),
            (Received, Why::Delivered),
            (Closed, Why::Completed)
        ]
    );
}

#[test]
fn a_late_order_goes_overtime_then_through_compensation_to_closed() {
    let mut s = Script::new();
    s.city(&[100.0]);
    s.order(1.0, "o1");
    s.grab(2.0, "o1", "r1");
    s.at(
        1900.0,
        EventKind::Delivered {
            order: id("o1"),
            rider: id("r1"),
        },
    );
    let early = s.at(
        1800.0,
        EventKind::CompensationSettled {
            order: id("o1"),
            amount_cents: 1,
        },
    );
    s.at(
        2000.0,
        EventKind::CompensationSettled {
            order: id("o1"),
            amount_cents: 500,
        },
    );
    let run = s.run(2100.0);
    assert_eq!(run.rejected(&early), Some(RejectReason::InvalidState));
    let tail: Vec<_> = run.states("o1").into_iter().skip(3).collect();
    assert_eq!(
        tail,
        vec![
            (1801.0, Overtime, Why::DeadlinePassed),
            (1900.0, Received, Why::Delivered),
            (1900.0, Compensating, Why::CompensationDue),
            (2000.0, Closed, Why::Compensated)
        ]
    );
}

#[test]
fn cancelling_before_pick_up_closes_and_withdraws_offers_or_the_assignment() {
    let mut s = Script::new();
    s.city(&[100.0, 200.0]);
    s.order(1.0, "o1");
    s.at(2.0, EventKind::OrderCancelled { order: id("o1") });
    s.order(3.0, "o2");
    s.grab(4.0, "o2", "r2");
    s.at(5.0, EventKind::OrderCancelled { order: id("o2") });
    let run = s.run(10.0);
    assert_eq!(
        run.states("o1").last().unwrap(),
        &(2.0, Closed, Why::Cancelled)
    );
    assert_eq!(
        run.states("o2").last().unwrap(),
        &(5.0, Closed, Why::Cancelled)
    );
    assert!(run
        .withdrawn("r1")
        .contains(&(2.0, WithdrawReason::Cancelled)));
    assert!(run
        .withdrawn("r2")
        .contains(&(5.0, WithdrawReason::Cancelled)));
}

#[test]
fn a_silent_rider_leaves_the_index_after_the_ttl_and_an_offline_one_at_once() {
    let mut s = Script::new();
    s.city(&[100.0, 200.0]);
    s.at(
        10.0,
        EventKind::ShiftChanged {
            rider: id("r2"),
            online: false,
            capacity: None,
        },
    );
    s.order(59.0, "o1");
    s.order(60.0, "o2");
    let run = s.run(65.0);
    assert_eq!(
        run.offers("o1")
            .iter()
            .map(|o| o.1.clone())
            .collect::<Vec<_>>(),
        vec!["r1"]
    );
    assert!(run.offers("o2").is_empty(), "r1 went silent at 60 s");
    assert_eq!(run.last_state("o2"), Created);
}

#[test]
fn ops_redispatch_takes_the_order_back_and_offers_it_again() {
    let mut s = Script::new();
    s.city(&[100.0, 200.0]);
    s.order(1.0, "o1");
    s.grab(2.0, "o1", "r1");
    s.at(3.0, EventKind::Redispatched { order: id("o1") });
    let run = s.run(5.0);
    assert!(run
        .withdrawn("r1")
        .contains(&(3.0, WithdrawReason::Redispatched)));
    let states = run.states("o1");
    assert!(states.contains(&(3.0, Created, Why::Redispatched)));
    assert_eq!(states.last().unwrap(), &(3.0, Notified, Why::Offered));
    assert_eq!(run.offers("o1").iter().filter(|o| o.0 == 3.0).count(), 2);
}

#[test]
fn ops_reassign_moves_the_order_to_the_named_rider() {
    let mut s = Script::new();
    s.city(&[100.0, 200.0]);
    s.order(1.0, "o1");
    s.grab(2.0, "o1", "r1");
    s.at(
        3.0,
        EventKind::Reassigned {
            order: id("o1"),
            rider: id("r2"),
        },
    );
    let run = s.run(5.0);
    assert!(run
        .withdrawn("r1")
        .contains(&(3.0, WithdrawReason::Reassigned)));
    assert!(run.0.contains(&(
        T0 + 3000,
        Output::Assigned {
            order: id("o1"),
            rider: id("r2")
        }
    )));
    assert_eq!(
        run.states("o1").last().unwrap(),
        &(3.0, Delivering, Why::Reassigned)
    );
}

#[test]
fn bad_orders_and_redelivered_events_are_rejected_or_dropped() {
    let mut s = Script::new();
    s.city(&[100.0]);
    s.at(
        0.0,
        EventKind::MerchantUpserted {
            merchant: id("closed"),
            at: city_centre(),
            open: false,
        },
    );
    let unknown = s.at(
        1.0,
        EventKind::OrderPlaced {
            order: id("a"),
            merchant: id("nope"),
            dropoff: north(0.0),
            promised_minutes: 5,
        },
    );
    let closed = s.at(
        1.0,
        EventKind::OrderPlaced {
            order: id("b"),
            merchant: id("closed"),
            dropoff: north(0.0),
            promised_minutes: 5,
        },
    );
    s.order(1.0, "o1");
    let dup = s.order(2.0, "o1");
    let grab = s.grab(3.0, "o1", "r1");
    // The same grab redelivered: dropped, not judged twice.
    let n = s.log.len();
    s.log.push(Event {
        id: grab.clone(),
        offset: n as u64,
        time: T0 + 4000,
        kind: EventKind::GrabAttempted {
            order: id("o1"),
            rider: id("r1"),
        },
    });
    let run = s.run(10.0);
    assert_eq!(run.rejected(&unknown), Some(RejectReason::UnknownMerchant));
    assert_eq!(run.rejected(&closed), Some(RejectReason::MerchantClosed));
    assert_eq!(run.rejected(&dup), Some(RejectReason::DuplicateOrder));
    let decided = run
        .0
        .iter()
        .filter(|(_, o)| matches!(o, Output::GrabDecided { .. }))
        .count();
    assert_eq!(decided, 1);
}

#[test]
fn a_closed_order_is_forgotten_after_its_retention_and_its_id_may_be_placed_again() {
    let mut s = Script::new();
    s.cfg.order_retention_ms = 60_000;
    s.city(&[100.0]);
    s.order(1.0, "o1"); // promised in 30 minutes
    let cancel = s.at(2.0, EventKind::OrderCancelled { order: id("o1") });
    let late_grab = s.grab(61.0, "o1", "r1"); // within the retention
    let again = s.at(61.5, EventKind::OrderCancelled { order: id("o1") });
    let forgotten_grab = s.grab(63.0, "o1", "r1"); // 61 s after it closed
    s.ping(65.0, "r1", 100.0);
    s.order(70.0, "o1");
    let run = s.run(2000.0);
    assert_eq!(run.rejected(&cancel), None);
    assert_eq!(
        run.grab(&late_grab),
        GrabOutcome::Lost(LossReason::OrderClosed)
    );
    assert_eq!(run.rejected(&again), Some(RejectReason::InvalidState));
    assert_eq!(
        run.grab(&forgotten_grab),
        GrabOutcome::Lost(LossReason::UnknownOrder)
    );
    // Placed again: a new order, and the first placement's deadline (at
    // 1801 s) does not make it overdue; its own (at 1870 s) does.
    let states = run.states("o1");
    assert_eq!(states[3], (70.0, Created, Why::Placed), "{states:?}");
    assert_eq!(states[4], (70.0, Notified, Why::Offered), "{states:?}");
    let grab = s.grab(80.0, "o1", "r1");
    let run = s.run(2000.0);
    assert_eq!(run.grab(&grab), GrabOutcome::Won);
    let overtime: Vec<f64> = run
        .states("o1")
        .into_iter()
        .filter(|(_, to, _)| *to == Overtime)
        .map(|(t, _, _)| t)
        .collect();
    assert_eq!(overtime, vec![1870.0]);
}

#[test]
fn a_rider_idle_past_its_retention_comes_back_off_shift_until_its_next_shift() {
    let mut s = Script::new();
    s.cfg.rider_ttl_ms = 10_000;
    s.cfg.rider_retention_ms = 60_000;
    s.city(&[100.0]); // on shift and pinged at 0 s
    s.ping(50.0, "r1", 100.0); // within the retention: still on shift
    s.order(51.0, "o1");
    s.ping(200.0, "r1", 100.0); // 150 s of silence: forgotten
    s.order(201.0, "o2");
    s.at(
        205.0,
        EventKind::ShiftChanged {
            rider: id("r1"),
            online: true,
            capacity: None,
        },
    );
    let run = s.run(220.0);
    assert_eq!(run.offers("o1")[0].0, 51.0);
    assert_eq!(run.offers("o2"), vec![(205.0, "r1".into(), 100, 0)]);
}
