//! The few process primitives supervision needs, each wrapped once: pidfds (exit seen at once,
//! for children and for re-attached workers that are not our children alike, and signals that
//! cannot hit a recycled pid), reaping, and facts read from `/proc`.

use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// How a process ended, when we could see it (only a parent sees its child's status).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ExitStatus {
    /// Exit code of a normal exit.
    pub(crate) code: Option<i32>,
    /// The signal that killed it.
    pub(crate) signal: Option<i32>,
}

/// A pidfd: a handle on one process that stays valid (and never names another process) after the
/// pid is recycled.
#[derive(Debug)]
pub(crate) struct PidFd {
    fd: OwnedFd,
    pid: u32,
}

impl PidFd {
    /// Opens a pidfd for `pid`. Fails with `ESRCH` (`NotFound`) when no such process exists.
    pub(crate) fn open(pid: u32) -> io::Result<Self> {
        let raw_pid = libc::pid_t::try_from(pid)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "pid out of range"))?;
        // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1; no memory
        // is passed.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, raw_pid, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = RawFd::try_from(fd).map_err(|_| io::Error::other("pidfd out of range"))?;
        // SAFETY: `fd` was just returned by pidfd_open and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(PidFd { fd, pid })
    }

    /// The process id.
    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    /// Whether the process has exited (a zombie counts as exited).
    pub(crate) fn has_exited(&self) -> bool {
        matches!(
            poll_readable(&[self.fd.as_raw_fd()], Some(Duration::ZERO)),
            Ok(Some(0))
        )
    }

    /// Blocks until the process exits (`Ok(true)`), `cancel` becomes readable (`Ok(false)`), or
    /// `timeout` passes (`Ok(false)`).
    pub(crate) fn wait(
        &self,
        cancel: Option<RawFd>,
        timeout: Option<Duration>,
    ) -> io::Result<bool> {
        let mut fds = vec![self.fd.as_raw_fd()];
        fds.extend(cancel);
        Ok(poll_readable(&fds, timeout)? == Some(0))
    }

    /// Sends `signal` to the process (never to a process that reused its pid).
    pub(crate) fn send_signal(&self, signal: i32) -> io::Result<()> {
        // SAFETY: pidfd_send_signal takes our pidfd, a signal number, a null siginfo and flags 0.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.fd.as_raw_fd(),
                signal,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if rc < 0 {
            let error = io::Error::last_os_error();
            // ESRCH: it has already exited, which is what a kill wants.
            if error.raw_os_error() != Some(libc::ESRCH) {
                return Err(error);
            }
        }
        Ok(())
    }
}

/// Polls `fds` for readability; the index of the first readable one, or `None` on timeout.
pub(crate) fn poll_readable(fds: &[RawFd], timeout: Option<Duration>) -> io::Result<Option<usize>> {
    let mut pollfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let timeout_ms = timeout.map_or(-1, |t| i32::try_from(t.as_millis()).unwrap_or(i32::MAX));
    loop {
        // SAFETY: `pollfds` is a valid, exclusively borrowed array of `pollfds.len()` entries.
        let rc = unsafe {
            libc::poll(
                pollfds.as_mut_ptr(),
                pollfds.len() as libc::nfds_t,
                timeout_ms,
            )
        };
        if rc < 0 {
            let error = io::Error::last_os_error();
            if error.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(error);
        }
        return Ok(pollfds.iter().position(|p| p.revents != 0));
    }
}

/// Reaps our child `pid` if it has exited, returning how it ended; `None` if it still runs or is
/// not our child (then someone else reaps it).
pub(crate) fn reap_child(pid: u32) -> Option<ExitStatus> {
    let pid = libc::pid_t::try_from(pid).ok()?;
    let mut status = 0;
    // SAFETY: waitpid writes the status into the valid `status` integer.
    let rc = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
    if rc != pid {
        return None;
    }
    Some(if libc::WIFSIGNALED(status) {
        ExitStatus {
            code: None,
            signal: Some(libc::WTERMSIG(status)),
        }
    } else {
        ExitStatus {
            code: Some(libc::WEXITSTATUS(status)),
            signal: None,
        }
    })
}

/// Who serves the other end of a connected Unix socket: the process that created the listening
/// socket (its pid and effective uid), as the kernel recorded them (`SO_PEERCRED`). Unlike a pid
/// file or a handshake message, the peer cannot forge this.
pub(crate) fn peer_credentials(socket: &UnixStream) -> io::Result<(u32, u32)> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::ucred>())
        .map_err(|_| io::Error::other("ucred size"))?;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, a valid ucred, and updates `len`.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let pid = u32::try_from(cred.pid).map_err(|_| io::Error::other("peer has no pid"))?;
    Ok((pid, cred.uid))
}

/// Whether a process of user `uid` may be trusted as one of our workers: our own user, or root.
pub(crate) fn is_trusted_uid(uid: u32) -> bool {
    // SAFETY: geteuid has no arguments and cannot fail.
    let ours = unsafe { libc::geteuid() };
    uid == ours || uid == 0
}

/// The resident set size of process `pid` in KiB (`VmRSS` in `/proc/<pid>/status`).
pub(crate) fn rss_kib(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    #[allow(clippy::zombie_processes, reason = "reap_child is the wait under test")]
    fn pidfd_sees_a_child_exit_and_reap_reports_its_code() {
        let child = Command::new("sh").args(["-c", "exit 7"]).spawn().unwrap();
        let pidfd = PidFd::open(child.id()).unwrap();

        let exited = pidfd.wait(None, Some(Duration::from_secs(10))).unwrap();
        let status = reap_child(child.id());

        assert!(exited);
        assert_eq!(
            status,
            Some(ExitStatus {
                code: Some(7),
                signal: None
            })
        );
    }

    #[test]
    #[allow(clippy::zombie_processes, reason = "reap_child is the wait under test")]
    fn signal_through_pidfd_kills_and_reap_names_the_signal() {
        let child = Command::new("sleep").arg("30").spawn().unwrap();
        let pidfd = PidFd::open(child.id()).unwrap();

        pidfd.send_signal(libc::SIGKILL).unwrap();
        pidfd.wait(None, Some(Duration::from_secs(10))).unwrap();

        assert_eq!(
            reap_child(child.id()),
            Some(ExitStatus {
                code: None,
                signal: Some(libc::SIGKILL)
            })
        );
    }

    #[test]
    fn running_process_has_not_exited() {
        let pidfd = PidFd::open(std::process::id()).unwrap();

        assert!(!pidfd.has_exited());
        assert!(rss_kib(std::process::id()).is_some_and(|kib| kib > 0));
    }
}
