//! Table output for people, `--json` for scripts.

use serde_json::Value;
use std::fmt::Write as _;

/// One cell: strings as they are, `null` as `-`, arrays joined with `,`, objects as JSON.
pub(crate) fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".to_owned(),
        Value::String(s) => s.clone(),
        Value::Array(a) if a.iter().all(|x| !x.is_object() && !x.is_array()) => {
            if a.is_empty() {
                "-".to_owned()
            } else {
                a.iter().map(cell).collect::<Vec<_>>().join(",")
            }
        }
        other => other.to_string(),
    }
}

/// Columns (header, field) of objects, left-aligned.
pub(crate) fn table(items: &[Value], columns: &[(&str, &str)]) -> String {
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|it| columns.iter().map(|(_, f)| cell(&it[*f])).collect())
        .collect();
    render(
        columns.iter().map(|(h, _)| (*h).to_owned()).collect(),
        &rows,
    )
}

/// Renders a header and rows with columns padded to their widest cell.
pub(crate) fn render(header: Vec<String>, rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[String]| {
        let mut l = String::new();
        for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                l.push_str(c);
            } else {
                let _ = write!(l, "{c:<w$}  ");
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&header);
    for r in rows {
        line(r);
    }
    out
}

/// `field: value` lines of an object (nested objects as JSON).
pub(crate) fn fields(v: &Value, names: &[&str]) -> String {
    let width = names.iter().map(|n| n.len()).max().unwrap_or(0);
    let mut out = String::new();
    for n in names {
        let _ = writeln!(
            out,
            "{:<width$}  {}",
            format!("{n}:"),
            cell(&v[*n]),
            width = width + 1
        );
    }
    out
}

/// Where a command's answer goes: a table/text for people, or the JSON as is.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Out {
    pub(crate) json: bool,
}

impl Out {
    /// Prints `value` as JSON with `--json`, else `human(value)`.
    pub(crate) fn emit(self, value: &Value, human: impl FnOnce(&Value) -> String) {
        if self.json {
            println!(
                "{}",
                serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string())
            );
        } else {
            print!("{}", human(value));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn tables_align_and_show_nulls_and_lists() {
        let items = [
            json!({"identifier": "k1", "tags": ["a", "b"], "alias": null}),
            json!({"identifier": "a-longer-key", "tags": [], "alias": "x"}),
        ];
        let t = table(
            &items,
            &[
                ("IDENTIFIER", "identifier"),
                ("ALIAS", "alias"),
                ("TAGS", "tags"),
            ],
        );
        assert_eq!(
            t,
            "IDENTIFIER    ALIAS  TAGS\nk1            -      a,b\na-longer-key  x      -\n"
        );
        assert_eq!(cell(&json!({"a": 1})), r#"{"a":1}"#);
        assert_eq!(cell(&json!(true)), "true");
    }
}
