//! [`ApiKeyManager`]: the pool. One engine behind a lock; thin sync and async shells around it.

use crate::clock::{Clock, SystemClock};
use crate::config::{ConfigError, PoolConfig, RateLimit, Strategy};
use crate::engine::{ArchiveReason, KeyReport, Settings};
use crate::error::{CallError, Error};
use crate::key::ApiKey;
use crate::outcome::{Classifier, DefaultClassifier, Outcome};
use crate::status::{CallEvent, CallStatus, StatsSink};
use crate::store::{Grant, KeyChange, KeyStateStore, MemoryStore, Payload, Token};
use event_listener::{Event, EventListener, Listener};
use parking_lot::RwLock;
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::ops::Deref;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed, Ordering::SeqCst, fence};
use std::time::{Duration, Instant, SystemTime};

/// One key in the pool with its client. Handed to operations; derefs to the client.
pub struct KeyClient<K: ApiKey> {
    key: K,
    client: K::Client,
    id: Arc<str>,
    idx: u32,
}

impl<K: ApiKey> KeyClient<K> {
    /// The key.
    pub fn key(&self) -> &K {
        &self.key
    }

    /// The client bound to the key.
    pub fn client(&self) -> &K::Client {
        &self.client
    }

    /// The key's safe identifier.
    pub fn identifier(&self) -> &str {
        &self.id
    }
}

impl<K: ApiKey> Deref for KeyClient<K> {
    type Target = K::Client;
    fn deref(&self) -> &K::Client {
        &self.client
    }
}

impl<K: ApiKey> fmt::Debug for KeyClient<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyClient")
            .field("identifier", &self.id)
            .finish_non_exhaustive()
    }
}

/// Retry policy for one call: rate limits are always retried on another key (the upstream did not
/// process the call); failures only when `retry_on_failure`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retry transient failures (5xx, timeouts, invalid keys) on another key.
    pub retry_on_failure: bool,
    /// How many retries after the first attempt.
    pub max_retries: u32,
    /// How many key refusals (429, quota, invalid key) a call may meet before giving up.
    pub max_refusals: u32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            retry_on_failure: false,
            max_retries: 0,
            max_refusals: 100,
        }
    }
}

/// Per-call settings a pool applies to `call`/`acall` (from [`PoolConfig`] and the builder).
#[derive(Debug, Clone, Copy)]
pub(crate) struct CallSettings {
    pub(crate) retry: RetryPolicy,
    pub(crate) batch_retry: RetryPolicy,
    pub(crate) timeout: Duration,
    pub(crate) max_wait: Duration,
    pub(crate) concurrency: u32,
}

/// Options of one call (retry policy, wait budget, timeout, stats label).
#[derive(Debug, Clone)]
pub(crate) struct CallOpts {
    pub(crate) retry: RetryPolicy,
    pub(crate) max_wait: Duration,
    pub(crate) timeout: Duration,
    pub(crate) label: Option<Arc<str>>,
}

impl From<CallSettings> for CallOpts {
    fn from(s: CallSettings) -> Self {
        Self {
            retry: s.retry,
            max_wait: s.max_wait,
            timeout: s.timeout,
            label: None,
        }
    }
}

/// The pool's keys and clients by store slot and by primary key.
struct Keys<K: ApiKey> {
    entries: Vec<Option<Arc<KeyClient<K>>>>,
    by_pk: HashMap<String, u32>,
}

/// The pool's shared state. Aligned so that the `Arc`'s reference counts (every lease clones it)
/// sit on cache lines of their own, apart from the fields every call reads: another thread's
/// lease does not evict them.
#[repr(align(128))]
pub(crate) struct Inner<K: ApiKey> {
    store: Box<dyn KeyStateStore>,
    keys: RwLock<Keys<K>>,
    released: Event,
    /// Callers listening on `released`: a report notifies only when there is one (notifying
    /// takes the event's list lock, a cache line every reporting thread would write).
    waiters: AtomicUsize,
    clock: Arc<dyn Clock>,
    sink: Option<Arc<dyn StatsSink>>,
    #[cfg(feature = "sqlite")]
    collector: Option<crate::stats::StatsCollector>,
    name: Option<Arc<str>>,
    calls: RwLock<CallSettings>,
}

/// A pool of API keys with N× the quota of one: rotation, per-key limits (configured or learned),
/// cooldowns, bans, retries on another key, statistics.
///
/// Cheap to clone (an `Arc`); share it between threads and tasks.
///
/// ```
/// use apipool::{ApiKey, ApiKeyManager, Outcome};
/// struct Key(&'static str);
/// impl ApiKey for Key {
///     type Client = String;
///     fn primary_key(&self) -> &str { self.0 }
///     fn create_client(&self) -> String { format!("client for {}", self.0) }
/// }
/// let pool = ApiKeyManager::builder().keys([Key("a"), Key("b")]).build().unwrap();
/// let answer: Result<usize, apipool::CallError<String>> = pool.call(|client| Ok(client.len()));
/// assert_eq!(answer.unwrap(), "client for a".len());
/// ```
pub struct ApiKeyManager<K: ApiKey> {
    inner: Arc<Inner<K>>,
    /// What leases hold to keep the pool alive: one of [`HANDLES`], picked by thread, so threads
    /// taking leases at once do not all write one reference count.
    handles: Arc<[Arc<Handle<K>>]>,
}

/// Lease handles per pool (threads beyond this share them).
const HANDLES: usize = 16;

/// A lease's hold on its pool, on cache lines of its own.
#[repr(align(128))]
struct Handle<K: ApiKey>(Arc<Inner<K>>);

static NEXT_THREAD: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// This thread's number, for picking a lease handle.
    static THREAD_NO: usize = NEXT_THREAD.fetch_add(1, Relaxed);
}

impl<K: ApiKey> Clone for ApiKeyManager<K> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            handles: self.handles.clone(),
        }
    }
}

impl<K: ApiKey> fmt::Debug for ApiKeyManager<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKeyManager")
            .field("name", &self.inner.name)
            .field("store", &self.inner.store)
            .finish_non_exhaustive()
    }
}

/// A key lent to one call. Report the call's [`Outcome`] with [`Lease::report`]; a lease dropped
/// without a report frees its slot and is recorded as cancelled (RAII, like tower's permits).
pub struct Lease<K: ApiKey> {
    handle: Arc<Handle<K>>,
    entry: Arc<KeyClient<K>>,
    token: Option<Token>,
    started: Instant,
    label: Option<Arc<str>>,
}

impl<K: ApiKey> fmt::Debug for Lease<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lease")
            .field("key", &self.entry.id)
            .finish_non_exhaustive()
    }
}

impl<K: ApiKey> Lease<K> {
    /// The client of the leased key.
    pub fn client(&self) -> &K::Client {
        &self.entry.client
    }

    /// The leased key.
    pub fn key(&self) -> &K {
        &self.entry.key
    }

    /// The leased key's safe identifier.
    pub fn identifier(&self) -> &str {
        &self.entry.id
    }

    /// The key and client as a shareable handle (for `async move` blocks).
    pub fn key_client(&self) -> Arc<KeyClient<K>> {
        self.entry.clone()
    }

    /// Labels the call in statistics (e.g. "GET /price").
    pub fn set_label(&mut self, label: impl Into<Arc<str>>) {
        self.label = Some(label.into());
    }

    /// Reports how the call went and returns the key to the pool.
    pub fn report(mut self, outcome: Outcome) {
        self.finish(Some(outcome));
    }

    fn finish(&mut self, outcome: Option<Outcome>) {
        let Some(token) = self.token.take() else {
            return;
        };
        let inner = &self.handle.0;
        let now = inner.clock.now();
        inner.store.report(token, outcome, now);
        // Pairs with the fence in `Waiter::new`: either the waiter's re-check sees this release
        // or this sees the waiter.
        fence(SeqCst);
        if inner.waiters.load(Relaxed) > 0 {
            inner.released.notify(1);
        }
        if let Some(sink) = &inner.sink {
            sink.record(CallEvent {
                key_identifier: self.entry.id.clone(),
                status: outcome.map_or(CallStatus::Cancelled, |o| o.status()),
                latency: now.saturating_duration_since(self.started),
                method: self.label.clone(),
                finished_at: SystemTime::now(),
                pool: inner.name.clone(),
                dedup_id: None,
            });
        }
    }
}

impl<K: ApiKey> Drop for Lease<K> {
    fn drop(&mut self) {
        self.finish(None);
    }
}

/// Counts one caller among a pool's waiters while it lives.
struct Waiter<'a>(&'a AtomicUsize);

impl<'a> Waiter<'a> {
    fn new(waiters: &'a AtomicUsize) -> Self {
        waiters.fetch_add(1, SeqCst);
        fence(SeqCst);
        Self(waiters)
    }
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, SeqCst);
    }
}

/// What one acquire attempt produced. Sync and async shells differ only in how they wait.
enum Step<K: ApiKey> {
    Ready(Lease<K>),
    Wait(Instant),
    Fail(Error),
}

/// Tracks one call's attempts: which keys were tried, and whether to retry.
pub(crate) struct Attempts {
    policy: RetryPolicy,
    failures: u32,
    refusals: u32,
    tried: Vec<u32>,
}

impl Attempts {
    pub(crate) fn new(policy: RetryPolicy) -> Self {
        Self {
            policy,
            failures: 0,
            refusals: 0,
            tried: Vec::new(),
        }
    }

    pub(crate) fn count(&self) -> u32 {
        u32::try_from(self.tried.len()).unwrap_or(u32::MAX)
    }

    /// Records an attempt on key `idx`; true when the call should be retried on another key.
    pub(crate) fn retry_after(&mut self, idx: u32, outcome: Outcome) -> bool {
        if !self.tried.contains(&idx) {
            self.tried.push(idx);
        }
        if outcome.is_key_refusal() {
            self.refusals += 1;
            if outcome == Outcome::InvalidKey {
                return self.policy.retry_on_failure && self.failures_left();
            }
            return self.refusals <= self.policy.max_refusals;
        }
        if outcome.is_failure() && self.policy.retry_on_failure && self.failures_left() {
            self.failures += 1;
            return true;
        }
        false
    }

    fn failures_left(&self) -> bool {
        self.failures < self.policy.max_retries
    }
}

impl<K: ApiKey> ApiKeyManager<K> {
    /// Starts building a pool.
    pub fn builder() -> ApiKeyManagerBuilder<K> {
        ApiKeyManagerBuilder::default()
    }

    /// A pool with `keys` and default settings.
    pub fn new(keys: impl IntoIterator<Item = K>) -> Result<Self, Error> {
        Self::builder().keys(keys).build()
    }

    pub(crate) fn call_settings(&self) -> CallSettings {
        *self.inner.calls.read()
    }

    /// Number of keys in the pool (any state).
    pub fn pool_size(&self) -> usize {
        self.inner.store.len()
    }

    /// Number of keys that could serve a call right now.
    pub fn available_count(&self) -> usize {
        let now = self.inner.clock.now();
        self.inner.store.available_count(now)
    }

    /// Calls in flight across the pool.
    pub fn in_flight(&self) -> u64 {
        self.inner.store.in_flight()
    }

    /// The pool's own in-memory statistics collector (the default sink; `None` when another sink
    /// or [`ApiKeyManagerBuilder::no_stats`] was chosen). Query it for usage and latencies.
    #[cfg(feature = "sqlite")]
    pub fn stats(&self) -> Option<&crate::stats::StatsCollector> {
        self.inner.collector.as_ref()
    }

    /// The pool's name (used in statistics), if set.
    pub fn name(&self) -> Option<&str> {
        self.inner.name.as_deref()
    }

    /// The current rotation strategy.
    pub fn strategy(&self) -> Strategy {
        self.inner.store.strategy()
    }

    /// Switches the rotation strategy at run time.
    pub fn set_strategy(&self, strategy: Strategy) {
        self.inner.store.set_strategy(strategy);
    }

    /// Switches the rotation strategy by name (the seed's `rotation_strategy`).
    pub fn set_strategy_name(&self, name: &str) -> Result<(), Error> {
        self.set_strategy(name.parse()?);
        Ok(())
    }

    /// Applies a pool configuration at run time. Calls in flight are not disturbed; limits apply
    /// from the next acquire with the windows' history kept.
    pub fn apply_config(&self, config: &PoolConfig) -> Result<(), Error> {
        config.validate()?;
        let limits = config.limits()?;
        {
            let mut settings = self.inner.store.settings();
            settings_from_config(&mut settings, config, limits)?;
            self.inner.store.apply_settings(settings);
        }
        let mut calls = self.inner.calls.write();
        *calls = call_settings_from_config(config, calls.retry.max_refusals)?;
        let timeout = calls.timeout;
        drop(calls);
        self.inner.store.set_call_timeout(timeout);
        self.inner.released.notify(usize::MAX);
        Ok(())
    }

    /// Adds a key. Errors if a key with the same primary key is already in the pool.
    pub fn add_one(&self, key: K) -> Result<(), Error> {
        let id: Arc<str> = Arc::from(key.identifier());
        let pk = key.primary_key().to_owned();
        let client = key.create_client();
        let now = self.inner.clock.now();
        let mut st = self.inner.keys.write();
        if st.by_pk.contains_key(&pk) {
            return Err(Error::DuplicateKey {
                identifier: id.to_string(),
            });
        }
        let idx = self
            .inner
            .store
            .add_key(id.clone(), key.weight(), key.scope(), now);
        let entry = Arc::new(KeyClient {
            key,
            client,
            id,
            idx,
        });
        let slot = idx as usize;
        if st.entries.len() <= slot {
            st.entries.resize_with(slot + 1, || None);
        }
        st.entries[slot] = Some(entry.clone());
        st.by_pk.insert(pk, idx);
        self.inner.store.attach(idx, Payload(entry));
        drop(st);
        self.inner.released.notify(usize::MAX);
        Ok(())
    }

    /// Removes the key with this primary key and returns it. Calls in flight on it finish normally.
    pub fn remove_one(&self, primary_key: &str) -> Result<Arc<KeyClient<K>>, Error> {
        let mut st = self.inner.keys.write();
        let idx = st
            .by_pk
            .remove(primary_key)
            .ok_or_else(|| Error::UnknownKey {
                identifier: crate::key::fingerprint(primary_key),
            })?;
        self.inner.store.remove_key(idx);
        let entry = st.entries[idx as usize]
            .take()
            .ok_or_else(|| Error::UnknownKey {
                identifier: crate::key::fingerprint(primary_key),
            })?;
        Ok(entry)
    }

    /// Whether a key with this primary key is in the pool.
    pub fn contains(&self, primary_key: &str) -> bool {
        self.inner.keys.read().by_pk.contains_key(primary_key)
    }

    /// Finds a key's store slot by primary key or identifier.
    fn slot_of(&self, key: &str) -> Result<u32, Error> {
        let st = self.inner.keys.read();
        let idx = match st.by_pk.get(key) {
            Some(&i) => i,
            None => st
                .entries
                .iter()
                .flatten()
                .find(|e| &*e.id == key)
                .map(|e| e.idx)
                .ok_or_else(|| Error::UnknownKey {
                    identifier: if key.starts_with("key-") {
                        key.to_owned()
                    } else {
                        crate::key::fingerprint(key)
                    },
                })?,
        };
        Ok(idx)
    }

    fn change(&self, key: &str, change: KeyChange) -> Result<(), Error> {
        let slot = self.slot_of(key)?;
        self.inner
            .store
            .change(slot, change, self.inner.clock.now())?;
        if matches!(change, KeyChange::Enable | KeyChange::Reset) {
            self.inner.released.notify(usize::MAX);
        }
        Ok(())
    }

    /// Takes a key out of rotation by hand (by primary key or identifier) until [`Self::enable`].
    pub fn disable(&self, key: &str) -> Result<(), Error> {
        self.change(key, KeyChange::Disable)
    }

    /// Puts a disabled key back into rotation.
    pub fn enable(&self, key: &str) -> Result<(), Error> {
        self.change(key, KeyChange::Enable)
    }

    /// Archives a key by hand.
    pub fn archive(&self, key: &str) -> Result<(), Error> {
        self.change(key, KeyChange::Archive(ArchiveReason::Manual))
    }

    /// Clears a key's health: active again, no cooldown, ban, failures or archive.
    pub fn reset(&self, key: &str) -> Result<(), Error> {
        self.change(key, KeyChange::Reset)
    }

    /// Whether a key is archived.
    pub fn is_archived(&self, key: &str) -> Result<bool, Error> {
        Ok(self.inner.store.is_archived(self.slot_of(key)?))
    }

    /// Says why a key is (or is not) skipped right now.
    pub fn explain(&self, key: &str) -> Result<KeyReport, Error> {
        let slot = self.slot_of(key)?;
        self.inner
            .store
            .explain(slot, self.inner.clock.now())
            .ok_or_else(|| Error::UnknownKey {
                identifier: key.to_owned(),
            })
    }

    /// Reports on every key (in insertion-slot order).
    pub fn key_reports(&self) -> Vec<KeyReport> {
        let now = self.inner.clock.now();
        self.keys()
            .iter()
            .filter_map(|e| self.inner.store.explain(e.idx, now))
            .collect()
    }

    /// Counts keys per state name ("active", "cooling", "banned", "archived", "disabled").
    pub fn state_counts(&self) -> HashMap<&'static str, usize> {
        self.inner.store.state_counts(self.inner.clock.now())
    }

    /// Every key with its client (for usability checks, or to close clients).
    pub fn keys(&self) -> Vec<Arc<KeyClient<K>>> {
        self.inner
            .keys
            .read()
            .entries
            .iter()
            .flatten()
            .cloned()
            .collect()
    }

    /// Lends a free key, waiting up to `max_wait` (the seed's `fetch_one`; same as [`Self::acquire`]).
    pub fn fetch_one(&self) -> Result<Lease<K>, Error> {
        self.acquire()
    }

    /// Picks a key and lends it, if one is free now. Never waits.
    pub fn try_acquire(&self) -> Result<Lease<K>, Error> {
        match self.step(&[], None) {
            Step::Ready(lease) => Ok(lease),
            Step::Fail(e) => Err(e),
            // `step` without a deadline answers PoolExhausted instead of asking to wait.
            Step::Wait(t) => Err(Error::PoolExhausted {
                retry_at: Some(t),
                retry_after: Some(t.saturating_duration_since(self.inner.clock.now())),
            }),
        }
    }

    /// Picks a key and lends it, waiting (thread sleep) up to the pool's `max_wait` for one to free up.
    pub fn acquire(&self) -> Result<Lease<K>, Error> {
        let deadline = self.inner.clock.now() + self.call_settings().max_wait;
        self.acquire_avoiding(&[], deadline)
    }

    /// Async twin of [`Self::acquire`]: waits with the runtime's timer.
    pub async fn aacquire(&self) -> Result<Lease<K>, Error> {
        let deadline = self.inner.clock.now() + self.call_settings().max_wait;
        self.aacquire_avoiding(&[], deadline).await
    }

    fn acquire_avoiding(&self, avoid: &[u32], deadline: Instant) -> Result<Lease<K>, Error> {
        loop {
            let (_waiter, listener) = match self.step(avoid, Some(deadline)) {
                Step::Ready(lease) => return Ok(lease),
                Step::Fail(e) => return Err(e),
                Step::Wait(_) => (
                    Waiter::new(&self.inner.waiters),
                    self.inner.released.listen(),
                ),
            };
            // Re-check after listening so a release between the two is not missed.
            match self.step(avoid, Some(deadline)) {
                Step::Ready(lease) => return Ok(lease),
                Step::Fail(e) => return Err(e),
                Step::Wait(until) => {
                    let _ = listener.wait_deadline(self.real_instant(until));
                }
            }
        }
    }

    async fn aacquire_avoiding(&self, avoid: &[u32], deadline: Instant) -> Result<Lease<K>, Error> {
        loop {
            let (_waiter, listener): (Waiter<'_>, EventListener) =
                match self.astep(avoid, deadline).await {
                    Step::Ready(lease) => return Ok(lease),
                    Step::Fail(e) => return Err(e),
                    Step::Wait(_) => (
                        Waiter::new(&self.inner.waiters),
                        self.inner.released.listen(),
                    ),
                };
            match self.astep(avoid, deadline).await {
                Step::Ready(lease) => return Ok(lease),
                Step::Fail(e) => return Err(e),
                Step::Wait(until) => {
                    let until = tokio::time::Instant::from_std(self.real_instant(until));
                    let _ = tokio::time::timeout_at(until, listener).await;
                }
            }
        }
    }

    /// [`Self::step`] for async callers. A store whose acquire is a network round trip (Redis)
    /// is asked from the runtime's blocking pool, so the worker thread keeps running other tasks
    /// meanwhile; the in-process store answers in well under a microsecond and is asked inline.
    async fn astep(&self, avoid: &[u32], deadline: Instant) -> Step<K> {
        if !self.inner.store.waits_on_io() {
            return self.step(avoid, Some(deadline));
        }
        let pool = self.clone();
        let owned = avoid.to_vec();
        match off_runtime(move || pool.step(&owned, Some(deadline))).await {
            Some(step) => step,
            // The runtime is shutting down: ask inline rather than fail the call.
            None => self.step(avoid, Some(deadline)),
        }
    }

    /// [`Lease::report`] for async callers. A shared store (Redis) waits for the round trip of an
    /// outcome that changes a key's health (so other processes see it when the report returns):
    /// that report runs on the runtime's blocking pool. A success never waits.
    async fn areport(&self, lease: Lease<K>, outcome: Outcome) {
        if matches!(outcome, Outcome::Success) || !self.inner.store.waits_on_io() {
            lease.report(outcome);
            return;
        }
        // `None` (the runtime is shutting down): the lease was dropped unreported, which
        // releases its key as a cancelled call.
        let _ = off_runtime(move || lease.report(outcome)).await;
    }

    /// Maps a time on the pool's clock to a real instant to sleep until.
    fn real_instant(&self, t: Instant) -> Instant {
        Instant::now() + t.saturating_duration_since(self.inner.clock.now())
    }

    /// One acquire attempt. `deadline: None` means "do not wait".
    fn step(&self, avoid: &[u32], deadline: Option<Instant>) -> Step<K> {
        let now = self.inner.clock.now();
        let (token, entry) = match self.inner.store.acquire(now, avoid) {
            Grant::GrantedWith(token, entry) => (token, entry.0.downcast::<KeyClient<K>>().ok()),
            Grant::Granted(token) => (token, None),
            Grant::NoUsableKeys => return Step::Fail(Error::NoUsableKeys),
            #[cfg(feature = "redis")]
            Grant::Unavailable(e) => return Step::Fail(e),
            Grant::Wait { until, recheck } => return wait_step(until, recheck, now, deadline),
        };
        let entry = entry.or_else(|| {
            self.inner
                .keys
                .read()
                .entries
                .get(token.idx as usize)
                .cloned()
                .flatten()
        });
        let Some(entry) = entry else {
            // Removed between the grant and now: hand the lease back and try again.
            self.inner.store.report(token, None, now);
            return self.step(avoid, deadline);
        };
        let handle = THREAD_NO.with(|&t| self.handles[t % self.handles.len()].clone());
        Step::Ready(Lease {
            handle,
            entry,
            token: Some(token),
            started: now,
            label: None,
        })
    }

    /// Runs `op` with a key's client, classifying `Err` as a failure (see [`Self::call_with`]).
    pub fn call<T, E>(
        &self,
        op: impl FnMut(&K::Client) -> Result<T, E>,
    ) -> Result<T, CallError<E>> {
        self.call_with(&DefaultClassifier, op)
    }

    /// Runs `op` with a free key's client (waiting up to `max_wait` for one), classifies the result,
    /// and retries on another key per the pool's retry policy. Sync: waits with a thread sleep.
    pub fn call_with<T, E, C>(
        &self,
        classifier: &C,
        op: impl FnMut(&K::Client) -> Result<T, E>,
    ) -> Result<T, CallError<E>>
    where
        C: Classifier<T, E> + ?Sized,
    {
        self.call_with_opts(classifier, &CallOpts::from(self.call_settings()), op)
    }

    pub(crate) fn call_with_opts<T, E, C>(
        &self,
        classifier: &C,
        opts: &CallOpts,
        mut op: impl FnMut(&K::Client) -> Result<T, E>,
    ) -> Result<T, CallError<E>>
    where
        C: Classifier<T, E> + ?Sized,
    {
        let deadline = self.inner.clock.now() + opts.max_wait;
        let mut attempts = Attempts::new(opts.retry);
        loop {
            let mut lease = self.acquire_avoiding(&attempts.tried, deadline)?;
            if let Some(l) = &opts.label {
                lease.set_label(l.clone());
            }
            let result = op(lease.client());
            let mut outcome = classifier.classify(&result);
            if outcome == Outcome::Success || outcome.is_failure() {
                // A sync call cannot be interrupted; an overrun still counts as a timeout.
                if self
                    .inner
                    .clock
                    .now()
                    .saturating_duration_since(lease.started)
                    > opts.timeout
                    && result.is_err()
                {
                    outcome = Outcome::Timeout;
                }
            }
            let idx = lease.entry.idx;
            lease.report(outcome);
            if !attempts.retry_after(idx, outcome) {
                return finish(result, outcome, attempts.count());
            }
        }
    }

    /// Async call, classifying `Err` as a failure (see [`Self::acall_with`]).
    pub async fn acall<T, E, F, Fut>(&self, op: F) -> Result<T, CallError<E>>
    where
        F: FnMut(Arc<KeyClient<K>>) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        self.acall_with(&DefaultClassifier, op).await
    }

    /// Runs `op` with a free key (waiting up to `max_wait`), enforces the per-call timeout,
    /// classifies, and retries on another key per the pool's retry policy.
    ///
    /// Multi-level client chains are plain Rust: `pool.acall(|c| async move { c.coins().price("btc").await })`.
    pub async fn acall_with<T, E, C, F, Fut>(
        &self,
        classifier: &C,
        op: F,
    ) -> Result<T, CallError<E>>
    where
        C: Classifier<T, E> + ?Sized,
        F: FnMut(Arc<KeyClient<K>>) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        self.acall_with_opts(classifier, &CallOpts::from(self.call_settings()), op)
            .await
    }

    pub(crate) async fn acall_with_opts<T, E, C, F, Fut>(
        &self,
        classifier: &C,
        opts: &CallOpts,
        mut op: F,
    ) -> Result<T, CallError<E>>
    where
        C: Classifier<T, E> + ?Sized,
        F: FnMut(Arc<KeyClient<K>>) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let deadline = self.inner.clock.now() + opts.max_wait;
        let mut attempts = Attempts::new(opts.retry);
        loop {
            let mut lease = self.aacquire_avoiding(&attempts.tried, deadline).await?;
            if let Some(l) = &opts.label {
                lease.set_label(l.clone());
            }
            let idx = lease.entry.idx;
            match tokio::time::timeout(opts.timeout, op(lease.key_client())).await {
                Ok(result) => {
                    let outcome = classifier.classify(&result);
                    self.areport(lease, outcome).await;
                    if !attempts.retry_after(idx, outcome) {
                        return finish(result, outcome, attempts.count());
                    }
                }
                Err(_elapsed) => {
                    self.areport(lease, Outcome::Timeout).await;
                    if !attempts.retry_after(idx, Outcome::Timeout) {
                        return Err(CallError::Timeout {
                            timeout: opts.timeout,
                            attempts: attempts.count(),
                        });
                    }
                }
            }
        }
    }

    /// Archives every key whose [`ApiKey::test_usability`] fails, wherever it sits in the pool.
    /// Returns the identifiers archived.
    pub fn check_usable(&self) -> Vec<String> {
        let bad: Vec<Arc<KeyClient<K>>> = self
            .keys()
            .into_iter()
            .filter(|e| !e.key.test_usability(&e.client))
            .collect();
        self.archive_unusable(bad)
    }

    /// Async twin of [`Self::check_usable`] (checks run concurrently).
    pub async fn acheck_usable(&self) -> Vec<String> {
        let keys = self.keys();
        let checks = keys.iter().map(|e| e.key.atest_usability(&e.client));
        let results = futures::future::join_all(checks).await;
        let bad = keys
            .into_iter()
            .zip(results)
            .filter(|(_, ok)| !ok)
            .map(|(e, _)| e)
            .collect();
        self.archive_unusable(bad)
    }

    fn archive_unusable(&self, bad: Vec<Arc<KeyClient<K>>>) -> Vec<String> {
        let st = self.inner.keys.read();
        let mut archived = Vec::new();
        for e in bad {
            let still_here = st
                .entries
                .get(e.idx as usize)
                .and_then(Option::as_ref)
                .is_some_and(|x| Arc::ptr_eq(x, &e));
            if still_here {
                // Archived here in any case; a shared store that is down is logged by the store.
                let _ = self.inner.store.change(
                    e.idx,
                    KeyChange::Archive(ArchiveReason::Unusable),
                    self.inner.clock.now(),
                );
                archived.push(e.id.to_string());
            }
        }
        archived
    }
}

/// What "nothing free before `until`" means for one acquire attempt (`deadline: None`: do not wait).
fn wait_step<K: ApiKey>(
    until: Option<Instant>,
    recheck: Option<Instant>,
    now: Instant,
    deadline: Option<Instant>,
) -> Step<K> {
    match deadline {
        Some(deadline) if until.is_none_or(|t| t <= deadline) && now < deadline => {
            let wake = until.map_or(deadline, |t| t.min(deadline));
            Step::Wait(recheck.map_or(wake, |r| r.min(wake)))
        }
        _ => Step::Fail(Error::PoolExhausted {
            retry_at: until,
            retry_after: until.map(|t| t.saturating_duration_since(now)),
        }),
    }
}

/// Runs `f` on the runtime's blocking pool (for a store call that waits on I/O). A panic in `f`
/// carries on here; `None` when the runtime is shutting down and `f` never ran.
async fn off_runtime<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    match tokio::task::spawn_blocking(f).await {
        Ok(v) => Some(v),
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(_) => None,
    }
}

fn finish<T, E>(result: Result<T, E>, outcome: Outcome, attempts: u32) -> Result<T, CallError<E>> {
    result.map_err(|error| CallError::Failed {
        error,
        outcome,
        attempts,
    })
}

fn settings_from_config(
    settings: &mut Settings,
    config: &PoolConfig,
    limits: Vec<RateLimit>,
) -> Result<(), Error> {
    settings.limits = limits;
    settings.max_in_flight = config.max_in_flight_per_key;
    settings.ban_threshold = config.ban_threshold;
    settings.ban_duration = crate::config::secs("ban_duration", config.ban_duration)?;
    settings.default_cooldown = crate::config::secs("default_cooldown", config.default_cooldown)?;
    settings.archive_on_rate_limit = config.archive_on_rate_limit;
    Ok(())
}

fn call_settings_from_config(
    config: &PoolConfig,
    max_refusals: u32,
) -> Result<CallSettings, ConfigError> {
    config.validate()?;
    Ok(CallSettings {
        retry: RetryPolicy {
            retry_on_failure: config.retry_on_failure,
            max_retries: config.max_retries,
            max_refusals,
        },
        batch_retry: RetryPolicy {
            retry_on_failure: config.effective_batch_retry_on_failure(),
            max_retries: config.effective_batch_max_retries(),
            max_refusals,
        },
        timeout: config.timeout_duration(),
        max_wait: config.max_wait_duration(),
        concurrency: config.concurrency,
    })
}

/// Where a pool's events go.
enum Sink {
    /// In-memory SQLite when the `sqlite` feature is on, else none.
    Default,
    None,
    Custom(Arc<dyn StatsSink>),
}

/// Builds an [`ApiKeyManager`]. Every option is validated in [`Self::build`].
pub struct ApiKeyManagerBuilder<K: ApiKey> {
    keys: Vec<K>,
    strategy: Result<Strategy, ConfigError>,
    config: PoolConfig,
    extra_limits: Vec<RateLimit>,
    learn: bool,
    learned_ttl: Option<Duration>,
    max_wait: Option<Duration>,
    timeout: Option<Duration>,
    max_refusals: u32,
    scopes: Vec<(String, Vec<RateLimit>, u32)>,
    scope_refusal: Option<(u32, Duration)>,
    sink: Sink,
    clock: Arc<dyn Clock>,
    seed: Option<u64>,
    name: Option<Arc<str>>,
    allow_empty: bool,
    shards: Option<usize>,
    #[cfg(feature = "redis")]
    redis: Option<crate::store::redis::RedisStoreConfig>,
}

impl<K: ApiKey> Default for ApiKeyManagerBuilder<K> {
    fn default() -> Self {
        Self {
            keys: Vec::new(),
            strategy: Ok(Strategy::default()),
            config: PoolConfig::default(),
            extra_limits: Vec::new(),
            learn: true,
            learned_ttl: None,
            max_wait: None,
            timeout: None,
            max_refusals: RetryPolicy::default().max_refusals,
            scopes: Vec::new(),
            scope_refusal: None,
            sink: Sink::Default,
            clock: Arc::new(SystemClock),
            seed: None,
            name: None,
            allow_empty: false,
            shards: None,
            #[cfg(feature = "redis")]
            redis: None,
        }
    }
}

impl<K: ApiKey> fmt::Debug for ApiKeyManagerBuilder<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKeyManagerBuilder")
            .field("keys", &self.keys.len())
            .field("strategy", &self.strategy)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl<K: ApiKey> ApiKeyManagerBuilder<K> {
    /// Adds keys.
    pub fn keys(mut self, keys: impl IntoIterator<Item = K>) -> Self {
        self.keys.extend(keys);
        self
    }

    /// The rotation strategy (default: random, as in the seed).
    pub fn strategy(mut self, strategy: Strategy) -> Self {
        self.strategy = Ok(strategy);
        self
    }

    /// The rotation strategy by name ("random", "round_robin", "least_used", "weighted").
    pub fn strategy_name(mut self, name: &str) -> Self {
        self.strategy = name.parse();
        self
    }

    /// The seed's pool configuration (limits, retries, bans, timeout).
    pub fn config(mut self, config: PoolConfig) -> Self {
        self.config = config;
        self
    }

    /// Adds a per-key rate-limit window (several may be combined, e.g. 20/s and 1000/day).
    pub fn rate_limit(mut self, limit: RateLimit) -> Self {
        self.extra_limits.push(limit);
        self
    }

    /// Max calls in flight per key (0 = unlimited).
    pub fn max_in_flight_per_key(mut self, n: u32) -> Self {
        self.config.max_in_flight_per_key = n;
        self
    }

    /// Bans a key for `duration` after `threshold` consecutive failures.
    pub fn ban(mut self, threshold: u32, duration: Duration) -> Self {
        self.config.ban_threshold = threshold;
        self.config.ban_duration = duration.as_secs_f64();
        self
    }

    /// Retry policy: retry failures on another key, up to `max_retries` times.
    pub fn retry(mut self, retry_on_failure: bool, max_retries: u32) -> Self {
        self.config.retry_on_failure = retry_on_failure;
        self.config.max_retries = max_retries;
        self
    }

    /// How many rate limits one call may meet before it gives up (default 100).
    pub fn max_refusals(mut self, n: u32) -> Self {
        self.max_refusals = n;
        self
    }

    /// Cooldown after a rate limit without Retry-After (default 1 s).
    pub fn default_cooldown(mut self, d: Duration) -> Self {
        self.config.default_cooldown = d.as_secs_f64();
        self
    }

    /// The seed's behaviour: archive a key on its first rate limit (default off: cool and restore).
    pub fn archive_on_rate_limit(mut self, on: bool) -> Self {
        self.config.archive_on_rate_limit = on;
        self
    }

    /// Learn each key's limit from 429s when none is configured (default on), and how long a
    /// learned limit is trusted before it is re-learned (default 10 min).
    pub fn learn_limits(mut self, on: bool, ttl: Option<Duration>) -> Self {
        self.learn = on;
        self.learned_ttl = ttl;
        self
    }

    /// How long a call may wait for a free key (default: the per-call timeout, 30 s).
    pub fn max_wait(mut self, d: Duration) -> Self {
        self.max_wait = Some(d);
        self
    }

    /// The per-call timeout (default 30 s).
    pub fn timeout(mut self, d: Duration) -> Self {
        self.timeout = Some(d);
        self
    }

    /// Declares a quota scope: keys whose [`ApiKey::scope`] is `name` share these limits and
    /// in-flight cap (0 = none), and cool together on a scope-wide refusal.
    pub fn scope(
        mut self,
        name: impl Into<String>,
        limits: Vec<RateLimit>,
        max_in_flight: u32,
    ) -> Self {
        self.scopes.push((name.into(), limits, max_in_flight));
        self
    }

    /// How many distinct keys of one scope refused within `window` make the whole scope cool
    /// (default: 2 within 1 s).
    pub fn scope_refusal(mut self, keys: u32, window: Duration) -> Self {
        self.scope_refusal = Some((keys, window));
        self
    }

    /// Where each call's event goes (e.g. a [`crate::stats::StatsCollector`]); default: none.
    pub fn stats(mut self, sink: impl StatsSink) -> Self {
        self.sink = Sink::Custom(Arc::new(sink));
        self
    }

    /// Records no statistics (the default, like the seed's, is an in-memory SQLite collector when
    /// the `sqlite` feature is on).
    pub fn no_stats(mut self) -> Self {
        self.sink = Sink::None;
        self
    }

    /// The time source (default: the system clock; [`crate::ManualClock`] in tests).
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// Seeds the random strategies (for reproducible tests).
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// Names the pool in statistics.
    pub fn name(mut self, name: impl Into<Arc<str>>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Allows building a pool with no keys yet (keys come later with `add_one`, e.g. from a
    /// server). Calls on an empty pool fail with [`Error::NoUsableKeys`].
    pub fn allow_empty(mut self, allow: bool) -> Self {
        self.allow_empty = allow;
        self
    }

    /// How many independent engines (each with its own lock) the in-memory key state is split
    /// into, so threads acquiring at once do not queue on one lock. Default: one per core, at
    /// most 16, except for a pool built with [`Strategy::LeastUsed`], which keeps one (its order
    /// is pool-wide only then). Keys are spread over them in add order (a quota scope's keys
    /// share one); round robin stays in add order and random and weighted stay proportional
    /// across them, while least used is exact only within one (also after switching a sharded
    /// pool to least used at run time). Threads that collide on a shard each keep to a
    /// shard for a run of calls, so under contention the order holds over runs, not call by
    /// call. `1` keeps a single engine: one exact global order.
    pub fn shards(mut self, n: usize) -> Self {
        self.shards = Some(n.max(1));
        self
    }

    /// Shares the pool's key state on Redis (feature `redis`): every process that builds a pool
    /// with the same Redis URL, prefix and [`name`](Self::name) shares its keys' rate-limit
    /// windows, leases, cooldowns, bans and hand-made changes, so the configured limits hold
    /// across processes and hosts. Pools with no name use the name `default`.
    #[cfg(feature = "redis")]
    pub fn redis(mut self, config: crate::store::redis::RedisStoreConfig) -> Self {
        self.redis = Some(config);
        self
    }

    /// Validates every option and builds the pool.
    pub fn build(self) -> Result<ApiKeyManager<K>, Error> {
        if self.keys.is_empty() && !self.allow_empty {
            return Err(Error::EmptyPool);
        }
        let strategy = self.strategy?;
        let mut config = self.config;
        if let Some(t) = self.timeout {
            config.timeout = t.as_secs_f64();
        }
        if let Some(w) = self.max_wait {
            config.max_wait = Some(w.as_secs_f64());
        }
        config.validate()?;
        let mut limits = config.limits()?;
        limits.extend(self.extra_limits);
        let mut settings = Settings {
            learn: self.learn,
            ..Settings::default()
        };
        if let Some(ttl) = self.learned_ttl {
            settings.learned_ttl = ttl;
        }
        if let Some((keys, window)) = self.scope_refusal {
            settings.scope_refusal_keys = keys;
            settings.scope_refusal_window = window;
        }
        settings_from_config(&mut settings, &config, limits)?;
        let calls = call_settings_from_config(&config, self.max_refusals)?;
        // Least used is exact only within a shard: a pool built for it keeps one engine unless
        // told otherwise, so "fewest in flight, then least recently used" holds pool-wide.
        let shards = self.shards.unwrap_or_else(|| match strategy {
            Strategy::LeastUsed => 1,
            _ => crate::store::default_shards(),
        });
        let store = MemoryStore::new(settings, strategy, self.seed, self.clock.now(), shards);
        #[cfg(feature = "redis")]
        let store: Box<dyn KeyStateStore> = match self.redis {
            Some(conf) => Box::new(crate::store::redis::RedisStore::new(
                conf,
                store,
                self.name.as_deref().unwrap_or("default"),
                calls.timeout,
                self.seed,
            )?),
            None => Box::new(store),
        };
        #[cfg(not(feature = "redis"))]
        let store: Box<dyn KeyStateStore> = Box::new(store);
        for (name, limits, max_in_flight) in self.scopes {
            store.define_scope(&name, limits, max_in_flight);
        }
        #[cfg(feature = "sqlite")]
        let (sink, collector) = match self.sink {
            Sink::Custom(s) => (Some(s), None),
            Sink::None => (None, None),
            Sink::Default => match crate::stats::StatsCollector::in_memory() {
                Ok(c) => {
                    let sink: Arc<dyn StatsSink> = Arc::new(c.clone());
                    (Some(sink), Some(c))
                }
                Err(e) => {
                    tracing::warn!(error = %e, "no in-memory stats collector; the pool records no statistics");
                    (None, None)
                }
            },
        };
        #[cfg(not(feature = "sqlite"))]
        let sink = match self.sink {
            Sink::Custom(s) => Some(s),
            Sink::None | Sink::Default => None,
        };
        let inner = Arc::new(Inner {
            store,
            keys: RwLock::new(Keys {
                entries: Vec::new(),
                by_pk: HashMap::new(),
            }),
            released: Event::new(),
            waiters: AtomicUsize::new(0),
            clock: self.clock,
            sink,
            #[cfg(feature = "sqlite")]
            collector,
            name: self.name,
            calls: RwLock::new(calls),
        });
        let pool = ApiKeyManager {
            handles: (0..HANDLES)
                .map(|_| Arc::new(Handle(inner.clone())))
                .collect(),
            inner,
        };
        for key in self.keys {
            pool.add_one(key)?;
        }
        Ok(pool)
    }
}
