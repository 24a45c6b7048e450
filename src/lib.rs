//! Floodgate: a transaction-pooling PostgreSQL proxy.
//!
//! Data flows one way and back, one module per step:
//! [`proxy`] accepts (and applies [`limits`]) → [`client`] logs the client in
//! ([`protocol::startup`], [`auth::client`]) and runs its transaction loop → [`pool`] checks a
//! server out (cap, FIFO queue, reserve, shared caps) → [`server`] is the upstream connection,
//! logged in by [`auth::upstream`] → [`relay`] forwards bytes both ways, framed by
//! [`protocol::frame`], with [`protocol::pipeline`] matching answers to requests (and
//! [`protocol::prepared`] keeping named statements working), until the transaction ends → the
//! server goes back to the pool (or through [`reset`] first when its client left it dirty).
//! [`params`] keeps each client's session parameters, [`cancel`] routes cancel requests,
//! [`check`] does the connection math, [`budget`] shares one between instances
//! (`instances = "auto"`), [`config`] is the TOML file.
//!
//! Live state has one home, [`shared`]: the configuration a reload replaces, the pools,
//! [`sessions`] (who is connected), the kill [`switch`]es and the [`stats`]. The [`admin`]
//! console and the [`signals`] act on it.

pub mod admin;
pub mod auth;
pub mod budget;
pub mod buffers;
pub mod cancel;
pub mod check;
pub mod client;
pub mod config;
pub mod demo;
pub mod error;
pub mod import;
pub mod limits;
pub mod metrics;
pub mod params;
pub mod pgcluster;
pub mod pool;
pub mod protocol;
pub mod proxy;
pub mod relay;
pub mod reset;
pub mod server;
pub mod sessions;
pub mod shared;
pub mod signals;
pub mod stats;
pub mod stream;
pub mod switch;
pub mod tls;

pub use error::Error;
pub use proxy::Proxy;

/// Resolves at SIGINT (Ctrl-C) or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
