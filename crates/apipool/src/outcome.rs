//! Outcomes, not exceptions: every call's result is classified into an [`Outcome`] that tells the
//! engine what happened to the key.

use crate::status::CallStatus;
use std::time::{Duration, Instant};

/// What a call's result says about the key that made it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The call worked.
    Success,
    /// The key hit a rate limit. The upstream did not process the call, so it is always safe to retry
    /// on another key. The key cools until `retry_after` (or the configured default) and comes back
    /// by itself.
    RateLimited {
        /// How long the upstream asked us to wait, when it said.
        retry_after: Option<Duration>,
        /// The refusal is for the key's whole quota scope (account, project, IP), not just this key.
        scope_wide: bool,
    },
    /// The key's quota is used up until `until` (e.g. a daily quota, HTTP 402).
    QuotaExhausted {
        /// When the quota comes back, when known (else the configured default cooldown).
        until: Option<Instant>,
    },
    /// The upstream refused the key itself (401/403): it is archived.
    InvalidKey,
    /// A transient failure (5xx, connection error). Counts toward a ban.
    Failed,
    /// The call took longer than its timeout. Counts toward a ban, like [`Outcome::Failed`].
    Timeout,
    /// The caller's own input was bad (other 4xx). The key is not punished.
    NotKeyRelated,
}

impl Outcome {
    /// A rate limit with an optional Retry-After, for this key only.
    pub const fn rate_limited(retry_after: Option<Duration>) -> Self {
        Outcome::RateLimited {
            retry_after,
            scope_wide: false,
        }
    }

    /// The status this outcome is recorded as.
    pub const fn status(&self) -> CallStatus {
        match self {
            Outcome::Success => CallStatus::Success,
            Outcome::RateLimited { .. } => CallStatus::ReachLimit,
            Outcome::QuotaExhausted { .. } => CallStatus::QuotaExhausted,
            Outcome::InvalidKey => CallStatus::InvalidKey,
            Outcome::Failed => CallStatus::Failed,
            Outcome::Timeout => CallStatus::Timeout,
            Outcome::NotKeyRelated => CallStatus::NotKeyRelated,
        }
    }

    /// True when the upstream did not consume the call because of the key (rate limit, quota,
    /// invalid key): another key may well succeed.
    pub const fn is_key_refusal(&self) -> bool {
        matches!(
            self,
            Outcome::RateLimited { .. } | Outcome::QuotaExhausted { .. } | Outcome::InvalidKey
        )
    }

    /// True for transient failures that a retry on another key may cure.
    pub const fn is_failure(&self) -> bool {
        matches!(self, Outcome::Failed | Outcome::Timeout)
    }
}

/// Turns a call's result into an [`Outcome`]. Closures `Fn(&Result<T, E>) -> Outcome` are
/// classifiers too.
pub trait Classifier<T, E>: Send + Sync {
    /// Classifies one result.
    fn classify(&self, result: &Result<T, E>) -> Outcome;
}

impl<T, E, F> Classifier<T, E> for F
where
    F: Fn(&Result<T, E>) -> Outcome + Send + Sync,
{
    fn classify(&self, result: &Result<T, E>) -> Outcome {
        self(result)
    }
}

/// The default classifier: `Ok` is a success, `Err` a transient failure.
#[derive(Debug, Default, Clone, Copy)]
pub struct DefaultClassifier;

impl<T, E> Classifier<T, E> for DefaultClassifier {
    fn classify(&self, result: &Result<T, E>) -> Outcome {
        match result {
            Ok(_) => Outcome::Success,
            Err(_) => Outcome::Failed,
        }
    }
}

/// The seed's `reach_limit_exc` as a predicate: errors for which `is_limit` returns true are rate
/// limits, other errors are failures, `Ok` is a success.
///
/// ```
/// use apipool::{Classifier, Outcome, ReachLimit};
/// let c = ReachLimit::new(|e: &String| e.contains("429"));
/// assert!(matches!(Classifier::<(), String>::classify(&c, &Err("HTTP 429".into())), Outcome::RateLimited { .. }));
/// assert_eq!(Classifier::<(), String>::classify(&c, &Err("boom".into())), Outcome::Failed);
/// ```
#[derive(Clone)]
pub struct ReachLimit<P> {
    is_limit: P,
}

impl<P> ReachLimit<P> {
    /// Wraps a predicate over the error type.
    pub fn new(is_limit: P) -> Self {
        Self { is_limit }
    }
}

impl<P> std::fmt::Debug for ReachLimit<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReachLimit")
    }
}

impl<T, E, P> Classifier<T, E> for ReachLimit<P>
where
    P: Fn(&E) -> bool + Send + Sync,
{
    fn classify(&self, result: &Result<T, E>) -> Outcome {
        match result {
            Ok(_) => Outcome::Success,
            Err(e) if (self.is_limit)(e) => Outcome::rate_limited(None),
            Err(_) => Outcome::Failed,
        }
    }
}
