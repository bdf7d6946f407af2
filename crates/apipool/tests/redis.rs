//! The Redis key-state store, against the real Redis at `APIPOOL_TEST_REDIS_URL`
//! (default redis://127.0.0.1:6379): two pools in one process on the same prefix behave as one
//! pool. Each test uses its own key prefix, so tests run in parallel. Redis keeps real time, so
//! the few waits below are real (and short); everything else is asserted without sleeping.

use apipool::http::{HttpClassifier, HttpKey};
use apipool::{
    ApiKey, ApiKeyManager, BatchOptions, Error, KeyState, OnUnavailable, Outcome, RateLimit,
    RedisStoreConfig, Strategy,
};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn redis_url() -> String {
    std::env::var("APIPOOL_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// A prefix no other test (or earlier run) uses.
fn prefix(test: &str) -> String {
    format!("apipool-test:{test}:{:016x}", rand::random::<u64>())
}

struct Key(&'static str);

impl ApiKey for Key {
    type Client = &'static str;
    fn primary_key(&self) -> &str {
        self.0
    }
    fn create_client(&self) -> &'static str {
        self.0
    }
}

const ABC: [&str; 3] = ["secret-a", "secret-b", "secret-c"];

fn conf(prefix: &str) -> RedisStoreConfig {
    RedisStoreConfig::new(&redis_url()).unwrap().prefix(prefix)
}

fn pool_on(conf: RedisStoreConfig, limit: Option<RateLimit>) -> ApiKeyManager<Key> {
    let mut b = ApiKeyManager::builder()
        .name("shared")
        .keys(ABC.map(Key))
        .strategy(Strategy::RoundRobin)
        .ban(3, Duration::from_secs(60))
        .max_wait(Duration::ZERO)
        .no_stats()
        .redis(conf);
    if let Some(l) = limit {
        b = b.rate_limit(l);
    }
    b.build().unwrap()
}

fn ident(raw: &str) -> String {
    Key(ABC.iter().find(|k| **k == raw).copied().unwrap()).identifier()
}

#[test]
fn two_pools_on_one_prefix_share_the_limit_window() {
    let p = prefix("window");
    let limit = RateLimit::new(4, Duration::from_secs(60)).unwrap();
    let a = pool_on(conf(&p), Some(limit));
    let b = pool_on(conf(&p), Some(limit));
    // 3 keys × 4 per minute = 12 places, shared: whoever asks, no more than 12 grants.
    let mut held = Vec::new();
    let mut granted = 0;
    for i in 0..40 {
        let pool = if i % 2 == 0 { &a } else { &b };
        if let Ok(lease) = pool.try_acquire() {
            granted += 1;
            held.push(lease);
        }
    }
    assert_eq!(granted, 12, "the two pools together hold the limit");
    for lease in held.drain(..) {
        lease.report(Outcome::Success);
    }
    // Finished calls keep their places for the window: still nothing free, on either pool.
    let err = b.try_acquire().unwrap_err();
    let Error::PoolExhausted { retry_after, .. } = err else {
        panic!("expected PoolExhausted, got {err:?}");
    };
    let wait = retry_after.expect("a window frees at a known time");
    assert!(
        wait > Duration::from_secs(50) && wait <= Duration::from_secs(60),
        "{wait:?}"
    );
    assert_eq!(a.available_count(), 0);
    // Each pool's reports go to Redis from its own thread, and a pool waits only for its own
    // before reading: make b's visible first (without this the count raced under load).
    b.explain(ABC[0]).unwrap();
    let report = a.explain(ABC[0]).unwrap();
    assert_eq!(report.calls, 4, "calls are counted fleet-wide");
    assert_eq!(report.successes, 4);
    assert!(!report.available);
    assert!(
        report
            .skipped_because
            .as_deref()
            .unwrap()
            .contains("shared by every process"),
        "{report:?}"
    );
}

#[test]
fn disable_on_one_pool_is_seen_by_the_other_at_once() {
    let p = prefix("disable");
    let a = pool_on(conf(&p), None);
    let b = pool_on(conf(&p), None);
    a.disable(ABC[1]).unwrap();
    assert_eq!(b.explain(ABC[1]).unwrap().state, KeyState::Disabled);
    assert_eq!(b.state_counts().get("disabled"), Some(&1));
    for _ in 0..12 {
        let lease = b.try_acquire().unwrap();
        assert_ne!(
            lease.identifier(),
            ident(ABC[1]),
            "a disabled key is skipped"
        );
        lease.report(Outcome::Success);
    }
    b.enable(&ident(ABC[1])).unwrap();
    assert_eq!(a.explain(ABC[1]).unwrap().state, KeyState::Active);
    a.archive(ABC[2]).unwrap();
    assert!(b.is_archived(ABC[2]).unwrap());
    b.reset(ABC[2]).unwrap();
    assert!(!a.is_archived(ABC[2]).unwrap());
}

#[test]
fn a_429_on_one_pool_cools_the_key_for_both() {
    let p = prefix("cool");
    let a = pool_on(conf(&p), None);
    let b = pool_on(conf(&p), None);
    let lease = a.try_acquire().unwrap();
    let cooled = lease.identifier().to_owned();
    lease.report(Outcome::rate_limited(Some(Duration::from_secs(30))));
    for pool in [&a, &b] {
        let r = pool.explain(&cooled).unwrap();
        let KeyState::Cooling { until, .. } = r.state else {
            panic!("expected cooling, got {r:?}");
        };
        let left = until.saturating_duration_since(Instant::now());
        assert!(left > Duration::from_secs(25), "{left:?}");
        assert_eq!(r.rate_limited, 1);
    }
    for _ in 0..10 {
        let lease = b.try_acquire().unwrap();
        assert_ne!(lease.identifier(), cooled, "the cooling key is skipped");
        lease.report(Outcome::Success);
    }
}

#[test]
fn failures_from_both_pools_count_toward_one_ban() {
    let p = prefix("ban");
    let a = pool_on(conf(&p), None);
    let b = pool_on(conf(&p), None);
    // Reset the rotation so both pools start on the first key.
    for (pool, n) in [(&a, 2), (&b, 1)] {
        for _ in 0..n {
            let lease = loop {
                let l = pool.try_acquire().unwrap();
                if l.identifier() == ident(ABC[0]) {
                    break l;
                }
                drop(l);
            };
            lease.report(Outcome::Failed);
        }
    }
    for pool in [&a, &b] {
        let r = pool.explain(ABC[0]).unwrap();
        assert!(matches!(r.state, KeyState::Banned { .. }), "{r:?}");
        assert_eq!(r.consecutive_failures, 3);
    }
    a.reset(ABC[0]).unwrap();
    assert_eq!(b.explain(ABC[0]).unwrap().consecutive_failures, 0);
}

/// A holder that dies: its lease is never reported nor dropped.
#[expect(
    clippy::mem_forget,
    reason = "simulates a process that dies holding a lease"
)]
fn leak<T>(lease: T) {
    std::mem::forget(lease);
}

#[test]
fn a_leaked_lease_expires_after_its_ttl() {
    let p = prefix("lease");
    let ttl = Duration::from_millis(400);
    let build = || {
        ApiKeyManager::builder()
            .name("lease")
            .keys([Key("only")])
            .max_in_flight_per_key(1)
            .max_wait(Duration::ZERO)
            .no_stats()
            .redis(conf(&p).lease_ttl(ttl))
            .build()
            .unwrap()
    };
    let dead = build();
    let alive = build();
    leak(dead.try_acquire().unwrap());
    let started = Instant::now();
    let Err(Error::PoolExhausted { retry_after, .. }) = alive.try_acquire() else {
        panic!("the leaked lease holds the only place");
    };
    let hint = retry_after.unwrap();
    assert!(
        hint <= ttl,
        "the wait is bounded by the lease's expiry: {hint:?}"
    );
    // Waits as told (a short poll while a call holds the only place) and gets the key once the
    // lease has expired.
    let lease = loop {
        match alive.try_acquire() {
            Ok(l) => break l,
            Err(Error::PoolExhausted {
                retry_after: Some(d),
                ..
            }) => std::thread::sleep(d),
            Err(e) => panic!("{e:?}"),
        }
    };
    let waited = started.elapsed();
    assert!(
        waited >= ttl - Duration::from_millis(100) && waited < ttl * 5,
        "usable again after the ttl: {waited:?}"
    );
    lease.report(Outcome::Success);
    assert_eq!(alive.explain("only").unwrap().in_flight, 0);
}

#[test]
fn the_lease_lifetime_follows_the_pools_timeout() {
    let p = prefix("lease-timeout");
    let build = || {
        ApiKeyManager::builder()
            .name("lease-timeout")
            .keys([Key("only")])
            .max_in_flight_per_key(1)
            .max_wait(Duration::ZERO)
            .no_stats()
            .redis(conf(&p))
            .build()
            .unwrap()
    };
    let dead = build();
    let alive = build();
    // Built with the default timeout (30 s: leases live 35 s), then configured with a 0.1 s
    // timeout: a dead holder's lease must expire after 5.1 s, not 35 s (and a longer timeout
    // lengthens it the same way, so a slow call's lease never expires under it).
    let config = apipool::PoolConfig {
        timeout: 0.1,
        ..apipool::PoolConfig::default()
    };
    dead.apply_config(&config).unwrap();
    leak(dead.try_acquire().unwrap());
    let started = Instant::now();
    let lease = loop {
        match alive.try_acquire() {
            Ok(l) => break l,
            Err(Error::PoolExhausted {
                retry_after: Some(d),
                ..
            }) => std::thread::sleep(d.max(Duration::from_millis(50))),
            Err(e) => panic!("{e:?}"),
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the lease kept the 35 s lifetime of the build-time timeout"
        );
    };
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(4),
        "the lease lived for the new timeout + 5 s: {waited:?}"
    );
    lease.report(Outcome::Success);
}

#[test]
fn unreachable_redis_fails_closed_with_a_typed_error() {
    let conf = RedisStoreConfig::new("redis://:hunter2@127.0.0.1:1")
        .unwrap()
        .prefix(prefix("closed"));
    assert!(!format!("{conf:?}").contains("hunter2"));
    let pool = pool_on(conf, None);
    let started = Instant::now();
    let err = pool.try_acquire().unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(1), "fails fast");
    let Error::StoreUnavailable { endpoint, .. } = &err else {
        panic!("expected StoreUnavailable, got {err:?}");
    };
    assert_eq!(endpoint, "127.0.0.1:1");
    let msg = err.to_string();
    assert!(
        msg.contains("127.0.0.1:1") && msg.contains("FailOpen"),
        "{msg}"
    );
    assert!(!msg.contains("hunter2"));
    let call = pool.call(|c| Ok::<_, std::io::Error>(c.len()));
    assert!(matches!(
        call,
        Err(apipool::CallError::Pool(Error::StoreUnavailable { .. }))
    ));
    assert!(matches!(
        pool.disable(ABC[0]),
        Err(Error::StoreUnavailable { .. })
    ));
}

#[test]
fn unreachable_redis_fails_open_to_local_state() {
    let conf = RedisStoreConfig::new("redis://127.0.0.1:1")
        .unwrap()
        .prefix(prefix("open"))
        .on_unavailable(OnUnavailable::FailOpen);
    let pool = pool_on(
        conf,
        Some(RateLimit::new(2, Duration::from_secs(60)).unwrap()),
    );
    let mut held = Vec::new();
    while let Ok(l) = pool.try_acquire() {
        held.push(l);
        assert!(held.len() <= 6, "local limits still hold");
    }
    assert_eq!(
        held.len(),
        6,
        "3 keys × 2 per minute, from this process's state"
    );
    assert_eq!(pool.in_flight(), 6);
    pool.disable(ABC[0]).unwrap();
    assert_eq!(pool.explain(ABC[0]).unwrap().state, KeyState::Disabled);
}

/// A throwaway `redis-server` on a free port, killed on drop.
struct Server {
    port: u16,
    child: Child,
}

impl Server {
    fn start(port: u16) -> Self {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server must be installed to test reconnection");
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "redis-server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { port, child }
    }

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    fn stop(mut self) -> u16 {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.port
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn acquire_within(pool: &ApiKeyManager<Key>, budget: Duration) -> Result<(), Error> {
    let started = Instant::now();
    loop {
        match pool.try_acquire() {
            Ok(l) => {
                l.report(Outcome::Success);
                return Ok(());
            }
            Err(e) if started.elapsed() > budget => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

#[test]
fn reconnects_after_redis_comes_back_in_both_modes() {
    let server = Server::start(Server::free_port());
    let url = format!("redis://127.0.0.1:{}", server.port);
    let p = prefix("reconnect");
    let build = |mode| {
        pool_on(
            RedisStoreConfig::new(&url)
                .unwrap()
                .prefix(p.as_str())
                .on_unavailable(mode)
                .retry_interval(Duration::from_millis(50)),
            None,
        )
    };
    let closed = build(OnUnavailable::FailClosed);
    let open = build(OnUnavailable::FailOpen);
    closed.disable(ABC[0]).unwrap();
    assert_eq!(open.explain(ABC[0]).unwrap().state, KeyState::Disabled);

    let port = server.stop();
    assert!(matches!(
        closed.try_acquire(),
        Err(Error::StoreUnavailable { .. })
    ));
    // Failing open, the pool carries on with its own state.
    for _ in 0..5 {
        open.try_acquire().unwrap().report(Outcome::Success);
    }

    // The same port again, with an empty Redis (scripts are reloaded on NOSCRIPT).
    let server = Server::start(port);
    acquire_within(&closed, Duration::from_secs(5)).expect("reconnects by itself");
    acquire_within(&open, Duration::from_secs(5)).unwrap();
    closed.disable(ABC[1]).unwrap();
    assert_eq!(
        open.explain(ABC[1]).unwrap().state,
        KeyState::Disabled,
        "both share Redis again"
    );
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pools_in_one_process_draw_no_429_from_a_shared_upstream() {
    const KEYS: [&str; 4] = ["rk-0001", "rk-0002", "rk-0003", "rk-0004"];
    let config = mock_upstream::Config {
        rate: 5,
        interval: 1.0,
        latency_ms: 5,
        ..mock_upstream::Config::with_keys(KEYS).unwrap()
    };
    let server = mock_upstream::spawn(config).await.unwrap();
    let p = prefix("upstream");
    let pool = || {
        ApiKeyManager::builder()
            .name("upstream")
            .keys(KEYS.iter().map(|k| HttpKey::bearer(*k)))
            .strategy(Strategy::LeastUsed)
            .rate_limit(RateLimit::per_second(5).unwrap())
            .no_stats()
            .redis(conf(&p))
            .build()
            .unwrap()
    };
    let http = reqwest::Client::new();
    let url = format!("{}/price", server.url());
    let run = |pool: ApiKeyManager<HttpKey>, from: usize| {
        let (http, url) = (http.clone(), url.clone());
        async move {
            let r = pool
                .abatch_exec(
                    (from..from + 40).map(|i| (format!("item-{i}"), format!("item-{i}"))),
                    &HttpClassifier::new(),
                    |key, id: String| {
                        let (http, url) = (http.clone(), url.clone());
                        async move {
                            let resp = key
                                .apply(http.get(&url).query(&[("id", &id)]))
                                .send()
                                .await?;
                            let status = resp.status().as_u16();
                            let headers = resp.headers().clone();
                            resp.bytes().await?;
                            Ok::<_, reqwest::Error>((status, headers, ()))
                        }
                    },
                    BatchOptions::new().concurrency(10),
                )
                .await
                .unwrap();
            r.results.values().filter(|(s, _, ())| *s == 200).count()
        }
    };
    let (a, b) = tokio::join!(run(pool(), 0), run(pool(), 1000));
    assert_eq!(a + b, 80);
    let stats = server.stats();
    assert_eq!(
        stats.status(429),
        0,
        "two pools on one Redis never exceed the keys' shared limit"
    );
    server.shutdown().await.unwrap();
}

/// An async acquire on a Redis pool is a network round trip, and so is an async report of an
/// outcome that changes a key's health: neither may hold the runtime's only worker thread while
/// Redis answers. Redis is paused (`CLIENT PAUSE`, on a throwaway server so other tests are not
/// slowed) while a task on a current-thread runtime acquires, then while a failed call reports;
/// a ticker on the same runtime must keep ticking meanwhile.
#[test]
fn async_acquires_and_reports_leave_the_runtime_free_while_redis_answers() {
    let server = Server::start(Server::free_port());
    let url = format!("redis://127.0.0.1:{}", server.port);
    let pool = pool_on(
        RedisStoreConfig::new(&url)
            .unwrap()
            .prefix(prefix("async-round-trips").as_str())
            .io_timeout(Duration::from_secs(5)),
        None,
    );
    // Connected, scripts loaded.
    pool.try_acquire().unwrap().report(Outcome::Success);
    let pause = || {
        let out = Command::new("redis-cli")
            .args([
                "-p",
                &server.port.to_string(),
                "CLIENT",
                "PAUSE",
                "600",
                "ALL",
            ])
            .output()
            .expect("redis-cli must be installed");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("OK"),
            "CLIENT PAUSE: {out:?}"
        );
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let ticks = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let counter = ticks.clone();
        let ticker = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(10)).await;
                counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        });
        let count = || ticks.load(std::sync::atomic::Ordering::Relaxed);
        let check = |what: &str, started: Instant, before: u32| {
            let waited = started.elapsed();
            let ticked = count() - before;
            assert!(
                waited >= Duration::from_millis(300),
                "{what} waited for the paused Redis ({waited:?})"
            );
            assert!(
                ticked >= 10,
                "{what}: the runtime ran other tasks meanwhile: {ticked} ticks in {waited:?}"
            );
        };

        pause();
        let (started, before) = (Instant::now(), count());
        let lease = pool.aacquire().await.expect("granted once Redis resumes");
        check("an acquire", started, before);
        lease.report(Outcome::Success);

        // The call fails while Redis is paused; its report (a failure counts toward a ban) waits.
        let (started, before) = (Instant::now(), count());
        let result = pool
            .acall(|_| async {
                pause();
                Err::<(), _>("upstream failed")
            })
            .await;
        assert!(result.is_err());
        check("a failure's report", started, before);
        ticker.abort();
    });
    drop(server);
}
