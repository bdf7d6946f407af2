//! Usage statistics in any relational database: SQLite (default, file or memory), PostgreSQL,
//! MySQL and MariaDB.
//!
//! A [`StatsCollector`] is a [`StatsSink`]: the pool calls [`StatsCollector::record`] once per
//! finished call. Recording costs the caller a lock and a push into a bounded buffer (well under
//! a microsecond, no I/O); a background writer thread inserts the events in batches, one
//! transaction per batch. When the buffer is full the caller waits for room (backpressure), so no
//! event is ever dropped silently. While the database is unreachable the writer keeps events in
//! memory (up to [`StatsConfig::max_backlog`]), retries with backoff, logs the backlog with
//! `tracing::warn!` and exposes it in [`StatsCollector::writer_stats`].
//!
//! Queries come in pairs, sync and async (`a`-prefixed), sharing one implementation: the seed's
//! [`StatsCollector::usage_count_in_recent_n_seconds`] and
//! [`StatsCollector::usage_count_stats_in_recent_n_seconds`], plus [`StatsCollector::timeline`],
//! [`StatsCollector::success_rate`], [`StatsCollector::latency_percentiles`] and paged
//! [`StatsCollector::events`]. Every query takes a [`StatsFilter`] (or a [`Duration`] window)
//! with optional key, status, pool and method.
//!
//! ```
//! use std::time::{Duration, SystemTime};
//! use std::sync::Arc;
//! use apipool::stats::StatsCollector;
//! use apipool::{CallEvent, CallStatus};
//!
//! let stats = StatsCollector::in_memory().unwrap();
//! stats.record(CallEvent {
//!     key_identifier: Arc::from("key-1"),
//!     status: CallStatus::Success,
//!     latency: Duration::from_millis(120),
//!     method: Some(Arc::from("GET /coins")),
//!     finished_at: SystemTime::now(),
//!     pool: None,
//!     dedup_id: None,
//! });
//! // Queries flush first, so they see every event recorded before them.
//! assert_eq!(stats.usage_count_in_recent_n_seconds(60, None, None).unwrap(), 1);
//! assert_eq!(stats.usage_count_stats_in_recent_n_seconds(60).unwrap()["key-1"], 1);
//! ```
//!
//! # Threads and runtimes
//!
//! The collector owns a small tokio runtime (one thread named `apipool-stats`) that runs the writer
//! and the queries, so it works from plain sync code. The sync methods never call `block_on` on
//! the caller's runtime: they hand the work to the collector's thread and wait, so they do not
//! panic inside a tokio runtime (they do block that thread; prefer the `a`-methods in async code).
//! The async methods run on any executor.
//!
//! # Schema
//!
//! Created on first use (`CREATE TABLE IF NOT EXISTS` plus a version row; sqlx's
//! `_sqlx_migrations` is left to the host application). All names are prefixed, so the tables
//! can live in another application's database.
//!
//! | table | content |
//! |---|---|
//! | `apipool_stats_meta` | `schema_version` (newer than [`SCHEMA_VERSION`] → [`StatsError::SchemaTooNew`] at open) |
//! | `apipool_stats_status` | the [`CallStatus`] ids and names: 1 success, 5 failed, 9 reach limit, 10 timeout, 11 invalid key, 12 quota exhausted, 13 not key related, 14 cancelled |
//! | `apipool_stats_events` | `id`, `key_identifier`, `status_id`, `finished_at` (BIGINT UTC µs), `latency_us`, `method`, `pool`, `dedup_id` |
//! | `apipool_stats_batches` | ids of committed batches (exactly-once retries) |

#[cfg(not(any(feature = "sqlite", feature = "postgres", feature = "mysql")))]
compile_error!("the `stats` feature needs a backend: enable `sqlite`, `postgres` or `mysql`");

mod config;
mod db;
mod error;
mod query;
mod queue;
mod schema;
mod writer;

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::FutureExt;
use tokio::sync::oneshot;

pub use config::{ManualWallClock, Retention, StatsConfig, SystemWallClock, WallClock};
pub use db::StatsPool;
pub use error::StatsError;
pub use query::{
    Bucket, EventPage, EventRow, LatencyReport, LatencyStats, Page, StatsFilter, StatusCounts,
    SuccessRates, TimelineBucket,
};
pub use schema::SCHEMA_VERSION;
pub use writer::PruneReport;

use crate::status::{CallEvent, CallStatus, StatsSink};
use queue::{Msg, Queue};
use writer::Shared;

/// The URL of the library default: an in-memory SQLite database shared by every thread.
pub const DEFAULT_URL: &str = "sqlite::memory:";

/// Collects call events into a SQL database without blocking callers, and answers usage queries.
///
/// Cheap to clone (all clones share one writer). The last clone to drop flushes and stops the
/// writer (waiting at most [`StatsConfig::shutdown_timeout`]); [`StatsCollector::close`] does
/// the same explicitly and reports errors.
#[derive(Clone)]
pub struct StatsCollector {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    queue: Arc<Queue>,
    runtime: RuntimeGuard,
    writer_done: parking_lot::Mutex<Option<std::sync::mpsc::Receiver<()>>>,
    label: String,
    warned_refused: AtomicBool,
}

/// Owns the collector's runtime; never blocks on drop (dropping a runtime inside another
/// runtime would panic).
struct RuntimeGuard(Option<tokio::runtime::Runtime>);

impl RuntimeGuard {
    fn handle(&self) -> &tokio::runtime::Handle {
        match &self.0 {
            Some(rt) => rt.handle(),
            None => unreachable!("the runtime lives as long as the guard"),
        }
    }
}

impl Drop for RuntimeGuard {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

fn new_runtime() -> Result<RuntimeGuard, StatsError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("apipool-stats")
        .enable_all()
        .build()
        .map(|rt| RuntimeGuard(Some(rt)))
        .map_err(StatsError::Runtime)
}

/// Wakes a thread parked in [`wait`].
struct ThreadWaker(std::thread::Thread);

impl std::task::Wake for ThreadWaker {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.unpark();
    }
}

/// Waits for a future on the calling thread by parking it. Needs no runtime and touches none:
/// the futures waited on here only hand work to the collector's own runtime and wait for the
/// answer, so this works inside a tokio runtime or another executor without panicking.
fn wait<F: Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    let waker = std::task::Waker::from(Arc::new(ThreadWaker(std::thread::current())));
    let mut cx = std::task::Context::from_waker(&waker);
    loop {
        if let std::task::Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::park();
    }
}

/// A snapshot of the writer's counters.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct WriterStats {
    /// Events accepted by `record` since the collector opened.
    pub accepted: u64,
    /// Events committed to the database (duplicates by dedup id included).
    pub committed: u64,
    /// Events recorded but not yet committed (queued or held by the writer).
    pub backlog: u64,
    /// Transactions committed.
    pub batches: u64,
    /// Write attempts that failed (each is retried).
    pub failed_attempts: u64,
    /// Failed attempts since the last successful write; 0 when healthy.
    pub consecutive_failures: u64,
    /// Times a caller had to wait because the buffer was full.
    pub caller_waits: u64,
    /// Events refused because the collector was already closed.
    pub refused: u64,
    /// Events given up at shutdown because the database stayed unreachable.
    pub lost: u64,
    /// Events deleted by retention.
    pub pruned: u64,
    /// The last write error, if any.
    pub last_error: Option<String>,
}

impl WriterStats {
    /// `true` when the last write attempt succeeded (or none failed yet).
    pub fn healthy(&self) -> bool {
        self.consecutive_failures == 0
    }
}

impl StatsCollector {
    /// Opens the library default: an in-memory SQLite database ([`DEFAULT_URL`]).
    pub fn in_memory() -> Result<Self, StatsError> {
        Self::open(DEFAULT_URL)
    }

    /// Opens (and creates the schema in) the database at `url` with default settings.
    ///
    /// Accepted URLs: `sqlite::memory:`, `sqlite://PATH` (created if missing unless the URL has
    /// a `mode=`), `postgres://…`, `postgresql://…`, `mysql://…`, `mariadb://…`.
    pub fn open(url: &str) -> Result<Self, StatsError> {
        Self::open_with(url, StatsConfig::default())
    }

    /// [`StatsCollector::open`] with settings.
    pub fn open_with(url: &str, config: StatsConfig) -> Result<Self, StatsError> {
        wait(Self::aopen_with(url, config))
    }

    /// Async [`StatsCollector::open`].
    pub async fn aopen(url: &str) -> Result<Self, StatsError> {
        Self::aopen_with(url, StatsConfig::default()).await
    }

    /// Async [`StatsCollector::open_with`].
    pub async fn aopen_with(url: &str, config: StatsConfig) -> Result<Self, StatsError> {
        let target = db::parse_url(url)?;
        let background_checkpoints = target.checkpoints_in_background();
        let runtime = new_runtime()?;
        let url_owned = url.to_owned();
        let cfg = config.clone();
        let pool = runtime
            .handle()
            .spawn(async move {
                let pool = db::connect(target, &url_owned, &cfg).await?;
                if let Err(e) = schema::migrate(&pool).await {
                    pool.close().await;
                    return Err(e);
                }
                Ok(pool)
            })
            .await
            .map_err(|_| StatsError::Closed)??;
        Ok(Self::start(
            runtime,
            pool,
            config,
            (true, background_checkpoints),
            error::redact_url(url),
        ))
    }

    /// Uses a connection pool you already have (for example the server's), creating the schema
    /// if needed. The pool is not closed when the collector stops.
    ///
    /// The collector still runs its writer on its own thread; a pool made on another runtime
    /// works as long as that runtime is running.
    pub async fn afrom_pool(
        pool: impl Into<StatsPool>,
        config: StatsConfig,
    ) -> Result<Self, StatsError> {
        let pool = pool.into();
        let runtime = new_runtime()?;
        let p = pool.clone();
        runtime
            .handle()
            .spawn(async move { schema::migrate(&p).await })
            .await
            .map_err(|_| StatsError::Closed)??;
        let label = format!("{:?} pool", pool.dialect());
        Ok(Self::start(runtime, pool, config, (false, false), label))
    }

    fn start(
        runtime: RuntimeGuard,
        pool: StatsPool,
        config: StatsConfig,
        (owns_pool, background_checkpoints): (bool, bool),
        label: String,
    ) -> Self {
        let queue = Arc::new(Queue::new(config.queue_capacity, config.batch_size));
        let shared = Arc::new(Shared {
            dialect: pool.dialect(),
            db: pool,
            config,
            metrics: writer::Metrics::default(),
            owns_pool,
            background_checkpoints,
        });
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let (s, q) = (Arc::clone(&shared), Arc::clone(&queue));
        runtime.handle().spawn(async move {
            let result = AssertUnwindSafe(writer::run(s, Arc::clone(&q)))
                .catch_unwind()
                .await;
            if result.is_err() {
                tracing::error!(
                    "apipool stats: the writer panicked; the collector is closed and refuses new events"
                );
                q.close(Instant::now());
            }
            let _ = done_tx.send(());
        });
        Self {
            inner: Arc::new(Inner {
                shared,
                queue,
                runtime,
                writer_done: parking_lot::Mutex::new(Some(done_rx)),
                label,
                warned_refused: AtomicBool::new(false),
            }),
        }
    }

    /// Queues one event. Never does I/O; waits only while the buffer is full (backpressure).
    /// After [`StatsCollector::close`] the event is refused, counted in
    /// [`WriterStats::refused`] and logged once.
    pub fn record(&self, event: CallEvent) {
        if self.inner.queue.push_event(event).is_err() {
            self.refused();
        }
    }

    /// Queues one event unless the buffer is full; gives the event back if it is (or if the
    /// collector is closed). For callers that would rather not wait.
    pub fn try_record(&self, event: CallEvent) -> Result<(), CallEvent> {
        self.inner.queue.try_push_event(event)
    }

    #[cold]
    fn refused(&self) {
        if !self.inner.warned_refused.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                "apipool stats: event recorded after the collector was closed; not stored"
            );
        }
    }

    /// The counters of the writer: backlog, failures, last error.
    pub fn writer_stats(&self) -> WriterStats {
        let m = &self.inner.shared.metrics;
        let q = &self.inner.queue;
        let (queued, accepted) = q.counts();
        let (failed_attempts, consecutive_failures, last_error) = m.failures();
        WriterStats {
            accepted,
            committed: m.committed.load(Ordering::Relaxed),
            backlog: queued as u64 + m.in_writer.load(Ordering::Relaxed),
            batches: m.batches.load(Ordering::Relaxed),
            failed_attempts,
            consecutive_failures,
            caller_waits: q.waits.load(Ordering::Relaxed),
            refused: q.refused.load(Ordering::Relaxed),
            lost: m.lost.load(Ordering::Relaxed),
            pruned: m.pruned.load(Ordering::Relaxed),
            last_error,
        }
    }

    /// Events recorded but not yet committed.
    pub fn backlog(&self) -> u64 {
        self.writer_stats().backlog
    }

    /// The settings this collector runs with.
    pub fn config(&self) -> &StatsConfig {
        &self.inner.shared.config
    }

    /// Waits until every event recorded before this call is committed, or
    /// [`StatsConfig::flush_timeout`] passes.
    pub async fn aflush(&self) -> Result<(), StatsError> {
        let (tx, rx) = oneshot::channel();
        self.inner.queue.push_control(Msg::Flush(tx))?;
        let timeout = self.inner.shared.config.flush_timeout;
        let waited = self
            .spawn(async move { tokio::time::timeout(timeout, rx).await })
            .await?;
        match waited {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(StatsError::Closed),
            Err(_) => Err(StatsError::FlushTimeout {
                waited: timeout,
                backlog: self.backlog(),
            }),
        }
    }

    /// Runs retention now (after committing everything recorded before the call).
    pub async fn aprune(&self) -> Result<PruneReport, StatsError> {
        let (tx, rx) = oneshot::channel();
        self.inner.queue.push_control(Msg::Prune(tx))?;
        let timeout = self.inner.shared.config.flush_timeout;
        let waited = self
            .spawn(async move { tokio::time::timeout(timeout, rx).await })
            .await?;
        match waited {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(StatsError::Closed),
            Err(_) => Err(StatsError::FlushTimeout {
                waited: timeout,
                backlog: self.backlog(),
            }),
        }
    }

    /// Stops accepting events, writes the backlog (waiting at most
    /// [`StatsConfig::shutdown_timeout`]) and stops the writer. Returns an error if events had
    /// to be given up. Later calls return `Ok(())` at once; recording afterwards is refused.
    pub async fn aclose(&self) -> Result<(), StatsError> {
        let inner = Arc::clone(&self.inner);
        // Waiting is blocking (std channel): do it on a helper thread, not on the caller's.
        let (tx, rx) = oneshot::channel();
        std::thread::Builder::new()
            .name("apipool-stats-close".to_owned())
            .spawn(move || {
                let _ = tx.send(inner.shutdown());
            })
            .map_err(StatsError::Runtime)?;
        rx.await.unwrap_or(Err(StatsError::Closed))
    }

    /// Sync [`StatsCollector::aclose`].
    pub fn close(&self) -> Result<(), StatsError> {
        self.inner.shutdown()
    }

    /// Runs a query task on the collector's runtime and waits for it from any executor.
    async fn spawn<T, F>(&self, fut: F) -> Result<T, StatsError>
    where
        F: Future<Output = T> + Send + 'static,
        T: Send + 'static,
    {
        self.inner
            .runtime
            .handle()
            .spawn(fut)
            .await
            .map_err(|_| StatsError::Closed)
    }

    /// Flushes (if configured) and runs `q` with the resolved filter on the collector's runtime.
    async fn query<T, F, Fut>(&self, filter: StatsFilter, q: F) -> Result<T, StatsError>
    where
        F: FnOnce(Arc<Shared>, query::Resolved) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, StatsError>> + Send + 'static,
        T: Send + 'static,
    {
        if self.inner.shared.config.flush_before_query {
            self.aflush().await?;
        }
        let shared = Arc::clone(&self.inner.shared);
        let resolved = filter.resolve(shared.config.clock.now());
        self.spawn(async move { q(shared, resolved).await }).await?
    }

    /// Events in the last `n_seconds`, optionally of one key and/or status (the seed's query).
    pub async fn ausage_count_in_recent_n_seconds(
        &self,
        n_seconds: u64,
        key: Option<&str>,
        status: Option<CallStatus>,
    ) -> Result<u64, StatsError> {
        let mut f = StatsFilter::recent_seconds(n_seconds);
        f.key = key.map(str::to_owned);
        f.status = status;
        self.acount(f).await
    }

    /// Events per key in the last `n_seconds` (the seed's query).
    pub async fn ausage_count_stats_in_recent_n_seconds(
        &self,
        n_seconds: u64,
    ) -> Result<BTreeMap<String, u64>, StatsError> {
        self.acount_by_key(StatsFilter::recent_seconds(n_seconds))
            .await
    }

    /// Events matching `filter`.
    pub async fn acount(&self, filter: impl Into<StatsFilter>) -> Result<u64, StatsError> {
        self.query(
            filter.into(),
            |s, f| async move { query::count(&s, &f).await },
        )
        .await
    }

    /// Events matching `filter`, per key identifier.
    pub async fn acount_by_key(
        &self,
        filter: impl Into<StatsFilter>,
    ) -> Result<BTreeMap<String, u64>, StatsError> {
        self.query(filter.into(), |s, f| async move {
            query::count_by_key(&s, &f).await
        })
        .await
    }

    /// Event counts per `bucket` (UTC-aligned) and status over `filter`'s window, oldest first,
    /// with empty buckets included. The last bucket is the one holding "now" (or `until`).
    pub async fn atimeline(
        &self,
        filter: impl Into<StatsFilter>,
        bucket: Bucket,
    ) -> Result<Vec<TimelineBucket>, StatsError> {
        self.query(filter.into(), move |s, f| async move {
            query::timeline(&s, &f, bucket).await
        })
        .await
    }

    /// Success rates over `filter`, for the whole selection and per key.
    pub async fn asuccess_rate(
        &self,
        filter: impl Into<StatsFilter>,
    ) -> Result<SuccessRates, StatsError> {
        self.query(filter.into(), |s, f| async move {
            query::success_rates(&s, &f).await
        })
        .await
    }

    /// Latency p50/p95/p99/max (nearest rank) over `filter`, overall and per key.
    ///
    /// The selected latencies are fetched and ranked in Rust (works the same on every
    /// database); use a bounded window on large tables.
    pub async fn alatency_percentiles(
        &self,
        filter: impl Into<StatsFilter>,
    ) -> Result<LatencyReport, StatsError> {
        self.query(
            filter.into(),
            |s, f| async move { query::latency(&s, &f).await },
        )
        .await
    }

    /// One page of the events matching `filter`, newest first, with the total count.
    pub async fn aevents(
        &self,
        filter: impl Into<StatsFilter>,
        page: Page,
    ) -> Result<EventPage, StatsError> {
        self.query(filter.into(), move |s, f| async move {
            query::events(&s, &f, page).await
        })
        .await
    }
}

/// Sync twins of the async methods: same implementation, run on the collector's thread.
macro_rules! sync_twins {
    ($( $(#[$doc:meta])* fn $name:ident => $aname:ident ( $($p:ident : $t:ty),* ) -> $ret:ty; )*) => {
        impl StatsCollector {
            $(
                $(#[$doc])*
                pub fn $name(&self, $($p: $t),*) -> Result<$ret, StatsError> {
                    wait(self.$aname($($p),*))
                }
            )*
        }
    };
}

sync_twins! {
    /// Sync [`StatsCollector::aflush`].
    fn flush => aflush() -> ();
    /// Sync [`StatsCollector::aprune`].
    fn prune => aprune() -> PruneReport;
    /// Events in the last `n_seconds`, optionally of one key and/or status (the seed's query).
    fn usage_count_in_recent_n_seconds => ausage_count_in_recent_n_seconds(
        n_seconds: u64, key: Option<&str>, status: Option<CallStatus>) -> u64;
    /// Events per key in the last `n_seconds` (the seed's query).
    fn usage_count_stats_in_recent_n_seconds => ausage_count_stats_in_recent_n_seconds(
        n_seconds: u64) -> BTreeMap<String, u64>;
    /// Sync [`StatsCollector::acount`].
    fn count => acount(filter: impl Into<StatsFilter>) -> u64;
    /// Sync [`StatsCollector::acount_by_key`].
    fn count_by_key => acount_by_key(filter: impl Into<StatsFilter>) -> BTreeMap<String, u64>;
    /// Sync [`StatsCollector::atimeline`].
    fn timeline => atimeline(filter: impl Into<StatsFilter>, bucket: Bucket) -> Vec<TimelineBucket>;
    /// Sync [`StatsCollector::asuccess_rate`].
    fn success_rate => asuccess_rate(filter: impl Into<StatsFilter>) -> SuccessRates;
    /// Sync [`StatsCollector::alatency_percentiles`].
    fn latency_percentiles => alatency_percentiles(filter: impl Into<StatsFilter>) -> LatencyReport;
    /// Sync [`StatsCollector::aevents`].
    fn events => aevents(filter: impl Into<StatsFilter>, page: Page) -> EventPage;
}

impl StatsSink for StatsCollector {
    fn record(&self, event: CallEvent) {
        StatsCollector::record(self, event);
    }
}

impl fmt::Debug for StatsCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StatsCollector")
            .field("database", &self.inner.label)
            .field("backlog", &self.backlog())
            .finish_non_exhaustive()
    }
}

impl Inner {
    /// Closes the queue and waits for the writer to drain it. Idempotent.
    fn shutdown(&self) -> Result<(), StatsError> {
        let timeout = self.shared.config.shutdown_timeout;
        self.queue.close(Instant::now() + timeout);
        let Some(done) = self.writer_done.lock().take() else {
            return Ok(());
        };
        // The writer gives up at the deadline; allow it a little longer to log and close.
        let m = &self.shared.metrics;
        if done.recv_timeout(timeout + Duration::from_secs(5)).is_err() {
            // Stuck in a statement the database never answers: what it holds is lost when the
            // runtime stops.
            let stuck = self.queue.counts().0 as u64 + m.in_writer.swap(0, Ordering::Relaxed);
            m.lost.fetch_add(stuck, Ordering::Relaxed);
            tracing::error!(
                lost = stuck,
                "apipool stats: the writer did not finish before the shutdown timeout; \
                 these events were not stored"
            );
        }
        let lost = m.lost.load(Ordering::Relaxed);
        if lost > 0 {
            return Err(StatsError::FlushTimeout {
                waited: timeout,
                backlog: lost,
            });
        }
        Ok(())
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            tracing::error!(error = %e, "apipool stats: closing the collector lost events");
        }
    }
}
