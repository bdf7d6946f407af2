//! `Retry-After`, `retry-after-ms` and `x-ratelimit-reset*` parsing (apipool::http): values come
//! from any upstream, so every byte string must parse to a sensible delay or to nothing.
//!
//! Invariants: a numeric `Retry-After` is exactly that many seconds; an HTTP date waits
//! `date - now` (zero when past); a reset value is seconds, a Unix time in s or ms (relative to
//! now, never negative), or a Go duration; `retry_delay` takes `retry-after-ms`, then
//! `Retry-After`, then the largest reset, and answers `None` only when none of them parses.
#![no_main]

use std::time::{Duration, SystemTime};

use apipool::http::{parse_reset, parse_retry_after, retry_delay};
use http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;

/// A fixed clock (2026-01-01T00:00:00Z) keeps every run reproducible.
const NOW_SECS: u64 = 1_767_225_600;

const NAMES: [&str; 6] = [
    "retry-after-ms",
    "retry-after",
    "x-ratelimit-reset",
    "x-ratelimit-reset-requests",
    "x-ratelimit-reset-tokens",
    "ratelimit-reset",
];

fn check_single(text: &str, now: SystemTime) {
    let ra = parse_retry_after(text, now);
    let rs = parse_reset(text, now);
    let v = text.trim();
    if let Ok(n) = v.parse::<f64>() {
        let plain = (n.is_finite() && n >= 0.0)
            .then(|| Duration::try_from_secs_f64(n).ok())
            .flatten();
        assert_eq!(ra, plain, "numeric Retry-After {v:?}");
        if n.is_finite() && n >= 0.0 {
            let now_s = NOW_SECS as f64;
            let expected = if n > 1e12 {
                n / 1000.0 - now_s
            } else if n > 1e9 {
                n - now_s
            } else {
                n
            };
            assert_eq!(
                rs,
                Duration::try_from_secs_f64(expected.max(0.0)).ok(),
                "numeric reset {v:?}"
            );
        } else {
            assert_eq!(rs, None, "NaN, infinite or negative reset {v:?}");
        }
    } else {
        match httpdate::parse_http_date(v) {
            Ok(at) => assert_eq!(
                ra,
                Some(at.duration_since(now).unwrap_or(Duration::ZERO)),
                "date {v:?}"
            ),
            Err(_) => assert_eq!(ra, None, "neither a number nor a date: {v:?}"),
        }
        if rs.is_some() {
            // Only a Go duration remains: digits, dots and the units ms/s/m/h.
            assert!(
                v.bytes()
                    .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'm' | b's' | b'h')),
                "reset {v:?} parsed as a duration"
            );
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(NOW_SECS);
    if let Ok(text) = std::str::from_utf8(data) {
        check_single(text, now);
    }
    // The same bytes as a header set: each line is `<selector byte><value>`.
    let mut headers = HeaderMap::new();
    for line in data.split(|&b| b == b'\n') {
        let Some((&sel, value)) = line.split_first() else {
            continue;
        };
        let name = HeaderName::from_static(NAMES[usize::from(sel) % NAMES.len()]);
        if let Ok(value) = HeaderValue::from_bytes(value) {
            headers.append(name, value);
        }
    }
    let first = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let from_ms = first("retry-after-ms")
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|ms| ms.is_finite() && *ms >= 0.0)
        .and_then(|ms| Duration::try_from_secs_f64(ms / 1000.0).ok());
    let from_ra = first("retry-after").and_then(|v| parse_retry_after(v, now));
    let from_reset = NAMES[2..]
        .iter()
        .filter_map(|n| first(n).and_then(|v| parse_reset(v, now)))
        .max();
    assert_eq!(
        retry_delay(&headers, now),
        from_ms.or(from_ra).or(from_reset),
        "precedence for {headers:?}"
    );
});
