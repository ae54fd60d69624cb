//! The HTTP contract, machine-readable (`GET /openapi.json`), generated from
//! the handlers' annotations and completed by one pass over every operation
//! ([`Contract`]): the auth schemes, the `Error` body on every failure the
//! handler can give, ids as the `Id` schema, and `Idempotency-Key` on every
//! event.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use grabflow_ingress::routes::{MAX_BATCH, MAX_IDEMPOTENCY_KEY};
use utoipa::openapi::path::{Operation, ParameterBuilder, ParameterIn};
use utoipa::openapi::security::{ApiKey, ApiKeyValue, Http, HttpAuthScheme, SecurityScheme};
use utoipa::openapi::{
    ArrayBuilder, ContentBuilder, ObjectBuilder, Ref, RefOr, Required, ResponseBuilder, Schema,
    Type,
};
use utoipa::{Modify, OpenApi};

/// The HTTP contract, machine-readable, generated from the handlers.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "grabflow",
        description = "Real-time dispatch for on-demand food delivery"
    ),
    paths(
        grabflow_ingress::routes::put_merchant,
        grabflow_ingress::routes::put_shift,
        grabflow_ingress::routes::post_location,
        grabflow_ingress::routes::post_batch,
        grabflow_ingress::routes::post_order,
        grabflow_ingress::routes::post_cancel,
        grabflow_ingress::routes::post_grab,
        grabflow_ingress::routes::post_pickup,
        grabflow_ingress::routes::post_delivered,
        grabflow_ingress::routes::post_compensation,
        grabflow_ingress::routes::post_redispatch,
        grabflow_ingress::routes::post_reassign,
        grabflow_egress::streams::rider_ws,
        grabflow_egress::streams::rider_sse,
        grabflow_egress::routes::get_order,
        grabflow_egress::routes::get_merchant_riders,
        grabflow_egress::routes::get_rider,
        grabflow_egress::routes::ops_metrics,
        grabflow_egress::routes::ops_dataflow,
        grabflow_egress::ops::ops_stream,
        grabflow_egress::ops::order_trail,
        grabflow_egress::routes::prometheus,
        grabflow_egress::routes::healthz,
        grabflow_egress::routes::readyz
    ),
    components(schemas(
        grabflow_http::extract::IdSchema,
        grabflow_ingress::bodies::MerchantBody,
        grabflow_ingress::bodies::ShiftBody,
        grabflow_ingress::bodies::LocationBody,
        grabflow_ingress::bodies::BatchPing,
        grabflow_ingress::bodies::OrderBody,
        grabflow_ingress::bodies::LatLon,
        grabflow_ingress::bodies::CancelBody,
        grabflow_ingress::bodies::EmptyBody,
        grabflow_ingress::bodies::CompensationBody,
        grabflow_ingress::bodies::ReassignBody,
        grabflow_ingress::routes::Accepted,
        grabflow_ingress::routes::BatchAccepted,
        grabflow_http::waiter::GrabAnswer,
        grabflow_http::waiter::StepAnswer,
        grabflow_ingress::routes::GrabPending,
        grabflow_http::error::ErrorBody,
        grabflow_egress::view::RiderMessage,
        grabflow_egress::view::HistoryItem,
        grabflow_egress::routes::OrderAnswer,
        grabflow_egress::routes::NearbyRiders,
        grabflow_egress::routes::NearbyRider,
        grabflow_egress::routes::RiderAnswer,
        grabflow_egress::routes::Position,
        grabflow_egress::ops::TrailAnswer,
        grabflow_egress::ops::Trail,
        grabflow_egress::ops::TrailRound,
        grabflow_egress::ops::TrailOffer,
        grabflow_egress::ops::TrailGrab
    )),
    modifiers(&Contract)
)]
pub struct ApiDoc;

/// `GET /openapi.json`.
pub async fn openapi() -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        ApiDoc::openapi().to_json().unwrap_or_default(),
    )
        .into_response()
}

/// Completes every operation of the document (see the module doc).
pub struct Contract;

/// What each error status means, for every operation that can give it.
const ERRORS: [(&str, &str); 10] = [
    (
        "400",
        "`invalid_json` or `unknown_field`: the body or the query is not of the expected shape \
         (a body is a JSON object, or for a batch an array)",
    ),
    (
        "401",
        "`unauthorized`: no token, or not one this server signed",
    ),
    (
        "403",
        "`forbidden`: the token's role, or its rider, may not make this call",
    ),
    ("404", "`not_found`: the id in `field` is not known; `expired` (a closed order read after `--history-retention`): it was, and its history is no longer kept"),
    ("409", "`conflict`: an order with this id exists; on a pickup or delivery, `not_assigned` or `wrong_state`"),
    (
        "413",
        "`too_large`: the body is over the limit (the connection is closed)",
    ),
    (
        "415",
        "`unsupported_media_type`: the body is sent as something other than JSON \
         (`application/json`, `application/…+json`, or `application/x-www-form-urlencoded` \
         as `curl -d` sends, whose body is read as JSON)",
    ),
    (
        "422",
        "`invalid_field`: the value of `field` is out of range or malformed, or the \
         `Idempotency-Key` was first used for a different request",
    ),
    (
        "429",
        "`too_many_requests`: over the rate limit of the token (or, without a valid token, \
         of the address); retry after `Retry-After` seconds",
    ),
    (
        "503",
        "`unavailable`: not durable in time, or shutting down; retry after `Retry-After` seconds",
    ),
];

impl Modify for Contract {
    fn modify(&self, api: &mut utoipa::openapi::OpenApi) {
        let components = api.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                Http::builder()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .description(Some(
                        "A token from `grabflow token --role app|rider|ops [--id RIDER]`.",
                    ))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "access_token",
            SecurityScheme::ApiKey(ApiKey::Query(ApiKeyValue::with_description(
                "access_token",
                "The same token, for stream clients that cannot set headers.",
            ))),
        );
        // Bodies without a required field may be left out (an empty body
        // reads as `{}`).
        let optional: Vec<String> = components
            .schemas
            .iter()
            .filter(|(_, s)| matches!(s, RefOr::T(Schema::Object(o)) if o.required.is_empty()))
            .map(|(name, _)| format!("#/components/schemas/{name}"))
            .collect();
        for (path, item) in api.paths.paths.iter_mut() {
            let methods = [
                (&mut item.get, false),
                (&mut item.put, true),
                (&mut item.post, true),
            ];
            for (op, is_event) in methods {
                if let Some(op) = op {
                    complete(path, op, is_event, &optional);
                }
            }
        }
    }
}

/// Adds to `op` what [`Contract`] promises; bodies of the schemas in
/// `optional` may be left out.
fn complete(path: &str, op: &mut Operation, is_event: bool, optional: &[String]) {
    op.tags = Some(vec![tag(path, is_event).to_string()]);
    let params = op.parameters.get_or_insert_with(Vec::new);
    let mut by_path = false;
    let mut by_query = false;
    for p in params.iter_mut() {
        match p.parameter_in {
            ParameterIn::Path => {
                by_path = true;
                p.schema = Some(RefOr::Ref(Ref::from_schema_name("Id")));
            }
            ParameterIn::Query => by_query = true,
            _ => {}
        }
    }
    if is_event {
        params.push(
            ParameterBuilder::new()
                .name("Idempotency-Key")
                .parameter_in(ParameterIn::Header)
                .required(Required::False)
                .description(Some(
                    "A repeat of the request with the same key answers as the first did and \
                     appends nothing; the key on a different request is a 422 (printable ASCII).",
                ))
                .schema(Some(
                    ObjectBuilder::new()
                        .schema_type(Type::String)
                        .min_length(Some(1))
                        .max_length(Some(MAX_IDEMPOTENCY_KEY)),
                ))
                .build(),
        );
    }
    if params.is_empty() {
        op.parameters = None;
    }
    if let Some(body) = &mut op.request_body {
        let may_be_empty = body.content.values().all(
            |c| matches!(&c.schema, Some(RefOr::Ref(r)) if optional.contains(&r.ref_location)),
        );
        if may_be_empty {
            body.required = Some(Required::False);
        }
    }
    if op.operation_id.as_deref() == Some("post_batch") {
        if let Some(body) = &mut op.request_body {
            for content in body.content.values_mut() {
                content.schema = Some(
                    ArrayBuilder::new()
                        .items(RefOr::Ref(Ref::from_schema_name("BatchPing")))
                        .min_items(Some(1))
                        .max_items(Some(MAX_BATCH))
                        .into(),
                );
            }
        }
    }
    let secured = op.security.as_ref().is_some_and(|s| !s.is_empty());
    let with_body = op.request_body.is_some();
    let responses = &mut op.responses.responses;
    if let Some(RefOr::T(accepted)) = responses.get_mut("202") {
        if is_event && accepted.description.is_empty() {
            accepted.description = "Accepted: the event is durable in the log. A repeated \
                `Idempotency-Key` gets the first answer."
                .to_string();
        }
    }
    for (code, meaning) in ERRORS {
        let applies = match code {
            "400" => with_body || by_query,
            "401" | "403" => secured,
            "413" | "415" | "503" => with_body,
            "429" => true,
            "422" => with_body || by_path || by_query,
            // Declared by the handler where it applies.
            _ => responses.contains_key(code),
        };
        if !applies {
            continue;
        }
        // A handler's own description of the error (what 409 means on this
        // call) is kept; the generic one fills in where it has none.
        let described = match responses.get(code) {
            Some(RefOr::T(r)) if !r.description.is_empty() => r.description.clone(),
            _ => meaning.to_string(),
        };
        let error = ResponseBuilder::new()
            .description(described)
            .content(
                "application/json",
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("Error")))
                    .build(),
            )
            .build();
        responses.insert(code.to_string(), RefOr::T(error));
    }
}

/// The group an operation is listed under.
fn tag(path: &str, is_event: bool) -> &'static str {
    if path.starts_with("/v1/ops/") || path == "/metrics" {
        "ops"
    } else if is_event {
        "events in"
    } else if path.starts_with("/v1/") {
        "results out"
    } else {
        "health"
    }
}
