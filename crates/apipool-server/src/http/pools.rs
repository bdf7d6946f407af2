//! `/pools`: pools of keys with a shared configuration (stored verbatim, known fields validated).

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::Row;
use sqlx::any::AnyRow;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::error::{ApiError, ApiResult, ErrorBody, ResultExt};
use super::extractor::{AppJson, AppPath, AppQuery, AuthUser};
use super::keys::resolve_key_ids;
use super::types::{self, PageParams, Patch, parse_json};
use crate::clock::format_ms;
use crate::db::{MAX_BIND_PARAMS, Sql};

pub(super) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_pools, create_pool))
        .routes(routes!(get_pool, update_pool, delete_pool))
        .routes(routes!(list_members, add_members))
        .routes(routes!(remove_member))
        .routes(routes!(pool_status))
        .routes(routes!(pool_config))
}

/// Rotation strategies the engine understands.
pub const STRATEGIES: [&str; 4] = ["random", "round_robin", "least_used", "weighted"];

/// A member key of a pool.
#[derive(Debug, Serialize, ToSchema)]
pub struct MemberOut {
    /// The key's identifier.
    pub key_identifier: String,
    /// The key's alias.
    pub alias: Option<String>,
    /// Higher first.
    pub priority: i64,
    /// Relative share for the `weighted` strategy.
    pub weight: i64,
    /// The key's verification status.
    pub verification_status: String,
    /// The key is enabled.
    pub is_active: bool,
    /// The key is archived.
    pub is_archived: bool,
}

/// A pool.
#[derive(Debug, Serialize, ToSchema)]
pub struct PoolOut {
    /// Id.
    pub id: String,
    /// Unique per user; used in paths.
    pub identifier: String,
    /// Display name.
    pub name: String,
    /// Free text.
    pub description: Option<String>,
    /// e.g. `generic`.
    pub client_type: String,
    /// Opaque string (the SDK's exception name); never executed.
    pub reach_limit_exception: Option<String>,
    /// `random`, `round_robin`, `least_used` or `weighted`.
    pub rotation_strategy: String,
    /// PoolConfig, verbatim.
    #[schema(value_type = Option<Object>)]
    pub pool_config: Value,
    /// `{"base_url", "auth"}` for the proxy, or null.
    #[schema(value_type = Option<Object>)]
    pub upstream: Value,
    /// Enabled.
    pub is_active: bool,
    /// Number of member keys.
    pub member_count: i64,
    /// Members (only on single-pool responses).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub members: Option<Vec<MemberOut>>,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339.
    pub updated_at: String,
}

const POOL_COLS: &str = "p.id, p.identifier, p.name, p.description, p.client_type, p.reach_limit_exception, \
    p.rotation_strategy, p.pool_config, p.upstream, p.is_active, p.created_at, p.updated_at, \
    (SELECT COUNT(*) FROM pool_members m WHERE m.pool_id = p.id) AS member_count";

impl PoolOut {
    fn from_row(r: &AnyRow) -> Result<Self, sqlx::Error> {
        let cfg: Option<String> = r.try_get("pool_config")?;
        let upstream: Option<String> = r.try_get("upstream")?;
        Ok(Self {
            id: r.try_get("id")?,
            identifier: r.try_get("identifier")?,
            name: r.try_get("name")?,
            description: r.try_get("description")?,
            client_type: r.try_get("client_type")?,
            reach_limit_exception: r.try_get("reach_limit_exception")?,
            rotation_strategy: r.try_get("rotation_strategy")?,
            pool_config: parse_json(cfg.as_deref()),
            upstream: parse_json(upstream.as_deref()),
            is_active: r.try_get::<i64, _>("is_active")? != 0,
            member_count: r.try_get("member_count")?,
            members: None,
            created_at: format_ms(r.try_get("created_at")?),
            updated_at: format_ms(r.try_get("updated_at")?),
        })
    }
}

/// A new pool.
#[derive(Debug, Deserialize, ToSchema)]
pub struct CreatePool {
    /// 1–128 characters, unique per user.
    pub identifier: String,
    /// Display name (1–128).
    pub name: String,
    /// Free text (≤2000).
    pub description: Option<String>,
    /// Default `generic`.
    pub client_type: Option<String>,
    /// Opaque string (≤256), stored, never executed.
    pub reach_limit_exception: Option<String>,
    /// Default `random`.
    pub rotation_strategy: Option<String>,
    /// PoolConfig object, stored verbatim; known fields are range-checked.
    #[schema(value_type = Option<Object>)]
    pub pool_config: Option<Value>,
    /// `{"base_url": "https://...", "auth": "bearer" | "header:NAME" | "query:NAME"}`.
    #[schema(value_type = Option<Object>)]
    pub upstream: Option<Value>,
    /// Keys to add as members (priority 0, weight 1).
    pub key_identifiers: Option<Vec<String>>,
}

/// Changes to a pool (absent fields unchanged; `pool_config` is replaced whole).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdatePool {
    /// New identifier.
    pub identifier: Option<String>,
    /// Display name.
    pub name: Option<String>,
    /// Free text.
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub description: Patch<String>,
    /// Client type.
    pub client_type: Option<String>,
    /// Opaque string.
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub reach_limit_exception: Patch<String>,
    /// Strategy.
    pub rotation_strategy: Option<String>,
    /// Replaces the whole PoolConfig (`null` clears it).
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub pool_config: Patch<Value>,
    /// Replaces the upstream (`null` clears it).
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub upstream: Patch<Value>,
    /// Enable/disable.
    pub is_active: Option<bool>,
}

/// Members to add (or update).
#[derive(Debug, Deserialize, ToSchema)]
pub struct AddMembers {
    /// Keys to add; existing members get the new priority and weight.
    pub key_identifiers: Vec<String>,
    /// Higher first (default 0, −1,000,000…1,000,000).
    #[serde(default)]
    pub priority: i64,
    /// Relative share, 1…1,000,000 (default 1).
    #[serde(default = "one")]
    pub weight: i64,
}

fn one() -> i64 {
    1
}

/// A page of pools.
#[derive(Debug, Serialize, ToSchema)]
pub struct PoolPage {
    /// Pools ordered by identifier (without `members`).
    pub items: Vec<PoolOut>,
    /// Total.
    pub total: i64,
    /// Page number.
    pub page: i64,
    /// Page size.
    pub page_size: i64,
}

/// A page of members.
#[derive(Debug, Serialize, ToSchema)]
pub struct MemberPage {
    /// Members, highest priority first.
    pub items: Vec<MemberOut>,
    /// Total.
    pub total: i64,
    /// Page number.
    pub page: i64,
    /// Page size.
    pub page_size: i64,
}

/// Key counts of a pool.
#[derive(Debug, Serialize, ToSchema)]
pub struct PoolStatus {
    /// Pool.
    pub pool_identifier: String,
    /// Pool enabled.
    pub is_active: bool,
    /// Members.
    pub total_keys: i64,
    /// Active and not archived (what `/keys/raw` hands out).
    pub available_keys: i64,
    /// Archived members.
    pub archived_keys: i64,
    /// Disabled members.
    pub inactive_keys: i64,
    /// Members verified valid.
    pub valid_keys: i64,
    /// Members verified invalid.
    pub invalid_keys: i64,
    /// Members never verified.
    pub unverified_keys: i64,
}

/// What the apipool-ng SDK's `get_config` reads.
#[derive(Debug, Serialize, ToSchema)]
pub struct PoolConfigOut {
    /// Pool.
    pub pool_identifier: String,
    /// Client type.
    pub client_type: String,
    /// Opaque string or null.
    pub reach_limit_exception: Option<String>,
    /// Strategy.
    pub rotation_strategy: String,
    /// PoolConfig verbatim, or null.
    #[schema(value_type = Option<Object>)]
    pub pool_config: Value,
}

fn check_int(field: &str, v: &Value, lo: i64, hi: i64, nullable: bool) -> ApiResult<()> {
    if nullable && v.is_null() {
        return Ok(());
    }
    match v.as_i64() {
        Some(n) if (lo..=hi).contains(&n) => Ok(()),
        _ => Err(ApiError::field(
            &format!("pool_config.{field}"),
            format!("must be an integer between {lo} and {hi}"),
        )),
    }
}

fn check_num(field: &str, v: &Value, lo: f64, hi: f64) -> ApiResult<()> {
    match v.as_f64() {
        Some(n) if n >= lo && n <= hi => Ok(()),
        _ => Err(ApiError::field(
            &format!("pool_config.{field}"),
            format!("must be a number between {lo} and {hi}"),
        )),
    }
}

fn check_bool(field: &str, v: &Value, nullable: bool) -> ApiResult<()> {
    if v.is_boolean() || (nullable && v.is_null()) {
        Ok(())
    } else {
        Err(ApiError::field(
            &format!("pool_config.{field}"),
            if nullable {
                "must be true, false or null"
            } else {
                "must be true or false"
            },
        ))
    }
}

/// Validates the known PoolConfig fields (ranges from PROTOCOL.md); returns the verbatim JSON text.
pub fn validate_pool_config(v: Option<Value>) -> ApiResult<Option<String>> {
    let Some(cfg) = v.filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let Some(obj) = cfg.as_object() else {
        return Err(ApiError::field("pool_config", "must be a JSON object"));
    };
    for (k, v) in obj {
        match k.as_str() {
            "concurrency" => check_int(k, v, 0, 1000, false)?,
            "timeout" => check_num(k, v, 1.0, 600.0)?,
            "rate_limit" => check_int(k, v, 0, 100_000, false)?,
            "rate_limit_interval" => check_num(k, v, 1.0, 86_400.0)?,
            "retry_on_failure" => check_bool(k, v, false)?,
            "max_retries" => check_int(k, v, 0, 50, false)?,
            "batch_retry_on_failure" => check_bool(k, v, true)?,
            "batch_max_retries" => check_int(k, v, 0, 50, true)?,
            "ban_threshold" => check_int(k, v, 1, 100, false)?,
            "ban_duration" => check_num(k, v, 10.0, 86_400.0)?,
            "custom" if !v.is_object() => {
                return Err(ApiError::field(
                    "pool_config.custom",
                    "must be a JSON object",
                ));
            }
            _ => {}
        }
    }
    // What the engine will run with must parse too (e.g. the `rate_limits` extension).
    apipool::PoolConfig::from_json(&cfg)
        .map_err(|e| ApiError::field(&format!("pool_config.{}", e.field), e.message))?;
    let text = cfg.to_string();
    if text.len() > 64 * 1024 {
        return Err(ApiError::field(
            "pool_config",
            "must be at most 64 KiB of JSON",
        ));
    }
    Ok(Some(text))
}

/// Validates `upstream` (`base_url` http/https without credentials; `auth` bearer/header:/query:).
pub fn validate_upstream(v: Option<Value>) -> ApiResult<Option<String>> {
    let Some(up) = v.filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let Some(obj) = up.as_object() else {
        return Err(ApiError::field("upstream", "must be a JSON object"));
    };
    if let Some(extra) = obj
        .keys()
        .find(|k| !matches!(k.as_str(), "base_url" | "auth"))
    {
        return Err(ApiError::field(
            &format!("upstream.{extra}"),
            "unknown field (expected base_url and auth)",
        ));
    }
    let base = obj.get("base_url").and_then(Value::as_str).ok_or_else(|| {
        ApiError::field("upstream.base_url", "is required (an http or https URL)")
    })?;
    let url = url::Url::parse(base)
        .map_err(|e| ApiError::field("upstream.base_url", format!("is not a URL: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err(ApiError::field(
            "upstream.base_url",
            "must be an http or https URL with a host",
        ));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(ApiError::field(
            "upstream.base_url",
            "must not contain credentials",
        ));
    }
    if base.len() > 2048 {
        return Err(ApiError::field(
            "upstream.base_url",
            "must be at most 2048 characters",
        ));
    }
    let auth = match obj.get("auth") {
        None | Some(Value::Null) => "bearer".to_owned(),
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err(ApiError::field("upstream.auth", "must be a string")),
    };
    let token_ok = |n: &str| {
        !n.is_empty()
            && n.len() <= 128
            && n.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    };
    let ok = auth == "bearer"
        || auth.strip_prefix("header:").is_some_and(token_ok)
        || auth.strip_prefix("query:").is_some_and(token_ok);
    if !ok {
        return Err(ApiError::field(
            "upstream.auth",
            "must be \"bearer\", \"header:NAME\" or \"query:NAME\"",
        ));
    }
    Ok(Some(
        serde_json::json!({ "base_url": base, "auth": auth }).to_string(),
    ))
}

fn strategy(v: &str) -> ApiResult<String> {
    if STRATEGIES.contains(&v) {
        Ok(v.to_owned())
    } else {
        Err(ApiError::field(
            "rotation_strategy",
            format!("must be one of {}", STRATEGIES.join(", ")),
        ))
    }
}

fn client_type(v: &str) -> ApiResult<String> {
    if !(1..=64).contains(&v.len())
        || !v
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return Err(ApiError::field(
            "client_type",
            "must be 1 to 64 of letters, digits, '-', '_' and '.'",
        ));
    }
    Ok(v.to_owned())
}

async fn load_pool(state: &AppState, user: &AuthUser, identifier: &str) -> ApiResult<PoolOut> {
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {POOL_COLS} FROM pools p WHERE p.user_id = $1 AND p.identifier = $2"
    )))
    .bind(user.id.clone())
    .bind(identifier.to_owned())
    .fetch_optional(&state.db.pool)
    .await?
    .ok_or_else(|| ApiError::not_found("pool", identifier))?;
    Ok(PoolOut::from_row(&row)?)
}

const MEMBER_SQL: &str = "SELECT k.identifier, k.alias, k.verification_status, k.is_active, k.is_archived, \
    m.priority, m.weight FROM pool_members m JOIN api_keys k ON k.id = m.key_id WHERE m.pool_id = $1 \
    ORDER BY m.priority DESC, k.identifier";

fn member_from_row(r: &AnyRow) -> Result<MemberOut, sqlx::Error> {
    Ok(MemberOut {
        key_identifier: r.try_get("identifier")?,
        alias: r.try_get("alias")?,
        priority: r.try_get("priority")?,
        weight: r.try_get("weight")?,
        verification_status: r.try_get("verification_status")?,
        is_active: r.try_get::<i64, _>("is_active")? != 0,
        is_archived: r.try_get::<i64, _>("is_archived")? != 0,
    })
}

async fn pool_with_members(
    state: &AppState,
    user: &AuthUser,
    identifier: &str,
) -> ApiResult<PoolOut> {
    let mut pool = load_pool(state, user, identifier).await?;
    let rows = sqlx::query(MEMBER_SQL)
        .bind(pool.id.clone())
        .fetch_all(&state.db.pool)
        .await?;
    pool.members = Some(rows.iter().map(member_from_row).collect::<Result<_, _>>()?);
    Ok(pool)
}

/// Upserts members in multi-row statements.
async fn upsert_members(
    kind: crate::db::DbKind,
    conn: &mut sqlx::AnyConnection,
    pool_id: &str,
    key_ids: &[String],
    priority: i64,
    weight: i64,
    now: i64,
) -> ApiResult<()> {
    for chunk in key_ids.chunks(MAX_BIND_PARAMS / 5) {
        let mut sql = Sql::for_db(
            kind,
            "INSERT INTO pool_members (pool_id, key_id, priority, weight, created_at) VALUES ",
        );
        for (i, k) in chunk.iter().enumerate() {
            sql.push(if i == 0 { "(" } else { ", (" });
            sql.bind(pool_id.to_owned())
                .push(", ")
                .bind(k.clone())
                .push(", ")
                .bind(priority)
                .push(", ")
                .bind(weight)
                .push(", ")
                .bind(now)
                .push(")");
        }
        sql.push(
            " ON CONFLICT (pool_id, key_id) DO UPDATE SET priority = excluded.priority, weight = excluded.weight",
        );
        sql.into_query().execute(&mut *conn).await?;
    }
    Ok(())
}

/// Create a pool.
#[utoipa::path(post, path = "/pools", tag = "pools", request_body = CreatePool, security(("bearer" = [])),
    responses((status = 201, body = PoolOut), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
#[tracing::instrument(skip_all, fields(user_id = %user.id))]
pub(crate) async fn create_pool(
    State(state): State<AppState>,
    user: AuthUser,
    AppJson(body): AppJson<CreatePool>,
) -> ApiResult<(StatusCode, Json<PoolOut>)> {
    let identifier = types::identifier("identifier", &body.identifier)?;
    let name = types::text("name", &body.name, 128)?;
    let description = types::opt_text("description", body.description, 2000)?;
    let client_type = client_type(body.client_type.as_deref().unwrap_or("generic"))?;
    let rle = types::opt_text("reach_limit_exception", body.reach_limit_exception, 256)?;
    let strategy = strategy(body.rotation_strategy.as_deref().unwrap_or("random"))?;
    let cfg = validate_pool_config(body.pool_config)?;
    let upstream = validate_upstream(body.upstream)?;
    let key_ids = match &body.key_identifiers {
        Some(k) => resolve_key_ids(&state, &user, "key_identifiers", k).await?,
        None => Vec::new(),
    };
    let id = uuid::Uuid::new_v4().to_string();
    let now = state.clock.now_ms();
    let mut tx = state.db.pool.begin().await?;
    sqlx::query(
        "INSERT INTO pools (id, user_id, identifier, name, description, client_type, reach_limit_exception, \
         rotation_strategy, pool_config, upstream, is_active, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 1, $11, $11)",
    )
    .bind(id.clone())
    .bind(user.id.clone())
    .bind(identifier.clone())
    .bind(name)
    .bind(description)
    .bind(client_type)
    .bind(rle)
    .bind(strategy)
    .bind(cfg)
    .bind(upstream)
    .bind(now)
    .execute(&mut *tx)
    .await
    .on_unique(|| format!("a pool with identifier '{identifier}' already exists"))?;
    if !key_ids.is_empty() {
        upsert_members(state.db.kind, &mut tx, &id, &key_ids, 0, 1, now).await?;
    }
    tx.commit().await?;
    Ok((
        StatusCode::CREATED,
        Json(pool_with_members(&state, &user, &identifier).await?),
    ))
}

/// List pools (paged).
#[utoipa::path(get, path = "/pools", tag = "pools", params(PageParams), security(("bearer" = [])),
    responses((status = 200, body = PoolPage)))]
pub(crate) async fn list_pools(
    State(state): State<AppState>,
    user: AuthUser,
    AppQuery(paging): AppQuery<PageParams>,
) -> ApiResult<Json<PoolPage>> {
    let (page, page_size, offset) = paging.resolve()?;
    let total: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM pools WHERE user_id = $1")
        .bind(user.id.clone())
        .fetch_one(&state.db.pool)
        .await?;
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {POOL_COLS} FROM pools p WHERE p.user_id = $1 ORDER BY p.identifier LIMIT $2 OFFSET $3"
    )))
    .bind(user.id)
    .bind(page_size)
    .bind(offset)
    .fetch_all(&state.db.pool)
    .await?;
    Ok(Json(PoolPage {
        items: rows
            .iter()
            .map(PoolOut::from_row)
            .collect::<Result<_, _>>()?,
        total,
        page,
        page_size,
    }))
}

/// One pool with its members.
#[utoipa::path(get, path = "/pools/{pool}", tag = "pools", security(("bearer" = [])),
    params(("pool" = String, Path, description = "Pool identifier")),
    responses((status = 200, body = PoolOut), (status = 404, body = ErrorBody)))]
pub(crate) async fn get_pool(
    State(state): State<AppState>,
    user: AuthUser,
    AppPath(pool): AppPath<String>,
) -> ApiResult<Json<PoolOut>> {
    Ok(Json(pool_with_members(&state, &user, &pool).await?))
}

/// Update a pool (`pool_config` and `upstream` are replaced whole).
#[utoipa::path(put, path = "/pools/{pool}", tag = "pools", request_body = UpdatePool, security(("bearer" = [])),
    params(("pool" = String, Path, description = "Pool identifier")),
    responses((status = 200, body = PoolOut), (status = 404, body = ErrorBody),
              (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
#[tracing::instrument(skip_all, fields(user_id = %user.id))]
pub(crate) async fn update_pool(
    State(state): State<AppState>,
    user: AuthUser,
    AppPath(pool): AppPath<String>,
    AppJson(body): AppJson<UpdatePool>,
) -> ApiResult<Json<PoolOut>> {
    let current = load_pool(&state, &user, &pool).await?;
    let mut sql = Sql::new("UPDATE pools SET updated_at = ");
    sql.bind(state.clock.now_ms());
    let new_ident = match body.identifier {
        Some(v) => {
            let v = types::identifier("identifier", &v)?;
            sql.push(", identifier = ").bind(v.clone());
            v
        }
        None => pool.clone(),
    };
    if let Some(v) = body.name {
        sql.push(", name = ").bind(types::text("name", &v, 128)?);
    }
    if let Some(v) = body.description.into_update() {
        sql.push(", description = ")
            .bind(types::opt_text("description", v, 2000)?);
    }
    if let Some(v) = body.client_type {
        sql.push(", client_type = ").bind(client_type(&v)?);
    }
    if let Some(v) = body.reach_limit_exception.into_update() {
        sql.push(", reach_limit_exception = ").bind(types::opt_text(
            "reach_limit_exception",
            v,
            256,
        )?);
    }
    if let Some(v) = body.rotation_strategy {
        sql.push(", rotation_strategy = ").bind(strategy(&v)?);
    }
    if let Some(v) = body.pool_config.into_update() {
        sql.push(", pool_config = ").bind(validate_pool_config(v)?);
    }
    if let Some(v) = body.upstream.into_update() {
        sql.push(", upstream = ").bind(validate_upstream(v)?);
    }
    if let Some(v) = body.is_active {
        sql.push(", is_active = ").bind(v);
    }
    sql.push(" WHERE id = ").bind(current.id.clone());
    sql.into_query()
        .execute(&state.db.pool)
        .await
        .on_unique(|| format!("a pool with identifier '{new_ident}' already exists"))?;
    state.engines.pool_changed(&current.id).await;
    Ok(Json(pool_with_members(&state, &user, &new_ident).await?))
}

/// Delete a pool (its keys stay).
#[utoipa::path(delete, path = "/pools/{pool}", tag = "pools", security(("bearer" = [])),
    params(("pool" = String, Path, description = "Pool identifier")),
    responses((status = 204, description = "Deleted"), (status = 404, body = ErrorBody)))]
pub(crate) async fn delete_pool(
    State(state): State<AppState>,
    user: AuthUser,
    AppPath(pool): AppPath<String>,
) -> ApiResult<StatusCode> {
    let done = sqlx::query("DELETE FROM pools WHERE user_id = $1 AND identifier = $2")
        .bind(user.id.clone())
        .bind(pool.clone())
        .execute(&state.db.pool)
        .await?;
    if done.rows_affected() == 0 {
        return Err(ApiError::not_found("pool", &pool));
    }
    state.engines.pool_deleted(&user.id, &pool);
    Ok(StatusCode::NO_CONTENT)
}

/// Members of a pool (paged).
#[utoipa::path(get, path = "/pools/{pool}/members", tag = "pools", security(("bearer" = [])),
    params(("pool" = String, Path, description = "Pool identifier"), PageParams),
    responses((status = 200, body = MemberPage), (status = 404, body = ErrorBody)))]
async fn list_members(
    State(state): State<AppState>,
    user: AuthUser,
    AppPath(pool): AppPath<String>,
    AppQuery(paging): AppQuery<PageParams>,
) -> ApiResult<Json<MemberPage>> {
    let (page, page_size, offset) = paging.resolve()?;
    let p = load_pool(&state, &user, &pool).await?;
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "{MEMBER_SQL} LIMIT $2 OFFSET $3"
    )))
    .bind(p.id)
    .bind(page_size)
    .bind(offset)
    .fetch_all(&state.db.pool)
    .await?;
    Ok(Json(MemberPage {
        items: rows.iter().map(member_from_row).collect::<Result<_, _>>()?,
        total: p.member_count,
        page,
        page_size,
    }))
}

/// Add keys to a pool (or change their priority/weight).
#[utoipa::path(post, path = "/pools/{pool}/members", tag = "pools", request_body = AddMembers,
    security(("bearer" = [])), params(("pool" = String, Path, description = "Pool identifier")),
    responses((status = 200, body = PoolOut), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
#[tracing::instrument(skip_all, fields(user_id = %user.id))]
pub(crate) async fn add_members(
    State(state): State<AppState>,
    user: AuthUser,
    AppPath(pool): AppPath<String>,
    AppJson(body): AppJson<AddMembers>,
) -> ApiResult<Json<PoolOut>> {
    if !(-1_000_000..=1_000_000).contains(&body.priority) {
        return Err(ApiError::field(
            "priority",
            "must be between -1000000 and 1000000",
        ));
    }
    if !(1..=1_000_000).contains(&body.weight) {
        return Err(ApiError::field("weight", "must be between 1 and 1000000"));
    }
    if body.key_identifiers.is_empty() {
        return Err(ApiError::field(
            "key_identifiers",
            "must name at least one key",
        ));
    }
    let p = load_pool(&state, &user, &pool).await?;
    let ids = resolve_key_ids(&state, &user, "key_identifiers", &body.key_identifiers).await?;
    let mut tx = state.db.pool.begin().await?;
    upsert_members(
        state.db.kind,
        &mut tx,
        &p.id,
        &ids,
        body.priority,
        body.weight,
        state.clock.now_ms(),
    )
    .await?;
    tx.commit().await?;
    state.engines.pool_changed(&p.id).await;
    Ok(Json(pool_with_members(&state, &user, &pool).await?))
}

/// Remove a key from a pool (the key itself stays).
#[utoipa::path(delete, path = "/pools/{pool}/members/{key}", tag = "pools", security(("bearer" = [])),
    params(("pool" = String, Path, description = "Pool identifier"), ("key" = String, Path, description = "Key identifier")),
    responses((status = 204, description = "Removed"), (status = 404, body = ErrorBody)))]
pub(crate) async fn remove_member(
    State(state): State<AppState>,
    user: AuthUser,
    AppPath((pool, key)): AppPath<(String, String)>,
) -> ApiResult<StatusCode> {
    let p = load_pool(&state, &user, &pool).await?;
    let done = sqlx::query(
        "DELETE FROM pool_members WHERE pool_id = $1 AND key_id IN \
         (SELECT id FROM api_keys WHERE user_id = $2 AND identifier = $3)",
    )
    .bind(p.id.clone())
    .bind(user.id)
    .bind(key.clone())
    .execute(&state.db.pool)
    .await?;
    if done.rows_affected() == 0 {
        return Err(ApiError::NotFound(format!(
            "key '{key}' is not a member of pool '{pool}'"
        )));
    }
    state.engines.pool_changed(&p.id).await;
    Ok(StatusCode::NO_CONTENT)
}

/// Key counts of a pool.
#[utoipa::path(get, path = "/pools/{pool}/status", tag = "pools", security(("bearer" = [])),
    params(("pool" = String, Path, description = "Pool identifier")),
    responses((status = 200, body = PoolStatus), (status = 404, body = ErrorBody)))]
pub(crate) async fn pool_status(
    State(state): State<AppState>,
    user: AuthUser,
    AppPath(pool): AppPath<String>,
) -> ApiResult<Json<PoolStatus>> {
    let p = load_pool(&state, &user, &pool).await?;
    // COUNT(CASE ...) rather than SUM: SUM of BIGINT is NUMERIC in PostgreSQL.
    let r = sqlx::query(
        "SELECT COUNT(*) AS total, \
         COUNT(CASE WHEN k.is_active = 1 AND k.is_archived = 0 THEN 1 END) AS available, \
         COUNT(CASE WHEN k.is_archived = 1 THEN 1 END) AS archived, \
         COUNT(CASE WHEN k.is_active = 0 THEN 1 END) AS inactive, \
         COUNT(CASE WHEN k.verification_status = 'valid' THEN 1 END) AS valid, \
         COUNT(CASE WHEN k.verification_status = 'invalid' THEN 1 END) AS invalid, \
         COUNT(CASE WHEN k.verification_status = 'unverified' THEN 1 END) AS unverified \
         FROM pool_members m JOIN api_keys k ON k.id = m.key_id WHERE m.pool_id = $1",
    )
    .bind(p.id)
    .fetch_one(&state.db.pool)
    .await?;
    Ok(Json(PoolStatus {
        pool_identifier: p.identifier,
        is_active: p.is_active,
        total_keys: r.try_get("total")?,
        available_keys: r.try_get("available")?,
        archived_keys: r.try_get("archived")?,
        inactive_keys: r.try_get("inactive")?,
        valid_keys: r.try_get("valid")?,
        invalid_keys: r.try_get("invalid")?,
        unverified_keys: r.try_get("unverified")?,
    }))
}

/// The pool's configuration in the shape the apipool-ng SDK's `get_config` reads.
#[utoipa::path(get, path = "/pools/{pool}/config", tag = "pools", security(("bearer" = [])),
    params(("pool" = String, Path, description = "Pool identifier")),
    responses((status = 200, body = PoolConfigOut), (status = 404, body = ErrorBody)))]
async fn pool_config(
    State(state): State<AppState>,
    user: AuthUser,
    AppPath(pool): AppPath<String>,
) -> ApiResult<Json<PoolConfigOut>> {
    let p = load_pool(&state, &user, &pool).await?;
    Ok(Json(PoolConfigOut {
        pool_identifier: p.identifier,
        client_type: p.client_type,
        reach_limit_exception: p.reach_limit_exception,
        rotation_strategy: p.rotation_strategy,
        pool_config: p.pool_config,
    }))
}
