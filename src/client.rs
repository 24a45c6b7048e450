//! One client session: the startup handshake and login, then the transaction loop (wait for the
//! client's next message, check a server out, relay until the transaction ends, give it back).

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::stream::Stream;

use crate::cancel::ClientCancel;
use crate::config::Config;
use crate::config::PoolMode;
use crate::params::{self, Params};
use crate::pool::{CheckoutError, Server, ServerPool};
use crate::protocol::backend::{self, Severity};
use crate::protocol::frame::{self, FrameError, HEADER_LEN, ReadError};
use crate::protocol::pipeline::{Scratch, Tracker};
use crate::protocol::prepared::ClientStatements;
use crate::protocol::sqlstate;
use crate::protocol::startup::{StartupError, StartupPacket};
use crate::relay::{Abandoned, Outcome, Relay, Timeout, Timeouts};
use crate::sessions::{ClientInfo, ClientState, NewClient, Registered, ServerState, now_us};
use crate::shared::Shared;
use crate::stats::TxStats;

/// Most a client may send ahead while it waits for a server.
const MAX_READ_AHEAD: usize = 64 * 1024;

/// Why a client is being turned away; each carries the SQLSTATE it is sent with.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0}")]
    Protocol(String),
    #[error("password authentication failed for user \"{0}\"")]
    BadPassword(String),
    #[error("{0}")]
    AuthSetup(String),
    #[error("database \"{0}\" does not exist")]
    UnknownDatabase(String),
    #[error("{0}")]
    Checkout(#[from] CheckoutError),
    #[error("{message}")]
    Server { code: String, message: String },
    #[error("client_login_timeout: login not completed in time")]
    LoginTimeout,
    #[error("floodgate is shutting down")]
    Shutdown,
    #[error(transparent)]
    Limit(#[from] crate::limits::LimitError),
    #[error("terminating connection: idle in transaction for longer than idle_transaction_timeout")]
    IdleTransactionTimeout,
    #[error(
        "canceling statement due to query_timeout; the server did not answer the cancel in time, so the connection is closed"
    )]
    QueryTimeout,
    #[error("terminating connection: idle for longer than client_idle_timeout")]
    IdleTimeout,
    #[error(
        "database \"{0}\" is disabled (DISABLE by an operator): new connections are refused; \
         ENABLE on the admin console lifts it"
    )]
    Disabled(String),
    #[error("terminating connection: closed by an operator (KILL on the admin console)")]
    Killed,
    #[error("terminating connection: database \"{0}\" was removed from the configuration")]
    DatabaseRemoved(String),
    #[error("user \"{0}\" may not use the admin console: add it to admin_users or stats_users")]
    NotConsoleUser(String),
    #[error("too many failed logins from {ip} (auth_failure_limit): refused for another {secs} s")]
    Banned { ip: std::net::IpAddr, secs: u64 },
    #[error("{0}")]
    HbaRejected(String),
    #[error(
        "SSL/TLS required (client_tls_sslmode = {0}): connect with sslmode=require or stronger"
    )]
    TlsRequired(String),
    #[error(
        "startup parameter \"{0}\" is not allowed through Floodgate: it would change the \
         identity servers are shared under"
    )]
    IdentityParameter(String),
    #[error(
        "replication connections are not supported by Floodgate; connect to PostgreSQL directly"
    )]
    Replication,
    /// The client went away; nothing can be sent.
    #[error("client disconnected")]
    Gone,
}

impl ClientError {
    pub fn sqlstate(&self) -> String {
        match self {
            ClientError::Protocol(_) | ClientError::LoginTimeout => {
                sqlstate::PROTOCOL_VIOLATION.into()
            }
            ClientError::BadPassword(_) => sqlstate::INVALID_PASSWORD.into(),
            ClientError::AuthSetup(_) => sqlstate::INVALID_AUTHORIZATION.into(),
            ClientError::UnknownDatabase(_) => sqlstate::UNKNOWN_DATABASE.into(),
            ClientError::Checkout(CheckoutError::WaitTimeout(_)) => {
                sqlstate::TOO_MANY_CONNECTIONS.into()
            }
            ClientError::Checkout(CheckoutError::Upstream(e)) => e.sqlstate(),
            ClientError::Checkout(CheckoutError::Closed) | ClientError::Shutdown => {
                sqlstate::ADMIN_SHUTDOWN.into()
            }
            ClientError::Server { code, .. } => code.clone(),
            ClientError::Gone => sqlstate::CONNECTION_FAILURE.into(),
            ClientError::Limit(_) => sqlstate::TOO_MANY_CONNECTIONS.into(),
            ClientError::IdleTransactionTimeout => sqlstate::IDLE_IN_TRANSACTION_TIMEOUT.into(),
            ClientError::QueryTimeout => sqlstate::QUERY_CANCELED.into(),
            ClientError::IdleTimeout => sqlstate::IDLE_SESSION_TIMEOUT.into(),
            ClientError::Disabled(_) => sqlstate::CANNOT_CONNECT_NOW.into(),
            ClientError::Killed | ClientError::DatabaseRemoved(_) => {
                sqlstate::ADMIN_SHUTDOWN.into()
            }
            ClientError::NotConsoleUser(_) => sqlstate::INSUFFICIENT_PRIVILEGE.into(),
            ClientError::Banned { .. }
            | ClientError::HbaRejected(_)
            | ClientError::TlsRequired(_)
            | ClientError::IdentityParameter(_) => sqlstate::INVALID_AUTHORIZATION.into(),
            ClientError::Replication => sqlstate::FEATURE_NOT_SUPPORTED.into(),
        }
    }
}

impl From<StartupError> for ClientError {
    fn from(e: StartupError) -> Self {
        match e {
            StartupError::Io(_) => ClientError::Gone,
            e => ClientError::Protocol(e.to_string()),
        }
    }
}

impl From<ReadError> for ClientError {
    fn from(e: ReadError) -> Self {
        match e {
            ReadError::Io(_) => ClientError::Gone,
            ReadError::Frame(e) => ClientError::Protocol(e.to_string()),
        }
    }
}

impl From<std::io::Error> for ClientError {
    fn from(_: std::io::Error) -> Self {
        ClientError::Gone
    }
}

/// Serves one accepted connection to the end.
pub async fn serve(tcp: TcpStream, shared: Arc<Shared>) {
    let _ = tcp.set_nodelay(true);
    let timeout = shared.config().floodgate.client_login_timeout;
    let deadline = (!timeout.is_zero()).then(|| tokio::time::Instant::now() + timeout);
    let config = shared.config();
    // The handshake is bounded too: a client that stalls inside it is dropped.
    let opening = Box::pin(crate::tls::accept::open(tcp, &config.tls, deadline));
    let opened = match deadline {
        None => opening.await,
        Some(at) => {
            let grace = at + std::time::Duration::from_secs(1);
            match tokio::time::timeout_at(grace, opening).await {
                Ok(opened) => opened,
                Err(_) => return,
            }
        }
    };
    drop(config);
    let Some(mut stream) = opened.stream else {
        return;
    };
    let result = match opened.first {
        Ok(first) => serve_opened(&mut stream, first, deadline, &shared).await,
        Err(e) => Err(e),
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "client connection closed with an error");
        count(&shared, &e);
        fatal(&mut stream, &e).await;
    }
}

/// Logs the client in (within `client_login_timeout`) and serves its session or console.
async fn serve_opened(
    stream: &mut Stream,
    first: StartupPacket,
    deadline: Option<tokio::time::Instant>,
    shared: &Arc<Shared>,
) -> Result<(), ClientError> {
    // Boxed, like each transaction below: the task of an idle client keeps only what it needs
    // between transactions, not the space the login or a relay takes.
    let login = Box::pin(async {
        match deadline {
            None => login(stream, first, shared).await,
            Some(at) => tokio::time::timeout_at(at, login(stream, first, shared))
                .await
                .unwrap_or(Err(ClientError::LoginTimeout)),
        }
    });
    let logins = &shared.sessions.logging_in;
    logins.fetch_add(1, Relaxed);
    let login = login.await;
    logins.fetch_sub(1, Relaxed);
    match login? {
        Some(Login::Session(session)) => session.run(stream).await,
        Some(Login::Console { user, role }) => {
            crate::admin::serve(stream, shared.clone(), &user, role).await;
            Ok(())
        }
        None => Ok(()),
    }
}

/// Counts a session's end for `/metrics`: the FATAL sent, and the timeout or refusal behind it.
fn count(shared: &Shared, e: &ClientError) {
    let telemetry = &shared.stats.telemetry;
    if matches!(e, ClientError::Gone) {
        return;
    }
    telemetry.error(&e.sqlstate());
    let timeout = match e {
        ClientError::LoginTimeout => Some("client_login_timeout"),
        ClientError::IdleTransactionTimeout => Some("idle_transaction_timeout"),
        ClientError::QueryTimeout => Some("query_timeout"),
        ClientError::IdleTimeout => Some("client_idle_timeout"),
        ClientError::Checkout(CheckoutError::WaitTimeout(_)) => Some("query_wait_timeout"),
        _ => None,
    };
    if let Some(kind) = timeout {
        telemetry.timeouts.with_label_values(&[kind]).inc();
    }
    let refused = match e {
        ClientError::BadPassword(_) => Some("authentication"),
        ClientError::UnknownDatabase(_) => Some("unknown_database"),
        ClientError::Disabled(_) => Some("disabled"),
        ClientError::NotConsoleUser(_) => Some("console_access"),
        ClientError::Banned { .. } => Some("auth_failure_ban"),
        ClientError::HbaRejected(_) => Some("hba"),
        ClientError::TlsRequired(_) => Some("tls_required"),
        ClientError::IdentityParameter(_) | ClientError::Replication => Some("startup_parameter"),
        ClientError::Limit(limit) => Some(limit.setting()),
        _ => None,
    };
    if let Some(reason) = refused {
        telemetry.refused.with_label_values(&[reason]).inc();
    }
}

/// Sends a FATAL ErrorResponse for `e` (if the client can still hear it).
async fn fatal(stream: &mut Stream, e: &ClientError) {
    if matches!(e, ClientError::Gone) {
        return;
    }
    let mut buf = BytesMut::new();
    backend::error(&mut buf, Severity::Fatal, &e.sqlstate(), &e.to_string());
    let _ = stream.write_all(&buf).await;
    let _ = stream.shutdown().await;
}

/// How `user` must authenticate to `database` from `ip`: `hba_file` decides when there is one,
/// else `auth_type`.
fn auth_type_for(
    config: &Config,
    ip: std::net::IpAddr,
    tls: bool,
    database: &str,
    user: &str,
) -> Result<crate::config::AuthType, ClientError> {
    use crate::auth::hba::Decision;
    let Some(hba) = &config.hba else {
        return Ok(config.floodgate.auth_type);
    };
    let encryption = if tls {
        "SSL encryption"
    } else {
        "no encryption"
    };
    match hba.decide(ip, tls, database, user) {
        Decision::Allow(auth_type, _) => Ok(auth_type),
        Decision::Reject(line) => Err(ClientError::HbaRejected(format!(
            "hba_file line {line} rejects connection for host \"{ip}\", user \"{user}\", database \"{database}\""
        ))),
        Decision::NoMatch => Err(ClientError::HbaRejected(format!(
            "no hba_file entry for host \"{ip}\", user \"{user}\", database \"{database}\", {encryption}"
        ))),
    }
}

/// What a login leads to.
enum Login {
    Session(Box<Session>),
    /// The admin console, authenticated.
    Console {
        user: String,
        role: crate::admin::Role,
    },
}

/// A logged-in client.
struct Session {
    shared: Arc<Shared>,
    /// The configuration as of this client's last transaction (a reload replaces it).
    config: Arc<Config>,
    pool: Arc<ServerPool>,
    /// Its entry in SHOW CLIENTS, which KILL reaches it through.
    info: Registered<ClientInfo>,
    params: Params,
    cancel: ClientCancel,
    /// Bytes read from the client and not yet forwarded.
    cbuf: BytesMut,
    /// Bytes read from a server and not yet forwarded.
    sbuf: BytesMut,
    /// This client's named prepared statements (transaction mode).
    statements: ClientStatements,
    scratch: Scratch,
    /// Places held in the per-database and per-user client counts.
    _admitted: Vec<crate::limits::Admitted>,
}

/// Logs in the client whose first packet (after any TLS negotiation) was `first`; `None` for
/// a cancel request.
async fn login(
    stream: &mut Stream,
    first: StartupPacket,
    shared: &Arc<Shared>,
) -> Result<Option<Login>, ClientError> {
    let (minor, startup_params) = match first {
        StartupPacket::Cancel { pid, secret } => {
            if let Some(target) = shared.cancels.target(pid, secret) {
                shared.stats.telemetry.cancels.inc();
                let _ = target.send().await;
            }
            return Ok(None);
        }
        StartupPacket::Startup { minor, params } => (minor, params),
        StartupPacket::SslRequest | StartupPacket::GssEncRequest => {
            return Err(ClientError::Protocol(
                "encryption requested after negotiation".into(),
            ));
        }
    };
    if let Some(mode) = shared.config().tls.client_mode
        && mode.requires_tls()
        && !stream.is_tls()
    {
        return Err(ClientError::TlsRequired(crate::tls::mode_name(mode)));
    }
    let config = shared.config();
    let names = shared.pools.param_names.clone();
    let mut user = None;
    let mut database = None;
    let mut client_params = Params::new(names.clone());
    let mut unsupported = Vec::new();
    let ignored = |n: &str| {
        let ignore = &config.floodgate.ignore_startup_parameters;
        ignore.iter().any(|i| i.eq_ignore_ascii_case(n))
    };
    let mut settings = Vec::new();
    for (name, value) in &startup_params {
        match name.as_str() {
            "user" => user = Some(value.clone()),
            "database" => database = Some(value.clone()),
            "options" if !ignored("options") => {
                let parsed = params::parse_options(value).map_err(|part| {
                    ClientError::Protocol(format!(
                        "unsupported startup option \"{part}\": only -c name=value and \
                         --name=value are accepted in options"
                    ))
                })?;
                settings.extend(parsed);
            }
            n if n.starts_with("_pq_.") => unsupported.push(name.clone()),
            "replication" => return Err(ClientError::Replication),
            _ => settings.push((name.clone(), value.clone())),
        }
    }
    for (name, value) in &settings {
        if ["role", "session_authorization"].contains(&name.to_ascii_lowercase().as_str()) {
            return Err(ClientError::IdentityParameter(name.clone()));
        }
        if Params::tracked(&names, name).is_some() {
            client_params.set(name, value);
        } else if !ignored(name) {
            return Err(ClientError::Protocol(format!(
                "unsupported startup parameter: {name} (add it to track_extra_parameters to \
                 apply it per client, or to ignore_startup_parameters to ignore it)"
            )));
        }
    }
    let user = user.filter(|u| !u.is_empty()).ok_or_else(|| {
        ClientError::Protocol("no PostgreSQL user name specified in startup packet".into())
    })?;
    let database = database
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| user.clone());
    if minor > 0 || !unsupported.is_empty() {
        let mut buf = BytesMut::new();
        backend::negotiate_protocol_version(&mut buf, unsupported);
        stream.write_all(&buf).await?;
    }

    let ip = stream
        .peer_addr()
        .map_or(std::net::IpAddr::from([0, 0, 0, 0]), |a| a.ip());
    if let Some(left) = shared.lockout.banned(ip) {
        return Err(ClientError::Banned {
            ip,
            secs: left.as_secs() + 1,
        });
    }
    let auth_type = auth_type_for(&config, ip, stream.is_tls(), &database, &user)?;
    // Users not configured here may be looked up in PostgreSQL (auth_query).
    let looked_up = match shared.users().get(&user) {
        Some(_) => None,
        None if crate::admin::is_console(&database) => None,
        None => crate::auth::query::lookup(shared, &database, &user).await,
    };
    let login =
        crate::auth::client::authenticate(stream, shared, &user, auth_type, looked_up.as_ref());
    match login.await {
        Err(ClientError::BadPassword(user)) => {
            let g = &config.floodgate;
            let (limit, window, ban) = (
                g.auth_failure_limit,
                g.auth_failure_window,
                g.auth_failure_ban,
            );
            if shared.lockout.failed(ip, limit, window, ban) {
                tracing::warn!(%ip, "auth_failure_limit reached: {ip} refused for {ban:?}");
            }
            return Err(ClientError::BadPassword(user));
        }
        other => other?,
    }
    if crate::admin::is_console(&database) {
        let role = crate::admin::role(shared, &user)
            .ok_or_else(|| ClientError::NotConsoleUser(user.clone()))?;
        return Ok(Some(Login::Console { user, role }));
    }
    let pool = shared
        .pool(&database, &user)
        .ok_or_else(|| ClientError::UnknownDatabase(database.clone()))?;
    if pool.switch.position().disabled() {
        return Err(ClientError::Disabled(database));
    }
    let admitted = shared
        .limits
        .admit_login(&config.floodgate, &database, &user)?;
    let defaults = pool.defaults().await?;

    // The client sees the server's reported parameters, with the values it asked for at
    // startup; the ones the server does not report stay the client's own (or the default).
    let mut params = client_params;
    let cancel = shared.cancels.register();
    let mut out = BytesMut::new();
    backend::auth_ok(&mut out);
    for (name, value) in defaults.iter() {
        match params.get(name) {
            Some(wanted) => backend::parameter_status(&mut out, name, wanted),
            None => {
                params.set(name, value);
                backend::parameter_status(&mut out, name, value);
            }
        }
    }
    backend::backend_key_data(&mut out, cancel.pid, cancel.secret);
    backend::ready_for_query(&mut out, b'I');
    stream.write_all(&out).await?;
    let unknown = std::net::SocketAddr::from(([0, 0, 0, 0], 0));
    let info = shared.sessions.add_client(NewClient {
        application_name: params
            .get("application_name")
            .unwrap_or_default()
            .to_owned(),
        user,
        database,
        addr: stream.peer_addr().unwrap_or(unknown),
        local_addr: stream.local_addr().unwrap_or(unknown),
        tls: stream.tls_description(),
    });
    pool.stats.add(crate::stats::idx::LOGINS, 1);
    Ok(Some(Login::Session(Box::new(Session {
        shared: shared.clone(),
        pool,
        info,
        params,
        cancel,
        cbuf: BytesMut::new(),
        sbuf: BytesMut::new(),
        statements: ClientStatements::with_limit(config.floodgate.max_client_prepared_statements),
        scratch: Scratch::default(),
        _admitted: admitted,
        config,
    }))))
}

/// What the client did while it held no server.
enum Idle {
    /// A complete message header is buffered.
    Message,
    Gone,
}

impl Session {
    /// The transaction loop, until the client leaves.
    async fn run(mut self: Box<Self>, stream: &mut Stream) -> Result<(), ClientError> {
        let info = self.info.info.clone();
        // Shutdown and KILL: lock-free flags, cheap to poll at every wake-up. A session that
        // starts after the shutdown began sees the proxy-wide flag instead of its own.
        if *self.shared.shutdown.borrow() {
            return Err(ClientError::Shutdown);
        }
        let mut stop = std::pin::pin!(info.stop.fired());
        let mut killed = std::pin::pin!(info.kill.fired());
        loop {
            // Between transactions a client holds no buffer (unless it sent more already).
            crate::buffers::release(&mut self.cbuf);
            crate::buffers::release(&mut self.sbuf);
            self.scratch.shrink();
            self.shared.refresh_config(&mut self.config);
            let idle_timeout = self.config.floodgate.client_idle_timeout;
            // Biased: the client's message is what usually wakes an idle session, and no random
            // draw is needed to pick a branch.
            let idle = tokio::select! {
                biased;
                idle = self.wait_for_message(stream) => idle?,
                _ = &mut stop => return Err(ClientError::Shutdown),
                _ = &mut killed => return Err(ClientError::Killed),
                // Lazy: the timer (and its clock read) exists only when the timeout is on.
                _ = async { tokio::time::sleep(idle_timeout).await }, if !idle_timeout.is_zero() => {
                    return Err(ClientError::IdleTimeout);
                }
            };
            if let Idle::Gone = idle {
                return Ok(());
            }
            let goes_on = tokio::select! {
                biased;
                goes_on = Box::pin(self.next_transaction(stream)) => goes_on?,
                _ = &mut killed => return Err(ClientError::Killed),
            };
            if !goes_on {
                return Ok(());
            }
        }
    }

    /// Gets a server for the client's next message and relays until the transaction ends.
    /// `Ok(true)` when the client goes on.
    async fn next_transaction(&mut self, stream: &mut Stream) -> Result<bool, ClientError> {
        loop {
            // One load for the kill switch; the rest only runs while a switch is on.
            let position = self.pool.switch.position();
            if !position.is_clear() || self.pool.is_retired() {
                match Box::pin(self.switched(stream, position)).await? {
                    Switched::Go => {}
                    Switched::Again => continue,
                    Switched::Done(goes_on) => return Ok(goes_on),
                }
            }
            // A free server if there is one now; otherwise a batch of Parse messages can be
            // answered without one, and anything else waits in the queue.
            let (server, waited_us) = match self.pool.try_checkout().await? {
                Some(server) => (server, 0),
                None if self.prepared_without_server(stream).await? => return Ok(true),
                None => {
                    let since = now_us();
                    self.info.set_state(ClientState::Waiting, since);
                    let Some(mut server) = self.checkout(stream).await? else {
                        return Ok(false);
                    };
                    if self.pool.switch.position().paused() {
                        // PAUSE came while it queued: the server goes back untouched and the
                        // client waits for RESUME.
                        server.dirty = false;
                        continue;
                    }
                    (server, now_us().saturating_sub(since))
                }
            };
            return self.transaction(stream, server, waited_us).await;
        }
    }

    /// What the kill switch (or a reload) says about the next transaction.
    async fn switched(
        &mut self,
        stream: &mut Stream,
        position: crate::switch::Position,
    ) -> Result<Switched, ClientError> {
        if self.pool.is_retired() {
            // A reload replaced the pool (or removed the database): move to the new one.
            let (db, user) = (&self.info.database, &self.info.user);
            self.pool = self
                .shared
                .pool(db, user)
                .ok_or_else(|| ClientError::DatabaseRemoved(db.clone()))?;
            return Ok(Switched::Again);
        }
        if position.paused() {
            self.info.set_state(ClientState::Waiting, now_us());
            let switch = self.pool.switch.clone();
            return match self.wait_watching(stream, switch.until_resumed()).await? {
                Some(()) => Ok(Switched::Again),
                None => Ok(Switched::Done(false)),
            };
        }
        if position.sheds() {
            return self.shed(stream).await.map(Switched::Done);
        }
        Ok(Switched::Go)
    }

    /// SHED: the client's next request fails at once with ERROR 53300, without a server, as
    /// PostgreSQL fails a request: everything up to its Sync is skipped, then ReadyForQuery.
    /// `Ok(true)` when the client goes on.
    async fn shed(&mut self, stream: &mut Stream) -> Result<bool, ClientError> {
        let max = self.config.floodgate.max_packet_size;
        let mut told = false;
        // Bytes of the current message still to skip (large ones are not buffered whole).
        let mut skip = 0usize;
        loop {
            if skip > 0 {
                let n = skip.min(self.cbuf.len());
                let _ = self.cbuf.split_to(n);
                skip -= n;
            }
            let header = match skip {
                0 => frame::header(&self.cbuf, max)?,
                _ => None,
            };
            let Some((tag, len)) = header else {
                if read_small(stream, &mut self.cbuf).await? == 0 {
                    return Ok(false);
                }
                continue;
            };
            if tag == b'X' {
                return Ok(false);
            }
            let mut out = BytesMut::new();
            if !told {
                backend::error(
                    &mut out,
                    Severity::Error,
                    sqlstate::TOO_MANY_CONNECTIONS,
                    &format!(
                        "shed by operator: the transaction was not run (SHED {} on the \
                         admin console); retry later",
                        self.info.database
                    ),
                );
                self.shared
                    .stats
                    .telemetry
                    .error(sqlstate::TOO_MANY_CONNECTIONS);
                told = true;
            }
            skip = HEADER_LEN + len;
            let done = matches!(tag, b'S' | b'Q' | b'F');
            if done {
                backend::ready_for_query(&mut out, b'I');
            }
            if !out.is_empty() {
                stream.write_all(&out).await?;
            }
            if done {
                let n = skip.min(self.cbuf.len());
                let _ = self.cbuf.split_to(n);
                if n < skip {
                    // The rest of the request's last message is still to come: skip it too.
                    return Box::pin(self.skip_bytes(stream, skip - n)).await;
                }
                return Ok(true);
            }
        }
    }

    /// Reads and drops `n` bytes from the client. `Ok(false)` if it leaves first.
    async fn skip_bytes(&mut self, stream: &mut Stream, mut n: usize) -> Result<bool, ClientError> {
        while n > 0 {
            if self.cbuf.is_empty() && read_small(stream, &mut self.cbuf).await? == 0 {
                return Ok(false);
            }
            let k = n.min(self.cbuf.len());
            let _ = self.cbuf.split_to(k);
            n -= k;
        }
        Ok(true)
    }

    /// Reads until a whole message header is buffered. Terminate or end of stream: `Gone`.
    /// With nothing buffered it waits for the socket without holding a buffer.
    async fn wait_for_message(&mut self, stream: &mut Stream) -> Result<Idle, ClientError> {
        loop {
            match frame::header(&self.cbuf, self.config.floodgate.max_packet_size) {
                Ok(Some((b'X', _))) => return Ok(Idle::Gone),
                Ok(Some((tag, _))) if crate::relay::is_frontend_message(tag) => {
                    return Ok(Idle::Message);
                }
                Ok(Some((tag, _))) => {
                    return Err(ClientError::Protocol(format!(
                        "invalid frontend message type '{}'",
                        tag as char
                    )));
                }
                Ok(None) => {}
                Err(e) => return Err(ClientError::Protocol(e.to_string())),
            }
            if read_small(stream, &mut self.cbuf).await? == 0 {
                return Ok(Idle::Gone);
            }
        }
    }

    /// Answers a batch of Parse messages and a Sync without a server, when statements are
    /// tracked; `true` when it did. Only used when every server is busy: with a server, the
    /// statements are checked by PostgreSQL at once, as the client expects.
    async fn prepared_without_server(&mut self, stream: &mut Stream) -> Result<bool, ClientError> {
        let g = &self.config.floodgate;
        if self.pool.mode != PoolMode::Transaction || g.max_prepared_statements == 0 {
            return Ok(false);
        }
        let mut out = BytesMut::new();
        let registry = &self.shared.statements;
        let Some(used) = self.statements.prepare_without_server(
            registry,
            &self.cbuf,
            g.max_packet_size,
            &mut out,
        ) else {
            return Ok(false);
        };
        let _ = self.cbuf.split_to(used);
        stream.write_all(&out).await?;
        Ok(true)
    }

    /// Waits in the pool's queue; notices a client that leaves meanwhile (`None`).
    async fn checkout(&mut self, stream: &mut Stream) -> Result<Option<Server>, ClientError> {
        // Boxed: waiting in the queue is the uncommon path, and its future is large.
        let pool = self.pool.clone();
        let checkout = Box::pin(async move { pool.checkout().await });
        match self.wait_watching(stream, checkout).await? {
            Some(server) => Ok(Some(server?)),
            None => Ok(None),
        }
    }

    /// Waits for `wait` while noticing a client that leaves meanwhile (`None`).
    async fn wait_watching<F: std::future::Future>(
        &mut self,
        stream: &mut Stream,
        wait: F,
    ) -> Result<Option<F::Output>, ClientError> {
        let mut wait = std::pin::pin!(wait);
        loop {
            // Reading on only notices a client that leaves; what it sends meanwhile is held up
            // to a bound, then it waits (backpressure).
            if self.cbuf.len() >= MAX_READ_AHEAD {
                return Ok(Some(wait.await));
            }
            tokio::select! {
                done = &mut wait => return Ok(Some(done)),
                read = read_small(stream, &mut self.cbuf) => {
                    if read.unwrap_or(0) == 0 {
                        return Ok(None);
                    }
                }
            }
        }
    }

    /// One attachment to `server`: a transaction (or, in session mode, the whole session).
    /// `Ok(true)` when the client goes on.
    async fn transaction(
        &mut self,
        stream: &mut Stream,
        server: Server,
        waited_us: u64,
    ) -> Result<bool, ClientError> {
        let clock = std::time::Instant::now();
        let started = crate::sessions::us_at(clock);
        self.info.set_state(ClientState::Active, started);
        self.info.request_time.store(started, Relaxed);
        self.info.server_pid.store(server.cancel.pid, Relaxed);
        if let Some(info) = &server.info {
            info.set_state(ServerState::Active);
            info.client_id.store(self.info.id, Relaxed);
            info.request_time.store(started, Relaxed);
        }
        let mut held = Held(Some(server));
        let mut stats = TxStats::default();
        let result = self.attached(stream, &mut held, &mut stats, clock).await;
        // A transaction released at its last ReadyForQuery ended when the relay last read the
        // clock; anything else (session mode, errors) ends now.
        let now = match (&result, stats.last_clock) {
            (Ok(true), Some(clock)) if self.pool.mode == PoolMode::Transaction => {
                crate::sessions::us_at(clock)
            }
            _ => now_us(),
        };
        self.info.set_state(ClientState::Idle, now);
        self.info.server_pid.store(0, Relaxed);
        let prepared = self.statements.len() as u32;
        self.info.prepared_statements.store(prepared, Relaxed);
        let held_us = now.saturating_sub(started);
        self.pool.stats.record(&stats, held_us, waited_us);
        result
    }

    /// The attachment itself; the server is in `held` (taken out when handed on).
    async fn attached(
        &mut self,
        stream: &mut Stream,
        held: &mut Held,
        stats: &mut TxStats,
        started: std::time::Instant,
    ) -> Result<bool, ClientError> {
        let Some(server) = held.0.as_mut() else {
            return Ok(true);
        };
        // Boxed, like the cleaning below: rare work whose futures would otherwise make every
        // transaction's larger.
        if server.params.differs(&self.params)
            && let Err(e) = Box::pin(server.apply_params(&mut self.params)).await
        {
            let (code, message) = match &e {
                crate::server::ApplyError::Rejected { code, message } => {
                    (code.clone(), message.clone())
                }
                crate::server::ApplyError::Upstream(u) => (u.sqlstate(), u.to_string()),
            };
            held.close();
            return Err(ClientError::Server { code, message });
        }
        let session_mode = self.pool.mode == PoolMode::Session;
        self.cancel.set(Some(server.cancel));
        let server_ref: &mut crate::server::ServerConn = server;
        // Session mode keeps the client on one server: its statements need no rewriting.
        let max_statements = match session_mode {
            true => 0,
            false => self.config.floodgate.max_prepared_statements,
        };
        let leftovers = (!session_mode).then_some(&mut server_ref.leftovers);
        let tracker = Tracker::new(
            &self.shared.statements,
            &mut self.statements,
            &mut server_ref.statements,
            leftovers,
            max_statements,
            &mut self.scratch,
        );
        let outcome = Relay {
            client: stream,
            server: &mut server_ref.stream,
            cbuf: &mut self.cbuf,
            sbuf: &mut self.sbuf,
            client_params: &mut self.params,
            server_params: &mut server_ref.params,
            release_when_idle: !session_mode,
            max_packet_size: self.config.floodgate.max_packet_size,
            tracker,
            timeouts: Timeouts {
                query: self.config.floodgate.query_timeout,
                idle_transaction: self.config.floodgate.idle_transaction_timeout,
            },
            cancel: server_ref.cancel,
            started,
            stats,
            query_duration: &self.pool.stats.metrics.query,
            telemetry: &self.shared.stats.telemetry,
        }
        .run()
        .await;
        self.cancel.set(None);
        if !matches!(outcome, Outcome::Released) {
            return self.after_relay(held.take(), outcome);
        }
        self.clean(server).await;
        if let Some(info) = &server.info {
            info.set_state(ServerState::Idle);
            info.client_id.store(0, Relaxed);
            info.prepared_statements
                .store(server.statements.len() as u32, Relaxed);
        }
        drop(held.take());
        stats.sent += self.sbuf.len() as u64;
        stream.write_all(&self.sbuf).await?;
        self.sbuf.clear();
        Ok(true)
    }

    /// A relay that ended otherwise than by releasing the server between transactions.
    fn after_relay(&mut self, server: Server, outcome: Outcome) -> Result<bool, ClientError> {
        match outcome {
            Outcome::Released => unreachable!("handled by the caller"),
            Outcome::ClientGone(left) => {
                self.abandon(server, left);
                Ok(false)
            }
            Outcome::TimedOut(left, Timeout::IdleTransaction) => {
                self.abandon(server, left);
                Err(ClientError::IdleTransactionTimeout)
            }
            Outcome::TimedOut(left, Timeout::Query) => {
                tokio::spawn(crate::reset::close(
                    server,
                    left.state,
                    left.client_mid_message,
                ));
                Err(ClientError::QueryTimeout)
            }
            Outcome::ClientViolation(left, reason) => {
                self.abandon(server, left);
                Err(ClientError::Protocol(reason))
            }
            Outcome::ServerLost { state, reason } => {
                tracing::warn!(pool = %self.pool.name, %reason, "server connection lost");
                Held(Some(server)).close();
                self.sbuf.clear();
                if state.server_fatal {
                    Err(ClientError::Gone)
                } else {
                    Err(ClientError::Server {
                        code: sqlstate::CONNECTION_FAILURE.into(),
                        message: format!(
                            "server connection lost ({reason}); the transaction did not complete"
                        ),
                    })
                }
            }
        }
    }

    /// Removes the session state this client's transaction left on `server` before anyone else
    /// gets it (nothing to do, and no round trip, on the common path); a server that cannot be
    /// cleaned is closed.
    async fn clean(&mut self, server: &mut Server) {
        let g = &self.config.floodgate;
        let reset_query = g
            .server_reset_query_always
            .then_some(g.server_reset_query.as_str());
        if server.leftovers.is_empty() && !server.statements.has_stale() && reset_query.is_none() {
            server.dirty = false;
            return;
        }
        let cleaning = Box::pin(crate::reset::clean(
            server,
            Some(&mut self.params),
            reset_query,
        ));
        match tokio::time::timeout(crate::reset::RESET_TIMEOUT, cleaning).await {
            Ok(Ok(())) => server.dirty = false,
            Ok(Err(e)) => tracing::warn!(error = %e, "closing a server that could not be cleaned"),
            Err(_) => tracing::warn!("closing a server that took too long to clean"),
        }
    }

    /// Hands a server the client no longer uses to a task that makes it clean (or closes it).
    fn abandon(&mut self, mut server: Server, left: Abandoned) {
        let session_mode = self.pool.mode == PoolMode::Session;
        if left.client_mid_message {
            // The server waits for the rest of a message that will never come.
            tokio::spawn(crate::reset::close(server, left.state, true));
            return;
        }
        let server_output_done =
            left.server_scanner.at_boundary() && self.sbuf.len() == left.server_scanned;
        if left.state.is_idle()
            && server.leftovers.is_empty()
            && !server.statements.has_stale()
            && !self.config.floodgate.server_reset_query_always
            && !left.statements_uncertain
            && !left.state.copy_in
            && left.unsent == 0
            && server_output_done
            && !session_mode
        {
            server.dirty = false;
            return;
        }
        let unsent = self
            .cbuf
            .split_to(left.unsent.min(self.cbuf.len()))
            .freeze();
        let server_output = self
            .sbuf
            .split_off(left.server_scanned.min(self.sbuf.len()));
        let g = &self.config.floodgate;
        let reset_query =
            (session_mode || g.server_reset_query_always).then(|| g.server_reset_query.clone());
        let job = crate::reset::Reset {
            state: left.state,
            unsent,
            server_output,
            server_scanner: left.server_scanner,
            reset_query,
            forget_statements: left.statements_uncertain,
        };
        tokio::spawn(job.run(server));
    }
}

/// What the kill switch says about the next transaction.
enum Switched {
    /// Nothing stops it.
    Go,
    /// Look again (the pool changed, or the database was resumed).
    Again,
    /// Handled without a server: `true` when the client goes on.
    Done(bool),
}

/// The server a session holds. If the session's task ends while it still holds one in an
/// unknown state (KILL drops the transaction's future), the connection is closed at once rather
/// than put back in the pool with a transaction open.
struct Held(Option<Server>);

impl Held {
    /// The server, handed on (to the pool, a reset task...).
    fn take(&mut self) -> Server {
        self.0.take().expect("a held server is taken once")
    }

    /// Closes the connection instead of returning it to the pool.
    fn close(&mut self) {
        if let Some(server) = self.0.take() {
            drop(crate::pool::Server::detach(server));
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(server) = self.0.as_ref().filter(|s| s.dirty) {
            server.closing(crate::metrics::CloseReason::Killed);
            self.close();
        }
    }
}

/// Waits for the client's socket and reads what it sent, without a full-size buffer: an idle or
/// queued client holds only its own bytes. `Ok(0)` at the end of the stream.
async fn read_small(stream: &mut Stream, cbuf: &mut BytesMut) -> Result<usize, ClientError> {
    let read = std::future::poll_fn(|cx| crate::buffers::poll_read_small(stream, cx, cbuf));
    Ok(read.await?)
}

impl From<FrameError> for ClientError {
    fn from(e: FrameError) -> Self {
        ClientError::Protocol(e.to_string())
    }
}
