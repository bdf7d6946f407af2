//! apipool-server: keeps a team's API keys encrypted at rest, groups them into pools with a shared
//! configuration and serves the apipool-ng wire protocol under `/api/v1`.
//!
//! The crate is a library so that the `apipool` binary (crate `apipool-cli`), the integration
//! tests and the benchmarks all build the very same application:
//!
//! ```no_run
//! # async fn run() -> anyhow::Result<()> {
//! let config = apipool_server::config::Config::for_data_dir("./data");
//! let app = apipool_server::startup::Application::build(config).await?;
//! println!("listening on port {}", app.port());
//! app.run_until_stopped().await?;
//! # Ok(())
//! # }
//! ```

pub mod auth;
pub mod clock;
pub mod config;
pub mod dashboard;
pub mod db;
pub mod engines;
pub mod http;
pub mod proxy;
pub mod replicas;
pub mod startup;
pub mod telemetry;
pub mod vault;
