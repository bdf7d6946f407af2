use std::time::Duration;

use mock_upstream::{Config, MockServer};

/// A default config accepting `keys`.
pub(crate) fn config(keys: &[&str]) -> Config {
    Config::with_keys(keys).expect("test keys are valid")
}

/// Starts the mock on a free port.
pub(crate) async fn start(config: Config) -> MockServer {
    mock_upstream::spawn(config).await.expect("the mock starts")
}

pub(crate) fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("a reqwest client builds")
}

/// `GET /price?id=ID` with `Authorization: Bearer KEY`.
pub(crate) async fn price(
    client: &reqwest::Client,
    server: &MockServer,
    key: &str,
    id: &str,
) -> reqwest::Response {
    client
        .get(format!("{}/price", server.url()))
        .query(&[("id", id)])
        .bearer_auth(key)
        .send()
        .await
        .expect("the mock answers")
}

/// The status of `GET /price?id=ID` with key `key`.
pub(crate) async fn status(
    client: &reqwest::Client,
    server: &MockServer,
    key: &str,
    id: &str,
) -> u16 {
    price(client, server, key, id).await.status().as_u16()
}

pub(crate) fn header<'a>(resp: &'a reqwest::Response, name: &str) -> Option<&'a str> {
    resp.headers().get(name).and_then(|v| v.to_str().ok())
}

pub(crate) async fn json(resp: reqwest::Response) -> serde_json::Value {
    resp.json().await.expect("a JSON body")
}
