//! The simulated city: merchant clusters, a street grid, the day's shape.

use grabflow_api::Coord;
use rand::rngs::StdRng;
use rand::Rng;
use rand_distr::{Distribution, Normal};

/// Scooter speed, metres per simulated second (~22 km/h).
pub const SPEED_MPS: f64 = 6.0;

/// The city centre (People's Square, Shanghai).
pub fn centre() -> Coord {
    Coord::from_degrees(31.23, 121.47).expect("on the globe")
}

/// Merchants in clusters (malls, food streets): `n` merchants around
/// `n / 15` cluster centres spread over the city.
pub fn merchants(rng: &mut StdRng, n: usize) -> Vec<Coord> {
    let clusters = (n / 15).max(2);
    let city = Normal::new(0.0, 2_500.0).expect("positive");
    let street = Normal::new(0.0, 150.0).expect("positive");
    let centres: Vec<Coord> = (0..clusters)
        .map(|_| centre().offset_m(city.sample(rng), city.sample(rng)))
        .collect();
    (0..n)
        .map(|i| centres[i % clusters].offset_m(street.sample(rng), street.sample(rng)))
        .collect()
}

/// Where riders start: spread over the city.
pub fn rider_start(rng: &mut StdRng) -> Coord {
    let city = Normal::new(0.0, 2_500.0).expect("positive");
    centre().offset_m(city.sample(rng), city.sample(rng))
}

/// Orders per minute relative to the base rate at `hour` (0–24): lunch and
/// dinner peaks over a low base.
pub fn day_shape(hour: f64) -> f64 {
    let bump =
        |centre: f64, width: f64, height: f64| height * (-((hour - centre) / width).powi(2)).exp();
    0.25 + bump(12.25, 0.75, 1.0) + bump(18.5, 1.0, 0.9)
}

/// Moves `from` towards `to` along the street grid (north–south first, then
/// east–west) by at most `metres`; returns the new point and whether it arrived.
pub fn step_towards(from: Coord, to: Coord, metres: f64) -> (Coord, bool) {
    let north = (to.lat() - from.lat()) * 111_194.93;
    let east = (to.lon() - from.lon()) * 111_194.93 * from.lat().to_radians().cos();
    let total = north.abs() + east.abs();
    if total <= metres {
        return (to, true);
    }
    let n = north.signum() * north.abs().min(metres);
    let left = metres - n.abs();
    let e = east.signum() * east.abs().min(left);
    (from.offset_m(n, e), false)
}

/// A drop-off 0.5–4 km from the merchant.
pub fn dropoff(rng: &mut StdRng, merchant: Coord) -> Coord {
    let d = rng.random_range(500.0..4_000.0);
    let a: f64 = rng.random_range(0.0..std::f64::consts::TAU);
    merchant.offset_m(d * a.cos(), d * a.sin())
}

#[cfg(test)]
mod tests {
    use super::*;
    use grabflow_api::geo::distance_m;

    #[test]
    fn riders_reach_their_target_along_the_grid() {
        let (a, b) = (centre(), centre().offset_m(300.0, -400.0));
        let mut at = a;
        let mut steps = 0;
        loop {
            let (next, arrived) = step_towards(at, b, 30.0);
            assert!(distance_m(at, next) <= 30.5);
            at = next;
            steps += 1;
            if arrived {
                break;
            }
        }
        assert_eq!(steps, 24);
        assert!(day_shape(12.25) > 3.0 * day_shape(9.0) && day_shape(18.5) > 3.0 * day_shape(15.5));
    }
}
