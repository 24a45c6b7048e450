//! SHOW tables, with PgBouncer 1.25's columns in its order and units; Floodgate's own columns
//! come after PgBouncer's.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use bytes::BytesMut;

use super::table::{Cell, Kind, NULL, Table, int, text, timestamp};
use crate::config::PoolMode;
use crate::sessions::{ClientState, ServerState, now_us, wall_clock};
use crate::shared::Shared;
use crate::stats;

use Kind::{Int, Text};

fn mode_name(mode: PoolMode) -> &'static str {
    match mode {
        PoolMode::Transaction => "transaction",
        PoolMode::Session => "session",
    }
}

pub fn pools(shared: &Shared, out: &mut BytesMut) {
    let clients = shared.clients_by_pool();
    let mut t = Table::new(
        out,
        &[
            ("database", Text),
            ("user", Text),
            ("cl_active", Int),
            ("cl_waiting", Int),
            ("cl_active_cancel_req", Int),
            ("cl_waiting_cancel_req", Int),
            ("sv_active", Int),
            ("sv_active_cancel", Int),
            ("sv_being_canceled", Int),
            ("sv_idle", Int),
            ("sv_used", Int),
            ("sv_tested", Int),
            ("sv_login", Int),
            ("maxwait", Int),
            ("maxwait_us", Int),
            ("pool_mode", Text),
            ("load_balance_hosts", Text),
            // Floodgate's own.
            ("pool_size", Int),
            ("reserve_pool_size", Int),
            ("sv_reserve", Int),
            ("paused", Int),
            ("shed_percent", Int),
        ],
    );
    for pool in shared.pools.list() {
        let c = clients
            .get(&(pool.database.clone(), pool.user.clone()))
            .copied()
            .unwrap_or_default();
        // PgBouncer counts idle clients as active (linked, or with no query waiting).
        let (active, waiting, maxwait) = (c.active + c.idle, c.waiting, c.longest_wait_us);
        let position = pool.switch.position();
        t.row(vec![
            text(&pool.database),
            text(&pool.user),
            int(active),
            int(waiting),
            int(0),
            int(0),
            int(pool.active_servers() as i64),
            int(0),
            int(0),
            int(pool.idle_servers() as i64),
            int(0),
            int(0),
            int(pool.logins() as i64),
            int(maxwait / 1_000_000),
            int(maxwait % 1_000_000),
            text(mode_name(pool.mode)),
            NULL,
            int(pool.size() as i64),
            int(pool.reserve_size() as i64),
            int(pool.reserve_servers() as i64),
            int(i64::from(position.paused())),
            int(position.shed_percent()),
        ]);
    }
    t.finish();
}

/// SHOW STATS, STATS_TOTALS, STATS_AVERAGES.
pub enum StatsView {
    All,
    Totals,
    Averages,
}

pub fn stats(shared: &Shared, view: StatsView, out: &mut BytesMut) {
    let totals = shared.stats.totals_by_db();
    let averages = shared.stats.averages_by_db();
    // PgBouncer's names: "received"/"sent" are total_received/avg_recv in SHOW STATS and
    // bytes_received in the subsets; the prepared-statement averages keep an avg_ prefix there.
    let total_name = |n: &str| format!("total_{n}");
    let avg_name = |n: &str| match n {
        "received" => "avg_recv".to_owned(),
        n => format!("avg_{n}"),
    };
    let subset_name = |n: &str, avg: bool| match n {
        "received" | "sent" => format!("bytes_{n}"),
        "client_parse_count" | "server_parse_count" | "bind_count" if avg => format!("avg_{n}"),
        n => n.to_owned(),
    };
    let mut names = vec!["database".to_owned()];
    match view {
        StatsView::All => {
            names.extend(stats::NAMES.iter().map(|n| total_name(n)));
            names.extend(stats::NAMES.iter().map(|n| avg_name(n)));
        }
        StatsView::Totals => names.extend(stats::NAMES.iter().map(|n| subset_name(n, false))),
        StatsView::Averages => names.extend(stats::NAMES.iter().map(|n| subset_name(n, true))),
    }
    let columns: Vec<(&str, Kind)> = names
        .iter()
        .enumerate()
        .map(|(i, n)| (n.as_str(), if i == 0 { Text } else { Int }))
        .collect();
    let mut t = Table::new(out, &columns);
    for (db, total) in &totals {
        let avg = averages.get(db).copied().unwrap_or([0; 12]);
        let mut row = vec![text(db)];
        let cells = |values: &[u64; 12]| values.iter().map(|v| int(*v)).collect::<Vec<Cell>>();
        match view {
            StatsView::All => {
                row.extend(cells(total));
                row.extend(cells(&avg));
            }
            StatsView::Totals => row.extend(cells(total)),
            StatsView::Averages => row.extend(cells(&avg)),
        }
        t.row(row);
    }
    t.finish();
}

/// SHOW TOTALS: SHOW STATS summed over every database, one (name, value) row each.
pub fn totals(shared: &Shared, out: &mut BytesMut) {
    let mut total = [0u64; 12];
    let mut avg = [0u64; 12];
    for v in shared.stats.totals_by_db().values() {
        total.iter_mut().zip(v).for_each(|(t, v)| *t += v);
    }
    for v in shared.stats.averages_by_db().values() {
        avg.iter_mut().zip(v).for_each(|(t, v)| *t += v);
    }
    let mut t = Table::new(out, &[("name", Text), ("value", Int)]);
    for (prefix, values) in [("total", total), ("avg", avg)] {
        for (name, value) in stats::NAMES.iter().zip(values) {
            let name = match *name {
                "received" => "client_bytes",
                "sent" => "server_bytes",
                n => n,
            };
            t.row(vec![text(format!("{prefix}_{name}")), int(value)]);
        }
    }
    t.finish();
}

const SOCKET_COLUMNS: [(&str, Kind); 21] = [
    ("type", Text),
    ("user", Text),
    ("database", Text),
    ("replication", Text),
    ("state", Text),
    ("addr", Text),
    ("port", Int),
    ("local_addr", Text),
    ("local_port", Int),
    ("connect_time", Text),
    ("request_time", Text),
    ("wait", Int),
    ("wait_us", Int),
    ("close_needed", Int),
    ("ptr", Text),
    ("link", Text),
    ("remote_pid", Int),
    ("tls", Text),
    ("application_name", Text),
    ("prepared_statements", Int),
    ("id", Int),
];

pub fn clients(shared: &Shared, out: &mut BytesMut) {
    let now = now_us();
    // The server each client holds, by upstream pid.
    let servers: HashMap<i32, u64> = shared
        .sessions
        .servers()
        .iter()
        .map(|s| (s.remote_pid, s.id))
        .collect();
    let mut t = Table::new(out, &SOCKET_COLUMNS);
    for c in shared.sessions.clients() {
        let state = match c.state() {
            ClientState::Idle => "idle",
            ClientState::Waiting => "waiting",
            ClientState::Active => "active",
        };
        let wait = c.waiting_us(now);
        let pid = c.server_pid.load(Ordering::Relaxed);
        let link = servers.get(&pid).filter(|_| pid != 0);
        t.row(vec![
            text("C"),
            text(&c.user),
            text(&c.database),
            text("none"),
            text(state),
            text(c.addr.ip().to_string()),
            int(c.addr.port()),
            text(c.local_addr.ip().to_string()),
            int(c.local_addr.port()),
            text(timestamp(c.connect_time)),
            text(timestamp(wall_clock(
                c.request_time.load(Ordering::Relaxed),
            ))),
            int(wait / 1_000_000),
            int(wait % 1_000_000),
            int(0),
            text(format!("c{:x}", c.id)),
            text(link.map_or(String::new(), |id| format!("s{id:x}"))),
            int(0),
            text(&c.tls),
            text(&c.application_name),
            int(c.prepared_statements.load(Ordering::Relaxed)),
            int(c.id),
        ]);
    }
    t.finish();
}

pub fn servers(shared: &Shared, out: &mut BytesMut) {
    let mut t = Table::new(out, &SOCKET_COLUMNS);
    for s in shared.sessions.servers() {
        let state = match s.state() {
            ServerState::Idle => "idle",
            ServerState::Active => "active",
        };
        let (host, port) = s.addr.rsplit_once(':').unwrap_or((&s.addr, "0"));
        let client = s.client_id.load(Ordering::Relaxed);
        t.row(vec![
            text("S"),
            text(&s.user),
            text(&s.database),
            text("none"),
            text(state),
            text(host),
            int(port.parse::<i64>().unwrap_or(0)),
            text(s.local_addr.map_or(String::new(), |a| a.ip().to_string())),
            int(s.local_addr.map_or(0, |a| a.port())),
            text(timestamp(s.connect_time)),
            text(timestamp(wall_clock(
                s.request_time.load(Ordering::Relaxed),
            ))),
            int(0),
            int(0),
            int(i64::from(s.close_needed.load(Ordering::Relaxed))),
            text(format!("s{:x}", s.id)),
            text(match client {
                0 => String::new(),
                id => format!("c{id:x}"),
            }),
            int(s.remote_pid),
            text(&s.tls),
            text(""),
            int(s.prepared_statements.load(Ordering::Relaxed)),
            int(s.id),
        ]);
    }
    t.finish();
}

pub fn databases(shared: &Shared, out: &mut BytesMut) {
    let config = shared.config();
    let g = &config.floodgate;
    let pools = shared.pools.list();
    let mut client_counts: HashMap<String, i64> = HashMap::new();
    for c in shared.sessions.clients() {
        *client_counts.entry(c.database.clone()).or_default() += 1;
    }
    let mut t = Table::new(
        out,
        &[
            ("name", Text),
            ("host", Text),
            ("port", Int),
            ("database", Text),
            ("force_user", Text),
            ("pool_size", Int),
            ("min_pool_size", Int),
            ("reserve_pool_size", Int),
            ("server_lifetime", Int),
            ("pool_mode", Text),
            ("load_balance_hosts", Text),
            ("max_connections", Int),
            ("current_connections", Int),
            ("max_client_connections", Int),
            ("current_client_connections", Int),
            ("paused", Int),
            ("disabled", Int),
            // Floodgate's own.
            ("shed_percent", Int),
        ],
    );
    for (name, db) in &config.databases {
        let position = shared.switches.get(name).position();
        let servers: usize = pools
            .iter()
            .filter(|p| &p.database == name)
            .map(|p| p.open_servers())
            .sum();
        t.row(vec![
            text(name),
            text(&db.host),
            int(db.port),
            text(db.dbname.as_deref().unwrap_or(name)),
            db.user.clone(),
            int(config.pool_size(db) as i64),
            int(db.min_pool_size.unwrap_or(g.min_pool_size) as i64),
            int(db.reserve_pool_size.unwrap_or(g.reserve_pool_size) as i64),
            int(g.server_lifetime.as_secs()),
            db.pool_mode.map(|m| mode_name(m).to_owned()),
            NULL,
            int(db.max_db_connections.unwrap_or(g.max_db_connections) as i64),
            int(servers as i64),
            int(g.max_db_client_connections as i64),
            int(client_counts.get(name).copied().unwrap_or(0)),
            int(i64::from(position.paused())),
            int(i64::from(position.disabled())),
            int(position.shed_percent()),
        ]);
    }
    t.finish();
}

pub fn users(shared: &Shared, out: &mut BytesMut) {
    let config = shared.config();
    let g = &config.floodgate;
    let pools = shared.pools.list();
    let mut client_counts: HashMap<String, i64> = HashMap::new();
    for c in shared.sessions.clients() {
        *client_counts.entry(c.user.clone()).or_default() += 1;
    }
    let mut t = Table::new(
        out,
        &[
            ("name", Text),
            ("pool_size", Int),
            ("reserve_pool_size", Int),
            ("pool_mode", Text),
            ("max_user_connections", Int),
            ("current_connections", Int),
            ("max_user_client_connections", Int),
            ("current_client_connections", Int),
        ],
    );
    for user in &config.users {
        let servers: usize = pools
            .iter()
            .filter(|p| p.user == user.name)
            .map(|p| p.open_servers())
            .sum();
        t.row(vec![
            text(&user.name),
            NULL,
            NULL,
            NULL,
            int(g.max_user_connections as i64),
            int(servers as i64),
            int(g.max_user_client_connections as i64),
            int(client_counts.get(&user.name).copied().unwrap_or(0)),
        ]);
    }
    t.finish();
}

pub fn lists(shared: &Shared, out: &mut BytesMut) {
    let config = shared.config();
    let clients = shared.sessions.clients().len();
    let servers = shared.sessions.servers().len();
    let mut t = Table::new(out, &[("list", Text), ("items", Int)]);
    for (name, items) in [
        ("databases", config.databases.len()),
        ("users", config.users.len()),
        ("pools", shared.pools.list().len()),
        ("free_clients", 0),
        ("used_clients", clients),
        (
            "login_clients",
            shared.sessions.logging_in.load(Ordering::Relaxed) as usize,
        ),
        ("free_servers", 0),
        ("used_servers", servers),
        ("dns_names", 0),
        ("dns_zones", 0),
        ("dns_queries", 0),
        ("dns_pending", 0),
    ] {
        t.row(vec![text(name), int(items as i64)]);
    }
    t.finish();
}

pub fn state(shared: &Shared, out: &mut BytesMut) {
    let config = shared.config();
    let positions: Vec<_> = config
        .databases
        .keys()
        .map(|db| (db, shared.switches.get(db).position()))
        .collect();
    let all_paused = !positions.is_empty() && positions.iter().all(|(_, p)| p.paused());
    let list = |f: &dyn Fn(crate::switch::Position) -> bool| {
        let names: Vec<&str> = positions
            .iter()
            .filter(|(_, p)| f(*p))
            .map(|(db, _)| db.as_str())
            .collect();
        names.join(", ")
    };
    let shed: Vec<String> = positions
        .iter()
        .filter(|(_, p)| p.shed_percent() > 0)
        .map(|(db, p)| format!("{db} {}%", p.shed_percent()))
        .collect();
    let yes_no = |b: bool| if b { "yes" } else { "no" };
    let mut t = Table::new(out, &[("key", Text), ("value", Text)]);
    t.row(vec![text("active"), text(yes_no(!all_paused))]);
    t.row(vec![text("paused"), text(yes_no(all_paused))]);
    t.row(vec![text("suspended"), text("no")]);
    // Floodgate's own: the switches per database.
    t.row(vec![text("paused_databases"), text(list(&|p| p.paused()))]);
    t.row(vec![
        text("disabled_databases"),
        text(list(&|p| p.disabled())),
    ]);
    t.row(vec![text("shed_databases"), text(shed.join(", "))]);
    t.finish();
}

pub fn mem(shared: &Shared, out: &mut BytesMut) {
    let clients = shared.sessions.clients().len();
    let servers = shared.sessions.servers().len();
    let mut t = Table::new(
        out,
        &[
            ("name", Text),
            ("size", Int),
            ("used", Int),
            ("free", Int),
            ("memtotal", Int),
        ],
    );
    for (name, size, used) in [
        (
            "client_info",
            size_of::<crate::sessions::ClientInfo>(),
            clients,
        ),
        (
            "server_info",
            size_of::<crate::sessions::ServerInfo>(),
            servers,
        ),
    ] {
        t.row(vec![
            text(name),
            int(size as i64),
            int(used as i64),
            int(0),
            int((size * used) as i64),
        ]);
    }
    t.finish();
}

pub fn version(out: &mut BytesMut) {
    let mut t = Table::new(out, &[("version", Text)]);
    t.row(vec![text(format!(
        "Floodgate {}",
        env!("CARGO_PKG_VERSION")
    ))]);
    t.finish();
}

pub fn config(shared: &Shared, out: &mut BytesMut) {
    let config = shared.config();
    let defaults = crate::config::General::default();
    let now = config.floodgate.settings();
    let default_values: HashMap<String, String> = defaults.settings().into_iter().collect();
    let mut t = Table::new(
        out,
        &[
            ("key", Text),
            ("value", Text),
            ("default", Text),
            ("changeable", Text),
        ],
    );
    for (key, value) in now {
        let changeable = if crate::config::NEEDS_RESTART.contains(&key.as_str()) {
            "no"
        } else {
            "yes"
        };
        let default = default_values.get(&key).cloned();
        t.row(vec![text(key), text(value), default, text(changeable)]);
    }
    t.finish();
}
