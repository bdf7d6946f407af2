//! The counters the mock keeps, as served by `GET /__stats` and [`crate::MockServer::stats`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A point-in-time copy of every counter. Parse `/__stats` into it with serde.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsSnapshot {
    /// Every request to a data endpoint (`/price`, `/echo/*`, unknown paths), whatever the answer.
    pub total_requests: u64,
    /// Answers per HTTP status (dropped connections have no status and are not here).
    pub by_status: BTreeMap<u16, u64>,
    /// 401s for a missing or unknown key (revoked keys are counted per key instead).
    pub unknown_key: u64,
    /// Per key, configured keys first (in `--keys` order), then keys seen with `accept_any_key`.
    pub keys: Vec<KeyStats>,
    /// For each `id` query value, the number of 200 answers.
    pub ids: BTreeMap<String, u64>,
    /// 200 answers not counted in `ids` because too many distinct ids were seen.
    pub ids_overflow: u64,
    /// Faults injected.
    pub faults: FaultStats,
}

/// Counters of one key. The raw key never appears: `key` is masked, `index` is its position.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyStats {
    /// Position in `--keys` (then in order of first sight for `accept_any_key`).
    pub index: usize,
    /// The masked key.
    pub key: String,
    /// Requests that passed the rate limit and the quota (and so count toward them).
    pub admitted: u64,
    /// Admitted requests answered 200.
    pub admitted_ok: u64,
    /// Requests answered 429.
    pub rate_limited: u64,
    /// Requests answered with the error status (failing key, random error or burst).
    pub errors: u64,
    /// Requests answered 401 because the key is revoked.
    pub unauthorized: u64,
    /// Requests answered 402 because the quota was used up.
    pub quota_exhausted: u64,
}

/// How often each fault was injected.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultStats {
    /// Requests that hung (`timeout_rate`, `hanging_keys`).
    pub timeouts: u64,
    /// Connections dropped without an answer (`reset_rate`, `resetting_keys`).
    pub resets: u64,
    /// Answers cut off half way through the body (`truncate_rate`).
    #[serde(default)]
    pub truncated: u64,
    /// Bodies streamed slowly (`slow_body_ms`).
    pub slow_bodies: u64,
    /// Errors from `error_burst`.
    pub burst_errors: u64,
    /// Errors from `error_rate`.
    pub random_errors: u64,
}

impl StatsSnapshot {
    /// Answers with this status.
    pub fn status(&self, code: u16) -> u64 {
        self.by_status.get(&code).copied().unwrap_or(0)
    }

    /// 200 answers for this `id`.
    pub fn id_count(&self, id: &str) -> u64 {
        self.ids.get(id).copied().unwrap_or(0)
    }

    /// The counters of the key at `index`.
    pub fn key(&self, index: usize) -> Option<&KeyStats> {
        self.keys.iter().find(|k| k.index == index)
    }

    /// Sum of `admitted_ok` over all keys.
    pub fn admitted_ok(&self) -> u64 {
        self.keys.iter().map(|k| k.admitted_ok).sum()
    }

    /// Sum of `rate_limited` over all keys.
    pub fn rate_limited(&self) -> u64 {
        self.keys.iter().map(|k| k.rate_limited).sum()
    }
}
