//! The client side of server mode against a wiremock stand-in speaking the wire protocol
//! (PROTOCOL.md): the remote proxy handle (invoke/call/status/http, typed errors, a failed call
//! never kills the handle, use with call_concurrent and batch_exec, 401 → one refresh) and the
//! stats uploader (batches, at-least-once with de-duplication ids).

use apipool::sdk::{
    self, RemoteClassifier, SdkError, Session, SessionOptions, StatsUploader, UploadOptions,
};
use apipool::{ApiKeyManager, BatchOptions, KeyState, StatsSink};
use serde_json::{Value, json};
use std::collections::HashSet;
use std::time::Duration;
use wiremock::matchers::{body_partial_json, header, method, path};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

fn session(server: &MockServer) -> Session {
    Session::from_tokens(
        &server.uri(),
        "access-1",
        "refresh-1",
        None,
        SessionOptions::new(),
    )
    .expect("session")
}

/// Answers invoke calls like the server: echoes the id param, fails for id "bad" (success:false)
/// and answers 503 for id "nokey".
struct InvokeResponder;

impl Respond for InvokeResponder {
    fn respond(&self, req: &Request) -> ResponseTemplate {
        let body: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
        let id = body["kwargs"]["params"]["id"]
            .as_str()
            .unwrap_or("")
            .to_owned();
        match id.as_str() {
            "nokey" => ResponseTemplate::new(503).set_body_json(json!({"detail": "no usable key in pool 'prices'"})),
            "bad" => ResponseTemplate::new(200).set_body_json(json!({
                "success": false, "data": null, "error": "upstream said no", "key_identifier": "k1",
                "pool_available": 1, "pool_total": 2
            })),
            _ => ResponseTemplate::new(200).set_body_json(json!({
                "success": true,
                "data": {"_type": "httpx.Response", "status_code": 200, "headers": {}, "data": {"id": id, "attr_path": body["attr_path"]}},
                "error": null, "key_identifier": "k1", "pool_available": 2, "pool_total": 2
            })),
        }
    }
}

async fn proxy_server() -> MockServer {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/api/v1/proxy/prices/invoke"))
        .and(header("authorization", "Bearer access-1"))
        .respond_with(InvokeResponder)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/api/v1/proxy/nope/invoke"))
        .respond_with(
            ResponseTemplate::new(404).set_body_json(json!({"detail": "pool 'nope' not found"})),
        )
        .mount(&server)
        .await;
    server
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invoke_call_and_typed_errors() {
    let server = proxy_server().await;
    let s = session(&server);
    let remote = sdk::async_connect(&s, "prices").await.expect("connect");
    assert!(
        server
            .received_requests()
            .await
            .unwrap_or_default()
            .is_empty(),
        "connect sends nothing"
    );

    let data = remote
        .ainvoke(
            &["get"],
            json!(["/price"]),
            json!({"params": {"id": "btc"}}),
        )
        .await
        .expect("invoke");
    assert_eq!(data["status_code"], 200);
    assert_eq!(data["data"]["id"], "btc");
    assert_eq!(data["data"]["attr_path"], json!(["get"]));
    let data = remote
        .client()
        .acall("a.b.c", Value::Null, json!({"params": {"id": "eth"}}))
        .await
        .expect("call");
    assert_eq!(data["data"]["attr_path"], json!(["a", "b", "c"]));

    let failed = remote
        .ainvoke(&["get"], json!([]), json!({"params": {"id": "bad"}}))
        .await
        .unwrap_err();
    assert!(
        matches!(&failed, SdkError::Remote { error, key_identifier: Some(k), .. } if error == "upstream said no" && k == "k1"),
        "{failed:?}"
    );
    let nokey = remote
        .ainvoke(&["get"], json!([]), json!({"params": {"id": "nokey"}}))
        .await
        .unwrap_err();
    assert!(
        matches!(
            nokey,
            SdkError::Unavailable {
                status: Some(503),
                ..
            }
        ),
        "{nokey:?}"
    );
    // Failed calls leave the handle as good as new.
    let again = remote
        .ainvoke(&["get"], json!([]), json!({"params": {"id": "sol"}}))
        .await
        .expect("still alive");
    assert_eq!(again["data"]["id"], "sol");

    let other = sdk::connect(&s, "nope").expect("connect");
    let e = other
        .ainvoke(&["get"], json!([]), json!({}))
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(404));
    assert!(sdk::connect(&s, " ").is_err());

    // The sync handle works from inside a runtime too.
    let sync = remote
        .invoke(&["get"], json!([]), json!({"params": {"id": "ada"}}))
        .expect("sync invoke");
    assert_eq!(sync["data"]["id"], "ada");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usable_with_call_concurrent_and_batch_exec() {
    let server = proxy_server().await;
    let remote = sdk::connect(&session(&server), "prices").expect("connect");
    let ids: Vec<String> = (0..30)
        .map(|i| match i % 10 {
            3 => "bad".to_owned(),
            7 => "nokey".to_owned(),
            _ => format!("coin-{i}"),
        })
        .collect();

    // Sync, threads.
    let results = remote
        .call_concurrent(
            &ids,
            |proxy, id| proxy.invoke(&["get"], json!([]), json!({"params": {"id": id}})),
            BatchOptions::new().concurrency(6),
        )
        .expect("run");
    assert_eq!(results.len(), 30);
    let ok = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(ok, 24, "6 failures out of 30");
    for (id, r) in ids.iter().zip(&results) {
        if let Ok(v) = r {
            assert_eq!(&v["data"]["id"], id);
        }
    }
    // No failure banned or cooled the local slot.
    let slot = remote.key_reports();
    assert_eq!(slot.len(), 1);
    assert_eq!(slot[0].state, KeyState::Active);

    // Async batch with the remote classifier.
    let batch = remote
        .abatch_exec(
            ids.iter().cloned().enumerate(),
            &RemoteClassifier,
            |kc, id| async move {
                kc.client()
                    .ainvoke(&["get"], json!([]), json!({"params": {"id": id}}))
                    .await
            },
            BatchOptions::new().concurrency(8),
        )
        .await
        .expect("batch");
    assert_eq!(batch.succeeded, 24);
    assert_eq!(batch.failed, 6);
    assert!(batch.banned_keys.is_empty());
    assert_eq!(remote.available_count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_401_renews_the_token_once_and_retries() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/api/v1/proxy/prices/invoke"))
        .and(header("authorization", "Bearer access-1"))
        .respond_with(
            ResponseTemplate::new(401).set_body_json(json!({"detail": "access token expired"})),
        )
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/api/v1/auth/refresh"))
        .and(body_partial_json(json!({"refresh_token": "refresh-1"})))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "access_token": "access-2", "refresh_token": "refresh-2", "token_type": "bearer", "expires_in": 900
        })))
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/api/v1/proxy/prices/invoke"))
        .and(header("authorization", "Bearer access-2"))
        .respond_with(InvokeResponder)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/api/v1/proxy/prices/http/v1/price"))
        .and(header("authorization", "Bearer access-2"))
        .respond_with(ResponseTemplate::new(429).insert_header("retry-after", "3"))
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/api/v1/proxy/prices/status"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "success": true, "data": {"available_keys": 2, "archived_keys": 1, "total_keys": 3},
            "pool_available": 2, "pool_total": 3
        })))
        .mount(&server)
        .await;
    let s = session(&server);
    let proxy = sdk::RemoteProxy::new(&s, "prices");
    let data = proxy
        .ainvoke(&["get"], json!([]), json!({"params": {"id": "btc"}}))
        .await
        .expect("invoke after renewal");
    assert_eq!(data["data"]["id"], "btc");
    assert_eq!(s.refresh_count(), 1);
    use secrecy::ExposeSecret;
    assert_eq!(s.refresh_token().expose_secret(), "refresh-2");

    // The transparent HTTP route passes the upstream's answer through, whatever its status.
    let resp = proxy
        .http(reqwest::Method::GET, "/v1/price")
        .query(&[("id", "btc")])
        .send()
        .await
        .expect("http");
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["retry-after"], "3");
    let st = proxy.astatus().await.expect("status");
    assert!(st.success);
    assert_eq!(
        (st.available_keys, st.archived_keys, st.total_keys),
        (2, 1, 3)
    );
}

fn event(i: usize) -> apipool::CallEvent {
    apipool::CallEvent {
        key_identifier: format!("k{}", i % 3).into(),
        status: apipool::CallStatus::Success,
        latency: Duration::from_millis(10),
        method: Some("GET /price".into()),
        finished_at: std::time::SystemTime::now(),
        pool: None,
        dedup_id: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_upload_is_at_least_once_without_double_counting() {
    let server = MockServer::start().await;
    // The first attempt fails after the server may have stored it; the retry must resend the
    // same ids so the server can store each event once.
    Mock::given(method("POST"))
        .and(path("/api/v1/stats/report"))
        .respond_with(ResponseTemplate::new(503).set_body_json(json!({"detail": "database busy"})))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/api/v1/stats/report"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"accepted": 0})))
        .with_priority(2)
        .mount(&server)
        .await;
    let s = session(&server);
    let up = StatsUploader::start(
        &s,
        "prices",
        UploadOptions::new()
            .batch_size(4)
            .interval(Duration::from_secs(3600))
            .flush_when_full(false)
            .client_id("test-client"),
    );
    // Events come from a real pool's calls.
    let pool = ApiKeyManager::builder()
        .keys([apipool::http::HttpKey::bearer("k-secret-1")])
        .stats(up.clone())
        .build()
        .expect("pool");
    for _ in 0..6 {
        pool.call(|_| Ok::<_, std::io::Error>(())).expect("call");
    }
    for i in 0..4 {
        up.record(event(i));
    }
    let first = up.aflush().await.unwrap_err();
    assert_eq!(first.status(), Some(503));
    assert_eq!(up.stats().queued, 10, "nothing is lost on a failure");
    up.aflush().await.expect("second flush");
    let st = up.stats();
    assert_eq!((st.uploaded, st.queued, st.failed_attempts), (10, 0, 1));

    let requests = server.received_requests().await.expect("recording");
    let bodies: Vec<Value> = requests
        .iter()
        .map(|r| serde_json::from_slice(&r.body).expect("json"))
        .collect();
    assert_eq!(bodies.len(), 4, "1 failed + 3 batches of at most 4");
    let ids = |b: &Value| -> Vec<String> {
        b["events"]
            .as_array()
            .expect("events")
            .iter()
            .map(|e| e["dedup_id"].as_str().expect("dedup_id").to_owned())
            .collect()
    };
    assert_eq!(
        ids(&bodies[0]),
        ids(&bodies[1]),
        "the retry resends the same ids"
    );
    let all: Vec<String> = bodies[1..].iter().flat_map(ids).collect();
    assert_eq!(all.len(), 10);
    assert_eq!(
        all.iter().collect::<HashSet<_>>().len(),
        10,
        "one id per event"
    );
    for b in &bodies {
        assert_eq!(b["pool_identifier"], "prices");
        assert_eq!(b["client_id"], "test-client");
        assert!(!b.to_string().contains("k-secret-1"), "no raw key in stats");
    }
    assert_eq!(bodies[1]["events"][0]["status"], "success");
    up.ashutdown().await;
}
