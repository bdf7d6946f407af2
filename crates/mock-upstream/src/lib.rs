//! A rate-limited fake keyed API for apipool examples, tests, acceptance checks and benchmarks.
//!
//! Each key gets an exact sliding-window limit (`rate` admitted requests per `interval`
//! seconds, counted at arrival; refused requests do not count). Over the limit the mock answers
//! 429 with `Retry-After` (whole seconds, rounded up) and `retry-after-ms` (milliseconds until
//! the oldest admitted request leaves the window, rounded up). Latency is applied after
//! admission; 401, 402 and 429 answer at once. Faults are off by default and can be changed at
//! run time: random or burst errors (500, or any 5xx with `error_status`), keys that always fail,
//! hang or have their connection dropped, hangs (timeouts), slow bodies (in parts or dribbled
//! byte by byte), connections dropped before the answer or half way through its body.
//!
//! # Endpoints
//! - `GET /price?id=ID` → `{"id", "price", "key" (masked), "key_index"}`; the price is
//!   [`price_for`]`(id)`.
//! - any method on `/echo/*path` → `{"method", "path", "query", "raw_query", "headers"
//!   (lower-case names), "body" (text), "key", "key_index"}`.
//! - `GET /__stats` → [`StatsSnapshot`]; `POST /__reset`; `GET`/`POST /__config` (a JSON
//!   [`ConfigPatch`]) → [`SettingsView`]. These need no key.
//!
//! Keys are read from `Authorization: Bearer <key>`, else `x-api-key`, else `?api_key=`.
//!
//! # Example
//! ```no_run
//! # async fn run() -> anyhow::Result<()> {
//! let config = mock_upstream::Config {
//!     rate: 20,
//!     latency_ms: 20,
//!     ..mock_upstream::Config::with_keys(["k1", "k2"])?
//! };
//! let server = mock_upstream::spawn(config).await?;
//! let url = format!("{}/price?id=bitcoin", server.url());
//! // ... send requests with `Authorization: Bearer k1` ...
//! assert_eq!(server.stats().status(429), 0);
//! server.shutdown().await?;
//! # Ok(())
//! # }
//! ```

mod config;
mod conn;
mod handlers;
mod state;
mod stats;
pub mod window;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

pub use config::{ApiKey, Config, ConfigError, ConfigPatch, SettingsView, mask_key};
pub use handlers::{price_for, router};
pub use state::MockState;
pub use stats::{FaultStats, KeyStats, StatsSnapshot};

use conn::{ConnHandle, KillableListener};

/// How long [`MockServer::shutdown`] waits for open connections before closing them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Starts the mock on the current tokio runtime, listening on `config.bind`
/// (`127.0.0.1:0` by default: a free port).
///
/// # Errors
/// When the config is invalid or the address cannot be bound.
pub async fn spawn(config: Config) -> anyhow::Result<MockServer> {
    let state = MockState::new(&config).context("invalid mock-upstream configuration")?;
    let listener = TcpListener::bind(config.bind).await.with_context(|| {
        format!(
            "cannot listen on {}: is the port in use? Use port 0 for any free port",
            config.bind
        )
    })?;
    let addr = listener.local_addr()?;
    let app = router(state.clone()).into_make_service_with_connect_info::<ConnHandle>();
    let stop = state.shutdown_token().clone();
    let task = tokio::spawn(async move {
        axum::serve(KillableListener(listener), app)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await
    });
    Ok(MockServer {
        addr,
        state,
        task: Some(task),
    })
}

/// A running mock. Dropping it stops the server (without waiting); prefer
/// [`MockServer::shutdown`].
pub struct MockServer {
    addr: SocketAddr,
    state: MockState,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl MockServer {
    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`, without a trailing slash.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A copy of every counter (the same as `GET /__stats`).
    pub fn stats(&self) -> StatsSnapshot {
        self.state.stats()
    }

    /// The counters of one key, looked up by its raw value.
    pub fn key_stats(&self, raw_key: &str) -> Option<KeyStats> {
        self.state.key_stats(raw_key)
    }

    /// Zeroes counters, windows and quotas (the same as `POST /__reset`).
    pub fn reset(&self) {
        self.state.reset();
    }

    /// Changes behaviour at run time (the same as `POST /__config`).
    ///
    /// # Errors
    /// When a value is out of range; nothing changes then.
    pub fn update(&self, patch: &ConfigPatch) -> Result<SettingsView, ConfigError> {
        self.state.update(patch)
    }

    /// The behaviour in force (the same as `GET /__config`).
    pub fn settings(&self) -> SettingsView {
        self.state.settings()
    }

    /// The shared state (e.g. to serve [`router`] elsewhere too).
    pub fn state(&self) -> &MockState {
        &self.state
    }

    /// Stops accepting, ends hanging requests, and waits (up to 5 s) for open connections.
    ///
    /// # Errors
    /// When the server task failed.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        self.state.shutdown_token().cancel();
        let Some(mut task) = self.task.take() else {
            return Ok(());
        };
        match tokio::time::timeout(SHUTDOWN_GRACE, &mut task).await {
            Ok(joined) => joined
                .context("the mock-upstream server task panicked")?
                .context("the mock-upstream server failed"),
            Err(_) => {
                task.abort();
                Ok(())
            }
        }
    }
}

impl Drop for MockServer {
    fn drop(&mut self) {
        self.state.shutdown_token().cancel();
    }
}

impl std::fmt::Debug for MockServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MockServer")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}
