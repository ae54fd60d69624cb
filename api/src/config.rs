//! The dispatch rules' tunables.

use crate::Time;
use serde::{Deserialize, Serialize};

/// Configuration of the dispatch computation. Defaults follow the original
/// design: 3 km, 20 offers, ×1.5 per round up to 6 km, 30 s to grab, riders
/// silent for 60 s leave the index, 3 orders per rider. Closed orders are
/// forgotten an hour after they close, riders a day after their last ping or
/// shift (once they carry nothing).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DispatchConfig {
    /// Radius of the first offer round, metres.
    pub radius_m: f64,
    /// Cap on the radius as it grows with each timed-out round, metres.
    pub max_radius_m: f64,
    /// Factor the radius grows by after each round nobody grabbed.
    pub radius_growth: f64,
    /// How many riders (the K nearest available) receive each offer round.
    pub offers: usize,
    /// How long an offer round stays open before the order goes back to
    /// `created` and is offered again, milliseconds.
    pub grab_timeout_ms: Time,
    /// A rider silent for this long leaves the index, milliseconds.
    pub rider_ttl_ms: Time,
    /// Orders a rider may carry when their shift did not say.
    pub default_capacity: u32,
    /// How long event ids are remembered to drop redelivered events, ms.
    pub dedup_window_ms: Time,
    /// A closed order is forgotten this long after it closed, ms: events
    /// naming it are then `unknown_order`, and its id may be placed again.
    pub order_retention_ms: Time,
    /// A rider with no ping or shift for this long is forgotten, ms (at
    /// least `rider_ttl_ms` and `grab_timeout_ms`, so no offer it holds is
    /// still open): it is off shift with no position until its next shift.
    /// Orders it carries stay with it.
    pub rider_retention_ms: Time,
}

impl Default for DispatchConfig {
    fn default() -> Self {
        DispatchConfig {
            radius_m: 3000.0,
            max_radius_m: 6000.0,
            radius_growth: 1.5,
            offers: 20,
            grab_timeout_ms: 30_000,
            rider_ttl_ms: 60_000,
            default_capacity: 3,
            dedup_window_ms: 10 * 60 * 1000,
            order_retention_ms: 60 * 60 * 1000,
            rider_retention_ms: 24 * 60 * 60 * 1000,
        }
    }
}

impl DispatchConfig {
    /// The search radius of offer round `round` (0 is the first).
    pub fn radius_for_round(&self, round: u32) -> f64 {
        (self.radius_m * self.radius_growth.powi(round.min(64) as i32)).min(self.max_radius_m)
    }

    /// Checks the values make sense together; names the first field that does not.
    pub fn validate(&self) -> Result<(), (&'static str, &'static str)> {
        let positive = |v: f64| v.is_finite() && v > 0.0;
        if !positive(self.radius_m) {
            return Err(("radius_m", "must be a positive number of metres"));
        }
        if !positive(self.max_radius_m) || self.max_radius_m < self.radius_m {
            return Err(("max_radius_m", "must be at least radius_m"));
        }
        if !self.radius_growth.is_finite() || self.radius_growth < 1.0 {
            return Err(("radius_growth", "must be at least 1"));
        }
        if self.offers == 0 {
            return Err(("offers", "must be at least 1"));
        }
        if self.grab_timeout_ms == 0 {
            return Err(("grab_timeout", "must be positive"));
        }
        if self.rider_ttl_ms == 0 {
            return Err(("rider_ttl", "must be positive"));
        }
        if self.order_retention_ms == 0 {
            return Err(("order_retention", "must be positive"));
        }
        if self.rider_retention_ms < self.rider_ttl_ms.max(self.grab_timeout_ms) {
            return Err((
                "rider_retention",
                "must be at least rider_ttl and grab_timeout",
            ));
        }
        if self.default_capacity == 0 {
            return Err(("capacity", "must be at least 1"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn radius_grows_per_round_up_to_the_cap() {
        let c = DispatchConfig::default();
        assert_eq!(c.radius_for_round(0), 3000.0);
        assert_eq!(c.radius_for_round(1), 4500.0);
        assert_eq!(c.radius_for_round(2), 6000.0);
        assert_eq!(c.radius_for_round(1000), 6000.0);
        assert!(c.validate().is_ok());
        let bad = DispatchConfig {
            max_radius_m: 10.0,
            ..c
        };
        assert_eq!(bad.validate().unwrap_err().0, "max_radius_m");
    }
}
