//! Extractors that turn every malformed body or query string into an
//! [`ApiError`] naming the field at fault, the checks of ids and positions,
//! and the OpenAPI schema of an id.

use crate::error::ApiError;
use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use grabflow_api::geo::CoordError;
use grabflow_api::id::MAX_ID_LEN;
use grabflow_api::{Coord, Id};
use serde::de::DeserializeOwned;
use utoipa::ToSchema;

/// Extractor: a JSON object body of type `T`, or a 4xx in the API's error
/// shape. An empty body reads as `{}`; any other JSON value (an array, a
/// number) is a 400. See [`media_type`] for the `Content-Type`s taken.
pub struct JsonBody<T>(pub T);

/// Extractor: a JSON array body of type `T` (a batch), or a 4xx in the
/// API's error shape, as [`JsonBody`] is for objects.
pub struct JsonList<T>(pub T);

/// What a body must be at the top.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Shape {
    Object,
    Array,
}

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        json_body(req, state, Shape::Object).await.map(JsonBody)
    }
}

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonList<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        json_body(req, state, Shape::Array).await.map(JsonList)
    }
}

/// Checks a request body's `Content-Type`: none, `application/json` or any
/// `application/…+json` is JSON; so is `application/x-www-form-urlencoded`,
/// what `curl -d` sends unless told otherwise, whose body is then read as
/// JSON too (a form-encoded body fails as invalid JSON). Anything else is a
/// 415: the API reads JSON only.
pub fn media_type(content_type: Option<&axum::http::HeaderValue>) -> Result<(), ApiError> {
    let Some(value) = content_type else {
        return Ok(());
    };
    let essence = value
        .to_str()
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let json = essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
        || essence == "application/x-www-form-urlencoded";
    if json {
        Ok(())
    } else {
        Err(ApiError::unsupported_media_type(format!(
            "bodies are JSON: send Content-Type: application/json (got {essence:?})"
        )))
    }
}

/// Reads the body of `req` as a JSON value of `shape` and type `T`.
async fn json_body<S: Send + Sync, T: DeserializeOwned>(
    req: Request,
    state: &S,
    shape: Shape,
) -> Result<T, ApiError> {
    media_type(req.headers().get(axum::http::header::CONTENT_TYPE))?;
    let bytes = Bytes::from_request(req, state).await.map_err(|e| {
        if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::too_large("the body is larger than this endpoint takes")
        } else {
            ApiError::invalid_json(e.body_text())
        }
    })?;
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace()).copied();
    let bytes: &[u8] = match (first, shape) {
        (None, Shape::Object) => b"{}",
        (Some(b'{'), Shape::Object) | (Some(b'['), Shape::Array) => &bytes,
        (_, Shape::Object) => return Err(ApiError::invalid_json("the body must be a JSON object")),
        (_, Shape::Array) => return Err(ApiError::invalid_json("the body must be a JSON array")),
    };
    parse(bytes)
}

/// Parses `bytes` as `T`, naming the offending field on failure. Good
/// bodies take the plain parser; only a failed one is parsed again with
/// path tracking, to find the field at fault.
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if let Ok(value) = serde_json::from_slice(bytes) {
        return Ok(value);
    }
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut *de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let message = inner.to_string();
        let message = message
            .split(" at line ")
            .next()
            .unwrap_or(&message)
            .to_string();
        if inner.is_data() {
            at_field(path, message)
        } else {
            ApiError::invalid_json(message)
        }
    })?;
    // What the plain parser refused after a whole value: trailing bytes.
    de.end()
        .map_err(|e| ApiError::invalid_json(e.to_string()))?;
    Ok(value)
}

/// A value that did not fit its type, at `path` (`.` for the top), as API.md's
/// error naming the field: 400 `unknown_field` for a name the contract does
/// not know, else 422 `invalid_field`.
fn at_field(path: String, message: String) -> ApiError {
    let join = |name: &str| {
        if path == "." || path.is_empty() {
            name.to_string()
        } else if path == name || path.ends_with(&format!(".{name}")) {
            path.clone()
        } else {
            format!("{path}.{name}")
        }
    };
    let quoted = |prefix: &str| {
        message
            .strip_prefix(prefix)
            .and_then(|rest| rest.split('`').next())
            .map(str::to_string)
    };
    if let Some(name) = quoted("unknown field `") {
        ApiError::unknown_field(join(&name))
    } else if let Some(name) = quoted("missing field `").or_else(|| quoted("duplicate field `")) {
        ApiError::invalid_field(join(&name), message)
    } else {
        ApiError::invalid_field(path, message)
    }
}

/// Extractor: the query string as `T`, or a 4xx in API.md's error shape
/// naming the parameter at fault.
pub struct QueryParams<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for QueryParams<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        let query = parts.uri.query().unwrap_or("");
        let de = serde_urlencoded::Deserializer::new(form_urlencoded::parse(query.as_bytes()));
        serde_path_to_error::deserialize(de)
            .map(QueryParams)
            .map_err(|e| at_field(e.path().to_string(), e.into_inner().to_string()))
    }
}

/// The OpenAPI schema of an id (`Id`): 1–64 characters from
/// `[A-Za-z0-9_.:-]`, as [`Id::new`] checks.
pub struct IdSchema;

impl utoipa::PartialSchema for IdSchema {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::Type::String)
            .description(Some("An id: 1 to 64 characters from [A-Za-z0-9_.:-]."))
            .min_length(Some(1))
            .max_length(Some(MAX_ID_LEN))
            .pattern(Some(format!("^[A-Za-z0-9_.:-]{{1,{MAX_ID_LEN}}}$")))
            .into()
    }
}

impl ToSchema for IdSchema {
    fn name() -> std::borrow::Cow<'static, str> {
        "Id".into()
    }
}

/// A validated id, or a 422 naming `field`.
pub fn id(value: &str, field: &str) -> Result<Id, ApiError> {
    Id::new(value).map_err(|e| ApiError::invalid_field(field, e.to_string()))
}

/// A validated position, or a 422 naming `prefix.lat` / `prefix.lon`.
pub fn coord(lat: f64, lon: f64, prefix: &str) -> Result<Coord, ApiError> {
    Coord::from_degrees(lat, lon).map_err(|e| {
        let name = match e {
            CoordError::Lat => "lat",
            CoordError::Lon => "lon",
        };
        let field = if prefix.is_empty() {
            name.to_string()
        } else {
            format!("{prefix}.{name}")
        };
        ApiError::invalid_field(field, e.to_string())
    })
}
