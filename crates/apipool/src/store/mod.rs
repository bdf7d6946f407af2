//! The key-state store: where the engine's per-key state lives and where its decisions are made.
//!
//! The pool talks to its store only through [`KeyStateStore`]. [`MemoryStore`] keeps the pure
//! [`Engine`] behind one lock for a single process; a shared store (Redis, for pools used by many
//! processes, [`redis::RedisStore`]) implements the same trait: its Lua scripts hold the same rules.

#[cfg(feature = "redis")]
pub(crate) mod redis;

use crate::config::{RateLimit, Strategy};
use crate::engine::{Acquire, ArchiveReason, Engine, KeyReport, LeaseToken, Settings};
use crate::error::Error;
use crate::outcome::Outcome;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
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
    fn local(token: LeaseToken) -> Self {
        Self {
            idx: token.idx,
            kind: TokenKind::Local(token),
        }
    }
}

/// A store's answer to "give me a key".
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Grant {
    Granted(Token),
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

impl From<Acquire> for Grant {
    fn from(a: Acquire) -> Self {
        match a {
            Acquire::Granted(t) => Grant::Granted(Token::local(t)),
            Acquire::Wait { until } => Grant::Wait {
                until,
                recheck: None,
            },
            Acquire::NoUsableKeys => Grant::NoUsableKeys,
        }
    }
}

/// Key state and the decisions made on it. Keys are addressed by the slot the store gave them.
pub(crate) trait KeyStateStore: Send + Sync + fmt::Debug + 'static {
    /// Adds a key in the active state; returns its slot.
    fn add_key(&self, id: Arc<str>, weight: u32, scope: Option<&str>, now: Instant) -> u32;
    /// Removes a key; leases still out on it are ignored when reported.
    fn remove_key(&self, slot: u32);
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
}

/// The in-process store: the pure engine behind one lock.
#[derive(Debug)]
pub(crate) struct MemoryStore {
    engine: Mutex<Engine>,
}

impl MemoryStore {
    pub(crate) fn new(engine: Engine) -> Self {
        Self {
            engine: Mutex::new(engine),
        }
    }
}

impl KeyStateStore for MemoryStore {
    fn add_key(&self, id: Arc<str>, weight: u32, scope: Option<&str>, now: Instant) -> u32 {
        self.engine.lock().add_key(id, weight, scope, now)
    }

    fn remove_key(&self, slot: u32) {
        self.engine.lock().remove_key(slot);
    }

    fn acquire(&self, now: Instant, avoid: &[u32]) -> Grant {
        self.engine.lock().acquire(now, avoid).into()
    }

    fn report(&self, token: Token, outcome: Option<Outcome>, now: Instant) {
        match token.kind {
            TokenKind::Local(t) => self.engine.lock().report(t, outcome, now),
            // A shared store's lease never reaches its fallback engine.
            #[cfg(feature = "redis")]
            TokenKind::Shared(_) => {}
        }
    }

    fn change(&self, slot: u32, change: KeyChange, now: Instant) -> Result<(), Error> {
        let mut e = self.engine.lock();
        match change {
            KeyChange::Disable => e.disable(slot),
            KeyChange::Enable => e.enable(slot, now),
            KeyChange::Archive(reason) => e.archive(slot, reason),
            KeyChange::Reset => e.reset(slot, now),
        }
        Ok(())
    }

    fn explain(&self, slot: u32, now: Instant) -> Option<KeyReport> {
        self.engine.lock().explain(slot, now)
    }

    fn is_archived(&self, slot: u32) -> bool {
        self.engine.lock().is_archived(slot)
    }

    fn len(&self) -> usize {
        self.engine.lock().len()
    }

    fn in_flight(&self) -> u64 {
        self.engine.lock().in_flight()
    }

    fn available_count(&self, now: Instant) -> usize {
        self.engine.lock().available_count(now)
    }

    fn state_counts(&self, now: Instant) -> HashMap<&'static str, usize> {
        self.engine.lock().state_counts(now)
    }

    fn strategy(&self) -> Strategy {
        self.engine.lock().strategy()
    }

    fn set_strategy(&self, strategy: Strategy) {
        self.engine.lock().set_strategy(strategy);
    }

    fn settings(&self) -> Settings {
        self.engine.lock().settings().clone()
    }

    fn apply_settings(&self, settings: Settings) {
        self.engine.lock().apply_settings(settings);
    }

    fn define_scope(&self, name: &str, limits: Vec<RateLimit>, max_in_flight: u32) {
        self.engine.lock().define_scope(name, limits, max_in_flight);
    }
}
