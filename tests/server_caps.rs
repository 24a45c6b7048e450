//! `max_db_connections`: all users of a database together never hold more server connections
//! than the cap; a pool that needs one closes an idle server of another pool to make room.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::*;
use floodgate::pgcluster::HbaAuth;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_db_connections_caps_all_users_of_a_database() {
    let cluster = start_cluster(HbaAuth::ScramSha256, 100).await;
    let c = cluster.clone();
    tokio::task::spawn_blocking(move || c.create_user("other", "secret"))
        .await
        .unwrap()
        .unwrap();
    let opts = ProxyOpts {
        auth_type: "md5",
        pool_size: 3,
        extra: vec![
            "max_db_connections = 3".into(),
            "query_wait_timeout = \"60s\"".into(),
        ],
        users: vec![
            ("app".into(), "secret".into()),
            ("other".into(), "secret".into()),
        ],
        ..ProxyOpts::default()
    };
    let proxy = start_proxy(&proxy_toml(&cluster, &opts)).await;
    let env = Arc::new(Env { cluster, proxy });
    let count_all = {
        let env = env.clone();
        move || {
            let env = env.clone();
            async move {
                env.sql(
                    "app",
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = 'app' \
                     AND usename IN ('app', 'other') AND backend_type = 'client backend'",
                )
                .await
                .parse::<i64>()
                .unwrap()
            }
        }
    };
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (done, count_all) = (done.clone(), count_all.clone());
        tokio::spawn(async move {
            let mut max = 0;
            while !done.load(Ordering::SeqCst) {
                max = max.max(count_all().await);
            }
            max
        })
    };

    // User app takes all three servers of the database.
    let apps: Vec<_> = futures_util::future::join_all((0..3).map(|_| env.connect())).await;
    for c in &apps {
        within("BEGIN", c.batch_execute("BEGIN; SELECT 1"))
            .await
            .unwrap();
    }
    // User other has a pool of its own, but the database is full: it waits...
    let other = env
        .connect_with(&env.config("other", Some("secret"), "app"))
        .await;
    let waiting = tokio::spawn(async move { other.batch_execute("SELECT 1").await.map(|_| other) });
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert!(
        !waiting.is_finished(),
        "a fourth server opened beyond max_db_connections"
    );
    // ...until app's transactions end: one of app's now idle servers is closed to make room.
    for c in &apps {
        within("COMMIT", c.batch_execute("COMMIT")).await.unwrap();
    }
    within("other's query", waiting)
        .await
        .unwrap()
        .expect("other is served");
    done.store(true, Ordering::SeqCst);
    let max = within("sampler", sampler).await.unwrap();
    assert!(
        max <= 3,
        "{max} server connections for max_db_connections = 3"
    );
}

/// `max_user_connections`: one upstream user's server connections across all its databases.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_user_connections_caps_one_user_across_databases() {
    let cluster = start_cluster(HbaAuth::ScramSha256, 100).await;
    let opts = ProxyOpts {
        auth_type: "md5",
        pool_size: 3,
        extra: vec![
            "max_user_connections = 2".into(),
            "query_wait_timeout = \"60s\"".into(),
        ],
        ..ProxyOpts::default()
    };
    // A second name for the same upstream database: another pool of the same user.
    let toml = format!(
        "{}\n[databases.app2]\nhost = \"{}\"\nport = {}\ndbname = \"app\"\n",
        proxy_toml(&cluster, &opts),
        cluster.host(),
        cluster.port()
    );
    let proxy = start_proxy(&toml).await;
    let env = Env { cluster, proxy };
    let a: Vec<_> = futures_util::future::join_all((0..2).map(|_| env.connect())).await;
    for c in &a {
        within("BEGIN", c.batch_execute("BEGIN; SELECT 1"))
            .await
            .unwrap();
    }
    let b = env
        .connect_with(&env.config("app", Some("secret"), "app2"))
        .await;
    let waiting = tokio::spawn(async move { b.batch_execute("SELECT 1").await.map(|_| b) });
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert!(
        !waiting.is_finished(),
        "a third server opened beyond max_user_connections"
    );
    assert_eq!(env.backend_count().await, 2);
    for c in &a {
        within("COMMIT", c.batch_execute("COMMIT")).await.unwrap();
    }
    within("app2's query", waiting)
        .await
        .unwrap()
        .expect("app2 is served");
    assert!(env.backend_count().await <= 2);
}
