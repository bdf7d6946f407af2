//! The HTTP surface: keyed data endpoints and the `/__*` control endpoints.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use futures::StreamExt;
use serde::Serialize;
use serde_json::json;

use crate::config::ConfigPatch;
use crate::conn::ConnHandle;
use crate::state::{Gate, KeyState, Lookup, MockState, RateHeaders, inc};

const RETRY_AFTER_MS: HeaderName = HeaderName::from_static("retry-after-ms");
const QUOTA_RESETS_IN_MS: HeaderName = HeaderName::from_static("quota-resets-in-ms");
const RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
const RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
const RATELIMIT_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");

/// Largest request body `/echo` reads.
const ECHO_BODY_LIMIT: usize = 2 * 1024 * 1024;
/// How long a truncated answer waits after its first half before the connection drops.
const TRUNCATE_PAUSE: Duration = Duration::from_millis(50);
/// A slow body is sent in this many parts.
const SLOW_BODY_PARTS: usize = 8;

/// The mock's routes on `state`, for serving or embedding in another router.
///
/// Served by [`crate::spawn`], `reset_rate` drops the connection with a TCP reset; embedded
/// elsewhere (no [`crate::spawn`] listener), it ends the response body with an error instead.
pub fn router(state: MockState) -> Router {
    Router::new()
        .route("/price", get(price).fallback(method_not_allowed))
        .route("/echo", any(echo))
        .route("/echo/{*path}", any(echo))
        .route("/__stats", get(stats))
        .route("/__reset", post(reset))
        .route("/__config", get(get_config).post(patch_config))
        .fallback(not_found)
        .with_state(state)
}

/// The price `/price?id=ID` answers: deterministic in `id` (FNV-1a hash), between 0.01 and
/// 10,000.00, with two decimals.
pub fn price_for(id: &str) -> f64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    // A whole number of cents, so the JSON shows at most two decimals.
    let cents = u32::try_from(h % 1_000_000).unwrap_or(0) + 1;
    f64::from(cents) / 100.0
}

#[derive(Clone, Copy)]
enum Endpoint {
    Price,
    Echo,
}

async fn price(State(state): State<MockState>, req: Request) -> Response {
    keyed(&state, Endpoint::Price, req).await
}

async fn echo(State(state): State<MockState>, req: Request) -> Response {
    keyed(&state, Endpoint::Echo, req).await
}

async fn not_found(State(state): State<MockState>) -> Response {
    state.count_request();
    state.count_status(404);
    error(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such endpoint; try GET /price?id=ID, /echo/..., GET /__stats",
    )
}

async fn method_not_allowed(State(state): State<MockState>) -> Response {
    state.count_request();
    state.count_status(405);
    let mut r = error(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "/price only answers GET",
    );
    r.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static("GET"));
    r
}

async fn stats(State(state): State<MockState>) -> Response {
    Json(state.stats()).into_response()
}

async fn reset(State(state): State<MockState>) -> Response {
    state.reset();
    Json(json!({"reset": true})).into_response()
}

async fn get_config(State(state): State<MockState>) -> Response {
    Json(state.settings()).into_response()
}

async fn patch_config(State(state): State<MockState>, body: Bytes) -> Response {
    let patch: ConfigPatch = match serde_json::from_slice(&body) {
        Ok(p) => p,
        Err(e) => {
            return error(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_config",
                &format!("the body must be a JSON object of settings to change: {e}"),
            );
        }
    };
    match state.update(&patch) {
        Ok(view) => Json(view).into_response(),
        Err(e) => error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_config",
            &e.to_string(),
        ),
    }
}

/// The JSON body of every error answer.
#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    retry_after_ms: Option<u64>,
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    let body = ErrorBody {
        error: code,
        message,
        retry_after_ms: None,
    };
    (status, Json(body)).into_response()
}

/// The `api_key` and `id` query parameters, when present.
struct QueryKeys<'a> {
    api_key: Option<Cow<'a, str>>,
    id: Option<Cow<'a, str>>,
}

fn query_keys(query: Option<&str>) -> QueryKeys<'_> {
    let mut q = QueryKeys {
        api_key: None,
        id: None,
    };
    if let Some(query) = query {
        for (k, v) in form_urlencoded::parse(query.as_bytes()) {
            match &*k {
                "api_key" => q.api_key = Some(v),
                "id" => q.id = Some(v),
                _ => {}
            }
        }
    }
    q
}

/// `Authorization: Bearer <key>`, then `x-api-key`, then the `api_key` query parameter.
fn presented_key<'a>(headers: &'a HeaderMap, query_key: Option<&'a str>) -> Option<&'a str> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, rest) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
        });
    bearer
        .or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()))
        .or(query_key)
        .filter(|k| !k.is_empty())
}

/// What happens to an admitted (or failing-key) request after the gate.
struct Plan {
    key: Arc<KeyState>,
    rate: Option<RateHeaders>,
    latency: Duration,
    hang: Option<Duration>,
    error: Option<&'static str>,
    error_status: StatusCode,
    slow_body: Duration,
    slow_chunk: usize,
    truncate: bool,
}

/// Go on with a plan, answer at once, or drop the connection (`reset_rate`).
enum Decision {
    Proceed(Plan),
    Answer(Response),
    DropConnection,
}

/// Decides synchronously: auth, failing key, quota, window, then the random faults.
fn plan(state: &MockState, headers: &HeaderMap, query_key: Option<&str>) -> Decision {
    let s = state.current();
    let Some(raw) = presented_key(headers, query_key) else {
        state.count_unknown_key();
        return Decision::Answer(unauthorized(
            "no API key; send Authorization: Bearer <key>, an x-api-key header or ?api_key=<key>",
        ));
    };
    let key = match state.lookup(raw, s.accept_any_key) {
        Lookup::Known(k) => k,
        Lookup::Unknown => {
            state.count_unknown_key();
            return Decision::Answer(unauthorized(
                "unknown API key; use one of the keys the mock was started with",
            ));
        }
        Lookup::TooManyKeys => {
            state.count_unknown_key();
            return Decision::Answer(unauthorized(
                "too many distinct keys for accept_any_key; POST /__reset does not forget them, restart the mock",
            ));
        }
    };
    let now = Instant::now();
    if s.revoked_keys.contains(raw) {
        inc(&key.counters.unauthorized);
        let headers = key.peek_headers(&s, now);
        return Decision::Answer(with_rate_headers(
            unauthorized("this API key has been revoked"),
            headers,
        ));
    }
    // Drawn only for requests that will wait, so refusals do not shift a seeded sequence.
    let latency = || s.latency + state.jitter(s.latency_jitter_ms);
    let error_status =
        StatusCode::from_u16(s.error_status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if s.failing_keys.contains(raw) {
        let rate = key.peek_headers(&s, now);
        return Decision::Proceed(Plan {
            key,
            rate,
            latency: latency(),
            hang: None,
            error: Some("this API key is broken upstream (failing_keys)"),
            error_status,
            slow_body: Duration::ZERO,
            slow_chunk: 0,
            truncate: false,
        });
    }
    let (gate, rate) = key.gate(&s, now);
    match gate {
        Gate::Admitted => {}
        Gate::QuotaExhausted(wait) => {
            inc(&key.counters.quota_exhausted);
            let mut r = error(
                StatusCode::PAYMENT_REQUIRED,
                "quota_exhausted",
                "the quota of this API key is used up; use another key or wait for the period to end",
            );
            set_header(&mut r, QUOTA_RESETS_IN_MS, ceil_millis(wait));
            return Decision::Answer(with_rate_headers(r, rate));
        }
        Gate::Limited(wait) => {
            inc(&key.counters.rate_limited);
            let retry_after_ms = ceil_millis(wait);
            let body = ErrorBody {
                error: "rate_limited",
                message: "too many requests for this API key; retry after the given time",
                retry_after_ms: Some(retry_after_ms),
            };
            let mut r = (StatusCode::TOO_MANY_REQUESTS, Json(body)).into_response();
            set_header(&mut r, header::RETRY_AFTER, ceil_secs(wait));
            set_header(&mut r, RETRY_AFTER_MS, retry_after_ms);
            return Decision::Answer(with_rate_headers(r, rate));
        }
    }
    inc(&key.counters.admitted);
    // Fixed roll order keeps seeded runs repeatable (a per-key fault skips its roll).
    if s.resetting_keys.contains(raw) || state.roll(s.reset_rate) {
        inc(&state.faults().resets);
        return Decision::DropConnection;
    }
    let hang = (s.hanging_keys.contains(raw) || state.roll(s.timeout_rate)).then_some(s.hang);
    let error = if state.take_burst() {
        inc(&state.faults().burst_errors);
        Some("simulated upstream failure (error_burst)")
    } else if state.roll(s.error_rate) {
        inc(&state.faults().random_errors);
        Some("simulated upstream failure (error_rate)")
    } else {
        None
    };
    let truncate = error.is_none() && state.roll(s.truncate_rate);
    Decision::Proceed(Plan {
        key,
        rate,
        latency: latency(),
        hang,
        error,
        error_status,
        slow_body: s.slow_body,
        slow_chunk: s.slow_body_chunk,
        truncate,
    })
}

fn unauthorized(message: &str) -> Response {
    error(StatusCode::UNAUTHORIZED, "unauthorized", message)
}

fn ceil_millis(d: Duration) -> u64 {
    let ms = d.as_nanos().div_ceil(1_000_000);
    u64::try_from(ms).unwrap_or(u64::MAX)
}

fn ceil_secs(d: Duration) -> u64 {
    let s = d.as_nanos().div_ceil(1_000_000_000);
    u64::try_from(s).unwrap_or(u64::MAX)
}

fn set_header(r: &mut Response, name: HeaderName, value: impl Into<HeaderValue>) {
    r.headers_mut().insert(name, value.into());
}

fn with_rate_headers(mut r: Response, rate: Option<RateHeaders>) -> Response {
    if let Some(h) = rate {
        set_header(&mut r, RATELIMIT_LIMIT, h.limit);
        set_header(&mut r, RATELIMIT_REMAINING, h.remaining);
        let reset = format!("{:.3}", h.reset.as_secs_f64());
        if let Ok(v) = HeaderValue::from_str(&reset) {
            set_header(&mut r, RATELIMIT_RESET, v);
        }
    }
    r
}

/// Every keyed endpoint: gate, faults, latency, answer, counters.
async fn keyed(state: &MockState, endpoint: Endpoint, req: Request) -> Response {
    state.count_request();
    let (parts, body) = req.into_parts();
    let query = query_keys(parts.uri.query());
    let plan = match plan(state, &parts.headers, query.api_key.as_deref()) {
        Decision::Proceed(p) => p,
        Decision::Answer(r) => {
            state.count_status(r.status().as_u16());
            return r;
        }
        Decision::DropConnection => return drop_connection(&parts.extensions),
    };
    let key = &plan.key;
    if let Some(hang) = plan.hang {
        inc(&state.faults().timeouts);
        tokio::select! {
            () = tokio::time::sleep(hang) => {}
            () = state.shutdown_token().cancelled() => {}
        }
    }
    if !plan.latency.is_zero() {
        tokio::time::sleep(plan.latency).await;
    }
    let response = if let Some(message) = plan.error {
        inc(&key.counters.errors);
        error(plan.error_status, "upstream_error", message)
    } else {
        match endpoint {
            Endpoint::Price => price_answer(key, query.id.as_deref()),
            Endpoint::Echo => echo_answer(key, &parts, body).await,
        }
    };
    let status = response.status().as_u16();
    state.count_status(status);
    if status == 200 {
        inc(&key.counters.admitted_ok);
        if let Some(id) = &query.id {
            state.count_id(id);
        }
        if plan.truncate {
            inc(&state.faults().truncated);
            return with_rate_headers(truncated(response).await, plan.rate);
        }
        if !plan.slow_body.is_zero() {
            inc(&state.faults().slow_bodies);
            let slowed = slow(response, plan.slow_body, plan.slow_chunk).await;
            return with_rate_headers(slowed, plan.rate);
        }
    }
    with_rate_headers(response, plan.rate)
}

fn drop_connection(extensions: &axum::http::Extensions) -> Response {
    if let Some(ConnectInfo(conn)) = extensions.get::<ConnectInfo<ConnHandle>>() {
        conn.kill();
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    // Not served by our listener: fail the body so the client sees a broken response.
    let failing = futures::stream::once(async {
        Err::<Bytes, _>(std::io::Error::other("connection dropped (reset_rate)"))
    });
    Response::new(Body::from_stream(failing))
}

#[derive(Serialize)]
struct PriceBody<'a> {
    id: &'a str,
    price: f64,
    key: &'a str,
    key_index: usize,
}

fn price_answer(key: &KeyState, id: Option<&str>) -> Response {
    let Some(id) = id.filter(|id| !id.is_empty()) else {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "missing query parameter id; call /price?id=<id>",
        );
    };
    Json(PriceBody {
        id,
        price: price_for(id),
        key: &key.masked,
        key_index: key.index,
    })
    .into_response()
}

async fn echo_answer(key: &KeyState, parts: &axum::http::request::Parts, body: Body) -> Response {
    let Ok(body) = axum::body::to_bytes(body, ECHO_BODY_LIMIT).await else {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            "the echo endpoint reads at most 2 MiB of body",
        );
    };
    let mut headers: BTreeMap<String, String> = BTreeMap::new();
    for (name, value) in &parts.headers {
        let value = String::from_utf8_lossy(value.as_bytes());
        headers
            .entry(name.as_str().to_owned())
            .and_modify(|v| {
                v.push_str(", ");
                v.push_str(&value);
            })
            .or_insert_with(|| value.into_owned());
    }
    let raw_query = parts.uri.query().unwrap_or("");
    let query: BTreeMap<String, String> = form_urlencoded::parse(raw_query.as_bytes())
        .into_owned()
        .collect();
    let method: &Method = &parts.method;
    Json(json!({
        "method": method.as_str(),
        "path": parts.uri.path(),
        "query": query,
        "raw_query": raw_query,
        "headers": headers,
        "body": String::from_utf8_lossy(&body),
        "key": key.masked,
        "key_index": key.index,
    }))
    .into_response()
}

/// Re-sends a (small, buffered) JSON body in parts of `chunk` bytes (0 = in 8 parts) spread
/// evenly over `over`.
async fn slow(response: Response, over: Duration, chunk: usize) -> Response {
    let (parts, body) = response.into_parts();
    let bytes = axum::body::to_bytes(body, usize::MAX)
        .await
        .unwrap_or_default();
    let size = if chunk == 0 {
        bytes.len().div_ceil(SLOW_BODY_PARTS).max(1)
    } else {
        chunk
    };
    let count = bytes.len().div_ceil(size).max(1);
    let pause = over / u32::try_from(count).unwrap_or(u32::MAX);
    let chunks: Vec<Bytes> = (0..bytes.len())
        .step_by(size)
        .map(|start| bytes.slice(start..(start + size).min(bytes.len())))
        .collect();
    let stream = futures::stream::iter(chunks).then(move |chunk| async move {
        tokio::time::sleep(pause).await;
        Ok::<_, std::convert::Infallible>(chunk)
    });
    let mut parts = parts;
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from_stream(stream))
}

/// Sends the headers (with the full `Content-Length`) and the first half of the body, then
/// fails the body, which drops the connection: the client sees a reset mid-answer.
async fn truncated(response: Response) -> Response {
    let (mut parts, body) = response.into_parts();
    let bytes = axum::body::to_bytes(body, usize::MAX)
        .await
        .unwrap_or_default();
    parts
        .headers
        .insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
    let half = bytes.slice(..bytes.len() / 2);
    // The pause lets the headers and the first half leave before the connection is dropped.
    let stream =
        futures::stream::once(async move { Ok(half) }).chain(futures::stream::once(async {
            tokio::time::sleep(TRUNCATE_PAUSE).await;
            Err(std::io::Error::other(
                "connection dropped mid-body (truncate_rate)",
            ))
        }));
    Response::from_parts(parts, Body::from_stream(stream))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn price_is_deterministic_and_in_range() {
        assert_eq!(price_for("bitcoin"), price_for("bitcoin"));
        assert_ne!(price_for("bitcoin"), price_for("ethereum"));
        for id in ["", "a", "bitcoin", "x".repeat(1000).as_str()] {
            let p = price_for(id);
            assert!((0.01..=10_000.0).contains(&p), "{id}: {p}");
            assert_eq!((p * 100.0).round() / 100.0, p);
        }
    }

    #[test]
    fn key_is_taken_from_bearer_then_header_then_query() {
        let mut h = HeaderMap::new();
        assert_eq!(presented_key(&h, Some("q")), Some("q"));
        h.insert("x-api-key", HeaderValue::from_static("hdr"));
        assert_eq!(presented_key(&h, Some("q")), Some("hdr"));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("bearer  tok "),
        );
        assert_eq!(presented_key(&h, Some("q")), Some("tok"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(presented_key(&h, None), Some("hdr"));
        assert_eq!(presented_key(&HeaderMap::new(), Some("")), None);
    }

    #[test]
    fn retry_values_round_up() {
        assert_eq!(ceil_secs(Duration::from_millis(1)), 1);
        assert_eq!(ceil_secs(Duration::from_millis(1000)), 1);
        assert_eq!(ceil_secs(Duration::from_millis(1001)), 2);
        assert_eq!(ceil_millis(Duration::from_micros(1)), 1);
        assert_eq!(ceil_millis(Duration::from_micros(2000)), 2);
    }

    #[test]
    fn query_finds_key_and_id() {
        let q = query_keys(Some("a=1&id=btc%20usd&api_key=k1"));
        assert_eq!(q.id.as_deref(), Some("btc usd"));
        assert_eq!(q.api_key.as_deref(), Some("k1"));
        assert!(query_keys(None).id.is_none());
    }
}
