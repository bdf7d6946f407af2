//! `KeyPoolMiddleware` against mock-upstream: rotation, header placement, 429 cooldown with a
//! retry on another key, failures retried on another key, streaming bodies sent once.

use apipool::http::{AuthPlacement, HttpKey};
use apipool::integrations::middleware::KeyPoolMiddleware;
use apipool::{ApiKeyManager, KeyState, Strategy};
use reqwest::header::HeaderName;
use reqwest_middleware::{ClientBuilder, ClientWithMiddleware};
use std::time::Duration;

const KEYS: [&str; 3] = ["mw-key-0001", "mw-key-0002", "mw-key-0003"];

async fn mock(rate: u32, failing: &[&str]) -> mock_upstream::MockServer {
    let mut cfg = mock_upstream::Config::with_keys(KEYS).expect("config");
    cfg.rate = rate;
    cfg.interval = 60.0;
    cfg.failing_keys = failing
        .iter()
        .map(|k| mock_upstream::ApiKey::parse(k).expect("key"))
        .collect();
    mock_upstream::spawn(cfg).await.expect("mock")
}

fn pool(retry: bool) -> ApiKeyManager<HttpKey> {
    ApiKeyManager::builder()
        .keys(KEYS.map(|k| HttpKey::bearer(k).with_identifier(k)))
        .strategy(Strategy::RoundRobin)
        .retry(retry, 3)
        .max_wait(Duration::from_secs(2))
        .build()
        .expect("pool")
}

fn client(pool: ApiKeyManager<HttpKey>) -> ClientWithMiddleware {
    ClientBuilder::new(reqwest::Client::new())
        .with(KeyPoolMiddleware::new(pool))
        .build()
}

#[tokio::test]
async fn rotates_keys() {
    let up = mock(100, &[]).await;
    let c = client(pool(false));
    for _ in 0..9 {
        let r = c
            .get(format!("{}/price", up.url()))
            .query(&[("id", "btc")])
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 200);
    }
    let stats = up.stats();
    for i in 0..3 {
        assert_eq!(stats.key(i).expect("key").admitted_ok, 3);
    }
    up.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn puts_the_key_in_a_named_header() {
    let up = mock(100, &[]).await;
    let pool = ApiKeyManager::builder()
        .keys([HttpKey::new(
            KEYS[2],
            AuthPlacement::Header(HeaderName::from_static("x-api-key")),
        )])
        .build()
        .expect("pool");
    let r = client(pool)
        .post(format!("{}/echo/v1/items", up.url()))
        .json(&serde_json::json!({"a": 1}))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    let echo: serde_json::Value = r.json().await.expect("json");
    assert_eq!(echo["key_index"], 2);
    assert_eq!(echo["headers"]["x-api-key"], KEYS[2]);
    assert_eq!(echo["body"], r#"{"a":1}"#);
    up.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn a_429_cools_the_key_and_the_request_goes_to_another() {
    let up = mock(5, &[]).await;
    let raw = reqwest::Client::new();
    for _ in 0..5 {
        let r = raw
            .get(format!("{}/price?id=x", up.url()))
            .bearer_auth(KEYS[0])
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 200);
    }
    let pool = pool(false);
    let c = client(pool.clone());
    for _ in 0..6 {
        let r = c
            .get(format!("{}/price?id=eth", up.url()))
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 200, "retried on another key");
    }
    let stats = up.stats();
    assert_eq!(
        stats.key(0).expect("k").rate_limited,
        1,
        "one 429, then the key cools"
    );
    assert!(matches!(
        pool.explain(KEYS[0]).expect("explain").state,
        KeyState::Cooling { .. }
    ));
    up.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn failures_are_retried_on_another_key() {
    let up = mock(100, &[KEYS[1]]).await;
    let pool = pool(true);
    let c = client(pool.clone());
    for _ in 0..6 {
        let r = c
            .get(format!("{}/price?id=sol", up.url()))
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 200);
    }
    assert!(up.stats().key(1).expect("k").errors >= 1);
    assert!(pool.explain(KEYS[1]).expect("explain").failures >= 1);
    up.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn a_streaming_body_is_sent_once() {
    let up = mock(1, &[]).await;
    let raw = reqwest::Client::new();
    for k in KEYS {
        let r = raw
            .get(format!("{}/price?id=x", up.url()))
            .bearer_auth(k)
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 200);
    }
    let pool = pool(true);
    let stream = futures::stream::iter([Ok::<_, std::io::Error>(bytes::Bytes::from("chunk"))]);
    let r = client(pool)
        .post(format!("{}/echo/s", up.url()))
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .expect("send");
    assert_eq!(
        r.status(),
        429,
        "no replay of a stream: the refusal comes back"
    );
    assert_eq!(up.stats().total_requests, 4);
    up.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn no_usable_key_is_a_middleware_error() {
    let up = mock(100, &[]).await;
    let pool = pool(false);
    for k in KEYS {
        pool.disable(k).expect("disable");
    }
    let err = client(pool)
        .get(format!("{}/price?id=btc", up.url()))
        .send()
        .await
        .unwrap_err();
    assert!(
        matches!(err, reqwest_middleware::Error::Middleware(_)),
        "{err:?}"
    );
    assert!(err.to_string().contains("no usable key"), "{err}");
    assert_eq!(up.stats().total_requests, 0);
    up.shutdown().await.expect("shutdown");
}
