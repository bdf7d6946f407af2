//! The proxy cannot be pointed anywhere but the pool's upstream, and another user's pool does
//! not exist on any proxy or stats route.

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::both_backends;
use crate::helpers::{Backend, TestApp, spawn_app};
use crate::proxy_helpers::{add_key, invoke, make_pool, mock, upstream};

both_backends!(
    ssrf_attempts_are_refused_and_reach_nothing,
    another_users_pool_is_404_everywhere,
);

/// Sends a request line as written (no client-side normalisation of `..`) and returns the status.
async fn raw_status(app: &TestApp, method: &str, target: &str, token: &str) -> u16 {
    let addr = app.address.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "{method} {target} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf);
    text.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"))
}

async fn ssrf_attempts_are_refused_and_reach_nothing(backend: Backend) {
    let app = spawn_app(backend).await;
    let t = app.admin_token.clone();
    let up = mock(&["ssrf-key"]).await;
    // Another service on another port: nothing may ever reach it.
    let victim = mock(&["ssrf-key"]).await;
    let vport = victim.addr().port();
    add_key(&app, &t, "k", "ssrf-key", None).await;
    make_pool(
        &app,
        &t,
        "p",
        &["k"],
        upstream(&format!("{}/echo/base", up.url()), "bearer"),
    )
    .await;

    let urls = [
        format!("http://127.0.0.1:{vport}/price?id=x"),
        format!("https://127.0.0.1:{vport}/"),
        format!("//127.0.0.1:{vport}/price"),
        format!("///127.0.0.1:{vport}/price"),
        format!("%2F%2F127.0.0.1:{vport}/price"),
        format!("http:127.0.0.1:{vport}"),
        "file:///etc/passwd".to_owned(),
        "gopher://127.0.0.1:6379/_INFO".to_owned(),
        "ftp://127.0.0.1/".to_owned(),
        "javascript:alert(1)".to_owned(),
        "../../price".to_owned(),
        "/../../price".to_owned(),
        "a/../../../price".to_owned(),
        "%2e%2e/%2e%2e/price".to_owned(),
        "%252e%252e/price".to_owned(),
        "..%2f..%2fprice".to_owned(),
        "\\\\127.0.0.1\\price".to_owned(),
        "a\\..\\b".to_owned(),
        "a\r\nHost: evil".to_owned(),
        "a%0d%0aHost:%20evil".to_owned(),
        "a%00b".to_owned(),
        "a#frag".to_owned(),
    ];
    for url in &urls {
        let a = invoke(&app, &t, "p", json!({"attr_path": ["get"], "args": [url]})).await;
        assert_eq!(a.status, 400, "{url:?}: {}", a.body);
        assert!(a.body["detail"].as_str().is_some(), "{url:?}");
        let a = invoke(
            &app,
            &t,
            "p",
            json!({"attr_path": ["get"], "kwargs": {"url": url}}),
        )
        .await;
        assert_eq!(a.status, 400, "{url:?}");
    }
    // attr_path may only name HTTP verbs (after plain path segments).
    for path in [
        json!(["__class__"]),
        json!(["__init__", "__globals__"]),
        json!(["_http", "_transport", "handle_request"]),
        json!(["..", "get"]),
        json!(["a/b", "get"]),
        json!(["http://evil", "get"]),
        json!([]),
    ] {
        let a = invoke(&app, &t, "p", json!({"attr_path": path, "args": ["/x"]})).await;
        assert_eq!(a.status, 400, "{path}: {}", a.body);
    }
    // The transparent route, with request targets sent as written.
    let raw_targets = [
        "/api/v1/proxy/p/http/../../../price".to_owned(),
        "/api/v1/proxy/p/http/a/../../price".to_owned(),
        "/api/v1/proxy/p/http/%2e%2e/%2e%2e/price".to_owned(),
        "/api/v1/proxy/p/http/%2E%2E%2Fprice".to_owned(),
        format!("/api/v1/proxy/p/http//127.0.0.1:{vport}/price"),
        format!("/api/v1/proxy/p/http/http://127.0.0.1:{vport}/price"),
        "/api/v1/proxy/p/http/a%5c..%5cprice".to_owned(),
        "/api/v1/proxy/p/http/a%00".to_owned(),
    ];
    for target in &raw_targets {
        let status = raw_status(&app, "GET", target, &t).await;
        assert_eq!(status, 400, "{target}");
    }
    // An absolute-form request target (proxy style) does not reach the victim either.
    let status = raw_status(
        &app,
        "GET",
        &format!("http://127.0.0.1:{vport}/price?id=x"),
        &t,
    )
    .await;
    assert_ne!(status, 200);

    assert_eq!(
        victim.stats().total_requests,
        0,
        "nothing reached the other port"
    );
    assert_eq!(up.stats().total_requests, 0, "nothing was sent at all");

    // Paths that look odd but are safe stay under the base URL.
    let a = invoke(
        &app,
        &t,
        "p",
        json!({"attr_path": ["get"], "args": [format!("x/@127.0.0.1:{vport}/y")]}),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    let echoed = &a.body["data"]["data"];
    assert_eq!(echoed["path"], format!("/echo/base/x/@127.0.0.1:{vport}/y"));
    let status = raw_status(&app, "GET", "/api/v1/proxy/p/http/a%2Fb/c", &t).await;
    assert_eq!(status, 200);
    assert_eq!(victim.stats().total_requests, 0);
}

async fn another_users_pool_is_404_everywhere(backend: Backend) {
    let app = spawn_app(backend).await;
    let owner = app.admin_token.clone();
    let up = mock(&["owned-key"]).await;
    add_key(&app, &owner, "mine", "owned-key", None).await;
    make_pool(
        &app,
        &owner,
        "private",
        &["mine"],
        upstream(&up.url(), "bearer"),
    )
    .await;
    // The owner's pool is live (engine built) before the other user tries.
    let a = invoke(
        &app,
        &owner,
        "private",
        json!({"attr_path": ["get"], "args": ["/price"], "kwargs": {"params": {"id": "x"}}}),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    let before = up.stats().total_requests;

    let other = app.new_user("mallory").await;
    let body = json!({"attr_path": ["get"], "args": ["/price"], "kwargs": {"params": {"id": "x"}}});
    let routes: Vec<(&str, String, Option<Value>)> = vec![
        (
            "POST",
            "/proxy/private/invoke".to_owned(),
            Some(body.clone()),
        ),
        ("POST", "/proxy/private/call".to_owned(), Some(body)),
        ("GET", "/proxy/private/status".to_owned(), None),
        ("GET", "/proxy/private/http/price?id=x".to_owned(), None),
        (
            "POST",
            "/proxy/private/http/echo/x".to_owned(),
            Some(json!({"a": 1})),
        ),
        ("GET", "/stats/private/usage".to_owned(), None),
        (
            "GET",
            "/stats/private/usage?group_by=status".to_owned(),
            None,
        ),
        (
            "GET",
            "/stats/private/timeline?interval=minute&seconds=600".to_owned(),
            None,
        ),
        ("GET", "/stats/private/success-rate".to_owned(), None),
        ("GET", "/stats/private/logs".to_owned(), None),
        ("GET", "/keys/mine/stats".to_owned(), None),
        (
            "POST",
            "/stats/report".to_owned(),
            Some(
                json!({"pool_identifier": "private", "events": [{"key_identifier": "mine", "status": "success", "latency": 0.1}]}),
            ),
        ),
    ];
    for (method, path, body) in routes {
        let mut rb = app
            .client
            .request(method.parse().unwrap(), app.api(&path))
            .bearer_auth(&other);
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        let r = rb.send().await.unwrap();
        assert_eq!(r.status(), 404, "{method} {path}");
        let v: Value = r.json().await.unwrap();
        assert!(v["detail"].as_str().is_some(), "{method} {path}: {v}");
    }
    assert_eq!(
        up.stats().total_requests,
        before,
        "nothing was sent for mallory"
    );
    // Mallory's own pool of the same name is hers alone.
    add_key(&app, &other, "mine", "mallory-key", None).await;
    make_pool(&app, &other, "private", &["mine"], json!({})).await;
    let r = app.get(&other, "/proxy/private/status").await;
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["data"]["total_keys"], 1);
    let r = app.get(&owner, "/stats/private/usage").await;
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        v["total"], 1,
        "the owner's pool still has its own single event"
    );
}
