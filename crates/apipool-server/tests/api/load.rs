//! The short CI version of the load run: 200 concurrent clients for 10 s through the
//! transparent proxy route to mock-upstream (no limits, so every non-2xx would be ours).
//! The long runs (1,000 clients × 60 s, a 10-minute soak with memory samples) use the same
//! generator: `crates/apipool-server/benches/proxy-load.sh clients N SECONDS`.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use serde_json::json;

use crate::helpers::{Backend, spawn_app};
use crate::proxy_helpers::{add_key, make_pool, mock};

#[path = "../../examples/proxy_load/load.rs"]
mod generator;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_clients_for_ten_seconds_get_no_error_from_us() {
    let app = spawn_app(Backend::Sqlite).await;
    let t = app.admin_token.clone();
    let raws: Vec<String> = (0..10).map(|i| format!("load-key-{i:02}")).collect();
    let up = mock(&raws.iter().map(String::as_str).collect::<Vec<_>>()).await;
    let mut members = Vec::new();
    for (i, raw) in raws.iter().enumerate() {
        let id = format!("k{i}");
        add_key(&app, &t, &id, raw, None).await;
        members.push(id);
    }
    let members: Vec<&str> = members.iter().map(String::as_str).collect();
    make_pool(
        &app,
        &t,
        "load",
        &members,
        json!({"upstream": {"base_url": up.url()}, "rotation_strategy": "round_robin"}),
    )
    .await;
    let spec = generator::LoadSpec {
        url: app.api("/proxy/load/http/price?id=btc"),
        token: t.clone(),
        clients: 200,
        duration: Duration::from_secs(10),
        timeout: Duration::from_secs(30),
    };
    let report = generator::run(&spec, Arc::new(AtomicU64::new(0)))
        .await
        .expect("the load runs");
    eprintln!("{}", serde_json::to_string(&report).expect("json"));
    assert_eq!(report.errors(), 0, "{report:?}");
    assert!(report.requests > 200, "{report:?}");
    // Every answer the clients saw was the upstream's, and each is one stats event.
    let ok = report.by_status.get(&200).copied().unwrap_or(0);
    assert_eq!(up.stats().admitted_ok(), ok);
    let r = app.get(&t, "/stats/load/usage?seconds=3600").await;
    assert_eq!(r.status(), 200);
    let usage: serde_json::Value = r.json().await.expect("json");
    assert_eq!(usage["total"].as_u64(), Some(ok), "{usage}");
}
