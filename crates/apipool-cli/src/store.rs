//! The saved login: `session.json` in the config directory (`--config-dir` /
//! `$APIPOOL_CONFIG_DIR`, else `$XDG_CONFIG_HOME/apipool`, else `~/.config/apipool`), mode 0600.
//!
//! It holds the server URL, the username, the refresh token and the current access token with its
//! expiry. Every command that renews the tokens writes the rotated refresh token back. An
//! exclusive lock on `session.lock` serialises load → renew → save, so two commands started at
//! once do not both spend the same refresh token (the server would revoke the login).

use crate::failure::{CliResult, Context, Failure};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::PathBuf;

const FILE: &str = "session.json";
const LOCK: &str = "session.lock";

/// The stored login. No `Debug`: it holds tokens.
#[derive(Serialize, Deserialize, Clone)]
pub(crate) struct Saved {
    pub(crate) server: String,
    pub(crate) username: String,
    pub(crate) access_token: String,
    pub(crate) refresh_token: String,
    /// Unix seconds when the access token expires (read from its `exp` claim).
    pub(crate) access_expires_at: Option<u64>,
}

/// The config directory and its session file.
#[derive(Debug, Clone)]
pub(crate) struct Store {
    dir: PathBuf,
}

/// Held while the session file is read, renewed and written.
#[derive(Debug)]
pub(crate) struct StoreLock {
    _file: File,
}

impl Store {
    /// `explicit` (from `--config-dir` / `$APIPOOL_CONFIG_DIR`), else the XDG location.
    pub(crate) fn locate(explicit: Option<PathBuf>) -> CliResult<Self> {
        let dir = match explicit {
            Some(d) => d,
            None => {
                match std::env::var_os("XDG_CONFIG_HOME").filter(|v| !v.is_empty()) {
                    Some(x) => PathBuf::from(x).join("apipool"),
                    None => {
                        let home = std::env::var_os("HOME").filter(|v| !v.is_empty()).ok_or_else(|| {
                        Failure::error(
                            "cannot find a config directory: set APIPOOL_CONFIG_DIR or HOME",
                        )
                    })?;
                        PathBuf::from(home).join(".config").join("apipool")
                    }
                }
            }
        };
        Ok(Self { dir })
    }

    pub(crate) fn path(&self) -> PathBuf {
        self.dir.join(FILE)
    }

    fn ensure_dir(&self) -> CliResult {
        std::fs::create_dir_all(&self.dir)
            .context(|| format!("cannot create {}", self.dir.display()))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o700));
        }
        Ok(())
    }

    /// Takes the exclusive lock (waits for another `apipool` command that holds it).
    pub(crate) fn lock(&self) -> CliResult<StoreLock> {
        self.ensure_dir()?;
        let path = self.dir.join(LOCK);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .context(|| format!("cannot open {}", path.display()))?;
        file.lock()
            .context(|| format!("cannot lock {}", path.display()))?;
        Ok(StoreLock { _file: file })
    }

    /// The saved login, or `None` when there is none.
    pub(crate) fn load(&self, _lock: &StoreLock) -> CliResult<Option<Saved>> {
        let path = self.path();
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(Failure::error(format!(
                    "cannot read {}: {e}",
                    path.display()
                )));
            }
        };
        serde_json::from_str(&text).map(Some).map_err(|e| {
            Failure::auth(format!(
                "{} is damaged ({e}); run `apipool login` again",
                path.display()
            ))
        })
    }

    /// Writes the login atomically (temp file with mode 0600, then rename).
    pub(crate) fn save(&self, _lock: &StoreLock, saved: &Saved) -> CliResult {
        self.ensure_dir()?;
        let path = self.path();
        let tmp = self.dir.join(format!("{FILE}.tmp"));
        let _ = std::fs::remove_file(&tmp);
        let mut opts = OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let text = serde_json::to_string_pretty(saved)
            .context(|| "cannot encode the session".to_owned())?;
        let mut f = opts
            .open(&tmp)
            .context(|| format!("cannot write {}", tmp.display()))?;
        f.write_all(text.as_bytes())
            .and_then(|()| f.sync_all())
            .context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).context(|| format!("cannot write {}", path.display()))?;
        Ok(())
    }

    /// Deletes the saved login (no error when there is none).
    pub(crate) fn delete(&self, _lock: &StoreLock) -> CliResult {
        match std::fs::remove_file(self.path()) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Failure::error(format!(
                "cannot delete {}: {e}",
                self.path().display()
            ))),
            _ => Ok(()),
        }
    }
}

/// The `exp` claim of a JWT (unverified: only to know when to renew it).
pub(crate) fn jwt_expiry(token: &str) -> Option<u64> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    v.get("exp")?.as_u64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    fn is_private(path: &std::path::Path) -> bool {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o077 == 0)
    }

    #[test]
    fn reads_the_exp_claim() {
        let enc = |v: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
        let token = format!(
            "{}.{}.sig",
            enc(r#"{"alg":"HS256"}"#),
            enc(r#"{"sub":"u","exp":1700000000}"#)
        );
        assert_eq!(jwt_expiry(&token), Some(1_700_000_000));
        assert_eq!(jwt_expiry("not-a-jwt"), None);
        assert_eq!(jwt_expiry(&format!("a.{}.c", enc("{}"))), None);
    }

    #[test]
    fn saves_privately_and_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::locate(Some(dir.path().join("cfg"))).unwrap();
        let lock = store.lock().unwrap();
        assert!(store.load(&lock).unwrap().is_none());
        let saved = Saved {
            server: "http://127.0.0.1:1".to_owned(),
            username: "u".to_owned(),
            access_token: "a".to_owned(),
            refresh_token: "r".to_owned(),
            access_expires_at: Some(5),
        };
        store.save(&lock, &saved).unwrap();
        #[cfg(unix)]
        assert!(is_private(&store.path()));
        let back = store.load(&lock).unwrap().unwrap();
        assert_eq!(back.refresh_token, "r");
        store.delete(&lock).unwrap();
        assert!(store.load(&lock).unwrap().is_none());
        store.delete(&lock).unwrap();
    }
}
