//! The Redis key-state store: one pool's key state shared by every process (and host) that builds
//! the pool with the same Redis URL, prefix and pool name.
//!
//! What lives in Redis (see `lua/common.lua` for the key layout): per-key sliding windows of
//! finished calls, leases in flight scored by expiry (a process that dies leaves leases that expire
//! after `lease_ttl`), health (cooling/banned until, archived, disabled, consecutive failures) and
//! quota scopes. The rules are Lua scripts run atomically with Redis `TIME`, so clock skew between
//! hosts does not matter; Rust only marshals. One acquire and one report are one round trip each
//! (`EVALSHA`, scripts loaded when the pool is built and reloaded by `redis::Script` on `NOSCRIPT`).
//!
//! What stays local: the preference order of the candidates (the pool's strategy, from this
//! process's own view), the slots, and a full in-process engine used only when Redis is down and
//! the pool fails open. Limits learned from 429s are not shared: configure limits for pools used by
//! several processes (cooldowns after a 429 are shared).
//!
//! Calls are synchronous on a small pool of blocking connections. Reports go to Redis from one
//! background thread, in order: a success does not wait for it, an outcome that changes a key's
//! health (429, failure, invalid key) does, so other processes see it when `report` returns. The
//! async shell asks for a key, and reports such an outcome, from the runtime's blocking pool
//! (`spawn_blocking`), so a round trip (~0.1–0.2 ms on loopback, see `docs/BENCHMARKS.md`; as
//! long as Redis takes) never holds a runtime worker. Acquires of one pool in one process take turns
//! (one round trip at a time), and when Redis answers "nothing is free before t" the process's
//! other waiters take that answer without asking again: a free place costs each process about
//! one round trip, not one per waiting task.

use super::{Grant, KeyChange, KeyStateStore, MemoryStore, Token, TokenKind};
use crate::config::{RateLimit, Strategy};
use crate::engine::{ArchiveReason, CoolReason, KeyReport, KeyState, Settings};
use crate::error::Error;
use crate::outcome::Outcome;
use ::redis::{Client, Connection, RedisError, Script};
use parking_lot::Mutex;
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

/// What a pool does while its Redis cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnUnavailable {
    /// No calls: acquiring a key fails at once with [`Error::StoreUnavailable`] until Redis is
    /// back. The safe choice when overdrawing a quota costs money or gets keys banned.
    #[default]
    FailClosed,
    /// Carry on with this process's own key state (limits then hold per process, not across the
    /// fleet), with one warning per outage.
    FailOpen,
}

/// Where and how a pool shares its key state on Redis (feature `redis`).
///
/// Every process built with the same URL, [`prefix`](Self::prefix) and pool
/// [`name`](crate::ApiKeyManagerBuilder::name) shares the keys' limits, leases, cooldowns, bans and
/// hand-made changes.
///
/// ```no_run
/// use apipool::{ApiKeyManager, OnUnavailable, RateLimit, RedisStoreConfig};
/// # use apipool::ApiKey;
/// # struct Key(String);
/// # impl ApiKey for Key {
/// #     type Client = String;
/// #     fn primary_key(&self) -> &str { &self.0 }
/// #     fn create_client(&self) -> String { self.0.clone() }
/// # }
/// # fn main() -> Result<(), apipool::Error> {
/// let pool = ApiKeyManager::builder()
///     .name("coingecko")
///     .keys((0..10).map(|i| Key(format!("secret-{i}"))))
///     .rate_limit(RateLimit::per_second(20)?)
///     .redis(
///         RedisStoreConfig::new("redis://127.0.0.1:6379")?
///             .prefix("myapp")
///             .on_unavailable(OnUnavailable::FailClosed),
///     )
///     .build()?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisStoreConfig {
    client: Client,
    endpoint: String,
    prefix: String,
    lease_ttl: Option<Duration>,
    on_unavailable: OnUnavailable,
    connect_timeout: Duration,
    io_timeout: Duration,
    retry_interval: Duration,
    release_poll: Duration,
    max_idle: usize,
}

impl fmt::Debug for RedisStoreConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The URL may carry a password: only the endpoint is shown.
        f.debug_struct("RedisStoreConfig")
            .field("endpoint", &self.endpoint)
            .field("prefix", &self.prefix)
            .field("lease_ttl", &self.lease_ttl)
            .field("on_unavailable", &self.on_unavailable)
            .finish_non_exhaustive()
    }
}

impl RedisStoreConfig {
    /// Parses a Redis URL (`redis://[user:password@]host:port[/db]`, `rediss://` for TLS where the
    /// client supports it, `unix:///path`). Nothing connects until the pool is built.
    pub fn new(url: &str) -> Result<Self, Error> {
        let client = Client::open(url).map_err(|e| Error::InvalidStore {
            reason: format!(
                "not a Redis URL ({:?}); expected redis://host:port",
                e.kind()
            ),
        })?;
        let endpoint = client.get_connection_info().addr().to_string();
        Ok(Self {
            client,
            endpoint,
            prefix: "apipool".to_owned(),
            lease_ttl: None,
            on_unavailable: OnUnavailable::default(),
            connect_timeout: Duration::from_secs(1),
            io_timeout: Duration::from_secs(2),
            retry_interval: Duration::from_millis(500),
            release_poll: Duration::from_millis(20),
            max_idle: 32,
        })
    }

    /// The namespace of every Redis key the pool writes (default `apipool`): keys are
    /// `{prefix}:{pool}:key:{identifier}:…`. Use one prefix per application or test.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// How long a lease lives in Redis if its holder dies without reporting (default: the pool's
    /// call timeout + 5 s). A lease of a dead process holds its key's place until then.
    pub fn lease_ttl(mut self, ttl: Duration) -> Self {
        self.lease_ttl = Some(ttl);
        self
    }

    /// What to do while Redis is unreachable (default [`OnUnavailable::FailClosed`]).
    pub fn on_unavailable(mut self, mode: OnUnavailable) -> Self {
        self.on_unavailable = mode;
        self
    }

    /// How long to wait for a connection to Redis (default 1 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long to wait for one Redis answer (default 2 s).
    pub fn io_timeout(mut self, timeout: Duration) -> Self {
        self.io_timeout = timeout;
        self
    }

    /// After a failure, how long calls skip Redis before the next reconnect attempt (default
    /// 0.5 s), so an outage costs no connect timeout per call.
    pub fn retry_interval(mut self, interval: Duration) -> Self {
        self.retry_interval = interval;
        self
    }

    /// How soon a waiting pool asks Redis again at the latest (default 20 ms): keys freed by other
    /// processes (a call finished under an in-flight cap, a key enabled by hand) are seen that
    /// soon. Releases in this process wake its waiters at once.
    pub fn release_poll(mut self, poll: Duration) -> Self {
        self.release_poll = poll;
        self
    }

    /// The Redis endpoint (host:port), safe to log.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    fn validate(&self) -> Result<(), Error> {
        let bad = |reason: &str| {
            Err(Error::InvalidStore {
                reason: reason.to_owned(),
            })
        };
        if self.prefix.is_empty() || self.prefix.chars().any(char::is_whitespace) {
            return bad("the Redis key prefix must be non-empty and contain no whitespace");
        }
        if self.lease_ttl.is_some_and(|t| t < Duration::from_millis(1)) {
            return bad("lease_ttl must be at least 1 ms");
        }
        if self.connect_timeout.is_zero() || self.io_timeout.is_zero() {
            return bad("Redis connect and I/O timeouts must be positive");
        }
        if self.release_poll.is_zero() {
            return bad("release_poll must be positive");
        }
        Ok(())
    }
}

/// The scripts, loaded once per process (`redis::Script` keeps the SHA1 and reloads on NOSCRIPT).
struct Scripts {
    acquire: Script,
    report: Script,
    change: Script,
    inspect: Script,
}

macro_rules! lua {
    ($file:literal) => {
        Script::new(concat!(
            include_str!("lua/common.lua"),
            "\n",
            include_str!(concat!("lua/", $file))
        ))
    };
}

impl Scripts {
    fn new() -> Self {
        Self {
            acquire: lua!("acquire.lua"),
            report: lua!("report.lua"),
            change: lua!("change.lua"),
            inspect: lua!("inspect.lua"),
        }
    }
}

/// Outcome codes of `report.lua`.
fn outcome_code(outcome: Option<Outcome>, now: Instant) -> (i64, i64, bool) {
    let us = |d: Duration| i64::try_from(d.as_micros()).unwrap_or(i64::MAX);
    match outcome {
        None => (0, -1, false),
        Some(Outcome::Success) => (1, -1, false),
        Some(Outcome::RateLimited {
            retry_after,
            scope_wide,
        }) => (2, retry_after.map_or(-1, us), scope_wide),
        Some(Outcome::QuotaExhausted { until }) => (
            3,
            until.map_or(-1, |t| us(t.saturating_duration_since(now))),
            false,
        ),
        Some(Outcome::InvalidKey) => (4, -1, false),
        Some(Outcome::Failed | Outcome::Timeout) => (5, -1, false),
        Some(Outcome::NotKeyRelated) => (6, -1, false),
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn horizon(limits: &[RateLimit]) -> u64 {
    limits
        .iter()
        .map(|l| micros(l.effective_interval()))
        .max()
        .unwrap_or(0)
}

fn push_limits(out: &mut Vec<String>, limits: &[RateLimit]) {
    out.push(limits.len().to_string());
    for l in limits {
        out.push(l.limit().to_string());
        out.push(micros(l.effective_interval()).to_string());
    }
}

#[derive(Debug)]
struct Slot {
    id: Arc<str>,
    weight: u32,
    scope: Option<usize>,
    live: bool,
    gen_: u64,
    in_flight: u32,
    last_used: u64,
}

#[derive(Debug)]
struct ScopeDef {
    name: Arc<str>,
    limits: Vec<RateLimit>,
    max_in_flight: u32,
}

/// A lease this process holds in Redis.
#[derive(Debug)]
struct Held {
    slot: u32,
    gen_: u64,
    id: Arc<str>,
    scope: Option<usize>,
}

/// This process's view: slots, its own leases, the strategy's cursor, the settings it sends.
#[derive(Debug)]
struct View {
    slots: Vec<Slot>,
    leases: HashMap<u64, Held>,
    scopes: Vec<ScopeDef>,
    settings: Settings,
    strategy: Strategy,
    next_rr: u32,
    seq: u64,
    rng: SmallRng,
    /// How long a lease outlives a process that died holding it (from the config, else the
    /// pool's call timeout + 5 s, following the timeout when the pool's config changes).
    lease_ttl: Duration,
    /// The settings header of acquire/inspect calls (after the lease id), rebuilt on changes.
    header: Vec<String>,
}

impl View {
    fn scope_idx(&mut self, name: &str) -> usize {
        if let Some(i) = self.scopes.iter().position(|s| &*s.name == name) {
            return i;
        }
        self.scopes.push(ScopeDef {
            name: Arc::from(name),
            limits: Vec::new(),
            max_in_flight: 0,
        });
        self.scopes.len() - 1
    }

    fn rebuild_header(&mut self, poll: Duration, base: &str) {
        let mut h = vec![
            micros(self.lease_ttl).to_string(),
            micros(poll).to_string(),
            base.to_owned(),
            self.settings.max_in_flight.to_string(),
        ];
        push_limits(&mut h, &self.settings.limits);
        h.push(self.scopes.len().to_string());
        for s in &self.scopes {
            h.push(s.name.to_string());
            h.push(s.max_in_flight.to_string());
            push_limits(&mut h, &s.limits);
        }
        self.header = h;
    }

    /// Live slots in this process's order of preference; keys in `avoid` go last (a retry lands
    /// on another key when one is free, on an avoided one rather than wait).
    fn order(&mut self, avoid: &[u32]) -> Vec<u32> {
        let live: Vec<u32> = (0..self.slots.len())
            .filter(|&i| self.slots[i].live)
            .map(|i| u32::try_from(i).unwrap_or(u32::MAX))
            .collect();
        if live.is_empty() {
            return live;
        }
        let rotate = |mut v: Vec<u32>, start: usize| {
            v.rotate_left(start);
            v
        };
        let mut order = match self.strategy {
            Strategy::LeastUsed => {
                let mut v = live;
                v.sort_by_key(|&i| {
                    let s = &self.slots[i as usize];
                    (s.in_flight, s.last_used)
                });
                v
            }
            Strategy::RoundRobin => {
                let start = live.iter().position(|&i| i >= self.next_rr).unwrap_or(0);
                rotate(live, start)
            }
            Strategy::Random => {
                let start = self.rng.random_range(0..live.len());
                rotate(live, start)
            }
            Strategy::Weighted => {
                let total: u64 = live
                    .iter()
                    .map(|&i| u64::from(self.slots[i as usize].weight))
                    .sum();
                let mut r = self.rng.random_range(0..total.max(1));
                let mut start = 0;
                for (pos, &i) in live.iter().enumerate() {
                    let w = u64::from(self.slots[i as usize].weight);
                    if r < w {
                        start = pos;
                        break;
                    }
                    r -= w;
                }
                rotate(live, start)
            }
        };
        if !avoid.is_empty() {
            order.sort_by_key(|i| avoid.contains(i));
        }
        order
    }
}

#[derive(Debug)]
struct LinkState {
    retry_at: Instant,
    reason: String,
}

/// The connection to Redis: pooled blocking connections, the scripts, the outage state.
/// Shared by the callers and the report thread.
struct Link {
    conf: RedisStoreConfig,
    scripts: Scripts,
    conns: Mutex<Vec<Connection>>,
    down: AtomicBool,
    state: Mutex<LinkState>,
}

/// Work for the report thread, done in order.
enum Job {
    /// Runs `report.lua` with these arguments; answers on the channel when done (if any).
    Report(Vec<String>, Option<mpsc::SyncSender<()>>),
    /// Answers once every earlier job is done.
    Flush(mpsc::SyncSender<()>),
}

/// The shared store. See the module docs.
pub(crate) struct RedisStore {
    fallback: MemoryStore,
    link: Arc<Link>,
    base: String,
    /// Reports go through one thread, in order: a success returns at once (its lease keeps its
    /// place until the report lands, which only errs on the safe side); outcomes that change a
    /// key's health wait for Redis, so every process sees them when `report` returns.
    reports: mpsc::Sender<Job>,
    view: Mutex<View>,
    owner: String,
    serial: AtomicU64,
    /// One acquire round trip at a time per process: when Redis said "nothing is free before
    /// t", the other waiters of this process take that answer from `gate` instead of asking again
    /// (without this, every waiter of every process wakes at t and asks Redis at once).
    probe: Mutex<()>,
    /// No key is free before `.0` (Redis's answer); trusted until `.1` (at most `release_poll`).
    gate: Mutex<Option<(Instant, Instant)>>,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("endpoint", &self.link.conf.endpoint)
            .field("base", &self.base)
            .field("down", &self.link.down.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Link {
    fn unavailable(&self, reason: &str) -> Error {
        Error::StoreUnavailable {
            endpoint: self.conf.endpoint.clone(),
            reason: reason.to_owned(),
        }
    }

    fn connect(&self) -> Result<Connection, RedisError> {
        let con = self
            .conf
            .client
            .get_connection_with_timeout(self.conf.connect_timeout)?;
        con.set_read_timeout(Some(self.conf.io_timeout))?;
        con.set_write_timeout(Some(self.conf.io_timeout))?;
        Ok(con)
    }

    fn give_back(&self, con: Connection) {
        let mut conns = self.conns.lock();
        if conns.len() < self.conf.max_idle {
            conns.push(con);
        }
    }

    fn mark_down(&self, e: &RedisError) -> Error {
        let reason = e.to_string();
        let mut link = self.state.lock();
        if !self.down.swap(true, Ordering::AcqRel) {
            let consequence = match self.conf.on_unavailable {
                OnUnavailable::FailClosed => "fail closed: calls are refused until it is back",
                OnUnavailable::FailOpen => {
                    "fail open: using this process's own key state (limits hold per process only) until it is back"
                }
            };
            tracing::warn!(
                endpoint = %self.conf.endpoint,
                error = %reason,
                "the Redis key-state store is unreachable; {consequence}"
            );
        }
        link.retry_at = Instant::now() + self.conf.retry_interval;
        link.reason.clone_from(&reason);
        self.unavailable(&reason)
    }

    fn mark_up(&self) {
        if self.down.load(Ordering::Acquire) && self.down.swap(false, Ordering::AcqRel) {
            tracing::info!(endpoint = %self.conf.endpoint, "the Redis key-state store is reachable again");
        }
    }

    /// Runs `f` on a pooled connection. A dead pooled connection (Redis restarted) is replaced and
    /// `f` retried once; other failures mark the store down until `retry_interval` has passed.
    fn run<T>(&self, f: impl Fn(&mut Connection) -> Result<T, RedisError>) -> Result<T, Error> {
        if self.down.load(Ordering::Acquire) {
            let link = self.state.lock();
            if Instant::now() < link.retry_at {
                return Err(self.unavailable(&link.reason));
            }
        }
        let pooled = self.conns.lock().pop();
        let (mut con, was_pooled) = match pooled {
            Some(c) => (c, true),
            None => match self.connect() {
                Ok(c) => (c, false),
                Err(e) => return Err(self.mark_down(&e)),
            },
        };
        let result = match f(&mut con) {
            Err(e) if was_pooled && (e.is_io_error() || e.is_connection_dropped()) => {
                self.conns.lock().clear();
                match self.connect() {
                    Ok(c) => {
                        con = c;
                        f(&mut con)
                    }
                    Err(e) => Err(e),
                }
            }
            r => r,
        };
        match result {
            Ok(v) => {
                self.give_back(con);
                self.mark_up();
                Ok(v)
            }
            Err(e) => {
                if !(e.is_io_error() || e.is_timeout() || e.is_connection_dropped()) {
                    tracing::error!(endpoint = %self.conf.endpoint, error = %e, "a Redis key-state script failed");
                }
                Err(self.mark_down(&e))
            }
        }
    }

    /// The report thread: runs jobs in order until the store is dropped.
    fn report_loop(&self, jobs: &mpsc::Receiver<Job>) {
        while let Ok(job) = jobs.recv() {
            match job {
                Job::Report(args, done) => {
                    let r: Result<i64, Error> =
                        self.run(|con| self.scripts.report.arg(&args).invoke(con));
                    if let Err(e) = r {
                        // The lease expires by itself after lease_ttl; the outcome is lost for
                        // other processes.
                        tracing::debug!(error = %e, "a report did not reach Redis");
                    }
                    if let Some(done) = done {
                        let _ = done.send(());
                    }
                }
                Job::Flush(done) => {
                    let _ = done.send(());
                }
            }
        }
    }
}

impl RedisStore {
    /// A store for pool `pool`; `fallback` holds the same settings and strategy and serves while
    /// Redis is down when the pool fails open. Connects and loads the scripts now; an unreachable
    /// Redis is not an error here (the pool reconnects by itself), only logged.
    pub(crate) fn new(
        conf: RedisStoreConfig,
        fallback: MemoryStore,
        pool: &str,
        call_timeout: Duration,
        seed: Option<u64>,
    ) -> Result<Self, Error> {
        conf.validate()?;
        if pool.is_empty() || pool.chars().any(char::is_whitespace) {
            return Err(Error::InvalidStore {
                reason:
                    "the pool name used in Redis keys must be non-empty and contain no whitespace"
                        .to_owned(),
            });
        }
        let base = format!("{}:{pool}:", conf.prefix);
        let lease_ttl = conf
            .lease_ttl
            .unwrap_or(call_timeout + Duration::from_secs(5));
        let settings = fallback.settings();
        let strategy = fallback.strategy();
        let rng = SmallRng::seed_from_u64(seed.unwrap_or_else(rand::random));
        let mut view = View {
            slots: Vec::new(),
            leases: HashMap::new(),
            scopes: Vec::new(),
            settings,
            strategy,
            next_rr: 0,
            seq: 0,
            rng,
            lease_ttl,
            header: Vec::new(),
        };
        view.rebuild_header(conf.release_poll, &base);
        let link = Arc::new(Link {
            conf,
            scripts: Scripts::new(),
            conns: Mutex::new(Vec::new()),
            down: AtomicBool::new(false),
            state: Mutex::new(LinkState {
                retry_at: Instant::now(),
                reason: String::new(),
            }),
        });
        let (reports, jobs) = mpsc::channel();
        let worker = link.clone();
        std::thread::Builder::new()
            .name("apipool-redis-reports".to_owned())
            .spawn(move || worker.report_loop(&jobs))
            .map_err(|e| Error::InvalidStore {
                reason: format!("cannot start the Redis report thread: {e}"),
            })?;
        let store = Self {
            fallback,
            link,
            base,
            reports,
            view: Mutex::new(view),
            owner: format!("{:016x}", rand::random::<u64>()),
            serial: AtomicU64::new(0),
            probe: Mutex::new(()),
            gate: Mutex::new(None),
        };
        let scripts = &store.link.scripts;
        // Failures are logged (once per outage) and retried on the first call.
        let _ = store.link.run(|con| {
            for s in [
                &scripts.acquire,
                &scripts.report,
                &scripts.change,
                &scripts.inspect,
            ] {
                s.load(con)?;
            }
            Ok(())
        });
        Ok(store)
    }

    fn fail_open(&self) -> bool {
        self.link.conf.on_unavailable == OnUnavailable::FailOpen
    }

    fn run<T>(&self, f: impl Fn(&mut Connection) -> Result<T, RedisError>) -> Result<T, Error> {
        self.link.run(f)
    }

    fn unavailable(&self, reason: &str) -> Error {
        self.link.unavailable(reason)
    }

    /// Waits until this process's earlier reports have reached Redis (read your own writes).
    fn flush(&self) {
        let (tx, rx) = mpsc::sync_channel(1);
        if self.reports.send(Job::Flush(tx)).is_ok() {
            let _ = rx.recv();
        }
    }

    /// Runs `inspect.lua` on `slots`: one row per slot, and Redis's now.
    fn inspect(&self, slots: &[u32]) -> Result<(Vec<i64>, Vec<Option<usize>>), Error> {
        self.flush();
        let (args, scopes) = {
            let view = self.view.lock();
            let mut args = Vec::with_capacity(view.header.len() + 2 + slots.len() * 2);
            args.push(String::new());
            args.extend(view.header.iter().cloned());
            args.push(slots.len().to_string());
            let mut scopes = Vec::with_capacity(slots.len());
            for &k in slots {
                let s = &view.slots[k as usize];
                args.push(s.id.to_string());
                args.push(s.scope.map_or(0, |i| i + 1).to_string());
                scopes.push(s.scope);
            }
            (args, scopes)
        };
        let rows: Vec<i64> = self.run(|con| self.link.scripts.inspect.arg(&args).invoke(con))?;
        Ok((rows, scopes))
    }

    fn live_slots(&self) -> Vec<u32> {
        let view = self.view.lock();
        (0..view.slots.len())
            .filter(|&i| view.slots[i].live)
            .map(|i| u32::try_from(i).unwrap_or(u32::MAX))
            .collect()
    }

    /// Reports on `slots` from Redis, or `None` when Redis cannot answer.
    fn reports(&self, slots: &[u32], now: Instant) -> Option<Vec<KeyReport>> {
        let (rows, scopes) = self.inspect(slots).ok()?;
        let redis_now = *rows.last()?;
        let view = self.view.lock();
        let mut out = Vec::with_capacity(slots.len());
        for (i, &k) in slots.iter().enumerate() {
            let row = rows.get(i * 11..i * 11 + 11)?;
            let scope = scopes[i].map(|s| view.scopes[s].name.clone());
            out.push(key_report(
                view.slots[k as usize].id.clone(),
                scope,
                row,
                redis_now,
                now,
                &view.settings,
            ));
        }
        Some(out)
    }
}

/// A key's report from its row of `inspect.lua` (11 numbers) and Redis's now.
fn key_report(
    identifier: Arc<str>,
    scope: Option<Arc<str>>,
    r: &[i64],
    redis_now: i64,
    now: Instant,
    settings: &Settings,
) -> KeyReport {
    let (code, wait_until, state, until, reason) = (r[0], r[1], r[2], r[3], r[4]);
    let count = |v: i64| u64::try_from(v).unwrap_or(0);
    let at = |us: i64| now + Duration::from_micros(count(us - redis_now));
    let secs = |us: i64| Duration::from_micros(count(us - redis_now)).as_secs_f64();
    let state = match state {
        1 if until > redis_now => KeyState::Cooling {
            until: at(until),
            reason: if reason == 1 {
                CoolReason::QuotaExhausted
            } else {
                CoolReason::RateLimited
            },
        },
        2 if until > redis_now => KeyState::Banned { until: at(until) },
        3 => KeyState::Archived {
            reason: match reason {
                0 => ArchiveReason::InvalidKey,
                1 => ArchiveReason::RateLimited,
                2 => ArchiveReason::Unusable,
                _ => ArchiveReason::Manual,
            },
        },
        4 => KeyState::Disabled,
        _ => KeyState::Active,
    };
    let skipped_because = match (code, state) {
        (0, _) => None,
        (_, KeyState::Disabled) => Some("disabled by hand".to_owned()),
        (_, KeyState::Archived { reason }) => Some(match reason {
            ArchiveReason::InvalidKey => "archived: the upstream refused the key as invalid (401/403); fix or rotate it, then restore".to_owned(),
            ArchiveReason::RateLimited => "archived on a rate limit (archive_on_rate_limit is on)".to_owned(),
            ArchiveReason::Unusable => "archived: the usability check failed".to_owned(),
            ArchiveReason::Manual => "archived by hand".to_owned(),
        }),
        (_, KeyState::Cooling { reason: CoolReason::RateLimited, .. }) => Some(format!(
            "cooling after a rate limit (429); back in {:.3}s",
            secs(wait_until)
        )),
        (_, KeyState::Cooling { .. }) => {
            Some(format!("quota exhausted; back in {:.3}s", secs(wait_until)))
        }
        (_, KeyState::Banned { .. }) => Some(format!(
            "banned after {} consecutive failures; re-admitted in {:.3}s",
            settings.ban_threshold,
            secs(wait_until)
        )),
        (_, KeyState::Active) => Some(format!(
            "its rate-limit window or in-flight limit (or its quota scope's), shared by every process, is full; free again in {:.3}s at the earliest",
            secs(wait_until)
        )),
    };
    KeyReport {
        identifier,
        state,
        available: code == 0,
        skipped_because,
        in_flight: u32::try_from(r[10]).unwrap_or(0),
        consecutive_failures: u32::try_from(r[5]).unwrap_or(0),
        calls: count(r[6]),
        successes: count(r[7]),
        failures: count(r[8]),
        rate_limited: count(r[9]),
        learned_limit: None,
        scope,
    }
}

impl Drop for RedisStore {
    fn drop(&mut self) {
        // Reports still queued reach Redis before the pool goes (bounded by the I/O timeouts).
        self.flush();
    }
}

impl KeyStateStore for RedisStore {
    fn add_key(&self, id: Arc<str>, weight: u32, scope: Option<&str>, now: Instant) -> u32 {
        let slot = self.fallback.add_key(id.clone(), weight, scope, now);
        let mut view = self.view.lock();
        let scope = scope.map(|s| view.scope_idx(s));
        let idx = slot as usize;
        if view.slots.len() <= idx {
            view.slots.resize_with(idx + 1, || Slot {
                id: Arc::from(""),
                weight: 1,
                scope: None,
                live: false,
                gen_: 0,
                in_flight: 0,
                last_used: 0,
            });
        }
        let s = &mut view.slots[idx];
        *s = Slot {
            id,
            weight: weight.max(1),
            scope,
            live: true,
            gen_: s.gen_ + 1,
            in_flight: 0,
            last_used: 0,
        };
        view.rebuild_header(self.link.conf.release_poll, &self.base);
        slot
    }

    fn remove_key(&self, slot: u32) {
        self.fallback.remove_key(slot);
        if let Some(s) = self.view.lock().slots.get_mut(slot as usize) {
            s.live = false;
        }
    }

    fn acquire(&self, now: Instant, avoid: &[u32]) -> Grant {
        let _probe = self.probe.lock();
        if let Some((until, recheck)) = *self.gate.lock()
            && now < recheck
        {
            return Grant::Wait {
                until: Some(until),
                recheck: Some(recheck),
            };
        }
        let serial = self.serial.fetch_add(1, Ordering::Relaxed);
        let lease = format!("{}:{serial}", self.owner);
        let (order, args) = {
            let mut view = self.view.lock();
            let order = view.order(avoid);
            let mut args = Vec::with_capacity(view.header.len() + 2 + order.len() * 2);
            args.push(lease);
            args.extend(view.header.iter().cloned());
            args.push(order.len().to_string());
            for &k in &order {
                let s = &view.slots[k as usize];
                args.push(s.id.to_string());
                args.push(s.scope.map_or(0, |i| i + 1).to_string());
            }
            (order, args)
        };
        if order.is_empty() {
            return Grant::NoUsableKeys;
        }
        let answer: Result<Vec<i64>, Error> =
            self.run(|con| self.link.scripts.acquire.arg(&args).invoke(con));
        let answer = match answer {
            Ok(a) if a.len() == 3 => a,
            Ok(_) => {
                return Grant::Unavailable(
                    self.unavailable("the acquire script answered in an unexpected shape"),
                );
            }
            // The outage was logged once; this process carries on with its own state.
            Err(_) if self.fail_open() => return self.fallback.acquire(now, avoid),
            Err(e) => return Grant::Unavailable(e),
        };
        match answer[0] {
            1 => {
                let pos = usize::try_from(answer[1] - 1).unwrap_or(usize::MAX);
                let Some(&slot) = order.get(pos) else {
                    return Grant::Unavailable(
                        self.unavailable("the acquire script granted an unknown candidate"),
                    );
                };
                let mut view = self.view.lock();
                view.seq += 1;
                let seq = view.seq;
                let s = &mut view.slots[slot as usize];
                s.in_flight += 1;
                s.last_used = seq;
                let held = Held {
                    slot,
                    gen_: s.gen_,
                    id: s.id.clone(),
                    scope: s.scope,
                };
                view.next_rr = slot + 1;
                view.leases.insert(serial, held);
                *self.gate.lock() = None;
                Grant::Granted(Token {
                    idx: slot,
                    kind: TokenKind::Shared(serial),
                })
            }
            0 => {
                // Asked again within `release_poll` at the latest, so keys freed by other processes
                // (a release under an in-flight cap, a key enabled by hand) are seen that soon.
                let wait = Duration::from_micros(u64::try_from(answer[1] - answer[2]).unwrap_or(0));
                let until = now + wait;
                let recheck = now + wait.min(self.link.conf.release_poll);
                *self.gate.lock() = Some((until, recheck));
                Grant::Wait {
                    until: Some(until),
                    recheck: Some(recheck),
                }
            }
            _ => Grant::NoUsableKeys,
        }
    }

    fn report(&self, token: Token, outcome: Option<Outcome>, now: Instant) {
        let serial = match token.kind {
            TokenKind::Shared(serial) => serial,
            TokenKind::Local(_) => return self.fallback.report(token, outcome, now),
        };
        let (id, args) = {
            let mut view = self.view.lock();
            let Some(held) = view.leases.remove(&serial) else {
                return;
            };
            if let Some(s) = view
                .slots
                .get_mut(held.slot as usize)
                .filter(|s| s.gen_ == held.gen_)
            {
                s.in_flight = s.in_flight.saturating_sub(1);
            }
            let (code, dur, scope_wide) = outcome_code(outcome, now);
            let st = &view.settings;
            let (scope, scope_horizon) = held.scope.map_or((String::new(), 0), |i| {
                let sc = &view.scopes[i];
                (sc.name.to_string(), horizon(&sc.limits))
            });
            let args = [
                self.base.clone(),
                format!("{}:{serial}", self.owner),
                held.id.to_string(),
                scope,
                code.to_string(),
                dur.to_string(),
                horizon(&st.limits).to_string(),
                scope_horizon.to_string(),
                st.ban_threshold.to_string(),
                micros(st.ban_duration).to_string(),
                micros(st.default_cooldown).to_string(),
                u8::from(st.archive_on_rate_limit).to_string(),
                st.scope_refusal_keys.max(1).to_string(),
                micros(st.scope_refusal_window).to_string(),
                u8::from(scope_wide).to_string(),
            ];
            (held.id, args)
        };
        let health = !matches!(
            outcome,
            None | Some(Outcome::Success | Outcome::NotKeyRelated)
        );
        let (done, wait) = if health {
            let (tx, rx) = mpsc::sync_channel(1);
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        if self.reports.send(Job::Report(args.to_vec(), done)).is_err() {
            tracing::debug!(key = %id, "the Redis report thread is gone; the lease expires by itself");
        }
        if let Some(rx) = wait {
            let _ = rx.recv();
        }
        // A release may free a place (in-flight caps): the next acquire asks Redis.
        *self.gate.lock() = None;
    }

    fn change(&self, slot: u32, change: KeyChange, now: Instant) -> Result<(), Error> {
        self.fallback.change(slot, change, now)?;
        self.flush();
        let Some(id) = self
            .view
            .lock()
            .slots
            .get(slot as usize)
            .filter(|s| s.live)
            .map(|s| s.id.clone())
        else {
            return Ok(());
        };
        let (op, reason) = match change {
            KeyChange::Disable => (1, 0),
            KeyChange::Enable => (2, 0),
            KeyChange::Archive(r) => (
                3,
                match r {
                    ArchiveReason::InvalidKey => 0,
                    ArchiveReason::RateLimited => 1,
                    ArchiveReason::Unusable => 2,
                    ArchiveReason::Manual => 3,
                },
            ),
            KeyChange::Reset => (4, 0),
        };
        let done: Result<i64, Error> = self.run(|con| {
            self.link
                .scripts
                .change
                .arg(&self.base)
                .arg(&*id)
                .arg(op)
                .arg(reason)
                .invoke(con)
        });
        *self.gate.lock() = None;
        match done {
            Ok(_) => Ok(()),
            Err(_) if self.fail_open() => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn explain(&self, slot: u32, now: Instant) -> Option<KeyReport> {
        let live = self
            .view
            .lock()
            .slots
            .get(slot as usize)
            .is_some_and(|s| s.live);
        if !live {
            return None;
        }
        match self.reports(&[slot], now) {
            Some(mut r) => r.pop(),
            None => self.fallback.explain(slot, now),
        }
    }

    fn is_archived(&self, slot: u32) -> bool {
        match self.explain(slot, Instant::now()) {
            Some(r) => matches!(r.state, KeyState::Archived { .. }),
            None => self.fallback.is_archived(slot),
        }
    }

    fn len(&self) -> usize {
        self.fallback.len()
    }

    fn in_flight(&self) -> u64 {
        self.view.lock().leases.len() as u64 + self.fallback.in_flight()
    }

    fn available_count(&self, now: Instant) -> usize {
        match self.reports(&self.live_slots(), now) {
            Some(r) => r.iter().filter(|r| r.available).count(),
            None => self.fallback.available_count(now),
        }
    }

    fn state_counts(&self, now: Instant) -> HashMap<&'static str, usize> {
        match self.reports(&self.live_slots(), now) {
            Some(reports) => {
                let mut out = HashMap::new();
                for r in reports {
                    *out.entry(r.state.name()).or_default() += 1;
                }
                out
            }
            None => self.fallback.state_counts(now),
        }
    }

    fn strategy(&self) -> Strategy {
        self.view.lock().strategy
    }

    fn set_strategy(&self, strategy: Strategy) {
        self.fallback.set_strategy(strategy);
        self.view.lock().strategy = strategy;
    }

    fn settings(&self) -> Settings {
        self.view.lock().settings.clone()
    }

    fn apply_settings(&self, settings: Settings) {
        self.fallback.apply_settings(settings.clone());
        let mut view = self.view.lock();
        view.settings = settings;
        view.rebuild_header(self.link.conf.release_poll, &self.base);
    }

    fn waits_on_io(&self) -> bool {
        true
    }

    fn set_call_timeout(&self, timeout: Duration) {
        if self.link.conf.lease_ttl.is_none() {
            let mut view = self.view.lock();
            view.lease_ttl = timeout + Duration::from_secs(5);
            view.rebuild_header(self.link.conf.release_poll, &self.base);
        }
    }

    fn define_scope(&self, name: &str, limits: Vec<RateLimit>, max_in_flight: u32) {
        self.fallback
            .define_scope(name, limits.clone(), max_in_flight);
        let mut view = self.view.lock();
        let i = view.scope_idx(name);
        view.scopes[i].limits = limits;
        view.scopes[i].max_in_flight = max_in_flight;
        view.rebuild_header(self.link.conf.release_poll, &self.base);
    }
}
