//! Proxy benchmarks (loopback, the real app on SQLite, mock-upstream without latency).
//!
//! Run with: `cargo bench -p apipool-server --bench proxy`
//!
//! * `proxy/*` (criterion): one request at a time, keep-alive — `direct` is the mock alone, the
//!   others go through the server (auth, pool lookup, engine lease, key injection, upstream call,
//!   stats event). `proxy − direct` is the latency the proxy adds.
//! * `quota` (printed once, not criterion): 10 keys × 20 req/s at mock-upstream (its exact
//!   sliding window), the pool configured with the same limit, 2,000 requests from 50
//!   concurrent clients through `/http`. Prints successes, upstream 429s, the elapsed time and
//!   utilisation = (N / (keys × rate)) / elapsed (as in docs/BENCHMARKS.md; > 1 is possible
//!   because the upstream's window starts empty). Skip it with `APIPOOL_BENCH_SKIP_QUOTA=1`.
//!
//! Throughput, tail latency under load and RSS at 1,000 connections: `benches/proxy-load.sh`.

use std::time::{Duration, Instant};

use apipool_server::config::Config;
use apipool_server::startup::Application;
use criterion::{Criterion, criterion_group, criterion_main};
use secrecy::SecretString;
use serde_json::{Value, json};

struct Setup {
    base: String,
    token: String,
    client: reqwest::Client,
    _mock: mock_upstream::MockServer,
    mock_url: String,
    _dir: tempfile::TempDir,
}

async fn setup(keys: usize, mock: mock_upstream::Config, pool_config: Value) -> Setup {
    let raws: Vec<String> = (0..keys).map(|i| format!("bench-proxy-key-{i}")).collect();
    let mut mock_cfg = mock_upstream::Config::with_keys(&raws).expect("keys");
    mock_cfg.rate = mock.rate;
    mock_cfg.interval = mock.interval;
    let mock = mock_upstream::spawn(mock_cfg).await.expect("mock");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = Config::for_data_dir(dir.path().join("data"));
    config.bind = "127.0.0.1:0".parse().expect("addr");
    config.admin_password = Some(SecretString::from("bench-admin-password"));
    let app = Application::build(config).await.expect("app");
    let base = format!("http://127.0.0.1:{}", app.port());
    tokio::spawn(app.run_until_stopped());
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .timeout(Duration::from_secs(120))
        .build()
        .expect("client");
    let login: Value = client
        .post(format!("{base}/api/v1/auth/login"))
        .json(&json!({"username": "admin", "password": "bench-admin-password"}))
        .send()
        .await
        .expect("login")
        .json()
        .await
        .expect("json");
    let token = login["access_token"].as_str().expect("token").to_owned();
    let mut idents = Vec::new();
    for (i, raw) in raws.iter().enumerate() {
        let id = format!("k{i}");
        let r = client
            .post(format!("{base}/api/v1/keys"))
            .bearer_auth(&token)
            .json(&json!({"identifier": id, "raw_key": raw}))
            .send()
            .await
            .expect("key");
        assert_eq!(r.status(), 201);
        idents.push(id);
    }
    let r = client
        .post(format!("{base}/api/v1/pools"))
        .bearer_auth(&token)
        .json(
            &json!({"identifier": "bench", "name": "bench", "key_identifiers": idents,
                      "rotation_strategy": "round_robin", "pool_config": pool_config,
                      "upstream": {"base_url": mock.url(), "auth": "bearer"}}),
        )
        .send()
        .await
        .expect("pool");
    assert_eq!(r.status(), 201);
    Setup {
        base,
        token,
        client,
        mock_url: mock.url(),
        _mock: mock,
        _dir: dir,
    }
}

async fn get_ok(client: &reqwest::Client, url: &str, token: Option<&str>) {
    let mut rb = client.get(url);
    if let Some(t) = token {
        rb = rb.bearer_auth(t);
    }
    let r = rb.send().await.expect("get");
    assert_eq!(r.status(), 200);
    r.bytes().await.expect("body");
}

fn latency(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let s = rt.block_on(setup(10, mock_upstream::Config::default(), json!({})));
    let direct = format!("{}/price?id=bitcoin", s.mock_url);
    let via_http = format!("{}/api/v1/proxy/bench/http/price?id=bitcoin", s.base);
    let invoke = format!("{}/api/v1/proxy/bench/invoke", s.base);
    let body =
        json!({"attr_path": ["get"], "args": ["/price"], "kwargs": {"params": {"id": "bitcoin"}}});
    let mut g = c.benchmark_group("proxy");
    g.sample_size(200);
    g.bench_function("direct GET /price (mock alone)", |b| {
        b.iter(|| rt.block_on(get_ok(&s.client, &direct, Some("bench-proxy-key-0"))))
    });
    g.bench_function("GET /proxy/{pool}/http/price", |b| {
        b.iter(|| rt.block_on(get_ok(&s.client, &via_http, Some(&s.token))))
    });
    g.bench_function("POST /proxy/{pool}/invoke get /price", |b| {
        b.iter(|| {
            rt.block_on(async {
                let r = s
                    .client
                    .post(&invoke)
                    .bearer_auth(&s.token)
                    .json(&body)
                    .send()
                    .await
                    .expect("invoke");
                assert_eq!(r.status(), 200);
                r.bytes().await.expect("body");
            })
        })
    });
    g.finish();
    drop(s);
    if std::env::var_os("APIPOOL_BENCH_SKIP_QUOTA").is_none() {
        rt.block_on(quota());
    }
}

/// 10 keys × 20 req/s, 2,000 requests, 50 concurrent clients: all must succeed.
async fn quota() {
    const KEYS: usize = 10;
    const RATE: u32 = 20;
    const N: usize = 2000;
    const CLIENTS: usize = 50;
    let mock = mock_upstream::Config {
        rate: RATE,
        interval: 1.0,
        ..mock_upstream::Config::default()
    };
    let s = setup(
        KEYS,
        mock,
        json!({"rate_limit": RATE, "rate_limit_interval": 1}),
    )
    .await;
    let url = format!("{}/api/v1/proxy/bench/http/price?id=bitcoin", s.base);
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let (client, url, token, next) =
            (s.client.clone(), url.clone(), s.token.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut ok = 0usize;
            let mut other = 0usize;
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < N {
                let r = client
                    .get(&url)
                    .bearer_auth(&token)
                    .send()
                    .await
                    .expect("get");
                if r.status() == 200 {
                    ok += 1;
                } else {
                    other += 1;
                }
                r.bytes().await.expect("body");
            }
            (ok, other)
        }));
    }
    let (mut ok, mut failed) = (0, 0);
    for t in tasks {
        let (o, f) = t.await.expect("client task");
        ok += o;
        failed += f;
    }
    let elapsed = started.elapsed();
    let stats: Value = s
        .client
        .get(format!("{}/__stats", s.mock_url))
        .send()
        .await
        .expect("mock stats")
        .json()
        .await
        .expect("json");
    let upstream_429 = stats["by_status"]["429"].as_u64().unwrap_or(0);
    let ideal = N as f64 / (KEYS as f64 * f64::from(RATE));
    println!(
        "quota: {ok}/{N} succeeded, {failed} failed, upstream 429s: {upstream_429}, elapsed {:.3} s, utilisation {:.3} (= {ideal:.0} s / elapsed)",
        elapsed.as_secs_f64(),
        ideal / elapsed.as_secs_f64()
    );
}

criterion_group!(benches, latency);
criterion_main!(benches);
