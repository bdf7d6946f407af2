//! apipool: turn N API keys into one pool with N× the quota.
#![cfg_attr(docsrs, feature(doc_cfg))]
#![warn(missing_docs)]

pub mod status;
#[cfg(feature = "stats")]
pub mod stats;

pub use status::{CallEvent, CallStatus, StatsSink};
