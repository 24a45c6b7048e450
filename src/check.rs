//! The connection math (`floodgate check`, and a warning at start-up): the most server
//! connections this configuration can open against each upstream host, against what that server
//! accepts (`max_connections` less `superuser_reserved_connections`), as a ratio to keep under
//! `connection_budget`. With `instances = "auto"` the same numbers, and the share each live
//! instance gets ([`crate::budget`]), counting the instances PostgreSQL shows connected.

use std::collections::BTreeMap;

use crate::auth::UserStore;
use crate::auth::upstream::Login;
use crate::config::{Config, Database};
use crate::server::ServerConn;

/// One upstream host's numbers.
#[derive(Debug, Clone, PartialEq)]
pub struct HostReport {
    /// `host:port`.
    pub host: String,
    /// Pool plus reserve, for every pool on this host (at most `max_db_connections` for a
    /// database), times `instances`.
    pub worst_case: usize,
    pub max_connections: i64,
    pub superuser_reserved: i64,
    /// `worst_case / (max_connections - superuser_reserved)`.
    pub ratio: f64,
    pub budget: f64,
    /// With `instances = "auto"`: the shared budget (`worst_case` is then one instance's).
    pub auto: Option<AutoMath>,
}

/// The budget `instances = "auto"` shares, as PostgreSQL shows it now.
#[derive(Debug, Clone, PartialEq)]
pub struct AutoMath {
    /// Server connections, all instances together.
    pub budget: usize,
    /// Instances connected now (their coordination connections).
    pub live: usize,
}

impl AutoMath {
    /// Each instance's share with the live ones (at least this one).
    pub fn share(&self) -> usize {
        crate::budget::fair_share(self.budget, self.live.max(1))
    }

    /// Each instance's share if one more joined.
    pub fn share_with_one_more(&self) -> usize {
        crate::budget::fair_share(self.budget, self.live + 1)
    }
}

impl HostReport {
    /// Over `connection_budget`; with `instances = "auto"` (which keeps the instances under
    /// it), when an instance's share would be no connection at all.
    pub fn over_budget(&self) -> bool {
        match &self.auto {
            Some(auto) => auto.share() == 0,
            None => self.ratio > self.budget,
        }
    }
}

impl std::fmt::Display for HostReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let usable = self.max_connections - self.superuser_reserved;
        if let Some(auto) = &self.auto {
            return write!(
                f,
                "{}: instances = \"auto\": a budget of {} server connections (connection_budget \
                 {:.0}% of {usable} usable: max_connections {} - superuser_reserved_connections \
                 {}); {} instance(s) live now, a share of {} each ({} with one more; plus one \
                 coordination connection each); this configuration's pools want up to {} per \
                 instance (pool + reserve of every pool), held to the share: {}",
                self.host,
                auto.budget,
                self.budget * 100.0,
                self.max_connections,
                self.superuser_reserved,
                auto.live,
                auto.share(),
                auto.share_with_one_more(),
                self.worst_case,
                if self.over_budget() {
                    "NO SHARE (the budget is smaller than the instances)"
                } else {
                    "ok"
                },
            );
        }
        write!(
            f,
            "{}: at most {} server connections (pool + reserve of every pool, x instances) of \
             {usable} usable (max_connections {} - superuser_reserved_connections {}) = {:.0}% \
             (connection_budget {:.0}%): {}",
            self.host,
            self.worst_case,
            self.max_connections,
            self.superuser_reserved,
            self.ratio * 100.0,
            self.budget * 100.0,
            if self.over_budget() {
                "OVER BUDGET"
            } else {
                "ok"
            },
        )
    }
}

/// How many pools a database can have: one per client user, or one with a fixed upstream user.
fn pools_per_database(config: &Config, db: &crate::config::Database) -> usize {
    if db.user.is_some() {
        1
    } else {
        config.users.len().max(1)
    }
}

/// How Floodgate logs in to `host:port` of database `name` for its own queries (the connection
/// math, the budget's coordination connection): as the database's upstream user, or the first
/// configured user.
pub fn host_login(config: &Config, users: &UserStore, name: &str, db: &Database) -> Login {
    let user = db
        .user
        .clone()
        .or_else(|| config.users.first().map(|u| u.name.clone()));
    let password = db.password.clone().or_else(|| {
        let s = users.get(user.as_deref()?)?;
        s.plain.clone().or_else(|| s.md5.clone())
    });
    Login {
        application_name: None,
        addr: format!("{}:{}", db.host, db.port),
        user: user.unwrap_or_default(),
        dbname: db.dbname.clone().unwrap_or_else(|| name.to_owned()),
        password,
        db_key: name.to_owned(),
        learned_keys: None,
        tls: config.tls.servers.clone(),
    }
}

/// The worst case per `host:port`, and a login to ask that host (from its first database).
fn worst_cases(config: &Config) -> BTreeMap<String, (usize, Login)> {
    let users = UserStore::new(config);
    let g = &config.floodgate;
    let mut hosts: BTreeMap<String, (usize, Login)> = BTreeMap::new();
    for (name, db) in &config.databases {
        let per_pool = config.pool_size(db) + db.reserve_pool_size.unwrap_or(g.reserve_pool_size);
        let mut per_instance = per_pool * pools_per_database(config, db);
        let db_cap = db.max_db_connections.unwrap_or(g.max_db_connections);
        if db_cap > 0 {
            per_instance = per_instance.min(db_cap);
        }
        let total = per_instance * g.instances.count();
        let login = host_login(config, &users, name, db);
        hosts.entry(login.addr.clone()).or_insert((0, login)).0 += total;
    }
    hosts
}

/// Floodgate instances connected to a host: one coordination connection each.
const LIVE_INSTANCES: &str =
    "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'floodgate/budget=%'";

/// Asks every upstream host for its limits and does the math.
pub async fn connection_math(config: &Config) -> Result<Vec<HostReport>, String> {
    let mut reports = Vec::new();
    for (host, (worst_case, login)) in worst_cases(config) {
        let timeout = config.floodgate.server_connect_timeout;
        let names = crate::params::names(&[]);
        let (mut server, _) = ServerConn::connect(&login, timeout, names)
            .await
            .map_err(|e| format!("{host}: {e}"))?;
        let mut setting = async |name: &str| -> Result<i64, String> {
            let sql = match name.starts_with("SELECT") {
                true => name.to_owned(),
                false => format!("SHOW {name}"),
            };
            let rows = server.query_rows(&sql).await;
            let rows = rows.map_err(|e| format!("{host}: SHOW {name}: {e}"))?;
            rows.first()
                .and_then(|row| row.first()?.as_deref()?.parse().ok())
                .ok_or_else(|| format!("{host}: SHOW {name} gave no number"))
        };
        let max_connections = setting("max_connections").await?;
        let superuser_reserved = setting("superuser_reserved_connections").await?;
        let usable = (max_connections - superuser_reserved).max(1);
        let fraction = config.floodgate.connection_budget;
        let auto = match config.floodgate.instances.is_auto() {
            true => Some(AutoMath {
                budget: crate::budget::budget_connections(
                    max_connections,
                    superuser_reserved,
                    fraction,
                ),
                live: setting(LIVE_INSTANCES).await? as usize,
            }),
            false => None,
        };
        reports.push(HostReport {
            host,
            worst_case,
            max_connections,
            superuser_reserved,
            ratio: worst_case as f64 / usable as f64,
            budget: fraction,
            auto,
        });
    }
    Ok(reports)
}
