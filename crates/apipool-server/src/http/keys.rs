//! `/keys`: API keys, stored sealed by the vault. Raw key material only leaves the server through
//! `GET /keys/raw`, `GET /keys/{identifier}/raw` and `GET /keys/export?include_raw=true`.

// utoipa's `params(Type)` expansion names same-module types with a redundant path.
#![allow(unused_qualifications)]

use std::collections::{HashMap, HashSet};

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use sqlx::Row;
use sqlx::any::AnyRow;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::{OpenApiRouter, UtoipaMethodRouter};
use utoipa_axum::routes;
use zeroize::Zeroizing;

use super::AppState;
use super::error::{ApiError, ApiResult, ErrorBody, ResultExt};
use super::extractor::{AppJson, AppPath, AppQuery, AuthUser};
use super::types::{self, PageParams, Patch, parse_json};
use crate::clock::format_ms;
use crate::db::{DbKind, MAX_BIND_PARAMS, Param, Sql, like_escape};
use crate::vault::{self, Sealed, VaultError, key_aad_id, seal_with};

/// Largest accepted import body.
const IMPORT_BODY_LIMIT: usize = 64 * 1024 * 1024;
const CLIENT_CONFIG_MAX: usize = 16 * 1024;

pub(super) fn router() -> OpenApiRouter<AppState> {
    let big = |(s, p, m): UtoipaMethodRouter<AppState>| -> UtoipaMethodRouter<AppState> {
        (
            s,
            p,
            m.layer(axum::extract::DefaultBodyLimit::max(IMPORT_BODY_LIMIT)),
        )
    };
    OpenApiRouter::new()
        .routes(routes!(list_keys, create_key))
        .routes(routes!(raw_keys_for_pool))
        .routes(routes!(export_keys))
        .routes(big(routes!(import_keys)))
        .routes(big(routes!(batch_import_keys)))
        .routes(routes!(get_key, update_key, delete_key))
        .routes(routes!(rotate_key))
        .routes(routes!(verify_key))
        .routes(routes!(raw_key))
}

/// A key as the API shows it (never the raw key).
#[derive(Debug, Serialize, ToSchema)]
pub struct KeyOut {
    /// Id.
    pub id: String,
    /// Unique per user.
    pub identifier: String,
    /// Display name.
    pub alias: Option<String>,
    /// Arbitrary JSON stored verbatim (e.g. `base_url`, `headers`).
    #[schema(value_type = Option<Object>)]
    pub client_config: serde_json::Value,
    /// Usable.
    pub is_active: bool,
    /// Archived keys stay stored but are not handed out.
    pub is_archived: bool,
    /// `unverified`, `valid`, `invalid`, `error` or `unreachable`.
    pub verification_status: String,
    /// RFC 3339 or null.
    pub last_verified_at: Option<String>,
    /// Tags.
    pub tags: Vec<String>,
    /// Free text.
    pub description: Option<String>,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339.
    pub updated_at: String,
}

pub(super) const KEY_COLS: &str = "k.id, k.identifier, k.alias, k.description, k.client_config, k.tags, \
    k.is_active, k.is_archived, k.verification_status, k.last_verified_at, k.created_at, k.updated_at";

impl KeyOut {
    fn from_row(r: &AnyRow) -> Result<Self, sqlx::Error> {
        let tags: String = r.try_get("tags")?;
        let client_config: Option<String> = r.try_get("client_config")?;
        Ok(Self {
            id: r.try_get("id")?,
            identifier: r.try_get("identifier")?,
            alias: r.try_get("alias")?,
            client_config: parse_json(client_config.as_deref()),
            is_active: r.try_get::<i64, _>("is_active")? != 0,
            is_archived: r.try_get::<i64, _>("is_archived")? != 0,
            verification_status: r.try_get("verification_status")?,
            last_verified_at: r
                .try_get::<Option<i64>, _>("last_verified_at")?
                .map(format_ms),
            tags: serde_json::from_str(&tags).unwrap_or_default(),
            description: r.try_get("description")?,
            created_at: format_ms(r.try_get("created_at")?),
            updated_at: format_ms(r.try_get("updated_at")?),
        })
    }
}

/// A new key.
#[derive(Debug, Deserialize, ToSchema)]
pub struct CreateKey {
    /// 1–128 characters, unique per user.
    pub identifier: String,
    /// The secret, 1–4096 bytes. Stored encrypted; never returned except by the raw endpoints.
    #[schema(value_type = String)]
    pub raw_key: SecretString,
    /// Display name (≤128).
    pub alias: Option<String>,
    /// JSON object stored verbatim (≤16 KiB).
    #[schema(value_type = Option<Object>)]
    pub client_config: Option<serde_json::Value>,
    /// Tags (≤50, each ≤64 characters).
    pub tags: Option<Vec<String>>,
    /// Free text (≤2000).
    pub description: Option<String>,
}

/// A validated key ready to insert.
struct NewKey {
    identifier: String,
    raw_key: SecretString,
    alias: Option<String>,
    client_config: Option<String>,
    tags: Vec<String>,
    description: Option<String>,
}

impl CreateKey {
    fn validate(self, prefix: &str) -> ApiResult<NewKey> {
        let f = |name: &str| format!("{prefix}{name}");
        types::raw_key(&f("raw_key"), self.raw_key.expose_secret())?;
        Ok(NewKey {
            identifier: key_identifier(&f("identifier"), &self.identifier)?,
            raw_key: self.raw_key,
            alias: types::opt_text(&f("alias"), self.alias, 128)?,
            client_config: types::json_object(
                &f("client_config"),
                self.client_config,
                CLIENT_CONFIG_MAX,
            )?,
            tags: types::tags(&f("tags"), self.tags)?,
            description: types::opt_text(&f("description"), self.description, 2000)?,
        })
    }
}

/// Key identifiers must not collide with the fixed routes under `/keys/`.
fn key_identifier(field: &str, v: &str) -> ApiResult<String> {
    let v = types::identifier(field, v)?;
    if matches!(v.as_str(), "raw" | "export" | "import" | "batch-import") {
        return Err(ApiError::field(field, format!("'{v}' is reserved")));
    }
    Ok(v)
}

/// Changes to a key (absent fields stay unchanged; `null` clears).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateKey {
    /// New identifier.
    pub identifier: Option<String>,
    /// Display name.
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub alias: Patch<String>,
    /// Free text.
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub description: Patch<String>,
    /// Replaces the whole client_config.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub client_config: Patch<serde_json::Value>,
    /// Replaces the tags.
    pub tags: Option<Vec<String>>,
    /// Enable/disable.
    pub is_active: Option<bool>,
    /// Archive/restore.
    pub is_archived: Option<bool>,
}

/// New key material.
#[derive(Debug, Deserialize, ToSchema)]
pub struct RotateKey {
    /// The replacement secret.
    #[schema(value_type = String)]
    pub new_raw_key: SecretString,
}

/// Filters and paging of `GET /keys`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct KeyFilter {
    /// Page number, from 1.
    pub page: Option<i64>,
    /// 1–100 (default 20).
    pub page_size: Option<i64>,
    /// Only active / inactive keys.
    pub is_active: Option<bool>,
    /// Only archived / non-archived keys.
    pub is_archived: Option<bool>,
    /// Keys carrying this tag.
    pub tag: Option<String>,
    /// Case-insensitive substring of identifier, alias or description.
    pub search: Option<String>,
    /// `unverified`, `valid`, `invalid`, `error`, `unreachable`.
    pub verification_status: Option<String>,
}

/// A page of keys.
#[derive(Debug, Serialize, ToSchema)]
pub struct KeyPage {
    /// Keys ordered by identifier.
    pub items: Vec<KeyOut>,
    /// Matching keys in total.
    pub total: i64,
    /// Page number.
    pub page: i64,
    /// Page size.
    pub page_size: i64,
}

/// A raw key (from the raw endpoints only).
#[derive(Debug, Serialize, ToSchema)]
pub struct RawKeyOut {
    /// Identifier.
    pub identifier: String,
    /// The secret.
    pub raw_key: String,
    /// Display name.
    pub alias: Option<String>,
    /// Tags.
    pub tags: Vec<String>,
}

/// `GET /keys/raw` answer (read by the apipool-ng SDK's `get_keys`).
#[derive(Debug, Serialize, ToSchema)]
pub struct PoolRawKeys {
    /// The pool's client type.
    pub client_type: String,
    /// Active, non-archived member keys, highest priority first.
    pub keys: Vec<RawKeyOut>,
    /// `keys.len()`.
    pub total: usize,
}

/// `?pool_identifier=`
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PoolQuery {
    /// The pool.
    pub pool_identifier: String,
}

/// `?include_raw=`
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ExportQuery {
    /// Also export the raw keys (default false). The file is then as sensitive as the keys.
    pub include_raw: Option<bool>,
}

/// Import request: all rows are stored, or none.
#[derive(Debug, Deserialize, ToSchema)]
pub struct ImportRequest {
    /// Up to 10,000 keys.
    pub keys: Vec<CreateKey>,
}

/// An item of `batch-import`: a bare raw key or a full key object.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum BatchItem {
    /// Just the secret; the identifier becomes `<client_type>-<fingerprint prefix>`.
    #[schema(value_type = String)]
    Raw(SecretString),
    /// A full key.
    Key(CreateKey),
}

/// `batch-import` request.
#[derive(Debug, Deserialize, ToSchema)]
pub struct BatchImportRequest {
    /// Stored into each key's `client_config.client_type` when it has no client_config.
    pub client_type: Option<String>,
    /// Keys.
    pub keys: Vec<BatchItem>,
}

/// One row of an import report.
#[derive(Debug, Serialize, ToSchema)]
pub struct ImportRow {
    /// Position in the request.
    pub index: usize,
    /// Identifier.
    pub identifier: String,
    /// `created`.
    pub status: &'static str,
    /// New id.
    pub id: String,
}

/// Successful import.
#[derive(Debug, Serialize, ToSchema)]
pub struct ImportReport {
    /// Number of keys stored.
    pub imported: usize,
    /// One entry per row.
    pub results: Vec<ImportRow>,
}

/// Verification outcome.
#[derive(Debug, Serialize, ToSchema)]
pub struct VerifyOut {
    /// Identifier.
    pub identifier: String,
    /// `valid` (2xx), `invalid` (401/403), `error` (other status) or `unreachable`.
    pub verification_status: String,
    /// RFC 3339.
    pub last_verified_at: String,
    /// Upstream HTTP status, when there was an answer.
    pub http_status: Option<u16>,
    /// Explanation.
    pub detail: String,
}

async fn load_key_row(state: &AppState, user: &AuthUser, identifier: &str) -> ApiResult<AnyRow> {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {KEY_COLS}, k.fingerprint, k.ciphertext, k.nonce, k.wrapped_dek, k.dek_nonce, k.master_version \
         FROM api_keys k WHERE k.user_id = $1 AND k.identifier = $2"
    )))
    .bind(user.id.clone())
    .bind(identifier.to_owned())
    .fetch_optional(&state.db.pool)
    .await?
    .ok_or_else(|| ApiError::not_found("key", identifier))
}

/// Decrypts sealed rows (master keys fetched first, AES work off the async threads).
async fn open_all(
    state: &AppState,
    items: Vec<(String, Sealed)>,
) -> Result<Vec<Zeroizing<Vec<u8>>>, VaultError> {
    let mut keys = HashMap::new();
    for (_, s) in &items {
        if let std::collections::hash_map::Entry::Vacant(e) = keys.entry(s.master_version) {
            e.insert(state.vault.master_key(s.master_version).await?);
        }
    }
    tokio::task::spawn_blocking(move || {
        items
            .iter()
            .map(|(aad, s)| vault::open_with(&keys[&s.master_version], aad, s))
            .collect::<Result<Vec<_>, _>>()
    })
    .await
    .unwrap_or(Err(VaultError::Decrypt))
}

fn utf8(bytes: &[u8]) -> ApiResult<String> {
    String::from_utf8(bytes.to_vec())
        .map_err(|_| ApiError::Internal(anyhow::anyhow!("stored key is not UTF-8")))
}

/// Create a key.
#[utoipa::path(post, path = "/keys", tag = "keys", request_body = CreateKey, security(("bearer" = [])),
    responses((status = 201, body = KeyOut), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
#[tracing::instrument(skip_all, fields(user_id = %user.id))]
pub(crate) async fn create_key(
    State(state): State<AppState>,
    user: AuthUser,
    AppJson(body): AppJson<CreateKey>,
) -> ApiResult<(StatusCode, Json<KeyOut>)> {
    let key = body.validate("")?;
    let fp = state
        .vault
        .fingerprint(key.raw_key.expose_secret().as_bytes());
    let dup: Option<String> = sqlx::query_scalar(
        "SELECT identifier FROM api_keys WHERE user_id = $1 AND fingerprint = $2 LIMIT 1",
    )
    .bind(user.id.clone())
    .bind(fp.clone())
    .fetch_optional(&state.db.pool)
    .await?;
    if let Some(existing) = dup {
        return Err(ApiError::Conflict(format!(
            "this key value is already stored as '{existing}'"
        )));
    }
    let identifier = key.identifier.clone();
    insert_keys(&state, &user, vec![(key, fp)]).await?;
    let row = load_key_row(&state, &user, &identifier).await?;
    Ok((StatusCode::CREATED, Json(KeyOut::from_row(&row)?)))
}

/// Seals and inserts keys in one transaction with multi-row statements; returns the new ids.
async fn insert_keys(
    state: &AppState,
    user: &AuthUser,
    keys: Vec<(NewKey, String)>,
) -> ApiResult<Vec<String>> {
    let sk = state.vault.sealing_key().await?;
    let now = state.clock.now_ms();
    let user_id = user.id.clone();
    // Encryption of thousands of keys: off the async threads.
    let rows = tokio::task::spawn_blocking(move || {
        keys.into_iter()
            .map(|(k, fp)| {
                let id = uuid::Uuid::new_v4().to_string();
                let sealed = seal_with(&sk, &key_aad_id(&id), k.raw_key.expose_secret().as_bytes());
                (id, k, fp, sealed)
            })
            .collect::<Vec<_>>()
    })
    .await
    .map_err(anyhow::Error::from)?;
    let ids: Vec<String> = rows.iter().map(|r| r.0.clone()).collect();
    let mut tx = state.db.pool.begin().await?;
    const COLS: usize = 16;
    for chunk in rows.chunks(MAX_BIND_PARAMS / COLS) {
        let mut sql = Sql::for_db(
            state.db.kind,
            "INSERT INTO api_keys (id, user_id, identifier, alias, description, client_config, tags, \
             verification_status, fingerprint, ciphertext, nonce, wrapped_dek, dek_nonce, master_version, \
             created_at, updated_at) VALUES ",
        );
        for (i, (id, k, fp, s)) in chunk.iter().enumerate() {
            sql.push(if i == 0 { "(" } else { ", (" });
            let values: [Param; COLS] = [
                id.clone().into(),
                user_id.clone().into(),
                k.identifier.clone().into(),
                k.alias.clone().into(),
                k.description.clone().into(),
                k.client_config.clone().into(),
                serde_json::to_string(&k.tags)
                    .unwrap_or_else(|_| "[]".to_owned())
                    .into(),
                "unverified".into(),
                fp.clone().into(),
                s.ciphertext.clone().into(),
                s.nonce.clone().into(),
                s.wrapped_dek.clone().into(),
                s.dek_nonce.clone().into(),
                s.master_version.into(),
                now.into(),
                now.into(),
            ];
            for (j, v) in values.into_iter().enumerate() {
                if j > 0 {
                    sql.push(", ");
                }
                sql.bind(v);
            }
            sql.push(")");
        }
        sql.into_query()
            .execute(&mut *tx)
            .await
            .on_unique(|| "a key with one of these identifiers already exists".to_owned())?;
    }
    let tag_rows: Vec<(String, String)> = rows
        .iter()
        .flat_map(|(id, k, _, _)| k.tags.iter().map(move |t| (id.clone(), t.clone())))
        .collect();
    for chunk in tag_rows.chunks(MAX_BIND_PARAMS / 3) {
        let mut sql = Sql::for_db(
            state.db.kind,
            "INSERT INTO api_key_tags (key_id, user_id, tag) VALUES ",
        );
        for (i, (id, tag)) in chunk.iter().enumerate() {
            sql.push(if i == 0 { "(" } else { ", (" });
            sql.bind(id.clone())
                .push(", ")
                .bind(user_id.clone())
                .push(", ")
                .bind(tag.clone());
            sql.push(")");
        }
        sql.into_query().execute(&mut *tx).await?;
    }
    tx.commit().await?;
    Ok(ids)
}

/// List keys (paged, filtered).
#[utoipa::path(get, path = "/keys", tag = "keys", params(KeyFilter), security(("bearer" = [])),
    responses((status = 200, body = KeyPage), (status = 422, body = ErrorBody)))]
pub(crate) async fn list_keys(
    State(state): State<AppState>,
    user: AuthUser,
    AppQuery(f): AppQuery<KeyFilter>,
) -> ApiResult<Json<KeyPage>> {
    let (page, page_size, offset) = PageParams {
        page: f.page,
        page_size: f.page_size,
    }
    .resolve()?;
    let mut filter = match f.tag {
        // Driven by the (user_id, tag) index, so a rare tag among 100,000 keys stays cheap
        // (each key has a tag at most once: the join cannot duplicate rows).
        Some(tag) => {
            let mut sql = Sql::new(
                " FROM api_key_tags t JOIN api_keys k ON k.id = t.key_id WHERE t.user_id = ",
            );
            sql.bind(user.id.clone())
                .push(" AND t.tag = ")
                .bind(tag)
                .push(" AND k.user_id = ")
                .bind(user.id.clone());
            sql
        }
        None => {
            let mut sql = Sql::new(" FROM api_keys k WHERE k.user_id = ");
            sql.bind(user.id.clone());
            sql
        }
    };
    if let Some(a) = f.is_active {
        filter.push(" AND k.is_active = ").bind(a);
    }
    if let Some(a) = f.is_archived {
        filter.push(" AND k.is_archived = ").bind(a);
    }
    if let Some(v) = f.verification_status {
        filter.push(" AND k.verification_status = ").bind(v);
    }
    if let Some(s) = f.search.filter(|s| !s.is_empty()) {
        if s.chars().count() > 128 {
            return Err(ApiError::field("search", "must be at most 128 characters"));
        }
        // Case-insensitive substring: SQLite's LIKE already ignores ASCII case, PostgreSQL
        // needs ILIKE. No LOWER()/COALESCE() per row: NULL columns simply do not match.
        let like = match state.db.kind {
            DbKind::Sqlite => " LIKE ",
            DbKind::Postgres => " ILIKE ",
        };
        let pat = format!("%{}%", like_escape(&s));
        filter.push(" AND (");
        for (i, col) in ["k.identifier", "k.alias", "k.description"]
            .iter()
            .enumerate()
        {
            if i > 0 {
                filter.push(" OR ");
            }
            filter
                .push(col)
                .push(like)
                .bind(pat.clone())
                .push(" ESCAPE '\\'");
        }
        filter.push(")");
    }
    let count_sql = filter.derive(format!("SELECT COUNT(*) AS n{}", filter.text));
    let total: i64 = count_sql
        .into_query()
        .fetch_one(&state.db.pool)
        .await?
        .try_get("n")?;
    let mut list = filter.derive(format!("SELECT {KEY_COLS}{}", filter.text));
    list.push(" ORDER BY k.identifier LIMIT ")
        .bind(page_size)
        .push(" OFFSET ")
        .bind(offset);
    let rows = list.into_query().fetch_all(&state.db.pool).await?;
    let items = rows
        .iter()
        .map(KeyOut::from_row)
        .collect::<Result<_, _>>()?;
    Ok(Json(KeyPage {
        items,
        total,
        page,
        page_size,
    }))
}

/// Fetches and decrypts the usable keys of a pool.
async fn pool_raw_keys(state: &AppState, user: &AuthUser, pool: &str) -> ApiResult<PoolRawKeys> {
    let prow =
        sqlx::query("SELECT id, client_type FROM pools WHERE user_id = $1 AND identifier = $2")
            .bind(user.id.clone())
            .bind(pool.to_owned())
            .fetch_optional(&state.db.pool)
            .await?
            .ok_or_else(|| ApiError::not_found("pool", pool))?;
    let pool_id: String = prow.try_get("id")?;
    let rows = sqlx::query(
        "SELECT k.id, k.identifier, k.alias, k.tags, k.ciphertext, k.nonce, k.wrapped_dek, k.dek_nonce, k.master_version \
         FROM pool_members m JOIN api_keys k ON k.id = m.key_id \
         WHERE m.pool_id = $1 AND k.is_active = 1 AND k.is_archived = 0 \
         ORDER BY m.priority DESC, k.identifier",
    )
    .bind(pool_id)
    .fetch_all(&state.db.pool)
    .await?;
    let mut sealed = Vec::with_capacity(rows.len());
    for r in &rows {
        let id: String = r.try_get("id")?;
        sealed.push((key_aad_id(&id), vault::sealed_from_row(r)?));
    }
    let plain = open_all(state, sealed).await?;
    let mut keys = Vec::with_capacity(rows.len());
    for (r, p) in rows.iter().zip(plain) {
        let tags: String = r.try_get("tags")?;
        keys.push(RawKeyOut {
            identifier: r.try_get("identifier")?,
            raw_key: utf8(&p)?,
            alias: r.try_get("alias")?,
            tags: serde_json::from_str(&tags).unwrap_or_default(),
        });
    }
    Ok(PoolRawKeys {
        client_type: prow.try_get("client_type")?,
        total: keys.len(),
        keys,
    })
}

/// The raw keys of a pool (apipool-ng SDK `get_keys`).
#[utoipa::path(get, path = "/keys/raw", tag = "keys", params(PoolQuery), security(("bearer" = [])),
    responses((status = 200, body = PoolRawKeys), (status = 404, body = ErrorBody)))]
#[tracing::instrument(skip_all, fields(user_id = %user.id))]
async fn raw_keys_for_pool(
    State(state): State<AppState>,
    user: AuthUser,
    AppQuery(q): AppQuery<PoolQuery>,
) -> ApiResult<Json<PoolRawKeys>> {
    match pool_raw_keys(&state, &user, &q.pool_identifier).await {
        // A rotation re-wrapped rows between our read and the decryption: read again.
        Err(ApiError::Vault(_)) => Ok(Json(
            pool_raw_keys(&state, &user, &q.pool_identifier).await?,
        )),
        other => Ok(Json(other?)),
    }
}

async fn single_raw(state: &AppState, user: &AuthUser, identifier: &str) -> ApiResult<RawKeyOut> {
    let row = load_key_row(state, user, identifier).await?;
    let id: String = row.try_get("id")?;
    let sealed = vault::sealed_from_row(&row)?;
    let plain = state.vault.decrypt(&key_aad_id(&id), &sealed).await?;
    let out = KeyOut::from_row(&row)?;
    Ok(RawKeyOut {
        identifier: out.identifier,
        raw_key: utf8(&plain)?,
        alias: out.alias,
        tags: out.tags,
    })
}

/// The raw value of one key.
#[utoipa::path(get, path = "/keys/{identifier}/raw", tag = "keys", security(("bearer" = [])),
    params(("identifier" = String, Path, description = "Key identifier")),
    responses((status = 200, body = RawKeyOut), (status = 404, body = ErrorBody)))]
#[tracing::instrument(skip_all, fields(user_id = %user.id))]
pub(crate) async fn raw_key(
    State(state): State<AppState>,
    user: AuthUser,
    AppPath(identifier): AppPath<String>,
) -> ApiResult<Json<RawKeyOut>> {
    match single_raw(&state, &user, &identifier).await {
        Err(ApiError::Vault(_)) => Ok(Json(single_raw(&state, &user, &identifier).await?)),
        other => Ok(Json(other?)),
    }
}

/// Export all keys as CSV (without raw keys unless `include_raw=true`).
#[utoipa::path(get, path = "/keys/export", tag = "keys", params(ExportQuery), security(("bearer" = [])),
    responses((status = 200, content_type = "text/csv", body = String)))]
#[tracing::instrument(skip_all, fields(user_id = %user.id))]
pub(crate) async fn export_keys(
    State(state): State<AppState>,
    user: AuthUser,
    AppQuery(q): AppQuery<ExportQuery>,
) -> ApiResult<Response> {
    let include_raw = q.include_raw.unwrap_or(false);
    let mut w = csv::Writer::from_writer(Vec::new());
    let mut header_row = vec![
        "identifier",
        "alias",
        "description",
        "tags",
        "client_config",
        "is_active",
        "is_archived",
        "verification_status",
        "last_verified_at",
        "created_at",
        "updated_at",
    ];
    if include_raw {
        header_row.push("raw_key");
    }
    w.write_record(&header_row).map_err(anyhow::Error::from)?;
    let mut after = String::new();
    loop {
        // Keyset paging keeps memory and query cost flat for 100,000 keys.
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {KEY_COLS}, k.ciphertext, k.nonce, k.wrapped_dek, k.dek_nonce, k.master_version \
             FROM api_keys k WHERE k.user_id = $1 AND k.identifier > $2 ORDER BY k.identifier LIMIT 1000"
        )))
        .bind(user.id.clone())
        .bind(after.clone())
        .fetch_all(&state.db.pool)
        .await?;
        let Some(last) = rows.last() else {
            break;
        };
        after = last.try_get("identifier")?;
        let plain = if include_raw {
            let mut sealed = Vec::with_capacity(rows.len());
            for r in &rows {
                let id: String = r.try_get("id")?;
                sealed.push((key_aad_id(&id), vault::sealed_from_row(r)?));
            }
            open_all(&state, sealed).await?
        } else {
            Vec::new()
        };
        for (i, r) in rows.iter().enumerate() {
            let k = KeyOut::from_row(r)?;
            let mut rec = vec![
                k.identifier,
                k.alias.unwrap_or_default(),
                k.description.unwrap_or_default(),
                serde_json::to_string(&k.tags).unwrap_or_default(),
                if k.client_config.is_null() {
                    String::new()
                } else {
                    k.client_config.to_string()
                },
                k.is_active.to_string(),
                k.is_archived.to_string(),
                k.verification_status,
                k.last_verified_at.unwrap_or_default(),
                k.created_at,
                k.updated_at,
            ];
            if include_raw {
                rec.push(utf8(&plain[i])?);
            }
            w.write_record(&rec).map_err(anyhow::Error::from)?;
        }
    }
    let body = w.into_inner().map_err(|e| anyhow::anyhow!("csv: {e}"))?;
    Ok((
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8"),
            (
                header::CONTENT_DISPOSITION,
                "attachment; filename=\"apipool-keys.csv\"",
            ),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
        .into_response())
}

/// Validates every row and checks duplicates (within the request and against stored keys),
/// then inserts all rows in one transaction or none.
async fn import_rows(
    state: &AppState,
    user: &AuthUser,
    rows: Vec<CreateKey>,
) -> ApiResult<(StatusCode, Json<ImportReport>)> {
    if rows.is_empty() {
        return Err(ApiError::field("keys", "must contain at least one key"));
    }
    if rows.len() > state.config.import_max_rows {
        return Err(ApiError::field(
            "keys",
            format!(
                "at most {} keys per request; split the import",
                state.config.import_max_rows
            ),
        ));
    }
    let n = rows.len();
    let mut errors: Vec<serde_json::Value> = Vec::new();
    let mut valid: Vec<(usize, NewKey, String)> = Vec::with_capacity(n);
    let mut seen_ids: HashMap<String, usize> = HashMap::with_capacity(n);
    let mut seen_fps: HashMap<String, usize> = HashMap::with_capacity(n);
    for (index, row) in rows.into_iter().enumerate() {
        let ident = row.identifier.clone();
        let mut err = |detail: String| {
            errors
                .push(serde_json::json!({ "index": index, "identifier": ident, "detail": detail }));
        };
        match row.validate(&format!("keys[{index}].")) {
            Err(e) => err(e.to_string()),
            Ok(k) => {
                let fp = state
                    .vault
                    .fingerprint(k.raw_key.expose_secret().as_bytes());
                if let Some(first) = seen_ids.insert(k.identifier.clone(), index) {
                    err(format!("duplicate identifier (also at index {first})"));
                } else if let Some(first) = seen_fps.insert(fp.clone(), index) {
                    err(format!("duplicate key value (also at index {first})"));
                } else {
                    valid.push((index, k, fp));
                }
            }
        }
    }
    // Existing identifiers and values, in chunks (no N+1).
    let idents: Vec<String> = valid.iter().map(|(_, k, _)| k.identifier.clone()).collect();
    let fps: Vec<String> = valid.iter().map(|(_, _, fp)| fp.clone()).collect();
    let taken_ids = existing(state, user, "identifier", "identifier", &idents).await?;
    let taken_fps = existing(state, user, "fingerprint", "identifier", &fps).await?;
    for (index, k, fp) in &valid {
        if taken_ids.contains_key(&k.identifier) {
            errors.push(
                serde_json::json!({ "index": index, "identifier": k.identifier,
                "detail": "a key with this identifier already exists" }),
            );
        } else if let Some(other) = taken_fps.get(fp) {
            errors.push(
                serde_json::json!({ "index": index, "identifier": k.identifier,
                "detail": format!("this key value is already stored as '{other}'") }),
            );
        }
    }
    if !errors.is_empty() {
        errors.sort_by_key(|e| e["index"].as_u64());
        return Err(ApiError::UnprocessableRows {
            detail: format!(
                "import rejected: {} of {n} rows have errors; nothing was imported",
                errors.len()
            ),
            errors: serde_json::Value::Array(errors),
        });
    }
    let meta: Vec<(usize, String)> = valid
        .iter()
        .map(|(i, k, _)| (*i, k.identifier.clone()))
        .collect();
    let ids = insert_keys(
        state,
        user,
        valid.into_iter().map(|(_, k, fp)| (k, fp)).collect(),
    )
    .await?;
    if state.db.kind == DbKind::Postgres && ids.len() >= 1000 {
        // Keep planner statistics fresh after a bulk load (autovacuum may be off or late).
        let pool = state.db.pool.clone();
        tokio::spawn(async move {
            if let Err(e) = sqlx::query("ANALYZE api_keys, api_key_tags")
                .execute(&pool)
                .await
            {
                tracing::warn!(error = %e, "ANALYZE after import failed");
            }
        });
    }
    let results = meta
        .into_iter()
        .zip(ids)
        .map(|((index, identifier), id)| ImportRow {
            index,
            identifier,
            status: "created",
            id,
        })
        .collect::<Vec<_>>();
    Ok((
        StatusCode::CREATED,
        Json(ImportReport {
            imported: results.len(),
            results,
        }),
    ))
}

/// Which of `values` already exist in column `col` for this user; maps value → `ret` column.
async fn existing(
    state: &AppState,
    user: &AuthUser,
    col: &str,
    ret: &str,
    values: &[String],
) -> ApiResult<HashMap<String, String>> {
    let mut out = HashMap::new();
    for chunk in values.chunks(1000) {
        // Each backend gets the shape its planner handles well without fresh statistics:
        // SQLite turns `IN (...)` into a probe of the (user_id, col) index per value, while
        // PostgreSQL's generic plan for a long IN list of parameters can degrade into comparing
        // every stored row with every value; a join against a VALUES list stays index probes.
        let sql = match state.db.kind {
            DbKind::Sqlite => {
                let mut sql = Sql::for_db(
                    state.db.kind,
                    &format!(
                        "SELECT k.{col} AS v, k.{ret} AS r FROM api_keys k WHERE k.user_id = "
                    ),
                );
                sql.bind(user.id.clone())
                    .push(&format!(" AND k.{col} IN ("));
                for (i, v) in chunk.iter().enumerate() {
                    if i > 0 {
                        sql.push(", ");
                    }
                    sql.bind(v.clone());
                }
                sql.push(")");
                sql
            }
            DbKind::Postgres => {
                let mut sql = Sql::for_db(
                    state.db.kind,
                    &format!("SELECT k.{col} AS v, k.{ret} AS r FROM api_keys k JOIN (VALUES "),
                );
                for (i, v) in chunk.iter().enumerate() {
                    sql.push(if i == 0 { "(" } else { ", (" });
                    sql.bind(v.clone()).push(")");
                }
                sql.push(&format!(") AS v ON k.{col} = v.column1 WHERE k.user_id = "))
                    .bind(user.id.clone());
                sql
            }
        };
        for r in sql.into_query().fetch_all(&state.db.pool).await? {
            out.insert(r.try_get("v")?, r.try_get("r")?);
        }
    }
    Ok(out)
}

/// Import keys: all rows or none, with a per-row report (422 lists every bad row).
#[utoipa::path(post, path = "/keys/import", tag = "keys", request_body = ImportRequest, security(("bearer" = [])),
    responses((status = 201, body = ImportReport), (status = 422, body = ErrorBody)))]
#[tracing::instrument(skip_all, fields(user_id = %user.id, rows = body.keys.len()))]
pub(crate) async fn import_keys(
    State(state): State<AppState>,
    user: AuthUser,
    AppJson(body): AppJson<ImportRequest>,
) -> ApiResult<(StatusCode, Json<ImportReport>)> {
    import_rows(&state, &user, body.keys).await
}

/// Import bare raw keys (or key objects) for a client type; same all-or-nothing rules.
#[utoipa::path(post, path = "/keys/batch-import", tag = "keys", request_body = BatchImportRequest,
    security(("bearer" = [])),
    responses((status = 201, body = ImportReport), (status = 422, body = ErrorBody)))]
#[tracing::instrument(skip_all, fields(user_id = %user.id, rows = body.keys.len()))]
pub(crate) async fn batch_import_keys(
    State(state): State<AppState>,
    user: AuthUser,
    AppJson(body): AppJson<BatchImportRequest>,
) -> ApiResult<(StatusCode, Json<ImportReport>)> {
    let client_type = body.client_type.unwrap_or_else(|| "generic".to_owned());
    let client_type = types::text("client_type", &client_type, 64)?;
    let rows = body
        .keys
        .into_iter()
        .map(|item| match item {
            BatchItem::Raw(raw) => {
                let fp = state.vault.fingerprint(raw.expose_secret().as_bytes());
                CreateKey {
                    identifier: format!("{client_type}-{}", &fp[..12]),
                    raw_key: raw,
                    alias: None,
                    client_config: Some(serde_json::json!({ "client_type": client_type })),
                    tags: None,
                    description: None,
                }
            }
            BatchItem::Key(mut k) => {
                if k.client_config.is_none() {
                    k.client_config = Some(serde_json::json!({ "client_type": client_type }));
                }
                k
            }
        })
        .collect();
    import_rows(&state, &user, rows).await
}

/// One key.
#[utoipa::path(get, path = "/keys/{identifier}", tag = "keys", security(("bearer" = [])),
    params(("identifier" = String, Path, description = "Key identifier")),
    responses((status = 200, body = KeyOut), (status = 404, body = ErrorBody)))]
pub(crate) async fn get_key(
    State(state): State<AppState>,
    user: AuthUser,
    AppPath(identifier): AppPath<String>,
) -> ApiResult<Json<KeyOut>> {
    let row = load_key_row(&state, &user, &identifier).await?;
    Ok(Json(KeyOut::from_row(&row)?))
}

/// Update a key (absent fields unchanged, `null` clears).
#[utoipa::path(put, path = "/keys/{identifier}", tag = "keys", request_body = UpdateKey, security(("bearer" = [])),
    params(("identifier" = String, Path, description = "Key identifier")),
    responses((status = 200, body = KeyOut), (status = 404, body = ErrorBody),
              (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
#[tracing::instrument(skip_all, fields(user_id = %user.id))]
pub(crate) async fn update_key(
    State(state): State<AppState>,
    user: AuthUser,
    AppPath(identifier): AppPath<String>,
    AppJson(body): AppJson<UpdateKey>,
) -> ApiResult<Json<KeyOut>> {
    let row = load_key_row(&state, &user, &identifier).await?;
    let id: String = row.try_get("id")?;
    let mut sql = Sql::new("UPDATE api_keys SET updated_at = ");
    sql.bind(state.clock.now_ms());
    let new_ident = match body.identifier {
        Some(v) => {
            let v = key_identifier("identifier", &v)?;
            sql.push(", identifier = ").bind(v.clone());
            v
        }
        None => identifier.clone(),
    };
    if let Some(v) = body.alias.into_update() {
        sql.push(", alias = ")
            .bind(types::opt_text("alias", v, 128)?);
    }
    if let Some(v) = body.description.into_update() {
        sql.push(", description = ")
            .bind(types::opt_text("description", v, 2000)?);
    }
    if let Some(v) = body.client_config.into_update() {
        sql.push(", client_config = ").bind(types::json_object(
            "client_config",
            v,
            CLIENT_CONFIG_MAX,
        )?);
    }
    let tags = body
        .tags
        .map(|t| types::tags("tags", Some(t)))
        .transpose()?;
    if let Some(t) = &tags {
        sql.push(", tags = ")
            .bind(serde_json::to_string(t).unwrap_or_else(|_| "[]".to_owned()));
    }
    if let Some(v) = body.is_active {
        sql.push(", is_active = ").bind(v);
    }
    if let Some(v) = body.is_archived {
        sql.push(", is_archived = ").bind(v);
    }
    sql.push(" WHERE id = ").bind(id.clone());
    let mut tx = state.db.pool.begin().await?;
    sql.into_query()
        .execute(&mut *tx)
        .await
        .on_unique(|| format!("a key with identifier '{new_ident}' already exists"))?;
    if let Some(t) = tags {
        sqlx::query("DELETE FROM api_key_tags WHERE key_id = $1")
            .bind(id.clone())
            .execute(&mut *tx)
            .await?;
        for tag in t {
            sqlx::query("INSERT INTO api_key_tags (key_id, user_id, tag) VALUES ($1, $2, $3)")
                .bind(id.clone())
                .bind(user.id.clone())
                .bind(tag)
                .execute(&mut *tx)
                .await?;
        }
    }
    tx.commit().await?;
    state.engines.keys_changed(&user.id).await;
    let row = load_key_row(&state, &user, &new_ident).await?;
    Ok(Json(KeyOut::from_row(&row)?))
}

/// Delete a key (also removes it from every pool).
#[utoipa::path(delete, path = "/keys/{identifier}", tag = "keys", security(("bearer" = [])),
    params(("identifier" = String, Path, description = "Key identifier")),
    responses((status = 204, description = "Deleted"), (status = 404, body = ErrorBody)))]
pub(crate) async fn delete_key(
    State(state): State<AppState>,
    user: AuthUser,
    AppPath(identifier): AppPath<String>,
) -> ApiResult<StatusCode> {
    let done = sqlx::query("DELETE FROM api_keys WHERE user_id = $1 AND identifier = $2")
        .bind(user.id.clone())
        .bind(identifier.clone())
        .execute(&state.db.pool)
        .await?;
    if done.rows_affected() == 0 {
        return Err(ApiError::not_found("key", &identifier));
    }
    state.engines.keys_changed(&user.id).await;
    Ok(StatusCode::NO_CONTENT)
}

/// Replace a key's secret (verification is reset).
#[utoipa::path(patch, path = "/keys/{identifier}/rotate", tag = "keys", request_body = RotateKey,
    security(("bearer" = [])), params(("identifier" = String, Path, description = "Key identifier")),
    responses((status = 200, body = KeyOut), (status = 404, body = ErrorBody),
              (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
#[tracing::instrument(skip_all, fields(user_id = %user.id))]
pub(crate) async fn rotate_key(
    State(state): State<AppState>,
    user: AuthUser,
    AppPath(identifier): AppPath<String>,
    AppJson(body): AppJson<RotateKey>,
) -> ApiResult<Json<KeyOut>> {
    types::raw_key("new_raw_key", body.new_raw_key.expose_secret())?;
    let row = load_key_row(&state, &user, &identifier).await?;
    let id: String = row.try_get("id")?;
    let fp = state
        .vault
        .fingerprint(body.new_raw_key.expose_secret().as_bytes());
    let dup: Option<String> = sqlx::query_scalar(
        "SELECT identifier FROM api_keys WHERE user_id = $1 AND fingerprint = $2 AND id <> $3 LIMIT 1",
    )
    .bind(user.id.clone())
    .bind(fp.clone())
    .bind(id.clone())
    .fetch_optional(&state.db.pool)
    .await?;
    if let Some(existing) = dup {
        return Err(ApiError::Conflict(format!(
            "this key value is already stored as '{existing}'"
        )));
    }
    let sk = state.vault.sealing_key().await?;
    let s = seal_with(
        &sk,
        &key_aad_id(&id),
        body.new_raw_key.expose_secret().as_bytes(),
    );
    sqlx::query(
        "UPDATE api_keys SET ciphertext = $1, nonce = $2, wrapped_dek = $3, dek_nonce = $4, master_version = $5, \
         fingerprint = $6, verification_status = 'unverified', last_verified_at = NULL, updated_at = $7 WHERE id = $8",
    )
    .bind(s.ciphertext)
    .bind(s.nonce)
    .bind(s.wrapped_dek)
    .bind(s.dek_nonce)
    .bind(s.master_version)
    .bind(fp)
    .bind(state.clock.now_ms())
    .bind(id)
    .execute(&state.db.pool)
    .await?;
    state.engines.keys_changed(&user.id).await;
    let row = load_key_row(&state, &user, &identifier).await?;
    Ok(Json(KeyOut::from_row(&row)?))
}

/// Check a key against its upstream: `GET client_config.base_url` (+ `client_config.verify_path`)
/// with the key as `Authorization: Bearer` (unless `client_config.headers` sets Authorization).
#[utoipa::path(post, path = "/keys/{identifier}/verify", tag = "keys", security(("bearer" = [])),
    params(("identifier" = String, Path, description = "Key identifier")),
    responses((status = 200, body = VerifyOut), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
#[tracing::instrument(skip_all, fields(user_id = %user.id))]
pub(crate) async fn verify_key(
    State(state): State<AppState>,
    user: AuthUser,
    AppPath(identifier): AppPath<String>,
) -> ApiResult<Json<VerifyOut>> {
    let row = load_key_row(&state, &user, &identifier).await?;
    let key = KeyOut::from_row(&row)?;
    let cfg = &key.client_config;
    let base = cfg
        .get("base_url")
        .and_then(|v| v.as_str())
        .ok_or_else(|| {
            ApiError::field(
                "client_config.base_url",
                "is needed to verify a key (set it with PUT /keys/{identifier})",
            )
        })?;
    let mut url = url::Url::parse(base)
        .ok()
        .filter(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
        .ok_or_else(|| ApiError::field("client_config.base_url", "must be an http(s) URL"))?;
    if let Some(path) = cfg.get("verify_path").and_then(|v| v.as_str()) {
        let joined = format!(
            "{}/{}",
            url.path().trim_end_matches('/'),
            path.trim_start_matches('/')
        );
        url.set_path(&joined);
    }
    let sealed = vault::sealed_from_row(&row)?;
    let plain = state.vault.decrypt(&key_aad_id(&key.id), &sealed).await?;
    let raw = Zeroizing::new(utf8(&plain)?);
    let mut req = state.http.get(url);
    let mut has_auth = false;
    if let Some(headers) = cfg.get("headers").and_then(|h| h.as_object()) {
        for (name, value) in headers {
            if let Some(v) = value.as_str() {
                has_auth |= name.eq_ignore_ascii_case("authorization");
                req = req.header(name.as_str(), v);
            }
        }
    }
    if !has_auth {
        req = req.bearer_auth(raw.as_str());
    }
    let (status, http_status, detail) = match req.send().await {
        Ok(resp) => {
            let code = resp.status();
            let status = if code.is_success() {
                "valid"
            } else if matches!(code.as_u16(), 401 | 403) {
                "invalid"
            } else {
                "error"
            };
            (
                status,
                Some(code.as_u16()),
                format!("upstream answered {code}"),
            )
        }
        Err(e) => (
            "unreachable",
            None,
            if e.is_timeout() {
                "upstream timed out".to_owned()
            } else {
                "upstream could not be reached".to_owned()
            },
        ),
    };
    let now = state.clock.now_ms();
    sqlx::query(
        "UPDATE api_keys SET verification_status = $1, last_verified_at = $2 WHERE id = $3",
    )
    .bind(status.to_owned())
    .bind(now)
    .bind(key.id.clone())
    .execute(&state.db.pool)
    .await?;
    Ok(Json(VerifyOut {
        identifier: key.identifier,
        verification_status: status.to_owned(),
        last_verified_at: format_ms(now),
        http_status,
        detail,
    }))
}

/// Resolves identifiers to key ids for a user; 422 naming the unknown ones.
pub(super) async fn resolve_key_ids(
    state: &AppState,
    user: &AuthUser,
    field: &str,
    identifiers: &[String],
) -> ApiResult<Vec<String>> {
    let map = existing(state, user, "identifier", "id", identifiers).await?;
    let mut missing: Vec<&str> = Vec::new();
    let mut seen = HashSet::new();
    let mut ids = Vec::with_capacity(identifiers.len());
    for ident in identifiers {
        match map.get(ident) {
            Some(id) => {
                if seen.insert(id.clone()) {
                    ids.push(id.clone());
                }
            }
            None => missing.push(ident),
        }
    }
    if !missing.is_empty() {
        missing.truncate(20);
        return Err(ApiError::field(
            field,
            format!("unknown keys: {}", missing.join(", ")),
        ));
    }
    Ok(ids)
}
