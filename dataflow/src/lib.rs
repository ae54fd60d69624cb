//! # grabflow-dataflow — the dispatch computation
//!
//! Rider pings, shifts, merchants, orders and grab attempts go in as one
//! differential collection of [`Event`](grabflow_api::Event)s timestamped
//! with their log time; the merchant→rider index and the decisions (offers,
//! grab results, order transitions, …) come out as collections. Everything is a pure function of
//! the event log, so replaying the log (at any number of workers) gives the
//! same outputs; [`reference`](mod@reference) is the same rules written as one plain loop,
//! and the tests hold the two equal on many random logs.
//!
//! ## Layout
//!
//! - [`graph`]: the dataflow — `dispatch(events) -> Dispatch` and its named
//!   operators (`dedup`, `track_riders`, `decide`).
//! - [`dispatcher`]: the decision core run by `decide` (orders, offers, grab
//!   races, loads, timers).
//! - [`riders`]: per-rider tracking run by `track_riders` (positions, shifts,
//!   silence timeouts), partitioned over workers; `RiderTables` shares the
//!   trackers with the rider query.
//! - [`geo_index`]: H3 cells, the rider index and exact ring search.
//! - [`dedup`]: dropping redelivered events by id.
//! - [`reference`](mod@reference): the sequential reference model (HashMaps, one loop).
//! - [`replay`]: running a finished log through the dataflow at N workers.
//! - [`runtime`]: the live workers, fed from the log, reporting to an observer.
//! - [`checkpoint`]: every stateful operator's state as of one log time,
//!   gathered from the workers, and restoring from it (at any number of
//!   workers).
//! - [`stats`]: per-operator figures from timely's logging, and what each
//!   stateful operator reports holding.
//! - [`gen`]: seeded random logs (for property tests) and a generated city
//!   (for the benchmark).

pub mod checkpoint;
pub mod dedup;
pub mod dispatcher;
pub mod gen;
pub mod geo_index;
pub mod graph;
pub mod reference;
pub mod replay;
pub mod riders;
pub mod runtime;
pub mod stats;

use grabflow_api::{Coord, Id};
use serde::{Deserialize, Serialize};

/// One rider in the index: on shift, pinged within the TTL, at `at` in `cell`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct IndexEntry {
    /// H3 resolution-8 cell.
    pub cell: u64,
    /// The rider.
    pub rider: Id,
    /// The rider's last reported position.
    pub at: Coord,
}
