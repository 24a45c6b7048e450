//! Named prepared statements in transaction mode (issue 3): clients prepare statements once and
//! use them in later transactions, which land on whichever server is free. Every test runs in
//! transaction mode with a pool smaller than its number of clients. Where the wire-level answer
//! matters, the same script is first played against PostgreSQL directly (the reference), then
//! through the proxy, and both must match.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use floodgate::pgcluster::HbaAuth;
use tokio::net::TcpStream;
use tokio_postgres::Statement;
use tokio_postgres::types::Type;

// ---------------------------------------------------------------------------------------------
// Environment.
// ---------------------------------------------------------------------------------------------

/// A trust upstream (so raw reference clients can log in to PostgreSQL directly) behind a trust
/// proxy in transaction mode with a pool of `pool_size`; `max_prepared` sets
/// `max_prepared_statements` (the default, 200, when `None`).
async fn env(pool_size: usize, max_prepared: Option<usize>) -> Env {
    let opts = ProxyOpts {
        auth_type: "trust",
        pool_mode: "transaction",
        pool_size,
        extra: max_prepared
            .map(|n| vec![format!("max_prepared_statements = {n}")])
            .unwrap_or_default(),
        ..ProxyOpts::default()
    };
    Env::start(HbaAuth::Trust, opts).await
}

/// PostgreSQL itself, for reference clients.
fn upstream(env: &Env) -> SocketAddr {
    format!("{}:{}", env.cluster.host(), env.cluster.port())
        .parse()
        .unwrap()
}

// ---------------------------------------------------------------------------------------------
// Frontend messages.
// ---------------------------------------------------------------------------------------------

/// A NUL-terminated string.
fn cstr(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

fn query(sql: &str) -> Vec<u8> {
    message(b'Q', &cstr(sql))
}

/// Parse of statement `name` (empty: unnamed) with explicit parameter type OIDs.
fn parse_typed(name: &str, sql: &str, types: &[u32]) -> Vec<u8> {
    let mut body = cstr(name);
    body.extend(cstr(sql));
    body.extend((types.len() as i16).to_be_bytes());
    for t in types {
        body.extend(t.to_be_bytes());
    }
    message(b'P', &body)
}

/// Parse of statement `name` without parameter types.
fn parse(name: &str, sql: &str) -> Vec<u8> {
    parse_typed(name, sql, &[])
}

/// Bind of the unnamed portal to `statement` with text parameters and text results.
fn bind(statement: &str, params: &[&str]) -> Vec<u8> {
    let mut body = cstr("");
    body.extend(cstr(statement));
    body.extend(0i16.to_be_bytes()); // parameter format codes: all text
    body.extend((params.len() as i16).to_be_bytes());
    for p in params {
        body.extend((p.len() as i32).to_be_bytes());
        body.extend(p.as_bytes());
    }
    body.extend(0i16.to_be_bytes()); // result format codes: all text
    message(b'B', &body)
}

/// Execute of the unnamed portal, all rows.
fn execute() -> Vec<u8> {
    let mut body = cstr("");
    body.extend(0i32.to_be_bytes());
    message(b'E', &body)
}

/// Describe of statement `name`.
fn describe_statement(name: &str) -> Vec<u8> {
    let mut body = vec![b'S'];
    body.extend(cstr(name));
    message(b'D', &body)
}

/// Close of statement `name`.
fn close_statement(name: &str) -> Vec<u8> {
    let mut body = vec![b'S'];
    body.extend(cstr(name));
    message(b'C', &body)
}

fn sync() -> Vec<u8> {
    message(b'S', &[])
}

fn flush() -> Vec<u8> {
    message(b'H', &[])
}

fn terminate() -> Vec<u8> {
    message(b'X', &[])
}

/// Bind `statement` with `params`, Execute, Sync.
fn run_named(statement: &str, params: &[&str]) -> Vec<u8> {
    [bind(statement, params), execute(), sync()].concat()
}

// ---------------------------------------------------------------------------------------------
// Backend messages.
// ---------------------------------------------------------------------------------------------

/// A backend message, reduced to what the tests compare.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Msg {
    ParseComplete,
    BindComplete,
    CloseComplete,
    NoData,
    /// ParameterDescription: parameter type OIDs.
    Params(Vec<u32>),
    /// RowDescription: column names and type OIDs.
    Columns(Vec<(String, u32)>),
    /// DataRow in text format.
    Row(Vec<Option<String>>),
    /// CommandComplete tag.
    Complete(String),
    /// ErrorResponse: SQLSTATE and message.
    Error(String, String),
    /// ReadyForQuery transaction status.
    Ready(char),
    Other(char),
}

fn row(values: &[&str]) -> Msg {
    Msg::Row(values.iter().map(|v| Some(v.to_string())).collect())
}

fn complete(tag: &str) -> Msg {
    Msg::Complete(tag.to_string())
}

fn error(code: &str, message: &str) -> Msg {
    Msg::Error(code.to_string(), message.to_string())
}

/// What Bind + Execute + Sync of a one-row statement answers.
fn one_row(values: &[&str]) -> Vec<Msg> {
    vec![
        Msg::BindComplete,
        row(values),
        complete("SELECT 1"),
        Msg::Ready('I'),
    ]
}

/// An error, then ReadyForQuery `status`.
fn failed(code: &str, message: &str, status: char) -> Vec<Msg> {
    vec![error(code, message), Msg::Ready(status)]
}

fn missing(name: &str) -> Vec<Msg> {
    failed(
        "26000",
        &format!("prepared statement \"{name}\" does not exist"),
        'I',
    )
}

fn duplicate(name: &str, status: char) -> Vec<Msg> {
    failed(
        "42P05",
        &format!("prepared statement \"{name}\" already exists"),
        status,
    )
}

struct Cursor<'a>(&'a [u8]);

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> &[u8] {
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        head
    }
    fn i16(&mut self) -> i16 {
        i16::from_be_bytes(self.take(2).try_into().unwrap())
    }
    fn i32(&mut self) -> i32 {
        i32::from_be_bytes(self.take(4).try_into().unwrap())
    }
    fn cstr(&mut self) -> String {
        let end = self.0.iter().position(|&b| b == 0).expect("NUL");
        let s = String::from_utf8_lossy(&self.0[..end]).into_owned();
        self.0 = &self.0[end + 1..];
        s
    }
}

/// Decodes a backend message; `None` for asynchronous ones (notices, parameter status).
fn decode(tag: u8, body: &[u8]) -> Option<Msg> {
    let mut c = Cursor(body);
    Some(match tag {
        b'1' => Msg::ParseComplete,
        b'2' => Msg::BindComplete,
        b'3' => Msg::CloseComplete,
        b'n' => Msg::NoData,
        b't' => {
            let n = c.i16();
            Msg::Params((0..n).map(|_| c.i32() as u32).collect())
        }
        b'T' => {
            let n = c.i16();
            let columns = (0..n)
                .map(|_| {
                    let name = c.cstr();
                    c.take(6); // table OID, column number
                    let oid = c.i32() as u32;
                    c.take(8); // type size, modifier, format
                    (name, oid)
                })
                .collect();
            Msg::Columns(columns)
        }
        b'D' => {
            let n = c.i16();
            let values = (0..n)
                .map(|_| match c.i32() {
                    -1 => None,
                    len => Some(String::from_utf8_lossy(c.take(len as usize)).into_owned()),
                })
                .collect();
            Msg::Row(values)
        }
        b'C' => Msg::Complete(c.cstr()),
        b'E' => {
            let fields = error_fields(body);
            Msg::Error(
                fields.get(&'C').cloned().unwrap_or_default(),
                fields.get(&'M').cloned().unwrap_or_default(),
            )
        }
        b'Z' => Msg::Ready(body[0] as char),
        b'N' | b'S' | b'A' => return None,
        other => Msg::Other(other as char),
    })
}

/// The next non-asynchronous backend message; the close of the connection fails the test.
async fn next(stream: &mut TcpStream, what: &str) -> Msg {
    within(what, async {
        loop {
            match read_message(stream).await {
                Incoming::Message(tag, body) => {
                    if let Some(msg) = decode(tag, &body) {
                        return msg;
                    }
                }
                Incoming::Closed => panic!("{what}: connection closed"),
            }
        }
    })
    .await
}

/// Messages up to and including the next ReadyForQuery.
async fn until_ready(stream: &mut TcpStream, what: &str) -> Vec<Msg> {
    let mut out = Vec::new();
    loop {
        let msg = next(stream, what).await;
        let done = matches!(msg, Msg::Ready(_));
        out.push(msg);
        if done {
            return out;
        }
    }
}

/// Sends `bytes` and returns the answer up to the next ReadyForQuery.
async fn round(stream: &mut TcpStream, bytes: &[u8], what: &str) -> Vec<Msg> {
    send_raw(stream, bytes).await;
    until_ready(stream, what).await
}

// ---------------------------------------------------------------------------------------------
// Scripts played against PostgreSQL and through the proxy.
// ---------------------------------------------------------------------------------------------

/// One step of a script: what it is, the messages it sends (ending with Sync or a Query), and
/// what PostgreSQL answers up to ReadyForQuery.
struct Step {
    what: &'static str,
    send: Vec<u8>,
    expect: Vec<Msg>,
}

fn step(what: &'static str, send: Vec<u8>, expect: Vec<Msg>) -> Step {
    Step { what, send, expect }
}

/// Logs in to PostgreSQL directly over a raw socket as superuser `postgres` to database `app`
/// (not as `app`, so the reference session never counts as one of the pool's backends).
async fn raw_login_superuser(addr: SocketAddr) -> TcpStream {
    let mut stream = raw_connect(addr).await;
    let startup = startup_message(&[("user", "postgres"), ("database", "app")]);
    send_raw(&mut stream, &startup).await;
    loop {
        match next(&mut stream, "reference login").await {
            Msg::Ready(_) => return stream,
            Msg::Error(code, message) => panic!("reference login refused: {code} {message}"),
            _ => {}
        }
    }
}

/// Plays `steps` on PostgreSQL directly (each answer must be `expect`: the script states what
/// PostgreSQL does), then through the proxy (each answer must be the same). Through the proxy,
/// `disturber` uses the shared pool between the steps that leave the client idle, so the
/// client's statements are evicted from (or deallocated on) the server in between.
async fn play(env: &Env, steps: &[Step], mut disturber: Option<&mut Disturber>) {
    let mut direct = raw_login_superuser(upstream(env)).await;
    for s in steps {
        let got = round(&mut direct, &s.send, s.what).await;
        assert_eq!(
            got, s.expect,
            "reference: PostgreSQL answered `{}` differently from the script",
            s.what
        );
    }
    send_raw(&mut direct, &terminate()).await;
    drop(direct);

    let mut proxied = raw_login_trust(env.addr()).await;
    for s in steps {
        let got = round(&mut proxied, &s.send, s.what).await;
        assert_eq!(
            got, s.expect,
            "through the proxy, `{}` was answered differently from PostgreSQL \
             (left: proxy, right: PostgreSQL)",
            s.what
        );
        if got.last() == Some(&Msg::Ready('I'))
            && let Some(d) = disturber.as_deref_mut()
        {
            d.run().await;
        }
    }
    send_raw(&mut proxied, &terminate()).await;
}

/// Another client on the same pool that prepares its own statements and runs them all whenever
/// asked, checking their results.
struct Disturber {
    conn: Conn,
    statements: Vec<(Statement, i32)>,
    runs: i32,
}

impl Disturber {
    async fn new(env: &Env, count: i32) -> Disturber {
        let conn = env.connect().await;
        let mut statements = Vec::new();
        for k in 0..count {
            let sql = format!("SELECT $1::int4 + {k} AS disturbed");
            let st = within("disturber: prepare", conn.prepare(&sql))
                .await
                .unwrap_or_else(|e| panic!("disturber: prepare `{sql}`: {}", describe(&e)));
            statements.push((st, k));
        }
        let mut d = Disturber {
            conn,
            statements,
            runs: 0,
        };
        d.run().await;
        d
    }

    async fn run(&mut self) {
        for (st, k) in &self.statements {
            let rows = within("disturber: query", self.conn.query(st, &[&self.runs]))
                .await
                .unwrap_or_else(|e| panic!("disturber: statement +{k}: {}", describe(&e)));
            assert_eq!(rows.len(), 1, "disturber: statement +{k}");
            assert_eq!(
                rows[0].get::<_, i32>(0),
                self.runs + k,
                "disturber: statement +{k} returned another statement's result"
            );
        }
        self.runs += 1;
    }
}

// ---------------------------------------------------------------------------------------------
// tokio-postgres and pgbench.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_prepare_and_query_with_many_concurrent_clients() {
    const CLIENTS: i32 = 30;
    const ROUNDS: i32 = 20;
    let env = env(3, None).await;

    let mut tasks = tokio::task::JoinSet::new();
    for id in 0..CLIENTS {
        let config = env.config("app", Some("secret"), "app");
        tasks.spawn(async move {
            let c = within("connect", connect(&config))
                .await
                .unwrap_or_else(|e| panic!("client {id}: connect: {}", describe(&e)));
            // Two statements every client shares, one of its own.
            let arith = c.prepare("SELECT $1::int4 * 2 + $2::int4 AS v").await;
            let text = c
                .prepare("SELECT $1::text || ':' || $2::int4::text AS v")
                .await;
            let own = c
                .prepare(&format!(
                    "SELECT g + {id} AS v FROM generate_series(1, $1::int4) g ORDER BY g"
                ))
                .await;
            let (arith, text, own) = match (arith, text, own) {
                (Ok(a), Ok(t), Ok(o)) => (a, t, o),
                (a, t, o) => panic!(
                    "client {id}: prepare failed: {:?} {:?} {:?}",
                    a.err().map(|e| describe(&e)),
                    t.err().map(|e| describe(&e)),
                    o.err().map(|e| describe(&e))
                ),
            };
            for i in 0..ROUNDS {
                let rows = c
                    .query(&arith, &[&i, &id])
                    .await
                    .unwrap_or_else(|e| panic!("client {id} round {i}: {}", describe(&e)));
                assert_eq!(rows.len(), 1);
                assert_eq!(
                    rows[0].get::<_, i32>(0),
                    i * 2 + id,
                    "client {id} round {i}"
                );

                let label = format!("c{id}");
                let rows = c
                    .query(&text, &[&label, &i])
                    .await
                    .unwrap_or_else(|e| panic!("client {id} round {i}: {}", describe(&e)));
                assert_eq!(rows.len(), 1);
                assert_eq!(rows[0].get::<_, String>(0), format!("c{id}:{i}"));

                let n = i % 5 + 1;
                let rows = c
                    .query(&own, &[&n])
                    .await
                    .unwrap_or_else(|e| panic!("client {id} round {i}: {}", describe(&e)));
                let got: Vec<i32> = rows.iter().map(|r| r.get(0)).collect();
                let want: Vec<i32> = (1..=n).map(|g| g + id).collect();
                assert_eq!(got, want, "client {id} round {i}: own statement");
            }
        });
    }
    within("30 clients prepare and query", async {
        while let Some(done) = tasks.join_next().await {
            if let Err(e) = done {
                std::panic::resume_unwind(e.into_panic());
            }
        }
    })
    .await;
    assert!(
        env.backend_count().await <= 3,
        "pool of 3 exceeded upstream"
    );
}

/// `pgbench -M prepared -c 20 -j 2 -t 50` (plus `extra`) through the proxy must process every
/// transaction with none failed.
async fn pgbench_prepared(env: &Env, extra: &[&str]) {
    let mut args: Vec<String> = [
        "-M", "prepared", "-c", "20", "-j", "2", "-t", "50", "-n", "-U", "app",
    ]
    .map(String::from)
    .to_vec();
    args.extend(extra.iter().map(|s| s.to_string()));
    args.extend(host_port(env.addr()));
    args.push("app".into());
    let line = args.join(" ");
    let out = run_tool("pgbench", args).await;
    let report = tool_text(&out);
    assert!(out.status.success(), "pgbench {line}: {report}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("number of transactions actually processed: 1000/1000"),
        "pgbench {line}: {report}"
    );
    assert!(
        stdout.contains("number of failed transactions: 0 "),
        "pgbench {line}: {report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_prepared_mode_with_20_clients_on_a_pool_of_3() {
    let env = env(3, None).await;
    pgbench_init(&env.cluster).await;

    pgbench_prepared(&env, &[]).await;
    assert_eq!(
        env.sql("app", "SELECT count(*) FROM pgbench_history").await,
        "1000",
        "every TPC-B transaction committed"
    );
    pgbench_prepared(&env, &["-S"]).await;
    assert!(
        env.backend_count().await <= 3,
        "pool of 3 exceeded upstream"
    );
}

// ---------------------------------------------------------------------------------------------
// Pipelines across a pause, eviction, two clients with one name.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parse_describe_flush_pause_then_bind_execute_sync_while_another_client_hammers() {
    // A cache of 2 so the other client's statements evict A's (and A's evict theirs).
    let env = env(1, Some(2)).await;
    let mut b = Disturber::new(&env, 3).await;

    let mut a = raw_login_trust(env.addr()).await;
    let sql = "SELECT $1::int4 * 10 AS ten, 'a:' || $1::text AS tag";
    let batch = [parse("a", sql), describe_statement("a"), flush()].concat();
    send_raw(&mut a, &batch).await;
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(next(&mut a, "A: answers to Parse, Describe, Flush").await);
    }
    assert_eq!(
        got,
        vec![
            Msg::ParseComplete,
            Msg::Params(vec![23]),
            Msg::Columns(vec![("ten".into(), 23), ("tag".into(), 25)]),
        ],
        "A: Parse + Describe + Flush"
    );

    // B hammers the pool of 1 that A holds until its Sync.
    let a_synced = Arc::new(AtomicBool::new(false));
    let flag = a_synced.clone();
    let hammer = tokio::spawn(async move {
        b.run().await;
        let after_sync = flag.load(Ordering::SeqCst);
        for _ in 0..20 {
            b.run().await;
            let rows = b
                .conn
                .query_typed("SELECT $1::int4 - 1", &[(&b.runs, Type::INT4)])
                .await
                .unwrap_or_else(|e| panic!("B: query_typed: {}", describe(&e)));
            assert_eq!(rows[0].get::<_, i32>(0), b.runs - 1, "B: unnamed statement");
        }
        (b, after_sync)
    });
    // Pacing, not an assertion: let B's first query reach the proxy's queue.
    tokio::time::sleep(Duration::from_millis(300)).await;

    a_synced.store(true, Ordering::SeqCst);
    let got = round(&mut a, &run_named("a", &["7"]), "A: Bind + Execute + Sync").await;
    assert_eq!(
        got,
        one_row(&["70", "a:7"]),
        "A: Bind + Execute + Sync after the pause"
    );

    let (b, after_sync) = within("B's hammering", hammer)
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
    assert!(
        after_sync,
        "B was served on the pool of 1 while A held the server with an unsynced batch"
    );

    // B's statements have evicted A's from the only server: A's must be prepared again.
    let got = round(&mut a, &run_named("a", &["8"]), "A: again after B").await;
    assert_eq!(got, one_row(&["80", "a:8"]), "A: after B's statements");
    let got = round(
        &mut a,
        &[describe_statement("a"), sync()].concat(),
        "A: Describe",
    )
    .await;
    assert_eq!(
        got,
        vec![
            Msg::Params(vec![23]),
            Msg::Columns(vec![("ten".into(), 23), ("tag".into(), 25)]),
            Msg::Ready('I'),
        ],
        "A: Describe after B's statements"
    );
    drop(b);
    assert!(env.backend_count().await <= 1, "pool of 1 exceeded");
}

/// Prepares `sql(k)` for k in 0..10 on `c`.
async fn prepare_ten(c: &Conn, sql: impl Fn(i32) -> String) -> Vec<(Statement, i32)> {
    let mut out = Vec::new();
    for k in 0..10 {
        let text = sql(k);
        let st = within("prepare", c.prepare(&text))
            .await
            .unwrap_or_else(|e| panic!("prepare `{text}`: {}", describe(&e)));
        out.push((st, k));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eviction_with_a_cache_of_2_and_10_rotating_statements() {
    let env = env(1, Some(2)).await;
    let a = env.connect().await;
    let b = env.connect().await;
    let a_statements = prepare_ten(&a, |k| format!("SELECT $1::int4 + {k} AS a")).await;
    let b_statements = prepare_ten(&b, |k| format!("SELECT $1::int8 * {k} AS b")).await;

    let run_a = async {
        for round in 0..8i32 {
            for (st, k) in &a_statements {
                let rows = a
                    .query(st, &[&round])
                    .await
                    .unwrap_or_else(|e| panic!("A: statement {k} round {round}: {}", describe(&e)));
                assert_eq!(rows[0].get::<_, i32>(0), round + k, "A: statement {k}");
            }
        }
    };
    let run_b = async {
        for round in 0..8i64 {
            // B rotates the other way round.
            for (st, k) in b_statements.iter().rev() {
                let rows = b
                    .query(st, &[&round])
                    .await
                    .unwrap_or_else(|e| panic!("B: statement {k} round {round}: {}", describe(&e)));
                assert_eq!(
                    rows[0].get::<_, i64>(0),
                    round * *k as i64,
                    "B: statement {k}"
                );
            }
        }
    };
    within("A and B rotate their statements", async {
        tokio::join!(run_a, run_b)
    })
    .await;

    // The only server holds at most the 2 statements the cache allows.
    let messages = within(
        "counting statements on the server",
        a.simple_query("BEGIN; SELECT count(*) FROM pg_prepared_statements; COMMIT"),
    )
    .await
    .unwrap_or_else(|e| panic!("count: {}", describe(&e)));
    let count: i64 = first_value(&messages)
        .expect("a count")
        .parse()
        .expect("a number");
    assert!(
        (1..=2).contains(&count),
        "the server holds {count} prepared statements with max_prepared_statements = 2"
    );
    assert!(env.backend_count().await <= 1, "pool of 1 exceeded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_name_different_sql_from_two_clients() {
    let env = env(1, None).await;
    let mut a = raw_login_trust(env.addr()).await;
    let mut b = raw_login_trust(env.addr()).await;

    let got = round(
        &mut a,
        &[parse("q", "SELECT $1::int4 + 1"), sync()].concat(),
        "A: Parse q",
    )
    .await;
    assert_eq!(got, vec![Msg::ParseComplete, Msg::Ready('I')], "A: Parse q");
    let got = round(
        &mut b,
        &[parse("q", "SELECT 'b:' || $1::text"), sync()].concat(),
        "B: Parse q",
    )
    .await;
    assert_eq!(got, vec![Msg::ParseComplete, Msg::Ready('I')], "B: Parse q");

    let describe_q = [describe_statement("q"), sync()].concat();
    let got = round(&mut a, &describe_q, "A: Describe q").await;
    assert_eq!(
        got,
        vec![
            Msg::Params(vec![23]),
            Msg::Columns(vec![("?column?".into(), 23)]),
            Msg::Ready('I')
        ],
        "A: Describe q shows A's int4 query"
    );
    let got = round(&mut b, &describe_q, "B: Describe q").await;
    assert_eq!(
        got,
        vec![
            Msg::Params(vec![25]),
            Msg::Columns(vec![("?column?".into(), 25)]),
            Msg::Ready('I')
        ],
        "B: Describe q shows B's text query"
    );

    // Alternately on the one server...
    for i in 0..10 {
        let p = i.to_string();
        let got = round(&mut a, &run_named("q", &[&p]), "A: run q").await;
        assert_eq!(got, one_row(&[&(i + 1).to_string()]), "A: q({i})");
        let got = round(&mut b, &run_named("q", &[&p]), "B: run q").await;
        assert_eq!(got, one_row(&[&format!("b:{i}")]), "B: q({i})");
    }
    // ...and concurrently.
    let task_a = tokio::spawn(async move {
        for i in 100..130 {
            let got = round(&mut a, &run_named("q", &[&i.to_string()]), "A: run q").await;
            assert_eq!(got, one_row(&[&(i + 1).to_string()]), "A: q({i})");
        }
        a
    });
    let task_b = tokio::spawn(async move {
        for i in 100..130 {
            let got = round(&mut b, &run_named("q", &[&i.to_string()]), "B: run q").await;
            assert_eq!(got, one_row(&[&format!("b:{i}")]), "B: q({i})");
        }
        b
    });
    let (a, b) = within("A and B concurrently", async {
        tokio::join!(task_a, task_b)
    })
    .await;
    let mut a = a.unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
    let mut b = b.unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));

    // C prepares A's very query as "q" and closes it: A's "q" must not go with it.
    let mut c = raw_login_trust(env.addr()).await;
    let got = round(
        &mut c,
        &[parse("q", "SELECT $1::int4 + 1"), sync()].concat(),
        "C: Parse q",
    )
    .await;
    assert_eq!(got, vec![Msg::ParseComplete, Msg::Ready('I')], "C: Parse q");
    let got = round(&mut c, &run_named("q", &["5"]), "C: run q").await;
    assert_eq!(got, one_row(&["6"]), "C: q(5)");
    let got = round(
        &mut c,
        &[close_statement("q"), sync()].concat(),
        "C: Close q",
    )
    .await;
    assert_eq!(got, vec![Msg::CloseComplete, Msg::Ready('I')], "C: Close q");
    let got = round(&mut a, &run_named("q", &["5"]), "A: run q after C's Close").await;
    assert_eq!(got, one_row(&["6"]), "A: q(5) after C closed its own q");
    let got = round(
        &mut c,
        &[parse("q", "SELECT $1::int4 - 1"), sync()].concat(),
        "C: Parse q anew",
    )
    .await;
    assert_eq!(got, vec![Msg::ParseComplete, Msg::Ready('I')], "C: new q");
    let got = round(&mut c, &run_named("q", &["5"]), "C: run new q").await;
    assert_eq!(got, one_row(&["4"]), "C: new q(5)");
    let got = round(&mut a, &run_named("q", &["5"]), "A: run q").await;
    assert_eq!(got, one_row(&["6"]), "A: q(5) after C re-used the name");
    let got = round(&mut b, &run_named("q", &["5"]), "B: run q").await;
    assert_eq!(got, one_row(&["b:5"]), "B: q(5) at the end");
    assert!(env.backend_count().await <= 1, "pool of 1 exceeded");
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL's semantics for names: 42P05, 26000, Close, DEALLOCATE, errors in a pipeline.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_and_unknown_names_and_close_behave_as_on_postgres() {
    // A cache of 2 and a disturber with 2 statements: s1 is evicted between the steps.
    let env = env(1, Some(2)).await;
    let mut disturber = Disturber::new(&env, 2).await;
    let idle = Msg::Ready('I');
    let steps = vec![
        step(
            "Parse s1, Sync",
            [parse("s1", "SELECT 1"), sync()].concat(),
            vec![Msg::ParseComplete, idle.clone()],
        ),
        step(
            "Parse s1 again without Close, Sync",
            [parse("s1", "SELECT 2"), sync()].concat(),
            duplicate("s1", 'I'),
        ),
        step(
            "Bind s1, Execute, Sync after 42P05 (s1 keeps its first SQL)",
            run_named("s1", &[]),
            one_row(&["1"]),
        ),
        step(
            "BEGIN",
            query("BEGIN"),
            vec![complete("BEGIN"), Msg::Ready('T')],
        ),
        step(
            "Parse s1 again inside a transaction, Sync",
            [parse("s1", "SELECT 3"), sync()].concat(),
            duplicate("s1", 'E'),
        ),
        step(
            "ROLLBACK",
            query("ROLLBACK"),
            vec![complete("ROLLBACK"), idle.clone()],
        ),
        step(
            "Bind s1 after the failed transaction",
            run_named("s1", &[]),
            one_row(&["1"]),
        ),
        step(
            "Bind of an unknown name",
            run_named("nosuch", &[]),
            missing("nosuch"),
        ),
        step(
            "Describe of an unknown name",
            [describe_statement("nosuch"), sync()].concat(),
            missing("nosuch"),
        ),
        step(
            "Close of an unknown name",
            [close_statement("nosuch"), sync()].concat(),
            vec![Msg::CloseComplete, idle.clone()],
        ),
        step(
            "Close s1, Parse s1 with new SQL, Bind, Execute, Sync",
            [
                close_statement("s1"),
                parse("s1", "SELECT 'new'"),
                bind("s1", &[]),
                execute(),
                sync(),
            ]
            .concat(),
            vec![
                Msg::CloseComplete,
                Msg::ParseComplete,
                Msg::BindComplete,
                row(&["new"]),
                complete("SELECT 1"),
                idle.clone(),
            ],
        ),
        step(
            "Bind s1 runs the new SQL",
            run_named("s1", &[]),
            one_row(&["new"]),
        ),
        step(
            "Close s1, Sync",
            [close_statement("s1"), sync()].concat(),
            vec![Msg::CloseComplete, idle.clone()],
        ),
        step("Bind s1 after Close", run_named("s1", &[]), missing("s1")),
        step(
            "Parse s1 after Close, Sync",
            [parse("s1", "SELECT 'newer'"), sync()].concat(),
            vec![Msg::ParseComplete, idle.clone()],
        ),
        step(
            "Bind s1 runs the newest SQL",
            run_named("s1", &[]),
            one_row(&["newer"]),
        ),
    ];
    play(&env, &steps, Some(&mut disturber)).await;
    assert!(env.backend_count().await <= 1, "pool of 1 exceeded");
}

/// A re-Parse of an existing name fails with 42P05 and the server skips the rest of the batch,
/// including the Parse the proxy adds before the Bind of a statement the server lacks (evicted):
/// that statement must not be recorded as prepared on the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_parse_before_a_bind_of_an_evicted_statement_keeps_the_cache_right() {
    // A cache of 2 and a disturber with 2 statements: s1 is evicted between the steps.
    let env = env(1, Some(2)).await;
    let mut disturber = Disturber::new(&env, 2).await;
    let steps = vec![
        step(
            "Parse s1, Sync",
            [parse("s1", "SELECT 1"), sync()].concat(),
            vec![Msg::ParseComplete, Msg::Ready('I')],
        ),
        step("Bind s1", run_named("s1", &[]), one_row(&["1"])),
        step(
            "Parse s1 again, Bind s1, Execute, Sync (skipped after 42P05)",
            [parse("s1", "SELECT 4"), bind("s1", &[]), execute(), sync()].concat(),
            duplicate("s1", 'I'),
        ),
        step(
            "Bind s1 after the failed batch",
            run_named("s1", &[]),
            one_row(&["1"]),
        ),
    ];
    play(&env, &steps, Some(&mut disturber)).await;
    assert!(env.backend_count().await <= 1, "pool of 1 exceeded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deallocate_and_sql_prepare_behave_as_on_postgres() {
    let env = env(1, None).await;
    // Another client's statements live on the same server: DEALLOCATE ALL drops them there,
    // and they must still work for their client afterwards.
    let mut other = Disturber::new(&env, 2).await;
    let idle = Msg::Ready('I');
    let in_tx = Msg::Ready('T');
    let steps = vec![
        step(
            "Parse s1, Parse s2, Sync",
            [parse("s1", "SELECT 1"), parse("s2", "SELECT 2"), sync()].concat(),
            vec![Msg::ParseComplete, Msg::ParseComplete, idle.clone()],
        ),
        step("Bind s1", run_named("s1", &[]), one_row(&["1"])),
        step(
            "DEALLOCATE ALL",
            query("DEALLOCATE ALL"),
            vec![complete("DEALLOCATE ALL"), idle.clone()],
        ),
        step(
            "Bind s1 after DEALLOCATE ALL",
            run_named("s1", &[]),
            missing("s1"),
        ),
        step(
            "Bind s2 after DEALLOCATE ALL",
            run_named("s2", &[]),
            missing("s2"),
        ),
        step(
            "Parse s1 after DEALLOCATE ALL",
            [parse("s1", "SELECT 'again'"), sync()].concat(),
            vec![Msg::ParseComplete, idle.clone()],
        ),
        step("Bind s1 again", run_named("s1", &[]), one_row(&["again"])),
        step(
            "DEALLOCATE s1",
            query("DEALLOCATE s1"),
            vec![complete("DEALLOCATE"), idle.clone()],
        ),
        step(
            "Bind s1 after DEALLOCATE s1",
            run_named("s1", &[]),
            missing("s1"),
        ),
        step(
            "DEALLOCATE of an unknown name",
            query("DEALLOCATE s1"),
            failed("26000", "prepared statement \"s1\" does not exist", 'I'),
        ),
        step(
            "Parse s1 after DEALLOCATE s1, Bind, Execute, Sync",
            [
                parse("s1", "SELECT 'third'"),
                bind("s1", &[]),
                execute(),
                sync(),
            ]
            .concat(),
            vec![
                Msg::ParseComplete,
                Msg::BindComplete,
                row(&["third"]),
                complete("SELECT 1"),
                idle.clone(),
            ],
        ),
        step(
            "BEGIN",
            query("BEGIN"),
            vec![complete("BEGIN"), in_tx.clone()],
        ),
        step(
            "DEALLOCATE s1 inside a transaction",
            query("DEALLOCATE s1"),
            vec![complete("DEALLOCATE"), in_tx.clone()],
        ),
        step(
            "SQL PREPARE",
            query("PREPARE p(int) AS SELECT $1 * 3 AS tripled"),
            vec![complete("PREPARE"), in_tx.clone()],
        ),
        step(
            "SQL EXECUTE",
            query("EXECUTE p(5)"),
            vec![
                Msg::Columns(vec![("tripled".into(), 23)]),
                row(&["15"]),
                complete("SELECT 1"),
                in_tx.clone(),
            ],
        ),
        step(
            "SQL DEALLOCATE p",
            query("DEALLOCATE p"),
            vec![complete("DEALLOCATE"), in_tx.clone()],
        ),
        step(
            "COMMIT",
            query("COMMIT"),
            vec![complete("COMMIT"), idle.clone()],
        ),
        step(
            "Bind s1 after DEALLOCATE s1 in the transaction",
            run_named("s1", &[]),
            missing("s1"),
        ),
        step(
            "Parse s1, Parse s3, Sync",
            [
                parse("s1", "SELECT 'fourth'"),
                parse("s3", "SELECT 3"),
                sync(),
            ]
            .concat(),
            vec![Msg::ParseComplete, Msg::ParseComplete, idle.clone()],
        ),
        step("Bind s3", run_named("s3", &[]), one_row(&["3"])),
        step(
            "DISCARD ALL",
            query("DISCARD ALL"),
            vec![complete("DISCARD ALL"), idle.clone()],
        ),
        step(
            "Bind s3 after DISCARD ALL",
            run_named("s3", &[]),
            missing("s3"),
        ),
        step(
            "Parse s3 after DISCARD ALL, Bind, Execute, Sync",
            [
                parse("s3", "SELECT 'back'"),
                bind("s3", &[]),
                execute(),
                sync(),
            ]
            .concat(),
            vec![
                Msg::ParseComplete,
                Msg::BindComplete,
                row(&["back"]),
                complete("SELECT 1"),
                idle.clone(),
            ],
        ),
    ];
    play(&env, &steps, Some(&mut other)).await;
    assert!(env.backend_count().await <= 1, "pool of 1 exceeded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_in_the_middle_of_a_pipeline_behaves_as_on_postgres() {
    let env = env(1, Some(2)).await;
    let mut disturber = Disturber::new(&env, 2).await;
    let idle = Msg::Ready('I');
    let syntax = |near: &str| error("42601", &format!("syntax error at or near \"{near}\""));
    let steps = vec![
        step(
            "Parse s1, Parse s2 (syntax error), Bind s1, Execute, Sync",
            [
                parse("s1", "SELECT 1"),
                parse("s2", "SELEC 2"),
                bind("s1", &[]),
                execute(),
                sync(),
            ]
            .concat(),
            vec![Msg::ParseComplete, syntax("SELEC"), idle.clone()],
        ),
        step(
            "Bind s2 (never created)",
            run_named("s2", &[]),
            missing("s2"),
        ),
        step("Bind s1", run_named("s1", &[]), one_row(&["1"])),
        step(
            "Parse s2 now, Bind, Execute, Sync",
            [parse("s2", "SELECT 2"), bind("s2", &[]), execute(), sync()].concat(),
            vec![
                Msg::ParseComplete,
                Msg::BindComplete,
                row(&["2"]),
                complete("SELECT 1"),
                idle.clone(),
            ],
        ),
        step(
            "Parse s3, Bind s3, Execute (division by zero), Parse s4, Sync",
            [
                parse(
                    "s3",
                    "SELECT 1 / g FROM generate_series($1::int4, $1::int4) g",
                ),
                bind("s3", &["0"]),
                execute(),
                parse("s4", "SELECT 4"),
                sync(),
            ]
            .concat(),
            vec![
                Msg::ParseComplete,
                Msg::BindComplete,
                error("22012", "division by zero"),
                idle.clone(),
            ],
        ),
        step(
            "Bind s4 (its Parse was skipped)",
            run_named("s4", &[]),
            missing("s4"),
        ),
        step("Bind s3 with 2", run_named("s3", &["2"]), one_row(&["0"])),
        step(
            "BEGIN",
            query("BEGIN"),
            vec![complete("BEGIN"), Msg::Ready('T')],
        ),
        step(
            "in a transaction: Parse s5, Parse s6 (syntax error), Bind s5, Execute, Sync",
            [
                parse("s5", "SELECT 5"),
                parse("s6", "SELEC 6"),
                bind("s5", &[]),
                execute(),
                sync(),
            ]
            .concat(),
            vec![Msg::ParseComplete, syntax("SELEC"), Msg::Ready('E')],
        ),
        step(
            "ROLLBACK",
            query("ROLLBACK"),
            vec![complete("ROLLBACK"), idle.clone()],
        ),
        step(
            "Bind s5 (statements outlive a rollback)",
            run_named("s5", &[]),
            one_row(&["5"]),
        ),
        step("Bind s6", run_named("s6", &[]), missing("s6")),
    ];
    play(&env, &steps, Some(&mut disturber)).await;
    assert!(env.backend_count().await <= 1, "pool of 1 exceeded");
}

/// A batch of nothing but Parse messages and a Sync, sent while the client holds no server, is
/// answered by the proxy without one: a statement with a syntax error must still fail there, as
/// on PostgreSQL, and not later at its first Bind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parse_only_batch_with_a_syntax_error_fails_at_parse_as_on_postgres() {
    let env = env(1, None).await;
    let mut disturber = Disturber::new(&env, 1).await;
    let idle = Msg::Ready('I');
    let steps = vec![
        step(
            "Parse s1, Parse s2 (syntax error), Sync",
            [parse("s1", "SELECT 1"), parse("s2", "SELEC 2"), sync()].concat(),
            vec![
                Msg::ParseComplete,
                error("42601", "syntax error at or near \"SELEC\""),
                idle.clone(),
            ],
        ),
        step(
            "Bind s2 (never created)",
            run_named("s2", &[]),
            missing("s2"),
        ),
        step("Bind s1", run_named("s1", &[]), one_row(&["1"])),
        step(
            "Parse s3 of a missing table, Sync",
            [parse("s3", "SELECT * FROM no_such_table"), sync()].concat(),
            vec![
                error("42P01", "relation \"no_such_table\" does not exist"),
                idle.clone(),
            ],
        ),
        step(
            "Bind s3 (never created)",
            run_named("s3", &[]),
            missing("s3"),
        ),
    ];
    play(&env, &steps, Some(&mut disturber)).await;
}

// ---------------------------------------------------------------------------------------------
// Unnamed statements; tracking off.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unnamed_statements_keep_working_alongside_named_ones() {
    let env = env(2, Some(2)).await;
    let mut tasks = tokio::task::JoinSet::new();
    for id in 0..6i32 {
        let config = env.config("app", Some("secret"), "app");
        tasks.spawn(async move {
            let c = within("connect", connect(&config))
                .await
                .unwrap_or_else(|e| panic!("client {id}: connect: {}", describe(&e)));
            let named = c
                .prepare(&format!("SELECT $1::int4 * 100 + {id}"))
                .await
                .unwrap_or_else(|e| panic!("client {id}: prepare: {}", describe(&e)));
            for i in 0..20i32 {
                let rows = c
                    .query_typed("SELECT $1::int4 + 1", &[(&i, Type::INT4)])
                    .await
                    .unwrap_or_else(|e| panic!("client {id}: unnamed: {}", describe(&e)));
                assert_eq!(rows[0].get::<_, i32>(0), i + 1, "client {id}: unnamed");
                let rows = c
                    .query(&named, &[&i])
                    .await
                    .unwrap_or_else(|e| panic!("client {id}: named: {}", describe(&e)));
                assert_eq!(rows[0].get::<_, i32>(0), i * 100 + id, "client {id}: named");
                let rows = c
                    .query_typed(
                        "SELECT $1::text || $2::text",
                        &[(&"u", Type::TEXT), (&id.to_string(), Type::TEXT)],
                    )
                    .await
                    .unwrap_or_else(|e| panic!("client {id}: unnamed: {}", describe(&e)));
                assert_eq!(rows[0].get::<_, String>(0), format!("u{id}"));
            }
        });
    }
    within("6 clients mix unnamed and named statements", async {
        while let Some(done) = tasks.join_next().await {
            if let Err(e) = done {
                std::panic::resume_unwind(e.into_panic());
            }
        }
    })
    .await;

    // Unnamed and named statements in one pipeline, as on PostgreSQL.
    let idle = Msg::Ready('I');
    let steps = vec![
        step(
            "Parse s1, Parse unnamed, Bind/Execute unnamed, Bind/Execute s1, Sync",
            [
                parse("s1", "SELECT 'named'"),
                parse("", "SELECT 'unnamed'"),
                bind("", &[]),
                execute(),
                bind("s1", &[]),
                execute(),
                sync(),
            ]
            .concat(),
            vec![
                Msg::ParseComplete,
                Msg::ParseComplete,
                Msg::BindComplete,
                row(&["unnamed"]),
                complete("SELECT 1"),
                Msg::BindComplete,
                row(&["named"]),
                complete("SELECT 1"),
                idle.clone(),
            ],
        ),
        step(
            "typed unnamed Parse, Describe, Bind, Execute, Sync",
            [
                parse_typed("", "SELECT $1 + 1", &[23]),
                describe_statement(""),
                bind("", &["41"]),
                execute(),
                sync(),
            ]
            .concat(),
            vec![
                Msg::ParseComplete,
                Msg::Params(vec![23]),
                Msg::Columns(vec![("?column?".into(), 23)]),
                Msg::BindComplete,
                row(&["42"]),
                complete("SELECT 1"),
                idle.clone(),
            ],
        ),
        step("Bind s1", run_named("s1", &[]), one_row(&["named"])),
    ];
    let mut disturber = Disturber::new(&env, 2).await;
    play(&env, &steps, Some(&mut disturber)).await;
    assert!(env.backend_count().await <= 2, "pool of 2 exceeded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_prepared_statements_0_passes_statements_through() {
    let env = env(2, Some(0)).await;
    let mut tasks = tokio::task::JoinSet::new();
    for id in 0..5i32 {
        let config = env.config("app", Some("secret"), "app");
        tasks.spawn(async move {
            let mut c = within("connect", connect(&config))
                .await
                .unwrap_or_else(|e| panic!("client {id}: connect: {}", describe(&e)));
            for t in 0..10i32 {
                let tx = c
                    .transaction()
                    .await
                    .unwrap_or_else(|e| panic!("client {id}: BEGIN: {}", describe(&e)));
                let st = tx
                    .prepare("SELECT $1::int4 * 2 + $2::int4")
                    .await
                    .unwrap_or_else(|e| panic!("client {id}: prepare: {}", describe(&e)));
                for i in 0..3i32 {
                    let rows = tx
                        .query(&st, &[&i, &(id * 1000 + t)])
                        .await
                        .unwrap_or_else(|e| panic!("client {id}: query: {}", describe(&e)));
                    assert_eq!(rows[0].get::<_, i32>(0), i * 2 + id * 1000 + t);
                }
                tx.commit()
                    .await
                    .unwrap_or_else(|e| panic!("client {id}: COMMIT: {}", describe(&e)));
            }
        });
    }
    within("5 clients prepare within transactions", async {
        while let Some(done) = tasks.join_next().await {
            if let Err(e) = done {
                std::panic::resume_unwind(e.into_panic());
            }
        }
    })
    .await;

    // Pass-through: the server knows the statement by the client's own name.
    let mut raw = raw_login_trust(env.addr()).await;
    let got = round(&mut raw, &query("BEGIN"), "BEGIN").await;
    assert_eq!(got, vec![complete("BEGIN"), Msg::Ready('T')]);
    let got = round(
        &mut raw,
        &[parse("mine", "SELECT 'mine'"), sync()].concat(),
        "Parse mine",
    )
    .await;
    assert_eq!(got, vec![Msg::ParseComplete, Msg::Ready('T')], "Parse mine");
    let got = round(
        &mut raw,
        &query("SELECT name FROM pg_prepared_statements ORDER BY name"),
        "names on the server",
    )
    .await;
    assert!(
        got.contains(&row(&["mine"])),
        "with max_prepared_statements = 0 the server does not know the client's name: {got:?}"
    );
    let got = round(
        &mut raw,
        &[
            bind("mine", &[]),
            execute(),
            close_statement("mine"),
            sync(),
        ]
        .concat(),
        "Bind mine, Close",
    )
    .await;
    assert_eq!(
        got,
        vec![
            Msg::BindComplete,
            row(&["mine"]),
            complete("SELECT 1"),
            Msg::CloseComplete,
            Msg::Ready('T')
        ]
    );
    let got = round(&mut raw, &query("COMMIT"), "COMMIT").await;
    assert_eq!(got, vec![complete("COMMIT"), Msg::Ready('I')]);
    assert!(env.backend_count().await <= 2, "pool of 2 exceeded");
}

/// Memory bounds on named statements: one client may have at most
/// `max_client_prepared_statements`, and all distinct statements together at most
/// `max_prepared_statement_bytes`; past either, ERROR 53400 naming the setting, the session
/// goes on, and closing statements makes room again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statement_limits_give_a_clear_error() {
    let env = trust_env(
        2,
        &[
            "max_client_prepared_statements = 3",
            "max_prepared_statement_bytes = 16384",
        ],
    )
    .await;
    let c = env.connect().await;
    let mut held = Vec::new();
    for i in 0..3 {
        held.push(
            c.prepare(&format!("SELECT {i}"))
                .await
                .expect("within the limit"),
        );
    }
    let err = c.prepare("SELECT 3").await.expect_err("one too many");
    assert_eq!(sqlstate(&err), "53400", "{}", describe(&err));
    assert!(db_message(&err).contains("max_client_prepared_statements = 3"));
    assert_eq!(scalar(&c, "SELECT 'still here'").await, "still here");
    held.pop(); // tokio-postgres closes a dropped statement
    let s = within("room again", c.prepare("SELECT 3"))
        .await
        .expect("room again");
    assert_eq!(c.query_one(&s, &[]).await.unwrap().get::<_, i32>(0), 3);

    // Long statements from several clients fill the registry's budget.
    let long = |i: usize| format!("SELECT {i} AS v -- {}", "x".repeat(3000));
    let mut clients = Vec::new();
    let mut refused = None;
    for i in 0..10 {
        let client = env.connect().await;
        match client.prepare(&long(i)).await {
            Ok(statement) => clients.push((client, statement)),
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    let err = refused.expect("the budget is reached");
    assert_eq!(sqlstate(&err), "53400", "{}", describe(&err));
    assert!(db_message(&err).contains("max_prepared_statement_bytes"));
    // Statements in use keep working; once their clients leave, new ones fit again.
    for (client, statement) in &clients {
        client.query_one(statement, &[]).await.expect("still works");
    }
    drop(clients);
    wait_until("room in the registry", || async {
        let client = env.connect().await;
        client.prepare(&long(100)).await.is_ok()
    })
    .await;
}
