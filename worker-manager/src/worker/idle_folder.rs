//! A pool worker's own folder, `<store>/run/pool-<pid>/`, and what it prepares there while it
//! waits: its `control.sock` and `console.sock`, bound and listening, and its `worker.log`. On
//! assignment all three are moved into the VM's runtime folder: three renames on the start's path
//! instead of creating a file (an inode allocation and a journal write on ext4) and creating,
//! binding and listening on two sockets there.
//!
//! Nobody looks in the folder, so what is there only becomes reachable once it carries the VM's
//! paths. The log the VM's previous worker wrote is swapped into the folder by the move
//! (`RENAME_EXCHANGE`) rather than deleted: deleting a file frees its blocks, which costs ext4
//! ~0.2 ms that a start would wait for. The launcher removes the folder, with that old log, once
//! the worker reported ready (a confined worker may not: Landlock gives it no rights in `run/`),
//! and the folder of an idle worker that died or that it killed. A worker that leaves the pool
//! without an assignment removes the folder itself.

use std::ffi::CString;
use std::fs::{self, File};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use crate::runtime::RuntimeDir;

const CONTROL: &str = "control.sock";
const CONSOLE: &str = "console.sock";
const LOG: &str = "worker.log";

/// The idle folder with the two listeners and the log prepared in it, until [`Self::move_into`].
#[derive(Debug)]
pub(crate) struct IdleFolder {
    dir: PathBuf,
    /// `None` once moved.
    listeners: Option<(UnixListener, UnixListener)>,
    log: File,
}

impl IdleFolder {
    /// Creates `dir` (owner-only, with any missing parent, like the store's `run/`; a folder left
    /// by an earlier process with this pid is replaced), binds both sockets in it and creates an
    /// empty, owner-only log.
    pub(crate) fn prepare(dir: PathBuf) -> io::Result<Self> {
        match fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)?;
        let made = create_log(&dir.join(LOG)).and_then(|log| {
            let control = bind_listener(&dir.join(CONTROL))?;
            let console = bind_listener(&dir.join(CONSOLE))?;
            Ok((log, control, console))
        });
        match made {
            Ok((log, control, console)) => Ok(IdleFolder {
                dir,
                listeners: Some((control, console)),
                log,
            }),
            Err(e) => {
                let _ = fs::remove_dir_all(&dir);
                Err(e)
            }
        }
    }

    /// The folder itself.
    pub(crate) fn path(&self) -> &Path {
        &self.dir
    }

    /// The log, for the worker to point its stdout and stderr at while it waits: whatever it
    /// says from then on is in the VM's `worker.log` once it is assigned.
    pub(crate) fn log(&self) -> &File {
        &self.log
    }

    /// Moves the log and both sockets to `runtime`'s `worker.log`, `control.sock` and
    /// `console.sock` (the caller holds the VM's lock): the listeners, now at the VM's paths.
    ///
    /// A `worker.log` already there (the previous worker's, or anything planted under that name)
    /// is exchanged into the idle folder, never written to or followed.
    pub(crate) fn move_into(
        mut self,
        runtime: &RuntimeDir,
    ) -> io::Result<(UnixListener, UnixListener)> {
        move_log(&self.dir.join(LOG), &runtime.log_file())?;
        fs::rename(self.dir.join(CONTROL), runtime.control_socket())?;
        fs::rename(self.dir.join(CONSOLE), runtime.console_socket())?;
        self.listeners
            .take()
            .ok_or_else(|| io::Error::other("listeners already moved"))
    }
}

impl Drop for IdleFolder {
    fn drop(&mut self) {
        if self.listeners.is_some() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// A new, empty, owner-only file at `path`; anything already there makes this fail.
fn create_log(path: &Path) -> io::Result<File> {
    File::options()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

/// Puts the file at `from` at `to`. What was at `to` ends at `from` (`RENAME_EXCHANGE`); with
/// nothing at `to`, it is a rename that would not replace what appeared there since. A file
/// system without exchange (`EINVAL`) gets the old file renamed aside next to `from` first.
fn move_log(from: &Path, to: &Path) -> io::Result<()> {
    match rename2(from, to, libc::RENAME_EXCHANGE) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => rename2(from, to, libc::RENAME_NOREPLACE),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            fs::rename(to, from.with_extension("log.previous"))?;
            rename2(from, to, libc::RENAME_NOREPLACE)
        }
        Err(e) => Err(e),
    }
}

fn rename2(from: &Path, to: &Path, flags: libc::c_uint) -> io::Result<()> {
    let c_path = |path: &Path| {
        CString::new(path.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path with a NUL byte"))
    };
    let (from, to) = (c_path(from)?, c_path(to)?);
    // SAFETY: both paths are NUL-terminated strings that outlive the call; renameat2 only reads
    // them.
    let done = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            flags,
        )
    };
    if done == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Binds a listening socket at `path`, owner-only, replacing a socket file left there.
pub(crate) fn bind_listener(path: &Path) -> io::Result<UnixListener> {
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::StoreLayout;
    use std::io::Write;
    use std::os::unix::fs::MetadataExt;
    use std::os::unix::net::UnixStream;

    fn same_file(a: &File, path: &Path) -> bool {
        let (a, b) = (a.metadata().unwrap(), fs::symlink_metadata(path).unwrap());
        (a.dev(), a.ino()) == (b.dev(), b.ino())
    }

    fn mode(path: &Path) -> u32 {
        fs::symlink_metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn moved_files_are_at_the_vm_paths_and_the_idle_folder_is_left_empty() {
        let store = tempfile::tempdir().unwrap();
        let layout = StoreLayout::new(store.path());
        let runtime = layout.runtime(vmm_core::VmId::new_random());
        runtime.create().unwrap();
        let folder = IdleFolder::prepare(layout.pool_dir(4242)).unwrap();
        let log = folder.log().try_clone().unwrap();

        let (control, console) = folder.move_into(&runtime).unwrap();
        let _client = UnixStream::connect(runtime.control_socket()).unwrap();
        let _viewer = UnixStream::connect(runtime.console_socket()).unwrap();

        assert!(control.accept().is_ok() && console.accept().is_ok());
        assert!(same_file(&log, &runtime.log_file()));
        assert_eq!(fs::read_dir(layout.pool_dir(4242)).unwrap().count(), 0);
        assert_eq!(mode(&runtime.control_socket()), 0o600);
        assert_eq!(mode(&runtime.log_file()), 0o600);
    }

    #[test]
    fn the_previous_log_is_exchanged_into_the_idle_folder() {
        let store = tempfile::tempdir().unwrap();
        let layout = StoreLayout::new(store.path());
        let runtime = layout.runtime(vmm_core::VmId::new_random());
        runtime.create().unwrap();
        fs::write(runtime.log_file(), "the worker before").unwrap();
        let folder = IdleFolder::prepare(layout.pool_dir(4245)).unwrap();
        writeln!(folder.log(), "waiting").unwrap();

        drop(folder.move_into(&runtime).unwrap());

        assert_eq!(fs::read_to_string(runtime.log_file()).unwrap(), "waiting\n");
        let aside = layout.pool_dir(4245).join(LOG);
        assert_eq!(fs::read_to_string(aside).unwrap(), "the worker before");
    }

    #[test]
    fn a_planted_log_symlink_is_moved_aside_and_its_target_untouched() {
        let store = tempfile::tempdir().unwrap();
        let layout = StoreLayout::new(store.path());
        let runtime = layout.runtime(vmm_core::VmId::new_random());
        runtime.create().unwrap();
        let victim = store.path().join("victim");
        fs::write(&victim, "precious").unwrap();
        std::os::unix::fs::symlink(&victim, runtime.log_file()).unwrap();
        let folder = IdleFolder::prepare(layout.pool_dir(4246)).unwrap();

        drop(folder.move_into(&runtime).unwrap());

        assert!(fs::symlink_metadata(runtime.log_file()).unwrap().is_file());
        let aside = fs::symlink_metadata(layout.pool_dir(4246).join(LOG)).unwrap();
        assert!(aside.file_type().is_symlink());
        assert_eq!(fs::read_to_string(&victim).unwrap(), "precious");
    }

    #[test]
    fn an_idle_worker_that_is_never_assigned_leaves_nothing() {
        let store = tempfile::tempdir().unwrap();
        let layout = StoreLayout::new(store.path());

        drop(IdleFolder::prepare(layout.pool_dir(4243)).unwrap());

        assert!(!layout.pool_dir(4243).exists());
    }

    #[test]
    fn a_stale_folder_of_the_same_pid_is_replaced() {
        let store = tempfile::tempdir().unwrap();
        let layout = StoreLayout::new(store.path());
        let dir = layout.pool_dir(4244);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join(CONTROL), b"stale").unwrap();
        fs::write(dir.join(LOG), b"stale").unwrap();

        let folder = IdleFolder::prepare(dir.clone()).unwrap();

        assert!(UnixStream::connect(dir.join(CONTROL)).is_ok());
        assert_eq!(fs::metadata(dir.join(LOG)).unwrap().len(), 0);
        drop(folder);
    }
}
