//! The `apipool` client commands against the real server binary and a real mock-upstream:
//! login/logout, keys, pools, users, stats, and `batch run` (proxy and local pools, malformed
//! lines, SIGINT and SIGKILL with resume).

mod admin;
mod batch;
#[path = "../common/mod.rs"]
mod common;
mod helpers;
