//! Behaviour that does not depend on the backend: in-memory sharing, backpressure, closing,
//! reusing a pool.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use apipool::CallStatus;
use apipool::stats::{StatsCollector, StatsConfig, StatsError, StatsFilter};

use crate::support::{event, now_event, run_async};

#[test]
fn in_memory_database_is_shared_by_all_threads() {
    let stats = StatsCollector::in_memory().unwrap();
    std::thread::scope(|s| {
        for t in 0..4 {
            let stats = &stats;
            s.spawn(move || {
                for _ in 0..1_000 {
                    stats.record(now_event(&format!("t{t}"), CallStatus::Success, 1));
                }
            });
        }
    });
    // Queried from yet another thread.
    let clone = stats.clone();
    let n = std::thread::spawn(move || clone.count(StatsFilter::all()).unwrap())
        .join()
        .unwrap();
    assert_eq!(n, 4_000);
    assert_eq!(
        stats
            .usage_count_stats_in_recent_n_seconds(60)
            .unwrap()
            .len(),
        4
    );
    // Another in-memory collector has its own database.
    let other = StatsCollector::open("sqlite::memory:").unwrap();
    assert_eq!(other.count(StatsFilter::all()).unwrap(), 0);
}

#[test]
fn a_full_buffer_makes_callers_wait_and_nothing_is_dropped() {
    let stats = StatsCollector::open_with(
        "sqlite::memory:",
        StatsConfig::default()
            .queue_capacity(16)
            .max_backlog(16)
            .batch_size(16)
            .linger(Duration::ZERO),
    )
    .unwrap();
    std::thread::scope(|s| {
        for _ in 0..4 {
            let stats = &stats;
            s.spawn(move || {
                for i in 0..5_000 {
                    stats.record(now_event("k", CallStatus::Success, i));
                }
            });
        }
    });
    assert_eq!(stats.count(StatsFilter::all()).unwrap(), 20_000);
    let ws = stats.writer_stats();
    assert!(ws.caller_waits > 0, "{ws:?}");
    assert_eq!(ws.refused, 0);
}

#[test]
fn a_closed_collector_refuses_events_and_says_so() {
    let stats = StatsCollector::in_memory().unwrap();
    stats.record(now_event("k", CallStatus::Success, 1));
    stats.close().unwrap();
    stats.close().unwrap();
    stats.record(now_event("k", CallStatus::Success, 1));
    let back = stats.try_record(now_event("k", CallStatus::Failed, 1));
    assert_eq!(back.unwrap_err().status, CallStatus::Failed);
    let ws = stats.writer_stats();
    assert_eq!((ws.committed, ws.refused), (1, 2));
    assert!(matches!(stats.flush(), Err(StatsError::Closed)));
    assert!(matches!(
        stats.count(StatsFilter::all()),
        Err(StatsError::Closed)
    ));
}

/// A pool on a fresh SQLite database `name` in a temporary directory (removed when the returned
/// guard drops).
fn temp_sqlite(name: &str) -> (tempfile::TempDir, sqlx::SqlitePool) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/{name}?mode=rwc", dir.path().display());
    let pool = run_async(async move { sqlx::SqlitePool::connect(&url).await.unwrap() });
    (dir, pool)
}

#[test]
fn an_existing_pool_is_reused_and_left_open() {
    let (_dir, pool) = temp_sqlite("host.db");
    let p = pool.clone();
    let stats = run_async(async move {
        StatsCollector::afrom_pool(p, StatsConfig::default())
            .await
            .unwrap()
    });
    stats.record(now_event("k", CallStatus::Success, 1));
    stats.flush().unwrap();
    drop(stats);
    let n = run_async(async move {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM apipool_stats_events")
            .fetch_one(&pool)
            .await
            .unwrap();
        n
    });
    assert_eq!(
        n, 1,
        "the host application's pool still works after the collector is gone"
    );
}

#[test]
fn events_never_carry_more_than_the_safe_identifier() {
    // The collector stores what the event holds; the event type only has the key's identifier.
    // Long values are cut to 255 characters instead of failing the batch.
    let stats = StatsCollector::in_memory().unwrap();
    let long = "é".repeat(400);
    let mut e = event(
        &long,
        CallStatus::Success,
        SystemTime::now(),
        1,
        Some(&long),
        Some(&long),
    );
    e.dedup_id = Some(Arc::from(long.as_str()));
    stats.record(e);
    let page = stats
        .events(StatsFilter::all(), apipool::stats::Page::default())
        .unwrap();
    let row = &page.items[0];
    assert_eq!(row.key_identifier.chars().count(), 255);
    assert_eq!(row.method.as_ref().unwrap().chars().count(), 255);
    assert_eq!(row.pool.as_ref().unwrap().chars().count(), 255);
    assert_eq!(row.dedup_id.as_ref().unwrap().chars().count(), 255);
    assert!(!format!("{stats:?}").is_empty());
}

#[test]
fn retention_also_runs_in_the_background() {
    use apipool::stats::Retention;
    let stats = StatsCollector::open_with(
        "sqlite::memory:",
        StatsConfig::default()
            .retention(Retention::default().max_rows(2))
            .prune_interval(Duration::from_millis(20)),
    )
    .unwrap();
    for i in 0..5 {
        stats.record(now_event(&format!("k{i}"), CallStatus::Success, 1));
    }
    stats.flush().unwrap();
    // Waits for the writer thread's periodic pass (no clock involved: max_rows).
    assert!(crate::support::wait_until(
        Duration::from_secs(20),
        || stats.writer_stats().pruned == 3
    ));
    assert_eq!(stats.count(StatsFilter::all()).unwrap(), 2);
}

#[test]
fn sync_calls_work_inside_another_executor() {
    // Nested `futures::executor::block_on` would panic; the collector parks the thread instead.
    futures::executor::block_on(async {
        let stats = StatsCollector::in_memory().unwrap();
        stats.record(now_event("k", CallStatus::Success, 1));
        assert_eq!(stats.count(StatsFilter::all()).unwrap(), 1);
        assert_eq!(stats.acount(StatsFilter::all()).await.unwrap(), 1);
        stats.close().unwrap();
    });
}

/// Each snapshot of the writer's counters is one moment: a failure it counts comes with its
/// error, even when read while the writer is failing (as a health check polls it).
#[test]
fn writer_stats_never_count_a_failure_without_its_error() {
    let (_dir, pool) = temp_sqlite("failing.db");
    let p = pool.clone();
    let stats = run_async(async move {
        StatsCollector::afrom_pool(
            p,
            StatsConfig::default()
                .linger(Duration::ZERO)
                .retry_backoff(Duration::from_micros(100), Duration::from_micros(100))
                .shutdown_timeout(Duration::from_millis(200)),
        )
        .await
        .unwrap()
    });
    // From now on every write fails ("no such table") and is retried.
    run_async(async move {
        sqlx::query("DROP TABLE apipool_stats_events")
            .execute(&pool)
            .await
            .unwrap();
    });
    stats.record(now_event("k", CallStatus::Success, 1));
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut snapshots = 0u64;
    loop {
        let ws = stats.writer_stats();
        snapshots += 1;
        if ws.consecutive_failures > 0 {
            assert!(
                ws.last_error.is_some() && ws.failed_attempts > 0 && !ws.healthy(),
                "snapshot {snapshots}: {ws:?}"
            );
        }
        if ws.failed_attempts >= 300 {
            break;
        }
        assert!(Instant::now() < deadline, "the writer kept failing: {ws:?}");
    }
    // The table never comes back: closing gives the event up and says so.
    assert!(stats.close().is_err());
    assert_eq!(stats.writer_stats().lost, 1);
}
