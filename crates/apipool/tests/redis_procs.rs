//! Several processes, one pool: four `batch_http` example processes share ten keys through the
//! real Redis at `APIPOOL_TEST_REDIS_URL` (default redis://127.0.0.1:6379) against one
//! mock-upstream (10 keys × 20 req/s).
//!
//! The workers are the example binary itself (`target/<profile>/examples/batch_http`, built by
//! `cargo test`/`cargo nextest` with the tests; built here only if missing), so CI builds once.

use apipool::http::HttpKey;
use apipool::{ApiKeyManager, RateLimit, RedisStoreConfig};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const RATE: u32 = 20;
const ITEMS: usize = 500;
const WORKERS: usize = 4;

fn keys() -> Vec<String> {
    (0..10).map(|i| format!("mp-key-{i:04}")).collect()
}

fn redis_url() -> String {
    std::env::var("APIPOOL_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// The example binary next to this test binary (`target/<profile>/deps/../examples/`).
fn batch_http() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(|d| d.parent()).unwrap();
    let bin = dir
        .join("examples")
        .join(format!("batch_http{}", std::env::consts::EXE_SUFFIX));
    if !bin.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
        let status = Command::new(cargo)
            .args(["build", "--workspace", "--example", "batch_http"])
            .status()
            .unwrap();
        assert!(status.success(), "building the batch_http example failed");
    }
    assert!(bin.exists(), "no example binary at {}", bin.display());
    bin
}

async fn upstream() -> mock_upstream::MockServer {
    let config = mock_upstream::Config {
        rate: RATE,
        interval: 1.0,
        ..mock_upstream::Config::with_keys(keys()).unwrap()
    };
    mock_upstream::spawn(config).await.unwrap()
}

fn worker(base: &str, offset: usize, redis: Option<(&str, &str)>, lease_ttl: Option<f64>) -> Child {
    let mut cmd = Command::new(batch_http());
    cmd.args(["--base-url", base, "--keys", &keys().join(",")])
        .args(["--items", &ITEMS.to_string(), "--concurrency", "50"])
        .args(["--rate", &RATE.to_string(), "--interval", "1"])
        .args(["--id-offset", &(offset * 10_000).to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    if let Some((url, prefix)) = redis {
        cmd.args(["--redis", url, "--redis-prefix", prefix]);
    }
    if let Some(ttl) = lease_ttl {
        cmd.args(["--lease-ttl", &ttl.to_string()]);
    }
    cmd.spawn().unwrap()
}

/// Waits for a worker and reads the summary it prints as its last line.
fn summary(child: Child) -> serde_json::Value {
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "a worker failed: {:?}", out.status);
    let text = String::from_utf8(out.stdout).unwrap();
    serde_json::from_str(text.lines().last().unwrap()).unwrap()
}

/// Runs four workers at once; returns the items that succeeded and the wall time of the run.
async fn run_four(base: &str, redis: Option<(&str, &str)>) -> (u64, Duration) {
    let base = base.to_owned();
    let redis = redis.map(|(u, p)| (u.to_owned(), p.to_owned()));
    tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let children: Vec<Child> = (0..WORKERS)
            .map(|i| {
                worker(
                    &base,
                    i,
                    redis.as_ref().map(|(u, p)| (u.as_str(), p.as_str())),
                    None,
                )
            })
            .collect();
        let ok: u64 = children
            .into_iter()
            .map(|c| summary(c)["succeeded"].as_u64().unwrap())
            .sum();
        (ok, started.elapsed())
    })
    .await
    .unwrap()
}

fn prefix(test: &str) -> String {
    format!("apipool-test:{test}:{:016x}", rand::random::<u64>())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_processes_on_redis_hold_the_limit_and_without_it_overdraw() {
    // Built (if missing) before any clock starts.
    batch_http();
    let server = upstream().await;
    let url = redis_url();
    let p = prefix("procs");
    let (ok, elapsed) = run_four(&server.url(), Some((&url, &p))).await;
    let stats = server.stats();
    let capacity = f64::from(RATE) * 10.0 * elapsed.as_secs_f64();
    let utilisation = stats.admitted_ok() as f64 / capacity;
    eprintln!(
        "with --redis: {ok}/2000 ok in {:.2}s, {} 429s, utilisation {utilisation:.3}",
        elapsed.as_secs_f64(),
        stats.status(429)
    );
    assert_eq!(
        ok,
        (WORKERS * ITEMS) as u64,
        "every item of every process succeeds"
    );
    assert_eq!(
        stats.status(429),
        0,
        "the shared limits hold across processes"
    );
    assert!(
        utilisation >= 0.8,
        "the four processes together use the keys' capacity: {utilisation:.3}"
    );

    // The contrast: the same run with per-process state overdraws the keys.
    server.reset();
    let (ok, elapsed) = run_four(&server.url(), None).await;
    let stats = server.stats();
    eprintln!(
        "without --redis: {ok}/2000 ok in {:.2}s, {} 429s served",
        elapsed.as_secs_f64(),
        stats.status(429)
    );
    assert!(
        stats.status(429) > 100,
        "four processes that each think they own the quota are refused: {} 429s",
        stats.status(429)
    );
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_process_leaves_leases_that_expire_and_the_others_finish() {
    batch_http();
    let server = upstream().await;
    let base = server.url();
    let url = redis_url();
    let p = prefix("sigkill");
    let ttl = 2.0;
    let mut children: Vec<Child> = (0..WORKERS)
        .map(|i| worker(&base, i, Some((&url, &p)), Some(ttl)))
        .collect();
    // Kill the first worker mid-run, with calls in flight.
    let started = Instant::now();
    while server.stats().total_requests < 400 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the workers did not start"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut victim = children.remove(0);
    victim.kill().unwrap(); // SIGKILL: no report, no drop, leases left in Redis
    victim.wait().unwrap();
    let killed_at = Instant::now();
    let ok: u64 = tokio::task::spawn_blocking(move || {
        children
            .into_iter()
            .map(|c| summary(c)["succeeded"].as_u64().unwrap())
            .sum()
    })
    .await
    .unwrap();
    let finished_at = Instant::now();
    assert_eq!(ok, ((WORKERS - 1) * ITEMS) as u64, "the others finish");
    assert_eq!(server.stats().status(429), 0, "dead leases still count");

    // A new process on the same pool: once the lease ttl and the window have passed, every key
    // is free again.
    let pool = ApiKeyManager::builder()
        .name("batch_http")
        .keys(keys().iter().map(HttpKey::bearer))
        .rate_limit(RateLimit::per_second(RATE).unwrap())
        .no_stats()
        .redis(RedisStoreConfig::new(&url).unwrap().prefix(p.as_str()))
        .build()
        .unwrap();
    let window = Duration::from_millis(1100);
    let free_at = (killed_at + Duration::from_secs_f64(ttl)).max(finished_at) + window;
    tokio::time::sleep(free_at.saturating_duration_since(Instant::now())).await;
    for r in pool.key_reports() {
        assert_eq!(r.in_flight, 0, "no lease outlives its ttl: {r:?}");
        assert!(r.available, "no key stays blocked: {r:?}");
    }
    assert_eq!(pool.available_count(), 10);
    server.shutdown().await.unwrap();
}
