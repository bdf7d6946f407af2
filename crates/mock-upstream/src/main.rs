//! `mock-upstream`: runs the fake keyed API until SIGTERM or Ctrl-C.
//!
//! Run with: `cargo run -p mock-upstream -- --keys k1,k2 --rate 20 --latency-ms 20`
//!
//! The first stdout line is `listening on http://ADDR` (scripts parse it). On exit the final
//! counters are printed to stderr as JSON.

use std::io::Write as _;

use clap::Parser;
use mock_upstream::Config;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let config = Config::parse();
    let server = mock_upstream::spawn(config).await?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening on {}", server.url())?;
        out.flush()?;
    }
    wait_for_signal().await?;
    let stats = server.stats();
    server.shutdown().await?;
    eprintln!("{}", serde_json::to_string(&stats)?);
    Ok(())
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    Ok(())
}
