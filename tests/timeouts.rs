//! Timeouts with their SQLSTATEs: query_timeout (57014, the query is cancelled and the session
//! goes on), idle_transaction_timeout (FATAL 25P03, the transaction rolled back and the server
//! freed) and client_idle_timeout (FATAL 57P05).

mod common;

use common::*;

/// Reads messages until ReadyForQuery; returns the ErrorResponse fields seen, if any.
async fn until_ready(
    stream: &mut tokio::net::TcpStream,
    what: &str,
) -> Option<std::collections::BTreeMap<char, String>> {
    within(what, async {
        let mut error = None;
        loop {
            match read_message(stream).await {
                Incoming::Message(b'Z', _) => return error,
                Incoming::Message(b'E', body) => error = Some(error_fields(&body)),
                Incoming::Message(..) => {}
                Incoming::Closed => panic!("{what}: closed"),
            }
        }
    })
    .await
}

/// The next message must be a FATAL with `code`, then the connection closes.
async fn expect_fatal(stream: &mut tokio::net::TcpStream, code: &str, setting: &str) {
    let fields = expect_error_then_close(stream, setting).await;
    assert_fatal_naming(&fields, code, setting);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_timeout_cancels_the_query_and_the_session_goes_on() {
    let env = trust_env(1, &["query_timeout = \"1s\""]).await;
    let mut raw = raw_login_trust(env.addr()).await;
    send_raw(&mut raw, &query_message("SELECT pg_sleep(30)")).await;
    let error = until_ready(&mut raw, "the cancelled query (well before 30 s)").await;
    let error = error.expect("an error for the cancelled query");
    assert_eq!(
        error.get(&'C').map(String::as_str),
        Some("57014"),
        "{error:?}"
    );
    send_raw(&mut raw, &query_message("SELECT 1")).await;
    assert_eq!(
        until_ready(&mut raw, "the next query").await,
        None,
        "the session goes on"
    );
    // A quick query is not affected.
    let c = env.connect().await;
    assert_eq!(scalar(&c, "SELECT pg_sleep(0.1)::text").await, "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_transaction_timeout_ends_the_client_and_frees_the_server() {
    let env = trust_env(1, &["idle_transaction_timeout = \"1s\""]).await;
    env.sql(
        "app",
        "CREATE TABLE idle_tx (id int); ALTER TABLE idle_tx OWNER TO app",
    )
    .await;
    let mut raw = raw_login_trust(env.addr()).await;
    send_raw(
        &mut raw,
        &query_message("BEGIN; INSERT INTO idle_tx VALUES (1)"),
    )
    .await;
    assert_eq!(until_ready(&mut raw, "BEGIN").await, None);
    // The client now sits inside the transaction.
    expect_fatal(&mut raw, "25P03", "idle_transaction_timeout").await;
    // On a pool of one, the next client gets the server, rolled back.
    let c = env.connect().await;
    assert_eq!(scalar(&c, "SELECT count(*) FROM idle_tx").await, "0");
    assert_eq!(
        scalar(&c, "SELECT (txid_current_if_assigned() IS NULL)::text").await,
        "true",
        "the next client is not inside the old transaction"
    );
    // Idle outside a transaction is not affected by this timeout.
    let mut idle = raw_login_trust(env.addr()).await;
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    send_raw(&mut idle, &query_message("SELECT 1")).await;
    assert_eq!(
        until_ready(&mut idle, "a query after idling outside a transaction").await,
        None
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_idle_timeout_closes_idle_clients() {
    let env = trust_env(2, &["client_idle_timeout = \"1s\""]).await;
    let mut raw = raw_login_trust(env.addr()).await;
    expect_fatal(&mut raw, "57P05", "client_idle_timeout").await;
    // A client that keeps working is not closed.
    let mut busy = raw_login_trust(env.addr()).await;
    for _ in 0..4 {
        send_raw(&mut busy, &query_message("SELECT pg_sleep(0.4)")).await;
        assert_eq!(until_ready(&mut busy, "a busy client's query").await, None);
    }
}

/// `client_login_timeout`: a socket that never sends a byte is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_login_timeout_closes_silent_sockets() {
    let env = trust_env(1, &["client_login_timeout = \"1s\""]).await;
    let mut silent = raw_connect(env.addr()).await;
    expect_fatal(&mut silent, "08P01", "client_login_timeout").await;
    // Logging in normally is not affected.
    let c = env.connect().await;
    assert_eq!(scalar(&c, "SELECT 1").await, "1");
}

/// `server_connect_timeout`: an upstream that accepts but never answers gives the waiting client
/// a clear 08006 instead of a hang (once `query_wait_timeout` has passed: until then the proxy
/// keeps trying, as it would for a restarting server).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_connect_timeout_bounds_a_silent_upstream() {
    // Accepted by the kernel (backlog) but never answered.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let toml = format!(
        "[floodgate]\nlisten = \"127.0.0.1:0\"\nauth_type = \"trust\"\n\
         server_connect_timeout = \"1s\"\nquery_wait_timeout = \"3s\"\n\n[[users]]\nname = \"app\"\npassword = \"secret\"\n\n\
         [databases.app]\nhost = \"127.0.0.1\"\nport = {port}\n"
    );
    let proxy = start_proxy(&toml).await;
    let mut raw = raw_connect(proxy.local_addr()).await;
    let startup = startup_message(&[("user", "app"), ("database", "app")]);
    send_raw(&mut raw, &startup).await;
    let fields = within("the error (after about 3 s)", async {
        loop {
            match read_message(&mut raw).await {
                Incoming::Message(b'E', body) => return error_fields(&body),
                Incoming::Message(..) => {}
                Incoming::Closed => panic!("closed without an error"),
            }
        }
    })
    .await;
    assert_eq!(
        fields.get(&'C').map(String::as_str),
        Some("08006"),
        "{fields:?}"
    );
    let message = fields.get(&'M').cloned().unwrap_or_default();
    assert!(message.contains("timed out connecting"), "{message}");
    drop(silent);
}
