//! Pooling for an existing `reqwest_middleware` client by adding one middleware.
//!
//! Run with: `cargo run -p apipool --features reqwest-middleware --example reqwest_middleware`
//!
//! Spawns mock-upstream on 127.0.0.1 (3 keys, 5 requests per key per second, key 2 broken:
//! it answers 500), adds `KeyPoolMiddleware` to a `ClientWithMiddleware`, and sends 40 requests
//! 8 at a time. Rate-limited keys cool and the request moves to another key; the broken key's
//! failures are retried on another key until the key is banned.

use apipool::ApiKeyManager;
use apipool::http::HttpKey;
use apipool::integrations::middleware::KeyPoolMiddleware;
use futures::StreamExt;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let keys = ["demo-key-0001", "demo-key-0002", "demo-key-0003"];
    let mut cfg = mock_upstream::Config::with_keys(keys)?;
    cfg.rate = 5;
    cfg.interval = 1.0;
    cfg.latency_ms = 5;
    cfg.failing_keys = vec![mock_upstream::ApiKey::parse(keys[2])?];
    let upstream = mock_upstream::spawn(cfg).await?;

    let pool = ApiKeyManager::builder()
        .keys(keys.map(|k| HttpKey::bearer(k).with_identifier(k)))
        .retry(true, 3)
        .build()?;
    // The only change to an existing client: one middleware.
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(KeyPoolMiddleware::new(pool.clone()))
        .build();

    let started = std::time::Instant::now();
    let statuses: Vec<u16> = futures::stream::iter(0..40)
        .map(|i| {
            let client = client.clone();
            let url = format!("{}/price", upstream.url());
            async move {
                match client
                    .get(url)
                    .query(&[("id", format!("coin-{i}"))])
                    .send()
                    .await
                {
                    Ok(resp) => resp.status().as_u16(),
                    Err(e) => {
                        eprintln!("request {i} failed: {e}");
                        0
                    }
                }
            }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    let ok = statuses.iter().filter(|s| **s == 200).count();
    println!("{ok}/40 succeeded in {:.2?}", started.elapsed());
    for k in &upstream.stats().keys {
        println!(
            "{}: {} ok, {} refused with 429, {} errors",
            k.key, k.admitted_ok, k.rate_limited, k.errors
        );
    }
    for r in pool.key_reports() {
        println!("{}: {}", r.identifier, r.state.name());
    }
    upstream.shutdown().await?;
    anyhow::ensure!(ok == 40, "some requests failed");
    Ok(())
}
