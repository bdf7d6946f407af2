use serde_json::{Value, json};

use crate::both_backends;
use crate::helpers::{Backend, expect_error, spawn_app};

both_backends!(
    pool_crud_config_and_members,
    pool_validation,
    raw_keys_for_pool_sdk_shape,
    cross_user_pools_are_404,
);

async fn pool_crud_config_and_members(backend: Backend) {
    let app = spawn_app(backend).await;
    let t = app.admin_token.clone();
    for i in 0..3 {
        app.create_key(&t, &format!("k{i}"), &format!("sk-pool-{i}"))
            .await;
    }
    let cfg = json!({
        "concurrency": 4, "timeout": 12.5, "rate_limit": 100, "rate_limit_interval": 60,
        "retry_on_failure": true, "max_retries": 2, "custom": { "nested": [1, { "a": null }] },
        "batch_retry_on_failure": null, "batch_max_retries": null, "ban_threshold": 3, "ban_duration": 300.0,
        "future_field": "kept verbatim"
    });
    let r = app
        .post(&t, "/pools", json!({
            "identifier": "coingecko", "name": "CoinGecko", "description": "prices",
            "reach_limit_exception": "coingecko.RateLimitError", "rotation_strategy": "round_robin",
            "pool_config": cfg, "key_identifiers": ["k0", "k1"],
            "upstream": { "base_url": "https://api.coingecko.com/api/v3", "auth": "header:x-cg-pro-api-key" }
        }))
        .await;
    assert_eq!(r.status(), 201);
    let p: Value = r.json().await.unwrap();
    for f in [
        "id",
        "identifier",
        "name",
        "description",
        "client_type",
        "reach_limit_exception",
        "rotation_strategy",
        "pool_config",
        "is_active",
        "member_count",
        "members",
        "created_at",
        "updated_at",
        "upstream",
    ] {
        assert!(p.get(f).is_some(), "missing {f}");
    }
    assert_eq!(p["client_type"], "generic");
    assert_eq!(p["pool_config"], cfg, "pool_config round-trips verbatim");
    assert_eq!(p["member_count"], 2);
    assert_eq!(p["upstream"]["auth"], "header:x-cg-pro-api-key");
    assert_eq!(p["members"][0]["key_identifier"], "k0");
    for f in [
        "key_identifier",
        "alias",
        "priority",
        "weight",
        "verification_status",
    ] {
        assert!(p["members"][0].get(f).is_some(), "member lacks {f}");
    }
    // the exact shape the Python SDK's get_config reads
    let c: Value = app
        .get(&t, "/pools/coingecko/config")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        c,
        json!({
            "pool_identifier": "coingecko", "client_type": "generic",
            "reach_limit_exception": "coingecko.RateLimitError", "rotation_strategy": "round_robin",
            "pool_config": cfg
        })
    );
    // duplicate
    expect_error(
        app.post(
            &t,
            "/pools",
            json!({ "identifier": "coingecko", "name": "x" }),
        )
        .await,
        409,
    )
    .await;
    // members: add with priority/weight, upsert, remove
    let r = app
        .post(
            &t,
            "/pools/coingecko/members",
            json!({ "key_identifiers": ["k2"], "priority": 5, "weight": 3 }),
        )
        .await;
    let p: Value = r.json().await.unwrap();
    assert_eq!(p["member_count"], 3);
    assert_eq!(
        p["members"][0]["key_identifier"], "k2",
        "highest priority first"
    );
    assert_eq!(p["members"][0]["weight"], 3);
    let r = app
        .post(
            &t,
            "/pools/coingecko/members",
            json!({ "key_identifiers": ["k2"], "priority": -1 }),
        )
        .await;
    let p: Value = r.json().await.unwrap();
    assert_eq!(p["member_count"], 3);
    assert_eq!(p["members"][2]["key_identifier"], "k2");
    let page: Value = app
        .get(&t, "/pools/coingecko/members?page_size=2")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(page["total"], 3);
    assert_eq!(page["items"].as_array().unwrap().len(), 2);
    assert_eq!(
        app.delete(&t, "/pools/coingecko/members/k2").await.status(),
        204
    );
    expect_error(app.delete(&t, "/pools/coingecko/members/k2").await, 404).await;
    // status
    app.put(&t, "/keys/k1", json!({ "is_archived": true }))
        .await;
    let s: Value = app
        .get(&t, "/pools/coingecko/status")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(s["total_keys"], 2);
    assert_eq!(s["available_keys"], 1);
    assert_eq!(s["archived_keys"], 1);
    assert_eq!(s["unverified_keys"], 2);
    // update: pool_config replaced whole, null clears; rename
    let r = app
        .put(
            &t,
            "/pools/coingecko",
            json!({ "pool_config": { "timeout": 5 }, "rotation_strategy": "weighted" }),
        )
        .await;
    let p: Value = r.json().await.unwrap();
    assert_eq!(p["pool_config"], json!({ "timeout": 5 }));
    assert_eq!(p["rotation_strategy"], "weighted");
    assert_eq!(p["description"], "prices");
    let r = app
        .put(
            &t,
            "/pools/coingecko",
            json!({ "pool_config": null, "upstream": null, "identifier": "cg" }),
        )
        .await;
    let p: Value = r.json().await.unwrap();
    assert_eq!(p["pool_config"], Value::Null);
    assert_eq!(p["upstream"], Value::Null);
    let c: Value = app.get(&t, "/pools/cg/config").await.json().await.unwrap();
    assert_eq!(c["pool_config"], Value::Null);
    // list (paged, without members)
    app.create_pool(&t, "another", &[]).await;
    let l: Value = app
        .get(&t, "/pools?page_size=1")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(l["total"], 2);
    assert_eq!(l["items"][0]["identifier"], "another");
    assert!(l["items"][0].get("members").is_none());
    // deleting a key drops the membership; deleting a pool keeps the keys
    app.delete(&t, "/keys/k0").await;
    let p: Value = app.get(&t, "/pools/cg").await.json().await.unwrap();
    assert_eq!(p["member_count"], 1);
    assert_eq!(app.delete(&t, "/pools/cg").await.status(), 204);
    expect_error(app.get(&t, "/pools/cg").await, 404).await;
    assert_eq!(app.get(&t, "/keys/k1").await.status(), 200);
}

async fn pool_validation(backend: Backend) {
    let app = spawn_app(backend).await;
    let t = app.admin_token.clone();
    for (field, cfg) in [
        ("pool_config.concurrency", json!({ "concurrency": 1001 })),
        ("pool_config.concurrency", json!({ "concurrency": 1.5 })),
        ("pool_config.timeout", json!({ "timeout": 0.5 })),
        ("pool_config.timeout", json!({ "timeout": "30" })),
        ("pool_config.rate_limit", json!({ "rate_limit": -1 })),
        (
            "pool_config.rate_limit_interval",
            json!({ "rate_limit_interval": 86401 }),
        ),
        ("pool_config.max_retries", json!({ "max_retries": 51 })),
        ("pool_config.ban_threshold", json!({ "ban_threshold": 0 })),
        ("pool_config.ban_duration", json!({ "ban_duration": 9 })),
        (
            "pool_config.retry_on_failure",
            json!({ "retry_on_failure": "yes" }),
        ),
        (
            "pool_config.batch_max_retries",
            json!({ "batch_max_retries": 99 }),
        ),
        ("pool_config.custom", json!({ "custom": 3 })),
        ("pool_config", json!([1, 2])),
    ] {
        let r = app
            .post(
                &t,
                "/pools",
                json!({ "identifier": "p", "name": "p", "pool_config": cfg }),
            )
            .await;
        let d = expect_error(r, 422).await;
        assert!(d.starts_with(field), "{d} should name {field}");
    }
    for (field, up) in [
        ("upstream.base_url", json!({ "base_url": "ftp://x.io" })),
        ("upstream.base_url", json!({ "base_url": "not a url" })),
        (
            "upstream.base_url",
            json!({ "base_url": "https://user:pw@x.io" }),
        ),
        ("upstream.base_url", json!({ "auth": "bearer" })),
        (
            "upstream.auth",
            json!({ "base_url": "https://x.io", "auth": "cookie" }),
        ),
        (
            "upstream.auth",
            json!({ "base_url": "https://x.io", "auth": "header:" }),
        ),
        (
            "upstream.auth",
            json!({ "base_url": "https://x.io", "auth": "query:a b" }),
        ),
        (
            "upstream.extra",
            json!({ "base_url": "https://x.io", "extra": 1 }),
        ),
    ] {
        let r = app
            .post(
                &t,
                "/pools",
                json!({ "identifier": "p", "name": "p", "upstream": up }),
            )
            .await;
        let d = expect_error(r, 422).await;
        assert!(d.starts_with(field), "{d} should name {field}");
    }
    for (field, body) in [
        (
            "identifier",
            json!({ "identifier": "x".repeat(129), "name": "p" }),
        ),
        ("name", json!({ "identifier": "p", "name": "" })),
        (
            "rotation_strategy",
            json!({ "identifier": "p", "name": "p", "rotation_strategy": "fastest" }),
        ),
        (
            "client_type",
            json!({ "identifier": "p", "name": "p", "client_type": "a b" }),
        ),
        (
            "reach_limit_exception",
            json!({ "identifier": "p", "name": "p", "reach_limit_exception": "e".repeat(257) }),
        ),
    ] {
        let d = expect_error(app.post(&t, "/pools", body).await, 422).await;
        assert!(d.starts_with(field), "{d} should name {field}");
    }
    let r = app.post(&t, "/pools", json!({ "identifier": "ok", "name": "ok", "upstream": { "base_url": "http://127.0.0.1:9/v1" } })).await;
    let p: Value = r.json().await.unwrap();
    assert_eq!(
        p["upstream"],
        json!({ "base_url": "http://127.0.0.1:9/v1", "auth": "bearer" })
    );
    for s in ["random", "round_robin", "least_used", "weighted"] {
        let r = app
            .put(&t, "/pools/ok", json!({ "rotation_strategy": s }))
            .await;
        assert_eq!(r.status(), 200);
    }
    let r = app
        .post(
            &t,
            "/pools/ok/members",
            json!({ "key_identifiers": [], "priority": 0 }),
        )
        .await;
    expect_error(r, 422).await;
    app.create_key(&t, "k", "sk-validation-k").await;
    let r = app
        .post(
            &t,
            "/pools/ok/members",
            json!({ "key_identifiers": ["k"], "weight": 0 }),
        )
        .await;
    assert!(expect_error(r, 422).await.starts_with("weight"));
    let r = app
        .put(
            &t,
            "/pools/ok",
            json!({ "pool_config": { "timeout": 9999 } }),
        )
        .await;
    assert!(
        expect_error(r, 422)
            .await
            .starts_with("pool_config.timeout")
    );
}

async fn raw_keys_for_pool_sdk_shape(backend: Backend) {
    let app = spawn_app(backend).await;
    let t = app.admin_token.clone();
    app.create_pool(&t, "empty", &[]).await;
    let r = app.get(&t, "/keys/raw?pool_identifier=empty").await;
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(
        body,
        json!({ "client_type": "generic", "keys": [], "total": 0 })
    );
    expect_error(app.get(&t, "/keys/raw?pool_identifier=missing").await, 404).await;
    expect_error(app.get(&t, "/keys/raw").await, 422).await;
    app.post(
        &t,
        "/keys",
        json!({ "identifier": "a", "raw_key": "sk-raw-a", "alias": "A", "tags": ["x"] }),
    )
    .await;
    app.create_key(&t, "b", "sk-raw-b").await;
    app.create_key(&t, "c", "sk-raw-c").await;
    app.create_pool(&t, "full", &["a", "b", "c"]).await;
    app.post(
        &t,
        "/pools/full/members",
        json!({ "key_identifiers": ["c"], "priority": 10 }),
    )
    .await;
    app.put(&t, "/keys/b", json!({ "is_active": false })).await;
    let body: Value = app
        .get(&t, "/keys/raw?pool_identifier=full")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(body["total"], 2);
    assert_eq!(
        body["keys"][0],
        json!({ "identifier": "c", "raw_key": "sk-raw-c", "alias": null, "tags": [] })
    );
    assert_eq!(
        body["keys"][1],
        json!({ "identifier": "a", "raw_key": "sk-raw-a", "alias": "A", "tags": ["x"] })
    );
}

async fn cross_user_pools_are_404(backend: Backend) {
    let app = spawn_app(backend).await;
    let alice = app.new_user("alice").await;
    let bob = app.new_user("bob").await;
    app.create_key(&alice, "ak", "sk-alice-pool-key").await;
    app.create_pool(&alice, "secret-pool", &["ak"]).await;
    app.create_key(&bob, "bk", "sk-bob-pool-key").await;
    for p in [
        "/pools/secret-pool",
        "/pools/secret-pool/config",
        "/pools/secret-pool/status",
        "/pools/secret-pool/members",
        "/keys/raw?pool_identifier=secret-pool",
    ] {
        expect_error(app.get(&bob, p).await, 404).await;
    }
    expect_error(
        app.put(&bob, "/pools/secret-pool", json!({ "name": "mine" }))
            .await,
        404,
    )
    .await;
    expect_error(
        app.post(
            &bob,
            "/pools/secret-pool/members",
            json!({ "key_identifiers": ["bk"] }),
        )
        .await,
        404,
    )
    .await;
    expect_error(app.delete(&bob, "/pools/secret-pool/members/ak").await, 404).await;
    expect_error(app.delete(&bob, "/pools/secret-pool").await, 404).await;
    // bob cannot add alice's key to his own pool either
    app.create_pool(&bob, "bob-pool", &[]).await;
    let r = app
        .post(
            &bob,
            "/pools/bob-pool/members",
            json!({ "key_identifiers": ["ak"] }),
        )
        .await;
    expect_error(r, 422).await;
    let l: Value = app.get(&bob, "/pools").await.json().await.unwrap();
    assert_eq!(l["total"], 1);
    // same pool name for bob is fine (unique per user)
    app.create_pool(&bob, "secret-pool", &["bk"]).await;
    let c: Value = app
        .get(&alice, "/pools/secret-pool")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(c["members"][0]["key_identifier"], "ak");
}
