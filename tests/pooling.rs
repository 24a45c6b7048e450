//! Transaction pooling: the upstream cap holds under load, servers come back clean after a
//! client vanishes, and session parameters never leak between clients sharing a server.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::*;
use floodgate::pgcluster::HbaAuth;
use tokio_postgres::types::Type;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_clients_share_a_pool_of_five() {
    const CLIENTS: i32 = 200;
    const TXS: i32 = 3;
    let opts = ProxyOpts {
        auth_type: "md5", // cheap logins: 200 of them in a debug build
        pool_size: 5,
        extra: vec!["query_wait_timeout = \"120s\"".into()],
        ..ProxyOpts::default()
    };
    let env = Arc::new(Env::start(HbaAuth::ScramSha256, opts).await);
    env.sql("app", "CREATE TABLE load (client int, tx int)")
        .await;
    env.sql("app", "ALTER TABLE load OWNER TO app").await;

    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (env, done) = (env.clone(), done.clone());
        tokio::spawn(async move {
            let (mut samples, mut max) = (0u32, 0i64);
            // At least a few samples even if the clients are quick.
            while !done.load(Ordering::SeqCst) || samples < 3 {
                max = max.max(env.backend_count().await);
                samples += 1;
            }
            (samples, max)
        })
    };

    let clients: Vec<_> = (0..CLIENTS)
        .map(|id| {
            let env = env.clone();
            tokio::spawn(async move {
                let mut c = env.connect().await;
                for tx in 0..TXS {
                    let sql = format!(
                        "BEGIN; INSERT INTO load VALUES ({id}, {tx}); SELECT pg_sleep(0.01); COMMIT"
                    );
                    c.batch_execute(&sql)
                        .await
                        .map_err(|e| format!("client {id} tx {tx}: {e}"))?;
                    let t = c
                        .transaction()
                        .await
                        .map_err(|e| format!("client {id}: {e}"))?;
                    let sql = "SELECT count(*) FROM load WHERE client = $1";
                    let rows = t
                        .query_typed(sql, &[(&id, Type::INT4)])
                        .await
                        .map_err(|e| format!("client {id}: {e}"))?;
                    let n: i64 = rows[0].get(0);
                    t.commit().await.map_err(|e| format!("client {id}: {e}"))?;
                    if n != i64::from(tx + 1) {
                        return Err(format!("client {id} sees {n} of its rows after tx {tx}"));
                    }
                }
                Ok::<_, String>(())
            })
        })
        .collect();
    let results = within("200 clients", futures_util::future::join_all(clients)).await;
    done.store(true, Ordering::SeqCst);
    let failures: Vec<String> = results
        .into_iter()
        .filter_map(|r| match r {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e),
            Err(e) => Some(format!("client task panicked: {e}")),
        })
        .collect();
    assert!(
        failures.is_empty(),
        "{} clients failed, e.g. {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );

    let (samples, max) = within("sampler", sampler).await.unwrap();
    eprintln!("sampler: {samples} samples, max {max} upstream backends");
    assert!(samples >= 3, "sampler ran {samples} times");
    assert!(
        max <= 5,
        "upstream had {max} backends for app/app; the pool size is 5"
    );
    assert_eq!(
        env.sql("app", "SELECT count(*) FROM load").await,
        (CLIENTS * TXS).to_string()
    );
    assert!(env.backend_count().await <= 5);
}

/// A client drops its socket in the middle of a transaction; the pool of one must hand the next
/// client a server that is outside any transaction, and the orphaned insert must never commit.
async fn vanishing_client_leaves_no_open_transaction(abrupt: bool) {
    let opts = ProxyOpts {
        pool_size: 1,
        ..ProxyOpts::default()
    };
    let env = Env::start(HbaAuth::ScramSha256, opts).await;
    env.sql(
        "app",
        "CREATE TABLE orphan (id int); ALTER TABLE orphan OWNER TO app",
    )
    .await;

    let a = env.connect().await;
    within(
        "begin",
        a.batch_execute("BEGIN; INSERT INTO orphan VALUES (1)"),
    )
    .await
    .unwrap();
    assert_eq!(
        scalar(&a, "SELECT count(*) FROM orphan").await,
        "1",
        "A sees its own insert"
    );
    if abrupt {
        a.vanish().await;
    } else {
        drop(a); // tokio-postgres sends Terminate inside the open transaction
    }

    let b = env.connect().await;
    let clean = scalar(
        &b,
        "SELECT (txid_current_if_assigned() IS NULL AND now() = statement_timestamp())::text",
    )
    .await;
    assert_eq!(
        clean, "true",
        "B's statement ran inside A's leftover transaction"
    );
    assert_eq!(
        scalar(&b, "SELECT count(*) FROM orphan").await,
        "0",
        "A's insert is visible to B"
    );
    within(
        "B inserts",
        b.batch_execute("INSERT INTO orphan VALUES (2)"),
    )
    .await
    .unwrap();
    within(
        "B tx",
        b.batch_execute("BEGIN; INSERT INTO orphan VALUES (3); COMMIT"),
    )
    .await
    .unwrap();

    assert_eq!(
        env.sql(
            "app",
            "SELECT string_agg(id::text, ',' ORDER BY id) FROM orphan"
        )
        .await,
        "2,3"
    );
    let open = env
        .sql(
            "postgres",
            "SELECT count(*) FROM pg_stat_activity WHERE datname = 'app' AND xact_start IS NOT NULL",
        )
        .await;
    assert_eq!(open, "0", "a transaction is still open upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_vanishing_mid_transaction_is_rolled_back() {
    vanishing_client_leaves_no_open_transaction(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_terminating_mid_transaction_is_rolled_back() {
    vanishing_client_leaves_no_open_transaction(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_parameters_are_isolated_on_a_shared_server() {
    let opts = ProxyOpts {
        pool_size: 1,
        ..ProxyOpts::default()
    };
    let env = Env::start(HbaAuth::ScramSha256, opts).await;
    let default_tz = env.sql("app", "SHOW TimeZone").await;
    assert_ne!(default_tz, "Asia/Tokyo");

    let mut config_a = env.config("app", Some("secret"), "app");
    config_a.application_name("client_a");
    let mut config_b = env.config("app", Some("secret"), "app");
    config_b.application_name("client_b");
    let mut a = env.connect_with(&config_a).await;
    let b = env.connect_with(&config_b).await;
    let pid_a = scalar(&a, "SELECT pg_backend_pid()").await;
    let pid_b = scalar(&b, "SELECT pg_backend_pid()").await;
    assert_eq!(pid_a, pid_b, "pool of 1: both clients use the same server");

    assert_eq!(scalar(&b, "SHOW application_name").await, "client_b");
    within("A sets", a.batch_execute("SET TimeZone = 'Asia/Tokyo'"))
        .await
        .unwrap();
    within(
        "A sets",
        a.batch_execute("SET application_name = 'changed_a'"),
    )
    .await
    .unwrap();

    assert_eq!(
        scalar(&b, "SHOW TimeZone").await,
        default_tz,
        "B sees A's TimeZone"
    );
    assert_eq!(
        scalar(&b, "SHOW application_name").await,
        "client_b",
        "B sees A's application_name"
    );
    assert_eq!(
        scalar(&a, "SHOW TimeZone").await,
        "Asia/Tokyo",
        "A lost its TimeZone"
    );
    assert_eq!(scalar(&a, "SHOW application_name").await, "changed_a");
    // The upstream's own view of the server while each client holds it.
    let name_b = scalar(
        &b,
        "SELECT application_name FROM pg_stat_activity WHERE pid = pg_backend_pid()",
    )
    .await;
    assert_eq!(name_b, "client_b");

    let t = within("A tx", a.transaction()).await.unwrap();
    let tz = within("A tx", t.simple_query("SHOW TimeZone"))
        .await
        .unwrap();
    let name = within("A tx", t.simple_query("SHOW application_name"))
        .await
        .unwrap();
    within("A tx", t.commit()).await.unwrap();
    let (tz, name) = (first_value(&tz).unwrap(), first_value(&name).unwrap());
    assert_eq!((tz.as_str(), name.as_str()), ("Asia/Tokyo", "changed_a"));

    assert_eq!(scalar(&b, "SHOW TimeZone").await, default_tz);
    assert_eq!(
        scalar(&b, "SELECT now()::text LIKE '%+09'").await,
        "f",
        "B's timestamps are rendered in A's time zone"
    );
    assert_eq!(scalar(&a, "SELECT now()::text LIKE '%+09'").await, "t");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_beyond_max_client_conn_get_53300() {
    let opts = ProxyOpts {
        extra: vec!["max_client_conn = 2".into()],
        ..ProxyOpts::default()
    };
    let env = Env::start(HbaAuth::ScramSha256, opts).await;
    let a = env.connect().await;
    let b = env.connect().await;
    let refused = env.try_connect("app", Some("secret"), "app").await.err();
    let refused = refused.expect("a third client got in with max_client_conn = 2");
    assert_eq!(sqlstate(&refused), "53300", "{refused}");
    assert_eq!(scalar(&a, "SELECT 'a ok'").await, "a ok");

    // Once a client leaves, its slot is free again (the proxy notices the close asynchronously).
    drop(b);
    wait_until("a slot frees up", || async {
        match env.try_connect("app", Some("secret"), "app").await {
            Ok(c) => scalar(&c, "SELECT 'c ok'").await == "c ok",
            Err(e) if sqlstate(&e) == "53300" => false,
            Err(e) => panic!("unexpected error while waiting for a free slot: {e}"),
        }
    })
    .await;
}

/// The pool's queue is first come, first served, and a client that gives up while queued
/// (its connection dropped, its wait timed out) passes its place on: the freed server goes to
/// the next client in line, nothing is lost, and the pool never opens a second server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_is_fifo_and_a_client_that_gives_up_passes_its_place_on() {
    use floodgate::sessions::ClientState;
    let env = trust_env(1, &["query_wait_timeout = \"120s\""]).await;
    let waiting = || {
        env.proxy
            .shared()
            .sessions
            .clients()
            .iter()
            .filter(|c| c.state() == ClientState::Waiting)
            .count()
    };
    let holder = env.connect().await;
    holder.batch_execute("BEGIN").await.expect("BEGIN");
    scalar(&holder, "SELECT 1").await;

    // Queued in this order: first, quitter (a raw socket that drops while queued), second.
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut queued = Vec::new();
    let mut quitter = None;
    for name in ["first", "quitter", "second"] {
        let before = waiting();
        if name == "quitter" {
            let mut raw = raw_login_trust(env.addr()).await;
            send_raw(&mut raw, &query_message("SELECT 'quitter'")).await;
            quitter = Some(raw);
        } else {
            let conn = env.connect().await;
            let done = done_tx.clone();
            queued.push(tokio::spawn(async move {
                let value = scalar(&conn, &format!("SELECT '{name}'")).await;
                let _ = done.send(value);
                conn
            }));
        }
        let what = format!("{name} queued");
        wait_until(&what, || async { waiting() > before }).await;
    }
    drop(quitter);
    wait_until("the quitter left the queue", || async { waiting() == 2 }).await;

    holder.batch_execute("COMMIT").await.expect("COMMIT");
    let first = within("first answer", done_rx.recv()).await;
    let second = within("second answer", done_rx.recv()).await;
    assert_eq!(
        (first.as_deref(), second.as_deref()),
        (Some("first"), Some("second")),
        "clients were served out of their queue order"
    );
    for task in queued {
        within("queued client", task).await.expect("client task");
    }
    let pool = env.proxy.shared().pool("app", "app").expect("pool");
    assert_eq!(
        pool.open_servers(),
        1,
        "the pool of one opened another server"
    );
    assert_eq!(env.backend_count().await, 1);
}
