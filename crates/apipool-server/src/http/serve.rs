//! Serving connections: each request goes to the transparent proxy route (the hot path) or to
//! the router.
//!
//! `axum::serve` hands every request to the router, whose per-request work (the service clone,
//! the route lookup, the `MatchedPath` and path-parameter extensions, the boxed middleware and
//! handler futures, the extractors' state clones) cost a proxied request about as much as the
//! proxy's own work. Here the transparent route (`/api/v1/proxy/{pool}/http[/{path}]`) is told
//! from the path alone and served directly ([`super::proxy::lane`] inside
//! [`super::observe`]); every other request goes to the router as before, with the caller's
//! address as `ConnectInfo`. Connections are served like `axum::serve` serves them: HTTP/1 and
//! HTTP/2 (prior knowledge), upgrades, `TCP_NODELAY`, graceful shutdown that lets in-flight
//! requests finish.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::response::Response;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tower::ServiceExt as _;

use super::AppState;

/// Serves `router` (and the proxy lane in front of it) on `listener` until `shutdown`
/// completes; then stops accepting and waits for the open connections to finish their
/// requests.
pub(crate) async fn serve(
    listener: TcpListener,
    state: AppState,
    router: Router,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let graceful = GracefulShutdown::new();
    let state = Arc::new(state);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let (tcp, remote) = match accepted {
            Ok(c) => c,
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                // Out of file descriptors or memory: wait for some to be released.
                tracing::error!(error = %e, "cannot accept a connection; retrying in 1 s");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    () = &mut shutdown => break,
                }
            }
        };
        // Answers go out at once (a proxied answer is one write; Nagle would only hold it back).
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY not set on an accepted connection");
        }
        let service = Dispatch {
            state: state.clone(),
            router: router.clone(),
            remote,
        };
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder.http2().enable_connect_protocol();
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(tcp), service);
            if let Err(e) = watcher.watch(conn).await {
                tracing::trace!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// Errors of one connection (the listener itself is fine).
fn is_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind;
    matches!(
        e.kind(),
        ErrorKind::ConnectionRefused | ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset
    )
}

/// The service of one connection.
#[derive(Clone)]
struct Dispatch {
    state: Arc<AppState>,
    router: Router,
    remote: SocketAddr,
}

type Answer = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

impl hyper::service::Service<http::Request<Incoming>> for Dispatch {
    type Response = Response;
    type Error = Infallible;
    type Future = Answer;

    fn call(&self, req: http::Request<Incoming>) -> Answer {
        if let Some(route) = super::proxy::lane_route(req.uri().path()) {
            let state = self.state.clone();
            return Box::pin(async move {
                Ok(super::observe(route, req, |req| super::proxy::lane(&state, req)).await)
            });
        }
        let mut req = req.map(Body::new);
        req.extensions_mut().insert(ConnectInfo(self.remote));
        Box::pin(self.router.clone().oneshot(req))
    }
}
