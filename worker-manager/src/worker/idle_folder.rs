//! A pool worker's own folder, `<store>/run/pool-<pid>/`, and what it prepares there while it
//! waits: its `control.sock` and `console.sock`, bound and listening, and its `worker.log`. The
//! launcher moves all three into the VM's runtime folder once it holds the VM's lock
//! ([`RuntimeDir::take_in`]), while the worker builds the VM: three renames instead of creating a
//! file (an inode allocation and a journal write on ext4) and creating, binding and listening on
//! two sockets on the start's path. The worker's listeners and log descriptor stay what they were;
//! only their names change.
//!
//! Nobody looks in the folder, so what is there only becomes reachable once it carries the VM's
//! paths. The launcher removes the folder (with the previous worker's log, which the move put
//! there) once the worker reported ready, and the folder of an idle worker that died or that it
//! killed. A worker that leaves the pool without an assignment removes the folder itself.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::Path;

use crate::runtime::{RuntimeDir, create_private};

/// The idle folder with the two listeners and the log prepared in it.
#[derive(Debug)]
pub(crate) struct IdleFolder {
    folder: RuntimeDir,
    /// `None` once the worker took them for its VM.
    listeners: Option<(UnixListener, UnixListener)>,
    log: File,
}

impl IdleFolder {
    /// Creates `folder` (owner-only, with any missing parent, like the store's `run/`; a folder
    /// left by an earlier process with this pid is replaced), binds both sockets in it and
    /// creates an empty, owner-only log.
    pub(crate) fn prepare(folder: RuntimeDir) -> io::Result<Self> {
        let dir = folder.path();
        match fs::remove_dir_all(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        let made = create_private(&folder.log_file()).and_then(|log| {
            let control = bind_listener(&folder.control_socket())?;
            let console = bind_listener(&folder.console_socket())?;
            Ok((log, control, console))
        });
        match made {
            Ok((log, control, console)) => Ok(IdleFolder {
                folder,
                listeners: Some((control, console)),
                log,
            }),
            Err(e) => {
                let _ = fs::remove_dir_all(dir);
                Err(e)
            }
        }
    }

    /// The log, for the worker to point its stdout and stderr at while it waits: whatever it
    /// says from then on is in the VM's `worker.log` once it is assigned.
    pub(crate) fn log(&self) -> &File {
        &self.log
    }

    /// The listeners, for the VM the worker was assigned: the launcher, which holds the VM's
    /// lock, has moved them (or is about to) into the VM's runtime folder, and removes this
    /// folder later.
    pub(crate) fn into_listeners(mut self) -> io::Result<(UnixListener, UnixListener)> {
        self.listeners
            .take()
            .ok_or_else(|| io::Error::other("listeners already taken"))
    }
}

impl Drop for IdleFolder {
    fn drop(&mut self) {
        // Still the worker's: it never got a VM.
        if self.listeners.is_some() {
            let _ = fs::remove_dir_all(self.folder.path());
        }
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
    fn files_taken_in_by_the_vm_folder_keep_serving_the_worker() {
        let store = tempfile::tempdir().unwrap();
        let layout = StoreLayout::new(store.path());
        let runtime = layout.runtime(vmm_core::VmId::new_random());
        runtime.create().unwrap();
        let folder = IdleFolder::prepare(layout.idle_folder(4242)).unwrap();
        let log = folder.log().try_clone().unwrap();

        runtime.take_in(&layout.idle_folder(4242)).unwrap();
        let (control, console) = folder.into_listeners().unwrap();
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
        let folder = IdleFolder::prepare(layout.idle_folder(4245)).unwrap();
        writeln!(folder.log(), "waiting").unwrap();

        runtime.take_in(&layout.idle_folder(4245)).unwrap();

        assert_eq!(fs::read_to_string(runtime.log_file()).unwrap(), "waiting\n");
        let aside = layout.idle_folder(4245).log_file();
        assert_eq!(fs::read_to_string(aside).unwrap(), "the worker before");
        drop(folder.into_listeners().unwrap());
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
        let folder = IdleFolder::prepare(layout.idle_folder(4246)).unwrap();

        runtime.take_in(&layout.idle_folder(4246)).unwrap();

        assert!(fs::symlink_metadata(runtime.log_file()).unwrap().is_file());
        let aside = fs::symlink_metadata(layout.idle_folder(4246).log_file()).unwrap();
        assert!(aside.file_type().is_symlink());
        assert_eq!(fs::read_to_string(&victim).unwrap(), "precious");
        drop(folder.into_listeners().unwrap());
    }

    #[test]
    fn an_idle_worker_that_is_never_assigned_leaves_nothing() {
        let store = tempfile::tempdir().unwrap();
        let layout = StoreLayout::new(store.path());

        drop(IdleFolder::prepare(layout.idle_folder(4243)).unwrap());

        assert!(!layout.pool_dir(4243).exists());
    }

    #[test]
    fn a_stale_folder_of_the_same_pid_is_replaced() {
        let store = tempfile::tempdir().unwrap();
        let layout = StoreLayout::new(store.path());
        let stale = layout.idle_folder(4244);
        fs::create_dir_all(stale.path()).unwrap();
        fs::write(stale.control_socket(), b"stale").unwrap();
        fs::write(stale.log_file(), b"stale").unwrap();

        let folder = IdleFolder::prepare(layout.idle_folder(4244)).unwrap();

        assert!(UnixStream::connect(stale.control_socket()).is_ok());
        assert_eq!(fs::metadata(stale.log_file()).unwrap().len(), 0);
        drop(folder);
    }
}
