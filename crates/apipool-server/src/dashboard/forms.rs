//! Form helpers: errors next to fields, small parsers.

use std::collections::BTreeMap;

use crate::http::error::ApiError;

/// Validation errors by field name (the API's field paths, e.g. `pool_config.timeout`).
#[derive(Debug, Clone, Default)]
pub(crate) struct FieldErrors {
    map: BTreeMap<String, String>,
    /// An error that names no known field.
    pub(crate) general: Option<String>,
}

impl FieldErrors {
    /// No errors yet.
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// The error of a field.
    pub(crate) fn get(&self, field: &str) -> Option<&str> {
        self.map.get(field).map(String::as_str)
    }

    /// Records an error for a field (the first one wins).
    pub(crate) fn add(&mut self, field: &str, message: impl Into<String>) {
        self.map
            .entry(field.to_owned())
            .or_insert_with(|| message.into());
    }

    /// No errors at all.
    pub(crate) fn is_empty(&self) -> bool {
        self.map.is_empty() && self.general.is_none()
    }

    /// All errors, for the summary at the top of a form.
    pub(crate) fn all(&self) -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = self
            .map
            .iter()
            .map(|(k, m)| (k.clone(), m.clone()))
            .collect();
        if let Some(g) = &self.general {
            v.push((String::new(), g.clone()));
        }
        v
    }

    /// Files an API error under the field it names (`"field: message"`), if the form has it.
    pub(crate) fn from_api(e: &ApiError, fields: &[&str]) -> Option<Self> {
        let text = match e {
            ApiError::Unprocessable(m)
            | ApiError::Conflict(m)
            | ApiError::BadRequest(m)
            | ApiError::UnprocessableRows { detail: m, .. } => m.clone(),
            _ => return None,
        };
        let mut out = Self::new();
        if let Some((field, msg)) = text.split_once(": ")
            && let Some(f) = fields.iter().find(|f| **f == field)
        {
            out.add(f, msg);
            return Some(out);
        }
        if let ApiError::Conflict(m) = e {
            // Conflicts are about the identifier.
            if fields.contains(&"identifier") {
                out.add("identifier", m.clone());
                return Some(out);
            }
        }
        out.general = Some(text);
        Some(out)
    }
}

/// `Some(trimmed)` unless blank.
pub(crate) fn non_blank(v: Option<&str>) -> Option<String> {
    v.map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

/// Tags from `a, b, c`.
pub(crate) fn split_tags(v: &str) -> Vec<String> {
    v.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Identifiers from a list separated by commas, spaces or new lines.
pub(crate) fn split_list(v: &str) -> Vec<String> {
    v.split([',', '\n', '\r'])
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// `?a=b&c=d` from pairs, skipping empty values.
pub(crate) fn query(pairs: &[(&str, String)]) -> String {
    let mut s = url::form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        if !v.is_empty() {
            s.append_pair(k, v);
        }
    }
    let q = s.finish();
    if q.is_empty() { q } else { format!("?{q}") }
}

/// A path segment, percent-encoded.
pub(crate) fn seg(v: &str) -> String {
    url::form_urlencoded::byte_serialize(v.as_bytes())
        .collect::<String>()
        .replace('+', "%20")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_errors_land_next_to_their_field() {
        let e = ApiError::field("pool_config.timeout", "must be a number between 1 and 600");
        let f = FieldErrors::from_api(&e, &["pool_config.timeout", "name"]).unwrap();
        assert_eq!(
            f.get("pool_config.timeout"),
            Some("must be a number between 1 and 600")
        );
        assert!(f.general.is_none());
        let other = FieldErrors::from_api(&e, &["name"]).unwrap();
        assert!(other.general.unwrap().contains("pool_config.timeout"));
        let c = ApiError::Conflict("a pool with identifier 'x' already exists".to_owned());
        assert!(
            FieldErrors::from_api(&c, &["identifier"])
                .unwrap()
                .get("identifier")
                .is_some()
        );
        assert!(FieldErrors::from_api(&ApiError::NotFound("x".to_owned()), &[]).is_none());
    }

    #[test]
    fn small_parsers() {
        assert_eq!(split_tags(" a, b ,,c"), vec!["a", "b", "c"]);
        assert_eq!(split_list("k1\nk2, k3\r\n"), vec!["k1", "k2", "k3"]);
        assert_eq!(non_blank(Some("  ")), None);
        assert_eq!(seg("a b/c"), "a%20b%2Fc");
        assert_eq!(
            query(&[("search", "x y".to_owned()), ("tag", String::new())]),
            "?search=x+y"
        );
    }
}
