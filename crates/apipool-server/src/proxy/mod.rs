//! The proxy: building upstream requests for a leased key, safely.
//!
//! * [`target`]: the path a caller gives stays under the pool's (or key's) `base_url`.
//! * [`headers`]: which headers cross the proxy in each direction.
//! * [`invoke`]: the apipool-ng `invoke` body for the `generic` client and the `httpx.Response` wrap.
//! * [`Outgoing::build`]: one upstream request for one key (base URL, key injection).
//! * [`upstream`]: the client that sends it.

pub mod headers;
pub mod invoke;
pub mod target;
pub mod upstream;

use bytes::Bytes;
use http::Method;
use http::header::{self, HeaderMap, HeaderValue};

use crate::engines::{KeyBaseUrl, KeyMaterial, PoolView, expose};
use target::{AuthPlacement, RelativeTarget, TargetError};

/// Why an upstream request could not be made or failed.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    /// Transport error (connection refused, timeout, reset). Its text never carries the URL.
    #[error("{0}")]
    Transport(#[from] upstream::Transport),
    /// Neither the key nor the pool has a base URL.
    #[error(
        "no upstream: set the pool's upstream (PUT /api/v1/pools/{{pool}} with {{\"upstream\": {{\"base_url\": ...}}}}) or client_config.base_url on its keys"
    )]
    NoBaseUrl,
    /// The pool has no upstream (the transparent route needs one).
    #[error(
        "the pool has no upstream: set it with PUT /api/v1/pools/{{pool}} and {{\"upstream\": {{\"base_url\": \"https://...\", \"auth\": \"bearer\"}}}}"
    )]
    NoUpstream,
    /// The key's `client_config.base_url` is not usable.
    #[error("key '{0}' has an unusable client_config.base_url: {1}")]
    KeyBaseUrl(String, String),
    /// The joined URL is unsafe (should have been caught earlier).
    #[error("{0}")]
    Target(#[from] TargetError),
    /// The key cannot be sent in a header (e.g. it contains a line break).
    #[error("key '{0}' contains characters that cannot be sent in an HTTP header")]
    BadKeyValue(String),
    /// The joined URL has characters an HTTP request line cannot carry.
    #[error(
        "the upstream URL contains characters that cannot be sent in a request line; percent-encode them"
    )]
    Unsendable,
    /// The upstream's answer is larger than the proxy buffers for `invoke`.
    #[error("the upstream answer is larger than {0} bytes; use the /http route, which streams")]
    TooLarge(usize),
}

/// A request to send upstream, before a key and base URL are chosen.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// Verb.
    pub method: Method,
    /// Path and query under the base URL.
    pub target: RelativeTarget,
    /// Extra query parameters.
    pub params: Vec<(String, String)>,
    /// Caller headers (already filtered).
    pub headers: HeaderMap,
    /// Body (buffered, so the call can be retried on another key).
    pub body: Option<Bytes>,
    /// Prefer the key's `client_config.base_url` over the pool's upstream (`invoke`); the
    /// transparent route always uses the pool's upstream.
    pub key_base_first: bool,
}

impl Outgoing {
    /// Builds the request for one key: the base URL (key's or pool's), the path under it, the
    /// key's own headers, and the key itself where the pool says (Bearer by default; not when
    /// the key's headers already carry it).
    pub fn build(
        &self,
        view: &PoolView,
        key_identifier: &str,
        material: &KeyMaterial,
    ) -> Result<http::Request<upstream::OutBody>, OpError> {
        let pool_base = view.upstream.as_ref().map(|u| &u.base_url);
        let base = if self.key_base_first {
            match &material.base_url {
                KeyBaseUrl::Url(u) => u,
                KeyBaseUrl::Invalid(e) => {
                    return Err(OpError::KeyBaseUrl(key_identifier.to_owned(), e.clone()));
                }
                KeyBaseUrl::Unset => pool_base.ok_or(OpError::NoBaseUrl)?,
            }
        } else {
            pool_base.ok_or(OpError::NoUpstream)?
        };
        let mut url = self.target.join(base)?;
        let auth = view
            .upstream
            .as_ref()
            .map_or(&AuthPlacement::Bearer, |u| &u.auth);
        if let AuthPlacement::Query(name) = auth
            && url.query_pairs().any(|(k, _)| k == name.as_str())
        {
            // A caller-supplied value of the key parameter is dropped, never forwarded.
            let kept: Vec<(String, String)> = url
                .query_pairs()
                .filter(|(k, _)| k != name.as_str())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect();
            url.set_query(None);
            if !kept.is_empty() {
                url.query_pairs_mut().extend_pairs(kept);
            }
        }
        if !self.params.is_empty() {
            url.query_pairs_mut().extend_pairs(&self.params);
        }
        if let AuthPlacement::Query(name) = auth {
            url.query_pairs_mut().append_pair(name, expose(material));
        }
        let mut headers = self.headers.clone();
        for (name, value) in &material.headers {
            headers.insert(name.clone(), value.clone());
        }
        let secret_header = |prefix: &str| {
            HeaderValue::from_str(&format!("{prefix}{}", expose(material)))
                .map(|mut v| {
                    v.set_sensitive(true);
                    v
                })
                .map_err(|_| OpError::BadKeyValue(key_identifier.to_owned()))
        };
        match auth {
            AuthPlacement::Bearer => {
                if !material.headers.contains_key(header::AUTHORIZATION) {
                    headers.insert(header::AUTHORIZATION, secret_header("Bearer ")?);
                }
            }
            AuthPlacement::Header(name) => {
                if !material.headers.contains_key(name) {
                    headers.insert(name.clone(), secret_header("")?);
                }
            }
            AuthPlacement::Query(_) => {}
        }
        let uri: http::Uri = url.as_str().parse().map_err(|_| OpError::Unsendable)?;
        let mut req = http::Request::new(upstream::OutBody::new(
            self.body.clone().unwrap_or_default(),
        ));
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = uri;
        *req.headers_mut() = headers;
        Ok(req)
    }
}
