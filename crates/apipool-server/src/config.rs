//! Configuration: one struct, filled from defaults, an optional TOML file, `APIPOOL_*` environment
//! variables and command-line flags (later sources win).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use figment::Figment;
use figment::providers::{Format, Serialized, Toml};
use secrecy::SecretString;
use serde::{Deserialize, Serialize};

/// Everything the server needs to start.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address to listen on (`127.0.0.1:0` picks a free port).
    pub bind: SocketAddr,
    /// Directory for the SQLite database and the master key file.
    pub data_dir: PathBuf,
    /// `sqlite://PATH` or `postgres://USER@HOST/DB`; default: `<data_dir>/apipool.db`.
    pub database_url: Option<String>,
    /// Master key (base64 or hex of 32 bytes); only ever from `APIPOOL_MASTER_KEY`.
    #[serde(skip)]
    pub master_key: Option<SecretString>,
    /// Master key file; default: `<data_dir>/master.key` (created with mode 0600).
    pub master_key_file: Option<PathBuf>,
    /// Whether anyone may call `/auth/register` (default: only admins).
    pub open_registration: bool,
    /// Username of the admin created on first start.
    pub admin_username: String,
    /// Password of the admin created on first start; only from `APIPOOL_ADMIN_PASSWORD`. When
    /// absent a random one is generated and printed once to stderr.
    #[serde(skip)]
    pub admin_password: Option<SecretString>,
    /// Lifetime of access tokens (JWT), seconds.
    pub access_token_ttl_secs: u64,
    /// Lifetime of refresh tokens, seconds.
    pub refresh_token_ttl_secs: u64,
    /// Failed logins per username within the window before 429.
    pub login_max_failures_per_user: u32,
    /// Failed logins per client IP within the window before 429.
    pub login_max_failures_per_ip: u32,
    /// Login throttling window, seconds.
    pub login_throttle_window_secs: u64,
    /// Database pool size.
    pub db_max_connections: u32,
    /// How often a running server checks for a rotated master key, seconds.
    pub vault_poll_secs: u64,
    /// Maximum rows in one `/keys/import` request.
    pub import_max_rows: usize,
    /// `redis://HOST:PORT[/DB]`: keep every pool's key state (rate-limit windows, in-flight
    /// leases, cooldowns, bans) in Redis, so several replicas share the limits. `None`: each
    /// process keeps its own state.
    pub redis_url: Option<String>,
    /// First part of every Redis key; a pool's state lives under `{redis_prefix}:{pool row id}`.
    pub redis_prefix: String,
    /// What the proxy does while Redis cannot be reached.
    pub redis_on_unavailable: RedisFailMode,
    /// Threads serving requests; `None`: one per core ([`Config::serving_threads`]).
    pub workers: Option<std::num::NonZeroUsize>,
}

/// What the proxy does while Redis cannot be reached (`APIPOOL_REDIS_ON_UNAVAILABLE`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum RedisFailMode {
    /// Refuse proxy calls (503 with `Retry-After`) until Redis is back: limits shared by the
    /// replicas are never overdrawn. The default.
    #[default]
    Closed,
    /// Serve proxy calls from this replica's own state, with a warning: the service stays up, but
    /// N replicas may together spend up to N times a key's limit meanwhile.
    Open,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            bind: SocketAddr::from(([127, 0, 0, 1], 8000)),
            data_dir: PathBuf::from("data"),
            database_url: None,
            master_key: None,
            master_key_file: None,
            open_registration: false,
            admin_username: "admin".to_owned(),
            admin_password: None,
            access_token_ttl_secs: 900,
            refresh_token_ttl_secs: 30 * 24 * 3600,
            login_max_failures_per_user: 5,
            login_max_failures_per_ip: 50,
            login_throttle_window_secs: 900,
            db_max_connections: 10,
            vault_poll_secs: 5,
            import_max_rows: 10_000,
            redis_url: None,
            redis_prefix: "apipool".to_owned(),
            redis_on_unavailable: RedisFailMode::Closed,
            workers: None,
        }
    }
}

impl Config {
    /// Defaults with a given data directory.
    pub fn for_data_dir(dir: impl AsRef<Path>) -> Self {
        Self {
            data_dir: dir.as_ref().to_owned(),
            ..Self::default()
        }
    }

    /// Serving threads for [`crate::startup::Application::run_until_stopped`]: `workers`, by
    /// default one per core; 0 (for `workers` = 1 or a one-core machine) serves on the
    /// caller's runtime.
    pub fn serving_threads(&self) -> usize {
        let n = self.workers.map_or_else(
            || std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get),
            std::num::NonZeroUsize::get,
        );
        if n == 1 { 0 } else { n }
    }

    /// The database URL in effect.
    pub fn effective_database_url(&self) -> String {
        self.database_url
            .clone()
            .unwrap_or_else(|| crate::db::Db::sqlite_url(&self.data_dir.join("apipool.db")))
    }

    /// Checks the settings that cannot be checked field by field.
    pub fn validate(&self) -> anyhow::Result<()> {
        if let Some(url) = &self.redis_url {
            let scheme = url.split_once("://").map(|(s, _)| s);
            anyhow::ensure!(
                matches!(scheme, Some("redis" | "rediss" | "redis+unix" | "unix")),
                "redis_url must be a redis:// (or rediss://) URL, e.g. redis://127.0.0.1:6379"
            );
        }
        anyhow::ensure!(
            !self.redis_prefix.is_empty()
                && self
                    .redis_prefix
                    .bytes()
                    .all(|b| b.is_ascii_graphic() && b != b'{' && b != b'}'),
            "redis_prefix must be non-empty printable ASCII without spaces or braces"
        );
        Ok(())
    }

    /// The master key file in effect (when no key is given in the environment).
    pub fn effective_master_key_file(&self) -> PathBuf {
        self.master_key_file
            .clone()
            .unwrap_or_else(|| self.data_dir.join("master.key"))
    }
}

/// Options shared by `apipool serve` and `apipool vault ...`: where the data lives.
#[derive(Debug, Clone, Default, clap::Args, Serialize)]
pub struct StorageArgs {
    /// Directory for the SQLite database and the master key file [default: ./data]
    #[arg(long, env = "APIPOOL_DATA_DIR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    /// Database URL: sqlite://PATH or postgres://USER@HOST/DB [default: <data-dir>/apipool.db]
    #[arg(long, env = "APIPOOL_DATABASE_URL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database_url: Option<String>,
    /// File holding the master key (mode 0600) [default: <data-dir>/master.key].
    /// The key itself may instead be given in APIPOOL_MASTER_KEY (base64 or hex of 32 bytes).
    #[arg(long, env = "APIPOOL_MASTER_KEY_FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub master_key_file: Option<PathBuf>,
    /// Optional TOML file with any `Config` field (flags and env win over it)
    #[arg(long = "config", env = "APIPOOL_CONFIG")]
    #[serde(skip)]
    pub config_file: Option<PathBuf>,
}

/// Flags of `apipool serve`. Every flag has an `APIPOOL_*` environment variable.
#[derive(Debug, Clone, Default, clap::Args, Serialize)]
pub struct ServeArgs {
    /// Address to listen on [default: 127.0.0.1:8000]
    #[arg(long, env = "APIPOOL_BIND")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bind: Option<SocketAddr>,
    /// Let anyone register (default false: only an admin's token may call /auth/register)
    #[arg(long, env = "APIPOOL_OPEN_REGISTRATION", num_args = 0..=1, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub open_registration: Option<bool>,
    /// Username of the admin created on first start [default: admin]; its password comes from
    /// APIPOOL_ADMIN_PASSWORD or is generated and printed once
    #[arg(long, env = "APIPOOL_ADMIN_USERNAME")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_username: Option<String>,
    /// Access-token lifetime in seconds [default: 900]
    #[arg(long, env = "APIPOOL_ACCESS_TOKEN_TTL_SECS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub access_token_ttl_secs: Option<u64>,
    /// Redis shared by the replicas: redis://HOST:PORT[/DB]. Every pool's key state (limits,
    /// leases, cooldowns, bans) then lives there, so replicas on one database behave as one
    /// server [default: none, state per process]
    #[arg(long, env = "APIPOOL_REDIS_URL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_url: Option<String>,
    /// While Redis is unreachable: `closed` refuses proxy calls (503), `open` serves them from
    /// this process's own state with a warning [default: closed]
    #[arg(long, env = "APIPOOL_REDIS_ON_UNAVAILABLE", value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_on_unavailable: Option<RedisFailMode>,
    /// Prefix of every Redis key (deployments sharing one Redis need different ones) [default: apipool]
    #[arg(long, env = "APIPOOL_REDIS_PREFIX")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_prefix: Option<String>,
    /// Threads serving requests [default: one per core]. Each serves its connections on its
    /// own runtime, with its own upstream connections, so a request never changes threads.
    /// With 1 everything, requests included, runs on one thread
    #[arg(long, env = "APIPOOL_WORKERS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workers: Option<std::num::NonZeroUsize>,
    /// Storage options.
    #[command(flatten)]
    #[serde(flatten)]
    pub storage: StorageArgs,
}

impl StorageArgs {
    /// Layers defaults, the TOML file and these options into a [`Config`]; secrets come from the
    /// environment only (`APIPOOL_MASTER_KEY`, `APIPOOL_ADMIN_PASSWORD`), never from `.env` files.
    pub fn load_config(&self, overrides: impl Serialize) -> anyhow::Result<Config> {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = &self.config_file {
            anyhow::ensure!(
                path.exists(),
                "config file {} does not exist",
                path.display()
            );
            fig = fig.merge(Toml::file(path));
        }
        let mut config: Config = fig
            .merge(Serialized::defaults(overrides))
            .extract()
            .context("invalid configuration")?;
        config.validate().context("invalid configuration")?;
        config.master_key = std::env::var("APIPOOL_MASTER_KEY")
            .ok()
            .filter(|s| !s.trim().is_empty())
            .map(SecretString::from);
        config.admin_password = std::env::var("APIPOOL_ADMIN_PASSWORD")
            .ok()
            .filter(|s| !s.is_empty())
            .map(SecretString::from);
        Ok(config)
    }
}

impl ServeArgs {
    /// The configuration of `apipool serve`.
    pub fn load(&self) -> anyhow::Result<Config> {
        self.storage.load_config(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_toml_and_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let toml = dir.path().join("apipool.toml");
        std::fs::write(
            &toml,
            "bind = \"127.0.0.1:9000\"\nopen_registration = true\naccess_token_ttl_secs = 60\n",
        )
        .unwrap();
        let args = ServeArgs {
            access_token_ttl_secs: Some(120),
            storage: StorageArgs {
                config_file: Some(toml),
                ..StorageArgs::default()
            },
            ..ServeArgs::default()
        };
        let c = args.load().unwrap();
        assert_eq!(c.bind.port(), 9000);
        assert!(c.open_registration);
        assert_eq!(c.access_token_ttl_secs, 120);
        assert_eq!(c.data_dir, PathBuf::from("data"));
    }

    #[test]
    fn redis_settings_from_toml_and_flags() {
        let dir = tempfile::tempdir().unwrap();
        let toml = dir.path().join("apipool.toml");
        std::fs::write(
            &toml,
            "redis_url = \"redis://10.0.0.5:6379/2\"\nredis_on_unavailable = \"open\"\n",
        )
        .unwrap();
        let from_toml = ServeArgs {
            storage: StorageArgs {
                config_file: Some(toml.clone()),
                ..StorageArgs::default()
            },
            ..ServeArgs::default()
        }
        .load()
        .unwrap();
        assert_eq!(
            from_toml.redis_url.as_deref(),
            Some("redis://10.0.0.5:6379/2")
        );
        assert_eq!(from_toml.redis_on_unavailable, RedisFailMode::Open);
        assert_eq!(from_toml.redis_prefix, "apipool");

        let flags = ServeArgs {
            redis_url: Some("redis://127.0.0.1:6379".to_owned()),
            redis_on_unavailable: Some(RedisFailMode::Closed),
            redis_prefix: Some("team-a".to_owned()),
            storage: StorageArgs {
                config_file: Some(toml),
                ..StorageArgs::default()
            },
            ..ServeArgs::default()
        }
        .load()
        .unwrap();
        assert_eq!(flags.redis_url.as_deref(), Some("redis://127.0.0.1:6379"));
        assert_eq!(flags.redis_on_unavailable, RedisFailMode::Closed);
        assert_eq!(flags.redis_prefix, "team-a");

        let defaults = ServeArgs::default().load().unwrap();
        assert_eq!(defaults.redis_url, None);
        assert_eq!(defaults.redis_on_unavailable, RedisFailMode::Closed);
    }

    #[test]
    fn bad_redis_settings_are_refused_with_a_reason() {
        for (url, prefix) in [
            (Some("http://127.0.0.1:6379"), None),
            (Some("127.0.0.1:6379"), None),
            (None, Some("has space")),
            (None, Some("")),
        ] {
            let err = ServeArgs {
                redis_url: url.map(str::to_owned),
                redis_prefix: prefix.map(str::to_owned),
                ..ServeArgs::default()
            }
            .load()
            .expect_err("refused");
            let text = format!("{err:#}");
            assert!(text.contains("redis"), "{text}");
        }
    }

    #[test]
    fn unknown_toml_fields_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let toml = dir.path().join("apipool.toml");
        std::fs::write(&toml, "bnd = \"x\"\n").unwrap();
        let args = ServeArgs {
            storage: StorageArgs {
                config_file: Some(toml),
                ..StorageArgs::default()
            },
            ..ServeArgs::default()
        };
        assert!(args.load().is_err());
    }
}
