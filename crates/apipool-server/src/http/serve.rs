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
//!
//! **Where connections are served.** With no serving threads, on the caller's runtime (tests,
//! embedding, `serve --workers 1`). With N serving threads (`apipool serve` by default: one per
//! core), each thread runs its own current-thread runtime and serves the connections the
//! accept loop hands it, the thread with the fewest open connections first; a request, its
//! upstream connection ([`crate::proxy::upstream::Upstream::for_this_thread`]) and every wake-up
//! between them stay on one thread, with no work stealing and no hand-off between threads.
//! One listener accepts, so a port in use is still an error at start.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::response::Response;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;

use super::AppState;

/// Serves `router` (and the proxy lane in front of it) on `listener` until `shutdown`
/// completes; then stops accepting and waits for the open connections to finish their
/// requests. `threads` = 0 serves on the caller's runtime; N > 0 on N serving threads.
///
/// The serving threads' runtimes outlive this call until [`ServingThreads::release`]: sockets
/// opened while serving (pooled database and Redis connections) are driven by the runtime that
/// opened them, and the rest of the shutdown (the statistics' last flush) may still use them.
pub(crate) async fn serve(
    listener: TcpListener,
    state: AppState,
    router: Router,
    shutdown: impl Future<Output = ()>,
    threads: usize,
) -> std::io::Result<ServingThreads> {
    let base = Dispatch {
        state: Arc::new(state),
        router,
        remote: SocketAddr::from(([0, 0, 0, 0], 0)),
    };
    let mut place = if threads == 0 {
        Place::Here(GracefulShutdown::new())
    } else {
        Place::Threads(ServingThreads::start(threads)?)
    };
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
            remote,
            ..base.clone()
        };
        match &mut place {
            Place::Here(graceful) => serve_connection(tcp, service, graceful.watcher(), None),
            Place::Threads(threads) => threads.hand(tcp, service),
        }
    }
    drop(listener);
    Ok(match place {
        Place::Here(graceful) => {
            graceful.shutdown().await;
            ServingThreads::none()
        }
        Place::Threads(mut threads) => {
            threads.finish_connections().await;
            threads
        }
    })
}

/// Where accepted connections go.
enum Place {
    /// Served on this runtime.
    Here(GracefulShutdown),
    /// Handed to the serving threads.
    Threads(ServingThreads),
}

/// Serves one connection on the current runtime until it closes (or, after a graceful
/// shutdown began, until its in-flight requests are answered); `open` counts it meanwhile.
fn serve_connection(
    tcp: TcpStream,
    service: Dispatch,
    watcher: Watcher,
    open: Option<OpenConnection>,
) {
    tokio::spawn(async move {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder.http2().enable_connect_protocol();
        let conn = builder.serve_connection_with_upgrades(TokioIo::new(tcp), service);
        if let Err(e) = watcher.watch(conn).await {
            tracing::trace!(error = %e, "connection ended with an error");
        }
        drop(open);
    });
}

/// One open connection of a serving thread (its count goes down when this drops).
struct OpenConnection(Arc<AtomicUsize>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The serving threads, each with its own current-thread runtime.
pub(crate) struct ServingThreads {
    threads: Vec<ServingThread>,
    /// Ends the threads' runtimes.
    release: CancellationToken,
    /// Where the next search for the least busy thread starts (ties go round the threads).
    next: usize,
}

/// What the accept loop hands a serving thread.
type Handed = (std::net::TcpStream, Dispatch, OpenConnection);

struct ServingThread {
    /// Accepted connections for this thread; dropped to start its graceful shutdown.
    connections: Option<mpsc::UnboundedSender<Handed>>,
    /// Closed when this thread's connections have all finished.
    finished: Option<oneshot::Receiver<()>>,
    /// Its open connections.
    open: Arc<AtomicUsize>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for ServingThreads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServingThreads")
            .field("threads", &self.threads.len())
            .finish_non_exhaustive()
    }
}

impl ServingThreads {
    fn none() -> Self {
        Self {
            threads: Vec::new(),
            release: CancellationToken::new(),
            next: 0,
        }
    }

    /// Starts `n` serving threads (named `apipool-serve-I`).
    fn start(n: usize) -> std::io::Result<Self> {
        let mut all = Self::none();
        for i in 0..n {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let (connections, accepted) = mpsc::unbounded_channel();
            let (finished, finished_rx) = oneshot::channel::<()>();
            let release = all.release.clone();
            let handle = std::thread::Builder::new()
                .name(format!("apipool-serve-{i}"))
                .spawn(move || {
                    runtime.block_on(serving_thread(accepted, finished, release));
                })?;
            all.threads.push(ServingThread {
                connections: Some(connections),
                finished: Some(finished_rx),
                open: Arc::new(AtomicUsize::new(0)),
                handle: Some(handle),
            });
        }
        Ok(all)
    }

    /// Hands an accepted connection to the running thread with the fewest open connections.
    fn hand(&mut self, tcp: TcpStream, service: Dispatch) {
        let mut item = match tcp.into_std() {
            Ok(tcp) => (tcp, service),
            Err(e) => {
                tracing::debug!(error = %e, "an accepted connection could not be handed over");
                return;
            }
        };
        loop {
            let threads = &self.threads;
            let Some(best) = least_busy(threads.len(), self.next, |i| {
                let t = &threads[i];
                t.connections
                    .as_ref()
                    .map(|_| t.open.load(Ordering::Relaxed))
            }) else {
                tracing::error!("no serving thread is running; the connection is dropped");
                return;
            };
            self.next = best + 1;
            let thread = &mut self.threads[best];
            // `least_busy` picks running threads only.
            let Some(tx) = &thread.connections else {
                return;
            };
            thread.open.fetch_add(1, Ordering::Relaxed);
            let open = OpenConnection(thread.open.clone());
            match tx.send((item.0, item.1, open)) {
                Ok(()) => return,
                Err(mpsc::error::SendError((tcp, service, _))) => {
                    // Its runtime ended (it panicked): the others serve from now on.
                    tracing::error!(thread = best, "a serving thread has stopped");
                    thread.connections = None;
                    item = (tcp, service);
                }
            }
        }
    }

    /// Stops handing out connections and waits until every thread's connections finished
    /// (their in-flight requests answered).
    async fn finish_connections(&mut self) {
        for t in &mut self.threads {
            t.connections = None;
        }
        for t in &mut self.threads {
            if let Some(f) = t.finished.take() {
                // An error means the thread ended early (it panicked); nothing to wait for.
                let _ = f.await;
            }
        }
    }

    /// Ends the serving threads' runtimes and waits for the threads.
    pub(crate) async fn release(mut self) {
        self.release.cancel();
        let handles: Vec<_> = self
            .threads
            .iter_mut()
            .filter_map(|t| t.handle.take())
            .collect();
        if handles.is_empty() {
            return;
        }
        let joined = tokio::task::spawn_blocking(move || {
            handles
                .into_iter()
                .map(std::thread::JoinHandle::join)
                .filter(Result::is_err)
                .count()
        })
        .await;
        match joined {
            Ok(0) => {}
            Ok(n) => tracing::error!(threads = n, "serving threads panicked"),
            Err(e) => tracing::error!(error = %e, "serving threads could not be joined"),
        }
    }
}

impl Drop for ServingThreads {
    fn drop(&mut self) {
        // Released or not, the threads end (without being waited for).
        self.release.cancel();
    }
}

/// Of `n` threads, the running one with the fewest open connections (`load(i)`: `None` when
/// thread `i` has stopped); among equals the first counting from `next`, so that ties go round
/// the threads.
fn least_busy(n: usize, next: usize, load: impl Fn(usize) -> Option<usize>) -> Option<usize> {
    (0..n)
        .map(|i| (next + i) % n)
        .filter_map(|i| load(i).map(|open| (open, i)))
        .min_by_key(|&(open, _)| open)
        .map(|(_, i)| i)
}

/// A serving thread: serves the connections handed to it on this thread's runtime, with this
/// thread's own upstream client; when no more come, shuts them down gracefully, says so, and
/// keeps the runtime (and the sockets it drives) up until released.
async fn serving_thread(
    mut accepted: mpsc::UnboundedReceiver<Handed>,
    finished: oneshot::Sender<()>,
    release: CancellationToken,
) {
    crate::proxy::upstream::Upstream::start_for_this_thread();
    let graceful = GracefulShutdown::new();
    while let Some((tcp, service, open)) = accepted.recv().await {
        match TcpStream::from_std(tcp) {
            Ok(tcp) => serve_connection(tcp, service, graceful.watcher(), Some(open)),
            Err(e) => tracing::debug!(error = %e, "a connection could not join its serving thread"),
        }
    }
    graceful.shutdown().await;
    drop(finished);
    release.cancelled().await;
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

#[cfg(test)]
mod tests {
    use super::least_busy;

    #[test]
    fn connections_go_to_the_least_busy_running_thread() {
        let loads = [Some(3), Some(1), Some(2)];
        assert_eq!(least_busy(3, 0, |i| loads[i]), Some(1));
        // A stopped thread gets nothing, however idle.
        let loads = [Some(3), None, Some(2)];
        assert_eq!(least_busy(3, 0, |i| loads[i]), Some(2));
        assert_eq!(least_busy(2, 0, |_| None), None);
    }

    #[test]
    fn ties_go_round_the_threads() {
        let loads = [Some(0), Some(0), Some(0)];
        let mut next = 0;
        let mut picked = Vec::new();
        for _ in 0..6 {
            let i = least_busy(3, next, |i| loads[i]).unwrap();
            picked.push(i);
            next = i + 1;
        }
        assert_eq!(picked, [0, 1, 2, 0, 1, 2]);
    }
}
