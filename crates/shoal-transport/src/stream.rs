//! Stream wrappers: every byte of bulk data goes through these, so this is
//! where the global bandwidth limits are enforced and bytes are counted.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use quinn::VarInt;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

use crate::TransportError;
use crate::rate::{Limiter, PIECE};

/// Bytes moved through the stream wrappers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Stream payload bytes handed to QUIC for sending.
    pub bytes_sent: u64,
    /// Stream payload bytes read by the application.
    pub bytes_received: u64,
}

/// Byte counters, shared by the streams of one connection (or of the whole
/// endpoint).
#[derive(Debug, Default)]
pub(crate) struct Counters {
    sent: AtomicU64,
    received: AtomicU64,
}

impl Counters {
    pub(crate) fn stats(&self) -> Stats {
        Stats {
            bytes_sent: self.sent.load(Ordering::Relaxed),
            bytes_received: self.received.load(Ordering::Relaxed),
        }
    }
}

/// What all connections of an endpoint share: the limits and the global
/// counters.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    pub(crate) upload: Option<Limiter>,
    pub(crate) download: Option<Limiter>,
    pub(crate) counters: Counters,
}

/// Where a stream counts its bytes and takes its tokens.
#[derive(Debug, Clone)]
pub(crate) struct Accounting {
    pub(crate) shared: Arc<Shared>,
    pub(crate) conn: Arc<Counters>,
}

impl Accounting {
    fn sent(&self, n: usize) {
        let n = n as u64;
        self.shared.counters.sent.fetch_add(n, Ordering::Relaxed);
        self.conn.sent.fetch_add(n, Ordering::Relaxed);
    }

    fn received(&self, n: usize) {
        let n = n as u64;
        self.shared
            .counters
            .received
            .fetch_add(n, Ordering::Relaxed);
        self.conn.received.fetch_add(n, Ordering::Relaxed);
    }
}

/// Tokens a stream holds but has not spent yet, and the timer it waits on
/// for tokens it reserved.
#[derive(Debug, Default)]
struct Credit {
    bytes: usize,
    /// Reserved, and ours when `sleep` fires.
    reserved: usize,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl Credit {
    /// Hold tokens for at least one byte (up to `want`), waiting for them
    /// if the bucket is empty; returns how many bytes may move now.
    fn poll_take(&mut self, cx: &mut Context<'_>, limiter: &Limiter, want: usize) -> Poll<usize> {
        loop {
            if self.bytes > 0 {
                return Poll::Ready(self.bytes);
            }
            if let Some(sleep) = self.sleep.as_mut() {
                ready!(sleep.as_mut().poll(cx));
                self.sleep = None;
                self.bytes = std::mem::take(&mut self.reserved);
                continue;
            }
            let (granted, at) = limiter.reserve(want.min(PIECE));
            if at <= tokio::time::Instant::now() {
                self.bytes = granted;
            } else {
                self.reserved = granted;
                self.sleep = Some(Box::pin(tokio::time::sleep_until(at)));
            }
        }
    }

    /// [`Credit::poll_take`] as a future; dropped while it waits, the
    /// reservation stays with the stream for its next read.
    async fn take(&mut self, limiter: &Limiter, want: usize) -> usize {
        std::future::poll_fn(|cx| self.poll_take(cx, limiter, want)).await
    }

    /// What it took and will not use, reserved included (paid for: the
    /// bucket's turn moved on for it), for [`Limiter::give_back`].
    fn unspent(&self) -> usize {
        self.bytes + self.reserved
    }

    fn spend(&mut self, n: usize) {
        self.bytes = self.bytes.saturating_sub(n);
    }
}

/// The sending half of a stream: tokio [`AsyncWrite`], rate-limited by the
/// endpoint's upload limit and counted.
#[derive(Debug)]
pub struct SendStream {
    inner: quinn::SendStream,
    acct: Accounting,
    credit: Credit,
    stall: Option<Duration>,
    /// Where this stream's bytes are also counted, if its owner asked.
    counter: Option<Arc<AtomicU64>>,
}

/// The stream's error code when a stalled write resets it.
pub const RESET_STALLED: u32 = 0x5d_0010;

/// The stream's error code when the sender gave its answer up to serve
/// another peer that waited (a busy node choking its slowest answer): the
/// peer is not at fault and may ask again.
pub const RESET_BUSY: u32 = 0x5d_0011;

/// The code a peer reset a stream with, if `e` (a read error, as
/// [`RecvStream`]'s reads return it, or wrapped once more in an
/// [`io::Error`]) says the stream was reset.
pub fn reset_code(e: &io::Error) -> Option<u32> {
    let inner = e.get_ref()?;
    let read = if let Some(r) = inner.downcast_ref::<quinn::ReadError>() {
        r
    } else if let Some(TransportError::Read(r)) = inner.downcast_ref::<TransportError>() {
        r
    } else if let Some(io) = inner.downcast_ref::<io::Error>() {
        return reset_code(io);
    } else {
        return None;
    };
    match read {
        quinn::ReadError::Reset(code) => u32::try_from(code.into_inner()).ok(),
        _ => None,
    }
}

impl SendStream {
    pub(crate) fn new(inner: quinn::SendStream, acct: Accounting) -> Self {
        SendStream {
            inner,
            acct,
            credit: Credit::default(),
            stall: None,
            counter: None,
        }
    }

    /// Count this stream's bytes, as they are handed to QUIC, also in
    /// `counter` (shared with whoever watches the stream's progress).
    pub fn count_into(&mut self, counter: Arc<AtomicU64>) {
        self.counter = Some(counter);
    }

    fn sent(&self, n: usize) {
        self.acct.sent(n);
        if let Some(c) = &self.counter {
            c.fetch_add(n as u64, Ordering::Relaxed);
        }
    }

    /// Fail [`write_chunk`] and [`write_all_chunks`] with
    /// [`TransportError::Stalled`], and reset the stream, once QUIC has
    /// taken none of their bytes for `timeout`: the peer reads nothing (or
    /// acknowledges nothing). Time spent waiting for the upload limit does
    /// not count: that wait is this node's own doing. A peer reading slowly
    /// still moves bytes and is not cut off.
    ///
    /// [`write_chunk`]: SendStream::write_chunk
    /// [`write_all_chunks`]: SendStream::write_all_chunks
    pub fn set_stall_timeout(&mut self, timeout: Option<Duration>) {
        self.stall = timeout;
    }

    /// Hand all of `chunks` to QUIC; with a stall timeout, fail once QUIC
    /// has taken none of them for that long. The watchdog is one timer per
    /// call, looked at only when it fires, not one per partial write (QUIC
    /// takes a bulk answer a few KiB at a time as acknowledgements free
    /// its window).
    async fn put_all(&mut self, chunks: &mut [Bytes]) -> Result<(), TransportError> {
        let Some(limit) = self.stall else {
            self.inner.write_all_chunks(chunks).await?;
            return Ok(());
        };
        let mut last = tokio::time::Instant::now();
        let watchdog = tokio::time::sleep(limit);
        tokio::pin!(watchdog);
        let mut first = 0;
        loop {
            while chunks.get(first).is_some_and(Bytes::is_empty) {
                first += 1;
            }
            if first == chunks.len() {
                return Ok(());
            }
            tokio::select! {
                biased;
                w = self.inner.write_chunks(&mut chunks[first..]) => {
                    if w?.bytes > 0 {
                        last = tokio::time::Instant::now();
                    }
                }
                () = &mut watchdog => {
                    if last.elapsed() >= limit {
                        let _ = self.inner.reset(VarInt::from_u32(RESET_STALLED));
                        return Err(TransportError::Stalled(limit));
                    }
                    watchdog.as_mut().reset(last + limit);
                }
            }
        }
    }

    /// Write a whole `Bytes` without copying it.
    pub async fn write_chunk(&mut self, chunk: Bytes) -> Result<(), TransportError> {
        self.write_all_chunks(&mut [chunk]).await
    }

    /// Write all of `chunks` without copying them; on return each is empty.
    pub async fn write_all_chunks(&mut self, chunks: &mut [Bytes]) -> Result<(), TransportError> {
        let shared = self.acct.shared.clone();
        let Some(limiter) = shared.upload.as_ref() else {
            let total: usize = chunks.iter().map(Bytes::len).sum();
            self.put_all(chunks).await?;
            self.sent(total);
            return Ok(());
        };
        for chunk in chunks.iter_mut() {
            while !chunk.is_empty() {
                let allowed = self.credit.take(limiter, chunk.len()).await;
                let piece = chunk.split_to(allowed.min(chunk.len()));
                let len = piece.len();
                self.put_all(&mut [piece]).await?;
                self.credit.spend(len);
                self.sent(len);
            }
        }
        Ok(())
    }

    /// Mark the stream finished: the peer reads to its end. Data already
    /// written is still delivered.
    pub fn finish(&mut self) -> Result<(), TransportError> {
        self.inner.finish()?;
        Ok(())
    }

    /// Abandon the stream, telling the peer `code`.
    pub fn reset(&mut self, code: u32) -> Result<(), TransportError> {
        self.inner.reset(VarInt::from_u32(code))?;
        Ok(())
    }

    /// Wait until the peer has received everything (after [`finish`]), or
    /// stopped the stream; returns the peer's stop code if it stopped it.
    ///
    /// [`finish`]: SendStream::finish
    pub async fn stopped(&mut self) -> Result<Option<u32>, TransportError> {
        let code = self.inner.stopped().await?;
        Ok(code.map(|c| u32::try_from(c.into_inner()).unwrap_or(u32::MAX)))
    }

    /// Set this stream's priority relative to the connection's other streams
    /// (higher goes first).
    pub fn set_priority(&self, priority: i32) -> Result<(), TransportError> {
        self.inner.set_priority(priority)?;
        Ok(())
    }
}

impl AsyncWrite for SendStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let n = match this.acct.shared.upload.as_ref() {
            None => buf.len(),
            Some(limiter) => ready!(this.credit.poll_take(cx, limiter, buf.len())).min(buf.len()),
        };
        let written = ready!(Pin::new(&mut this.inner).poll_write(cx, &buf[..n]))?;
        this.credit.spend(written);
        this.sent(written);
        Poll::Ready(Ok(written))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        AsyncWrite::poll_shutdown(Pin::new(&mut self.get_mut().inner), cx)
    }
}

impl Drop for SendStream {
    fn drop(&mut self) {
        if let Some(limiter) = self.acct.shared.upload.as_ref() {
            limiter.give_back(self.credit.unspent());
        }
    }
}

/// The receiving half of a stream: tokio [`AsyncRead`], rate-limited by the
/// endpoint's download limit and counted.
#[derive(Debug)]
pub struct RecvStream {
    inner: quinn::RecvStream,
    acct: Accounting,
    credit: Credit,
}

impl RecvStream {
    pub(crate) fn new(inner: quinn::RecvStream, acct: Accounting) -> Self {
        RecvStream {
            inner,
            acct,
            credit: Credit::default(),
        }
    }

    /// Read the next piece of data, at most `max` bytes, without copying;
    /// `None` at the end of the stream.
    pub async fn read_chunk(&mut self, max: usize) -> Result<Option<Bytes>, TransportError> {
        let max = match self.acct.shared.download.as_ref() {
            None => max,
            Some(limiter) => self.credit.take(limiter, max).await.min(max),
        };
        match self.inner.read_chunk(max, true).await? {
            Some(chunk) => {
                self.credit.spend(chunk.bytes.len());
                self.acct.received(chunk.bytes.len());
                Ok(Some(chunk.bytes))
            }
            None => Ok(None),
        }
    }

    /// Read up to `bufs.len()` pieces at once, without copying: the number
    /// filled, `None` at the end of the stream. One call takes the
    /// connection's lock once for all of them, where [`read_chunk`] takes it
    /// per piece (one packet's worth, ~1.2 KB, in a bulk transfer). With a
    /// download limit it reads one piece, within the limit.
    ///
    /// [`read_chunk`]: Self::read_chunk
    pub async fn read_chunks(
        &mut self,
        bufs: &mut [Bytes],
    ) -> Result<Option<usize>, TransportError> {
        let Some(first) = bufs.first_mut() else {
            return Ok(Some(0));
        };
        if self.acct.shared.download.is_some() {
            return Ok(self.read_chunk(usize::MAX).await?.map(|b| {
                *first = b;
                1
            }));
        }
        match self.inner.read_chunks(bufs).await? {
            Some(n) => {
                self.acct.received(bufs[..n].iter().map(Bytes::len).sum());
                Ok(Some(n))
            }
            None => Ok(None),
        }
    }

    /// Read the whole stream into memory, failing if it is longer than
    /// `limit` bytes.
    pub async fn read_all(&mut self, limit: usize) -> Result<Vec<u8>, TransportError> {
        let mut out = Vec::new();
        while let Some(chunk) = self.read_chunk(PIECE * 4).await? {
            if out.len() + chunk.len() > limit {
                return Err(TransportError::TooLong { limit });
            }
            out.extend_from_slice(&chunk);
        }
        Ok(out)
    }

    /// Tell the peer to stop sending, with `code`.
    pub fn stop(&mut self, code: u32) -> Result<(), TransportError> {
        self.inner.stop(VarInt::from_u32(code))?;
        Ok(())
    }
}

impl AsyncRead for RecvStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        match this.acct.shared.download.as_ref() {
            None => {
                let before = buf.filled().len();
                ready!(this.inner.poll_read_buf(cx, buf)).map_err(io::Error::from)?;
                this.acct.received(buf.filled().len() - before);
            }
            Some(limiter) => {
                let allowed = ready!(this.credit.poll_take(cx, limiter, buf.remaining()));
                let dst = buf.initialize_unfilled_to(allowed.min(buf.remaining()));
                let n = ready!(this.inner.poll_read(cx, dst)).map_err(io::Error::from)?;
                buf.advance(n);
                this.credit.spend(n);
                this.acct.received(n);
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl Drop for RecvStream {
    fn drop(&mut self) {
        if let Some(limiter) = self.acct.shared.download.as_ref() {
            limiter.give_back(self.credit.unspent());
        }
    }
}
