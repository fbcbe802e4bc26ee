//! Both directions of a routed connection copied unchanged, until either side closes, the
//! connection is idle too long, or the listener shuts down.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::{Instant, sleep_until};

/// Copy buffer per direction.
const BUFFER: usize = 64 * 1024;

/// How a splice ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpliceEnd {
    /// One side closed (or failed).
    Closed,
    /// Neither side sent anything for the idle timeout.
    Idle,
    /// The listener is shutting down.
    Shutdown,
}

/// Bytes moved by a splice.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpliceTotals {
    /// Client to backend.
    pub upstream: u64,
    /// Backend to client.
    pub downstream: u64,
}

/// Copies `client` ↔ `backend` until one ends; returns why, and what moved.
pub async fn splice<C, B>(
    client: C,
    backend: B,
    idle: Duration,
    mut closing: watch::Receiver<bool>,
) -> (SpliceEnd, SpliceTotals)
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (mut client_rx, mut client_tx) = tokio::io::split(client);
    let (mut backend_rx, mut backend_tx) = tokio::io::split(backend);
    let mut up = vec![0u8; BUFFER];
    let mut down = vec![0u8; BUFFER];
    let mut totals = SpliceTotals::default();
    let mut deadline = Instant::now() + idle;
    let end = loop {
        tokio::select! {
            read = client_rx.read(&mut up) => match read {
                Ok(0) | Err(_) => break SpliceEnd::Closed,
                Ok(n) => {
                    if backend_tx.write_all(&up[..n]).await.is_err() {
                        break SpliceEnd::Closed;
                    }
                    totals.upstream += n as u64;
                    deadline = Instant::now() + idle;
                }
            },
            read = backend_rx.read(&mut down) => match read {
                Ok(0) | Err(_) => break SpliceEnd::Closed,
                Ok(n) => {
                    if client_tx.write_all(&down[..n]).await.is_err() {
                        break SpliceEnd::Closed;
                    }
                    totals.downstream += n as u64;
                    deadline = Instant::now() + idle;
                }
            },
            () = sleep_until(deadline) => break SpliceEnd::Idle,
            changed = closing.changed() => {
                if changed.is_err() || *closing.borrow() {
                    break SpliceEnd::Shutdown;
                }
            }
        }
    };
    let _ = backend_tx.shutdown().await;
    let _ = client_tx.shutdown().await;
    (end, totals)
}
