//! Header-only framing: every message after startup is a type byte and a big-endian length that
//! counts itself. The length is checked before anything is sized from it, and bodies the proxy
//! does not act on are never copied or decoded.

use tokio::io::{AsyncRead, AsyncReadExt};

use bytes::BytesMut;

/// Type byte plus length field.
pub const HEADER_LEN: usize = 5;

/// Why a byte stream is not a valid message stream.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("invalid message length {len} for message type '{tag}'")]
    BadLength { tag: char, len: u32 },
    #[error("message of type '{tag}' is {len} bytes, more than the limit of {max}")]
    TooLong { tag: char, len: usize, max: usize },
}

/// Reads the header at the start of `buf`, if all five bytes are there, as (tag, body length).
pub fn header(buf: &[u8], max_len: usize) -> Result<Option<(u8, usize)>, FrameError> {
    let Some(head) = buf.get(..HEADER_LEN) else {
        return Ok(None);
    };
    let tag = head[0];
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]);
    if len < 4 {
        return Err(FrameError::BadLength {
            tag: tag as char,
            len,
        });
    }
    let body = len as usize - 4;
    if body > max_len {
        return Err(FrameError::TooLong {
            tag: tag as char,
            len: body,
            max: max_len,
        });
    }
    Ok(Some((tag, body)))
}

/// One step of a [`Scanner`] over a buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Item {
    /// Nothing more can be scanned until more bytes arrive.
    End,
    /// Body bytes of a message being streamed through, up to (not including) this offset.
    Body { to: usize },
    /// A message starting at `start`. `buf[start..end]` is its header and as much of its body as
    /// the caller asked to hold (all of it, a prefix, or nothing), all in the buffer; the rest of
    /// the body is streamed as [`Item::Body`].
    Message { tag: u8, start: usize, end: usize },
}

/// Walks a message stream in place, across reads, without copying it.
#[derive(Debug, Clone, Copy)]
pub struct Scanner {
    /// Body bytes of the current message not yet seen.
    body_left: usize,
    /// Largest body accepted.
    max_len: usize,
}

impl Scanner {
    pub fn new(max_len: usize) -> Scanner {
        Scanner {
            body_left: 0,
            max_len,
        }
    }

    /// True between messages (no body is half streamed).
    pub fn at_boundary(&self) -> bool {
        self.body_left == 0
    }

    /// The next item in `buf[pos..]`. `hold(tag, body_len)` says how many body bytes of a
    /// message the caller must see in one piece with its header (they are held back until
    /// they have all arrived): `body_len` for the whole message, 0 to stream it.
    pub fn next(
        &mut self,
        buf: &[u8],
        pos: usize,
        hold: impl Fn(u8, usize) -> usize,
    ) -> Result<Item, FrameError> {
        let avail = buf.len().saturating_sub(pos);
        if self.body_left > 0 {
            if avail == 0 {
                return Ok(Item::End);
            }
            let n = avail.min(self.body_left);
            self.body_left -= n;
            return Ok(Item::Body { to: pos + n });
        }
        let Some((tag, body)) = header(&buf[pos.min(buf.len())..], self.max_len)? else {
            return Ok(Item::End);
        };
        let held = hold(tag, body).min(body);
        if avail < HEADER_LEN + held {
            return Ok(Item::End);
        }
        self.body_left = body - held;
        Ok(Item::Message {
            tag,
            start: pos,
            end: pos + HEADER_LEN + held,
        })
    }
}

/// Reads one whole message into `buf` (cleared first) and returns its tag; `None` at a clean end of
/// stream. Used where the proxy must understand every message (logins), never on the relay path.
pub async fn read_message<R: AsyncRead + Unpin>(
    stream: &mut R,
    buf: &mut BytesMut,
    max_len: usize,
) -> Result<Option<u8>, ReadError> {
    buf.clear();
    let mut head = [0u8; HEADER_LEN];
    match stream.read_exact(&mut head).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let (tag, body) = header(&head, max_len)?.ok_or(FrameError::BadLength { tag: '?', len: 0 })?;
    buf.resize(body, 0);
    stream.read_exact(&mut buf[..]).await?;
    Ok(Some(tag))
}

/// Reading a whole message failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Reads a NUL-terminated string from `body` at `*pos`, advancing past the NUL.
pub fn cstr<'a>(body: &'a [u8], pos: &mut usize) -> Option<&'a str> {
    let rest = body.get(*pos..)?;
    let nul = rest.iter().position(|&b| b == 0)?;
    let s = std::str::from_utf8(&rest[..nul]).ok()?;
    *pos += nul + 1;
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn length_checked_before_use() {
        assert!(matches!(
            header(&[b'Q', 0, 0, 0, 3], 100),
            Err(FrameError::BadLength { .. })
        ));
        assert!(matches!(
            header(&[b'Q', 0x7f, 0xff, 0xff, 0xff], 100),
            Err(FrameError::TooLong { .. })
        ));
        assert_eq!(header(&[b'Q', 0, 0], 100), Ok(None));
        assert_eq!(header(&[b'Q', 0, 0, 0, 9], 100), Ok(Some((b'Q', 5))));
    }

    #[test]
    fn streams_bodies_and_holds_whole_messages() {
        let mut buf = msg(b'D', b"0123456789");
        buf.extend(msg(b'Z', b"I"));
        let mut s = Scanner::new(1000);
        let whole = |t, len| if t == b'Z' { len } else { 0 };
        // only part of the stream has arrived
        let part = &buf[..8];
        assert_eq!(
            s.next(part, 0, whole),
            Ok(Item::Message {
                tag: b'D',
                start: 0,
                end: 5
            })
        );
        assert_eq!(s.next(part, 5, whole), Ok(Item::Body { to: 8 }));
        assert_eq!(s.next(part, 8, whole), Ok(Item::End));
        assert!(!s.at_boundary());
        let part = &buf[..buf.len() - 1];
        assert_eq!(s.next(part, 8, whole), Ok(Item::Body { to: 15 }));
        assert!(s.at_boundary());
        assert_eq!(
            s.next(part, 15, whole),
            Ok(Item::End),
            "Z held back until whole"
        );
        assert_eq!(
            s.next(&buf, 15, whole),
            Ok(Item::Message {
                tag: b'Z',
                start: 15,
                end: 21
            })
        );
    }

    #[test]
    fn a_prefix_is_held_and_the_rest_streamed() {
        let buf = msg(b'B', b"portal\0stmt\0lots of parameter bytes");
        let mut s = Scanner::new(1000);
        assert_eq!(
            s.next(&buf[..10], 0, |_, _| 12),
            Ok(Item::End),
            "the prefix is not all there"
        );
        assert_eq!(
            s.next(&buf, 0, |_, _| 12),
            Ok(Item::Message {
                tag: b'B',
                start: 0,
                end: 17
            })
        );
        assert!(!s.at_boundary());
        assert_eq!(
            s.next(&buf, 17, |_, _| 12),
            Ok(Item::Body { to: buf.len() })
        );
        assert!(s.at_boundary());
    }

    #[test]
    fn cstr_is_checked() {
        let body = b"abc\0de";
        let mut pos = 0;
        assert_eq!(cstr(body, &mut pos), Some("abc"));
        assert_eq!(cstr(body, &mut pos), None);
    }
}
