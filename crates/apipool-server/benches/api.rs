//! HTTP-level benchmarks of the server with 100,000 keys for one user (the scale the issue asks
//! to stay fast), on SQLite and, when reachable, PostgreSQL.
//!
//! Run with: `cargo bench -p apipool-server --bench api`
//! (PostgreSQL from APIPOOL_TEST_POSTGRES_URL, default postgres://postgres@127.0.0.1:5432/test;
//! set APIPOOL_BENCH_SKIP_POSTGRES=1 to skip it.)

use std::time::{Duration, Instant};

use apipool_server::config::Config;
use apipool_server::startup::Application;
use criterion::{Criterion, criterion_group, criterion_main};
use secrecy::SecretString;
use serde_json::{Value, json};

const KEYS: usize = 100_000;
const BATCH: usize = 10_000;

struct Bench {
    base: String,
    client: reqwest::Client,
    token: String,
    _dir: tempfile::TempDir,
}

async fn login(client: &reqwest::Client, base: &str, user: &str, pw: &str) -> String {
    let v: Value = client
        .post(format!("{base}/api/v1/auth/login"))
        .json(&json!({ "username": user, "password": pw }))
        .send()
        .await
        .expect("login")
        .json()
        .await
        .expect("json");
    v["access_token"].as_str().expect("token").to_owned()
}

fn import_body(prefix: &str, from: usize, n: usize) -> Value {
    let keys: Vec<Value> = (from..from + n)
        .map(|i| {
            json!({
                "identifier": format!("{prefix}-{i:06}"),
                "raw_key": format!("sk-{prefix}-{i:06}-0123456789abcdef0123456789abcdef0123456789"),
                "alias": format!("key number {i}"),
                "tags": if i % 1000 == 0 { json!(["thousands", "bench"]) } else { json!(["bench"]) },
            })
        })
        .collect();
    json!({ "keys": keys })
}

async fn setup(database_url: Option<String>) -> Bench {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = Config::for_data_dir(dir.path().join("data"));
    config.bind = "127.0.0.1:0".parse().expect("addr");
    config.admin_password = Some(SecretString::from("bench-admin-password"));
    config.database_url = database_url;
    let app = Application::build(config).await.expect("app");
    let base = format!("http://127.0.0.1:{}", app.port());
    tokio::spawn(app.run_until_stopped());
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(600))
        .build()
        .expect("client");
    let token = login(&client, &base, "admin", "bench-admin-password").await;
    let started = Instant::now();
    for b in 0..KEYS / BATCH {
        let r = client
            .post(format!("{base}/api/v1/keys/import"))
            .bearer_auth(&token)
            .json(&import_body("k", b * BATCH, BATCH))
            .send()
            .await
            .expect("import");
        assert_eq!(r.status(), 201);
    }
    eprintln!("seeded {KEYS} keys in {:?}", started.elapsed());
    let members: Vec<String> = (0..100).map(|i| format!("k-{:06}", i * 997)).collect();
    let r = client
        .post(format!("{base}/api/v1/pools"))
        .bearer_auth(&token)
        .json(&json!({ "identifier": "p100", "name": "p100", "key_identifiers": members }))
        .send()
        .await
        .expect("pool");
    assert_eq!(r.status(), 201);
    Bench {
        base,
        client,
        token,
        _dir: dir,
    }
}

fn get(rt: &tokio::runtime::Runtime, b: &Bench, path: &str) {
    rt.block_on(async {
        let r = b
            .client
            .get(format!("{}/api/v1{path}", b.base))
            .bearer_auth(&b.token)
            .send()
            .await
            .expect("get");
        assert_eq!(r.status(), 200, "{path}");
        r.bytes().await.expect("body");
    });
}

fn run(c: &mut Criterion, rt: &tokio::runtime::Runtime, name: &str, b: &Bench) {
    let mut g = c.benchmark_group(format!("{name} (100k keys)"));
    g.sample_size(20);
    g.bench_function("GET /keys page 1", |x| {
        x.iter(|| get(rt, b, "/keys?page=1&page_size=100"))
    });
    g.bench_function("GET /keys page 1000 (offset 99,900)", |x| {
        x.iter(|| get(rt, b, "/keys?page=1000&page_size=100"))
    });
    g.bench_function("GET /keys?tag=thousands", |x| {
        x.iter(|| get(rt, b, "/keys?tag=thousands"))
    });
    g.bench_function("GET /keys?search=number 4242", |x| {
        x.iter(|| get(rt, b, "/keys?search=number%204242"))
    });
    g.bench_function("GET /keys/{identifier}", |x| {
        x.iter(|| get(rt, b, "/keys/k-054321"))
    });
    g.bench_function("GET /keys/{identifier}/raw", |x| {
        x.iter(|| get(rt, b, "/keys/k-054321/raw"))
    });
    g.bench_function("GET /keys/raw (pool of 100)", |x| {
        x.iter(|| get(rt, b, "/keys/raw?pool_identifier=p100"))
    });
    g.bench_function("GET /pools/{pool}/config", |x| {
        x.iter(|| get(rt, b, "/pools/p100/config"))
    });
    g.sample_size(10);
    let mut round = 0usize;
    g.bench_function("POST /keys/import 10,000 keys (one request)", |x| {
        x.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                round += 1;
                let body = import_body(&format!("imp{round}"), 0, BATCH);
                let t = Instant::now();
                rt.block_on(async {
                    let r = b
                        .client
                        .post(format!("{}/api/v1/keys/import", b.base))
                        .bearer_auth(&b.token)
                        .json(&body)
                        .send()
                        .await
                        .expect("import");
                    assert_eq!(r.status(), 201);
                });
                total += t.elapsed();
            }
            total
        })
    });
    g.bench_function("POST /auth/login (argon2id)", |x| {
        x.iter(|| rt.block_on(login(&b.client, &b.base, "admin", "bench-admin-password")))
    });
    g.finish();
}

fn benches(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let sqlite = rt.block_on(setup(None));
    run(c, &rt, "sqlite", &sqlite);
    drop(sqlite);
    if std::env::var_os("APIPOOL_BENCH_SKIP_POSTGRES").is_none() {
        let admin = std::env::var("APIPOOL_TEST_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
        let name = format!("apipool_bench_{}", uuid::Uuid::new_v4().simple());
        let exec = |sql: String| {
            let admin = admin.clone();
            rt.block_on(async move {
                use sqlx::Connection;
                sqlx::any::install_default_drivers();
                let mut conn = sqlx::AnyConnection::connect(&admin).await?;
                sqlx::query(sqlx::AssertSqlSafe(sql))
                    .execute(&mut conn)
                    .await?;
                conn.close().await
            })
        };
        if exec(format!("CREATE DATABASE {name}")).is_ok() {
            let mut url = url::Url::parse(&admin).expect("url");
            url.set_path(&format!("/{name}"));
            let pg = rt.block_on(setup(Some(url.to_string())));
            run(c, &rt, "postgres", &pg);
            drop(pg);
            let _ = exec(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"));
        } else {
            eprintln!("PostgreSQL not reachable: skipping its benchmarks");
        }
    }
}

criterion_group!(api, benches);
criterion_main!(api);
