//! Server pools, one per (database, user): a hard cap, a FIFO queue, and servers handed out for
//! one transaction (or one session) at a time.

pub mod caps;
pub mod manager;
pub mod slots;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::auth::UserStore;
use crate::auth::upstream::Login;
use crate::config::{Config, PoolMode};
use crate::error::UpstreamError;
use crate::metrics::CloseReason;
use crate::sessions::Sessions;
use crate::stats::{PoolStats, Stats};
use crate::switch::{Switch, Switches};
use caps::Cap;
pub use manager::{Manager, ServerDefaults};
pub use slots::Server;
use slots::{GetError, Slots};

/// Pause between attempts to reach an upstream that is down (when no back-off says longer).
const RETRY_PAUSE: Duration = Duration::from_millis(100);
/// Shortest pause between attempts, so waiting clients never spin.
const MIN_RETRY_PAUSE: Duration = Duration::from_millis(10);

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
    /// The database clients ask for, and the upstream user.
    pub database: String,
    pub user: String,
    pub mode: PoolMode,
    /// `pool_size`; a reload may change it.
    size: AtomicUsize,
    pool: Arc<Slots>,
    /// Extra servers for clients that waited `reserve_pool_timeout` (`reserve_pool_size`).
    reserve: Option<Arc<Slots>>,
    reserve_timeout: AtomicDuration,
    wait_timeout: AtomicDuration,
    /// Servers kept open even when idle (`min_pool_size`).
    min_size: AtomicUsize,
    /// The database's kill switch.
    pub switch: Arc<Switch>,
    pub stats: Arc<PoolStats>,
    /// What the pool was built from; a reload that changes it replaces the pool.
    spec: PoolSpec,
    /// Replaced by a reload (or its database removed): clients move on at their next
    /// transaction, its servers close as they come back.
    retired: AtomicBool,
    /// Bumped by RECONNECT: servers of an older generation close when they come back.
    generation: Arc<AtomicU64>,
    /// Server logins in progress.
    logins: Arc<AtomicU64>,
}

/// A duration read and changed without a lock (milliseconds).
#[derive(Default)]
struct AtomicDuration(AtomicU64);

impl AtomicDuration {
    fn new(d: Duration) -> Self {
        AtomicDuration(AtomicU64::new(d.as_millis() as u64))
    }
    fn get(&self) -> Duration {
        Duration::from_millis(self.0.load(Ordering::Relaxed))
    }
    fn set(&self, d: Duration) {
        self.0.store(d.as_millis() as u64, Ordering::Relaxed);
    }
}

/// What cannot change under a running pool: a reload that changes any of it replaces the pool
/// (its servers close between transactions, its clients move to the new one).
#[derive(Clone, PartialEq, Debug)]
struct PoolSpec {
    addr: String,
    user: String,
    dbname: String,
    password: Option<String>,
    mode: PoolMode,
    reserve_size: usize,
    max_db_connections: usize,
    max_user_connections: usize,
    connect_timeout: Duration,
    lifetime: Duration,
    login_retry: Duration,
    idle_timeout: Duration,
    /// Server TLS: a change (settings or certificate files) replaces the pool.
    tls: crate::tls::Upstream,
}

/// What a reload may change in place.
struct LiveSettings {
    size: usize,
    min_size: usize,
    wait_timeout: Duration,
    reserve_timeout: Duration,
}

impl ServerPool {
    /// Waits (first come, first served) for a server, opening one if below the cap. A client
    /// that has waited `reserve_pool_timeout` may also take a reserve server, without losing its
    /// place in the main queue. While the upstream is down or restarting, keeps trying (as the
    /// login back-off allows) until `query_wait_timeout`, then reports why it could not connect.
    pub async fn checkout(&self) -> Result<Server, CheckoutError> {
        let wait_timeout = self.wait_timeout.get();
        let deadline = (!wait_timeout.is_zero()).then(|| Instant::now() + wait_timeout);
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
        // An idle server (or room to open one) is taken at once, under one short lock; the
        // timer is only polled, and so armed, when the client has to queue.
        let main = self.pool.get(deadline);
        tokio::pin!(main);
        let result = match &self.reserve {
            None => main.await,
            Some(reserve) => {
                tokio::select! {
                    biased; // a free place first: no timer when nobody has to wait
                    r = &mut main => r,
                    _ = tokio::time::sleep(self.reserve_timeout.get()) => {
                        // Still first in line for the main pool while also asking the reserve.
                        tokio::select! {
                            r = &mut main => r,
                            r = reserve.get(deadline) => r,
                        }
                    }
                }
            }
        };
        result.map(Self::taken).map_err(|e| self.checkout_error(e))
    }

    fn checkout_error(&self, e: GetError) -> CheckoutError {
        match e {
            GetError::Upstream(e) => CheckoutError::Upstream(e),
            GetError::Timeout => CheckoutError::WaitTimeout(self.wait_timeout.get()),
            GetError::Closed => CheckoutError::Closed,
        }
    }

    /// A server just checked out: dirty until its client gives it back cleanly.
    fn taken(mut server: Server) -> Server {
        server.dirty = true;
        server
    }

    /// A server if one is free or can be opened now, without queueing (`None` otherwise, also
    /// while the upstream cannot be reached: [`Self::checkout`] waits for it).
    pub async fn try_checkout(&self) -> Result<Option<Server>, CheckoutError> {
        match self.pool.try_get().await {
            Ok(server) => Ok(server.map(Self::taken)),
            Err(GetError::Upstream(e)) if e.is_transient() => Ok(None),
            Err(e) => Err(self.checkout_error(e)),
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
        self.pool.manager.defaults.lock().ok()?.clone()
    }

    /// Server connections open now (idle or in use), reserve included.
    pub fn open_servers(&self) -> usize {
        self.pool.size() + self.reserve.as_ref().map_or(0, |r| r.size())
    }

    /// `pool_size` now.
    pub fn size(&self) -> usize {
        self.size.load(Ordering::Relaxed)
    }

    pub fn reserve_size(&self) -> usize {
        self.spec.reserve_size
    }

    /// Servers idle in the pool (reserve included).
    pub fn idle_servers(&self) -> usize {
        self.pool.available() + self.reserve.as_ref().map_or(0, |r| r.available())
    }

    /// Servers held by clients (reserve included).
    pub fn active_servers(&self) -> usize {
        self.open_servers().saturating_sub(self.idle_servers())
    }

    /// Reserve servers open.
    pub fn reserve_servers(&self) -> usize {
        self.reserve.as_ref().map_or(0, |r| r.size())
    }

    /// Server logins in progress.
    pub fn logins(&self) -> usize {
        self.logins.load(Ordering::Relaxed) as usize
    }

    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Relaxed)
    }

    /// Closes every idle server now.
    pub fn close_idle(&self, reason: CloseReason) {
        for pool in std::iter::once(&self.pool).chain(&self.reserve) {
            pool.retain(|server, _| {
                server.closing(reason);
                false
            });
        }
    }

    /// RECONNECT: every server is replaced, idle ones now, the others when they come back.
    pub fn reconnect(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.close_idle(CloseReason::Reconnect);
    }

    /// Whether a server of generation `generation` is to be closed rather than reused.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Taken out of service (reload): clients move on, servers close.
    fn retire(&self) {
        self.retired.store(true, Ordering::Release);
        self.reconnect();
    }

    /// Applies what a reload may change without replacing the pool.
    fn update(&self, live: &LiveSettings) {
        if live.size != self.size() {
            self.pool.resize(live.size);
            self.size.store(live.size, Ordering::Relaxed);
        }
        self.min_size
            .store(live.min_size.min(live.size), Ordering::Relaxed);
        self.wait_timeout.set(live.wait_timeout);
        self.reserve_timeout.set(live.reserve_timeout);
    }

    /// Closes idle servers past `server_idle_timeout` (keeping `min_pool_size` open) or past
    /// their lifetime, and dead ones.
    fn evict_idle(&self, idle_timeout: Duration) {
        for (pool, keep) in [
            (Some(&self.pool), self.min_size.load(Ordering::Relaxed)),
            (self.reserve.as_ref(), 0),
        ] {
            let Some(pool) = pool else { continue };
            let mut may_idle_out = pool.size().saturating_sub(keep);
            let generation = self.generation();
            pool.retain(|server, idle_for| {
                let expired =
                    !server.lifetime.is_zero() && server.created.elapsed() >= server.lifetime;
                let reason = if expired {
                    Some(CloseReason::Lifetime)
                } else if !server.is_usable() {
                    Some(CloseReason::ClosedByServer)
                } else if server.generation != generation {
                    Some(CloseReason::Reconnect)
                } else {
                    None
                };
                if let Some(reason) = reason {
                    server.closing(reason);
                    return false;
                }
                let idle = !idle_timeout.is_zero() && idle_for >= idle_timeout;
                if idle && may_idle_out > 0 {
                    may_idle_out -= 1;
                    server.closing(CloseReason::Idle);
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
            pool.retain(|server, _| {
                if closed {
                    return true;
                }
                closed = true;
                server.closing(CloseReason::Cap);
                false
            });
        }
        closed
    }

    /// Opens servers until `min_pool_size` are open: takes that many at once without waiting
    /// (which opens the missing ones) and gives them back.
    async fn refill(&self) {
        let min_size = self.min_size.load(Ordering::Relaxed);
        if self.pool.size() >= min_size || self.is_retired() {
            return;
        }
        let mut held = Vec::with_capacity(min_size);
        while held.len() < min_size {
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
        self.close_idle(CloseReason::Shutdown);
        self.pool.close();
        if let Some(reserve) = &self.reserve {
            reserve.close();
        }
    }
}

/// Every pool, created on first use.
pub struct Pools {
    /// The session parameters carried between servers (`track_extra_parameters` included).
    pub param_names: crate::params::Names,
    pools: Mutex<HashMap<(String, String), Arc<ServerPool>>>,
    /// `max_db_connections` by database, `max_user_connections` by upstream user.
    caps: Mutex<HashMap<(&'static str, String), Arc<Cap>>>,
    /// Server parameters by upstream database (`host:port/dbname`), shared by its pools.
    defaults: Mutex<HashMap<String, Arc<Mutex<Option<ServerDefaults>>>>>,
    sessions: Arc<Sessions>,
    switches: Arc<Switches>,
    stats: Arc<Stats>,
    /// For upstream logins of SCRAM-only users (pass-through).
    learned_keys: Arc<crate::auth::scram::LearnedKeys>,
    /// With `instances = "auto"`: `floodgate/<instance id>`, every server's `application_name`
    /// at login, so operators see whose servers they are (and a RESET returns to it). With a
    /// number, servers log in as before and clients see PostgreSQL's own default.
    pub mark: Option<String>,
    /// With `instances = "auto"`: the share of each upstream host this instance may use.
    pub budget: Option<Arc<crate::budget::Budget>>,
}

/// What a pool for `db` and `upstream_user` is built from under `config`.
fn spec_for(
    config: &Config,
    users: &UserStore,
    db: &str,
    upstream_user: &str,
) -> Option<(PoolSpec, LiveSettings)> {
    let dbconf = config.databases.get(db)?;
    let g = &config.floodgate;
    // The upstream user's own password when it is a configured user, else the client's.
    let password = dbconf.password.clone().or_else(|| {
        let secrets = users.get(upstream_user)?;
        secrets.plain.clone().or_else(|| secrets.md5.clone())
    });
    let size = config.pool_size(dbconf);
    let spec = PoolSpec {
        addr: format!("{}:{}", dbconf.host, dbconf.port),
        user: upstream_user.to_owned(),
        dbname: dbconf.dbname.clone().unwrap_or_else(|| db.to_owned()),
        password,
        mode: config.pool_mode(dbconf),
        reserve_size: dbconf.reserve_pool_size.unwrap_or(g.reserve_pool_size),
        max_db_connections: dbconf.max_db_connections.unwrap_or(g.max_db_connections),
        max_user_connections: g.max_user_connections,
        connect_timeout: g.server_connect_timeout,
        lifetime: g.server_lifetime,
        login_retry: g.server_login_retry,
        idle_timeout: g.server_idle_timeout,
        tls: config.tls.servers.clone(),
    };
    let live = LiveSettings {
        size,
        min_size: dbconf.min_pool_size.unwrap_or(g.min_pool_size).min(size),
        wait_timeout: g.query_wait_timeout,
        reserve_timeout: dbconf
            .reserve_pool_timeout
            .unwrap_or(g.reserve_pool_timeout),
    };
    Some((spec, live))
}

impl Pools {
    pub fn new(
        config: &Config,
        sessions: Arc<Sessions>,
        switches: Arc<Switches>,
        stats: Arc<Stats>,
        learned_keys: Arc<crate::auth::scram::LearnedKeys>,
    ) -> Pools {
        let auto = config.floodgate.instances.is_auto();
        let id = config.floodgate.instance_id();
        Pools {
            param_names: crate::params::names(&config.floodgate.track_extra_parameters),
            pools: Mutex::new(HashMap::new()),
            caps: Mutex::new(HashMap::new()),
            defaults: Mutex::new(HashMap::new()),
            sessions,
            switches,
            stats,
            learned_keys,
            mark: auto.then(|| crate::budget::server_mark(&id)),
            budget: auto.then(|| Arc::new(crate::budget::Budget::new(&id))),
        }
    }

    /// The shared cap `setting` for `name`, if `max` > 0 (a new one if the maximum changed).
    fn cap(&self, setting: &'static str, name: &str, max: usize) -> Option<Arc<Cap>> {
        if max == 0 {
            return None;
        }
        let mut caps = self.caps.lock().unwrap_or_else(|e| e.into_inner());
        let key = (setting, name.to_owned());
        match caps.get(&key) {
            Some(cap) if cap.max() == max => Some(cap.clone()),
            _ => {
                let cap = Arc::new(Cap::new(setting, name, max));
                caps.insert(key, cap.clone());
                Some(cap)
            }
        }
    }

    /// The upstream user of `db` for client user `user`.
    pub fn upstream_user(config: &Config, db: &str, user: &str) -> Option<String> {
        let dbconf = config.databases.get(db)?;
        Some(dbconf.user.clone().unwrap_or_else(|| user.to_owned()))
    }

    /// The pool for database `db` (the name clients ask for) and client user `user`; `None` when
    /// no such database is configured. There is one pool per (database, upstream user): with a
    /// fixed `user` on the database, every client user shares it, so `pool_size` holds.
    pub fn get(
        &self,
        config: &Config,
        users: &UserStore,
        db: &str,
        user: &str,
    ) -> Option<Arc<ServerPool>> {
        let upstream_user = Self::upstream_user(config, db, user)?;
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        let key = (db.to_owned(), upstream_user.clone());
        if let Some(pool) = pools.get(&key) {
            return Some(pool.clone());
        }
        let (spec, live) = spec_for(config, users, db, &upstream_user)?;
        let defaults = self
            .defaults
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(format!("{}/{}", spec.addr, spec.dbname))
            .or_default()
            .clone();
        let caps: Vec<Arc<Cap>> = [
            self.cap("max_db_connections", db, spec.max_db_connections),
            self.cap(
                "max_user_connections",
                &upstream_user,
                spec.max_user_connections,
            ),
        ]
        .into_iter()
        .flatten()
        .chain(self.budget.as_ref().map(|b| b.host(&spec.addr).cap.clone()))
        .collect();
        let login = Login {
            application_name: self.mark.clone(),
            addr: spec.addr.clone(),
            user: upstream_user.clone(),
            dbname: spec.dbname.clone(),
            password: spec.password.clone(),
            db_key: db.to_owned(),
            learned_keys: Some(self.learned_keys.clone()),
            tls: spec.tls.clone(),
        };
        let generation = Arc::new(AtomicU64::new(0));
        let stats = self.stats.pool(db, &upstream_user);
        let logins = Arc::new(AtomicU64::new(0));
        let g = &config.floodgate;
        let build = |size: usize| {
            let manager = Manager {
                login: login.clone(),
                connect_timeout: spec.connect_timeout,
                lifetime: spec.lifetime,
                login_retry: spec.login_retry,
                caps: caps.clone(),
                cap_wait: match g.query_wait_timeout {
                    d if d.is_zero() => Duration::from_secs(3600),
                    d => d,
                },
                defaults: defaults.clone(),
                failures: Mutex::new(None),
                param_names: self.param_names.clone(),
                generation: generation.clone(),
                logins: logins.clone(),
                sessions: self.sessions.clone(),
                stats: stats.clone(),
            };
            Slots::new(manager, size)
        };
        let reserve = match spec.reserve_size {
            0 => None,
            n => Some(build(n)),
        };
        let pool = Arc::new(ServerPool {
            name: format!("{db}/{upstream_user}"),
            database: db.to_owned(),
            user: upstream_user.clone(),
            mode: spec.mode,
            size: AtomicUsize::new(live.size),
            pool: build(live.size),
            reserve,
            reserve_timeout: AtomicDuration::new(live.reserve_timeout),
            wait_timeout: AtomicDuration::new(live.wait_timeout),
            min_size: AtomicUsize::new(live.min_size),
            switch: self.switches.get(db),
            stats,
            retired: AtomicBool::new(false),
            generation,
            logins,
            spec,
        });
        for cap in &caps {
            cap.add_pool(Arc::downgrade(&pool));
        }
        spawn_janitor(
            Arc::downgrade(&pool),
            pool.spec.idle_timeout,
            pool.spec.lifetime,
        );
        pools.insert(key, pool.clone());
        Some(pool)
    }

    /// Every pool in service, by database then user.
    pub fn list(&self) -> Vec<Arc<ServerPool>> {
        let pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        let mut all: Vec<_> = pools.values().cloned().collect();
        all.sort_by(|a, b| (&a.database, &a.user).cmp(&(&b.database, &b.user)));
        all
    }

    /// After a reload: pools whose upstream or structure changed (or whose database is gone)
    /// are retired, the others take the new sizes and timeouts in place.
    pub fn reconfigure(&self, config: &Config, users: &UserStore) {
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        pools.retain(|(db, user), pool| match spec_for(config, users, db, user) {
            Some((spec, live)) if spec == pool.spec => {
                pool.update(&live);
                true
            }
            _ => {
                tracing::info!(pool = %pool.name, "pool replaced by the reload; its servers close between transactions");
                pool.retire();
                false
            }
        });
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
            if pool.is_retired() {
                // Its servers come back from clients that have not moved on yet.
                pool.close_idle(CloseReason::Reconnect);
                continue;
            }
            pool.evict_idle(idle);
            pool.refill().await;
        }
    });
}
