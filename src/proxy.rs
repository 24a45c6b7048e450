//! The listener: accepts clients, enforces `max_client_conn`, and shuts down gracefully.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::auth::UserStore;
use crate::cancel::CancelRegistry;
use crate::config::Config;
use crate::error::Error;
use crate::pool::Pools;
use crate::protocol::backend::{self, Severity};
use crate::protocol::sqlstate;

/// What every client session shares.
pub struct Shared {
    pub config: Arc<Config>,
    pub users: Arc<UserStore>,
    pub pools: Pools,
    pub cancels: Arc<CancelRegistry>,
    /// Named prepared statements, proxy-wide.
    pub statements: crate::protocol::prepared::Registry,
    /// Flips to `true` once, when the proxy starts shutting down.
    pub shutdown: watch::Sender<bool>,
    /// Admitted clients, by IP, database and user.
    pub limits: Arc<crate::limits::ClientLimits>,
}

/// A running proxy.
pub struct Proxy {
    local_addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Binds `[floodgate] listen` and starts serving.
    pub async fn start(config: Config) -> Result<Proxy, Error> {
        let config = Arc::new(config);
        let listen = config.floodgate.listen;
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|source| Error::Listen {
                addr: listen.to_string(),
                source,
            })?;
        let local_addr = listener.local_addr()?;
        let users = Arc::new(UserStore::new(&config));
        let statement_budget = config.floodgate.max_prepared_statement_bytes;
        let shared = Arc::new(Shared {
            pools: Pools::new(config.clone(), users.clone()),
            users,
            config,
            cancels: Arc::new(CancelRegistry::default()),
            statements: crate::protocol::prepared::Registry::new(statement_budget),
            shutdown: watch::Sender::new(false),
            limits: Default::default(),
        });
        let acceptor = tokio::spawn(accept_loop(listener, shared.clone()));
        tracing::info!(%local_addr, "floodgate listening");
        Ok(Proxy {
            local_addr,
            shared,
            acceptor,
        })
    }

    /// The address clients connect to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting, lets transactions in flight finish (up to `shutdown_timeout`), closes
    /// every client and server connection.
    pub async fn shutdown(self) {
        self.shared.shutdown.send_replace(true);
        let _ = self.acceptor.await;
        self.shared.pools.close_all();
    }
}

/// Accepts until shutdown, then waits for sessions to end.
async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut sessions = JoinSet::new();
    let mut stop = shared.shutdown.subscribe();
    loop {
        tokio::select! {
            _ = async { let _ = stop.wait_for(|s| *s).await; } => break,
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let shared = shared.clone();
                    sessions.spawn(admit(stream, shared));
                }
                Err(e) => {
                    // Out of file descriptors, typically: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
        }
    }
    drop(listener);
    let grace = shared.config.floodgate.shutdown_timeout;
    if tokio::time::timeout(grace, async {
        while sessions.join_next().await.is_some() {}
    })
    .await
    .is_err()
    {
        tracing::warn!(
            remaining = sessions.len(),
            "shutdown_timeout reached; closing remaining clients"
        );
        sessions.abort_all();
        while sessions.join_next().await.is_some() {}
    }
}

/// Counts the client against `max_client_conn` and its IP's limits, then serves it.
async fn admit(mut stream: TcpStream, shared: Arc<Shared>) {
    let ip = match stream.peer_addr() {
        Ok(addr) => addr.ip(),
        Err(_) => return,
    };
    let _admitted = match shared.limits.admit_connection(&shared.config.floodgate, ip) {
        Ok(admitted) => admitted,
        Err(e) => {
            tracing::debug!(%ip, error = %e, "client refused");
            let message = e.to_string();
            let refusal = refuse(&mut stream, &shared, &message);
            let _ = tokio::time::timeout(REFUSAL_TIMEOUT, refusal).await;
            return;
        }
    };
    crate::client::serve(stream, shared.clone()).await;
}

/// How long a refused client has to send its StartupMessage before it is simply closed.
const REFUSAL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Tells a client over a limit why, the way PostgreSQL does: after its StartupMessage (an
/// SSLRequest or GSSENCRequest first is answered `N`), so libpq shows the 53300 and its
/// message instead of "error during SSL exchange". A CancelRequest is still carried out.
async fn refuse(stream: &mut TcpStream, shared: &Shared, message: &str) {
    use crate::protocol::startup::{StartupPacket, read_startup};
    loop {
        match read_startup(stream).await {
            Ok(Some(StartupPacket::SslRequest | StartupPacket::GssEncRequest)) => {
                if stream.write_all(b"N").await.is_err() {
                    return;
                }
            }
            Ok(Some(StartupPacket::Cancel { pid, secret })) => {
                if let Some(target) = shared.cancels.target(pid, secret) {
                    let _ = target.send().await;
                }
                return;
            }
            Ok(Some(StartupPacket::Startup { .. })) => break,
            Ok(None) | Err(_) => return,
        }
    }
    let mut buf = BytesMut::new();
    backend::error(
        &mut buf,
        Severity::Fatal,
        sqlstate::TOO_MANY_CONNECTIONS,
        message,
    );
    let _ = stream.write_all(&buf).await;
}
