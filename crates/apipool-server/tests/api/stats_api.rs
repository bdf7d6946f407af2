//! Statistics of proxied calls: every call is one event (identifier, never the raw key), and the
//! usage, timeline, success-rate, logs, key-stats and report routes show real data.

use std::time::{Duration, SystemTime};

use serde_json::{Value, json};

use crate::both_backends;
use crate::helpers::{Backend, TestApp, spawn_app};
use crate::proxy_helpers::{add_key, get_via_invoke, invoke, make_pool, mock_with, upstream};

both_backends!(
    a_thousand_calls_are_a_thousand_events,
    filters_latency_methods_and_reports,
    raw_keys_never_appear_in_stats,
    stats_input_is_validated,
);

async fn get_json(app: &TestApp, token: &str, path: &str) -> Value {
    let r = app.get(token, path).await;
    let status = r.status();
    let v: Value = r.json().await.expect("json");
    assert_eq!(status, 200, "{path}: {v}");
    v
}

async fn a_thousand_calls_are_a_thousand_events(backend: Backend) {
    let app = spawn_app(backend).await;
    let t = app.admin_token.clone();
    let up = mock_with(&["t1", "t2", "t3", "t4"], |_| {}).await;
    for i in 1..=4 {
        add_key(&app, &t, &format!("key{i}"), &format!("t{i}"), None).await;
    }
    make_pool(
        &app,
        &t,
        "busy",
        &["key1", "key2", "key3", "key4"],
        upstream(&up.url(), "bearer"),
    )
    .await;
    let mut tasks = Vec::new();
    for w in 0..20 {
        let client = app.client.clone();
        let (invoke_url, http_url) = (
            app.api("/proxy/busy/invoke"),
            app.api("/proxy/busy/http/price?id=btc"),
        );
        let t = t.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..50 {
                let r = if (w + i) % 2 == 0 {
                    client
                        .post(&invoke_url)
                        .bearer_auth(&t)
                        .json(&json!({"attr_path": ["get"], "args": ["/price"], "kwargs": {"params": {"id": "eth"}}}))
                        .send()
                        .await
                } else {
                    client.get(&http_url).bearer_auth(&t).send().await
                };
                assert_eq!(r.unwrap().status(), 200);
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(up.stats().admitted_ok(), 1000);

    let usage = get_json(&app, &t, "/stats/busy/usage?seconds=600").await;
    assert_eq!(usage["total"], 1000);
    assert_eq!(usage["group_by"], "key");
    let items = usage["items"].as_array().unwrap();
    assert_eq!(items.len(), 4);
    let mut sum = 0;
    for item in items {
        let key = item["group"].as_str().unwrap();
        let n = item["count"].as_u64().unwrap();
        let index: usize = key.trim_start_matches("key").parse::<usize>().unwrap() - 1;
        assert_eq!(up.stats().key(index).unwrap().admitted_ok, n, "{key}");
        sum += n;
    }
    assert_eq!(sum, 1000);
    let by_status = get_json(&app, &t, "/stats/busy/usage?group_by=status").await;
    assert_eq!(
        by_status["items"],
        json!([{"group": "success", "count": 1000}])
    );
    let hours = get_json(&app, &t, "/stats/busy/usage?group_by=hour&seconds=7200").await;
    assert_eq!(hours["total"], 1000);
    let rate = get_json(&app, &t, "/stats/busy/success-rate").await;
    assert_eq!(rate["total"], 1000);
    assert_eq!(rate["success"], 1000);
    assert_eq!(rate["success_rate"], 1.0);
    assert_eq!(rate["per_key"].as_array().unwrap().len(), 4);
    assert_eq!(rate["latency"]["count"], 1000);
    let tl = get_json(
        &app,
        &t,
        "/stats/busy/timeline?seconds=3600&interval=minute",
    )
    .await;
    let buckets = tl["buckets"].as_array().unwrap();
    assert!(buckets.len() >= 60);
    let total: u64 = buckets.iter().map(|b| b["total"].as_u64().unwrap()).sum();
    assert_eq!(total, 1000);
    let logs = get_json(&app, &t, "/stats/busy/logs?page_size=100").await;
    assert_eq!(logs["total"], 1000);
    assert_eq!(logs["items"].as_array().unwrap().len(), 100);
    let methods = get_json(&app, &t, "/stats/busy/logs?method=GET%20/price&page_size=1").await;
    assert_eq!(
        methods["total"], 1000,
        "invoke and /http both label GET /price"
    );
}

async fn filters_latency_methods_and_reports(backend: Backend) {
    let app = spawn_app(backend).await;
    let t = app.admin_token.clone();
    let up = mock_with(&["f-ok", "f-bad"], |c| {
        c.failing_keys = vec![mock_upstream::ApiKey::parse("f-bad").unwrap()];
    })
    .await;
    add_key(&app, &t, "ok", "f-ok", None).await;
    add_key(&app, &t, "bad", "f-bad", None).await;
    make_pool(&app, &t, "mixed", &["ok"], upstream(&up.url(), "bearer")).await;
    make_pool(
        &app,
        &t,
        "failing",
        &["bad"],
        json!({"upstream": {"base_url": up.url()}, "pool_config": {"ban_threshold": 100}}),
    )
    .await;
    for _ in 0..3 {
        assert_eq!(
            get_via_invoke(&app, &t, "mixed", "/price", json!({"id": "a"}))
                .await
                .status,
            200
        );
    }
    // A caller error (400 upstream) is recorded as "not key related".
    assert_eq!(
        get_via_invoke(&app, &t, "mixed", "/price", json!({}))
            .await
            .status,
        200
    );
    let a = invoke(
        &app,
        &t,
        "mixed",
        json!({"attr_path": ["post"], "args": ["/echo/x"], "kwargs": {"json": {}}}),
    )
    .await;
    assert_eq!(a.status, 200);
    for _ in 0..2 {
        let a = get_via_invoke(&app, &t, "failing", "/price", json!({"id": "a"})).await;
        assert_eq!(a.body["data"]["status_code"], 500);
    }

    let logs = get_json(&app, &t, "/stats/mixed/logs").await;
    assert_eq!(logs["total"], 5);
    let first = &logs["items"][0];
    assert_eq!(first["method"], "POST /echo/x", "newest first");
    assert_eq!(first["status"], "success");
    assert_eq!(first["key_identifier"], "ok");
    assert!(first["latency_ms"].as_f64().unwrap() >= 0.0);
    assert!(first["finished_at"].as_str().unwrap().ends_with('Z'));
    let only = get_json(&app, &t, "/stats/mixed/logs?status=not%20key%20related").await;
    assert_eq!(only["total"], 1);
    let only = get_json(&app, &t, "/stats/mixed/logs?status=1").await;
    assert_eq!(only["total"], 4);
    let only = get_json(&app, &t, "/stats/mixed/logs?method=POST%20/echo/x").await;
    assert_eq!(only["total"], 1);
    let only = get_json(&app, &t, "/stats/mixed/logs?key_identifier=bad").await;
    assert_eq!(only["total"], 0, "the failing key is not in this pool");
    let failing = get_json(&app, &t, "/stats/failing/success-rate").await;
    assert_eq!(failing["total"], 2);
    assert_eq!(failing["failed"], 2);
    assert_eq!(failing["success_rate"], 0.0);
    let paged = get_json(&app, &t, "/stats/mixed/logs?page=2&page_size=2").await;
    assert_eq!(paged["items"].as_array().unwrap().len(), 2);
    assert_eq!(paged["page"], 2);

    // Client-side events (SDK reports): validated, owner-checked, visible in the same views.
    let two_hours_ago = SystemTime::now() - Duration::from_secs(7200);
    let epoch = two_hours_ago
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let report = json!({
        "pool_identifier": "mixed",
        "client_id": "sdk-test",
        "events": [
            {"key_identifier": "ok", "status": "reach limit", "latency": 0.25, "method": "GET /sdk", "finished_at": epoch, "dedup_id": "e1"},
            {"key_identifier": "ok", "status": 5, "latency": 1.5, "finished_at": epoch, "dedup_id": "e2"},
            {"key_identifier": "f-ok", "status": "success"},
            {"key_identifier": "nobody", "status": "success"},
            {"key_identifier": "ok", "status": "exploded"},
            {"key_identifier": "ok", "status": "success", "latency": -1},
            {"key_identifier": "ok", "status": "success", "finished_at": "yesterday"},
            "not an object",
        ]
    });
    let r = app.post(&t, "/stats/report", report.clone()).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["accepted"], 2, "{v}");
    let rejected: Vec<u64> = v["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["index"].as_u64().unwrap())
        .collect();
    assert_eq!(rejected, [2, 3, 4, 5, 6, 7]);
    assert!(!v.to_string().contains("f-ok"), "a raw key is never echoed");
    // Re-sending the same events (same dedup ids) stores nothing new.
    let r = app.post(&t, "/stats/report", report).await;
    assert_eq!(r.status(), 200);
    let usage = get_json(&app, &t, "/stats/mixed/usage?seconds=10800&group_by=status").await;
    assert_eq!(usage["total"], 7);
    let st: Value = usage["items"].clone();
    assert!(
        st.as_array()
            .unwrap()
            .contains(&json!({"group": "reach limit", "count": 1})),
        "{st}"
    );
    assert!(
        st.as_array()
            .unwrap()
            .contains(&json!({"group": "failed", "count": 1})),
        "{st}"
    );
    let recent = get_json(&app, &t, "/stats/mixed/usage?seconds=3600").await;
    assert_eq!(recent["total"], 5, "the reported events are two hours old");
    let tl = get_json(
        &app,
        &t,
        "/stats/mixed/timeline?seconds=10800&interval=hour",
    )
    .await;
    let total: u64 = tl["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["total"].as_u64().unwrap())
        .sum();
    assert_eq!(total, 7);
    let sdk = get_json(
        &app,
        &t,
        "/stats/mixed/logs?seconds=10800&method=GET%20/sdk",
    )
    .await;
    assert_eq!(sdk["total"], 1);
    assert_eq!(sdk["items"][0]["latency_ms"], 250.0);

    // A key's stats over all of its owner's pools.
    let ks = get_json(&app, &t, "/keys/ok/stats?seconds=10800").await;
    assert_eq!(ks["total"], 7);
    assert_eq!(ks["pools"][0]["pool_identifier"], "mixed");
    let ks = get_json(&app, &t, "/keys/bad/stats").await;
    assert_eq!(ks["total"], 2);
    assert_eq!(ks["failed"], 2);
    let r = app.get(&t, "/keys/nope/stats").await;
    assert_eq!(r.status(), 404);
    let r = app
        .post(
            &t,
            "/stats/report",
            json!({"pool_identifier": "nope", "events": []}),
        )
        .await;
    assert_eq!(r.status(), 404);
}

async fn raw_keys_never_appear_in_stats(backend: Backend) {
    let app = spawn_app(backend).await;
    let t = app.admin_token.clone();
    let raws = ["sk-live-RAWSECRET-0001", "sk-live-RAWSECRET-0002"];
    let up = mock_with(&raws, |c| {
        c.revoked_keys = vec![mock_upstream::ApiKey::parse(raws[1]).unwrap()];
    })
    .await;
    add_key(&app, &t, "first", raws[0], None).await;
    add_key(&app, &t, "second", raws[1], None).await;
    make_pool(
        &app,
        &t,
        "secret",
        &["first", "second"],
        json!({"upstream": {"base_url": up.url(), "auth": "query:api_key"}}),
    )
    .await;
    for _ in 0..6 {
        let a = get_via_invoke(&app, &t, "secret", "/price", json!({"id": "x"})).await;
        assert_eq!(a.status, 200, "{}", a.body);
    }
    // A client trying to report a raw key as identifier is refused (and not echoed).
    let r = app
        .post(&t, "/stats/report", json!({"pool_identifier": "secret", "events": [{"key_identifier": raws[0], "status": "success"}]}))
        .await;
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["accepted"], 0);
    let paths = [
        "/stats/secret/usage",
        "/stats/secret/usage?group_by=status",
        "/stats/secret/usage?group_by=hour",
        "/stats/secret/timeline?interval=minute&seconds=600",
        "/stats/secret/success-rate",
        "/stats/secret/logs?page_size=100",
        "/keys/first/stats",
        "/keys/second/stats",
        "/proxy/secret/status",
    ];
    for p in paths {
        let r = app.get(&t, p).await;
        assert_eq!(r.status(), 200, "{p}");
        let text = r.text().await.unwrap();
        assert!(!text.contains("RAWSECRET"), "{p} leaked a raw key: {text}");
    }
    let logs = get_json(&app, &t, "/stats/secret/logs").await;
    assert_eq!(logs["total"], 6);
    // Nor in the stored events.
    let rows: Vec<String> = sqlx::query_scalar(
        "SELECT key_identifier || '|' || COALESCE(method, '') || '|' || pool FROM apipool_stats_events",
    )
    .fetch_all(&app.state.db.pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), 6);
    for row in rows {
        assert!(!row.contains("RAWSECRET"), "{row}");
    }
}

async fn stats_input_is_validated(backend: Backend) {
    let app = spawn_app(backend).await;
    let t = app.admin_token.clone();
    make_pool(&app, &t, "v", &[], json!({})).await;
    for p in [
        "/stats/v/usage?seconds=0",
        "/stats/v/usage?seconds=99999999999",
        "/stats/v/usage?group_by=planet",
        "/stats/v/timeline?interval=week",
        "/stats/v/timeline?seconds=31536000&interval=minute",
        "/stats/v/logs?page_size=1000",
        "/stats/v/logs?page=0",
        "/stats/v/logs?status=bogus",
        "/stats/v/success-rate?seconds=-1",
    ] {
        let r = app.get(&t, p).await;
        assert_eq!(r.status(), 422, "{p}");
        let v: Value = r.json().await.unwrap();
        assert!(v["detail"].as_str().is_some(), "{p}");
    }
    let empty = get_json(&app, &t, "/stats/v/usage").await;
    assert_eq!(empty["total"], 0);
    assert_eq!(empty["items"], json!([]));
    let r = app.get("not-a-token", "/stats/v/usage").await;
    assert_eq!(r.status(), 401);
    let many: Vec<Value> = (0..10_001).map(|_| json!({})).collect();
    let r = app
        .post(
            &t,
            "/stats/report",
            json!({"pool_identifier": "v", "events": many}),
        )
        .await;
    assert_eq!(r.status(), 422);
}
