//! The live engines behind the proxy: state carried across requests (cooldowns, windows, bans,
//! archives), retries on another key, limits and concurrency from the pool config, and in-place
//! updates when pools, members and keys change.

use std::sync::Arc;
use std::time::Duration;

use apipool::ManualClock;
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::both_backends;
use crate::helpers::{Backend, spawn_app};
use crate::proxy_helpers::{
    add_key, get_via_invoke, invoke, key_health, make_pool, mock, mock_with, status, upstream,
};

both_backends!(
    cooldown_state_survives_across_requests,
    configured_limits_never_draw_a_429_and_apply_in_place,
    failures_retry_on_another_key_and_ban,
    invalid_keys_are_archived_until_rotated,
    membership_and_key_changes_apply_in_place,
    concurrency_and_timeout_from_the_pool_config,
    all_requests_succeed_within_the_quota,
);

fn until_secs(health: &Value) -> f64 {
    let t = OffsetDateTime::parse(health["until"].as_str().expect("until"), &Rfc3339).unwrap();
    (t - OffsetDateTime::now_utc()).as_seconds_f64()
}

async fn cooldown_state_survives_across_requests(backend: Backend) {
    let app = spawn_app(backend).await;
    let clock = ManualClock::new();
    app.state.engines.set_clock(Arc::new(clock.clone()));
    let t = app.admin_token.clone();
    // Each key: one admitted request per 60 s, then 429 with Retry-After.
    let up = mock_with(&["c1", "c2"], |c| {
        c.rate = 1;
        c.interval = 60.0;
    })
    .await;
    add_key(&app, &t, "k1", "c1", None).await;
    add_key(&app, &t, "k2", "c2", None).await;
    make_pool(
        &app,
        &t,
        "cool",
        &["k1", "k2"],
        json!({"upstream": {"base_url": up.url()}, "rotation_strategy": "round_robin",
               "pool_config": {"max_wait": 0.2}}),
    )
    .await;
    for _ in 0..2 {
        let a = get_via_invoke(&app, &t, "cool", "/price", json!({"id": "x"})).await;
        assert_eq!(a.status, 200, "{}", a.body);
        assert_eq!(a.body["data"]["status_code"], 200);
    }
    // Both windows are full: the call meets a 429 on one key, retries on the other (the
    // upstream did not process it), meets another, and gives up after the wait budget.
    let a = get_via_invoke(&app, &t, "cool", "/price", json!({"id": "x"})).await;
    assert_eq!(a.status, 429, "{}", a.body);
    assert_eq!(a.body["success"], false);
    let retry: u64 = a.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((50..=61).contains(&retry), "Retry-After {retry}");
    assert_eq!(up.stats().rate_limited(), 2);
    let s = status(&app, &t, "cool").await;
    assert_eq!(s["success"], false);
    assert_eq!(s["data"]["cooling_keys"], 2);
    for k in ["k1", "k2"] {
        let h = key_health(&s, k);
        assert_eq!(h["state"], "cooling");
        assert_eq!(h["reason"], "rate_limited");
        let left = until_secs(h);
        assert!(left > 50.0 && left <= 61.0, "{k} cools for {left}s");
        assert_eq!(h["rate_limited"], 1);
    }
    // The next request knows: it does not reach the upstream at all.
    let before = up.stats().total_requests;
    let a = get_via_invoke(&app, &t, "cool", "/price", json!({"id": "x"})).await;
    assert_eq!(a.status, 429);
    assert_eq!(up.stats().total_requests, before);
    // After the cooldown (engine clock), the keys serve again.
    up.reset();
    clock.advance(Duration::from_secs(61));
    let a = get_via_invoke(&app, &t, "cool", "/price", json!({"id": "x"})).await;
    assert_eq!(a.status, 200, "{}", a.body);
    let s = status(&app, &t, "cool").await;
    assert_eq!(s["data"]["cooling_keys"], 0);
    assert_eq!(s["success"], true);
}

async fn configured_limits_never_draw_a_429_and_apply_in_place(backend: Backend) {
    let app = spawn_app(backend).await;
    let t = app.admin_token.clone();
    let up = mock(&["lim"]).await;
    add_key(&app, &t, "k", "lim", None).await;
    make_pool(
        &app,
        &t,
        "lim",
        &["k"],
        json!({"upstream": {"base_url": up.url()},
               "pool_config": {"rate_limit": 2, "rate_limit_interval": 60, "max_wait": 0.2}}),
    )
    .await;
    for _ in 0..2 {
        let a = get_via_invoke(&app, &t, "lim", "/price", json!({"id": "x"})).await;
        assert_eq!(a.status, 200, "{}", a.body);
    }
    let a = get_via_invoke(&app, &t, "lim", "/price", json!({"id": "x"})).await;
    assert_eq!(a.status, 429, "{}", a.body);
    let retry: u64 = a.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((55..=60).contains(&retry), "Retry-After {retry}");
    assert_eq!(
        up.stats().total_requests,
        2,
        "the engine never sent the third"
    );
    let s = status(&app, &t, "lim").await;
    assert!(
        key_health(&s, "k")["skipped_because"]
            .as_str()
            .unwrap()
            .contains("window")
    );
    // Raise the limit: applied to the live engine, its window history kept (2 used of 5).
    let r = app
        .put(
            &t,
            "/pools/lim",
            json!({"pool_config": {"rate_limit": 5, "rate_limit_interval": 60, "max_wait": 0.2}}),
        )
        .await;
    assert_eq!(r.status(), 200);
    for _ in 0..3 {
        let a = get_via_invoke(&app, &t, "lim", "/price", json!({"id": "x"})).await;
        assert_eq!(a.status, 200, "{}", a.body);
    }
    let a = get_via_invoke(&app, &t, "lim", "/price", json!({"id": "x"})).await;
    assert_eq!(a.status, 429);
    assert_eq!(up.stats().total_requests, 5);
    assert_eq!(up.stats().rate_limited(), 0);
    // A config the engine cannot run is refused when stored.
    let r = app
        .put(
            &t,
            "/pools/lim",
            json!({"pool_config": {"rate_limits": [{"limit": 0, "interval": 1}]}}),
        )
        .await;
    assert_eq!(r.status(), 422);
}

async fn failures_retry_on_another_key_and_ban(backend: Backend) {
    let app = spawn_app(backend).await;
    let t = app.admin_token.clone();
    let up = mock_with(&["bad", "good"], |c| {
        c.failing_keys = vec![mock_upstream::ApiKey::parse("bad").unwrap()];
    })
    .await;
    add_key(&app, &t, "bad", "bad", None).await;
    add_key(&app, &t, "good", "good", None).await;
    make_pool(
        &app,
        &t,
        "retry",
        &["bad", "good"],
        json!({"upstream": {"base_url": up.url()}, "rotation_strategy": "round_robin",
               "pool_config": {"retry_on_failure": true, "max_retries": 1, "ban_threshold": 1, "ban_duration": 300}}),
    )
    .await;
    for _ in 0..4 {
        let a = get_via_invoke(&app, &t, "retry", "/price", json!({"id": "x"})).await;
        assert_eq!(a.status, 200, "{}", a.body);
        assert_eq!(
            a.body["data"]["status_code"], 200,
            "retried on the good key"
        );
        assert_eq!(a.body["key_identifier"], "good");
    }
    let s = status(&app, &t, "retry").await;
    let bad = key_health(&s, "bad");
    assert_eq!(bad["state"], "banned");
    assert_eq!(bad["reason"], "failures");
    assert!(until_secs(bad) > 290.0);
    assert_eq!(up.stats().status(500), 1, "banned after its first 500");

    // Without retry_on_failure the 500 is the answer (still success: true, the SDK decides).
    make_pool(
        &app,
        &t,
        "noretry",
        &["bad", "good"],
        json!({"upstream": {"base_url": up.url()}, "rotation_strategy": "round_robin"}),
    )
    .await;
    let mut codes = Vec::new();
    for _ in 0..2 {
        let a = get_via_invoke(&app, &t, "noretry", "/price", json!({"id": "x"})).await;
        assert_eq!(a.status, 200);
        codes.push(a.body["data"]["status_code"].as_u64().unwrap());
    }
    codes.sort_unstable();
    assert_eq!(codes, [200, 500]);
}

async fn invalid_keys_are_archived_until_rotated(backend: Backend) {
    let app = spawn_app(backend).await;
    let t = app.admin_token.clone();
    let up = mock_with(&["revoked-1", "fresh-1"], |c| {
        c.revoked_keys = vec![mock_upstream::ApiKey::parse("revoked-1").unwrap()];
    })
    .await;
    add_key(&app, &t, "r", "revoked-1", None).await;
    make_pool(&app, &t, "inv", &["r"], upstream(&up.url(), "bearer")).await;
    let a = get_via_invoke(&app, &t, "inv", "/price", json!({"id": "x"})).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.body["data"]["status_code"], 401);
    let s = status(&app, &t, "inv").await;
    let h = key_health(&s, "r");
    assert_eq!(h["state"], "archived");
    assert_eq!(h["reason"], "invalid_key");
    let a = get_via_invoke(&app, &t, "inv", "/price", json!({"id": "x"})).await;
    assert_eq!(a.status, 503, "{}", a.body);
    // Rotating the secret swaps it in the live engine and clears the key's health.
    let r = app
        .patch(&t, "/keys/r/rotate", json!({"new_raw_key": "fresh-1"}))
        .await;
    assert_eq!(r.status(), 200);
    let s = status(&app, &t, "inv").await;
    assert_eq!(key_health(&s, "r")["state"], "active");
    let a = invoke(
        &app,
        &t,
        "inv",
        json!({"attr_path": ["get"], "args": ["/echo/r"]}),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(
        a.body["data"]["data"]["headers"]["authorization"],
        "Bearer fresh-1"
    );
}

async fn membership_and_key_changes_apply_in_place(backend: Backend) {
    let app = spawn_app(backend).await;
    let t = app.admin_token.clone();
    let up = mock_with(&["ma", "mb", "mc"], |c| {
        c.rate = 1;
        c.interval = 60.0;
    })
    .await;
    let other = mock(&["ma", "mb"]).await;
    for (id, raw) in [("a", "ma"), ("b", "mb"), ("c", "mc")] {
        add_key(&app, &t, id, raw, None).await;
    }
    make_pool(
        &app,
        &t,
        "live",
        &["a"],
        json!({"upstream": {"base_url": up.url()}, "pool_config": {"max_wait": 0.2}}),
    )
    .await;
    assert_eq!(
        get_via_invoke(&app, &t, "live", "/price", json!({"id": "x"}))
            .await
            .status,
        200
    );
    assert_eq!(
        get_via_invoke(&app, &t, "live", "/price", json!({"id": "x"}))
            .await
            .status,
        429
    );
    let live_before = app.state.engines.live_pools();
    // Add a member: the cooling key stays cooling, the new one serves.
    let r = app
        .post(&t, "/pools/live/members", json!({"key_identifiers": ["b"]}))
        .await;
    assert_eq!(r.status(), 200);
    let s = status(&app, &t, "live").await;
    assert_eq!(key_health(&s, "a")["state"], "cooling");
    assert_eq!(key_health(&s, "b")["state"], "active");
    let a = get_via_invoke(&app, &t, "live", "/price", json!({"id": "x"})).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.body["key_identifier"], "b");
    // Remove it again.
    let r = app.delete(&t, "/pools/live/members/b").await;
    assert_eq!(r.status(), 204);
    let s = status(&app, &t, "live").await;
    assert_eq!(s["data"]["total_keys"], 1);
    // Rename the pool: same engine (state kept), old name gone.
    let r = app
        .put(&t, "/pools/live", json!({"identifier": "renamed"}))
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        get_via_invoke(&app, &t, "live", "/price", json!({"id": "x"}))
            .await
            .status,
        404
    );
    let s = status(&app, &t, "renamed").await;
    assert_eq!(key_health(&s, "a")["state"], "cooling");
    assert_eq!(key_health(&s, "a")["calls"], 2);
    assert_eq!(app.state.engines.live_pools(), live_before);
    // Rename and disable keys.
    let r = app
        .post(
            &t,
            "/pools/renamed/members",
            json!({"key_identifiers": ["c"]}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let r = app.put(&t, "/keys/c", json!({"identifier": "c2"})).await;
    assert_eq!(r.status(), 200);
    let s = status(&app, &t, "renamed").await;
    assert_eq!(key_health(&s, "c2")["state"], "active");
    let r = app.put(&t, "/keys/c2", json!({"is_active": false})).await;
    assert_eq!(r.status(), 200);
    let s = status(&app, &t, "renamed").await;
    assert_eq!(key_health(&s, "c2")["state"], "disabled");
    let r = app
        .put(
            &t,
            "/keys/c2",
            json!({"is_archived": true, "is_active": true}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let s = status(&app, &t, "renamed").await;
    assert_eq!(key_health(&s, "c2")["state"], "archived");
    assert_eq!(key_health(&s, "c2")["reason"], "manual");
    // Delete a key: it leaves the engine.
    let r = app.delete(&t, "/keys/c2").await;
    assert_eq!(r.status(), 204);
    let s = status(&app, &t, "renamed").await;
    assert_eq!(s["data"]["total_keys"], 1);
    // A new upstream applies to the next call.
    let r = app
        .put(
            &t,
            "/pools/renamed",
            json!({"upstream": {"base_url": other.url()}}),
        )
        .await;
    assert_eq!(r.status(), 200);
    // `a` is still cooling (and knows its limit there); `b` serves on the new upstream.
    let r = app
        .post(
            &t,
            "/pools/renamed/members",
            json!({"key_identifiers": ["b"]}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let a = get_via_invoke(&app, &t, "renamed", "/price", json!({"id": "x"})).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.body["key_identifier"], "b");
    assert_eq!(other.stats().admitted_ok(), 1);
    // Delete the pool: its engine goes.
    let r = app.delete(&t, "/pools/renamed").await;
    assert_eq!(r.status(), 204);
    assert_eq!(app.state.engines.live_pools(), live_before - 1);
    let r = app.get(&t, "/proxy/renamed/status").await;
    assert_eq!(r.status(), 404);
}

async fn concurrency_and_timeout_from_the_pool_config(backend: Backend) {
    let app = spawn_app(backend).await;
    let t = app.admin_token.clone();
    let up = mock_with(&["slow"], |c| {
        c.timeout_rate = 1.0;
        c.hang_ms = 10_000;
    })
    .await;
    add_key(&app, &t, "k", "slow", None).await;
    make_pool(
        &app,
        &t,
        "slow",
        &["k"],
        json!({"upstream": {"base_url": up.url()},
               "pool_config": {"concurrency": 1, "timeout": 1, "max_wait": 0.1}}),
    )
    .await;
    let first = {
        let client = app.client.clone();
        let url = app.api("/proxy/slow/invoke");
        let t = t.clone();
        tokio::spawn(async move {
            client
                .post(url)
                .bearer_auth(t)
                .json(&json!({"attr_path": ["get"], "args": ["/price"], "kwargs": {"params": {"id": "x"}}}))
                .send()
                .await
                .unwrap()
        })
    };
    let busy = crate::proxy_helpers::eventually(Duration::from_secs(5), || async {
        key_health(&status(&app, &t, "slow").await, "k")["in_flight"] == 1
    })
    .await;
    assert!(busy, "the first call is in flight");
    // concurrency 1: a second call cannot start within the wait budget.
    let a = get_via_invoke(&app, &t, "slow", "/price", json!({"id": "x"})).await;
    assert_eq!(a.status, 429, "{}", a.body);
    assert!(a.headers.contains_key("retry-after"));
    // timeout 1 s: the first one gives up with 504.
    let r = first.await.unwrap();
    assert_eq!(r.status(), 504);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["success"], false);
    assert!(v["error"].as_str().unwrap().contains("timeout"), "{v}");
}

async fn all_requests_succeed_within_the_quota(backend: Backend) {
    let app = spawn_app(backend).await;
    let t = app.admin_token.clone();
    let raws: Vec<String> = (0..3).map(|i| format!("quota-{i}")).collect();
    let raw_refs: Vec<&str> = raws.iter().map(String::as_str).collect();
    let up = mock_with(&raw_refs, |c| {
        c.rate = 5;
        c.interval = 1.0;
    })
    .await;
    let mut idents = Vec::new();
    for (i, raw) in raws.iter().enumerate() {
        add_key(&app, &t, &format!("q{i}"), raw, None).await;
        idents.push(format!("q{i}"));
    }
    let members: Vec<&str> = idents.iter().map(String::as_str).collect();
    make_pool(
        &app,
        &t,
        "quota",
        &members,
        json!({"upstream": {"base_url": up.url()},
               "pool_config": {"rate_limit": 5, "rate_limit_interval": 1}}),
    )
    .await;
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let client = app.client.clone();
        let url = app.api("/proxy/quota/http/price?id=btc");
        let t = t.clone();
        tasks.push(tokio::spawn(async move {
            let mut ok = 0;
            for _ in 0..6 {
                let r = client.get(&url).bearer_auth(&t).send().await.unwrap();
                if r.status() == 200 {
                    ok += 1;
                }
            }
            ok
        }));
    }
    let mut ok = 0;
    for task in tasks {
        ok += task.await.unwrap();
    }
    assert_eq!(
        ok, 60,
        "every request waited for a free key instead of failing"
    );
    assert_eq!(
        up.stats().rate_limited(),
        0,
        "the engine never exceeded the limits"
    );
    assert_eq!(up.stats().admitted_ok(), 60);
}
