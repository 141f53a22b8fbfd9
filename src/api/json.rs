//! Request extractors whose failures come back in our error envelope, naming the field.

use crate::error::ApiError;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap};
use bytes::Bytes;
use serde::de::DeserializeOwned;

/// Parses a JSON body into `T`, with errors that name the offending field.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8], param_prefix: &str) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            return ApiError::bad_request(format!("invalid JSON: {inner}"));
        }
        let mut param = if path == "." { String::new() } else { path };
        let msg = inner.to_string();
        // serde names an unknown field only in its message: "unknown field `x`, expected ..."
        if let Some(field) = msg.strip_prefix("unknown field `").and_then(|r| r.split('`').next()) {
            if !(param == field || param.ends_with(&format!(".{field}"))) {
                param = if param.is_empty() { field.to_string() } else { format!("{param}.{field}") };
            }
        }
        if !param_prefix.is_empty() {
            param = if param.is_empty() { param_prefix.to_string() } else { format!("{param_prefix}.{param}") };
        }
        let param = if param.is_empty() { "body".to_string() } else { param };
        ApiError::invalid(param, msg)
    })
}

/// `Json<T>` with our envelope on every failure.
pub struct ApiJson<T>(pub T);

pub fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<mime::Mime>().ok())
        .is_some_and(|m| m.subtype() == mime::JSON || m.suffix() == Some(mime::JSON))
}

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        if !is_json(req.headers()) {
            return Err(ApiError::bad_request("expected Content-Type: application/json"));
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|e| ApiError::from_status(e.status(), e.body_text()))?;
        parse_json(&bytes, "").map(ApiJson)
    }
}

/// Query parameters with our envelope on failure.
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        parse_query(parts.uri.query().unwrap_or("")).map(ApiQuery)
    }
}

/// Parses a query string into `T`, with errors that name the parameter.
pub fn parse_query<T: DeserializeOwned>(query: &str) -> Result<T, ApiError> {
    let de = serde_urlencoded::Deserializer::new(form_urlencoded::parse(query.as_bytes()));
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        ApiError::invalid(if path == "." { "query".to_string() } else { path }, format!("invalid query parameter: {}", e.into_inner()))
    })
}
