//! Database access: one `sqlx::AnyPool` over SQLite (default) or PostgreSQL.
//!
//! Every query is written once in a dialect both backends accept: `$1` placeholders, `INTEGER`
//! booleans (0/1) and unix-millisecond timestamps, JSON stored as text. Migrations live per backend
//! in `migrations/sqlite` and `migrations/postgres`.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use sqlx::any::{AnyArguments, AnyPoolOptions};
use sqlx::query::Query;
use sqlx::{Any, AnyPool};

/// Which database engine a [`Db`] talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DbKind {
    /// SQLite file (the zero set-up default).
    Sqlite,
    /// PostgreSQL.
    Postgres,
}

/// A connection pool plus the backend kind.
#[derive(Debug, Clone)]
pub struct Db {
    /// The pool.
    pub pool: AnyPool,
    /// Which backend.
    pub kind: DbKind,
}

/// Maximum number of bind parameters used in one multi-row statement (below SQLite's 32766 and
/// PostgreSQL's 65535).
pub const MAX_BIND_PARAMS: usize = 30_000;

impl Db {
    /// The SQLite URL for a file path (created when missing).
    pub fn sqlite_url(path: &Path) -> String {
        format!("sqlite://{}?mode=rwc", path.display())
    }

    /// Connects and runs the migrations.
    pub async fn connect(url: &str, max_connections: u32) -> anyhow::Result<Self> {
        sqlx::any::install_default_drivers();
        let kind = if url.starts_with("sqlite:") {
            DbKind::Sqlite
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            DbKind::Postgres
        } else {
            anyhow::bail!(
                "unsupported database URL scheme (use sqlite://PATH or postgres://USER@HOST/DB)"
            );
        };
        let pool = AnyPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(30))
            .connect(url)
            .await
            .with_context(|| format!("cannot connect to the {kind:?} database"))?;
        let db = Self { pool, kind };
        if kind == DbKind::Sqlite {
            // WAL lets readers continue while a writer (an import, a key rotation) holds the lock;
            // the setting is persistent in the file.
            sqlx::query("PRAGMA journal_mode=WAL")
                .execute(&db.pool)
                .await
                .context("cannot switch SQLite to WAL mode")?;
        }
        db.migrate().await?;
        Ok(db)
    }

    /// Runs the migrations of this backend.
    pub async fn migrate(&self) -> anyhow::Result<()> {
        match self.kind {
            DbKind::Sqlite => sqlx::migrate!("migrations/sqlite").run(&self.pool).await,
            DbKind::Postgres => sqlx::migrate!("migrations/postgres").run(&self.pool).await,
        }
        .context("database migrations failed")
    }

    /// `SELECT 1`: is the database reachable?
    pub async fn ping(&self) -> bool {
        sqlx::query("SELECT 1").execute(&self.pool).await.is_ok()
    }
}

/// An owned bind parameter, so dynamic SQL can be assembled first and bound afterwards.
#[derive(Debug, Clone)]
pub enum Param {
    /// TEXT
    Text(String),
    /// nullable TEXT
    OptText(Option<String>),
    /// INTEGER / BIGINT
    Int(i64),
    /// nullable INTEGER / BIGINT
    OptInt(Option<i64>),
    /// BLOB / BYTEA
    Bytes(Vec<u8>),
}

impl From<String> for Param {
    fn from(v: String) -> Self {
        Self::Text(v)
    }
}
impl From<&str> for Param {
    fn from(v: &str) -> Self {
        Self::Text(v.to_owned())
    }
}
impl From<Option<String>> for Param {
    fn from(v: Option<String>) -> Self {
        Self::OptText(v)
    }
}
impl From<i64> for Param {
    fn from(v: i64) -> Self {
        Self::Int(v)
    }
}
impl From<bool> for Param {
    fn from(v: bool) -> Self {
        Self::Int(i64::from(v))
    }
}
impl From<Option<i64>> for Param {
    fn from(v: Option<i64>) -> Self {
        Self::OptInt(v)
    }
}
impl From<Vec<u8>> for Param {
    fn from(v: Vec<u8>) -> Self {
        Self::Bytes(v)
    }
}

/// Binds parameters in order.
pub fn bind_all<'q>(
    mut q: Query<'q, Any, AnyArguments>,
    params: Vec<Param>,
) -> Query<'q, Any, AnyArguments> {
    for p in params {
        q = match p {
            Param::Text(v) => q.bind(v),
            Param::OptText(v) => q.bind(v),
            Param::Int(v) => q.bind(v),
            Param::OptInt(v) => q.bind(v),
            Param::Bytes(v) => q.bind(v),
        };
    }
    q
}

/// Assembles SQL with `$n` placeholders and the matching parameters.
#[derive(Debug, Default)]
pub struct Sql {
    /// The SQL text so far.
    pub text: String,
    /// Parameters, in placeholder order.
    pub params: Vec<Param>,
    /// Use positional `?` instead of `$n` (SQLite).
    question_marks: bool,
}

impl Sql {
    /// Starts with fixed text.
    pub fn new(text: &str) -> Self {
        Self {
            text: text.to_owned(),
            params: Vec::new(),
            question_marks: false,
        }
    }

    /// Starts with fixed text, using the placeholder style that is fastest for `kind`.
    ///
    /// SQLite keeps `$n` and `?n` parameters in a list that `sqlite3_bind_parameter_name` scans
    /// linearly, so binding a statement with thousands of them is quadratic (seconds for a
    /// 10,000-key import); anonymous `?` parameters are positional and cost nothing extra.
    /// Placeholders are always appended in parameter order, so `?` is exact. PostgreSQL only
    /// accepts `$n`.
    pub fn for_db(kind: DbKind, text: &str) -> Self {
        let mut s = Self::new(text);
        s.question_marks = kind == DbKind::Sqlite;
        s
    }

    /// A new builder with the same parameters and placeholder style but another text (which
    /// must contain this one's placeholders).
    pub fn derive(&self, text: String) -> Self {
        Self {
            text,
            params: self.params.clone(),
            question_marks: self.question_marks,
        }
    }

    /// Appends raw SQL text.
    pub fn push(&mut self, text: &str) -> &mut Self {
        self.text.push_str(text);
        self
    }

    /// Appends a placeholder bound to `value`.
    pub fn bind(&mut self, value: impl Into<Param>) -> &mut Self {
        self.params.push(value.into());
        if self.question_marks {
            self.text.push('?');
        } else {
            self.text.push('$');
            self.text.push_str(&self.params.len().to_string());
        }
        self
    }

    /// The query, ready to execute.
    pub fn into_query(self) -> Query<'static, Any, AnyArguments> {
        bind_all(sqlx::query(sqlx::AssertSqlSafe(self.text)), self.params)
    }
}

/// Escapes `%`, `_` and `\` for use in `LIKE ... ESCAPE '\'`.
pub fn like_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    for c in s.chars() {
        if matches!(c, '%' | '_' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Is this a unique-constraint violation?
pub fn is_unique_violation(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(e) if e.is_unique_violation())
}

/// Whether `err` means the database cannot be used right now (down, refusing or dropping
/// connections, no free connection, SQLite file locked) rather than a bad query. Requests that
/// fail this way are answered 503 and can be retried.
pub fn is_unavailable(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(e) => {
            let code = e.code().unwrap_or_default();
            if code.len() < 5 {
                // SQLite result codes (extended ones keep the primary code in the low byte):
                // 5 SQLITE_BUSY, 6 SQLITE_LOCKED.
                return code.parse::<u32>().is_ok_and(|c| matches!(c & 0xff, 5 | 6));
            }
            // PostgreSQL SQLSTATEs: class 08 (connection exception), 57P01-57P03 (shut down,
            // cannot connect now), 53300 (too many connections), and 55000 "database ... is not
            // currently accepting connections" (ALLOW_CONNECTIONS false).
            code.starts_with("08")
                || code.starts_with("57P")
                || code == "53300"
                || (code == "55000" && e.message().contains("accepting connections"))
        }
        _ => false,
    }
}

impl FromStr for DbKind {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "sqlite" => Ok(Self::Sqlite),
            "postgres" => Ok(Self::Postgres),
            other => anyhow::bail!("unknown database kind {other}"),
        }
    }
}
