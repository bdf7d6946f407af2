//! Live pool engines: one long-lived [`ApiKeyManager`] per pool, built from the database on first
//! use and then updated **in place** when the pool, its members or their keys change, so
//! rotation state, cooldowns, bans and rate-limit windows carry over from request to request.
//!
//! * [`Engines`] is the registry (a field of [`crate::http::AppState`]). The proxy resolves a
//!   pool by `(user, identifier)` in memory; a miss reads the pool row once and builds it.
//! * The pool and key handlers call [`Engines::pool_changed`], [`Engines::pool_deleted`] and
//!   [`Engines::keys_changed`] after their change is committed. Each one re-reads the pool and
//!   reconciles the engine by difference (add/remove keys, swap rotated secrets, apply
//!   disable/archive, config, strategy, upstream) — nothing is rebuilt. On PostgreSQL each change
//!   is also announced to the other replicas, whose live engines apply it at once (see
//!   [`crate::replicas`]); a background task re-syncs every live pool every [`RESYNC_INTERVAL`]
//!   as well, in case an announcement was missed.
//! * With `redis_url` set, every engine keeps its key state (rate-limit windows, calls in flight,
//!   cooldowns, bans, hand-made disable/archive) in Redis under `{redis_prefix}:{pool row id}`, so
//!   the replicas share each key's limits; keys are named there by their identifier, never by the
//!   raw key. While Redis is unreachable a pool fails closed (the proxy answers 503) or open (this
//!   process's own state, with a warning), as `redis_on_unavailable` says.
//! * Keys are identified in the engine by their row id (never the raw key); statistics name them
//!   by their identifier and the pool by its row id, through one [`StatsCollector`] writing into
//!   the server's own database.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use apipool::stats::{StatsCollector, StatsConfig};
use apipool::{ApiKey, ApiKeyManager, CallEvent, PoolConfig, StatsSink};
use arc_swap::ArcSwap;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use parking_lot::RwLock;
use secrecy::{ExposeSecret, SecretString};
use sqlx::Row;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use url::Url;

use crate::config::{Config, RedisFailMode};
use crate::db::{Db, DbKind};
use crate::http::error::{ApiError, ApiResult};
use crate::proxy::target::{Upstream, parse_base_url};
use crate::replicas::{self, Change, RedisProbe};
use crate::vault::{self, Sealed, Vault, key_aad_id};

/// How often live pools are re-read from the database (a safety net: other replicas' changes are
/// announced and applied at once, see [`crate::replicas`]).
pub const RESYNC_INTERVAL: Duration = Duration::from_secs(30);
/// How long a user's "active" flag is trusted on the proxy routes.
pub const USER_CACHE_TTL: Duration = Duration::from_secs(1);

tokio::task_local! {
    static CALL_LABEL: Arc<str>;
}

/// Runs `f` with a stats label ("GET /price") that every event recorded inside it carries.
pub async fn with_label<F: Future>(label: Arc<str>, f: F) -> F::Output {
    CALL_LABEL.scope(label, f).await
}

/// How often events gathered by the pools' sink are handed to the collector.
pub const STATS_HANDOVER_EVERY: Duration = Duration::from_millis(20);
/// Events the sink gathers before it hands them over at once, whatever the time.
const STATS_HANDOVER_AT: usize = 4096;

/// The stats sink of every live pool: events get the call's label from the task, and are
/// handed to the collector in bulk every [`STATS_HANDOVER_EVERY`]. (The collector's writer
/// commits one transaction per wake-up; under a steady stream of single events that is one
/// small transaction after another, which costs the proxy more CPU than the calls themselves.
/// Handing events over in bulk lets it write a few large transactions instead.)
struct LabelSink {
    collector: StatsCollector,
    gathered: parking_lot::Mutex<Vec<CallEvent>>,
}

impl LabelSink {
    /// Hands every gathered event to the collector (which never drops one).
    fn hand_over(&self) {
        let events = std::mem::take(&mut *self.gathered.lock());
        for e in events {
            self.collector.record(e);
        }
    }
}

impl StatsSink for LabelSink {
    fn record(&self, mut event: CallEvent) {
        if event.method.is_none() {
            event.method = CALL_LABEL.try_with(Arc::clone).ok();
        }
        let mut gathered = self.gathered.lock();
        gathered.push(event);
        if gathered.len() >= STATS_HANDOVER_AT {
            let events = std::mem::take(&mut *gathered);
            drop(gathered);
            for e in events {
                self.collector.record(e);
            }
        }
    }
}

/// A key's `client_config.base_url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyBaseUrl {
    /// Not set: the pool's upstream applies.
    Unset,
    /// Set and valid.
    Url(Url),
    /// Set but not a usable http(s) URL.
    Invalid(String),
}

/// What one key sends upstream: the secret and its `client_config`. `Debug` hides the secret.
pub struct KeyMaterial {
    secret: SecretString,
    /// `client_config.base_url`.
    pub base_url: KeyBaseUrl,
    /// `client_config.headers` (values marked sensitive).
    pub headers: HeaderMap,
}

impl std::fmt::Debug for KeyMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyMaterial")
            .field("base_url", &self.base_url)
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl KeyMaterial {
    fn new(secret: SecretString, client_config: Option<&str>) -> Self {
        let cfg: serde_json::Value = client_config
            .and_then(|s| serde_json::from_str(s).ok())
            .unwrap_or(serde_json::Value::Null);
        let base_url = match cfg.get("base_url") {
            None | Some(serde_json::Value::Null) => KeyBaseUrl::Unset,
            Some(serde_json::Value::String(s)) => match parse_base_url(s) {
                Ok(u) => KeyBaseUrl::Url(u),
                Err(e) => KeyBaseUrl::Invalid(e),
            },
            Some(_) => KeyBaseUrl::Invalid("base_url must be a string".to_owned()),
        };
        let mut headers = HeaderMap::new();
        if let Some(obj) = cfg.get("headers").and_then(serde_json::Value::as_object) {
            for (name, value) in obj {
                let (Ok(n), Some(v)) = (
                    HeaderName::from_bytes(name.as_bytes()),
                    value.as_str().and_then(|v| HeaderValue::from_str(v).ok()),
                ) else {
                    tracing::warn!(header = %name, "client_config.headers entry skipped: not a valid header");
                    continue;
                };
                let mut v = v;
                v.set_sensitive(true);
                headers.append(n, v);
            }
        }
        Self {
            secret,
            base_url,
            headers,
        }
    }

    /// The raw key.
    pub fn secret(&self) -> &SecretString {
        &self.secret
    }
}

/// The client handed to proxy calls: the key's material, swappable in place on rotation.
pub type KeyHandle = Arc<ArcSwap<KeyMaterial>>;

/// A pool member as the engine sees it: primary key = the key's row id.
pub struct ServerKey {
    id: String,
    identifier: String,
    weight: u32,
    material: KeyHandle,
}

impl std::fmt::Debug for ServerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerKey")
            .field("identifier", &self.identifier)
            .finish_non_exhaustive()
    }
}

impl ApiKey for ServerKey {
    type Client = KeyHandle;

    fn primary_key(&self) -> &str {
        &self.id
    }

    fn identifier(&self) -> String {
        self.identifier.clone()
    }

    fn create_client(&self) -> KeyHandle {
        self.material.clone()
    }

    fn weight(&self) -> u32 {
        self.weight
    }
}

/// The per-request view of a pool's settings (swapped whole on a change).
#[derive(Debug, Clone)]
pub struct PoolView {
    /// The pool's identifier.
    pub identifier: String,
    /// Enabled.
    pub active: bool,
    /// The pool's upstream (`None`: invoke needs each key's `client_config.base_url`).
    pub upstream: Option<Upstream>,
    /// Per-call timeout (`pool_config.timeout`).
    pub timeout: Duration,
    /// How long a request waits for a free key (`pool_config.max_wait`, default the timeout).
    pub max_wait: Duration,
    /// `pool_config.concurrency` as a pool-wide limit on calls in flight (`None`: unlimited).
    pub permits: Option<Arc<Semaphore>>,
    /// Why the stored `pool_config` could not be applied (defaults are used meanwhile).
    pub config_error: Option<String>,
}

/// How the pool owner left a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Admin {
    Usable,
    Disabled,
    Archived,
}

struct KeyEntry {
    identifier: String,
    fingerprint: String,
    client_config: Option<String>,
    weight: u32,
    admin: Admin,
    material: KeyHandle,
}

#[derive(Default)]
struct SyncState {
    keys: HashMap<String, KeyEntry>,
    /// Whether the pool's settings were applied once (the texts below are then meaningful).
    applied: bool,
    config_text: Option<String>,
    strategy: Option<String>,
    upstream_text: Option<String>,
    concurrency: Option<u32>,
}

/// One pool's live engine.
pub struct LivePool {
    /// The pool's row id.
    pub id: String,
    /// Its owner.
    pub user_id: String,
    manager: ApiKeyManager<ServerKey>,
    clock: Arc<dyn apipool::Clock>,
    view: ArcSwap<PoolView>,
    sync: tokio::sync::Mutex<SyncState>,
    stale: AtomicBool,
}

impl std::fmt::Debug for LivePool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LivePool")
            .field("id", &self.id)
            .field("identifier", &self.view.load().identifier)
            .finish_non_exhaustive()
    }
}

impl LivePool {
    /// The engine.
    pub fn manager(&self) -> &ApiKeyManager<ServerKey> {
        &self.manager
    }

    /// The current settings.
    pub fn view(&self) -> Arc<PoolView> {
        self.view.load_full()
    }

    /// "Now" on the engine's clock (to turn a key's `until` into wall-clock time).
    pub fn now(&self) -> Instant {
        self.clock.now()
    }
}

/// An [`apipool::Clock`] that can be shared (the registry's clock is replaceable in tests).
#[derive(Debug, Clone)]
struct SharedEngineClock(Arc<dyn apipool::Clock>);

impl apipool::Clock for SharedEngineClock {
    fn now(&self) -> Instant {
        self.0.now()
    }
}

/// The hasher of the maps every proxied request reads (the token cache hashes a ~200-byte JWT):
/// foldhash (seeded per process), several times faster than the standard SipHash on such keys.
/// Entries are only added for verified tokens, existing users and their pools.
type Fast = foldhash::fast::RandomState;
type ByName = HashMap<String, HashMap<String, Arc<LivePool>, Fast>, Fast>;
/// Access tokens verified before: token → (user id, expiry in unix seconds).
type TokenCache = HashMap<Box<str>, (Arc<str>, i64), Fast>;

/// The registry of live pool engines (see the module docs).
pub struct Engines {
    db: Db,
    vault: Arc<Vault>,
    stats: StatsCollector,
    sink: Arc<LabelSink>,
    upstream: crate::proxy::upstream::Upstream,
    clock: RwLock<Arc<dyn apipool::Clock>>,
    by_id: RwLock<HashMap<String, Arc<LivePool>>>,
    by_name: RwLock<ByName>,
    building: parking_lot::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    users: RwLock<HashMap<String, (bool, Instant), Fast>>,
    tokens: RwLock<TokenCache>,
    /// Where the database is (the replicas' change listener opens its own connection).
    database_url: String,
    /// This process's name in change announcements (its own are skipped).
    replica: String,
    /// Pools whose build was under way when another replica announced a change to them.
    changed_while_building: parking_lot::Mutex<std::collections::HashSet<String>>,
    /// Where every engine keeps its key state when Redis is configured.
    redis: Option<SharedState>,
}

/// The Redis every engine shares its key state on.
struct SharedState {
    store: apipool::RedisStoreConfig,
    mode: RedisFailMode,
    probe: RedisProbe,
}

impl std::fmt::Debug for Engines {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engines")
            .field("live_pools", &self.by_id.read().len())
            .finish_non_exhaustive()
    }
}

const POOL_ROW_SQL: &str = "SELECT id, user_id, identifier, is_active, rotation_strategy, pool_config, upstream \
    FROM pools WHERE id = $1";

const MEMBERS_SQL: &str = "SELECT k.id, k.identifier, k.client_config, k.is_active, k.is_archived, k.fingerprint, \
    m.weight, k.ciphertext, k.nonce, k.wrapped_dek, k.dek_nonce, k.master_version \
    FROM pool_members m JOIN api_keys k ON k.id = m.key_id WHERE m.pool_id = $1";

struct Member {
    id: String,
    identifier: String,
    client_config: Option<String>,
    admin: Admin,
    fingerprint: String,
    weight: u32,
    sealed: Sealed,
}

impl Engines {
    /// Opens the registry and its stats collector on the server's database, with the key-state
    /// store the configuration asks for (in memory, or Redis).
    pub async fn open(db: Db, vault: Arc<Vault>, config: &Config) -> anyhow::Result<Self> {
        let database_url = config.effective_database_url();
        let redis = match &config.redis_url {
            None => None,
            Some(url) => {
                let store = apipool::RedisStoreConfig::new(url)
                    .map_err(|e| anyhow::anyhow!("redis_url: {e}"))?
                    .prefix(config.redis_prefix.clone())
                    .on_unavailable(match config.redis_on_unavailable {
                        RedisFailMode::Closed => apipool::OnUnavailable::FailClosed,
                        RedisFailMode::Open => apipool::OnUnavailable::FailOpen,
                    });
                let probe = RedisProbe::new(url)?;
                if !probe.ping().await {
                    tracing::warn!(
                        endpoint = store.endpoint(),
                        on_unavailable = ?config.redis_on_unavailable,
                        "Redis is unreachable at start; pools connect as soon as it is back"
                    );
                }
                Some(SharedState {
                    store,
                    mode: config.redis_on_unavailable,
                    probe,
                })
            }
        };
        let database_url = database_url.as_str();
        let stats = StatsCollector::aopen_with(
            database_url,
            // The stats handlers flush once per request themselves.
            // Events wait up to 50 ms to form larger batches (one transaction each): under load
            // that is most of the writer's cost. Queries flush first, so they never miss one.
            StatsConfig::default()
                .linger(Duration::from_millis(50))
                .shutdown_timeout(Duration::from_secs(10))
                .flush_before_query(false),
        )
        .await
        .map_err(|e| anyhow::anyhow!("cannot open the statistics tables: {e}"))?;
        let upstream = crate::proxy::upstream::Upstream::new()?;
        Ok(Self {
            db,
            vault,
            sink: Arc::new(LabelSink {
                collector: stats.clone(),
                gathered: parking_lot::Mutex::new(Vec::new()),
            }),
            stats,
            upstream,
            clock: RwLock::new(Arc::new(apipool::SystemClock)),
            by_id: RwLock::new(HashMap::new()),
            by_name: RwLock::new(HashMap::default()),
            building: parking_lot::Mutex::new(HashMap::new()),
            users: RwLock::new(HashMap::default()),
            tokens: RwLock::new(HashMap::default()),
            database_url: database_url.to_owned(),
            replica: uuid::Uuid::new_v4().simple().to_string(),
            changed_while_building: parking_lot::Mutex::new(std::collections::HashSet::new()),
            redis,
        })
    }

    /// Whether Redis answers (`None`: no Redis configured).
    pub async fn redis_reachable(&self) -> Option<bool> {
        match &self.redis {
            Some(r) => Some(r.probe.ping().await),
            None => None,
        }
    }

    /// What the pools do while Redis is unreachable (`None`: no Redis configured).
    pub fn redis_fail_mode(&self) -> Option<RedisFailMode> {
        self.redis.as_ref().map(|r| r.mode)
    }

    /// The statistics collector (events of every pool; `pool` = the pool's row id). Call
    /// [`Self::flush_stats`] first to see every call made so far.
    pub fn stats(&self) -> &StatsCollector {
        &self.stats
    }

    /// Makes every event recorded so far visible to the collector's queries.
    pub async fn flush_stats(&self) -> Result<(), apipool::stats::StatsError> {
        self.sink.hand_over();
        self.stats.aflush().await
    }

    /// The proxy's upstream HTTP client (connection pooling, no redirects).
    pub fn upstream(&self) -> &crate::proxy::upstream::Upstream {
        &self.upstream
    }

    /// Replaces the engines' clock for pools built from now on (tests use
    /// [`apipool::ManualClock`] to expire cooldowns without sleeping).
    pub fn set_clock(&self, clock: Arc<dyn apipool::Clock>) {
        *self.clock.write() = clock;
    }

    /// Flushes the statistics and stops the writer.
    pub async fn close(&self) {
        self.sink.hand_over();
        if let Err(e) = self.stats.aclose().await {
            tracing::warn!(error = %e, "closing the statistics collector lost events");
        }
    }

    /// Number of live pools (for tests and metrics).
    pub fn live_pools(&self) -> usize {
        self.by_id.read().len()
    }

    /// Whether a user may use the proxy: the account exists and is active. Cached for
    /// [`USER_CACHE_TTL`] so the proxy's hot path does not read the users table per request.
    pub async fn check_user_active(&self, user_id: &str) -> ApiResult<()> {
        let cached = self.users.read().get(user_id).copied();
        if let Some((active, at)) = cached
            && at.elapsed() < USER_CACHE_TTL
        {
            return if active {
                Ok(())
            } else {
                Err(ApiError::Unauthorized(
                    "this account is disabled".to_owned(),
                ))
            };
        }
        let found = sqlx::query_scalar("SELECT is_active FROM users WHERE id = $1")
            .bind(user_id.to_owned())
            .fetch_optional(&self.db.pool)
            .await;
        let active: Option<i64> = match (found, cached) {
            (Ok(active), _) => active,
            // The database is down: keep answering from what was known (the proxy itself does not
            // need the database) and ask again after another TTL.
            (Err(e), Some((active, _))) if crate::db::is_unavailable(&e) => {
                tracing::debug!(error = %e, "users table unavailable; using the cached account state");
                Some(i64::from(active))
            }
            (Err(e), _) => return Err(e.into()),
        };
        let Some(active) = active else {
            self.users.write().remove(user_id);
            return Err(ApiError::Unauthorized("invalid access token".to_owned()));
        };
        let mut users = self.users.write();
        if users.len() > 100_000 {
            users.clear();
        }
        users.insert(user_id.to_owned(), (active != 0, Instant::now()));
        drop(users);
        if active == 0 {
            return Err(ApiError::Unauthorized(
                "this account is disabled".to_owned(),
            ));
        }
        Ok(())
    }

    /// The user of an access token this registry verified before and that has not expired at
    /// `now` (unix seconds): the proxy's hot path skips decoding and checking the signature again.
    pub fn verified_token(&self, token: &str, now: i64) -> Option<Arc<str>> {
        let tokens = self.tokens.read();
        let (user, exp) = tokens.get(token)?;
        (*exp > now).then(|| user.clone())
    }

    /// Remembers a token whose signature was verified (see [`Self::verified_token`]).
    pub fn remember_token(&self, token: &str, user: &str, exp: i64) {
        let mut tokens = self.tokens.write();
        if tokens.len() >= 10_000 {
            tokens.clear();
        }
        tokens.insert(Box::from(token), (Arc::from(user), exp));
    }

    /// The live engine of `user`'s pool `identifier` (built on first use); 404 when the user
    /// has no such pool.
    pub async fn resolve(&self, user_id: &str, identifier: &str) -> ApiResult<Arc<LivePool>> {
        let hit = self
            .by_name
            .read()
            .get(user_id)
            .and_then(|m| m.get(identifier))
            .cloned();
        if let Some(p) = hit {
            if p.stale.load(Ordering::Acquire) {
                self.reconcile(&p).await?;
            }
            return Ok(p);
        }
        let id: Option<String> =
            sqlx::query_scalar("SELECT id FROM pools WHERE user_id = $1 AND identifier = $2")
                .bind(user_id.to_owned())
                .bind(identifier.to_owned())
                .fetch_optional(&self.db.pool)
                .await?;
        let id = id.ok_or_else(|| ApiError::not_found("pool", identifier))?;
        let pool = self.get_or_build(&id).await?;
        // A rename may have raced with the lookup: answer only for the asked-for name.
        if pool.user_id != user_id || pool.view.load().identifier != identifier {
            return Err(ApiError::not_found("pool", identifier));
        }
        Ok(pool)
    }

    async fn get_or_build(&self, id: &str) -> ApiResult<Arc<LivePool>> {
        let live = self.by_id.read().get(id).cloned();
        if let Some(p) = live {
            if p.stale.load(Ordering::Acquire) {
                self.reconcile(&p).await?;
            }
            return Ok(p);
        }
        let lock = self
            .building
            .lock()
            .entry(id.to_owned())
            .or_default()
            .clone();
        let _guard = lock.lock().await;
        let live = self.by_id.read().get(id).cloned();
        if let Some(p) = live {
            return Ok(p);
        }
        let pool = match self.build(id).await {
            Ok(p) => p,
            Err(e) => {
                self.building.lock().remove(id);
                self.changed_while_building.lock().remove(id);
                return Err(e);
            }
        };
        self.by_id.write().insert(id.to_owned(), pool.clone());
        self.index(&pool);
        // Live first, then no longer building: a change announced in between is not lost.
        self.building.lock().remove(id);
        if self.changed_while_building.lock().remove(id) {
            // The build may have read the rows just before another replica's change.
            self.reconcile(&pool).await?;
        }
        Ok(pool)
    }

    async fn build(&self, id: &str) -> ApiResult<Arc<LivePool>> {
        let row = sqlx::query(POOL_ROW_SQL)
            .bind(id.to_owned())
            .fetch_optional(&self.db.pool)
            .await?
            .ok_or_else(|| ApiError::NotFound("pool not found".to_owned()))?;
        let user_id: String = row.try_get("user_id")?;
        let identifier: String = row.try_get("identifier")?;
        let clock = self.clock.read().clone();
        // A pool may well have no members yet: its engine starts empty.
        let builder = ApiKeyManager::builder()
            .allow_empty(true)
            .stats(self.sink.clone())
            .name(id.to_owned())
            .clock(SharedEngineClock(clock.clone()));
        let built = match &self.redis {
            None => builder.build(),
            // Its state lives under `{prefix}:{pool id}`. Building connects and loads the scripts
            // (blocking I/O, bounded by the connect timeout): off the async threads.
            Some(r) => {
                let builder = builder.redis(r.store.clone());
                tokio::task::spawn_blocking(move || builder.build())
                    .await
                    .map_err(|e| ApiError::Internal(anyhow::anyhow!("{e}")))?
            }
        };
        let manager = built.map_err(|e| {
            ApiError::Internal(anyhow::anyhow!("cannot build the pool engine: {e}"))
        })?;
        let pool = Arc::new(LivePool {
            id: id.to_owned(),
            user_id,
            manager,
            clock,
            view: ArcSwap::from_pointee(PoolView {
                identifier,
                active: false,
                upstream: None,
                timeout: Duration::from_secs(30),
                max_wait: Duration::from_secs(30),
                permits: None,
                config_error: None,
            }),
            sync: tokio::sync::Mutex::new(SyncState::default()),
            stale: AtomicBool::new(false),
        });
        self.reconcile(&pool).await?;
        Ok(pool)
    }

    fn index(&self, pool: &Arc<LivePool>) {
        let ident = pool.view.load().identifier.clone();
        let mut by_name = self.by_name.write();
        let user = by_name.entry(pool.user_id.clone()).or_default();
        user.retain(|_, p| p.id != pool.id);
        user.insert(ident, pool.clone());
    }

    fn forget(&self, id: &str) {
        let Some(pool) = self.by_id.write().remove(id) else {
            return;
        };
        let mut by_name = self.by_name.write();
        if let Some(user) = by_name.get_mut(&pool.user_id) {
            user.retain(|_, p| p.id != id);
            if user.is_empty() {
                by_name.remove(&pool.user_id);
            }
        }
    }

    /// Re-reads a live pool and reconciles its engine (no-op when the pool is not live), and
    /// tells the other replicas to do the same. Call after a change to the pool row or its
    /// members is committed. Never fails: an error is logged and the pool re-syncs on its next use.
    pub async fn pool_changed(&self, pool_id: &str) {
        self.announce(Change::Pool(pool_id.to_owned())).await;
        self.refresh_pool(pool_id).await;
    }

    /// Re-reads one live pool (this replica only).
    async fn refresh_pool(&self, pool_id: &str) {
        let live = self.by_id.read().get(pool_id).cloned();
        let Some(pool) = live else {
            if self.building.lock().contains_key(pool_id) {
                self.changed_while_building
                    .lock()
                    .insert(pool_id.to_owned());
            }
            return;
        };
        match self.reconcile(&pool).await {
            Ok(()) => {}
            // Deleted meanwhile (by another replica): already forgotten.
            Err(ApiError::NotFound(_)) => {}
            Err(e) => {
                pool.stale.store(true, Ordering::Release);
                tracing::warn!(pool_id, error = %e, "pool engine re-sync failed; retried on next use");
            }
        }
    }

    /// Drops the live engine of `user`'s pool `identifier` (after the pool was deleted), here
    /// and (announced in the background) on the other replicas.
    pub fn pool_deleted(&self, user_id: &str, identifier: &str) {
        let id = self
            .by_name
            .read()
            .get(user_id)
            .and_then(|m| m.get(identifier))
            .map(|p| p.id.clone());
        if let Some(id) = id {
            self.forget(&id);
        }
        // The other replicas re-read this user's live pools and drop the deleted one.
        if let Some(announce) = self.announcement(&Change::User(user_id.to_owned())) {
            tokio::spawn(announce);
        }
    }

    /// Re-syncs every live pool of `user` (after one of the user's keys was changed, rotated,
    /// disabled, archived or deleted), here and on the other replicas.
    pub async fn keys_changed(&self, user_id: &str) {
        self.announce(Change::User(user_id.to_owned())).await;
        self.refresh_user(user_id).await;
    }

    /// Re-reads every live pool of `user` (this replica only).
    async fn refresh_user(&self, user_id: &str) {
        if !self.building.lock().is_empty() {
            // A pool of this user may be under construction: check it once it is built.
            let building: Vec<String> = self.building.lock().keys().cloned().collect();
            self.changed_while_building.lock().extend(building);
        }
        let pools: Vec<Arc<LivePool>> = self
            .by_id
            .read()
            .values()
            .filter(|p| p.user_id == user_id)
            .cloned()
            .collect();
        for p in pools {
            self.refresh_pool(&p.id).await;
        }
    }

    /// Re-syncs every live pool of this replica (changes made by other replicas); drops deleted
    /// pools.
    pub async fn resync_all(&self) {
        let ids: Vec<String> = self.by_id.read().keys().cloned().collect();
        for id in ids {
            self.refresh_pool(&id).await;
        }
    }

    /// Applies a change another replica announced.
    pub async fn apply_remote(&self, change: Change) {
        tracing::debug!(?change, "applying another replica's change");
        match change {
            Change::Pool(id) => self.refresh_pool(&id).await,
            Change::User(id) => self.refresh_user(&id).await,
        }
    }

    /// This replica's name in change announcements.
    pub fn replica_id(&self) -> &str {
        &self.replica
    }

    /// Tells the other replicas about a committed change (PostgreSQL only; a failure is logged:
    /// they pick the change up on their periodic re-sync).
    async fn announce(&self, change: Change) {
        if let Some(announce) = self.announcement(&change) {
            announce.await;
        }
    }

    fn announcement(&self, change: &Change) -> Option<impl Future<Output = ()> + use<>> {
        if self.db.kind != DbKind::Postgres {
            return None;
        }
        let pool = self.db.pool.clone();
        let payload = change.encode(&self.replica);
        Some(async move {
            // `pg_notify` returns `void`, which the Any driver cannot decode: select a constant.
            let sent = sqlx::query("SELECT 1 AS sent FROM (SELECT pg_notify($1, $2)) AS n")
                .bind(replicas::CHANNEL)
                .bind(payload)
                .execute(&pool)
                .await;
            if let Err(e) = sent {
                tracing::warn!(error = %e, "cannot announce a change to the other replicas; they apply it on their next periodic re-sync");
            }
        })
    }

    /// Starts the background work until `token` is cancelled: statistics handed to the
    /// collector every [`STATS_HANDOVER_EVERY`], live pools re-synced every [`RESYNC_INTERVAL`],
    /// and (PostgreSQL) the other replicas' changes applied as they are announced.
    pub fn spawn_background(self: &Arc<Self>, token: CancellationToken) {
        if self.db.kind == DbKind::Postgres {
            tokio::spawn(replicas::listen(
                Arc::downgrade(self),
                self.database_url.clone(),
                self.replica.clone(),
                token.clone(),
            ));
        }
        let weak = Arc::downgrade(self);
        let stats_token = token.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(STATS_HANDOVER_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = stats_token.cancelled() => break,
                    _ = tick.tick() => {
                        let Some(engines) = weak.upgrade() else { break };
                        engines.sink.hand_over();
                    }
                }
            }
        });
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = token.cancelled() => break,
                    () = tokio::time::sleep(RESYNC_INTERVAL) => {
                        let Some(engines) = weak.upgrade() else { break };
                        engines.resync_all().await;
                    }
                }
            }
        });
    }

    async fn fetch_members(&self, pool_id: &str) -> ApiResult<Vec<Member>> {
        let rows = sqlx::query(MEMBERS_SQL)
            .bind(pool_id.to_owned())
            .fetch_all(&self.db.pool)
            .await?;
        rows.iter()
            .map(|r| {
                let active = r.try_get::<i64, _>("is_active")? != 0;
                let archived = r.try_get::<i64, _>("is_archived")? != 0;
                Ok(Member {
                    id: r.try_get("id")?,
                    identifier: r.try_get("identifier")?,
                    client_config: r.try_get("client_config")?,
                    admin: if !active {
                        Admin::Disabled
                    } else if archived {
                        Admin::Archived
                    } else {
                        Admin::Usable
                    },
                    fingerprint: r.try_get("fingerprint")?,
                    weight: u32::try_from(r.try_get::<i64, _>("weight")?.clamp(1, 1_000_000))
                        .unwrap_or(1),
                    sealed: vault::sealed_from_row(r)?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(ApiError::from)
    }

    /// Decrypts several keys (master keys fetched first, AES work off the async threads). A key
    /// that cannot be opened is left out and logged by identifier.
    async fn decrypt(&self, items: Vec<(String, String, Sealed)>) -> HashMap<String, SecretString> {
        let mut masters = HashMap::new();
        for (_, _, s) in &items {
            if let std::collections::hash_map::Entry::Vacant(slot) = masters.entry(s.master_version)
            {
                match self.vault.master_key(s.master_version).await {
                    Ok(k) => {
                        slot.insert(k);
                    }
                    Err(e) => tracing::error!(error = %e, "cannot load a master key"),
                }
            }
        }
        let opened = tokio::task::spawn_blocking(move || {
            items
                .into_iter()
                .filter_map(|(id, identifier, sealed)| {
                    let mk = masters.get(&sealed.master_version)?;
                    match vault::open_with(mk, &key_aad_id(&id), &sealed)
                        .ok()
                        .and_then(|p| String::from_utf8(p.to_vec()).ok())
                    {
                        Some(raw) => Some((id, SecretString::from(raw))),
                        None => {
                            tracing::error!(key = %identifier, "cannot decrypt key; left out of its pool");
                            None
                        }
                    }
                })
                .collect::<HashMap<_, _>>()
        })
        .await;
        opened.unwrap_or_default()
    }

    /// Brings a live pool in line with the database, in place.
    async fn reconcile(&self, pool: &Arc<LivePool>) -> ApiResult<()> {
        let mut st = pool.sync.lock().await;
        let Some(row) = sqlx::query(POOL_ROW_SQL)
            .bind(pool.id.clone())
            .fetch_optional(&self.db.pool)
            .await?
        else {
            drop(st);
            self.forget(&pool.id);
            return Err(ApiError::NotFound("pool not found".to_owned()));
        };
        let members = self.fetch_members(&pool.id).await?;
        let m = &pool.manager;

        // Keys whose secret we need: new ones and rotated ones.
        let need: Vec<(String, String, Sealed)> = members
            .iter()
            .filter(|mb| {
                st.keys
                    .get(&mb.id)
                    .is_none_or(|e| e.fingerprint != mb.fingerprint)
            })
            .map(|mb| (mb.id.clone(), mb.identifier.clone(), mb.sealed.clone()))
            .collect();
        let mut secrets = if need.is_empty() {
            HashMap::new()
        } else {
            self.decrypt(need).await
        };

        let wanted: std::collections::HashSet<&str> =
            members.iter().map(|mb| mb.id.as_str()).collect();
        let gone: Vec<String> = st
            .keys
            .keys()
            .filter(|id| !wanted.contains(id.as_str()))
            .cloned()
            .collect();
        for id in gone {
            st.keys.remove(&id);
            let _ = m.remove_one(&id);
        }

        for mb in members {
            let prev = st.keys.get(&mb.id).map(|e| {
                (
                    e.identifier == mb.identifier && e.weight == mb.weight,
                    e.fingerprint != mb.fingerprint,
                    e.client_config != mb.client_config,
                    e.admin,
                    e.material.clone(),
                )
            });
            let rotated = prev.as_ref().is_some_and(|p| p.1);
            let secret = match (secrets.remove(&mb.id), &prev) {
                (Some(s), _) => s,
                (None, Some(p)) if !rotated => p.4.load().secret.clone(),
                // Could not be decrypted: leave the key out.
                (None, _) => {
                    if st.keys.remove(&mb.id).is_some() {
                        let _ = m.remove_one(&mb.id);
                    }
                    continue;
                }
            };
            match prev {
                Some((true, rotated, reconfigured, prev_admin, material)) => {
                    if rotated || reconfigured {
                        material.store(Arc::new(KeyMaterial::new(
                            secret,
                            mb.client_config.as_deref(),
                        )));
                    }
                    if rotated && mb.admin == Admin::Usable {
                        // A new secret starts with a clean health record.
                        let _ = m.reset(&mb.id);
                    } else if prev_admin != mb.admin {
                        apply_admin(m, &mb.id, mb.admin);
                    }
                    if let Some(e) = st.keys.get_mut(&mb.id) {
                        e.fingerprint = mb.fingerprint;
                        e.client_config = mb.client_config;
                        e.admin = mb.admin;
                    }
                }
                other => {
                    // New, renamed or re-weighted: (re-)add. The identifier is what stats record.
                    if other.is_some() {
                        let _ = m.remove_one(&mb.id);
                    }
                    let material = Arc::new(ArcSwap::from_pointee(KeyMaterial::new(
                        secret,
                        mb.client_config.as_deref(),
                    )));
                    let key = ServerKey {
                        id: mb.id.clone(),
                        identifier: mb.identifier.clone(),
                        weight: mb.weight,
                        material: material.clone(),
                    };
                    if let Err(e) = m.add_one(key) {
                        st.keys.remove(&mb.id);
                        tracing::error!(key = %mb.identifier, error = %e, "cannot add key to its pool engine");
                        continue;
                    }
                    if mb.admin != Admin::Usable {
                        apply_admin(m, &mb.id, mb.admin);
                    } else if self.redis.is_some() {
                        clear_stale_hand_made_state(m, &mb.id);
                    }
                    st.keys.insert(
                        mb.id,
                        KeyEntry {
                            identifier: mb.identifier,
                            fingerprint: mb.fingerprint,
                            client_config: mb.client_config,
                            weight: mb.weight,
                            admin: mb.admin,
                            material,
                        },
                    );
                }
            }
        }

        // Pool settings.
        let identifier: String = row.try_get("identifier")?;
        let active = row.try_get::<i64, _>("is_active")? != 0;
        let strategy: String = row.try_get("rotation_strategy")?;
        let config_text: Option<String> = row.try_get("pool_config")?;
        let upstream_text: Option<String> = row.try_get("upstream")?;
        let old = pool.view.load_full();
        let mut view = (*old).clone();
        view.identifier = identifier;
        view.active = active;
        if st.strategy.as_deref() != Some(strategy.as_str()) {
            if let Err(e) = m.set_strategy_name(&strategy) {
                tracing::warn!(pool_id = %pool.id, error = %e, "unknown rotation strategy; keeping the previous one");
            }
            st.strategy = Some(strategy);
        }
        if !st.applied || st.config_text != config_text {
            let parsed = config_text
                .as_deref()
                .map_or(Ok(PoolConfig::default()), |t| {
                    serde_json::from_str::<serde_json::Value>(t)
                        .map_err(|e| e.to_string())
                        .and_then(|v| PoolConfig::from_json(&v).map_err(|e| e.to_string()))
                });
            let (cfg, err) = match parsed {
                Ok(c) => (c, None),
                Err(e) => {
                    tracing::warn!(pool_id = %pool.id, error = %e, "stored pool_config cannot be applied; using defaults");
                    (PoolConfig::default(), Some(e))
                }
            };
            if let Err(e) = m.apply_config(&cfg) {
                tracing::warn!(pool_id = %pool.id, error = %e, "pool_config rejected by the engine");
                view.config_error = Some(e.to_string());
            } else {
                view.config_error = err;
            }
            view.timeout = cfg.timeout_duration();
            view.max_wait = cfg.max_wait_duration();
            if st.concurrency != Some(cfg.concurrency) {
                view.permits = (cfg.concurrency > 0)
                    .then(|| Arc::new(Semaphore::new(cfg.concurrency as usize)));
                st.concurrency = Some(cfg.concurrency);
            }
            st.config_text = config_text;
        }
        if !st.applied || st.upstream_text != upstream_text {
            view.upstream = upstream_text
                .as_deref()
                .and_then(|t| serde_json::from_str::<serde_json::Value>(t).ok())
                .and_then(|v| match Upstream::from_json(&v) {
                    Ok(u) => u,
                    Err(e) => {
                        tracing::warn!(pool_id = %pool.id, error = %e, "stored upstream is not usable");
                        None
                    }
                });
            st.upstream_text = upstream_text;
        }
        st.applied = true;
        let renamed = view.identifier != old.identifier;
        pool.view.store(Arc::new(view));
        pool.stale.store(false, Ordering::Release);
        drop(st);
        let still_live = self.by_id.read().contains_key(&pool.id);
        if renamed && still_live {
            self.index(pool);
        }
        Ok(())
    }
}

fn apply_admin(m: &ApiKeyManager<ServerKey>, id: &str, admin: Admin) {
    let r = match admin {
        Admin::Disabled => m.disable(id),
        Admin::Archived => m.archive(id),
        Admin::Usable => m.reset(id),
    };
    if let Err(e) = r {
        tracing::warn!(error = %e, "cannot apply a key's state to its pool engine");
    }
}

/// A key added to a Redis-backed engine takes the health already shared in Redis (cooldowns,
/// bans, windows: right to keep). A hand-made disable or archive kept there is stale when the
/// database says the key is usable (e.g. the key was enabled while out of this pool, or deleted
/// and made again under the same identifier): undo it.
fn clear_stale_hand_made_state(m: &ApiKeyManager<ServerKey>, id: &str) {
    let stale = match m.explain(id).map(|r| r.state) {
        Ok(apipool::KeyState::Disabled) => m.enable(id),
        Ok(apipool::KeyState::Archived {
            reason: apipool::ArchiveReason::Manual,
        }) => m.reset(id),
        _ => Ok(()),
    };
    if let Err(e) = stale {
        tracing::warn!(error = %e, "cannot restore a key's shared state to its pool engine");
    }
}

/// The raw key of a material, for building a request.
pub fn expose(material: &KeyMaterial) -> &str {
    material.secret().expose_secret()
}
