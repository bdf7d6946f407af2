//! HTTP support: a classifier for reqwest results and a ready-made key type that injects the key as
//! a bearer token, a header or a query parameter.
//!
//! ```no_run
//! use apipool::http::{HttpClassifier, HttpKey};
//! use apipool::ApiKeyManager;
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let pool = ApiKeyManager::builder().keys([HttpKey::bearer("k1"), HttpKey::bearer("k2")]).build()?;
//! let http = reqwest::Client::new();
//! let resp = pool
//!     .acall_with(&HttpClassifier::new(), |key| {
//!         let req = key.apply(http.get("http://127.0.0.1:9000/price").query(&[("id", "btc")]));
//!         async move { req.send().await }
//!     })
//!     .await?;
//! println!("{}", resp.status());
//! # Ok(()) }
//! ```

use crate::key::ApiKey;
use crate::outcome::{Classifier, Outcome};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use secrecy::{ExposeSecret, SecretString};
use std::fmt;
use std::time::{Duration, Instant, SystemTime};

/// Classifies HTTP results: 429 + Retry-After (seconds or HTTP date), `retry-after-ms` and
/// `x-ratelimit-reset*` → rate limited; 402 → quota exhausted; 401/403 → invalid key; 5xx,
/// timeouts and connection errors → failed/timeout; other 4xx → not key related; 2xx/3xx → success.
#[derive(Debug, Clone, Default)]
pub struct HttpClassifier {
    scope_marker: Option<HeaderName>,
}

impl HttpClassifier {
    /// The default HTTP classifier.
    pub fn new() -> Self {
        Self::default()
    }

    /// A 429 carrying this header is a refusal for the key's whole quota scope (account, project).
    pub fn scope_marker_header(mut self, name: HeaderName) -> Self {
        self.scope_marker = Some(name);
        self
    }

    /// Classifies a status and its headers.
    pub fn classify_parts(&self, status: u16, headers: &HeaderMap) -> Outcome {
        match status {
            429 => Outcome::RateLimited {
                retry_after: retry_delay(headers, SystemTime::now()),
                scope_wide: self
                    .scope_marker
                    .as_ref()
                    .is_some_and(|h| headers.contains_key(h)),
            },
            402 => Outcome::QuotaExhausted {
                until: retry_delay(headers, SystemTime::now()).map(|d| Instant::now() + d),
            },
            401 | 403 => Outcome::InvalidKey,
            408 => Outcome::Timeout,
            400..=499 => Outcome::NotKeyRelated,
            500..=599 => Outcome::Failed,
            _ => Outcome::Success,
        }
    }

    fn classify_error(&self, e: &reqwest::Error) -> Outcome {
        if e.is_timeout() {
            Outcome::Timeout
        } else if let Some(status) = e.status() {
            self.classify_parts(status.as_u16(), &HeaderMap::new())
        } else if e.is_builder() || e.is_redirect() {
            Outcome::NotKeyRelated
        } else {
            Outcome::Failed
        }
    }
}

impl Classifier<reqwest::Response, reqwest::Error> for HttpClassifier {
    fn classify(&self, result: &Result<reqwest::Response, reqwest::Error>) -> Outcome {
        match result {
            Ok(r) => self.classify_parts(r.status().as_u16(), r.headers()),
            Err(e) => self.classify_error(e),
        }
    }
}

impl Classifier<reqwest::blocking::Response, reqwest::Error> for HttpClassifier {
    fn classify(&self, result: &Result<reqwest::blocking::Response, reqwest::Error>) -> Outcome {
        match result {
            Ok(r) => self.classify_parts(r.status().as_u16(), r.headers()),
            Err(e) => self.classify_error(e),
        }
    }
}

/// A value of `(status, headers, body)` already read (e.g. a proxy's buffered response).
impl<B> Classifier<(u16, HeaderMap, B), reqwest::Error> for HttpClassifier {
    fn classify(&self, result: &Result<(u16, HeaderMap, B), reqwest::Error>) -> Outcome {
        match result {
            Ok((status, headers, _)) => self.classify_parts(*status, headers),
            Err(e) => self.classify_error(e),
        }
    }
}

/// How long a rate-limited response asks us to wait: `retry-after-ms`, then `Retry-After`
/// (seconds or HTTP date), then `x-ratelimit-reset*` headers. `None` when none parse.
pub fn retry_delay(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let get = |name: &str| {
        headers
            .get(name)
            .and_then(|v: &HeaderValue| v.to_str().ok())
    };
    // A value that does not fit a Duration counts as unparsable: the other headers still apply.
    if let Some(d) = get("retry-after-ms")
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|ms| ms.is_finite() && *ms >= 0.0)
        .and_then(|ms| Duration::try_from_secs_f64(ms / 1000.0).ok())
    {
        return Some(d);
    }
    if let Some(d) = get("retry-after").and_then(|v| parse_retry_after(v, now)) {
        return Some(d);
    }
    [
        "x-ratelimit-reset",
        "x-ratelimit-reset-requests",
        "x-ratelimit-reset-tokens",
        "ratelimit-reset",
    ]
    .into_iter()
    .filter_map(|h| get(h).and_then(|v| parse_reset(v, now)))
    .max()
}

/// Parses a `Retry-After` value: delay-seconds (integer or decimal) or an HTTP date.
///
/// ```
/// use std::time::{Duration, SystemTime};
/// assert_eq!(apipool::http::parse_retry_after("2", SystemTime::now()), Some(Duration::from_secs(2)));
/// assert_eq!(apipool::http::parse_retry_after("0.5", SystemTime::now()), Some(Duration::from_millis(500)));
/// assert_eq!(apipool::http::parse_retry_after("soon", SystemTime::now()), None);
/// ```
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let v = value.trim();
    if let Ok(secs) = v.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0)
            .then(|| Duration::try_from_secs_f64(secs).ok())
            .flatten();
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Parses an `x-ratelimit-reset`-style value: seconds until reset, a Unix timestamp (seconds or
/// milliseconds), or a Go-style duration ("1s", "6m0s", "250ms").
pub fn parse_reset(value: &str, now: SystemTime) -> Option<Duration> {
    let v = value.trim();
    if let Ok(n) = v.parse::<f64>() {
        if !n.is_finite() || n < 0.0 {
            return None;
        }
        let epoch = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .ok()?
            .as_secs_f64();
        let secs = if n > 1e12 {
            n / 1000.0 - epoch
        } else if n > 1e9 {
            n - epoch
        } else {
            n
        };
        return Duration::try_from_secs_f64(secs.max(0.0)).ok();
    }
    parse_go_duration(v)
}

fn parse_go_duration(v: &str) -> Option<Duration> {
    let mut total = 0f64;
    let mut rest = v;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let num_end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
        if num_end == 0 {
            return None;
        }
        let n: f64 = rest[..num_end].parse().ok()?;
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let mult = match &rest[..unit_end] {
            "ms" => 0.001,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        total += n * mult;
        rest = &rest[unit_end..];
    }
    Duration::try_from_secs_f64(total).ok()
}

/// Where an [`HttpKey`] puts the key in each request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthPlacement {
    /// `Authorization: Bearer <key>`.
    Bearer,
    /// A header of this name carries the key.
    Header(HeaderName),
    /// A query parameter of this name carries the key.
    Query(String),
}

/// A plain API key for HTTP APIs. Its client, [`KeyAuth`], injects the key into requests built
/// with any reqwest client (async or blocking), so one HTTP client serves every key.
pub struct HttpKey {
    secret: SecretString,
    auth: AuthPlacement,
    id: String,
}

impl fmt::Debug for HttpKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpKey")
            .field("identifier", &self.id)
            .field("auth", &self.auth)
            .finish()
    }
}

impl HttpKey {
    /// A key sent as `Authorization: Bearer <key>`.
    pub fn bearer(secret: impl Into<String>) -> Self {
        Self::new(secret, AuthPlacement::Bearer)
    }

    /// A key with an explicit placement.
    pub fn new(secret: impl Into<String>, auth: AuthPlacement) -> Self {
        let secret: String = secret.into();
        let id = crate::key::fingerprint(&secret);
        Self {
            secret: SecretString::from(secret),
            auth,
            id,
        }
    }

    /// Replaces the safe identifier (e.g. with the name the server stores the key under).
    pub fn with_identifier(mut self, id: impl Into<String>) -> Self {
        self.id = id.into();
        self
    }
}

impl ApiKey for HttpKey {
    type Client = KeyAuth;

    fn primary_key(&self) -> &str {
        self.secret.expose_secret()
    }

    fn identifier(&self) -> String {
        self.id.clone()
    }

    fn create_client(&self) -> KeyAuth {
        KeyAuth {
            secret: self.secret.clone(),
            auth: self.auth.clone(),
        }
    }
}

/// Injects one key into requests.
#[derive(Clone)]
pub struct KeyAuth {
    secret: SecretString,
    auth: AuthPlacement,
}

impl fmt::Debug for KeyAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyAuth")
            .field("auth", &self.auth)
            .finish_non_exhaustive()
    }
}

impl KeyAuth {
    /// Adds the key to an async request.
    pub fn apply(&self, rb: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        let key = self.secret.expose_secret();
        match &self.auth {
            AuthPlacement::Bearer => rb.bearer_auth(key),
            AuthPlacement::Header(name) => rb.header(name.clone(), sensitive(key)),
            AuthPlacement::Query(param) => rb.query(&[(param.as_str(), key)]),
        }
    }

    /// Adds the key to a blocking request.
    pub fn apply_blocking(
        &self,
        rb: reqwest::blocking::RequestBuilder,
    ) -> reqwest::blocking::RequestBuilder {
        let key = self.secret.expose_secret();
        match &self.auth {
            AuthPlacement::Bearer => rb.bearer_auth(key),
            AuthPlacement::Header(name) => rb.header(name.clone(), sensitive(key)),
            AuthPlacement::Query(param) => rb.query(&[(param.as_str(), key)]),
        }
    }

    /// Where the key goes in each request.
    pub fn placement(&self) -> &AuthPlacement {
        &self.auth
    }

    /// The raw key, for clients that need it directly.
    pub fn secret(&self) -> &SecretString {
        &self.secret
    }
}

fn sensitive(key: &str) -> HeaderValue {
    let mut v = HeaderValue::from_str(key).unwrap_or_else(|_| HeaderValue::from_static(""));
    v.set_sensitive(true);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    /// Found by the `rate_limit_headers` fuzz target: an oversized `retry-after-ms` used to end
    /// the search with `None` although `Retry-After` and the reset header were valid.
    #[test]
    fn an_oversized_retry_after_ms_falls_back_to_the_other_headers() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_767_225_600);
        let h = headers(&[
            (
                "retry-after-ms",
                "1444444444444444444444444444444444444444444444444444400",
            ),
            ("retry-after", "7"),
            ("x-ratelimit-reset", "30"),
        ]);
        assert_eq!(retry_delay(&h, now), Some(Duration::from_secs(7)));
        let h = headers(&[("retry-after-ms", "1e300"), ("x-ratelimit-reset", "30")]);
        assert_eq!(retry_delay(&h, now), Some(Duration::from_secs(30)));
    }

    #[test]
    fn statuses_map_to_outcomes() {
        let c = HttpClassifier::new();
        let none = HeaderMap::new();
        assert_eq!(c.classify_parts(200, &none), Outcome::Success);
        assert_eq!(c.classify_parts(304, &none), Outcome::Success);
        assert_eq!(c.classify_parts(401, &none), Outcome::InvalidKey);
        assert_eq!(c.classify_parts(403, &none), Outcome::InvalidKey);
        assert!(matches!(
            c.classify_parts(402, &none),
            Outcome::QuotaExhausted { until: None }
        ));
        assert_eq!(c.classify_parts(404, &none), Outcome::NotKeyRelated);
        assert_eq!(c.classify_parts(422, &none), Outcome::NotKeyRelated);
        assert_eq!(c.classify_parts(500, &none), Outcome::Failed);
        assert_eq!(c.classify_parts(503, &none), Outcome::Failed);
        assert_eq!(c.classify_parts(429, &none), Outcome::rate_limited(None));
    }

    #[test]
    fn retry_after_forms() {
        let now = SystemTime::now();
        let h = headers(&[("retry-after", "3")]);
        assert_eq!(retry_delay(&h, now), Some(Duration::from_secs(3)));
        let h = headers(&[("retry-after", "3"), ("retry-after-ms", "1250")]);
        assert_eq!(retry_delay(&h, now), Some(Duration::from_millis(1250)));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(120));
        let d = parse_retry_after(&later, now).unwrap();
        assert!(
            d > Duration::from_secs(118) && d <= Duration::from_secs(120),
            "{d:?}"
        );
        let past = httpdate::fmt_http_date(now - Duration::from_secs(120));
        assert_eq!(parse_retry_after(&past, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("-1", now), None);
        assert_eq!(parse_retry_after("NaN", now), None);
        assert_eq!(parse_retry_after("inf", now), None);
        let h = headers(&[("x-ratelimit-reset-requests", "1m30s")]);
        assert_eq!(retry_delay(&h, now), Some(Duration::from_secs(90)));
        let h = headers(&[("x-ratelimit-reset", "250ms")]);
        assert_eq!(retry_delay(&h, now), Some(Duration::from_millis(250)));
        let epoch = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 10;
        let h = headers(&[("x-ratelimit-reset", &epoch.to_string())]);
        let d = retry_delay(&h, now).unwrap();
        assert!(
            d > Duration::from_secs(8) && d <= Duration::from_secs(10),
            "{d:?}"
        );
        assert_eq!(parse_reset("1x", now), None);
        assert_eq!(parse_reset("", now), None);
        assert_eq!(parse_reset("s", now), None);
    }

    #[test]
    fn scope_marker_makes_a_scope_wide_refusal() {
        let c =
            HttpClassifier::new().scope_marker_header(HeaderName::from_static("x-account-limit"));
        let h = headers(&[("x-account-limit", "1"), ("retry-after", "2")]);
        assert_eq!(
            c.classify_parts(429, &h),
            Outcome::RateLimited {
                retry_after: Some(Duration::from_secs(2)),
                scope_wide: true
            }
        );
    }

    #[test]
    fn http_key_debug_hides_the_secret() {
        let k = HttpKey::bearer("sk-very-secret-value");
        let dbg = format!("{k:?} {:?}", k.create_client());
        assert!(!dbg.contains("very-secret"), "{dbg}");
        assert!(k.identifier().starts_with("key-"));
    }
}
