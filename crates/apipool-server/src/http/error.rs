//! One error type for every handler, rendered as `{"detail": ...}` with the right status.
//! Internal errors are logged (inside the request span, which carries the request id) and never
//! echoed to the client.

use std::time::Duration;

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::vault::VaultError;

/// The body of every error response.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// What went wrong (and, where possible, what to do).
    pub detail: String,
}

/// The detail of a 503 when the database cannot be reached.
pub const DATABASE_UNAVAILABLE: &str = "the database is unavailable right now (down or refusing connections), so this request was not completed; retry in a few seconds";

/// Result of a handler.
pub type ApiResult<T, E = ApiError> = Result<T, E>;

/// Everything a handler can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400
    #[error("{0}")]
    BadRequest(String),
    /// 401
    #[error("{0}")]
    Unauthorized(String),
    /// 403
    #[error("{0}")]
    Forbidden(String),
    /// 404
    #[error("{0}")]
    NotFound(String),
    /// 409
    #[error("{0}")]
    Conflict(String),
    /// 413
    #[error("{0}")]
    PayloadTooLarge(String),
    /// 415
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// 422 naming the field
    #[error("{0}")]
    Unprocessable(String),
    /// 422 with a per-row report (imports)
    #[error("{detail}")]
    UnprocessableRows {
        /// Summary.
        detail: String,
        /// One entry per failed row.
        errors: serde_json::Value,
    },
    /// 429
    #[error("{detail}")]
    TooManyRequests {
        /// Summary.
        detail: String,
        /// When to try again.
        retry_after: Duration,
    },
    /// 503
    #[error("{0}")]
    Unavailable(String),
    /// 500, logged
    #[error("internal error: {0:#}")]
    Internal(#[from] anyhow::Error),
    /// 500, logged
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// 500, logged
    #[error("vault error: {0}")]
    Vault(#[from] VaultError),
}

impl ApiError {
    /// A 422 naming the field.
    pub fn field(field: &str, message: impl std::fmt::Display) -> Self {
        Self::Unprocessable(format!("{field}: {message}"))
    }

    /// 404 for a resource kind and name.
    pub fn not_found(what: &str, name: &str) -> Self {
        Self::NotFound(format!("{what} '{name}' not found"))
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::Unprocessable(_) | Self::UnprocessableRows { .. } => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            Self::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Database(e) if crate::db::is_unavailable(e) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) | Self::Database(_) | Self::Vault(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = match &self {
            Self::Database(e) if crate::db::is_unavailable(e) => {
                tracing::warn!(error = %e, "request failed: the database is unavailable");
                serde_json::json!({ "detail": DATABASE_UNAVAILABLE })
            }
            Self::Internal(_) | Self::Database(_) | Self::Vault(_) => {
                // `{:#}` prints the cause chain; none of our errors carry secrets.
                tracing::error!(error = %self, "request failed with an internal error");
                serde_json::json!({ "detail": "Internal Server Error" })
            }
            Self::UnprocessableRows { detail, errors } => {
                serde_json::json!({ "detail": detail, "errors": errors })
            }
            other => serde_json::json!({ "detail": other.to_string() }),
        };
        let mut resp = (status, axum::Json(body)).into_response();
        match &self {
            Self::Unauthorized(_) => {
                resp.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            Self::Database(e) if crate::db::is_unavailable(e) => {
                resp.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
            }
            Self::TooManyRequests { retry_after, .. } => {
                let secs = retry_after.as_secs().max(1).to_string();
                if let Ok(v) = HeaderValue::from_str(&secs) {
                    resp.headers_mut().insert(header::RETRY_AFTER, v);
                }
            }
            _ => {}
        }
        resp
    }
}

/// The body length a request announces in `Content-Length`, if any (and readable).
pub(crate) fn announced_length(headers: &http::HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        match r {
            JsonRejection::JsonDataError(e) => Self::Unprocessable(data_error_text(&e.body_text())),
            JsonRejection::JsonSyntaxError(e) => {
                Self::BadRequest(format!("malformed JSON body: {}", e.body_text()))
            }
            JsonRejection::MissingJsonContentType(_) => Self::UnsupportedMediaType(
                "expected a JSON body with `Content-Type: application/json`".to_owned(),
            ),
            JsonRejection::BytesRejection(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                Self::PayloadTooLarge("request body too large".to_owned())
            }
            other => Self::BadRequest(other.body_text()),
        }
    }
}

/// axum's text is "Failed to deserialize the JSON body into the target type: FIELD: MESSAGE";
/// keep the part that names the field.
fn data_error_text(text: &str) -> String {
    text.split_once("target type: ")
        .map_or(text, |(_, rest)| rest)
        .to_owned()
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> Self {
        let text = r.body_text();
        Self::Unprocessable(format!(
            "query: {}",
            text.split_once("query string: ")
                .map_or(text.as_str(), |(_, rest)| rest)
        ))
    }
}

impl From<PathRejection> for ApiError {
    fn from(r: PathRejection) -> Self {
        Self::Unprocessable(format!("path: {}", r.body_text()))
    }
}

/// `Not Found` for unknown routes.
pub async fn not_found() -> ApiError {
    ApiError::NotFound("Not Found".to_owned())
}

/// `405` in JSON.
pub async fn method_not_allowed() -> Response {
    (
        StatusCode::METHOD_NOT_ALLOWED,
        axum::Json(serde_json::json!({ "detail": "Method Not Allowed" })),
    )
        .into_response()
}

/// Maps unique-constraint violations to 409.
pub trait ResultExt<T> {
    /// On a unique violation, answer 409 with `detail`.
    fn on_unique(self, detail: impl FnOnce() -> String) -> ApiResult<T>;
}

impl<T> ResultExt<T> for Result<T, sqlx::Error> {
    fn on_unique(self, detail: impl FnOnce() -> String) -> ApiResult<T> {
        self.map_err(|e| {
            if crate::db::is_unique_violation(&e) {
                ApiError::Conflict(detail())
            } else {
                ApiError::Database(e)
            }
        })
    }
}
