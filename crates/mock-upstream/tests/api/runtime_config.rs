use mock_upstream::SettingsView;
use serde_json::json;

use crate::helpers::{client, config, json, start, status};

async fn post_config(c: &reqwest::Client, url: &str, body: serde_json::Value) -> reqwest::Response {
    c.post(format!("{url}/__config"))
        .json(&body)
        .send()
        .await
        .expect("answer")
}

#[tokio::test]
async fn config_patch_changes_behaviour_without_restart() {
    let server = start(config(&["k1", "k2"])).await;
    let c = client();
    let url = server.url();
    assert_eq!(status(&c, &server, "k1", "x").await, 200);

    let resp = post_config(&c, &url, json!({"error_rate": 1.0})).await;
    assert_eq!(resp.status(), 200);
    let view: SettingsView = resp.json().await.expect("settings");
    assert_eq!(view.error_rate, 1.0);
    assert_eq!(status(&c, &server, "k1", "x").await, 500);

    post_config(
        &c,
        &url,
        json!({"error_rate": 0.0, "rate": 1, "interval": 60}),
    )
    .await;
    assert_eq!(status(&c, &server, "k1", "x").await, 200);
    assert_eq!(status(&c, &server, "k1", "x").await, 429);

    post_config(&c, &url, json!({"failing_keys": ["k2"]})).await;
    assert_eq!(status(&c, &server, "k2", "x").await, 500);

    let view: SettingsView = c
        .get(format!("{url}/__config"))
        .send()
        .await
        .expect("answer")
        .json()
        .await
        .expect("settings");
    assert_eq!((view.rate, view.interval), (1, 60.0));
    assert_eq!(view.failing_keys, ["**"]);
}

#[tokio::test]
async fn invalid_patch_is_422_and_changes_nothing() {
    let server = start(config(&["k1"])).await;
    let c = client();
    let url = server.url();
    let before = server.settings();

    let resp = post_config(&c, &url, json!({"rate": 5, "error_rate": 2.0})).await;
    assert_eq!(resp.status(), 422);
    let body = json(resp).await;
    assert_eq!(body["error"], "invalid_config");
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("error_rate must be a probability")),
        "{body}"
    );

    let resp = post_config(&c, &url, json!({"no_such_setting": 1})).await;
    assert_eq!(resp.status(), 422);
    assert_eq!(server.settings(), before);
}

#[tokio::test]
async fn latency_and_ratelimit_headers_can_be_switched_on_at_run_time() {
    let server = start(config(&["k1"])).await;
    let c = client();
    let url = server.url();
    post_config(
        &c,
        &url,
        json!({"latency_ms": 120, "rate": 10, "ratelimit_headers": true}),
    )
    .await;
    let t = std::time::Instant::now();
    let resp = crate::helpers::price(&c, &server, "k1", "x").await;
    assert!(t.elapsed() >= std::time::Duration::from_millis(120));
    assert_eq!(
        crate::helpers::header(&resp, "x-ratelimit-limit"),
        Some("10")
    );
}
