use serde_json::{Value, json};

use crate::both_backends;
use crate::helpers::{Backend, expect_error, spawn_app};

both_backends!(
    import_ten_thousand_keys_in_one_request,
    import_is_all_or_nothing,
    batch_import
);

async fn import_ten_thousand_keys_in_one_request(backend: Backend) {
    let app = spawn_app(backend).await;
    let t = app.admin_token.clone();
    let keys: Vec<Value> = (0..10_000)
        .map(|i| {
            json!({
                "identifier": format!("bulk-{i:05}"),
                "raw_key": format!("sk-bulk-{i:05}-{}", "x".repeat(200)),
                "alias": format!("key {i}"),
                "tags": if i % 100 == 0 { json!(["hundreds", "bulk"]) } else { json!(["bulk"]) },
                "client_config": { "base_url": "https://api.example.com" }
            })
        })
        .collect();
    let body = json!({ "keys": keys });
    assert!(
        body.to_string().len() > 3 * 1024 * 1024,
        "larger than the default 2 MiB body limit"
    );
    let started = std::time::Instant::now();
    let r = app.post(&t, "/keys/import", body).await;
    let elapsed = started.elapsed();
    assert_eq!(r.status(), 201);
    let report: Value = r.json().await.unwrap();
    assert_eq!(report["imported"], 10_000);
    assert_eq!(report["results"].as_array().unwrap().len(), 10_000);
    assert_eq!(report["results"][9_999]["identifier"], "bulk-09999");
    eprintln!("import of 10,000 keys ({backend:?}) took {elapsed:?}");
    let page: Value = app
        .get(&t, "/keys?page=500&page_size=20")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(page["total"], 10_000);
    assert_eq!(page["items"][19]["identifier"], "bulk-09999");
    let tagged: Value = app
        .get(&t, "/keys?tag=hundreds")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(tagged["total"], 100);
    // a pool of all of them; the SDK's raw fetch returns every key decrypted
    let idents: Vec<String> = (0..10_000).map(|i| format!("bulk-{i:05}")).collect();
    let r = app
        .post(
            &t,
            "/pools",
            json!({ "identifier": "big", "name": "big", "key_identifiers": idents }),
        )
        .await;
    assert_eq!(r.status(), 201);
    let raw: Value = app
        .get(&t, "/keys/raw?pool_identifier=big")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(raw["total"], 10_000);
    assert_eq!(
        raw["keys"][0]["raw_key"],
        format!("sk-bulk-00000-{}", "x".repeat(200))
    );
    // importing the same rows again is refused row by row, nothing stored
    let again = vec![json!({ "identifier": "bulk-00001", "raw_key": "sk-new-value" })];
    let r = app.post(&t, "/keys/import", json!({ "keys": again })).await;
    expect_error(r, 422).await;
}

async fn import_is_all_or_nothing(backend: Backend) {
    let app = spawn_app(backend).await;
    let t = app.admin_token.clone();
    app.create_key(&t, "existing", "sk-existing-value").await;
    let rows = json!([
        { "identifier": "ok-1", "raw_key": "sk-import-1" },
        { "identifier": "existing", "raw_key": "sk-import-2" },
        { "identifier": "ok-3", "raw_key": "sk-existing-value" },
        { "identifier": "ok-1", "raw_key": "sk-import-4" },
        { "identifier": "x".repeat(200), "raw_key": "sk-import-5" },
        { "identifier": "ok-6", "raw_key": "sk-import-1" },
        { "identifier": "ok-7", "raw_key": "sk-import-7" },
    ]);
    let r = app.post(&t, "/keys/import", json!({ "keys": rows })).await;
    assert_eq!(r.status(), 422);
    let text = r.text().await.unwrap();
    assert!(
        !text.contains("sk-import") && !text.contains("sk-existing"),
        "no raw keys in the report: {text}"
    );
    let body: Value = serde_json::from_str(&text).unwrap();
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("nothing was imported")
    );
    let errors = body["errors"].as_array().unwrap();
    let indexes: Vec<u64> = errors
        .iter()
        .map(|e| e["index"].as_u64().unwrap())
        .collect();
    assert_eq!(indexes, vec![1, 2, 3, 4, 5]);
    assert!(
        errors[3]["detail"]
            .as_str()
            .unwrap()
            .contains("keys[4].identifier"),
        "{errors:?}"
    );
    let l: Value = app.get(&t, "/keys").await.json().await.unwrap();
    assert_eq!(l["total"], 1, "nothing imported");
    expect_error(
        app.post(&t, "/keys/import", json!({ "keys": [] })).await,
        422,
    )
    .await;
    expect_error(
        app.post(&t, "/keys/import", json!({ "rows": [] })).await,
        422,
    )
    .await;
    let too_many: Vec<Value> = (0..10_001)
        .map(|i| json!({ "identifier": format!("t{i}"), "raw_key": "k" }))
        .collect();
    let d = expect_error(
        app.post(&t, "/keys/import", json!({ "keys": too_many }))
            .await,
        422,
    )
    .await;
    assert!(d.starts_with("keys"));
}

async fn batch_import(backend: Backend) {
    let app = spawn_app(backend).await;
    let t = app.admin_token.clone();
    let r = app
        .post(&t, "/keys/batch-import", json!({
            "client_type": "openai",
            "keys": ["sk-batch-1", "sk-batch-2", { "identifier": "named", "raw_key": "sk-batch-3" }]
        }))
        .await;
    assert_eq!(r.status(), 201);
    let text = r.text().await.unwrap();
    assert!(!text.contains("sk-batch"));
    let rep: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(rep["imported"], 3);
    let first = rep["results"][0]["identifier"].as_str().unwrap().to_owned();
    assert!(first.starts_with("openai-"));
    let k: Value = app
        .get(&t, &format!("/keys/{first}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(k["client_config"]["client_type"], "openai");
    let raw: Value = app
        .get(&t, &format!("/keys/{first}/raw"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(raw["raw_key"], "sk-batch-1");
    // the same raw key again: refused as a duplicate
    let r = app
        .post(&t, "/keys/batch-import", json!({ "keys": ["sk-batch-2"] }))
        .await;
    expect_error(r, 422).await;
}
