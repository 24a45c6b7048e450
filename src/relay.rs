//! The hot path: bytes relayed both ways between a client and the server it holds, framed by
//! header only. It reads whole only the few messages it acts on (ReadyForQuery, ParameterStatus,
//! ErrorResponse, Terminate) and forwards everything else as it arrives, without copying or
//! decoding rows. It decides when a transaction is over: every Sync/Query answered, the last
//! `ReadyForQuery` idle, nothing half sent either way.

use std::time::Duration;

use bytes::{Buf, BytesMut};
use std::future::Future;
use std::pin::Pin;
use std::task::Poll;
use tokio::io::AsyncWriteExt;

use tokio::time::{Instant, Sleep};

use crate::params::Params;
use crate::protocol::frame::{FrameError, HEADER_LEN, Item, Scanner};
use crate::protocol::pipeline::{ClientAction, ServerAction, Tracker};
use crate::stats::TxStats;
use crate::stream::{self, Stream};

/// Largest server message the relay holds whole (ErrorResponse, ParameterStatus).
const MAX_HELD_SERVER_MESSAGE: usize = 1 << 20;
/// Backpressure: while this many messages are in flight, or this many bytes are owed to the
/// client and not yet written, nothing more is read from the client. A client that pipelines
/// without reading costs at most about 4,096 queue entries (160 KiB) and 64 KiB of answers,
/// whatever it sends. (More than PostgreSQL can keep unflushed in its 8 KiB output buffer,
/// about 1,600 five-byte answers, so answers always keep coming.)
const MAX_IN_FLIGHT: usize = 4096;
const MAX_OWED_TO_CLIENT: usize = 64 * 1024;
/// A Flush message.
const FLUSH: &[u8] = b"H\0\0\0\x04";

/// Where a transaction stands, from the messages seen both ways.
#[derive(Debug, Clone, Copy)]
pub struct TxState {
    /// Sync, Query and FunctionCall messages sent and not yet answered by ReadyForQuery.
    pub pending: usize,
    /// Status byte of the last ReadyForQuery: `I`dle, in `T`ransaction, `E`rror in transaction.
    pub status: u8,
    /// Extended-protocol messages sent since the last Sync (their results are not settled).
    pub unsynced: bool,
    /// The server waits for COPY data.
    pub copy_in: bool,
    /// The server sent a FATAL error (it is closing; the client has already been told why).
    pub server_fatal: bool,
    /// ReadyForQuery messages seen (progress, for `query_timeout`).
    pub answered: u64,
}

impl TxState {
    pub fn new() -> TxState {
        TxState {
            pending: 0,
            status: b'I',
            unsynced: false,
            copy_in: false,
            server_fatal: false,
            answered: 0,
        }
    }

    /// Nothing in flight and no transaction open.
    pub fn is_idle(&self) -> bool {
        self.pending == 0 && self.status == b'I' && !self.unsynced
    }
}

impl Default for TxState {
    fn default() -> Self {
        TxState::new()
    }
}

/// How a relay ended.
#[derive(Debug)]
pub enum Outcome {
    /// Transaction mode: the transaction is over and the server can serve someone else. The
    /// client's buffer may still hold the server's last answers, to be written to the client.
    Released,
    /// The client sent Terminate or went away.
    ClientGone(Abandoned),
    /// The client sent something that is not a frontend message stream.
    ClientViolation(Abandoned, String),
    /// The server connection failed or the server closed it.
    ServerLost { state: TxState, reason: String },
    /// A time limit was reached.
    TimedOut(Abandoned, Timeout),
}

/// Where both streams stood when a client stopped using its server mid-way, so the server can be
/// brought back to a clean state (or closed).
#[derive(Debug)]
pub struct Abandoned {
    pub state: TxState,
    /// `cbuf[..unsent]`: client bytes scanned but not yet written to the server.
    pub unsent: usize,
    /// The server has part of a client message and waits for the rest: it cannot be saved.
    pub client_mid_message: bool,
    /// `sbuf[..server_scanned]` was scanned (never to reach the client); the rest is unscanned.
    pub server_scanned: usize,
    /// Where the server's output stands after `server_scanned`.
    pub server_scanner: Scanner,
    /// Named statements were in flight: which ones the server has is not known for sure.
    pub statements_uncertain: bool,
}

impl Abandoned {
    fn uncertain(mut self, tracker: &Tracker) -> Abandoned {
        self.statements_uncertain = tracker.uncertain();
        self
    }
}

/// Message types a client may send after login.
pub fn is_frontend_message(tag: u8) -> bool {
    b"BCdcfDEHFPQSX".contains(&tag)
}

/// One attachment of a client to a server.
pub struct Relay<'a> {
    pub client: &'a mut Stream,
    pub server: &'a mut Stream,
    /// Bytes from the client; `[..c_ready]` are scanned and go to the server next.
    pub cbuf: &'a mut BytesMut,
    /// Bytes from the server; `[..s_ready]` are scanned and go to the client next.
    pub sbuf: &'a mut BytesMut,
    pub client_params: &'a mut Params,
    pub server_params: &'a mut Params,
    /// Transaction mode: return at the end of each transaction.
    pub release_when_idle: bool,
    pub max_packet_size: usize,
    /// Named prepared statements, when tracked (transaction mode).
    pub tracker: Tracker<'a>,
    pub timeouts: Timeouts,
    /// Where to send a CancelRequest when `query_timeout` fires.
    pub cancel: crate::server::CancelTarget,
    /// When the attachment began: the first query's start (saves a clock read).
    pub started: std::time::Instant,
    /// What this attachment did, for SHOW STATS.
    pub stats: &'a mut TxStats,
    /// Each query's time goes here (`/metrics`).
    pub query_duration: &'a prometheus::Histogram,
    /// Errors the server sends the client are counted here by SQLSTATE.
    pub telemetry: &'a crate::metrics::Telemetry,
}

/// Time limits the relay enforces (zero = off).
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// A query (anything awaiting ReadyForQuery) running this long is cancelled.
    pub query: Duration,
    /// A client idle this long inside a transaction is disconnected.
    pub idle_transaction: Duration,
}

/// After a cancel for `query_timeout`, how long the server has to answer before it is closed.
const CANCEL_GRACE: Duration = Duration::from_secs(5);

/// Which time limit a relay ran into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timeout {
    /// `query_timeout`: the query was cancelled but the server did not answer in time.
    Query,
    /// `idle_transaction_timeout`.
    IdleTransaction,
}

/// The one timer a relay has armed, and since when its condition holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Armed {
    /// Something awaits ReadyForQuery since `since`, when `answered` ReadyForQuery had been
    /// seen (each new one restarts the clock); `cancelled` once the cancel has been sent.
    Query {
        since: Instant,
        answered: u64,
        cancelled: bool,
    },
    /// Inside a transaction, waiting for the client.
    IdleTransaction { since: Instant },
}

enum Event {
    /// The client's first message(s), already in its buffer when the server was attached.
    Buffered,
    ToServer(std::io::Result<usize>),
    FromClient(std::io::Result<usize>),
    ToClient(std::io::Result<usize>),
    FromServer(std::io::Result<usize>),
    /// The armed timer fired.
    Timer,
}

/// How far one direction's buffer has been scanned: `buf[..ready]` goes out next.
struct Flow {
    ready: usize,
    scanner: Scanner,
    /// Scanning stopped at a message that must wait for the server's answers to what is in
    /// flight ([`Tracker::must_wait`]); nothing more is read until it goes on.
    waiting: bool,
}

impl Flow {
    fn new(max_len: usize) -> Flow {
        Flow {
            ready: 0,
            scanner: Scanner::new(max_len),
            waiting: false,
        }
    }

    /// Nothing scanned is waiting to go out and no message is half through.
    fn sent_all(&self) -> bool {
        self.ready == 0 && self.scanner.at_boundary()
    }
}

impl Relay<'_> {
    /// Relays until the transaction ends (or something goes wrong). A cancel sent for
    /// `query_timeout` has landed before this returns, so it can never hit the next client's
    /// query on this server.
    pub async fn run(self) -> Outcome {
        let mut cancelling = None;
        let outcome = self.relay(&mut cancelling).await;
        if let Some(task) = cancelling {
            let _ = task.await;
        }
        outcome
    }

    async fn relay(
        self,
        cancelling: &mut Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    ) -> Outcome {
        let Relay {
            client,
            server,
            cbuf,
            sbuf,
            client_params,
            server_params,
            release_when_idle,
            max_packet_size,
            mut tracker,
            timeouts,
            cancel,
            started,
            stats,
            query_duration,
            telemetry,
        } = self;
        // The clock is read when a query starts and ends; the first start is `started`.
        let mut first_start = Some(Instant::from_std(started));
        // When the query now running started (something awaits ReadyForQuery).
        let mut busy_since: Option<Instant> = None;
        // Made only when a timeout is configured: the default relay has no timer to keep.
        let timed = !timeouts.query.is_zero() || !timeouts.idle_transaction.is_zero();
        let mut timer: Option<Pin<Box<Sleep>>> = None;
        let mut armed: Option<Armed> = None;
        let mut tx = TxState::new();
        let mut up = Flow::new(max_packet_size);
        let mut down = Flow::new(usize::MAX >> 1);
        let mut client_left = false;
        // A Flush was added for the answers in flight (once until the server answers).
        let mut flush_sent = false;
        let abandoned = |tx, up: &Flow, down: &Flow| Abandoned {
            state: tx,
            unsent: up.ready,
            client_mid_message: !up.scanner.at_boundary(),
            server_scanned: down.ready,
            server_scanner: down.scanner,
            statements_uncertain: false,
        };
        let mut event = Event::Buffered;
        loop {
            match event {
                Event::Buffered | Event::FromClient(Ok(1..)) => {
                    let scanned = scan_client(
                        cbuf,
                        &mut up,
                        &mut tx,
                        &mut client_left,
                        &mut tracker,
                        stats,
                    );
                    emit_due(&mut tracker, sbuf, &mut down, tx.status);
                    if let Err(reason) = scanned {
                        let left = abandoned(tx, &up, &down);
                        return Outcome::ClientViolation(left.uncertain(&tracker), reason);
                    }
                }
                Event::FromClient(_) | Event::ToClient(Ok(0) | Err(_)) => client_left = true,
                Event::ToServer(Ok(n @ 1..)) => {
                    stats.received += n as u64;
                    cbuf.advance(n);
                    up.ready -= n;
                }
                Event::ToServer(r) => {
                    let reason = io_reason(r, "writing to the server");
                    return Outcome::ServerLost { state: tx, reason };
                }
                Event::ToClient(Ok(n)) => {
                    stats.sent += n as u64;
                    sbuf.advance(n);
                    down.ready -= n;
                }
                Event::FromServer(Ok(1..)) => {
                    flush_sent = false;
                    let params = (&mut *client_params, &mut *server_params);
                    if let Err(e) = scan_server(
                        sbuf,
                        &mut down,
                        &mut tx,
                        params,
                        &mut tracker,
                        stats,
                        telemetry,
                    ) {
                        return Outcome::ServerLost {
                            state: tx,
                            reason: e.to_string(),
                        };
                    }
                    if up.waiting {
                        // The answers it waited for may have come.
                        let scanned = scan_client(
                            cbuf,
                            &mut up,
                            &mut tx,
                            &mut client_left,
                            &mut tracker,
                            stats,
                        );
                        emit_due(&mut tracker, sbuf, &mut down, tx.status);
                        if let Err(reason) = scanned {
                            let left = abandoned(tx, &up, &down);
                            return Outcome::ClientViolation(left.uncertain(&tracker), reason);
                        }
                    }
                }
                Event::Timer => match armed {
                    Some(Armed::Query {
                        since,
                        answered,
                        cancelled: false,
                    }) => {
                        *cancelling = Some(tokio::spawn(cancel.send()));
                        armed = Some(Armed::Query {
                            since,
                            answered,
                            cancelled: true,
                        });
                        if let Some(t) = timer.as_mut() {
                            t.as_mut().reset(Instant::now() + CANCEL_GRACE);
                        }
                    }
                    Some(Armed::Query {
                        cancelled: true, ..
                    }) => {
                        let left = abandoned(tx, &up, &down).uncertain(&tracker);
                        return Outcome::TimedOut(left, Timeout::Query);
                    }
                    Some(Armed::IdleTransaction { .. }) => {
                        let left = abandoned(tx, &up, &down).uncertain(&tracker);
                        return Outcome::TimedOut(left, Timeout::IdleTransaction);
                    }
                    None => {}
                },
                Event::FromServer(r) => {
                    // Whatever the server said before closing (its FATAL) still reaches the client.
                    let _ = client.write_all(&sbuf[..down.ready]).await;
                    let reason = io_reason(r, "reading from the server");
                    return Outcome::ServerLost { state: tx, reason };
                }
            }
            // Query time, for SHOW STATS: a clock read only when a query starts or ends.
            match (busy_since, tx.pending > 0) {
                (None, true) => busy_since = Some(first_start.take().unwrap_or_else(Instant::now)),
                (Some(since), false) => {
                    let now = Instant::now();
                    stats.last_clock = Some(now.into_std());
                    let took = now.saturating_duration_since(since);
                    stats.query_us += took.as_micros() as u64;
                    query_duration.observe(took.as_secs_f64());
                    busy_since = None;
                }
                _ => {}
            }
            first_start = None;
            if client_left {
                return Outcome::ClientGone(abandoned(tx, &up, &down));
            }
            // Released between transactions, unless the client has begun its next message (a
            // message held back until whole counts: it is not scanned yet). The server's last
            // answers may still be on their way to the client: the session writes them after
            // giving the server back, so a slow reader never holds a server.
            if release_when_idle
                && tx.is_idle()
                && up.sent_all()
                && cbuf.len() < HEADER_LEN
                && down.scanner.at_boundary()
                && down.ready == sbuf.len()
            {
                return Outcome::Released;
            }
            if timed {
                let owed = !tracker.is_idle();
                rearm(&mut armed, &mut timer, &tx, owed, &up, timeouts);
            }
            // Both directions at once: a client that pipelines without reading its results
            // cannot wedge the proxy between two full socket buffers.
            if tracker.in_flight() >= MAX_IN_FLIGHT && !flush_sent && up.scanner.at_boundary() {
                // PostgreSQL keeps small answers in its output buffer until a Sync or Flush;
                // the client's may be behind what is no longer read. Ask for them (a Flush has
                // no answer and changes nothing else).
                splice(cbuf, up.ready, up.ready, FLUSH);
                up.ready += FLUSH.len();
                flush_sent = true;
            }
            let client_may_send = !up.waiting
                && tracker.in_flight() < MAX_IN_FLIGHT
                && sbuf.len() <= MAX_OWED_TO_CLIENT;
            // Both directions and the timer in one poll, server-to-client first: one wake-up
            // serves whatever is ready, and no stream is split (TLS streams cannot be).
            event = std::future::poll_fn(|cx| {
                if down.ready > 0 {
                    if let Poll::Ready(r) = stream::poll_write(client, cx, &sbuf[..down.ready]) {
                        return Poll::Ready(Event::ToClient(r));
                    }
                } else {
                    crate::buffers::fill(sbuf);
                    if let Poll::Ready(r) = stream::poll_read_buf(server, cx, sbuf) {
                        return Poll::Ready(Event::FromServer(r));
                    }
                }
                if up.ready > 0 {
                    if let Poll::Ready(r) = stream::poll_write(server, cx, &cbuf[..up.ready]) {
                        return Poll::Ready(Event::ToServer(r));
                    }
                } else if client_may_send {
                    crate::buffers::fill(cbuf);
                    if let Poll::Ready(r) = stream::poll_read_buf(client, cx, cbuf) {
                        return Poll::Ready(Event::FromClient(r));
                    }
                }
                if let Some(t) = timer.as_mut().filter(|_| armed.is_some())
                    && t.as_mut().poll(cx).is_ready()
                {
                    return Poll::Ready(Event::Timer);
                }
                Poll::Pending
            })
            .await;
        }
    }
}

/// Arms, moves or disarms the timer for the state the transaction is in now. With both timeouts
/// off (the default) this never touches the timer.
fn rearm(
    armed: &mut Option<Armed>,
    timer: &mut Option<Pin<Box<Sleep>>>,
    tx: &TxState,
    responses_owed: bool,
    up: &Flow,
    t: Timeouts,
) {
    let waiting_for_server = tx.pending > 0 || responses_owed;
    // An extended-protocol batch not yet closed by a Sync holds the server just as an open
    // transaction does (Parse/Bind + Flush, then silence).
    let idle_in_transaction =
        !waiting_for_server && (tx.status != b'I' || tx.unsynced) && up.ready == 0;
    let next = match *armed {
        Some(
            a @ Armed::Query {
                answered,
                cancelled,
                ..
            },
        ) if waiting_for_server && (cancelled || answered == tx.answered) => Some(a),
        Some(a @ Armed::IdleTransaction { .. }) if idle_in_transaction => Some(a),
        _ if waiting_for_server && !t.query.is_zero() => Some(Armed::Query {
            since: Instant::now(),
            answered: tx.answered,
            cancelled: false,
        }),
        _ if idle_in_transaction && !t.idle_transaction.is_zero() => Some(Armed::IdleTransaction {
            since: Instant::now(),
        }),
        _ => None,
    };
    if next != *armed {
        match next {
            Some(Armed::Query { since, .. }) => set_timer(timer, since + t.query),
            Some(Armed::IdleTransaction { since }) => set_timer(timer, since + t.idle_transaction),
            None => {}
        }
        *armed = next;
    }
}

/// Points the relay's timer at `deadline`, making it on first use.
fn set_timer(timer: &mut Option<Pin<Box<Sleep>>>, deadline: Instant) {
    match timer {
        Some(t) => t.as_mut().reset(deadline),
        None => *timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
    }
}

fn io_reason(r: std::io::Result<usize>, doing: &str) -> String {
    match r {
        Ok(_) => format!("connection closed while {doing}"),
        Err(e) => format!("{e} while {doing}"),
    }
}

/// Scans newly read client bytes: counts what the server will answer, lets the tracker rewrite
/// named-statement messages, and stops at Terminate.
fn scan_client(
    cbuf: &mut BytesMut,
    up: &mut Flow,
    state: &mut TxState,
    client_left: &mut bool,
    tracker: &mut Tracker,
    stats: &mut TxStats,
) -> Result<(), String> {
    up.waiting = false;
    loop {
        let hold = |tag, len| match tag {
            b'X' => len,
            _ => tracker.hold(tag, len),
        };
        let item = up
            .scanner
            .next(cbuf, up.ready, hold)
            .map_err(|e| e.to_string())?;
        let (tag, start, mut end) = match item {
            Item::End => return Ok(()),
            Item::Body { to } => {
                up.ready = to;
                continue;
            }
            Item::Message { tag, start, end } => (tag, start, end),
        };
        if tag == b'X' {
            cbuf.truncate(start);
            *client_left = true;
            return Ok(());
        }
        if !is_frontend_message(tag) {
            return Err(format!("invalid frontend message type '{}'", tag as char));
        }
        if tracker.must_wait(tag, &cbuf[start..end], state.pending) {
            up.waiting = true;
            return Ok(());
        }
        let mut unanswered = false;
        match tracker.on_client_message(tag, &cbuf[start..end], state.status) {
            ClientAction::Forward => {}
            ClientAction::Unanswered => unanswered = true,
            ClientAction::Replace => {
                splice(cbuf, start, end, tracker.out);
                end = start + tracker.out.len();
                // Nothing sent for it: the proxy answers it itself.
                unanswered = tracker.out.is_empty();
            }
        }
        match tag {
            b'Q' | b'F' | b'S' if unanswered => {}
            b'Q' | b'F' => state.pending += 1,
            b'S' => {
                state.pending += 1;
                state.unsynced = false;
            }
            b'P' => {
                stats.client_parses += 1;
                state.unsynced = true;
            }
            b'B' => {
                stats.binds += 1;
                state.unsynced = true;
            }
            b'D' | b'C' | b'E' => state.unsynced = true,
            _ => {}
        }
        up.ready = end;
    }
}

/// Replaces `buf[start..end]` with `with`, in place.
fn splice(buf: &mut BytesMut, start: usize, end: usize, with: &[u8]) {
    let (old, new, len) = (end - start, with.len(), buf.len());
    if new > old {
        buf.resize(len + new - old, 0);
        buf.copy_within(end..len, end + new - old);
    } else if new < old {
        buf.copy_within(end..len, start + new);
        buf.truncate(len - (old - new));
    }
    buf[start..start + new].copy_from_slice(with);
}

/// Puts the responses the proxy owes (now due) into the client's stream, between messages.
fn emit_due(tracker: &mut Tracker, sbuf: &mut BytesMut, down: &mut Flow, status: u8) {
    if !down.scanner.at_boundary() {
        return; // mid-message: they go out at the next boundary
    }
    let mut due = std::mem::take(tracker.out);
    due.clear();
    tracker.take_due(&mut due, status);
    if !due.is_empty() {
        splice(sbuf, down.ready, down.ready, &due);
        down.ready += due.len();
    }
    *tracker.out = due;
}

/// Scans newly read server bytes: transaction status, parameter changes, fatal errors.
fn scan_server(
    sbuf: &mut BytesMut,
    down: &mut Flow,
    state: &mut TxState,
    (client_params, server_params): (&mut Params, &mut Params),
    tracker: &mut Tracker,
    stats: &mut TxStats,
    telemetry: &crate::metrics::Telemetry,
) -> Result<(), FrameError> {
    let held = |tag, len| match matches!(tag, b'Z' | b'S' | b'E') || Tracker::held_from_server(tag)
    {
        true => len,
        false => 0,
    };
    loop {
        let ready = &mut down.ready;
        match down.scanner.next(sbuf, *ready, held)? {
            Item::End => {
                if sbuf.len() - *ready > MAX_HELD_SERVER_MESSAGE {
                    let tag = sbuf[*ready] as char;
                    return Err(FrameError::TooLong {
                        tag,
                        len: sbuf.len(),
                        max: MAX_HELD_SERVER_MESSAGE,
                    });
                }
                return Ok(());
            }
            Item::Body { to } => {
                *ready = to;
                // A response the proxy owes may have been waiting for this message to end.
                emit_due(tracker, sbuf, down, state.status);
            }
            Item::Message { tag, start, end } => {
                let end =
                    match tracker.on_server_message(tag, &sbuf[start..end], &mut state.pending) {
                        ServerAction::Forward => end,
                        ServerAction::Drop => {
                            // An answer to a message the proxy added: the client never asked.
                            splice(sbuf, start, end, &[]);
                            emit_due(tracker, sbuf, down, state.status);
                            continue;
                        }
                        ServerAction::Replace => {
                            splice(sbuf, start, end, tracker.out);
                            start + tracker.out.len()
                        }
                    };
                let body = &sbuf[start + HEADER_LEN..end];
                if tag == b'E' && is_fatal(body) && state.is_idle() && tracker.is_idle() {
                    // The server is going away (shut down, terminated) between transactions:
                    // its FATAL answers nothing this client asked, and the client goes on with
                    // another server. Not forwarded; the pool drops the dead connection.
                    state.server_fatal = true;
                    splice(sbuf, start, end, &[]);
                    continue;
                }
                match tag {
                    b'Z' => {
                        state.answered += 1;
                        stats.queries += 1;
                        if body.first() == Some(&b'I') {
                            stats.xacts += 1;
                        }
                        state.pending = state.pending.saturating_sub(1);
                        state.status = body.first().copied().unwrap_or(b'I');
                        state.copy_in = false;
                    }
                    b'S' => {
                        let mut pos = 0;
                        if let (Some(name), Some(value)) = (
                            crate::protocol::frame::cstr(body, &mut pos),
                            crate::protocol::frame::cstr(body, &mut pos),
                        ) {
                            server_params.set_reported(name, value);
                            client_params.set(name, value);
                        }
                    }
                    b'E' => {
                        state.server_fatal |= is_fatal(body);
                        telemetry.error(sqlstate_of(body).unwrap_or("XX000"));
                    }
                    b'G' => state.copy_in = true,
                    _ => {}
                }
                down.ready = end;
                emit_due(tracker, sbuf, down, state.status);
            }
        }
    }
}

/// The SQLSTATE field of an ErrorResponse body.
fn sqlstate_of(body: &[u8]) -> Option<&str> {
    let mut pos = 0;
    while let Some(&field) = body.get(pos) {
        pos += 1;
        let value = crate::protocol::frame::cstr(body, &mut pos)?;
        if field == b'C' {
            return Some(value);
        }
    }
    None
}

/// True when an ErrorResponse body has severity FATAL or PANIC.
pub fn is_fatal(body: &[u8]) -> bool {
    let mut pos = 0;
    while let Some(&field) = body.get(pos) {
        pos += 1;
        let Some(value) = crate::protocol::frame::cstr(body, &mut pos) else {
            return false;
        };
        if field == b'V' || field == b'S' {
            return value == "FATAL" || value == "PANIC";
        }
    }
    false
}
