//! Collector settings, retention and the wall clock used for "recent" windows.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// The wall clock the collector reads for "recent N seconds" windows and for retention.
///
/// Events carry their own `finished_at`; the clock only decides what "now" is for queries.
/// Tests use [`ManualWallClock`] instead of sleeping.
pub trait WallClock: Send + Sync + 'static {
    /// The current wall-clock time.
    fn now(&self) -> SystemTime;
}

/// The real clock ([`SystemTime::now`]).
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemWallClock;

impl WallClock for SystemWallClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A clock that only moves when told to (for tests and replays).
#[derive(Debug)]
pub struct ManualWallClock {
    now: parking_lot::Mutex<SystemTime>,
}

impl ManualWallClock {
    /// A clock stopped at `start`.
    pub fn new(start: SystemTime) -> Self {
        Self {
            now: parking_lot::Mutex::new(start),
        }
    }

    /// Moves the clock to `t` (backwards is allowed).
    pub fn set(&self, t: SystemTime) {
        *self.now.lock() = t;
    }

    /// Moves the clock forward by `d`.
    pub fn advance(&self, d: Duration) {
        *self.now.lock() += d;
    }
}

impl WallClock for ManualWallClock {
    fn now(&self) -> SystemTime {
        *self.now.lock()
    }
}

/// How much history the collector keeps. Pruning runs in the background every
/// [`StatsConfig::prune_interval`], and on demand with [`crate::stats::StatsCollector::prune`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retention {
    /// Delete events that finished longer ago than this.
    pub max_age: Option<Duration>,
    /// Keep at most this many events (the oldest inserted go first).
    pub max_rows: Option<u64>,
}

impl Retention {
    /// Keeps everything (the default).
    pub const KEEP_ALL: Retention = Retention {
        max_age: None,
        max_rows: None,
    };

    /// Deletes events older than `max_age`.
    pub fn max_age(mut self, max_age: Duration) -> Self {
        self.max_age = Some(max_age);
        self
    }

    /// Keeps at most `max_rows` events.
    pub fn max_rows(mut self, max_rows: u64) -> Self {
        self.max_rows = Some(max_rows);
        self
    }
}

/// Settings of a [`crate::stats::StatsCollector`]. `StatsConfig::default()` suits most uses.
#[derive(Clone)]
pub struct StatsConfig {
    /// Events the caller-side buffer holds before `record` waits for the writer (backpressure).
    /// Default 65,536.
    pub queue_capacity: usize,
    /// Events the writer keeps in memory while the database is unreachable. When this and the
    /// queue are both full, `record` waits: events are never dropped. Default 1,000,000.
    pub max_backlog: usize,
    /// Events per transaction. Default 5,000.
    pub batch_size: usize,
    /// How long the writer waits after the first event of an idle period so a batch can form.
    /// `flush` and queries skip the wait. Default 5 ms; zero writes at once.
    pub linger: Duration,
    /// What to delete, and when. Default: keep everything.
    pub retention: Retention,
    /// How often the background pruning runs. Default 60 s.
    pub prune_interval: Duration,
    /// First delay before retrying a failed write; doubles up to `retry_max_backoff`.
    /// Default 50 ms.
    pub retry_min_backoff: Duration,
    /// Longest delay between write retries. Default 5 s.
    pub retry_max_backoff: Duration,
    /// How long `flush` (and the flush before each query) waits. Default 120 s.
    pub flush_timeout: Duration,
    /// How long closing or dropping the collector waits for the backlog to be written before it
    /// gives up and logs how many events were lost. Default 30 s.
    pub shutdown_timeout: Duration,
    /// Time allowed to connect to the database. Default 10 s.
    pub connect_timeout: Duration,
    /// Connections in the pool (one is used by the writer, the rest by queries). Default 4;
    /// `sqlite::memory:` always uses exactly one shared connection.
    pub max_connections: u32,
    /// Flush before every query so a query sees every event recorded before it (read your
    /// writes). Default `true`.
    pub flush_before_query: bool,
    /// The clock for "recent" windows and retention. Default [`SystemWallClock`].
    pub clock: Arc<dyn WallClock>,
}

impl Default for StatsConfig {
    fn default() -> Self {
        Self {
            queue_capacity: 65_536,
            max_backlog: 1_000_000,
            batch_size: 5_000,
            linger: Duration::from_millis(5),
            retention: Retention::KEEP_ALL,
            prune_interval: Duration::from_secs(60),
            retry_min_backoff: Duration::from_millis(50),
            retry_max_backoff: Duration::from_secs(5),
            flush_timeout: Duration::from_secs(120),
            shutdown_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            max_connections: 4,
            flush_before_query: true,
            clock: Arc::new(SystemWallClock),
        }
    }
}

impl StatsConfig {
    /// Sets [`StatsConfig::queue_capacity`].
    pub fn queue_capacity(mut self, n: usize) -> Self {
        self.queue_capacity = n.max(1);
        self
    }

    /// Sets [`StatsConfig::max_backlog`].
    pub fn max_backlog(mut self, n: usize) -> Self {
        self.max_backlog = n.max(1);
        self
    }

    /// Sets [`StatsConfig::batch_size`].
    pub fn batch_size(mut self, n: usize) -> Self {
        self.batch_size = n.max(1);
        self
    }

    /// Sets [`StatsConfig::linger`].
    pub fn linger(mut self, d: Duration) -> Self {
        self.linger = d;
        self
    }

    /// Sets [`StatsConfig::retention`].
    pub fn retention(mut self, r: Retention) -> Self {
        self.retention = r;
        self
    }

    /// Sets [`StatsConfig::prune_interval`].
    pub fn prune_interval(mut self, d: Duration) -> Self {
        self.prune_interval = d;
        self
    }

    /// Sets the retry backoff range.
    pub fn retry_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.retry_min_backoff = min;
        self.retry_max_backoff = max.max(min);
        self
    }

    /// Sets [`StatsConfig::flush_timeout`].
    pub fn flush_timeout(mut self, d: Duration) -> Self {
        self.flush_timeout = d;
        self
    }

    /// Sets [`StatsConfig::shutdown_timeout`].
    pub fn shutdown_timeout(mut self, d: Duration) -> Self {
        self.shutdown_timeout = d;
        self
    }

    /// Sets [`StatsConfig::connect_timeout`].
    pub fn connect_timeout(mut self, d: Duration) -> Self {
        self.connect_timeout = d;
        self
    }

    /// Sets [`StatsConfig::max_connections`].
    pub fn max_connections(mut self, n: u32) -> Self {
        self.max_connections = n.max(1);
        self
    }

    /// Sets [`StatsConfig::flush_before_query`].
    pub fn flush_before_query(mut self, on: bool) -> Self {
        self.flush_before_query = on;
        self
    }

    /// Sets [`StatsConfig::clock`].
    pub fn clock(mut self, clock: Arc<dyn WallClock>) -> Self {
        self.clock = clock;
        self
    }
}

impl fmt::Debug for StatsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StatsConfig")
            .field("queue_capacity", &self.queue_capacity)
            .field("max_backlog", &self.max_backlog)
            .field("batch_size", &self.batch_size)
            .field("linger", &self.linger)
            .field("retention", &self.retention)
            .field("prune_interval", &self.prune_interval)
            .field("retry_min_backoff", &self.retry_min_backoff)
            .field("retry_max_backoff", &self.retry_max_backoff)
            .field("flush_timeout", &self.flush_timeout)
            .field("shutdown_timeout", &self.shutdown_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("max_connections", &self.max_connections)
            .field("flush_before_query", &self.flush_before_query)
            .finish_non_exhaustive()
    }
}
