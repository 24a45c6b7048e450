//! The reserve pool: after `reserve_pool_timeout`, up to `reserve_pool_size` extra servers open
//! for a busy pool, never more; idle reserve servers close again (`server_idle_timeout`).

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::*;
use floodgate::pgcluster::HbaAuth;

async fn env() -> Env {
    let opts = ProxyOpts {
        auth_type: "md5",
        pool_size: 2,
        extra: vec![
            "reserve_pool_size = 2".into(),
            "reserve_pool_timeout = \"300ms\"".into(),
            "server_idle_timeout = \"1s\"".into(),
            "query_wait_timeout = \"60s\"".into(),
        ],
        ..ProxyOpts::default()
    };
    Env::start(HbaAuth::ScramSha256, opts).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_long_transactions_use_the_reserve_then_it_shrinks_back() {
    let env = env().await;
    let clients: Vec<_> = futures_util::future::join_all((0..4).map(|_| env.connect())).await;
    // Four transactions held open at once: two main servers, then two reserve ones.
    for (i, c) in clients.iter().enumerate() {
        within("BEGIN", c.batch_execute("BEGIN; SELECT 1"))
            .await
            .unwrap_or_else(|e| panic!("client {i}: {e}"));
    }
    assert_eq!(env.backend_count().await, 4, "pool 2 + reserve 2");
    // A fifth client waits: the cap is pool + reserve.
    let fifth = env.connect().await;
    let waiting = tokio::spawn(async move { fifth.batch_execute("SELECT 1").await.map(|_| fifth) });
    tokio::time::sleep(std::time::Duration::from_millis(800)).await;
    assert!(
        !waiting.is_finished(),
        "a fifth server was found beyond pool + reserve"
    );
    assert_eq!(env.backend_count().await, 4);
    for c in &clients {
        within("COMMIT", c.batch_execute("COMMIT")).await.unwrap();
    }
    let fifth = within("the fifth client", waiting).await.unwrap().unwrap();

    // Keep two clients busy on the main servers; the idle reserve servers close.
    let stop = Arc::new(AtomicBool::new(false));
    let busy: Vec<_> = clients
        .into_iter()
        .take(2)
        .map(|c| {
            let stop = stop.clone();
            tokio::spawn(async move {
                while !stop.load(Ordering::SeqCst) {
                    c.batch_execute("SELECT pg_sleep(0.05)").await.unwrap();
                }
            })
        })
        .collect();
    wait_until("the pool shrinks back to 2 servers", || async {
        env.backend_count().await == 2
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    for b in busy {
        within("busy client", b).await.unwrap();
    }
    drop(fifth);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_never_exceeds_pool_plus_reserve() {
    let env = Arc::new(env().await);
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (env, done) = (env.clone(), done.clone());
        tokio::spawn(async move {
            let mut max = 0;
            while !done.load(Ordering::SeqCst) {
                max = max.max(env.backend_count().await);
            }
            max
        })
    };
    let clients = (0..1000).map(|i| {
        let env = env.clone();
        tokio::spawn(async move {
            let c = env.connect().await;
            c.batch_execute("BEGIN; SELECT pg_sleep(0.01); COMMIT")
                .await
                .map_err(|e| format!("client {i}: {e}"))
        })
    });
    for r in within("1000 clients", futures_util::future::join_all(clients)).await {
        r.unwrap().unwrap();
    }
    done.store(true, Ordering::SeqCst);
    let max = within("sampler", sampler).await.unwrap();
    assert!(max <= 4, "{max} servers for a pool of 2 + reserve 2");
}

/// `min_pool_size` servers stay open through idleness and are reopened when they close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_pool_size_keeps_servers_open_and_refills() {
    let opts = ProxyOpts {
        auth_type: "md5",
        pool_size: 5,
        extra: vec![
            "min_pool_size = 3".into(),
            "server_idle_timeout = \"1s\"".into(),
        ],
        ..ProxyOpts::default()
    };
    let env = Env::start(HbaAuth::ScramSha256, opts).await;
    // The pool exists from the first login; the janitor opens the rest of the minimum.
    let c = env.connect().await;
    wait_until("3 servers open", || async {
        env.backend_count().await == 3
    })
    .await;
    // Idle for longer than server_idle_timeout: the minimum stays.
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    assert_eq!(
        env.backend_count().await,
        3,
        "min_pool_size servers outlive server_idle_timeout"
    );
    // Servers killed from the database side are replaced by new ones.
    let pids = "SELECT string_agg(pid::text, ',' ORDER BY pid) FROM pg_stat_activity \
                WHERE usename = 'app' AND backend_type = 'client backend'";
    let old = env.sql("app", pids).await;
    env.sql(
        "app",
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE usename = 'app' AND backend_type = 'client backend'",
    )
    .await;
    wait_until("3 new servers", || async {
        let now = env.sql("app", pids).await;
        let fresh = now
            .split(',')
            .filter(|p| !p.is_empty() && !old.split(',').any(|o| o == *p));
        fresh.count() == 3
    })
    .await;
    assert_eq!(scalar(&c, "SELECT 1").await, "1");
}
