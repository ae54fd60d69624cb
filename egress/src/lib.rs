//! # grabflow-egress — the way out
//!
//! What the dataflow decides reaches the world here: riders hold a
//! WebSocket or an SSE stream of offers, withdrawals, grab results and
//! assignments (each with a per-rider `seq`, resumable with `?after=SEQ`);
//! apps and ops query orders, riders and the merchant→rider index; ops read
//! live business figures, per-operator dataflow figures and Prometheus text.
//!
//! ## Layout
//!
//! - [`view`]: [`Egress`](view::Egress), the live view fed by the dataflow
//!   runtime (it implements the runtime's `Observer` and ingress's `GrabWaiter`).
//! - [`routes`]: `routes(EgressState) -> Router` and `app(Ingress, EgressState)`
//!   composing the whole service.
//! - [`contract`]: the OpenAPI document, generated from the handlers.
//! - [`kafka`]: the output topics: the sink writing decisions and the index
//!   (exactly once across restarts), and the follower that feeds a split
//!   egress process's view from the topics.
//! - [`redis`]: the Redis mirror of the index and live orders.

pub mod contract;
pub mod kafka;
pub mod redis;
pub mod routes;
pub mod view;
