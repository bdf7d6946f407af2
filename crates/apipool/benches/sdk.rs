//! SDK and integration benchmarks: the DynamicKeyManager's diff and refresh (no I/O: an
//! in-memory fetcher), and the tower layer's per-request overhead over an in-process service.
//!
//! Run with: `cargo bench -p apipool --bench sdk`

use apipool::ApiKeyManager;
use apipool::http::HttpKey;
use apipool::integrations::tower::KeyPoolLayer;
use apipool::sdk::{AsyncDynamicKeyManager, DynamicKeyManager, RemoteKey, diff_keys};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;
use tower::{Layer, Service, ServiceExt};

fn remote_keys(n: usize, offset: usize) -> Vec<RemoteKey> {
    (offset..offset + n)
        .map(|i| RemoteKey::new(format!("id-{i}"), format!("secret-key-{i:06}")))
        .collect()
}

fn diff(c: &mut Criterion) {
    let mut g = c.benchmark_group("diff_keys");
    for n in [100usize, 1_000, 10_000] {
        let current: Vec<String> = (0..n).map(|i| format!("secret-key-{i:06}")).collect();
        // 1% of the keys changed.
        let fetched: Vec<String> = (n / 100..n + n / 100)
            .map(|i| format!("secret-key-{i:06}"))
            .collect();
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| {
                let d = diff_keys(
                    current.iter().map(String::as_str),
                    fetched.iter(),
                    |k: &&String| k.as_str(),
                );
                black_box(d.add.len() + d.remove.len())
            });
        });
    }
    g.finish();
}

fn refresh(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut g = c.benchmark_group("refresh_unchanged");
    for n in [100usize, 1_000] {
        let keys = Arc::new(remote_keys(n, 0));
        let k2 = keys.clone();
        let mgr = rt
            .block_on(
                AsyncDynamicKeyManager::builder(move || {
                    let k = k2.clone();
                    async move { Ok(k.as_ref().clone()) }
                })
                .refresh_interval(Duration::from_secs(3600))
                .astart(),
            )
            .unwrap();
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::new("async", n), &n, |b, _| {
            b.iter(|| black_box(rt.block_on(mgr.refresh()).pool_size));
        });
        let k3 = keys.clone();
        let sync = DynamicKeyManager::builder(move || Ok(k3.as_ref().clone()))
            .refresh_interval(Duration::from_secs(3600))
            .start()
            .unwrap();
        g.bench_with_input(BenchmarkId::new("sync", n), &n, |b, _| {
            b.iter(|| black_box(sync.refresh().pool_size));
        });
        sync.shutdown();
        rt.block_on(mgr.ashutdown());
    }
    g.finish();
}

/// An in-process service answering 200 at once: measures the layer, not the network.
#[derive(Clone)]
struct Ok200;

impl Service<http::Request<String>> for Ok200 {
    type Response = http::Response<String>;
    type Error = std::convert::Infallible;
    type Future = std::future::Ready<Result<http::Response<String>, std::convert::Infallible>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Request<String>) -> Self::Future {
        std::future::ready(Ok(http::Response::new(String::new())))
    }
}

fn request() -> http::Request<String> {
    http::Request::get("http://127.0.0.1:1/price?id=btc")
        .body(String::new())
        .unwrap()
}

fn layer(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut g = c.benchmark_group("tower_layer");
    g.throughput(Throughput::Elements(1));
    g.bench_function("inner_only", |b| {
        b.iter(|| rt.block_on(Ok200.oneshot(request())).unwrap());
    });
    let pool = ApiKeyManager::builder()
        .keys((0..10).map(|i| HttpKey::bearer(format!("bench-key-{i:04}"))))
        .build()
        .unwrap();
    let svc = KeyPoolLayer::new(pool).layer(Ok200);
    g.bench_function("with_key_pool_10_keys", |b| {
        b.iter(|| rt.block_on(svc.clone().oneshot(request())).unwrap());
    });
    g.finish();
}

criterion_group!(benches, diff, refresh, layer);
criterion_main!(benches);
