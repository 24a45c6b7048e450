//! The upstream side: SSLRequest to the server, then TLS or plain text as `server_tls_sslmode`
//! allows. A mode that requires TLS never falls back, whatever the server answers.

use bytes::BytesMut;
use postgres_protocol::message::frontend;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{SslMode, Upstream, mode_name};
use crate::error::UpstreamError;
use crate::stream::{self, Stream};

/// Asks `addr` (`host:port`) for TLS when the mode says so.
pub async fn negotiate(
    mut tcp: TcpStream,
    tls: &Upstream,
    addr: &str,
) -> Result<Stream, UpstreamError> {
    let Some(connector) = tls
        .connector
        .as_ref()
        .filter(|_| tls.mode != SslMode::Disable)
    else {
        return Ok(Stream::Plain(tcp));
    };
    let failed = |reason: String| UpstreamError::Tls {
        addr: addr.to_owned(),
        reason,
    };
    let mut request = BytesMut::with_capacity(8);
    frontend::ssl_request(&mut request);
    tcp.write_all(&request).await?;
    // Exactly one byte: anything the server sends after its `S` belongs to the handshake and
    // is read by rustls (CVE-2021-23222's class: never taken as plain-text answers).
    let answer = tcp.read_u8().await?;
    match answer {
        b'S' => {
            let host = host_of(addr);
            let name = ServerName::try_from(host.to_owned())
                .map_err(|e| failed(format!("`{host}` is not a valid server name: {e}")))?;
            let tls_stream = connector
                .connect(name, tcp)
                .await
                .map_err(|e| failed(format!("TLS handshake failed: {e}")))?;
            Ok(Stream::ToServer(Box::new(stream::Tls::new(tls_stream))))
        }
        b'N' if tls.mode.requires_tls() => Err(failed(format!(
            "the server does not accept TLS, and server_tls_sslmode = {} never falls back to plain text",
            mode_name(tls.mode)
        ))),
        b'N' => Ok(Stream::Plain(tcp)),
        other => Err(UpstreamError::Protocol {
            addr: addr.to_owned(),
            detail: format!("answered SSLRequest with byte {other:#04x}, not S or N"),
        }),
    }
}

/// The host part of `host:port` (IPv6 addresses in brackets lose them).
fn host_of(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

#[cfg(test)]
mod tests {
    #[test]
    fn host_of_addresses() {
        assert_eq!(super::host_of("db.example.com:5432"), "db.example.com");
        assert_eq!(super::host_of("127.0.0.1:5432"), "127.0.0.1");
        assert_eq!(super::host_of("[::1]:5432"), "::1");
    }
}
