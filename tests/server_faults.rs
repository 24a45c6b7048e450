//! Faults on the path between a client and its server: the server dies mid-transaction, clients
//! vanish mid-COPY, mid-batch, mid-query or while queued, and the queue times out.

mod common;

use std::time::Duration;

use common::*;
use floodgate::pgcluster::HbaAuth;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_postgres::{Client, NoTls};

/// Creates table `name (id int)` owned by `app`.
async fn create_table(env: &Env, name: &str) {
    env.sql(
        "app",
        &format!("CREATE TABLE {name} (id int); ALTER TABLE {name} OWNER TO app"),
    )
    .await;
}

/// Transactions open upstream on database `app` (psql's own connection is to `postgres`).
async fn open_transactions(env: &Env) -> String {
    env.sql(
        "postgres",
        "SELECT count(*) FROM pg_stat_activity WHERE datname = 'app' AND xact_start IS NOT NULL",
    )
    .await
}

/// Checks that a client's statement does not run inside someone else's leftover transaction.
async fn assert_fresh_transaction(c: &Client, what: &str) {
    let clean = scalar(
        c,
        "SELECT (txid_current_if_assigned() IS NULL AND now() = statement_timestamp())::text",
    )
    .await;
    assert_eq!(
        clean, "true",
        "{what}: statement ran inside a leftover transaction"
    );
}

/// Connects through the proxy; the task's result is how the connection ended (a FATAL that
/// arrives while no query is pending ends the connection with that error).
async fn connect_watched(env: &Env) -> (Client, JoinHandle<Result<(), tokio_postgres::Error>>) {
    let config = env.config("app", Some("secret"), "app");
    let (client, connection) = within("connecting through the proxy", config.connect(NoTls))
        .await
        .unwrap_or_else(|e| panic!("cannot connect through the proxy: {}", describe(&e)));
    (client, tokio::spawn(connection))
}

/// A NUL-terminated string.
fn cstr(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

/// Parse of an unnamed statement without parameter types.
fn parse(sql: &str) -> Vec<u8> {
    let mut body = cstr("");
    body.extend(cstr(sql));
    body.extend(0i16.to_be_bytes());
    message(b'P', &body)
}

/// Bind of the unnamed portal to the unnamed statement, no parameters, default formats.
fn bind() -> Vec<u8> {
    let mut body = cstr("");
    body.extend(cstr(""));
    body.extend(0i16.to_be_bytes()); // parameter format codes
    body.extend(0i16.to_be_bytes()); // parameters
    body.extend(0i16.to_be_bytes()); // result format codes
    message(b'B', &body)
}

/// Execute of the unnamed portal, all rows.
fn execute() -> Vec<u8> {
    let mut body = cstr("");
    body.extend(0i32.to_be_bytes());
    message(b'E', &body)
}

fn flush() -> Vec<u8> {
    message(b'H', &[])
}

fn terminate() -> Vec<u8> {
    message(b'X', &[])
}

/// Reads messages until one of type `tag` arrives (returning its body); an ErrorResponse or
/// the close of the connection fails the test.
async fn read_until(stream: &mut TcpStream, tag: u8, what: &str) -> Vec<u8> {
    within(what, async {
        loop {
            match read_message(stream).await {
                Incoming::Message(t, body) if t == tag => return body,
                Incoming::Message(b'E', body) => panic!("{what}: error {:?}", error_fields(&body)),
                Incoming::Message(..) => {}
                Incoming::Closed => panic!("{what}: connection closed"),
            }
        }
    })
    .await
}

// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_dying_mid_transaction_fails_the_client_and_commits_nothing() {
    let opts = ProxyOpts {
        pool_size: 1,
        ..ProxyOpts::default()
    };
    let env = Env::start(HbaAuth::ScramSha256, opts).await;
    create_table(&env, "dead").await;

    let (a, a_connection) = connect_watched(&env).await;
    within(
        "A: BEGIN; INSERT",
        a.batch_execute("BEGIN; INSERT INTO dead VALUES (1)"),
    )
    .await
    .expect("A: BEGIN; INSERT");
    let terminated = env
        .sql(
            "postgres",
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE usename = 'app' AND state LIKE 'idle in transaction%'",
        )
        .await;
    assert_eq!(terminated, "t", "A's server backend was not terminated");

    let next = within("A's next statement", a.simple_query("COMMIT")).await;
    let next_err = match next {
        Ok(_) => panic!("A's COMMIT succeeded on a server that was terminated"),
        Err(e) => e,
    };
    // The connection must be closed: its task ends (a hang fails here after the timeout).
    let ended = within("A's connection is closed", a_connection)
        .await
        .expect("connection task");
    assert!(a.is_closed(), "A's client is not closed");
    assert!(
        within("A after the failure", a.simple_query("SELECT 1"))
            .await
            .is_err(),
        "A's connection still runs queries"
    );
    let code = next_err
        .code()
        .or_else(|| ended.as_ref().err().and_then(|e| e.code()))
        .map(|c| c.code().to_string());
    assert!(
        matches!(code.as_deref(), Some("57P01") | Some("08006")),
        "expected SQLSTATE 57P01 or 08006; statement error: {}; connection ended with: {:?}",
        describe(&next_err),
        ended.as_ref().map_err(describe)
    );

    assert_eq!(
        env.sql("app", "SELECT count(*) FROM dead").await,
        "0",
        "A's row was committed"
    );
    let b = env.connect().await;
    assert_eq!(
        scalar(&b, "SELECT 'after the crash'").await,
        "after the crash"
    );
    within(
        "B inserts",
        b.batch_execute("BEGIN; INSERT INTO dead VALUES (2); COMMIT"),
    )
    .await
    .expect("B: transaction on a fresh server");
    assert_eq!(
        env.sql("app", "SELECT string_agg(id::text, ',') FROM dead")
            .await,
        "2"
    );
    assert!(env.backend_count().await <= 1, "pool of 1 exceeded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_vanishing_mid_copy_in_leaves_nothing_behind() {
    let env = trust_env(1, &[]).await;
    create_table(&env, "cp").await;

    let mut raw = raw_login_trust(env.addr()).await;
    send_raw(&mut raw, &query_message("COPY cp FROM STDIN")).await;
    read_until(&mut raw, b'G', "CopyInResponse").await;
    for row in ["1\n", "2\n", "3\n"] {
        send_raw(&mut raw, &message(b'd', row.as_bytes())).await;
    }
    drop(raw);

    let b = env.connect().await;
    assert_fresh_transaction(&b, "next client after an abandoned COPY").await;
    assert_eq!(scalar(&b, "SELECT count(*) FROM cp").await, "0");
    within(
        "next client's COPY-free insert",
        b.batch_execute("INSERT INTO cp VALUES (10)"),
    )
    .await
    .expect("next client inserts");
    assert_eq!(
        env.sql("app", "SELECT string_agg(id::text, ',') FROM cp")
            .await,
        "10",
        "rows of the abandoned COPY reached the table"
    );
    assert_eq!(open_transactions(&env).await, "0");
    assert!(env.backend_count().await <= 1, "pool of 1 exceeded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminate_mid_extended_batch_without_sync_leaves_no_transaction() {
    let env = trust_env(1, &[]).await;
    create_table(&env, "ext").await;

    let mut raw = raw_login_trust(env.addr()).await;
    let mut batch = parse("INSERT INTO ext VALUES (1)");
    batch.extend(bind());
    batch.extend(execute());
    batch.extend(flush());
    send_raw(&mut raw, &batch).await;
    // The INSERT has run (in the implicit transaction that only a Sync would end).
    read_until(&mut raw, b'C', "CommandComplete of the INSERT").await;
    send_raw(&mut raw, &terminate()).await;
    drop(raw);

    let b = env.connect().await;
    assert_fresh_transaction(&b, "next client after Terminate without Sync").await;
    assert_eq!(scalar(&b, "SELECT 'next'").await, "next");
    within(
        "next client's transaction",
        b.batch_execute("BEGIN; INSERT INTO ext VALUES (2); COMMIT"),
    )
    .await
    .expect("next client's transaction");
    assert_eq!(open_transactions(&env).await, "0");
    assert!(env.backend_count().await <= 1, "pool of 1 exceeded");
}

/// Not in the brief's list, but what "drop-in" implies: PostgreSQL itself rolls back the
/// implicit transaction of an extended-protocol batch when the client sends Terminate before
/// any Sync. The test first shows that on PostgreSQL directly, then requires the same through
/// the proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminate_before_sync_commits_nothing_as_on_postgres() {
    // Trust upstream, so the raw reference client can log in to PostgreSQL directly.
    let opts = ProxyOpts {
        auth_type: "trust",
        pool_size: 1,
        ..ProxyOpts::default()
    };
    let env = Env::start(HbaAuth::Trust, opts).await;
    create_table(&env, "unsynced").await;
    let batch = |id: i32| {
        let mut b = parse(&format!("INSERT INTO unsynced VALUES ({id})"));
        b.extend(bind());
        b.extend(execute());
        b.extend(flush());
        b
    };

    // Reference: PostgreSQL directly.
    let upstream = format!("{}:{}", env.cluster.host(), env.cluster.port())
        .parse()
        .unwrap();
    let mut direct = raw_login_trust(upstream).await;
    send_raw(&mut direct, &batch(1)).await;
    read_until(&mut direct, b'C', "direct: CommandComplete").await;
    send_raw(&mut direct, &terminate()).await;
    expect_closed(&mut direct, "direct: PostgreSQL closes after Terminate").await;
    wait_until("the direct backend has exited", || async {
        env.backend_count().await == 0
    })
    .await;
    assert_eq!(
        env.sql("app", "SELECT count(*) FROM unsynced WHERE id = 1")
            .await,
        "0",
        "reference: PostgreSQL committed an unsynced batch on Terminate"
    );

    // Through the proxy.
    let mut raw = raw_login_trust(env.addr()).await;
    send_raw(&mut raw, &batch(2)).await;
    read_until(&mut raw, b'C', "proxy: CommandComplete").await;
    send_raw(&mut raw, &terminate()).await;
    drop(raw);
    // On a pool of one, the next client's query runs only once the server has been cleaned.
    let b = env.connect().await;
    assert_eq!(scalar(&b, "SELECT count(*) FROM unsynced").await, "0");
    assert_eq!(
        env.sql("app", "SELECT count(*) FROM unsynced WHERE id = 2")
            .await,
        "0",
        "through the proxy, the INSERT of a batch ended by Terminate before Sync was committed \
         (PostgreSQL rolls it back)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphaned_long_query_is_cancelled_for_the_next_client() {
    let env = trust_env(1, &[]).await;
    let mut raw = raw_login_trust(env.addr()).await;
    send_raw(&mut raw, &query_message("SELECT pg_sleep(30)")).await;
    let sleeping = "SELECT count(*) FROM pg_stat_activity WHERE datname = 'app' \
                    AND query = 'SELECT pg_sleep(30)' AND state = 'active'";
    wait_until("pg_sleep(30) runs upstream", || async {
        env.sql("postgres", sleeping).await == "1"
    })
    .await;
    drop(raw);

    // Without a cancel the server would stay busy for the rest of the 30 s.
    let next = tokio::time::timeout(Duration::from_secs(20), async {
        let b = env.connect().await;
        let value = scalar(&b, "SELECT 'served'").await;
        (b, value)
    })
    .await;
    let (b, value) = next.expect(
        "the next client got no server within 20 s: the orphaned pg_sleep(30) was not cancelled",
    );
    assert_eq!(value, "served");
    assert_eq!(
        env.sql("postgres", sleeping).await,
        "0",
        "the orphaned pg_sleep(30) is still running upstream"
    );
    assert_fresh_transaction(&b, "next client after an orphaned query").await;
    assert!(env.backend_count().await <= 1, "pool of 1 exceeded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_wait_timeout_fails_the_waiter_with_53300() {
    let env = trust_env(1, &["query_wait_timeout = \"1s\""]).await;
    let a = env.connect().await;
    within("A: BEGIN", a.batch_execute("BEGIN; SELECT 1"))
        .await
        .expect("A: BEGIN");

    let b = env.connect().await;
    let err = match within("B waits for a server", b.simple_query("SELECT 'b'")).await {
        Ok(_) => panic!("B was served while A held the only server in a transaction"),
        Err(e) => e,
    };
    assert_eq!(sqlstate(&err), "53300", "{}", describe(&err));
    assert!(
        db_message(&err).contains("query_wait_timeout"),
        "the message does not mention query_wait_timeout: {}",
        describe(&err)
    );

    within("A: COMMIT", a.batch_execute("COMMIT"))
        .await
        .expect("A: COMMIT");
    let c = env.connect().await;
    assert_eq!(scalar(&c, "SELECT 'c'").await, "c");
    assert!(env.backend_count().await <= 1, "pool of 1 exceeded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_client_that_disconnects_leaves_the_queue() {
    let env = trust_env(1, &["query_wait_timeout = \"60s\""]).await;
    let a = env.connect().await;
    within("A: BEGIN", a.batch_execute("BEGIN; SELECT 1"))
        .await
        .expect("A: BEGIN");

    let mut b = raw_login_trust(env.addr()).await;
    send_raw(&mut b, &query_message("SELECT 'b'")).await;
    // Pacing, not an assertion: give the proxy time to read B's query and queue it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(b);

    within("A: COMMIT", a.batch_execute("COMMIT"))
        .await
        .expect("A: COMMIT");
    let served = tokio::time::timeout(Duration::from_secs(10), async {
        let c = env.connect().await;
        scalar(&c, "SELECT 'c'").await
    })
    .await
    .expect("C got no server within 10 s after A committed: B's place in the queue was kept");
    assert_eq!(served, "c");
    assert!(env.backend_count().await <= 1, "pool of 1 exceeded");
}
