//! The one error envelope every route answers with (CONTRACT.md):
//! `{"error": {"code", "message", "param"?, "line"?}}`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// An HTTP error: status, stable code, message, and where it applies.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub param: Option<String>,
    pub line: Option<usize>,
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into(), param: None, line: None, retry_after: None }
    }
    pub fn param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }
    pub fn not_found(what: &str, id: &str) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", format!("no {what} with id {id:?}"))
    }
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", message)
    }
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_parameter", message).param(param)
    }
    pub fn invalid_dataset(param: &str, e: &crate::dataset::DatasetError) -> Self {
        let mut err = Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_dataset", e.to_string()).param(param);
        err.line = (e.line > 0).then_some(e.line);
        err
    }
    pub fn overloaded(message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::TOO_MANY_REQUESTS, "overloaded", message);
        e.retry_after = Some(1);
        e
    }
    pub fn internal(e: impl std::fmt::Display) -> Self {
        tracing::error!(error = %e, "internal error");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", "internal error; see the server log")
    }

    /// The error for a status that carries no envelope of ours (framework rejections).
    pub fn from_status(status: StatusCode, message: String) -> Self {
        let code = match status.as_u16() {
            400 | 415 => "bad_request",
            401 => "unauthorized",
            404 => "not_found",
            405 => "method_not_allowed",
            408 => "timeout",
            409 => "conflict",
            413 => "payload_too_large",
            422 => "invalid_parameter",
            429 => "overloaded",
            503 => "not_ready",
            _ => "internal_error",
        };
        // 415 is not among the contract's statuses: a missing or wrong content type is a bad request.
        let status = if status == StatusCode::UNSUPPORTED_MEDIA_TYPE { StatusCode::BAD_REQUEST } else { status };
        Self::new(status, code, message)
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        Self::internal(e)
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        Self::internal(format!("{e:#}"))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({"code": self.code, "message": self.message});
        if let Some(p) = self.param {
            body["param"] = p.into();
        }
        if let Some(l) = self.line {
            body["line"] = l.into();
        }
        let mut resp = (self.status, axum::Json(json!({ "error": body }))).into_response();
        if let Some(s) = self.retry_after {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        resp
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
