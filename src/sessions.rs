//! Who is connected: every logged-in client and every server connection, for the admin console
//! (SHOW CLIENTS, SHOW SERVERS, SHOW POOLS) and its switches (KILL, KILL_CLIENT).
//!
//! A session registers once, at login; what changes per transaction (state, times, the server it
//! holds) is a few relaxed atomic stores, never a lock.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime};

use atomic_waker::AtomicWaker;

/// Microseconds since the process started: what the per-session timestamps hold.
pub fn now_us() -> u64 {
    us_at(Instant::now())
}

/// [`now_us`] for a clock reading already taken.
pub fn us_at(at: Instant) -> u64 {
    at.saturating_duration_since(started()).as_micros() as u64
}

/// When the process started (the first call).
pub fn started() -> Instant {
    static STARTED: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *STARTED.get_or_init(Instant::now)
}

/// The wall-clock time of a [`now_us`] timestamp.
pub fn wall_clock(us: u64) -> SystemTime {
    let age = started()
        .elapsed()
        .saturating_sub(std::time::Duration::from_micros(us));
    SystemTime::now() - age
}

/// What a client is doing (PgBouncer's client states).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ClientState {
    /// Logged in, no query waiting.
    Idle = 0,
    /// Sent a query and waits for a server (queue, PAUSE).
    Waiting = 1,
    /// Holds a server.
    Active = 2,
}

/// A flag that wakes the one task watching it: how a session learns it was killed. Polling it is
/// lock-free, so watching it on every wake-up of a transaction costs nothing measurable.
#[derive(Default)]
pub struct Kill {
    set: AtomicBool,
    waker: AtomicWaker,
}

impl Kill {
    pub fn fire(&self) {
        self.set.store(true, Ordering::Release);
        self.waker.wake();
    }

    pub fn is_set(&self) -> bool {
        self.set.load(Ordering::Acquire)
    }

    /// Resolves once [`Kill::fire`] has been called.
    pub fn fired(&self) -> Fired<'_> {
        Fired(self)
    }
}

/// The future of [`Kill::fired`].
pub struct Fired<'a>(&'a Kill);

impl std::future::Future for Fired<'_> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0.is_set() {
            return Poll::Ready(());
        }
        self.0.waker.register(cx.waker());
        match self.0.is_set() {
            true => Poll::Ready(()),
            false => Poll::Pending,
        }
    }
}

/// One logged-in client.
pub struct ClientInfo {
    pub id: u64,
    pub user: String,
    pub database: String,
    pub addr: SocketAddr,
    pub local_addr: SocketAddr,
    pub application_name: String,
    /// Its TLS protocol and cipher suite; empty for plain text.
    pub tls: String,
    pub connect_time: SystemTime,
    state: AtomicU8,
    /// When the current state began ([`now_us`]); for a waiting client, when it started waiting.
    since: AtomicU64,
    /// When the client last sent a request ([`now_us`]).
    pub request_time: AtomicU64,
    /// The upstream pid of the server it holds (0: none).
    pub server_pid: AtomicI32,
    /// Named statements it has prepared.
    pub prepared_statements: AtomicU32,
    pub kill: Kill,
    /// Shutdown: close when idle (fired for every client by the stopping proxy).
    pub stop: Kill,
}

impl ClientInfo {
    pub fn state(&self) -> ClientState {
        match self.state.load(Ordering::Relaxed) {
            1 => ClientState::Waiting,
            2 => ClientState::Active,
            _ => ClientState::Idle,
        }
    }

    /// Moves to `state` at `now` ([`now_us`]).
    pub fn set_state(&self, state: ClientState, now: u64) {
        self.state.store(state as u8, Ordering::Relaxed);
        self.since.store(now, Ordering::Relaxed);
    }

    /// Microseconds the client has been waiting for a server (0 when not waiting).
    pub fn waiting_us(&self, now: u64) -> u64 {
        match self.state() {
            ClientState::Waiting => now.saturating_sub(self.since.load(Ordering::Relaxed)),
            _ => 0,
        }
    }
}

/// What a server connection is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ServerState {
    Idle = 0,
    Active = 1,
}

/// One server connection.
pub struct ServerInfo {
    pub id: u64,
    /// The pool's database (the name clients ask for) and upstream user.
    pub database: String,
    pub user: String,
    pub addr: String,
    pub local_addr: Option<SocketAddr>,
    pub remote_pid: i32,
    /// Its TLS protocol and cipher suite; empty for plain text.
    pub tls: String,
    pub connect_time: SystemTime,
    state: AtomicU8,
    pub request_time: AtomicU64,
    /// The client holding it (0: none).
    pub client_id: AtomicU64,
    /// Closed when next released (RECONNECT, a reload that changed its upstream).
    pub close_needed: AtomicBool,
    pub prepared_statements: AtomicU32,
}

impl ServerInfo {
    pub fn state(&self) -> ServerState {
        match self.state.load(Ordering::Relaxed) {
            1 => ServerState::Active,
            _ => ServerState::Idle,
        }
    }

    pub fn set_state(&self, state: ServerState) {
        self.state.store(state as u8, Ordering::Relaxed);
    }
}

/// What a new client registration describes.
pub struct NewClient {
    pub user: String,
    pub database: String,
    pub addr: SocketAddr,
    pub local_addr: SocketAddr,
    pub application_name: String,
    pub tls: String,
}

/// What a new server registration describes.
pub struct NewServer {
    pub database: String,
    pub user: String,
    pub addr: String,
    pub local_addr: Option<SocketAddr>,
    pub remote_pid: i32,
    pub tls: String,
}

/// Every client and server connection, by id. Entries leave when their handle drops.
#[derive(Default)]
pub struct Sessions {
    next_id: AtomicU64,
    clients: Mutex<HashMap<u64, Weak<ClientInfo>>>,
    servers: Mutex<HashMap<u64, Weak<ServerInfo>>>,
    /// Logins in progress (StartupMessage read, not yet logged in).
    pub logging_in: AtomicU64,
}

/// A registration; dropping it removes the entry.
pub struct Registered<T> {
    pub info: Arc<T>,
    sessions: Weak<Sessions>,
    id: u64,
    server: bool,
}

impl<T> std::ops::Deref for Registered<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.info
    }
}

impl<T> Drop for Registered<T> {
    fn drop(&mut self) {
        let Some(sessions) = self.sessions.upgrade() else {
            return;
        };
        match self.server {
            true => lock(&sessions.servers).remove(&self.id).map(|_| ()),
            false => lock(&sessions.clients).remove(&self.id).map(|_| ()),
        };
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Sessions {
    fn id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed) + 1
    }

    pub fn add_client(self: &Arc<Self>, new: NewClient) -> Registered<ClientInfo> {
        let now = now_us();
        let info = Arc::new(ClientInfo {
            id: self.id(),
            user: new.user,
            database: new.database,
            addr: new.addr,
            local_addr: new.local_addr,
            application_name: new.application_name,
            tls: new.tls,
            connect_time: SystemTime::now(),
            state: AtomicU8::new(ClientState::Idle as u8),
            since: AtomicU64::new(now),
            request_time: AtomicU64::new(now),
            server_pid: AtomicI32::new(0),
            prepared_statements: AtomicU32::new(0),
            kill: Kill::default(),
            stop: Kill::default(),
        });
        lock(&self.clients).insert(info.id, Arc::downgrade(&info));
        Registered {
            id: info.id,
            info,
            sessions: Arc::downgrade(self),
            server: false,
        }
    }

    pub fn add_server(self: &Arc<Self>, new: NewServer) -> Registered<ServerInfo> {
        let info = Arc::new(ServerInfo {
            id: self.id(),
            database: new.database,
            user: new.user,
            addr: new.addr,
            local_addr: new.local_addr,
            remote_pid: new.remote_pid,
            tls: new.tls,
            connect_time: SystemTime::now(),
            state: AtomicU8::new(ServerState::Idle as u8),
            request_time: AtomicU64::new(now_us()),
            client_id: AtomicU64::new(0),
            close_needed: AtomicBool::new(false),
            prepared_statements: AtomicU32::new(0),
        });
        lock(&self.servers).insert(info.id, Arc::downgrade(&info));
        Registered {
            id: info.id,
            info,
            sessions: Arc::downgrade(self),
            server: true,
        }
    }

    /// Every logged-in client, oldest first.
    pub fn clients(&self) -> Vec<Arc<ClientInfo>> {
        let mut all: Vec<_> = lock(&self.clients)
            .values()
            .filter_map(Weak::upgrade)
            .collect();
        all.sort_by_key(|c| c.id);
        all
    }

    /// Every server connection, oldest first.
    pub fn servers(&self) -> Vec<Arc<ServerInfo>> {
        let mut all: Vec<_> = lock(&self.servers)
            .values()
            .filter_map(Weak::upgrade)
            .collect();
        all.sort_by_key(|s| s.id);
        all
    }

    pub fn client(&self, id: u64) -> Option<Arc<ClientInfo>> {
        lock(&self.clients).get(&id).and_then(Weak::upgrade)
    }
}
