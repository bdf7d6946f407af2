//! The one error type of the stats collector.

use std::time::Duration;

/// What can go wrong when opening, querying or flushing a [`crate::stats::StatsCollector`].
///
/// Recording an event never fails: [`crate::stats::StatsCollector::record`] queues it and the
/// background writer retries database errors until they go away.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StatsError {
    /// The URL is not one the collector understands.
    #[error(
        "invalid stats database URL `{url}`: {reason}; use `sqlite::memory:`, `sqlite://PATH`, \
         `postgres://USER@HOST/DB` or `mysql://USER@HOST/DB` (MySQL and MariaDB)"
    )]
    InvalidUrl {
        /// The URL, password removed.
        url: String,
        /// Why it was refused.
        reason: String,
    },

    /// The URL names a backend this build of apipool was compiled without.
    #[error(
        "stats backend `{backend}` is not compiled in; enable the `{feature}` feature of apipool"
    )]
    BackendNotEnabled {
        /// The backend the URL asked for.
        backend: &'static str,
        /// The cargo feature that adds it.
        feature: &'static str,
    },

    /// The database could not be reached or refused the connection at open time.
    #[error(
        "cannot connect to the stats database `{url}`: {source}; check that the server is running, \
         the database exists and the URL (host, port, user) is right"
    )]
    Connect {
        /// The URL, password removed.
        url: String,
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },

    /// The stats tables were created by a newer apipool.
    #[error(
        "the stats schema in this database is version {found}, newer than the version this apipool \
         supports ({supported}); upgrade apipool or point the collector at another database"
    )]
    SchemaTooNew {
        /// The version stored in `apipool_stats_meta`.
        found: i64,
        /// The newest version this code knows.
        supported: i64,
    },

    /// The database answered a query with an error.
    #[error("stats database error: {0}")]
    Database(#[from] sqlx::Error),

    /// The query's arguments make no sense (for example, too many timeline buckets).
    #[error("invalid stats query: {0}")]
    InvalidQuery(String),

    /// `flush` gave up waiting: the writer could not commit the backlog in time.
    #[error(
        "timed out after {waited:?} waiting for the stats writer; {backlog} events are still \
         queued (the database may be down: see the writer's warnings and `writer_stats()`)"
    )]
    FlushTimeout {
        /// How long the caller waited.
        waited: Duration,
        /// Events recorded but not yet committed.
        backlog: u64,
    },

    /// The collector was closed (`close()` was called, or its writer stopped).
    #[error("the stats collector is closed; open a new one")]
    Closed,

    /// The collector could not start its background runtime.
    #[error("cannot start the stats writer thread: {0}")]
    Runtime(#[source] std::io::Error),
}

/// Removes the password from a database URL so it can be shown in errors and logs.
pub(crate) fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let Some(at) = authority.rfind('@') else {
        return url.to_owned();
    };
    let userinfo = &authority[..at];
    let Some(colon) = userinfo.find(':') else {
        return url.to_owned();
    };
    format!(
        "{}{}:***{}",
        &url[..scheme_end + 3],
        &userinfo[..colon],
        &rest[at..]
    )
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn passwords_are_removed() {
        assert_eq!(
            redact_url("postgres://u:secret@h:5432/db?x=1"),
            "postgres://u:***@h:5432/db?x=1"
        );
        assert_eq!(redact_url("mysql://root@h/db"), "mysql://root@h/db");
        assert_eq!(redact_url("sqlite::memory:"), "sqlite::memory:");
        assert_eq!(redact_url("sqlite:///tmp/a@b.db"), "sqlite:///tmp/a@b.db");
    }
}
