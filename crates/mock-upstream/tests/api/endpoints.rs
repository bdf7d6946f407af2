use axum::body::Body;
use axum::http::Request;
use mock_upstream::{MockState, StatsSnapshot, price_for};
use tower::ServiceExt as _;

use crate::helpers::{client, config, json, price, start, status};

#[tokio::test]
async fn price_is_deterministic_and_names_the_key() {
    let server = start(config(&["k1", "k2"])).await;
    let c = client();
    let body = json(price(&c, &server, "k2", "bitcoin").await).await;
    assert_eq!(body["id"], "bitcoin");
    assert_eq!(body["price"], price_for("bitcoin"));
    assert_eq!(body["key"], "**");
    assert_eq!(body["key_index"], 1);
    let again = json(price(&c, &server, "k1", "bitcoin").await).await;
    assert_eq!(again["price"], body["price"]);

    let missing = c
        .get(format!("{}/price", server.url()))
        .bearer_auth("k1")
        .send()
        .await
        .expect("answer");
    assert_eq!(missing.status(), 400);
    assert_eq!(json(missing).await["error"], "bad_request");
}

#[tokio::test]
async fn echo_reflects_method_path_query_headers_and_body() {
    let server = start(config(&["k1"])).await;
    let c = client();
    let resp = c
        .post(format!("{}/echo/v1/things?x=1&y=two%20words", server.url()))
        .bearer_auth("k1")
        .header("X-Custom-Thing", "Value")
        .body("hello body")
        .send()
        .await
        .expect("answer");
    assert_eq!(resp.status(), 200);
    let body = json(resp).await;
    assert_eq!(body["method"], "POST");
    assert_eq!(body["path"], "/echo/v1/things");
    assert_eq!(body["query"]["x"], "1");
    assert_eq!(body["query"]["y"], "two words");
    assert_eq!(body["raw_query"], "x=1&y=two%20words");
    assert_eq!(body["headers"]["x-custom-thing"], "Value");
    assert_eq!(body["headers"]["authorization"], "Bearer k1");
    assert_eq!(body["body"], "hello body");
    assert_eq!(body["key_index"], 0);

    let via_query = c
        .delete(format!("{}/echo?api_key=k1", server.url()))
        .send()
        .await
        .expect("answer");
    let body = json(via_query).await;
    assert_eq!(body["method"], "DELETE");
    assert_eq!(body["query"]["api_key"], "k1");
}

#[tokio::test]
async fn stats_count_statuses_keys_and_ids() {
    let server = start(config(&["k1", "k2"])).await;
    let c = client();
    for (key, id) in [
        ("k1", "a"),
        ("k2", "b"),
        ("k1", "c"),
        ("k1", "a"),
        ("bad", "d"),
    ] {
        status(&c, &server, key, id).await;
    }
    let missing = c
        .get(format!("{}/nowhere", server.url()))
        .send()
        .await
        .expect("answer");
    assert_eq!(missing.status(), 404);

    let over_http: StatsSnapshot = c
        .get(format!("{}/__stats", server.url()))
        .send()
        .await
        .expect("answer")
        .json()
        .await
        .expect("a StatsSnapshot");
    assert_eq!(over_http, server.stats());
    assert_eq!(over_http.total_requests, 6);
    assert_eq!(over_http.status(200), 4);
    assert_eq!(over_http.status(401), 1);
    assert_eq!(over_http.status(404), 1);
    assert_eq!(over_http.id_count("a"), 2);
    assert_eq!(over_http.id_count("b"), 1);
    assert_eq!(over_http.id_count("d"), 0);
    assert_eq!(over_http.key(0).map(|k| k.admitted_ok), Some(3));
    assert_eq!(over_http.key(1).map(|k| k.admitted_ok), Some(1));
    assert_eq!(over_http.admitted_ok(), 4);
}

#[tokio::test]
async fn reset_zeroes_counters_and_windows() {
    let server = start(mock_upstream::Config {
        rate: 1,
        interval: 60.0,
        ..config(&["k1"])
    })
    .await;
    let c = client();
    assert_eq!(status(&c, &server, "k1", "a").await, 200);
    assert_eq!(status(&c, &server, "k1", "a").await, 429);
    let resp = c
        .post(format!("{}/__reset", server.url()))
        .send()
        .await
        .expect("answer");
    assert_eq!(resp.status(), 200);
    let stats = server.stats();
    assert_eq!(stats.total_requests, 0);
    assert!(stats.by_status.is_empty() && stats.ids.is_empty());
    assert_eq!(stats.keys[0].rate_limited, 0);
    assert_eq!(status(&c, &server, "k1", "a").await, 200);

    assert_eq!(status(&c, &server, "k1", "a").await, 429);
    server.reset();
    assert_eq!(status(&c, &server, "k1", "a").await, 200);
}

#[tokio::test]
async fn router_can_be_embedded_without_a_socket() {
    let state = MockState::new(&config(&["k1"])).expect("valid config");
    let app = mock_upstream::router(state.clone());
    let req = Request::get("/price?id=sol")
        .header("x-api-key", "k1")
        .body(Body::empty())
        .expect("request");
    let resp = app.oneshot(req).await.expect("infallible");
    assert_eq!(resp.status(), 200);
    assert_eq!(state.stats().id_count("sol"), 1);
}
