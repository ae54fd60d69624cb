//! Coordinates and distance.
//!
//! A [`Coord`] stores WGS84 degrees as fixed-point integers (1e-7 degree,
//! about 1 cm), so positions are exact, ordered and hashable inside
//! differential collections, and every dispatch model sees bit-identical
//! inputs. [`distance_m`] is the single distance function: the dataflow and
//! the reference model both rank riders with it, so they cannot disagree on
//! who is nearer.

use serde::{Deserialize, Serialize};

/// Fixed-point scale: units per degree.
const SCALE: f64 = 1e7;

/// Mean Earth radius in metres (IUGG), as used for haversine distances.
pub const EARTH_RADIUS_M: f64 = 6_371_008.8;

/// A WGS84 position in 1e-7 degrees.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Coord {
    /// Latitude in 1e-7 degrees, within ±90°.
    pub lat_e7: i32,
    /// Longitude in 1e-7 degrees, within ±180°.
    pub lon_e7: i32,
}

/// Why a pair of numbers is not a position.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CoordError {
    /// Latitude is not a finite number within ±90.
    #[error("lat must be a number from -90 to 90")]
    Lat,
    /// Longitude is not a finite number within ±180.
    #[error("lon must be a number from -180 to 180")]
    Lon,
}

impl Coord {
    /// A position from degrees, rejecting anything off the globe.
    pub fn from_degrees(lat: f64, lon: f64) -> Result<Self, CoordError> {
        if !lat.is_finite() || !(-90.0..=90.0).contains(&lat) {
            return Err(CoordError::Lat);
        }
        if !lon.is_finite() || !(-180.0..=180.0).contains(&lon) {
            return Err(CoordError::Lon);
        }
        Ok(Coord {
            lat_e7: (lat * SCALE).round() as i32,
            lon_e7: (lon * SCALE).round() as i32,
        })
    }

    /// Whether it lies within ±90° latitude and ±180° longitude (a decoded
    /// value is not checked by serde).
    pub fn is_valid(self) -> bool {
        self.lat_e7.unsigned_abs() <= 900_000_000 && self.lon_e7.unsigned_abs() <= 1_800_000_000
    }

    /// Latitude in degrees.
    pub fn lat(self) -> f64 {
        f64::from(self.lat_e7) / SCALE
    }

    /// Longitude in degrees.
    pub fn lon(self) -> f64 {
        f64::from(self.lon_e7) / SCALE
    }

    /// The point `north_m` metres north and `east_m` metres east of this one
    /// (small-offset approximation, clamped to the globe). For simulators.
    pub fn offset_m(self, north_m: f64, east_m: f64) -> Coord {
        let lat = (self.lat() + north_m / 111_194.93).clamp(-89.9, 89.9);
        let lon = self.lon() + east_m / (111_194.93 * lat.to_radians().cos());
        let lon = (lon + 540.0).rem_euclid(360.0) - 180.0;
        Coord::from_degrees(lat, lon).expect("clamped to the globe")
    }
}

/// Great-circle (haversine) distance in metres.
pub fn distance_m(a: Coord, b: Coord) -> f64 {
    let (la1, la2) = (a.lat().to_radians(), b.lat().to_radians());
    let dlat = la2 - la1;
    let dlon = (b.lon() - a.lon()).to_radians();
    let h = (dlat / 2.0).sin().powi(2) + la1.cos() * la2.cos() * (dlon / 2.0).sin().powi(2);
    2.0 * EARTH_RADIUS_M * h.sqrt().min(1.0).asin()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_positions_off_the_globe() {
        assert_eq!(Coord::from_degrees(90.1, 0.0), Err(CoordError::Lat));
        assert_eq!(Coord::from_degrees(f64::NAN, 0.0), Err(CoordError::Lat));
        assert_eq!(Coord::from_degrees(0.0, -180.5), Err(CoordError::Lon));
        assert!(Coord::from_degrees(-90.0, 180.0).is_ok());
    }

    #[test]
    fn distance_matches_known_values() {
        let shanghai = Coord::from_degrees(31.224361, 121.469170).unwrap();
        let paris = Coord::from_degrees(48.864716, 2.349014).unwrap();
        let d = distance_m(paris, shanghai);
        assert!((d - 9_262_547.0).abs() < 500.0, "{d}");
        let north = shanghai.offset_m(1000.0, 0.0);
        assert!((distance_m(shanghai, north) - 1000.0).abs() < 1.0);
        let east = shanghai.offset_m(0.0, 1000.0);
        assert!((distance_m(shanghai, east) - 1000.0).abs() < 2.0);
    }
}
