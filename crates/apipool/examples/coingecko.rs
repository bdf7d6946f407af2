//! A CoinGecko-style SDK client used through a pool: multi-level chains are plain Rust closures.
//!
//! Run with: `cargo run -p apipool --example coingecko`
//! (it starts a local mock-upstream with 3 keys × 5 req/s and fetches 40 prices through the pool).

use apipool::http::HttpClassifier;
use apipool::{ApiKey, ApiKeyManager, BatchOptions, PoolConfig, Strategy};
use std::sync::Arc;

/// A key for the (fake) CoinGecko API.
struct CoinGeckoKey(String);

/// A tiny CoinGecko-style client bound to one key: `client.coins().simple().price().get(id)`.
#[derive(Clone)]
struct CoinGecko {
    http: reqwest::Client,
    base: Arc<str>,
    key: Arc<str>,
}

struct Coins<'a>(&'a CoinGecko);
struct Simple<'a>(&'a CoinGecko);
struct Price<'a>(&'a CoinGecko);

impl CoinGecko {
    fn coins(&self) -> Coins<'_> {
        Coins(self)
    }
}
impl<'a> Coins<'a> {
    fn simple(&self) -> Simple<'a> {
        Simple(self.0)
    }
}
impl<'a> Simple<'a> {
    fn price(&self) -> Price<'a> {
        Price(self.0)
    }
}
impl Price<'_> {
    async fn get(&self, id: &str) -> reqwest::Result<reqwest::Response> {
        let c = self.0;
        c.http
            .get(format!("{}/price", c.base))
            .header("x-api-key", &*c.key)
            .query(&[("id", id)])
            .send()
            .await
    }
}

impl ApiKey for CoinGeckoKey {
    type Client = CoinGecko;
    fn primary_key(&self) -> &str {
        &self.0
    }
    fn create_client(&self) -> CoinGecko {
        CoinGecko {
            http: reqwest::Client::new(),
            base: Arc::from(
                BASE.get()
                    .map_or("https://api.coingecko.com/api/v3", String::as_str),
            ),
            key: Arc::from(self.0.as_str()),
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let keys = [
        "cg-key-alpha-0001",
        "cg-key-bravo-0002",
        "cg-key-charlie-0003",
    ];
    let upstream = mock_upstream::spawn(mock_upstream::Config {
        rate: 5,
        latency_ms: 30,
        ..mock_upstream::Config::with_keys(keys)?
    })
    .await?;
    BASE.set(upstream.url()).ok();

    let pool = ApiKeyManager::builder()
        .keys(keys.map(|k| CoinGeckoKey(k.to_owned())))
        .strategy(Strategy::RoundRobin)
        .config(PoolConfig {
            rate_limit: 5,
            rate_limit_interval: 1.0,
            ..PoolConfig::default()
        })
        .build()?;

    // One call: the chain is ordinary Rust inside the closure.
    let resp = pool
        .acall_with(&HttpClassifier::new(), |cg| async move {
            cg.coins().simple().price().get("bitcoin").await
        })
        .await?;
    println!("bitcoin: {}", resp.text().await?);

    // A batch of 40 ids over 3 keys × 5/s: paced, never refused.
    let ids: Vec<(String, String)> = (0..40)
        .map(|i| (format!("coin-{i}"), format!("coin-{i}")))
        .collect();
    let result = pool
        .abatch_exec(
            ids,
            &HttpClassifier::new(),
            |cg, id: String| async move { cg.coins().simple().price().get(&id).await },
            BatchOptions::new().concurrency(6),
        )
        .await?;
    println!(
        "{} of {} prices in {:.1}s; upstream answered 429 {} times",
        result.succeeded,
        result.total,
        result.elapsed.as_secs_f64(),
        upstream.stats().status(429)
    );
    for report in pool.key_reports() {
        println!(
            "{}: {} calls, state {}",
            report.identifier,
            report.calls,
            report.state.name()
        );
    }
    upstream.shutdown().await?;
    Ok(())
}

/// Where the clients send requests (a real app would read it from its config).
static BASE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
