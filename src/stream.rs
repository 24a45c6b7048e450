//! A connection's byte stream: plain TCP, TLS over it (towards a client, or towards a server), or
//! a Unix socket to a PostgreSQL on the same machine.
//! An enum rather than a boxed trait object: the plain path pays one branch, no indirection.
//!
//! TLS writes are write-through: `poll_write` reports bytes written only once their TLS records
//! are on the socket. tokio-rustls otherwise accepts bytes into the session and leaves records
//! queued until the next write or flush, and the relay (which writes, then waits to read)
//! would leave an answer sitting in the proxy while the client waits for it.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

/// One connection, plain or encrypted.
pub enum Stream {
    Plain(TcpStream),
    /// To a server whose host is a socket directory (never TLS).
    Unix(UnixStream),
    /// TLS with a client: Floodgate is the TLS server.
    FromClient(Box<Tls<tokio_rustls::server::TlsStream<TcpStream>>>),
    /// TLS with an upstream PostgreSQL: Floodgate is the TLS client.
    ToServer(Box<Tls<tokio_rustls::client::TlsStream<TcpStream>>>),
}

/// A TLS stream and the bytes of the write it is still flushing.
pub struct Tls<S> {
    pub inner: S,
    /// Bytes accepted into the TLS session by a write whose records are not all sent yet.
    accepted: Option<usize>,
}

impl<S> Tls<S> {
    pub fn new(inner: S) -> Tls<S> {
        Tls {
            inner,
            accepted: None,
        }
    }
}

impl Stream {
    pub fn is_tls(&self) -> bool {
        !matches!(self, Stream::Plain(_) | Stream::Unix(_))
    }

    /// The TCP socket underneath (`None` for a Unix socket).
    pub fn tcp(&self) -> Option<&TcpStream> {
        match self {
            Stream::Plain(s) => Some(s),
            Stream::Unix(_) => None,
            Stream::FromClient(t) => Some(t.inner.get_ref().0),
            Stream::ToServer(t) => Some(t.inner.get_ref().0),
        }
    }

    /// The peer's address, for logs and SHOW CLIENTS (`None` for a Unix socket).
    pub fn peer_addr(&self) -> Option<std::net::SocketAddr> {
        self.tcp()?.peer_addr().ok()
    }

    /// This end's address (`None` for a Unix socket).
    pub fn local_addr(&self) -> Option<std::net::SocketAddr> {
        self.tcp()?.local_addr().ok()
    }

    /// The ALPN protocol the client and Floodgate agreed on, if any.
    pub fn alpn(&self) -> Option<&[u8]> {
        match self {
            Stream::FromClient(t) => t.inner.get_ref().1.alpn_protocol(),
            _ => None,
        }
    }

    /// SHOW CLIENTS / SHOW SERVERS `tls` column: protocol and cipher suite, empty for plain.
    pub fn tls_description(&self) -> String {
        let (version, suite) = match self {
            Stream::Plain(_) | Stream::Unix(_) => return String::new(),
            Stream::FromClient(t) => {
                let c = t.inner.get_ref().1;
                (c.protocol_version(), c.negotiated_cipher_suite())
            }
            Stream::ToServer(t) => {
                let c = t.inner.get_ref().1;
                (c.protocol_version(), c.negotiated_cipher_suite())
            }
        };
        let version = match version {
            Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3".to_owned(),
            Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2".to_owned(),
            other => format!("{other:?}"),
        };
        match suite {
            Some(s) => format!("{version}/{:?}", s.suite()),
            None => version,
        }
    }

    /// The certificate chain a TLS client presented (verified when the mode asks for one).
    pub fn client_certificate(&self) -> Option<&rustls_pki_types::CertificateDer<'static>> {
        match self {
            Stream::FromClient(t) => t.inner.get_ref().1.peer_certificates()?.first(),
            _ => None,
        }
    }

    /// False when an idle connection has closed or has sent something nobody asked for (a
    /// FATAL before closing, say). Usually costs no system call: the runtime knows from epoll
    /// whether the socket became readable since the last read drained it; only then is it
    /// probed. Over TLS anything waiting counts as unusable: the bytes cannot be looked into
    /// without reading them (PostgreSQL sends no TLS housekeeping to an idle connection).
    pub fn is_usable(&self) -> bool {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let readiness = match self {
            Stream::Plain(s) => s.poll_read_ready(&mut cx),
            Stream::Unix(s) => s.poll_read_ready(&mut cx),
            Stream::FromClient(t) => t.inner.get_ref().0.poll_read_ready(&mut cx),
            Stream::ToServer(t) => t.inner.get_ref().0.poll_read_ready(&mut cx),
        };
        match readiness {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            Poll::Ready(Ok(())) => {
                let mut probe = [0u8; 1];
                // Plain sockets: a read that would block means the readiness was stale.
                let stale = |read: io::Result<usize>| matches!(read, Err(e) if e.kind() == io::ErrorKind::WouldBlock);
                match self {
                    Stream::Plain(s) => stale(s.try_read(&mut probe)),
                    Stream::Unix(s) => stale(s.try_read(&mut probe)),
                    Stream::FromClient(t) => Self::nothing_to_peek(t.inner.get_ref().0, &mut cx),
                    Stream::ToServer(t) => Self::nothing_to_peek(t.inner.get_ref().0, &mut cx),
                }
            }
        }
    }

    /// Under TLS: true only when nothing is waiting on the socket.
    fn nothing_to_peek(tcp: &TcpStream, cx: &mut Context<'_>) -> bool {
        let mut probe = [0u8; 1];
        let mut buf = ReadBuf::new(&mut probe);
        tcp.poll_peek(cx, &mut buf).is_pending()
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_read(cx, buf),
            Stream::FromClient(t) => Pin::new(&mut t.inner).poll_read(cx, buf),
            Stream::ToServer(t) => Pin::new(&mut t.inner).poll_read(cx, buf),
        }
    }
}

impl<S: AsyncWrite + Unpin> Tls<S> {
    fn poll_write_through(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if self.accepted.is_none() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, buf))?;
            self.accepted = Some(n);
        }
        ready!(Pin::new(&mut self.inner).poll_flush(cx))?;
        Poll::Ready(Ok(self.accepted.take().unwrap_or_default()))
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_write(cx, buf),
            Stream::FromClient(t) => t.poll_write_through(cx, buf),
            Stream::ToServer(t) => t.poll_write_through(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Unix(s) => Pin::new(s).poll_flush(cx),
            Stream::FromClient(t) => Pin::new(&mut t.inner).poll_flush(cx),
            Stream::ToServer(t) => Pin::new(&mut t.inner).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Unix(s) => Pin::new(s).poll_shutdown(cx),
            Stream::FromClient(t) => Pin::new(&mut t.inner).poll_shutdown(cx),
            Stream::ToServer(t) => Pin::new(&mut t.inner).poll_shutdown(cx),
        }
    }
}

/// Reads what the stream has into the spare capacity of `buf` (which the caller provides).
pub fn poll_read_buf(
    stream: &mut Stream,
    cx: &mut Context<'_>,
    buf: &mut BytesMut,
) -> Poll<io::Result<usize>> {
    tokio_util::io::poll_read_buf(Pin::new(stream), cx, buf)
}

/// Writes `buf` (or its front) to the stream.
pub fn poll_write(
    stream: &mut Stream,
    cx: &mut Context<'_>,
    buf: &[u8],
) -> Poll<io::Result<usize>> {
    Pin::new(stream).poll_write(cx, buf)
}
