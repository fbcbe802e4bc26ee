//! The worker's two listening sockets, `control.sock` and `console.sock`, served by one thread.
//!
//! Both only accept and hand over (a control connection gets a thread of its own, a console
//! client its backlog and two threads), so one thread waiting on both does the work of two, and
//! a start creates one thread fewer on its way to the guest's first byte.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::time::Duration;

use super::control::WorkerShared;

/// How long the thread rests after an accept error other than "nothing pending" (out of
/// descriptors, say), instead of polling a listener that stays readable in a hot loop.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(10);

/// Accepts on both sockets for the life of the process.
pub(crate) fn serve(control: UnixListener, console: UnixListener, shared: &Arc<WorkerShared>) {
    // Non-blocking, so that a client that went away between the wake-up and the accept does
    // not hold up the other socket. Accepted streams are blocking whatever the listener is.
    if control.set_nonblocking(true).is_err() || console.set_nonblocking(true).is_err() {
        log_line!("worker {}: listeners: cannot set non-blocking", shared.vm());
        return;
    }
    loop {
        let [control_ready, console_ready] =
            wait_readable([Some(control.as_raw_fd()), Some(console.as_raw_fd())]);
        if control_ready {
            accept_all(&control, |stream| super::control::accept(stream, shared));
        }
        if console_ready {
            accept_all(&console, |stream| super::console::accept(stream, shared));
        }
    }
}

/// Hands every pending connection of `listener` to `handle`.
fn accept_all(listener: &UnixListener, mut handle: impl FnMut(UnixStream)) {
    loop {
        match listener.accept() {
            Ok((stream, _)) => handle(stream),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => {
                std::thread::sleep(ACCEPT_ERROR_PAUSE);
                return;
            }
        }
    }
}

/// Sleeps until one of `fds` (the ones given) is readable; returns which are. An error from
/// `poll` (EINTR) reports the first as ready, so that the caller looks and polls again.
pub(crate) fn wait_readable<const N: usize>(fds: [Option<RawFd>; N]) -> [bool; N] {
    let mut polled = fds.map(|fd| libc::pollfd {
        // A negative descriptor is skipped by poll.
        fd: fd.unwrap_or(-1),
        events: libc::POLLIN,
        revents: 0,
    });
    // SAFETY: `polled` is a valid array of N pollfd structures that outlives the call.
    let ready = unsafe { libc::poll(polled.as_mut_ptr(), N as libc::nfds_t, -1) };
    if ready < 0 {
        let mut first = [false; N];
        if let Some(slot) = first.first_mut() {
            *slot = true;
        }
        return first;
    }
    polled.map(|p| p.revents != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readable_descriptors_are_reported_and_absent_ones_skipped() {
        let (a, b) = UnixStream::pair().unwrap();
        let (quiet, _other) = UnixStream::pair().unwrap();
        std::io::Write::write_all(&mut &b, b"x").unwrap();

        let ready = wait_readable([Some(quiet.as_raw_fd()), None, Some(a.as_raw_fd())]);

        assert_eq!(ready, [false, false, true]);
    }
}
