use std::time::{Duration, Instant};

use futures::future::join_all;
use mock_upstream::Config;

use crate::helpers::{client, config, header, json, price, start, status};

fn limited(keys: &[&str], rate: u32, interval: f64) -> Config {
    Config {
        rate,
        interval,
        ..config(keys)
    }
}

#[tokio::test]
async fn five_pass_then_429_with_both_retry_headers() {
    let server = start(limited(&["k1"], 5, 1.0)).await;
    let c = client();
    let first = Instant::now();
    for _ in 0..5 {
        assert_eq!(status(&c, &server, "k1", "btc").await, 200);
    }
    let resp = price(&c, &server, "k1", "btc").await;
    let elapsed = first.elapsed();
    assert_eq!(resp.status(), 429);
    assert_eq!(header(&resp, "retry-after"), Some("1"));
    let ms: u64 = header(&resp, "retry-after-ms")
        .expect("retry-after-ms is set")
        .parse()
        .expect("an integer");
    // The oldest admission happened after `first`, so it leaves the window within 1 s of it.
    assert!(ms <= 1000, "{ms}");
    assert!(
        u128::from(ms) + elapsed.as_millis() >= 1000,
        "{ms} ms + {elapsed:?}"
    );
    let body = json(resp).await;
    assert_eq!(body["error"], "rate_limited");
    assert_eq!(body["retry_after_ms"], ms);

    let k = server.key_stats("k1").expect("known");
    assert_eq!((k.admitted, k.admitted_ok, k.rate_limited), (5, 5, 1));
}

#[tokio::test]
async fn retry_after_is_rounded_up_to_whole_seconds() {
    let server = start(limited(&["k1"], 1, 2.5)).await;
    let c = client();
    let first = Instant::now();
    assert_eq!(status(&c, &server, "k1", "a").await, 200);
    let resp = price(&c, &server, "k1", "a").await;
    let elapsed = first.elapsed();
    assert_eq!(resp.status(), 429);
    let ms: u64 = header(&resp, "retry-after-ms")
        .and_then(|v| v.parse().ok())
        .expect("retry-after-ms");
    assert!(
        ms <= 2500 && u128::from(ms) + elapsed.as_millis() >= 2500,
        "{ms}"
    );
    let secs = ms.div_ceil(1000).to_string();
    assert_eq!(header(&resp, "retry-after"), Some(secs.as_str()));
    // Unless the machine stalled for half a second, that is 3 (2.5 s rounded up).
    if elapsed < Duration::from_millis(500) {
        assert_eq!(secs, "3");
    }
}

/// A short real-time check: waiting exactly retry-after-ms is enough.
#[tokio::test]
async fn waiting_retry_after_ms_is_enough() {
    let server = start(limited(&["k1"], 2, 0.3)).await;
    let c = client();
    assert_eq!(status(&c, &server, "k1", "a").await, 200);
    assert_eq!(status(&c, &server, "k1", "a").await, 200);
    let resp = price(&c, &server, "k1", "a").await;
    assert_eq!(resp.status(), 429);
    let ms: u64 = header(&resp, "retry-after-ms")
        .and_then(|v| v.parse().ok())
        .expect("retry-after-ms");
    assert!(ms <= 300, "{ms}");
    tokio::time::sleep(Duration::from_millis(ms)).await;
    assert_eq!(status(&c, &server, "k1", "a").await, 200);
}

#[tokio::test]
async fn keys_have_independent_windows() {
    let server = start(limited(&["k1", "k2"], 2, 60.0)).await;
    let c = client();
    let mut seen = Vec::new();
    for key in ["k1", "k1", "k1", "k2", "k2", "k2"] {
        seen.push(status(&c, &server, key, "x").await);
    }
    assert_eq!(seen, [200, 200, 429, 200, 200, 429]);
}

#[tokio::test]
async fn rate_zero_is_unlimited() {
    let server = start(limited(&["k1"], 0, 1.0)).await;
    let c = client();
    for _ in 0..200 {
        assert_eq!(status(&c, &server, "k1", "x").await, 200);
    }
    assert_eq!(server.stats().rate_limited(), 0);
}

/// Under 50-way concurrency the window still admits exactly `rate` per key.
#[tokio::test]
async fn concurrent_requests_admit_exactly_rate_per_key() {
    let keys: Vec<String> = (1..=10).map(|i| format!("key-{i}")).collect();
    let key_refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    let server = start(limited(&key_refs, 20, 60.0)).await;
    let c = client();
    let url = format!("{}/price", server.url());
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(50));
    let requests = (0..1000).map(|i| {
        let (c, url, sem) = (c.clone(), url.clone(), sem.clone());
        let key = keys[i % keys.len()].clone();
        async move {
            let _permit = sem.acquire().await.expect("open semaphore");
            c.get(url)
                .query(&[("id", i.to_string())])
                .bearer_auth(key)
                .send()
                .await
                .expect("answer")
                .status()
                .as_u16()
        }
    });
    let statuses = join_all(requests).await;
    assert_eq!(statuses.iter().filter(|&&s| s == 200).count(), 200);
    assert_eq!(statuses.iter().filter(|&&s| s == 429).count(), 800);
    let stats = server.stats();
    assert!(
        stats
            .keys
            .iter()
            .all(|k| k.admitted_ok == 20 && k.rate_limited == 80)
    );
    assert_eq!(stats.ids.len(), 200);
    assert!(stats.ids.values().all(|&n| n == 1));
}

#[tokio::test]
async fn ratelimit_headers_are_off_by_default() {
    let server = start(limited(&["k1"], 1, 60.0)).await;
    let c = client();
    let ok = price(&c, &server, "k1", "x").await;
    let limited = price(&c, &server, "k1", "x").await;
    for r in [&ok, &limited] {
        assert!(header(r, "x-ratelimit-limit").is_none());
        assert!(header(r, "x-ratelimit-remaining").is_none());
    }
}

#[tokio::test]
async fn ratelimit_headers_count_down_when_enabled() {
    let server = start(Config {
        ratelimit_headers: true,
        ..limited(&["k1"], 3, 1.0)
    })
    .await;
    let c = client();
    for expected in ["2", "1", "0"] {
        let r = price(&c, &server, "k1", "x").await;
        assert_eq!(r.status(), 200);
        assert_eq!(header(&r, "x-ratelimit-limit"), Some("3"));
        assert_eq!(header(&r, "x-ratelimit-remaining"), Some(expected));
    }
    let r = price(&c, &server, "k1", "x").await;
    assert_eq!(r.status(), 429);
    assert_eq!(header(&r, "x-ratelimit-remaining"), Some("0"));
    let reset: f64 = header(&r, "x-ratelimit-reset")
        .and_then(|v| v.parse().ok())
        .expect("a number of seconds");
    assert!(reset > 0.0 && reset <= 1.0, "{reset}");
}
