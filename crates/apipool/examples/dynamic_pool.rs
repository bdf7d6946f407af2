//! A local pool kept in step with a server pool by an `AsyncDynamicKeyManager`.
//!
//! Run with:
//! `cargo run --release -p apipool --features sdk --example dynamic_pool -- --server http://127.0.0.1:8000 --username admin --password PW --pool prices --refresh-secs 2 --duration-secs 10`
//!
//! Logs in, fetches the pool's keys (`aget_keys`) and config (`aget_config`), then refreshes every
//! `--refresh-secs` for `--duration-secs` and exits. Prints one JSON line per refresh, the first
//! being the initial load, with primary keys masked:
//! `{"t":2.003,"pool_size":3,"added":["sk-…abcd"],"removed":[]}`.
//! Add or remove keys on the server while it runs to see them come and go.

use apipool::sdk::{AsyncDynamicKeyManager, Kept, Session};
use clap::Parser;
use std::time::{Duration, Instant};

/// Follow a server pool's keys.
#[derive(Debug, Parser)]
struct Args {
    /// apipool-server base URL.
    #[arg(long)]
    server: String,
    /// Username.
    #[arg(long)]
    username: String,
    /// Password.
    #[arg(long, env = "APIPOOL_PASSWORD")]
    password: String,
    /// Pool identifier.
    #[arg(long)]
    pool: String,
    /// Seconds between refreshes.
    #[arg(long, default_value_t = 5.0)]
    refresh_secs: f64,
    /// Seconds to run before exiting.
    #[arg(long, default_value_t = 30.0)]
    duration_secs: f64,
}

fn secs(name: &str, v: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(v).map_err(|e| anyhow::anyhow!("--{name} {v}: {e}"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let refresh = secs("refresh-secs", args.refresh_secs)?;
    let duration = secs("duration-secs", args.duration_secs)?;
    let started = Instant::now();
    let session = Session::alogin(&args.server, &args.username, &args.password).await?;
    let manager = AsyncDynamicKeyManager::from_session(&session, &args.pool)
        .refresh_interval(refresh)
        .on_refresh(move |r| {
            let line = serde_json::json!({
                "t": (started.elapsed().as_secs_f64() * 1000.0).round() / 1000.0,
                "pool_size": r.pool_size,
                "added": r.added.iter().map(|k| k.masked.as_str()).collect::<Vec<_>>(),
                "removed": r.removed.iter().map(|k| k.masked.as_str()).collect::<Vec<_>>(),
            });
            println!("{line}");
            match &r.kept {
                Some(Kept::FetchFailed(e)) => eprintln!("keeping the pool: {e}"),
                Some(Kept::EmptyList) => eprintln!("keeping the pool: the server listed no keys"),
                None => {}
            }
        })
        .astart()
        .await?;
    tokio::time::sleep(duration.saturating_sub(started.elapsed())).await;
    manager.ashutdown().await;
    Ok(())
}
