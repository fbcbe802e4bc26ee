//! Where a worker lives on disk: the store layout the worker side reads, and the per-VM runtime
//! folder `<store>/run/<GUID>/` that both sides share.
//!
//! The runtime folder holds `control.sock`, `console.sock`, `pid` and `worker.log`. The worker
//! creates the sockets and writes `pid` (atomically) once its guest runs, and removes them when it
//! exits cleanly; after a crash they stay behind, and the parent's re-attach finds the pid dead
//! and cleans them up.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
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

    fn vm_dir(&self, vm: VmId) -> PathBuf {
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

    /// Creates the folder, readable by its owner only (it holds sockets that control the VM).
    pub fn create(&self) -> io::Result<()> {
        fs::create_dir_all(&self.dir)?;
        fs::set_permissions(&self.dir, fs::Permissions::from_mode(0o700))
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

    /// Removes the whole folder (a worker that exits cleanly leaves nothing behind), under the
    /// same ownership rule as [`remove_live_files`](Self::remove_live_files).
    pub fn remove(&self, pid: u32) {
        if matches!(self.read_pid(), Ok(Some(found)) if found != pid) {
            return;
        }
        let _ = fs::remove_dir_all(&self.dir);
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
    fn last_log_line_skips_trailing_blank_lines() {
        let dir = tempfile::tempdir().unwrap();
        let runtime = StoreLayout::new(dir.path()).runtime(VmId::new_random());
        runtime.create().unwrap();
        fs::write(runtime.log_file(), "first\nerror: no kernel\n\n").unwrap();

        assert_eq!(runtime.last_log_line().as_deref(), Some("error: no kernel"));
    }
}
