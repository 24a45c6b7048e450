//! A server is never left pinned to a client, and a cancel never lands on the wrong client:
//! an error in an extended batch followed by a Query before the Sync, a batch left open after
//! a Flush (idle_transaction_timeout), and a query_timeout cancel that races the query's end.

mod common;

use common::*;

fn cstr(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

fn parse(name: &str, sql: &str) -> Vec<u8> {
    let mut body = cstr(name);
    body.extend(cstr(sql));
    body.extend(0i16.to_be_bytes());
    message(b'P', &body)
}

fn bind(statement: &str) -> Vec<u8> {
    let mut body = cstr("");
    body.extend(cstr(statement));
    body.extend([0u8; 6]); // no formats, no parameters, no result formats
    message(b'B', &body)
}

fn execute() -> Vec<u8> {
    let mut body = cstr("");
    body.extend(0i32.to_be_bytes());
    message(b'E', &body)
}

/// Reads until ReadyForQuery; returns the message types seen.
async fn until_ready(raw: &mut tokio::net::TcpStream, what: &str) -> Vec<u8> {
    within(what, async {
        let mut seen = Vec::new();
        loop {
            match read_message(raw).await {
                Incoming::Message(t, _) => {
                    seen.push(t);
                    if t == b'Z' {
                        return seen;
                    }
                }
                Incoming::Closed => panic!("{what}: closed after {seen:?}"),
            }
        }
    })
    .await
}

/// The pool's only server is free: a new client gets it and runs a query.
async fn server_is_free(env: &Env) {
    let c = env.connect().await;
    assert_eq!(scalar(&c, "SELECT 'free'").await, "free");
}

/// Issue: after an error in an extended batch, a Query before the Sync is ignored by PostgreSQL
/// (no ReadyForQuery for it); the proxy waited for that answer for ever and pinned the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_skipped_after_an_error_does_not_pin_the_server() {
    let env = trust_env(1, &[]).await;
    for (what, extra) in [
        ("a Query", query_message("SELECT 1")),
        ("a FunctionCall", {
            // int4abs(-1): function OID 1397, one text argument, text result.
            let mut body = 1397i32.to_be_bytes().to_vec();
            body.extend(0i16.to_be_bytes());
            body.extend(1i16.to_be_bytes());
            body.extend(2i32.to_be_bytes());
            body.extend(b"-1");
            body.extend(0i16.to_be_bytes());
            message(b'F', &body)
        }),
    ] {
        let mut raw = raw_login_trust(env.addr()).await;
        let mut batch = parse("", "SELECT 1/0");
        batch.extend(bind(""));
        batch.extend(execute());
        batch.extend(extra);
        batch.extend(message(b'S', &[]));
        send_raw(&mut raw, &batch).await;
        let seen = until_ready(&mut raw, what).await;
        // 1/0 is folded when the plan is made, at Bind.
        assert_eq!(seen, b"1EZ", "{what}: as PostgreSQL answers");
        server_is_free(&env).await;
        // The same client goes on.
        send_raw(&mut raw, &query_message("SELECT 2")).await;
        assert_eq!(until_ready(&mut raw, "next query").await, b"TDCZ");
    }
}

/// Issue: Parse/Bind + Flush and then silence escaped idle_transaction_timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_left_open_after_flush_is_timed_out() {
    let env = trust_env(1, &["idle_transaction_timeout = \"1s\""]).await;
    let mut raw = raw_login_trust(env.addr()).await;
    let mut batch = parse("", "SELECT 1");
    batch.extend(bind(""));
    batch.extend(message(b'H', &[]));
    send_raw(&mut raw, &batch).await;
    let fields = expect_error_then_close(&mut raw, "idle_transaction_timeout").await;
    assert_fatal_naming(&fields, "25P03", "idle_transaction_timeout");
    server_is_free(&env).await;
}

/// Issue: the cancel sent for query_timeout was not awaited before the server was released, so
/// it could cancel the next client's query. Queries that end right around the timeout race the
/// cancel; the next client on the same server must never be cancelled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_timeout_cancel_never_hits_the_next_client() {
    let env = trust_env(1, &["query_timeout = \"200ms\""]).await;
    let racer = env.connect().await;
    let victim = env.connect().await;
    for i in 0..15 {
        // 190-218 ms: sometimes done before the timer, sometimes cancelled, sometimes both.
        let sleep = format!("SELECT pg_sleep({})", 0.190 + 0.002 * i as f64);
        let _ = within("racing query", racer.simple_query(&sleep)).await;
        let r = within(
            "next client's query",
            victim.simple_query("SELECT pg_sleep(0.05)"),
        )
        .await;
        if let Err(e) = r {
            panic!("round {i}: the next client was hit: {}", describe(&e));
        }
    }
}

/// Backpressure never deadlocks a client that sends a long pipeline before reading: 10,000
/// Close/Parse pairs the proxy answers itself (the server already has the statement), behind
/// answers PostgreSQL keeps in its output buffer until a Sync, then the Sync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_pipeline_answered_by_the_proxy_completes() {
    let env = trust_env(1, &[]).await;
    let mut raw = raw_login_trust(env.addr()).await;
    let mut first = parse("a", "SELECT 1");
    first.extend(message(b'S', &[]));
    send_raw(&mut raw, &first).await;
    assert_eq!(until_ready(&mut raw, "prepare").await, b"1Z");
    let mut close = b"S".to_vec();
    close.extend(cstr("a"));
    let pair = [message(b'C', &close), parse("a", "SELECT 1")].concat();
    const PAIRS: usize = 10_000;
    // A Describe first: its answer waits in PostgreSQL's output buffer, in front of all the
    // proxy's own answers.
    let mut describe = b"S".to_vec();
    describe.extend(cstr("a"));
    let mut batch = message(b'D', &describe);
    batch.extend(pair.repeat(PAIRS));
    batch.extend(message(b'S', &[]));
    send_raw(&mut raw, &batch).await;
    let seen = until_ready(&mut raw, "the pipeline's answers").await;
    assert_eq!(seen.len(), 2 + 2 * PAIRS + 1);
    assert_eq!(&seen[..2], b"tT", "ParameterDescription, RowDescription");
    assert!(
        seen[2..2 + 2 * PAIRS].chunks(2).all(|c| c == b"31"),
        "CloseComplete, ParseComplete"
    );
    server_is_free(&env).await;
}
