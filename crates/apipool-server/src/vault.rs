//! The key vault: envelope encryption of API keys (and the server's own secrets) at rest.
//!
//! # Design
//!
//! * Every secret gets its own random 256-bit **data key** (DEK). The secret is encrypted with
//!   AES-256-GCM under the DEK (random 96-bit nonce, associated data = the secret's stable id, e.g.
//!   `key:<uuid>`), so a ciphertext cannot be moved to another row.
//! * The DEK is **wrapped** (AES-256-GCM again) by a **master key**; the associated data binds the
//!   wrapped DEK to the secret's id *and* the master-key version. A row stores `ciphertext, nonce,
//!   wrapped_dek, dek_nonce, master_version`; plaintext never reaches the database.
//! * Master keys are identified by a **check value** (`HMAC-SHA256(key, "apipool/master-key-check/v1")`)
//!   stored in `vault_master_keys` with a version and a state (`active` or `retired`). A key is
//!   supplied by `APIPOOL_MASTER_KEY` (base64 or hex of 32 bytes), by `APIPOOL_MASTER_KEY_FILE`, or by
//!   `<data-dir>/master.key`, which is created with mode 0600 on first start; a key file readable by
//!   group or others is refused. Nothing is ever read from a `.env` file.
//! * **Rotation** ([`rotate_master_key`]) runs online, also from another process on the same database:
//!   1. generate a new key (version `v+1`); in file mode the key file then holds both keys;
//!   2. insert version `v+1` with a *handoff*: the new key wrapped by the old one. A running server
//!      holding the old key picks the new one up from the handoff (it reloads whenever it meets an
//!      unknown version, before it seals anything, and every few seconds);
//!   3. re-wrap every DEK in batches (`UPDATE ... WHERE id = ? AND master_version = ?`): the secrets
//!      themselves are not re-encrypted, only their 32-byte data keys;
//!   4. after a grace period, retire the old version, delete the handoff, sweep once more, and (file
//!      mode) rewrite the key file with only the new key.
//!
//!   Afterwards no row references the old version and no handoff exists, so the old master key opens
//!   nothing. A server restarted with the old key refuses to start and says so.
//! * A **fingerprint** (`HMAC-SHA256(fingerprint_key, raw_key)`) detects duplicate keys without
//!   decrypting. The fingerprint key and the JWT signing secret are random, generated once and kept
//!   in `vault_secrets`, sealed like any API key (and so re-wrapped by rotation too).

use std::collections::HashMap;
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine;
use hmac::{Hmac, Mac};
use parking_lot::RwLock;
use sha2::Sha256;
use sqlx::Row;
use zeroize::Zeroizing;

use crate::db::Db;

/// Length of every key in bytes.
pub const KEY_LEN: usize = 32;
const NONCE_LEN: usize = 12;
const CHECK_LABEL: &[u8] = b"apipool/master-key-check/v1";
/// Name of the sealed fingerprint key in `vault_secrets`.
pub const SECRET_FINGERPRINT: &str = "fingerprint_key";
/// Name of the sealed JWT signing secret in `vault_secrets`.
pub const SECRET_JWT: &str = "jwt_signing_key";
const REWRAP_BATCH: i64 = 500;

type HmacSha256 = Hmac<Sha256>;

/// Errors of the vault. Each says what to do.
#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    /// The supplied key text is not 32 bytes in base64 or hex.
    #[error("master key is not valid: {0} (expected 32 random bytes, base64- or hex-encoded)")]
    BadKey(String),
    /// The key file may be read by other users.
    #[error(
        "master key file {0} is readable by group or others; run `chmod 600 {0}` and start again"
    )]
    InsecureKeyFile(PathBuf),
    /// The key file cannot be read or written.
    #[error("cannot access master key file {path}: {source}")]
    KeyFile {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The key file is gone but the database has a vault.
    #[error(
        "master key file {0} does not exist, but this database already holds encrypted keys: restore \
         the key file from your backup (or set APIPOOL_MASTER_KEY)"
    )]
    MissingKeyFile(PathBuf),
    /// No supplied key matches the database.
    #[error(
        "the configured master key does not open this database; supply the current key with \
         APIPOOL_MASTER_KEY or APIPOOL_MASTER_KEY_FILE (or point --data-dir at the directory holding master.key)"
    )]
    WrongKey,
    /// The supplied key was retired by a rotation.
    #[error(
        "the configured master key was retired by `apipool vault rotate-master-key`; supply the new key \
         (APIPOOL_MASTER_KEY / APIPOOL_MASTER_KEY_FILE)"
    )]
    RetiredKey,
    /// A row references a master-key version this process does not hold.
    #[error(
        "no master key available for vault version {0}; restart the server with the current master key"
    )]
    MissingVersion(i64),
    /// Authentication of a ciphertext failed.
    #[error("decryption failed: wrong master key or tampered data")]
    Decrypt,
    /// Database error.
    #[error("vault database error: {0}")]
    Db(#[from] sqlx::Error),
}

/// A 256-bit master key. Its `Debug` output never shows the bytes.
#[derive(Clone)]
pub struct MasterKey(Arc<Zeroizing<[u8; KEY_LEN]>>);

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MasterKey(<redacted>)")
    }
}

impl MasterKey {
    /// A fresh random key.
    pub fn generate() -> Self {
        let mut k = Zeroizing::new([0u8; KEY_LEN]);
        rand::fill(&mut k[..]);
        Self(Arc::new(k))
    }

    /// Builds a key from raw bytes (must be 32).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, VaultError> {
        let arr: [u8; KEY_LEN] = bytes
            .try_into()
            .map_err(|_| VaultError::BadKey(format!("{} bytes instead of 32", bytes.len())))?;
        Ok(Self(Arc::new(Zeroizing::new(arr))))
    }

    /// Parses base64 (standard or URL-safe, padded or not) or 64 hex digits.
    pub fn from_encoded(text: &str) -> Result<Self, VaultError> {
        let t = text.trim();
        if t.len() == 2 * KEY_LEN && t.bytes().all(|b| b.is_ascii_hexdigit()) {
            let bytes = Zeroizing::new(
                hex::decode(t).map_err(|_| VaultError::BadKey("invalid hex".to_owned()))?,
            );
            return Self::from_bytes(&bytes);
        }
        let engines = [
            base64::engine::general_purpose::STANDARD,
            base64::engine::general_purpose::STANDARD_NO_PAD,
            base64::engine::general_purpose::URL_SAFE,
            base64::engine::general_purpose::URL_SAFE_NO_PAD,
        ];
        for e in engines {
            if let Ok(bytes) = e.decode(t) {
                let bytes = Zeroizing::new(bytes);
                return Self::from_bytes(&bytes);
            }
        }
        Err(VaultError::BadKey("neither base64 nor hex".to_owned()))
    }

    /// Standard base64 of the key (what the key file and `APIPOOL_MASTER_KEY` hold).
    pub fn encode(&self) -> Zeroizing<String> {
        Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(&self.0[..]))
    }

    /// The public check value identifying this key in `vault_master_keys`.
    pub fn check_value(&self) -> String {
        hex::encode(hmac(&self.0[..], CHECK_LABEL))
    }
}

fn aead_cipher(key: &[u8]) -> Aes256Gcm {
    // The length is always KEY_LEN: every caller passes a 32-byte array.
    Aes256Gcm::new_from_slice(key).unwrap_or_else(|_| unreachable!("AES-256 key of 32 bytes"))
}

fn hmac(key: &[u8], msg: &[u8]) -> [u8; 32] {
    let mut mac = <HmacSha256 as KeyInit>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length"));
    mac.update(msg);
    mac.finalize().into_bytes().into()
}

fn random_nonce() -> [u8; NONCE_LEN] {
    let mut n = [0u8; NONCE_LEN];
    rand::fill(&mut n[..]);
    n
}

fn seal_raw(key: &[u8], aad: &[u8], plaintext: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let nonce = random_nonce();
    let ct = aead_cipher(key)
        .encrypt(
            &Nonce::from(nonce),
            Payload {
                msg: plaintext,
                aad,
            },
        )
        .unwrap_or_else(|_| unreachable!("AES-GCM encryption of a bounded message cannot fail"));
    (ct, nonce.to_vec())
}

fn open_raw(
    key: &[u8],
    aad: &[u8],
    nonce: &[u8],
    ct: &[u8],
) -> Result<Zeroizing<Vec<u8>>, VaultError> {
    let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| VaultError::Decrypt)?;
    aead_cipher(key)
        .decrypt(&Nonce::from(nonce), Payload { msg: ct, aad })
        .map(Zeroizing::new)
        .map_err(|_| VaultError::Decrypt)
}

fn dek_aad(aad_id: &str, version: i64) -> Vec<u8> {
    format!("apipool/dek/v1|{aad_id}|{version}").into_bytes()
}

fn secret_aad(aad_id: &str) -> Vec<u8> {
    format!("apipool/secret/v1|{aad_id}").into_bytes()
}

fn handoff_aad(from: i64, to: i64) -> Vec<u8> {
    format!("apipool/handoff/v1|{from}|{to}").into_bytes()
}

/// The associated-data id of an API key row.
pub fn key_aad_id(key_row_id: &str) -> String {
    format!("key:{key_row_id}")
}

/// The associated-data id of an internal secret.
pub fn secret_aad_id(name: &str) -> String {
    format!("secret:{name}")
}

/// An encrypted secret as stored in a row.
#[derive(Clone, PartialEq, Eq)]
pub struct Sealed {
    /// AES-256-GCM ciphertext (with tag) of the secret under its data key.
    pub ciphertext: Vec<u8>,
    /// Nonce of `ciphertext`.
    pub nonce: Vec<u8>,
    /// The data key, encrypted under the master key.
    pub wrapped_dek: Vec<u8>,
    /// Nonce of `wrapped_dek`.
    pub dek_nonce: Vec<u8>,
    /// Which master key wrapped the data key.
    pub master_version: i64,
}

impl fmt::Debug for Sealed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sealed")
            .field("master_version", &self.master_version)
            .finish_non_exhaustive()
    }
}

/// A master key together with its version: what [`Vault::seal`] needs.
#[derive(Debug, Clone)]
pub struct SealingKey {
    /// Version in `vault_master_keys`.
    pub version: i64,
    key: MasterKey,
}

/// Encrypts `plaintext` under a fresh data key wrapped by `mk`.
pub fn seal_with(mk: &SealingKey, aad_id: &str, plaintext: &[u8]) -> Sealed {
    let mut dek = Zeroizing::new([0u8; KEY_LEN]);
    rand::fill(&mut dek[..]);
    let (ciphertext, nonce) = seal_raw(&dek[..], &secret_aad(aad_id), plaintext);
    let (wrapped_dek, dek_nonce) = seal_raw(&mk.key.0[..], &dek_aad(aad_id, mk.version), &dek[..]);
    Sealed {
        ciphertext,
        nonce,
        wrapped_dek,
        dek_nonce,
        master_version: mk.version,
    }
}

/// Decrypts a sealed secret with a given master key (which must be the one of `sealed.master_version`).
pub fn open_with(
    mk: &MasterKey,
    aad_id: &str,
    sealed: &Sealed,
) -> Result<Zeroizing<Vec<u8>>, VaultError> {
    let dek = unwrap_dek(
        mk,
        aad_id,
        sealed.master_version,
        &sealed.dek_nonce,
        &sealed.wrapped_dek,
    )?;
    open_raw(&dek, &secret_aad(aad_id), &sealed.nonce, &sealed.ciphertext)
}

fn unwrap_dek(
    mk: &MasterKey,
    aad_id: &str,
    version: i64,
    nonce: &[u8],
    wrapped: &[u8],
) -> Result<Zeroizing<Vec<u8>>, VaultError> {
    open_raw(&mk.0[..], &dek_aad(aad_id, version), nonce, wrapped)
}

/// Where master keys come from.
#[derive(Debug, Clone)]
pub enum KeySource {
    /// Given directly (`APIPOOL_MASTER_KEY`); several during a manual hand-over.
    Env(Vec<MasterKey>),
    /// A key file: one base64 key per line (`#` comments allowed). Created when missing.
    File(PathBuf),
}

impl KeySource {
    /// Reads the keys; a missing key file is an error.
    pub fn load(&self) -> Result<Vec<MasterKey>, VaultError> {
        match self {
            Self::Env(keys) => Ok(keys.clone()),
            Self::File(path) => read_key_file(path),
        }
    }

    /// Like [`KeySource::load`], but creates the key file with one fresh key when it does not
    /// exist (only done for a database whose vault is still empty).
    pub fn load_or_create(&self) -> Result<Vec<MasterKey>, VaultError> {
        if let Self::File(path) = self
            && !path.exists()
        {
            write_key_file(path, &[MasterKey::generate()], true)?;
            tracing::info!(path = %path.display(), "created a new master key file (mode 0600)");
        }
        self.load()
    }
}

/// Reads a key file, refusing one that group or others can read.
pub fn read_key_file(path: &Path) -> Result<Vec<MasterKey>, VaultError> {
    let io_err = |source| VaultError::KeyFile {
        path: path.to_owned(),
        source,
    };
    if !path.exists() {
        return Err(VaultError::MissingKeyFile(path.to_owned()));
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(path).map_err(io_err)?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(VaultError::InsecureKeyFile(path.to_owned()));
        }
    }
    let text = Zeroizing::new(std::fs::read_to_string(path).map_err(io_err)?);
    let keys = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(MasterKey::from_encoded)
        .collect::<Result<Vec<_>, _>>()?;
    if keys.is_empty() {
        return Err(VaultError::BadKey(format!(
            "{} holds no key",
            path.display()
        )));
    }
    Ok(keys)
}

/// Writes a key file atomically with mode 0600.
pub fn write_key_file(path: &Path, keys: &[MasterKey], create_new: bool) -> Result<(), VaultError> {
    let io_err = |source| VaultError::KeyFile {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io_err)?;
    }
    let mut body = Zeroizing::new(String::from(
        "# apipool master key(s): keep secret, back up safely. One base64 key per line.\n",
    ));
    for k in keys {
        body.push_str(&k.encode());
        body.push('\n');
    }
    let tmp = path.with_extension(format!("tmp-{}", uuid::Uuid::new_v4().simple()));
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(&tmp).map_err(io_err)?;
    f.write_all(body.as_bytes()).map_err(io_err)?;
    f.sync_all().map_err(io_err)?;
    drop(f);
    if create_new && path.exists() {
        let _ = std::fs::remove_file(&tmp);
        return Ok(());
    }
    std::fs::rename(&tmp, path).map_err(io_err)?;
    Ok(())
}

#[derive(Debug, Default, Clone)]
struct Ring {
    keys: HashMap<i64, MasterKey>,
    current: i64,
}

struct MasterRow {
    version: i64,
    check_value: String,
    state: String,
    handoff_from: Option<i64>,
    handoff_nonce: Option<Vec<u8>>,
    handoff_ciphertext: Option<Vec<u8>>,
}

async fn master_rows(db: &Db) -> Result<Vec<MasterRow>, VaultError> {
    let rows = sqlx::query(
        "SELECT version, check_value, state, handoff_from, handoff_nonce, handoff_ciphertext \
         FROM vault_master_keys ORDER BY version",
    )
    .fetch_all(&db.pool)
    .await?;
    rows.into_iter()
        .map(|r| {
            Ok(MasterRow {
                version: r.try_get("version")?,
                check_value: r.try_get("check_value")?,
                state: r.try_get("state")?,
                handoff_from: r.try_get("handoff_from")?,
                handoff_nonce: r.try_get("handoff_nonce")?,
                handoff_ciphertext: r.try_get("handoff_ciphertext")?,
            })
        })
        .collect::<Result<_, sqlx::Error>>()
        .map_err(VaultError::from)
}

/// Builds the key ring from candidate keys and the database's version table.
async fn build_ring(db: &Db, candidates: &[MasterKey]) -> Result<Ring, VaultError> {
    let rows = master_rows(db).await?;
    let by_check: HashMap<String, &MasterKey> =
        candidates.iter().map(|k| (k.check_value(), k)).collect();
    let mut ring = Ring::default();
    for row in rows.iter().filter(|r| r.state == "active") {
        if let Some(k) = by_check.get(&row.check_value) {
            ring.keys.insert(row.version, (*k).clone());
        }
    }
    // Follow hand-overs in version order (v1 opens v2's handoff, v2 opens v3's, ...).
    for row in rows.iter().filter(|r| r.state == "active") {
        if ring.keys.contains_key(&row.version) {
            continue;
        }
        let (Some(from), Some(nonce), Some(ct)) = (
            row.handoff_from,
            &row.handoff_nonce,
            &row.handoff_ciphertext,
        ) else {
            continue;
        };
        let Some(old) = ring.keys.get(&from) else {
            continue;
        };
        let bytes = open_raw(&old.0[..], &handoff_aad(from, row.version), nonce, ct)?;
        let key = MasterKey::from_bytes(&bytes)?;
        if key.check_value() == row.check_value {
            ring.keys.insert(row.version, key);
        }
    }
    ring.current = rows
        .iter()
        .filter(|r| r.state == "active")
        .map(|r| r.version)
        .max()
        .unwrap_or(0);
    if !ring.keys.contains_key(&ring.current) {
        let retired = rows
            .iter()
            .any(|r| r.state == "retired" && by_check.contains_key(&r.check_value));
        return Err(if retired {
            VaultError::RetiredKey
        } else {
            VaultError::WrongKey
        });
    }
    Ok(ring)
}

/// The vault of a running server.
pub struct Vault {
    db: Db,
    source: KeySource,
    ring: RwLock<Ring>,
    fingerprint_key: Zeroizing<Vec<u8>>,
    jwt_secret: Zeroizing<Vec<u8>>,
}

impl fmt::Debug for Vault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Vault")
            .field("current_version", &self.ring.read().current)
            .finish_non_exhaustive()
    }
}

impl Vault {
    /// Opens the vault: bootstraps version 1 on an empty database, checks the supplied key, and
    /// loads (or creates) the fingerprint key and the JWT signing secret.
    pub async fn open(db: Db, source: KeySource, now_ms: i64) -> Result<Self, VaultError> {
        let fresh_database = master_rows(&db).await?.is_empty();
        let supplied = if fresh_database {
            source.load_or_create()?
        } else {
            source.load()?
        };
        if fresh_database {
            if supplied.len() != 1 {
                return Err(VaultError::BadKey(
                    "a new database needs exactly one master key".to_owned(),
                ));
            }
            // Two replicas may race here: the primary key makes one of them win.
            let _ = sqlx::query(
                "INSERT INTO vault_master_keys (version, check_value, state, created_at) \
                 VALUES (1, $1, 'active', $2)",
            )
            .bind(supplied[0].check_value())
            .bind(now_ms)
            .execute(&db.pool)
            .await;
        }
        let ring = build_ring(&db, &supplied).await?;
        let mut vault = Self {
            db,
            source,
            ring: RwLock::new(ring),
            fingerprint_key: Zeroizing::new(Vec::new()),
            jwt_secret: Zeroizing::new(Vec::new()),
        };
        vault.fingerprint_key = vault.internal_secret(SECRET_FINGERPRINT, now_ms).await?;
        vault.jwt_secret = vault.internal_secret(SECRET_JWT, now_ms).await?;
        Ok(vault)
    }

    async fn internal_secret(
        &self,
        name: &str,
        now_ms: i64,
    ) -> Result<Zeroizing<Vec<u8>>, VaultError> {
        let aad = secret_aad_id(name);
        if let Some(sealed) = self.load_internal(name).await? {
            return self.decrypt(&aad, &sealed).await;
        }
        let mut fresh = Zeroizing::new(vec![0u8; KEY_LEN]);
        rand::fill(&mut fresh[..]);
        let sk = self.sealing_key().await?;
        let s = seal_with(&sk, &aad, &fresh);
        // ON CONFLICT keeps the first writer's secret when replicas start together.
        sqlx::query(
            "INSERT INTO vault_secrets (name, ciphertext, nonce, wrapped_dek, dek_nonce, master_version, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (name) DO NOTHING",
        )
        .bind(name.to_owned())
        .bind(s.ciphertext)
        .bind(s.nonce)
        .bind(s.wrapped_dek)
        .bind(s.dek_nonce)
        .bind(s.master_version)
        .bind(now_ms)
        .execute(&self.db.pool)
        .await?;
        let sealed = self
            .load_internal(name)
            .await?
            .ok_or(VaultError::MissingVersion(0))?;
        self.decrypt(&aad, &sealed).await
    }

    async fn load_internal(&self, name: &str) -> Result<Option<Sealed>, VaultError> {
        let row = sqlx::query(
            "SELECT ciphertext, nonce, wrapped_dek, dek_nonce, master_version FROM vault_secrets WHERE name = $1",
        )
        .bind(name.to_owned())
        .fetch_optional(&self.db.pool)
        .await?;
        row.map(|r| sealed_from_row(&r))
            .transpose()
            .map_err(VaultError::from)
    }

    /// Re-reads the key source and the version table (picks up a rotation's new key).
    pub async fn reload(&self) -> Result<(), VaultError> {
        let mut candidates = self.source.load().unwrap_or_default();
        candidates.extend(self.ring.read().keys.values().cloned());
        let ring = build_ring(&self.db, &candidates).await?;
        *self.ring.write() = ring;
        Ok(())
    }

    /// Reloads when the database has an active version this process does not know.
    pub async fn refresh_if_stale(&self) -> Result<(), VaultError> {
        let current: Option<i64> =
            sqlx::query_scalar("SELECT MAX(version) FROM vault_master_keys WHERE state = 'active'")
                .fetch_one(&self.db.pool)
                .await?;
        let current = current.unwrap_or(0);
        let known = {
            let ring = self.ring.read();
            ring.current == current && ring.keys.contains_key(&current)
        };
        if !known {
            self.reload().await?;
        }
        Ok(())
    }

    /// The key new secrets must be sealed with (the newest active version).
    pub async fn sealing_key(&self) -> Result<SealingKey, VaultError> {
        self.refresh_if_stale().await?;
        let ring = self.ring.read();
        ring.keys
            .get(&ring.current)
            .map(|k| SealingKey {
                version: ring.current,
                key: k.clone(),
            })
            .ok_or(VaultError::MissingVersion(ring.current))
    }

    /// The master key of a version, reloading once when it is unknown.
    pub async fn master_key(&self, version: i64) -> Result<MasterKey, VaultError> {
        if let Some(k) = self.ring.read().keys.get(&version) {
            return Ok(k.clone());
        }
        self.reload().await?;
        self.ring
            .read()
            .keys
            .get(&version)
            .cloned()
            .ok_or(VaultError::MissingVersion(version))
    }

    /// Decrypts one sealed secret.
    pub async fn decrypt(
        &self,
        aad_id: &str,
        sealed: &Sealed,
    ) -> Result<Zeroizing<Vec<u8>>, VaultError> {
        let mk = self.master_key(sealed.master_version).await?;
        match open_with(&mk, aad_id, sealed) {
            // A rotation may have re-wrapped the row between our read and now; the caller
            // re-reads on error, but a reload also helps when the version was reused.
            Err(VaultError::Decrypt) => {
                self.reload().await?;
                let mk = self.master_key(sealed.master_version).await?;
                open_with(&mk, aad_id, sealed)
            }
            other => other,
        }
    }

    /// Keyed fingerprint of a raw key (hex HMAC-SHA256), for duplicate detection.
    pub fn fingerprint(&self, raw: &[u8]) -> String {
        hex::encode(hmac(&self.fingerprint_key, raw))
    }

    /// The JWT signing secret.
    pub fn jwt_secret(&self) -> &[u8] {
        &self.jwt_secret
    }

    /// The current master-key version.
    pub fn current_version(&self) -> i64 {
        self.ring.read().current
    }
}

/// Reads the sealed columns of a row.
pub fn sealed_from_row(r: &sqlx::any::AnyRow) -> Result<Sealed, sqlx::Error> {
    Ok(Sealed {
        ciphertext: r.try_get("ciphertext")?,
        nonce: r.try_get("nonce")?,
        wrapped_dek: r.try_get("wrapped_dek")?,
        dek_nonce: r.try_get("dek_nonce")?,
        master_version: r.try_get("master_version")?,
    })
}

/// Options of [`rotate_master_key`].
#[derive(Debug, Clone)]
pub struct RotateOptions {
    /// How long the hand-over stays readable after all rows are re-wrapped, so running servers
    /// (which poll every few seconds) learn the new key before the old one is retired.
    pub handoff_grace: Duration,
    /// Where to write the new key when the source is `Env` (else it is only returned).
    pub new_key_file: Option<PathBuf>,
}

impl Default for RotateOptions {
    fn default() -> Self {
        Self {
            handoff_grace: Duration::from_secs(10),
            new_key_file: None,
        }
    }
}

/// What a rotation did.
#[derive(Debug)]
pub struct RotationReport {
    /// The version that was current before.
    pub old_version: i64,
    /// The new current version.
    pub new_version: i64,
    /// Number of data keys re-wrapped.
    pub rewrapped: u64,
    /// The key file that now holds the new key (file source or `new_key_file`).
    pub key_file: Option<PathBuf>,
    /// The new key, base64, when it came from the environment and was written nowhere:
    /// the operator must store it and set `APIPOOL_MASTER_KEY` before restarting servers.
    pub new_key_base64: Option<Zeroizing<String>>,
}

/// Rotates the master key online (see the module docs). Safe to run while servers use the
/// database; resumes an interrupted rotation.
pub async fn rotate_master_key(
    db: &Db,
    source: &KeySource,
    opts: &RotateOptions,
    now_ms: i64,
) -> Result<RotationReport, VaultError> {
    let supplied = source.load()?;
    let mut ring = build_ring(db, &supplied).await?;
    let rows = master_rows(db).await?;
    let active: Vec<i64> = rows
        .iter()
        .filter(|r| r.state == "active")
        .map(|r| r.version)
        .collect();
    let resuming = active.len() > 1;
    let (old_version, new_version, new_key) = if resuming {
        // An earlier rotation stopped half-way: finish it with the key it introduced.
        let new_version = ring.current;
        let old_version = active
            .iter()
            .copied()
            .filter(|v| *v < new_version)
            .min()
            .unwrap_or(new_version);
        let key = ring
            .keys
            .get(&new_version)
            .cloned()
            .ok_or(VaultError::MissingVersion(new_version))?;
        (old_version, new_version, key)
    } else {
        let old_version = ring.current;
        let old_key = ring
            .keys
            .get(&old_version)
            .cloned()
            .ok_or(VaultError::MissingVersion(old_version))?;
        let new_version = old_version + 1;
        let new_key = MasterKey::generate();
        if let KeySource::File(path) = source {
            // Both keys in the file while the rotation runs: a server restarted meanwhile opens
            // rows of either version.
            write_key_file(path, &[old_key.clone(), new_key.clone()], false)?;
        }
        if let Some(path) = &opts.new_key_file {
            write_key_file(path, std::slice::from_ref(&new_key), false)?;
        }
        let (handoff_ct, handoff_nonce) = seal_raw(
            &old_key.0[..],
            &handoff_aad(old_version, new_version),
            &new_key.0[..],
        );
        sqlx::query(
            "INSERT INTO vault_master_keys (version, check_value, state, handoff_from, handoff_nonce, handoff_ciphertext, created_at) \
             VALUES ($1, $2, 'active', $3, $4, $5, $6)",
        )
        .bind(new_version)
        .bind(new_key.check_value())
        .bind(old_version)
        .bind(handoff_nonce)
        .bind(handoff_ct)
        .bind(now_ms)
        .execute(&db.pool)
        .await?;
        ring.keys.insert(new_version, new_key.clone());
        ring.current = new_version;
        (old_version, new_version, new_key)
    };
    let sk = SealingKey {
        version: new_version,
        key: new_key.clone(),
    };
    let mut rewrapped = rewrap_all(db, &ring, &sk).await?;
    if !opts.handoff_grace.is_zero() {
        tokio::time::sleep(opts.handoff_grace).await;
    }
    rewrapped += rewrap_all(db, &ring, &sk).await?;
    sqlx::query("UPDATE vault_master_keys SET state = 'retired' WHERE version < $1")
        .bind(new_version)
        .execute(&db.pool)
        .await?;
    sqlx::query(
        "UPDATE vault_master_keys SET handoff_from = NULL, handoff_nonce = NULL, handoff_ciphertext = NULL",
    )
    .execute(&db.pool)
    .await?;
    // Rows sealed by a server that had not yet seen the new version.
    rewrapped += rewrap_all(db, &ring, &sk).await?;
    let mut report = RotationReport {
        old_version,
        new_version,
        rewrapped,
        key_file: opts.new_key_file.clone(),
        new_key_base64: None,
    };
    match source {
        KeySource::File(path) => {
            write_key_file(path, &[new_key], false)?;
            report.key_file = Some(path.clone());
        }
        KeySource::Env(_) if opts.new_key_file.is_none() => {
            report.new_key_base64 = Some(new_key.encode());
        }
        KeySource::Env(_) => {}
    }
    Ok(report)
}

/// Re-wraps every data key not yet under `sk`, in batches; returns how many.
async fn rewrap_all(db: &Db, ring: &Ring, sk: &SealingKey) -> Result<u64, VaultError> {
    let mut total = 0;
    for (table, id_col, prefix) in [
        ("api_keys", "id", "key"),
        ("vault_secrets", "name", "secret"),
    ] {
        loop {
            let select = format!(
                "SELECT {id_col} AS id, wrapped_dek, dek_nonce, master_version FROM {table} \
                 WHERE master_version < $1 LIMIT {REWRAP_BATCH}"
            );
            let rows = sqlx::query(sqlx::AssertSqlSafe(select))
                .bind(sk.version)
                .fetch_all(&db.pool)
                .await?;
            if rows.is_empty() {
                break;
            }
            let update = format!(
                "UPDATE {table} SET wrapped_dek = $1, dek_nonce = $2, master_version = $3 \
                 WHERE {id_col} = $4 AND master_version = $5"
            );
            let mut tx = db.pool.begin().await?;
            for r in &rows {
                let id: String = r.try_get("id")?;
                let version: i64 = r.try_get("master_version")?;
                let wrapped: Vec<u8> = r.try_get("wrapped_dek")?;
                let nonce: Vec<u8> = r.try_get("dek_nonce")?;
                let old = ring
                    .keys
                    .get(&version)
                    .ok_or(VaultError::MissingVersion(version))?;
                let aad_id = format!("{prefix}:{id}");
                let dek = unwrap_dek(old, &aad_id, version, &nonce, &wrapped)?;
                let (new_wrapped, new_nonce) =
                    seal_raw(&sk.key.0[..], &dek_aad(&aad_id, sk.version), &dek);
                sqlx::query(sqlx::AssertSqlSafe(update.clone()))
                    .bind(new_wrapped)
                    .bind(new_nonce)
                    .bind(sk.version)
                    .bind(id)
                    .bind(version)
                    .execute(&mut *tx)
                    .await?;
                total += 1;
            }
            tx.commit().await?;
        }
    }
    Ok(total)
}

/// Tries to open every sealed row with one specific key under any version; returns how many it
/// could open. Used by tests and by operators to prove an old key is useless after a rotation.
pub async fn count_openable_with(db: &Db, key: &MasterKey) -> Result<u64, VaultError> {
    let mut opened = 0;
    for (table, id_col, prefix) in [
        ("api_keys", "id", "key"),
        ("vault_secrets", "name", "secret"),
    ] {
        let select = format!(
            "SELECT {id_col} AS id, ciphertext, nonce, wrapped_dek, dek_nonce, master_version FROM {table}"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(select))
            .fetch_all(&db.pool)
            .await?;
        for r in &rows {
            let id: String = r.try_get("id")?;
            let sealed = sealed_from_row(r)?;
            if open_with(key, &format!("{prefix}:{id}"), &sealed).is_ok() {
                opened += 1;
            }
        }
    }
    type HandoffRow = (i64, i64, Option<Vec<u8>>, Option<Vec<u8>>);
    let handoffs: Vec<HandoffRow> = sqlx::query_as(
        "SELECT version, COALESCE(handoff_from, 0), handoff_nonce, handoff_ciphertext FROM vault_master_keys",
    )
    .fetch_all(&db.pool)
    .await?;
    for (to, from, nonce, ct) in handoffs {
        if let (Some(n), Some(c)) = (nonce, ct)
            && open_raw(&key.0[..], &handoff_aad(from, to), &n, &c).is_ok()
        {
            opened += 1;
        }
    }
    Ok(opened)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_and_open_roundtrip_binds_id_and_version() {
        let mk = SealingKey {
            version: 3,
            key: MasterKey::generate(),
        };
        let s = seal_with(&mk, "key:abc", b"sk-secret-value");
        assert_eq!(
            &open_with(&mk.key, "key:abc", &s).unwrap()[..],
            b"sk-secret-value"
        );
        // moved to another row: refused
        assert!(open_with(&mk.key, "key:other", &s).is_err());
        // claimed under another version: refused
        let mut wrong_version = s.clone();
        wrong_version.master_version = 2;
        assert!(open_with(&mk.key, "key:abc", &wrong_version).is_err());
        // another master key: refused
        assert!(open_with(&MasterKey::generate(), "key:abc", &s).is_err());
        assert!(
            !s.ciphertext
                .windows(b"sk-secret".len())
                .any(|w| w == b"sk-secret")
        );
    }

    #[test]
    fn parses_hex_and_base64_and_rejects_short_keys() {
        let k = MasterKey::generate();
        let b64 = k.encode();
        assert_eq!(
            MasterKey::from_encoded(&b64).unwrap().check_value(),
            k.check_value()
        );
        let hex = hex::encode(&k.0[..]);
        assert_eq!(
            MasterKey::from_encoded(&hex).unwrap().check_value(),
            k.check_value()
        );
        assert!(MasterKey::from_encoded("c2hvcnQ=").is_err());
        assert!(format!("{k:?}").contains("redacted"));
    }

    #[test]
    fn key_file_is_private_and_insecure_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("master.key");
        assert!(
            KeySource::File(path.clone()).load().is_err(),
            "missing file"
        );
        let keys = KeySource::File(path.clone()).load_or_create().unwrap();
        assert_eq!(keys.len(), 1);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
            assert!(matches!(
                read_key_file(&path),
                Err(VaultError::InsecureKeyFile(_))
            ));
        }
    }
}
