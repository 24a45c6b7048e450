//! Getting a server back to a clean, idle state after its client left it mid-transaction or with
//! work in flight (or, in session mode, after every client). Until this finishes the server stays
//! checked out, so the pool's cap still counts it and nobody else can see its results. If it does
//! not finish in time the server is closed instead.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::pool::Server;
use crate::protocol::frame::{HEADER_LEN, Item, Scanner};
use crate::relay::TxState;

/// How long a server may take to become idle again before it is closed.
const RESET_TIMEOUT: Duration = Duration::from_secs(10);

/// What is needed to bring a server back from where its client left it.
pub struct Reset {
    pub state: TxState,
    /// Complete client messages that had not reached the server yet; they are sent, so the
    /// server ends in the state the client asked for before it is rolled back.
    pub unsent: Bytes,
    /// Server output read but not yet scanned, and where the stream stands.
    pub server_output: BytesMut,
    pub server_scanner: Scanner,
    /// `server_reset_query`, in session mode.
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
            server
                .simple_query("DEALLOCATE ALL")
                .await
                .map_err(|e| e.to_string())?;
            server.statements.clear();
        }
        if let Some(sql) = reset_query.filter(|q| !q.trim().is_empty()) {
            server.simple_query(&sql).await.map_err(|e| e.to_string())?;
            // What the reset did to the session parameters is not all reported: forget them,
            // so the next client's are set again.
            server.params = crate::params::Params::default();
            server.statements.clear();
        }
        Ok(())
    }
}

/// Closes a server for good: cancels what may still run, says Terminate, and waits (briefly)
/// for PostgreSQL to close its end, so the backend is gone before the pool counts the slot free.
/// `mid_message`: the server has part of a client message, so a Terminate would be read as the
/// rest of it; only the end of the stream is sent then.
pub async fn close(server: Server, state: TxState, mid_message: bool) {
    let mut server = deadpool::managed::Object::take(server);
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
            .next(buf, pos, |t, _| t == b'Z')
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
