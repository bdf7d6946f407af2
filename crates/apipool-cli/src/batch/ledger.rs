//! The output file (one result line per finished item) and its journal of started ids
//! (`<output>.journal`), both append-only JSON lines.
//!
//! Each line is written with one `write_all` of a complete line, so a crash can only leave a
//! torn *last* line; reading detects it (no trailing newline, or not JSON) and cuts it off
//! before new lines are appended. Resume reads both files: ids with a result are skipped (a
//! success is never sent again), ids started but without a result were in flight when the
//! previous run died and are sent again.

use crate::failure::{CliResult, Context};
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};

/// What an earlier run left.
#[derive(Debug, Default)]
pub(crate) struct Prior {
    /// id → whether any recorded result for it succeeded.
    pub(crate) results: HashMap<String, bool>,
    /// Ids started but without a result (in flight when the earlier run was killed).
    pub(crate) unknown: HashSet<String>,
    /// A torn last line was cut off the output or the journal.
    pub(crate) torn: bool,
    /// Complete lines that did not parse (skipped).
    pub(crate) bad_lines: usize,
}

/// The open output and journal files.
#[derive(Debug)]
pub(crate) struct Ledger {
    output: File,
    journal: File,
    journal_path: PathBuf,
}

pub(crate) fn journal_path(output: &Path) -> PathBuf {
    let mut name = output.file_name().unwrap_or_default().to_os_string();
    name.push(".journal");
    output.with_file_name(name)
}

/// The complete lines of `path` (cutting a torn tail off the file). Missing file → none.
fn complete_lines(path: &Path, torn: &mut bool) -> CliResult<Vec<String>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(crate::failure::Failure::error(format!(
                "cannot read {}: {e}",
                path.display()
            )));
        }
    };
    let good = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    if good < bytes.len() {
        *torn = true;
        let f = OpenOptions::new()
            .write(true)
            .open(path)
            .context(|| format!("cannot repair {}", path.display()))?;
        f.set_len(good as u64)
            .context(|| format!("cannot repair {}", path.display()))?;
    }
    Ok(String::from_utf8_lossy(&bytes[..good])
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_owned)
        .collect())
}

impl Prior {
    /// Reads the output and journal of an earlier run of the same command.
    pub(crate) fn load(output: &Path) -> CliResult<Self> {
        let mut p = Self::default();
        for line in complete_lines(output, &mut p.torn)? {
            let Some((key, ok)) = serde_json::from_str::<Value>(&line).ok().and_then(|v| {
                let key = super::input::id_key(&v["id"])?;
                Some((key, v["ok"].as_bool().unwrap_or(false)))
            }) else {
                p.bad_lines += 1;
                continue;
            };
            let e = p.results.entry(key).or_insert(false);
            *e |= ok;
        }
        for line in complete_lines(&journal_path(output), &mut p.torn)? {
            match serde_json::from_str::<String>(&line) {
                Ok(key) if !p.results.contains_key(&key) => {
                    p.unknown.insert(key);
                }
                Ok(_) => {}
                Err(_) => p.bad_lines += 1,
            }
        }
        Ok(p)
    }
}

impl Ledger {
    pub(crate) fn open(output: &Path) -> CliResult<Self> {
        let open = |p: &Path| {
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .context(|| format!("cannot open {}", p.display()))
        };
        let journal_path = journal_path(output);
        Ok(Self {
            output: open(output)?,
            journal: open(&journal_path)?,
            journal_path,
        })
    }

    fn append(f: &mut File, mut line: String) -> CliResult {
        line.push('\n');
        f.write_all(line.as_bytes())
            .context(|| "cannot write the batch output".to_owned())
    }

    /// Records that `key` is about to be sent.
    pub(crate) fn started(&mut self, key: &str) -> CliResult {
        let line = serde_json::to_string(key).unwrap_or_default();
        Self::append(&mut self.journal, line)
    }

    /// Appends a result line.
    pub(crate) fn finished(&mut self, result: &Value) -> CliResult {
        Self::append(&mut self.output, result.to_string())
    }

    /// Removes the journal (every started item has its result).
    pub(crate) fn close_complete(self) -> CliResult {
        drop(self.journal);
        std::fs::remove_file(&self.journal_path)
            .context(|| format!("cannot remove {}", self.journal_path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn resume_state_survives_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("r.jsonl");
        {
            let mut l = Ledger::open(&out).unwrap();
            for k in ["a", "b", "c", "7"] {
                l.started(k).unwrap();
            }
            l.finished(&json!({"id": "a", "ok": true})).unwrap();
            l.finished(&json!({"id": "b", "ok": false})).unwrap();
            l.finished(&json!({"id": 7, "ok": true})).unwrap();
        }
        // a kill in the middle of a line
        let mut f = OpenOptions::new().append(true).open(&out).unwrap();
        f.write_all(br#"{"id": "c", "ok": tr"#).unwrap();
        drop(f);
        let p = Prior::load(&out).unwrap();
        assert!(p.torn);
        assert_eq!(p.results.get("a"), Some(&true));
        assert_eq!(p.results.get("b"), Some(&false));
        assert_eq!(p.results.get("7"), Some(&true));
        assert!(!p.results.contains_key("c"));
        assert_eq!(p.unknown, HashSet::from(["c".to_owned()]));
        // the torn tail was cut, so new lines stay whole
        let text = std::fs::read_to_string(&out).unwrap();
        assert!(text.ends_with("\n") && !text.contains("tr\n"), "{text}");
        let mut l = Ledger::open(&out).unwrap();
        l.finished(&json!({"id": "c", "ok": true})).unwrap();
        l.finished(&json!({"id": "b", "ok": true})).unwrap();
        l.close_complete().unwrap();
        let p = Prior::load(&out).unwrap();
        assert!(!p.torn && p.unknown.is_empty() && p.bad_lines == 0);
        assert!(p.results.values().all(|ok| *ok));
        assert!(!journal_path(&out).exists());
    }
}
