use serde_json::{Value, json};

use crate::both_backends;
use crate::helpers::{ADMIN, Backend, expect_error, spawn_app};

both_backends!(admin_lists_disables_and_enables_users);

async fn admin_lists_disables_and_enables_users(backend: Backend) {
    let app = spawn_app(backend).await;
    let bob = app.new_user("bob").await;
    let r = app.get(&bob, "/users").await;
    expect_error(r, 403).await;
    let page: Value = app
        .get(&app.admin_token, "/users?page_size=1")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(page["total"], 2);
    assert_eq!(page["items"].as_array().unwrap().len(), 1);
    assert_eq!(page["items"][0]["username"], ADMIN);
    let page2: Value = app
        .get(&app.admin_token, "/users?page=2&page_size=1")
        .await
        .json()
        .await
        .unwrap();
    let bob_id = page2["items"][0]["id"].as_str().unwrap().to_owned();
    assert_eq!(page2["items"][0]["username"], "bob");
    let r = app.get(&app.admin_token, "/users?page_size=101").await;
    assert!(expect_error(r, 422).await.starts_with("page_size"));
    let r = app.get(&app.admin_token, "/users?page=abc").await;
    expect_error(r, 422).await;

    // disable: bob's token and login stop working at once
    let r = app
        .patch(
            &app.admin_token,
            &format!("/users/{bob_id}"),
            json!({ "is_active": false }),
        )
        .await;
    assert_eq!(r.json::<Value>().await.unwrap()["is_active"], false);
    expect_error(app.get(&bob, "/auth/me").await, 401).await;
    expect_error(app.login_raw("bob", "password-123").await, 401).await;
    // enable again
    let r = app
        .patch(
            &app.admin_token,
            &format!("/users/{bob_id}"),
            json!({ "is_active": true }),
        )
        .await;
    assert_eq!(r.status(), 200);
    app.login("bob", "password-123").await;

    let r = app.get(&app.admin_token, &format!("/users/{bob_id}")).await;
    assert_eq!(r.json::<Value>().await.unwrap()["username"], "bob");
    expect_error(app.get(&app.admin_token, "/users/not-a-user").await, 404).await;
    let r = app
        .patch(
            &app.admin_token,
            &format!("/users/{bob_id}"),
            json!({ "role": "boss" }),
        )
        .await;
    expect_error(r, 422).await;
    let r = app
        .patch(
            &app.admin_token,
            &format!("/users/{bob_id}"),
            json!({ "colour": "red" }),
        )
        .await;
    expect_error(r, 422).await;
    // an admin cannot lock themselves out
    let me: Value = app
        .get(&app.admin_token, "/auth/me")
        .await
        .json()
        .await
        .unwrap();
    let r = app
        .patch(
            &app.admin_token,
            &format!("/users/{}", me["id"].as_str().unwrap()),
            json!({ "is_active": false }),
        )
        .await;
    expect_error(r, 422).await;
}
