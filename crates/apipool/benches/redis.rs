//! The Redis key-state store: one acquire + report through the pool's public API, on the Redis at
//! `APIPOOL_TEST_REDIS_URL` (default redis://127.0.0.1:6379; loopback in our figures). Each
//! acquire and each report is one round trip (`EVALSHA`, scripts loaded when the pool is built).
//!
//! Run with: `cargo bench -p apipool --bench redis` (figures in docs/BENCHMARKS.md, "Redis store").
//!
//! - `redis_acquire_report/one_thread/{plain,limited}`: one caller; `limited` adds a per-key
//!   rate limit (never reached), so the scripts also keep the shared sliding windows.
//! - `redis_acquire_report/threads/N`: N threads on one pool at once (time per operation of the
//!   whole group: throughput). Acquires of one pool in one process take turns (one round trip
//!   at a time); reports run in parallel.
//! - `memory_acquire_report`: the same operation on the in-process store, for scale.

use apipool::{ApiKey, ApiKeyManager, Outcome, RateLimit, RedisStoreConfig, Strategy};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use std::time::{Duration, Instant};

struct Key(String);

impl ApiKey for Key {
    type Client = ();
    fn primary_key(&self) -> &str {
        &self.0
    }
    fn create_client(&self) {}
}

fn pool(redis: bool, limited: bool) -> ApiKeyManager<Key> {
    let mut b = ApiKeyManager::builder()
        .keys((0..10).map(|i| Key(format!("bench-secret-{i}"))))
        .strategy(Strategy::RoundRobin)
        .no_stats();
    if limited {
        b = b.rate_limit(RateLimit::per_second(1_000_000).unwrap());
    }
    if redis {
        let url = std::env::var("APIPOOL_TEST_REDIS_URL")
            .unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
        let prefix = format!("apipool-bench:{:016x}", rand::random::<u64>());
        b = b.redis(RedisStoreConfig::new(&url).unwrap().prefix(prefix));
    }
    b.build().unwrap()
}

fn op(p: &ApiKeyManager<Key>) {
    let lease = p.try_acquire().unwrap();
    black_box(lease.client());
    lease.report(Outcome::Success);
}

fn one_thread(c: &mut Criterion) {
    let mut g = c.benchmark_group("redis_acquire_report/one_thread");
    g.throughput(Throughput::Elements(1));
    for (name, limited) in [("plain", false), ("limited", true)] {
        let p = pool(true, limited);
        g.bench_function(name, |b| b.iter(|| op(&p)));
    }
    g.finish();
    let p = pool(false, false);
    c.bench_function("memory_acquire_report", |b| b.iter(|| op(&p)));
}

fn threads(c: &mut Criterion) {
    let mut g = c.benchmark_group("redis_acquire_report/threads");
    g.throughput(Throughput::Elements(1));
    g.measurement_time(Duration::from_secs(5));
    for n in [2usize, 4, 8] {
        let p = pool(true, false);
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, &n| {
            b.iter_custom(|iters| {
                let per = iters.div_ceil(n as u64);
                let started = Instant::now();
                std::thread::scope(|s| {
                    for _ in 0..n {
                        s.spawn(|| {
                            for _ in 0..per {
                                op(&p);
                            }
                        });
                    }
                });
                started
                    .elapsed()
                    .mul_f64(iters as f64 / (per * n as u64) as f64)
            });
        });
    }
    g.finish();
}

criterion_group!(benches, one_thread, threads);
criterion_main!(benches);
