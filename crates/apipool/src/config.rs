//! Pool options: rotation strategies, rate limits and the seed's `PoolConfig`.
//!
//! Every constructor here parses and validates ("parse, don't validate"): a value of these types is
//! always usable, and bad input gives a [`ConfigError`] that names the field and says what to fix.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// Bad configuration: which field, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid `{field}`: {message}")]
pub struct ConfigError {
    /// The field (or option) that is wrong.
    pub field: String,
    /// What is wrong and what to do instead.
    pub message: String,
}

impl ConfigError {
    pub(crate) fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// How the pool picks the next key among those that are free.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Uniformly at random (the seed's default).
    #[default]
    Random,
    /// Each free key in turn.
    RoundRobin,
    /// The key with the fewest calls in flight, then the least recently used.
    LeastUsed,
    /// At random, in proportion to each key's weight.
    Weighted,
}

impl Strategy {
    /// The strategy's name as the seed's `rotation_strategy` spells it.
    pub const fn as_str(self) -> &'static str {
        match self {
            Strategy::Random => "random",
            Strategy::RoundRobin => "round_robin",
            Strategy::LeastUsed => "least_used",
            Strategy::Weighted => "weighted",
        }
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Strategy {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().replace('-', "_").as_str() {
            "random" => Ok(Strategy::Random),
            "round_robin" | "roundrobin" => Ok(Strategy::RoundRobin),
            "least_used" | "leastused" => Ok(Strategy::LeastUsed),
            "weighted" => Ok(Strategy::Weighted),
            _ => Err(ConfigError::new(
                "rotation_strategy",
                format!(
                    "unknown strategy {s:?}; use one of random, round_robin, least_used, weighted"
                ),
            )),
        }
    }
}

/// At most `limit` calls in any `interval`-long window (a sliding window, so the pool never sends a
/// call the upstream would refuse, whether the upstream counts in fixed or sliding windows).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RateLimit {
    limit: u32,
    interval: Duration,
    margin: Duration,
}

impl RateLimit {
    /// `limit` calls per `interval`. Both must be positive.
    pub fn new(limit: u32, interval: Duration) -> Result<Self, ConfigError> {
        if limit == 0 {
            return Err(ConfigError::new(
                "rate_limit",
                "must be at least 1 call per interval",
            ));
        }
        if interval.is_zero() {
            return Err(ConfigError::new(
                "rate_limit_interval",
                "must be longer than zero",
            ));
        }
        // The engine counts each call at its completion, which is never earlier than the upstream
        // saw it, so no safety margin is needed by default.
        Ok(Self {
            limit,
            interval,
            margin: Duration::ZERO,
        })
    }

    /// `limit` calls per `interval_secs` seconds (the seed's `rate_limit` / `rate_limit_interval`).
    pub fn from_secs_f64(limit: u32, interval_secs: f64) -> Result<Self, ConfigError> {
        Self::new(limit, positive_secs("rate_limit_interval", interval_secs)?)
    }

    /// `limit` calls per second.
    pub fn per_second(limit: u32) -> Result<Self, ConfigError> {
        Self::new(limit, Duration::from_secs(1))
    }

    /// `limit` calls per minute.
    pub fn per_minute(limit: u32) -> Result<Self, ConfigError> {
        Self::new(limit, Duration::from_secs(60))
    }

    /// `limit` calls per day (24 h sliding).
    pub fn per_day(limit: u32) -> Result<Self, ConfigError> {
        Self::new(limit, Duration::from_secs(86_400))
    }

    /// Adds a safety margin to the window (default none), e.g. for clock differences between
    /// the upstream's hosts.
    #[must_use]
    pub fn with_margin(mut self, margin: Duration) -> Self {
        self.margin = margin;
        self
    }

    /// Calls allowed per window.
    pub fn limit(&self) -> u32 {
        self.limit
    }

    /// The window length.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// The window the engine enforces: interval plus safety margin.
    pub fn effective_interval(&self) -> Duration {
        self.interval + self.margin
    }
}

/// Parses a duration given in seconds, refusing NaN, infinities and negatives.
pub(crate) fn secs(field: &str, v: f64) -> Result<Duration, ConfigError> {
    if !v.is_finite() {
        return Err(ConfigError::new(
            field,
            format!("must be a finite number of seconds, got {v}"),
        ));
    }
    if v < 0.0 {
        return Err(ConfigError::new(
            field,
            format!("must not be negative, got {v}"),
        ));
    }
    Duration::try_from_secs_f64(v).map_err(|e| ConfigError::new(field, e.to_string()))
}

pub(crate) fn positive_secs(field: &str, v: f64) -> Result<Duration, ConfigError> {
    let d = secs(field, v)?;
    if d.is_zero() {
        return Err(ConfigError::new(field, "must be longer than zero"));
    }
    Ok(d)
}

/// An extra rate-limit window in [`PoolConfig::rate_limits`], e.g. `{"limit": 1000, "interval": 86400}`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RateLimitSpec {
    /// Calls per window.
    pub limit: u32,
    /// Window length in seconds.
    pub interval: f64,
}

/// The seed's pool configuration, with its field names and defaults, as the server's
/// `GET /pools/{pool}/config` returns it in `pool_config`. Unknown fields are kept in `extra` so a
/// config round-trips; missing or `null` fields take the defaults.
///
/// ```
/// use apipool::PoolConfig;
/// let cfg = PoolConfig::from_json(&serde_json::json!({"rate_limit": 20, "rate_limit_interval": 1, "timeout": null})).unwrap();
/// assert_eq!(cfg.rate_limit, 20);
/// assert_eq!(cfg.timeout, 30.0);
/// assert_eq!(cfg.effective_batch_max_retries(), 0);
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PoolConfig {
    /// Default concurrency for `call_concurrent` / `batch_exec` (0 = one worker per key, at least 1).
    pub concurrency: u32,
    /// Per-call timeout in seconds.
    pub timeout: f64,
    /// Max calls per key per `rate_limit_interval` (0 = no configured limit: learn from 429s).
    pub rate_limit: u32,
    /// The window for `rate_limit`, in seconds.
    pub rate_limit_interval: f64,
    /// Retry failed calls (5xx, timeouts) on another key. Rate-limited calls are always retried.
    pub retry_on_failure: bool,
    /// How many times a call may be retried.
    pub max_retries: u32,
    /// Free-form settings for the caller.
    pub custom: serde_json::Map<String, serde_json::Value>,
    /// `retry_on_failure` for batches (`None` = same as `retry_on_failure`).
    pub batch_retry_on_failure: Option<bool>,
    /// `max_retries` for batches (`None` = same as `max_retries`).
    pub batch_max_retries: Option<u32>,
    /// Consecutive failures that ban a key.
    pub ban_threshold: u32,
    /// How long a ban lasts, in seconds.
    pub ban_duration: f64,
    /// Extra windows per key beyond `rate_limit` (extension), e.g. a daily quota.
    pub rate_limits: Vec<RateLimitSpec>,
    /// Max calls in flight per key (extension; 0 = unlimited).
    pub max_in_flight_per_key: u32,
    /// How long a call may wait for a free key, in seconds (extension; `None` = `timeout`).
    pub max_wait: Option<f64>,
    /// Cooldown after a 429 that carries no Retry-After, in seconds (extension).
    pub default_cooldown: f64,
    /// The seed's behaviour: archive a key on its first rate limit instead of cooling it (extension).
    pub archive_on_rate_limit: bool,
    /// Fields this version does not know; kept so the config round-trips.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            concurrency: 0,
            timeout: 30.0,
            rate_limit: 0,
            rate_limit_interval: 60.0,
            retry_on_failure: false,
            max_retries: 0,
            custom: serde_json::Map::new(),
            batch_retry_on_failure: None,
            batch_max_retries: None,
            ban_threshold: 3,
            ban_duration: 300.0,
            rate_limits: Vec::new(),
            max_in_flight_per_key: 0,
            max_wait: None,
            default_cooldown: 1.0,
            archive_on_rate_limit: false,
            extra: serde_json::Map::new(),
        }
    }
}

impl PoolConfig {
    /// Parses the server's `pool_config` JSON (`null` → defaults; `null` fields → defaults) and
    /// validates it.
    pub fn from_json(value: &serde_json::Value) -> Result<Self, ConfigError> {
        let cleaned = match value {
            serde_json::Value::Null => return Ok(Self::default()),
            serde_json::Value::Object(map) => serde_json::Value::Object(
                map.iter()
                    .filter(|(_, v)| !v.is_null())
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            ),
            _ => {
                return Err(ConfigError::new(
                    "pool_config",
                    "must be a JSON object or null",
                ));
            }
        };
        let cfg: PoolConfig = serde_json::from_value(cleaned.clone()).map_err(|e| {
            // Name the offending field: re-parse each field on its own to find it.
            let field = cleaned
                .as_object()
                .into_iter()
                .flatten()
                .find(|(k, v)| {
                    let one = serde_json::json!({ k.as_str(): v });
                    serde_json::from_value::<PoolConfig>(one).is_err()
                })
                .map_or_else(|| "pool_config".to_owned(), |(k, _)| k.clone());
            ConfigError::new(field, e.to_string())
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks every field's range (NaN, negative or zero durations, zero thresholds).
    pub fn validate(&self) -> Result<(), ConfigError> {
        positive_secs("timeout", self.timeout)?;
        positive_secs("rate_limit_interval", self.rate_limit_interval)?;
        secs("ban_duration", self.ban_duration)?;
        secs("default_cooldown", self.default_cooldown)?;
        if let Some(w) = self.max_wait {
            secs("max_wait", w)?;
        }
        if self.ban_threshold == 0 {
            return Err(ConfigError::new("ban_threshold", "must be at least 1"));
        }
        for (i, spec) in self.rate_limits.iter().enumerate() {
            RateLimit::from_secs_f64(spec.limit, spec.interval).map_err(|e| {
                ConfigError::new(format!("rate_limits[{i}].{}", e.field), e.message)
            })?;
        }
        Ok(())
    }

    /// All per-key windows this config asks for.
    pub fn limits(&self) -> Result<Vec<RateLimit>, ConfigError> {
        let mut out = Vec::new();
        if self.rate_limit > 0 {
            out.push(RateLimit::from_secs_f64(
                self.rate_limit,
                self.rate_limit_interval,
            )?);
        }
        for spec in &self.rate_limits {
            out.push(RateLimit::from_secs_f64(spec.limit, spec.interval)?);
        }
        Ok(out)
    }

    /// `batch_retry_on_failure`, falling back to `retry_on_failure`.
    pub fn effective_batch_retry_on_failure(&self) -> bool {
        self.batch_retry_on_failure.unwrap_or(self.retry_on_failure)
    }

    /// `batch_max_retries`, falling back to `max_retries`.
    pub fn effective_batch_max_retries(&self) -> u32 {
        self.batch_max_retries.unwrap_or(self.max_retries)
    }

    /// The per-call timeout.
    pub fn timeout_duration(&self) -> Duration {
        secs("timeout", self.timeout).unwrap_or(Duration::from_secs(30))
    }

    /// How long a call may wait for a free key.
    pub fn max_wait_duration(&self) -> Duration {
        self.max_wait
            .and_then(|w| secs("max_wait", w).ok())
            .unwrap_or_else(|| self.timeout_duration())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn strategy_names_parse_and_unknown_is_a_clear_error() {
        for s in [
            Strategy::Random,
            Strategy::RoundRobin,
            Strategy::LeastUsed,
            Strategy::Weighted,
        ] {
            assert_eq!(s.as_str().parse::<Strategy>().unwrap(), s);
        }
        assert_eq!(
            "Round-Robin".parse::<Strategy>().unwrap(),
            Strategy::RoundRobin
        );
        let err = "fastest".parse::<Strategy>().unwrap_err();
        assert_eq!(err.field, "rotation_strategy");
        assert!(err.message.contains("round_robin"), "{err}");
    }

    #[test]
    fn pool_config_defaults_nulls_and_round_trip() {
        let cfg = PoolConfig::from_json(&json!(null)).unwrap();
        assert_eq!(cfg, PoolConfig::default());
        let v = json!({"concurrency": 5, "timeout": null, "my_field": {"a": 1}, "batch_max_retries": 4});
        let cfg = PoolConfig::from_json(&v).unwrap();
        assert_eq!(cfg.concurrency, 5);
        assert_eq!(cfg.timeout, 30.0);
        assert_eq!(cfg.effective_batch_max_retries(), 4);
        assert!(!cfg.effective_batch_retry_on_failure());
        assert_eq!(cfg.extra.get("my_field"), Some(&json!({"a": 1})));
        let back = serde_json::to_value(&cfg).unwrap();
        assert_eq!(back["my_field"], json!({"a": 1}));
    }

    #[test]
    fn pool_config_rejects_bad_values_with_the_field_name() {
        let bad = [
            (json!({"timeout": -1.0}), "timeout"),
            (json!({"timeout": 0}), "timeout"),
            (json!({"rate_limit_interval": 0}), "rate_limit_interval"),
            (json!({"ban_threshold": 0}), "ban_threshold"),
            (json!({"ban_duration": -5}), "ban_duration"),
            (
                json!({"rate_limits": [{"limit": 0, "interval": 1}]}),
                "rate_limits[0].rate_limit",
            ),
            (json!({"concurrency": "many"}), "concurrency"),
            (json!([1, 2]), "pool_config"),
        ];
        for (v, field) in bad {
            let err = PoolConfig::from_json(&v).unwrap_err();
            assert_eq!(err.field, field, "{v} -> {err}");
        }
        assert!(secs("x", f64::NAN).is_err());
        assert!(secs("x", f64::INFINITY).is_err());
    }

    #[test]
    fn rate_limit_validation_and_margin() {
        assert!(RateLimit::new(0, Duration::from_secs(1)).is_err());
        assert!(RateLimit::new(1, Duration::ZERO).is_err());
        let r = RateLimit::per_second(20).unwrap();
        assert_eq!(r.effective_interval(), Duration::from_secs(1));
        let d = RateLimit::per_day(1000)
            .unwrap()
            .with_margin(Duration::from_millis(5));
        assert_eq!(
            d.effective_interval(),
            Duration::from_secs(86_400) + Duration::from_millis(5)
        );
    }
}
