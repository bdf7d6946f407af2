//! Keys pages: list (search, filters, paging), add, bulk import with a per-row report, export,
//! and per key: edit, enable/disable, rotate, verify, delete, reveal.

use askama::Template;
use axum::Form;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use secrecy::SecretString;
use serde::Deserialize;
use serde_json::{Value, json};

use super::forms::{FieldErrors, non_blank, query, seg, split_tags};
use super::pages::{Ctx, PageError, PageResult, render, render_status};
use super::session::{DashUser, redirect_with};
use crate::http::AppState;
use crate::http::error::ApiError;
use crate::http::extractor::{AppJson, AppPath, AppQuery};
use crate::http::keys::{
    self as api, BatchImportRequest, BatchItem, CreateKey, ExportQuery, ImportRequest, KeyFilter,
    KeyOut, RotateKey, UpdateKey,
};

/// Query of the keys list (strings, so that blank form fields are simply "no filter").
#[derive(Debug, Default, Deserialize)]
pub(crate) struct KeysQuery {
    #[serde(default)]
    search: String,
    #[serde(default)]
    tag: String,
    /// `active`, `disabled`, `archived` or blank.
    #[serde(default)]
    status: String,
    /// A verification status or blank.
    #[serde(default)]
    verification: String,
    #[serde(default)]
    page: String,
    #[serde(default)]
    page_size: String,
}

impl KeysQuery {
    fn to_pairs(&self, page: i64) -> Vec<(&'static str, String)> {
        vec![
            ("search", self.search.clone()),
            ("tag", self.tag.clone()),
            ("status", self.status.clone()),
            ("verification", self.verification.clone()),
            ("page_size", self.page_size.clone()),
            (
                "page",
                if page > 1 {
                    page.to_string()
                } else {
                    String::new()
                },
            ),
        ]
    }
}

/// A key row of the list.
pub(crate) struct KeyRow {
    identifier: String,
    href: String,
    alias: String,
    tags: String,
    state: &'static str,
    is_active: bool,
    verification: String,
    last_verified_at: Option<String>,
}

fn state_of(k: &KeyOut) -> &'static str {
    if k.is_archived {
        "archived"
    } else if k.is_active {
        "active"
    } else {
        "disabled"
    }
}

impl From<KeyOut> for KeyRow {
    fn from(k: KeyOut) -> Self {
        Self {
            href: format!("/keys/{}", seg(&k.identifier)),
            state: state_of(&k),
            is_active: k.is_active,
            alias: k.alias.unwrap_or_default(),
            tags: k.tags.join(", "),
            verification: k.verification_status,
            last_verified_at: k.last_verified_at,
            identifier: k.identifier,
        }
    }
}

/// Values of the "add a key" form.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct CreateForm {
    #[serde(default)]
    identifier: String,
    #[serde(default)]
    raw_key: String,
    #[serde(default)]
    alias: String,
    #[serde(default)]
    tags: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    base_url: String,
}

/// Values of the import form.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct ImportForm {
    #[serde(default)]
    text: String,
    #[serde(default)]
    client_type: String,
}

/// One line of an import report.
pub(crate) struct ReportRow {
    line: usize,
    identifier: String,
    outcome: String,
    ok: bool,
}

/// The outcome of an import.
pub(crate) struct ImportResult {
    ok: bool,
    summary: String,
    rows: Vec<ReportRow>,
    more: usize,
}

#[derive(Template)]
#[template(path = "keys.html")]
struct KeysPage {
    ctx: Ctx,
    q: KeysQuery,
    items: Vec<KeyRow>,
    total: i64,
    page: i64,
    pages: i64,
    prev_url: Option<String>,
    next_url: Option<String>,
    filtered: bool,
    back: String,
    create: CreateForm,
    create_errors: FieldErrors,
    import: ImportForm,
    import_errors: FieldErrors,
    report: Option<ImportResult>,
}

fn opt_i64(v: &str) -> Option<i64> {
    v.trim().parse().ok()
}

async fn list_page(
    state: &AppState,
    du: &DashUser,
    q: KeysQuery,
    forms: (CreateForm, FieldErrors, ImportForm, FieldErrors),
    report: Option<ImportResult>,
    status: StatusCode,
) -> PageResult {
    let (is_active, is_archived) = match q.status.as_str() {
        "active" => (Some(true), Some(false)),
        "disabled" => (Some(false), None),
        "archived" => (None, Some(true)),
        _ => (None, None),
    };
    let page_size = opt_i64(&q.page_size).unwrap_or(25).clamp(1, 100);
    let filter = |page: i64| KeyFilter {
        page: Some(page),
        page_size: Some(page_size),
        is_active,
        is_archived,
        tag: non_blank(Some(&q.tag)),
        search: non_blank(Some(&q.search)),
        verification_status: non_blank(Some(&q.verification)),
    };
    let want = opt_i64(&q.page).unwrap_or(1).clamp(1, 1_000_000);
    let mut res = api::list_keys(
        State(state.clone()),
        du.user.clone(),
        AppQuery(filter(want)),
    )
    .await?
    .0;
    let pages = ((res.total + page_size - 1) / page_size).max(1);
    if want > pages && res.total > 0 {
        // Past the end (e.g. after deleting the last key of the last page): show the last page.
        res = api::list_keys(
            State(state.clone()),
            du.user.clone(),
            AppQuery(filter(pages)),
        )
        .await?
        .0;
    }
    let page = res.page;
    let link = |p: i64| format!("/keys{}", query(&q.to_pairs(p)));
    let (create, create_errors, import, import_errors) = forms;
    let page_view = KeysPage {
        ctx: Ctx::new(du, "keys", "Keys"),
        filtered: !(q.search.is_empty()
            && q.tag.is_empty()
            && q.status.is_empty()
            && q.verification.is_empty()),
        back: link(page),
        prev_url: (page > 1).then(|| link(page - 1)),
        next_url: (page < pages).then(|| link(page + 1)),
        items: res.items.into_iter().map(KeyRow::from).collect(),
        total: res.total,
        page,
        pages,
        q,
        create,
        create_errors,
        import,
        import_errors,
        report,
    };
    Ok(render_status(status, &page_view))
}

/// `GET /keys`.
pub(crate) async fn list(
    State(state): State<AppState>,
    du: DashUser,
    Query(q): Query<KeysQuery>,
) -> PageResult {
    let forms = (
        CreateForm::default(),
        FieldErrors::new(),
        ImportForm::default(),
        FieldErrors::new(),
    );
    list_page(&state, &du, q, forms, None, StatusCode::OK).await
}

const CREATE_FIELDS: [&str; 6] = [
    "identifier",
    "raw_key",
    "alias",
    "tags",
    "description",
    "client_config",
];

/// `POST /keys`: add one key.
pub(crate) async fn create(
    State(state): State<AppState>,
    du: DashUser,
    Form(f): Form<CreateForm>,
) -> PageResult {
    let body = CreateKey {
        identifier: f.identifier.trim().to_owned(),
        raw_key: SecretString::from(f.raw_key.trim().to_owned()),
        alias: non_blank(Some(&f.alias)),
        client_config: non_blank(Some(&f.base_url)).map(|u| json!({ "base_url": u })),
        tags: Some(split_tags(&f.tags)),
        description: non_blank(Some(&f.description)),
    };
    match api::create_key(State(state.clone()), du.user.clone(), AppJson(body)).await {
        Ok((_, k)) => Ok(redirect_with(
            &format!("/keys/{}", seg(&k.identifier)),
            "ok",
            &format!("Key '{}' added.", k.identifier),
        )),
        Err(e) => {
            let Some(mut errors) = FieldErrors::from_api(&e, &CREATE_FIELDS) else {
                return Err(e.into());
            };
            if let Some(m) = errors.get("client_config").map(str::to_owned) {
                errors.add("base_url", m);
            }
            let form = CreateForm {
                raw_key: String::new(),
                ..f
            };
            let forms = (form, errors, ImportForm::default(), FieldErrors::new());
            list_page(
                &state,
                &du,
                KeysQuery::default(),
                forms,
                None,
                StatusCode::UNPROCESSABLE_ENTITY,
            )
            .await
        }
    }
}

/// Rows of a pasted import: CSV with a header naming `raw_key`, or one key per line
/// (`raw_key` alone, or `identifier,raw_key[,alias]`).
enum Parsed {
    Csv(Vec<CreateKey>, Vec<usize>),
    Lines(Vec<BatchItem>, Vec<usize>),
}

fn cell(rec: &csv::StringRecord, idx: Option<usize>) -> Option<String> {
    idx.and_then(|i| rec.get(i))
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

fn parse_tags_cell(v: &str) -> Vec<String> {
    // The export writes tags as a JSON array; people write `a;b` or `a|b`.
    if let Ok(tags) = serde_json::from_str::<Vec<String>>(v) {
        return tags;
    }
    v.split([';', '|', ','])
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Fuzzing entry point for the pasted-import parser (not an API; see `fuzz/`): whether the
/// text was read as CSV, and the 1-based line number of each row it produced.
#[doc(hidden)]
pub fn fuzz_parse_import(text: &str) -> Result<(bool, Vec<usize>), String> {
    parse_import(text).map(|p| match p {
        Parsed::Csv(rows, lines) => {
            assert_eq!(rows.len(), lines.len());
            (true, lines)
        }
        Parsed::Lines(items, lines) => {
            assert_eq!(items.len(), lines.len());
            (false, lines)
        }
    })
}

fn parse_import(text: &str) -> Result<Parsed, String> {
    let first = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
    let header: Vec<String> = first
        .split(',')
        .map(|h| h.trim().trim_matches('"').to_lowercase())
        .collect();
    if header.iter().any(|h| h == "raw_key") {
        let body = text.trim_start();
        let skipped = text.len() - body.len();
        // The reader skips blank lines in its line count: count from the byte offset instead.
        let line_at = |byte: u64| {
            let bytes = text.as_bytes();
            let mut end = (skipped + usize::try_from(byte).unwrap_or(0)).min(bytes.len());
            while end < bytes.len() && matches!(bytes[end], b'\n' | b'\r') {
                end += 1;
            }
            // Line breaks as the CSV reader sees them: "\n", "\r\n", and a lone "\r".
            let breaks = bytes[..end]
                .iter()
                .enumerate()
                .filter(|&(i, b)| *b == b'\n' || (*b == b'\r' && bytes.get(i + 1) != Some(&b'\n')))
                .count();
            breaks + 1
        };
        let mut rdr = csv::ReaderBuilder::new()
            .flexible(true)
            .trim(csv::Trim::All)
            .from_reader(body.as_bytes());
        let cols = rdr
            .headers()
            .map_err(|e| format!("the CSV header could not be read: {e}"))?
            .iter()
            .map(str::to_lowercase)
            .collect::<Vec<_>>();
        let col = |name: &str| cols.iter().position(|c| c == name);
        let (ci, cr, ca, ct, cd, cc) = (
            col("identifier"),
            col("raw_key"),
            col("alias"),
            col("tags"),
            col("description"),
            col("client_config"),
        );
        let mut rows = Vec::new();
        let mut lines = Vec::new();
        for rec in rdr.records() {
            let rec = rec.map_err(|e| format!("the CSV could not be read: {e}"))?;
            if rec.iter().all(|c| c.trim().is_empty()) {
                continue;
            }
            let line = rec.position().map_or(0, |p| line_at(p.byte()));
            let client_config =
                match cell(&rec, cc) {
                    Some(t) => Some(serde_json::from_str::<Value>(&t).map_err(|e| {
                        format!("line {line}: client_config is not valid JSON ({e})")
                    })?),
                    None => None,
                };
            rows.push(CreateKey {
                identifier: cell(&rec, ci).unwrap_or_default(),
                raw_key: SecretString::from(cell(&rec, cr).unwrap_or_default()),
                alias: cell(&rec, ca),
                client_config,
                tags: cell(&rec, ct).map(|t| parse_tags_cell(&t)),
                description: cell(&rec, cd),
            });
            lines.push(line);
        }
        return Ok(Parsed::Csv(rows, lines));
    }
    let mut items = Vec::new();
    let mut lines = Vec::new();
    for (i, l) in text.lines().enumerate() {
        let l = l.trim();
        if l.is_empty() {
            continue;
        }
        let parts: Vec<&str> = l.split(',').map(str::trim).collect();
        let item = if parts.len() >= 2 {
            BatchItem::Key(CreateKey {
                identifier: parts[0].to_owned(),
                raw_key: SecretString::from(parts[1].to_owned()),
                alias: parts
                    .get(2)
                    .filter(|a| !a.is_empty())
                    .map(|a| (*a).to_owned()),
                client_config: None,
                tags: None,
                description: None,
            })
        } else {
            BatchItem::Raw(SecretString::from(l.to_owned()))
        };
        items.push(item);
        lines.push(i + 1);
    }
    Ok(Parsed::Lines(items, lines))
}

const REPORT_ROWS: usize = 500;

fn report_rows(rows: Vec<ReportRow>) -> (Vec<ReportRow>, usize) {
    let more = rows.len().saturating_sub(REPORT_ROWS);
    (rows.into_iter().take(REPORT_ROWS).collect(), more)
}

/// `POST /keys/import`: bulk import from pasted text (or a file read into the text box).
pub(crate) async fn import(
    State(state): State<AppState>,
    du: DashUser,
    Form(f): Form<ImportForm>,
) -> PageResult {
    let mut errors = FieldErrors::new();
    let client_type = non_blank(Some(&f.client_type)).unwrap_or_else(|| "generic".to_owned());
    let result = if f.text.trim().is_empty() {
        errors.add("text", "paste keys or choose a file first");
        None
    } else {
        match parse_import(&f.text) {
            Err(m) => {
                errors.add("text", m);
                None
            }
            Ok(parsed) => {
                let (lines, outcome) = match parsed {
                    Parsed::Csv(rows, lines) => (
                        lines,
                        api::import_keys(
                            State(state.clone()),
                            du.user.clone(),
                            AppJson(ImportRequest { keys: rows }),
                        )
                        .await,
                    ),
                    Parsed::Lines(items, lines) => (
                        lines,
                        api::batch_import_keys(
                            State(state.clone()),
                            du.user.clone(),
                            AppJson(BatchImportRequest {
                                client_type: Some(client_type),
                                keys: items,
                            }),
                        )
                        .await,
                    ),
                };
                let line_of = |i: usize| lines.get(i).copied().unwrap_or(i + 1);
                match outcome {
                    Ok((_, report)) => {
                        let rows: Vec<ReportRow> = report
                            .0
                            .results
                            .iter()
                            .map(|r| ReportRow {
                                line: line_of(r.index),
                                identifier: r.identifier.clone(),
                                outcome: r.status.to_owned(),
                                ok: true,
                            })
                            .collect();
                        let (rows, more) = report_rows(rows);
                        Some(ImportResult {
                            ok: true,
                            summary: format!("Imported {} keys.", report.0.imported),
                            rows,
                            more,
                        })
                    }
                    Err(ApiError::UnprocessableRows { detail, errors }) => {
                        let rows: Vec<ReportRow> = errors
                            .as_array()
                            .map(Vec::as_slice)
                            .unwrap_or_default()
                            .iter()
                            .map(|e| {
                                let idx = e["index"].as_u64().unwrap_or(0) as usize;
                                let detail = e["detail"].as_str().unwrap_or("invalid").to_owned();
                                ReportRow {
                                    line: line_of(idx),
                                    identifier: e["identifier"].as_str().unwrap_or("").to_owned(),
                                    // "keys[3].raw_key: must be ..." → "raw_key: must be ..."
                                    outcome: detail
                                        .split_once("].")
                                        .map_or(detail.clone(), |(_, r)| r.to_owned()),
                                    ok: false,
                                }
                            })
                            .collect();
                        let (rows, more) = report_rows(rows);
                        Some(ImportResult {
                            ok: false,
                            summary: detail,
                            rows,
                            more,
                        })
                    }
                    Err(e) => match FieldErrors::from_api(&e, &[]) {
                        Some(fe) => {
                            errors.add("text", fe.general.unwrap_or_default());
                            None
                        }
                        None => return Err(e.into()),
                    },
                }
            }
        }
    };
    let status = match &result {
        Some(r) if r.ok => StatusCode::OK,
        _ => StatusCode::UNPROCESSABLE_ENTITY,
    };
    let keep = ImportForm {
        // Keep the text for corrections, unless it was imported.
        text: if result.as_ref().is_some_and(|r| r.ok) {
            String::new()
        } else {
            f.text
        },
        client_type: f.client_type,
    };
    let forms = (CreateForm::default(), FieldErrors::new(), keep, errors);
    list_page(&state, &du, KeysQuery::default(), forms, result, status).await
}

#[derive(Debug, Deserialize)]
pub(crate) struct ExportForm {
    include_raw: Option<String>,
}

/// `POST /keys/export`: CSV download (raw keys only when asked for).
pub(crate) async fn export(
    State(state): State<AppState>,
    du: DashUser,
    Form(f): Form<ExportForm>,
) -> PageResult {
    let q = ExportQuery {
        include_raw: Some(f.include_raw.is_some()),
    };
    Ok(api::export_keys(State(state), du.user, AppQuery(q)).await?)
}

// ---- one key ----

#[derive(Debug, Default, Deserialize)]
pub(crate) struct EditForm {
    #[serde(default)]
    alias: String,
    #[serde(default)]
    tags: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    client_config: String,
}

#[derive(Template)]
#[template(path = "key.html")]
struct KeyPage {
    ctx: Ctx,
    key: KeyRow,
    id_seg: String,
    description: String,
    created_at: String,
    updated_at: String,
    edit: EditForm,
    errors: FieldErrors,
}

fn edit_form_of(k: &KeyOut) -> EditForm {
    EditForm {
        alias: k.alias.clone().unwrap_or_default(),
        tags: k.tags.join(", "),
        description: k.description.clone().unwrap_or_default(),
        client_config: if k.client_config.is_null() {
            String::new()
        } else {
            serde_json::to_string_pretty(&k.client_config).unwrap_or_default()
        },
    }
}

async fn key_page(
    state: &AppState,
    du: &DashUser,
    identifier: &str,
    edit: Option<EditForm>,
    errors: FieldErrors,
    status: StatusCode,
) -> PageResult {
    let k = api::get_key(
        State(state.clone()),
        du.user.clone(),
        AppPath(identifier.to_owned()),
    )
    .await?
    .0;
    let page = KeyPage {
        ctx: Ctx::new(du, "keys", format!("Key {}", k.identifier)),
        id_seg: seg(&k.identifier),
        description: k.description.clone().unwrap_or_default(),
        created_at: k.created_at.clone(),
        updated_at: k.updated_at.clone(),
        edit: edit.unwrap_or_else(|| edit_form_of(&k)),
        key: KeyRow::from(k),
        errors,
    };
    Ok(render_status(status, &page))
}

/// `GET /keys/{identifier}`.
pub(crate) async fn detail(
    State(state): State<AppState>,
    du: DashUser,
    Path(identifier): Path<String>,
) -> PageResult {
    key_page(
        &state,
        &du,
        &identifier,
        None,
        FieldErrors::new(),
        StatusCode::OK,
    )
    .await
}

fn back_to(identifier: &str) -> String {
    format!("/keys/{}", seg(identifier))
}

/// `POST /keys/{identifier}/edit`.
pub(crate) async fn edit(
    State(state): State<AppState>,
    du: DashUser,
    Path(identifier): Path<String>,
    Form(f): Form<EditForm>,
) -> PageResult {
    let mut errors = FieldErrors::new();
    let client_config = match non_blank(Some(&f.client_config)) {
        None => Value::Null,
        Some(t) => match serde_json::from_str::<Value>(&t) {
            Ok(v) => v,
            Err(e) => {
                errors.add("client_config", format!("is not valid JSON: {e}"));
                Value::Null
            }
        },
    };
    if errors.is_empty() {
        let body = json!({
            "alias": non_blank(Some(&f.alias)),
            "description": non_blank(Some(&f.description)),
            "tags": split_tags(&f.tags),
            "client_config": client_config,
        });
        let body: UpdateKey = serde_json::from_value(body)
            .map_err(|e| PageError(ApiError::Internal(anyhow::anyhow!("update body: {e}"))))?;
        match api::update_key(
            State(state.clone()),
            du.user.clone(),
            AppPath(identifier.clone()),
            AppJson(body),
        )
        .await
        {
            Ok(_) => {
                return Ok(redirect_with(&back_to(&identifier), "ok", "Changes saved."));
            }
            Err(e) => match FieldErrors::from_api(&e, &CREATE_FIELDS) {
                Some(fe) => errors = fe,
                None => return Err(e.into()),
            },
        }
    }
    key_page(
        &state,
        &du,
        &identifier,
        Some(f),
        errors,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await
}

#[derive(Debug, Deserialize)]
pub(crate) struct ToggleForm {
    #[serde(default)]
    is_active: String,
    back: Option<String>,
}

fn safe_back(back: Option<&str>, fallback: String) -> String {
    match back {
        Some(b) if b.starts_with('/') && !b.starts_with("//") && !b.contains('\\') => b.to_owned(),
        _ => fallback,
    }
}

/// `POST /keys/{identifier}/toggle`: enable or disable.
pub(crate) async fn toggle(
    State(state): State<AppState>,
    du: DashUser,
    Path(identifier): Path<String>,
    Form(f): Form<ToggleForm>,
) -> PageResult {
    let on = f.is_active == "true";
    let body: UpdateKey = serde_json::from_value(json!({ "is_active": on }))
        .map_err(|e| PageError(ApiError::Internal(anyhow::anyhow!("update body: {e}"))))?;
    let _updated = api::update_key(
        State(state),
        du.user,
        AppPath(identifier.clone()),
        AppJson(body),
    )
    .await?;
    let to = safe_back(f.back.as_deref(), back_to(&identifier));
    let verb = if on { "enabled" } else { "disabled" };
    Ok(redirect_with(
        &to,
        "ok",
        &format!("Key '{identifier}' {verb}."),
    ))
}

#[derive(Debug, Deserialize)]
pub(crate) struct RotateForm {
    #[serde(default)]
    new_raw_key: String,
}

/// `POST /keys/{identifier}/rotate`: replace the secret.
pub(crate) async fn rotate(
    State(state): State<AppState>,
    du: DashUser,
    Path(identifier): Path<String>,
    Form(f): Form<RotateForm>,
) -> PageResult {
    let body = RotateKey {
        new_raw_key: SecretString::from(f.new_raw_key.trim().to_owned()),
    };
    match api::rotate_key(
        State(state.clone()),
        du.user.clone(),
        AppPath(identifier.clone()),
        AppJson(body),
    )
    .await
    {
        Ok(_) => Ok(redirect_with(
            &back_to(&identifier),
            "ok",
            "Key rotated: the new secret is in use.",
        )),
        Err(e) => {
            let Some(mut fe) = FieldErrors::from_api(&e, &["new_raw_key"]) else {
                return Err(e.into());
            };
            if let Some(g) = fe.general.take() {
                fe.add("new_raw_key", g);
            }
            key_page(
                &state,
                &du,
                &identifier,
                None,
                fe,
                StatusCode::UNPROCESSABLE_ENTITY,
            )
            .await
        }
    }
}

/// `POST /keys/{identifier}/verify`.
pub(crate) async fn verify(
    State(state): State<AppState>,
    du: DashUser,
    Path(identifier): Path<String>,
) -> PageResult {
    let to = back_to(&identifier);
    match api::verify_key(State(state), du.user, AppPath(identifier)).await {
        Ok(v) => Ok(redirect_with(
            &to,
            if v.verification_status == "valid" {
                "ok"
            } else {
                "error"
            },
            &format!("Verification: {} ({}).", v.verification_status, v.detail),
        )),
        Err(ApiError::Unprocessable(m)) => {
            Ok(redirect_with(&to, "error", &format!("Cannot verify: {m}")))
        }
        Err(e) => Err(e.into()),
    }
}

/// `POST /keys/{identifier}/delete`.
pub(crate) async fn delete(
    State(state): State<AppState>,
    du: DashUser,
    Path(identifier): Path<String>,
) -> PageResult {
    api::delete_key(State(state), du.user, AppPath(identifier.clone())).await?;
    Ok(redirect_with(
        "/keys",
        "ok",
        &format!("Key '{identifier}' deleted."),
    ))
}

#[derive(Debug, Deserialize)]
pub(crate) struct RevealForm {
    confirm: Option<String>,
}

#[derive(Template)]
#[template(path = "reveal.html")]
struct RevealPage {
    ctx: Ctx,
    identifier: String,
    href: String,
    raw_key: String,
}

/// `POST /keys/{identifier}/reveal`: shows the raw key after an explicit confirmation.
pub(crate) async fn reveal(
    State(state): State<AppState>,
    du: DashUser,
    Path(identifier): Path<String>,
    Form(f): Form<RevealForm>,
) -> PageResult {
    if f.confirm.as_deref() != Some("yes") {
        let mut errors = FieldErrors::new();
        errors.add(
            "confirm",
            "tick the box to confirm that you want to see the secret",
        );
        return key_page(
            &state,
            &du,
            &identifier,
            None,
            errors,
            StatusCode::UNPROCESSABLE_ENTITY,
        )
        .await;
    }
    let raw = api::raw_key(
        State(state.clone()),
        du.user.clone(),
        AppPath(identifier.clone()),
    )
    .await?
    .0;
    tracing::info!(user_id = %du.user.id, identifier = %raw.identifier, "raw key revealed in the dashboard");
    let page = RevealPage {
        ctx: Ctx::new(&du, "keys", format!("Key {}", raw.identifier)),
        href: back_to(&raw.identifier),
        identifier: raw.identifier,
        raw_key: raw.raw_key,
    };
    Ok(render(&page).into_response())
}

#[cfg(test)]
mod tests {
    use secrecy::ExposeSecret;

    use super::*;

    #[test]
    fn csv_with_a_header_maps_columns_and_lines() {
        let text = "identifier,raw_key,alias,tags\nk1,secret-1,First,prod;eu\n\nk2,secret-2,,\"[\"\"a\"\"]\"\n";
        let Ok(Parsed::Csv(rows, lines)) = parse_import(text) else {
            panic!("csv expected")
        };
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].identifier, "k1");
        assert_eq!(rows[0].raw_key.expose_secret(), "secret-1");
        assert_eq!(rows[0].alias.as_deref(), Some("First"));
        assert_eq!(
            rows[0].tags.as_deref(),
            Some(&["prod".to_owned(), "eu".to_owned()][..])
        );
        assert_eq!(rows[1].tags.as_deref(), Some(&["a".to_owned()][..]));
        assert_eq!(lines, vec![2, 4]);
    }

    /// Found by the `key_import` fuzz target: rows after a lone "\r" (old Mac line ends) were
    /// reported on the line before.
    #[test]
    fn csv_line_numbers_count_lone_carriage_returns() {
        let text = "identifier,raw_key\nk1,s1\rk2,s2\r\nk3,s3\rk4,s4\n";
        let Ok(Parsed::Csv(rows, lines)) = parse_import(text) else {
            panic!("csv expected")
        };
        assert_eq!(rows.len(), 4);
        assert_eq!(lines, vec![2, 3, 4, 5]);
    }

    #[test]
    fn plain_lines_are_raw_keys_or_pairs() {
        let Ok(Parsed::Lines(items, lines)) = parse_import("raw-one\n\nid2, raw-two, Alias\n")
        else {
            panic!("lines expected")
        };
        assert_eq!(lines, vec![1, 3]);
        assert!(matches!(&items[0], BatchItem::Raw(r) if r.expose_secret() == "raw-one"));
        assert!(
            matches!(&items[1], BatchItem::Key(k) if k.identifier == "id2" && k.alias.as_deref() == Some("Alias"))
        );
    }

    #[test]
    fn bad_client_config_json_names_the_line() {
        let e = parse_import("identifier,raw_key,client_config\nk,v,{oops\n")
            .err()
            .unwrap();
        assert!(e.contains("line 2"), "{e}");
    }
}
