//! Seeded event logs: small adversarial ones for the property tests, and a
//! generated city for the benchmark.

use crate::reference::Reference;
use grabflow_api::{Coord, DispatchConfig, Event, EventKind, Id, Time};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal, Zipf};

/// The centre of generated cities: People's Square, Shanghai.
pub fn city_centre() -> Coord {
    Coord::from_degrees(31.23, 121.47).expect("on the globe")
}

fn id(prefix: &str, n: usize) -> Id {
    Id::new(&format!("{prefix}{n}")).expect("generated ids are valid")
}

/// A dispatch configuration scaled down so that small random logs hit every
/// rule: radius growth, timeouts, capacity limits, silent riders, deadlines,
/// forgotten orders and riders.
pub fn small_config(rng: &mut StdRng) -> DispatchConfig {
    let rider_ttl_ms = rng.random_range(5_000..40_000);
    let grab_timeout_ms = rng.random_range(2_000..20_000);
    DispatchConfig {
        radius_m: rng.random_range(300.0..1200.0),
        max_radius_m: 2500.0,
        radius_growth: 1.5,
        offers: rng.random_range(1..4),
        grab_timeout_ms,
        rider_ttl_ms,
        default_capacity: rng.random_range(1..3),
        dedup_window_ms: rng.random_range(1_000..60_000),
        order_retention_ms: rng.random_range(5_000..120_000),
        rider_retention_ms: rider_ttl_ms.max(grab_timeout_ms) + rng.random_range(0..120_000),
    }
}

/// A random log of about `n` events for the property tests, from `seed`.
///
/// A reference model runs alongside the generator so that grabs, pick-ups and
/// deliveries mostly name riders that hold an offer or an assignment (races
/// and life cycles then actually happen), while a share stay invalid on
/// purpose. Times collide often (same-millisecond races); some events are
/// redelivered with their original id. Returns the config, the log and an end
/// time past the last event.
pub fn random_log(seed: u64, n: usize) -> (DispatchConfig, Vec<Event>, Time) {
    let mut rng = StdRng::seed_from_u64(seed);
    let cfg = small_config(&mut rng);
    let centre = city_centre();
    let n_riders = rng.random_range(2..9);
    let n_merchants = rng.random_range(1..5);
    let mut model = Reference::new(cfg.clone());
    let mut log: Vec<Event> = Vec::new();
    let mut t: Time = 1_700_000_000_000;
    let mut pos: Vec<Coord> = (0..n_riders)
        .map(|_| {
            centre.offset_m(
                rng.random_range(-1500.0..1500.0),
                rng.random_range(-1500.0..1500.0),
            )
        })
        .collect();
    let mut orders = 0usize;
    let mut pending: Vec<Event> = Vec::new();
    while log.len() < n {
        // Advance time: often not at all (same-millisecond events).
        let gap = match rng.random_range(0..10) {
            0..=2 => 0,
            3..=7 => rng.random_range(1..2_000),
            _ => rng.random_range(2_000..15_000),
        };
        if gap > 0 {
            let step: Vec<&Event> = pending.iter().collect();
            model.step(t, step);
            pending.clear();
            // Let timers between now and the next time fire in the model too.
            for due in model.timer_times_before(t + gap) {
                model.step(due, Vec::new());
            }
            t += gap;
        }
        let rider = rng.random_range(0..n_riders);
        let order = if orders == 0 {
            0
        } else {
            rng.random_range(0..orders)
        };
        let kind = match rng.random_range(0..100) {
            0..=4 => EventKind::MerchantUpserted {
                merchant: id("m", rng.random_range(0..n_merchants)),
                at: centre.offset_m(
                    rng.random_range(-1000.0..1000.0),
                    rng.random_range(-1000.0..1000.0),
                ),
                open: rng.random_bool(0.85),
            },
            5..=10 => EventKind::ShiftChanged {
                rider: id("r", rider),
                online: rng.random_bool(0.8),
                capacity: rng.random_bool(0.5).then(|| rng.random_range(1..4)),
            },
            11..=44 => {
                pos[rider] = pos[rider].offset_m(
                    rng.random_range(-400.0..400.0),
                    rng.random_range(-400.0..400.0),
                );
                EventKind::LocationPinged {
                    rider: id("r", rider),
                    at: pos[rider],
                }
            }
            45..=56 => {
                orders += 1;
                let dup = rng.random_bool(0.05) && orders > 1;
                EventKind::OrderPlaced {
                    order: id("o", if dup { order } else { orders - 1 }),
                    merchant: id("m", rng.random_range(0..n_merchants + 1)),
                    dropoff: centre.offset_m(rng.random_range(-2000.0..2000.0), 0.0),
                    promised_minutes: rng.random_range(1..4),
                }
            }
            57..=74 => {
                let o = id("o", order);
                let offered = model.offered_riders(&o);
                let r = if !offered.is_empty() && rng.random_bool(0.8) {
                    offered[rng.random_range(0..offered.len())].clone()
                } else {
                    id("r", rider)
                };
                EventKind::GrabAttempted {
                    order: if rng.random_bool(0.03) { id("x", 0) } else { o },
                    rider: r,
                }
            }
            75..=89 => {
                let o = id("o", order);
                let r = match model.assigned_rider(&o) {
                    Some(r) if rng.random_bool(0.85) => r,
                    _ => id("r", rider),
                };
                if rng.random_bool(0.5) {
                    EventKind::PickedUp { order: o, rider: r }
                } else {
                    EventKind::Delivered { order: o, rider: r }
                }
            }
            90..=92 => EventKind::OrderCancelled {
                order: id("o", order),
            },
            93..=94 => EventKind::CompensationSettled {
                order: id("o", order),
                amount_cents: 500,
            },
            95..=96 => EventKind::Redispatched {
                order: id("o", order),
            },
            _ => EventKind::Reassigned {
                order: id("o", order),
                rider: id("r", rider),
            },
        };
        let offset = log.len() as u64;
        let event = if rng.random_bool(0.03) && !log.is_empty() {
            // A redelivery: an earlier event's id and content, appended again.
            let old = &log[rng.random_range(0..log.len())];
            Event {
                id: old.id.clone(),
                offset,
                time: t,
                kind: old.kind.clone(),
            }
        } else {
            Event {
                id: id("e", log.len()),
                offset,
                time: t,
                kind,
            }
        };
        pending.push(event.clone());
        log.push(event);
    }
    (cfg, log, t + 200_000)
}

/// The benchmark's city: riders normally distributed around the centre,
/// merchants likewise, orders Zipf-distributed over merchants.
pub struct City {
    /// Rider positions, indexed by rider number.
    pub riders: Vec<Coord>,
    /// Merchant positions, indexed by merchant number.
    pub merchants: Vec<Coord>,
    rng: StdRng,
    zipf: Zipf<f64>,
    next_event: usize,
    next_order: usize,
}

impl City {
    /// A city of `riders` and `merchants` spread with standard deviation `sigma_m`.
    pub fn new(seed: u64, riders: usize, merchants: usize, sigma_m: f64) -> City {
        let mut rng = StdRng::seed_from_u64(seed);
        let normal = Normal::new(0.0, sigma_m).expect("sigma is positive");
        let centre = city_centre();
        let place = |rng: &mut StdRng| centre.offset_m(normal.sample(rng), normal.sample(rng));
        let riders: Vec<Coord> = (0..riders).map(|_| place(&mut rng)).collect();
        let merchants: Vec<Coord> = (0..merchants).map(|_| place(&mut rng)).collect();
        let zipf = Zipf::new(merchants_len(&merchants), 1.0).expect("at least one merchant");
        City {
            riders,
            merchants,
            rng,
            zipf,
            next_event: 0,
            next_order: 0,
        }
    }

    fn event(&mut self, time: Time, kind: EventKind) -> Event {
        let n = self.next_event;
        self.next_event += 1;
        Event {
            id: id("e", n),
            offset: n as u64,
            time,
            kind,
        }
    }

    /// Every merchant opens and every rider starts a shift and pings, at `t`.
    pub fn opening(&mut self, t: Time) -> Vec<Event> {
        let mut out = Vec::new();
        for m in 0..self.merchants.len() {
            let kind = EventKind::MerchantUpserted {
                merchant: id("m", m),
                at: self.merchants[m],
                open: true,
            };
            out.push(self.event(t, kind));
        }
        for r in 0..self.riders.len() {
            out.push(self.event(
                t,
                EventKind::ShiftChanged {
                    rider: id("r", r),
                    online: true,
                    capacity: None,
                },
            ));
            out.push(self.event(
                t,
                EventKind::LocationPinged {
                    rider: id("r", r),
                    at: self.riders[r],
                },
            ));
        }
        out
    }

    /// One ping per rider spread evenly over `period` ms from `t`, each rider
    /// moving up to `max_move_m`.
    pub fn ping_round(&mut self, t: Time, period: Time, max_move_m: f64) -> Vec<Event> {
        let n = self.riders.len();
        let mut out = Vec::with_capacity(n);
        for r in 0..n {
            let (dn, de) = (
                self.rng.random_range(-1.0..1.0),
                self.rng.random_range(-1.0..1.0),
            );
            let scale = max_move_m / f64::hypot(dn, de).max(1.0);
            self.riders[r] = self.riders[r].offset_m(dn * scale, de * scale);
            let at_time = t + (r as Time * period) / n as Time;
            out.push(self.event(
                at_time,
                EventKind::LocationPinged {
                    rider: id("r", r),
                    at: self.riders[r],
                },
            ));
        }
        out
    }

    /// `count` orders spread evenly over `period` ms from `t`, merchants by Zipf.
    pub fn orders(&mut self, t: Time, period: Time, count: usize) -> Vec<Event> {
        (0..count)
            .map(|i| {
                let m = self.zipf.sample(&mut self.rng) as usize - 1;
                let o = self.next_order;
                self.next_order += 1;
                let dropoff =
                    self.merchants[m].offset_m(self.rng.random_range(-3000.0..3000.0), 0.0);
                let kind = EventKind::OrderPlaced {
                    order: id("o", o),
                    merchant: id("m", m),
                    dropoff,
                    promised_minutes: 30,
                };
                self.event(t + (i as Time * period) / count.max(1) as Time, kind)
            })
            .collect()
    }
}

fn merchants_len(m: &[Coord]) -> f64 {
    m.len().max(1) as f64
}
