//! Building and running the application (zero2prod's `Application`).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use secrecy::{ExposeSecret, SecretString};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::auth::{LoginThrottle, TokenKeys};
use crate::clock::{SharedClock, SystemClock};
use crate::config::Config;
use crate::db::Db;
use crate::engines::Engines;
use crate::http::{AppState, app};
use crate::vault::{KeySource, MasterKey, Vault};

/// A built application: listener bound, database migrated, vault open.
pub struct Application {
    listener: TcpListener,
    port: u16,
    state: AppState,
    shutdown: CancellationToken,
}

impl std::fmt::Debug for Application {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Application")
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

/// The key source a configuration selects: `APIPOOL_MASTER_KEY` if set, else the key file.
pub fn key_source(config: &Config) -> anyhow::Result<KeySource> {
    Ok(match &config.master_key {
        Some(k) => KeySource::Env(vec![
            MasterKey::from_encoded(k.expose_secret()).context("APIPOOL_MASTER_KEY")?,
        ]),
        None => KeySource::File(config.effective_master_key_file()),
    })
}

/// Creates the data directory (mode 0700 on Unix).
pub fn ensure_data_dir(config: &Config) -> anyhow::Result<()> {
    let dir = &config.data_dir;
    if !dir.exists() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create data directory {}", dir.display()))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
    }
    Ok(())
}

impl Application {
    /// Builds the application with the system clock.
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        Self::build_with_clock(config, Arc::new(SystemClock)).await
    }

    /// Builds the application with a given clock (tests use [`crate::clock::FakeClock`]).
    pub async fn build_with_clock(config: Config, clock: SharedClock) -> anyhow::Result<Self> {
        ensure_data_dir(&config)?;
        let db = Db::connect(&config.effective_database_url(), config.db_max_connections).await?;
        let vault = Arc::new(
            Vault::open(db.clone(), key_source(&config)?, clock.now_ms())
                .await
                .context("cannot open the key vault")?,
        );
        let tokens = TokenKeys::new(
            vault.jwt_secret(),
            Duration::from_secs(config.access_token_ttl_secs),
            clock.clone(),
        );
        let throttle = LoginThrottle::new(
            clock.clone(),
            Duration::from_secs(config.login_throttle_window_secs),
            config.login_max_failures_per_user,
            config.login_max_failures_per_ip,
        );
        let dummy_hash = crate::auth::hashing(|| {
            crate::auth::hash_password(&SecretString::from("apipool-dummy-password"))
        })
        .await??;
        let engines = Engines::open(db.clone(), vault.clone(), &config)
            .await
            .context("cannot start the pool engines")?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        let listener = TcpListener::bind(config.bind)
            .await
            .with_context(|| format!("cannot listen on {}", config.bind))?;
        let port = listener.local_addr()?.port();
        let state = AppState {
            config: Arc::new(config),
            db,
            vault,
            tokens: Arc::new(tokens),
            throttle: Arc::new(throttle),
            clock,
            dummy_hash: dummy_hash.into(),
            http,
            engines: Arc::new(engines),
        };
        bootstrap_admin(&state).await?;
        Ok(Self {
            listener,
            port,
            state,
            shutdown: CancellationToken::new(),
        })
    }

    /// The bound port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The shared state (tests reach the database and vault through it).
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Cancelling this token stops the server gracefully.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Serves until Ctrl-C, SIGTERM or the shutdown token; in-flight requests finish first.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        let token = self.shutdown.clone();
        let vault = self.state.vault.clone();
        let poll = Duration::from_secs(self.state.config.vault_poll_secs.max(1));
        let poll_token = token.clone();
        // Learn a rotated master key while its hand-over is readable.
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = poll_token.cancelled() => break,
                    () = tokio::time::sleep(poll) => {
                        if let Err(e) = vault.refresh_if_stale().await {
                            tracing::warn!(error = %e, "vault refresh failed");
                        }
                    }
                }
            }
        });
        let prometheus = crate::telemetry::prometheus();
        let upkeep_token = token.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = upkeep_token.cancelled() => break,
                    () = tokio::time::sleep(Duration::from_secs(5)) => prometheus.run_upkeep(),
                }
            }
        });
        self.state.engines.spawn_background(token.clone());
        let engines = self.state.engines.clone();
        let router = app(self.state.clone());
        let threads = self.state.config.serving_threads();
        let served = crate::http::serve(
            self.listener,
            self.state,
            router,
            shutdown_signal(token.clone()),
            threads,
        )
        .await;
        token.cancel();
        engines.close().await;
        // After the last flush: it may use connections the serving threads' runtimes drive.
        served?.release().await;
        Ok(())
    }
}

async fn shutdown_signal(token: CancellationToken) {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("Ctrl-C received, shutting down"),
        () = terminate => tracing::info!("SIGTERM received, shutting down"),
        () = token.cancelled() => {},
    }
}

/// Creates the first admin when the database has no users.
async fn bootstrap_admin(state: &AppState) -> anyhow::Result<()> {
    let users: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM users")
        .fetch_one(&state.db.pool)
        .await?;
    if users > 0 {
        return Ok(());
    }
    let username = crate::http::types::username(&state.config.admin_username)
        .map_err(|e| anyhow::anyhow!("APIPOOL_ADMIN_USERNAME {e}"))?;
    let (password, generated) = match &state.config.admin_password {
        Some(p) => {
            crate::http::types::password("APIPOOL_ADMIN_PASSWORD", p.expose_secret())
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            (p.clone(), false)
        }
        None => {
            let mut bytes = [0u8; 18];
            rand::fill(&mut bytes[..]);
            use base64::Engine;
            (
                SecretString::from(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)),
                true,
            )
        }
    };
    let shown = generated.then(|| password.expose_secret().to_owned());
    match crate::http::auth::create_user(state, &username, "admin@localhost", password, "admin")
        .await
    {
        Ok(_) => {}
        // Another replica bootstrapped at the same moment.
        Err(crate::http::error::ApiError::Conflict(_)) => return Ok(()),
        Err(e) => anyhow::bail!("cannot create the first admin: {e}"),
    }
    tracing::info!(username = %username, "created the first admin account");
    if let Some(pw) = shown {
        // Printed once, to the terminal only (not through the log pipeline).
        #[allow(clippy::print_stderr)]
        {
            eprintln!(
                "\n  apipool: created admin account '{username}' with password: {pw}\n  \
                 (shown only this once; set APIPOOL_ADMIN_PASSWORD on first start to choose it)\n"
            );
        }
    }
    Ok(())
}
