//! Call statuses and the events the pool reports to a stats sink.
//!
//! The numeric ids are the seed's (`apipool-ng`): 1 "success", 5 "failed", 9 "reach limit", and the
//! ids added for outcomes the seed could not tell apart. They are stored in the stats tables, so they
//! never change meaning.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// How one call through the pool ended, as recorded in statistics.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum CallStatus {
    /// The call succeeded (seed id 1).
    Success,
    /// A transient failure (5xx, connection error); counts toward a ban (seed id 5).
    Failed,
    /// The key hit a rate limit (seed id 9, "reach limit").
    ReachLimit,
    /// The call did not finish within its timeout.
    Timeout,
    /// The key was refused as invalid (401/403).
    InvalidKey,
    /// The key's quota is used up until a known time (402, daily quota).
    QuotaExhausted,
    /// The caller's own input was bad (other 4xx); the key is not punished.
    NotKeyRelated,
    /// The lease was dropped without a reported outcome (cancelled future, panic).
    Cancelled,
}

impl CallStatus {
    /// Every status, in id order.
    pub const ALL: [CallStatus; 8] = [
        CallStatus::Success,
        CallStatus::Failed,
        CallStatus::ReachLimit,
        CallStatus::Timeout,
        CallStatus::InvalidKey,
        CallStatus::QuotaExhausted,
        CallStatus::NotKeyRelated,
        CallStatus::Cancelled,
    ];

    /// The stable numeric id stored in the stats tables (1, 5 and 9 are the seed's).
    pub const fn id(self) -> i32 {
        match self {
            CallStatus::Success => 1,
            CallStatus::Failed => 5,
            CallStatus::ReachLimit => 9,
            CallStatus::Timeout => 10,
            CallStatus::InvalidKey => 11,
            CallStatus::QuotaExhausted => 12,
            CallStatus::NotKeyRelated => 13,
            CallStatus::Cancelled => 14,
        }
    }

    /// The status for a stored id, if it is one of ours.
    pub fn from_id(id: i32) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.id() == id)
    }

    /// The description stored next to the id ("success", "failed", "reach limit", ...).
    pub const fn description(self) -> &'static str {
        match self {
            CallStatus::Success => "success",
            CallStatus::Failed => "failed",
            CallStatus::ReachLimit => "reach limit",
            CallStatus::Timeout => "timeout",
            CallStatus::InvalidKey => "invalid key",
            CallStatus::QuotaExhausted => "quota exhausted",
            CallStatus::NotKeyRelated => "not key related",
            CallStatus::Cancelled => "cancelled",
        }
    }

    /// Parses a description or id ("success", "reach limit", "reach_limit", "9").
    pub fn parse(s: &str) -> Option<Self> {
        let s = s.trim();
        if let Ok(id) = s.parse::<i32>() {
            return Self::from_id(id);
        }
        let norm = s.replace('_', " ").to_ascii_lowercase();
        Self::ALL.into_iter().find(|st| st.description() == norm)
    }
}

impl std::fmt::Display for CallStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.description())
    }
}

/// One finished call, as handed to a [`StatsSink`]. It names the key by its safe identifier,
/// never by the raw secret.
#[derive(Debug, Clone, PartialEq)]
pub struct CallEvent {
    /// The key's safe identifier ([`crate::ApiKey::identifier`]).
    pub key_identifier: Arc<str>,
    /// How the call ended.
    pub status: CallStatus,
    /// Time from lease to outcome.
    pub latency: Duration,
    /// A label for the call (HTTP method and route, function name, ...), if any.
    pub method: Option<Arc<str>>,
    /// When the call finished (wall clock, UTC).
    pub finished_at: SystemTime,
    /// The pool the call went through, when the sink serves several pools (the server sets it).
    pub pool: Option<Arc<str>>,
    /// A client-chosen id that makes re-sending the same event harmless: a sink stores an event with
    /// a given `(pool, dedup_id)` at most once. `None` for events the pool makes itself.
    pub dedup_id: Option<Arc<str>>,
}

/// Where the pool sends one [`CallEvent`] per finished call.
///
/// `record` is on the caller's hot path: implementations must not do I/O in it (queue the event and
/// write it elsewhere). [`crate::stats::StatsCollector`] is the ready-made implementation.
pub trait StatsSink: Send + Sync + 'static {
    /// Accepts one event. Must be cheap and must not lose the event.
    fn record(&self, event: CallEvent);
}

impl<S: StatsSink + ?Sized> StatsSink for Arc<S> {
    fn record(&self, event: CallEvent) {
        (**self).record(event);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_the_seeds_and_unique() {
        assert_eq!(CallStatus::Success.id(), 1);
        assert_eq!(CallStatus::Failed.id(), 5);
        assert_eq!(CallStatus::ReachLimit.id(), 9);
        let mut ids: Vec<i32> = CallStatus::ALL.iter().map(|s| s.id()).collect();
        ids.dedup();
        assert_eq!(ids.len(), CallStatus::ALL.len());
        for s in CallStatus::ALL {
            assert_eq!(CallStatus::from_id(s.id()), Some(s));
            assert_eq!(CallStatus::parse(s.description()), Some(s));
        }
        assert_eq!(
            CallStatus::parse("reach_limit"),
            Some(CallStatus::ReachLimit)
        );
        assert_eq!(CallStatus::parse("9"), Some(CallStatus::ReachLimit));
        assert_eq!(CallStatus::parse("nope"), None);
    }
}
