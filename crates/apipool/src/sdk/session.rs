//! [`Session`]: a login to apipool-server that keeps its access token fresh.

use super::SdkError;
use super::blocking;
use super::error::describe;
use super::types::{RawKeysBody, RemoteConfig, RemoteKey, TokenBody};
use crate::clock::{Clock, SystemClock};
use parking_lot::RwLock;
use reqwest::{Method, RequestBuilder, Response, StatusCode, Url};
use secrecy::{ExposeSecret, SecretString};
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Options of a [`Session`].
///
/// ```
/// use apipool::sdk::SessionOptions;
/// use std::time::Duration;
/// let opts = SessionOptions::new().timeout(Duration::from_secs(10)).refresh_margin(Duration::from_secs(30));
/// # let _ = opts;
/// ```
#[derive(Clone)]
pub struct SessionOptions {
    clock: Arc<dyn Clock>,
    timeout: Duration,
    refresh_margin: Option<Duration>,
    keep_credentials: bool,
    client: Option<reqwest::Client>,
}

impl fmt::Debug for SessionOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionOptions")
            .field("timeout", &self.timeout)
            .field("refresh_margin", &self.refresh_margin)
            .field("keep_credentials", &self.keep_credentials)
            .finish_non_exhaustive()
    }
}

impl Default for SessionOptions {
    fn default() -> Self {
        Self {
            clock: Arc::new(SystemClock),
            timeout: Duration::from_secs(30),
            refresh_margin: None,
            keep_credentials: true,
            client: None,
        }
    }
}

impl SessionOptions {
    /// Defaults: system clock, 30 s request timeout, automatic refresh margin, credentials kept.
    ///
    /// ```
    /// let _ = apipool::sdk::SessionOptions::new();
    /// ```
    pub fn new() -> Self {
        Self::default()
    }

    /// The time source that decides when the access token is due (a [`crate::ManualClock`] in
    /// tests).
    ///
    /// ```
    /// let _ = apipool::sdk::SessionOptions::new().clock(apipool::ManualClock::new());
    /// ```
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// Timeout of each request to the server (default 30 s).
    ///
    /// ```
    /// let _ = apipool::sdk::SessionOptions::new().timeout(std::time::Duration::from_secs(5));
    /// ```
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Refresh the access token this long before it expires (default: a fifth of its lifetime,
    /// between 1 s and 60 s).
    ///
    /// ```
    /// let _ = apipool::sdk::SessionOptions::new().refresh_margin(std::time::Duration::from_secs(20));
    /// ```
    pub fn refresh_margin(mut self, margin: Duration) -> Self {
        self.refresh_margin = Some(margin);
        self
    }

    /// Keep the password (as a `SecretString`) to log in again when the refresh token itself is
    /// refused or expired (default true). Without it such a session fails with [`SdkError::Auth`].
    ///
    /// ```
    /// let _ = apipool::sdk::SessionOptions::new().keep_credentials(false);
    /// ```
    pub fn keep_credentials(mut self, keep: bool) -> Self {
        self.keep_credentials = keep;
        self
    }

    /// Use this reqwest client (proxies, TLS roots, ...) instead of a default one.
    ///
    /// ```
    /// let _ = apipool::sdk::SessionOptions::new().http_client(reqwest::Client::new());
    /// ```
    pub fn http_client(mut self, client: reqwest::Client) -> Self {
        self.client = Some(client);
        self
    }
}

struct Tokens {
    access: SecretString,
    refresh: SecretString,
    /// When to refresh before use; `None` when the server did not say how long tokens live.
    refresh_at: Option<Instant>,
    /// When the access token expires, when known.
    expires_at: Option<Instant>,
    generation: u64,
}

struct Inner {
    api: Url,
    http: reqwest::Client,
    clock: Arc<dyn Clock>,
    margin: Option<Duration>,
    tokens: RwLock<Tokens>,
    refresh_lock: tokio::sync::Mutex<()>,
    credentials: Option<(String, SecretString)>,
    refreshes: AtomicU64,
}

/// A login to apipool-server. Cheap to clone; clones share the tokens.
///
/// Every request carries the access token. The session refreshes it (`POST /auth/refresh`,
/// storing the rotated refresh token) shortly before it expires and once more when the server
/// answers 401; concurrent callers share one refresh. When the refresh token itself is refused
/// it logs in again with the kept credentials (see [`SessionOptions::keep_credentials`]).
///
/// ```no_run
/// # async fn run() -> Result<(), apipool::sdk::SdkError> {
/// let session = apipool::sdk::Session::alogin("http://127.0.0.1:8000", "alice", "pw-of-alice").await?;
/// let keys = session.aget_keys("prices").await?;
/// println!("{} keys", keys.len());
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Session {
    inner: Arc<Inner>,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("server", &self.inner.api.as_str())
            .field("refreshes", &self.refresh_count())
            .finish_non_exhaustive()
    }
}

/// `http://host:port`, `http://host:port/` and `http://host:port/api/v1` all name the same server.
pub(crate) fn api_base(url: &str) -> Result<Url, SdkError> {
    let trimmed = url.trim().trim_end_matches('/');
    let trimmed = trimmed.strip_suffix("/api/v1").unwrap_or(trimmed);
    let mut u = Url::parse(trimmed)
        .map_err(|e| SdkError::InvalidArgument(format!("server URL {trimmed:?}: {e}")))?;
    if !matches!(u.scheme(), "http" | "https") || u.cannot_be_a_base() {
        return Err(SdkError::InvalidArgument(format!(
            "server URL {trimmed:?} must be http:// or https://"
        )));
    }
    u.set_query(None);
    u.set_fragment(None);
    u.path_segments_mut()
        .map_err(|()| SdkError::InvalidArgument(format!("server URL {trimmed:?}")))?
        .pop_if_empty()
        .extend(["api", "v1"]);
    Ok(u)
}

/// Reads a non-2xx answer into the typed error (`detail` from the JSON body when present).
pub(crate) async fn error_from(resp: Response) -> SdkError {
    let status = resp.status().as_u16();
    let retry_after = resp
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| crate::http::parse_retry_after(v, std::time::SystemTime::now()));
    let text = resp.text().await.unwrap_or_default();
    let detail = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| {
            v.get("detail")
                .or_else(|| v.get("error"))
                .map(|d| d.as_str().map_or_else(|| d.to_string(), str::to_owned))
        })
        .unwrap_or_else(|| text.chars().take(300).collect());
    SdkError::from_status(status, detail, retry_after)
}

impl Session {
    /// Logs in (`POST /auth/login`) with default options.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), apipool::sdk::SdkError> {
    /// let s = apipool::sdk::Session::alogin("http://127.0.0.1:8000", "alice", "pw-of-alice").await?;
    /// # let _ = s; Ok(()) }
    /// ```
    pub async fn alogin(url: &str, username: &str, password: &str) -> Result<Self, SdkError> {
        Self::alogin_with(url, username, password, SessionOptions::default()).await
    }

    /// Logs in with options.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), apipool::sdk::SdkError> {
    /// use apipool::sdk::{Session, SessionOptions};
    /// let opts = SessionOptions::new().timeout(std::time::Duration::from_secs(5));
    /// let s = Session::alogin_with("http://127.0.0.1:8000", "alice", "pw-of-alice", opts).await?;
    /// # let _ = s; Ok(()) }
    /// ```
    pub async fn alogin_with(
        url: &str,
        username: &str,
        password: &str,
        opts: SessionOptions,
    ) -> Result<Self, SdkError> {
        let api = api_base(url)?;
        let http = build_client(&opts)?;
        let password = SecretString::from(password.to_owned());
        let issued = opts.clock.now();
        let body = post_tokens(&http, &api, "login", &login_body(username, &password)).await?;
        let credentials = opts
            .keep_credentials
            .then(|| (username.to_owned(), password));
        Ok(Self::from_parts(api, http, opts, body, issued, credentials))
    }

    /// Sync twin of [`Self::alogin`]. Safe to call from sync code and from inside a tokio runtime.
    ///
    /// ```no_run
    /// let s = apipool::sdk::Session::login("http://127.0.0.1:8000", "alice", "pw-of-alice")?;
    /// # Ok::<(), apipool::sdk::SdkError>(())
    /// ```
    pub fn login(url: &str, username: &str, password: &str) -> Result<Self, SdkError> {
        Self::login_with(url, username, password, SessionOptions::default())
    }

    /// Sync twin of [`Self::alogin_with`].
    ///
    /// ```no_run
    /// let s = apipool::sdk::Session::login_with("http://127.0.0.1:8000", "alice", "pw-of-alice",
    ///     apipool::sdk::SessionOptions::new())?;
    /// # Ok::<(), apipool::sdk::SdkError>(())
    /// ```
    pub fn login_with(
        url: &str,
        username: &str,
        password: &str,
        opts: SessionOptions,
    ) -> Result<Self, SdkError> {
        let (url, username, password) = (url.to_owned(), username.to_owned(), password.to_owned());
        blocking::wait(async move { Self::alogin_with(&url, &username, &password, opts).await })
    }

    /// A session from tokens obtained elsewhere (e.g. stored between runs). `expires_in` is the
    /// access token's remaining lifetime, when known. Such a session cannot log in again when its
    /// refresh token is refused.
    ///
    /// ```
    /// use apipool::sdk::{Session, SessionOptions};
    /// let s = Session::from_tokens("http://127.0.0.1:8000", "access-jwt", "refresh-token",
    ///     Some(std::time::Duration::from_secs(900)), SessionOptions::new()).unwrap();
    /// assert_eq!(s.refresh_count(), 0);
    /// ```
    pub fn from_tokens(
        url: &str,
        access_token: &str,
        refresh_token: &str,
        expires_in: Option<Duration>,
        opts: SessionOptions,
    ) -> Result<Self, SdkError> {
        let api = api_base(url)?;
        let http = build_client(&opts)?;
        let issued = opts.clock.now();
        let body = TokenBody {
            access_token: SecretString::from(access_token.to_owned()),
            refresh_token: SecretString::from(refresh_token.to_owned()),
            expires_in: expires_in.map(|d| d.as_secs()),
        };
        Ok(Self::from_parts(api, http, opts, body, issued, None))
    }

    fn from_parts(
        api: Url,
        http: reqwest::Client,
        opts: SessionOptions,
        body: TokenBody,
        issued: Instant,
        credentials: Option<(String, SecretString)>,
    ) -> Self {
        let refresh_at = refresh_at(issued, body.expires_in, opts.refresh_margin);
        let expires_at = body.expires_in.map(|s| issued + Duration::from_secs(s));
        Self {
            inner: Arc::new(Inner {
                api,
                http,
                clock: opts.clock,
                margin: opts.refresh_margin,
                tokens: RwLock::new(Tokens {
                    access: body.access_token,
                    refresh: body.refresh_token,
                    refresh_at,
                    expires_at,
                    generation: 0,
                }),
                refresh_lock: tokio::sync::Mutex::new(()),
                credentials,
                refreshes: AtomicU64::new(0),
            }),
        }
    }

    /// The server's API base (`.../api/v1`).
    ///
    /// ```
    /// # let s = apipool::sdk::Session::from_tokens("http://127.0.0.1:8000/", "a", "r", None, Default::default()).unwrap();
    /// assert_eq!(s.api_url().as_str(), "http://127.0.0.1:8000/api/v1");
    /// ```
    pub fn api_url(&self) -> &Url {
        &self.inner.api
    }

    /// How many times the session renewed its tokens (refresh or new login).
    ///
    /// ```
    /// # let s = apipool::sdk::Session::from_tokens("http://127.0.0.1:8000", "a", "r", None, Default::default()).unwrap();
    /// assert_eq!(s.refresh_count(), 0);
    /// ```
    pub fn refresh_count(&self) -> u64 {
        self.inner.refreshes.load(Ordering::SeqCst)
    }

    /// The current refresh token (it changes with every refresh: the server rotates it).
    ///
    /// ```
    /// use secrecy::ExposeSecret;
    /// # let s = apipool::sdk::Session::from_tokens("http://127.0.0.1:8000", "a", "r", None, Default::default()).unwrap();
    /// assert_eq!(s.refresh_token().expose_secret(), "r");
    /// ```
    pub fn refresh_token(&self) -> SecretString {
        self.inner.tokens.read().refresh.clone()
    }

    /// The current access token, without refreshing it.
    ///
    /// ```
    /// use secrecy::ExposeSecret;
    /// # let s = apipool::sdk::Session::from_tokens("http://127.0.0.1:8000", "a", "r", None, Default::default()).unwrap();
    /// assert_eq!(s.access_token().expose_secret(), "a");
    /// ```
    pub fn access_token(&self) -> SecretString {
        self.inner.tokens.read().access.clone()
    }

    /// The HTTP client the session uses (shared with proxy handles made from it).
    pub(crate) fn http(&self) -> &reqwest::Client {
        &self.inner.http
    }

    /// `api/v1` + `segments`, each percent-encoded.
    pub(crate) fn url(&self, segments: &[&str]) -> Url {
        let mut u = self.inner.api.clone();
        if let Ok(mut p) = u.path_segments_mut() {
            p.extend(segments);
        }
        u
    }

    /// A fresh access token: refreshed first when due.
    async fn token(&self) -> Result<(SecretString, u64), SdkError> {
        let now = self.inner.clock.now();
        let (access, generation, due, expired) = {
            let t = self.inner.tokens.read();
            (
                t.access.clone(),
                t.generation,
                t.refresh_at.is_some_and(|at| now >= at),
                t.expires_at.is_some_and(|at| now >= at),
            )
        };
        if !due {
            return Ok((access, generation));
        }
        match self.renew(generation).await {
            // Renewing early failed for a passing reason: the current token still works a while.
            Err(e) if e.is_transient() && !expired => {
                tracing::debug!(server = %self.inner.api, "early token renewal failed, using the current token: {e}");
                Ok((access, generation))
            }
            other => other,
        }
    }

    /// Renews the tokens unless someone already did since `seen` (one refresh for many callers).
    async fn renew(&self, seen: u64) -> Result<(SecretString, u64), SdkError> {
        let _one_at_a_time = self.inner.refresh_lock.lock().await;
        {
            let t = self.inner.tokens.read();
            if t.generation != seen {
                return Ok((t.access.clone(), t.generation));
            }
        }
        let issued = self.inner.clock.now();
        let refresh = self.inner.tokens.read().refresh.clone();
        let body = serde_json::json!({ "refresh_token": refresh.expose_secret() });
        let tokens = match post_tokens(&self.inner.http, &self.inner.api, "refresh", &body).await {
            Ok(t) => t,
            Err(e @ SdkError::Auth { .. }) => {
                let Some((user, password)) = &self.inner.credentials else {
                    return Err(e);
                };
                tracing::warn!(
                    server = %self.inner.api,
                    "the refresh token was refused ({e}); logging in again"
                );
                post_tokens(
                    &self.inner.http,
                    &self.inner.api,
                    "login",
                    &login_body(user, password),
                )
                .await?
            }
            Err(e) => return Err(e),
        };
        let mut t = self.inner.tokens.write();
        t.refresh_at = refresh_at(issued, tokens.expires_in, self.inner.margin);
        t.expires_at = tokens.expires_in.map(|s| issued + Duration::from_secs(s));
        t.access = tokens.access_token;
        t.refresh = tokens.refresh_token;
        t.generation += 1;
        self.inner.refreshes.fetch_add(1, Ordering::SeqCst);
        tracing::debug!(server = %self.inner.api, generation = t.generation, "tokens renewed");
        Ok((t.access.clone(), t.generation))
    }

    /// Renews the tokens now (`POST /auth/refresh`), whether due or not.
    ///
    /// ```no_run
    /// # async fn run(s: apipool::sdk::Session) -> Result<(), apipool::sdk::SdkError> {
    /// s.arefresh().await?;
    /// # Ok(()) }
    /// ```
    pub async fn arefresh(&self) -> Result<(), SdkError> {
        let seen = self.inner.tokens.read().generation;
        self.renew(seen).await.map(|_| ())
    }

    /// Sends an authenticated request built by `build` (called again for the retry after a 401)
    /// and returns the answer, whatever its status.
    pub(crate) async fn send(
        &self,
        build: impl Fn(&reqwest::Client) -> RequestBuilder,
    ) -> Result<Response, SdkError> {
        let (token, generation) = self.token().await?;
        let resp = build(&self.inner.http)
            .bearer_auth(token.expose_secret())
            .send()
            .await
            .map_err(|e| SdkError::transport(&e))?;
        if resp.status() != StatusCode::UNAUTHORIZED {
            return Ok(resp);
        }
        let (token, _) = self.renew(generation).await?;
        build(&self.inner.http)
            .bearer_auth(token.expose_secret())
            .send()
            .await
            .map_err(|e| SdkError::transport(&e))
    }

    /// Sends a request once (no resend on 401: its body may not be replayable).
    pub(crate) async fn send_once(&self, rb: RequestBuilder) -> Result<Response, SdkError> {
        let (token, _) = self.token().await?;
        rb.bearer_auth(token.expose_secret())
            .send()
            .await
            .map_err(|e| SdkError::transport(&e))
    }

    /// Sends an authenticated request and reads a JSON answer; non-2xx → typed error.
    pub(crate) async fn send_json(
        &self,
        build: impl Fn(&reqwest::Client) -> RequestBuilder,
    ) -> Result<serde_json::Value, SdkError> {
        let resp = self.send(build).await?;
        if !resp.status().is_success() {
            return Err(error_from(resp).await);
        }
        let status = resp.status().as_u16();
        let text = resp.text().await.map_err(|e| SdkError::transport(&e))?;
        if text.trim().is_empty() {
            return Ok(serde_json::Value::Null);
        }
        serde_json::from_str(&text).map_err(|e| SdkError::Protocol {
            status: Some(status),
            detail: format!("the answer is not JSON: {e}"),
        })
    }

    /// Any authenticated JSON call to the server's API, e.g. `("POST", "keys", Some(body))`.
    /// `path` is relative to `/api/v1`. Non-2xx answers become typed errors.
    ///
    /// ```no_run
    /// # async fn run(s: apipool::sdk::Session) -> Result<(), apipool::sdk::SdkError> {
    /// let me = s.ajson(reqwest::Method::GET, "auth/me", None).await?;
    /// println!("{}", me["username"]);
    /// # Ok(()) }
    /// ```
    pub async fn ajson(
        &self,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<serde_json::Value, SdkError> {
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        let url = self.url(&segments);
        self.send_json(|c| {
            let rb = c.request(method.clone(), url.clone());
            match &body {
                Some(b) => rb.json(b),
                None => rb,
            }
        })
        .await
    }

    /// Sync twin of [`Self::ajson`].
    ///
    /// ```no_run
    /// # fn run(s: apipool::sdk::Session) -> Result<(), apipool::sdk::SdkError> {
    /// let me = s.json(reqwest::Method::GET, "auth/me", None)?;
    /// # let _ = me; Ok(()) }
    /// ```
    pub fn json(
        &self,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<serde_json::Value, SdkError> {
        let (s, path) = (self.clone(), path.to_owned());
        blocking::wait(async move { s.ajson(method, &path, body).await })
    }

    /// The keys of a pool (`GET /keys/raw?pool_identifier=POOL`): active, non-archived members.
    ///
    /// ```no_run
    /// # async fn run(s: apipool::sdk::Session) -> Result<(), apipool::sdk::SdkError> {
    /// for k in s.aget_keys("prices").await? { println!("{} {}", k.identifier, k.masked()); }
    /// # Ok(()) }
    /// ```
    pub async fn aget_keys(&self, pool: &str) -> Result<Vec<RemoteKey>, SdkError> {
        let url = self.url(&["keys", "raw"]);
        let v = self
            .send_json(|c| c.get(url.clone()).query(&[("pool_identifier", pool)]))
            .await?;
        let body: RawKeysBody = serde_json::from_value(v).map_err(|e| SdkError::Protocol {
            status: Some(200),
            detail: format!("unexpected /keys/raw body: {e}"),
        })?;
        Ok(body.keys)
    }

    /// Sync twin of [`Self::aget_keys`].
    ///
    /// ```no_run
    /// # fn run(s: apipool::sdk::Session) -> Result<(), apipool::sdk::SdkError> {
    /// let keys = s.get_keys("prices")?;
    /// # let _ = keys; Ok(()) }
    /// ```
    pub fn get_keys(&self, pool: &str) -> Result<Vec<RemoteKey>, SdkError> {
        let (s, pool) = (self.clone(), pool.to_owned());
        blocking::wait(async move { s.aget_keys(&pool).await })
    }

    /// A pool's configuration (`GET /pools/{pool}/config`).
    ///
    /// ```no_run
    /// # async fn run(s: apipool::sdk::Session) -> Result<(), apipool::sdk::SdkError> {
    /// let cfg = s.aget_config("prices").await?;
    /// println!("{:?} {}", cfg.rotation_strategy, cfg.pool_config.rate_limit);
    /// # Ok(()) }
    /// ```
    pub async fn aget_config(&self, pool: &str) -> Result<RemoteConfig, SdkError> {
        let url = self.url(&["pools", pool, "config"]);
        let v = self.send_json(|c| c.get(url.clone())).await?;
        RemoteConfig::from_json(&v)
    }

    /// Sync twin of [`Self::aget_config`].
    ///
    /// ```no_run
    /// # fn run(s: apipool::sdk::Session) -> Result<(), apipool::sdk::SdkError> {
    /// let cfg = s.get_config("prices")?;
    /// # let _ = cfg; Ok(()) }
    /// ```
    pub fn get_config(&self, pool: &str) -> Result<RemoteConfig, SdkError> {
        let (s, pool) = (self.clone(), pool.to_owned());
        blocking::wait(async move { s.aget_config(&pool).await })
    }
}

fn build_client(opts: &SessionOptions) -> Result<reqwest::Client, SdkError> {
    if let Some(c) = &opts.client {
        return Ok(c.clone());
    }
    reqwest::Client::builder()
        .timeout(opts.timeout)
        .connect_timeout(opts.timeout.min(Duration::from_secs(10)))
        .build()
        .map_err(|e| {
            SdkError::InvalidArgument(format!("cannot build the HTTP client: {}", describe(&e)))
        })
}

fn login_body(username: &str, password: &SecretString) -> serde_json::Value {
    serde_json::json!({ "username": username, "password": password.expose_secret() })
}

fn refresh_at(
    issued: Instant,
    expires_in: Option<u64>,
    margin: Option<Duration>,
) -> Option<Instant> {
    let ttl = Duration::from_secs(expires_in?);
    let margin =
        margin.unwrap_or_else(|| (ttl / 5).clamp(Duration::from_secs(1), Duration::from_secs(60)));
    Some(issued + ttl.saturating_sub(margin))
}

async fn post_tokens(
    http: &reqwest::Client,
    api: &Url,
    action: &str,
    body: &serde_json::Value,
) -> Result<TokenBody, SdkError> {
    let mut url = api.clone();
    if let Ok(mut p) = url.path_segments_mut() {
        p.extend(["auth", action]);
    }
    let resp = http
        .post(url)
        .json(body)
        .send()
        .await
        .map_err(|e| SdkError::transport(&e))?;
    if !resp.status().is_success() {
        return Err(error_from(resp).await);
    }
    let status = resp.status().as_u16();
    resp.json::<TokenBody>()
        .await
        .map_err(|e| SdkError::Protocol {
            status: Some(status),
            detail: format!("unexpected token answer: {}", describe(&e)),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_normalised() {
        for u in [
            "http://127.0.0.1:8000",
            "http://127.0.0.1:8000/",
            "http://127.0.0.1:8000/api/v1",
            " http://127.0.0.1:8000/api/v1/ ",
        ] {
            assert_eq!(
                api_base(u).unwrap().as_str(),
                "http://127.0.0.1:8000/api/v1",
                "{u}"
            );
        }
        assert_eq!(
            api_base("https://h.example/base").unwrap().as_str(),
            "https://h.example/base/api/v1"
        );
        assert!(matches!(
            api_base("ftp://x"),
            Err(SdkError::InvalidArgument(_))
        ));
        assert!(matches!(
            api_base("not a url"),
            Err(SdkError::InvalidArgument(_))
        ));
    }

    #[test]
    fn pool_names_are_percent_encoded() {
        let s = Session::from_tokens("http://127.0.0.1:1", "a", "r", None, SessionOptions::new())
            .unwrap();
        assert_eq!(
            s.url(&["pools", "a/b c", "config"]).as_str(),
            "http://127.0.0.1:1/api/v1/pools/a%2Fb%20c/config"
        );
    }

    #[test]
    fn refresh_is_due_before_expiry() {
        let t0 = Instant::now();
        assert_eq!(refresh_at(t0, None, None), None);
        assert_eq!(
            refresh_at(t0, Some(900), None),
            Some(t0 + Duration::from_secs(840))
        );
        assert_eq!(
            refresh_at(t0, Some(10), None),
            Some(t0 + Duration::from_secs(8))
        );
        assert_eq!(refresh_at(t0, Some(1), None), Some(t0));
        assert_eq!(
            refresh_at(t0, Some(100), Some(Duration::from_secs(5))),
            Some(t0 + Duration::from_secs(95))
        );
    }

    #[test]
    fn debug_shows_no_tokens() {
        let s = Session::from_tokens(
            "http://127.0.0.1:1",
            "access-secret",
            "refresh-secret",
            None,
            SessionOptions::new(),
        )
        .unwrap();
        let d = format!("{s:?}");
        assert!(!d.contains("secret"), "{d}");
    }
}
