//! Authentication primitives: argon2id password hashing, JWT access tokens, opaque refresh tokens
//! and login throttling. HTTP handlers live in [`crate::http::auth`].

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use argon2::{Argon2, Params, Version};
use base64::Engine;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use parking_lot::Mutex;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::clock::SharedClock;

/// argon2id with OWASP's 7 MiB, 5 passes, 1 lane setting: as strong as its 19 MiB, 2 passes
/// one (the crate's default) for a third of the memory per hash. Hashes made with other
/// parameters still verify: a PHC string carries its own.
const PARAMS: Params = match Params::new(7 * 1024, 5, 1, None) {
    Ok(p) => p,
    Err(_) => panic!("invalid argon2 parameters"),
};

fn argon2() -> Argon2<'static> {
    Argon2::new(argon2::Algorithm::Argon2id, Version::V0x13, PARAMS)
}

/// Runs password hashing or verification `f` on the blocking pool, at most one per core at a
/// time: every hash holds 7 MiB and a core for tens of milliseconds, so a burst of logins
/// queues here instead of taking the server's memory and CPU.
pub async fn hashing<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> anyhow::Result<T> {
    static PERMITS: std::sync::OnceLock<tokio::sync::Semaphore> = std::sync::OnceLock::new();
    let permits = PERMITS.get_or_init(|| {
        tokio::sync::Semaphore::new(
            std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get),
        )
    });
    let _permit = permits.acquire().await?;
    Ok(tokio::task::spawn_blocking(f).await?)
}

/// Hashes a password with argon2id (run it through [`hashing`]).
pub fn hash_password(password: &SecretString) -> anyhow::Result<String> {
    let hash: PasswordHash = argon2()
        .hash_password(password.expose_secret().as_bytes())
        .map_err(|e| anyhow::anyhow!("password hashing failed: {e}"))?;
    Ok(hash.to_string())
}

/// Verifies a password against a PHC string (run it through [`hashing`]). Returns false on any
/// mismatch or malformed hash.
pub fn verify_password(password: &SecretString, phc: &str) -> bool {
    let Ok(parsed) = PasswordHash::new(phc) else {
        return false;
    };
    argon2()
        .verify_password(password.expose_secret().as_bytes(), &parsed)
        .is_ok()
}

/// Claims of an access token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// User id.
    pub sub: String,
    /// Role at issue time (the database is checked on every request anyway).
    pub role: String,
    /// Issued at (unix seconds).
    pub iat: i64,
    /// Expires at (unix seconds).
    pub exp: i64,
    /// Token id.
    pub jti: String,
}

/// Signs and checks access tokens (HS256 with a secret generated once and kept in the vault).
pub struct TokenKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    clock: SharedClock,
    /// Access-token lifetime.
    pub access_ttl: Duration,
}

impl std::fmt::Debug for TokenKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenKeys")
            .field("access_ttl", &self.access_ttl)
            .finish_non_exhaustive()
    }
}

/// Why an access token was refused.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// Bad signature or format.
    #[error("invalid access token")]
    Invalid,
    /// Past its expiry.
    #[error("access token expired; refresh it with POST /api/v1/auth/refresh")]
    Expired,
}

impl TokenKeys {
    /// Keys from the signing secret.
    pub fn new(secret: &[u8], access_ttl: Duration, clock: SharedClock) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        // Expiry is checked against our own clock (testable without sleeping).
        validation.validate_exp = false;
        validation.required_spec_claims.clear();
        Self {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
            clock,
            access_ttl,
        }
    }

    /// Issues an access token.
    pub fn issue(&self, user_id: &str, role: &str) -> anyhow::Result<String> {
        let now = self.clock.now().unix_timestamp();
        let claims = Claims {
            sub: user_id.to_owned(),
            role: role.to_owned(),
            iat: now,
            exp: now + i64::try_from(self.access_ttl.as_secs()).unwrap_or(i64::MAX / 2),
            jti: uuid::Uuid::new_v4().simple().to_string(),
        };
        Ok(jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &self.encoding,
        )?)
    }

    /// Verifies an access token.
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|_| TokenError::Invalid)?;
        if data.claims.exp <= self.clock.now().unix_timestamp() {
            return Err(TokenError::Expired);
        }
        Ok(data.claims)
    }
}

/// A freshly minted refresh token: `<id>.<secret>`; only the SHA-256 of the secret is stored.
#[derive(Debug)]
pub struct NewRefreshToken {
    /// Row id.
    pub id: String,
    /// What the client receives.
    pub token: SecretString,
    /// Stored hash of the secret part.
    pub hash: String,
}

/// Mints a refresh token.
pub fn new_refresh_token() -> NewRefreshToken {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let mut secret = [0u8; 32];
    rand::fill(&mut secret[..]);
    let secret_b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret);
    NewRefreshToken {
        hash: refresh_hash(&secret_b64),
        token: SecretString::from(format!("{id}.{secret_b64}")),
        id,
    }
}

/// Splits a presented refresh token into (id, hash of secret).
pub fn parse_refresh_token(token: &str) -> Option<(String, String)> {
    let (id, secret) = token.split_once('.')?;
    if id.len() != 32 || !id.bytes().all(|b| b.is_ascii_hexdigit()) || secret.len() > 128 {
        return None;
    }
    Some((id.to_owned(), refresh_hash(secret)))
}

fn refresh_hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Constant-time string equality.
pub fn ct_eq(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// Login throttling per username and per client IP (in memory, fixed windows).
pub struct LoginThrottle {
    clock: SharedClock,
    window: Duration,
    max_per_user: u32,
    max_per_ip: u32,
    users: Mutex<HashMap<String, Window>>,
    ips: Mutex<HashMap<IpAddr, Window>>,
}

impl std::fmt::Debug for LoginThrottle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoginThrottle").finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Copy)]
struct Window {
    start: OffsetDateTime,
    failures: u32,
}

const MAX_TRACKED: usize = 100_000;

impl LoginThrottle {
    /// A throttle allowing `max_per_user` / `max_per_ip` failures per `window`.
    pub fn new(clock: SharedClock, window: Duration, max_per_user: u32, max_per_ip: u32) -> Self {
        Self {
            clock,
            window,
            max_per_user,
            max_per_ip,
            users: Mutex::new(HashMap::new()),
            ips: Mutex::new(HashMap::new()),
        }
    }

    fn window_len(&self) -> time::Duration {
        time::Duration::try_from(self.window).unwrap_or(time::Duration::HOUR)
    }

    fn blocked<K: std::hash::Hash + Eq>(
        &self,
        map: &Mutex<HashMap<K, Window>>,
        key: &K,
        max: u32,
    ) -> Option<Duration> {
        let now = self.clock.now();
        let map = map.lock();
        let w = map.get(key)?;
        let end = w.start + self.window_len();
        (w.failures >= max && end > now).then(|| Duration::try_from(end - now).unwrap_or_default())
    }

    /// `Err(retry_after)` when this username or IP has too many recent failures.
    pub fn check(&self, username: &str, ip: IpAddr) -> Result<(), Duration> {
        let user = username.to_lowercase();
        let a = self.blocked(&self.users, &user, self.max_per_user);
        let b = self.blocked(&self.ips, &ip, self.max_per_ip);
        match a.into_iter().chain(b).max() {
            Some(d) => Err(d.max(Duration::from_secs(1))),
            None => Ok(()),
        }
    }

    fn bump<K: std::hash::Hash + Eq + Clone>(&self, map: &Mutex<HashMap<K, Window>>, key: K) {
        let now = self.clock.now();
        let len = self.window_len();
        let mut map = map.lock();
        if map.len() >= MAX_TRACKED {
            map.retain(|_, w| w.start + len > now);
        }
        let w = map.entry(key).or_insert(Window {
            start: now,
            failures: 0,
        });
        if w.start + len <= now {
            *w = Window {
                start: now,
                failures: 0,
            };
        }
        w.failures += 1;
    }

    /// Records a failed login.
    pub fn record_failure(&self, username: &str, ip: IpAddr) {
        self.bump(&self.users, username.to_lowercase());
        self.bump(&self.ips, ip);
    }

    /// A successful login clears the username's counter (not the IP's).
    pub fn record_success(&self, username: &str) {
        self.users.lock().remove(&username.to_lowercase());
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::clock::FakeClock;

    #[test]
    fn password_hash_roundtrip() {
        let pw = SecretString::from("correct horse battery staple");
        let h = hash_password(&pw).unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(verify_password(&pw, &h));
        assert!(!verify_password(&SecretString::from("wrong"), &h));
        assert!(!verify_password(&pw, "not-a-hash"));
        assert!(h.starts_with("$argon2id$v=19$m=7168,t=5,p=1$"), "{h}");
    }

    #[test]
    fn hashes_made_with_the_earlier_parameters_still_verify() {
        let pw = SecretString::from("correct horse battery staple");
        // The argon2 crate's default (19 MiB, 2 passes), which earlier versions stored.
        let old = Argon2::default()
            .hash_password(pw.expose_secret().as_bytes())
            .unwrap()
            .to_string();
        assert!(old.contains("$m=19456,t=2,p=1$"), "{old}");
        assert!(verify_password(&pw, &old));
        assert!(!verify_password(&SecretString::from("wrong"), &old));
    }

    #[tokio::test]
    async fn hashing_runs_at_most_one_per_core_at_a_time() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..cores * 3 {
            let (running, most) = (running.clone(), most.clone());
            tasks.push(tokio::spawn(hashing(move || {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                // Holds its permit long enough for the others to pile up.
                std::thread::sleep(Duration::from_millis(20));
                running.fetch_sub(1, Ordering::SeqCst);
            })));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        // Without the bound the blocking pool would run all of them at once.
        let most = most.load(Ordering::SeqCst);
        assert!(
            (1..=cores).contains(&most),
            "{most} ran at once on {cores} cores"
        );
    }

    #[test]
    fn tokens_expire_by_the_injected_clock() {
        let clock = FakeClock::new();
        let keys = TokenKeys::new(
            b"0123456789abcdef0123456789abcdef",
            Duration::from_secs(60),
            clock.clone(),
        );
        let t = keys.issue("u1", "user").unwrap();
        assert_eq!(keys.verify(&t).unwrap().sub, "u1");
        clock.advance(Duration::from_secs(61));
        assert!(matches!(keys.verify(&t), Err(TokenError::Expired)));
        let other = TokenKeys::new(
            b"another-secret-another-secret-xx",
            Duration::from_secs(60),
            clock,
        );
        assert!(matches!(other.verify(&t), Err(TokenError::Invalid)));
    }

    #[test]
    fn refresh_tokens_parse_back_to_their_hash() {
        let t = new_refresh_token();
        let (id, hash) = parse_refresh_token(t.token.expose_secret()).unwrap();
        assert_eq!(id, t.id);
        assert!(ct_eq(&hash, &t.hash));
        assert!(parse_refresh_token("garbage").is_none());
    }

    #[test]
    fn throttle_blocks_then_releases_after_the_window() {
        let clock = FakeClock::new();
        let th = LoginThrottle::new(clock.clone(), Duration::from_secs(60), 3, 100);
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        for _ in 0..3 {
            assert!(th.check("Alice", ip).is_ok());
            th.record_failure("alice", ip);
        }
        let retry = th.check("ALICE", ip).unwrap_err();
        assert!(retry <= Duration::from_secs(60) && retry >= Duration::from_secs(1));
        assert!(th.check("bob", ip).is_ok());
        clock.advance(Duration::from_secs(61));
        assert!(th.check("alice", ip).is_ok());
    }

    #[test]
    fn throttle_per_ip() {
        let clock: SharedClock = Arc::new(crate::clock::SystemClock);
        let th = LoginThrottle::new(clock, Duration::from_secs(60), 100, 2);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        th.record_failure("a", ip);
        th.record_failure("b", ip);
        assert!(th.check("c", ip).is_err());
        assert!(th.check("c", "10.0.0.2".parse().unwrap()).is_ok());
    }
}
