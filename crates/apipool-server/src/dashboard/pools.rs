//! Pools pages: list and create; per pool: members with live health, manual reset, the config
//! editor (every PoolConfig field), usage and timeline charts, per-key success rates and latency
//! percentiles, and logs with filters.

use std::collections::HashMap;

use askama::Template;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Form, Json};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use super::forms::{FieldErrors, non_blank, query, seg, split_list};
use super::pages::{Ctx, PageError, PageResult, render_status};
use super::session::{DashUser, redirect_with};
use crate::http::AppState;
use crate::http::error::ApiError;
use crate::http::extractor::{AppJson, AppPath, AppQuery, AuthUser};
use crate::http::pools::{self as api, AddMembers, CreatePool, PoolOut, STRATEGIES, UpdatePool};
use crate::http::proxy::{KeyHealth, PoolParam, ProxyCaller, ProxyStatus, proxy_status};
use crate::http::stats::{self, LogsQuery, SuccessRateOut, TimelineQuery, UsageQuery, WindowQuery};
use crate::http::types::PageParams;

/// Call status names for the log filter.
const STATUSES: [&str; 8] = [
    "success",
    "failed",
    "reach limit",
    "timeout",
    "invalid key",
    "quota exhausted",
    "not key related",
    "cancelled",
];

/// The live engine's view of a pool (None when it cannot be built, e.g. an unusable config).
pub(crate) async fn live_status(
    state: &AppState,
    user: &AuthUser,
    pool: &str,
) -> Option<ProxyStatus> {
    let caller = ProxyCaller {
        user_id: user.id.as_str().into(),
    };
    let param = PoolParam {
        pool: pool.to_owned(),
    };
    match proxy_status(State(state.clone()), caller, AppPath(param)).await {
        Ok(s) => Some(s.0),
        Err(e) => {
            tracing::debug!(error = %e, "live pool status unavailable");
            None
        }
    }
}

/// Success rate over a window, per pool (None on error).
pub(crate) async fn rates(
    state: &AppState,
    user: &AuthUser,
    pool: &str,
    seconds: u64,
) -> Option<SuccessRateOut> {
    stats::success_rate(
        State(state.clone()),
        user.clone(),
        AppPath(pool.to_owned()),
        AppQuery(WindowQuery {
            seconds: Some(seconds),
        }),
    )
    .await
    .ok()
    .map(|j| j.0)
}

/// `85.0%` or a dash.
pub(crate) fn pct(rate: Option<f64>) -> String {
    rate.map_or_else(|| "–".to_owned(), |r| format!("{:.1}%", r * 100.0))
}

// ---- list and create ----

/// A pool row.
pub(crate) struct PoolRow {
    identifier: String,
    href: String,
    name: String,
    strategy: String,
    members: i64,
    usable: String,
    is_active: bool,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct CreateForm {
    #[serde(default)]
    identifier: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    rotation_strategy: String,
    #[serde(default)]
    base_url: String,
    #[serde(default)]
    auth: String,
    #[serde(default)]
    keys: String,
}

#[derive(Template)]
#[template(path = "pools.html")]
struct PoolsPage {
    ctx: Ctx,
    items: Vec<PoolRow>,
    total: i64,
    page: i64,
    pages: i64,
    prev_url: Option<String>,
    next_url: Option<String>,
    form: CreateForm,
    errors: FieldErrors,
    strategies: Vec<&'static str>,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct ListQuery {
    #[serde(default)]
    page: String,
}

async fn pools_page(
    state: &AppState,
    du: &DashUser,
    page: i64,
    form: CreateForm,
    errors: FieldErrors,
    status: StatusCode,
) -> PageResult {
    let size = 25;
    let res = api::list_pools(
        State(state.clone()),
        du.user.clone(),
        AppQuery(PageParams {
            page: Some(page),
            page_size: Some(size),
        }),
    )
    .await?
    .0;
    let pages = ((res.total + size - 1) / size).max(1);
    let mut items = Vec::with_capacity(res.items.len());
    for p in res.items {
        let live = live_status(state, &du.user, &p.identifier).await;
        items.push(PoolRow {
            href: format!("/pools/{}", seg(&p.identifier)),
            usable: live.map_or_else(
                || "–".to_owned(),
                |s| format!("{} / {}", s.pool_available, s.data.total_keys),
            ),
            identifier: p.identifier,
            name: p.name,
            strategy: p.rotation_strategy,
            members: p.member_count,
            is_active: p.is_active,
        });
    }
    let link = |p: i64| format!("/pools{}", query(&[("page", p.to_string())]));
    let view = PoolsPage {
        ctx: Ctx::new(du, "pools", "Pools"),
        items,
        total: res.total,
        page: res.page,
        pages,
        prev_url: (res.page > 1).then(|| link(res.page - 1)),
        next_url: (res.page < pages).then(|| link(res.page + 1)),
        form,
        errors,
        strategies: STRATEGIES.to_vec(),
    };
    Ok(render_status(status, &view))
}

/// `GET /pools`.
pub(crate) async fn list(
    State(state): State<AppState>,
    du: DashUser,
    Query(q): Query<ListQuery>,
) -> PageResult {
    let page = q.page.trim().parse().unwrap_or(1).clamp(1, 1_000_000);
    pools_page(
        &state,
        &du,
        page,
        CreateForm::default(),
        FieldErrors::new(),
        StatusCode::OK,
    )
    .await
}

fn upstream_value(base_url: &str, auth: &str) -> Option<Value> {
    non_blank(Some(base_url)).map(|u| {
        json!({ "base_url": u, "auth": non_blank(Some(auth)).unwrap_or_else(|| "bearer".to_owned()) })
    })
}

const POOL_FIELDS: [&str; 9] = [
    "identifier",
    "name",
    "description",
    "rotation_strategy",
    "client_type",
    "upstream",
    "upstream.base_url",
    "upstream.auth",
    "key_identifiers",
];

fn pool_errors(e: &ApiError) -> Option<FieldErrors> {
    let mut fe = FieldErrors::from_api(e, &POOL_FIELDS)?;
    for (from, to) in [
        ("upstream.base_url", "base_url"),
        ("upstream", "base_url"),
        ("upstream.auth", "auth"),
        ("key_identifiers", "keys"),
    ] {
        if let Some(m) = fe.get(from).map(str::to_owned) {
            fe.add(to, m);
        }
    }
    Some(fe)
}

/// `POST /pools`: create a pool.
pub(crate) async fn create(
    State(state): State<AppState>,
    du: DashUser,
    Form(f): Form<CreateForm>,
) -> PageResult {
    let keys = split_list(&f.keys);
    let body = CreatePool {
        identifier: f.identifier.trim().to_owned(),
        name: if f.name.trim().is_empty() {
            f.identifier.trim().to_owned()
        } else {
            f.name.trim().to_owned()
        },
        description: non_blank(Some(&f.description)),
        client_type: None,
        reach_limit_exception: None,
        rotation_strategy: non_blank(Some(&f.rotation_strategy)),
        pool_config: None,
        upstream: upstream_value(&f.base_url, &f.auth),
        key_identifiers: (!keys.is_empty()).then_some(keys),
    };
    match api::create_pool(State(state.clone()), du.user.clone(), AppJson(body)).await {
        Ok((_, p)) => Ok(redirect_with(
            &format!("/pools/{}", seg(&p.identifier)),
            "ok",
            &format!("Pool '{}' created.", p.identifier),
        )),
        Err(e) => {
            let Some(errors) = pool_errors(&e) else {
                return Err(e.into());
            };
            pools_page(&state, &du, 1, f, errors, StatusCode::UNPROCESSABLE_ENTITY).await
        }
    }
}

// ---- the config editor ----

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Int,
    Num,
    Bool,
    /// true / false / inherit (null).
    TriState,
    /// An integer or blank (inherit).
    OptInt,
    Json,
}

struct FieldSpec {
    name: &'static str,
    label: &'static str,
    kind: Kind,
    min: &'static str,
    max: &'static str,
    default: &'static str,
    help: &'static str,
}

const CONFIG_FIELDS: [FieldSpec; 11] = [
    FieldSpec {
        name: "concurrency",
        label: "Concurrency",
        kind: Kind::Int,
        min: "0",
        max: "1000",
        default: "0",
        help: "Calls in flight at once across the pool; 0 = unlimited.",
    },
    FieldSpec {
        name: "timeout",
        label: "Timeout (s)",
        kind: Kind::Num,
        min: "1",
        max: "600",
        default: "30",
        help: "Seconds one upstream call may take.",
    },
    FieldSpec {
        name: "rate_limit",
        label: "Rate limit",
        kind: Kind::Int,
        min: "0",
        max: "100000",
        default: "0",
        help: "Calls per key per interval; 0 = no configured limit (learned from 429s).",
    },
    FieldSpec {
        name: "rate_limit_interval",
        label: "Rate-limit interval (s)",
        kind: Kind::Num,
        min: "1",
        max: "86400",
        default: "60",
        help: "Length of the rate-limit window.",
    },
    FieldSpec {
        name: "retry_on_failure",
        label: "Retry on failure",
        kind: Kind::Bool,
        min: "",
        max: "",
        default: "false",
        help: "Retry a failed call on another key.",
    },
    FieldSpec {
        name: "max_retries",
        label: "Max retries",
        kind: Kind::Int,
        min: "0",
        max: "50",
        default: "0",
        help: "Retries per call.",
    },
    FieldSpec {
        name: "batch_retry_on_failure",
        label: "Batch: retry on failure",
        kind: Kind::TriState,
        min: "",
        max: "",
        default: "",
        help: "For batch_exec; inherit = same as “Retry on failure”.",
    },
    FieldSpec {
        name: "batch_max_retries",
        label: "Batch: max retries",
        kind: Kind::OptInt,
        min: "0",
        max: "50",
        default: "",
        help: "For batch_exec; blank = same as “Max retries”.",
    },
    FieldSpec {
        name: "ban_threshold",
        label: "Ban threshold",
        kind: Kind::Int,
        min: "1",
        max: "100",
        default: "3",
        help: "Consecutive failures before a key is banned.",
    },
    FieldSpec {
        name: "ban_duration",
        label: "Ban duration (s)",
        kind: Kind::Num,
        min: "10",
        max: "86400",
        default: "300",
        help: "How long a banned key rests.",
    },
    FieldSpec {
        name: "custom",
        label: "Custom (JSON object)",
        kind: Kind::Json,
        min: "",
        max: "",
        default: "{}",
        help: "Free-form settings handed to clients verbatim.",
    },
];

/// One field of the config editor as rendered.
pub(crate) struct ConfigField {
    name: &'static str,
    label: &'static str,
    kind: &'static str,
    min: &'static str,
    max: &'static str,
    placeholder: &'static str,
    help: &'static str,
    value: String,
    error: Option<String>,
}

fn kind_name(k: Kind) -> &'static str {
    match k {
        Kind::Int | Kind::OptInt => "int",
        Kind::Num => "num",
        Kind::Bool => "bool",
        Kind::TriState => "tristate",
        Kind::Json => "json",
    }
}

fn value_text(v: Option<&Value>, kind: Kind) -> String {
    match (v, kind) {
        (None | Some(Value::Null), _) => String::new(),
        (Some(Value::Bool(b)), _) => b.to_string(),
        (Some(Value::Number(n)), _) => n.to_string(),
        (Some(Value::String(s)), _) => s.clone(),
        (Some(other), Kind::Json) => serde_json::to_string_pretty(other).unwrap_or_default(),
        (Some(other), _) => other.to_string(),
    }
}

fn config_fields(
    cfg: &Value,
    form: Option<&HashMap<String, String>>,
    errors: &FieldErrors,
) -> Vec<ConfigField> {
    CONFIG_FIELDS
        .iter()
        .map(|s| ConfigField {
            name: s.name,
            label: s.label,
            kind: kind_name(s.kind),
            min: s.min,
            max: s.max,
            placeholder: s.default,
            help: s.help,
            value: match form {
                Some(f) => f.get(s.name).cloned().unwrap_or_default(),
                None => value_text(cfg.get(s.name), s.kind),
            },
            error: errors
                .get(&format!("pool_config.{}", s.name))
                .map(str::to_owned),
        })
        .collect()
}

/// Parses the editor's fields onto the stored object (unknown fields are kept); blank = default.
fn parse_config(
    current: &Value,
    form: &HashMap<String, String>,
    errors: &mut FieldErrors,
) -> Map<String, Value> {
    let mut obj = current.as_object().cloned().unwrap_or_default();
    for s in &CONFIG_FIELDS {
        let raw = form.get(s.name).map_or("", |v| v.trim());
        let key = format!("pool_config.{}", s.name);
        let parsed: Result<Option<Value>, String> = match s.kind {
            _ if raw.is_empty() && s.kind != Kind::Bool => Ok(None),
            Kind::Int | Kind::OptInt => raw
                .parse::<i64>()
                .map(|n| Some(Value::from(n)))
                .map_err(|_| "must be a whole number".to_owned()),
            Kind::Num => match raw.parse::<f64>() {
                Ok(n) if n.is_finite() => Ok(serde_json::Number::from_f64(n).map(Value::Number)),
                _ => Err("must be a number".to_owned()),
            },
            Kind::Bool => Ok(Some(Value::Bool(raw == "true"))),
            Kind::TriState => match raw {
                "true" => Ok(Some(Value::Bool(true))),
                "false" => Ok(Some(Value::Bool(false))),
                _ => Ok(None),
            },
            Kind::Json => serde_json::from_str::<Value>(raw)
                .map(Some)
                .map_err(|e| format!("is not valid JSON: {e}")),
        };
        match parsed {
            Ok(Some(v)) => {
                obj.insert(s.name.to_owned(), v);
            }
            Ok(None) => {
                obj.remove(s.name);
            }
            Err(m) => errors.add(&key, m),
        }
    }
    obj
}

// ---- the pool page ----

/// A member row with its live health and 24 h figures.
pub(crate) struct MemberRow {
    identifier: String,
    href: String,
    seg: String,
    alias: String,
    priority: i64,
    weight: i64,
    is_active: bool,
    state: String,
    reason: String,
    until: Option<String>,
    available: bool,
    skipped_because: String,
    calls: u64,
    success_rate: String,
    p50: String,
    p95: String,
    p99: String,
}

/// A log line.
pub(crate) struct LogRow {
    at: String,
    key: String,
    status: String,
    method: String,
    latency: String,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct DetailQuery {
    #[serde(default)]
    log_seconds: String,
    #[serde(default)]
    log_key: String,
    #[serde(default)]
    log_status: String,
    #[serde(default)]
    log_page: String,
}

/// Values of the general edit form.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct EditForm {
    #[serde(default)]
    name: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    rotation_strategy: String,
    #[serde(default)]
    client_type: String,
    #[serde(default)]
    base_url: String,
    #[serde(default)]
    auth: String,
    is_active: Option<String>,
}

#[derive(Template)]
#[template(path = "pool.html")]
struct PoolPage {
    ctx: Ctx,
    pool: PoolOut,
    id_seg: String,
    live_ok: bool,
    config_error: Option<String>,
    usable: usize,
    total_keys: usize,
    calls_24h: u64,
    success_24h: String,
    latency_24h: String,
    members: Vec<MemberRow>,
    edit: EditForm,
    edit_errors: FieldErrors,
    config: Vec<ConfigField>,
    reach_limit_exception: String,
    config_errors: FieldErrors,
    extra_config: String,
    strategies: Vec<&'static str>,
    statuses: Vec<&'static str>,
    q: DetailQuery,
    logs: Vec<LogRow>,
    logs_total: u64,
    logs_error: Option<String>,
    logs_prev: Option<String>,
    logs_next: Option<String>,
    logs_page: u32,
    logs_pages: u64,
}

fn edit_form_of(p: &PoolOut) -> EditForm {
    EditForm {
        name: p.name.clone(),
        description: p.description.clone().unwrap_or_default(),
        rotation_strategy: p.rotation_strategy.clone(),
        client_type: p.client_type.clone(),
        base_url: p
            .upstream
            .get("base_url")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned(),
        auth: p
            .upstream
            .get("auth")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned(),
        is_active: p.is_active.then(|| "yes".to_owned()),
    }
}

fn ms(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0} ms")
    } else {
        format!("{v:.1} ms")
    }
}

/// What a re-rendered pool page keeps from a refused form.
#[derive(Default)]
struct Refused {
    edit: Option<EditForm>,
    edit_errors: FieldErrors,
    config: Option<HashMap<String, String>>,
    config_errors: FieldErrors,
}

async fn pool_page(
    state: &AppState,
    du: &DashUser,
    identifier: &str,
    q: DetailQuery,
    refused: Refused,
    status: StatusCode,
) -> PageResult {
    let pool = api::get_pool(
        State(state.clone()),
        du.user.clone(),
        AppPath(identifier.to_owned()),
    )
    .await?
    .0;
    let live = live_status(state, &du.user, &pool.identifier).await;
    let day = rates(state, &du.user, &pool.identifier, 86_400).await;
    let health: HashMap<&str, &KeyHealth> = live
        .as_ref()
        .map(|l| {
            l.data
                .keys
                .iter()
                .map(|k| (k.key_identifier.as_str(), k))
                .collect()
        })
        .unwrap_or_default();
    let per_key: HashMap<&str, &stats::KeyRate> = day
        .as_ref()
        .map(|d| {
            d.per_key
                .iter()
                .map(|k| (k.key_identifier.as_str(), k))
                .collect()
        })
        .unwrap_or_default();
    let members = pool
        .members
        .as_deref()
        .unwrap_or_default()
        .iter()
        .map(|m| {
            let h = health.get(m.key_identifier.as_str());
            let r = per_key.get(m.key_identifier.as_str());
            let lat = r.and_then(|r| r.latency.as_ref());
            let state_name = match h {
                Some(h) => h.state.clone(),
                None if m.is_archived => "archived".to_owned(),
                None if !m.is_active => "disabled".to_owned(),
                None => "unknown".to_owned(),
            };
            MemberRow {
                href: format!("/keys/{}", seg(&m.key_identifier)),
                seg: seg(&m.key_identifier),
                identifier: m.key_identifier.clone(),
                alias: m.alias.clone().unwrap_or_default(),
                priority: m.priority,
                weight: m.weight,
                is_active: m.is_active,
                state: state_name,
                reason: h.and_then(|h| h.reason.clone()).unwrap_or_default(),
                until: h.and_then(|h| h.until.clone()),
                available: h.is_some_and(|h| h.available),
                skipped_because: h
                    .and_then(|h| h.skipped_because.clone())
                    .unwrap_or_default(),
                calls: r.map_or(0, |r| r.counts.total),
                success_rate: pct(r.and_then(|r| r.counts.success_rate)),
                p50: lat.map_or_else(|| "–".to_owned(), |l| ms(l.p50_ms)),
                p95: lat.map_or_else(|| "–".to_owned(), |l| ms(l.p95_ms)),
                p99: lat.map_or_else(|| "–".to_owned(), |l| ms(l.p99_ms)),
            }
        })
        .collect();

    // Logs with filters.
    let log_page: u32 = q.log_page.trim().parse().unwrap_or(1).clamp(1, 1_000_000);
    let log_seconds: u64 = q.log_seconds.trim().parse().unwrap_or(3600);
    let page_size = 25u32;
    let logs = stats::logs(
        State(state.clone()),
        du.user.clone(),
        AppPath(pool.identifier.clone()),
        AppQuery(LogsQuery {
            seconds: Some(log_seconds),
            key_identifier: non_blank(Some(&q.log_key)),
            status: non_blank(Some(&q.log_status)),
            method: None,
            page: Some(log_page),
            page_size: Some(page_size),
        }),
    )
    .await;
    let (log_rows, logs_total, logs_error) = match logs {
        Ok(l) => (
            l.0.items
                .into_iter()
                .map(|i| LogRow {
                    at: i.finished_at,
                    key: i.key_identifier,
                    status: i.status,
                    method: i.method.unwrap_or_default(),
                    latency: ms(i.latency_ms),
                })
                .collect(),
            l.0.total,
            None,
        ),
        Err(e @ (ApiError::Unprocessable(_) | ApiError::BadRequest(_))) => {
            (Vec::new(), 0, Some(e.to_string()))
        }
        Err(e) => return Err(e.into()),
    };
    let logs_pages = logs_total.div_ceil(u64::from(page_size)).max(1);
    let base = format!("/pools/{}", seg(&pool.identifier));
    let log_link = |p: u32| {
        format!(
            "{base}{}#logs",
            query(&[
                ("log_seconds", q.log_seconds.clone()),
                ("log_key", q.log_key.clone()),
                ("log_status", q.log_status.clone()),
                ("log_page", p.to_string()),
            ])
        )
    };

    let known: Vec<&str> = CONFIG_FIELDS.iter().map(|s| s.name).collect();
    let extra: Map<String, Value> = pool
        .pool_config
        .as_object()
        .map(|o| {
            o.iter()
                .filter(|(k, _)| !known.contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        })
        .unwrap_or_default();
    let rle = match &refused.config {
        Some(f) => f.get("reach_limit_exception").cloned().unwrap_or_default(),
        None => pool.reach_limit_exception.clone().unwrap_or_default(),
    };
    let view = PoolPage {
        ctx: Ctx::new(du, "pools", format!("Pool {}", pool.identifier)),
        id_seg: seg(&pool.identifier),
        live_ok: live.is_some(),
        config_error: live.as_ref().and_then(|l| l.config_error.clone()),
        usable: live.as_ref().map_or(0, |l| l.pool_available),
        total_keys: live.as_ref().map_or(0, |l| l.data.total_keys),
        calls_24h: day.as_ref().map_or(0, |d| d.counts.total),
        success_24h: pct(day.as_ref().and_then(|d| d.counts.success_rate)),
        latency_24h: day.as_ref().and_then(|d| d.latency.as_ref()).map_or_else(
            || "–".to_owned(),
            |l| {
                format!(
                    "p50 {} · p95 {} · p99 {}",
                    ms(l.p50_ms),
                    ms(l.p95_ms),
                    ms(l.p99_ms)
                )
            },
        ),
        members,
        edit: refused.edit.unwrap_or_else(|| edit_form_of(&pool)),
        edit_errors: refused.edit_errors,
        config: config_fields(
            &pool.pool_config,
            refused.config.as_ref(),
            &refused.config_errors,
        ),
        reach_limit_exception: rle,
        config_errors: refused.config_errors,
        extra_config: if extra.is_empty() {
            String::new()
        } else {
            serde_json::to_string_pretty(&Value::Object(extra)).unwrap_or_default()
        },
        strategies: STRATEGIES.to_vec(),
        statuses: STATUSES.to_vec(),
        logs_prev: (log_page > 1).then(|| log_link(log_page - 1)),
        logs_next: (u64::from(log_page) < logs_pages).then(|| log_link(log_page + 1)),
        logs_page: log_page,
        logs_pages,
        q,
        logs: log_rows,
        logs_total,
        logs_error,
        pool,
    };
    Ok(render_status(status, &view))
}

/// `GET /pools/{identifier}`.
pub(crate) async fn detail(
    State(state): State<AppState>,
    du: DashUser,
    Path(identifier): Path<String>,
    Query(q): Query<DetailQuery>,
) -> PageResult {
    pool_page(
        &state,
        &du,
        &identifier,
        q,
        Refused::default(),
        StatusCode::OK,
    )
    .await
}

fn pool_href(identifier: &str) -> String {
    format!("/pools/{}", seg(identifier))
}

fn update_body(v: Value) -> Result<UpdatePool, PageError> {
    serde_json::from_value(v)
        .map_err(|e| PageError(ApiError::Internal(anyhow::anyhow!("update body: {e}"))))
}

/// `POST /pools/{identifier}/edit`: name, description, strategy, upstream, enabled.
pub(crate) async fn edit(
    State(state): State<AppState>,
    du: DashUser,
    Path(identifier): Path<String>,
    Form(f): Form<EditForm>,
) -> PageResult {
    let mut body = json!({
        "name": f.name.trim(),
        "description": non_blank(Some(&f.description)),
        "upstream": upstream_value(&f.base_url, &f.auth),
        "is_active": f.is_active.is_some(),
    });
    if let Some(s) = non_blank(Some(&f.rotation_strategy)) {
        body["rotation_strategy"] = Value::String(s);
    }
    if let Some(c) = non_blank(Some(&f.client_type)) {
        body["client_type"] = Value::String(c);
    }
    match api::update_pool(
        State(state.clone()),
        du.user.clone(),
        AppPath(identifier.clone()),
        AppJson(update_body(body)?),
    )
    .await
    {
        Ok(p) => Ok(redirect_with(
            &pool_href(&p.identifier),
            "ok",
            "Pool settings saved.",
        )),
        Err(e) => {
            let Some(errors) = pool_errors(&e) else {
                return Err(e.into());
            };
            let refused = Refused {
                edit: Some(f),
                edit_errors: errors,
                ..Refused::default()
            };
            pool_page(
                &state,
                &du,
                &identifier,
                DetailQuery::default(),
                refused,
                StatusCode::UNPROCESSABLE_ENTITY,
            )
            .await
        }
    }
}

/// `POST /pools/{identifier}/config`: the PoolConfig editor. Nothing is saved unless every
/// field is valid (the API's validation decides).
pub(crate) async fn config(
    State(state): State<AppState>,
    du: DashUser,
    Path(identifier): Path<String>,
    Form(f): Form<HashMap<String, String>>,
) -> PageResult {
    let current = api::get_pool(
        State(state.clone()),
        du.user.clone(),
        AppPath(identifier.clone()),
    )
    .await?
    .0;
    let mut errors = FieldErrors::new();
    let obj = parse_config(&current.pool_config, &f, &mut errors);
    if errors.is_empty() {
        let body = json!({
            "pool_config": Value::Object(obj),
            "reach_limit_exception": non_blank(f.get("reach_limit_exception").map(String::as_str)),
        });
        match api::update_pool(
            State(state.clone()),
            du.user.clone(),
            AppPath(identifier.clone()),
            AppJson(update_body(body)?),
        )
        .await
        {
            Ok(p) => {
                return Ok(redirect_with(
                    &format!("{}#config", pool_href(&p.identifier)),
                    "ok",
                    "Configuration saved.",
                ));
            }
            Err(e) => {
                let mut fields: Vec<String> = CONFIG_FIELDS
                    .iter()
                    .map(|s| format!("pool_config.{}", s.name))
                    .collect();
                fields.push("reach_limit_exception".to_owned());
                fields.push("pool_config".to_owned());
                let names: Vec<&str> = fields.iter().map(String::as_str).collect();
                match FieldErrors::from_api(&e, &names) {
                    Some(fe) => errors = fe,
                    None => return Err(e.into()),
                }
            }
        }
    }
    let refused = Refused {
        config: Some(f),
        config_errors: errors,
        ..Refused::default()
    };
    pool_page(
        &state,
        &du,
        &identifier,
        DetailQuery::default(),
        refused,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await
}

/// `POST /pools/{identifier}/delete`.
pub(crate) async fn delete(
    State(state): State<AppState>,
    du: DashUser,
    Path(identifier): Path<String>,
) -> PageResult {
    api::delete_pool(State(state), du.user, AppPath(identifier.clone())).await?;
    Ok(redirect_with(
        "/pools",
        "ok",
        &format!("Pool '{identifier}' deleted (its keys stay)."),
    ))
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct MembersForm {
    #[serde(default)]
    keys: String,
    #[serde(default)]
    priority: String,
    #[serde(default)]
    weight: String,
}

/// `POST /pools/{identifier}/members`: add keys (or change their priority and weight).
pub(crate) async fn add_members(
    State(state): State<AppState>,
    du: DashUser,
    Path(identifier): Path<String>,
    Form(f): Form<MembersForm>,
) -> PageResult {
    let to = format!("{}#members", pool_href(&identifier));
    let (Ok(priority), Ok(weight)) = (
        non_blank(Some(&f.priority)).map_or(Ok(0), |p| p.parse::<i64>()),
        non_blank(Some(&f.weight)).map_or(Ok(1), |w| w.parse::<i64>()),
    ) else {
        return Ok(redirect_with(
            &to,
            "error",
            "Priority and weight must be whole numbers.",
        ));
    };
    let body = AddMembers {
        key_identifiers: split_list(&f.keys),
        priority,
        weight,
    };
    match api::add_members(
        State(state),
        du.user,
        AppPath(identifier.clone()),
        AppJson(body),
    )
    .await
    {
        Ok(_) => Ok(redirect_with(&to, "ok", "Members saved.")),
        Err(ApiError::Unprocessable(m)) => Ok(redirect_with(&to, "error", &m)),
        Err(e) => Err(e.into()),
    }
}

/// `POST /pools/{identifier}/members/{key}/remove`.
pub(crate) async fn remove_member(
    State(state): State<AppState>,
    du: DashUser,
    Path((identifier, key)): Path<(String, String)>,
) -> PageResult {
    api::remove_member(
        State(state),
        du.user,
        AppPath((identifier.clone(), key.clone())),
    )
    .await?;
    Ok(redirect_with(
        &format!("{}#members", pool_href(&identifier)),
        "ok",
        &format!("Key '{key}' removed from the pool (the key itself stays)."),
    ))
}

/// `POST /pools/{identifier}/members/{key}/reset`: clears a key's cooldown, ban and failure
/// count in the live engine.
pub(crate) async fn reset_key(
    State(state): State<AppState>,
    du: DashUser,
    Path((identifier, key)): Path<(String, String)>,
) -> PageResult {
    let k = crate::http::keys::get_key(State(state.clone()), du.user.clone(), AppPath(key.clone()))
        .await?
        .0;
    let pool = state.engines.resolve(&du.user.id, &identifier).await?;
    let to = format!("{}#members", pool_href(&identifier));
    match pool.manager().reset(&k.id) {
        Ok(()) => Ok(redirect_with(
            &to,
            "ok",
            &format!("Key '{key}' reset: its cooldown, ban and failure count were cleared."),
        )),
        Err(e) => Ok(redirect_with(
            &to,
            "error",
            &format!("Key '{key}' could not be reset: {e}"),
        )),
    }
}

// ---- live data for the charts ----

#[derive(Debug, Deserialize)]
pub(crate) struct LiveQuery {
    window: Option<u64>,
}

/// What the pool page's script polls.
#[derive(Debug, Serialize)]
pub(crate) struct LiveOut {
    window: u64,
    interval_ms: u64,
    now: String,
    usage: Vec<(String, u64)>,
    timeline: Vec<Point>,
    keys: Vec<KeyHealth>,
    available: usize,
    total: usize,
    calls_24h: u64,
    success_24h: String,
}

/// One timeline bucket.
#[derive(Debug, Serialize)]
pub(crate) struct Point {
    pub(crate) start: String,
    pub(crate) total: u64,
    pub(crate) success: u64,
    pub(crate) failed: u64,
}

/// Timeline points of a pool over a window (minute buckets up to 6 h, hours above).
pub(crate) async fn timeline_points(
    state: &AppState,
    user: &AuthUser,
    pool: &str,
    window: u64,
) -> Result<(u64, Vec<Point>), ApiError> {
    let (interval, interval_ms) = if window <= 6 * 3600 {
        ("minute", 60_000)
    } else {
        ("hour", 3_600_000)
    };
    let t = stats::timeline(
        State(state.clone()),
        user.clone(),
        AppPath(pool.to_owned()),
        AppQuery(TimelineQuery {
            seconds: Some(window),
            interval: Some(interval.to_owned()),
        }),
    )
    .await?
    .0;
    Ok((
        interval_ms,
        t.buckets
            .into_iter()
            .map(|b| Point {
                start: b.start,
                total: b.counts.total,
                success: b.counts.success,
                failed: b.counts.total - b.counts.success,
            })
            .collect(),
    ))
}

/// `GET /pools/{identifier}/live.json`: usage per key, timeline, live key health.
pub(crate) async fn live_json(
    State(state): State<AppState>,
    du: DashUser,
    Path(identifier): Path<String>,
    Query(q): Query<LiveQuery>,
) -> Response {
    let window = q.window.unwrap_or(3600).clamp(60, 7 * 86_400);
    let result: Result<LiveOut, ApiError> = async {
        let usage = stats::usage(
            State(state.clone()),
            du.user.clone(),
            AppPath(identifier.clone()),
            AppQuery(UsageQuery {
                seconds: Some(window),
                group_by: Some("key".to_owned()),
            }),
        )
        .await?
        .0;
        let (interval_ms, timeline) =
            timeline_points(&state, &du.user, &identifier, window).await?;
        let live = live_status(&state, &du.user, &identifier).await;
        let day = rates(&state, &du.user, &identifier, 86_400).await;
        Ok(LiveOut {
            window,
            interval_ms,
            // Statistics are stamped with the system clock; the charts end at its "now".
            now: crate::clock::format_ms(crate::clock::unix_ms(time::OffsetDateTime::now_utc())),
            usage: usage
                .items
                .into_iter()
                .map(|g| (g.group, g.count))
                .collect(),
            timeline,
            available: live.as_ref().map_or(0, |l| l.pool_available),
            total: live.as_ref().map_or(0, |l| l.data.total_keys),
            keys: live.map(|l| l.data.keys).unwrap_or_default(),
            calls_24h: day.as_ref().map_or(0, |d| d.counts.total),
            success_24h: pct(day.as_ref().and_then(|d| d.counts.success_rate)),
        })
    }
    .await;
    match result {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn config_form_keeps_unknown_fields_and_drops_blanks() {
        let current = json!({ "timeout": 10, "max_wait": 5, "rate_limits": [1] });
        let mut errors = FieldErrors::new();
        let obj = parse_config(
            &current,
            &form(&[
                ("timeout", "12.5"),
                ("rate_limit", "100"),
                ("retry_on_failure", "true"),
                ("batch_retry_on_failure", ""),
                ("custom", "{\"a\": 1}"),
            ]),
            &mut errors,
        );
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(obj["timeout"], json!(12.5));
        assert_eq!(obj["rate_limit"], json!(100));
        assert_eq!(obj["retry_on_failure"], json!(true));
        assert_eq!(obj["max_wait"], json!(5));
        assert_eq!(obj["custom"], json!({ "a": 1 }));
        assert!(!obj.contains_key("batch_retry_on_failure"));
        assert!(!obj.contains_key("concurrency"));
    }

    #[test]
    fn config_form_reports_unparsable_values_per_field() {
        let mut errors = FieldErrors::new();
        parse_config(
            &Value::Null,
            &form(&[("max_retries", "2.5"), ("timeout", "soon"), ("custom", "{")]),
            &mut errors,
        );
        assert_eq!(
            errors.get("pool_config.max_retries"),
            Some("must be a whole number")
        );
        assert_eq!(errors.get("pool_config.timeout"), Some("must be a number"));
        assert!(errors.get("pool_config.custom").is_some());
    }
}
