//! The key-state store: where the engine's per-key state lives and where its decisions are made.
//!
//! The pool talks to its store only through [`KeyStateStore`]. [`MemoryStore`] keeps the pure
//! [`Engine`] for a single process, split into shards (one engine and one lock each) so threads
//! acquiring at once do not queue on one lock; a shared store (Redis, for pools used by many
//! processes, [`redis::RedisStore`]) implements the same trait: its Lua scripts hold the same rules.

#[cfg(feature = "redis")]
pub(crate) mod redis;

use crate::config::{RateLimit, Strategy};
use crate::engine::{Acquire, ArchiveReason, Engine, KeyReport, LeaseToken, Settings};
use crate::error::Error;
use crate::outcome::Outcome;
use parking_lot::{MappedMutexGuard, Mutex, MutexGuard};
use std::any::Any;
use std::cell::Cell;
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// A hand-made change to one key's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeyChange {
    Disable,
    Enable,
    Archive(ArchiveReason),
    Reset,
}

/// Proof of one lease granted by a store; handed back with [`KeyStateStore::report`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Token {
    /// The slot of the leased key.
    pub(crate) idx: u32,
    kind: TokenKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TokenKind {
    /// Granted by an in-process engine.
    Local(LeaseToken),
    /// Granted by a shared store; the number names the lease there.
    #[cfg(feature = "redis")]
    Shared(u64),
}

impl Token {
    /// A lease of the engine of shard `shard` (of `shards`); `idx` becomes the global slot.
    fn local(token: LeaseToken, shard: usize, shards: usize) -> Self {
        Self {
            idx: global_slot(token.idx, shard, shards),
            kind: TokenKind::Local(token),
        }
    }
}

/// What the pool attached to a key's slot (its key and client), handed back with each grant so
/// the pool need not look the slot up in a table of its own (a lock every caller takes, and a
/// cache miss in a large pool).
#[derive(Clone)]
pub(crate) struct Payload(pub(crate) Arc<dyn Any + Send + Sync>);

impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Payload")
    }
}

impl PartialEq for Payload {
    fn eq(&self, other: &Self) -> bool {
        Arc::as_ptr(&self.0).cast::<()>() == Arc::as_ptr(&other.0).cast::<()>()
    }
}

impl Eq for Payload {}

/// A store's answer to "give me a key".
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Grant {
    Granted(Token),
    /// Granted, with what the pool attached to the key ([`KeyStateStore::attach`]).
    GrantedWith(Token, Payload),
    /// Nothing is free now. `until`: the earliest moment a key frees up by time; `None`: only a
    /// finishing call can free one. Either way a release may come first. `recheck`: when to ask
    /// again at the latest, for what the store cannot announce (a shared store's other processes).
    Wait {
        until: Option<Instant>,
        recheck: Option<Instant>,
    },
    /// No key can become free without an administrative action.
    NoUsableKeys,
    /// The store cannot decide (a shared store is unreachable and the pool fails closed).
    #[cfg(feature = "redis")]
    Unavailable(Error),
}

/// Key state and the decisions made on it. Keys are addressed by the slot the store gave them.
pub(crate) trait KeyStateStore: Send + Sync + fmt::Debug + 'static {
    /// Adds a key in the active state; returns its slot.
    fn add_key(&self, id: Arc<str>, weight: u32, scope: Option<&str>, now: Instant) -> u32;
    /// Removes a key; leases still out on it are ignored when reported.
    fn remove_key(&self, slot: u32);
    /// Attaches the pool's entry to a key's slot, to come back with its grants (a store may
    /// ignore it: the pool then finds the entry by slot).
    fn attach(&self, _slot: u32, _entry: Payload) {}
    /// Grants a lease, or says how long to wait, or that no key can become free.
    fn acquire(&self, now: Instant, avoid: &[u32]) -> Grant;
    /// Takes a lease back with its outcome (`None`: dropped without one).
    fn report(&self, token: Token, outcome: Option<Outcome>, now: Instant);
    /// Applies a hand-made health change (a shared store makes it visible to every process).
    fn change(&self, slot: u32, change: KeyChange, now: Instant) -> Result<(), Error>;
    /// Explains one key.
    fn explain(&self, slot: u32, now: Instant) -> Option<KeyReport>;
    /// Whether a key is archived.
    fn is_archived(&self, slot: u32) -> bool;
    /// Keys in the store.
    fn len(&self) -> usize;
    /// Calls in flight.
    fn in_flight(&self) -> u64;
    /// Keys that could be granted now.
    fn available_count(&self, now: Instant) -> usize;
    /// Keys per state name.
    fn state_counts(&self, now: Instant) -> HashMap<&'static str, usize>;
    /// The rotation strategy.
    fn strategy(&self) -> Strategy;
    /// Switches the rotation strategy.
    fn set_strategy(&self, strategy: Strategy);
    /// The enforced settings.
    fn settings(&self) -> Settings;
    /// Replaces the settings (calls in flight are unaffected).
    fn apply_settings(&self, settings: Settings);
    /// Declares a quota scope.
    fn define_scope(&self, name: &str, limits: Vec<RateLimit>, max_in_flight: u32);
    /// The pool's per-call timeout changed (a shared store sizes its leases' lifetime on it).
    fn set_call_timeout(&self, _timeout: Duration) {}
    /// Whether `acquire` (and `report` of an outcome that changes a key's health) waits on I/O,
    /// a round trip to a shared store: async callers then run them on the runtime's blocking
    /// pool instead of holding a worker thread.
    fn waits_on_io(&self) -> bool {
        false
    }
}

/// Shards a [`MemoryStore`] makes at most.
pub(crate) const MAX_SHARDS: usize = 16;

/// The default shard count: one per core the process may use, at most [`MAX_SHARDS`].
pub(crate) fn default_shards() -> usize {
    std::thread::available_parallelism()
        .map_or(1, std::num::NonZeroUsize::get)
        .clamp(1, MAX_SHARDS)
}

/// The global slot of local slot `local` of shard `shard`: slots interleave over the shards, so
/// keys placed round-robin keep their add order as slots.
fn global_slot(local: u32, shard: usize, shards: usize) -> u32 {
    // `shards` ≤ MAX_SHARDS: the casts are exact.
    local
        .saturating_mul(shards as u32)
        .saturating_add(shard as u32)
}

/// One engine with its lock, on cache lines of its own (two: adjacent-line prefetch).
#[repr(align(128))]
struct Shard {
    state: Mutex<Local>,
}

/// A shard's engine and the entries attached to its keys, by local slot.
struct Local {
    engine: Engine,
    entries: Vec<Option<Payload>>,
}

impl Local {
    /// A grant of local lease `t`, with the entry attached to its key.
    fn grant(&self, t: LeaseToken, shard: usize, shards: usize) -> Grant {
        let token = Token::local(t, shard, shards);
        match self.entries.get(t.idx as usize) {
            Some(Some(p)) => Grant::GrantedWith(token, p.clone()),
            _ => Grant::Granted(token),
        }
    }

    /// The engine's [`Engine::acquire_with`], in a large pool after reading ahead the lines the
    /// next calls need (`Engine::look_ahead`, and here the entry of the pick after next and the
    /// reference count of the next pick's entry, which its lease will clone). Every read is
    /// issued before the acquire's work, so they overlap it and each other.
    #[inline]
    fn acquire(&mut self, now: Instant, avoid: &[u32], fall_back: bool) -> Acquire {
        if self.engine.looks_ahead() {
            self.look_ahead();
        }
        self.engine.acquire_with(now, avoid, fall_back)
    }

    /// The reads ahead of a large pool (kept out of line: small pools never make them).
    #[inline(never)]
    fn look_ahead(&mut self) {
        if let Some((x, next)) = self.engine.look_ahead() {
            let mut x = x as usize;
            let batch = crate::engine::BATCH;
            for &k in &next[..batch] {
                if let Some(Some(p)) = self.entries.get(k as usize) {
                    x = x.wrapping_add(Arc::strong_count(&p.0));
                }
            }
            for &k in &next[batch..batch + self.engine.far_ahead()] {
                if let Some(Some(p)) = self.entries.get(k as usize) {
                    x = x.wrapping_add(Arc::as_ptr(&p.0).cast::<()>().addr());
                }
            }
            std::hint::black_box(x);
        }
    }
}

/// What a shard holds, published for lock-free shard choice (written under the shard's lock on
/// add and remove only, so acquiring threads only read these lines).
#[derive(Debug, Default)]
struct Census {
    keys: AtomicU32,
    weight: AtomicU64,
}

/// Where new keys go.
#[derive(Debug, Default)]
struct Placement {
    /// Keys placed round-robin so far.
    next: usize,
    /// The shard of each quota scope (all its keys share one engine, which enforces its limits).
    scopes: HashMap<String, usize>,
}

/// The in-process store: the pure engine, sharded.
///
/// `S` shards (fixed at construction), each one [`Engine`] behind its own lock. Keys are placed
/// round-robin over the shards in add order (global slot = local slot × S + shard), except the
/// keys of a quota scope, which all go to the shard of the scope's first key. An acquire picks a
/// start shard the way its strategy picks keys — round robin by a global counter (so keys added
/// in order come out in that order when all are free), random in proportion to the shards' key
/// counts, weighted in proportion to their total weights, least used by rotation (the least used
/// key *within* the shard: approximate across shards) — takes it with `try_lock`, and moves on to
/// the next shard when it is contended or has no free key. A thread that found its start shard
/// taken goes to its home shard (threads are numbered as they first call: thread i's home is
/// shard i mod S) for its next `STICKY_RUN` picks within `STICKY_FOR` while that shard has a
/// free key, so threads
/// calling at once spread evenly over shards of their own; the strategy's order across shards
/// then holds over runs, not call by call. With one shard it is the engine behind one lock,
/// exactly.
pub(crate) struct MemoryStore {
    shards: Box<[Shard]>,
    census: Box<[Census]>,
    /// Keys in the store (round robin counts over them).
    keys: AtomicUsize,
    /// The round-robin / least-used start counter, on a line of its own.
    next: Padded<AtomicUsize>,
    strategy: AtomicU8,
    place: Mutex<Placement>,
}

#[derive(Debug, Default)]
#[repr(align(128))]
struct Padded<T>(T);

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryStore")
            .field("shards", &self.shards.len())
            .field("keys", &self.len())
            .finish_non_exhaustive()
    }
}

const STRATEGIES: [Strategy; 4] = [
    Strategy::Random,
    Strategy::RoundRobin,
    Strategy::LeastUsed,
    Strategy::Weighted,
];

fn strategy_code(s: Strategy) -> u8 {
    match s {
        Strategy::Random => 0,
        Strategy::RoundRobin => 1,
        Strategy::LeastUsed => 2,
        Strategy::Weighted => 3,
    }
}

thread_local! {
    /// The shard-choice random state of this thread (no cache line shared between threads).
    static SHARD_RNG: Cell<u64> = Cell::new(rand::random::<u64>());
    /// This thread's shard while it meets contention: (store address, shard, picks left, until).
    static STICKY: Cell<(usize, usize, u32, Option<Instant>)> = const { Cell::new((0, 0, 0, None)) };
    /// This thread's number: its home shard is this modulo the shard count.
    static HOME: usize = NEXT_HOME.fetch_add(1, Relaxed);
}

static NEXT_HOME: AtomicUsize = AtomicUsize::new(0);

/// Picks a thread makes on its home shard after finding its start shard taken, before it follows
/// the strategy's shard choice again. Threads that keep colliding so settle on shards of their
/// own (spread evenly: homes are assigned in turn) instead of all moving every key's cache lines
/// between cores on every call; a thread that meets no contention always follows the strategy
/// (exact round-robin order).
const STICKY_RUN: u32 = 1024;

/// How long a run on the home shard lasts at most. Contention is a matter of calls made at the
/// same moment: a run of `STICKY_RUN` picks takes ~0.1 ms where threads collide on every call,
/// while a pool making a few calls a second would otherwise send one thread's next 1,024 calls,
/// minutes of them, to the keys of one shard (a 3-key pool on 2 shards sent 149 of 151 calls of a
/// batch to one key after one collision under load).
const STICKY_FOR: Duration = Duration::from_millis(1);

/// A uniform draw in `0..n` (`n > 0`) from this thread's generator (splitmix64, multiply-shift).
fn draw_below(n: u64) -> u64 {
    let z = SHARD_RNG.with(|c| {
        let x = c.get().wrapping_add(0x9E37_79B9_7F4A_7C15);
        c.set(x);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    });
    ((u128::from(z) * u128::from(n)) >> 64) as u64
}

/// Folds the shards' refusals into the answer one engine would give: wait for the earliest
/// moment any shard frees a key by time, or for a release when some shard has calls in flight;
/// no usable key only when no shard can free one.
#[derive(Debug, Default)]
struct Refusals {
    wait: bool,
    until: Option<Instant>,
}

impl Refusals {
    fn add(&mut self, a: Acquire) {
        if let Acquire::Wait { until } = a {
            self.wait = true;
            if let Some(t) = until {
                self.until = Some(self.until.map_or(t, |u| u.min(t)));
            }
        }
    }

    fn grant(self) -> Grant {
        if self.wait {
            Grant::Wait {
                until: self.until,
                recheck: None,
            }
        } else {
            Grant::NoUsableKeys
        }
    }
}

impl MemoryStore {
    /// A store of `shards` engines (clamped to 1..=[`MAX_SHARDS`]) built alike; shard `i`'s
    /// random generator is seeded from `seed` and `i`.
    pub(crate) fn new(
        settings: Settings,
        strategy: Strategy,
        seed: Option<u64>,
        origin: Instant,
        shards: usize,
    ) -> Self {
        let n = shards.clamp(1, MAX_SHARDS);
        let shards: Box<[Shard]> = (0..n as u64)
            .map(|i| Shard {
                state: Mutex::new(Local {
                    engine: Engine::new(
                        settings.clone(),
                        strategy,
                        seed.map(|s| s ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15)),
                        origin,
                    ),
                    entries: Vec::new(),
                }),
            })
            .collect();
        Self {
            shards,
            census: (0..n).map(|_| Census::default()).collect(),
            keys: AtomicUsize::new(0),
            next: Padded(AtomicUsize::new(0)),
            strategy: AtomicU8::new(strategy_code(strategy)),
            place: Mutex::new(Placement::default()),
        }
    }

    /// Shards in this store.
    #[cfg(test)]
    fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// This thread's home shard.
    fn home_shard(&self) -> usize {
        HOME.with(|&h| h % self.shards.len())
    }

    /// The shard and local slot of a global slot.
    fn locate(&self, slot: u32) -> (usize, u32) {
        let n = self.shards.len() as u32;
        ((slot % n) as usize, slot / n)
    }

    fn lock(&self, shard: usize) -> MappedMutexGuard<'_, Engine> {
        MutexGuard::map(self.shards[shard].state.lock(), |l| &mut l.engine)
    }

    /// Publishes a shard's key count and total weight (called under its lock).
    fn census_of(&self, shard: usize, e: &Engine) {
        let c = &self.census[shard];
        c.keys
            .store(u32::try_from(e.len()).unwrap_or(u32::MAX), Relaxed);
        c.weight.store(e.total_weight(), Relaxed);
    }

    /// The shard an acquire tries first.
    fn start_shard(&self) -> usize {
        let n = self.shards.len();
        match STRATEGIES[usize::from(self.strategy.load(Relaxed))] {
            Strategy::RoundRobin | Strategy::LeastUsed => {
                // Turn c goes to the shard of the c-th key (mod the key count): with keys placed
                // round-robin, each shard serves its keys in order and they interleave in add
                // order, whatever the shard sizes.
                let keys = self.keys.load(Relaxed).max(1);
                self.next.0.fetch_add(1, Relaxed) % keys % n
            }
            Strategy::Random => self.proportional(|c| u64::from(c.keys.load(Relaxed))),
            Strategy::Weighted => self.proportional(|c| c.weight.load(Relaxed)),
        }
    }

    /// A shard drawn in proportion to `size` (shard 0 when every size is 0).
    fn proportional(&self, size: impl Fn(&Census) -> u64) -> usize {
        let mut sizes = [0u64; MAX_SHARDS];
        let mut total = 0u64;
        for (s, c) in sizes.iter_mut().zip(self.census.iter()) {
            *s = size(c);
            total += *s;
        }
        if total == 0 {
            return 0;
        }
        let mut r = draw_below(total);
        for (i, &s) in sizes.iter().enumerate().take(self.shards.len()) {
            if r < s {
                return i;
            }
            r -= s;
        }
        0
    }

    /// Asks the shards in turn from `start` (contended ones last) until one grants; folds their
    /// refusals otherwise. `ask(shard, engine)`; shards with no key are skipped.
    fn sweep(
        &self,
        start: usize,
        now: Instant,
        mut ask: impl FnMut(usize, &mut Local) -> Acquire,
    ) -> Grant {
        let n = self.shards.len();
        let mut refusals = Refusals::default();
        let mut contended = 0u32;
        let me = std::ptr::from_ref(self).addr();
        for i in 0..n {
            let shard = if start + i < n {
                start + i
            } else {
                start + i - n
            };
            if self.census[shard].keys.load(Relaxed) == 0 {
                continue;
            }
            let Some(mut l) = self.shards[shard].state.try_lock() else {
                contended |= 1 << shard;
                continue;
            };
            match ask(shard, &mut l) {
                Acquire::Granted(t) => {
                    if contended & (1 << start) != 0 {
                        let home = self.home_shard();
                        let stay = if self.census[home].keys.load(Relaxed) > 0 {
                            home
                        } else {
                            shard
                        };
                        STICKY.set((me, stay, STICKY_RUN, now.checked_add(STICKY_FOR)));
                    }
                    return l.grant(t, shard, n);
                }
                refused => refusals.add(refused),
            }
        }
        for i in 0..n {
            let shard = if start + i < n {
                start + i
            } else {
                start + i - n
            };
            if contended & (1 << shard) == 0 {
                continue;
            }
            let mut l = self.shards[shard].state.lock();
            match ask(shard, &mut l) {
                Acquire::Granted(t) => return l.grant(t, shard, n),
                refused => refusals.add(refused),
            }
        }
        refusals.grant()
    }

    fn each(&self, mut f: impl FnMut(usize, &mut Engine)) {
        for (i, s) in self.shards.iter().enumerate() {
            f(i, &mut s.state.lock().engine);
        }
    }
}

impl KeyStateStore for MemoryStore {
    fn add_key(&self, id: Arc<str>, weight: u32, scope: Option<&str>, now: Instant) -> u32 {
        let n = self.shards.len();
        let mut place = self.place.lock();
        let scoped = scope.and_then(|s| place.scopes.get(s).copied());
        let shard = scoped.unwrap_or_else(|| {
            let shard = place.next % n;
            place.next += 1;
            shard
        });
        if let (Some(name), None) = (scope, scoped) {
            place.scopes.insert(name.to_owned(), shard);
        }
        let mut e = self.lock(shard);
        let local = e.add_key(id, weight, scope, now);
        self.census_of(shard, &e);
        self.keys.fetch_add(1, Relaxed);
        global_slot(local, shard, n)
    }

    fn remove_key(&self, slot: u32) {
        let (shard, local) = self.locate(slot);
        let mut l = self.shards[shard].state.lock();
        let before = l.engine.len();
        l.engine.remove_key(local);
        if let Some(p) = l.entries.get_mut(local as usize) {
            *p = None;
        }
        self.census_of(shard, &l.engine);
        self.keys.fetch_sub(before - l.engine.len(), Relaxed);
    }

    fn attach(&self, slot: u32, entry: Payload) {
        let (shard, local) = self.locate(slot);
        let mut l = self.shards[shard].state.lock();
        let i = local as usize;
        if l.entries.len() <= i {
            l.entries.resize(i + 1, None);
        }
        l.entries[i] = Some(entry);
    }

    fn acquire(&self, now: Instant, avoid: &[u32]) -> Grant {
        let n = self.shards.len();
        if n == 1 {
            let mut l = self.shards[0].state.lock();
            return match l.acquire(now, avoid, true) {
                Acquire::Granted(t) => l.grant(t, 0, 1),
                refused => {
                    let mut r = Refusals::default();
                    r.add(refused);
                    r.grant()
                }
            };
        }
        if avoid.is_empty() {
            let me = std::ptr::from_ref(self).addr();
            let (owner, shard, left, until) = STICKY.get();
            if owner == me && left > 0 && shard < n && until.is_some_and(|u| now < u) {
                STICKY.set((me, shard, left - 1, until));
                if let Some(mut l) = self.shards[shard].state.try_lock()
                    && let Acquire::Granted(t) = l.acquire(now, &[], true)
                {
                    return l.grant(t, shard, n);
                }
            }
        }
        let start = self.start_shard();
        if !avoid.is_empty() {
            // First a key no shard was told to avoid, then (as one engine does) an avoided key
            // rather than wait.
            let mut local = Vec::with_capacity(avoid.len());
            let strict = self.sweep(start, now, |shard, l| {
                local.clear();
                local.extend(avoid.iter().filter_map(|&g| {
                    let (s, l) = self.locate(g);
                    (s == shard).then_some(l)
                }));
                l.acquire(now, &local, false)
            });
            if let Grant::Granted(_) | Grant::GrantedWith(..) = strict {
                return strict;
            }
        }
        self.sweep(start, now, |_, l| l.acquire(now, &[], true))
    }

    fn report(&self, token: Token, outcome: Option<Outcome>, now: Instant) {
        match token.kind {
            TokenKind::Local(t) => {
                let (shard, _) = self.locate(token.idx);
                self.lock(shard).report(t, outcome, now);
            }
            // A shared store's lease never reaches its fallback engine.
            #[cfg(feature = "redis")]
            TokenKind::Shared(_) => {}
        }
    }

    fn change(&self, slot: u32, change: KeyChange, now: Instant) -> Result<(), Error> {
        let (shard, k) = self.locate(slot);
        let mut e = self.lock(shard);
        match change {
            KeyChange::Disable => e.disable(k),
            KeyChange::Enable => e.enable(k, now),
            KeyChange::Archive(reason) => e.archive(k, reason),
            KeyChange::Reset => e.reset(k, now),
        }
        Ok(())
    }

    fn explain(&self, slot: u32, now: Instant) -> Option<KeyReport> {
        let (shard, k) = self.locate(slot);
        self.lock(shard).explain(k, now)
    }

    fn is_archived(&self, slot: u32) -> bool {
        let (shard, k) = self.locate(slot);
        self.lock(shard).is_archived(k)
    }

    fn len(&self) -> usize {
        self.keys.load(Relaxed)
    }

    fn in_flight(&self) -> u64 {
        let mut total = 0;
        self.each(|_, e| total += e.in_flight());
        total
    }

    fn available_count(&self, now: Instant) -> usize {
        let mut total = 0;
        self.each(|_, e| total += e.available_count(now));
        total
    }

    fn state_counts(&self, now: Instant) -> HashMap<&'static str, usize> {
        let mut out = HashMap::new();
        self.each(|_, e| {
            for (state, count) in e.state_counts(now) {
                *out.entry(state).or_default() += count;
            }
        });
        out
    }

    fn strategy(&self) -> Strategy {
        STRATEGIES[usize::from(self.strategy.load(Relaxed))]
    }

    fn set_strategy(&self, strategy: Strategy) {
        self.each(|_, e| e.set_strategy(strategy));
        self.strategy.store(strategy_code(strategy), Relaxed);
    }

    fn settings(&self) -> Settings {
        self.lock(0).settings().clone()
    }

    fn apply_settings(&self, settings: Settings) {
        self.each(|_, e| e.apply_settings(settings.clone()));
    }

    fn define_scope(&self, name: &str, limits: Vec<RateLimit>, max_in_flight: u32) {
        self.each(|_, e| {
            e.define_scope(name, limits.clone(), max_in_flight);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_stats::{chi_square, chi_square_by_weight};
    use std::time::Duration;

    fn store(
        shards: usize,
        strategy: Strategy,
        settings: Settings,
        keys: &[(u32, Option<&str>)],
    ) -> (MemoryStore, Instant) {
        let t0 = Instant::now();
        let s = MemoryStore::new(settings, strategy, Some(7), t0, shards);
        for (i, &(weight, scope)) in keys.iter().enumerate() {
            s.add_key(Arc::from(format!("k{i}")), weight, scope, t0);
        }
        (s, t0)
    }

    fn plain(n: usize) -> Vec<(u32, Option<&'static str>)> {
        vec![(1, None); n]
    }

    fn one_at(s: &MemoryStore, now: Instant, avoid: &[u32]) -> u32 {
        match s.acquire(now, avoid) {
            Grant::Granted(t) => {
                s.report(t, Some(Outcome::Success), now);
                t.idx
            }
            other => panic!("expected a grant, got {other:?}"),
        }
    }

    fn held(s: &MemoryStore, now: Instant) -> Token {
        match s.acquire(now, &[]) {
            Grant::Granted(t) => t,
            other => panic!("expected a grant, got {other:?}"),
        }
    }

    #[test]
    fn slots_interleave_and_round_robin_keeps_the_global_add_order() {
        for shards in [1, 2, 3] {
            let (s, t0) = store(shards, Strategy::RoundRobin, Settings::default(), &plain(7));
            assert_eq!(s.shard_count(), shards);
            assert_eq!(s.len(), 7);
            let order: Vec<u32> = (0..21).map(|_| one_at(&s, t0, &[])).collect();
            let expected: Vec<u32> = (0..21).map(|i| i % 7).collect();
            assert_eq!(order, expected, "{shards} shards");
        }
    }

    #[test]
    fn fewer_keys_than_shards_still_rotate_over_every_key() {
        let (s, t0) = store(16, Strategy::RoundRobin, Settings::default(), &plain(3));
        let order: Vec<u32> = (0..9).map(|_| one_at(&s, t0, &[])).collect();
        assert_eq!(order, vec![0, 1, 2, 0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn random_is_uniform_over_keys_whatever_the_shard_sizes() {
        // 3 shards of 3, 2 and 2 keys: picking a shard uniformly would give the 3-key shard's
        // keys 1/9 each instead of 1/7.
        let (s, t0) = store(3, Strategy::Random, Settings::default(), &plain(7));
        let mut counts = [0u64; 7];
        for _ in 0..70_000 {
            counts[one_at(&s, t0, &[]) as usize] += 1;
        }
        let chi = chi_square(&counts, &[1.0 / 7.0; 7]);
        // 6 degrees of freedom: P(chi² > 30) < 1e-4; a shard-uniform pick scores in the thousands.
        assert!(chi < 30.0, "chi² {chi}, counts {counts:?}");
    }

    #[test]
    fn reading_ahead_keeps_the_distribution_and_grants_each_key_with_its_own_entry() {
        // Engines that look ahead whatever their size, with entries attached (the store reads
        // them ahead too): random stays uniform, weighted follows the weights, and every grant
        // carries its own key's entry.
        for (strategy, weights) in [
            (Strategy::Random, vec![1u32; 7]),
            (Strategy::Weighted, vec![1, 2, 3, 10]),
            (Strategy::RoundRobin, vec![1u32; 7]),
        ] {
            let keys: Vec<(u32, Option<&str>)> = weights.iter().map(|&w| (w, None)).collect();
            let (s, t0) = store(3, strategy, Settings::default(), &keys);
            s.each(|_, e| e.set_ahead_from(0));
            for slot in 0..keys.len() as u32 {
                s.attach(slot, Payload(Arc::new(slot)));
            }
            let mut counts = vec![0u64; keys.len()];
            for _ in 0..70_000 {
                let Grant::GrantedWith(t, p) = s.acquire(t0, &[]) else {
                    panic!("{strategy:?}: expected a grant with its entry");
                };
                assert_eq!(p.0.downcast_ref::<u32>(), Some(&t.idx), "{strategy:?}");
                counts[t.idx as usize] += 1;
                s.report(t, Some(Outcome::Success), t0);
            }
            let chi = chi_square_by_weight(&counts, &weights);
            // At most 6 degrees of freedom: P(chi² > 30) < 1e-4.
            assert!(chi < 30.0, "{strategy:?}: chi² {chi}, counts {counts:?}");
            assert_eq!(s.in_flight(), 0);
        }
    }

    #[test]
    fn weighted_follows_weights_across_shards() {
        // Shard 0 holds weights 1 and 3, shard 1 holds 2 and 10 (total 16).
        let keys = [(1, None), (2, None), (3, None), (10, None)];
        let (s, t0) = store(2, Strategy::Weighted, Settings::default(), &keys);
        let mut counts = [0u64; 4];
        for _ in 0..80_000 {
            counts[one_at(&s, t0, &[]) as usize] += 1;
        }
        let chi = chi_square(&counts, &[1.0 / 16.0, 2.0 / 16.0, 3.0 / 16.0, 10.0 / 16.0]);
        // 3 degrees of freedom: P(chi² > 22) < 1e-4.
        assert!(chi < 22.0, "chi² {chi}, counts {counts:?}");
    }

    #[test]
    fn a_scopes_keys_share_one_shard_which_enforces_its_limits() {
        let keys = [
            (1, Some("s")),
            (1, None),
            (1, Some("s")),
            (1, Some("s")),
            (1, None),
        ];
        let one = Settings {
            max_in_flight: 1,
            ..Settings::default()
        };
        let (s, t0) = store(2, Strategy::RoundRobin, one, &keys);
        s.define_scope("s", vec![RateLimit::per_second(3).unwrap()], 2);
        let slots: Vec<(u32, KeyReport)> = (0..20)
            .filter_map(|slot| s.explain(slot, t0).map(|r| (slot, r)))
            .collect();
        assert_eq!(slots.len(), 5);
        let scoped: Vec<u32> = slots
            .iter()
            .filter(|(_, r)| r.scope.is_some())
            .map(|&(slot, _)| slot)
            .collect();
        assert_eq!(scoped.len(), 3);
        let shard = s.locate(scoped[0]).0;
        assert!(scoped.iter().all(|&k| s.locate(k).0 == shard), "{scoped:?}");
        // In flight: at most 2 of the scope at once, though 3 of its keys are free.
        let leases: Vec<Token> = (0..4).map(|_| held(&s, t0)).collect();
        let in_scope = leases.iter().filter(|t| scoped.contains(&t.idx)).count();
        assert_eq!(in_scope, 2, "{leases:?}");
        assert!(matches!(
            s.acquire(t0, &[]),
            Grant::Wait { until: None, .. }
        ));
        for t in leases {
            s.report(t, Some(Outcome::Success), t0);
        }
        // 3 per second over the scope: the 4th scope call within the second waits.
        let mut scope_calls = 0;
        for _ in 0..20 {
            match s.acquire(t0, &[]) {
                Grant::Granted(t) => {
                    scope_calls += usize::from(scoped.contains(&t.idx));
                    s.report(t, Some(Outcome::Success), t0);
                }
                other => panic!("{other:?}"),
            }
        }
        // 2 successes above already count toward the window.
        assert_eq!(scope_calls, 1);
    }

    /// The same scenario on one engine and on sharded stores gives the same answer.
    fn same_answer(
        settings: &Settings,
        keys: usize,
        scenario: impl Fn(&MemoryStore, Instant) -> Grant,
    ) {
        // Grants and waits, with times as offsets from each store's start.
        let answers: Vec<Option<Option<Duration>>> = [1, 2, 3]
            .into_iter()
            .map(|shards| {
                let (s, t0) = store(shards, Strategy::Random, settings.clone(), &plain(keys));
                match scenario(&s, t0) {
                    Grant::Wait { until, .. } => Some(until.map(|u| u - t0)),
                    other => panic!("{shards} shards: {other:?}"),
                }
            })
            .collect();
        assert_eq!(answers[0], answers[1]);
        assert_eq!(answers[0], answers[2]);
    }

    #[test]
    fn refusals_combine_as_one_engine_would() {
        let one = Settings {
            max_in_flight: 1,
            ..Settings::default()
        };
        let secs = Duration::from_secs;
        // Two keys cool for 10 s and 5 s: wait for the earliest.
        same_answer(&Settings::default(), 2, |s, t0| {
            for d in [10, 5] {
                let t = held(s, t0);
                s.report(t, Some(Outcome::rate_limited(Some(secs(d)))), t0);
            }
            let g = s.acquire(t0, &[]);
            assert_eq!(
                g,
                Grant::Wait {
                    until: Some(t0 + secs(5)),
                    recheck: None
                }
            );
            g
        });
        // One key cools, the others are busy (one call each): the cooldown's end is the hint
        // (a release may come first).
        same_answer(&one, 3, |s, t0| {
            let t = held(s, t0);
            s.report(t, Some(Outcome::rate_limited(Some(secs(10)))), t0);
            let _busy = (held(s, t0), held(s, t0));
            s.acquire(t0, &[])
        });
        // Every key busy: only a release frees one.
        same_answer(&one, 3, |s, t0| {
            let _busy = (held(s, t0), held(s, t0), held(s, t0));
            let g = s.acquire(t0, &[]);
            assert_eq!(
                g,
                Grant::Wait {
                    until: None,
                    recheck: None
                }
            );
            g
        });
    }

    #[test]
    fn no_usable_keys_only_when_no_shard_has_one() {
        let one = Settings {
            max_in_flight: 1,
            ..Settings::default()
        };
        let (s, t0) = store(3, Strategy::Random, one, &plain(3));
        let manual = KeyChange::Archive(ArchiveReason::Manual);
        s.change(0, KeyChange::Disable, t0).unwrap();
        s.change(1, manual, t0).unwrap();
        for _ in 0..50 {
            assert_eq!(one_at(&s, t0, &[]), 2);
        }
        let busy = held(&s, t0);
        assert_eq!(
            s.acquire(t0, &[]),
            Grant::Wait {
                until: None,
                recheck: None
            }
        );
        s.report(busy, None, t0);
        s.change(2, manual, t0).unwrap();
        assert_eq!(s.acquire(t0, &[]), Grant::NoUsableKeys);
        s.change(1, KeyChange::Reset, t0).unwrap();
        assert_eq!(one_at(&s, t0, &[]), 1);
    }

    #[test]
    fn avoid_lists_apply_across_shards_and_fall_back_rather_than_wait() {
        let one = Settings {
            max_in_flight: 1,
            ..Settings::default()
        };
        for strategy in STRATEGIES {
            let (s, t0) = store(3, strategy, one.clone(), &plain(6));
            for _ in 0..60 {
                assert_eq!(one_at(&s, t0, &[0, 1, 2, 3, 4]), 5, "{strategy:?}");
                assert_ne!(one_at(&s, t0, &[5, 4]), 5, "{strategy:?}");
            }
            // Everything avoided: an avoided key rather than a wait.
            let t = match s.acquire(t0, &[0, 1, 2, 3, 4, 5]) {
                Grant::Granted(t) => t,
                other => panic!("{other:?}"),
            };
            // The only key not avoided is busy: an avoided one.
            let others: Vec<u32> = (0..6).filter(|&k| k != t.idx).collect();
            let u = match s.acquire(t0, &others) {
                Grant::Granted(u) => u,
                other => panic!("{other:?}"),
            };
            assert!(others.contains(&u.idx), "{strategy:?}: {u:?} {t:?}");
        }
    }

    #[test]
    fn many_threads_lose_and_double_no_lease() {
        let one = Settings {
            max_in_flight: 2,
            ..Settings::default()
        };
        for strategy in STRATEGIES {
            let (s, t0) = store(4, strategy, one.clone(), &plain(8));
            let granted = AtomicU64::new(0);
            std::thread::scope(|sc| {
                for th in 0..4u64 {
                    let (s, granted) = (&s, &granted);
                    sc.spawn(move || {
                        let mut mine = Vec::new();
                        for i in 0..5_000u64 {
                            if let Grant::Granted(t) = s.acquire(t0, &[]) {
                                granted.fetch_add(1, Relaxed);
                                mine.push(t);
                            }
                            // Hold up to 3 leases, release with and without an outcome.
                            if mine.len() > 2 || i % 5 == th {
                                for t in mine.drain(..) {
                                    let outcome = (i % 3 != 0).then_some(Outcome::Success);
                                    s.report(t, outcome, t0);
                                }
                            }
                        }
                        for t in mine {
                            s.report(t, Some(Outcome::Success), t0);
                        }
                    });
                }
            });
            assert_eq!(s.in_flight(), 0, "{strategy:?}");
            let calls: u64 = (0..8).map(|k| s.explain(k, t0).unwrap().calls).sum();
            assert_eq!(calls, granted.load(Relaxed), "{strategy:?}");
            assert!(calls > 10_000, "{strategy:?}: {calls}");
            assert_eq!(s.available_count(t0), 8);
        }
    }

    #[test]
    fn a_thread_that_meets_contention_stays_on_its_shard_for_a_run_then_follows_the_order() {
        let (s, t0) = store(2, Strategy::RoundRobin, Settings::default(), &plain(6));
        let home = s.home_shard();
        assert_eq!(one_at(&s, t0, &[]), 0);
        // Shard 1 (next in turn) is taken by another thread: this one gets a key of shard 0,
        // then keeps to its home shard for its run.
        let taken = s.shards[1].state.lock();
        assert_eq!(s.locate(one_at(&s, t0, &[])).0, 0);
        drop(taken);
        for _ in 0..STICKY_RUN {
            assert_eq!(s.locate(one_at(&s, t0, &[])).0, home);
        }
        // Then the round-robin turn again: shards alternate.
        let shards: Vec<usize> = (0..6).map(|_| s.locate(one_at(&s, t0, &[])).0).collect();
        assert!(shards.windows(2).all(|w| w[0] != w[1]), "{shards:?}");
        // A run ends after `STICKY_FOR` too, however few of its picks were made.
        let me = std::ptr::from_ref(&s).addr();
        STICKY.set((me, home, STICKY_RUN, t0.checked_add(STICKY_FOR)));
        for _ in 0..3 {
            assert_eq!(s.locate(one_at(&s, t0, &[])).0, home);
        }
        let later = t0 + STICKY_FOR;
        let shards: Vec<usize> = (0..6).map(|_| s.locate(one_at(&s, later, &[])).0).collect();
        assert!(shards.windows(2).all(|w| w[0] != w[1]), "{shards:?}");
        // Another store on the same thread is not affected by this one's run.
        let (other, t1) = store(2, Strategy::RoundRobin, Settings::default(), &plain(4));
        let order: Vec<u32> = (0..4).map(|_| one_at(&other, t1, &[])).collect();
        assert_eq!(order, vec![0, 1, 2, 3]);
    }

    #[test]
    fn threads_numbered_in_turn_have_home_shards_in_turn() {
        let (s, _) = store(3, Strategy::Random, Settings::default(), &plain(6));
        let seen: Vec<(usize, usize)> = std::thread::scope(|sc| {
            let handles: Vec<_> = (0..6)
                .map(|_| sc.spawn(|| (HOME.with(|&h| h), s.home_shard())))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let mut numbers: Vec<usize> = seen.iter().map(|&(no, _)| no).collect();
        numbers.sort_unstable();
        numbers.dedup();
        assert_eq!(
            numbers.len(),
            6,
            "every thread has its own number: {seen:?}"
        );
        for (no, home) in seen {
            assert_eq!(home, no % 3);
        }
    }

    #[test]
    fn removed_keys_and_counts_route_by_slot() {
        let (s, t0) = store(3, Strategy::RoundRobin, Settings::default(), &plain(6));
        s.remove_key(4);
        assert_eq!(s.len(), 5);
        assert!(s.explain(4, t0).is_none());
        assert_eq!(s.state_counts(t0).get("active"), Some(&5));
        for _ in 0..30 {
            assert_ne!(one_at(&s, t0, &[]), 4);
        }
        // The freed local slot is reused by the next key of that shard.
        let slots: Vec<u32> = (0..3)
            .map(|i| s.add_key(Arc::from(format!("again{i}")), 1, None, t0))
            .collect();
        assert!(slots.contains(&4), "{slots:?}");
        assert_eq!(s.len(), 8);
    }
}
