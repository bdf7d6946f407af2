//! The dashboard's keys page with 100,000 keys of one user (SQLite): first page, last page
//! (deepest OFFSET), search, tag filter and the 100-row page, rendered to HTML through a cookie
//! session like a browser's.
//!
//! Run with: `cargo bench -p apipool-server --bench dashboard`

use std::collections::HashMap;
use std::time::{Duration, Instant};

use apipool_server::config::Config;
use apipool_server::startup::Application;
use criterion::{Criterion, criterion_group, criterion_main};
use secrecy::SecretString;
use serde_json::{Value, json};

const KEYS: usize = 100_000;
const BATCH: usize = 10_000;
const PASSWORD: &str = "bench-admin-password";

struct Bench {
    base: String,
    client: reqwest::Client,
    cookies: String,
    _dir: tempfile::TempDir,
}

fn import_body(from: usize, n: usize) -> Value {
    let keys: Vec<Value> = (from..from + n)
        .map(|i| {
            json!({
                "identifier": format!("k-{i:06}"),
                "raw_key": format!("sk-{i:06}-0123456789abcdef0123456789abcdef0123456789"),
                "alias": format!("key number {i}"),
                "tags": if i % 1000 == 0 { json!(["thousands", "bench"]) } else { json!(["bench"]) },
            })
        })
        .collect();
    json!({ "keys": keys })
}

fn take_cookies(jar: &mut HashMap<String, String>, r: &reqwest::Response) {
    for v in r.headers().get_all(reqwest::header::SET_COOKIE) {
        let text = v.to_str().expect("cookie");
        let (name, value) = text
            .split(';')
            .next()
            .and_then(|p| p.split_once('='))
            .expect("pair");
        jar.insert(name.to_owned(), value.to_owned());
    }
}

fn header(jar: &HashMap<String, String>) -> String {
    jar.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("; ")
}

async fn setup() -> Bench {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = Config::for_data_dir(dir.path().join("data"));
    config.bind = "127.0.0.1:0".parse().expect("addr");
    config.admin_password = Some(SecretString::from(PASSWORD));
    let app = Application::build(config).await.expect("app");
    let base = format!("http://127.0.0.1:{}", app.port());
    tokio::spawn(app.run_until_stopped());
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(600))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let v: Value = client
        .post(format!("{base}/api/v1/auth/login"))
        .json(&json!({ "username": "admin", "password": PASSWORD }))
        .send()
        .await
        .expect("login")
        .json()
        .await
        .expect("json");
    let token = v["access_token"].as_str().expect("token").to_owned();
    let started = Instant::now();
    for b in 0..KEYS / BATCH {
        let r = client
            .post(format!("{base}/api/v1/keys/import"))
            .bearer_auth(&token)
            .json(&import_body(b * BATCH, BATCH))
            .send()
            .await
            .expect("import");
        assert_eq!(r.status(), 201);
    }
    eprintln!("seeded {KEYS} keys in {:?}", started.elapsed());

    // Log in through the dashboard's form, as a browser would.
    let mut jar = HashMap::new();
    let page = client
        .get(format!("{base}/login"))
        .send()
        .await
        .expect("login page");
    take_cookies(&mut jar, &page);
    let html = page.text().await.expect("html");
    let marker = "name=\"csrf_token\" value=\"";
    let start = html.find(marker).expect("csrf field") + marker.len();
    let csrf = &html[start..start + html[start..].find('"').expect("quote")];
    let body = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("csrf_token", csrf)
        .append_pair("username", "admin")
        .append_pair("password", PASSWORD)
        .finish();
    let r = client
        .post(format!("{base}/login"))
        .header(reqwest::header::COOKIE, header(&jar))
        .header(
            reqwest::header::CONTENT_TYPE,
            "application/x-www-form-urlencoded",
        )
        .body(body)
        .send()
        .await
        .expect("login");
    assert_eq!(r.status(), 303);
    take_cookies(&mut jar, &r);
    Bench {
        base,
        client,
        cookies: header(&jar),
        _dir: dir,
    }
}

async fn page(b: &Bench, path: &str, expect: &str) {
    let r = b
        .client
        .get(format!("{}{path}", b.base))
        .header(reqwest::header::COOKIE, &b.cookies)
        .send()
        .await
        .expect("page");
    assert_eq!(r.status(), 200, "{path}");
    let html = r.text().await.expect("html");
    assert!(html.contains(expect), "{path} shows {expect}");
}

fn keys_page(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let b = rt.block_on(setup());
    let mut g = c.benchmark_group("dashboard_keys_100k");
    g.sample_size(30);
    g.measurement_time(Duration::from_secs(10));
    let cases = [
        ("first_page_25", "/keys", "k-000000"),
        ("last_page_25", "/keys?page=4000", "k-099999"),
        ("page_of_100", "/keys?page=500&page_size=100", "k-049999"),
        ("search", "/keys?search=k-0777", "k-077700"),
        ("rare_tag", "/keys?tag=thousands", "k-001000"),
        (
            "status_and_verification",
            "/keys?status=active&verification=unverified&page=2000",
            "Page 2000 of 4000",
        ),
    ];
    for (name, path, expect) in cases {
        g.bench_function(name, |bench| {
            bench.iter(|| rt.block_on(page(&b, path, expect)));
        });
    }
    g.finish();
}

criterion_group!(benches, keys_page);
criterion_main!(benches);
