//! The engine: a pure state machine for key selection, per-key limits and health.
//!
//! It does no I/O, never sleeps and never reads the clock: callers pass `now`. Shells (sync, async,
//! batch, proxy) wrap it in a lock and adapt its answers — a lease, "wait until t", or "no usable
//! key" — to their way of waiting.

mod log;
mod select;

use crate::config::{RateLimit, Strategy};
use crate::outcome::Outcome;
use log::{Log, Tally};
use rand::SeedableRng;
use rand::rngs::SmallRng;
use select::Selector;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Engine time: nanoseconds since the engine's origin instant.
type Tick = u64;

/// "No time" for optional tick fields of the hot slot (ticks never reach it: 584 years).
const NO_TICK: Tick = Tick::MAX;

/// "No scope" for a key's scope index.
const NO_SCOPE: u32 = u32::MAX;

/// "No key" in the picks drawn ahead.
const NO_KEY: u32 = u32::MAX;

/// Calls served by one batch of reads ahead: every `BATCH` calls an engine that looks ahead
/// reads, at once, the lines the next `2 × BATCH` picks need (see [`Engine::look_ahead`]).
pub(crate) const BATCH: usize = 16;

/// Room for the picks drawn ahead (random, weighted): two batches.
pub(crate) const RING: usize = 2 * BATCH;

/// Key slots from which an engine looks ahead (draws its next picks early and reads their cache
/// lines so that they arrive while the current call runs). Below it every key's lines stay in
/// the cache anyway: 1,024 hot slots are 128 KiB.
const AHEAD_FROM: usize = 1024;

/// Tunables the engine enforces (built from [`crate::PoolConfig`] and the builder).
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) limits: Vec<RateLimit>,
    pub(crate) max_in_flight: u32,
    pub(crate) ban_threshold: u32,
    pub(crate) ban_duration: Duration,
    pub(crate) default_cooldown: Duration,
    pub(crate) archive_on_rate_limit: bool,
    pub(crate) learn: bool,
    pub(crate) learned_ttl: Duration,
    pub(crate) scope_refusal_keys: u32,
    pub(crate) scope_refusal_window: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            limits: Vec::new(),
            max_in_flight: 0,
            ban_threshold: 3,
            ban_duration: Duration::from_secs(300),
            default_cooldown: Duration::from_secs(1),
            archive_on_rate_limit: false,
            learn: true,
            learned_ttl: Duration::from_secs(600),
            scope_refusal_keys: 2,
            scope_refusal_window: Duration::from_secs(1),
        }
    }
}

/// Why a key is cooling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CoolReason {
    /// The upstream answered with a rate limit (429).
    RateLimited,
    /// The key's quota is used up (402, daily quota).
    QuotaExhausted,
}

/// Why a key is archived.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ArchiveReason {
    /// The upstream refused the key (401/403).
    InvalidKey,
    /// Archived on a rate limit (the seed's behaviour, when `archive_on_rate_limit` is on).
    RateLimited,
    /// `check_usable` found it unusable.
    Unusable,
    /// Archived by hand (or removed from the server while calls were in flight).
    Manual,
}

/// A key's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyState {
    /// In rotation.
    Active,
    /// Out of rotation until `until`, then back by itself.
    Cooling {
        /// When the key comes back.
        until: Instant,
        /// Why it cools.
        reason: CoolReason,
    },
    /// Banned after too many consecutive failures, until `until`.
    Banned {
        /// When the key is re-admitted.
        until: Instant,
    },
    /// Out of rotation until restored.
    Archived {
        /// Why.
        reason: ArchiveReason,
    },
    /// Switched off by hand until enabled.
    Disabled,
}

impl KeyState {
    /// A short name: "active", "cooling", "banned", "archived", "disabled".
    pub const fn name(&self) -> &'static str {
        match self {
            KeyState::Active => "active",
            KeyState::Cooling { .. } => "cooling",
            KeyState::Banned { .. } => "banned",
            KeyState::Archived { .. } => "archived",
            KeyState::Disabled => "disabled",
        }
    }

    /// When a cooling or banned key comes back by itself.
    pub const fn until(&self) -> Option<Instant> {
        match self {
            KeyState::Cooling { until, .. } | KeyState::Banned { until } => Some(*until),
            _ => None,
        }
    }
}

/// Everything the engine knows about one key, and why it would be skipped now.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyReport {
    /// The key's safe identifier.
    pub identifier: Arc<str>,
    /// Its health state (an expired cooldown or ban already counts as active).
    pub state: KeyState,
    /// Whether the next acquire could pick it.
    pub available: bool,
    /// Why it would be skipped, in words; `None` when available.
    pub skipped_because: Option<String>,
    /// Calls in flight on it.
    pub in_flight: u32,
    /// Consecutive failures counted toward a ban.
    pub consecutive_failures: u32,
    /// Leases granted over its lifetime.
    pub calls: u64,
    /// Successful calls.
    pub successes: u64,
    /// Failed or timed-out calls.
    pub failures: u64,
    /// Rate-limited calls.
    pub rate_limited: u64,
    /// The limit learned from 429s (calls, window), when no limit was configured.
    pub learned_limit: Option<(u32, Duration)>,
    /// The quota scope it belongs to.
    pub scope: Option<Arc<str>>,
}

/// Proof of one granted lease; hand it back with [`Engine::report`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LeaseToken {
    pub(crate) idx: u32,
    gen_: u32,
    at: Tick,
}

/// The engine's answer to "give me a key".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Acquire {
    Granted(LeaseToken),
    /// Nothing is free now. `until`: the earliest moment a key frees up by time; `None`: only a
    /// finishing call can free one. Either way a release may come first.
    Wait {
        until: Option<Instant>,
    },
    /// No key can become free without an administrative action (all archived/disabled, or none).
    NoUsableKeys,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Active,
    Cooling { until: Tick, reason: CoolReason },
    Banned { until: Tick },
    Archived(ArchiveReason),
    Disabled,
}

/// A key's state as the hot slot stores it: a tag byte and a reason byte (the time is `until`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Tag {
    Active,
    Cooling,
    Banned,
    Archived,
    Disabled,
}

/// Picks drawn ahead, oldest first (random and weighted; see [`Engine::look_ahead`]).
#[derive(Debug)]
struct Ahead {
    ring: [u32; RING],
    head: usize,
    len: usize,
    /// Calls left before the next batch of reads ahead (0: the next call reads).
    due: usize,
}

impl Ahead {
    const fn new() -> Self {
        Self {
            ring: [0; RING],
            head: 0,
            len: 0,
            due: 0,
        }
    }

    /// Drops every pick drawn ahead; the next call reads ahead again.
    fn clear(&mut self) {
        self.len = 0;
        self.due = 0;
    }

    fn pop(&mut self) -> Option<u32> {
        if self.len == 0 {
            return None;
        }
        let k = self.ring[self.head];
        self.head = (self.head + 1) % RING;
        self.len -= 1;
        Some(k)
    }

    fn push(&mut self, k: u32) {
        self.ring[(self.head + self.len) % RING] = k;
        self.len += 1;
    }

    #[cfg(test)]
    fn get(&self, i: usize) -> Option<u32> {
        (i < self.len).then(|| self.ring[(self.head + i) % RING])
    }
}

/// Everything one acquire + report reads or writes on a key, packed in two cache lines
/// (`repr(C)`: the order is the layout, checked by a test). A pick in a 100,000-key pool touches
/// these 128 bytes and the tail of the key's log, nothing else of the key; what only
/// [`Engine::explain`] and rare events read lives in [`Cold`].
#[derive(Debug)]
#[repr(C, align(64))]
struct Slot {
    /// When a cooling or banned key comes back.
    until: Tick,
    /// The time of the key's pending timer ([`NO_TICK`]: none); a heap entry is valid only if it
    /// matches.
    timer: Tick,
    last_used: u64,
    calls: u64,
    successes: u64,
    /// The learning epoch: successes acquired from `epoch_start` on, the first acquired at
    /// `epoch_first` ([`NO_TICK`]: none yet).
    epoch_start: Tick,
    epoch_first: Tick,
    /// A learned limit: `learned_limit` calls per `learned_interval`, learned at `learned_at`
    /// (`learned_limit == 0`: none; a learned limit is never 0).
    learned_interval: Tick,
    learned_at: Tick,
    log: Log,
    gen_: u32,
    in_flight: u32,
    /// Its quota scope ([`NO_SCOPE`]: none).
    scope: u32,
    consecutive_failures: u32,
    epoch_successes: u32,
    learned_limit: u32,
    tag: Tag,
    /// `CoolReason` or `ArchiveReason` as a byte, by `tag`.
    reason: u8,
    live: bool,
    parked: bool,
    /// In the selector (mirrors `Selector::contains`, so a report need not read the selector's
    /// tables).
    listed: bool,
}

/// What is read rarely: by `explain`, on failures and rate limits, when a key is added.
#[derive(Debug)]
struct Cold {
    id: Arc<str>,
    weight: u32,
    failures: u64,
    rate_limited: u64,
    /// The learning epoch a learned limit came from: successes acquired in it and reported late
    /// still count toward the limit.
    learned_from: Tick,
    learned_to: Tick,
}

const COOL_REASONS: [CoolReason; 2] = [CoolReason::RateLimited, CoolReason::QuotaExhausted];
const ARCHIVE_REASONS: [ArchiveReason; 4] = [
    ArchiveReason::InvalidKey,
    ArchiveReason::RateLimited,
    ArchiveReason::Unusable,
    ArchiveReason::Manual,
];

impl Slot {
    fn new(gen_: u32, scope: u32, now: Tick) -> Self {
        Self {
            until: 0,
            timer: NO_TICK,
            last_used: 0,
            calls: 0,
            successes: 0,
            epoch_start: now,
            epoch_first: NO_TICK,
            learned_interval: 0,
            learned_at: 0,
            log: Log::default(),
            gen_,
            in_flight: 0,
            scope,
            consecutive_failures: 0,
            epoch_successes: 0,
            learned_limit: 0,
            tag: Tag::Active,
            reason: 0,
            live: true,
            parked: false,
            listed: false,
        }
    }

    fn state(&self) -> State {
        match self.tag {
            Tag::Active => State::Active,
            Tag::Cooling => State::Cooling {
                until: self.until,
                reason: COOL_REASONS[usize::from(self.reason)],
            },
            Tag::Banned => State::Banned { until: self.until },
            Tag::Archived => State::Archived(ARCHIVE_REASONS[usize::from(self.reason)]),
            Tag::Disabled => State::Disabled,
        }
    }

    fn set_state(&mut self, state: State) {
        (self.tag, self.reason) = match state {
            State::Active => (Tag::Active, 0),
            State::Cooling { until, reason } => {
                self.until = until;
                (Tag::Cooling, reason as u8)
            }
            State::Banned { until } => {
                self.until = until;
                (Tag::Banned, 0)
            }
            State::Archived(reason) => (Tag::Archived, reason as u8),
            State::Disabled => (Tag::Disabled, 0),
        };
    }

    /// The learned limit still in force at `now`: (calls, window).
    fn learned_in_force(&self, ttl: Tick, now: Tick) -> Option<(u32, Tick)> {
        (self.learned_limit > 0 && self.learned_at.saturating_add(ttl) > now)
            .then_some((self.learned_limit, self.learned_interval))
    }

    /// Starts a new learning epoch at `now`.
    fn restart_epoch(&mut self, now: Tick) {
        self.epoch_start = now;
        self.epoch_successes = 0;
        self.epoch_first = NO_TICK;
    }
}

/// What the engine derives from [`Settings`] once, not on every call.
#[derive(Debug, Clone, Default)]
struct Derived {
    /// Configured windows as (calls, window length with margin).
    windows: Vec<(u32, Tick)>,
    /// The largest configured limit (how many completion times a key must keep).
    window_cap: u32,
    /// Learning a limit from 429s: on, and nothing configured.
    learning: bool,
    learned_ttl: Tick,
}

impl Derived {
    fn new(settings: &Settings) -> Self {
        Self {
            windows: settings
                .limits
                .iter()
                .map(|l| (l.limit(), nanos(l.effective_interval())))
                .collect(),
            window_cap: settings.limits.iter().map(|l| l.limit()).max().unwrap_or(0),
            learning: settings.learn && settings.limits.is_empty(),
            learned_ttl: nanos(settings.learned_ttl),
        }
    }
}

#[derive(Debug)]
struct Scope {
    name: Arc<str>,
    limits: Vec<RateLimit>,
    max_in_flight: u32,
    in_flight: u32,
    log: Log,
    cooling_until: Option<Tick>,
    parked: Vec<u32>,
    timer: Option<Tick>,
    refusals: VecDeque<(Tick, u32)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Target {
    Key(u32, u32),
    Scope(u32),
}

/// Whether a key can be granted now, and if not what it waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Avail {
    Ok,
    Until(Tick),
    Release,
    Scope(u32, Option<Tick>),
    Gone,
}

/// The pure engine. Not thread-safe by itself: shells keep it behind a lock.
pub(crate) struct Engine {
    origin: Instant,
    settings: Settings,
    derived: Derived,
    strategy: Strategy,
    slots: Vec<Slot>,
    cold: Vec<Cold>,
    /// Each key's completions while it learns its limit (its log is kept instead once it has a
    /// limit to enforce).
    tallies: Vec<Tally>,
    free: Vec<u32>,
    selector: Selector,
    timers: BinaryHeap<Reverse<(Tick, Target)>>,
    scopes: Vec<Scope>,
    scope_index: HashMap<Arc<str>, u32>,
    rng: SmallRng,
    /// Random and weighted: the next picks, drawn ahead in draw order. Cleared whenever the
    /// selector's members change, so a pick drawn ahead is always a draw over the members of the
    /// moment it is taken, as a fresh draw would be; it is assessed like any pick when taken.
    ahead: Ahead,
    /// Key slots from which the engine looks ahead ([`AHEAD_FROM`]; tests lower it).
    ahead_from: usize,
    seq: u64,
    live: usize,
    /// The weights of the live keys, summed (a sharded store picks a shard by it).
    total_weight: u64,
    total_in_flight: u64,
}

impl fmt::Debug for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Engine")
            .field("strategy", &self.strategy)
            .field("keys", &self.live)
            .field("in_flight", &self.total_in_flight)
            .finish_non_exhaustive()
    }
}

/// Whether a sliding window of `limit` calls per `interval` has room at `now`.
///
/// `log` holds the *completion* times of finished calls (sorted) and `in_flight` the calls not yet
/// finished. A call reaches the upstream somewhere between its grant and its completion, so
/// counting finished calls at completion and unfinished ones as "now" can never undercount what
/// the upstream saw in any window, whatever the delivery jitter.
fn window_block(log: &Log, limit: u32, interval: Tick, in_flight: u32, now: Tick) -> Block {
    let limit = limit as usize;
    let in_flight = in_flight as usize;
    if limit == 0 {
        return Block::Free;
    }
    if in_flight >= limit {
        return Block::Release;
    }
    // Finished calls that may still be in the window; room needs fewer than `limit - in_flight`.
    let room = limit - in_flight;
    let n = log.len();
    if n < room {
        return Block::Free;
    }
    let t = log.get(n - room).saturating_add(interval);
    if t > now {
        Block::Until(t)
    } else {
        Block::Free
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Block {
    Free,
    Until(Tick),
    Release,
}

/// How many completion times a key must keep: its largest configured or learned limit (0 when
/// nothing needs them; a key learning its limit keeps a [`Tally`] instead, see [`tallies`]).
fn log_cap(d: &Derived, s: &Slot) -> usize {
    d.window_cap.max(s.learned_limit) as usize
}

/// Whether key slot `s` counts its completions in its tally: it is learning a limit.
fn tallies(d: &Derived, s: &Slot) -> bool {
    d.learning && s.learned_limit == 0
}

fn nanos(d: Duration) -> Tick {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl Engine {
    pub(crate) fn new(
        settings: Settings,
        strategy: Strategy,
        seed: Option<u64>,
        origin: Instant,
    ) -> Self {
        let rng = match seed {
            Some(s) => SmallRng::seed_from_u64(s),
            None => SmallRng::seed_from_u64(rand::random()),
        };
        Self {
            origin,
            derived: Derived::new(&settings),
            settings,
            strategy,
            slots: Vec::new(),
            cold: Vec::new(),
            tallies: Vec::new(),
            free: Vec::new(),
            selector: Selector::new(strategy, 0),
            timers: BinaryHeap::new(),
            scopes: Vec::new(),
            scope_index: HashMap::new(),
            rng,
            ahead: Ahead::new(),
            ahead_from: AHEAD_FROM,
            seq: 0,
            live: 0,
            total_weight: 0,
            total_in_flight: 0,
        }
    }

    fn tick(&self, t: Instant) -> Tick {
        nanos(t.saturating_duration_since(self.origin))
    }

    fn instant(&self, t: Tick) -> Instant {
        self.origin + Duration::from_nanos(t)
    }

    pub(crate) fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Number of keys in the pool (any state).
    pub(crate) fn len(&self) -> usize {
        self.live
    }

    pub(crate) fn in_flight(&self) -> u64 {
        self.total_in_flight
    }

    /// The weights of the live keys, summed (a zero weight counts as 1).
    pub(crate) fn total_weight(&self) -> u64 {
        self.total_weight
    }

    /// Defines (or redefines) a quota scope shared by several keys.
    pub(crate) fn define_scope(
        &mut self,
        name: &str,
        limits: Vec<RateLimit>,
        max_in_flight: u32,
    ) -> u32 {
        let sc = self.scope_idx(name);
        let s = &mut self.scopes[sc as usize];
        s.limits = limits;
        s.max_in_flight = max_in_flight;
        self.unpark(sc);
        sc
    }

    fn scope_idx(&mut self, name: &str) -> u32 {
        if let Some(&i) = self.scope_index.get(name) {
            return i;
        }
        let i = u32::try_from(self.scopes.len()).unwrap_or(u32::MAX);
        let name: Arc<str> = Arc::from(name);
        self.scopes.push(Scope {
            name: name.clone(),
            limits: Vec::new(),
            max_in_flight: 0,
            in_flight: 0,
            log: Log::default(),
            cooling_until: None,
            parked: Vec::new(),
            timer: None,
            refusals: VecDeque::new(),
        });
        self.scope_index.insert(name, i);
        i
    }

    /// Adds a key in the active state and returns its index.
    pub(crate) fn add_key(
        &mut self,
        id: Arc<str>,
        weight: u32,
        scope: Option<&str>,
        now: Instant,
    ) -> u32 {
        let now = self.tick(now);
        let scope = scope.map_or(NO_SCOPE, |s| self.scope_idx(s));
        self.total_weight += u64::from(weight.max(1));
        let cold = Cold {
            id,
            weight: weight.max(1),
            failures: 0,
            rate_limited: 0,
            learned_from: 0,
            learned_to: 0,
        };
        let idx = if let Some(idx) = self.free.pop() {
            let gen_ = self.slots[idx as usize].gen_;
            self.slots[idx as usize] = Slot::new(gen_, scope, now);
            self.cold[idx as usize] = cold;
            self.tallies[idx as usize] = Tally::default();
            idx
        } else {
            self.slots.push(Slot::new(0, scope, now));
            self.cold.push(cold);
            self.tallies.push(Tally::default());
            u32::try_from(self.slots.len() - 1).unwrap_or(u32::MAX)
        };
        self.live += 1;
        self.selector.grow(self.slots.len());
        self.sel_insert(idx);
        idx
    }

    /// Removes a key. Leases still out on it are accepted and ignored when reported.
    pub(crate) fn remove_key(&mut self, idx: u32) {
        let Some(s) = self.slots.get_mut(idx as usize) else {
            return;
        };
        if !s.live {
            return;
        }
        s.live = false;
        s.gen_ = s.gen_.wrapping_add(1);
        s.timer = NO_TICK;
        self.total_in_flight -= u64::from(s.in_flight);
        if s.scope != NO_SCOPE {
            let sc = s.scope as usize;
            self.scopes[sc].in_flight -= s.in_flight.min(self.scopes[sc].in_flight);
        }
        s.in_flight = 0;
        self.sel_remove(idx);
        self.live -= 1;
        self.total_weight -= u64::from(self.cold[idx as usize].weight);
        self.free.push(idx);
    }

    pub(crate) fn set_strategy(&mut self, strategy: Strategy) {
        if strategy == self.strategy {
            return;
        }
        let members: Vec<u32> = (0..self.slots.len() as u32)
            .filter(|&k| self.selector.contains(k))
            .collect();
        self.strategy = strategy;
        self.ahead.clear();
        self.selector = Selector::new(strategy, self.slots.len());
        for k in members {
            self.sel_insert(k);
        }
    }

    /// Replaces the settings. Calls in flight are unaffected; windows keep their history, so a
    /// changed limit applies from the next acquire without a burst.
    pub(crate) fn apply_settings(&mut self, settings: Settings) {
        let derived = Derived::new(&settings);
        for (s, tally) in self.slots.iter_mut().zip(&self.tallies) {
            // A key that stops learning takes its tally's history into its log.
            if s.live && tallies(&self.derived, s) && !tallies(&derived, s) {
                let (origin, cap) = (s.epoch_start, log_cap(&derived, s));
                tally.fill(&mut s.log, origin, cap);
            }
        }
        self.derived = derived;
        self.settings = settings;
        for k in 0..self.slots.len() as u32 {
            let s = &mut self.slots[k as usize];
            if s.live && s.tag == Tag::Active {
                s.timer = NO_TICK;
                self.sel_insert(k);
            }
        }
    }

    fn sel_insert(&mut self, k: u32) {
        let s = &mut self.slots[k as usize];
        if s.live && matches!(s.tag, Tag::Active | Tag::Cooling | Tag::Banned) {
            self.ahead.clear();
            s.listed = true;
            let weight = self.cold[k as usize].weight;
            self.selector.insert(k, s.in_flight, s.last_used, weight);
        }
    }

    fn sel_remove(&mut self, k: u32) {
        self.ahead.clear();
        self.selector.remove(k);
        self.slots[k as usize].listed = false;
    }

    fn schedule(&mut self, k: u32, t: Tick) {
        let s = &mut self.slots[k as usize];
        s.timer = t;
        self.timers.push(Reverse((t, Target::Key(k, s.gen_))));
    }

    fn schedule_scope(&mut self, sc: u32, t: Tick) {
        let s = &mut self.scopes[sc as usize];
        if s.timer != Some(t) {
            s.timer = Some(t);
            self.timers.push(Reverse((t, Target::Scope(sc))));
        }
    }

    fn timer_valid(&self, t: Tick, target: Target) -> bool {
        match target {
            Target::Key(k, gen_) => {
                let s = &self.slots[k as usize];
                s.live && s.gen_ == gen_ && s.timer == t
            }
            Target::Scope(sc) => self.scopes[sc as usize].timer == Some(t),
        }
    }

    fn fire_timers(&mut self, now: Tick) {
        while let Some(&Reverse((t, target))) = self.timers.peek() {
            if t > now {
                break;
            }
            self.timers.pop();
            if !self.timer_valid(t, target) {
                continue;
            }
            match target {
                Target::Key(k, _) => {
                    self.slots[k as usize].timer = NO_TICK;
                    self.sel_insert(k);
                }
                Target::Scope(sc) => {
                    self.scopes[sc as usize].timer = None;
                    self.unpark(sc);
                }
            }
        }
    }

    fn next_timer(&mut self) -> Option<Tick> {
        while let Some(&Reverse((t, target))) = self.timers.peek() {
            if self.timer_valid(t, target) {
                return Some(t);
            }
            self.timers.pop();
        }
        None
    }

    fn unpark(&mut self, sc: u32) {
        let parked = std::mem::take(&mut self.scopes[sc as usize].parked);
        for k in parked {
            self.slots[k as usize].parked = false;
            self.sel_insert(k);
        }
    }

    /// Read-only: can key `k` be granted at `now`? Expired cooldowns, bans and learned limits count
    /// as already lifted (`refresh` applies those transitions).
    #[inline]
    fn assess(&self, k: u32, now: Tick) -> Avail {
        let s = &self.slots[k as usize];
        if !s.live {
            return Avail::Gone;
        }
        match s.tag {
            Tag::Active => {}
            Tag::Cooling | Tag::Banned => {
                if s.until > now {
                    return Avail::Until(s.until);
                }
            }
            Tag::Archived | Tag::Disabled => return Avail::Gone,
        }
        if self.settings.max_in_flight > 0 && s.in_flight >= self.settings.max_in_flight {
            return Avail::Release;
        }
        let mut block = Block::Free;
        for &(limit, interval) in &self.derived.windows {
            block = block.max(window_block(&s.log, limit, interval, s.in_flight, now));
        }
        if let Some((limit, interval)) = s.learned_in_force(self.derived.learned_ttl, now) {
            block = block.max(window_block(&s.log, limit, interval, s.in_flight, now));
        }
        match block {
            Block::Free => {}
            Block::Until(t) => return Avail::Until(t),
            Block::Release => return Avail::Release,
        }
        if s.scope != NO_SCOPE {
            let sc = s.scope;
            let scope = &self.scopes[sc as usize];
            if let Some(u) = scope.cooling_until.filter(|&u| u > now) {
                return Avail::Scope(sc, Some(u));
            }
            if scope.max_in_flight > 0 && scope.in_flight >= scope.max_in_flight {
                return Avail::Scope(sc, None);
            }
            let mut block = Block::Free;
            for lim in &scope.limits {
                let interval = nanos(lim.effective_interval());
                block = block.max(window_block(
                    &scope.log,
                    lim.limit(),
                    interval,
                    scope.in_flight,
                    now,
                ));
            }
            match block {
                Block::Free => {}
                Block::Until(t) => return Avail::Scope(sc, Some(t)),
                Block::Release => return Avail::Scope(sc, None),
            }
        }
        Avail::Ok
    }

    /// Applies time-based transitions on key `k`: expired cooldown/ban → active (a new learning
    /// epoch), expired learned limit → forgotten.
    #[inline]
    fn refresh(&mut self, k: u32, now: Tick) {
        let ttl = self.derived.learned_ttl;
        let s = &mut self.slots[k as usize];
        let expired = match s.tag {
            Tag::Cooling => s.until <= now,
            Tag::Banned => {
                if s.until <= now {
                    s.consecutive_failures = 0;
                }
                s.until <= now
            }
            _ => false,
        };
        if expired {
            s.set_state(State::Active);
            s.restart_epoch(now);
        }
        if s.learned_limit > 0 && s.learned_at.saturating_add(ttl) <= now {
            s.learned_limit = 0;
            s.restart_epoch(now);
            if self.derived.learning {
                // Learning again: the tally counts from here, the log is not needed.
                s.log = Log::default();
            }
        }
    }

    /// The next candidate: the oldest pick drawn ahead, or a fresh draw.
    #[inline]
    fn candidate(&mut self) -> Option<u32> {
        match self.ahead.pop() {
            Some(k) => Some(k),
            None => self.selector.pick(&mut self.rng),
        }
    }

    /// Looks ahead from `n` key slots on (tests: 0, so small pools exercise it).
    #[cfg(test)]
    pub(crate) fn set_ahead_from(&mut self, n: usize) {
        self.ahead_from = n;
    }

    /// Whether the engine looks ahead: a pool too large for its keys' lines to stay in the cache.
    #[inline]
    pub(crate) fn looks_ahead(&self) -> bool {
        self.slots.len() >= self.ahead_from
    }

    /// How many picks past the next [`BATCH`] [`Self::look_ahead`] reads the hot slot of (and
    /// the store the entry of): the next `BATCH` but for round robin and least used, whose next
    /// slots and entries follow one another in memory (least used serves idle keys in the order
    /// of their last use, which soon is the order round robin keeps) and are fetched ahead by the
    /// CPU's own prefetcher (reading them too measured slower: every read waits for its line).
    #[inline]
    pub(crate) fn far_ahead(&self) -> usize {
        if matches!(self.strategy, Strategy::RoundRobin | Strategy::LeastUsed) {
            0
        } else {
            BATCH
        }
    }

    /// Reads ahead, in a large pool, the cache lines of the next calls' picks, so that a call
    /// finds its key's lines in the cache instead of fetching them one after another (each
    /// depends on the one before: slot, then log). Plain reads cannot prefetch without stalling
    /// (the CPU retires a read only once its line has come, ~150–200 ns from memory here), so
    /// they are batched: every [`BATCH`] calls, one call draws the next picks ahead (random and
    /// weighted: the draws the next calls would make, only earlier; round robin and least used
    /// know them) and reads, all at once so the reads overlap, the log place of the next
    /// `BATCH` picks (their slots were read by the batch before) and both lines of the hot slot
    /// of the `BATCH` after those. One wait for memory per `BATCH` calls instead of several per
    /// call. Returns `None` when this call reads nothing, or what it read and the next picks
    /// it read for ([`NO_KEY`]: not known), for the caller to add its own reads of the same
    /// picks (the store: their entries) and hand all to `black_box`. The picks are a hint for
    /// the cache only: every pick is assessed when taken. Nothing observable is written.
    #[inline]
    pub(crate) fn look_ahead(&mut self) -> Option<(u64, [u32; RING])> {
        if !self.looks_ahead() {
            return None;
        }
        if self.ahead.due > 0 {
            self.ahead.due -= 1;
            return None;
        }
        let batch = BATCH;
        self.ahead.due = batch - 1;
        // The next picks, as far as known ([`NO_KEY`]: not known).
        let mut next = [NO_KEY; RING];
        match self.strategy {
            Strategy::Random | Strategy::Weighted => {
                while self.ahead.len < RING {
                    match self.selector.pick(&mut self.rng) {
                        Some(k) => self.ahead.push(k),
                        None => break,
                    }
                }
                for (i, k) in next.iter_mut().enumerate().take(self.ahead.len) {
                    *k = self.ahead.ring[(self.ahead.head + i) % RING];
                }
            }
            // Its queue, and its smallest entries: the next picks while nothing changes.
            Strategy::RoundRobin | Strategy::LeastUsed => {
                self.selector.next_known(&mut next[..2 * batch]);
            }
        }
        let mut x = 0u64;
        for &k in &next[..batch] {
            if let Some(s) = self.slots.get(k as usize) {
                x = x.wrapping_add(if tallies(&self.derived, s) {
                    self.tallies[k as usize].peek()
                } else {
                    s.log.next_place()
                });
            }
        }
        for &k in &next[batch..batch + self.far_ahead()] {
            if let Some(s) = self.slots.get(k as usize) {
                // Both lines of the slot.
                x = x.wrapping_add(s.until).wrapping_add(u64::from(s.in_flight));
            }
        }
        Some((x, next))
    }

    #[inline]
    fn pick(&mut self, now: Tick) -> Option<u32> {
        loop {
            let k = self.candidate()?;
            match self.assess(k, now) {
                Avail::Ok => {
                    self.refresh(k, now);
                    return Some(k);
                }
                Avail::Until(t) => {
                    self.sel_remove(k);
                    self.schedule(k, t);
                }
                Avail::Release | Avail::Gone => self.sel_remove(k),
                Avail::Scope(sc, until) => {
                    self.sel_remove(k);
                    let s = &mut self.slots[k as usize];
                    if !s.parked {
                        s.parked = true;
                        self.scopes[sc as usize].parked.push(k);
                    }
                    if let Some(t) = until {
                        self.schedule_scope(sc, t);
                    }
                }
            }
        }
    }

    /// Grants a lease on a free key, preferring keys not in `avoid` (used by retries so a retry lands
    /// on a different key). Falls back to an avoided key rather than wait when it is the only one free.
    #[cfg(test)]
    pub(crate) fn acquire(&mut self, now: Instant, avoid: &[u32]) -> Acquire {
        self.acquire_with(now, avoid, true)
    }

    /// [`Self::acquire`]; with `fall_back` false an avoided key is never granted (a sharded store
    /// first asks every shard for a key it was not told to avoid, then falls back).
    pub(crate) fn acquire_with(&mut self, now: Instant, avoid: &[u32], fall_back: bool) -> Acquire {
        let now = self.tick(now);
        self.fire_timers(now);
        let mut picked = if avoid.is_empty() {
            self.pick(now)
        } else {
            // Set the avoided keys aside for one pick. `avoid` lists the keys a call already
            // tried: a handful, so this copy stays on the stack in practice.
            let set_aside: Vec<u32> = avoid
                .iter()
                .copied()
                .filter(|&a| self.selector.contains(a))
                .collect();
            for &a in &set_aside {
                self.sel_remove(a);
            }
            let picked = self.pick(now);
            for a in set_aside {
                self.sel_insert(a);
            }
            picked
        };
        if picked.is_none() && !avoid.is_empty() && fall_back {
            picked = self.pick(now);
        }
        match picked {
            Some(k) => Acquire::Granted(self.grant(k, now)),
            None => self.wait_hint(),
        }
    }

    #[inline]
    fn grant(&mut self, k: u32, now: Tick) -> LeaseToken {
        self.seq += 1;
        let s = &mut self.slots[k as usize];
        s.in_flight += 1;
        s.last_used = self.seq;
        s.calls += 1;
        let (in_flight, last_used, gen_, scope) = (s.in_flight, s.last_used, s.gen_, s.scope);
        self.total_in_flight += 1;
        if scope != NO_SCOPE {
            self.scopes[scope as usize].in_flight += 1;
        }
        self.selector.touch(k, in_flight, last_used);
        LeaseToken {
            idx: k,
            gen_,
            at: now,
        }
    }

    fn wait_hint(&mut self) -> Acquire {
        if let Some(t) = self.next_timer() {
            return Acquire::Wait {
                until: Some(self.instant(t)),
            };
        }
        if self.total_in_flight > 0 {
            return Acquire::Wait { until: None };
        }
        Acquire::NoUsableKeys
    }

    /// Takes a lease back with its outcome (`None`: dropped without one; only the slot is freed).
    pub(crate) fn report(&mut self, token: LeaseToken, outcome: Option<Outcome>, now: Instant) {
        let now = self.tick(now);
        let k = token.idx;
        let Some(s) = self.slots.get_mut(k as usize) else {
            return;
        };
        if !s.live || s.gen_ != token.gen_ {
            return;
        }
        s.in_flight = s.in_flight.saturating_sub(1);
        self.total_in_flight = self.total_in_flight.saturating_sub(1);
        let scope = s.scope;
        if tallies(&self.derived, s) {
            self.tallies[k as usize].push(now, s.epoch_start);
        } else {
            s.log.push(now, log_cap(&self.derived, s));
        }
        let waiting_on_release = s.tag == Tag::Active && s.timer == NO_TICK && !s.parked;
        if scope != NO_SCOPE {
            let sc = scope;
            let sco = &mut self.scopes[sc as usize];
            sco.in_flight = sco.in_flight.saturating_sub(1);
            let cap = sco.limits.iter().map(|l| l.limit()).max().unwrap_or(0) as usize;
            sco.log.push(now, cap);
            if sco.timer.is_none() && !sco.parked.is_empty() {
                self.unpark(sc);
            }
        }
        if self.slots[k as usize].listed {
            let s = &self.slots[k as usize];
            self.selector.touch(k, s.in_flight, s.last_used);
        } else if waiting_on_release {
            self.sel_insert(k);
        }
        let Some(outcome) = outcome else { return };
        let s = &mut self.slots[k as usize];
        match outcome {
            Outcome::Success => {
                s.successes += 1;
                s.consecutive_failures = 0;
                let c = &self.cold[k as usize];
                if s.learned_limit > 0 && (c.learned_from..=c.learned_to).contains(&token.at) {
                    // A success from the learning epoch reported after the 429: count it too.
                    s.learned_limit += 1;
                } else if token.at >= s.epoch_start {
                    s.epoch_successes += 1;
                    s.epoch_first = s.epoch_first.min(token.at);
                }
            }
            Outcome::RateLimited {
                retry_after,
                scope_wide,
            } => {
                self.cold[k as usize].rate_limited += 1;
                if self.settings.archive_on_rate_limit {
                    self.archive(k, ArchiveReason::RateLimited);
                    return;
                }
                let until = now
                    .saturating_add(nanos(retry_after.unwrap_or(self.settings.default_cooldown)));
                self.learn(k, until, now, token.at);
                self.cool(k, until, CoolReason::RateLimited);
                if scope != NO_SCOPE {
                    self.scope_refusal(scope, k, now, until, scope_wide);
                }
            }
            Outcome::QuotaExhausted { until } => {
                self.cold[k as usize].rate_limited += 1;
                let until = match until {
                    Some(t) => self.tick(t),
                    None => now.saturating_add(nanos(self.settings.default_cooldown)),
                };
                self.cool(k, until, CoolReason::QuotaExhausted);
            }
            Outcome::InvalidKey => {
                self.cold[k as usize].failures += 1;
                self.archive(k, ArchiveReason::InvalidKey);
            }
            Outcome::Failed | Outcome::Timeout => {
                self.cold[k as usize].failures += 1;
                s.consecutive_failures += 1;
                if s.consecutive_failures >= self.settings.ban_threshold && s.tag == Tag::Active {
                    let until = now.saturating_add(nanos(self.settings.ban_duration));
                    s.set_state(State::Banned { until });
                    self.sel_remove(k);
                    self.schedule(k, until);
                }
            }
            Outcome::NotKeyRelated => {}
        }
    }

    /// Learns a key's limit from a rate limit when none is configured: the successes since the key
    /// came back, over the time from the first of them to the moment the upstream frees the window.
    fn learn(&mut self, k: u32, until: Tick, now: Tick, acquired: Tick) {
        if !self.derived.learning {
            return;
        }
        let s = &mut self.slots[k as usize];
        let c = &mut self.cold[k as usize];
        if s.learned_limit == 0 {
            if s.epoch_first != NO_TICK && s.epoch_successes > 0 {
                let first = s.epoch_first;
                s.learned_limit = s.epoch_successes;
                s.learned_interval = until.saturating_sub(first).max(1_000_000);
                s.learned_at = until;
                // The window starts with the epoch's calls, as the upstream counted them.
                let (origin, cap) = (s.epoch_start, log_cap(&self.derived, s));
                self.tallies[k as usize].fill(&mut s.log, origin, cap);
                c.learned_from = first;
                c.learned_to = now;
            }
        } else if acquired > c.learned_to {
            // Refused although the call was paced by the learned limit: tighten it. (Refusals of
            // calls sent before the limit was learned say nothing new.)
            let l = s.learned_limit;
            s.learned_limit = l.saturating_sub((l / 20).max(1)).max(1);
        }
        // The epoch restarts when the key comes back from its cooldown.
        s.restart_epoch(until);
    }

    fn cool(&mut self, k: u32, until: Tick, reason: CoolReason) {
        let s = &mut self.slots[k as usize];
        match s.state() {
            State::Cooling { until: u0, .. } if u0 >= until => return,
            State::Archived(_) | State::Disabled => return,
            State::Banned { until: u0 } if u0 >= until => return,
            _ => {}
        }
        s.set_state(State::Cooling { until, reason });
        self.sel_remove(k);
        self.schedule(k, until);
    }

    fn scope_refusal(&mut self, sc: u32, k: u32, now: Tick, until: Tick, scope_wide: bool) {
        let window = nanos(self.settings.scope_refusal_window);
        let threshold = self.settings.scope_refusal_keys.max(1) as usize;
        let scope = &mut self.scopes[sc as usize];
        scope.refusals.push_back((now, k));
        while scope
            .refusals
            .front()
            .is_some_and(|&(t, _)| t + window < now)
        {
            scope.refusals.pop_front();
        }
        let mut distinct: Vec<u32> = scope.refusals.iter().map(|&(_, key)| key).collect();
        distinct.sort_unstable();
        distinct.dedup();
        if scope_wide || distinct.len() >= threshold {
            let until = scope.cooling_until.map_or(until, |u| u.max(until));
            scope.cooling_until = Some(until);
            self.schedule_scope(sc, until);
        }
    }

    pub(crate) fn archive(&mut self, k: u32, reason: ArchiveReason) {
        let s = &mut self.slots[k as usize];
        if !s.live {
            return;
        }
        s.set_state(State::Archived(reason));
        s.timer = NO_TICK;
        self.sel_remove(k);
    }

    pub(crate) fn disable(&mut self, k: u32) {
        let s = &mut self.slots[k as usize];
        if !s.live {
            return;
        }
        s.set_state(State::Disabled);
        s.timer = NO_TICK;
        self.sel_remove(k);
    }

    /// Puts a disabled key back (other states are left alone).
    pub(crate) fn enable(&mut self, k: u32, now: Instant) {
        if self
            .slots
            .get(k as usize)
            .is_some_and(|s| s.live && s.tag == Tag::Disabled)
        {
            self.reset(k, now);
        }
    }

    /// Clears a key's health by hand: active, no failures, no cooldown, ban or archive.
    pub(crate) fn reset(&mut self, k: u32, now: Instant) {
        let now = self.tick(now);
        let s = &mut self.slots[k as usize];
        if !s.live {
            return;
        }
        s.set_state(State::Active);
        s.consecutive_failures = 0;
        s.timer = NO_TICK;
        s.restart_epoch(now);
        self.sel_insert(k);
    }

    /// Whether key `k` is archived.
    pub(crate) fn is_archived(&self, k: u32) -> bool {
        self.slots
            .get(k as usize)
            .is_some_and(|s| s.tag == Tag::Archived)
    }

    /// Counts keys that could be granted right now.
    pub(crate) fn available_count(&self, now: Instant) -> usize {
        let now = self.tick(now);
        (0..self.slots.len() as u32)
            .filter(|&k| self.assess(k, now) == Avail::Ok)
            .count()
    }

    /// Counts live keys per state name.
    pub(crate) fn state_counts(&self, now: Instant) -> HashMap<&'static str, usize> {
        let mut out = HashMap::new();
        for k in 0..self.slots.len() as u32 {
            if let Some(r) = self.explain(k, now) {
                *out.entry(r.state.name()).or_default() += 1;
            }
        }
        out
    }

    /// Explains key `k`: its state and why it would be skipped now.
    pub(crate) fn explain(&self, k: u32, now: Instant) -> Option<KeyReport> {
        let s = self.slots.get(k as usize).filter(|s| s.live)?;
        let c = &self.cold[k as usize];
        let now_t = self.tick(now);
        let avail = self.assess(k, now_t);
        let state = match s.state() {
            State::Active => KeyState::Active,
            State::Cooling { until, .. } | State::Banned { until } if until <= now_t => {
                KeyState::Active
            }
            State::Cooling { until, reason } => KeyState::Cooling {
                until: self.instant(until),
                reason,
            },
            State::Banned { until } => KeyState::Banned {
                until: self.instant(until),
            },
            State::Archived(reason) => KeyState::Archived { reason },
            State::Disabled => KeyState::Disabled,
        };
        let secs = |t: Tick| Duration::from_nanos(t.saturating_sub(now_t)).as_secs_f64();
        let skipped_because = match avail {
            Avail::Ok => None,
            Avail::Gone => Some(match s.state() {
                State::Disabled => "disabled by hand".to_owned(),
                State::Archived(ArchiveReason::InvalidKey) => {
                    "archived: the upstream refused the key as invalid (401/403); fix or rotate it, then restore".to_owned()
                }
                State::Archived(ArchiveReason::RateLimited) => {
                    "archived on a rate limit (archive_on_rate_limit is on)".to_owned()
                }
                State::Archived(ArchiveReason::Unusable) => "archived: the usability check failed".to_owned(),
                _ => "archived by hand".to_owned(),
            }),
            Avail::Until(t) => Some(match s.state() {
                State::Cooling { reason: CoolReason::RateLimited, .. } => {
                    format!("cooling after a rate limit (429); back in {:.3}s", secs(t))
                }
                State::Cooling { reason: CoolReason::QuotaExhausted, .. } => {
                    format!("quota exhausted; back in {:.3}s", secs(t))
                }
                State::Banned { .. } => format!(
                    "banned after {} consecutive failures; re-admitted in {:.3}s",
                    self.settings.ban_threshold,
                    secs(t)
                ),
                _ => format!("its rate limit window is full; free again in {:.3}s", secs(t)),
            }),
            Avail::Release if self.settings.max_in_flight > 0 && s.in_flight >= self.settings.max_in_flight => Some(
                format!("at its in-flight limit ({} of {})", s.in_flight, self.settings.max_in_flight),
            ),
            Avail::Release => Some(format!(
                "its rate-limit window is taken by {} calls in flight",
                s.in_flight
            )),
            Avail::Scope(sc, until) => {
                let scope = &self.scopes[sc as usize];
                Some(match until {
                    Some(t) if scope.cooling_until.is_some_and(|u| u > now_t) => {
                        format!("its quota scope '{}' is cooling; back in {:.3}s", scope.name, secs(t))
                    }
                    Some(t) => format!("its quota scope '{}' is at its limit; free in {:.3}s", scope.name, secs(t)),
                    None => format!("its quota scope '{}' is at its in-flight limit", scope.name),
                })
            }
        };
        Some(KeyReport {
            identifier: c.id.clone(),
            state,
            available: avail == Avail::Ok,
            skipped_because,
            in_flight: s.in_flight,
            consecutive_failures: s.consecutive_failures,
            calls: s.calls,
            successes: s.successes,
            failures: c.failures,
            rate_limited: c.rate_limited,
            learned_limit: s
                .learned_in_force(self.derived.learned_ttl, now_t)
                .map(|(limit, interval)| (limit, Duration::from_nanos(interval))),
            scope: (s.scope != NO_SCOPE).then(|| self.scopes[s.scope as usize].name.clone()),
        })
    }
}

#[cfg(test)]
mod tests;
