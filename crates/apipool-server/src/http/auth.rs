//! `/auth/*`: login, refresh (rotating, with reuse detection), logout, register, me.

use std::net::SocketAddr;

use axum::Json;
use axum::extract::{ConnectInfo, State};
use axum::http::StatusCode;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use sqlx::Row;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::error::{ApiError, ApiResult, ErrorBody, ResultExt};
use super::extractor::{AppJson, AuthUser, MaybeAuthUser, ROLE_ADMIN, ROLE_USER};
use super::types;
use crate::auth::{ct_eq, new_refresh_token, parse_refresh_token, verify_password};
use crate::clock::format_ms;

pub(super) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(login))
        .routes(routes!(refresh))
        .routes(routes!(logout))
        .routes(routes!(register))
        .routes(routes!(me))
}

/// Login credentials.
#[derive(Debug, Deserialize, ToSchema)]
pub struct LoginRequest {
    /// Username.
    pub username: String,
    /// Password.
    #[schema(value_type = String)]
    pub password: SecretString,
}

/// Tokens returned by login and refresh.
#[derive(Debug, Serialize, ToSchema)]
pub struct TokenResponse {
    /// JWT access token for `Authorization: Bearer`.
    pub access_token: String,
    /// Opaque refresh token (single use; rotated by `/auth/refresh`).
    pub refresh_token: String,
    /// Always `bearer`.
    pub token_type: &'static str,
    /// Access-token lifetime in seconds.
    pub expires_in: u64,
}

/// A refresh token.
#[derive(Debug, Deserialize, ToSchema)]
pub struct RefreshRequest {
    /// The refresh token from login or the previous refresh.
    #[schema(value_type = String)]
    pub refresh_token: SecretString,
}

/// Registration.
#[derive(Debug, Deserialize, ToSchema)]
pub struct RegisterRequest {
    /// 3–64 of `[A-Za-z0-9_-]`.
    pub username: String,
    /// E-mail address.
    pub email: String,
    /// 8–128 characters.
    #[schema(value_type = String)]
    pub password: SecretString,
    /// `admin` or `user` (default); only an admin may set it.
    pub role: Option<String>,
}

/// A user.
#[derive(Debug, Serialize, ToSchema)]
pub struct UserOut {
    /// Id.
    pub id: String,
    /// Username.
    pub username: String,
    /// E-mail.
    pub email: String,
    /// `admin` or `user`.
    pub role: String,
    /// Disabled users cannot log in or use tokens.
    pub is_active: bool,
    /// RFC 3339.
    pub created_at: String,
}

impl UserOut {
    pub(super) fn from_row(r: &sqlx::any::AnyRow) -> Result<Self, sqlx::Error> {
        Ok(Self {
            id: r.try_get("id")?,
            username: r.try_get("username")?,
            email: r.try_get("email")?,
            role: r.try_get("role")?,
            is_active: r.try_get::<i64, _>("is_active")? != 0,
            created_at: format_ms(r.try_get("created_at")?),
        })
    }
}

/// Issues an access token and a refresh token (a new family unless `family` is given).
async fn issue_pair<'c, E>(
    state: &AppState,
    exec: E,
    user_id: &str,
    role: &str,
    family: Option<String>,
) -> ApiResult<TokenResponse>
where
    E: sqlx::Executor<'c, Database = sqlx::Any>,
{
    let access_token = state.tokens.issue(user_id, role)?;
    let rt = new_refresh_token();
    let now = state.clock.now_ms();
    let ttl_ms = i64::try_from(state.config.refresh_token_ttl_secs)
        .unwrap_or(i64::MAX / 2_000)
        .saturating_mul(1000);
    sqlx::query(
        "INSERT INTO refresh_tokens (id, family_id, user_id, token_hash, created_at, expires_at) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(rt.id.clone())
    .bind(family.unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string()))
    .bind(user_id.to_owned())
    .bind(rt.hash)
    .bind(now)
    .bind(now.saturating_add(ttl_ms))
    .execute(exec)
    .await?;
    Ok(TokenResponse {
        access_token,
        refresh_token: rt.token.expose_secret().to_owned(),
        token_type: "bearer",
        expires_in: state.tokens.access_ttl.as_secs(),
    })
}

fn invalid_credentials() -> ApiError {
    ApiError::Unauthorized("invalid username or password".to_owned())
}

/// Log in with username and password.
#[utoipa::path(post, path = "/auth/login", tag = "auth", request_body = LoginRequest,
    responses((status = 200, body = TokenResponse), (status = 401, body = ErrorBody),
              (status = 429, body = ErrorBody, description = "Too many failed logins; see Retry-After")))]
#[tracing::instrument(skip_all, fields(username = %body.username))]
pub(crate) async fn login(
    State(state): State<AppState>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    AppJson(body): AppJson<LoginRequest>,
) -> ApiResult<Json<TokenResponse>> {
    let ip = addr.ip();
    if let Err(retry_after) = state.throttle.check(&body.username, ip) {
        return Err(ApiError::TooManyRequests {
            detail: "too many failed logins; try again later".to_owned(),
            retry_after,
        });
    }
    let row =
        sqlx::query("SELECT id, password_hash, role, is_active FROM users WHERE username = $1")
            .bind(body.username.clone())
            .fetch_optional(&state.db.pool)
            .await?;
    let hash = match &row {
        Some(r) => r.try_get::<String, _>("password_hash")?,
        // Unknown user: verify against a dummy hash so the response takes as long.
        None => state.dummy_hash.to_string(),
    };
    let password = body.password;
    let ok = crate::auth::hashing(move || verify_password(&password, &hash)).await?;
    let Some(row) = row.filter(|_| ok) else {
        state.throttle.record_failure(&body.username, ip);
        return Err(invalid_credentials());
    };
    if row.try_get::<i64, _>("is_active")? == 0 {
        return Err(ApiError::Unauthorized(
            "this account is disabled".to_owned(),
        ));
    }
    state.throttle.record_success(&body.username);
    let id: String = row.try_get("id")?;
    let role: String = row.try_get("role")?;
    let pair = issue_pair(&state, &state.db.pool, &id, &role, None).await?;
    tracing::info!(user_id = %id, "login");
    Ok(Json(pair))
}

struct RefreshRow {
    user_id: String,
    family_id: String,
    token_hash: String,
    expires_at: i64,
    used_at: Option<i64>,
    revoked_at: Option<i64>,
}

async fn load_refresh(
    state: &AppState,
    token: &SecretString,
) -> ApiResult<(String, String, RefreshRow)> {
    let invalid = || ApiError::Unauthorized("invalid refresh token".to_owned());
    let (id, hash) = parse_refresh_token(token.expose_secret()).ok_or_else(invalid)?;
    let r = sqlx::query(
        "SELECT user_id, family_id, token_hash, expires_at, used_at, revoked_at FROM refresh_tokens WHERE id = $1",
    )
    .bind(id.clone())
    .fetch_optional(&state.db.pool)
    .await?
    .ok_or_else(invalid)?;
    let row = RefreshRow {
        user_id: r.try_get("user_id")?,
        family_id: r.try_get("family_id")?,
        token_hash: r.try_get("token_hash")?,
        expires_at: r.try_get("expires_at")?,
        used_at: r.try_get("used_at")?,
        revoked_at: r.try_get("revoked_at")?,
    };
    if !ct_eq(&row.token_hash, &hash) {
        return Err(invalid());
    }
    Ok((id, hash, row))
}

async fn revoke_family(state: &AppState, family: &str) -> ApiResult<()> {
    sqlx::query(
        "UPDATE refresh_tokens SET revoked_at = $1 WHERE family_id = $2 AND revoked_at IS NULL",
    )
    .bind(state.clock.now_ms())
    .bind(family.to_owned())
    .execute(&state.db.pool)
    .await?;
    Ok(())
}

/// Exchange a refresh token for a new pair. Each refresh token works once; presenting a used
/// one again revokes the whole login (token family).
#[utoipa::path(post, path = "/auth/refresh", tag = "auth", request_body = RefreshRequest,
    responses((status = 200, body = TokenResponse), (status = 401, body = ErrorBody)))]
#[tracing::instrument(skip_all)]
pub(crate) async fn refresh(
    State(state): State<AppState>,
    AppJson(body): AppJson<RefreshRequest>,
) -> ApiResult<Json<TokenResponse>> {
    let (id, _, row) = load_refresh(&state, &body.refresh_token).await?;
    if row.revoked_at.is_some() {
        return Err(ApiError::Unauthorized(
            "refresh token revoked; log in again".to_owned(),
        ));
    }
    let reuse = || {
        ApiError::Unauthorized(
            "refresh token already used: every session of this login was revoked; log in again"
                .to_owned(),
        )
    };
    if row.used_at.is_some() {
        tracing::warn!(family = %row.family_id, "refresh token reuse detected; revoking the family");
        revoke_family(&state, &row.family_id).await?;
        return Err(reuse());
    }
    let now = state.clock.now_ms();
    if row.expires_at <= now {
        return Err(ApiError::Unauthorized(
            "refresh token expired; log in again".to_owned(),
        ));
    }
    let user = sqlx::query("SELECT role, is_active FROM users WHERE id = $1")
        .bind(row.user_id.clone())
        .fetch_optional(&state.db.pool)
        .await?
        .ok_or_else(|| ApiError::Unauthorized("invalid refresh token".to_owned()))?;
    if user.try_get::<i64, _>("is_active")? == 0 {
        return Err(ApiError::Unauthorized(
            "this account is disabled".to_owned(),
        ));
    }
    let role: String = user.try_get("role")?;
    let mut tx = state.db.pool.begin().await?;
    let claimed = sqlx::query(
        "UPDATE refresh_tokens SET used_at = $1 WHERE id = $2 AND used_at IS NULL AND revoked_at IS NULL",
    )
    .bind(now)
    .bind(id)
    .execute(&mut *tx)
    .await?;
    if claimed.rows_affected() != 1 {
        // Lost a race with another use of the same token: that is reuse too.
        tx.rollback().await?;
        revoke_family(&state, &row.family_id).await?;
        return Err(reuse());
    }
    let pair = issue_pair(&state, &mut *tx, &row.user_id, &role, Some(row.family_id)).await?;
    tx.commit().await?;
    Ok(Json(pair))
}

/// Revoke the login that a refresh token belongs to.
#[utoipa::path(post, path = "/auth/logout", tag = "auth", request_body = RefreshRequest,
    responses((status = 204, description = "Logged out"), (status = 401, body = ErrorBody)))]
#[tracing::instrument(skip_all)]
pub(crate) async fn logout(
    State(state): State<AppState>,
    AppJson(body): AppJson<RefreshRequest>,
) -> ApiResult<StatusCode> {
    let (_, _, row) = load_refresh(&state, &body.refresh_token).await?;
    revoke_family(&state, &row.family_id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Create a user. Needs an admin token unless open registration is enabled.
#[utoipa::path(post, path = "/auth/register", tag = "auth", request_body = RegisterRequest,
    security((), ("bearer" = [])),
    responses((status = 201, body = UserOut), (status = 403, body = ErrorBody),
              (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
#[tracing::instrument(skip_all, fields(username = %body.username))]
pub(crate) async fn register(
    State(state): State<AppState>,
    MaybeAuthUser(caller): MaybeAuthUser,
    AppJson(body): AppJson<RegisterRequest>,
) -> ApiResult<(StatusCode, Json<UserOut>)> {
    let is_admin = caller.as_ref().is_some_and(AuthUser::is_admin);
    if !state.config.open_registration && !is_admin {
        return Err(ApiError::Forbidden(
            "registration is closed: an admin must create accounts (or start the server with APIPOOL_OPEN_REGISTRATION=true)"
                .to_owned(),
        ));
    }
    let username = types::username(&body.username)?;
    let email = types::email(&body.email)?;
    types::password("password", body.password.expose_secret())?;
    let role = match body.role.as_deref() {
        None => ROLE_USER,
        Some(r) if !is_admin && r != ROLE_USER => {
            return Err(ApiError::Forbidden(
                "only an admin may choose the role".to_owned(),
            ));
        }
        Some(ROLE_ADMIN) => ROLE_ADMIN,
        Some(ROLE_USER) => ROLE_USER,
        Some(_) => return Err(ApiError::field("role", "must be 'admin' or 'user'")),
    };
    let user = create_user(&state, &username, &email, body.password, role).await?;
    Ok((StatusCode::CREATED, Json(user)))
}

/// Inserts a user (hashing off the async threads).
pub(crate) async fn create_user(
    state: &AppState,
    username: &str,
    email: &str,
    password: SecretString,
    role: &str,
) -> ApiResult<UserOut> {
    let hash = crate::auth::hashing(move || crate::auth::hash_password(&password)).await??;
    let id = uuid::Uuid::new_v4().to_string();
    let now = state.clock.now_ms();
    sqlx::query(
        "INSERT INTO users (id, username, email, password_hash, role, is_active, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, $5, 1, $6, $6)",
    )
    .bind(id.clone())
    .bind(username.to_owned())
    .bind(email.to_owned())
    .bind(hash)
    .bind(role.to_owned())
    .bind(now)
    .execute(&state.db.pool)
    .await
    .on_unique(|| format!("username '{username}' is already taken"))?;
    Ok(UserOut {
        id,
        username: username.to_owned(),
        email: email.to_owned(),
        role: role.to_owned(),
        is_active: true,
        created_at: format_ms(now),
    })
}

/// The current user.
#[utoipa::path(get, path = "/auth/me", tag = "auth", security(("bearer" = [])),
    responses((status = 200, body = UserOut), (status = 401, body = ErrorBody)))]
async fn me(State(state): State<AppState>, user: AuthUser) -> ApiResult<Json<UserOut>> {
    let row = sqlx::query(
        "SELECT id, username, email, role, is_active, created_at FROM users WHERE id = $1",
    )
    .bind(user.id)
    .fetch_one(&state.db.pool)
    .await?;
    Ok(Json(UserOut::from_row(&row)?))
}
