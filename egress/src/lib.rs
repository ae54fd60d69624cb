//! # grabflow-egress — the way out
//!
//! What the dataflow decides reaches the world here: riders hold a
//! WebSocket or an SSE stream of offers, withdrawals, grab results and
//! assignments (each with a per-rider `seq`, resumable with `?after=SEQ`);
//! apps and ops query orders, riders and the merchant→rider index; ops read
//! live business figures, per-operator dataflow figures and Prometheus text.
//! The sinks carry the same decisions to Kafka's output topics and Redis.
//!
//! ## Layout
//!
//! - [`view`]: [`Egress`](view::Egress), the live view fed by the dataflow
//!   runtime (it implements the runtime's `Observer` and the waiting
//!   calls' `Waiter`). An offer leaves for a rider in `Egress::decisions`,
//!   which puts it in the rider's ring and wakes the rider's stream.
//! - [`history`]: [`History`](history::History), closed orders' histories
//!   on disk (`history.redb`), written by a thread of its own once they
//!   leave the view, answered until the history retention.
//! - [`state`]: [`EgressState`](state::EgressState), what the routes share.
//! - [`streams`]: the rider streams (WebSocket and SSE) reading the rings.
//! - [`routes`]: `routes(EgressState) -> Router`: the streams, the queries
//!   (orders, riders, nearby riders), ops figures, health.
//! - [`ops`]: the ops console's live feed (`/v1/ops/stream`): a summary
//!   each second computed once for every console and only while one
//!   listens, ops events as they happen, and the order → offer timing.
//! - [`console`]: the ops console's page at `/ops`, embedded in the binary.
//! - [`kafka`]: the output topics: the sink writing decisions and the index
//!   (exactly once across restarts), and the follower that feeds a split
//!   egress process's view from the topics.
//! - [`verdicts`]: a split ingress's waiting calls (grabs, pickups,
//!   deliveries), answered from the grabs and transitions topics.
//! - [`redis`]: the Redis mirror of the index and live orders.

pub mod console;
pub mod history;
pub mod kafka;
pub mod ops;
pub mod redis;
pub mod routes;
pub mod state;
pub mod streams;
pub mod verdicts;
pub mod view;
