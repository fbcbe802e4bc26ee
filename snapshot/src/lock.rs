//! Image locks that QEMU understands: open-file-description (OFD) byte-range locks on the bytes
//! QEMU's `file-posix` driver uses, so that a `qemu-img` or QEMU process and vmms refuse to write
//! the same image at once.
//!
//! QEMU's scheme: for every permission `i` an opener holds it takes a shared lock on byte
//! `100 + i`; for every permission it does not let others have, a shared lock on byte `200 + i`.
//! Before that it tests (F_OFD_GETLK for a write lock) that nobody refuses what it wants
//! (`200 + i`) and nobody holds what it refuses (`100 + i`). A writable image holds read+write
//! and refuses others write and resize (exclusive for writers); a read-only or backing image
//! holds read and refuses write (shared among readers, exclusive against writers).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

use crate::error::{Error, Result};

const PERM_BASE: i64 = 100;
const SHARED_BASE: i64 = 200;

/// QEMU's `BLK_PERM_*` bits, in bit order.
const PERM_NAMES: [&str; 4] = ["consistent read", "write", "write unchanged", "resize"];
const CONSISTENT_READ: u32 = 1 << 0;
const WRITE: u32 = 1 << 1;
const WRITE_UNCHANGED: u32 = 1 << 2;
const ALL: u32 = 0b1111;

/// How an image is opened, which decides its lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// The top of a chain opened for writing: exclusive against writers and readers.
    Write,
    /// A read-only image or a backing layer: shared with other readers, exclusive against writers.
    Read,
}

impl LockMode {
    fn perms(self) -> (u32, u32) {
        match self {
            LockMode::Write => (CONSISTENT_READ | WRITE, CONSISTENT_READ | WRITE_UNCHANGED),
            LockMode::Read => (CONSISTENT_READ, ALL & !WRITE),
        }
    }
}

/// Checks that no other open file description conflicts with `mode`, then takes the lock on
/// `file`. The lock lives as long as the open file description (every clone of `file`).
pub fn lock_image(file: &File, path: &Path, mode: LockMode) -> Result<()> {
    // A conflict can be transient: when another thread of this process forks (spawning a worker,
    // say) while we hold an image open, the forked child keeps our open file description, and so
    // our lock, until it execs, even after we close our descriptor. A real holder keeps its lock;
    // so a conflict is only reported once it has lasted [`LOCK_PATIENCE`].
    let deadline = std::time::Instant::now() + LOCK_PATIENCE;
    loop {
        match try_lock(file, path, mode) {
            Err(Error::ImageLocked { .. }) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            other => return other,
        }
    }
}

/// How long a conflicting lock may last before it counts as held by another user of the image.
pub const LOCK_PATIENCE: std::time::Duration = std::time::Duration::from_millis(200);

fn try_lock(file: &File, path: &Path, mode: LockMode) -> Result<()> {
    let (perm, shared) = mode.perms();
    let wanted = if mode == LockMode::Write {
        "write"
    } else {
        "read"
    };
    for (i, _name) in PERM_NAMES.iter().enumerate() {
        let bit = 1 << i;
        let byte = i as i64;
        let refused_by_other = perm & bit != 0 && is_locked(file, SHARED_BASE + byte, path)?;
        let held_by_other = shared & bit == 0 && is_locked(file, PERM_BASE + byte, path)?;
        if refused_by_other || held_by_other {
            return Err(Error::ImageLocked {
                path: path.to_path_buf(),
                wanted,
            });
        }
    }
    for i in 0..PERM_NAMES.len() {
        let bit = 1 << i;
        let byte = i as i64;
        if perm & bit != 0 {
            set_shared(file, PERM_BASE + byte, path)?;
        }
        if shared & bit == 0 {
            set_shared(file, SHARED_BASE + byte, path)?;
        }
    }
    Ok(())
}

fn flock_at(kind: libc::c_short, start: i64) -> libc::flock {
    // SAFETY: `flock` is a plain C struct for which all-zero bytes are a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = start;
    fl.l_len = 1;
    fl
}

fn set_shared(file: &File, byte: i64, path: &Path) -> Result<()> {
    let fl = flock_at(libc::F_RDLCK as libc::c_short, byte);
    // SAFETY: the fd is open for the call's duration and `fl` is a valid flock the kernel reads.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EACCES) => Err(Error::ImageLocked {
            path: path.to_path_buf(),
            wanted: "read",
        }),
        _ => Err(Error::io("lock", path, err)),
    }
}

/// Whether another open file description holds any lock on `byte` (tested as a write lock).
fn is_locked(file: &File, byte: i64, path: &Path) -> Result<bool> {
    let mut fl = flock_at(libc::F_WRLCK as libc::c_short, byte);
    // SAFETY: the fd is open for the call's duration and `fl` is a valid flock the kernel fills.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
    if rc != 0 {
        return Err(Error::io("test lock of", path, io::Error::last_os_error()));
    }
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(path: &Path) -> File {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .expect("open test file")
    }

    #[test]
    fn two_readers_share_an_image() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("img");
        let (a, b) = (open(&path), open(&path));
        lock_image(&a, &path, LockMode::Read).expect("first reader");
        let second = lock_image(&b, &path, LockMode::Read);
        assert!(second.is_ok(), "{second:?}");
    }

    #[test]
    fn a_writer_excludes_a_reader_and_a_writer() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("img");
        let (a, b, c) = (open(&path), open(&path), open(&path));
        lock_image(&a, &path, LockMode::Write).expect("writer");
        let reader = lock_image(&b, &path, LockMode::Read);
        let writer = lock_image(&c, &path, LockMode::Write);
        assert!(matches!(reader, Err(Error::ImageLocked { .. })));
        assert!(matches!(writer, Err(Error::ImageLocked { .. })));
    }

    #[test]
    fn a_reader_excludes_a_writer_until_closed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("img");
        let a = open(&path);
        lock_image(&a, &path, LockMode::Read).expect("reader");
        let refused = lock_image(&open(&path), &path, LockMode::Write);
        drop(a);
        let granted = lock_image(&open(&path), &path, LockMode::Write);
        assert!(matches!(refused, Err(Error::ImageLocked { .. })));
        assert!(granted.is_ok(), "{granted:?}");
    }
}
