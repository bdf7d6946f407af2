//! Benchmarks of the mock's hot paths.
//!
//! Run with: `cargo bench -p mock-upstream --bench throughput`
//!
//! - `window/*`: the pure sliding-window decision (no I/O).
//! - `http/*`: `GET /price` over loopback with reqwest, latency 0, no rate limit, 10 keys; the
//!   client and the server share the machine's cores, so the figures are a lower bound of what
//!   the server alone sustains.

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use mock_upstream::Config;
use mock_upstream::window::SlidingWindowLog;

fn window(c: &mut Criterion) {
    let mut g = c.benchmark_group("window");
    g.throughput(Throughput::Elements(1));
    g.bench_function("try_admit_steady_20_per_s", |b| {
        // Arrivals 50 ms apart at 20/s: the window always holds ~20 entries.
        let mut log = SlidingWindowLog::default();
        let mut now = Instant::now();
        let step = Duration::from_millis(50);
        b.iter(|| {
            now += step;
            black_box(log.try_admit(now, 20, Duration::from_secs(1)))
        });
    });
    g.bench_function("try_admit_limited_1000_per_s", |b| {
        // A full window of 1000: every call is refused (the 429 path).
        let mut log = SlidingWindowLog::default();
        let t0 = Instant::now();
        for i in 0..1000 {
            log.try_admit(t0 + Duration::from_micros(i), 1000, Duration::from_secs(1));
        }
        let now = t0 + Duration::from_millis(10);
        b.iter(|| black_box(log.try_admit(now, 1000, Duration::from_secs(1))));
    });
    g.finish();
}

const KEYS: usize = 10;

fn http(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let keys: Vec<String> = (0..KEYS).map(|i| format!("bench-key-{i}")).collect();
    let server = rt.block_on(async {
        let config = Config::with_keys(&keys).expect("valid keys");
        mock_upstream::spawn(config).await.expect("the mock starts")
    });
    let url = format!("{}/price?id=bitcoin", server.url());
    let client = reqwest::Client::new();

    let mut g = c.benchmark_group("http");
    g.throughput(Throughput::Elements(1));
    g.measurement_time(Duration::from_secs(10));
    g.bench_function("price_sequential", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let t = Instant::now();
                for i in 0..iters {
                    let key = &keys[i as usize % KEYS];
                    let r = client.get(&url).bearer_auth(key).send().await;
                    let body = r.expect("answer").bytes().await.expect("body");
                    black_box(body);
                }
                t.elapsed()
            })
        });
    });
    for concurrency in [10usize, 50] {
        g.bench_function(format!("price_concurrency_{concurrency}"), |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let next = Arc::new(AtomicU64::new(0));
                    let t = Instant::now();
                    let workers: Vec<_> = (0..concurrency)
                        .map(|_| {
                            let (client, url, keys, next) =
                                (client.clone(), url.clone(), keys.clone(), next.clone());
                            tokio::spawn(async move {
                                loop {
                                    let i = next.fetch_add(1, Ordering::Relaxed);
                                    if i >= iters {
                                        break;
                                    }
                                    let key = &keys[i as usize % KEYS];
                                    let r = client.get(&url).bearer_auth(key).send().await;
                                    black_box(r.expect("answer").bytes().await.expect("body"));
                                }
                            })
                        })
                        .collect();
                    for w in workers {
                        w.await.expect("worker");
                    }
                    t.elapsed()
                })
            });
        });
    }
    g.finish();
    let stats = server.stats();
    assert_eq!(
        stats.status(200),
        stats.total_requests,
        "only 200s expected"
    );
    rt.block_on(server.shutdown()).expect("clean shutdown");
}

criterion_group!(benches, window, http);
criterion_main!(benches);
