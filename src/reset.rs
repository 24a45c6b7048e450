//! Getting a server back to a clean, idle state after its client left it mid-transaction or with
//! work in flight (or, in session mode, after every client). Until this finishes the server stays
//! checked out, so the pool's cap still counts it and nobody else can see its results. If it does
//! not finish in time the server is closed instead.

use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::pool::Server;
use crate::protocol::frame::{Item, Scanner};
use crate::relay::TxState;

/// How long a server may take to become idle again before it is closed.
const RESET_TIMEOUT: Duration = Duration::from_secs(10);

/// Completes what the client sent, cancels what runs, rolls back, runs `reset_query` if given,
/// and returns the server to its pool; closes it when any step fails.
pub async fn reset_and_return(
    mut server: Server,
    state: TxState,
    unsent: bytes::Bytes,
    reset_query: Option<String>,
) {
    let result = tokio::time::timeout(
        RESET_TIMEOUT,
        reset(&mut server, state, &unsent, reset_query),
    )
    .await;
    match result {
        Ok(Ok(())) => server.dirty = false,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "closing a server that could not be reset");
            drop(deadpool::managed::Object::take(server));
        }
        Err(_) => {
            tracing::debug!("closing a server that did not become idle in time");
            drop(deadpool::managed::Object::take(server));
        }
    }
}

async fn reset(
    server: &mut Server,
    mut state: TxState,
    unsent: &[u8],
    reset_query: Option<String>,
) -> Result<(), String> {
    let err = |e: std::io::Error| e.to_string();
    let mut out = BytesMut::from(unsent);
    if state.copy_in {
        postgres_protocol::message::frontend::copy_fail("client disconnected", &mut out)
            .map_err(err)?;
    }
    if state.unsynced {
        postgres_protocol::message::frontend::sync(&mut out);
        state.pending += 1;
    }
    if state.pending > 0 {
        // Stop whatever runs now instead of waiting for it; the cancel has been delivered when
        // `send` returns, so it cannot hit the ROLLBACK below.
        let _ = server.cancel.send().await;
    }
    server.stream.write_all(&out).await.map_err(err)?;
    drain(server, &mut state).await?;
    if state.status != b'I' {
        server
            .simple_query("ROLLBACK")
            .await
            .map_err(|e| e.to_string())?;
    }
    if let Some(sql) = reset_query.filter(|q| !q.trim().is_empty()) {
        server.simple_query(&sql).await.map_err(|e| e.to_string())?;
        server.params = crate::params::Params::default();
    }
    Ok(())
}

/// Reads and discards server output until every outstanding Sync/Query is answered.
async fn drain(server: &mut Server, state: &mut TxState) -> Result<(), String> {
    let mut buf = BytesMut::with_capacity(16 * 1024);
    let mut scanner = Scanner::new(usize::MAX >> 1);
    let mut pos = 0;
    while state.pending > 0 {
        match scanner
            .next(&buf, pos, |t| t == b'Z')
            .map_err(|e| e.to_string())?
        {
            Item::Body { to } => pos = to,
            Item::Message {
                tag: b'Z',
                start,
                end,
            } => {
                state.pending -= 1;
                state.status = buf[start + 5];
                pos = end;
            }
            Item::Message { end, .. } => pos = end,
            Item::End => {
                let _ = buf.split_to(pos);
                pos = 0;
                buf.reserve(16 * 1024);
                if server
                    .stream
                    .read_buf(&mut buf)
                    .await
                    .map_err(|e| e.to_string())?
                    == 0
                {
                    return Err("server closed the connection".into());
                }
            }
        }
    }
    if !buf[pos..].is_empty() {
        return Err("server sent more than was asked".into());
    }
    Ok(())
}
