//! The background writer: drains the queue, inserts batches (one transaction each), retries with
//! backoff while the database is away, answers flushes in order and prunes old rows.
//!
//! Exactly-once: every batch inserts a row with a random id into `apipool_stats_batches` in the
//! same transaction. When an attempt fails (even during `COMMIT`, when the outcome is unknown),
//! the retry first looks that id up and skips the batch if it did commit.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use sqlx::AssertSqlSafe;
use tokio::time::Instant;

use super::config::StatsConfig;
use super::db::{Dialect, Sql, StatsPool};
use super::queue::{Msg, Queue};
use super::schema::{MAX_TEXT_CHARS, begin_write, insert_ignore};
use crate::status::CallEvent;

/// Rows per multi-row `INSERT` statement (SQLite and MySQL; PostgreSQL sends whole batches as
/// arrays). Smaller remainders use power-of-two sizes so few distinct statements get prepared.
const ROWS_PER_STATEMENT: usize = 1_000;

/// Events committed between two background WAL checkpoints (SQLite files).
const CHECKPOINT_EVERY: usize = 20_000;

/// Events committed between two checkpoints run while the writer waits, which let the next
/// transaction restart the WAL from its beginning. Background checkpoints never catch up with a
/// busy writer, so without these the WAL would grow for as long as the load lasts.
const RESTART_WAL_EVERY: usize = 200_000;

/// How long batch ids are kept for the exactly-once check.
const BATCH_MARKER_TTL: Duration = Duration::from_secs(3_600);

const EVENT_COLUMNS: &str =
    "(key_identifier, status_id, finished_at, latency_us, method, pool, dedup_id)";

/// State shared by the collector handle, the writer and the queries.
pub(crate) struct Shared {
    pub(crate) db: StatsPool,
    pub(crate) dialect: Dialect,
    pub(crate) config: StatsConfig,
    pub(crate) metrics: Metrics,
    /// Close the pool when the writer stops (false when the caller lent us their pool).
    pub(crate) owns_pool: bool,
    /// A SQLite file opened with `wal_autocheckpoint = 0`: the writer checkpoints in the
    /// background.
    pub(crate) background_checkpoints: bool,
}

/// Writer counters, read by [`crate::stats::StatsCollector::writer_stats`].
#[derive(Default)]
pub(crate) struct Metrics {
    pub(crate) committed: AtomicU64,
    pub(crate) batches: AtomicU64,
    /// Changed only under `last_error`'s lock (except the reset to 0 after a success), so a
    /// snapshot read under it never shows a failure without its error.
    pub(crate) failed_attempts: AtomicU64,
    /// See `failed_attempts`.
    pub(crate) consecutive_failures: AtomicU64,
    /// Events taken from the queue and not yet committed.
    pub(crate) in_writer: AtomicU64,
    pub(crate) lost: AtomicU64,
    pub(crate) pruned: AtomicU64,
    pub(crate) last_error: Mutex<Option<String>>,
}

impl Metrics {
    /// Counts a failed write attempt together with its error.
    fn record_failure(&self, error: String) {
        let mut last = self.last_error.lock();
        *last = Some(error);
        self.failed_attempts.fetch_add(1, Ordering::Relaxed);
        self.consecutive_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// `(failed_attempts, consecutive_failures, last_error)` at one moment: a failure counted
    /// here always comes with its error (as [`Self::record_failure`] wrote them).
    pub(crate) fn failures(&self) -> (u64, u64, Option<String>) {
        let last = self.last_error.lock();
        (
            self.failed_attempts.load(Ordering::Relaxed),
            self.consecutive_failures.load(Ordering::Relaxed),
            last.clone(),
        )
    }
}

/// Rows deleted by one retention pass.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct PruneReport {
    /// Events deleted because they were older than `max_age`.
    pub by_age: u64,
    /// Events deleted to get back under `max_rows`.
    pub by_rows: u64,
}

/// UTC microseconds since the Unix epoch (negative before it).
pub(crate) fn micros(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_micros()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_micros()).unwrap_or(i64::MAX),
    }
}

pub(crate) fn duration_micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// `s` cut to [`MAX_TEXT_CHARS`] characters.
fn clip(s: &str) -> &str {
    if s.len() <= MAX_TEXT_CHARS {
        return s;
    }
    match s.char_indices().nth(MAX_TEXT_CHARS) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

fn clip_arc(s: &Arc<str>) -> Arc<str> {
    if s.len() <= MAX_TEXT_CHARS {
        s.clone()
    } else {
        Arc::from(clip(s))
    }
}

/// One transaction of multi-row `INSERT`s (SQLite, MySQL), then the batch marker.
macro_rules! insert_values {
    ($w:expr, $p:expr, $d:expr, $batch:expr, $batch_id:expr, $now:expr) => {{
        let empty: Arc<str> = Arc::from("");
        let mut bind_chunk = |chunk: &[CallEvent]| {
            let mut q = sqlx::query(AssertSqlSafe($w.values_statement($d, chunk.len())));
            for e in chunk {
                q = q
                    .bind(clip_arc(&e.key_identifier))
                    .bind(e.status.id())
                    .bind(micros(e.finished_at))
                    .bind(duration_micros(e.latency))
                    .bind(e.method.as_ref().map(clip_arc))
                    .bind(e.pool.as_ref().map_or_else(|| empty.clone(), clip_arc))
                    .bind(e.dedup_id.as_ref().map(clip_arc));
            }
            q
        };
        let mut tx = $p.begin_with(begin_write($d)).await?;
        let mut chunks = statement_chunks($batch);
        let mut next = chunks.next().map(&mut bind_chunk);
        while let Some(q) = next.take() {
            let mut running = Box::pin(q.execute(&mut *tx));
            // Send the statement, then bind the next one while the database works on it.
            let first = futures::poll!(running.as_mut());
            next = chunks.next().map(&mut bind_chunk);
            match first {
                std::task::Poll::Ready(r) => r?,
                std::task::Poll::Pending => running.await?,
            };
        }
        let mut marker = Sql::new(
            $d,
            "INSERT INTO apipool_stats_batches (id, committed_at) VALUES (",
        );
        marker
            .bind_i64($batch_id)
            .push(", ")
            .bind_i64($now)
            .push(")");
        let q = super::db::bind_args!(sqlx::query(AssertSqlSafe(marker.text)), marker.args);
        q.execute(&mut *tx).await?;
        tx.commit().await
    }};
}

/// Splits a batch into statements of [`ROWS_PER_STATEMENT`] rows, then power-of-two remainders.
fn statement_chunks(batch: &[CallEvent]) -> impl Iterator<Item = &[CallEvent]> {
    let mut rest = batch;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let rows = if rest.len() >= ROWS_PER_STATEMENT {
            ROWS_PER_STATEMENT
        } else {
            1 << rest.len().ilog2()
        };
        let (chunk, tail) = rest.split_at(rows);
        rest = tail;
        Some(chunk)
    })
}

async fn run_checkpoint(shared: &Shared) {
    let sql = Sql::new(shared.dialect, "PRAGMA wal_checkpoint(PASSIVE)");
    if let Err(e) = shared.db.execute(sql).await {
        tracing::warn!(error = %e, "apipool stats: WAL checkpoint failed; will try again");
    }
}

/// Runs the writer until the queue is closed and drained (or the shutdown deadline passes).
pub(crate) async fn run(shared: Arc<Shared>, queue: Arc<Queue>) {
    let next_prune = Instant::now() + shared.config.prune_interval;
    let mut w = Writer {
        shared,
        queue,
        pending: VecDeque::new(),
        incoming: Vec::new(),
        pending_events: 0,
        next_prune,
        statements: HashMap::new(),
        gave_up: false,
        since_checkpoint: 0,
        since_wal_restart: 0,
        checkpointing: None,
    };
    w.run().await;
    if w.shared.owns_pool {
        w.shared.db.close().await;
    }
}

struct Writer {
    shared: Arc<Shared>,
    queue: Arc<Queue>,
    /// Messages taken from the queue, in order.
    pending: VecDeque<Msg>,
    /// Spare buffer swapped with the queue's.
    incoming: Vec<Msg>,
    /// Events in `pending` plus the batch being written.
    pending_events: usize,
    next_prune: Instant,
    /// Multi-row INSERT text by row count.
    statements: HashMap<usize, Arc<str>>,
    gave_up: bool,
    /// Events committed since the last checkpoint was started.
    since_checkpoint: usize,
    /// Events committed since the last checkpoint the writer waited for.
    since_wal_restart: usize,
    /// The background checkpoint in flight, if any.
    checkpointing: Option<tokio::task::JoinHandle<()>>,
}

impl Writer {
    async fn run(&mut self) {
        let linger = self.shared.config.linger;
        loop {
            if self.pending.is_empty() && self.queue.is_empty() {
                if self.queue.closing().is_some() {
                    break;
                }
                let prune_at = self.next_prune;
                tokio::select! {
                    () = self.queue.notified() => {}
                    () = tokio::time::sleep_until(prune_at) => {}
                }
                if !linger.is_zero() && !self.queue.is_empty() && !self.queue.is_urgent() {
                    let _ = tokio::time::timeout(linger, self.queue.notified()).await;
                }
            }
            self.drain();
            self.step().await;
            if self.gave_up {
                break;
            }
            if Instant::now() >= self.next_prune {
                self.next_prune = Instant::now() + self.shared.config.prune_interval;
                self.checkpoint();
                if let Err(e) = self.prune().await {
                    tracing::warn!(error = %e, "apipool stats: background pruning failed; will try again");
                }
            }
        }
    }

    /// Moves queued messages into `pending`, unless the in-memory backlog is full (then callers
    /// wait: backpressure).
    fn drain(&mut self) {
        if self.pending_events >= self.shared.config.max_backlog {
            return;
        }
        let n = self.queue.take(&mut self.incoming);
        self.pending_events += n;
        self.shared
            .metrics
            .in_writer
            .fetch_add(n as u64, Ordering::Relaxed);
        self.pending.extend(self.incoming.drain(..));
    }

    /// Handles the first pending item: a control message, or one batch of events.
    async fn step(&mut self) {
        match self.pending.front() {
            None => {}
            Some(Msg::Event(_)) => {
                let max = self.shared.config.batch_size;
                let mut batch = Vec::with_capacity(max.min(self.pending_events));
                while batch.len() < max {
                    match self.pending.pop_front() {
                        Some(Msg::Event(e)) => batch.push(e),
                        Some(other) => {
                            self.pending.push_front(other);
                            break;
                        }
                        None => break,
                    }
                }
                self.write(batch).await;
            }
            Some(Msg::Flush(_) | Msg::Prune(_)) => match self.pending.pop_front() {
                Some(Msg::Flush(done)) => {
                    let _ = done.send(());
                }
                Some(Msg::Prune(done)) => {
                    let r = self.prune().await.map_err(Into::into);
                    let _ = done.send(r);
                }
                _ => {}
            },
        }
    }

    fn backlog(&self) -> usize {
        self.pending_events + self.queue.counts().0
    }

    /// Writes one batch, retrying until it commits or the shutdown deadline passes.
    async fn write(&mut self, batch: Vec<CallEvent>) {
        let n = batch.len();
        let batch_id: i64 = rand::random();
        let mut attempt: u32 = 0;
        loop {
            let result = if attempt == 0 {
                self.insert(&batch, batch_id).await
            } else {
                match self.already_committed(batch_id).await {
                    Ok(true) => Ok(()),
                    Ok(false) => self.insert(&batch, batch_id).await,
                    Err(e) => Err(e),
                }
            };
            let m = &self.shared.metrics;
            match result {
                Ok(()) => {
                    m.committed.fetch_add(n as u64, Ordering::Relaxed);
                    m.batches.fetch_add(1, Ordering::Relaxed);
                    m.in_writer.fetch_sub(n as u64, Ordering::Relaxed);
                    m.consecutive_failures.store(0, Ordering::Relaxed);
                    self.pending_events -= n;
                    self.since_checkpoint += n;
                    self.since_wal_restart += n;
                    if self.since_wal_restart >= RESTART_WAL_EVERY {
                        self.checkpoint_and_wait().await;
                    } else if self.since_checkpoint >= CHECKPOINT_EVERY {
                        self.checkpoint();
                    }
                    if attempt > 0 {
                        tracing::info!(
                            attempts = attempt + 1,
                            backlog = self.backlog(),
                            "apipool stats: database reachable again; writing the backlog"
                        );
                    }
                    return;
                }
                Err(e) => {
                    attempt += 1;
                    m.record_failure(e.to_string());
                    let backlog = self.backlog();
                    tracing::warn!(
                        error = %e,
                        attempt,
                        batch = n,
                        backlog,
                        "apipool stats: writing events failed; keeping them in memory and retrying"
                    );
                    let deadline = self.queue.closing().map(Instant::from_std);
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        self.give_up();
                        return;
                    }
                    let cfg = &self.shared.config;
                    let delay = cfg
                        .retry_min_backoff
                        .saturating_mul(1u32 << (attempt - 1).min(16))
                        .min(cfg.retry_max_backoff);
                    let mut until = Instant::now() + delay;
                    if let Some(d) = deadline {
                        until = until.min(d);
                    }
                    // Keep taking events while we wait, so callers are not blocked by the outage.
                    let queue = Arc::clone(&self.queue);
                    loop {
                        tokio::select! {
                            () = tokio::time::sleep_until(until) => break,
                            () = queue.notified() => self.drain(),
                        }
                    }
                    self.drain();
                }
            }
        }
    }

    /// Starts a WAL checkpoint on another connection unless one is running. SQLite allows a
    /// passive checkpoint next to a writer; its fsyncs then overlap with the next batches.
    fn checkpoint(&mut self) {
        if !self.shared.background_checkpoints
            || self.since_checkpoint == 0
            || self
                .checkpointing
                .as_ref()
                .is_some_and(|h| !h.is_finished())
        {
            return;
        }
        self.since_checkpoint = 0;
        let shared = Arc::clone(&self.shared);
        self.checkpointing = Some(tokio::spawn(async move {
            run_checkpoint(&shared).await;
        }));
    }

    /// Checkpoints while no transaction is open, so every frame is copied and the next
    /// transaction writes the WAL from its start again (bounding its size under constant load).
    async fn checkpoint_and_wait(&mut self) {
        if !self.shared.background_checkpoints {
            return;
        }
        if let Some(running) = self.checkpointing.take() {
            let _ = running.await;
        }
        run_checkpoint(&self.shared).await;
        self.since_checkpoint = 0;
        self.since_wal_restart = 0;
    }

    /// The shutdown deadline passed with the database still unreachable: drop what is left,
    /// loudly.
    fn give_up(&mut self) {
        self.drain();
        let mut rest = Vec::new();
        let queued = self.queue.take(&mut rest);
        let lost = self.pending_events + queued;
        let m = &self.shared.metrics;
        m.lost.fetch_add(lost as u64, Ordering::Relaxed);
        m.in_writer.store(0, Ordering::Relaxed);
        tracing::error!(
            lost,
            "apipool stats: the database stayed unreachable past the shutdown timeout; \
             these events were not stored"
        );
        self.pending.clear();
        self.pending_events = 0;
        self.gave_up = true;
    }

    async fn already_committed(&self, batch_id: i64) -> Result<bool, sqlx::Error> {
        let mut sql = Sql::new(
            self.shared.dialect,
            "SELECT COUNT(*) FROM apipool_stats_batches WHERE id = ",
        );
        sql.bind_i64(batch_id);
        let rows = self.shared.db.fetch(sql, &[super::db::Col::I64]).await?;
        Ok(rows.first().is_some_and(|r| r[0].i64() > 0))
    }

    fn values_statement(&mut self, d: Dialect, rows: usize) -> Arc<str> {
        self.statements
            .entry(rows)
            .or_insert_with(|| {
                let (insert, on_conflict) = insert_ignore(d);
                let mut s = String::with_capacity(80 + rows * 16);
                s.push_str(insert);
                s.push_str(" apipool_stats_events ");
                s.push_str(EVENT_COLUMNS);
                s.push_str(" VALUES ");
                for i in 0..rows {
                    if i > 0 {
                        s.push(',');
                    }
                    s.push_str("(?,?,?,?,?,?,?)");
                }
                s.push_str(on_conflict);
                Arc::from(s)
            })
            .clone()
    }

    async fn insert(&mut self, batch: &[CallEvent], batch_id: i64) -> Result<(), sqlx::Error> {
        let now = micros(self.shared.config.clock.now());
        let shared = Arc::clone(&self.shared);
        let d = shared.dialect;
        match &shared.db {
            #[cfg(feature = "sqlite")]
            StatsPool::Sqlite(p) => insert_values!(self, p, d, batch, batch_id, now),
            #[cfg(feature = "mysql")]
            StatsPool::MySql(p) => insert_values!(self, p, d, batch, batch_id, now),
            #[cfg(feature = "postgres")]
            StatsPool::Postgres(p) => insert_pg(p, batch, batch_id, now).await,
        }
    }

    /// One retention pass: by age, by row count, and old batch markers.
    async fn prune(&self) -> Result<PruneReport, sqlx::Error> {
        let db = &self.shared.db;
        let d = self.shared.dialect;
        let retention = self.shared.config.retention;
        let now = micros(self.shared.config.clock.now());
        let mut report = PruneReport::default();
        if let Some(age) = retention.max_age {
            let mut sql = Sql::new(d, "DELETE FROM apipool_stats_events WHERE finished_at < ");
            sql.bind_i64(now.saturating_sub(duration_micros(age)));
            report.by_age = db.execute(sql).await?;
        }
        if let Some(max_rows) = retention.max_rows {
            let mut sql = Sql::new(
                d,
                "SELECT id FROM apipool_stats_events ORDER BY id DESC LIMIT 1 OFFSET ",
            );
            sql.bind_i64(i64::try_from(max_rows).unwrap_or(i64::MAX));
            let rows = db.fetch(sql, &[super::db::Col::I64]).await?;
            if let Some(row) = rows.first() {
                let mut sql = Sql::new(d, "DELETE FROM apipool_stats_events WHERE id <= ");
                sql.bind_i64(row[0].i64());
                report.by_rows = db.execute(sql).await?;
            }
        }
        let mut sql = Sql::new(d, "DELETE FROM apipool_stats_batches WHERE committed_at < ");
        sql.bind_i64(now.saturating_sub(duration_micros(BATCH_MARKER_TTL)));
        db.execute(sql).await?;
        self.shared
            .metrics
            .pruned
            .fetch_add(report.by_age + report.by_rows, Ordering::Relaxed);
        if report.by_age + report.by_rows > 0 {
            tracing::debug!(?report, "apipool stats: pruned old events");
        }
        Ok(report)
    }
}

/// One statement per batch on PostgreSQL: the columns travel as arrays and `UNNEST` turns them
/// into rows.
#[cfg(feature = "postgres")]
async fn insert_pg(
    p: &sqlx::PgPool,
    batch: &[CallEvent],
    batch_id: i64,
    now: i64,
) -> Result<(), sqlx::Error> {
    let keys: Vec<&str> = batch.iter().map(|e| clip(&e.key_identifier)).collect();
    let statuses: Vec<i32> = batch.iter().map(|e| e.status.id()).collect();
    let finished: Vec<i64> = batch.iter().map(|e| micros(e.finished_at)).collect();
    let latencies: Vec<i64> = batch.iter().map(|e| duration_micros(e.latency)).collect();
    let methods: Vec<Option<&str>> = batch
        .iter()
        .map(|e| e.method.as_deref().map(clip))
        .collect();
    let pools: Vec<&str> = batch
        .iter()
        .map(|e| e.pool.as_deref().map_or("", clip))
        .collect();
    let dedups: Vec<Option<&str>> = batch
        .iter()
        .map(|e| e.dedup_id.as_deref().map(clip))
        .collect();
    let mut tx = p.begin().await?;
    sqlx::query(
        "INSERT INTO apipool_stats_events \
         (key_identifier, status_id, finished_at, latency_us, method, pool, dedup_id) \
         SELECT * FROM UNNEST($1::varchar[], $2::int4[], $3::int8[], $4::int8[], \
         $5::varchar[], $6::varchar[], $7::varchar[]) \
         ON CONFLICT DO NOTHING",
    )
    .bind(&keys)
    .bind(&statuses)
    .bind(&finished)
    .bind(&latencies)
    .bind(&methods)
    .bind(&pools)
    .bind(&dedups)
    .execute(&mut *tx)
    .await?;
    sqlx::query("INSERT INTO apipool_stats_batches (id, committed_at) VALUES ($1, $2)")
        .bind(batch_id)
        .bind(now)
        .execute(&mut *tx)
        .await?;
    tx.commit().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clip_keeps_char_boundaries() {
        let short = "abc";
        assert_eq!(clip(short), "abc");
        let long: String = "é".repeat(300);
        let c = clip(&long);
        assert_eq!(c.chars().count(), MAX_TEXT_CHARS);
        let arc: Arc<str> = Arc::from(long.as_str());
        assert_eq!(clip_arc(&arc).chars().count(), MAX_TEXT_CHARS);
    }

    #[test]
    fn micros_round_trips_both_sides_of_the_epoch() {
        let t = UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456);
        assert_eq!(micros(t), 1_700_000_000_123_456);
        let before = UNIX_EPOCH - Duration::from_micros(5);
        assert_eq!(micros(before), -5);
    }
}
