//! Real command-line clients through the proxy: psql (libpq: sslmode=prefer sends an SSLRequest
//! first) and pgbench in simple and extended query mode.

mod common;

use std::net::SocketAddr;
use std::process::{Command, Output};

use common::*;
use floodgate::pgcluster::HbaAuth;

/// Runs a libpq tool with a clean PG* environment plus `PGPASSWORD=secret`.
async fn run(program: &'static str, args: Vec<String>) -> Output {
    let line = format!("{program} {}", args.join(" "));
    let out = within(
        &line.clone(),
        tokio::task::spawn_blocking(move || {
            let mut cmd = Command::new(program);
            for (var, _) in std::env::vars().filter(|(k, _)| k.starts_with("PG")) {
                cmd.env_remove(var);
            }
            cmd.args(&args)
                .env("PGPASSWORD", "secret")
                .env("PGCONNECT_TIMEOUT", "30")
                .output()
        }),
    )
    .await
    .unwrap();
    out.unwrap_or_else(|e| panic!("cannot run `{line}`: {e}"))
}

fn text(out: &Output) -> String {
    format!(
        "status {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn host_port(addr: SocketAddr) -> Vec<String> {
    vec![
        "-h".into(),
        addr.ip().to_string(),
        "-p".into(),
        addr.port().to_string(),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_runs_queries_through_the_proxy() {
    let env = Env::start(HbaAuth::ScramSha256, ProxyOpts::default()).await;
    let url = format!("postgres://app:secret@127.0.0.1:{}/app", env.addr().port());
    let out = run(
        "psql",
        vec![
            url.clone(),
            "-X".into(),
            "-At".into(),
            "-c".into(),
            "select 1".into(),
        ],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "1",
        "{}",
        text(&out)
    );

    let script = "BEGIN; CREATE TABLE p (x int); INSERT INTO p SELECT generate_series(1, 100); COMMIT; \
                  SELECT sum(x) FROM p;";
    let args = vec![
        url,
        "-X".into(),
        "-At".into(),
        "-v".into(),
        "ON_ERROR_STOP=1".into(),
        "-c".into(),
        script.into(),
    ];
    let out = run("psql", args).await;
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .ends_with("5050"),
        "{}",
        text(&out)
    );
}

/// pgbench -i directly against PostgreSQL, then a run through the proxy in `mode`, with `extra`
/// `[floodgate]` settings.
async fn pgbench_through_proxy(mode: &str, extra: &[&str]) {
    let opts = ProxyOpts {
        pool_size: 3,
        extra: extra.iter().map(|s| s.to_string()).collect(),
        ..ProxyOpts::default()
    };
    let env = Env::start(HbaAuth::ScramSha256, opts).await;
    let upstream: SocketAddr = format!("{}:{}", env.cluster.host(), env.cluster.port())
        .parse()
        .unwrap();

    let mut init = vec!["-i".into(), "-q".into(), "-U".into(), "app".into()];
    init.extend(host_port(upstream));
    init.push("app".into());
    let out = run("pgbench", init).await;
    assert!(out.status.success(), "pgbench -i: {}", text(&out));

    let mut bench: Vec<String> = [
        "-M", mode, "-c", "10", "-j", "2", "-t", "50", "-n", "-U", "app",
    ]
    .map(String::from)
    .to_vec();
    bench.extend(host_port(env.addr()));
    bench.push("app".into());
    let out = run("pgbench", bench).await;
    let report = text(&out);
    assert!(out.status.success(), "pgbench -M {mode}: {report}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("number of transactions actually processed: 500/500"),
        "pgbench -M {mode}: {report}"
    );
    if let Some(line) = stdout
        .lines()
        .find(|l| l.starts_with("number of failed transactions"))
    {
        assert!(
            line.starts_with("number of failed transactions: 0 "),
            "pgbench -M {mode}: {report}"
        );
    }
    let history = env.sql("app", "SELECT count(*) FROM pgbench_history").await;
    assert_eq!(history, "500", "every pgbench transaction committed");
    assert!(
        env.backend_count().await <= 3,
        "pool of 3 exceeded upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_simple_protocol_through_the_proxy() {
    pgbench_through_proxy("simple", &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_extended_protocol_through_the_proxy() {
    pgbench_through_proxy("extended", &[]).await;
}

/// Servers reaching `server_lifetime` mid-run are replaced between transactions: no client error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_with_a_short_server_lifetime_has_no_errors() {
    pgbench_through_proxy("extended", &["server_lifetime = \"100ms\""]).await;
}
