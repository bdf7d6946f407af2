//! `kill -9` of the real `apipool serve` under proxy load and API writes, on an SQLite file and
//! on PostgreSQL; then a restart on the same data.
//!
//! What must hold after the restart (the guarantee documented in docs/RELIABILITY.md):
//! * every key and pool whose creation was answered 2xx is there (each write is committed
//!   before its answer), with its secret still decryptable;
//! * the statistics hold every call acknowledged before the last flush, and every call
//!   acknowledged more than 2 s before the kill; calls of the last moments may be lost (events
//!   are written in the background, in batches) but none is counted twice or invented.
//!
//! Run: `cargo nextest run --workspace -E 'binary(crash)'` (PostgreSQL via `psql` at
//! APIPOOL_TEST_POSTGRES_URL, default postgres://postgres@127.0.0.1:5432/test).

mod common;

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{Serve, Server};
use serde_json::{Value, json};

const PASSWORD: &str = "crash-admin-password";

async fn serve(data_dir: &std::path::Path, database_url: Option<&str>) -> Server {
    let mut spec = Serve::new()
        .data_dir(data_dir)
        .env("APIPOOL_ADMIN_PASSWORD", PASSWORD);
    if let Some(url) = database_url {
        spec = spec.args(["--database-url", url]);
    }
    spec.aspawn().await
}

struct Api {
    client: reqwest::Client,
    base: String,
    token: String,
}

impl Api {
    async fn login(base: &str) -> Self {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .expect("client");
        let r = client
            .post(format!("{base}/api/v1/auth/login"))
            .json(&json!({"username": "admin", "password": PASSWORD}))
            .send()
            .await
            .expect("login");
        assert_eq!(r.status(), 200, "login");
        let v: Value = r.json().await.expect("json");
        Self {
            client,
            base: base.to_owned(),
            token: v["access_token"].as_str().expect("token").to_owned(),
        }
    }

    async fn post(&self, path: &str, body: Value) -> reqwest::Result<reqwest::Response> {
        self.client
            .post(format!("{}/api/v1{path}", self.base))
            .bearer_auth(&self.token)
            .json(&body)
            .send()
            .await
    }

    async fn get(&self, path: &str) -> reqwest::Response {
        self.client
            .get(format!("{}/api/v1{path}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .expect("the server answers")
    }

    async fn stats_total(&self) -> u64 {
        let r = self.get("/stats/crash/usage?seconds=86400").await;
        assert_eq!(r.status(), 200);
        r.json::<Value>().await.expect("json")["total"]
            .as_u64()
            .expect("total")
    }
}

/// Proxy clients until `stop`, or until the server goes away; returns when each call was
/// acknowledged (200), and the number of calls sent without an answer.
fn proxy_load(
    api: &Api,
    clients: usize,
    stop: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<(Vec<Instant>, u64)>> {
    (0..clients)
        .map(|_| {
            let (client, url, token, stop) = (
                api.client.clone(),
                format!("{}/api/v1/proxy/crash/http/price?id=x", api.base),
                api.token.clone(),
                stop.clone(),
            );
            tokio::spawn(async move {
                let (mut acked, mut unanswered) = (Vec::new(), 0);
                while !stop.load(Ordering::Relaxed) {
                    match client.get(&url).bearer_auth(&token).send().await {
                        Ok(r) if r.status() == 200 => acked.push(Instant::now()),
                        Ok(r) => panic!("proxy answered {}", r.status()),
                        Err(_) => {
                            unanswered += 1;
                            break;
                        }
                    }
                }
                (acked, unanswered)
            })
        })
        .collect()
}

fn pg_exec(sql: &str) {
    let admin = std::env::var("APIPOOL_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let out = Command::new("psql")
        .args([admin.as_str(), "-v", "ON_ERROR_STOP=1", "-qc", sql])
        .output()
        .expect("psql (the PostgreSQL client) must be installed");
    assert!(
        out.status.success(),
        "psql {sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn pg_url(db: &str) -> String {
    let admin = std::env::var("APIPOOL_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let (base, _) = admin.rsplit_once('/').expect("a database in the URL");
    format!("{base}/{db}")
}

async fn kill_9_under_load(database_url: Option<String>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let raws = ["crash-0", "crash-1", "crash-2", "crash-3"];
    let up = mock_upstream::spawn(mock_upstream::Config::with_keys(raws).expect("keys"))
        .await
        .expect("mock upstream");
    let server = serve(&data, database_url.as_deref()).await;
    let api = Api::login(&server.url()).await;
    for raw in raws {
        let r = api
            .post("/keys", json!({"identifier": raw, "raw_key": raw}))
            .await
            .expect("answer");
        assert_eq!(r.status(), 201);
    }
    let r = api
        .post(
            "/pools",
            json!({"identifier": "crash", "name": "crash", "key_identifiers": raws,
                   "upstream": {"base_url": up.url()}}),
        )
        .await
        .expect("answer");
    assert_eq!(r.status(), 201);

    // Phase 1: load, then a query (which flushes): everything so far is committed.
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = proxy_load(&api, 8, &stop);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut flushed = 0;
    for t in tasks {
        let (acked, unanswered) = t.await.expect("client");
        assert_eq!(unanswered, 0);
        flushed += acked.len() as u64;
    }
    assert_eq!(api.stats_total().await, flushed);

    // Phase 2: proxy load and API writes, then SIGKILL in the middle of it.
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = proxy_load(&api, 8, &stop);
    let writers: Vec<_> = (0..2)
        .map(|w| {
            let (client, base, token) = (api.client.clone(), api.base.clone(), api.token.clone());
            let api = Api {
                client,
                base,
                token,
            };
            tokio::spawn(async move {
                let mut created = Vec::new();
                for n in 0.. {
                    let key = format!("w{w}-key-{n}");
                    let Ok(r) = api
                        .post(
                            "/keys",
                            json!({"identifier": key, "raw_key": format!("secret-{key}")}),
                        )
                        .await
                    else {
                        break;
                    };
                    if !r.status().is_success() {
                        break;
                    }
                    let pool = format!("w{w}-pool-{n}");
                    let Ok(r) = api
                        .post(
                            "/pools",
                            json!({"identifier": pool, "name": pool, "key_identifiers": [key]}),
                        )
                        .await
                    else {
                        created.push((key, None));
                        break;
                    };
                    let ok = r.status().is_success();
                    created.push((key, ok.then_some(pool)));
                    if !ok {
                        break;
                    }
                }
                created
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let mut server = server;
    server.kill();
    let killed_at = Instant::now();
    let (mut acked, mut unanswered) = (Vec::new(), 0);
    for t in tasks {
        let (a, u) = t.await.expect("client");
        acked.extend(a);
        unanswered += u;
    }
    let mut created = Vec::new();
    for w in writers {
        created.extend(w.await.expect("writer"));
    }
    drop(server);

    // Restart on the same data.
    let server = serve(&data, database_url.as_deref()).await;
    let api = Api::login(&server.url()).await;
    let pools_made = created.iter().filter(|(_, p)| p.is_some()).count();
    assert!(created.len() > 5, "the writers made progress: {created:?}");
    for (key, pool) in &created {
        let r = api.get(&format!("/keys/{key}/raw")).await;
        assert_eq!(
            r.status(),
            200,
            "key {key} was acknowledged before the kill"
        );
        let v: Value = r.json().await.expect("json");
        assert_eq!(v["raw_key"], format!("secret-{key}"), "its secret decrypts");
        if let Some(pool) = pool {
            let r = api.get(&format!("/pools/{pool}")).await;
            assert_eq!(
                r.status(),
                200,
                "pool {pool} was acknowledged before the kill"
            );
        }
    }
    let total = api.stats_total().await;
    let early = acked
        .iter()
        .filter(|t| killed_at.duration_since(**t) > Duration::from_secs(2))
        .count() as u64;
    let acked_total = flushed + acked.len() as u64;
    eprintln!(
        "kill -9 ({}): keys created {} / pools {}; proxy calls acknowledged {acked_total} ({flushed} before the flush, {} after), unanswered at the kill {unanswered}; events after restart {total}; acknowledged but not recorded {}",
        if database_url.is_some() {
            "PostgreSQL"
        } else {
            "SQLite"
        },
        created.len(),
        pools_made,
        acked.len(),
        acked_total.saturating_sub(total),
    );
    assert!(
        total >= flushed + early,
        "events flushed or older than 2 s survive: {total} < {flushed} + {early}"
    );
    assert!(
        total <= acked_total + unanswered,
        "no event is invented or doubled: {total} > {acked_total} + {unanswered}"
    );
    assert!(
        total <= up.stats().admitted_ok(),
        "each event is a call the upstream served"
    );
    // And the proxy serves again.
    let r = api.get("/proxy/crash/http/price?id=after").await;
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_sqlite() {
    kill_9_under_load(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_postgres() {
    let name = format!("apipool_crash_{:016x}", rand_suffix());
    pg_exec(&format!("CREATE DATABASE {name}"));
    kill_9_under_load(Some(pg_url(&name))).await;
    pg_exec(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"));
}

/// A unique-enough suffix (time and process id) for the test database's name.
fn rand_suffix() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    nanos ^ u64::from(std::process::id()).rotate_left(32)
}
