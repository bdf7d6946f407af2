//! Proxy path validation (apipool_server::proxy::target): the `url` of an invoke and the
//! `{path}` of the transparent route come from callers; the base URL comes from the pool owner.
//!
//! Invariants: an accepted path always joins under every base URL (same scheme, host, port and
//! no credentials, the base path as a prefix, no `.`/`..` segment even after decoding, no
//! fragment), also behind a fixed `attr_path` prefix; an accepted base URL is http(s) with a
//! host and no credentials or fragment.
#![no_main]

use apipool_server::proxy::target::{RelativeTarget, parse_base_url};
use libfuzzer_sys::fuzz_target;
use url::Url;

const BASES: [&str; 5] = [
    "http://127.0.0.1:8080",
    "https://api.example.com/v1/",
    "http://[::1]:9000/base/path",
    "https://api.example.com/v2?api-version=3",
    "http://upstream.internal/a%2Fb/",
];

fn decode_fully(seg: &str) -> Vec<u8> {
    let mut cur = seg.as_bytes().to_vec();
    for _ in 0..4 {
        let next = percent_decode(&cur);
        if next == cur {
            break;
        }
        cur = next;
    }
    cur
}

fn percent_decode(s: &[u8]) -> Vec<u8> {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'%'
            && let (Some(h), Some(l)) = (
                s.get(i + 1).copied().and_then(hex),
                s.get(i + 2).copied().and_then(hex),
            )
        {
            out.push(h * 16 + l);
            i += 3;
            continue;
        }
        out.push(s[i]);
        i += 1;
    }
    out
}

fn check_under(url: &Url, base: &Url, prefix: &str) {
    assert_eq!(url.scheme(), base.scheme(), "{url}");
    assert_eq!(url.host_str(), base.host_str(), "{url}");
    assert_eq!(url.port_or_known_default(), base.port_or_known_default());
    assert!(
        url.username().is_empty() && url.password().is_none(),
        "{url}"
    );
    assert!(url.fragment().is_none(), "{url}");
    let base_path = base.path().trim_end_matches('/');
    let want = format!("{base_path}{prefix}");
    assert!(
        url.path() == base.path()
            || url.path().starts_with(&format!("{want}/"))
            || url.path() == want,
        "{url} is not under {base} + {prefix:?}"
    );
    for seg in url.path().split('/') {
        let dec = decode_fully(seg);
        assert!(dec != b"." && dec != b"..", "dot segment in {url}");
        assert!(!dec.contains(&b'\\'), "backslash in {url}");
    }
    if let Some(base_q) = base.query() {
        assert!(url.query().is_some_and(|q| q.starts_with(base_q)), "{url}");
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(input) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(base) = parse_base_url(input) {
        assert!(matches!(base.scheme(), "http" | "https"), "{base}");
        assert!(base.host().is_some(), "{base}");
        assert!(
            base.username().is_empty() && base.password().is_none(),
            "{base}"
        );
        assert!(base.fragment().is_none(), "{base}");
    }
    let Ok(target) = RelativeTarget::parse(input) else {
        return;
    };
    assert!(!input.contains('#'), "a fragment was accepted: {input:?}");
    for base in BASES {
        let base = parse_base_url(base).expect("test base URL");
        let url = target
            .join(&base)
            .unwrap_or_else(|e| panic!("{input:?} was accepted but does not join {base}: {e}"));
        check_under(&url, &base, "");
        let prefixed = target.clone().with_prefix(&["v1", "get"]);
        let url = prefixed
            .join(&base)
            .unwrap_or_else(|e| panic!("{input:?} with a prefix does not join {base}: {e}"));
        check_under(&url, &base, "/v1/get");
    }
});
