//! Shared page pieces (layout context, error pages) and the login/logout pages.

use std::net::SocketAddr;

use askama::Template;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::{Extension, Form};
use secrecy::SecretString;
use serde::Deserialize;

use super::session::{
    self, COOKIE_ACCESS, COOKIE_REFRESH, COOKIE_SID, DashUser, Flash, SessionInfo, clear_cookie,
    set_cookie,
};
use crate::http::AppState;
use crate::http::auth::{LoginRequest, RefreshRequest};
use crate::http::error::ApiError;
use crate::http::extractor::AppJson;

/// What the layout needs on every page.
#[derive(Debug, Clone)]
pub(crate) struct Ctx {
    /// Logged-in username (empty on the login page).
    pub(crate) username: String,
    /// Show the admin links.
    pub(crate) is_admin: bool,
    /// Logged in.
    pub(crate) logged_in: bool,
    /// CSRF token for forms.
    pub(crate) csrf: String,
    /// One-shot message.
    pub(crate) flash: Option<Flash>,
    /// Active navigation entry.
    pub(crate) nav: &'static str,
    /// Page title.
    pub(crate) title: String,
}

impl Ctx {
    /// Context of a private page.
    pub(crate) fn new(du: &DashUser, nav: &'static str, title: impl Into<String>) -> Self {
        Self {
            username: du.user.username.clone(),
            is_admin: du.user.is_admin(),
            logged_in: true,
            csrf: du.session.csrf.clone(),
            flash: du.session.flash.clone(),
            nav,
            title: title.into(),
        }
    }

    fn anonymous(s: &SessionInfo, title: &str) -> Self {
        Self {
            username: String::new(),
            is_admin: false,
            logged_in: false,
            csrf: s.csrf.clone(),
            flash: s.flash.clone(),
            nav: "",
            title: title.to_owned(),
        }
    }
}

/// Renders a template into a response (500 page if rendering fails).
pub(crate) fn render<T: Template>(t: &T) -> Response {
    render_status(StatusCode::OK, t)
}

/// Renders a template with a status.
pub(crate) fn render_status<T: Template>(status: StatusCode, t: &T) -> Response {
    match t.render() {
        Ok(html) => (status, Html(html)).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "dashboard template failed");
            ErrorPage::response(
                StatusCode::INTERNAL_SERVER_ERROR,
                "Something went wrong",
                "The page could not be shown. The error was logged.",
            )
        }
    }
}

/// A full-page error (403, 404, 500, ...).
#[derive(Template)]
#[template(path = "error.html")]
pub(crate) struct ErrorPage {
    status: u16,
    heading: String,
    message: String,
}

impl ErrorPage {
    /// An error page response.
    pub(crate) fn response(status: StatusCode, heading: &str, message: &str) -> Response {
        let page = Self {
            status: status.as_u16(),
            heading: heading.to_owned(),
            message: message.to_owned(),
        };
        match page.render() {
            Ok(html) => (status, Html(html)).into_response(),
            Err(_) => (status, message.to_owned()).into_response(),
        }
    }
}

/// An error of a page handler, shown as an error page.
#[derive(Debug)]
pub(crate) struct PageError(pub(crate) ApiError);

impl From<ApiError> for PageError {
    fn from(e: ApiError) -> Self {
        Self(e)
    }
}

impl From<sqlx::Error> for PageError {
    fn from(e: sqlx::Error) -> Self {
        Self(ApiError::Database(e))
    }
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        let status = self.0.status();
        match &self.0 {
            ApiError::Unauthorized(_) => Redirect::to("/login").into_response(),
            ApiError::Internal(_) | ApiError::Database(_) | ApiError::Vault(_) => {
                tracing::error!(error = %self.0, "dashboard request failed with an internal error");
                ErrorPage::response(
                    status,
                    "Something went wrong",
                    "The server could not complete this request. The error was logged; try again later.",
                )
            }
            ApiError::NotFound(m) => ErrorPage::response(status, "Not found", m),
            ApiError::Forbidden(m) => ErrorPage::response(status, "Not allowed", m),
            other => ErrorPage::response(status, "Request refused", &other.to_string()),
        }
    }
}

/// Result of a page handler.
pub(crate) type PageResult = Result<Response, PageError>;

// ---- login / logout ----

#[derive(Template)]
#[template(path = "login.html")]
struct LoginPage {
    ctx: Ctx,
    username: String,
    next: String,
    error: Option<String>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct NextQuery {
    next: Option<String>,
}

/// Only same-site relative targets are followed after login.
fn safe_next(next: Option<&str>) -> String {
    match next {
        Some(n) if n.starts_with('/') && !n.starts_with("//") && !n.contains('\\') => n.to_owned(),
        _ => "/".to_owned(),
    }
}

/// `GET /login`.
pub(crate) async fn login_page(
    Extension(s): Extension<SessionInfo>,
    Query(q): Query<NextQuery>,
) -> Response {
    if s.user.is_some() {
        return Redirect::to(&safe_next(q.next.as_deref())).into_response();
    }
    render(&LoginPage {
        ctx: Ctx::anonymous(&s, "Log in"),
        username: String::new(),
        next: safe_next(q.next.as_deref()),
        error: None,
    })
}

#[derive(Deserialize)]
pub(crate) struct LoginForm {
    #[serde(default)]
    username: String,
    #[serde(default)]
    password: String,
    next: Option<String>,
}

/// `POST /login`: the API's login (throttling included); the tokens go into cookies.
pub(crate) async fn login_submit(
    State(state): State<AppState>,
    Extension(s): Extension<SessionInfo>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    Form(f): Form<LoginForm>,
) -> Response {
    let next = safe_next(f.next.as_deref());
    let req = LoginRequest {
        username: f.username.clone(),
        password: SecretString::from(f.password),
    };
    match crate::http::auth::login(State(state.clone()), ConnectInfo(addr), AppJson(req)).await {
        Ok(pair) => {
            let mut r = Redirect::to(&next).into_response();
            let h = r.headers_mut();
            h.append(
                header::SET_COOKIE,
                set_cookie(COOKIE_ACCESS, &pair.access_token, None),
            );
            h.append(
                header::SET_COOKIE,
                set_cookie(
                    COOKIE_REFRESH,
                    &pair.refresh_token,
                    Some(state.config.refresh_token_ttl_secs),
                ),
            );
            // A fresh session id (and so a fresh CSRF token) after login.
            h.append(
                header::SET_COOKIE,
                set_cookie(COOKIE_SID, &session::new_sid(), None),
            );
            r
        }
        Err(e) => {
            let (status, msg) = match &e {
                ApiError::TooManyRequests { retry_after, .. } => (
                    StatusCode::TOO_MANY_REQUESTS,
                    format!(
                        "Too many failed logins. Try again in {} seconds.",
                        retry_after.as_secs().max(1)
                    ),
                ),
                ApiError::Unauthorized(m) => (
                    StatusCode::UNAUTHORIZED,
                    if m.contains("disabled") {
                        "This account is disabled.".to_owned()
                    } else {
                        "Wrong username or password.".to_owned()
                    },
                ),
                ApiError::Unprocessable(m) | ApiError::BadRequest(m) => {
                    (StatusCode::UNPROCESSABLE_ENTITY, m.clone())
                }
                _ => return PageError(e).into_response(),
            };
            render_status(
                status,
                &LoginPage {
                    ctx: Ctx::anonymous(&s, "Log in"),
                    username: f.username,
                    next,
                    error: Some(msg),
                },
            )
        }
    }
}

/// `POST /logout`: revokes the login (the API's logout) and clears the cookies.
pub(crate) async fn logout(
    State(state): State<AppState>,
    Extension(s): Extension<SessionInfo>,
) -> Response {
    if let Some(rt) = s.refresh {
        let _ =
            crate::http::auth::logout(State(state), AppJson(RefreshRequest { refresh_token: rt }))
                .await;
    }
    let mut r = session::redirect_with("/login", "ok", "You are logged out.");
    let h = r.headers_mut();
    h.append(header::SET_COOKIE, clear_cookie(COOKIE_ACCESS));
    h.append(header::SET_COOKIE, clear_cookie(COOKIE_REFRESH));
    h.append(
        header::SET_COOKIE,
        set_cookie(COOKIE_SID, &session::new_sid(), None),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_targets_stay_on_this_site() {
        assert_eq!(safe_next(Some("/pools/a?x=1")), "/pools/a?x=1");
        assert_eq!(safe_next(Some("//evil.example/")), "/");
        assert_eq!(safe_next(Some("https://evil.example/")), "/");
        assert_eq!(safe_next(Some("/\\evil")), "/");
        assert_eq!(safe_next(None), "/");
    }
}
