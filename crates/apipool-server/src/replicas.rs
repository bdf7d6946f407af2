//! Several `apipool serve` processes on one PostgreSQL database (and one Redis) behave as one
//! server.
//!
//! * **Data** — users, refresh tokens, keys, pools, the vault — lives in the database, so every
//!   replica reads the same rows. Refresh-token rotation, reuse detection and logout are row
//!   updates: a token revoked through one replica is refused by all. The JWT signing secret is
//!   sealed in the database too, so an access token issued by one replica is valid on all.
//! * **Live pool engines** are caches of that data. The replica that commits a change announces it
//!   on the PostgreSQL channel [`CHANNEL`] (`pg_notify`); every replica `LISTEN`s and re-syncs the
//!   engines concerned at once (milliseconds). Announcements missed while a listener reconnects are
//!   made up for by a full re-sync right after the reconnect, and by the periodic re-sync
//!   ([`crate::engines::RESYNC_INTERVAL`]).
//! * **Key state** — rate-limit windows, calls in flight, cooldowns, bans — lives in Redis when
//!   `redis_url` is set (see [`crate::engines`]), so the replicas share each key's limits.
//!
//! SQLite is a single-process database: nothing is announced there.

use std::sync::Weak;
use std::time::Duration;

use sqlx::postgres::PgListener;
use tokio_util::sync::CancellationToken;

use crate::engines::Engines;

/// The PostgreSQL notification channel the replicas share.
pub const CHANNEL: &str = "apipool_changes";

/// A change one replica committed that the others' live engines must apply.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Change {
    /// A pool's row or its members changed (the pool's row id).
    Pool(String),
    /// Some of a user's keys changed (rotated, disabled, archived, edited, deleted) or one of the
    /// user's pools was deleted: every live pool of the user is re-read (the user id).
    User(String),
}

impl Change {
    /// The notification payload: `<origin replica> <kind> <id>` (ids are uuids; no secrets).
    pub fn encode(&self, origin: &str) -> String {
        let (kind, id) = match self {
            Self::Pool(id) => ("pool", id),
            Self::User(id) => ("user", id),
        };
        format!("{origin} {kind} {id}")
    }

    /// Parses a payload back into its origin and change (`None`: not ours, ignored).
    pub fn decode(payload: &str) -> Option<(&str, Self)> {
        let mut parts = payload.splitn(3, ' ');
        let origin = parts.next()?;
        let kind = parts.next()?;
        let id = parts.next()?.to_owned();
        let change = match kind {
            "pool" => Self::Pool(id),
            "user" => Self::User(id),
            _ => return None,
        };
        Some((origin, change))
    }
}

/// Longest wait between two attempts to (re)connect the listener.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// Listens on [`CHANNEL`] until `token` is cancelled (or the registry is dropped) and applies
/// the other replicas' changes to `engines`. Never gives up: a lost connection is retried with
/// back-off, and every (re)connect is followed by a full re-sync (changes announced meanwhile
/// are not replayed by PostgreSQL).
pub(crate) async fn listen(
    engines: Weak<Engines>,
    database_url: String,
    replica: String,
    token: CancellationToken,
) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let connected = tokio::select! {
            () = token.cancelled() => return,
            r = subscribe(&database_url) => r,
        };
        let mut listener = match connected {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "cannot listen for other replicas' changes");
                tokio::select! {
                    () = token.cancelled() => return,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        backoff = Duration::from_millis(200);
        tracing::debug!(channel = CHANNEL, "listening for other replicas' changes");
        // Whatever was announced before this point is read from the database now.
        match engines.upgrade() {
            Some(e) => e.resync_all().await,
            None => return,
        }
        loop {
            let next = tokio::select! {
                () = token.cancelled() => return,
                n = listener.try_recv() => n,
            };
            match next {
                Ok(Some(n)) => {
                    let Some(e) = engines.upgrade() else { return };
                    // Apply everything already received as one batch, each change once.
                    let mut batch = vec![n.payload().to_owned()];
                    while let Some(more) = listener.next_buffered() {
                        batch.push(more.payload().to_owned());
                    }
                    let mut seen = std::collections::HashSet::new();
                    for payload in &batch {
                        match Change::decode(payload) {
                            Some((origin, change)) if origin != replica => {
                                if seen.insert(change.clone()) {
                                    e.apply_remote(change).await;
                                }
                            }
                            Some(_) => {}
                            None => tracing::debug!(payload, "ignored an unknown notification"),
                        }
                    }
                }
                // The connection was lost and re-established: changes may have been missed.
                Ok(None) => {
                    tracing::warn!(
                        "lost the connection that listens for other replicas' changes; reconnected, re-syncing every live pool"
                    );
                    let Some(e) = engines.upgrade() else { return };
                    e.resync_all().await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "listening for other replicas' changes failed; reconnecting");
                    break;
                }
            }
        }
    }
}

/// Answers "does Redis answer?" for `/ready`, on one cached connection (re-made after a failure).
pub struct RedisProbe {
    client: redis::Client,
    conn: tokio::sync::Mutex<Option<redis::aio::MultiplexedConnection>>,
}

impl std::fmt::Debug for RedisProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may carry a password.
        f.debug_struct("RedisProbe")
            .field(
                "endpoint",
                &self.client.get_connection_info().addr().to_string(),
            )
            .finish_non_exhaustive()
    }
}

/// How long `/ready` waits for Redis.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

impl RedisProbe {
    /// A probe of the Redis at `url` (nothing connects yet).
    pub fn new(url: &str) -> anyhow::Result<Self> {
        let client = redis::Client::open(url)
            .map_err(|e| anyhow::anyhow!("redis_url is not a Redis URL ({:?})", e.kind()))?;
        Ok(Self {
            client,
            conn: tokio::sync::Mutex::new(None),
        })
    }

    /// `PING` within [`PROBE_TIMEOUT`].
    pub async fn ping(&self) -> bool {
        let mut conn = self.conn.lock().await;
        let answered = tokio::time::timeout(PROBE_TIMEOUT, async {
            if conn.is_none() {
                *conn = Some(self.client.get_multiplexed_async_connection().await?);
            }
            match conn.as_mut() {
                Some(c) => redis::cmd("PING").query_async::<String>(c).await,
                None => Ok(String::new()),
            }
        })
        .await;
        match answered {
            Ok(Ok(pong)) if pong == "PONG" => true,
            _ => {
                *conn = None;
                false
            }
        }
    }
}

async fn subscribe(database_url: &str) -> Result<PgListener, sqlx::Error> {
    let mut listener = PgListener::connect(database_url).await?;
    listener.listen(CHANNEL).await?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_round_trip() {
        for change in [
            Change::Pool("p-1".to_owned()),
            Change::User("u-1".to_owned()),
        ] {
            let text = change.encode("r1");
            assert_eq!(Change::decode(&text), Some(("r1", change)));
        }
    }

    #[test]
    fn unknown_payloads_are_ignored() {
        assert_eq!(Change::decode("r1 vault 3"), None);
        assert_eq!(Change::decode("r1 pool"), None);
        assert_eq!(Change::decode(""), None);
    }
}
