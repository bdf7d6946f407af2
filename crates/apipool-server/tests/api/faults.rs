//! Faults, for real: upstream timeouts, dropped connections, bodies cut off or dribbled, 5xx
//! bursts (mock-upstream's fault options) and a PostgreSQL outage under proxy load. Calls retry
//! on other keys when the pool says so; otherwise the caller gets a JSON `detail` naming the
//! cause with the right status (502, 504, 503).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use mock_upstream::{ApiKey, ConfigPatch};
use serde_json::{Value, json};

use crate::helpers::{Backend, TestApp, expect_error, spawn_app};
use crate::proxy_helpers::{Answer, add_key, answer, get_via_invoke, make_pool, mock_with, status};

fn keys(raw: &[&str]) -> Vec<ApiKey> {
    raw.iter()
        .map(|k| ApiKey::parse(k).expect("mock key"))
        .collect()
}

/// `GET /proxy/{pool}/http/price?id=x`.
async fn via_http(app: &TestApp, token: &str, pool: &str) -> Answer {
    answer(
        app.client
            .get(app.api(&format!("/proxy/{pool}/http/price?id=x")))
            .bearer_auth(token)
            .send()
            .await
            .expect("the server answers"),
    )
    .await
}

/// Keys `bad` and `good` (raw values equal to the names) in pool `name`, round robin, with
/// retries and `pool_config` merged over a 1 s timeout.
async fn bad_and_good(app: &TestApp, name: &str, url: &str, pool_config: Value) {
    let t = &app.admin_token;
    let mut cfg = json!({"timeout": 1, "retry_on_failure": true, "max_retries": 1,
                         "ban_threshold": 1, "ban_duration": 300});
    if let (Some(c), Value::Object(extra)) = (cfg.as_object_mut(), pool_config) {
        c.extend(extra);
    }
    make_pool(
        app,
        t,
        name,
        &["bad", "good"],
        json!({"upstream": {"base_url": url}, "rotation_strategy": "round_robin", "pool_config": cfg}),
    )
    .await;
}

async fn add_bad_and_good(app: &TestApp) {
    let t = app.admin_token.clone();
    add_key(app, &t, "bad", "bad", None).await;
    add_key(app, &t, "good", "good", None).await;
}

/// The `detail` (and, for invoke, `error` and `success: false`) of a failed proxy answer.
fn failure_detail(a: &Answer, expected_status: u16) -> String {
    assert_eq!(a.status, expected_status, "{}", a.body);
    let detail = a.body["detail"]
        .as_str()
        .unwrap_or_else(|| panic!("a JSON detail in {}", a.body))
        .to_owned();
    if a.body.get("success").is_some() {
        assert_eq!(a.body["success"], false);
        assert_eq!(a.body["error"], detail.as_str());
    }
    detail
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_timeouts_retry_on_another_key_else_504() {
    let app = spawn_app(Backend::Sqlite).await;
    let t = app.admin_token.clone();
    let up = mock_with(&["bad", "good"], |c| {
        c.hanging_keys = keys(&["bad"]);
        c.hang_ms = 30_000;
    })
    .await;
    add_bad_and_good(&app).await;
    bad_and_good(&app, "hang", &up.url(), json!({})).await;
    // Round robin: one of two calls starts on `bad`, times out after 1 s and moves to `good`.
    for _ in 0..2 {
        let a = get_via_invoke(&app, &t, "hang", "/price", json!({"id": "x"})).await;
        assert_eq!(a.status, 200, "{}", a.body);
        assert_eq!(a.body["key_identifier"], "good");
        assert_eq!(a.body["data"]["status_code"], 200);
    }
    assert_eq!(up.stats().faults.timeouts, 1);
    let s = status(&app, &t, "hang").await;
    let bad = crate::proxy_helpers::key_health(&s, "bad");
    assert_eq!(bad["state"], "banned", "{s}");
    // Banned: the next calls (both routes) go straight to `good`.
    assert_eq!(via_http(&app, &t, "hang").await.status, 200);
    assert_eq!(up.stats().faults.timeouts, 1);

    // A pool whose only key hangs: 504 with the cause, on both routes.
    make_pool(
        &app,
        &t,
        "only-hang",
        &["bad"],
        json!({"upstream": {"base_url": up.url()}, "pool_config": {"timeout": 1}}),
    )
    .await;
    let a = get_via_invoke(&app, &t, "only-hang", "/price", json!({"id": "x"})).await;
    let detail = failure_detail(&a, 504);
    assert!(
        detail.contains("did not answer within the pool's timeout (1s)"),
        "{detail}"
    );
    assert_eq!(a.body["key_identifier"], "bad");
    let a = via_http(&app, &t, "only-hang").await;
    let detail = failure_detail(&a, 504);
    assert!(detail.contains("timeout"), "{detail}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_resets_retry_on_another_key_else_502() {
    let app = spawn_app(Backend::Sqlite).await;
    let t = app.admin_token.clone();
    let up = mock_with(&["bad", "good"], |c| {
        c.resetting_keys = keys(&["bad"]);
    })
    .await;
    add_bad_and_good(&app).await;
    bad_and_good(&app, "reset", &up.url(), json!({"ban_threshold": 100})).await;
    for _ in 0..4 {
        let a = get_via_invoke(&app, &t, "reset", "/price", json!({"id": "x"})).await;
        assert_eq!(a.status, 200, "{}", a.body);
        assert_eq!(a.body["key_identifier"], "good");
        let a = via_http(&app, &t, "reset").await;
        assert_eq!(a.status, 200, "{}", a.body);
        assert_eq!(a.body["key_index"], 1, "answered by the good key");
    }
    assert!(up.stats().faults.resets >= 1, "{:?}", up.stats().faults);

    make_pool(
        &app,
        &t,
        "only-reset",
        &["bad"],
        json!({"upstream": {"base_url": up.url()}}),
    )
    .await;
    for a in [
        get_via_invoke(&app, &t, "only-reset", "/price", json!({"id": "x"})).await,
        via_http(&app, &t, "only-reset").await,
    ] {
        let detail = failure_detail(&a, 502);
        assert!(
            detail.starts_with("the upstream could not be reached"),
            "{detail}"
        );
        assert!(
            !detail.contains("127.0.0.1"),
            "no URL in the detail: {detail}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_cut_off_half_way_retry_on_another_key_else_502() {
    let app = spawn_app(Backend::Sqlite).await;
    let t = app.admin_token.clone();
    let up = mock_with(&["bad", "good"], |c| c.truncate_rate = 1.0).await;
    add_bad_and_good(&app).await;
    bad_and_good(&app, "cut", &up.url(), json!({"ban_threshold": 100})).await;
    // Every answer is cut off: invoke reads the body inside the attempt, so it retries, then
    // reports the cause.
    let a = get_via_invoke(&app, &t, "cut", "/price", json!({"id": "x"})).await;
    let detail = failure_detail(&a, 502);
    assert!(detail.contains("could not be read"), "{detail}");
    assert_eq!(up.stats().faults.truncated, 2, "both keys were tried");
    // The transparent route buffers small answers: a cut-off one is a 502 too, never a
    // truncated 200.
    let a = via_http(&app, &t, "cut").await;
    let detail = failure_detail(&a, 502);
    assert!(detail.contains("could not be read"), "{detail}");
    // Cut off for one key only (the fault switched off after the first attempt): the retry
    // on the other key succeeds.
    up.update(&ConfigPatch {
        truncate_rate: Some(0.0),
        ..ConfigPatch::default()
    })
    .expect("patch");
    let a = get_via_invoke(&app, &t, "cut", "/price", json!({"id": "x"})).await;
    assert_eq!(a.status, 200, "{}", a.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_bodies_stream_through_or_time_out() {
    let app = spawn_app(Backend::Sqlite).await;
    let t = app.admin_token.clone();
    // Dribbled one byte at a time over 2 s.
    let up = mock_with(&["bad", "good"], |c| {
        c.slow_body_ms = 2_000;
        c.slow_body_chunk_bytes = 1;
    })
    .await;
    add_bad_and_good(&app).await;
    bad_and_good(&app, "slow", &up.url(), json!({"ban_threshold": 100})).await;
    // invoke must hold the whole answer within the pool's 1 s timeout: both keys time out.
    let a = get_via_invoke(&app, &t, "slow", "/price", json!({"id": "x"})).await;
    let detail = failure_detail(&a, 504);
    assert!(detail.contains("timeout"), "{detail}");
    assert_eq!(up.stats().faults.slow_bodies, 2);
    // The transparent route streams (headers come in time), and the pool's timeout covers the
    // body too: past it the stream is cut off, which the caller sees as an incomplete body (the
    // chunked framing never ends), never as a short answer that looks complete.
    let r = app
        .client
        .get(app.api("/proxy/slow/http/price?id=x"))
        .bearer_auth(&t)
        .send()
        .await
        .expect("headers arrive");
    assert_eq!(r.status(), 200);
    let err = r
        .bytes()
        .await
        .expect_err("the body is cut off at the timeout");
    assert!(err.is_body() || err.is_decode(), "{err:?}");
    // A pool with a longer timeout serves both routes, byte by byte.
    make_pool(
        &app,
        &t,
        "patient",
        &["good"],
        json!({"upstream": {"base_url": up.url()}, "pool_config": {"timeout": 10}}),
    )
    .await;
    let a = get_via_invoke(&app, &t, "patient", "/price", json!({"id": "y"})).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.body["data"]["data"]["id"], "y");
    let started = std::time::Instant::now();
    let a = via_http(&app, &t, "patient").await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.body["id"], "x", "the whole body arrived: {}", a.body);
    assert!(started.elapsed() >= Duration::from_millis(1_500));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_xx_bursts_retry_on_other_keys() {
    let app = spawn_app(Backend::Sqlite).await;
    let t = app.admin_token.clone();
    let raws = ["b1", "b2", "b3", "b4"];
    let up = mock_with(&raws, |c| c.error_status = 503).await;
    for r in raws {
        add_key(&app, &t, r, r, None).await;
    }
    make_pool(
        &app,
        &t,
        "burst",
        &raws,
        json!({"upstream": {"base_url": up.url()}, "rotation_strategy": "round_robin",
               "pool_config": {"retry_on_failure": true, "max_retries": 3, "ban_threshold": 5}}),
    )
    .await;
    // A burst of 3 errors: each call below survives it on another key.
    up.update(&ConfigPatch {
        error_burst: Some(3),
        ..ConfigPatch::default()
    })
    .expect("patch");
    let a = get_via_invoke(&app, &t, "burst", "/price", json!({"id": "x"})).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.body["data"]["status_code"], 200, "{}", a.body);
    assert_eq!(up.stats().status(503), 3);
    up.update(&ConfigPatch {
        error_burst: Some(2),
        ..ConfigPatch::default()
    })
    .expect("patch");
    let a = via_http(&app, &t, "burst").await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(up.stats().status(503), 5);
    // A burst longer than the retries: the upstream's own 503 is the answer (the transparent
    // route passes it through; invoke wraps it with its status code), never a hang or a 500.
    up.update(&ConfigPatch {
        error_burst: Some(8),
        ..ConfigPatch::default()
    })
    .expect("patch");
    let a = via_http(&app, &t, "burst").await;
    assert_eq!(a.status, 503, "{}", a.body);
    assert_eq!(a.body["error"], "upstream_error");
    let a = get_via_invoke(&app, &t, "burst", "/price", json!({"id": "x"})).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.body["data"]["status_code"], 503);
    assert_eq!(up.stats().status(503), 13);
}

// ---- the database goes away for ~10 s under proxy load ----

async fn pg_admin(sql: &[String]) {
    use sqlx::Connection;
    sqlx::any::install_default_drivers();
    let url = std::env::var("APIPOOL_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let mut conn = sqlx::AnyConnection::connect(&url)
        .await
        .expect("PostgreSQL admin");
    for s in sql {
        sqlx::query(sqlx::AssertSqlSafe(s.clone()))
            .execute(&mut conn)
            .await
            .expect("admin statement");
    }
    let _ = conn.close().await;
}

fn db_name(app: &TestApp) -> String {
    let url = app.config.database_url.clone().expect("a PostgreSQL app");
    url.rsplit('/').next().expect("a database name").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_outage_under_proxy_load_answers_503_recovers_and_loses_no_event() {
    let app = spawn_app(Backend::Postgres).await;
    let t = app.admin_token.clone();
    let up = mock_with(&["o1", "o2"], |_| {}).await;
    add_key(&app, &t, "o1", "o1", None).await;
    add_key(&app, &t, "o2", "o2", None).await;
    make_pool(
        &app,
        &t,
        "outage",
        &["o1", "o2"],
        json!({"upstream": {"base_url": up.url()}}),
    )
    .await;
    // Proxy load: 8 clients until told to stop, counting answers by status.
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let other = Arc::new(parking_lot::Mutex::new(Vec::<u16>::new()));
    let mut load = Vec::new();
    for _ in 0..8 {
        let (client, url, t) = (
            app.client.clone(),
            app.api("/proxy/outage/http/price?id=x"),
            t.clone(),
        );
        let (stop, ok, other) = (stop.clone(), ok.clone(), other.clone());
        load.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let r = client.get(&url).bearer_auth(&t).send().await;
                match r.map(|r| r.status().as_u16()) {
                    Ok(200) => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(s) => other.lock().push(s),
                    Err(_) => other.lock().push(0),
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    let name = db_name(&app);
    pg_admin(&[
        format!("ALTER DATABASE \"{name}\" ALLOW_CONNECTIONS false"),
        format!("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"),
    ])
    .await;
    let down_at = ok.load(Ordering::Relaxed);
    let outage = tokio::time::Instant::now();
    // Writes it cannot make: 503 with a JSON detail, quickly (no hang).
    let mut refused = 0;
    while outage.elapsed() < Duration::from_secs(10) {
        let started = tokio::time::Instant::now();
        let r = app
            .post(
                &t,
                "/keys",
                json!({"identifier": format!("during-{refused}"), "raw_key": "x"}),
            )
            .await;
        assert_eq!(
            r.headers().get("retry-after").and_then(|v| v.to_str().ok()),
            Some("5")
        );
        let detail = expect_error(r, 503).await;
        assert!(detail.contains("database is unavailable"), "{detail}");
        assert!(started.elapsed() < Duration::from_secs(5));
        refused += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let during = ok.load(Ordering::Relaxed) - down_at;
    let backlog = app.state.engines.stats().writer_stats();
    pg_admin(&[format!("ALTER DATABASE \"{name}\" ALLOW_CONNECTIONS true")]).await;

    // It recovers by itself: the next write succeeds (the pool reconnects).
    let recovered = crate::proxy_helpers::eventually(Duration::from_secs(30), || async {
        app.post(
            &t,
            "/keys",
            json!({"identifier": "after", "raw_key": "after"}),
        )
        .await
        .status()
            == 201
    })
    .await;
    assert!(recovered, "writes work again once the database is back");
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for task in load {
        task.await.expect("load task");
    }
    let served = ok.load(Ordering::Relaxed);
    let failed = other.lock().clone();
    eprintln!(
        "outage: {refused} writes refused with 503; proxy calls ok={served} (during the outage {during}), other={failed:?}; writer during the outage: {backlog:?}"
    );
    // The proxy kept serving from its live engines while the database was away.
    assert!(failed.is_empty(), "proxy calls failed: {failed:?}");
    assert!(during > 0, "the proxy served during the outage");
    assert!(
        backlog.backlog > 0 || backlog.consecutive_failures > 0,
        "{backlog:?}"
    );
    // Nothing lost: every proxied call is one event, once the backlog is drained.
    let drained = crate::proxy_helpers::eventually(Duration::from_secs(60), || async {
        let r = app.get(&t, "/stats/outage/usage?seconds=3600").await;
        r.status() == 200
            && r.json::<Value>().await.expect("json")["total"].as_u64() == Some(served)
    })
    .await;
    let ws = app.state.engines.stats().writer_stats();
    assert!(drained, "stats show every call: {ws:?}, served {served}");
    assert_eq!(ws.backlog, 0);
    assert_eq!(ws.lost, 0);
    assert_eq!(up.stats().admitted_ok(), served);
}
