//! Where a proxied call may go: the pool's (or key's) `base_url`, and nowhere else.
//!
//! Every path a caller gives (the `url` of an invoke, the `{path}` of the transparent route) goes
//! through [`RelativeTarget::parse`] before anything is sent: absolute URLs, scheme-relative
//! `//host` forms, `.`/`..` segments (also percent-encoded, also double-encoded), backslashes,
//! control characters and fragments are refused. [`RelativeTarget::join`] then puts the path
//! *under* the base URL's path and checks the result once more (same scheme, host, port and path
//! prefix), so a bug in one check cannot send a key to another host.

use std::fmt;

use http::HeaderName;
use serde_json::Value;
use url::Url;

/// Longest accepted relative path plus query, in bytes.
pub const MAX_TARGET_LEN: usize = 8 * 1024;

/// Why a path was refused (each says what to send instead).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    /// `http://...`, `file:...`, `mailto:...`
    #[error(
        "absolute URLs are not allowed: give a path relative to the upstream's base_url (e.g. \"/price\")"
    )]
    Absolute,
    /// `//host/...`
    #[error("scheme-relative URLs (//host) are not allowed: give a path relative to the base_url")]
    SchemeRelative,
    /// `a//b`
    #[error("empty path segments ('//') are not allowed")]
    EmptySegment,
    /// `.` or `..` segments.
    #[error("'.' and '..' path segments are not allowed (also not percent-encoded)")]
    DotSegment,
    /// `\`
    #[error("backslashes are not allowed in paths")]
    Backslash,
    /// Control characters or whitespace.
    #[error("control characters and whitespace are not allowed in paths (percent-encode spaces)")]
    ControlChar,
    /// `#...`
    #[error("fragments ('#') are not allowed")]
    Fragment,
    /// `%` not followed by two hex digits.
    #[error("malformed percent-encoding in the path")]
    BadEncoding,
    /// Longer than [`MAX_TARGET_LEN`].
    #[error("the path is longer than {MAX_TARGET_LEN} bytes")]
    TooLong,
    /// The joined URL left the base (defence in depth; should never happen).
    #[error("the path would leave the upstream's base_url")]
    Escapes,
}

/// A validated path relative to a base URL, with its (raw) query string.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RelativeTarget {
    path: String,
    query: Option<String>,
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// One round of percent-decoding; `None` when an escape is malformed.
fn percent_decode(s: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'%' {
            let hi = hex(*s.get(i + 1)?)?;
            let lo = hex(*s.get(i + 2)?)?;
            out.push(hi * 16 + lo);
            i += 3;
        } else {
            out.push(s[i]);
            i += 1;
        }
    }
    Some(out)
}

/// Checks one form of a path: the raw form (`raw`: no whitespace either) or a decoded one.
fn check_path_form(p: &[u8], raw: bool) -> Result<(), TargetError> {
    if p.iter()
        .any(|&b| b < 0x20 || b == 0x7f || (raw && b == b' '))
    {
        return Err(TargetError::ControlChar);
    }
    if p.contains(&b'\\') {
        return Err(TargetError::Backslash);
    }
    // One leading slash is allowed ("/price" is relative to the base URL's path too).
    let p = p.strip_prefix(b"/").unwrap_or(p);
    if p.starts_with(b"/") {
        return Err(TargetError::SchemeRelative);
    }
    // A scheme is a colon in the first segment ("http:", "file:", "javascript:").
    let first = p.split(|&b| b == b'/').next().unwrap_or_default();
    if first.contains(&b':') {
        return Err(TargetError::Absolute);
    }
    let segments: Vec<&[u8]> = p.split(|&b| b == b'/').collect();
    if segments.iter().any(|seg| *seg == b"." || *seg == b"..") {
        return Err(TargetError::DotSegment);
    }
    // Empty segments ("a//b") only in last place (a trailing slash).
    if segments
        .iter()
        .take(segments.len().saturating_sub(1))
        .any(|seg| seg.is_empty())
    {
        return Err(TargetError::EmptySegment);
    }
    Ok(())
}

impl RelativeTarget {
    /// Parses `path[?query]` as given by a caller. The path may start with `/` (it is still
    /// relative to the base URL's path).
    pub fn parse(input: &str) -> Result<Self, TargetError> {
        if input.len() > MAX_TARGET_LEN {
            return Err(TargetError::TooLong);
        }
        if input.contains('#') {
            return Err(TargetError::Fragment);
        }
        let (path, query) = match input.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (input, None),
        };
        if let Some(q) = query
            && q.bytes().any(|b| b < 0x20 || b == 0x7f || b == b' ')
        {
            return Err(TargetError::ControlChar);
        }
        // The raw form, then each decoding of it: a path that only turns into `..` or `//host`
        // after one (or two) rounds of decoding is refused as well.
        let mut form = path.as_bytes().to_vec();
        check_path_form(&form, true)?;
        for _ in 0..3 {
            if !form.contains(&b'%') {
                break;
            }
            form = percent_decode(&form).ok_or(TargetError::BadEncoding)?;
            check_path_form(&form, false)?;
        }
        if form.contains(&b'%') {
            // Still encoded after three rounds: nobody needs that.
            return Err(TargetError::BadEncoding);
        }
        Ok(Self {
            path: path.to_owned(),
            query: query.filter(|q| !q.is_empty()).map(str::to_owned),
        })
    }

    /// A path made of fixed segments (the invoke `attr_path` prefix) followed by `rest`.
    pub fn with_prefix(mut self, segments: &[&str]) -> Self {
        if segments.is_empty() {
            return self;
        }
        let rest = self.path.trim_start_matches('/');
        let mut p = segments.join("/");
        if !rest.is_empty() {
            p.push('/');
            p.push_str(rest);
        }
        self.path = p;
        self
    }

    /// The path as given (percent-encoding kept).
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The raw query, if any.
    pub fn query(&self) -> Option<&str> {
        self.query.as_deref()
    }

    /// Puts this path under `base` (its path is a prefix of the result) and appends the query
    /// to the base URL's own query.
    pub fn join(&self, base: &Url) -> Result<Url, TargetError> {
        let mut url = base.clone();
        let base_path = base.path().trim_end_matches('/');
        let rel = self.path.trim_start_matches('/');
        if !rel.is_empty() {
            url.set_path(&format!("{base_path}/{rel}"));
        }
        let query = match (base.query().filter(|q| !q.is_empty()), self.query()) {
            (Some(a), Some(b)) => Some(format!("{a}&{b}")),
            (Some(a), None) => Some(a.to_owned()),
            (None, Some(b)) => Some(b.to_owned()),
            (None, None) => None,
        };
        url.set_query(query.as_deref());
        url.set_fragment(None);
        let same_origin = url.scheme() == base.scheme()
            && url.host_str() == base.host_str()
            && url.port_or_known_default() == base.port_or_known_default()
            && url.username().is_empty()
            && url.password().is_none();
        let under = url.path() == base.path()
            || url.path().starts_with(&format!("{base_path}/"))
            || base_path.is_empty();
        if !same_origin || !under {
            return Err(TargetError::Escapes);
        }
        Ok(url)
    }
}

/// Where the key goes in each upstream request.
#[derive(Clone, PartialEq, Eq)]
pub enum AuthPlacement {
    /// `Authorization: Bearer <key>`.
    Bearer,
    /// A header carrying the raw key.
    Header(HeaderName),
    /// A query parameter carrying the raw key.
    Query(String),
}

impl fmt::Debug for AuthPlacement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Bearer => f.write_str("bearer"),
            Self::Header(h) => write!(f, "header:{h}"),
            Self::Query(q) => write!(f, "query:{q}"),
        }
    }
}

impl AuthPlacement {
    /// Parses `bearer`, `header:NAME` or `query:NAME`.
    pub fn parse(s: &str) -> Option<Self> {
        if s == "bearer" {
            return Some(Self::Bearer);
        }
        if let Some(name) = s.strip_prefix("header:") {
            return HeaderName::from_bytes(name.as_bytes())
                .ok()
                .map(Self::Header);
        }
        s.strip_prefix("query:")
            .filter(|n| !n.is_empty())
            .map(|n| Self::Query(n.to_owned()))
    }
}

/// A pool's `upstream`: the base URL the transparent route forwards to and where the key goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// `http(s)://host[:port][/prefix]`.
    pub base_url: Url,
    /// Key placement.
    pub auth: AuthPlacement,
}

impl Upstream {
    /// Parses the stored JSON (`null` → `None`); the pools API has validated it already.
    pub fn from_json(v: &Value) -> Result<Option<Self>, String> {
        if v.is_null() {
            return Ok(None);
        }
        let base = v
            .get("base_url")
            .and_then(Value::as_str)
            .ok_or("upstream.base_url is missing")?;
        let base_url = parse_base_url(base)?;
        let auth = match v.get("auth").and_then(Value::as_str) {
            None => AuthPlacement::Bearer,
            Some(a) => AuthPlacement::parse(a).ok_or("upstream.auth is not valid")?,
        };
        Ok(Some(Self { base_url, auth }))
    }
}

/// Parses a base URL: http or https, with a host, without credentials, query kept, no fragment.
pub fn parse_base_url(s: &str) -> Result<Url, String> {
    let mut url = Url::parse(s).map_err(|e| format!("base_url is not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err("base_url must be an http or https URL with a host".to_owned());
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("base_url must not contain credentials".to_owned());
    }
    url.set_fragment(None);
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Url {
        Url::parse("http://127.0.0.1:9000/api/v3").unwrap()
    }

    #[test]
    fn relative_paths_join_under_the_base_path() {
        let t = RelativeTarget::parse("/price?id=btc").unwrap();
        assert_eq!(
            t.join(&base()).unwrap().as_str(),
            "http://127.0.0.1:9000/api/v3/price?id=btc"
        );
        let t = RelativeTarget::parse("coins/list").unwrap();
        assert_eq!(
            t.join(&base()).unwrap().as_str(),
            "http://127.0.0.1:9000/api/v3/coins/list"
        );
        let t = RelativeTarget::parse("").unwrap();
        assert_eq!(
            t.join(&base()).unwrap().as_str(),
            "http://127.0.0.1:9000/api/v3"
        );
        let root = Url::parse("http://127.0.0.1:9000").unwrap();
        let t = RelativeTarget::parse("echo/a%2Fb").unwrap();
        assert_eq!(
            t.join(&root).unwrap().as_str(),
            "http://127.0.0.1:9000/echo/a%2Fb"
        );
        let with_q = Url::parse("http://h/x?v=2").unwrap();
        let t = RelativeTarget::parse("y?a=1").unwrap();
        assert_eq!(t.join(&with_q).unwrap().as_str(), "http://h/x/y?v=2&a=1");
        let t = RelativeTarget::parse("search/a%20b").unwrap();
        assert_eq!(t.join(&root).unwrap().path(), "/search/a%20b");
        let t = RelativeTarget::parse("b/c").unwrap().with_prefix(&["a"]);
        assert_eq!(t.path(), "a/b/c");
    }

    #[test]
    fn escapes_are_refused() {
        use TargetError::*;
        let cases = [
            ("http://evil.example/x", Absolute),
            ("https:evil", Absolute),
            ("file:///etc/passwd", Absolute),
            ("javascript:alert(1)", Absolute),
            ("//evil.example/x", SchemeRelative),
            ("///evil", SchemeRelative),
            ("/http://evil", Absolute),
            ("a//b", EmptySegment),
            ("/@h:1/x", Absolute),
            ("%2F%2Fevil.example", SchemeRelative),
            ("../admin", DotSegment),
            ("a/../../b", DotSegment),
            ("a/..", DotSegment),
            ("./a", DotSegment),
            ("%2e%2e/x", DotSegment),
            ("%2E%2e%2Fx", DotSegment),
            ("a/%252e%252e/b", DotSegment),
            ("a%2f..%2fb", DotSegment),
            ("a\\b", Backslash),
            ("a%5c..%5cb", Backslash),
            ("a%00b", ControlChar),
            ("a\nb", ControlChar),
            ("a b", ControlChar),
            ("a%0d%0aHost", ControlChar),
            ("a?x=1\r\nHost: evil", ControlChar),
            ("a#frag", Fragment),
            ("a%zz", BadEncoding),
            ("a%2", BadEncoding),
            ("http%3A%2F%2Fevil", Absolute),
        ];
        for (input, want) in cases {
            assert_eq!(RelativeTarget::parse(input), Err(want), "{input:?}");
        }
        assert_eq!(
            RelativeTarget::parse(&"a".repeat(MAX_TARGET_LEN + 1)),
            Err(TooLong)
        );
    }

    #[test]
    fn colons_after_the_first_segment_are_fine() {
        let t = RelativeTarget::parse("v1/models/gpt:generate").unwrap();
        assert_eq!(
            t.join(&base()).unwrap().path(),
            "/api/v3/v1/models/gpt:generate"
        );
    }

    #[test]
    fn auth_placements_parse() {
        assert_eq!(AuthPlacement::parse("bearer"), Some(AuthPlacement::Bearer));
        assert_eq!(
            AuthPlacement::parse("header:x-api-key"),
            Some(AuthPlacement::Header(HeaderName::from_static("x-api-key")))
        );
        assert_eq!(
            AuthPlacement::parse("query:api_key"),
            Some(AuthPlacement::Query("api_key".to_owned()))
        );
        assert_eq!(AuthPlacement::parse("basic"), None);
        assert_eq!(AuthPlacement::parse("query:"), None);
        let up = Upstream::from_json(
            &serde_json::json!({"base_url": "http://127.0.0.1:1/v1", "auth": "query:k"}),
        )
        .unwrap()
        .unwrap();
        assert_eq!(up.auth, AuthPlacement::Query("k".to_owned()));
        assert!(Upstream::from_json(&Value::Null).unwrap().is_none());
        assert!(parse_base_url("ftp://h").is_err());
        assert!(parse_base_url("http://u:p@h").is_err());
    }
}
