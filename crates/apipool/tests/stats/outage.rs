//! The database goes away mid-run: the writer retries with backoff, reports the backlog, never
//! blocks or fails the caller, and loses nothing once the database is back.

use std::time::{Duration, Instant};

use apipool::CallStatus;
use apipool::stats::{StatsCollector, StatsConfig, StatsFilter};

use crate::support::{
    Backend, TestDb, exec, mysql_kill_connections_of, now_event, wait_until, with_database,
};

fn config() -> StatsConfig {
    StatsConfig::default()
        .retry_backoff(Duration::from_millis(10), Duration::from_millis(200))
        .connect_timeout(Duration::from_secs(2))
        .linger(Duration::ZERO)
}

fn record_n(stats: &StatsCollector, tag: &str, n: u64) {
    for i in 0..n {
        stats.record(now_event(tag, CallStatus::Success, i % 100));
    }
}

/// Runs the outage scenario; `down` and `up` break and restore the database.
fn survive_outage(db: &TestDb, url: &str, down: impl FnOnce(), up: impl FnOnce()) {
    let stats = StatsCollector::open_with(url, config()).expect("open");
    record_n(&stats, "before", 5_000);
    stats.flush().unwrap();
    assert!(stats.writer_stats().healthy());

    down();
    let started = Instant::now();
    record_n(&stats, "during", 5_000);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "recording must not wait for the database"
    );
    assert!(
        wait_until(Duration::from_secs(60), || stats
            .writer_stats()
            .consecutive_failures
            > 0),
        "the writer should notice the outage"
    );
    let ws = stats.writer_stats();
    assert!(ws.backlog > 0, "{ws:?}");
    assert!(ws.last_error.is_some());
    assert!(!ws.healthy());
    // More events while the writer is retrying.
    record_n(&stats, "during", 5_000);

    up();
    stats.flush().expect("flush after the database is back");
    let ws = stats.writer_stats();
    assert!(ws.healthy(), "{ws:?}");
    assert!(ws.failed_attempts > 0);
    assert_eq!((ws.backlog, ws.committed), (0, 15_000));
    assert_eq!(stats.count(StatsFilter::all()).unwrap(), 15_000);
    assert_eq!(
        stats.count(StatsFilter::all().key("during")).unwrap(),
        10_000
    );
    drop(stats);
    assert_eq!(db.raw_event_rows(), 15_000);
}

#[test]
fn postgres_outage_loses_nothing() {
    let db = TestDb::new(Backend::Postgres);
    let name = db.name.clone();
    let admin = db.admin_url.clone();
    survive_outage(
        &db,
        &db.url,
        || {
            exec(
                &admin,
                &[
                    format!("ALTER DATABASE \"{name}\" ALLOW_CONNECTIONS false"),
                    format!(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"
                    ),
                ],
            );
        },
        || {
            exec(
                &admin,
                &[format!("ALTER DATABASE \"{name}\" ALLOW_CONNECTIONS true")],
            )
        },
    );
}

#[test]
fn mariadb_outage_loses_nothing() {
    let db = TestDb::new(Backend::MySql);
    let user = format!("apst_{:012x}", rand::random::<u64>() >> 16);
    let admin = db.admin_url.clone();
    exec(
        &admin,
        &[
            format!("CREATE USER '{user}'@'%' IDENTIFIED BY 'outage-pw'"),
            format!("GRANT ALL PRIVILEGES ON `{}`.* TO '{user}'@'%'", db.name),
        ],
    );
    // The collector connects as that user; locking the account is the outage.
    let url = with_database(
        &db.admin_url
            .replacen("root@", &format!("{user}:outage-pw@"), 1),
        &db.name,
    );
    assert!(
        url.contains(&user),
        "the admin URL is expected to log in as root: {url}"
    );
    survive_outage(
        &db,
        &url,
        || {
            exec(&admin, &[format!("ALTER USER '{user}'@'%' ACCOUNT LOCK")]);
            mysql_kill_connections_of(&admin, &user);
        },
        || exec(&admin, &[format!("ALTER USER '{user}'@'%' ACCOUNT UNLOCK")]),
    );
    exec(&admin, &[format!("DROP USER IF EXISTS '{user}'@'%'")]);
}

/// Closing while the database is down waits at most `shutdown_timeout`, then reports the loss
/// instead of hanging.
#[test]
fn close_during_an_outage_reports_lost_events() {
    let db = TestDb::new(Backend::Postgres);
    let name = db.name.clone();
    let admin = db.admin_url.clone();
    let stats = StatsCollector::open_with(
        &db.url,
        config()
            .shutdown_timeout(Duration::from_millis(500))
            .flush_timeout(Duration::from_millis(300)),
    )
    .expect("open");
    stats.flush().unwrap();
    exec(
        &admin,
        &[
            format!("ALTER DATABASE \"{name}\" ALLOW_CONNECTIONS false"),
            format!(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"
            ),
        ],
    );
    record_n(&stats, "doomed", 100);
    match stats.flush() {
        Err(apipool::stats::StatsError::FlushTimeout { backlog, .. }) => assert_eq!(backlog, 100),
        other => panic!("expected a flush timeout, got {other:?}"),
    }
    let started = Instant::now();
    let err = stats.close().expect_err("events were lost");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(err.to_string().contains("100"), "{err}");
    assert_eq!(stats.writer_stats().lost, 100);
    exec(
        &admin,
        &[format!("ALTER DATABASE \"{name}\" ALLOW_CONNECTIONS true")],
    );
}
