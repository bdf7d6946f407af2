//! Pool-level behaviour through the public API: shells, retries, batches, bad input.

use apipool::{
    ApiKey, ApiKeyManager, BatchOptions, CallError, CallEvent, CallStatus, Clock, Error, KeyState,
    ManualClock, Outcome, PoolConfig, RateLimit, StatsSink, Strategy,
};
use parking_lot::Mutex;
use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

#[derive(Debug)]
struct Key {
    name: String,
    usable: bool,
}

impl Key {
    fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            usable: true,
        }
    }
}

impl ApiKey for Key {
    type Client = String;
    fn primary_key(&self) -> &str {
        &self.name
    }
    fn create_client(&self) -> String {
        self.name.clone()
    }
    fn test_usability(&self, _client: &String) -> bool {
        self.usable
    }
}

fn keys(names: &[&str]) -> Vec<Key> {
    names.iter().map(|n| Key::new(n)).collect()
}

#[derive(Default)]
struct Events(Mutex<Vec<CallEvent>>);

impl StatsSink for Events {
    fn record(&self, event: CallEvent) {
        self.0.lock().push(event);
    }
}

#[test]
fn bad_input_gives_typed_errors() {
    assert_eq!(
        ApiKeyManager::<Key>::builder().build().unwrap_err(),
        Error::EmptyPool
    );
    let empty = ApiKeyManager::<Key>::builder()
        .allow_empty(true)
        .build()
        .unwrap();
    assert_eq!(empty.pool_size(), 0);
    assert_eq!(empty.try_acquire().unwrap_err(), Error::NoUsableKeys);
    empty.add_one(Key::new("late")).unwrap();
    empty.try_acquire().unwrap().report(Outcome::Success);
    let err = ApiKeyManager::builder()
        .keys(keys(&["a", "b", "a"]))
        .build()
        .unwrap_err();
    assert!(matches!(err, Error::DuplicateKey { .. }), "{err}");
    assert!(!err.to_string().contains("\"a\""));
    let err = ApiKeyManager::builder()
        .keys(keys(&["a"]))
        .strategy_name("fastest")
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("unknown strategy"), "{err}");
    for bad in [f64::NAN, -1.0, f64::INFINITY] {
        let cfg = PoolConfig {
            timeout: bad,
            ..PoolConfig::default()
        };
        let err = ApiKeyManager::builder()
            .keys(keys(&["a"]))
            .config(cfg)
            .build()
            .unwrap_err();
        assert!(
            matches!(err, Error::Config(ref c) if c.field == "timeout"),
            "{err}"
        );
    }
    let cfg = PoolConfig {
        ban_duration: f64::NAN,
        ..PoolConfig::default()
    };
    assert!(
        ApiKeyManager::builder()
            .keys(keys(&["a"]))
            .config(cfg)
            .build()
            .is_err()
    );
    let pool = ApiKeyManager::new(keys(&["a"])).unwrap();
    let r = pool.call_concurrent(
        &[1, 2],
        |_, _| Ok::<_, ()>(()),
        BatchOptions::new().concurrency(0),
    );
    assert_eq!(r.unwrap_err(), Error::ZeroConcurrency);
    assert!(matches!(
        pool.add_one(Key::new("a")),
        Err(Error::DuplicateKey { .. })
    ));
    assert!(matches!(
        pool.disable("nope"),
        Err(Error::UnknownKey { .. })
    ));
}

#[test]
fn sync_retries_land_on_different_keys() {
    let pool = ApiKeyManager::builder()
        .keys(keys(&["a", "b", "c", "d"]))
        .retry(true, 3)
        .build()
        .unwrap();
    let seen = Mutex::new(Vec::new());
    let r: Result<(), CallError<&str>> = pool.call(|c| {
        seen.lock().push(c.clone());
        Err("boom")
    });
    let err = r.unwrap_err();
    assert!(
        matches!(
            err,
            CallError::Failed {
                attempts: 4,
                outcome: Outcome::Failed,
                ..
            }
        ),
        "{err}"
    );
    let seen = seen.into_inner();
    assert_eq!(seen.len(), 4);
    assert_eq!(
        seen.iter().collect::<HashSet<_>>().len(),
        4,
        "every retry on a new key: {seen:?}"
    );
}

#[tokio::test]
async fn async_retries_land_on_different_keys_and_rate_limits_always_retry() {
    let pool = ApiKeyManager::builder()
        .keys(keys(&["a", "b", "c"]))
        .build()
        .unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let classify = |r: &Result<u32, u32>| match r {
        Ok(_) => Outcome::Success,
        Err(_) => Outcome::rate_limited(Some(Duration::from_secs(60))),
    };
    let calls = AtomicUsize::new(0);
    let r = pool
        .acall_with(&classify, |c| {
            seen.lock().push(c.client().clone());
            let n = calls.fetch_add(1, Ordering::SeqCst);
            async move { if n < 2 { Err(429) } else { Ok(7) } }
        })
        .await;
    assert_eq!(
        r.unwrap(),
        7,
        "rate limits are retried even without retry_on_failure"
    );
    let seen = seen.lock().clone();
    assert_eq!(seen.iter().collect::<HashSet<_>>().len(), 3, "{seen:?}");
}

#[test]
fn not_key_related_errors_are_not_retried() {
    let pool = ApiKeyManager::builder()
        .keys(keys(&["a", "b"]))
        .retry(true, 5)
        .build()
        .unwrap();
    let calls = AtomicUsize::new(0);
    let r = pool.call_with(&|_: &Result<(), ()>| Outcome::NotKeyRelated, |_| {
        calls.fetch_add(1, Ordering::SeqCst);
        Err(())
    });
    assert!(r.is_err());
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[test]
fn exhausted_pool_error_carries_retry_at_and_waits_are_bounded() {
    let clock = ManualClock::new();
    let pool = ApiKeyManager::builder()
        .keys(keys(&["a"]))
        .rate_limit(RateLimit::per_minute(1).unwrap())
        .max_wait(Duration::from_millis(50))
        .clock(clock.clone())
        .build()
        .unwrap();
    pool.call(|_| Ok::<_, ()>(())).unwrap();
    let started = Instant::now();
    let err = pool.acquire().unwrap_err();
    let Error::PoolExhausted {
        retry_at: Some(at),
        retry_after: Some(after),
    } = err
    else {
        panic!("{err:?}")
    };
    assert!(
        after > Duration::from_secs(59) && after <= Duration::from_secs(61),
        "{after:?}"
    );
    assert!(at > clock.now());
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "an unreachable deadline fails at once"
    );
    assert!(err.to_string().contains("frees up in"));
    clock.advance(Duration::from_secs(61));
    pool.acquire().unwrap().report(Outcome::Success);
}

#[test]
fn waiting_for_a_release_is_bounded_by_max_wait() {
    let pool = ApiKeyManager::builder()
        .keys(keys(&["a"]))
        .max_in_flight_per_key(1)
        .max_wait(Duration::from_millis(100))
        .build()
        .unwrap();
    let held = pool.acquire().unwrap();
    let started = Instant::now();
    let err = pool.acquire().unwrap_err();
    assert!(
        matches!(err, Error::PoolExhausted { retry_at: None, .. }),
        "{err:?}"
    );
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(90) && waited < Duration::from_secs(2),
        "{waited:?}"
    );
    // A release wakes a waiter before its deadline.
    let waiter = std::thread::spawn(move || pool.acquire().map(|l| l.identifier().to_owned()));
    std::thread::sleep(Duration::from_millis(20));
    drop(held);
    assert!(waiter.join().unwrap().is_ok());
}

#[test]
fn cooldown_and_restore_through_the_manager_on_a_manual_clock() {
    let clock = ManualClock::new();
    let pool = ApiKeyManager::builder()
        .keys(keys(&["a", "b"]))
        .strategy(Strategy::RoundRobin)
        .clock(clock.clone())
        .max_wait(Duration::ZERO)
        .build()
        .unwrap();
    let lease = pool.try_acquire().unwrap();
    let cooled = lease.key().name.clone();
    lease.report(Outcome::rate_limited(Some(Duration::from_secs(30))));
    let report = pool.explain(&cooled).unwrap();
    assert!(matches!(report.state, KeyState::Cooling { .. }));
    for _ in 0..5 {
        let l = pool.try_acquire().unwrap();
        assert_ne!(l.key().name, cooled);
        l.report(Outcome::Success);
    }
    assert_eq!(pool.available_count(), 1);
    clock.advance(Duration::from_secs(30));
    assert_eq!(pool.available_count(), 2);
    assert_eq!(pool.explain(&cooled).unwrap().state, KeyState::Active);
}

#[test]
fn disable_enable_reset_and_remove() {
    let pool = ApiKeyManager::builder()
        .keys(keys(&["a", "b"]))
        .build()
        .unwrap();
    pool.disable("a").unwrap();
    for _ in 0..20 {
        let l = pool.try_acquire().unwrap();
        assert_eq!(l.key().name, "b");
    }
    assert_eq!(pool.state_counts().get("disabled"), Some(&1));
    pool.enable("a").unwrap();
    pool.archive("b").unwrap();
    assert!(pool.is_archived("b").unwrap());
    pool.reset("b").unwrap();
    assert!(!pool.is_archived("b").unwrap());
    let removed = pool.remove_one("a").unwrap();
    assert_eq!(removed.key().name, "a");
    assert_eq!(pool.pool_size(), 1);
    assert!(!pool.contains("a"));
    pool.add_one(Key::new("c")).unwrap();
    assert_eq!(pool.pool_size(), 2);
}

fn with_bad(pattern: [bool; 5]) -> Vec<Key> {
    pattern
        .iter()
        .enumerate()
        .map(|(i, &usable)| Key {
            name: format!("k{i}"),
            usable,
        })
        .collect()
}

#[test]
fn check_usable_archives_bad_keys_first_middle_and_last() {
    let pool = ApiKeyManager::new(with_bad([false, true, false, true, false])).unwrap();
    let mut archived = pool.check_usable();
    archived.sort();
    let mut expected: Vec<String> = ["k0", "k2", "k4"]
        .iter()
        .map(|n| apipool::fingerprint(n))
        .collect();
    expected.sort();
    assert_eq!(archived, expected);
    for _ in 0..30 {
        let l = pool.try_acquire().unwrap();
        assert!(["k1", "k3"].contains(&l.key().name.as_str()));
    }
}

#[tokio::test]
async fn acheck_usable_archives_bad_keys_first_middle_and_last() {
    let pool = ApiKeyManager::new(with_bad([false, false, true, true, false])).unwrap();
    let archived = pool.acheck_usable().await;
    assert_eq!(archived.len(), 3);
    assert_eq!(pool.available_count(), 2);
}

#[test]
fn many_threads_reporting_at_once_lose_and_double_nothing() {
    let sink = Arc::new(Events::default());
    let names: Vec<String> = (0..10).map(|i| format!("k{i}")).collect();
    let pool = ApiKeyManager::builder()
        .keys(names.iter().map(|n| Key::new(n)))
        .strategy(Strategy::LeastUsed)
        .stats(sink.clone())
        .build()
        .unwrap();
    std::thread::scope(|s| {
        for t in 0..8 {
            let pool = pool.clone();
            s.spawn(move || {
                for i in 0..5_000 {
                    let lease = pool.acquire().unwrap();
                    if (i + t) % 7 == 0 {
                        drop(lease);
                    } else {
                        lease.report(Outcome::Success);
                    }
                }
            });
        }
    });
    assert_eq!(pool.in_flight(), 0);
    let reports = pool.key_reports();
    assert_eq!(reports.iter().map(|r| r.calls).sum::<u64>(), 40_000);
    assert!(reports.iter().all(|r| r.in_flight == 0));
    let events = sink.0.lock();
    assert_eq!(events.len(), 40_000);
    let cancelled = events
        .iter()
        .filter(|e| e.status == CallStatus::Cancelled)
        .count();
    assert_eq!(
        reports.iter().map(|r| r.successes).sum::<u64>() as usize,
        40_000 - cancelled
    );
}

#[test]
fn the_default_sink_is_an_in_memory_sqlite_collector() {
    let pool = ApiKeyManager::new(keys(&["a", "b"])).unwrap();
    for _ in 0..5 {
        pool.call(|_| Ok::<_, ()>(())).unwrap();
    }
    let stats = pool.stats().expect("a default collector");
    assert_eq!(
        stats
            .usage_count_in_recent_n_seconds(60, None, None)
            .unwrap(),
        5
    );
    let none = ApiKeyManager::builder()
        .keys(keys(&["a"]))
        .no_stats()
        .build()
        .unwrap();
    assert!(none.stats().is_none());
}

#[test]
fn stats_events_name_keys_by_identifier_only() {
    let sink = Arc::new(Events::default());
    let pool = ApiKeyManager::builder()
        .keys(keys(&["sk-live-SECRET-1"]))
        .stats(sink.clone())
        .name("prices")
        .build()
        .unwrap();
    let mut lease = pool.acquire().unwrap();
    lease.set_label("GET /price");
    lease.report(Outcome::rate_limited(None));
    let events = sink.0.lock();
    assert_eq!(events.len(), 1);
    let e = &events[0];
    assert_eq!(e.status, CallStatus::ReachLimit);
    assert_eq!(e.method.as_deref(), Some("GET /price"));
    assert_eq!(e.pool.as_deref(), Some("prices"));
    assert!(!e.key_identifier.contains("SECRET"));
    assert!(!format!("{pool:?}").contains("SECRET"));
}

#[test]
fn batch_dedupes_retries_and_bans_failing_keys() {
    // One engine, so every pick is a uniform draw over all three keys and "bad" is drawn (and
    // banned) within the first few items. With one shard per core, a worker that finds a shard's
    // lock held (its holder preempted, on a loaded machine) keeps to its home shard for a run of
    // calls (see `shards`): the whole batch could then run on a shard without "bad" and nothing
    // would be banned.
    let pool = ApiKeyManager::builder()
        .keys(keys(&["good1", "good2", "bad"]))
        .ban(2, Duration::from_secs(300))
        .shards(1)
        .build()
        .unwrap();
    let runs = AtomicUsize::new(0);
    let items = (0..200).map(|i| (i % 150, i)).collect::<Vec<_>>();
    let progress_calls = Arc::new(AtomicUsize::new(0));
    let p = progress_calls.clone();
    let result = pool
        .batch_exec(
            items,
            &apipool::DefaultClassifier,
            |client, input: &i32| {
                runs.fetch_add(1, Ordering::SeqCst);
                if client == "bad" {
                    Err("500")
                } else {
                    Ok(*input * 2)
                }
            },
            BatchOptions::new()
                .concurrency(8)
                .retry(true, 5)
                .on_progress(move |_| {
                    p.fetch_add(1, Ordering::SeqCst);
                }),
        )
        .unwrap();
    assert_eq!(result.total, 150);
    assert_eq!(result.succeeded, 150, "{:?}", result.errors);
    assert_eq!(result.failed, 0);
    assert_eq!(result.duplicates.len(), 50);
    assert_eq!(result.results[&10], 20, "each id keeps its first input");
    assert_eq!(result.banned_keys, vec![apipool::fingerprint("bad")]);
    assert!(
        runs.load(Ordering::SeqCst) < 150 + 10,
        "the bad key is banned quickly"
    );
    assert_eq!(progress_calls.load(Ordering::SeqCst), 150);
    assert!((result.success_rate() - 1.0).abs() < f64::EPSILON);
}

#[tokio::test]
async fn abatch_and_acall_concurrent_keep_order_and_enforce_timeouts() {
    let pool = ApiKeyManager::builder()
        .keys(keys(&["a", "b"]))
        .timeout(Duration::from_millis(50))
        .build()
        .unwrap();
    let out = pool
        .acall_concurrent(
            (0..20).collect(),
            |_, i: u64| async move {
                if i == 7 {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
                tokio::time::sleep(Duration::from_millis(20 - i)).await;
                Ok::<_, ()>(i)
            },
            BatchOptions::new().concurrency(5),
        )
        .await
        .unwrap();
    assert_eq!(out.len(), 20);
    for (i, r) in out.iter().enumerate() {
        if i == 7 {
            assert!(matches!(r, Err(CallError::Timeout { .. })), "{r:?}");
        } else {
            assert_eq!(*r.as_ref().unwrap(), i as u64);
        }
    }
    let result = pool
        .abatch_exec(
            vec![("x", 1), ("y", 2), ("x", 3)],
            &apipool::DefaultClassifier,
            |_, v: i32| async move { Ok::<_, ()>(v) },
            BatchOptions::new(),
        )
        .await
        .unwrap();
    assert_eq!(result.total, 2);
    assert_eq!(result.results[&"x"], 1);
    assert_eq!(result.duplicates, vec!["x"]);
}

#[test]
fn apply_config_changes_limits_and_strategy_at_run_time() {
    let pool = ApiKeyManager::builder()
        .keys(keys(&["a"]))
        .max_wait(Duration::ZERO)
        .build()
        .unwrap();
    let cfg = PoolConfig::from_json(
        &serde_json::json!({"rate_limit": 2, "rate_limit_interval": 60, "max_wait": 0}),
    )
    .unwrap();
    let held = pool.acquire().unwrap();
    pool.apply_config(&cfg).unwrap();
    held.report(Outcome::Success);
    pool.try_acquire().unwrap().report(Outcome::Success);
    assert!(matches!(
        pool.try_acquire(),
        Err(Error::PoolExhausted { .. })
    ));
    pool.set_strategy_name("round_robin").unwrap();
    assert_eq!(pool.strategy(), Strategy::RoundRobin);
    assert!(pool.set_strategy_name("nope").is_err());
}

/// `least_used` is pool-wide by default: with every key but one busy, the next call always gets
/// the idle one (a sharded store would only look within one shard).
#[test]
fn least_used_picks_the_idle_key_pool_wide() {
    let names = ["a", "b", "c", "d"];
    let pool = ApiKeyManager::builder()
        .keys(keys(&names))
        .strategy(Strategy::LeastUsed)
        .no_stats()
        .build()
        .unwrap();
    for round in 0..40 {
        let mut held: Vec<_> = (0..4).map(|_| pool.try_acquire().unwrap()).collect();
        let mut busy: Vec<String> = held
            .iter()
            .map(|l| l.key_client().identifier().to_owned())
            .collect();
        busy.sort();
        busy.dedup();
        assert_eq!(busy.len(), 4, "round {round}: four different keys");
        // Free one key (a different one each round); it is then the only idle key.
        let freed = held.remove(round % 4);
        let idle = freed.key_client().identifier().to_owned();
        freed.report(Outcome::Success);
        let next = pool.try_acquire().unwrap();
        assert_eq!(next.key_client().identifier(), idle, "round {round}");
        next.report(Outcome::Success);
        for l in held {
            l.report(Outcome::Success);
        }
    }
}
