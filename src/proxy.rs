//! The listener: accepts clients, enforces `max_client_conn`, and shuts down gracefully.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use crate::config::Config;
use crate::error::Error;
use crate::protocol::backend::{self, Severity};
use crate::protocol::sqlstate;
pub use crate::shared::{Shared, StopMode};

/// A running proxy.
pub struct Proxy {
    local_addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: tokio::task::JoinHandle<()>,
    /// The HTTP endpoint (`[metrics] listen`), if configured.
    metrics: Option<(SocketAddr, tokio::task::JoinHandle<()>)>,
}

impl Proxy {
    /// Binds `[floodgate] listen` and starts serving.
    pub async fn start(config: Config) -> Result<Proxy, Error> {
        Proxy::start_from(config, None).await
    }

    /// Like [`Proxy::start`], remembering the file RELOAD and SIGHUP read again.
    pub async fn start_from(config: Config, path: Option<PathBuf>) -> Result<Proxy, Error> {
        let listen = config.floodgate.listen;
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|source| Error::Listen {
                addr: listen.to_string(),
                source,
            })?;
        let local_addr = listener.local_addr()?;
        let metrics_listener = match &config.metrics {
            Some(m) => Some(
                TcpListener::bind(m.listen)
                    .await
                    .map_err(|source| Error::Listen {
                        addr: m.listen.to_string(),
                        source,
                    })?,
            ),
            None => None,
        };
        let shared = Arc::new(Shared::new(config, path));
        let metrics = match metrics_listener {
            Some(listener) => {
                let addr = listener.local_addr()?;
                tracing::info!(%addr, "metrics endpoint listening");
                let task = tokio::spawn(crate::metrics::serve(listener, shared.clone()));
                Some((addr, task))
            }
            None => None,
        };
        tokio::spawn(rotate_stats(Arc::downgrade(&shared)));
        if shared.pools.budget.is_some() {
            tokio::spawn(crate::budget::poll::run(Arc::downgrade(&shared)));
        }
        let acceptor = tokio::spawn(accept_loop(listener, shared.clone()));
        tracing::info!(%local_addr, "floodgate listening");
        Ok(Proxy {
            local_addr,
            shared,
            acceptor,
            metrics,
        })
    }

    /// The address clients connect to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The address of the HTTP endpoint (`[metrics] listen`), if configured.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().map(|(addr, _)| *addr)
    }

    /// The live state (configuration, pools, sessions, switches).
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Stops accepting, lets transactions in flight finish (up to `shutdown_timeout`), closes
    /// every client and server connection.
    pub async fn shutdown(self) {
        self.shared.request_stop(StopMode::WaitForServers);
        self.stopped().await;
    }

    /// Waits until the proxy has stopped (a stop asked for by a signal or the console SHUTDOWN)
    /// and every client is gone, then closes the pools.
    pub async fn stopped(self) {
        let _ = self.acceptor.await;
        if let Some((_, task)) = self.metrics {
            task.abort();
        }
        self.shared.pools.close_all();
    }

    /// Serves until stopped, acting on signals: SIGHUP reloads, SIGUSR1 pauses every database,
    /// SIGUSR2 resumes them, SIGTERM drains and stops, SIGINT stops at once.
    pub async fn run(self) {
        let shared = self.shared.clone();
        let signals = tokio::spawn(crate::signals::handle(shared));
        self.stopped().await;
        signals.abort();
    }
}

/// Closes a `stats_period` for SHOW STATS averages, until the proxy is gone.
async fn rotate_stats(shared: std::sync::Weak<Shared>) {
    loop {
        let Some(period) = shared.upgrade().map(|s| s.config().floodgate.stats_period) else {
            return;
        };
        tokio::time::sleep(period.max(std::time::Duration::from_millis(100))).await;
        match shared.upgrade() {
            Some(shared) => shared.stats.rotate(),
            None => return,
        }
    }
}

/// Accepts until asked to stop, then stops the way it was asked.
async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut sessions = JoinSet::new();
    let mut stop = shared.stop.subscribe();
    let mode = loop {
        tokio::select! {
            mode = async { stop.wait_for(Option::is_some).await.ok().and_then(|m| *m) } => {
                break mode.unwrap_or(StopMode::Fast);
            }
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
    };
    drop(listener);
    tracing::info!(?mode, "stopping: no new clients");
    let grace = match mode {
        StopMode::WaitForClients => None,
        StopMode::WaitForServers => Some(shared.config().floodgate.shutdown_timeout),
        StopMode::Fast => {
            for client in shared.sessions.clients() {
                client.kill.fire();
            }
            Some(FAST_STOP_GRACE)
        }
    };
    if mode != StopMode::WaitForClients {
        // The flag first: a client registered after the loop below sees it when its session
        // starts; every one registered before is told through its own lock-free flag.
        shared.shutdown.send_replace(true);
        for client in shared.sessions.clients() {
            client.stop.fire();
        }
    }
    let all_gone = async { while sessions.join_next().await.is_some() {} };
    let timed_out = match grace {
        None => {
            all_gone.await;
            false
        }
        Some(grace) => tokio::time::timeout(grace, all_gone).await.is_err(),
    };
    if timed_out {
        tracing::warn!(
            remaining = sessions.len(),
            "shutdown_timeout reached; closing remaining clients"
        );
        sessions.abort_all();
        while sessions.join_next().await.is_some() {}
    }
}

/// How long a fast stop waits for killed sessions to send their FATAL.
const FAST_STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// Counts the client against `max_client_conn` and its IP's limits, then serves it.
async fn admit(stream: TcpStream, shared: Arc<Shared>) {
    let ip = match stream.peer_addr() {
        Ok(addr) => addr.ip(),
        Err(_) => return,
    };
    let _admitted = match shared
        .limits
        .admit_connection(&shared.config().floodgate, ip)
    {
        Ok(admitted) => admitted,
        Err(e) => {
            tracing::debug!(%ip, error = %e, "client refused");
            let telemetry = &shared.stats.telemetry;
            telemetry.refused.with_label_values(&[e.setting()]).inc();
            telemetry.error(sqlstate::TOO_MANY_CONNECTIONS);
            let message = e.to_string();
            let refusal = refuse(stream, &shared, &message);
            let _ = tokio::time::timeout(REFUSAL_TIMEOUT, refusal).await;
            return;
        }
    };
    crate::client::serve(stream, shared.clone()).await;
}

/// How long a refused client has to send its StartupMessage before it is simply closed.
const REFUSAL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Tells a client over a limit why, the way PostgreSQL does: after its StartupMessage (TLS
/// negotiated first as for any client), so libpq shows the 53300 and its message instead of
/// "error during SSL exchange". A CancelRequest is still carried out.
async fn refuse(tcp: TcpStream, shared: &Shared, message: &str) {
    use crate::protocol::startup::StartupPacket;
    let config = shared.config();
    let opened = crate::tls::accept::open(tcp, &config.tls, None).await;
    let Some(mut stream) = opened.stream else {
        return;
    };
    match opened.first {
        Ok(StartupPacket::Cancel { pid, secret }) => {
            if let Some(target) = shared.cancels.target(pid, secret) {
                shared.stats.telemetry.cancels.inc();
                let _ = target.send().await;
            }
        }
        Ok(StartupPacket::Startup { .. }) => {
            let mut buf = BytesMut::new();
            let code = sqlstate::TOO_MANY_CONNECTIONS;
            backend::error(&mut buf, Severity::Fatal, code, message);
            let _ = stream.write_all(&buf).await;
        }
        Ok(_) | Err(_) => {}
    }
}
