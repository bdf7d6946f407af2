//! [`Failure`]: what a client command prints on error, and the exit code it ends with.

use apipool::sdk::SdkError;
use std::fmt;

/// Exit codes of the client commands (also listed in `apipool --help`).
pub(crate) mod code {
    /// The server refused the request, the resource does not exist, the input is unusable, ...
    pub(crate) const ERROR: u8 = 1;
    /// A batch finished but some items failed or some input lines were malformed.
    pub(crate) const BATCH_INCOMPLETE: u8 = 3;
    /// Not logged in, wrong password, or the stored session was refused: run `apipool login`.
    pub(crate) const AUTH: u8 = 4;
    /// A batch stopped on SIGINT/SIGTERM (rerun the same command to resume).
    pub(crate) const INTERRUPTED: u8 = 130;
}

/// An error a client command ends with: a plain message and an exit code. Never carries a secret.
#[derive(Debug)]
pub(crate) struct Failure {
    pub(crate) code: u8,
    pub(crate) message: String,
}

impl Failure {
    pub(crate) fn new(code: u8, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    /// A general error (exit code 1).
    pub(crate) fn error(message: impl Into<String>) -> Self {
        Self::new(code::ERROR, message)
    }

    /// An authentication problem (exit code 4).
    pub(crate) fn auth(message: impl Into<String>) -> Self {
        Self::new(code::AUTH, message)
    }

    /// The server's answer to a request: its `detail`, plainly.
    pub(crate) fn from_status(status: u16, detail: &str) -> Self {
        match status {
            401 => Self::auth(format!(
                "{detail} (HTTP 401): the stored session is no longer valid; run `apipool login` again"
            )),
            403 => Self::error(format!("{detail} (HTTP 403)")),
            _ => Self::error(format!("{detail} (HTTP {status})")),
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<SdkError> for Failure {
    fn from(e: SdkError) -> Self {
        match &e {
            SdkError::Auth {
                status: 401,
                detail,
            } => Self::auth(format!(
                "{detail} (HTTP 401): log in again with `apipool login`"
            )),
            SdkError::Auth { status, detail }
            | SdkError::NotFound { status, detail }
            | SdkError::RateLimited { status, detail, .. }
            | SdkError::Rejected { status, detail } => Self::from_status(*status, detail),
            _ => Self::error(e.to_string()),
        }
    }
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Self {
        Self::error(e.to_string())
    }
}

/// `Result` of a client command.
pub(crate) type CliResult<T = ()> = Result<T, Failure>;

/// Adds what was being done to an I/O error.
pub(crate) trait Context<T> {
    fn context(self, what: impl FnOnce() -> String) -> CliResult<T>;
}

impl<T, E: fmt::Display> Context<T> for Result<T, E> {
    fn context(self, what: impl FnOnce() -> String) -> CliResult<T> {
        self.map_err(|e| Failure::error(format!("{}: {e}", what())))
    }
}
