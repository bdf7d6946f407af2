//! Two replicas on one PostgreSQL database behave as one server: changes applied by the other
//! replica's live engines within a second, token revocation seen by both, master-key rotation
//! while both run.
//!
//! Each test gets a fresh PostgreSQL database. The replicas are two `Application`s in this process
//! that share nothing but the database (and the master key, given to both as `APIPOOL_MASTER_KEY`
//! would be).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use apipool_server::clock::Clock;
use apipool_server::config::Config;
use apipool_server::db::Db;
use apipool_server::vault::{self, KeySource, MasterKey, RotateOptions};
use secrecy::SecretString;
use serde_json::{Value, json};

use crate::helpers::{ADMIN, ADMIN_PASSWORD, Backend, TestApp, expect_error, start, test_config};
use crate::proxy_helpers::{
    add_key, eventually, get_via_invoke, key_health, make_pool, mock, status, upstream,
};

/// Two replicas on a fresh PostgreSQL database; `a` owns (and drops) the database, so it is
/// declared last (dropped after `b`).
struct Replicas {
    b: TestApp,
    a: TestApp,
}

async fn replicas(tweak: impl Fn(&mut Config)) -> Replicas {
    let (mut config, dir, pg_db) = test_config(Backend::Postgres).await;
    let master = MasterKey::generate();
    config.master_key = Some(SecretString::from(master.encode().to_string()));
    tweak(&mut config);
    let a = start(config.clone(), dir, pg_db).await;
    // Same database, same master key (nothing is kept in the data directory).
    let b = start(config, tempfile::tempdir().expect("tempdir"), None).await;
    Replicas { a, b }
}

async fn key_disabled_on_a_is_skipped_by_b_within_a_second() {
    let r = replicas(|_| {}).await;
    let upstream_mock = mock(&["sk-dis-1", "sk-dis-2"]).await;
    let t = r.a.admin_token.clone();
    add_key(&r.a, &t, "d1", "sk-dis-1", None).await;
    add_key(&r.a, &t, "d2", "sk-dis-2", None).await;
    make_pool(
        &r.a,
        &t,
        "dis",
        &["d1", "d2"],
        upstream(&upstream_mock.url(), "bearer"),
    )
    .await;
    // Both engines are live.
    for app in [&r.a, &r.b] {
        let a = get_via_invoke(app, &t, "dis", "/price", json!({"id": "warm"})).await;
        assert_eq!(a.status, 200, "{}", a.body);
    }
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
        key_disabled_on_a_is_skipped_by_b_within_a_second,
        pools_changed_on_a_are_applied_by_b,
        revocation_is_seen_by_both_replicas,
        master_key_rotation_while_both_replicas_run,
    );
}
