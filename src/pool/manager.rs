//! Creates and checks server connections for one pool.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::auth::upstream::Login;
use crate::error::UpstreamError;
use crate::metrics::CloseReason;
use crate::server::ServerConn;

/// Parameters the server reported at login, shown to clients when they log in.
pub type ServerDefaults = Arc<Vec<(String, String)>>;

pub struct Manager {
    pub login: Login,
    pub connect_timeout: Duration,
    /// 0 = servers live for ever. Each server gets 90-100 % of it, so that servers opened
    /// together are not all replaced together.
    pub lifetime: Duration,
    /// Longest back-off after failed logins (`server_login_retry`).
    pub login_retry: Duration,
    /// Filled from the first successful login and refreshed by later ones; shared by the pools
    /// of one database, so a new user's first client need not wait for a server of its own.
    pub defaults: Arc<Mutex<Option<ServerDefaults>>>,
    /// Recent failed logins: no new attempt before the back-off ends.
    pub failures: Mutex<Option<Failures>>,
    /// Shared caps every server of this pool counts against.
    pub caps: Vec<Arc<super::caps::Cap>>,
    /// How long a new server may wait for room under a cap.
    pub cap_wait: Duration,
    /// The session parameters servers track.
    pub param_names: crate::params::Names,
    /// The pool's generation (RECONNECT bumps it): older servers are not reused.
    pub generation: Arc<AtomicU64>,
    /// Logins in progress (SHOW POOLS sv_login).
    pub logins: Arc<AtomicU64>,
    /// Where servers are listed for SHOW SERVERS.
    pub sessions: Arc<crate::sessions::Sessions>,
    /// The pool's counters (opened, closed, connect time).
    pub stats: Arc<crate::stats::PoolStats>,
}

/// Consecutive failed logins to one upstream.
pub struct Failures {
    count: u32,
    retry_at: Instant,
    last: String,
    /// When the last failure was recorded.
    at: Instant,
}

/// First back-off after a failed login; it doubles with each further failure.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);

impl Manager {
    /// Fails fast while the upstream is backing off, so a flapping database is not hammered.
    fn check_backoff(&self) -> Result<(), UpstreamError> {
        let failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        match &*failures {
            Some(f) if Instant::now() < f.retry_at => Err(UpstreamError::RetryLater {
                addr: self.login.addr.clone(),
                wait_ms: f
                    .retry_at
                    .saturating_duration_since(Instant::now())
                    .as_millis() as u64,
                last: f.last.clone(),
            }),
            _ => Ok(()),
        }
    }

    /// Records a failed login: the next attempt waits an exponential, jittered back-off capped
    /// by `server_login_retry`. Attempts that started before the last failure was recorded
    /// were made together with it (many clients at once when the server went down): they count
    /// as one step, not one doubling each.
    fn record_failure(&self, error: &UpstreamError, started: Instant) {
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = failures.as_mut()
            && f.at >= started
        {
            f.last = error.to_string();
            return;
        }
        let count = failures.as_ref().map_or(0, |f| f.count) + 1;
        let backoff = FIRST_BACKOFF
            .saturating_mul(1 << (count - 1).min(16))
            .min(self.login_retry);
        let jittered = backoff.mul_f64(0.5 + rand::random::<f64>() / 2.0);
        let now = Instant::now();
        *failures = Some(Failures {
            count,
            retry_at: now + jittered,
            last: error.to_string(),
            at: now,
        });
    }
}

impl Manager {
    /// Opens a new server. Boxed: the login's future is large, and it would otherwise be part of
    /// every checkout's future.
    pub async fn create(&self) -> Result<ServerConn, UpstreamError> {
        Box::pin(self.open()).await
    }

    /// Whether an idle server may be handed out. No round trip: a server is checked by looking at
    /// its socket (an idle server that has anything to say has died or is about to), its age and
    /// its generation.
    pub fn check(&self, server: &ServerConn) -> Result<(), CloseReason> {
        if !server.is_usable() {
            return Err(CloseReason::ClosedByServer);
        }
        if !server.lifetime.is_zero() && server.created.elapsed() >= server.lifetime {
            return Err(CloseReason::Lifetime);
        }
        if server.generation != self.generation.load(Ordering::Acquire) {
            return Err(CloseReason::Reconnect);
        }
        Ok(())
    }
}

impl Manager {
    /// Opens and logs in a new server connection, within the shared caps and the back-off.
    async fn open(&self) -> Result<ServerConn, UpstreamError> {
        self.check_backoff()?;
        let mut permits = Vec::with_capacity(self.caps.len());
        for cap in &self.caps {
            permits.push(cap.acquire(self.cap_wait).await?);
        }
        let started = Instant::now();
        let names = self.param_names.clone();
        let generation = self.generation.load(Ordering::Acquire);
        self.logins.fetch_add(1, Ordering::Relaxed);
        let connected = ServerConn::connect(&self.login, self.connect_timeout, names).await;
        self.logins.fetch_sub(1, Ordering::Relaxed);
        let (mut server, params) = match connected {
            Ok(connected) => connected,
            Err(e) => {
                self.record_failure(&e, started);
                return Err(e);
            }
        };
        server.generation = generation;
        self.stats
            .metrics
            .connect
            .observe(started.elapsed().as_secs_f64());
        self.stats.metrics.opened.inc();
        server.stats = Some(self.stats.clone());
        server.info = Some(self.sessions.add_server(crate::sessions::NewServer {
            database: self.login.db_key.clone(),
            user: self.login.user.clone(),
            addr: self.login.addr.clone(),
            local_addr: server.stream.local_addr(),
            remote_pid: server.cancel.pid,
            tls: server.stream.tls_description(),
        }));
        *self.failures.lock().unwrap_or_else(|e| e.into_inner()) = None;
        server.lifetime = self.lifetime.mul_f64(0.9 + rand::random::<f64>() / 10.0);
        server.permits = permits;
        tracing::debug!(addr = %self.login.addr, pid = server.cancel.pid, "server connection opened");
        if let Ok(mut d) = self.defaults.lock() {
            *d = Some(Arc::new(params));
        }
        Ok(server)
    }
}
