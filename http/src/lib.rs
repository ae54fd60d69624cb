//! # grabflow-http — what both HTTP sides share
//!
//! Ingress (the write side) and egress (the read side) answer in one shape
//! and check one kind of token; this crate is that common ground, so
//! neither depends on the other. No log, no dataflow: only axum types.
//!
//! ## Layout
//!
//! - [`auth`]: signed role tokens ([`Secret`](auth::Secret),
//!   [`Claims`](auth::Claims), the [`Auth`](auth::Auth) extractor).
//! - [`error`]: [`ApiError`], the one error shape
//!   `{"error": {"code", "message", "field"?}}`, and its body's schema.
//! - [`extract`]: the JSON body and query extractors that name the field
//!   at fault, the checks of ids and positions, the `Id` schema.
//! - [`waiter`]: a call waiting for what the dataflow made of its event (a
//!   grab's decision, a pickup's transition or rejection), and the answers.
//! - [`metrics`]: responses counted by status class (a middleware).

pub mod auth;
pub mod error;
pub mod extract;
pub mod metrics;
pub mod waiter;

pub use error::ApiError;
