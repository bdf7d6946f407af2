//! [`Api`]: the logged-in client every server command uses. Token renewal is the SDK's
//! [`Session`]; this adds requests with query strings and non-JSON answers, and writes renewed
//! tokens back to the [`Store`].

use crate::failure::{CliResult, Failure};
use crate::store::{Saved, Store, jwt_expiry};
use apipool::sdk::{Session, SessionOptions};
use reqwest::{Method, Response, StatusCode, Url};
use secrecy::ExposeSecret;
use serde_json::Value;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Renew the access token when it has less than this left (a command or a batch then runs on a
/// fresh token; the session renews again by itself when a long batch outlives it).
const RENEW_MARGIN: Duration = Duration::from_secs(60);

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The request timeout of management calls.
const TIMEOUT: Duration = Duration::from_secs(60);

/// A logged-in client (from the saved session).
#[derive(Debug)]
pub(crate) struct Api {
    session: Session,
    store: Store,
    server: String,
    username: String,
    http: reqwest::Client,
    /// `session.refresh_count()` when the tokens were last saved.
    saved_at: AtomicU64,
}

impl Api {
    /// Opens the saved session, renewing the access token first when it is (nearly) expired.
    pub(crate) async fn open(store: &Store) -> CliResult<Self> {
        let lock = store.lock()?;
        let saved = store.load(&lock)?.ok_or_else(|| {
            Failure::auth("not logged in: run `apipool login --server URL --username NAME` first")
        })?;
        let remaining = saved
            .access_expires_at
            .map(|exp| Duration::from_secs(exp.saturating_sub(now_secs())));
        let opts = SessionOptions::new()
            .timeout(TIMEOUT)
            .keep_credentials(false);
        let session = Session::from_tokens(
            &saved.server,
            &saved.access_token,
            &saved.refresh_token,
            remaining,
            opts,
        )?;
        let api = Self {
            session,
            store: store.clone(),
            server: saved.server,
            username: saved.username,
            http: http_client()?,
            saved_at: AtomicU64::new(0),
        };
        if remaining.is_none_or(|r| r < RENEW_MARGIN) {
            api.session.arefresh().await.map_err(|e| match e {
                apipool::sdk::SdkError::Auth { .. } => Failure::auth(
                    "the saved login has expired or was revoked: run `apipool login` again",
                ),
                other => Failure::from(other),
            })?;
            api.write(&lock)?;
        }
        Ok(api)
    }

    /// The SDK session (for proxy requests).
    pub(crate) fn session(&self) -> &Session {
        &self.session
    }

    /// The server URL the session belongs to.
    pub(crate) fn server(&self) -> &str {
        &self.server
    }

    fn write(&self, lock: &crate::store::StoreLock) -> CliResult {
        let access = self.session.access_token();
        let saved = Saved {
            server: self.server.clone(),
            username: self.username.clone(),
            access_expires_at: jwt_expiry(access.expose_secret()),
            access_token: access.expose_secret().to_owned(),
            refresh_token: self.session.refresh_token().expose_secret().to_owned(),
        };
        let count = self.session.refresh_count();
        self.store.save(lock, &saved)?;
        self.saved_at.store(count, Ordering::SeqCst);
        Ok(())
    }

    /// Writes the tokens back when the session renewed them since they were saved (cheap when
    /// it did not; a long batch calls it periodically so a kill never loses a rotated token).
    pub(crate) fn persist(&self) -> CliResult {
        if self.session.refresh_count() == self.saved_at.load(Ordering::SeqCst) {
            return Ok(());
        }
        let lock = self.store.lock()?;
        self.write(&lock)
    }

    fn url(&self, segments: &[&str]) -> Url {
        let mut u = self.session.api_url().clone();
        if let Ok(mut p) = u.path_segments_mut() {
            p.extend(segments);
        }
        u
    }

    /// Sends a request (renewing the token once on a 401) and returns a 2xx answer; any other
    /// status becomes a [`Failure`] with the server's `detail`.
    pub(crate) async fn send(
        &self,
        method: Method,
        segments: &[&str],
        query: &[(&str, String)],
        body: Option<&Value>,
    ) -> CliResult<Response> {
        let url = self.url(segments);
        let build = || {
            let rb = self.http.request(method.clone(), url.clone()).query(query);
            match body {
                Some(b) => rb.json(b),
                None => rb,
            }
        };
        let send = |token: String| async move {
            build()
                .bearer_auth(token)
                .send()
                .await
                .map_err(|e| Failure::error(format!("cannot reach {}: {e}", self.server)))
        };
        let mut resp = send(self.session.access_token().expose_secret().to_owned()).await?;
        if resp.status() == StatusCode::UNAUTHORIZED {
            self.session.arefresh().await.map_err(|_| {
                Failure::auth(
                    "the saved login has expired or was revoked: run `apipool login` again",
                )
            })?;
            resp = send(self.session.access_token().expose_secret().to_owned()).await?;
        }
        if resp.status().is_success() {
            return Ok(resp);
        }
        Err(error_of(resp).await)
    }

    /// A JSON request; an empty answer is `null`.
    pub(crate) async fn json(
        &self,
        method: Method,
        segments: &[&str],
        query: &[(&str, String)],
        body: Option<&Value>,
    ) -> CliResult<Value> {
        let resp = self.send(method, segments, query, body).await?;
        let text = resp
            .text()
            .await
            .map_err(|e| Failure::error(format!("reading the answer: {e}")))?;
        if text.trim().is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&text)
            .map_err(|e| Failure::error(format!("the server's answer is not JSON: {e}")))
    }

    /// `GET` a JSON resource.
    pub(crate) async fn get(
        &self,
        segments: &[&str],
        query: &[(&str, String)],
    ) -> CliResult<Value> {
        self.json(Method::GET, segments, query, None).await
    }

    /// Every item of a paged list (`items`, `total`, `page`, `page_size`).
    pub(crate) async fn all_pages(
        &self,
        segments: &[&str],
        query: &[(&str, String)],
    ) -> CliResult<Vec<Value>> {
        let mut out = Vec::new();
        for page in 1.. {
            let mut q = query.to_vec();
            q.push(("page", page.to_string()));
            q.push(("page_size", "100".to_owned()));
            let v = self.get(segments, &q).await?;
            let items = v["items"].as_array().cloned().unwrap_or_default();
            let total = v["total"].as_u64().unwrap_or(0);
            let n = items.len();
            out.extend(items);
            if n == 0 || out.len() as u64 >= total {
                break;
            }
        }
        Ok(out)
    }
}

fn http_client() -> CliResult<reqwest::Client> {
    reqwest::Client::builder()
        .timeout(TIMEOUT)
        .build()
        .map_err(|e| Failure::error(format!("cannot build the HTTP client: {e}")))
}

/// The server's `{"detail": ...}` as a [`Failure`].
pub(crate) async fn error_of(resp: Response) -> Failure {
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    Failure::from_status(status, &detail_of(&text))
}

/// `detail` of a JSON error body (or the text itself, shortened).
pub(crate) fn detail_of(text: &str) -> String {
    serde_json::from_str::<Value>(text)
        .ok()
        .and_then(|v| {
            v.get("detail")
                .map(|d| d.as_str().map_or_else(|| d.to_string(), str::to_owned))
        })
        .unwrap_or_else(|| text.chars().take(300).collect())
}

/// Logs in and saves the session (nothing is stored when the server refuses).
pub(crate) async fn login(
    store: &Store,
    server: &str,
    username: &str,
    password: &str,
) -> CliResult<Value> {
    let session = Session::alogin_with(
        server,
        username,
        password,
        SessionOptions::new()
            .timeout(TIMEOUT)
            .keep_credentials(false),
    )
    .await
    .map_err(|e| match e {
        apipool::sdk::SdkError::Auth { detail, .. } => Failure::auth(format!(
            "login refused: {detail}; check the username and password (nothing was saved)"
        )),
        other => Failure::from(other),
    })?;
    let lock = store.lock()?;
    let api = Api {
        session,
        store: store.clone(),
        server: server.trim().trim_end_matches('/').to_owned(),
        username: username.to_owned(),
        http: http_client()?,
        saved_at: AtomicU64::new(0),
    };
    api.write(&lock)?;
    drop(lock);
    let me = api.get(&["auth", "me"], &[]).await?;
    api.persist()?;
    Ok(me)
}

/// Revokes the saved login at the server and deletes it locally.
pub(crate) async fn logout(store: &Store) -> CliResult<Option<String>> {
    let lock = store.lock()?;
    let Some(saved) = store.load(&lock)? else {
        return Ok(None);
    };
    let url = Session::from_tokens(
        &saved.server,
        &saved.access_token,
        &saved.refresh_token,
        None,
        SessionOptions::new(),
    )?
    .api_url()
    .clone();
    let mut logout_url = url;
    if let Ok(mut p) = logout_url.path_segments_mut() {
        p.extend(["auth", "logout"]);
    }
    let revoked = reqwest::Client::new()
        .post(logout_url)
        .timeout(TIMEOUT)
        .json(&serde_json::json!({ "refresh_token": saved.refresh_token }))
        .send()
        .await;
    store.delete(&lock)?;
    let warning = match revoked {
        Ok(r) if r.status().is_success() => None,
        Ok(r) => {
            let status = r.status().as_u16();
            Some(format!(
                "the server did not revoke the login (HTTP {status}: {}); the local session was deleted anyway",
                detail_of(&r.text().await.unwrap_or_default())
            ))
        }
        Err(e) => Some(format!(
            "cannot reach {} to revoke the login ({e}); the local session was deleted anyway",
            saved.server
        )),
    };
    Ok(warning)
}
