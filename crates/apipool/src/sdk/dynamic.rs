//! [`DynamicKeyManager`] and [`AsyncDynamicKeyManager`]: a local pool kept in step with the keys a
//! server (or any fetcher) lists.
//!
//! Each cycle: fetch the config (optional) and apply it; fetch the keys; [`diff_keys`] them against
//! the pool by primary key; add new keys, remove keys that left (their clients are dropped once
//! no call uses them), restore keys the seed would have archived for a rate limit; call the
//! callbacks. Keys that stay keep their engine state (cooldowns, bans, learned limits). A fetch
//! error, or an empty list while the pool has keys, keeps the pool as it is (logged).
//!
//! Both managers are thin shells over one async core: the async one runs it as a tokio task, the
//! sync one on the SDK's private runtime threads.

use super::blocking;
use super::{RemoteConfig, RemoteKey, SdkError, Session};
use crate::clock::Clock;
use crate::config::{PoolConfig, Strategy};
use crate::engine::{ArchiveReason, KeyState};
use crate::http::HttpKey;
use crate::key::{ApiKey, mask};
use crate::manager::ApiKeyManager;
use crate::status::StatsSink;
use futures::future::BoxFuture;
use std::collections::HashSet;
use std::fmt;
use std::future::Future;
use std::ops::Deref;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// What changes a fetched key list asks for: keys to add, primary keys to remove, primary keys
/// that stay.
///
/// ```
/// let d: apipool::sdk::KeyDiff<&str> = apipool::sdk::diff_keys(["a"], vec!["a", "b"], |k: &&str| *k);
/// assert_eq!((d.add.len(), d.remove.len(), d.keep.len()), (1, 0, 1));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyDiff<T> {
    /// Fetched keys not in the pool (first occurrence of each primary key, in fetch order).
    pub add: Vec<T>,
    /// Primary keys in the pool that the fetch no longer lists.
    pub remove: Vec<String>,
    /// Primary keys in both.
    pub keep: Vec<String>,
}

/// The one diff step both managers use: a pure function of the pool's primary keys and the
/// fetched keys. Duplicates in the fetched list count once.
///
/// ```
/// use apipool::sdk::diff_keys;
/// let d = diff_keys(["a", "b"], vec!["b", "c", "c"], |k: &&str| *k);
/// assert_eq!(d.add, vec!["c"]);
/// assert_eq!(d.remove, vec!["a".to_owned()]);
/// assert_eq!(d.keep, vec!["b".to_owned()]);
/// ```
pub fn diff_keys<'a, T>(
    current: impl IntoIterator<Item = &'a str>,
    fetched: impl IntoIterator<Item = T>,
    primary_key: impl Fn(&T) -> &str,
) -> KeyDiff<T> {
    let current: Vec<&str> = current.into_iter().collect();
    let fetched: Vec<T> = fetched.into_iter().collect();
    let current_set: HashSet<&str> = current.iter().copied().collect();
    let mut seen: HashSet<&str> = HashSet::with_capacity(fetched.len());
    let mut take = vec![false; fetched.len()];
    for (i, k) in fetched.iter().enumerate() {
        let pk = primary_key(k);
        if seen.insert(pk) && !current_set.contains(pk) {
            take[i] = true;
        }
    }
    let (keep, remove): (Vec<&str>, Vec<&str>) =
        current.into_iter().partition(|pk| seen.contains(pk));
    let (keep, remove) = (
        keep.into_iter().map(str::to_owned).collect(),
        remove.into_iter().map(str::to_owned).collect(),
    );
    drop(seen);
    let add = fetched
        .into_iter()
        .zip(take)
        .filter_map(|(k, t)| t.then_some(k))
        .collect();
    KeyDiff { add, remove, keep }
}

/// One key that came or went, named safely: its identifier and its masked primary key.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct KeyChange {
    /// The key's safe identifier ([`ApiKey::identifier`]).
    pub identifier: String,
    /// The primary key masked ([`crate::mask`]).
    pub masked: String,
}

impl KeyChange {
    /// Describes a key.
    ///
    /// ```
    /// use apipool::sdk::KeyChange;
    /// let c = KeyChange::of(&apipool::http::HttpKey::bearer("sk-0123456789abcdef"));
    /// assert_eq!(c.masked, "sk-…cdef");
    /// ```
    pub fn of<K: ApiKey>(key: &K) -> Self {
        Self {
            identifier: key.identifier(),
            masked: mask(key.primary_key()),
        }
    }
}

/// Why a refresh left the pool as it was.
///
/// ```
/// # #[tokio::main] async fn main() {
/// use apipool::sdk::{AsyncDynamicKeyManager, Kept, RemoteKey};
/// use std::sync::atomic::{AtomicBool, Ordering};
/// use std::sync::Arc;
/// let empty = Arc::new(AtomicBool::new(false));
/// let e = empty.clone();
/// let mgr = AsyncDynamicKeyManager::builder(move || {
///     let list = if e.load(Ordering::SeqCst) { vec![] } else { vec![RemoteKey::new("a", "k1")] };
///     async move { Ok(list) }
/// })
/// .astart()
/// .await
/// .unwrap();
/// empty.store(true, Ordering::SeqCst);
/// assert_eq!(mgr.refresh().await.kept, Some(Kept::EmptyList));
/// assert_eq!(mgr.pool_size(), 1);
/// # }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kept {
    /// Fetching the keys failed (server down, 5xx, auth, ...).
    FetchFailed(SdkError),
    /// The server listed no keys while the pool had some (see
    /// [`DynamicBuilder::keep_pool_on_empty`]).
    EmptyList,
}

/// What one refresh did.
///
/// ```
/// # #[tokio::main] async fn main() {
/// use apipool::sdk::{AsyncDynamicKeyManager, RemoteKey};
/// let mgr = AsyncDynamicKeyManager::builder(|| async { Ok(vec![RemoteKey::new("a", "k1")]) })
///     .astart().await.unwrap();
/// let r = mgr.refresh().await;
/// assert_eq!((r.pool_size, r.added.len(), r.removed.len()), (1, 0, 0));
/// # }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefreshReport {
    /// Keys added.
    pub added: Vec<KeyChange>,
    /// Keys removed (their clients are dropped once no call uses them).
    pub removed: Vec<KeyChange>,
    /// Keys restored from a rate-limit archive.
    pub restored: Vec<KeyChange>,
    /// Keys in the pool after the refresh.
    pub pool_size: usize,
    /// Why the key list was not applied, if it was not.
    pub kept: Option<Kept>,
    /// Whether a fetched config was applied.
    pub config_applied: bool,
    /// Why fetching or applying the config failed, if it did.
    pub config_error: Option<String>,
}

type KeysFetch = Fetch<Vec<RemoteKey>>;
type Factory<K> = Arc<dyn Fn(&RemoteKey) -> K + Send + Sync>;
type ChangeCallback = Arc<dyn Fn(&[KeyChange]) + Send + Sync>;
type ReportCallback = Arc<dyn Fn(&RefreshReport) + Send + Sync>;
type Hook = Arc<dyn Fn() -> BoxFuture<'static, ()> + Send + Sync>;

enum Fetch<T> {
    Async(Arc<dyn Fn() -> BoxFuture<'static, Result<T, SdkError>> + Send + Sync>),
    Blocking(Arc<dyn Fn() -> Result<T, SdkError> + Send + Sync>),
}

impl<T> Clone for Fetch<T> {
    fn clone(&self) -> Self {
        match self {
            Fetch::Async(f) => Fetch::Async(f.clone()),
            Fetch::Blocking(f) => Fetch::Blocking(f.clone()),
        }
    }
}

impl<T: Send + 'static> Fetch<T> {
    fn from_async<F, Fut>(f: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<T, SdkError>> + Send + 'static,
    {
        Fetch::Async(Arc::new(move || Box::pin(f())))
    }

    fn from_blocking<F>(f: F) -> Self
    where
        F: Fn() -> Result<T, SdkError> + Send + Sync + 'static,
    {
        Fetch::Blocking(Arc::new(f))
    }

    async fn run(&self) -> Result<T, SdkError> {
        match self {
            Fetch::Async(f) => f().await,
            Fetch::Blocking(f) => {
                let f = f.clone();
                tokio::task::spawn_blocking(move || f())
                    .await
                    .unwrap_or_else(|e| {
                        Err(SdkError::InvalidArgument(format!(
                            "the fetcher panicked: {e}"
                        )))
                    })
            }
        }
    }
}

#[derive(Debug)]
struct SharedClock(Arc<dyn Clock>);

impl Clock for SharedClock {
    fn now(&self) -> Instant {
        self.0.now()
    }
}

/// The default key factory: an [`HttpKey`] sent as a bearer token, named by the server's
/// identifier.
///
/// ```
/// use apipool::ApiKey;
/// let k = apipool::sdk::default_key_factory(&apipool::sdk::RemoteKey::new("cg-1", "secret-1"));
/// assert_eq!(k.identifier(), "cg-1");
/// assert_eq!(k.primary_key(), "secret-1");
/// ```
pub fn default_key_factory(key: &RemoteKey) -> HttpKey {
    use secrecy::ExposeSecret;
    HttpKey::bearer(key.raw_key.expose_secret()).with_identifier(key.identifier.clone())
}

/// Builds a [`DynamicKeyManager`] or an [`AsyncDynamicKeyManager`]: fetchers, key factory, pool
/// options, refresh policy and callbacks.
///
/// ```no_run
/// # async fn run(session: apipool::sdk::Session) -> Result<(), apipool::sdk::SdkError> {
/// use apipool::sdk::AsyncDynamicKeyManager;
/// use std::time::Duration;
/// let mgr = AsyncDynamicKeyManager::from_session(&session, "prices")
///     .refresh_interval(Duration::from_secs(30))
///     .on_keys_added(|keys| println!("added {keys:?}"))
///     .astart()
///     .await?;
/// println!("{} keys", mgr.pool_size());
/// mgr.ashutdown().await;
/// # Ok(()) }
/// ```
pub struct DynamicBuilder<K: ApiKey> {
    keys: KeysFetch,
    config: Option<Fetch<RemoteConfig>>,
    factory: Factory<K>,
    interval: Duration,
    keep_on_empty: bool,
    restore_archived: bool,
    pool_config: Option<PoolConfig>,
    strategy: Option<Strategy>,
    sink: Option<Arc<dyn StatsSink>>,
    clock: Option<Arc<dyn Clock>>,
    name: Option<Arc<str>>,
    seed: Option<u64>,
    on_added: Vec<ChangeCallback>,
    on_removed: Vec<ChangeCallback>,
    on_refresh: Vec<ReportCallback>,
    on_shutdown: Vec<Hook>,
}

impl<K: ApiKey> fmt::Debug for DynamicBuilder<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DynamicBuilder")
            .field("interval", &self.interval)
            .field("keep_on_empty", &self.keep_on_empty)
            .field("restore_archived", &self.restore_archived)
            .finish_non_exhaustive()
    }
}

impl DynamicBuilder<HttpKey> {
    fn new(keys: KeysFetch) -> Self {
        Self {
            keys,
            config: None,
            factory: Arc::new(default_key_factory),
            interval: Duration::from_secs(60),
            keep_on_empty: true,
            restore_archived: true,
            pool_config: None,
            strategy: None,
            sink: None,
            clock: None,
            name: None,
            seed: None,
            on_added: Vec::new(),
            on_removed: Vec::new(),
            on_refresh: Vec::new(),
            on_shutdown: Vec::new(),
        }
    }
}

impl<K: ApiKey> DynamicBuilder<K> {
    /// Makes the pool's keys with `factory` instead of [`default_key_factory`]. Its
    /// [`ApiKey::primary_key`] is what the diff compares.
    ///
    /// ```
    /// use apipool::http::{AuthPlacement, HttpKey};
    /// use apipool::sdk::{AsyncDynamicKeyManager, RemoteKey};
    /// use secrecy::ExposeSecret;
    /// let b = AsyncDynamicKeyManager::builder(|| async { Ok(vec![RemoteKey::new("a", "k1")]) })
    ///     .key_factory(|k: &RemoteKey| {
    ///         HttpKey::new(k.raw_key.expose_secret(), AuthPlacement::Query("api_key".into()))
    ///     });
    /// # let _ = b;
    /// ```
    pub fn key_factory<K2: ApiKey>(
        self,
        factory: impl Fn(&RemoteKey) -> K2 + Send + Sync + 'static,
    ) -> DynamicBuilder<K2> {
        DynamicBuilder {
            keys: self.keys,
            config: self.config,
            factory: Arc::new(factory),
            interval: self.interval,
            keep_on_empty: self.keep_on_empty,
            restore_archived: self.restore_archived,
            pool_config: self.pool_config,
            strategy: self.strategy,
            sink: self.sink,
            clock: self.clock,
            name: self.name,
            seed: self.seed,
            on_added: self.on_added,
            on_removed: self.on_removed,
            on_refresh: self.on_refresh,
            on_shutdown: self.on_shutdown,
        }
    }

    /// Fetches the pool's config each cycle and applies it (`apply_config` + rotation strategy).
    ///
    /// ```
    /// use apipool::sdk::{AsyncDynamicKeyManager, RemoteConfig};
    /// let b = AsyncDynamicKeyManager::builder(|| async { Ok(vec![]) })
    ///     .config_fetcher(|| async { RemoteConfig::from_json(&serde_json::json!({"pool_config": null})) });
    /// # let _ = b;
    /// ```
    pub fn config_fetcher<F, Fut>(mut self, f: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<RemoteConfig, SdkError>> + Send + 'static,
    {
        self.config = Some(Fetch::from_async(f));
        self
    }

    /// A sync config fetcher (run on a blocking thread).
    ///
    /// ```
    /// use apipool::sdk::{DynamicKeyManager, RemoteConfig};
    /// let b = DynamicKeyManager::builder(|| Ok(vec![]))
    ///     .blocking_config_fetcher(|| RemoteConfig::from_json(&serde_json::json!({})));
    /// # let _ = b;
    /// ```
    pub fn blocking_config_fetcher<F>(mut self, f: F) -> Self
    where
        F: Fn() -> Result<RemoteConfig, SdkError> + Send + Sync + 'static,
    {
        self.config = Some(Fetch::from_blocking(f));
        self
    }

    /// Time between refreshes (default 60 s).
    ///
    /// ```
    /// # let b = apipool::sdk::DynamicKeyManager::builder(|| Ok(vec![]));
    /// let b = b.refresh_interval(std::time::Duration::from_secs(10));
    /// ```
    pub fn refresh_interval(mut self, interval: Duration) -> Self {
        self.interval = interval.max(Duration::from_millis(10));
        self
    }

    /// When the server lists no keys while the pool has some, keep the pool (default true: an
    /// empty list is more often a server-side mistake than a wish to stop all calls).
    ///
    /// ```
    /// # let b = apipool::sdk::DynamicKeyManager::builder(|| Ok(vec![]));
    /// let b = b.keep_pool_on_empty(false);
    /// ```
    pub fn keep_pool_on_empty(mut self, keep: bool) -> Self {
        self.keep_on_empty = keep;
        self
    }

    /// Restore keys archived for a rate limit (`archive_on_rate_limit`, the seed's behaviour)
    /// when the server still lists them (default true).
    ///
    /// ```
    /// # let b = apipool::sdk::DynamicKeyManager::builder(|| Ok(vec![]));
    /// let b = b.restore_archived(false);
    /// ```
    pub fn restore_archived(mut self, restore: bool) -> Self {
        self.restore_archived = restore;
        self
    }

    /// The pool's initial configuration (a config fetcher overrides it each cycle).
    ///
    /// ```
    /// # let b = apipool::sdk::DynamicKeyManager::builder(|| Ok(vec![]));
    /// let b = b.pool_config(apipool::PoolConfig { rate_limit: 5, ..Default::default() });
    /// ```
    pub fn pool_config(mut self, config: PoolConfig) -> Self {
        self.pool_config = Some(config);
        self
    }

    /// The pool's initial rotation strategy.
    ///
    /// ```
    /// # let b = apipool::sdk::DynamicKeyManager::builder(|| Ok(vec![]));
    /// let b = b.strategy(apipool::Strategy::RoundRobin);
    /// ```
    pub fn strategy(mut self, strategy: Strategy) -> Self {
        self.strategy = Some(strategy);
        self
    }

    /// Where the pool sends call events (e.g. a [`super::StatsUploader`]).
    ///
    /// ```
    /// # let b = apipool::sdk::DynamicKeyManager::builder(|| Ok(vec![]));
    /// # struct Nothing; impl apipool::StatsSink for Nothing { fn record(&self, _: apipool::CallEvent) {} }
    /// let b = b.stats(Nothing);
    /// ```
    pub fn stats(mut self, sink: impl StatsSink) -> Self {
        self.sink = Some(Arc::new(sink));
        self
    }

    /// The pool's time source (a [`crate::ManualClock`] in tests).
    ///
    /// ```
    /// # let b = apipool::sdk::DynamicKeyManager::builder(|| Ok(vec![]));
    /// let b = b.clock(apipool::ManualClock::new());
    /// ```
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Some(Arc::new(clock));
        self
    }

    /// Names the pool in statistics.
    ///
    /// ```
    /// # let b = apipool::sdk::DynamicKeyManager::builder(|| Ok(vec![]));
    /// let b = b.name("prices");
    /// ```
    pub fn name(mut self, name: impl Into<Arc<str>>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Seeds the random strategies (reproducible tests).
    ///
    /// ```
    /// # let b = apipool::sdk::DynamicKeyManager::builder(|| Ok(vec![]));
    /// let b = b.seed(7);
    /// ```
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// Called with the keys each refresh added (not called when none were).
    ///
    /// ```
    /// # let b = apipool::sdk::DynamicKeyManager::builder(|| Ok(vec![]));
    /// let b = b.on_keys_added(|keys| for k in keys { println!("+ {}", k.identifier) });
    /// ```
    pub fn on_keys_added(mut self, f: impl Fn(&[KeyChange]) + Send + Sync + 'static) -> Self {
        self.on_added.push(Arc::new(f));
        self
    }

    /// Called with the keys each refresh removed (not called when none were).
    ///
    /// ```
    /// # let b = apipool::sdk::DynamicKeyManager::builder(|| Ok(vec![]));
    /// let b = b.on_keys_removed(|keys| for k in keys { println!("- {}", k.identifier) });
    /// ```
    pub fn on_keys_removed(mut self, f: impl Fn(&[KeyChange]) + Send + Sync + 'static) -> Self {
        self.on_removed.push(Arc::new(f));
        self
    }

    /// Called after every refresh (background or on demand, including the first) with its report.
    ///
    /// ```
    /// # let b = apipool::sdk::DynamicKeyManager::builder(|| Ok(vec![]));
    /// let b = b.on_refresh(|r| println!("{} keys", r.pool_size));
    /// ```
    pub fn on_refresh(mut self, f: impl Fn(&RefreshReport) + Send + Sync + 'static) -> Self {
        self.on_refresh.push(Arc::new(f));
        self
    }

    /// Awaited by a graceful shutdown after the refresher stopped (e.g. to flush a stats
    /// uploader).
    ///
    /// ```
    /// # let b = apipool::sdk::DynamicKeyManager::builder(|| Ok(vec![]));
    /// let b = b.on_shutdown(|| async { println!("bye") });
    /// ```
    pub fn on_shutdown<F, Fut>(mut self, f: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.on_shutdown.push(Arc::new(move || Box::pin(f())));
        self
    }

    fn build_pool(&self, initial: Vec<K>) -> Result<ApiKeyManager<K>, SdkError> {
        let mut b = ApiKeyManager::builder();
        if let Some(c) = &self.pool_config {
            b = b.config(c.clone());
        }
        if let Some(s) = self.strategy {
            b = b.strategy(s);
        }
        if let Some(s) = &self.sink {
            b = b.stats(s.clone());
        }
        if let Some(c) = &self.clock {
            b = b.clock(SharedClock(c.clone()));
        }
        if let Some(n) = &self.name {
            b = b.name(n.clone());
        }
        if let Some(s) = self.seed {
            b = b.seed(s);
        }
        if !initial.is_empty() {
            return Ok(b.keys(initial).build()?);
        }
        // The pool builder refuses an empty key list; build with a placeholder and take it out.
        let placeholder = (self.factory)(&RemoteKey::new(
            "apipool-placeholder",
            format!("apipool-placeholder-{}", uuid::Uuid::new_v4()),
        ));
        let pk = placeholder.primary_key().to_owned();
        let pool = b.keys([placeholder]).build()?;
        pool.remove_one(&pk)?;
        Ok(pool)
    }

    async fn start_core(self) -> Result<(Arc<Core<K>>, Vec<Hook>, RefreshReport), SdkError> {
        let config = match &self.config {
            Some(f) => Some(f.run().await?),
            None => None,
        };
        let fetched = self.keys.run().await?;
        let built: Vec<K> = fetched.iter().map(|k| (self.factory)(k)).collect();
        let initial = diff_keys(std::iter::empty(), built, |k: &K| k.primary_key()).add;
        let added: Vec<KeyChange> = initial.iter().map(KeyChange::of).collect();
        let pool = self.build_pool(initial)?;
        let mut report = RefreshReport {
            added,
            removed: Vec::new(),
            restored: Vec::new(),
            pool_size: pool.pool_size(),
            kept: None,
            config_applied: false,
            config_error: None,
        };
        if let Some(c) = &config {
            apply_config(&pool, c, &mut report);
            if let Some(e) = &report.config_error {
                return Err(SdkError::InvalidArgument(e.clone()));
            }
        }
        let core = Arc::new(Core {
            pool,
            keys: self.keys,
            config: self.config,
            factory: self.factory,
            keep_on_empty: self.keep_on_empty,
            restore_archived: self.restore_archived,
            on_added: self.on_added,
            on_removed: self.on_removed,
            on_refresh: self.on_refresh,
            refresh_lock: tokio::sync::Mutex::new(()),
            interval: self.interval,
        });
        core.notify(&report);
        Ok((core, self.on_shutdown, report))
    }

    /// Fetches the config and keys once, builds the pool, and starts refreshing it in a tokio
    /// task on the current runtime. Fails when the first fetch fails.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), apipool::sdk::SdkError> {
    /// use apipool::sdk::{AsyncDynamicKeyManager, RemoteKey};
    /// let mgr = AsyncDynamicKeyManager::builder(|| async { Ok(vec![RemoteKey::new("a", "k1")]) })
    ///     .astart().await?;
    /// assert_eq!(mgr.pool_size(), 1);
    /// mgr.ashutdown().await;
    /// # Ok(()) }
    /// ```
    pub async fn astart(self) -> Result<AsyncDynamicKeyManager<K>, SdkError> {
        let (core, hooks, _) = self.start_core().await?;
        let stop = CancellationToken::new();
        let task = tokio::spawn(run_loop(core.clone(), stop.clone()));
        Ok(AsyncDynamicKeyManager {
            core,
            stop,
            task: parking_lot::Mutex::new(Some(task)),
            hooks,
        })
    }

    /// Sync twin of [`Self::astart`]: the refresher runs on the SDK's private runtime threads.
    ///
    /// ```
    /// use apipool::sdk::{DynamicKeyManager, RemoteKey};
    /// let mgr = DynamicKeyManager::builder(|| Ok(vec![RemoteKey::new("a", "k1"), RemoteKey::new("b", "k2")]))
    ///     .start()
    ///     .unwrap();
    /// assert_eq!(mgr.pool_size(), 2);
    /// mgr.shutdown();
    /// ```
    pub fn start(self) -> Result<DynamicKeyManager<K>, SdkError> {
        let inner = blocking::wait(async move { self.astart().await })?;
        Ok(DynamicKeyManager { inner })
    }
}

struct Core<K: ApiKey> {
    pool: ApiKeyManager<K>,
    keys: KeysFetch,
    config: Option<Fetch<RemoteConfig>>,
    factory: Factory<K>,
    keep_on_empty: bool,
    restore_archived: bool,
    on_added: Vec<ChangeCallback>,
    on_removed: Vec<ChangeCallback>,
    on_refresh: Vec<ReportCallback>,
    refresh_lock: tokio::sync::Mutex<()>,
    interval: Duration,
}

fn apply_config<K: ApiKey>(pool: &ApiKeyManager<K>, c: &RemoteConfig, report: &mut RefreshReport) {
    let mut result = pool.apply_config(&c.pool_config);
    if result.is_ok()
        && let Some(s) = &c.rotation_strategy
    {
        result = pool.set_strategy_name(s);
    }
    match result {
        Ok(()) => report.config_applied = true,
        Err(e) => {
            tracing::warn!(pool = ?pool.name(), "cannot apply the server's pool config: {e}");
            report.config_error = Some(e.to_string());
        }
    }
}

impl<K: ApiKey> Core<K> {
    async fn refresh(&self) -> RefreshReport {
        let _one_at_a_time = self.refresh_lock.lock().await;
        let mut report = RefreshReport {
            added: Vec::new(),
            removed: Vec::new(),
            restored: Vec::new(),
            pool_size: 0,
            kept: None,
            config_applied: false,
            config_error: None,
        };
        if let Some(f) = &self.config {
            match f.run().await {
                Ok(c) => apply_config(&self.pool, &c, &mut report),
                Err(e) => {
                    tracing::warn!(pool = ?self.pool.name(), "cannot fetch the pool config, keeping the current one: {e}");
                    report.config_error = Some(e.to_string());
                }
            }
        }
        match self.keys.run().await {
            Err(e) => {
                tracing::warn!(pool = ?self.pool.name(), "cannot fetch the keys, keeping the pool as it is: {e}");
                report.kept = Some(Kept::FetchFailed(e));
            }
            Ok(list) => self.apply_keys(&list, &mut report),
        }
        report.pool_size = self.pool.pool_size();
        self.notify(&report);
        report
    }

    fn apply_keys(&self, list: &[RemoteKey], report: &mut RefreshReport) {
        let current: Vec<String> = self
            .pool
            .keys()
            .iter()
            .map(|kc| kc.key().primary_key().to_owned())
            .collect();
        if list.is_empty() && !current.is_empty() && self.keep_on_empty {
            tracing::warn!(
                pool = ?self.pool.name(),
                keys = current.len(),
                "the server listed no keys; keeping the current pool (keep_pool_on_empty)"
            );
            report.kept = Some(Kept::EmptyList);
            return;
        }
        let fetched: Vec<K> = list.iter().map(|k| (self.factory)(k)).collect();
        let diff = diff_keys(current.iter().map(String::as_str), fetched, |k: &K| {
            k.primary_key()
        });
        for pk in &diff.remove {
            if let Ok(gone) = self.pool.remove_one(pk) {
                report.removed.push(KeyChange::of(gone.key()));
            }
        }
        for key in diff.add {
            let change = KeyChange::of(&key);
            match self.pool.add_one(key) {
                Ok(()) => report.added.push(change),
                Err(e) => tracing::warn!(key = %change.identifier, "cannot add key: {e}"),
            }
        }
        if self.restore_archived {
            for pk in &diff.keep {
                let archived_for_limit = self.pool.explain(pk).is_ok_and(|r| {
                    matches!(
                        r.state,
                        KeyState::Archived {
                            reason: ArchiveReason::RateLimited
                        }
                    )
                });
                if archived_for_limit && self.pool.reset(pk).is_ok() {
                    let id = self.pool.explain(pk).map(|r| r.identifier.to_string());
                    report.restored.push(KeyChange {
                        identifier: id.unwrap_or_default(),
                        masked: mask(pk),
                    });
                }
            }
        }
    }

    fn notify(&self, report: &RefreshReport) {
        if !report.added.is_empty() {
            for f in &self.on_added {
                f(&report.added);
            }
        }
        if !report.removed.is_empty() {
            for f in &self.on_removed {
                f(&report.removed);
            }
        }
        for f in &self.on_refresh {
            f(report);
        }
    }
}

async fn run_loop<K: ApiKey>(core: Arc<Core<K>>, stop: CancellationToken) {
    let mut ticker =
        tokio::time::interval_at(tokio::time::Instant::now() + core.interval, core.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => break,
            _ = ticker.tick() => {
                // A refresh awaits only while fetching: stopping then leaves the pool untouched.
                tokio::select! {
                    biased;
                    () = stop.cancelled() => break,
                    _ = core.refresh() => {}
                }
            }
        }
    }
}

/// A pool kept in step with a server's key list by a tokio task.
///
/// Derefs to the [`ApiKeyManager`], so every pool call (`acall`, `abatch_exec`, ...) works on it.
///
/// ```no_run
/// # async fn run() -> Result<(), apipool::sdk::SdkError> {
/// use apipool::sdk::{AsyncDynamicKeyManager, Session};
/// let session = Session::alogin("http://127.0.0.1:8000", "alice", "pw-of-alice").await?;
/// let mgr = AsyncDynamicKeyManager::from_session(&session, "prices").astart().await?;
/// let http = reqwest::Client::new();
/// let status = mgr
///     .acall(|key| {
///         let req = key.apply(http.get("http://127.0.0.1:9000/price?id=btc"));
///         async move { req.send().await.map(|r| r.status()) }
///     })
///     .await;
/// # let _ = status;
/// mgr.ashutdown().await;
/// # Ok(()) }
/// ```
pub struct AsyncDynamicKeyManager<K: ApiKey = HttpKey> {
    core: Arc<Core<K>>,
    stop: CancellationToken,
    task: parking_lot::Mutex<Option<tokio::task::JoinHandle<()>>>,
    hooks: Vec<Hook>,
}

impl<K: ApiKey> fmt::Debug for AsyncDynamicKeyManager<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AsyncDynamicKeyManager")
            .field("pool", &self.core.pool)
            .field("interval", &self.core.interval)
            .finish_non_exhaustive()
    }
}

impl AsyncDynamicKeyManager<HttpKey> {
    /// A builder around an async key fetcher.
    ///
    /// ```
    /// use apipool::sdk::{AsyncDynamicKeyManager, RemoteKey};
    /// let b = AsyncDynamicKeyManager::builder(|| async { Ok(vec![RemoteKey::new("a", "k1")]) });
    /// # let _ = b;
    /// ```
    pub fn builder<F, Fut>(fetch_keys: F) -> DynamicBuilder<HttpKey>
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Vec<RemoteKey>, SdkError>> + Send + 'static,
    {
        DynamicBuilder::new(Fetch::from_async(fetch_keys))
    }

    /// A builder that fetches a server pool's keys ([`Session::aget_keys`]) and config
    /// ([`Session::aget_config`]) each cycle, and names the pool after it.
    ///
    /// ```no_run
    /// # async fn run(session: apipool::sdk::Session) -> Result<(), apipool::sdk::SdkError> {
    /// let mgr = apipool::sdk::AsyncDynamicKeyManager::from_session(&session, "prices").astart().await?;
    /// # let _ = mgr; Ok(()) }
    /// ```
    pub fn from_session(session: &Session, pool: &str) -> DynamicBuilder<HttpKey> {
        let (s1, s2) = (session.clone(), session.clone());
        let (p1, p2): (Arc<str>, Arc<str>) = (Arc::from(pool), Arc::from(pool));
        Self::builder(move || {
            let (s, p) = (s1.clone(), p1.clone());
            async move { s.aget_keys(&p).await }
        })
        .config_fetcher(move || {
            let (s, p) = (s2.clone(), p2.clone());
            async move { s.aget_config(&p).await }
        })
        .name(pool)
    }
}

impl<K: ApiKey> AsyncDynamicKeyManager<K> {
    /// The pool (cheap to clone; keeps working after shutdown, without refreshes).
    ///
    /// ```
    /// # #[tokio::main] async fn main() {
    /// # let mgr = apipool::sdk::AsyncDynamicKeyManager::builder(|| async { Ok(vec![apipool::sdk::RemoteKey::new("a", "k1")]) }).astart().await.unwrap();
    /// let pool: apipool::ApiKeyManager<apipool::http::HttpKey> = mgr.pool().clone();
    /// assert_eq!(pool.pool_size(), 1);
    /// # }
    /// ```
    pub fn pool(&self) -> &ApiKeyManager<K> {
        &self.core.pool
    }

    /// Keys in the pool.
    ///
    /// ```
    /// # #[tokio::main] async fn main() {
    /// # let mgr = apipool::sdk::AsyncDynamicKeyManager::builder(|| async { Ok(vec![]) }).astart().await.unwrap();
    /// assert_eq!(mgr.pool_size(), 0);
    /// # }
    /// ```
    pub fn pool_size(&self) -> usize {
        self.core.pool.pool_size()
    }

    /// Refreshes now (waits for a background refresh in progress first) and reports what changed.
    ///
    /// ```
    /// # #[tokio::main] async fn main() {
    /// use apipool::sdk::{AsyncDynamicKeyManager, RemoteKey};
    /// let mgr = AsyncDynamicKeyManager::builder(|| async { Ok(vec![RemoteKey::new("a", "k1")]) })
    ///     .astart().await.unwrap();
    /// let report = mgr.refresh().await;
    /// assert!(report.added.is_empty() && report.kept.is_none());
    /// # }
    /// ```
    pub async fn refresh(&self) -> RefreshReport {
        self.core.refresh().await
    }

    /// Stops the refresher (a refresh that is fetching is abandoned; one that is applying
    /// finishes), waits for it, then runs the shutdown hooks (e.g. a stats flush). Idempotent.
    ///
    /// ```
    /// # #[tokio::main] async fn main() {
    /// # let mgr = apipool::sdk::AsyncDynamicKeyManager::builder(|| async { Ok(vec![]) }).astart().await.unwrap();
    /// mgr.ashutdown().await;
    /// assert!(mgr.is_stopped());
    /// # }
    /// ```
    pub async fn ashutdown(&self) {
        self.stop.cancel();
        let task = self.task.lock().take();
        let Some(task) = task else { return };
        if let Err(e) = task.await
            && e.is_panic()
        {
            tracing::error!("the key refresher panicked: {e}");
        }
        for hook in &self.hooks {
            hook().await;
        }
    }

    /// Whether [`Self::ashutdown`] ran.
    ///
    /// ```
    /// # #[tokio::main] async fn main() {
    /// # let mgr = apipool::sdk::AsyncDynamicKeyManager::builder(|| async { Ok(vec![]) }).astart().await.unwrap();
    /// assert!(!mgr.is_stopped());
    /// # }
    /// ```
    pub fn is_stopped(&self) -> bool {
        self.stop.is_cancelled()
    }
}

impl<K: ApiKey> Deref for AsyncDynamicKeyManager<K> {
    type Target = ApiKeyManager<K>;
    fn deref(&self) -> &ApiKeyManager<K> {
        &self.core.pool
    }
}

impl<K: ApiKey> Drop for AsyncDynamicKeyManager<K> {
    fn drop(&mut self) {
        // The task stops at its next wake-up; hooks only run in an explicit shutdown.
        self.stop.cancel();
    }
}

/// The sync twin of [`AsyncDynamicKeyManager`]: the refresher runs on the SDK's private runtime
/// threads, so it needs no runtime of yours and works from inside one too.
///
/// ```
/// use apipool::sdk::{DynamicKeyManager, RemoteKey};
/// let mgr = DynamicKeyManager::builder(|| Ok(vec![RemoteKey::new("a", "k1")]))
///     .refresh_interval(std::time::Duration::from_secs(30))
///     .start()
///     .unwrap();
/// let n = mgr.call(|auth| Ok::<_, std::io::Error>(auth.secret().clone())).map(|_| 1).unwrap();
/// assert_eq!(n, 1);
/// mgr.shutdown();
/// ```
pub struct DynamicKeyManager<K: ApiKey = HttpKey> {
    inner: AsyncDynamicKeyManager<K>,
}

impl<K: ApiKey> fmt::Debug for DynamicKeyManager<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("DynamicKeyManager")
            .field(&self.inner)
            .finish()
    }
}

impl DynamicKeyManager<HttpKey> {
    /// A builder around a sync key fetcher (run on a blocking thread).
    ///
    /// ```
    /// let b = apipool::sdk::DynamicKeyManager::builder(|| Ok(vec![]));
    /// # let _ = b;
    /// ```
    pub fn builder<F>(fetch_keys: F) -> DynamicBuilder<HttpKey>
    where
        F: Fn() -> Result<Vec<RemoteKey>, SdkError> + Send + Sync + 'static,
    {
        DynamicBuilder::new(Fetch::from_blocking(fetch_keys))
    }

    /// Same as [`AsyncDynamicKeyManager::from_session`]; start it with
    /// [`DynamicBuilder::start`].
    ///
    /// ```no_run
    /// # fn run(session: apipool::sdk::Session) -> Result<(), apipool::sdk::SdkError> {
    /// let mgr = apipool::sdk::DynamicKeyManager::from_session(&session, "prices").start()?;
    /// # let _ = mgr; Ok(()) }
    /// ```
    pub fn from_session(session: &Session, pool: &str) -> DynamicBuilder<HttpKey> {
        AsyncDynamicKeyManager::from_session(session, pool)
    }
}

impl<K: ApiKey> DynamicKeyManager<K> {
    /// The pool.
    ///
    /// ```
    /// # let mgr = apipool::sdk::DynamicKeyManager::builder(|| Ok(vec![])).start().unwrap();
    /// assert_eq!(mgr.pool().pool_size(), 0);
    /// ```
    pub fn pool(&self) -> &ApiKeyManager<K> {
        self.inner.pool()
    }

    /// Keys in the pool.
    ///
    /// ```
    /// # let mgr = apipool::sdk::DynamicKeyManager::builder(|| Ok(vec![])).start().unwrap();
    /// assert_eq!(mgr.pool_size(), 0);
    /// ```
    pub fn pool_size(&self) -> usize {
        self.inner.pool_size()
    }

    /// Refreshes now and reports what changed (blocks).
    ///
    /// ```
    /// # let mgr = apipool::sdk::DynamicKeyManager::builder(|| Ok(vec![])).start().unwrap();
    /// assert_eq!(mgr.refresh().pool_size, 0);
    /// ```
    pub fn refresh(&self) -> RefreshReport {
        let core = self.inner.core.clone();
        blocking::wait(async move { core.refresh().await })
    }

    /// Stops the refresher and runs the shutdown hooks (blocks). Idempotent.
    ///
    /// ```
    /// # let mgr = apipool::sdk::DynamicKeyManager::builder(|| Ok(vec![])).start().unwrap();
    /// mgr.shutdown();
    /// ```
    pub fn shutdown(&self) {
        self.inner.stop.cancel();
        let task = self.inner.task.lock().take();
        let hooks = self.inner.hooks.clone();
        blocking::wait(async move {
            if let Some(t) = task {
                let _ = t.await;
            }
            for hook in &hooks {
                hook().await;
            }
        });
    }
}

impl<K: ApiKey> Deref for DynamicKeyManager<K> {
    type Target = ApiKeyManager<K>;
    fn deref(&self) -> &ApiKeyManager<K> {
        self.inner.pool()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn diff_adds_removes_and_keeps() {
        let d = diff_keys(["a", "b", "c"], vec!["c", "d", "a", "d"], |k: &&str| *k);
        assert_eq!(d.add, vec!["d"]);
        assert_eq!(d.remove, vec!["b".to_owned()]);
        assert_eq!(d.keep, vec!["a".to_owned(), "c".to_owned()]);
        let d = diff_keys(["a"], Vec::<&str>::new(), |k: &&str| *k);
        assert_eq!(d.remove, vec!["a".to_owned()]);
        assert!(d.add.is_empty() && d.keep.is_empty());
    }

    proptest! {
        #[test]
        fn applying_the_diff_gives_the_fetched_set(
            current in proptest::collection::hash_set("[a-e]", 0..5),
            fetched in proptest::collection::vec("[a-g]", 0..8),
        ) {
            let d = diff_keys(current.iter().map(String::as_str), fetched.clone(), |k: &String| k.as_str());
            let mut after: HashSet<String> = current.clone();
            for r in &d.remove { prop_assert!(after.remove(r)); }
            for a in &d.add { prop_assert!(after.insert(a.clone())); }
            let want: HashSet<String> = fetched.into_iter().collect();
            prop_assert_eq!(after, want);
            prop_assert_eq!(d.keep.len() + d.remove.len(), current.len());
        }
    }
}
