//! The client of apipool-server (feature `sdk`), with the seed's names: [`login`]/[`alogin`],
//! [`get_keys`]/[`aget_keys`], [`get_config`]/[`aget_config`], [`connect`]/[`async_connect`], and
//! [`DynamicKeyManager`]/[`AsyncDynamicKeyManager`].
//!
//! Unlike the seed, a [`Session`] renews its access token before it expires (and once on a 401),
//! a failed proxied call never leaves the handle dead, an empty or failed key fetch never empties
//! the local pool, and async calls are plain `async fn`s.
//!
//! There is one async core. The sync functions are a thin facade that runs it on a private
//! runtime thread and waits, so they work from plain sync code *and* from inside a tokio runtime
//! (where `reqwest::blocking` would panic); in async code prefer the `a…` twins.
//!
//! ```no_run
//! use apipool::sdk;
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let session = sdk::login("http://127.0.0.1:8000", "alice", "pw-of-alice")?;
//! let keys = sdk::get_keys(&session, "prices")?;
//! let config = sdk::get_config(&session, "prices")?;
//! println!("{} keys, strategy {:?}", keys.len(), config.rotation_strategy);
//!
//! // A local pool kept in step with the server:
//! let mgr = sdk::DynamicKeyManager::from_session(&session, "prices").start()?;
//! let http = reqwest::blocking::Client::new();
//! let status = mgr.call(|auth| auth.apply_blocking(http.get("http://127.0.0.1:9000/price?id=btc")).send().map(|r| r.status()))?;
//! println!("{status}");
//! mgr.shutdown();
//! # Ok(()) }
//! ```

mod blocking;
mod dynamic;
mod error;
mod remote;
mod session;
mod types;
mod upload;

pub use dynamic::{
    AsyncDynamicKeyManager, DynamicBuilder, DynamicKeyManager, Kept, KeyChange, KeyDiff,
    RefreshReport, default_key_factory, diff_keys,
};
pub use error::SdkError;
pub use remote::{
    ProxyRequest, ProxyStatus, RemoteClassifier, RemotePool, RemoteProxy, RemoteSlot,
    async_connect, connect,
};
pub use session::{Session, SessionOptions};
pub use types::{RemoteConfig, RemoteKey};
pub use upload::{StatsUploader, UploadOptions, UploadStats};

/// Logs in to apipool-server (`POST /api/v1/auth/login`). `url` is the server's base URL
/// (`http://host:port`, with or without `/api/v1`). Sync; safe inside a tokio runtime too.
///
/// ```no_run
/// let session = apipool::sdk::login("http://127.0.0.1:8000", "alice", "pw-of-alice")?;
/// # Ok::<(), apipool::sdk::SdkError>(())
/// ```
pub fn login(url: &str, username: &str, password: &str) -> Result<Session, SdkError> {
    Session::login(url, username, password)
}

/// Async twin of [`login`].
///
/// ```no_run
/// # async fn run() -> Result<(), apipool::sdk::SdkError> {
/// let session = apipool::sdk::alogin("http://127.0.0.1:8000", "alice", "pw-of-alice").await?;
/// # let _ = session; Ok(()) }
/// ```
pub async fn alogin(url: &str, username: &str, password: &str) -> Result<Session, SdkError> {
    Session::alogin(url, username, password).await
}

/// The keys of a pool (`GET /api/v1/keys/raw?pool_identifier=POOL`). Sync.
///
/// ```no_run
/// # fn run(session: apipool::sdk::Session) -> Result<(), apipool::sdk::SdkError> {
/// for key in apipool::sdk::get_keys(&session, "prices")? {
///     println!("{} {}", key.identifier, key.masked());
/// }
/// # Ok(()) }
/// ```
pub fn get_keys(session: &Session, pool: &str) -> Result<Vec<RemoteKey>, SdkError> {
    session.get_keys(pool)
}

/// Async twin of [`get_keys`].
///
/// ```no_run
/// # async fn run(session: apipool::sdk::Session) -> Result<(), apipool::sdk::SdkError> {
/// let keys = apipool::sdk::aget_keys(&session, "prices").await?;
/// # let _ = keys; Ok(()) }
/// ```
pub async fn aget_keys(session: &Session, pool: &str) -> Result<Vec<RemoteKey>, SdkError> {
    session.aget_keys(pool).await
}

/// A pool's configuration (`GET /api/v1/pools/{pool}/config`). Sync.
///
/// ```no_run
/// # fn run(session: apipool::sdk::Session) -> Result<(), apipool::sdk::SdkError> {
/// let config = apipool::sdk::get_config(&session, "prices")?;
/// println!("{}", config.pool_config.timeout);
/// # Ok(()) }
/// ```
pub fn get_config(session: &Session, pool: &str) -> Result<RemoteConfig, SdkError> {
    session.get_config(pool)
}

/// Async twin of [`get_config`].
///
/// ```no_run
/// # async fn run(session: apipool::sdk::Session) -> Result<(), apipool::sdk::SdkError> {
/// let config = apipool::sdk::aget_config(&session, "prices").await?;
/// # let _ = config; Ok(()) }
/// ```
pub async fn aget_config(session: &Session, pool: &str) -> Result<RemoteConfig, SdkError> {
    session.aget_config(pool).await
}
