//! Start-up configuration ([`Config`]), run-time changes ([`ConfigPatch`]) and their errors.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use clap::Parser;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

/// An API key the mock accepts. Its `Debug` output is masked; read it with [`ApiKey::expose`].
#[derive(Clone)]
pub struct ApiKey(SecretString);

impl ApiKey {
    /// Parses a key: not empty, no whitespace, no commas (the CLI splits lists on commas).
    pub fn parse(raw: &str) -> Result<Self, ConfigError> {
        if raw.is_empty() {
            return Err(ConfigError::InvalidKey(
                "an API key is empty; check for a doubled or trailing comma in --keys",
            ));
        }
        if raw
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == ',')
        {
            return Err(ConfigError::InvalidKey(
                "an API key contains whitespace, a control character or a comma; keys must be single tokens",
            ));
        }
        Ok(Self(SecretString::from(raw)))
    }

    /// The raw key.
    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }

    /// The masked form used in responses and stats (see [`mask_key`]).
    pub fn masked(&self) -> String {
        mask_key(self.expose())
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiKey({})", self.masked())
    }
}

impl FromStr for ApiKey {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl<'de> Deserialize<'de> for ApiKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        Self::parse(&raw).map_err(serde::de::Error::custom)
    }
}

/// Masks a key for display: asterisks, then the last `len / 4` characters (at most 4).
///
/// `"sk-live-1234567890abcd"` → `"********abcd"`, `"k1"` → `"**"`. Short keys are fully hidden,
/// so masked forms may collide: stats and `/price` also give the key's `index`.
pub fn mask_key(raw: &str) -> String {
    let chars: Vec<char> = raw.chars().collect();
    let shown = (chars.len() / 4).min(4);
    let hidden = (chars.len() - shown).min(8);
    let mut out = "*".repeat(hidden);
    out.extend(&chars[chars.len() - shown..]);
    out
}

/// Everything the mock can be told at start-up, as CLI flags (clap) or as a serde document.
///
/// Defaults (shared by clap, `Default` and serde): bind `127.0.0.1:0`, no keys, `rate = 0`
/// (unlimited) per `interval = 1` second, no latency, no faults.
#[derive(Clone, Debug, Parser, Deserialize)]
#[command(
    name = "mock-upstream",
    version,
    about = "A rate-limited fake keyed API for apipool examples, tests and benchmarks."
)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address to listen on (port 0 = any free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub bind: SocketAddr,
    /// Accepted API keys, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub keys: Vec<ApiKey>,
    /// Admitted requests per key per interval (0 = unlimited).
    #[arg(long, default_value_t = 0)]
    pub rate: u32,
    /// Length of the sliding window in seconds (fractions allowed).
    #[arg(long, default_value_t = 1.0)]
    pub interval: f64,
    /// Delay before answering an admitted request, in milliseconds.
    #[arg(long, default_value_t = 0)]
    pub latency_ms: u64,
    /// Extra random delay, uniform in 0..=N milliseconds, added to the latency.
    #[arg(long, default_value_t = 0)]
    pub latency_jitter_ms: u64,
    /// Probability (0..=1) that an admitted request answers 500 (or `error_status`).
    #[arg(long, default_value_t = 0.0)]
    pub error_rate: f64,
    /// Keys that always answer 500 (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub failing_keys: Vec<ApiKey>,
    /// Keys that answer 401 as if revoked (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub revoked_keys: Vec<ApiKey>,
    /// Send x-ratelimit-limit / -remaining / -reset on every keyed response.
    #[arg(long)]
    pub ratelimit_headers: bool,
    /// Accept any non-empty key (each new key gets its own window).
    #[arg(long)]
    pub accept_any_key: bool,
    /// Seed for the random faults (repeatable runs).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Admitted calls per key per quota period; once used up the key answers 402.
    #[arg(long)]
    pub daily_quota: Option<u64>,
    /// Length of the quota period in seconds.
    #[arg(long, default_value_t = 86_400.0)]
    pub quota_period_secs: f64,
    /// Probability (0..=1) that an admitted request hangs for `hang_ms` before answering.
    #[arg(long, default_value_t = 0.0)]
    pub timeout_rate: f64,
    /// How long a hanging request hangs, in milliseconds.
    #[arg(long, default_value_t = 60_000)]
    pub hang_ms: u64,
    /// Stream successful bodies slowly: in 8 parts spread over N milliseconds.
    #[arg(long, default_value_t = 0)]
    pub slow_body_ms: u64,
    /// Probability (0..=1) that an admitted request's connection is dropped without a response.
    #[arg(long, default_value_t = 0.0)]
    pub reset_rate: f64,
    /// The next N admitted requests answer 500 (or `error_status`).
    #[arg(long, default_value_t = 0)]
    pub error_burst: u64,
    /// Status of injected errors (`error_rate`, `error_burst`, `failing_keys`), 500..=599; e.g.
    /// 502 or 503 to look like a failing gateway.
    #[arg(long, default_value_t = 500)]
    pub error_status: u16,
    /// Keys whose admitted requests always hang for `hang_ms` (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub hanging_keys: Vec<ApiKey>,
    /// Keys whose admitted requests always have their connection dropped (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub resetting_keys: Vec<ApiKey>,
    /// Size in bytes of each part of a slow body (0 = the body in 8 parts; 1 dribbles it byte by
    /// byte), the parts spread evenly over `slow_body_ms`.
    #[arg(long, default_value_t = 0)]
    pub slow_body_chunk_bytes: u64,
    /// Probability (0..=1) that an admitted 200 sends its headers and half its body, then drops
    /// the connection (a reset in the middle of the answer).
    #[arg(long, default_value_t = 0.0)]
    pub truncate_rate: f64,
}

impl Default for Config {
    fn default() -> Self {
        // One source of defaults: the clap attributes above.
        Self::try_parse_from(["mock-upstream"]).unwrap_or_else(|e| {
            unreachable!("the defaults of Config parse: {e}");
        })
    }
}

impl Config {
    /// A default config accepting `keys` (a convenience for tests and examples).
    ///
    /// # Errors
    /// When a key is empty or contains whitespace or a comma.
    pub fn with_keys<I, S>(keys: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let keys = keys
            .into_iter()
            .map(|k| ApiKey::parse(k.as_ref()))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            keys,
            ..Self::default()
        })
    }

    /// Checks the values and builds the run-time settings.
    pub(crate) fn settings(&self) -> Result<Settings, ConfigError> {
        let mut seen = HashSet::new();
        for key in &self.keys {
            if !seen.insert(key.expose()) {
                return Err(ConfigError::DuplicateKey(key.masked()));
            }
        }
        Ok(Settings {
            rate: self.rate,
            interval: seconds("interval", self.interval)?,
            latency: Duration::from_millis(self.latency_ms),
            latency_jitter_ms: self.latency_jitter_ms,
            error_rate: probability("error_rate", self.error_rate)?,
            failing_keys: key_set(&self.failing_keys),
            revoked_keys: key_set(&self.revoked_keys),
            ratelimit_headers: self.ratelimit_headers,
            accept_any_key: self.accept_any_key,
            daily_quota: self.daily_quota,
            quota_period: seconds("quota_period_secs", self.quota_period_secs)?,
            timeout_rate: probability("timeout_rate", self.timeout_rate)?,
            hang: Duration::from_millis(self.hang_ms),
            slow_body: Duration::from_millis(self.slow_body_ms),
            reset_rate: probability("reset_rate", self.reset_rate)?,
            error_status: error_status(self.error_status)?,
            hanging_keys: key_set(&self.hanging_keys),
            resetting_keys: key_set(&self.resetting_keys),
            slow_body_chunk: usize::try_from(self.slow_body_chunk_bytes).unwrap_or(usize::MAX),
            truncate_rate: probability("truncate_rate", self.truncate_rate)?,
        })
    }
}

/// A partial change of the run-time behaviour, sent as JSON to `POST /__config` or passed to
/// [`crate::MockServer::update`]. Absent fields keep their value. Keys themselves, `bind` and
/// `seed` cannot change at run time.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigPatch {
    /// See [`Config::rate`].
    pub rate: Option<u32>,
    /// See [`Config::interval`].
    pub interval: Option<f64>,
    /// See [`Config::latency_ms`].
    pub latency_ms: Option<u64>,
    /// See [`Config::latency_jitter_ms`].
    pub latency_jitter_ms: Option<u64>,
    /// See [`Config::error_rate`].
    pub error_rate: Option<f64>,
    /// Replaces the whole list. See [`Config::failing_keys`].
    pub failing_keys: Option<Vec<ApiKey>>,
    /// Replaces the whole list. See [`Config::revoked_keys`].
    pub revoked_keys: Option<Vec<ApiKey>>,
    /// See [`Config::ratelimit_headers`].
    pub ratelimit_headers: Option<bool>,
    /// See [`Config::accept_any_key`].
    pub accept_any_key: Option<bool>,
    /// `Some(None)` (JSON `null`) removes the quota. See [`Config::daily_quota`].
    #[serde(default, deserialize_with = "nullable")]
    pub daily_quota: Option<Option<u64>>,
    /// See [`Config::quota_period_secs`].
    pub quota_period_secs: Option<f64>,
    /// See [`Config::timeout_rate`].
    pub timeout_rate: Option<f64>,
    /// See [`Config::hang_ms`].
    pub hang_ms: Option<u64>,
    /// See [`Config::slow_body_ms`].
    pub slow_body_ms: Option<u64>,
    /// See [`Config::reset_rate`].
    pub reset_rate: Option<f64>,
    /// Sets the number of upcoming admitted requests that answer 500 (or `error_status`).
    pub error_burst: Option<u64>,
    /// See [`Config::error_status`].
    pub error_status: Option<u16>,
    /// Replaces the whole list. See [`Config::hanging_keys`].
    pub hanging_keys: Option<Vec<ApiKey>>,
    /// Replaces the whole list. See [`Config::resetting_keys`].
    pub resetting_keys: Option<Vec<ApiKey>>,
    /// See [`Config::slow_body_chunk_bytes`].
    pub slow_body_chunk_bytes: Option<u64>,
    /// See [`Config::truncate_rate`].
    pub truncate_rate: Option<f64>,
}

#[expect(
    clippy::option_option,
    reason = "a JSON patch must tell an absent field (keep) from null (remove the quota)"
)]
fn nullable<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<u64>>, D::Error> {
    Option::<u64>::deserialize(d).map(Some)
}

/// Why a configuration or a patch was refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    /// A key failed to parse.
    #[error("invalid API key: {0}")]
    InvalidKey(&'static str),
    /// The same key was listed twice in `keys`.
    #[error("API key {0} is listed twice in --keys; list each key once")]
    DuplicateKey(String),
    /// A probability outside 0..=1.
    #[error("{field} must be a probability between 0 and 1, got {value}; e.g. 0.1 for 10%")]
    Probability {
        /// The offending setting.
        field: &'static str,
        /// Its value.
        value: f64,
    },
    /// An error status outside 500..=599.
    #[error("error_status must be a 5xx status (500..=599), got {0}; e.g. 502 or 503")]
    ErrorStatus(u16),
    /// A duration that is not a positive finite number of seconds.
    #[error("{field} must be a positive number of seconds, got {value}; e.g. 1 or 0.5")]
    Seconds {
        /// The offending setting.
        field: &'static str,
        /// Its value.
        value: f64,
    },
}

fn probability(field: &'static str, value: f64) -> Result<f64, ConfigError> {
    if (0.0..=1.0).contains(&value) {
        Ok(value)
    } else {
        Err(ConfigError::Probability { field, value })
    }
}

fn error_status(code: u16) -> Result<u16, ConfigError> {
    if (500..=599).contains(&code) {
        Ok(code)
    } else {
        Err(ConfigError::ErrorStatus(code))
    }
}

fn seconds(field: &'static str, value: f64) -> Result<Duration, ConfigError> {
    match Duration::try_from_secs_f64(value) {
        Ok(d) if d > Duration::ZERO => Ok(d),
        _ => Err(ConfigError::Seconds { field, value }),
    }
}

fn key_set(keys: &[ApiKey]) -> HashSet<Box<str>> {
    keys.iter().map(|k| Box::from(k.expose())).collect()
}

/// The validated behaviour the handlers read on every request (swapped whole on a patch).
#[derive(Clone)]
pub(crate) struct Settings {
    pub(crate) rate: u32,
    pub(crate) interval: Duration,
    pub(crate) latency: Duration,
    pub(crate) latency_jitter_ms: u64,
    pub(crate) error_rate: f64,
    pub(crate) failing_keys: HashSet<Box<str>>,
    pub(crate) revoked_keys: HashSet<Box<str>>,
    pub(crate) ratelimit_headers: bool,
    pub(crate) accept_any_key: bool,
    pub(crate) daily_quota: Option<u64>,
    pub(crate) quota_period: Duration,
    pub(crate) timeout_rate: f64,
    pub(crate) hang: Duration,
    pub(crate) slow_body: Duration,
    pub(crate) reset_rate: f64,
    pub(crate) error_status: u16,
    pub(crate) hanging_keys: HashSet<Box<str>>,
    pub(crate) resetting_keys: HashSet<Box<str>>,
    pub(crate) slow_body_chunk: usize,
    pub(crate) truncate_rate: f64,
}

impl Settings {
    /// Applies a patch, validating every changed value; `self` is untouched on error.
    pub(crate) fn patched(&self, p: &ConfigPatch) -> Result<Self, ConfigError> {
        let mut s = self.clone();
        if let Some(v) = p.rate {
            s.rate = v;
        }
        if let Some(v) = p.interval {
            s.interval = seconds("interval", v)?;
        }
        if let Some(v) = p.latency_ms {
            s.latency = Duration::from_millis(v);
        }
        if let Some(v) = p.latency_jitter_ms {
            s.latency_jitter_ms = v;
        }
        if let Some(v) = p.error_rate {
            s.error_rate = probability("error_rate", v)?;
        }
        if let Some(v) = &p.failing_keys {
            s.failing_keys = key_set(v);
        }
        if let Some(v) = &p.revoked_keys {
            s.revoked_keys = key_set(v);
        }
        if let Some(v) = p.ratelimit_headers {
            s.ratelimit_headers = v;
        }
        if let Some(v) = p.accept_any_key {
            s.accept_any_key = v;
        }
        if let Some(v) = p.daily_quota {
            s.daily_quota = v;
        }
        if let Some(v) = p.quota_period_secs {
            s.quota_period = seconds("quota_period_secs", v)?;
        }
        if let Some(v) = p.timeout_rate {
            s.timeout_rate = probability("timeout_rate", v)?;
        }
        if let Some(v) = p.hang_ms {
            s.hang = Duration::from_millis(v);
        }
        if let Some(v) = p.slow_body_ms {
            s.slow_body = Duration::from_millis(v);
        }
        if let Some(v) = p.reset_rate {
            s.reset_rate = probability("reset_rate", v)?;
        }
        if let Some(v) = p.error_status {
            s.error_status = error_status(v)?;
        }
        if let Some(v) = &p.hanging_keys {
            s.hanging_keys = key_set(v);
        }
        if let Some(v) = &p.resetting_keys {
            s.resetting_keys = key_set(v);
        }
        if let Some(v) = p.slow_body_chunk_bytes {
            s.slow_body_chunk = usize::try_from(v).unwrap_or(usize::MAX);
        }
        if let Some(v) = p.truncate_rate {
            s.truncate_rate = probability("truncate_rate", v)?;
        }
        Ok(s)
    }

    pub(crate) fn view(&self, error_burst: u64) -> SettingsView {
        let masked = |set: &HashSet<Box<str>>| {
            let mut v: Vec<String> = set.iter().map(|k| mask_key(k)).collect();
            v.sort();
            v
        };
        SettingsView {
            rate: self.rate,
            interval: self.interval.as_secs_f64(),
            latency_ms: millis(self.latency),
            latency_jitter_ms: self.latency_jitter_ms,
            error_rate: self.error_rate,
            failing_keys: masked(&self.failing_keys),
            revoked_keys: masked(&self.revoked_keys),
            ratelimit_headers: self.ratelimit_headers,
            accept_any_key: self.accept_any_key,
            daily_quota: self.daily_quota,
            quota_period_secs: self.quota_period.as_secs_f64(),
            timeout_rate: self.timeout_rate,
            hang_ms: millis(self.hang),
            slow_body_ms: millis(self.slow_body),
            reset_rate: self.reset_rate,
            error_burst,
            error_status: self.error_status,
            hanging_keys: masked(&self.hanging_keys),
            resetting_keys: masked(&self.resetting_keys),
            slow_body_chunk_bytes: u64::try_from(self.slow_body_chunk).unwrap_or(u64::MAX),
            truncate_rate: self.truncate_rate,
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The behaviour in force, as answered by `GET`/`POST /__config` (keys masked).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SettingsView {
    /// Admitted requests per key per interval (0 = unlimited).
    pub rate: u32,
    /// Window length in seconds.
    pub interval: f64,
    /// Latency of admitted requests.
    pub latency_ms: u64,
    /// Maximum random extra latency.
    pub latency_jitter_ms: u64,
    /// Probability of a random 500.
    pub error_rate: f64,
    /// Masked keys that always answer 500.
    pub failing_keys: Vec<String>,
    /// Masked keys that answer 401.
    pub revoked_keys: Vec<String>,
    /// Whether x-ratelimit-* headers are sent.
    pub ratelimit_headers: bool,
    /// Whether unknown keys are accepted.
    pub accept_any_key: bool,
    /// Calls per key per quota period.
    pub daily_quota: Option<u64>,
    /// Quota period in seconds.
    pub quota_period_secs: f64,
    /// Probability of a hang.
    pub timeout_rate: f64,
    /// Length of a hang.
    pub hang_ms: u64,
    /// Time over which a body is streamed.
    pub slow_body_ms: u64,
    /// Probability of a dropped connection.
    pub reset_rate: f64,
    /// Upcoming admitted requests that will answer with `error_status`.
    pub error_burst: u64,
    /// Status of injected errors.
    pub error_status: u16,
    /// Masked keys whose requests hang.
    pub hanging_keys: Vec<String>,
    /// Masked keys whose connections are dropped.
    pub resetting_keys: Vec<String>,
    /// Bytes per part of a slow body (0 = 8 parts).
    pub slow_body_chunk_bytes: u64,
    /// Probability of a body cut off half way.
    pub truncate_rate: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_shared_by_clap_and_serde() {
        let from_json: Config = serde_json::from_str("{}").expect("valid");
        let d = Config::default();
        assert_eq!(from_json.bind, d.bind);
        assert_eq!(d.bind.to_string(), "127.0.0.1:0");
        assert_eq!((d.rate, d.interval, d.hang_ms), (0, 1.0, 60_000));
        assert!(d.keys.is_empty() && !d.ratelimit_headers && d.seed.is_none());
    }

    #[test]
    fn cli_flags_parse() {
        let c = Config::try_parse_from([
            "mock-upstream",
            "--bind",
            "127.0.0.1:9000",
            "--keys",
            "k1,k2,k3",
            "--rate",
            "20",
            "--interval",
            "0.5",
            "--latency-ms",
            "20",
            "--error-rate",
            "0.1",
            "--failing-keys",
            "k3",
            "--ratelimit-headers",
            "--accept-any-key",
            "--seed",
            "7",
            "--daily-quota",
            "100",
        ])
        .expect("valid");
        assert_eq!(c.keys.len(), 3);
        assert_eq!(c.keys[1].expose(), "k2");
        assert_eq!((c.rate, c.interval, c.latency_ms), (20, 0.5, 20));
        assert_eq!(c.failing_keys[0].expose(), "k3");
        assert!(c.ratelimit_headers && c.accept_any_key);
        assert_eq!((c.seed, c.daily_quota), (Some(7), Some(100)));
        assert!(c.settings().is_ok());
    }

    #[test]
    fn bad_values_are_refused_with_advice() {
        let bad_rate = Config {
            error_rate: 1.5,
            ..Config::default()
        };
        let err = bad_rate.settings().err();
        assert_eq!(
            err,
            Some(ConfigError::Probability {
                field: "error_rate",
                value: 1.5
            })
        );
        let zero_interval = Config {
            interval: 0.0,
            ..Config::default()
        };
        assert!(matches!(
            zero_interval.settings(),
            Err(ConfigError::Seconds {
                field: "interval",
                ..
            })
        ));
        assert!(Config::try_parse_from(["m", "--keys", "a,,b"]).is_err());
        let dup = Config::with_keys(["same", "same"]).expect("valid");
        assert!(matches!(dup.settings(), Err(ConfigError::DuplicateKey(_))));
    }

    #[test]
    fn debug_output_never_shows_raw_keys() {
        let c = Config::with_keys(["sk-live-secret-value-1234"]).expect("valid");
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("secret-value"), "{dbg}");
        assert!(dbg.contains("********1234"), "{dbg}");
    }

    #[test]
    fn masking_hides_most_of_the_key() {
        assert_eq!(mask_key("sk-live-1234567890abcd"), "********abcd");
        assert_eq!(mask_key("k1"), "**");
        assert_eq!(mask_key("abcdefgh"), "******gh");
        assert_eq!(mask_key(""), "");
    }

    #[test]
    fn patch_changes_only_given_fields_and_validates() {
        let base = Config::default().settings().expect("valid");
        let patch: ConfigPatch =
            serde_json::from_str(r#"{"rate": 3, "error_rate": 0.25, "daily_quota": null}"#)
                .expect("valid");
        assert_eq!(patch.daily_quota, Some(None));
        let s = base.patched(&patch).expect("valid");
        assert_eq!((s.rate, s.error_rate), (3, 0.25));
        assert_eq!(s.interval, base.interval);
        let bad: ConfigPatch = serde_json::from_str(r#"{"reset_rate": -1}"#).expect("valid");
        assert!(base.patched(&bad).is_err());
        assert!(serde_json::from_str::<ConfigPatch>(r#"{"nope": 1}"#).is_err());
    }
}
