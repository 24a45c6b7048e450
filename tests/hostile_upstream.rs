//! A hostile or broken upstream: a server that is not PostgreSQL but a script in this test, one
//! misbehaviour per case (an absurd SCRAM iteration count, a huge nonce, an ErrorResponse with
//! no code, a huge or endless ParameterStatus, TLS promised and not delivered, a nonsense answer
//! to SSLRequest). Each time the waiting client gets a clean FATAL with a SQLSTATE, the proxy
//! drops that server connection, and the proxy goes on serving (its console answers).

mod common;

use std::net::SocketAddr;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the fake server does once the proxy's StartupMessage has arrived.
#[derive(Clone, Copy, Debug)]
enum Misbehaviour {
    HugeIterationCount,
    HugeNonce,
    ErrorWithoutCode,
    HugeParameterStatus,
    EndlessParameterStatus,
    /// Answers SSLRequest `S`, then sends plain-text bytes instead of a TLS handshake.
    FakeTls,
    /// Answers SSLRequest with a byte that is neither `S` nor `N`.
    BadSslAnswer,
}

fn backend(kind: u8, body: &[u8]) -> Vec<u8> {
    message(kind, body)
}

fn int32(n: i32) -> Vec<u8> {
    n.to_be_bytes().to_vec()
}

/// Reads one startup-phase packet (length first); `None` at the end of the stream.
async fn read_packet(stream: &mut TcpStream) -> Option<Vec<u8>> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).await.ok()?;
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize - 4];
    stream.read_exact(&mut body).await.ok()?;
    Some(body)
}

/// Reads one typed message; `None` at the end of the stream.
async fn read_typed(stream: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
    let mut header = [0u8; 5];
    stream.read_exact(&mut header).await.ok()?;
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    let mut body = vec![0u8; len - 4];
    stream.read_exact(&mut body).await.ok()?;
    Some((header[0], body))
}

const SSL_REQUEST: [u8; 4] = [0x04, 0xd2, 0x16, 0x2f];

/// Serves every connection with `how`; each connection's end (the proxy closing it) is sent on
/// the returned channel.
async fn fake_server(how: Misbehaviour) -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (closed_tx, closed_rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let closed = closed_tx.clone();
            tokio::spawn(async move {
                let mut stream = stream;
                misbehave(&mut stream, how).await;
                // Wait for the proxy to drop the connection.
                let mut sink = [0u8; 4096];
                while matches!(stream.read(&mut sink).await, Ok(1..)) {}
                let _ = closed.send(());
            });
        }
    });
    (addr, closed_rx)
}

async fn misbehave(stream: &mut TcpStream, how: Misbehaviour) {
    let Some(mut first) = read_packet(stream).await else {
        return;
    };
    if first.starts_with(&SSL_REQUEST) {
        let answer: &[u8] = match how {
            Misbehaviour::FakeTls => b"Shello, this is not TLS",
            Misbehaviour::BadSslAnswer => b"X",
            _ => b"N",
        };
        let _ = stream.write_all(answer).await;
        if matches!(how, Misbehaviour::FakeTls | Misbehaviour::BadSslAnswer) {
            return;
        }
        first = match read_packet(stream).await {
            Some(p) => p,
            None => return,
        };
    }
    let _ = first; // the StartupMessage: any user, any database
    let out = match how {
        Misbehaviour::HugeIterationCount | Misbehaviour::HugeNonce => {
            let sasl = backend(b'R', &[int32(10), b"SCRAM-SHA-256\0\0".to_vec()].concat());
            let _ = stream.write_all(&sasl).await;
            let Some((b'p', initial)) = read_typed(stream).await else {
                return;
            };
            let text = String::from_utf8_lossy(&initial).to_string();
            let nonce = text.split("r=").nth(1).unwrap_or("").to_string();
            let server_first = match how {
                Misbehaviour::HugeIterationCount => {
                    format!("r={nonce}server,s=c2FsdA==,i=2000000000")
                }
                _ => format!("r={nonce}{},s=c2FsdA==,i=4096", "n".repeat(100_000)),
            };
            backend(b'R', &[int32(11), server_first.into_bytes()].concat())
        }
        Misbehaviour::ErrorWithoutCode => backend(b'E', b"SFATAL\0Mno code in this error\0\0"),
        Misbehaviour::HugeParameterStatus => {
            let value = "v".repeat(2 << 20);
            let ok = backend(b'R', &int32(0));
            let param = backend(b'S', format!("huge\0{value}\0").as_bytes());
            [ok, param].concat()
        }
        Misbehaviour::EndlessParameterStatus => {
            let mut out = backend(b'R', &int32(0));
            for i in 0..5_000 {
                out.extend(backend(b'S', format!("p{i}\0x\0").as_bytes()));
            }
            out
        }
        Misbehaviour::FakeTls | Misbehaviour::BadSslAnswer => return,
    };
    let _ = stream.write_all(&out).await;
}

/// A proxy (no PostgreSQL at all) whose database `app` is the fake server at `upstream`.
async fn proxy_to(upstream: SocketAddr) -> floodgate::Proxy {
    let toml = format!(
        "[floodgate]\nlisten = \"127.0.0.1:0\"\nauth_type = \"scram-sha-256\"\n\
         admin_users = [\"app\"]\nserver_connect_timeout = \"10s\"\n\
         [[users]]\nname = \"app\"\npassword = \"secret\"\n\
         [databases.app]\nhost = \"127.0.0.1\"\nport = {}\ndbname = \"app\"\n",
        upstream.port()
    );
    start_proxy(&toml).await
}

async fn check(how: Misbehaviour, code: &str, says: &str) {
    let (upstream, mut closed) = fake_server(how).await;
    let proxy = proxy_to(upstream).await;
    let addr = proxy.local_addr();
    let err = within(
        "a client waiting on a hostile server",
        connect(&client_config(addr, "app", Some("secret"), "app")),
    )
    .await
    .err()
    .unwrap_or_else(|| panic!("{how:?}: the login should fail"));
    assert_eq!(sqlstate(&err), code, "{how:?}: {}", describe(&err));
    let text = describe(&err);
    assert!(
        text.contains(says),
        "{how:?}: the error says {says:?}: {text}"
    );
    within("the proxy drops the server connection", closed.recv())
        .await
        .expect("the fake server saw its connection closed");
    // The proxy still serves: its console answers.
    let console = connect(&client_config(addr, "app", Some("secret"), "pgbouncer"))
        .await
        .unwrap_or_else(|e| panic!("{how:?}: console after the hostile server: {e}"));
    let rows = console.simple_query("SHOW VERSION").await.unwrap();
    assert!(
        first_value(&rows).is_some_and(|v| v.contains("Floodgate")),
        "{how:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_scram_iteration_count_is_refused() {
    check(Misbehaviour::HugeIterationCount, "08006", "iteration count").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_scram_nonce_is_refused() {
    check(
        Misbehaviour::HugeNonce,
        "08006",
        "SCRAM server-first message",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_without_a_code_becomes_xx000() {
    check(
        Misbehaviour::ErrorWithoutCode,
        "XX000",
        "no code in this error",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_parameter_status_is_refused() {
    check(
        Misbehaviour::HugeParameterStatus,
        "08006",
        "larger than 1 MiB",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endless_parameter_status_is_refused() {
    check(
        Misbehaviour::EndlessParameterStatus,
        "08006",
        "too many ParameterStatus",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_promised_but_not_spoken_is_refused() {
    check(Misbehaviour::FakeTls, "08006", "TLS handshake failed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nonsense_answer_to_ssl_request_is_refused() {
    check(Misbehaviour::BadSslAnswer, "08006", "answered SSLRequest").await;
}
