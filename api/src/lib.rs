//! # grabflow-api — the shared vocabulary
//!
//! Everything the other crates agree on, and nothing that does I/O: the
//! events that enter the log, the records the dispatch computation emits,
//! identifiers, coordinates and distances, and the dispatch configuration.
//! Ingress validates into these types, the dataflow computes over them, and
//! egress renders them; the wire form is serde JSON (the embedded log and
//! timely's exchange use a binary serde form).
//!
//! ## Layout
//!
//! - [`id`]: [`Id`], the validated 1–64 character identifier used for every
//!   entity and event.
//! - [`geo`]: [`Coord`] (fixed-point WGS84, so it can be ordered and hashed in
//!   a dataflow) and the one distance function both dispatch models share.
//! - [`event`]: [`Event`] and [`EventKind`], what the log holds.
//! - [`output`]: [`Output`], what dispatch decides: offers, withdrawals, grab
//!   results, assignments, order transitions and rejections.
//! - [`source`]: [`Source`], where one dataflow worker's events come from
//!   (implemented by the logs, polled by the dataflow's runtime).
//! - [`topics`]: production mode's Kafka topics and record values.
//! - [`source`]: [`Source`], where a dataflow worker's events come from
//!   (implemented by the log, read by the dataflow's runtime).
//! - [`config`]: [`DispatchConfig`], the tunables of the dispatch rules.
//! - [`lifecycle`]: [`Thread`](lifecycle::Thread), the one handle for every
//!   background thread (stop, join, a panic reported with its name).

pub mod config;
pub mod event;
pub mod geo;
pub mod id;
pub mod lifecycle;
pub mod output;
pub mod source;
pub mod topics;

pub use config::DispatchConfig;
pub use event::{Event, EventKind, Feed};
pub use geo::Coord;
pub use id::{Id, IdError};
pub use output::{GrabOutcome, LossReason, OrderState, Output, RejectReason, WithdrawReason};
pub use source::Source;

/// Log time: Unix milliseconds assigned by the log. It is the dataflow's timestamp.
pub type Time = u64;
