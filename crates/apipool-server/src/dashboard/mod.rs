//! The web dashboard: server-rendered HTML (askama) with a little plain JavaScript, served by
//! the same binary as the API.
//!
//! Pages: `/login`, `/` (overview), `/keys`, `/keys/{identifier}`, `/pools`, `/pools/{identifier}`,
//! `/users` (admins). Static files come from a fixed set compiled into the binary
//! (`/static/app.css`, `/static/app.js`); no path is ever looked up on disk.
//!
//! Every page calls the same functions as the JSON API (the handlers of [`crate::http`]), so the
//! business rules, validation messages and per-user isolation are the API's. Sessions live in
//! cookies (see [`session`]); the JSON API keeps Bearer tokens and ignores them.

mod forms;
mod keys;
mod overview;
pub(crate) mod pages;
mod pools;
pub(crate) mod session;
mod users;

use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Path};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use crate::http::AppState;

#[doc(hidden)]
pub use keys::fuzz_parse_import;

/// State of the dashboard's middleware.
#[derive(Clone)]
pub(crate) struct Dash {
    pub(crate) state: AppState,
    pub(crate) refresh_cache: Arc<session::RefreshCache>,
}

/// The dashboard's routes, to merge into the application router.
pub fn router(state: &AppState) -> Router<AppState> {
    let dash = Dash {
        state: state.clone(),
        refresh_cache: Arc::new(session::RefreshCache::default()),
    };
    Router::new()
        .route("/login", get(pages::login_page).post(pages::login_submit))
        .route("/logout", post(pages::logout))
        .route("/", get(overview::overview))
        .route("/overview.json", get(overview::overview_json))
        .route("/keys", get(keys::list).post(keys::create))
        .route("/keys/import", post(keys::import))
        .route("/keys/export", post(keys::export))
        .route("/keys/{identifier}", get(keys::detail))
        .route("/keys/{identifier}/edit", post(keys::edit))
        .route("/keys/{identifier}/toggle", post(keys::toggle))
        .route("/keys/{identifier}/rotate", post(keys::rotate))
        .route("/keys/{identifier}/verify", post(keys::verify))
        .route("/keys/{identifier}/delete", post(keys::delete))
        .route("/keys/{identifier}/reveal", post(keys::reveal))
        .route("/pools", get(pools::list).post(pools::create))
        .route("/pools/{identifier}", get(pools::detail))
        .route("/pools/{identifier}/live.json", get(pools::live_json))
        .route("/pools/{identifier}/edit", post(pools::edit))
        .route("/pools/{identifier}/config", post(pools::config))
        .route("/pools/{identifier}/delete", post(pools::delete))
        .route("/pools/{identifier}/members", post(pools::add_members))
        .route(
            "/pools/{identifier}/members/{key}/remove",
            post(pools::remove_member),
        )
        .route(
            "/pools/{identifier}/members/{key}/reset",
            post(pools::reset_key),
        )
        .route("/users", get(users::list).post(users::create))
        .route("/users/{id}/update", post(users::update))
        .route("/static/{file}", get(static_file))
        .layer(middleware::from_fn_with_state(dash, session::middleware))
        .layer(DefaultBodyLimit::max(session::FORM_LIMIT))
        .layer(middleware::map_response(security_headers))
}

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
    connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// Security headers on every dashboard response.
async fn security_headers(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    resp
}

const APP_CSS: &str = include_str!("../../static/app.css");
const APP_JS: &str = include_str!("../../static/app.js");

/// The embedded static files, by exact name only.
fn asset(name: &str) -> Option<(&'static str, &'static str)> {
    match name {
        "app.css" => Some(("text/css; charset=utf-8", APP_CSS)),
        "app.js" => Some(("text/javascript; charset=utf-8", APP_JS)),
        _ => None,
    }
}

async fn static_file(Path(file): Path<String>) -> Response {
    match asset(&file) {
        Some((mime, body)) => (
            [
                (header::CONTENT_TYPE, mime),
                (header::CACHE_CONTROL, "public, max-age=300"),
            ],
            body,
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "no such file").into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_embedded_files_are_served() {
        assert!(asset("app.css").is_some());
        assert!(asset("app.js").is_some());
        for bad in [
            "../Cargo.toml",
            "..%2fCargo.toml",
            "/etc/passwd",
            "app.css/",
            "",
        ] {
            assert!(asset(bad).is_none(), "{bad}");
        }
    }
}
