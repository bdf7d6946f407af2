//! An attacker's checklist against the API: another user's resources on every route of the
//! OpenAPI document (so a new route is covered without editing this file), tampered, forged and
//! misused tokens, CORS, and error bodies for malformed requests.

use std::collections::BTreeSet;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};

use crate::both_backends;
use crate::helpers::{Backend, TestApp, expect_error, spawn_app};
use crate::proxy_helpers::{add_key, make_pool, mock, upstream};

both_backends!(
    every_route_hides_other_users_resources,
    tampered_forged_and_misused_tokens_are_refused,
    a_keys_base_url_cannot_point_outside_http,
);

const ALICE_RAW: &str = "sk-alice-raw-canary-7f3e";
const MALLORY_RAW: &str = "sk-mallory-raw-canary-19ab";

/// Path parameters of the API, filled with Alice's names (`real`) or names nobody has (`ghost`).
fn fill(template: &str, alice_id: &str, real: bool) -> String {
    let (key, pool, id) = if real {
        ("alice-key", "alice-pool", alice_id.to_owned())
    } else {
        (
            "ghost-key",
            "ghost-pool",
            "00000000-0000-4000-8000-000000000000".to_owned(),
        )
    };
    template
        .replace("{identifier}", key)
        .replace("{key}", key)
        .replace("{pool}", pool)
        .replace("{id}", &id)
        .replace("{path}", "price")
}

/// A body the route accepts when the resource is the caller's, so that the only reason left to
/// refuse is ownership. Routes not listed get `{}`; a new route that needs more fails this test
/// with a 422, which says to add it here.
fn body_for(method: &str, template: &str) -> Option<Value> {
    let body = match (method, template) {
        ("put", "/api/v1/keys/{identifier}") => json!({ "alias": "taken over" }),
        ("patch", "/api/v1/keys/{identifier}/rotate") => json!({ "new_raw_key": MALLORY_RAW }),
        ("put", "/api/v1/pools/{pool}") => json!({ "name": "taken over" }),
        ("post", "/api/v1/pools/{pool}/members") => json!({ "key_identifiers": ["mallory-key"] }),
        ("post", "/api/v1/proxy/{pool}/invoke" | "/api/v1/proxy/{pool}/call") => {
            json!({ "attr_path": ["get"], "args": ["/price"], "kwargs": {"params": {"id": "x"}} })
        }
        ("patch", "/api/v1/users/{id}") => json!({ "is_active": false }),
        ("get" | "delete" | "head", _) => return None,
        _ => json!({}),
    };
    Some(body)
}

struct Reply {
    status: u16,
    text: String,
}

async fn send(app: &TestApp, token: &str, method: &str, path: &str, body: Option<&Value>) -> Reply {
    let mut rb = app
        .client
        .request(
            method.to_uppercase().parse().expect("method"),
            app.url(path),
        )
        .bearer_auth(token);
    if let Some(b) = body {
        rb = rb.json(b);
    }
    let r = rb.send().await.expect("request");
    Reply {
        status: r.status().as_u16(),
        text: r.text().await.expect("body"),
    }
}

fn detail(text: &str) -> String {
    serde_json::from_str::<Value>(text)
        .ok()
        .and_then(|v| v["detail"].as_str().map(str::to_owned))
        .unwrap_or_else(|| panic!("error body is not {{\"detail\": ...}}: {text}"))
}

async fn every_route_hides_other_users_resources(backend: Backend) {
    let app = spawn_app(backend).await;
    let up = mock(&[ALICE_RAW, MALLORY_RAW]).await;
    let alice = app.new_user("alice").await;
    let mallory = app.new_user("mallory").await;
    add_key(
        &app,
        &alice,
        "alice-key",
        ALICE_RAW,
        Some(json!({ "base_url": up.url() })),
    )
    .await;
    make_pool(
        &app,
        &alice,
        "alice-pool",
        &["alice-key"],
        upstream(&up.url(), "bearer"),
    )
    .await;
    add_key(&app, &mallory, "mallory-key", MALLORY_RAW, None).await;
    let me: Value = app.get(&alice, "/auth/me").await.json().await.unwrap();
    let alice_id = me["id"].as_str().expect("user id").to_owned();

    let spec: Value = app
        .client
        .get(app.url("/api/v1/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut with_params = BTreeSet::new();
    let mut without_params = BTreeSet::new();
    for (template, item) in spec["paths"].as_object().expect("paths") {
        for method in item.as_object().expect("path item").keys() {
            if !matches!(method.as_str(), "get" | "post" | "put" | "patch" | "delete") {
                continue;
            }
            // Login, refresh and registration name no resource of a user.
            if template.starts_with("/api/v1/auth/") {
                continue;
            }
            if template.contains('{') {
                with_params.insert((method.clone(), template.clone()));
            } else {
                without_params.insert((method.clone(), template.clone()));
            }
        }
    }
    assert!(
        with_params.len() >= 20,
        "the OpenAPI document lists the resource routes: {with_params:?}"
    );

    // Every route that names a resource: Alice's answers exactly like one that does not exist.
    for (method, template) in &with_params {
        let body = body_for(method, template);
        let real = send(
            &app,
            &mallory,
            method,
            &fill(template, &alice_id, true),
            body.as_ref(),
        )
        .await;
        let ghost = send(
            &app,
            &mallory,
            method,
            &fill(template, &alice_id, false),
            body.as_ref(),
        )
        .await;
        let expected = if template.starts_with("/api/v1/users/") {
            403
        } else {
            404
        };
        assert_eq!(
            real.status, expected,
            "{method} {template} on Alice's resource as Mallory: {}",
            real.text
        );
        assert_eq!(real.status, ghost.status, "{method} {template}");
        let norm = |d: String| {
            d.replace("alice-key", "K")
                .replace("ghost-key", "K")
                .replace("alice-pool", "P")
                .replace("ghost-pool", "P")
                .replace(&alice_id, "I")
                .replace("00000000-0000-4000-8000-000000000000", "I")
        };
        assert_eq!(
            norm(detail(&real.text)),
            norm(detail(&ghost.text)),
            "{method} {template}: the answer reveals that the resource exists"
        );
    }

    // Routes that take the resource in the query or body, and the listings.
    for (method, template) in &without_params {
        let path = format!("{template}?pool_identifier=alice-pool&key_identifier=alice-key");
        let body = match (method.as_str(), template.as_str()) {
            ("post", "/api/v1/pools") => Some(json!({
                "identifier": "mallory-pool", "name": "m", "key_identifiers": ["alice-key"]
            })),
            ("post", "/api/v1/stats/report") => Some(json!({
                "pool_identifier": "alice-pool",
                "events": [{"key_identifier": "alice-key", "status": "success", "latency": 0.1}]
            })),
            (m, t) => body_for(m, t),
        };
        let r = send(&app, &mallory, method, &path, body.as_ref()).await;
        assert!(
            !r.text.contains(ALICE_RAW),
            "{method} {template} leaked Alice's raw key"
        );
        if (200..300).contains(&r.status) {
            for name in ["alice-key", "alice-pool", &alice_id] {
                assert!(
                    !r.text.contains(name),
                    "{method} {template} shows Alice's {name}: {}",
                    r.text
                );
            }
        }
        match (method.as_str(), template.as_str()) {
            ("get", "/api/v1/keys/raw") | ("post", "/api/v1/stats/report") => {
                assert_eq!(r.status, 404, "{method} {template}: {}", r.text);
            }
            ("post", "/api/v1/pools") => {
                assert!(
                    (400..500).contains(&r.status),
                    "Mallory cannot put Alice's key in her pool: {}",
                    r.text
                );
            }
            _ => {}
        }
    }

    // Nothing of Alice's changed, and her key was never used.
    let k: Value = app
        .get(&alice, "/keys/alice-key")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(k["identifier"], "alice-key", "{k}");
    assert!(k["alias"].is_null(), "{k}");
    let p: Value = app
        .get(&alice, "/pools/alice-pool")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(p["member_count"], 1, "{p}");
    let raw = app
        .get(&alice, "/keys/raw?pool_identifier=alice-pool")
        .await
        .text()
        .await
        .unwrap();
    assert!(
        raw.contains(ALICE_RAW),
        "Alice's key was not rotated: {raw}"
    );
    let me: Value = app.get(&alice, "/auth/me").await.json().await.unwrap();
    assert_eq!(me["is_active"], true);
    assert_eq!(
        up.stats().total_requests,
        0,
        "nothing was sent upstream for Mallory"
    );
}

fn b64_json(part: &str) -> Value {
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).expect("base64url")).expect("json")
}

fn b64(v: &Value) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).expect("json"))
}

async fn tampered_forged_and_misused_tokens_are_refused(backend: Backend) {
    let app = spawn_app(backend).await;
    let bob = app.new_user("bob").await;
    let pair = app.login("bob", "password-123").await;
    let refresh = pair["refresh_token"].as_str().unwrap().to_owned();
    let admin_me: Value = app
        .get(&app.admin_token, "/auth/me")
        .await
        .json()
        .await
        .unwrap();
    let parts: Vec<&str> = bob.split('.').collect();
    assert_eq!(parts.len(), 3, "a JWT");
    let (header, payload, sig) = (parts[0], parts[1], parts[2]);
    let claims = b64_json(payload);
    assert_eq!(claims["role"], "user");

    let mut forged: Vec<(&str, String)> = Vec::new();
    let mut c = claims.clone();
    c["role"] = json!("admin");
    forged.push((
        "role raised, old signature",
        format!("{header}.{}.{sig}", b64(&c)),
    ));
    let mut c = claims.clone();
    c["sub"] = admin_me["id"].clone();
    forged.push(("subject swapped", format!("{header}.{}.{sig}", b64(&c))));
    let mut c = claims.clone();
    c["exp"] = json!(i64::MAX / 4);
    forged.push(("expiry extended", format!("{header}.{}.{sig}", b64(&c))));
    let mut flipped = sig.to_owned().into_bytes();
    flipped[0] = if flipped[0] == b'A' { b'B' } else { b'A' };
    forged.push((
        "signature changed",
        format!("{header}.{payload}.{}", String::from_utf8(flipped).unwrap()),
    ));
    forged.push(("signature removed", format!("{header}.{payload}.")));
    forged.push(("no signature part", format!("{header}.{payload}")));
    let none = b64(&json!({"alg": "none", "typ": "JWT"}));
    let mut c = claims.clone();
    c["role"] = json!("admin");
    forged.push(("alg none", format!("{none}.{}.", b64(&c))));
    for alg in ["HS384", "HS512", "RS256", "ES256"] {
        let h = b64(&json!({"alg": alg, "typ": "JWT"}));
        forged.push(("another algorithm", format!("{h}.{payload}.{sig}")));
    }
    for guess in ["", "secret", "apipool", "changeme"] {
        let token = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &c,
            &jsonwebtoken::EncodingKey::from_secret(guess.as_bytes()),
        )
        .expect("sign");
        forged.push(("signed with a guessed secret", token));
    }
    forged.push(("refresh token as access token", refresh.clone()));
    forged.push(("trailing garbage", format!("{bob}x")));
    forged.push(("two tokens", format!("{bob} {bob}")));
    forged.push(("empty", String::new()));
    // A token of another server (its own signing secret) for its admin.
    let other = spawn_app(Backend::Sqlite).await;
    forged.push(("another server's admin token", other.admin_token.clone()));

    for (what, token) in &forged {
        for path in ["/auth/me", "/users", "/keys"] {
            let r = app
                .client
                .get(app.api(path))
                .header("authorization", format!("Bearer {token}"))
                .send()
                .await
                .unwrap();
            assert!(
                r.headers().contains_key("www-authenticate"),
                "{what} on {path}"
            );
            let d = expect_error(r, 401).await;
            assert!(
                !d.contains(token.as_str()) || token.is_empty(),
                "{what}: the token is echoed"
            );
        }
    }
    // The API does not take tokens from anywhere but the Authorization header.
    let r = app
        .client
        .get(app.api(&format!("/auth/me?access_token={bob}")))
        .send()
        .await
        .unwrap();
    expect_error(r, 401).await;
    let r = app
        .client
        .get(app.api("/auth/me"))
        .header("cookie", format!("apipool_at={bob}"))
        .send()
        .await
        .unwrap();
    expect_error(r, 401).await;
    // An access token is not a refresh token, and a refresh token is single use.
    let r = app
        .client
        .post(app.api("/auth/refresh"))
        .json(&json!({ "refresh_token": bob }))
        .send()
        .await
        .unwrap();
    expect_error(r, 401).await;
    let mut tampered = refresh.clone().into_bytes();
    let last = tampered.len() - 1;
    tampered[last] = if tampered[last] == b'a' { b'b' } else { b'a' };
    let r = app
        .client
        .post(app.api("/auth/refresh"))
        .json(&json!({ "refresh_token": String::from_utf8(tampered).unwrap() }))
        .send()
        .await
        .unwrap();
    expect_error(r, 401).await;
    // Untouched, the same token still works (so every refusal above was about the tampering).
    let me: Value = app.get(&bob, "/auth/me").await.json().await.unwrap();
    assert_eq!(me["username"], "bob");
    assert_eq!(app.get(&bob, "/users").await.status(), 403);
}

/// No CORS unless configured: a foreign origin gets no Access-Control-Allow-* header anywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_is_closed_by_default() {
    let app = spawn_app(Backend::Sqlite).await;
    let evil = "https://evil.example";
    let mut replies = Vec::new();
    for (method, path) in [
        ("OPTIONS", "/api/v1/keys"),
        ("OPTIONS", "/api/v1/auth/login"),
        ("OPTIONS", "/login"),
        ("GET", "/api/v1/keys"),
        ("GET", "/api/v1/health"),
        ("GET", "/api/v1/openapi.json"),
        ("GET", "/metrics"),
        ("GET", "/login"),
        ("POST", "/api/v1/auth/login"),
    ] {
        let r = app
            .client
            .request(method.parse().unwrap(), app.url(path))
            .header("origin", evil)
            .header("access-control-request-method", "GET")
            .header("access-control-request-headers", "authorization")
            .bearer_auth(&app.admin_token)
            .json(&json!({"username": "admin", "password": "x"}))
            .send()
            .await
            .unwrap();
        replies.push((method, path, r.status().as_u16()));
        for (name, _) in r.headers() {
            assert!(
                !name.as_str().starts_with("access-control-"),
                "{method} {path} answered a foreign origin with {name}"
            );
        }
    }
    // The requests did reach the server (the keys listing answered normally).
    assert!(
        replies.contains(&("GET", "/api/v1/keys", 200)),
        "{replies:?}"
    );
}

/// Malformed requests get a JSON `{"detail"}` error with a 4xx status, never a 500 or a
/// plain-text framework message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_json_errors() {
    let app = spawn_app(Backend::Sqlite).await;
    let t = app.admin_token.clone();
    let big = "x".repeat(3 * 1024 * 1024);
    let cases: Vec<(&str, String, Option<&str>, String)> = vec![
        (
            "POST",
            "/api/v1/keys".to_owned(),
            Some("application/json"),
            "{".to_owned(),
        ),
        (
            "POST",
            "/api/v1/keys".to_owned(),
            Some("text/plain"),
            "{}".to_owned(),
        ),
        ("POST", "/api/v1/keys".to_owned(), None, String::new()),
        (
            "POST",
            "/api/v1/keys".to_owned(),
            Some("application/json"),
            "[]".to_owned(),
        ),
        (
            "POST",
            "/api/v1/keys".to_owned(),
            Some("application/json"),
            format!("{{\"identifier\":\"{big}\"}}"),
        ),
        (
            "POST",
            "/api/v1/keys".to_owned(),
            Some("application/json"),
            "{\"identifier\": 1, \"raw_key\": null}".to_owned(),
        ),
        ("GET", "/api/v1/keys/%ff%fe".to_owned(), None, String::new()),
        (
            "GET",
            "/api/v1/keys?page=-1".to_owned(),
            None,
            String::new(),
        ),
        (
            "GET",
            "/api/v1/keys?page=99999999999999999999".to_owned(),
            None,
            String::new(),
        ),
        (
            "GET",
            "/api/v1/keys?is_active=maybe".to_owned(),
            None,
            String::new(),
        ),
        (
            "GET",
            "/api/v1/stats/x/usage?seconds=1e99".to_owned(),
            None,
            String::new(),
        ),
        (
            "PUT",
            "/api/v1/pools/x".to_owned(),
            Some("application/json"),
            "{\"pool_config\": 5}".to_owned(),
        ),
        ("DELETE", "/api/v1/keys".to_owned(), None, String::new()),
        ("GET", "/api/v1/nope".to_owned(), None, String::new()),
    ];
    for (method, path, ctype, body) in cases {
        let mut rb = app
            .client
            .request(method.parse().unwrap(), app.url(&path))
            .bearer_auth(&t)
            .body(body);
        if let Some(c) = ctype {
            rb = rb.header("content-type", c);
        }
        let r = rb.send().await.unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        let shown = &path[..path.len().min(60)];
        assert!(
            (400..500).contains(&status),
            "{method} {shown}: {status} {}",
            &text[..text.len().min(200)]
        );
        detail(&text);
    }
}

/// A key's `client_config.base_url` (chosen by the key's owner) is still only ever an http(s)
/// URL with a host and no credentials: other schemes are refused before anything is sent.
async fn a_keys_base_url_cannot_point_outside_http(backend: Backend) {
    let app = spawn_app(backend).await;
    let t = app.admin_token.clone();
    let bad = [
        "file:///etc/passwd",
        "gopher://127.0.0.1:6379/_INFO",
        "ftp://127.0.0.1/",
        "http://user:secret@127.0.0.1:1/",
        "javascript:alert(1)",
        "//127.0.0.1:1/",
        "not a url",
    ];
    for (i, base) in bad.iter().enumerate() {
        let id = format!("k{i}");
        add_key(
            &app,
            &t,
            &id,
            &format!("sk-base-url-{i}"),
            Some(json!({ "base_url": base })),
        )
        .await;
        make_pool(&app, &t, &format!("p{i}"), &[id.as_str()], json!({})).await;
        let r = app
            .post(
                &t,
                &format!("/proxy/p{i}/invoke"),
                json!({"attr_path": ["get"], "args": ["/x"]}),
            )
            .await;
        let status = r.status().as_u16();
        let body: Value = r.json().await.unwrap();
        assert!(
            (400..500).contains(&status) || body["success"] == false,
            "{base}: {status} {body}"
        );
        assert!(
            body["detail"].is_string() || body["error"].is_string(),
            "{base}: {body}"
        );
        // Verifying refuses the URL (422) or reports that no upstream answered: never valid.
        let r = app.post(&t, &format!("/keys/{id}/verify"), json!({})).await;
        let status = r.status().as_u16();
        let body: Value = r.json().await.unwrap();
        if status == 422 {
            assert!(
                body["detail"].as_str().unwrap().contains("base_url"),
                "{base}: {body}"
            );
        } else {
            assert_eq!(status, 200, "{base}: {body}");
            assert_ne!(body["verification_status"], "valid", "{base}: {body}");
            assert!(
                body["http_status"].is_null(),
                "{base}: nothing answered: {body}"
            );
        }
    }
}
