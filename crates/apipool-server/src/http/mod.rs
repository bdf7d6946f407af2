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
mod serve;
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

/// The application's router: every route but the transparent proxy route.
///
/// The transparent proxy route (`/api/v1/proxy/{pool}/http/...`, the hot path) is served before
/// the router ([`serve`]) with one wrapper, [`observe`] (request id, span, metrics), instead of
/// the general stack (tower-http's request-id and trace layers, the body limit, the metrics route
/// layer, the `/api/v1` nest) and the router's own per-request work: per proxied request these
/// cost more than the proxy's own work. Both give the same request ids, spans and metrics.
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
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(middleware::from_fn(refuse_oversized))
        .layer(TraceLayer::new_for_http().make_span_with(request_span))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(SetRequestIdLayer::x_request_id(FastRequestId))
        .with_state(state)
}

pub(crate) use serve::serve;

/// The largest request body the general routes read, unless a route sets its own (key import;
/// the proxy lane has its own limit).
const BODY_LIMIT: usize = 2 * 1024 * 1024;

/// When a route refuses a body as too large (413), reads the rest of it and drops it before the
/// answer goes out ([`discard_body`]), so that a client still sending it reads the 413 instead of
/// a broken pipe. The body is lent to the route and given back when the route drops it, so every
/// route's own limit applies unchanged.
async fn refuse_oversized(req: Request, next: Next) -> Response {
    let announced = error::announced_length(req.headers());
    let (parts, body) = req.into_parts();
    let returned = Arc::new(parking_lot::Mutex::new(None));
    let lent = Lent {
        body: Some(body),
        back: returned.clone(),
    };
    let resp = next
        .run(Request::from_parts(parts, axum::body::Body::new(lent)))
        .await;
    if resp.status() == http::StatusCode::PAYLOAD_TOO_LARGE {
        let rest = returned.lock().take();
        if let Some(rest) = rest {
            discard_body(rest, announced).await;
        }
    }
    resp
}

/// A request body lent to a route: what the route leaves unread goes back to [`refuse_oversized`].
struct Lent {
    body: Option<axum::body::Body>,
    back: Arc<parking_lot::Mutex<Option<axum::body::Body>>>,
}

impl hyper::body::Body for Lent {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, axum::Error>>> {
        match self.body.as_mut() {
            Some(b) => std::pin::Pin::new(b).poll_frame(cx),
            None => std::task::Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body
            .as_ref()
            .is_none_or(hyper::body::Body::is_end_stream)
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.as_ref().map_or_else(
            || hyper::body::SizeHint::with_exact(0),
            hyper::body::Body::size_hint,
        )
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        if let Some(b) = self.body.take() {
            *self.back.lock() = Some(b);
        }
    }
}

/// Before refusing a body that is too large: reads it and drops it (at most 32 MiB, for at most
/// 5 s; not at all when it is announced larger). A server that answers and closes while the
/// client is still sending makes the client's next write fail (a broken pipe or reset) before it
/// reads the answer; reading the rest first lets it see the 413 and its `detail`. Larger or
/// slower bodies are cut off (the connection closes after the answer).
pub(crate) async fn discard_body(body: axum::body::Body, announced: Option<u64>) {
    use http_body_util::BodyExt as _;
    const LINGER_BYTES: usize = 32 * 1024 * 1024;
    if announced.is_some_and(|n| n > LINGER_BYTES as u64) {
        return;
    }
    let drain = async {
        let mut body = body;
        let mut read = 0usize;
        while let Some(Ok(frame)) = body.frame().await {
            read += frame.data_ref().map_or(0, bytes::Buf::remaining);
            if read > LINGER_BYTES {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), drain).await;
}

/// The span of one request at `$level`. Path only: query strings are not logged.
macro_rules! request_span {
    ($level:expr, $req:expr) => {{
        let req = $req;
        tracing::span!(
            $level,
            "request",
            method = %req.method(),
            path = %req.uri().path(),
            request_id = %request_id(req.headers()),
        )
    }};
}

/// The span of a request to the router: at info, so that whatever its handler logs carries
/// the method, path and request id.
fn request_span<B>(req: &http::Request<B>) -> tracing::Span {
    request_span!(tracing::Level::INFO, req)
}

/// A request's id as logged (`-` when it has none).
fn request_id(headers: &http::HeaderMap) -> &str {
    headers
        .get(X_REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
}

const X_REQUEST_ID: http::HeaderName = http::HeaderName::from_static("x-request-id");

/// A fresh request id: a random version-4 UUID.
fn new_request_id() -> Option<http::HeaderValue> {
    let id = uuid::Builder::from_random_bytes(rand::random()).into_uuid();
    let mut buf = uuid::Uuid::encode_buffer();
    let text = id.hyphenated().encode_lower(&mut buf);
    http::HeaderValue::from_str(text).ok()
}

/// Request ids: random version-4 UUIDs drawn from the thread's user-space generator (tower-http's
/// `MakeRequestUuid` asks the kernel for 16 random bytes, one system call per request).
#[derive(Debug, Clone, Copy, Default)]
struct FastRequestId;

impl MakeRequestId for FastRequestId {
    fn make_request_id<B>(&mut self, _request: &http::Request<B>) -> Option<RequestId> {
        new_request_id().map(RequestId::new)
    }
}

/// The proxy lane's one wrapper: what the general stack does for every other route, in one
/// step. Keeps the caller's `x-request-id` (else sets a fresh one) and returns it on the answer,
/// runs `handle` in a request span, records the route's metrics ([`record_metrics`], under the
/// route template `route`) and, like tower-http's trace layer, logs a 5xx answer as an error,
/// with the method, path and request id in the event itself.
///
/// The span is at debug level (tower-http's default), not info as the router's: at the
/// default log level an info span is built and formatted for every proxied request, ~9,400
/// instructions of ~83,000 (`proxy-instructions.sh` with `BENCH_LOG=info`), while nothing the
/// lane logs at info or above needs the request's context but that error.
async fn observe<B, F, Fut>(route: &'static str, mut req: http::Request<B>, handle: F) -> Response
where
    F: FnOnce(http::Request<B>) -> Fut,
    Fut: Future<Output = Response>,
{
    use tracing::Instrument as _;
    let start = Instant::now();
    let id = match req.headers().get(X_REQUEST_ID) {
        Some(v) => Some(v.clone()),
        None => new_request_id().inspect(|v| {
            req.headers_mut().insert(X_REQUEST_ID, v.clone());
        }),
    };
    let span = request_span!(tracing::Level::DEBUG, &req);
    let method = method_label(req.method());
    // Cheap (shared bytes): the error below names the path.
    let uri = req.uri().clone();
    let mut resp = handle(req).instrument(span.clone()).await;
    let latency = start.elapsed();
    if resp.status().is_server_error() {
        span.in_scope(|| {
            tracing::error!(
                status = resp.status().as_u16(),
                latency = ?latency,
                method = %method,
                path = %uri.path(),
                request_id = %id.as_ref().and_then(|v| v.to_str().ok()).unwrap_or("-"),
                "response failed"
            );
        });
    }
    if let Some(id) = id {
        resp.headers_mut().entry(X_REQUEST_ID).or_insert(id);
    }
    record_metrics(method, route.into(), resp.status(), latency);
    resp
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
    let route = matched_route(&req);
    let method = method_label(req.method());
    let resp = next.run(req).await;
    record_metrics(method, route, resp.status(), start.elapsed());
    resp
}

/// The route a request matched (its template, never the raw path) as a metrics label.
fn matched_route(req: &Request) -> metrics::SharedString {
    req.extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".into(), |p| p.as_str().to_owned().into())
}

/// Counts one request and its latency under its method, matched route and status.
///
/// The recorder's handles are kept per label set ([`metric_handles`]): asking the recorder for
/// them builds and hashes a key from the labels, which cost as much as the rest of the
/// bookkeeping of a proxied request.
fn record_metrics(
    method: metrics::SharedString,
    route: metrics::SharedString,
    status: http::StatusCode,
    latency: std::time::Duration,
) {
    let (requests, duration) = metric_handles(method, route, status);
    requests.increment(1);
    duration.record(latency.as_secs_f64());
}

/// Label sets whose handles are kept; beyond this many (unusual methods), handles are looked up
/// per request as before.
const KEPT_LABEL_SETS: usize = 4096;

type LabelSet = (metrics::SharedString, metrics::SharedString, u16);
type Handles = (metrics::Counter, metrics::Histogram);

/// The counter and histogram of one label set, from the recorder the first time.
fn metric_handles(
    method: metrics::SharedString,
    route: metrics::SharedString,
    status: http::StatusCode,
) -> Handles {
    static KEPT: std::sync::OnceLock<
        parking_lot::RwLock<
            std::collections::HashMap<LabelSet, Handles, foldhash::fast::RandomState>,
        >,
    > = std::sync::OnceLock::new();
    let kept = KEPT.get_or_init(Default::default);
    let key = (method, route, status.as_u16());
    if let Some(h) = kept.read().get(&key) {
        return h.clone();
    }
    let labels = [
        ("method", key.0.clone()),
        ("route", key.1.clone()),
        ("status", status_label(status)),
    ];
    let handles = (
        metrics::counter!("http_requests_total", &labels),
        metrics::histogram!("http_request_duration_seconds", &labels),
    );
    let mut kept = kept.write();
    if kept.len() < KEPT_LABEL_SETS {
        kept.insert(key, handles.clone());
    }
    handles
}

/// The status as a metrics label, without allocating for the usual ones.
fn status_label(s: http::StatusCode) -> metrics::SharedString {
    match s.as_u16() {
        200 => "200".into(),
        201 => "201".into(),
        204 => "204".into(),
        400 => "400".into(),
        401 => "401".into(),
        404 => "404".into(),
        429 => "429".into(),
        502 => "502".into(),
        503 => "503".into(),
        n => n.to_string().into(),
    }
}
