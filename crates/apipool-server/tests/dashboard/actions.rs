//! The dashboard's forms do what the API does: keys (edit, rotate, verify, reveal, export,
//! delete), pools (settings, members, reset, delete) and users (create, disable, role).

use serde_json::json;

use crate::helpers::{ADMIN, ADMIN_PASSWORD, Browser, USER_PASSWORD, spawn_app};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_actions_edit_rotate_verify_reveal_export_and_delete() {
    let app = spawn_app().await;
    let upstream = mock_upstream::spawn(
        mock_upstream::Config::with_keys(["good-secret", "newer-secret"]).expect("keys"),
    )
    .await
    .expect("mock");
    let mut b = Browser::new(&app);
    assert_eq!(b.login(ADMIN, ADMIN_PASSWORD).await.status, 303);
    let csrf = b.get("/keys").await.csrf();

    // Field errors come back next to the field, with the API's message.
    let bad = b
        .post(
            "/keys",
            &[
                ("csrf_token", &csrf),
                ("identifier", "a/b"),
                ("raw_key", "x"),
            ],
        )
        .await;
    assert_eq!(bad.status, 422);
    assert!(
        bad.body.contains("id=\"k-identifier-error\""),
        "{}",
        bad.body
    );
    assert!(bad.body.contains("must not contain"));

    let created = b
        .post(
            "/keys",
            &[
                ("csrf_token", &csrf),
                ("identifier", "main key"),
                ("raw_key", "good-secret"),
                ("alias", "Main"),
                ("tags", "prod, eu"),
            ],
        )
        .await;
    assert_eq!(created.location.as_deref(), Some("/keys/main%20key"));

    // Edit: client_config JSON is checked before anything is sent.
    let broken = b
        .post(
            "/keys/main%20key/edit",
            &[("csrf_token", &csrf), ("client_config", "{not json")],
        )
        .await;
    assert_eq!(broken.status, 422);
    assert!(broken.body.contains("id=\"e-cc-error\""));
    let cc = json!({ "base_url": upstream.url(), "verify_path": "/echo/verify" }).to_string();
    let saved = b
        .post(
            "/keys/main%20key/edit",
            &[
                ("csrf_token", &csrf),
                ("alias", "Main key"),
                ("tags", "prod"),
                ("client_config", &cc),
            ],
        )
        .await;
    assert_eq!(saved.status, 303);
    let token = app.token(ADMIN, ADMIN_PASSWORD).await;
    let (_, k) = app.api_get(&token, "/keys/main%20key").await;
    assert_eq!(k["alias"], "Main key");
    assert_eq!(k["tags"], json!(["prod"]));

    let verified = b
        .post("/keys/main%20key/verify", &[("csrf_token", &csrf)])
        .await;
    assert_eq!(verified.status, 303);
    let page = b.get("/keys/main%20key").await;
    assert!(page.body.contains("Verification: valid"), "{}", page.body);

    // Reveal needs the confirmation box.
    let refused = b
        .post("/keys/main%20key/reveal", &[("csrf_token", &csrf)])
        .await;
    assert_eq!(refused.status, 422);
    assert!(!refused.body.contains("good-secret"));
    let shown = b
        .post(
            "/keys/main%20key/reveal",
            &[("csrf_token", &csrf), ("confirm", "yes")],
        )
        .await;
    assert_eq!(shown.status, 200);
    assert!(shown.body.contains("good-secret"));
    assert_eq!(shown.headers["cache-control"], "no-store");

    let rotated = b
        .post(
            "/keys/main%20key/rotate",
            &[("csrf_token", &csrf), ("new_raw_key", "newer-secret")],
        )
        .await;
    assert_eq!(rotated.status, 303);
    let (_, raw) = app.api_get(&token, "/keys/main%20key/raw").await;
    assert_eq!(raw["raw_key"], "newer-secret");

    // Export without and with the secrets.
    let csv = b.post("/keys/export", &[("csrf_token", &csrf)]).await;
    assert_eq!(csv.status, 200);
    assert!(
        csv.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/csv")
    );
    assert!(csv.body.contains("main key") && !csv.body.contains("newer-secret"));
    let with_raw = b
        .post(
            "/keys/export",
            &[("csrf_token", &csrf), ("include_raw", "yes")],
        )
        .await;
    assert!(with_raw.body.contains("newer-secret"));

    let deleted = b
        .post("/keys/main%20key/delete", &[("csrf_token", &csrf)])
        .await;
    assert_eq!(deleted.location.as_deref(), Some("/keys"));
    assert_eq!(app.api_get(&token, "/keys/main%20key").await.0, 404);
    assert_eq!(b.get("/keys/main%20key").await.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_actions_settings_members_reset_and_delete() {
    let app = spawn_app().await;
    let token = app.token(ADMIN, ADMIN_PASSWORD).await;
    for k in ["a", "b", "c"] {
        let (s, _) = app
            .api_post(
                &token,
                "/keys",
                json!({ "identifier": k, "raw_key": format!("secret-{k}") }),
            )
            .await;
        assert_eq!(s, 201);
    }
    let mut b = Browser::new(&app);
    assert_eq!(b.login(ADMIN, ADMIN_PASSWORD).await.status, 303);
    let csrf = b.get("/pools").await.csrf();

    let bad = b
        .post(
            "/pools",
            &[
                ("csrf_token", &csrf),
                ("identifier", "p"),
                ("base_url", "ftp://example.com"),
                ("keys", "a, nope"),
            ],
        )
        .await;
    assert_eq!(bad.status, 422);
    assert!(bad.body.contains("id=\"p-base-error\""), "{}", bad.body);
    let made = b
        .post(
            "/pools",
            &[
                ("csrf_token", &csrf),
                ("identifier", "p"),
                ("name", "Pool P"),
                ("rotation_strategy", "round_robin"),
                ("keys", "a\nb"),
            ],
        )
        .await;
    assert_eq!(made.location.as_deref(), Some("/pools/p"));

    let settings = b
        .post(
            "/pools/p/edit",
            &[
                ("csrf_token", &csrf),
                ("name", "Renamed"),
                ("rotation_strategy", "least_used"),
                ("base_url", "https://api.example.com"),
                ("auth", "header:x-api-key"),
            ],
        )
        .await;
    assert_eq!(settings.status, 303);
    let (_, p) = app.api_get(&token, "/pools/p").await;
    assert_eq!(p["name"], "Renamed");
    assert_eq!(p["rotation_strategy"], "least_used");
    assert_eq!(p["is_active"], false, "the unchecked box disables the pool");
    assert_eq!(p["upstream"]["auth"], "header:x-api-key");

    let added = b
        .post(
            "/pools/p/members",
            &[
                ("csrf_token", &csrf),
                ("keys", "c"),
                ("priority", "5"),
                ("weight", "2"),
            ],
        )
        .await;
    assert_eq!(added.status, 303);
    let (_, p) = app.api_get(&token, "/pools/p").await;
    assert_eq!(p["member_count"], 3);
    assert_eq!(p["members"][0]["key_identifier"], "c");

    let reset = b
        .post("/pools/p/members/a/reset", &[("csrf_token", &csrf)])
        .await;
    assert_eq!(reset.status, 303);
    let after = b.get("/pools/p").await;
    assert!(
        after
            .body
            .contains("reset: its cooldown, ban and failure count were cleared."),
        "{}",
        after.body
    );
    let removed = b
        .post("/pools/p/members/b/remove", &[("csrf_token", &csrf)])
        .await;
    assert_eq!(removed.status, 303);
    let (_, p) = app.api_get(&token, "/pools/p").await;
    assert_eq!(p["member_count"], 2);

    let page = b.get("/pools/p").await;
    assert_eq!(page.status, 200);
    assert!(page.body.contains("Renamed"));

    let gone = b.post("/pools/p/delete", &[("csrf_token", &csrf)]).await;
    assert_eq!(gone.location.as_deref(), Some("/pools"));
    assert_eq!(app.api_get(&token, "/pools/p").await.0, 404);
    assert_eq!(app.api_get(&token, "/keys/a").await.0, 200, "keys stay");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admins_manage_users_from_the_users_page() {
    let app = spawn_app().await;
    let mut b = Browser::new(&app);
    assert_eq!(b.login(ADMIN, ADMIN_PASSWORD).await.status, 303);
    let csrf = b.get("/users").await.csrf();
    let short = b
        .post(
            "/users",
            &[
                ("csrf_token", &csrf),
                ("username", "carol"),
                ("email", "carol@example.com"),
                ("password", "short"),
            ],
        )
        .await;
    assert_eq!(short.status, 422);
    assert!(short.body.contains("id=\"u-password-error\""));
    let made = b
        .post(
            "/users",
            &[
                ("csrf_token", &csrf),
                ("username", "carol"),
                ("email", "carol@example.com"),
                ("password", USER_PASSWORD),
            ],
        )
        .await;
    assert_eq!(made.status, 303);
    let dup = b
        .post(
            "/users",
            &[
                ("csrf_token", &csrf),
                ("username", "carol"),
                ("email", "carol@example.com"),
                ("password", USER_PASSWORD),
            ],
        )
        .await;
    assert_eq!(dup.status, 422);
    assert!(dup.body.contains("already taken"));

    let mut carol = Browser::new(&app);
    assert_eq!(carol.login("carol", USER_PASSWORD).await.status, 303);
    assert_eq!(carol.get("/").await.status, 200);

    let page = b.get("/users").await;
    let marker = "action=\"/users/";
    let carol_row = &page.body[page.body.find("data-user=\"carol\"").expect("carol listed")..];
    let start = carol_row.find(marker).expect("form") + marker.len();
    let id = &carol_row[start..start + carol_row[start..].find('/').expect("id end")];
    let off = b
        .post(
            &format!("/users/{id}/update"),
            &[("csrf_token", &csrf), ("is_active", "false")],
        )
        .await;
    assert_eq!(off.status, 303);
    // A disabled account loses its dashboard session at once.
    assert_eq!(carol.get("/").await.status, 303);
    let promote = b
        .post(
            &format!("/users/{id}/update"),
            &[("csrf_token", &csrf), ("role", "admin")],
        )
        .await;
    assert_eq!(promote.status, 303);
    let token = app.token(ADMIN, ADMIN_PASSWORD).await;
    let (_, u) = app.api_get(&token, &format!("/users/{id}")).await;
    assert_eq!(u["role"], "admin");
    assert_eq!(u["is_active"], false);
}
