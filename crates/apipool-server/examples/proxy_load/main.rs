//! Load through a running apipool server: N concurrent clients for S seconds, every answer
//! counted by status, the server's memory sampled as it goes.
//!
//! Run with (the script starts mock-upstream and `apipool serve`, makes the pool, then runs this):
//! `crates/apipool-server/benches/proxy-load.sh clients 1000 60` (the 60 s load) or
//! `crates/apipool-server/benches/proxy-load.sh clients 200 600` (the 10-minute soak).
//!
//! Directly: `cargo run --release -p apipool-server --example proxy_load -- --url URL --token T
//! --clients 1000 --seconds 60 [--server-pid PID --sample-secs 10]`.
//!
//! Prints one JSON line per memory sample (`{"t_s", "requests", "rss_kib"}`), then a final JSON
//! report (see `load::LoadReport`) with `rss_first_kib`, `rss_last_kib`, `rss_max_kib`. Exits
//! with status 1 when any request failed (non-2xx, no answer or timed out).

mod load;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::json;

#[derive(Debug, Parser)]
struct Args {
    /// URL every client GETs (e.g. http://127.0.0.1:8000/api/v1/proxy/load/http/price?id=btc).
    #[arg(long)]
    url: String,
    /// Access token sent as `Authorization: Bearer`.
    #[arg(long, env = "APIPOOL_LOAD_TOKEN")]
    token: String,
    /// Concurrent clients.
    #[arg(long, default_value_t = 1000)]
    clients: usize,
    /// Duration of the run in seconds.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Per-request timeout in seconds.
    #[arg(long, default_value_t = 30)]
    timeout_secs: u64,
    /// The server's process id: its VmRSS is sampled every `sample_secs`.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Seconds between memory samples.
    #[arg(long, default_value_t = 10)]
    sample_secs: u64,
}

/// VmRSS of a process, KiB.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let spec = load::LoadSpec {
        url: args.url.clone(),
        token: args.token.clone(),
        clients: args.clients,
        duration: Duration::from_secs(args.seconds),
        timeout: Duration::from_secs(args.timeout_secs),
    };
    let progress = Arc::new(AtomicU64::new(0));
    let samples = Arc::new(parking_lot::Mutex::new(Vec::<u64>::new()));
    let sampler = args.server_pid.map(|pid| {
        let (progress, samples) = (progress.clone(), samples.clone());
        let every = Duration::from_secs(args.sample_secs.max(1));
        tokio::spawn(async move {
            let started = Instant::now();
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                let Some(rss) = rss_kib(pid) else { break };
                samples.lock().push(rss);
                println!(
                    "{}",
                    json!({"t_s": started.elapsed().as_secs(),
                           "requests": progress.load(Ordering::Relaxed), "rss_kib": rss})
                );
            }
        })
    });
    let report = load::run(&spec, progress).await?;
    if let Some(s) = sampler {
        if let Some(rss) = args.server_pid.and_then(rss_kib) {
            samples.lock().push(rss);
        }
        s.abort();
    }
    let samples = samples.lock().clone();
    let mut out = serde_json::to_value(&report)?;
    out["errors"] = json!(report.errors());
    if !samples.is_empty() {
        out["rss_first_kib"] = json!(samples.first());
        out["rss_last_kib"] = json!(samples.last());
        out["rss_max_kib"] = json!(samples.iter().max());
        out["rss_samples"] = json!(samples.len());
    }
    println!("{out}");
    anyhow::ensure!(
        report.errors() == 0,
        "{} of {} requests failed (see by_status, transport_errors, timeouts above)",
        report.errors(),
        report.requests
    );
    Ok(())
}
