//! Sends one item: through the server's transparent proxy, or through a local pool of keys from
//! a file (the library's `ApiKeyManager`, which paces, rotates and retries).

use super::input::Item;
use crate::failure::Failure;
use apipool::http::{HttpClassifier, HttpKey};
use apipool::sdk::{RemoteProxy, SdkError};
use apipool::{ApiKeyManager, CallError};
use reqwest::{Response, Url};
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Where items go.
#[derive(Debug, Clone)]
pub(crate) enum Backend {
    /// `/api/v1/proxy/{pool}/http/{path}` of the logged-in server.
    Proxy {
        proxy: RemoteProxy,
        /// Extra attempts on a transport error or a 429/502/503/504 from the server.
        retries: u32,
    },
    /// A local pool.
    Local {
        pool: Arc<ApiKeyManager<HttpKey>>,
        http: reqwest::Client,
        base: Url,
    },
}

/// A finished item: its result line, or a failure that must stop the batch (the session died).
#[derive(Debug)]
pub(crate) enum Done {
    Line { result: Value, ok: bool },
    Fatal(Failure),
}

fn line(
    item: &Item,
    status: Option<u16>,
    body: Result<Value, String>,
    attempts: u32,
    started: Instant,
) -> Done {
    let ok = status.is_some_and(|s| (200..300).contains(&s)) && body.is_ok();
    let latency_ms = (started.elapsed().as_secs_f64() * 1000.0 * 10.0).round() / 10.0;
    let mut result = json!({
        "id": item.id,
        "ok": ok,
        "status": status,
        "attempts": attempts,
        "latency_ms": latency_ms,
    });
    if let Some(o) = result.as_object_mut() {
        match body {
            Ok(b) => o.insert("body".to_owned(), b),
            Err(e) => o.insert("error".to_owned(), Value::String(e)),
        };
    }
    Done::Line { result, ok }
}

/// The body as JSON when it parses, else as text.
async fn read_body(resp: Response) -> Result<(u16, Value), String> {
    let status = resp.status().as_u16();
    let bytes = resp
        .bytes()
        .await
        .map_err(|e| format!("reading the answer: {e}"))?;
    let body = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    Ok((status, body))
}

fn backoff(attempt: u32, resp: Option<&Response>) -> Duration {
    let asked =
        resp.and_then(|r| apipool::http::retry_delay(r.headers(), std::time::SystemTime::now()));
    asked
        .unwrap_or_else(|| Duration::from_millis(250) * 2u32.saturating_pow(attempt.min(5)))
        .min(Duration::from_secs(10))
}

impl Backend {
    pub(crate) async fn run(&self, item: &Item) -> Done {
        let started = Instant::now();
        match self {
            Backend::Proxy { proxy, retries } => {
                let mut attempts = 0;
                loop {
                    attempts += 1;
                    let mut rq = proxy.http(item.method.clone(), &item.path);
                    if !item.query.is_empty() {
                        rq = rq.query(&item.query);
                    }
                    for (k, v) in &item.headers {
                        rq = rq.header(k, v);
                    }
                    if let Some(j) = &item.json {
                        rq = rq.json(j);
                    }
                    match rq.send().await {
                        Ok(resp) => {
                            let s = resp.status().as_u16();
                            if matches!(s, 429 | 502 | 503 | 504) && attempts <= *retries {
                                tokio::time::sleep(backoff(attempts, Some(&resp))).await;
                                continue;
                            }
                            return match read_body(resp).await {
                                Ok((s, b)) => line(item, Some(s), Ok(b), attempts, started),
                                Err(e) => line(item, Some(s), Err(e), attempts, started),
                            };
                        }
                        Err(e @ SdkError::Auth { .. }) => return Done::Fatal(Failure::from(e)),
                        Err(e) if e.is_transient() && attempts <= *retries => {
                            tokio::time::sleep(backoff(attempts, None)).await;
                        }
                        Err(e) => {
                            return line(item, e.status(), Err(e.to_string()), attempts, started);
                        }
                    }
                }
            }
            Backend::Local { pool, http, base } => {
                let url = match join(base, &item.path) {
                    Ok(u) => u,
                    Err(e) => return line(item, None, Err(e), 0, started),
                };
                let attempts = AtomicU32::new(0);
                let r = pool
                    .acall_with(&HttpClassifier::new(), |kc| {
                        attempts.fetch_add(1, Ordering::Relaxed);
                        let mut rb = http.request(item.method.clone(), url.clone());
                        if !item.query.is_empty() {
                            rb = rb.query(&item.query);
                        }
                        for (k, v) in &item.headers {
                            rb = rb.header(k, v);
                        }
                        if let Some(j) = &item.json {
                            rb = rb.json(j);
                        }
                        let rb = kc.client().apply(rb);
                        async move { rb.send().await }
                    })
                    .await;
                let n = attempts.load(Ordering::Relaxed);
                match r {
                    Ok(resp) => {
                        let s = resp.status().as_u16();
                        match read_body(resp).await {
                            Ok((s, b)) => line(item, Some(s), Ok(b), n, started),
                            Err(e) => line(item, Some(s), Err(e), n, started),
                        }
                    }
                    Err(CallError::Failed { error, .. }) => line(
                        item,
                        error.status().map(|s| s.as_u16()),
                        Err(error.to_string()),
                        n,
                        started,
                    ),
                    Err(e) => line(item, None, Err(e.to_string()), n, started),
                }
            }
        }
    }
}

/// `base` + `path`, refusing paths that would leave the base URL.
pub(crate) fn join(base: &Url, path: &str) -> Result<Url, String> {
    let rel = path.trim_start_matches('/');
    if rel.contains("://") || rel.starts_with("//") || rel.split('/').any(|s| s == "..") {
        return Err(format!("path {path:?} must stay under the base URL"));
    }
    let mut b = base.clone();
    if !b.path().ends_with('/') {
        let p = format!("{}/", b.path());
        b.set_path(&p);
    }
    b.join(rel).map_err(|e| format!("path {path:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn joins_under_the_base() {
        let base = Url::parse("http://h:1/api").unwrap();
        assert_eq!(
            join(&base, "/price").unwrap().as_str(),
            "http://h:1/api/price"
        );
        assert_eq!(join(&base, "v1/x").unwrap().as_str(), "http://h:1/api/v1/x");
        assert!(join(&base, "/../secret").is_err());
        // leading slashes are trimmed: the host stays the base's
        assert_eq!(
            join(&base, "//evil.example/x").unwrap().as_str(),
            "http://h:1/api/evil.example/x"
        );
        assert!(join(&base, "http://evil.example/").is_err());
    }
}
