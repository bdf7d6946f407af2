//! `KeyPoolLayer` against mock-upstream: rotation, key placement, 429 cooldown with a retry on
//! another key, failures retried on another key, bodies that cannot be replayed.

use apipool::ApiKeyManager;
use apipool::Strategy;
use apipool::http::{AuthPlacement, HttpKey};
use apipool::integrations::PooledError;
use apipool::integrations::tower::{CloneBody, KeyPoolLayer};
use std::time::Duration;
use tower::{Layer, Service, ServiceBuilder, ServiceExt};

const KEYS: [&str; 3] = ["tw-key-0001", "tw-key-0002", "tw-key-0003"];

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

fn get(url: &str) -> reqwest::Request {
    reqwest::Request::new(reqwest::Method::GET, url.parse().expect("url"))
}

#[tokio::test]
async fn rotates_keys_over_a_reqwest_client() {
    let up = mock(100, &[]).await;
    let mut svc = ServiceBuilder::new()
        .layer(KeyPoolLayer::new(pool(false)))
        .service(reqwest::Client::new());
    for _ in 0..9 {
        let resp = svc
            .ready()
            .await
            .expect("ready")
            .call(get(&format!("{}/price?id=btc", up.url())))
            .await
            .expect("call");
        assert_eq!(resp.status(), 200);
    }
    let stats = up.stats();
    for i in 0..3 {
        assert_eq!(
            stats.key(i).expect("key").admitted_ok,
            3,
            "round robin over 3 keys"
        );
    }
    up.shutdown().await.expect("shutdown");
}

/// An `http::Request<String>` service over reqwest, to show the layer on plain `http` types.
#[derive(Clone)]
struct HttpOverReqwest(reqwest::Client);

impl Service<http::Request<String>> for HttpOverReqwest {
    type Response = reqwest::Response;
    type Error = reqwest::Error;
    type Future = futures::future::BoxFuture<'static, Result<reqwest::Response, reqwest::Error>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), reqwest::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<String>) -> Self::Future {
        let client = self.0.clone();
        Box::pin(async move { client.execute(reqwest::Request::try_from(req)?).await })
    }
}

#[tokio::test]
async fn puts_the_key_in_a_query_parameter_of_an_http_request() {
    let up = mock(100, &[]).await;
    let pool = ApiKeyManager::builder()
        .keys([HttpKey::new(
            KEYS[1],
            AuthPlacement::Query("api_key".into()),
        )])
        .build()
        .expect("pool");
    let mut svc = KeyPoolLayer::new(pool).layer(HttpOverReqwest(reqwest::Client::new()));
    let req = http::Request::post(format!("{}/echo/a?x=1", up.url()))
        .header("content-type", "text/plain")
        .body("hello".to_owned())
        .expect("request");
    let resp = svc
        .ready()
        .await
        .expect("ready")
        .call(req)
        .await
        .expect("call");
    assert_eq!(resp.status(), 200);
    let echo: serde_json::Value = resp.json().await.expect("json");
    assert_eq!(echo["raw_query"], format!("x=1&api_key={}", KEYS[1]));
    assert_eq!(echo["body"], "hello");
    assert_eq!(echo["key_index"], 1);
    up.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn a_429_cools_the_key_and_the_request_goes_to_another() {
    let up = mock(5, &[]).await;
    // Use up key 0's window directly: its next request draws a 429 with Retry-After ~60 s.
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
    let mut svc = KeyPoolLayer::new(pool.clone()).layer(reqwest::Client::new());
    for _ in 0..6 {
        let resp = svc
            .ready()
            .await
            .expect("ready")
            .call(get(&format!("{}/price?id=eth", up.url())))
            .await
            .expect("call");
        assert_eq!(resp.status(), 200, "retried on another key");
    }
    let stats = up.stats();
    assert_eq!(
        stats.key(0).expect("key 0").rate_limited,
        1,
        "after one 429 the key cools: no second refusal"
    );
    assert_eq!(
        stats.key(1).expect("k").admitted_ok + stats.key(2).expect("k").admitted_ok,
        6
    );
    let state = pool.explain(KEYS[0]).expect("explain").state;
    assert!(
        matches!(state, apipool::KeyState::Cooling { .. }),
        "{state:?}"
    );
    up.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn failures_are_retried_on_another_key() {
    let up = mock(100, &[KEYS[0]]).await;
    let pool = pool(true);
    let mut svc = KeyPoolLayer::new(pool.clone()).layer(reqwest::Client::new());
    for _ in 0..6 {
        let resp = svc
            .ready()
            .await
            .expect("ready")
            .call(get(&format!("{}/price?id=sol", up.url())))
            .await
            .expect("call");
        assert_eq!(resp.status(), 200);
    }
    assert!(
        up.stats().key(0).expect("k").errors >= 1,
        "key 0 was tried and failed"
    );
    let report = pool.explain(KEYS[0]).expect("explain");
    assert!(report.failures >= 1);
    up.shutdown().await.expect("shutdown");
}

/// A body that cannot be replayed.
struct OneShot(String);

impl CloneBody for OneShot {
    fn try_clone_body(&self) -> Option<Self> {
        None
    }
}

#[derive(Clone)]
struct OneShotService(reqwest::Client);

impl Service<http::Request<OneShot>> for OneShotService {
    type Response = reqwest::Response;
    type Error = reqwest::Error;
    type Future = futures::future::BoxFuture<'static, Result<reqwest::Response, reqwest::Error>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), reqwest::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<OneShot>) -> Self::Future {
        let client = self.0.clone();
        let req = req.map(|b| b.0);
        Box::pin(async move { client.execute(reqwest::Request::try_from(req)?).await })
    }
}

#[tokio::test]
async fn a_body_that_cannot_be_replayed_is_sent_once() {
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
    let mut svc = KeyPoolLayer::new(pool.clone()).layer(OneShotService(reqwest::Client::new()));
    let req = http::Request::post(format!("{}/echo/x", up.url()))
        .body(OneShot("once".to_owned()))
        .expect("request");
    let resp = svc
        .ready()
        .await
        .expect("ready")
        .call(req)
        .await
        .expect("call");
    assert_eq!(
        resp.status(),
        429,
        "no replay: the refusal comes back as is"
    );
    assert_eq!(
        up.stats().total_requests,
        4,
        "three to fill the windows, one through the layer"
    );
    let cooling = pool
        .key_reports()
        .iter()
        .filter(|r| matches!(r.state, apipool::KeyState::Cooling { .. }))
        .count();
    assert_eq!(cooling, 1, "the refused key still cools");
    up.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn an_exhausted_pool_is_a_typed_error() {
    let up = mock(100, &[]).await;
    let pool = ApiKeyManager::builder()
        .keys([HttpKey::bearer(KEYS[0])])
        .max_wait(Duration::from_millis(50))
        .build()
        .expect("pool");
    pool.disable(KEYS[0]).expect("disable");
    let mut svc = KeyPoolLayer::new(pool).layer(reqwest::Client::new());
    let err = svc
        .ready()
        .await
        .expect("ready")
        .call(get(&format!("{}/price?id=btc", up.url())))
        .await
        .unwrap_err();
    assert!(
        matches!(err, PooledError::Pool(apipool::Error::NoUsableKeys)),
        "{err:?}"
    );
    assert_eq!(up.stats().total_requests, 0);
    up.shutdown().await.expect("shutdown");
}
