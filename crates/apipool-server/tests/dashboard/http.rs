//! Sessions, CSRF, per-user isolation and security headers, checked over plain HTTP.

use std::time::Duration;

use serde_json::json;

use crate::helpers::{ADMIN, ADMIN_PASSWORD, Browser, USER_PASSWORD, spawn_app};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_sets_strict_http_only_cookies_and_pages_need_a_session() {
    let app = spawn_app().await;
    let mut b = Browser::new(&app);

    let anon = b.get("/keys?search=x").await;
    assert_eq!(
        anon.status, 303,
        "anonymous visitors are sent to the login page"
    );
    assert_eq!(
        anon.location.as_deref(),
        Some("/login?next=%2Fkeys%3Fsearch%3Dx")
    );

    let wrong = b.login(ADMIN, "not-the-password").await;
    assert_eq!(wrong.status, 401);
    assert!(wrong.body.contains("Wrong username or password."));

    let ok = b.login(ADMIN, ADMIN_PASSWORD).await;
    assert_eq!(ok.status, 303);
    assert_eq!(ok.location.as_deref(), Some("/"));
    let cookies: Vec<&str> = ok
        .headers
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    for name in ["apipool_at=", "apipool_rt=", "apipool_sid="] {
        let c = cookies
            .iter()
            .find(|c| c.starts_with(name))
            .unwrap_or_else(|| panic!("{name} set at login"));
        assert!(
            c.contains("HttpOnly") && c.contains("SameSite=Strict"),
            "{c}"
        );
    }

    let home = b.get("/").await;
    assert_eq!(home.status, 200);
    assert!(home.body.contains("Overview"));
    assert!(
        home.body.contains("No pools yet"),
        "empty state on a fresh server"
    );
    // Security headers on HTML pages.
    let h = &home.headers;
    let csp = h["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"));
    assert!(!csp.contains("unsafe-inline"));
    assert_eq!(h["x-frame-options"], "DENY");
    assert_eq!(h["x-content-type-options"], "nosniff");
    assert_eq!(h["referrer-policy"], "same-origin");
    assert_eq!(h["cache-control"], "no-store");

    // The JSON API ignores the session cookies: it wants a Bearer token.
    let api = app
        .http
        .get(app.url("/api/v1/keys"))
        .header("cookie", format!("apipool_at={}", b.jar["apipool_at"]))
        .send()
        .await
        .unwrap();
    assert_eq!(api.status(), 401);

    // Logging out revokes the refresh token and clears the cookies.
    let refresh = b.jar["apipool_rt"].clone();
    let csrf = home.csrf();
    let out = b.post("/logout", &[("csrf_token", &csrf)]).await;
    assert_eq!(out.status, 303);
    assert!(!b.jar.contains_key("apipool_at") && !b.jar.contains_key("apipool_rt"));
    assert_eq!(b.get("/").await.status, 303);
    let reuse = app
        .http
        .post(app.url("/api/v1/auth/refresh"))
        .json(&json!({ "refresh_token": refresh }))
        .send()
        .await
        .unwrap();
    assert_eq!(reuse.status(), 401, "the login was revoked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forms_without_a_valid_csrf_token_are_refused() {
    let app = spawn_app().await;
    let mut b = Browser::new(&app);

    // Even the login form needs the token of this browser session.
    let page = b.get("/login").await;
    let no_token = b
        .post(
            "/login",
            &[("username", ADMIN), ("password", ADMIN_PASSWORD)],
        )
        .await;
    assert_eq!(no_token.status, 403);
    assert!(no_token.body.contains("security token"));
    assert!(
        !b.jar.contains_key("apipool_at"),
        "no session from a forged login"
    );
    let _ = page;

    assert_eq!(b.login(ADMIN, ADMIN_PASSWORD).await.status, 303);
    let keys = b.get("/keys").await;
    let good = keys.csrf();

    let missing = b
        .post("/keys", &[("identifier", "k1"), ("raw_key", "secret-1")])
        .await;
    assert_eq!(missing.status, 403);
    let wrong = b
        .post(
            "/keys",
            &[
                ("csrf_token", "forged"),
                ("identifier", "k1"),
                ("raw_key", "secret-1"),
            ],
        )
        .await;
    assert_eq!(wrong.status, 403);
    // A token from another browser session does not work either.
    let mut other = Browser::new(&app);
    let other_token = other.get("/login").await.csrf();
    assert_ne!(other_token, good);
    let foreign = b
        .post(
            "/keys",
            &[
                ("csrf_token", &other_token),
                ("identifier", "k1"),
                ("raw_key", "secret-1"),
            ],
        )
        .await;
    assert_eq!(foreign.status, 403);
    let token = app.token(ADMIN, ADMIN_PASSWORD).await;
    assert_eq!(
        app.api_get(&token, "/keys/k1").await.0,
        404,
        "nothing was created"
    );

    let created = b
        .post(
            "/keys",
            &[
                ("csrf_token", &good),
                ("identifier", "k1"),
                ("raw_key", "secret-1"),
            ],
        )
        .await;
    assert_eq!(created.status, 303);
    assert_eq!(created.location.as_deref(), Some("/keys/k1"));
    assert_eq!(app.api_get(&token, "/keys/k1").await.0, 200);
    let detail = b.get("/keys/k1").await;
    assert!(
        detail.body.contains("Key &#39;k1&#39; added.") || detail.body.contains("Key 'k1' added.")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_never_sees_another_users_keys_or_pools() {
    let app = spawn_app().await;
    app.new_user("alice").await;
    app.new_user("bob").await;
    let alice_token = app.token("alice", USER_PASSWORD).await;
    let (s, _) = app
        .api_post(
            &alice_token,
            "/keys",
            json!({ "identifier": "alice-secret-key", "raw_key": "alice-raw-value" }),
        )
        .await;
    assert_eq!(s, 201);
    let (s, _) = app
        .api_post(
            &alice_token,
            "/pools",
            json!({ "identifier": "alice-pool", "name": "Alice's pool", "key_identifiers": ["alice-secret-key"] }),
        )
        .await;
    assert_eq!(s, 201);

    let mut bob = Browser::new(&app);
    assert_eq!(bob.login("bob", USER_PASSWORD).await.status, 303);
    for path in ["/", "/keys", "/keys?search=alice", "/pools"] {
        let p = bob.get(path).await;
        assert_eq!(p.status, 200, "{path}");
        assert!(
            !p.body.contains("alice-secret-key") && !p.body.contains("alice-pool"),
            "{path} shows nothing of alice"
        );
    }
    for path in [
        "/pools/alice-pool",
        "/keys/alice-secret-key",
        "/pools/alice-pool/live.json",
    ] {
        let p = bob.get(path).await;
        assert_eq!(p.status, 404, "{path}");
    }
    let page = bob.get("/pools/alice-pool").await;
    assert!(
        page.body.contains("Not found"),
        "a 404 page, as if it did not exist"
    );

    // Forms aimed at alice's things fail the same way, and change nothing.
    let csrf = bob.get("/keys").await.csrf();
    let toggle = bob
        .post(
            "/keys/alice-secret-key/toggle",
            &[("csrf_token", &csrf), ("is_active", "false")],
        )
        .await;
    assert_eq!(toggle.status, 404);
    let reveal = bob
        .post(
            "/keys/alice-secret-key/reveal",
            &[("csrf_token", &csrf), ("confirm", "yes")],
        )
        .await;
    assert_eq!(reveal.status, 404);
    assert!(!reveal.body.contains("alice-raw-value"));
    let del = bob
        .post("/pools/alice-pool/delete", &[("csrf_token", &csrf)])
        .await;
    assert_eq!(del.status, 404);
    let (s, key) = app.api_get(&alice_token, "/keys/alice-secret-key").await;
    assert_eq!(s, 200);
    assert_eq!(key["is_active"], true);
    assert_eq!(app.api_get(&alice_token, "/pools/alice-pool").await.0, 200);

    // Non-admins have no users page.
    let users = bob.get("/users").await;
    assert_eq!(users.status, 403);
    assert!(!bob.get("/").await.body.contains("href=\"/users\""));

    // Alice sees her own things.
    let mut alice = Browser::new(&app);
    assert_eq!(alice.login("alice", USER_PASSWORD).await.status, 303);
    assert!(alice.get("/keys").await.body.contains("alice-secret-key"));
    assert!(alice.get("/").await.body.contains("alice-pool"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_access_tokens_are_refreshed_once_for_concurrent_requests() {
    let app = spawn_app().await;
    let mut b = Browser::new(&app);
    assert_eq!(b.login(ADMIN, ADMIN_PASSWORD).await.status, 303);
    let first_refresh = b.jar["apipool_rt"].clone();
    app.clock.advance(Duration::from_secs(901));

    // Two requests at once with the same expired session: both stay logged in, and they receive
    // the same new pair (no refresh-token reuse, which would revoke the login).
    let (mut b1, mut b2) = (b.clone(), b.clone());
    let (p1, p2) = tokio::join!(b1.get("/keys"), b2.get("/pools"));
    assert_eq!(p1.status, 200, "{:?}", p1.location);
    assert_eq!(p2.status, 200, "{:?}", p2.location);
    assert_ne!(b1.jar["apipool_rt"], first_refresh, "rotated");
    assert_eq!(b1.jar["apipool_rt"], b2.jar["apipool_rt"]);
    assert_eq!(b1.jar["apipool_at"], b2.jar["apipool_at"]);
    // The rotated session keeps working.
    assert_eq!(b1.get("/").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_throttling_applies_to_the_login_form() {
    let app = spawn_app().await;
    let mut b = Browser::new(&app);
    for _ in 0..5 {
        assert_eq!(b.login(ADMIN, "wrong-password").await.status, 401);
    }
    let blocked = b.login(ADMIN, ADMIN_PASSWORD).await;
    assert_eq!(blocked.status, 429);
    assert!(blocked.body.contains("Too many failed logins"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_files_come_only_from_the_embedded_set() {
    let app = spawn_app().await;
    let css = app
        .http
        .get(app.url("/static/app.css"))
        .send()
        .await
        .unwrap();
    assert_eq!(css.status(), 200);
    assert!(
        css.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/css")
    );
    let js = app
        .http
        .get(app.url("/static/app.js"))
        .send()
        .await
        .unwrap();
    assert_eq!(js.status(), 200);
    for path in [
        "/static/..%2FCargo.toml",
        "/static/%2e%2e%2fCargo.toml",
        "/static/../Cargo.toml",
        "/static/main.rs",
    ] {
        let r = app.http.get(app.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 404, "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_reports_every_bad_row_and_keeps_nothing() {
    let app = spawn_app().await;
    let mut b = Browser::new(&app);
    assert_eq!(b.login(ADMIN, ADMIN_PASSWORD).await.status, 303);
    let csrf = b.get("/keys").await.csrf();
    let bad = "identifier,raw_key,alias\nok-1,value-1,One\n,value-2,\nok-3,value-1,\n";
    let p = b
        .post("/keys/import", &[("csrf_token", &csrf), ("text", bad)])
        .await;
    assert_eq!(p.status, 422);
    assert!(p.body.contains("nothing was imported"), "{}", p.body);
    assert!(
        p.body.contains("<td>3</td>") && p.body.contains("<td>4</td>"),
        "lines named"
    );
    let token = app.token(ADMIN, ADMIN_PASSWORD).await;
    let (_, list) = app.api_get(&token, "/keys").await;
    assert_eq!(list["total"], 0);

    let good = "raw-a\nraw-b\nnamed,raw-c,Named key\n";
    let p = b
        .post(
            "/keys/import",
            &[
                ("csrf_token", &csrf),
                ("text", good),
                ("client_type", "coingecko"),
            ],
        )
        .await;
    assert_eq!(p.status, 200);
    assert!(p.body.contains("Imported 3 keys."));
    let (_, list) = app.api_get(&token, "/keys?page_size=100").await;
    assert_eq!(list["total"], 3);
    assert!(
        list["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|k| k["identifier"] == "named")
    );
}
