//! The connection math (`floodgate check`, and a warning at start-up): the most server
//! connections this configuration can open against each upstream host, against what that server
//! accepts (`max_connections` less `superuser_reserved_connections`), as a ratio to keep under
//! `connection_budget`.

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
}

impl HostReport {
    pub fn over_budget(&self) -> bool {
        self.ratio > self.budget
    }
}

impl std::fmt::Display for HostReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let usable = self.max_connections - self.superuser_reserved;
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
            let rows = server.query_rows(&format!("SHOW {name}")).await;
            let rows = rows.map_err(|e| format!("{host}: SHOW {name}: {e}"))?;
            rows.first()
                .and_then(|row| row.first()?.as_deref()?.parse().ok())
                .ok_or_else(|| format!("{host}: SHOW {name} gave no number"))
        };
        let max_connections = setting("max_connections").await?;
        let superuser_reserved = setting("superuser_reserved_connections").await?;
        let usable = (max_connections - superuser_reserved).max(1);
        reports.push(HostReport {
            host,
            worst_case,
            max_connections,
            superuser_reserved,
            ratio: worst_case as f64 / usable as f64,
            budget: config.floodgate.connection_budget,
        });
    }
    Ok(reports)
}
