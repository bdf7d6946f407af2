//! Test harness: start the real app on a random port, on SQLite (temp dir) or PostgreSQL (a fresh
//! database per test, dropped afterwards).

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use apipool_server::clock::FakeClock;
use apipool_server::config::Config;
use apipool_server::http::AppState;
use apipool_server::startup::Application;
use secrecy::SecretString;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

pub(crate) const ADMIN: &str = "admin";
pub(crate) const ADMIN_PASSWORD: &str = "admin-password-123";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Backend {
    Sqlite,
    Postgres,
}

/// Runs one async test body on both backends.
#[macro_export]
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$name($crate::helpers::Backend::Sqlite).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                super::$name($crate::helpers::Backend::Postgres).await
            }
        }
    )*};
}

// ---- log capture: every test process logs at debug level into a buffer we can grep ----

static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();

#[derive(Clone)]
struct BufWriter(Arc<Mutex<Vec<u8>>>);

impl Write for BufWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if std::env::var_os("TEST_LOG").is_some() {
            std::io::stderr().write_all(buf)?;
        }
        let mut b = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if b.len() < 256 * 1024 * 1024 {
            b.extend_from_slice(buf);
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn init_logs() -> Arc<Mutex<Vec<u8>>> {
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let w = BufWriter(buf.clone());
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(
                "debug,hyper=info,hyper_util=info,h2=info,reqwest=info,rustls=info",
            ))
            .with_ansi(false)
            .with_writer(move || w.clone())
            .try_init();
        buf
    })
    .clone()
}

/// Everything logged so far in this process.
pub(crate) fn captured_logs() -> Vec<u8> {
    init_logs()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
}

pub(crate) fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

// ---- the app ----

pub(crate) struct TestApp {
    pub(crate) address: String,
    pub(crate) client: reqwest::Client,
    pub(crate) state: AppState,
    pub(crate) clock: Arc<FakeClock>,
    pub(crate) data_dir: tempfile::TempDir,
    pub(crate) config: Config,
    pub(crate) admin_token: String,
    pg_db: Option<String>,
    shutdown: CancellationToken,
    server: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

fn pg_admin_url() -> String {
    std::env::var("APIPOOL_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

fn pg_url_for(db: &str) -> String {
    let mut u = url::Url::parse(&pg_admin_url()).expect("APIPOOL_TEST_POSTGRES_URL is a URL");
    u.set_path(&format!("/{db}"));
    u.to_string()
}

async fn pg_admin_exec(sql: String) {
    use sqlx::Connection;
    sqlx::any::install_default_drivers();
    let mut conn = sqlx::AnyConnection::connect(&pg_admin_url())
        .await
        .expect("PostgreSQL must run at APIPOOL_TEST_POSTGRES_URL (default postgres://postgres@127.0.0.1:5432/test)");
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .execute(&mut conn)
        .await
        .expect("admin statement");
    let _ = conn.close().await;
}

/// A test configuration for a backend (creates the PostgreSQL database).
pub(crate) async fn test_config(backend: Backend) -> (Config, tempfile::TempDir, Option<String>) {
    init_logs();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = Config::for_data_dir(dir.path().join("data"));
    config.bind = "127.0.0.1:0".parse().expect("addr");
    config.admin_username = ADMIN.to_owned();
    config.admin_password = Some(SecretString::from(ADMIN_PASSWORD));
    config.db_max_connections = 5;
    let pg_db = match backend {
        Backend::Sqlite => None,
        Backend::Postgres => {
            let name = format!("apipool_test_{}", uuid::Uuid::new_v4().simple());
            pg_admin_exec(format!("CREATE DATABASE {name}")).await;
            config.database_url = Some(pg_url_for(&name));
            Some(name)
        }
    };
    (config, dir, pg_db)
}

pub(crate) async fn spawn_app(backend: Backend) -> TestApp {
    spawn_app_with(backend, |_| {}).await
}

pub(crate) async fn spawn_app_with(backend: Backend, tweak: impl FnOnce(&mut Config)) -> TestApp {
    let (mut config, dir, pg_db) = test_config(backend).await;
    tweak(&mut config);
    start(config, dir, pg_db).await
}

/// Starts an app on an existing configuration/data dir.
pub(crate) async fn start(
    config: Config,
    dir: tempfile::TempDir,
    pg_db: Option<String>,
) -> TestApp {
    let clock = FakeClock::new();
    let app = Application::build_with_clock(config.clone(), clock.clone())
        .await
        .expect("app builds");
    let address = format!("http://127.0.0.1:{}", app.port());
    let state = app.state().clone();
    let shutdown = app.shutdown_token();
    let server = Some(tokio::spawn(app.run_until_stopped()));
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(120))
        .build()
        .expect("client");
    let mut t = TestApp {
        address,
        client,
        state,
        clock,
        data_dir: dir,
        config,
        admin_token: String::new(),
        pg_db,
        shutdown,
        server,
    };
    t.admin_token = t.login(ADMIN, ADMIN_PASSWORD).await["access_token"]
        .as_str()
        .expect("admin login")
        .to_owned();
    t
}

impl TestApp {
    pub(crate) fn url(&self, path: &str) -> String {
        format!("{}{path}", self.address)
    }

    pub(crate) fn api(&self, path: &str) -> String {
        format!("{}/api/v1{path}", self.address)
    }

    /// Stops the server and hands back the pieces needed to start another on the same data.
    pub(crate) fn stop(mut self) -> (Config, tempfile::TempDir, Option<String>) {
        self.shutdown.cancel();
        let pg = self.pg_db.take();
        let dir = std::mem::replace(&mut self.data_dir, tempfile::tempdir().expect("tempdir"));
        (self.config.clone(), dir, pg)
    }

    /// Stops the server gracefully and waits until it has finished: in-flight requests
    /// answered, statistics flushed, serving threads ended. Returns the database URL (a new
    /// connection reads it: the app's pool may hold connections of the ended threads).
    pub(crate) async fn shut_down(&mut self) -> String {
        self.shutdown.cancel();
        let server = self.server.take().expect("the server runs");
        server
            .await
            .expect("the server task")
            .expect("the server stopped cleanly");
        self.config.effective_database_url()
    }

    /// The Prometheus text of `/metrics`.
    pub(crate) async fn metrics(&self) -> String {
        let r = self.client.get(self.url("/metrics")).send().await.unwrap();
        r.text().await.unwrap()
    }

    pub(crate) async fn login_raw(&self, user: &str, password: &str) -> reqwest::Response {
        self.client
            .post(self.api("/auth/login"))
            .json(&json!({ "username": user, "password": password }))
            .send()
            .await
            .expect("request")
    }

    pub(crate) async fn login(&self, user: &str, password: &str) -> Value {
        let r = self.login_raw(user, password).await;
        assert_eq!(r.status(), 200, "login of {user}");
        r.json().await.expect("json")
    }

    /// Creates a user via the admin and returns its access token.
    pub(crate) async fn new_user(&self, name: &str) -> String {
        let r = self
            .post(&self.admin_token, "/auth/register", json!({
                "username": name, "email": format!("{name}@example.com"), "password": "password-123"
            }))
            .await;
        assert_eq!(r.status(), 201, "register {name}");
        self.login(name, "password-123").await["access_token"]
            .as_str()
            .expect("token")
            .to_owned()
    }

    pub(crate) async fn get(&self, token: &str, path: &str) -> reqwest::Response {
        self.client
            .get(self.api(path))
            .bearer_auth(token)
            .send()
            .await
            .expect("request")
    }

    pub(crate) async fn delete(&self, token: &str, path: &str) -> reqwest::Response {
        self.client
            .delete(self.api(path))
            .bearer_auth(token)
            .send()
            .await
            .expect("request")
    }

    pub(crate) async fn post(&self, token: &str, path: &str, body: Value) -> reqwest::Response {
        self.client
            .post(self.api(path))
            .bearer_auth(token)
            .json(&body)
            .send()
            .await
            .expect("request")
    }

    pub(crate) async fn put(&self, token: &str, path: &str, body: Value) -> reqwest::Response {
        self.client
            .put(self.api(path))
            .bearer_auth(token)
            .json(&body)
            .send()
            .await
            .expect("request")
    }

    pub(crate) async fn patch(&self, token: &str, path: &str, body: Value) -> reqwest::Response {
        self.client
            .patch(self.api(path))
            .bearer_auth(token)
            .json(&body)
            .send()
            .await
            .expect("request")
    }

    pub(crate) async fn create_key(&self, token: &str, identifier: &str, raw: &str) -> Value {
        let r = self
            .post(
                token,
                "/keys",
                json!({ "identifier": identifier, "raw_key": raw }),
            )
            .await;
        assert_eq!(r.status(), 201, "create key {identifier}");
        r.json().await.expect("json")
    }

    pub(crate) async fn create_pool(&self, token: &str, identifier: &str, keys: &[&str]) -> Value {
        let r = self
            .post(
                token,
                "/pools",
                json!({ "identifier": identifier, "name": identifier, "key_identifiers": keys }),
            )
            .await;
        assert_eq!(r.status(), 201, "create pool {identifier}");
        r.json().await.expect("json")
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(db) = self.pg_db.take() {
            drop_pg_database(db);
        }
    }
}

/// Drops a test database (from a plain thread: `Drop` cannot await).
pub(crate) fn drop_pg_database(db: String) {
    let _ = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(pg_admin_exec(format!(
            "DROP DATABASE IF EXISTS {db} WITH (FORCE)"
        )));
    })
    .join();
}

/// Asserts status and `{"detail": ...}` shape; returns the detail.
pub(crate) async fn expect_error(r: reqwest::Response, status: u16) -> String {
    assert_eq!(r.status(), status, "status");
    let body: Value = r.json().await.expect("error body is JSON");
    body["detail"]
        .as_str()
        .unwrap_or_else(|| panic!("detail missing in {body}"))
        .to_owned()
}
