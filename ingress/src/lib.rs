//! # grabflow-ingress — the way in
//!
//! HTTP requests become durable events: axum routes validate every body
//! (naming the field at fault), check the bearer token's role, append the
//! event to the log, and answer `202` only once it is on disk.
//!
//! ## Layout
//!
//! - [`routes`]: `routes(Ingress) -> Router`, one handler per ingress path of
//!   API.md, and the grab call that waits for its decision.
//! - [`wire`]: request bodies, and the JSON and query extractors that map
//!   every bad body or query string to a 4xx naming the field; the `Id`
//!   schema of the OpenAPI document.
//! - [`log`]: the embedded append-only log (checksums, group commit, torn-tail
//!   repair, idempotency keys, replay).
//! - [`keys`]: idempotency keys: each key's first answer and a print of its
//!   request, so a repeat gets the answer and another request a 422.
//! - [`space`]: the zero-filled room kept ahead of the log's writer, so a
//!   commit's sync never has to write a new file size.
//! - [`direct`]: the log's commits as direct, data-synchronous writes of
//!   whole blocks (buffered writes and `fdatasync` where the file system
//!   has no direct I/O).
//! - [`kafka`]: production mode's log: the producer, the dataflow's
//!   partition sources (time from the log, ticks), the follower of known ids
//!   and grab results.
//! - [`auth`]: signed role tokens.
//! - [`error`]: [`ApiError`](error::ApiError), the one error shape, and its
//!   body's schema.

pub mod auth;
pub mod direct;
pub mod error;
pub mod kafka;
pub mod keys;
pub mod log;
pub mod routes;
pub mod space;
pub mod wire;
