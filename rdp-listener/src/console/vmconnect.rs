//! Hyper-V's byte order for an RDP acceptor that expects the standard one.
//!
//! VMConnect (and FreeRDP's `/vmconnect`) run TLS right after the PCB, then CredSSP, and only
//! then send the X.224 Connection Request, inside TLS. IronRDP's acceptor wants X.224 first,
//! then the security upgrade, then CredSSP. This shim sits on the TLS stream and reorders:
//!
//! 1. the acceptor reads a synthesized X.224 request (HYBRID | SSL, what `/vmconnect` asks for)
//!    and its Connection Confirm is held back, not sent;
//! 2. CredSSP passes through unchanged (the client sends it now, as it expects);
//! 3. when the client's real X.224 request arrives (a TPKT — CredSSP messages are DER and never
//!    start with 3), it is swallowed and the held Confirm is sent in its place;
//! 4. everything after is passed through.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// TPKT + X.224 Connection Request with RDP_NEG_REQ asking for SSL | HYBRID.
const SYNTHETIC_REQUEST: [u8; 19] = [
    0x03, 0x00, 0x00, 0x13, // TPKT, length 19
    0x0e, 0xe0, 0x00, 0x00, 0x00, 0x00, 0x00, // X.224 CR
    0x01, 0x00, 0x08, 0x00, 0x03, 0x00, 0x00, 0x00, // RDP_NEG_REQ: SSL | HYBRID
];
/// X.224 TPDU code of a Connection Request (upper nibble).
const X224_CR: u8 = 0xe0;
/// Largest TPKT the shim buffers while looking for the client's request.
const MAX_TPKT: usize = 4096;

/// Where the held Connection Confirm is.
#[derive(Debug)]
enum Confirm {
    /// The acceptor is writing it.
    Collecting(Vec<u8>),
    /// Written and held until the client's request arrives.
    Held(Vec<u8>),
    /// Sent (or being sent): pass everything through.
    Sent,
}

/// The reordering stream (see the module documentation).
#[derive(Debug)]
pub struct VmConnectShim<S> {
    inner: S,
    synthetic_read: usize,
    confirm: Confirm,
    /// Bytes read from the client not yet given to the acceptor.
    read_buf: Vec<u8>,
    /// Bytes to write to the client before anything else (the held Confirm).
    write_buf: Vec<u8>,
    /// Bytes of the CredSSP message being handed out that are still to come.
    credssp_remaining: usize,
}

impl<S> VmConnectShim<S> {
    /// Wraps the TLS stream of a `/vmconnect` client.
    pub fn new(inner: S) -> Self {
        VmConnectShim {
            inner,
            synthetic_read: 0,
            confirm: Confirm::Collecting(Vec::new()),
            read_buf: Vec::new(),
            write_buf: Vec::new(),
            credssp_remaining: 0,
        }
    }
}

/// Length of the TPKT at the start of `bytes`, once its header is there.
fn tpkt_length(bytes: &[u8]) -> Option<usize> {
    match bytes {
        [0x03, 0x00, hi, lo, ..] => Some(usize::from(u16::from_be_bytes([*hi, *lo]))),
        _ => None,
    }
}

/// Total length of the DER SEQUENCE (a CredSSP TSRequest) at the start of `bytes`: `None` until
/// its header is there, `Err` if it is not a SEQUENCE.
fn der_length(bytes: &[u8]) -> Option<Result<usize, ()>> {
    let (&tag, rest) = bytes.split_first()?;
    if tag != 0x30 {
        return Some(Err(()));
    }
    let (&first, rest) = rest.split_first()?;
    if first < 0x80 {
        return Some(Ok(2 + usize::from(first)));
    }
    let count = usize::from(first & 0x7f);
    if count == 0 || count > 4 {
        return Some(Err(()));
    }
    let octets = rest.get(..count)?;
    let length = octets
        .iter()
        .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
    Some(Ok(2 + count + length))
}

impl<S: AsyncWrite + Unpin> VmConnectShim<S> {
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.write_buf.is_empty() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.write_buf))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.write_buf.drain(..n);
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for VmConnectShim<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.synthetic_read < SYNTHETIC_REQUEST.len() {
            let rest = &SYNTHETIC_REQUEST[this.synthetic_read..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.synthetic_read += n;
            return Poll::Ready(Ok(()));
        }
        loop {
            ready!(this.poll_drain(cx))?;
            if !this.read_buf.is_empty() {
                let waiting_for_request = matches!(this.confirm, Confirm::Held(_));
                if waiting_for_request && this.read_buf[0] == 0x03 {
                    match tpkt_length(&this.read_buf) {
                        Some(len) if !(7..=MAX_TPKT).contains(&len) => {
                            return Poll::Ready(Err(io::Error::new(
                                io::ErrorKind::InvalidData,
                                "bad tpkt from vmconnect client",
                            )));
                        }
                        Some(len) if this.read_buf.len() >= len => {
                            if this.read_buf[5] & 0xf0 != X224_CR {
                                return Poll::Ready(Err(io::Error::new(
                                    io::ErrorKind::InvalidData,
                                    "vmconnect client sent no x.224 connection request",
                                )));
                            }
                            this.read_buf.drain(..len);
                            if let Confirm::Held(confirm) =
                                std::mem::replace(&mut this.confirm, Confirm::Sent)
                            {
                                this.write_buf = confirm;
                            }
                            continue;
                        }
                        None if this.read_buf.len() >= 4 => {
                            return Poll::Ready(Err(io::Error::new(
                                io::ErrorKind::InvalidData,
                                "bad tpkt from vmconnect client",
                            )));
                        }
                        _ => {} // need more bytes
                    }
                } else {
                    // While the request is awaited, hand out one CredSSP message at a time: the
                    // last one and the request may arrive in one read, and the acceptor must not
                    // buffer the request past us.
                    let mut limit = this.read_buf.len();
                    if waiting_for_request {
                        if this.credssp_remaining == 0 {
                            match der_length(&this.read_buf) {
                                Some(Ok(len)) => this.credssp_remaining = len,
                                Some(Err(())) => {
                                    return Poll::Ready(Err(io::Error::new(
                                        io::ErrorKind::InvalidData,
                                        "vmconnect client sent neither credssp nor x.224",
                                    )));
                                }
                                None => limit = 0, // need more bytes of the header
                            }
                        }
                        limit = limit.min(this.credssp_remaining);
                    }
                    if limit > 0 {
                        let n = limit.min(buf.remaining());
                        buf.put_slice(&this.read_buf[..n]);
                        this.read_buf.drain(..n);
                        if waiting_for_request {
                            this.credssp_remaining -= n;
                        }
                        return Poll::Ready(Ok(()));
                    }
                }
            } else if matches!(this.confirm, Confirm::Sent) {
                return Pin::new(&mut this.inner).poll_read(cx, buf);
            }
            let mut chunk = [0u8; 4096];
            let mut chunk_buf = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut chunk_buf))?;
            if chunk_buf.filled().is_empty() {
                return Poll::Ready(Ok(())); // EOF
            }
            this.read_buf.extend_from_slice(chunk_buf.filled());
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for VmConnectShim<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Confirm::Collecting(held) = &mut this.confirm {
            let before = held.len();
            held.extend_from_slice(buf);
            if let Some(len) = tpkt_length(held)
                && held.len() >= len
            {
                // Only the Confirm is taken; the caller writes the rest of `buf` again.
                held.truncate(len);
                let confirm = std::mem::take(held);
                this.confirm = Confirm::Held(confirm);
                return Poll::Ready(Ok(len.saturating_sub(before).max(1)));
            }
            return Poll::Ready(Ok(buf.len()));
        }
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if matches!(this.confirm, Confirm::Collecting(_)) {
            return Poll::Ready(Ok(()));
        }
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}
