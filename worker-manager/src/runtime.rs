//! Where a worker lives on disk: the store layout the worker side reads, and the per-VM runtime
//! folder `<store>/run/<GUID>/` that both sides share.
//!
//! The runtime folder holds `worker.lock`, `control.sock`, `console.sock`, `pid` and
//! `worker.log` (and, while a worker starts, the log of the one before: `worker.log.previous`).
//! Whether a worker runs is decided by the lock alone
//! ([`WorkerLock`](crate::WorkerLock)); the worker's identity by its control socket's peer
//! credentials and handshake. The pid file is for people. The worker creates the sockets and
//! writes `pid` once its guest runs, and removes them when it exits cleanly; after a crash they
//! stay behind, and whoever next takes the lock removes them.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use vmm_core::VmId;

/// The parts of the store a worker reads, by the same layout as `vmm_core::Store` (checked by a
/// test). The worker must not open a `Store` itself: opening one tidies the store, which is the
/// service's job alone.
#[derive(Debug, Clone)]
pub struct StoreLayout {
    root: PathBuf,
}

impl StoreLayout {
    /// The store rooted at `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        StoreLayout { root: root.into() }
    }

    /// The store's root folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `<root>/vms/<GUID>/config.json`.
    pub fn config_path(&self, vm: VmId) -> PathBuf {
        self.vm_dir(vm).join("config.json")
    }

    /// `<root>/vms/<GUID>/disks`: where relative disk paths are resolved.
    pub fn disks_dir(&self, vm: VmId) -> PathBuf {
        self.vm_dir(vm).join("disks")
    }

    /// The runtime folder of `vm`'s worker.
    pub fn runtime(&self, vm: VmId) -> RuntimeDir {
        RuntimeDir {
            dir: self.root.join("run").join(vm.to_string()),
        }
    }

    /// `<root>/run/pool-<pid>`: where the pool worker `pid` binds its sockets and creates its log
    /// while it waits for a VM.
    pub fn pool_dir(&self, pid: u32) -> PathBuf {
        self.root.join("run").join(format!("pool-{pid}"))
    }

    /// [`Self::pool_dir`] as a runtime folder: the files a pool worker prepares there carry the
    /// names they will have in its VM's.
    pub(crate) fn idle_folder(&self, pid: u32) -> RuntimeDir {
        RuntimeDir {
            dir: self.pool_dir(pid),
        }
    }

    /// `<root>/vms/<GUID>`: everything persistent about the VM.
    pub fn vm_dir(&self, vm: VmId) -> PathBuf {
        self.root.join("vms").join(vm.to_string())
    }
}

/// A worker's runtime folder, `<store>/run/<GUID>/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeDir {
    dir: PathBuf,
}

impl RuntimeDir {
    /// The folder.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The control socket (frames of [`crate::protocol`]).
    pub fn control_socket(&self) -> PathBuf {
        self.dir.join("control.sock")
    }

    /// The console socket: COM1, raw bytes both ways.
    pub fn console_socket(&self) -> PathBuf {
        self.dir.join("console.sock")
    }

    /// The worker's pid, written atomically once its guest runs.
    pub fn pid_file(&self) -> PathBuf {
        self.dir.join("pid")
    }

    /// The worker's stdout and stderr.
    pub fn log_file(&self) -> PathBuf {
        self.dir.join("worker.log")
    }

    /// The log of the worker before, moved aside when a worker starts until the new worker
    /// removes it.
    pub fn previous_log_file(&self) -> PathBuf {
        self.dir.join("worker.log.previous")
    }

    /// A new, empty `worker.log` for a worker about to start (the caller holds the lock).
    ///
    /// The previous log is renamed aside, not truncated: freeing a file's blocks costs ext4
    /// ~0.2 ms, which a start would wait for; the new worker removes the old log once its guest
    /// runs ([`Self::remove_previous_log`]). A symbolic link planted as `worker.log` is refused:
    /// whoever planted it meant our writes to land elsewhere.
    pub(crate) fn start_log(&self) -> io::Result<fs::File> {
        let log = self.log_file();
        if self.check_log_file()? {
            fs::rename(&log, self.previous_log_file())?;
        }
        // Created here and now: anything at the path since would make this fail, not be used.
        create_private(&log)
    }

    /// Whether a `worker.log` is there; an error when it is a symbolic link, which whoever
    /// planted it meant our writes to follow.
    pub(crate) fn check_log_file(&self) -> io::Result<bool> {
        match fs::symlink_metadata(self.log_file()) {
            Ok(meta) if meta.file_type().is_symlink() => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "worker.log is a symbolic link; refusing to follow it",
            )),
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Moves what a pool worker prepared in its `idle` folder (its log and its listening
    /// sockets) into this folder, whose lock the caller holds: three renames.
    ///
    /// A `worker.log` already here (the previous worker's, or anything planted under that name)
    /// is exchanged into the idle folder (`RENAME_EXCHANGE`), never written to or followed, and
    /// goes with that folder: deleting it here would free its blocks, which costs ext4 ~0.2 ms
    /// that a start would wait for.
    pub(crate) fn take_in(&self, idle: &RuntimeDir) -> io::Result<()> {
        move_log(&idle.log_file(), &self.log_file())?;
        fs::rename(idle.control_socket(), self.control_socket())?;
        fs::rename(idle.console_socket(), self.console_socket())
    }

    /// Removes the log of the worker before (see [`Self::start_log`]).
    pub(crate) fn remove_previous_log(&self) {
        // Missing is what we want; anything else leaves a file behind, which the next start
        // replaces.
        let _ = fs::remove_file(self.previous_log_file());
    }

    /// The lock held by the process that runs (or is starting) the VM's worker
    /// ([`WorkerLock`](crate::WorkerLock)).
    pub fn lock_file(&self) -> PathBuf {
        self.dir.join("worker.lock")
    }

    /// Removes the sockets and the pid file whoever wrote them: for a caller that holds the
    /// worker lock, which proves no worker runs that could own them.
    pub(crate) fn remove_stale_files(&self) {
        for file in [
            self.control_socket(),
            self.console_socket(),
            self.pid_file(),
        ] {
            let _ = fs::remove_file(file);
        }
    }

    /// Creates the folder, readable by its owner only (it holds sockets that control the VM and
    /// the worker's log), or checks the one that exists.
    ///
    /// An existing folder is used only if it is a real folder (not a symbolic link, looked at
    /// with `lstat`) owned by this process's user; anything else was planted by someone who
    /// wants our files written elsewhere, and is refused. Its mode is then set to 0700.
    pub fn create(&self) -> io::Result<()> {
        self.create_keeping_mode()?;
        self.tighten()
    }

    /// [`Self::create`] without setting the mode of a folder that was there: for a worker whose
    /// seccomp filter leaves modes to the launcher, which set it before.
    pub(crate) fn create_keeping_mode(&self) -> io::Result<()> {
        match fs::DirBuilder::new().mode(0o700).create(&self.dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // The parent `run/` is the store's; create it if a caller has not.
                if let Some(parent) = self.dir.parent() {
                    fs::DirBuilder::new()
                        .recursive(true)
                        .mode(0o700)
                        .create(parent)?;
                }
                fs::DirBuilder::new().mode(0o700).create(&self.dir)?;
            }
            Err(e) => return Err(e),
        }
        let meta = fs::symlink_metadata(&self.dir)?;
        if meta.file_type().is_symlink() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "runtime folder is a symbolic link; refusing to use it",
            ));
        }
        if !meta.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "runtime folder is not a folder",
            ));
        }
        // SAFETY: geteuid has no preconditions and cannot fail.
        let me = unsafe { libc::geteuid() };
        if meta.uid() != me {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "runtime folder belongs to uid {}, not to us (uid {me}); refusing to use it",
                    meta.uid()
                ),
            ));
        }
        Ok(())
    }

    /// Sets the folder's mode to 0700 when it is not.
    fn tighten(&self) -> io::Result<()> {
        let mode = fs::symlink_metadata(&self.dir)?.permissions().mode();
        // Only when it differs: a chmod is a metadata write, and a start passes here twice.
        if mode & 0o7777 != 0o700 {
            fs::set_permissions(&self.dir, fs::Permissions::from_mode(0o700))?;
        }
        Ok(())
    }

    /// The pid in the pid file; `None` when there is no pid file or it holds no pid (a torn file
    /// cannot happen: it is written atomically, but a user may have edited it).
    pub fn read_pid(&self) -> io::Result<Option<u32>> {
        match fs::read_to_string(self.pid_file()) {
            Ok(text) => Ok(text.trim().parse().ok().filter(|&pid| pid > 0)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Records `pid` as the folder's worker: atomically (a reader sees no pid file or the whole
    /// new one) but not durably. The file names a live process, which a crash of the host ends
    /// anyway (a pid file a crash leaves behind is stale, and is treated so), while an fsync on
    /// every worker's start path costs 5-50 ms on a busy disk.
    pub fn write_pid(&self, pid: u32) -> io::Result<()> {
        let path = self.pid_file();
        let tmp = vmm_core::atomic_file::temporary_sibling(&path)?;
        let written = fs::write(&tmp, format!("{pid}\n")).and_then(|()| fs::rename(&tmp, &path));
        if written.is_err() {
            // Best effort: the temporary may not exist if creating it is what failed.
            let _ = fs::remove_file(&tmp);
        }
        written
    }

    /// Removes the sockets and the pid file, keeping `worker.log` for post-mortems. Only when the
    /// pid file names `pid` or is gone, so that a late clean-up never removes a newer worker's
    /// files.
    pub fn remove_live_files(&self, pid: u32) {
        if matches!(self.read_pid(), Ok(Some(found)) if found != pid) {
            return;
        }
        for file in [
            self.control_socket(),
            self.console_socket(),
            self.pid_file(),
        ] {
            // Missing files are what we want; anything else cannot be helped here.
            let _ = fs::remove_file(file);
        }
    }

    /// The last non-empty line of `worker.log`, for error messages about a worker that died.
    pub fn last_log_line(&self) -> Option<String> {
        let text = fs::read(self.log_file()).ok()?;
        let text = String::from_utf8_lossy(&text);
        text.lines()
            .rev()
            .map(str::trim)
            .find(|line| !line.is_empty())
            .map(str::to_owned)
    }
}

/// Creates `path` for writing, owner-only whatever the umask (logs, guest memory and device
/// state must not be readable by other users), failing if anything is there already.
pub(crate) fn create_private(path: &Path) -> io::Result<fs::File> {
    fs::File::options()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_the_service_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = vmm_core::Store::open(dir.path()).unwrap();
        let layout = StoreLayout::new(dir.path());
        let vm = VmId::new_random();

        assert_eq!(layout.config_path(vm), store.config_path(vm));
        assert_eq!(layout.disks_dir(vm), store.disks_dir(vm));
        assert_eq!(layout.runtime(vm).path(), store.run_dir(vm));
    }

    #[test]
    fn pid_round_trips_and_garbage_reads_as_none() {
        let dir = tempfile::tempdir().unwrap();
        let runtime = StoreLayout::new(dir.path()).runtime(VmId::new_random());
        runtime.create().unwrap();

        runtime.write_pid(4242).unwrap();
        let written = runtime.read_pid().unwrap();
        fs::write(runtime.pid_file(), "not a pid").unwrap();
        let garbage = runtime.read_pid().unwrap();

        assert_eq!(written, Some(4242));
        assert_eq!(garbage, None);
    }

    #[test]
    fn clean_up_spares_another_workers_files() {
        let dir = tempfile::tempdir().unwrap();
        let runtime = StoreLayout::new(dir.path()).runtime(VmId::new_random());
        runtime.create().unwrap();
        runtime.write_pid(200).unwrap();

        runtime.remove_live_files(100);

        assert_eq!(runtime.read_pid().unwrap(), Some(200));
    }

    #[test]
    fn create_makes_an_owner_only_folder() {
        let dir = tempfile::tempdir().unwrap();
        let runtime = StoreLayout::new(dir.path()).runtime(VmId::new_random());

        runtime.create().unwrap();

        let mode = fs::metadata(runtime.path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
    }

    #[test]
    fn create_tightens_an_existing_folder() {
        let dir = tempfile::tempdir().unwrap();
        let runtime = StoreLayout::new(dir.path()).runtime(VmId::new_random());
        fs::create_dir_all(runtime.path()).unwrap();
        fs::set_permissions(runtime.path(), fs::Permissions::from_mode(0o777)).unwrap();

        runtime.create().unwrap();

        let mode = fs::metadata(runtime.path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
    }

    #[test]
    fn create_refuses_a_runtime_folder_that_is_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = dir.path().join("elsewhere");
        fs::create_dir(&elsewhere).unwrap();
        let runtime = StoreLayout::new(dir.path()).runtime(VmId::new_random());
        fs::create_dir_all(runtime.path().parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(&elsewhere, runtime.path()).unwrap();

        let result = runtime.create();

        assert_eq!(result.unwrap_err().kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn create_refuses_a_runtime_folder_owned_by_another_user() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: handing a folder to another user needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let runtime = StoreLayout::new(dir.path()).runtime(VmId::new_random());
        fs::create_dir_all(runtime.path()).unwrap();
        std::os::unix::fs::chown(runtime.path(), Some(65534), Some(65534)).unwrap();

        let result = runtime.create();

        assert_eq!(result.unwrap_err().kind(), io::ErrorKind::PermissionDenied);
    }

    #[test]
    fn last_log_line_skips_trailing_blank_lines() {
        let dir = tempfile::tempdir().unwrap();
        let runtime = StoreLayout::new(dir.path()).runtime(VmId::new_random());
        runtime.create().unwrap();
        fs::write(runtime.log_file(), "first\nerror: no kernel\n\n").unwrap();

        assert_eq!(runtime.last_log_line().as_deref(), Some("error: no kernel"));
    }

    fn runtime_with_log(text: &str) -> (tempfile::TempDir, RuntimeDir) {
        let dir = tempfile::tempdir().unwrap();
        let runtime = StoreLayout::new(dir.path()).runtime(VmId::new_random());
        runtime.create().unwrap();
        fs::write(runtime.log_file(), text).unwrap();
        (dir, runtime)
    }

    #[test]
    fn start_log_moves_the_previous_log_aside_and_starts_empty() {
        let (_dir, runtime) = runtime_with_log("last run\n");

        let mut log = runtime.start_log().unwrap();
        std::io::Write::write_all(&mut log, b"this run\n").unwrap();

        assert_eq!(
            fs::read_to_string(runtime.log_file()).unwrap(),
            "this run\n"
        );
        assert_eq!(
            fs::read_to_string(runtime.previous_log_file()).unwrap(),
            "last run\n"
        );
        assert_eq!(
            fs::metadata(runtime.log_file()).unwrap().mode() & 0o777,
            0o600
        );
    }

    #[test]
    fn previous_log_goes_once_removed() {
        let (_dir, runtime) = runtime_with_log("last run\n");
        runtime.start_log().unwrap();

        runtime.remove_previous_log();

        assert!(!runtime.previous_log_file().exists());
        assert!(runtime.log_file().exists());
    }

    #[test]
    fn start_log_refuses_a_planted_symlink_and_leaves_its_target() {
        let dir = tempfile::tempdir().unwrap();
        let runtime = StoreLayout::new(dir.path()).runtime(VmId::new_random());
        runtime.create().unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, "precious").unwrap();
        std::os::unix::fs::symlink(&victim, runtime.log_file()).unwrap();

        let error = runtime.start_log().unwrap_err();

        assert!(error.to_string().contains("symbolic link"), "{error}");
        assert_eq!(fs::read_to_string(&victim).unwrap(), "precious");
    }
}
