//! Matching responses to requests, so the proxy can add, rewrite and answer messages.
//!
//! Every message in flight to a server has an entry in a queue, in request order, saying what
//! will answer it. That lets the proxy prepare a client's named statement on a server that lacks
//! it (adding a Parse and swallowing its ParseComplete), answer a Parse the server does not need
//! (a synthetic ParseComplete, placed exactly where the server's would have been), and follow
//! errors: after a failure the server skips to the next Sync, and so does the queue, undoing what
//! the skipped messages would have done. It also knows which Syncs a server will ignore (those
//! sent during COPY FROM STDIN), so the relay's count of outstanding answers stays exact.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::BytesMut;

mod statements;

use super::frame::{HEADER_LEN, cstr};
use super::prepared::{
    ClientStatements, Recorded, Registry, ServerStatements, Statement, deallocate_target,
    put_message,
};
use super::sql::{self, Leftovers};
use statements::{STALE_CODE, STALE_MESSAGE, rename_in_error};

/// What to undo when the server skips a message (an earlier one in the batch failed).
#[derive(Debug)]
enum Undo {
    Nothing,
    /// A client Parse: the name was never created...
    Unmap(Arc<str>),
    /// ...and the server does not have the statement either.
    UnmapAndForget(Arc<str>, u64),
    /// A Parse the proxy added: the server does not have the statement.
    Forget(u64),
    /// A client Close of a tracked name: the name still exists.
    Remap(Arc<str>, Arc<Statement>),
    /// A Close the proxy added to evict a statement: the server still has it.
    Keep(Recorded),
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
    /// BindComplete ('2'). `statement`: the tracked statement bound (0: none), whose plan the
    /// server may find stale; `client`: the client's name for it, which the server's errors
    /// must show instead of the proxy's.
    Bind {
        swallow: bool,
        statement: u64,
        client: Option<Arc<str>>,
    },
    /// RowDescription or NoData, after an optional ParameterDescription.
    Describe {
        statement: u64,
        client: Option<Arc<str>>,
    },
    /// CloseComplete ('3').
    Close { swallow: bool, undo: Undo },
    /// CommandComplete, EmptyQueryResponse or PortalSuspended.
    Execute,
    /// ReadyForQuery: Sync. `settles`: the batch it ends changes statement names (or may: a
    /// Parse or Close that can still fail); until it is answered, later messages that use names
    /// wait (see [`Tracker::must_wait`]).
    Sync { settles: bool },
    /// ReadyForQuery: simple Query or FunctionCall; `settles` as for Sync (a `DEALLOCATE` or
    /// `DISCARD` changes names when it runs).
    Query { settles: bool },
    /// Sent by the proxy when it reaches the front of the queue.
    Synthetic { response: Synthetic, undo: Undo },
    /// A Bind the proxy sent to make the server fail as PostgreSQL would have (see
    /// [`Tracker::raise`]); the server's error is replaced by `error`, PostgreSQL's own.
    Raised { error: Box<[u8]> },
    /// Not a response: the client ended a COPY (CopyDone or CopyFail) here.
    CopyEnd,
}

/// What to do with a server message.
#[derive(Debug, PartialEq, Eq)]
pub enum ServerAction {
    Forward,
    /// An answer to a message the proxy added: the client never asked for it.
    Drop,
    /// Send [`Tracker::out`] instead.
    Replace,
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
    /// Session state the client's SQL may leave on the server (transaction mode; `None` in
    /// session mode, where the server is reset when the client leaves anyway).
    leftovers: Option<&'a mut Leftovers>,
    /// SQL ran that the proxy did not read (a query too long to hold, a statement prepared
    /// without tracking): CommandComplete tags stand in for it.
    unread_sql: bool,
    /// Entries since the last Sync or Query whose effect on names is undone if they fail.
    uncertain_in_batch: bool,
    /// Sync and Query entries in the queue with `settles` set.
    unsettled: usize,
}

/// Buffers that live with the client session so their allocations are reused.
#[derive(Debug, Default)]
pub struct Scratch {
    queue: VecDeque<Expect>,
    out: BytesMut,
}

impl Scratch {
    /// Between transactions: frees what a large pipeline made these grow to.
    pub fn shrink(&mut self) {
        if self.queue.capacity() > 64 {
            self.queue = VecDeque::new();
        }
        if self.out.capacity() > 4096 {
            self.out = BytesMut::new();
        }
    }
}

impl<'a> Tracker<'a> {
    pub fn new(
        registry: &'a Registry,
        client: &'a mut ClientStatements,
        server: &'a mut ServerStatements,
        leftovers: Option<&'a mut Leftovers>,
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
            leftovers,
            unread_sql: false,
            uncertain_in_batch: false,
            unsettled: 0,
        }
    }

    /// True when `msg` must wait until the server has answered what is in flight, because how
    /// it is handled depends on the outcome: it uses a statement name that an unanswered batch
    /// creates or drops, or the proxy would answer it itself and the answer depends on the
    /// transaction status a pending ReadyForQuery will tell (a Parse or `DEALLOCATE` in a
    /// transaction that has failed meanwhile gets an error from PostgreSQL). Ordinary
    /// pipelines (Bind/Execute/Sync of statements prepared earlier) never wait.
    pub fn must_wait(&self, tag: u8, msg: &[u8], pending: usize) -> bool {
        if !self.rewrite || self.copy_in || self.skipping || (pending == 0 && self.unsettled == 0) {
            return false;
        }
        let body = msg.get(HEADER_LEN..).unwrap_or_default();
        let named = |at: usize| body.get(at).is_some_and(|&b| b != 0);
        match tag {
            b'P' => named(0),
            b'B' => self.unsettled > 0 && named(cstr_len(body)),
            b'D' | b'C' => self.unsettled > 0 && body.first() == Some(&b'S') && named(1),
            b'Q' => deallocate_target(body).is_some(),
            _ => false,
        }
    }

    /// Records what SQL about to run may leave on the server.
    fn may_leave(&mut self, left: Leftovers) {
        if let Some(leftovers) = self.leftovers.as_deref_mut() {
            *leftovers |= left.on_session();
        }
    }

    /// Records what the SQL text of a Query or Parse may leave; `msg` may be only a header
    /// when the message is streamed (too long to hold). Returns what was found (everything,
    /// for SQL it could not read).
    fn read_sql(&mut self, msg: &[u8], text_at: usize) -> Leftovers {
        if self.leftovers.is_none() && !self.rewrite {
            return Leftovers::NONE;
        }
        let declared = msg
            .get(1..HEADER_LEN)
            .map_or(0, |l| u32::from_be_bytes([l[0], l[1], l[2], l[3]]) as usize);
        let mut pos = text_at;
        match msg.get(HEADER_LEN..) {
            Some(body) if body.len() + 4 == declared => {
                let text = cstr_bytes(body, &mut pos);
                let left = sql::leftovers(text);
                self.may_leave(left);
                left
            }
            _ => {
                self.unread_sql = true;
                Leftovers::ALL | Leftovers::NAMES
            }
        }
    }

    /// True when nothing is owed either way.
    pub fn is_idle(&self) -> bool {
        self.queue.is_empty()
    }

    /// Messages in flight (answers owed, by the server or the proxy).
    pub fn in_flight(&self) -> usize {
        self.queue.len()
    }

    /// How much of a client message (`len`: its body length) the tracker must see at once:
    /// all of it for messages it rewrites or whose SQL it reads (up to a bound), the names at
    /// the front of a large Bind (its parameters stream through) or of a Parse too large to
    /// keep, nothing for the rest. Whatever a client sends, the proxy holds at most
    /// [`MAX_NAMED_PARSE`] of it.
    pub fn hold(&self, tag: u8, len: usize) -> usize {
        let read_sql = self.rewrite || self.leftovers.is_some();
        match tag {
            b'Q' if read_sql && len <= MAX_READ_SQL => len,
            b'P' if self.rewrite && len <= MAX_NAMED_PARSE => len,
            b'P' if self.rewrite => NAMES_PREFIX,
            b'P' if read_sql && len <= MAX_READ_SQL => len,
            b'B' if self.rewrite && len <= MAX_READ_SQL => len,
            b'B' if self.rewrite => NAMES_PREFIX,
            b'D' | b'C' if self.rewrite && len <= MAX_READ_SQL => len,
            _ => 0,
        }
    }

    /// Server message types the tracker must see whole.
    pub fn held_from_server(tag: u8) -> bool {
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
            // The server ignores everything up to the next Sync, a Query or FunctionCall
            // included, and owes nothing for it.
            return match tag {
                b'Q' | b'F' => ClientAction::Unanswered,
                _ => ClientAction::Forward,
            };
        }
        let mut sql_read = Leftovers::NONE;
        match tag {
            b'Q' => sql_read = self.read_sql(msg, 0),
            b'P' if !self.rewrite || body.first() == Some(&0) => {
                let mut after_name = 0;
                cstr_bytes(body, &mut after_name);
                self.read_sql(msg, after_name);
            }
            b'B' if !self.rewrite
                && body.get(cstr_len(body)..).and_then(|b| b.first()) != Some(&0) =>
            {
                // A named statement the proxy does not track: what it does is not known.
                self.unread_sql = true;
            }
            b'F' => self.unread_sql = true,
            _ => {}
        }
        match tag {
            b'P' if self.rewrite => self.parse(msg, body, status),
            b'B' if self.rewrite => self.bind(msg, body),
            b'D' if self.rewrite => self.describe_or_close(body, true),
            b'C' if self.rewrite => self.describe_or_close(body, false),
            b'Q' if self.rewrite => self.query(body, status, sql_read.contains(Leftovers::NAMES)),
            b'P' => self.push(
                Expect::Parse {
                    swallow: false,
                    undo: Undo::Nothing,
                },
                ClientAction::Forward,
            ),
            b'B' => self.push(
                Expect::Bind {
                    swallow: false,
                    statement: 0,
                    client: None,
                },
                ClientAction::Forward,
            ),
            b'D' => self.push(
                Expect::Describe {
                    statement: 0,
                    client: None,
                },
                ClientAction::Forward,
            ),
            b'C' => self.push(
                Expect::Close {
                    swallow: false,
                    undo: Undo::Nothing,
                },
                ClientAction::Forward,
            ),
            b'Q' | b'F' => self.push_query(false),
            b'E' => self.push(Expect::Execute, ClientAction::Forward),
            b'S' => {
                self.skipping = false;
                let settles = std::mem::take(&mut self.uncertain_in_batch);
                self.unsettled += settles as usize;
                self.push(Expect::Sync { settles }, ClientAction::Forward)
            }
            // The end of a COPY whose CopyInResponse has not arrived yet.
            b'c' | b'f' => self.push(Expect::CopyEnd, ClientAction::Forward),
            _ => ClientAction::Forward,
        }
    }

    fn push(&mut self, expect: Expect, action: ClientAction) -> ClientAction {
        if let Expect::Parse { undo, .. }
        | Expect::Close { undo, .. }
        | Expect::Synthetic { undo, .. } = &expect
            && !matches!(undo, Undo::Nothing)
        {
            self.uncertain_in_batch = true;
        }
        self.queue.push_back(expect);
        action
    }

    /// A Query (or FunctionCall): its own batch. `changes_names`: it runs `DEALLOCATE` or
    /// `DISCARD`, whose effect on names is known only when its CommandComplete arrives.
    fn push_query(&mut self, changes_names: bool) -> ClientAction {
        let settles = std::mem::take(&mut self.uncertain_in_batch) || changes_names;
        self.unsettled += settles as usize;
        self.push(Expect::Query { settles }, ClientAction::Forward)
    }

    /// The front entry of the queue, now answered; COPY ends behind it whose COPY never
    /// started go too.
    fn pop_front(&mut self) -> Option<Expect> {
        let front = self.queue.pop_front();
        if let Some(Expect::Sync { settles: true } | Expect::Query { settles: true }) = front {
            self.unsettled -= 1;
        }
        while matches!(self.queue.front(), Some(Expect::CopyEnd)) {
            self.queue.pop_front();
        }
        front
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
            Undo::Keep(recorded) => self.server.record(recorded),
        }
    }

    /// Handles one server message; `true` when it must not reach the client. `msg` is whole for
    /// [`Self::wants_whole_from_server`] types and ErrorResponse. `pending` counts the Sync and
    /// Query messages awaiting ReadyForQuery; Syncs found to be ignored are taken off it.
    pub fn on_server_message(&mut self, tag: u8, msg: &[u8], pending: &mut usize) -> ServerAction {
        let forward = |drop: bool| match drop {
            true => ServerAction::Drop,
            false => ServerAction::Forward,
        };
        if tag == b'G' {
            *pending = pending.saturating_sub(self.copy_in_started());
            return ServerAction::Forward;
        }
        match tag {
            b'1' | b'2' | b'3' => forward(match self.pop_front() {
                Some(Expect::Raised { .. }) => true,
                Some(Expect::Parse { swallow, .. }) => swallow,
                Some(Expect::Bind { swallow, .. }) | Some(Expect::Close { swallow, .. }) => swallow,
                _ => false,
            }),
            b'T' | b'n' => {
                self.complete_if(|e| matches!(e, Expect::Describe { .. }));
                ServerAction::Forward
            }
            b'I' | b's' => {
                self.complete_if(|e| matches!(e, Expect::Execute));
                ServerAction::Forward
            }
            b'C' => {
                self.complete_if(|e| matches!(e, Expect::Execute));
                let tag_text = msg.get(HEADER_LEN..).unwrap_or_default();
                if tag_text.starts_with(b"DEALLOCATE ALL\0")
                    || tag_text.starts_with(b"DISCARD ALL\0")
                {
                    self.server.clear();
                    self.client.names.clear();
                } else if tag_text.starts_with(b"PREPARE\0")
                    || tag_text.starts_with(b"DEALLOCATE\0")
                    || tag_text.starts_with(b"LISTEN\0")
                {
                    // Whatever the SQL looked like: statements under any name (the proxy's
                    // included) may have changed, so they are all dropped before reuse.
                    self.may_leave(sql::leftovers_of_tag(tag_text));
                } else if self.unread_sql {
                    self.may_leave(sql::leftovers_of_tag(tag_text));
                }
                ServerAction::Forward
            }
            b'Z' => {
                self.complete_if(|e| matches!(e, Expect::Sync { .. } | Expect::Query { .. }));
                ServerAction::Forward
            }
            b'E' => {
                self.out.clear();
                let replace = match self.queue.front() {
                    Some(Expect::Raised { error }) => {
                        self.out.extend_from_slice(error);
                        true
                    }

                    Some(
                        Expect::Bind {
                            statement,
                            client: Some(client),
                            ..
                        }
                        | Expect::Describe {
                            statement,
                            client: Some(client),
                        },
                    ) => {
                        // The server names the statement as the proxy does; the client must
                        // read its own name, as PostgreSQL would show it.
                        let server_name = self.registry.name_of(*statement);
                        rename_in_error(msg, &server_name, client, self.out)
                    }
                    _ => false,
                };
                self.on_error(msg, pending);
                match replace {
                    true => ServerAction::Replace,
                    false => ServerAction::Forward,
                }
            }
            _ => ServerAction::Forward,
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
                Expect::Sync { settles } => {
                    self.queue.remove(i);
                    self.unsettled -= settles as usize;
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
            self.pop_front();
        }
    }

    /// An extended-protocol message failed: it and everything up to the next Sync are skipped
    /// (a Query or FunctionCall among them too: its answer will not come, so `pending` drops).
    /// What the skipped messages would have done is undone, last first.
    fn on_error(&mut self, msg: &[u8], pending: &mut usize) {
        let Some(front) = self.queue.front() else {
            return;
        };
        if matches!(front, Expect::Query { .. } | Expect::Sync { .. }) {
            return; // a simple query's error; its ReadyForQuery completes it
        }
        let code = error_field(msg, b'C');
        let mut skipped = Vec::new();
        if let Some(failed) = self.pop_front() {
            match failed {
                // A Parse the proxy added failed because the name is taken: the server's
                // statements are not what the proxy recorded. Forget this one, drop them all
                // before anyone else uses the server.
                e @ Expect::Parse {
                    swallow: true,
                    undo: Undo::Forget(_),
                } if code == Some("42P05") => {
                    self.may_leave(Leftovers::PREPARED);
                    skipped.push(e);
                }
                // The statement's plan is stale (a schema change under `SELECT *`): clients
                // preparing this text from now on get a new statement.
                Expect::Bind { statement, .. } | Expect::Describe { statement, .. }
                    if statement != 0
                        && code == Some(STALE_CODE)
                        && error_field(msg, b'M') == Some(STALE_MESSAGE) =>
                {
                    let name = self.registry.name_of(statement);
                    if let Some(s) = self.server.mark_stale(statement, name) {
                        s.superseded.store(true, Ordering::Relaxed);
                    }
                }
                e => skipped.push(e),
            }
        }
        // Everything after it, up to the next Sync, is skipped by the server.
        while let Some(e) = self.queue.front() {
            if matches!(e, Expect::Sync { .. }) {
                break;
            }
            if let Some(e) = self.pop_front() {
                if matches!(e, Expect::Query { .. }) {
                    *pending = pending.saturating_sub(1);
                }
                skipped.push(e);
            }
        }
        for e in skipped.into_iter().rev() {
            self.undo(e);
        }
        // No Sync sent yet: what the client sends until it is skipped too.
        self.skipping = self.queue.is_empty();
    }

    /// Responses owed by the proxy that are now due (at the front of the queue), appended to
    /// `out`. `status` is the transaction status of the last ReadyForQuery.
    pub fn take_due(&mut self, out: &mut BytesMut, status: u8) {
        while matches!(self.queue.front(), Some(Expect::CopyEnd)) {
            self.queue.pop_front(); // a COPY that never started
        }
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

/// Longest Query or Parse whose SQL is read for the session state it may leave (longer ones
/// are streamed through and judged by their CommandComplete tags), and longest Bind, Describe
/// or Close held whole.
const MAX_READ_SQL: usize = 64 * 1024;
/// Longest named Parse kept (its text is what other servers are prepared with); a longer one
/// passes through under the client's own name, for its transaction only.
pub const MAX_NAMED_PARSE: usize = 1 << 20;
/// What is held of a Bind or Parse too long to hold whole: enough for the names at its front.
const NAMES_PREFIX: usize = 4 * 1024;

/// The body length a message's header declares (`msg` may hold only part of the body).
fn declared_body_len(msg: &[u8]) -> usize {
    msg.get(1..HEADER_LEN)
        .map_or(0, |l| u32::from_be_bytes([l[0], l[1], l[2], l[3]]) as usize)
        .saturating_sub(4)
}

/// Field `code` (`C` SQLSTATE, `M` message) of an ErrorResponse message.
fn error_field(msg: &[u8], code: u8) -> Option<&str> {
    let body = msg.get(HEADER_LEN..)?;
    let mut pos = 0;
    while let Some(&field) = body.get(pos) {
        pos += 1;
        let value = cstr(body, &mut pos)?;
        if field == code {
            return Some(value);
        }
    }
    None
}

/// The bytes of a NUL-terminated string at `*pos` (not necessarily UTF-8), advancing past it;
/// the rest of `body` when there is no NUL.
fn cstr_bytes<'b>(body: &'b [u8], pos: &mut usize) -> &'b [u8] {
    let rest = body.get(*pos..).unwrap_or_default();
    let len = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    *pos += len + 1;
    &rest[..len]
}

/// Length of the NUL-terminated string at the start of `body`, terminator included.
fn cstr_len(body: &[u8]) -> usize {
    body.iter()
        .position(|&b| b == 0)
        .map_or(body.len(), |n| n + 1)
}
