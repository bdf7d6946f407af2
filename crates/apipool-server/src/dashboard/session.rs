//! Browser sessions of the dashboard.
//!
//! A session reuses the API's token machinery: logging in through the dashboard runs the API's
//! login (throttling included) and keeps the access token (JWT) and the rotating refresh token in
//! two `HttpOnly; SameSite=Strict` cookies. When the access token expires, the middleware rotates
//! the pair with the API's refresh logic; concurrent requests of the same browser that present the
//! same refresh token during a short grace period receive the same new pair instead of tripping
//! the reuse detection (which would revoke the whole login).
//!
//! CSRF: a random session id (`apipool_sid`, HttpOnly) is set on the first visit and renewed at
//! login; the CSRF token is `HMAC(jwt secret, "csrf" || sid)`, written into every form as a hidden
//! `csrf_token` field (or sent by scripts as `X-CSRF-Token`) and checked by the middleware on
//! every POST before any handler runs. The JSON API under `/api/v1` never reads these cookies.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use axum::body::{Body, to_bytes};
use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use tokio::sync::Mutex as AsyncMutex;

use super::Dash;
use super::pages::ErrorPage;
use crate::auth::{TokenError, ct_eq};
use crate::http::auth::{RefreshRequest, TokenResponse};
use crate::http::extractor::{AppJson, AuthUser, authenticate};

/// Cookie with the access token (JWT).
pub(crate) const COOKIE_ACCESS: &str = "apipool_at";
/// Cookie with the refresh token.
pub(crate) const COOKIE_REFRESH: &str = "apipool_rt";
/// Cookie with the random session id the CSRF token is bound to.
pub(crate) const COOKIE_SID: &str = "apipool_sid";
/// Cookie with a one-shot message shown on the next page.
pub(crate) const COOKIE_FLASH: &str = "apipool_flash";
/// Form field carrying the CSRF token.
pub(crate) const CSRF_FIELD: &str = "csrf_token";
/// Header alternative for scripts.
pub(crate) const CSRF_HEADER: &str = "x-csrf-token";
/// Largest form body the middleware reads (bulk imports of 10,000 keys fit).
pub(crate) const FORM_LIMIT: usize = 16 * 1024 * 1024;
/// How long a rotated pair is handed to concurrent requests presenting the old refresh token.
const REFRESH_GRACE: Duration = Duration::from_secs(30);

/// What the middleware learnt about the request, for handlers.
#[derive(Debug, Clone)]
pub(crate) struct SessionInfo {
    /// The logged-in user.
    pub(crate) user: Option<AuthUser>,
    /// The CSRF token of this browser session.
    pub(crate) csrf: String,
    /// A message left by the previous request.
    pub(crate) flash: Option<Flash>,
    /// The refresh token (for logout).
    pub(crate) refresh: Option<SecretString>,
}

/// A one-shot message.
#[derive(Debug, Clone)]
pub(crate) struct Flash {
    /// `ok` or `error`.
    pub(crate) kind: &'static str,
    /// The text.
    pub(crate) text: String,
}

/// Rotated token pairs, keyed by the SHA-256 of the refresh token they replaced.
#[derive(Default)]
pub(crate) struct RefreshCache {
    lock: AsyncMutex<HashMap<String, (Instant, String, String)>>,
}

impl std::fmt::Debug for RefreshCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RefreshCache").finish_non_exhaustive()
    }
}

/// Parses the `Cookie` headers.
pub(crate) fn cookies(headers: &HeaderMap) -> HashMap<String, String> {
    let mut out = HashMap::new();
    for v in headers.get_all(header::COOKIE) {
        let Ok(text) = v.to_str() else { continue };
        for pair in text.split(';') {
            if let Some((k, v)) = pair.trim().split_once('=') {
                out.entry(k.trim().to_owned())
                    .or_insert_with(|| v.trim().to_owned());
            }
        }
    }
    out
}

/// A `Set-Cookie` value (HttpOnly, SameSite=Strict, Path=/). `max_age` 0 deletes the cookie.
pub(crate) fn set_cookie(name: &str, value: &str, max_age: Option<u64>) -> HeaderValue {
    let mut c = format!("{name}={value}; Path=/; HttpOnly; SameSite=Strict");
    if let Some(age) = max_age {
        c.push_str(&format!("; Max-Age={age}"));
    }
    HeaderValue::from_str(&c).unwrap_or_else(|_| HeaderValue::from_static("invalid=1"))
}

/// `Set-Cookie` deleting a cookie.
pub(crate) fn clear_cookie(name: &str) -> HeaderValue {
    set_cookie(name, "", Some(0))
}

/// A new random session id.
pub(crate) fn new_sid() -> String {
    let mut b = [0u8; 24];
    rand::fill(&mut b[..]);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

/// The CSRF token bound to a session id.
pub(crate) fn csrf_token(secret: &[u8], sid: &str) -> String {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret)
        .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length"));
    mac.update(b"apipool/dashboard-csrf/v1:");
    mac.update(sid.as_bytes());
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
}

/// A flash cookie value.
pub(crate) fn flash_cookie(kind: &str, text: &str) -> HeaderValue {
    let v = format!(
        "{kind}.{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(text.as_bytes())
    );
    set_cookie(COOKIE_FLASH, &v, Some(120))
}

fn parse_flash(v: &str) -> Option<Flash> {
    let (kind, text) = v.split_once('.')?;
    let kind = match kind {
        "ok" => "ok",
        _ => "error",
    };
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(text)
        .ok()?;
    let text = String::from_utf8(bytes).ok()?;
    (!text.is_empty()).then_some(Flash {
        kind,
        text: text.chars().take(2000).collect(),
    })
}

/// A redirect (303) that leaves a message for the next page.
pub(crate) fn redirect_with(to: &str, kind: &str, text: &str) -> Response {
    let mut r = Redirect::to(to).into_response();
    r.headers_mut()
        .append(header::SET_COOKIE, flash_cookie(kind, text));
    r
}

fn is_public(path: &str) -> bool {
    path == "/login" || path.starts_with("/static/")
}

fn sha_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

/// Rotates the refresh token with the API's refresh logic, handing the same new pair to
/// concurrent requests that present the same old token.
async fn rotate(dash: &Dash, refresh: &str) -> Option<(String, String)> {
    let key = sha_hex(refresh);
    let mut cache = dash.refresh_cache.lock.lock().await;
    let now = Instant::now();
    cache.retain(|_, (at, _, _)| now.duration_since(*at) < REFRESH_GRACE);
    if let Some((_, a, r)) = cache.get(&key) {
        return Some((a.clone(), r.clone()));
    }
    let body = RefreshRequest {
        refresh_token: SecretString::from(refresh.to_owned()),
    };
    let pair: TokenResponse = crate::http::auth::refresh(State(dash.state.clone()), AppJson(body))
        .await
        .ok()?
        .0;
    cache.insert(
        key,
        (now, pair.access_token.clone(), pair.refresh_token.clone()),
    );
    Some((pair.access_token, pair.refresh_token))
}

/// Resolves the session of every dashboard request, refreshes expired access tokens, enforces
/// login on private pages and checks the CSRF token of every POST.
pub(crate) async fn middleware(State(dash): State<Dash>, req: Request, next: Next) -> Response {
    let (mut parts, body) = req.into_parts();
    let jar = cookies(&parts.headers);
    let mut set: Vec<HeaderValue> = Vec::new();
    let sid = match jar.get(COOKIE_SID).filter(|s| (16..=64).contains(&s.len())) {
        Some(s) => s.clone(),
        None => {
            let s = new_sid();
            set.push(set_cookie(COOKIE_SID, &s, None));
            s
        }
    };
    let csrf = csrf_token(dash.state.vault.jwt_secret(), &sid);

    let mut user = None;
    let mut refresh = jar
        .get(COOKIE_REFRESH)
        .filter(|v| !v.is_empty())
        .map(|v| SecretString::from(v.clone()));
    let access = jar.get(COOKIE_ACCESS).filter(|v| !v.is_empty());
    let mut need_refresh = refresh.is_some();
    if let Some(token) = access {
        match dash.state.tokens.verify(token) {
            Ok(_) => {
                need_refresh = false;
                user = authenticate(token, &dash.state).await.ok();
            }
            Err(TokenError::Expired | TokenError::Invalid) => {}
        }
    }
    if user.is_none() && need_refresh {
        let rt = refresh.as_ref().map(|s| s.expose_secret().to_owned());
        match match rt {
            Some(rt) => rotate(&dash, &rt).await,
            None => None,
        } {
            Some((a, r)) => {
                user = authenticate(&a, &dash.state).await.ok();
                let ttl = dash.state.config.refresh_token_ttl_secs;
                set.push(set_cookie(COOKIE_ACCESS, &a, None));
                set.push(set_cookie(COOKIE_REFRESH, &r, Some(ttl)));
                refresh = Some(SecretString::from(r));
            }
            None => {
                set.push(clear_cookie(COOKIE_ACCESS));
                set.push(clear_cookie(COOKIE_REFRESH));
                refresh = None;
            }
        }
    }

    let path = parts.uri.path().to_owned();
    let mut flash = None;
    if parts.method == Method::GET
        && !path.starts_with("/static/")
        && !path.ends_with(".json")
        && let Some(f) = jar.get(COOKIE_FLASH)
    {
        flash = parse_flash(f);
        set.push(clear_cookie(COOKIE_FLASH));
    }

    let body = if parts.method == Method::POST {
        // Every POST carries the session's CSRF token, in the form or in a header.
        let Ok(bytes) = to_bytes(body, FORM_LIMIT).await else {
            return finish(
                ErrorPage::response(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "The form is too large",
                    "Split the data into smaller parts and send them one by one.",
                ),
                set,
            );
        };
        let sent = parts
            .headers
            .get(CSRF_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .or_else(|| {
                url::form_urlencoded::parse(&bytes)
                    .find(|(k, _)| k == CSRF_FIELD)
                    .map(|(_, v)| v.into_owned())
            });
        if !sent.is_some_and(|t| ct_eq(&t, &csrf)) {
            tracing::warn!(path = %path, "dashboard form refused: missing or wrong CSRF token");
            return finish(
                ErrorPage::response(
                    StatusCode::FORBIDDEN,
                    "Form expired or forged",
                    "This form did not carry a valid security token (CSRF). Reload the page and send it again.",
                ),
                set,
            );
        }
        Body::from(bytes)
    } else {
        body
    };

    if user.is_none() && !is_public(&path) {
        let resp = if path.ends_with(".json") {
            (StatusCode::UNAUTHORIZED, "log in again").into_response()
        } else if parts.method == Method::GET {
            let next = parts
                .uri
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .to_owned();
            let q: String = url::form_urlencoded::Serializer::new(String::new())
                .append_pair("next", &next)
                .finish();
            Redirect::to(&format!("/login?{q}")).into_response()
        } else {
            redirect_with("/login", "error", "Your session ended; log in again.")
        };
        return finish(resp, set);
    }

    parts.extensions.insert(SessionInfo {
        user,
        csrf,
        flash,
        refresh,
    });
    let resp = next.run(Request::from_parts(parts, body)).await;
    finish(resp, set)
}

/// Adds the middleware's cookies, unless the handler set the same cookie itself.
fn finish(mut resp: Response, set: Vec<HeaderValue>) -> Response {
    let own: Vec<String> = resp
        .headers()
        .get_all(header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|v| v.split_once('=').map(|(n, _)| n.to_owned()))
        .collect();
    for c in set {
        let name = c
            .to_str()
            .ok()
            .and_then(|v| v.split_once('='))
            .map(|(n, _)| n.to_owned())
            .unwrap_or_default();
        if !own.contains(&name) {
            resp.headers_mut().append(header::SET_COOKIE, c);
        }
    }
    resp
}

/// The logged-in user of a private page (the middleware already redirected anonymous visitors).
#[derive(Debug, Clone)]
pub(crate) struct DashUser {
    /// The user.
    pub(crate) user: AuthUser,
    /// Session details.
    pub(crate) session: SessionInfo,
}

impl<S: Send + Sync> FromRequestParts<S> for DashUser {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Response> {
        let session = parts
            .extensions
            .get::<SessionInfo>()
            .cloned()
            .ok_or_else(|| Redirect::to("/login").into_response())?;
        let user = session
            .user
            .clone()
            .ok_or_else(|| Redirect::to("/login").into_response())?;
        Ok(Self { user, session })
    }
}

impl<S: Send + Sync> FromRequestParts<S> for SessionInfo {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Response> {
        parts
            .extensions
            .get::<SessionInfo>()
            .cloned()
            .ok_or_else(|| StatusCode::INTERNAL_SERVER_ERROR.into_response())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_parse_and_csrf_is_bound_to_the_sid() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; apipool_sid=abc; b = 2"),
        );
        let c = cookies(&h);
        assert_eq!(c["apipool_sid"], "abc");
        assert_eq!(c["b"], "2");
        let t1 = csrf_token(b"secret", "sid-one");
        assert_eq!(t1, csrf_token(b"secret", "sid-one"));
        assert_ne!(t1, csrf_token(b"secret", "sid-two"));
        assert_ne!(t1, csrf_token(b"other", "sid-one"));
    }

    #[test]
    fn flash_round_trips_and_rejects_garbage() {
        let v = flash_cookie("ok", "Saved <b>x</b>");
        let text = v.to_str().unwrap();
        let value = text
            .strip_prefix("apipool_flash=")
            .unwrap()
            .split(';')
            .next()
            .unwrap();
        let f = parse_flash(value).unwrap();
        assert_eq!(f.kind, "ok");
        assert_eq!(f.text, "Saved <b>x</b>");
        assert!(parse_flash("nonsense").is_none());
        assert_eq!(parse_flash("weird.eA").unwrap().kind, "error");
    }

    #[test]
    fn set_cookie_is_http_only_and_strict() {
        let c = set_cookie("n", "v", Some(5));
        let s = c.to_str().unwrap();
        assert!(s.contains("HttpOnly") && s.contains("SameSite=Strict") && s.contains("Max-Age=5"));
    }
}
