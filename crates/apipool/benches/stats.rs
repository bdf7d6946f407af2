//! Stats collector benchmarks.
//!
//! Run with: `cargo bench -p apipool --bench stats`
//!
//! - `stats_enqueue/1_thread`: the caller's cost of `record` (what the pool pays per call). The
//!   writer runs at the same time on the other core, as in production; the flush after each
//!   sample is not timed.
//! - `stats_enqueue/8_threads`: 8 threads record at once; the figure is wall time per event for
//!   all 8 together (2 cores, so threads also wait for a CPU).
//! - `stats_enqueue/1_thread_writer_idle`: like `1_thread`, but the writer is held back (long
//!   linger) until the untimed flush, so the figure is the caller's own cost without a busy
//!   writer competing for the 2 cores.
//! - `stats_sustained/sqlite_file`: events recorded and committed to a SQLite file per second
//!   (record + flush timed), i.e. the writer's sustained throughput.
//! - `manager_call/{stats_off,stats_on}`: one `ApiKeyManager::call` over 10 keys without and
//!   with a collector (writer held back as above); the difference is what statistics cost the
//!   caller.

use std::hint::black_box;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant, SystemTime};

use apipool::stats::{StatsCollector, StatsConfig};
use apipool::{ApiKey, ApiKeyManager, CallEvent, CallStatus};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

fn event(key: &Arc<str>, method: &Arc<str>, i: u64) -> CallEvent {
    CallEvent {
        key_identifier: key.clone(),
        status: if i.is_multiple_of(10) {
            CallStatus::Failed
        } else {
            CallStatus::Success
        },
        latency: Duration::from_micros(300 + i % 700),
        method: Some(method.clone()),
        finished_at: SystemTime::now(),
        pool: None,
        dedup_id: None,
    }
}

fn keys() -> (Vec<Arc<str>>, Arc<str>) {
    (
        (0..10).map(|i| Arc::from(format!("key-{i}"))).collect(),
        Arc::from("GET /v3/simple/price"),
    )
}

fn config() -> StatsConfig {
    // A backlog large enough that a sample never waits for the database: this measures the
    // enqueue path, not backpressure.
    StatsConfig::default()
        .queue_capacity(1 << 20)
        .max_backlog(8 << 20)
}

/// The writer sleeps until the flush at the end of a sample (it wakes only for flushes and
/// full batches): the timed loop measures the caller alone.
fn writer_held_back() -> StatsConfig {
    StatsConfig::default()
        .queue_capacity(1 << 23)
        .max_backlog(1 << 23)
        .batch_size(1 << 23)
        .linger(Duration::from_secs(600))
}

fn enqueue(c: &mut Criterion) {
    let (keys, method) = keys();
    let stats = StatsCollector::open_with("sqlite::memory:", config()).expect("open");
    let mut g = c.benchmark_group("stats_enqueue");
    g.throughput(Throughput::Elements(1));
    g.sample_size(20);
    g.measurement_time(Duration::from_secs(10));

    g.bench_function("1_thread", |b| {
        b.iter_custom(|iters| {
            let events: Vec<CallEvent> = (0..iters)
                .map(|i| event(&keys[i as usize % keys.len()], &method, i))
                .collect();
            let start = Instant::now();
            for e in events {
                stats.record(black_box(e));
            }
            let elapsed = start.elapsed();
            stats.flush().expect("flush");
            elapsed
        });
    });

    let idle = StatsCollector::open_with("sqlite::memory:", writer_held_back()).expect("open");
    g.bench_function("1_thread_writer_idle", |b| {
        b.iter_custom(|iters| {
            let events: Vec<CallEvent> = (0..iters)
                .map(|i| event(&keys[i as usize % keys.len()], &method, i))
                .collect();
            let start = Instant::now();
            for e in events {
                idle.record(black_box(e));
            }
            let elapsed = start.elapsed();
            idle.flush().expect("flush");
            elapsed
        });
    });

    g.bench_function("8_threads", |b| {
        b.iter_custom(|iters| {
            let per_thread = iters.div_ceil(8);
            let barrier = Barrier::new(9);
            let elapsed = std::thread::scope(|s| {
                for t in 0..8u64 {
                    let (stats, keys, method, barrier) = (&stats, &keys, &method, &barrier);
                    s.spawn(move || {
                        let events: Vec<CallEvent> = (0..per_thread)
                            .map(|i| event(&keys[(t + i) as usize % keys.len()], method, i))
                            .collect();
                        barrier.wait();
                        for e in events {
                            stats.record(black_box(e));
                        }
                    });
                }
                barrier.wait();
                let start = Instant::now();
                // Scope end joins the threads.
                start
            })
            .elapsed();
            stats.flush().expect("flush");
            elapsed.mul_f64(iters as f64 / (per_thread * 8) as f64)
        });
    });
    g.finish();
}

fn sustained(c: &mut Criterion) {
    let (keys, method) = keys();
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}/bench.db?mode=rwc", dir.path().display());
    let stats = StatsCollector::open_with(&url, config()).expect("open");
    let mut g = c.benchmark_group("stats_sustained");
    g.throughput(Throughput::Elements(1));
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(20));
    g.bench_function("sqlite_file", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            for i in 0..iters {
                stats.record(event(&keys[i as usize % keys.len()], &method, i));
            }
            stats.flush().expect("flush");
            start.elapsed()
        });
    });
    g.finish();
}

struct BenchKey(String);

impl ApiKey for BenchKey {
    type Client = ();
    fn primary_key(&self) -> &str {
        &self.0
    }
    fn create_client(&self) {}
}

fn manager_call(c: &mut Criterion) {
    let keys = || (0..10).map(|i| BenchKey(format!("secret-{i}")));
    let plain = ApiKeyManager::builder().keys(keys()).build().expect("pool");
    let stats = StatsCollector::open_with("sqlite::memory:", writer_held_back()).expect("open");
    let with_stats = ApiKeyManager::builder()
        .keys(keys())
        .stats(stats.clone())
        .build()
        .expect("pool");
    let mut g = c.benchmark_group("manager_call");
    g.sample_size(20);
    g.measurement_time(Duration::from_secs(10));
    g.bench_function("stats_off", |b| {
        b.iter(|| {
            plain
                .call(|()| Ok::<_, std::io::Error>(black_box(1)))
                .unwrap()
        });
    });
    g.bench_function("stats_on", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                with_stats
                    .call(|()| Ok::<_, std::io::Error>(black_box(1)))
                    .unwrap();
            }
            let elapsed = start.elapsed();
            // Writing the events is the writer's work, not the caller's: not timed.
            stats.flush().expect("flush");
            elapsed
        });
    });
    g.finish();
}

criterion_group!(benches, enqueue, sustained, manager_call);
criterion_main!(benches);
