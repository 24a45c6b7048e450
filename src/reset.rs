//! Getting a server back to a clean, idle state after its client left it mid-transaction or with
//! work in flight (or, in session mode, after every client). Until this finishes the server stays
//! checked out, so the pool's cap still counts it and nobody else can see its results. If it does
//! not finish in time the server is closed instead.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::params::Params;
use crate::pool::Server;
use crate::protocol::frame::{HEADER_LEN, Item, Scanner};
use crate::protocol::sql::Leftovers;
use crate::relay::TxState;
use crate::server::{ApplyError, ServerConn};

/// How long a server may take to become idle again before it is closed.
pub const RESET_TIMEOUT: Duration = Duration::from_secs(10);

/// What is needed to bring a server back from where its client left it.
pub struct Reset {
    pub state: TxState,
    /// Complete client messages that had not reached the server yet; they are sent, so the
    /// server ends in the state the client asked for before it is rolled back.
    pub unsent: Bytes,
    /// Server output read but not yet scanned, and where the stream stands.
    pub server_output: BytesMut,
    pub server_scanner: Scanner,
    /// `server_reset_query`, in session mode (or with `server_reset_query_always`).
    pub reset_query: Option<String>,
    /// Which named statements the server has is not known for sure: drop them all.
    pub forget_statements: bool,
}

impl Reset {
    /// Completes what the client sent, cancels what runs, rolls back, runs the reset query, and
    /// returns the server to its pool; closes it when any step fails or takes too long.
    pub async fn run(self, mut server: Server) {
        let state = self.state;
        match tokio::time::timeout(RESET_TIMEOUT, self.reset(&mut server)).await {
            Ok(Ok(())) => server.dirty = false,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "closing a server that could not be reset");
                close(server, state, false).await;
            }
            Err(_) => {
                tracing::debug!("closing a server that did not become idle in time");
                close(server, state, false).await;
            }
        }
    }

    async fn reset(self, server: &mut Server) -> Result<(), String> {
        let Reset {
            mut state,
            unsent,
            mut server_output,
            mut server_scanner,
            reset_query,
            forget_statements,
        } = self;
        let err = |e: std::io::Error| e.to_string();
        let mut out = BytesMut::from(&unsent[..]);
        if state.copy_in {
            frontend::copy_fail("client disconnected", &mut out).map_err(err)?;
        }
        if state.unsynced {
            // A Sync would commit what the batch did; PostgreSQL itself rolls an unsynced batch
            // back when its client leaves, and so does closing the connection.
            return Err("the client left an extended-query batch without Sync".into());
        }
        if state.pending > 0 {
            // Stop whatever runs instead of waiting for it. The cancel has been delivered when
            // `send` returns, so it cannot hit the ROLLBACK below.
            let _ = server.cancel.send().await;
        }
        server.stream.write_all(&out).await.map_err(err)?;
        drain(server, &mut state, &mut server_output, &mut server_scanner).await?;
        if state.status != b'I' {
            server
                .simple_query("ROLLBACK")
                .await
                .map_err(|e| e.to_string())?;
        }
        if forget_statements {
            server.leftovers |= Leftovers::PREPARED;
        }
        clean(server, None, reset_query.as_deref())
            .await
            .map_err(|e| e.to_string())
    }
}

/// Removes the session state a client left on `server` (see [`Leftovers`]) in one round trip,
/// then runs `reset_query` if given. Settings the client changed with a session-level `SET`
/// that the proxy tracks but the server does not report (`search_path` before PostgreSQL 18)
/// are read back into `client` first, so the client keeps them on its next server, as on a
/// direct connection. Nothing is sent when nothing was left.
pub async fn clean(
    server: &mut ServerConn,
    client: Option<&mut Params>,
    reset_query: Option<&str>,
) -> Result<(), ApplyError> {
    let left = server.leftovers;
    let mut sql = String::new();
    let read_back: Vec<String> = match &client {
        Some(client) if left.contains(Leftovers::SETTINGS) => client
            .unreported(&server.params)
            .map(str::to_owned)
            .collect(),
        _ => Vec::new(),
    };
    if !read_back.is_empty() {
        let names: Vec<String> = read_back
            .iter()
            .map(|n| crate::params::quote(&n.to_ascii_lowercase()))
            .collect();
        sql.push_str(&format!(
            "SELECT name, setting, setting = reset_val FROM pg_settings \
             WHERE lower(name) IN ({});",
            names.join(",")
        ));
    }
    let steps = [
        (
            Leftovers::ROLE,
            "SET SESSION AUTHORIZATION DEFAULT;RESET ROLE;",
        ),
        (Leftovers::SETTINGS, "RESET ALL;"),
        (Leftovers::LISTEN, "UNLISTEN *;"),
        (Leftovers::CURSORS, "CLOSE ALL;"),
        (Leftovers::PREPARED, "DEALLOCATE ALL;"),
        (Leftovers::TEMP, "DISCARD TEMP;"),
        (Leftovers::LOCKS, "SELECT pg_advisory_unlock_all();"),
    ];
    // A settings reset also resets the role (RESET ALL does not): a client that changed
    // settings in a way the proxy could not read (a DO block, say) may have changed it too.
    let left_role = if left.contains(Leftovers::SETTINGS) {
        left | Leftovers::ROLE
    } else {
        left
    };
    for (kind, step) in steps {
        if left_role.contains(kind) {
            sql.push_str(step);
        }
    }
    if !left.contains(Leftovers::PREPARED) {
        for name in server.statements.take_all_stale() {
            sql.push_str(&format!("DEALLOCATE {name};"));
        }
    }
    if !sql.is_empty() {
        tracing::debug!(%sql, "cleaning a server's session state");
        let rows = server.query_rows(&sql).await?;
        if let Some(client) = client
            && !read_back.is_empty()
        {
            for name in read_back {
                let row = rows.iter().find(|r| {
                    r.first()
                        .and_then(Option::as_deref)
                        .is_some_and(|n| n.eq_ignore_ascii_case(&name))
                });
                // A row that says the setting equals its reset value: the default.
                let value = match row.map(|r| (r.get(1).cloned().flatten(), r.get(2))) {
                    Some((Some(v), Some(Some(same)))) if same == "f" => Some(v),
                    _ => None,
                };
                client.put(&name, value);
            }
        }
        if left.contains(Leftovers::SETTINGS) {
            server.params.reset_unreported();
        }
        if left.contains(Leftovers::PREPARED) {
            server.statements.clear();
        }
        server.leftovers = Leftovers::NONE;
    }
    if let Some(query) = reset_query.filter(|q| !q.trim().is_empty()) {
        server.simple_query(query).await?;
        // What the reset did to the parameters the server does not report is not known: they
        // are assumed back at their defaults (what DISCARD ALL and RESET ALL do).
        server.params.reset_unreported();
        server.statements.clear();
        server.leftovers = Leftovers::NONE;
    }
    Ok(())
}

/// Closes a server for good: cancels what may still run, says Terminate, and waits (briefly)
/// for PostgreSQL to close its end, so the backend is gone before the pool counts the slot free.
/// `mid_message`: the server has part of a client message, so a Terminate would be read as the
/// rest of it; only the end of the stream is sent then.
pub async fn close(server: Server, state: TxState, mid_message: bool) {
    let mut server = crate::pool::Server::detach(server);
    server.closing(crate::metrics::CloseReason::ResetFailed);
    if state.pending > 0 || state.unsynced {
        let _ = server.cancel.send().await;
    }
    let goodbye = async {
        if !mid_message {
            let mut out = BytesMut::new();
            frontend::terminate(&mut out);
            server.stream.write_all(&out).await?;
        }
        server.stream.shutdown().await?;
        let mut sink = [0u8; 4096];
        while server.stream.read(&mut sink).await? > 0 {}
        Ok::<_, std::io::Error>(())
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), goodbye).await;
}

/// Reads and discards server output until every outstanding Sync/Query is answered.
async fn drain(
    server: &mut Server,
    state: &mut TxState,
    buf: &mut BytesMut,
    scanner: &mut Scanner,
) -> Result<(), String> {
    let mut pos = 0;
    while state.pending > 0 {
        match scanner
            .next(buf, pos, |t, len| if t == b'Z' { len } else { 0 })
            .map_err(|e| e.to_string())?
        {
            Item::Body { to } => pos = to,
            Item::Message {
                tag: b'Z',
                start,
                end,
            } => {
                state.pending -= 1;
                state.status = buf.get(start + HEADER_LEN).copied().unwrap_or(b'I');
                pos = end;
            }
            Item::Message { end, .. } => pos = end,
            Item::End => {
                let _ = buf.split_to(pos);
                pos = 0;
                buf.reserve(16 * 1024);
                if server
                    .stream
                    .read_buf(buf)
                    .await
                    .map_err(|e| e.to_string())?
                    == 0
                {
                    return Err("server closed the connection".into());
                }
            }
        }
    }
    if !scanner.at_boundary() || buf.len() > pos {
        return Err("server sent more than was asked".into());
    }
    Ok(())
}
