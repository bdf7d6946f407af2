//! Database access shared by the schema, the writer and the queries: one connection-pool enum
//! (a variant per compiled-in backend), a tiny SQL builder that writes each dialect's
//! placeholders, and executors that bind and decode the same way on every backend.

use std::str::FromStr;
use std::sync::Arc;

use sqlx::{AssertSqlSafe, ColumnIndex, Decode, Row, Type};

use super::config::StatsConfig;
use super::error::{StatsError, redact_url};

/// A connection pool the collector writes to: one variant per backend compiled in.
///
/// Build one from your own sqlx pool to share it with the collector
/// ([`crate::stats::StatsCollector::afrom_pool`]).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum StatsPool {
    /// SQLite (file or memory).
    #[cfg(feature = "sqlite")]
    Sqlite(sqlx::SqlitePool),
    /// PostgreSQL.
    #[cfg(feature = "postgres")]
    Postgres(sqlx::PgPool),
    /// MySQL or MariaDB.
    #[cfg(feature = "mysql")]
    MySql(sqlx::MySqlPool),
}

#[cfg(feature = "sqlite")]
impl From<sqlx::SqlitePool> for StatsPool {
    fn from(p: sqlx::SqlitePool) -> Self {
        StatsPool::Sqlite(p)
    }
}

#[cfg(feature = "postgres")]
impl From<sqlx::PgPool> for StatsPool {
    fn from(p: sqlx::PgPool) -> Self {
        StatsPool::Postgres(p)
    }
}

#[cfg(feature = "mysql")]
impl From<sqlx::MySqlPool> for StatsPool {
    fn from(p: sqlx::MySqlPool) -> Self {
        StatsPool::MySql(p)
    }
}

/// Runs `$body` with `$p` bound to the concrete sqlx pool of `$db`.
macro_rules! with_pool {
    ($db:expr, $p:ident => $body:expr) => {
        match $db {
            #[cfg(feature = "sqlite")]
            $crate::stats::db::StatsPool::Sqlite($p) => $body,
            #[cfg(feature = "postgres")]
            $crate::stats::db::StatsPool::Postgres($p) => $body,
            #[cfg(feature = "mysql")]
            $crate::stats::db::StatsPool::MySql($p) => $body,
        }
    };
}
pub(crate) use with_pool;

/// Binds every [`Arg`] of a [`Sql`] to a sqlx query, in order.
macro_rules! bind_args {
    ($q:expr, $args:expr) => {{
        let mut q = $q;
        for a in $args {
            q = match a {
                $crate::stats::db::Arg::I64(v) => q.bind(v),
                $crate::stats::db::Arg::I32(v) => q.bind(v),
                $crate::stats::db::Arg::Str(v) => q.bind(v),
            };
        }
        q
    }};
}
pub(crate) use bind_args;

impl StatsPool {
    pub(crate) fn dialect(&self) -> Dialect {
        match self {
            #[cfg(feature = "sqlite")]
            StatsPool::Sqlite(_) => Dialect::Sqlite,
            #[cfg(feature = "postgres")]
            StatsPool::Postgres(_) => Dialect::Postgres,
            #[cfg(feature = "mysql")]
            StatsPool::MySql(_) => Dialect::MySql,
        }
    }

    pub(crate) async fn close(&self) {
        with_pool!(self, p => p.close().await)
    }

    /// Runs a statement and returns the number of rows it changed.
    pub(crate) async fn execute(&self, sql: Sql) -> Result<u64, sqlx::Error> {
        with_pool!(self, p => {
            let q = bind_args!(sqlx::query(AssertSqlSafe(sql.text)), sql.args);
            Ok(q.execute(p).await?.rows_affected())
        })
    }

    /// Runs a query and decodes every row into `cols`.
    pub(crate) async fn fetch(&self, sql: Sql, cols: &[Col]) -> Result<Vec<Vec<Val>>, sqlx::Error> {
        with_pool!(self, p => {
            let q = bind_args!(sqlx::query(AssertSqlSafe(sql.text)), sql.args);
            let rows = q.fetch_all(p).await?;
            rows.iter().map(|r| decode_row(r, cols)).collect()
        })
    }
}

/// The SQL dialects the collector speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dialect {
    Sqlite,
    Postgres,
    // Built only with the `mysql` feature.
    #[cfg_attr(not(feature = "mysql"), allow(dead_code))]
    MySql,
}

/// One bound value.
#[derive(Debug, Clone)]
pub(crate) enum Arg {
    I64(i64),
    I32(i32),
    Str(Arc<str>),
}

/// SQL text plus its arguments, with placeholders in the dialect's style (`$n` or `?`).
#[derive(Debug)]
pub(crate) struct Sql {
    dialect: Dialect,
    pub(crate) text: String,
    pub(crate) args: Vec<Arg>,
}

impl Sql {
    pub(crate) fn new(dialect: Dialect, text: &str) -> Self {
        Self {
            dialect,
            text: text.to_owned(),
            args: Vec::new(),
        }
    }

    pub(crate) fn push(&mut self, text: &str) -> &mut Self {
        self.text.push_str(text);
        self
    }

    pub(crate) fn bind(&mut self, arg: Arg) -> &mut Self {
        self.args.push(arg);
        match self.dialect {
            Dialect::Postgres => {
                self.text.push('$');
                self.text.push_str(&self.args.len().to_string());
            }
            Dialect::Sqlite | Dialect::MySql => self.text.push('?'),
        }
        self
    }

    pub(crate) fn bind_i64(&mut self, v: i64) -> &mut Self {
        self.bind(Arg::I64(v))
    }

    pub(crate) fn bind_str(&mut self, v: &str) -> &mut Self {
        self.bind(Arg::Str(Arc::from(v)))
    }
}

/// The Rust type to decode a result column into.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Col {
    I64,
    I32,
    Str,
    OptStr,
}

/// One decoded result value.
#[derive(Debug, Clone)]
pub(crate) enum Val {
    I64(i64),
    I32(i32),
    Str(String),
    OptStr(Option<String>),
}

impl Val {
    pub(crate) fn i64(&self) -> i64 {
        match self {
            Val::I64(v) => *v,
            Val::I32(v) => i64::from(*v),
            Val::Str(_) | Val::OptStr(_) => 0,
        }
    }

    pub(crate) fn i32(&self) -> i32 {
        match self {
            Val::I32(v) => *v,
            Val::I64(v) => i32::try_from(*v).unwrap_or(i32::MIN),
            Val::Str(_) | Val::OptStr(_) => i32::MIN,
        }
    }

    pub(crate) fn into_string(self) -> String {
        match self {
            Val::Str(s) | Val::OptStr(Some(s)) => s,
            Val::I64(_) | Val::I32(_) | Val::OptStr(None) => String::new(),
        }
    }

    pub(crate) fn into_opt_string(self) -> Option<String> {
        match self {
            Val::Str(s) | Val::OptStr(Some(s)) => Some(s),
            Val::I64(_) | Val::I32(_) | Val::OptStr(None) => None,
        }
    }
}

fn decode_row<R>(row: &R, cols: &[Col]) -> Result<Vec<Val>, sqlx::Error>
where
    R: Row,
    usize: ColumnIndex<R>,
    for<'r> i64: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> i32: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> String: Decode<'r, R::Database> + Type<R::Database>,
{
    cols.iter()
        .enumerate()
        .map(|(i, c)| {
            Ok(match c {
                Col::I64 => Val::I64(row.try_get(i)?),
                Col::I32 => Val::I32(row.try_get(i)?),
                Col::Str => Val::Str(row.try_get(i)?),
                Col::OptStr => Val::OptStr(row.try_get(i)?),
            })
        })
        .collect()
}

impl Target {
    /// A SQLite file whose WAL the writer checkpoints itself.
    pub(crate) fn checkpoints_in_background(&self) -> bool {
        match self {
            #[cfg(feature = "sqlite")]
            Target::Sqlite { in_memory, .. } => !in_memory,
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }
}

/// A parsed collector URL.
#[derive(Debug)]
pub(crate) enum Target {
    #[cfg(feature = "sqlite")]
    Sqlite {
        options: sqlx::sqlite::SqliteConnectOptions,
        in_memory: bool,
    },
    #[cfg(feature = "postgres")]
    Postgres(sqlx::postgres::PgConnectOptions),
    #[cfg(feature = "mysql")]
    MySql(sqlx::mysql::MySqlConnectOptions),
}

/// Parses a collector URL without connecting.
pub(crate) fn parse_url(url: &str) -> Result<Target, StatsError> {
    let invalid = |reason: String| StatsError::InvalidUrl {
        url: redact_url(url),
        reason,
    };
    let lower = url.trim().to_ascii_lowercase();
    if lower.starts_with("sqlite:") {
        #[cfg(feature = "sqlite")]
        {
            use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
            let mut o =
                SqliteConnectOptions::from_str(url.trim()).map_err(|e| invalid(e.to_string()))?;
            let in_memory = lower.contains(":memory:") || lower.contains("mode=memory");
            if !in_memory {
                if o.get_filename().as_os_str().is_empty() {
                    return Err(invalid("no file name after `sqlite://`".to_owned()));
                }
                if !lower.contains("mode=") {
                    o = o.create_if_missing(true);
                }
                // WAL, fsync only at checkpoints, and checkpoints run by the writer on another
                // connection (so the fsyncs overlap with the next batch instead of stalling it).
                o = o
                    .journal_mode(SqliteJournalMode::Wal)
                    .synchronous(SqliteSynchronous::Normal)
                    .pragma("wal_autocheckpoint", "0");
            }
            return Ok(Target::Sqlite {
                options: o,
                in_memory,
            });
        }
        #[cfg(not(feature = "sqlite"))]
        return Err(StatsError::BackendNotEnabled {
            backend: "sqlite",
            feature: "sqlite",
        });
    }
    if lower.starts_with("postgres://") || lower.starts_with("postgresql://") {
        #[cfg(feature = "postgres")]
        {
            let o = sqlx::postgres::PgConnectOptions::from_str(url.trim())
                .map_err(|e| invalid(e.to_string()))?;
            return Ok(Target::Postgres(o));
        }
        #[cfg(not(feature = "postgres"))]
        return Err(StatsError::BackendNotEnabled {
            backend: "postgres",
            feature: "postgres",
        });
    }
    if lower.starts_with("mysql://") || lower.starts_with("mariadb://") {
        #[cfg(feature = "mysql")]
        {
            let rest = &url.trim()[url.trim().find("://").unwrap_or(0)..];
            let o = sqlx::mysql::MySqlConnectOptions::from_str(&format!("mysql{rest}"))
                .map_err(|e| invalid(e.to_string()))?;
            return Ok(Target::MySql(o.charset("utf8mb4")));
        }
        #[cfg(not(feature = "mysql"))]
        return Err(StatsError::BackendNotEnabled {
            backend: "mysql",
            feature: "mysql",
        });
    }
    Err(invalid(
        "unknown scheme (expected sqlite:, postgres://, postgresql://, mysql:// or mariadb://)"
            .to_owned(),
    ))
}

/// Opens a pool for a parsed URL.
pub(crate) async fn connect(
    target: Target,
    url_for_errors: &str,
    config: &StatsConfig,
) -> Result<StatsPool, StatsError> {
    let connect_err = |source: sqlx::Error| StatsError::Connect {
        url: redact_url(url_for_errors),
        source,
    };
    match target {
        #[cfg(feature = "sqlite")]
        Target::Sqlite {
            options: o,
            in_memory,
        } => {
            let mut opts =
                sqlx::sqlite::SqlitePoolOptions::new().acquire_timeout(config.connect_timeout);
            if in_memory {
                // One connection that never closes: the database lives as long as it does, and
                // every thread sees the same data.
                opts = opts
                    .max_connections(1)
                    .min_connections(1)
                    .idle_timeout(None)
                    .max_lifetime(None);
            } else {
                opts = opts.max_connections(config.max_connections);
            }
            opts.connect_with(o)
                .await
                .map(StatsPool::Sqlite)
                .map_err(connect_err)
        }
        #[cfg(feature = "postgres")]
        Target::Postgres(o) => sqlx::postgres::PgPoolOptions::new()
            .max_connections(config.max_connections)
            .acquire_timeout(config.connect_timeout)
            .connect_with(o)
            .await
            .map(StatsPool::Postgres)
            .map_err(connect_err),
        #[cfg(feature = "mysql")]
        Target::MySql(o) => sqlx::mysql::MySqlPoolOptions::new()
            .max_connections(config.max_connections)
            .acquire_timeout(config.connect_timeout)
            .connect_with(o)
            .await
            .map(StatsPool::MySql)
            .map_err(connect_err),
    }
}
