//! `workers = 4`: four runtime threads serve clients, and the pool's cap still holds exactly.
//! 500 pgbench clients through a pool of 10; sampled every 100 ms from a direct connection,
//! PostgreSQL never shows more than 10 server connections of the pool, and every client's
//! transactions succeed.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use floodgate::pgcluster::HbaAuth;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_workers_keep_the_pool_cap_under_500_clients() {
    let cluster = start_cluster(HbaAuth::ScramSha256, 100).await;
    pgbench_init(&cluster).await;
    let opts = ProxyOpts {
        pool_size: 10,
        extra: vec![
            "workers = 4".into(),
            "max_client_conn = 1000".into(),
            "query_wait_timeout = \"60s\"".into(),
        ],
        ..ProxyOpts::default()
    };
    let proxy = start_binary(&proxy_toml(&cluster, &opts), "floodgate (4 workers)");

    let sampler = superuser_connect(&cluster).await;
    let stop = Arc::new(AtomicBool::new(false));
    let sampling = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let sql = "SELECT count(*) FROM pg_stat_activity \
                       WHERE backend_type = 'client backend' AND usename = 'app' AND datname = 'app'";
            let (mut most, mut samples) = (0i64, 0usize);
            while !stop.load(Ordering::Relaxed) {
                let n: i64 = scalar(&sampler, sql).await.parse().expect("a count");
                most = most.max(n);
                samples += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            (most, samples)
        })
    };

    let mut args: Vec<String> = ["-n", "-S", "-c", "500", "-j", "2", "-T", "10", "-U", "app"]
        .map(String::from)
        .to_vec();
    args.extend(host_port(proxy.addr));
    args.push("app".into());
    let out = run_tool("pgbench", args).await;
    stop.store(true, Ordering::Relaxed);
    let (most, samples) = within("sampler ends", sampling).await.expect("sampler");

    let text = tool_text(&out);
    assert!(out.status.success(), "pgbench through 4 workers: {text}");
    assert!(
        text.contains("number of clients: 500") && !text.contains("aborted"),
        "all 500 clients ran: {text}"
    );
    let processed = text
        .lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        .and_then(|n| n.split('/').next()?.trim().parse::<u64>().ok())
        .unwrap_or(0);
    assert!(processed > 0, "transactions went through: {text}");
    assert!(
        samples >= 20,
        "sampled throughout the run ({samples} samples)"
    );
    assert!(
        (1..=10).contains(&most),
        "at most pool_size = 10 server connections with 4 workers (saw {most})"
    );
}
