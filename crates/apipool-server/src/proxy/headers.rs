//! Which headers cross the proxy, in each direction.
//!
//! Requests: hop-by-hop headers (RFC 9110 §7.6.1, plus those a `Connection` header names), `Host`,
//! the caller's own credentials (`Authorization` carries its apipool token, `Cookie`,
//! `Proxy-Authorization`), `Content-Length` (recomputed) and the header the pool injects the key
//! into are never forwarded. Responses: hop-by-hop headers and `Set-Cookie` (an upstream session
//! bound to the pool's key is not handed to callers) are dropped.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Hop-by-hop headers: meaningful for one connection only.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(&name.as_str())
}

/// Header names listed in `Connection` (also hop-by-hop).
fn connection_listed(headers: &HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect()
}

/// Whether a caller may set this request header through the proxy (invoke's `headers`).
pub fn request_header_allowed(name: &HeaderName, key_header: Option<&HeaderName>) -> bool {
    !(is_hop_by_hop(name)
        || *name == header::HOST
        || *name == header::AUTHORIZATION
        || *name == header::COOKIE
        || *name == header::CONTENT_LENGTH
        || *name == header::EXPECT
        || key_header == Some(name))
}

/// The caller's request headers that may be forwarded upstream.
pub fn forward_request_headers(from: &HeaderMap, key_header: Option<&HeaderName>) -> HeaderMap {
    let listed = connection_listed(from);
    let mut out = HeaderMap::with_capacity(from.len());
    for (name, value) in from {
        if request_header_allowed(name, key_header) && !listed.contains(name) {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

/// The upstream's response headers that may be returned to the caller.
pub fn forward_response_headers(from: &HeaderMap) -> HeaderMap {
    let listed = connection_listed(from);
    let mut out = HeaderMap::with_capacity(from.len());
    for (name, value) in from {
        if !is_hop_by_hop(name) && *name != header::SET_COOKIE && !listed.contains(name) {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

/// Response headers as the `httpx.Response` wrap shows them: lower-case names, repeated values
/// joined with `, `, `set-cookie` left out.
pub fn headers_json(from: &HeaderMap) -> serde_json::Map<String, serde_json::Value> {
    let mut out = serde_json::Map::new();
    for name in from.keys() {
        if *name == header::SET_COOKIE || is_hop_by_hop(name) {
            continue;
        }
        let joined = from
            .get_all(name)
            .iter()
            .map(|v: &HeaderValue| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect::<Vec<_>>()
            .join(", ");
        out.insert(name.as_str().to_owned(), serde_json::Value::String(joined));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn credentials_and_hop_by_hop_headers_stay_behind() {
        let from = map(&[
            ("authorization", "Bearer apipool-token"),
            ("cookie", "s=1"),
            ("host", "proxy"),
            ("connection", "keep-alive, x-private"),
            ("x-private", "1"),
            ("transfer-encoding", "chunked"),
            ("x-api-key", "caller-value"),
            ("accept", "application/json"),
            ("x-trace", "abc"),
        ]);
        let key = HeaderName::from_static("x-api-key");
        let out = forward_request_headers(&from, Some(&key));
        let names: Vec<&str> = out.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["accept", "x-trace"]);
    }

    #[test]
    fn response_headers_drop_cookies_and_hop_by_hop() {
        let from = map(&[
            ("set-cookie", "session=key-bound"),
            ("content-type", "application/json"),
            ("keep-alive", "timeout=5"),
            ("x-ratelimit-remaining", "3"),
            ("vary", "a"),
            ("vary", "b"),
        ]);
        let out = forward_response_headers(&from);
        assert!(out.get("set-cookie").is_none());
        assert!(out.get("keep-alive").is_none());
        assert_eq!(out.get_all("vary").iter().count(), 2);
        let j = headers_json(&from);
        assert_eq!(j["vary"], "a, b");
        assert!(!j.contains_key("set-cookie"));
    }
}
