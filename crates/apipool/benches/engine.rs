//! Engine benchmarks: one acquire + report through the pool's public API (lock, selection,
//! limits, health, lease, report), on 10 and 100,000 keys, per strategy, and across threads
//! (round robin on 10 keys: the store with one shard, the default sharded store, and one pool per
//! thread — threads that share nothing, the machine's ceiling).
//!
//! Run with: `cargo bench -p apipool --bench engine`
//!
//! Instruction counts (repeatable on a loaded machine): build with
//! `cargo bench --workspace --bench engine --no-run`, then run the printed binary under callgrind
//! with `ENGINE_COUNT=STRATEGY:KEYS:ITERS` (STRATEGY as in `rotation_strategy`, or
//! `round_robin+rate_limit`), collecting only the measured loop:
//!
//! ```text
//! ENGINE_COUNT=random:100000:200000 valgrind --tool=callgrind --cache-sim=yes \
//!     --toggle-collect='*measured_loop*' target/release/deps/engine-HASH
//! ```
//!
//! The loop first runs `ITERS` unmeasured operations (warm-up: logs and selectors reach their
//! working size), then `ITERS` measured ones; instructions per acquire+report = Ir / ITERS.

use apipool::{ApiKey, ApiKeyManager, Outcome, RateLimit, Strategy};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group};
use std::hint::black_box;
use std::time::{Duration, Instant};

struct Key(String);

impl ApiKey for Key {
    type Client = ();
    fn primary_key(&self) -> &str {
        &self.0
    }
    fn identifier(&self) -> String {
        self.0.clone()
    }
    fn create_client(&self) {}
}

/// `shards: None`: the store's default (one per core, at most 16).
fn pool(n: usize, strategy: Strategy, limited: bool, shards: Option<usize>) -> ApiKeyManager<Key> {
    let mut b = ApiKeyManager::builder()
        .keys((0..n).map(|i| Key(format!("key-{i}"))))
        .strategy(strategy)
        .no_stats();
    if let Some(s) = shards {
        b = b.shards(s);
    }
    if limited {
        // Generous enough never to block: measures the window bookkeeping, not waiting.
        b = b.rate_limit(RateLimit::per_second(1_000_000_000).unwrap());
    }
    b.build().unwrap()
}

/// One acquire + report, the unit every figure here measures.
#[inline(always)]
fn op(p: &ApiKeyManager<Key>) {
    let lease = p.try_acquire().unwrap();
    black_box(lease.client());
    lease.report(Outcome::Success);
}

fn acquire_report(c: &mut Criterion) {
    let mut g = c.benchmark_group("acquire_report");
    g.throughput(Throughput::Elements(1));
    for n in [10usize, 100_000] {
        for strategy in [
            Strategy::Random,
            Strategy::RoundRobin,
            Strategy::LeastUsed,
            Strategy::Weighted,
        ] {
            let p = pool(n, strategy, false, None);
            g.bench_with_input(BenchmarkId::new(format!("{strategy}"), n), &p, |b, p| {
                b.iter(|| op(p));
            });
        }
        let p = pool(n, Strategy::RoundRobin, true, None);
        g.bench_with_input(BenchmarkId::new("round_robin+rate_limit", n), &p, |b, p| {
            b.iter(|| op(p));
        });
    }
    g.finish();
}

fn threads(c: &mut Criterion) {
    let mut g = c.benchmark_group("acquire_report_threads");
    g.measurement_time(Duration::from_secs(4));
    // "1 shard": one engine behind one lock (the store before sharding), for comparison;
    // "pool per thread": what two threads that share nothing reach on this machine.
    for (label, shards, threads) in [
        ("1 shard", Some(1), 1usize),
        ("1 shard", Some(1), 2),
        ("sharded", None, 1),
        ("sharded", None, 2),
        ("sharded", None, 4),
        ("pool per thread", Some(1), 2),
    ] {
        g.throughput(Throughput::Elements(threads as u64));
        let p = pool(10, Strategy::RoundRobin, false, shards);
        if label == "pool per thread" {
            // The machine's own ceiling: threads that share nothing (a 10-key pool each).
            let pools: Vec<_> = (0..threads)
                .map(|_| pool(10, Strategy::RoundRobin, false, Some(1)))
                .collect();
            g.bench_with_input(BenchmarkId::new(label, threads), &pools, |b, pools| {
                b.iter_custom(|iters| {
                    let start = Instant::now();
                    std::thread::scope(|s| {
                        for p in pools {
                            s.spawn(move || {
                                for _ in 0..iters {
                                    op(p);
                                }
                            });
                        }
                    });
                    start.elapsed()
                });
            });
            continue;
        }
        g.bench_with_input(BenchmarkId::new(label, threads), &threads, |b, &threads| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                std::thread::scope(|s| {
                    for _ in 0..threads {
                        s.spawn(|| {
                            for _ in 0..iters {
                                op(&p);
                            }
                        });
                    }
                });
                start.elapsed()
            });
        });
    }
    g.finish();
}

criterion_group!(benches, acquire_report, threads);

/// The loop callgrind counts (`--toggle-collect='*measured_loop*'`).
#[inline(never)]
fn measured_loop(p: &ApiKeyManager<Key>, iters: u64) {
    for _ in 0..iters {
        op(p);
    }
}

/// `ENGINE_COUNT=STRATEGY:KEYS:ITERS`: warm up, then run the measured loop once
/// (`ENGINE_SHARDS=N` sets the store's shard count; default: one per core).
fn count_mode(spec: &str) {
    let mut parts = spec.split(':');
    let (Some(strategy), Some(keys), Some(iters), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        panic!("ENGINE_COUNT must be STRATEGY:KEYS:ITERS, got {spec:?}");
    };
    let (strategy, limited) = match strategy.strip_suffix("+rate_limit") {
        Some(s) => (s, true),
        None => (strategy, false),
    };
    let strategy: Strategy = strategy.parse().expect("unknown strategy");
    let keys: usize = keys.parse().expect("KEYS must be a number");
    let iters: u64 = iters.parse().expect("ITERS must be a number");
    let shards = std::env::var("ENGINE_SHARDS")
        .ok()
        .map(|s| s.parse().expect("ENGINE_SHARDS must be a number"));
    let p = pool(keys, strategy, limited, shards);
    for _ in 0..iters {
        op(&p);
    }
    measured_loop(&p, iters);
}

fn main() {
    if let Ok(spec) = std::env::var("ENGINE_COUNT") {
        count_mode(&spec);
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
