//! The proxy: invoke (the apipool-ng `dummyclient` protocol), the transparent `/http` route, key
//! injection and the status route, against a real mock upstream.

use mock_upstream::price_for;
use serde_json::{Value, json};

use crate::both_backends;
use crate::helpers::{Backend, expect_error, spawn_app};
use crate::proxy_helpers::{
    add_key, answer, get_via_invoke, invoke, key_health, make_pool, mock, status, upstream,
};

both_backends!(
    invoke_reaches_the_upstream_with_a_key,
    invoke_prefers_the_keys_base_url_and_needs_one,
    invoke_wraps_non_json_and_error_statuses,
    http_route_forwards_and_injects_the_key,
    http_route_auth_placements,
    status_reports_counts_and_health,
    serving_threads_serve_every_route_and_stop_without_losing_a_call,
);

async fn invoke_reaches_the_upstream_with_a_key(backend: Backend) {
    let app = spawn_app(backend).await;
    let t = app.admin_token.clone();
    let up = mock(&["raw-key-one", "raw-key-two"]).await;
    add_key(&app, &t, "one", "raw-key-one", None).await;
    add_key(&app, &t, "two", "raw-key-two", None).await;
    make_pool(
        &app,
        &t,
        "prices",
        &["one", "two"],
        upstream(&up.url(), "bearer"),
    )
    .await;

    let a = get_via_invoke(&app, &t, "prices", "/price", json!({"id": "bitcoin"})).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.body["success"], true);
    assert!(a.body["error"].is_null());
    let data = &a.body["data"];
    assert_eq!(data["_type"], "httpx.Response");
    assert_eq!(data["status_code"], 200);
    assert_eq!(data["headers"]["content-type"], "application/json");
    assert_eq!(data["data"]["id"], "bitcoin");
    assert_eq!(data["data"]["price"], price_for("bitcoin"));
    let key = a.body["key_identifier"].as_str().unwrap();
    assert!(key == "one" || key == "two", "{key}");
    assert_eq!(a.body["pool_total"], 2);
    assert_eq!(a.body["pool_available"], 2);

    // `url=` keyword, `/call` alias, the upstream saw our keys.
    let r = app
        .post(
            &t,
            "/proxy/prices/call",
            json!({"attr_path": ["get"], "args": [], "kwargs": {"url": "price", "params": {"id": "eth"}}}),
        )
        .await;
    let a = answer(r).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.body["data"]["data"]["price"], price_for("eth"));
    let s = up.stats();
    assert_eq!(s.admitted_ok(), 2);
    assert_eq!(s.unknown_key, 0, "every call carried a valid key");

    // A JSON body through POST and a path prefix from attr_path.
    let a = invoke(
        &app,
        &t,
        "prices",
        json!({"attr_path": ["echo", "items", "post"], "args": ["new"], "kwargs": {"json": {"n": 1}, "headers": {"X-Trace": "t1"}}}),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    let echo = &a.body["data"]["data"];
    assert_eq!(echo["method"], "POST");
    assert_eq!(echo["path"], "/echo/items/new");
    assert_eq!(echo["body"], "{\"n\":1}");
    assert_eq!(echo["headers"]["content-type"], "application/json");
    assert_eq!(echo["headers"]["x-trace"], "t1");
    let auth = echo["headers"]["authorization"].as_str().unwrap();
    assert!(
        auth == "Bearer raw-key-one" || auth == "Bearer raw-key-two",
        "the key goes as Bearer"
    );
    up.shutdown().await.unwrap();
}

async fn invoke_prefers_the_keys_base_url_and_needs_one(backend: Backend) {
    let app = spawn_app(backend).await;
    let t = app.admin_token.clone();
    let a_up = mock(&["ka"]).await;
    let b_up = mock(&["kb"]).await;
    // The seed's way: base_url and headers in the key's client_config, no pool upstream.
    add_key(
        &app,
        &t,
        "a",
        "ka",
        Some(json!({"base_url": a_up.url(), "headers": {"X-Org": "acme"}})),
    )
    .await;
    add_key(&app, &t, "b", "kb", None).await;
    make_pool(&app, &t, "keybase", &["a"], json!({})).await;
    let a = invoke(
        &app,
        &t,
        "keybase",
        json!({"attr_path": ["get"], "args": ["/echo/x"]}),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.body["data"]["data"]["headers"]["x-org"], "acme");
    assert_eq!(
        a.body["data"]["data"]["headers"]["authorization"],
        "Bearer ka"
    );

    // The key's base_url wins over the pool's upstream.
    make_pool(
        &app,
        &t,
        "both",
        &["a", "b"],
        json!({"upstream": {"base_url": b_up.url()}, "rotation_strategy": "round_robin"}),
    )
    .await;
    for _ in 0..4 {
        let a = get_via_invoke(&app, &t, "both", "/price", json!({"id": "x"})).await;
        assert_eq!(a.status, 200, "{}", a.body);
    }
    assert_eq!(a_up.stats().admitted_ok(), 1 + 2);
    assert_eq!(b_up.stats().admitted_ok(), 2);

    // Neither: a 422 that says what to set, and nothing sent.
    make_pool(&app, &t, "nowhere", &["b"], json!({})).await;
    let a = get_via_invoke(&app, &t, "nowhere", "/price", json!({"id": "x"})).await;
    assert_eq!(a.status, 422, "{}", a.body);
    assert_eq!(a.body["success"], false);
    assert!(a.body["error"].as_str().unwrap().contains("base_url"));
    assert_eq!(b_up.stats().admitted_ok(), 2);
}

async fn invoke_wraps_non_json_and_error_statuses(backend: Backend) {
    let app = spawn_app(backend).await;
    let t = app.admin_token.clone();
    let up = mock(&["k"]).await;
    add_key(&app, &t, "k", "k", None).await;
    make_pool(&app, &t, "p", &["k"], upstream(&up.url(), "bearer")).await;
    // An upstream 400 is still `success: true` with that status (the SDK decides).
    let a = get_via_invoke(&app, &t, "p", "/price", json!({})).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.body["success"], true);
    assert_eq!(a.body["data"]["status_code"], 400);
    // An unknown route of the upstream: 404 passes through the same way.
    let a = get_via_invoke(&app, &t, "p", "/nope", json!({})).await;
    assert_eq!(a.body["data"]["status_code"], 404);
    // Unknown method: 400, nothing sent.
    let before = up.stats().total_requests;
    let a = invoke(
        &app,
        &t,
        "p",
        json!({"attr_path": ["stream"], "args": ["/price"]}),
    )
    .await;
    assert_eq!(a.status, 400, "{}", a.body);
    assert!(
        a.body["detail"]
            .as_str()
            .unwrap()
            .contains("unsupported method")
    );
    assert_eq!(up.stats().total_requests, before);
    // Unknown pool: 404.
    let a = get_via_invoke(&app, &t, "nope", "/price", json!({})).await;
    assert_eq!(a.status, 404);
}

async fn http_route_forwards_and_injects_the_key(backend: Backend) {
    let app = spawn_app(backend).await;
    let t = app.admin_token.clone();
    let up = mock(&["sk-http-key"]).await;
    add_key(&app, &t, "h", "sk-http-key", None).await;
    make_pool(
        &app,
        &t,
        "web",
        &["h"],
        upstream(&format!("{}/echo", up.url()), "bearer"),
    )
    .await;
    let r = app
        .client
        .post(app.api("/proxy/web/http/v1/items?a=1&b=two"))
        .bearer_auth(&t)
        .header("cookie", "session=caller")
        .header("x-trace", "abc")
        .header("connection", "keep-alive, x-hop")
        .header("x-hop", "1")
        .header("content-type", "text/plain")
        .body("hello body")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("set-cookie").is_none());
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["method"], "POST");
    assert_eq!(v["path"], "/echo/v1/items");
    assert_eq!(v["query"]["a"], "1");
    assert_eq!(v["query"]["b"], "two");
    assert_eq!(v["body"], "hello body");
    let h = &v["headers"];
    assert_eq!(
        h["authorization"], "Bearer sk-http-key",
        "the key, not the caller's token"
    );
    assert_eq!(h["x-trace"], "abc");
    assert_eq!(h["content-type"], "text/plain");
    assert!(h.get("cookie").is_none());
    assert!(h.get("x-hop").is_none());
    assert!(
        !v.to_string().contains(&t),
        "the apipool token never reaches the upstream"
    );

    // Any method, an empty path, and the upstream's status passes through.
    for m in ["GET", "PUT", "PATCH", "DELETE", "OPTIONS"] {
        let r = app
            .client
            .request(m.parse().unwrap(), app.api("/proxy/web/http/x"))
            .bearer_auth(&t)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{m}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["method"], m);
    }
    let r = app
        .client
        .head(app.api("/proxy/web/http/x"))
        .bearer_auth(&t)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    make_pool(&app, &t, "root", &["h"], upstream(&up.url(), "bearer")).await;
    let r = app
        .client
        .get(app.api("/proxy/root/http/price"))
        .bearer_auth(&t)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400, "the upstream's 400 passes through");

    // Without a token: 401; a body over 10 MiB: 413 (nothing sent).
    let r = app
        .client
        .get(app.api("/proxy/web/http/x"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let before = up.stats().total_requests;
    let r = app
        .client
        .post(app.api("/proxy/web/http/x"))
        .bearer_auth(&t)
        .body(vec![b'a'; 10 * 1024 * 1024 + 1])
        .send()
        .await;
    // The server reads and drops the body before answering, so the client, still sending,
    // gets the answer (not a reset); nothing reaches the upstream.
    let r = r.expect("the 413 arrives");
    assert_eq!(r.status(), 413);
    assert!(r.text().await.unwrap().contains("detail"));
    assert_eq!(up.stats().total_requests, before);

    // A pool without upstream cannot use the transparent route.
    make_pool(&app, &t, "bare", &["h"], json!({})).await;
    let r = app
        .client
        .get(app.api("/proxy/bare/http/x"))
        .bearer_auth(&t)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
}

async fn http_route_auth_placements(backend: Backend) {
    let app = spawn_app(backend).await;
    let t = app.admin_token.clone();
    let up = mock(&["placed-key"]).await;
    add_key(&app, &t, "k", "placed-key", None).await;
    make_pool(
        &app,
        &t,
        "hdr",
        &["k"],
        upstream(&up.url(), "header:x-api-key"),
    )
    .await;
    make_pool(
        &app,
        &t,
        "qry",
        &["k"],
        upstream(&up.url(), "query:api_key"),
    )
    .await;

    let r = app
        .client
        .get(app.api("/proxy/hdr/http/echo/a"))
        .bearer_auth(&t)
        .header("x-api-key", "caller-tries-its-own")
        .send()
        .await
        .unwrap();
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["headers"]["x-api-key"], "placed-key");
    assert!(v["headers"].get("authorization").is_none());

    let r = app
        .client
        .get(app.api("/proxy/qry/http/echo/a?x=1&api_key=caller-value"))
        .bearer_auth(&t)
        .send()
        .await
        .unwrap();
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["query"]["api_key"], "placed-key");
    assert_eq!(v["query"]["x"], "1");
    assert!(!v["raw_query"].as_str().unwrap().contains("caller-value"));
    assert_eq!(up.stats().admitted_ok(), 2);

    // invoke follows the pool's placement too.
    let a = invoke(
        &app,
        &t,
        "qry",
        json!({"attr_path": ["get"], "args": ["/price"], "kwargs": {"params": {"id": "z"}}}),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.body["data"]["status_code"], 200);
}

async fn status_reports_counts_and_health(backend: Backend) {
    let app = spawn_app(backend).await;
    let t = app.admin_token.clone();
    let up = mock(&["s1", "s2", "s3"]).await;
    for (i, raw) in ["s1", "s2", "s3"].iter().enumerate() {
        add_key(&app, &t, &format!("k{i}"), raw, None).await;
    }
    make_pool(
        &app,
        &t,
        "st",
        &["k0", "k1", "k2"],
        upstream(&up.url(), "bearer"),
    )
    .await;
    let r = app.put(&t, "/keys/k2", json!({"is_active": false})).await;
    assert_eq!(r.status(), 200);
    let s = status(&app, &t, "st").await;
    assert_eq!(s["success"], true);
    assert_eq!(s["data"]["total_keys"], 3);
    assert_eq!(s["data"]["available_keys"], 2);
    assert_eq!(s["data"]["disabled_keys"], 1);
    assert_eq!(s["pool_available"], 2);
    assert_eq!(s["pool_total"], 3);
    assert_eq!(key_health(&s, "k0")["state"], "active");
    assert_eq!(key_health(&s, "k2")["state"], "disabled");
    // An empty pool: success false, 200 (the SDK's usability check reads `success`).
    make_pool(&app, &t, "empty", &[], json!({})).await;
    let s = status(&app, &t, "empty").await;
    assert_eq!(s["success"], false);
    assert_eq!(s["data"]["total_keys"], 0);
    let a = get_via_invoke(&app, &t, "empty", "/price", json!({"id": "x"})).await;
    assert_eq!(a.status, 503, "{}", a.body);
    assert_eq!(a.body["success"], false);
    assert!(a.body["error"].as_str().unwrap().contains("no usable key"));
    // A disabled pool answers 503 too.
    let r = app.put(&t, "/pools/st", json!({"is_active": false})).await;
    assert_eq!(r.status(), 200);
    let a = get_via_invoke(&app, &t, "st", "/price", json!({"id": "x"})).await;
    assert_eq!(a.status, 503, "{}", a.body);
    assert!(a.body["detail"].as_str().unwrap().contains("disabled"));
}

/// The transparent route is told from the path and served before the router: over HTTP/1 and
/// HTTP/2 (prior knowledge) like every route, with a request id and metrics under its template,
/// and the paths beside it (an empty rest, an undecodable pool name) answered as the router did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_transparent_route_is_served_before_the_router() {
    let app = spawn_app(Backend::Sqlite).await;
    let t = app.admin_token.clone();
    let up = mock(&["sk-lane-key"]).await;
    add_key(&app, &t, "l", "sk-lane-key", None).await;
    make_pool(
        &app,
        &t,
        "lane",
        &["l"],
        upstream(&format!("{}/echo", up.url()), "bearer"),
    )
    .await;
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    for client in [&app.client, &h2] {
        let r = client
            .get(app.api("/proxy/lane/http/items?q=1"))
            .bearer_auth(&t)
            .header("x-request-id", "lane-req-1")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-request-id"], "lane-req-1");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["path"], "/echo/items");
        assert_eq!(v["headers"]["authorization"], "Bearer sk-lane-key");
        let r = client.get(app.url("/health")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert!(r.headers().contains_key("x-request-id"));
    }
    let r = h2
        .get(app.api("/proxy/lane/http"))
        .bearer_auth(&t)
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.status(), 200);
    // Beside the route: what the router answers.
    let r = app
        .client
        .get(app.api("/proxy/lane/http/"))
        .bearer_auth(&t)
        .send()
        .await
        .unwrap();
    assert_eq!(expect_error(r, 404).await, "Not Found");
    let r = app
        .client
        .get(app.api("/proxy/%ff/http/x"))
        .bearer_auth(&t)
        .send()
        .await
        .unwrap();
    assert!(expect_error(r, 422).await.contains("Invalid UTF-8"));
    let r = app
        .client
        .get(app.api("/proxy/lane/http/x"))
        .send()
        .await
        .unwrap();
    assert!(expect_error(r, 401).await.contains("not authenticated"));
    let metrics = app.metrics().await;
    assert!(metrics.contains(
        r#"http_requests_total{method="GET",route="/api/v1/proxy/{pool}/http/{*path}",status="200"}"#
    ));
    assert!(metrics.contains(
        r#"http_requests_total{method="GET",route="/api/v1/proxy/{pool}/http",status="200"}"#
    ));
}

/// Thread ids of this process's serving threads (`apipool-serve-N`).
fn serving_thread_ids() -> std::collections::BTreeSet<String> {
    let mut ids = std::collections::BTreeSet::new();
    for task in std::fs::read_dir("/proc/self/task").expect("/proc/self/task") {
        let path = task.expect("task").path();
        if std::fs::read_to_string(path.join("comm"))
            .is_ok_and(|name| name.starts_with("apipool-serve-"))
        {
            ids.insert(
                path.file_name()
                    .expect("tid")
                    .to_string_lossy()
                    .into_owned(),
            );
        }
    }
    ids
}

/// With serving threads (`workers` = 3): the proxy and the router answer over many
/// connections, a call in flight when the shutdown begins is answered, every call is in the
/// statistics after the stop, and the threads are gone.
async fn serving_threads_serve_every_route_and_stop_without_losing_a_call(backend: Backend) {
    let before = serving_thread_ids();
    let mut app = crate::helpers::spawn_app_with(backend, |c| {
        c.workers = std::num::NonZeroUsize::new(3);
    })
    .await;
    let ours: Vec<String> = serving_thread_ids().difference(&before).cloned().collect();
    assert_eq!(ours.len(), 3, "three serving threads: {ours:?}");
    let t = app.admin_token.clone();
    let fast = mock(&["threads-fast-key"]).await;
    let slow = crate::proxy_helpers::mock_with(&["threads-slow-key"], |c| c.latency_ms = 400).await;
    add_key(&app, &t, "fast", "threads-fast-key", None).await;
    add_key(&app, &t, "slow", "threads-slow-key", None).await;
    make_pool(&app, &t, "fast", &["fast"], upstream(&fast.url(), "bearer")).await;
    make_pool(&app, &t, "slow", &["slow"], upstream(&slow.url(), "bearer")).await;
    let mut tasks = Vec::new();
    for w in 0..12 {
        // A client each: its own connections, spread over the threads.
        let client = reqwest::Client::new();
        let (proxy, pools, t) = (
            app.api("/proxy/fast/http/price"),
            app.api("/pools"),
            t.clone(),
        );
        tasks.push(tokio::spawn(async move {
            for i in 0..25 {
                let id = format!("w{w}-{i}");
                let r = client
                    .get(&proxy)
                    .query(&[("id", &id)])
                    .bearer_auth(&t)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200);
                let v: Value = r.json().await.unwrap();
                assert_eq!(v["id"], id);
                if i % 5 == 0 {
                    let r = client.get(&pools).bearer_auth(&t).send().await.unwrap();
                    assert_eq!(r.status(), 200);
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(fast.stats().admitted_ok(), 300);
    // A call in flight when the shutdown begins is still answered.
    let in_flight = tokio::spawn(
        app.client
            .get(app.api("/proxy/slow/http/price?id=last"))
            .bearer_auth(&t)
            .send(),
    );
    while slow.stats().total_requests == 0 {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let url = app.shut_down().await;
    let r = in_flight
        .await
        .unwrap()
        .expect("answered during the shutdown");
    assert_eq!(r.status(), 200);
    // Every call was recorded before the server stopped.
    sqlx::any::install_default_drivers();
    let mut conn = <sqlx::AnyConnection as sqlx::Connection>::connect(&url)
        .await
        .unwrap();
    let events: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM apipool_stats_events")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(events, 301);
    let left: Vec<String> = ours
        .iter()
        .filter(|id| std::path::Path::new(&format!("/proc/self/task/{id}")).exists())
        .cloned()
        .collect();
    assert!(left.is_empty(), "serving threads still running: {left:?}");
}
