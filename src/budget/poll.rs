//! The budget's polling: one task per upstream host keeps this instance's coordination
//! connection open and, every `budget_period`, reads the server's limits and `pg_stat_activity`
//! through it, resizes the host's cap ([`super::next_cap`]) and publishes the new claim in the
//! connection's `application_name`.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Weak};

use super::{HostBudget, Round, View};
use crate::config::Config;
use crate::server::ServerConn;
use crate::shared::Shared;

/// Every client backend, with the server's limits on each row (one round trip).
const ACTIVITY: &str = "SELECT pid, coalesce(usename, ''), coalesce(datname, ''), \
    coalesce(application_name, ''), current_setting('max_connections'), \
    current_setting('superuser_reserved_connections') \
    FROM pg_stat_activity WHERE backend_type = 'client backend'";

/// Runs the budget of every upstream host in the configuration, until the proxy is gone.
/// Hosts a reload adds get a task; hosts it removes lose theirs (and their coordination
/// connection, so other instances stop counting this one there).
pub async fn run(shared: Weak<Shared>) {
    let mut tasks = Tasks::default();
    loop {
        let period = {
            let Some(shared) = shared.upgrade() else {
                return;
            };
            let Some(budget) = shared.pools.budget.clone() else {
                return;
            };
            let config = shared.config();
            let wanted: HashSet<String> = config
                .databases
                .values()
                .map(|db| format!("{}:{}", db.host, db.port))
                .collect();
            tasks.0.retain(|addr, task| {
                let keep = wanted.contains(addr);
                if !keep {
                    task.abort();
                    budget.forget(addr);
                }
                keep
            });
            for addr in wanted {
                let host = budget.host(&addr);
                let weak = Arc::downgrade(&shared);
                tasks
                    .0
                    .entry(addr)
                    .or_insert_with(|| tokio::spawn(host_loop(weak, host)));
            }
            config.floodgate.budget_period
        };
        tokio::time::sleep(period).await;
    }
}

/// The host tasks, stopped when the supervisor stops.
#[derive(Default)]
struct Tasks(HashMap<String, tokio::task::JoinHandle<()>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for task in self.0.values() {
            task.abort();
        }
    }
}

/// Polls one host every `budget_period` while the proxy lives.
async fn host_loop(shared: Weak<Shared>, host: Arc<HostBudget>) {
    let mut coordinator = Coordinator::default();
    loop {
        let period = {
            let Some(shared) = shared.upgrade() else {
                return;
            };
            if let Err(e) = coordinator.poll(&shared, &host).await {
                tracing::warn!(host = %host.addr, "connection budget not updated: {e}");
                host.update(|v| v.error = Some(e));
            }
            shared.config().floodgate.budget_period
        };
        tokio::time::sleep(period).await;
    }
}

/// This instance's coordination connection to one host.
#[derive(Default)]
struct Coordinator {
    conn: Option<ServerConn>,
    /// The connection was opened since the last poll: others may not have seen it yet.
    fresh: bool,
    /// The claim its `application_name` shows now.
    published: usize,
    /// This instance's id, the rest of that name.
    id: String,
}

/// One row of [`ACTIVITY`].
struct Backend {
    pid: i32,
    user: String,
    database: String,
    application_name: String,
}

impl Coordinator {
    /// One poll: connect if needed, read, decide, publish.
    async fn poll(&mut self, shared: &Shared, host: &HostBudget) -> Result<(), String> {
        let config = shared.config();
        if self.conn.is_none() {
            self.connect(shared, &config, host).await?;
        }
        let conn = self.conn.as_mut().ok_or("no coordination connection")?;
        let my_pid = conn.cancel.pid;
        let rows = match conn.query_rows(ACTIVITY).await {
            Ok(rows) => rows,
            Err(e) => {
                self.conn = None;
                return Err(format!("reading pg_stat_activity: {e}"));
            }
        };
        let (limits, backends) = parse(&rows)?;
        let round = self.round(shared, &config, host, my_pid, limits, &backends);
        self.apply(host, &round).await?;
        host.update(|v| {
            *v = View {
                polled: true,
                max_connections: limits.0,
                superuser_reserved: limits.1,
                budget: round.budget,
                instances: round.instances,
                share: round.fair(),
                claim: self.published,
                others_claim: round.others.iter().sum(),
                connected: round.connected,
                error: None,
            }
        });
        Ok(())
    }

    /// Opens the coordination connection, already carrying this instance's claim.
    async fn connect(
        &mut self,
        shared: &Shared,
        config: &Config,
        host: &HostBudget,
    ) -> Result<(), String> {
        let users = shared.users();
        let (name, db) = config
            .databases
            .iter()
            .find(|(_, db)| format!("{}:{}", db.host, db.port) == host.addr)
            .ok_or("no database on this host")?;
        let mut login = crate::check::host_login(config, &users, name, db);
        let budget = shared.pools.budget.as_ref().ok_or("no budget")?;
        let claim = claim(host);
        login.application_name = Some(super::coordinator_name(claim, &budget.id));
        login.learned_keys = Some(shared.learned_keys.clone());
        let timeout = config.floodgate.server_connect_timeout;
        let names = crate::params::names(&[]);
        let (conn, _) = ServerConn::connect(&login, timeout, names)
            .await
            .map_err(|e| format!("coordination connection: {e}"))?;
        self.conn = Some(conn);
        self.fresh = true;
        self.published = claim;
        self.id = budget.id.clone();
        Ok(())
    }

    /// What this poll saw, as the input of [`super::next_cap`].
    fn round(
        &mut self,
        shared: &Shared,
        config: &Config,
        host: &HostBudget,
        my_pid: i32,
        (max_connections, reserved): (i64, i64),
        backends: &[Backend],
    ) -> Round {
        let ours: HashSet<i32> = shared
            .sessions
            .servers()
            .iter()
            .filter(|s| s.addr == host.addr)
            .map(|s| s.remote_pid)
            .chain(std::iter::once(my_pid))
            .collect();
        let (users, databases) = upstream_names(config, &host.addr);
        let mut others = Vec::new();
        let mut connected = 0;
        // Anyone may name a session like a coordination connection (a client of another
        // instance, while attached to a server): it then counts as one more instance, which
        // only makes every share smaller, never the sum larger.
        for b in backends.iter().filter(|b| !ours.contains(&b.pid)) {
            if let Some(claim) = super::parse_claim(&b.application_name) {
                others.push(claim);
            } else if databases.contains(&b.database)
                && (users.is_empty() || users.contains(&b.user))
            {
                connected += 1;
            }
        }
        let fraction = config.floodgate.connection_budget;
        let newcomer = std::mem::take(&mut self.fresh);
        Round {
            cap: host.cap.max(),
            budget: super::budget_connections(max_connections, reserved, fraction),
            instances: others.len() + 1,
            others,
            connected,
            newcomer,
        }
    }

    /// Resizes the cap and publishes the claim: a raise only once the claim says so, so no
    /// other instance can count this one at less than it may hold.
    async fn apply(&mut self, host: &HostBudget, round: &Round) -> Result<(), String> {
        let new = super::next_cap(round);
        if new > round.cap {
            self.publish(new.max(host.cap.in_use())).await?;
            host.cap.resize(new);
            tracing::debug!(host = %host.addr, cap = new, "connection budget: share raised");
        } else {
            if new < round.cap {
                tracing::info!(host = %host.addr, from = round.cap, to = new, instances = round.instances,
                    "connection budget: share lowered; idle servers close to make it");
            }
            host.cap.resize(new);
            self.publish(claim(host)).await?;
        }
        Ok(())
    }

    /// Shows `claim` in the coordination connection's `application_name`.
    async fn publish(&mut self, claim: usize) -> Result<(), String> {
        if claim == self.published {
            return Ok(());
        }
        let conn = self.conn.as_mut().ok_or("no coordination connection")?;
        let name = super::coordinator_name(claim, &self.id);
        let sql = format!("SET application_name = {}", crate::params::quote(&name));
        if let Err(e) = conn.simple_query(&sql).await {
            self.conn = None;
            return Err(format!("publishing the claim: {e}"));
        }
        self.published = claim;
        Ok(())
    }
}

/// This instance's claim on a host: its cap, or what it holds when that is more.
fn claim(host: &HostBudget) -> usize {
    host.cap.max().max(host.cap.in_use())
}

/// The server's limits and every client backend, from [`ACTIVITY`]'s rows.
fn parse(rows: &[Vec<Option<String>>]) -> Result<((i64, i64), Vec<Backend>), String> {
    let number = |row: &[Option<String>], i: usize| -> Option<i64> {
        row.get(i)?.as_deref()?.trim().parse().ok()
    };
    let first = rows.first().ok_or("pg_stat_activity returned no rows")?;
    let limits = number(first, 4)
        .zip(number(first, 5))
        .ok_or("max_connections or superuser_reserved_connections is not a number")?;
    let text = |row: &[Option<String>], i: usize| -> String {
        row.get(i).cloned().flatten().unwrap_or_default()
    };
    let backends = rows
        .iter()
        .filter_map(|row| {
            Some(Backend {
                pid: number(row, 0)? as i32,
                user: text(row, 1),
                database: text(row, 2),
                application_name: text(row, 3),
            })
        })
        .collect();
    Ok((limits, backends))
}

/// The upstream users (empty: any, when a database logs in as each client's user and users
/// may come from `auth_query`) and database names Floodgate uses on `addr`.
fn upstream_names(config: &Config, addr: &str) -> (HashSet<String>, HashSet<String>) {
    let mut users = HashSet::new();
    let mut databases = HashSet::new();
    let mut any_user = false;
    for (name, db) in &config.databases {
        if format!("{}:{}", db.host, db.port) != addr {
            continue;
        }
        databases.insert(db.dbname.clone().unwrap_or_else(|| name.clone()));
        match &db.user {
            Some(user) => {
                users.insert(user.clone());
            }
            None if config.floodgate.auth_user.is_some() => any_user = true,
            None => users.extend(config.users.iter().map(|u| u.name.clone())),
        }
    }
    if any_user {
        users.clear();
    }
    (users, databases)
}
