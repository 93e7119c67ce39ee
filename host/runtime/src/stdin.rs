//! A guest's stdin read from an async reader (a pipe, the host's own stdin),
//! read in the guest's own poll.
//!
//! wasmtime-wasi's adapter for an async reader reads on a tokio task of its
//! own, which the store's drop aborts. The abort wakes a tokio worker, and a
//! woken worker takes the CPU from the guest thread at once (guest threads
//! run under `SCHED_IDLE`), so every stop of a stdin-blocked guest paid for
//! a worker's turn before the store was gone: about 60 µs at the median,
//! measured per stage of the stop. Here `ready()` polls the reader itself,
//! on the guest's thread with the caller's runtime entered (its I/O driver
//! wakes the guest like any other wait). Nothing runs beside the guest, and
//! dropping the store only drops the reader.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use tokio::io::{AsyncRead, ReadBuf};
use wasmtime_wasi::cli::{IsTerminal, StdinStream};
use wasmtime_wasi::p2::{InputStream, Pollable, StreamError, StreamResult};

/// How much one read of the reader asks for.
const CHUNK: usize = 16 * 1024;

/// The guest's stdin. Every handle the guest opens shares one reader and one
/// buffer, so all of them move through the input together (as WASI asks).
#[derive(Clone)]
pub(crate) struct ReaderStdin(Arc<Mutex<State>>);

struct State {
    reader: Box<dyn AsyncRead + Send + Sync + Unpin>,
    /// Bytes read and not yet handed to the guest: `buf[pos..]`.
    buf: Vec<u8>,
    pos: usize,
    end: End,
}

enum End {
    Open,
    /// The reader's end of file; also where a failure leads once told.
    Eof,
    /// A read failed; the guest is told once, then the stream is closed.
    Failed(io::Error),
}

impl ReaderStdin {
    pub(crate) fn new(reader: Box<dyn AsyncRead + Send + Sync + Unpin>) -> ReaderStdin {
        ReaderStdin(Arc::new(Mutex::new(State {
            reader,
            buf: Vec::new(),
            pos: 0,
            end: End::Open,
        })))
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Never contended (one store, one guest), and a panic while filling
        // leaves a consistent state.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl State {
    fn buffered(&self) -> &[u8] {
        &self.buf[self.pos..]
    }

    /// Ready once there are bytes to hand out or the input has ended.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if !self.buffered().is_empty() || !matches!(self.end, End::Open) {
            return Poll::Ready(());
        }
        self.buf.resize(CHUNK, 0);
        self.pos = 0;
        let mut rb = ReadBuf::new(&mut self.buf);
        let polled = Pin::new(&mut self.reader).poll_read(cx, &mut rb);
        let filled = rb.filled().len();
        self.buf.truncate(filled);
        match polled {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(())) => {
                if filled == 0 {
                    self.end = End::Eof;
                }
                Poll::Ready(())
            }
            Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            Poll::Ready(Err(e)) => {
                self.end = End::Failed(e);
                Poll::Ready(())
            }
        }
    }

    /// Up to `size` buffered bytes; after the input ended, the ending.
    fn take(&mut self, size: usize) -> StreamResult<Bytes> {
        let held = self.buffered();
        if !held.is_empty() {
            let n = size.min(held.len());
            let out = Bytes::copy_from_slice(&held[..n]);
            self.pos += n;
            return Ok(out);
        }
        match std::mem::replace(&mut self.end, End::Eof) {
            End::Open => {
                self.end = End::Open;
                Ok(Bytes::new())
            }
            End::Eof => Err(StreamError::Closed),
            End::Failed(e) => Err(StreamError::LastOperationFailed(wasmtime::Error::new(e))),
        }
    }
}

impl InputStream for ReaderStdin {
    fn read(&mut self, size: usize) -> StreamResult<Bytes> {
        let mut s = self.state();
        // A non-blocking read still sees what the reader already has.
        let _ = s.poll_fill(&mut Context::from_waker(Waker::noop()));
        s.take(size)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for ReaderStdin {
    async fn ready(&mut self) {
        poll_fn(|cx| self.state().poll_fill(cx)).await
    }
}

impl AsyncRead for ReaderStdin {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut s = self.state();
        std::task::ready!(s.poll_fill(cx));
        match s.take(out.remaining()) {
            Ok(bytes) => out.put_slice(&bytes),
            Err(StreamError::LastOperationFailed(e)) => {
                return Poll::Ready(Err(io::Error::other(e.to_string())));
            }
            Err(_) => {}
        }
        Poll::Ready(Ok(()))
    }
}

impl IsTerminal for ReaderStdin {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdinStream for ReaderStdin {
    fn p2_stream(&self) -> Box<dyn InputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn AsyncRead + Send + Sync> {
        Box::new(self.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    fn closed(r: StreamResult<Bytes>) -> bool {
        matches!(r, Err(StreamError::Closed))
    }

    #[tokio::test]
    async fn hands_out_what_the_reader_gives_then_end_of_file() {
        let (mut w, r) = tokio::io::duplex(64);
        let mut a = ReaderStdin::new(Box::new(r));
        let mut b = a.p2_stream();
        assert_eq!(a.read(10).unwrap(), Bytes::new(), "nothing written yet");

        w.write_all(b"hello world").await.unwrap();
        a.ready().await;
        assert_eq!(a.read(5).unwrap(), &b"hello"[..]);
        // A second handle continues where the first stopped.
        assert_eq!(b.read(100).unwrap(), &b" world"[..]);

        drop(w);
        b.ready().await;
        assert!(closed(a.read(1)));
        assert!(closed(b.read(1)), "the end is seen by every handle");
    }

    #[tokio::test]
    async fn a_non_blocking_read_sees_bytes_already_there() {
        let (mut w, r) = tokio::io::duplex(64);
        w.write_all(b"abc").await.unwrap();
        let mut s = ReaderStdin::new(Box::new(r));
        assert_eq!(s.read(10).unwrap(), &b"abc"[..]);
    }

    #[tokio::test]
    async fn ready_waits_for_the_writer() {
        let (mut w, r) = tokio::io::duplex(64);
        let mut s = ReaderStdin::new(Box::new(r));
        let mut waiting = s.clone();
        let reader = tokio::spawn(async move {
            waiting.ready().await;
            waiting.read(64).unwrap()
        });
        tokio::task::yield_now().await;
        assert!(!reader.is_finished());
        w.write_all(b"late").await.unwrap();
        assert_eq!(reader.await.unwrap(), &b"late"[..]);
        assert_eq!(s.read(64).unwrap(), Bytes::new());
    }

    struct Broken;

    impl AsyncRead for Broken {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Ready(Err(io::Error::other("the pipe broke")))
        }
    }

    #[tokio::test]
    async fn a_failed_read_is_reported_once_then_the_stream_is_closed() {
        let mut s = ReaderStdin::new(Box::new(Broken));
        s.ready().await;
        match s.read(1) {
            Err(StreamError::LastOperationFailed(e)) => {
                assert!(e.to_string().contains("the pipe broke"), "{e}")
            }
            other => panic!("{other:?}"),
        }
        assert!(closed(s.read(1)));
    }

    #[tokio::test]
    async fn reads_through_async_read_too() {
        use tokio::io::AsyncReadExt;
        let (mut w, r) = tokio::io::duplex(64);
        let s = ReaderStdin::new(Box::new(r));
        let mut stream = Pin::from(s.async_stream());
        w.write_all(b"xyz").await.unwrap();
        drop(w);
        let mut got = Vec::new();
        stream.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"xyz");
    }
}
