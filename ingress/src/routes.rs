//! The ingress routes: validate, authorize, append durably, answer.

use crate::bodies::*;
use axum::extract::FromRequestParts;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{post, put};
use axum::{Json, Router};
use grabflow_api::{EventKind, Id, RejectReason};
use grabflow_http::auth::{Auth, Claims, HasSecret, Role, Secret};
use grabflow_http::extract::{self as wire, JsonBody, JsonList};
use grabflow_http::waiter::{self, Expect, GrabAnswer, StepAnswer, Verdict, Waiter, WAIT};
use grabflow_http::ApiError;
use grabflow_log::{Appended, LogError, LogHandle};
use serde::Serialize;
use std::sync::Arc;
use utoipa::ToSchema;

/// The most pings one batch request may carry.
pub const MAX_BATCH: usize = 10_000;
/// The largest compensation one call settles, in cents.
pub const MAX_COMPENSATION_CENTS: u64 = 10_000_000;
/// The longest `Idempotency-Key` (printable ASCII).
pub const MAX_IDEMPOTENCY_KEY: usize = 128;

/// The ingress state.
#[derive(Clone)]
pub struct Ingress {
    /// Where events go, and what it already holds.
    pub log: LogHandle,
    /// Verifies tokens.
    pub secret: Secret,
    /// Waits for what the dataflow made of an event (grabs, pickups,
    /// deliveries).
    pub waiter: Arc<dyn Waiter>,
}

impl HasSecret for Ingress {
    fn secret(&self) -> &Secret {
        &self.secret
    }
}

/// An append's failure, as the API answers it: a key reused on another
/// request is a 422 naming `Idempotency-Key`, an order placed already a
/// 409, anything else (the disk, the broker) a 503 to retry.
fn refused(e: LogError) -> ApiError {
    match e {
        LogError::KeyReused(e) => ApiError::invalid_field("Idempotency-Key", e.to_string()),
        LogError::OrderExists(order) => ApiError {
            field: Some("order_id".into()),
            ..ApiError::conflict(format!("order {order} exists"))
        },
        e => ApiError::unavailable(format!("the event could not be made durable: {e}")),
    }
}

/// `202` answer to an accepted event.
#[derive(Serialize, ToSchema)]
pub struct Accepted {
    /// The event's id.
    pub event_id: String,
    /// Its position in the log.
    pub offset: u64,
}

/// `202` answer to an accepted batch.
#[derive(Serialize, ToSchema)]
pub struct BatchAccepted {
    /// How many pings were appended.
    pub accepted: usize,
}

/// `202` answer to a grab still undecided after two seconds.
#[derive(Serialize, ToSchema)]
pub struct GrabPending {
    /// The attempt's event id; its result arrives on the rider's stream.
    pub attempt_id: String,
}

/// The ingress router.
pub fn routes(state: Ingress) -> Router {
    Router::new()
        .route("/v1/merchants/{merchant_id}", put(put_merchant))
        .route("/v1/riders/{rider_id}/shift", put(put_shift))
        .route("/v1/riders/{rider_id}/location", post(post_location))
        .route(
            "/v1/locations:batch",
            post(post_batch).layer(DefaultBodyLimit::max(4 << 20)),
        )
        .route("/v1/orders", post(post_order))
        .route("/v1/orders/{order_id}/cancel", post(post_cancel))
        .route("/v1/orders/{order_id}/grab", post(post_grab))
        .route("/v1/orders/{order_id}/pickup", post(post_pickup))
        .route("/v1/orders/{order_id}/delivered", post(post_delivered))
        .route(
            "/v1/orders/{order_id}/compensation",
            post(post_compensation),
        )
        .route(
            "/v1/ops/orders/{order_id}/redispatch",
            post(post_redispatch),
        )
        .route("/v1/ops/orders/{order_id}/reassign", post(post_reassign))
        .layer(DefaultBodyLimit::max(64 << 10))
        // Shared, not cloned per request: a clone would touch every
        // handle's reference count on each call.
        .with_state(Arc::new(state))
}

/// Extractor: the request's `Idempotency-Key`, validated (400-class error
/// naming the header). Only that header is read: the map is not copied.
pub struct IdempotencyKey(pub Option<String>);

impl<S: Send + Sync> FromRequestParts<S> for IdempotencyKey {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        let Some(v) = parts.headers.get("idempotency-key") else {
            return Ok(IdempotencyKey(None));
        };
        let key = v
            .to_str()
            .map_err(|_| ApiError::invalid_field("Idempotency-Key", "must be printable ASCII"))?;
        if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY {
            return Err(ApiError::invalid_field(
                "Idempotency-Key",
                format!("must be 1 to {MAX_IDEMPOTENCY_KEY} characters"),
            ));
        }
        Ok(IdempotencyKey(Some(key.to_string())))
    }
}

impl Ingress {
    async fn append_one(&self, key: Option<String>, kind: EventKind) -> Result<Response, ApiError> {
        self.append_with_id(key, Id::new_event(), kind).await
    }

    async fn append_with_id(
        &self,
        key: Option<String>,
        id: Id,
        kind: EventKind,
    ) -> Result<Response, ApiError> {
        let answer = self.log.append(key, vec![(id, kind)]).await;
        Ok(accepted(answer.map_err(refused)?))
    }

    async fn order(&self, order_id: &str) -> Result<Id, ApiError> {
        let order = wire::id(order_id, "order_id")?;
        if !self.log.finds_order(&order).await {
            return Err(ApiError::not_found("order_id", format!("no order {order}")));
        }
        Ok(order)
    }

    async fn order_event(
        &self,
        claims: &Claims,
        roles: &[Role],
        order_id: &str,
        key: Option<String>,
        kind: impl FnOnce(Id) -> Result<EventKind, ApiError>,
    ) -> Result<Response, ApiError> {
        claims.require(roles, None)?;
        let order = self.order(order_id).await?;
        self.append_one(key, kind(order)?).await
    }

    /// A rider's pickup or delivery: appended, then answered with what the
    /// dataflow made of it (200 with the order's state, 409 with the
    /// rejection), or 202 when that takes longer than [`WAIT`].
    async fn rider_step(
        &self,
        claims: &Claims,
        order_id: &str,
        key: Option<String>,
        kind: impl FnOnce(Id, Id) -> EventKind,
    ) -> Result<Response, ApiError> {
        claims.require(&[Role::Rider], None)?;
        let rider = Ingress::rider_of(claims)?;
        let order = self.order(order_id).await?;
        let event = Id::new_event();
        let verdict = self.waiter.expect(&event, Expect::Step);
        let kind = kind(order.clone(), rider);
        let appended = match self.log.append(key, vec![(event.clone(), kind)]).await {
            Ok(a) => a,
            Err(e) => {
                self.waiter.forget(&event);
                return Err(refused(e));
            }
        };
        if !matches!(&appended, Appended::One { event_id, .. } if *event_id == event) {
            // A retry with the same Idempotency-Key: the event was appended
            // before, and is answered as accepted.
            self.waiter.forget(&event);
            return Ok(accepted(appended));
        }
        match tokio::time::timeout(WAIT, verdict).await {
            Ok(Ok(Verdict::Applied(state))) => Ok((
                StatusCode::OK,
                Json(StepAnswer {
                    event_id: event.to_string(),
                    order_id: order.to_string(),
                    state,
                }),
            )
                .into_response()),
            Ok(Ok(Verdict::Rejected(RejectReason::UnknownOrder))) => {
                Err(ApiError::not_found("order_id", format!("no order {order}")))
            }
            Ok(Ok(Verdict::Rejected(reason))) => {
                let (code, message) = waiter::rejection(reason);
                Err(ApiError::rejected(code, message))
            }
            _ => {
                self.waiter.forget(&event);
                Ok(accepted(appended))
            }
        }
    }

    fn rider_of(claims: &Claims) -> Result<Id, ApiError> {
        claims
            .id
            .clone()
            .ok_or_else(|| ApiError::forbidden("this call needs a rider token"))
    }
}

fn accepted(answer: Appended) -> Response {
    match answer {
        Appended::One { event_id, offset } => (
            StatusCode::ACCEPTED,
            Json(Accepted {
                event_id: event_id.to_string(),
                offset,
            }),
        )
            .into_response(),
        Appended::Batch { accepted } => {
            (StatusCode::ACCEPTED, Json(BatchAccepted { accepted })).into_response()
        }
    }
}

/// Register or move a merchant, open or close it.
#[utoipa::path(put, path = "/v1/merchants/{merchant_id}", request_body = MerchantBody,
    params(("merchant_id" = String, Path)), responses((status = 202, body = Accepted)), security(("bearer" = [])))]
pub async fn put_merchant(
    State(s): State<Arc<Ingress>>,
    Auth(claims): Auth,
    Path(merchant_id): Path<String>,
    IdempotencyKey(key): IdempotencyKey,
    JsonBody(b): JsonBody<MerchantBody>,
) -> Result<Response, ApiError> {
    claims.require(&[Role::App], None)?;
    let merchant = wire::id(&merchant_id, "merchant_id")?;
    let at = wire::coord(b.lat, b.lon, "")?;
    s.append_one(
        key,
        EventKind::MerchantUpserted {
            merchant,
            at,
            open: b.open,
        },
    )
    .await
}

/// A rider starts or ends a shift.
#[utoipa::path(put, path = "/v1/riders/{rider_id}/shift", request_body = ShiftBody,
    params(("rider_id" = String, Path)), responses((status = 202, body = Accepted)), security(("bearer" = [])))]
pub async fn put_shift(
    State(s): State<Arc<Ingress>>,
    Auth(claims): Auth,
    Path(rider_id): Path<String>,
    IdempotencyKey(key): IdempotencyKey,
    JsonBody(b): JsonBody<ShiftBody>,
) -> Result<Response, ApiError> {
    let rider = wire::id(&rider_id, "rider_id")?;
    claims.require(&[Role::Rider], Some(&rider))?;
    if let Some(c) = b.capacity {
        if !(1..=50).contains(&c) {
            return Err(ApiError::invalid_field(
                "capacity",
                "capacity must be from 1 to 50",
            ));
        }
    }
    s.append_one(
        key,
        EventKind::ShiftChanged {
            rider,
            online: b.online,
            capacity: b.capacity,
        },
    )
    .await
}

/// One location ping.
#[utoipa::path(post, path = "/v1/riders/{rider_id}/location", request_body = LocationBody,
    params(("rider_id" = String, Path)), responses((status = 202, body = Accepted)), security(("bearer" = [])))]
pub async fn post_location(
    State(s): State<Arc<Ingress>>,
    Auth(claims): Auth,
    Path(rider_id): Path<String>,
    IdempotencyKey(key): IdempotencyKey,
    JsonBody(b): JsonBody<LocationBody>,
) -> Result<Response, ApiError> {
    let rider = wire::id(&rider_id, "rider_id")?;
    claims.require(&[Role::App, Role::Rider], Some(&rider))?;
    let at = wire::coord(b.lat, b.lon, "")?;
    s.append_one(key, EventKind::LocationPinged { rider, at })
        .await
}

/// Many pings in one request (one fsync).
#[utoipa::path(post, path = "/v1/locations:batch", request_body = Vec<BatchPing>,
    responses((status = 202, body = BatchAccepted)), security(("bearer" = [])))]
pub async fn post_batch(
    State(s): State<Arc<Ingress>>,
    Auth(claims): Auth,
    IdempotencyKey(key): IdempotencyKey,
    JsonList(items): JsonList<Vec<BatchPing>>,
) -> Result<Response, ApiError> {
    claims.require(&[Role::App], None)?;
    if items.is_empty() || items.len() > MAX_BATCH {
        return Err(ApiError::invalid_field(
            "",
            format!("a batch holds 1 to {MAX_BATCH} pings"),
        ));
    }
    // The pings' ids are the batch's items (`{batch}.{i}`): one random id
    // per request, and the log stores it once.
    let batch = Id::new_batch();
    let mut events = Vec::with_capacity(items.len());
    for (i, p) in items.into_iter().enumerate() {
        let at = wire::coord(p.lat, p.lon, "").map_err(|e| e.in_item(i))?;
        let rider = p.rider_id;
        let id = batch.item(i).expect("a batch id has room for every index");
        events.push((id, EventKind::LocationPinged { rider, at }));
    }
    let answer = s.log.append(key, events).await.map_err(refused)?;
    let accepted = match answer {
        Appended::Batch { accepted } => accepted,
        Appended::One { .. } => 1,
    };
    Ok((StatusCode::ACCEPTED, Json(BatchAccepted { accepted })).into_response())
}

/// A paid order enters dispatch.
#[utoipa::path(post, path = "/v1/orders", request_body = OrderBody,
    responses((status = 202, body = Accepted), (status = 404), (status = 409)), security(("bearer" = [])))]
pub async fn post_order(
    State(s): State<Arc<Ingress>>,
    Auth(claims): Auth,
    IdempotencyKey(key): IdempotencyKey,
    JsonBody(b): JsonBody<OrderBody>,
) -> Result<Response, ApiError> {
    claims.require(&[Role::App], None)?;
    let order = wire::id(&b.order_id, "order_id")?;
    let merchant = wire::id(&b.merchant_id, "merchant_id")?;
    let dropoff = wire::coord(b.dropoff.lat, b.dropoff.lon, "dropoff")?;
    if !(1..=1440).contains(&b.promised_minutes) {
        return Err(ApiError::invalid_field(
            "promised_minutes",
            "promised_minutes must be from 1 to 1440",
        ));
    }
    if !s.log.finds_merchant(&merchant).await {
        return Err(ApiError::not_found(
            "merchant_id",
            format!("no merchant {merchant}"),
        ));
    }
    // With a key, the log decides: a repeat gets its first answer, any
    // other placement of the order a 409 (as do two racing placements).
    if key.is_none() && s.log.knows_order(&order) {
        return Err(refused(LogError::OrderExists(order)));
    }
    let kind = EventKind::OrderPlaced {
        order,
        merchant,
        dropoff,
        promised_minutes: b.promised_minutes,
    };
    s.append_one(key, kind).await
}

/// Cancel before pick-up.
#[utoipa::path(post, path = "/v1/orders/{order_id}/cancel", request_body = CancelBody,
    params(("order_id" = String, Path)), responses((status = 202, body = Accepted), (status = 404)), security(("bearer" = [])))]
pub async fn post_cancel(
    State(s): State<Arc<Ingress>>,
    Auth(claims): Auth,
    Path(order_id): Path<String>,
    IdempotencyKey(key): IdempotencyKey,
    JsonBody(_b): JsonBody<CancelBody>,
) -> Result<Response, ApiError> {
    s.order_event(&claims, &[Role::App], &order_id, key, |order| {
        Ok(EventKind::OrderCancelled { order })
    })
    .await
}

/// A grab attempt; waits up to 2 s for the decision.
#[utoipa::path(post, path = "/v1/orders/{order_id}/grab", request_body = EmptyBody,
    params(("order_id" = String, Path)), responses((status = 200, description = "Decided: `won`, or `lost` with the reason", body = GrabAnswer),
        (status = 202, description = "Durable, but not decided within 2 s: the result comes on the rider's stream", body = GrabPending),
        (status = 404)),
    security(("bearer" = [])))]
pub async fn post_grab(
    State(s): State<Arc<Ingress>>,
    Auth(claims): Auth,
    Path(order_id): Path<String>,
    IdempotencyKey(key): IdempotencyKey,
    JsonBody(_b): JsonBody<EmptyBody>,
) -> Result<Response, ApiError> {
    claims.require(&[Role::Rider], None)?;
    let rider = Ingress::rider_of(&claims)?;
    // An unknown order is a 404, and nothing is appended.
    let order = s.order(&order_id).await?;
    let attempt = Id::new_event();
    let decision = s.waiter.expect(&attempt, Expect::Grab);
    let answer = s
        .log
        .append(
            key,
            vec![(attempt.clone(), EventKind::GrabAttempted { order, rider })],
        )
        .await;
    let answer = match answer {
        Ok(a) => a,
        Err(e) => {
            s.waiter.forget(&attempt);
            return Err(refused(e));
        }
    };
    let Appended::One { event_id, .. } = answer else {
        unreachable!("one event")
    };
    if event_id != attempt {
        // A retried request (same Idempotency-Key): the decision was given before.
        s.waiter.forget(&attempt);
        return Ok((
            StatusCode::ACCEPTED,
            Json(GrabPending {
                attempt_id: event_id.to_string(),
            }),
        )
            .into_response());
    }
    match tokio::time::timeout(WAIT, decision).await {
        Ok(Ok(Verdict::Grab(outcome))) => {
            Ok((StatusCode::OK, Json(GrabAnswer::from(outcome))).into_response())
        }
        _ => {
            s.waiter.forget(&attempt);
            Ok((
                StatusCode::ACCEPTED,
                Json(GrabPending {
                    attempt_id: attempt.to_string(),
                }),
            )
                .into_response())
        }
    }
}

/// The assigned rider picked the food up; waits up to 2 s for the decision.
#[utoipa::path(post, path = "/v1/orders/{order_id}/pickup", request_body = EmptyBody,
    params(("order_id" = String, Path)), responses(
        (status = 200, description = "Applied: the order's state after it", body = StepAnswer),
        (status = 202, description = "Durable, but not decided within 2 s (or a retry with the same Idempotency-Key): the order's history tells", body = Accepted),
        (status = 404),
        (status = 409, description = "Rejected, and kept in the order's history: `not_assigned` (the order is another rider's, or nobody's), `wrong_state` (already picked up, or not on its way)")),
    security(("bearer" = [])))]
pub async fn post_pickup(
    State(s): State<Arc<Ingress>>,
    Auth(claims): Auth,
    Path(order_id): Path<String>,
    IdempotencyKey(key): IdempotencyKey,
    JsonBody(_b): JsonBody<EmptyBody>,
) -> Result<Response, ApiError> {
    s.rider_step(&claims, &order_id, key, |order, rider| {
        EventKind::PickedUp { order, rider }
    })
    .await
}

/// The assigned rider delivered; waits up to 2 s for the decision.
#[utoipa::path(post, path = "/v1/orders/{order_id}/delivered", request_body = EmptyBody,
    params(("order_id" = String, Path)), responses(
        (status = 200, description = "Applied: the order's state after it (`closed`, or `compensating` when it was ever overtime)", body = StepAnswer),
        (status = 202, description = "Durable, but not decided within 2 s (or a retry with the same Idempotency-Key): the order's history tells", body = Accepted),
        (status = 404),
        (status = 409, description = "Rejected, and kept in the order's history: `not_assigned` (the order is another rider's, or nobody's), `wrong_state` (not on its way)")),
    security(("bearer" = [])))]
pub async fn post_delivered(
    State(s): State<Arc<Ingress>>,
    Auth(claims): Auth,
    Path(order_id): Path<String>,
    IdempotencyKey(key): IdempotencyKey,
    JsonBody(_b): JsonBody<EmptyBody>,
) -> Result<Response, ApiError> {
    s.rider_step(&claims, &order_id, key, |order, rider| {
        EventKind::Delivered { order, rider }
    })
    .await
}

/// Ops settled compensation for an overtime order.
#[utoipa::path(post, path = "/v1/orders/{order_id}/compensation", request_body = CompensationBody,
    params(("order_id" = String, Path)), responses((status = 202, body = Accepted), (status = 404)), security(("bearer" = [])))]
pub async fn post_compensation(
    State(s): State<Arc<Ingress>>,
    Auth(claims): Auth,
    Path(order_id): Path<String>,
    IdempotencyKey(key): IdempotencyKey,
    JsonBody(b): JsonBody<CompensationBody>,
) -> Result<Response, ApiError> {
    let amount_cents = b.amount_cents;
    if !(1..=MAX_COMPENSATION_CENTS).contains(&amount_cents) {
        return Err(ApiError::invalid_field(
            "amount_cents",
            format!("amount_cents must be from 1 to {MAX_COMPENSATION_CENTS}"),
        ));
    }
    s.order_event(&claims, &[Role::App], &order_id, key, |order| {
        Ok(EventKind::CompensationSettled {
            order,
            amount_cents,
        })
    })
    .await
}

/// Ops: take the order back and offer it again.
#[utoipa::path(post, path = "/v1/ops/orders/{order_id}/redispatch", request_body = EmptyBody,
    params(("order_id" = String, Path)), responses((status = 202, body = Accepted), (status = 404)), security(("bearer" = [])))]
pub async fn post_redispatch(
    State(s): State<Arc<Ingress>>,
    Auth(claims): Auth,
    Path(order_id): Path<String>,
    IdempotencyKey(key): IdempotencyKey,
    JsonBody(_b): JsonBody<EmptyBody>,
) -> Result<Response, ApiError> {
    s.order_event(&claims, &[Role::Ops], &order_id, key, |order| {
        Ok(EventKind::Redispatched { order })
    })
    .await
}

/// Ops: assign the order to a rider directly.
#[utoipa::path(post, path = "/v1/ops/orders/{order_id}/reassign", request_body = ReassignBody,
    params(("order_id" = String, Path)), responses((status = 202, body = Accepted), (status = 404)), security(("bearer" = [])))]
pub async fn post_reassign(
    State(s): State<Arc<Ingress>>,
    Auth(claims): Auth,
    Path(order_id): Path<String>,
    IdempotencyKey(key): IdempotencyKey,
    JsonBody(b): JsonBody<ReassignBody>,
) -> Result<Response, ApiError> {
    s.order_event(&claims, &[Role::Ops], &order_id, key, |order| {
        Ok(EventKind::Reassigned {
            order,
            rider: wire::id(&b.rider_id, "rider_id")?,
        })
    })
    .await
}
