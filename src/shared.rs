//! The live state every session, the admin console and the signal handlers share: the current
//! configuration (which a reload replaces under running sessions), the users, the pools, who is
//! connected, the kill switches and the counters. One home, so that `client`, `auth` and
//! `admin` depend on it and not on each other.

use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::auth::UserStore;
use crate::cancel::CancelRegistry;
use crate::config::Config;
use crate::pool::{Pools, ServerPool};
use crate::sessions::Sessions;
use crate::stats::Stats;
use crate::switch::Switches;

/// How the proxy stops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopMode {
    /// SIGINT, console SHUTDOWN: every client gets FATAL 57P01 now.
    Fast,
    /// SIGTERM, SHUTDOWN WAIT_FOR_SERVERS: no new clients, idle ones closed, transactions in
    /// flight finish (up to `shutdown_timeout`).
    WaitForServers,
    /// SHUTDOWN WAIT_FOR_CLIENTS: no new clients; the connected ones go on until they leave.
    WaitForClients,
}

pub struct Shared {
    config: ArcSwap<Config>,
    /// The file RELOAD and SIGHUP read again (none when started from a value).
    pub config_path: Option<PathBuf>,
    users: ArcSwap<UserStore>,
    pub pools: Pools,
    pub cancels: Arc<CancelRegistry>,
    /// Named prepared statements, proxy-wide.
    pub statements: crate::protocol::prepared::Registry,
    /// Flips to `true` once, when idle clients are to be closed (shutdown).
    pub shutdown: watch::Sender<bool>,
    /// Set once, when the proxy is asked to stop.
    pub stop: watch::Sender<Option<StopMode>>,
    /// Admitted clients, by IP, database and user.
    pub limits: Arc<crate::limits::ClientLimits>,
    pub sessions: Arc<Sessions>,
    pub switches: Arc<Switches>,
    pub stats: Arc<Stats>,
    /// Failed logins by IP (`auth_failure_limit`).
    pub lockout: crate::auth::lockout::Lockout,
    /// ClientKeys of SCRAM-only users, learned at their login (SCRAM pass-through).
    pub learned_keys: Arc<crate::auth::scram::LearnedKeys>,
    /// Secrets looked up by `auth_query`, briefly.
    pub auth_cache: crate::auth::query::AuthQueryCache,
}

impl Shared {
    pub fn new(config: Config, config_path: Option<PathBuf>) -> Shared {
        let sessions = Arc::new(Sessions::default());
        let switches = Arc::new(Switches::default());
        let stats = Arc::new(Stats::default());
        let learned_keys = Arc::new(crate::auth::scram::LearnedKeys::default());
        let users = UserStore::new(&config);
        crate::sessions::started();
        Shared {
            pools: Pools::new(
                &config,
                sessions.clone(),
                switches.clone(),
                stats.clone(),
                learned_keys.clone(),
            ),
            statements: crate::protocol::prepared::Registry::new(
                config.floodgate.max_prepared_statement_bytes,
            ),
            users: ArcSwap::from_pointee(users),
            config: ArcSwap::from_pointee(config),
            config_path,
            cancels: Arc::new(CancelRegistry::default()),
            shutdown: watch::Sender::new(false),
            stop: watch::Sender::new(None),
            limits: Default::default(),
            sessions,
            switches,
            stats,
            lockout: Default::default(),
            learned_keys,
            auth_cache: Default::default(),
        }
    }

    /// The configuration now.
    pub fn config(&self) -> Arc<Config> {
        self.config.load_full()
    }

    /// Replaces `current` with the configuration now if a reload changed it (no reference
    /// count taken when it did not: this runs once per transaction).
    pub fn refresh_config(&self, current: &mut Arc<Config>) {
        let now = self.config.load();
        if !Arc::ptr_eq(current, &now) {
            *current = Arc::clone(&now);
        }
    }

    /// The users now.
    pub fn users(&self) -> Arc<UserStore> {
        self.users.load_full()
    }

    /// The pool for database `db` and client user `user` under the configuration now.
    pub fn pool(&self, db: &str, user: &str) -> Option<Arc<ServerPool>> {
        self.pools.get(&self.config(), &self.users(), db, user)
    }

    /// Asks the proxy to stop (the first request wins).
    pub fn request_stop(&self, mode: StopMode) {
        self.stop.send_if_modified(|m| match m {
            None => {
                *m = Some(mode);
                true
            }
            Some(_) => false,
        });
    }

    /// RELOAD / SIGHUP: reads the file again and applies it. An invalid file changes nothing and
    /// the error names the key and line. Returns notes on what was not applied.
    pub fn reload(&self) -> Result<Vec<String>, String> {
        let path = self.config_path.as_ref().ok_or_else(|| {
            "no configuration file to reload: floodgate was started without --config".to_owned()
        })?;
        let reloads = &self.stats.telemetry.reloads;
        match Config::load(path) {
            Ok(config) => {
                reloads.with_label_values(&["ok"]).inc();
                Ok(self.apply(config))
            }
            Err(e) => {
                reloads.with_label_values(&["failed"]).inc();
                Err(e.to_string())
            }
        }
    }

    /// Puts `new` in service under running sessions: users and databases added, changed or
    /// removed; sizes, limits and timeouts take effect at the next checkout; pools whose upstream
    /// changed are replaced between transactions. Settings that need a restart keep their
    /// running value and are named in the returned notes.
    pub fn apply(&self, mut new: Config) -> Vec<String> {
        let old = self.config();
        let mut notes = Vec::new();
        let (o, n) = (&old.floodgate, &mut new.floodgate);
        if o.listen != n.listen {
            notes.push(format!(
                "listen changed to {}: needs a restart (still listening on {})",
                n.listen, o.listen
            ));
            n.listen = o.listen;
        }
        if o.workers != n.workers {
            notes.push(format!(
                "workers changed to {}: needs a restart (still {})",
                n.workers, o.workers
            ));
            n.workers = o.workers;
        }
        if o.track_extra_parameters != n.track_extra_parameters {
            notes.push("track_extra_parameters changed: needs a restart".into());
            n.track_extra_parameters = o.track_extra_parameters.clone();
        }
        if o.max_prepared_statement_bytes != n.max_prepared_statement_bytes {
            notes.push("max_prepared_statement_bytes changed: needs a restart".into());
            n.max_prepared_statement_bytes = o.max_prepared_statement_bytes;
        }
        if o.instance_id != n.instance_id {
            notes.push("instance_id changed: needs a restart".into());
            n.instance_id = o.instance_id.clone();
        }
        if o.instances.is_auto() != n.instances.is_auto() {
            notes.push(format!(
                "instances changed between a number and \"auto\": needs a restart (still {})",
                o.instances.count_or_auto()
            ));
            n.instances = o.instances;
        }
        if old.metrics.as_ref().map(|m| m.listen) != new.metrics.as_ref().map(|m| m.listen) {
            notes.push("[metrics] listen changed: needs a restart".into());
        }
        for note in &notes {
            tracing::warn!("reload: {note}");
        }
        let users = Arc::new(UserStore::new(&new));
        let new = Arc::new(new);
        // The new configuration first: a pool made from here on is made from it, and the
        // pools made before are checked against it just after.
        self.users.store(users.clone());
        self.config.store(new.clone());
        self.pools.reconfigure(&new, &users);
        tracing::info!("configuration reloaded");
        warn_connection_math(new);
        notes
    }
}

/// One pool's clients by state, and how long the longest-waiting one has waited.
#[derive(Default, Clone, Copy)]
pub struct PoolClients {
    pub active: i64,
    pub waiting: i64,
    pub idle: i64,
    pub longest_wait_us: u64,
}

impl Shared {
    /// Clients per pool (database, upstream user), for SHOW POOLS and `/metrics`.
    pub fn clients_by_pool(&self) -> std::collections::HashMap<(String, String), PoolClients> {
        use crate::sessions::{ClientState, now_us};
        let config = self.config();
        let now = now_us();
        let mut by_pool: std::collections::HashMap<_, PoolClients> = Default::default();
        for c in self.sessions.clients() {
            let Some(upstream) = Pools::upstream_user(&config, &c.database, &c.user) else {
                continue;
            };
            let entry = by_pool.entry((c.database.clone(), upstream)).or_default();
            match c.state() {
                ClientState::Active => entry.active += 1,
                ClientState::Idle => entry.idle += 1,
                ClientState::Waiting => {
                    entry.waiting += 1;
                    entry.longest_wait_us = entry.longest_wait_us.max(c.waiting_us(now));
                }
            }
        }
        by_pool
    }
}

/// The math of `floodgate check`, as warnings (at start and at every reload).
pub fn warn_connection_math(config: Arc<Config>) {
    if config.floodgate.instances.is_auto() {
        // The budget keeps the instances under it (and a check connection would count).
        return;
    }
    tokio::spawn(async move {
        match crate::check::connection_math(&config).await {
            Ok(reports) => {
                for r in reports.iter().filter(|r| r.over_budget()) {
                    tracing::warn!("connection math: {r}");
                }
            }
            Err(e) => tracing::warn!("connection math not done: {e}"),
        }
    });
}
