//! `/health`, `/api/v1/health` and `/ready`.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;

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
    /// `ready` or `unavailable`
    pub status: &'static str,
    /// Whether the database answered.
    pub database: bool,
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

/// Readiness: 200 when the database answers, else 503.
#[utoipa::path(get, path = "/ready", tag = "health",
    responses((status = 200, body = Ready), (status = 503, body = Ready)))]
async fn ready(State(state): State<AppState>) -> (StatusCode, Json<Ready>) {
    if state.db.ping().await {
        (
            StatusCode::OK,
            Json(Ready {
                status: "ready",
                database: true,
            }),
        )
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(Ready {
                status: "unavailable",
                database: false,
            }),
        )
    }
}
