//! Differential property test: the same randomly generated wire-protocol conversations are played
//! once directly against PostgreSQL and once through Floodgate, and every client must receive
//! the same messages both ways.
//!
//! A case is a pool size (1 or 2) and a list of turns taken by 2–3 clients, one client at a
//! time. A turn is a list of frontend messages (simple queries, COPY, Parse/Bind/Describe/
//! Execute/Close, Flush, Sync, FunctionCall, in any order, so errors and the skipping to Sync
//! that follows them happen all the time), always ending with Sync, sent in one write. With a
//! pool of 1–2 the clients take turns on the same server connections: anything one client
//! leaves on a server that another can see (a statement, a parameter, a transaction, an answer
//! still owed) shows up as a difference. After each case, the proxy must have every server back
//! in its pool.
//!
//! Compared: the type byte and body of every message, except BackendKeyData and ParameterStatus
//! (the proxy sends its own), and with ErrorResponse/NoticeResponse reduced to severity, SQLSTATE
//! and message (the proxy raises some errors itself, e.g. 42P05 for a re-Parse, through a DO
//! block whose position, context and source fields differ).
//!
//! What the generator leaves out, because no transaction pooler can make it behave as on one
//! connection (see the README): the unnamed statement used in a later batch than the one
//! that parsed it; SQL `PREPARE`, `LISTEN`, temporary objects, `WITH HOLD` cursors and
//! session-level `SET` of settings the proxy does not track (through the proxy they last until
//! the end of the transaction); anything that shows the backend itself (pids,
//! `pg_stat_activity`, `pg_prepared_statements`, timestamps). It also avoids statements that
//! could wait for a lock another client's open transaction holds (UPDATE, DELETE, DDL): turns
//! are sequential, so such a wait would never end.
//!
//! `PROPTEST_CASES` and `PROPTEST_RNG_SEED` (printed at the start) replay a run. The smallest
//! failing sequences found so far are kept below as fixed cases, each a test of its own.

mod common;

use std::cell::RefCell;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use floodgate::Proxy;
use floodgate::pgcluster::{HbaAuth, PgCluster};
use futures_util::FutureExt;
use proptest::prelude::*;
use proptest::sample::select;
use proptest::test_runner::{Config, RngSeed, TestCaseError, TestRunner};
use tokio::net::TcpStream;

/// Cases per run when `PROPTEST_CASES` is not set: 15–25 s in a debug build on 2 cores (a case
/// takes 50–100 ms, most of it logins and PostgreSQL's own work).
const DEFAULT_CASES: u32 = 256;

/// How long a client waits for the answer to one round. Every answer takes milliseconds; a
/// client that waits for a server nobody gives back gets 53300 after the proxy's
/// `query_wait_timeout` (3 s) first, which is a clearer failure than this timeout.
const ROUND_TIMEOUT: Duration = Duration::from_secs(20);

/// The proxies' `query_wait_timeout`. No client ever has to wait for a server here (turns are
/// sequential and the schedule makes room, see [`reference_run`]), so a wait means a server was
/// not given back; short, so that a failing case (and each of proptest's attempts to shrink it)
/// fails in seconds.
const QUERY_WAIT_TIMEOUT: &str = "3s";

// ---------------------------------------------------------------------------------------------
// What clients send.
// ---------------------------------------------------------------------------------------------

/// Simple queries. The first ones are the simplest: proptest shrinks towards them.
const QUERIES: &[&str] = &[
    "SELECT 1",
    "SELECT a, b FROM t ORDER BY a, b",
    "SELECT 1/0",
    "SELEC 1",
    "BEGIN",
    "COMMIT",
    "ROLLBACK",
    "INSERT INTO t VALUES (1, 'x')",
    "SELECT count(*) FROM t",
    "SELECT 1; SELECT 2",
    "SELECT 1; SELECT 1/0; SELECT 3",
    "SAVEPOINT sp",
    "ROLLBACK TO SAVEPOINT sp",
    "SET LOCAL TimeZone = 'Asia/Tokyo'",
    "SET TimeZone = 'Europe/Paris'",
    "SHOW TimeZone",
    "SELECT TIMESTAMPTZ '2024-01-31 12:00:00+00'::text",
    "SET DateStyle = 'SQL, DMY'",
    "SELECT DATE '2024-01-31'::text",
    "SET application_name = 'differential'",
    "SHOW application_name",
    "COPY t TO STDOUT",
    "DEALLOCATE s1",
    "DEALLOCATE ALL",
    "DISCARD ALL",
];

/// SQL of Parse messages.
const PARSE_SQL: &[&str] = &[
    "SELECT 1",
    "SELECT $1::int + 1",
    "INSERT INTO t VALUES ($1::int, 'p')",
    "SELECT a, b FROM t ORDER BY a, b",
    "SELECT 1/0",
    "SELEC 1",
    "COPY t TO STDOUT",
    "BEGIN",
    "COMMIT",
    "SHOW TimeZone",
];

const STATEMENTS: &[&str] = &["", "s1", "s2"];
const PORTALS: &[&str] = &["", "p1"];
/// Text parameter values: `x` is not an integer (22P02 where one is expected).
const VALUES: &[&str] = &["1", "41", "x"];

/// OID of `int4pl(int4, int4)`, for FunctionCall.
const INT4PL: i32 = 177;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Statement,
    Portal,
}

impl Kind {
    fn byte(self) -> u8 {
        match self {
            Kind::Statement => b'S',
            Kind::Portal => b'P',
        }
    }
}

/// One frontend message, or a COPY FROM STDIN with the data that must follow it.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Front {
    Query(&'static str),
    /// `COPY t FROM STDIN`, one row, then CopyDone (or CopyFail), with a Sync in between (which
    /// the server ignores during COPY, and obeys when the COPY did not start).
    CopyIn {
        fail: bool,
        sync_inside: bool,
    },
    /// `COPY nosuch FROM STDIN` fails at once: the data and CopyDone that follow are ignored.
    CopyInNoTable,
    /// The extended-protocol COPY FROM STDIN: Parse, Bind and Execute of the unnamed statement,
    /// one row, CopyDone (or CopyFail).
    ExtCopyIn {
        fail: bool,
    },
    Parse {
        name: &'static str,
        sql: &'static str,
        types: Vec<u32>,
    },
    Bind {
        portal: &'static str,
        statement: &'static str,
        params: Vec<Option<&'static str>>,
    },
    Describe {
        kind: Kind,
        name: &'static str,
    },
    Execute {
        portal: &'static str,
        max_rows: i32,
    },
    Close {
        kind: Kind,
        name: &'static str,
    },
    /// `int4pl(20, 22)`.
    FunctionCall,
    Flush,
    Sync,
}

/// A NUL-terminated string.
fn cstr(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

const COPY_ROW: &[u8] = b"7\tcopied\n";

fn copy_end(out: &mut Vec<u8>, fail: bool) {
    if fail {
        out.extend(message(b'f', &cstr("client changed its mind")));
    } else {
        out.extend(message(b'c', &[]));
    }
}

impl Front {
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Front::Query(sql) => out.extend(query_message(sql)),
            Front::CopyIn { fail, sync_inside } => {
                out.extend(query_message("COPY t FROM STDIN"));
                out.extend(message(b'd', COPY_ROW));
                if *sync_inside {
                    out.extend(message(b'S', &[]));
                }
                copy_end(out, *fail);
            }
            Front::CopyInNoTable => {
                out.extend(query_message("COPY nosuch FROM STDIN"));
                out.extend(message(b'd', COPY_ROW));
                copy_end(out, false);
            }
            Front::ExtCopyIn { fail } => {
                Front::Parse {
                    name: "",
                    sql: "COPY t FROM STDIN",
                    types: vec![],
                }
                .encode(out);
                Front::Bind {
                    portal: "",
                    statement: "",
                    params: vec![],
                }
                .encode(out);
                Front::Execute {
                    portal: "",
                    max_rows: 0,
                }
                .encode(out);
                out.extend(message(b'd', COPY_ROW));
                copy_end(out, *fail);
            }
            Front::Parse { name, sql, types } => {
                let mut body = cstr(name);
                body.extend(cstr(sql));
                body.extend((types.len() as i16).to_be_bytes());
                for t in types {
                    body.extend(t.to_be_bytes());
                }
                out.extend(message(b'P', &body));
            }
            Front::Bind {
                portal,
                statement,
                params,
            } => {
                let mut body = cstr(portal);
                body.extend(cstr(statement));
                body.extend(0i16.to_be_bytes()); // parameter formats: all text
                body.extend((params.len() as i16).to_be_bytes());
                for p in params {
                    match p {
                        Some(v) => {
                            body.extend((v.len() as i32).to_be_bytes());
                            body.extend(v.as_bytes());
                        }
                        None => body.extend((-1i32).to_be_bytes()),
                    }
                }
                body.extend(0i16.to_be_bytes()); // result formats: all text
                out.extend(message(b'B', &body));
            }
            Front::Describe { kind, name } => {
                let mut body = vec![kind.byte()];
                body.extend(cstr(name));
                out.extend(message(b'D', &body));
            }
            Front::Execute { portal, max_rows } => {
                let mut body = cstr(portal);
                body.extend(max_rows.to_be_bytes());
                out.extend(message(b'E', &body));
            }
            Front::Close { kind, name } => {
                let mut body = vec![kind.byte()];
                body.extend(cstr(name));
                out.extend(message(b'C', &body));
            }
            Front::FunctionCall => {
                let mut body = INT4PL.to_be_bytes().to_vec();
                body.extend(1i16.to_be_bytes()); // one argument format...
                body.extend(0i16.to_be_bytes()); // ...text, for all
                body.extend(2i16.to_be_bytes());
                for arg in [b"20", b"22"] {
                    body.extend((arg.len() as i32).to_be_bytes());
                    body.extend(arg);
                }
                body.extend(0i16.to_be_bytes()); // result: text
                out.extend(message(b'F', &body));
            }
            Front::Flush => out.extend(message(b'H', &[])),
            Front::Sync => out.extend(message(b'S', &[])),
        }
    }

    /// A short human-readable form for failure reports.
    fn render(&self) -> String {
        let kind = |k: &Kind| match k {
            Kind::Statement => "S",
            Kind::Portal => "P",
        };
        let end = |fail: &bool| if *fail { "CopyFail" } else { "CopyDone" };
        match self {
            Front::Query(sql) => format!("Query {sql:?}"),
            Front::CopyIn { fail, sync_inside } => format!(
                "Query \"COPY t FROM STDIN\", CopyData{}, {}",
                if *sync_inside { ", Sync" } else { "" },
                end(fail)
            ),
            Front::CopyInNoTable => "Query \"COPY nosuch FROM STDIN\", CopyData, CopyDone".into(),
            Front::ExtCopyIn { fail } => format!(
                "Parse \"\" \"COPY t FROM STDIN\", Bind \"\" \"\", Execute \"\", CopyData, {}",
                end(fail)
            ),
            Front::Parse { name, sql, types } => format!("Parse {name:?} {sql:?} {types:?}"),
            Front::Bind {
                portal,
                statement,
                params,
            } => format!("Bind {portal:?} {statement:?} {params:?}"),
            Front::Describe { kind: k, name } => format!("Describe {} {name:?}", kind(k)),
            Front::Execute { portal, max_rows } => format!("Execute {portal:?} {max_rows}"),
            Front::Close { kind: k, name } => format!("Close {} {name:?}", kind(k)),
            Front::FunctionCall => "FunctionCall int4pl(20, 22)".into(),
            Front::Flush => "Flush".into(),
            Front::Sync => "Sync".into(),
        }
    }
}

/// One client's turn: its messages, ending with Sync.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Turn {
    client: usize,
    messages: Vec<Front>,
}

impl Turn {
    /// Makes a turn of `messages`: adds the final Sync, and points Bind and Describe of the
    /// unnamed statement at `s1` unless a Parse of the unnamed statement precedes them in the
    /// same batch. (The unnamed statement lasts until the next Parse or simple Query on the
    /// connection, but a transaction pooler passes it through: in a later batch the client may
    /// be on another server, or another client may have replaced it. Drivers never rely on it
    /// across a Sync.)
    fn new(client: usize, messages: impl IntoIterator<Item = Front>) -> Turn {
        let mut out = Vec::new();
        let mut unnamed = false;
        for m in messages {
            let m = match m {
                Front::Bind {
                    portal,
                    statement: "",
                    params,
                } if !unnamed => Front::Bind {
                    portal,
                    statement: "s1",
                    params,
                },
                Front::Describe {
                    kind: Kind::Statement,
                    name: "",
                } if !unnamed => Front::Describe {
                    kind: Kind::Statement,
                    name: "s1",
                },
                m => m,
            };
            match &m {
                Front::Parse { name: "", .. } => unnamed = true,
                // A Sync ends the batch (CopyIn may carry one, and its Query drops the unnamed
                // statement anyway); the unnamed statement of ExtCopyIn is a COPY FROM STDIN,
                // which must not be executed again without data following it.
                Front::Sync | Front::CopyIn { .. } | Front::ExtCopyIn { .. } => unnamed = false,
                _ => {}
            }
            out.push(m);
        }
        if out.last() != Some(&Front::Sync) {
            out.push(Front::Sync);
        }
        Turn {
            client,
            messages: out,
        }
    }
}

/// A pool size and the turns the clients take.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Case {
    pool_size: usize,
    turns: Vec<Turn>,
}

impl Case {
    /// Clients taking part: at least two, so that servers change hands.
    fn clients(&self) -> usize {
        self.turns
            .iter()
            .map(|t| t.client + 1)
            .max()
            .unwrap_or(0)
            .max(2)
    }
}

// ---------------------------------------------------------------------------------------------
// Strategies.
// ---------------------------------------------------------------------------------------------

fn any_types() -> impl Strategy<Value = Vec<u32>> {
    // No types (the server infers them) or int4 for the first parameter.
    prop_oneof![3 => Just(vec![]), 1 => Just(vec![23u32])]
}

fn any_params() -> impl Strategy<Value = Vec<Option<&'static str>>> {
    prop::collection::vec(prop::option::weighted(0.85, select(VALUES)), 0..=2)
}

fn any_parse() -> impl Strategy<Value = Front> {
    (select(STATEMENTS), select(PARSE_SQL), any_types())
        .prop_map(|(name, sql, types)| Front::Parse { name, sql, types })
}

fn any_bind() -> impl Strategy<Value = Front> {
    (select(PORTALS), select(STATEMENTS), any_params()).prop_map(|(portal, statement, params)| {
        Front::Bind {
            portal,
            statement,
            params,
        }
    })
}

fn any_execute() -> impl Strategy<Value = Front> {
    (select(PORTALS), select(&[0, 1][..]))
        .prop_map(|(portal, max_rows)| Front::Execute { portal, max_rows })
}

/// A kind and a name of that kind.
fn any_target() -> impl Strategy<Value = (Kind, &'static str)> {
    prop_oneof![
        select(STATEMENTS).prop_map(|n| (Kind::Statement, n)),
        select(PORTALS).prop_map(|n| (Kind::Portal, n)),
    ]
}

/// Any single message, in any place.
fn any_message() -> BoxedStrategy<Front> {
    prop_oneof![
        4 => select(QUERIES).prop_map(Front::Query),
        1 => (any::<bool>(), any::<bool>())
            .prop_map(|(fail, sync_inside)| Front::CopyIn { fail, sync_inside }),
        1 => Just(Front::CopyInNoTable),
        1 => any::<bool>().prop_map(|fail| Front::ExtCopyIn { fail }),
        3 => any_parse(),
        3 => any_bind(),
        2 => any_target().prop_map(|(kind, name)| Front::Describe { kind, name }),
        2 => any_execute(),
        2 => any_target().prop_map(|(kind, name)| Front::Close { kind, name }),
        1 => Just(Front::FunctionCall),
        1 => Just(Front::Flush),
        2 => Just(Front::Sync),
    ]
    .boxed()
}

/// A few messages: a single one, or what drivers send together (prepare; bind and execute;
/// the unnamed parse-bind-execute).
fn any_snippet() -> BoxedStrategy<Vec<Front>> {
    prop_oneof![
        4 => any_message().prop_map(|m| vec![m]),
        2 => (select(STATEMENTS), select(PARSE_SQL), any_types(), any::<bool>()).prop_map(
            |(name, sql, types, describe)| {
                let mut v = vec![Front::Parse { name, sql, types }];
                if describe {
                    v.push(Front::Describe { kind: Kind::Statement, name });
                }
                v.push(Front::Sync);
                v
            }
        ),
        3 => (any_bind(), any_execute(), any::<bool>()).prop_map(|(bind, execute, describe)| {
            let Front::Bind { portal, .. } = bind else { unreachable!() };
            let Front::Execute { max_rows, .. } = execute else { unreachable!() };
            let mut v = vec![bind];
            if describe {
                v.push(Front::Describe { kind: Kind::Portal, name: portal });
            }
            v.push(Front::Execute { portal, max_rows });
            v.push(Front::Sync);
            v
        }),
        2 => (select(PARSE_SQL), any_types(), any_params()).prop_map(|(sql, types, params)| {
            vec![
                Front::Parse { name: "", sql, types },
                Front::Bind { portal: "", statement: "", params },
                Front::Describe { kind: Kind::Portal, name: "" },
                Front::Execute { portal: "", max_rows: 0 },
                Front::Sync,
            ]
        }),
    ]
    .boxed()
}

fn any_turn() -> impl Strategy<Value = Turn> {
    (0..3usize, prop::collection::vec(any_snippet(), 1..=4))
        .prop_map(|(client, snippets)| Turn::new(client, snippets.into_iter().flatten()))
}

fn any_case() -> impl Strategy<Value = Case> {
    (
        select(&[1usize, 2][..]),
        prop::collection::vec(any_turn(), 1..=12),
    )
        .prop_map(|(pool_size, turns)| Case { pool_size, turns })
}

// ---------------------------------------------------------------------------------------------
// What clients receive.
// ---------------------------------------------------------------------------------------------

/// A backend message as compared, or how the stream ended.
#[derive(Clone, PartialEq, Eq)]
enum Reply {
    /// Type byte and body (ErrorResponse and NoticeResponse reduced to fields S, V, C, M).
    Msg(u8, Vec<u8>),
    Closed,
    TimedOut,
}

/// The fields of ErrorResponse and NoticeResponse that are compared.
const COMPARED_FIELDS: [char; 4] = ['S', 'V', 'C', 'M'];

fn normalize(tag: u8, body: Vec<u8>) -> Vec<u8> {
    if !matches!(tag, b'E' | b'N') {
        return body;
    }
    let fields = error_fields(&body);
    let mut out = Vec::new();
    for code in COMPARED_FIELDS {
        if let Some(value) = fields.get(&code) {
            out.push(code as u8);
            out.extend(cstr(value));
        }
    }
    out.push(0);
    out
}

/// Reads a big-endian length-prefixed or NUL-terminated piece of a backend message body.
struct Cursor<'a>(&'a [u8]);

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }
    fn i16(&mut self) -> Option<i16> {
        Some(i16::from_be_bytes(self.take(2)?.try_into().ok()?))
    }
    fn i32(&mut self) -> Option<i32> {
        Some(i32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }
    fn cstr(&mut self) -> Option<String> {
        let end = self.0.iter().position(|&b| b == 0)?;
        let s = String::from_utf8_lossy(&self.0[..end]).into_owned();
        self.0 = &self.0[end + 1..];
        Some(s)
    }
    /// A length-prefixed value (-1: NULL).
    fn value(&mut self) -> Option<String> {
        match self.i32()? {
            -1 => Some("NULL".into()),
            n => Some(format!(
                "{:?}",
                String::from_utf8_lossy(self.take(usize::try_from(n).ok()?)?)
            )),
        }
    }
}

impl Reply {
    /// A short human-readable form: the type and a decoding of the body.
    fn render(&self) -> String {
        let (tag, body) = match self {
            Reply::Msg(tag, body) => (*tag, body),
            Reply::Closed => return "<connection closed>".into(),
            Reply::TimedOut => return format!("<no answer within {ROUND_TIMEOUT:?}>"),
        };
        let mut c = Cursor(body);
        let detail = match tag {
            b'1' => Some("ParseComplete".to_string()),
            b'2' => Some("BindComplete".into()),
            b'3' => Some("CloseComplete".into()),
            b'n' => Some("NoData".into()),
            b's' => Some("PortalSuspended".into()),
            b'I' => Some("EmptyQueryResponse".into()),
            b'c' => Some("CopyDone".into()),
            b'G' => Some("CopyInResponse".into()),
            b'H' => Some("CopyOutResponse".into()),
            b'd' => Some(format!("CopyData {:?}", String::from_utf8_lossy(body))),
            b'C' => c.cstr().map(|t| format!("CommandComplete {t:?}")),
            b'Z' => body
                .first()
                .map(|s| format!("ReadyForQuery {}", *s as char)),
            b'E' | b'N' => {
                let f = error_fields(body);
                let get = |k| f.get(&k).map(String::as_str).unwrap_or("?");
                let name = if tag == b'E' {
                    "ErrorResponse"
                } else {
                    "NoticeResponse"
                };
                Some(format!("{name} {} {} {:?}", get('S'), get('C'), get('M')))
            }
            b'D' => (|| {
                let n = c.i16()?;
                let values: Option<Vec<String>> = (0..n).map(|_| c.value()).collect();
                Some(format!("DataRow [{}]", values?.join(", ")))
            })(),
            b'T' => (|| {
                let n = c.i16()?;
                let mut names = Vec::new();
                for _ in 0..n {
                    names.push(c.cstr()?);
                    c.take(18)?; // table, column, type, size, modifier, format
                }
                Some(format!("RowDescription [{}]", names.join(", ")))
            })(),
            b't' => (|| {
                let n = c.i16()?;
                let oids: Option<Vec<i32>> = (0..n).map(|_| c.i32()).collect();
                Some(format!("ParameterDescription {:?}", oids?))
            })(),
            b'V' => c.value().map(|v| format!("FunctionCallResponse {v}")),
            _ => None,
        };
        detail.unwrap_or_else(|| format!("'{}' {:02x?}", tag as char, body))
    }
}

fn render_all(replies: &[Reply]) -> String {
    replies
        .iter()
        .map(|r| format!("      {}\n", r.render()))
        .collect()
}

/// Reads backend messages until `done` says the answer is complete (or the stream closes, or
/// [`ROUND_TIMEOUT`] passes), dropping BackendKeyData and ParameterStatus.
async fn read_replies(stream: &mut TcpStream, done: fn(&[Reply]) -> bool) -> Vec<Reply> {
    let mut got = Vec::new();
    let read = async {
        loop {
            match read_message(stream).await {
                Incoming::Closed => {
                    got.push(Reply::Closed);
                    return;
                }
                Incoming::Message(b'K' | b'S', _) => {}
                Incoming::Message(tag, body) => {
                    got.push(Reply::Msg(tag, normalize(tag, body)));
                    if done(&got) {
                        return;
                    }
                }
            }
        }
    };
    if tokio::time::timeout(ROUND_TIMEOUT, read).await.is_err() {
        got.push(Reply::TimedOut);
    }
    got
}

/// The end of a round: the marker's EmptyQueryResponse and its ReadyForQuery.
fn marker_answered(got: &[Reply]) -> bool {
    matches!(got, [.., Reply::Msg(b'I', _), Reply::Msg(b'Z', _)])
}

fn ready(got: &[Reply]) -> bool {
    matches!(got.last(), Some(Reply::Msg(b'Z', _)))
}

/// Transaction status of the last ReadyForQuery.
fn status(got: &[Reply]) -> Option<u8> {
    got.iter().rev().find_map(|r| match r {
        Reply::Msg(b'Z', body) => body.first().copied(),
        _ => None,
    })
}

// ---------------------------------------------------------------------------------------------
// Playing a case.
// ---------------------------------------------------------------------------------------------

/// Why a round was played.
#[derive(Clone, Copy, Debug)]
enum Why {
    /// Turn number n of the case.
    Turn(usize),
    /// The schedule ends this client's transaction so the next turn finds a free server.
    MakeRoom,
    /// After the last turn: anything still owed to the client shows up here.
    Last,
}

/// What one client sends in one write, then reads until the end-of-round marker is answered.
///
/// The marker is an empty simple Query: its answer (EmptyQueryResponse, ReadyForQuery) comes in
/// every state, after an error, inside a failed transaction, after the batch's Sync ended the
/// skipping, and it changes nothing (no transaction ends or fails because of it). No generated
/// message produces an EmptyQueryResponse itself, so the end of the answer is unambiguous.
/// Transactions may stay open across turns; [`reference_run`] closes one with `COMMIT` only
/// when the next client would otherwise find no free server in the pool.
#[derive(Clone, Debug)]
struct Round {
    client: usize,
    why: Why,
    sent: Vec<String>,
    bytes: Vec<u8>,
}

impl Round {
    fn new(client: usize, why: Why, messages: &[Front]) -> Round {
        let mut bytes = Vec::new();
        for m in messages {
            m.encode(&mut bytes);
        }
        bytes.extend(query_message(""));
        let mut sent: Vec<String> = messages.iter().map(Front::render).collect();
        sent.push("Query \"\" (end of round)".into());
        Round {
            client,
            why,
            sent,
            bytes,
        }
    }
}

/// Sends a round and reads its answer.
async fn play(stream: &mut TcpStream, round: &Round) -> Vec<Reply> {
    send_raw(stream, &round.bytes).await;
    read_replies(stream, marker_answered).await
}

async fn terminate(mut streams: Vec<TcpStream>) {
    for s in &mut streams {
        send_raw(s, &message(b'X', &[])).await;
    }
}

/// The cluster and one proxy per pool size in front of it.
struct Bench {
    cluster: Arc<PgCluster>,
    /// Indexed by pool size - 1; replaced after a failing case (see [`Bench::replace_proxy`]).
    proxies: RefCell<Vec<Option<Proxy>>>,
}

impl Bench {
    const POOL_SIZES: [usize; 2] = [1, 2];

    /// A trust cluster (raw clients log in to it directly as `app`) with table `t`, and the
    /// proxies.
    async fn start() -> Bench {
        let cluster = start_cluster(HbaAuth::Trust, 100).await;
        cluster_sql(
            &cluster,
            "app",
            "CREATE TABLE t (a int, b text); ALTER TABLE t OWNER TO app",
        )
        .await;
        let mut proxies = Vec::new();
        for size in Bench::POOL_SIZES {
            proxies.push(Some(start_test_proxy(&cluster, size).await));
        }
        Bench {
            cluster,
            proxies: RefCell::new(proxies),
        }
    }

    fn upstream(&self) -> SocketAddr {
        format!("{}:{}", self.cluster.host(), self.cluster.port())
            .parse()
            .unwrap()
    }

    fn proxy_addr(&self, pool_size: usize) -> SocketAddr {
        let proxies = self.proxies.borrow();
        let proxy = proxies[pool_size - 1].as_ref().expect("proxy running");
        proxy.local_addr()
    }

    /// A fresh proxy for `pool_size`: after a failure the old one may hold a server for ever,
    /// which would make every later case (and every attempt to shrink the failing one) fail too.
    async fn replace_proxy(&self, pool_size: usize) {
        let old = self.proxies.borrow_mut()[pool_size - 1].take();
        if let Some(old) = old {
            within("stopping a proxy", old.shutdown()).await;
        }
        let new = start_test_proxy(&self.cluster, pool_size).await;
        self.proxies.borrow_mut()[pool_size - 1] = Some(new);
    }

    async fn shutdown(self) {
        for proxy in self.proxies.into_inner().into_iter().flatten() {
            within("stopping a proxy", proxy.shutdown()).await;
        }
    }

    /// Empties table `t`, so both runs of a case start from the same data. `lock_timeout`: a
    /// transaction left open on a server would make TRUNCATE wait for ever.
    async fn reset_table(&self) -> Result<(), String> {
        let mut admin = raw_login_trust(self.upstream()).await;
        send_raw(
            &mut admin,
            &query_message("SET lock_timeout = '10s'; TRUNCATE t"),
        )
        .await;
        let got = read_replies(&mut admin, ready).await;
        terminate(vec![admin]).await;
        match got.iter().any(|r| matches!(r, Reply::Msg(b'E', _))) {
            false => Ok(()),
            true => Err(format!(
                "TRUNCATE t failed (a transaction left open?):\n{}",
                render_all(&got)
            )),
        }
    }
}

/// A trust proxy in transaction mode with a pool of `pool_size`.
async fn start_test_proxy(cluster: &PgCluster, pool_size: usize) -> Proxy {
    let opts = ProxyOpts {
        auth_type: "trust",
        pool_mode: "transaction",
        pool_size,
        extra: vec![
            format!("query_wait_timeout = \"{QUERY_WAIT_TIMEOUT}\""),
            "shutdown_timeout = \"2s\"".into(),
        ],
        ..ProxyOpts::default()
    };
    start_proxy(&proxy_toml(cluster, &opts)).await
}

/// Plays `case` directly against PostgreSQL and returns every round with its answer.
///
/// The schedule: the turns in order, then an empty round for each client (anything still owed
/// to it shows up there). Before each round, while the clients other than the one about to
/// play hold as many open transactions as the pool has servers, the first of them sends
/// `COMMIT` (a round of its own). Without that the proxy would rightly make the client
/// wait, while PostgreSQL would answer at once. Decided from PostgreSQL's answers and replayed
/// as is through the proxy (where, until a difference, the statuses are the same).
async fn reference_run(bench: &Bench, case: &Case) -> Vec<(Round, Vec<Reply>)> {
    if let Err(e) = bench.reset_table().await {
        panic!("before the reference run: {e}");
    }
    let n = case.clients();
    let mut streams = Vec::new();
    for _ in 0..n {
        streams.push(raw_login_trust(bench.upstream()).await);
    }
    let mut open = vec![false; n];
    let mut rounds = Vec::new();
    let mut record = |round: Round, got: Vec<Reply>, open: &mut [bool]| {
        let Some(status) = status(&got).filter(|_| marker_answered(&got)) else {
            panic!(
                "PostgreSQL did not answer a round as the test expects (a bug in the test):\n\
                 client {} sent {:?}\n{}",
                round.client,
                round.sent,
                render_all(&got)
            );
        };
        open[round.client] = status != b'I';
        rounds.push((round, got));
    };
    let turns = case.turns.iter().enumerate();
    let last = (0..n).map(|c| Round::new(c, Why::Last, &[]));
    let planned = turns
        .map(|(i, turn)| Round::new(turn.client, Why::Turn(i), &turn.messages))
        .chain(last);
    for round in planned {
        loop {
            let holding: Vec<usize> = (0..n).filter(|&c| c != round.client && open[c]).collect();
            if holding.len() < case.pool_size {
                break;
            }
            let commit = Round::new(holding[0], Why::MakeRoom, &[Front::Query("COMMIT")]);
            let got = play(&mut streams[commit.client], &commit).await;
            record(commit, got, &mut open);
        }
        let got = play(&mut streams[round.client], &round).await;
        record(round, got, &mut open);
    }
    terminate(streams).await;
    rounds
}

/// Replays the rounds through the proxy; `Err` describes the first difference.
async fn proxied_run(
    addr: SocketAddr,
    case: &Case,
    reference: &[(Round, Vec<Reply>)],
) -> Result<(), String> {
    let mut streams = Vec::new();
    for _ in 0..case.clients() {
        streams.push(raw_login_trust(addr).await);
    }
    for (k, (round, expected)) in reference.iter().enumerate() {
        let got = play(&mut streams[round.client], round).await;
        if got != *expected {
            return Err(report(case, &reference[..k], round, expected, Some(&got)));
        }
    }
    terminate(streams).await;
    Ok(())
}

/// Checks that every server is back in the pool: `pool_size` fresh clients each open a
/// transaction and hold it at the same time, then roll back.
async fn pool_check(addr: SocketAddr, pool_size: usize) -> Result<(), String> {
    let mut holders = Vec::new();
    for k in 0..pool_size {
        let mut s = raw_login_trust(addr).await;
        send_raw(&mut s, &query_message("BEGIN; SELECT 1")).await;
        let got = read_replies(&mut s, ready).await;
        let has_row = got.iter().any(|r| matches!(r, Reply::Msg(b'D', _)));
        if !has_row || status(&got) != Some(b'T') {
            return Err(format!(
                "after the case, fresh client {} of {pool_size} could not hold a server while \
                 the others held theirs (a server was not back in the pool): `BEGIN; SELECT 1` \
                 answered\n{}",
                k + 1,
                render_all(&got)
            ));
        }
        holders.push(s);
    }
    for s in &mut holders {
        send_raw(s, &query_message("ROLLBACK")).await;
        let got = read_replies(s, ready).await;
        if status(&got) != Some(b'I') {
            return Err(format!(
                "pool check: ROLLBACK answered\n{}",
                render_all(&got)
            ));
        }
    }
    terminate(holders).await;
    Ok(())
}

/// A readable account of a case: every round played, with its answer, up to `failed`, where
/// PostgreSQL's and Floodgate's answers are both shown (`got`: `None` when the rounds all
/// matched and something else failed).
fn report(
    case: &Case,
    matched: &[(Round, Vec<Reply>)],
    failed: &Round,
    expected: &[Reply],
    got: Option<&[Reply]>,
) -> String {
    let mut out = format!(
        "pool_size = {}, {} clients; rounds played (each ends with an empty Query as marker):\n",
        case.pool_size,
        case.clients()
    );
    let head = |out: &mut String, r: &Round| {
        let why = match r.why {
            Why::Turn(i) => format!("turn {i}"),
            Why::MakeRoom => "ends its transaction so the next turn finds a server".into(),
            Why::Last => "after the last turn".into(),
        };
        let _ = writeln!(out, "  client {} ({why}) sent:", r.client);
        for m in &r.sent {
            let _ = writeln!(out, "      {m}");
        }
    };
    for (round, answer) in matched {
        head(&mut out, round);
        let _ = writeln!(out, "    both answered:\n{}", render_all(answer));
    }
    head(&mut out, failed);
    match got {
        Some(got) => {
            let same = expected.iter().zip(got).take_while(|(a, b)| a == b).count();
            let _ = writeln!(
                out,
                "    PostgreSQL answered:\n{}    Floodgate answered (first difference at \
                 message {}):\n{}",
                render_all(expected),
                same + 1,
                render_all(got)
            );
        }
        None => {
            let _ = writeln!(out, "    both answered:\n{}", render_all(expected));
        }
    }
    out
}

/// Plays `case` both ways and checks the pool afterwards; `Err` is a report for a human.
async fn check_case(bench: &Bench, case: &Case) -> Result<(), String> {
    let reference = reference_run(bench, case).await;
    bench.reset_table().await?;
    let addr = bench.proxy_addr(case.pool_size);
    proxied_run(addr, case, &reference).await?;
    if let Err(e) = pool_check(addr, case.pool_size).await {
        let (last, matched) = reference.split_last().expect("at least one round");
        return Err(format!(
            "{e}\n\nThe case:\n{}",
            report(case, matched, &last.0, &last.1, None)
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The property.
// ---------------------------------------------------------------------------------------------

/// Random cases (see the module comment). Runs on its own multi-thread runtime: proptest's
/// runner calls a synchronous closure, which blocks on each case while the proxies run on the
/// runtime's workers.
#[test]
fn clients_get_what_postgres_sends() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let bench = rt.block_on(Bench::start());

    let defaults = Config::default();
    let seed = match defaults.rng_seed {
        RngSeed::Fixed(seed) => seed,
        RngSeed::Random => rand_seed(),
    };
    let cases = match std::env::var("PROPTEST_CASES") {
        Ok(_) => defaults.cases,
        Err(_) => DEFAULT_CASES,
    };
    let config = Config {
        cases,
        rng_seed: RngSeed::Fixed(seed),
        // Nothing written into the source tree: a failure prints its case and seed.
        failure_persistence: None,
        // A failure that makes a client wait for a server costs seconds per attempt.
        max_shrink_time: match defaults.max_shrink_time {
            0 => 180_000,
            ms => ms,
        },
        ..defaults
    };
    eprintln!("differential: {cases} cases, PROPTEST_RNG_SEED={seed}");
    let mut runner = TestRunner::new(config);
    let result = runner.run(&any_case(), |case| {
        rt.block_on(async {
            let outcome = AssertUnwindSafe(check_case(&bench, &case))
                .catch_unwind()
                .await;
            let failure = match outcome {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(report)) => report,
                Err(panic) => panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "the case panicked".into()),
            };
            bench.replace_proxy(case.pool_size).await;
            Err(TestCaseError::fail(failure))
        })
    });
    rt.block_on(bench.shutdown());
    if let Err(e) = result {
        panic!("{e}\n\nreplay with PROPTEST_RNG_SEED={seed} PROPTEST_CASES={cases}");
    }
}

/// A seed for this run (printed, so a failure can be replayed).
fn rand_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

// ---------------------------------------------------------------------------------------------
// Fixed cases: the smallest sequences the property found, kept as regression tests.
// ---------------------------------------------------------------------------------------------

fn query(sql: &'static str) -> Front {
    Front::Query(sql)
}

fn parse(name: &'static str, sql: &'static str) -> Front {
    Front::Parse {
        name,
        sql,
        types: vec![],
    }
}

/// Bind of `portal` to `statement` with text parameters.
fn bind(portal: &'static str, statement: &'static str, params: &[&'static str]) -> Front {
    Front::Bind {
        portal,
        statement,
        params: params.iter().map(|p| Some(*p)).collect(),
    }
}

/// Execute of `portal`, all rows.
fn execute(portal: &'static str) -> Front {
    Front::Execute {
        portal,
        max_rows: 0,
    }
}

fn describe(kind: Kind, name: &'static str) -> Front {
    Front::Describe { kind, name }
}

fn close(kind: Kind, name: &'static str) -> Front {
    Front::Close { kind, name }
}

/// Plays fixed cases on a cluster and proxies of their own; panics with the first report.
async fn check_fixed(cases: Vec<Case>) {
    let bench = Bench::start().await;
    let mut failure = None;
    for case in &cases {
        if let Err(report) = check_case(&bench, case).await {
            failure = Some(report);
            break;
        }
    }
    bench.shutdown().await;
    if let Some(report) = failure {
        panic!("{report}");
    }
}

/// A case on a pool of one.
fn pool_of_one(turns: Vec<Turn>) -> Case {
    Case {
        pool_size: 1,
        turns,
    }
}

/// Found at 04f3163: after an error in an extended batch, PostgreSQL ignores a simple Query (or
/// FunctionCall) up to the Sync and never answers it; the proxy counted it as owed and kept the
/// server for ever (the next client got 53300 after `query_wait_timeout`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_skipped_after_an_error_does_not_pin_the_server() {
    check_fixed(vec![
        pool_of_one(vec![Turn::new(
            0,
            [describe(Kind::Portal, ""), query("SELECT 1")],
        )]),
        pool_of_one(vec![Turn::new(
            0,
            [describe(Kind::Portal, ""), Front::FunctionCall],
        )]),
    ])
    .await
}

/// Found at f45388c: an error the server raises about a client's named statement names the
/// proxy's statement: PostgreSQL says `bind message supplies 1 parameters, but prepared
/// statement "s1" requires 0`, the proxy passed on `... prepared statement "__fg_<tag>_1" ...`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_error_names_the_clients_statement() {
    check_fixed(vec![pool_of_one(vec![
        Turn::new(0, [parse("s1", "SELECT 1")]),
        Turn::new(0, [bind("", "s1", &["1"]), execute("")]),
    ])])
    .await
}

/// Found at f45388c: a later batch in the same write was rewritten as if an earlier Parse had
/// succeeded, when PostgreSQL failed or skipped it. Parse s1 (syntax error), Sync, Parse s1:
/// PostgreSQL answers ParseComplete to the second, the proxy 42P05 "already exists". Parse s1
/// and then s2 of the same bad SQL: PostgreSQL fails both, the proxy answered ParseComplete to
/// the second (the server "had" it). A Parse skipped after an error, then Bind in the next
/// batch: PostgreSQL 26000 for "s1", the proxy 26000 for "__fg_<tag>_1".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_later_batch_does_not_count_on_a_parse_that_failed() {
    check_fixed(vec![
        pool_of_one(vec![Turn::new(
            0,
            [parse("s1", "SELEC 1"), Front::Sync, parse("s1", "SELECT 1")],
        )]),
        pool_of_one(vec![Turn::new(
            0,
            [parse("s1", "SELEC 1"), Front::Sync, parse("s2", "SELEC 1")],
        )]),
        pool_of_one(vec![Turn::new(
            0,
            [
                bind("", "s1", &[]),
                parse("s1", "SELECT 1"),
                Front::Sync,
                bind("", "s1", &[]),
                execute(""),
            ],
        )]),
    ])
    .await
}

/// Found at f45388c: `DEALLOCATE ALL` or `DISCARD ALL` followed, in the same write, by a Parse.
/// The proxy forgot the statements only when the CommandComplete came back, after it had
/// handled the Parse: a re-Parse of the same name got 42P05 (PostgreSQL: ParseComplete), and a
/// Parse of SQL the server had before the DISCARD was answered by the proxy, so the Bind that
/// followed got 26000 for "__fg_<tag>_1" (PostgreSQL: the row).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deallocate_all_then_parse_in_one_write() {
    check_fixed(vec![
        pool_of_one(vec![
            Turn::new(0, [parse("s1", "SELECT 1")]),
            Turn::new(0, [query("DEALLOCATE ALL"), parse("s1", "SELECT 1")]),
        ]),
        pool_of_one(vec![
            Turn::new(0, [parse("s1", "SELECT 1")]),
            Turn::new(
                1,
                [
                    query("DISCARD ALL"),
                    parse("s2", "SELECT 1"),
                    bind("", "s2", &[]),
                    execute(""),
                ],
            ),
        ]),
    ])
    .await
}

/// Found at f45388c: when PostgreSQL skips a Parse and a Close of one name (an error earlier in
/// the batch), nothing changes; the proxy undid their effects in request order instead of
/// reverse order. Parse s1 then Close s1, skipped: the proxy ended up with s1 defined (a later
/// Parse s1 got 42P05; PostgreSQL: ParseComplete). Close s1 then Parse s1, skipped: the proxy
/// ended up without s1 (a later Bind got 26000; PostgreSQL: the row).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_skipped_parse_and_close_change_nothing() {
    let failing_bind = || bind("", "nosuch", &[]);
    check_fixed(vec![
        pool_of_one(vec![
            Turn::new(
                0,
                [
                    failing_bind(),
                    parse("s1", "SELECT 1"),
                    close(Kind::Statement, "s1"),
                ],
            ),
            Turn::new(0, [parse("s1", "SELECT 1")]),
        ]),
        pool_of_one(vec![
            Turn::new(0, [parse("s1", "SELECT 1")]),
            Turn::new(
                0,
                [
                    failing_bind(),
                    close(Kind::Statement, "s1"),
                    parse("s1", "SELECT 1"),
                ],
            ),
            Turn::new(0, [bind("", "s1", &[]), execute("")]),
        ]),
    ])
    .await
}

/// Found at f45388c: in a failed transaction PostgreSQL refuses a Parse (25P02); when the
/// server already had the statement (another client prepared it), the proxy answered
/// ParseComplete itself, and the client believed in a statement PostgreSQL never made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parse_in_a_failed_transaction_fails() {
    check_fixed(vec![pool_of_one(vec![
        Turn::new(0, [parse("s1", "SELECT 1")]),
        Turn::new(1, [query("BEGIN"), query("SELECT 1/0")]),
        Turn::new(1, [parse("s1", "SELECT 1")]),
    ])])
    .await
}

/// Found at f45388c: for a re-Parse of an existing name, PostgreSQL reports the errors it checks
/// first (a syntax error: 42601; and in a failed transaction, 25P02 except for COMMIT/ROLLBACK,
/// which get 42P05); the proxy's own 42P05 came first (42P05 for the syntax error), or was
/// itself refused (25P02 for COMMIT in a failed transaction).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reparse_reports_the_error_postgres_checks_first() {
    check_fixed(vec![
        pool_of_one(vec![
            Turn::new(0, [parse("s1", "SELECT 1")]),
            Turn::new(0, [parse("s1", "SELEC 1")]),
        ]),
        pool_of_one(vec![
            Turn::new(
                0,
                [parse("s1", "SELECT 1"), query("BEGIN"), query("SELECT 1/0")],
            ),
            Turn::new(0, [parse("s1", "COMMIT")]),
        ]),
    ])
    .await
}

/// Found at f45388c: a client sends CopyData and CopyDone after a `COPY ... FROM STDIN` that
/// failed at once (libpq does); PostgreSQL ignores them. The proxy waited for an answer to the
/// CopyDone, so the ParseComplete it owed for a following Parse (of a statement the server
/// had) came after the Sync's ReadyForQuery instead of before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_data_after_a_failed_copy_keeps_answers_in_order() {
    check_fixed(vec![pool_of_one(vec![
        Turn::new(0, [parse("s1", "SELECT 1")]),
        Turn::new(0, [Front::CopyInNoTable, parse("s2", "SELECT 1")]),
    ])])
    .await
}

/// Found at f45388c: SQL `DEALLOCATE s1` of a protocol-prepared name is answered by the proxy,
/// but only when the last ReadyForQuery it saw was not in a failed transaction: `BEGIN`,
/// `SELECT 1/0`, `DEALLOCATE s1` sent together got CommandComplete DEALLOCATE (PostgreSQL:
/// 25P02), and the client's s1 was gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_deallocate_in_a_failed_transaction_fails() {
    check_fixed(vec![pool_of_one(vec![
        Turn::new(0, [parse("s1", "SELECT 1")]),
        Turn::new(
            0,
            [query("BEGIN"), query("SELECT 1/0"), query("DEALLOCATE s1")],
        ),
        Turn::new(0, [bind("", "s1", &[]), execute("")]),
    ])])
    .await
}
