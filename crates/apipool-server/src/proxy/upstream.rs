//! The proxy's upstream HTTP client: hyper-util's pooled client over rustls (HTTP/1.1, and
//! HTTP/2 where the upstream offers it by ALPN), the platform's certificate roots, no redirects.
//!
//! Both proxy routes send through it. It is hyper's own client with nothing on top: the request
//! is built once as an `http::Request` (no URL re-parse), and the pool's timeout is a deadline the
//! caller carries from the head through the body ([`Upstream::send`], [`read_limited`],
//! [`DeadlineBody`]) instead of one timer per layer.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls_platform_verifier::BuilderVerifierExt;
use tokio::time::{Instant, Sleep};

/// What a request to the upstream carries (buffered, so a call can be retried on another key).
pub type OutBody = Full<Bytes>;

/// Why the upstream gave no (complete) answer. The text never carries the URL.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Transport {
    /// The connection could not be opened (refused, TLS handshake failed, connect timeout).
    #[error("connection failed{0}")]
    Connect(String),
    /// The request could not be sent or the answer's head could not be read (reset, closed).
    #[error("request failed{0}")]
    Request(String),
    /// The answer's body broke off or could not be read.
    #[error("the answer could not be read{0}")]
    Body(String),
    /// The pool's timeout passed first.
    #[error("the upstream did not answer in time")]
    Timeout,
}

impl Transport {
    /// Whether the pool's timeout ended the call.
    pub fn is_timeout(&self) -> bool {
        matches!(self, Self::Timeout)
    }
}

/// `": cause: its cause…"` from an error's source chain, leaving out any text with a URL in it.
fn causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = String::new();
    let mut source = Some(e);
    while let Some(s) = source {
        let s_text = s.to_string();
        if !s_text.contains("://") && !text.ends_with(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}

/// The upstream client (cheap to clone: clones share one connection pool).
#[derive(Clone)]
pub struct Upstream {
    client: Arc<Client<HttpsConnector<HttpConnector>, OutBody>>,
}

thread_local! {
    /// A serving thread's own client ([`Upstream::start_for_this_thread`]).
    static THIS_THREAD: std::cell::OnceCell<Upstream> = const { std::cell::OnceCell::new() };
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream").finish_non_exhaustive()
    }
}

impl Upstream {
    /// A client with keep-alive pooling (up to 1,024 idle connections per host, closed after
    /// 60 s idle), `TCP_NODELAY`, a 10 s connect timeout and the platform's certificate roots.
    pub fn new() -> anyhow::Result<Self> {
        Self::with_idle_per_host(1024)
    }

    /// A serving thread's own client keeps fewer idle connections per host. When no idle
    /// connection is at hand the client opens one, and a connection is handed back to the
    /// pool by a task of its own; on a busy thread that task runs late, so a burst opens
    /// connections that would then stay idle. Measured with 1,000 clients on 2 serving
    /// threads: 1,600 upstream connections open and 150 MB resident with room for 1,024 idle
    /// ones per thread, 1,000 and 132 MB with 256.
    const IDLE_PER_HOST_PER_THREAD: usize = 256;

    fn with_idle_per_host(max_idle_per_host: usize) -> anyhow::Result<Self> {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(Duration::from_secs(10)));
        // The provider is named: the process may have more than one compiled in.
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_platform_verifier()?
            .with_no_client_auth();
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_all_versions()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(max_idle_per_host)
            .build(https);
        Ok(Self {
            client: Arc::new(client),
        })
    }

    /// Gives the calling thread a client of its own, with its own connection pool, that
    /// [`Upstream::for_this_thread`] returns on this thread from now on. A serving thread calls
    /// this: its requests then reuse connections whose tasks run on the same thread, so no
    /// wake-up crosses threads. Without it (or if it cannot be built) the thread uses the
    /// shared client.
    pub fn start_for_this_thread() {
        match Self::with_idle_per_host(Self::IDLE_PER_HOST_PER_THREAD) {
            Ok(own) => THIS_THREAD.with(|t| {
                let _ = t.set(own);
            }),
            Err(e) => {
                tracing::warn!(error = %e, "a serving thread uses the shared upstream client");
            }
        }
    }

    /// The calling thread's own client if it has one, else this (shared) one.
    pub fn for_this_thread(&self) -> Self {
        THIS_THREAD
            .with(|t| t.get().cloned())
            .unwrap_or_else(|| self.clone())
    }

    /// Sends `req`; its answer's head must arrive before `deadline`.
    pub async fn send(
        &self,
        req: Request<OutBody>,
        deadline: Instant,
    ) -> Result<http::Response<Incoming>, Transport> {
        match tokio::time::timeout_at(deadline, self.client.request(req)).await {
            Err(_) => Err(Transport::Timeout),
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) if e.is_connect() => Err(Transport::Connect(causes(&e))),
            Ok(Err(e)) => Err(Transport::Request(causes(&e))),
        }
    }
}

/// Reads a whole body, at most `limit` bytes, before `deadline`. `Ok(None)`: longer than `limit`.
pub async fn read_limited(
    body: Incoming,
    limit: usize,
    deadline: Instant,
) -> Result<Option<Bytes>, Transport> {
    let read = async {
        let mut body = body;
        let mut buf = bytes::BytesMut::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| Transport::Body(causes(&e)))?;
            if let Ok(chunk) = frame.into_data() {
                if buf.len() + chunk.len() > limit {
                    return Ok(None);
                }
                if buf.is_empty() && body.is_end_stream() {
                    // One chunk, the whole body: no copy.
                    return Ok(Some(chunk));
                }
                buf.extend_from_slice(&chunk);
            }
        }
        Ok(Some(buf.freeze()))
    };
    tokio::time::timeout_at(deadline, read)
        .await
        .unwrap_or(Err(Transport::Timeout))
}

/// An upstream body streamed to the caller that ends with an error at `deadline` (the pool's
/// timeout covers the body too). The error cuts the caller's response off, so a late body is
/// never mistaken for a complete short one.
#[derive(Debug)]
pub struct DeadlineBody {
    inner: Incoming,
    sleep: Pin<Box<Sleep>>,
}

impl DeadlineBody {
    /// `inner`, cut off at `deadline`.
    pub fn new(inner: Incoming, deadline: Instant) -> Self {
        Self {
            inner,
            sleep: Box::pin(tokio::time::sleep_until(deadline)),
        }
    }
}

impl Body for DeadlineBody {
    type Data = Bytes;
    type Error = Transport;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Transport>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(|e| Transport::Body(causes(&e)))));
        }
        ready!(self.sleep.as_mut().poll(cx));
        Poll::Ready(Some(Err(Transport::Timeout)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causes_leave_out_urls_and_repeats() {
        #[derive(Debug)]
        struct E(&'static str, Option<Box<E>>);
        impl std::fmt::Display for E {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.0)
            }
        }
        impl std::error::Error for E {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                let e: &(dyn std::error::Error + 'static) = self.1.as_deref()?;
                Some(e)
            }
        }
        let e = E(
            "client error (Connect)",
            Some(Box::new(E(
                "error sending to http://127.0.0.1:9/x?key=secret",
                Some(Box::new(E("Connection refused (os error 111)", None))),
            ))),
        );
        let text = Transport::Connect(causes(&e)).to_string();
        assert_eq!(
            text,
            "connection failed: client error (Connect): Connection refused (os error 111)"
        );
        assert!(!text.contains("secret"));
    }
}
