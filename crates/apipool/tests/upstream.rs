//! End to end against mock-upstream (a real HTTP server on 127.0.0.1): the pool completes every
//! item, never draws a 429 with limits configured, and learns limits from 429s otherwise.
//! (Utilisation figures come from the `batch_http` example in release mode: docs/BENCHMARKS.md.)

use apipool::http::{HttpClassifier, HttpKey};
use apipool::{ApiKeyManager, BatchOptions, BatchResult, PoolConfig, Strategy};
use reqwest::header::HeaderMap;

const KEYS: [&str; 5] = ["k0", "k1", "k2", "k3", "k4"];

async fn upstream(error_rate: f64, failing: &[&str]) -> mock_upstream::MockServer {
    let config = mock_upstream::Config {
        rate: 10,
        interval: 1.0,
        latency_ms: 10,
        error_rate,
        seed: Some(7),
        failing_keys: failing
            .iter()
            .map(|k| mock_upstream::ApiKey::parse(k).unwrap())
            .collect(),
        ..mock_upstream::Config::with_keys(KEYS).unwrap()
    };
    mock_upstream::spawn(config).await.unwrap()
}

type Fetched = (u16, HeaderMap, ());

async fn fetch_all(
    base: &str,
    config: PoolConfig,
    n: usize,
    concurrency: usize,
) -> BatchResult<String, Fetched, reqwest::Error> {
    let pool = ApiKeyManager::builder()
        .keys(KEYS.iter().map(|k| HttpKey::bearer(*k)))
        .strategy(Strategy::LeastUsed)
        .config(config)
        .build()
        .unwrap();
    let http = reqwest::Client::new();
    let url = format!("{base}/price");
    let (http, url) = (&http, &url);
    pool.abatch_exec(
        (0..n).map(|i| (format!("item-{i}"), format!("item-{i}"))),
        &HttpClassifier::new(),
        |key, id: String| async move {
            let resp = key
                .apply(http.get(url).query(&[("id", &id)]))
                .send()
                .await?;
            let (status, headers) = (resp.status().as_u16(), resp.headers().clone());
            resp.bytes().await?;
            Ok((status, headers, ()))
        },
        BatchOptions::new().concurrency(concurrency),
    )
    .await
    .unwrap()
}

fn ok_count(r: &BatchResult<String, Fetched, reqwest::Error>) -> usize {
    r.results.values().filter(|(s, _, ())| *s == 200).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_limits_draw_no_429_and_every_id_succeeds_once() {
    let server = upstream(0.0, &[]).await;
    let config = PoolConfig {
        rate_limit: 10,
        rate_limit_interval: 1.0,
        ..PoolConfig::default()
    };
    let r = fetch_all(&server.url(), config, 150, 20).await;
    assert_eq!(ok_count(&r), 150, "{:?}", r.errors);
    let stats = server.stats();
    assert_eq!(stats.status(429), 0, "configured limits are never exceeded");
    assert_eq!(stats.ids.len(), 150);
    assert!(
        stats.ids.values().all(|&n| n == 1),
        "each id fetched exactly once"
    );
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn learned_limits_keep_429s_rare() {
    let server = upstream(0.0, &[]).await;
    let r = fetch_all(&server.url(), PoolConfig::default(), 300, 10).await;
    assert_eq!(ok_count(&r), 300);
    // The first window costs up to one refused call per call in flight (10); after that the
    // learned limits keep the keys below the upstream's.
    let limited = server.stats().status(429);
    assert!(
        limited <= 20,
        "the pool learns instead of hammering: {limited} 429s for 300 items"
    );
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_keys_and_random_errors_are_retried_on_other_keys() {
    let server = upstream(0.1, &["k4"]).await;
    let config = PoolConfig {
        rate_limit: 10,
        rate_limit_interval: 1.0,
        retry_on_failure: true,
        max_retries: 5,
        ..PoolConfig::default()
    };
    let r = fetch_all(&server.url(), config, 120, 20).await;
    assert_eq!(ok_count(&r), 120, "{:?}", r.errors);
    assert!(
        r.banned_keys.contains(&apipool::fingerprint("k4")),
        "{:?}",
        r.banned_keys
    );
    server.shutdown().await.unwrap();
}
