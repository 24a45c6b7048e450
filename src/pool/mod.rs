//! Server pools, one per (database, user): a hard cap, a FIFO queue, and servers handed out for
//! one transaction (or one session) at a time.

pub mod caps;
pub mod manager;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use deadpool::managed::{Pool, PoolError, QueueMode, Timeouts};

use crate::auth::UserStore;
use crate::auth::upstream::Login;
use crate::config::{Config, PoolMode};
use crate::error::UpstreamError;
use caps::Cap;
pub use manager::{Manager, ServerDefaults};

/// Pause between attempts to reach an upstream that is down (when no back-off says longer).
const RETRY_PAUSE: Duration = Duration::from_millis(100);
/// Shortest pause between attempts, so waiting clients never spin.
const MIN_RETRY_PAUSE: Duration = Duration::from_millis(10);

/// A checked-out server; dropping it returns the server to its pool.
pub type Server = deadpool::managed::Object<Manager>;

/// Why no server could be handed out.
#[derive(Debug, thiserror::Error)]
pub enum CheckoutError {
    #[error("no server connection became free within query_wait_timeout ({0:?}); the pool is busy")]
    WaitTimeout(Duration),
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error("the pool is closed: floodgate is shutting down")]
    Closed,
}

/// One (database, user) pool.
pub struct ServerPool {
    pub name: String,
    pub mode: PoolMode,
    pub size: usize,
    pool: Pool<Manager>,
    /// Extra servers for clients that waited `reserve_pool_timeout` (`reserve_pool_size`).
    reserve: Option<Pool<Manager>>,
    reserve_timeout: Duration,
    wait_timeout: Duration,
    /// Servers kept open even when idle (`min_pool_size`).
    min_size: usize,
}

impl ServerPool {
    /// Waits (first come, first served) for a server, opening one if below the cap. A client
    /// that has waited `reserve_pool_timeout` may also take a reserve server, without losing its
    /// place in the main queue. While the upstream is down or restarting, keeps trying (as the
    /// login back-off allows) until `query_wait_timeout`, then reports why it could not connect.
    pub async fn checkout(&self) -> Result<Server, CheckoutError> {
        let deadline = (!self.wait_timeout.is_zero()).then(|| Instant::now() + self.wait_timeout);
        loop {
            let error = match self.checkout_once(deadline).await {
                Err(CheckoutError::Upstream(e)) if e.is_transient() => e,
                result => return result,
            };
            let pause = error
                .retry_after()
                .unwrap_or(RETRY_PAUSE)
                .max(MIN_RETRY_PAUSE);
            let resume = Instant::now() + pause;
            match deadline {
                Some(deadline) if resume >= deadline => {
                    tokio::time::sleep_until(deadline).await;
                    return Err(CheckoutError::Upstream(error));
                }
                _ => tokio::time::sleep_until(resume).await,
            }
        }
    }

    /// One attempt of [`Self::checkout`].
    async fn checkout_once(&self, deadline: Option<Instant>) -> Result<Server, CheckoutError> {
        let main_timeouts = self.wait_until(deadline);
        let main = self.pool.timeout_get(&main_timeouts);
        tokio::pin!(main);
        let result = match &self.reserve {
            None => main.await,
            Some(reserve) => {
                tokio::select! {
                    r = &mut main => r,
                    _ = tokio::time::sleep(self.reserve_timeout) => {
                        let reserve_timeouts = self.wait_until(deadline);
                        tokio::select! {
                            r = &mut main => r,
                            r = reserve.timeout_get(&reserve_timeouts) => r,
                        }
                    }
                }
            }
        };
        let mut server = result.map_err(|e| match e {
            PoolError::Timeout(_) => CheckoutError::WaitTimeout(self.wait_timeout),
            PoolError::Backend(e) => CheckoutError::Upstream(e),
            _ => CheckoutError::Closed,
        })?;
        server.dirty = true;
        Ok(server)
    }

    /// Timeouts for a wait that must end by `deadline` (`None`: no limit).
    fn wait_until(&self, deadline: Option<Instant>) -> Timeouts {
        Timeouts {
            wait: deadline.map(|d| d.saturating_duration_since(Instant::now())),
            create: None, // the manager bounds each connect by server_connect_timeout
            recycle: None,
        }
    }

    /// A server if one is free or can be opened now, without queueing (`None` otherwise, also
    /// while the upstream cannot be reached: [`Self::checkout`] waits for it).
    pub async fn try_checkout(&self) -> Result<Option<Server>, CheckoutError> {
        let timeouts = Timeouts {
            wait: Some(Duration::ZERO),
            create: None,
            recycle: None,
        };
        match self.pool.timeout_get(&timeouts).await {
            Ok(mut server) => {
                server.dirty = true;
                Ok(Some(server))
            }
            Err(PoolError::Timeout(_)) => Ok(None),
            Err(PoolError::Backend(e)) if e.is_transient() => Ok(None),
            Err(PoolError::Backend(e)) => Err(CheckoutError::Upstream(e)),
            Err(_) => Err(CheckoutError::Closed),
        }
    }

    /// Parameters to show a logging-in client; logs in one server first if none has yet.
    pub async fn defaults(&self) -> Result<ServerDefaults, CheckoutError> {
        if let Some(d) = self.cached_defaults() {
            return Ok(d);
        }
        let mut server = self.checkout().await?;
        server.dirty = false;
        drop(server);
        self.cached_defaults().ok_or(CheckoutError::Closed)
    }

    fn cached_defaults(&self) -> Option<ServerDefaults> {
        self.pool.manager().defaults.lock().ok()?.clone()
    }

    /// Server connections open now (idle or in use), reserve included.
    pub fn open_servers(&self) -> usize {
        self.pool.status().size + self.reserve.as_ref().map_or(0, |r| r.status().size)
    }

    /// Closes idle servers past `server_idle_timeout` (keeping `min_pool_size` open) or past
    /// their lifetime, and dead ones.
    fn evict_idle(&self, idle_timeout: Duration) {
        for (pool, keep) in [
            (Some(&self.pool), self.min_size),
            (self.reserve.as_ref(), 0),
        ] {
            let Some(pool) = pool else { continue };
            let mut may_idle_out = pool.status().size.saturating_sub(keep);
            pool.retain(|server, metrics| {
                let expired =
                    !server.lifetime.is_zero() && server.created.elapsed() >= server.lifetime;
                if expired || !server.is_usable() {
                    return false;
                }
                let idle = !idle_timeout.is_zero() && metrics.last_used() >= idle_timeout;
                if idle && may_idle_out > 0 {
                    may_idle_out -= 1;
                    return false;
                }
                true
            });
        }
    }

    /// Closes one idle server (to make room under a shared cap); `true` if it did.
    fn close_one_idle(&self) -> bool {
        let mut closed = false;
        for pool in std::iter::once(&self.pool).chain(&self.reserve) {
            pool.retain(|_, _| {
                if closed {
                    return true;
                }
                closed = true;
                false
            });
        }
        closed
    }

    /// Opens servers until `min_pool_size` are open: takes that many at once without waiting
    /// (which opens the missing ones) and gives them back.
    async fn refill(&self) {
        if self.pool.status().size >= self.min_size {
            return;
        }
        let mut held = Vec::with_capacity(self.min_size);
        while held.len() < self.min_size {
            match self.try_checkout().await {
                Ok(Some(mut server)) => {
                    server.dirty = false;
                    held.push(server);
                }
                _ => break, // busy (clients hold the rest) or the upstream is down
            }
        }
    }

    pub fn close(&self) {
        self.pool.close();
        if let Some(reserve) = &self.reserve {
            reserve.close();
        }
    }
}

/// Every pool, created on first use.
pub struct Pools {
    config: Arc<Config>,
    /// The session parameters carried between servers (`track_extra_parameters` included).
    pub param_names: crate::params::Names,
    users: Arc<UserStore>,
    pools: Mutex<HashMap<(String, String), Arc<ServerPool>>>,
    /// `max_db_connections` by database, `max_user_connections` by upstream user.
    caps: Mutex<HashMap<(&'static str, String), Arc<Cap>>>,
    /// Server parameters by upstream database (`host:port/dbname`), shared by its pools.
    defaults: Mutex<HashMap<String, Arc<Mutex<Option<ServerDefaults>>>>>,
}

impl Pools {
    pub fn new(config: Arc<Config>, users: Arc<UserStore>) -> Pools {
        Pools {
            param_names: crate::params::names(&config.floodgate.track_extra_parameters),
            config,
            users,
            pools: Mutex::new(HashMap::new()),
            caps: Mutex::new(HashMap::new()),
            defaults: Mutex::new(HashMap::new()),
        }
    }

    /// The shared cap `setting` for `name`, if `max` > 0.
    fn cap(&self, setting: &'static str, name: &str, max: usize) -> Option<Arc<Cap>> {
        if max == 0 {
            return None;
        }
        let mut caps = self.caps.lock().unwrap_or_else(|e| e.into_inner());
        let cap = caps
            .entry((setting, name.to_owned()))
            .or_insert_with(|| Arc::new(Cap::new(setting, name, max)));
        Some(cap.clone())
    }

    /// The pool for database `db` (the name clients ask for) and client user `user`; `None` when
    /// no such database is configured. There is one pool per (database, upstream user): with a
    /// fixed `user` on the database, every client user shares it, so `pool_size` holds.
    pub fn get(&self, db: &str, user: &str) -> Option<Arc<ServerPool>> {
        let dbconf = self.config.databases.get(db)?;
        let upstream_user = dbconf.user.clone().unwrap_or_else(|| user.to_owned());
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        let key = (db.to_owned(), upstream_user.clone());
        if let Some(pool) = pools.get(&key) {
            return Some(pool.clone());
        }
        let g = &self.config.floodgate;
        // The upstream user's own password when it is a configured user, else the client's.
        let password = dbconf.password.clone().or_else(|| {
            let secrets = self.users.get(&upstream_user)?;
            secrets.plain.clone().or_else(|| secrets.md5.clone())
        });
        let defaults = self
            .defaults
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(format!(
                "{}:{}/{}",
                dbconf.host,
                dbconf.port,
                dbconf.dbname.as_deref().unwrap_or(db)
            ))
            .or_default()
            .clone();
        let caps: Vec<Arc<Cap>> = [
            self.cap(
                "max_db_connections",
                db,
                dbconf.max_db_connections.unwrap_or(g.max_db_connections),
            ),
            self.cap(
                "max_user_connections",
                &upstream_user,
                g.max_user_connections,
            ),
        ]
        .into_iter()
        .flatten()
        .collect();
        let login = Login {
            addr: format!("{}:{}", dbconf.host, dbconf.port),
            user: upstream_user,
            dbname: dbconf.dbname.clone().unwrap_or_else(|| db.to_owned()),
            password,
            db_key: db.to_owned(),
        };
        let build = |size: usize| {
            let manager = Manager {
                login: login.clone(),
                connect_timeout: g.server_connect_timeout,
                lifetime: g.server_lifetime,
                login_retry: g.server_login_retry,
                caps: caps.clone(),
                cap_wait: match g.query_wait_timeout {
                    d if d.is_zero() => Duration::from_secs(3600),
                    d => d,
                },
                defaults: defaults.clone(),
                failures: Mutex::new(None),
                param_names: self.param_names.clone(),
            };
            Pool::builder(manager)
                .max_size(size)
                .queue_mode(QueueMode::Lifo)
                .runtime(deadpool::Runtime::Tokio1)
                .build()
                .ok()
        };
        let size = self.config.pool_size(dbconf);
        let reserve_size = dbconf.reserve_pool_size.unwrap_or(g.reserve_pool_size);
        let reserve = match reserve_size {
            0 => None,
            n => Some(build(n)?),
        };
        let pool = Arc::new(ServerPool {
            name: format!("{db}/{}", key.1),
            mode: self.config.pool_mode(dbconf),
            size,
            pool: build(size)?,
            reserve,
            reserve_timeout: dbconf
                .reserve_pool_timeout
                .unwrap_or(g.reserve_pool_timeout),
            wait_timeout: g.query_wait_timeout,
            min_size: dbconf.min_pool_size.unwrap_or(g.min_pool_size).min(size),
        });
        for cap in &caps {
            cap.add_pool(Arc::downgrade(&pool));
        }
        spawn_janitor(
            Arc::downgrade(&pool),
            g.server_idle_timeout,
            g.server_lifetime,
        );
        pools.insert(key, pool.clone());
        Some(pool)
    }

    /// Closes every pool (shutdown).
    pub fn close_all(&self) {
        let pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        for pool in pools.values() {
            pool.close();
        }
    }
}

/// Evicts idle and expired servers every few seconds, until the pool is gone.
fn spawn_janitor(pool: std::sync::Weak<ServerPool>, idle: Duration, lifetime: Duration) {
    let period = [idle, lifetime]
        .into_iter()
        .filter(|d| !d.is_zero())
        .map(|d| d / 2)
        .min()
        .unwrap_or(Duration::from_secs(10))
        .clamp(Duration::from_millis(100), Duration::from_secs(10));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        loop {
            tick.tick().await;
            let Some(pool) = pool.upgrade() else { return };
            if pool.pool.is_closed() {
                return;
            }
            pool.evict_idle(idle);
            pool.refill().await;
        }
    });
}
