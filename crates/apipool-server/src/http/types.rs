//! Shared request/response pieces and input validation ("parse, don't validate": each helper
//! returns the cleaned value or a 422 naming the field).

use serde::{Deserialize, Deserializer};
use utoipa::{IntoParams, ToSchema};

use super::error::ApiError;

/// A field of a partial update: absent (leave unchanged), `null` (clear) or a value.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum Patch<T> {
    /// Not in the request.
    #[default]
    Absent,
    /// Explicit `null`.
    Null,
    /// A value.
    Value(T),
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Patch<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(match Option::<T>::deserialize(d)? {
            None => Self::Null,
            Some(v) => Self::Value(v),
        })
    }
}

impl<T> Patch<T> {
    /// `Some(Option<T>)` when the field was sent.
    pub fn into_update(self) -> Option<Option<T>> {
        match self {
            Self::Absent => None,
            Self::Null => Some(None),
            Self::Value(v) => Some(Some(v)),
        }
    }
}

/// Paging parameters (`page` from 1, `page_size` 1–100).
#[derive(Debug, Clone, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageParams {
    /// Page number, from 1 (default 1).
    pub page: Option<i64>,
    /// Items per page, 1–100 (default 20).
    pub page_size: Option<i64>,
}

impl PageParams {
    /// Validated (page, page_size, offset).
    pub fn resolve(&self) -> Result<(i64, i64, i64), ApiError> {
        let page = self.page.unwrap_or(1);
        let size = self.page_size.unwrap_or(20);
        if !(1..=1_000_000).contains(&page) {
            return Err(ApiError::field("page", "must be between 1 and 1000000"));
        }
        if !(1..=100).contains(&size) {
            return Err(ApiError::field("page_size", "must be between 1 and 100"));
        }
        Ok((page, size, (page - 1) * size))
    }
}

fn char_len(s: &str) -> usize {
    s.chars().count()
}

/// Usernames: 3–64 of `[A-Za-z0-9_-]`.
pub fn username(v: &str) -> Result<String, ApiError> {
    let n = char_len(v);
    if !(3..=64).contains(&n) {
        return Err(ApiError::field("username", "must be 3 to 64 characters"));
    }
    if !v
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(ApiError::field(
            "username",
            "may contain only letters, digits, '_' and '-'",
        ));
    }
    Ok(v.to_owned())
}

/// A plausible e-mail address (one `@`, no spaces, at most 254 characters).
pub fn email(v: &str) -> Result<String, ApiError> {
    let v = v.trim();
    let ok = char_len(v) <= 254
        && !v.chars().any(char::is_whitespace)
        && matches!(v.split_once('@'), Some((a, b)) if !a.is_empty() && !b.is_empty() && !b.contains('@'));
    if !ok {
        return Err(ApiError::field("email", "is not a valid e-mail address"));
    }
    Ok(v.to_owned())
}

/// Passwords: 8–128 characters.
pub fn password(field: &str, v: &str) -> Result<(), ApiError> {
    if !(8..=128).contains(&char_len(v)) {
        return Err(ApiError::field(field, "must be 8 to 128 characters"));
    }
    Ok(())
}

/// Identifiers of keys and pools: 1–128 characters, no control characters, no '/', no
/// surrounding whitespace (they appear in URL paths).
pub fn identifier(field: &str, v: &str) -> Result<String, ApiError> {
    if !(1..=128).contains(&char_len(v)) {
        return Err(ApiError::field(field, "must be 1 to 128 characters"));
    }
    if v.chars().any(|c| c.is_control() || c == '/') || v.trim() != v {
        return Err(ApiError::field(
            field,
            "must not contain '/', control characters or surrounding spaces",
        ));
    }
    Ok(v.to_owned())
}

/// Optional free text with a maximum length; empty becomes `None`.
pub fn opt_text(field: &str, v: Option<String>, max: usize) -> Result<Option<String>, ApiError> {
    match v {
        None => Ok(None),
        Some(s) if char_len(&s) > max => Err(ApiError::field(
            field,
            format!("must be at most {max} characters"),
        )),
        Some(s) => Ok(Some(s)),
    }
}

/// Required text, 1..=max characters.
pub fn text(field: &str, v: &str, max: usize) -> Result<String, ApiError> {
    if !(1..=max).contains(&char_len(v)) || v.trim().is_empty() {
        return Err(ApiError::field(
            field,
            format!("must be 1 to {max} characters"),
        ));
    }
    Ok(v.to_owned())
}

/// Raw key material: 1–4096 bytes.
pub fn raw_key(field: &str, v: &str) -> Result<(), ApiError> {
    if v.is_empty() || v.len() > 4096 {
        return Err(ApiError::field(field, "must be 1 to 4096 bytes"));
    }
    Ok(())
}

/// Tags: at most 50, each 1–64 characters without control characters; duplicates removed.
pub fn tags(field: &str, v: Option<Vec<String>>) -> Result<Vec<String>, ApiError> {
    let v = v.unwrap_or_default();
    if v.len() > 50 {
        return Err(ApiError::field(field, "at most 50 tags"));
    }
    let mut out: Vec<String> = Vec::with_capacity(v.len());
    for t in v {
        if !(1..=64).contains(&char_len(&t)) || t.chars().any(char::is_control) {
            return Err(ApiError::field(
                field,
                "each tag must be 1 to 64 characters without control characters",
            ));
        }
        if !out.contains(&t) {
            out.push(t);
        }
    }
    Ok(out)
}

/// A JSON object of at most `max` serialized bytes.
pub fn json_object(
    field: &str,
    v: Option<serde_json::Value>,
    max: usize,
) -> Result<Option<String>, ApiError> {
    match v {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(obj @ serde_json::Value::Object(_)) => {
            let s = obj.to_string();
            if s.len() > max {
                return Err(ApiError::field(
                    field,
                    format!("must be at most {max} bytes of JSON"),
                ));
            }
            Ok(Some(s))
        }
        Some(_) => Err(ApiError::field(field, "must be a JSON object")),
    }
}

/// Parses stored JSON text back into a value (`null` when absent).
pub fn parse_json(s: Option<&str>) -> serde_json::Value {
    s.and_then(|s| serde_json::from_str(s).ok())
        .unwrap_or(serde_json::Value::Null)
}

/// Marker for the 204 responses in the OpenAPI document.
#[derive(Debug, ToSchema)]
pub struct NoContent;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers() {
        assert!(identifier("identifier", "openai-1").is_ok());
        assert!(identifier("identifier", "key with spaces").is_ok());
        assert!(identifier("identifier", "").is_err());
        assert!(identifier("identifier", "a/b").is_err());
        assert!(identifier("identifier", " x").is_err());
        assert!(identifier("identifier", &"x".repeat(129)).is_err());
        let e = identifier("identifier", &"x".repeat(129)).unwrap_err();
        assert!(e.to_string().starts_with("identifier:"));
    }

    #[test]
    fn usernames_and_emails() {
        assert!(username("al").is_err());
        assert!(username("alice_01").is_ok());
        assert!(username("al ice").is_err());
        assert!(email("a@b.c").is_ok());
        assert!(email("a@@b").is_err());
        assert!(email("nope").is_err());
    }

    #[test]
    fn patch_distinguishes_absent_null_value() {
        #[derive(Deserialize)]
        struct P {
            #[serde(default)]
            a: Patch<i32>,
        }
        let p: P = serde_json::from_str("{}").unwrap();
        assert_eq!(p.a, Patch::Absent);
        let p: P = serde_json::from_str(r#"{"a":null}"#).unwrap();
        assert_eq!(p.a, Patch::Null);
        let p: P = serde_json::from_str(r#"{"a":3}"#).unwrap();
        assert_eq!(p.a, Patch::Value(3));
    }

    #[test]
    fn tags_are_deduplicated_and_bounded() {
        assert_eq!(
            tags("tags", Some(vec!["a".into(), "a".into(), "b".into()])).unwrap(),
            vec!["a", "b"]
        );
        assert!(tags("tags", Some(vec![String::new()])).is_err());
        assert!(tags("tags", Some(vec!["x".into(); 51])).is_err());
    }
}
