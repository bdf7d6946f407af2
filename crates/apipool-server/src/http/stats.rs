//! Statistics of proxied calls (and of calls SDKs report): `/stats/{pool}/usage`, `/timeline`,
//! `/success-rate`, `/logs`, `GET /keys/{identifier}/stats` and `POST /stats/report`.
//!
//! Events live in the `apipool_stats_*` tables of the server's database (written by the
//! library's [`apipool::stats::StatsCollector`]); each names its key by identifier (never the raw
//! key) and its pool by the pool's row id, so one user's views never include another's events.

// utoipa's `params(Type)` expansion names same-module types with a redundant path.
#![allow(unused_qualifications)]

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use apipool::stats::{Bucket, LatencyStats, Page, StatsError, StatsFilter, StatusCounts};
use apipool::{CallEvent, CallStatus};
use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::Row;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::error::{ApiError, ApiResult, ErrorBody};
use super::extractor::{AppJson, AppPath, AppQuery, AuthUser};
use crate::db::Sql;

/// Longest window a query may cover (a year).
const MAX_SECONDS: u64 = 366 * 86_400;
/// Most events in one report.
const MAX_REPORT_EVENTS: usize = 10_000;

pub(super) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(usage))
        .routes(routes!(timeline))
        .routes(routes!(success_rate))
        .routes(routes!(logs))
        .routes(routes!(key_stats))
        .routes(routes!(report))
}

fn stats_error(e: StatsError) -> ApiError {
    match e {
        StatsError::InvalidQuery(m) => ApiError::Unprocessable(m),
        other => ApiError::Internal(anyhow::anyhow!("statistics query failed: {other}")),
    }
}

fn window(seconds: Option<u64>, default: u64) -> ApiResult<u64> {
    let s = seconds.unwrap_or(default);
    if !(1..=MAX_SECONDS).contains(&s) {
        return Err(ApiError::field(
            "seconds",
            format!("must be between 1 and {MAX_SECONDS}"),
        ));
    }
    Ok(s)
}

/// The caller's pool: (row id, identifier); 404 for unknown and foreign pools alike.
async fn own_pool(state: &AppState, user: &AuthUser, identifier: &str) -> ApiResult<String> {
    let id: Option<String> =
        sqlx::query_scalar("SELECT id FROM pools WHERE user_id = $1 AND identifier = $2")
            .bind(user.id.clone())
            .bind(identifier.to_owned())
            .fetch_optional(&state.db.pool)
            .await?;
    id.ok_or_else(|| ApiError::not_found("pool", identifier))
}

/// Makes every event recorded before this request visible to its queries.
async fn flushed(state: &AppState) -> ApiResult<&apipool::stats::StatsCollector> {
    state.engines.flush_stats().await.map_err(stats_error)?;
    Ok(state.engines.stats())
}

fn status_map(c: &StatusCounts) -> BTreeMap<String, u64> {
    c.by_status
        .iter()
        .map(|(s, n)| (s.description().to_owned(), *n))
        .collect()
}

/// Counts per status.
#[derive(Debug, Serialize, ToSchema)]
pub struct Counts {
    /// All events.
    pub total: u64,
    /// `success` events.
    pub success: u64,
    /// `failed` events.
    pub failed: u64,
    /// `reach limit` events.
    pub reach_limit: u64,
    /// success / total (null without events).
    pub success_rate: Option<f64>,
    /// Per status name ("success", "failed", "reach limit", "timeout", "invalid key", ...).
    pub by_status: BTreeMap<String, u64>,
}

impl From<&StatusCounts> for Counts {
    fn from(c: &StatusCounts) -> Self {
        Self {
            total: c.total,
            success: c.success(),
            failed: c.get(CallStatus::Failed),
            reach_limit: c.get(CallStatus::ReachLimit),
            success_rate: c.success_rate(),
            by_status: status_map(c),
        }
    }
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Serialize, ToSchema)]
pub struct Latency {
    /// Events measured.
    pub count: u64,
    /// Median.
    pub p50_ms: f64,
    /// 95th percentile.
    pub p95_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Slowest.
    pub max_ms: f64,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

impl From<&LatencyStats> for Latency {
    fn from(l: &LatencyStats) -> Self {
        Self {
            count: l.count,
            p50_ms: ms(l.p50),
            p95_ms: ms(l.p95),
            p99_ms: ms(l.p99),
            max_ms: ms(l.max),
        }
    }
}

/// `?seconds=&group_by=`
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct UsageQuery {
    /// Window in seconds (default 3600).
    pub seconds: Option<u64>,
    /// `key` (default), `status` or `hour`.
    pub group_by: Option<String>,
}

/// One group of a usage answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct UsageGroup {
    /// The key identifier, status name or hour (RFC 3339).
    pub group: String,
    /// Events in the group.
    pub count: u64,
}

/// Usage of a pool.
#[derive(Debug, Serialize, ToSchema)]
pub struct UsageOut {
    /// The pool.
    pub pool_identifier: String,
    /// The window.
    pub seconds: u64,
    /// `key`, `status` or `hour`.
    pub group_by: String,
    /// Events in the window.
    pub total: u64,
    /// Groups (keys by count, statuses by id, hours oldest first).
    pub items: Vec<UsageGroup>,
}

/// Events of a pool in the last `seconds`, grouped by key, status or hour.
#[utoipa::path(get, path = "/stats/{pool}/usage", tag = "stats", security(("bearer" = [])),
    params(("pool" = String, Path, description = "Pool identifier"), UsageQuery),
    responses((status = 200, body = UsageOut), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub(crate) async fn usage(
    State(state): State<AppState>,
    user: AuthUser,
    AppPath(pool): AppPath<String>,
    AppQuery(q): AppQuery<UsageQuery>,
) -> ApiResult<Json<UsageOut>> {
    let seconds = window(q.seconds, 3600)?;
    let group_by = q.group_by.unwrap_or_else(|| "key".to_owned());
    let id = own_pool(&state, &user, &pool).await?;
    let stats = flushed(&state).await?;
    let filter = StatsFilter::recent_seconds(seconds).pool(id);
    let (total, items) = match group_by.as_str() {
        "key" => {
            let by_key = stats.acount_by_key(filter).await.map_err(stats_error)?;
            let mut items: Vec<UsageGroup> = by_key
                .into_iter()
                .map(|(group, count)| UsageGroup { group, count })
                .collect();
            items.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.group.cmp(&b.group)));
            (items.iter().map(|g| g.count).sum(), items)
        }
        "status" => {
            let rates = stats.asuccess_rate(filter).await.map_err(stats_error)?;
            let items = rates
                .overall
                .by_status
                .iter()
                .map(|(s, n)| UsageGroup {
                    group: s.description().to_owned(),
                    count: *n,
                })
                .collect();
            (rates.overall.total, items)
        }
        "hour" => {
            let buckets = stats
                .atimeline(filter, Bucket::Hour)
                .await
                .map_err(stats_error)?;
            let items: Vec<UsageGroup> = buckets
                .iter()
                .map(|b| UsageGroup {
                    group: rfc3339(b.start),
                    count: b.counts.total,
                })
                .collect();
            (items.iter().map(|g| g.count).sum(), items)
        }
        _ => {
            return Err(ApiError::field("group_by", "must be key, status or hour"));
        }
    };
    Ok(Json(UsageOut {
        pool_identifier: pool,
        seconds,
        group_by,
        total,
        items,
    }))
}

fn rfc3339(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// `?seconds=&interval=`
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct TimelineQuery {
    /// Window in seconds (default 86400).
    pub seconds: Option<u64>,
    /// `minute`, `hour` (default) or `day`.
    pub interval: Option<String>,
}

/// One bucket of a timeline.
#[derive(Debug, Serialize, ToSchema)]
pub struct TimelineItem {
    /// Start of the bucket (RFC 3339, UTC).
    pub start: String,
    /// Counts in the bucket.
    #[serde(flatten)]
    pub counts: Counts,
}

/// A pool's timeline.
#[derive(Debug, Serialize, ToSchema)]
pub struct TimelineOut {
    /// The pool.
    pub pool_identifier: String,
    /// The window.
    pub seconds: u64,
    /// `minute`, `hour` or `day`.
    pub interval: String,
    /// Buckets, oldest first, empty ones included.
    pub buckets: Vec<TimelineItem>,
}

/// Events of a pool per minute, hour or day (UTC-aligned), per status.
#[utoipa::path(get, path = "/stats/{pool}/timeline", tag = "stats", security(("bearer" = [])),
    params(("pool" = String, Path, description = "Pool identifier"), TimelineQuery),
    responses((status = 200, body = TimelineOut), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub(crate) async fn timeline(
    State(state): State<AppState>,
    user: AuthUser,
    AppPath(pool): AppPath<String>,
    AppQuery(q): AppQuery<TimelineQuery>,
) -> ApiResult<Json<TimelineOut>> {
    let seconds = window(q.seconds, 86_400)?;
    let interval = q.interval.unwrap_or_else(|| "hour".to_owned());
    let bucket = match interval.as_str() {
        "minute" => Bucket::Minute,
        "hour" => Bucket::Hour,
        "day" => Bucket::Day,
        _ => return Err(ApiError::field("interval", "must be minute, hour or day")),
    };
    let id = own_pool(&state, &user, &pool).await?;
    let stats = flushed(&state).await?;
    let buckets = stats
        .atimeline(StatsFilter::recent_seconds(seconds).pool(id), bucket)
        .await
        .map_err(stats_error)?;
    Ok(Json(TimelineOut {
        pool_identifier: pool,
        seconds,
        interval,
        buckets: buckets
            .iter()
            .map(|b| TimelineItem {
                start: rfc3339(b.start),
                counts: Counts::from(&b.counts),
            })
            .collect(),
    }))
}

/// `?seconds=`
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct WindowQuery {
    /// Window in seconds (default 3600).
    pub seconds: Option<u64>,
}

/// One key's share of a pool's calls.
#[derive(Debug, Serialize, ToSchema)]
pub struct KeyRate {
    /// The key.
    pub key_identifier: String,
    /// Its counts.
    #[serde(flatten)]
    pub counts: Counts,
    /// Its latency.
    pub latency: Option<Latency>,
}

/// Success rates of a pool.
#[derive(Debug, Serialize, ToSchema)]
pub struct SuccessRateOut {
    /// The pool.
    pub pool_identifier: String,
    /// The window.
    pub seconds: u64,
    /// The whole pool.
    #[serde(flatten)]
    pub counts: Counts,
    /// The whole pool's latency.
    pub latency: Option<Latency>,
    /// Per key, by identifier.
    pub per_key: Vec<KeyRate>,
}

/// Success rate and latency of a pool in the last `seconds`, overall and per key.
#[utoipa::path(get, path = "/stats/{pool}/success-rate", tag = "stats", security(("bearer" = [])),
    params(("pool" = String, Path, description = "Pool identifier"), WindowQuery),
    responses((status = 200, body = SuccessRateOut), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub(crate) async fn success_rate(
    State(state): State<AppState>,
    user: AuthUser,
    AppPath(pool): AppPath<String>,
    AppQuery(q): AppQuery<WindowQuery>,
) -> ApiResult<Json<SuccessRateOut>> {
    let seconds = window(q.seconds, 3600)?;
    let id = own_pool(&state, &user, &pool).await?;
    let stats = flushed(&state).await?;
    let filter = StatsFilter::recent_seconds(seconds).pool(id);
    let rates = stats
        .asuccess_rate(filter.clone())
        .await
        .map_err(stats_error)?;
    let lat = stats
        .alatency_percentiles(filter)
        .await
        .map_err(stats_error)?;
    Ok(Json(SuccessRateOut {
        pool_identifier: pool,
        seconds,
        counts: Counts::from(&rates.overall),
        latency: lat.overall.as_ref().map(Latency::from),
        per_key: rates
            .per_key
            .iter()
            .map(|(k, c)| KeyRate {
                key_identifier: k.clone(),
                counts: Counts::from(c),
                latency: lat.per_key.get(k).map(Latency::from),
            })
            .collect(),
    }))
}

/// `?seconds=&key_identifier=&status=&method=&page=&page_size=`
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct LogsQuery {
    /// Window in seconds (default 3600).
    pub seconds: Option<u64>,
    /// Only this key.
    pub key_identifier: Option<String>,
    /// Only this status: a name ("success", "failed", "reach limit", ...) or its id (1, 5, 9, ...).
    pub status: Option<String>,
    /// Only this method label (e.g. "GET /price").
    pub method: Option<String>,
    /// Page number, from 1.
    pub page: Option<u32>,
    /// 1–100 (default 50).
    pub page_size: Option<u32>,
}

/// One logged call.
#[derive(Debug, Serialize, ToSchema)]
pub struct LogItem {
    /// Event id.
    pub id: i64,
    /// The key's identifier.
    pub key_identifier: String,
    /// Status name.
    pub status: String,
    /// Status id (1 success, 5 failed, 9 reach limit, ...).
    pub status_id: i32,
    /// e.g. "GET /price".
    pub method: Option<String>,
    /// Milliseconds from lease to outcome.
    pub latency_ms: f64,
    /// RFC 3339.
    pub finished_at: String,
}

/// A page of logged calls, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct LogsOut {
    /// The pool.
    pub pool_identifier: String,
    /// Calls.
    pub items: Vec<LogItem>,
    /// Matching calls on all pages.
    pub total: u64,
    /// Page number.
    pub page: u32,
    /// Page size.
    pub page_size: u32,
}

fn parse_status(s: &str) -> ApiResult<CallStatus> {
    CallStatus::parse(s).ok_or_else(|| {
        ApiError::field(
            "status",
            "unknown status; use success, failed, reach limit, timeout, invalid key, quota exhausted, not key related, cancelled (or their ids)",
        )
    })
}

/// Calls of a pool, newest first, filtered by key, status and method.
#[utoipa::path(get, path = "/stats/{pool}/logs", tag = "stats", security(("bearer" = [])),
    params(("pool" = String, Path, description = "Pool identifier"), LogsQuery),
    responses((status = 200, body = LogsOut), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub(crate) async fn logs(
    State(state): State<AppState>,
    user: AuthUser,
    AppPath(pool): AppPath<String>,
    AppQuery(q): AppQuery<LogsQuery>,
) -> ApiResult<Json<LogsOut>> {
    let seconds = window(q.seconds, 3600)?;
    let page = q.page.unwrap_or(1);
    let page_size = q.page_size.unwrap_or(50);
    if !(1..=1_000_000).contains(&page) {
        return Err(ApiError::field("page", "must be between 1 and 1000000"));
    }
    if !(1..=100).contains(&page_size) {
        return Err(ApiError::field("page_size", "must be between 1 and 100"));
    }
    let mut filter = StatsFilter::recent_seconds(seconds);
    if let Some(k) = q.key_identifier.filter(|k| !k.is_empty()) {
        filter = filter.key(k);
    }
    if let Some(s) = q.status.filter(|s| !s.is_empty()) {
        filter = filter.status(parse_status(&s)?);
    }
    if let Some(m) = q.method.filter(|m| !m.is_empty()) {
        filter = filter.method(m);
    }
    let id = own_pool(&state, &user, &pool).await?;
    let stats = flushed(&state).await?;
    let events = stats
        .aevents(filter.pool(id), Page::new(page, page_size))
        .await
        .map_err(stats_error)?;
    Ok(Json(LogsOut {
        pool_identifier: pool,
        items: events
            .items
            .into_iter()
            .map(|e| LogItem {
                id: e.id,
                key_identifier: e.key_identifier,
                status: e
                    .status
                    .map_or_else(|| e.status_id.to_string(), |s| s.description().to_owned()),
                status_id: e.status_id,
                method: e.method,
                latency_ms: ms(e.latency),
                finished_at: rfc3339(e.finished_at),
            })
            .collect(),
        total: events.total,
        page: events.page,
        page_size: events.page_size,
    }))
}

/// One pool's share of a key's calls.
#[derive(Debug, Serialize, ToSchema)]
pub struct KeyPoolStats {
    /// The pool.
    pub pool_identifier: String,
    /// Counts in that pool.
    #[serde(flatten)]
    pub counts: Counts,
}

/// A key's calls across the caller's pools.
#[derive(Debug, Serialize, ToSchema)]
pub struct KeyStatsOut {
    /// The key.
    pub identifier: String,
    /// The window.
    pub seconds: u64,
    /// All the caller's pools together.
    #[serde(flatten)]
    pub counts: Counts,
    /// Per pool (pools without calls of this key left out).
    pub pools: Vec<KeyPoolStats>,
}

/// Calls made with one key in the last `seconds`, over all of the caller's pools.
#[utoipa::path(get, path = "/keys/{identifier}/stats", tag = "stats", security(("bearer" = [])),
    params(("identifier" = String, Path, description = "Key identifier"), WindowQuery),
    responses((status = 200, body = KeyStatsOut), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn key_stats(
    State(state): State<AppState>,
    user: AuthUser,
    AppPath(identifier): AppPath<String>,
    AppQuery(q): AppQuery<WindowQuery>,
) -> ApiResult<Json<KeyStatsOut>> {
    let seconds = window(q.seconds, 3600)?;
    let exists: Option<String> =
        sqlx::query_scalar("SELECT id FROM api_keys WHERE user_id = $1 AND identifier = $2")
            .bind(user.id.clone())
            .bind(identifier.clone())
            .fetch_optional(&state.db.pool)
            .await?;
    if exists.is_none() {
        return Err(ApiError::not_found("key", &identifier));
    }
    let pools =
        sqlx::query("SELECT id, identifier FROM pools WHERE user_id = $1 ORDER BY identifier")
            .bind(user.id.clone())
            .fetch_all(&state.db.pool)
            .await?;
    let stats = flushed(&state).await?;
    let mut total = StatusCounts::default();
    let mut per_pool = Vec::new();
    for r in &pools {
        let id: String = r.try_get("id")?;
        let pool_ident: String = r.try_get("identifier")?;
        let rates = stats
            .asuccess_rate(
                StatsFilter::recent_seconds(seconds)
                    .pool(id)
                    .key(identifier.clone()),
            )
            .await
            .map_err(stats_error)?;
        let c = rates.overall;
        if c.total == 0 {
            continue;
        }
        total.total += c.total;
        for (s, n) in &c.by_status {
            *total.by_status.entry(*s).or_default() += n;
        }
        per_pool.push(KeyPoolStats {
            pool_identifier: pool_ident,
            counts: Counts::from(&c),
        });
    }
    Ok(Json(KeyStatsOut {
        identifier,
        seconds,
        counts: Counts::from(&total),
        pools: per_pool,
    }))
}

/// Client-side events from an SDK (`POST /stats/report`).
#[derive(Debug, Deserialize, ToSchema)]
pub struct ReportIn {
    /// The pool the calls went through.
    pub pool_identifier: String,
    /// The reporting client (free text, ≤128).
    pub client_id: Option<String>,
    /// Events: `{"key_identifier", "status", "latency" (s), "method"?, "finished_at" (epoch s or
    /// RFC 3339)?, "dedup_id"?}`. At most 10,000.
    #[schema(value_type = Vec<Object>)]
    pub events: Vec<Value>,
}

/// An event that was not stored.
#[derive(Debug, Serialize, ToSchema)]
pub struct Rejected {
    /// Position in `events`.
    pub index: usize,
    /// Why.
    pub detail: String,
}

/// `POST /stats/report` answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct ReportOut {
    /// Events stored (re-sent events with a known `dedup_id` are stored once).
    pub accepted: usize,
    /// Events refused, with the reason.
    pub rejected: Vec<Rejected>,
}

fn text_field(v: &Value, name: &str, max: usize) -> Result<Option<String>, String> {
    match v.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => {
            if s.chars().count() > max || s.chars().any(char::is_control) {
                Err(format!(
                    "{name}: at most {max} characters, no control characters"
                ))
            } else {
                Ok(Some(s.clone()))
            }
        }
        Some(_) => Err(format!("{name}: must be a string")),
    }
}

fn event_time(v: &Value, now: SystemTime) -> Result<SystemTime, String> {
    let t = match v.get("finished_at") {
        None | Some(Value::Null) => return Ok(now),
        Some(Value::Number(n)) => {
            let secs = n.as_f64().unwrap_or(-1.0);
            if !secs.is_finite() || secs < 0.0 {
                return Err("finished_at: must be epoch seconds".to_owned());
            }
            SystemTime::UNIX_EPOCH + Duration::from_secs_f64(secs)
        }
        Some(Value::String(s)) => {
            time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
                .map_err(|_| "finished_at: must be epoch seconds or RFC 3339".to_owned())?
                .into()
        }
        Some(_) => return Err("finished_at: must be epoch seconds or RFC 3339".to_owned()),
    };
    let earliest = now - Duration::from_secs(MAX_SECONDS);
    if t < earliest || t > now + Duration::from_secs(86_400) {
        return Err("finished_at: must be within the last year (and not in the future)".to_owned());
    }
    Ok(t)
}

fn parse_event(
    v: &Value,
    known_keys: &HashSet<String>,
    pool_id: &Arc<str>,
    now: SystemTime,
) -> Result<CallEvent, String> {
    if !v.is_object() {
        return Err("an event must be a JSON object".to_owned());
    }
    let key = text_field(v, "key_identifier", 128)?
        .ok_or_else(|| "key_identifier: required".to_owned())?;
    if !known_keys.contains(&key) {
        return Err(
            "key_identifier: not one of your keys (events name keys by identifier, never by raw key)"
                .to_owned(),
        );
    }
    let status = match v.get("status") {
        Some(Value::String(s)) => CallStatus::parse(s),
        Some(Value::Number(n)) => n
            .as_i64()
            .and_then(|i| i32::try_from(i).ok())
            .and_then(CallStatus::from_id),
        _ => None,
    }
    .ok_or_else(|| {
        "status: unknown (use success, failed, reach limit, ... or their ids)".to_owned()
    })?;
    let latency = match v.get("latency") {
        None | Some(Value::Null) => Duration::ZERO,
        Some(Value::Number(n)) => {
            let s = n.as_f64().unwrap_or(-1.0);
            if !(0.0..=86_400.0).contains(&s) {
                return Err("latency: seconds between 0 and 86400".to_owned());
            }
            Duration::from_secs_f64(s)
        }
        Some(_) => return Err("latency: must be a number of seconds".to_owned()),
    };
    let method = text_field(v, "method", 255)?;
    let dedup = text_field(v, "dedup_id", 128)?;
    Ok(CallEvent {
        key_identifier: Arc::from(key),
        status,
        latency,
        method: method.map(Arc::from),
        finished_at: event_time(v, now)?,
        pool: Some(pool_id.clone()),
        dedup_id: dedup.map(Arc::from),
    })
}

/// Which of `identifiers` are keys of `user`.
async fn known_keys(
    state: &AppState,
    user: &AuthUser,
    identifiers: HashSet<String>,
) -> ApiResult<HashSet<String>> {
    let mut out = HashSet::new();
    let list: Vec<String> = identifiers.into_iter().collect();
    for chunk in list.chunks(500) {
        let mut sql = Sql::for_db(
            state.db.kind,
            "SELECT identifier FROM api_keys WHERE user_id = ",
        );
        sql.bind(user.id.clone()).push(" AND identifier IN (");
        for (i, ident) in chunk.iter().enumerate() {
            if i > 0 {
                sql.push(", ");
            }
            sql.bind(ident.clone());
        }
        sql.push(")");
        for r in sql.into_query().fetch_all(&state.db.pool).await? {
            out.insert(r.try_get::<String, _>("identifier")?);
        }
    }
    Ok(out)
}

/// Store client-side call events (from SDKs); they show up in the pool's stats views.
///
/// Each event names one of the caller's keys by identifier; events that do not (or are
/// malformed) are listed in `rejected`, the others stored. A `dedup_id` makes re-sending
/// harmless.
#[utoipa::path(post, path = "/stats/report", tag = "stats", request_body = ReportIn, security(("bearer" = [])),
    responses((status = 200, body = ReportOut), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn report(
    State(state): State<AppState>,
    user: AuthUser,
    AppJson(body): AppJson<ReportIn>,
) -> ApiResult<Json<ReportOut>> {
    if body.events.len() > MAX_REPORT_EVENTS {
        return Err(ApiError::field(
            "events",
            format!("at most {MAX_REPORT_EVENTS} events per report"),
        ));
    }
    if let Some(c) = &body.client_id
        && (c.chars().count() > 128 || c.chars().any(char::is_control))
    {
        return Err(ApiError::field(
            "client_id",
            "at most 128 characters, no control characters",
        ));
    }
    let pool_id: Arc<str> = Arc::from(own_pool(&state, &user, &body.pool_identifier).await?);
    let idents: HashSet<String> = body
        .events
        .iter()
        .filter_map(|e| e.get("key_identifier").and_then(Value::as_str))
        .filter(|s| s.chars().count() <= 128)
        .map(str::to_owned)
        .collect();
    let known = known_keys(&state, &user, idents).await?;
    let now = SystemTime::now();
    let stats = state.engines.stats();
    let mut accepted = 0;
    let mut rejected = Vec::new();
    for (index, e) in body.events.iter().enumerate() {
        match parse_event(e, &known, &pool_id, now) {
            Ok(ev) => {
                stats.record(ev);
                accepted += 1;
            }
            Err(detail) => rejected.push(Rejected { index, detail }),
        }
    }
    Ok(Json(ReportOut { accepted, rejected }))
}
