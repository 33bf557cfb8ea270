//! Whole buffers in and out of the store's verified streams.
//!
//! A QUIC stream hands out the buffers it received and takes buffers to
//! send without copying them; going through `AsyncRead`/`AsyncWrite`
//! instead copies every byte once more on each side, which shows on a
//! CPU-bound link. [`ChunkSource`] and [`ChunkSink`] let the network layer
//! pass its buffers straight through; [`ReadSource`] and [`WriteSink`]
//! adapt any `AsyncRead`/`AsyncWrite` (at the cost of that copy).

use std::future::Future;
use std::io;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Where [`crate::Store::send_ranges_to`] puts a verified stream.
pub trait ChunkSink: Send {
    /// Send `chunk` (all of it).
    fn put(&mut self, chunk: Bytes) -> impl Future<Output = io::Result<()>> + Send;
}

/// Where [`crate::Store::receive_ranges_from`] reads a verified stream.
pub trait ChunkSource: Send {
    /// The next bytes, at most `max` of them (never more: the store asks
    /// for exactly what the stream should still hold); `None` at the end.
    /// Must be cancel-safe: a future dropped before it is ready must not
    /// lose data.
    fn take(&mut self, max: usize) -> impl Future<Output = io::Result<Option<Bytes>>> + Send;
}

/// A [`ChunkSink`] over any `AsyncWrite`.
#[derive(Debug)]
pub struct WriteSink<W>(pub W);

impl<W: AsyncWrite + Unpin + Send> ChunkSink for WriteSink<W> {
    async fn put(&mut self, chunk: Bytes) -> io::Result<()> {
        self.0.write_all(&chunk).await
    }
}

/// A [`ChunkSource`] over any `AsyncRead`.
#[derive(Debug)]
pub struct ReadSource<R>(pub R);

/// The most one read of a [`ReadSource`] asks for.
const READ_PIECE: usize = 256 << 10;

impl<R: AsyncRead + Unpin + Send> ChunkSource for ReadSource<R> {
    async fn take(&mut self, max: usize) -> io::Result<Option<Bytes>> {
        if max == 0 {
            return Ok(Some(Bytes::new()));
        }
        let mut buf = BytesMut::with_capacity(max.min(READ_PIECE));
        let n = (&mut self.0).take(max as u64).read_buf(&mut buf).await?;
        Ok((n > 0).then(|| buf.freeze()))
    }
}
