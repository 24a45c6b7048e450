//! The first packet a client sends: StartupMessage, SSLRequest, GSSENCRequest or CancelRequest.
//! These have no type byte; the length comes first and is bounded before anything is read.

use tokio::io::{AsyncRead, AsyncReadExt};

use super::frame::cstr;

/// Largest startup packet accepted (PostgreSQL's own limit is 10,000 bytes).
pub const MAX_STARTUP_PACKET: usize = 10 * 1024;

const SSL_REQUEST: u32 = 80877103;
const GSSENC_REQUEST: u32 = 80877104;
const CANCEL_REQUEST: u32 = 80877102;

/// A parsed startup-phase packet.
#[derive(Debug, PartialEq, Eq)]
pub enum StartupPacket {
    SslRequest,
    GssEncRequest,
    Cancel {
        pid: i32,
        secret: i32,
    },
    /// Protocol version 3.x with its parameters (name, value) in the order sent.
    Startup {
        minor: u16,
        params: Vec<(String, String)>,
    },
}

/// Why a startup packet was refused.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("invalid length of startup packet: {0}")]
    BadLength(u32),
    #[error("unsupported frontend protocol {major}.{minor}: server supports 3.0")]
    UnsupportedVersion { major: u16, minor: u16 },
    #[error("invalid startup packet layout: {0}")]
    Malformed(&'static str),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Reads and parses one startup packet. `Ok(None)` when the client closed before sending one.
pub async fn read_startup<R: AsyncRead + Unpin>(
    stream: &mut R,
) -> Result<Option<StartupPacket>, StartupError> {
    let mut len = [0u8; 4];
    match stream.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_be_bytes(len);
    if !(8..=MAX_STARTUP_PACKET as u32).contains(&len) {
        return Err(StartupError::BadLength(len));
    }
    let mut body = vec![0u8; len as usize - 4];
    stream.read_exact(&mut body).await?;
    parse(&body).map(Some)
}

/// Parses the body of a startup packet (after the length).
pub fn parse(body: &[u8]) -> Result<StartupPacket, StartupError> {
    let (code, rest) = body
        .split_at_checked(4)
        .ok_or(StartupError::BadLength(body.len() as u32 + 4))?;
    let code = u32::from_be_bytes([code[0], code[1], code[2], code[3]]);
    match code {
        SSL_REQUEST => Ok(StartupPacket::SslRequest),
        GSSENC_REQUEST => Ok(StartupPacket::GssEncRequest),
        CANCEL_REQUEST => {
            let key: [u8; 8] = rest
                .try_into()
                .map_err(|_| StartupError::Malformed("cancel request must carry 8 bytes"))?;
            Ok(StartupPacket::Cancel {
                pid: i32::from_be_bytes(key[..4].try_into().unwrap_or_default()),
                secret: i32::from_be_bytes(key[4..].try_into().unwrap_or_default()),
            })
        }
        _ => {
            let (major, minor) = ((code >> 16) as u16, code as u16);
            if major != 3 {
                return Err(StartupError::UnsupportedVersion { major, minor });
            }
            Ok(StartupPacket::Startup {
                minor,
                params: parse_params(rest)?,
            })
        }
    }
}

/// Name/value pairs, each NUL-terminated, closed by an empty name.
fn parse_params(body: &[u8]) -> Result<Vec<(String, String)>, StartupError> {
    let mut params = Vec::new();
    let mut pos = 0;
    loop {
        let name = cstr(body, &mut pos).ok_or(StartupError::Malformed("unterminated name"))?;
        if name.is_empty() {
            break;
        }
        let value = cstr(body, &mut pos).ok_or(StartupError::Malformed("unterminated value"))?;
        params.push((name.to_owned(), value.to_owned()));
    }
    if pos != body.len() {
        return Err(StartupError::Malformed("bytes after the final terminator"));
    }
    Ok(params)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_startup_and_rejects_garbage() {
        let mut body = 196608u32.to_be_bytes().to_vec();
        body.extend_from_slice(b"user\0app\0database\0db\0\0");
        match parse(&body).unwrap() {
            StartupPacket::Startup { minor: 0, params } => {
                assert_eq!(
                    params,
                    vec![
                        ("user".into(), "app".into()),
                        ("database".into(), "db".into())
                    ]
                )
            }
            other => panic!("{other:?}"),
        }
        assert!(
            parse(&196608u32.to_be_bytes()).is_err(),
            "missing terminator"
        );
        let mut bad = 196608u32.to_be_bytes().to_vec();
        bad.extend_from_slice(b"user\0app");
        assert!(parse(&bad).is_err());
        assert!(matches!(
            parse(&(2u32 << 16).to_be_bytes()),
            Err(StartupError::UnsupportedVersion { major: 2, .. })
        ));
        assert!(parse(&[1, 2]).is_err());
        assert!(matches!(
            parse(&80877102u32.to_be_bytes()),
            Err(StartupError::Malformed(_))
        ));
    }
}
