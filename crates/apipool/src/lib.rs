//! apipool: turn N API keys into one pool with N× the quota.
//!
//! A pool rotates keys, respects and learns each key's rate limits, cools down and restores keys,
//! bans failing keys for a while, retries on another key, runs large batches at the pool's full
//! capacity, and reports every call to a statistics sink.
//!
//! The design is one engine — a pure state machine that does no I/O and never sleeps — behind
//! thin sync and async shells (`call`/`acall`, `batch_exec`/`abatch_exec`,
//! `call_concurrent`/`acall_concurrent`, and the RAII [`Lease`]).
//!
//! ```
//! use apipool::{ApiKey, ApiKeyManager, RateLimit, Strategy};
//! struct Key(String);
//! impl ApiKey for Key {
//!     type Client = String; // your SDK client, bound to the key
//!     fn primary_key(&self) -> &str { &self.0 }
//!     fn create_client(&self) -> String { self.0.clone() }
//! }
//! let pool = ApiKeyManager::builder()
//!     .keys((0..10).map(|i| Key(format!("secret-{i}"))))
//!     .strategy(Strategy::RoundRobin)
//!     .rate_limit(RateLimit::per_second(20).unwrap())
//!     .build()
//!     .unwrap();
//! let len = pool.call(|client| Ok::<_, std::io::Error>(client.len())).unwrap();
//! assert_eq!(len, 8);
//! ```
#![cfg_attr(docsrs, feature(doc_cfg))]
#![warn(missing_docs)]

mod batch;
mod clock;
mod config;
mod engine;
mod error;
#[cfg(feature = "http")]
pub mod http;
#[cfg(any(feature = "tower", feature = "reqwest-middleware"))]
pub mod integrations;
mod key;
mod manager;
mod outcome;
#[cfg(feature = "sdk")]
pub mod sdk;
#[cfg(feature = "stats")]
pub mod stats;
pub mod status;
mod store;
#[cfg(test)]
mod test_stats;

pub use batch::{BatchOptions, BatchProgress, BatchResult};
pub use clock::{Clock, ManualClock, SystemClock};
pub use config::{ConfigError, PoolConfig, RateLimit, RateLimitSpec, Strategy};
pub use engine::{ArchiveReason, CoolReason, KeyReport, KeyState};
pub use error::{CallError, Error};
pub use key::{ApiKey, fingerprint, mask};
pub use manager::{ApiKeyManager, ApiKeyManagerBuilder, KeyClient, Lease, RetryPolicy};
pub use outcome::{Classifier, DefaultClassifier, Outcome, ReachLimit};
pub use status::{CallEvent, CallStatus, StatsSink};
#[cfg(feature = "redis")]
pub use store::redis::{OnUnavailable, RedisStoreConfig};
