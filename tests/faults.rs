//! Faults around the proxy: the upstream restarts or is down, and the proxy itself shuts down
//! with a transaction in flight.

mod common;

use std::time::Duration;

use common::*;
use floodgate::pgcluster::{HbaAuth, PgCluster};

async fn blocking<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    within(what, tokio::task::spawn_blocking(f)).await.unwrap()
}

async fn stop(cluster: &std::sync::Arc<PgCluster>) {
    let c = cluster.clone();
    blocking("pg_ctl stop", move || c.stop())
        .await
        .expect("stop PostgreSQL");
}

async fn restart(cluster: &std::sync::Arc<PgCluster>) {
    let c = cluster.clone();
    blocking("pg_ctl start", move || c.restart())
        .await
        .expect("restart PostgreSQL");
}

/// Runs `SELECT 1` on `client` until it succeeds: at most `allowed_failures` failures, with a
/// short pause between attempts. Returns the failures seen.
async fn select_until_ok(client: &Conn, allowed_failures: usize) -> Vec<String> {
    let mut failures = Vec::new();
    loop {
        match within("SELECT 1", client.simple_query("SELECT 1")).await {
            Ok(m) => {
                assert_eq!(first_value(&m).as_deref(), Some("1"));
                return failures;
            }
            Err(e) => failures.push(describe(&e)),
        }
        assert!(
            failures.len() <= allowed_failures,
            "more than {allowed_failures} failed queries after the upstream came back: {failures:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_restart_is_survived() {
    let opts = ProxyOpts {
        pool_size: 2,
        ..ProxyOpts::default()
    };
    let env = Env::start(HbaAuth::ScramSha256, opts).await;
    let c = env.connect().await;
    let pid_before = scalar(&c, "SELECT pg_backend_pid()").await;
    assert_eq!(scalar(&c, "SELECT 1").await, "1");

    stop(&env.cluster).await;
    restart(&env.cluster).await;

    // The pooled servers died with the old postmaster; a client between transactions does
    // not notice: its next query waits for a new server.
    let failures = select_until_ok(&c, 0).await;
    assert!(failures.is_empty(), "{failures:?}");
    let pid_after = scalar(&c, "SELECT pg_backend_pid()").await;
    assert_ne!(
        pid_before, pid_after,
        "a server from before the restart is still in use"
    );
    for _ in 0..10 {
        assert_eq!(scalar(&c, "SELECT 'again'").await, "again");
    }
    let fresh = env.connect().await;
    assert_eq!(scalar(&fresh, "SELECT 'fresh'").await, "fresh");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_down_gives_errors_not_hangs() {
    let opts = ProxyOpts {
        extra: vec![
            "server_connect_timeout = \"5s\"".into(),
            "query_wait_timeout = \"10s\"".into(),
            // After a long outage the login back-off has grown to this: shorter than the wait,
            // so the first query after the restart is served.
            "server_login_retry = \"2s\"".into(),
        ],
        ..ProxyOpts::default()
    };
    let env = Env::start(HbaAuth::ScramSha256, opts).await;
    let c = env.connect().await;
    assert_eq!(scalar(&c, "SELECT 1").await, "1");

    stop(&env.cluster).await;
    // An established client: its next query fails (within TIMEOUT, or `within` panics).
    for attempt in 0..3 {
        let result = within("query while PostgreSQL is down", c.simple_query("SELECT 1")).await;
        let err = result
            .err()
            .unwrap_or_else(|| panic!("attempt {attempt}: query succeeded with PG down"));
        eprintln!("established client, attempt {attempt}: {}", describe(&err));
        if c.is_closed() {
            break;
        }
    }
    // A new client: refused at login, or its first query fails.
    match env.try_connect("app", Some("secret"), "app").await {
        Err(e) => eprintln!("new client refused at login: {}", describe(&e)),
        Ok(fresh) => {
            let result = within(
                "new client's query while PG is down",
                fresh.simple_query("SELECT 1"),
            )
            .await;
            match result {
                Ok(_) => panic!("a new client's query succeeded with PG down"),
                Err(e) => eprintln!("new client's query: {}", describe(&e)),
            }
        }
    }

    restart(&env.cluster).await;
    // Back up: a new client works within a bounded number of attempts.
    let fresh = env.connect().await;
    select_until_ok(&fresh, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_lets_a_transaction_in_flight_finish() {
    // Trust upstream: the test holds a lock on a direct superuser connection.
    let opts = ProxyOpts {
        pool_size: 2,
        ..ProxyOpts::default()
    };
    let env = Env::start(HbaAuth::Trust, opts).await;
    env.sql(
        "app",
        "CREATE TABLE shut (id int); ALTER TABLE shut OWNER TO app",
    )
    .await;
    let upstream = client_config(
        format!("{}:{}", env.cluster.host(), env.cluster.port())
            .parse()
            .unwrap(),
        "postgres",
        None,
        "app",
    );
    let holder = within("direct connection", connect(&upstream))
        .await
        .unwrap();
    within("lock", holder.batch_execute("SELECT pg_advisory_lock(42)"))
        .await
        .unwrap();

    let Env { cluster, proxy } = env;
    let addr = proxy.local_addr();
    let c = connect(&client_config(addr, "app", Some("secret"), "app"))
        .await
        .unwrap();
    within(
        "begin",
        c.batch_execute("BEGIN; INSERT INTO shut VALUES (1)"),
    )
    .await
    .unwrap();
    // In flight: this statement waits for the lock the test holds.
    let in_flight = c.simple_query("SELECT pg_advisory_lock(42), 'got it'");
    let waiting =
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = 'app'";
    let mut shutdown_task = None;
    let orchestrate = async {
        wait_until("the statement waits for the lock", || async {
            cluster_sql(&cluster, "postgres", waiting).await == "1"
        })
        .await;
        let shutdown = tokio::spawn(async move { proxy.shutdown().await });
        // Shutdown has begun once new clients are turned away (refused or sent an error)...
        let config = client_config(addr, "app", Some("secret"), "app");
        wait_until("new clients are turned away", || async {
            match connect(&config).await {
                Err(_) => true,
                Ok(late) => late.simple_query("SELECT 1").await.is_err(),
            }
        })
        .await;
        // ...but the transaction in flight goes on: release the lock.
        within(
            "unlock",
            holder.batch_execute("SELECT pg_advisory_unlock(42)"),
        )
        .await
        .unwrap();
        shutdown_task = Some(shutdown);
    };
    let (result, ()) = tokio::join!(within("in-flight statement", in_flight), orchestrate);
    let shutdown = shutdown_task.expect("shutdown was started");
    let result = result.expect("the statement in flight failed during shutdown");
    let got = result.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(row) => row.get(1).map(str::to_string),
        _ => None,
    });
    assert_eq!(got.as_deref(), Some("got it"));
    within(
        "commit",
        c.batch_execute("INSERT INTO shut VALUES (2); COMMIT"),
    )
    .await
    .expect("COMMIT during shutdown");
    drop(c);
    within("shutdown completes", shutdown)
        .await
        .expect("shutdown task");
    assert_eq!(
        cluster_sql(
            &cluster,
            "app",
            "SELECT string_agg(id::text, ',' ORDER BY id) FROM shut"
        )
        .await,
        "1,2"
    );
}

/// While the upstream is down, failed logins back off (`server_login_retry`): clients get a clear
/// error at once instead of each trying to connect, and recovery is automatic once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_logins_back_off_and_recover() {
    let opts = ProxyOpts {
        pool_size: 2,
        extra: vec![
            "server_login_retry = \"3s\"".into(),
            "query_wait_timeout = \"1s\"".into(),
        ],
        ..ProxyOpts::default()
    };
    let env = Env::start(HbaAuth::ScramSha256, opts).await;
    // Log in once so the pool knows the server's parameters, then take the server away.
    drop(env.connect().await);
    let cluster = env.cluster.clone();
    tokio::task::spawn_blocking(move || cluster.stop())
        .await
        .unwrap()
        .unwrap();
    let c = env.connect().await;
    let first = within(
        "a query while the upstream is down",
        c.simple_query("SELECT 1"),
    )
    .await;
    // The client waited query_wait_timeout for the upstream, then was told why it gave up.
    let first = first.expect_err("the upstream is down");
    assert_eq!(sqlstate(&first), "08006", "{}", describe(&first));
    let message = db_message(&first);
    assert!(
        message.contains("server_login_retry") || message.contains("could not connect"),
        "{message}"
    );
    let cluster = env.cluster.clone();
    tokio::task::spawn_blocking(move || cluster.restart())
        .await
        .unwrap()
        .unwrap();
    wait_until("queries succeed again", || async {
        let c = env.connect().await;
        c.simple_query("SELECT 1").await.is_ok()
    })
    .await;
}

/// Servers past `server_lifetime` are replaced between transactions, with no client error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_lifetime_replaces_servers_without_client_errors() {
    let opts = ProxyOpts {
        pool_size: 2,
        extra: vec!["server_lifetime = \"300ms\"".into()],
        ..ProxyOpts::default()
    };
    let env = Env::start(HbaAuth::ScramSha256, opts).await;
    let c = env.connect().await;
    let mut backends = std::collections::BTreeSet::new();
    for _ in 0..40 {
        let pid = scalar(&c, "SELECT pg_backend_pid()").await;
        backends.insert(pid);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(backends.len() > 2, "servers were replaced: {backends:?}");
    assert!(env.backend_count().await <= 2);
}

/// Issue: PostgreSQL restarted under load aborted every client, including those between
/// transactions, and new logins were refused for seconds after PostgreSQL was back. Now only
/// transactions on a server at the restart fail (at most one per server); clients between
/// transactions wait for the new servers and go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_under_load_fails_only_transactions_in_flight() {
    const POOL: usize = 4;
    let opts = ProxyOpts {
        pool_size: POOL,
        ..ProxyOpts::default()
    };
    let env = std::sync::Arc::new(Env::start(HbaAuth::ScramSha256, opts).await);
    let restarted = std::sync::Arc::new(tokio::sync::Notify::new());
    let done_restarting = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for _ in 0..12 {
        let (env, restarted, done) = (env.clone(), restarted.clone(), done_restarting.clone());
        clients.push(tokio::spawn(async move {
            let mut c = env.connect().await;
            let mut failures = Vec::new();
            let mut after_restart = 0;
            let mut notified = false;
            while after_restart < 5 {
                match within("a query", c.simple_query("SELECT 1")).await {
                    Ok(_) if done.load(std::sync::atomic::Ordering::SeqCst) => after_restart += 1,
                    Ok(_) => {
                        if !notified {
                            restarted.notify_one();
                            notified = true;
                        }
                    }
                    Err(e) => {
                        failures.push(describe(&e));
                        // A FATAL ends the connection (tokio-postgres may not know it yet).
                        let fatal = e.as_db_error().is_some_and(|d| d.severity() == "FATAL");
                        if fatal || c.is_closed() {
                            c = env.connect().await;
                        }
                    }
                }
            }
            failures
        }));
    }
    restarted.notified().await;
    stop(&env.cluster).await;
    restart(&env.cluster).await;
    done_restarting.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut failed_clients = 0;
    for client in clients {
        let failures = client.await.expect("client task");
        if !failures.is_empty() {
            eprintln!("client failures: {failures:?}");
            failed_clients += 1;
            assert_eq!(
                failures.len(),
                1,
                "one failed transaction at most: {failures:?}"
            );
        }
    }
    assert!(
        failed_clients <= POOL,
        "{failed_clients} clients failed; at most one per server ({POOL}) was in flight"
    );
}

/// Shutdown closes idle clients at once (each session's own stop flag), without waiting for
/// `shutdown_timeout`; a client that logged in before and sat idle finds its connection closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_idle_clients_without_waiting_for_the_timeout() {
    let opts = ProxyOpts {
        pool_size: 2,
        extra: vec!["shutdown_timeout = \"3600s\"".into()],
        ..ProxyOpts::default()
    };
    let env = Env::start(HbaAuth::ScramSha256, opts).await;
    let idle: Vec<Conn> = futures_util::future::join_all((0..3).map(|_| env.connect())).await;
    for c in &idle {
        scalar(c, "SELECT 1").await;
    }
    let Env {
        cluster: _cluster,
        proxy,
    } = env;
    // Within the test timeout, far below shutdown_timeout: only closing idle clients ends it.
    within("shutdown with idle clients", proxy.shutdown()).await;
    for c in &idle {
        assert!(
            c.simple_query("SELECT 1").await.is_err(),
            "an idle client's connection outlived the shutdown"
        );
    }
}
