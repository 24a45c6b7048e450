//! Real command-line clients through the proxy: psql (libpq: sslmode=prefer sends an SSLRequest
//! first) and pgbench in simple and extended query mode.

mod common;

use common::*;
use floodgate::pgcluster::HbaAuth;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_runs_queries_through_the_proxy() {
    let env = Env::start(HbaAuth::ScramSha256, ProxyOpts::default()).await;
    let url = format!("postgres://app:secret@127.0.0.1:{}/app", env.addr().port());
    let out = run_tool(
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
    assert!(out.status.success(), "{}", tool_text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "1",
        "{}",
        tool_text(&out)
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
    let out = run_tool("psql", args).await;
    assert!(out.status.success(), "{}", tool_text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .ends_with("5050"),
        "{}",
        tool_text(&out)
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
    pgbench_init(&env.cluster).await;

    let mut bench: Vec<String> = [
        "-M", mode, "-c", "10", "-j", "2", "-t", "50", "-n", "-U", "app",
    ]
    .map(String::from)
    .to_vec();
    bench.extend(host_port(env.addr()));
    bench.push("app".into());
    let out = run_tool("pgbench", bench).await;
    let report = tool_text(&out);
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
