//! The SDK against the real `apipool` binary: login and typed errors, token refresh (before expiry
//! by the session's clock, and on a 401 after a real, short expiry), DynamicKeyManager following
//! the server (adds, removals, config, an empty list, a server outage), and engine state kept
//! across refreshes.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use apipool::sdk::{
    self, AsyncDynamicKeyManager, DynamicKeyManager, Kept, SdkError, Session, SessionOptions,
};
use apipool::{KeyState, ManualClock, Outcome};
use common::{Serve, Server};
use reqwest::Method;
use secrecy::ExposeSecret;
use serde_json::{Value, json};

const ADMIN: &str = "admin";
const PASSWORD: &str = "sdk-test-password-1";

/// The real server binary; `stop()` and `start()` keep its address and data.
fn start_server(ttl_secs: u64) -> Server {
    Serve::new()
        .admin(ADMIN, PASSWORD)
        .env("APIPOOL_ACCESS_TOKEN_TTL_SECS", &ttl_secs.to_string())
        .spawn()
}

async fn add_key(s: &Session, id: &str, raw: &str) {
    s.ajson(
        Method::POST,
        "keys",
        Some(json!({ "identifier": id, "raw_key": raw })),
    )
    .await
    .expect("create key");
}

async fn create_pool(s: &Session, pool: &str, keys: &[&str], extra: Value) {
    let mut body = json!({ "identifier": pool, "name": pool, "key_identifiers": keys });
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    s.ajson(Method::POST, "pools", Some(body))
        .await
        .expect("create pool");
}

async fn add_member(s: &Session, pool: &str, key: &str) {
    s.ajson(
        Method::POST,
        &format!("pools/{pool}/members"),
        Some(json!({ "key_identifiers": [key] })),
    )
    .await
    .expect("add member");
}

async fn remove_member(s: &Session, pool: &str, key: &str) {
    s.ajson(Method::DELETE, &format!("pools/{pool}/members/{key}"), None)
        .await
        .expect("remove member");
}

/// A server with pool `prices` of keys `k1`, `k2` (raw `raw-key-number-1/2`).
async fn seeded(ttl: u64) -> (Server, Session) {
    let server = tokio::task::spawn_blocking(move || start_server(ttl))
        .await
        .expect("start");
    let admin = sdk::alogin(&server.url(), ADMIN, PASSWORD)
        .await
        .expect("login");
    add_key(&admin, "k1", "raw-key-number-1").await;
    add_key(&admin, "k2", "raw-key-number-2").await;
    add_key(&admin, "k3", "raw-key-number-3").await;
    create_pool(
        &admin,
        "prices",
        &["k1", "k2"],
        json!({"rotation_strategy": "round_robin", "pool_config": {"rate_limit": 10, "rate_limit_interval": 1, "retry_on_failure": true}}),
    )
    .await;
    (server, admin)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_keys_config_and_typed_errors() {
    let (server, admin) = seeded(900).await;
    let url = server.url();

    let bad = sdk::alogin(&url, ADMIN, "wrong-password")
        .await
        .unwrap_err();
    assert!(matches!(bad, SdkError::Auth { status: 401, .. }), "{bad:?}");
    assert_eq!(bad.status(), Some(401));

    let keys = sdk::aget_keys(&admin, "prices").await.expect("keys");
    let mut ids: Vec<&str> = keys.iter().map(|k| k.identifier.as_str()).collect();
    ids.sort_unstable();
    assert_eq!(ids, ["k1", "k2"]);
    assert!(
        keys.iter()
            .any(|k| k.raw_key.expose_secret() == "raw-key-number-1")
    );
    assert!(
        !format!("{keys:?}").contains("raw-key-number"),
        "Debug hides raw keys"
    );

    let cfg = sdk::aget_config(&admin, "prices").await.expect("config");
    assert_eq!(cfg.rotation_strategy.as_deref(), Some("round_robin"));
    assert_eq!(cfg.pool_config.rate_limit, 10);
    assert!(cfg.pool_config.retry_on_failure);

    let missing = sdk::aget_keys(&admin, "nope").await.unwrap_err();
    assert!(
        matches!(missing, SdkError::NotFound { status: 404, .. }),
        "{missing:?}"
    );
    let missing = sdk::aget_config(&admin, "nope").await.unwrap_err();
    assert_eq!(missing.status(), Some(404));

    // The sync facade works inside a runtime (reqwest::blocking would panic here) ...
    let session = sdk::login(&url, ADMIN, PASSWORD).expect("sync login inside a runtime");
    assert_eq!(
        sdk::get_keys(&session, "prices").expect("sync keys").len(),
        2
    );
    // ... and from plain threads.
    let url2 = url.clone();
    let n = std::thread::spawn(move || {
        let s = sdk::login(&url2, ADMIN, PASSWORD).expect("login");
        let c = sdk::get_config(&s, "prices").expect("config");
        (
            sdk::get_keys(&s, "prices").expect("keys").len(),
            c.client_type,
        )
    })
    .join()
    .expect("thread");
    assert_eq!(n, (2, "generic".to_owned()));

    // Server down: a typed "unavailable" error, no panic.
    drop(server);
    let down = sdk::aget_keys(&admin, "prices").await.unwrap_err();
    assert!(
        matches!(down, SdkError::Unavailable { status: None, .. }),
        "{down:?}"
    );
    assert!(down.is_transient());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refreshes_the_token_before_it_expires() {
    let (server, _admin) = seeded(3600).await;
    let clock = ManualClock::new();
    let session = Session::alogin_with(
        &server.url(),
        ADMIN,
        PASSWORD,
        SessionOptions::new().clock(clock.clone()),
    )
    .await
    .expect("login");
    session.aget_keys("prices").await.expect("keys");
    assert_eq!(session.refresh_count(), 0);
    let old_refresh = session.refresh_token();

    // 59 minutes 50 s later (by the session's clock) the token is due: refreshed before use.
    clock.advance(Duration::from_secs(3590));
    session
        .aget_keys("prices")
        .await
        .expect("keys after refresh");
    assert_eq!(session.refresh_count(), 1);
    assert_ne!(
        session.refresh_token().expose_secret(),
        old_refresh.expose_secret(),
        "the rotated refresh token is stored"
    );
    // The server rotated it: the old one is now refused.
    let r = reqwest::Client::new()
        .post(format!("{}/api/v1/auth/refresh", server.url()))
        .json(&json!({ "refresh_token": old_refresh.expose_secret() }))
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 401);
    // Reusing an old refresh token revoked the whole login; the session logs in again by itself.
    clock.advance(Duration::from_secs(3590));
    session
        .aget_keys("prices")
        .await
        .expect("keys after re-login");
    assert_eq!(session.refresh_count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renews_once_on_401_across_a_real_expiry() {
    // Access tokens live 2 s (whole seconds: at least 1 s); the session's clock is frozen, so only
    // the server's 401 tells it.
    let (server, _admin) = seeded(2).await;
    let session = Session::alogin_with(
        &server.url(),
        ADMIN,
        PASSWORD,
        SessionOptions::new()
            .clock(ManualClock::new())
            .keep_credentials(false),
    )
    .await
    .expect("login");
    let expired = session.access_token();
    // Wait (bounded) until the server itself refuses that token.
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let r = client
            .get(format!("{}/api/v1/auth/me", server.url()))
            .bearer_auth(expired.expose_secret())
            .send()
            .await
            .expect("me");
        if r.status() == 401 {
            break;
        }
        assert!(Instant::now() < deadline, "the token never expired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Eight concurrent calls with the expired token: one shared refresh, all succeed.
    let calls = (0..8).map(|_| {
        let s = session.clone();
        tokio::spawn(async move { s.aget_keys("prices").await })
    });
    for c in futures_join(calls).await {
        assert_eq!(c.expect("keys after renewal").len(), 2);
    }
    assert_eq!(
        session.refresh_count(),
        1,
        "concurrent callers share one refresh"
    );
}

async fn futures_join<T>(handles: impl Iterator<Item = tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.expect("task"));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamic_manager_follows_the_server() {
    let (server, admin) = seeded(900).await;
    let session = sdk::alogin(&server.url(), ADMIN, PASSWORD)
        .await
        .expect("login");
    let added = Arc::new(Mutex::new(Vec::new()));
    let removed = Arc::new(Mutex::new(Vec::new()));
    let (a, r) = (added.clone(), removed.clone());
    let mgr = AsyncDynamicKeyManager::from_session(&session, "prices")
        .refresh_interval(Duration::from_secs(3600))
        .on_keys_added(move |keys| {
            a.lock()
                .unwrap()
                .extend(keys.iter().map(|k| k.identifier.clone()));
        })
        .on_keys_removed(move |keys| {
            r.lock()
                .unwrap()
                .extend(keys.iter().map(|k| k.identifier.clone()));
        })
        .astart()
        .await
        .expect("start");
    assert_eq!(mgr.pool_size(), 2);
    assert_eq!(
        mgr.strategy(),
        apipool::Strategy::RoundRobin,
        "config applied at start"
    );
    assert_eq!(added.lock().unwrap().len(), 2);

    // The server adds k3 and drops k1: one refresh later the pool has k2 and k3.
    add_member(&admin, "prices", "k3").await;
    remove_member(&admin, "prices", "k1").await;
    admin
        .ajson(
            Method::PUT,
            "pools/prices",
            Some(json!({"rotation_strategy": "least_used"})),
        )
        .await
        .expect("update pool");
    let report = mgr.refresh().await;
    assert_eq!(report.kept, None);
    assert_eq!(report.pool_size, 2);
    assert_eq!(report.added.len(), 1);
    assert_eq!(report.added[0].identifier, "k3");
    assert_eq!(report.added[0].masked, "raw…er-3");
    assert_eq!(report.removed.len(), 1);
    assert_eq!(report.removed[0].identifier, "k1");
    assert!(report.config_applied);
    assert_eq!(mgr.strategy(), apipool::Strategy::LeastUsed);
    assert!(mgr.contains("raw-key-number-3") && !mgr.contains("raw-key-number-1"));
    assert_eq!(removed.lock().unwrap().as_slice(), ["k1".to_owned()]);
    assert!(added.lock().unwrap().contains(&"k3".to_owned()));

    // A refresh with no change changes nothing.
    let again = mgr.refresh().await;
    assert!(again.added.is_empty() && again.removed.is_empty() && again.kept.is_none());

    // An empty list while the pool has keys: kept (the default), and said why.
    remove_member(&admin, "prices", "k2").await;
    remove_member(&admin, "prices", "k3").await;
    let empty = mgr.refresh().await;
    assert_eq!(empty.kept, Some(Kept::EmptyList));
    assert_eq!(mgr.pool_size(), 2);

    // The background loop picks changes up by itself within one interval.
    mgr.ashutdown().await;
    add_member(&admin, "prices", "k1").await;
    let mgr = AsyncDynamicKeyManager::from_session(&session, "prices")
        .refresh_interval(Duration::from_millis(200))
        .astart()
        .await
        .expect("start");
    assert_eq!(mgr.pool_size(), 1);
    add_member(&admin, "prices", "k2").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while mgr.pool_size() < 2 {
        assert!(
            Instant::now() < deadline,
            "the background refresh never came"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    mgr.ashutdown().await;
    assert!(mgr.is_stopped());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keeps_cooldowns_of_staying_keys_and_survives_an_outage() {
    let (server, admin) = seeded(900).await;
    let mut server = server;
    let session = sdk::alogin(&server.url(), ADMIN, PASSWORD)
        .await
        .expect("login");
    let mgr = AsyncDynamicKeyManager::from_session(&session, "prices")
        .refresh_interval(Duration::from_secs(3600))
        .astart()
        .await
        .expect("start");

    // Cool k1 for an hour, then refresh with a change on the server.
    let lease = loop {
        let l = mgr.try_acquire().expect("a key");
        if l.identifier() == "k1" {
            break l;
        }
        l.report(Outcome::Success);
    };
    lease.report(Outcome::rate_limited(Some(Duration::from_secs(3600))));
    add_member(&admin, "prices", "k3").await;
    let report = mgr.refresh().await;
    assert_eq!(report.added.len(), 1);
    let st = mgr.explain("k1").expect("k1 stays").state;
    assert!(
        matches!(st, KeyState::Cooling { .. }),
        "cooldown kept: {st:?}"
    );

    // The server goes away: refreshes keep the pool and say why.
    let size = mgr.pool_size();
    let server = tokio::task::spawn_blocking(move || {
        server.stop();
        server
    })
    .await
    .expect("stop");
    let down = mgr.refresh().await;
    assert!(
        matches!(&down.kept, Some(Kept::FetchFailed(e)) if e.is_transient()),
        "{down:?}"
    );
    assert_eq!(mgr.pool_size(), size);
    assert!(matches!(
        mgr.explain("k1").unwrap().state,
        KeyState::Cooling { .. }
    ));

    // It comes back (same address, same data): the next refresh applies the server's list again.
    let mut server = server;
    let server = tokio::task::spawn_blocking(move || {
        server.start();
        server
    })
    .await
    .expect("restart");
    remove_member(&admin, "prices", "k2").await;
    let back = mgr.refresh().await;
    assert_eq!(back.kept, None, "{back:?}");
    assert_eq!(back.removed.len(), 1);
    assert_eq!(back.removed[0].identifier, "k2");
    assert_eq!(mgr.pool_size(), size - 1);
    assert!(matches!(
        mgr.explain("k1").unwrap().state,
        KeyState::Cooling { .. }
    ));
    mgr.ashutdown().await;
    drop(server);
}

#[test]
fn sync_dynamic_manager_from_plain_threads() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let (server, admin) = rt.block_on(seeded(900));
    let session = sdk::login(&server.url(), ADMIN, PASSWORD).expect("login");
    let mgr = DynamicKeyManager::builder(move || sdk::get_keys(&session, "prices"))
        .refresh_interval(Duration::from_secs(3600))
        .start()
        .expect("start");
    assert_eq!(mgr.pool_size(), 2);
    rt.block_on(add_member(&admin, "prices", "k3"));
    let report = mgr.refresh();
    assert_eq!(report.added.len(), 1);
    assert_eq!(mgr.pool_size(), 3);
    let auth_ok = mgr
        .call(|auth| Ok::<_, std::io::Error>(auth.secret().expose_secret().starts_with("raw-key")))
        .expect("call");
    assert!(auth_ok);
    mgr.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_invokes_through_the_real_proxy_and_uploads_stats() {
    let up = mock_upstream::spawn(
        mock_upstream::Config::with_keys(["raw-key-number-1", "raw-key-number-2"]).expect("cfg"),
    )
    .await
    .expect("mock");
    let (server, admin) = seeded(900).await;
    create_pool(
        &admin,
        "proxied",
        &["k1", "k2"],
        json!({"upstream": {"base_url": up.url()}}),
    )
    .await;
    let remote = sdk::async_connect(&admin, "proxied")
        .await
        .expect("connect");
    let data = remote
        .ainvoke(
            &["get"],
            json!(["/price"]),
            json!({"params": {"id": "bitcoin"}}),
        )
        .await
        .expect("invoke");
    assert_eq!(data["status_code"], 200, "{data}");
    assert_eq!(data["data"]["id"], "bitcoin");
    // A refused call leaves the handle usable.
    let bad = remote.ainvoke(&["nope"], json!([]), json!({})).await;
    assert!(bad.is_err());
    let again = remote
        .client()
        .acall("get", json!(["/price"]), json!({"params": {"id": "eth"}}))
        .await
        .expect("still usable");
    assert_eq!(again["data"]["id"], "eth");
    let resp = remote
        .client()
        .http(Method::GET, "/price")
        .query(&[("id", "sol")])
        .send()
        .await
        .expect("http route");
    assert_eq!(resp.status(), 200);

    // Local events uploaded to the server, stored once each.
    let uploader = sdk::StatsUploader::start(&admin, "prices", sdk::UploadOptions::new());
    let pool = apipool::ApiKeyManager::builder()
        .keys([apipool::http::HttpKey::bearer("raw-key-number-1").with_identifier("k1")])
        .stats(uploader.clone())
        .build()
        .expect("pool");
    for _ in 0..5 {
        pool.acall(|_| async { Ok::<_, std::io::Error>(()) })
            .await
            .expect("call");
    }
    uploader.aflush().await.expect("upload");
    assert_eq!(uploader.stats().uploaded, 5);
    uploader.ashutdown().await;
    drop(server);
    up.shutdown().await.expect("shutdown");
}
