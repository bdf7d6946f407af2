//! The HTTP layer: state, router, middleware.
//!
//! Resource modules each expose `router() -> OpenApiRouter<AppState>`; [`app`] merges them under
//! `/api/v1`, adds `/health`, `/ready`, `/metrics`, the OpenAPI document and Swagger UI. The next
//! modules (proxy, stats) slot in the same way.

pub mod auth;
pub mod error;
pub mod extractor;
pub mod health;
pub mod keys;
mod openapi;
pub mod pools;
pub mod proxy;
pub mod stats;
pub mod types;
pub mod users;

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request};
use axum::middleware::{self, Next};
use axum::response::Response;
use tower_http::request_id::{
    MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};
use tower_http::trace::TraceLayer;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;
use utoipa_swagger_ui::SwaggerUi;

use crate::auth::{LoginThrottle, TokenKeys};
use crate::clock::SharedClock;
use crate::config::Config;
use crate::db::Db;
use crate::engines::Engines;
use crate::vault::Vault;

/// Shared state of every handler. Cheap to clone. Later issues add fields here (e.g. the registry
/// of live pool engines for the proxy).
#[derive(Clone)]
pub struct AppState {
    /// Configuration.
    pub config: Arc<Config>,
    /// Database.
    pub db: Db,
    /// Key vault.
    pub vault: Arc<Vault>,
    /// Access-token keys.
    pub tokens: Arc<TokenKeys>,
    /// Login throttling.
    pub throttle: Arc<LoginThrottle>,
    /// Time source.
    pub clock: SharedClock,
    /// An argon2 hash verified for unknown usernames, so timing does not reveal which exist.
    pub dummy_hash: Arc<str>,
    /// HTTP client for key verification.
    pub http: reqwest::Client,
    /// Live pool engines (the proxy) and the statistics collector.
    pub engines: Arc<Engines>,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState").finish_non_exhaustive()
    }
}

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "apipool-server",
        description = "Keeps a team's API keys encrypted, shares them in pools. Speaks the apipool-ng protocol."
    ),
    modifiers(&BearerAuth),
    tags(
        (name = "auth", description = "Login, tokens, registration"),
        (name = "users", description = "Administration of users"),
        (name = "keys", description = "API keys (stored encrypted)"),
        (name = "pools", description = "Pools of keys with a shared configuration"),
        (name = "proxy", description = "Calls through a pool: rotation, limits, cooldowns, retries"),
        (name = "stats", description = "Usage statistics of proxied and reported calls"),
        (name = "health", description = "Liveness and readiness"),
    )
)]
struct ApiDoc;

/// The OpenAPI document and the API routes (generated from the handlers' annotations).
pub fn api() -> (Router<AppState>, utoipa::openapi::OpenApi) {
    let (router, mut doc) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .nest(
            "/api/v1",
            OpenApiRouter::new()
                .merge(auth::router())
                .merge(users::router())
                .merge(keys::router())
                .merge(pools::router())
                .merge(proxy::router())
                .merge(stats::router())
                .merge(health::api_router()),
        )
        .merge(health::root_router())
        .split_for_parts();
    openapi::complete(&mut doc);
    (router, doc)
}

/// The whole application.
pub fn app(state: AppState) -> Router {
    let (api, openapi) = api();
    let prometheus = crate::telemetry::prometheus();
    Router::new()
        .merge(api)
        .merge(crate::dashboard::router(&state))
        .route(
            "/metrics",
            axum::routing::get(move || {
                let p = prometheus.clone();
                async move { p.render() }
            }),
        )
        .merge(SwaggerUi::new("/docs").url("/api/v1/openapi.json", openapi))
        .route_layer(middleware::from_fn(track_metrics))
        .fallback(error::not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(DefaultBodyLimit::max(2 * 1024 * 1024))
        .layer(TraceLayer::new_for_http().make_span_with(|req: &Request| {
            let request_id = req
                .headers()
                .get("x-request-id")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-");
            // Path only: query strings are not logged.
            tracing::info_span!(
                "request",
                method = %req.method(),
                path = %req.uri().path(),
                request_id = %request_id,
            )
        }))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(SetRequestIdLayer::x_request_id(FastRequestId))
        .with_state(state)
}

/// Request ids: random version-4 UUIDs drawn from the thread's user-space generator (tower-http's
/// `MakeRequestUuid` asks the kernel for 16 random bytes, one system call per request).
#[derive(Debug, Clone, Copy, Default)]
struct FastRequestId;

impl MakeRequestId for FastRequestId {
    fn make_request_id<B>(&mut self, _request: &http::Request<B>) -> Option<RequestId> {
        let id = uuid::Builder::from_random_bytes(rand::random()).into_uuid();
        let mut buf = uuid::Uuid::encode_buffer();
        let text = id.hyphenated().encode_lower(&mut buf);
        http::HeaderValue::from_str(text).ok().map(RequestId::new)
    }
}

/// The method as a metrics label, without allocating for the usual verbs.
fn method_label(m: &http::Method) -> metrics::SharedString {
    match *m {
        http::Method::GET => "GET".into(),
        http::Method::POST => "POST".into(),
        http::Method::PUT => "PUT".into(),
        http::Method::PATCH => "PATCH".into(),
        http::Method::DELETE => "DELETE".into(),
        http::Method::HEAD => "HEAD".into(),
        http::Method::OPTIONS => "OPTIONS".into(),
        _ => m.as_str().to_owned().into(),
    }
}

/// Counts requests and records latency by matched route (never the raw path) and status.
async fn track_metrics(req: Request, next: Next) -> Response {
    let start = Instant::now();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = method_label(req.method());
    let resp = next.run(req).await;
    let labels = [
        ("method", method),
        ("route", route.into()),
        ("status", resp.status().as_u16().to_string().into()),
    ];
    metrics::counter!("http_requests_total", &labels).increment(1);
    metrics::histogram!("http_request_duration_seconds", &labels)
        .record(start.elapsed().as_secs_f64());
    resp
}
