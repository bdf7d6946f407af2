//! The input file: one JSON object per line, `{"id", "method", "path", "query", "json", "headers"}`.

use reqwest::Method;
use serde_json::Value;

/// One request of a batch.
#[derive(Debug, Clone)]
pub(crate) struct Item {
    /// The id as written (string or number), copied into the result line.
    pub(crate) id: Value,
    /// The id as text (how results are matched on resume).
    pub(crate) key: String,
    pub(crate) method: Method,
    /// The path under the upstream's base URL.
    pub(crate) path: String,
    pub(crate) query: Vec<(String, String)>,
    pub(crate) json: Option<Value>,
    pub(crate) headers: Vec<(String, String)>,
}

/// The id as text: a string as is, a number in its JSON form.
pub(crate) fn id_key(id: &Value) -> Option<String> {
    match id {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Parses one line; `Ok(None)` for a blank line.
pub(crate) fn parse_line(text: &str) -> Result<Option<Item>, String> {
    if text.trim().is_empty() {
        return Ok(None);
    }
    let v: Value = serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
    let Value::Object(o) = v else {
        return Err("not a JSON object".to_owned());
    };
    let id = o.get("id").cloned().unwrap_or(Value::Null);
    let key = id_key(&id).ok_or("\"id\" is missing or not a non-empty string or a number")?;
    let method = match o.get("method") {
        None | Some(Value::Null) => Method::GET,
        Some(Value::String(m)) => {
            let m = m.to_ascii_uppercase();
            match m.as_str() {
                "GET" | "POST" | "PUT" | "PATCH" | "DELETE" | "HEAD" | "OPTIONS" => {
                    Method::from_bytes(m.as_bytes()).map_err(|e| format!("\"method\": {e}"))?
                }
                _ => return Err(format!("\"method\" {m:?} is not an HTTP method")),
            }
        }
        Some(_) => return Err("\"method\" must be a string".to_owned()),
    };
    let path = match o.get("path") {
        Some(Value::String(p)) => p.clone(),
        _ => return Err("\"path\" is missing or not a string".to_owned()),
    };
    let query = pairs(o.get("query"), "query")?;
    let headers = pairs(o.get("headers"), "headers")?;
    let json = o.get("json").filter(|j| !j.is_null()).cloned();
    Ok(Some(Item {
        id,
        key,
        method,
        path,
        query,
        json,
        headers,
    }))
}

/// `{"a": 1, "b": ["x", "y"]}` → `a=1&b=x&b=y`.
fn pairs(v: Option<&Value>, name: &str) -> Result<Vec<(String, String)>, String> {
    let scalar = |v: &Value| match v {
        Value::String(s) => Ok(s.clone()),
        Value::Number(_) | Value::Bool(_) => Ok(v.to_string()),
        _ => Err(format!(
            "\"{name}\" values must be strings, numbers, booleans or lists of them"
        )),
    };
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Object(o)) => {
            let mut out = Vec::new();
            for (k, v) in o {
                match v {
                    Value::Array(items) => {
                        for it in items {
                            out.push((k.clone(), scalar(it)?));
                        }
                    }
                    other => out.push((k.clone(), scalar(other)?)),
                }
            }
            Ok(out)
        }
        Some(_) => Err(format!("\"{name}\" must be an object")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_items_and_explains_bad_lines() {
        let it = parse_line(r#"{"id": 7, "path": "/price", "query": {"id": "btc", "n": [1, 2]}}"#)
            .unwrap()
            .unwrap();
        assert_eq!(it.key, "7");
        assert_eq!(it.method, Method::GET);
        assert_eq!(
            it.query,
            [("id", "btc"), ("n", "1"), ("n", "2")].map(|(a, b)| (a.to_owned(), b.to_owned()))
        );
        let it =
            parse_line(r#"{"id": "a", "method": "post", "path": "/echo/x", "json": {"k": 1}}"#)
                .unwrap()
                .unwrap();
        assert_eq!(it.method, Method::POST);
        assert_eq!(it.json, Some(serde_json::json!({"k": 1})));
        assert!(parse_line("   ").unwrap().is_none());
        for (bad, why) in [
            ("{not json", "not valid JSON"),
            ("[1]", "not a JSON object"),
            (r#"{"path": "/p"}"#, "\"id\""),
            (r#"{"id": "", "path": "/p"}"#, "\"id\""),
            (r#"{"id": 1}"#, "\"path\""),
            (
                r#"{"id": 1, "path": "/p", "method": "FETCH"}"#,
                "not an HTTP method",
            ),
            (
                r#"{"id": 1, "path": "/p", "query": {"a": {"b": 1}}}"#,
                "\"query\" values",
            ),
        ] {
            let e = parse_line(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }
}
