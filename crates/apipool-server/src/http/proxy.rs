//! `/proxy/{pool}/...`: calls through a pool's live engine.
//!
//! * `POST /proxy/{pool}/invoke` and `/call`: the apipool-ng SDK's `dummyclient` calls for the
//!   `generic` client type ([`crate::proxy::invoke`]); the answer is wrapped as `httpx.Response`.
//! * `GET /proxy/{pool}/status`: key counts and each key's health.
//! * any method on `/proxy/{pool}/http/{path}`: a transparent reverse proxy to the pool's upstream.
//!
//! Every call goes through the pool's engine: rotation, per-key limits, cooldown on 429 +
//! Retry-After, bans, retries on another key, `concurrency` and `timeout` from the pool config. A
//! request waits for a free key up to the pool's wait budget; past it the answer is 429 with
//! `Retry-After` (503 when the pool has no usable key at all).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use apipool::http::HttpClassifier;
use apipool::{CallError, Error as PoolError, KeyClient, KeyState, Outcome};
use axum::Json;
use axum::body::Body;
use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use hyper::body::{Body as _, Incoming};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use utoipa::{OpenApi, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::error::{ApiError, ErrorBody};
use super::extractor::{AppJson, AppPath};
use crate::engines::{LivePool, PoolView, ServerKey, with_label};
use crate::proxy::headers::{forward_request_headers, forward_response_headers};
use crate::proxy::invoke::{HttpCall, InvokeRequest, label, wrap_response};
use crate::proxy::target::{AuthPlacement, RelativeTarget};
use crate::proxy::upstream::{DeadlineBody, read_limited};
use crate::proxy::{OpError, Outgoing};

/// Largest request body the transparent route buffers (it is kept to retry on another key).
pub const MAX_REQUEST_BODY: usize = 10 * 1024 * 1024;
/// Upstream answers of at most this many bytes (with a known length) are returned whole by the
/// transparent route; larger ones stream.
const BUFFER_RESPONSE_UP_TO: u64 = 64 * 1024;
/// Largest upstream answer `invoke` buffers (it is returned inside JSON).
pub const MAX_INVOKE_RESPONSE: usize = 32 * 1024 * 1024;

#[derive(OpenApi)]
#[openapi(paths(lane))]
struct HttpRouteDoc;

pub(super) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(HttpRouteDoc::openapi())
        .routes(routes!(invoke))
        .routes(routes!(call))
        .routes(routes!(proxy_status))
    // The transparent route is served before the router (`super::serve`); its OpenAPI entry
    // is here.
}

/// The transparent route without a path, and with one (the route templates of its metrics).
pub(crate) const HTTP_ROUTE: &str = "/api/v1/proxy/{pool}/http";
pub(crate) const HTTP_ROUTE_REST: &str = "/api/v1/proxy/{pool}/http/{*path}";

/// A path on the transparent route: its template and its raw `{pool}` segment. The route is
/// `/api/v1/proxy/{pool}/http`, or `/api/v1/proxy/{pool}/http/` and at least one more character
/// (the router matched the same paths; `{pool}` may be empty, it is then an unknown pool).
fn lane_parts(path: &str) -> Option<(&'static str, &str)> {
    let rest = path.strip_prefix("/api/v1/proxy/")?;
    let (pool, after) = rest.split_once('/')?;
    match after.strip_prefix("http")? {
        "" => Some((HTTP_ROUTE, pool)),
        tail if tail.len() > 1 && tail.starts_with('/') => Some((HTTP_ROUTE_REST, pool)),
        _ => None,
    }
}

/// The transparent route's template when `path` is on it.
pub(crate) fn lane_route(path: &str) -> Option<&'static str> {
    lane_parts(path).map(|(route, _)| route)
}

/// `{pool}` of a path on the transparent route, percent-decoded.
fn lane_pool(path: &str) -> Result<std::borrow::Cow<'_, str>, ApiError> {
    let segment = lane_parts(path).map_or("", |(_, pool)| pool);
    percent_encoding::percent_decode_str(segment)
        .decode_utf8()
        .map_err(|_| {
            ApiError::Unprocessable("path: Invalid URL: Invalid UTF-8 in `pool`".to_owned())
        })
}

/// The caller of a proxy route: a valid access token of an active account.
///
/// Unlike [`super::extractor::AuthUser`] the account's `is_active` flag is cached for
/// [`crate::engines::USER_CACHE_TTL`] (one second), so the proxy's hot path does not query the
/// users table on every request; disabling an account takes effect within that second.
#[derive(Debug, Clone)]
pub struct ProxyCaller {
    /// User id.
    pub user_id: Arc<str>,
}

impl ProxyCaller {
    /// The caller of a request with these headers.
    pub(crate) async fn from_headers(
        headers: &http::HeaderMap,
        state: &AppState,
    ) -> Result<Self, ApiError> {
        let value = headers.get(header::AUTHORIZATION).ok_or_else(|| {
            ApiError::Unauthorized(
                "not authenticated: send `Authorization: Bearer <access_token>`".to_owned(),
            )
        })?;
        let text = value
            .to_str()
            .map_err(|_| ApiError::Unauthorized("invalid Authorization header".to_owned()))?;
        let token = text
            .strip_prefix("Bearer ")
            .or_else(|| text.strip_prefix("bearer "))
            .ok_or_else(|| {
                ApiError::Unauthorized("expected `Authorization: Bearer <access_token>`".to_owned())
            })?;
        let token = token.trim();
        let now = state.clock.now().unix_timestamp();
        let user_id = match state.engines.verified_token(token, now) {
            Some(user) => user,
            None => {
                let claims = state
                    .tokens
                    .verify(token)
                    .map_err(|e| ApiError::Unauthorized(e.to_string()))?;
                state.engines.remember_token(token, &claims.sub, claims.exp);
                Arc::from(claims.sub)
            }
        };
        state.engines.check_user_active(&user_id).await?;
        Ok(Self { user_id })
    }
}

impl FromRequestParts<AppState> for ProxyCaller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        Self::from_headers(&parts.headers, state).await
    }
}

/// `{pool}` of the proxy routes.
#[derive(Debug, Deserialize)]
pub(crate) struct PoolParam {
    pub(crate) pool: String,
}

/// Why a proxied call did not produce an upstream answer.
#[derive(Debug)]
enum ProxyError {
    /// Bad input, unknown pool, ... (the usual error).
    Api(ApiError),
    /// No key freed up within the wait budget.
    Exhausted(Duration),
    /// No key can become free by waiting.
    NoUsableKeys,
    /// The shared key-state store (Redis) is unreachable and the pools fail closed.
    StoreUnavailable,
    /// The pool is switched off.
    Disabled(String),
    /// The upstream did not answer in time.
    Timeout(Duration),
    /// The upstream could not be reached.
    Upstream(String),
    /// The pool or key configuration does not allow the call.
    Config(String),
}

impl From<ApiError> for ProxyError {
    fn from(e: ApiError) -> Self {
        Self::Api(e)
    }
}

impl ProxyError {
    fn status(&self) -> StatusCode {
        match self {
            Self::Api(e) => e.status(),
            Self::Exhausted(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::NoUsableKeys | Self::Disabled(_) | Self::StoreUnavailable => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Self::Upstream(_) => StatusCode::BAD_GATEWAY,
            Self::Config(_) => StatusCode::UNPROCESSABLE_ENTITY,
        }
    }

    fn message(&self) -> String {
        match self {
            Self::Api(e) => e.to_string(),
            Self::Exhausted(d) => format!(
                "no key of this pool is free within its wait budget (all are at their limits or cooling); retry in {}s, raise pool_config.max_wait, or add keys",
                d.as_secs().max(1)
            ),
            Self::NoUsableKeys => {
                "no usable key: the pool has no keys, or all are disabled, archived or invalid; add, enable or restore keys".to_owned()
            }
            Self::StoreUnavailable => "the key-state store (Redis) shared by this server's replicas is unreachable, and the server fails closed (APIPOOL_REDIS_ON_UNAVAILABLE=closed) so that no key's limit is overdrawn: no call was sent upstream; retry shortly (the server reconnects by itself), or ask the operator to restore Redis".to_owned(),
            Self::Disabled(p) => format!("pool '{p}' is disabled; enable it with PUT /api/v1/pools/{p}"),
            Self::Timeout(d) => format!(
                "the upstream did not answer within the pool's timeout ({}s)",
                d.as_secs_f64()
            ),
            Self::Upstream(e) => format!("the upstream could not be reached: {e}"),
            Self::Config(e) => e.clone(),
        }
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Exhausted(d) => Some(*d),
            Self::StoreUnavailable => Some(Duration::from_secs(1)),
            _ => None,
        }
    }

    /// Plain `{"detail"}` (the transparent route).
    fn into_plain(self) -> Response {
        if let Self::Api(e) = self {
            return e.into_response();
        }
        let status = self.status();
        let retry = self.retry_after();
        let mut resp = (status, Json(json!({ "detail": self.message() }))).into_response();
        set_retry_after(&mut resp, retry);
        resp
    }
}

fn set_retry_after(resp: &mut Response, retry: Option<Duration>) {
    if let Some(d) = retry {
        let secs = d.as_secs_f64().ceil().max(1.0) as u64;
        if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
            resp.headers_mut().insert(header::RETRY_AFTER, v);
        }
    }
}

fn op_error(e: OpError) -> ProxyError {
    match e {
        OpError::Transport(t) if t.is_timeout() => ProxyError::Timeout(Duration::ZERO),
        OpError::Transport(t) => ProxyError::Upstream(t.to_string()),
        OpError::Target(t) => ProxyError::Api(ApiError::BadRequest(format!("url: {t}"))),
        other => ProxyError::Config(other.to_string()),
    }
}

/// Maps what the engine returned into an answer or a [`ProxyError`].
fn call_error(e: CallError<OpError>, view: &PoolView) -> ProxyError {
    match e {
        CallError::Pool(PoolError::PoolExhausted { retry_after, .. }) => {
            ProxyError::Exhausted(retry_after.unwrap_or(Duration::from_secs(1)))
        }
        CallError::Pool(PoolError::NoUsableKeys) => ProxyError::NoUsableKeys,
        CallError::Pool(PoolError::StoreUnavailable { .. }) => ProxyError::StoreUnavailable,
        CallError::Pool(other) => ProxyError::Api(ApiError::Internal(anyhow::anyhow!("{other}"))),
        CallError::Timeout { .. } => ProxyError::Timeout(view.timeout),
        CallError::Failed { error, .. } => match op_error(error) {
            ProxyError::Timeout(_) => ProxyError::Timeout(view.timeout),
            other => other,
        },
    }
}

fn classify_transport(e: &OpError) -> Outcome {
    match e {
        OpError::Transport(t) if t.is_timeout() => Outcome::Timeout,
        OpError::Transport(_) => Outcome::Failed,
        // Configuration problems are not the key's fault: no cooldown, ban or retry.
        _ => Outcome::NotKeyRelated,
    }
}

/// Runs `op` through the pool's engine under the pool's concurrency limit, with `label` on the
/// recorded events. Returns the result and the key of the last attempt.
async fn run<T, F, Fut>(
    pool: &LivePool,
    view: &PoolView,
    label: Arc<str>,
    classify: impl Fn(&Result<T, OpError>) -> Outcome + Send + Sync,
    mut op: F,
) -> (
    Result<T, CallError<OpError>>,
    Option<Arc<KeyClient<ServerKey>>>,
)
where
    F: FnMut(Arc<KeyClient<ServerKey>>) -> Fut,
    Fut: Future<Output = Result<T, OpError>>,
{
    let _permit = match &view.permits {
        Some(sem) => match tokio::time::timeout(view.max_wait, sem.clone().acquire_owned()).await {
            Ok(Ok(p)) => Some(p),
            _ => {
                return (
                    Err(CallError::Pool(PoolError::PoolExhausted {
                        retry_at: None,
                        retry_after: Some(Duration::from_secs(1)),
                    })),
                    None,
                );
            }
        },
        None => None,
    };
    let last = parking_lot::Mutex::new(None);
    let result = with_label(
        label,
        pool.manager().acall_with(&classify, |kc| {
            *last.lock() = Some(kc.clone());
            op(kc)
        }),
    )
    .await;
    (result, last.into_inner())
}

fn key_header(view: &PoolView) -> Option<&http::HeaderName> {
    match view.upstream.as_ref().map(|u| &u.auth) {
        Some(AuthPlacement::Header(h)) => Some(h),
        _ => None,
    }
}

/// The answer of `invoke`: the SDK reads `success`, `data` and `error`.
#[derive(Debug, Serialize, ToSchema)]
pub struct InvokeResponse {
    /// True when the upstream answered (whatever its status, except a rate limit).
    pub success: bool,
    /// `{"_type": "httpx.Response", "status_code", "headers", "data" | "text"}`.
    #[schema(value_type = Option<Object>)]
    pub data: Value,
    /// Why the call failed (`success: false`).
    pub error: Option<String>,
    /// The same as `error` (every error answer carries `detail`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// The key that made the (last) attempt.
    pub key_identifier: Option<String>,
    /// Keys available now.
    pub pool_available: usize,
    /// Keys in the pool.
    pub pool_total: usize,
}

async fn invoke_inner(
    state: &AppState,
    caller: &ProxyCaller,
    pool_ident: &str,
    body: InvokeRequest,
) -> Response {
    let pool = match state.engines.resolve(&caller.user_id, pool_ident).await {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    let view = pool.view();
    let (result, key) = invoke_call(state, &pool, &view, body).await;
    let m = pool.manager();
    let key_identifier = key.map(|k| k.identifier().to_owned());
    let (status, resp, retry) = match result {
        Ok(data) => (
            StatusCode::OK,
            InvokeResponse {
                success: true,
                data,
                error: None,
                detail: None,
                key_identifier,
                pool_available: m.available_count(),
                pool_total: m.pool_size(),
            },
            None,
        ),
        Err(ProxyError::Api(e)) => return e.into_response(),
        Err(e) => {
            let msg = e.message();
            (
                e.status(),
                InvokeResponse {
                    success: false,
                    data: Value::Null,
                    error: Some(msg.clone()),
                    detail: Some(msg),
                    key_identifier,
                    pool_available: m.available_count(),
                    pool_total: m.pool_size(),
                },
                e.retry_after(),
            )
        }
    };
    let mut r = (status, Json(resp)).into_response();
    set_retry_after(&mut r, retry);
    r
}

async fn invoke_call(
    state: &AppState,
    pool: &LivePool,
    view: &PoolView,
    body: InvokeRequest,
) -> (Result<Value, ProxyError>, Option<Arc<KeyClient<ServerKey>>>) {
    if !view.active {
        return (Err(ProxyError::Disabled(view.identifier.clone())), None);
    }
    let call = match HttpCall::from_invoke(&body, key_header(view)) {
        Ok(c) => c,
        Err(e) => return (Err(ApiError::BadRequest(e.to_string()).into()), None),
    };
    let label: Arc<str> = Arc::from(call.label());
    let out = Outgoing {
        method: call.method,
        target: call.target,
        params: call.params,
        headers: call.headers,
        body: call.body,
        key_base_first: true,
    };
    let upstream = state.engines.upstream().for_this_thread();
    let upstream = &upstream;
    let classifier = HttpClassifier::new();
    let classify = |r: &Result<(u16, http::HeaderMap, Bytes), OpError>| match r {
        Ok((s, h, _)) => classifier.classify_parts(*s, h),
        Err(e) => classify_transport(e),
    };
    let (result, key) = run(pool, view, label, classify, |kc| {
        let built = out.build(view, kc.identifier(), &kc.client().load());
        // The engine's per-call timeout covers the whole attempt (the body is read inside it).
        let deadline = Instant::now() + view.timeout;
        async move {
            let resp = upstream.send(built?, deadline).await?;
            let (head, body) = resp.into_parts();
            if body
                .size_hint()
                .exact()
                .is_some_and(|n| n > MAX_INVOKE_RESPONSE as u64)
            {
                return Err(OpError::TooLarge(MAX_INVOKE_RESPONSE));
            }
            let body = read_limited(body, MAX_INVOKE_RESPONSE, deadline)
                .await?
                .ok_or(OpError::TooLarge(MAX_INVOKE_RESPONSE))?;
            Ok((head.status.as_u16(), head.headers, body))
        }
    })
    .await;
    let mapped = match result {
        Ok((429, headers, _)) => Err(ProxyError::Exhausted(
            apipool::http::retry_delay(&headers, SystemTime::now())
                .unwrap_or(Duration::from_secs(1)),
        )),
        Ok((status, headers, body)) => Ok(wrap_response(status, &headers, &body)),
        Err(e) => Err(call_error(e, view)),
    };
    (mapped, key)
}

/// Call the pool's upstream through one of its keys (apipool-ng `dummyclient`).
///
/// `attr_path` is an HTTP verb (`["get"]`), optionally after path segments
/// (`["coins", "list", "get"]`); `args`/`kwargs` are httpx-style (`url`, `params`, `headers`,
/// `json`, `data`, `content`). The URL is a path under the key's `client_config.base_url`, else
/// the pool's `upstream.base_url`; absolute URLs, `//host` and `..` are refused (400).
#[utoipa::path(post, path = "/proxy/{pool}/invoke", tag = "proxy", request_body = InvokeRequest,
    security(("bearer" = [])), params(("pool" = String, Path, description = "Pool identifier")),
    responses((status = 200, body = InvokeResponse, description = "The upstream answered (any status but 429)"),
              (status = 400, body = ErrorBody, description = "Unsupported method or unsafe URL; nothing was sent"),
              (status = 404, body = ErrorBody), (status = 422, body = InvokeResponse, description = "No upstream configured"),
              (status = 429, body = InvokeResponse, description = "No key free within the wait budget (Retry-After)"),
              (status = 502, body = InvokeResponse), (status = 503, body = InvokeResponse, description = "No usable key"),
              (status = 504, body = InvokeResponse)))]
async fn invoke(
    State(state): State<AppState>,
    caller: ProxyCaller,
    AppPath(p): AppPath<PoolParam>,
    AppJson(body): AppJson<InvokeRequest>,
) -> Response {
    invoke_inner(&state, &caller, &p.pool, body).await
}

/// The same as `invoke` (the original server's second name for it).
#[utoipa::path(post, path = "/proxy/{pool}/call", tag = "proxy", request_body = InvokeRequest,
    security(("bearer" = [])), params(("pool" = String, Path, description = "Pool identifier")),
    responses((status = 200, body = InvokeResponse), (status = 400, body = ErrorBody),
              (status = 404, body = ErrorBody), (status = 429, body = InvokeResponse),
              (status = 503, body = InvokeResponse)))]
async fn call(
    State(state): State<AppState>,
    caller: ProxyCaller,
    AppPath(p): AppPath<PoolParam>,
    AppJson(body): AppJson<InvokeRequest>,
) -> Response {
    invoke_inner(&state, &caller, &p.pool, body).await
}

/// One key's health in the live engine.
#[derive(Debug, Serialize, ToSchema)]
pub struct KeyHealth {
    /// The key's identifier.
    pub key_identifier: String,
    /// `active`, `cooling`, `banned`, `archived` or `disabled`.
    pub state: String,
    /// Why it is cooling or archived (`rate_limited`, `quota_exhausted`, `invalid_key`, ...).
    pub reason: Option<String>,
    /// When a cooling or banned key comes back (RFC 3339).
    pub until: Option<String>,
    /// Whether the next call could use it.
    pub available: bool,
    /// Why it would be skipped now, in words.
    pub skipped_because: Option<String>,
    /// Calls in flight on it.
    pub in_flight: u32,
    /// Consecutive failures counted toward a ban.
    pub consecutive_failures: u32,
    /// Calls through it since the engine was built.
    pub calls: u64,
    /// Successful calls.
    pub successes: u64,
    /// Failed or timed-out calls.
    pub failures: u64,
    /// Rate-limited calls.
    pub rate_limited: u64,
}

/// Key counts of a live pool.
#[derive(Debug, Serialize, ToSchema)]
pub struct ProxyStatusData {
    /// Keys available now.
    pub available_keys: usize,
    /// Keys archived (by hand or by the engine, e.g. after a 401).
    pub archived_keys: usize,
    /// Keys disabled.
    pub disabled_keys: usize,
    /// Keys cooling after a rate limit.
    pub cooling_keys: usize,
    /// Keys banned after repeated failures.
    pub banned_keys: usize,
    /// Keys in the pool.
    pub total_keys: usize,
    /// Per key.
    pub keys: Vec<KeyHealth>,
}

/// `GET /proxy/{pool}/status`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ProxyStatus {
    /// True iff a key is available now.
    pub success: bool,
    /// The pool.
    pub pool_identifier: String,
    /// Whether the pool is enabled.
    pub is_active: bool,
    /// Counts and per-key health.
    pub data: ProxyStatusData,
    /// Keys available now.
    pub pool_available: usize,
    /// Keys in the pool.
    pub pool_total: usize,
    /// Set when the stored pool_config could not be applied (defaults are in force).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config_error: Option<String>,
}

fn rfc3339(t: SystemTime) -> Option<String> {
    time::OffsetDateTime::from(t)
        .format(&time::format_description::well_known::Rfc3339)
        .ok()
}

/// Whether the pool can serve a call now, with each key's health (state, reason, until).
#[utoipa::path(get, path = "/proxy/{pool}/status", tag = "proxy", security(("bearer" = [])),
    params(("pool" = String, Path, description = "Pool identifier")),
    responses((status = 200, body = ProxyStatus), (status = 404, body = ErrorBody)))]
pub(crate) async fn proxy_status(
    State(state): State<AppState>,
    caller: ProxyCaller,
    AppPath(p): AppPath<PoolParam>,
) -> Result<Json<ProxyStatus>, ApiError> {
    let pool = state.engines.resolve(&caller.user_id, &p.pool).await?;
    let view = pool.view();
    let m = pool.manager();
    let now_engine = pool.now();
    let now_wall = SystemTime::now();
    let reports = m.key_reports();
    let count = |name: &str| reports.iter().filter(|r| r.state.name() == name).count();
    let keys: Vec<KeyHealth> = reports
        .iter()
        .map(|r| {
            let (reason, until) = match r.state {
                KeyState::Cooling { until, reason } => (
                    serde_json::to_value(reason)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_owned)),
                    Some(until),
                ),
                KeyState::Banned { until } => (Some("failures".to_owned()), Some(until)),
                KeyState::Archived { reason } => (
                    serde_json::to_value(reason)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_owned)),
                    None,
                ),
                KeyState::Disabled => (Some("manual".to_owned()), None),
                KeyState::Active => (None, None),
            };
            KeyHealth {
                key_identifier: r.identifier.to_string(),
                state: r.state.name().to_owned(),
                reason,
                until: until
                    .and_then(|u| rfc3339(now_wall + u.saturating_duration_since(now_engine))),
                available: r.available,
                skipped_because: r.skipped_because.clone(),
                in_flight: r.in_flight,
                consecutive_failures: r.consecutive_failures,
                calls: r.calls,
                successes: r.successes,
                failures: r.failures,
                rate_limited: r.rate_limited,
            }
        })
        .collect();
    let available = if view.active {
        keys.iter().filter(|k| k.available).count()
    } else {
        0
    };
    Ok(Json(ProxyStatus {
        success: available > 0,
        pool_identifier: view.identifier.clone(),
        is_active: view.active,
        data: ProxyStatusData {
            available_keys: available,
            archived_keys: count("archived"),
            disabled_keys: count("disabled"),
            cooling_keys: count("cooling"),
            banned_keys: count("banned"),
            total_keys: keys.len(),
            keys,
        },
        pool_available: available,
        pool_total: m.pool_size(),
        config_error: view.config_error.clone(),
    }))
}

/// The path after `/proxy/{pool}/http`, exactly as the caller sent it (still percent-encoded).
fn raw_rest(path: &str) -> &str {
    let after = path.split_once("/proxy/").map_or("", |(_, rest)| rest);
    let after_pool = after.split_once('/').map_or("", |(_, rest)| rest);
    after_pool.strip_prefix("http").unwrap_or("")
}

/// Transparent reverse proxy: any method on `/proxy/{pool}/http/{path}` goes to the pool's
/// `upstream.base_url` + `/{path}` (with the query), the key injected where `upstream.auth` says
/// (`bearer`, `header:NAME`, `query:NAME`). Request headers pass except hop-by-hop ones, `Host`,
/// `Cookie` and the caller's `Authorization` (its apipool token); the request body (at most
/// 10 MiB) is buffered so a 429 can be retried on another key; the answer streams back.
#[utoipa::path(method(get, post, put, patch, delete, head, options), path = "/proxy/{pool}/http/{path}",
    tag = "proxy", security(("bearer" = [])),
    params(("pool" = String, Path, description = "Pool identifier"),
           ("path" = String, Path, description = "Path under the upstream's base_url (any depth)")),
    responses((status = 200, description = "The upstream's answer, whatever its status"),
              (status = 400, body = ErrorBody, description = "Unsafe path; nothing was sent"),
              (status = 404, body = ErrorBody), (status = 413, body = ErrorBody),
              (status = 422, body = ErrorBody, description = "The pool has no upstream"),
              (status = 429, body = ErrorBody), (status = 502, body = ErrorBody),
              (status = 503, body = ErrorBody), (status = 504, body = ErrorBody)))]
pub(crate) async fn lane(state: &AppState, req: http::Request<Incoming>) -> Response {
    let (parts, body) = req.into_parts();
    let caller = match ProxyCaller::from_headers(&parts.headers, state).await {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    let pool = match lane_pool(parts.uri.path()) {
        Ok(p) => p.into_owned(),
        Err(e) => return e.into_response(),
    };
    let req = Request::from_parts(parts, Body::new(body));
    match http_inner(state, &caller, &pool, req).await {
        Ok(r) => r,
        Err(e) => e.into_plain(),
    }
}

async fn http_inner(
    state: &AppState,
    caller: &ProxyCaller,
    pool_ident: &str,
    req: Request,
) -> Result<Response, ProxyError> {
    let pool = state.engines.resolve(&caller.user_id, pool_ident).await?;
    let view = pool.view();
    if !view.active {
        return Err(ProxyError::Disabled(view.identifier.clone()));
    }
    if view.upstream.is_none() {
        return Err(ProxyError::Config(OpError::NoUpstream.to_string()));
    }
    let (parts, body) = req.into_parts();
    let rest = raw_rest(parts.uri.path());
    let target_text = match parts.uri.query() {
        Some(q) => format!("{rest}?{q}"),
        None => rest.to_owned(),
    };
    let target = RelativeTarget::parse(&target_text)
        .map_err(|e| ApiError::BadRequest(format!("path: {e}")))?;
    let announced = super::error::announced_length(&parts.headers);
    if announced.is_some_and(|n| n > MAX_REQUEST_BODY as u64) {
        super::discard_body(body, announced).await;
        return Err(too_large());
    }
    let body = axum::body::to_bytes(body, MAX_REQUEST_BODY)
        .await
        .map_err(|_| too_large())?;
    let out = Outgoing {
        method: parts.method.clone(),
        target,
        params: Vec::new(),
        headers: forward_request_headers(&parts.headers, key_header(&view)),
        body: (!body.is_empty()).then_some(body),
        key_base_first: false,
    };
    let label: Arc<str> = Arc::from(label(&out.method, out.target.path()));
    let upstream = state.engines.upstream().for_this_thread();
    let upstream = &upstream;
    let classifier = HttpClassifier::new();
    let classify = |r: &Result<(http::Response<Incoming>, Instant), OpError>| match r {
        Ok((resp, _)) => classifier.classify_parts(resp.status().as_u16(), resp.headers()),
        Err(e) => classify_transport(e),
    };
    let (result, _key) = run(&pool, &view, label, classify, |kc| {
        let built = out.build(&view, kc.identifier(), &kc.client().load());
        // The engine's own per-call timeout ends when the head arrives; the answer streams
        // after it, so the attempt's deadline covers the body too.
        let deadline = Instant::now() + view.timeout;
        async move { Ok((upstream.send(built?, deadline).await?, deadline)) }
    })
    .await;
    let (resp, deadline) = result.map_err(|e| call_error(e, &view))?;
    let (head, body) = resp.into_parts();
    // Small answers of known length go back in one piece (one write, no chunked framing);
    // others stream.
    let body = match body.size_hint().exact() {
        Some(n) if n <= BUFFER_RESPONSE_UP_TO => {
            match read_limited(body, BUFFER_RESPONSE_UP_TO as usize, deadline).await {
                Ok(Some(b)) => Body::from(b),
                Ok(None) => {
                    return Err(ProxyError::Upstream(
                        "the answer could not be read: it is longer than its Content-Length"
                            .to_owned(),
                    ));
                }
                Err(e) if e.is_timeout() => return Err(ProxyError::Timeout(view.timeout)),
                Err(e) => return Err(ProxyError::Upstream(e.to_string())),
            }
        }
        _ => Body::new(DeadlineBody::new(body, deadline)),
    };
    let mut r = Response::new(body);
    *r.status_mut() = head.status;
    *r.headers_mut() = forward_response_headers(&head.headers);
    Ok(r)
}

fn too_large() -> ProxyError {
    ProxyError::Api(ApiError::PayloadTooLarge(format!(
        "request body larger than {} MiB",
        MAX_REQUEST_BODY / (1024 * 1024)
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lane_takes_the_paths_the_router_took() {
        let lane = |p| lane_route(p);
        assert_eq!(lane("/api/v1/proxy/p/http"), Some(HTTP_ROUTE));
        assert_eq!(lane("/api/v1/proxy/p/http/x"), Some(HTTP_ROUTE_REST));
        assert_eq!(lane("/api/v1/proxy/p/http/a/b?c"), Some(HTTP_ROUTE_REST));
        assert_eq!(lane("/api/v1/proxy//http/x"), Some(HTTP_ROUTE_REST));
        for other in [
            "/api/v1/proxy/p/http/",
            "/api/v1/proxy/p/httpx",
            "/api/v1/proxy/p/invoke",
            "/api/v1/proxy/p/status",
            "/api/v1/proxy/p",
            "/api/v1/pools/p/http/x",
            "/api/v2/proxy/p/http/x",
        ] {
            assert_eq!(lane(other), None, "{other}");
        }
        assert_eq!(lane_pool("/api/v1/proxy/a%20b/http/x").unwrap(), "a b");
        assert_eq!(lane_pool("/api/v1/proxy//http").unwrap(), "");
        assert!(matches!(
            lane_pool("/api/v1/proxy/%ff/http/x"),
            Err(ApiError::Unprocessable(_))
        ));
    }

    #[test]
    fn the_rest_of_the_path_is_taken_raw() {
        assert_eq!(raw_rest("/api/v1/proxy/p/http/echo/a%2Fb"), "/echo/a%2Fb");
        assert_eq!(raw_rest("/api/v1/proxy/p/http"), "");
        assert_eq!(raw_rest("/api/v1/proxy/p/http/"), "/");
        assert_eq!(raw_rest("/api/v1/proxy/my%20pool/http/../x"), "/../x");
    }
}
