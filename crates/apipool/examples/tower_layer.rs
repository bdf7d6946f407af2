//! Pooling for an existing tower/reqwest client by adding one layer.
//!
//! Run with: `cargo run -p apipool --features tower --example tower_layer`
//!
//! Spawns mock-upstream on 127.0.0.1 (3 keys, 5 requests per key per second), wraps a
//! `reqwest::Client` in `KeyPoolLayer`, and sends 40 requests 8 at a time. The pool rotates the
//! keys, learns the limit from the first 429s, cools refused keys and retries on another key, so
//! every request succeeds.

use apipool::ApiKeyManager;
use apipool::http::HttpKey;
use apipool::integrations::tower::KeyPoolLayer;
use futures::StreamExt;
use tower::{ServiceBuilder, ServiceExt};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let keys = ["demo-key-0001", "demo-key-0002", "demo-key-0003"];
    let mut cfg = mock_upstream::Config::with_keys(keys)?;
    cfg.rate = 5;
    cfg.interval = 1.0;
    cfg.latency_ms = 5;
    let upstream = mock_upstream::spawn(cfg).await?;

    let pool = ApiKeyManager::builder()
        .keys(keys.map(|k| HttpKey::bearer(k).with_identifier(k)))
        .build()?;
    // The only change to an existing client: one layer.
    let client = ServiceBuilder::new()
        .layer(KeyPoolLayer::new(pool.clone()))
        .service(reqwest::Client::new());

    let started = std::time::Instant::now();
    let statuses: Vec<u16> = futures::stream::iter(0..40)
        .map(|i| {
            let svc = client.clone();
            let url = format!("{}/price?id=coin-{i}", upstream.url());
            async move {
                let req = reqwest::Request::new(reqwest::Method::GET, url.parse().expect("url"));
                match svc.oneshot(req).await {
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
    let stats = upstream.stats();
    for k in &stats.keys {
        println!(
            "{}: {} ok, {} refused with 429",
            k.key, k.admitted_ok, k.rate_limited
        );
    }
    for r in pool.key_reports() {
        println!(
            "{}: {} (learned limit {:?})",
            r.identifier,
            r.state.name(),
            r.learned_limit
        );
    }
    upstream.shutdown().await?;
    anyhow::ensure!(ok == 40, "some requests failed");
    Ok(())
}
