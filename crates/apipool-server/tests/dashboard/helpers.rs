//! Test harness: the real app on port 0 (SQLite in a temp dir), a cookie-keeping HTTP client
//! that behaves like a browser, and API helpers.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use apipool_server::clock::FakeClock;
use apipool_server::config::Config;
use apipool_server::startup::Application;
use secrecy::SecretString;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

pub(crate) const ADMIN: &str = "admin";
pub(crate) const ADMIN_PASSWORD: &str = "admin-password-123";
pub(crate) const USER_PASSWORD: &str = "password-123";

static LOGS: OnceLock<()> = OnceLock::new();

fn init_logs() {
    LOGS.get_or_init(|| {
        if std::env::var_os("TEST_LOG").is_some() {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
                .with_test_writer()
                .try_init();
        }
    });
}

pub(crate) struct TestApp {
    pub(crate) address: String,
    pub(crate) clock: Arc<FakeClock>,
    pub(crate) http: reqwest::Client,
    _dir: tempfile::TempDir,
    shutdown: CancellationToken,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub(crate) async fn spawn_app() -> TestApp {
    init_logs();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = Config::for_data_dir(dir.path().join("data"));
    config.bind = "127.0.0.1:0".parse().expect("addr");
    config.admin_username = ADMIN.to_owned();
    config.admin_password = Some(SecretString::from(ADMIN_PASSWORD));
    config.db_max_connections = 5;
    let clock = FakeClock::new();
    let app = Application::build_with_clock(config, clock.clone())
        .await
        .expect("app builds");
    let address = format!("http://127.0.0.1:{}", app.port());
    let shutdown = app.shutdown_token();
    tokio::spawn(app.run_until_stopped());
    TestApp {
        address,
        clock,
        http: reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(60))
            .build()
            .expect("client"),
        _dir: dir,
        shutdown,
    }
}

impl TestApp {
    pub(crate) fn url(&self, path: &str) -> String {
        format!("{}{path}", self.address)
    }

    /// An API access token.
    pub(crate) async fn token(&self, user: &str, password: &str) -> String {
        let r = self
            .http
            .post(self.url("/api/v1/auth/login"))
            .json(&json!({ "username": user, "password": password }))
            .send()
            .await
            .expect("login");
        assert_eq!(r.status(), 200, "API login of {user}");
        let v: Value = r.json().await.expect("json");
        v["access_token"].as_str().expect("token").to_owned()
    }

    /// Creates a user through the API (as admin).
    pub(crate) async fn new_user(&self, name: &str) {
        let admin = self.token(ADMIN, ADMIN_PASSWORD).await;
        let r = self
            .http
            .post(self.url("/api/v1/auth/register"))
            .bearer_auth(admin)
            .json(&json!({ "username": name, "email": format!("{name}@example.com"), "password": USER_PASSWORD }))
            .send()
            .await
            .expect("register");
        assert_eq!(r.status(), 201, "register {name}");
    }

    pub(crate) async fn api_get(&self, token: &str, path: &str) -> (u16, Value) {
        let r = self
            .http
            .get(self.url(&format!("/api/v1{path}")))
            .bearer_auth(token)
            .send()
            .await
            .expect("request");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub(crate) async fn api_post(&self, token: &str, path: &str, body: Value) -> (u16, Value) {
        let r = self
            .http
            .post(self.url(&format!("/api/v1{path}")))
            .bearer_auth(token)
            .json(&body)
            .send()
            .await
            .expect("request");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }
}

/// A response as a browser sees it.
#[derive(Debug)]
pub(crate) struct Page {
    pub(crate) status: u16,
    pub(crate) location: Option<String>,
    pub(crate) headers: reqwest::header::HeaderMap,
    pub(crate) body: String,
}

impl Page {
    /// The CSRF token written into the page's forms.
    pub(crate) fn csrf(&self) -> String {
        let marker = "name=\"csrf_token\" value=\"";
        let start = self.body.find(marker).expect("page has a CSRF field") + marker.len();
        let end = self.body[start..].find('"').expect("closing quote") + start;
        self.body[start..end].to_owned()
    }
}

/// An HTTP client that keeps cookies like a browser (no redirects followed).
#[derive(Clone)]
pub(crate) struct Browser {
    base: String,
    http: reqwest::Client,
    pub(crate) jar: HashMap<String, String>,
}

impl Browser {
    pub(crate) fn new(app: &TestApp) -> Self {
        Self {
            base: app.address.clone(),
            http: app.http.clone(),
            jar: HashMap::new(),
        }
    }

    fn cookie_header(&self) -> String {
        self.jar
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    async fn take(&mut self, r: reqwest::Response) -> Page {
        for v in r.headers().get_all(reqwest::header::SET_COOKIE) {
            let text = v.to_str().expect("ascii cookie");
            let first = text.split(';').next().expect("pair");
            let (name, value) = first.split_once('=').expect("name=value");
            if text.contains("Max-Age=0") {
                self.jar.remove(name);
            } else {
                self.jar.insert(name.to_owned(), value.to_owned());
            }
        }
        Page {
            status: r.status().as_u16(),
            location: r
                .headers()
                .get(reqwest::header::LOCATION)
                .map(|v| v.to_str().expect("ascii").to_owned()),
            headers: r.headers().clone(),
            body: r.text().await.expect("body"),
        }
    }

    pub(crate) async fn get(&mut self, path: &str) -> Page {
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .header(reqwest::header::COOKIE, self.cookie_header())
            .send()
            .await
            .expect("GET");
        self.take(r).await
    }

    pub(crate) async fn post(&mut self, path: &str, form: &[(&str, &str)]) -> Page {
        let r = self
            .http
            .post(format!("{}{path}", self.base))
            .header(reqwest::header::COOKIE, self.cookie_header())
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .body(
                url::form_urlencoded::Serializer::new(String::new())
                    .extend_pairs(form)
                    .finish(),
            )
            .send()
            .await
            .expect("POST");
        self.take(r).await
    }

    /// Logs in through the login form.
    pub(crate) async fn login(&mut self, user: &str, password: &str) -> Page {
        let page = self.get("/login").await;
        assert_eq!(page.status, 200);
        let csrf = page.csrf();
        self.post(
            "/login",
            &[
                ("csrf_token", &csrf),
                ("username", user),
                ("password", password),
                ("next", "/"),
            ],
        )
        .await
    }
}
