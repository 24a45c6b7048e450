//! Creates and checks server connections for one pool (deadpool's `Manager`).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool::managed::{self, Metrics, RecycleError, RecycleResult};

use crate::auth::upstream::Login;
use crate::error::UpstreamError;
use crate::server::ServerConn;

/// Parameters the server reported at login, shown to clients when they log in.
pub type ServerDefaults = Arc<Vec<(String, String)>>;

pub struct Manager {
    pub login: Login,
    pub connect_timeout: Duration,
    /// 0 = servers live for ever.
    pub lifetime: Duration,
    /// Filled from the first successful login and refreshed by later ones.
    pub defaults: Mutex<Option<ServerDefaults>>,
}

impl managed::Manager for Manager {
    type Type = ServerConn;
    type Error = UpstreamError;

    async fn create(&self) -> Result<ServerConn, UpstreamError> {
        let (server, params) = ServerConn::connect(&self.login, self.connect_timeout).await?;
        tracing::debug!(addr = %self.login.addr, pid = server.cancel.pid, "server connection opened");
        if let Ok(mut d) = self.defaults.lock() {
            *d = Some(Arc::new(params));
        }
        Ok(server)
    }

    /// No round trip here: a server is checked by looking at its socket (an idle server that has
    /// anything to say has died or is about to), its flag and its age.
    async fn recycle(&self, server: &mut ServerConn, _: &Metrics) -> RecycleResult<UpstreamError> {
        if server.dirty {
            return Err(RecycleError::message("returned in an unknown state"));
        }
        if !server.is_usable() {
            return Err(RecycleError::message("closed by the server"));
        }
        if !self.lifetime.is_zero() && server.created.elapsed() >= self.lifetime {
            return Err(RecycleError::message("server_lifetime reached"));
        }
        Ok(())
    }
}
