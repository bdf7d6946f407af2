//! The [`ApiKey`] trait: what the pool needs to know about one key.

use sha2::{Digest, Sha256};
use std::future::Future;

/// One API key and how to build a client that uses it.
///
/// `primary_key` is the key's unique identity (often the raw secret itself). It is never logged,
/// stored or shown: everything the pool writes names the key by [`ApiKey::identifier`], which
/// defaults to a fingerprint.
///
/// ```
/// use apipool::ApiKey;
/// struct CoinGeckoKey(String);
/// struct CoinGecko { key: String }
/// impl ApiKey for CoinGeckoKey {
///     type Client = CoinGecko;
///     fn primary_key(&self) -> &str { &self.0 }
///     fn create_client(&self) -> CoinGecko { CoinGecko { key: self.0.clone() } }
/// }
/// let k = CoinGeckoKey("CG-secret-1234".into());
/// assert!(!k.identifier().contains("secret"));
/// ```
pub trait ApiKey: Send + Sync + 'static {
    /// The client type bound to this key (an SDK client, a reqwest client with the key baked in, ...).
    type Client: Send + Sync + 'static;

    /// The key's unique identity inside a pool. May be the secret: it is never logged.
    fn primary_key(&self) -> &str;

    /// A name that is safe to log and store. Defaults to [`fingerprint`] of the primary key.
    fn identifier(&self) -> String {
        fingerprint(self.primary_key())
    }

    /// Builds the client for this key. Called once per key; the pool keeps the client.
    fn create_client(&self) -> Self::Client;

    /// Checks whether the key works (e.g. a cheap authenticated request). Default: always usable.
    fn test_usability(&self, _client: &Self::Client) -> bool {
        true
    }

    /// Async twin of [`ApiKey::test_usability`]. Default: runs the sync check.
    fn atest_usability<'a>(
        &'a self,
        client: &'a Self::Client,
    ) -> impl Future<Output = bool> + Send + 'a {
        let usable = self.test_usability(client);
        async move { usable }
    }

    /// The quota scope this key shares its upstream limit with (account, project, IP), if any.
    fn scope(&self) -> Option<&str> {
        None
    }

    /// Relative weight for the `weighted` strategy (default 1).
    fn weight(&self) -> u32 {
        1
    }
}

/// A stable, non-reversible name for a secret: `key-` and 12 hex digits of its SHA-256.
///
/// ```
/// assert_eq!(apipool::fingerprint("abc"), "key-ba7816bf8f01");
/// ```
pub fn fingerprint(secret: &str) -> String {
    let digest = Sha256::digest(secret.as_bytes());
    format!("key-{}", &hex::encode(digest)[..12])
}

/// A masked form of a secret for display: the first 3 and last 4 characters of long secrets,
/// `****` for short ones.
///
/// ```
/// assert_eq!(apipool::mask("sk-abcdefghijklmnop"), "sk-…mnop");
/// assert_eq!(apipool::mask("short"), "****");
/// ```
pub fn mask(secret: &str) -> String {
    let chars: Vec<char> = secret.chars().collect();
    if chars.len() < 12 {
        return "****".to_owned();
    }
    let head: String = chars[..3].iter().collect();
    let tail: String = chars[chars.len() - 4..].iter().collect();
    format!("{head}…{tail}")
}
