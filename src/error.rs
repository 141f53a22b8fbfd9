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

/// A full or read-only disk under the data dir: a state of the machine, not a bug, and one that
/// an operator can clear. Answered with 503 `storage_unavailable` and a `Retry-After`.
fn storage_unavailable(detail: impl std::fmt::Display) -> ApiError {
    tracing::error!(error = %detail, "the data dir cannot be written");
    let mut e = ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "storage_unavailable",
        format!("the data dir cannot be written ({detail}); nothing was stored: free space or make it writable, then retry"),
    );
    e.retry_after = Some(30);
    e
}

/// Whether an OS error is a full disk, a read-only filesystem or an exhausted quota.
pub fn is_storage_full_or_read_only(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EROFS | libc::EDQUOT))
}

/// SQLite's primary result code of a database error (the low byte of the extended one).
pub fn sqlite_primary_code(e: &sqlx::Error) -> Option<i32> {
    let d = e.as_database_error()?;
    d.try_downcast_ref::<sqlx::sqlite::SqliteError>()?;
    d.code().and_then(|c| c.parse::<i32>().ok()).map(|c| c & 0xff)
}

/// Whether the database could not write: SQLite's 13 (full) or 8 (read-only), Postgres' class
/// 53 (insufficient resources: disk full, out of memory, too many connections).
fn is_database_full_or_read_only(e: &sqlx::Error) -> bool {
    let postgres_full = e
        .as_database_error()
        .and_then(|d| d.try_downcast_ref::<sqlx::postgres::PgDatabaseError>())
        .is_some_and(|pg| pg.code().starts_with("53"));
    postgres_full || matches!(sqlite_primary_code(e), Some(13 | 8))
}

/// Whether the database could not be reached: down, restarting, or every connection busy for
/// longer than the pool waits.
pub fn is_database_unreachable(e: &sqlx::Error) -> bool {
    let shutting_down = e
        .as_database_error()
        .and_then(|d| d.try_downcast_ref::<sqlx::postgres::PgDatabaseError>())
        // Class 57P: the server is shutting down or restarting; 08: the connection failed.
        .is_some_and(|pg| pg.code().starts_with("57P") || pg.code().starts_with("08"));
    shutting_down || matches!(e, sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) | sqlx::Error::Tls(_))
}

fn database_unavailable(e: impl std::fmt::Display) -> ApiError {
    tracing::error!(error = %e, "the database cannot be reached");
    let mut err =
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "database_unavailable", "the database cannot be reached; nothing was stored: retry");
    err.retry_after = Some(5);
    err
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        if is_database_full_or_read_only(&e) {
            return storage_unavailable(e);
        }
        if is_database_unreachable(&e) {
            return database_unavailable(e);
        }
        Self::internal(e)
    }
}

impl From<crate::objects::ObjectError> for ApiError {
    fn from(e: crate::objects::ObjectError) -> Self {
        tracing::error!(error = %e, "the object store failed");
        let mut err = ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "storage_unavailable", format!("{e}; nothing was stored: retry"));
        err.retry_after = Some(5);
        err
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        let storage = e.chain().any(|c| {
            c.downcast_ref::<std::io::Error>().is_some_and(is_storage_full_or_read_only)
                || c.downcast_ref::<sqlx::Error>().is_some_and(is_database_full_or_read_only)
        });
        if storage {
            return storage_unavailable(format!("{e:#}"));
        }
        if e.chain().any(|c| c.downcast_ref::<sqlx::Error>().is_some_and(is_database_unreachable)) {
            return database_unavailable(format!("{e:#}"));
        }
        Self::internal(format!("{e:#}"))
    }
}

impl ApiError {
    /// The error envelope, `{"error": {"code", "message", "param"?, "line"?}}`.
    pub fn envelope(&self) -> serde_json::Value {
        let mut body = json!({"code": self.code, "message": self.message});
        if let Some(p) = &self.param {
            body["param"] = p.as_str().into();
        }
        if let Some(l) = self.line {
            body["line"] = l.into();
        }
        json!({ "error": body })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, axum::Json(self.envelope())).into_response();
        if let Some(s) = self.retry_after {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        resp
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_or_read_only_disk_is_a_503_with_retry_after_not_a_500() {
        for errno in [libc::ENOSPC, libc::EROFS] {
            let e: ApiError = anyhow::Error::from(std::io::Error::from_raw_os_error(errno)).context("writing the dataset").into();
            assert_eq!((e.status, e.code, e.retry_after), (StatusCode::SERVICE_UNAVAILABLE, "storage_unavailable", Some(30)));
        }
        let other: ApiError = anyhow::Error::from(std::io::Error::from_raw_os_error(libc::EIO)).into();
        assert_eq!(other.status, StatusCode::INTERNAL_SERVER_ERROR);
    }
}
