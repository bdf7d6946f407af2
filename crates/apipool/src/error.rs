//! Typed errors. Each says what went wrong and what to do about it.

use crate::config::ConfigError;
use crate::outcome::Outcome;
use std::time::{Duration, Instant};

/// Errors from building or managing a pool, and from waiting for a key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A configuration value is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The pool was built without keys.
    #[error("the key list is empty: give the pool at least one key")]
    EmptyPool,
    /// Two keys share a primary key.
    #[error("duplicate key {identifier}: every key in a pool needs a unique primary key")]
    DuplicateKey {
        /// The duplicate's safe identifier.
        identifier: String,
    },
    /// No key with this identifier or primary key is in the pool.
    #[error("no key {identifier} in this pool")]
    UnknownKey {
        /// What was asked for (an identifier, never a raw secret).
        identifier: String,
    },
    /// No key is free within the wait budget. Retry at `retry_at` (when known), raise `max_wait`,
    /// or add keys.
    #[error("no key is free within the wait budget{}", .retry_after.map(|d| format!("; the next key frees up in {:.3}s", d.as_secs_f64())).unwrap_or_default())]
    PoolExhausted {
        /// When the earliest key frees up, when known (`None`: only a finishing call can free one).
        retry_at: Option<Instant>,
        /// The same as a duration from when the error was made.
        retry_after: Option<Duration>,
    },
    /// Every key is archived or disabled (or the pool is empty): nothing frees up by waiting.
    #[error("no usable key: every key is archived or disabled; restore, enable or add keys")]
    NoUsableKeys,
    /// The shared key-state store (Redis) cannot be reached and the pool fails closed: no call is
    /// made until it is back (the pool reconnects by itself).
    #[error(
        "the shared key-state store at {endpoint} is unreachable ({reason}); the pool fails closed and makes no calls until it is back: start or reach Redis there, or build the pool with OnUnavailable::FailOpen to fall back to per-process limits"
    )]
    StoreUnavailable {
        /// Where the store is (host and port; never a password).
        endpoint: String,
        /// What went wrong, from the client library.
        reason: String,
    },
    /// The shared key-state store's URL or settings are invalid.
    #[error("invalid shared key-state store settings: {reason}")]
    InvalidStore {
        /// What is wrong (the URL itself is not echoed: it may carry a password).
        reason: String,
    },
    /// A batch or concurrent run was asked for zero concurrency.
    #[error("concurrency must be at least 1")]
    ZeroConcurrency,
}

/// The error of one call through the pool: either the pool could not give a key, or the call
/// itself failed (after any retries).
#[derive(Debug, thiserror::Error)]
pub enum CallError<E> {
    /// The pool could not provide a key.
    #[error(transparent)]
    Pool(#[from] Error),
    /// The operation failed; `error` is its last error.
    #[error("the call failed after {attempts} attempt(s) ({outcome:?}): {error}")]
    Failed {
        /// The operation's last error.
        error: E,
        /// How the last attempt was classified.
        outcome: Outcome,
        /// Attempts made (1 = no retry).
        attempts: u32,
    },
    /// The call did not finish within its timeout (after any retries).
    #[error(
        "the call timed out after {timeout:?} ({attempts} attempt(s)); raise `timeout` or check the upstream"
    )]
    Timeout {
        /// The per-call timeout.
        timeout: Duration,
        /// Attempts made.
        attempts: u32,
    },
}

impl<E> CallError<E> {
    /// The operation's own error, if the call reached the upstream and failed.
    pub fn upstream(&self) -> Option<&E> {
        match self {
            CallError::Failed { error, .. } => Some(error),
            _ => None,
        }
    }

    /// True when the pool had no key to give (exhausted or no usable keys).
    pub fn is_pool(&self) -> bool {
        matches!(self, CallError::Pool(_))
    }
}
