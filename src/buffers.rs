//! Buffers belong to work in progress: an idle client holds none. A session takes a read buffer
//! when bytes arrive and gives it back when the transaction's bytes have all been forwarded;
//! free buffers wait on a small per-thread list, so the hot path neither allocates nor locks.

use std::cell::RefCell;

use bytes::BytesMut;

/// Size of the buffers handed out (one socket read's worth).
pub const BUFFER_SIZE: usize = 16 * 1024;
/// Free buffers kept per worker thread; more are freed.
const KEPT_PER_THREAD: usize = 128;
/// A buffer that grew past this (a large message held whole) is freed, not kept.
const LARGEST_KEPT: usize = 4 * BUFFER_SIZE;

thread_local! {
    static FREE: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
}

/// Least free room a buffer is given for the next read.
const MIN_ROOM: usize = 4 * 1024;

/// Gives `buf` room for the next socket read: a full-size buffer from the free list when it is
/// smaller (its bytes moved over), else at least [`MIN_ROOM`] free bytes.
pub fn fill(buf: &mut BytesMut) {
    if buf.capacity() < BUFFER_SIZE {
        let mut full = FREE
            .with(|free| free.borrow_mut().pop())
            .unwrap_or_else(|| BytesMut::with_capacity(BUFFER_SIZE));
        full.extend_from_slice(buf);
        *buf = full;
    }
    buf.reserve(MIN_ROOM);
}

/// Gives an empty `buf`'s memory back (to the free list, or to the allocator when it grew
/// large or the list is full); a buffer still holding bytes is kept.
pub fn release(buf: &mut BytesMut) {
    if !buf.is_empty() || buf.capacity() == 0 {
        return;
    }
    let mut old = std::mem::take(buf);
    old.clear();
    if old.capacity() > LARGEST_KEPT {
        return;
    }
    FREE.with(|free| {
        let mut free = free.borrow_mut();
        if free.len() < KEPT_PER_THREAD {
            free.push(old);
        }
    });
}

/// Reads what `stream` has into `buf` through a small stack buffer, so a client that is idle or
/// queued holds only the bytes it sent, not a full buffer. The stack buffer lives only during
/// the poll, not in the waiting future. (Through `poll_read`, which knows a short read drained
/// the socket: no extra read that would only say "nothing more".)
pub fn poll_read_small(
    stream: &mut crate::stream::Stream,
    cx: &mut std::task::Context<'_>,
    buf: &mut BytesMut,
) -> std::task::Poll<std::io::Result<usize>> {
    use tokio::io::AsyncRead;
    let mut chunk = [std::mem::MaybeUninit::<u8>::uninit(); 2048];
    let mut read = tokio::io::ReadBuf::uninit(&mut chunk);
    match std::pin::Pin::new(stream).poll_read(cx, &mut read) {
        std::task::Poll::Ready(Ok(())) => {
            buf.extend_from_slice(read.filled());
            std::task::Poll::Ready(Ok(read.filled().len()))
        }
        std::task::Poll::Ready(Err(e)) => std::task::Poll::Ready(Err(e)),
        std::task::Poll::Pending => std::task::Poll::Pending,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_and_large_ones_freed() {
        let mut a = BytesMut::new();
        fill(&mut a);
        assert!(a.capacity() >= BUFFER_SIZE);
        let ptr = a.as_ptr();
        release(&mut a);
        assert_eq!(a.capacity(), 0, "an idle holder keeps nothing");
        let mut b = BytesMut::new();
        fill(&mut b);
        assert_eq!(b.as_ptr(), ptr, "taken from the free list");
        b.extend_from_slice(b"x");
        release(&mut b);
        assert_eq!(b.len(), 1, "a buffer with bytes in it is kept");
        b.clear();
        b.reserve(10 * LARGEST_KEPT);
        release(&mut b);
        let mut c = BytesMut::new();
        fill(&mut c);
        assert!(c.capacity() < 10 * LARGEST_KEPT, "the large one was freed");
    }
}
