//! The worker's console socket: COM1, raw bytes both ways, to any number of attached clients.
//! (The same ring also carries COM2's output to the guest-agent client, see `agent.rs`.)
//!
//! Guest output goes into a fixed ring ([`ConsoleLog`]) on the vCPU thread — a copy under the
//! console's own lock, no allocation, never a socket write — so a slow or stuck client can never
//! stall the guest. Each client has an output thread that follows the ring from where it is (a new
//! client starts with the recent output the ring still holds, so a late attach sees the banner)
//! and an input thread that feeds its bytes to COM1.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use super::control::WorkerShared;
use super::machine::lock;

/// Bytes of recent output kept for clients that attach late.
pub const CONSOLE_RING_BYTES: usize = 16 * 1024;
/// How long console input may wait for the guest to drain COM1's FIFO before it is dropped.
const INPUT_TIMEOUT: Duration = Duration::from_secs(2);
/// Bound on one write to a client that stopped reading; it then misses output, not the guest.
const CLIENT_WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often an idle output thread checks whether its client left.
const IDLE_CHECK: Duration = Duration::from_millis(500);

#[derive(Debug)]
struct Ring {
    bytes: Box<[u8]>,
    /// Total bytes ever written; byte `n` lives at `bytes[n % len]` while `n + len > written`.
    written: u64,
}

/// The guest's console output: a ring of the most recent [`CONSOLE_RING_BYTES`] bytes.
#[derive(Debug)]
pub(crate) struct ConsoleLog {
    ring: Mutex<Ring>,
    grew: Condvar,
}

impl Default for ConsoleLog {
    fn default() -> Self {
        ConsoleLog {
            ring: Mutex::new(Ring {
                bytes: vec![0; CONSOLE_RING_BYTES].into_boxed_slice(),
                written: 0,
            }),
            grew: Condvar::new(),
        }
    }
}

impl ConsoleLog {
    /// Appends guest output (vCPU thread: a copy, no allocation).
    fn push(&self, data: &[u8]) {
        let mut ring = lock(&self.ring);
        let len = ring.bytes.len() as u64;
        for &byte in data {
            let at = (ring.written % len) as usize;
            ring.bytes[at] = byte;
            ring.written += 1;
        }
        drop(ring);
        self.grew.notify_all();
    }

    /// Position of the oldest byte still held: where a new client starts.
    fn oldest(&self) -> u64 {
        let ring = lock(&self.ring);
        ring.written.saturating_sub(ring.bytes.len() as u64)
    }

    /// Position after the newest byte: where a reader that wants only what comes next starts.
    pub(crate) fn end(&self) -> u64 {
        lock(&self.ring).written
    }

    /// Waits up to `wait` for output past `from` and copies it into `out` (cleared first);
    /// returns the position after it. Output a slow reader missed is skipped.
    pub(crate) fn read_from(&self, from: u64, out: &mut Vec<u8>, wait: Duration) -> u64 {
        out.clear();
        let ring = lock(&self.ring);
        let (ring, _) = self
            .grew
            .wait_timeout_while(ring, wait, |r| r.written <= from)
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let len = ring.bytes.len() as u64;
        let start = from.max(ring.written.saturating_sub(len));
        for n in start..ring.written {
            out.push(ring.bytes[(n % len) as usize]);
        }
        ring.written
    }

    /// Wakes every output thread (a client left).
    fn wake(&self) {
        self.grew.notify_all();
    }
}

/// The COM1 sink: guest output into the ring.
pub(crate) struct ConsoleSink(Arc<ConsoleLog>);

impl ConsoleSink {
    pub(crate) fn new(log: Arc<ConsoleLog>) -> Self {
        ConsoleSink(log)
    }
}

impl Write for ConsoleSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.push(buf);
        super::start_trace::first_output();
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Attaches one client that connected to `console.sock`.
pub(crate) fn accept(stream: UnixStream, shared: &Arc<WorkerShared>) {
    if let Err(error) = attach(stream, shared) {
        log_line!("worker {}: console client: {error}", shared.vm());
    }
}

/// Sends one client what the guest printed so far, then starts its two threads.
///
/// The backlog goes out from the accepting thread: a client that connects to watch a starting
/// guest gets its first bytes without waiting for a thread to start. A fresh socket takes a whole
/// ring without blocking; whatever it would not take is left to the output thread.
fn attach(stream: UnixStream, shared: &Arc<WorkerShared>) -> io::Result<()> {
    stream.set_write_timeout(Some(CLIENT_WRITE_TIMEOUT))?;
    let input = stream.try_clone()?;
    let left = Arc::new(AtomicBool::new(false));
    let log = shared.console();
    let mut chunk = Vec::with_capacity(CONSOLE_RING_BYTES);
    let end = log.read_from(log.oldest(), &mut chunk, Duration::ZERO);
    stream.set_nonblocking(true)?;
    let sent = match (&stream).write(&chunk) {
        Ok(sent) => sent,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
        Err(e) => return Err(e),
    };
    stream.set_nonblocking(false)?;
    let position = end - (chunk.len() - sent) as u64;
    let output_left = Arc::clone(&left);
    std::thread::Builder::new()
        .name("console-out".into())
        .spawn(move || output(stream, &log, position, chunk, &output_left))?;
    let shared = Arc::clone(shared);
    std::thread::Builder::new()
        .name("console-in".into())
        .spawn(move || {
            feed(input, &shared);
            left.store(true, Ordering::SeqCst);
            shared.console().wake();
        })?;
    Ok(())
}

/// Copies guest output from `position` on to the client until it leaves or stops taking it
/// (`chunk` is a buffer to reuse).
fn output(
    mut stream: UnixStream,
    log: &ConsoleLog,
    mut position: u64,
    mut chunk: Vec<u8>,
    left: &AtomicBool,
) {
    while !left.load(Ordering::SeqCst) {
        position = log.read_from(position, &mut chunk, IDLE_CHECK);
        if !chunk.is_empty() && stream.write_all(&chunk).is_err() {
            break;
        }
    }
    // Also ends the input thread's read.
    let _ = stream.shutdown(std::net::Shutdown::Both);
}

/// Feeds the client's bytes to COM1 until it disconnects.
fn feed(mut stream: UnixStream, shared: &WorkerShared) {
    let mut buf = [0u8; 256];
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        // No guest (stopped, or between reset steps): the input has nowhere to go.
        if let Some(com1) = shared.com1() {
            // A guest that reads nothing for a while loses this input, not the client.
            let _ = com1.send_all(&buf[..n], INPUT_TIMEOUT);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn late_reader_starts_with_recent_output() {
        let log = ConsoleLog::default();
        log.push(b"banner\r\n> ");
        let mut out = Vec::new();

        let next = log.read_from(log.oldest(), &mut out, Duration::ZERO);

        assert_eq!(out, b"banner\r\n> ");
        assert_eq!(next, 10);
    }

    #[test]
    fn ring_keeps_only_the_newest_bytes() {
        let log = ConsoleLog::default();
        let old = vec![b'a'; CONSOLE_RING_BYTES];
        log.push(&old);
        log.push(b"xyz");
        let mut out = Vec::new();

        log.read_from(0, &mut out, Duration::ZERO);

        assert_eq!(out.len(), CONSOLE_RING_BYTES);
        assert_eq!(&out[out.len() - 3..], b"xyz");
        assert_eq!(out[0], b'a');
    }

    #[test]
    fn reader_at_the_end_waits_and_gets_nothing() {
        let log = ConsoleLog::default();
        log.push(b"hi");
        let mut out = vec![1, 2, 3];

        let next = log.read_from(2, &mut out, Duration::from_millis(10));

        assert!(out.is_empty());
        assert_eq!(next, 2);
    }
}
