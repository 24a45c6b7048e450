//! Named prepared statements that keep working in transaction mode.
//!
//! Each distinct (query text, parameter types) gets one proxy-wide name (`__fg_N`). A client's
//! statement names map to those; each server connection remembers which it has prepared (an LRU
//! bounded by `max_prepared_statements`). When a client's Bind or Describe reaches a server that
//! lacks the statement, the proxy sends the Parse there first and swallows its ParseComplete; a
//! client Parse of a statement the server already has is answered by the proxy. Responses are
//! matched to requests through a queue in request order, so every synthetic or swallowed message
//! lands exactly where PostgreSQL would have put it, including after errors (the server skips to
//! the next Sync, and so does the queue, undoing what the skipped messages would have done).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{BufMut, Bytes, BytesMut};

use super::frame::{HEADER_LEN, cstr};

/// Prefix of the proxy's statement names; clients are unlikely to use it.
const NAME_PREFIX: &str = "__fg_";

/// A statement as servers know it.
#[derive(Debug)]
pub struct Statement {
    pub id: u64,
    /// The proxy-wide name (`__fg_N`).
    pub name: String,
    /// A Parse message that prepares it under that name.
    pub parse: Bytes,
}

/// Counters for metrics and the admin console.
#[derive(Debug, Default)]
pub struct Counters {
    /// Parse messages sent to servers for named statements (prepared on a server).
    pub prepared: AtomicU64,
    /// Client Parse/Bind/Describe of a statement the server already had.
    pub hits: AtomicU64,
    /// Statements closed on a server to stay within `max_prepared_statements`.
    pub evictions: AtomicU64,
}

/// Every distinct statement any client has prepared, by (query, parameter types).
#[derive(Debug, Default)]
pub struct Registry {
    statements: Mutex<HashMap<Box<[u8]>, Arc<Statement>>>,
    next_id: AtomicU64,
    /// Forget statements nobody uses once the map grows past this.
    collect_at: AtomicU64,
    pub counters: Counters,
}

impl Registry {
    /// The statement for a Parse body's query-and-types part.
    fn statement(&self, key: &[u8]) -> Arc<Statement> {
        let mut map = self.statements.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = map.get(key) {
            return s.clone();
        }
        if map.len() as u64 >= self.collect_at.load(Ordering::Relaxed).max(1024) {
            // Only the registry holds it: no client or server uses it any more.
            map.retain(|_, s| Arc::strong_count(s) > 1);
            self.collect_at
                .store(2 * map.len() as u64, Ordering::Relaxed);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let name = format!("{NAME_PREFIX}{id}");
        let mut parse = BytesMut::with_capacity(HEADER_LEN + name.len() + 1 + key.len());
        parse.put_u8(b'P');
        parse.put_u32((4 + name.len() + 1 + key.len()) as u32);
        parse.put_slice(name.as_bytes());
        parse.put_u8(0);
        parse.put_slice(key);
        let statement = Arc::new(Statement {
            id,
            name,
            parse: parse.freeze(),
        });
        map.insert(key.into(), statement.clone());
        statement
    }
}

/// One client's statement names.
#[derive(Debug, Default)]
pub struct ClientStatements {
    names: HashMap<String, Arc<Statement>>,
}

impl ClientStatements {
    /// Answers a batch of named Parse messages closed by a Sync, sent while the client holds no
    /// server, without one: the names are recorded and each statement is prepared on whichever
    /// server first needs it. (A client that prepares synchronously while its other connections
    /// hold every server, as pgbench does, would otherwise wait for ever.) `buf` starts with the
    /// batch; returns the bytes it used and writes the answers to `out`, or `None` when `buf`
    /// does not start with such a complete batch (including a name already in use: the server
    /// must raise that error).
    pub fn prepare_without_server(
        &mut self,
        registry: &Registry,
        buf: &[u8],
        max_len: usize,
        out: &mut BytesMut,
    ) -> Option<usize> {
        let mut pos = 0;
        let mut names = Vec::new();
        loop {
            let (tag, len) = super::frame::header(&buf[pos..], max_len).ok()??;
            let body = buf.get(pos + HEADER_LEN..pos + HEADER_LEN + len)?;
            pos += HEADER_LEN + len;
            match tag {
                b'S' if !names.is_empty() => break,
                b'P' => {
                    let mut at = 0;
                    let name = cstr(body, &mut at).filter(|n| !n.is_empty())?;
                    if self.names.contains_key(name) || names.iter().any(|(n, _)| n == name) {
                        return None;
                    }
                    names.push((name.to_owned(), &body[at..]));
                }
                _ => return None,
            }
        }
        for (name, key) in names {
            self.names.insert(name, registry.statement(key));
            put_message(out, b'1', &[]);
        }
        put_message(out, b'Z', &[b"I"]);
        Some(pos)
    }
}

/// What one server connection has prepared, least recently used first out.
#[derive(Debug, Default)]
pub struct ServerStatements {
    entries: HashMap<u64, (Arc<Statement>, u64)>,
    clock: u64,
}

impl ServerStatements {
    fn has(&mut self, id: u64) -> bool {
        self.clock += 1;
        match self.entries.get_mut(&id) {
            Some(entry) => {
                entry.1 = self.clock;
                true
            }
            None => false,
        }
    }

    /// Records `s`; returns the statement evicted to stay within `max`.
    fn insert(&mut self, s: Arc<Statement>, max: usize) -> Option<Arc<Statement>> {
        self.clock += 1;
        let evicted = if self.entries.len() >= max {
            let oldest = self
                .entries
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(id, _)| *id);
            oldest
                .and_then(|id| self.entries.remove(&id))
                .map(|(s, _)| s)
        } else {
            None
        };
        self.entries.insert(s.id, (s, self.clock));
        evicted
    }

    fn remove(&mut self, id: u64) {
        self.entries.remove(&id);
    }

    /// The server dropped all its statements (DEALLOCATE ALL, DISCARD ALL, a reset).
    pub fn clear(&mut self) {
        self.entries.clear();
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// What to undo when the server skips a message (an earlier one in the batch failed).
#[derive(Debug)]
enum Undo {
    Nothing,
    /// A client Parse: the name was never created...
    Unmap(String),
    /// ...and the server does not have the statement either.
    UnmapAndForget(String, u64),
    /// A Parse the proxy added: the server does not have the statement.
    Forget(u64),
    /// A client Close of a tracked name: the name still exists.
    Remap(String, Arc<Statement>),
    /// A Close the proxy added to evict a statement: the server still has it.
    Keep(Arc<Statement>),
}

/// A response the proxy owes the client that the server will not send.
#[derive(Debug, Clone, Copy)]
enum Synthetic {
    ParseComplete,
    CloseComplete,
    /// CommandComplete "DEALLOCATE" and ReadyForQuery (SQL DEALLOCATE of a tracked name).
    Deallocated,
}

/// What a message in flight will be answered with, in request order.
#[derive(Debug)]
enum Expect {
    /// ParseComplete ('1'); `swallow` when the proxy added the Parse.
    Parse { swallow: bool, undo: Undo },
    /// BindComplete ('2').
    Bind { swallow: bool },
    /// RowDescription or NoData, after an optional ParameterDescription.
    Describe,
    /// CloseComplete ('3').
    Close { swallow: bool, undo: Undo },
    /// CommandComplete, EmptyQueryResponse or PortalSuspended.
    Execute,
    /// ReadyForQuery: Sync.
    Sync,
    /// ReadyForQuery: simple Query or FunctionCall.
    Query,
    /// Sent by the proxy when it reaches the front of the queue.
    Synthetic { response: Synthetic, undo: Undo },
    /// Not a response: the client ended a COPY (CopyDone or CopyFail) here.
    CopyEnd,
}

/// What to do with a client message.
#[derive(Debug, PartialEq, Eq)]
pub enum ClientAction {
    Forward,
    /// Forward, but the server will ignore it (a Sync during COPY FROM STDIN): no answer comes.
    Unanswered,
    /// Send [`Tracker::out`] instead (empty: send nothing).
    Replace,
}

/// Tracking state for one relay (one transaction), borrowing the client's and server's maps.
pub struct Tracker<'a> {
    pub registry: &'a Registry,
    pub client: &'a mut ClientStatements,
    pub server: &'a mut ServerStatements,
    pub max: usize,
    queue: &'a mut VecDeque<Expect>,
    /// What to send instead of the current client message.
    pub out: &'a mut BytesMut,
    /// The server failed a message and skips until the next Sync.
    skipping: bool,
    /// The server is in COPY FROM STDIN and the client has not ended it yet.
    copy_in: bool,
    /// Rewrite named statements (transaction mode with `max_prepared_statements` > 0); otherwise
    /// only match responses to requests.
    rewrite: bool,
}

/// Buffers that live with the client session so their allocations are reused.
#[derive(Debug, Default)]
pub struct Scratch {
    queue: VecDeque<Expect>,
    out: BytesMut,
}

impl<'a> Tracker<'a> {
    pub fn new(
        registry: &'a Registry,
        client: &'a mut ClientStatements,
        server: &'a mut ServerStatements,
        max: usize,
        scratch: &'a mut Scratch,
    ) -> Tracker<'a> {
        scratch.queue.clear();
        Tracker {
            registry,
            client,
            server,
            max,
            queue: &mut scratch.queue,
            out: &mut scratch.out,
            skipping: false,
            copy_in: false,
            rewrite: max > 0,
        }
    }

    /// True when nothing is owed either way.
    pub fn is_idle(&self) -> bool {
        self.queue.is_empty()
    }

    /// Client messages the tracker must see whole (`len`: body length).
    pub fn wants_whole(&self, tag: u8, len: usize) -> bool {
        self.rewrite
            && (matches!(tag, b'P' | b'B' | b'D' | b'C') || (tag == b'Q' && len <= 64 * 1024))
    }

    /// Server message types the tracker must see whole.
    pub fn wants_whole_from_server(tag: u8) -> bool {
        matches!(tag, b'1' | b'2' | b'3' | b'C')
    }

    /// Handles one client message (`msg`: whole when [`Self::wants_whole`] said so). `status` is
    /// the transaction status of the last ReadyForQuery.
    pub fn on_client_message(&mut self, tag: u8, msg: &[u8], status: u8) -> ClientAction {
        let body = msg.get(HEADER_LEN..).unwrap_or_default();
        self.out.clear();
        if self.copy_in {
            return match tag {
                b'S' | b'H' => ClientAction::Unanswered,
                b'c' | b'f' => {
                    self.copy_in = false;
                    ClientAction::Forward
                }
                _ => ClientAction::Forward,
            };
        }
        if self.skipping && tag != b'S' {
            // The server ignores everything up to the next Sync, and owes nothing for it.
            return ClientAction::Forward;
        }
        match tag {
            b'P' if self.rewrite => self.parse(body),
            b'B' if self.rewrite => self.bind(body),
            b'D' if self.rewrite => self.describe_or_close(body, true),
            b'C' if self.rewrite => self.describe_or_close(body, false),
            b'Q' if self.rewrite => self.query(body, status),
            b'P' => self.push(
                Expect::Parse {
                    swallow: false,
                    undo: Undo::Nothing,
                },
                ClientAction::Forward,
            ),
            b'B' => self.push(Expect::Bind { swallow: false }, ClientAction::Forward),
            b'D' => self.push(Expect::Describe, ClientAction::Forward),
            b'C' => self.push(
                Expect::Close {
                    swallow: false,
                    undo: Undo::Nothing,
                },
                ClientAction::Forward,
            ),
            b'Q' | b'F' => self.push(Expect::Query, ClientAction::Forward),
            b'E' => self.push(Expect::Execute, ClientAction::Forward),
            b'S' => {
                self.skipping = false;
                self.push(Expect::Sync, ClientAction::Forward)
            }
            // The end of a COPY whose CopyInResponse has not arrived yet.
            b'c' | b'f' => self.push(Expect::CopyEnd, ClientAction::Forward),
            _ => ClientAction::Forward,
        }
    }

    fn push(&mut self, expect: Expect, action: ClientAction) -> ClientAction {
        self.queue.push_back(expect);
        action
    }

    fn parse(&mut self, body: &[u8]) -> ClientAction {
        let mut pos = 0;
        let Some(name) = cstr(body, &mut pos) else {
            return ClientAction::Forward;
        };
        if name.is_empty() {
            let undo = Undo::Nothing;
            return self.push(
                Expect::Parse {
                    swallow: false,
                    undo,
                },
                ClientAction::Forward,
            );
        }
        if self.client.names.contains_key(name) {
            return self.already_exists(name);
        }
        let statement = self.registry.statement(&body[pos..]);
        self.client.names.insert(name.to_owned(), statement.clone());
        if self.server.has(statement.id) {
            self.registry.counters.hits.fetch_add(1, Ordering::Relaxed);
            let undo = Undo::Unmap(name.to_owned());
            let response = Synthetic::ParseComplete;
            return self.push(Expect::Synthetic { response, undo }, ClientAction::Replace);
        }
        self.prepare_on_server(&statement, false);
        let undo = Undo::UnmapAndForget(name.to_owned(), statement.id);
        self.push(
            Expect::Parse {
                swallow: false,
                undo,
            },
            ClientAction::Replace,
        )
    }

    /// Adds `s`'s Parse to `out`, evicting (Close) the least recently used statement if the
    /// server is full; `swallow` the ParseComplete when the client did not ask for it.
    fn prepare_on_server(&mut self, s: &Arc<Statement>, swallow: bool) {
        if let Some(old) = self.server.insert(s.clone(), self.max) {
            self.registry
                .counters
                .evictions
                .fetch_add(1, Ordering::Relaxed);
            put_message(self.out, b'C', &[b"S", old.name.as_bytes(), b"\0"]);
            let undo = Undo::Keep(old);
            self.push(
                Expect::Close {
                    swallow: true,
                    undo,
                },
                ClientAction::Forward,
            );
        }
        self.registry
            .counters
            .prepared
            .fetch_add(1, Ordering::Relaxed);
        self.out.extend_from_slice(&s.parse);
        if swallow {
            self.push(
                Expect::Parse {
                    swallow: true,
                    undo: Undo::Forget(s.id),
                },
                ClientAction::Forward,
            );
        }
    }

    /// Re-Parse of a name without Close: the server raises 42P05 itself, so the transaction
    /// fails and the batch is skipped exactly as PostgreSQL would.
    fn already_exists(&mut self, name: &str) -> ClientAction {
        let message = format!("prepared statement \"{name}\" already exists").replace('\'', "''");
        let sql = format!(
            "DO $__fg$BEGIN RAISE EXCEPTION USING ERRCODE = '42P05', MESSAGE = '{}'; END$__fg$",
            message.replace("$__fg$", "")
        );
        put_message(self.out, b'P', &[b"\0", sql.as_bytes(), b"\0\0\0"]);
        put_message(self.out, b'B', &[b"\0\0\0\0\0\0\0\0"]);
        put_message(self.out, b'E', &[b"\0\0\0\0\0"]);
        self.push(
            Expect::Parse {
                swallow: true,
                undo: Undo::Nothing,
            },
            ClientAction::Forward,
        );
        self.push(Expect::Bind { swallow: true }, ClientAction::Forward);
        self.push(Expect::Execute, ClientAction::Replace)
    }

    fn bind(&mut self, body: &[u8]) -> ClientAction {
        let mut pos = 0;
        let (Some(portal), Some(name)) = (cstr(body, &mut pos), cstr(body, &mut pos)) else {
            return ClientAction::Forward;
        };
        let Some(statement) = self.client.names.get(name).cloned() else {
            // Unnamed, or unknown: the server answers as PostgreSQL would (26000).
            return self.push(Expect::Bind { swallow: false }, ClientAction::Forward);
        };
        self.ensure_prepared(&statement);
        let rest = &body[pos..];
        let name = statement.name.as_bytes();
        put_message(
            self.out,
            b'B',
            &[portal.as_bytes(), b"\0", name, b"\0", rest],
        );
        self.push(Expect::Bind { swallow: false }, ClientAction::Replace)
    }

    /// Describe or Close: a kind byte ('S'tatement or 'P'ortal) and a name.
    fn describe_or_close(&mut self, body: &[u8], describe: bool) -> ClientAction {
        let mut pos = 1;
        let kind = body.first().copied();
        let name = cstr(body, &mut pos).unwrap_or_default();
        let tracked = if kind == Some(b'S') && !name.is_empty() {
            self.client.names.get(name).cloned()
        } else {
            None
        };
        match (tracked, describe) {
            (None, true) => self.push(Expect::Describe, ClientAction::Forward),
            (None, false) => {
                let undo = Undo::Nothing;
                self.push(
                    Expect::Close {
                        swallow: false,
                        undo,
                    },
                    ClientAction::Forward,
                )
            }
            (Some(statement), true) => {
                self.ensure_prepared(&statement);
                put_message(self.out, b'D', &[b"S", statement.name.as_bytes(), b"\0"]);
                self.push(Expect::Describe, ClientAction::Replace)
            }
            (Some(statement), false) => {
                // The server keeps it for others; only this client's name goes.
                self.client.names.remove(name);
                let undo = Undo::Remap(name.to_owned(), statement);
                let response = Synthetic::CloseComplete;
                self.push(Expect::Synthetic { response, undo }, ClientAction::Replace)
            }
        }
    }

    /// Prepares `s` on this server first (into `out`) if it lacks it.
    fn ensure_prepared(&mut self, s: &Arc<Statement>) {
        if self.server.has(s.id) {
            self.registry.counters.hits.fetch_add(1, Ordering::Relaxed);
        } else {
            self.prepare_on_server(s, true);
        }
    }

    /// A simple Query: SQL `DEALLOCATE name` of a tracked name is answered by the proxy (the
    /// server knows the statement by another name, and keeps it for other clients).
    fn query(&mut self, body: &[u8], status: u8) -> ClientAction {
        if status != b'E'
            && let Some(name) = deallocate_target(body)
            && let Some(statement) = self.client.names.remove(&name)
        {
            let undo = Undo::Remap(name, statement);
            let response = Synthetic::Deallocated;
            return self.push(Expect::Synthetic { response, undo }, ClientAction::Replace);
        }
        self.push(Expect::Query, ClientAction::Forward)
    }

    fn undo(&mut self, expect: Expect) {
        let undo = match expect {
            Expect::Parse { undo, .. }
            | Expect::Synthetic { undo, .. }
            | Expect::Close { undo, .. } => undo,
            _ => return,
        };
        match undo {
            Undo::Nothing => {}
            Undo::Unmap(name) => {
                self.client.names.remove(&name);
            }
            Undo::UnmapAndForget(name, id) => {
                self.client.names.remove(&name);
                self.server.remove(id);
            }
            Undo::Forget(id) => self.server.remove(id),
            Undo::Remap(name, statement) => {
                self.client.names.insert(name, statement);
            }
            Undo::Keep(statement) => {
                self.server.insert(statement, usize::MAX);
            }
        }
    }

    /// Handles one server message; `true` when it must not reach the client. `msg` is whole for
    /// [`Self::wants_whole_from_server`] types and ErrorResponse. `pending` counts the Sync and
    /// Query messages awaiting ReadyForQuery; Syncs found to be ignored are taken off it.
    pub fn on_server_message(&mut self, tag: u8, msg: &[u8], pending: &mut usize) -> bool {
        if tag == b'G' {
            *pending = pending.saturating_sub(self.copy_in_started());
            return false;
        }
        while matches!(self.queue.front(), Some(Expect::CopyEnd)) {
            self.queue.pop_front(); // a COPY that never started
        }
        match tag {
            b'1' | b'2' | b'3' => match self.queue.pop_front() {
                Some(Expect::Parse { swallow, .. }) => swallow,
                Some(Expect::Bind { swallow }) | Some(Expect::Close { swallow, .. }) => swallow,
                _ => false,
            },
            b'T' | b'n' => {
                self.complete_if(|e| matches!(e, Expect::Describe));
                false
            }
            b'I' | b's' => {
                self.complete_if(|e| matches!(e, Expect::Execute));
                false
            }
            b'C' => {
                self.complete_if(|e| matches!(e, Expect::Execute));
                let tag_text = msg.get(HEADER_LEN..).unwrap_or_default();
                if tag_text.starts_with(b"DEALLOCATE ALL\0")
                    || tag_text.starts_with(b"DISCARD ALL\0")
                {
                    self.server.clear();
                    self.client.names.clear();
                }
                false
            }
            b'Z' => {
                self.complete_if(|e| matches!(e, Expect::Sync | Expect::Query));
                false
            }
            b'E' => {
                self.on_error(msg);
                false
            }
            _ => false,
        }
    }

    /// CopyInResponse: the server ignores Sync and Flush until the client ends the COPY. Syncs
    /// the client sent after the Execute (or Query) that started it, before its CopyDone or
    /// CopyFail, will not be answered: they are dropped from the queue and their number returned.
    fn copy_in_started(&mut self) -> usize {
        let mut ignored = 0;
        let mut i = 1; // the front is the Execute or Query that started the COPY
        while i < self.queue.len() {
            match self.queue[i] {
                Expect::Sync => {
                    self.queue.remove(i);
                    ignored += 1;
                }
                Expect::CopyEnd => {
                    self.queue.remove(i);
                    return ignored;
                }
                _ => i += 1,
            }
        }
        self.copy_in = true;
        ignored
    }

    fn complete_if(&mut self, f: impl Fn(&Expect) -> bool) {
        if self.queue.front().is_some_and(f) {
            self.queue.pop_front();
        }
    }

    /// An extended-protocol message failed: it and everything up to the next Sync are skipped.
    fn on_error(&mut self, msg: &[u8]) {
        let Some(front) = self.queue.front() else {
            return;
        };
        if matches!(front, Expect::Query | Expect::Sync) {
            return; // a simple query's error; its ReadyForQuery completes it
        }
        // The front message failed. If it is a Parse the proxy added and the server says it had
        // the statement already, the cache was wrong the other way: keep the statement.
        let duplicate = error_code(msg) == Some("42P05");
        if let Some(failed) = self.queue.pop_front() {
            match failed {
                Expect::Parse {
                    swallow: true,
                    undo: Undo::Forget(_),
                } if duplicate => {}
                e => self.undo(e),
            }
        }
        // Everything after it, up to the next Sync, is skipped by the server.
        while let Some(e) = self.queue.front() {
            if matches!(e, Expect::Sync) {
                return;
            }
            if let Some(e) = self.queue.pop_front() {
                self.undo(e);
            }
        }
        self.skipping = true;
    }

    /// Responses owed by the proxy that are now due (at the front of the queue), appended to
    /// `out`. `status` is the transaction status of the last ReadyForQuery.
    pub fn take_due(&mut self, out: &mut BytesMut, status: u8) {
        while let Some(Expect::Synthetic { response, .. }) = self.queue.front() {
            match response {
                Synthetic::ParseComplete => put_message(out, b'1', &[]),
                Synthetic::CloseComplete => put_message(out, b'3', &[]),
                Synthetic::Deallocated => {
                    put_message(out, b'C', &[b"DEALLOCATE\0"]);
                    put_message(out, b'Z', &[&[status]]);
                }
            }
            self.queue.pop_front();
        }
    }

    /// True while responses are outstanding: if the client leaves now, which statements the
    /// server has is not known for sure.
    pub fn uncertain(&self) -> bool {
        !self.queue.is_empty()
    }
}

/// Appends a message of `tag` whose body is `parts` concatenated.
fn put_message(out: &mut BytesMut, tag: u8, parts: &[&[u8]]) {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    out.put_u8(tag);
    out.put_u32((4 + len) as u32);
    for p in parts {
        out.put_slice(p);
    }
}

/// The SQLSTATE of an ErrorResponse message.
fn error_code(msg: &[u8]) -> Option<&str> {
    let body = msg.get(HEADER_LEN..)?;
    let mut pos = 0;
    while let Some(&field) = body.get(pos) {
        pos += 1;
        let value = cstr(body, &mut pos)?;
        if field == b'C' {
            return Some(value);
        }
    }
    None
}

/// The name in a single `DEALLOCATE [PREPARE] name` statement (a Query body), unquoted and
/// case-folded as PostgreSQL would; `None` for anything else (including `DEALLOCATE ALL`).
fn deallocate_target(body: &[u8]) -> Option<String> {
    let mut pos = 0;
    let sql = cstr(body, &mut pos)?
        .trim()
        .trim_end_matches(';')
        .trim_end();
    let rest = strip_keyword(sql, "DEALLOCATE")?;
    let rest = strip_keyword(rest, "PREPARE").unwrap_or(rest);
    let name = if let Some(quoted) = rest.strip_prefix('"') {
        let inner = quoted.strip_suffix('"')?;
        if inner.contains('"') && !inner.contains("\"\"") {
            return None;
        }
        inner.replace("\"\"", "\"")
    } else {
        if rest.is_empty()
            || !rest
                .chars()
                .all(|c| c.is_alphanumeric() || c == '_' || c == '$')
        {
            return None;
        }
        if rest.eq_ignore_ascii_case("ALL") {
            return None;
        }
        rest.to_lowercase()
    };
    Some(name)
}

/// `text` after a leading case-insensitive keyword and the whitespace after it.
fn strip_keyword<'t>(text: &'t str, keyword: &str) -> Option<&'t str> {
    let head = text.get(..keyword.len())?;
    let rest = &text[keyword.len()..];
    (head.eq_ignore_ascii_case(keyword) && rest.starts_with(char::is_whitespace))
        .then(|| rest.trim_start())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deallocate_names() {
        let q = |s: &str| deallocate_target(format!("{s}\0").as_bytes());
        assert_eq!(q("DEALLOCATE s1"), Some("s1".into()));
        assert_eq!(q("  deallocate prepare S1 ; "), Some("s1".into()));
        assert_eq!(q("DEALLOCATE \"MiXed\""), Some("MiXed".into()));
        assert_eq!(q("DEALLOCATE ALL"), None);
        assert_eq!(q("DEALLOCATE s1; SELECT 1"), None);
        assert_eq!(q("SELECT 1"), None);
        assert_eq!(q("DEALLOCATEs1"), None);
    }

    #[test]
    fn lru_evicts_the_least_recently_used() {
        let reg = Registry::default();
        let (a, b, c) = (
            reg.statement(b"a\0\0\0"),
            reg.statement(b"b\0\0\0"),
            reg.statement(b"c\0\0\0"),
        );
        assert!(
            Arc::ptr_eq(&a, &reg.statement(b"a\0\0\0")),
            "same text, same statement"
        );
        let mut server = ServerStatements::default();
        assert!(server.insert(a.clone(), 2).is_none());
        assert!(server.insert(b.clone(), 2).is_none());
        assert!(server.has(a.id));
        let evicted = server.insert(c.clone(), 2).expect("full");
        assert_eq!(evicted.id, b.id);
        assert!(server.has(a.id) && server.has(c.id) && !server.has(b.id));
    }
}
