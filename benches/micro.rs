//! Micro-benchmarks of the relay's hot path (issue #16): nanoseconds per operation for the pieces
//! every transaction goes through, so a change to one of them can be judged on its own.
//!
//! ```sh
//! cargo bench --bench micro                 # everything (the pool group starts a PostgreSQL)
//! cargo bench --bench micro -- frame        # one group (criterion's filter)
//! cargo bench --bench micro -- --quick      # a quick look
//! ```
//!
//! Groups:
//! - `frame`: the header-only framer ([`Scanner`], [`frame::header`]) over the bytes of one
//!   pgbench select-only transaction in extended mode, client side (Parse/Bind/Describe/Execute/
//!   Sync) and server side (ParseComplete/BindComplete/RowDescription/DataRow/CommandComplete/
//!   ReadyForQuery), whole and arriving 1 or 7 bytes at a time;
//! - `pipeline`: one transaction driven through the [`Tracker`] as the relay drives it (scan the
//!   client's bytes, `hold` / `must_wait` / `on_client_message`, forward or replace; scan the
//!   server's answer, `on_server_message`, `take_due`), unnamed statements and simple Query;
//! - `prepared`: the same with a named statement (`pgbench -M prepared`): the client's Bind
//!   renamed to the proxy's `__fg_` name when the server has the statement, with a Parse added
//!   (and its ParseComplete swallowed) when it does not, and a client's named Parse answered by
//!   the proxy itself; plus the rewrite of one Bind alone;
//! - `sql`: [`sql::leftovers`], the scan of a simple Query's text for session state it may
//!   leave (run once per Query message and per Parse): pgbench's TPC-B statements, and an
//!   ORM-style query with quoted identifiers, a string literal and a comment;
//! - `pool`: one checkout of a server from a real pool and its return (a throwaway PostgreSQL
//!   cluster and an in-process proxy; skipped when PostgreSQL's binaries are not installed).
//!
//! Inputs go through `black_box`, and every result is consumed, so nothing is folded away; the
//! first run of each transaction is checked (outside the measurement) to do what it says.

use std::hint::black_box;
use std::sync::Arc;

use bytes::BytesMut;
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use floodgate::protocol::frame::{self, Item, Scanner};
use floodgate::protocol::pipeline::{ClientAction, Scratch, ServerAction, Tracker};
use floodgate::protocol::prepared::{ClientStatements, Registry, ServerStatements};
use floodgate::protocol::sql::{self, Leftovers};

/// `max_packet_size`'s default.
const MAX_LEN: usize = 1_073_741_823;
/// `max_prepared_statements`'s default (transaction mode: named statements are rewritten).
const MAX_STATEMENTS: usize = 200;
/// pgbench's select-only query.
const QUERY: &[u8] = b"SELECT abalance FROM pgbench_accounts WHERE aid = $1;";
/// The same with its parameter inlined (`pgbench -M simple`).
const SIMPLE_QUERY: &[u8] = b"SELECT abalance FROM pgbench_accounts WHERE aid = 48213;";
/// pgbench's name for its first statement in `-M prepared`.
const CLIENT_NAME: &[u8] = b"P0_1";

/// Appends a message of `tag` whose body is `parts` concatenated.
fn put(out: &mut Vec<u8>, tag: u8, parts: &[&[u8]]) {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    out.push(tag);
    out.extend_from_slice(&(4 + len as u32).to_be_bytes());
    for p in parts {
        out.extend_from_slice(p);
    }
}

/// Parse of `name` (empty: unnamed) for [`QUERY`], one parameter of unspecified type (as libpq).
fn parse(out: &mut Vec<u8>, name: &[u8]) {
    put(out, b'P', &[name, b"\0", QUERY, b"\0", &[0, 1, 0, 0, 0, 0]]);
}

/// Bind of statement `name` to the unnamed portal: one text parameter, text results (as libpq).
fn bind(out: &mut Vec<u8>, name: &[u8]) {
    let param: &[u8] = b"48213";
    put(
        out,
        b'B',
        &[
            b"\0",
            name,
            b"\0",
            &[0, 0, 0, 1],
            &(param.len() as u32).to_be_bytes(),
            param,
            &[0, 0],
        ],
    );
}

/// Describe portal, Execute (no row limit), Sync: the rest of a libpq extended query.
fn describe_execute_sync(out: &mut Vec<u8>) {
    put(out, b'D', &[b"P\0"]);
    put(out, b'E', &[b"\0", &[0, 0, 0, 0]]);
    put(out, b'S', &[]);
}

/// pgbench `-M extended` select-only, client side: Parse/Bind/Describe/Execute/Sync, unnamed.
fn client_extended() -> Vec<u8> {
    let mut out = Vec::new();
    parse(&mut out, b"");
    bind(&mut out, b"");
    describe_execute_sync(&mut out);
    out
}

/// pgbench `-M prepared` select-only after its first transaction: Bind/Describe/Execute/Sync.
fn client_prepared() -> Vec<u8> {
    let mut out = Vec::new();
    bind(&mut out, CLIENT_NAME);
    describe_execute_sync(&mut out);
    out
}

/// The server's RowDescription, DataRow, CommandComplete and ReadyForQuery for the query.
fn rows_and_ready(out: &mut Vec<u8>) {
    // One int4 column "abalance" of pgbench_accounts (attnum 3), text format.
    let mut field = b"abalance\0".to_vec();
    field.extend_from_slice(&16_397u32.to_be_bytes()); // table oid
    field.extend_from_slice(&3u16.to_be_bytes()); // column number
    field.extend_from_slice(&23u32.to_be_bytes()); // int4
    field.extend_from_slice(&4i16.to_be_bytes()); // type size
    field.extend_from_slice(&(-1i32).to_be_bytes()); // type modifier
    field.extend_from_slice(&0u16.to_be_bytes()); // text
    put(out, b'T', &[&[0, 1], &field]);
    put(out, b'D', &[&[0, 1], &4u32.to_be_bytes(), b"-512"]);
    put(out, b'C', &[b"SELECT 1\0"]);
    put(out, b'Z', &[b"I"]);
}

/// The server's answer to [`client_extended`] (or to a prepared Bind after an added Parse).
fn server_extended() -> Vec<u8> {
    let mut out = Vec::new();
    put(&mut out, b'1', &[]);
    put(&mut out, b'2', &[]);
    rows_and_ready(&mut out);
    out
}

/// The server's answer to [`client_prepared`] when it has the statement.
fn server_prepared() -> Vec<u8> {
    let mut out = Vec::new();
    put(&mut out, b'2', &[]);
    rows_and_ready(&mut out);
    out
}

fn count_messages(buf: &[u8]) -> u64 {
    let (mut pos, mut n) = (0, 0);
    while let Ok(Some((_, len))) = frame::header(&buf[pos..], MAX_LEN) {
        pos += frame::HEADER_LEN + len;
        n += 1;
    }
    assert_eq!(pos, buf.len(), "whole messages");
    n
}

/// What the relay holds of a client message in transaction mode (the tracker's `hold` with
/// statement rewriting on): Parse, Bind, Describe, Close and Query whole, the rest streamed.
fn hold_client(tag: u8, len: usize) -> usize {
    match tag {
        b'P' | b'B' | b'D' | b'C' | b'Q' | b'X' => len,
        _ => 0,
    }
}

/// What the relay holds of a server message (see `scan_server`); RowDescription and DataRow
/// are streamed.
fn hold_server(tag: u8, len: usize) -> usize {
    match matches!(tag, b'Z' | b'S' | b'E') || Tracker::held_from_server(tag) {
        true => len,
        false => 0,
    }
}

/// Scans `buf[..]` from `pos` until the scanner needs more bytes; returns the new position and
/// adds the messages seen to `messages` (tags folded in, so the result depends on them).
fn scan(
    scanner: &mut Scanner,
    buf: &[u8],
    mut pos: usize,
    hold: fn(u8, usize) -> usize,
    messages: &mut u64,
) -> usize {
    loop {
        match scanner.next(buf, pos, hold).expect("valid stream") {
            Item::End => return pos,
            Item::Body { to } => pos = to,
            Item::Message { tag, end, .. } => {
                *messages = messages.wrapping_mul(31).wrapping_add(tag as u64);
                pos = end;
            }
        }
    }
}

/// Scans `stream` as if it arrived `chunk` bytes at a time (one scan per read, as the relay).
fn scan_in_chunks(stream: &[u8], chunk: usize, hold: fn(u8, usize) -> usize) -> u64 {
    let mut scanner = Scanner::new(MAX_LEN);
    let (mut pos, mut messages) = (0, 0);
    let mut arrived = 0;
    while arrived < stream.len() {
        arrived = (arrived + chunk).min(stream.len());
        pos = scan(&mut scanner, &stream[..arrived], pos, hold, &mut messages);
    }
    assert!(pos == stream.len() && scanner.at_boundary());
    messages
}

fn frame_benches(c: &mut Criterion) {
    let mut group = c.benchmark_group("frame");
    for (side, stream, hold) in [
        (
            "client",
            client_extended(),
            hold_client as fn(u8, usize) -> usize,
        ),
        ("server", server_extended(), hold_server),
    ] {
        group.throughput(Throughput::Elements(count_messages(&stream)));
        group.bench_function(format!("header/{side}_txn"), |b| {
            b.iter(|| {
                let buf = black_box(&stream[..]);
                let (mut pos, mut acc) = (0usize, 0u64);
                while let Some((tag, len)) = frame::header(&buf[pos..], MAX_LEN).unwrap() {
                    acc = acc.wrapping_mul(31).wrapping_add(tag as u64);
                    pos += frame::HEADER_LEN + len;
                }
                acc
            })
        });
        group.bench_function(format!("scanner/{side}_txn"), |b| {
            b.iter(|| {
                let mut scanner = Scanner::new(MAX_LEN);
                let mut messages = 0;
                let pos = scan(&mut scanner, black_box(&stream), 0, hold, &mut messages);
                (pos, messages)
            })
        });
        for chunk in [1, 7] {
            group.bench_function(format!("scanner/{side}_txn_in_{chunk}_byte_reads"), |b| {
                b.iter(|| scan_in_chunks(black_box(&stream), black_box(chunk), hold))
            });
        }
    }
    group.finish();
}

/// One client session with one server: what the relay's [`Tracker`] borrows, and the bytes it
/// sends each way.
struct Session {
    registry: Registry,
    client: ClientStatements,
    server: ServerStatements,
    leftovers: Leftovers,
    scratch: Scratch,
    /// `max_prepared_statements` (0: no rewriting).
    max: usize,
    to_server: BytesMut,
    to_client: BytesMut,
}

impl Session {
    fn new(max: usize) -> Session {
        Session {
            registry: Registry::new(64 << 20),
            client: ClientStatements::with_limit(1000),
            server: ServerStatements::default(),
            leftovers: Leftovers::NONE,
            scratch: Scratch::default(),
            max,
            to_server: BytesMut::with_capacity(4096),
            to_client: BytesMut::with_capacity(4096),
        }
    }

    /// One transaction as the relay runs it: the client's bytes are scanned and each message
    /// handed to the tracker, then forwarded or replaced (into `to_server`); the server's
    /// answer (`server` is what it sends for what it was sent) is scanned the same way (into
    /// `to_client`), with the responses the proxy owes put in as they become due.
    /// Where the relay forwards from its read buffer in place (splicing replacements in), this
    /// copies into `to_server` / `to_client`: a few ns for these ~100-byte transactions.
    fn transaction(&mut self, client: &[u8], server: &[u8]) -> (usize, usize) {
        let Session {
            registry,
            client: client_statements,
            server: server_statements,
            leftovers,
            scratch,
            max,
            to_server,
            to_client,
        } = self;
        to_server.clear();
        to_client.clear();
        let mut tracker = Tracker::new(
            registry,
            client_statements,
            server_statements,
            Some(leftovers),
            *max,
            scratch,
        );
        let (status, mut pending) = (b'I', 0usize);
        let mut scanner = Scanner::new(MAX_LEN);
        let mut pos = 0;
        loop {
            match scanner.next(client, pos, |tag, len| tracker.hold(tag, len)) {
                Ok(Item::End) => break,
                Ok(Item::Body { to }) => {
                    to_server.extend_from_slice(&client[pos..to]);
                    pos = to;
                }
                Ok(Item::Message { tag, start, end }) => {
                    let msg = &client[start..end];
                    assert!(!tracker.must_wait(tag, msg, pending));
                    let answered = match tracker.on_client_message(tag, msg, status) {
                        ClientAction::Forward => {
                            to_server.extend_from_slice(msg);
                            true
                        }
                        ClientAction::Unanswered => {
                            to_server.extend_from_slice(msg);
                            false
                        }
                        ClientAction::Replace => {
                            to_server.extend_from_slice(tracker.out);
                            !tracker.out.is_empty()
                        }
                    };
                    if answered && matches!(tag, b'S' | b'Q' | b'F') {
                        pending += 1;
                    }
                    pos = end;
                }
                Err(e) => panic!("{e}"),
            }
        }
        tracker.take_due(to_client, status);
        let mut scanner = Scanner::new(MAX_LEN);
        let mut pos = 0;
        loop {
            match scanner.next(server, pos, hold_server) {
                Ok(Item::End) => break,
                Ok(Item::Body { to }) => {
                    to_client.extend_from_slice(&server[pos..to]);
                    pos = to;
                }
                Ok(Item::Message { tag, start, end }) => {
                    let msg = &server[start..end];
                    match tracker.on_server_message(tag, msg, &mut pending) {
                        ServerAction::Forward => to_client.extend_from_slice(msg),
                        ServerAction::Drop => {}
                        ServerAction::Replace => to_client.extend_from_slice(tracker.out),
                    }
                    if tag == b'Z' {
                        pending -= 1;
                    }
                    pos = end;
                    tracker.take_due(to_client, status);
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert!(
            tracker.is_idle() && pending == 0,
            "transaction not complete"
        );
        (to_server.len(), to_client.len())
    }
}

/// A session whose client has prepared [`CLIENT_NAME`] (on a server it no longer holds).
fn prepared_session() -> Session {
    let mut session = Session::new(MAX_STATEMENTS);
    let mut prepare = Vec::new();
    parse(&mut prepare, CLIENT_NAME);
    put(&mut prepare, b'S', &[]);
    let mut answer = Vec::new();
    put(&mut answer, b'1', &[]);
    put(&mut answer, b'Z', &[b"I"]);
    session.transaction(&prepare, &answer);
    session.server.clear();
    session
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn pipeline_benches(c: &mut Criterion) {
    let mut group = c.benchmark_group("pipeline");
    group.throughput(Throughput::Elements(1));
    let (client, server) = (client_extended(), server_extended());
    for (name, max) in [
        ("extended_unnamed_txn", MAX_STATEMENTS),
        ("extended_unnamed_txn_no_rewrite", 0),
    ] {
        let mut session = Session::new(max);
        let sent = session.transaction(&client, &server);
        assert_eq!(sent, (client.len(), server.len()), "{name}: passed through");
        group.bench_function(name, |b| {
            b.iter(|| session.transaction(black_box(&client), black_box(&server)))
        });
    }
    let mut query = Vec::new();
    put(&mut query, b'Q', &[SIMPLE_QUERY, b"\0"]);
    let mut answer = Vec::new();
    rows_and_ready(&mut answer);
    let mut session = Session::new(MAX_STATEMENTS);
    assert_eq!(
        session.transaction(&query, &answer),
        (query.len(), answer.len())
    );
    group.bench_function("simple_query_txn", |b| {
        b.iter(|| session.transaction(black_box(&query), black_box(&answer)))
    });
    group.finish();
}

fn prepared_benches(c: &mut Criterion) {
    let mut group = c.benchmark_group("prepared");
    group.throughput(Throughput::Elements(1));

    // The server has the statement: the Bind is renamed, nothing added.
    let (client, server) = (client_prepared(), server_prepared());
    let mut session = prepared_session();
    session.transaction(&client, &server_extended()); // Parse added, its '1' dropped
    let sent = session.transaction(&client, &server);
    assert!(contains(&session.to_server, b"__fg_") && !contains(&session.to_server, CLIENT_NAME));
    assert_eq!(sent.1, server.len(), "answers passed through");
    assert_eq!(session.server.len(), 1);
    group.bench_function("bind_hit_txn", |b| {
        b.iter(|| session.transaction(black_box(&client), black_box(&server)))
    });

    // A server that lacks it (the client's last one had it): Parse added before the Bind, its
    // ParseComplete swallowed.
    let server_with_parse = server_extended();
    let mut session = prepared_session();
    let sent = session.transaction(&client, &server_with_parse);
    assert!(session.to_server.starts_with(b"P") && sent.1 == server.len());
    group.bench_function("bind_miss_txn", |b| {
        b.iter(|| {
            session.server.clear();
            session.transaction(black_box(&client), black_box(&server_with_parse))
        })
    });

    // A client preparing a statement the registry and the server already have (every client of
    // a pgbench run after the first): recorded, answered by the proxy, only the Sync goes on.
    let mut prepare = Vec::new();
    parse(&mut prepare, CLIENT_NAME);
    put(&mut prepare, b'S', &[]);
    let mut ready = Vec::new();
    put(&mut ready, b'Z', &[b"I"]);
    let mut session = prepared_session();
    session.transaction(&client, &server_with_parse);
    session.client = ClientStatements::with_limit(1000);
    let sent = session.transaction(&prepare, &ready);
    assert_eq!(sent, (5, 11), "only the Sync sent; ParseComplete made up");
    group.bench_function("parse_named_known_txn", |b| {
        b.iter_batched_ref(
            || ClientStatements::with_limit(1000),
            |fresh| {
                // The client's names so far are swapped out, and dropped, unmeasured.
                std::mem::swap(&mut session.client, fresh);
                session.transaction(black_box(&prepare), black_box(&ready))
            },
            BatchSize::SmallInput,
        )
    });

    // The rewrite alone: one named Bind handed to a tracker, renamed into `out`.
    let mut one_bind = Vec::new();
    bind(&mut one_bind, CLIENT_NAME);
    let mut session = prepared_session();
    session.transaction(&client, &server_with_parse);
    group.bench_function("rewrite_bind", |b| {
        b.iter(|| {
            let s = &mut session;
            let mut tracker = Tracker::new(
                &s.registry,
                &mut s.client,
                &mut s.server,
                Some(&mut s.leftovers),
                s.max,
                &mut s.scratch,
            );
            let msg = black_box(&one_bind[..]);
            let action = tracker.on_client_message(b'B', msg, b'I');
            assert_eq!(action, ClientAction::Replace);
            black_box(&tracker.out[..]);
            tracker.out.len()
        })
    });
    group.finish();
}

fn sql_benches(c: &mut Criterion) {
    let mut group = c.benchmark_group("sql");
    let tpcb: [&[u8]; 7] = [
        b"BEGIN;",
        b"UPDATE pgbench_accounts SET abalance = abalance + -2345 WHERE aid = 512345;",
        b"SELECT abalance FROM pgbench_accounts WHERE aid = 512345;",
        b"UPDATE pgbench_tellers SET tbalance = tbalance + -2345 WHERE tid = 37;",
        b"UPDATE pgbench_branches SET bbalance = bbalance + -2345 WHERE bid = 4;",
        b"INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) \
          VALUES (37, 4, 512345, -2345, CURRENT_TIMESTAMP);",
        b"END;",
    ];
    let orm: &[u8] = b"SELECT \"users\".\"id\", \"users\".\"email\", \"users\".\"created_at\" \
        FROM \"users\" /* loaded by UserRepository */ WHERE \"users\".\"status\" = 'active' \
        AND \"users\".\"org_id\" = $1 ORDER BY \"users\".\"created_at\" DESC LIMIT 50";
    for text in tpcb.iter().chain([&orm]) {
        assert_eq!(
            sql::leftovers(text),
            Leftovers::NONE,
            "{}",
            String::from_utf8_lossy(text)
        );
    }
    assert_eq!(
        sql::leftovers(b"set search_path = app"),
        Leftovers::SETTINGS
    );
    group.throughput(Throughput::Elements(tpcb.len() as u64));
    group.bench_function("leftovers/tpcb_txn", |b| {
        b.iter(|| {
            let mut found = Leftovers::NONE;
            for text in &tpcb {
                found |= sql::leftovers(black_box(text));
            }
            found
        })
    });
    group.throughput(Throughput::Elements(1));
    group.bench_function("leftovers/orm_query", |b| {
        b.iter(|| sql::leftovers(black_box(orm)))
    });
    group.finish();
}

/// A PostgreSQL cluster and a proxy in front of it, started the first time the pool benchmark
/// runs (not at all when a filter leaves it out).
struct Upstream {
    runtime: tokio::runtime::Runtime,
    pool: Arc<floodgate::pool::ServerPool>,
    proxy: floodgate::Proxy,
    /// Stopped and deleted on drop.
    _cluster: floodgate::pgcluster::PgCluster,
}

fn start_upstream() -> Upstream {
    use floodgate::pgcluster::{ClusterOptions, HbaAuth, PgCluster};
    let cluster = PgCluster::start(ClusterOptions {
        auth: HbaAuth::Trust,
        ..Default::default()
    })
    .expect("starting PostgreSQL");
    cluster.create_user("app", "secret").expect("create user");
    cluster.create_database("app", "app").expect("create db");
    let toml = format!(
        "[floodgate]\nlisten = \"127.0.0.1:0\"\nauth_type = \"trust\"\npool_mode = \"transaction\"\n\
         default_pool_size = 2\n\n[[users]]\nname = \"app\"\npassword = \"secret\"\n\n\
         [databases.app]\nhost = \"{}\"\nport = {}\ndbname = \"app\"\npool_size = 2\n",
        cluster.host(),
        cluster.port()
    );
    let config = floodgate::config::Config::from_toml_str(&toml).expect("config");
    // One thread, as the proxy runs by default on this machine (`workers` = half the cores).
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (proxy, pool) = runtime.block_on(async {
        let proxy = floodgate::Proxy::start(config).await.expect("proxy");
        let pool = proxy.shared().pool("app", "app").expect("pool app/app");
        // The first checkout logs in; from then on the server is reused.
        let mut server = pool.checkout().await.expect("checkout");
        server.dirty = false;
        drop(server);
        (proxy, pool)
    });
    assert_eq!(pool.open_servers(), 1);
    Upstream {
        runtime,
        pool,
        proxy,
        _cluster: cluster,
    }
}

fn pool_benches(c: &mut Criterion) {
    if floodgate::pgcluster::PgCluster::bin_dir().is_err() {
        eprintln!("pool/checkout_return skipped: no PostgreSQL binaries");
        return;
    }
    let mut upstream: Option<Upstream> = None;
    let mut group = c.benchmark_group("pool");
    group.throughput(Throughput::Elements(1));
    group.bench_function("checkout_return", |b| {
        let up = upstream.get_or_insert_with(start_upstream);
        let pool = &up.pool;
        b.to_async(&up.runtime).iter(|| async {
            let mut server = pool.checkout().await.expect("checkout");
            // As the client does after a clean transaction; a dirty server would be closed.
            server.dirty = false;
            drop(black_box(server));
        })
    });
    group.finish();
    if let Some(up) = upstream {
        assert_eq!(
            up.pool.open_servers(),
            1,
            "every checkout reused one server"
        );
        up.runtime.block_on(up.proxy.shutdown());
    }
}

criterion_group!(
    benches,
    frame_benches,
    pipeline_benches,
    prepared_benches,
    sql_benches,
    pool_benches
);
criterion_main!(benches);
