//! Helpers of the proxy and stats tests: a mock upstream, keys, pools, proxy calls.

use std::time::Duration;

use mock_upstream::{Config as MockConfig, MockServer};
use reqwest::header::HeaderMap;
use serde_json::{Value, json};

use crate::helpers::TestApp;

/// A mock upstream accepting `keys` (raw values), tweaked by `f`.
pub(crate) async fn mock_with(keys: &[&str], f: impl FnOnce(&mut MockConfig)) -> MockServer {
    let mut cfg = MockConfig::with_keys(keys.iter().copied()).expect("mock keys");
    f(&mut cfg);
    mock_upstream::spawn(cfg).await.expect("mock upstream")
}

/// A mock upstream accepting `keys`, no limits, no latency.
pub(crate) async fn mock(keys: &[&str]) -> MockServer {
    mock_with(keys, |_| {}).await
}

/// Creates a key (optionally with a client_config).
pub(crate) async fn add_key(
    app: &TestApp,
    token: &str,
    identifier: &str,
    raw: &str,
    client_config: Option<Value>,
) {
    let mut body = json!({ "identifier": identifier, "raw_key": raw });
    if let Some(c) = client_config {
        body["client_config"] = c;
    }
    let r = app.post(token, "/keys", body).await;
    assert_eq!(r.status(), 201, "create key {identifier}");
}

/// Creates a pool with members and extra fields (`upstream`, `pool_config`, ...).
pub(crate) async fn make_pool(
    app: &TestApp,
    token: &str,
    identifier: &str,
    keys: &[&str],
    extra: Value,
) -> Value {
    let mut body = json!({ "identifier": identifier, "name": identifier, "key_identifiers": keys });
    if let Value::Object(m) = extra {
        for (k, v) in m {
            body[k] = v;
        }
    }
    let r = app.post(token, "/pools", body).await;
    let status = r.status();
    let v: Value = r.json().await.expect("json");
    assert_eq!(status, 201, "create pool {identifier}: {v}");
    v
}

/// `{"base_url": url, "auth": auth}`.
pub(crate) fn upstream(url: &str, auth: &str) -> Value {
    json!({ "upstream": { "base_url": url, "auth": auth } })
}

/// An answer: status, JSON body (or `{"raw": text}`), headers.
pub(crate) struct Answer {
    pub(crate) status: u16,
    pub(crate) body: Value,
    pub(crate) headers: HeaderMap,
}

pub(crate) async fn answer(r: reqwest::Response) -> Answer {
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let text = r.text().await.expect("body");
    let body = serde_json::from_str(&text).unwrap_or_else(|_| json!({ "raw": text }));
    Answer {
        status,
        body,
        headers,
    }
}

/// `POST /proxy/{pool}/invoke`.
pub(crate) async fn invoke(app: &TestApp, token: &str, pool: &str, body: Value) -> Answer {
    answer(
        app.post(token, &format!("/proxy/{pool}/invoke"), body)
            .await,
    )
    .await
}

/// The SDK's `dummyclient.get(path, params=...)`.
pub(crate) async fn get_via_invoke(
    app: &TestApp,
    token: &str,
    pool: &str,
    path: &str,
    params: Value,
) -> Answer {
    invoke(
        app,
        token,
        pool,
        json!({ "attr_path": ["get"], "args": [path], "kwargs": { "params": params } }),
    )
    .await
}

/// `GET /proxy/{pool}/status` body.
pub(crate) async fn status(app: &TestApp, token: &str, pool: &str) -> Value {
    let r = app.get(token, &format!("/proxy/{pool}/status")).await;
    assert_eq!(r.status(), 200, "status of {pool}");
    r.json().await.expect("json")
}

/// One key's health from a status body.
pub(crate) fn key_health<'a>(status: &'a Value, identifier: &str) -> &'a Value {
    status["data"]["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .find(|k| k["key_identifier"] == identifier)
        .unwrap_or_else(|| panic!("{identifier} not in {status}"))
}

/// Polls `cond` (no fixed sleeps: short yields) until it holds or `within` passes.
pub(crate) async fn eventually<F, Fut>(within: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if cond().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
