//! [`SdkError`]: what can go wrong talking to apipool-server, with the HTTP status when there is one.

use std::time::Duration;

/// An error from the SDK. Each variant says what went wrong and what to do; none carries a secret.
///
/// ```
/// use apipool::sdk::SdkError;
/// let e = SdkError::from_status(404, "pool 'prices' not found".into(), None);
/// assert!(matches!(e, SdkError::NotFound { .. }));
/// assert_eq!(e.status(), Some(404));
/// assert!(!e.is_transient());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SdkError {
    /// The server refused the credentials or the token (401/403), and refreshing did not help.
    #[error(
        "authentication failed (HTTP {status}): {detail}; check the username and password, or log in again"
    )]
    Auth {
        /// 401 or 403.
        status: u16,
        /// The server's explanation.
        detail: String,
    },
    /// The pool (or resource) does not exist or belongs to another user (404).
    #[error(
        "not found (HTTP {status}): {detail}; check the pool identifier and that your user owns it"
    )]
    NotFound {
        /// 404.
        status: u16,
        /// The server's explanation.
        detail: String,
    },
    /// The server could not be reached, or answered 5xx/503 (e.g. no usable key behind a proxy call).
    #[error("apipool-server unavailable{}: {detail}; retry later", fmt_status(*.status))]
    Unavailable {
        /// The HTTP status, when the server answered.
        status: Option<u16>,
        /// What happened.
        detail: String,
    },
    /// The server throttled us (429).
    #[error("rate limited by apipool-server (HTTP {status}): {detail}; retry{}", .retry_after.map(|d| format!(" in {:.1}s", d.as_secs_f64())).unwrap_or_else(|| " later".to_owned()))]
    RateLimited {
        /// 429.
        status: u16,
        /// How long the server asked us to wait, when it said.
        retry_after: Option<Duration>,
        /// The server's explanation.
        detail: String,
    },
    /// The server rejected the request as invalid (400, 409, 413, 422, ...).
    #[error("request rejected (HTTP {status}): {detail}")]
    Rejected {
        /// The HTTP status.
        status: u16,
        /// The server's explanation.
        detail: String,
    },
    /// The server answered something this SDK does not understand (unexpected body or status).
    #[error(
        "unexpected answer from apipool-server{}: {detail}; check that the URL points at apipool-server and versions match", fmt_status(*.status)
    )]
    Protocol {
        /// The HTTP status, when there was an answer.
        status: Option<u16>,
        /// What was wrong with it.
        detail: String,
    },
    /// A proxied call reached the server but failed there (`success: false`).
    #[error("the proxied call failed on the server: {error}")]
    Remote {
        /// The HTTP status of the answer.
        status: u16,
        /// The server's `error` field.
        error: String,
        /// The key the server used, when it said (an identifier, never a raw key).
        key_identifier: Option<String>,
    },
    /// The server URL or an argument is unusable.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The pool configuration from the server is invalid.
    #[error("the server's pool configuration is invalid: {0}")]
    Config(#[from] crate::ConfigError),
    /// The local pool refused an operation (e.g. a duplicate key).
    #[error(transparent)]
    Pool(#[from] crate::Error),
}

fn fmt_status(status: Option<u16>) -> String {
    status.map(|s| format!(" (HTTP {s})")).unwrap_or_default()
}

impl SdkError {
    /// The HTTP status of the server's answer, when there was one.
    ///
    /// ```
    /// use apipool::sdk::SdkError;
    /// assert_eq!(SdkError::from_status(401, "bad token".into(), None).status(), Some(401));
    /// assert_eq!(SdkError::InvalidArgument("x".into()).status(), None);
    /// ```
    pub fn status(&self) -> Option<u16> {
        match self {
            SdkError::Auth { status, .. }
            | SdkError::NotFound { status, .. }
            | SdkError::RateLimited { status, .. }
            | SdkError::Rejected { status, .. }
            | SdkError::Remote { status, .. } => Some(*status),
            SdkError::Unavailable { status, .. } | SdkError::Protocol { status, .. } => *status,
            SdkError::InvalidArgument(_) | SdkError::Config(_) | SdkError::Pool(_) => None,
        }
    }

    /// True for errors that may go away by themselves (server down, 5xx, throttling): a
    /// background refresher keeps its pool and tries again.
    ///
    /// ```
    /// use apipool::sdk::SdkError;
    /// assert!(SdkError::from_status(503, "no key".into(), None).is_transient());
    /// assert!(!SdkError::from_status(403, "no".into(), None).is_transient());
    /// ```
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            SdkError::Unavailable { .. } | SdkError::RateLimited { .. }
        )
    }

    /// The typed error for a non-2xx status and the server's `detail`.
    ///
    /// ```
    /// use apipool::sdk::SdkError;
    /// use std::time::Duration;
    /// let e = SdkError::from_status(429, "slow down".into(), Some(Duration::from_secs(2)));
    /// assert!(matches!(e, SdkError::RateLimited { retry_after: Some(_), .. }));
    /// ```
    pub fn from_status(status: u16, detail: String, retry_after: Option<Duration>) -> Self {
        match status {
            401 | 403 => SdkError::Auth { status, detail },
            404 => SdkError::NotFound { status, detail },
            429 => SdkError::RateLimited {
                status,
                retry_after,
                detail,
            },
            500..=599 => SdkError::Unavailable {
                status: Some(status),
                detail,
            },
            400..=499 => SdkError::Rejected { status, detail },
            _ => SdkError::Protocol {
                status: Some(status),
                detail,
            },
        }
    }

    /// Maps a transport error (connection refused, timeout, bad body).
    pub(crate) fn transport(e: &reqwest::Error) -> Self {
        let status = e.status().map(|s| s.as_u16());
        if e.is_decode() {
            SdkError::Protocol {
                status,
                detail: describe(e),
            }
        } else if e.is_builder() {
            SdkError::InvalidArgument(describe(e))
        } else {
            SdkError::Unavailable {
                status,
                detail: describe(e),
            }
        }
    }
}

/// The error in words without its URL (which may carry a query-string secret): its kind and the
/// chain of causes.
pub(crate) fn describe(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "cannot connect"
    } else if e.is_decode() {
        "cannot decode the body"
    } else if e.is_body() {
        "body error"
    } else if e.is_builder() {
        "cannot build the request"
    } else if e.is_redirect() {
        "redirect error"
    } else if e.is_request() {
        "request failed"
    } else {
        "HTTP error"
    };
    let mut msg = kind.to_owned();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        let text = s.to_string();
        if !msg.ends_with(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
        src = s.source();
    }
    msg
}
