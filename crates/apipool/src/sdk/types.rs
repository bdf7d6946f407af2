//! What the server sends: keys of a pool, a pool's configuration.

use crate::config::PoolConfig;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use std::fmt;

/// One key of a pool, as `GET /keys/raw` returns it. `Debug` never shows `raw_key`.
///
/// ```
/// use apipool::sdk::RemoteKey;
/// let k = RemoteKey::new("cg-1", "CG-very-secret-value");
/// assert!(!format!("{k:?}").contains("very-secret"));
/// assert_eq!(k.masked(), "CG-…alue");
/// ```
#[derive(Clone, Deserialize)]
pub struct RemoteKey {
    /// The name the server stores the key under (safe to log).
    pub identifier: String,
    /// The secret itself.
    pub raw_key: SecretString,
    /// A display name, if set.
    #[serde(default)]
    pub alias: Option<String>,
    /// Tags, if any.
    #[serde(default)]
    pub tags: Vec<String>,
}

impl RemoteKey {
    /// A key with no alias or tags (for tests and custom fetchers).
    ///
    /// ```
    /// let k = apipool::sdk::RemoteKey::new("id-1", "secret");
    /// assert_eq!(k.identifier, "id-1");
    /// ```
    pub fn new(identifier: impl Into<String>, raw_key: impl Into<String>) -> Self {
        Self {
            identifier: identifier.into(),
            raw_key: SecretString::from(raw_key.into()),
            alias: None,
            tags: Vec::new(),
        }
    }

    /// The raw key masked for display ([`crate::mask`]).
    ///
    /// ```
    /// assert_eq!(apipool::sdk::RemoteKey::new("a", "short").masked(), "****");
    /// ```
    pub fn masked(&self) -> String {
        crate::key::mask(self.raw_key.expose_secret())
    }
}

impl PartialEq for RemoteKey {
    fn eq(&self, other: &Self) -> bool {
        self.identifier == other.identifier
            && self.raw_key.expose_secret() == other.raw_key.expose_secret()
            && self.alias == other.alias
            && self.tags == other.tags
    }
}

impl fmt::Debug for RemoteKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemoteKey")
            .field("identifier", &self.identifier)
            .field("raw_key", &self.masked())
            .field("alias", &self.alias)
            .field("tags", &self.tags)
            .finish()
    }
}

/// The body of `GET /keys/raw`.
#[derive(Deserialize)]
pub(crate) struct RawKeysBody {
    #[serde(default)]
    pub(crate) keys: Vec<RemoteKey>,
}

/// A pool's configuration, as `GET /pools/{pool}/config` returns it. Missing or `null` fields take
/// the SDK defaults.
///
/// ```
/// use apipool::sdk::RemoteConfig;
/// let c = RemoteConfig::from_json(&serde_json::json!({
///     "pool_identifier": "prices", "client_type": "generic", "reach_limit_exception": null,
///     "rotation_strategy": "round_robin", "pool_config": {"rate_limit": 10, "rate_limit_interval": 1}
/// })).unwrap();
/// assert_eq!(c.rotation_strategy.as_deref(), Some("round_robin"));
/// assert_eq!(c.pool_config.rate_limit, 10);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct RemoteConfig {
    /// The pool's identifier.
    pub pool_identifier: String,
    /// The pool's client type (e.g. "generic").
    pub client_type: String,
    /// The seed's `reach_limit_exception`: an opaque string, stored and never executed.
    pub reach_limit_exception: Option<String>,
    /// The rotation strategy name, when set.
    pub rotation_strategy: Option<String>,
    /// The parsed and validated pool configuration (defaults when the server sent `null`).
    pub pool_config: PoolConfig,
    /// `pool_config` exactly as the server sent it.
    pub raw_pool_config: serde_json::Value,
}

impl RemoteConfig {
    /// Parses the body of `GET /pools/{pool}/config`.
    pub fn from_json(v: &serde_json::Value) -> Result<Self, super::SdkError> {
        let obj = v.as_object().ok_or_else(|| super::SdkError::Protocol {
            status: None,
            detail: "the pool config answer is not a JSON object".to_owned(),
        })?;
        let text = |k: &str| obj.get(k).and_then(|x| x.as_str()).map(str::to_owned);
        let raw = obj
            .get("pool_config")
            .cloned()
            .unwrap_or(serde_json::Value::Null);
        Ok(Self {
            pool_identifier: text("pool_identifier").unwrap_or_default(),
            client_type: text("client_type").unwrap_or_else(|| "generic".to_owned()),
            reach_limit_exception: text("reach_limit_exception"),
            rotation_strategy: text("rotation_strategy"),
            pool_config: PoolConfig::from_json(&raw)?,
            raw_pool_config: raw,
        })
    }
}

/// The body of `POST /auth/login` and `/auth/refresh`.
#[derive(Deserialize)]
pub(crate) struct TokenBody {
    pub(crate) access_token: SecretString,
    pub(crate) refresh_token: SecretString,
    #[serde(default)]
    pub(crate) expires_in: Option<u64>,
}
