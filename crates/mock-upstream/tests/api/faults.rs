use std::time::{Duration, Instant};

use mock_upstream::{Config, ConfigPatch};

use crate::helpers::{client, config, json, price, start, status};

#[tokio::test]
async fn failing_key_always_answers_500_and_uses_no_window() {
    let mut cfg = Config {
        rate: 1,
        interval: 60.0,
        ..config(&["k1", "k9"])
    };
    cfg.failing_keys = vec!["k9".parse().expect("key")];
    let server = start(cfg).await;
    let c = client();
    for _ in 0..5 {
        let r = price(&c, &server, "k9", "x").await;
        assert_eq!(r.status(), 500);
        assert_eq!(json(r).await["error"], "upstream_error");
    }
    assert_eq!(status(&c, &server, "k1", "x").await, 200);
    let k9 = server.key_stats("k9").expect("known");
    assert_eq!((k9.errors, k9.admitted, k9.rate_limited), (5, 0, 0));
    assert_eq!(server.stats().status(500), 5);
}

async fn statuses_with_seed(seed: u64) -> Vec<u16> {
    let server = start(Config {
        error_rate: 0.3,
        seed: Some(seed),
        ..config(&["k1"])
    })
    .await;
    let c = client();
    let mut out = Vec::new();
    for i in 0..100 {
        out.push(status(&c, &server, "k1", &i.to_string()).await);
    }
    let errors = out.iter().filter(|&&s| s == 500).count() as u64;
    assert_eq!(server.stats().faults.random_errors, errors);
    assert_eq!(server.key_stats("k1").map(|k| k.errors), Some(errors));
    out
}

#[tokio::test]
async fn error_rate_with_a_seed_is_repeatable() {
    let a = statuses_with_seed(42).await;
    let b = statuses_with_seed(42).await;
    assert_eq!(a, b);
    let errors = a.iter().filter(|&&s| s == 500).count();
    assert!((12..=50).contains(&errors), "{errors} errors at rate 0.3");
    assert!(a.iter().all(|&s| s == 200 || s == 500));
    assert_ne!(a, statuses_with_seed(7).await);
}

#[tokio::test]
async fn error_burst_fails_the_next_n_admitted_requests() {
    let server = start(Config {
        error_burst: 3,
        ..config(&["k1"])
    })
    .await;
    let c = client();
    let mut seen = Vec::new();
    for _ in 0..4 {
        seen.push(status(&c, &server, "k1", "x").await);
    }
    assert_eq!(seen, [500, 500, 500, 200]);
    assert_eq!(server.stats().faults.burst_errors, 3);
    let patch = ConfigPatch {
        error_burst: Some(1),
        ..ConfigPatch::default()
    };
    assert_eq!(server.update(&patch).map(|v| v.error_burst), Ok(1));
    assert_eq!(status(&c, &server, "k1", "x").await, 500);
    assert_eq!(status(&c, &server, "k1", "x").await, 200);
}

#[tokio::test]
async fn latency_applies_after_admission_only() {
    let latency = Duration::from_millis(400);
    let server = start(Config {
        rate: 1,
        interval: 60.0,
        latency_ms: 400,
        ..config(&["k1"])
    })
    .await;
    let c = client();
    // Warm the connection so only the server's delay is measured.
    assert_eq!(status(&c, &server, "nope", "x").await, 401);

    let t = Instant::now();
    assert_eq!(status(&c, &server, "k1", "x").await, 200);
    assert!(t.elapsed() >= latency, "{:?}", t.elapsed());

    // Refusals answer at once: well under the latency, even on a busy machine.
    let t = Instant::now();
    assert_eq!(status(&c, &server, "k1", "x").await, 429);
    assert!(t.elapsed() < latency / 2, "{:?}", t.elapsed());

    let t = Instant::now();
    assert_eq!(status(&c, &server, "nope", "x").await, 401);
    assert!(t.elapsed() < latency / 2, "{:?}", t.elapsed());
}

#[tokio::test]
async fn timeout_rate_hangs_and_shutdown_ends_the_hang() {
    let server = start(Config {
        timeout_rate: 1.0,
        hang_ms: 30_000,
        ..config(&["k1"])
    })
    .await;
    let c = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .expect("client");
    let err = c
        .get(format!("{}/price?id=x", server.url()))
        .bearer_auth("k1")
        .send()
        .await
        .expect_err("the request hangs past the client timeout");
    assert!(err.is_timeout(), "{err:?}");
    assert_eq!(server.stats().faults.timeouts, 1);
    let t = Instant::now();
    server.shutdown().await.expect("clean shutdown");
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
}

#[tokio::test]
async fn reset_rate_drops_the_connection_without_a_response() {
    let server = start(Config {
        reset_rate: 1.0,
        ..config(&["k1"])
    })
    .await;
    let c = client();
    let err = c
        .get(format!("{}/price?id=x", server.url()))
        .bearer_auth("k1")
        .send()
        .await
        .expect_err("the connection is dropped");
    assert!(!err.is_timeout() && err.status().is_none(), "{err:?}");
    let stats = server.stats();
    assert_eq!(stats.faults.resets, 1);
    assert!(stats.by_status.is_empty(), "{:?}", stats.by_status);

    let patch = ConfigPatch {
        reset_rate: Some(0.0),
        ..ConfigPatch::default()
    };
    server.update(&patch).expect("valid patch");
    assert_eq!(status(&c, &server, "k1", "x").await, 200);
}

#[tokio::test]
async fn slow_body_sends_headers_first_then_the_body_slowly() {
    let server = start(Config {
        slow_body_ms: 800,
        ..config(&["k1"])
    })
    .await;
    let c = client();
    let t = Instant::now();
    let resp = price(&c, &server, "k1", "eth").await;
    let headers_at = t.elapsed();
    assert_eq!(resp.status(), 200);
    let body = json(resp).await;
    let body_at = t.elapsed();
    // The body takes 8 pauses of 100 ms; the headers come before the first.
    assert!(headers_at < Duration::from_millis(400), "{headers_at:?}");
    assert!(body_at >= Duration::from_millis(800), "{body_at:?}");
    assert_eq!(body["id"], "eth");
    assert_eq!(server.stats().faults.slow_bodies, 1);
}

#[tokio::test]
async fn daily_quota_answers_402_once_used_up() {
    let server = start(Config {
        daily_quota: Some(2),
        ..config(&["k1", "k2"])
    })
    .await;
    let c = client();
    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.push(status(&c, &server, "k1", "x").await);
    }
    assert_eq!(seen, [200, 200, 402]);
    let r = price(&c, &server, "k1", "x").await;
    let resets_in: u64 = r
        .headers()
        .get("quota-resets-in-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("quota-resets-in-ms");
    assert!(resets_in > 86_000_000, "{resets_in}");
    assert_eq!(json(r).await["error"], "quota_exhausted");
    assert_eq!(status(&c, &server, "k2", "x").await, 200);
    let k1 = server.key_stats("k1").expect("known");
    assert_eq!((k1.admitted, k1.quota_exhausted), (2, 2));
}

#[tokio::test]
async fn error_status_sets_the_status_of_injected_errors() {
    let server = start(Config {
        error_burst: 2,
        error_status: 503,
        ..config(&["k1"])
    })
    .await;
    let c = client();
    let r = price(&c, &server, "k1", "x").await;
    assert_eq!(r.status(), 503);
    assert_eq!(json(r).await["error"], "upstream_error");
    let patch = ConfigPatch {
        error_status: Some(502),
        ..ConfigPatch::default()
    };
    assert_eq!(server.update(&patch).map(|v| v.error_status), Ok(502));
    assert_eq!(status(&c, &server, "k1", "x").await, 502);
    assert_eq!(status(&c, &server, "k1", "x").await, 200);
    let bad = ConfigPatch {
        error_status: Some(404),
        ..ConfigPatch::default()
    };
    assert!(server.update(&bad).is_err(), "only 5xx statuses");
    assert_eq!(server.stats().faults.burst_errors, 2);
}

#[tokio::test]
async fn hanging_and_resetting_keys_fail_only_for_those_keys() {
    let mut cfg = Config {
        hang_ms: 30_000,
        ..config(&["hang", "reset", "good"])
    };
    cfg.hanging_keys = vec!["hang".parse().expect("key")];
    cfg.resetting_keys = vec!["reset".parse().expect("key")];
    let server = start(cfg).await;
    let c = reqwest::Client::builder()
        .timeout(Duration::from_millis(500))
        .build()
        .expect("client");
    let send = |key: &'static str| {
        c.get(format!("{}/price?id=x", server.url()))
            .bearer_auth(key)
            .send()
    };
    let err = send("hang").await.expect_err("hangs");
    assert!(err.is_timeout(), "{err:?}");
    let err = send("reset").await.expect_err("dropped");
    assert!(!err.is_timeout() && err.status().is_none(), "{err:?}");
    assert_eq!(send("good").await.expect("answer").status(), 200);
    let stats = server.stats();
    assert_eq!((stats.faults.timeouts, stats.faults.resets), (1, 1));
    let view = server.settings();
    assert_eq!((view.hanging_keys.len(), view.resetting_keys.len()), (1, 1));
    assert!(!format!("{view:?}").contains("reset\""), "keys are masked");
    // Lists are replaced whole at run time.
    let patch = ConfigPatch {
        hanging_keys: Some(Vec::new()),
        resetting_keys: Some(Vec::new()),
        ..ConfigPatch::default()
    };
    server.update(&patch).expect("valid patch");
    assert_eq!(send("hang").await.expect("answer").status(), 200);
    assert_eq!(send("reset").await.expect("answer").status(), 200);
}

#[tokio::test]
async fn slow_body_can_dribble_byte_by_byte() {
    let server = start(Config {
        slow_body_ms: 600,
        slow_body_chunk_bytes: 1,
        ..config(&["k1"])
    })
    .await;
    let c = client();
    let mut resp = price(&c, &server, "k1", "eth").await;
    assert_eq!(resp.status(), 200);
    let mut chunks = 0;
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.expect("the body arrives") {
        chunks += 1;
        body.extend_from_slice(&chunk);
    }
    let v: serde_json::Value = serde_json::from_slice(&body).expect("the whole JSON body");
    assert_eq!(v["id"], "eth");
    // One write per byte (the client may merge a few, never most).
    assert!(
        chunks > body.len() / 2,
        "{chunks} chunks for {} bytes",
        body.len()
    );
    assert_eq!(server.settings().slow_body_chunk_bytes, 1);
}

#[tokio::test]
async fn truncate_rate_cuts_the_body_off_half_way() {
    let server = start(Config {
        truncate_rate: 1.0,
        ..config(&["k1"])
    })
    .await;
    let c = client();
    let resp = price(&c, &server, "k1", "eth").await;
    assert_eq!(resp.status(), 200, "headers arrive");
    let announced = resp.content_length().expect("a Content-Length");
    let err = resp.bytes().await.expect_err("the body is cut off");
    assert!(err.is_body() || err.is_decode(), "{err:?}");
    assert!(announced > 0);
    assert_eq!(server.stats().faults.truncated, 1);
    let patch = ConfigPatch {
        truncate_rate: Some(0.0),
        ..ConfigPatch::default()
    };
    server.update(&patch).expect("valid patch");
    assert_eq!(
        json(price(&c, &server, "k1", "eth").await).await["id"],
        "eth"
    );
}
