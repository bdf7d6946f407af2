use serde_json::Value;

use crate::both_backends;
use crate::helpers::{Backend, expect_error, spawn_app};

both_backends!(
    health_ready_metrics_docs,
    unknown_routes_and_methods_are_json
);

async fn health_ready_metrics_docs(backend: Backend) {
    let app = spawn_app(backend).await;
    for path in ["/health", "/api/v1/health"] {
        let r = app.client.get(app.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["status"], "ok");
        assert_eq!(body["version"], env!("CARGO_PKG_VERSION"));
    }
    let r = app.client.get(app.url("/ready")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["database"], true);

    // a request with an identifier in its path, then the metrics
    app.create_key(&app.admin_token, "metric-key-7", "sk-metrics-secret-111")
        .await;
    let r = app.get(&app.admin_token, "/keys/metric-key-7").await;
    assert_eq!(r.status(), 200);
    let text = app.metrics().await;
    assert!(text.contains("http_requests_total"), "{text}");
    assert!(text.contains("http_request_duration_seconds_bucket"));
    assert!(text.contains("route=\"/api/v1/keys/{identifier}\""));
    assert!(
        !text.contains("metric-key-7"),
        "raw paths must not be labels"
    );
    assert!(!text.contains("sk-metrics-secret"));

    // OpenAPI generated from the handlers, Swagger UI served locally
    let spec: Value = app
        .client
        .get(app.url("/api/v1/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let paths = spec["paths"].as_object().unwrap();
    for p in [
        "/api/v1/auth/login",
        "/api/v1/auth/refresh",
        "/api/v1/auth/logout",
        "/api/v1/auth/register",
        "/api/v1/auth/me",
        "/api/v1/users",
        "/api/v1/users/{id}",
        "/api/v1/keys",
        "/api/v1/keys/raw",
        "/api/v1/keys/export",
        "/api/v1/keys/import",
        "/api/v1/keys/batch-import",
        "/api/v1/keys/{identifier}",
        "/api/v1/keys/{identifier}/rotate",
        "/api/v1/keys/{identifier}/verify",
        "/api/v1/keys/{identifier}/raw",
        "/api/v1/pools",
        "/api/v1/pools/{pool}",
        "/api/v1/pools/{pool}/members",
        "/api/v1/pools/{pool}/members/{key}",
        "/api/v1/pools/{pool}/status",
        "/api/v1/pools/{pool}/config",
        "/api/v1/health",
        "/health",
        "/ready",
    ] {
        assert!(paths.contains_key(p), "openapi lacks {p}");
    }
    assert!(spec["components"]["securitySchemes"]["bearer"].is_object());
    let r = app.client.get(app.url("/docs/")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("swagger"));
}

async fn unknown_routes_and_methods_are_json(backend: Backend) {
    let app = spawn_app(backend).await;
    let r = app.client.get(app.url("/nope")).send().await.unwrap();
    assert_eq!(expect_error(r, 404).await, "Not Found");
    let r = app
        .client
        .get(app.url("/../../etc/passwd"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = app.client.delete(app.url("/health")).send().await.unwrap();
    assert_eq!(expect_error(r, 405).await, "Method Not Allowed");
    // every API call without a token is a 401 with our shape
    let r = app.client.get(app.api("/keys")).send().await.unwrap();
    assert!(r.headers().contains_key("www-authenticate"));
    expect_error(r, 401).await;
    let r = app
        .client
        .get(app.api("/keys"))
        .bearer_auth("garbage")
        .send()
        .await
        .unwrap();
    expect_error(r, 401).await;
    // every answer carries a request id: a fresh random (version 4) UUID per request
    let mut ids = std::collections::HashSet::new();
    for _ in 0..20 {
        let r = app.client.get(app.url("/health")).send().await.unwrap();
        let id = r.headers()["x-request-id"].to_str().unwrap().to_owned();
        let parsed = uuid::Uuid::parse_str(&id).unwrap();
        assert_eq!(parsed.get_version_num(), 4, "{id}");
        assert_eq!(parsed.hyphenated().to_string(), id);
        assert!(ids.insert(id), "request ids repeat");
    }
    // a caller's own request id is kept
    let r = app
        .client
        .get(app.url("/health"))
        .header("x-request-id", "caller-chosen-42")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-request-id"], "caller-chosen-42");
}
