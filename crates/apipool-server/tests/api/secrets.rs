//! No plaintext key bytes in the database file, the logs (debug level) or any response except the
//! raw-key endpoints.

use serde_json::json;

use crate::both_backends;
use crate::helpers::{Backend, captured_logs, contains, spawn_app};

both_backends!(no_plaintext_keys_in_db_logs_or_responses);

const SECRETS: [&str; 3] = [
    "sk-plaintext-canary-AAAA1111",
    "sk-plaintext-canary-BBBB2222",
    "sk-plaintext-canary-CCCC3333",
];

async fn no_plaintext_keys_in_db_logs_or_responses(backend: Backend) {
    let app = spawn_app(backend).await;
    let t = app.admin_token.clone();
    let mut bodies: Vec<String> = Vec::new();
    let r = app
        .post(
            &t,
            "/keys",
            json!({ "identifier": "canary-a", "raw_key": SECRETS[0], "tags": ["c"] }),
        )
        .await;
    bodies.push(r.text().await.unwrap());
    let r = app
        .post(
            &t,
            "/keys/import",
            json!({ "keys": [{ "identifier": "canary-b", "raw_key": SECRETS[1] }] }),
        )
        .await;
    bodies.push(r.text().await.unwrap());
    let r = app
        .patch(
            &t,
            "/keys/canary-b/rotate",
            json!({ "new_raw_key": SECRETS[2] }),
        )
        .await;
    bodies.push(r.text().await.unwrap());
    // errors that involve a key value
    let r = app
        .post(
            &t,
            "/keys",
            json!({ "identifier": "dup", "raw_key": SECRETS[0] }),
        )
        .await;
    bodies.push(r.text().await.unwrap());
    let r = app
        .post(
            &t,
            "/keys",
            json!({ "identifier": "x".repeat(300), "raw_key": SECRETS[0] }),
        )
        .await;
    bodies.push(r.text().await.unwrap());
    let r = app.post(&t, "/pools", json!({ "identifier": "cp", "name": "cp", "key_identifiers": ["canary-a", "canary-b"] })).await;
    bodies.push(r.text().await.unwrap());
    for path in [
        "/keys",
        "/keys/canary-a",
        "/keys/export",
        "/pools/cp",
        "/pools/cp/config",
        "/pools/cp/status",
        "/keys?search=canary",
    ] {
        bodies.push(app.get(&t, path).await.text().await.unwrap());
    }
    for b in &bodies {
        for s in SECRETS {
            assert!(!b.contains(s), "a response leaked a raw key: {b}");
        }
    }
    // the raw endpoints do return them (so the canaries really went through the server)
    let raw = app
        .get(&t, "/keys/raw?pool_identifier=cp")
        .await
        .text()
        .await
        .unwrap();
    assert!(raw.contains(SECRETS[0]) && raw.contains(SECRETS[2]));
    assert!(!raw.contains(SECRETS[1]), "rotated away");

    // database bytes: every file of the SQLite database (main file and WAL)
    if backend == Backend::Sqlite {
        let _ = sqlx::query("PRAGMA wal_checkpoint(FULL)")
            .execute(&app.state.db.pool)
            .await;
        let mut files = 0;
        for entry in std::fs::read_dir(&app.config.data_dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            if name.starts_with("apipool.db") {
                files += 1;
                let bytes = std::fs::read(&path).unwrap();
                for s in SECRETS {
                    assert!(!contains(&bytes, s), "{name} contains a raw key");
                }
                assert!(
                    contains(&bytes, "canary-a") || name != "apipool.db",
                    "identifiers are stored in clear"
                );
            }
        }
        assert!(files >= 1);
    } else {
        // PostgreSQL: search every text/bytea column of the key tables
        let rows: Vec<(String,)> = sqlx::query_as(
            "SELECT CAST(t.* AS TEXT) FROM api_keys t UNION ALL SELECT CAST(s.* AS TEXT) FROM vault_secrets s \
             UNION ALL SELECT CAST(a.* AS TEXT) FROM api_key_tags a",
        )
        .fetch_all(&app.state.db.pool)
        .await
        .unwrap();
        assert!(!rows.is_empty());
        for (row,) in rows {
            for s in SECRETS {
                let hex: String = s.bytes().map(|b| format!("{b:02x}")).collect();
                assert!(
                    !row.contains(s) && !row.contains(&hex),
                    "a row holds a raw key"
                );
            }
        }
    }
    // logs at debug level
    let logs = captured_logs();
    assert!(contains(&logs, "request"), "logs were captured");
    for s in SECRETS {
        assert!(!contains(&logs, s), "the logs contain a raw key");
    }
    assert!(
        !contains(&logs, crate::helpers::ADMIN_PASSWORD),
        "the logs contain a password"
    );
    assert!(!contains(&logs, &t), "the logs contain an access token");
}
