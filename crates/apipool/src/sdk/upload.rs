//! [`StatsUploader`]: a [`StatsSink`] that sends a local pool's call events to the server
//! (`POST /api/v1/stats/report`) in batches, at least once, each event with a de-duplication id
//! so a resent batch is never counted twice.

use super::session::error_from;
use super::{SdkError, Session, blocking};
use crate::status::{CallEvent, StatsSink};
use parking_lot::Mutex;
use serde_json::{Value, json};
use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};
use tokio_util::sync::CancellationToken;

/// Options of a [`StatsUploader`].
///
/// ```
/// use apipool::sdk::UploadOptions;
/// let o = UploadOptions::new().batch_size(200).interval(std::time::Duration::from_secs(2));
/// # let _ = o;
/// ```
#[derive(Debug, Clone)]
pub struct UploadOptions {
    batch_size: usize,
    interval: Duration,
    max_backoff: Duration,
    max_queue: usize,
    client_id: Option<String>,
    flush_when_full: bool,
}

impl Default for UploadOptions {
    fn default() -> Self {
        Self {
            batch_size: 500,
            interval: Duration::from_secs(5),
            max_backoff: Duration::from_secs(60),
            max_queue: 100_000,
            client_id: None,
            flush_when_full: true,
        }
    }
}

impl UploadOptions {
    /// Defaults: batches of 500, every 5 s, back off up to 60 s on errors, queue up to 100,000
    /// events.
    ///
    /// ```
    /// let _ = apipool::sdk::UploadOptions::new();
    /// ```
    pub fn new() -> Self {
        Self::default()
    }

    /// Events per request (at least 1).
    ///
    /// ```
    /// let _ = apipool::sdk::UploadOptions::new().batch_size(100);
    /// ```
    pub fn batch_size(mut self, n: usize) -> Self {
        self.batch_size = n.max(1);
        self
    }

    /// Time between uploads (a full batch goes at once).
    ///
    /// ```
    /// let _ = apipool::sdk::UploadOptions::new().interval(std::time::Duration::from_secs(1));
    /// ```
    pub fn interval(mut self, d: Duration) -> Self {
        self.interval = d.max(Duration::from_millis(10));
        self
    }

    /// The longest wait between retries while the server fails.
    ///
    /// ```
    /// let _ = apipool::sdk::UploadOptions::new().max_backoff(std::time::Duration::from_secs(30));
    /// ```
    pub fn max_backoff(mut self, d: Duration) -> Self {
        self.max_backoff = d;
        self
    }

    /// Events kept while the server is unreachable; beyond it the oldest are dropped (counted in
    /// [`UploadStats::dropped`] and logged).
    ///
    /// ```
    /// let _ = apipool::sdk::UploadOptions::new().max_queue(10_000);
    /// ```
    pub fn max_queue(mut self, n: usize) -> Self {
        self.max_queue = n.max(1);
        self
    }

    /// Upload as soon as a full batch is queued (default true); when false, only every
    /// `interval` and on [`StatsUploader::flush`].
    ///
    /// ```
    /// let _ = apipool::sdk::UploadOptions::new().flush_when_full(false);
    /// ```
    pub fn flush_when_full(mut self, on: bool) -> Self {
        self.flush_when_full = on;
        self
    }

    /// The `client_id` sent with each report (default: a random UUID per uploader).
    ///
    /// ```
    /// let _ = apipool::sdk::UploadOptions::new().client_id("worker-7");
    /// ```
    pub fn client_id(mut self, id: impl Into<String>) -> Self {
        self.client_id = Some(id.into());
        self
    }
}

/// Counters of a [`StatsUploader`].
///
/// ```no_run
/// # fn f(up: apipool::sdk::StatsUploader) {
/// let s: apipool::sdk::UploadStats = up.stats();
/// println!("{} uploaded, {} waiting, {} dropped", s.uploaded, s.queued, s.dropped);
/// # }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct UploadStats {
    /// Events the server acknowledged.
    pub uploaded: u64,
    /// Events waiting.
    pub queued: u64,
    /// Failed upload attempts (each retried).
    pub failed_attempts: u64,
    /// Events dropped because the queue was full.
    pub dropped: u64,
}

struct Inner {
    session: Session,
    pool: Arc<str>,
    client_id: String,
    opts: UploadOptions,
    queue: Mutex<VecDeque<Value>>,
    wake: tokio::sync::Notify,
    flush_lock: tokio::sync::Mutex<()>,
    stop: CancellationToken,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    uploaded: AtomicU64,
    failed: AtomicU64,
    dropped: AtomicU64,
}

/// Uploads a local pool's call events to apipool-server. Give it to the pool as its stats sink;
/// it queues each event (no I/O on the caller's path) and a background task on the SDK's runtime
/// posts batches. A batch stays queued until the server acknowledges it, and every event carries
/// a UUID `dedup_id`, so a retry after a lost answer is stored once.
///
/// ```no_run
/// # fn run(session: apipool::sdk::Session) -> Result<(), Box<dyn std::error::Error>> {
/// use apipool::sdk::{StatsUploader, UploadOptions};
/// let uploader = StatsUploader::start(&session, "prices", UploadOptions::new());
/// let pool = apipool::ApiKeyManager::builder()
///     .keys([apipool::http::HttpKey::bearer("k1")])
///     .stats(uploader.clone())
///     .build()?;
/// // ... calls ...
/// uploader.shutdown(); // flushes what is left
/// # let _ = pool; Ok(()) }
/// ```
#[derive(Clone)]
pub struct StatsUploader {
    inner: Arc<Inner>,
}

impl fmt::Debug for StatsUploader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StatsUploader")
            .field("pool", &self.inner.pool)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

fn epoch_secs(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The wire form of one event (`dedup_id` added when the pool did not set one).
pub(crate) fn event_json(e: &CallEvent) -> Value {
    let dedup = e
        .dedup_id
        .as_deref()
        .map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_owned);
    json!({
        "key_identifier": &*e.key_identifier,
        "status": e.status.description(),
        "latency": e.latency.as_secs_f64(),
        "method": e.method.as_deref(),
        "finished_at": epoch_secs(e.finished_at),
        "dedup_id": dedup,
    })
}

impl StatsUploader {
    /// Starts an uploader for `pool` on the SDK's private runtime (works from sync and async
    /// code alike).
    ///
    /// ```no_run
    /// # fn run(session: apipool::sdk::Session) {
    /// let up = apipool::sdk::StatsUploader::start(&session, "prices", Default::default());
    /// # let _ = up; }
    /// ```
    pub fn start(session: &Session, pool: &str, opts: UploadOptions) -> Self {
        let inner = Arc::new(Inner {
            session: session.clone(),
            pool: Arc::from(pool),
            client_id: opts
                .client_id
                .clone()
                .unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
            opts,
            queue: Mutex::new(VecDeque::new()),
            wake: tokio::sync::Notify::new(),
            flush_lock: tokio::sync::Mutex::new(()),
            stop: CancellationToken::new(),
            task: Mutex::new(None),
            uploaded: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        });
        let task = blocking::runtime().spawn(run(inner.clone()));
        *inner.task.lock() = Some(task);
        Self { inner }
    }

    /// The uploader's counters.
    ///
    /// ```no_run
    /// # fn f(up: apipool::sdk::StatsUploader) { println!("{} uploaded", up.stats().uploaded); }
    /// ```
    pub fn stats(&self) -> UploadStats {
        UploadStats {
            uploaded: self.inner.uploaded.load(Ordering::Relaxed),
            queued: self.inner.queue.lock().len() as u64,
            failed_attempts: self.inner.failed.load(Ordering::Relaxed),
            dropped: self.inner.dropped.load(Ordering::Relaxed),
        }
    }

    /// Uploads everything queued now; returns the first error (what failed stays queued).
    ///
    /// ```no_run
    /// # async fn run(up: apipool::sdk::StatsUploader) -> Result<(), apipool::sdk::SdkError> {
    /// up.aflush().await?;
    /// # Ok(()) }
    /// ```
    pub async fn aflush(&self) -> Result<(), SdkError> {
        let inner = self.inner.clone();
        blocking::runtime()
            .spawn(async move { flush_all(&inner).await })
            .await
            .unwrap_or_else(|e| {
                Err(SdkError::InvalidArgument(format!(
                    "upload task failed: {e}"
                )))
            })
    }

    /// Sync twin of [`Self::aflush`].
    ///
    /// ```no_run
    /// # fn run(up: apipool::sdk::StatsUploader) -> Result<(), apipool::sdk::SdkError> {
    /// up.flush()?;
    /// # Ok(()) }
    /// ```
    pub fn flush(&self) -> Result<(), SdkError> {
        let inner = self.inner.clone();
        blocking::wait(async move { flush_all(&inner).await })
    }

    /// Stops the background task and flushes what is left (one attempt per batch). Events that
    /// still could not be sent are counted in [`UploadStats::queued`].
    ///
    /// ```no_run
    /// # async fn run(up: apipool::sdk::StatsUploader) { up.ashutdown().await; }
    /// ```
    pub async fn ashutdown(&self) {
        self.inner.stop.cancel();
        let task = self.inner.task.lock().take();
        if let Some(t) = task {
            let _ = t.await;
        }
        if let Err(e) = self.aflush().await {
            tracing::warn!(pool = %self.inner.pool, queued = self.stats().queued, "stats upload at shutdown failed: {e}");
        }
    }

    /// Sync twin of [`Self::ashutdown`].
    ///
    /// ```no_run
    /// # fn run(up: apipool::sdk::StatsUploader) { up.shutdown(); }
    /// ```
    pub fn shutdown(&self) {
        let me = self.clone();
        blocking::wait(async move { me.ashutdown().await });
    }
}

impl StatsSink for StatsUploader {
    fn record(&self, event: CallEvent) {
        let v = event_json(&event);
        let mut q = self.inner.queue.lock();
        q.push_back(v);
        if q.len() > self.inner.opts.max_queue {
            q.pop_front();
            let n = self.inner.dropped.fetch_add(1, Ordering::Relaxed);
            if n.is_power_of_two() {
                tracing::warn!(pool = %self.inner.pool, dropped = n + 1, "stats upload queue full: dropping the oldest events");
            }
        }
        let full = self.inner.opts.flush_when_full && q.len() >= self.inner.opts.batch_size;
        drop(q);
        if full {
            self.inner.wake.notify_one();
        }
    }
}

async fn run(inner: Arc<Inner>) {
    let mut backoff = inner.opts.interval;
    loop {
        tokio::select! {
            biased;
            () = inner.stop.cancelled() => return,
            () = inner.wake.notified() => {}
            () = tokio::time::sleep(backoff) => {}
        }
        match flush_all(&inner).await {
            Ok(()) => backoff = inner.opts.interval,
            Err(e) => {
                backoff = (backoff * 2).min(inner.opts.max_backoff.max(inner.opts.interval));
                tracing::warn!(pool = %inner.pool, retry_in = ?backoff, "stats upload failed, will retry: {e}");
            }
        }
    }
}

/// Sends queued events batch by batch; a batch leaves the queue only once acknowledged.
async fn flush_all(inner: &Inner) -> Result<(), SdkError> {
    let _one_at_a_time = inner.flush_lock.lock().await;
    loop {
        let batch: Vec<Value> = {
            let q = inner.queue.lock();
            q.iter().take(inner.opts.batch_size).cloned().collect()
        };
        if batch.is_empty() {
            return Ok(());
        }
        let n = batch.len();
        if let Err(e) = post(inner, batch).await {
            inner.failed.fetch_add(1, Ordering::Relaxed);
            return Err(e);
        }
        // Only this task removes from the front (under flush_lock), and the queue only drops its
        // oldest when over capacity, so the first `n` may already be partly gone: drain at most n.
        let mut q = inner.queue.lock();
        let k = n.min(q.len());
        q.drain(..k);
        drop(q);
        inner.uploaded.fetch_add(n as u64, Ordering::Relaxed);
    }
}

async fn post(inner: &Inner, events: Vec<Value>) -> Result<(), SdkError> {
    let url = inner.session.url(&["stats", "report"]);
    let body = json!({
        "pool_identifier": &*inner.pool,
        "client_id": inner.client_id,
        "events": events,
    });
    let resp = inner
        .session
        .send(|c| c.post(url.clone()).json(&body))
        .await?;
    if !resp.status().is_success() {
        return Err(error_from(resp).await);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::CallStatus;

    #[test]
    fn events_get_a_dedup_id_and_no_secret() {
        let e = CallEvent {
            key_identifier: Arc::from("cg-1"),
            status: CallStatus::ReachLimit,
            latency: Duration::from_millis(1500),
            method: Some(Arc::from("GET /price")),
            finished_at: SystemTime::UNIX_EPOCH + Duration::from_secs(10),
            pool: None,
            dedup_id: None,
        };
        let v = event_json(&e);
        assert_eq!(v["status"], "reach limit");
        assert_eq!(v["latency"], 1.5);
        assert_eq!(v["finished_at"], 10.0);
        assert_eq!(v["key_identifier"], "cg-1");
        let id = v["dedup_id"].as_str().unwrap();
        assert!(uuid::Uuid::parse_str(id).is_ok());
        let again = event_json(&CallEvent {
            dedup_id: Some(Arc::from("fixed")),
            ..e
        });
        assert_eq!(again["dedup_id"], "fixed");
    }
}
