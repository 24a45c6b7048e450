//! The admin console and the kill switch: SHOW tables with PgBouncer's columns, who may do
//! what, PAUSE / RESUME, DISABLE / ENABLE, SHED, KILL, RECONNECT, RELOAD and SET, against a
//! real PostgreSQL with tokio-postgres clients.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use floodgate::pgcluster::HbaAuth;
use tokio_postgres::SimpleQueryMessage;

const OPS: (&str, &str) = ("ops", "ops-password-1");
const WATCHER: (&str, &str) = ("watcher", "watcher-password-2");

fn opts(pool_size: usize, extra: &[&str]) -> ProxyOpts {
    let mut all = vec![
        "admin_users = [\"ops\"]".to_string(),
        "stats_users = [\"watcher\"]".to_string(),
    ];
    all.extend(extra.iter().map(|s| s.to_string()));
    ProxyOpts {
        pool_size,
        extra: all,
        users: vec![
            ("app".into(), "secret".into()),
            (OPS.0.into(), OPS.1.into()),
            (WATCHER.0.into(), WATCHER.1.into()),
        ],
        ..ProxyOpts::default()
    }
}

async fn env(pool_size: usize, extra: &[&str]) -> Env {
    Env::start(HbaAuth::ScramSha256, opts(pool_size, extra)).await
}

async fn console(env: &Env, (user, password): (&str, &str)) -> Conn {
    env.connect_with(&env.config(user, Some(password), "pgbouncer"))
        .await
}

/// A SHOW result: column names and rows by column name.
struct Shown {
    columns: Vec<String>,
    rows: Vec<BTreeMap<String, Option<String>>>,
}

async fn show(conn: &Conn, what: &str) -> Shown {
    let sql = format!("SHOW {what}");
    let messages = within(&sql, conn.simple_query(&sql))
        .await
        .unwrap_or_else(|e| panic!("{sql}: {}", describe(&e)));
    let mut shown = Shown {
        columns: Vec::new(),
        rows: Vec::new(),
    };
    for m in messages {
        match m {
            SimpleQueryMessage::RowDescription(cols) => {
                shown.columns = cols.iter().map(|c| c.name().to_string()).collect();
            }
            SimpleQueryMessage::Row(row) => {
                let mut by_name = BTreeMap::new();
                for (i, c) in row.columns().iter().enumerate() {
                    by_name.insert(c.name().to_string(), row.get(i).map(str::to_string));
                }
                shown.rows.push(by_name);
            }
            _ => {}
        }
    }
    shown
}

impl Shown {
    /// The value of `column` in the row whose `key_column` is `key`.
    fn get(&self, key_column: &str, key: &str, column: &str) -> Option<String> {
        let row = self
            .rows
            .iter()
            .find(|r| r.get(key_column).cloned().flatten().as_deref() == Some(key))
            .unwrap_or_else(|| panic!("no row with {key_column} = {key}"));
        row.get(column)
            .unwrap_or_else(|| panic!("no column {column}"))
            .clone()
    }

    fn int(&self, key_column: &str, key: &str, column: &str) -> i64 {
        self.get(key_column, key, column)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{column} is not a number"))
    }
}

async fn admin(conn: &Conn, sql: &str) {
    within(sql, conn.simple_query(sql))
        .await
        .unwrap_or_else(|e| panic!("{sql}: {}", describe(&e)));
}

async fn admin_error(conn: &Conn, sql: &str) -> tokio_postgres::Error {
    match within(sql, conn.simple_query(sql)).await {
        Ok(_) => panic!("{sql} should have failed"),
        Err(e) => e,
    }
}

fn columns(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// The column lists of PgBouncer 1.25, in order, for the commands it has; Floodgate's own
/// columns may only follow them.
fn pgbouncer_columns(what: &str) -> Vec<String> {
    let socket = [
        "type",
        "user",
        "database",
        "replication",
        "state",
        "addr",
        "port",
        "local_addr",
        "local_port",
        "connect_time",
        "request_time",
        "wait",
        "wait_us",
        "close_needed",
        "ptr",
        "link",
        "remote_pid",
        "tls",
        "application_name",
        "prepared_statements",
        "id",
    ];
    let stats = [
        "server_assignment_count",
        "xact_count",
        "query_count",
        "received",
        "sent",
        "xact_time",
        "query_time",
        "wait_time",
        "client_parse_count",
        "server_parse_count",
        "bind_count",
        "client_connect_count",
    ];
    match what {
        "POOLS" => columns(&[
            "database",
            "user",
            "cl_active",
            "cl_waiting",
            "cl_active_cancel_req",
            "cl_waiting_cancel_req",
            "sv_active",
            "sv_active_cancel",
            "sv_being_canceled",
            "sv_idle",
            "sv_used",
            "sv_tested",
            "sv_login",
            "maxwait",
            "maxwait_us",
            "pool_mode",
            "load_balance_hosts",
        ]),
        "CLIENTS" | "SERVERS" => columns(&socket),
        "STATS" => {
            let mut c = vec!["database".to_string()];
            c.extend(stats.iter().map(|s| format!("total_{s}")));
            c.extend(stats.iter().map(|s| match *s {
                "received" => "avg_recv".to_string(),
                s => format!("avg_{s}"),
            }));
            c
        }
        "STATS_TOTALS" => {
            let mut c = vec!["database".to_string()];
            c.extend(stats.iter().map(|s| match *s {
                "received" | "sent" => format!("bytes_{s}"),
                s => s.to_string(),
            }));
            c
        }
        "STATS_AVERAGES" => {
            let mut c = vec!["database".to_string()];
            c.extend(stats.iter().map(|s| match *s {
                "received" | "sent" => format!("bytes_{s}"),
                "client_parse_count" | "server_parse_count" | "bind_count" => format!("avg_{s}"),
                s => s.to_string(),
            }));
            c
        }
        "DATABASES" => columns(&[
            "name",
            "host",
            "port",
            "database",
            "force_user",
            "pool_size",
            "min_pool_size",
            "reserve_pool_size",
            "server_lifetime",
            "pool_mode",
            "load_balance_hosts",
            "max_connections",
            "current_connections",
            "max_client_connections",
            "current_client_connections",
            "paused",
            "disabled",
        ]),
        "USERS" => columns(&[
            "name",
            "pool_size",
            "reserve_pool_size",
            "pool_mode",
            "max_user_connections",
            "current_connections",
            "max_user_client_connections",
            "current_client_connections",
        ]),
        "CONFIG" => columns(&["key", "value", "default", "changeable"]),
        "LISTS" => columns(&["list", "items"]),
        "STATE" => columns(&["key", "value"]),
        "MEM" => columns(&["name", "size", "used", "free", "memtotal"]),
        "VERSION" => columns(&["version"]),
        "TOTALS" => columns(&["name", "value"]),
        other => panic!("no column list for {other}"),
    }
}

#[tokio::test]
async fn every_show_has_pgbouncer_columns_and_no_secret() {
    let env = env(3, &[]).await;
    let app = env.connect().await;
    scalar(&app, "SELECT 1").await;
    let ops = console(&env, OPS).await;
    for what in [
        "POOLS",
        "STATS",
        "STATS_TOTALS",
        "STATS_AVERAGES",
        "TOTALS",
        "CLIENTS",
        "SERVERS",
        "DATABASES",
        "USERS",
        "CONFIG",
        "LISTS",
        "STATE",
        "MEM",
        "VERSION",
    ] {
        let shown = show(&ops, what).await;
        let expected = pgbouncer_columns(what);
        assert!(
            shown.columns.len() >= expected.len() && shown.columns[..expected.len()] == expected,
            "SHOW {what}: columns {:?}, PgBouncer's are {expected:?}",
            shown.columns
        );
        assert!(!shown.rows.is_empty(), "SHOW {what} has no rows");
        for row in &shown.rows {
            for value in row.values().flatten() {
                for secret in ["secret", OPS.1, WATCHER.1] {
                    assert!(
                        !value.contains(secret),
                        "SHOW {what} shows a password: {value}"
                    );
                }
            }
        }
    }
    let pools = show(&ops, "POOLS").await;
    assert_eq!(pools.int("database", "app", "cl_active"), 1);
    assert_eq!(pools.int("database", "app", "sv_idle"), 1);
    let stats = show(&ops, "STATS").await;
    assert!(stats.int("database", "app", "total_xact_count") >= 1);
    assert!(stats.int("database", "app", "total_query_count") >= 1);
    assert!(stats.int("database", "app", "total_received") > 0);
    let clients = show(&ops, "CLIENTS").await;
    assert_eq!(
        clients.get("database", "app", "state").as_deref(),
        Some("idle")
    );
    let help = within("SHOW HELP", ops.simple_query("SHOW HELP")).await;
    assert!(help.is_ok(), "SHOW HELP: {help:?}");
}

#[tokio::test]
async fn who_may_use_the_console() {
    let env = env(2, &[]).await;
    // A user who is neither admin nor stats user cannot log in to it.
    let err = match env.try_connect("app", Some("secret"), "floodgate").await {
        Ok(_) => panic!("a plain user reached the console"),
        Err(e) => e,
    };
    assert_eq!(sqlstate(&err), "42501", "{}", describe(&err));
    // A stats user may SHOW but not act; the session stays usable.
    let watcher = console(&env, WATCHER).await;
    show(&watcher, "POOLS").await;
    let err = admin_error(&watcher, "PAUSE").await;
    assert_eq!(sqlstate(&err), "42501");
    assert!(db_message(&err).contains("PAUSE"), "{}", describe(&err));
    show(&watcher, "VERSION").await;
    // Anything unknown gets an error and the session goes on.
    let ops = console(&env, OPS).await;
    let err = admin_error(&ops, "FROBNICATE everything").await;
    assert_eq!(sqlstate(&err), "42601");
    let err = admin_error(&ops, "SHOW NONSENSE").await;
    assert_eq!(sqlstate(&err), "42601");
    let err = admin_error(&ops, "SUSPEND").await;
    assert_eq!(sqlstate(&err), "0A000");
    // The extended protocol gets a clear error, not a hang.
    let err = match within("extended query", ops.query("SHOW POOLS", &[])).await {
        Ok(_) => panic!("the extended protocol should be refused"),
        Err(e) => e,
    };
    assert_eq!(sqlstate(&err), "0A000", "{}", describe(&err));
    show(&ops, "STATE").await;
}

#[tokio::test]
async fn pause_waits_for_transactions_in_flight_and_holds_new_ones_until_resume() {
    let env = env(2, &[]).await;
    let ops = console(&env, OPS).await;
    let busy = env.connect().await;
    admin(&busy, "BEGIN").await;
    scalar(&busy, "SELECT 1").await;
    let waiting = env.connect().await;
    let pause = tokio::spawn(async move {
        admin(&ops, "PAUSE app").await;
        ops
    });
    // PAUSE does not return while a transaction is in flight.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !pause.is_finished(),
        "PAUSE returned with a transaction in flight"
    );
    // New transactions wait.
    let held = tokio::spawn(async move {
        let value = scalar(&waiting, "SELECT 42").await;
        (value, waiting)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!held.is_finished(), "a query ran on a paused database");
    // The transaction in flight finishes; then PAUSE returns, the other client still waits.
    admin(&busy, "COMMIT").await;
    let ops = within("PAUSE returning", pause).await.expect("PAUSE task");
    let databases = show(&ops, "DATABASES").await;
    assert_eq!(databases.int("name", "app", "paused"), 1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!held.is_finished(), "a query ran on a paused database");
    let pools = show(&ops, "POOLS").await;
    assert_eq!(pools.int("database", "app", "cl_waiting"), 1);
    admin(&ops, "RESUME app").await;
    let (value, _waiting) = within("query after RESUME", held).await.expect("task");
    assert_eq!(value, "42");
    assert_eq!(
        show(&ops, "DATABASES").await.int("name", "app", "paused"),
        0
    );
}

#[tokio::test]
async fn disable_refuses_new_clients_and_keeps_connected_ones() {
    let env = env(2, &[]).await;
    let ops = console(&env, OPS).await;
    let old = env.connect().await;
    admin(&ops, "DISABLE app").await;
    let err = match env.try_connect("app", Some("secret"), "app").await {
        Ok(_) => panic!("a new client reached a disabled database"),
        Err(e) => e,
    };
    assert_eq!(sqlstate(&err), "57P03", "{}", describe(&err));
    assert!(db_message(&err).contains("DISABLE"), "{}", describe(&err));
    assert_eq!(scalar(&old, "SELECT 7").await, "7");
    assert_eq!(
        show(&ops, "DATABASES").await.int("name", "app", "disabled"),
        1
    );
    admin(&ops, "ENABLE app").await;
    let new = env.connect().await;
    assert_eq!(scalar(&new, "SELECT 8").await, "8");
}

#[tokio::test]
async fn shed_fails_that_share_of_new_transactions_at_once() {
    let env = env(2, &[]).await;
    let ops = console(&env, OPS).await;
    let app = env.connect().await;
    admin(&ops, "SHED app 100").await;
    let err = match within("shed query", app.simple_query("SELECT 1")).await {
        Ok(_) => panic!("SHED 100 let a transaction through"),
        Err(e) => e,
    };
    assert_eq!(sqlstate(&err), "53300");
    assert!(
        db_message(&err).contains("shed by operator"),
        "{}",
        describe(&err)
    );
    // The extended protocol too, and the session stays usable.
    let err = match within("shed prepared query", app.query("SELECT $1::int", &[&1i32])).await {
        Ok(_) => panic!("SHED 100 let an extended-protocol query through"),
        Err(e) => e,
    };
    assert_eq!(sqlstate(&err), "53300");
    admin(&ops, "SHED app 0").await;
    assert_eq!(scalar(&app, "SELECT 2").await, "2");
    let row = within("extended query", app.query_one("SELECT $1::int", &[&5i32]))
        .await
        .expect("query after SHED 0");
    assert_eq!(row.get::<_, i32>(0), 5);

    admin(&ops, "SHED app 50").await;
    let mut shed = 0;
    for _ in 0..1000 {
        match app.simple_query("SELECT 1").await {
            Ok(_) => {}
            Err(e) if sqlstate(&e) == "53300" => shed += 1,
            Err(e) => panic!("unexpected error: {}", describe(&e)),
        }
    }
    assert!(
        (350..=650).contains(&shed),
        "SHED 50 shed {shed} of 1000 transactions"
    );
    admin(&ops, "SHED app 0").await;
}

#[tokio::test]
async fn kill_ends_sessions_with_57p01_and_holds_the_database_until_resume() {
    let env = env(2, &[]).await;
    let ops = console(&env, OPS).await;
    let idle = env.connect().await;
    let busy = env.connect().await;
    admin(&busy, "BEGIN").await;
    scalar(&busy, "SELECT 1").await;
    admin(&ops, "KILL app").await;
    for conn in [&idle, &busy] {
        let err = match within("query after KILL", conn.simple_query("SELECT 1")).await {
            Ok(_) => panic!("a killed session still runs queries"),
            Err(e) => e,
        };
        assert!(
            err.code().map(|c| c.code()) == Some("57P01") || err.is_closed(),
            "{}",
            describe(&err)
        );
    }
    // The transaction that was open is gone upstream.
    wait_until("the killed servers to close", || async {
        env.backend_count().await == 0
    })
    .await;
    admin(&ops, "RESUME app").await;
    let again = env.connect().await;
    assert_eq!(scalar(&again, "SELECT 3").await, "3");
}

#[tokio::test]
async fn kill_client_closes_that_client_only() {
    let env = env(2, &[]).await;
    let ops = console(&env, OPS).await;
    let mut config = env.config("app", Some("secret"), "app");
    config.application_name("victim");
    let a = env.connect_with(&config).await;
    let b = env.connect().await;
    let clients = show(&ops, "CLIENTS").await;
    let id = clients.get("application_name", "victim", "id").expect("id");
    admin(&ops, &format!("KILL_CLIENT {id}")).await;
    assert!(
        within("killed client", a.simple_query("SELECT 1"))
            .await
            .is_err()
    );
    assert_eq!(scalar(&b, "SELECT 4").await, "4");
    let err = admin_error(&ops, "KILL_CLIENT 999999").await;
    assert_eq!(sqlstate(&err), "42704");
}

#[tokio::test]
async fn reconnect_replaces_servers_without_a_client_error() {
    let env = env(1, &[]).await;
    let ops = console(&env, OPS).await;
    let app = env.connect().await;
    let before = scalar(&app, "SELECT pg_backend_pid()").await;
    admin(&app, "BEGIN").await;
    scalar(&app, "SELECT 1").await;
    admin(&ops, "RECONNECT app").await;
    let servers = show(&ops, "SERVERS").await;
    assert_eq!(
        servers.get("database", "app", "close_needed").as_deref(),
        Some("1")
    );
    // The transaction in flight finishes on its server...
    assert_eq!(scalar(&app, "SELECT pg_backend_pid()").await, before);
    admin(&app, "COMMIT").await;
    admin(&ops, "WAIT_CLOSE app").await;
    // ...and the next one runs on a new one.
    let after = scalar(&app, "SELECT pg_backend_pid()").await;
    assert_ne!(before, after, "RECONNECT kept the old server");
}

/// A proxy started from a file, as `floodgate --config FILE` does.
async fn env_from_file(file: &std::path::Path, toml: &str) -> Env {
    let cluster = start_cluster(HbaAuth::ScramSha256, 100).await;
    let toml = toml
        .replace("{HOST}", cluster.host())
        .replace("{PORT}", &cluster.port().to_string());
    std::fs::write(file, &toml).expect("write config");
    let config = floodgate::config::Config::load(file).expect("config");
    let proxy = floodgate::Proxy::start_from(config, Some(file.to_path_buf()))
        .await
        .expect("proxy starts");
    Env { cluster, proxy }
}

const FILE_CONFIG: &str = r#"
[floodgate]
listen = "127.0.0.1:0"
admin_users = ["ops"]
default_pool_size = 2
query_wait_timeout = "30s"

[[users]]
name = "app"
password = "secret"

[[users]]
name = "ops"
password = "ops-password-1"

[databases.app]
host = "{HOST}"
port = {PORT}
"#;

#[tokio::test]
async fn reload_adds_a_database_and_resizes_a_pool_under_connected_clients() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("floodgate.toml");
    let env = env_from_file(&file, FILE_CONFIG).await;
    let ops = console(&env, OPS).await;
    let app = env.connect().await;
    scalar(&app, "SELECT 1").await;
    assert_eq!(
        show(&ops, "POOLS")
            .await
            .int("database", "app", "pool_size"),
        2
    );
    let grown = std::fs::read_to_string(&file)
        .unwrap()
        .replace("default_pool_size = 2", "default_pool_size = 4")
        + "\n[databases.other]\nhost = \"HOST\"\nport = PORT\ndbname = \"app\"\n";
    let grown = grown
        .replace("\"HOST\"", &format!("\"{}\"", env.cluster.host()))
        .replace("PORT\n", &format!("{}\n", env.cluster.port()));
    std::fs::write(&file, grown).unwrap();
    admin(&ops, "RELOAD").await;
    assert_eq!(
        show(&ops, "POOLS")
            .await
            .int("database", "app", "pool_size"),
        4
    );
    assert_eq!(
        show(&ops, "DATABASES")
            .await
            .int("name", "other", "pool_size"),
        4
    );
    // The connected client never noticed; the new database works.
    assert_eq!(scalar(&app, "SELECT 5").await, "5");
    let other = env
        .try_connect("app", Some("secret"), "other")
        .await
        .expect("the reloaded database accepts clients");
    assert_eq!(scalar(&other, "SELECT 6").await, "6");
    // SET changes a setting the same way.
    admin(&ops, "SET default_pool_size = 3").await;
    let config = show(&ops, "CONFIG").await;
    assert_eq!(
        config.get("key", "default_pool_size", "value").as_deref(),
        Some("3")
    );
    assert_eq!(
        config.get("key", "listen", "changeable").as_deref(),
        Some("no")
    );
    let err = admin_error(&ops, "SET listen = '127.0.0.1:1'").await;
    assert_eq!(sqlstate(&err), "22023");
    assert_eq!(
        show(&ops, "POOLS")
            .await
            .int("database", "app", "pool_size"),
        3
    );
}

#[tokio::test]
async fn an_invalid_reload_keeps_the_running_configuration() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("floodgate.toml");
    let env = env_from_file(&file, FILE_CONFIG).await;
    let ops = console(&env, OPS).await;
    let good = std::fs::read_to_string(&file).unwrap();
    std::fs::write(
        &file,
        good.replace("default_pool_size = 2", "default_pool_sise = 9"),
    )
    .unwrap();
    let err = admin_error(&ops, "RELOAD").await;
    assert_eq!(sqlstate(&err), "F0000");
    let message = db_message(&err);
    assert!(
        message.contains("default_pool_sise") && message.contains("line"),
        "{message}"
    );
    assert_eq!(show(&ops, "POOLS").await.rows.len(), 0);
    let app = env.connect().await;
    assert_eq!(scalar(&app, "SELECT 1").await, "1");
    assert_eq!(
        show(&ops, "POOLS")
            .await
            .int("database", "app", "pool_size"),
        2
    );
}

#[tokio::test]
async fn reload_moves_clients_to_a_changed_upstream_and_ends_a_removed_database() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("floodgate.toml");
    let env = env_from_file(&file, FILE_CONFIG).await;
    let ops = console(&env, OPS).await;
    let extra = format!(
        "\n[databases.gone]\nhost = \"{}\"\nport = {}\ndbname = \"app\"\n",
        env.cluster.host(),
        env.cluster.port()
    );
    let original = std::fs::read_to_string(&file).unwrap();
    std::fs::write(&file, original.clone() + &extra).unwrap();
    admin(&ops, "RELOAD").await;
    let app = env.connect().await;
    let leaving = env
        .try_connect("app", Some("secret"), "gone")
        .await
        .expect("a client of the database about to be removed");
    assert_eq!(scalar(&app, "SELECT current_database()").await, "app");
    assert_eq!(scalar(&leaving, "SELECT 1").await, "1");
    // The upstream of `app` changes (another database on the same server) and `gone` goes.
    let moved = original.replace(
        "[databases.app]\n",
        "[databases.app]\ndbname = \"postgres\"\n",
    );
    std::fs::write(&file, moved).unwrap();
    admin(&ops, "RELOAD").await;
    // The connected client goes on, now on a server of the new upstream.
    assert_eq!(scalar(&app, "SELECT current_database()").await, "postgres");
    let err = match within(
        "query on a removed database",
        leaving.simple_query("SELECT 1"),
    )
    .await
    {
        Ok(_) => panic!("a removed database still runs queries"),
        Err(e) => e,
    };
    assert_eq!(sqlstate(&err), "57P01", "{}", describe(&err));
    assert!(db_message(&err).contains("removed"), "{}", describe(&err));
}
