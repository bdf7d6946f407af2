use std::time::Duration;

use serde_json::{Value, json};

use crate::both_backends;
use crate::helpers::{ADMIN, ADMIN_PASSWORD, Backend, expect_error, spawn_app, spawn_app_with};

both_backends!(
    login_me_and_bad_credentials,
    refresh_rotation_and_reuse_detection,
    logout_revokes_the_family,
    access_tokens_expire,
    login_is_throttled_per_username,
    login_is_throttled_per_ip,
    registration_rules,
);

async fn login_me_and_bad_credentials(backend: Backend) {
    let app = spawn_app(backend).await;
    let tokens = app.login(ADMIN, ADMIN_PASSWORD).await;
    assert_eq!(tokens["token_type"], "bearer");
    assert_eq!(tokens["expires_in"], 900);
    assert!(tokens["refresh_token"].is_string());
    let me: Value = app
        .get(tokens["access_token"].as_str().unwrap(), "/auth/me")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(me["username"], ADMIN);
    assert_eq!(me["role"], "admin");
    assert_eq!(me["is_active"], true);
    let wrong = app.login_raw(ADMIN, "wrong-password").await;
    let d1 = expect_error(wrong, 401).await;
    let unknown = app.login_raw("nobody-here", "wrong-password").await;
    let d2 = expect_error(unknown, 401).await;
    assert_eq!(
        d1, d2,
        "the answer must not reveal whether a username exists"
    );
    // malformed body
    let r = app
        .client
        .post(app.api("/auth/login"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    expect_error(r, 400).await;
    let r = app
        .client
        .post(app.api("/auth/login"))
        .json(&json!({ "username": "x" }))
        .send()
        .await
        .unwrap();
    assert!(expect_error(r, 422).await.contains("password"));
}

async fn refresh(app: &crate::helpers::TestApp, token: &str) -> reqwest::Response {
    app.client
        .post(app.api("/auth/refresh"))
        .json(&json!({ "refresh_token": token }))
        .send()
        .await
        .unwrap()
}

async fn refresh_rotation_and_reuse_detection(backend: Backend) {
    let app = spawn_app(backend).await;
    let first = app.login(ADMIN, ADMIN_PASSWORD).await;
    let rt1 = first["refresh_token"].as_str().unwrap().to_owned();
    let r = refresh(&app, &rt1).await;
    assert_eq!(r.status(), 200);
    let second: Value = r.json().await.unwrap();
    let rt2 = second["refresh_token"].as_str().unwrap().to_owned();
    assert_ne!(rt1, rt2, "refresh tokens rotate");
    assert_eq!(second["token_type"], "bearer");
    assert_eq!(
        app.get(second["access_token"].as_str().unwrap(), "/auth/me")
            .await
            .status(),
        200
    );
    // reuse of the old token: 401 and the whole family is revoked
    let d = expect_error(refresh(&app, &rt1).await, 401).await;
    assert!(d.contains("already used"), "{d}");
    expect_error(refresh(&app, &rt2).await, 401).await;
    // a separate login is a separate family and still works
    let other = app.login(ADMIN, ADMIN_PASSWORD).await;
    assert_eq!(
        refresh(&app, other["refresh_token"].as_str().unwrap())
            .await
            .status(),
        200
    );
    // garbage
    expect_error(refresh(&app, "nope").await, 401).await;
    let forged = format!("{}.AAAA", rt2.split('.').next().unwrap());
    expect_error(refresh(&app, &forged).await, 401).await;
    // expiry (30 days by default) via the fake clock
    let third = app.login(ADMIN, ADMIN_PASSWORD).await;
    app.clock.advance(Duration::from_secs(31 * 24 * 3600));
    expect_error(
        refresh(&app, third["refresh_token"].as_str().unwrap()).await,
        401,
    )
    .await;
}

async fn logout_revokes_the_family(backend: Backend) {
    let app = spawn_app(backend).await;
    let t = app.login(ADMIN, ADMIN_PASSWORD).await;
    let rt = t["refresh_token"].as_str().unwrap();
    let r = app
        .client
        .post(app.api("/auth/logout"))
        .json(&json!({ "refresh_token": rt }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    expect_error(refresh(&app, rt).await, 401).await;
}

async fn access_tokens_expire(backend: Backend) {
    let app = spawn_app_with(backend, |c| c.access_token_ttl_secs = 60).await;
    let t = app.login(ADMIN, ADMIN_PASSWORD).await;
    assert_eq!(t["expires_in"], 60);
    let at = t["access_token"].as_str().unwrap();
    assert_eq!(app.get(at, "/auth/me").await.status(), 200);
    app.clock.advance(Duration::from_secs(61));
    let d = expect_error(app.get(at, "/auth/me").await, 401).await;
    assert!(d.contains("expired"));
    // the refresh token still works and yields a fresh access token
    let r = refresh(&app, t["refresh_token"].as_str().unwrap()).await;
    let fresh: Value = r.json().await.unwrap();
    assert_eq!(
        app.get(fresh["access_token"].as_str().unwrap(), "/auth/me")
            .await
            .status(),
        200
    );
}

async fn login_is_throttled_per_username(backend: Backend) {
    let app = spawn_app(backend).await;
    for _ in 0..5 {
        expect_error(app.login_raw(ADMIN, "bad-password").await, 401).await;
    }
    let r = app.login_raw(ADMIN, ADMIN_PASSWORD).await;
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=900).contains(&retry), "{retry}");
    expect_error(r, 429).await;
    // another username from the same IP is not locked out
    let r = app.login_raw("someone-else", "bad-password").await;
    assert_eq!(r.status(), 401);
    app.clock.advance(Duration::from_secs(901));
    app.login(ADMIN, ADMIN_PASSWORD).await;
}

async fn login_is_throttled_per_ip(backend: Backend) {
    let app = spawn_app_with(backend, |c| c.login_max_failures_per_ip = 3).await;
    for name in ["u1", "u2", "u3"] {
        expect_error(app.login_raw(name, "bad-password").await, 401).await;
    }
    let r = app.login_raw(ADMIN, ADMIN_PASSWORD).await;
    assert!(r.headers().contains_key("retry-after"));
    expect_error(r, 429).await;
}

async fn registration_rules(backend: Backend) {
    let app = spawn_app(backend).await;
    let body =
        json!({ "username": "alice", "email": "alice@example.com", "password": "password-123" });
    // closed by default: anonymous and non-admin callers are refused
    let r = app
        .client
        .post(app.api("/auth/register"))
        .json(&body)
        .send()
        .await
        .unwrap();
    expect_error(r, 403).await;
    let r = app
        .post(&app.admin_token, "/auth/register", body.clone())
        .await;
    assert_eq!(r.status(), 201);
    let user: Value = r.json().await.unwrap();
    assert_eq!(user["username"], "alice");
    assert_eq!(user["role"], "user");
    assert!(user["id"].is_string() && user["created_at"].is_string());
    assert!(user.get("password_hash").is_none());
    let r = app
        .post(&app.admin_token, "/auth/register", body.clone())
        .await;
    expect_error(r, 409).await;
    let alice = app.login("alice", "password-123").await["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = app
        .post(
            &alice,
            "/auth/register",
            json!({ "username": "bob", "email": "b@x.io", "password": "password-123" }),
        )
        .await;
    expect_error(r, 403).await;
    for (field, bad) in [
        (
            "username",
            json!({ "username": "a", "email": "a@x.io", "password": "password-123" }),
        ),
        (
            "username",
            json!({ "username": "a b c", "email": "a@x.io", "password": "password-123" }),
        ),
        (
            "username",
            json!({ "username": "x".repeat(65), "email": "a@x.io", "password": "password-123" }),
        ),
        (
            "email",
            json!({ "username": "carol", "email": "nope", "password": "password-123" }),
        ),
        (
            "password",
            json!({ "username": "carol", "email": "c@x.io", "password": "short" }),
        ),
        (
            "password",
            json!({ "username": "carol", "email": "c@x.io", "password": "p".repeat(129) }),
        ),
        (
            "role",
            json!({ "username": "carol", "email": "c@x.io", "password": "password-123", "role": "root" }),
        ),
    ] {
        let d = expect_error(app.post(&app.admin_token, "/auth/register", bad).await, 422).await;
        assert!(d.starts_with(field), "{d} should name {field}");
    }
    // admin can create admins
    let r = app
        .post(&app.admin_token, "/auth/register", json!({ "username": "dave", "email": "d@x.io", "password": "password-123", "role": "admin" }))
        .await;
    assert_eq!(r.json::<Value>().await.unwrap()["role"], "admin");

    // open registration
    let open = spawn_app_with(backend, |c| c.open_registration = true).await;
    let r = open
        .client
        .post(open.api("/auth/register"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let r = open
        .client
        .post(open.api("/auth/register"))
        .json(&json!({ "username": "eve", "email": "e@x.io", "password": "password-123", "role": "admin" }))
        .send()
        .await
        .unwrap();
    expect_error(r, 403).await;
}
