//! One upstream server connection: its socket, what it has been told, and the key to cancel
//! what it runs.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

use crate::auth::upstream::{self, Login};
use crate::error::UpstreamError;
use crate::params::{Names, Params};
use crate::protocol::sql::Leftovers;

/// The Unix socket PostgreSQL listens on for `addr` (`host:port`) when its host is a directory
/// (starts with `/`, as in libpq and PgBouncer): `<dir>/.s.PGSQL.<port>`. `None` for TCP.
pub fn unix_socket_path(addr: &str) -> Option<PathBuf> {
    let (host, port) = addr.rsplit_once(':')?;
    host.starts_with('/')
        .then(|| Path::new(host).join(format!(".s.PGSQL.{port}")))
}

/// The same path for the life of the process, so a [`CancelTarget`] stays `Copy` (it is copied
/// into the cancel registry on every transaction). One entry per distinct socket path the
/// configuration has named, so the set stays as small as the configuration.
fn interned(path: PathBuf) -> &'static Path {
    static PATHS: Mutex<Vec<&'static Path>> = Mutex::new(Vec::new());
    let mut paths = PATHS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(known) = paths.iter().find(|p| **p == path) {
        return known;
    }
    let leaked: &'static Path = Box::leak(path.into_boxed_path());
    paths.push(leaked);
    leaked
}

/// Where a server connection's CancelRequest must go: the address it is connected to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelAddr {
    Tcp(SocketAddr),
    Unix(&'static Path),
}

/// Where and how to cancel what a server connection is running.
#[derive(Debug, Clone, Copy)]
pub struct CancelTarget {
    pub addr: CancelAddr,
    pub pid: i32,
    pub secret: i32,
}

impl CancelTarget {
    /// Sends a CancelRequest on a new connection, as PostgreSQL requires.
    pub async fn send(self) -> std::io::Result<()> {
        let mut buf = BytesMut::with_capacity(16);
        frontend::cancel_request(self.pid, self.secret, &mut buf);
        let limit = Duration::from_secs(5);
        match self.addr {
            CancelAddr::Tcp(addr) => {
                let stream = tokio::time::timeout(limit, TcpStream::connect(addr)).await??;
                Self::deliver(stream, &buf).await
            }
            CancelAddr::Unix(path) => {
                let stream = tokio::time::timeout(limit, UnixStream::connect(path)).await??;
                Self::deliver(stream, &buf).await
            }
        }
    }

    /// Writes the request and waits (bounded) for PostgreSQL to close the connection.
    async fn deliver<S: AsyncReadExt + AsyncWriteExt + Unpin>(
        mut stream: S,
        request: &[u8],
    ) -> std::io::Result<()> {
        stream.write_all(request).await?;
        // PostgreSQL closes the connection once it has the request; wait for that so the cancel
        // has been read before we return.
        let mut sink = [0u8; 16];
        let _ = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut sink)).await;
        Ok(())
    }
}

/// A logged-in server connection.
pub struct ServerConn {
    pub stream: crate::stream::Stream,
    /// The session parameters this server has now (tracked names only).
    pub params: Params,
    pub cancel: CancelTarget,
    pub created: Instant,
    /// Replaced between transactions once this old (0 = never); set by the pool, with jitter.
    pub lifetime: Duration,
    /// Places held under shared caps (`max_db_connections`, `max_user_connections`).
    pub permits: Vec<tokio::sync::OwnedSemaphorePermit>,
    /// Named statements prepared on it by the proxy.
    pub statements: crate::protocol::prepared::ServerStatements,
    /// Set while a client holds it; a server returned to the pool still dirty (its client's task
    /// ended abruptly) is closed at the next checkout instead of reused.
    pub dirty: bool,
    /// Session state a client may have left (session SET, SET ROLE, LISTEN...): cleaned up
    /// before another client gets this server.
    pub leftovers: Leftovers,
    /// The pool generation it was opened in (RECONNECT closes older ones).
    pub generation: u64,
    /// Its entry in SHOW SERVERS (set by the pool).
    pub info: Option<crate::sessions::Registered<crate::sessions::ServerInfo>>,
    /// Its pool's counters (set by the pool): the close is counted there, with its reason.
    pub stats: Option<std::sync::Arc<crate::stats::PoolStats>>,
    /// Why it is being closed ([`crate::metrics::CloseReason`]), set by whoever closes it.
    pub close_reason: std::sync::atomic::AtomicU8,
}

impl ServerConn {
    /// Records why this connection is about to be closed.
    pub fn closing(&self, reason: crate::metrics::CloseReason) {
        self.close_reason
            .store(reason as u8, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for ServerConn {
    fn drop(&mut self) {
        if let Some(stats) = &self.stats {
            let reason = self.close_reason.load(std::sync::atomic::Ordering::Relaxed);
            stats
                .metrics
                .closed(crate::metrics::CloseReason::from_u8(reason));
        }
    }
}

impl ServerConn {
    /// The socket to `login.addr`: TCP (then TLS as `server_tls_sslmode` says), or the Unix
    /// socket in the directory the host names. TLS is never asked for over a Unix socket, as
    /// libpq and PgBouncer do not: the connection does not leave the machine.
    async fn open(login: &Login) -> Result<(crate::stream::Stream, CancelAddr), UpstreamError> {
        let failed = |source| UpstreamError::Connect {
            addr: login.addr.clone(),
            source,
        };
        if let Some(path) = unix_socket_path(&login.addr) {
            let stream = UnixStream::connect(&path).await.map_err(failed)?;
            return Ok((
                crate::stream::Stream::Unix(stream),
                CancelAddr::Unix(interned(path)),
            ));
        }
        let stream = TcpStream::connect(&login.addr).await.map_err(failed)?;
        stream.set_nodelay(true)?;
        let addr = stream.peer_addr()?;
        let stream = crate::tls::connect::negotiate(stream, &login.tls, &login.addr).await?;
        Ok((stream, CancelAddr::Tcp(addr)))
    }

    /// Connects and logs in; also returns every parameter the server reported at login.
    pub async fn connect(
        login: &Login,
        timeout: Duration,
        names: Names,
    ) -> Result<(ServerConn, Vec<(String, String)>), UpstreamError> {
        let attempt = async {
            let (mut stream, addr) = Self::open(login).await?;
            let done = upstream::login(&mut stream, login).await?;
            Ok::<_, UpstreamError>((stream, done, addr))
        };
        let (stream, done, addr) = match tokio::time::timeout(timeout, attempt).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(UpstreamError::ConnectTimeout {
                    addr: login.addr.clone(),
                    secs: timeout.as_secs_f64(),
                });
            }
        };
        let mut params = Params::new(names);
        for (name, value) in &done.params {
            params.set_reported(name, value);
        }
        let server = ServerConn {
            stream,
            params,
            cancel: CancelTarget {
                addr,
                pid: done.pid,
                secret: done.secret,
            },
            created: Instant::now(),
            lifetime: Duration::ZERO,
            permits: Vec::new(),
            statements: Default::default(),
            dirty: false,
            leftovers: Leftovers::NONE,
            generation: 0,
            info: None,
            stats: None,
            close_reason: Default::default(),
        };
        Ok((server, done.params))
    }

    /// False when an idle server has closed or sent something unasked (a FATAL before closing,
    /// say): either way it cannot be used. Costs no round trip ([`crate::stream::Stream::is_usable`]).
    pub fn is_usable(&self) -> bool {
        self.stream.is_usable()
    }

    /// Makes this server's session parameters match `wanted`, in one round trip, only for those
    /// that differ. On success `wanted` takes the server's spelling of each value it reports.
    pub async fn apply_params(&mut self, wanted: &mut Params) -> Result<(), ApplyError> {
        let sql = self.params.set_statements(wanted);
        if sql.is_empty() {
            return Ok(());
        }
        let mut result = self.simple_query(&sql).await;
        if result.is_ok() {
            self.params.applied(wanted);
            wanted.adopt(&self.params);
        } else if let Err(ApplyError::Rejected { message, .. }) = &mut result {
            message.insert_str(0, "could not restore session parameters on a server: ");
        }
        result
    }

    /// Runs a simple query whose results nobody reads; records parameter changes.
    pub async fn simple_query(&mut self, sql: &str) -> Result<(), ApplyError> {
        self.query_rows(sql).await.map(|_| ())
    }

    /// Runs a simple query (its statements in one implicit transaction) and returns the rows of
    /// all of them, as text (`None` for NULL). For the proxy's own small queries only.
    pub async fn query_rows(&mut self, sql: &str) -> Result<Vec<Vec<Option<String>>>, ApplyError> {
        let mut rows = Vec::new();
        let mut buf = BytesMut::new();
        frontend::query(sql, &mut buf).map_err(UpstreamError::Io)?;
        self.stream
            .write_all(&buf)
            .await
            .map_err(UpstreamError::Io)?;
        buf.clear();
        let mut rejected = None;
        loop {
            let msg = match Message::parse(&mut buf).map_err(UpstreamError::Io)? {
                Some(m) => m,
                None => {
                    if self
                        .stream
                        .read_buf(&mut buf)
                        .await
                        .map_err(UpstreamError::Io)?
                        == 0
                    {
                        return Err(ApplyError::Upstream(UpstreamError::Io(
                            std::io::ErrorKind::UnexpectedEof.into(),
                        )));
                    }
                    continue;
                }
            };
            match msg {
                Message::ParameterStatus(body) => {
                    if let (Ok(name), Ok(value)) = (body.name(), body.value()) {
                        self.params.set_reported(name, value);
                    }
                }
                Message::ErrorResponse(body) => rejected = Some(crate::params::error_fields(&body)),
                Message::DataRow(row) => {
                    use fallible_iterator::FallibleIterator;
                    let buf = row.buffer();
                    let values = row
                        .ranges()
                        .map(|r| Ok(r.and_then(|r| buf.get(r)).map(String::from_utf8_lossy)))
                        .map(|v| Ok(v.map(|v| v.into_owned())))
                        .collect()
                        .map_err(UpstreamError::Io)?;
                    rows.push(values);
                }
                Message::ReadyForQuery(body) => {
                    return match rejected {
                        Some((code, message)) => Err(ApplyError::Rejected { code, message }),
                        None if body.status() == b'I' => Ok(rows),
                        None => Err(ApplyError::Rejected {
                            code: "XX000".into(),
                            message: "server left in a transaction by a reset query".into(),
                        }),
                    };
                }
                _ => {}
            }
        }
    }
}

/// A query the proxy itself sent failed.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("{message}")]
    Rejected { code: String, message: String },
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_host_names_postgres_unix_socket() {
        assert_eq!(
            unix_socket_path("/var/run/postgresql:5433"),
            Some(PathBuf::from("/var/run/postgresql/.s.PGSQL.5433"))
        );
        assert_eq!(unix_socket_path("127.0.0.1:5432"), None);
        assert_eq!(unix_socket_path("db.example.com:5432"), None);
        assert_eq!(unix_socket_path("[::1]:5432"), None);
    }

    #[test]
    fn socket_paths_are_interned_once() {
        let a = interned(PathBuf::from("/tmp/fg-intern-test/.s.PGSQL.1"));
        let b = interned(PathBuf::from("/tmp/fg-intern-test/.s.PGSQL.1"));
        assert!(
            std::ptr::eq(a, b),
            "the same path gives the same &'static Path"
        );
        let c = interned(PathBuf::from("/tmp/fg-intern-test/.s.PGSQL.2"));
        assert_ne!(a, c);
    }
}
