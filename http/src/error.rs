//! The one error type of the HTTP API, in API.md's shape:
//! `{"error": {"code", "message", "field"?}}`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

/// An HTTP error with a stable code and, when one field is at fault, its name.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// A stable machine-readable code (`invalid_json`, `invalid_field`, …).
    pub code: &'static str,
    /// A sentence for people.
    pub message: String,
    /// The field at fault, if one is.
    pub field: Option<String>,
}

/// The body of every 4xx/5xx answer (named `Error` in the OpenAPI document).
#[derive(Serialize, ToSchema)]
#[schema(as = Error)]
pub struct ErrorBody<'a> {
    /// What went wrong.
    pub error: ErrorDetail<'a>,
}

/// The `error` of an [`ErrorBody`].
#[derive(Serialize, ToSchema)]
pub struct ErrorDetail<'a> {
    /// A stable code: `invalid_json`, `invalid_field`, `unknown_field`,
    /// `too_large`, `unauthorized`, `forbidden`, `not_found`, `expired`,
    /// `conflict`,
    /// `upgrade_required`, `unavailable`.
    pub code: &'a str,
    /// A sentence for people.
    pub message: &'a str,
    /// The field at fault, when one is (`lat`, `dropoff.lon`, `[3].rider_id`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<&'a str>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            field: None,
        }
    }
    /// 400 `invalid_json`: the body is not JSON of the expected shape.
    pub fn invalid_json(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_json", message)
    }
    /// 422 `invalid_field`: a field has a wrong type or value.
    pub fn invalid_field(field: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError {
            field: Some(field.into()),
            ..Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_field", message)
        }
    }
    /// The same error about the `i`th item of a JSON array (`[i].field`).
    pub fn in_item(mut self, i: usize) -> Self {
        self.field = Some(match self.field {
            Some(f) => format!("[{i}].{f}"),
            None => format!("[{i}]"),
        });
        self
    }
    /// 400 `unknown_field`: the body has a field the contract does not know.
    pub fn unknown_field(field: impl Into<String>) -> Self {
        let field = field.into();
        ApiError {
            message: format!("unknown field {field:?}"),
            field: Some(field),
            ..Self::new(StatusCode::BAD_REQUEST, "unknown_field", "")
        }
    }
    /// 413 `too_large`.
    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", message)
    }
    /// 401 `unauthorized`.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }
    /// 403 `forbidden`.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }
    /// 404 `not_found`, naming the field that holds the unknown id.
    pub fn not_found(field: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError {
            field: Some(field.into()),
            ..Self::new(StatusCode::NOT_FOUND, "not_found", message)
        }
    }
    /// 404 `expired`: the id was known, but what it named is older than
    /// its retention; naming the field that holds the id.
    pub fn expired(field: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError {
            field: Some(field.into()),
            ..Self::new(StatusCode::NOT_FOUND, "expired", message)
        }
    }
    /// 409 `conflict`.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", message)
    }
    /// 409 with its own code: an appended event the dataflow rejected
    /// (`not_assigned`, `wrong_state`).
    pub fn rejected(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, code, message)
    }
    /// 426 `upgrade_required`: a WebSocket path asked without the handshake.
    pub fn upgrade_required(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UPGRADE_REQUIRED, "upgrade_required", message)
    }
    /// 415 `unsupported_media_type`: the body is not sent as JSON.
    pub fn unsupported_media_type(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            message,
        )
    }
    /// 429 `too_many_requests`: over a rate limit (the caller adds
    /// `Retry-After`).
    pub fn too_many_requests(message: impl Into<String>) -> Self {
        Self::new(StatusCode::TOO_MANY_REQUESTS, "too_many_requests", message)
    }
    /// 503 `unavailable`.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code,
                message: &self.message,
                field: self.field.as_deref(),
            },
        };
        let mut response = (self.status, axum::Json(body)).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if self.status == StatusCode::UPGRADE_REQUIRED {
            response
                .headers_mut()
                .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        }
        if self.status == StatusCode::PAYLOAD_TOO_LARGE {
            // The rest of the body is never read, so the connection cannot
            // carry another request: say so, or a client reusing it would
            // see it cut under its next request.
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}
