//! Path traversal on every dashboard, static and docs route (raw and encoded: `..`, `%2e%2e`,
//! `%2f`, double encoding, backslashes, overlong UTF-8), sent as written on the wire; and the
//! security headers on every dashboard answer, pages and errors alike.

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::helpers::{ADMIN, ADMIN_PASSWORD, Browser, TestApp, spawn_app};

/// Every dashboard route with a parameter, and the fixed ones (from `dashboard::router`).
const ROUTES: [&str; 24] = [
    "/login",
    "/logout",
    "/",
    "/overview.json",
    "/keys",
    "/keys/import",
    "/keys/export",
    "/keys/{p}",
    "/keys/{p}/edit",
    "/keys/{p}/toggle",
    "/keys/{p}/rotate",
    "/keys/{p}/verify",
    "/keys/{p}/delete",
    "/keys/{p}/reveal",
    "/pools",
    "/pools/{p}",
    "/pools/{p}/live.json",
    "/pools/{p}/edit",
    "/pools/{p}/config",
    "/pools/{p}/members/{p}/remove",
    "/pools/{p}/members/{p}/reset",
    "/users",
    "/users/{p}/update",
    "/static/{p}",
];

/// Ways to write "go up and read a file".
const PAYLOADS: [&str; 16] = [
    "../../../../etc/passwd",
    "..%2f..%2f..%2f..%2fetc%2fpasswd",
    "%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    "%2e%2e%2f%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "%252e%252e%252f%252e%252e%252fetc%252fpasswd",
    "..%252f..%252f..%252fCargo.toml",
    "..\\..\\..\\etc\\passwd",
    "..%5c..%5c..%5cetc%5cpasswd",
    "%5c..%5c..%5cCargo.toml",
    "....//....//....//etc/passwd",
    "%c0%ae%c0%ae/%c0%ae%c0%ae/etc/passwd",
    "..%c0%af..%c0%afetc%c0%afpasswd",
    "/etc/passwd",
    "%2fetc%2fpasswd",
    "..%00/Cargo.toml",
    "..;/..;/Cargo.toml",
];

/// What a leaked file would contain.
const MARKERS: [&str; 5] = ["root:x:0", "[package]", "[workspace]", "#![", "fn main"];

/// Sends a request line exactly as written; returns the status line's code and the whole answer.
async fn raw(app: &TestApp, method: &str, target: &str, cookie: &str) -> (u16, String) {
    let addr = app.address.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let req = format!(
        "{method} {target} HTTP/1.1\r\nHost: {addr}\r\nCookie: {cookie}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.expect("read");
    let text = String::from_utf8_lossy(&buf).into_owned();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line for {target}: {text:?}"));
    (code, text)
}

fn header<'a>(answer: &'a str, name: &str) -> Option<&'a str> {
    let head = answer.split("\r\n\r\n").next().unwrap_or_default();
    head.lines().skip(1).find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

fn has_security_headers(answer: &str) -> bool {
    header(answer, "content-security-policy").is_some_and(|c| c.contains("frame-ancestors 'none'"))
        && header(answer, "x-frame-options") == Some("DENY")
        && header(answer, "x-content-type-options") == Some("nosniff")
        && header(answer, "referrer-policy").is_some()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_route_serves_a_file_through_traversal() {
    let app = spawn_app().await;
    let mut b = Browser::new(&app);
    assert_eq!(b.login(ADMIN, ADMIN_PASSWORD).await.status, 303);
    let cookie = b
        .jar
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("; ");
    let mut targets: Vec<String> = Vec::new();
    for route in ROUTES {
        for payload in PAYLOADS {
            if route.contains("{p}") {
                targets.push(route.replace("{p}", payload));
            } else {
                targets.push(format!("{route}/{payload}"));
            }
        }
    }
    // Traversal in front of the routes and into the API docs and the root.
    for payload in PAYLOADS {
        for prefix in ["", "/static/", "/docs/", "/api/v1/", "/keys/x/../"] {
            targets.push(format!("{prefix}{payload}"));
            targets.push(format!("/{prefix}{payload}"));
        }
    }
    let mut sent = 0;
    for signed_in in [true, false] {
        let cookie = if signed_in { cookie.as_str() } else { "" };
        for target in &targets {
            for method in ["GET", "POST"] {
                let (code, answer) = raw(&app, method, target, cookie).await;
                sent += 1;
                assert!(
                    matches!(code, 303 | 400 | 401 | 403 | 404 | 405 | 422),
                    "{method} {target} (signed in: {signed_in}) answered {code}:\n{answer}"
                );
                for m in MARKERS {
                    assert!(
                        !answer.contains(m),
                        "{method} {target} answered with file contents ({m}):\n{answer}"
                    );
                }
            }
        }
    }
    assert!(sent > 1000, "{sent} requests");
    // The real static files still load (the checks above did not just break the route).
    let (code, css) = raw(&app, "GET", "/static/app.css", "").await;
    assert_eq!(code, 200);
    assert!(has_security_headers(&css), "{css}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_answer_carries_the_security_headers() {
    let app = spawn_app().await;
    let mut b = Browser::new(&app);
    // Signed out: the login page, redirects, a refused form, a missing file.
    for (method, path) in [
        ("GET", "/login"),
        ("GET", "/"),
        ("GET", "/keys"),
        ("POST", "/login"),
        ("POST", "/keys/x/delete"),
        ("GET", "/static/nope.css"),
    ] {
        let (code, answer) = raw(&app, method, path, "").await;
        assert!(
            has_security_headers(&answer),
            "{method} {path} ({code}) lacks security headers:\n{answer}"
        );
    }
    assert_eq!(b.login(ADMIN, ADMIN_PASSWORD).await.status, 303);
    let cookie = b
        .jar
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("; ");
    for (method, path) in [
        ("GET", "/"),
        ("GET", "/overview.json"),
        ("GET", "/keys"),
        ("GET", "/keys/missing"),
        ("GET", "/pools"),
        ("GET", "/pools/missing"),
        ("GET", "/pools/missing/live.json"),
        ("GET", "/users"),
        ("POST", "/keys"),
        ("POST", "/logout"),
    ] {
        let (code, answer) = raw(&app, method, path, &cookie).await;
        assert!(
            has_security_headers(&answer),
            "{method} {path} ({code}) lacks security headers:\n{answer}"
        );
        if header(&answer, "content-type").is_some_and(|c| c.starts_with("text/html")) {
            assert_eq!(
                header(&answer, "cache-control"),
                Some("no-store"),
                "{method} {path}"
            );
        }
    }
}
