//! Engine benchmarks: one acquire + report through the pool's public API (lock, selection,
//! limits, health, lease, report), on 10 and 100,000 keys, per strategy, and across threads.
//!
//! Run with: `cargo bench -p apipool --bench engine`

use apipool::{ApiKey, ApiKeyManager, Outcome, RateLimit, Strategy};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
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

fn pool(n: usize, strategy: Strategy, limited: bool) -> ApiKeyManager<Key> {
    let mut b = ApiKeyManager::builder()
        .keys((0..n).map(|i| Key(format!("key-{i}"))))
        .strategy(strategy)
        .no_stats();
    if limited {
        // Generous enough never to block: measures the window bookkeeping, not waiting.
        b = b.rate_limit(RateLimit::per_second(1_000_000_000).unwrap());
    }
    b.build().unwrap()
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
            let p = pool(n, strategy, false);
            g.bench_with_input(BenchmarkId::new(format!("{strategy}"), n), &p, |b, p| {
                b.iter(|| {
                    let lease = p.try_acquire().unwrap();
                    black_box(lease.client());
                    lease.report(Outcome::Success);
                });
            });
        }
        let p = pool(n, Strategy::RoundRobin, true);
        g.bench_with_input(BenchmarkId::new("round_robin+rate_limit", n), &p, |b, p| {
            b.iter(|| p.try_acquire().unwrap().report(Outcome::Success));
        });
    }
    g.finish();
}

fn threads(c: &mut Criterion) {
    let mut g = c.benchmark_group("acquire_report_threads");
    g.measurement_time(Duration::from_secs(4));
    for threads in [1usize, 2, 4] {
        g.throughput(Throughput::Elements(threads as u64));
        let p = pool(10, Strategy::RoundRobin, false);
        g.bench_with_input(
            BenchmarkId::from_parameter(threads),
            &threads,
            |b, &threads| {
                b.iter_custom(|iters| {
                    let start = Instant::now();
                    std::thread::scope(|s| {
                        for _ in 0..threads {
                            s.spawn(|| {
                                for _ in 0..iters {
                                    p.try_acquire().unwrap().report(Outcome::Success);
                                }
                            });
                        }
                    });
                    start.elapsed()
                });
            },
        );
    }
    g.finish();
}

criterion_group!(benches, acquire_report, threads);
criterion_main!(benches);
