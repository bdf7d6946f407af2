//! Shared server state: keys with their windows, run-time settings and counters.
//!
//! Locking: the key table of configured keys is built at start and never locked; each key's
//! window and quota sit in their own `parking_lot::Mutex`, held only for the admission decision
//! (never across an await). Counters are relaxed atomics.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use dashmap::DashMap;
use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ConfigError, ConfigPatch, Settings, SettingsView, mask_key};
use crate::stats::{FaultStats, KeyStats, StatsSnapshot};
use crate::window::{Admission, QuotaCounter, SlidingWindowLog};

/// Distinct keys remembered under `accept_any_key`; past this, new keys get 401.
const MAX_DYNAMIC_KEYS: usize = 100_000;
/// Distinct `id` values counted; past this, 200s go to `ids_overflow`.
const MAX_IDS: usize = 1_000_000;
/// Status codes are counted in a flat array indexed by code.
const STATUS_SLOTS: usize = 600;

/// The state behind [`crate::router`]: cheap to clone (one `Arc`).
#[derive(Clone)]
pub struct MockState {
    inner: Arc<Inner>,
}

struct Inner {
    settings: ArcSwap<Settings>,
    patch_lock: Mutex<()>,
    error_burst: AtomicU64,
    keys: HashMap<Box<str>, Arc<KeyState>>,
    dynamic: DashMap<Box<str>, Arc<KeyState>>,
    next_index: AtomicUsize,
    rng: Option<Mutex<StdRng>>,
    total: AtomicU64,
    by_status: Box<[AtomicU64]>,
    unknown_key: AtomicU64,
    ids: DashMap<Box<str>, u64>,
    ids_overflow: AtomicU64,
    faults: FaultCounters,
    shutdown: CancellationToken,
}

/// One key: its limits and its counters.
pub(crate) struct KeyState {
    pub(crate) index: usize,
    pub(crate) masked: String,
    limits: Mutex<Limits>,
    pub(crate) counters: KeyCounters,
}

#[derive(Default)]
struct Limits {
    window: SlidingWindowLog,
    quota: QuotaCounter,
}

#[derive(Default)]
pub(crate) struct KeyCounters {
    pub(crate) admitted: AtomicU64,
    pub(crate) admitted_ok: AtomicU64,
    pub(crate) rate_limited: AtomicU64,
    pub(crate) errors: AtomicU64,
    pub(crate) unauthorized: AtomicU64,
    pub(crate) quota_exhausted: AtomicU64,
}

#[derive(Default)]
pub(crate) struct FaultCounters {
    pub(crate) timeouts: AtomicU64,
    pub(crate) resets: AtomicU64,
    pub(crate) truncated: AtomicU64,
    pub(crate) slow_bodies: AtomicU64,
    pub(crate) burst_errors: AtomicU64,
    pub(crate) random_errors: AtomicU64,
}

/// The result of looking a presented key up.
pub(crate) enum Lookup {
    Known(Arc<KeyState>),
    Unknown,
    TooManyKeys,
}

/// The x-ratelimit-* values for one response.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RateHeaders {
    pub(crate) limit: u32,
    pub(crate) remaining: u32,
    pub(crate) reset: Duration,
}

/// The quota/window decision for one request.
pub(crate) enum Gate {
    QuotaExhausted(Duration),
    Limited(Duration),
    Admitted,
}

pub(crate) fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

impl KeyState {
    fn new(index: usize, raw: &str) -> Self {
        Self {
            index,
            masked: mask_key(raw),
            limits: Mutex::new(Limits::default()),
            counters: KeyCounters::default(),
        }
    }

    /// Quota, then window; an admitted request is recorded in both.
    pub(crate) fn gate(&self, s: &Settings, now: Instant) -> (Gate, Option<RateHeaders>) {
        let mut l = self.limits.lock();
        if let Some(quota) = s.daily_quota
            && let Err(wait) = l.quota.check(now, quota, s.quota_period)
        {
            let headers = rate_headers(s, l.window.peek(now, s.rate, s.interval));
            return (Gate::QuotaExhausted(wait), headers);
        }
        match l.window.try_admit(now, s.rate, s.interval) {
            Admission::Admitted {
                remaining,
                reset_after,
            } => {
                l.quota.consume();
                (Gate::Admitted, rate_headers(s, (remaining, reset_after)))
            }
            Admission::Limited { retry_after } => {
                let headers = rate_headers(s, (0, retry_after));
                (Gate::Limited(retry_after), headers)
            }
        }
    }

    /// Rate headers for an answer that did not go through the window.
    pub(crate) fn peek_headers(&self, s: &Settings, now: Instant) -> Option<RateHeaders> {
        if !s.ratelimit_headers || s.rate == 0 {
            return None;
        }
        rate_headers(s, self.limits.lock().window.peek(now, s.rate, s.interval))
    }

    fn snapshot(&self) -> KeyStats {
        let c = &self.counters;
        KeyStats {
            index: self.index,
            key: self.masked.clone(),
            admitted: get(&c.admitted),
            admitted_ok: get(&c.admitted_ok),
            rate_limited: get(&c.rate_limited),
            errors: get(&c.errors),
            unauthorized: get(&c.unauthorized),
            quota_exhausted: get(&c.quota_exhausted),
        }
    }

    fn reset(&self) {
        let mut l = self.limits.lock();
        l.window.clear();
        l.quota.clear();
        drop(l);
        let c = &self.counters;
        for a in [
            &c.admitted,
            &c.admitted_ok,
            &c.rate_limited,
            &c.errors,
            &c.unauthorized,
            &c.quota_exhausted,
        ] {
            a.store(0, Ordering::Relaxed);
        }
    }
}

fn rate_headers(s: &Settings, (remaining, reset): (u32, Duration)) -> Option<RateHeaders> {
    (s.ratelimit_headers && s.rate > 0).then_some(RateHeaders {
        limit: s.rate,
        remaining,
        reset,
    })
}

impl MockState {
    /// Builds the state for `config`.
    ///
    /// # Errors
    /// When a value is out of range (see [`ConfigError`]).
    pub fn new(config: &Config) -> Result<Self, ConfigError> {
        let settings = config.settings()?;
        let keys = config
            .keys
            .iter()
            .enumerate()
            .map(|(i, k)| {
                (
                    Box::from(k.expose()),
                    Arc::new(KeyState::new(i, k.expose())),
                )
            })
            .collect::<HashMap<_, _>>();
        let next_index = AtomicUsize::new(keys.len());
        Ok(Self {
            inner: Arc::new(Inner {
                settings: ArcSwap::from_pointee(settings),
                patch_lock: Mutex::new(()),
                error_burst: AtomicU64::new(config.error_burst),
                keys,
                dynamic: DashMap::new(),
                next_index,
                rng: config.seed.map(|s| Mutex::new(StdRng::seed_from_u64(s))),
                total: AtomicU64::new(0),
                by_status: (0..STATUS_SLOTS).map(|_| AtomicU64::new(0)).collect(),
                unknown_key: AtomicU64::new(0),
                ids: DashMap::new(),
                ids_overflow: AtomicU64::new(0),
                faults: FaultCounters::default(),
                shutdown: CancellationToken::new(),
            }),
        })
    }

    /// A copy of every counter.
    pub fn stats(&self) -> StatsSnapshot {
        let i = &*self.inner;
        let mut keys: Vec<KeyStats> = i.keys.values().map(|k| k.snapshot()).collect();
        keys.extend(i.dynamic.iter().map(|e| e.value().snapshot()));
        keys.sort_by_key(|k| k.index);
        let by_status = i
            .by_status
            .iter()
            .enumerate()
            .filter_map(|(code, n)| {
                let n = get(n);
                (n > 0).then(|| (u16::try_from(code).unwrap_or(u16::MAX), n))
            })
            .collect();
        let ids = i
            .ids
            .iter()
            .map(|e| (e.key().to_string(), *e.value()))
            .collect::<BTreeMap<_, _>>();
        let f = &i.faults;
        StatsSnapshot {
            total_requests: get(&i.total),
            by_status,
            unknown_key: get(&i.unknown_key),
            keys,
            ids,
            ids_overflow: get(&i.ids_overflow),
            faults: FaultStats {
                timeouts: get(&f.timeouts),
                resets: get(&f.resets),
                truncated: get(&f.truncated),
                slow_bodies: get(&f.slow_bodies),
                burst_errors: get(&f.burst_errors),
                random_errors: get(&f.random_errors),
            },
        }
    }

    /// The counters of one key, looked up by its raw value (the raw key is not returned).
    pub fn key_stats(&self, raw_key: &str) -> Option<KeyStats> {
        let i = &*self.inner;
        match i.keys.get(raw_key) {
            Some(k) => Some(k.snapshot()),
            None => i.dynamic.get(raw_key).map(|k| k.snapshot()),
        }
    }

    /// Zeroes every counter and empties every window and quota. Settings are kept.
    pub fn reset(&self) {
        let i = &*self.inner;
        for k in i.keys.values() {
            k.reset();
        }
        for e in &i.dynamic {
            e.value().reset();
        }
        for a in i.by_status.iter() {
            a.store(0, Ordering::Relaxed);
        }
        let f = &i.faults;
        for a in [
            &i.total,
            &i.unknown_key,
            &i.ids_overflow,
            &f.timeouts,
            &f.resets,
            &f.truncated,
            &f.slow_bodies,
            &f.burst_errors,
            &f.random_errors,
        ] {
            a.store(0, Ordering::Relaxed);
        }
        i.ids.clear();
    }

    /// Changes the run-time behaviour. Nothing changes when the patch is refused.
    ///
    /// # Errors
    /// When a value is out of range (see [`ConfigError`]).
    pub fn update(&self, patch: &ConfigPatch) -> Result<SettingsView, ConfigError> {
        let i = &*self.inner;
        let _serialised = i.patch_lock.lock();
        let next = i.settings.load().patched(patch)?;
        i.settings.store(Arc::new(next));
        if let Some(n) = patch.error_burst {
            i.error_burst.store(n, Ordering::Relaxed);
        }
        Ok(self.settings())
    }

    /// The behaviour in force.
    pub fn settings(&self) -> SettingsView {
        let i = &*self.inner;
        i.settings.load().view(get(&i.error_burst))
    }

    pub(crate) fn current(&self) -> arc_swap::Guard<Arc<Settings>> {
        self.inner.settings.load()
    }

    pub(crate) fn lookup(&self, raw: &str, accept_any: bool) -> Lookup {
        let i = &*self.inner;
        if let Some(k) = i.keys.get(raw) {
            return Lookup::Known(Arc::clone(k));
        }
        if !accept_any {
            return Lookup::Unknown;
        }
        if let Some(k) = i.dynamic.get(raw) {
            return Lookup::Known(Arc::clone(k.value()));
        }
        if i.dynamic.len() >= MAX_DYNAMIC_KEYS {
            return Lookup::TooManyKeys;
        }
        let entry = i.dynamic.entry(Box::from(raw)).or_insert_with(|| {
            let index = i.next_index.fetch_add(1, Ordering::Relaxed);
            Arc::new(KeyState::new(index, raw))
        });
        Lookup::Known(Arc::clone(entry.value()))
    }

    pub(crate) fn count_request(&self) {
        inc(&self.inner.total);
    }

    pub(crate) fn count_status(&self, code: u16) {
        if let Some(slot) = self.inner.by_status.get(usize::from(code)) {
            inc(slot);
        }
    }

    pub(crate) fn count_unknown_key(&self) {
        inc(&self.inner.unknown_key);
    }

    pub(crate) fn faults(&self) -> &FaultCounters {
        &self.inner.faults
    }

    pub(crate) fn count_id(&self, id: &str) {
        let ids = &self.inner.ids;
        if let Some(mut n) = ids.get_mut(id) {
            *n += 1;
        } else if ids.len() < MAX_IDS {
            *ids.entry(Box::from(id)).or_insert(0) += 1;
        } else {
            inc(&self.inner.ids_overflow);
        }
    }

    /// Takes one request from the error burst, if any is left.
    pub(crate) fn take_burst(&self) -> bool {
        self.inner
            .error_burst
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok()
    }

    /// True with probability `p` (seeded when the config has a seed).
    pub(crate) fn roll(&self, p: f64) -> bool {
        if p <= 0.0 {
            return false;
        }
        if p >= 1.0 {
            return true;
        }
        match &self.inner.rng {
            Some(rng) => rng.lock().random_bool(p),
            None => rand::rng().random_bool(p),
        }
    }

    /// Uniform in `0..=max_ms` milliseconds.
    pub(crate) fn jitter(&self, max_ms: u64) -> Duration {
        if max_ms == 0 {
            return Duration::ZERO;
        }
        let ms = match &self.inner.rng {
            Some(rng) => rng.lock().random_range(0..=max_ms),
            None => rand::rng().random_range(0..=max_ms),
        };
        Duration::from_millis(ms)
    }

    pub(crate) fn shutdown_token(&self) -> &CancellationToken {
        &self.inner.shutdown
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seeded(seed: u64) -> MockState {
        MockState::new(&Config {
            seed: Some(seed),
            ..Config::default()
        })
        .expect("valid config")
    }

    #[test]
    fn seeded_draws_repeat_and_stay_in_range() {
        let (a, b) = (seeded(3), seeded(3));
        let draws = |s: &MockState| -> Vec<(bool, Duration)> {
            (0..200).map(|_| (s.roll(0.5), s.jitter(40))).collect()
        };
        let da = draws(&a);
        assert_eq!(da, draws(&b));
        assert!(da.iter().all(|&(_, j)| j <= Duration::from_millis(40)));
        let trues = da.iter().filter(|&&(r, _)| r).count();
        assert!((60..=140).contains(&trues), "{trues}");
        assert!(!a.roll(0.0) && a.roll(1.0));
        assert_eq!(a.jitter(0), Duration::ZERO);
    }

    #[test]
    fn error_burst_is_taken_once_per_request() {
        let s = MockState::new(&Config {
            error_burst: 2,
            ..Config::default()
        })
        .expect("valid config");
        assert!(s.take_burst() && s.take_burst());
        assert!(!s.take_burst());
        assert_eq!(s.settings().error_burst, 0);
    }

    #[test]
    fn accept_any_key_assigns_indexes_after_configured_keys() {
        let s = MockState::new(&Config::with_keys(["a", "b"]).expect("keys")).expect("valid");
        assert!(matches!(s.lookup("zzz", false), Lookup::Unknown));
        let Lookup::Known(k) = s.lookup("zzz", true) else {
            panic!("accept_any_key admits new keys");
        };
        assert_eq!(k.index, 2);
        let Lookup::Known(again) = s.lookup("zzz", true) else {
            panic!("known now");
        };
        assert!(Arc::ptr_eq(&k, &again));
        assert_eq!(s.stats().keys.len(), 3);
    }
}
