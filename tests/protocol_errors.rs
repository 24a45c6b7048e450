//! Malformed input from one client: the proxy answers 08P01 where it can, closes that
//! connection, and keeps serving everyone else.

mod common;

use common::*;
use floodgate::pgcluster::HbaAuth;

/// Raw logins use `trust`; the proxy logs in upstream with the configured password.
async fn env() -> Env {
    let opts = ProxyOpts {
        auth_type: "trust",
        extra: vec!["max_packet_size = 65536".into()],
        ..ProxyOpts::default()
    };
    Env::start(HbaAuth::ScramSha256, opts).await
}

/// Sends `bytes` on a fresh connection and requires `08P01` followed by the close.
async fn refused_with_08p01(env: &Env, what: &str, bytes: &[u8]) {
    let mut raw = raw_connect(env.addr()).await;
    send_raw(&mut raw, bytes).await;
    let fields = expect_error_then_close(&mut raw, what).await;
    assert_eq!(
        fields.get(&'C').map(String::as_str),
        Some("08P01"),
        "{what}: {fields:?}"
    );
    assert_eq!(
        fields.get(&'S').map(String::as_str),
        Some("FATAL"),
        "{what}: {fields:?}"
    );
}

/// A well-behaved client that must keep working while others misbehave.
async fn still_works(bystander: &Conn, what: &str) {
    assert_eq!(
        scalar(bystander, "SELECT 'bystander ok'").await,
        "bystander ok",
        "after {what}"
    );
}

/// A startup-packet header: length then protocol code.
fn header(len: i32, code: i32) -> Vec<u8> {
    [len.to_be_bytes(), code.to_be_bytes()].concat()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_instead_of_startup_is_refused() {
    let env = env().await;
    let bystander = env.connect_with(&env.config("app", None, "app")).await;
    let garbage: [(&str, &[u8]); 3] = [
        ("HTTP request", b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"),
        (
            "TLS ClientHello",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
        ),
        (
            "parameters without terminator",
            &[
                header(16, PROTOCOL_3_0),
                b"\xff\xfe\xfd\xfc\xfb\xfa\xf9\xf8".to_vec(),
            ]
            .concat(),
        ),
    ];
    for (what, bytes) in garbage {
        refused_with_08p01(&env, what, bytes).await;
        still_works(&bystander, what).await;
    }
    let fresh = env.connect_with(&env.config("app", None, "app")).await;
    still_works(&fresh, "garbage (new client)").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_startup_lengths_are_refused_before_reading_a_body() {
    let env = env().await;
    let bystander = env.connect_with(&env.config("app", None, "app")).await;
    // Only the 8-byte header is sent: a proxy that waits for the announced body hangs here.
    let cases = [
        ("length 0x7fffffff", i32::MAX),
        ("length 1 MiB", 1 << 20),
        ("negative length", -1),
        ("length i32::MIN", i32::MIN),
        ("length 0", 0),
        ("length 3", 3),
        ("length 7", 7),
    ];
    for (what, len) in cases {
        refused_with_08p01(&env, what, &header(len, PROTOCOL_3_0)).await;
        still_works(&bystander, what).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_startup_then_close_is_cleaned_up() {
    let env = env().await;
    let bystander = env.connect_with(&env.config("app", None, "app")).await;
    let startup = startup_message(&[("user", "app"), ("database", "app")]);
    for cut in [1, 4, 6, 8, startup.len() - 1] {
        let mut raw = raw_connect(env.addr()).await;
        send_raw(&mut raw, &startup[..cut]).await;
        within("half-close", tokio::io::AsyncWriteExt::shutdown(&mut raw))
            .await
            .unwrap();
        // The proxy cannot answer a peer that left; it must just close its side.
        expect_closed(&mut raw, &format!("startup cut after {cut} bytes")).await;
        still_works(&bystander, &format!("startup cut after {cut} bytes")).await;
    }
    let fresh = env.connect_with(&env.config("app", None, "app")).await;
    still_works(&fresh, "truncated startups (new client)").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_message_lengths_after_login_are_refused() {
    let env = env().await;
    let bystander = env.connect_with(&env.config("app", None, "app")).await;
    let cases: [(&str, u8, i32); 6] = [
        ("Query length 0x7fffffff", b'Q', i32::MAX),
        ("Query above max_packet_size", b'Q', 65536 + 1024),
        ("Query negative length", b'Q', -5),
        ("Query length 3", b'Q', 3),
        ("Query length 0", b'Q', 0),
        ("Parse length 0x7fffffff", b'P', i32::MAX),
    ];
    for (what, kind, len) in cases {
        let mut raw = raw_login_trust(env.addr()).await;
        let mut bytes = vec![kind];
        bytes.extend_from_slice(&len.to_be_bytes());
        send_raw(&mut raw, &bytes).await;
        let fields = expect_error_then_close(&mut raw, what).await;
        assert_eq!(
            fields.get(&'C').map(String::as_str),
            Some("08P01"),
            "{what}: {fields:?}"
        );
        still_works(&bystander, what).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_message_type_after_login_is_refused() {
    let env = env().await;
    let bystander = env.connect_with(&env.config("app", None, "app")).await;
    let mut raw = raw_login_trust(env.addr()).await;
    // A well-formed query first: the session is really up.
    send_raw(&mut raw, &message(b'Q', b"SELECT 1\0")).await;
    within("query", async {
        loop {
            match read_message(&mut raw).await {
                Incoming::Message(b'Z', _) => break,
                Incoming::Message(b'E', body) => {
                    panic!("SELECT 1 failed: {:?}", error_fields(&body))
                }
                Incoming::Message(..) => {}
                Incoming::Closed => panic!("closed after SELECT 1"),
            }
        }
    })
    .await;
    send_raw(&mut raw, &message(b'z', b"garbage")).await;
    let fields = expect_error_then_close(&mut raw, "message type 'z'").await;
    assert_eq!(
        fields.get(&'C').map(String::as_str),
        Some("08P01"),
        "{fields:?}"
    );
    still_works(&bystander, "unknown message type").await;
    // The server the bad client may have held went back (or was replaced) in a sane state.
    let fresh = env.connect_with(&env.config("app", None, "app")).await;
    assert_eq!(scalar(&fresh, "SELECT 'fresh ok'").await, "fresh ok");
}

/// Messages may arrive in pieces: each one is sent a byte at a time (with a short pause so the
/// proxy sees every piece on its own). A message the proxy holds back until it is whole must make
/// it read on, not give the server back and spin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_arriving_a_byte_at_a_time_are_served() {
    let env = env().await;
    let mut raw = raw_login_trust(env.addr()).await;
    let mut query = b"SELECT 40 + 2".to_vec();
    query.push(0);
    let query = message(b'Q', &query);
    for round in 0..3 {
        for byte in &query {
            send_raw(&mut raw, std::slice::from_ref(byte)).await;
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let mut row = None;
        within("answer to a query sent byte by byte", async {
            loop {
                match read_message(&mut raw).await {
                    Incoming::Message(b'D', body) => row = Some(body),
                    Incoming::Message(b'Z', _) => break,
                    Incoming::Message(b'E', body) => panic!("error: {:?}", error_fields(&body)),
                    Incoming::Message(..) => {}
                    Incoming::Closed => panic!("closed in round {round}"),
                }
            }
        })
        .await;
        let row = row.expect("a data row");
        assert!(row.ends_with(b"42"), "round {round}: {row:?}");
    }
}
