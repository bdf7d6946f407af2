//! Drop-in pooling for existing HTTP clients: one layer gives a reqwest or tower client key
//! rotation, cooldowns on 429, and retries on another key.
//!
//! - [`tower`] (feature `tower`): [`tower::KeyPoolLayer`] for any `tower::Service` of
//!   `reqwest::Request` or `http::Request<B>` (e.g. a `reqwest::Client`, a hyper client).
//! - [`middleware`] (feature `reqwest-middleware`): [`middleware::KeyPoolMiddleware`] for a
//!   `reqwest_middleware::ClientWithMiddleware`.
//!
//! Both are thin shells over one core: per request, take a key from an
//! `ApiKeyManager<HttpKey>`, inject it where the key says (bearer, header or query), send,
//! classify the answer with [`crate::http::HttpClassifier`], and — when the request can be
//! cloned — retry on another key per the pool's retry policy (rate limits always; failures when
//! `retry_on_failure`). A request whose body cannot be cloned (a stream) is sent once.

use crate::http::{HttpClassifier, HttpKey, KeyAuth};
use crate::manager::{ApiKeyManager, CallOpts, KeyClient};
use crate::outcome::Outcome;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

#[cfg(feature = "reqwest-middleware")]
pub mod middleware;
#[cfg(feature = "tower")]
pub mod tower;

/// A request the integrations can put a key into and (maybe) clone for a retry.
///
/// Implemented for `reqwest::Request` and, with feature `tower`, for `http::Request<B>` whose
/// body implements [`tower::CloneBody`].
///
/// ```
/// use apipool::ApiKey;
/// use apipool::integrations::PooledRequest;
/// let mut req = reqwest::Request::new(reqwest::Method::GET, "http://127.0.0.1:9000/price?id=btc".parse().unwrap());
/// req.inject(&apipool::http::HttpKey::bearer("k1").create_client()).unwrap();
/// assert_eq!(req.headers()["authorization"], "Bearer k1");
/// assert_eq!(req.label(), "GET /price");
/// ```
pub trait PooledRequest: Sized + Send + 'static {
    /// Adds the key's credentials (header or query parameter).
    fn inject(&mut self, key: &KeyAuth) -> Result<(), InjectError>;
    /// A copy for another attempt, or `None` when the body cannot be replayed (a stream).
    fn try_clone_request(&self) -> Option<Self>;
    /// A label for statistics: method and path, never the query string.
    fn label(&self) -> String;
}

/// A response the integrations can classify.
///
/// ```
/// use apipool::integrations::PooledResponse;
/// let resp = http::Response::builder().status(429).body(()).unwrap();
/// assert_eq!(resp.status_code(), 429);
/// ```
pub trait PooledResponse {
    /// The HTTP status code.
    fn status_code(&self) -> u16;
    /// The response headers (Retry-After, rate-limit headers).
    fn header_map(&self) -> &HeaderMap;
}

/// The key could not be put into the request (e.g. a key that is not a valid header value).
///
/// ```
/// use apipool::ApiKey;
/// use apipool::integrations::PooledRequest;
/// let mut req = reqwest::Request::new(reqwest::Method::GET, "http://127.0.0.1:9000/".parse().unwrap());
/// let bad = apipool::http::HttpKey::bearer("line\nbreak").create_client();
/// assert!(req.inject(&bad).is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot put the key into the request: {0}")]
pub struct InjectError(String);

/// Where a key goes, read once from [`KeyAuth::apply`] on a probe request, so every request type
/// gets exactly what a reqwest request would.
struct Injection {
    headers: Vec<(HeaderName, HeaderValue)>,
    query: Option<String>,
}

fn probe_client() -> &'static reqwest::Client {
    static PROBE: OnceLock<reqwest::Client> = OnceLock::new();
    // Never sends anything: only used to build requests.
    PROBE.get_or_init(reqwest::Client::new)
}

fn injection(key: &KeyAuth) -> Result<Injection, InjectError> {
    let probe = key
        .apply(probe_client().get("http://apipool.invalid/"))
        .build()
        .map_err(|e| InjectError(e.to_string()))?;
    let headers = probe
        .headers()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let query = probe
        .url()
        .query()
        .filter(|q| !q.is_empty())
        .map(str::to_owned);
    Ok(Injection { headers, query })
}

fn join_query(existing: Option<&str>, extra: &str) -> String {
    match existing {
        Some(q) if !q.is_empty() => format!("{q}&{extra}"),
        _ => extra.to_owned(),
    }
}

impl PooledRequest for reqwest::Request {
    fn inject(&mut self, key: &KeyAuth) -> Result<(), InjectError> {
        let inj = injection(key)?;
        for (k, v) in inj.headers {
            self.headers_mut().insert(k, v);
        }
        if let Some(q) = inj.query {
            let joined = join_query(self.url().query(), &q);
            self.url_mut().set_query(Some(&joined));
        }
        Ok(())
    }

    fn try_clone_request(&self) -> Option<Self> {
        self.try_clone()
    }

    fn label(&self) -> String {
        format!("{} {}", self.method(), self.url().path())
    }
}

impl PooledResponse for reqwest::Response {
    fn status_code(&self) -> u16 {
        self.status().as_u16()
    }

    fn header_map(&self) -> &HeaderMap {
        self.headers()
    }
}

/// One attempt's failure inside the core.
enum Attempt<E> {
    Send(E),
    Inject(InjectError),
    NotReplayable,
}

/// How a pooled send ended when it did not return a response.
///
/// ```
/// use apipool::integrations::PooledError;
/// let e: PooledError<std::io::Error> = apipool::Error::NoUsableKeys.into();
/// assert!(e.to_string().contains("no usable key"));
/// ```
#[derive(Debug, thiserror::Error)]
pub enum PooledError<E> {
    /// The pool had no key to give (all cooling past the wait budget, or none usable).
    #[error(transparent)]
    Pool(#[from] crate::Error),
    /// The inner client failed (after any retries).
    #[error("the request failed: {0}")]
    Inner(#[source] E),
    /// The key could not be put into the request.
    #[error(transparent)]
    Inject(#[from] InjectError),
    /// The request did not finish within the pool's timeout.
    #[error("the request timed out after {0:?} (the pool's timeout)")]
    Timeout(Duration),
}

/// The one core both shells use: lease a key, inject, send, classify, report; retry on another key
/// when the request can be cloned.
pub(crate) async fn send_pooled<Req, Resp, E, F, Fut>(
    pool: &ApiKeyManager<HttpKey>,
    classifier: &HttpClassifier,
    classify_err: impl Fn(&E) -> Outcome + Send + Sync,
    req: Req,
    mut send: F,
) -> Result<Resp, PooledError<E>>
where
    Req: PooledRequest,
    Resp: PooledResponse,
    F: FnMut(Req) -> Fut,
    Fut: Future<Output = Result<Resp, E>>,
{
    let label: Arc<str> = Arc::from(req.label());
    let classify = |r: &Result<Resp, Attempt<E>>| match r {
        Ok(resp) => classifier.classify_parts(resp.status_code(), resp.header_map()),
        Err(Attempt::Send(e)) => classify_err(e),
        Err(Attempt::Inject(_) | Attempt::NotReplayable) => Outcome::NotKeyRelated,
    };
    let Some(template) = req.try_clone_request() else {
        // A streaming body: one attempt on one key.
        let mut lease = pool.aacquire().await?;
        lease.set_label(label);
        let mut req = req;
        req.inject(lease.client())?;
        let result = send(req).await.map_err(Attempt::Send);
        lease.report(classify(&result));
        return result.map_err(|e| match e {
            Attempt::Send(e) => PooledError::Inner(e),
            Attempt::Inject(e) => PooledError::Inject(e),
            Attempt::NotReplayable => unreachable_replay(),
        });
    };
    let mut opts = CallOpts::from(pool.call_settings());
    opts.label = Some(label);
    let mut first = Some(req);
    let op = move |kc: Arc<KeyClient<HttpKey>>| {
        let attempt = first
            .take()
            .or_else(|| template.try_clone_request())
            .ok_or(Attempt::NotReplayable)
            .and_then(|mut r| r.inject(kc.client()).map(|()| r).map_err(Attempt::Inject))
            .map(&mut send);
        async move {
            match attempt {
                Ok(fut) => fut.await.map_err(Attempt::Send),
                Err(e) => Err(e),
            }
        }
    };
    match pool.acall_with_opts(&classify, &opts, op).await {
        Ok(resp) => Ok(resp),
        Err(crate::CallError::Pool(e)) => Err(PooledError::Pool(e)),
        Err(crate::CallError::Timeout { timeout, .. }) => Err(PooledError::Timeout(timeout)),
        Err(crate::CallError::Failed { error, .. }) => Err(match error {
            Attempt::Send(e) => PooledError::Inner(e),
            Attempt::Inject(e) => PooledError::Inject(e),
            Attempt::NotReplayable => PooledError::Inject(InjectError(
                "the request body could not be cloned for a retry".to_owned(),
            )),
        }),
    }
}

fn unreachable_replay<E>() -> PooledError<E> {
    PooledError::Inject(InjectError(
        "the request body could not be cloned for a retry".to_owned(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ApiKey;
    use crate::http::AuthPlacement;

    fn auth(p: AuthPlacement) -> KeyAuth {
        HttpKey::new("sk-secret-123456", p).create_client()
    }

    #[test]
    fn keys_go_where_the_key_says() {
        let mut r = reqwest::Request::new(
            reqwest::Method::GET,
            "http://127.0.0.1:1/price?id=btc".parse().unwrap(),
        );
        r.inject(&auth(AuthPlacement::Bearer)).unwrap();
        assert_eq!(r.headers()["authorization"], "Bearer sk-secret-123456");
        assert!(r.headers()["authorization"].is_sensitive());

        let mut r = reqwest::Request::new(
            reqwest::Method::GET,
            "http://127.0.0.1:1/price?id=btc".parse().unwrap(),
        );
        r.inject(&auth(AuthPlacement::Query("api_key".into())))
            .unwrap();
        assert_eq!(r.url().query(), Some("id=btc&api_key=sk-secret-123456"));
        assert_eq!(r.label(), "GET /price");

        let mut r = reqwest::Request::new(
            reqwest::Method::POST,
            "http://127.0.0.1:1/x".parse().unwrap(),
        );
        r.inject(&auth(AuthPlacement::Header(HeaderName::from_static(
            "x-api-key",
        ))))
        .unwrap();
        assert_eq!(r.headers()["x-api-key"], "sk-secret-123456");
        assert!(!r.headers().contains_key("authorization"));
    }
}
