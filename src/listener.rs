//! Admission of connections to the gRPC listeners (TCP, TLS, Unix socket): a bound on open
//! connections, a deadline for each one's handshake (TLS, then the HTTP/2 preface and SETTINGS),
//! and a backoff when accepting fails instead of a busy loop.
//!
//! Owns each connection until hyper has its handshake; knows nothing of certificates (src/tls.rs)
//! nor of gRPC. tonic's own accept loop retries a failed accept at once: with the open-file
//! limit reached that spun a core at 100% and starved the connections already open.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tonic::transport::server::Connected;

use crate::log_limit::LogLimit;

/// The open-connection bound when none is configured and the open-file limit is higher.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// The first wait after a failed accept, doubled on each failure in a row up to the next.
const FIRST_BACKOFF: Duration = Duration::from_millis(10);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// The soft open-file limit (`RLIMIT_NOFILE`), from /proc (reading it with getrlimit would
/// need unsafe code). `None` where there is no /proc, or no limit.
pub fn open_file_limit() -> Option<usize> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// `server.max_connections`, or a default that leaves half the open files to the outbox, the
/// channels' connections and the admin listener.
pub fn max_connections(configured: Option<usize>) -> usize {
    configured.unwrap_or_else(|| match open_file_limit() {
        Some(files) => (files / 2).clamp(1, DEFAULT_MAX_CONNECTIONS),
        None => DEFAULT_MAX_CONNECTIONS,
    })
}

/// The limits shared by every listener of one gateway.
#[derive(Clone)]
pub struct Admission {
    slots: Arc<Semaphore>,
    max: usize,
    handshake_timeout: Duration,
    refused_log: Arc<LogLimit>,
    accept_log: Arc<LogLimit>,
}

/// An accepted connection holding its slot, and the instant its handshake must be done by.
pub struct Admitted<IO> {
    pub io: IO,
    slot: OwnedSemaphorePermit,
    pub deadline: Instant,
}

impl<IO> Admitted<IO> {
    /// The stream, and the slot and deadline without it (to put around the TLS stream made
    /// from it, with `map`).
    pub fn split(self) -> (IO, Admitted<()>) {
        (
            self.io,
            Admitted {
                io: (),
                slot: self.slot,
                deadline: self.deadline,
            },
        )
    }

    /// The same slot and deadline around another stream.
    pub fn map<T>(self, io: T) -> Admitted<T> {
        Admitted {
            io,
            slot: self.slot,
            deadline: self.deadline,
        }
    }

    /// What hyper is given: the stream, which fails once the deadline passes before the
    /// client's HTTP/2 preface and SETTINGS have arrived, and frees the slot when dropped.
    pub fn into_guarded(self) -> Guarded<IO> {
        Guarded {
            inner: self.io,
            _slot: self.slot,
            handshake: Some(Handshake {
                deadline: Box::pin(tokio::time::sleep_until(self.deadline)),
                seen: 0,
                header: [0; FRAME_HEADER],
            }),
        }
    }
}

impl Admission {
    pub fn new(max_connections: usize, handshake_timeout: Duration) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(max_connections)),
            max: max_connections,
            handshake_timeout,
            refused_log: Arc::new(LogLimit::new(Duration::from_secs(1))),
            accept_log: Arc::new(LogLimit::new(Duration::from_secs(1))),
        }
    }

    /// Connections open now (admitted and not yet closed).
    pub fn open(&self) -> usize {
        self.max.saturating_sub(self.slots.available_permits())
    }

    /// Admits what `accepted` yields: a connection past the bound is closed at once (a client
    /// then fails fast rather than waiting in the backlog); a failed accept waits 10 ms,
    /// doubling to 1 s while failures go on, and is never passed on.
    pub fn admit<S, IO>(&self, accepted: S) -> impl Stream<Item = Admitted<IO>> + Send + 'static
    where
        S: Stream<Item = io::Result<IO>> + Send + 'static,
        IO: Send + 'static,
    {
        let me = self.clone();
        futures::stream::unfold(
            (Box::pin(accepted), me, FIRST_BACKOFF),
            |(mut accepted, me, mut backoff)| async move {
                loop {
                    match accepted.next().await? {
                        Ok(io) => {
                            backoff = FIRST_BACKOFF;
                            match me.slots.clone().try_acquire_owned() {
                                Ok(slot) => {
                                    let deadline = Instant::now()
                                        .checked_add(me.handshake_timeout)
                                        .unwrap_or_else(far_future);
                                    let admitted = Admitted { io, slot, deadline };
                                    return Some((admitted, (accepted, me, backoff)));
                                }
                                Err(_) => {
                                    drop(io);
                                    if let Some(also) =
                                        me.refused_log.allow(std::time::Instant::now())
                                    {
                                        tracing::warn!(
                                            max_connections = me.max,
                                            also_refused = also,
                                            "connection closed: server.max_connections reached"
                                        );
                                    }
                                }
                            }
                        }
                        Err(e) => {
                            if let Some(also) = me.accept_log.allow(std::time::Instant::now()) {
                                tracing::warn!(
                                    error = %e,
                                    retry_in_ms = backoff.as_millis() as u64,
                                    also_failed = also,
                                    "accepting a connection failed"
                                );
                            }
                            tokio::time::sleep(backoff).await;
                            backoff = backoff.saturating_mul(2).min(MAX_BACKOFF);
                        }
                    }
                }
            },
        )
    }
}

/// About 30 years on: a deadline past any run.
fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86_400 * 365 * 30)
}

/// The client connection preface, then the 9-byte header of its first frame (SETTINGS).
const PREFACE: usize = 24;
const FRAME_HEADER: usize = 9;

struct Handshake {
    deadline: Pin<Box<Sleep>>,
    /// Bytes read so far.
    seen: usize,
    header: [u8; FRAME_HEADER],
}

impl Handshake {
    /// Counts bytes read; true once the preface and the whole first frame have arrived.
    /// hyper checks what they say; this only times them.
    fn saw(&mut self, bytes: &[u8]) -> bool {
        for (i, b) in bytes.iter().enumerate() {
            let at = self.seen.saturating_add(i);
            if at >= PREFACE + FRAME_HEADER {
                break;
            }
            if let Some(slot) = at.checked_sub(PREFACE) {
                self.header[slot] = *b;
            }
        }
        self.seen = self.seen.saturating_add(bytes.len());
        if self.seen < PREFACE + FRAME_HEADER {
            return false;
        }
        let [a, b, c, ..] = self.header;
        let len = usize::from(a) << 16 | usize::from(b) << 8 | usize::from(c);
        self.seen >= PREFACE + FRAME_HEADER + len
    }
}

/// A connection as hyper sees it: holds its slot until dropped, and fails its reads once its
/// handshake deadline passes unmet.
pub struct Guarded<IO> {
    inner: IO,
    _slot: OwnedSemaphorePermit,
    /// `None` once the client's preface and SETTINGS have arrived.
    handshake: Option<Handshake>,
}

impl<IO: Connected> Connected for Guarded<IO> {
    type ConnectInfo = IO::ConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Guarded<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let read = Pin::new(&mut this.inner).poll_read(cx, buf);
        let Some(h) = this.handshake.as_mut() else {
            return read;
        };
        if let Poll::Ready(Ok(())) = &read
            && h.saw(&buf.filled()[before..])
        {
            this.handshake = None;
            return read;
        }
        // Polled here, so the deadline wakes the connection's task while it waits to read.
        if h.deadline.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no HTTP/2 preface and SETTINGS within server.handshake_timeout",
            )));
        }
        read
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Guarded<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A listener out of file descriptors: every accept fails at once, as EMFILE does.
    #[tokio::test]
    async fn failed_accepts_back_off_instead_of_spinning() {
        let tries = Arc::new(AtomicUsize::new(0));
        let t = tries.clone();
        let failing = futures::stream::repeat_with(move || {
            t.fetch_add(1, Ordering::Relaxed);
            Err::<tokio::io::DuplexStream, _>(io::Error::from_raw_os_error(24))
        });
        let admission = Admission::new(4, Duration::from_secs(1));
        let incoming = admission.admit(failing);
        let served = tokio::spawn(async move {
            futures::pin_mut!(incoming);
            incoming.next().await.is_some()
        });
        // Waits of 10, 20, 40 ... 640 ms, then 1 s: 2 s hold eight tries, not millions.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let n = tries.load(Ordering::Relaxed);
        assert!((3..=10).contains(&n), "{n} accepts in 2 s");
        served.abort();
    }

    #[tokio::test]
    async fn backs_off_then_admits() {
        let mut script = vec![
            Err(io::Error::from_raw_os_error(24)),
            Err(io::Error::from_raw_os_error(24)),
            Ok(tokio::io::duplex(8).0),
        ]
        .into_iter();
        let items = futures::stream::poll_fn(move |_| Poll::Ready(script.next()));
        let admission = Admission::new(4, Duration::from_secs(1));
        let incoming = admission.admit(items);
        futures::pin_mut!(incoming);
        let t0 = Instant::now();
        let conn = incoming.next().await;
        assert!(conn.is_some());
        // 10 ms + 20 ms of backoff before the good one.
        assert!(t0.elapsed() >= Duration::from_millis(30));
        assert_eq!(admission.open(), 1, "the connection holds its slot");
        drop(conn);
        assert_eq!(admission.open(), 0);
    }

    #[test]
    fn the_default_bound_leaves_half_the_open_files() {
        assert_eq!(max_connections(Some(7)), 7);
        let default = max_connections(None);
        match open_file_limit() {
            Some(files) => assert_eq!(default, (files / 2).clamp(1, DEFAULT_MAX_CONNECTIONS)),
            None => assert_eq!(default, DEFAULT_MAX_CONNECTIONS),
        }
        if cfg!(target_os = "linux") {
            assert!(open_file_limit().is_some(), "/proc/self/limits is read");
        }
    }

    #[tokio::test]
    async fn the_handshake_is_the_preface_and_the_first_frame() {
        let mut h = Handshake {
            deadline: Box::pin(tokio::time::sleep_until(far_future())),
            seen: 0,
            header: [0; FRAME_HEADER],
        };
        assert!(!h.saw(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"));
        // SETTINGS with a 6-byte payload, in pieces.
        assert!(!h.saw(&[0, 0, 6, 4, 0, 0, 0]));
        assert!(!h.saw(&[0, 0, 0, 3, 0, 0]));
        assert!(h.saw(&[0, 100]));
    }
}
