//! Test databases (one per test, dropped at the end) and event helpers.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use apipool::{CallEvent, CallStatus};
use sqlx::{AssertSqlSafe, Connection};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Backend {
    SqliteFile,
    Postgres,
    MySql,
}

pub(crate) fn postgres_admin_url() -> String {
    std::env::var("APIPOOL_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

pub(crate) fn mysql_admin_url() -> String {
    std::env::var("APIPOOL_TEST_MYSQL_URL")
        .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".to_owned())
}

/// Runs a future to completion on a fresh runtime on its own thread (safe inside tokio tests).
pub(crate) fn run_async<T: Send + 'static>(f: impl Future<Output = T> + Send + 'static) -> T {
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("test runtime")
            .block_on(f)
    })
    .join()
    .expect("admin thread")
}

/// Replaces the database name (the URL path) of `url`.
pub(crate) fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let host_part = match base[scheme_end..].find('/') {
        Some(i) => &base[..scheme_end + i],
        None => base,
    };
    match query {
        Some(q) => format!("{host_part}/{db}?{q}"),
        None => format!("{host_part}/{db}"),
    }
}

/// Runs statements on the database at `url` (any backend).
pub(crate) fn exec(url: &str, statements: &[String]) {
    let url = url.to_owned();
    let statements = statements.to_vec();
    run_async(async move {
        if url.starts_with("postgres") {
            let mut c = sqlx::PgConnection::connect(&url)
                .await
                .expect("admin connect");
            for s in statements {
                sqlx::query(AssertSqlSafe(s.clone()))
                    .execute(&mut c)
                    .await
                    .unwrap_or_else(|e| panic!("{s}: {e}"));
            }
        } else if url.starts_with("mysql") {
            let mut c = sqlx::MySqlConnection::connect(&url)
                .await
                .expect("admin connect");
            for s in statements {
                sqlx::query(AssertSqlSafe(s.clone()))
                    .execute(&mut c)
                    .await
                    .unwrap_or_else(|e| panic!("{s}: {e}"));
            }
        } else {
            let mut c = sqlx::SqliteConnection::connect(&url)
                .await
                .expect("admin connect");
            for s in statements {
                sqlx::query(AssertSqlSafe(s.clone()))
                    .execute(&mut c)
                    .await
                    .unwrap_or_else(|e| panic!("{s}: {e}"));
            }
        }
    });
}

/// The first column of the first row, as i64.
pub(crate) fn scalar(url: &str, sql: &str) -> i64 {
    let url = url.to_owned();
    let sql = sql.to_owned();
    run_async(async move {
        if url.starts_with("postgres") {
            let mut c = sqlx::PgConnection::connect(&url).await.expect("connect");
            sqlx::query_scalar::<_, i64>(AssertSqlSafe(sql))
                .fetch_one(&mut c)
                .await
                .expect("scalar")
        } else if url.starts_with("mysql") {
            let mut c = sqlx::MySqlConnection::connect(&url).await.expect("connect");
            sqlx::query_scalar::<_, i64>(AssertSqlSafe(sql))
                .fetch_one(&mut c)
                .await
                .expect("scalar")
        } else {
            let mut c = sqlx::SqliteConnection::connect(&url)
                .await
                .expect("connect");
            sqlx::query_scalar::<_, i64>(AssertSqlSafe(sql))
                .fetch_one(&mut c)
                .await
                .expect("scalar")
        }
    })
}

/// A database of its own for one test: a temp SQLite file, or a fresh PostgreSQL/MariaDB
/// database with a random name, dropped when the value drops.
pub(crate) struct TestDb {
    pub(crate) backend: Backend,
    /// URL for the collector.
    pub(crate) url: String,
    /// URL with admin rights on the server (not the test database).
    pub(crate) admin_url: String,
    pub(crate) name: String,
    _dir: Option<tempfile::TempDir>,
}

impl TestDb {
    pub(crate) fn new(backend: Backend) -> Self {
        let name = format!("apipool_stats_{:016x}", rand::random::<u64>());
        match backend {
            Backend::SqliteFile => {
                let dir = tempfile::tempdir().expect("tempdir");
                let path = dir.path().join("stats.db");
                let url = format!("sqlite://{}?mode=rwc", path.display());
                Self {
                    backend,
                    admin_url: url.clone(),
                    url,
                    name,
                    _dir: Some(dir),
                }
            }
            Backend::Postgres => {
                let admin_url = postgres_admin_url();
                exec(&admin_url, &[format!("CREATE DATABASE \"{name}\"")]);
                Self {
                    backend,
                    url: with_database(&admin_url, &name),
                    admin_url,
                    name,
                    _dir: None,
                }
            }
            Backend::MySql => {
                let admin_url = mysql_admin_url();
                exec(&admin_url, &[format!("CREATE DATABASE `{name}`")]);
                Self {
                    backend,
                    url: with_database(&admin_url, &name),
                    admin_url,
                    name,
                    _dir: None,
                }
            }
        }
    }

    /// Runs statements in the test database.
    pub(crate) fn exec(&self, statements: &[&str]) {
        let s: Vec<String> = statements.iter().map(|s| (*s).to_owned()).collect();
        exec(&self.url, &s);
    }

    /// Runs a scalar query in the test database.
    pub(crate) fn scalar(&self, sql: &str) -> i64 {
        scalar(&self.url, sql)
    }

    /// Rows in the events table, counted directly (not through the collector).
    pub(crate) fn raw_event_rows(&self) -> i64 {
        self.scalar("SELECT COUNT(*) FROM apipool_stats_events")
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let stmt = match self.backend {
            Backend::SqliteFile => return,
            Backend::Postgres => format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.name),
            Backend::MySql => format!("DROP DATABASE IF EXISTS `{}`", self.name),
        };
        let admin = self.admin_url.clone();
        // Never panic in drop (a panicking test is already unwinding).
        let _ = std::panic::catch_unwind(move || exec(&admin, &[stmt]));
    }
}

pub(crate) fn at(base: SystemTime, offset_secs: i64) -> SystemTime {
    if offset_secs >= 0 {
        base + Duration::from_secs(offset_secs as u64)
    } else {
        base - Duration::from_secs(offset_secs.unsigned_abs())
    }
}

pub(crate) fn event(
    key: &str,
    status: CallStatus,
    finished_at: SystemTime,
    latency_ms: u64,
    method: Option<&str>,
    pool: Option<&str>,
) -> CallEvent {
    CallEvent {
        key_identifier: Arc::from(key),
        status,
        latency: Duration::from_millis(latency_ms),
        method: method.map(Arc::from),
        finished_at,
        pool: pool.map(Arc::from),
        dedup_id: None,
    }
}

/// [`event`] finished now, with no method and no pool.
pub(crate) fn now_event(key: &str, status: CallStatus, latency_ms: u64) -> CallEvent {
    event(key, status, SystemTime::now(), latency_ms, None, None)
}

/// Polls `cond` until it holds or `limit` passes (for conditions reached by another thread,
/// not for time logic).
pub(crate) fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + limit;
    while std::time::Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cond()
}

/// Kills every MariaDB/MySQL connection of `user`.
pub(crate) fn mysql_kill_connections_of(admin_url: &str, user: &str) {
    let (url, user) = (admin_url.to_owned(), user.to_owned());
    run_async(async move {
        let mut c = sqlx::MySqlConnection::connect(&url)
            .await
            .expect("admin connect");
        let ids: Vec<i64> = sqlx::query_scalar(
            "SELECT CAST(ID AS SIGNED) FROM information_schema.PROCESSLIST WHERE USER = ?",
        )
        .bind(&user)
        .fetch_all(&mut c)
        .await
        .expect("processlist");
        for id in ids {
            // The connection may already be gone.
            let _ = sqlx::query(AssertSqlSafe(format!("KILL {id}")))
                .execute(&mut c)
                .await;
        }
    });
}
