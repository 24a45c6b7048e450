//! The client side of a connection's opening: SSLRequest answered `S` (and the handshake done)
//! or `N`, GSSENCRequest answered `N`, direct TLS (PostgreSQL 17's `sslnegotiation=direct`,
//! recognised by its first byte and ALPN `postgresql`), until the StartupMessage or
//! CancelRequest that follows.

use std::task::{Context, Poll};

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::{ALPN_POSTGRESQL, Tls};
use crate::client::ClientError;
use crate::protocol::startup::{StartupPacket, read_startup};
use crate::stream::{self, Stream};

/// A TLS record starts with its content type; 22 is a handshake (a ClientHello). No startup
/// packet starts with it: their lengths are below 16 MiB, so their first byte is 0.
const TLS_HANDSHAKE: u8 = 0x16;

/// How a connection opened: the stream to go on with (none when the client left or spoke
/// TLS we cannot answer), and its first packet after any TLS negotiation or why it was refused.
pub struct Opened {
    pub stream: Option<Stream>,
    pub first: Result<StartupPacket, ClientError>,
}

/// Reads startup packets and negotiates TLS as configured, up to the StartupMessage or
/// CancelRequest, by `deadline` (`client_login_timeout`; a client silent until then gets
/// FATAL in plain text). `require` is not enforced here (a CancelRequest may come in plain
/// text).
pub async fn open(mut tcp: TcpStream, tls: &Tls, deadline: Option<Instant>) -> Opened {
    let closed = |e| Opened {
        stream: None,
        first: Err(e),
    };
    let mut first = [0u8; 1];
    match by(deadline, tcp.peek(&mut first)).await {
        Some(Ok(1..)) => {}
        Some(_) => return closed(ClientError::Gone),
        None => return plain(tcp, Err(ClientError::LoginTimeout)),
    }
    if first[0] == TLS_HANDSHAKE {
        return direct(tcp, tls, deadline).await;
    }
    loop {
        let packet = match by(deadline, read_startup(&mut tcp)).await {
            Some(Ok(Some(p))) => p,
            Some(Ok(None)) => return closed(ClientError::Gone),
            Some(Err(e)) => return plain(tcp, Err(e.into())),
            None => return plain(tcp, Err(ClientError::LoginTimeout)),
        };
        match (packet, &tls.clients) {
            (StartupPacket::SslRequest, Some(acceptor)) => {
                // Whatever came with the SSLRequest was sent before encryption: a man in the
                // middle's injection (the class of PostgreSQL's CVE-2021-23214 and PgBouncer's CVE-2021-3935). Never read it as the client's.
                if has_unread_data(&tcp) {
                    let e = "received unencrypted data after SSL request";
                    return plain(tcp, Err(ClientError::Protocol(e.into())));
                }
                if tcp.write_all(b"S").await.is_err() {
                    return closed(ClientError::Gone);
                }
                let Ok(tls_stream) = acceptor.accept(tcp).await else {
                    tracing::debug!("client TLS handshake failed");
                    return closed(ClientError::Gone);
                };
                let stream = Stream::FromClient(Box::new(stream::Tls::new(tls_stream)));
                return inside_tls(stream, deadline).await;
            }
            (StartupPacket::SslRequest | StartupPacket::GssEncRequest, _) => {
                if tcp.write_all(b"N").await.is_err() {
                    return closed(ClientError::Gone);
                }
            }
            (packet, _) => return plain(tcp, Ok(packet)),
        }
    }
}

/// `fut`'s output, or `None` once `deadline` has passed.
async fn by<F: Future>(deadline: Option<Instant>, fut: F) -> Option<F::Output> {
    match deadline {
        None => Some(fut.await),
        Some(at) => tokio::time::timeout_at(at, fut).await.ok(),
    }
}

fn plain(tcp: TcpStream, first: Result<StartupPacket, ClientError>) -> Opened {
    Opened {
        stream: Some(Stream::Plain(tcp)),
        first,
    }
}

/// Direct TLS: the handshake first, and only for clients that say they speak PostgreSQL in it.
async fn direct(tcp: TcpStream, tls: &Tls, deadline: Option<Instant>) -> Opened {
    let gone = Opened {
        stream: None,
        first: Err(ClientError::Gone),
    };
    let Some(acceptor) = &tls.clients else {
        // Answered in plain text, as any other packet that is not a startup packet.
        let e = "direct TLS connection, but TLS is off (client_tls_sslmode = disable)";
        return plain(tcp, Err(ClientError::Protocol(e.into())));
    };
    let Ok(tls_stream) = acceptor.accept(tcp).await else {
        tracing::debug!("client TLS handshake failed");
        return gone;
    };
    let stream = Stream::FromClient(Box::new(stream::Tls::new(tls_stream)));
    if stream.alpn() != Some(ALPN_POSTGRESQL) {
        let e = "direct SSL connection without ALPN protocol negotiation: the client must \
                 offer ALPN \"postgresql\"";
        return Opened {
            stream: Some(stream),
            first: Err(ClientError::Protocol(e.into())),
        };
    }
    inside_tls(stream, deadline).await
}

/// After the handshake: a StartupMessage or CancelRequest, nothing else.
async fn inside_tls(mut stream: Stream, deadline: Option<Instant>) -> Opened {
    let first = match by(deadline, read_startup(&mut stream)).await {
        Some(Ok(Some(StartupPacket::SslRequest | StartupPacket::GssEncRequest))) => Err(
            ClientError::Protocol("encryption requested again inside TLS".into()),
        ),
        Some(Ok(Some(packet))) => Ok(packet),
        Some(Ok(None)) => Err(ClientError::Gone),
        Some(Err(e)) => Err(e.into()),
        None => Err(ClientError::LoginTimeout),
    };
    Opened {
        stream: Some(stream),
        first,
    }
}

/// Whether bytes beyond the packets read so far are already waiting on the socket.
fn has_unread_data(tcp: &TcpStream) -> bool {
    let mut cx = Context::from_waker(std::task::Waker::noop());
    let mut byte = [0u8; 1];
    let mut buf = tokio::io::ReadBuf::new(&mut byte);
    matches!(tcp.poll_peek(&mut cx, &mut buf), Poll::Ready(Ok(1..)))
}
