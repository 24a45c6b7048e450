//! The places of one pool: idle servers on a stack, a count of servers open, and a FIFO queue of
//! clients waiting for a place.
//!
//! Why not a general-purpose pool crate: every transaction checks a server out and back in, so
//! that round trip is the pooler's hot path. Here a checkout that finds an idle server takes one
//! short lock and pops it; a return pushes it back (or hands it straight to the first waiter).
//! No semaphore, no timer, no other task woken, no future beyond the caller's. Only a client that
//! has to queue pays for a channel and a timer.
//!
//! A place is either a server or room to open one. A waiter receives a place, never a bare
//! notification, so a place freed while clients queue always goes to the one that came first.

use std::collections::VecDeque;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::manager::Manager;
use crate::error::UpstreamError;
use crate::metrics::CloseReason;
use crate::server::ServerConn;

/// A place handed to a waiting client.
enum Grant {
    /// A server, fresh from another client.
    Server(Box<ServerConn>),
    /// Room to open a server (one closed, or the pool grew).
    Room,
}

/// A server idle in the pool, and since when.
struct Idle {
    conn: Box<ServerConn>,
    since: Instant,
}

struct State {
    /// Idle servers; the last one back goes out first (it is warm, the others can idle out).
    idle: Vec<Idle>,
    /// Servers open (idle, held by clients or logging in) that count against `max`.
    open: usize,
    max: usize,
    /// Clients waiting for a place, first come first served. Entries whose client gave up are
    /// skipped when their turn comes.
    waiters: VecDeque<oneshot::Sender<Grant>>,
    closed: bool,
}

/// Why a checkout got no server.
#[derive(Debug)]
pub enum GetError {
    Upstream(UpstreamError),
    /// No place came free before the deadline.
    Timeout,
    Closed,
}

impl From<UpstreamError> for GetError {
    fn from(e: UpstreamError) -> Self {
        GetError::Upstream(e)
    }
}

/// One pool's places (`pool_size`, or `reserve_pool_size` for a reserve).
pub struct Slots {
    pub manager: Manager,
    state: Mutex<State>,
}

/// What a checkout found.
enum Found {
    Place(Option<Box<ServerConn>>),
    /// Full: the receiver gets the next place freed.
    Queued(oneshot::Receiver<Grant>),
    /// Full, and the caller does not queue.
    Busy,
}

impl Slots {
    pub fn new(manager: Manager, max: usize) -> Arc<Slots> {
        Arc::new(Slots {
            manager,
            state: Mutex::new(State {
                idle: Vec::new(),
                open: 0,
                max,
                waiters: VecDeque::new(),
                closed: false,
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A server now if one is idle or can be opened (`None` when the pool is full).
    pub async fn try_get(self: &Arc<Self>) -> Result<Option<Server>, GetError> {
        match self.find(false)? {
            Found::Place(conn) => self.fill(conn).await.map(Some),
            Found::Queued(_) | Found::Busy => Ok(None),
        }
    }

    /// A server, waiting (first come, first served) until `deadline` (`None`: no limit) for a
    /// place when the pool is full. The deadline bounds the queue, not the login that follows
    /// (the manager bounds that by `server_connect_timeout`, whose error says more). Only a
    /// client that queues arms a timer. Cancel-safe: a place handed to a waiter that has gone
    /// is passed on.
    pub async fn get(
        self: &Arc<Self>,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<Server, GetError> {
        let conn = match self.find(true)? {
            Found::Place(conn) => conn,
            Found::Queued(rx) => match (Waiting { rx, slots: self }).granted(deadline).await? {
                Grant::Server(conn) => Some(conn),
                Grant::Room => None,
            },
            Found::Busy => unreachable!("a queueing checkout is never refused"),
        };
        self.fill(conn).await
    }

    /// Takes a place: an idle server, room to open one, or (`queue`) a place in the queue.
    fn find(&self, queue: bool) -> Result<Found, GetError> {
        let mut state = self.lock();
        if state.closed {
            return Err(GetError::Closed);
        }
        while state.waiters.front().is_some_and(|w| w.is_closed()) {
            state.waiters.pop_front();
        }
        // Places freed while clients queue go to them: nobody overtakes the queue.
        if state.waiters.is_empty() {
            if let Some(idle) = state.idle.pop() {
                return Ok(Found::Place(Some(idle.conn)));
            }
            if state.open < state.max {
                state.open += 1;
                return Ok(Found::Place(None));
            }
        }
        if !queue {
            return Ok(Found::Busy);
        }
        let (tx, rx) = oneshot::channel();
        state.waiters.push_back(tx);
        Ok(Found::Queued(rx))
    }

    /// Turns a place into a usable server: the server given if it passes the checks, else a new
    /// one opened in its place. If opening fails, the place is given up.
    async fn fill(self: &Arc<Self>, conn: Option<Box<ServerConn>>) -> Result<Server, GetError> {
        let mut room = Room(Some(self));
        if let Some(conn) = conn {
            match self.manager.check(&conn) {
                Ok(()) => {
                    room.keep();
                    return Ok(Server::new(conn, self.clone()));
                }
                Err(reason) => conn.closing(reason),
            }
        }
        let conn = Box::new(self.manager.create().await?);
        room.keep();
        Ok(Server::new(conn, self.clone()))
    }

    /// A server back from its client: to the first waiter, else onto the idle stack. A server
    /// left dirty, or beyond a lowered `max`, is closed.
    fn put(&self, conn: Box<ServerConn>) {
        if conn.dirty {
            conn.closing(CloseReason::Killed);
            drop(conn);
            self.free_room();
            return;
        }
        let mut state = self.lock();
        if state.closed || state.open > state.max {
            state.open -= 1;
            drop(state);
            conn.closing(CloseReason::Cap);
            return;
        }
        let mut grant = Grant::Server(conn);
        while let Some(waiter) = state.waiters.pop_front() {
            match waiter.send(grant) {
                Ok(()) => return,
                Err(back) => grant = back,
            }
        }
        let Grant::Server(conn) = grant else {
            unreachable!("it was a server")
        };
        state.idle.push(Idle {
            conn,
            since: Instant::now(),
        });
    }

    /// A place whose server is gone (closed, detached, or never opened): room for the first
    /// waiter, else one less open.
    fn free_room(&self) {
        let mut state = self.lock();
        Self::free_room_locked(&mut state);
    }

    fn free_room_locked(state: &mut State) {
        if !state.closed && state.open <= state.max {
            while let Some(waiter) = state.waiters.pop_front() {
                if waiter.send(Grant::Room).is_ok() {
                    return;
                }
            }
        }
        state.open -= 1;
    }

    /// Servers open (idle, held, logging in).
    pub fn size(&self) -> usize {
        self.lock().open
    }

    /// Servers idle.
    pub fn available(&self) -> usize {
        self.lock().idle.len()
    }

    /// Moves the limit. Raising it gives room to waiters at once; lowering it closes idle servers
    /// now and held ones as they come back.
    pub fn resize(&self, max: usize) {
        let mut closing = Vec::new();
        {
            let mut state = self.lock();
            state.max = max;
            while state.open > max
                && let Some(idle) = state.idle.pop()
            {
                idle.conn.closing(CloseReason::Cap);
                closing.push(idle.conn);
                state.open -= 1;
            }
            while state.open < max && !state.waiters.is_empty() {
                state.open += 1;
                Self::free_room_locked(&mut state);
                if state.waiters.is_empty() {
                    break;
                }
            }
        }
        drop(closing); // sockets closed outside the lock
    }

    /// Keeps the idle servers `keep` says yes to (given each one's idle time); the others are
    /// closed (`keep` records why) and their places freed.
    pub fn retain(&self, mut keep: impl FnMut(&ServerConn, Duration) -> bool) {
        let mut closing = Vec::new();
        {
            let mut state = self.lock();
            let now = Instant::now();
            let idle = std::mem::take(&mut state.idle);
            for entry in idle {
                if keep(&entry.conn, now.saturating_duration_since(entry.since)) {
                    state.idle.push(entry);
                } else {
                    closing.push(entry.conn);
                    Self::free_room_locked(&mut state);
                }
            }
        }
        drop(closing);
    }

    /// Shuts the pool: idle servers close, waiters are told, returning servers close.
    pub fn close(&self) {
        let (idle, waiters) = {
            let mut state = self.lock();
            state.closed = true;
            state.open -= state.idle.len();
            (
                std::mem::take(&mut state.idle),
                std::mem::take(&mut state.waiters),
            )
        };
        drop(waiters); // their receivers see the pool closed
        drop(idle);
    }

    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }
}

/// A place being filled (a server checked or opened); dropped unfilled, the place is freed.
struct Room<'a>(Option<&'a Slots>);

impl Room<'_> {
    fn keep(&mut self) {
        self.0 = None;
    }
}

impl Drop for Room<'_> {
    fn drop(&mut self) {
        if let Some(slots) = self.0 {
            slots.free_room();
        }
    }
}

/// A client in the queue. Dropped (the client left, or its wait timed out) after a place was
/// handed to it but before it took it, it passes the place on.
struct Waiting<'a> {
    rx: oneshot::Receiver<Grant>,
    slots: &'a Slots,
}

impl Waiting<'_> {
    /// The place, once handed over by `deadline` (`None`: no limit; the pool closed: an error).
    /// Once received it is the caller's, and the drop below finds nothing to pass on; a waiter
    /// that times out is dropped, and so passes on a place handed to it meanwhile.
    async fn granted(mut self, deadline: Option<tokio::time::Instant>) -> Result<Grant, GetError> {
        let place = &mut self.rx;
        let got = match deadline {
            None => place.await,
            Some(deadline) => tokio::time::timeout_at(deadline, place)
                .await
                .map_err(|_| GetError::Timeout)?,
        };
        got.map_err(|_| GetError::Closed)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.rx.close();
        match self.rx.try_recv() {
            Ok(Grant::Server(conn)) => self.slots.put(conn),
            Ok(Grant::Room) => self.slots.free_room(),
            Err(_) => {}
        }
    }
}

/// A checked-out server; dropping it returns the server to its pool.
pub struct Server {
    /// Boxed, so checkouts and returns move a pointer, not the connection.
    conn: Option<Box<ServerConn>>,
    slots: Arc<Slots>,
}

impl Server {
    fn new(conn: Box<ServerConn>, slots: Arc<Slots>) -> Server {
        Server {
            conn: Some(conn),
            slots,
        }
    }

    /// Takes the connection out of the pool for good (to close it): its place is freed now.
    pub fn detach(mut this: Server) -> Box<ServerConn> {
        let conn = this.conn.take().expect("a server is detached once");
        this.slots.free_room();
        conn
    }
}

impl Deref for Server {
    type Target = ServerConn;
    fn deref(&self) -> &ServerConn {
        self.conn
            .as_ref()
            .expect("a held server has its connection")
    }
}

impl DerefMut for Server {
    fn deref_mut(&mut self) -> &mut ServerConn {
        self.conn
            .as_mut()
            .expect("a held server has its connection")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            self.slots.put(conn);
        }
    }
}
