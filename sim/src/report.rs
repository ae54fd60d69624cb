//! What the simulator measured, and how it is shown.

use serde::Serialize;
use std::collections::BTreeMap;

/// Latency figures of one kind, milliseconds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Latency {
    /// Samples taken.
    pub samples: usize,
    /// Median.
    pub p50_ms: f64,
    /// 95th percentile.
    pub p95_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
}

impl Latency {
    /// Figures from raw samples.
    pub fn of(samples: &[f64]) -> Latency {
        let mut v = samples.to_vec();
        v.sort_by(f64::total_cmp);
        let at = |p: f64| {
            if v.is_empty() {
                0.0
            } else {
                v[((v.len() - 1) as f64 * p).round() as usize]
            }
        };
        Latency {
            samples: v.len(),
            p50_ms: at(0.5),
            p95_ms: at(0.95),
            p99_ms: at(0.99),
        }
    }
}

/// One simulated minute.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Minute {
    /// Simulated clock, hours (e.g. 12.5 is 12:30).
    pub hour: f64,
    /// Orders placed.
    pub placed: u64,
    /// Orders won by a rider.
    pub grabbed: u64,
    /// Orders delivered.
    pub delivered: u64,
    /// Orders cancelled.
    pub cancelled: u64,
    /// Median order → first offer, ms (0 when none).
    pub offer_p50_ms: f64,
}

/// The end-of-run report (`--json` writes it as is).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    /// Requests and pings sent.
    pub events_sent: u64,
    /// Orders accepted by the server.
    pub orders_placed: u64,
    /// Orders that reached at least one rider's stream.
    pub orders_offered: u64,
    /// Orders won by a rider.
    pub orders_grabbed: u64,
    /// Orders delivered.
    pub orders_delivered: u64,
    /// Orders cancelled by the simulated customers.
    pub orders_cancelled: u64,
    /// Share of grabbed orders won in their first offer round.
    pub first_round_share: f64,
    /// Offer rounds that timed out.
    pub grab_timeouts: u64,
    /// Orders redispatched.
    pub redispatches: u64,
    /// Share of delivered orders that went overtime.
    pub overtime_rate: f64,
    /// Orders with more than one winning grab (must be 0).
    pub double_winners: u64,
    /// Every placed order's final state, as the server reports it.
    pub final_states: BTreeMap<String, u64>,
    /// The server's own `orders_by_state` at the end.
    pub server_orders_by_state: BTreeMap<String, i64>,
    /// Whether the two agree.
    pub consistent_with_server: bool,
    /// Order placed → first offer on a rider's stream.
    pub order_to_first_offer: Latency,
    /// Grab request → its decided answer.
    pub grab_to_result: Latency,
    /// Location ping → the rider at that position in the dispatch index.
    pub location_to_index: Latency,
    /// Errors by kind (HTTP status, code or transport).
    pub errors: BTreeMap<String, u64>,
    /// The day, minute by minute.
    pub minutes: Vec<Minute>,
}

impl Report {
    /// The report as text for people.
    pub fn render(&self) -> String {
        let lat = |l: &Latency| {
            format!(
                "p50 {:.1} ms  p95 {:.1} ms  p99 {:.1} ms  ({} samples)",
                l.p50_ms, l.p95_ms, l.p99_ms, l.samples
            )
        };
        let mut s = String::new();
        s += &format!("events sent          {}\n", self.events_sent);
        s += &format!(
            "orders               placed {}  offered {}  grabbed {}  delivered {}  cancelled {}\n",
            self.orders_placed,
            self.orders_offered,
            self.orders_grabbed,
            self.orders_delivered,
            self.orders_cancelled
        );
        s += &format!(
            "grabbed on 1st round {:.1}%\n",
            self.first_round_share * 100.0
        );
        s += &format!(
            "grab timeouts        {}   redispatches {}\n",
            self.grab_timeouts, self.redispatches
        );
        s += &format!("overtime rate        {:.1}%\n", self.overtime_rate * 100.0);
        s += &format!("double winners       {}\n", self.double_winners);
        s += &format!("order → first offer  {}\n", lat(&self.order_to_first_offer));
        s += &format!("grab → result        {}\n", lat(&self.grab_to_result));
        s += &format!("location → index     {}\n", lat(&self.location_to_index));
        s += &format!("final states         {:?}\n", self.final_states);
        s += &format!("server agrees        {}\n", self.consistent_with_server);
        s += &format!("errors               {:?}\n", self.errors);
        s
    }
}
