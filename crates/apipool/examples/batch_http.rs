//! Fetches `GET {base}/price?id=item-{i}` for N items through a pool of keys, the way a user would
//! fetch 10,000 token prices, and prints a JSON summary as its last line.
//!
//! Run with (against `cargo run -p mock-upstream -- --keys k1,k2 --rate 20 --interval 1`):
//! `cargo run --release -p apipool --example batch_http -- --base-url http://127.0.0.1:9000 --keys k1,k2 --items 200 --concurrency 20`
//!
//! Without `--rate/--interval` the pool learns each key's limit from 429s and Retry-After.
//! `--sync` runs the same batch through the blocking shell (`batch_exec`).
//!
//! `--redis redis://127.0.0.1:6379` shares the keys' state on Redis: every process given the same
//! URL (and `--redis-prefix`) shares the keys' limits, so four processes with `--rate 20 --interval 1`
//! together stay within 20 calls per second per key. Give each one its own `--id-offset`.

use apipool::http::{HttpClassifier, HttpKey};
use apipool::{ApiKeyManager, BatchOptions, PoolConfig};
use clap::Parser;
use reqwest::header::HeaderMap;
use std::time::Duration;

#[derive(Debug, Parser)]
struct Args {
    /// Upstream base URL, e.g. http://127.0.0.1:9000
    #[arg(long)]
    base_url: String,
    /// Comma-separated API keys.
    #[arg(long, value_delimiter = ',', required = true)]
    keys: Vec<String>,
    /// Number of items.
    #[arg(long)]
    items: usize,
    /// Items in flight at once.
    #[arg(long, default_value_t = 50)]
    concurrency: usize,
    /// Use the blocking shell (`batch_exec`) instead of the async one.
    #[arg(long)]
    sync: bool,
    /// Per-key limit: calls per `--interval` seconds. Omit to learn limits from 429s.
    #[arg(long, requires = "interval")]
    rate: Option<u32>,
    /// Window for `--rate`, in seconds.
    #[arg(long, requires = "rate")]
    interval: Option<f64>,
    /// Retry failures (5xx, timeouts) on other keys up to this many times.
    #[arg(long, default_value_t = 0)]
    max_retries: u32,
    /// First item number (items are item-K .. item-(K+N-1)).
    #[arg(long, default_value_t = 0)]
    id_offset: usize,
    /// Print progress to stderr.
    #[arg(long)]
    progress: bool,
    /// Share the keys' state (limits, leases, cooldowns, bans) with every process on this Redis.
    #[arg(long)]
    redis: Option<String>,
    /// Namespace of the pool's Redis keys (processes sharing a pool use the same one).
    #[arg(long, default_value = "apipool", requires = "redis")]
    redis_prefix: String,
    /// Seconds a lease of a process that died holds its key's place in Redis (default: timeout + 5).
    #[arg(long, requires = "redis")]
    lease_ttl: Option<f64>,
}

type Fetched = (u16, HeaderMap, ());

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let base = args.base_url.trim_end_matches('/').to_owned();
    let config = PoolConfig {
        rate_limit: args.rate.unwrap_or(0),
        rate_limit_interval: args.interval.unwrap_or(60.0),
        retry_on_failure: args.max_retries > 0,
        max_retries: args.max_retries,
        timeout: 30.0,
        ..PoolConfig::default()
    };
    let mut builder = ApiKeyManager::builder()
        .keys(args.keys.iter().map(HttpKey::bearer))
        .strategy(apipool::Strategy::LeastUsed)
        .config(config);
    if let Some(url) = &args.redis {
        let mut redis = apipool::RedisStoreConfig::new(url)?.prefix(args.redis_prefix.as_str());
        if let Some(ttl) = args.lease_ttl {
            redis = redis.lease_ttl(Duration::try_from_secs_f64(ttl)?);
        }
        builder = builder.name("batch_http").redis(redis);
    }
    let pool = builder.build()?;
    let items: Vec<(String, String)> = (args.id_offset..args.id_offset + args.items)
        .map(|i| (format!("item-{i}"), format!("item-{i}")))
        .collect();
    let mut opts = BatchOptions::new()
        .concurrency(args.concurrency)
        .label("GET /price");
    if args.progress {
        opts = opts.on_progress(|p| {
            if p.done % 100 == 0 || p.done == p.total {
                eprintln!(
                    "{}/{} done, {} failed, {:.1}s",
                    p.done,
                    p.total,
                    p.failed,
                    p.elapsed.as_secs_f64()
                );
            }
        });
    }
    let classifier = HttpClassifier::new();
    let url = format!("{base}/price");
    let result = if args.sync {
        let http = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()?;
        pool.batch_exec(
            items,
            &classifier,
            |key, id: &String| -> Result<Fetched, reqwest::Error> {
                let resp = key
                    .apply_blocking(http.get(&url).query(&[("id", id)]))
                    .send()?;
                let (status, headers) = (resp.status().as_u16(), resp.headers().clone());
                resp.bytes()?;
                Ok((status, headers, ()))
            },
            opts,
        )?
    } else {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async {
            let http = reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()?;
            let (http, url) = (&http, &url);
            let r = pool
                .abatch_exec(
                    items,
                    &classifier,
                    |key, id: String| async move {
                        let resp = key
                            .apply(http.get(url).query(&[("id", &id)]))
                            .send()
                            .await?;
                        let (status, headers) = (resp.status().as_u16(), resp.headers().clone());
                        resp.bytes().await?;
                        Ok::<Fetched, reqwest::Error>((status, headers, ()))
                    },
                    opts,
                )
                .await?;
            anyhow::Ok(r)
        })?
    };
    // An item succeeded when its final answer was a 2xx.
    let succeeded = result
        .results
        .values()
        .filter(|(status, _, ())| (200..300).contains(status))
        .count();
    let summary = serde_json::json!({
        "total": result.total,
        "succeeded": succeeded,
        "failed": result.total - succeeded,
        "elapsed_s": (result.elapsed.as_secs_f64() * 1000.0).round() / 1000.0,
    });
    if !result.banned_keys.is_empty() {
        eprintln!(
            "keys banned or archived at the end: {}",
            result.banned_keys.join(", ")
        );
    }
    println!("{summary}");
    Ok(())
}
