//! Typed errors. Each knows who caused it, which decides the SQLSTATE a client is sent and
//! whether a server connection can be kept.

use crate::protocol::sqlstate;

/// Errors from talking to PostgreSQL (the upstream server).
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("could not connect to upstream server {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("timed out connecting to upstream server {addr} after {secs:.1}s")]
    ConnectTimeout { addr: String, secs: f64 },
    #[error("upstream server {addr} refused the login: {message}")]
    Refused {
        addr: String,
        code: String,
        message: String,
    },
    #[error("upstream server {addr} asks for {method} authentication, which the proxy cannot do")]
    UnsupportedAuth { addr: String, method: &'static str },
    #[error(
        "no plain-text password to log in upstream as `{user}`: set `password` in [databases.{db}] \
         or store the user's password in plain text (md5 and SCRAM hashes cannot answer SCRAM)"
    )]
    NoPassword { user: String, db: String },
    #[error("TLS with upstream server {addr}: {reason}")]
    Tls { addr: String, reason: String },
    #[error("upstream server {addr} broke the protocol: {detail}")]
    Protocol { addr: String, detail: String },
    #[error(
        "upstream server {addr} failed recently ({last}); next attempt in {wait_ms} ms (server_login_retry)"
    )]
    RetryLater {
        addr: String,
        wait_ms: u64,
        last: String,
    },
    #[error("{setting} ({max}) reached for {name} and no server connection became free in time")]
    CapReached {
        setting: &'static str,
        name: String,
        max: usize,
    },
    #[error("upstream connection lost: {0}")]
    Io(#[from] std::io::Error),
}

impl UpstreamError {
    /// True when trying again shortly may succeed: the server is down, restarting, starting up
    /// or full, or the proxy is backing off after such failures. False for what only a
    /// configuration change fixes (a refused password, an unknown database).
    pub fn is_transient(&self) -> bool {
        match self {
            UpstreamError::Connect { .. }
            | UpstreamError::ConnectTimeout { .. }
            | UpstreamError::RetryLater { .. }
            | UpstreamError::Io(_) => true,
            // 57P01-03: shutting down / starting up / cannot connect now; 53300: too many
            // connections; 08xxx: connection trouble.
            UpstreamError::Refused { code, .. } => {
                code.starts_with("57P") || code == "53300" || code.starts_with("08")
            }
            _ => false,
        }
    }

    /// How long to wait before the next attempt can be made, when known.
    pub fn retry_after(&self) -> Option<std::time::Duration> {
        match self {
            UpstreamError::RetryLater { wait_ms, .. } => {
                Some(std::time::Duration::from_millis(*wait_ms))
            }
            _ => None,
        }
    }

    /// The SQLSTATE a client waiting for this server is sent.
    pub fn sqlstate(&self) -> String {
        match self {
            // Passed through when it tells the client something true about the database
            // (unknown database, too many connections, starting up); a rejected password is the
            // proxy's configuration problem, not the client's.
            UpstreamError::Refused { code, .. } if !code.starts_with("28") => code.clone(),
            UpstreamError::Refused { .. } => "08004".into(),
            UpstreamError::CapReached { .. } => sqlstate::TOO_MANY_CONNECTIONS.into(),
            _ => sqlstate::CONNECTION_FAILURE.into(),
        }
    }
}

/// Errors of the proxy as a whole (start-up, listening).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}
