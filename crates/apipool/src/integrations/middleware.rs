//! [`KeyPoolMiddleware`]: a `reqwest-middleware` middleware that takes a key from a pool for each
//! request (feature `reqwest-middleware`).
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use apipool::ApiKeyManager;
//! use apipool::http::HttpKey;
//! use apipool::integrations::middleware::KeyPoolMiddleware;
//!
//! let pool = ApiKeyManager::builder().keys([HttpKey::bearer("k1"), HttpKey::bearer("k2")]).build()?;
//! let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
//!     .with(KeyPoolMiddleware::new(pool))
//!     .build();
//! let resp = client.get("http://127.0.0.1:9000/price").query(&[("id", "btc")]).send().await?;
//! println!("{}", resp.status());
//! # Ok(()) }
//! ```

use super::PooledError;
use crate::http::{HttpClassifier, HttpKey};
use crate::manager::ApiKeyManager;
use crate::outcome::Outcome;
use http::Extensions;
use reqwest_middleware::{Middleware, Next};
use std::fmt;

/// Takes a key from an `ApiKeyManager<HttpKey>` for each request, injects it, classifies the
/// answer with [`HttpClassifier`] and retries on another key per the pool's policy (when the
/// request body can be cloned). See the [module docs](self).
///
/// ```
/// use apipool::integrations::middleware::KeyPoolMiddleware;
/// let pool = apipool::ApiKeyManager::builder().keys([apipool::http::HttpKey::bearer("k1")]).build().unwrap();
/// let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
///     .with(KeyPoolMiddleware::new(pool))
///     .build();
/// # let _ = client;
/// ```
#[derive(Clone)]
pub struct KeyPoolMiddleware {
    pool: ApiKeyManager<HttpKey>,
    classifier: HttpClassifier,
}

impl fmt::Debug for KeyPoolMiddleware {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyPoolMiddleware")
            .field("pool", &self.pool)
            .finish_non_exhaustive()
    }
}

impl KeyPoolMiddleware {
    /// A middleware over `pool` with the default [`HttpClassifier`].
    ///
    /// ```
    /// let pool = apipool::ApiKeyManager::builder().keys([apipool::http::HttpKey::bearer("k1")]).build().unwrap();
    /// let _ = apipool::integrations::middleware::KeyPoolMiddleware::new(pool);
    /// ```
    pub fn new(pool: ApiKeyManager<HttpKey>) -> Self {
        Self {
            pool,
            classifier: HttpClassifier::new(),
        }
    }

    /// Classifies answers with `classifier`.
    ///
    /// ```
    /// # let pool = apipool::ApiKeyManager::builder().keys([apipool::http::HttpKey::bearer("k1")]).build().unwrap();
    /// let m = apipool::integrations::middleware::KeyPoolMiddleware::new(pool)
    ///     .classifier(apipool::http::HttpClassifier::new());
    /// # let _ = m;
    /// ```
    pub fn classifier(mut self, classifier: HttpClassifier) -> Self {
        self.classifier = classifier;
        self
    }

    /// The pool.
    ///
    /// ```
    /// # let pool = apipool::ApiKeyManager::builder().keys([apipool::http::HttpKey::bearer("k1")]).build().unwrap();
    /// let m = apipool::integrations::middleware::KeyPoolMiddleware::new(pool);
    /// assert_eq!(m.pool().pool_size(), 1);
    /// ```
    pub fn pool(&self) -> &ApiKeyManager<HttpKey> {
        &self.pool
    }
}

fn classify_error(c: &HttpClassifier, e: &reqwest_middleware::Error) -> Outcome {
    match e {
        reqwest_middleware::Error::Reqwest(e) if e.is_timeout() => Outcome::Timeout,
        reqwest_middleware::Error::Reqwest(e) if e.is_builder() || e.is_redirect() => {
            Outcome::NotKeyRelated
        }
        reqwest_middleware::Error::Reqwest(e) => e.status().map_or(Outcome::Failed, |s| {
            c.classify_parts(s.as_u16(), &reqwest::header::HeaderMap::new())
        }),
        reqwest_middleware::Error::Middleware(_) => Outcome::Failed,
    }
}

#[async_trait::async_trait]
impl Middleware for KeyPoolMiddleware {
    async fn handle(
        &self,
        req: reqwest::Request,
        extensions: &mut Extensions,
        next: Next<'_>,
    ) -> reqwest_middleware::Result<reqwest::Response> {
        let template = extensions.clone();
        let result = super::send_pooled(
            &self.pool,
            &self.classifier,
            |e| classify_error(&self.classifier, e),
            req,
            |r| {
                let next = next.clone();
                let mut ext = template.clone();
                async move { next.run(r, &mut ext).await }
            },
        )
        .await;
        match result {
            Ok(resp) => Ok(resp),
            Err(PooledError::Inner(e)) => Err(e),
            Err(e) => Err(reqwest_middleware::Error::middleware(e)),
        }
    }
}
