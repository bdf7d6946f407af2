//! Master-key rotation while requests run: every key still decrypts, the old master key no
//! longer opens anything.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use apipool_server::clock::Clock;
use apipool_server::db::Db;
use apipool_server::startup::Application;
use apipool_server::vault::{self, KeySource, MasterKey, RotateOptions};
use secrecy::SecretString;
use serde_json::{Value, json};

use crate::both_backends;
use crate::helpers::{Backend, spawn_app_with, start};

both_backends!(rotate_master_key_while_requests_run);

const N: usize = 60;

fn raw_for(i: usize) -> String {
    format!("sk-rotation-{i:03}-secret")
}

async fn rotate_master_key_while_requests_run(backend: Backend) {
    // SQLite: the zero set-up key file; PostgreSQL: the key given in the environment.
    let env_key = MasterKey::generate();
    let env_text = env_key.encode().to_string();
    let app = spawn_app_with(backend, |c| {
        if backend == Backend::Postgres {
            c.master_key = Some(SecretString::from(env_text.clone()));
        }
    })
    .await;
    let key_file = app.config.effective_master_key_file();
    let (old_key, source) = match backend {
        Backend::Sqlite => {
            let keys = vault::read_key_file(&key_file).unwrap();
            assert_eq!(keys.len(), 1);
            (keys[0].clone(), KeySource::File(key_file.clone()))
        }
        Backend::Postgres => (env_key.clone(), KeySource::Env(vec![env_key.clone()])),
    };
    let t = app.admin_token.clone();
    let keys: Vec<Value> = (0..N)
        .map(|i| json!({ "identifier": format!("rk{i:03}"), "raw_key": raw_for(i) }))
        .collect();
    assert_eq!(
        app.post(&t, "/keys/import", json!({ "keys": keys }))
            .await
            .status(),
        201
    );
    let idents: Vec<String> = (0..N).map(|i| format!("rk{i:03}")).collect();
    app.post(
        &t,
        "/pools",
        json!({ "identifier": "all", "name": "all", "key_identifiers": idents }),
    )
    .await;
    assert_eq!(old_key.check_value().len(), 64);
    assert_eq!(
        vault::count_openable_with(&app.state.db, &old_key)
            .await
            .unwrap(),
        N as u64 + 2
    );

    // requests keep running during the rotation
    let app = Arc::new(app);
    let rotated = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for w in 0..3 {
        let (app, rotated, ok, t) = (app.clone(), rotated.clone(), ok.clone(), t.clone());
        workers.push(tokio::spawn(async move {
            let mut after = 0;
            let mut created = 0;
            for round in 0..10_000 {
                if rotated.load(Ordering::SeqCst) {
                    after += 1;
                    if after > 5 {
                        break;
                    }
                }
                let r = app.get(&t, "/keys/raw?pool_identifier=all").await;
                assert_eq!(r.status(), 200, "raw keys during rotation");
                let body: Value = r.json().await.unwrap();
                for k in body["keys"].as_array().unwrap() {
                    let i: usize = k["identifier"].as_str().unwrap()[2..].parse().unwrap();
                    assert_eq!(k["raw_key"], raw_for(i));
                }
                if round % 3 == 0 {
                    let ident = format!("w{w}-{created}");
                    let raw = format!("sk-worker-{w}-{created}");
                    created += 1;
                    let r = app
                        .post(&t, "/keys", json!({ "identifier": ident, "raw_key": raw }))
                        .await;
                    assert_eq!(r.status(), 201, "create during rotation");
                    let back: Value = app
                        .get(&t, &format!("/keys/{ident}/raw"))
                        .await
                        .json()
                        .await
                        .unwrap();
                    assert_eq!(back["raw_key"], raw);
                }
                ok.fetch_add(1, Ordering::SeqCst);
            }
            created
        }));
    }
    // the rotation runs like `apipool vault rotate-master-key`: its own connection pool
    let db = Db::connect(&app.config.effective_database_url(), 2)
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let report = vault::rotate_master_key(
        &db,
        &source,
        &RotateOptions {
            // As in production (default 10 s), the hand-over stays readable long enough for requests
            // already sealing under the old key to commit before the final sweep.
            handoff_grace: std::time::Duration::from_secs(1),
            new_key_file: None,
        },
        app.clock.now_ms(),
    )
    .await
    .unwrap();
    rotated.store(true, Ordering::SeqCst);
    let mut created_total = 0;
    for w in workers {
        created_total += w.await.expect("worker succeeded");
    }
    assert!(ok.load(Ordering::SeqCst) > 0);
    assert_eq!(report.old_version, 1);
    assert_eq!(report.new_version, 2);
    assert!(report.rewrapped >= N as u64 + 2);

    // every key still decrypts
    let body: Value = app
        .get(&t, "/keys/raw?pool_identifier=all")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(body["total"], N);
    let listed: Value = app.get(&t, "/keys?page_size=1").await.json().await.unwrap();
    let total = listed["total"].as_u64().unwrap();
    assert_eq!(total, (N + created_total) as u64);
    let csv = app
        .get(&t, "/keys/export?include_raw=true")
        .await
        .text()
        .await
        .unwrap();
    assert_eq!(csv.lines().count() as u64, total + 1);

    // the old master key opens nothing; the new one opens everything
    assert_eq!(vault::count_openable_with(&db, &old_key).await.unwrap(), 0);
    let new_key = match backend {
        Backend::Sqlite => {
            let keys = vault::read_key_file(&key_file).unwrap();
            assert_eq!(keys.len(), 1, "the key file holds only the new key");
            assert!(report.new_key_base64.is_none());
            keys[0].clone()
        }
        Backend::Postgres => MasterKey::from_encoded(
            report
                .new_key_base64
                .as_ref()
                .expect("printed for env mode"),
        )
        .unwrap(),
    };
    assert_ne!(new_key.check_value(), old_key.check_value());
    assert_eq!(
        vault::count_openable_with(&db, &new_key).await.unwrap(),
        total + 2
    );
    // the server can still create keys under the new version
    app.create_key(&t, "after-rotation", "sk-after-rotation")
        .await;
    assert_eq!(app.state.vault.current_version(), 2);

    // a restart with the old key is refused and says why; with the new key it works
    let app = Arc::into_inner(app).expect("workers finished");
    let (mut config, dir, pg) = app.stop();
    let old_file = dir.path().join("old.key");
    vault::write_key_file(&old_file, std::slice::from_ref(&old_key), true).unwrap();
    let mut with_old = config.clone();
    with_old.master_key = None;
    with_old.master_key_file = Some(old_file);
    let err = Application::build(with_old)
        .await
        .expect_err("old key must be refused");
    assert!(format!("{err:#}").contains("retired"), "{err:#}");
    if backend == Backend::Postgres {
        config.master_key = Some(SecretString::from(new_key.encode().to_string()));
    }
    let again = start(config, dir, pg).await;
    let raw: Value = again
        .get(&again.admin_token, "/keys/rk007/raw")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(raw["raw_key"], raw_for(7));
}
