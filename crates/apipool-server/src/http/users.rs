//! `/users`: administration (admin role only).

use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::auth::UserOut;
use super::error::{ApiError, ApiResult, ErrorBody};
use super::extractor::{AdminUser, AppJson, AppPath, AppQuery, ROLE_ADMIN, ROLE_USER};
use super::types::PageParams;

pub(super) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_users))
        .routes(routes!(get_user, update_user))
}

/// A page of users.
#[derive(Debug, Serialize, ToSchema)]
pub struct UserPage {
    /// Users, ordered by username.
    pub items: Vec<UserOut>,
    /// Total number of users.
    pub total: i64,
    /// Page number.
    pub page: i64,
    /// Page size.
    pub page_size: i64,
}

/// Changes to a user.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UserUpdate {
    /// Enable or disable the account (disabling also revokes its refresh tokens).
    pub is_active: Option<bool>,
    /// `admin` or `user`.
    pub role: Option<String>,
}

const USER_COLS: &str = "id, username, email, role, is_active, created_at";

/// List users (admin).
#[utoipa::path(get, path = "/users", tag = "users", params(PageParams), security(("bearer" = [])),
    responses((status = 200, body = UserPage), (status = 403, body = ErrorBody)))]
pub(crate) async fn list_users(
    State(state): State<AppState>,
    _admin: AdminUser,
    AppQuery(paging): AppQuery<PageParams>,
) -> ApiResult<Json<UserPage>> {
    let (page, page_size, offset) = paging.resolve()?;
    let total: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM users")
        .fetch_one(&state.db.pool)
        .await?;
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {USER_COLS} FROM users ORDER BY username LIMIT $1 OFFSET $2"
    )))
    .bind(page_size)
    .bind(offset)
    .fetch_all(&state.db.pool)
    .await?;
    let items = rows
        .iter()
        .map(UserOut::from_row)
        .collect::<Result<_, _>>()?;
    Ok(Json(UserPage {
        items,
        total,
        page,
        page_size,
    }))
}

async fn load_user(state: &AppState, id: &str) -> ApiResult<UserOut> {
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {USER_COLS} FROM users WHERE id = $1"
    )))
    .bind(id.to_owned())
    .fetch_optional(&state.db.pool)
    .await?
    .ok_or_else(|| ApiError::not_found("user", id))?;
    Ok(UserOut::from_row(&row)?)
}

/// One user (admin).
#[utoipa::path(get, path = "/users/{id}", tag = "users", security(("bearer" = [])),
    params(("id" = String, Path, description = "User id")),
    responses((status = 200, body = UserOut), (status = 404, body = ErrorBody)))]
async fn get_user(
    State(state): State<AppState>,
    _admin: AdminUser,
    AppPath(id): AppPath<String>,
) -> ApiResult<Json<UserOut>> {
    Ok(Json(load_user(&state, &id).await?))
}

/// Enable/disable a user or change the role (admin).
#[utoipa::path(patch, path = "/users/{id}", tag = "users", security(("bearer" = [])),
    params(("id" = String, Path, description = "User id")), request_body = UserUpdate,
    responses((status = 200, body = UserOut), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub(crate) async fn update_user(
    State(state): State<AppState>,
    AdminUser(admin): AdminUser,
    AppPath(id): AppPath<String>,
    AppJson(body): AppJson<UserUpdate>,
) -> ApiResult<Json<UserOut>> {
    let current = load_user(&state, &id).await?;
    if id == admin.id && (body.is_active == Some(false) || body.role.as_deref() == Some(ROLE_USER))
    {
        return Err(ApiError::field(
            "is_active",
            "admins cannot disable or demote themselves (ask another admin)",
        ));
    }
    let role = match body.role.as_deref() {
        None => current.role.clone(),
        Some(r @ (ROLE_ADMIN | ROLE_USER)) => r.to_owned(),
        Some(_) => return Err(ApiError::field("role", "must be 'admin' or 'user'")),
    };
    let active = body.is_active.unwrap_or(current.is_active);
    let now = state.clock.now_ms();
    sqlx::query("UPDATE users SET role = $1, is_active = $2, updated_at = $3 WHERE id = $4")
        .bind(role)
        .bind(i64::from(active))
        .bind(now)
        .bind(id.clone())
        .execute(&state.db.pool)
        .await?;
    if !active {
        sqlx::query(
            "UPDATE refresh_tokens SET revoked_at = $1 WHERE user_id = $2 AND revoked_at IS NULL",
        )
        .bind(now)
        .bind(id.clone())
        .execute(&state.db.pool)
        .await?;
    }
    Ok(Json(load_user(&state, &id).await?))
}
