//! `/health`, `/api/v1/health` and `/ready`.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use crate::config::RedisFailMode;

/// Liveness.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// `ok`
    pub status: &'static str,
    /// Server version.
    pub version: &'static str,
}

/// Readiness.
#[derive(Debug, Serialize, ToSchema)]
pub struct Ready {
    /// `ready`, `degraded` (Redis is down and the pools fail open: calls are served with this
    /// process's own key state) or `unavailable`
    pub status: &'static str,
    /// Whether the database answered.
    pub database: bool,
    /// Whether Redis answered (absent when no Redis is configured).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis: Option<bool>,
}

pub(super) fn api_router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(api_health))
}

pub(super) fn root_router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(health))
        .routes(routes!(ready))
}

fn health_body() -> Json<Health> {
    Json(Health {
        status: "ok",
        version: env!("CARGO_PKG_VERSION"),
    })
}

/// Liveness (no dependencies checked).
#[utoipa::path(get, path = "/health", tag = "health", responses((status = 200, body = Health)))]
async fn health() -> Json<Health> {
    health_body()
}

/// Liveness (protocol path).
#[utoipa::path(get, path = "/health", tag = "health", responses((status = 200, body = Health)))]
async fn api_health() -> Json<Health> {
    health_body()
}

/// Readiness: 200 when the database answers and (if configured) Redis answers or the pools fail
/// open; else 503.
#[utoipa::path(get, path = "/ready", tag = "health",
    responses((status = 200, body = Ready), (status = 503, body = Ready)))]
async fn ready(State(state): State<AppState>) -> (StatusCode, Json<Ready>) {
    let (database, redis) = tokio::join!(state.db.ping(), state.engines.redis_reachable());
    let fails_open = state.engines.redis_fail_mode() == Some(RedisFailMode::Open);
    let (code, status) = match (database, redis) {
        (false, _) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        (true, None | Some(true)) => (StatusCode::OK, "ready"),
        (true, Some(false)) if fails_open => (StatusCode::OK, "degraded"),
        (true, Some(false)) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
    };
    (
        code,
        Json(Ready {
            status,
            database,
            redis,
        }),
    )
}
