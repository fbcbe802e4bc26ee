//! A console client's idle clock: when it last sent anything. A client that sends nothing for the
//! listener's idle timeout (no key, no mouse move, no protocol traffic) loses its session, as an
//! idle RDP session on Windows is disconnected by its idle-session limit.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// When a client last sent bytes (shared between its stream and whoever watches it).
#[derive(Debug, Clone)]
pub(crate) struct Activity {
    start: Instant,
    /// Milliseconds after `start` of the last read that returned bytes.
    last: Arc<AtomicU64>,
}

impl Activity {
    /// A clock that starts now (connecting counts as activity).
    pub(crate) fn new() -> Activity {
        Activity {
            start: Instant::now(),
            last: Arc::new(AtomicU64::new(0)),
        }
    }

    fn touch(&self) {
        let now = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(now, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last.load(Ordering::Relaxed))
    }

    /// Completes once the client has sent nothing for `limit`.
    pub(crate) async fn idle_for(&self, limit: Duration) {
        loop {
            let deadline = self.last() + limit;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// `inner`, with every read that returns bytes noted on an [`Activity`].
#[derive(Debug)]
pub(crate) struct ActivityStream<S> {
    inner: S,
    activity: Activity,
}

impl<S> ActivityStream<S> {
    pub(crate) fn new(inner: S, activity: Activity) -> Self {
        ActivityStream { inner, activity }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ActivityStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.activity.touch();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ActivityStream<S> {
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
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn a_read_pushes_the_idle_deadline_back() {
        let (mut client, server) = tokio::io::duplex(64);
        let activity = Activity::new();
        let mut stream = ActivityStream::new(server, activity.clone());
        let limit = Duration::from_millis(400);

        tokio::time::sleep(Duration::from_millis(300)).await;
        client.write_all(b"k").await.unwrap();
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte).await.unwrap();
        let read_at = Instant::now();
        activity.idle_for(limit).await;

        // Idle counts from the read, not from the start (which would have ended ~100 ms later).
        assert!(read_at.elapsed() >= limit, "{:?}", read_at.elapsed());
    }

    #[tokio::test]
    async fn writes_to_the_client_do_not_count_as_activity() {
        let (mut client, server) = tokio::io::duplex(64);
        let activity = Activity::new();
        let mut stream = ActivityStream::new(server, activity.clone());
        let limit = Duration::from_millis(200);
        let started = Instant::now();

        let idle = activity.idle_for(limit);
        tokio::pin!(idle);
        loop {
            tokio::select! {
                () = &mut idle => break,
                () = tokio::time::sleep(Duration::from_millis(20)) => {
                    stream.write_all(b"frame").await.unwrap();
                    let mut sink = [0u8; 5];
                    client.read_exact(&mut sink).await.unwrap();
                }
            }
        }

        assert!(started.elapsed() < limit * 3, "{:?}", started.elapsed());
    }
}
