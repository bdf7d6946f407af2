//! The whole dashboard flow in headless Chromium: log in, bulk-import keys, create a pool, edit
//! its config (an invalid value first), run proxied calls, watch usage/timeline/logs, disable a
//! key and see it skipped, log out. Screenshots of each page go to `target/dashboard-screenshots/`.

use std::net::TcpListener;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use futures::FutureExt;
use serde_json::{Value, json};

use crate::helpers::{ADMIN, ADMIN_PASSWORD, TestApp, spawn_app};

const INSTALL: &str =
    "apt-get update && apt-get install -y --no-install-recommends chromium chromium-driver";

fn find_binary(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
    dirs.push(PathBuf::from("/usr/bin"));
    dirs.push(PathBuf::from("/usr/lib/chromium"));
    names
        .iter()
        .flat_map(|n| dirs.iter().map(move |d| d.join(n)))
        .find(|p| p.is_file())
}

/// chromedriver on a free port, killed on drop.
struct Driver {
    child: Child,
    url: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start_driver() -> Driver {
    let driver = find_binary(&["chromedriver"]).unwrap_or_else(|| {
        panic!("chromedriver is not installed; the dashboard browser tests need it: {INSTALL}")
    });
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let child = Command::new(driver)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromedriver starts");
    let url = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = http.get(format!("{url}/status")).send().await
            && r.status().is_success()
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "chromedriver did not start on port {port}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Driver { child, url }
}

async fn start_browser(driver: &Driver, profile: &std::path::Path) -> Client {
    let chromium = find_binary(&["chromium", "chromium-browser"]).unwrap_or_else(|| {
        panic!("chromium is not installed; the dashboard browser tests need it: {INSTALL}")
    });
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".to_owned(),
        json!({
            "binary": chromium,
            "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1280,1600",
                format!("--user-data-dir={}", profile.display()),
            ],
        }),
    );
    ClientBuilder::rustls()
        .expect("rustls")
        .capabilities(caps)
        .connect(&driver.url)
        .await
        .expect("a Chromium session through chromedriver")
}

fn shots_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/dashboard-screenshots");
    std::fs::create_dir_all(&dir).expect("screenshot dir");
    dir
}

/// Saves a screenshot of the top of the page.
async fn shot(c: &Client, name: &str) {
    let _ = c.execute("window.scrollTo(0, 0);", vec![]).await;
    save_shot(c, name).await;
}

/// Saves a screenshot with an element scrolled into view.
async fn shot_at(c: &Client, name: &str, css: &str) {
    let script = "document.querySelector(arguments[0]).scrollIntoView({block: 'start'});";
    let _ = c.execute(script, vec![json!(css)]).await;
    save_shot(c, name).await;
}

async fn save_shot(c: &Client, name: &str) {
    let png = c.screenshot().await.expect("screenshot");
    assert!(png.starts_with(b"\x89PNG"), "a PNG");
    std::fs::write(shots_dir().join(format!("{name}.png")), png).expect("write screenshot");
}

/// Waits until the page's text contains `needle` (pages and live charts update asynchronously).
async fn wait_text(c: &Client, css: &str, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = match c.find(Locator::Css(css)).await {
            Ok(e) => e.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        if text.contains(needle) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "`{css}` never contained {needle:?}; last text: {text:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn text(c: &Client, css: &str) -> String {
    c.find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("`{css}` not found: {e}"))
        .text()
        .await
        .expect("text")
}

async fn fill(c: &Client, css: &str, value: &str) {
    let e = c
        .find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("`{css}` not found: {e}"));
    e.clear().await.expect("clear");
    e.send_keys(value).await.expect("type");
}

async fn click(c: &Client, css: &str) {
    c.find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("`{css}` not found: {e}"))
        .click()
        .await
        .expect("click");
}

async fn path(c: &Client) -> String {
    c.current_url().await.expect("url").path().to_owned()
}

/// Calls through the pool's transparent proxy route, as an SDK would.
async fn proxied_calls(app: &TestApp, token: &str, n: usize) -> Vec<u16> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let r = app
            .http
            .get(app.url(&format!("/api/v1/proxy/prices/http/price?id=coin-{i}")))
            .bearer_auth(token)
            .send()
            .await
            .expect("proxied call");
        out.push(r.status().as_u16());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_whole_dashboard_flow_in_chromium() {
    let app = spawn_app().await;
    let upstream = mock_upstream::spawn(
        mock_upstream::Config::with_keys(["live-key-1", "live-key-2", "live-key-3"])
            .expect("mock keys"),
    )
    .await
    .expect("mock upstream");
    let driver = start_driver().await;
    let profile = tempfile::tempdir().expect("profile dir");
    let c = start_browser(&driver, profile.path()).await;
    let result = AssertUnwindSafe(flow(&app, &upstream, &c))
        .catch_unwind()
        .await;
    if !matches!(result, Ok(Ok(()))) {
        // Keep a picture of where it stopped.
        save_shot(&c, "zz-failure").await;
    }
    let _ = c.close().await;
    match result {
        Ok(r) => r.expect("dashboard flow"),
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

async fn flow(
    app: &TestApp,
    upstream: &mock_upstream::MockServer,
    c: &Client,
) -> Result<(), String> {
    // ---- log in ----
    c.goto(&app.url("/")).await.map_err(|e| e.to_string())?;
    assert_eq!(
        path(c).await,
        "/login",
        "anonymous visitors land on the login page"
    );
    shot(c, "01-login").await;
    fill(c, "#username", ADMIN).await;
    fill(c, "#password", "wrong-password").await;
    click(c, "#login-submit").await;
    wait_text(c, "#login-error", "Wrong username or password").await;
    fill(c, "#password", ADMIN_PASSWORD).await;
    click(c, "#login-submit").await;
    wait_text(c, "#current-user", ADMIN).await;
    assert_eq!(path(c).await, "/");
    wait_text(c, "#overview-empty", "No pools yet").await;
    shot(c, "02-overview-empty").await;

    // ---- keys: bulk import from pasted CSV ----
    click(c, "nav a[href='/keys']").await;
    wait_text(c, "#keys-empty", "No keys yet").await;
    let csv = "identifier,raw_key,alias,tags\n\
               key-one,live-key-1,First key,prod\n\
               key-two,live-key-2,Second key,prod\n\
               key-three,live-key-3,Third key,spare\n";
    fill(c, "#import-text", csv).await;
    click(c, "#import-submit").await;
    wait_text(c, "#import-summary", "Imported 3 keys.").await;
    let report = text(c, "#import-report").await;
    assert!(
        report.contains("key-two") && report.contains("created"),
        "{report}"
    );
    wait_text(c, "#keys-total", "3 keys").await;
    shot(c, "03-keys-imported").await;
    // Search and filter by tag.
    fill(c, "#f-tag", "spare").await;
    click(c, "#filter-submit").await;
    let table = wait_text(c, "#keys-table", "key-three").await;
    assert!(!table.contains("key-one"), "tag filter: {table}");
    // Key detail page.
    click(c, "#keys-table a").await;
    wait_text(c, "#key-title", "key-three").await;
    shot(c, "04-key-detail").await;

    // ---- create a pool ----
    click(c, "nav a[href='/pools']").await;
    wait_text(c, "#pools-empty", "No pools yet").await;
    fill(c, "#p-identifier", "prices").await;
    fill(c, "#p-name", "Prices").await;
    fill(c, "#p-base", &upstream.url()).await;
    fill(c, "#p-auth", "bearer").await;
    fill(c, "#p-keys", "key-one, key-two").await;
    click(c, "#create-pool-submit").await;
    wait_text(c, "#flash", "Pool 'prices' created.").await;
    assert_eq!(path(c).await, "/pools/prices");
    let members = text(c, "#members-table").await;
    assert!(
        members.contains("key-one") && members.contains("key-two"),
        "{members}"
    );

    // ---- config: one invalid value (error shown, nothing saved), then valid values ----
    fill(c, "#cfg-timeout", "1000").await;
    fill(c, "#cfg-rate_limit", "50").await;
    click(c, "#config-submit").await;
    let err = wait_text(c, "#cfg-timeout-error", "between 1 and 600").await;
    assert!(err.contains("must be a number"), "{err}");
    let invalid = c
        .find(Locator::Css("#cfg-timeout"))
        .await
        .map_err(|e| e.to_string())?
        .attr("aria-invalid")
        .await
        .map_err(|e| e.to_string())?;
    assert_eq!(invalid.as_deref(), Some("true"));
    shot_at(c, "05-pool-config-error", "#config").await;
    let token = app.token(ADMIN, ADMIN_PASSWORD).await;
    let (_, cfg) = app.api_get(&token, "/pools/prices/config").await;
    assert_eq!(cfg["pool_config"], Value::Null, "nothing saved: {cfg}");

    fill(c, "#cfg-timeout", "20").await;
    fill(c, "#cfg-rate_limit", "1000").await;
    fill(c, "#cfg-ban_threshold", "5").await;
    fill(c, "#cfg-custom", "{\"team\": \"data\"}").await;
    click(c, "#config-submit").await;
    wait_text(c, "#flash", "Configuration saved.").await;
    let (_, cfg) = app.api_get(&token, "/pools/prices/config").await;
    assert_eq!(cfg["pool_config"]["timeout"], json!(20.0));
    assert_eq!(cfg["pool_config"]["rate_limit"], json!(1000));
    assert_eq!(cfg["pool_config"]["ban_threshold"], json!(5));
    assert_eq!(cfg["pool_config"]["custom"], json!({ "team": "data" }));

    // ---- proxied calls: usage, timeline and logs update ----
    let statuses = proxied_calls(app, &token, 12).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    c.refresh().await.map_err(|e| e.to_string())?;
    wait_text(c, "#stat-calls", "12").await;
    wait_text(c, "#logs-total", "12 calls").await;
    let logs = text(c, "#logs-table").await;
    assert!(logs.contains("success"), "{logs}");
    // The charts draw from the live endpoint.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let usage = c
            .find(Locator::Css("#usage-chart"))
            .await
            .map_err(|e| e.to_string())?
            .attr("data-total")
            .await
            .map_err(|e| e.to_string())?;
        let timeline = c
            .find(Locator::Css("#timeline-chart"))
            .await
            .map_err(|e| e.to_string())?
            .attr("data-total")
            .await
            .map_err(|e| e.to_string())?;
        if usage.as_deref() == Some("12") && timeline.as_deref() == Some("12") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "charts: usage {usage:?}, timeline {timeline:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // More calls show up without reloading (the page polls every 5 s).
    let more = proxied_calls(app, &token, 3).await;
    assert!(more.iter().all(|s| *s == 200), "{more:?}");
    wait_text(c, "#stat-calls", "15").await;
    shot(c, "06-pool-after-calls").await;
    shot_at(c, "06b-pool-logs", "#logs").await;

    // ---- disable a key and see it skipped ----
    click(
        c,
        "#members-table tr[data-key='key-two'] button[aria-label='Disable key key-two']",
    )
    .await;
    wait_text(c, "#flash", "Key 'key-two' disabled.").await;
    let row = text(c, "#members-table tr[data-key='key-two']").await;
    assert!(row.contains("disabled"), "{row}");
    let skipped = text(
        c,
        "#members-table tr[data-key='key-two'] [data-field=skipped]",
    )
    .await;
    assert!(
        !skipped.trim().is_empty() && skipped.trim() != "–",
        "a reason is shown: {row}"
    );
    wait_text(c, "#stat-usable", "1 / 2").await;
    let after = proxied_calls(app, &token, 4).await;
    assert!(after.iter().all(|s| *s == 200), "{after:?}");
    c.goto(&app.url("/pools/prices?log_key=key-two&log_seconds=3600"))
        .await
        .map_err(|e| e.to_string())?;
    let two_before = text(c, "#logs-total").await;
    c.goto(&app.url("/pools/prices?log_key=key-one"))
        .await
        .map_err(|e| e.to_string())?;
    let one_total = text(c, "#logs-total").await;
    let n = |s: &str| -> u64 {
        s.split_whitespace()
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    assert_eq!(
        n(&one_total) + n(&two_before),
        19,
        "{one_total} + {two_before}"
    );
    // Every call after the disable went to key-one: key-two's count did not move.
    let (_, rates) = app
        .api_get(&token, "/stats/prices/success-rate?seconds=3600")
        .await;
    let two_calls = rates["per_key"]
        .as_array()
        .and_then(|a| a.iter().find(|k| k["key_identifier"] == "key-two"))
        .map_or(0, |k| k["total"].as_u64().unwrap_or(0));
    assert_eq!(two_calls, n(&two_before));
    c.goto(&app.url("/pools/prices"))
        .await
        .map_err(|e| e.to_string())?;
    wait_text(c, "#members-table", "key-two").await;
    shot(c, "07-pool-key-disabled").await;

    // ---- the other pages ----
    click(c, "nav a[href='/']").await;
    let row = wait_text(c, "#overview-table tr[data-pool='prices']", "prices").await;
    assert!(
        row.contains("1 / 2") && row.contains("19"),
        "overview row: {row}"
    );
    wait_text(c, "#ov-success", "100.0%").await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let total = c
            .find(Locator::Css("#overview-chart"))
            .await
            .map_err(|e| e.to_string())?
            .attr("data-total")
            .await
            .map_err(|e| e.to_string())?;
        if total.as_deref() == Some("19") {
            break;
        }
        assert!(Instant::now() < deadline, "overview chart total {total:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    shot(c, "08-overview").await;
    click(c, "nav a[href='/pools']").await;
    wait_text(c, "#pools-table", "prices").await;
    shot(c, "09-pools").await;
    click(c, "nav a[href='/users']").await;
    wait_text(c, "#users-table", ADMIN).await;
    shot(c, "10-users").await;

    // ---- log out ----
    click(c, "#logout").await;
    wait_text(c, "#flash", "You are logged out.").await;
    assert_eq!(path(c).await, "/login");
    c.goto(&app.url("/pools/prices"))
        .await
        .map_err(|e| e.to_string())?;
    assert_eq!(path(c).await, "/login", "the session is gone");
    shot(c, "11-logged-out").await;
    Ok(())
}
