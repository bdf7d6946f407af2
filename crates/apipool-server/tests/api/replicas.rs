//! Two replicas on one PostgreSQL database (and one Redis) behave as one server: shared limits,
//! changes applied by the other replica's live engines within a second, token revocation seen by
//! both, master-key rotation while both run, and both Redis failure modes.
//!
//! Each test gets a fresh PostgreSQL database and its own Redis key prefix. The replicas are two
//! `Application`s in this process that share nothing but the database and Redis (and the master
//! key, given to both as `APIPOOL_MASTER_KEY` would be).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use apipool_server::clock::Clock;
use apipool_server::config::{Config, RedisFailMode};
use apipool_server::db::Db;
use apipool_server::vault::{self, KeySource, MasterKey, RotateOptions};
use secrecy::SecretString;
use serde_json::{Value, json};

use crate::helpers::{
    ADMIN, ADMIN_PASSWORD, Backend, TestApp, captured_logs, contains, expect_error, start,
    test_config,
};
use crate::proxy_helpers::{
    add_key, eventually, get_via_invoke, key_health, make_pool, mock, mock_with, status, upstream,
};

/// The Redis the tests use.
fn redis_url() -> String {
    std::env::var("APIPOOL_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// A Redis URL nothing listens on.
const REDIS_DOWN: &str = "redis://127.0.0.1:1";

/// Two replicas on a fresh PostgreSQL database; `a` owns (and drops) the database, so it is
/// declared last (dropped after `b`).
struct Replicas {
    b: TestApp,
    a: TestApp,
    /// This test's Redis key prefix.
    redis_prefix: String,
}

/// Two replicas with their key state in memory, each on its own.
async fn replicas(tweak: impl Fn(&mut Config)) -> Replicas {
    let (mut config, dir, pg_db) = test_config(Backend::Postgres).await;
    let master = MasterKey::generate();
    config.master_key = Some(SecretString::from(master.encode().to_string()));
    config.redis_prefix = format!("apipool-test-{}", uuid::Uuid::new_v4().simple());
    tweak(&mut config);
    let a = start(config.clone(), dir, pg_db).await;
    // Same database, same Redis, same master key (nothing is kept in the data directory).
    let redis_prefix = config.redis_prefix.clone();
    let b = start(config, tempfile::tempdir().expect("tempdir"), None).await;
    Replicas { b, a, redis_prefix }
}

/// Two replicas sharing their key state on the test Redis.
async fn replicas_on_redis() -> Replicas {
    replicas(|c| c.redis_url = Some(redis_url())).await
}

impl Replicas {
    /// Deletes this test's Redis keys.
    async fn clean_redis(&self) {
        let Ok(client) = redis::Client::open(redis_url()) else {
            return;
        };
        let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
            return;
        };
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}:*", self.redis_prefix))
            .query_async(&mut conn)
            .await
            .unwrap_or_default();
        if !keys.is_empty() {
            let _: Result<(), _> = redis::cmd("DEL").arg(keys).query_async(&mut conn).await;
        }
    }
}

/// The replica serving request `i` when clients alternate between them.
fn pick(r: &Replicas, i: usize) -> &TestApp {
    if i.is_multiple_of(2) { &r.a } else { &r.b }
}

const LIMIT_KEYS: [&str; 3] = ["sk-lim-1", "sk-lim-2", "sk-lim-3"];
const LIMIT_RATE: u32 = 5;
const LIMIT_CALLS: usize = 60;

/// Eight clients alternate between the replicas for [`LIMIT_CALLS`] calls through a pool of
/// three keys limited to 5 calls/s each (the upstream's own limit). Returns the upstream's
/// statistics, the answers and how long it took.
async fn alternate_through_a_limited_pool(
    r: Arc<Replicas>,
) -> (mock_upstream::StatsSnapshot, Vec<(u16, Value)>, Duration) {
    let upstream_mock = mock_with(&LIMIT_KEYS, |c| {
        c.rate = LIMIT_RATE;
        c.interval = 1.0;
    })
    .await;
    let t = r.a.admin_token.clone();
    for (i, raw) in LIMIT_KEYS.iter().enumerate() {
        add_key(&r.a, &t, &format!("lim{i}"), raw, None).await;
    }
    let mut extra = upstream(&upstream_mock.url(), "bearer");
    extra["pool_config"] = json!({ "rate_limit": LIMIT_RATE, "rate_limit_interval": 1 });
    make_pool(&r.a, &t, "limited", &["lim0", "lim1", "lim2"], extra).await;
    let started = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for _ in 0..8 {
        let (r, next, t) = (r.clone(), next.clone(), t.clone());
        clients.push(tokio::spawn(async move {
            let mut answers = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= LIMIT_CALLS {
                    break answers;
                }
                let a = get_via_invoke(
                    pick(&r, i),
                    &t,
                    "limited",
                    "/price",
                    json!({ "id": format!("item-{i}") }),
                )
                .await;
                answers.push((a.status, a.body));
            }
        }));
    }
    let mut answers = Vec::new();
    for c in clients {
        answers.extend(c.await.expect("client"));
    }
    (upstream_mock.stats(), answers, started.elapsed())
}

async fn shared_limits_hold_across_replicas() {
    let r = Arc::new(replicas_on_redis().await);
    let (stats, answers, elapsed) = alternate_through_a_limited_pool(r.clone()).await;
    // Requests alternated between the replicas, so each spent about half of the calls.
    assert_eq!(answers.len(), LIMIT_CALLS);
    for (status, body) in &answers {
        assert_eq!(*status, 200, "{body}");
        assert_eq!(body["success"], true, "{body}");
        assert_eq!(body["data"]["status_code"], 200, "{body}");
    }
    assert_eq!(
        stats.status(429),
        0,
        "the upstream refused calls: the replicas overdrew the keys ({stats:?})"
    );
    assert_eq!(stats.admitted_ok(), LIMIT_CALLS as u64);
    // 60 calls at 3 keys x 5/s cannot take less than 3 s unless the limit was overdrawn.
    assert!(elapsed >= Duration::from_millis(2_900), "{elapsed:?}");
    r.clean_redis().await;
}

/// The contrast: without Redis each replica spends every key's whole limit on its own.
async fn without_redis_the_replicas_overdraw() {
    let r = Arc::new(replicas(|_| {}).await);
    let (stats, _, _) = alternate_through_a_limited_pool(r).await;
    assert!(
        stats.status(429) > 0,
        "two replicas with their own state should overdraw the keys: {stats:?}"
    );
}

async fn key_disabled_on_a_is_skipped_by_b_within_a_second() {
    key_disabled_on_one_replica(replicas(|_| {}).await).await;
}

async fn key_disabled_on_a_is_skipped_by_b_on_redis() {
    key_disabled_on_one_replica(replicas_on_redis().await).await;
}

/// A mock upstream with two raw keys, added on replica A as `keys`, in pool `pool`, whose engine
/// is then live on both replicas (one call through each).
async fn two_key_pool_live_on_both(
    r: &Replicas,
    raws: [&str; 2],
    keys: [&str; 2],
    pool: &str,
) -> mock_upstream::MockServer {
    let upstream_mock = mock(&raws).await;
    let t = &r.a.admin_token;
    for (key, raw) in keys.iter().zip(raws) {
        add_key(&r.a, t, key, raw, None).await;
    }
    make_pool(
        &r.a,
        t,
        pool,
        &keys,
        upstream(&upstream_mock.url(), "bearer"),
    )
    .await;
    for app in [&r.a, &r.b] {
        let a = get_via_invoke(app, t, pool, "/price", json!({"id": "warm"})).await;
        assert_eq!(a.status, 200, "{}", a.body);
    }
    upstream_mock
}

async fn key_disabled_on_one_replica(r: Replicas) {
    let upstream_mock =
        two_key_pool_live_on_both(&r, ["sk-dis-1", "sk-dis-2"], ["d1", "d2"], "dis").await;
    let t = r.a.admin_token.clone();
    let resp = r.a.put(&t, "/keys/d1", json!({"is_active": false})).await;
    assert_eq!(resp.status(), 200);
    let disabled_at = Instant::now();
    let seen = eventually(Duration::from_secs(1), || async {
        let s = status(&r.b, &t, "dis").await;
        key_health(&s, "d1")["state"] == "disabled"
    })
    .await;
    assert!(
        seen,
        "replica B still used the key disabled on A after {:?}",
        disabled_at.elapsed()
    );
    let before = upstream_mock.key_stats("sk-dis-1").expect("key").admitted;
    for i in 0..10 {
        let a = get_via_invoke(&r.b, &t, "dis", "/price", json!({"id": i})).await;
        assert_eq!(a.status, 200, "{}", a.body);
        assert_eq!(a.body["key_identifier"], "d2");
    }
    assert_eq!(
        upstream_mock.key_stats("sk-dis-1").expect("key").admitted,
        before
    );
    // Enabled again on B: A uses it again.
    let resp = r.b.put(&t, "/keys/d1", json!({"is_active": true})).await;
    assert_eq!(resp.status(), 200);
    let back = eventually(Duration::from_secs(1), || async {
        let s = status(&r.a, &t, "dis").await;
        key_health(&s, "d1")["state"] == "active"
    })
    .await;
    assert!(back, "replica A did not see the key enabled on B");
    r.clean_redis().await;
}

/// Redis keeps a key's hand-made state while the key is out of every pool; the database is the
/// truth when it comes back.
async fn a_key_enabled_while_out_of_the_pool_rejoins_active() {
    let r = replicas_on_redis().await;
    // Kept alive to the end: the pool calls it.
    let _upstream_mock =
        two_key_pool_live_on_both(&r, ["sk-rejoin-1", "sk-rejoin-2"], ["j1", "j2"], "rejoin").await;
    let t = r.a.admin_token.clone();
    // Disabled (shared in Redis), taken out of the pool, enabled while out of it.
    assert_eq!(
        r.a.put(&t, "/keys/j1", json!({"is_active": false}))
            .await
            .status(),
        200
    );
    assert_eq!(
        r.a.delete(&t, "/pools/rejoin/members/j1").await.status(),
        204
    );
    assert_eq!(
        r.a.put(&t, "/keys/j1", json!({"is_active": true}))
            .await
            .status(),
        200
    );
    // Back in the pool through B: active on both.
    let resp =
        r.b.post(
            &t,
            "/pools/rejoin/members",
            json!({"key_identifiers": ["j1"]}),
        )
        .await;
    assert_eq!(resp.status(), 200);
    for app in [&r.b, &r.a] {
        let active = eventually(Duration::from_secs(1), || async {
            let s = status(app, &t, "rejoin").await;
            s["data"]["total_keys"] == 2 && key_health(&s, "j1")["state"] == "active"
        })
        .await;
        assert!(active, "{}", status(app, &t, "rejoin").await);
    }
    r.clean_redis().await;
}

async fn pools_changed_on_a_are_applied_by_b() {
    let r = replicas(|_| {}).await;
    let first = mock(&["sk-pool-1", "sk-pool-2"]).await;
    let second = mock(&["sk-pool-1", "sk-pool-2"]).await;
    let t = r.a.admin_token.clone();
    add_key(&r.a, &t, "p1", "sk-pool-1", None).await;
    add_key(&r.b, &t, "p2", "sk-pool-2", None).await;
    // Created on A, usable on B at once.
    make_pool(
        &r.a,
        &t,
        "shared",
        &["p1"],
        upstream(&first.url(), "bearer"),
    )
    .await;
    let a = get_via_invoke(&r.b, &t, "shared", "/price", json!({"id": "x"})).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.body["key_identifier"], "p1");
    assert_eq!(first.stats().admitted_ok(), 1);

    // A new upstream and a new member, set on A, are used by B within a second.
    let resp =
        r.a.put(
            &t,
            "/pools/shared",
            json!({"upstream": {"base_url": second.url()}}),
        )
        .await;
    assert_eq!(resp.status(), 200);
    let resp =
        r.a.post(
            &t,
            "/pools/shared/members",
            json!({"key_identifiers": ["p2"]}),
        )
        .await;
    assert_eq!(resp.status(), 200);
    let applied = eventually(Duration::from_secs(1), || async {
        let s = status(&r.b, &t, "shared").await;
        s["data"]["total_keys"] == 2
    })
    .await;
    assert!(applied, "B did not see the new member");
    let a = get_via_invoke(&r.b, &t, "shared", "/price", json!({"id": "y"})).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(
        second.stats().admitted_ok(),
        1,
        "B still calls the old upstream"
    );
    assert_eq!(first.stats().admitted_ok(), 1);

    // Renamed on B: A answers under the new name only.
    let resp =
        r.b.put(&t, "/pools/shared", json!({"identifier": "renamed"}))
            .await;
    assert_eq!(resp.status(), 200);
    let renamed = eventually(Duration::from_secs(1), || async {
        get_via_invoke(&r.a, &t, "shared", "/price", json!({"id": "z"}))
            .await
            .status
            == 404
    })
    .await;
    assert!(renamed, "A still answers under the old name");
    let a = get_via_invoke(&r.a, &t, "renamed", "/price", json!({"id": "z"})).await;
    assert_eq!(a.status, 200, "{}", a.body);

    // Deleted on A: B answers 404 within a second.
    let resp = r.a.delete(&t, "/pools/renamed").await;
    assert_eq!(resp.status(), 204);
    let gone = eventually(Duration::from_secs(1), || async {
        get_via_invoke(&r.b, &t, "renamed", "/price", json!({"id": "w"}))
            .await
            .status
            == 404
    })
    .await;
    assert!(gone, "B still serves a pool deleted on A");
}

async fn refresh(app: &TestApp, token: &str) -> reqwest::Response {
    app.client
        .post(app.api("/auth/refresh"))
        .json(&json!({ "refresh_token": token }))
        .send()
        .await
        .expect("request")
}

async fn revocation_is_seen_by_both_replicas() {
    let r = replicas(|_| {}).await;
    let user_token = r.a.new_user("carol").await;
    let upstream_mock = mock(&["sk-carol"]).await;
    add_key(&r.a, &user_token, "c1", "sk-carol", None).await;
    make_pool(
        &r.a,
        &user_token,
        "mine",
        &["c1"],
        upstream(&upstream_mock.url(), "bearer"),
    )
    .await;

    // An access token issued by A is valid on B.
    let me = r.b.get(&user_token, "/auth/me").await;
    assert_eq!(me.status(), 200);

    // Logout on A: the refresh token is refused by B.
    let pair = r.a.login("carol", "password-123").await;
    let rt = pair["refresh_token"].as_str().expect("refresh").to_owned();
    let resp =
        r.a.client
            .post(r.a.api("/auth/logout"))
            .bearer_auth(pair["access_token"].as_str().expect("access"))
            .json(&json!({ "refresh_token": rt }))
            .send()
            .await
            .expect("logout");
    assert!(resp.status().is_success(), "logout: {}", resp.status());
    expect_error(refresh(&r.b, &rt).await, 401).await;

    // Reuse of a rotated refresh token on B revokes the login everywhere.
    let pair = r.b.login("carol", "password-123").await;
    let rt1 = pair["refresh_token"].as_str().expect("refresh").to_owned();
    let rotated: Value = refresh(&r.a, &rt1).await.json().await.expect("json");
    let rt2 = rotated["refresh_token"]
        .as_str()
        .expect("rotated")
        .to_owned();
    let detail = expect_error(refresh(&r.b, &rt1).await, 401).await;
    assert!(detail.contains("already used"), "{detail}");
    expect_error(refresh(&r.a, &rt2).await, 401).await;

    // A user disabled on A: B refuses the management API at once and the proxy within a second.
    let a = get_via_invoke(&r.b, &user_token, "mine", "/price", json!({"id": 1})).await;
    assert_eq!(a.status, 200, "{}", a.body);
    let users: Value =
        r.a.get(&r.a.admin_token, "/users?page_size=100")
            .await
            .json()
            .await
            .expect("json");
    let carol = users["items"]
        .as_array()
        .expect("items")
        .iter()
        .find(|u| u["username"] == "carol")
        .expect("carol")["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let resp =
        r.a.patch(
            &r.a.admin_token,
            &format!("/users/{carol}"),
            json!({"is_active": false}),
        )
        .await;
    assert_eq!(resp.status(), 200);
    expect_error(r.b.get(&user_token, "/auth/me").await, 401).await;
    let refused = eventually(Duration::from_millis(1_500), || async {
        get_via_invoke(&r.b, &user_token, "mine", "/price", json!({"id": 2}))
            .await
            .status
            == 401
    })
    .await;
    assert!(refused, "B's proxy still serves a user disabled on A");
    // The admin still logs in on both.
    r.b.login(ADMIN, ADMIN_PASSWORD).await;
}

const ROTATION_KEYS: usize = 20;

fn rotation_raw(i: usize) -> String {
    format!("sk-replica-rotation-{i:03}")
}

async fn master_key_rotation_while_both_replicas_run() {
    let r = Arc::new(
        replicas(|c| {
            // Each replica learns a rotated key within a second (well inside the hand-over grace).
            c.vault_poll_secs = 1;
        })
        .await,
    );
    let master = r.a.config.master_key.clone().expect("env master key");
    let old_key =
        MasterKey::from_encoded(secrecy::ExposeSecret::expose_secret(&master)).expect("master key");
    let t = r.a.admin_token.clone();
    let raws: Vec<String> = (0..ROTATION_KEYS).map(rotation_raw).collect();
    let keys: Vec<Value> = (0..ROTATION_KEYS)
        .map(|i| json!({ "identifier": format!("rot{i:03}"), "raw_key": raws[i] }))
        .collect();
    let resp = r.a.post(&t, "/keys/import", json!({ "keys": keys })).await;
    assert_eq!(resp.status(), 201);
    let upstream_mock = mock(&raws.iter().map(String::as_str).collect::<Vec<_>>()).await;
    let idents: Vec<String> = (0..ROTATION_KEYS).map(|i| format!("rot{i:03}")).collect();
    let idents: Vec<&str> = idents.iter().map(String::as_str).collect();
    make_pool(
        &r.a,
        &t,
        "rot",
        &idents,
        upstream(&upstream_mock.url(), "bearer"),
    )
    .await;

    // Both replicas decrypt, proxy and create keys all through the rotation; each key created on
    // one replica is read back (decrypted) on the other.
    let rotated = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for w in 0..2usize {
        let (r, rotated, t) = (r.clone(), rotated.clone(), t.clone());
        workers.push(tokio::spawn(async move {
            let (mine, other) = if w == 0 { (&r.a, &r.b) } else { (&r.b, &r.a) };
            let mut after = 0;
            let mut created = Vec::new();
            for round in 0..100_000usize {
                if rotated.load(Ordering::SeqCst) {
                    after += 1;
                    if after > 5 {
                        break;
                    }
                }
                let resp = mine.get(&t, "/keys/raw?pool_identifier=rot").await;
                assert_eq!(resp.status(), 200, "raw keys during rotation");
                let body: Value = resp.json().await.expect("json");
                for k in body["keys"].as_array().expect("keys") {
                    let i: usize = k["identifier"].as_str().expect("id")[3..]
                        .parse()
                        .expect("index");
                    assert_eq!(k["raw_key"], rotation_raw(i));
                }
                let a = get_via_invoke(mine, &t, "rot", "/price", json!({"id": round})).await;
                assert_eq!(a.status, 200, "proxy during rotation: {}", a.body);
                assert_eq!(a.body["data"]["status_code"], 200, "{}", a.body);
                let ident = format!("w{w}-{round}");
                let raw = format!("sk-made-by-{w}-{round}");
                let resp = mine
                    .post(&t, "/keys", json!({ "identifier": ident, "raw_key": raw }))
                    .await;
                assert_eq!(resp.status(), 201, "create during rotation");
                let back: Value = other
                    .get(&t, &format!("/keys/{ident}/raw"))
                    .await
                    .json()
                    .await
                    .expect("json");
                assert_eq!(back["raw_key"], raw, "read back on the other replica");
                created.push((ident, raw));
            }
            created
        }));
    }
    let db = Db::connect(&r.a.config.effective_database_url(), 2)
        .await
        .expect("db");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let report = vault::rotate_master_key(
        &db,
        &KeySource::Env(vec![old_key.clone()]),
        &RotateOptions {
            // Longer than the replicas' vault poll (1 s), as the defaults are (10 s vs 5 s).
            handoff_grace: Duration::from_secs(3),
            new_key_file: None,
        },
        r.a.clock.now_ms(),
    )
    .await
    .expect("rotation");
    rotated.store(true, Ordering::SeqCst);
    let mut created = Vec::new();
    for w in workers {
        created.extend(w.await.expect("worker"));
    }
    assert_eq!((report.old_version, report.new_version), (1, 2));
    assert!(!created.is_empty());

    // Afterwards: both replicas on version 2, everything decrypts on both, nothing opens with
    // the old key.
    for app in [&r.a, &r.b] {
        assert_eq!(app.state.vault.current_version(), 2);
        let body: Value = app
            .get(&t, "/keys/raw?pool_identifier=rot")
            .await
            .json()
            .await
            .expect("json");
        assert_eq!(body["total"], ROTATION_KEYS);
        for (ident, raw) in created.iter().step_by(7) {
            let back: Value = app
                .get(&t, &format!("/keys/{ident}/raw"))
                .await
                .json()
                .await
                .expect("json");
            assert_eq!(&back["raw_key"], raw);
        }
    }
    assert_eq!(
        vault::count_openable_with(&db, &old_key)
            .await
            .expect("count"),
        0
    );
    // A key made on A after the rotation is proxied by B (decrypted under the new version).
    let fresh_mock = mock(&["sk-after-rotation"]).await;
    add_key(&r.a, &t, "fresh", "sk-after-rotation", None).await;
    make_pool(
        &r.a,
        &t,
        "fresh",
        &["fresh"],
        upstream(&fresh_mock.url(), "bearer"),
    )
    .await;
    let a = get_via_invoke(&r.b, &t, "fresh", "/price", json!({"id": 1})).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.body["data"]["status_code"], 200, "{}", a.body);
}

async fn redis_down(mode: RedisFailMode) -> (TestApp, mock_upstream::MockServer) {
    let (mut config, dir, pg_db) = test_config(Backend::Postgres).await;
    config.redis_url = Some(REDIS_DOWN.to_owned());
    config.redis_on_unavailable = mode;
    let app = start(config, dir, pg_db).await;
    let upstream_mock = mock(&["sk-down-1"]).await;
    let t = app.admin_token.clone();
    add_key(&app, &t, "down1", "sk-down-1", None).await;
    make_pool(
        &app,
        &t,
        "down",
        &["down1"],
        upstream(&upstream_mock.url(), "bearer"),
    )
    .await;
    (app, upstream_mock)
}

async fn redis_down_fail_closed_refuses_calls_with_503() {
    let (app, upstream_mock) = redis_down(RedisFailMode::Closed).await;
    let t = app.admin_token.clone();
    let a = get_via_invoke(&app, &t, "down", "/price", json!({"id": 1})).await;
    assert_eq!(a.status, 503, "{}", a.body);
    let detail = a.body["detail"].as_str().expect("detail");
    assert!(detail.contains("Redis"), "{detail}");
    assert!(
        a.headers.get("retry-after").is_some(),
        "Retry-After missing"
    );
    assert_eq!(upstream_mock.stats().total_requests, 0, "a call went out");
    // The transparent route answers the same way.
    let resp = app
        .client
        .get(app.api("/proxy/down/http/price?id=2"))
        .bearer_auth(&t)
        .send()
        .await
        .expect("request");
    assert!(resp.headers().get("retry-after").is_some());
    let detail = expect_error(resp, 503).await;
    assert!(detail.contains("Redis"), "{detail}");
    // Not ready: a balancer should send traffic elsewhere.
    let resp = app
        .client
        .get(app.url("/ready"))
        .send()
        .await
        .expect("ready");
    assert_eq!(resp.status(), 503);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["redis"], false, "{body}");
    assert_eq!(body["database"], true, "{body}");
}

async fn redis_down_fail_open_serves_from_local_state() {
    let (app, upstream_mock) = redis_down(RedisFailMode::Open).await;
    let t = app.admin_token.clone();
    for i in 0..3 {
        let a = get_via_invoke(&app, &t, "down", "/price", json!({"id": i})).await;
        assert_eq!(a.status, 200, "{}", a.body);
        assert_eq!(a.body["data"]["status_code"], 200, "{}", a.body);
    }
    assert_eq!(upstream_mock.stats().admitted_ok(), 3);
    let logs = captured_logs();
    assert!(
        contains(&logs, "WARN") && contains(&logs, "fail open"),
        "no warning about Redis was logged"
    );
    // Ready (it serves), but says Redis is down.
    let resp = app
        .client
        .get(app.url("/ready"))
        .send()
        .await
        .expect("ready");
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["redis"], false, "{body}");
}

async fn ready_reports_redis_when_configured() {
    let r = replicas_on_redis().await;
    for app in [&r.a, &r.b] {
        let resp = app
            .client
            .get(app.url("/ready"))
            .send()
            .await
            .expect("ready");
        assert_eq!(resp.status(), 200);
        let body: Value = resp.json().await.expect("json");
        assert_eq!(body["redis"], true, "{body}");
    }
}

macro_rules! replica_tests {
    ($($name:ident),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            super::$name().await
        }
    )*};
}

mod two_replicas {
    replica_tests!(
        shared_limits_hold_across_replicas,
        without_redis_the_replicas_overdraw,
        key_disabled_on_a_is_skipped_by_b_within_a_second,
        key_disabled_on_a_is_skipped_by_b_on_redis,
        a_key_enabled_while_out_of_the_pool_rejoins_active,
        pools_changed_on_a_are_applied_by_b,
        revocation_is_seen_by_both_replicas,
        master_key_rotation_while_both_replicas_run,
        redis_down_fail_closed_refuses_calls_with_503,
        redis_down_fail_open_serves_from_local_state,
        ready_reports_redis_when_configured,
    );
}
