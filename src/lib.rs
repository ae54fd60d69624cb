//! # grabflow — the service, composed
//!
//! The library crates each do one part; this crate joins them into the
//! service a process runs, so the binary (`main.rs`) only parses its
//! command line and calls in here.
//!
//! A ping's way through: `POST /v1/riders/{id}/location` is validated and
//! appended in `grabflow-ingress` (`routes::post_location`), made durable by
//! the log (`grabflow-log`: `embedded::writer`, or `kafka::producer`), read
//! by the dataflow's workers (`grabflow-dataflow::runtime`), tracked in
//! `riders` and indexed in `geo_index`; an order is offered in
//! `dispatcher`, and the offer leaves for the rider from `grabflow-egress`
//! (`view::Egress::decisions` into the rider's ring, `streams` onto the
//! WebSocket or SSE).
//!
//! ## Layout
//!
//! - [`settings`]: [`Settings`](settings::Settings), read by clap and by
//!   figment (defaults < TOML file < `GRABFLOW_*` < flags), checked into a
//!   [`Plan`](settings::Plan).
//! - [`service`]: the roles (`serve`, `ingress`, `dataflow`, `egress`), the
//!   routers that join ingress and egress (`app`), and the threads' one
//!   lifecycle ([`Threads`](service::Threads)).
//! - [`server`]: the HTTP server loop and its limits (header and idle
//!   time, a cap on connections, accept errors).
//! - [`rate`]: rate limits per token and per address (429).
//! - [`contract`]: the OpenAPI document of every handler, served at
//!   `/openapi.json`.
//! - [`checkpoint`]: checkpoints over the embedded log: the file's body,
//!   loading the newest usable one, the thread that writes them.
//! - [`commands`]: the other subcommands: `token`, `sim`, `replay`.

pub mod checkpoint;
pub mod commands;
pub mod contract;
pub mod rate;
pub mod server;
pub mod service;
pub mod settings;
