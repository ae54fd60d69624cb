//! The egress routes: rider streams (WebSocket, SSE), queries, ops figures,
//! health, and the composed service router.

use crate::history::Lookup;
use crate::state::EgressState;
use crate::streams;
use crate::view::HistoryItem;
use axum::extract::{Path, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use grabflow_api::Id;
use grabflow_api::OrderState;
use grabflow_http::auth::{Auth, Claims, Role};
use grabflow_http::extract::{self as wire, IdSchema, QueryParams};
use grabflow_http::ApiError;
use serde::Deserialize;
use serde::Serialize;
use serde_json::json;
use utoipa::ToSchema;

/// The egress router.
pub fn routes(state: EgressState) -> Router {
    Router::new()
        .route("/v1/riders/{rider_id}/ws", get(streams::rider_ws))
        .route("/v1/riders/{rider_id}/stream", get(streams::rider_sse))
        .route("/v1/orders/{order_id}", get(get_order))
        .route(
            "/v1/merchants/{merchant_id}/riders",
            get(get_merchant_riders),
        )
        .route("/v1/riders/{rider_id}", get(get_rider))
        .route("/v1/ops/metrics", get(ops_metrics))
        .route("/v1/ops/dataflow", get(ops_dataflow))
        .route("/v1/ops/stream", get(crate::ops::ops_stream))
        .route(
            "/v1/ops/orders/{order_id}/trail",
            get(crate::ops::order_trail),
        )
        .route("/metrics", get(prometheus))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state)
}

/// `GET /v1/orders/{order_id}`.
#[derive(Serialize, ToSchema)]
pub struct OrderAnswer<'a> {
    /// The order.
    #[schema(value_type = IdSchema)]
    pub order_id: &'a Id,
    /// Its state: `created`, `notified`, `delivering`, `received`,
    /// `overtime`, `compensating` or `closed`.
    #[schema(value_type = String)]
    pub state: OrderState,
    /// The rider it is assigned to, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<IdSchema>)]
    pub rider_id: Option<&'a Id>,
    /// Its merchant.
    #[schema(value_type = IdSchema)]
    pub merchant_id: &'a Id,
    /// Every state it entered, oldest first.
    pub history: &'a [HistoryItem],
}

/// An order with its history.
#[utoipa::path(get, path = "/v1/orders/{order_id}", params(("order_id" = String, Path)),
    responses((status = 200, description = "The order: live, or a closed one from the history store until `--history-retention` after it closed", body = OrderAnswer),
        (status = 404, description = "`not_found`: no such order; `expired`: it closed longer ago than the history retention", body = grabflow_http::error::ErrorBody)),
    security(("bearer" = [])))]
pub async fn get_order(
    State(s): State<EgressState>,
    Auth(claims): Auth,
    Path(order_id): Path<String>,
) -> Result<Response, ApiError> {
    claims.require(&[Role::App], None)?;
    let id = wire::id(&order_id, "order_id")?;
    let o = match s.egress.lookup(&id) {
        Ok(Lookup::Found(o)) => o,
        Ok(Lookup::Expired) => {
            return Err(ApiError::expired(
                "order_id",
                format!("order {id} closed longer ago than the history retention"),
            ))
        }
        Ok(Lookup::Unknown) => {
            return Err(ApiError::not_found("order_id", format!("no order {id}")))
        }
        Err(e) => {
            tracing::error!("reading order {id}: {e}");
            return Err(ApiError::unavailable("the order history cannot be read"));
        }
    };
    let answer = OrderAnswer {
        order_id: &id,
        state: o.state,
        rider_id: o.rider.as_ref(),
        merchant_id: &o.merchant,
        history: &o.history,
    };
    Ok(Json(answer).into_response())
}

/// `?limit=K` for the merchant→rider index.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitQuery {
    /// How many riders (1–200, default 20).
    pub limit: Option<usize>,
}

/// `GET /v1/merchants/{merchant_id}/riders`.
#[derive(Serialize, ToSchema)]
pub struct NearbyRiders {
    /// The merchant.
    #[schema(value_type = IdSchema)]
    pub merchant_id: Id,
    /// Available riders within the base radius, nearest first.
    pub riders: Vec<NearbyRider>,
}

/// One rider near a merchant.
#[derive(Serialize, ToSchema)]
pub struct NearbyRider {
    /// The rider.
    #[schema(value_type = IdSchema)]
    pub rider_id: Id,
    /// Straight-line distance to the merchant, metres.
    pub distance_m: u64,
}

/// The available riders nearest to a merchant, within the base radius.
#[utoipa::path(get, path = "/v1/merchants/{merchant_id}/riders", params(("merchant_id" = String, Path), ("limit" = Option<usize>, Query, minimum = 1, maximum = 200, description = "How many riders (default 20)")),
    responses((status = 200, description = "Nearest first", body = NearbyRiders), (status = 404)),
    security(("bearer" = [])))]
pub async fn get_merchant_riders(
    State(s): State<EgressState>,
    Auth(claims): Auth,
    Path(merchant_id): Path<String>,
    QueryParams(q): QueryParams<LimitQuery>,
) -> Result<Json<NearbyRiders>, ApiError> {
    claims.require(&[Role::App], None)?;
    let id = wire::id(&merchant_id, "merchant_id")?;
    let limit = q.limit.unwrap_or(20);
    if !(1..=200).contains(&limit) {
        return Err(ApiError::invalid_field(
            "limit",
            "limit must be from 1 to 200",
        ));
    }
    let riders = s
        .egress
        .riders_near(&id, limit)
        .ok_or_else(|| ApiError::not_found("merchant_id", format!("no merchant {id}")))?;
    let riders = riders
        .into_iter()
        .map(|(rider_id, d)| NearbyRider {
            rider_id,
            distance_m: d.round() as u64,
        })
        .collect();
    Ok(Json(NearbyRiders {
        merchant_id: id,
        riders,
    }))
}

/// `GET /v1/riders/{rider_id}`.
#[derive(Serialize, ToSchema)]
pub struct RiderAnswer {
    /// The rider.
    #[schema(value_type = IdSchema)]
    pub rider_id: Id,
    /// Its last reported latitude (null before its first ping).
    pub lat: Option<f64>,
    /// Its last reported longitude.
    pub lon: Option<f64>,
    /// On shift.
    pub online: bool,
    /// Orders assigned and not yet delivered.
    pub load: u32,
    /// Orders it may carry at once.
    pub capacity: u32,
    /// Where the dispatch index has it, when it is available (on shift,
    /// pinged within the TTL); null otherwise.
    pub indexed: Option<Position>,
}

/// A position, WGS84 degrees.
#[derive(Serialize, ToSchema)]
pub struct Position {
    /// Latitude.
    pub lat: f64,
    /// Longitude.
    pub lon: f64,
}

/// A rider's position, shift and load.
#[utoipa::path(get, path = "/v1/riders/{rider_id}", params(("rider_id" = String, Path)),
    responses((status = 200, description = "The rider", body = RiderAnswer), (status = 404)), security(("bearer" = [])))]
pub async fn get_rider(
    State(s): State<EgressState>,
    Auth(claims): Auth,
    Path(rider_id): Path<String>,
) -> Result<Json<RiderAnswer>, ApiError> {
    let id = wire::id(&rider_id, "rider_id")?;
    claims.require(&[Role::App, Role::Rider], Some(&id))?;
    let (r, indexed) = s
        .egress
        .rider(&id)
        .ok_or_else(|| ApiError::not_found("rider_id", format!("no rider {id}")))?;
    Ok(Json(RiderAnswer {
        indexed: indexed.map(|c| Position {
            lat: c.lat(),
            lon: c.lon(),
        }),
        rider_id: id,
        lat: r.at.map(|c| c.lat()),
        lon: r.at.map(|c| c.lon()),
        online: r.online,
        load: r.load,
        capacity: r.capacity.unwrap_or(s.egress.cfg.default_capacity),
    }))
}

fn ops(claims: &Claims) -> Result<(), ApiError> {
    claims.require(&[Role::Ops], None)
}

/// Live business and dataflow figures.
#[utoipa::path(get, path = "/v1/ops/metrics", responses((status = 200, description = "JSON figures")), security(("bearer" = [])))]
pub async fn ops_metrics(
    State(s): State<EgressState>,
    Auth(claims): Auth,
) -> Result<Json<serde_json::Value>, ApiError> {
    ops(&claims)?;
    let c = s.egress.counters();
    let (riders, indexed, merchants, orders) = s.egress.sizes();
    let (streams, stream_messages) = s.egress.stream_sizes();
    let (progress, last_event) = s.egress.progress();
    let log = log_usage(&s).await;
    Ok(Json(json!({
        "ready": s.egress.is_ready(),
        "log": log.map(|(bytes, segments)| json!({"bytes": bytes, "segments": segments})),
        "riders": riders, "riders_indexed": indexed, "merchants": merchants, "orders": orders,
        "orders_by_state": c.orders_by_state,
        "orders_archived": c.orders_archived,
        "rider_streams": streams, "stream_messages": stream_messages,
        "events": c.events, "decisions": c.decisions,
        "grabs_won": c.grabs_won, "grabs_lost": c.grabs_lost,
        "dataflow": {"frontier_ms": progress, "last_event_ms": last_event,
                     "lag_ms": last_event.saturating_sub(progress.min(last_event))},
        "checkpoint": s.egress.checkpoints().map(|f| checkpoint_json(&f)),
    })))
}

/// The checkpoint figures as `/v1/ops/metrics` gives them.
fn checkpoint_json(f: &crate::view::CheckpointFigures) -> serde_json::Value {
    json!({
        "last_at_ms": f.last_at,
        "age_s": f.written.map(|w| w.elapsed().as_secs_f64()),
        "bytes": f.last_bytes,
        "write_ms": f.last_write_ms,
        "written": f.written_total,
        "failed": f.failed_total,
        "started_from_ms": f.started_from,
        "replayed_events": f.replayed,
    })
}

/// Per-operator figures from timely's own logging.
#[utoipa::path(get, path = "/v1/ops/dataflow", responses((status = 200, description = "per-operator figures")), security(("bearer" = [])))]
pub async fn ops_dataflow(
    State(s): State<EgressState>,
    Auth(claims): Auth,
) -> Result<Json<serde_json::Value>, ApiError> {
    ops(&claims)?;
    let (progress, last_event) = s.egress.progress();
    Ok(Json(json!({
        "operators": s.stats.snapshot(),
        "channels": s.stats.channels(),
        "frontier_ms": progress,
        "frontier_lag_ms": last_event.saturating_sub(progress.min(last_event)),
    })))
}

/// Prometheus text format.
#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "Prometheus text")), security(("bearer" = [])))]
pub async fn prometheus(
    State(s): State<EgressState>,
    Auth(claims): Auth,
) -> Result<Response, ApiError> {
    ops(&claims)?;
    let c = s.egress.counters();
    let (riders, indexed, merchants, orders) = s.egress.sizes();
    let (streams, stream_messages) = s.egress.stream_sizes();
    let (progress, last_event) = s.egress.progress();
    let mut out = String::new();
    let log = log_usage(&s).await;
    let mut gauge = |name: &str, help: &str, samples: Vec<(String, f64)>| {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} gauge\n"));
        for (labels, v) in samples {
            out.push_str(&format!("{name}{labels} {v}\n"));
        }
    };
    gauge(
        "grabflow_riders",
        "Riders known.",
        vec![(String::new(), riders as f64)],
    );
    gauge(
        "grabflow_riders_indexed",
        "Riders on shift and fresh.",
        vec![(String::new(), indexed as f64)],
    );
    gauge(
        "grabflow_merchants",
        "Merchants known.",
        vec![(String::new(), merchants as f64)],
    );
    gauge(
        "grabflow_orders",
        "Orders in the live view (open, and closed within the order retention).",
        vec![(String::new(), orders as f64)],
    );
    gauge(
        "grabflow_orders_archived_total",
        "Closed orders moved from the live view to the history store.",
        vec![(String::new(), c.orders_archived as f64)],
    );
    gauge(
        "grabflow_rider_streams",
        "Rider streams kept.",
        vec![(String::new(), streams as f64)],
    );
    gauge(
        "grabflow_stream_messages",
        "Messages kept in the rider streams.",
        vec![(String::new(), stream_messages as f64)],
    );
    gauge(
        "grabflow_orders_by_state",
        "Orders by current state.",
        c.orders_by_state
            .iter()
            .map(|(k, v)| (format!("{{state=\"{k}\"}}"), *v as f64))
            .collect(),
    );
    gauge(
        "grabflow_events_total",
        "Events into the dataflow.",
        c.events
            .iter()
            .map(|(k, v)| (format!("{{kind=\"{k}\"}}"), *v as f64))
            .collect(),
    );
    gauge(
        "grabflow_decisions_total",
        "Dispatch decisions.",
        c.decisions
            .iter()
            .map(|(k, v)| (format!("{{kind=\"{k}\"}}"), *v as f64))
            .collect(),
    );
    gauge(
        "grabflow_operator_state",
        "What each stateful dataflow operator holds, by part (summed over workers).",
        s.stats
            .snapshot()
            .iter()
            .flat_map(|op| {
                op.state.iter().map(|(part, n)| {
                    (
                        format!("{{operator=\"{}\",part=\"{part}\"}}", op.name),
                        *n as f64,
                    )
                })
            })
            .collect(),
    );
    gauge(
        "grabflow_dataflow_lag_ms",
        "Newest event time minus the dataflow frontier.",
        vec![(
            String::new(),
            last_event.saturating_sub(progress.min(last_event)) as f64,
        )],
    );
    if let Some(f) = s.egress.checkpoints() {
        let one = |v: f64| vec![(String::new(), v)];
        gauge(
            "grabflow_checkpoint_log_time_ms",
            "Log time of the last checkpoint written (0: none yet).",
            one(f.last_at as f64),
        );
        if let Some(w) = f.written {
            gauge(
                "grabflow_checkpoint_age_seconds",
                "Seconds since the last checkpoint was written.",
                one(w.elapsed().as_secs_f64()),
            );
        }
        gauge(
            "grabflow_checkpoint_bytes",
            "Size of the last checkpoint.",
            one(f.last_bytes as f64),
        );
        gauge(
            "grabflow_checkpoint_write_ms",
            "Time to encode and write the last checkpoint.",
            one(f.last_write_ms as f64),
        );
        gauge(
            "grabflow_checkpoints_failed_total",
            "Checkpoints that could not be written since the start.",
            one(f.failed_total as f64),
        );
        gauge(
            "grabflow_restart_replayed_events",
            "Events the last start replayed from the log (after its checkpoint).",
            one(f.replayed as f64),
        );
    }
    if let Some((bytes, segments)) = log {
        gauge(
            "grabflow_log_bytes",
            "Bytes of the embedded log's segment files (their zero-filled room included).",
            vec![(String::new(), bytes as f64)],
        );
        gauge(
            "grabflow_log_segments",
            "Segment files of the embedded log (retention deletes the oldest).",
            vec![(String::new(), segments as f64)],
        );
    }
    let mut counter = |name: &str, help: &str, samples: Vec<(String, u64)>| {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} counter\n"));
        for (labels, v) in samples {
            out.push_str(&format!("{name}{labels} {v}\n"));
        }
    };
    counter(
        "grabflow_grabs_total",
        "Grab attempts decided: won, or lost by reason.",
        std::iter::once(("{result=\"won\"}".to_string(), c.grabs_won))
            .chain(
                c.grabs_lost
                    .iter()
                    .map(|(reason, n)| (format!("{{result=\"lost\",reason=\"{reason}\"}}"), *n)),
            )
            .collect(),
    );
    counter(
        "grabflow_http_responses_total",
        "HTTP responses sent, by status class.",
        s.responses
            .counts()
            .iter()
            .map(|(class, n)| (format!("{{class=\"{class}\"}}"), *n))
            .collect(),
    );
    if let Some(dir) = &s.data_dir {
        let bytes = tokio::task::spawn_blocking({
            let dir = dir.clone();
            move || dir_bytes(&dir, 3)
        })
        .await
        .unwrap_or(0);
        out.push_str(&format!(
            "# HELP grabflow_data_dir_bytes Bytes of the files in the data dir (the log's \
             zero-filled reserve included).\n# TYPE grabflow_data_dir_bytes gauge\n\
             grabflow_data_dir_bytes {bytes}\n"
        ));
    }
    s.ops.prometheus(&mut out);
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response())
}

/// The embedded log's bytes and segments, where this process has a data
/// dir with a log in it.
async fn log_usage(s: &EgressState) -> Option<(u64, usize)> {
    let dir = s.data_dir.clone()?;
    tokio::task::spawn_blocking(move || grabflow_log::embedded::segments::usage(&dir))
        .await
        .ok()
        .filter(|&(_, segments)| segments > 0)
}

/// Bytes of the files under `dir`, `depth` levels down at most (files
/// that vanish while counted count nothing).
pub fn dir_bytes(dir: &std::path::Path, depth: usize) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() && depth > 0 => dir_bytes(&e.path(), depth - 1),
            Ok(m) if m.is_file() => m.len(),
            _ => 0,
        })
        .sum()
}

/// Alive (the process answers).
#[utoipa::path(get, path = "/healthz", responses((status = 200, description = "`{\"status\": \"ok\"}`")))]
pub async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

/// Ready once replay has caught up.
#[utoipa::path(get, path = "/readyz", responses((status = 200), (status = 503)))]
pub async fn readyz(State(s): State<EgressState>) -> Response {
    if s.egress.is_ready() {
        Json(json!({"status": "ready"})).into_response()
    } else {
        ApiError::unavailable("replaying the log").into_response()
    }
}
