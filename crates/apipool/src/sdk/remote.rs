//! Server mode: [`connect`]/[`async_connect`] give a [`RemotePool`] whose client is a
//! [`RemoteProxy`], a handle that calls the upstream through the server's proxy
//! (`/api/v1/proxy/{pool}/invoke`, `/status`, `/http/...`), so the keys never leave the server.

use super::session::error_from;
use super::{SdkError, Session, blocking};
use crate::config::PoolConfig;
use crate::key::ApiKey;
use crate::manager::ApiKeyManager;
use crate::outcome::{Classifier, Outcome};
use reqwest::{Method, RequestBuilder, Response};
use serde::Serialize;
use serde_json::{Value, json};
use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

/// A handle on a server pool's proxy. Cheap to clone; a failed call leaves it as usable as before
/// (it holds no per-call state, and its session renews tokens by itself).
///
/// ```no_run
/// # async fn run(session: apipool::sdk::Session) -> Result<(), apipool::sdk::SdkError> {
/// use serde_json::json;
/// let proxy = apipool::sdk::RemoteProxy::new(&session, "prices");
/// let data = proxy.ainvoke(&["get"], json!(["/price"]), json!({"params": {"id": "btc"}})).await?;
/// println!("{}", data["status_code"]);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RemoteProxy {
    session: Session,
    pool: Arc<str>,
}

impl fmt::Debug for RemoteProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemoteProxy")
            .field("pool", &self.pool)
            .finish_non_exhaustive()
    }
}

/// What `GET /proxy/{pool}/status` says.
///
/// ```no_run
/// # fn run(p: apipool::sdk::RemoteProxy) -> Result<(), apipool::sdk::SdkError> {
/// let st: apipool::sdk::ProxyStatus = p.status()?;
/// if !st.success { eprintln!("no usable key: {} archived of {}", st.archived_keys, st.total_keys); }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct ProxyStatus {
    /// True when a key is available now.
    pub success: bool,
    /// Keys available now.
    #[serde(default)]
    pub available_keys: u64,
    /// Keys archived.
    #[serde(default)]
    pub archived_keys: u64,
    /// Keys in the pool.
    #[serde(default)]
    pub total_keys: u64,
}

impl RemoteProxy {
    /// A handle on `pool` through `session`. Sends no request.
    ///
    /// ```
    /// # let s = apipool::sdk::Session::from_tokens("http://127.0.0.1:8000", "a", "r", None, Default::default()).unwrap();
    /// let p = apipool::sdk::RemoteProxy::new(&s, "prices");
    /// assert_eq!(p.pool(), "prices");
    /// ```
    pub fn new(session: &Session, pool: &str) -> Self {
        Self {
            session: session.clone(),
            pool: Arc::from(pool),
        }
    }

    /// The pool's identifier.
    ///
    /// ```
    /// # let s = apipool::sdk::Session::from_tokens("http://127.0.0.1:8000", "a", "r", None, Default::default()).unwrap();
    /// assert_eq!(apipool::sdk::RemoteProxy::new(&s, "p").pool(), "p");
    /// ```
    pub fn pool(&self) -> &str {
        &self.pool
    }

    /// Calls `attr_path` (e.g. `["get"]`) with `args` (a JSON array) and `kwargs` (a JSON object)
    /// on the server (`POST /proxy/{pool}/invoke`) and returns the result's `data`.
    /// `success: false` → [`SdkError::Remote`]; no usable key → [`SdkError::Unavailable`] (503).
    ///
    /// ```no_run
    /// # async fn run(p: apipool::sdk::RemoteProxy) -> Result<(), apipool::sdk::SdkError> {
    /// let data = p.ainvoke(&["get"], serde_json::json!([]), serde_json::json!({"url": "/price", "params": {"id": "eth"}})).await?;
    /// # let _ = data; Ok(()) }
    /// ```
    pub async fn ainvoke(
        &self,
        attr_path: &[&str],
        args: Value,
        kwargs: Value,
    ) -> Result<Value, SdkError> {
        let url = self.session.url(&["proxy", &self.pool, "invoke"]);
        let args = match args {
            Value::Null => json!([]),
            Value::Array(_) => args,
            other => json!([other]),
        };
        let kwargs = match kwargs {
            Value::Null => json!({}),
            other => other,
        };
        let body = json!({ "attr_path": attr_path, "args": args, "kwargs": kwargs });
        let resp = self
            .session
            .send(|c| c.post(url.clone()).json(&body))
            .await?;
        let status = resp.status().as_u16();
        if !resp.status().is_success() {
            return Err(error_from(resp).await);
        }
        let v: Value = resp.json().await.map_err(|e| SdkError::Protocol {
            status: Some(status),
            detail: format!(
                "the invoke answer is not JSON: {}",
                super::error::describe(&e)
            ),
        })?;
        match v.get("success").and_then(Value::as_bool) {
            Some(true) => Ok(v.get("data").cloned().unwrap_or(Value::Null)),
            Some(false) => Err(SdkError::Remote {
                status,
                error: v
                    .get("error")
                    .and_then(Value::as_str)
                    .unwrap_or("the server gave no reason")
                    .to_owned(),
                key_identifier: v
                    .get("key_identifier")
                    .and_then(Value::as_str)
                    .map(str::to_owned),
            }),
            None => Err(SdkError::Protocol {
                status: Some(status),
                detail: "the invoke answer has no boolean `success`".to_owned(),
            }),
        }
    }

    /// Sync twin of [`Self::ainvoke`].
    ///
    /// ```no_run
    /// # fn run(p: apipool::sdk::RemoteProxy) -> Result<(), apipool::sdk::SdkError> {
    /// let data = p.invoke(&["get"], serde_json::json!(["/price"]), serde_json::json!({"params": {"id": "btc"}}))?;
    /// # let _ = data; Ok(()) }
    /// ```
    pub fn invoke(
        &self,
        attr_path: &[&str],
        args: Value,
        kwargs: Value,
    ) -> Result<Value, SdkError> {
        let p = self.clone();
        let path: Vec<String> = attr_path.iter().map(|s| (*s).to_owned()).collect();
        blocking::wait(async move {
            let path: Vec<&str> = path.iter().map(String::as_str).collect();
            p.ainvoke(&path, args, kwargs).await
        })
    }

    /// [`Self::ainvoke`] with a dotted path: `acall("a.b.c", ...)` is `ainvoke(&["a","b","c"], ...)`.
    ///
    /// ```no_run
    /// # async fn run(p: apipool::sdk::RemoteProxy) -> Result<(), apipool::sdk::SdkError> {
    /// let data = p.acall("get", serde_json::json!(["/price"]), serde_json::json!({})).await?;
    /// # let _ = data; Ok(()) }
    /// ```
    pub async fn acall(&self, path: &str, args: Value, kwargs: Value) -> Result<Value, SdkError> {
        let parts: Vec<&str> = path.split('.').filter(|s| !s.is_empty()).collect();
        self.ainvoke(&parts, args, kwargs).await
    }

    /// Sync twin of [`Self::acall`].
    ///
    /// ```no_run
    /// # fn run(p: apipool::sdk::RemoteProxy) -> Result<(), apipool::sdk::SdkError> {
    /// let data = p.call("get", serde_json::json!(["/price"]), serde_json::json!({}))?;
    /// # let _ = data; Ok(()) }
    /// ```
    pub fn call(&self, path: &str, args: Value, kwargs: Value) -> Result<Value, SdkError> {
        let parts: Vec<&str> = path.split('.').filter(|s| !s.is_empty()).collect();
        self.invoke(&parts, args, kwargs)
    }

    /// Whether the pool has a usable key (`GET /proxy/{pool}/status`).
    ///
    /// ```no_run
    /// # async fn run(p: apipool::sdk::RemoteProxy) -> Result<(), apipool::sdk::SdkError> {
    /// let st = p.astatus().await?;
    /// println!("{}/{} keys available", st.available_keys, st.total_keys);
    /// # Ok(()) }
    /// ```
    pub async fn astatus(&self) -> Result<ProxyStatus, SdkError> {
        let url = self.session.url(&["proxy", &self.pool, "status"]);
        let resp = self.session.send(|c| c.get(url.clone())).await?;
        let status = resp.status().as_u16();
        if !resp.status().is_success() && status != 503 {
            return Err(error_from(resp).await);
        }
        let v: Value = resp.json().await.map_err(|e| SdkError::Protocol {
            status: Some(status),
            detail: super::error::describe(&e),
        })?;
        let data = v.get("data").cloned().unwrap_or_else(|| json!({}));
        let mut st: ProxyStatus = serde_json::from_value(json!({
            "success": v.get("success").and_then(Value::as_bool).unwrap_or(false),
            "available_keys": data.get("available_keys").cloned().unwrap_or(json!(0)),
            "archived_keys": data.get("archived_keys").cloned().unwrap_or(json!(0)),
            "total_keys": data.get("total_keys").cloned().unwrap_or(json!(0)),
        }))
        .map_err(|e| SdkError::Protocol {
            status: Some(status),
            detail: format!("unexpected status answer: {e}"),
        })?;
        if st.total_keys == 0 {
            st.total_keys = v.get("pool_total").and_then(Value::as_u64).unwrap_or(0);
        }
        Ok(st)
    }

    /// Sync twin of [`Self::astatus`].
    ///
    /// ```no_run
    /// # fn run(p: apipool::sdk::RemoteProxy) -> Result<(), apipool::sdk::SdkError> {
    /// assert!(p.status()?.success);
    /// # Ok(()) }
    /// ```
    pub fn status(&self) -> Result<ProxyStatus, SdkError> {
        let p = self.clone();
        blocking::wait(async move { p.astatus().await })
    }

    /// A request through the transparent HTTP route: `method` on the pool's upstream `path`
    /// (`/api/v1/proxy/{pool}/http/{path}`); the server injects a key and rotates. Build it like a
    /// reqwest request, then [`ProxyRequest::send`].
    ///
    /// ```no_run
    /// # async fn run(p: apipool::sdk::RemoteProxy) -> Result<(), apipool::sdk::SdkError> {
    /// let resp = p.http(reqwest::Method::GET, "/price").query(&[("id", "btc")]).send().await?;
    /// println!("{}", resp.status());
    /// # Ok(()) }
    /// ```
    pub fn http(&self, method: Method, path: &str) -> ProxyRequest {
        let mut segments = vec!["proxy", &*self.pool, "http"];
        segments.extend(path.trim_start_matches('/').split('/'));
        let url = self.session.url(&segments);
        ProxyRequest {
            session: self.session.clone(),
            builder: self.session.http().request(method, url),
        }
    }
}

/// A request through the server's transparent HTTP proxy, built like a reqwest request. Sent
/// with the session's access token; a 401 renews it and resends once (when the body can be
/// resent). The upstream's answer comes back as is, whatever its status.
///
/// ```no_run
/// # async fn run(p: apipool::sdk::RemoteProxy) -> Result<(), apipool::sdk::SdkError> {
/// let resp = p.http(reqwest::Method::POST, "echo/x").json(&serde_json::json!({"a": 1})).send().await?;
/// # let _ = resp; Ok(()) }
/// ```
#[derive(Debug)]
pub struct ProxyRequest {
    session: Session,
    builder: RequestBuilder,
}

impl ProxyRequest {
    /// Adds a header.
    ///
    /// ```no_run
    /// # fn f(p: apipool::sdk::RemoteProxy) { let _ = p.http(reqwest::Method::GET, "x").header("x-trace", "1"); }
    /// ```
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.builder = self.builder.header(name, value);
        self
    }

    /// Adds query parameters.
    ///
    /// ```no_run
    /// # fn f(p: apipool::sdk::RemoteProxy) { let _ = p.http(reqwest::Method::GET, "x").query(&[("a", "1")]); }
    /// ```
    pub fn query<T: Serialize + ?Sized>(mut self, query: &T) -> Self {
        self.builder = self.builder.query(query);
        self
    }

    /// Sends a JSON body.
    ///
    /// ```no_run
    /// # fn f(p: apipool::sdk::RemoteProxy) { let _ = p.http(reqwest::Method::POST, "x").json(&serde_json::json!({})); }
    /// ```
    pub fn json<T: Serialize + ?Sized>(mut self, body: &T) -> Self {
        self.builder = self.builder.json(body);
        self
    }

    /// Sends a raw body.
    ///
    /// ```no_run
    /// # fn f(p: apipool::sdk::RemoteProxy) { let _ = p.http(reqwest::Method::PUT, "x").body("raw"); }
    /// ```
    pub fn body(mut self, body: impl Into<reqwest::Body>) -> Self {
        self.builder = self.builder.body(body);
        self
    }

    /// Any other reqwest option (timeout, form, ...).
    ///
    /// ```no_run
    /// # fn f(p: apipool::sdk::RemoteProxy) { let _ = p.http(reqwest::Method::GET, "x").with(|b| b.timeout(std::time::Duration::from_secs(3))); }
    /// ```
    pub fn with(mut self, f: impl FnOnce(RequestBuilder) -> RequestBuilder) -> Self {
        self.builder = f(self.builder);
        self
    }

    /// Sends the request and returns the upstream's answer (whatever its status). Errors only
    /// for transport failures and when the server itself refuses (401 after a renewal).
    ///
    /// ```no_run
    /// # async fn run(p: apipool::sdk::RemoteProxy) -> Result<(), apipool::sdk::SdkError> {
    /// let body = p.http(reqwest::Method::GET, "price").send().await?.text().await.unwrap_or_default();
    /// # let _ = body; Ok(()) }
    /// ```
    pub async fn send(self) -> Result<Response, SdkError> {
        let template = self.builder;
        if template.try_clone().is_some() {
            return self
                .session
                .send(|_| {
                    template
                        .try_clone()
                        .expect("checked: the request can be cloned")
                })
                .await;
        }
        // A streaming body cannot be resent: one attempt, with a token renewed first when due.
        self.session.send_once(template).await
    }
}

/// The one "key" of a [`RemotePool`]: the server does the pooling, so locally there is a single
/// slot whose client is the [`RemoteProxy`]. It is never banned or archived.
///
/// ```
/// # let s = apipool::sdk::Session::from_tokens("http://127.0.0.1:8000", "a", "r", None, Default::default()).unwrap();
/// let remote = apipool::sdk::connect(&s, "prices").unwrap();
/// let slots = remote.keys();
/// assert_eq!(slots[0].identifier(), "remote:prices");
/// ```
#[derive(Debug, Clone)]
pub struct RemoteSlot {
    proxy: RemoteProxy,
    pk: String,
}

impl ApiKey for RemoteSlot {
    type Client = RemoteProxy;

    fn primary_key(&self) -> &str {
        &self.pk
    }

    fn identifier(&self) -> String {
        self.pk.clone()
    }

    fn create_client(&self) -> RemoteProxy {
        self.proxy.clone()
    }
}

/// Classifies proxied results for the local slot: every answer is a success or "not key
/// related", because the server already rotated and retried its keys. So a failed call never
/// cools, bans or archives the slot.
///
/// ```
/// use apipool::{Classifier, Outcome};
/// use apipool::sdk::{RemoteClassifier, SdkError};
/// let r: Result<(), SdkError> = Err(SdkError::from_status(503, "no key".into(), None));
/// assert_eq!(RemoteClassifier.classify(&r), Outcome::NotKeyRelated);
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct RemoteClassifier;

impl<T> Classifier<T, SdkError> for RemoteClassifier {
    fn classify(&self, result: &Result<T, SdkError>) -> Outcome {
        match result {
            Ok(_) => Outcome::Success,
            Err(_) => Outcome::NotKeyRelated,
        }
    }
}

/// The manager [`connect`] returns: an [`ApiKeyManager`] of one [`RemoteSlot`] (so
/// `call_concurrent`, `batch_exec` and their async twins work as on a local pool), plus the
/// proxy handle itself.
///
/// ```no_run
/// # fn run(session: apipool::sdk::Session) -> Result<(), Box<dyn std::error::Error>> {
/// use apipool::BatchOptions;
/// use serde_json::json;
/// let remote = apipool::sdk::connect(&session, "prices")?;
/// let ids = ["btc", "eth", "sol"];
/// let prices = remote.call_concurrent(&ids, |proxy, id| {
///     proxy.invoke(&["get"], json!(["/price"]), json!({"params": {"id": id}}))
/// }, BatchOptions::new().concurrency(3))?;
/// assert_eq!(prices.len(), 3);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct RemotePool {
    proxy: RemoteProxy,
    pool: ApiKeyManager<RemoteSlot>,
}

impl RemotePool {
    /// The proxy handle (the seed's `dummyclient`).
    ///
    /// ```no_run
    /// # async fn run(r: apipool::sdk::RemotePool) -> Result<(), apipool::sdk::SdkError> {
    /// let data = r.client().acall("get", serde_json::json!(["/price"]), serde_json::json!({})).await?;
    /// # let _ = data; Ok(()) }
    /// ```
    pub fn client(&self) -> &RemoteProxy {
        &self.proxy
    }

    /// The local one-slot manager.
    ///
    /// ```no_run
    /// # fn f(r: apipool::sdk::RemotePool) { assert_eq!(r.manager().pool_size(), 1); }
    /// ```
    pub fn manager(&self) -> &ApiKeyManager<RemoteSlot> {
        &self.pool
    }

    /// Shortcut for `client().invoke(...)`.
    ///
    /// ```no_run
    /// # fn run(r: apipool::sdk::RemotePool) -> Result<(), apipool::sdk::SdkError> {
    /// let data = r.invoke(&["get"], serde_json::json!(["/price"]), serde_json::json!({}))?;
    /// # let _ = data; Ok(()) }
    /// ```
    pub fn invoke(
        &self,
        attr_path: &[&str],
        args: Value,
        kwargs: Value,
    ) -> Result<Value, SdkError> {
        self.proxy.invoke(attr_path, args, kwargs)
    }

    /// Shortcut for `client().ainvoke(...)`.
    ///
    /// ```no_run
    /// # async fn run(r: apipool::sdk::RemotePool) -> Result<(), apipool::sdk::SdkError> {
    /// let data = r.ainvoke(&["get"], serde_json::json!(["/price"]), serde_json::json!({})).await?;
    /// # let _ = data; Ok(()) }
    /// ```
    pub async fn ainvoke(
        &self,
        attr_path: &[&str],
        args: Value,
        kwargs: Value,
    ) -> Result<Value, SdkError> {
        self.proxy.ainvoke(attr_path, args, kwargs).await
    }
}

impl Deref for RemotePool {
    type Target = ApiKeyManager<RemoteSlot>;
    fn deref(&self) -> &ApiKeyManager<RemoteSlot> {
        &self.pool
    }
}

/// The seed's `connect`: a manager for a server pool whose client is a [`RemoteProxy`]. Sends no
/// request; the first call does.
///
/// ```no_run
/// # fn run() -> Result<(), apipool::sdk::SdkError> {
/// let session = apipool::sdk::login("http://127.0.0.1:8000", "alice", "pw-of-alice")?;
/// let remote = apipool::sdk::connect(&session, "prices")?;
/// let data = remote.invoke(&["get"], serde_json::json!(["/price"]), serde_json::json!({"params": {"id": "btc"}}))?;
/// # let _ = data; Ok(()) }
/// ```
pub fn connect(session: &Session, pool: &str) -> Result<RemotePool, SdkError> {
    if pool.trim().is_empty() {
        return Err(SdkError::InvalidArgument(
            "the pool identifier is empty".to_owned(),
        ));
    }
    let proxy = RemoteProxy::new(session, pool);
    let slot = RemoteSlot {
        proxy: proxy.clone(),
        pk: format!("remote:{pool}"),
    };
    let config = PoolConfig {
        // The server paces and retries; the local slot must never be banned.
        ban_threshold: u32::MAX,
        ..PoolConfig::default()
    };
    let pool = ApiKeyManager::builder()
        .keys([slot])
        .config(config)
        .learn_limits(false, None)
        // The server records every proxied call; the local slot keeps no statistics of its own.
        .no_stats()
        .name(pool)
        .build()?;
    Ok(RemotePool { proxy, pool })
}

/// Async twin of [`connect`] (`async_connect` in the seed). Sends no request either.
///
/// ```no_run
/// # async fn run(session: apipool::sdk::Session) -> Result<(), apipool::sdk::SdkError> {
/// let remote = apipool::sdk::async_connect(&session, "prices").await?;
/// let data = remote.ainvoke(&["get"], serde_json::json!(["/price"]), serde_json::json!({})).await?;
/// # let _ = data; Ok(()) }
/// ```
pub async fn async_connect(session: &Session, pool: &str) -> Result<RemotePool, SdkError> {
    connect(session, pool)
}
