//! The geo-cell index of riders, and nearest-rider search over it.
//!
//! Riders are bucketed by H3 cell (resolution 8, ~0.46 km edges). A ping
//! that stays in its cell only overwrites the rider's position: O(1). A
//! search walks rings of cells outward from the query point and stops as soon
//! as no rider in a further ring can be within the radius or beat the K-th
//! best found so far, so a dispatch costs O(candidates near the merchant), not
//! O(riders).
//!
//! The stopping rule is exact: every point of a cell lies within
//! [`MAX_CELL_RADIUS_M`] of the cell's centre, so `distance(p, centre) −
//! MAX_CELL_RADIUS_M` bounds from below the distance to any rider in that
//! cell; and a rider in ring `d + 1` or beyond can only be reached from the
//! origin cell through ring `d`, so the bound of ring `d` holds for all
//! further rings too.

use grabflow_api::geo::distance_m;
use grabflow_api::{Coord, Id};
use h3o::{CellIndex, LatLng, Resolution};
use rustc_hash::{FxHashMap, FxHashSet};

/// The H3 resolution of the index.
pub const RESOLUTION: Resolution = Resolution::Eight;

/// No point of a resolution-8 cell is further than this from the cell's
/// centre (the largest res-8 circumradius is ~0.53 km; checked in tests).
pub const MAX_CELL_RADIUS_M: f64 = 700.0;

/// Rings searched at the most: beyond any sensible radius at resolution 8.
const MAX_RING: u32 = 64;

/// The H3 cell (as its `u64` index) containing `at`.
pub fn cell_of(at: Coord) -> u64 {
    let ll = LatLng::new(at.lat(), at.lon()).expect("coordinates are validated on entry");
    u64::from(ll.to_cell(RESOLUTION))
}

/// The corners of the H3 cell `cell` (as [`cell_of`] gives it), in order
/// around it; empty for a number that is not a cell.
pub fn cell_boundary(cell: u64) -> Vec<Coord> {
    let Ok(cell) = CellIndex::try_from(cell) else {
        return Vec::new();
    };
    cell.boundary()
        .iter()
        .filter_map(|ll| Coord::from_degrees(ll.lat(), ll.lng()).ok())
        .collect()
}

/// A cell's outline in a local planar frame (metres), to tell cheaply that
/// a nearby point is still inside it: H3 resolution 8 `cell_of` costs about
/// 0.4 µs, the test below about 20 ns, and riders mostly ping from the cell
/// they were in.
#[derive(Clone, Debug)]
pub struct CellShape {
    /// The cell.
    pub cell: u64,
    cos_lat: f64,
    /// Vertices, counter-clockwise, in the planar frame.
    verts: Vec<(f64, f64)>,
}

/// A point closer than this to the outline is decided by `cell_of` itself.
/// (The planar outline differs from the true one by millimetres at this size.)
const EDGE_MARGIN_M: f64 = 0.5;

const M_PER_DEG: f64 = 111_194.93;

impl CellShape {
    /// The outline of the cell containing `at`.
    pub fn of(at: Coord) -> CellShape {
        let cell = cell_of(at);
        let cos_lat = at.lat().to_radians().cos();
        let mut verts: Vec<(f64, f64)> = cell_index(cell)
            .boundary()
            .iter()
            .map(|ll| (ll.lng() * cos_lat * M_PER_DEG, ll.lat() * M_PER_DEG))
            .collect();
        let area2: f64 = (0..verts.len())
            .map(|i| {
                let (a, b) = (verts[i], verts[(i + 1) % verts.len()]);
                a.0 * b.1 - b.0 * a.1
            })
            .sum();
        if area2 < 0.0 {
            verts.reverse();
        }
        CellShape {
            cell,
            cos_lat,
            verts,
        }
    }

    /// Whether `at` is certainly inside this cell (false means "ask `cell_of`").
    pub fn surely_contains(&self, at: Coord) -> bool {
        let p = (at.lon() * self.cos_lat * M_PER_DEG, at.lat() * M_PER_DEG);
        let n = self.verts.len();
        n >= 3
            && (0..n).all(|i| {
                let (a, b) = (self.verts[i], self.verts[(i + 1) % n]);
                let (ex, ey) = (b.0 - a.0, b.1 - a.1);
                let cross = ex * (p.1 - a.1) - ey * (p.0 - a.0);
                cross > EDGE_MARGIN_M * (ex * ex + ey * ey).sqrt()
            })
    }
}

fn cell_index(cell: u64) -> CellIndex {
    CellIndex::try_from(cell).expect("cells in the index come from cell_of")
}

fn center(cell: CellIndex) -> Coord {
    let ll = LatLng::from(cell);
    Coord::from_degrees(ll.lat(), ll.lng()).expect("cell centres are on the globe")
}

/// Cells at grid distance `d` from `origin`, each with a lower bound on the
/// distance from `p` to any point inside it, and the ring's overall bound.
fn ring(origin: CellIndex, d: u32, p: Coord) -> (Vec<(u64, f64)>, f64) {
    let cells: Vec<CellIndex> = if d == 0 {
        vec![origin]
    } else {
        origin.grid_ring(d)
    };
    let mut lower = f64::INFINITY;
    let cells = cells
        .into_iter()
        .map(|c| {
            let lb = (distance_m(p, center(c)) - MAX_CELL_RADIUS_M).max(0.0);
            lower = lower.min(lb);
            (u64::from(c), lb)
        })
        .collect();
    (cells, lower)
}

/// Every cell that may hold a point within `radius_m` of `p`.
pub fn cells_within(p: Coord, radius_m: f64) -> Vec<u64> {
    let origin = cell_index(cell_of(p));
    let mut out = Vec::new();
    for d in 0..=MAX_RING {
        let (cells, lower) = ring(origin, d, p);
        if lower > radius_m {
            break;
        }
        out.extend(
            cells
                .into_iter()
                .filter(|&(_, lb)| lb <= radius_m)
                .map(|(c, _)| c),
        );
    }
    out
}

/// Riders bucketed by cell, with their exact positions.
#[derive(Clone, Default, Debug, serde::Serialize, serde::Deserialize)]
pub struct GeoIndex {
    /// Each indexed rider's cell and position.
    riders: FxHashMap<Id, (u64, Coord)>,
    /// The riders in each non-empty cell.
    cells: FxHashMap<u64, FxHashSet<Id>>,
}

impl GeoIndex {
    /// Puts `rider` at `at` in `cell`, moving it if it was elsewhere.
    /// Returns whether the rider is new to the index or changed position.
    pub fn upsert(&mut self, rider: &Id, cell: u64, at: Coord) -> bool {
        match self.riders.get_mut(rider) {
            Some(entry) if entry.0 == cell => {
                let moved = entry.1 != at;
                entry.1 = at;
                moved
            }
            Some(entry) => {
                let old = std::mem::replace(entry, (cell, at)).0;
                self.remove_from_cell(old, rider);
                self.cells.entry(cell).or_default().insert(rider.clone());
                true
            }
            None => {
                self.riders.insert(rider.clone(), (cell, at));
                self.cells.entry(cell).or_default().insert(rider.clone());
                true
            }
        }
    }

    /// Applies one millisecond of changes of the index collection: insertions
    /// take effect first; a retraction then removes a rider only if the index
    /// still holds exactly the retracted entry (otherwise the rider moved).
    /// Calls `placed` for every rider that appeared or moved.
    pub fn apply<'a>(
        &mut self,
        changes: impl Iterator<Item = (&'a crate::IndexEntry, isize)> + Clone,
        mut placed: impl FnMut(&'a crate::IndexEntry),
    ) {
        for (e, diff) in changes.clone() {
            if diff > 0 && self.upsert(&e.rider, e.cell, e.at) {
                placed(e);
            }
        }
        for (e, diff) in changes {
            if diff < 0 && self.get(&e.rider) == Some((e.cell, e.at)) {
                self.remove(&e.rider);
            }
        }
    }

    /// Takes `rider` out of the index.
    pub fn remove(&mut self, rider: &Id) {
        if let Some((cell, _)) = self.riders.remove(rider) {
            self.remove_from_cell(cell, rider);
        }
    }

    fn remove_from_cell(&mut self, cell: u64, rider: &Id) {
        if let Some(set) = self.cells.get_mut(&cell) {
            set.remove(rider);
            if set.is_empty() {
                self.cells.remove(&cell);
            }
        }
    }

    /// The rider's cell and position, if indexed.
    pub fn get(&self, rider: &Id) -> Option<(u64, Coord)> {
        self.riders.get(rider).copied()
    }

    /// Every indexed rider with its cell and position, in no order.
    pub fn iter(&self) -> impl Iterator<Item = (&Id, u64, Coord)> + '_ {
        self.riders.iter().map(|(r, &(cell, at))| (r, cell, at))
    }

    /// How many riders are indexed.
    pub fn len(&self) -> usize {
        self.riders.len()
    }

    /// Whether no rider is indexed.
    pub fn is_empty(&self) -> bool {
        self.riders.is_empty()
    }

    /// How many cells hold riders.
    pub fn cell_count(&self) -> usize {
        self.cells.len()
    }

    /// The `k` riders nearest to `p` within `radius_m` that pass `keep`,
    /// nearest first (ties by id), with their distances in metres.
    pub fn nearest(
        &self,
        p: Coord,
        radius_m: f64,
        k: usize,
        mut keep: impl FnMut(&Id) -> bool,
    ) -> Vec<(Id, f64)> {
        let mut found: Vec<(f64, &Id)> = Vec::new();
        if k == 0 || self.riders.is_empty() {
            return Vec::new();
        }
        let origin = cell_index(cell_of(p));
        for d in 0..=MAX_RING {
            let (cells, lower) = ring(origin, d, p);
            if lower > radius_m {
                break;
            }
            if found.len() >= k {
                found.select_nth_unstable_by(k - 1, |a, b| a.0.total_cmp(&b.0));
                found.truncate(k);
                let kth = found.iter().map(|f| f.0).fold(0.0, f64::max);
                if lower > kth {
                    break;
                }
            }
            for (cell, lb) in cells {
                if lb > radius_m {
                    continue;
                }
                let Some(members) = self.cells.get(&cell) else {
                    continue;
                };
                for rider in members {
                    let at = self.riders[rider].1;
                    let dist = distance_m(p, at);
                    if dist <= radius_m && keep(rider) {
                        found.push((dist, rider));
                    }
                }
            }
        }
        found.sort_by(|a, b| a.0.total_cmp(&b.0).then_with(|| a.1.cmp(b.1)));
        found.truncate(k);
        found.into_iter().map(|(d, r)| (r.clone(), d)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn id(s: String) -> Id {
        Id::new(&s).unwrap()
    }

    #[test]
    fn every_point_is_within_the_cell_radius_bound() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..200_000 {
            let p = Coord::from_degrees(
                rng.random_range(-85.0..85.0),
                rng.random_range(-180.0..180.0),
            )
            .unwrap();
            let c = cell_index(cell_of(p));
            assert!(distance_m(p, center(c)) <= MAX_CELL_RADIUS_M, "{p:?}");
        }
    }

    #[test]
    fn ring_search_equals_brute_force() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let base = Coord::from_degrees(31.23, 121.47).unwrap();
        for round in 0..40 {
            let mut index = GeoIndex::default();
            let mut all = Vec::new();
            let n = rng.random_range(0..400);
            for i in 0..n {
                let spread = if round % 2 == 0 { 4000.0 } else { 12000.0 };
                let at = base.offset_m(
                    rng.random_range(-spread..spread),
                    rng.random_range(-spread..spread),
                );
                let r = id(format!("r{i}"));
                index.upsert(&r, cell_of(at), at);
                all.push((r, at));
            }
            for _ in 0..30 {
                let p = base.offset_m(
                    rng.random_range(-6000.0..6000.0),
                    rng.random_range(-6000.0..6000.0),
                );
                let radius = rng.random_range(100.0..7000.0);
                let k = rng.random_range(1..25);
                let skip = rng.random_range(0..5);
                let keep = |r: &Id| !r.as_str().ends_with(&skip.to_string());
                let mut brute: Vec<(f64, Id)> = all
                    .iter()
                    .map(|(r, at)| (distance_m(p, *at), r.clone()))
                    .filter(|(d, r)| *d <= radius && keep(r))
                    .collect();
                brute.sort_by(|a, b| a.0.total_cmp(&b.0).then_with(|| a.1.cmp(&b.1)));
                brute.truncate(k);
                let got: Vec<(f64, Id)> = index
                    .nearest(p, radius, k, keep)
                    .into_iter()
                    .map(|(r, d)| (d, r))
                    .collect();
                assert_eq!(got, brute);
            }
        }
    }

    #[test]
    fn the_cell_shape_shortcut_never_disagrees_with_h3() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let mut shortcut = 0;
        for _ in 0..2_000 {
            let start = Coord::from_degrees(
                rng.random_range(-80.0..80.0),
                rng.random_range(-179.0..179.0),
            )
            .unwrap();
            let shape = CellShape::of(start);
            let mut at = start;
            for _ in 0..200 {
                at = at.offset_m(rng.random_range(-40.0..40.0), rng.random_range(-40.0..40.0));
                if shape.surely_contains(at) {
                    shortcut += 1;
                    assert_eq!(cell_of(at), shape.cell, "{at:?}");
                }
            }
        }
        assert!(
            shortcut > 100_000,
            "the shortcut should decide most nearby moves: {shortcut}"
        );
    }

    #[test]
    fn moves_and_removals_keep_cells_consistent() {
        let mut index = GeoIndex::default();
        let a = Coord::from_degrees(31.23, 121.47).unwrap();
        let far = a.offset_m(5000.0, 0.0);
        let r = id("r".into());
        assert!(index.upsert(&r, cell_of(a), a));
        assert!(!index.upsert(&r, cell_of(a), a));
        assert!(index.upsert(&r, cell_of(far), far));
        assert_eq!(index.cell_count(), 1);
        assert!(index.nearest(a, 1000.0, 5, |_| true).is_empty());
        assert_eq!(index.nearest(far, 10.0, 5, |_| true).len(), 1);
        index.remove(&r);
        assert!(index.is_empty() && index.cell_count() == 0);
        assert!(cells_within(a, 3000.0).len() > 20);
    }
}
