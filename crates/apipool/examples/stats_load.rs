//! Load test for the stats collector: T threads record N events each through one
//! `StatsCollector`, then the example flushes, counts the rows through the query API and prints a
//! JSON summary as its last line.
//!
//! Run with:
//! `cargo run --release -p apipool --example stats_load -- --url 'sqlite:///tmp/stats.db?mode=rwc' --threads 8 --events 50000`
//!
//! `--url` is any URL the collector accepts (`sqlite::memory:`, `sqlite://PATH?mode=rwc`,
//! `postgres://…`, `mysql://…`); the schema is created on first use. The events of one run carry a
//! pool name unique to the run, so `rows` counts this run's rows even in a database that already
//! holds others.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use apipool::stats::{StatsCollector, StatsFilter};
use apipool::{CallEvent, CallStatus};
use clap::Parser;

#[derive(Parser, Debug)]
#[command(about = "Write T×N events through one StatsCollector and count them back")]
struct Args {
    /// Database URL (sqlite::memory:, sqlite://PATH?mode=rwc, postgres://..., mysql://...).
    #[arg(long, default_value = "sqlite::memory:")]
    url: String,
    /// Recording threads.
    #[arg(long, default_value_t = 8)]
    threads: usize,
    /// Events per thread.
    #[arg(long, default_value_t = 50_000)]
    events: usize,
}

const KEYS: [&str; 5] = [
    "key-alpha",
    "key-bravo",
    "key-charlie",
    "key-delta",
    "key-echo",
];
const STATUSES: [CallStatus; 4] = [
    CallStatus::Success,
    CallStatus::Success,
    CallStatus::Failed,
    CallStatus::ReachLimit,
];

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let collector = StatsCollector::open(&args.url)
        .with_context(|| format!("opening the stats database for {} threads", args.threads))?;
    let pool: Arc<str> = Arc::from(format!(
        "stats_load-{}-{}",
        std::process::id(),
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros())
    ));
    let keys: Vec<Arc<str>> = KEYS.iter().map(|k| Arc::from(*k)).collect();
    let method: Arc<str> = Arc::from("GET /load");

    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..args.threads {
            let (collector, pool, keys, method) = (&collector, &pool, &keys, &method);
            s.spawn(move || {
                for i in 0..args.events {
                    collector.record(CallEvent {
                        key_identifier: keys[(t + i) % keys.len()].clone(),
                        status: STATUSES[i % STATUSES.len()],
                        latency: Duration::from_micros(500 + (i % 1000) as u64),
                        method: Some(method.clone()),
                        finished_at: SystemTime::now(),
                        pool: Some(pool.clone()),
                        dedup_id: None,
                    });
                }
            });
        }
    });
    collector.flush().context("flushing the events")?;
    let elapsed = start.elapsed().as_secs_f64();

    let rows = collector
        .count(StatsFilter::all().pool(&*pool))
        .context("counting the rows")?;
    let written = args.threads * args.events;
    let stats = collector.writer_stats();
    eprintln!(
        "batches={} failed_attempts={} caller_waits={}",
        stats.batches, stats.failed_attempts, stats.caller_waits
    );
    collector.close().context("closing the collector")?;
    println!(
        "{{\"written\":{written},\"rows\":{rows},\"elapsed_s\":{elapsed:.3},\"events_per_s\":{:.0}}}",
        written as f64 / elapsed
    );
    Ok(())
}
