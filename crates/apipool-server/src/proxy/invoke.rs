//! The apipool-ng `invoke` body for the `generic` client type: an HTTP verb (optionally after
//! fixed path segments) with httpx-style arguments, and the `httpx.Response` wrap of the answer.
//!
//! Only these shapes are accepted (anything else is a 400 and nothing is sent):
//!
//! * `attr_path`: `[VERB]` or `[SEGMENT, ..., VERB]`, where VERB is one of `get`, `post`, `put`,
//!   `patch`, `delete`, `head`, `options` (or `request` with the verb as the first argument), and
//!   each SEGMENT is `[A-Za-z0-9_.~-]{1,128}` other than `.`/`..` (it becomes a path prefix, so
//!   `dummyclient.coins.list.get()` is `GET {base_url}/coins/list`).
//! * `args`: at most the URL (a path relative to the base URL).
//! * `kwargs`: `url`, `params` (object or list of pairs), `headers` (object), `json`, `data`
//!   (object → form, string → raw body), `content` (string), and `timeout` / `follow_redirects`
//!   (accepted and ignored: the pool's timeout applies, redirects are never followed).

use bytes::Bytes;
use http::Method;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use utoipa::ToSchema;

use super::headers::{headers_json, request_header_allowed};
use super::target::{RelativeTarget, TargetError};

/// The body of `POST /proxy/{pool}/invoke` (and `/call`).
#[derive(Debug, Deserialize, ToSchema)]
pub struct InvokeRequest {
    /// The attribute chain the SDK recorded, e.g. `["get"]` or `["coins", "list", "get"]`.
    pub attr_path: Vec<String>,
    /// Positional arguments: at most the URL.
    #[serde(default)]
    #[schema(value_type = Option<Vec<Object>>)]
    pub args: Option<Vec<Value>>,
    /// Keyword arguments (`url`, `params`, `headers`, `json`, `data`, `content`).
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub kwargs: Option<Map<String, Value>>,
}

/// Why an invoke body was refused (400; nothing was sent upstream).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvokeError {
    /// Empty or too long.
    #[error("attr_path must name an HTTP verb, e.g. [\"get\"] (at most 8 path segments before it)")]
    BadPath,
    /// Not an HTTP verb.
    #[error(
        "unsupported method '{0}': the generic client only offers get, post, put, patch, delete, head, options and request"
    )]
    UnknownMethod(String),
    /// A path segment before the verb is not a plain name.
    #[error(
        "attr_path segment '{0}' is not a plain path segment ([A-Za-z0-9_.~-], not '.' or '..')"
    )]
    BadSegment(String),
    /// Wrong argument.
    #[error("{0}")]
    BadArgument(String),
    /// The URL/path is unsafe.
    #[error("url: {0}")]
    Target(#[from] TargetError),
}

/// A validated HTTP call, before a key and base URL are chosen.
#[derive(Debug, Clone)]
pub struct HttpCall {
    /// The verb.
    pub method: Method,
    /// The path under the base URL, with its query.
    pub target: RelativeTarget,
    /// Extra query parameters (`params`).
    pub params: Vec<(String, String)>,
    /// Caller headers (already filtered).
    pub headers: HeaderMap,
    /// Request body.
    pub body: Option<Bytes>,
}

const VERBS: [(&str, Method); 7] = [
    ("get", Method::GET),
    ("post", Method::POST),
    ("put", Method::PUT),
    ("patch", Method::PATCH),
    ("delete", Method::DELETE),
    ("head", Method::HEAD),
    ("options", Method::OPTIONS),
];

fn verb(name: &str) -> Option<Method> {
    VERBS
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, m)| m.clone())
}

fn segment_ok(s: &str) -> bool {
    (1..=128).contains(&s.len())
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.~-".contains(&b))
}

fn scalar(field: &str, v: &Value) -> Result<Option<String>, InvokeError> {
    Ok(match v {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        Value::Bool(b) => Some(if *b { "true" } else { "false" }.to_owned()),
        Value::Number(n) => Some(n.to_string()),
        _ => {
            return Err(InvokeError::BadArgument(format!(
                "{field}: values must be strings, numbers, booleans or lists of them"
            )));
        }
    })
}

/// `{"a": 1, "b": [1, 2]}` or `[["a", 1], ["b", 2]]` → pairs.
fn pairs(field: &str, v: &Value) -> Result<Vec<(String, String)>, InvokeError> {
    let mut out = Vec::new();
    let mut push = |k: &str, v: &Value| -> Result<(), InvokeError> {
        match v {
            Value::Array(items) => {
                for i in items {
                    if let Some(s) = scalar(field, i)? {
                        out.push((k.to_owned(), s));
                    }
                }
            }
            other => {
                if let Some(s) = scalar(field, other)? {
                    out.push((k.to_owned(), s));
                }
            }
        }
        Ok(())
    };
    match v {
        Value::Null => {}
        Value::Object(m) => {
            for (k, v) in m {
                push(k, v)?;
            }
        }
        Value::Array(list) => {
            for item in list {
                match item.as_array().map(Vec::as_slice) {
                    Some([Value::String(k), v]) => push(k, v)?,
                    _ => {
                        return Err(InvokeError::BadArgument(format!(
                            "{field}: a list must hold [name, value] pairs"
                        )));
                    }
                }
            }
        }
        _ => {
            return Err(InvokeError::BadArgument(format!(
                "{field}: must be an object or a list of [name, value] pairs"
            )));
        }
    }
    Ok(out)
}

impl HttpCall {
    /// Validates an invoke body. `key_header` is the header the pool puts the key in (callers
    /// may not set it).
    pub fn from_invoke(
        req: &InvokeRequest,
        key_header: Option<&HeaderName>,
    ) -> Result<Self, InvokeError> {
        let (last, prefix) = req.attr_path.split_last().ok_or(InvokeError::BadPath)?;
        if prefix.len() > 8 {
            return Err(InvokeError::BadPath);
        }
        for s in prefix {
            if !segment_ok(s) {
                return Err(InvokeError::BadSegment(s.chars().take(64).collect()));
            }
        }
        let mut args: Vec<&Value> = req.args.iter().flatten().collect();
        let method = if last.eq_ignore_ascii_case("request") {
            if args.is_empty() {
                return Err(InvokeError::BadArgument(
                    "request(method, url, ...) needs the method as its first argument".to_owned(),
                ));
            }
            let m = args.remove(0);
            let name = m.as_str().unwrap_or_default();
            verb(name).ok_or_else(|| InvokeError::UnknownMethod(name.chars().take(32).collect()))?
        } else {
            verb(last).ok_or_else(|| InvokeError::UnknownMethod(last.chars().take(32).collect()))?
        };
        let empty = Map::new();
        let kwargs = req.kwargs.as_ref().unwrap_or(&empty);
        if args.len() > 1 {
            return Err(InvokeError::BadArgument(
                "only the URL may be passed positionally; use keyword arguments (params, json, ...)"
                    .to_owned(),
            ));
        }
        let url = match (args.first().copied(), kwargs.get("url")) {
            (Some(_), Some(_)) => {
                return Err(InvokeError::BadArgument(
                    "the URL was given twice (positionally and as url=)".to_owned(),
                ));
            }
            (Some(v), None) | (None, Some(v)) => match v {
                Value::String(s) => s.as_str(),
                Value::Null => "",
                _ => {
                    return Err(InvokeError::BadArgument(
                        "url must be a string (a path relative to the base_url)".to_owned(),
                    ));
                }
            },
            (None, None) => "",
        };
        let segs: Vec<&str> = prefix.iter().map(String::as_str).collect();
        let target = RelativeTarget::parse(url)?.with_prefix(&segs);
        let mut call = Self {
            method,
            target,
            params: Vec::new(),
            headers: HeaderMap::new(),
            body: None,
        };
        let mut content_type: Option<HeaderValue> = None;
        for (k, v) in kwargs {
            match k.as_str() {
                "url" | "timeout" | "follow_redirects" => {}
                "params" => call.params = pairs("params", v)?,
                "headers" => {
                    let Some(obj) = v.as_object() else {
                        if v.is_null() {
                            continue;
                        }
                        return Err(InvokeError::BadArgument(
                            "headers must be an object of strings".to_owned(),
                        ));
                    };
                    for (name, value) in obj {
                        let n = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                            InvokeError::BadArgument(format!(
                                "headers: '{name}' is not a valid header name"
                            ))
                        })?;
                        if !request_header_allowed(&n, key_header) {
                            return Err(InvokeError::BadArgument(format!(
                                "headers: '{n}' cannot be set through the proxy (the server sets it)"
                            )));
                        }
                        let text = scalar("headers", value)?.unwrap_or_default();
                        let hv = HeaderValue::from_str(&text).map_err(|_| {
                            InvokeError::BadArgument(format!(
                                "headers: the value of '{n}' is not valid"
                            ))
                        })?;
                        call.headers.append(n, hv);
                    }
                }
                "json" => {
                    set_body(&mut call.body, Bytes::from(v.to_string()))?;
                    content_type = Some(HeaderValue::from_static("application/json"));
                }
                "data" => match v {
                    Value::Null => {}
                    Value::String(s) => set_body(&mut call.body, Bytes::from(s.clone()))?,
                    _ => {
                        let form = pairs("data", v)?;
                        let encoded = url::form_urlencoded::Serializer::new(String::new())
                            .extend_pairs(form)
                            .finish();
                        set_body(&mut call.body, Bytes::from(encoded))?;
                        content_type = Some(HeaderValue::from_static(
                            "application/x-www-form-urlencoded",
                        ));
                    }
                },
                "content" => match v {
                    Value::Null => {}
                    Value::String(s) => set_body(&mut call.body, Bytes::from(s.clone()))?,
                    _ => {
                        return Err(InvokeError::BadArgument(
                            "content must be a string".to_owned(),
                        ));
                    }
                },
                other => {
                    return Err(InvokeError::BadArgument(format!(
                        "unsupported argument '{}': use url, params, headers, json, data or content",
                        other.chars().take(64).collect::<String>()
                    )));
                }
            }
        }
        if let Some(ct) = content_type
            && !call.headers.contains_key(header::CONTENT_TYPE)
        {
            call.headers.insert(header::CONTENT_TYPE, ct);
        }
        Ok(call)
    }

    /// The stats label: `"GET /path"` (no query: it may carry a key).
    pub fn label(&self) -> String {
        label(&self.method, self.target.path())
    }
}

fn set_body(slot: &mut Option<Bytes>, body: Bytes) -> Result<(), InvokeError> {
    if slot.is_some() {
        return Err(InvokeError::BadArgument(
            "give only one of json, data and content".to_owned(),
        ));
    }
    *slot = Some(body);
    Ok(())
}

/// `"METHOD /path"`, at most 200 characters.
pub fn label(method: &Method, path: &str) -> String {
    let mut s = format!("{method} /{}", path.trim_start_matches('/'));
    if s.len() > 200 {
        let mut cut = 200;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

/// The SDK's view of an upstream answer: `{"_type": "httpx.Response", "status_code", "headers",
/// "data": <JSON>}` or `"text"` instead of `"data"` when the body is not JSON.
pub fn wrap_response(status: u16, headers: &HeaderMap, body: &[u8]) -> Value {
    let mut out = json!({
        "_type": "httpx.Response",
        "status_code": status,
        "headers": headers_json(headers),
    });
    let obj = out.as_object_mut().expect("a JSON object");
    if body.is_empty() {
        obj.insert("data".to_owned(), Value::Null);
    } else if let Ok(v) = serde_json::from_slice::<Value>(body) {
        obj.insert("data".to_owned(), v);
    } else {
        obj.insert(
            "text".to_owned(),
            Value::String(String::from_utf8_lossy(body).into_owned()),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(v: Value) -> InvokeRequest {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn the_sdk_get_shapes_parse() {
        let c = HttpCall::from_invoke(
            &req(json!({"attr_path": ["get"], "args": ["/price"], "kwargs": {"params": {"id": "btc", "n": 2}}})),
            None,
        )
        .unwrap();
        assert_eq!(c.method, Method::GET);
        assert_eq!(c.target.path(), "/price");
        assert_eq!(
            c.params,
            [
                ("id".to_owned(), "btc".to_owned()),
                ("n".to_owned(), "2".to_owned())
            ]
        );
        assert_eq!(c.label(), "GET /price");
        let c = HttpCall::from_invoke(
            &req(json!({"attr_path": ["coins", "list", "GET"], "args": [], "kwargs": {"url": "x?y=1"}})),
            None,
        )
        .unwrap();
        assert_eq!(c.target.path(), "coins/list/x");
        assert_eq!(c.target.query(), Some("y=1"));
        let c = HttpCall::from_invoke(
            &req(json!({"attr_path": ["post"], "kwargs": {"url": "/echo/a", "json": {"a": 1}, "headers": {"X-Trace": "1"}}})),
            None,
        )
        .unwrap();
        assert_eq!(c.body.as_deref(), Some(&b"{\"a\":1}"[..]));
        assert_eq!(c.headers["content-type"], "application/json");
        assert_eq!(c.headers["x-trace"], "1");
        let c = HttpCall::from_invoke(
            &req(json!({"attr_path": ["request"], "args": ["PUT", "/x"], "kwargs": {"data": {"a": [1, 2]}}})),
            None,
        )
        .unwrap();
        assert_eq!(c.method, Method::PUT);
        assert_eq!(c.body.as_deref(), Some(&b"a=1&a=2"[..]));
    }

    #[test]
    fn unsafe_or_unknown_calls_are_refused() {
        let bad = [
            json!({"attr_path": []}),
            json!({"attr_path": ["__class__"]}),
            json!({"attr_path": ["..", "get"]}),
            json!({"attr_path": ["get"], "args": ["http://169.254.169.254/latest"]}),
            json!({"attr_path": ["get"], "kwargs": {"url": "//evil/x"}}),
            json!({"attr_path": ["get"], "args": ["a", "b"]}),
            json!({"attr_path": ["get"], "kwargs": {"cookies": {"a": "b"}}}),
            json!({"attr_path": ["get"], "kwargs": {"headers": {"Authorization": "Bearer x"}}}),
            json!({"attr_path": ["get"], "kwargs": {"headers": {"Host": "evil"}}}),
            json!({"attr_path": ["post"], "kwargs": {"json": {}, "content": "x"}}),
            json!({"attr_path": ["request"], "args": ["CONNECT", "/x"]}),
        ];
        for b in bad {
            assert!(HttpCall::from_invoke(&req(b.clone()), None).is_err(), "{b}");
        }
        // A leading underscore is just a path segment here: nothing is looked up by name.
        let c = HttpCall::from_invoke(&req(json!({"attr_path": ["_http", "get"]})), None).unwrap();
        assert_eq!(c.target.path(), "_http");
        let key = HeaderName::from_static("x-api-key");
        let r = HttpCall::from_invoke(
            &req(json!({"attr_path": ["get"], "kwargs": {"headers": {"X-Api-Key": "other"}}})),
            Some(&key),
        );
        assert!(r.is_err());
    }

    #[test]
    fn answers_are_wrapped_like_httpx() {
        let mut h = HeaderMap::new();
        h.insert("content-type", HeaderValue::from_static("application/json"));
        let v = wrap_response(200, &h, br#"{"price": 1.5}"#);
        assert_eq!(v["_type"], "httpx.Response");
        assert_eq!(v["status_code"], 200);
        assert_eq!(v["data"]["price"], 1.5);
        assert_eq!(v["headers"]["content-type"], "application/json");
        let v = wrap_response(404, &HeaderMap::new(), b"not found");
        assert_eq!(v["text"], "not found");
        assert!(v.get("data").is_none());
        let v = wrap_response(204, &HeaderMap::new(), b"");
        assert!(v["data"].is_null());
    }
}
