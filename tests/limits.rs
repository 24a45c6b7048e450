//! Client admission limits: per client IP (count and connection rate), per database and per
//! user. The client over a limit gets FATAL 53300 naming the limit; everyone else is served.

mod common;

use std::net::SocketAddr;

use common::*;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};

/// A raw connection to the proxy from source address `from` (any of 127.0.0.0/8).
async fn connect_from(from: [u8; 4], to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::from((from, 0)))
        .expect("bind source address");
    within("connect", socket.connect(to))
        .await
        .expect("connect")
}

/// Logs in as `app`/`app` (trust); `Ok` once ReadyForQuery arrives, `Err(fields)` on an error.
async fn login(stream: &mut TcpStream) -> Result<(), std::collections::BTreeMap<char, String>> {
    let startup = startup_message(&[("user", "app"), ("database", "app")]);
    let _ = stream.write_all(&startup).await;
    within("login", async {
        loop {
            match read_message(stream).await {
                Incoming::Message(b'Z', _) => return Ok(()),
                Incoming::Message(b'E', body) => return Err(error_fields(&body)),
                Incoming::Message(..) => {}
                Incoming::Closed => panic!("closed without an answer"),
            }
        }
    })
    .await
}

fn assert_refused(result: Result<(), std::collections::BTreeMap<char, String>>, setting: &str) {
    let fields = result.expect_err("the client over the limit is refused");
    assert_fatal_naming(&fields, "53300", setting);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_ip_connection_cap() {
    let env = trust_env(5, &["max_client_conn_per_ip = 2"]).await;
    let mut a = connect_from([127, 0, 0, 1], env.addr()).await;
    let mut b = connect_from([127, 0, 0, 1], env.addr()).await;
    login(&mut a).await.expect("first client from the IP");
    login(&mut b).await.expect("second client from the IP");
    let mut c = connect_from([127, 0, 0, 1], env.addr()).await;
    assert_refused(login(&mut c).await, "max_client_conn_per_ip");
    // Another host is not affected.
    let mut other = connect_from([127, 0, 0, 2], env.addr()).await;
    login(&mut other).await.expect("a client from another IP");
    // A closed connection frees its place.
    drop(a);
    wait_until("a place from 127.0.0.1 again", || async {
        let mut d = connect_from([127, 0, 0, 1], env.addr()).await;
        login(&mut d).await.is_ok()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_ip_connection_rate() {
    let env = trust_env(
        5,
        &[
            "client_conn_rate_per_ip = 0.5",
            "client_conn_burst_per_ip = 3",
        ],
    )
    .await;
    for i in 0..3 {
        let mut c = connect_from([127, 0, 0, 1], env.addr()).await;
        login(&mut c)
            .await
            .unwrap_or_else(|e| panic!("connection {i} of the burst: {e:?}"));
    }
    let mut over = connect_from([127, 0, 0, 1], env.addr()).await;
    assert_refused(login(&mut over).await, "client_conn_rate_per_ip");
    let mut other = connect_from([127, 0, 0, 3], env.addr()).await;
    login(&mut other)
        .await
        .expect("another IP has its own bucket");
    // The bucket refills (one token every 2 s).
    wait_until("the bucket refills", || async {
        let mut c = connect_from([127, 0, 0, 1], env.addr()).await;
        login(&mut c).await.is_ok()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_database_and_per_user_client_caps() {
    let env = trust_env(5, &["max_db_client_connections = 2"]).await;
    let a = env.connect().await;
    let _b = env.connect().await;
    let mut c = raw_connect(env.addr()).await;
    assert_refused(login(&mut c).await, "max_db_client_connections");
    assert_eq!(
        scalar(&a, "SELECT 1").await,
        "1",
        "admitted clients keep working"
    );
    drop(a);
    wait_until("a place in the database again", || async {
        let mut d = raw_connect(env.addr()).await;
        login(&mut d).await.is_ok()
    })
    .await;

    let env = self::trust_env(5, &["max_user_client_connections = 1"]).await;
    let _a = env.connect().await;
    let mut b = raw_connect(env.addr()).await;
    assert_refused(login(&mut b).await, "max_user_client_connections");
}

/// Issue: a client over `max_client_conn` got the error before it had sent anything; libpq
/// sends an SSLRequest first, so psql showed "server sent an error response during SSL
/// exchange". Now the refusal follows the StartupMessage, as PostgreSQL's does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_over_max_client_conn_reads_the_reason() {
    let env = trust_env(5, &["max_client_conn = 1"]).await;
    let _first = env.connect().await;
    let mut args = host_port(env.addr());
    args.extend(["-U", "app", "-d", "app", "-X", "-At", "-c", "SELECT 1"].map(String::from));
    let out = run_tool("psql", args).await;
    assert!(!out.status.success(), "{}", tool_text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("max_client_conn"), "{}", tool_text(&out));
    assert!(!stderr.contains("SSL"), "{}", tool_text(&out));

    // A raw client that sends an SSLRequest gets `N`, then the FATAL after its startup.
    let mut raw = raw_connect(env.addr()).await;
    let mut ssl_request = 8i32.to_be_bytes().to_vec();
    ssl_request.extend(80877103i32.to_be_bytes());
    send_raw(&mut raw, &ssl_request).await;
    let mut answer = [0u8; 1];
    within(
        "SSL answer",
        tokio::io::AsyncReadExt::read_exact(&mut raw, &mut answer),
    )
    .await
    .expect("an answer to the SSLRequest");
    assert_eq!(&answer, b"N");
    assert_refused(login(&mut raw).await, "max_client_conn");
}
