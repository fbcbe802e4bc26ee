//! The lock that says "a worker runs this virtual machine": `<store>/run/<GUID>/worker.lock`.
//!
//! A pid file cannot say that: after a crash it may name a recycled pid, an unrelated process, or
//! be overwritten by anyone who can write the folder, and a worker that is still starting has not
//! written it yet. A lock can: the parent takes it *before* the worker exists and hands the
//! locked descriptor to the child across `exec`, so from the first instant of the launch until
//! the worker process is gone exactly one process holds it, and it is released by the kernel
//! whenever that process dies, however it dies. Anyone can ask whether it is held (take it and
//! let go), and nobody can forge holding it without inheriting it.
//!
//! It is a `flock(2)` lock, which belongs to the open file description: the parent's copy and
//! the child's inherited copy are one lock, and the parent closing its copy after the spawn
//! leaves it held by the child alone.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use crate::runtime::RuntimeDir;

/// Environment variable naming the inherited, already locked descriptor in a worker.
pub const LOCK_FD_ENV: &str = "VMMS_WORKER_LOCK_FD";

/// A held `worker.lock`. Dropping it releases the lock (unless a child inherited it).
#[derive(Debug)]
pub struct WorkerLock {
    file: File,
}

impl WorkerLock {
    /// Takes the lock of `runtime` without waiting; `Ok(None)` when another process holds it.
    pub fn try_acquire(runtime: &RuntimeDir) -> io::Result<Option<Self>> {
        let file = open_lock_file(runtime.lock_file())?;
        if lock_exclusive(file.as_raw_fd())? {
            Ok(Some(WorkerLock { file }))
        } else {
            Ok(None)
        }
    }

    /// Whether a live process holds the lock of `runtime` (a worker runs or is starting).
    pub fn is_held(runtime: &RuntimeDir) -> io::Result<bool> {
        if !runtime.lock_file().exists() {
            return Ok(false);
        }
        Ok(Self::try_acquire(runtime)?.is_none())
    }

    /// In a worker: the lock its parent took and passed down in [`LOCK_FD_ENV`], or, for a worker
    /// started by hand, the lock taken now. `Ok(None)` when another process holds it.
    pub fn inherit_or_acquire(runtime: &RuntimeDir) -> io::Result<Option<Self>> {
        let inherited = std::env::var(LOCK_FD_ENV)
            .ok()
            .and_then(|v| v.parse::<RawFd>().ok())
            .filter(|&fd| fd > 2 && fd_is_open(fd));
        let Some(fd) = inherited else {
            return Self::try_acquire(runtime);
        };
        // SAFETY: the parent passed this descriptor for this process alone; it is open (checked
        // above) and nothing else here owns it.
        Self::from_file(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// In a pool worker: the lock its parent took and sent over the pool's socket pair.
    /// `Ok(None)` when another process holds it.
    pub(crate) fn from_file(file: File) -> io::Result<Option<Self>> {
        // Locking again through the same open file description succeeds at once when the
        // passed lock is really held; otherwise it takes it now or finds another holder.
        if lock_exclusive(file.as_raw_fd())? {
            Ok(Some(WorkerLock { file }))
        } else {
            Ok(None)
        }
    }

    /// The descriptor to keep open across `exec` in the child (its close-on-exec flag is set).
    pub fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

fn open_lock_file(path: PathBuf) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

/// `flock(LOCK_EX | LOCK_NB)`: `Ok(false)` when another open file description holds it.
fn lock_exclusive(fd: RawFd) -> io::Result<bool> {
    loop {
        // SAFETY: flock only acts on the descriptor, which the caller keeps open.
        let rc = unsafe { libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB) };
        if rc == 0 {
            return Ok(true);
        }
        let error = io::Error::last_os_error();
        match error.raw_os_error() {
            Some(libc::EWOULDBLOCK) => return Ok(false),
            Some(libc::EINTR) => continue,
            _ => return Err(error),
        }
    }
}

fn fd_is_open(fd: RawFd) -> bool {
    // SAFETY: F_GETFD only queries the descriptor's flags.
    unsafe { libc::fcntl(fd, libc::F_GETFD) >= 0 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::StoreLayout;
    use vmm_core::VmId;

    fn runtime() -> (tempfile::TempDir, RuntimeDir) {
        let dir = tempfile::tempdir().unwrap();
        let runtime = StoreLayout::new(dir.path()).runtime(VmId::new_random());
        runtime.create().unwrap();
        (dir, runtime)
    }

    #[test]
    fn second_holder_is_refused_while_the_first_holds() {
        let (_dir, runtime) = runtime();
        let first = WorkerLock::try_acquire(&runtime).unwrap();

        let second = WorkerLock::try_acquire(&runtime).unwrap();

        assert!(first.is_some());
        assert!(second.is_none());
        assert!(WorkerLock::is_held(&runtime).unwrap());
    }

    #[test]
    fn lock_is_free_once_its_holder_drops_it() {
        let (_dir, runtime) = runtime();
        drop(WorkerLock::try_acquire(&runtime).unwrap());

        let held = WorkerLock::is_held(&runtime).unwrap();

        assert!(!held);
    }

    #[test]
    fn lock_file_that_is_a_symlink_is_refused() {
        let (dir, runtime) = runtime();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"keep").unwrap();
        std::os::unix::fs::symlink(&victim, runtime.lock_file()).unwrap();

        let result = WorkerLock::try_acquire(&runtime);

        assert!(result.is_err());
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
    }
}
