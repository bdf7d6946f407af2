//! [`KeyPoolLayer`]: a `tower::Layer` that takes a key from a pool for each request (feature
//! `tower`).
//!
//! Works on any service of `reqwest::Request` (a `reqwest::Client` is one) or of
//! `http::Request<B>` whose body implements [`CloneBody`] (a hyper client, an axum router, ...).
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! use apipool::ApiKeyManager;
//! use apipool::http::HttpKey;
//! use apipool::integrations::tower::KeyPoolLayer;
//! use tower::{Service, ServiceBuilder, ServiceExt};
//!
//! let pool = ApiKeyManager::builder().keys([HttpKey::bearer("k1"), HttpKey::bearer("k2")]).build()?;
//! let mut client = ServiceBuilder::new()
//!     .layer(KeyPoolLayer::new(pool))
//!     .service(reqwest::Client::new());
//! let req = reqwest::Request::new(reqwest::Method::GET, "http://127.0.0.1:9000/price?id=btc".parse()?);
//! let resp = client.ready().await?.call(req).await?;
//! println!("{}", resp.status());
//! # Ok(()) }
//! ```

use super::{InjectError, PooledError, PooledRequest, PooledResponse, injection, join_query};
use crate::http::{HttpClassifier, HttpKey, KeyAuth};
use crate::manager::ApiKeyManager;
use crate::outcome::Outcome;
use ::tower::{Layer, Service, ServiceExt};
use bytes::Bytes;
use futures::future::BoxFuture;
use reqwest::header::HeaderMap;
use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

/// A body that can (maybe) be copied for another attempt. Implement it for your own body type to
/// let the layer retry its requests on another key.
///
/// ```
/// use apipool::integrations::tower::CloneBody;
/// assert_eq!(String::from("x").try_clone_body(), Some(String::from("x")));
/// ```
pub trait CloneBody: Sized {
    /// A copy, or `None` when the body cannot be replayed (a stream).
    fn try_clone_body(&self) -> Option<Self>;
}

macro_rules! clone_body {
    ($($t:ty),*) => {$(
        impl CloneBody for $t {
            fn try_clone_body(&self) -> Option<Self> {
                Some(self.clone())
            }
        }
    )*};
}

clone_body!(
    (),
    String,
    Vec<u8>,
    Bytes,
    http_body_util::Full<Bytes>,
    http_body_util::Empty<Bytes>
);

impl CloneBody for reqwest::Body {
    fn try_clone_body(&self) -> Option<Self> {
        self.as_bytes().map(|b| reqwest::Body::from(b.to_vec()))
    }
}

impl<B: CloneBody + Send + 'static> PooledRequest for http::Request<B> {
    fn inject(&mut self, key: &KeyAuth) -> Result<(), InjectError> {
        let inj = injection(key)?;
        for (k, v) in inj.headers {
            self.headers_mut().insert(k, v);
        }
        if let Some(q) = inj.query {
            let uri = self.uri().clone();
            let pq = join_query(uri.query(), &q);
            let mut parts = uri.into_parts();
            let path = parts
                .path_and_query
                .as_ref()
                .map_or("/", http::uri::PathAndQuery::path)
                .to_owned();
            parts.path_and_query = Some(
                format!("{path}?{pq}")
                    .parse()
                    .map_err(|e: http::uri::InvalidUri| InjectError(e.to_string()))?,
            );
            *self.uri_mut() =
                http::Uri::from_parts(parts).map_err(|e| InjectError(e.to_string()))?;
        }
        Ok(())
    }

    fn try_clone_request(&self) -> Option<Self> {
        let body = self.body().try_clone_body()?;
        let mut r = http::Request::new(body);
        *r.method_mut() = self.method().clone();
        *r.uri_mut() = self.uri().clone();
        *r.version_mut() = self.version();
        *r.headers_mut() = self.headers().clone();
        *r.extensions_mut() = self.extensions().clone();
        Some(r)
    }

    fn label(&self) -> String {
        format!("{} {}", self.method(), self.uri().path())
    }
}

impl<B> PooledResponse for http::Response<B> {
    fn status_code(&self) -> u16 {
        self.status().as_u16()
    }

    fn header_map(&self) -> &HeaderMap {
        self.headers()
    }
}

/// Takes a key from an `ApiKeyManager<HttpKey>` for each request: see the [module docs](self).
///
/// ```
/// use apipool::integrations::tower::KeyPoolLayer;
/// let pool = apipool::ApiKeyManager::builder().keys([apipool::http::HttpKey::bearer("k1")]).build().unwrap();
/// let layer = KeyPoolLayer::new(pool);
/// # let _ = layer;
/// ```
#[derive(Clone)]
pub struct KeyPoolLayer {
    pool: ApiKeyManager<HttpKey>,
    classifier: Arc<HttpClassifier>,
}

impl fmt::Debug for KeyPoolLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyPoolLayer")
            .field("pool", &self.pool)
            .finish_non_exhaustive()
    }
}

impl KeyPoolLayer {
    /// A layer over `pool` with the default [`HttpClassifier`].
    ///
    /// ```
    /// let pool = apipool::ApiKeyManager::builder().keys([apipool::http::HttpKey::bearer("k1")]).build().unwrap();
    /// let _ = apipool::integrations::tower::KeyPoolLayer::new(pool);
    /// ```
    pub fn new(pool: ApiKeyManager<HttpKey>) -> Self {
        Self {
            pool,
            classifier: Arc::new(HttpClassifier::new()),
        }
    }

    /// Classifies answers with `classifier` (e.g. one with a scope-marker header).
    ///
    /// ```
    /// # let pool = apipool::ApiKeyManager::builder().keys([apipool::http::HttpKey::bearer("k1")]).build().unwrap();
    /// let layer = apipool::integrations::tower::KeyPoolLayer::new(pool)
    ///     .classifier(apipool::http::HttpClassifier::new());
    /// # let _ = layer;
    /// ```
    pub fn classifier(mut self, classifier: HttpClassifier) -> Self {
        self.classifier = Arc::new(classifier);
        self
    }

    /// The pool.
    ///
    /// ```
    /// # let pool = apipool::ApiKeyManager::builder().keys([apipool::http::HttpKey::bearer("k1")]).build().unwrap();
    /// let layer = apipool::integrations::tower::KeyPoolLayer::new(pool);
    /// assert_eq!(layer.pool().pool_size(), 1);
    /// ```
    pub fn pool(&self) -> &ApiKeyManager<HttpKey> {
        &self.pool
    }
}

impl<S> Layer<S> for KeyPoolLayer {
    type Service = KeyPool<S>;

    fn layer(&self, inner: S) -> KeyPool<S> {
        KeyPool {
            inner,
            pool: self.pool.clone(),
            classifier: self.classifier.clone(),
        }
    }
}

/// The service [`KeyPoolLayer`] makes. Always ready: each attempt waits for the inner service's
/// readiness on its own clone.
///
/// ```
/// use apipool::integrations::tower::KeyPoolLayer;
/// use tower::Layer;
/// let pool = apipool::ApiKeyManager::builder().keys([apipool::http::HttpKey::bearer("k1")]).build().unwrap();
/// let svc = KeyPoolLayer::new(pool).layer(reqwest::Client::new());
/// # let _ = svc;
/// ```
#[derive(Clone)]
pub struct KeyPool<S> {
    inner: S,
    pool: ApiKeyManager<HttpKey>,
    classifier: Arc<HttpClassifier>,
}

impl<S> fmt::Debug for KeyPool<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyPool")
            .field("pool", &self.pool)
            .finish_non_exhaustive()
    }
}

impl<S, Req> Service<Req> for KeyPool<S>
where
    Req: PooledRequest,
    S: Service<Req> + Clone + Send + 'static,
    S::Response: PooledResponse + Send + 'static,
    S::Error: Send + 'static,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = PooledError<S::Error>;
    type Future = BoxFuture<'static, Result<S::Response, PooledError<S::Error>>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let (inner, pool, classifier) = (
            self.inner.clone(),
            self.pool.clone(),
            self.classifier.clone(),
        );
        Box::pin(async move {
            // Transport errors of the inner service are failures (they count toward a ban and are
            // retried when the pool's policy says so).
            super::send_pooled(
                &pool,
                &classifier,
                |_e: &S::Error| Outcome::Failed,
                req,
                move |r| inner.clone().oneshot(r),
            )
            .await
        })
    }
}
