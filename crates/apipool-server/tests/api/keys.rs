use serde_json::{Value, json};
use wiremock::matchers::{header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::both_backends;
use crate::helpers::{Backend, expect_error, spawn_app};

both_backends!(
    key_crud_and_validation,
    key_listing_filters_and_paging,
    key_rotate_raw_export,
    key_verify_against_upstream,
    cross_user_keys_are_404,
);

async fn key_crud_and_validation(backend: Backend) {
    let app = spawn_app(backend).await;
    let t = app.admin_token.clone();
    let r = app
        .post(&t, "/keys", json!({
            "identifier": "openai-1", "raw_key": "sk-crud-secret-0001", "alias": "main",
            "client_config": { "base_url": "https://api.example.com", "headers": { "X-Org": "7" }, "n": [1, 2.5] },
            "tags": ["prod", "openai", "prod"], "description": "first"
        }))
        .await;
    assert_eq!(r.status(), 201);
    let text = r.text().await.unwrap();
    assert!(!text.contains("sk-crud-secret"), "no raw key in responses");
    let k: Value = serde_json::from_str(&text).unwrap();
    for f in [
        "id",
        "identifier",
        "alias",
        "client_config",
        "is_active",
        "is_archived",
        "verification_status",
        "last_verified_at",
        "tags",
        "description",
        "created_at",
        "updated_at",
    ] {
        assert!(k.get(f).is_some(), "missing {f}");
    }
    assert_eq!(k["tags"], json!(["prod", "openai"]));
    assert_eq!(k["client_config"]["n"], json!([1, 2.5]));
    assert_eq!(k["verification_status"], "unverified");
    assert_eq!(k["is_active"], true);

    // duplicates
    let r = app
        .post(
            &t,
            "/keys",
            json!({ "identifier": "openai-1", "raw_key": "sk-other-0002" }),
        )
        .await;
    expect_error(r, 409).await;
    let r = app
        .post(
            &t,
            "/keys",
            json!({ "identifier": "openai-2", "raw_key": "sk-crud-secret-0001" }),
        )
        .await;
    let d = expect_error(r, 409).await;
    assert!(d.contains("openai-1") && !d.contains("sk-crud"), "{d}");

    // validation: 422 naming the field, never 500
    for (field, body) in [
        (
            "identifier",
            json!({ "identifier": "x".repeat(129), "raw_key": "k" }),
        ),
        ("identifier", json!({ "identifier": "", "raw_key": "k" })),
        ("identifier", json!({ "identifier": "a/b", "raw_key": "k" })),
        ("identifier", json!({ "identifier": "raw", "raw_key": "k" })),
        ("raw_key", json!({ "identifier": "ok", "raw_key": "" })),
        (
            "raw_key",
            json!({ "identifier": "ok", "raw_key": "k".repeat(4097) }),
        ),
        (
            "alias",
            json!({ "identifier": "ok", "raw_key": "k", "alias": "a".repeat(129) }),
        ),
        (
            "description",
            json!({ "identifier": "ok", "raw_key": "k", "description": "d".repeat(2001) }),
        ),
        (
            "tags",
            json!({ "identifier": "ok", "raw_key": "k", "tags": ["t".repeat(65)] }),
        ),
        (
            "client_config",
            json!({ "identifier": "ok", "raw_key": "k", "client_config": [1] }),
        ),
        ("identifier", json!({ "identifier": 5, "raw_key": "k" })),
        ("raw_key", json!({ "identifier": "ok" })),
    ] {
        let d = expect_error(app.post(&t, "/keys", body).await, 422).await;
        assert!(d.contains(field), "{d} should name {field}");
    }
    let r = app
        .client
        .post(app.api("/keys"))
        .bearer_auth(&t)
        .header("content-type", "application/json")
        .body("{\"identifier\": ")
        .send()
        .await
        .unwrap();
    expect_error(r, 400).await;
    let r = app
        .client
        .post(app.api("/keys"))
        .bearer_auth(&t)
        .body("x")
        .send()
        .await
        .unwrap();
    expect_error(r, 415).await;

    // get / update / delete
    let got: Value = app.get(&t, "/keys/openai-1").await.json().await.unwrap();
    assert_eq!(got["id"], k["id"]);
    let r = app
        .put(&t, "/keys/openai-1", json!({ "identifier": "openai-main", "alias": null, "tags": ["x"], "is_archived": true }))
        .await;
    assert_eq!(r.status(), 200);
    let up: Value = r.json().await.unwrap();
    assert_eq!(up["identifier"], "openai-main");
    assert_eq!(up["alias"], Value::Null);
    assert_eq!(up["description"], "first");
    assert_eq!(up["tags"], json!(["x"]));
    assert_eq!(up["is_archived"], true);
    expect_error(app.get(&t, "/keys/openai-1").await, 404).await;
    app.create_key(&t, "second", "sk-second-0003").await;
    let r = app
        .put(&t, "/keys/second", json!({ "identifier": "openai-main" }))
        .await;
    expect_error(r, 409).await;
    let r = app
        .put(&t, "/keys/second", json!({ "alias": "a".repeat(200) }))
        .await;
    assert!(expect_error(r, 422).await.starts_with("alias"));
    let r = app.put(&t, "/keys/second", json!({ "bogus": 1 })).await;
    expect_error(r, 422).await;
    assert_eq!(app.delete(&t, "/keys/second").await.status(), 204);
    expect_error(app.delete(&t, "/keys/second").await, 404).await;
    expect_error(app.get(&t, "/keys/second").await, 404).await;
}

async fn key_listing_filters_and_paging(backend: Backend) {
    let app = spawn_app(backend).await;
    let t = app.admin_token.clone();
    for i in 0..25 {
        let tags = if i % 5 == 0 {
            json!(["five"])
        } else {
            json!([])
        };
        let r = app
            .post(&t, "/keys", json!({ "identifier": format!("k{i:02}"), "raw_key": format!("sk-list-{i}"),
                                        "alias": if i == 7 { "Lucky_Seven" } else { "plain" }, "tags": tags }))
            .await;
        assert_eq!(r.status(), 201);
    }
    app.put(&t, "/keys/k03", json!({ "is_active": false }))
        .await;
    let page: Value = app.get(&t, "/keys").await.json().await.unwrap();
    assert_eq!(page["total"], 25);
    assert_eq!(page["page"], 1);
    assert_eq!(page["page_size"], 20);
    assert_eq!(page["items"].as_array().unwrap().len(), 20);
    assert_eq!(page["items"][0]["identifier"], "k00");
    let p2: Value = app
        .get(&t, "/keys?page=2&page_size=20")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(p2["items"].as_array().unwrap().len(), 5);
    assert_eq!(p2["items"][0]["identifier"], "k20");
    let tagged: Value = app.get(&t, "/keys?tag=five").await.json().await.unwrap();
    assert_eq!(tagged["total"], 5);
    let inactive: Value = app
        .get(&t, "/keys?is_active=false")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(inactive["total"], 1);
    assert_eq!(inactive["items"][0]["identifier"], "k03");
    let search: Value = app
        .get(&t, "/keys?search=lucky_")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(search["total"], 1);
    let pct: Value = app.get(&t, "/keys?search=%25").await.json().await.unwrap();
    assert_eq!(pct["total"], 0, "LIKE wildcards are escaped");
    let vs: Value = app
        .get(&t, "/keys?verification_status=unverified&page_size=1")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(vs["total"], 25);
    expect_error(app.get(&t, "/keys?page_size=0").await, 422).await;
    expect_error(app.get(&t, "/keys?page=0").await, 422).await;
    expect_error(app.get(&t, "/keys?is_active=maybe").await, 422).await;
}

async fn key_rotate_raw_export(backend: Backend) {
    let app = spawn_app(backend).await;
    let t = app.admin_token.clone();
    app.post(&t, "/keys", json!({ "identifier": "a", "raw_key": "sk-export-aaa", "alias": "A, with comma",
                                  "tags": ["t1"], "client_config": { "base_url": "https://x.io" } })).await;
    app.create_key(&t, "b", "sk-export-bbb").await;
    let raw: Value = app.get(&t, "/keys/a/raw").await.json().await.unwrap();
    assert_eq!(raw["raw_key"], "sk-export-aaa");
    assert_eq!(raw["identifier"], "a");
    assert_eq!(raw["tags"], json!(["t1"]));
    // rotate
    app.clock.advance(std::time::Duration::from_secs(5));
    let r = app
        .patch(
            &t,
            "/keys/a/rotate",
            json!({ "new_raw_key": "sk-export-rotated" }),
        )
        .await;
    assert_eq!(r.status(), 200);
    let rotated: Value = r.json().await.unwrap();
    assert_eq!(rotated["verification_status"], "unverified");
    assert_ne!(rotated["updated_at"], rotated["created_at"]);
    let raw: Value = app.get(&t, "/keys/a/raw").await.json().await.unwrap();
    assert_eq!(raw["raw_key"], "sk-export-rotated");
    let r = app
        .patch(
            &t,
            "/keys/a/rotate",
            json!({ "new_raw_key": "sk-export-bbb" }),
        )
        .await;
    expect_error(r, 409).await;
    let r = app
        .patch(&t, "/keys/a/rotate", json!({ "new_raw_key": "" }))
        .await;
    assert!(expect_error(r, 422).await.starts_with("new_raw_key"));
    expect_error(
        app.patch(&t, "/keys/zz/rotate", json!({ "new_raw_key": "x" }))
            .await,
        404,
    )
    .await;
    // export without raw keys
    let r = app.get(&t, "/keys/export").await;
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/csv")
    );
    let csv = r.text().await.unwrap();
    assert!(!csv.contains("sk-export"), "{csv}");
    let mut rdr = csv::Reader::from_reader(csv.as_bytes());
    let headers = rdr.headers().unwrap().clone();
    assert_eq!(&headers[0], "identifier");
    let rows: Vec<csv::StringRecord> = rdr.records().map(Result::unwrap).collect();
    assert_eq!(rows.len(), 2);
    assert_eq!(&rows[0][1], "A, with comma");
    // export with raw keys (explicit opt-in)
    let csv = app
        .get(&t, "/keys/export?include_raw=true")
        .await
        .text()
        .await
        .unwrap();
    let mut rdr = csv::Reader::from_reader(csv.as_bytes());
    let rows: Vec<csv::StringRecord> = rdr.records().map(Result::unwrap).collect();
    assert_eq!(&rows[0][11], "sk-export-rotated");
    assert_eq!(&rows[1][11], "sk-export-bbb");
}

async fn key_verify_against_upstream(backend: Backend) {
    let app = spawn_app(backend).await;
    let t = app.admin_token.clone();
    let upstream = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/v1/models"))
        .and(header("authorization", "Bearer sk-good-key"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&upstream)
        .await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(401))
        .mount(&upstream)
        .await;
    let cfg = json!({ "base_url": format!("{}/v1", upstream.uri()), "verify_path": "models" });
    app.post(
        &t,
        "/keys",
        json!({ "identifier": "good", "raw_key": "sk-good-key", "client_config": cfg }),
    )
    .await;
    app.post(
        &t,
        "/keys",
        json!({ "identifier": "bad", "raw_key": "sk-bad-key", "client_config": cfg }),
    )
    .await;
    app.create_key(&t, "nocfg", "sk-nocfg-key").await;
    let r = app.post(&t, "/keys/good/verify", json!({})).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["verification_status"], "valid");
    assert_eq!(v["http_status"], 200);
    let v: Value = app
        .post(&t, "/keys/bad/verify", json!({}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["verification_status"], "invalid");
    let k: Value = app.get(&t, "/keys/good").await.json().await.unwrap();
    assert_eq!(k["verification_status"], "valid");
    assert!(k["last_verified_at"].is_string());
    let d = expect_error(app.post(&t, "/keys/nocfg/verify", json!({})).await, 422).await;
    assert!(d.starts_with("client_config.base_url"));
    let filtered: Value = app
        .get(&t, "/keys?verification_status=invalid")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(filtered["items"][0]["identifier"], "bad");
}

async fn cross_user_keys_are_404(backend: Backend) {
    let app = spawn_app(backend).await;
    let alice = app.new_user("alice").await;
    let bob = app.new_user("bob").await;
    app.create_key(&alice, "shared-name", "sk-alice-secret-1")
        .await;
    app.create_pool(&alice, "alice-pool", &["shared-name"])
        .await;
    // bob sees nothing of alice's
    for p in ["/keys/shared-name", "/keys/shared-name/raw"] {
        expect_error(app.get(&bob, p).await, 404).await;
    }
    expect_error(
        app.put(&bob, "/keys/shared-name", json!({ "alias": "x" }))
            .await,
        404,
    )
    .await;
    expect_error(
        app.patch(
            &bob,
            "/keys/shared-name/rotate",
            json!({ "new_raw_key": "y" }),
        )
        .await,
        404,
    )
    .await;
    expect_error(
        app.post(&bob, "/keys/shared-name/verify", json!({})).await,
        404,
    )
    .await;
    expect_error(app.delete(&bob, "/keys/shared-name").await, 404).await;
    let listed: Value = app.get(&bob, "/keys").await.json().await.unwrap();
    assert_eq!(listed["total"], 0);
    assert!(
        !app.get(&bob, "/keys/export?include_raw=true")
            .await
            .text()
            .await
            .unwrap()
            .contains("sk-alice")
    );
    // identifiers are unique per user: bob may use the same names, and even the same value
    app.create_key(&bob, "shared-name", "sk-alice-secret-1")
        .await;
    let r = app
        .post(
            &bob,
            "/pools",
            json!({ "identifier": "p", "name": "p", "key_identifiers": ["nonexistent"] }),
        )
        .await;
    assert!(expect_error(r, 422).await.starts_with("key_identifiers"));
    // alice's key still intact
    let raw: Value = app
        .get(&alice, "/keys/shared-name/raw")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(raw["raw_key"], "sk-alice-secret-1");
}
