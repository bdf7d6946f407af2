//! The behaviour every backend must show. `main.rs` runs each function against a SQLite file,
//! PostgreSQL and MariaDB.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use apipool::stats::{
    Bucket, ManualWallClock, Page, Retention, StatsCollector, StatsConfig, StatsError, StatsFilter,
    WallClock,
};
use apipool::{CallEvent, CallStatus, StatsSink};

use crate::support::{Backend, TestDb, at, event, now_event};

/// 2026-11-27T12:00:00Z, on a minute, hour and day boundary.
fn t0() -> SystemTime {
    SystemTime::from(time::macros::datetime!(2026-11-27 12:00:00 UTC))
}

fn manual_clock() -> (Arc<ManualWallClock>, StatsConfig) {
    let clock = Arc::new(ManualWallClock::new(t0()));
    let as_dyn: Arc<dyn WallClock> = clock.clone();
    (clock, StatsConfig::default().clock(as_dyn))
}

/// 8 threads × 50,000 events through one collector → exactly 400,000 rows.
pub(crate) fn eight_threads_write_exactly_400k(backend: Backend) {
    let db = TestDb::new(backend);
    let stats = StatsCollector::open(&db.url).expect("open");
    let keys: Vec<Arc<str>> = (0..5).map(|i| Arc::from(format!("key-{i}"))).collect();
    std::thread::scope(|s| {
        for t in 0..8 {
            let (stats, keys) = (&stats, &keys);
            s.spawn(move || {
                for i in 0..50_000u64 {
                    stats.record(CallEvent {
                        key_identifier: keys[(t + i as usize) % keys.len()].clone(),
                        status: if i % 3 == 0 {
                            CallStatus::Failed
                        } else {
                            CallStatus::Success
                        },
                        latency: Duration::from_micros(i % 997),
                        method: None,
                        finished_at: SystemTime::now(),
                        pool: None,
                        dedup_id: None,
                    });
                }
            });
        }
    });
    stats.flush().expect("flush");
    assert_eq!(stats.count(StatsFilter::all()).unwrap(), 400_000);
    assert_eq!(
        stats
            .usage_count_in_recent_n_seconds(3_600, None, None)
            .unwrap(),
        400_000
    );
    let per_key = stats.usage_count_stats_in_recent_n_seconds(3_600).unwrap();
    assert_eq!(per_key.len(), 5);
    assert_eq!(per_key.values().sum::<u64>(), 400_000);
    let ws = stats.writer_stats();
    assert_eq!(
        (ws.accepted, ws.committed, ws.backlog),
        (400_000, 400_000, 0)
    );
    drop(stats);
    assert_eq!(db.raw_event_rows(), 400_000);
}

/// The hand-built data set of the query tests (T0 = 12:00:00):
///
/// | event | key | status | at | latency | method | pool |
/// |---|---|---|---|---|---|---|
/// | e1 | k1 | success | -10 s | 100 ms | GET | p1 |
/// | e2 | k1 | success | -20 s | 200 ms | GET | p1 |
/// | e3 | k1 | failed | -30 s | 300 ms | POST | p1 |
/// | e4 | k2 | reach limit | -50 s | 400 ms | GET | p1 |
/// | e5 | k2 | success | -70 s | 500 ms | GET | p2 |
/// | e6 | k3 | success | -130 s | 600 ms | – | – |
/// | e7 | k3 | timeout | -3700 s | 700 ms | GET | p1 |
/// | e8 | k1 | success | 0 s | 50 ms | GET | p1 |
/// | e9 | k2 | success | -60 s | 80 ms | GET | p1 |
fn record_hand_built(stats: &StatsCollector) {
    use CallStatus::*;
    let t = t0();
    let rows = [
        ("k1", Success, -10, 100, Some("GET"), Some("p1")),
        ("k1", Success, -20, 200, Some("GET"), Some("p1")),
        ("k1", Failed, -30, 300, Some("POST"), Some("p1")),
        ("k2", ReachLimit, -50, 400, Some("GET"), Some("p1")),
        ("k2", Success, -70, 500, Some("GET"), Some("p2")),
        ("k3", Success, -130, 600, None, None),
        ("k3", Timeout, -3_700, 700, Some("GET"), Some("p1")),
        ("k1", Success, 0, 50, Some("GET"), Some("p1")),
        ("k2", Success, -60, 80, Some("GET"), Some("p1")),
    ];
    for (key, status, offset, ms, method, pool) in rows {
        stats.record(event(key, status, at(t, offset), ms, method, pool));
    }
}

fn counts(pairs: &[(CallStatus, u64)]) -> BTreeMap<CallStatus, u64> {
    pairs.iter().copied().collect()
}

/// Exact answers for every query over hand-built data.
pub(crate) fn queries_are_exact_on_hand_built_data(backend: Backend) {
    use CallStatus::*;
    let db = TestDb::new(backend);
    let (_clock, config) = manual_clock();
    let stats = StatsCollector::open_with(&db.url, config).expect("open");
    record_hand_built(&stats);

    // The seed's queries (window [now - n, ...], inclusive).
    assert_eq!(
        stats
            .usage_count_in_recent_n_seconds(60, None, None)
            .unwrap(),
        6
    );
    assert_eq!(
        stats
            .usage_count_in_recent_n_seconds(60, Some("k1"), None)
            .unwrap(),
        4
    );
    assert_eq!(
        stats
            .usage_count_in_recent_n_seconds(60, None, Some(Success))
            .unwrap(),
        4
    );
    assert_eq!(
        stats
            .usage_count_in_recent_n_seconds(60, Some("k1"), Some(Success))
            .unwrap(),
        3
    );
    assert_eq!(
        stats
            .usage_count_in_recent_n_seconds(60, Some("nope"), None)
            .unwrap(),
        0
    );
    assert_eq!(
        stats
            .usage_count_in_recent_n_seconds(100_000, None, None)
            .unwrap(),
        9
    );
    let per_key = stats.usage_count_stats_in_recent_n_seconds(60).unwrap();
    assert_eq!(
        per_key,
        BTreeMap::from([("k1".to_owned(), 4), ("k2".to_owned(), 2)])
    );

    // Pool and method filters.
    assert_eq!(stats.count(StatsFilter::all().pool("p1")).unwrap(), 7);
    assert_eq!(stats.count(StatsFilter::all().pool("p2")).unwrap(), 1);
    assert_eq!(stats.count(StatsFilter::all().pool("")).unwrap(), 1);
    assert_eq!(stats.count(StatsFilter::all().method("GET")).unwrap(), 7);
    assert_eq!(stats.count(StatsFilter::all().method("POST")).unwrap(), 1);
    assert_eq!(
        stats
            .count(StatsFilter::all().until(at(t0(), -60)))
            .unwrap(),
        4,
        "until is inclusive: e9, e5, e6, e7"
    );
    assert_eq!(
        stats
            .count_by_key(StatsFilter::recent_seconds(3_600).pool("p1"))
            .unwrap(),
        BTreeMap::from([("k1".to_owned(), 4), ("k2".to_owned(), 2)])
    );

    // Timeline by minute over the last 3 minutes: 11:57, 11:58, 11:59, 12:00.
    let tl = stats
        .timeline(Duration::from_secs(180), Bucket::Minute)
        .unwrap();
    let starts: Vec<String> = tl.iter().map(|b| b.start.time().to_string()).collect();
    assert_eq!(
        starts,
        ["11:57:00.0", "11:58:00.0", "11:59:00.0", "12:00:00.0"]
    );
    assert_eq!(tl[0].counts.by_status, counts(&[(Success, 1)]));
    assert_eq!(tl[1].counts.by_status, counts(&[(Success, 1)]));
    assert_eq!(
        tl[2].counts.by_status,
        counts(&[(Success, 3), (Failed, 1), (ReachLimit, 1)])
    );
    assert_eq!(tl[2].counts.total, 5);
    assert_eq!(tl[3].counts.by_status, counts(&[(Success, 1)]));
    assert!(tl.iter().all(|b| b.start.offset().is_utc()));

    // Empty minutes are present with zero counts.
    let tl = stats
        .timeline(
            StatsFilter::last(Duration::from_secs(300)).key("k3"),
            Bucket::Minute,
        )
        .unwrap();
    assert_eq!(tl.len(), 6);
    assert_eq!(
        tl.iter().map(|b| b.counts.total).collect::<Vec<_>>(),
        [0, 0, 1, 0, 0, 0]
    );

    // By hour over 2 h: 10:00 (e7), 11:00 (7 events), 12:00 (e8).
    let tl = stats
        .timeline(Duration::from_secs(7_200), Bucket::Hour)
        .unwrap();
    assert_eq!(
        tl.iter().map(|b| b.counts.total).collect::<Vec<_>>(),
        [1, 7, 1]
    );
    assert_eq!(tl[0].counts.by_status, counts(&[(Timeout, 1)]));
    assert_eq!(
        tl[0].start,
        time::macros::datetime!(2026-11-27 10:00:00 UTC)
    );

    // By day over 1 day: 2026-11-26 (none), 2026-11-27 (all 9).
    let tl = stats
        .timeline(Duration::from_secs(86_400), Bucket::Day)
        .unwrap();
    assert_eq!(
        tl.iter().map(|b| b.counts.total).collect::<Vec<_>>(),
        [0, 9]
    );
    assert_eq!(
        tl[1].start,
        time::macros::datetime!(2026-11-27 00:00:00 UTC)
    );

    // Success rate over the last 60 s: 4 of 6; k1 3 of 4; k2 1 of 2.
    let sr = stats.success_rate(Duration::from_secs(60)).unwrap();
    assert_eq!((sr.overall.total, sr.overall.success()), (6, 4));
    assert_eq!(sr.overall.success_rate(), Some(4.0 / 6.0));
    assert_eq!((sr.per_key["k1"].total, sr.per_key["k1"].success()), (4, 3));
    assert_eq!((sr.per_key["k2"].total, sr.per_key["k2"].success()), (2, 1));
    assert_eq!(sr.per_key["k2"].get(ReachLimit), 1);
    assert_eq!(sr.per_key.len(), 2);
    let sr_p2 = stats.success_rate(StatsFilter::all().pool("p2")).unwrap();
    assert_eq!(sr_p2.overall.success_rate(), Some(1.0));

    // Latency percentiles (nearest rank), all time.
    let ms = Duration::from_millis;
    let lat = stats.latency_percentiles(StatsFilter::all()).unwrap();
    let k1 = lat.per_key["k1"];
    assert_eq!(
        (k1.count, k1.p50, k1.p95, k1.p99, k1.max),
        (4, ms(100), ms(300), ms(300), ms(300))
    );
    let k2 = lat.per_key["k2"];
    assert_eq!(
        (k2.count, k2.p50, k2.p95, k2.max),
        (3, ms(400), ms(500), ms(500))
    );
    let k3 = lat.per_key["k3"];
    assert_eq!((k3.p50, k3.p95), (ms(600), ms(700)));
    let all = lat.overall.expect("overall");
    assert_eq!(
        (all.count, all.p50, all.p95, all.p99),
        (9, ms(300), ms(700), ms(700))
    );
    assert!(
        stats
            .latency_percentiles(StatsFilter::all().key("nope"))
            .unwrap()
            .overall
            .is_none()
    );

    // Paged events, newest first.
    let p1 = stats.events(StatsFilter::all(), Page::new(1, 4)).unwrap();
    assert_eq!(p1.total, 9);
    let keys: Vec<&str> = p1.items.iter().map(|e| e.key_identifier.as_str()).collect();
    assert_eq!(keys, ["k1", "k1", "k1", "k1"]);
    assert_eq!(
        p1.items.iter().map(|e| e.latency).collect::<Vec<_>>(),
        [ms(50), ms(100), ms(200), ms(300)]
    );
    assert_eq!(p1.items[3].status, Some(Failed));
    assert_eq!(p1.items[3].status_id, 5);
    assert_eq!(p1.items[3].method.as_deref(), Some("POST"));
    assert_eq!(p1.items[0].pool.as_deref(), Some("p1"));
    let p2 = stats.events(StatsFilter::all(), Page::new(2, 4)).unwrap();
    let lat2: Vec<Duration> = p2.items.iter().map(|e| e.latency).collect();
    assert_eq!(lat2, [ms(400), ms(80), ms(500), ms(600)]);
    assert_eq!(p2.items[3].pool, None, "e6 has no pool");
    assert_eq!(p2.items[3].method, None);
    let p3 = stats.events(StatsFilter::all(), Page::new(3, 4)).unwrap();
    assert_eq!(p3.items.len(), 1);
    assert_eq!(p3.items[0].status, Some(Timeout));
    assert!(
        stats
            .events(StatsFilter::all(), Page::new(4, 4))
            .unwrap()
            .items
            .is_empty()
    );
    let ids: Vec<i64> = p1
        .items
        .iter()
        .chain(&p2.items)
        .chain(&p3.items)
        .map(|e| e.id)
        .collect();
    let unique: std::collections::BTreeSet<i64> = ids.into_iter().collect();
    assert_eq!(unique.len(), 9, "every event has its own id");
    let k2_page = stats
        .events(StatsFilter::all().key("k2"), Page::default())
        .unwrap();
    assert_eq!(k2_page.total, 3);
    assert_eq!(
        k2_page.items.iter().map(|e| e.latency).collect::<Vec<_>>(),
        [ms(400), ms(80), ms(500)]
    );
}

/// `finished_at` comes back as the same instant, in UTC, at microsecond precision.
pub(crate) fn timestamps_round_trip_in_utc(backend: Backend) {
    let db = TestDb::new(backend);
    let stats = StatsCollector::open(&db.url).expect("open");
    let instants = [
        time::macros::datetime!(2026-11-27 23:59:59.123456 UTC),
        time::macros::datetime!(1999-12-31 23:59:59.999999 UTC),
        time::macros::datetime!(2100-01-01 00:00:00.000001 UTC),
        // Given with an offset: stored as the same instant, read back in UTC.
        time::macros::datetime!(2026-06-01 08:30:00.5 +05:30),
    ];
    for (i, t) in instants.iter().enumerate() {
        let mut e = event(
            &format!("ts-{i}"),
            CallStatus::Success,
            SystemTime::from(*t),
            1,
            None,
            None,
        );
        e.latency = Duration::from_micros(1_234_567);
        stats.record(e);
    }
    // Nanoseconds are cut to microseconds.
    let with_nanos = SystemTime::from(time::macros::datetime!(2026-11-27 10:00:00.123456789 UTC));
    stats.record(event(
        "ts-nanos",
        CallStatus::Success,
        with_nanos,
        1,
        None,
        None,
    ));

    let page = stats.events(StatsFilter::all(), Page::new(1, 100)).unwrap();
    assert_eq!(page.total, 5);
    for (i, t) in instants.iter().enumerate() {
        let row = page
            .items
            .iter()
            .find(|r| r.key_identifier == format!("ts-{i}"))
            .expect("row");
        assert_eq!(row.finished_at, *t, "instant {i}");
        assert!(row.finished_at.offset().is_utc());
        assert_eq!(row.finished_at_system(), SystemTime::from(*t));
        assert_eq!(row.latency, Duration::from_micros(1_234_567));
    }
    let row = page
        .items
        .iter()
        .find(|r| r.key_identifier == "ts-nanos")
        .unwrap();
    assert_eq!(
        row.finished_at,
        time::macros::datetime!(2026-11-27 10:00:00.123456 UTC)
    );
    // The column holds UTC microseconds since the epoch, whatever the session time zone.
    drop(stats);
    assert_eq!(
        db.scalar("SELECT finished_at FROM apipool_stats_events WHERE key_identifier = 'ts-0'"),
        1_795_823_999_123_456
    );
}

/// A re-sent event with the same `(pool, dedup_id)` is stored once; events without a dedup id
/// never collide, even when everything else is equal.
pub(crate) fn dedup_ids_are_stored_once(backend: Backend) {
    let db = TestDb::new(backend);
    let stats = StatsCollector::open(&db.url).expect("open");
    let t = t0();
    let with = |pool: Option<&str>, dedup: Option<&str>| {
        let mut e = event("k", CallStatus::Success, t, 10, Some("GET"), pool);
        e.dedup_id = dedup.map(Arc::from);
        e
    };
    // Same batch.
    stats.record(with(Some("p1"), Some("a")));
    stats.record(with(Some("p1"), Some("a")));
    stats.record(with(Some("p2"), Some("a")));
    stats.record(with(None, Some("a")));
    stats.record(with(None, Some("a")));
    for _ in 0..3 {
        stats.record(with(None, None));
        stats.record(with(Some("p1"), None));
    }
    stats.flush().unwrap();
    // A later batch re-sends.
    stats.record(with(Some("p1"), Some("a")));
    stats.record(with(None, Some("a")));
    stats.record(with(Some("p1"), Some("b")));
    stats.flush().unwrap();
    // p1/a, p2/a, none/a, p1/b, and the 6 without dedup ids.
    assert_eq!(stats.count(StatsFilter::all()).unwrap(), 10);
    assert_eq!(stats.count(StatsFilter::all().pool("p1")).unwrap(), 5);
    let page = stats
        .events(StatsFilter::all().pool("p2"), Page::default())
        .unwrap();
    assert_eq!(page.items[0].dedup_id.as_deref(), Some("a"));
    assert_eq!(
        stats.writer_stats().committed,
        14,
        "every event was processed"
    );
}

/// A schema version newer than the code's is a typed error at open time.
pub(crate) fn newer_schema_is_refused(backend: Backend) {
    let db = TestDb::new(backend);
    let stats = StatsCollector::open(&db.url).expect("open creates the schema");
    stats.close().unwrap();
    drop(stats);
    assert_eq!(
        db.scalar("SELECT value FROM apipool_stats_meta WHERE name = 'schema_version'"),
        apipool::stats::SCHEMA_VERSION
    );
    // Reopening the current version is fine (idempotent).
    StatsCollector::open(&db.url)
        .expect("reopen")
        .close()
        .unwrap();
    db.exec(&["UPDATE apipool_stats_meta SET value = 999 WHERE name = 'schema_version'"]);
    match StatsCollector::open(&db.url) {
        Err(StatsError::SchemaTooNew { found, supported }) => {
            assert_eq!((found, supported), (999, apipool::stats::SCHEMA_VERSION));
        }
        other => panic!("expected SchemaTooNew, got {other:?}"),
    }
    let msg = StatsCollector::open(&db.url).unwrap_err().to_string();
    assert!(msg.contains("upgrade apipool"), "{msg}");
}

/// The status table holds the seed's ids and names and ours.
pub(crate) fn status_table_is_seeded(backend: Backend) {
    let db = TestDb::new(backend);
    drop(StatsCollector::open(&db.url).expect("open"));
    for s in CallStatus::ALL {
        let n = db.scalar(&format!(
            "SELECT COUNT(*) FROM apipool_stats_status WHERE id = {} AND name = '{}'",
            s.id(),
            s.description()
        ));
        assert_eq!(n, 1, "{s:?}");
    }
    assert_eq!(db.scalar("SELECT COUNT(*) FROM apipool_stats_status"), 8);
}

/// Retention deletes by age and by row count (run on demand; the background pass does the
/// same every `prune_interval`).
pub(crate) fn retention_prunes_by_age_and_rows(backend: Backend) {
    let db = TestDb::new(backend);
    let (clock, config) = manual_clock();
    let stats = StatsCollector::open_with(
        &db.url,
        config.retention(Retention::default().max_age(Duration::from_secs(3_600))),
    )
    .expect("open");
    for off in [-7_200, -7_000, -3_601] {
        stats.record(event(
            "old",
            CallStatus::Success,
            at(t0(), off),
            1,
            None,
            None,
        ));
    }
    for off in [-1_800, -10] {
        stats.record(event(
            "new",
            CallStatus::Success,
            at(t0(), off),
            1,
            None,
            None,
        ));
    }
    let r = stats.prune().unwrap();
    assert_eq!((r.by_age, r.by_rows), (3, 0));
    assert_eq!(stats.count(StatsFilter::all()).unwrap(), 2);
    // Time passes: the -1800 s event ages out.
    clock.advance(Duration::from_secs(1_801));
    assert_eq!(stats.prune().unwrap().by_age, 1);
    assert_eq!(stats.count_by_key(StatsFilter::all()).unwrap()["new"], 1);
    assert_eq!(stats.writer_stats().pruned, 4);
    drop(stats);

    let (_clock, config) = manual_clock();
    let stats =
        StatsCollector::open_with(&db.url, config.retention(Retention::default().max_rows(5)))
            .expect("open");
    for i in 0..8 {
        stats.record(event(
            &format!("r{i}"),
            CallStatus::Success,
            t0(),
            1,
            None,
            None,
        ));
        // Separate batches keep the insertion order obvious.
        stats.flush().unwrap();
    }
    let r = stats.prune().unwrap();
    assert_eq!(r.by_rows, 4, "1 left from before + 8 new, keep 5");
    let left: Vec<String> = stats
        .count_by_key(StatsFilter::all())
        .unwrap()
        .into_keys()
        .collect();
    assert_eq!(left, ["r3", "r4", "r5", "r6", "r7"]);
}

/// Dropping the collector writes what is still queued.
pub(crate) fn drop_flushes(backend: Backend) {
    let db = TestDb::new(backend);
    let stats = StatsCollector::open_with(
        &db.url,
        // A long linger: nothing is written before the drop unless the drop flushes.
        StatsConfig::default().linger(Duration::from_secs(600)),
    )
    .expect("open");
    for i in 0..1_234u64 {
        stats.record(now_event("k", CallStatus::Success, i));
    }
    let clone = stats.clone();
    drop(stats);
    clone.record(now_event("k", CallStatus::Failed, 1));
    drop(clone);
    assert_eq!(db.raw_event_rows(), 1_235);
}

/// The async API works inside a tokio runtime, and the sync API does not panic there.
pub(crate) async fn async_api_inside_a_runtime(backend: Backend) {
    let db = TestDb::new(backend);
    let (_clock, config) = manual_clock();
    let stats = StatsCollector::aopen_with(&db.url, config)
        .await
        .expect("open");
    record_hand_built(&stats);
    stats.aflush().await.unwrap();
    assert_eq!(stats.acount(StatsFilter::all()).await.unwrap(), 9);
    assert_eq!(
        stats
            .ausage_count_in_recent_n_seconds(60, Some("k1"), None)
            .await
            .unwrap(),
        4
    );
    assert_eq!(
        stats
            .ausage_count_stats_in_recent_n_seconds(60)
            .await
            .unwrap()
            .len(),
        2
    );
    assert_eq!(
        stats
            .atimeline(Duration::from_secs(120), Bucket::Minute)
            .await
            .unwrap()
            .len(),
        3
    );
    assert_eq!(
        stats
            .asuccess_rate(Duration::from_secs(60))
            .await
            .unwrap()
            .overall
            .total,
        6
    );
    assert_eq!(
        stats
            .alatency_percentiles(StatsFilter::all())
            .await
            .unwrap()
            .overall
            .unwrap()
            .count,
        9
    );
    assert_eq!(
        stats
            .aevents(StatsFilter::all(), Page::new(1, 2))
            .await
            .unwrap()
            .items
            .len(),
        2
    );
    // Sync calls from inside the runtime: no panic, same answers.
    assert_eq!(stats.count(StatsFilter::all()).unwrap(), 9);
    stats.flush().unwrap();
    // Recording through the sink trait, from spawned tasks.
    let sink: Arc<dyn StatsSink> = Arc::new(stats.clone());
    let mut tasks = Vec::new();
    for i in 0..4 {
        let sink = sink.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..250 {
                sink.record(event(
                    &format!("task-{i}"),
                    CallStatus::Success,
                    t0(),
                    1,
                    None,
                    None,
                ));
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(stats.acount(StatsFilter::all()).await.unwrap(), 1_009);
    stats.aclose().await.unwrap();
    assert!(matches!(stats.aflush().await, Err(StatsError::Closed)));
    // Dropping inside the runtime does not panic either.
    drop(sink);
    drop(stats);
}
