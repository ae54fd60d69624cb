//! # grabflow-ingress — the way in
//!
//! HTTP requests become durable events: axum routes validate every body
//! (naming the field at fault), check the bearer token's role, append the
//! event to the log ([`grabflow_log::LogHandle`]: the embedded file or
//! Kafka, the same to a handler), and answer `202` only once it is durable.
//! A grab call then waits up to two seconds for its decision.
//!
//! ## Layout
//!
//! - [`routes`](mod@routes): `routes(Ingress) -> Router`, one handler per ingress path
//!   (a ping is appended in `post_location` and `post_batch`), the
//!   `Idempotency-Key` extractor, and how an append's failure is answered.
//! - [`bodies`]: the request bodies, as strict serde types.
//!
//! Tokens, the error shape and the extractors are shared with egress in
//! `grabflow-http`; the log and its rules (keys, known ids, one placement
//! per order) are `grabflow-log`'s.

pub mod bodies;
pub mod routes;

pub use routes::{routes, Ingress};
