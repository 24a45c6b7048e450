//! `instances = "auto"`: several Floodgate processes in front of one PostgreSQL share
//! `connection_budget` of its usable connections, coordinated through `pg_stat_activity` only.
//! Three instances run pgbench, a fourth joins, one is killed (SIGKILL); sampled every 100 ms
//! from a direct connection, their server connections together never exceed the budget, and
//! every pgbench of a surviving instance finishes without a failed client.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use floodgate::pgcluster::{HbaAuth, PgCluster};

/// `connection_budget` in these tests.
const BUDGET: f64 = 0.7;

/// Starts the built binary with `instances = "auto"` and id `id`, and waits for its address.
fn start_instance(cluster: &PgCluster, id: &str) -> Process {
    let opts = ProxyOpts {
        pool_size: 20,
        extra: vec![
            "instances = \"auto\"".into(),
            format!("instance_id = \"{id}\""),
            format!("connection_budget = {BUDGET}"),
            "budget_period = \"500ms\"".into(),
        ],
        ..ProxyOpts::default()
    };
    start_binary(&proxy_toml(cluster, &opts), id)
}

/// pgbench (`-N`: no contended branch/teller updates) through `addr` for `secs` seconds.
fn pgbench(addr: SocketAddr, secs: u32) -> tokio::task::JoinHandle<std::process::Output> {
    let mut args: Vec<String> = ["-n", "-N", "-c", "12", "-j", "2", "-U", "app"]
        .map(String::from)
        .to_vec();
    args.extend(["-T".into(), secs.to_string()]);
    args.extend(host_port(addr));
    args.push("app".into());
    tokio::spawn(run_tool("pgbench", args))
}

/// What the sampler saw.
#[derive(Default, Debug)]
struct Seen {
    samples: usize,
    /// Most pool servers of all instances at once (coordination connections excluded).
    max_servers: i64,
    /// Most and fewest live instances (coordination connections) seen after all had joined.
    max_instances: i64,
    /// Samples over the budget.
    over: usize,
    /// The first few of them: (servers, instances).
    first_over: Vec<(i64, i64)>,
}

/// Counts, every 100 ms until `stop`, the server connections of user `app` on database `app`
/// (what every instance logs in as) and the coordination connections, from a superuser
/// connection over the Unix socket (not counted: another user and database).
async fn sample(cluster: Arc<PgCluster>, budget: i64, stop: Arc<AtomicBool>) -> Seen {
    let client = superuser_connect(&cluster).await;
    let sql = "SELECT count(*) FILTER (WHERE application_name NOT LIKE 'floodgate/budget=%'), \
               count(*) FILTER (WHERE application_name LIKE 'floodgate/budget=%') \
               FROM pg_stat_activity WHERE backend_type = 'client backend' \
               AND usename = 'app' AND datname = 'app'";
    let mut seen = Seen::default();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let row = within("sampling", client.query_one(sql, &[]))
            .await
            .expect("sample");
        let (servers, instances): (i64, i64) = (row.get(0), row.get(1));
        seen.samples += 1;
        seen.max_servers = seen.max_servers.max(servers);
        seen.max_instances = seen.max_instances.max(instances);
        if servers > budget {
            seen.over += 1;
            if seen.first_over.len() < 10 {
                seen.first_over.push((servers, instances));
            }
        }
    }
    seen
}

/// pgbench's run went through with every client: exit 0, transactions done, none failed.
fn assert_pgbench_ok(name: &str, out: &std::process::Output) {
    let report = tool_text(out);
    assert!(out.status.success(), "{name}: {report}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let processed = stdout
        .lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        .and_then(|n| n.split_whitespace().next()?.parse::<u64>().ok());
    assert!(processed.is_some_and(|n| n > 0), "{name}: {report}");
    if let Some(line) = stdout
        .lines()
        .find(|l| l.starts_with("number of failed transactions"))
    {
        assert!(
            line.starts_with("number of failed transactions: 0 "),
            "{name}: {report}"
        );
    }
    assert!(!stdout.contains("aborted"), "{name}: {report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_share_the_budget_as_they_join_and_die() {
    let cluster = start_cluster(HbaAuth::ScramSha256, 50).await;
    pgbench_init(&cluster).await;

    let limits = cluster_sql(
        &cluster,
        "postgres",
        "SELECT current_setting('max_connections') || ' ' || \
         current_setting('superuser_reserved_connections')",
    )
    .await;
    let (max, reserved) = limits.split_once(' ').expect("two numbers");
    let usable = max.parse::<i64>().unwrap() - reserved.parse::<i64>().unwrap();
    let budget = (BUDGET * usable as f64).floor() as i64;

    let stop = Arc::new(AtomicBool::new(false));
    let sampler = tokio::spawn(sample(cluster.clone(), budget, stop.clone()));

    let mut first = start_instance(&cluster, "fg1");
    let second = start_instance(&cluster, "fg2");
    let third = start_instance(&cluster, "fg3");
    let bench_first = pgbench(first.addr, 40);
    let bench_second = pgbench(second.addr, 30);
    let bench_third = pgbench(third.addr, 30);

    tokio::time::sleep(Duration::from_secs(8)).await;
    let fourth = start_instance(&cluster, "fg4");
    let bench_fourth = pgbench(fourth.addr, 16);

    tokio::time::sleep(Duration::from_secs(6)).await;
    first.child.kill().expect("SIGKILL fg1");
    let _ = first.child.wait();

    let mut survivors = Vec::new();
    for (name, bench) in [
        ("fg2", bench_second),
        ("fg3", bench_third),
        ("fg4", bench_fourth),
    ] {
        survivors.push((name, bench.await.expect("pgbench task")));
    }
    // fg1's pgbench lost its proxy; only that it ended matters.
    let _ = bench_first.await;
    stop.store(true, Ordering::Relaxed);
    let seen = sampler.await.expect("sampler");
    eprintln!("budget {budget}: {seen:?}");

    let logs = || {
        [&second, &third, &fourth]
            .map(|i| i.log.lock().unwrap().join("\n"))
            .join("\n---\n")
    };
    assert!(
        seen.over == 0,
        "over the budget of {budget}: {seen:?}\n{}",
        logs()
    );
    assert!(seen.samples > 100, "sampled: {seen:?}");
    assert_eq!(seen.max_instances, 4, "the fourth instance was seen live");
    for (name, out) in &survivors {
        assert_pgbench_ok(name, out);
    }
    let live = cluster_sql(
        &cluster,
        "postgres",
        "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'floodgate/budget=%'",
    )
    .await;
    assert_eq!(live, "3", "the killed instance is no longer counted");
}

/// GET `path` on `addr` (HTTP/1.1, connection closed after it): the body.
async fn http_get(addr: SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    within(&format!("GET {path}"), async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("send");
        let mut response = String::new();
        stream.read_to_string(&mut response).await.expect("read");
        response
    })
    .await
}

/// SHOW BUDGET's single row, as (column, value) pairs.
async fn show_budget(console: &tokio_postgres::Client) -> Vec<(String, String)> {
    let messages = within("SHOW BUDGET", console.simple_query("SHOW BUDGET"))
        .await
        .expect("SHOW BUDGET");
    messages
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => Some(
                row.columns()
                    .iter()
                    .enumerate()
                    .map(|(i, c)| (c.name().to_owned(), row.get(i).unwrap_or("").to_owned()))
                    .collect(),
            ),
            _ => None,
        })
        .unwrap_or_default()
}

/// One instance alone: its servers carry `floodgate/<id>` as the default a client without an
/// application_name gets back; SHOW BUDGET, `/metrics` and `floodgate check` show the same share.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_instance_shows_its_share_everywhere() {
    let cluster = start_cluster(HbaAuth::ScramSha256, 50).await;
    let opts = ProxyOpts {
        pool_size: 1,
        extra: vec![
            "instances = \"auto\"".into(),
            "instance_id = \"solo\"".into(),
            "budget_period = \"200ms\"".into(),
            "admin_users = [\"app\"]".into(),
        ],
        ..ProxyOpts::default()
    };
    let toml = proxy_toml(&cluster, &opts) + "\n[metrics]\nlisten = \"127.0.0.1:0\"\n";
    let proxy = start_proxy(&toml).await;
    let addr = proxy.local_addr();

    // A client that names itself, then one that does not, on the one server of the pool.
    let mut named = client_config(addr, "app", Some("secret"), "app");
    named.application_name("mine");
    let named = within("named client", connect(&named))
        .await
        .expect("named");
    assert_eq!(scalar(&named, "SHOW application_name").await, "mine");
    let plain = within(
        "plain client",
        connect(&client_config(addr, "app", Some("secret"), "app")),
    )
    .await
    .expect("plain");
    assert_eq!(
        scalar(
            &plain,
            "SELECT application_name FROM pg_stat_activity WHERE pid = pg_backend_pid()"
        )
        .await,
        "floodgate/solo",
        "the server's default is the instance's mark"
    );

    // Alone, the instance's share is the whole budget: 0.7 x (50 - 3) = 32.
    let console = within(
        "console",
        connect(&client_config(addr, "app", Some("secret"), "floodgate")),
    )
    .await
    .expect("console");
    let value = |row: &[(String, String)], key: &str| {
        row.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone())
    };
    wait_until("the budget is polled", || async {
        let row = show_budget(&console).await;
        value(&row, "cap").as_deref() == Some("32")
    })
    .await;
    let row = show_budget(&console).await;
    for (key, expected) in [
        ("instance_id", "solo"),
        ("budget", "32"),
        ("instances", "1"),
        ("share", "32"),
        ("claim", "32"),
    ] {
        assert_eq!(
            value(&row, key).as_deref(),
            Some(expected),
            "{key}: {row:?}"
        );
    }

    let host = format!("{}:{}", cluster.host(), cluster.port());
    let metrics = http_get(proxy.metrics_addr().expect("metrics"), "/metrics").await;
    for line in [
        format!("floodgate_budget_instances{{host=\"{host}\"}} 1"),
        format!("floodgate_budget_share_connections{{host=\"{host}\"}} 32"),
        format!("floodgate_budget_connections{{host=\"{host}\"}} 32"),
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in:\n{metrics}");
    }

    // `floodgate check` counts the live instance: a share of 32, 16 with one more.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("floodgate.toml");
    std::fs::write(&path, &toml).unwrap();
    let out = within(
        "floodgate check",
        tokio::process::Command::new(env!("CARGO_BIN_EXE_floodgate"))
            .args(["check", "--config", path.to_str().unwrap()])
            .output(),
    )
    .await
    .expect("run floodgate check");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", tool_text(&out));
    assert!(
        stdout.contains("1 instance(s) live now, a share of 32 each (16 with one more"),
        "{stdout}"
    );
}
