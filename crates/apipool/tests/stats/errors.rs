//! Bad URLs and unreachable databases give typed errors at open time, without leaking passwords.

use std::time::{Duration, Instant};

use apipool::stats::{StatsCollector, StatsConfig, StatsError};

use crate::support::{mysql_admin_url, postgres_admin_url, with_database};

fn quick() -> StatsConfig {
    StatsConfig::default().connect_timeout(Duration::from_secs(3))
}

#[test]
fn unknown_schemes_and_malformed_urls_are_invalid() {
    for url in [
        "redis://127.0.0.1:6379",
        "stats.db",
        "",
        "http://example.invalid/x",
    ] {
        match StatsCollector::open(url) {
            Err(StatsError::InvalidUrl { reason, .. }) => {
                assert!(reason.contains("scheme"), "{reason}")
            }
            other => panic!("{url}: expected InvalidUrl, got {other:?}"),
        }
    }
    for url in [
        "postgres://u:pw@[::1/db",
        "sqlite://x.db?mode=bogus",
        "sqlite://",
    ] {
        assert!(
            matches!(
                StatsCollector::open(url),
                Err(StatsError::InvalidUrl { .. })
            ),
            "{url}"
        );
    }
    let msg = StatsCollector::open("redis://h").unwrap_err().to_string();
    assert!(
        msg.contains("sqlite::memory:") && msg.contains("postgres://"),
        "{msg}"
    );
}

#[test]
fn unreachable_servers_fail_at_open_with_a_connect_error() {
    for url in [
        "postgres://postgres:hunter2@127.0.0.1:1/test",
        "mysql://root:hunter2@127.0.0.1:1/test",
        "mariadb://root:hunter2@127.0.0.1:1/test",
    ] {
        let started = Instant::now();
        let err = StatsCollector::open_with(url, quick()).unwrap_err();
        assert!(matches!(err, StatsError::Connect { .. }), "{url}: {err:?}");
        assert!(started.elapsed() < Duration::from_secs(10));
        let msg = err.to_string();
        assert!(!msg.contains("hunter2"), "password leaked: {msg}");
        assert!(
            msg.contains("***") && msg.contains("check that the server is running"),
            "{msg}"
        );
    }
}

#[test]
fn missing_databases_and_paths_fail_at_open() {
    let pg = with_database(&postgres_admin_url(), "apipool_stats_does_not_exist");
    assert!(matches!(
        StatsCollector::open_with(&pg, quick()),
        Err(StatsError::Connect { .. })
    ));
    let my = with_database(&mysql_admin_url(), "apipool_stats_does_not_exist");
    assert!(matches!(
        StatsCollector::open_with(&my, quick()),
        Err(StatsError::Connect { .. })
    ));
    let dir = tempfile::tempdir().unwrap();
    let missing = format!("sqlite://{}/no/such/dir/stats.db", dir.path().display());
    assert!(matches!(
        StatsCollector::open_with(&missing, quick()),
        Err(StatsError::Connect { .. })
    ));
    // mode=rw (no c) does not create the file.
    let no_create = format!("sqlite://{}/absent.db?mode=rw", dir.path().display());
    assert!(matches!(
        StatsCollector::open_with(&no_create, quick()),
        Err(StatsError::Connect { .. })
    ));
    // Without a mode the file is created.
    let created = format!("sqlite://{}/created.db", dir.path().display());
    StatsCollector::open(&created).unwrap().close().unwrap();
    assert!(dir.path().join("created.db").exists());
}
