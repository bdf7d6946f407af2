use mock_upstream::Config;

use crate::helpers::{client, config, json, start, status};

#[tokio::test]
async fn unknown_or_missing_key_gets_401_json() {
    let server = start(config(&["k1"])).await;
    let c = client();
    let resp = crate::helpers::price(&c, &server, "nope", "btc").await;
    assert_eq!(resp.status(), 401);
    let body = json(resp).await;
    assert_eq!(body["error"], "unauthorized");
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("unknown API key"))
    );

    let missing = c
        .get(format!("{}/price?id=btc", server.url()))
        .send()
        .await
        .expect("answer");
    assert_eq!(missing.status(), 401);

    let stats = server.stats();
    assert_eq!(stats.unknown_key, 2);
    assert_eq!(stats.status(401), 2);
    assert_eq!(stats.keys[0].admitted, 0);
}

#[tokio::test]
async fn key_is_read_from_bearer_header_and_query() {
    let server = start(config(&["k1", "k2"])).await;
    let c = client();
    let url = format!("{}/price?id=btc", server.url());
    let bearer = c.get(&url).bearer_auth("k1").send().await.expect("answer");
    let header = c
        .get(&url)
        .header("x-api-key", "k1")
        .send()
        .await
        .expect("answer");
    let query = c
        .get(format!("{url}&api_key=k1"))
        .send()
        .await
        .expect("answer");
    for r in [bearer, header, query] {
        assert_eq!(r.status(), 200);
    }
    assert_eq!(server.key_stats("k1").map(|k| k.admitted_ok), Some(3));
    assert_eq!(server.key_stats("k2").map(|k| k.admitted_ok), Some(0));
}

#[tokio::test]
async fn accept_any_key_gives_each_new_key_its_own_window() {
    let server = start(Config {
        accept_any_key: true,
        rate: 1,
        interval: 60.0,
        ..Config::default()
    })
    .await;
    let c = client();
    assert_eq!(status(&c, &server, "alpha", "x").await, 200);
    assert_eq!(status(&c, &server, "alpha", "x").await, 429);
    assert_eq!(status(&c, &server, "beta", "x").await, 200);
    let stats = server.stats();
    assert_eq!(stats.keys.len(), 2);
    assert_eq!(stats.keys[0].index, 0);
    assert_eq!(stats.keys[0].rate_limited, 1);
    assert_eq!(stats.keys[1].admitted_ok, 1);
    assert_eq!(stats.unknown_key, 0);
}

#[tokio::test]
async fn revoked_key_answers_401_and_is_counted_on_the_key() {
    let mut cfg = config(&["k1", "k2"]);
    cfg.revoked_keys = vec!["k2".parse().expect("key")];
    let server = start(cfg).await;
    let c = client();
    assert_eq!(status(&c, &server, "k2", "x").await, 401);
    assert_eq!(status(&c, &server, "k1", "x").await, 200);
    let k2 = server.key_stats("k2").expect("k2 is known");
    assert_eq!((k2.unauthorized, k2.admitted), (1, 0));
    assert_eq!(server.stats().unknown_key, 0);
}

#[tokio::test]
async fn stats_and_responses_never_show_raw_keys() {
    let secret = "sk-live-very-secret-0000abcd";
    let server = start(config(&[secret])).await;
    let c = client();
    let body = json(crate::helpers::price(&c, &server, secret, "btc").await).await;
    assert_eq!(body["key"], "********abcd");
    let stats = c
        .get(format!("{}/__stats", server.url()))
        .send()
        .await
        .expect("answer")
        .text()
        .await
        .expect("text");
    assert!(!stats.contains("very-secret"), "{stats}");
    assert!(stats.contains("********abcd"), "{stats}");
    assert!(!format!("{:?}", server.stats()).contains("very-secret"));
}
