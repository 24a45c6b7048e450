//! `[metrics] listen`: `/metrics` in Prometheus text (checked by `promtool check metrics`),
//! values that move with traffic, the probes, and the kill switch over HTTP.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use floodgate::pgcluster::HbaAuth;

const TOKEN: &str = "t0ken-for-tests";

async fn env(pool_size: usize, metrics: &str) -> Env {
    let cluster = start_cluster(HbaAuth::ScramSha256, 100).await;
    let opts = ProxyOpts {
        pool_size,
        ..ProxyOpts::default()
    };
    let toml = proxy_toml(&cluster, &opts) + "\n[metrics]\nlisten = \"127.0.0.1:0\"\n" + metrics;
    let proxy = start_proxy(&toml).await;
    Env { cluster, proxy }
}

fn metrics_addr(env: &Env) -> SocketAddr {
    env.proxy
        .metrics_addr()
        .expect("[metrics] listen is served")
}

/// The value of sample `name` whose labels include all of `labels`.
fn sample(metrics: &str, name: &str, labels: &[&str]) -> Option<f64> {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| {
            let series = l.rsplit_once(' ').map_or(*l, |(s, _)| s);
            series.split('{').next() == Some(name) && labels.iter().all(|x| series.contains(x))
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

async fn scrape(env: &Env) -> String {
    let (status, body) = http(metrics_addr(env), "GET", "/metrics", None).await;
    assert_eq!(status, 200, "{body}");
    body
}

const APP: &str = "database=\"app\"";

#[tokio::test]
async fn metrics_families_move_with_traffic_and_pass_promtool() {
    let env = env(1, "").await;
    let holder = env.connect().await;
    admin_sql(&holder, "BEGIN").await;
    scalar(&holder, "SELECT 1").await;
    // A second client waits for the only server.
    let waiter = env.connect().await;
    let waiting = tokio::spawn(async move {
        let v = scalar(&waiter, "SELECT 2").await;
        (v, waiter)
    });
    let mut text = String::new();
    for _ in 0..100 {
        text = scrape(&env).await;
        if sample(&text, "floodgate_clients", &[APP, "state=\"waiting\""]) == Some(1.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        sample(&text, "floodgate_clients", &[APP, "state=\"waiting\""]),
        Some(1.0),
        "{text}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let text = scrape(&env).await;
    let oldest = sample(&text, "floodgate_oldest_wait_seconds", &[APP]).unwrap_or(0.0);
    assert!(oldest >= 0.2, "oldest wait {oldest}\n{text}");
    assert_eq!(
        sample(&text, "floodgate_servers", &[APP, "state=\"active\""]),
        Some(1.0)
    );
    admin_sql(&holder, "COMMIT").await;
    let (value, _waiter) = within("the waiting query", waiting).await.expect("task");
    assert_eq!(value, "2");

    let text = scrape(&env).await;
    assert!(sample(&text, "floodgate_transactions_total", &[APP]).unwrap_or(0.0) >= 2.0);
    assert!(sample(&text, "floodgate_queries_total", &[APP]).unwrap_or(0.0) >= 3.0);
    assert!(sample(&text, "floodgate_client_received_bytes_total", &[APP]).unwrap_or(0.0) > 0.0);
    let waited = sample(&text, "floodgate_queue_wait_seconds_count", &[APP]).unwrap_or(0.0);
    assert!(waited >= 2.0, "{text}");
    let slow_wait = sample(
        &text,
        "floodgate_queue_wait_seconds_bucket",
        &[APP, "le=\"0.1\""],
    );
    assert!(
        slow_wait.unwrap_or(f64::MAX) < waited,
        "the wait landed in a low bucket\n{text}"
    );
    assert!(
        sample(
            &text,
            "floodgate_transaction_duration_seconds_count",
            &[APP]
        )
        .unwrap_or(0.0)
            >= 2.0
    );
    assert!(sample(&text, "floodgate_query_duration_seconds_count", &[APP]).unwrap_or(0.0) >= 3.0);
    assert_eq!(
        sample(&text, "floodgate_server_connect_seconds_count", &[APP]),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, "floodgate_server_connections_opened_total", &[APP]),
        Some(1.0)
    );
    assert_eq!(sample(&text, "floodgate_pool_size", &[APP]), Some(1.0));
    assert!(sample(&text, "floodgate_open_fds", &[]).unwrap_or(0.0) > 0.0);
    assert!(sample(&text, "floodgate_resident_memory_bytes", &[]).unwrap_or(0.0) > 0.0);
    assert_eq!(sample(&text, "floodgate_build_info", &[]), Some(1.0));
    // An error the server sends is counted by SQLSTATE.
    let err = holder
        .simple_query("SELECT 1/0")
        .await
        .expect_err("division by zero");
    assert_eq!(sqlstate(&err), "22012");
    let text = scrape(&env).await;
    assert_eq!(
        sample(
            &text,
            "floodgate_client_errors_total",
            &["sqlstate=\"22012\""]
        ),
        Some(1.0)
    );

    // promtool's linter finds nothing.
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("metrics.txt");
    std::fs::write(&file, &text).expect("write");
    let out = run_tool(
        "sh",
        vec![
            "-c".into(),
            format!("promtool check metrics < {}", file.display()),
        ],
    )
    .await;
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics (apt-get install prometheus): {}",
        tool_text(&out)
    );
}

async fn admin_sql(conn: &Conn, sql: &str) {
    within(sql, conn.simple_query(sql))
        .await
        .unwrap_or_else(|e| panic!("{sql}: {}", describe(&e)));
}

#[tokio::test]
async fn readyz_never_leaks_a_server_and_says_why_it_is_not_ready() {
    let env = env(1, &format!("admin_token = \"{TOKEN}\"\n")).await;
    let addr = metrics_addr(&env);
    assert_eq!(
        http(addr, "GET", "/healthz", None).await,
        (200, "ok\n".into())
    );
    assert_eq!(http(addr, "GET", "/readyz", None).await.0, 200);
    // The only server is held by a client: the probe never takes it, never waits for it.
    let holder = env.connect().await;
    admin_sql(&holder, "BEGIN").await;
    scalar(&holder, "SELECT 1").await;
    for _ in 0..1000 {
        let (status, body) = http(addr, "GET", "/readyz", None).await;
        assert_eq!(status, 200, "{body}");
    }
    admin_sql(&holder, "COMMIT").await;
    assert_eq!(scalar(&holder, "SELECT 3").await, "3");
    assert_eq!(
        env.backend_count().await,
        1,
        "the probe opened or leaked servers"
    );
    // Paused for all: not ready.
    let (status, _) = http(addr, "POST", "/admin/pause", Some(TOKEN)).await;
    assert_eq!(status, 200);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (status, body) = http(addr, "GET", "/readyz", None).await;
    assert_eq!(status, 503);
    assert!(body.contains("paused"), "{body}");
    let (status, _) = http(addr, "POST", "/admin/resume", Some(TOKEN)).await;
    assert_eq!(status, 200);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(http(addr, "GET", "/readyz", None).await.0, 200);
    // Shutting down (a transaction keeps the drain going): not ready.
    admin_sql(&holder, "BEGIN").await;
    scalar(&holder, "SELECT 1").await;
    env.proxy
        .shared()
        .request_stop(floodgate::shared::StopMode::WaitForServers);
    let (status, body) = http(addr, "GET", "/readyz", None).await;
    assert_eq!(status, 503);
    assert!(body.contains("shutting down"), "{body}");
    admin_sql(&holder, "COMMIT").await;
}

#[tokio::test]
async fn the_http_kill_switch_needs_the_token() {
    // No token configured: the admin paths do not exist.
    let plain = env(2, "").await;
    let (status, _) = http(metrics_addr(&plain), "POST", "/admin/pause", Some("x")).await;
    assert_eq!(status, 404);

    let env = env(2, &format!("admin_token = \"{TOKEN}\"\n")).await;
    let addr = metrics_addr(&env);
    assert_eq!(http(addr, "GET", "/nothing-here", None).await.0, 404);
    // A wrong or missing token changes nothing.
    for token in [None, Some("wrong"), Some("t0ken-for-test")] {
        let (status, _) = http(addr, "POST", "/admin/disable?database=app", token).await;
        assert_eq!(status, 401);
    }
    let app = env.connect().await;
    assert_eq!(scalar(&app, "SELECT 1").await, "1");
    let (status, _) = http(addr, "POST", "/admin/disable?database=app", Some(TOKEN)).await;
    assert_eq!(status, 200);
    let err = match env.try_connect("app", Some("secret"), "app").await {
        Ok(_) => panic!("DISABLE over HTTP had no effect"),
        Err(e) => e,
    };
    assert_eq!(sqlstate(&err), "57P03");
    let (status, _) = http(addr, "POST", "/admin/enable?database=app", Some(TOKEN)).await;
    assert_eq!(status, 200);
    let (status, _) = http(
        addr,
        "POST",
        "/admin/shed?database=app&percent=100",
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, 200);
    let err = app.simple_query("SELECT 1").await.expect_err("shed");
    assert_eq!(sqlstate(&err), "53300");
    let (status, _) = http(
        addr,
        "POST",
        "/admin/shed?database=app&percent=0",
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(scalar(&app, "SELECT 2").await, "2");
    let (status, body) = http(addr, "POST", "/admin/pause?database=nope", Some(TOKEN)).await;
    assert_eq!(status, 400);
    assert!(body.contains("nope"), "{body}");
}
