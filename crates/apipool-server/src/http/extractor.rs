//! Extractors: JSON/query/path with our error shape, and the authenticated user.

use axum::extract::{FromRequest, FromRequestParts};
use axum::http::header;
use axum::http::request::Parts;
use sqlx::Row;

use super::AppState;
use super::error::ApiError;

/// `axum::Json` whose rejection is our `{"detail"}` JSON (422 naming the field, 400 for syntax,
/// 415 without a JSON content type). Every request body of the API is a JSON object: an array,
/// which serde would otherwise map onto a struct's fields in order, is refused with a 422.
#[derive(Debug)]
pub struct AppJson<T>(pub T);

impl<T, S> FromRequest<S> for AppJson<T>
where
    axum::Json<T>: FromRequest<S, Rejection = axum::extract::rejection::JsonRejection>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, ApiError> {
        let (parts, body) = req.into_parts();
        let bytes = bytes::Bytes::from_request(
            axum::extract::Request::from_parts(parts.clone(), body),
            state,
        )
        .await
        .map_err(|e| ApiError::from(axum::extract::rejection::JsonRejection::from(e)))?;
        let object = bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
        let rebuilt = axum::extract::Request::from_parts(parts, axum::body::Body::from(bytes));
        let axum::Json(value) = axum::Json::<T>::from_request(rebuilt, state).await?;
        if !object {
            return Err(ApiError::Unprocessable(
                "the body must be a JSON object".to_owned(),
            ));
        }
        Ok(Self(value))
    }
}

/// `axum::extract::Query` with our rejection.
#[derive(Debug, FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct AppQuery<T>(pub T);

/// `axum::extract::Path` with our rejection.
#[derive(Debug, FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct AppPath<T>(pub T);

/// Roles.
pub const ROLE_ADMIN: &str = "admin";
/// Roles.
pub const ROLE_USER: &str = "user";

/// A caller with a valid access token whose account is active.
///
/// The database is consulted on every request, so disabling a user takes effect immediately.
#[derive(Debug, Clone)]
pub struct AuthUser {
    /// User id.
    pub id: String,
    /// Username.
    pub username: String,
    /// `admin` or `user`.
    pub role: String,
}

impl AuthUser {
    /// Is this an admin?
    pub fn is_admin(&self) -> bool {
        self.role == ROLE_ADMIN
    }
}

/// Like [`AuthUser`], but `None` when no `Authorization` header is sent. A header that is present
/// but invalid is still a 401 (an `Option<AuthUser>` would silently treat it as anonymous).
#[derive(Debug, Clone)]
pub struct MaybeAuthUser(pub Option<AuthUser>);

/// An [`AuthUser`] whose role is `admin` (403 otherwise).
#[derive(Debug, Clone)]
pub struct AdminUser(pub AuthUser);

fn bearer(parts: &Parts) -> Result<Option<&str>, ApiError> {
    let Some(value) = parts.headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let text = value
        .to_str()
        .map_err(|_| ApiError::Unauthorized("invalid Authorization header".to_owned()))?;
    let token = text
        .strip_prefix("Bearer ")
        .or_else(|| text.strip_prefix("bearer "))
        .ok_or_else(|| {
            ApiError::Unauthorized("expected `Authorization: Bearer <access_token>`".to_owned())
        })?;
    Ok(Some(token.trim()))
}

pub(crate) async fn authenticate(token: &str, state: &AppState) -> Result<AuthUser, ApiError> {
    let claims = state
        .tokens
        .verify(token)
        .map_err(|e| ApiError::Unauthorized(e.to_string()))?;
    let row = sqlx::query("SELECT username, role, is_active FROM users WHERE id = $1")
        .bind(claims.sub.clone())
        .fetch_optional(&state.db.pool)
        .await?
        .ok_or_else(|| ApiError::Unauthorized("invalid access token".to_owned()))?;
    let active: i64 = row.try_get("is_active")?;
    if active == 0 {
        return Err(ApiError::Unauthorized(
            "this account is disabled".to_owned(),
        ));
    }
    Ok(AuthUser {
        id: claims.sub,
        username: row.try_get("username")?,
        role: row.try_get("role")?,
    })
}

impl FromRequestParts<AppState> for AuthUser {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = bearer(parts)?.ok_or_else(|| {
            ApiError::Unauthorized(
                "not authenticated: send `Authorization: Bearer <access_token>`".to_owned(),
            )
        })?;
        authenticate(token, state).await
    }
}

impl FromRequestParts<AppState> for MaybeAuthUser {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        match bearer(parts)? {
            None => Ok(Self(None)),
            Some(token) => Ok(Self(Some(authenticate(token, state).await?))),
        }
    }
}

impl FromRequestParts<AppState> for AdminUser {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let user = AuthUser::from_request_parts(parts, state).await?;
        if !user.is_admin() {
            return Err(ApiError::Forbidden("admin role required".to_owned()));
        }
        Ok(Self(user))
    }
}
